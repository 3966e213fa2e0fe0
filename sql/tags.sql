-- User tags (docs/tags.md): rules and their errors, grants and revokes in
-- the transaction of the order, retraction, menu change or rule change
-- that causes them, the favourite category and its ties, windows that
-- expire, the change feed and its NOTIFY, and the oracle.
\set ECHO none
\i test/regress_helpers.sql
\set ECHO all

-- What a statement raises, as SQLSTATE and message.
CREATE FUNCTION t.try(stmt text) RETURNS text
LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE stmt;
    RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
    RETURN SQLSTATE || ': ' || SQLERRM;
END
$$;

-- Tags and events, readable: users by their business keys.
CREATE VIEW t.tags AS
SELECT u.user_id, g.tag, g.value, g.order_cnt
FROM cdm.user_tags g JOIN dds.h_user u ON u.h_user_pk = g.user_id
ORDER BY 1, 2;

CREATE VIEW t.events AS
SELECT e.id, u.user_id, e.tag, e.value, e.kind, e.order_cnt
FROM cdm.user_tag_events e JOIN dds.h_user u ON u.h_user_pk = e.user_id
ORDER BY e.id;

-- Bad rules are refused, each with SQLSTATE 23514 and what is wrong.
SELECT t.try($$INSERT INTO dwh.tag_rules (tag, kind, category_name, threshold)
               VALUES ('soups', 'category', 'Супы', -1)$$) AS negative_threshold;
SELECT t.try($$INSERT INTO dwh.tag_rules (tag, kind, threshold)
               VALUES ('any', 'all_orders', 0)$$) AS zero_threshold;
SELECT t.try($$INSERT INTO dwh.tag_rules (tag, kind, window_days)
               VALUES ('recent', 'all_orders', -3)$$) AS negative_window;
SELECT t.try($$INSERT INTO dwh.tag_rules (tag, kind, window_days)
               VALUES ('recent', 'all_orders', 36501)$$) AS window_over_100_years;
SELECT t.try($$INSERT INTO dwh.tag_rules (tag, kind, window_days)
               VALUES ('recent', 'all_orders', 2147483647)$$) AS largest_window;
SELECT t.try($$INSERT INTO dwh.tag_rules (tag, kind, window_days)
               VALUES ('recent', 'all_orders', 36500)$$) AS window_of_100_years;
DELETE FROM dwh.tag_rules WHERE tag = 'recent';
SELECT t.try($$INSERT INTO dwh.tag_rules (tag, kind) VALUES ('x', 'cuisine')$$) AS unknown_kind;
SELECT t.try($$INSERT INTO dwh.tag_rules (tag, kind) VALUES ('x', NULL)$$) AS no_kind;
SELECT t.try($$INSERT INTO dwh.tag_rules (tag, kind, category_name, product_id)
               VALUES ('x', 'category', 'Супы', 'd1')$$) AS dish_for_category_rule;
SELECT t.try($$INSERT INTO dwh.tag_rules (tag, kind, category_name, product_id)
               VALUES ('x', 'dish', 'Супы', 'd1')$$) AS category_for_dish_rule;
SELECT t.try($$INSERT INTO dwh.tag_rules (tag, kind) VALUES ('x', 'category')$$) AS no_category;
SELECT t.try($$INSERT INTO dwh.tag_rules (tag, kind, product_id) VALUES ('x', 'dish', '')$$) AS no_dish;
SELECT t.try($$INSERT INTO dwh.tag_rules (tag, kind, category_name)
               VALUES ('x', 'favourite_category', 'Супы')$$) AS category_for_favourite;
SELECT t.try($$INSERT INTO dwh.tag_rules (tag, kind) VALUES ('', 'all_orders')$$) AS empty_name;
SELECT t.try(format($$INSERT INTO dwh.tag_rules (tag, kind) VALUES (%L, 'all_orders')$$,
                    repeat('я', 201))) AS name_of_201_characters;
SELECT t.try(format($$INSERT INTO dwh.tag_rules (tag, kind) VALUES (%L, 'all_orders')$$,
                    repeat('я', 200))) AS name_of_200_characters;
