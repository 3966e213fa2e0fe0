-- A direct write of STG (an INSERT, a COPY, a restore) is carried through
-- DDS a chunk of dwh.trigger_chunk_rows rows at a time, each chunk as a
-- statement of its own, so that its memory does not grow with its size
-- (install/50_orders.sql, 60_dictionaries.sql); menus in chunks of as many
-- entries.  The warehouse is the one a write in one piece gives: namings
-- across chunks (newest version, then greatest name), counts, windowed and
-- all-time tags.
\set ECHO none
\i test/regress_helpers.sql
\set ECHO all

-- The calls of one transaction's functions (pg_stat_xact_user_functions,
-- which also counts those of earlier transactions until the session's
-- statistics are flushed: t.flush() before each transaction counted).
SET track_functions = 'pl';
CREATE FUNCTION t.flush() RETURNS void
LANGUAGE sql AS $$ SELECT pg_stat_force_next_flush() $$;
CREATE FUNCTION t.calls(name text) RETURNS bigint
LANGUAGE sql AS $$
    SELECT coalesce(sum(calls), 0) FROM pg_stat_xact_user_functions
    WHERE schemaname = 'dwh' AND funcname = name
$$;

SELECT t.set_menu('rest-1', '2023-01-01 00:00:00', 'd1:Плов:Горячее', 'd2:Лагман:Горячее',
                  'd3:Шурпа:Супы', 'd4:Чай:Напитки');
INSERT INTO dwh.tag_rules (tag, kind, category_name, threshold) VALUES ('soups', 'category', 'Супы', 2);
INSERT INTO dwh.tag_rules (tag, kind, threshold, window_days)
VALUES ('regular', 'all_orders', 3, 36500);

-- Only superusers set it, to a positive count.
CREATE ROLE regress_dwh_chunks;
SET ROLE regress_dwh_chunks;
SET dwh.trigger_chunk_rows = 1;
RESET ROLE;
SET dwh.trigger_chunk_rows = 0;
SHOW dwh.trigger_chunk_rows;

-- Twenty orders in one INSERT, in chunks of three (the last of two):
-- d1 is named by orders in the first chunk and renamed in the last; d2 is
-- named at one time by orders 2 (first chunk) and 8 (third chunk), the
-- greater name in the later chunk; d3 at one time by orders 11 (fourth)
-- and 14 (fifth), the greater name in the earlier chunk.  Users u1 to u4
-- have orders in every chunk; every fifth order is cancelled.
SET dwh.trigger_chunk_rows = 3;
SELECT t.flush();
BEGIN;
INSERT INTO stg.order_events (object_id, object_type, sent_dttm, payload)
SELECT i, 'order', v::timestamp + interval '10 minutes',
       t.payload(i, 'u' || (i % 4 + 1), CASE WHEN i % 5 = 0 THEN 'CANCELLED' ELSE 'CLOSED' END,
                 v, VARIADIC dishes)
FROM (VALUES
    (1, '2023-04-01 20:00:00', ARRAY['d1:Плов', 'd3:Шурпа']),
    (2, '2023-05-01 12:00:00', ARRAY['d2:Лагман А']),
    (3, '2023-04-03 20:00:00', ARRAY['d3:Шурпа', 'd4:Чай']),
    (4, '2023-04-04 20:00:00', ARRAY['d1:Плов']),
    (5, '2023-04-05 20:00:00', ARRAY['d3:Шурпа']),
    (6, '2023-04-06 20:00:00', ARRAY['d4:Чай']),
    (7, '2023-04-07 20:00:00', ARRAY['d1:Плов', 'd4:Чай']),
    (8, '2023-05-01 12:00:00', ARRAY['d2:Лагман Б']),
    (9, '2023-04-09 20:00:00', ARRAY['d3:Шурпа']),
    (10, '2023-04-10 20:00:00', ARRAY['d3:Шурпа']),
    (11, '2023-06-01 12:00:00', ARRAY['d3:Шурпа Z', 'd4:Чай']),
    (12, '2023-04-12 20:00:00', ARRAY['d1:Плов']),
    (13, '2023-04-13 20:00:00', ARRAY['d3:Шурпа']),
    (14, '2023-06-01 12:00:00', ARRAY['d3:Шурпа A']),
    (15, '2023-04-15 20:00:00', ARRAY['d4:Чай']),
    (16, '2023-04-16 20:00:00', ARRAY['d3:Шурпа', 'd1:Плов']),
    (17, '2023-04-17 20:00:00', ARRAY['d4:Чай']),
    (18, '2023-04-18 20:00:00', ARRAY['d3:Шурпа']),
    (19, '2023-07-01 12:00:00', ARRAY['d1:Плов по-фергански']),
    (20, '2023-04-20 20:00:00', ARRAY['d3:Шурпа'])) AS o(i, v, dishes)
