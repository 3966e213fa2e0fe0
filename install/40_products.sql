-- Dishes are named by orders and by menus.  Every version names its dishes
-- at its own time (an order's update_ts, a menu's update_ts_utc); the
-- satellite keeps one row per dish and time, with the greatest name named
-- then (byte-wise), so that it is a function of the versions received and
-- not of their arrival.  A dish's current name is its newest row's.

CREATE FUNCTION dwh.load_products(ids text[], names text[], versions timestamp[],
                                  source text)
    RETURNS uuid[]
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    renamed uuid[];
BEGIN
    -- A batch names each dish many times: keys and hashdiffs are computed
    -- once per dish and once per (dish, name).
    WITH naming AS MATERIALIZED (
        SELECT DISTINCT ON (n.product_id, n.load_dt)
               n.product_id, n.name, n.load_dt
        FROM unnest(ids, names, versions) AS n(product_id, name, load_dt)
        ORDER BY n.product_id, n.load_dt, n.name COLLATE "C" DESC
    ),
    dish AS MATERIALIZED (
        SELECT product_id, dwh.hash_key(product_id) AS h_product_pk
        FROM naming
        GROUP BY product_id
    ),
    named AS MATERIALIZED (
        SELECT d.h_product_pk, d.product_id, n.name,
               dwh.hash_key(d.h_product_pk::text || n.name) AS hashdiff
        FROM (SELECT product_id, name FROM naming GROUP BY 1, 2) n
        JOIN dish d USING (product_id)
    ),
    hub AS (
        INSERT INTO dds.h_product (h_product_pk, product_id, load_dt, load_src)
        SELECT h_product_pk, product_id, now(), source
        FROM dish
        ORDER BY h_product_pk
        ON CONFLICT DO NOTHING
    ),
    newest AS MATERIALIZED (
        SELECT DISTINCT ON (n.product_id) d.h_product_pk, n.name, n.load_dt
        FROM naming n JOIN dish d USING (product_id)
        ORDER BY n.product_id, n.load_dt DESC, n.name COLLATE "C" DESC
    ),
    -- Each dish's current name before this statement.
    before AS MATERIALIZED (
        SELECT n.h_product_pk, n.name, n.load_dt,
               cur.name AS cur_name, cur.load_dt AS cur_load_dt
        FROM newest n
        LEFT JOIN LATERAL (
            SELECT s.name, s.load_dt
            FROM dds.s_product_names s
            WHERE s.h_product_pk = n.h_product_pk
            ORDER BY s.load_dt DESC LIMIT 1) cur ON true
    ),
    -- Only namings that add to what is stored: a row that already holds
    -- this name (or a greater one) at this time is not even locked.
    satellite AS (
        INSERT INTO dds.s_product_names AS s
               (h_product_pk, name, hk_product_names_hashdiff, load_dt, load_src)
        SELECT m.h_product_pk, n.name, m.hashdiff, n.load_dt, source
        FROM naming n
        JOIN named m USING (product_id, name)
        WHERE NOT EXISTS (
            SELECT FROM dds.s_product_names p
            WHERE p.h_product_pk = m.h_product_pk AND p.load_dt = n.load_dt
              AND (p.name COLLATE "C", p.load_src COLLATE "C") >= (n.name, source))
        ORDER BY m.h_product_pk, n.load_dt
        ON CONFLICT (h_product_pk, load_dt) DO UPDATE
        SET name = EXCLUDED.name,
            hk_product_names_hashdiff = EXCLUDED.hk_product_names_hashdiff,
            load_src = EXCLUDED.load_src
        WHERE (EXCLUDED.name COLLATE "C", EXCLUDED.load_src COLLATE "C")
              > (s.name COLLATE "C", s.load_src COLLATE "C")
    )
    SELECT array_agg(h_product_pk) INTO renamed
    FROM before
    WHERE cur_name IS NOT NULL AND name <> cur_name
      AND (load_dt > cur_load_dt
           OR (load_dt = cur_load_dt AND name COLLATE "C" > cur_name COLLATE "C"));

    RETURN renamed;
END
$fn$;
COMMENT ON FUNCTION dwh.load_products(text[], text[], timestamp[], text) IS
    'Load dish hubs and namings (one name satellite row per dish and version time); returns the dishes whose current name changed';

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

-- Apply per-key count deltas to the marts.  Rows are written in key order
-- so that concurrent batches never deadlock; when some counts go down, the
-- existing rows are first locked in that order, because an UPDATE does not
-- promise one.  A row lives while its count is positive.  (CHECK constraints
-- are evaluated on the row an INSERT proposes before ON CONFLICT, so
-- decrements cannot go through the upsert.)
CREATE FUNCTION dwh.apply_mart_deltas(product_users uuid[], products uuid[],
                                      product_deltas integer[],
                                      category_users uuid[], categories uuid[],
                                      category_deltas integer[])
    RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    zero_users uuid[];
    zero_keys uuid[];
