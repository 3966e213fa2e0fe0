-- An independent recount of the marts, shared by the pg_regress tests
-- (through test/regress_helpers.sql) and the TAP tests.  Needs schema t.

-- Recount from the raw STG rows, with none of dwh's DDS or views: the
-- latest order versions and the newest menu that names each dish.
CREATE VIEW t.recount_products AS
SELECT o.payload->'user'->>'id' AS user_id, i.product_id,
       count(DISTINCT o.object_id)::integer AS order_cnt
FROM stg.order_events o,
     LATERAL (SELECT DISTINCT e->>'id' AS product_id
              FROM jsonb_array_elements(o.payload->'order_items') e) i
WHERE o.payload->>'final_status' = 'CLOSED'
GROUP BY 1, 2;

CREATE VIEW t.recount_categories AS
WITH menu AS (
    SELECT DISTINCT ON (e->>'_id') e->>'_id' AS product_id, e->>'category' AS category
    FROM stg.restaurants r, jsonb_array_elements(r.payload->'menu') e
    WHERE e->>'_id' <> '' AND e->>'category' <> ''
    ORDER BY e->>'_id', r.payload->>'update_ts_utc' DESC, e->>'category' COLLATE "C" DESC
)
SELECT o.payload->'user'->>'id' AS user_id, m.category,
       count(DISTINCT o.object_id)::integer AS order_cnt
FROM stg.order_events o, jsonb_array_elements(o.payload->'order_items') e
JOIN menu m ON m.product_id = e->>'id'
WHERE o.payload->>'final_status' = 'CLOSED'
GROUP BY 1, 2;

-- What every scenario ends with: no rows means dwh.verify() is empty and
-- both marts equal the recount.
CREATE FUNCTION t.check() RETURNS SETOF text
LANGUAGE sql AS $$
    SELECT format('verify: %s %s %s expected %s/%s actual %s/%s', mart, user_id, item_id,
                  expected_name, expected_cnt, actual_name, actual_cnt)
    FROM dwh.verify()
    UNION ALL
    SELECT format('product recount: user %s dish %s recount %s mart %s',
                  r.user_id, r.product_id, r.order_cnt, m.order_cnt)
    FROM t.recount_products r
    FULL JOIN cdm.user_product_counters m
      ON m.user_id = dwh.hash_key(r.user_id) AND m.product_id = dwh.hash_key(r.product_id)
    WHERE r.order_cnt IS DISTINCT FROM m.order_cnt
    UNION ALL
    SELECT format('category recount: user %s category %s recount %s mart %s',
                  r.user_id, r.category, r.order_cnt, m.order_cnt)
    FROM t.recount_categories r
    FULL JOIN cdm.user_category_counters m
      ON m.user_id = dwh.hash_key(r.user_id) AND m.category_id = dwh.hash_key(r.category)
    WHERE r.order_cnt IS DISTINCT FROM m.order_cnt
$$;
