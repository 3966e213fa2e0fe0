# The bound on keeping an order for the next batch (src/dwh_kafka_worker.c,
# MAX_CARRY_ROUNDS and CARRY_RETRY_MS).  A Kafka worker leaves out of its
# batch the orders another worker is applying (src/dwh_inflight.c) and tries
# them again 5 ms later; after ten batches in a row that left them, it
# applies them and waits for the other worker's commit like any writer.
# Here the other worker cannot commit (a session holds the order's row in
# stg.order_events): the worker keeps the order exactly ten times, at least
# 5 ms apart, then waits on the row lock instead of trying again forever.
# Once the lock goes, both versions are applied and the newer one wins.

use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;

use DwhTest;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep);

my $rounds = 10;	# MAX_CARRY_ROUNDS
my $retry_ms = 5;	# CARRY_RETRY_MS

my $mock = start_mock_cluster(brokers => 1, partitions => 2);
my $node = new_dwh_node(
	'kafka_carry_bound',
	'dwh.kafka_consumers' => 2,
	'dwh.kafka_brokers' => $mock->{bootstrap});
$node->append_conf('postgresql.conf', "log_min_messages = debug1\n");
$node->reload;
load_dictionaries($node);
my $tmp = $PostgreSQL::Test::Utils::tmp_check;

sub psql { return $node->safe_psql('postgres', shift); }

# One version of order 7000001, sent at $sent with status $status.
sub version_file
{
	my ($name, $sent, $status) = @_;
	my $file = "$tmp/$name.txt";
	unlink $file;
	append_to_file($file,
		qq({"object_id": 7000001, "object_type": "order", "sent_dttm": "$sent", )
		  . qq("payload": {"restaurant": {"id": "r-carry"}, "date": "2023-06-01 12:00:00", )
		  . qq("user": {"id": "u-carry"}, "order_items": [{"id": "d-carry", "name": "Pie", )
		  . qq("price": 100, "quantity": 1}], "bonus_payment": 0, "cost": 100, "payment": 100, )
		  . qq("bonus_grant": 0, "statuses": [], "final_status": "$status", "update_ts": "$sent"}}\n));
	return $file;
}

# Each worker owns one partition.
ok( wait_for(
		$node,
		q{SELECT count(*) = 2 AND bool_and(cardinality(partitions) = 1)
		  FROM dwh.status WHERE worker LIKE 'kafka %'}),
	'each Kafka worker owns one partition');
my %owner = split /[|\n]/, psql(
	q{SELECT partitions[1] || '|' || worker FROM dwh.status WHERE worker LIKE 'kafka %'});
my %pid = map { $_ => psql("SELECT pid FROM dwh.status WHERE worker = '$owner{$_}'") } (0, 1);

produce($mock, version_file('v1', '2023-06-01 12:00:00', 'OPEN'), undef, 0);
ok(wait_applied($node, 1), 'the first version applied');

# A session holds the order's row: the worker owning partition 0 marks the
# order and waits there with its second version.
my $holder = $node->background_psql('postgres');
$holder->query_safe(
	'BEGIN; SELECT object_id FROM stg.order_events WHERE object_id = 7000001 FOR UPDATE;');
produce($mock, version_file('v2', '2023-06-01 12:10:00', 'CLOSED'), undef, 0);
my $waits_on_lock = sub {
	my $pid = shift;
	return "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $pid";
};
ok(wait_for($node, $waits_on_lock->($pid{0})), "$owner{0} waits on the order's row");

# The third version reaches the other worker, which keeps it while the
# order is marked, then applies it and waits too.
my $offset = -s $node->logfile;
produce($mock, version_file('v3', '2023-06-01 12:20:00', 'CANCELLED'), undef, 1);
ok(wait_for($node, $waits_on_lock->($pid{1})),
	"$owner{1} applies the order after keeping it, and waits on its row");
my $kept_lines = sub {
	my @times;
	my $keeper = $pid{1};
	foreach (split /\n/, slurp_file($node->logfile, $offset))
	{
		push @times, $1 * 3600_000 + $2 * 60_000 + $3 * 1000
		  if /^\S+ (\d+):(\d+):(\d+\.\d+) \S+ \[$keeper\] .*1 messages of orders another worker is applying kept for the next batch/;
	}
	return @times;
};
my @kept = $kept_lines->();
is(scalar(@kept), $rounds, "$owner{1} kept the order for $rounds batches in a row");
my $span = @kept ? $kept[-1] - $kept[0] : 0;
cmp_ok($span, '>=', ($rounds - 1) * $retry_ms - 1,
	"the batches that kept it were at least ${retry_ms} ms apart (the ten in $span ms)");
usleep(500_000);
is(scalar(my @again = $kept_lines->()), $rounds, 'and keeps it no more while it waits');
is(psql("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND pid IN ($pid{0}, $pid{1})"),
	'2', 'both workers wait, neither spins');

# The lock goes: both versions are applied, the newest is current.
$holder->query_safe('ROLLBACK;');
$holder->quit;
ok(wait_applied($node, 3), 'the three versions applied');
is(psql(q{SELECT payload->>'final_status' FROM stg.order_events WHERE object_id = 7000001}),
	'CANCELLED', 'the newest version is the current one');
is(psql(q{SELECT count(*) FROM dwh.dead_letters}), '0', 'no dead letter');
check_consistent($node, 'after the wait');

$node->stop;
stop_mock_cluster($mock);
done_testing();