BEGIN
    IF products IS NOT NULL THEN
        IF EXISTS (SELECT FROM unnest(product_deltas) d WHERE d < 0) THEN
            PERFORM FROM cdm.user_product_counters m
            JOIN unnest(product_users, products) AS k(user_id, product_id)
              ON m.user_id = k.user_id AND m.product_id = k.product_id
            ORDER BY m.user_id, m.product_id
            FOR UPDATE OF m;
        END IF;

        WITH delta AS MATERIALIZED (
            SELECT * FROM unnest(product_users, products, product_deltas)
                     AS d(user_id, product_id, d)
        ),
        name AS MATERIALIZED (
            SELECT p.product_id,
                   (SELECT s.name FROM dds.s_product_names s
                    WHERE s.h_product_pk = p.product_id
                    ORDER BY s.load_dt DESC LIMIT 1) AS name
            FROM (SELECT DISTINCT product_id FROM delta WHERE d > 0) p
        ),
        up AS (
            INSERT INTO cdm.user_product_counters AS m
                   (user_id, product_id, product_name, order_cnt)
            SELECT d.user_id, d.product_id, coalesce(n.name, ''), d.d
            FROM delta d JOIN name n USING (product_id)
            WHERE d.d > 0
            ORDER BY d.user_id, d.product_id
            ON CONFLICT (user_id, product_id) DO UPDATE
            SET order_cnt = m.order_cnt + EXCLUDED.order_cnt
        ),
        down AS (
            UPDATE cdm.user_product_counters m
            SET order_cnt = m.order_cnt + d.d
            FROM delta d
            WHERE d.d < 0 AND m.user_id = d.user_id AND m.product_id = d.product_id
            RETURNING m.user_id, m.product_id, m.order_cnt
        )
        SELECT array_agg(user_id), array_agg(product_id)
        INTO zero_users, zero_keys
        FROM down
        WHERE order_cnt = 0;

        IF zero_keys IS NOT NULL THEN
            DELETE FROM cdm.user_product_counters m
            USING unnest(zero_users, zero_keys) AS z(user_id, product_id)
            WHERE m.user_id = z.user_id AND m.product_id = z.product_id
              AND m.order_cnt = 0;
        END IF;
    END IF;

    IF categories IS NOT NULL THEN
        IF EXISTS (SELECT FROM unnest(category_deltas) d WHERE d < 0) THEN
            PERFORM FROM cdm.user_category_counters m
            JOIN unnest(category_users, categories) AS k(user_id, category_id)
              ON m.user_id = k.user_id AND m.category_id = k.category_id
            ORDER BY m.user_id, m.category_id
            FOR UPDATE OF m;
        END IF;

        WITH delta AS MATERIALIZED (
            SELECT * FROM unnest(category_users, categories, category_deltas)
                     AS d(user_id, category_id, d)
        ),
        up AS (
            INSERT INTO cdm.user_category_counters AS m
                   (user_id, category_id, category_name, order_cnt)
            SELECT d.user_id, d.category_id, h.category_name, d.d
            FROM delta d JOIN dds.h_category h ON h.h_category_pk = d.category_id
            WHERE d.d > 0
            ORDER BY d.user_id, d.category_id
            ON CONFLICT (user_id, category_id) DO UPDATE
            SET order_cnt = m.order_cnt + EXCLUDED.order_cnt
        ),
        down AS (
            UPDATE cdm.user_category_counters m
            SET order_cnt = m.order_cnt + d.d
            FROM delta d
            WHERE d.d < 0 AND m.user_id = d.user_id AND m.category_id = d.category_id
            RETURNING m.user_id, m.category_id, m.order_cnt
        )
        SELECT array_agg(user_id), array_agg(category_id)
        INTO zero_users, zero_keys
        FROM down
        WHERE order_cnt = 0;

        IF zero_keys IS NOT NULL THEN
            DELETE FROM cdm.user_category_counters m
            USING unnest(zero_users, zero_keys) AS z(user_id, category_id)
            WHERE m.user_id = z.user_id AND m.category_id = z.category_id
              AND m.order_cnt = 0;
        END IF;
    END IF;
END
$fn$;
COMMENT ON FUNCTION dwh.apply_mart_deltas(uuid[], uuid[], integer[], uuid[], uuid[], integer[]) IS
    'Add per-key order count deltas to the marts, in key order; rows reaching zero are deleted';
