# The offsets the workers commit to Kafka are for monitoring only: where a
# partition goes on is the offset stored in the database, in the
# transaction of each batch.  A DBA (or a tool) that resets the consumer
# group's committed offsets, back to the start or past the end, while the
# server is down, changes nothing: after the restart no message already
# applied is read again, and none produced meanwhile is skipped.

use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;

use DwhTest;
use PostgreSQL::Test::Utils;
use IPC::Run;
use Test::More;

# A real broker: librdkafka's mock cluster refuses a commit from outside
# a group it has known (UNKNOWN_MEMBER_ID), as a broker does not once the
# group is empty.
my $partitions = 2;
my $broker = start_broker(partitions => $partitions);
my $node = new_dwh_node(
	'group_offsets',
	'dwh.kafka_consumers' => 1,
	'dwh.kafka_brokers' => $broker->{bootstrap});
load_dictionaries($node);
my $tmp = $PostgreSQL::Test::Utils::tmp_check;

generate_orders("$tmp/group.txt", '--count 3000 --seed 43',
	"--manifest $tmp/group.json");
my $manifest = read_manifest("$tmp/group.json");
my @chunks = split_stream("$tmp/group.txt", $manifest, 3);
my $produced = 0;

sub produce_next
{
	my $chunk = shift @chunks;
	produce($broker, $chunk->{file});
	$produced += $chunk->{messages};
	return $chunk->{messages};
}

# Commit offsets for group "dwh" as a tool outside the group would: where
# is "start" (0) or "end" (each partition's high watermark).
sub commit_group_offsets
{
	my ($where) = @_;
	my $script = <<'PY';
import sys
from confluent_kafka import Consumer, TopicPartition
bootstrap, topic, partitions, where = sys.argv[1:5]
c = Consumer({'bootstrap.servers': bootstrap, 'group.id': 'dwh',
              'enable.auto.commit': False})
offsets = []
for p in range(int(partitions)):
    low, high = c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
    offsets.append(TopicPartition(topic, p, 0 if where == 'start' else high))
c.commit(offsets=offsets, asynchronous=False)
got = c.committed([TopicPartition(topic, p) for p in range(int(partitions))], timeout=10)
print(' '.join(str(t.offset) for t in got))
c.close()
PY
	my $file = "$tmp/commit_offsets.py";
	open(my $fh, '>', $file) or die "could not write $file: $!";
	print $fh $script;
	close $fh;
	# The group takes a commit from outside once the workers have left it:
	# retry until then.
	my ($out, $err) = ('', '');
	my $deadline = time() + $PostgreSQL::Test::Utils::timeout_default;
	while (time() < $deadline)
	{
		IPC::Run::run([ '/usr/bin/python3', $file, $broker->{bootstrap}, $broker->{topic}, $partitions, $where ],
			'>', \$out, '2>', \$err);
		last if $? == 0;
		sleep(1);
	}
	die "could not commit the group's offsets: $err" if $? != 0;
	chomp $out;
	note("group dwh committed offsets now: $out");
	return $out;
}

# The messages the worker read since the server started, once its status
# has counted at least $least (it counts a batch after its commit).
sub messages_since_start
{
	my ($least) = @_;
	wait_for($node,
		"SELECT messages >= $least FROM dwh.status WHERE worker = 'kafka 1'");
	return $node->safe_psql('postgres',
		"SELECT messages FROM dwh.status WHERE worker = 'kafka 1'");
}

produce_next();
ok(wait_applied($node, $produced), 'the first chunk is applied');

# Back to the start: nothing is read again.
$node->stop;
is(commit_group_offsets('start'), join(' ', (0) x $partitions),
	'the group committed offsets are 0');
$node->start;
my $second = produce_next();
ok(wait_applied($node, $produced), 'the second chunk is applied after the restart');
is(messages_since_start($second), $second,
	"only the $second new messages were read, not the first chunk again");

# Past the end, with new messages produced while the server is down:
# none is skipped.
$node->stop;
my $third = produce_next();
commit_group_offsets('end');
$node->start;
ok(wait_applied($node, $produced), 'the third chunk is applied, none skipped');
is(messages_since_start($third), $third, "exactly its $third messages were read");

my ($first, $last) = @{ $manifest->{object_ids} }{qw(first last)};
is($node->safe_psql('postgres', 'SELECT count(*) FROM stg.order_events'),
	$last - $first + 1, 'every order in STG once');
check_consistent($node, 'group offsets reset');
check_manifest_counts($node, $manifest, 'group offsets reset');

$node->stop;
broker_command('stop', $broker->{dir});
done_testing();
