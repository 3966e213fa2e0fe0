# A producer that writes in Kafka transactions, against a real broker:
# the workers read committed messages only.  Orders of an aborted
# transaction are never applied; those of a transaction still open are
# not applied until it commits, and nothing behind it on its partition
# either; every committed order is applied once.  The commit and abort
# markers take offsets of the log that carry no message: the stored
# offsets must still reach the end of the log, so that the lag is 0 once
# everything is applied, and a worker started again goes on from there
# (its check of the log by the last message's SHA-256 passes), and a
# cooperative rebalance that takes one partition away leaves the other's
# log end known.
# (test/kafka/txn_producer.c produces a file's lines as one transaction;
# kcat has no transactions.)

use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;

use DwhTest;
use IPC::Run;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep);

my $root = dwh_root();
my $tmp = $PostgreSQL::Test::Utils::tmp_check;
my $producer = "$tmp/txn_producer";
system($ENV{CC} // 'cc', '-O2', '-Wall', '-Wextra', '-Werror', '-o', $producer,
	"$root/test/kafka/txn_producer.c", '-lrdkafka') == 0
  or die 'could not build test/kafka/txn_producer.c';

my $broker = start_broker(partitions => 2);
my $node = new_dwh_node(
	'kafka_txn',
	'dwh.kafka_consumers' => 1,
	'dwh.kafka_brokers' => $broker->{bootstrap});

# One order a message: the four transactions' orders are their lines.
generate_orders("$tmp/txn.txt", '--count 400 --seed 55 --clean');
my @lines = split /\n/, slurp_file("$tmp/txn.txt");
my %part;
@{ $part{committed} } = @lines[ 0 .. 99 ];
@{ $part{aborted} } = @lines[ 100 .. 199 ];
@{ $part{later} } = @lines[ 200 .. 299 ];
@{ $part{held} } = @lines[ 300 .. 399 ];
foreach my $name (keys %part)
{
	open(my $fh, '>', "$tmp/txn_$name.txt") or die $!;
	print $fh map { "$_\n" } @{ $part{$name} };
	close($fh);
}

sub ids_of
{
	my ($name) = @_;
	return '{' . join(',', map { /"object_id": ?(\d+)/ ? $1 : die "no object_id in $_" } @{ $part{$name} }) . '}';
}

sub applied_of
{
	my ($name) = @_;
	return $node->safe_psql('postgres',
		"SELECT count(*) FROM stg.order_events WHERE object_id = ANY ('@{[ ids_of($name) ]}'::bigint[])");
}

sub run_producer
{
	my ($name, $how, @partition) = @_;
	my ($out, $err) = ('', '');
	IPC::Run::run([ $producer, $broker->{bootstrap}, $broker->{topic}, "$tmp/txn_$name.txt", $how, @partition ],
		'<', \undef, '>', \$out, '2>', \$err)
	  or die "txn_producer $name $how failed: $err";
	return;
}

run_producer('committed', 'commit');
run_producer('aborted', 'abort');
run_producer('later', 'commit');
ok(wait_for($node, 'SELECT count(*) = 200 FROM stg.order_events'),
	'the orders of both committed transactions are applied');
is(applied_of('committed') . ' ' . applied_of('later'), '100 100', 'each of them');
is(applied_of('aborted'), '0', 'none of the aborted transaction');

# The logs hold 300 messages and a marker after each transaction's
# messages on each partition; the stored offsets reach their ends: lag 0.
ok( wait_for(
		$node, q{SELECT count(*) = 2 AND bool_and(lag = 0)
		         AND sum(high_watermark) = 306 FROM dwh.kafka_partitions}),
	'the stored offsets reach the end of the log, past the markers: lag 0')
  or diag($node->safe_psql('postgres', 'SELECT * FROM dwh.kafka_partitions'));

# An open transaction: its orders are not applied, nor those committed
# behind it on its partitions, until it commits.
my ($in, $out, $err) = ('', '', '');
my $held = IPC::Run::start(
	[ $producer, $broker->{bootstrap}, $broker->{topic}, "$tmp/txn_held.txt", 'hold' ],
	'<', \$in, '>', \$out, '2>', \$err,
	IPC::Run::timeout($PostgreSQL::Test::Utils::timeout_default));
