-- Dishes are named by orders and by menus.  Both paths load them here, so
-- that "the latest name" means the same thing whoever wrote it: the name of
-- the newest version (order update_ts or menu update_ts_utc), ties broken by
-- the greater name.

CREATE FUNCTION dwh.load_products(keys uuid[], ids text[], names text[],
                                  versions timestamp[], source text)
    RETURNS uuid[]
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    renamed uuid[];
BEGIN
    WITH candidate AS MATERIALIZED (
        SELECT DISTINCT ON (c.h_product_pk)
               c.h_product_pk, c.product_id, c.name, c.load_dt,
               dwh.hash_key(c.h_product_pk::text || c.name) AS hashdiff
        FROM unnest(keys, ids, names, versions) AS c(h_product_pk, product_id, name, load_dt)
        ORDER BY c.h_product_pk, c.load_dt DESC, c.name DESC
    ),
    hub AS (
        INSERT INTO dds.h_product (h_product_pk, product_id, load_dt, load_src)
        SELECT h_product_pk, product_id, now(), source
        FROM candidate
        ORDER BY h_product_pk
        ON CONFLICT DO NOTHING
    ),
    state AS MATERIALIZED (
        SELECT c.*, cur.name AS cur_name, cur.load_dt AS cur_load_dt,
               (SELECT p.hk_product_names_hashdiff
                FROM dds.s_product_names p
                WHERE p.h_product_pk = c.h_product_pk AND p.load_dt <= c.load_dt
                ORDER BY p.load_dt DESC LIMIT 1) AS prev_hashdiff
        FROM candidate c
        LEFT JOIN LATERAL (
            SELECT s.name, s.load_dt
            FROM dds.s_product_names s
            WHERE s.h_product_pk = c.h_product_pk
            ORDER BY s.load_dt DESC LIMIT 1) cur ON true
    ),
    satellite AS (
        INSERT INTO dds.s_product_names AS s
               (h_product_pk, name, hk_product_names_hashdiff, load_dt, load_src)
        SELECT h_product_pk, name, hashdiff, load_dt, source
        FROM state
        WHERE prev_hashdiff IS DISTINCT FROM hashdiff
        ORDER BY h_product_pk
        ON CONFLICT (h_product_pk, load_dt) DO UPDATE
        SET name = EXCLUDED.name,
            hk_product_names_hashdiff = EXCLUDED.hk_product_names_hashdiff,
            load_src = EXCLUDED.load_src
        WHERE EXCLUDED.name > s.name
    )
    SELECT array_agg(h_product_pk) INTO renamed
    FROM state
    WHERE cur_name IS NOT NULL AND name <> cur_name
      AND (load_dt > cur_load_dt OR (load_dt = cur_load_dt AND name > cur_name));

    RETURN renamed;
END
$fn$;
COMMENT ON FUNCTION dwh.load_products(uuid[], text[], text[], timestamp[], text) IS
    'Load dish hubs and name satellites; returns the dishes whose current name changed';

-- Mart rows carry the dish name: follow a rename on every row of the dish.
CREATE FUNCTION dwh.refresh_product_names(products uuid[]) RETURNS void
    LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $fn$
    UPDATE cdm.user_product_counters m
    SET product_name = n.name
    FROM (SELECT DISTINCT ON (h_product_pk) h_product_pk, name
          FROM dds.s_product_names
          WHERE h_product_pk = ANY (products)
          ORDER BY h_product_pk, load_dt DESC) n
    WHERE m.product_id = n.h_product_pk
      AND m.product_name IS DISTINCT FROM n.name;
$fn$;
COMMENT ON FUNCTION dwh.refresh_product_names(uuid[]) IS
    'Set product_name of every mart row of these dishes to their current name';

-- A mart row lives while its count is positive.
CREATE FUNCTION dwh.drop_zero_counters(product_users uuid[], products uuid[],
                                       category_users uuid[], categories uuid[])
    RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    IF products IS NOT NULL THEN
        DELETE FROM cdm.user_product_counters m
        USING unnest(product_users, products) AS z(user_id, product_id)
        WHERE m.user_id = z.user_id AND m.product_id = z.product_id
          AND m.order_cnt = 0;
    END IF;
    IF categories IS NOT NULL THEN
        DELETE FROM cdm.user_category_counters m
        USING unnest(category_users, categories) AS z(user_id, category_id)
        WHERE m.user_id = z.user_id AND m.category_id = z.category_id
          AND m.order_cnt = 0;
    END IF;
END
$fn$;
COMMENT ON FUNCTION dwh.drop_zero_counters(uuid[], uuid[], uuid[], uuid[]) IS
    'Delete the mart rows of these keys whose order_cnt fell to zero';
