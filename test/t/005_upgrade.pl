# Upgrades: ALTER EXTENSION dwh UPDATE from 1.0 as it was released
# (update/dwh--1.0.sql, frozen) to the version of this build
# (docs/upgrades.md).
#
# One preloaded node whose workers serve database a, with a Kafka broker
# and a Redis URL where nothing listens (neither is needed).  Database a:
# CREATE EXTENSION dwh VERSION '1.0', served by this build's library until
# the update (the workers wait and say why, the ingest functions refuse,
# direct writes to STG keep 1.0's rules), a varied data set written through
# STG, then ALTER EXTENSION dwh UPDATE.  Database b: a fresh install loaded
# with the STG rows of a.  Then:
#   - every row of STG and of the operational tables of a is kept, ids and
#     load times included, and every value of 1.0's DDS is either in DDS or
#     kept in dwh_update_1_1.vault_differences;
#   - the catalog of a (tables, columns, indexes, constraints, triggers,
#     functions with their bodies and settings, views, sequences,
#     privileges, comments, extension membership and dump configuration)
#     equals b's, each difference printed; the comparison is shown to see
#     a forgotten change of each kind;
#   - every stg, dds and cdm table of a equals b's but for the load-time
#     columns (docs/data-rule.md), and dwh.verify() is empty in a;
#   - a pg_dump of a taken under 1.0, restored into 1.0 in database c and
#     updated there, gives the same tables as a; restored straight into
#     1.1, its rows of DDS and the marts are refused (pg_restore's status
#     is not 0) and STG's triggers rebuild the same tables;
#   - the workers go on by themselves, and new orders flow into the marts.

use strict;
use warnings;

use FindBin;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $control = slurp_file("$FindBin::RealBin/../../dwh.control");
$control =~ /^default_version = '([^']+)'$/m
  or die 'no default_version in dwh.control';
my $version = $1;
isnt($version, '1.0', "this build is version $version");

my $node = PostgreSQL::Test::Cluster->new('upgrade');
$node->init(extra => [ '--encoding=UTF8', '--locale=C' ]);
my $kafka_port = PostgreSQL::Test::Cluster::get_free_port();
my $redis_port = PostgreSQL::Test::Cluster::get_free_port();
$node->append_conf(
	'postgresql.conf', qq{
shared_preload_libraries = 'dwh'
dwh.kafka_brokers = '127.0.0.1:$kafka_port'
dwh.redis_url = 'redis://127.0.0.1:$redis_port'
});
$node->start;

$node->safe_psql('postgres', 'CREATE DATABASE a');
$node->safe_psql('postgres', 'CREATE DATABASE b');
# The workers move to database a (they restart to connect to it).
$node->safe_psql('postgres', "ALTER SYSTEM SET dwh.database = 'a'");
$node->reload;

# Creating 1.0 with this library resolves every C function that 1.0
# declares: the C language validator looks each symbol up.
$node->safe_psql('a', q{CREATE EXTENSION dwh VERSION '1.0'});
is($node->safe_psql('a', q{SELECT extversion FROM pg_extension WHERE extname = 'dwh'}),
	'1.0', 'database a holds dwh 1.0');

# Until the update, the workers (Kafka, Redis, tags) wait and say why, in dwh.status and once
# in the server log with the command to run.
my $waiting = "waiting: extension dwh is at version 1.0, its library at $version: "
  . 'run ALTER EXTENSION dwh UPDATE';
for my $worker ('kafka 1', 'redis', 'tags')
{
	ok( $node->poll_query_until(
			'a', "SELECT state = '$waiting' FROM dwh.status WHERE worker = '$worker'"),
		"$worker worker waits for the update");
}
# Once each: two more rechecks (every 5 s) log nothing more.
sleep(11);
my @logged = slurp_file($node->logfile) =~
  /LOG:  \Q$waiting\E\n(?:.*\n)?.*HINT:  Run ALTER EXTENSION dwh UPDATE in database "a"; the worker goes on by itself within seconds\./g;
is(scalar(@logged), 3, 'each worker logs why it waits once, with a hint');

# The ingest functions run SQL that 1.0 lacks: they refuse.
my ($ret, $out, $err) = $node->psql('a',
	"\\set VERBOSITY verbose\nSELECT * FROM dwh.ingest_orders(ARRAY[convert_to('{}', 'UTF8')])");
isnt($ret, 0, 'dwh.ingest_orders refuses under the 1.0 schema');
like(
	$err,
	qr/ERROR:  55000: extension dwh is at version 1\.0 in this database, but its library is version \Q$version\E\n.*HINT:  Run ALTER EXTENSION dwh UPDATE in this database\./s,
	'and says why (SQLSTATE 55000) and what to do');
($ret, $out, $err) = $node->psql('a', q{SELECT dwh.ingest_order('{}'::text)});
like($err, qr/ERROR:  extension dwh is at version 1\.0 in this database/,
	'dwh.ingest_order refuses too');

# A varied warehouse written through STG under the 1.0 schema, one upsert
# per value as 1.0's workers wrote them.  Dictionaries: users with a
# version time, one without (1.0 put its satellite row at its load time,
# 1.1 puts it at -infinity), one renamed, an older value after a newer one
# (1.0 drops it); two restaurants whose menus name dishes in categories,
# then a new menu of the first that renames a dish, moves one to another
# category, drops one and adds one, and an older menu of the second.
$node->safe_psql(
	'a', q{
CREATE SCHEMA load;
CREATE FUNCTION load.user_value(id text, name text, ts text) RETURNS jsonb
LANGUAGE sql AS $$
    SELECT jsonb_strip_nulls(jsonb_build_object('_id', id, 'name', name,
                                                'login', 'login_' || id,
                                                'update_ts_utc', ts))
$$;
CREATE FUNCTION load.menu_value(id text, name text, ts text, VARIADIC dishes text[])
RETURNS jsonb
LANGUAGE sql AS $$
    SELECT jsonb_build_object('_id', id, 'name', name, 'update_ts_utc', ts,
        'menu', jsonb_agg(jsonb_build_object('_id', split_part(d, ':', 1),
                                             'name', split_part(d, ':', 2),
                                             'price', 100,
                                             'category', split_part(d, ':', 3))
                          ORDER BY n))
    FROM unnest(dishes) WITH ORDINALITY AS u(d, n)
$$;
});

sub upsert_user
{
	my ($id, $name, $ts) = @_;
	$ts = defined $ts ? "'$ts'" : 'NULL';
	return "INSERT INTO stg.users (object_id, payload)
VALUES ('$id', load.user_value('$id', '$name', $ts))
ON CONFLICT (object_id) DO UPDATE SET payload = EXCLUDED.payload";
}

sub upsert_restaurant
{
	my ($id, $name, $ts, @dishes) = @_;
	my $list = join(', ', map { "'$_'" } @dishes);
	return "INSERT INTO stg.restaurants (object_id, payload)
VALUES ('$id', load.menu_value('$id', '$name', '$ts', $list))
ON CONFLICT (object_id) DO UPDATE SET payload = EXCLUDED.payload";
}

