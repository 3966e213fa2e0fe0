# Kafka positions named by a SQL caller never suppress what the Kafka
# worker later reads there.  A loader (EXECUTE on dwh.ingest_orders only)
# first stores bad values and another event at the positions of messages
# not produced yet; then the real messages arrive through the worker: each
# is stored under the worker's own identity, the loader's rows stay as
# they were, the counts are honest, a rewind (dwh.kafka_seek) is
# recognised as a replay, and a refused value is kept as a bounded prefix
# with its length and hash.

use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;

use DwhTest;
use PostgreSQL::Test::Utils;
use Test::More;

my $broker = start_broker(partitions => 1);
my $topic = $broker->{topic};
my $node = new_dwh_node('kafka_forged', 'dwh.kafka_consumers' => 1);

sub psql { return $node->safe_psql('postgres', $_[0]) }

# The loader of the README.
psql(
	q{CREATE ROLE loader LOGIN;
	  GRANT USAGE ON SCHEMA dwh TO loader;
	  GRANT EXECUTE ON FUNCTION dwh.ingest_orders(bytea[], text, integer[], bigint[]) TO loader;}
);
sub as_loader
{
	my ($sql) = @_;
	return $node->safe_psql('postgres', $sql, extra_params => [ '-U', 'loader' ]);
}

my @forged = ('forged 0', '{"object_type": "ping", "forged": 1}', 'forged 2', 'forged 3');
my $forged_call =
	"SELECT received, applied, unchanged, other_type, dead_lettered, replayed, mismatched
	 FROM dwh.ingest_orders(ARRAY["
  . join(', ', map { "convert_to('$_', 'UTF8')" } @forged)
  . "], '$topic', ARRAY[0, 0, 0, 0], ARRAY[0, 1, 2, 3])";

# 1. The loader names the positions 0 to 3 before the producer writes them.
is(as_loader($forged_call), '4|0|0|1|3|0|0',
	'the forged call stores one other event and three dead letters');

# 2. The real messages: two bad values, another event and a value of
#    100,000 bytes that is not JSON (more than dwh.dead_letter_keep_bytes).
my $tmp = $PostgreSQL::Test::Utils::tmp_check;
my $big = 'x' x 100000;
open(my $fh, '>', "$tmp/forged.txt") or die;
print $fh "real bad 0\n", qq({"object_type": "ping", "real": 1}\n), "real bad 2\n", "$big\n";
close($fh);
produce($broker, "$tmp/forged.txt");

psql("ALTER SYSTEM SET dwh.kafka_brokers = '$broker->{bootstrap}'; SELECT pg_reload_conf()");
ok(wait_applied($node, 4), 'the worker applies the four messages');

my $stored_sql = q{
SELECT string_agg(s, E'\n' ORDER BY s) FROM (
    SELECT format('dead_letter %s %s %s %s %s', source, kafka_offset,
                  left(convert_from(raw, 'UTF8'), 12), raw_length, position_mismatch) AS s
    FROM dwh.dead_letters
    UNION ALL
    SELECT format('other_event %s %s %s %s', source, kafka_offset, message->>'object_type',
                  position_mismatch)
    FROM stg.other_events) x};
my $expected = join("\n",
	'dead_letter kafka 0 real bad 0 10 f',
	'dead_letter kafka 2 real bad 2 10 f',
	'dead_letter kafka 3 xxxxxxxxxxxx 100000 f',
	'dead_letter sql 0 forged 0 8 f',
	'dead_letter sql 2 forged 2 8 f',
	'dead_letter sql 3 forged 3 8 f',
	'other_event kafka 1 ping f',
	'other_event sql 1 ping f');
is(psql($stored_sql), $expected,
	'every message the worker read is stored beside the forged ones, none hidden');
is(psql(q{SELECT sum(dead_letters) FROM dwh.status WHERE worker LIKE 'kafka%'}),
	'3', 'dwh.status counts the three dead letters the worker stored');
is( psql(
		q{SELECT length(raw), raw_sha256 = sha256(convert_to(repeat('x', 100000), 'UTF8'))
		  FROM dwh.dead_letters WHERE source = 'kafka' AND kafka_offset = 3}),
	'65536|t',
	'the long refused value keeps 64 kB, its length and the hash of all of it');

# 3. A rewind: the worker reads the four messages again and recognises
#    each as a replay (same source, position and bytes).
my $before = psql('SELECT sum(messages) FROM dwh.status');
psql('SELECT dwh.kafka_seek(0, 0)');
ok(wait_for($node, "SELECT sum(messages) >= $before + 4 FROM dwh.status"),
	'partition 0 read again');
ok(wait_for($node,
		'SELECT next_offset = 4 AND NOT seek_requested FROM dwh.kafka_offsets WHERE kafka_partition = 0'),
	'partition 0 back at its end');
is(psql($stored_sql), $expected, 'the replayed messages are not stored twice');

# 4. The loader again: the same bytes are replays; the worker's bytes at
#    its own forged positions are other messages, kept and flagged.
is(as_loader($forged_call), '4|0|0|0|0|4|0', 'the same forged call is four replays');
is( as_loader(
		"SELECT received, other_type, dead_lettered, replayed, mismatched
		 FROM dwh.ingest_orders(ARRAY[convert_to('real bad 0', 'UTF8')], '$topic', ARRAY[0], ARRAY[0])"),
	'1|0|1|0|1',
	'other bytes at a position the loader used: stored and counted as a mismatch');
is( psql(
		q{SELECT count(*) FILTER (WHERE position_mismatch) || '/' || count(*)
		  FROM dwh.dead_letters WHERE source = 'sql' AND kafka_offset = 0}),
	'1/2', "both of the loader's rows at offset 0 are kept, the second flagged");

# 5. The truncated dead letter is not replayed.
is( psql(
		q{SELECT outcome FROM dwh.replay_dead_letters(
		      ARRAY(SELECT id FROM dwh.dead_letters WHERE source = 'kafka' AND kafka_offset = 3))}),
	'truncated', 'a dead letter holding a prefix only is refused by the replay');
is(psql(q{SELECT count(*) FROM dwh.dead_letters WHERE source = 'kafka' AND kafka_offset = 3}),
	'1', 'and stays');

check_consistent($node, 'at the end');
$node->stop;
done_testing();
