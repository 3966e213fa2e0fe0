# The error recovery the Kafka, Redis and tags workers share
# (src/dwh_worker.c):
# an error of the database (here a lock timeout on the worker's own table,
# raised again and again) is published in dwh.status with its SQLSTATE, the
# worker says it retries, and it goes on by itself once the lock is gone.
# The retries back off: 0.5 s, doubled after each failure in a row up to
# 30 s, and from 0.5 s again once the worker has recovered (a Kafka worker
# that recovered with nothing to apply kept its last wait, and slept it
# again before its next connection); a SIGTERM ends a backoff at once.
# Recovering leaves nothing behind: after several errors each worker still
# has one of each of its memory contexts (the Kafka worker used to create a
# new loop context at every error and keep the old one).
#
# Kafka comes from librdkafka's mock cluster (no broker to start), Redis
# from a throw-away redis-server.

use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;

use DwhTest;
use PostgreSQL::Test::Utils;
use RedisServer;
use Test::More;
use Time::HiRes qw(time usleep);

my $mock = start_mock_cluster(brokers => 1, partitions => 2);
my $redis = RedisServer->new(password => 'recovery-pw');

# Both sources empty: the workers idle until the locks are taken.
my $node = new_dwh_node(
	'worker_recovery',
	'dwh.kafka_consumers' => 1,
	'dwh.redis_refresh_interval' => 1,
	'dwh.tags_expire_interval' => 1);

sub psql { return $node->safe_psql('postgres', $_[0]) }

# How many lines of the log, from byte $offset on, match $re.
sub log_count
{
	my ($offset, $re) = @_;
	my $log = slurp_file($node->logfile, $offset);
	my @hits = ($log =~ /$re/g);
	return scalar @hits;
}

# Wait until the log, from $offset on, has at least $n lines matching $re.
sub wait_log
{
	my ($offset, $re, $n) = @_;
	foreach (1 .. 10 * $PostgreSQL::Test::Utils::timeout_default)
	{
		return 1 if log_count($offset, $re) >= $n;
		usleep(100_000);
	}
	return 0;
}

# The memory contexts of a process named $name (as in a "level: N; name:"
# line of pg_log_backend_memory_contexts) that it holds now.
sub contexts_named
{
	my ($pid, $name) = @_;
	my $offset = -s $node->logfile;
	psql("SELECT pg_log_backend_memory_contexts($pid)");
	ok(wait_log($offset, qr/\[$pid\] LOG:  Grand total: /, 1),
		"process $pid logged its memory contexts");
	return log_count($offset, qr/\[$pid\] LOG:  level: \d+; \Q$name\E: /);
}

psql(q{ALTER SYSTEM SET lock_timeout = '200ms'});
$node->reload;

# 1. The Kafka worker: the offsets table locked when its partitions are
#    assigned; the lookup of their stored offsets fails again and again.
my $locker = $node->background_psql('postgres');
$locker->query_safe(
	'BEGIN; LOCK dwh.kafka_offsets, dwh.redis_keys, dwh.tag_rules IN ACCESS EXCLUSIVE MODE;');

my $offset = -s $node->logfile;
psql("ALTER SYSTEM SET dwh.kafka_brokers = '$mock->{bootstrap}'");
psql("ALTER SYSTEM SET dwh.redis_url = '" . $redis->url . "'");
$node->reload;

# dwh.worker_status() is read while the lock is held: it is what dwh.status
# shows of the workers themselves.
sub worker_row
{
	my ($worker, $columns) = @_;
	return psql("SELECT $columns FROM dwh.worker_status() WHERE worker = '$worker'");
}

my $kafka_pid = worker_row('kafka 1', 'pid');
my $redis_pid = worker_row('redis', 'pid');
my $tags_pid = worker_row('tags', 'pid');
my $timeout = qr/ERROR:  canceling statement due to lock timeout/;

ok(wait_log($offset, qr/\[$kafka_pid\] $timeout/, 3),
	'the Kafka worker fails three times on the lock');
ok(wait_log($offset, qr/\[$redis_pid\] $timeout/, 3),
	'the Redis worker fails three times on the lock');
ok(wait_log($offset, qr/\[$tags_pid\] $timeout/, 3),
	'the tags worker fails three times on the lock (its expiry pass reads the rules)');
# The retries back off as the README says: 0.5 s, doubled after each
# failure in a row, up to 30 s (the eighth wait is 30 s again, not 64).
# Between two failures come the wait and the lock timeout (0.2 s) of the
# next attempt.
sub seconds_of
{
	my ($stamp) = @_;
	my ($h, $m, $s) = $stamp =~ /(\d\d):(\d\d):(\d\d\.\d+)/ or die "no time in $stamp";
	return $h * 3600 + $m * 60 + $s;
}
foreach my $pid ($kafka_pid, $redis_pid, $tags_pid)
{
	ok(wait_log($offset, qr/\[$pid\] $timeout/, 9),
		"process $pid fails nine times on the lock");
	my @times = map { seconds_of($_) } (slurp_file($node->logfile, $offset) =~
		  /^(\S+ \S+) \S+ \[$pid\] $timeout/mg);
	my @off;
	foreach my $i (1 .. 8)
	{
		my $wait = 0.5 * 2**($i - 1);
		$wait = 30 if $wait > 30;
		my $gap = $times[$i] - $times[ $i - 1 ];
		$gap += 86400 if $gap < 0;    # midnight
		push @off, sprintf('%.2f s after a wait of %.1f s', $gap, $wait)
		  if $gap < $wait || $gap > ($wait >= 16 ? $wait + 2 : 1.5 * $wait + 0.5);
	}
	is(join('; ', @off), '',
		"process $pid waits 0.5, 1, 2, 4, 8, 16, 30 and 30 s between its failures");
}

