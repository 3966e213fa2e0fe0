-- The C steps of the claim of a batch's keys (src/dwh_order_keys.c):
-- dwh.order_namings() gives what the SQL aggregate it replaced gave, on
-- seeded random batches; dwh.order_keys_missing() names exactly the keys
-- that DDS has no row for, this transaction's rows counting as there;
-- dwh.namings_rename() answers as the query it replaced, on seeded random
-- cases; dwh.claim_order_keys() writes the missing keys and no others, and
-- refuses to rename a dish under the dictionary lock held shared (40001).
\set ECHO none
\i test/regress_helpers.sql
\set ECHO all

-- The aggregate that dwh.claim_order_keys ran before: per dish, the
-- greatest version among its items, then the greatest name byte-wise;
-- and the least version among its items.
CREATE FUNCTION t.namings_sql(payloads jsonb[], versions timestamp[])
RETURNS TABLE (id text, name text, version timestamp, first timestamp)
LANGUAGE sql AS $$
    WITH item AS (
        SELECT e->>'id' AS id, e->>'name' AS name, v.version
        FROM unnest(payloads, versions) AS v(payload, version),
             jsonb_array_elements(v.payload->'order_items') e
    )
    SELECT DISTINCT ON (n.id) n.id, n.name, n.version,
           (SELECT min(i.version) FROM item i WHERE i.id = n.id)
    FROM (SELECT id, name, max(version) AS version FROM item GROUP BY 1, 2) n
    ORDER BY n.id, n.version DESC, n.name COLLATE "C" DESC
$$;

CREATE FUNCTION t.namings_c(payloads jsonb[], versions timestamp[])
RETURNS TABLE (id text, name text, version timestamp, first timestamp)
LANGUAGE sql AS $$
    SELECT u.* FROM dwh.order_namings(payloads, versions) n,
                    unnest(n.ids, n.names, n.item_versions, n.first_versions) AS u
$$;

-- Seeded random batches: 1 to 6 versions of 0 to 4 items, over 5 dishes,
-- names that tie on version, differ only in case, length or bytes beyond
-- ASCII, and 3 version times.  Prints the seed, the number of batches
-- where the two differ (0) and the first such batch, smallest first.
SELECT setseed(0.4242);
SELECT 0.4242 AS seed;
CREATE TABLE t.batches AS
SELECT b, array_agg(p ORDER BY k) AS payloads, array_agg(v ORDER BY k) AS versions
FROM (SELECT b, k,
             jsonb_build_object('order_items', coalesce((
                 SELECT jsonb_agg(jsonb_build_object(
                            'id', 'd' || (1 + floor(random() * 5))::int,
                            'name', (ARRAY['Plov', 'plov', 'Plov ', 'Pl', 'Плов', 'Плов!', ''])
                                    [1 + floor(random() * 7)::int]))
                 FROM generate_series(1, floor(random() * 5)::int) i
                 WHERE k > 0), '[]')) AS p,
             timestamp '2023-01-01' + floor(random() * 3) * interval '1 hour' AS v
      FROM generate_series(1, 300) b,
           LATERAL generate_series(1, 1 + (b % 6)) k) x
GROUP BY b;
SELECT count(*) AS batches_differing
FROM t.batches
WHERE EXISTS (SELECT * FROM t.namings_sql(payloads, versions)
              EXCEPT SELECT * FROM t.namings_c(payloads, versions))
   OR EXISTS (SELECT * FROM t.namings_c(payloads, versions)
              EXCEPT SELECT * FROM t.namings_sql(payloads, versions));
SELECT b, payloads, versions
FROM t.batches
WHERE EXISTS (SELECT * FROM t.namings_sql(payloads, versions)
              EXCEPT SELECT * FROM t.namings_c(payloads, versions))
   OR EXISTS (SELECT * FROM t.namings_c(payloads, versions)
              EXCEPT SELECT * FROM t.namings_sql(payloads, versions))
