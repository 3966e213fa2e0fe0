# A librdkafka client whose destruction never ends (README.md, "Limits":
# librdkafka 2.0 has been seen to keep one of its threads for good, and
# rd_kafka_destroy() to wait for it).  An interceptor plugin loaded through
# plugin.library.paths (test/kafka/destroy_hang_plugin.c) keeps
# rd_kafka_destroy() waiting while a file exists, so that dwh's own code
# is the production one:
#
#  1. A reload that makes the worker reconnect: it gives the old consumer
#     up after 3 s, logs the WARNING, leaves its process, and the
#     postmaster starts it again; every message is applied once.
#  2. SIGTERM while it waits: the worker exits at once.
#  3. The tags worker's producer, dropped at a reload: the same give-up.
#  4. The server stopped while the destruction hangs: the exiting worker
#     stops waiting at the same deadline, and the server stops.

use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;

use DwhTest;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);
use Time::Local qw(timegm);

my $tmp = $PostgreSQL::Test::Utils::tmp_check;
my $hang = "$tmp/kafka_destroy_hang.on";
my $plugin = "$tmp/kafka_destroy_hang.so";
system('cc', '-shared', '-fPIC', '-Wall', '-Werror', qq{-DHANG_FILE="$hang"},
	'-o', $plugin, "$FindBin::RealBin/../kafka/destroy_hang_plugin.c") == 0
  or die 'could not build the plugin';

my $mock = start_mock_cluster(brokers => 1, partitions => 1);
mock_command($mock, 'create-topic user-tags 1');
my $options = "plugin.library.paths=$plugin";
my $node = new_dwh_node(
	'kafka_destroy_hangs',
	'dwh.kafka_consumers' => 1,
	'dwh.tags_topic' => 'user-tags',
	'dwh.kafka_brokers' => $mock->{bootstrap},
	'dwh.kafka_options' => $options);
load_dictionaries($node);

generate_orders("$tmp/hang.txt", '--count 600 --seed 52',
	"--manifest $tmp/hang.json");
my $manifest = read_manifest("$tmp/hang.json");
my @chunks = split_stream("$tmp/hang.txt", $manifest, 3);
my $produced = 0;

sub produce_next
{
	my $chunk = shift @chunks;
	produce($mock, $chunk->{file});
	$produced += $chunk->{messages};
	return;
}

sub worker_pid
{
	return $node->safe_psql('postgres',
		"SELECT pid FROM dwh.status WHERE worker = 'kafka 1'");
}

# The time of the first log line after $offset that matches $pattern, in
# seconds (the log's timestamps have milliseconds), or undef.
sub logged_at
{
	my ($pattern, $offset) = @_;
	foreach my $line (split /\n/, slurp_file($node->logfile, $offset))
	{
		next unless $line =~ $pattern;
		$line =~ /^(\d+)-(\d+)-(\d+) (\d+):(\d+):(\d+)\.(\d+) UTC/ or next;
		return timegm($6, $5, $4, $3, $2 - 1, $1) + $7 / 1000;
	}
	return undef;
}

sub wait_logged
{
	my ($pattern, $offset) = @_;
	my $deadline = time() + $PostgreSQL::Test::Utils::timeout_default;
	my $at;
	usleep(100_000) until defined($at = logged_at($pattern, $offset)) || time() > $deadline;
	return $at;
}

sub touch
{
	open(my $fh, '>', $hang) or die "could not create $hang: $!";
	close $fh;
	return;
}

produce_next();
ok(wait_applied($node, $produced), 'the first chunk is applied');

# 1. A reload that makes the worker reconnect, its old consumer's
#    destruction hanging.
touch();
my $before = worker_pid();
my $offset = -s $node->logfile;
$node->safe_psql('postgres',
	"ALTER SYSTEM SET dwh.kafka_options = '$options client.id=dwh-reloaded'; SELECT pg_reload_conf()");
my $reconnecting = wait_logged(qr/LOG:  Kafka settings changed, reconnecting/, $offset);
my $given_up = wait_logged(
	qr/WARNING:  Kafka consumer 1 did not shut down within 3000 ms; the worker restarts/,
	$offset);
