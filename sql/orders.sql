-- The counting rules of the marts through every kind of order change.
\set ECHO none
\i test/regress_helpers.sql
\set ECHO all

-- A new CLOSED order counts once per dish; no menu yet, so no categories.
SELECT t.load(1, 'u1', 'CLOSED', '2023-04-01 20:00:00', 'd1:Плов', 'd2:Лагман');
SELECT * FROM t.products;
SELECT * FROM t.categories;
SELECT * FROM t.check();

-- Re-sent unchanged: nothing changes, not even the satellites.
SELECT count(*) AS status_rows FROM dds.s_order_status;
SELECT t.load(1, 'u1', 'CLOSED', '2023-04-01 20:00:00', 'd1:Плов', 'd2:Лагман');
SELECT count(*) AS status_rows FROM dds.s_order_status;
SELECT * FROM t.products;
SELECT * FROM t.check();

-- An order that becomes CLOSED later: counted only then.
SELECT t.load(2, 'u1', 'OPEN', '2023-04-02 18:00:00', 'd1:Плов');
SELECT * FROM t.products;
SELECT t.load(2, 'u1', 'CLOSED', '2023-04-02 19:00:00', 'd1:Плов');
SELECT * FROM t.products;
SELECT * FROM t.check();

-- A CLOSED order that becomes CANCELLED: the counts go back down, and a row
-- whose count reaches zero leaves the mart.
SELECT t.load(1, 'u1', 'CANCELLED', '2023-04-01 21:00:00', 'd1:Плов', 'd2:Лагман');
SELECT * FROM t.products;
SELECT * FROM t.check();

-- An older version arriving after a newer one changes nothing.
SELECT t.load(1, 'u1', 'CLOSED', '2023-04-01 20:30:00', 'd1:Плов', 'd2:Лагман');
SELECT payload->>'final_status' AS stg_status FROM stg.order_events WHERE object_id = 1;
SELECT * FROM t.products;
SELECT * FROM t.check();

-- A newer version with another dish list: the dropped dish is no longer
-- counted, the new one is, and DDS links follow.
SELECT t.load(3, 'u2', 'CLOSED', '2023-04-03 12:00:00', 'd1:Плов', 'd2:Лагман');
SELECT t.load(3, 'u2', 'CLOSED', '2023-04-03 12:05:00', 'd1:Плов', 'd3:Шурпа');
SELECT * FROM t.products;
SELECT p.product_id
FROM dds.l_order_product l JOIN dds.h_product p USING (h_product_pk)
WHERE l.h_order_pk = dwh.hash_key('3') ORDER BY 1;
SELECT * FROM t.check();

-- An unknown user (no dictionary entry) is counted all the same.
SELECT t.load(4, 'nobody-knows-me', 'CLOSED', '2023-04-04 10:00:00', 'd3:Шурпа');
SELECT count(*) AS user_name_rows FROM dds.s_user_names;
SELECT * FROM t.products WHERE user_id = 'nobody-knows-me';

-- The same dish twice in order_items counts once.
SELECT t.load(5, 'u3', 'CLOSED', '2023-04-05 10:00:00', 'd4:Чай', 'd4:Чай');
SELECT * FROM t.products WHERE user_id = 'u3';
SELECT * FROM t.check();

-- A menu arriving after the orders: category counts appear.  d1 and d2 are
-- both mains: an order holding both counts once in that category.
SELECT t.load(6, 'u3', 'CLOSED', '2023-04-06 10:00:00', 'd1:Плов', 'd2:Лагман', 'd4:Чай');
SELECT * FROM t.categories;
SELECT t.set_menu('rest-1', '2023-08-01 00:00:00',
                  'd1:Плов:Основные блюда', 'd2:Лагман:Основные блюда',
                  'd3:Шурпа:Супы', 'd4:Чай:Напитки');
SELECT * FROM t.categories;
SELECT * FROM t.check();

-- A dish no menu knows is counted per dish, not per category.
SELECT t.load(7, 'u4', 'CLOSED', '2023-04-07 10:00:00', 'd9:Неизвестное', 'd3:Шурпа');
SELECT * FROM t.products WHERE user_id = 'u4';
SELECT * FROM t.categories WHERE user_id = 'u4';
SELECT * FROM t.check();

-- A dish moved to another category: every CLOSED order holding it moves.
SELECT t.set_menu('rest-1', '2023-08-02 00:00:00',
                  'd1:Плов:Основные блюда', 'd2:Лагман:Супы',
                  'd3:Шурпа:Супы', 'd4:Чай:Напитки');
SELECT * FROM t.categories;
SELECT * FROM t.check();

-- A renamed dish (newer menu): every mart row takes the new name.
SELECT t.set_menu('rest-1', '2023-08-03 00:00:00',
                  'd1:Плов ферганский:Основные блюда', 'd2:Лагман:Супы',
                  'd3:Шурпа:Супы', 'd4:Чай:Напитки');