ORDER BY length(payloads::text), b
LIMIT 1;
-- Dishes come sorted byte-wise; a batch without items names nothing.
SELECT * FROM dwh.order_namings(ARRAY['{"order_items": [{"id": "b", "name": "B"}, {"id": "a", "name": "A"}, {"id": "b", "name": "C"}]}',
                                      '{"order_items": [{"id": "b", "name": "A"}]}']::jsonb[],
                                ARRAY['2023-01-02', '2023-01-01']::timestamp[]);
SELECT * FROM dwh.order_namings(ARRAY['{"order_items": []}']::jsonb[],
                                ARRAY['2023-01-01']::timestamp[]);

-- The keys that DDS lacks: all of them in an empty warehouse, in key
-- order; none once an order with them is loaded.
CREATE FUNCTION t.payload(user_id text, restaurant_id text, VARIADIC dishes text[])
RETURNS jsonb
LANGUAGE sql AS $$
    SELECT (t.order_msg(1, user_id, 'CLOSED', '2023-04-01 20:00:00',
                        t.items(VARIADIC dishes), restaurant_id)::jsonb)->'payload'
$$;
SELECT * FROM dwh.order_keys_missing(ARRAY[t.payload('u1', 'r1', 'd1:A', 'd2:B'),
                                           t.payload('u2', 'r1', 'd2:B'),
                                           t.payload('u1', 'r2', 'd1:A')]);
SELECT array_agg(k ORDER BY dwh.hash_key(k)) AS dishes_in_key_order
FROM unnest(ARRAY['d1', 'd2']) k;
SELECT t.load(1, 'u1', 'CLOSED', '2023-04-01 20:00:00', 'd1:A', 'd2:B');
SELECT * FROM dwh.order_keys_missing(ARRAY[t.payload('u1', 'rest-1', 'd1:A', 'd2:B')]);
SELECT * FROM dwh.order_keys_missing(ARRAY[t.payload('u1', 'rest-1', 'd1:A', 'd3:C'),
                                           t.payload('u3', 'rest-1', 'd2:B')]);

-- Rows of this transaction count, a rolled-back subtransaction's do not.
BEGIN;
INSERT INTO dds.h_user (h_user_pk, user_id, load_dt, load_src)
VALUES (dwh.hash_key('u9'), 'u9', now(), 'test');
SELECT users FROM dwh.order_keys_missing(ARRAY[t.payload('u9', 'rest-1', 'd1:A')]);
SAVEPOINT s;
INSERT INTO dds.h_user (h_user_pk, user_id, load_dt, load_src)
VALUES (dwh.hash_key('u8'), 'u8', now(), 'test');
ROLLBACK TO SAVEPOINT s;
SELECT users FROM dwh.order_keys_missing(ARRAY[t.payload('u8', 'rest-1', 'd1:A')]);
ROLLBACK;
SELECT users FROM dwh.order_keys_missing(ARRAY[t.payload('u9', 'rest-1', 'd1:A')]);

-- The claim writes what is missing, once: the hubs and the pair of a new
-- user, dish and restaurant, under the lock held exclusive.
BEGIN;
SELECT ids, names FROM dwh.claim_order_keys(ARRAY[t.payload('u4', 'r4', 'd4:D', 'd1:A')],
                                            ARRAY['2023-04-02']::timestamp[], true);
SELECT 'h_user' AS t, user_id AS k, load_src FROM dds.h_user WHERE user_id = 'u4'
UNION ALL
SELECT 'h_restaurant', restaurant_id, load_src FROM dds.h_restaurant WHERE restaurant_id = 'r4'
UNION ALL
SELECT 'h_product', product_id, load_src FROM dds.h_product WHERE product_id IN ('d1', 'd4')
UNION ALL
SELECT 'l_product_restaurant', p.product_id, l.load_src
FROM dds.l_product_restaurant l JOIN dds.h_product p USING (h_product_pk)
WHERE l.h_restaurant_pk = dwh.hash_key('r4')
ORDER BY 1, 2;
SELECT * FROM dwh.order_keys_missing(ARRAY[t.payload('u4', 'r4', 'd4:D', 'd1:A')]);
ROLLBACK;

