# One Kafka worker owning a topic of 100 partitions (librdkafka's mock
# cluster).  The README promises per-partition status for up to 1,024
# partitions: dwh.status must list every partition the worker owns, and
# dwh.kafka_partitions must name it as the owner of each, so that the
# worker's lag (summed over its partitions) and the alert built on it see
# all of them.  The status used to keep only a worker's first 64.  With
# dwh.kafka_batch_size 100, no batch holds more.  Then a topic of 1,030
# partitions: what is shown stops at 1,024, what is applied does not.

use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;

use DwhTest;
use PostgreSQL::Test::Utils;
use Test::More;

my $partitions = 100;
my $mock = start_mock_cluster(brokers => 1, partitions => $partitions);

my $node = new_dwh_node(
	'many_partitions',
	'dwh.kafka_consumers' => 1,
	'dwh.kafka_batch_size' => 100,
	'dwh.kafka_brokers' => $mock->{bootstrap});
load_dictionaries($node);
my $tmp = $PostgreSQL::Test::Utils::tmp_check;

generate_orders("$tmp/many.txt", '--count 3000 --seed 36 --malformed 0',
	"--manifest $tmp/many.json");
my $manifest = read_manifest("$tmp/many.json");
my $messages = () = slurp_file("$tmp/many.txt") =~ /\n/g;
produce($mock, "$tmp/many.txt");

ok(wait_applied($node, $messages), "all $messages messages applied");
is( $node->safe_psql(
		'postgres', "SELECT count(DISTINCT kafka_partition) FROM dwh.kafka_offsets"),
	$partitions,
	"the messages reached all $partitions partitions");

is( $node->safe_psql(
		'postgres', "SELECT partitions = ARRAY(SELECT generate_series(0, $partitions - 1))
		FROM dwh.status WHERE worker = 'kafka 1'"),
	't',
	"dwh.status lists all $partitions partitions the worker owns");
ok( wait_for(
		$node, "SELECT count(*) = $partitions AND bool_and(worker = 'kafka 1')
			AND bool_and(lag = 0 AND stored_offset = high_watermark)
		FROM dwh.kafka_partitions"),
	'dwh.kafka_partitions names the worker as the owner of every partition, none lagging');
is( $node->safe_psql(
		'postgres', "SELECT jsonb_array_length(partition_offsets) || ' ' || lag
		FROM dwh.status WHERE worker = 'kafka 1'"),
	"$partitions 0",
	"the worker's lag and partition offsets cover all $partitions partitions");

is( $node->safe_psql(
		'postgres', "SELECT messages = $messages AND batches >= ceil(messages / 100.0)
		FROM dwh.status WHERE worker = 'kafka 1'"),
	't', 'no batch held more than dwh.kafka_batch_size (100) messages');

check_consistent($node, 'many partitions');
check_manifest_counts($node, $manifest, 'many partitions');

# Beyond 1,024 partitions (README, "Limits"): a topic of 1,030, an order on
# partition 0 and one on partition 1,029.  Both are applied; the status
# lists the first 1,024 partitions, and the lag of a partition numbered
# above them is unknown (NULL), while partition 0's is known.
my $wide = 1030;
mock_command($mock, "create-topic wide $wide");
generate_orders("$tmp/wide.txt", '--count 2 --seed 37 --clean --first-id 900000');
my @wide_lines = split /^/m, slurp_file("$tmp/wide.txt");
foreach my $i (0, 1)
{
	my $file = "$tmp/wide.$i.txt";
	append_to_file($file, $wide_lines[$i]);
	produce($mock, $file, 'wide', $i == 0 ? 0 : $wide - 1);
}
ok(set_and_reload($node, 'dwh.kafka_topic', 'wide'), 'the worker is given the topic of 1,030 partitions');
ok(wait_for($node, 'SELECT count(*) = 2 FROM stg.order_events WHERE object_id IN (900000, 900001)'),
	'the orders on partitions 0 and 1,029 are applied');
ok( wait_for(
		$node, "SELECT partitions = ARRAY(SELECT generate_series(0, 1023))
		FROM dwh.status WHERE worker = 'kafka 1'"),
	'dwh.status lists the first 1,024 partitions the worker owns');
ok( wait_for(
		$node, "SELECT string_agg(kafka_partition || ':' || stored_offset || ':' || coalesce(lag::text, 'unknown'),
		                          ',' ORDER BY kafka_partition) = '0:1:0,1029:1:unknown'
		FROM dwh.kafka_partitions WHERE topic = 'wide' AND stored_offset IS NOT NULL"),
	"partition 0's lag is known, partition 1,029's is not")
  or diag($node->safe_psql('postgres', "SELECT * FROM dwh.kafka_partitions WHERE topic = 'wide' AND stored_offset IS NOT NULL"));
check_consistent($node, 'beyond 1,024 partitions');

$node->stop;
stop_mock_cluster($mock);
done_testing();
