# Exactly once through crashes: a stream of 100,000 orders is consumed by
# two workers while one worker is killed with SIGKILL (the postmaster then
# restarts every process) and later the whole server is stopped with
# pg_ctl -m immediate.  Afterwards every produced order is in STG once and
# the marts hold exactly the counts the generator computed: nothing lost,
# nothing counted twice.

use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;

use DwhTest;
use PostgreSQL::Test::Utils;
use Test::More;

my $broker = start_broker(partitions => 4);
my $node = new_dwh_node(
	'kafka_once',
	'dwh.kafka_consumers' => 2,
	'dwh.kafka_brokers' => $broker->{bootstrap});
load_dictionaries($node);

my $tmp = $PostgreSQL::Test::Utils::tmp_check;
generate_orders("$tmp/orders.txt", '--count 100000 --seed 11',
	'--duplicates 0.03 --status-changes 0.03 --reversals 0.02 --malformed 0.001',
	"--manifest $tmp/orders.json");
my $manifest = read_manifest("$tmp/orders.json");
my $total = $manifest->{messages};
produce($broker, "$tmp/orders.txt");

# SIGKILL one worker in the middle of the stream.
ok(wait_for($node, "SELECT coalesce(sum(next_offset), 0) >= $total / 5 FROM dwh.kafka_offsets"),
	'a fifth of the stream applied');
my $victim = $node->safe_psql('postgres',
	"SELECT pid FROM dwh.status WHERE worker = 'kafka 1'");
my $before_kill = stored_total($node);
kill 'KILL', $victim;
note("killed worker $victim with $before_kill of $total messages applied");
ok(wait_for($node, "SELECT count(*) = 2 FROM dwh.status WHERE pid IS NOT NULL AND pid <> $victim AND state = 'consuming'"),
	'workers consume again after the crash restart');

# Stop the server with no shutdown at all, in the middle of the stream.
ok(wait_for($node, "SELECT coalesce(sum(next_offset), 0) >= $before_kill + $total / 5 FROM dwh.kafka_offsets"),
	'the stream goes on');
my $before_stop = stored_total($node);
$node->stop('immediate');
note("immediate shutdown with $before_stop of $total messages applied");
$node->start;

ok(wait_applied($node, $total), 'every message applied after the crashes');
is($node->safe_psql('postgres', 'SELECT count(*) FROM stg.order_events'),
	$manifest->{object_ids}{count}, 'every produced order in STG once');
is( $node->safe_psql('postgres',
		"SELECT count(*) FROM stg.order_events WHERE object_id NOT BETWEEN $manifest->{object_ids}{first} AND $manifest->{object_ids}{last}"
	),
	'0', 'no order STG should not have');
is($node->safe_psql('postgres', "SELECT count(*) FROM dwh.dead_letters"),
	$manifest->{malformed}, 'each malformed message dead-lettered once');
check_consistent($node, 'after the crashes');
check_manifest_counts($node, $manifest, 'after the crashes');

$node->stop;
broker_command('stop', $broker->{dir});
done_testing();
