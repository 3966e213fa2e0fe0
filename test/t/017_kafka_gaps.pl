# A gap is never silent: when the broker no longer holds a partition's
# stored offset (here DeleteRecords moves the log start past it while the
# workers hold off, as retention would), the worker records the gap in
# dwh.kafka_gaps with the exact range it can no longer read, logs a WARNING
# and shows it in dwh.status and dwh.kafka_partitions.  With
# dwh.kafka_on_gap = skip it goes on from the first offset the broker holds;
# with stop it consumes nothing more from that partition (the others go on),
# across a server restart and without recording the gap twice, until
# dwh.kafka_seek() moves it.  The same once more with the cooperative-sticky
# rebalance protocol, where a partition is started again incrementally,
# with a recreated topic, whose log ends before the stored offsets, and
# with one whose new log reaches past them: the worker checks that the
# message before the stored offset is the one it applied.  With nothing to
# compare (the records deleted up to the stored offset, or after
# dwh.kafka_seek()) it goes on, recording no gap.  A worker killed while it
# waits to record a gap (skip) records it once after the restart; a seek
# committed while it waits wins: no gap is recorded.  Last, a recreated
# topic whose log ends exactly at the message before the stored offset (the
# one the worker checks): a gap too, found from the log's end.

use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;

use DwhTest;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep);

my $topic = 'order-service_orders';
my $broker = start_broker(topic => $topic, partitions => 2);
my $node = new_dwh_node(
	'kafka_gaps',
	'dwh.kafka_consumers' => 1,
	'dwh.kafka_brokers' => $broker->{bootstrap},
	'dwh.kafka_batch_wait' => '50ms');
my $tmp = $PostgreSQL::Test::Utils::tmp_check;

# One clean version per order: line i of the stream is order 1000000 + i.
generate_orders("$tmp/gaps.txt", '--count 630 --seed 16 --clean');
my @lines = split /^/m, slurp_file("$tmp/gaps.txt");
my $first_id = 1000000;

# Produce lines [$from, $to) of the stream to one partition, in order.
sub produce_lines
{
	my ($from, $to, $partition) = @_;
	my $file = "$tmp/gaps_${from}_$to.txt";
	open(my $fh, '>', $file) or die "could not write $file: $!";
	binmode $fh;
	print $fh @lines[ $from .. $to - 1 ];
	close $fh;
	system('kcat', '-P', '-q', '-b', $broker->{bootstrap}, '-t', $topic,
		'-p', $partition, '-l', $file) == 0
	  or die "kcat could not produce $file";
	return;
}

# Delete a partition's records below $offset, as retention would.
sub delete_records
{
	my ($partition, $offset) = @_;
	my $json = "$tmp/delete_${partition}_$offset.json";
	open(my $fh, '>', $json) or die "could not write $json: $!";
	print $fh qq({"version":1,"partitions":[{"topic":"$topic","partition":$partition,"offset":$offset}]});
	close $fh;
	broker_command('tool', 'org.apache.kafka.tools.DeleteRecordsCommand',
		'--bootstrap-server', $broker->{bootstrap}, '--offset-json-file', $json);
	return;
}

# Orders of stream lines [$from, $to) in STG.
sub orders_in_stg
{
	my ($from, $to) = @_;
	return $node->safe_psql('postgres',
		    'SELECT count(*) FROM stg.order_events WHERE object_id BETWEEN '
		  . ($first_id + $from) . ' AND '
		  . ($first_id + $to - 1));
}

sub stored
{
	my ($partition) = @_;
	return $node->safe_psql('postgres',
		"SELECT next_offset FROM dwh.kafka_offsets WHERE topic = '$topic' AND kafka_partition = $partition"
	);
}

sub wait_stored
{
	my ($partition, $offset, $label) = @_;
	ok( wait_for($node,
			"SELECT next_offset = $offset FROM dwh.kafka_offsets WHERE topic = '$topic' AND kafka_partition = $partition"
		),
		$label);
	return;
}

# The workers hold off (no broker configured) or consume again.
sub hold
{
	$node->safe_psql('postgres',
		"ALTER SYSTEM SET dwh.kafka_brokers = ''; SELECT pg_reload_conf()");
	ok(wait_for($node, "SELECT bool_and(state LIKE 'idle%') FROM dwh.status WHERE worker LIKE 'kafka%'"),
		'the worker holds off');
	return;
}

sub release
{
	$node->safe_psql('postgres',
		"ALTER SYSTEM SET dwh.kafka_brokers = '$broker->{bootstrap}'; SELECT pg_reload_conf()"
	);
	return;
}