$node->safe_psql(
	'a',
	join(
		";\n",
		(map { upsert_user("u$_", "Пользователь $_", '2023-08-11 16:44:59') } 1 .. 6),
		upsert_user('u7', 'Без версии', undef),
		upsert_user('u1', 'Гаврила Архипович', '2023-08-12 09:00:00'),
		upsert_user('u2', 'Старое имя', '2023-08-01 00:00:00'),
		upsert_restaurant(
			'r1', 'Кубдари', '2023-08-11 16:50:44',
			'd1:Пхали:Закуски', 'd2:Салат Греческий:Салаты',
			'd3:Долма:Закуски', 'd4:Хачапури:Выпечка'),
		upsert_restaurant(
			'r2', 'Вкус Индии', '2023-08-11 16:51:02',
			'd5:Чиз Наан:Выпечка', 'd6:Палак Панир:Основные блюда',
			'd7:Сладкий Ласси:Напитки'),
		upsert_restaurant(
			'r1', 'Кубдари', '2023-08-20 10:00:00',
			'd1:Пхали с орехами:Закуски', 'd2:Салат Греческий:Закуски',
			'd4:Хачапури:Выпечка', 'd8:Лобио:Основные блюда'),
		upsert_restaurant(
			'r2', 'Вкус Индии (старое)', '2023-08-01 00:00:00',
			'd5:Наан:Выпечка')));

# Orders: 120 over both restaurants, with dishes on the menus and off them
# (d9, d10), one in five CANCELLED, users u1..u8 (no dictionary names u8).
# Then later versions of some: cancelled after all; closed after being
# cancelled, with a dish less and another user; a dish less; and versions
# older than the stored one (1.0 drops them) or with its update_ts and
# another payload (the greater one wins).
$node->safe_psql(
	'a', q{
CREATE FUNCTION load.order_payload(g integer, status text, ts timestamp,
                                   dish_skip integer, user_shift integer)
RETURNS jsonb
LANGUAGE sql AS $$
    WITH dish(restaurant_id, idx, id, name) AS (VALUES
        ('r1', 0, 'd1', 'Пхали'), ('r1', 1, 'd2', 'Салат Греческий'),
        ('r1', 2, 'd3', 'Долма'), ('r1', 3, 'd4', 'Хачапури'),
        ('r1', 4, 'd9', 'Лимонад грузинский'),
        ('r2', 0, 'd5', 'Чиз Наан'), ('r2', 1, 'd6', 'Палак Панир'),
        ('r2', 2, 'd7', 'Сладкий Ласси'), ('r2', 3, 'd10', 'Чай Масала')),
    o AS (SELECT CASE WHEN g % 2 = 0 THEN 'r1' ELSE 'r2' END AS restaurant_id,
                 'u' || (1 + (g + user_shift) % 8) AS user_id),
    items AS (
        SELECT jsonb_agg(jsonb_build_object('id', d.id, 'name', d.name, 'price', 100,
                                            'quantity', 1 + (g + d.idx) % 3)
                         ORDER BY d.idx) AS items,
               sum(100 * (1 + (g + d.idx) % 3)) AS cost
        FROM o JOIN dish d USING (restaurant_id)
        WHERE (g + d.idx) % 3 <> 0 AND d.idx <> dish_skip)
    SELECT jsonb_build_object(
        'restaurant', jsonb_build_object('id', o.restaurant_id),
        'date', to_char(ts, 'YYYY-MM-DD HH24:MI:SS'),
        'user', jsonb_build_object('id', o.user_id),
        'order_items', i.items, 'bonus_payment', 0, 'cost', i.cost,
        'payment', i.cost, 'bonus_grant', 0,
        'statuses', jsonb_build_array(jsonb_build_object(
            'status', status, 'dttm', to_char(ts, 'YYYY-MM-DD HH24:MI:SS'))),
        'final_status', status, 'update_ts', to_char(ts, 'YYYY-MM-DD HH24:MI:SS'))
    FROM o, items i
$$;
});

sub upsert_order
{
	my ($g, $status, $shift_ts, $dish_skip, $user_shift) = @_;
	my $ts = "timestamp '2023-08-15 10:00:00' + $g * interval '7 minutes' + interval '$shift_ts'";
	return "INSERT INTO stg.order_events (object_id, object_type, sent_dttm, payload)
SELECT 1000 + $g, 'order', $ts + interval '5 minutes',
       load.order_payload($g, '$status', $ts, $dish_skip, $user_shift)
ON CONFLICT (object_id) DO UPDATE
SET object_type = EXCLUDED.object_type, sent_dttm = EXCLUDED.sent_dttm,
    payload = EXCLUDED.payload";
}

my @orders;
for my $g (1 .. 120)
{
	push @orders,
	  upsert_order($g, $g % 5 == 0 ? 'CANCELLED' : 'CLOSED', '0 hours', -1, 0);
}
for my $g (1 .. 120)
{
	my $kind = $g % 10;
	push @orders, upsert_order($g, 'CANCELLED', '3 hours', -1, 0) if $kind == 3;
	push @orders, upsert_order($g, 'CLOSED', '3 hours', 1, 3) if $kind == 5;
	push @orders, upsert_order($g, 'CLOSED', '3 hours', 0, 0) if $kind == 6;
	push @orders, upsert_order($g, 'CANCELLED', '-1 hours', -1, 0) if $kind == 7;
	push @orders, upsert_order($g, 'CANCELLED', '0 hours', -1, 0) if $kind == 9;
}
$node->safe_psql('a', join(";\n", @orders));

# What 1.0's workers wrote besides: a message of another type, a dead
# letter, Kafka offsets (one moved by dwh.kafka_seek, which works under
# 1.0), Redis keys.
$node->safe_psql(
	'a', q{
INSERT INTO stg.other_events (object_id, object_type, sent_dttm, message,
                              topic, kafka_partition, kafka_offset)
VALUES (7, 'heartbeat', '2023-08-15 12:00:00',
        '{"object_id": 7, "object_type": "heartbeat", "sent_dttm": "2023-08-15 12:00:00"}',
        'order-service_orders', 0, 41);
INSERT INTO stg.other_events (object_id, object_type, sent_dttm, message)
VALUES (8, 'heartbeat', NULL, '{"object_id": 8, "object_type": "heartbeat"}');
INSERT INTO dwh.dead_letters (source, topic, kafka_partition, kafka_offset, raw, reason, sqlstate)
VALUES ('kafka', 'order-service_orders', 1, 17, convert_to('{not json', 'UTF8'),
        'invalid JSON: string or ''}'' expected near position 2', '22032');
INSERT INTO dwh.kafka_offsets (topic, kafka_partition, next_offset)
VALUES ('order-service_orders', 0, 42);
SELECT dwh.kafka_seek(1, 18, 'order-service_orders');
INSERT INTO dwh.redis_keys (key, kind, state, value_hash, changed_at)
SELECT object_id, 'user', 'mirrored', '\x00'::bytea, now() FROM stg.users;
});

is($node->safe_psql('a', 'SELECT count(*) FROM dwh.verify()'),
	'0', 'the 1.0 warehouse is consistent by its own dwh.verify()');

