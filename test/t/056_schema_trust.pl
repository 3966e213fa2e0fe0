# Only superusers may change what dwh's schemas hold.  dwh's functions run
# as a superuser (the definer functions, and everything the workers call)
# and call one another by name: a role that may create objects in schema
# dwh could add an overload that a call resolves to (a varchar argument
# prefers dwh.menu_name_at(varchar, ...) to the extension's (text, ...)),
# and a role handed the schema and its functions (REASSIGN OWNED) could
# rewrite them.  Each way is tried by alice, an ordinary role, who tries to
# make herself superuser: CREATE EXTENSION refuses a schema she may create
# objects in; once installed, a grant of CREATE, an object she made there,
# a trusted extension she created there, or the extension's objects handed
# to her stop the ingest (42501, saying what to fix) and the workers, until
# a superuser puts things right.

use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;

use DwhTest;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $node = PostgreSQL::Test::Cluster->new('schema_trust');
$node->init(extra => [ '--encoding=UTF8', '--locale=C' ]);
$node->append_conf(
	'postgresql.conf', q{
shared_preload_libraries = 'dwh'
dwh.tags_expire_interval = '1s'
});
$node->start;

sub psql { return $node->safe_psql('postgres', $_[0]); }

sub alice_is_superuser
{
	return psql(q{SELECT rolsuper FROM pg_roles WHERE rolname = 'alice'});
}

my $n_orders = 0;

# A superuser's ingest of a new order: its outcome, or the error.
sub ingest
{
	$n_orders++;
	my ($ret, $out, $err) = $node->psql(
		'postgres',
		qq{\\set VERBOSITY verbose
SELECT dwh.ingest_order(\$m\${"object_id": $n_orders, "object_type": "order", "sent_dttm": "2023-04-01 20:00:00", "payload": {"restaurant": {"id": "r1"}, "date": "2023-04-01 20:00:00", "user": {"id": "u1"}, "order_items": [{"id": "d1", "name": "Плов", "price": 100, "quantity": 1}], "bonus_payment": 0, "cost": 100, "payment": 100, "bonus_grant": 0, "statuses": [], "final_status": "CLOSED", "update_ts": "2023-04-01 20:00:00"}}\$m\$::text)}
	);
	return $ret == 0 ? $out : $err;
}

# The tags worker's state and last error, once they match.
sub wait_tags_worker
{
	my ($pattern, $name) = @_;
	my $deadline = time() + $PostgreSQL::Test::Utils::timeout_default;
	my $seen = '';
	while (time() < $deadline)
	{
		$seen = psql(
			q{SELECT state || ' | ' || coalesce(last_error, '') FROM dwh.status WHERE worker = 'tags'});
		last if $seen =~ $pattern;
		select(undef, undef, undef, 0.2);
	}
	like($seen, $pattern, $name);
	return;
}

psql(q{
CREATE ROLE admin2 SUPERUSER LOGIN;
CREATE ROLE alice LOGIN;
CREATE SCHEMA dwh AUTHORIZATION admin2;
GRANT CREATE ON SCHEMA dwh TO alice;
});

# 1. Before the install: a schema dwh that alice may create objects in.
my ($ret, $out, $err) = $node->psql('postgres',
	"\\set VERBOSITY verbose\nSET ROLE admin2; CREATE EXTENSION dwh");
isnt($ret, 0, 'CREATE EXTENSION refuses a schema dwh another role may create objects in');
like($err, qr/ERROR:  42501: role alice may create objects in schema dwh, and is not a superuser/,
	'the error names the role, with SQLSTATE 42501');
like($err, qr/HINT:  Run REVOKE CREATE ON SCHEMA dwh FROM alice, then CREATE EXTENSION dwh again\./,
	'and says what to do');
psql('REVOKE CREATE ON SCHEMA dwh FROM alice; SET ROLE admin2; CREATE EXTENSION dwh');
psql(q{INSERT INTO dwh.tag_rules (tag, kind, threshold, window_days)
       VALUES ('recent', 'all_orders', 1, 30)});