DELETE FROM dwh.tag_rules WHERE length(tag) = 200;
-- One in full: the detail and hint say what to write.
INSERT INTO dwh.tag_rules (tag, kind, window_days) VALUES ('recent', 'all_orders', 0);
INSERT INTO dwh.tag_rules (tag, kind, product_id) VALUES ('plov', 'category', 'd1');
-- The table's constraints say the same when the trigger is disabled.
ALTER TABLE dwh.tag_rules DISABLE TRIGGER tag_rules_check;
SELECT t.try($$INSERT INTO dwh.tag_rules (tag, kind, threshold) VALUES ('x', 'all_orders', 0)$$) AS constraint_threshold;
SELECT t.try($$INSERT INTO dwh.tag_rules (tag, kind, product_id) VALUES ('x', 'category', 'd1')$$) AS constraint_names;
SELECT t.try($$INSERT INTO dwh.tag_rules (tag, kind, window_days, window_as_of)
               VALUES ('x', 'all_orders', 36501, now())$$) AS constraint_window_days;
SELECT t.try($$INSERT INTO dwh.tag_rules (tag, kind, window_days, window_as_of)
               VALUES ('x', 'all_orders', 0, now())$$) AS constraint_window_of_0;
SELECT t.try($$INSERT INTO dwh.tag_rules (tag, kind, window_days)
               VALUES ('x', 'all_orders', 30)$$) AS constraint_window_as_of;
SELECT t.try(format($$INSERT INTO dwh.tag_rules (tag, kind) VALUES (%L, 'all_orders')$$,
                    repeat('я', 201))) AS constraint_name_of_201_characters;
ALTER TABLE dwh.tag_rules ENABLE TRIGGER tag_rules_check;
-- A superuser's write of window_as_of is kept, but not one before year 1,
-- from which the window would start before the earliest timestamp (and
-- every count over it, ingestion included, would fail).
INSERT INTO dwh.tag_rules (tag, kind, window_days) VALUES ('x', 'all_orders', 36500);
SELECT t.try($$UPDATE dwh.tag_rules SET window_as_of = '4713-01-01 00:00:00 BC'
               WHERE tag = 'x'$$) AS window_before_year_1;
UPDATE dwh.tag_rules SET window_as_of = '0001-01-01 00:00:00' WHERE tag = 'x';
SELECT count(*) AS verify_rows FROM dwh.verify();
UPDATE dwh.tag_rules SET window_as_of = '-infinity' WHERE tag = 'x';
SELECT count(*) AS verify_rows FROM dwh.verify();
DELETE FROM dwh.tag_rules WHERE tag = 'x';
SELECT count(*) AS rules FROM dwh.tag_rules;

-- Rules: soups (a category), plov (a dish), regulars (all orders), the
-- favourite category; a category and a dish that nothing names yet are
-- accepted, and listed as problems.
INSERT INTO dwh.tag_rules (tag, kind, category_name, threshold)
VALUES ('soup lover', 'category', 'Супы', 2),
       ('dessert', 'category', 'Десерты', 1);
INSERT INTO dwh.tag_rules (tag, kind, product_id, threshold)
VALUES ('plov fan', 'dish', 'd1', 2),
       ('mystery', 'dish', 'no-such-dish', 1);
INSERT INTO dwh.tag_rules (tag, kind, threshold) VALUES ('regular', 'all_orders', 3);
INSERT INTO dwh.tag_rules (tag, kind) VALUES ('favourite', 'favourite_category');
SELECT tag, kind, category_name, product_id, threshold, window_days, window_as_of
FROM dwh.tag_rules ORDER BY tag;
SELECT * FROM dwh.tag_rule_problems ORDER BY tag;

-- The menu names Супы and the dishes; Десерты and no-such-dish stay unknown.
SELECT t.set_menu('rest-1', '2023-01-01 00:00:00',
                  'd1:Плов:Основные', 'd2:Борщ:Супы', 'd3:Щи:Супы', 'd4:Торт:Выпечка');
SELECT * FROM dwh.tag_rule_problems ORDER BY tag;

