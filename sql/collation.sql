-- Ties are broken by bytes, whatever the database's default collation:
-- every tie-break in install/ says COLLATE "C".  The other tests run in a
-- database of the C collation, where that changes nothing; here the same
-- kinds of ties are made in a database sorting by ICU's root locale, where
-- 'plov' sorts before 'Plov' (bytes: after), and must end as bytes say.
SELECT current_database() AS regress_db \gset
CREATE DATABASE dwh_icu TEMPLATE template0 ENCODING 'UTF8'
    LOCALE_PROVIDER icu ICU_LOCALE 'und';
\c dwh_icu
\set ECHO none
\i test/regress_helpers.sql
\set ECHO all
SELECT 'plov' < 'Plov' AS icu_puts_plov_first,
       'Plov' < 'plov' COLLATE "C" AS bytes_put_Plov_first;

-- The favourite category, all time and in a window: each user has one
-- order in 'plov' and one in 'Plov', in either order.  The smallest name
-- by bytes, 'Plov', is the favourite.
SELECT t.set_menu('r1', '2023-04-01 10:00:00', 'd1:Плов:plov', 'd2:Лагман:Plov');
INSERT INTO dwh.tag_rules (tag, kind) VALUES ('favourite', 'favourite_category');
INSERT INTO dwh.tag_rules (tag, kind, threshold, window_days)
VALUES ('recent favourite', 'favourite_category', 1, 36500);
SELECT t.load(1, 'u1', 'CLOSED', '2023-04-02 10:00:00', 'd1:Плов');
SELECT t.load(2, 'u1', 'CLOSED', '2023-04-02 11:00:00', 'd2:Лагман');
SELECT t.load(3, 'u2', 'CLOSED', '2023-04-02 10:00:00', 'd2:Лагман');
SELECT t.load(4, 'u2', 'CLOSED', '2023-04-02 11:00:00', 'd1:Плов');
SELECT u.user_id COLLATE "C" AS user_id, t.tag COLLATE "C" AS tag, t.value
FROM cdm.user_tags t JOIN dds.h_user u ON u.h_user_pk = t.user_id
ORDER BY 1, 2;

-- A dish's name: two menus and an order name it at the same time, 'Naan',
-- 'naan' and 'NAAN'; the greatest by bytes, 'naan', is its name, whichever
-- came first.  The same with its category: two menus of that time put it
-- in 'plov' and in 'Plov'; the greatest by bytes, 'plov', holds it.
SELECT t.set_menu('r2', '2023-04-03 10:00:00', 'd3:Naan:Plov');
SELECT t.load(5, 'u3', 'CLOSED', '2023-04-03 10:00:00', 'd3:NAAN');
SELECT t.set_menu('r3', '2023-04-03 10:00:00', 'd3:naan:plov');
SELECT t.set_menu('r4', '2023-04-03 10:00:00', 'd4:Chai:plov');
SELECT t.load(6, 'u4', 'CLOSED', '2023-04-03 10:00:00', 'd4:chai');
SELECT t.set_menu('r5', '2023-04-03 10:00:00', 'd4:CHAI:Plov');
SELECT h.product_id COLLATE "C" AS product_id, m.product_name, c.category_name
FROM cdm.user_product_counters m
JOIN dds.h_product h ON h.h_product_pk = m.product_id
JOIN dds.l_product_category l ON l.h_product_pk = m.product_id
JOIN cdm.user_category_counters c
  ON c.user_id = m.user_id AND c.category_id = l.h_category_pk
WHERE h.product_id IN ('d3', 'd4')
ORDER BY 1;

-- The recount agrees.
SELECT count(*) AS problems FROM dwh.verify();
SELECT * FROM t.check();

\c :regress_db
DROP DATABASE dwh_icu;
