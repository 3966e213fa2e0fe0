# Faults injected on demand with librdkafka's mock cluster
# (test/kafka/mock_cluster.c): two workers consume a stream from a mock
# cluster of three brokers while, one after another and mid-stream,
#  - Fetch requests fail (NOT_LEADER_FOR_PARTITION, a dropped connection);
#  - the leaders of two partitions move to another broker, and the old
#    leader goes down: the workers must fetch from the new leader;
#  - every broker goes down, then comes back, once mid-stream and once for
#    longer than the session with nothing left to consume: dwh.status says
#    so, then the workers consume again by themselves;
#  - the group coordinator moves to another broker and the old one goes
#    down; a Heartbeat error on the new coordinator forces a rebalance;
#  - JoinGroup, Heartbeat and OffsetCommit requests fail, forcing the
#    group to be joined again with errors on the way;
#  - every broker answers 500 ms late.
# After each fault every message produced so far is applied once: each
# order in STG once, dead letters only for the malformed messages, no lag,
# dwh.verify() empty and the marts equal to a recount; at the end the marts
# equal the generator's counts.  The mock brokers count the injected errors
# still pending: each must reach 0, or the fault never hit the workers.
#
# What librdkafka 2.0.2's mock cluster does not do (rdkafka_mock_cgrp.c,
# rdkafka_mock_handlers.c): it reads a JoinGroup's GroupInstanceId and
# ignores it, so static membership is not mocked (a member that comes back
# is a new member); a rebalance waits for its timer (session timeout less
# 1 s, 3 s for the first join) rather than for the members; a partition
# keeps at most 5 MB or 100,000 message sets, the older ones are deleted
# (so the stream here stays well under it); a broker set down keeps
# leading its partitions (no leader election).

use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;

use DwhTest;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);

my $partitions = 4;
my $mock = start_mock_cluster(brokers => 3, partitions => $partitions);

# Known places: partitions 0 and 2 on broker 1, 1 and 3 on broker 2, the
# group's coordinator on broker 3.
mock_command($mock, 'leader 0 1');
mock_command($mock, 'leader 2 1');
mock_command($mock, 'leader 1 2');
mock_command($mock, 'leader 3 2');
mock_command($mock, 'coordinator dwh 3');

my $node = new_dwh_node(
	'kafka_mock',
	'dwh.kafka_consumers' => 2,
	'dwh.kafka_brokers' => $mock->{bootstrap},
	# A shorter session: each mock rebalance waits for it.
	'dwh.kafka_options' => 'session.timeout.ms=6000 heartbeat.interval.ms=500',
	'dwh.kafka_batch_size' => 200,
	'dwh.kafka_batch_wait' => '50ms');
load_dictionaries($node);
my $tmp = $PostgreSQL::Test::Utils::tmp_check;

generate_orders("$tmp/mock.txt", '--count 12000 --seed 41 --malformed 0.01',
	'--duplicates 0.03 --status-changes 0.03 --out-of-order 0.02 --reversals 0.02',
	"--manifest $tmp/mock.json");
my $manifest = read_manifest("$tmp/mock.json");
my @chunks = split_stream("$tmp/mock.txt", $manifest, 7);
my ($produced, $malformed, %ids) = (0, 0);

# Produce the next chunk of the stream.
sub produce_next
{
	my $chunk = shift @chunks;
	produce($mock, $chunk->{file});
	$produced += $chunk->{messages};
	$malformed += $chunk->{malformed};
	%ids = (%ids, %{ $chunk->{ids} });
	return;
}

# Wait until a mock broker has answered every error pushed for an API.
sub wait_errors_hit
{
	my ($broker, $api) = @_;
	my $deadline = time() + $PostgreSQL::Test::Utils::timeout_default;
	my $left;
	while (time() < $deadline)
	{
		$left = mock_command($mock, "error-count $broker $api");
		last if $left == 0;
		usleep(200_000);
	}
	is($left, 0, "every injected $api error on broker $broker was hit");
	return;
}