$held->pump until $out =~ /^held$/m;
generate_orders("$tmp/txn_behind.txt", '--count 10 --seed 56 --clean --first-id 9000000');
produce($broker, "$tmp/txn_behind.txt");
ok( wait_for(
		$node, q{SELECT count(*) = 2 AND bool_and(high_watermark > stored_offset)
		         FROM dwh.kafka_partitions}),
	'the broker holds the open transaction and the orders behind it');
sleep(2);
is(applied_of('held'), '0', 'nothing of an open transaction is applied');
is($node->safe_psql('postgres', 'SELECT count(*) FROM stg.order_events WHERE object_id >= 9000000'),
	'0', 'nor what was committed behind it');
$in .= "commit\n";
$held->finish or die "txn_producer hold failed: $err";
ok(wait_for($node, 'SELECT count(*) = 310 FROM stg.order_events'),
	'once it commits, its orders and those behind it are applied');
is(applied_of('held'), '100', 'each of its orders');
ok( wait_for(
		$node, q{SELECT count(*) = 2 AND bool_and(lag = 0)
		         AND sum(high_watermark) = 418 FROM dwh.kafka_partitions}),
	'and the lag is 0 again')
  or diag($node->safe_psql('postgres', 'SELECT * FROM dwh.kafka_partitions'));
# The hash of the last message applied stays with the offset past the
# markers: a start checks the log by it (src/dwh_kafka_verify.c).
is($node->safe_psql('postgres', 'SELECT count(last_sha256) FROM dwh.kafka_offsets'),
	'2', 'each partition keeps the SHA-256 of its last message applied');

# A worker started again goes on from the stored offsets: nothing applied
# twice, no gap recorded.
$node->restart;
ok(wait_for($node, q{SELECT bool_and(lag = 0) AND count(*) = 2 FROM dwh.kafka_partitions}),
	'after a restart the lag is 0');
is( $node->safe_psql('postgres',
		q{SELECT sum(messages), (SELECT count(*) FROM dwh.kafka_gaps),
		         (SELECT count(*) FROM dwh.dead_letters) FROM dwh.status}),
	'0|0|0', 'nothing applied again, no gap, no dead letter');
is($node->safe_psql('postgres', 'SELECT count(*) FROM dwh.verify()'),
	'0', 'dwh.verify() is empty');

# A cooperative rebalance takes one partition away and leaves the other
# where it was: the end of the kept partition's log, past the last marker,
# must not be forgotten.  The worker takes a transaction's messages and
# reaches the logs' ends, then waits for stg.order_events (a session holds
# it) while a second node joins the group and the revocation of one
# partition queues up behind the batch.  The batch commits after the last
# message; the kept partition's stored offset must still reach its log end.
# (Heartbeats every 500 ms: the first node's consumer hears of the
# rebalance within a second, not three.)
my $coop = 'partition.assignment.strategy=cooperative-sticky heartbeat.interval.ms=500';
my $coop_offset = -s $node->logfile;
$node->safe_psql('postgres',
	"ALTER SYSTEM SET dwh.kafka_options = '$coop'; SELECT pg_reload_conf()");
# The log first: the old consumer's partitions would satisfy the query
# until the worker has read the reload.
ok( $node->wait_for_log(
		qr/Kafka consumer 1 \(cooperative rebalance\): partitions 0,1 assigned/,
		$coop_offset),
	'the worker takes both partitions with the cooperative protocol, and says so');
ok( wait_for(
		$node, q{SELECT count(*) = 2 AND bool_and(lag = 0 AND worker IS NOT NULL)
		         FROM dwh.kafka_partitions}),
	'it owns both partitions again');
$node->append_conf('postgresql.conf', "log_min_messages = debug1\n");
$node->reload;
my $worker_pid = $node->safe_psql('postgres', q{SELECT pid FROM dwh.status WHERE worker = 'kafka 1'});
my $holder = $node->background_psql('postgres');
$holder->query_safe('BEGIN; LOCK TABLE stg.order_events IN SHARE MODE;');
generate_orders("$tmp/txn_tail.txt", '--count 20 --seed 57 --clean --first-id 9100000');
run_producer('tail', 'commit');
ok( wait_for(
		$node, "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $worker_pid"),
	'the worker waits for the table with the transaction\'s messages');
