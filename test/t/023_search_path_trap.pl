# A database owner does not become superuser through dwh.  The owner of
# the database the workers serve plants, in schema public and first on the
# database's search_path, look-alikes of what dwh's SQL calls (unnest for
# every array type dwh unnests, sum, now, array_agg of the types dwh
# aggregates, dwh's own function names, the = operator on uuid, text and
# bigint, < and > on timestamp); each one, called by anyone but its owner,
# makes its owner a superuser and leaves a trace.  The Redis worker then
# mirrors users and restaurants, orders go through dwh.ingest_orders,
# dwh.ingest_order and a plain upsert into STG, and a superuser writes a
# user and a restaurant into STG directly (the STG guard, a C trigger
# function, runs with the writer's search_path): no trap fires, the owner
# stays an ordinary role, and the warehouse is right.
# Also: CREATE EXTENSION refuses a schema dwh that a non-superuser created
# first (its owner could rename it and put functions of their own in its
# place).

use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use RedisServer;
use Test::More;

my $redis = RedisServer->new;
my $node = PostgreSQL::Test::Cluster->new('search_path_trap');
$node->init(extra => [ '--encoding=UTF8', '--locale=C' ]);
$node->append_conf(
	'postgresql.conf', qq{
shared_preload_libraries = 'dwh'
dwh.database = 'shop'
dwh.redis_url = '@{[ $redis->url ]}'
dwh.redis_scan_pattern = '*'
dwh.redis_refresh_interval = 1
});
$node->start;

$node->safe_psql('postgres', q{
CREATE ROLE shop_owner LOGIN;
CREATE DATABASE shop OWNER shop_owner;
});
$node->safe_psql('shop', 'CREATE EXTENSION dwh');

# The traps, created by the database owner (test/search_path_traps.sql).
$node->safe_psql('shop',
	"SET ROLE shop_owner;\n" . slurp_file("$FindBin::RealBin/../search_path_traps.sql"));
$node->safe_psql('shop',
	'SET ROLE shop_owner; ALTER DATABASE shop SET search_path = public, pg_catalog');
# The workers connect again, with the database's search_path.
$node->restart;

# Checks run from another database, or name everything with its schema:
# the traps live in shop's public, first on its search_path.
sub owner_is_superuser
{
	return $node->safe_psql('postgres',
		"SELECT rolsuper FROM pg_roles WHERE rolname = 'shop_owner'");
}

sub sprung
{
	return $node->safe_psql('shop',
		'SET search_path = pg_catalog; SELECT pg_catalog.string_agg(what || \' by \' || by_whom, \', \') FROM public.sprung');
}

is(owner_is_superuser(), 'f', 'the owner starts as an ordinary role');

# The trap works: a superuser session with the database's search_path
# that calls unnest(text[]) springs it.  (Undone right after.)
$node->safe_psql('shop', q{SELECT count(*) FROM unnest(ARRAY['a']::text[])});
is(owner_is_superuser(), 't', 'a superuser who resolves unnest through public is trapped');
# And so are the operators and aggregates planted for dwh's types.
$node->safe_psql('shop',
	q{SELECT 1::bigint = 2::bigint, '2023-01-01'::timestamp < '2023-01-02'::timestamp,
	         '2023-01-01'::timestamp > '2023-01-02'::timestamp,
	         (SELECT array_agg(x) FROM (VALUES (1::bigint)) v(x))});
is( $node->safe_psql('shop',
		q{SET search_path = pg_catalog; SELECT string_agg(DISTINCT what, ', ' ORDER BY what) FROM public.sprung}),
	'array_agg, bigint = bigint, timestamp < timestamp, timestamp > timestamp, unnest(text[])',
	'each planted operator and aggregate springs when resolved');
