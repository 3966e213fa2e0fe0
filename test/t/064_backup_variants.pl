# Backups taken and restored the ways a DBA might (README, "Backup and
# restore"): every variant that the README says restores the warehouse
# must give back every stg, dds and cdm table and the operational tables
# as the source holds them (count and checksum, as 001_dump_restore does),
# with dwh.verify() empty; a variant that cannot must fail with a clear
# error or is told apart by dwh.verify(), as the README says.
#
# The source holds orders and their older versions, users with history,
# tag rules (one windowed, one dropped: revokes), pending tag outbox rows
# (a topic and no broker for it), dead letters, stored offsets, a gap and
# Redis key states.  Its database is not the workers' (dwh.database), so
# nothing drains its outbox meanwhile.
#
# The variants: plain (psql -f with ON_ERROR_STOP, and -1), --inserts,
# --column-inserts, --rows-per-insert, --on-conflict-do-nothing (also
# replayed over the warehouse itself), directory with pg_restore -j 4,
# custom with pg_restore -1 --exit-on-error, tar, --section in three
# runs, --clean --if-exists over a loaded warehouse,
# --exclude-table-data, -n stg (which dumps nothing) and -t 'stg.*',
# CREATE EXTENSION then --data-only (also with -j 4), with and without
# --disable-triggers (then dwh.rebuild(vault => true)), pg_dumpall into
# another cluster, a database of ICU's collation, a database owner who is
# no superuser restoring --no-owner --no-privileges, an expiry pass on the
# source and on the restore.  Then with the Kafka worker: a dump taken
# while it applies orders, restored into a database it does not serve,
# then pointed at it: it resumes from the restored offsets, and no order
# is applied twice or lost; a restore into the database it serves is
# refused (it raced the worker: orders of the dump were lost), and one
# made with the workers held off as the README says resumes as well.

use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;

use DwhTest;
use IPC::Run;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep);

my $mock = start_mock_cluster(brokers => 1, partitions => 2);
my $node = new_dwh_node(
	'backup_variants',
	'dwh.kafka_consumers' => 1,
	'dwh.kafka_brokers' => $mock->{bootstrap},
	'dwh.kafka_topic' => $mock->{topic},
	'dwh.tags_topic' => 'user-tags');
my $tmp = PostgreSQL::Test::Utils::tempdir();
my @conn = ('-h', $node->host, '-p', $node->port);

my $src = 'src';
$node->safe_psql('postgres', "CREATE DATABASE $src");
$node->safe_psql($src, 'CREATE EXTENSION dwh');

# Rules first, a windowed one among them, so that the orders grant tags.
$node->safe_psql(
	$src, q{
INSERT INTO dwh.tag_rules (tag, kind, category_name, product_id, threshold, window_days) VALUES
    ('pastry lover', 'category', 'Выпечка', NULL, 20, NULL),
    ('lassi fan', 'dish', NULL, '6276e8cd0cf48b4cded00882', 10, NULL),
    ('regular', 'all_orders', NULL, NULL, 30, NULL),
    ('favourite', 'favourite_category', NULL, NULL, 1, NULL),
    ('recent', 'all_orders', NULL, NULL, 3, 30);
});

$node->safe_psql(
	$src, q{
INSERT INTO stg.users (object_id, payload)
SELECT u.id, jsonb_build_object('_id', u.id, 'name', 'Пользователь ' || n,
                                'login', 'user_' || n, 'update_ts_utc', '2023-08-11 16:44:59')
FROM generate_series(0, 6) n,
     LATERAL (SELECT '626a81ce9a8cd1920641e2' || lpad(to_hex(n), 2, '0') AS id) u;

INSERT INTO stg.restaurants (object_id, payload) VALUES
('a51e4e31ae4602047ec52534',
 '{"_id": "a51e4e31ae4602047ec52534", "name": "Кубдари",
   "menu": [
     {"_id": "3de9442da57a50ccfaf72866", "name": "Пхали с фасолью", "price": 200, "category": "Закуски"},
     {"_id": "a56c4b70b7d0e6522ccb3c9f", "name": "Салат Греческий", "price": 350, "category": "Салаты"},
     {"_id": "6276e8cd0cf48b4cded00871", "name": "Хачапури по-мегрельски", "price": 450, "category": "Выпечка"}
   ],
   "update_ts_utc": "2023-08-11 16:50:44"}'),
('ef8c42c19b7518a9aebec106',
 '{"_id": "ef8c42c19b7518a9aebec106", "name": "Вкус Индии",
   "menu": [
     {"_id": "6276e8cd0cf48b4cded00880", "name": "Чиз Наан", "price": 120, "category": "Выпечка"},
     {"_id": "6276e8cd0cf48b4cded00882", "name": "Сладкий Ласси", "price": 150, "category": "Напитки"}
   ],
   "update_ts_utc": "2023-08-11 16:51:02"}');

UPDATE stg.users
SET payload = jsonb_set(payload, '{update_ts_utc}', '"2023-08-12 09:00:00"')
              || '{"name": "Гаврила Архипович Игнатьев"}'
WHERE object_id = '626a81ce9a8cd1920641e200';
});

