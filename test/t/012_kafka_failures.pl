# Failures around the Kafka workers: the broker stopped and restarted while
# orders stream (the workers wait, say so, and resume by themselves with
# nothing lost); an error that is not about a message (a lock held on the
# offsets table) is retried with backoff and never skips data; SIGTERM
# stops a worker within 2 s, also while the broker is down; the workers
# wait while the extension is dropped, and resume once it is back.  (A
# standby: 037_standby.pl.)

use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;

use DwhTest;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time);

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

# SIGTERM: the worker exits promptly (the postmaster starts a new one).
my $pid = $node->safe_psql('postgres',
	"SELECT pid FROM dwh.status WHERE worker = 'kafka 1'");
my $start = time();
$node->safe_psql('postgres', "SELECT pg_terminate_backend($pid)");
ok(wait_for($node, "SELECT NOT EXISTS (SELECT FROM pg_stat_activity WHERE pid = $pid)", 10),
	'the worker stops on SIGTERM');
my $elapsed = time() - $start;
note(sprintf('worker stopped %.2f s after SIGTERM', $elapsed));
# The README promises half a second (the group leave is cut short at
# 0.5 s); the polling above adds up to 0.2 s and a psql start.
cmp_ok($elapsed, '<', 2, 'SIGTERM honoured within 2 s');

# Without the extension the workers wait, and they resume when it is back.
$node->safe_psql('postgres', 'DROP EXTENSION dwh CASCADE');
ok(wait_for($node,
		"SELECT count(*) = 2 FROM pg_stat_activity WHERE backend_type = 'dwh kafka worker'"),
	'the workers stay up without the extension');
ok($node->log_contains('extension dwh is not created'), 'and say why in the log');

$node->safe_psql('postgres', 'CREATE EXTENSION dwh');
ok(wait_for($node,
		"SELECT count(*) = 2 FROM dwh.status WHERE worker LIKE 'kafka%' AND cardinality(partitions) > 0"),
	'the workers consume again once the extension is back');

# The broker down for good: a worker showing the error probes the leader
# every 5 s to clear it.  That probe once waited for an answer forever
# (rd_kafka_query_watermark_offsets before librdkafka 2.3.0), and the
# worker then ignored SIGTERM, so the server could not stop.
broker_command('stop', $broker->{dir});
ok(wait_for($node,
		"SELECT bool_and(last_error IS NOT NULL) FROM dwh.status WHERE worker LIKE 'kafka%'"),
	'the broker stopped again shows in dwh.status');
sleep(7);
my $stuck_pid = $node->safe_psql('postgres',
	"SELECT pid FROM dwh.status WHERE worker = 'kafka 1'");
my $term_at = time();
$node->safe_psql('postgres', "SELECT pg_terminate_backend($stuck_pid)");
ok(wait_for($node, "SELECT NOT EXISTS (SELECT FROM pg_stat_activity WHERE pid = $stuck_pid)", 15),
	'with the broker down, a worker stops on SIGTERM');
cmp_ok(time() - $term_at, '<', 2, 'with the broker down, SIGTERM honoured within 2 s');
my $stop_at = time();
$node->stop('fast');
cmp_ok(time() - $stop_at, '<', 10, 'with the broker down, the server stops within seconds');
done_testing();
