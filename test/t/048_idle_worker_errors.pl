# A Kafka worker that owns no partition (more workers than partitions)
# clears its error once the broker is back, as the worker that owns the
# partition does (README, "Status and lag": last_error is what keeps the
# worker from its work now).  It has no batch to apply, so only its
# recovery probe can clear it; it asked the leader of a partition it owns
# and, owning none, never asked: dwh_worker_error stayed 1 and the
# DwhKafkaWorkerFailing alert fired for good.
#
# A real broker with one partition and two workers: orders applied, the
# broker stopped until both workers show an error, started again; both
# errors clear and both workers say "consuming", and new orders are
# applied.  Then, with the broker stopped again, dwh.kafka_brokers is
# emptied: idle on purpose, the workers show no error (the alert would
# fire for good on a worker disabled on purpose).

use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;

use DwhTest;
use PostgreSQL::Test::Utils;
use Test::More;

my $tmp = $PostgreSQL::Test::Utils::tmp_check;
my $broker = start_broker(partitions => 1);
my $node = new_dwh_node(
	'idle_worker_errors',
	'dwh.kafka_consumers' => 2,
	'dwh.kafka_brokers' => $broker->{bootstrap});
load_dictionaries($node);

sub psql { return $node->safe_psql('postgres', $_[0]); }

generate_orders("$tmp/idle_first.txt", '--count 20 --seed 48 --clean',
	"--manifest $tmp/idle_first.json");
my $first = read_manifest("$tmp/idle_first.json")->{messages};
produce($broker, "$tmp/idle_first.txt");
ok(wait_applied($node, $first), "the first $first messages are applied");
is( psql(
		q{SELECT string_agg(coalesce(cardinality(partitions), 0)::text, ' ' ORDER BY cardinality(partitions)) FROM dwh.status WHERE worker LIKE 'kafka%'}
	),
	'0 1',
	'one worker owns the partition, the other none');
my $idle = psql(
	q{SELECT worker FROM dwh.status WHERE worker LIKE 'kafka%' AND cardinality(partitions) = 0});

# The broker stopped: both workers show an error.
broker_command('stop', $broker->{dir});
ok( wait_for($node,
		q{SELECT count(*) = 2 FROM dwh.status WHERE worker LIKE 'kafka%' AND last_error IS NOT NULL}),
	'with the broker stopped, both workers show an error');

# The broker back: both errors clear, the idle worker's too.
broker_command('restart', $broker->{dir});
ok( wait_for($node,
		q{SELECT count(*) = 2 FROM dwh.status WHERE worker LIKE 'kafka%' AND last_error IS NULL AND state = 'consuming'},
		60),
	'with the broker back, both errors clear and both workers are consuming')
  or diag(psql(q{SELECT worker, state, partitions, last_error FROM dwh.status WHERE worker LIKE 'kafka%'}));
is(psql("SELECT last_error IS NULL FROM dwh.status WHERE worker = '$idle'"),
	't', "$idle, which owns no partition, has no error left");

generate_orders("$tmp/idle_more.txt", '--count 20 --seed 49 --clean --first-id 6000000',
	"--manifest $tmp/idle_more.json");
my $more = read_manifest("$tmp/idle_more.json")->{messages};
produce($broker, "$tmp/idle_more.txt");
ok(wait_applied($node, $first + $more), "the $more new messages are applied");
is(psql('SELECT count(*) FROM dwh.verify()'), '0', 'dwh.verify() is empty');

# The broker stopped again, then the workers told to do nothing
# (dwh.kafka_brokers emptied): no error keeps them from their work, and
# the errors shown while the broker was away are cleared.
broker_command('stop', $broker->{dir});
ok( wait_for($node,
		q{SELECT count(*) = 2 FROM dwh.status WHERE worker LIKE 'kafka%' AND last_error IS NOT NULL}),
	'with the broker stopped again, both workers show an error');
ok(set_and_reload($node, 'dwh.kafka_brokers', ''), 'dwh.kafka_brokers emptied');
ok( wait_for($node,
		q{SELECT count(*) = 2 FROM dwh.status WHERE worker LIKE 'kafka%' AND state = 'idle: dwh.kafka_brokers is empty' AND last_error IS NULL AND last_error_at IS NULL}),
	'idle on purpose, both workers show no error')
  or diag(psql(q{SELECT worker, state, last_error FROM dwh.status WHERE worker LIKE 'kafka%'}));

$node->stop;
done_testing();
