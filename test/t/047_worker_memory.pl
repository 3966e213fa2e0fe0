# A Kafka worker's memory whatever the backlog (README, "Kafka consumers",
# "Memory"): its private memory stays below 32 MB + 5 times
# dwh.kafka_prefetch_memory + work_mem, and a batch is applied once its
# data reaches an eighth of dwh.kafka_prefetch_memory, whatever
# dwh.kafka_batch_size allows.  One worker, with batches allowed 100,000
# messages, drains a backlog larger than its prefetch memory, at the least
# prefetch memory (1 MB, the backlog over twenty times it) and at the
# default (16 MB), and its RssAnon (private anonymous memory: heap,
# librdkafka's queues; not shared_buffers) is sampled every 20 ms.  (Eight
# partitions: the mock broker keeps at most 5 MB of each.)

use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;

use DwhTest;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep);

my $work_mem_kb = 4096;
my $tmp = $PostgreSQL::Test::Utils::tmp_check;

generate_orders("$tmp/memory.txt", '--count 32000 --seed 47 --clean',
	"--manifest $tmp/memory.json");
my $manifest = read_manifest("$tmp/memory.json");
my @lines = split /^/m, slurp_file("$tmp/memory.txt");
my ($bytes, $longest) = (0, 0);
foreach my $line (@lines)
{
	my $len = length($line) - 1;
	$bytes += $len;
	$longest = $len if $len > $longest;
}

sub drain_and_sample
{
	my ($prefetch_kb) = @_;
	my $bound_kb = 32 * 1024 + 5 * $prefetch_kb + $work_mem_kb;
	my $label = "prefetch ${prefetch_kb}kB";

	my $mock = start_mock_cluster(brokers => 1, partitions => 8);
	my $node = new_dwh_node(
		"memory_$prefetch_kb",
		'dwh.kafka_consumers' => 1,
		'dwh.kafka_batch_size' => 100000,
		'dwh.kafka_prefetch_memory' => "${prefetch_kb}kB",
		'work_mem' => "${work_mem_kb}kB");
	load_dictionaries($node);
	produce($mock, "$tmp/memory.txt");

	my $pid = $node->safe_psql('postgres',
		"SELECT pid FROM dwh.status WHERE worker = 'kafka 1'");
	like($pid, qr/^\d+$/, "$label: the Kafka worker runs");
	my $idle_kb = rss_anon_kb($pid);
	set_and_reload($node, 'dwh.kafka_brokers', $mock->{bootstrap});

	# Sample until every message is applied.
	my ($peak_kb, $samples) = (0, 0);
	my $deadline = time() + $PostgreSQL::Test::Utils::timeout_default;
	while (time() < $deadline)
	{
		my $kb = rss_anon_kb($pid);
		die "the Kafka worker ($pid) is gone" unless defined $kb;
		$peak_kb = $kb if $kb > $peak_kb;
		$samples++;
		last if stored_total($node) == scalar(@lines);
		usleep(20_000);
	}
	is(stored_total($node), scalar(@lines), "$label: the backlog is drained");
	note("$label: RssAnon $idle_kb kB idle, peak $peak_kb kB over $samples samples; bound $bound_kb kB");
	cmp_ok($samples, '>=', 20, "$label: the drain was sampled at least twenty times");
	cmp_ok($peak_kb, '<', $bound_kb,
		"$label: private memory below 32 MB + 5 x dwh.kafka_prefetch_memory + work_mem");
	cmp_ok($peak_kb, '>', $idle_kb, "$label: the samples saw the drain (memory above idle)");

	my ($batches, $messages) = split /\|/,
	  $node->safe_psql('postgres',
		"SELECT batches || '|' || messages FROM dwh.status WHERE worker = 'kafka 1'");
	is($messages, scalar(@lines), "$label: every message counted once");
	cmp_ok($batches, '>=', int($bytes / ($prefetch_kb * 1024 / 8 + $longest)),
		"$label: batches close at an eighth of dwh.kafka_prefetch_memory ($batches batches)");
	is($node->safe_psql('postgres', 'SELECT count(*) FROM stg.order_events'),
		$manifest->{object_ids}{count}, "$label: every order in STG");
	check_consistent($node, "$label: after the drain");

	$node->stop;
	stop_mock_cluster($mock);
	return;
}

cmp_ok($bytes, '>', 20 * 1024 * 1024,
	"a backlog of $bytes bytes, over twenty times the least prefetch memory");
cmp_ok($bytes, '>', 1.5 * 16 * 1024 * 1024,
	'and over the default prefetch memory and one fetch response');
drain_and_sample(1024);
drain_and_sample(16384);

done_testing();
