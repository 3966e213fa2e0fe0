# Failures around the Kafka workers: the broker stopped and restarted while
# orders stream (the workers wait, say so, and resume by themselves with
# nothing lost); an error that is not about a message (a lock held on the
# offsets table) is retried with backoff and never skips data; SIGTERM
# stops a worker within 2 s, also while the broker is down; the workers
# wait while the extension is dropped, and resume once it is back, and
# apply the whole topic again into an extension dropped and created again
# between two batches; a record without a value is a dead letter at its
# position.  (A standby:
# 037_standby.pl.)

use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;

use DwhTest;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);

my $broker = start_broker(partitions => 4);
my $node = new_dwh_node(
	'kafka_failures',
	'dwh.kafka_consumers' => 2,
	'dwh.kafka_brokers' => $broker->{bootstrap},
	'dwh.kafka_batch_wait' => '50ms');
load_dictionaries($node);
my $tmp = $PostgreSQL::Test::Utils::tmp_check;

generate_orders("$tmp/a.txt", '--count 20000 --seed 21 --malformed 0.005',
	"--manifest $tmp/a.json");
generate_orders("$tmp/b.txt", '--count 5000 --seed 22 --first-id 3000000',
	"--manifest $tmp/b.json");
my $a = read_manifest("$tmp/a.json");
my $b = read_manifest("$tmp/b.json");

# The broker goes away in the middle of the stream.
produce($broker, "$tmp/a.txt");
ok(wait_for($node, 'SELECT coalesce(sum(next_offset), 0) > 2000 FROM dwh.kafka_offsets'),
	'consuming');
broker_command('stop', $broker->{dir});
ok(wait_for($node,
		"SELECT bool_or(last_error IS NOT NULL) FROM dwh.status WHERE worker LIKE 'kafka%'"),
	'the lost broker shows in dwh.status');
my $during = stored_total($node);

broker_command('restart', $broker->{dir});
ok(wait_applied($node, $a->{messages}), 'the stream resumes by itself once the broker is back');
ok(wait_for($node,
		"SELECT bool_and(last_error IS NULL AND last_error_at IS NULL) FROM dwh.status WHERE worker LIKE 'kafka%'"),
	'once batches are applied again, dwh.status shows no error')
  or diag($node->safe_psql('postgres',
		"SELECT worker, state, partitions, batches, last_error, last_error_at FROM dwh.status WHERE worker LIKE 'kafka%'"));
note("$during of $a->{messages} messages were applied when the broker stopped");
check_consistent($node, 'after the broker restart');
check_manifest_counts($node, $a, 'after the broker restart');

# A lock held on dwh.kafka_offsets: batches fail on lock_timeout, are
# retried with backoff and apply once the lock is gone.  (dwh.status reads
# that table too: the workers' own state comes from dwh.worker_status().)
$node->safe_psql('postgres',
	"ALTER SYSTEM SET lock_timeout = '200ms'; SELECT pg_reload_conf()");
my $locker = $node->background_psql('postgres');
$locker->query_safe('BEGIN; LOCK dwh.kafka_offsets IN ACCESS EXCLUSIVE MODE;');
produce($broker, "$tmp/b.txt");
ok(wait_for($node,
		"SELECT bool_or(state = 'retrying after an error' AND last_error LIKE '%lock timeout%') FROM dwh.worker_status()"
	),
	'a lock timeout is shown and retried');
