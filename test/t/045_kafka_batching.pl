# How a Kafka worker sizes its batches (README, "Kafka consumers":
# dwh.kafka_batch_size and dwh.kafka_batch_wait), one worker on one
# partition of a mock cluster:
#
#  1. A backlog is applied in batches of at most dwh.kafka_batch_size
#     messages, nearly all of them full.
#  2. With dwh.kafka_batch_wait 0 (the default) a trickle is applied
#     message by message: five messages 800 ms apart make five batches.
#  3. With a positive dwh.kafka_batch_wait a batch waits that long after its
#     first message: five messages 100 ms apart make one batch.
#  4. A batch that reaches dwh.kafka_batch_size does not wait for the rest
#     of dwh.kafka_batch_wait.
#
# dwh.status.apply_time, the time the worker spent applying batches, grows
# with every batch and stays below the time since the worker started; it is
# NULL for the workers that are not Kafka's, and starts from 0 again with
# the worker's process, as the other counters do.  last_batch_at is NULL
# before a worker's first batch and the time of its last commit after.
#
# Every message is applied once; at the end the marts are those the
# generator expects and dwh.verify() is empty.

use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;

use DwhTest;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep);

my $backlog = 2500;
my $mock = start_mock_cluster(brokers => 1, partitions => 1);
my $node = new_dwh_node(
	'kafka_batching',
	'dwh.kafka_consumers' => 1,
	'dwh.kafka_batch_size' => 100,
	# The mock broker answers a fetch with nothing to send only when its
	# wait is over, not when a message arrives meanwhile as a broker does:
	# a short wait keeps messages 800 ms apart in fetches of their own.
	'dwh.kafka_options' => 'fetch.wait.max.ms=10');
load_dictionaries($node);
my $tmp = $PostgreSQL::Test::Utils::tmp_check;

# Valid orders only, each sent once: a message is an order.
generate_orders("$tmp/batching.txt", "--count " . ($backlog + 13),
	'--seed 45 --clean', "--manifest $tmp/batching.json");
my $manifest = read_manifest("$tmp/batching.json");
my @lines = split /^/m, slurp_file("$tmp/batching.txt");
is(scalar @lines, $backlog + 13, 'one message an order');

sub write_lines
{
	my ($name, @part) = @_;
	my $file = "$tmp/$name";
	open(my $fh, '>', $file) or die "could not write $file: $!";
	binmode $fh;
	print $fh @part;
	close $fh;
	return $file;
}

sub psql { return $node->safe_psql('postgres', $_[0]); }

# The worker's time spent applying batches so far (ms), and whether it is
# below the time since the worker started.
sub apply_time
{
	return split /\|/,
	  psql(q{SELECT apply_time || '|' || (apply_time < 1000 * extract(epoch FROM now() - started_at)) FROM dwh.status WHERE worker = 'kafka 1'});
}

# The worker's batches and messages so far.
sub counts
{
	my ($batches, $messages) = split /\|/,
	  psql(q{SELECT batches || '|' || messages FROM dwh.status WHERE worker = 'kafka 1'});
	return ($batches, $messages);
}

sub reload
{
	my ($setting, $value) = @_;
	ok(set_and_reload($node, $setting, $value), "$setting is now '$value'");
	return;
}

