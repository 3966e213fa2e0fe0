-- The references of the order links and satellites to their hubs, checked
-- once per statement instead of by foreign keys: the rows a foreign key
-- would refuse are refused (23503), whatever writes them, and nothing
-- that would leave a reference dangling gets through.
\set ECHO none
\i test/regress_helpers.sql
\set ECHO all

SELECT t.load(1, 'u1', 'CLOSED', '2023-04-01 20:00:00', 'd1:Плов', 'd2:Лагман');
SELECT dwh.hash_key('1') AS o1, dwh.hash_key('u1') AS u1, dwh.hash_key('d1') AS d1,
       dwh.hash_key('404') AS missing \gset

\set VERBOSITY default
\set SHOW_CONTEXT never
-- Rows whose hub is missing, alone or among good rows.
INSERT INTO dds.l_order_user (hk_order_user_pk, h_order_pk, h_user_pk, load_dt, load_src)
VALUES (gen_random_uuid(), :'missing', :'u1', now(), 'test');
INSERT INTO dds.l_order_user (hk_order_user_pk, h_order_pk, h_user_pk, load_dt, load_src)
VALUES (gen_random_uuid(), :'o1', :'missing', now(), 'test');
INSERT INTO dds.l_order_product (hk_order_product_pk, h_order_pk, h_product_pk, load_dt, load_src)
VALUES (gen_random_uuid(), :'o1', :'missing', now(), 'test');
INSERT INTO dds.l_order_product (hk_order_product_pk, h_order_pk, h_product_pk, load_dt, load_src)
SELECT gen_random_uuid(), o, :'d1', now(), 'test'
FROM unnest(ARRAY[:'o1', :'missing']::uuid[]) o WHERE o = :'missing';
INSERT INTO dds.s_order_status (h_order_pk, status, hk_order_status_hashdiff, load_dt, load_src)
VALUES (:'o1', 'CLOSED', gen_random_uuid(), '2030-01-01', 'test'),
       (:'missing', 'CLOSED', gen_random_uuid(), '2030-01-01', 'test');
INSERT INTO dds.s_order_cost (h_order_pk, cost, payment, hk_order_cost_hashdiff, load_dt, load_src)
VALUES (:'missing', 1, 1, gen_random_uuid(), '2030-01-01', 'test');
COPY dds.s_order_cost (h_order_pk, cost, payment, hk_order_cost_hashdiff, load_dt, load_src) FROM STDIN;
4b3a2a5e-8f47-5b5e-a7a3-3b1b1b1b1b1b	1	1	4b3a2a5e-8f47-5b5e-a7a3-3b1b1b1b1b1b	2030-01-01	test
\.

-- A missing hub among keys that repeat (each distinct key is probed once).
BEGIN;
SELECT t.load(2, 'u2', 'CLOSED', '2023-04-01 21:00:00', 'd2:Лагман');
SELECT t.load(3, 'u2', 'CLOSED', '2023-04-01 22:00:00', 'd2:Лагман');
SELECT dwh.hash_key('2') AS o2, dwh.hash_key('3') AS o3 \gset
SAVEPOINT repeated;
INSERT INTO dds.l_order_product (hk_order_product_pk, h_order_pk, h_product_pk, load_dt, load_src)
SELECT gen_random_uuid(), o, gen_random_uuid(), now(), 'test'
FROM unnest(ARRAY[:'o1', :'o1', :'missing', :'o1']::uuid[]) o;
ROLLBACK TO repeated;
INSERT INTO dds.l_order_product (hk_order_product_pk, h_order_pk, h_product_pk, load_dt, load_src)
VALUES (gen_random_uuid(), :'o2', :'d1', now(), 'test'),
       (gen_random_uuid(), :'o3', :'d1', now(), 'test'),
       (gen_random_uuid(), :'o1', :'missing', now(), 'test');
ROLLBACK TO repeated;
INSERT INTO dds.l_order_user (hk_order_user_pk, h_order_pk, h_user_pk, load_dt, load_src)
VALUES (gen_random_uuid(), :'o2', :'u1', now(), 'test'),
       (gen_random_uuid(), :'o3', :'u1', now(), 'test'),
       (gen_random_uuid(), :'o1', :'missing', now(), 'test');
ROLLBACK;

