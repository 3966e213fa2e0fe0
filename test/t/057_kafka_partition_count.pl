# The number of a topic's partitions changed while the Kafka workers are
# away (README, "Changing the number of partitions"), against a real
# broker with two workers.
#
# Partitions added while the workers are away for less than the session
# timeout (10 s): the server is stopped, the topic altered from 2 to 4
# partitions and the server started again at once.  The workers rejoin as
# the same static members and are handed their old assignment, with no
# rebalance (Kafka's KAFKA-13435): the new partitions were assigned to no
# one and their orders never applied.  They must be applied within 150 s
# (a worker that sees partitions of the topic assigned to no worker and
# with no stored offset on two metadata checks 10 s apart joins the group
# again), and the four partitions shared by the workers.
#
# A topic recreated with fewer partitions: while the workers hold off
# (dwh.kafka_brokers emptied, for longer than the session timeout),
# orders go to partitions 2 and 3 of a topic of 4 partitions, then the
# topic is deleted and created again with 2.  Those orders were lost
# without a trace; now each of the two partitions that no longer exist
# gets a row in dwh.kafka_gaps from its stored offset (log start and end
# 0, skipped), its stored offset goes back to 0 and a WARNING says that
# the partition no longer exists.  The new topic's orders are applied.

use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;

use DwhTest;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);

my $tmp = $PostgreSQL::Test::Utils::tmp_check;
my $broker = start_broker(partitions => 2);
my $node = new_dwh_node(
	'kafka_partition_count',
	'dwh.kafka_consumers' => 2,
	'dwh.kafka_brokers' => $broker->{bootstrap},
	'dwh.kafka_batch_wait' => '10ms');
load_dictionaries($node);

sub psql { return $node->safe_psql('postgres', $_[0]); }

# The partitions the Kafka workers own, e.g. '0,1,2,3'.
sub owned_partitions
{
	return psql(
		q{SELECT string_agg(p::text, ',' ORDER BY p) FROM dwh.status, unnest(partitions) p WHERE worker LIKE 'kafka%'}
	);
}

# Orders with object_id in [$first, $first + $count) in STG.
sub orders_in_stg
{
	my ($first, $count) = @_;
	return psql(
		    'SELECT count(*) FROM stg.order_events WHERE object_id BETWEEN '
		  . $first . ' AND '
		  . ($first + $count - 1));
}

# The number of partitions of a topic, as the broker's metadata says.
sub partition_count
{
	my ($topic) = @_;
	require JSON::PP;
	my $json = `kcat -L -J -b $broker->{bootstrap} -t $topic 2>&1`;
	die "kcat -L failed: $json" if $? != 0;
	my ($t) = grep { $_->{topic} eq $topic } @{ JSON::PP::decode_json($json)->{topics} };
	return $t ? scalar @{ $t->{partitions} } : 0;
}

# Clean orders from $first_id, split into one file per partition of
# @partitions and produced there.  Returns the number of orders.
sub produce_to_partitions
{
	my ($name, $first_id, $count, $topic, @partitions) = @_;
	generate_orders("$tmp/$name.txt", "--count $count --seed $first_id --clean",
		"--first-id $first_id", "--manifest $tmp/$name.json");
	my $manifest = read_manifest("$tmp/$name.json");
	my @chunks = split_stream("$tmp/$name.txt", $manifest, scalar @partitions);
	produce($broker, $chunks[$_]{file}, $topic, $partitions[$_])
	  foreach 0 .. $#partitions;
	return $manifest->{object_ids}{count};
}

# --- partitions added while the workers are away less than 10 s ---

generate_orders("$tmp/a.txt", '--count 200 --seed 57', "--manifest $tmp/a.json");
my $first_stream = read_manifest("$tmp/a.json");
produce($broker, "$tmp/a.txt");
ok(wait_applied($node, $first_stream->{messages}), 'added: the first orders are applied');
is(owned_partitions(), '0,1', 'added: the two partitions are shared by the workers');

my $stopped_at = time();
$node->stop;
broker_command('tool', 'org.apache.kafka.tools.TopicCommand', '--bootstrap-server',
	$broker->{bootstrap}, '--alter', '--topic', $broker->{topic}, '--partitions', '4');
$node->start;
my $away = time() - $stopped_at;
is(partition_count($broker->{topic}), 4, 'added: the topic has 4 partitions');
note(sprintf('added: the server was down %.1f s, the topic altered meanwhile', $away));
# Longer, and the group forgets the members: no longer the case tested.
cmp_ok($away, '<', 9, 'added: the workers are away for less than the session timeout');

my $added_first = 2000000;
my $added = produce_to_partitions('added', $added_first, 200, $broker->{topic}, 2, 3);
my $started = time();
ok( wait_for(
		$node,
		"SELECT count(*) = $added FROM stg.order_events WHERE object_id >= $added_first",
		150),
	'added: the orders of the partitions added while the workers were away are applied within 150 s'
) or diag(psql('SELECT * FROM dwh.kafka_partitions'));
note(sprintf('added: applied (or given up) after %.0f s', time() - $started));
is(owned_partitions(), '0,1,2,3', 'added: the four partitions are shared by the workers');
check_consistent($node, 'after partitions were added');