# Poll a query until it returns $expected (watermarks are published by the
# workers every second), then check it.
sub wait_is
{
	my ($query, $expected, $label) = @_;
	my $deadline = time() + $PostgreSQL::Test::Utils::timeout_default;
	my $got;
	do
	{
		$got = $node->safe_psql('postgres', $query);
		usleep(200_000) if $got ne $expected;
	} while ($got ne $expected && time() < $deadline);
	is($got, $expected, $label);
	return;
}

# Delete the topic and create it again, with 2 partitions.
sub recreate_topic
{
	my ($label) = @_;
	broker_command('tool', 'org.apache.kafka.tools.TopicCommand',
		'--bootstrap-server', $broker->{bootstrap}, '--delete', '--topic', $topic);
	my $created = 0;
	foreach my $try (1 .. 60)
	{
		# The deletion completes in the background.
		last if $created = eval { broker_command('create-topic', $broker->{dir}, $topic, 2); 1 };
		usleep(500_000);
	}
	ok($created, $label);
	return;
}

sub count_in_log
{
	my ($pattern) = @_;
	my @found = slurp_file($node->logfile) =~ /$pattern/g;
	return scalar @found;
}

# Partition 0 gets lines 0-99 (offsets 0-99), partition 1 lines 100-149.
produce_lines(0, 100, 0);
produce_lines(100, 150, 1);
wait_stored(0, 100, 'partition 0 applied');
wait_stored(1, 50, 'partition 1 applied');

# --- skip (the default) ---
# While the workers hold off, lines 150-249 go to offsets 100-199 and the
# records below 150 are deleted: offsets 100-149 are lost.
hold();
produce_lines(150, 250, 0);
delete_records(0, 150);
release();
wait_stored(0, 200, 'skip: partition 0 goes on past the gap');
is( $node->safe_psql('postgres',
		'SELECT topic, kafka_partition, next_offset, log_start_offset, log_end_offset, action, resumed_offset, resumed_at IS NOT NULL FROM dwh.kafka_gaps'
	),
	"$topic|0|100|150|200|skipped|150|t",
	'skip: the gap is recorded with the offsets it lost');
is(count_in_log(qr/WARNING:  offsets 100 to 149 of Kafka partition 0 of topic "$topic" can no longer be read/),
	1, 'skip: the gap is logged as a WARNING');
like(slurp_file($node->logfile),
	qr/DETAIL:  The broker's log of the partition now starts at offset 150 \(retention or deleted records\)\. Consumption goes on from offset 150\./,
	'skip: the WARNING says where consumption goes on');
is(orders_in_stg(150, 200), '0', 'skip: the lost orders are not in STG');
is(orders_in_stg(200, 250), '50', 'skip: the orders after the gap are');
is( $node->safe_psql('postgres',
		"SELECT gaps, stopped_partitions FROM dwh.status WHERE worker = 'kafka 1'"),
	'1|', 'skip: dwh.status counts the gap, no partition stopped');
wait_is(
	"SELECT kafka_partition, stopped, gaps, last_gap_at IS NOT NULL, low_watermark, stored_offset, lag FROM dwh.kafka_partitions ORDER BY 1",
	"0|f|1|t|150|200|0\n1|f|0|f|0|50|0",
	'skip: dwh.kafka_partitions shows the gap and the low watermark');

# --- stop ---
# Lines 250-349 go to offsets 200-299 and offsets 200-249 are deleted.
$node->safe_psql('postgres', "ALTER SYSTEM SET dwh.kafka_on_gap = 'stop'");
hold();
produce_lines(250, 350, 0);
delete_records(0, 250);
release();
ok( wait_for($node,
		"SELECT count(*) = 1 FROM dwh.kafka_gaps WHERE action = 'stopped' AND resumed_at IS NULL"),
	'stop: the gap is recorded open');
is( $node->safe_psql('postgres',
		"SELECT kafka_partition, next_offset, log_start_offset, log_end_offset, resumed_offset FROM dwh.kafka_gaps WHERE action = 'stopped'"
	),
	'0|200|250|300|', 'stop: with the offsets it lost');
# Partition 1 goes on meanwhile: lines 350-399 at offsets 50-99.
produce_lines(350, 400, 1);
wait_stored(1, 100, 'stop: the other partition is consumed');
usleep(1_000_000);
is(stored(0), '200', 'stop: the stopped partition keeps its stored offset');
is(orders_in_stg(250, 350), '0', 'stop: nothing of the stopped partition is applied');
is(count_in_log(qr/WARNING:  offsets 200 to 249 of Kafka partition 0 of topic "$topic" can no longer be read/),
	1, 'stop: the gap is logged as a WARNING');
