-- Users and restaurants: versions, satellites, and what menus do to the
-- marts (categories, names), in any order relative to the orders.
\set ECHO none
\i test/regress_helpers.sql
\set ECHO all

-- A user: hub and name satellite; the same value again writes nothing; an
-- older value writes nothing; a renamed user is a new satellite row.
SELECT t.set_user('u1', 'Гаврила Архипович Игнатьев', 'gavaii_2222', '2023-08-11 16:44:59');
SELECT t.set_user('u1', 'Гаврила Архипович Игнатьев', 'gavaii_2222', '2023-08-11 16:44:59');
SELECT t.set_user('u1', 'Гаврила Игнатьев', 'gav_old', '2023-01-01 00:00:00');
SELECT username, userlogin, load_dt FROM dds.s_user_names ORDER BY load_dt;
SELECT t.set_user('u1', 'Гаврила Архипович Игнатьев-Петров', 'gavaii_2222', '2023-09-01 00:00:00');
SELECT username, userlogin, load_dt FROM dds.s_user_names ORDER BY load_dt;
SELECT payload->>'name' AS stg_name FROM stg.users;

-- A user value without update_ts_utc has the version time -infinity.
INSERT INTO stg.users (object_id, payload) VALUES ('u2', '{"name": "Без Версии", "login": "nover"}');
SELECT update_ts IS NULL AS no_version, count(*) AS satellites
FROM stg.users JOIN dds.s_user_names ON h_user_pk = dwh.hash_key(object_id)
WHERE object_id = 'u2' GROUP BY 1;
-- Between two values without a version, the greater text wins, whatever
-- the order of writing; the other one is kept in the history.
UPDATE stg.users SET payload = '{"name": "А Без Версии", "login": "a"}' WHERE object_id = 'u2';
SELECT payload->>'name' AS stg_name FROM stg.users WHERE object_id = 'u2';
SELECT payload->>'name' AS history_name FROM stg.user_history WHERE object_id = 'u2';
UPDATE stg.users SET payload = '{"name": "Я Без Версии", "login": "a"}' WHERE object_id = 'u2';
SELECT payload->>'name' AS stg_name FROM stg.users WHERE object_id = 'u2';
SELECT username, load_dt FROM dds.s_user_names WHERE h_user_pk = dwh.hash_key('u2');

-- Menus before the orders: the first order counts in categories at once.
SELECT t.set_menu('rest-1', '2023-08-01 00:00:00',
                  'd1:Пхали с фасолью:Закуски', 'd2:Салат Греческий:Салаты',
                  'd3:Хачапури по-мегрельски:Выпечка', ':::');
SELECT product_id FROM dds.h_product ORDER BY 1;
SELECT h.category_name FROM dds.h_category h ORDER BY 1;
SELECT t.load(1, 'u1', 'CLOSED', '2023-08-05 12:00:00', 'd1:Пхали с фасолью', 'd3:Хачапури по-мегрельски');
SELECT * FROM t.categories;
SELECT * FROM t.check();

-- The same menu again: nothing written.
SELECT count(*) AS name_rows FROM dds.s_product_names;
SELECT t.set_menu('rest-1', '2023-08-01 00:00:00',
                  'd1:Пхали с фасолью:Закуски', 'd2:Салат Греческий:Салаты',
                  'd3:Хачапури по-мегрельски:Выпечка', ':::');
SELECT count(*) AS name_rows FROM dds.s_product_names;

-- An older menu (moving d1 to Салаты) arriving late changes nothing.
SELECT t.set_menu('rest-1', '2023-07-01 00:00:00',
                  'd1:Пхали:Салаты', 'd2:Салат Греческий:Салаты');
SELECT payload->>'update_ts_utc' AS stg_version FROM stg.restaurants;
SELECT * FROM t.categories;

-- A second restaurant naming a dish of the first, with another category:
-- the newest menu decides.
SELECT t.set_menu('rest-2', '2023-08-02 00:00:00', 'd3:Хачапури:Основные блюда');
SELECT * FROM t.categories;
SELECT * FROM t.products;
SELECT * FROM t.check();

