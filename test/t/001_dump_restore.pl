# Backups: pg_dump -Fc of a loaded warehouse, restored with pg_restore into
# a fresh database, must bring back every row of every stg, dds and cdm
# table (DDS and the marts rebuilt from STG by the triggers, equal but for
# their load-time columns) and of dwh.dead_letters and the workers' tables
# (stored offsets, gaps, Redis keys and the queue of wanted ids), leave
# verify() empty,
# and restore the sequences so that the next order gets a fresh id.  Tag
# rules, tags (with the time each was granted) and tag events come back as
# they were dumped, not granted again, and a new order grants a tag with an
# event id past the restored ones.  The events that the Kafka feed had not
# produced yet (dwh.tag_outbox: a topic set, no broker) come back pending.
# A database set to SERIALIZABLE is restored with pg_restore -C as the
# README says.

use strict;
use warnings;

use IPC::Run;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $node = PostgreSQL::Test::Cluster->new('dump_restore');
# dwh needs a UTF8 database, whatever the locale of the machine.
$node->init(extra => [ '--encoding=UTF8', '--locale=C' ]);
$node->append_conf('postgresql.conf', "shared_preload_libraries = 'dwh'\n");
$node->start;

my $src = 'dwh_source';
my $dst = 'dwh_restored';

$node->safe_psql('postgres', "CREATE DATABASE $src");
$node->safe_psql($src, 'CREATE EXTENSION dwh');

# A topic for the tag feed and no broker: every event waits in the outbox.
$node->safe_psql('postgres',
	"ALTER SYSTEM SET dwh.tags_topic = 'user-tags'; SELECT pg_reload_conf()");
ok( $node->poll_query_until(
		$src, "SELECT current_setting('dwh.tags_topic') = 'user-tags'"),
	'new sessions see the tag feed topic');

# Tag rules (docs/tags.md), written before the data: the tags follow the
# orders, and the rules, tags and events are dumped.
$node->safe_psql(
	$src, q{
INSERT INTO dwh.tag_rules (tag, kind, category_name, product_id, threshold) VALUES
    ('pastry lover', 'category', 'Выпечка', NULL, 20),
    ('lassi fan', 'dish', NULL, '6276e8cd0cf48b4cded00882', 10),
    ('regular', 'all_orders', NULL, NULL, 30),
    ('favourite', 'favourite_category', NULL, NULL, 1);
});

# Dictionaries (docs/formats.md, section 2): a few users, two restaurants whose
# menus spread their dishes over three categories.
$node->safe_psql(
	$src, q{
INSERT INTO stg.users (object_id, payload)
SELECT u.id,
       jsonb_build_object('_id', u.id,
                          'name', 'Пользователь ' || n,
                          'login', 'user_' || n,
                          'update_ts_utc', '2023-08-11 16:44:59')
FROM generate_series(0, 6) n,
     LATERAL (SELECT '626a81ce9a8cd1920641e2' || lpad(to_hex(n), 2, '0') AS id) u;

INSERT INTO stg.restaurants (object_id, payload) VALUES
('a51e4e31ae4602047ec52534',
 '{"_id": "a51e4e31ae4602047ec52534", "name": "Кубдари",
   "menu": [
     {"_id": "3de9442da57a50ccfaf72866", "name": "Пхали с фасолью", "price": 200, "category": "Закуски"},
     {"_id": "a56c4b70b7d0e6522ccb3c9f", "name": "Салат Греческий", "price": 350, "category": "Салаты"},
     {"_id": "6276e8cd0cf48b4cded00870", "name": "Долма", "price": 280, "category": "Закуски"},
     {"_id": "6276e8cd0cf48b4cded00871", "name": "Хачапури по-мегрельски", "price": 450, "category": "Выпечка"}
   ],
   "update_ts_utc": "2023-08-11 16:50:44"}'),
('ef8c42c19b7518a9aebec106',
 '{"_id": "ef8c42c19b7518a9aebec106", "name": "Вкус Индии",
   "menu": [
     {"_id": "6276e8cd0cf48b4cded00880", "name": "Чиз Наан", "price": 120, "category": "Выпечка"},
     {"_id": "6276e8cd0cf48b4cded00881", "name": "Палак Панир", "price": 390, "category": "Основные блюда"},
     {"_id": "6276e8cd0cf48b4cded00882", "name": "Сладкий Ласси", "price": 150, "category": "Напитки"}
   ],
   "update_ts_utc": "2023-08-11 16:51:02"}');

-- A renamed user: a second version, so that a satellite has history.
UPDATE stg.users
SET payload = jsonb_set(payload, '{update_ts_utc}', '"2023-08-12 09:00:00"')
              || '{"name": "Гаврила Архипович Игнатьев"}'
WHERE object_id = '626a81ce9a8cd1920641e200';
});