my $node_b = new_dwh_node(
	'kafka_txn_b',
	'dwh.kafka_consumers' => 1,
	'dwh.kafka_brokers' => $broker->{bootstrap},
	'dwh.kafka_options' => $coop);
# The broker's view of the group: once no member holds both partitions,
# the first node's consumer has its new assignment, and the revocation is
# in its queue.
my ($members, @held) = ('');
my $deadline = time() + $PostgreSQL::Test::Utils::timeout_default;
while (time() < $deadline)
{
	$members = broker_command('tool',
		'org.apache.kafka.tools.consumer.group.ConsumerGroupCommand',
		'--bootstrap-server', $broker->{bootstrap}, '--describe', '--group', 'dwh',
		'--members');
	# The last column: how many partitions the member holds.
	@held = $members =~ /^\S+\s+\S+\s+\S+\s+\S+\s+\S+\s+(\d+)\s*$/mg;
	last if @held == 2 && !grep({ $_ == 2 } @held);
	sleep(1);
}
ok(@held == 2 && !grep({ $_ == 2 } @held),
	'a second node joins the group: no member holds both partitions')
  or diag($members);
sleep(1);
my $log_offset = -s $node->logfile;
$holder->query_safe('ROLLBACK;');
$holder->quit;
ok( wait_for(
		$node, q{SELECT count(*) = 1 FROM dwh.status, unnest(partitions) WHERE worker = 'kafka 1'}),
	'the first node gives up one partition');
ok( wait_for(
		$node, q{SELECT lag = 0 AND stored_offset = high_watermark
		         FROM dwh.kafka_partitions WHERE worker = 'kafka 1'}),
	'the kept partition\'s stored offset reaches its log end: lag 0')
  or diag($node->safe_psql('postgres', 'SELECT * FROM dwh.kafka_partitions'));
my $after = slurp_file($node->logfile, $log_offset);
like($after,
	qr/Kafka consumer 1 \(cooperative rebalance\): partitions ([01]) revoked, owns (?!\1)[01]\b.*\n(?:.*\n)*.*Kafka partition (?!\1)[01]: stored offset moved to the end of its log/,
	'it kept the other, without starting it again, and moved its offset after the revocation');
my $tail_ids = "SELECT string_agg(object_id::text, ',' ORDER BY object_id) FROM stg.order_events WHERE object_id >= 9100000";
ok( wait_for($node_b, 'SELECT count(*) > 0 FROM stg.order_events WHERE object_id >= 9100000'),
	'the second node applies the partition it took');
my %tail = map { $_ => 1 } grep { length } map { split /,/, $_->safe_psql('postgres', $tail_ids) } ($node, $node_b);
is(scalar(keys %tail), 20, 'each order of the transaction is applied by one node or the other');
is($node->safe_psql('postgres', 'SELECT count(*) FROM dwh.verify()'),
	'0', 'dwh.verify() is empty');
$node_b->stop;

# The topic recreated while the workers hold off, and written again in
# transactions.  Each old log ends with a commit marker after the message
# applied last, at L: the stored offset N is L + 2.  Each new log holds
# another message at L and a marker at L + 1 = N - 1, and goes on past N.
# The worker must start at L, find another message there, and read the
# new logs from their starts: a gap per partition, every new order applied.
# (Before: it started at N - 1, where a consumer reading committed messages
# sees nothing, took the skip for compaction, and applied only what lay
# past N; the new logs' first messages were lost, with no gap.)
ok( wait_for(
		$node, q{SELECT count(*) = 2 AND bool_and(lag = 0 AND worker IS NOT NULL)
		         FROM dwh.kafka_partitions}),
	'the first node owns both partitions again, lag 0');
my %last = split /[|\n]/, $node->safe_psql('postgres',
	q{SELECT kafka_partition, last_offset FROM dwh.kafka_offsets
	  WHERE next_offset = last_offset + 2 ORDER BY 1});
is(join(',', sort keys %last), '0,1',
	'each partition stores the offset of the message applied last, a marker after it');
ok(set_and_reload($node, 'dwh.kafka_brokers', ''), 'the workers are told no broker');
ok( wait_for(
		$node, "SELECT state LIKE 'idle%' FROM dwh.status WHERE worker = 'kafka 1'"),
	'the worker holds off');