-- A row whose hubs exist goes in (and out again).
BEGIN;
INSERT INTO dds.s_order_status (h_order_pk, status, hk_order_status_hashdiff, load_dt, load_src)
VALUES (:'o1', 'CLOSED', gen_random_uuid(), '2030-01-01', 'test');
ROLLBACK;

-- A hub row written by the same statement as its reference counts; one
-- whose subtransaction rolled back does not.
BEGIN;
WITH hub AS (
    INSERT INTO dds.h_order (h_order_pk, order_id, order_dt, load_dt, load_src)
    VALUES (:'missing', 404, '2030-01-01', now(), 'test')
    RETURNING h_order_pk)
INSERT INTO dds.s_order_status (h_order_pk, status, hk_order_status_hashdiff, load_dt, load_src)
SELECT h_order_pk, 'CLOSED', gen_random_uuid(), '2030-01-01', 'test' FROM hub;
SELECT count(*) FROM dds.s_order_status WHERE h_order_pk = :'missing';
ROLLBACK;
BEGIN;
SAVEPOINT hub;
INSERT INTO dds.h_order (h_order_pk, order_id, order_dt, load_dt, load_src)
VALUES (:'missing', 404, '2030-01-01', now(), 'test');
ROLLBACK TO hub;
INSERT INTO dds.s_order_status (h_order_pk, status, hk_order_status_hashdiff, load_dt, load_src)
VALUES (:'missing', 'CLOSED', gen_random_uuid(), '2030-01-01', 'test');
ROLLBACK;

-- A check remembers the hub keys it found for the next checks of the
-- transaction; what a rolled-back subtransaction found is forgotten, and
-- so is everything once the hub is truncated or the transaction ends.
BEGIN;
SAVEPOINT hub;
INSERT INTO dds.h_order (h_order_pk, order_id, order_dt, load_dt, load_src)
VALUES (:'missing', 404, '2030-01-01', now(), 'test');
INSERT INTO dds.s_order_status (h_order_pk, status, hk_order_status_hashdiff, load_dt, load_src)
VALUES (:'missing', 'CLOSED', gen_random_uuid(), '2030-01-01', 'test');
ROLLBACK TO hub;
INSERT INTO dds.s_order_cost (h_order_pk, cost, payment, hk_order_cost_hashdiff, load_dt, load_src)
VALUES (:'missing', 1, 1, gen_random_uuid(), '2030-01-01', 'test');
ROLLBACK;
-- Found in a subtransaction that was released, then another one rolled
-- back: still there.
BEGIN;
SAVEPOINT hub;
INSERT INTO dds.h_order (h_order_pk, order_id, order_dt, load_dt, load_src)
VALUES (:'missing', 404, '2030-01-01', now(), 'test');
INSERT INTO dds.s_order_status (h_order_pk, status, hk_order_status_hashdiff, load_dt, load_src)
VALUES (:'missing', 'CLOSED', gen_random_uuid(), '2030-01-01', 'test');
RELEASE hub;
SAVEPOINT other;
ROLLBACK TO other;
INSERT INTO dds.s_order_cost (h_order_pk, cost, payment, hk_order_cost_hashdiff, load_dt, load_src)
VALUES (:'missing', 1, 1, gen_random_uuid(), '2030-01-01', 'test');
SELECT count(*) FROM dds.s_order_cost WHERE h_order_pk = :'missing';
ROLLBACK;
BEGIN;
INSERT INTO dds.h_order (h_order_pk, order_id, order_dt, load_dt, load_src)
VALUES (:'missing', 404, '2030-01-01', now(), 'test');
INSERT INTO dds.s_order_status (h_order_pk, status, hk_order_status_hashdiff, load_dt, load_src)
VALUES (:'missing', 'CLOSED', gen_random_uuid(), '2030-01-01', 'test');
TRUNCATE dds.h_order, dds.l_order_user, dds.l_order_product, dds.s_order_status,
         dds.s_order_cost;
