-- Vault keys: RFC 4122 UUID v5 and the key convention of docs/formats.md.
\set ECHO none
\i test/regress_helpers.sql
\set ECHO all

-- The RFC 4122 / Python uuid5 vector: DNS namespace, "python.org".
SELECT dwh.uuid_v5('6ba7b810-9dad-11d1-80b4-00c04fd430c8', 'python.org');
-- The dwh namespace: hub keys over the business key as text.
SELECT dwh.hash_key('1371198') AS order_key,
       dwh.hash_key('1371198') = dwh.uuid_v5('7f288a2e-0ad0-4039-8e59-6c9838d87307', '1371198') AS same;
-- A link key is the key over both hub keys, hyphenated, one after the other.
SELECT dwh.hash_key(dwh.hash_key('1371198'), dwh.hash_key('626a81ce9a8cd1920641e29c')) AS link_key,
       dwh.hash_key(dwh.hash_key('1371198'), dwh.hash_key('626a81ce9a8cd1920641e29c'))
       = dwh.hash_key(dwh.hash_key('1371198')::text || dwh.hash_key('626a81ce9a8cd1920641e29c')::text) AS same;
-- Version and variant bits, on names of every length around SHA-1 block edges.
SELECT count(*) AS keys,
       count(*) FILTER (WHERE substr(k::text, 15, 1) = '5') AS version_5,
       count(*) FILTER (WHERE substr(k::text, 20, 1) IN ('8', '9', 'a', 'b')) AS rfc_variant,
       count(DISTINCT k) AS distinct_keys
FROM (SELECT dwh.hash_key(repeat('x', n)) AS k FROM generate_series(0, 200) n) s;
-- Non-ASCII names hash their UTF-8 bytes.
SELECT dwh.hash_key('Рис с лимоном');
-- The keys the triggers write are these.
SELECT t.load(1371198, '626a81ce9a8cd1920641e29c', 'CLOSED', '2023-04-01 20:45:43', 'aeca4d08abab78869c20128c:Рис с лимоном');
SELECT h_order_pk = dwh.hash_key('1371198') AS order_key_ok FROM dds.h_order;
SELECT hk_order_user_pk = dwh.hash_key(h_order_pk, h_user_pk) AS link_key_ok,
       h_user_pk = dwh.hash_key('626a81ce9a8cd1920641e29c') AS user_key_ok
FROM dds.l_order_user;
SELECT hk_order_status_hashdiff = dwh.hash_key(h_order_pk::text || 'CLOSED') AS hashdiff_ok
FROM dds.s_order_status;
-- Every hashdiff is the key over the hub key's text followed by the
-- content, as the columns' comments give it.
SELECT t.set_user('626a81ce9a8cd1920641e29c', 'Гаврила', 'gavaii_2222', '2023-04-01 10:00:00');
SELECT t.set_menu('rest-1', '2023-04-01 09:00:00', 'aeca4d08abab78869c20128c:Рис с лимоном:Гарниры');
SELECT bool_and(hk_user_names_hashdiff = dwh.hash_key(h_user_pk::text || username || userlogin))
       AS user_hashdiff_ok, count(*) AS users
FROM dds.s_user_names;
SELECT bool_and(hk_product_names_hashdiff = dwh.hash_key(h_product_pk::text || name))
       AS product_hashdiff_ok, count(*) AS products
FROM dds.s_product_names;
SELECT bool_and(hk_restaurant_names_hashdiff = dwh.hash_key(h_restaurant_pk::text || name))
       AS restaurant_hashdiff_ok, count(*) AS restaurants
FROM dds.s_restaurant_names;
SELECT bool_and(hk_order_cost_hashdiff = dwh.hash_key(h_order_pk::text || cost::text || payment::text))
       AS cost_hashdiff_ok, count(*) AS orders
FROM dds.s_order_cost;
