# Secrets that never pass through SQL: dwh.redis_url_file and
# dwh.kafka_options_file name files readable by the server's user only.
# The Redis worker connects with the password of the file (a real
# redis-server that requires it), reads the file again on reload, refuses a
# file that its group or others may read (and takes it once fixed, without
# a reload), and refuses dwh.redis_url and the file together.  The Kafka
# workers (no broker: the brokers' address is a closed port) add the file's
# properties to dwh.kafka_options, refuse an unknown or reserved property of
# the file naming it by its number, and a readable file; against a mock
# cluster, the file's security.protocol (PLAINTEXT) wins over the one of
# dwh.kafka_options (SSL, which the mock cannot speak): the workers consume.
# Neither password appears in the log, which logs every statement, and no
# message of the workers (log or dwh.status) quotes the files' paths.

use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;

use DwhTest;
use PostgreSQL::Test::Cluster;
use POSIX qw(mkfifo);
use PostgreSQL::Test::Utils;
use RedisServer;
use Test::More;

sub random_secret
{
	my $s = 'Fs';
	$s .= (0 .. 9, 'a' .. 'z', 'A' .. 'Z')[ int(rand(62)) ] for 1 .. 22;
	return $s;
}

my $redis_password = random_secret();
my $kafka_password = random_secret();
my $redis = RedisServer->new(password => $redis_password);

my $node = PostgreSQL::Test::Cluster->new('secret_files');
$node->init(extra => [ '--encoding=UTF8', '--locale=C' ]);
$node->append_conf(
	'postgresql.conf', q{
shared_preload_libraries = 'dwh'
log_statement = 'all'
log_min_messages = debug1
dwh.redis_refresh_interval = 1
});
$node->start;
$node->safe_psql('postgres', 'CREATE EXTENSION dwh');

my $dir = PostgreSQL::Test::Utils::tempdir();
my $redis_file = "$dir/redis_url";
my $kafka_file = "$dir/kafka_options";

sub write_secret_file
{
	my ($file, $content, $mode) = @_;
	unlink $file;
	append_to_file($file, $content);
	chmod $mode, $file or die "chmod $file: $!";
	return;
}

# Every state and error the workers showed in dwh.status.
my @statuses;

sub redis_status
{
	my $status = $node->safe_psql('postgres',
		"SELECT state || ' | ' || coalesce(last_error, '') FROM dwh.status WHERE worker = 'redis'"
	);
	push @statuses, $status;
	return $status;
}

sub wait_redis
{
	my ($pattern, $name) = @_;
	my $deadline = time() + $PostgreSQL::Test::Utils::timeout_default;
	my $status = '';
	while (time() < $deadline)
	{
		$status = redis_status();
		last if $status =~ $pattern;
		select(undef, undef, undef, 0.2);
	}
	like($status, $pattern, $name);
	return;
}

# A file its group may read is refused, with the reason in dwh.status.
write_secret_file($redis_file, $redis->url . "\n", 0640);
$node->safe_psql('postgres',
	"ALTER SYSTEM SET dwh.redis_url_file = '$redis_file'; SELECT pg_reload_conf()");
wait_redis(
	qr/^error: the file named by dwh\.redis_url_file has group or world access: permissions should be u=rw \(0600\) or less/,
	'a Redis URL file readable by its group is refused');

# Fixed by chmod alone: the worker reads the file again while it waits.
chmod 0600, $redis_file;
wait_redis(qr/^mirroring \|/,
	'the worker connects with the password of the file once it is 0600');
is($node->safe_psql('postgres', 'SHOW dwh.redis_url'),
	'', 'dwh.redis_url stays empty');

# A new password in the file is read on reload.
write_secret_file($redis_file,
	$redis->url(password => 'wrong-' . random_secret()) . "\n", 0600);
$node->reload;
wait_redis(qr/refused the password/,
	'on reload the worker reads the file again (a wrong password now)');
