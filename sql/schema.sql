-- The schema analysts rely on: tables, comments, keys, backups, privileges.
\set ECHO none
\i test/regress_helpers.sql
\set ECHO all

-- The tables of docs/formats.md section 3, with their columns.
SELECT table_schema, table_name,
       string_agg(column_name, ', ' ORDER BY ordinal_position) AS columns
FROM information_schema.columns
WHERE table_schema IN ('stg', 'dds', 'cdm') OR (table_schema, table_name) = ('dwh', 'dead_letters')
GROUP BY 1, 2
ORDER BY 1, 2;

-- Every table and every column says what it holds.
SELECT c.oid::regclass AS table_without_comment
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname IN ('stg', 'dds', 'cdm', 'dwh') AND c.relkind IN ('r', 'v')
  AND obj_description(c.oid, 'pg_class') IS NULL;
SELECT c.oid::regclass AS "table", a.attname AS column_without_comment
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
WHERE n.nspname IN ('stg', 'dds', 'cdm', 'dwh') AND c.relkind = 'r'
  AND col_description(c.oid, a.attnum) IS NULL;
SELECT p.oid::regprocedure AS function_without_comment
FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
WHERE n.nspname = 'dwh' AND obj_description(p.oid, 'pg_proc') IS NULL;

-- A UNIQUE business key on each hub, a UNIQUE grain on each mart.
SELECT conrelid::regclass AS "table", pg_get_constraintdef(oid) AS definition
FROM pg_constraint
WHERE contype IN ('u', 'c') AND connamespace IN ('dds'::regnamespace, 'cdm'::regnamespace)
ORDER BY 1, 2;

-- Every link and satellite references its hubs.
SELECT conrelid::regclass AS "table", confrelid::regclass AS hub
FROM pg_constraint
WHERE contype = 'f' AND connamespace = 'dds'::regnamespace
ORDER BY 1, 2;

-- Every table of what was received and of operations goes into pg_dump
-- with its sequence; DDS and the marts do not: the restore rebuilds them
-- from STG (docs/data-rule.md).
SELECT c.relname
FROM pg_extension e, unnest(e.extconfig) AS x(oid) JOIN pg_class c ON c.oid = x.oid
WHERE e.extname = 'dwh'
ORDER BY 1;
SELECT c.oid::regclass AS data_table_not_dumped
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname IN ('stg', 'dwh') AND c.relkind IN ('r', 'S')
  AND NOT EXISTS (SELECT FROM pg_extension e
                  WHERE e.extname = 'dwh' AND c.oid = ANY (e.extconfig));
-- The user tags are derived too, but dumped: a restore brings back when
-- each was granted and the feed of their events (docs/tags.md), and the
-- windowed counts that go with them.
SELECT c.oid::regclass AS derived_table_dumped
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname IN ('dds', 'cdm') AND c.relkind IN ('r', 'S')
  AND c.oid NOT IN ('cdm.user_tags_held'::regclass, 'cdm.user_tag_events'::regclass,
                    'cdm.user_window_counters'::regclass,
                    'cdm.user_tag_events_id_seq'::regclass)
  AND EXISTS (SELECT FROM pg_extension e
              WHERE e.extname = 'dwh' AND c.oid = ANY (e.extconfig));

-- PUBLIC gets nothing on dwh's functions and dead letters, but the two
-- pure functions that the view cdm.user_tags calls with its reader's rights.
SELECT p.oid::regprocedure AS executable_by_public
FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
WHERE n.nspname = 'dwh' AND has_function_privilege('public', p.oid, 'EXECUTE')
ORDER BY p.oid::regprocedure::text;
SELECT n.nspname AS schema_usable_by_public
FROM pg_namespace n
WHERE n.nspname IN ('stg', 'dds', 'cdm', 'dwh')
  AND has_schema_privilege('public', n.oid, 'USAGE');