# What DBAs granted under 1.0: a loader's EXECUTE on dwh.ingest_orders
# (with the grant option, and passed on by the loader), an analyst's on
# dwh.verify() and on the dead letters, an operator's on dwh.worker_status()
# and dwh.status.  dwh.ingest_orders and dwh.worker_status are dropped and
# created again by the update.
$node->safe_psql(
	'a', q{
CREATE ROLE regress_loader;
CREATE ROLE regress_subloader;
CREATE ROLE regress_reader;
GRANT USAGE ON SCHEMA dwh TO regress_loader, regress_reader;
GRANT EXECUTE ON FUNCTION dwh.ingest_orders(bytea[], text, integer[], bigint[])
    TO regress_loader WITH GRANT OPTION;
SET ROLE regress_loader;
GRANT EXECUTE ON FUNCTION dwh.ingest_orders(bytea[], text, integer[], bigint[])
    TO regress_subloader;
RESET ROLE;
GRANT EXECUTE ON FUNCTION dwh.verify() TO regress_reader;
GRANT SELECT ON dwh.dead_letters TO regress_reader;
GRANT EXECUTE ON FUNCTION dwh.worker_status() TO regress_reader;
GRANT SELECT ON dwh.status TO regress_reader;
});
my $dba_grants = q{
SELECT p.oid::regprocedure || ' ' || p.proacl::text FROM pg_proc p
WHERE p.oid IN ('dwh.ingest_orders(bytea[], text, integer[], bigint[])'::regprocedure,
                'dwh.verify()'::regprocedure, 'dwh.worker_status()'::regprocedure)
UNION ALL
SELECT c.oid::regclass || ' ' || relacl::text FROM pg_class c
WHERE c.oid IN ('dwh.dead_letters'::regclass, 'dwh.status'::regclass)
ORDER BY 1};
my $dba_grants_1_0 = $node->safe_psql('a', $dba_grants);
# Reads work under the 1.0 schema, the view over the workers' watermarks too.
is($node->safe_psql('a', 'SELECT count(*) >= 0 FROM dwh.kafka_partitions'),
	't', 'under the 1.0 schema dwh.kafka_partitions answers');
my $lock_key = '7238964021746305793';
is($node->safe_psql('a', 'SELECT dwh.dictionary_lock_key()'),
	$lock_key, "1.0's dictionary lock key");
is( $node->safe_psql(
		'a', q{SELECT payload->>'final_status' FROM stg.order_events WHERE object_id = 1007}),
	'CLOSED',
	'under the 1.0 schema an older version is dropped, as 1.0 did');
is( $node->safe_psql(
		'a', q{
SELECT count(*) FROM dds.s_order_status s JOIN dwh.order_current_status c USING (h_order_pk)
WHERE s.load_dt < c.load_dt}),
	'24',
	"1.0's DDS holds the status rows of 24 replaced versions");

# Every row of the tables that hold what was received and of the
# operational tables, all columns (ids and load times too), and the
# sequences.
# The columns that 1.1 added are left out: the update fills them.
my %added_in_1_1 = (
	'stg.other_events' => "'source', 'raw_sha256', 'position_mismatch'",
	'dwh.dead_letters' => "'raw_length', 'raw_sha256', 'position_mismatch'",
	'dwh.kafka_offsets' => "'last_sha256', 'last_offset'");
sub full_fingerprint
{
	my ($db, $table) = @_;
	return $node->safe_psql($db, "SELECT last_value || ' ' || is_called FROM $table")
	  if $table =~ /_seq$/;
	my $added = $added_in_1_1{$table} // "''";
	return $node->safe_psql(
		$db, qq{
SELECT count(*) || ' ' || md5(coalesce(string_agg(r, E'\\n' ORDER BY r), ''))
FROM (SELECT (to_jsonb(t) - ARRAY[$added])::text AS r FROM $table t) s});
}
my @kept = (
	'stg.order_events', 'stg.other_events', 'stg.users', 'stg.restaurants',
	'dwh.dead_letters', 'dwh.kafka_offsets', 'dwh.redis_keys',
	'stg.order_events_id_seq', 'stg.other_events_id_seq', 'stg.users_id_seq',
	'stg.restaurants_id_seq', 'dwh.dead_letters_id_seq');
my %kept_before = map { $_ => full_fingerprint('a', $_) } @kept;
$node->safe_psql('a',
	'CREATE TABLE load.redis_wanted AS SELECT DISTINCT * FROM dwh.redis_wanted');

# 1.0's DDS, as dwh.verify_vault() reads DDS (its "actual" side): each row
# is looked for after the update.
$node->safe_psql(
	'a', q{
CREATE VIEW load.vault AS
SELECT 'dds.h_order' AS t, order_id::text AS k, order_dt::text AS v FROM dds.h_order
UNION ALL SELECT 'dds.h_user', user_id, '' FROM dds.h_user
UNION ALL SELECT 'dds.h_restaurant', restaurant_id, '' FROM dds.h_restaurant
UNION ALL SELECT 'dds.h_product', product_id, '' FROM dds.h_product
UNION ALL SELECT 'dds.h_category', category_name, '' FROM dds.h_category
UNION ALL
SELECT 'dds.l_order_user', o.order_id::text, u.user_id
FROM dds.l_order_user l JOIN dds.h_order o USING (h_order_pk) JOIN dds.h_user u USING (h_user_pk)
UNION ALL
SELECT 'dds.l_order_product', o.order_id::text || ' ' || p.product_id, ''
FROM dds.l_order_product l JOIN dds.h_order o USING (h_order_pk) JOIN dds.h_product p USING (h_product_pk)
UNION ALL
SELECT 'dds.l_product_restaurant', p.product_id || ' ' || r.restaurant_id, ''
FROM dds.l_product_restaurant l JOIN dds.h_product p USING (h_product_pk)
JOIN dds.h_restaurant r USING (h_restaurant_pk)
UNION ALL
SELECT 'dds.l_product_category', p.product_id, c.category_name || ' @ ' || l.load_dt::text
FROM dds.l_product_category l JOIN dds.h_product p USING (h_product_pk)
JOIN dds.h_category c USING (h_category_pk)
UNION ALL
SELECT 'dds.s_order_status', o.order_id::text || ' @ ' || s.load_dt::text, s.status
FROM dds.s_order_status s JOIN dds.h_order o USING (h_order_pk)
UNION ALL
SELECT 'dds.s_order_cost', o.order_id::text || ' @ ' || s.load_dt::text,
       s.cost::text || ' ' || s.payment::text
FROM dds.s_order_cost s JOIN dds.h_order o USING (h_order_pk)
UNION ALL
SELECT 'dds.s_user_names', u.user_id || ' @ ' || s.load_dt::text, s.username || ' / ' || s.userlogin
FROM dds.s_user_names s JOIN dds.h_user u USING (h_user_pk)
UNION ALL
SELECT 'dds.s_restaurant_names', r.restaurant_id || ' @ ' || s.load_dt::text, s.name
FROM dds.s_restaurant_names s JOIN dds.h_restaurant r USING (h_restaurant_pk)
UNION ALL
SELECT 'dds.s_product_names', p.product_id || ' @ ' || s.load_dt::text, s.name || ' / ' || s.load_src
FROM dds.s_product_names s JOIN dds.h_product p USING (h_product_pk);
CREATE TABLE load.vault_1_0 AS SELECT * FROM load.vault;
});

# A dump of the 1.0 warehouse, restored after the update (below).
my $dir = PostgreSQL::Test::Utils::tempdir();
$node->command_ok(
	[ 'pg_dump', '-Fc', '--exclude-schema=load', '-f', "$dir/a-1.0.dump", '-d', 'a' ],
	'pg_dump of the 1.0 warehouse');

