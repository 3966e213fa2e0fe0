# pg_upgrade of a cluster whose workers consume (README, "Upgrade"): the
# workers are not started while pg_upgrade runs the old and the new server
# in binary-upgrade mode; the data, the stored offsets and the dead letters
# are carried over with the files; and the new cluster's workers go on from
# the stored offsets.  Both servers of pg_upgrade have dwh preloaded and a
# broker holding messages not yet applied: a worker started on the old one
# would apply them before its files are copied, one started on the new one
# would write into files about to be replaced.  The one PostgreSQL version
# installed here upgrades to itself, which runs the same binary-upgrade
# path as an upgrade to a newer major version.

use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;

use DwhTest;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $tmp = $PostgreSQL::Test::Utils::tmp_check;
my $mock = start_mock_cluster(brokers => 1, partitions => 2);

# DEBUG1 logs each background worker the postmaster starts.
my $old = new_dwh_node(
	'upgrade_old',
	'dwh.kafka_consumers' => 1,
	'log_min_messages' => 'debug1');
load_dictionaries($old);

# Malformed lines too: their dead letters must be carried over.
generate_orders("$tmp/upgrade.txt", '--count 600 --seed 46 --malformed 0.03',
	"--manifest $tmp/upgrade.json");
my $manifest = read_manifest("$tmp/upgrade.json");
my ($applied, $pending) = split_stream("$tmp/upgrade.txt", $manifest, 2);
produce($mock, $applied->{file});
ok(set_and_reload($old, 'dwh.kafka_brokers', $mock->{bootstrap}),
	'the old cluster gets the broker');
ok(wait_applied($old, $applied->{messages}),
	"the old cluster applies the first $applied->{messages} messages");
check_consistent($old, 'old cluster');

# What pg_upgrade must carry over, row for row.
my $state_query = q{
	SELECT (SELECT string_agg(format('%s/%s: %s %s %s', topic, kafka_partition,
									 next_offset, last_offset, encode(last_sha256, 'hex')),
							  ', ' ORDER BY topic, kafka_partition)
			FROM dwh.kafka_offsets),
		   (SELECT count(*) || ' orders, ' || sum(hashtext(payload::text))
			FROM stg.order_events),
		   (SELECT count(*) || ' dead letters, ' || sum(hashtext(reason))
			FROM dwh.dead_letters),
		   (SELECT sum(order_cnt) FROM cdm.user_product_counters),
		   (SELECT sum(order_cnt) FROM cdm.user_category_counters)};
my $state_before = $old->safe_psql('postgres', $state_query);
ok($applied->{malformed} > 0, 'the applied half holds malformed messages');
is($old->safe_psql('postgres', 'SELECT count(*) FROM dwh.dead_letters'),
	$applied->{malformed}, 'the old cluster holds their dead letters');
$old->stop;

# Messages the old cluster never applied; the broker stays reachable from
# both of pg_upgrade's servers (the old one's postgresql.auto.conf, the new
# one's postgresql.conf).
produce($mock, $pending->{file});

my $new = PostgreSQL::Test::Cluster->new('upgrade_new');
$new->init(extra => [ '--encoding=UTF8', '--locale=C' ]);
$new->append_conf('postgresql.conf',
		"shared_preload_libraries = 'dwh'\n"
	  . "log_min_messages = debug1\n"
	  . "dwh.kafka_consumers = 1\n"
	  . "dwh.kafka_brokers = '$mock->{bootstrap}'\n");

my $bindir = $old->config_data('--bindir');
chdir $tmp;
command_ok(
	[
		'pg_upgrade', '--no-sync', '--retain',
		'-d', $old->data_dir, '-D', $new->data_dir,
		'-b', $bindir, '-B', $bindir,
		'-s', $new->host, '-p', $old->port, '-P', $new->port
	],
	'pg_upgrade of a cluster with dwh preloaded and consuming');

my @server_logs =
  glob($new->data_dir . '/pg_upgrade_output.d/*/log/pg_upgrade_server.log');
is(scalar(@server_logs), 1, "pg_upgrade's server log is kept");
my $server_log = slurp_file($server_logs[0]);
like($server_log, qr/DEBUG:/, "pg_upgrade's servers logged at DEBUG1");
unlike($server_log, qr/starting background worker process "dwh/,
	"pg_upgrade's servers started no dwh worker");

# The upgraded cluster first without the broker: what was copied, as it was.
$new->append_conf('postgresql.conf', "dwh.kafka_brokers = ''\n");
$new->start;
is($new->safe_psql('postgres', $state_query),
	$state_before, 'offsets, orders, dead letters and marts carried over as they were');
ok(wait_for($new, "SELECT count(*) = 3 FROM dwh.status"),
	'the upgraded cluster runs its three workers');
like(slurp_file($new->logfile),
	qr/starting background worker process "dwh kafka worker 1"/,
	'the upgraded server logs the start of its workers (what pg_upgrade\'s did not)');

# Then the broker: the workers go on from the stored offsets.
my $total = $applied->{messages} + $pending->{messages};
ok(set_and_reload($new, 'dwh.kafka_brokers', $mock->{bootstrap}),
	'the upgraded cluster gets the broker');
ok(wait_applied($new, $total), "every message applied once ($total)");
my %ids = (%{ $applied->{ids} }, %{ $pending->{ids} });
is($new->safe_psql('postgres', 'SELECT count(*) FROM stg.order_events'),
	scalar(keys %ids), 'every order of both halves in STG');
is( $new->safe_psql('postgres', 'SELECT count(*) FROM dwh.dead_letters'),
	$applied->{malformed} + $pending->{malformed},
	'one dead letter per malformed message of both halves');
check_consistent($new, 'upgraded cluster');

$new->stop;
stop_mock_cluster($mock);
done_testing();