SELECT * FROM t.products WHERE product_name LIKE 'Плов%';
-- An order older than that menu does not rename the dish back...
SELECT t.load(8, 'u5', 'CLOSED', '2023-04-08 10:00:00', 'd1:Плов');
SELECT DISTINCT product_name FROM t.products WHERE product_name LIKE 'Плов%';
-- ...a newer one does: the latest name wins, whoever brought it.
SELECT t.load(9, 'u5', 'CLOSED', '2023-09-01 10:00:00', 'd1:Плов по-узбекски');
SELECT * FROM t.products WHERE product_name LIKE 'Плов%';
SELECT * FROM t.check();

-- Two versions with the same update_ts: the greater payload wins whatever
-- the arrival order, so replays converge.
SELECT t.load(10, 'u6', 'CLOSED', '2023-04-10 10:00:00', 'd3:Шурпа');
SELECT t.load(10, 'u6', 'CANCELLED', '2023-04-10 10:00:00', 'd3:Шурпа');
SELECT payload->>'final_status' AS stg_status FROM stg.order_events WHERE object_id = 10;
SELECT * FROM t.products WHERE user_id = 'u6';
SELECT * FROM t.check();

-- rebuild() of consistent marts changes nothing.
SELECT * FROM dwh.rebuild();
SELECT * FROM t.check();

-- verify() finds every kind of damage, rebuild() repairs exactly that.
UPDATE cdm.user_product_counters SET order_cnt = order_cnt + 5
WHERE product_name = 'Шурпа' AND user_id = dwh.hash_key('u2');
DELETE FROM cdm.user_category_counters WHERE user_id = dwh.hash_key('u4');
UPDATE cdm.user_product_counters SET product_name = 'Чай?' WHERE product_name = 'Чай';
INSERT INTO cdm.user_category_counters (user_id, category_id, category_name, order_cnt)
VALUES (dwh.hash_key('u9'), dwh.hash_key('Десерты'), 'Десерты', 3);
SELECT mart, u.user_id, expected_name, actual_name, expected_cnt, actual_cnt
FROM dwh.verify() v LEFT JOIN dds.h_user u ON u.h_user_pk = v.user_id
ORDER BY 1, 2, 3, 4;
-- verify(parts) finds the same differences, a part of the users at a time.
SET client_min_messages = warning;
SELECT p AS parts, count(*) AS found,
       (SELECT count(*) FROM (SELECT * FROM dwh.verify(p) EXCEPT ALL SELECT * FROM dwh.verify()) x) AS not_in_whole,
       (SELECT count(*) FROM (SELECT * FROM dwh.verify() EXCEPT ALL SELECT * FROM dwh.verify(p)) x) AS missed
FROM generate_series(1, 7, 3) p, dwh.verify(p)
GROUP BY p ORDER BY p;
RESET client_min_messages;
SELECT * FROM dwh.rebuild();
SELECT * FROM t.check();

-- Damage to DDS itself: verify() names the table, the business key and
-- both values; rebuild() repairs the marts and says DDS was left as is;
-- rebuild(vault => true) recomputes DDS and the marts from STG.
DELETE FROM dds.s_order_status WHERE h_order_pk = dwh.hash_key('10');
DELETE FROM dds.l_order_product
WHERE (h_order_pk, h_product_pk) = (SELECT l.h_order_pk, l.h_product_pk
                                    FROM dds.l_order_product l JOIN dds.h_order o USING (h_order_pk)
                                    ORDER BY o.order_id, l.h_product_pk LIMIT 1);
UPDATE dds.s_product_names SET name = 'Шурпа?' WHERE name = 'Шурпа';
INSERT INTO dds.h_category (h_category_pk, category_name, load_dt, load_src)
VALUES (dwh.hash_key('Ничья'), 'Ничья', now(), 'by hand');
SELECT mart, expected_name, actual_name FROM dwh.verify() ORDER BY 1, 2, 3;
-- In parts: the orders', dishes' and categories' keys each in their part.
-- (Each part says it is done, here once.)
SELECT count(*) AS differences FROM dwh.verify(3);
SET client_min_messages = warning;
SELECT p AS parts, count(*) AS found,
       (SELECT count(*) FROM (SELECT * FROM dwh.verify(p) EXCEPT ALL SELECT * FROM dwh.verify()) x) AS not_in_whole,
       (SELECT count(*) FROM (SELECT * FROM dwh.verify() EXCEPT ALL SELECT * FROM dwh.verify(p)) x) AS missed