$node->safe_psql('postgres', 'ALTER ROLE shop_owner NOSUPERUSER');
$node->safe_psql('shop', 'SET search_path = pg_catalog; DELETE FROM public.sprung');
# The look-alikes of what an inlined SQL function would resolve: the type
# uuid, comparisons of uuid, text operators, integer arithmetic.
$node->safe_psql('shop',
	q{SELECT '00000000-0000-0000-0000-000000000000'::uuid >= '00000000-0000-0000-0000-000000000000'::uuid,
	         '00000000-0000-0000-0000-000000000000'::uuid <= '00000000-0000-0000-0000-000000000000'::uuid,
	         '00000000-0000-0000-0000-000000000000'::uuid < '00000000-0000-0000-0000-000000000000'::uuid,
	         'a'::text <> 'b'::text, 'a'::text || 'b'::text, 1 = 1, 1 + 1, 1 - 1,
	         7::bigint % 2, 1::bigint << 2, 7::bigint / 2,
	         '2023-01-01'::timestamp >= '2023-01-02'::timestamp});
is( $node->safe_psql('shop',
		q{SET search_path = pg_catalog; SELECT string_agg(DISTINCT what, ', ' ORDER BY what) FROM public.sprung}),
	'bigint % integer, bigint / integer, bigint << integer, integer + integer, integer - integer, '
	  . 'integer = integer, text <> text, text || text, the type uuid, timestamp >= timestamp, '
	  . 'uuid < uuid, uuid <= uuid, uuid >= uuid',
	'and so does each look-alike of what an inlined function resolves');
$node->safe_psql('postgres', 'ALTER ROLE shop_owner NOSUPERUSER');
$node->safe_psql('shop', 'SET search_path = pg_catalog; DELETE FROM public.sprung');

# The Redis worker mirrors users and a restaurant with its menu.
$redis->set('626a81ce9a8cd1920641e201',
	'{"_id": "626a81ce9a8cd1920641e201", "name": "Анна", "login": "anna", "update_ts_utc": "2023-01-01 10:00:00"}');
$redis->set('a51e4e31ae4602047ec52501',
	'{"_id": "a51e4e31ae4602047ec52501", "name": "Кубдари", "update_ts_utc": "2023-01-01 10:00:00", "menu": [{"_id": "6276e8cd0cf48b4cded00001", "name": "Долма", "price": 100, "category": "Закуски"}]}'
);
ok( $node->poll_query_until(
		'shop',
		'SELECT (SELECT pg_catalog.count(*) FROM stg.users) OPERATOR(pg_catalog.=) 1 AND (SELECT pg_catalog.count(*) FROM stg.restaurants) OPERATOR(pg_catalog.=) 1'
	),
	'the Redis worker mirrored the dictionaries')
  or diag($node->safe_psql('shop',
	'SET search_path = pg_catalog; SELECT worker, state, last_error FROM dwh.status'));

# Orders through every SQL entry point, as a superuser whose session has
# the trapped search_path, and a loader role with EXECUTE on the ingest.
my $order = sub {
	my ($id, $ts) = @_;
	return qq{{"object_id": $id, "object_type": "order", "sent_dttm": "$ts", "payload": {"restaurant": {"id": "a51e4e31ae4602047ec52501"}, "date": "$ts", "user": {"id": "626a81ce9a8cd1920641e201"}, "order_items": [{"id": "6276e8cd0cf48b4cded00001", "name": "Долма", "price": 100, "quantity": 1}], "bonus_payment": 0, "cost": 100, "payment": 100, "bonus_grant": 0, "statuses": [{"status": "CLOSED", "dttm": "$ts"}], "final_status": "CLOSED", "update_ts": "$ts"}}};
};
$node->safe_psql('shop',
	"SELECT * FROM dwh.ingest_orders(ARRAY[convert_to(\$m\$" . $order->(1, '2023-01-02 10:00:00')
	  . "\$m\$, 'UTF8'), convert_to(\$m\$" . $order->(1, '2023-01-02 09:00:00') . "\$m\$, 'UTF8')])");
$node->safe_psql('shop',
	"SELECT dwh.ingest_order(\$m\$" . $order->(2, '2023-01-02 11:00:00') . "\$m\$::text)");
$node->safe_psql('postgres', 'CREATE ROLE loader LOGIN');
$node->safe_psql('shop', q{
GRANT USAGE ON SCHEMA dwh TO loader;
GRANT EXECUTE ON FUNCTION dwh.ingest_orders(bytea[], text, integer[], bigint[]) TO loader;
});
$node->safe_psql('shop',
	"SET ROLE loader; SELECT * FROM dwh.ingest_orders(ARRAY[convert_to(\$m\$"
	  . $order->(3, '2023-01-02 12:00:00') . "\$m\$, 'UTF8')])");