# Trailing white space (spaces, tabs, blank lines) is ignored.
write_secret_file($redis_file, $redis->url . " \t\n\n  \n", 0600);
$node->reload;
wait_redis(qr/^mirroring/, 'and the right one again, trailing white space ignored');

# dwh.redis_url and the file together are refused.
$node->safe_psql('postgres',
	"ALTER SYSTEM SET dwh.redis_url = 'redis://127.0.0.1:1/0'; SELECT pg_reload_conf()"
);
wait_redis(
	qr/^error: dwh\.redis_url and dwh\.redis_url_file are both set: empty one of them and reload/,
	'dwh.redis_url and dwh.redis_url_file together are refused');
$node->safe_psql('postgres',
	'ALTER SYSTEM RESET dwh.redis_url; SELECT pg_reload_conf()');
wait_redis(qr/^mirroring/, 'the file alone is used again');

# A file that is not there.
$node->safe_psql('postgres',
	"ALTER SYSTEM SET dwh.redis_url_file = '$dir/none'; SELECT pg_reload_conf()"
);
wait_redis(
	qr/^error: could not open the file named by dwh\.redis_url_file: No such file or directory/,
	'a missing file is reported');

# Not a regular file: a directory, and a FIFO that no one writes (opened
# without waiting for a writer: the worker does not hang on it).
$node->safe_psql('postgres',
	"ALTER SYSTEM SET dwh.redis_url_file = '$dir'; SELECT pg_reload_conf()");
wait_redis(
	qr/^error: the file named by dwh\.redis_url_file is not a regular file \|/,
	'a directory is refused');
# A URL the worker cannot use: the message says why, not what the file
# holds (its password is checked for in the log below).
my $bad_url_password = random_secret();
write_secret_file($redis_file, "redis://:$bad_url_password\@127.0.0.1:99999/0\n", 0600);
$node->safe_psql('postgres',
	"ALTER SYSTEM SET dwh.redis_url_file = '$redis_file'; SELECT pg_reload_conf()");
wait_redis(
	qr/^error: invalid Redis URL in the file named by dwh\.redis_url_file: the port must be a number from 1 to 65535 \|/,
	'an invalid URL in the file is refused without quoting it');
mkfifo("$dir/fifo", 0600) or die "mkfifo: $!";
$node->safe_psql('postgres',
	"ALTER SYSTEM SET dwh.redis_url_file = '$dir/fifo'; SELECT pg_reload_conf()");
wait_redis(
	qr/^error: the file named by dwh\.redis_url_file is not a regular file \|/,
	'a FIFO is refused at once');

# Kafka: the file's properties are applied after dwh.kafka_options.
my $closed_port = PostgreSQL::Test::Cluster::get_free_port();

sub kafka_status
{
	my ($worker) = @_;
	$worker //= 'kafka 1';
	my $status = $node->safe_psql('postgres',
		"SELECT state || ' | ' || coalesce(last_error, '') FROM dwh.status WHERE worker = '$worker'"
	);
	push @statuses, $status;
	return $status;
}

# Wait until the Kafka worker's status (or that of the worker named last)
# matches.
sub wait_kafka
{
	my ($pattern, $name, $worker) = @_;
	my $deadline = time() + $PostgreSQL::Test::Utils::timeout_default;
	my $status = '';
	while (time() < $deadline)
	{
		$status = kafka_status($worker);
		last if $status =~ $pattern;
		select(undef, undef, undef, 0.2);
	}
	like($status, $pattern, $name);
	return;
}

write_secret_file($kafka_file,
	"sasl.username=dwh\nsasl.password=$kafka_password\nno.such.property=1\n",
	0600);
$node->safe_psql(
	'postgres', qq{
ALTER SYSTEM SET dwh.kafka_brokers = '127.0.0.1:$closed_port';
ALTER SYSTEM SET dwh.kafka_options = 'security.protocol=SASL_PLAINTEXT';
ALTER SYSTEM SET dwh.kafka_options_file = '$kafka_file';
ALTER SYSTEM SET dwh.tags_topic = 'user-tags';
SELECT pg_reload_conf();
});
wait_kafka(
	qr/^waiting: invalid Kafka settings \| invalid Kafka options in the file named by dwh\.kafka_options_file: name=value pair 3 names no librdkafka property$/,
	'an unknown property of the file is named by its number');