foreach my $worker ('kafka 1', 'redis', 'tags')
{
	is(worker_row($worker, q{state || ' | ' || last_error}),
		'retrying after an error | canceling statement due to lock timeout (SQLSTATE 55P03)',
		"$worker: dwh.status shows the error with its SQLSTATE, and the retry");
}

# Three errors recovered: still one loop context, one cycle and one page
# context.
is(contexts_named($kafka_pid, 'dwh kafka loop'),
	1, 'the Kafka worker has one loop context after its errors');
is(contexts_named($kafka_pid, 'dwh kafka batch'),
	1, 'and one batch context');
is(contexts_named($redis_pid, 'dwh redis cycle'),
	1, 'the Redis worker has one cycle context after its errors');
is(contexts_named($redis_pid, 'dwh redis page'),
	1, 'and one page context');
is(contexts_named($tags_pid, 'dwh tags loop'),
	1, 'the tags worker has one loop context after its errors');
is(contexts_named($tags_pid, 'dwh tags flight'),
	1, 'and one flight context');

# 2. The lock released: both go on by themselves, in the same processes,
#    and the error no longer shows.
$locker->query_safe('ROLLBACK;');
$locker->quit;
ok( $node->poll_query_until(
		'postgres',
		q{SELECT state = 'mirroring' AND last_error IS NULL FROM dwh.status WHERE worker = 'redis'}
	),
	'the Redis worker mirrors once the lock is gone');
ok( $node->poll_query_until(
		'postgres',
		q{SELECT cardinality(partitions) = 2 FROM dwh.status WHERE worker = 'kafka 1'}),
	'the Kafka worker owns its partitions once the lock is gone');
is(worker_row('kafka 1', 'pid'), $kafka_pid, 'the Kafka worker recovered without a restart');
is(worker_row('redis', 'pid'), $redis_pid, 'and so did the Redis worker');
ok( $node->poll_query_until(
		'postgres',
		q{SELECT state = 'expiring tags every 1 s' AND last_error IS NULL FROM dwh.status WHERE worker = 'tags'}),
	'the tags worker expires tags again once the lock is gone, and shows no error');
is(worker_row('tags', 'pid'), $tags_pid, 'and recovered without a restart');

# 2b. A Kafka worker that recovered with nothing to apply starts from
#     0.5 s again.  Another Kafka setting makes it reconnect at once, and
#     the lookup of its offsets fails anew: 0.5 s, then 1 s between its
#     failures (it kept 16 s, which it first slept before connecting).
$locker = $node->background_psql('postgres');
$locker->query_safe('BEGIN; LOCK dwh.kafka_offsets IN ACCESS EXCLUSIVE MODE;');
$offset = -s $node->logfile;
my $reload_at = psql('SELECT clock_timestamp()');
psql(q{ALTER SYSTEM SET dwh.kafka_options = 'fetch.wait.max.ms=100'});
$node->reload;
# Connected: consuming since after the reload (its group then takes some
# seconds to assign the partitions).
ok( wait_for($node,
		"SELECT state = 'consuming' AND state_since > '$reload_at' FROM dwh.worker_status() WHERE worker = 'kafka 1'"
	),
	'the Kafka worker connects again after the reload');
my $connected = psql(
	"SELECT round(extract(epoch FROM state_since - '$reload_at')::numeric, 2) FROM dwh.worker_status() WHERE worker = 'kafka 1'"
);
cmp_ok($connected, '<', 5,
	"it connects $connected s after the reload, not after its old wait of 16 s");
ok(wait_log($offset, qr/\[$kafka_pid\] $timeout/, 3),
	'the Kafka worker reconnects and fails three times on the lock');
{
	my $log = slurp_file($node->logfile, $offset);
	my @times = map { seconds_of($_) } ($log =~ /^(\S+ \S+) \S+ \[$kafka_pid\] $timeout/mg);
	my @gaps = map { my $g = $times[$_] - $times[ $_ - 1 ]; $g < 0 ? $g + 86400 : $g } (1, 2);
	ok( $gaps[0] >= 0.5 && $gaps[0] <= 1.25 && $gaps[1] >= 1 && $gaps[1] <= 2,
		sprintf('it waits 0.5 then 1 s between its failures (%.2f s, %.2f s)', @gaps));
}
$locker->query_safe('ROLLBACK;');
$locker->quit;
ok( $node->poll_query_until(
		'postgres',
		q{SELECT cardinality(partitions) = 2 AND last_error IS NULL FROM dwh.status WHERE worker = 'kafka 1'}),
	'the Kafka worker owns its partitions again once the lock is gone');

# 3. SIGTERM ends a backoff at once (it ignores other wake-ups): the tags
#    worker fails four times more, then is terminated at the start of its
#    4 s wait.
$locker = $node->background_psql('postgres');
$locker->query_safe('BEGIN; LOCK dwh.tag_rules IN ACCESS EXCLUSIVE MODE;');
$offset = -s $node->logfile;
ok(wait_log($offset, qr/\[$tags_pid\] $timeout/, 4), 'the tags worker fails four times more');
my $term_at = time();
psql("SELECT pg_terminate_backend($tags_pid)");
ok( $node->poll_query_until(
		'postgres', "SELECT count(*) = 0 FROM pg_stat_activity WHERE pid = $tags_pid", 't'),
	'the tags worker ends on SIGTERM');
my $took = time() - $term_at;
cmp_ok($took, '<', 1.5, sprintf('in %.2f s, not at the end of its 4 s backoff', $took));
$locker->query_safe('ROLLBACK;');
$locker->quit;

$node->stop;
stop_mock_cluster($mock);
$redis->stop;
done_testing();