# Orders (docs/formats.md, section 1), generated in SQL.  Every restaurant has
# dishes on its menu and dishes that no menu names; an order takes two to
# four of its restaurant's dishes; one order in five is CANCELLED.
my $orders_sql = q{
WITH dish(restaurant_id, idx, id, name, price) AS (VALUES
    ('a51e4e31ae4602047ec52534', 0, '3de9442da57a50ccfaf72866', 'Пхали с фасолью', 200),
    ('a51e4e31ae4602047ec52534', 1, 'a56c4b70b7d0e6522ccb3c9f', 'Салат Греческий', 350),
    ('a51e4e31ae4602047ec52534', 2, '6276e8cd0cf48b4cded00870', 'Долма', 280),
    ('a51e4e31ae4602047ec52534', 3, '6276e8cd0cf48b4cded00871', 'Хачапури по-мегрельски', 450),
    ('a51e4e31ae4602047ec52534', 4, '6276e8cd0cf48b4cded00879', 'Лимонад грузинский', 160),
    ('ef8c42c19b7518a9aebec106', 0, '6276e8cd0cf48b4cded00880', 'Чиз Наан', 120),
    ('ef8c42c19b7518a9aebec106', 1, '6276e8cd0cf48b4cded00881', 'Палак Панир', 390),
    ('ef8c42c19b7518a9aebec106', 2, '6276e8cd0cf48b4cded00882', 'Сладкий Ласси', 150),
    ('ef8c42c19b7518a9aebec106', 3, '6276e8cd0cf48b4cded00889', 'Чай Масала', 90)
),
o AS (
    SELECT g, %FIRST_ID% + g AS object_id,
           CASE WHEN g % 2 = 0 THEN 'a51e4e31ae4602047ec52534'
                ELSE 'ef8c42c19b7518a9aebec106' END AS restaurant_id,
           '626a81ce9a8cd1920641e2' || lpad(to_hex(g % 7), 2, '0') AS user_id,
           CASE WHEN g % 5 = 0 THEN 'CANCELLED' ELSE 'CLOSED' END AS status,
           timestamp '2023-04-01 10:00:00' + g * interval '7 minutes' AS ts
    FROM generate_series(1, %COUNT%) g
),
items AS (
    SELECT o.g,
           jsonb_agg(jsonb_build_object('id', d.id, 'name', d.name,
                                        'price', d.price,
                                        'quantity', 1 + (o.g + d.idx) % 5)
                     ORDER BY d.idx) AS items,
           sum(d.price * (1 + (o.g + d.idx) % 5)) AS cost
    FROM o JOIN dish d
      ON d.restaurant_id = o.restaurant_id AND (o.g + d.idx) % 3 <> 0
    GROUP BY o.g
)
SELECT array_agg(convert_to(jsonb_build_object(
           'object_id', o.object_id,
           'object_type', 'order',
           'sent_dttm', to_char(o.ts + interval '2 hours', 'YYYY-MM-DD HH24:MI:SS'),
           'payload', jsonb_build_object(
               'restaurant', jsonb_build_object('id', o.restaurant_id),
               'date', to_char(o.ts, 'YYYY-MM-DD HH24:MI:SS'),
               'user', jsonb_build_object('id', o.user_id),
               'order_items', i.items,
               'bonus_payment', 0,
               'cost', i.cost,
               'payment', i.cost,
               'bonus_grant', 0,
               'statuses', jsonb_build_array(
                   jsonb_build_object('status', o.status,
                                      'dttm', to_char(o.ts, 'YYYY-MM-DD HH24:MI:SS')),
                   jsonb_build_object('status', 'COOKING',
                                      'dttm', to_char(o.ts - interval '40 minutes', 'YYYY-MM-DD HH24:MI:SS')),
                   jsonb_build_object('status', 'OPEN',
                                      'dttm', to_char(o.ts - interval '55 minutes', 'YYYY-MM-DD HH24:MI:SS'))),
               'final_status', o.status,
               'update_ts', to_char(o.ts, 'YYYY-MM-DD HH24:MI:SS')))::text,
           'UTF8') ORDER BY o.g)
FROM o JOIN items i USING (g)
};