-- Nor any privilege on a table, view or sequence (a grant there would
-- count once someone granted USAGE on its schema).
SELECT c.oid::regclass AS relation_granted_to_public
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname IN ('stg', 'dds', 'cdm', 'dwh') AND c.relkind IN ('r', 'v', 'S', 'p')
  AND (has_table_privilege('public', c.oid,
                           'SELECT, INSERT, UPDATE, DELETE, TRUNCATE, REFERENCES, TRIGGER')
       OR (c.relkind = 'S' AND has_sequence_privilege('public', c.oid, 'USAGE, SELECT, UPDATE')));
-- A SECURITY DEFINER function resolves names in a fixed search_path only.
SELECT p.oid::regprocedure AS definer_without_fixed_search_path
FROM pg_proc p
JOIN pg_depend d ON d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e'
JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'dwh'
WHERE p.prosecdef
  AND NOT coalesce('search_path=pg_catalog, pg_temp' = ANY (p.proconfig), false);
-- The functions that resolve names in their caller's search_path: C
-- functions that run no SQL or only SQL naming every schema and operator
-- (src/dwh_stg_guard.c), and SQL functions kept inlinable (a SET clause
-- would stop their inlining), which name every type, function and operator
-- with its schema: a view's reader or any caller inlines them under its own
-- search_path (test/t/023_search_path_trap.pl).  A new one must be one of
-- these.
SELECT p.oid::regprocedure AS without_fixed_search_path, l.lanname, p.prosecdef
FROM pg_proc p
JOIN pg_language l ON l.oid = p.prolang
JOIN pg_depend d ON d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e'
JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'dwh'
WHERE NOT coalesce('search_path=pg_catalog, pg_temp' = ANY (p.proconfig), false)
ORDER BY l.lanname, p.oid::regprocedure::text;
CREATE ROLE regress_dwh_nobody;
SET ROLE regress_dwh_nobody;
SELECT * FROM dwh.verify();
SELECT dwh.ingest_order('{}');
SELECT count(*) FROM dwh.dead_letters;
SELECT count(*) FROM cdm.user_product_counters;
RESET ROLE;

-- The analyst role of the README: reads cdm and dds, nothing else.
CREATE ROLE regress_dwh_analyst;
GRANT USAGE ON SCHEMA cdm, dds TO regress_dwh_analyst;
GRANT SELECT ON ALL TABLES IN SCHEMA cdm, dds TO regress_dwh_analyst;
SELECT t.load(1, 'u1', 'CLOSED', '2023-04-01 20:00:00', 'd1:Плов');
SET ROLE regress_dwh_analyst;
SELECT product_name, order_cnt FROM cdm.user_product_counters;
SELECT count(*) FROM dds.h_order;
SELECT count(*) FROM stg.order_events;
SELECT count(*) FROM dwh.dead_letters;
INSERT INTO cdm.user_product_counters (user_id, product_id, product_name, order_cnt)
VALUES (gen_random_uuid(), gen_random_uuid(), 'x', 1);
RESET ROLE;

-- A loader role: EXECUTE on the ingest functions is all it needs; the
-- triggers run with the extension owner's rights.
CREATE ROLE regress_dwh_loader;
GRANT USAGE ON SCHEMA dwh TO regress_dwh_loader;
GRANT EXECUTE ON FUNCTION dwh.ingest_orders(bytea[], text, integer[], bigint[]) TO regress_dwh_loader;
SELECT t.order_msg(2, 'u2', 'CLOSED', '2023-04-02 20:00:00', t.items('d2:Лагман')) AS msg \gset
SET ROLE regress_dwh_loader;
SELECT received, applied FROM dwh.ingest_orders(ARRAY[convert_to(:'msg', 'UTF8')]);
RESET ROLE;
SELECT * FROM t.check();

DROP OWNED BY regress_dwh_nobody, regress_dwh_analyst, regress_dwh_loader;
DROP ROLE regress_dwh_nobody, regress_dwh_analyst, regress_dwh_loader;

-- The extension needs a UTF8 database.
CREATE DATABASE dwh_latin1 ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0;
\c dwh_latin1
CREATE EXTENSION dwh;
\c contrib_regression
DROP DATABASE dwh_latin1;