# 400 orders of 2023 and 40 of the last 40 days (half a day off the
# window's edge, so that an expiry pass a few minutes apart revokes the
# same tags), a heartbeat, two malformed messages (one with a tab and a
# backslash, which the dump's COPY text must escape).
my $order = q{
convert_to(jsonb_build_object(
    'object_id', %ID%, 'object_type', 'order',
    'sent_dttm', to_char(%TS%, 'YYYY-MM-DD HH24:MI:SS'),
    'payload', jsonb_build_object(
        'restaurant', jsonb_build_object('id', %REST%),
        'date', to_char(%TS%, 'YYYY-MM-DD HH24:MI:SS'),
        'user', jsonb_build_object('id', '626a81ce9a8cd1920641e2' || lpad(to_hex(%USER%), 2, '0')),
        'order_items', %ITEMS%,
        'bonus_payment', 0, 'cost', 0, 'payment', 0, 'bonus_grant', 0,
        'statuses', jsonb_build_array(jsonb_build_object(
            'status', %STATUS%, 'dttm', to_char(%TS%, 'YYYY-MM-DD HH24:MI:SS'))),
        'final_status', %STATUS%,
        'update_ts', to_char(%TS%, 'YYYY-MM-DD HH24:MI:SS')))::text, 'UTF8')};
my %old = (
	'%ID%' => '1000000 + g',
	'%TS%' => q{(timestamp '2023-04-01 10:00:00' + g * interval '7 minutes')},
	'%REST%' => q{CASE WHEN g % 2 = 0 THEN 'a51e4e31ae4602047ec52534' ELSE 'ef8c42c19b7518a9aebec106' END},
	'%USER%' => 'g % 7',
	'%ITEMS%' => q{(CASE WHEN g % 2 = 0 THEN jsonb_build_array(
        jsonb_build_object('id', '6276e8cd0cf48b4cded00871', 'name', 'Хачапури по-мегрельски', 'price', 450, 'quantity', 1 + g % 3),
        jsonb_build_object('id', '3de9442da57a50ccfaf72866', 'name', 'Пхали с фасолью', 'price', 200, 'quantity', 1),
        jsonb_build_object('id', '6276e8cd0cf48b4cded00879', 'name', 'Лимонад', 'price', 160, 'quantity', 2))
      ELSE jsonb_build_array(
        jsonb_build_object('id', '6276e8cd0cf48b4cded00880', 'name', 'Чиз Наан', 'price', 120, 'quantity', 1),
        jsonb_build_object('id', '6276e8cd0cf48b4cded00882', 'name', 'Сладкий Ласси', 'price', 150, 'quantity', 1 + g % 4)) END)},
	'%STATUS%' => q{CASE WHEN g % 5 = 0 THEN 'CANCELLED' ELSE 'CLOSED' END});
my %recent = (
	%old,
	'%ID%' => '3000000 + g',
	'%TS%' => q{(now() AT TIME ZONE 'UTC' - g * interval '1 day' + interval '12 hours')},
	'%USER%' => 'g % 3',
	'%STATUS%' => q{'CLOSED'});

sub fill
{
	my ($sql, %by) = @_;
	$sql =~ s/$_/$by{$_}/g for keys %by;
	return $sql;
}
my $old_orders = fill($order, %old);
my $recent_orders = fill($order, %recent);
is( $node->safe_psql(
		$src, qq~
SELECT received, applied, other_type, dead_lettered
FROM dwh.ingest_orders(ARRAY(SELECT $old_orders FROM generate_series(1, 400) g)
    || ARRAY(SELECT $recent_orders FROM generate_series(1, 40) g)
    || convert_to('{"object_id": 7, "object_type": "heartbeat", "sent_dttm": "2023-04-08 20:27:36"}', 'UTF8')
    || convert_to('{not json', 'UTF8')
    || convert_to(E'{"a tab\\there and a \\\\": [', 'UTF8'))~),
	'443|440|1|2',
	'440 orders applied, a heartbeat kept, two malformed messages dead-lettered');

