-- Orders: every statement that writes stg.order_events carries its rows on
-- to DDS and the marts.  The mart delta of a batch is (what its orders count
-- now) minus (what they counted before), both computed set-based from the
-- batch and from DDS before it changes; no user is ever recounted whole.

CREATE FUNCTION dwh.order_events_changed() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    renamed uuid[];
    product_users uuid[];
    products uuid[];
    product_deltas integer[];
    category_users uuid[];
    categories uuid[];
    category_deltas integer[];
    known boolean;
BEGIN
    IF NOT EXISTS (SELECT FROM changed) THEN
        RETURN NULL;
    END IF;

    -- Does DDS hold any of these orders already?  Not for new orders (the
    -- usual case), which take a shorter path below.  (A restore replays
    -- orders DDS already holds.)
    known := TG_OP = 'UPDATE' OR EXISTS (
        SELECT FROM changed c JOIN dds.h_order h ON h.order_id = c.object_id);

    -- Dish categories and names stay put until commit.
    PERFORM pg_advisory_xact_lock_shared(dwh.dictionary_lock_key());

    -- Dishes first (hub order is the same in every transaction: dishes,
    -- orders, users, restaurants; keys sorted within each).  Every version
    -- names its dishes at its update_ts.
    SELECT dwh.load_products(array_agg(n.id),
                             array_agg(n.name), array_agg(n.update_ts),
                             'stg.order_events')
    INTO renamed
    -- Grouping by hashing: a batch names each dish many times, and sorting
    -- all its items cost more than the rest of this step.
    FROM (SELECT e->>'id' AS id, e->>'name' AS name, c.update_ts
          FROM changed c, jsonb_array_elements(c.payload->'order_items') e
          GROUP BY 1, 2, 3) n;

    IF NOT known THEN
        -- Orders new to DDS: nothing counted before.  No other transaction
        -- can write their links (it would first conflict on
        -- stg.order_events.object_id), so those are plain INSERTs.
        -- Rows go in hub key order: the random UUID keys then fill index
        -- pages one after the other, and so do the foreign-key checks.
        WITH batch AS MATERIALIZED (
            SELECT c.object_id,
                   dwh.hash_key(c.object_id::text) AS h_order_pk,
                   c.update_ts,
                   (c.payload->>'date')::timestamp AS order_dt,
                   c.payload->>'final_status' AS status,
                   (c.payload->>'cost')::numeric(19, 5) AS cost,
                   (c.payload->>'payment')::numeric(19, 5) AS payment,
                   c.payload->'user'->>'id' AS user_id,
                   dwh.hash_key(c.payload->'user'->>'id') AS h_user_pk,
                   c.payload->'restaurant'->>'id' AS restaurant_id,
                   dwh.hash_key(c.payload->'restaurant'->>'id') AS h_restaurant_pk,
                   c.payload->'order_items' AS items
            FROM changed c
            ORDER BY h_order_pk
        ),
        item AS MATERIALIZED (
            SELECT DISTINCT b.h_order_pk, b.h_product_pk, b.h_user_pk,
                   b.h_restaurant_pk, b.status
            FROM (SELECT b.*, dwh.hash_key(e->>'id') AS h_product_pk
                  FROM batch b, jsonb_array_elements(b.items) e) b
            ORDER BY b.h_order_pk, b.h_product_pk
        ),
        category AS MATERIALIZED (
            SELECT l.h_product_pk, l.h_category_pk
            FROM dds.l_product_category l
            WHERE l.h_product_pk IN (SELECT h_product_pk FROM item)
        ),
        -- (A concurrent writer of the order's history, such as a parallel
        -- restore, may have loaded its hub and satellite rows meanwhile.)
        order_hub AS (
            INSERT INTO dds.h_order AS h (h_order_pk, order_id, order_dt, load_dt, load_src)
            SELECT h_order_pk, object_id, order_dt, now(), 'stg.order_events'
            FROM batch
            ON CONFLICT (h_order_pk) DO UPDATE SET order_dt = EXCLUDED.order_dt
            WHERE h.order_dt IS DISTINCT FROM EXCLUDED.order_dt
        ),
        user_hub AS (
            INSERT INTO dds.h_user (h_user_pk, user_id, load_dt, load_src)
            SELECT DISTINCT h_user_pk, user_id, now(), 'stg.order_events'
            FROM batch
            ORDER BY h_user_pk
            ON CONFLICT DO NOTHING
        ),
        restaurant_hub AS (
            INSERT INTO dds.h_restaurant (h_restaurant_pk, restaurant_id, load_dt, load_src)
            SELECT DISTINCT h_restaurant_pk, restaurant_id, now(), 'stg.order_events'
            FROM batch
            ORDER BY h_restaurant_pk
            ON CONFLICT DO NOTHING
        ),
        order_user_link AS (
            INSERT INTO dds.l_order_user (hk_order_user_pk, h_order_pk, h_user_pk, load_dt, load_src)
            SELECT dwh.hash_key(h_order_pk, h_user_pk), h_order_pk, h_user_pk, now(), 'stg.order_events'
            FROM batch
        ),
        order_product_link AS (
            INSERT INTO dds.l_order_product (hk_order_product_pk, h_order_pk, h_product_pk, load_dt, load_src)
            SELECT dwh.hash_key(h_order_pk, h_product_pk), h_order_pk, h_product_pk, now(), 'stg.order_events'
            FROM item
        ),
        product_restaurant_link AS (
            INSERT INTO dds.l_product_restaurant
                   (hk_product_restaurant_pk, h_product_pk, h_restaurant_pk, load_dt, load_src)
            SELECT dwh.hash_key(h_product_pk, h_restaurant_pk), h_product_pk,
                   h_restaurant_pk, now(), 'stg.order_events'
            FROM (SELECT DISTINCT h_product_pk, h_restaurant_pk FROM item) i
            ORDER BY 1
            ON CONFLICT DO NOTHING
        ),
        status_satellite AS (
            INSERT INTO dds.s_order_status AS s
                   (h_order_pk, status, hk_order_status_hashdiff, load_dt, load_src)
            SELECT h_order_pk, status, dwh.hash_key(h_order_pk::text || status),
                   update_ts, 'stg.order_events'
            FROM batch
            ON CONFLICT (h_order_pk, load_dt) DO UPDATE
            SET status = EXCLUDED.status,
                hk_order_status_hashdiff = EXCLUDED.hk_order_status_hashdiff
            WHERE s.status IS DISTINCT FROM EXCLUDED.status
        ),
        cost_satellite AS (
            INSERT INTO dds.s_order_cost AS s
                   (h_order_pk, cost, payment, hk_order_cost_hashdiff, load_dt, load_src)
            SELECT h_order_pk, cost, payment,
                   dwh.hash_key(h_order_pk::text || cost::text || payment::text),
                   update_ts, 'stg.order_events'
            FROM batch
            ON CONFLICT (h_order_pk, load_dt) DO UPDATE
            SET cost = EXCLUDED.cost, payment = EXCLUDED.payment,
                hk_order_cost_hashdiff = EXCLUDED.hk_order_cost_hashdiff
            WHERE (s.cost, s.payment) IS DISTINCT FROM (EXCLUDED.cost, EXCLUDED.payment)
        ),
        -- In no particular order: dwh.apply_mart_deltas writes in key order.
        product_delta_keys AS (
            SELECT array_agg(h_user_pk) AS users,
                   array_agg(h_product_pk) AS keys,
                   array_agg(d) AS deltas
            FROM (SELECT h_user_pk, h_product_pk, count(*)::integer AS d
                  FROM item WHERE status = 'CLOSED'
                  GROUP BY h_user_pk, h_product_pk) x
        ),
        category_delta_keys AS (
            SELECT array_agg(h_user_pk) AS users,
                   array_agg(h_category_pk) AS keys,
                   array_agg(d) AS deltas
            FROM (SELECT i.h_user_pk, c.h_category_pk,
                         count(DISTINCT i.h_order_pk)::integer AS d
                  FROM item i JOIN category c USING (h_product_pk)
                  WHERE i.status = 'CLOSED'
                  GROUP BY i.h_user_pk, c.h_category_pk) x
        )
        SELECT p.users, p.keys, p.deltas, c.users, c.keys, c.deltas
        INTO product_users, products, product_deltas,
             category_users, categories, category_deltas
        FROM product_delta_keys p, category_delta_keys c;
    ELSE
        WITH batch AS MATERIALIZED (
            SELECT c.object_id,
                   dwh.hash_key(c.object_id::text) AS h_order_pk,
                   c.update_ts,
                   (c.payload->>'date')::timestamp AS order_dt,
                   c.payload->>'final_status' AS status,
                   (c.payload->>'cost')::numeric(19, 5) AS cost,
                   (c.payload->>'payment')::numeric(19, 5) AS payment,
                   c.payload->'user'->>'id' AS user_id,
                   dwh.hash_key(c.payload->'user'->>'id') AS h_user_pk,
                   c.payload->'restaurant'->>'id' AS restaurant_id,
                   dwh.hash_key(c.payload->'restaurant'->>'id') AS h_restaurant_pk,
                   c.payload->'order_items' AS items
            FROM changed c
        ),
        item AS MATERIALIZED (
            SELECT DISTINCT b.h_order_pk, b.h_user_pk, b.h_restaurant_pk, b.status,
                   dwh.hash_key(e->>'id') AS h_product_pk
            FROM batch b, jsonb_array_elements(b.items) e
        ),
        -- What the batch's orders counted before this statement.
        old_user AS MATERIALIZED (
            SELECT l.h_order_pk, l.h_user_pk
            FROM batch b JOIN dds.l_order_user l ON l.h_order_pk = b.h_order_pk
        ),
        old_item AS MATERIALIZED (
            SELECT l.h_order_pk, l.h_product_pk
            FROM batch b JOIN dds.l_order_product l ON l.h_order_pk = b.h_order_pk
        ),
        old_closed AS MATERIALIZED (
            SELECT b.h_order_pk
            FROM batch b
            WHERE (SELECT s.status FROM dds.s_order_status s
                   WHERE s.h_order_pk = b.h_order_pk
                   ORDER BY s.load_dt DESC LIMIT 1) = 'CLOSED'
        ),
        old_counted AS MATERIALIZED (
            SELECT c.h_order_pk, u.h_user_pk, i.h_product_pk
            FROM old_closed c
            JOIN old_user u USING (h_order_pk)
            JOIN old_item i USING (h_order_pk)
        ),
        category AS MATERIALIZED (
            SELECT l.h_product_pk, l.h_category_pk
            FROM dds.l_product_category l
            WHERE l.h_product_pk IN (SELECT h_product_pk FROM item
                                     UNION SELECT h_product_pk FROM old_counted)
        ),
        product_delta AS (
            SELECT h_user_pk, h_product_pk, sum(d)::integer AS d
            FROM (SELECT h_user_pk, h_product_pk, 1 AS d FROM item WHERE status = 'CLOSED'
                  UNION ALL
                  SELECT h_user_pk, h_product_pk, -1 FROM old_counted) x
            GROUP BY h_user_pk, h_product_pk
            HAVING sum(d) <> 0
        ),
        category_delta AS (
            SELECT h_user_pk, h_category_pk, sum(d)::integer AS d
            FROM (SELECT DISTINCT i.h_order_pk, i.h_user_pk, c.h_category_pk, 1 AS d
                  FROM item i JOIN category c USING (h_product_pk)
                  WHERE i.status = 'CLOSED'
                  UNION ALL
                  SELECT DISTINCT o.h_order_pk, o.h_user_pk, c.h_category_pk, -1
                  FROM old_counted o JOIN category c USING (h_product_pk)) x
            GROUP BY h_user_pk, h_category_pk
            HAVING sum(d) <> 0
        ),
        -- Hubs, links and satellites.
        order_hub AS (
            INSERT INTO dds.h_order AS h (h_order_pk, order_id, order_dt, load_dt, load_src)
            SELECT h_order_pk, object_id, order_dt, now(), 'stg.order_events'
            FROM batch
            ORDER BY h_order_pk
            ON CONFLICT (h_order_pk) DO UPDATE SET order_dt = EXCLUDED.order_dt
            WHERE h.order_dt IS DISTINCT FROM EXCLUDED.order_dt
        ),
        user_hub AS (
            INSERT INTO dds.h_user (h_user_pk, user_id, load_dt, load_src)
            SELECT DISTINCT h_user_pk, user_id, now(), 'stg.order_events'
            FROM batch
            ORDER BY h_user_pk
            ON CONFLICT DO NOTHING
        ),
        restaurant_hub AS (
            INSERT INTO dds.h_restaurant (h_restaurant_pk, restaurant_id, load_dt, load_src)
            SELECT DISTINCT h_restaurant_pk, restaurant_id, now(), 'stg.order_events'
            FROM batch
            ORDER BY h_restaurant_pk
            ON CONFLICT DO NOTHING
        ),
        order_user_link AS (
            INSERT INTO dds.l_order_user (hk_order_user_pk, h_order_pk, h_user_pk, load_dt, load_src)
            SELECT dwh.hash_key(h_order_pk, h_user_pk), h_order_pk, h_user_pk, now(), 'stg.order_events'
            FROM batch
            ON CONFLICT DO NOTHING
        ),
        order_product_link AS (
            INSERT INTO dds.l_order_product (hk_order_product_pk, h_order_pk, h_product_pk, load_dt, load_src)
            SELECT dwh.hash_key(h_order_pk, h_product_pk), h_order_pk, h_product_pk, now(), 'stg.order_events'
            FROM item
            ON CONFLICT DO NOTHING
        ),
        product_restaurant_link AS (
            INSERT INTO dds.l_product_restaurant
                   (hk_product_restaurant_pk, h_product_pk, h_restaurant_pk, load_dt, load_src)
            SELECT dwh.hash_key(h_product_pk, h_restaurant_pk), h_product_pk,
                   h_restaurant_pk, now(), 'stg.order_events'
            FROM (SELECT DISTINCT h_product_pk, h_restaurant_pk FROM item) i
            ORDER BY 1
            ON CONFLICT DO NOTHING
        ),
        -- The current version is the greatest of its update_ts: its values
        -- are that time's row, whatever was stored there.
        status_satellite AS (
            INSERT INTO dds.s_order_status AS s
                   (h_order_pk, status, hk_order_status_hashdiff, load_dt, load_src)
            SELECT h_order_pk, status, dwh.hash_key(h_order_pk::text || status),
                   update_ts, 'stg.order_events'
            FROM batch
            ORDER BY h_order_pk
            ON CONFLICT (h_order_pk, load_dt) DO UPDATE
            SET status = EXCLUDED.status,
                hk_order_status_hashdiff = EXCLUDED.hk_order_status_hashdiff
            WHERE s.status IS DISTINCT FROM EXCLUDED.status
        ),
        cost_satellite AS (
            INSERT INTO dds.s_order_cost AS s
                   (h_order_pk, cost, payment, hk_order_cost_hashdiff, load_dt, load_src)
            SELECT h_order_pk, cost, payment,
                   dwh.hash_key(h_order_pk::text || cost::text || payment::text),
                   update_ts, 'stg.order_events'
            FROM batch
            ORDER BY h_order_pk
            ON CONFLICT (h_order_pk, load_dt) DO UPDATE
            SET cost = EXCLUDED.cost, payment = EXCLUDED.payment,
                hk_order_cost_hashdiff = EXCLUDED.hk_order_cost_hashdiff
            WHERE (s.cost, s.payment) IS DISTINCT FROM (EXCLUDED.cost, EXCLUDED.payment)
        ),
        -- In no particular order: dwh.apply_mart_deltas writes in key order.
        product_delta_keys AS (
            SELECT array_agg(h_user_pk) AS users,
                   array_agg(h_product_pk) AS keys,
                   array_agg(d) AS deltas
            FROM product_delta
        ),
        category_delta_keys AS (
            SELECT array_agg(h_user_pk) AS users,
                   array_agg(h_category_pk) AS keys,
                   array_agg(d) AS deltas
            FROM category_delta
        )
        SELECT p.users, p.keys, p.deltas, c.users, c.keys, c.deltas
        INTO product_users, products, product_deltas,
             category_users, categories, category_deltas
        FROM product_delta_keys p, category_delta_keys c;
    END IF;

    IF TG_OP = 'UPDATE' THEN
        -- Links of the previous version that the new one no longer holds.
        WITH batch AS MATERIALIZED (
            SELECT dwh.hash_key(c.object_id::text) AS h_order_pk,
                   dwh.hash_key(c.payload->'user'->>'id') AS h_user_pk,
                   c.payload->'order_items' AS items
            FROM changed c
        ),
        stale_products AS (
            DELETE FROM dds.l_order_product l
            USING batch b
            WHERE l.h_order_pk = b.h_order_pk
              AND NOT EXISTS (SELECT FROM jsonb_array_elements(b.items) e
                              WHERE dwh.hash_key(e->>'id') = l.h_product_pk)
        )
        DELETE FROM dds.l_order_user l
        USING batch b
        WHERE l.h_order_pk = b.h_order_pk AND l.h_user_pk <> b.h_user_pk;

        -- The replaced versions are superseded: into the history (whose
        -- trigger finds everything they brought already in DDS).
        INSERT INTO stg.order_event_history AS h (object_id, update_ts, payload, sent_dttm)
        SELECT o.object_id, o.update_ts, o.payload, o.sent_dttm
        FROM superseded o JOIN changed c USING (object_id)
        WHERE o.payload IS DISTINCT FROM c.payload OR o.update_ts IS DISTINCT FROM c.update_ts
        ORDER BY o.object_id
        ON CONFLICT (object_id, update_ts, payload_md5) DO UPDATE
        SET sent_dttm = EXCLUDED.sent_dttm
        WHERE EXCLUDED.sent_dttm > h.sent_dttm;
    END IF;

    -- The marts, after DDS: new mart rows take the dish names loaded above.
    -- (Within an ingest, deferred to the end of its upsert: one sorted pass.)
    IF NOT dwh.defer_mart_deltas(product_users, products, product_deltas,
                                 category_users, categories, category_deltas) THEN
        PERFORM dwh.apply_mart_deltas(product_users, products, product_deltas,
                                      category_users, categories, category_deltas);
    END IF;

    IF renamed IS NOT NULL THEN
        -- A rename touches mart rows that other batches may be writing.
        PERFORM pg_advisory_xact_lock(dwh.dictionary_lock_key());
        PERFORM dwh.refresh_product_names(renamed);
    END IF;

    RETURN NULL;