INSERT INTO dds.s_order_cost (h_order_pk, cost, payment, hk_order_cost_hashdiff, load_dt, load_src)
VALUES (:'missing', 1, 1, gen_random_uuid(), '2030-01-01', 'test');
ROLLBACK;
-- Committed, then removed behind the triggers' back (replica mode): the
-- next transaction looks again.
BEGIN;
INSERT INTO dds.h_order (h_order_pk, order_id, order_dt, load_dt, load_src)
VALUES (:'missing', 404, '2030-01-01', now(), 'test');
INSERT INTO dds.s_order_status (h_order_pk, status, hk_order_status_hashdiff, load_dt, load_src)
VALUES (:'missing', 'CLOSED', gen_random_uuid(), '2030-01-01', 'test');
COMMIT;
SET session_replication_role = replica;
DELETE FROM dds.s_order_status WHERE h_order_pk = :'missing';
DELETE FROM dds.h_order WHERE h_order_pk = :'missing';
RESET session_replication_role;
INSERT INTO dds.s_order_cost (h_order_pk, cost, payment, hk_order_cost_hashdiff, load_dt, load_src)
VALUES (:'missing', 1, 1, gen_random_uuid(), '2030-01-01', 'test');

-- A statement's new rows spilled to disk (work_mem), read by two more
-- statement triggers of the table, one firing before the check and one
-- after: each sees every row, and a missing hub after thousands of good
-- rows is found.
BEGIN;
SET LOCAL work_mem = '64kB';
CREATE TEMP TABLE seen (trigger_name text, added bigint);
CREATE FUNCTION pg_temp.count_added() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO seen SELECT TG_NAME, count(*) FROM added;
    RETURN NULL;
END
$$;
CREATE TRIGGER a_count AFTER INSERT ON dds.s_order_status
    REFERENCING NEW TABLE AS added
    FOR EACH STATEMENT EXECUTE FUNCTION pg_temp.count_added();
CREATE TRIGGER z_count AFTER INSERT ON dds.s_order_status
    REFERENCING NEW TABLE AS added
    FOR EACH STATEMENT EXECUTE FUNCTION pg_temp.count_added();
INSERT INTO dds.s_order_status (h_order_pk, status, hk_order_status_hashdiff, load_dt, load_src)
SELECT :'o1', 'CLOSED', gen_random_uuid(), timestamp '2030-01-01' + i * interval '1 s', 'test'
FROM generate_series(1, 3000) i;
SELECT * FROM seen ORDER BY trigger_name;
SAVEPOINT spilled;
INSERT INTO dds.s_order_status (h_order_pk, status, hk_order_status_hashdiff, load_dt, load_src)
SELECT CASE WHEN i = 3000 THEN :'missing'::uuid ELSE :'o1'::uuid END, 'CLOSED',
       gen_random_uuid(), timestamp '2031-01-01' + i * interval '1 s', 'test'
FROM generate_series(1, 3000) i;
ROLLBACK TO spilled;
ROLLBACK;

-- Repointing a reference, deleting or rekeying a hub row.
UPDATE dds.l_order_product SET h_product_pk = :'missing' WHERE h_order_pk = :'o1';
UPDATE dds.l_order_user SET h_order_pk = h_order_pk;
UPDATE dds.s_order_status SET h_order_pk = :'missing';
DELETE FROM dds.h_order WHERE h_order_pk = :'o1';
DELETE FROM dds.h_user WHERE false;
UPDATE dds.h_product SET h_product_pk = :'missing' WHERE h_product_pk = :'d1';
-- What dwh updates stays possible.
UPDATE dds.h_order SET order_dt = order_dt WHERE h_order_pk = :'o1';
UPDATE dds.s_order_status SET status = status WHERE h_order_pk = :'o1';

-- A hub truncated alone; then with every table that refers to it.
TRUNCATE dds.h_order;
TRUNCATE dds.h_order, dds.l_order_user, dds.l_order_product, dds.s_order_status;
BEGIN;
TRUNCATE dds.h_order, dds.l_order_user, dds.l_order_product, dds.s_order_status,
         dds.s_order_cost;
SELECT count(*) FROM dds.h_order;
ROLLBACK;
-- The user and dish hubs with the tables whose foreign keys name them, but
-- not the order links, which refer to them unchecked by a foreign key.
TRUNCATE dds.h_user, dds.s_user_names;
TRUNCATE dds.h_product, dds.l_product_restaurant, dds.l_product_category,
         dds.s_product_names, dds.product_namings;

-- Nothing changed; the vault is still what STG implies.
SELECT count(*) AS links FROM dds.l_order_product;
SELECT count(*) AS statuses FROM dds.s_order_status;
SELECT * FROM t.check();
SELECT count(*) FROM dwh.verify();