# Exactly once so far: every produced message applied once, each order in
# STG once, the malformed ones dead-lettered, nothing lagging, the marts
# consistent.
sub check_exactly_once
{
	my ($label) = @_;
	ok(wait_applied($node, $produced), "$label: all $produced messages applied");
	is($node->safe_psql('postgres', 'SELECT count(*) FROM stg.order_events'),
		scalar(keys %ids), "$label: every produced order in STG once");
	is( $node->safe_psql('postgres',
			"SELECT count(*) FROM dwh.dead_letters WHERE source = 'kafka' AND kafka_offset IS NOT NULL"
		),
		$malformed,
		"$label: dead letters for the malformed messages only");
	ok( wait_for(
			$node,
			"SELECT count(*) = $partitions AND bool_and(lag = 0 AND stored_offset = high_watermark) FROM dwh.kafka_partitions"
		),
		"$label: no lag");
	check_consistent($node, $label);
	return;
}

# Both workers consume and share the partitions, each owned once.
sub wait_shared
{
	my ($label) = @_;
	ok( wait_for(
			$node, "SELECT count(DISTINCT worker) = 2
				AND count(p) = $partitions AND count(DISTINCT p) = $partitions
			FROM dwh.status, unnest(partitions) p
			WHERE worker LIKE 'kafka%' AND pid IS NOT NULL"),
		"$label: the two workers share the partitions, each owned once");
	return;
}

# The log lines of rebalances since a log offset.
sub rebalances_since
{
	my ($offset) = @_;
	my @found = slurp_file($node->logfile, $offset)
	  =~ /(Kafka consumer \d+ \(\w+ rebalance\): partitions \S+ \w+, owns \S+)/g;
	return @found;
}

# Wait until the log shows a rebalance line matching $pattern since a log
# offset.
sub wait_rebalance
{
	my ($offset, $pattern, $label) = @_;
	my $deadline = time() + $PostgreSQL::Test::Utils::timeout_default;
	my @found;
	while (time() < $deadline)
	{
		@found = grep { /$pattern/ } rebalances_since($offset);
		last if @found;
		usleep(200_000);
	}
	ok(scalar(@found) > 0, $label);
	note($_) foreach @found;
	return;
}

# The stream starts.
produce_next();
wait_shared('start');
check_exactly_once('start');

# Fetch errors mid-stream: not the leader (a metadata refresh, then the
# same broker again) and dropped connections.
produce_next();
mock_command($mock, 'broker-errors 1 Fetch NOT_LEADER_FOR_PARTITION 4');
mock_command($mock, 'broker-errors 2 Fetch _TRANSPORT 2');
wait_errors_hit(1, 'Fetch');
wait_errors_hit(2, 'Fetch');
check_exactly_once('after Fetch errors');

# The leaders of partitions 0 and 2 move from broker 1 to broker 2, and
# broker 1 goes down, before the next chunk is produced: what the workers
# apply of partitions 0 and 2 now can only come from broker 2.
my $p02 = "SELECT coalesce(sum(next_offset), 0) FROM dwh.kafka_offsets WHERE kafka_partition IN (0, 2)";
my $p02_before = $node->safe_psql('postgres', $p02);
mock_command($mock, 'leader 0 2');
mock_command($mock, 'leader 2 2');
mock_command($mock, 'down 1');
produce_next();
check_exactly_once('after the leader change, broker 1 down');
cmp_ok($node->safe_psql('postgres', $p02), '>', $p02_before,
	'partitions 0 and 2 were consumed from their new leader');
mock_command($mock, 'up 1');

# Every broker down, right after a chunk was produced, then up again: the
# workers say so in dwh.status, then consume again by themselves.
my $before_down = stored_total($node);
produce_next();
mock_command($mock, 'down -1');
ok( wait_for(
		$node, "SELECT bool_and(state = 'waiting for the broker' AND last_error IS NOT NULL)
			FROM dwh.status WHERE worker LIKE 'kafka%' AND pid IS NOT NULL"),
	'dwh.status shows both workers waiting for the broker');
note($node->safe_psql('postgres',
		"SELECT worker, state, last_error FROM dwh.status WHERE worker LIKE 'kafka%'"));
note('applied while the brokers were down (prefetched before): '
	  . (stored_total($node) - $before_down));
mock_command($mock, 'up -1');
check_exactly_once('after every broker was down');

# Every broker down again, with nothing left to consume, for longer than
# the session timeout (the workers' assignments are lost), then up: with
# no message to apply, the workers must still stop saying they wait.
mock_command($mock, 'down -1');
ok( wait_for(
		$node, "SELECT bool_and(state = 'waiting for the broker')
			FROM dwh.status WHERE worker LIKE 'kafka%' AND pid IS NOT NULL"),
	'idle workers: dwh.status shows both waiting for the broker');
sleep(8);
is( $node->safe_psql('postgres',
		"SELECT bool_and(state = 'waiting for the broker') FROM dwh.status WHERE worker LIKE 'kafka%' AND pid IS NOT NULL"),
	't', 'still waiting for the broker 8 s later');
mock_command($mock, 'up -1');
ok( wait_for(
		$node, "SELECT count(*) = 2 AND bool_and(state = 'consuming')
			FROM dwh.status WHERE worker LIKE 'kafka%' AND pid IS NOT NULL"),
	'both workers consuming again once the brokers are back (the last error stays shown, with its time)');
wait_shared('after every broker was down');

# The group coordinator moves from broker 3 to broker 1, and broker 3 goes
# down.  A Heartbeat error pushed on broker 1 can only be hit once the
# workers found the new coordinator; it forces a rebalance.
my $log_offset = -s $node->logfile;
produce_next();
mock_command($mock, 'coordinator dwh 1');
mock_command($mock, 'down 3');
mock_command($mock, 'broker-errors 1 Heartbeat REBALANCE_IN_PROGRESS 1');
wait_errors_hit(1, 'Heartbeat');
wait_rebalance($log_offset, qr/revoked/, 'the group rebalances on the new coordinator');
wait_shared('after the coordinator moved');
check_exactly_once('after the coordinator moved, broker 3 down');
mock_command($mock, 'up 3');

# Group requests fail: a Heartbeat that says the generation is stale (the
# assignment is lost, the group joined again), JoinGroup refused while the
# coordinator "loads", OffsetCommit errors (those commits are only for
# monitoring).
$log_offset = -s $node->logfile;
produce_next();
mock_command($mock, 'broker-errors 1 JoinGroup COORDINATOR_LOAD_IN_PROGRESS 2');
mock_command($mock, 'broker-errors 1 OffsetCommit COORDINATOR_LOAD_IN_PROGRESS 2');
mock_command($mock, 'broker-errors 1 Heartbeat ILLEGAL_GENERATION 1');
wait_errors_hit(1, 'Heartbeat');
wait_errors_hit(1, 'JoinGroup');
wait_errors_hit(1, 'OffsetCommit');
wait_rebalance($log_offset, qr/lost, owns none/, 'the assignment was lost');
wait_shared('after the group errors');
check_exactly_once('after the group errors');

# Every broker answers 500 ms late.
mock_command($mock, 'rtt -1 500');
my $start = time();
produce_next();
check_exactly_once('with 500 ms round trips');
note(sprintf('the chunk took %.1f s with 500 ms round trips', time() - $start));
mock_command($mock, 'rtt -1 0');

# The whole stream, exactly once.
is(scalar(@chunks), 0, 'every chunk was produced');
is($produced, $manifest->{messages}, 'the whole stream was produced');
is(scalar(keys %ids), $manifest->{object_ids}{count}, 'every order was produced');
is($malformed, $manifest->{malformed}, 'the malformed lines are the generator\'s');
check_manifest_counts($node, $manifest, 'after the faults');

$node->stop;
is(stop_mock_cluster($mock), 0, 'the mock cluster exits cleanly');
done_testing();
