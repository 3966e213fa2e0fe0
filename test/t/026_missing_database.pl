# A dwh.database that does not exist is waited for, not a crash loop: the
# workers fail to connect once (one FATAL each), then wait connected to no
# database, say so in dwh.status, and connect once the database exists.
# (They used to FATAL and be restarted every 5 seconds, silently.)

use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep);

my $node = PostgreSQL::Test::Cluster->new('missing_database');
$node->init(extra => [ '--encoding=UTF8', '--locale=C' ]);
$node->append_conf('postgresql.conf', <<'EOC');
shared_preload_libraries = 'dwh'
dwh.database = 'warehouse'
dwh.kafka_consumers = 1
dwh.kafka_brokers = '127.0.0.1:9'
EOC
$node->start;
$node->safe_psql('postgres', 'CREATE EXTENSION dwh');

sub states
{
	return $node->safe_psql('postgres',
		q{SELECT string_agg(worker || ': ' || state, E'\n' ORDER BY worker) FROM dwh.status});
}

sub wait_states
{
	my ($want) = @_;
	my $deadline = time() + $PostgreSQL::Test::Utils::timeout_default;
	while (time() < $deadline)
	{
		return 1 if states() eq $want;
		usleep(200_000);
	}
	diag("states:\n" . states());
	return 0;
}

my $waiting = qq{waiting: database "warehouse" (dwh.database) does not exist};
ok(wait_states("kafka 1: $waiting\nredis: $waiting\ntags: $waiting"),
	'the workers wait for the database, and dwh.status says why');

# Over three restart intervals (bgw_restart_time is 5 s), no new FATAL.
my $fatals = sub {
	my $log = slurp_file($node->logfile);
	return scalar(() = $log =~ /FATAL:  database "warehouse" does not exist/g);
};
my $before = $fatals->();
sleep(16);
is($fatals->(), $before, 'no FATAL while waiting');
ok($before <= 3, "one failed connection per worker at most ($before)");
like(states(), qr/^kafka 1: \Q$waiting\E\nredis: \Q$waiting\E\ntags: \Q$waiting\E$/,
	'still waiting, still shown');

# The database appears: the workers connect (and find no extension there).
$node->safe_psql('postgres', 'CREATE DATABASE warehouse');
ok( wait_states(qq{kafka 1: waiting: extension dwh is not created in database "warehouse"\n}
		  . qq{redis: idle: dwh.redis_url is empty\n}
		  . qq{tags: waiting: extension dwh is not created in database "warehouse"}),
	'once the database exists, the workers connect to it');

# dwh.database renamed to another missing database, then back.
$node->safe_psql('postgres', q{ALTER SYSTEM SET dwh.database = 'elsewhere'});
$node->reload;
my $elsewhere = qq{waiting: database "elsewhere" (dwh.database) does not exist};
ok(wait_states("kafka 1: $elsewhere\nredis: $elsewhere\ntags: $elsewhere"),
	'a new dwh.database that does not exist is waited for too');
$node->safe_psql('postgres', q{ALTER SYSTEM SET dwh.database = 'warehouse'});
$node->reload;
ok( wait_states(qq{kafka 1: waiting: extension dwh is not created in database "warehouse"\n}
		  . qq{redis: idle: dwh.redis_url is empty\n}
		  . qq{tags: waiting: extension dwh is not created in database "warehouse"}),
	'set back to an existing database, the workers connect without a restart of the server');

$node->stop;
done_testing();
