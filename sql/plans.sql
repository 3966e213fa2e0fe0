-- Plans that follow the warehouse's growth.  A session keeps the plans of
-- a batch's statements, and batches of a few messages take the generic
-- ones, made once for the sizes the tables had then; autovacuum makes them
-- again only when it next analyzes a table.  A Kafka worker that planned
-- on a small warehouse hashed whole link tables in every batch of changed
-- orders once they had grown.  The session now plans again whenever the
-- order hub has doubled: after the warehouse grows a hundredfold without
-- an ANALYZE, a batch of new and changed orders reads no large table whole.
\set ECHO none
\i test/regress_helpers.sql
\set ECHO all

CREATE FUNCTION t.batch(first bigint, n int, status text, ts text) RETURNS bytea[]
LANGUAGE sql AS $$
    SELECT array_agg(convert_to(t.order_msg(i, 'u' || (i % 50), status, ts,
                                            t.items('d' || (i % 40) || ':Dish ' || (i % 40),
                                                    'd' || (i % 7) || ':Dish ' || (i % 7)),
                                            'r' || (i % 3)), 'UTF8'))
    FROM generate_series(first, first + n - 1) i
$$;
-- No autovacuum ANALYZE to make the plans again behind the test's back.
DO $$
DECLARE
    r regclass;
BEGIN
    FOR r IN SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname IN ('stg', 'dds', 'cdm') AND c.relkind = 'r'
    LOOP
        EXECUTE format('ALTER TABLE %s SET (autovacuum_enabled = off)', r);
    END LOOP;
END
$$;
SELECT t.set_menu('r0', '2023-01-01 00:00:00', 'd1:Dish 1:main', 'd2:Dish 2:soup');
SELECT (dwh.ingest_orders(t.batch(1, 200, 'CLOSED', '2023-02-01 10:00:00'))).applied;
ANALYZE;

-- Plans made now, on 200 orders (a batch of 8 messages or fewer takes the
-- generic plans), and used after 20,000 more.
SELECT (dwh.ingest_orders(t.batch(201, 5, 'CLOSED', '2023-02-01 11:00:00'))).applied;
SELECT (dwh.ingest_orders(t.batch(1, 5, 'CANCELLED', '2023-02-01 11:00:00'))).applied;
SELECT (dwh.ingest_orders(t.batch(1001, 20000, 'CLOSED', '2023-02-01 12:00:00'))).applied;

BEGIN;
SELECT (dwh.ingest_orders(t.batch(30001, 5, 'CLOSED', '2023-02-02 10:00:00'))).applied;
SELECT (dwh.ingest_orders(t.batch(11, 5, 'CANCELLED', '2023-02-02 11:00:00'))).applied;
SELECT relid::regclass AS read_whole, seq_scan, pg_relation_size(relid) / 8192 AS pages
FROM pg_stat_xact_user_tables
WHERE schemaname IN ('stg', 'dds', 'cdm') AND seq_scan > 0
  AND pg_relation_size(relid) > 16 * 8192
ORDER BY 1;
ROLLBACK;
SELECT count(*) FROM dwh.verify();

-- No JIT within a batch: PostgreSQL compiles a plan at each execution once
-- its cost passes jit_above_cost, which a batch never pays back.  What the
-- chain's statements see, through a trigger of the test's own; the
-- caller's setting is back afterwards.
CREATE TABLE t.jit_seen (setting text);
CREATE FUNCTION t.note_jit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO t.jit_seen VALUES (current_setting('jit'));
    RETURN NULL;
END
$$;
CREATE TRIGGER note_jit AFTER INSERT ON stg.order_events
    FOR EACH STATEMENT EXECUTE FUNCTION t.note_jit();
SET jit = on;
SELECT (dwh.ingest_orders(t.batch(40001, 3, 'CLOSED', '2023-02-03 10:00:00'))).applied;
SELECT (dwh.ingest_orders(t.batch(40101, 30, 'CLOSED', '2023-02-03 10:00:00'))).applied;
SELECT setting, count(*) FROM t.jit_seen GROUP BY setting;
SHOW jit;
RESET jit;
DROP TRIGGER note_jit ON stg.order_events;
SELECT count(*) FROM dwh.verify();

-- Replacing orders of many items writes temporary files in proportion to
-- the batch, not to its links times their orders' item lists: 20 orders
-- of 500 items (1.5 MB of messages) replaced within 40 MB of temporary
-- files, with a work_mem small enough that sorts and hashes spill.  (The
-- DELETE of the links a new version no longer holds carried each link
-- with its order's whole item list: gigabytes for larger batches.)
CREATE FUNCTION t.wide_batch(update_ts text, first_item int) RETURNS bytea[]
LANGUAGE sql AS $$
    SELECT array_agg(convert_to(t.order_msg(50000 + o, 'u1', 'CLOSED', update_ts,
        (SELECT jsonb_agg(jsonb_build_object('id', 'w' || i, 'name', repeat('x', 100) || i,
                                             'price', 1, 'quantity', 1))
         FROM generate_series(first_item, first_item + 499) i), 'r0'), 'UTF8'))
    FROM generate_series(1, 20) o
$$;
SELECT (dwh.ingest_orders(t.wide_batch('2023-03-01 10:00:00', 1))).applied;
SET work_mem = '64kB';
SET temp_file_limit = '40MB';
SELECT (dwh.ingest_orders(t.wide_batch('2023-03-01 11:00:00', 2))).applied;
RESET temp_file_limit;
RESET work_mem;
SELECT count(*) AS links FROM dds.l_order_product l JOIN dds.h_order h USING (h_order_pk)
WHERE h.order_id BETWEEN 50001 AND 50020;
SELECT count(*) FROM dwh.verify();
