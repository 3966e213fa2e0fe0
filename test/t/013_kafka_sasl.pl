# The production setup of the order stream: SASL_SSL with SCRAM-SHA-512,
# a user, a password and the CA of the broker's certificate (made by the
# test).  Orders flow; the password never appears in the server log, in
# dwh.status, or to a non-superuser; a wrong password shows as an error in
# dwh.status and nothing is consumed until it is corrected.  Then the
# password moves to dwh.kafka_options_file, as the README recommends, and
# a tags topic is set: the consumer and the tags worker's producer both
# authenticate with the file's password (more orders applied, every tag
# event produced).

use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;

use DwhTest;
use PostgreSQL::Test::Utils;
use Test::More;

my $password = 'Sup3r-Secret-42';
$ENV{DWH_KAFKA_SASL_USER} = 'dwh';
$ENV{DWH_KAFKA_SASL_PASSWORD} = $password;
my $broker = start_broker(partitions => 2, sasl => 1);
my $node = new_dwh_node('kafka_sasl', 'dwh.kafka_batch_wait' => '50ms');
load_dictionaries($node);
my $tmp = $PostgreSQL::Test::Utils::tmp_check;

sub sasl_options
{
	my ($pw) = @_;
	return "security.protocol=SASL_SSL sasl.mechanisms=SCRAM-SHA-512 "
	  . "sasl.username=dwh sasl.password=$pw ssl.ca.location=$broker->{ca}";
}

# A wrong password first.
$node->safe_psql('postgres',
	"ALTER SYSTEM SET dwh.kafka_options = '" . sasl_options('wrong-password') . "'; "
	  . "ALTER SYSTEM SET dwh.kafka_brokers = '$broker->{sasl_bootstrap}'; SELECT pg_reload_conf()");
generate_orders("$tmp/orders.txt", '--count 2000 --seed 31', "--manifest $tmp/orders.json");
my $manifest = read_manifest("$tmp/orders.json");
produce($broker, "$tmp/orders.txt");
ok(wait_for($node,
		"SELECT bool_or(last_error ILIKE '%authentication%') FROM dwh.worker_status()"),
	'a wrong password shows as an authentication error in dwh.status');
is(stored_total($node), '0', 'nothing consumed with a wrong password');

# The right one, by reload.
$node->safe_psql('postgres',
	"ALTER SYSTEM SET dwh.kafka_options = '" . sasl_options($password) . "'; SELECT pg_reload_conf()");
ok(wait_applied($node, $manifest->{messages}), 'orders flow over SASL_SSL');
check_consistent($node, 'over SASL_SSL');
check_manifest_counts($node, $manifest, 'over SASL_SSL');

# The password in a file of the server's user, the rest in
# dwh.kafka_options; a topic for the tags worker, and a rule that grants a
# tag to every user with an order.
broker_command('create-topic', $broker->{dir}, 'user-tags', 1);
my $secret_file = "$tmp/kafka-secret";
append_to_file($secret_file, "sasl.password=$password\n");
chmod 0600, $secret_file or die "chmod $secret_file: $!";
my $options = sasl_options($password);
$options =~ s/ sasl\.password=\S+//;
$node->safe_psql('postgres',
	"ALTER SYSTEM SET dwh.kafka_options = '$options'; "
	  . "ALTER SYSTEM SET dwh.kafka_options_file = '$secret_file'; "
	  . "ALTER SYSTEM SET dwh.tags_topic = 'user-tags'; SELECT pg_reload_conf()");
ok(wait_for($node, q{SELECT current_setting('dwh.tags_topic') = 'user-tags'}),
	'the tags topic is set');
$node->safe_psql('postgres',
	q{INSERT INTO dwh.tag_rules (tag, kind) VALUES ('customer', 'all_orders')});
generate_orders("$tmp/more.txt", '--count 500 --seed 32 --clean --first-id 5000000',
	"--manifest $tmp/more.json");
my $more = read_manifest("$tmp/more.json")->{messages};
produce($broker, "$tmp/more.txt");
ok(wait_applied($node, $manifest->{messages} + $more),
	'the consumer authenticates with the password of the file: the new orders flow');
my $events = $node->safe_psql('postgres', 'SELECT count(*) FROM cdm.user_tag_events');
cmp_ok($events, '>', 0, "the rule granted tags ($events events)");
ok( wait_for($node,
		"SELECT events_produced = $events AND events_pending = 0 AND last_error IS NULL FROM dwh.status WHERE worker = 'tags'"
	),
	'the tags worker produces every event over SASL_SSL with the password of the file')
  or diag($node->safe_psql('postgres',
	q{SELECT state, events_produced, events_pending, last_error FROM dwh.status WHERE worker = 'tags'}));
check_consistent($node, 'with the password in a file');

# The password stays secret.
my $status = $node->safe_psql('postgres', 'SELECT s::text FROM dwh.status s');
unlike($status, qr/\Q$password\E/, 'dwh.status does not show the password');
my $log = slurp_file($node->logfile);
unlike($log, qr/\Q$password\E/, 'the server log does not hold the password');
unlike($log, qr/wrong-password/, 'nor the wrong one');
like($log, qr/parameter "dwh.kafka_options" changed \(the new value is not logged/,
	'the reload is logged without the value');
$node->safe_psql('postgres', 'CREATE ROLE analyst LOGIN');
my ($ret, $out, $err) = $node->psql('postgres', 'SHOW dwh.kafka_options',
	extra_params => [ '-U', 'analyst' ]);
isnt($ret, 0, 'a non-superuser cannot read dwh.kafka_options');
unlike($out . $err, qr/\Q$password\E/, 'nor see the password');
is($node->safe_psql('postgres',
		"SELECT count(*) FROM pg_settings WHERE name = 'dwh.kafka_options'", extra_params => [ '-U', 'analyst' ]),
	'0', 'nor find it in pg_settings');

$node->stop;
broker_command('stop', $broker->{dir});
done_testing();