# --- a topic recreated with fewer partitions ---
# Another topic and another group: nothing of the first part's group
# (whichever way it went) carries over.

my $topic = 'orders-b';
broker_command('create-topic', $broker->{dir}, $topic, 4);
psql(   "ALTER SYSTEM SET dwh.kafka_topic = '$topic'; "
	  . "ALTER SYSTEM SET dwh.kafka_group_id = 'dwh-b'; SELECT pg_reload_conf()");
generate_orders("$tmp/b.txt", '--count 200 --seed 58 --first-id 3000000',
	"--manifest $tmp/b.json");
my $b_stream = read_manifest("$tmp/b.json");
produce($broker, "$tmp/b.txt", $topic);
ok(wait_applied($node, $b_stream->{messages}, $topic), 'fewer: the orders of the 4 partitions are applied');
ok(wait_for($node,
		"SELECT count(*) = 4 AND bool_and(next_offset > 0) FROM dwh.kafka_offsets WHERE topic = '$topic'"),
	'fewer: each of the 4 partitions has applied orders');
is(owned_partitions(), '0,1,2,3', 'fewer: the four partitions are shared by the workers');
check_consistent($node, 'before the topic is recreated');

# The workers hold off: orders to partitions 2 and 3 are not applied.
my $held_at = time();
psql("ALTER SYSTEM SET dwh.kafka_brokers = ''; SELECT pg_reload_conf()");
ok( wait_for($node,
		"SELECT count(*) = 2 AND bool_and(state LIKE 'idle%') FROM dwh.status WHERE worker LIKE 'kafka%'"),
	'fewer: the workers hold off');
my $lost_first = 4000000;
my $lost = produce_to_partitions('lost', $lost_first, 20, $topic, 2, 3);
my %stored;
$stored{$_} = psql(
	"SELECT next_offset FROM dwh.kafka_offsets WHERE topic = '$topic' AND kafka_partition = $_")
  foreach 2, 3;
note("fewer: stored offsets of partitions 2 and 3: $stored{2}, $stored{3}");

# Recreated with 2 partitions; the deletion completes in the background.
broker_command('tool', 'org.apache.kafka.tools.TopicCommand',
	'--bootstrap-server', $broker->{bootstrap}, '--delete', '--topic', $topic);
my $created = 0;
foreach my $try (1 .. 60)
{
	last if $created = eval { broker_command('create-topic', $broker->{dir}, $topic, 2); 1 };
	usleep(500_000);
}
ok($created && partition_count($topic) == 2, 'fewer: the topic is recreated with 2 partitions');
my $new_first = 5000000;
my $new = produce_to_partitions('new', $new_first, 20, $topic, 0, 1);

# Away for longer than the session timeout: the group starts afresh, with
# an assignment of the two partitions that exist.
my $left = $held_at + 12 - time();
usleep(int($left * 1_000_000)) if $left > 0;
psql("ALTER SYSTEM SET dwh.kafka_brokers = '$broker->{bootstrap}'; SELECT pg_reload_conf()");

my $deadline = time() + 120;
sub remaining { my $r = $deadline - time(); return $r > 1 ? $r : 1; }

ok(wait_for($node, "SELECT count(*) = $new FROM stg.order_events WHERE object_id >= $new_first",
		remaining()),
	'fewer: the orders of the recreated topic are applied');
ok( wait_for(
		$node,
		"SELECT count(*) = 2 FROM dwh.kafka_gaps WHERE topic = '$topic' AND kafka_partition IN (2, 3)",
		remaining()),
	'fewer: partitions 2 and 3 each get a gap');
is( psql(
		"SELECT kafka_partition, next_offset, log_start_offset, log_end_offset, action FROM dwh.kafka_gaps WHERE topic = '$topic' AND kafka_partition IN (2, 3) ORDER BY kafka_partition"
	),
	"2|$stored{2}|0|0|skipped\n3|$stored{3}|0|0|skipped",
	'fewer: the gaps run from the stored offsets, the logs hold nothing (0 to 0)');
ok( wait_for(
		$node,
		"SELECT count(*) = 2 AND bool_and(next_offset = 0) FROM dwh.kafka_offsets WHERE topic = '$topic' AND kafka_partition IN (2, 3)",
		remaining()),
	'fewer: the stored offsets of partitions 2 and 3 go back to 0')
  or diag(psql("SELECT * FROM dwh.kafka_offsets WHERE topic = '$topic' ORDER BY kafka_partition"));
ok(slurp_file($node->logfile) =~ /WARNING:  .*partition 2 of topic "$topic" no longer exists/,
	'fewer: a WARNING says that partition 2 no longer exists')
  or diag(join('', grep { /WARNING/ } split /^/m, slurp_file($node->logfile)));
is(orders_in_stg($lost_first, $lost), '0', 'fewer: the lost orders are not in STG');
is(orders_in_stg($new_first, $new), $new, 'fewer: the new orders are in STG once');
is( psql('SELECT count(*) FROM stg.order_events'),
	$first_stream->{object_ids}{count} + $added + $b_stream->{object_ids}{count} + $new,
	'every order that was not lost is in STG once');
check_consistent($node, 'after the topic was recreated');

$node->stop;
broker_command('stop', $broker->{dir});
done_testing();