# The update.
($ret, $out, $err) = $node->psql('a', 'ALTER EXTENSION dwh UPDATE');
is($ret, 0, 'ALTER EXTENSION dwh UPDATE succeeds') or diag($err);
like(
	$err,
	qr/WARNING:  DDS and the marts were recomputed from STG: \d+ rows of DDS differed, \d+ of them not implied by STG\n.*HINT:  Table dwh_update_1_1\.vault_differences keeps every difference/s,
	'the update says what it did to DDS and where the differences are kept');
is($node->safe_psql('a', q{SELECT extversion FROM pg_extension WHERE extname = 'dwh'}),
	$version, "database a holds dwh $version");
is($node->safe_psql('a', 'SELECT dwh.dictionary_lock_key()'),
	$lock_key, 'the same dictionary lock key, from C now');

for my $t (@kept)
{
	is(full_fingerprint('a', $t), $kept_before{$t}, "$t: every row kept as it was");
}
# The columns 1.1 added, filled for the rows of 1.0: a message with a
# Kafka offset taken for the worker's, one without for a SQL caller's, the
# hash of the message's text (its bytes were not kept); a dead letter's
# length and hash from its whole value.
is( $node->safe_psql(
		'a', q{
SELECT string_agg(concat_ws(' ', object_id, source,
                            raw_sha256 = sha256(convert_to(message::text, 'UTF8')),
                            position_mismatch), ', ' ORDER BY object_id)
FROM stg.other_events}),
	'7 kafka t f, 8 sql t f',
	'stg.other_events: source, raw_sha256 and position_mismatch filled for the rows of 1.0');
is( $node->safe_psql(
		'a', q{
SELECT string_agg(concat_ws(' ', raw_length, raw_sha256 = sha256(raw), position_mismatch),
                  ', ' ORDER BY id)
FROM dwh.dead_letters}),
	'9 t f',
	'dwh.dead_letters: raw_length, raw_sha256 and position_mismatch filled for the rows of 1.0');
is( $node->safe_psql(
		'a', q{SELECT count(*) || ' ' || count(last_sha256) || ' ' || count(last_offset) FROM dwh.kafka_offsets}),
	'2 0 0',
	'dwh.kafka_offsets: the message last applied unknown for the offsets of 1.0 (no check when a worker starts there)');

# What DBAs granted is kept, dwh.ingest_orders dropped and created again
# included, each grant by its grantor.
is($node->safe_psql('a', $dba_grants), $dba_grants_1_0, 'the grants of DBAs are kept');
like(
	$node->safe_psql('a', $dba_grants),
	qr/^dwh\.ingest_orders\(bytea\[\],text,integer\[\],bigint\[\]\) \{postgres=X\/postgres,regress_loader=X\*\/postgres,regress_subloader=X\/regress_loader\}$/m,
	'dwh.ingest_orders: the loader with its grant option, and the grant it passed on');

is( $node->safe_psql(
		'a', q{
SELECT count(*) FROM load.redis_wanted b
WHERE NOT EXISTS (SELECT FROM dwh.redis_wanted w WHERE w.key = b.key AND w.kind = b.kind)}),
	'0',
	'dwh.redis_wanted: every queued key still queued');

# No value of 1.0's DDS is lost: each row is in DDS as it was, or kept
# with its 1.0 value among the differences.
is( $node->safe_psql(
		'a', q{
SELECT string_agg(o.t || ' ' || o.k || ': ' || o.v, E'\n' ORDER BY o.t, o.k)
FROM load.vault_1_0 o
WHERE (o.t, o.k, o.v) NOT IN (SELECT t, k, v FROM load.vault)
  AND NOT EXISTS (SELECT FROM dwh_update_1_1.vault_differences d
                  WHERE d.table_name = o.t AND d.business_key = o.k
                    AND d.value_1_0 = o.v)}),
	'',
	"every row of 1.0's DDS is in DDS or in dwh_update_1_1.vault_differences");
is( $node->safe_psql(
		'a', q{
SELECT count(*) FROM dwh_update_1_1.vault_differences
WHERE table_name = 'dds.s_order_status' AND value_1_1 IS NULL}),
	'36',
	'the status rows that STG no longer implies are among them (24 replaced versions, '
	  . '12 rows of an unchanged status)');
is( $node->safe_psql(
		'a', q{
SELECT value_1_0 IS NULL FROM dwh_update_1_1.vault_differences
WHERE table_name = 'dds.s_user_names' AND business_key = 'u7 @ -infinity'}),
	't',
	'a user value without a version time has its satellite row at -infinity now');
is( $node->safe_psql(
		'a', q{
SELECT count(*) FROM pg_depend d JOIN pg_extension e ON e.oid = d.refobjid
WHERE e.extname = 'dwh' AND d.deptype = 'e'
  AND d.objid IN ('dwh_update_1_1.vault_differences'::regclass::oid,
                  'dwh_update_1_1'::regnamespace::oid)}),
	'0',
	'the table of differences is not part of the extension');

is($node->safe_psql('a', 'SELECT count(*) FROM dwh.verify()'),
	'0', 'dwh.verify() is empty after the update');

# Database b: a fresh install loaded with the STG rows of a.
$node->safe_psql('b', 'CREATE EXTENSION dwh');
my @stg_copy = (
	[ 'stg.users',               'object_id, payload' ],
	[ 'stg.user_history',        'object_id, update_ts, payload' ],
	[ 'stg.restaurants',         'object_id, payload' ],
	[ 'stg.restaurant_history',  'object_id, update_ts, payload' ],
	[ 'stg.order_events',        'object_id, object_type, sent_dttm, payload' ],
	[ 'stg.order_event_history', 'object_id, update_ts, payload, sent_dttm' ],
	[
		'stg.other_events',
		'object_id, object_type, sent_dttm, message, topic, kafka_partition, kafka_offset'
	]);
for my $c (@stg_copy)
{
	my ($table, $columns) = @$c;
	$node->safe_psql('a',
		"COPY (SELECT $columns FROM $table ORDER BY $columns) TO '$dir/$table.copy'");
	$node->safe_psql('b', "COPY $table ($columns) FROM '$dir/$table.copy'");
}

# Rows written in 1.0's shape, without the columns 1.1 added (the copy of
# stg.other_events above, and dead letters here): a BEFORE INSERT trigger
# fills them as the update filled a's.
my $dead_letter_columns =
  'source, topic, kafka_partition, kafka_offset, source_key, raw, reason, sqlstate';
$node->safe_psql('a',
	"COPY (SELECT $dead_letter_columns FROM dwh.dead_letters ORDER BY id) TO '$dir/dead_letters.copy'"
);
$node->safe_psql('b',
	"COPY dwh.dead_letters ($dead_letter_columns) FROM '$dir/dead_letters.copy'");
my $filled = q{
SELECT string_agg(r, E'\n' ORDER BY r) FROM (
    SELECT (to_jsonb(t) - ARRAY['id', 'received_at'])::text AS r FROM stg.other_events t
    UNION ALL
    SELECT (to_jsonb(t) - ARRAY['id', 'received_at'])::text FROM dwh.dead_letters t) s};