ORDER BY i;
-- Seven chunks, each with its claim and namings; the marts written once,
-- with the chunks' deltas summed (they stay below 16 chunks' worth of
-- keys: 48 at chunks of three).
SELECT t.calls('load_order_versions') AS chunks,
       t.calls('claim_order_keys') AS claims,
       t.calls('apply_mart_deltas') AS mart_passes,
       t.calls('load_order_namings') AS naming_passes;
COMMIT;
SELECT * FROM t.products;
SELECT * FROM t.categories;
SELECT u.user_id, x.tag FROM cdm.user_tags x JOIN dds.h_user u ON u.h_user_pk = x.user_id
ORDER BY 1, 2;
SELECT * FROM t.check();

-- The history in chunks: older versions of orders 1 to 7 (an older name of
-- d1, a status of its time each), seven rows in chunks of three.
SELECT t.flush();
BEGIN;
INSERT INTO stg.order_event_history (object_id, update_ts, payload, sent_dttm)
SELECT i, '2023-03-01 10:00:00'::timestamp + i * interval '1 hour',
       t.payload(i, 'u' || (i % 4 + 1), 'OPEN',
                 to_char('2023-03-01 10:00:00'::timestamp + i * interval '1 hour',
                         'YYYY-MM-DD HH24:MI:SS'),
                 'd1:Плов старый'),
       '2023-03-02 00:00:00'
FROM generate_series(1, 7) i
ORDER BY i;
SELECT t.calls('load_history_versions') AS history_chunks,
       t.calls('claim_order_keys') AS claims;
COMMIT;
SELECT count(*) AS open_status_rows FROM dds.s_order_status WHERE status = 'OPEN';
SELECT * FROM t.check();


-- An upsert in chunks: orders 21 to 25 new (two chunks), 1 to 4 newer
-- versions (their UPDATE two chunks, its replaced versions kept in the
-- history).
SELECT t.flush();
BEGIN;
INSERT INTO stg.order_events AS t (object_id, object_type, sent_dttm, payload)
SELECT i, 'order', v::timestamp, t.payload(i, 'u' || (i % 4 + 1), s, v, VARIADIC dishes)
FROM (VALUES
    (1, '2023-08-01 12:00:00', 'CANCELLED', ARRAY['d1:Плов']),
    (2, '2023-08-01 12:00:00', 'CLOSED', ARRAY['d2:Лагман Б', 'd3:Шурпа']),
    (3, '2023-08-01 12:00:00', 'CLOSED', ARRAY['d4:Чай']),
    (4, '2023-08-01 12:00:00', 'CLOSED', ARRAY['d3:Шурпа']),
    (21, '2023-08-02 12:00:00', 'CLOSED', ARRAY['d3:Шурпа']),
    (22, '2023-08-02 12:00:00', 'CLOSED', ARRAY['d3:Шурпа']),
    (23, '2023-08-02 12:00:00', 'CLOSED', ARRAY['d1:Плов']),
    (24, '2023-08-02 12:00:00', 'CLOSED', ARRAY['d3:Шурпа']),
    (25, '2023-08-02 12:00:00', 'CLOSED', ARRAY['d2:Лагман Б'])) AS o(i, v, s, dishes)