like(slurp_file($node->logfile),
	qr/dwh\.kafka_on_gap is "stop": the partition is not consumed until it is moved\. The gap is recorded in dwh\.kafka_gaps\.\n[^\n]*HINT:  Move the partition with dwh\.kafka_seek\(0, 250\) to go on from the first offset the broker holds\./,
	'stop: the WARNING says how to go on');
is( $node->safe_psql('postgres',
		"SELECT gaps, stopped_partitions, partition_offsets->0->>'stopped' FROM dwh.status WHERE worker = 'kafka 1'"
	),
	'2|{0}|true', 'stop: dwh.status shows the stopped partition');
is( $node->safe_psql('postgres',
		'SELECT kafka_partition, stopped, gaps FROM dwh.kafka_partitions ORDER BY 1'),
	"0|t|2\n1|f|0", 'stop: dwh.kafka_partitions shows it stopped');

# A restart neither records the gap again nor consumes the partition.
$node->restart;
produce_lines(400, 410, 1);
wait_stored(1, 110, 'stop: consuming again after a restart');
usleep(1_000_000);
is($node->safe_psql('postgres', 'SELECT count(*) FROM dwh.kafka_gaps'),
	'2', 'stop: the gap is not recorded twice across a restart');
is(stored(0), '200', 'stop: the partition stays stopped across a restart');
is(orders_in_stg(250, 350), '0', 'stop: still nothing of it applied');
is(count_in_log(qr/WARNING:  offsets 200 to 249 of Kafka partition 0/),
	1, 'stop: the gap is logged once');

# The operator moves it: consumption goes on from there, the gap closes.
$node->safe_psql('postgres', 'SELECT dwh.kafka_seek(0, 250)');
wait_stored(0, 300, 'stop: dwh.kafka_seek moves the stopped partition');
is(orders_in_stg(250, 300), '0', 'stop: the lost orders are not in STG');
is(orders_in_stg(300, 350), '50', 'stop: the orders from the seek on are');
is( $node->safe_psql('postgres',
		"SELECT resumed_offset, resumed_at IS NOT NULL FROM dwh.kafka_gaps WHERE action = 'stopped'"
	),
	'250|t', 'stop: the seek closes the gap');
is( $node->safe_psql('postgres',
		"SELECT gaps, stopped_partitions FROM dwh.status WHERE worker = 'kafka 1'"),
	'2|', 'stop: no partition stopped any more');

# --- cooperative-sticky, skip ---
# A new group (a static member may not change its protocol), the offsets
# stay those of dwh.kafka_offsets.  Lines 410-509 go to partition 1 at
# offsets 110-209 and offsets 110-159 are deleted.
hold();
$node->safe_psql('postgres',
	"ALTER SYSTEM SET dwh.kafka_on_gap = 'skip'; "
	  . "ALTER SYSTEM SET dwh.kafka_group_id = 'dwh-cooperative'; "
	  . "ALTER SYSTEM SET dwh.kafka_options = 'partition.assignment.strategy=cooperative-sticky'");
produce_lines(410, 510, 1);
delete_records(1, 160);
release();
wait_stored(1, 210, 'cooperative: partition 1 goes on past the gap');
ok($node->log_contains('cooperative rebalance'), 'cooperative: the group is cooperative');
is( $node->safe_psql('postgres',
		"SELECT next_offset, log_start_offset, log_end_offset, action, resumed_offset FROM dwh.kafka_gaps WHERE kafka_partition = 1"
	),
	'110|160|210|skipped|160', 'cooperative: the gap is recorded');
is(orders_in_stg(410, 460), '0', 'cooperative: the lost orders are not in STG');
is(orders_in_stg(460, 510), '50', 'cooperative: the orders after the gap are');
# Partition 0 was started again too, at its stored offset: nothing twice.
produce_lines(510, 520, 0);
wait_stored(0, 310, 'cooperative: partition 0 goes on');

# --- a recreated topic ---
# Its log ends before the stored offsets: both partitions have a gap, and
# what the new topic holds (lines 520-529 at offsets 0-9 of partition 0)
# is read from its start.
hold();
recreate_topic('the topic is recreated');
produce_lines(520, 530, 0);
release();
wait_stored(0, 10, 'recreated: partition 0 is read from the start of the new log');
wait_stored(1, 0, 'recreated: partition 1 too');
is( $node->safe_psql('postgres',
		"SELECT kafka_partition, next_offset, log_start_offset, log_end_offset, action, resumed_offset FROM dwh.kafka_gaps WHERE id > (SELECT max(id) FROM dwh.kafka_gaps WHERE kafka_partition = 1 AND next_offset = 110) ORDER BY kafka_partition"
	),
	"0|310|0|10|skipped|0\n1|210|0|0|skipped|0",
	'recreated: a gap per partition, from the stored offset');