$node->safe_psql('shop', q{
INSERT INTO stg.order_events (object_id, object_type, sent_dttm, payload)
SELECT 4, 'order', '2023-01-02 13:00:00', payload || '{"update_ts": "2023-01-02 13:00:00"}'
FROM stg.order_events WHERE object_id OPERATOR(pg_catalog.=) 3
ON CONFLICT (object_id) DO UPDATE SET payload = EXCLUDED.payload});

# A superuser's direct writes of the dictionaries, twice each (a new row,
# then a newer version that replaces it): the STG guard compares versions
# and keys in the writer's session.
foreach my $ts ('2023-01-02 08:00:00', '2023-01-02 09:00:00')
{
	$node->safe_psql('shop', qq{
INSERT INTO stg.users (object_id, payload)
VALUES ('626a81ce9a8cd1920641e299', '{"_id": "626a81ce9a8cd1920641e299", "name": "Борис", "login": "boris", "update_ts_utc": "$ts"}')
ON CONFLICT (object_id) DO UPDATE SET payload = EXCLUDED.payload;
INSERT INTO stg.restaurants (object_id, payload)
VALUES ('a51e4e31ae4602047ec52599', '{"_id": "a51e4e31ae4602047ec52599", "name": "Хинкальная", "update_ts_utc": "$ts", "menu": [{"_id": "6276e8cd0cf48b4cded00099", "name": "Хинкали", "price": 50, "category": "Основные блюда"}]}')
ON CONFLICT (object_id) DO UPDATE SET payload = EXCLUDED.payload});
}
is( $node->safe_psql('shop',
		q{SET search_path = pg_catalog; SELECT (SELECT update_ts FROM stg.users WHERE object_id = '626a81ce9a8cd1920641e299') || ' ' || (SELECT count(*) FROM stg.user_history WHERE object_id = '626a81ce9a8cd1920641e299')}
	),
	'2023-01-02 09:00:00 1',
	'the direct writes of a user went through: the newer version current, the older in the history');

# A menu change and a renamed user while orders exist: the worker's
# dictionary path with mart updates.
$redis->set('a51e4e31ae4602047ec52501',
	'{"_id": "a51e4e31ae4602047ec52501", "name": "Кубдари", "update_ts_utc": "2023-01-03 10:00:00", "menu": [{"_id": "6276e8cd0cf48b4cded00001", "name": "Долма новая", "price": 100, "category": "Основные блюда"}]}'
);
$redis->set('626a81ce9a8cd1920641e201',
	'{"_id": "626a81ce9a8cd1920641e201", "name": "Анна Б.", "login": "anna", "update_ts_utc": "2023-01-03 10:00:00"}');
ok( $node->poll_query_until(
		'shop',
		q{SELECT pg_catalog.count(*) OPERATOR(pg_catalog.=) 1 FROM cdm.user_category_counters WHERE category_name OPERATOR(pg_catalog.=) 'Основные блюда'}
	),
	'the worker carried the menu change into the marts');

# Tags of every kind of rule, so that the view cdm.user_tags calls each
# function it calls.
$node->safe_psql('shop', q{
INSERT INTO dwh.tag_rules (tag, kind, category_name, product_id, threshold, window_days) VALUES
    ('mains', 'category', 'Основные блюда', NULL, 1, NULL),
    ('dolma', 'dish', NULL, '6276e8cd0cf48b4cded00001', 1, NULL),
    ('regular', 'all_orders', NULL, NULL, 1, 36500),
    ('customer', 'all_orders', NULL, NULL, 1, NULL),
    ('favourite', 'favourite_category', NULL, NULL, 1, NULL)});

# A superuser with the trapped search_path reads the views of tags (the
# planner inlines the SQL functions they call under the reader's
# search_path) and calls each SQL function of dwh that has no SET clause.
is( $node->safe_psql('shop',
		q{SELECT tag, order_cnt, value FROM cdm.user_tags ORDER BY tag COLLATE "C"}),
	"customer|4|\ndolma|4|\nfavourite|4|Основные блюда\nmains|4|\nregular|4|",
	'a superuser reads cdm.user_tags');