ORDER BY i
ON CONFLICT (object_id) DO UPDATE
SET sent_dttm = EXCLUDED.sent_dttm, payload = EXCLUDED.payload
WHERE EXCLUDED.update_ts >= t.update_ts;
SELECT t.calls('load_order_versions') AS chunks;
COMMIT;
SELECT * FROM t.products;
SELECT u.user_id, x.tag FROM cdm.user_tags x JOIN dds.h_user u ON u.h_user_pk = x.user_id
ORDER BY 1, 2;
SELECT * FROM t.check();

-- An UPDATE in chunks: orders 11 to 17, seven rows, are three chunks, each
-- new version with the one it replaced.  Orders 11 to 15 get a newer
-- version naming d4 (the even ones cancelled): the versions they replace
-- go to the history.  Orders 16 and 17 keep their version, only their
-- sent_dttm grows: nothing of theirs goes to the history.
SELECT count(*) AS history_rows FROM stg.order_event_history
WHERE object_id BETWEEN 11 AND 17;
SELECT t.flush();
BEGIN;
UPDATE stg.order_events e
SET payload = CASE WHEN e.object_id <= 15
                   THEN t.payload(e.object_id, 'u' || (e.object_id % 4 + 1),
                                  CASE WHEN e.object_id % 2 = 0 THEN 'CANCELLED' ELSE 'CLOSED' END,
                                  '2023-09-01 12:00:00', 'd4:Чай')
                   ELSE e.payload END,
    sent_dttm = e.sent_dttm + interval '1 day'
WHERE e.object_id BETWEEN 11 AND 17;
SELECT t.calls('load_order_versions') AS chunks;
COMMIT;
SELECT object_id, update_ts FROM stg.order_event_history
WHERE object_id BETWEEN 11 AND 17 ORDER BY 1, 2;
SELECT * FROM t.products;
SELECT u.user_id, x.tag FROM cdm.user_tags x JOIN dds.h_user u ON u.h_user_pk = x.user_id
ORDER BY 1, 2;
SELECT * FROM t.check();

-- After an ingest, which holds the dictionary lock shared, a direct write
-- of the same transaction is a later write: it takes the lock exclusive
-- (refused at once if another session holds it, src/dwh_locks.c) and is
-- carried in chunks: one call for the ingest's upsert, three for the
-- INSERT.
SELECT t.flush();
BEGIN;
SELECT count(*) AS applied FROM dwh.ingest_orders(ARRAY[
    convert_to(t.order_msg(31, 'u2', 'CLOSED', '2023-09-02 12:00:00', t.items('d4:Чай')), 'UTF8')]);
SELECT dwh.dictionary_lock_exclusive() AS exclusive;
INSERT INTO stg.order_events (object_id, object_type, sent_dttm, payload)
SELECT i, 'order', '2023-09-03 12:00:00', t.payload(i, 'u3', 'CLOSED', '2023-09-03 12:00:00', 'd4:Чай')
FROM generate_series(32, 38) i;
SELECT dwh.dictionary_lock_exclusive() AS exclusive,
       t.calls('load_order_versions') AS calls;
COMMIT;
SELECT * FROM t.check();

-- A chunk as large as the statement: the same warehouse again.
SET dwh.trigger_chunk_rows = 100;
INSERT INTO stg.order_events (object_id, object_type, sent_dttm, payload)
SELECT i, 'order', '2023-09-01 12:00:00', t.payload(i, 'u1', 'CLOSED', '2023-09-01 12:00:00', 'd4:Чай')
FROM generate_series(26, 30) i;
SELECT * FROM t.check();
-- Menus in chunks of 3 entries (a restaurant and its dishes count one
-- each): four restaurants of two dishes, a chunk each.  d3 is listed at one
-- time in two categories by r2 and r4, the greater category from the later
-- chunk; d4 is renamed by r3 at a newer time than r5 names it; d1 moves to
-- another category.  The marts follow the moves of the orders' dishes.
SET dwh.trigger_chunk_rows = 3;
SELECT t.flush();
BEGIN;
INSERT INTO stg.restaurants (object_id, payload)
SELECT r, jsonb_build_object('_id', r, 'name', 'Restaurant ' || r, 'update_ts_utc', v,
                             'menu', menu)