is(count_in_log(qr/WARNING:  Kafka partition 0 of topic "$topic" ends before its stored offset 310\n[^\n]*DETAIL:  The broker's log of the partition ends at offset 10: the topic was recreated or truncated\. Consumption goes on from offset 0\./),
	1, 'recreated: the WARNING says the log ends before the stored offset');
is(orders_in_stg(520, 530), '10', 'recreated: the new topic\'s orders are applied');

# --- a recreated topic whose new log reaches past the stored offset ---
# The broker holds partition 0's stored offset 10 again, in another log:
# the worker starts one message earlier, finds another message than the
# one it applied at offset 9, and reads the new log from its start (lines
# 530-549 at offsets 0-19) instead of going on at offset 10.
hold();
recreate_topic('the topic is recreated again');
produce_lines(530, 550, 0);
release();
wait_stored(0, 20, 'replaced: partition 0 is read from the start of the new log');
is( $node->safe_psql('postgres',
		"SELECT kafka_partition, next_offset, log_start_offset, log_end_offset, action, resumed_offset FROM dwh.kafka_gaps WHERE next_offset = 10"
	),
	"0|10|0|20|skipped|0",
	'replaced: the gap is recorded from the stored offset');
is(count_in_log(qr/WARNING:  Kafka partition 0 of topic "$topic" is not the log its stored offset 10 was read from
[^
]*DETAIL:  The broker holds another message at offset 9 than the one applied there: the topic was recreated\. Its log holds offsets 0 to 19\. Consumption goes on from offset 0\./),
	1, 'replaced: the WARNING says so');
is(orders_in_stg(530, 550), '20', 'replaced: every order of the new log is applied');

# --- nothing to compare ---
# Records deleted exactly up to partition 0's stored offset 20: the message
# before it is gone, so there is nothing to check, and no gap either (lines
# 550-559 at offsets 20-29).
my $gaps = $node->safe_psql('postgres', 'SELECT count(*) FROM dwh.kafka_gaps');
hold();
produce_lines(550, 560, 0);
delete_records(0, 20);
release();
wait_stored(0, 30, 'nothing to compare: the partition goes on from its stored offset');
is($node->safe_psql('postgres', 'SELECT count(*) FROM dwh.kafka_gaps'),
	$gaps, 'nothing to compare: no gap recorded');
is(orders_in_stg(550, 560), '10', 'nothing to compare: the orders after it are applied');

# After dwh.kafka_seek() (back to offset 25: lines 555-559 again, then
# 560-569 at offsets 30-39) the stored offset has no message to check.
hold();
$node->safe_psql('postgres', 'SELECT dwh.kafka_seek(0, 25)');
produce_lines(560, 570, 0);
release();
wait_stored(0, 40, 'after a seek: the partition goes on from the offset it was moved to');
is($node->safe_psql('postgres', 'SELECT count(*) FROM dwh.kafka_gaps'),
	$gaps, 'after a seek: no gap recorded');
is(orders_in_stg(555, 570), '15', 'after a seek: the orders replayed and after it are applied once');
is(count_in_log(qr/WARNING:  Kafka partition 0 of topic "$topic" is not the log/),
	1, 'neither is taken for a recreated topic');

# --- a crash while a gap is recorded (skip) ---
# Lines 570-599 go to offsets 40-69 and offsets 40-49 are deleted; a session
# holds dwh.kafka_gaps so that the worker waits in the transaction that
# records the gap, and the worker is killed there: the server restarts
# and the gap is recorded once, its orders lost, the others applied once.
hold();
produce_lines(570, 600, 0);
delete_records(0, 50);
my $locker = $node->background_psql('postgres', on_error_stop => 0);
$locker->query_safe('BEGIN; LOCK TABLE dwh.kafka_gaps IN SHARE MODE');
release();
ok( wait_for(
		$node, q{SELECT EXISTS (SELECT FROM pg_locks l JOIN dwh.status s USING (pid)
		  WHERE s.worker = 'kafka 1' AND NOT l.granted AND l.relation = 'dwh.kafka_gaps'::regclass)}),
	'crash: the worker waits to record the gap');
my $victim = $node->safe_psql('postgres', "SELECT pid FROM dwh.status WHERE worker = 'kafka 1'");
kill 'KILL', $victim;
eval { $locker->quit; };
wait_stored(0, 70, 'crash: after the restart the partition goes on past the gap');
is( $node->safe_psql('postgres',
		'SELECT count(*), min(log_start_offset), min(action) FROM dwh.kafka_gaps WHERE next_offset = 40'),
	'1|50|skipped', 'crash: the gap is recorded once');
is(orders_in_stg(570, 580), '0', 'crash: the lost orders are not in STG');
is(orders_in_stg(580, 600), '20', 'crash: the orders after the gap are');

# --- a seek requested while the gap is being recorded ---
# Lines 600-629 go to offsets 70-99 and offsets 70-79 are deleted; a
# session calls dwh.kafka_seek(0, 85) and holds its transaction open, so
# that the worker waits for the partition's row to record the gap.  Once
# the seek commits, the worker records nothing and goes on from 85.
$gaps = $node->safe_psql('postgres', 'SELECT count(*) FROM dwh.kafka_gaps');
hold();
produce_lines(600, 630, 0);
delete_records(0, 80);
$locker = $node->background_psql('postgres', on_error_stop => 0);
$locker->query_safe('BEGIN; SELECT dwh.kafka_seek(0, 85)');
release();
ok( wait_for(
		$node, q{SELECT EXISTS (SELECT FROM pg_locks l JOIN dwh.status s USING (pid)
		  WHERE s.worker = 'kafka 1' AND NOT l.granted)}),
	'seek meanwhile: the worker waits for the partition to record the gap');
$locker->query_safe('COMMIT');
$locker->quit;
wait_stored(0, 100, 'seek meanwhile: the partition goes on from the offset it was moved to');
is($node->safe_psql('postgres', 'SELECT count(*) FROM dwh.kafka_gaps'),
	$gaps, 'seek meanwhile: no gap recorded');
is(count_in_log(qr/WARNING:  offsets 70 to 79 of Kafka partition 0/), 0,
	'seek meanwhile: nor logged');
is(orders_in_stg(600, 615), '0', 'seek meanwhile: the orders before offset 85 are not applied');
is(orders_in_stg(615, 630), '15', 'seek meanwhile: those from offset 85 on are');

is($node->safe_psql('postgres', 'SELECT count(*) FROM stg.order_events'),
	100 + 50 + 50 + 50 + 50 + 10 + 50 + 10 + 10 + 20 + 10 + 10 + 20 + 15,
	'every order that was not lost is in STG once');
check_consistent($node, 'after the gaps');

# With no offset stored, the lag counts from the broker's first offset
# (the low watermark, 80 on partition 0), not from 0.
hold();
$node->safe_psql('postgres',
	"DELETE FROM dwh.kafka_offsets WHERE topic = '$topic' AND kafka_partition = 0");
is( $node->safe_psql('postgres',
		"SELECT low_watermark || ' ' || high_watermark || ' ' || lag FROM dwh.kafka_partitions WHERE topic = '$topic' AND kafka_partition = 0"
	),
	'80 100 20',
	'with no offset stored, the lag counts from the low watermark');

# --- a recreated topic whose log ends at the message before the stored offset ---
# Partition 1 applies lines 570-579 (offsets 0-9: stored offset 10, the
# hash of offset 9 kept); the topic is recreated with lines 600-608 in
# partition 1 (offsets 0-8): its log ends at 9, where the worker starts to
# check the message it applied.  That fetch is not out of range: it waited
# for a tenth message, the new log unread and no gap recorded.
release();
produce_lines(570, 580, 1);
wait_stored(1, 10, 'short log: partition 1 applies ten messages');
my $last_gap = $node->safe_psql('postgres', 'SELECT coalesce(max(id), 0) FROM dwh.kafka_gaps');
hold();
recreate_topic('the topic is recreated with a shorter log');
produce_lines(600, 609, 1);
release();
wait_stored(1, 9, 'short log: partition 1 is read from the start of the new log');
is( $node->safe_psql('postgres',
		"SELECT next_offset, log_start_offset, log_end_offset, action, resumed_offset FROM dwh.kafka_gaps WHERE id > $last_gap AND kafka_partition = 1"
	),
	'10|0|9|skipped|0',
	'short log: the gap is recorded from the stored offset');
is(count_in_log(qr/WARNING:  Kafka partition 1 of topic "$topic" ends before its stored offset 10\n[^\n]*DETAIL:  The broker's log of the partition ends at offset 9: the topic was recreated or truncated\. Consumption goes on from offset 0\./),
	1, 'short log: the WARNING says the log ends before the stored offset');
is(orders_in_stg(600, 609), '9', 'short log: the orders of the new log are applied');

$node->stop;
broker_command('stop', $broker->{dir});
done_testing();
