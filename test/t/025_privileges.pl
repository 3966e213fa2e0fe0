# The README's role recipes, run as written, and what each role must not
# be able to do.  The recipes (the SQL block of the README's "Security"
# section) are read from README.md itself, so a recipe that does not run,
# or that grants more than it says, fails here.  Besides the analyst, the
# loader, the operator, the tag editor and Prometheus's exporter (which
# must read the counts it exports, and neither the rows behind them nor
# the secret settings), two roles that dwh must also resist: the owner of
# the database where the extension lives, and a role with no grants.
#
# Each attempt must fail with the SQLSTATE listed (42501, insufficient
# privilege, almost always), and then nothing must have changed: the
# vault, the marts, the dead letters, the offsets and the settings are
# compared before and after all the attempts.  What each role may do is
# checked too, so that a test of refusals cannot pass by refusing
# everything.

use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;

use DwhTest qw(dwh_root);
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $node = PostgreSQL::Test::Cluster->new('privileges');
$node->init(extra => [ '--encoding=UTF8', '--locale=C' ]);
$node->append_conf('postgresql.conf',
	"shared_preload_libraries = 'dwh'\n");
$node->start;

# The database owner owns the database the warehouse lives in; a
# superuser created the extension there, as the README says.
$node->safe_psql('postgres', 'CREATE ROLE dbowner LOGIN CREATEROLE');
$node->safe_psql('postgres', 'CREATE DATABASE warehouse OWNER dbowner');
$node->safe_psql('warehouse', 'CREATE EXTENSION dwh');