-- Under the lock held shared, a batch that names a dish first, or renames
-- one, is refused with 40001 (dwh.ingest_orders claims again exclusive);
-- one that keeps every name is not.
\set VERBOSITY default
\set SHOW_CONTEXT never
SELECT ids, names FROM dwh.claim_order_keys(ARRAY[t.payload('u1', 'rest-1', 'd5:E')],
                                            ARRAY['2023-04-02']::timestamp[]);
SELECT ids, names FROM dwh.claim_order_keys(ARRAY[t.payload('u1', 'rest-1', 'd1:Z')],
                                            ARRAY['2023-04-02']::timestamp[]);
SELECT ids, names FROM dwh.claim_order_keys(ARRAY[t.payload('u1', 'rest-1', 'd1:A')],
                                            ARRAY['2023-04-02']::timestamp[]);
-- Through the entry point, both are applied.
SELECT t.load(2, 'u1', 'CLOSED', '2023-04-02 20:00:00', 'd5:E', 'd1:Z');
SELECT product_name, order_cnt FROM cdm.user_product_counters ORDER BY 1;

-- dwh.namings_rename() against the query it replaced, on seeded random
-- cases: 3 to 12 name rows over 4 dishes (times and names that tie, names
-- that differ in case, length or bytes beyond ASCII), namings of 1 to 3
-- dishes among 5 (the fifth has no row: named first).  A dish's newest row
-- is its order naming row half of the time, standing for an order naming
-- up to two hours newer (dds.product_namings).  Prints the seed, how many
-- cases rename, how many differ (0) and the smallest that does.
CREATE FUNCTION t.namings_rename_sql(ids text[], names text[], versions timestamp[])
RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT EXISTS (
        SELECT
        FROM (SELECT DISTINCT ON (n.product_id) n.product_id, n.name, n.load_dt
              FROM unnest(ids, names, versions) AS n(product_id, name, load_dt)
              ORDER BY n.product_id, n.load_dt DESC, n.name COLLATE "C" DESC) n
        LEFT JOIN LATERAL (
            SELECT s.name,
                   CASE WHEN s.load_src = 'stg.order_events'
                        THEN (SELECT p.last_order_dt FROM dds.product_namings p
                              WHERE p.h_product_pk = s.h_product_pk)
                        ELSE s.load_dt END AS load_dt
            FROM dds.s_product_names s
            WHERE s.h_product_pk = dwh.hash_key(n.product_id)
            ORDER BY s.load_dt DESC LIMIT 1) cur ON true
        WHERE cur.name IS NULL
           OR (n.name <> cur.name
               AND (n.load_dt > cur.load_dt
                    OR (n.load_dt = cur.load_dt
                        AND n.name COLLATE "C" > cur.name COLLATE "C"))))
$$;
BEGIN;
SELECT setseed(0.5151);
SELECT 0.5151 AS seed;
INSERT INTO dds.h_product (h_product_pk, product_id, load_dt, load_src)
SELECT dwh.hash_key('n' || i), 'n' || i, now(), 'test' FROM generate_series(1, 5) i;
CREATE TEMP TABLE rename_cases (k int, name_rows text, ids text[], names text[],
                                versions timestamp[], sql_says boolean, c_says boolean);
DO $$
DECLARE
    name_rows text;
    ids text[];
    names text[];
    versions timestamp[];
