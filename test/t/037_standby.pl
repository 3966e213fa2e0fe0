# On a standby the workers wait, say why in dwh.status and log it once
# each; once the standby is promoted they work.  A streaming standby of a
# primary that has dwh, the Kafka workers pointed at a mock cluster that
# already holds orders: the standby applies none of them (it cannot
# write), the promoted server applies them all, exactly.

use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;

use DwhTest;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep);

my $mock = start_mock_cluster(brokers => 1, partitions => 2);
my $tmp = $PostgreSQL::Test::Utils::tmp_check;

my $primary = PostgreSQL::Test::Cluster->new('primary');
$primary->init(allows_streaming => 1, extra => [ '--encoding=UTF8', '--locale=C' ]);
$primary->append_conf('postgresql.conf', qq{
shared_preload_libraries = 'dwh'
log_min_messages = info
dwh.kafka_consumers = 2
});
$primary->start;
$primary->safe_psql('postgres', 'CREATE EXTENSION dwh');
$primary->safe_psql('postgres', 'CREATE SCHEMA t');
$primary->safe_psql('postgres', slurp_file(dwh_root() . '/test/recount.sql'));
load_dictionaries($primary);
$primary->backup('base');

my $standby = PostgreSQL::Test::Cluster->new('standby');
$standby->init_from_backup($primary, 'base', has_streaming => 1);
# The workers of the standby have somewhere to go: the mock cluster and a
# Redis that does not answer.
$standby->append_conf('postgresql.conf', qq{
dwh.kafka_brokers = '$mock->{bootstrap}'
dwh.redis_url = 'redis://127.0.0.1:9/0'
});
$standby->start;

generate_orders("$tmp/standby.txt", '--count 2000 --seed 37',
	"--manifest $tmp/standby.json");
my $manifest = read_manifest("$tmp/standby.json");
my $messages = () = slurp_file("$tmp/standby.txt") =~ /\n/g;
produce($mock, "$tmp/standby.txt");

my $states_query =
  q{SELECT string_agg(worker || ': ' || state, E'\n' ORDER BY worker) FROM dwh.status};
my $waiting = 'waiting: the server is a standby';
my $want = join("\n", map { "$_: $waiting" } ('kafka 1', 'kafka 2', 'redis', 'tags'));

sub wait_states
{
	my ($node, $check) = @_;
	my $deadline = time() + $PostgreSQL::Test::Utils::timeout_default;
	my $states;
	while (time() < $deadline)
	{
		$states = $node->safe_psql('postgres', $states_query);
		return 1 if $check->($states);
		usleep(200_000);
	}
	diag("states:\n$states");
	return 0;
}

ok(wait_states($standby, sub { $_[0] eq $want }),
	'on the standby every worker waits, and dwh.status says why');
is( $standby->safe_psql(
		'postgres', 'SELECT count(*) FROM dwh.status WHERE last_error IS NOT NULL'),
	'0', 'waiting on a standby is no error');

# Over two of the workers' rechecks (every 5 s), the reason is logged
# once each.
sleep(11);
my $logged = () = slurp_file($standby->logfile) =~ /LOG:  \Q$waiting\E/g;
is($logged, 4, 'the reason is logged once per worker');
is($standby->safe_psql('postgres', 'SELECT count(*) FROM stg.order_events'),
	'0', 'the standby applied nothing');

$standby->promote;
ok(wait_states($standby, sub { $_[0] !~ /standby/ }),
	'once promoted, no worker waits any more');
ok(wait_applied($standby, $messages), "the promoted server applies all $messages messages");
check_consistent($standby, 'promoted standby');
check_manifest_counts($standby, $manifest, 'promoted standby');

$standby->stop;
$primary->stop;
stop_mock_cluster($mock);
done_testing();