# The views answer at once, the lag unknown without the stored offsets
# (not the whole log counted from the low watermark).
is( $node->safe_psql(
		'postgres',
		"SELECT bool_or(high_watermark > 0), count(*) FILTER (WHERE lag IS NOT NULL OR stored_offset IS NOT NULL)
		 FROM dwh.kafka_partitions"),
	't|0',
	'while dwh.kafka_offsets is locked, every lag is unknown (NULL)');
is($node->safe_psql('postgres',
		"SELECT count(lag) FROM dwh.status WHERE worker LIKE 'kafka%'"),
	'0', 'and so is every worker\'s lag in dwh.status');
$locker->query_safe('ROLLBACK;');
$locker->quit;
ok(wait_applied($node, $a->{messages} + $b->{messages}),
	'every message applied once the lock is released');
ok(wait_for($node,
		"SELECT bool_and(last_error IS NULL) FROM dwh.status WHERE worker LIKE 'kafka%'"),
	'and the lock timeout no longer shows as the last error');
is($node->safe_psql('postgres', 'SELECT count(*) FROM stg.order_events'),
	$a->{object_ids}{count} + $b->{object_ids}{count},
	'every order in STG once');
is($node->safe_psql('postgres', 'SELECT count(*) FROM dwh.dead_letters'),
	$a->{malformed} + $b->{malformed},
	'no message dead-lettered for a lock timeout');
check_consistent($node, 'after the lock timeouts');

# A record without a value (a tombstone, as a compacted topic keeps them,
# or a producer's mistake) carries no order: it is a dead letter at its
# position (22032, "value is empty", no raw bytes), and the orders around
# it are applied.  kcat -Z sends an empty value after a key as null.
my $tombstone = "$tmp/tombstone.txt";
my $tomb_order = sub {
	my ($id) = @_;
	return qq({"object_id": $id, "object_type": "order", "sent_dttm": "2023-06-01 10:00:00", "payload": {"restaurant": {"id": "r1"}, "date": "2023-06-01 10:00:00", "user": {"id": "u1"}, "order_items": [{"id": "d1", "name": "Плов", "price": 100, "quantity": 1}], "bonus_payment": 0, "cost": 100, "payment": 100, "bonus_grant": 0, "statuses": [], "final_status": "CLOSED", "update_ts": "2023-06-01 10:00:00"}});
};
append_to_file($tombstone,
	"k1|" . $tomb_order->(9000001) . "\nk2|\nk3|" . $tomb_order->(9000002) . "\n");
my $p0_before = $node->safe_psql('postgres',
	"SELECT coalesce(max(next_offset), 0) FROM dwh.kafka_offsets WHERE kafka_partition = 0");
system('kcat', '-P', '-q', '-Z', '-K', '|', '-b', $broker->{bootstrap},
	'-t', $broker->{topic}, '-p', '0', '-l', $tombstone) == 0
  or die 'kcat could not produce the tombstone';
ok( wait_for(
		$node,
		"SELECT count(*) = 2 FROM stg.order_events WHERE object_id IN (9000001, 9000002)"),
	'the orders around a record without a value are applied');
is( $node->safe_psql(
		'postgres',
		"SELECT concat_ws(' | ', sqlstate, reason, coalesce(raw_length::text, 'null'),
		                  coalesce(length(raw)::text, 'null'), kafka_offset - $p0_before)
		 FROM dwh.dead_letters WHERE kafka_partition = 0 AND kafka_offset >= $p0_before"),
	'22032 | value is empty | 0 | 0 | 1',
	'the record without a value is a dead letter at its position');
check_consistent($node, 'after the record without a value');

# SIGTERM: the worker exits promptly (the postmaster starts a new one).
my $pid = $node->safe_psql('postgres',
	"SELECT pid FROM dwh.status WHERE worker = 'kafka 1'");
# The README promises half a second (the group leave is cut short at
# 0.5 s).  The process is watched from here every 10 ms (the tests run as
# the server's user); the signal is sent by the backend of a session
# opened beforehand, so no connection is timed.
my $terminator = $node->background_psql('postgres');
my $start = time();
$terminator->query_safe("SELECT pg_terminate_backend($pid)");
my $deadline = $start + 10;
usleep(10_000) while kill(0, $pid) && time() < $deadline;
my $elapsed = time() - $start;
$terminator->quit;
ok(!kill(0, $pid), 'the worker stops on SIGTERM');
cmp_ok($elapsed, '<', 0.75,
	sprintf('SIGTERM honoured in %.2f s: half a second, with room for a busy machine', $elapsed));

# Without the extension the workers wait, and they resume when it is back.
# The same processes, past a recheck (every 5 s), and saying so in the log
# from now: not the lines of the server's start.
my $workers_sql = q{SELECT string_agg(pid::text, ',' ORDER BY pid) FROM pg_stat_activity
                    WHERE backend_type = 'dwh kafka worker'};
# (The worker terminated above is back after bgw_restart_time.)
ok(wait_for($node,
		"SELECT count(*) = 2 FROM pg_stat_activity WHERE backend_type = 'dwh kafka worker'"),
	'both workers are up');
my $workers = $node->safe_psql('postgres', $workers_sql);
my $drop_offset = -s $node->logfile;
$node->safe_psql('postgres', 'DROP EXTENSION dwh CASCADE');
ok($node->wait_for_log(qr/waiting: extension dwh is not created/, $drop_offset),
	'the workers say why they wait in the log');
sleep(6);
is($node->safe_psql('postgres', $workers_sql),
	$workers, 'the workers stay up without the extension, the same processes');

$node->safe_psql('postgres', 'CREATE EXTENSION dwh');
ok(wait_for($node,
		"SELECT count(*) = 2 FROM dwh.status WHERE worker LIKE 'kafka%' AND cardinality(partitions) > 0"),
	'the workers consume again once the extension is back');

# Dropped and created again in one transaction, between two batches: the
# workers do not find the extension missing.  They went on from their
# consumers' positions, and the new warehouse never got the messages
# before them (stored past them, no gap).  They start their partitions
# again, from the earliest offset where none is stored.
my $topic_messages = $a->{messages} + $b->{messages} + 3;
ok(wait_applied($node, $topic_messages), 'the new extension holds the whole topic');
$node->safe_psql('postgres', 'DROP EXTENSION dwh CASCADE; CREATE EXTENSION dwh;');
my $one_more = "$tmp/one_more.txt";
append_to_file($one_more, $tomb_order->(9000003) . "\n");
produce($broker, $one_more);
ok(wait_applied($node, $topic_messages + 1),
	'created again between two batches, the extension gets the whole topic again');
is($node->safe_psql('postgres', 'SELECT count(*) FROM stg.order_events'),
	$a->{object_ids}{count} + $b->{object_ids}{count} + 3,
	'every order of the topic in STG');

# The extension created in a second database too, which the workers do not
# serve: dwh.status there names the database they serve and shows none of
# the lag, offsets and gaps of its own dwh.kafka_offsets, and
# dwh.kafka_partitions names no owner (before: the workers seemed to
# consume it, owning its partitions, with a lag that never moved).
$node->safe_psql('postgres', 'CREATE DATABASE other');
$node->safe_psql('other', 'CREATE EXTENSION dwh');
$node->safe_psql('other', 'SELECT dwh.kafka_seek(0, 0)');
my $status_sql = q{SELECT string_agg(concat_ws(' ', worker, database, lag IS NOT NULL,
                                              partition_offsets IS NOT NULL, gaps IS NOT NULL),
                                    ', ' ORDER BY worker)
                   FROM dwh.status WHERE worker LIKE 'kafka%'};
is($node->safe_psql('other', $status_sql),
	'kafka 1 postgres f f f, kafka 2 postgres f f f',
	'in another database, dwh.status names the database served, and no lag');
is( $node->safe_psql('other',
		'SELECT count(*) || \' \' || count(worker) FROM dwh.kafka_partitions'),
	'4 0', 'and dwh.kafka_partitions there names no owner');
is($node->safe_psql('postgres', $status_sql),
	'kafka 1 postgres t t t, kafka 2 postgres t t t',
	'in the database served, both');
is($node->safe_psql('postgres', 'SELECT count(worker) FROM dwh.kafka_partitions'),
	'4', 'each partition with its owner');

# The broker down for good: a worker showing the error probes the leader
# every 5 s to clear it.  That probe once waited for an answer forever
# (rd_kafka_query_watermark_offsets before librdkafka 2.3.0), and the
# worker then ignored SIGTERM, so the server could not stop; then it
# waited out the probe's 2 s deadline.  The first worker that says (at
# DEBUG1) that it asks is terminated at once, while its probe waits for
# the broker; then the other one (which may not probe: one in the middle
# of a rebalance when the broker went away does not).  Each stops within
# half a second all the same, without telling the group (no broker
# answers).
$node->safe_psql('postgres',
	q{ALTER SYSTEM SET log_min_messages = debug1; SELECT pg_reload_conf()});
broker_command('stop', $broker->{dir});
ok(wait_for($node,
		"SELECT bool_and(last_error IS NOT NULL) FROM dwh.status WHERE worker LIKE 'kafka%'"),
	'the broker stopped again shows in dwh.status');
my %worker_of = map { $_ => $_ }
  split /\n/, $node->safe_psql('postgres',
	"SELECT pid FROM dwh.status WHERE worker LIKE 'kafka%' AND pid IS NOT NULL");
is(scalar(keys %worker_of), 2, 'both Kafka workers run');
my $from = -s $node->logfile;
my $probing;
my $probe_deadline = time() + 30;
while (!defined $probing && time() < $probe_deadline)
{
	foreach my $pid (slurp_file($node->logfile, $from) =~
		/\[(\d+)\] DEBUG:  dwh kafka worker \d asks the leader of partition/g)
	{
		$probing //= $pid if $worker_of{$pid};
	}
	usleep(10_000) unless defined $probing;
}
ok(defined $probing, 'a worker probes the leader');
foreach my $pid (grep { defined } $probing, grep { $_ != ($probing // 0) } sort keys %worker_of)
{
	$terminator = $node->background_psql('postgres');
	my $term_at = time();
	$terminator->query_safe("SELECT pg_terminate_backend($pid)");
	usleep(10_000) while kill(0, $pid) && time() < $term_at + 15;
	$elapsed = time() - $term_at;
	$terminator->quit;
	my $what = $pid == ($probing // 0) ? 'during its probe' : 'with the broker down';
	ok(!kill(0, $pid), "worker $pid stops on SIGTERM $what");
	cmp_ok($elapsed, '<', 0.75, sprintf('in %.2f s', $elapsed));
}
my $stop_at = time();
$node->stop('fast');
cmp_ok(time() - $stop_at, '<', 10, 'with the broker down, the server stops within seconds');
done_testing();
