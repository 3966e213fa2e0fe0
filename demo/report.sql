-- What demo/demo.sh shows at the end: the marts with user and dish names,
-- the workers, the dead letters, the user tags per rule and the latest tag
-- events.

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

-- User tags: the rules demo.sh defined before the stream, kept in the
-- transaction of each batch.  Windowed rules first move on to now, as the
-- tags worker does every minute.
\echo 'Windows moved on to now (dwh.expire_tags()):'
SELECT rules_moved, events AS tag_events FROM dwh.expire_tags();

\echo 'User tags per rule (dwh.tag_rules -> cdm.user_tags):'
SELECT r.tag, r.kind, coalesce(r.category_name, r.product_id, '') AS "of",
       r.threshold AS "at least", coalesce(r.window_days || ' days', 'all time') AS "window",
       count(t.user_id) AS users, min(t.order_cnt) AS fewest, max(t.order_cnt) AS most
FROM dwh.tag_rules r
LEFT JOIN cdm.user_tags t ON t.tag = r.tag
GROUP BY r.tag, r.kind, r.category_name, r.product_id, r.threshold, r.window_days
ORDER BY r.tag;

\echo 'Favourite categories (the value of the tag "favourite"):'
SELECT t.value AS category, count(*) AS users
FROM cdm.user_tags t
WHERE t.tag = 'favourite'
GROUP BY t.value
ORDER BY 2 DESC, 1;

\echo 'The pizza lovers with the most orders of Выпечка:'
SELECT n.username AS "user", n.userlogin AS login, t.order_cnt AS orders, t.since
FROM cdm.user_tags t
LEFT JOIN user_name n ON n.h_user_pk = t.user_id
WHERE t.tag = 'pizza lover'
ORDER BY t.order_cnt DESC, 1
LIMIT 5;

\echo 'The latest tag events (cdm.user_tag_events, also sent by NOTIFY dwh_user_tags):'
SELECT e.id, e.at::time(0) AS at, n.username AS "user", e.tag, e.kind, e.value, e.order_cnt AS orders
FROM cdm.user_tag_events e
LEFT JOIN user_name n ON n.h_user_pk = e.user_id
ORDER BY e.id DESC
LIMIT 10;

\echo 'The warehouse:'
SELECT (SELECT count(*) FROM stg.order_events) AS orders,
       (SELECT count(*) FROM dds.h_order) AS order_hubs,
       (SELECT count(*) FROM dwh.order_current_status WHERE status = 'CLOSED') AS closed,
       (SELECT count(*) FROM cdm.user_product_counters) AS product_rows,
       (SELECT count(*) FROM cdm.user_category_counters) AS category_rows,
       (SELECT count(*) FROM dwh.dead_letters) AS dead_letters,
       (SELECT count(*) FROM cdm.user_tags) AS tags,
       (SELECT count(*) FROM cdm.user_tag_events) AS tag_events,
       (SELECT count(*) FROM dwh.verify()) AS verify_differences;