is($node->safe_psql('b', $filled), $node->safe_psql('a', $filled),
	'other events and dead letters written in 1.0\'s shape into 1.1 equal the updated ones');

# The initial privileges (what pg_dump leaves out) are a fresh install's:
# the grants of DBAs are not taken for dwh's own, and a dump taken after
# the update keeps them.
my $init_privs = q{
SELECT string_agg(concat_ws(' ', (i).type, (i).identity, p.initprivs::text), E'\n'
                  ORDER BY (i).type, (i).identity)
FROM (SELECT pg_identify_object(classoid, objoid, objsubid) AS i, initprivs
      FROM pg_init_privs WHERE privtype = 'e') p
WHERE (i).schema IN ('dwh', 'stg', 'dds', 'cdm')};
is($node->safe_psql('a', $init_privs), $node->safe_psql('b', $init_privs),
	'the initial privileges of the updated database are a fresh install\'s');
like(
	$node->safe_psql('a', $init_privs),
	qr/^function dwh\.ingest_orders\(pg_catalog\.bytea\[\],pg_catalog\.text,integer\[\],bigint\[\]\) \{postgres=X\/postgres\}$/m,
	'dwh.ingest_orders: the owner\'s alone');
$node->command_ok(
	[ 'pg_dump', '-s', '-f', "$dir/a-1.1-schema.sql", '-d', 'a' ],
	'pg_dump of the updated warehouse');
my $dumped = slurp_file("$dir/a-1.1-schema.sql");
like(
	$dumped,
	qr/GRANT ALL ON FUNCTION dwh\.ingest_orders\(.*\) TO regress_loader WITH GRANT OPTION;/,
	'a dump taken after the update keeps the grant on dwh.ingest_orders');
like($dumped, qr/GRANT ALL ON FUNCTION dwh\.verify\(\) TO regress_reader;/,
	'and the grant on a function the update did not recreate');
like($dumped, qr/GRANT SELECT ON TABLE dwh\.dead_letters TO regress_reader;/,
	'and on a table');
like($dumped, qr/GRANT ALL ON FUNCTION dwh\.worker_status\(.*\) TO regress_reader;/,
	'and on dwh.worker_status(), which the update recreated with more columns');
like($dumped, qr/GRANT SELECT ON TABLE dwh\.status TO regress_reader;/,
	'and on the view dwh.status, replaced over it');

# The catalogs are compared without the grants of DBAs, which b lacks
# (schema dwh's list of privileges, no longer empty once granted, is made
# the same in b).
$node->safe_psql(
	'a', q{
REVOKE ALL ON FUNCTION dwh.ingest_orders(bytea[], text, integer[], bigint[])
    FROM regress_loader CASCADE;
REVOKE ALL ON FUNCTION dwh.verify() FROM regress_reader;
REVOKE ALL ON dwh.dead_letters FROM regress_reader;
REVOKE ALL ON FUNCTION dwh.worker_status() FROM regress_reader;
REVOKE ALL ON dwh.status FROM regress_reader;
REVOKE USAGE ON SCHEMA dwh FROM regress_loader, regress_reader;
});
$node->safe_psql(
	'b', q{
GRANT USAGE ON SCHEMA dwh TO regress_reader;
REVOKE USAGE ON SCHEMA dwh FROM regress_reader;
});

