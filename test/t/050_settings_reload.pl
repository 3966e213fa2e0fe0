# The settings the README gives the context "reload" take effect in running
# workers at a reload, without a restart (each before/after pair below
# differs only by the setting reloaded in between):
#
# Kafka worker (one, on one partition of a mock cluster)
#   dwh.dead_letter_keep_bytes   a malformed message's dead letter keeps its
#                                whole value, then only the new number of
#                                bytes (its length and hash whole)
#   dwh.kafka_prefetch_memory    a backlog prefetched while the worker waits
#                                for a lock is applied in a few batches at
#                                the default (16 MB: a batch closes at 2 MB),
#                                then at 1 MB in batches of at most an eighth
#                                of it (dwh.status.batches)
#   dwh.kafka_start_offset       latest, reloaded before the worker moves to
#                                another topic: what that topic held before
#                                is never applied, what comes after is
#
# Redis worker (a real redis-server)
#   dwh.redis_batch_size         five users set at once are written in one
#                                transaction, then at 2 in three or more
#   dwh.redis_max_value_size     a user of 1,500 bytes is mirrored, then at
#                                1 kB another is dead-lettered (54000)
#   dwh.dead_letter_keep_bytes   that dead letter keeps the new number of
#                                bytes
#
# A reload reaches a worker at its next wait; each change is followed by a
# pause longer than the workers' longest wait between two looks at their
# latch before anything it should affect is sent.

use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;

use DwhTest;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use RedisServer;
use Test::More;
use Time::HiRes qw(sleep);

my $tmp = $PostgreSQL::Test::Utils::tmp_check;

# Reload a setting and give the workers time to take it.
sub reload_setting
{
	my ($node, $setting, $value) = @_;
	ok(set_and_reload($node, $setting, $value), "$setting reloaded to $value");
	sleep(2);
	return;
}

# Batches the Kafka worker has committed since it started.
sub batches_committed
{
	my ($node) = @_;
	return $node->safe_psql('postgres',
		"SELECT batches FROM dwh.status WHERE worker = 'kafka 1'");
}

########################################################################
# The Kafka worker.
########################################################################

my $mock = start_mock_cluster(brokers => 1, partitions => 1);
mock_command($mock, 'create-topic other 1');
my $node = new_dwh_node(
	'settings_reload',
	'dwh.kafka_consumers' => 1,
	'dwh.kafka_batch_size' => 100000,
	'dwh.kafka_brokers' => $mock->{bootstrap});
load_dictionaries($node);

# 1. dwh.dead_letter_keep_bytes.
my $bad = '{"object_id": "not an order", "pad": "' . ('x' x 440) . '"}';
my $bad_len = length($bad);

sub produce_line
{
	my ($line, $topic) = @_;
	my $file = "$tmp/reload_line.txt";
	open(my $fh, '>', $file) or die "could not write $file: $!";
	print $fh "$line\n";
	close $fh;
	produce($mock, $file, $topic);
	return;
}

