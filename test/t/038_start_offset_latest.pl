# dwh.kafka_start_offset = latest: a partition with no offset stored
# starts at the end of its log, stored before anything is fetched.  The
# messages already on the topic when the workers first see it are never
# applied; every one produced after is, once, also through a kill -9 of the
# worker before its first batch commits; and the stored offsets count
# both, so that the lag is 0.
# (earliest, the default, is what every other Kafka test uses.)

use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;

use DwhTest;
use PostgreSQL::Test::Utils;
use Test::More;

my $partitions = 2;
my $mock = start_mock_cluster(brokers => 1, partitions => $partitions);
my $node = new_dwh_node(
	'start_latest',
	'dwh.kafka_consumers' => 1,
	'dwh.kafka_start_offset' => 'latest');
load_dictionaries($node);
my $tmp = $PostgreSQL::Test::Utils::tmp_check;

# One order a message, nothing redelivered: a chunk's orders are its lines.
generate_orders("$tmp/latest.txt", '--count 1000 --seed 38 --clean',
	"--manifest $tmp/latest.json");
my $manifest = read_manifest("$tmp/latest.json");
my ($before, $after) = split_stream("$tmp/latest.txt", $manifest, 2);
produce($mock, $before->{file});

# The worker gets the broker only now, and starts both partitions; the
# broker's watermarks in dwh.kafka_partitions show it has fetched them.
$node->safe_psql('postgres',
	"ALTER SYSTEM SET dwh.kafka_brokers = '$mock->{bootstrap}'; SELECT pg_reload_conf()");
ok( wait_for(
		$node, "SELECT count(*) = $partitions AND bool_and(high_watermark IS NOT NULL)
			AND sum(high_watermark) = $before->{messages}
		FROM dwh.kafka_partitions"),
	"the worker fetches both partitions, $before->{messages} messages already there");
is($node->safe_psql('postgres', 'SELECT count(*) FROM stg.order_events'),
	'0', 'nothing of what was there is applied');

# Where each partition starts is stored before anything is fetched: a
# worker that starts the partitions again before its first batch commits
# (here killed while that batch waits for a lock) must not take "latest"
# again, later, past what arrived meanwhile (before, none of it was ever
# applied, and no gap recorded).
ok( wait_for(
		$node, "SELECT count(*) = $partitions AND sum(next_offset) = $before->{messages}
		FROM dwh.kafka_offsets"),
	'the end of each log is stored as the start, before any batch');
my $locker = $node->background_psql('postgres');
$locker->query_safe('BEGIN; LOCK TABLE stg.order_events IN EXCLUSIVE MODE;');
produce($mock, $after->{file});
ok( wait_for(
		$node, q{SELECT count(*) > 0 FROM pg_stat_activity
		WHERE backend_type = 'dwh kafka worker' AND wait_event_type = 'Lock'}),
	'the first batch waits for the lock');
my $worker = $node->safe_psql('postgres',
	q{SELECT pid FROM pg_stat_activity WHERE backend_type = 'dwh kafka worker'});
kill 'KILL', $worker;
eval { $locker->quit; };
# The server restarts every process after the kill.
$node->poll_query_until('postgres', 'SELECT true')
  or die 'the server did not come back after the kill';
my $total = $before->{messages} + $after->{messages};
ok(wait_applied($node, $total), "stored offsets at the end of the log ($total)");
is($node->safe_psql('postgres', 'SELECT count(*) FROM stg.order_events'),
	scalar(keys %{ $after->{ids} }), 'every order produced after the start, once');
is( $node->safe_psql(
		'postgres', 'SELECT count(*) FROM stg.order_events WHERE object_id = ANY ($$'
		  . '{' . join(',', keys %{ $before->{ids} }) . '}$$::bigint[])'),
	'0', 'none of the orders produced before');
ok(wait_for($node, 'SELECT bool_and(lag = 0) FROM dwh.kafka_partitions'), 'no lag');
check_consistent($node, 'start at latest');

$node->stop;
stop_mock_cluster($mock);
done_testing();
