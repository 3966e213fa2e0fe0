# SIGTERM while a Kafka worker asks a partition's leader for its first
# and last offsets at a gap (README, "Kafka consumers": a worker stops
# within half a second).  The worker asks when the failed fetch did not
# bring them: here the log it resumes in is not the one its stored offset
# was read from (the stored hash of the last message applied is another
# one's, as after a recreated topic), and the mock broker answers the
# question 3 s late.  The question used to run in the worker's own thread,
# inside librdkafka, where no signal reaches it.  After the restart the
# worker records the gap and reads the log from its start: every order
# once, dwh.verify() empty.  Then a partition stopped at a gap shows the
# watermarks of its log as it grows.

use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;

use DwhTest;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);

my $mock = start_mock_cluster(brokers => 1, partitions => 1);
my $node = new_dwh_node(
	'kafka_gap_sigterm',
	'dwh.kafka_consumers' => 1,
	'dwh.kafka_brokers' => $mock->{bootstrap});
load_dictionaries($node);
my $tmp = $PostgreSQL::Test::Utils::tmp_check;

generate_orders("$tmp/gap.txt", '--count 10 --seed 53 --clean');
produce($mock, "$tmp/gap.txt");
ok(wait_applied($node, 10), 'ten orders applied');

# The worker holds off; the stored hash of the last message applied is
# made another one's.
ok(set_and_reload($node, 'dwh.kafka_brokers', ''), 'the worker is told no broker');
ok( wait_for(
		$node, "SELECT state LIKE 'idle%' FROM dwh.status WHERE worker = 'kafka 1'"),
	'the worker holds off');
$node->safe_psql('postgres',
	q{UPDATE dwh.kafka_offsets SET last_sha256 = sha256('another message') WHERE kafka_partition = 0});

# The next ListOffsets request is answered 3 s late.
mock_command($mock, 'broker-errors 1 ListOffsets REQUEST_TIMED_OUT 1 3000');
my $offset = -s $node->logfile;
ok(set_and_reload($node, 'dwh.kafka_brokers', $mock->{bootstrap}), 'the worker is given the broker');
my $asking = 0;
my $deadline = time() + $PostgreSQL::Test::Utils::timeout_default;
until ($asking || time() > $deadline)
{
	$asking = mock_command($mock, 'error-count 1 ListOffsets') == 0;
	usleep(20_000) unless $asking;
}
ok($asking, 'the worker asks the leader for the watermarks');
my $pid = $node->safe_psql('postgres', "SELECT pid FROM dwh.status WHERE worker = 'kafka 1'");
my $start = time();
$node->safe_psql('postgres', "SELECT pg_terminate_backend($pid)");
ok(wait_for($node, "SELECT NOT EXISTS (SELECT FROM pg_stat_activity WHERE pid = $pid)", 10),
	'SIGTERM: the worker stops');
my $took = time() - $start;
cmp_ok($took, '<', 1, "within a second, not when the answer comes ($took s)");

# Started again, it asks again (answered at once), records the gap and
# reads the log from its start.
ok( wait_for(
		$node, "SELECT count(*) = 1 FROM dwh.kafka_gaps WHERE kafka_partition = 0 AND next_offset = 10"),
	'the restarted worker records the gap');
ok(wait_applied($node, 10), 'and goes on from the log start');
is($node->safe_psql('postgres', 'SELECT count(*) FROM stg.order_events'), '10',
	'every order once');
check_consistent($node, 'after the gap');
unlike(slurp_file($node->logfile, $offset), qr/terminated by signal|PANIC/, 'no crash');

# A partition stopped at a gap (dwh.kafka_on_gap = stop; here its stored
# offset moved past the log's end while the worker held off) is fetched no
# more, and librdkafka refreshes none of its watermarks: the worker asks
# its leader for them every 5 s, so dwh.kafka_partitions shows what the
# broker holds past the gap (before: the watermarks of before the stop,
# for good, and a lag that never grew).
ok(set_and_reload($node, 'dwh.kafka_brokers', ''), 'the worker is told no broker again');
ok( wait_for(
		$node, "SELECT state LIKE 'idle%' FROM dwh.status WHERE worker = 'kafka 1'"),
	'the worker holds off again');
$node->safe_psql('postgres',
	q{ALTER SYSTEM SET dwh.kafka_on_gap = 'stop';
	  UPDATE dwh.kafka_offsets SET next_offset = 100, last_sha256 = NULL, last_offset = NULL
	  WHERE kafka_partition = 0});
ok(set_and_reload($node, 'dwh.kafka_brokers', $mock->{bootstrap}), 'the worker is given the broker again');
ok( wait_for(
		$node, q{SELECT stopped AND high_watermark = 10 FROM dwh.kafka_partitions
		         WHERE kafka_partition = 0}),
	'the partition stops at the gap, its log ending at 10');
generate_orders("$tmp/past.txt", '--count 5 --seed 54 --clean --first-id 5000000');
produce($mock, "$tmp/past.txt");
ok( wait_for(
		$node, q{SELECT stopped AND high_watermark = 15 FROM dwh.kafka_partitions
		         WHERE kafka_partition = 0}, 30),
	'stopped, it shows the log grown to 15');
is($node->safe_psql('postgres', 'SELECT count(*) FROM stg.order_events'), '10',
	'and applies none of it');

$node->stop;
stop_mock_cluster($mock);
done_testing();