sub dead_letter_bytes
{
	my ($offset) = @_;
	return $node->safe_psql('postgres',
		"SELECT length(raw) || '|' || raw_length || '|' || (raw_sha256 = sha256(convert_to('$bad', 'UTF8')))
		 FROM dwh.dead_letters WHERE source = 'kafka' AND kafka_offset = $offset");
}

produce_line($bad);
ok(wait_applied($node, 1), 'the malformed message is consumed');
is(dead_letter_bytes(0), "$bad_len|$bad_len|true",
	'at the default dwh.dead_letter_keep_bytes its dead letter keeps it whole');
reload_setting($node, 'dwh.dead_letter_keep_bytes', '100B');
produce_line($bad);
ok(wait_applied($node, 2), 'the second malformed message is consumed');
is(dead_letter_bytes(1), "100|$bad_len|true",
	'after the reload the dead letter keeps 100 bytes, its length and hash whole');

# 2. dwh.kafka_prefetch_memory.  A backlog of about 2.4 MB: a little over
#    one batch at the default, some twenty at 1 MB.
generate_orders("$tmp/reload.txt", '--count 6000 --seed 50 --clean',
	"--manifest $tmp/reload.json");
my $manifest = read_manifest("$tmp/reload.json");
my @chunks = split_stream("$tmp/reload.txt", $manifest, 2);
my $applied = 2;

# Produce a chunk while a session locks the orders' table; once the worker
# waits for the lock, the broker's messages are all produced and prefetched
# in the time given, release it and wait for the chunk to be applied.
# Returns the batches it took and the chunk's bytes and longest line.
sub backlog_batches
{
	my ($chunk) = @_;
	my ($bytes, $longest) = (0, 0);
	foreach my $line (split /^/m, slurp_file($chunk->{file}))
	{
		my $len = length($line) - 1;
		$bytes += $len;
		$longest = $len if $len > $longest;
	}
	my $batches_before = batches_committed($node);
	my $lock = $node->background_psql('postgres');
	$lock->query_safe('BEGIN; LOCK TABLE stg.order_events IN SHARE MODE');
	produce($mock, $chunk->{file});
	ok( wait_for(
			$node, q{SELECT EXISTS (SELECT FROM pg_locks l JOIN dwh.status s USING (pid)
			  WHERE s.worker = 'kafka 1' AND NOT l.granted)}),
		'the worker waits for the lock on stg.order_events');
	sleep(2);
	$lock->query_safe('COMMIT');
	$lock->quit;
	$applied += $chunk->{messages};
	ok(wait_applied($node, $applied), "the backlog of $chunk->{messages} messages is applied");
	my $batches_after = batches_committed($node);
	return ($batches_after - $batches_before, $bytes, $longest);
}

my ($batches, $bytes, $longest) = backlog_batches($chunks[0]);
note("default prefetch memory: $bytes bytes in $batches batches");
cmp_ok($bytes, '>', 2 * 1024 * 1024, 'the backlog holds more than 2 MB');
cmp_ok($batches, '<=', 4,
	'at the default dwh.kafka_prefetch_memory (16 MB) it takes a few batches');

reload_setting($node, 'dwh.kafka_prefetch_memory', '1MB');
($batches, $bytes, $longest) = backlog_batches($chunks[1]);
note("1 MB of prefetch memory: $bytes bytes in $batches batches");
cmp_ok($batches, '>=', int($bytes / (128 * 1024 + $longest)),
	'after the reload to 1 MB its batches close at an eighth of it');
is($node->safe_psql('postgres', 'SELECT count(*) FROM stg.order_events'),
	$manifest->{object_ids}{count}, 'every order of both backlogs in STG once');

# 3. dwh.kafka_start_offset: latest is reloaded first, on its own; then the
#    worker moves to a topic it has no offset of.
reload_setting($node, 'dwh.kafka_start_offset', 'latest');
generate_orders("$tmp/other.txt", '--count 100 --seed 51 --clean --first-id 3000000',
	"--manifest $tmp/other.json");
my $other = read_manifest("$tmp/other.json");
my ($before, $after) = split_stream("$tmp/other.txt", $other, 2);
produce($mock, $before->{file}, 'other');
reload_setting($node, 'dwh.kafka_topic', 'other');
ok( wait_for(
		$node, "SELECT count(*) = 1 AND bool_and(high_watermark = $before->{messages})
			FROM dwh.kafka_partitions WHERE topic = 'other'"),
	"the worker fetches the other topic, $before->{messages} messages already there");
# README: with latest, where the partition starts (the end of its log) is
# stored before anything is fetched, so the lag is 0 at once.
ok( wait_for(
		$node, "SELECT stored_offset = $before->{messages} AND lag = 0
			FROM dwh.kafka_partitions WHERE topic = 'other'"),
	'the start at the end of the log is stored at once: the lag is 0');
produce($mock, $after->{file}, 'other');
ok(wait_applied($node, $before->{messages} + $after->{messages}, 'other'),
	'the stored offset counts what was there before and what came after');
my $ids = $node->safe_psql('postgres',
	'SELECT string_agg(object_id::text, \',\' ORDER BY object_id)
	 FROM stg.order_events WHERE object_id >= 3000000');
is($ids, join(',', sort { $a <=> $b } keys %{ $after->{ids} }),
	'after the reload to latest only the orders produced after the move are applied');
check_consistent($node, 'Kafka worker');
$node->stop;
stop_mock_cluster($mock);

########################################################################
# The Redis worker.
########################################################################

my $redis = RedisServer->new;
my $rnode = PostgreSQL::Test::Cluster->new('settings_reload_redis');
$rnode->init(extra => [ '--encoding=UTF8', '--locale=C' ]);
$rnode->append_conf(
	'postgresql.conf', qq{
shared_preload_libraries = 'dwh'
dwh.redis_url = '@{[ $redis->url ]}'
dwh.redis_scan_pattern = 'u*'
dwh.redis_refresh_interval = 1
});

# A user value; $pad makes it longer.
sub user_value
{
	my ($key, $pad) = @_;
	return qq({"_id": "$key", "name": "Name $key@{[ 'n' x ($pad // 0) ]}", "login": "l$key"});
}

# Five users set at once (MSET), named u<prefix>1..5.
sub mset_users
{
	my ($prefix) = @_;
	$redis->cli('MSET', map { ("u$prefix$_", user_value("u$prefix$_")) } 1 .. 5);
	return;
}

# The largest number of a prefix's users written by one transaction, and
# how many transactions wrote them.
sub user_transactions
{
	my ($prefix) = @_;
	return $rnode->safe_psql('postgres',
		"SELECT max(n) || '|' || count(*) FROM (SELECT count(*) AS n FROM stg.users
		 WHERE object_id LIKE 'u$prefix%' GROUP BY xmin::text) t");
}

mset_users('a');
my $big = user_value('ulong1', 1400);
$redis->set('ulong1', $big);
$rnode->start;
$rnode->safe_psql('postgres', 'CREATE EXTENSION dwh');
ok( $rnode->poll_query_until('postgres',
		q{SELECT count(*) = 6 FROM stg.users WHERE object_id LIKE 'u%'}),
	'the Redis worker mirrors the first users');
is(user_transactions('a'), '5|1',
	'at the default dwh.redis_batch_size five users set at once are written in one transaction');
is($rnode->safe_psql('postgres', q{SELECT octet_length(payload::text) > 1400 FROM stg.users WHERE object_id = 'ulong1'}),
	't', 'at the default dwh.redis_max_value_size a user of 1,500 bytes is mirrored');

reload_setting($rnode, 'dwh.redis_batch_size', '2');
mset_users('b');
ok( $rnode->poll_query_until('postgres',
		q{SELECT count(*) = 5 FROM stg.users WHERE object_id LIKE 'ub%'}),
	'the next five users are mirrored');
like(user_transactions('b'), qr/^[12]\|[3-5]$/,
	'after the reload to 2 they are written two at most by a transaction');

reload_setting($rnode, 'dwh.redis_max_value_size', '1kB');
reload_setting($rnode, 'dwh.dead_letter_keep_bytes', '100B');
$redis->set('ulong2', user_value('ulong2', 1400));
ok( $rnode->poll_query_until('postgres',
		q{SELECT EXISTS (SELECT FROM dwh.dead_letters WHERE source_key = 'ulong2')}),
	'after the reload to 1 kB a user of 1,500 bytes is dead-lettered');
is( $rnode->safe_psql('postgres',
		q{SELECT sqlstate || '|' || length(raw) || '|' || raw_length || '|' || reason
		  FROM dwh.dead_letters WHERE source_key = 'ulong2'}),
	'54000|100|' . length(user_value('ulong2', 1400))
	  . '|value of ' . length(user_value('ulong2', 1400))
	  . ' bytes exceeds dwh.redis_max_value_size (1024 bytes)',
	'with SQLSTATE 54000, keeping the reloaded dwh.dead_letter_keep_bytes');
is($rnode->safe_psql('postgres', q{SELECT count(*) FROM stg.users WHERE object_id = 'ulong2'}),
	'0', 'and it is not in STG');
$rnode->stop;
$redis->stop;

done_testing();