# Later versions: every tenth order cancelled, so that the history and the
# status satellites hold older versions.
is( $node->safe_psql(
		$src, q{
SELECT applied
FROM dwh.ingest_orders(ARRAY(
    SELECT convert_to(jsonb_build_object(
               'object_id', e.object_id, 'object_type', 'order',
               'sent_dttm', to_char(e.update_ts + interval '3 hours', 'YYYY-MM-DD HH24:MI:SS'),
               'payload', e.payload || jsonb_build_object('final_status', 'CANCELLED',
                   'update_ts', to_char(e.update_ts + interval '3 hours', 'YYYY-MM-DD HH24:MI:SS')))::text,
           'UTF8')
    FROM stg.order_events e
    WHERE e.object_id % 10 = 3 AND e.payload->>'final_status' = 'CLOSED'
    ORDER BY e.object_id))}),
	'44', '44 orders cancelled by a later version');

$node->safe_psql(
	$src, q{
INSERT INTO dwh.tag_rules (tag, kind) VALUES ('dropped', 'all_orders');
DELETE FROM dwh.tag_rules WHERE tag = 'dropped';
SELECT dwh.kafka_seek(0, 420, 'orders'), dwh.kafka_seek(1, 77, 'orders');
INSERT INTO dwh.kafka_gaps (topic, kafka_partition, next_offset, log_start_offset,
                            log_end_offset, action, detected_at, resumed_offset, resumed_at)
VALUES ('orders', 0, 300, 350, 400, 'skipped', '2023-04-08 10:00:00+00', 350, '2023-04-08 10:00:00+00');
INSERT INTO dwh.redis_keys (key, kind, state, value_hash, reason, first_seen_at, changed_at)
VALUES ('626a81ce9a8cd1920641e202', 'user', 'missing', NULL, NULL, '2023-04-01 10:00:00+00', NULL),
       ('some:other:key', 'unknown', 'refused', NULL, 'value of unknown shape', '2023-04-01 10:00:00+00', NULL);
});

# "table|count|md5" of every table of the warehouse, one line each, then
# "verify|n": the rows as text without the load-time columns
# (docs/data-rule.md) sorted byte by byte, whatever the database's
# collation.  The tag events keep their ids (restored, not granted again).
my $fingerprint_sql = q{
CREATE FUNCTION pg_temp.fingerprint(extra text[], OUT t text, OUT fp text) RETURNS SETOF record
    LANGUAGE plpgsql AS $fn$
DECLARE
    drop text[];
BEGIN
    FOR t IN
        SELECT format('%I.%I', n.nspname, c.relname)
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind IN ('r', 'p')
          AND (n.nspname IN ('stg', 'dds', 'cdm')
               OR (n.nspname = 'dwh' AND c.relname IN ('dead_letters', 'tag_rules', 'tag_outbox',
                                                       'kafka_offsets', 'kafka_gaps',
                                                       'redis_keys', 'redis_wanted')))
        ORDER BY n.nspname COLLATE "C", c.relname COLLATE "C"
    LOOP
        drop := ARRAY['loaded_at'] || extra;
        IF t ~ '^dds\.[hl]_' AND t <> 'dds.l_product_category' THEN
            drop := drop || ARRAY['load_dt', 'load_src'];
        END IF;
        IF t ~ '^cdm\.' AND t <> 'cdm.user_tag_events' THEN
            drop := drop || ARRAY['id'];
        END IF;
        EXECUTE format($q$SELECT count(*) || '|' || md5(coalesce(string_agg(r, E'\n' ORDER BY r COLLATE "C"), ''))
                          FROM (SELECT %s (to_jsonb(x) - %L::text[])::text AS r FROM %s x) s$q$,
                       CASE WHEN t = 'dwh.redis_wanted' THEN 'DISTINCT' ELSE '' END, drop, t)
            INTO fp;
        RETURN NEXT;
    END LOOP;
END
$fn$;
SELECT t || '|' || fp FROM pg_temp.fingerprint('{%EXTRA%}')
UNION ALL SELECT 'verify|' || count(*) FROM dwh.verify();
};

sub fingerprint
{
	my ($db, $n, @extra) = @_;
	$n //= $node;
	my %fp;
	(my $sql = $fingerprint_sql) =~ s/%EXTRA%/join(',', @extra)/e;
	for (split /\n/, $n->safe_psql($db, $sql))
	{
		my ($t, $rest) = split /\|/, $_, 2;
		$fp{$t} = $rest;
	}
	return \%fp;
}