# Produce the messages one by one, $gap_ms apart, without waiting for them
# to be applied.
sub trickle
{
	my ($gap_ms, @part) = @_;
	foreach my $i (0 .. $#part)
	{
		usleep($gap_ms * 1000) if $i > 0;
		produce($mock, write_lines("single.$i", $part[$i]));
	}
	return;
}

# 1. The backlog is in the topic before the worker has a broker.
is(psql(q{SELECT last_batch_at IS NULL FROM dwh.status WHERE worker = 'kafka 1'}),
	't', 'last_batch_at is NULL before the first batch');
produce($mock, write_lines('backlog', @lines[ 0 .. $backlog - 1 ]));
my $before_backlog = psql('SELECT clock_timestamp()');
reload('dwh.kafka_brokers', $mock->{bootstrap});
ok(wait_applied($node, $backlog), "the backlog of $backlog messages is applied");
is( psql(qq{SELECT last_batch_at > '$before_backlog' AND last_batch_at <= clock_timestamp()
            AND last_batch_at >= (SELECT max(updated_at) FROM dwh.kafka_offsets)
            FROM dwh.status WHERE worker = 'kafka 1'}),
	't', 'last_batch_at is when the last batch committed');
my ($batches, $messages) = counts();
is($messages, $backlog, 'each message once');
cmp_ok($batches, '>=', $backlog / 100,
	"no batch holds more than dwh.kafka_batch_size (100) messages ($batches batches)");
cmp_ok($batches, '<=', 1.5 * $backlog / 100,
	'and nearly all are full: a backlog is not applied in small batches');
my ($time1, $below1) = apply_time();
cmp_ok($time1, '>', 0, "the worker spent time applying them ($time1 ms)");
is($below1, 'true', 'less than the time since it started');
is( psql(q{SELECT string_agg(worker || ' ' || coalesce(apply_time::text, 'null'), ', ' ORDER BY worker) FROM dwh.status WHERE worker NOT LIKE 'kafka%'}),
	'redis null, tags null', 'apply_time is NULL for the Redis and tags workers');

# 2. A trickle with dwh.kafka_batch_wait 0.
my $applied = $backlog;
trickle(800, @lines[ $backlog .. $backlog + 4 ]);
$applied += 5;
ok(wait_applied($node, $applied), 'five messages 800 ms apart are applied');
my ($b2, $m2) = counts();
is($m2 - $messages, 5, 'each once');
is($b2 - $batches, 5, 'in five batches: none waited for the next message');
my ($time2, $below2) = apply_time();
cmp_ok($time2, '>', $time1, "applying them took time too ($time2 ms in all)");
is($below2, 'true', 'still less than the time since the worker started');

# 3. A batch waits dwh.kafka_batch_wait after its first message.
reload('dwh.kafka_batch_wait', '3s');
trickle(100, @lines[ $backlog + 5 .. $backlog + 9 ]);
$applied += 5;
ok(wait_applied($node, $applied), 'five messages 100 ms apart are applied');
my ($b3, $m3) = counts();
is($m3 - $m2, 5, 'each once');
is($b3 - $b2, 1, 'in one batch, which waited for them');

# 4. A full batch is applied without waiting: three messages with
# dwh.kafka_batch_size 3 and 20 s of dwh.kafka_batch_wait.
reload('dwh.kafka_batch_size', '3');
reload('dwh.kafka_batch_wait', '20s');
produce($mock, write_lines('full', @lines[ $backlog + 10 .. $backlog + 12 ]));
$applied += 3;
ok(wait_applied($node, $applied, undef, 10),
	'a batch that reaches dwh.kafka_batch_size is applied long before dwh.kafka_batch_wait');
my ($b4, $m4) = counts();
is($b4 - $b3, 1, 'in one batch');

# A worker started again counts from 0, apply_time too.
my $pid = psql(q{SELECT pid FROM dwh.status WHERE worker = 'kafka 1'});
psql("SELECT pg_terminate_backend($pid)");
ok( wait_for($node,
		"SELECT pid <> $pid AND state = 'consuming' FROM dwh.status WHERE worker = 'kafka 1'"),
	'the worker terminated is started again');
is(psql(q{SELECT batches || ' ' || messages || ' ' || apply_time || ' ' || (last_batch_at IS NULL) FROM dwh.status WHERE worker = 'kafka 1'}),
	'0 0 0 true', 'its counters start from 0: batches, messages, apply_time; last_batch_at is NULL');

check_manifest_counts($node, $manifest, 'at the end');
is(psql('SELECT count(*) FROM dwh.verify()'), '0', 'dwh.verify() is empty');

$node->stop;
stop_mock_cluster($mock);
done_testing();