BEGIN
    FOR k IN 1..300 LOOP
        DELETE FROM dds.s_product_names
        WHERE h_product_pk IN (SELECT dwh.hash_key('n' || i) FROM generate_series(1, 5) i);
        DELETE FROM dds.product_namings
        WHERE h_product_pk IN (SELECT dwh.hash_key('n' || i) FROM generate_series(1, 5) i);
        INSERT INTO dds.s_product_names
               (h_product_pk, name, hk_product_names_hashdiff, load_dt, load_src)
        SELECT DISTINCT ON (d, t) dwh.hash_key('n' || d), nm, gen_random_uuid(), t, 'test'
        FROM (SELECT 1 + floor(random() * 4)::int AS d,
                     (ARRAY['Plov', 'plov', 'Pl', 'Плов', ''])[1 + floor(random() * 5)::int] AS nm,
                     timestamp '2023-01-01' + floor(random() * 3) * interval '1 hour' AS t
              FROM generate_series(1, 3 + floor(random() * 10)::int)) r;
        WITH newest AS (
            SELECT DISTINCT ON (h_product_pk) h_product_pk, load_dt
            FROM dds.s_product_names
            WHERE h_product_pk IN (SELECT dwh.hash_key('n' || i) FROM generate_series(1, 5) i)
            ORDER BY h_product_pk, load_dt DESC
        ),
        order_row AS (
            UPDATE dds.s_product_names s SET load_src = 'stg.order_events'
            FROM newest n
            WHERE s.h_product_pk = n.h_product_pk AND s.load_dt = n.load_dt
              AND random() < 0.5
            RETURNING s.h_product_pk, s.load_dt
        )
        INSERT INTO dds.product_namings (h_product_pk, first_order_dt, last_order_dt,
                                         last_order_name)
        SELECT h_product_pk, load_dt,
               load_dt + floor(random() * 3) * interval '1 hour', 'unused'
        FROM order_row;
        SELECT string_agg(p.product_id || '@' || s.load_dt::time || '=' || s.name
                          || CASE WHEN s.load_src = 'stg.order_events'
                                  THEN '(orders ' || n.last_order_dt::time || ')' ELSE '' END,
                          ' ' ORDER BY p.product_id, s.load_dt)
        INTO name_rows
        FROM dds.s_product_names s JOIN dds.h_product p USING (h_product_pk)
        LEFT JOIN dds.product_namings n USING (h_product_pk)
        WHERE p.product_id LIKE 'n%';
        SELECT array_agg('n' || (1 + floor(random() * 5)::int)),
               array_agg((ARRAY['Plov', 'plov', 'Pl', 'Плов', ''])[1 + floor(random() * 5)::int]),
               array_agg(timestamp '2023-01-01' + floor(random() * 3) * interval '1 hour')
        INTO ids, names, versions
        FROM generate_series(1, 1 + floor(random() * 3)::int);
        INSERT INTO rename_cases
        VALUES (k, name_rows, ids, names, versions,
                t.namings_rename_sql(ids, names, versions),
                dwh.namings_rename(ids, names, versions));
    END LOOP;
END
$$;
SELECT count(*) AS cases, count(*) FILTER (WHERE sql_says) AS renaming,
       count(*) FILTER (WHERE sql_says IS DISTINCT FROM c_says) AS differing
FROM rename_cases;
SELECT * FROM rename_cases WHERE sql_says IS DISTINCT FROM c_says
ORDER BY length(coalesce(name_rows, '')) + length(ids::text), k LIMIT 1;
ROLLBACK;

-- What only a checked payload has is required.
SELECT * FROM dwh.order_keys_missing(ARRAY['{"user": {"id": "u1"}, "order_items": []}']::jsonb[]);
SELECT * FROM dwh.order_keys_missing(ARRAY['{"restaurant": {"id": 1}, "user": {"id": "u1"}, "order_items": []}']::jsonb[]);
SELECT * FROM dwh.order_namings(ARRAY['{"order_items": [1]}']::jsonb[], ARRAY['2023-01-01']::timestamp[]);
SELECT * FROM dwh.order_namings(ARRAY['{"order_items": {}}']::jsonb[], ARRAY['2023-01-01']::timestamp[]);
SELECT * FROM dwh.order_namings(ARRAY['{"order_items": []}', NULL]::jsonb[], ARRAY['2023-01-01', '2023-01-01']::timestamp[]);
SELECT * FROM dwh.order_namings(ARRAY['{"order_items": []}']::jsonb[], ARRAY[]::timestamp[]);
SELECT count(*) AS verify FROM dwh.verify();