END
$fn$;
COMMENT ON FUNCTION dwh.order_events_changed() IS
    'AFTER INSERT/UPDATE statement trigger of stg.order_events: carries changed orders into DDS and the marts';

CREATE TRIGGER order_events_inserted
    AFTER INSERT ON stg.order_events
    REFERENCING NEW TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION dwh.order_events_changed();

CREATE TRIGGER order_events_updated
    AFTER UPDATE ON stg.order_events
    REFERENCING OLD TABLE AS superseded NEW TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION dwh.order_events_changed();

-- DDS is derived from the latest version of every order held here: deleting
-- one would let an older version replace it.
CREATE FUNCTION dwh.order_events_refuse_delete() RETURNS trigger
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    RAISE EXCEPTION 'rows of stg.order_events cannot be deleted'
        USING ERRCODE = '55000',
              DETAIL = 'stg.order_events holds the latest version of every order; DDS and the marts are derived from it.',
              HINT = 'To take an order out of the counts, load a newer version of it with another final_status.';
END
$fn$;
COMMENT ON FUNCTION dwh.order_events_refuse_delete() IS
    'Refuses DELETE and TRUNCATE on stg.order_events';

CREATE TRIGGER order_events_no_delete
    BEFORE DELETE OR TRUNCATE ON stg.order_events
    FOR EACH STATEMENT EXECUTE FUNCTION dwh.order_events_refuse_delete();

