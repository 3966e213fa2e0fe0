# A reload that makes the Kafka workers reconnect, after every broker went
# down and came back (mock cluster): librdkafka 2.0 can then keep one of
# its threads for good (librdkafka issue 4674), and rd_kafka_destroy()
# waited for it forever: the worker stopped consuming and ignored
# SIGTERM.  The old consumer is now destroyed within a deadline
# (src/dwh_kafka_destroy.c), past which the worker restarts.  Whichever
# happens, every message produced before and after the reload is applied
# exactly once, and SIGTERM still ends a worker at once.

use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;

use DwhTest;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time);

my $mock = start_mock_cluster(brokers => 1, partitions => 2);
my $node = new_dwh_node(
	'kafka_reconnect',
	'dwh.kafka_consumers' => 2,
	'dwh.kafka_brokers' => $mock->{bootstrap},
	'dwh.kafka_options' => 'session.timeout.ms=6000 heartbeat.interval.ms=500');
load_dictionaries($node);
my $tmp = $PostgreSQL::Test::Utils::tmp_check;

generate_orders("$tmp/reconnect.txt", '--count 3000 --seed 39',
	"--manifest $tmp/reconnect.json");
my $manifest = read_manifest("$tmp/reconnect.json");
my @chunks = split_stream("$tmp/reconnect.txt", $manifest, 3);
my $produced = 0;

sub produce_next
{
	my $chunk = shift @chunks;
	produce($mock, $chunk->{file});
	$produced += $chunk->{messages};
	return;
}

produce_next();
ok(wait_applied($node, $produced), 'the first chunk is applied');

# Every broker down for longer than the session, then back: the workers
# wait, then consume again.
mock_command($mock, 'down -1');
ok( wait_for(
		$node, "SELECT bool_and(state = 'waiting for the broker')
			FROM dwh.status WHERE worker LIKE 'kafka%' AND pid IS NOT NULL"),
	'the workers wait for the brokers');
sleep(8);
mock_command($mock, 'up -1');
ok( wait_for(
		$node, "SELECT count(*) = 2 AND bool_and(state = 'consuming')
			FROM dwh.status WHERE worker LIKE 'kafka%' AND pid IS NOT NULL"),
	'both workers consume again once the brokers are back');
produce_next();
ok(wait_applied($node, $produced), 'the second chunk is applied once the brokers are back');

# Other options: each worker destroys its consumer and makes a new one.
my $log_offset = -s $node->logfile;
$node->safe_psql('postgres',
	"ALTER SYSTEM SET dwh.kafka_options = 'session.timeout.ms=6000 heartbeat.interval.ms=500 client.id=dwh-reloaded'; SELECT pg_reload_conf()");
produce_next();
ok(wait_applied($node, $produced), 'after the reload every message is applied');
my $log = slurp_file($node->logfile, $log_offset);
my $abandoned = () = $log =~ /did not shut down within \d+ ms; the worker restarts/g;
note("consumers given up at the reload: $abandoned");
unlike($log, qr/PANIC|server process .* was terminated by signal/,
	'no crash on the way');

my ($first, $last) = @{ $manifest->{object_ids} }{qw(first last)};
is($node->safe_psql('postgres', 'SELECT count(*) FROM stg.order_events'),
	$last - $first + 1, 'every order in STG once');
check_consistent($node, 'after the reconnect');
check_manifest_counts($node, $manifest, 'after the reconnect');

# SIGTERM still ends a worker at once.
my $pid = $node->safe_psql('postgres', "SELECT pid FROM dwh.status WHERE worker = 'kafka 1'");
my $start = time();
$node->safe_psql('postgres', "SELECT pg_terminate_backend($pid)");
ok(wait_for($node, "SELECT NOT EXISTS (SELECT FROM pg_stat_activity WHERE pid = $pid)", 10),
	'the worker stops on SIGTERM');
cmp_ok(time() - $start, '<', 2, 'within 2 s');

$node->stop;
stop_mock_cluster($mock);
done_testing();
