# The cooperative rebalance protocol against a real broker: three workers on
# a topic of six partitions with partition.assignment.strategy =
# cooperative-sticky in dwh.kafka_options, while orders stream and the
# group changes under them:
#  - a worker stopped with SIGTERM and restarted by the postmaster: static
#    membership (group.instance.id) gives it its partitions back, the other
#    workers lose none;
#  - a second PostgreSQL node joins the group with three workers of its
#    own: node A's workers give up only the partitions node B takes
#    (incremental unassign: they keep consuming the rest);
#  - node B stops: once its members' sessions expire, their partitions are
#    added to node A's workers (incremental assign: they keep what they
#    had), which resume them from node A's own stored offsets.
# A node restart would not do: restarted consumers own nothing, so a
# cooperative rebalance has nothing to revoke.
#
# librdkafka 2.0.2 (since 1.6.0, fixed upstream by confluentinc/librdkafka
# PR #4908 for issue #4059) declares a consumer's whole assignment lost when
# an offset commit sent during a rebalance fails with ILLEGAL_GENERATION,
# and dwh commits after each batch (for monitoring only): so a worker may
# also log "partitions ... lost, owns none" during these rebalances and get
# its partitions back in the next one.  Nothing is applied twice or lost
# for it (the offsets that count are in the database), and the checks
# below only need some worker to give up part of its partitions.
# The broker itself reports the group's assignment strategy.  At every step
# no partition is owned twice; at the end every produced order is in STG
# once, the marts equal the generator's counts and dwh.verify() is empty.

use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;

use DwhTest;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep);

my $partitions = 6;
my $broker = start_broker(partitions => $partitions);
my $node = new_dwh_node(
	'kafka_coop',
	'dwh.kafka_consumers' => 3,
	'dwh.kafka_brokers' => $broker->{bootstrap},
	'dwh.kafka_options' => 'partition.assignment.strategy=cooperative-sticky',
	'dwh.kafka_batch_size' => 500,
	'dwh.kafka_batch_wait' => '50ms');
load_dictionaries($node);
my $tmp = $PostgreSQL::Test::Utils::tmp_check;

generate_orders("$tmp/coop.txt", '--count 40000 --seed 31 --malformed 0.002',
	'--duplicates 0.03 --status-changes 0.03 --out-of-order 0.02 --reversals 0.02',
	"--manifest $tmp/coop.json");
my $manifest = read_manifest("$tmp/coop.json");
my @chunks = split_stream("$tmp/coop.txt", $manifest, 4);
my $produced = 0;

# Produce the next chunk of the stream.
sub produce_next
{
	my $chunk = shift @chunks;
	produce($broker, $chunk->{file});
	$produced += $chunk->{messages};
	return;
}