is(ingest(), 'applied', 'once revoked, the extension installs and an order is applied');
wait_tags_worker(qr/^expiring tags every 1 s \| $/, 'the tags worker expires tags');

# 2. A grant of CREATE after the install, and alice's overload: the call
# of dwh.place_order_namings() on a varchar column would resolve to it.
psql('GRANT CREATE ON SCHEMA dwh TO alice');
$node->safe_psql(
	'postgres', q{
SET ROLE alice;
CREATE FUNCTION dwh.menu_name_at(product_id varchar, at timestamp) RETURNS text
LANGUAGE plpgsql AS $$
BEGIN
    IF (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
        EXECUTE 'ALTER ROLE alice SUPERUSER';
    END IF;
    RETURN NULL;
END $$;
});
my $refused = ingest();
like($refused, qr/ERROR:  42501: dwh does not run while role alice may create objects in schema dwh, and is not a superuser/,
	'with CREATE granted to alice, a superuser\'s ingest is refused (42501)');
like($refused, qr/HINT:  Run REVOKE CREATE ON SCHEMA dwh FROM alice; dwh goes on by itself\./,
	'the hint says what to do');
wait_tags_worker(qr/may create objects in schema dwh/,
	'the tags worker stops and says why');

# 3. Revoked, but her function stays in the schema.
psql('REVOKE CREATE ON SCHEMA dwh FROM alice');
like(ingest(),
	qr/ERROR:  42501: dwh does not run while function dwh\.menu_name_at\(character varying,timestamp without time zone\) is owned by role alice, which is not a superuser/,
	'an object alice made there while she could is refused too, by name');
wait_tags_worker(qr/dwh\.menu_name_at.* is owned by role alice/,
	'and stops the tags worker');
is(alice_is_superuser(), 'f', 'alice is not superuser');

psql('DROP FUNCTION dwh.menu_name_at(varchar, timestamp)');
is(ingest(), 'applied', 'once her function is dropped, orders are applied again');
wait_tags_worker(qr/^expiring tags every 1 s \| /, 'and the tags worker goes on by itself');
is(psql('SELECT count(*) FROM dwh.verify()'), '0', 'dwh.verify() is empty');

# 3b. A trusted extension alice creates in schema dwh: its objects belong
# to the bootstrap superuser, the extension (and so its updates and its
# removal) to her.
psql('GRANT CREATE ON DATABASE postgres TO alice');
$node->safe_psql('postgres', 'SET ROLE alice; CREATE EXTENSION pgcrypto SCHEMA dwh');
like(ingest(),
	qr/ERROR:  42501: dwh does not run while extension pgcrypto is owned by role alice, which is not a superuser/,
	'an extension alice created in schema dwh is refused');
$node->safe_psql('postgres', 'SET ROLE alice; DROP EXTENSION pgcrypto');
psql('REVOKE CREATE ON DATABASE postgres FROM alice');
is(ingest(), 'applied', 'once it is dropped, orders are applied again');

# 4. Everything admin2 owns (the schemas, functions and tables of the
# extension) handed to alice, who rewrites what the tags worker calls.
psql('REASSIGN OWNED BY admin2 TO alice');
$node->safe_psql(
	'postgres', q{
SET ROLE alice;
CREATE OR REPLACE FUNCTION dwh.expire_tags(OUT rules_moved integer, OUT events integer)
LANGUAGE plpgsql SECURITY INVOKER AS $$
BEGIN
    IF (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
        EXECUTE 'ALTER ROLE alice SUPERUSER';
    END IF;
    rules_moved := 0;
    events := 0;
END $$;
});
wait_tags_worker(qr/schema dwh is owned by role alice, which is not a superuser/,
	'handed to alice, the schemas stop the tags worker');
like(ingest(), qr/ERROR:  42501: dwh does not run while schema dwh is owned by role alice/,
	'and the ingest');
sleep(3);
is(alice_is_superuser(), 'f', 'alice is still not superuser: her dwh.expire_tags() never ran');

$node->stop;
done_testing();