# The catalog of the extension's objects, one line per property:
# object, property, value (as JSON, so one line each).
my $catalog_sql = q{
WITH ext AS (
    SELECT oid FROM pg_catalog.pg_extension WHERE extname = 'dwh'
),
nsp AS (
    SELECT n.oid, n.nspname FROM pg_catalog.pg_namespace n
    WHERE n.nspname IN ('stg', 'dds', 'cdm', 'dwh')
),
rel AS (
    SELECT c.oid, c.relkind, format('%I.%I', n.nspname, c.relname) AS name
    FROM pg_catalog.pg_class c JOIN nsp n ON n.oid = c.relnamespace
),
fn AS (
    SELECT p.*, format('%I.%I(%s)', n.nspname, p.proname,
                       pg_catalog.pg_get_function_identity_arguments(p.oid)) AS name
    FROM pg_catalog.pg_proc p JOIN nsp n ON n.oid = p.pronamespace
),
prop(object, property, value) AS (
    SELECT 'extension', 'member ' || (i).type || ' ' || (i).identity, ''
    FROM (SELECT pg_catalog.pg_identify_object(d.classid, d.objid, d.objsubid) AS i
          FROM pg_catalog.pg_depend d, ext
          WHERE d.refclassid = 'pg_catalog.pg_extension'::pg_catalog.regclass
            AND d.refobjid = ext.oid AND d.deptype = 'e') m
    UNION ALL
    SELECT 'extension', 'dumped ' || c.oid::pg_catalog.regclass::text, c.condition
    FROM pg_catalog.pg_extension e JOIN ext USING (oid),
         unnest(e.extconfig, e.extcondition) AS c(oid, condition)
    UNION ALL
    SELECT 'extension', 'attributes',
           concat_ws(' ', e.extversion, e.extrelocatable,
                     e.extnamespace::pg_catalog.regnamespace::text,
                     e.extowner::pg_catalog.regrole::text)
    FROM pg_catalog.pg_extension e JOIN ext USING (oid)
    UNION ALL
    SELECT 'schema ' || nsp.nspname, 'owner and privileges',
           concat_ws(' ', n.nspowner::pg_catalog.regrole::text, n.nspacl::text)
    FROM pg_catalog.pg_namespace n JOIN nsp USING (oid)
    UNION ALL
    SELECT 'schema ' || nsp.nspname, 'default privileges ' || da.defaclobjtype::text,
           concat_ws(' ', da.defaclrole::pg_catalog.regrole::text, da.defaclacl::text)
    FROM pg_catalog.pg_default_acl da JOIN nsp ON nsp.oid = da.defaclnamespace
    UNION ALL
    SELECT 'relation ' || r.name, 'attributes',
           concat_ws(' ', c.relkind, c.relpersistence, c.reloptions::text,
                     c.relacl::text, c.relowner::pg_catalog.regrole::text,
                     c.relrowsecurity, c.relforcerowsecurity, c.relreplident,
                     c.relispartition, am.amname, c.reltablespace)
    FROM rel r JOIN pg_catalog.pg_class c USING (oid)
    LEFT JOIN pg_catalog.pg_am am ON am.oid = c.relam
    UNION ALL
    SELECT 'relation ' || r.name, 'view definition', pg_catalog.pg_get_viewdef(r.oid)
    FROM rel r WHERE r.relkind IN ('v', 'm')
    UNION ALL
    SELECT 'relation ' || r.name, 'index definition',
           concat_ws(' ', pg_catalog.pg_get_indexdef(r.oid), i.indisprimary,
                     i.indisunique, i.indisreplident, i.indisclustered)
    FROM rel r JOIN pg_catalog.pg_index i ON i.indexrelid = r.oid
    UNION ALL
    SELECT 'relation ' || r.name, 'sequence',
           concat_ws(' ', s.seqtypid::pg_catalog.regtype::text, s.seqstart,
                     s.seqincrement, s.seqmax, s.seqmin, s.seqcache, s.seqcycle,
                     (SELECT format('owned by %s.%I', d.refobjid::pg_catalog.regclass, a.attname)
                      FROM pg_catalog.pg_depend d
                      JOIN pg_catalog.pg_attribute a
                        ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
                      WHERE d.classid = 'pg_catalog.pg_class'::pg_catalog.regclass
                        AND d.objid = r.oid AND d.deptype IN ('a', 'i')
                        AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass))
    FROM rel r JOIN pg_catalog.pg_sequence s ON s.seqrelid = r.oid
    UNION ALL
    -- Columns in their order among the columns not dropped.  (This
    -- server records a pg_attver option of its own on every column.)
    SELECT 'relation ' || r.name,
           'column ' || row_number() OVER (PARTITION BY r.oid ORDER BY a.attnum)
           || ' ' || a.attname,
           concat_ws(' ', pg_catalog.format_type(a.atttypid, a.atttypmod),
                     CASE WHEN a.attnotnull THEN 'not null' END,
                     'default ' || pg_catalog.pg_get_expr(ad.adbin, ad.adrelid),
                     'generated ' || nullif(a.attgenerated, '')::text,
                     'identity ' || nullif(a.attidentity, '')::text,
                     'collate ' || CASE WHEN a.attcollation <> t.typcollation
                                        THEN a.attcollation::pg_catalog.regcollation::text END,
                     (SELECT pg_catalog.array_agg(o ORDER BY o)
                      FROM unnest(a.attoptions) o WHERE o NOT LIKE 'pg\_attver=%')::text,
                     a.attacl::text, a.attstattarget)
    FROM rel r
    JOIN pg_catalog.pg_attribute a
      ON a.attrelid = r.oid AND a.attnum > 0 AND NOT a.attisdropped
    JOIN pg_catalog.pg_type t ON t.oid = a.atttypid
    LEFT JOIN pg_catalog.pg_attrdef ad ON ad.adrelid = a.attrelid AND ad.adnum = a.attnum
    WHERE r.relkind <> 'i'
    UNION ALL
    SELECT 'relation ' || r.name, 'constraint ' || co.conname,
           concat_ws(' ', co.contype, pg_catalog.pg_get_constraintdef(co.oid),
                     co.condeferrable, co.condeferred, co.convalidated, co.connoinherit)
    FROM rel r JOIN pg_catalog.pg_constraint co ON co.conrelid = r.oid
    UNION ALL
    -- The internal triggers are those of the foreign keys, named by oid.
    SELECT 'relation ' || r.name, 'trigger ' || tg.tgname,
           concat_ws(' ', pg_catalog.pg_get_triggerdef(tg.oid), tg.tgenabled)
    FROM rel r JOIN pg_catalog.pg_trigger tg ON tg.tgrelid = r.oid AND NOT tg.tgisinternal
    UNION ALL
    SELECT 'relation ' || r.name, 'rule ' || ru.rulename, pg_catalog.pg_get_ruledef(ru.oid)
    FROM rel r JOIN pg_catalog.pg_rewrite ru ON ru.ev_class = r.oid
    WHERE ru.rulename <> '_RETURN'
    UNION ALL
    SELECT 'relation ' || r.name, 'policy ' || po.polname,
           concat_ws(' ', po.polcmd, po.polpermissive, po.polroles::text,
                     pg_catalog.pg_get_expr(po.polqual, po.polrelid),
                     pg_catalog.pg_get_expr(po.polwithcheck, po.polrelid))
    FROM rel r JOIN pg_catalog.pg_policy po ON po.polrelid = r.oid
    UNION ALL
    SELECT 'function ' || f.name, 'signature',
           concat_ws(' ', pg_catalog.pg_get_function_arguments(f.oid), '->',
                     pg_catalog.pg_get_function_result(f.oid))
    FROM fn f
    UNION ALL
    SELECT 'function ' || f.name, 'attributes',
           concat_ws(' ', f.prokind, l.lanname, f.provolatile, f.proparallel,
                     f.proisstrict, f.prosecdef, f.proleakproof, f.procost, f.prorows,
                     f.proconfig::text, f.proacl::text,
                     f.proowner::pg_catalog.regrole::text, f.prosupport, f.probin)
    FROM fn f JOIN pg_catalog.pg_language l ON l.oid = f.prolang
    UNION ALL
    SELECT 'function ' || f.name, 'source', f.prosrc
    FROM fn f
    UNION ALL
    -- Types of their own: not the row and array types of relations.
    SELECT 'type ' || format('%I.%I', nsp.nspname, t.typname), 'definition',
           concat_ws(' ', t.typtype, t.typacl::text,
                     pg_catalog.format_type(t.typbasetype, t.typtypmod))
    FROM pg_catalog.pg_type t JOIN nsp ON nsp.oid = t.typnamespace
    LEFT JOIN pg_catalog.pg_class c ON c.oid = t.typrelid
    WHERE (t.typrelid = 0 OR c.relkind = 'c') AND t.typelem = 0
    UNION ALL
    -- Comments on anything in these schemas, on the schemas, and on what
    -- hangs off their tables (constraints, triggers, rules, policies).
    SELECT 'comment', (i).type || ' ' || (i).identity, x.description
    FROM (SELECT pg_catalog.pg_identify_object(d.classoid, d.objoid, d.objsubid) AS i,
                 d.description
          FROM pg_catalog.pg_description d) x
    WHERE (i).schema IN (SELECT nspname FROM nsp)
       OR ((i).type = 'schema' AND (i).identity IN (SELECT nspname FROM nsp))
       OR (i).identity ~ ' on (stg|dds|cdm|dwh)\.'
)
SELECT object || E'\t' || property || E'\t' || pg_catalog.to_json(value)::text
FROM prop
ORDER BY 1;
};

# The catalog lines of a database, with extra statements run first in a
# transaction that is rolled back.
sub catalog
{
	my ($db, $before) = @_;
	$before //= '';
	my $lines = $node->safe_psql($db, "BEGIN;\n$before;\n$catalog_sql;\nROLLBACK;");
	return [ split /\n/, $lines ];
}

# Lines in one list and not the other, marked "< " (a) or "> " (b).
sub differences
{
	my ($a, $b) = @_;
	my %in_a = map { $_ => 1 } @$a;
	my %in_b = map { $_ => 1 } @$b;
	return [ (map { "< $_" } grep { !$in_b{$_} } @$a),
		(map { "> $_" } grep { !$in_a{$_} } @$b) ];
}

my $catalog_a = catalog('a');
my $catalog_b = catalog('b');
ok(scalar(@$catalog_b) > 500,
	'the catalog of a fresh install has ' . scalar(@$catalog_b) . ' properties');
my $diff = differences($catalog_a, $catalog_b);
is(scalar(@$diff), 0,
	'the catalog of the updated database equals a fresh install (< updated, > fresh)')
  or diag(join("\n", @$diff));