# The SQL of a batch of $count generated orders with ids $first_id + 1...
sub orders_batch
{
	my ($first_id, $count) = @_;
	my $sql = $orders_sql;
	$sql =~ s/%FIRST_ID%/$first_id/g;
	$sql =~ s/%COUNT%/$count/g;
	return $sql;
}

my $batch = orders_batch(1000000, 400);
is( $node->safe_psql(
		$src,
		"SELECT received, applied, other_type, dead_lettered
		 FROM dwh.ingest_orders(($batch)
		     || convert_to('{\"object_id\": 7, \"object_type\": \"heartbeat\", \"sent_dttm\": \"2023-04-08 20:27:36\"}', 'UTF8')
		     || convert_to('{not json', 'UTF8'))"),
	'402|400|1|1',
	'400 orders applied, one message of another type kept, one malformed message dead-lettered'
);

# A later version of some orders: every tenth order is cancelled after all,
# so that those orders leave the marts and their status satellites have
# two rows.
is( $node->safe_psql(
		$src, q{
SELECT received, applied
FROM dwh.ingest_orders(ARRAY(
    SELECT convert_to(jsonb_build_object(
               'object_id', e.object_id, 'object_type', 'order',
               'sent_dttm', to_char(v.ts, 'YYYY-MM-DD HH24:MI:SS'),
               'payload', e.payload
                   || jsonb_build_object('final_status', 'CANCELLED',
                                         'update_ts', to_char(v.ts, 'YYYY-MM-DD HH24:MI:SS')))::text,
                      'UTF8')
    FROM stg.order_events e,
         LATERAL (SELECT e.update_ts + interval '3 hours' AS ts) v
    WHERE e.object_id % 10 = 3 AND e.payload->>'final_status' = 'CLOSED'
    ORDER BY e.object_id))}),
	'40|40',
	'40 CLOSED orders cancelled by a later version');

# A rule written and dropped: its tags granted, then revoked.
$node->safe_psql($src, q{
INSERT INTO dwh.tag_rules (tag, kind) VALUES ('dropped', 'all_orders');
DELETE FROM dwh.tag_rules WHERE tag = 'dropped';
});

is($node->safe_psql($src, 'SELECT count(*) FROM dwh.verify()'),
	'0', 'marts consistent before the dump');

# The workers' operational tables: stored offsets (as dwh.kafka_seek()
# writes them), a closed gap and an open one, the Redis keys known in each
# state; dwh.redis_wanted holds the ids the orders' hubs queued (no Redis
# worker runs here).
$node->safe_psql($src, q{
SELECT dwh.kafka_seek(0, 420, 'orders'), dwh.kafka_seek(1, 77, 'orders');
INSERT INTO dwh.kafka_gaps (topic, kafka_partition, next_offset, log_start_offset,
                            log_end_offset, action, detected_at, resumed_offset, resumed_at)
VALUES ('orders', 0, 300, 350, 400, 'skipped', '2023-04-08 10:00:00+00', 350, '2023-04-08 10:00:00+00'),
       ('orders', 1, 77, 80, 90, 'stopped', '2023-04-08 11:00:00+00', NULL, NULL);
INSERT INTO dwh.redis_keys (key, kind, state, value_hash, reason, first_seen_at, changed_at)
VALUES ('626a81ce9a8cd1920641e201', 'user', 'mirrored', '\x00112233445566778899aabbccddeeff',
        NULL, '2023-04-01 10:00:00+00', '2023-04-02 10:00:00+00'),
       ('626a81ce9a8cd1920641e202', 'user', 'missing', NULL, NULL, '2023-04-01 10:00:00+00', NULL),
       ('some:other:key', 'unknown', 'refused', NULL, 'value of unknown shape', '2023-04-01 10:00:00+00', NULL),
       ('a51e4e31ae4602047ec52599', 'restaurant', 'new', NULL, NULL, '2023-04-03 10:00:00+00', NULL);
});

# Row count and checksum of every table holding data of the warehouse: all
# tables of stg, dds and cdm, and dwh.dead_letters, the tag rules, the tag
# feed's outbox and the workers' tables.
my $tables = $node->safe_psql(
	$src, q{
SELECT format('%I.%I', n.nspname, c.relname)
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p')
  AND (n.nspname IN ('stg', 'dds', 'cdm')
       OR (n.nspname = 'dwh' AND c.relname IN ('dead_letters', 'tag_rules', 'tag_outbox',
                                               'kafka_offsets', 'kafka_gaps',
                                               'redis_keys', 'redis_wanted')))
ORDER BY 1});
my @tables = split /\n/, $tables;
ok(scalar(@tables) >= 20, 'found ' . scalar(@tables) . ' warehouse tables');

# "count|md5" of a table's rows, sorted by their text, without the columns
# that docs/data-rule.md lists as load-time: the restore rebuilds DDS and
# the marts from STG, so hubs and links get new load times and mart rows
# new ids.  loaded_at, the time a version was stored in STG, is compared
# separately below.
sub table_fingerprint
{
	my ($db, $table) = @_;
	my @load_time = ('loaded_at');
	push @load_time, 'load_dt', 'load_src'
	  if $table =~ /^dds\.[hl]_/ && $table ne 'dds.l_product_category';
	# The tag events are restored as they were dumped, ids included; a
	# tag's since too, compared separately below.
	push @load_time, 'id' if $table =~ /^cdm\./ && $table ne 'cdm.user_tag_events';
	push @load_time, 'since' if $table eq 'cdm.user_tags_held';
	my $drop = join(', ', map { "'$_'" } @load_time);
	# The queue of ids for the Redis worker gets each id again when the
	# restore rebuilds the hubs; the worker takes each once (DISTINCT ON,
	# ON CONFLICT DO NOTHING), so what it holds is the set of its rows.
	my $distinct = $table eq 'dwh.redis_wanted' ? 'DISTINCT' : '';
	return $node->safe_psql(
		$db, qq{
SELECT count(*), md5(coalesce(string_agg(r, E'\\n' ORDER BY r), ''))
FROM (SELECT $distinct (to_jsonb(t) - ARRAY[$drop])::text AS r FROM $table t) s});
}

# The same over (id, loaded_at) of an STG table.
sub loaded_at_fingerprint
{
	my ($db, $table) = @_;
	return $node->safe_psql(
		$db, qq{
SELECT md5(string_agg(id || ' ' || loaded_at, E'\\n' ORDER BY id))
FROM $table});
}

my %before;
$before{$_} = table_fingerprint($src, $_) for @tables;
my @stg_versioned = ('stg.order_events', 'stg.users', 'stg.restaurants');
my %loaded_before;
$loaded_before{$_} = loaded_at_fingerprint($src, $_) for @stg_versioned;

for my $t ('stg.order_events', 'stg.other_events', 'stg.users',
	'stg.restaurants', 'dds.h_order', 'dds.s_order_status', 'dds.s_user_names',
	'dds.l_product_category', 'cdm.user_product_counters',
	'cdm.user_category_counters', 'cdm.user_order_counters', 'cdm.user_tags_held',
	'cdm.user_tag_events', 'dwh.tag_rules', 'dwh.dead_letters', 'dwh.tag_outbox',
	'dwh.kafka_offsets', 'dwh.kafka_gaps', 'dwh.redis_keys', 'dwh.redis_wanted')
{
	my ($count) = split /\|/, ($before{$t} // '0');
	ok($count > 0, "$t has rows before the dump ($count)");
}

my $max_id_before =
  $node->safe_psql($src, 'SELECT max(id) FROM stg.order_events');

# Every rule holds for somebody, and the dropped one's tags were revoked:
# the dump carries grants and revokes.
is( $node->safe_psql(
		$src, q{
SELECT string_agg(DISTINCT tag, ', ') FROM cdm.user_tags}),
	'favourite, lassi fan, pastry lover, regular',
	'tags granted before the dump');
ok( $node->safe_psql($src,
		"SELECT count(*) FROM cdm.user_tag_events WHERE kind = 'revoke'") > 0,
	'tags revoked before the dump');
my $since_sql =
  q{SELECT md5(string_agg(user_id || tag || since, ',' ORDER BY user_id, tag)) FROM cdm.user_tags};
my $since_before = $node->safe_psql($src, $since_sql);

# Dump and restore into a fresh database.
my $dump = PostgreSQL::Test::Utils::tempdir() . '/dwh.dump';

# Run a client program against the node; true when it exits 0.  Its output
# goes to the test log, its stderr must be empty.
sub run_client
{
	my ($name, @cmd) = @_;
	my ($stdout, $stderr) = ('', '');
	note(join(' ', @cmd));
	my $ok = IPC::Run::run(\@cmd, '>', \$stdout, '2>', \$stderr);
	ok($ok, "$name exits 0");
	is($stderr, '', "$name reports no error");
	return $ok;
}

run_client('pg_dump', 'pg_dump', '-Fc', '-f', $dump,
	'-h', $node->host, '-p', $node->port, '-d', $src);

$node->safe_psql('postgres', "CREATE DATABASE $dst");
run_client('pg_restore', 'pg_restore', '-h', $node->host,
	'-p', $node->port, '-d', $dst, $dump);

for my $t (@tables)
{
	is(table_fingerprint($dst, $t), $before{$t},
		"$t: same row count and checksum after restore");
}

# pg_restore --enable-row-security leaves row_security on: the tags are
# still restored, not maintained (dwh.tags_restoring()), and the backup is
# as restorable as with the defaults.
$node->safe_psql('postgres', 'CREATE DATABASE restored_rls');
run_client('pg_restore --enable-row-security', 'pg_restore', '--enable-row-security',
	'-h', $node->host, '-p', $node->port, '-d', 'restored_rls', $dump);
for my $t (@tables)
{
	is(table_fingerprint('restored_rls', $t), $before{$t},
		"$t: same row count and checksum after pg_restore --enable-row-security");
}
is($node->safe_psql('restored_rls', 'SELECT count(*) FROM dwh.verify()'),
	'0', 'dwh.verify() is empty after pg_restore --enable-row-security');

# A database whose owner set default_transaction_isolation to SERIALIZABLE
# for it: pg_restore -C sets it again on the database it creates, and dwh
# refuses to write in such a transaction.  The restore fails, and says how
# to restore (the README's way), which then gives the warehouse back.
$node->safe_psql('postgres', "CREATE DATABASE serial_src TEMPLATE $src");
$node->safe_psql('postgres',
	q{ALTER DATABASE serial_src SET default_transaction_isolation = 'serializable'});
my $serial_dump = PostgreSQL::Test::Utils::tempdir() . '/serial.dump';
run_client('pg_dump of a SERIALIZABLE database', 'pg_dump', '-Fc', '-f', $serial_dump,
	'-h', $node->host, '-p', $node->port, '-d', 'serial_src');
$node->safe_psql('postgres', 'DROP DATABASE serial_src');
my ($restore_out, $restore_err) = ('', '');
ok( !IPC::Run::run(
		[ 'pg_restore', '-C', '-h', $node->host, '-p', $node->port, '-d', 'postgres', $serial_dump ],
		'>', \$restore_out, '2>', \$restore_err),
	'pg_restore -C of a SERIALIZABLE database fails');
like($restore_err,
	qr/cannot write the warehouse in a SERIALIZABLE transaction.*HINT:  This session restores a dump: restore with PGOPTIONS='-c default_transaction_isolation=read\\ committed'/s,
	'and says how to restore');
$node->safe_psql('postgres', 'DROP DATABASE serial_src');
{
	local $ENV{PGOPTIONS} = '-c default_transaction_isolation=read\ committed';
	run_client('pg_restore -C with PGOPTIONS', 'pg_restore', '-C',
		'-h', $node->host, '-p', $node->port, '-d', 'postgres', $serial_dump);
}
for my $t (@tables)
{
	is(table_fingerprint('serial_src', $t), $before{$t},
		"$t: same row count and checksum after pg_restore -C with PGOPTIONS");
}
is($node->safe_psql('serial_src', 'SELECT count(*) FROM dwh.verify()'),
	'0', 'dwh.verify() is empty after pg_restore -C with PGOPTIONS');

# The STG guard stamps loaded_at only when a newer version replaces a row,
# so a restore's COPY keeps the time each version was first stored.
for my $t (@stg_versioned)
{
	is(loaded_at_fingerprint($dst, $t), $loaded_before{$t},
		"$t: loaded_at preserved by restore");
}

is($node->safe_psql($dst, 'SELECT count(*) FROM dwh.verify()'),
	'0', 'marts consistent after restore');
is($node->safe_psql($dst, $since_sql), $since_before,
	'cdm.user_tags: since preserved by restore (the tags are restored, not granted again)');
my $max_event_restored =
  $node->safe_psql($dst, 'SELECT max(id) FROM cdm.user_tag_events');

# Sequences came back: new rows get ids past every restored one.  A new
# order of a new user adds rows to stg.order_events and to both marts, a
# message of another type a row to stg.other_events, a malformed message a
# row to dwh.dead_letters.
my @with_ids = ('stg.order_events', 'stg.other_events',
	'cdm.user_product_counters', 'cdm.user_category_counters',
	'dwh.dead_letters');
my %max_restored;
for my $t (@with_ids)
{
	$max_restored{$t} =
	  $node->safe_psql($dst, "SELECT coalesce(max(id), 0) FROM $t");
}
is($max_restored{'stg.order_events'},
	$max_id_before, 'max stg.order_events.id restored');

my $new_order = q{{"object_id": 2000001, "object_type": "order",
 "sent_dttm": "2023-04-09 12:00:00",
 "payload": {"restaurant": {"id": "ef8c42c19b7518a9aebec106"},
   "date": "2023-04-09 11:30:00",
   "user": {"id": "626a81ce9a8cd1920641e2ff"},
   "order_items": [
     {"id": "6276e8cd0cf48b4cded00880", "name": "Чиз Наан", "price": 120, "quantity": 2},
     {"id": "6276e8cd0cf48b4cded00882", "name": "Сладкий Ласси", "price": 150, "quantity": 1}],
   "bonus_payment": 0, "cost": 390, "payment": 390, "bonus_grant": 0,
   "statuses": [{"status": "CLOSED", "dttm": "2023-04-09 11:30:00"},
                {"status": "OPEN", "dttm": "2023-04-09 10:40:00"}],
   "final_status": "CLOSED", "update_ts": "2023-04-09 11:30:00"}}};
my ($ret, $stdout, $stderr) = $node->psql(
	$dst, qq{
SELECT received, applied, other_type, dead_lettered
FROM dwh.ingest_orders(ARRAY[
    convert_to(\$msg\$$new_order\$msg\$, 'UTF8'),
    convert_to('{"object_id": 8, "object_type": "heartbeat", "sent_dttm": "2023-04-09 12:00:00"}', 'UTF8'),
    convert_to('[1, 2', 'UTF8')])});
is($ret, 0, 'a new order is ingested into the restored database')
  or diag($stderr);
is($stdout, '3|1|1|1',
	'the new order is applied, the other type kept, the bad message dead-lettered'
);

for my $t (@with_ids)
{
	is( $node->safe_psql(
			$dst,
			"SELECT count(*) FROM $t WHERE id > $max_restored{$t}"),
		$t =~ /^cdm\./ ? '2' : '1',
		"$t: new rows got ids greater than every restored id");
}
is($node->safe_psql($dst, 'SELECT count(*) FROM dwh.verify()'),
	'0', 'marts consistent after the new order');
is( $node->safe_psql(
		$dst, qq{
SELECT string_agg(e.tag || ' ' || e.kind || ' ' || e.value, ', ' ORDER BY e.id)
FROM cdm.user_tag_events e
WHERE e.id > $max_event_restored AND e.user_id = dwh.hash_key('626a81ce9a8cd1920641e2ff')}),
	'favourite grant Выпечка',
	'the new order grants a tag in the restored database, with an event id past the restored ones');

$node->stop;
done_testing();