# The tags worker's producer reads the same settings, and says the same.
wait_kafka(
	qr/^waiting: invalid Kafka settings \| invalid Kafka options in the file named by dwh\.kafka_options_file: name=value pair 3 names no librdkafka property$/,
	'the tags worker names the property too', 'tags');

my $refusal_offset = -s $node->logfile;
write_secret_file($kafka_file,
	"sasl.password=$kafka_password group.id=other\n", 0600);
$node->reload;
wait_kafka(
	qr/invalid Kafka options in the file named by dwh\.kafka_options_file: librdkafka property "group\.id" is managed by dwh$/,
	'a property dwh manages is refused in the file too');
# The log says so too: the reason quotes a property's name, never a value,
# and dwh vouches for it to the log filter.
ok( $node->wait_for_log(
		qr/DETAIL:  invalid Kafka options in the file named by dwh\.kafka_options_file: librdkafka property "group\.id" is managed by dwh$/m,
		$refusal_offset),
	'the log names the property dwh manages');

my $log_offset = -s $node->logfile;
write_secret_file($kafka_file,
	"sasl.mechanisms=PLAIN sasl.username=dwh sasl.password='$kafka_password'\n",
	0644);
$node->reload;
wait_kafka(
	qr/the file named by dwh\.kafka_options_file has group or world access/,
	'a Kafka options file readable by others is refused');
# Reported once by each worker that reads the file (the Kafka worker and
# the tags worker's producer): sessions never read it, and a worker does
# not repeat itself while the file stays as it is.
$node->safe_psql('postgres', 'SHOW dwh.kafka_options_file') foreach 1 .. 3;
sleep(6);
my @reports = slurp_file($node->logfile, $log_offset) =~ /^.*group or world access.*$/mg;
my @reporters = sort map { /\[(\d+)\]/ ? $1 : '?' } @reports;
my @readers = sort split /\n/, $node->safe_psql('postgres',
	q{SELECT pid FROM dwh.status WHERE worker IN ('kafka 1', 'tags')});
is("@reporters", "@readers",
	'the refused file is reported once in the log by the Kafka and the tags worker')
  or diag(join("\n", @reports));

chmod 0600, $kafka_file;
$node->reload;
wait_kafka(qr/^(consuming|waiting for the broker)/,
	'a valid 0600 file is applied: the worker consumes (and waits for the broker)'
);
wait_kafka(qr/^(producing tag events to topic "user-tags"|waiting for the broker) \| /,
	'and the tags worker produces (and waits for the broker)', 'tags');

# librdkafka quotes values in its own errors ("Unsupported SASL mechanism:
# X", the path of a key store it cannot open): dwh shows them with each
# value of the DBA's properties replaced by the property's name.
my $mechanism_secret = random_secret();
my $keystore_secret = random_secret();
write_secret_file($kafka_file, "sasl.mechanisms=$mechanism_secret\n", 0600);
$node->reload;
foreach my $worker ('kafka 1', 'tags')
{
	wait_kafka(
		qr/could not create the Kafka (consumer|producer): Unsupported SASL mechanism: \(the value of sasl\.mechanisms\)$/,
		"$worker: librdkafka's refusal of the file's value, the value hidden",
		$worker);
}
write_secret_file($kafka_file, "security.protocol=SSL\n", 0600);
$node->safe_psql('postgres',
	"ALTER SYSTEM SET dwh.kafka_options = 'ssl.keystore.location=$dir/$keystore_secret ssl.keystore.password=x'; SELECT pg_reload_conf()"
);
wait_kafka(
	qr/could not create the Kafka consumer: Failed to open ssl\.keystore\.location: \(the value of ssl\.keystore\.location\)/,
	"librdkafka's refusal of the setting's key store, its path hidden");