# The comparison sees a change of each kind that an update script could
# forget.
my %forgotten = (
	'COMMENT ON FUNCTION dwh.verify() IS NULL' =>
	  qr/^> comment\tfunction dwh\.verify\(\)/,
	q{CREATE OR REPLACE FUNCTION dwh.user_lock_key() RETURNS bigint
	  LANGUAGE sql IMMUTABLE PARALLEL SAFE AS 'SELECT 1::bigint'} =>
	  qr/^< function dwh\.user_lock_key\(\)\tsource/,
	'ALTER FUNCTION dwh.verify() SET work_mem = 65536' =>
	  qr/^< function dwh\.verify\(\)\tattributes/,
	'DROP TRIGGER order_events_lock ON stg.order_events' =>
	  qr/^> relation stg\.order_events\ttrigger order_events_lock/,
	'ALTER TABLE stg.user_history ADD COLUMN note text' =>
	  qr/^< relation stg\.user_history\tcolumn 6 note/,
	'CREATE INDEX ON dds.h_order (load_dt)' =>
	  qr/^< relation dds\.h_order_load_dt_idx\tindex definition/,
	'ALTER TABLE dds.s_user_names DROP CONSTRAINT s_user_names_h_user_pk_fkey' =>
	  qr/^> relation dds\.s_user_names\tconstraint s_user_names_h_user_pk_fkey/,
	'GRANT SELECT ON dwh.dead_letters TO PUBLIC' =>
	  qr/^< relation dwh\.dead_letters\tattributes/,
	q{ALTER EXTENSION dwh DROP TABLE stg.user_history;
	  ALTER EXTENSION dwh ADD TABLE stg.user_history} =>
	  qr/^> extension\tdumped stg\.user_history/,
	q{ALTER EXTENSION dwh DROP VIEW dwh.user_versions} =>
	  qr/^> extension\tmember view dwh\.user_versions/,
	q{CREATE OR REPLACE VIEW dwh.user_versions AS
	  SELECT object_id, coalesce(update_ts, '-infinity') AS version, payload FROM stg.users} =>
	  qr/^< relation dwh\.user_versions\tview definition/,
	'GRANT CREATE ON SCHEMA stg TO PUBLIC' =>
	  qr/^< schema stg\towner and privileges/,
	'ALTER DEFAULT PRIVILEGES IN SCHEMA cdm GRANT SELECT ON TABLES TO PUBLIC' =>
	  qr/^< schema cdm\tdefault privileges r/,
	'ALTER SEQUENCE stg.users_id_seq INCREMENT BY 2' =>
	  qr/^< relation stg\.users_id_seq\tsequence/,
	'CREATE RULE no_update AS ON UPDATE TO dwh.tag_rules DO INSTEAD NOTHING' =>
	  qr/^< relation dwh\.tag_rules\trule no_update/,
	'CREATE POLICY mine ON dwh.dead_letters USING (true)' =>
	  qr/^< relation dwh\.dead_letters\tpolicy mine/,
	q{CREATE TYPE dwh.forgotten AS ENUM ('x')} =>
	  qr/^< type dwh\.forgotten\tdefinition/);
for my $change (sort keys %forgotten)
{
	my $seen = differences(catalog('a', $change), $catalog_b);
	ok((grep { $_ =~ $forgotten{$change} } @$seen),
		"the comparison sees a forgotten change: $change")
	  or diag(join("\n", @$seen));
}