-- A first order: the favourite category is granted in its transaction, and
-- each grant is notified after commit with its event id, user, tag and kind.
-- Ties go to the smallest category name (byte by byte): Основные, not Супы.
LISTEN dwh_user_tags;
\o | sed -e 's/PID [0-9]*/PID N/'
SELECT t.load(1, 'u1', 'CLOSED', '2023-04-01 20:00:00', 'd1:Плов', 'd2:Борщ');
\o
UNLISTEN dwh_user_tags;
SELECT * FROM t.tags;
SELECT * FROM t.events;

-- More orders: soup lover at 2 orders with a soup, the favourite moves to
-- Супы (2 against 1: a revoke and a grant), then back to Основные on a tie.
SELECT t.load(2, 'u1', 'CLOSED', '2023-04-02 20:00:00', 'd3:Щи');
SELECT * FROM t.tags;
SELECT t.load(3, 'u1', 'CLOSED', '2023-04-03 20:00:00', 'd1:Плов');
SELECT * FROM t.tags;
SELECT * FROM t.events;
SELECT * FROM dwh.verify();

-- A batch of orders of two users in one call: tags of both, one statement.
SELECT received, applied FROM dwh.ingest_orders(ARRAY[
    convert_to(t.order_msg(4, 'u2', 'CLOSED', '2023-04-04 12:00:00', t.items('d2:Борщ')), 'UTF8'),
    convert_to(t.order_msg(5, 'u2', 'CLOSED', '2023-04-04 13:00:00', t.items('d3:Щи', 'd4:Торт')), 'UTF8'),
    convert_to(t.order_msg(6, 'u2', 'OPEN', '2023-04-04 14:00:00', t.items('d1:Плов')), 'UTF8'),
    convert_to(t.order_msg(7, 'u1', 'CLOSED', '2023-04-04 15:00:00', t.items('d4:Торт')), 'UTF8')]);
SELECT * FROM t.tags;
SELECT * FROM dwh.verify();

