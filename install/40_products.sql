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

-- Lock order.  Every writer of orders takes its locks in one order, so
-- that two batches wait for each other but never deadlock:
--   1. the dictionary lock, shared (exclusive when the batch renames a dish;
--      menus always take it exclusive);
--   2. the keys that batches share, each table in one sorted pass: dishes
--      and their namings, restaurants, users, (dish, restaurant) pairs;
--   3. the batch's rows of stg.order_events, in object_id order;
--   4. each order's own vault rows (under its stg.order_events row lock);
--   5. the mart rows, in one sorted pass per mart.
-- Step 2 is dwh.claim_order_keys(), run over every version of the batch
-- before step 3 by dwh.ingest_orders (the order triggers run it again over
-- what the statement wrote: already claimed, it changes nothing).  Any
-- other statement that writes orders takes the dictionary lock exclusive
-- before its first row (dwh.stg_statement_lock), then claims in its
-- triggers.

-- Does loading these namings change the current name of some dish, or
-- name a dish for the first time?  Read only, before any lock: the current
-- name only grows (in (time, name) order), so a "no" stays true; batches
-- that hold the lock shared only add namings that keep every name.
CREATE FUNCTION dwh.namings_rename(ids text[], names text[], versions timestamp[])
    RETURNS boolean
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT EXISTS (
        SELECT
        FROM (SELECT DISTINCT ON (n.product_id) n.product_id, n.name, n.load_dt
              FROM unnest(ids, names, versions) AS n(product_id, name, load_dt)
              ORDER BY n.product_id, n.load_dt DESC, n.name COLLATE "C" DESC) n
        LEFT JOIN LATERAL (
            SELECT s.name, s.load_dt
            FROM dds.s_product_names s
            WHERE s.h_product_pk = dwh.hash_key(n.product_id)
            ORDER BY s.load_dt DESC LIMIT 1) cur ON true
        WHERE cur.name IS NULL
           OR (n.name <> cur.name
               AND (n.load_dt > cur.load_dt
                    OR (n.load_dt = cur.load_dt
                        AND n.name COLLATE "C" > cur.name COLLATE "C"))));
$fn$;
COMMENT ON FUNCTION dwh.namings_rename(text[], text[], timestamp[]) IS
    'Internal: would these dish namings change the current name of some dish?';

-- Steps 1 and 2 of the lock order for these order versions: the dictionary
-- lock, dish hubs and namings, restaurant and user hubs, (dish, restaurant)
-- pairs; a rename is carried into the marts at once.  A batch that finds a
-- rename only after taking the lock shared (a concurrent batch changed the
-- names meanwhile) fails with 40001: dwh.ingest_orders retries it with the
-- lock exclusive.
CREATE FUNCTION dwh.claim_order_keys(payloads jsonb[], versions timestamp[],
                                     exclusive boolean DEFAULT false)
    RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    ids text[];
    names text[];
    item_versions timestamp[];
    renamed uuid[];
BEGIN
    IF payloads IS NULL THEN
        RETURN;
    END IF;

    -- Grouping by hashing: a batch names each dish many times.
    SELECT array_agg(n.id), array_agg(n.name), array_agg(n.version)
    INTO ids, names, item_versions
    FROM (SELECT e->>'id' AS id, e->>'name' AS name, v.version
          FROM unnest(payloads, versions) AS v(payload, version),
               jsonb_array_elements(v.payload->'order_items') e
          GROUP BY 1, 2, 3) n;

    IF NOT exclusive THEN
        exclusive := dwh.namings_rename(ids, names, item_versions);
    END IF;
    IF exclusive THEN
        PERFORM pg_advisory_xact_lock(dwh.dictionary_lock_key());
    ELSE
        PERFORM pg_advisory_xact_lock_shared(dwh.dictionary_lock_key());
    END IF;

    renamed := dwh.load_products(ids, names, item_versions, 'stg.order_events');
    IF renamed IS NOT NULL THEN
        IF NOT exclusive THEN
            RAISE EXCEPTION 'dish names changed while the batch was waiting'
                USING ERRCODE = '40001',
                      DETAIL = 'A concurrent transaction renamed a dish that this batch names too.',
                      HINT = 'Retry the statement; dwh.ingest_orders retries by itself.';
        END IF;
        PERFORM dwh.refresh_product_names(renamed);
    END IF;

    WITH version AS MATERIALIZED (
        SELECT v.payload->'restaurant'->>'id' AS restaurant_id,
               v.payload->'user'->>'id' AS user_id,
               v.payload->'order_items' AS items
        FROM unnest(payloads) AS v(payload)
    ),
    restaurant AS MATERIALIZED (
        SELECT restaurant_id, dwh.hash_key(restaurant_id) AS h_restaurant_pk
        FROM version
        GROUP BY 1
    ),
    restaurant_hub AS (
        INSERT INTO dds.h_restaurant (h_restaurant_pk, restaurant_id, load_dt, load_src)
        SELECT h_restaurant_pk, restaurant_id, now(), 'stg.order_events'
        FROM restaurant
        ORDER BY h_restaurant_pk
        ON CONFLICT DO NOTHING
    ),
    user_hub AS (
        INSERT INTO dds.h_user (h_user_pk, user_id, load_dt, load_src)
        SELECT dwh.hash_key(user_id), user_id, now(), 'stg.order_events'
        FROM (SELECT user_id FROM version GROUP BY 1) u
        ORDER BY 1
        ON CONFLICT DO NOTHING
    )
    INSERT INTO dds.l_product_restaurant
           (hk_product_restaurant_pk, h_product_pk, h_restaurant_pk, load_dt, load_src)
    SELECT dwh.hash_key(p.h_product_pk, r.h_restaurant_pk), p.h_product_pk,
           r.h_restaurant_pk, now(), 'stg.order_events'
    FROM (SELECT v.restaurant_id, e->>'id' AS product_id
          FROM version v, jsonb_array_elements(v.items) e
          GROUP BY 1, 2) x
    JOIN restaurant r USING (restaurant_id)
    CROSS JOIN LATERAL (SELECT dwh.hash_key(x.product_id) AS h_product_pk) p
    ORDER BY 1
    ON CONFLICT DO NOTHING;
END
$fn$;
COMMENT ON FUNCTION dwh.claim_order_keys(jsonb[], timestamp[], boolean) IS
    'Internal: take the dictionary lock and load the keys that order batches share (dishes, namings, restaurants, users, dish-restaurant pairs), in the one lock order';

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
