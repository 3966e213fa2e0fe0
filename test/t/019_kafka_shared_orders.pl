# Two Kafka workers applying versions of the same orders at once.  Every
# message of the stream reaches all four partitions, so the two workers'
# batches always share orders.  The messages of an order the other worker
# is applying are kept for the worker's next batch (src/dwh_inflight.c)
# instead of making the whole batch wait on its row for that worker's
# commit.  The test asserts that this happened, that every message is
# applied and counted once, that the marts are exact and that nothing
# deadlocked; that each offset stored meanwhile comes with the SHA-256 of
# the message before it (a batch may store an offset after a message that
# the batch before applied); then it does it again while a worker is killed
# (SIGKILL) six times: a crash while messages are kept fetches them again,
# from the offsets stored.  The first run receives the stream in parts a
# tenth of a second apart, which the two workers apply side by side (for
# one part a session holds stg.order_events, so that they must meet), and
# closes its batches by their data (dwh.kafka_prefetch_memory of 1 MB: an
# eighth of it, about 150 messages, before dwh.kafka_batch_size); the
# second finds it whole and closes them by their count.

use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;

use Digest::SHA qw(sha256_hex);
use DwhTest;
use IPC::Run;
use Time::HiRes qw(time usleep);
use PostgreSQL::Test::Utils;
use Test::More;

my $broker = start_broker(partitions => 4);
my $tmp = $PostgreSQL::Test::Utils::tmp_check;

# Every line of $file once to each of the four partitions of $topic, the
# partitions side by side; in $chunks parts when given, with a call of
# $between after each one but the last.
sub produce_everywhere
{
	my ($file, $topic, $chunks, $between) = @_;
	my @lines = split /^/m, slurp_file($file);
	$chunks //= 1;
	my $per = int((@lines + $chunks - 1) / $chunks);
	my $n = 0;
	while (my @part = splice(@lines, 0, $per))
	{
		my $part_file = "$file.part" . $n++;
		unlink $part_file;
		append_to_file($part_file, join('', @part));
		my @kcat;
		foreach my $p (0 .. 3)
		{
			push @kcat,
			  IPC::Run::start([
				'kcat', '-P', '-q', '-b', $broker->{bootstrap},
				'-t', $topic, '-p', $p, '-l', $part_file ]);
		}
		foreach (@kcat)
		{
			$_->finish or die "kcat could not produce $part_file";
		}
		$between->() if $between && @lines;
	}
	return;
}