# librdkafka expands %{property} in the Kerberos command before it quotes
# it: the text around the placeholder is hidden too.
my $kinit_secret = random_secret();
my $kinit_offset = -s $node->logfile;
write_secret_file($kafka_file,
	"security.protocol=SASL_PLAINTEXT sasl.mechanism=GSSAPI sasl.kerberos.principal=dwh\n"
	  . "sasl.kerberos.kinit.cmd='echo $kinit_secret | kinit %{sasl.kerberos.principal}\@EXAMPLE.COM; exit 3'\n",
	0600);
$node->safe_psql('postgres',
	"ALTER SYSTEM SET dwh.kafka_options = ''; SELECT pg_reload_conf()");
ok( $node->wait_for_log(qr/Kerberos ticket refresh failed: .*exited with code 3/, $kinit_offset),
	'librdkafka reports the Kerberos command that failed');
my @kinit = grep { /Kerberos ticket refresh failed/ } split /\n/,
  slurp_file($node->logfile, $kinit_offset);
is( join("\n", grep { !/Kerberos ticket refresh failed: \(the value of sasl\.kerberos\.kinit\.cmd\)\(the value of sasl\.kerberos\.principal\)\(the value of sasl\.kerberos\.kinit\.cmd\): exited with code 3/ } @kinit),
	'', 'with the command hidden, the expanded placeholder too');

# The file comes after dwh.kafka_options: its PLAINTEXT wins over their SSL.
my $mock = start_mock_cluster(brokers => 1, partitions => 1);
write_secret_file($kafka_file, "security.protocol=PLAINTEXT\n", 0600);
$node->safe_psql(
	'postgres', qq{
ALTER SYSTEM SET dwh.kafka_brokers = '$mock->{bootstrap}';
ALTER SYSTEM SET dwh.kafka_options = 'security.protocol=SSL';
SELECT pg_reload_conf();
});
my $order = "$dir/order.txt";
append_to_file($order,
	q{{"object_id": 1, "object_type": "order", "sent_dttm": "2023-01-02 10:00:00", "payload": {"restaurant": {"id": "r1"}, "date": "2023-01-02 10:00:00", "user": {"id": "u1"}, "order_items": [{"id": "d1", "name": "Dolma", "price": 100, "quantity": 1}], "cost": 100, "payment": 100, "statuses": [], "final_status": "CLOSED", "update_ts": "2023-01-02 10:00:00"}}}
	  . "\n");
produce($mock, $order);
ok($node->poll_query_until('postgres', 'SELECT count(*) = 1 FROM stg.order_events'),
	"the file's security.protocol wins over dwh.kafka_options': the order is applied")
  or diag(kafka_status());
is($node->safe_psql('postgres', 'SELECT count(*) FROM dwh.verify()'),
	'0', 'dwh.verify() finds nothing after the order');

$node->stop;
stop_mock_cluster($mock);
my $log = slurp_file($node->logfile);
like($log, qr/connected to Redis at redis:\/\/:\*\*\*\@127\.0\.0\.1/,
	'the log names Redis by its redacted URL');
foreach my $secret ($redis_password, $kafka_password, $bad_url_password,
	$mechanism_secret, $keystore_secret, $kinit_secret)
{
	my @hits = grep { index($_, $secret) >= 0 } split /\n/, $log;
	ok(!@hits, 'the log holds no password or value of the files and settings') or diag(join("\n", @hits));
}
# The workers' own lines (log_line_prefix names them) and the states they
# showed in dwh.status.
my @paths = grep { index($_, $dir) >= 0 && /\] dwh (kafka|redis) worker/ }
  split /\n/, $log;
push @paths, grep { index($_, $dir) >= 0 } @statuses;
ok(!@paths, 'no message of the workers quotes the path of a file')
  or diag(join("\n", @paths));
my @values = grep { index($_, $mechanism_secret) >= 0 || index($_, $keystore_secret) >= 0 }
  @statuses;
ok(!@values, 'no state dwh.status showed quotes a value librdkafka quoted')
  or diag(join("\n", @values));

done_testing();
