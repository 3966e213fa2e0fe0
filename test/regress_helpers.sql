-- Helpers of the pg_regress tests: a fresh dwh, message builders and an
-- independent recount of the marts from the raw STG rows.  Every test file
-- includes it first, so each starts from an empty warehouse.

SET client_min_messages = warning;
DROP EXTENSION IF EXISTS dwh CASCADE;
DROP SCHEMA IF EXISTS t CASCADE;
CREATE EXTENSION dwh;
CREATE SCHEMA t;
RESET client_min_messages;

-- Dishes written 'id:name' (price 100, quantity 2) as order_items.
CREATE FUNCTION t.items(VARIADIC dishes text[]) RETURNS jsonb
LANGUAGE sql AS $$
    SELECT coalesce(jsonb_agg(jsonb_build_object(
               'id', split_part(d, ':', 1), 'name', split_part(d, ':', 2),
               'price', 100, 'quantity', 2) ORDER BY n), '[]')
    FROM unnest(dishes) WITH ORDINALITY AS u(d, n)
$$;

-- An order message as the order service writes it.
CREATE FUNCTION t.order_msg(object_id bigint, user_id text, status text,
                            update_ts text, items jsonb,
                            restaurant_id text DEFAULT 'rest-1')
RETURNS text
LANGUAGE sql AS $$
    SELECT jsonb_build_object(
        'object_id', object_id, 'object_type', 'order', 'sent_dttm', update_ts,
        'payload', jsonb_build_object(
            'restaurant', jsonb_build_object('id', restaurant_id),
            'date', update_ts,
            'user', jsonb_build_object('id', user_id),
            'order_items', items,
            'bonus_payment', 0,
            'cost', 200 * jsonb_array_length(items),
            'payment', 200 * jsonb_array_length(items),
            'bonus_grant', 0,
            'statuses', jsonb_build_array(jsonb_build_object('status', status, 'dttm', update_ts)),
            'final_status', status,
            'update_ts', update_ts))::text
$$;

-- The payload of such a message, for direct writes of STG.
CREATE FUNCTION t.payload(object_id bigint, user_id text, status text, update_ts text,
                          VARIADIC dishes text[]) RETURNS jsonb
LANGUAGE sql AS $$
    SELECT t.order_msg(object_id, user_id, status, update_ts, t.items(VARIADIC dishes))::jsonb->'payload'
$$;

-- Ingest one order through the entry point; returns its outcome.
CREATE FUNCTION t.load(object_id bigint, user_id text, status text,
                       update_ts text, VARIADIC dishes text[])
RETURNS text
LANGUAGE sql AS $$
    SELECT dwh.ingest_order(t.order_msg(object_id, user_id, status, update_ts,
                                        t.items(VARIADIC dishes)))
$$;

-- Write a restaurant value, menu entries written 'id:name:category'.
CREATE FUNCTION t.set_menu(restaurant_id text, update_ts text, VARIADIC dishes text[])
RETURNS void
LANGUAGE sql AS $$
    INSERT INTO stg.restaurants (object_id, payload)
    SELECT restaurant_id, jsonb_build_object(
        '_id', restaurant_id, 'name', 'Restaurant ' || restaurant_id,
        'menu', coalesce(jsonb_agg(jsonb_build_object(
                    '_id', split_part(d, ':', 1), 'name', split_part(d, ':', 2),
                    'price', 100, 'category', split_part(d, ':', 3)) ORDER BY n), '[]'),
        'update_ts_utc', update_ts)
    FROM unnest(dishes) WITH ORDINALITY AS u(d, n)
    ON CONFLICT (object_id) DO UPDATE SET payload = EXCLUDED.payload;
$$;

-- Write a user value.
CREATE FUNCTION t.set_user(user_id text, name text, login text, update_ts text)
RETURNS void
LANGUAGE sql AS $$
    INSERT INTO stg.users (object_id, payload)
    VALUES (user_id, jsonb_build_object('_id', user_id, 'name', name,
                                        'login', login, 'update_ts_utc', update_ts))
    ON CONFLICT (object_id) DO UPDATE SET payload = EXCLUDED.payload;
$$;

-- The marts, readable: business keys instead of hash keys.
CREATE VIEW t.products AS
SELECT u.user_id, m.product_name, m.order_cnt
FROM cdm.user_product_counters m JOIN dds.h_user u ON u.h_user_pk = m.user_id
ORDER BY 1, 2;

CREATE VIEW t.categories AS
SELECT u.user_id, m.category_name, m.order_cnt
FROM cdm.user_category_counters m JOIN dds.h_user u ON u.h_user_pk = m.user_id
ORDER BY 1, 2;

\i test/recount.sql
