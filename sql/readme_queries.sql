-- The queries of README.md, "Querying the marts", as written there, and
-- those of "How an app consumes tags".
\set ECHO none
\i test/regress_helpers.sql
\set ECHO all

SELECT t.set_user('u1', 'Гаврила', 'gavaii_2222', '2023-08-11 16:44:59');
SELECT t.set_user('u2', 'Анна', 'anna', '2023-08-11 16:44:59');
SELECT t.set_menu('rest-1', '2023-08-01 00:00:00',
                  'd1:Хачапури:Выпечка', 'd2:Чебурек:Выпечка', 'd3:Айран:Напитки');
-- u1: eleven orders with pastry (d2 in four of them), three of ayran;
-- u2: nine orders with pastry.
SELECT count(*) AS orders FROM (
    SELECT t.load(n, 'u1', 'CLOSED', '2023-08-12 10:00:00',
                  VARIADIC CASE WHEN n <= 4 THEN ARRAY['d1:Хачапури', 'd2:Чебурек']
                                ELSE ARRAY['d1:Хачапури'] END
                           || CASE WHEN n <= 3 THEN ARRAY['d3:Айран'] ELSE '{}' END)
    FROM generate_series(1, 11) n
    UNION ALL
    SELECT t.load(100 + n, 'u2', 'CLOSED', '2023-08-12 11:00:00', 'd2:Чебурек')
    FROM generate_series(1, 9) n) o;

-- Top dishes of a user, by login.
SELECT m.product_name, m.order_cnt
FROM cdm.user_product_counters m
JOIN dds.h_user u ON u.h_user_pk = m.user_id
JOIN LATERAL (SELECT userlogin FROM dds.s_user_names s
              WHERE s.h_user_pk = u.h_user_pk ORDER BY load_dt DESC LIMIT 1) n ON true
WHERE n.userlogin = 'gavaii_2222'
ORDER BY m.order_cnt DESC;

-- Users who ordered a category at least 10 times (as a tag, kept live:
-- "User tags" below).
SELECT user_id, order_cnt
FROM cdm.user_category_counters
WHERE category_name = 'Выпечка' AND order_cnt >= 10
ORDER BY order_cnt DESC;
SELECT dwh.hash_key('u1') AS u1;

-- "How an app consumes tags": the README's queries, with this data's ids
-- and a rule of its own; those that show times are wrapped.
INSERT INTO dwh.tag_rules (tag, kind, category_name, threshold)
VALUES ('pastry lover', 'category', 'Выпечка', 10);
-- u2's tenth order of pastry: u2 becomes a pastry lover too.
SELECT t.load(110, 'u2', 'CLOSED', '2023-08-12 12:00:00', 'd2:Чебурек');
SELECT tag, value, order_cnt, since <= now() AS since_set FROM (
SELECT t.tag, t.value, t.order_cnt, t.since
FROM cdm.user_tags t
JOIN dds.h_user u ON u.h_user_pk = t.user_id
WHERE u.user_id = 'u1'
ORDER BY t.tag
) q ORDER BY tag;
SELECT tag, value, order_cnt FROM cdm.user_tags
WHERE user_id = dwh.hash_key('u1');
SELECT user_id, order_cnt, since <= now() AS since_set FROM (
SELECT u.user_id, t.order_cnt, t.since
FROM cdm.user_tags t
JOIN dds.h_user u ON u.h_user_pk = t.user_id
WHERE t.tag = 'pastry lover'
ORDER BY t.order_cnt DESC, u.user_id
) q ORDER BY order_cnt DESC, user_id;
SELECT user_id, tag, kind, value, order_cnt, at <= now() AS at_set FROM (
SELECT e.id, u.user_id, e.tag, e.kind, e.value, e.order_cnt, e.at
FROM cdm.user_tag_events e
JOIN dds.h_user u ON u.h_user_pk = e.user_id
WHERE e.id > 0
ORDER BY e.id
) q ORDER BY id;

SELECT * FROM t.check();