ok(defined $reconnecting && defined $given_up, 'the worker gives the old consumer up');
my $waited = defined $given_up ? $given_up - ($reconnecting // 0) : -1;
ok($waited >= 2.9 && $waited < 10, "after 3 s ($waited s)");
ok( wait_for(
		$node, "SELECT pid <> $before AND state = 'consuming' FROM dwh.status WHERE worker = 'kafka 1'"),
	'the postmaster starts the worker again, and it consumes');
like(
	slurp_file($node->logfile, $offset),
	qr/background worker "dwh kafka worker" \(PID $before\) exited with exit code 1/,
	'the old process left with exit code 1');
unlink $hang;
produce_next();
ok(wait_applied($node, $produced), 'the second chunk is applied');

# 2. SIGTERM while the destruction hangs: the worker does not wait for it.
touch();
$before = worker_pid();
$offset = -s $node->logfile;
$node->safe_psql('postgres',
	"ALTER SYSTEM SET dwh.kafka_options = '$options'; SELECT pg_reload_conf()");
ok(defined wait_logged(qr/LOG:  Kafka settings changed, reconnecting/, $offset),
	'SIGTERM: the worker reconnects');
usleep(500_000);
my $start = time();
$node->safe_psql('postgres', "SELECT pg_terminate_backend($before)");
ok(wait_for($node, "SELECT NOT EXISTS (SELECT FROM pg_stat_activity WHERE pid = $before)", 10),
	'SIGTERM: the worker stops');
cmp_ok(time() - $start, '<', 2, 'SIGTERM: within 2 s, not at the deadline');
unlike(slurp_file($node->logfile, $offset), qr/did not shut down within/,
	'SIGTERM: it was not waiting for the deadline');
ok( wait_for(
		$node, "SELECT pid <> $before AND state = 'consuming' FROM dwh.status WHERE worker = 'kafka 1'"),
	'SIGTERM: the worker is started again');
unlink $hang;
produce_next();
ok(wait_applied($node, $produced), 'the third chunk is applied');

my ($first, $last) = @{ $manifest->{object_ids} }{qw(first last)};
is($node->safe_psql('postgres', 'SELECT count(*) FROM stg.order_events'),
	$last - $first + 1, 'every order in STG once');
check_consistent($node, 'after the hangs');
check_manifest_counts($node, $manifest, 'after the hangs');

# 3. The tags worker's producer, dropped at a reload of the Kafka options.
ok( wait_for(
		$node, q{SELECT state = 'producing tag events to topic "user-tags"' FROM dwh.status WHERE worker = 'tags'}),
	'producer: the tags worker produces');
touch();
$before = $node->safe_psql('postgres', "SELECT pid FROM dwh.status WHERE worker = 'tags'");
$offset = -s $node->logfile;
$node->safe_psql('postgres',
	"ALTER SYSTEM SET dwh.kafka_options = '$options client.id=dwh-tags-reloaded'; SELECT pg_reload_conf()");
$reconnecting = wait_logged(qr/LOG:  Kafka settings of the tag feed changed, reconnecting/, $offset);
$given_up = wait_logged(
	qr/WARNING:  Kafka producer did not shut down within 3000 ms; the worker restarts/, $offset);
$waited = defined $given_up && defined $reconnecting ? $given_up - $reconnecting : -1;
ok($waited >= 2.9 && $waited < 10, "producer: given up after 3 s ($waited s)");
ok( wait_for(
		$node, qq{SELECT pid <> $before AND state = 'producing tag events to topic "user-tags"'
		          FROM dwh.status WHERE worker = 'tags'}),
	'producer: the tags worker is started again, and produces');
unlink $hang;

# 4. The server stopped while the destruction hangs: the exiting worker
#    gives it up at the deadline.
touch();
$start = time();
$node->stop('fast');
my $stopped = time() - $start;
ok($stopped >= 2.5 && $stopped < 30,
	"the server stops, the worker having waited for the deadline ($stopped s)");
unlink $hang;
unlike(slurp_file($node->logfile), qr/terminated by signal|PANIC/,
	'no process crashed: the server never restarted');

stop_mock_cluster($mock);
done_testing();