# A server with two workers on a topic of its own that holds the stream
# four times; $kills SIGKILLs of a worker on the way; %settings more.
sub run_stream
{
	my ($name, $seed, $kills, %settings) = @_;
	my $topic = "orders_$name";
	broker_command('create-topic', $broker->{dir}, $topic, 4);
	my $node = new_dwh_node(
		"kafka_shared_$name",
		'dwh.kafka_consumers' => 2,
		'dwh.kafka_batch_size' => 200,
		'dwh.kafka_topic' => $topic,
		%settings);
	load_dictionaries($node);
	# The workers say at DEBUG1 when they leave messages to a second
	# transaction.
	$node->append_conf('postgresql.conf', "log_min_messages = debug1\n");
	$node->reload;

	generate_orders("$tmp/$name.txt", "--count 4000 --seed $seed --malformed 0",
		'--duplicates 0.05 --status-changes 0.1 --out-of-order 0.05',
		'--reversals 0.05', "--manifest $tmp/$name.json");
	my $manifest = read_manifest("$tmp/$name.json");
	my $total = 4 * $manifest->{messages};

	# Both workers own their partitions, then the stream reaches all four
	# side by side: they fetch it at the same moment.  Without kills, in 20
	# parts a tenth of a second apart, so that each worker applies each
	# part as it comes, side by side with the other.  (Started on the full
	# topic, on a busy machine one worker could start half a second after
	# the other and stay a batch behind it for the whole stream: the other
	# had always committed an order before it came to it, and nothing was
	# kept.)
	$node->safe_psql('postgres',
		"ALTER SYSTEM SET dwh.kafka_brokers = '$broker->{bootstrap}'; SELECT pg_reload_conf()");
	ok( wait_for($node,
			"SELECT count(*) = 2 AND bool_and(cardinality(partitions) = 2) FROM dwh.status WHERE worker LIKE 'kafka%'"
		),
		"$name: each worker owns two partitions");
	# Each partition holds the lines in file order: the message at offset k
	# is line k + 1.  Until the stream is applied, every stored offset must
	# come with the message before it, its offset and SHA-256 (no
	# transactions, no markers between): sampled between the
	# parts produced (for a tenth of a second) and until the end.
	my @lines = split /\n/, slurp_file("$tmp/$name.txt");
	my ($samples, $wrong) = (0, '');
	my $sample = sub {
		foreach my $row (split /\n/,
			$node->safe_psql('postgres',
				"SELECT kafka_partition, next_offset, coalesce(last_offset, -1),
				        coalesce(encode(last_sha256, 'hex'), 'null')
				 FROM dwh.kafka_offsets WHERE topic = '$topic' AND next_offset > 0"))
		{
			my ($p, $next, $last, $sha) = split /\|/, $row;
			$samples++;
			$wrong ||= "partition $p at $next: $last $sha"
			  if $last != $next - 1 || $sha ne sha256_hex($lines[$last]);
		}
		usleep(20_000);
	};
	if ($kills == 0)
	{
		# Side by side, the two workers usually meet on the same orders,
		# but nothing makes them: one can finish each part before the
		# other takes it.  For one part they must meet: a session holds
		# stg.order_events while it is produced.  The first worker to take
		# the part marks its orders and waits for the table; the other
		# finds them marked and keeps them (ten batches, then waits too).
		# Both waiting, the table goes.
		my ($part, $holder, $log_offset) = (0, undef, 0);
		my $between = sub {
			$part++;
			if ($part == 10)
			{
				# Both idle first: each takes the next part from its start.
				my $per = int((@lines + 19) / 20);
				ok( wait_for($node,
						"SELECT coalesce(sum(next_offset), 0) >= 4 * $per * 10 FROM dwh.kafka_offsets WHERE topic = '$topic'"),
					"$name: half the stream applied");
				$log_offset = -s $node->logfile;
				$holder = $node->background_psql('postgres');
				$holder->query_safe('BEGIN; LOCK TABLE stg.order_events IN SHARE MODE;');
			}
			elsif ($part == 11)
			{
				ok( wait_for($node,
						"SELECT count(*) = 2 FROM pg_stat_activity a JOIN dwh.status s USING (pid)
						 WHERE s.worker LIKE 'kafka%' AND a.wait_event_type = 'Lock'"),
					"$name: both workers wait with the same part while the table is held");
				$holder->query_safe('ROLLBACK;');
				$holder->quit;
				# Usually while the table is held; a worker whose batch waited
				# for another lock first (a dish named for the first time
				# takes the dictionary lock exclusive) keeps them once the
				# table goes.
				ok( $node->wait_for_log(
						qr/messages of orders another worker is applying kept for the next batch/,
						$log_offset),
					"$name: and one of them kept the orders the other was applying");
			}
			my $until = time() + 0.1;
			$sample->() while time() < $until;
		};
		produce_everywhere("$tmp/$name.txt", $topic, 20, $between);
		my $deadline = time() + $PostgreSQL::Test::Utils::timeout_default;
		$sample->() while stored_total($node, $topic) < $total && time() < $deadline;
		cmp_ok($samples, '>', 0, "$name: stored offsets sampled while the stream was applied");
		is($wrong, '',
			"$name: each stored offset came with the SHA-256 of the message before it ($samples samples)");
	}
	else
	{
		produce_everywhere("$tmp/$name.txt", $topic);
	}

	foreach my $k (1 .. $kills)
	{
		my $goal = int($k * $total / ($kills + 1));
		ok(wait_for($node, "SELECT coalesce(sum(next_offset), 0) >= $goal FROM dwh.kafka_offsets"),
			"$name: $k of " . ($kills + 1) . ' parts of the stream applied');
		my $victim = $node->safe_psql('postgres',
			"SELECT pid FROM dwh.status WHERE worker = 'kafka 1'");
		note("$name: killing worker $victim at " . stored_total($node, $topic) . " of $total");
		kill 'KILL', $victim;
		ok( wait_for($node,
				"SELECT count(*) = 2 FROM dwh.status WHERE pid IS NOT NULL AND pid <> $victim AND worker LIKE 'kafka%'"
			),
			"$name: workers back after kill $k");
	}

	ok(wait_applied($node, $total, $topic), "$name: every message applied");
	my $left = 0;
	my $log = slurp_file($node->logfile);
	$left += $1
	  while $log =~ /(\d+) messages of orders another worker is applying kept for the next batch/g;
	ok($left > 0,
		"$name: orders the other worker was applying kept for the next batch ($left messages)");
	is($node->safe_psql('postgres', 'SELECT count(*) FROM stg.order_events'),
		$manifest->{object_ids}{count}, "$name: each order in STG once");
	unlike($log, qr/deadlock detected/,
		"$name: the workers never deadlocked");
	check_consistent($node, $name);
	check_manifest_counts($node, $manifest, $name);
	if ($kills == 0)
	{
		is( $node->safe_psql('postgres',
				"SELECT sum(messages) FROM dwh.status WHERE worker LIKE 'kafka%'"),
			$total, "$name: each message counted once by the workers");
	}
	$node->stop;
	return;
}

run_stream('calm', 21, 0, 'dwh.kafka_prefetch_memory' => '1MB');
run_stream('killed', 22, 6);

broker_command('stop', $broker->{dir});
done_testing();