broker_command('tool', 'org.apache.kafka.tools.TopicCommand',
	'--bootstrap-server', $broker->{bootstrap}, '--delete', '--topic', $broker->{topic});
my $created = 0;
foreach my $try (1 .. 60)
{
	# The deletion completes in the background.
	last if $created = eval { broker_command('create-topic', $broker->{dir}, $broker->{topic}, 2); 1 };
	usleep(500_000);
}
ok($created, 'the topic is deleted and created again');
# Per partition: a transaction of L - 1 orders (offsets 0 to L - 2, its
# marker at L - 1), then two of one order each (L and L + 2).
my $new_count = $last{0} + $last{1} + 2;
generate_orders("$tmp/txn_new.txt", "--count $new_count --seed 58 --clean --first-id 9200000");
my @new = split /\n/, slurp_file("$tmp/txn_new.txt");
foreach my $p (0, 1)
{
	my @mine = splice(@new, 0, $last{$p} + 1);
	my %files = (first => [ @mine[ 0 .. $#mine - 2 ] ], second => [ $mine[-2] ], third => [ $mine[-1] ]);
	foreach my $name ('first', 'second', 'third')
	{
		open(my $fh, '>', "$tmp/txn_new_$name.txt") or die $!;
		print $fh map { "$_\n" } @{ $files{$name} };
		close($fh);
		run_producer("new_$name", 'commit', $p);
	}
}
my $gaps_before = $node->safe_psql('postgres', 'SELECT coalesce(max(id), 0) FROM dwh.kafka_gaps');
$log_offset = -s $node->logfile;
ok(set_and_reload($node, 'dwh.kafka_brokers', $broker->{bootstrap}), 'the workers are given the broker again');
ok( wait_for(
		$node, "SELECT count(*) = $new_count FROM stg.order_events WHERE object_id >= 9200000"),
	"every order of the new logs is applied ($new_count)")
  or diag($node->safe_psql('postgres', 'SELECT * FROM dwh.kafka_partitions'));
is( $node->safe_psql('postgres',
		"SELECT string_agg(format('%s: %s %s %s', kafka_partition, next_offset, log_start_offset, action), ', '
		                   ORDER BY kafka_partition)
		 FROM dwh.kafka_gaps WHERE id > $gaps_before"),
	sprintf('0: %d 0 skipped, 1: %d 0 skipped', $last{0} + 2, $last{1} + 2),
	'a gap per partition, from the stored offset back to the new log\'s start');
my @named = slurp_file($node->logfile, $log_offset)
  =~ /DETAIL:  The broker holds another message at offset (\d+) than the one applied there: the topic was recreated\./g;
is( join(',', sort { $a <=> $b } @named),
	join(',', sort { $a <=> $b } values %last),
	'a WARNING per partition names the offset of the message applied last');
ok( wait_for(
		$node, q{SELECT count(*) = 2 AND bool_and(lag = 0) FROM dwh.kafka_partitions}),
	'the lag is 0 on the new logs');
is($node->safe_psql('postgres', 'SELECT count(*) FROM dwh.verify()'),
	'0', 'dwh.verify() is empty');

# An aborted transaction after the logs' ends were reached: its messages
# and markers end the logs, past the stored offsets that an earlier move
# took past a commit marker.  They move to the new ends (before: only an
# offset still right after the last message delivered moved, so the lag
# stayed at 2 a partition until a committed message came).
my $ends = $node->safe_psql('postgres', 'SELECT sum(high_watermark) FROM dwh.kafka_partitions');
open(my $fh, '>', "$tmp/txn_trailing.txt") or die $!;
print $fh map { "$_\n" } @lines[ 0 .. 1 ];
close($fh);
run_producer('trailing', 'abort');
ok( wait_for(
		$node, "SELECT count(*) = 2 AND bool_and(lag = 0) AND sum(high_watermark) = $ends + 4
		        FROM dwh.kafka_partitions"),
	'an aborted transaction at the end of the logs: the lag is 0 again')
  or diag($node->safe_psql('postgres', 'SELECT * FROM dwh.kafka_partitions'));

$node->stop;
broker_command('stop', $broker->{dir});
done_testing();