-- A menu that drops a dish does not change its category: it stays what the
-- newest menu naming it said, and past orders of it still count there.
-- (The STG recount of t.check() knows only current menus: verify() alone.)
SELECT t.set_menu('rest-2', '2023-08-03 00:00:00', 'd4:Чай Масала:Чай');
SELECT * FROM t.categories;
SELECT count(*) AS differences FROM dwh.verify();
SELECT c.category_name FROM dds.l_product_category l JOIN dds.h_category c USING (h_category_pk)
WHERE l.h_product_pk = dwh.hash_key('d3');

-- Restaurant names are versioned too.
SELECT r.restaurant_id, s.name, s.load_dt
FROM dds.s_restaurant_names s JOIN dds.h_restaurant r USING (h_restaurant_pk)
ORDER BY 1, 3;

-- Dishes ordered from a restaurant are linked to it, from menus and orders.
SELECT p.product_id, r.restaurant_id, l.load_src
FROM dds.l_product_restaurant l
JOIN dds.h_product p USING (h_product_pk)
JOIN dds.h_restaurant r USING (h_restaurant_pk)
ORDER BY 1, 2, 3;

-- A dish's order naming row sits at its first order naming, where it
-- takes the place of a menu naming of that time, and holds the newest
-- order naming's name (d5 after orders 50 and 51: Лобио at 09-01).  When
-- an order names the dish at or after its newest menu naming, the row
-- moves to that menu's time (d6 after the menu of 09-03 and order 52),
-- and the place it leaves goes back to the menu's name, found by index in
-- stg.restaurants or stg.restaurant_history.
SELECT t.set_menu('rest-3', '2023-09-01 00:00:00', 'd5:Лобио:Закуски', 'd6:Сациви:Закуски');
SELECT t.load(50, 'u1', 'CLOSED', '2023-09-01 00:00:00', 'd5:Лобио по-имеретински', 'd6:Сациви с орехами');
SELECT p.product_id, s.name, s.load_dt, s.load_src
FROM dds.s_product_names s JOIN dds.h_product p USING (h_product_pk)
WHERE p.product_id IN ('d5', 'd6') ORDER BY 1, 3;
SELECT t.load(51, 'u1', 'CLOSED', '2023-09-02 00:00:00', 'd5:Лобио');
SELECT t.set_menu('rest-3', '2023-09-03 00:00:00', 'd5:Лобио:Закуски', 'd6:Сациви:Закуски');
SELECT t.load(52, 'u1', 'CLOSED', '2023-09-04 00:00:00', 'd6:Сациви');
SELECT p.product_id, s.name, s.load_dt, s.load_src
FROM dds.s_product_names s JOIN dds.h_product p USING (h_product_pk)
WHERE p.product_id IN ('d5', 'd6') ORDER BY 1, 3;
-- Newer order namings leave the row where it is (d7 after orders 53 and
-- 54: at 09-05, named as by order 54), and so does a menu newer than
-- every order naming; an order naming of the newest menu's time moves the
-- row there, with the greater name of the two (order 55).
SELECT t.load(53, 'u1', 'CLOSED', '2023-09-05 00:00:00', 'd7:Хинкали');
SELECT t.load(54, 'u1', 'CLOSED', '2023-09-06 00:00:00', 'd7:Хинкали с мясом');
SELECT t.set_menu('rest-3', '2023-09-07 00:00:00', 'd5:Лобио:Закуски', 'd6:Сациви:Закуски',
                  'd7:Хинкали:Основные блюда');