# Partitions owned by each running Kafka worker, from dwh.status:
# "kafka 1:0,1|kafka 2:2,3|...".
sub owners
{
	my ($on) = @_;
	$on //= $node;
	return $on->safe_psql('postgres',
		"SELECT string_agg(worker || ':' || array_to_string(partitions, ','), '|' ORDER BY worker)
		 FROM dwh.status WHERE worker LIKE 'kafka%' AND pid IS NOT NULL");
}

# Wait until $n workers of a node consume and own $n_parts partitions
# between them, each once.
sub wait_owned
{
	my ($on, $n, $n_parts, $label) = @_;
	ok( wait_for(
			$on, "SELECT count(DISTINCT worker) = $n
				AND count(p) = $n_parts AND count(DISTINCT p) = $n_parts
			FROM dwh.status, unnest(partitions) p
			WHERE worker LIKE 'kafka%' AND pid IS NOT NULL"),
		"$label: $n workers own $n_parts partitions, each once");
	note("$label: " . owners($on));
	return;
}

sub wait_split
{
	my ($n, $label) = @_;
	wait_owned($node, $n, $partitions, $label);
	return;
}

# The log lines of cooperative rebalances since a log offset, as
# [worker, partitions, what, owned] lists.
sub rebalances_since
{
	my ($offset) = @_;
	my $log = slurp_file($node->logfile, $offset);
	my @found;
	while ($log =~
		/Kafka consumer (\d+) \((\w+) rebalance\): partitions (\S+) (assigned|revoked|lost), owns (\S+)/g)
	{
		push @found, { worker => $1, protocol => $2, parts => $3, what => $4, owns => $5 };
	}
	return @found;
}

# The stream starts; the three workers join the group.
my $log_offset = 0;
produce_next();
wait_split(3, 'start');
ok(wait_applied($node, $produced), 'first part of the stream applied');
my @events = rebalances_since($log_offset);
ok(scalar(@events) >= 3, 'the rebalances are logged');
is(scalar(grep { $_->{protocol} ne 'cooperative' } @events),
	0, 'every rebalance is served with the cooperative protocol');
ok(!$node->log_contains(qr/could not (assign|add|give up) partitions|must be made using/),
	'librdkafka accepted every incremental assignment');

# The broker's view of the group: the cooperative-sticky assignor chosen.
my $group = broker_command('tool',
	'org.apache.kafka.tools.consumer.group.ConsumerGroupCommand',
	'--bootstrap-server', $broker->{bootstrap}, '--describe', '--group', 'dwh', '--state');
like($group, qr/\bcooperative-sticky\b/, 'the broker reports the cooperative-sticky assignor');
note($group);

# SIGTERM worker 2 in the middle of the stream: the postmaster restarts it
# after 5 s, within the 10 s session, so static membership hands it its
# partitions back without a rebalance of the others.
produce_next();
ok(wait_for($node, "SELECT coalesce(sum(next_offset), 0) > $produced - 5000 FROM dwh.kafka_offsets"),
	'second part of the stream being applied');
my $before = owners();
my %owned_before = map { split /:/ } split /\|/, $before;
my $victim = $node->safe_psql('postgres', "SELECT pid FROM dwh.status WHERE worker = 'kafka 2'");
$log_offset = -s $node->logfile;
$node->safe_psql('postgres', "SELECT pg_terminate_backend($victim)");
ok( wait_for(
		$node, "SELECT pid <> $victim AND cardinality(partitions) > 0
			FROM dwh.status WHERE worker = 'kafka 2'"),
	'worker 2 restarted and owns partitions again');
wait_split(3, 'after SIGTERM');
my %owned_after = map { split /:/ } split /\|/, owners();
is_deeply(\%owned_after, \%owned_before,
	'static membership: every worker owns the same partitions as before');
is( scalar(grep { $_->{worker} != 2 } rebalances_since($log_offset)),
	0, 'the other workers were not rebalanced');
ok(wait_applied($node, $produced), 'second part applied');
check_consistent($node, 'after the SIGTERM');

# A second PostgreSQL node joins the group with three workers of its own
# (its own system identifier, so its own static members), as when the
# stream is split across machines.  The six partitions are spread over six
# members: node A's workers each give up a partition and keep consuming the
# rest.  Node B applies what it owns into its own database.
$log_offset = -s $node->logfile;
my $node_b = new_dwh_node(
	'kafka_coop_b',
	'dwh.kafka_consumers' => 3,
	'dwh.kafka_brokers' => $broker->{bootstrap},
	'dwh.kafka_options' => 'partition.assignment.strategy=cooperative-sticky',
	'dwh.kafka_batch_size' => 500,
	'dwh.kafka_batch_wait' => '50ms');
load_dictionaries($node_b);
produce_next();
wait_owned($node, 3, 3, 'node A with node B in the group');
wait_owned($node_b, 3, 3, 'node B');
# Each node's view is read at its own moment, and the group may still be
# settling (a member's commit refused with an old generation starts
# another round): wait until the two views together cover every partition
# once.
my $owned_sql =
  "SELECT string_agg(p::text, ',' ORDER BY p) FROM dwh.status, unnest(partitions) p WHERE worker LIKE 'kafka%'";
my $across = '';
my $settle_deadline = time() + $PostgreSQL::Test::Utils::timeout_default;
while (time() < $settle_deadline)
{
	my $owned_by_a = $node->safe_psql('postgres', $owned_sql);
	my $owned_by_b = $node_b->safe_psql('postgres', $owned_sql);
	$across = join(',', sort { $a <=> $b } split(/,/, "$owned_by_a,$owned_by_b"));
	last if $across eq join(',', 0 .. $partitions - 1);
	usleep(200_000);
}
is($across, join(',', 0 .. $partitions - 1),
	'across both nodes every partition is owned once');
my @revoked = grep { $_->{what} eq 'revoked' && $_->{owns} ne 'none' }
  rebalances_since($log_offset);
ok(scalar(@revoked) >= 1,
	'incremental unassign: a worker of node A gives up a partition and keeps the rest');
note("node A worker $_->{worker}: $_->{parts} revoked, owns $_->{owns}") foreach @revoked;
ok(wait_for($node_b, 'SELECT coalesce(sum(next_offset), 0) > 0 FROM dwh.kafka_offsets'),
	'node B applies the partitions it owns');
check_consistent($node_b, 'node B');

# Node B stops.  Its static members stay in the group until their sessions
# expire; then their partitions are added to node A's workers, which keep
# theirs, and resume from node A's own stored offsets.
produce_next();
$log_offset = -s $node->logfile;
$node_b->stop;
wait_split(3, 'node A alone again');
my @added = grep { $_->{what} eq 'assigned' && $_->{parts} ne 'none' && $_->{owns} ne $_->{parts} }
  rebalances_since($log_offset);
ok(scalar(@added) >= 1, 'incremental assign: partitions added to those a worker keeps');
note("node A worker $_->{worker}: $_->{parts} added, owns $_->{owns}") foreach @added;
is(scalar(grep { $_->{protocol} ne 'cooperative' } rebalances_since(0)),
	0, 'still the cooperative protocol only');
ok(!$node->log_contains(qr/could not (assign|add|give up) partitions|must be made using/),
	'librdkafka accepted every incremental assignment and unassignment');

# Exactly once over the whole stream.
ok(wait_applied($node, $manifest->{messages}), 'every message applied');
is($produced, $manifest->{messages}, 'the whole stream was produced');
is($node->safe_psql('postgres', 'SELECT count(*) FROM stg.order_events'),
	$manifest->{object_ids}{count}, 'every produced order in STG once');
is( $node->safe_psql('postgres',
		"SELECT count(*) FROM dwh.dead_letters WHERE source = 'kafka'"),
	$manifest->{malformed}, 'each malformed message dead-lettered once');
check_consistent($node, 'after the rebalances');
check_manifest_counts($node, $manifest, 'after the rebalances');
ok( wait_for(
		$node,
		"SELECT count(*) = $partitions AND bool_and(lag = 0 AND stored_offset = high_watermark) FROM dwh.kafka_partitions"
	),
	'no lag on any partition');

$node->stop;
broker_command('stop', $broker->{dir});
done_testing();