is($node->safe_psql('shop', q{SELECT count(*) FROM dwh.expected_user_tags}),
	'5', 'and dwh.expected_user_tags');
my $calls = $node->safe_psql('shop', q{
SET search_path = pg_catalog;
SELECT string_agg(format('SELECT %I.%I(%s);', n.nspname, p.proname,
                         (SELECT coalesce(string_agg(format('NULL::%I.%I', tn.nspname, t.typname), ', '
                                                     ORDER BY a.ord), '')
                          FROM unnest(p.proargtypes::oid[]) WITH ORDINALITY a(typ, ord)
                          JOIN pg_type t ON t.oid = a.typ
                          JOIN pg_namespace tn ON tn.oid = t.typnamespace)), E'\n' ORDER BY p.proname)
FROM pg_proc p
JOIN pg_namespace n ON n.oid = p.pronamespace
JOIN pg_language l ON l.oid = p.prolang
WHERE n.nspname = 'dwh' AND l.lanname = 'sql' AND p.proconfig IS NULL});
my @calls = split /\n/, $calls;
cmp_ok(scalar(@calls), '>=', 11, 'the SQL functions of dwh without a SET clause: ' . scalar(@calls));
$node->safe_psql('shop', $calls);

# A database owner who sets check_function_bodies off for the database
# does not make a superuser's session a restore (which would leave its
# orders' tags to the dump): a new user's order still grants its tags.
$node->safe_psql('shop', 'SET ROLE shop_owner; ALTER DATABASE shop SET check_function_bodies = off');
my $other_user = $order->(5, '2023-01-02 14:00:00');
$other_user =~ s/626a81ce9a8cd1920641e201/626a81ce9a8cd1920641e202/;
$node->safe_psql('shop', "SELECT dwh.ingest_order(\$m\$$other_user\$m\$::text)");
$node->safe_psql('shop', 'SET ROLE shop_owner; ALTER DATABASE shop RESET check_function_bodies');
is( $node->safe_psql('shop',
		q{SET search_path = pg_catalog; SELECT string_agg(e.tag, ', ' ORDER BY e.tag COLLATE "C") FROM cdm.user_tag_events e JOIN dds.h_user u ON u.h_user_pk = e.user_id WHERE u.user_id = '626a81ce9a8cd1920641e202' AND e.kind = 'grant'}
	),
	'customer, dolma, favourite, mains, regular',
	'with check_function_bodies off for the database, an order still grants its tags');

is(sprung() // '', '', 'no trap sprang');
is(owner_is_superuser(), 'f', 'the database owner is still an ordinary role');
is( $node->safe_psql('shop',
		'SET search_path = pg_catalog; SELECT pg_catalog.count(*) FROM dwh.verify()'),
	'0', 'dwh.verify() is empty');
is( $node->safe_psql('shop',
		q{SET search_path = pg_catalog; SELECT string_agg(order_cnt::text, ',' ORDER BY order_cnt) FROM cdm.user_product_counters}),
	'1,4', 'five CLOSED orders counted: four of the first user, one of the second');

# A schema dwh that a non-superuser created first is refused.
$node->safe_psql('postgres', q{
CREATE ROLE squatter LOGIN;
CREATE DATABASE squat OWNER squatter;
});
$node->safe_psql('squat', 'SET ROLE squatter; CREATE SCHEMA dwh');
my ($ret, $out, $err) =
  $node->psql('squat', "\\set VERBOSITY verbose\nCREATE EXTENSION dwh");
isnt($ret, 0, 'CREATE EXTENSION refuses a schema dwh owned by a non-superuser');
like($err, qr/ERROR:  42501: schema dwh is owned by role squatter, which is not a superuser/,
	'the error names the schema and its owner, with SQLSTATE 42501');
like($err, qr/HINT:  Drop the schema, or give it to a superuser/, 'and says what to do');
$node->safe_psql('squat', 'ALTER SCHEMA dwh OWNER TO CURRENT_USER; CREATE EXTENSION dwh');
is($node->safe_psql('squat', q{SELECT extname FROM pg_extension WHERE extname = 'dwh'}),
	'dwh', 'once a superuser owns the schema, the extension installs');

$node->stop;
$redis->stop;
done_testing();