my $before = fingerprint($src);
my @tables = grep { $_ ne 'verify' } sort keys %$before;
is($before->{verify}, '0', 'dwh.verify() empty in the source');
ok(@tables >= 30, 'found ' . scalar(@tables) . ' warehouse tables');
for my $t (grep { !/^stg\.(restaurant_history)$/ } @tables)
{
	my ($count) = split /\|/, $before->{$t};
	ok($count > 0, "$t has rows in the source ($count)");
}

# Each table as in the source, but for those listed in %differs (their
# fingerprint must differ), and dwh.verify() as given (0 unless said).
sub same_as_source
{
	my ($db, $label, %opt) = @_;
	my $after = fingerprint($db, $opt{node});
	my $differs = $opt{differs} // {};
	my @wrong;
	for my $t (@tables)
	{
		my $same = ($after->{$t} // 'missing') eq $before->{$t};
		push @wrong, "$t: " . ($after->{$t} // 'missing') . " (source $before->{$t})"
		  if $same == !!$differs->{$t};
	}
	is(join("\n", @wrong), '',
		"$label: every table "
		  . (%$differs ? 'but ' . join(', ', sort keys %$differs) . ' ' : '')
		  . 'as in the source');
	is($after->{verify}, $opt{verify} // '0',
		"$label: dwh.verify() finds " . ($opt{verify} // '0') . ' differences');
	return;
}

# Run a client program; returns (exit status 0?, stderr).
sub client
{
	my (@cmd) = @_;
	my ($out, $err) = ('', '');
	note(join(' ', @cmd));
	my $ok = IPC::Run::run(\@cmd, '>', \$out, '2>', \$err);
	return ($ok, $err);
}

# A program that must exit 0 with nothing on stderr.
sub clean_run
{
	my ($label, @cmd) = @_;
	my ($ok, $err) = client(@cmd);
	ok($ok, "$label exits 0");
	is($err, '', "$label reports no error");
	return;
}

my $n_db = 0;
sub new_db
{
	my ($opts) = @_;
	my $db = 'r' . ++$n_db;
	$node->safe_psql('postgres', "CREATE DATABASE $db " . ($opts // ''));
	return $db;
}

# Dumps of every format and kind.
my %dump = (
	custom => "$tmp/c.dump",
	directory => "$tmp/d.dir",
	tar => "$tmp/t.tar",
	plain => "$tmp/plain.sql",
	inserts => "$tmp/inserts.sql",
	column_inserts => "$tmp/column_inserts.sql",
	rows_per_insert => "$tmp/rows_per_insert.sql",
	on_conflict => "$tmp/on_conflict.sql");
my %dump_opts = (
	custom => ['-Fc'],
	directory => ['-Fd'],
	tar => ['-Ft'],
	plain => ['-Fp'],
	inserts => ['--inserts'],
	column_inserts => ['--column-inserts'],
	rows_per_insert => ['--rows-per-insert=1000'],
	on_conflict => [ '--inserts', '--on-conflict-do-nothing' ]);
for my $kind (sort keys %dump)
{
	clean_run("pg_dump $kind", 'pg_dump', @{ $dump_opts{$kind} }, '-f',
		$dump{$kind}, @conn, '-d', $src);
}

# pg_dumpall into another cluster: the roles it already has are the only
# errors.
{
	my $all = "$tmp/all.sql";
	clean_run('pg_dumpall', 'pg_dumpall', '-f', $all, @conn);
	my $other = PostgreSQL::Test::Cluster->new('dumpall_target');
	$other->init(extra => [ '--encoding=UTF8', '--locale=C' ]);
	$other->append_conf('postgresql.conf',
		"shared_preload_libraries = 'dwh'\ndwh.database = 'none'\n");
	$other->start;
	my ($ok, $err) = client('psql', '-X', '-q', '-o', '/dev/null', '-h', $other->host,
		'-p', $other->port, '-d', 'postgres', '-f', $all);
	ok($ok, 'psql -f of pg_dumpall');
	my @errors = grep { /ERROR/ } split /\n/, $err;
	is_deeply(\@errors, [ grep { /role "\w+" already exists/ } @errors ],
		'no error but the existing roles');
	same_as_source($src, 'pg_dumpall restored into another cluster', node => $other);
	$other->stop;
}

# Plain scripts, as psql runs them: stopping at the first error, and as
# one transaction.
for my $kind (qw(plain inserts column_inserts rows_per_insert on_conflict))
{
	my $db = new_db();
	clean_run("psql -f of the $kind dump", 'psql', '-X', '-q', '-o', '/dev/null',
		'-v', 'ON_ERROR_STOP=1', @conn, '-d', $db, '-f', $dump{$kind});
	same_as_source($db, "psql -f of the $kind dump");
}
{
	my $db = new_db();
	clean_run('psql -1 -f of the plain dump', 'psql', '-X', '-q', '-o', '/dev/null',
		'-1', '-v', 'ON_ERROR_STOP=1', @conn, '-d', $db, '-f', $dump{plain});
	same_as_source($db, 'psql --single-transaction of the plain dump');
}

# --on-conflict-do-nothing replayed over the warehouse it was taken from:
# nothing changes.
{
	my $db = new_db("TEMPLATE $src");
	my ($ok, $err) = client('psql', '-X', '-q', '-o', '/dev/null', @conn,
		'-d', $db, '-f', $dump{on_conflict});
	ok($ok, 'the --on-conflict-do-nothing dump replayed over its warehouse');
	same_as_source($db, 'an --on-conflict-do-nothing dump replayed over its warehouse');
}

# Archives.
{
	my $db = new_db();
	clean_run('pg_restore -j 4 of the directory dump', 'pg_restore', '-j', '4',
		@conn, '-d', $db, $dump{directory});
	same_as_source($db, 'pg_restore -j 4 of the directory dump');

	$db = new_db();
	clean_run('pg_restore -1 --exit-on-error', 'pg_restore', '--single-transaction',
		'--exit-on-error', @conn, '-d', $db, $dump{custom});
	same_as_source($db, 'pg_restore --single-transaction --exit-on-error');

	$db = new_db();
	clean_run('pg_restore of the tar dump', 'pg_restore', @conn, '-d', $db, $dump{tar});
	same_as_source($db, 'pg_restore of the tar dump');

	$db = new_db();
	for my $section (qw(pre-data data post-data))
	{
		clean_run("pg_restore --section=$section", 'pg_restore', "--section=$section",
			@conn, '-d', $db, $dump{custom});
	}
	same_as_source($db, 'pg_restore of each --section in its own run');
}

# --clean --if-exists over a loaded warehouse (more orders, another rule):
# what it held is gone, the dump's warehouse is back.
{
	my $db = new_db();
	clean_run('pg_restore (a first time)', 'pg_restore', @conn, '-d', $db, $dump{custom});
	$node->safe_psql($db, qq{
INSERT INTO dwh.tag_rules (tag, kind) VALUES ('extra', 'all_orders');
SELECT dwh.ingest_orders(ARRAY(SELECT $recent_orders FROM generate_series(41, 50) g));
SELECT dwh.kafka_seek(0, 999, 'orders');
});
	clean_run('pg_restore --clean --if-exists over it', 'pg_restore', '--clean',
		'--if-exists', @conn, '-d', $db, $dump{custom});
	same_as_source($db, 'pg_restore --clean --if-exists over a loaded warehouse');
}

# CREATE EXTENSION first, then the data only.
{
	my $db = new_db();
	$node->safe_psql($db, 'CREATE EXTENSION dwh');
	clean_run('pg_restore --data-only', 'pg_restore', '--data-only', @conn, '-d', $db,
		$dump{custom});
	same_as_source($db, 'CREATE EXTENSION, then pg_restore --data-only');

	$db = new_db();
	$node->safe_psql($db, 'CREATE EXTENSION dwh');
	clean_run('pg_restore --data-only -j 4', 'pg_restore', '--data-only', '-j', '4', @conn,
		'-d', $db, $dump{directory});
	same_as_source($db, 'CREATE EXTENSION, then pg_restore --data-only -j 4');

	# --disable-triggers: STG and what is dumped come back, DDS and the
	# marts stay empty, dwh.verify() says so, dwh.rebuild(vault => true)
	# repairs it (docs/data-rule.md, "Backups").
	$db = new_db();
	$node->safe_psql($db, 'CREATE EXTENSION dwh');
	clean_run('pg_restore --data-only --disable-triggers', 'pg_restore', '--data-only',
		'--disable-triggers', @conn, '-d', $db, $dump{custom});
	my %derived = map { $_ => 1 } grep {
		/^dds\./
		  || /^cdm\.user_(product|category|order)_counters$/
	} @tables;
	my $found = $node->safe_psql($db, 'SELECT count(*) FROM dwh.verify()');
	ok($found > 0, "--disable-triggers: dwh.verify() reports DDS and the marts behind STG ($found)");
	same_as_source($db, 'pg_restore --data-only --disable-triggers', differs => \%derived,
		verify => $found);
	$node->safe_psql($db, 'SELECT count(*) FROM dwh.rebuild(vault => true)');
	same_as_source($db, 'pg_restore --disable-triggers, then dwh.rebuild(vault => true)');
}

# Part of the data left out: the rest restores, and what is derived from
# STG follows what was restored of it.
{
	my $dump = "$tmp/no_dead_letters.dump";
	clean_run('pg_dump --exclude-table-data=dwh.dead_letters', 'pg_dump', '-Fc',
		'--exclude-table-data=dwh.dead_letters', '-f', $dump, @conn, '-d', $src);
	my $db = new_db();
	clean_run('its pg_restore', 'pg_restore', @conn, '-d', $db, $dump);
	same_as_source($db, '--exclude-table-data=dwh.dead_letters',
		differs => { 'dwh.dead_letters' => 1 });
	is($node->safe_psql($db, 'SELECT count(*) FROM dwh.dead_letters'), '0',
		'no dead letter restored');

	# Without the orders' history, DDS holds no older version: its status,
	# cost and name rows of replaced versions are not rebuilt, the marts
	# (current versions) are whole.
	$dump = "$tmp/no_history.dump";
	clean_run('pg_dump --exclude-table-data=stg.order_event_history', 'pg_dump', '-Fc',
		'--exclude-table-data=stg.order_event_history', '-f', $dump, @conn, '-d', $src);
	$db = new_db();
	clean_run('its pg_restore', 'pg_restore', @conn, '-d', $db, $dump);
	same_as_source($db, '--exclude-table-data=stg.order_event_history',
		differs => { map { $_ => 1 } qw(stg.order_event_history dds.s_order_status
			  dds.s_order_cost) });
}

# One schema: -n stg dumps nothing (the schemas are the extension's, and
# pg_dump dumps an extension's tables only with it, or when named with
# -t); -t 'stg.*' dumps STG, from which a database with the extension gets
# DDS, the marts and the Redis worker's queue, and no tags (no rules).
{
	my $dump = "$tmp/n_stg.dump";
	clean_run('pg_dump -n stg', 'pg_dump', '-Fc', '-n', 'stg', '-f', $dump, @conn, '-d', $src);
	my $toc = '';
	IPC::Run::run([ 'pg_restore', '-l', $dump ], '>', \$toc);
	unlike($toc, qr/TABLE DATA/, 'pg_dump -n stg dumps no table data (README says so)');

	$dump = "$tmp/t_stg.dump";
	clean_run(q{pg_dump -t 'stg.*'}, 'pg_dump', '-Fc', '-t', 'stg.*', '-f', $dump, @conn,
		'-d', $src);
	my $db = new_db();
	$node->safe_psql($db, 'CREATE EXTENSION dwh');
	clean_run(q{pg_restore of -t 'stg.*'}, 'pg_restore', @conn, '-d', $db, $dump);
	same_as_source($db, q{pg_dump -t 'stg.*' into a database with the extension},
		differs => { map { $_ => 1 } grep { !/^(stg|dds)\./ && !/^cdm\.user_(product|category|order)_counters$/
			  && $_ ne 'dwh.redis_wanted' } @tables });
}

# A database of another default collation: ICU's root locale.
{
	my $db = new_db(q{TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'und' LOCALE 'C'});
	clean_run('pg_restore -j 4 into an ICU database', 'pg_restore', '-j', '4', @conn,
		'-d', $db, $dump{custom});
	same_as_source($db, 'pg_restore into a database of ICU collation');
}

# A database owner who is no superuser: CREATE EXTENSION dwh is refused,
# and pg_restore says so first and fails.
{
	$node->safe_psql('postgres', 'CREATE ROLE db_owner LOGIN');
	my $db = new_db('OWNER db_owner');
	my ($ok, $err) = client('pg_restore', '--no-owner', '--no-privileges', @conn,
		'-U', 'db_owner', '-d', $db, $dump{custom});
	ok(!$ok, 'pg_restore by a database owner who is no superuser fails');
	like($err, qr/\A[^\n]*permission denied to create extension "dwh"\nHINT:  Must be superuser to create this extension\./,
		'and its first error says that creating dwh takes a superuser');
}

# An expiry pass run later on the source and on a restore revokes the same
# windowed tags with the same event ids (only their times differ), and
# leaves the same counts.
{
	my $db = new_db();
	clean_run('pg_restore', 'pg_restore', @conn, '-d', $db, $dump{custom});
	my $expire = q{SELECT events FROM dwh.expire_tags()};
	my $events_sql = q{
SELECT string_agg(id || ' ' || tag || ' ' || kind || ' ' || coalesce(value, ''), ', ' ORDER BY id)
FROM cdm.user_tag_events WHERE id > %MAX%};
	my $max = $node->safe_psql($src, 'SELECT max(id) FROM cdm.user_tag_events');
	(my $events = $events_sql) =~ s/%MAX%/$max/;
	# A narrower window, in both: the rule's tags are recounted.
	for my $d ($src, $db)
	{
		$node->safe_psql($d,
			"UPDATE dwh.tag_rules SET window_days = 5 WHERE tag = 'recent'");
	}
	my $src_events = $node->safe_psql($src, $events);
	ok($src_events =~ /revoke/, "the source's narrower window revokes tags ($src_events)");
	is($node->safe_psql($db, $events), $src_events, 'the restore writes the same events');
	my $state = q{
SELECT (SELECT md5(string_agg(user_id || tag || coalesce(value, ''), ',' ORDER BY user_id, tag COLLATE "C"))
        FROM cdm.user_tags_held)
    || (SELECT md5(string_agg(user_id || tag || category_id || order_cnt, ',' ORDER BY user_id, tag COLLATE "C", category_id))
        FROM cdm.user_window_counters)};
	$node->safe_psql($_, $expire) for ($src, $db);
	is($node->safe_psql($db, $events), $node->safe_psql($src, $events),
		'an expiry pass then writes the same events in both');
	is($node->safe_psql($db, $state), $node->safe_psql($src, $state),
		'and leaves the same tags and windowed counts');
	is($node->safe_psql($db, 'SELECT count(*) FROM dwh.verify()'), '0',
		'dwh.verify() empty in the restore after the expiry pass');
}

# The Kafka worker serves postgres (dwh.database's default).  A dump taken
# while it applies orders holds, of each order, its row in STG exactly
# when the stored offsets count its message (pg_dump reads every table
# from one snapshot, and the worker writes both in one transaction):
# every order is one message, none sent twice (--clean), so the orders
# restored are as many as the restored offsets say were applied.
load_dictionaries($node);
generate_orders("$tmp/orders.txt", '--count 6000 --seed 64 --clean',
	"--manifest $tmp/orders.json");
my $manifest = read_manifest("$tmp/orders.json");
my @chunks = split_stream("$tmp/orders.txt", $manifest, 3);
my $total = 0;
$total += $_->{messages} for @chunks;
produce($mock, $chunks[0]->{file});
ok(wait_applied($node, $chunks[0]->{messages}), 'the worker applies the first third');

sub applied_in
{
	my ($db) = @_;
	return $node->safe_psql($db,
		"SELECT coalesce(sum(next_offset), 0) FROM dwh.kafka_offsets WHERE topic = '$mock->{topic}'");
}

# Dumps taken while the rest arrives: the last one that ended before the
# worker was done is kept (its snapshot is of a warehouse half-way).
produce($mock, $_->{file}) for @chunks[ 1, 2 ];
my $live_dump = "$tmp/live.dump";
my ($n_dumps, $kept) = (0, 0);
while (applied_in('postgres') < $total && $n_dumps < 50)
{
	clean_run('pg_dump while the worker writes', 'pg_dump', '-Fc', '-f', "$tmp/try.dump",
		@conn, '-d', 'postgres');
	$n_dumps++;
	$kept = rename("$tmp/try.dump", $live_dump) if applied_in('postgres') < $total;
}
if (!$kept)
{
	note('the worker was done before a dump ended: the dump holds every message');
	clean_run('pg_dump', 'pg_dump', '-Fc', '-f', $live_dump, @conn, '-d', 'postgres');
}
ok(wait_applied($node, $total), "the worker applies all $total messages");

my $resumed = new_db();
clean_run('pg_restore of the dump taken while the worker wrote', 'pg_restore', '-j', '4',
	@conn, '-d', $resumed, $live_dump);
my $dumped = applied_in($resumed);
note("the dump holds $dumped of $total messages applied");
ok($dumped < $total, 'the dump, ended while the worker wrote, holds part of the messages')
  if $kept;
is($node->safe_psql($resumed, 'SELECT count(*) FROM stg.order_events'), $dumped,
	'the restored orders are those the restored offsets count');
is($node->safe_psql($resumed, 'SELECT count(*) FROM dwh.verify()'), '0',
	'dwh.verify() empty in the restore of the dump taken while the worker wrote');

# The README's way: the restore was made in a database the workers do not
# serve; pointed at it, the worker resumes from the restored offsets, and
# ends with the warehouse it serves now equal to the one it served.
# The orders applied after the switch get other surrogate ids (the
# partitions interleave otherwise), the offsets other times.
my @surrogate = ('id', 'updated_at');
my $live = fingerprint('postgres', $node, @surrogate);
ok(set_and_reload($node, 'dwh.database', $resumed), "the workers now serve $resumed");
my $deadline = time() + $PostgreSQL::Test::Utils::timeout_default;
usleep(200_000) while applied_in($resumed) < $total && time() < $deadline;
is(applied_in($resumed), $total, "the worker applies the rest in $resumed");
my $after = fingerprint($resumed, $node, @surrogate);
my @differ = grep {
	/^(stg|dds|cdm)\./ || $_ eq 'dwh.kafka_offsets' || $_ eq 'dwh.dead_letters' || $_ eq 'verify'
} grep { ($after->{$_} // '') ne $live->{$_} } sort keys %$live;
is(join(', ', @differ), '',
	'every table of STG, DDS and the marts, the offsets and the dead letters as in the warehouse it served');

# A restore into the database the workers serve, with dwh.kafka_brokers
# set, is refused table by table, with the way to restore; without it the
# Kafka worker applied orders from offsets restored before STG, whose COPY
# then failed on the ids the worker's rows had taken (orders lost).
ok(set_and_reload($node, 'dwh.database', 'served'), 'the workers serve "served" (not there yet)');
$node->safe_psql('postgres', 'CREATE DATABASE served');
my ($ok, $err) = client('pg_restore', @conn, '-d', 'served', $live_dump);
ok(!$ok, 'pg_restore into the database the workers serve fails');
my @refused = $err =~ /ERROR:  cannot restore the warehouse into the database that the dwh workers serve \(dwh\.database\)\nDETAIL:  dwh\.kafka_brokers is set: the Kafka workers would apply orders from the offsets this restore loads into tables it has not loaded yet\.\nHINT:  Restore into a database that dwh\.database does not name, then set dwh\.database to it and reload; or first empty dwh\.kafka_brokers, dwh\.redis_url and dwh\.redis_url_file, set dwh\.tags_expire_interval to 0 and reload\./g;
is(scalar(@refused), 17, 'each of the 17 dumped tables is refused, saying why and how to restore')
  or diag($err);

# The README's other way: the workers held off (no brokers, no expiry
# passes) while the database they serve is restored, then let go: the
# worker resumes from the restored offsets.
# Without brokers, the tags worker's expiry passes still refuse it.
$node->safe_psql('postgres', q{
ALTER SYSTEM SET dwh.kafka_brokers = '';
ALTER SYSTEM SET dwh.database = 'held';
SELECT pg_reload_conf();});
ok(wait_for($node, "SELECT current_setting('dwh.database') = 'held'"), 'no brokers, the workers serve "held"');
$node->safe_psql('postgres', 'CREATE DATABASE held');
($ok, $err) = client('pg_restore', @conn, '-d', 'held', $live_dump);
@refused = $err =~ /ERROR:  cannot restore the warehouse into the database that the dwh workers serve \(dwh\.database\)\nDETAIL:  dwh\.tags_expire_interval is not 0: /g;
ok(!$ok && @refused == 17, 'with expiry passes on, the restore is refused too, saying so')
  or diag($err);
$node->safe_psql('postgres', 'DROP DATABASE held WITH (FORCE)');
ok(set_and_reload($node, 'dwh.tags_expire_interval', '0'), 'the workers held off');
$node->safe_psql('postgres', 'CREATE DATABASE held');
clean_run('pg_restore into the database of the workers held off', 'pg_restore', @conn,
	'-d', 'held', $live_dump);
is(applied_in('held'), $dumped, 'the offsets of the dump restored');
$node->safe_psql('postgres', qq{
ALTER SYSTEM SET dwh.kafka_brokers = '$mock->{bootstrap}';
ALTER SYSTEM RESET dwh.tags_expire_interval;
SELECT pg_reload_conf();});
$deadline = time() + $PostgreSQL::Test::Utils::timeout_default;
usleep(200_000) while applied_in('held') < $total && time() < $deadline;
is(applied_in('held'), $total, 'the worker, let go, applies the rest');
$after = fingerprint('held', $node, @surrogate);
@differ = grep {
	/^(stg|dds|cdm)\./ || $_ eq 'dwh.kafka_offsets' || $_ eq 'dwh.dead_letters' || $_ eq 'verify'
} grep { ($after->{$_} // '') ne $live->{$_} } sort keys %$live;
is(join(', ', @differ), '',
	'every table as in the warehouse it served before');

$node->stop;
stop_mock_cluster($mock);
done_testing();