SELECT p.product_id, s.name, s.load_dt, s.load_src
FROM dds.s_product_names s JOIN dds.h_product p USING (h_product_pk)
WHERE p.product_id = 'd7' ORDER BY 1, 3;
SELECT t.load(55, 'u1', 'CLOSED', '2023-09-07 00:00:00', 'd7:Хинкали с сыром');
SELECT p.product_id, s.name, s.load_dt, s.load_src
FROM dds.s_product_names s JOIN dds.h_product p USING (h_product_pk)
WHERE p.product_id = 'd7' ORDER BY 1, 3;
SELECT first_order_dt, last_order_dt, last_order_name, last_menu_dt
FROM dds.product_namings WHERE h_product_pk = dwh.hash_key('d7');
SELECT product_name, order_cnt FROM cdm.user_product_counters
WHERE product_id = dwh.hash_key('d7');
SELECT count(*) AS differences FROM dwh.verify();

-- Order independence: the same order versions and menu versions loaded in
-- two different orders end in the same marts.
CREATE TABLE t.events (n int, kind text, arg text[]);
INSERT INTO t.events VALUES
    (1, 'order', '{10,ux,CLOSED,2023-05-01 10:00:00,a:Айран,b:Борщ}'),
    (2, 'order', '{10,ux,CANCELLED,2023-05-01 11:00:00,a:Айран,b:Борщ}'),
    (3, 'order', '{11,ux,CLOSED,2023-05-02 10:00:00,b:Борщ,c:Чебурек}'),
    (4, 'order', '{12,uy,OPEN,2023-05-03 09:00:00,c:Чебурек}'),
    (5, 'order', '{12,uy,CLOSED,2023-05-03 10:00:00,c:Чебурек,a:Айран}'),
    (6, 'menu', '{rest-x,2023-06-01 00:00:00,a:Айран:Напитки,b:Борщ:Супы,c:Чебурек:Выпечка}'),
    (7, 'menu', '{rest-x,2023-06-02 00:00:00,a:Айран:Напитки,b:Борщ красный:Основные блюда,c:Чебурек:Выпечка}'),
    (8, 'order', '{13,uy,CLOSED,2023-05-04 10:00:00,b:Борщ,b:Борщ}');
CREATE FUNCTION t.replay(ordering text) RETURNS TABLE (mart text, user_id text, item text, order_cnt integer)
LANGUAGE plpgsql AS $$
DECLARE
    e record;
BEGIN
    SET client_min_messages = warning;
    DROP EXTENSION dwh CASCADE;
    CREATE EXTENSION dwh;
    RESET client_min_messages;
    FOR e IN EXECUTE 'SELECT * FROM t.events ORDER BY ' || ordering LOOP
        IF e.kind = 'order' THEN
            PERFORM dwh.ingest_order(t.order_msg(e.arg[1]::bigint, e.arg[2], e.arg[3], e.arg[4],
                                                 t.items(VARIADIC e.arg[5:])));
        ELSE
            PERFORM t.set_menu(e.arg[1], e.arg[2], VARIADIC e.arg[3:]);
        END IF;
    END LOOP;
    RETURN QUERY
        SELECT 'product', u.user_id::text, m.product_name::text, m.order_cnt
        FROM cdm.user_product_counters m JOIN dds.h_user u ON u.h_user_pk = m.user_id
        UNION ALL
        SELECT 'category', u.user_id::text, m.category_name::text, m.order_cnt
        FROM cdm.user_category_counters m JOIN dds.h_user u ON u.h_user_pk = m.user_id
        ORDER BY 1, 2, 3;
END $$;
CREATE TABLE t.forward AS SELECT * FROM t.replay('n');
CREATE TABLE t.backward AS SELECT * FROM t.replay('n DESC');
CREATE TABLE t.shuffled AS SELECT * FROM t.replay('md5(n::text)');
SELECT * FROM t.forward;
SELECT count(*) AS differences FROM (
    (TABLE t.forward EXCEPT TABLE t.backward) UNION ALL (TABLE t.backward EXCEPT TABLE t.forward)
    UNION ALL (TABLE t.forward EXCEPT TABLE t.shuffled) UNION ALL (TABLE t.shuffled EXCEPT TABLE t.forward)) d;