# Every stg, dds and cdm table of a equals b's, but for the load-time
# columns of docs/data-rule.md.
my $tables = $node->safe_psql(
	'b', q{
SELECT string_agg(format('%I.%I', n.nspname, c.relname), ' '
                  ORDER BY format('%I.%I', n.nspname, c.relname))
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p') AND n.nspname IN ('stg', 'dds', 'cdm')});
is( $node->safe_psql(
		'a', q{
SELECT string_agg(format('%I.%I', n.nspname, c.relname), ' '
                  ORDER BY format('%I.%I', n.nspname, c.relname))
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p') AND n.nspname IN ('stg', 'dds', 'cdm')}),
	$tables,
	'a and b have the same stg, dds and cdm tables');

sub data_fingerprint
{
	my ($db, $table) = @_;
	my @load_time = ('id', 'loaded_at', 'received_at');
	push @load_time, 'load_dt', 'load_src'
	  if $table =~ /^dds\.[hl]_/ && $table ne 'dds.l_product_category';
	my $drop = join(', ', map { "'$_'" } @load_time);
	return $node->safe_psql(
		$db, qq{
SELECT count(*) || ' ' || md5(coalesce(string_agg(r, E'\\n' ORDER BY r), ''))
FROM (SELECT (to_jsonb(t) - ARRAY[$drop])::text AS r FROM $table t) s});
}
for my $t (split / /, $tables)
{
	my $fingerprint = data_fingerprint('b', $t);
	is(data_fingerprint('a', $t), $fingerprint, "$t: a equals b ($fingerprint)");
}
# A dump taken under 1.0 holds DDS and the marts too: restored into 1.0
# (as 1.0 restored, in pg_dump's order) and updated, it gives what the
# update of a gave, differences kept aside included.
$node->safe_psql('postgres', 'CREATE DATABASE c');
$node->safe_psql('c', q{CREATE EXTENSION dwh VERSION '1.0'});
$node->command_ok([ 'pg_restore', '--data-only', '-d', 'c', "$dir/a-1.0.dump" ],
	'pg_restore --data-only of the 1.0 dump into 1.0');
# The update holds STG, DDS and the marts it recomputes until it commits:
# readers wait too (README, "Upgrading").
my $updater = $node->background_psql('c', on_error_stop => 0);
$updater->query('BEGIN; ALTER EXTENSION dwh UPDATE');
# Its WARNING (the differences kept aside) is expected; an ERROR is not.
is($updater->{stderr} =~ /ERROR/ ? $updater->{stderr} : '', '',
	'the restored 1.0 warehouse is updated');
$updater->{stderr} = '';
foreach my $t ('stg.order_events', 'stg.users', 'dds.h_order', 'dds.s_order_status',
	'cdm.user_product_counters', 'cdm.user_category_counters')
{
	my ($r, $o, $e) = $node->psql('c', "SET lock_timeout = '200ms'; SELECT count(*) FROM $t");
	like($e, qr/ERROR:  canceling statement due to lock timeout/,
		"a reader of $t waits while the update runs");
}
$updater->query_safe('COMMIT');
$updater->quit;
is($node->safe_psql('c', 'SELECT count(*) FROM dwh.verify()'),
	'0', 'dwh.verify() is empty in it');
for my $t ((split / /, $tables), 'dwh_update_1_1.vault_differences')
{
	is(data_fingerprint('c', $t), data_fingerprint('a', $t),
		"$t: the restored and updated 1.0 dump equals a");
}

# A 1.0 dump's other events and dead letters restored with --data-only
# into a fresh 1.1: its COPY names 1.0's columns only, and the rows are
# those of the update, ids and times included.
$node->safe_psql('postgres', 'CREATE DATABASE d');
$node->safe_psql('d', 'CREATE EXTENSION dwh');
$node->command_ok(
	[
		'pg_restore', '--data-only', '-n', 'stg', '-n', 'dwh',
		'-t', 'other_events', '-t', 'dead_letters',
		'-d', 'd', "$dir/a-1.0.dump"
	],
	'pg_restore --data-only of the 1.0 dump\'s other events and dead letters into 1.1');
for my $t ('stg.other_events', 'dwh.dead_letters')
{
	my $all = qq{
SELECT count(*) || ' ' || md5(coalesce(string_agg(r, E'\\n' ORDER BY r), ''))
FROM (SELECT to_jsonb(t)::text AS r FROM $t t) s};
	is($node->safe_psql('d', $all), $node->safe_psql('a', $all),
		"$t: the 1.0 dump's rows restored into 1.1 equal the updated ones");
}

# The whole 1.0 dump restored straight into a fresh 1.1 (docs/upgrades.md):
# its rows of DDS and the marts (1.0 dumped them, 1.1 does not) are
# refused, one error a table, so that pg_restore ends with a non-zero
# status; STG, restored after them, rebuilds them through its triggers,
# and the warehouse is the update's.  (Loaded before STG, they made the
# STG triggers take every order for known: the mart 1.1 added stayed
# empty, pg_restore's status 0.)
$node->safe_psql('postgres', 'CREATE DATABASE f');
$node->safe_psql('f', 'CREATE EXTENSION dwh');
my ($restore_out, $restore_err) = PostgreSQL::Test::Utils::run_command(
	[
		'pg_restore', '--data-only', '-h', $node->host, '-p', $node->port,
		'-d', 'f', "$dir/a-1.0.dump"
	]);
my @refused = sort $restore_err =~ /ERROR:  rows of (\S+) are not restored: they are recomputed from STG/g;
is( "@refused",
	'cdm.user_category_counters cdm.user_product_counters dds.h_category dds.h_order '
	  . 'dds.h_product dds.h_restaurant dds.h_user dds.l_order_product dds.l_order_user '
	  . 'dds.l_product_category dds.l_product_restaurant dds.s_order_cost dds.s_order_status '
	  . 'dds.s_product_names dds.s_restaurant_names dds.s_user_names',
	'pg_restore of the whole 1.0 dump into 1.1: the rows of each table of DDS and the marts are refused')
  or diag($restore_err);
like($restore_err, qr/HINT:  Let pg_restore go on .* or restore into 1\.0, then update/,
	'saying what to do');
like($restore_err, qr/errors ignored on restore: 16/, 'pg_restore reports the errors');
is($node->safe_psql('f', 'SELECT count(*) FROM dwh.verify()'),
	'0', 'the 1.0 dump restored into 1.1: dwh.verify() is empty');
for my $t (split / /, $tables)
{
	next unless $t =~ /^(stg\.(order_events|users|restaurants)|dds\.|cdm\.user_(product|category|order)_counters)/;
	is(data_fingerprint('f', $t), data_fingerprint('a', $t),
		"$t: the 1.0 dump restored into 1.1 equals the update");
}

# 1.0 let a message repeat at a position named without a topic; 1.1's
# unique indexes cannot be built over such repeats, and the update removes
# no row of what was received: it stops, says which, and goes through once
# the repeat is deleted.
$node->safe_psql('postgres', 'CREATE DATABASE e');
$node->safe_psql(
	'e', q{
CREATE EXTENSION dwh VERSION '1.0';
INSERT INTO dwh.dead_letters (source, topic, kafka_partition, kafka_offset, raw, reason, sqlstate)
SELECT 'sql', NULL, 0, 5, convert_to('[not json', 'UTF8'), 'not JSON', '22032'
FROM generate_series(1, 2);
});
($ret, $out, $err) = $node->psql('e', 'ALTER EXTENSION dwh UPDATE');
isnt($ret, 0, 'a 1.0 database with a repeated message at a position is not updated');
like(
	$err,
	qr/ERROR:  cannot update dwh to 1\.1: a message is stored more than once at the same Kafka position\nDETAIL:  0 messages of stg\.other_events and 1 of dwh\.dead_letters are stored more than once.*\nHINT:  Delete all but the first row \(lowest id\) of each, then run ALTER EXTENSION dwh UPDATE again\./s,
	'the update says why and what to do');
$node->safe_psql('e', 'DELETE FROM dwh.dead_letters WHERE id = 2');
$node->safe_psql('e', 'ALTER EXTENSION dwh UPDATE');
is($node->safe_psql('e', q{SELECT extversion FROM pg_extension WHERE extname = 'dwh'}),
	$version, 'without the repeat it is');
is($node->safe_psql('e', q{SELECT count(*) FROM pg_namespace WHERE nspname = 'dwh_update_1_1'}),
	'0', 'with no row of DDS differing, no schema of differences is left');

for my $t ('stg.order_events', 'stg.users', 'stg.restaurants', 'dds.s_order_status',
	'dds.s_product_names', 'dds.l_product_category', 'cdm.user_product_counters',
	'cdm.user_category_counters')
{
	ok(data_fingerprint('a', $t) !~ /^0 /, "$t is not empty");
}

# The workers go on by themselves (to a broker and a Redis that are not
# there).
for my $worker ('kafka 1', 'redis', 'tags')
{
	ok( $node->poll_query_until(
			'a',
			"SELECT state NOT LIKE 'waiting: extension%' AND pid IS NOT NULL
			 FROM dwh.status WHERE worker = '$worker'"),
		"$worker worker goes on after the update");
}
is( $node->safe_psql(
		'a', q{SELECT count(*) FROM dwh.status WHERE state LIKE '%ALTER EXTENSION%'}),
	'0',
	'no worker waits for the update any more');

# New orders after the update: a new order, an older version of a stored
# one (kept in the history now), a newer version of another.
my $mart_before = $node->safe_psql(
	'a', q{
SELECT coalesce(sum(order_cnt), 0) FROM cdm.user_product_counters
WHERE user_id = dwh.hash_key('u3')});
is( $node->safe_psql(
		'a', q{
SELECT received, applied, unchanged FROM dwh.ingest_orders(ARRAY[
    convert_to(jsonb_build_object('object_id', 5001, 'object_type', 'order',
        'sent_dttm', '2023-09-01 12:05:00',
        'payload', jsonb_set(jsonb_set(load.order_payload(1, 'CLOSED', '2023-09-01 12:00:00', -1, 0),
                                       '{user,id}', '"u3"'),
                             '{order_items}',
                             '[{"id": "d5", "name": "Чиз Наан", "price": 100, "quantity": 1},
                               {"id": "d6", "name": "Палак Панир", "price": 100, "quantity": 1}]'))::text, 'UTF8'),
    convert_to(jsonb_build_object('object_id', 1011, 'object_type', 'order',
        'sent_dttm', '2023-08-15 08:00:00',
        'payload', load.order_payload(11, 'CANCELLED', '2023-08-15 07:00:00', -1, 0))::text, 'UTF8'),
    convert_to(jsonb_build_object('object_id', 1012, 'object_type', 'order',
        'sent_dttm', '2023-09-01 13:05:00',
        'payload', load.order_payload(12, 'CANCELLED', '2023-09-01 13:00:00', -1, 0))::text, 'UTF8')])}),
	'3|2|1',
	'after the update: a new order and a newer version applied, an older version unchanged');
is( $node->safe_psql(
		'a', q{SELECT string_agg(object_id::text, ' ' ORDER BY object_id) FROM stg.order_event_history}),
	'1011 1012',
	'superseded versions are kept in the history table now');
is( $node->safe_psql(
		'a', q{
SELECT coalesce(sum(order_cnt), 0) FROM cdm.user_product_counters
WHERE user_id = dwh.hash_key('u3')}),
	$mart_before + 2,
	"the new order's two dishes are counted for its user");
is($node->safe_psql('a', 'SELECT count(*) FROM dwh.verify()'),
	'0', 'dwh.verify() is empty after the new orders');

$node->stop;
done_testing();