FROM generate_series(1, 7, 3) p, dwh.verify(p)
GROUP BY p ORDER BY p;
SELECT part, count(v.*) AS vault_differences
FROM generate_series(0, 3) part LEFT JOIN dwh.verify_vault(part, 4) v ON true
GROUP BY part ORDER BY part;
RESET client_min_messages;
-- Users are cut by ranges of their hash key: each key, the first and last
-- and those at and just below each range's start, in exactly one part.
SELECT parts, count(*) AS keys, count(*) FILTER (WHERE n <> 1) AS not_in_one_part
FROM (SELECT parts, k, count(*) FILTER (WHERE dwh.uuid_in_part(k, part, parts)) AS n
      FROM (VALUES (1), (4), (7), (16)) ps(parts)
      CROSS JOIN LATERAL (
          SELECT '00000000-0000-0000-0000-000000000000'::uuid AS k
          UNION SELECT 'ffffffff-ffff-ffff-ffff-ffffffffffff'
          UNION SELECT dwh.key_part_start(q, parts) FROM generate_series(0, parts - 1) q
          UNION SELECT (lpad(to_hex(('x' || substr(dwh.key_part_start(q, parts)::text, 1, 8))::bit(32)::bigint - 1), 8, '0')
                        || '-ffff-ffff-ffff-ffffffffffff')::uuid
                FROM generate_series(1, parts - 1) q) keys
      CROSS JOIN LATERAL generate_series(0, parts - 1) part
      GROUP BY parts, k) x
GROUP BY parts ORDER BY parts;
SELECT * FROM dwh.verify(0);
SELECT * FROM dwh.verify(1001);
SELECT * FROM dwh.verify(NULL);
SELECT * FROM dwh.verify_vault(4, 4);
SELECT * FROM dwh.verify_vault(NULL, 4);
SELECT * FROM dwh.rebuild(NULL);
SELECT * FROM dwh.rebuild();
SELECT count(*) AS vault_differences FROM dwh.verify_vault();
-- On a large warehouse rebuild() checks DDS in parts of about a million
-- orders (the planner's estimate): told the order hub holds 3,500,000
-- rows, it checks 4 parts and finds as many differences.
BEGIN;
UPDATE pg_class SET reltuples = 3500000 WHERE oid = 'dds.h_order'::regclass;
SET LOCAL track_functions = 'all';
SELECT * FROM dwh.rebuild();
SELECT funcid::regprocedure AS function, calls FROM pg_stat_xact_user_functions
WHERE funcid = 'dwh.verify_vault(integer, integer)'::regprocedure;
ROLLBACK;
SELECT * FROM dwh.rebuild(vault => true);
SELECT * FROM t.check();
SELECT * FROM t.products ORDER BY 1, 2;

-- Copies of an older version in one batch, and its newer version stored
-- already: the history keeps the older version once (the history upsert
-- used to meet the same row twice, SQLSTATE 21000, and a Kafka worker
-- retried that batch forever).
SELECT applied, unchanged, dead_lettered FROM dwh.ingest_orders(ARRAY[
    convert_to(t.order_msg(60, 'u1', 'CLOSED', '2023-06-01 12:00:00', t.items('d1:Плов')), 'UTF8')]);
SELECT applied, unchanged, dead_lettered FROM dwh.ingest_orders(ARRAY[
    convert_to(t.order_msg(60, 'u1', 'OPEN', '2023-06-01 10:00:00', t.items('d1:Плов')), 'UTF8'),
    convert_to(t.order_msg(60, 'u1', 'OPEN', '2023-06-01 10:00:00', t.items('d1:Плов')), 'UTF8'),
    convert_to(t.order_msg(60, 'u1', 'OPEN', '2023-06-01 10:00:00', t.items('d1:Плов')), 'UTF8')]);
SELECT object_id, update_ts, payload->>'final_status' AS status
FROM stg.order_event_history WHERE object_id = 60;
SELECT payload->>'final_status' AS current_status FROM stg.order_events WHERE object_id = 60;
SELECT * FROM t.check();

-- The id sequence of stg.order_events behind its table (the middle of a
-- restore, the table restored alone): the duplicate id is no message's
-- fault, so the batch is refused to its caller, who retries it, and no
-- message is dead-lettered (it used to be).  Once the sequence moves on,
-- the retry applies it.
CREATE TEMP TABLE letters_before AS SELECT count(*) AS n FROM dwh.dead_letters;
SELECT setval(pg_get_serial_sequence('stg.order_events', 'id'), 1, false) AS sequence_reset;
\set VERBOSITY sqlstate
SELECT applied, dead_lettered FROM dwh.ingest_orders(ARRAY[
    convert_to(t.order_msg(61, 'u1', 'CLOSED', '2023-06-02 12:00:00', t.items('d1:Плов')), 'UTF8')]);
\set VERBOSITY default
SELECT (SELECT count(*) FROM dwh.dead_letters) - n AS new_dead_letters FROM letters_before;
SELECT setval(pg_get_serial_sequence('stg.order_events', 'id'), max(id)) > 0 AS sequence_set
FROM stg.order_events;
SELECT applied, dead_lettered FROM dwh.ingest_orders(ARRAY[
    convert_to(t.order_msg(61, 'u1', 'CLOSED', '2023-06-02 12:00:00', t.items('d1:Плов')), 'UTF8')]);
SELECT * FROM t.check();
