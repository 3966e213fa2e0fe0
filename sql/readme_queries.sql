-- The queries of README.md, "Querying the marts", as written there.
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

SELECT * FROM t.check();
