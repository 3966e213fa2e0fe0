-- What demo/demo.sh shows at the end: the marts with user and dish names,
-- the workers, the dead letters and the "pizza lover" question.
-- psql variable: min_orders, the N of "ordered a category at least N times"
-- (empty: twice the average).

\pset footer off
\pset null '-'

-- The current name of each user: the newest satellite row.
CREATE TEMP VIEW user_name AS
SELECT DISTINCT ON (h_user_pk) h_user_pk, username, userlogin
FROM dds.s_user_names
ORDER BY h_user_pk, load_dt DESC;

\echo
\echo 'Top dishes of users (cdm.user_product_counters):'
SELECT n.username AS "user", m.product_name AS dish, m.order_cnt AS orders
FROM cdm.user_product_counters m
LEFT JOIN user_name n ON n.h_user_pk = m.user_id
ORDER BY m.order_cnt DESC, 1, 2
LIMIT 10;

\echo 'Top categories of users (cdm.user_category_counters):'
SELECT n.username AS "user", m.category_name AS category, m.order_cnt AS orders
FROM cdm.user_category_counters m
LEFT JOIN user_name n ON n.h_user_pk = m.user_id
ORDER BY m.order_cnt DESC, 1, 2
LIMIT 10;

\echo 'The workers (dwh.status):'
SELECT worker, state, partitions, messages, batches, dead_letters, lag,
       keys_mirrored, keys_missing, refreshes, last_error
FROM dwh.status;

\echo 'Dead letters (dwh.dead_letters), by SQLSTATE, with one reason of each:'
SELECT source, sqlstate, count(*) AS messages, left(min(reason), 60) AS "for example"
FROM dwh.dead_letters
GROUP BY 1, 2
ORDER BY 1, 3 DESC, 2;

-- The README's "pizza lover" query (Querying the marts), with the names.
-- N is min_orders, or else twice the average user's count (at least 10),
-- so that the tag picks out some users whatever the volume loaded.
SELECT coalesce(nullif(:'min_orders', '')::integer,
                greatest(10, round(2 * avg(order_cnt)))::integer) AS n
FROM cdm.user_category_counters
WHERE category_name = 'Выпечка' \gset
\echo 'The "pizza lover" tag: users who ordered Выпечка (pastry) at least' :n 'times:'
SELECT count(*) AS users, min(order_cnt) AS fewest, max(order_cnt) AS most
FROM cdm.user_category_counters
WHERE category_name = 'Выпечка' AND order_cnt >= :n;

SELECT n.username AS "user", n.userlogin AS login, m.order_cnt AS orders
FROM cdm.user_category_counters m
LEFT JOIN user_name n ON n.h_user_pk = m.user_id
WHERE m.category_name = 'Выпечка' AND m.order_cnt >= :n
ORDER BY m.order_cnt DESC, 1
LIMIT 5;

\echo 'The warehouse:'
SELECT (SELECT count(*) FROM stg.order_events) AS orders,
       (SELECT count(*) FROM dds.h_order) AS order_hubs,
       (SELECT count(*) FROM dwh.order_current_status WHERE status = 'CLOSED') AS closed,
       (SELECT count(*) FROM cdm.user_product_counters) AS product_rows,
       (SELECT count(*) FROM cdm.user_category_counters) AS category_rows,
       (SELECT count(*) FROM dwh.dead_letters) AS dead_letters,
       (SELECT count(*) FROM dwh.verify()) AS verify_differences;