-- A count that moves without crossing its threshold writes no tag row:
-- cdm.user_tags reads the count (u1's plov fan and regular tags).
BEGIN;
SELECT string_agg(tag || ':' || xmin, ',' ORDER BY tag) AS held_before
FROM cdm.user_tags_held WHERE user_id = dwh.hash_key('u1') \gset
SELECT max(id) AS last_event FROM cdm.user_tag_events \gset
SELECT t.load(8, 'u1', 'CLOSED', '2023-04-05 12:00:00', 'd1:Плов');
SELECT * FROM t.tags WHERE user_id = 'u1';
SELECT string_agg(tag || ':' || xmin, ',' ORDER BY tag) = :'held_before' AS tag_rows_untouched,
       (SELECT count(*) FROM cdm.user_tag_events WHERE id > :last_event) AS events
FROM cdm.user_tags_held WHERE user_id = dwh.hash_key('u1');
SELECT * FROM dwh.verify();
ROLLBACK;

-- A retraction: order 2 leaves CLOSED, and in the same transaction u1 is no
-- longer a soup lover (1 order with a soup).
SELECT max(id) AS last_event FROM cdm.user_tag_events \gset
BEGIN;
SELECT t.load(2, 'u1', 'CANCELLED', '2023-04-02 21:00:00', 'd3:Щи');
SELECT * FROM t.tags WHERE user_id = 'u1';
SELECT tag, value, kind, order_cnt FROM t.events WHERE id > :last_event;
COMMIT;
SELECT * FROM dwh.verify();

-- A menu change: Торт moves to Десерты, which now exists: the dessert
-- lovers are granted in the menu's transaction, and Десерты is no longer a
-- problem.  u2's favourite: Десерты 1, Супы 2.
SELECT t.set_menu('rest-1', '2023-02-01 00:00:00',
                  'd1:Плов:Основные', 'd2:Борщ:Супы', 'd3:Щи:Супы', 'd4:Торт:Десерты');
SELECT * FROM t.tags;
SELECT * FROM dwh.tag_rule_problems ORDER BY tag;
SELECT * FROM dwh.verify();

-- Rule changes: regulars from 2 orders (u2 has 2 CLOSED orders), plov fan
-- dropped, a rule renamed: grants and revokes, set-based.
SELECT max(id) AS last_event FROM cdm.user_tag_events \gset
UPDATE dwh.tag_rules SET threshold = 2 WHERE tag = 'regular';
DELETE FROM dwh.tag_rules WHERE tag = 'plov fan';
UPDATE dwh.tag_rules SET tag = 'sweet tooth' WHERE tag = 'dessert';
SELECT tag, value, kind, order_cnt, user_id FROM t.events WHERE id > :last_event;
SELECT * FROM t.tags;
SELECT * FROM dwh.verify();
-- A rule is changed only in READ COMMITTED: its recount must see the
-- orders committed while it waited.
BEGIN ISOLATION LEVEL REPEATABLE READ;
SELECT t.try($$UPDATE dwh.tag_rules SET threshold = 5 WHERE tag = 'regular'$$) AS repeatable_read;
ROLLBACK;
-- TRUNCATE would leave the tags held: refused.
TRUNCATE dwh.tag_rules;
SELECT t.try('TRUNCATE dwh.tag_rules') AS truncate_sqlstate;

-- Windowed rules count the orders dated at most window_days before the
-- rule's window_as_of (and later ones).  u3 has an order dated 31 days ago (never counted),
-- one dated 30 days minus 2 seconds ago, u4 one dated yesterday.
INSERT INTO dwh.tag_rules (tag, kind, category_name, threshold, window_days)
VALUES ('active', 'all_orders', NULL, 1, 30), ('active soups', 'category', 'Супы', 1, 30);
SELECT tag, window_days, window_as_of <= now() AT TIME ZONE 'UTC' AS set_now
FROM dwh.tag_rules WHERE window_days IS NOT NULL ORDER BY tag;
SELECT t.load(8, 'u3', 'CLOSED',
              to_char(clock_timestamp() AT TIME ZONE 'UTC' - interval '31 days',
                      'YYYY-MM-DD HH24:MI:SS.US'), 'd2:Борщ');
SELECT * FROM t.tags WHERE user_id = 'u3';
SELECT t.load(9, 'u3', 'CLOSED',
              to_char(clock_timestamp() AT TIME ZONE 'UTC' - interval '30 days' + interval '2 seconds',
                      'YYYY-MM-DD HH24:MI:SS.US'), 'd3:Щи');
SELECT t.load(10, 'u4', 'CLOSED',
              to_char(clock_timestamp() AT TIME ZONE 'UTC' - interval '1 day',
                      'YYYY-MM-DD HH24:MI:SS.US'), 'd2:Борщ');
SELECT * FROM t.tags WHERE user_id IN ('u3', 'u4');
SELECT * FROM dwh.verify();
-- Time passes: the order of 30 days minus 2 seconds leaves the window.
-- dwh.expire_tags() revokes what it counted, and nothing else.
SELECT pg_sleep(2.5);
SELECT max(id) AS last_event FROM cdm.user_tag_events \gset
SELECT * FROM dwh.expire_tags();
SELECT tag, value, kind, order_cnt, user_id FROM t.events WHERE id > :last_event;
SELECT * FROM t.tags WHERE user_id IN ('u3', 'u4');
SELECT * FROM dwh.verify();
-- Nothing more to expire.
SELECT events FROM dwh.expire_tags();

-- What windowed rules count is kept like the marts, in
-- cdm.user_window_counters (none left for u3: its orders left the window).
CREATE VIEW t.windows AS
SELECT u.user_id, w.tag, c.category_name, w.order_cnt
FROM cdm.user_window_counters w
JOIN dds.h_user u ON u.h_user_pk = w.user_id
LEFT JOIN dds.h_category c ON c.h_category_pk = w.category_id
ORDER BY 1, 2, 3;
SELECT * FROM t.windows;
-- A new version of u4's order 10 that only moves its date 40 days back
-- changes no mart row, but leaves both windows: both tags are revoked in
-- its transaction.
CREATE FUNCTION t.load_dated(object_id bigint, user_id text, dated interval,
                             VARIADIC dishes text[]) RETURNS text
LANGUAGE sql AS $$
    SELECT dwh.ingest_order(jsonb_set(
        t.order_msg(object_id, user_id, 'CLOSED',
                    to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US'),
                    t.items(VARIADIC dishes))::jsonb,
        '{payload,date}',
        to_jsonb(to_char(clock_timestamp() AT TIME ZONE 'UTC' - dated,
                         'YYYY-MM-DD HH24:MI:SS.US')))::text)
$$;
SELECT order_cnt FROM cdm.user_category_counters
WHERE user_id = dwh.hash_key('u4') AND category_name = 'Супы';
SELECT max(id) AS last_event FROM cdm.user_tag_events \gset
SELECT t.load_dated(10, 'u4', interval '40 days', 'd2:Борщ');
SELECT order_cnt FROM cdm.user_category_counters
WHERE user_id = dwh.hash_key('u4') AND category_name = 'Супы';
SELECT tag, value, kind, order_cnt, user_id FROM t.events WHERE id > :last_event;
SELECT * FROM t.windows WHERE user_id = 'u4';
SELECT * FROM dwh.verify();
-- Back into the window (29 days and 23 hours old): counted, granted again.
SELECT max(id) AS last_event FROM cdm.user_tag_events \gset
SELECT t.load_dated(10, 'u4', interval '29 days 23 hours', 'd2:Борщ');
SELECT tag, value, kind, order_cnt, user_id FROM t.events WHERE id > :last_event;
SELECT * FROM t.windows WHERE user_id = 'u4';
-- A windowed favourite counts per category: for u4, Супы 1; a first
-- order of u5 dated now, with a soup and a cake, ties Десерты and Супы at
-- 1, and the smallest name (byte by byte) is the favourite.
INSERT INTO dwh.tag_rules (tag, kind, threshold, window_days)
VALUES ('recent favourite', 'favourite_category', 1, 30);
SELECT t.load(11, 'u5', 'CLOSED',
              to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US'),
              'd2:Борщ', 'd4:Торт');
SELECT * FROM t.windows WHERE user_id IN ('u4', 'u5');
SELECT * FROM t.tags WHERE user_id IN ('u4', 'u5') AND tag LIKE '%favourite';
SELECT * FROM dwh.verify();

-- The windowed deltas travel among the category deltas under keys that
-- carry their rule's rank and most of their category's key
-- (install/78_tag_windows.sql): the rank and the category come back whole,
-- and no category's key, nor the all-orders or the touched key, is taken
-- for one.
SELECT count(*) AS keys,
       count(*) FILTER (WHERE dwh.is_tag_window_key(x.k)) AS window_keys,
       count(*) FILTER (WHERE dwh.tag_window_key_rank(x.k) = x.r) AS ranks_back,
       count(*) FILTER (WHERE x.c BETWEEN (dwh.tag_window_category_range(x.k)).low
                                      AND (dwh.tag_window_category_range(x.k)).high)
           AS categories_in_range
FROM (SELECT r, c.c, dwh.tag_window_key(r, c.c) AS k
      FROM generate_series(1, 100000, 997) r,
           (SELECT dwh.hash_key('category ' || i) AS c FROM generate_series(1, 50) i
            UNION ALL SELECT dwh.all_orders_key()) c) x;
SELECT count(*) FILTER (WHERE dwh.is_tag_window_key(x.k)) AS taken_for_window_keys
FROM (SELECT dwh.hash_key('category ' || i) AS k FROM generate_series(1, 1000) i
      UNION ALL VALUES (dwh.all_orders_key()), (dwh.touched_user_key())) x;
-- An order's batch finds its windowed favourite deltas' categories by key:
-- with 3,000 more categories named by a menu it reads a few rows of
-- dds.h_category, not every category for every windowed favourite rule
-- (which made an order 100 times slower with 20 such rules and 10,000
-- categories).
BEGIN;
SELECT t.set_menu('r-many', '2023-01-01 00:00:00',
                  VARIADIC ARRAY(SELECT 'm' || i || ':Dish ' || i || ':Category ' || i
                                 FROM generate_series(1, 3000) i));
SELECT count(*) > 3000 AS many_categories FROM dds.h_category;
-- (Planned for the table's size, as autovacuum would have it.)
ANALYZE dds.h_category;
SELECT seq_tup_read + coalesce(idx_tup_fetch, 0) AS read_before
FROM pg_stat_xact_user_tables WHERE relid = 'dds.h_category'::regclass \gset
SELECT t.load(12, 'u5', 'CLOSED',
              to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US'),
              'd2:Борщ', 'd4:Торт');
SELECT seq_tup_read + coalesce(idx_tup_fetch, 0) - :read_before AS category_rows_read,
       seq_tup_read + coalesce(idx_tup_fetch, 0) - :read_before < 100 AS few
FROM pg_stat_xact_user_tables WHERE relid = 'dds.h_category'::regclass;
SELECT * FROM t.windows WHERE user_id = 'u5';
SELECT count(*) FROM dwh.verify();
ROLLBACK;

-- The oracle catches a tampered tag, a missing one and a made-up one, a
-- tampered window count and one of no rule; dwh.rebuild() repairs them,
-- with events, and counts the window counts it repairs.
UPDATE cdm.user_tags_held SET value = 'Супы'
WHERE tag = 'regular' AND user_id = dwh.hash_key('u1');
DELETE FROM cdm.user_tags_held WHERE tag = 'favourite' AND user_id = dwh.hash_key('u2');
INSERT INTO cdm.user_tags_held (user_id, tag) VALUES (dwh.hash_key('u4'), 'regular');
UPDATE cdm.user_window_counters SET order_cnt = 7
WHERE tag = 'active' AND user_id = dwh.hash_key('u4');
INSERT INTO cdm.user_window_counters (user_id, tag, category_id, order_cnt)
VALUES (dwh.hash_key('u4'), 'no such rule', dwh.all_orders_key(), 3);
SELECT mart, expected_name, actual_name, expected_cnt, actual_cnt FROM dwh.verify();
-- The same differences in parts (users by ranges of their hash key).
SET client_min_messages = warning;
SELECT p AS parts, count(*) AS found,
       (SELECT count(*) FROM (SELECT * FROM dwh.verify(p) EXCEPT ALL SELECT * FROM dwh.verify()) x) AS not_in_whole,
       (SELECT count(*) FROM (SELECT * FROM dwh.verify() EXCEPT ALL SELECT * FROM dwh.verify(p)) x) AS missed
FROM generate_series(2, 8, 3) p, dwh.verify(p)
GROUP BY p ORDER BY p;
RESET client_min_messages;
SELECT max(id) AS last_event FROM cdm.user_tag_events \gset
SELECT * FROM dwh.rebuild();
SELECT tag, value, kind, order_cnt, user_id FROM t.events WHERE id > :last_event;
SELECT * FROM t.windows WHERE user_id = 'u4' AND tag = 'active';
SELECT * FROM dwh.verify();

-- The users' order counts mart, and the marts' own recount.
SELECT u.user_id, m.order_cnt
FROM cdm.user_order_counters m JOIN dds.h_user u ON u.h_user_pk = m.user_id
ORDER BY 1;
SELECT * FROM t.check();

-- NOTIFY: one notification per event, in event order, after the commit
-- only.  A rolled-back grant is never notified; the second order ties
-- Супы with Основные (the favourite stays) and makes u9 a regular; the
-- third moves the favourite to Супы: a revoke and a grant.  The payload
-- is the event's id only (any role may LISTEN); the ids from 901 on, to
-- match the notifications with the events.
SELECT setval(pg_get_serial_sequence('cdm.user_tag_events', 'id'), 900) > max(id) AS ids_from_901
FROM cdm.user_tag_events;
LISTEN dwh_user_tags;
\o | sed -e 's/PID [0-9]*/PID N/'
BEGIN;
SELECT t.load(9001, 'u9', 'CLOSED', '2023-04-10 20:00:00', 'd1:Плов');
ROLLBACK;
SELECT t.load(9001, 'u9', 'CLOSED', '2023-04-10 20:00:00', 'd1:Плов');
SELECT t.load(9002, 'u9', 'CLOSED', '2023-04-10 21:00:00', 'd2:Борщ', 'd3:Щи');
SELECT t.load(9003, 'u9', 'CLOSED', '2023-04-10 22:00:00', 'd3:Щи');
\o
UNLISTEN dwh_user_tags;
SELECT id, tag, value, kind FROM t.events WHERE user_id = 'u9' ORDER BY id;
SELECT count(*) FROM dwh.verify();
