# Kafka end to end against a real broker: two workers share a topic of four
# partitions; generated orders (redelivered duplicates, status changes,
# out-of-order versions, reversals, malformed lines) reach the marts exactly
# as the generator counts them; malformed messages are dead-lettered with
# their coordinates; dwh.kafka_seek() replays a partition without counting
# anything twice; a changed topic setting is picked up on reload (a topic
# not created yet is named in last_error, and consumed once created).

use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;

use DwhTest;
use PostgreSQL::Test::Utils;
use Test::More;

my $broker = start_broker(partitions => 4);
my $node = new_dwh_node(
	'kafka_e2e',
	'dwh.kafka_consumers' => 2,
	'dwh.kafka_batch_wait' => '50ms');
load_dictionaries($node);

# No broker configured yet: the workers idle and say so.
ok(wait_for($node, "SELECT bool_and(state LIKE 'idle%') AND count(*) = 2 FROM dwh.status WHERE worker LIKE 'kafka%'"),
	'workers idle while dwh.kafka_brokers is empty');

my $tmp = $PostgreSQL::Test::Utils::tmp_check;
generate_orders("$tmp/orders.txt", '--count 3000 --seed 7 --malformed 0.02',
	'--duplicates 0.05 --status-changes 0.05 --out-of-order 0.03',
	'--reversals 0.03', "--manifest $tmp/orders.json");
my $manifest = read_manifest("$tmp/orders.json");
produce($broker, "$tmp/orders.txt");

# Consumption starts on reload, without a restart.
$node->safe_psql('postgres',
	"ALTER SYSTEM SET dwh.kafka_brokers = '$broker->{bootstrap}'; SELECT pg_reload_conf()");
ok(wait_applied($node, $manifest->{messages}), 'every message applied');

is($node->safe_psql('postgres', 'SELECT count(*) FROM stg.order_events'),
	$manifest->{object_ids}{count}, 'each produced order is in STG once');
is( $node->safe_psql('postgres',
		"SELECT count(*) FROM dwh.dead_letters WHERE source = 'kafka' AND topic = 'order-service_orders' AND kafka_partition IS NOT NULL AND kafka_offset IS NOT NULL"
	),
	$manifest->{malformed},
	'each malformed message dead-lettered once, with its coordinates');
check_consistent($node, 'after the stream');
check_manifest_counts($node, $manifest, 'after the stream');

# Status: both workers consume, the four partitions are split between
# them, nothing lags.
is( $node->safe_psql('postgres',
		"SELECT string_agg(p::text, ',' ORDER BY p) FROM dwh.status, unnest(partitions) p WHERE worker LIKE 'kafka%'"),
	'0,1,2,3',
	'the four partitions are shared, each owned once');
is($node->safe_psql('postgres',
		"SELECT count(*) FROM dwh.status WHERE state = 'consuming' AND pid IS NOT NULL"),
	'2', 'both workers consuming');
ok(wait_for($node,
		'SELECT count(*) = 4 AND bool_and(lag = 0 AND stored_offset = high_watermark) FROM dwh.kafka_partitions'),
	'no lag on any partition');