# The README's recipes, as written.
my $readme = slurp_file(dwh_root() . '/README.md');
my ($security) = $readme =~ /^## Security\n(.*?)^## /ms;
my ($recipes) = ($security // '') =~ /```sql\n(.*?CREATE ROLE analyst.*?)```/s;
ok(defined $recipes, "README's Security section has the role recipes");
$recipes //= '';
foreach my $role ('analyst', 'loader', 'operator', 'tagger', 'prometheus')
{
	like($recipes, qr/CREATE ROLE $role\b/, "the recipes create role $role");
}
my ($ret, $out, $err) = $node->psql('warehouse', $recipes, on_error_stop => 1);
is($ret, 0, "the README's recipes run as written") or diag($err);
$node->safe_psql('warehouse', 'CREATE ROLE nobody LOGIN');

# Some data for the roles to try to read or spoil.
my $order = sub {
	my ($id, $user, $status, $ts) = @_;
	return qq{{"object_id": $id, "object_type": "order", "sent_dttm": "$ts", "payload": {"restaurant": {"id": "r1"}, "date": "$ts", "user": {"id": "$user"}, "order_items": [{"id": "d1", "name": "Плов", "price": 100, "quantity": 1}], "bonus_payment": 0, "cost": 100, "payment": 100, "bonus_grant": 0, "statuses": [{"status": "$status", "dttm": "$ts"}], "final_status": "$status", "update_ts": "$ts"}}};
};
$node->safe_psql('warehouse',
	"SELECT dwh.ingest_order(\$m\$" . $order->(1, 'u1', 'CLOSED', '2023-01-01 10:00:00') . "\$m\$::text)");
$node->safe_psql('warehouse', q{SELECT dwh.ingest_order('not json'::text)});
$node->safe_psql('warehouse', q{SELECT dwh.kafka_seek(0, 5, 'orders')});

# Everything an attempt could spoil, as one text.
sub state_of
{
	return $node->safe_psql('warehouse', q{
SELECT string_agg(x, E'\n' ORDER BY x) FROM (
  SELECT 'stg.order_events ' || object_id || ' ' || payload::text FROM stg.order_events
  UNION ALL SELECT 'stg.users ' || count(*) FROM stg.users
  UNION ALL SELECT 'dds.h_order ' || count(*) FROM dds.h_order
  UNION ALL SELECT 'dds.h_product ' || count(*) FROM dds.h_product
  UNION ALL SELECT 'mart ' || user_id || ' ' || product_name || ' ' || order_cnt
            FROM cdm.user_product_counters
  UNION ALL SELECT 'rule ' || tag || ' ' || kind || ' ' || threshold || ' '
                   || coalesce(window_as_of::text, '') FROM dwh.tag_rules
  UNION ALL SELECT 'tag ' || user_id || ' ' || tag || ' ' || order_cnt || ' ' || since
            FROM cdm.user_tags
  UNION ALL SELECT 'tag event ' || id || ' ' || tag || ' ' || kind FROM cdm.user_tag_events
  UNION ALL SELECT 'dead letter ' || id || ' ' || encode(raw, 'escape') FROM dwh.dead_letters
  UNION ALL SELECT 'offset ' || topic || ' ' || kafka_partition || ' ' || next_offset
            FROM dwh.kafka_offsets
  UNION ALL SELECT 'function ' || p.oid::regprocedure || ' ' || md5(p.prosrc) || ' '
                   || p.proowner::regrole || ' ' || p.prosecdef
            FROM pg_proc p WHERE p.pronamespace = 'dwh'::regnamespace
  UNION ALL SELECT 'trigger ' || tgrelid::regclass || ' ' || tgname || ' ' || tgenabled::text
            FROM pg_trigger WHERE NOT tgisinternal
  UNION ALL SELECT 'schema ' || nspname || ' ' || nspowner::regrole
            FROM pg_namespace WHERE nspname IN ('dwh', 'stg', 'dds', 'cdm')
  UNION ALL SELECT 'superusers ' || string_agg(rolname, ',' ORDER BY rolname)
            FROM pg_roles WHERE rolsuper
  UNION ALL SELECT 'setting ' || coalesce(array_to_string(setconfig, ','), '')
            FROM pg_db_role_setting
) s(x)});
}
my $before = state_of();

# One attempt: the role runs the SQL; the error's SQLSTATE must be one of
# @codes (or the statement must succeed when @codes is ('ok')).
sub attempt
{
	my ($role, $sql, @codes) = @_;
	my ($ret, $out, $err) = $node->psql('warehouse', $sql,
		extra_params => [ '-U', $role, '-v', 'VERBOSITY=sqlstate' ]);
	my $got = $ret == 0 ? 'ok' : ($err =~ /ERROR:\s+([0-9A-Z]{5})/ ? $1 : "exit $ret: $err");
	ok((grep { $_ eq $got } @codes), "$role: $sql -> " . join('/', @codes))
	  or diag("got $got; stderr: $err");
	return $out;
}

my $ingest = "SELECT applied FROM dwh.ingest_orders(ARRAY[convert_to(\$m\$"
  . $order->(2, 'u2', 'CLOSED', '2023-01-02 10:00:00') . "\$m\$, 'UTF8')])";

# What each role is for works.
is(attempt('analyst', 'SELECT count(*) FROM cdm.user_product_counters', 'ok'),
	'1', 'analyst reads the marts');
attempt('analyst', 'SELECT count(*) FROM dds.h_order', 'ok');
is(attempt('loader', $ingest, 'ok'), '1', 'loader ingests through the entry point');
attempt('operator', 'SELECT count(*) FROM dwh.status', 'ok');
attempt('operator', 'SELECT count(*) FROM dwh.dead_letters', 'ok');
is(attempt('operator', 'SELECT count(*) FROM dwh.verify()', 'ok'), '0',
	'operator runs dwh.verify()');
is(attempt('operator', 'SELECT count(*) FROM dwh.verify(4)', 'ok'), '0',
	'operator runs dwh.verify() in parts');
attempt('operator', 'SELECT count(*) FROM dwh.kafka_partitions', 'ok');
attempt('tagger', q{INSERT INTO dwh.tag_rules (tag, kind, threshold, window_days)
                    VALUES ('regular', 'all_orders', 1, 30), ('any', 'all_orders', 1, NULL)}, 'ok');
attempt('tagger', q{UPDATE dwh.tag_rules SET threshold = 2 WHERE tag = 'any'}, 'ok');
attempt('tagger', q{DELETE FROM dwh.tag_rules WHERE tag = 'any'}, 'ok');
is(attempt('tagger', 'SELECT count(*) FROM dwh.tag_rule_problems', 'ok'), '0',
	"tagger reads the rules' problems");
is(attempt('prometheus', 'SELECT count(*) FROM dwh.status', 'ok'),
	$node->safe_psql('warehouse', 'SELECT count(*) FROM dwh.status'),
	'prometheus reads dwh.status');
attempt('prometheus', 'SELECT count(*) FROM dwh.kafka_partitions', 'ok');
is(attempt('prometheus', 'SELECT current_setting(\'statement_timeout\')', 'ok'), '10s',
	'prometheus statements time out');
is(attempt('analyst', 'SELECT count(*) FROM cdm.user_tags', 'ok'), '0',
	'analyst reads the tags (none: the orders are older than the window)');
is(attempt('analyst', q{SELECT string_agg(tag || ' ' || kind, ', ' ORDER BY id) FROM cdm.user_tag_events}, 'ok'),
	'any grant, any grant, any revoke, any revoke', 'analyst reads the tag events');
is(attempt('prometheus', q{SELECT string_agg(kind || ' ' || events, ', ' ORDER BY kind) FROM dwh.tag_event_counts}, 'ok'),
	'grant 2, revoke 2', 'prometheus reads the counts of tag events');
# Tags held, so that the view's lookups run for the roles that read it (a
# view's functions run with its reader's rights): a dish rule's count is
# read by the dish's key (dwh.hash_key), a windowed one's by
# dwh.all_orders_key().
attempt('tagger', q{INSERT INTO dwh.tag_rules (tag, kind, product_id, threshold, window_days)
                    VALUES ('plov', 'dish', 'd1', 1, NULL), ('century', 'all_orders', NULL, 1, 36500)}, 'ok');
foreach my $role ('analyst', 'tagger')
{
	is( attempt(
			$role, q{SELECT string_agg(tag || ' ' || order_cnt, ', ' ORDER BY tag, user_id) FROM cdm.user_tags},
			'ok'),
		'century 1, century 1, plov 1, plov 1',
		"$role reads the tags held, with their counts");
}
is(attempt('analyst', q{SELECT tag FROM cdm.user_tags WHERE user_id = dwh.hash_key('u1') ORDER BY tag}, 'ok'),
	"century\nplov", "analyst reads a user's tags by the key of the user's id, as the README does");

# A role that can only connect holds the keys of dwh's locks (public
# constants) with pg_advisory_lock(), which PUBLIC may call, exclusive and
# shared.  dwh's locks are other ones (src/dwh_locks.c): an order, a rule
# change, a direct write of a user and dwh.rebuild() go on.
my $squatter = $node->background_psql('warehouse', extra_params => [ '-U', 'nobody' ]);
$squatter->query_safe(q{
SELECT pg_advisory_lock(k), pg_advisory_lock_shared(k), pg_advisory_lock((k >> 32)::int4, ((k << 32) >> 32)::int4)
FROM unnest(ARRAY[7238964021746305793, 7238964021746305794, 3482019573612840177]::bigint[]) k});
is( $node->safe_psql('warehouse',
		q{SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted
		  AND pid <> pg_backend_pid()}),
	'9', 'the role holds the three keys of dwh\'s locks, three ways each');
$node->safe_psql('warehouse', "SET statement_timeout = '10s'; SELECT dwh.ingest_order(\$m\$"
	  . $order->(3, 'u3', 'CLOSED', '2023-01-03 10:00:00') . "\$m\$::text)");
$node->safe_psql('warehouse', q{SET statement_timeout = '10s';
INSERT INTO dwh.tag_rules (tag, kind, threshold) VALUES ('anyone', 'all_orders', 1);
INSERT INTO stg.users (object_id, payload)
VALUES ('u3', '{"_id": "u3", "name": "Вера", "login": "vera", "update_ts_utc": "2023-01-03 10:00:00"}');
SELECT count(*) FROM dwh.rebuild();});
is( $node->safe_psql('warehouse',
		q{SELECT count(*) FROM cdm.user_tags WHERE tag = 'anyone'}),
	'3', 'writers did not wait for it: the order, the rule and its tags are in');
$squatter->quit;
$before = state_of();

# What no role but a superuser may do, tried by each of them.
my @roles = ('analyst', 'loader', 'operator', 'tagger', 'prometheus', 'dbowner', 'nobody');
my @forbidden = (
	[ q{INSERT INTO stg.order_events (object_id, object_type, sent_dttm, payload) VALUES (9, 'order', now(), '{}')}, '42501' ],
	[ q{UPDATE stg.order_events SET payload = '{}'}, '42501' ],
	[ q{INSERT INTO stg.users (object_id, payload) VALUES ('x', '{}')}, '42501' ],
	[ q{DELETE FROM cdm.user_product_counters}, '42501' ],
	[ q{UPDATE cdm.user_product_counters SET order_cnt = 100}, '42501' ],
	[ q{TRUNCATE dds.h_order CASCADE}, '42501' ],
	[ q{INSERT INTO dds.h_user (h_user_pk, user_id, load_dt, load_src) VALUES (gen_random_uuid(), 'x', now(), 'x')}, '42501' ],
	[ q{DELETE FROM dwh.dead_letters}, '42501' ],
	[ q{UPDATE dwh.kafka_offsets SET next_offset = 0}, '42501' ],
	[ q{SELECT dwh.kafka_seek(0, 0, 'orders')}, '42501' ],
	[ q{SELECT * FROM dwh.rebuild()}, '42501' ],
	[ q{INSERT INTO cdm.user_tags_held (user_id, tag) VALUES (gen_random_uuid(), 'x')}, '42501' ],
	[ q{UPDATE cdm.user_tags_held SET value = 'x'}, '42501' ],
	[ q{DELETE FROM cdm.user_tag_events}, '42501' ],
	[ q{UPDATE dwh.tag_rules SET window_as_of = now()}, '42501' ],
	[ q{TRUNCATE dwh.tag_rules}, '42501' ],
	[ q{SELECT * FROM dwh.expire_tags()}, '42501' ],
	[ q{SELECT dwh.rebuild_tags()}, '42501' ],
	[ q{SELECT dwh.refresh_user_tags(ARRAY[gen_random_uuid()], ARRAY['regular'])}, '42501' ],
	[ q{SELECT dwh.recompute_rule_tags(ARRAY['regular'])}, '42501' ],
	[ q{SELECT * FROM dwh.replay_dead_letters()}, '42501' ],
	[ q{SELECT dwh.ingest_order('x'::text)}, '42501' ],
	[ q{SELECT dwh.ingest_dead_letter('x', 'kafka', 'orders', 0, 7)}, '42501' ],
	[ q{SET dwh.max_message_size = '64MB'}, '42501' ],
	[ q{SET dwh.dead_letter_keep_bytes = '1GB'}, '42501' ],
	[ q{SET dwh.max_order_items = 100000}, '42501' ],
	[ q{SHOW dwh.kafka_options}, '42501' ],
	[ q{SHOW dwh.redis_url}, '42501' ],
	[ q{ALTER SYSTEM SET dwh.database = 'other'}, '42501' ],
	[ q{CREATE OR REPLACE FUNCTION dwh.hash_key(text) RETURNS uuid LANGUAGE sql AS 'SELECT NULL::uuid'}, '42501' ],
	[ q{CREATE FUNCTION dwh.evil() RETURNS int LANGUAGE sql AS 'SELECT 1'}, '42501' ],
	[ q{ALTER SCHEMA dwh RENAME TO dwh_old}, '42501' ],
	[ q{ALTER FUNCTION dwh.verify() RENAME TO verify_old}, '42501' ],
	[ q{ALTER TABLE cdm.user_product_counters RENAME TO counters_old}, '42501' ],
	[ q{ALTER TABLE stg.order_events DISABLE TRIGGER USER}, '42501' ],
	[ q{ALTER FUNCTION dwh.verify() SECURITY INVOKER}, '42501' ],
	[ q{COMMENT ON TABLE stg.order_events IS 'mine'}, '42501' ],
	[ q{DROP EXTENSION dwh}, '42501' ],
	[ q{ALTER EXTENSION dwh UPDATE}, '42501' ],
	[ q{CREATE EVENT TRIGGER evil ON ddl_command_start EXECUTE FUNCTION dwh.verify()}, '42501' ],
	[ q{LOAD 'dwh'}, '42501' ],
	[ q{SELECT pg_catalog.set_config('dwh.dead_letter_keep_bytes', '1GB', false)}, '42501' ],
	# Granting oneself what one lacks: no error, no privilege (checked below).
	[ q{GRANT SELECT ON dwh.dead_letters TO PUBLIC}, 'ok', '42501' ],
	[ q{GRANT EXECUTE ON FUNCTION dwh.rebuild(boolean) TO PUBLIC}, 'ok', '42501' ],
);
foreach my $role (@roles)
{
	foreach my $f (@forbidden)
	{
		my ($sql, @codes) = @$f;
		attempt($role, $sql, @codes);
	}
}

# README, "Secrets": the secret settings are readable by superusers and
# members of pg_read_all_settings.
$node->safe_psql('warehouse', 'CREATE ROLE settings_reader LOGIN IN ROLE pg_read_all_settings');
attempt('settings_reader', 'SHOW dwh.redis_url', 'ok');
attempt('settings_reader', 'SHOW dwh.kafka_options', 'ok');

# What a role has no grant for, by role.
attempt('analyst', 'SELECT count(*) FROM stg.order_events', '42501');
attempt('analyst', 'SELECT count(*) FROM dwh.dead_letters', '42501');
attempt('analyst', $ingest, '42501');
attempt('analyst', 'SELECT count(*) FROM dwh.status', '42501');
attempt('loader', 'SELECT count(*) FROM cdm.user_product_counters', '42501');
attempt('loader', 'SELECT count(*) FROM dwh.dead_letters', '42501');
attempt('loader', 'SELECT count(*) FROM stg.order_events', '42501');
attempt('operator', $ingest, '42501');
attempt('operator', 'SELECT count(*) FROM stg.order_events', '42501');
attempt('nobody', 'SELECT count(*) FROM cdm.user_product_counters', '42501');
attempt('nobody', 'SELECT count(*) FROM dwh.status', '42501');
attempt('nobody', 'SELECT count(*) FROM dwh.verify()', '42501');
attempt('nobody', $ingest, '42501');
attempt('dbowner', 'SELECT count(*) FROM dwh.dead_letters', '42501');
attempt('dbowner', $ingest, '42501');
attempt('dbowner', 'SELECT count(*) FROM cdm.user_product_counters', '42501');
attempt('analyst', q{INSERT INTO dwh.tag_rules (tag, kind) VALUES ('x', 'all_orders')}, '42501');
attempt('analyst', q{DELETE FROM dwh.tag_rules}, '42501');
attempt('loader', q{INSERT INTO dwh.tag_rules (tag, kind) VALUES ('x', 'all_orders')}, '42501');
attempt('operator', q{DELETE FROM dwh.tag_rules}, '42501');
attempt('dbowner', q{INSERT INTO dwh.tag_rules (tag, kind) VALUES ('x', 'all_orders')}, '42501');
attempt('nobody', 'SELECT count(*) FROM cdm.user_tags', '42501');
attempt('tagger', 'SELECT count(*) FROM stg.order_events', '42501');
attempt('tagger', 'SELECT count(*) FROM dwh.dead_letters', '42501');
attempt('tagger', $ingest, '42501');
# The exporter's role reads the counts, not the users, the rows or the secrets.
attempt('prometheus', 'SELECT count(*) FROM cdm.user_tag_events', '42501');
attempt('prometheus', 'SELECT count(*) FROM cdm.user_product_counters', '42501');
attempt('prometheus', 'SELECT count(*) FROM dwh.dead_letters', '42501');
attempt('prometheus', 'SELECT count(*) FROM dwh.kafka_gaps', '42501');
attempt('prometheus', 'SELECT count(*) FROM dwh.redis_keys', '42501');
attempt('prometheus', 'SELECT count(*) FROM stg.order_events', '42501');
attempt('prometheus', 'SELECT count(*) FROM dwh.verify()', '42501');
attempt('prometheus', $ingest, '42501');
attempt('tagger', q{INSERT INTO dwh.tag_rules (tag, kind, window_days, window_as_of)
                    VALUES ('x', 'all_orders', 1, now())}, '42501');

# The database owner can change its database's settings: none that a
# superuser-only or reload setting of dwh would take, and its search_path
# does not reach the definer functions (test/t/023_search_path_trap.pl
# plants look-alikes there).
attempt('dbowner', q{ALTER DATABASE warehouse SET dwh.max_message_size = '64MB'}, '42501');
attempt('dbowner', q{ALTER DATABASE warehouse SET dwh.redis_url = 'redis://evil'}, '55P02');
attempt('dbowner', q{ALTER DATABASE warehouse SET dwh.database = 'other'}, '55P02');
attempt('dbowner', q{ALTER ROLE loader SET dwh.dead_letter_keep_bytes = '1GB'}, '42501');

is(state_of(), $before, 'after every attempt, nothing has changed');

$node->stop;
done_testing();