FROM (VALUES
    ('r2', '2023-10-01 00:00:00', '[{"_id": "d3", "name": "Шурпа", "price": 1, "category": "Супы"},
                                    {"_id": "d9", "name": "Хлеб", "price": 1, "category": "Хлеб"}]'::jsonb),
    ('r3', '2023-10-02 00:00:00', '[{"_id": "d4", "name": "Чай зелёный", "price": 1, "category": "Напитки"},
                                    {"_id": "d1", "name": "Плов", "price": 1, "category": "Рис"}]'),
    ('r4', '2023-10-01 00:00:00', '[{"_id": "d3", "name": "Шурпа", "price": 1, "category": "Шурпы"},
                                    {"_id": "d8", "name": "Вода", "price": 1, "category": "Напитки"}]'),
    ('r5', '2023-09-01 00:00:00', '[{"_id": "d4", "name": "Чай чёрный", "price": 1, "category": "Напитки"},
                                    {"_id": "d7", "name": "Сок", "price": 1, "category": "Напитки"}]')) AS m(r, v, menu)
ORDER BY r;
SELECT t.calls('load_restaurant_versions') AS menu_chunks;
COMMIT;
SELECT * FROM t.products WHERE user_id = 'u1';
SELECT * FROM t.categories WHERE user_id = 'u1';
SELECT * FROM t.check();

-- Users in chunks of 3 rows: seven new users in one INSERT, then four
-- older values of theirs into the history in one INSERT.
SELECT t.flush();
BEGIN;
INSERT INTO stg.users (object_id, payload)
SELECT 'n' || i, jsonb_build_object('_id', 'n' || i, 'name', 'Name ' || i, 'login', 'l' || i,
                                    'update_ts_utc', '2023-05-01 00:00:00')
FROM generate_series(1, 7) i;
INSERT INTO stg.user_history (object_id, update_ts, payload)
SELECT 'n' || i, '2023-04-01 00:00:00',
       jsonb_build_object('_id', 'n' || i, 'name', 'Old name ' || i, 'login', 'l' || i,
                          'update_ts_utc', '2023-04-01 00:00:00')
FROM generate_series(1, 4) i;
SELECT t.calls('load_user_versions') AS user_chunks;
COMMIT;
SELECT count(DISTINCT h.user_id) AS users, count(*) AS name_rows,
       count(*) FILTER (WHERE s.username LIKE 'Old%') AS old_names
FROM dds.h_user h JOIN dds.s_user_names s USING (h_user_pk)
WHERE h.user_id LIKE 'n%';
SELECT * FROM t.check();

-- Eight orders of new users in chunks of one: each brings five keys or
-- more (dishes, categories, the user's counts), so the sums pass 16 keys
-- every few chunks and the marts are written then, and at the end.
SET dwh.trigger_chunk_rows = 1;
SELECT t.flush();
BEGIN;
INSERT INTO stg.order_events (object_id, object_type, sent_dttm, payload)
SELECT i, 'order', '2023-07-02 00:00:00',
       t.payload(i, 'u' || i, 'CLOSED', '2023-07-01 12:00:00', 'd3:Шурпа', 'd4:Чай')
FROM generate_series(131, 138) i
ORDER BY i;
SELECT t.calls('load_order_versions') AS chunks,
       t.calls('apply_mart_deltas') AS mart_passes;
COMMIT;
SELECT * FROM t.check();
SELECT count(*) AS rows, sum(order_cnt) AS orders FROM cdm.user_product_counters m
JOIN dds.h_user u ON u.h_user_pk = m.user_id WHERE u.user_id LIKE 'u13_';
RESET dwh.trigger_chunk_rows;
DROP ROLE regress_dwh_chunks;