# The watermarks are as last seen by the workers, who look again while
# idle: watermark_at is recent, and moves on.
my $seen_at = $node->safe_psql('postgres',
	"SELECT max(watermark_at) FROM dwh.kafka_partitions
	 WHERE watermark_at > now() - interval '1 minute' AND watermark_at <= now()
	 HAVING count(*) = 4");
isnt($seen_at, '', 'each partition\'s watermarks were seen within the last minute (watermark_at)');
ok(wait_for($node,
		"SELECT bool_and(watermark_at > '$seen_at') FROM dwh.kafka_partitions"),
	'and are seen again while the workers idle');
is( $node->safe_psql('postgres',
		'SELECT sum(messages), sum(dead_letters) FROM dwh.status'),
	$manifest->{messages} . '|' . $manifest->{malformed},
	'status counts the messages and dead letters');

# Replay partition 0 from its start: applied again, counted once.
my $p0 = $node->safe_psql('postgres',
	'SELECT next_offset FROM dwh.kafka_offsets WHERE kafka_partition = 0');
my $before = $node->safe_psql('postgres', 'SELECT sum(messages) FROM dwh.status');
$node->safe_psql('postgres', 'SELECT dwh.kafka_seek(0, 0)');
ok(wait_for($node, "SELECT sum(messages) >= $before + $p0 FROM dwh.status"),
	'partition 0 replayed');
ok(wait_for($node,
		"SELECT next_offset = $p0 AND NOT seek_requested FROM dwh.kafka_offsets WHERE kafka_partition = 0"),
	'partition 0 back at its end');
is( $node->safe_psql('postgres',
		"SELECT count(*) FROM dwh.dead_letters WHERE source = 'kafka'"),
	$manifest->{malformed}, 'replayed malformed messages are not dead-lettered twice');
check_consistent($node, 'after the replay');
check_manifest_counts($node, $manifest, 'after the replay');

# Another topic, set by reload before it exists: the workers reconnect and
# say that it does not exist; once it is created they consume it.
$node->safe_psql('postgres',
	"ALTER SYSTEM SET dwh.kafka_topic = 'orders-2'; ALTER SYSTEM SET dwh.kafka_batch_size = 100; SELECT pg_reload_conf()"
);
ok( wait_for($node,
		q{SELECT count(*) = 2 AND bool_and(last_error = 'Subscribed topic not available: orders-2: Broker: Unknown topic or partition')
		  FROM dwh.status WHERE worker LIKE 'kafka%'}),
	'a topic that does not exist is named in both workers\' last_error')
  or diag($node->safe_psql('postgres', q{SELECT worker, state, last_error FROM dwh.status}));
broker_command('create-topic', $broker->{dir}, 'orders-2', 2);
generate_orders("$tmp/more.txt", '--count 500 --seed 8 --first-id 2000000',
	"--manifest $tmp/more.json");
my $more = read_manifest("$tmp/more.json");
produce($broker, "$tmp/more.txt", 'orders-2');
ok(wait_applied($node, $more->{messages}, 'orders-2'), 'the new topic is consumed once created');
ok(wait_for($node,
		q{SELECT count(*) = 2 AND bool_and(last_error IS NULL) FROM dwh.status WHERE worker LIKE 'kafka%'}),
	'and the errors are cleared');
is($node->safe_psql('postgres', 'SELECT count(*) FROM stg.order_events'),
	$manifest->{object_ids}{count} + $more->{object_ids}{count},
	'orders of both topics in STG');
check_consistent($node, 'after the topic change');
ok( $node->log_contains('Kafka settings changed, reconnecting'),
	'the reconnection is logged');

# Partitions added to the topic while the workers run are assigned and
# consumed within seconds (librdkafka's default metadata refresh left them
# to no one for 5 minutes, with no lag shown).
broker_command('tool', 'org.apache.kafka.tools.TopicCommand', '--bootstrap-server',
	$broker->{bootstrap}, '--alter', '--topic', 'orders-2', '--partitions', '4');
generate_orders("$tmp/added.txt", '--count 200 --seed 9 --first-id 3000000',
	"--manifest $tmp/added.json");
my $added = read_manifest("$tmp/added.json");
produce($broker, "$tmp/added.txt", 'orders-2', 3);
ok( wait_for(
		$node,
		"SELECT count(*) = $added->{object_ids}{count} FROM stg.order_events WHERE object_id >= 3000000",
		60),
	'orders produced to a partition added while the workers run are applied within a minute')
  or diag($node->safe_psql('postgres', 'SELECT * FROM dwh.kafka_partitions'));
is( $node->safe_psql('postgres',
		q{SELECT string_agg(p::text, ',' ORDER BY p) FROM dwh.status, unnest(partitions) p WHERE worker LIKE 'kafka%'}),
	'0,1,2,3', 'the four partitions are shared by the workers');
check_consistent($node, 'after partitions were added');

$node->stop;
broker_command('stop', $broker->{dir});
done_testing();