-- Superseded versions of orders (stg.order_event_history): they name
-- dishes, pair dishes with restaurants, bring hubs, and give the status and
-- cost rows of their update_ts when they are the greatest version of that
-- time.  An order's links and counts follow its current version only.
CREATE FUNCTION dwh.order_event_history_added() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    renamed uuid[];
    loaded integer;
BEGIN
    IF NOT EXISTS (SELECT FROM added) THEN
        RETURN NULL;
    END IF;

    PERFORM pg_advisory_xact_lock_shared(dwh.dictionary_lock_key());

    SELECT dwh.load_products(array_agg(n.id),
                             array_agg(n.name), array_agg(n.update_ts),
                             'stg.order_events')
    INTO renamed
    FROM (SELECT e->>'id' AS id, e->>'name' AS name, a.update_ts
          FROM added a, jsonb_array_elements(a.payload->'order_items') e
          GROUP BY 1, 2, 3) n;

    WITH version AS MATERIALIZED (
        SELECT a.object_id, dwh.hash_key(a.object_id::text) AS h_order_pk,
               a.update_ts, (a.payload->>'date')::timestamp AS order_dt,
               a.payload->'user'->>'id' AS user_id,
               a.payload->'restaurant'->>'id' AS restaurant_id,
               a.payload->'order_items' AS items
        FROM added a
    ),
    -- The greatest version of each (order, update_ts) touched; none where
    -- the current version has that time, since it is the greatest of all.
    winner AS MATERIALIZED (
        SELECT DISTINCT ON (h.object_id, h.update_ts)
               dwh.hash_key(h.object_id::text) AS h_order_pk, h.update_ts,
               h.payload->>'final_status' AS status,
               (h.payload->>'cost')::numeric(19, 5) AS cost,
               (h.payload->>'payment')::numeric(19, 5) AS payment
        FROM stg.order_event_history h
        JOIN (SELECT DISTINCT object_id, update_ts FROM added) a
          USING (object_id, update_ts)
        WHERE NOT EXISTS (SELECT FROM stg.order_events c
                          WHERE c.object_id = h.object_id AND c.update_ts = h.update_ts)
        ORDER BY h.object_id, h.update_ts, h.payload::text COLLATE "C" DESC
    ),
    -- order_dt is the current version's: set here only for an order whose
    -- current version is not loaded yet (a restore), then by it.
    order_hub AS (
        INSERT INTO dds.h_order (h_order_pk, order_id, order_dt, load_dt, load_src)
        SELECT DISTINCT ON (h_order_pk) h_order_pk, object_id, order_dt, now(),
               'stg.order_events'
        FROM version
        ORDER BY h_order_pk, update_ts DESC
        ON CONFLICT DO NOTHING
    ),
    user_hub AS (
        INSERT INTO dds.h_user (h_user_pk, user_id, load_dt, load_src)
        SELECT DISTINCT dwh.hash_key(user_id), user_id, now(), 'stg.order_events'
        FROM version
        ORDER BY 1
        ON CONFLICT DO NOTHING
    ),
    restaurant_hub AS (
        INSERT INTO dds.h_restaurant (h_restaurant_pk, restaurant_id, load_dt, load_src)
        SELECT DISTINCT dwh.hash_key(restaurant_id), restaurant_id, now(), 'stg.order_events'
        FROM version
        ORDER BY 1
        ON CONFLICT DO NOTHING
    ),
    product_restaurant_link AS (
        INSERT INTO dds.l_product_restaurant
               (hk_product_restaurant_pk, h_product_pk, h_restaurant_pk, load_dt, load_src)
        SELECT DISTINCT dwh.hash_key(p, r), p, r, now(), 'stg.order_events'
        FROM (SELECT dwh.hash_key(e->>'id') AS p, dwh.hash_key(v.restaurant_id) AS r
              FROM version v, jsonb_array_elements(v.items) e) x
        ORDER BY 1
        ON CONFLICT DO NOTHING
    ),
    status_satellite AS (
        INSERT INTO dds.s_order_status AS s
               (h_order_pk, status, hk_order_status_hashdiff, load_dt, load_src)
        SELECT h_order_pk, status, dwh.hash_key(h_order_pk::text || status),
               update_ts, 'stg.order_events'
        FROM winner
        ORDER BY h_order_pk, update_ts
        ON CONFLICT (h_order_pk, load_dt) DO UPDATE
        SET status = EXCLUDED.status,
            hk_order_status_hashdiff = EXCLUDED.hk_order_status_hashdiff
        WHERE s.status IS DISTINCT FROM EXCLUDED.status
    ),
    cost_satellite AS (
        INSERT INTO dds.s_order_cost AS s
               (h_order_pk, cost, payment, hk_order_cost_hashdiff, load_dt, load_src)
        SELECT h_order_pk, cost, payment,
               dwh.hash_key(h_order_pk::text || cost::text || payment::text),
               update_ts, 'stg.order_events'
        FROM winner
        ORDER BY h_order_pk, update_ts
        ON CONFLICT (h_order_pk, load_dt) DO UPDATE
        SET cost = EXCLUDED.cost, payment = EXCLUDED.payment,
            hk_order_cost_hashdiff = EXCLUDED.hk_order_cost_hashdiff
        WHERE (s.cost, s.payment) IS DISTINCT FROM (EXCLUDED.cost, EXCLUDED.payment)
    )
    SELECT count(*) INTO loaded FROM winner;

    IF renamed IS NOT NULL THEN
        PERFORM pg_advisory_xact_lock(dwh.dictionary_lock_key());
        PERFORM dwh.refresh_product_names(renamed);
    END IF;

    RETURN NULL;
END
$fn$;
COMMENT ON FUNCTION dwh.order_event_history_added() IS
    'AFTER INSERT statement trigger of stg.order_event_history: carries superseded order versions into DDS';

CREATE TRIGGER order_event_history_added
    AFTER INSERT ON stg.order_event_history
    REFERENCING NEW TABLE AS added
    FOR EACH STATEMENT EXECUTE FUNCTION dwh.order_event_history_added();
