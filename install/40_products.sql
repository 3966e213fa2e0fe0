-- Dishes are named by menus and by orders (docs/data-rule.md).  The name
-- satellite keeps one row per dish and time at which a menu version names
-- it, with the greatest name (byte-wise) named then, and one order naming
-- row for the dishes that orders name.  Orders name dishes in every batch:
-- one row per order item would cost a row per item, and a row at the
-- newest naming would move at every batch (a key update, never in place),
-- so the order naming row sits where the newest naming does not move it:
-- at the dish's first order naming, or at its newest menu naming when the
-- newest order naming is not older (the first naming after the newest menu
-- would have to be searched for).  It holds the name of the newest order
-- naming, or the greatest of it and the menus' of the row's time when they
-- are of the same time; where a menu names the dish at the row's time, the
-- order naming row takes that menu row's place.  A dish's current name is
-- its newest row's, which is the newest naming's in (time, name) order.
-- dds.product_namings keeps what decides the place.

-- Where the order naming row of a dish belongs, from its first and newest
-- order naming and its newest menu naming (null: it has none).
CREATE FUNCTION dwh.order_naming_time(first_order timestamp, last_order timestamp,
                                      last_menu timestamp)
    RETURNS timestamp
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $fn$
    SELECT CASE WHEN last_menu IS NULL OR last_order OPERATOR(pg_catalog.>=) last_menu
                THEN greatest(first_order, last_menu)
                ELSE first_order END
$fn$;
COMMENT ON FUNCTION dwh.order_naming_time(timestamp, timestamp, timestamp) IS
    'Internal: the time of a dish''s order naming row, from its first and newest order naming and its newest menu naming';

-- The name of each dish's newest row: its current name.
CREATE FUNCTION dwh.current_product_names(products uuid[])
    RETURNS TABLE (h_product_pk uuid, name varchar)
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT p.k, (SELECT s.name FROM dds.s_product_names s
                 WHERE s.h_product_pk = p.k
                 ORDER BY s.load_dt DESC LIMIT 1)
    FROM unnest(products) AS p(k)
$fn$;
COMMENT ON FUNCTION dwh.current_product_names(uuid[]) IS
    'Internal: the current name of each of these dishes (its newest name satellite row), null if it has none';

-- Of these dishes, those whose current name is no longer the one read
-- before (before_names, in the same order).  Each dish's current name is
-- read once: a dish given n times would otherwise join n times n rows.
CREATE FUNCTION dwh.products_renamed(products uuid[], before_names varchar[])
    RETURNS uuid[]
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT array_agg(c.h_product_pk)
    FROM dwh.current_product_names(ARRAY(SELECT DISTINCT unnest(products))) c
    JOIN unnest(products, before_names) AS b(h_product_pk, name) USING (h_product_pk)
    WHERE c.name IS DISTINCT FROM b.name
$fn$;
COMMENT ON FUNCTION dwh.products_renamed(uuid[], varchar[]) IS
    'Internal: of these dishes, those whose current name differs from the names read before';

-- The greatest name that menus give a dish at a time, if any; the menu
-- versions of that time are found by index.
CREATE FUNCTION dwh.menu_name_at(product_id text, version timestamp)
    RETURNS text
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT max(e->>'name' COLLATE "C")
    FROM (SELECT payload FROM stg.restaurants
          WHERE update_ts = version
             OR (update_ts IS NULL AND version = '-infinity')
          UNION ALL
          SELECT payload FROM stg.restaurant_history
          WHERE update_ts = version
             OR (update_ts IS NULL AND version = '-infinity')) r,
         jsonb_array_elements(r.payload->'menu') e
    WHERE e->>'_id' = product_id;
$fn$;
COMMENT ON FUNCTION dwh.menu_name_at(text, timestamp) IS
    'Internal: the greatest name that menu versions of this time give the dish, or null';

-- Put the order naming row of each of these dishes where
-- dds.product_namings says it belongs, with the name it must hold.  The
-- place it leaves goes back to the menu naming of that time, if any.  The
-- caller holds the dishes' rows of dds.product_namings, or the dictionary
-- lock exclusive.  Returns the dishes whose current name changed.
CREATE FUNCTION dwh.place_order_namings(products uuid[])
    RETURNS uuid[]
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    sorted uuid[];
    before varchar[];
    keys uuid[];
    times timestamp[];
    names varchar[];
BEGIN
    SELECT array_agg(c.h_product_pk ORDER BY c.h_product_pk),
           array_agg(c.name ORDER BY c.h_product_pk)
    INTO sorted, before
    FROM dwh.current_product_names(ARRAY(SELECT DISTINCT unnest(products))) c;

    SELECT array_agg(p.h_product_pk ORDER BY p.h_product_pk),
           array_agg(w.load_dt ORDER BY p.h_product_pk),
           array_agg(CASE WHEN p.last_order_dt > w.load_dt THEN p.last_order_name
                          ELSE greatest(p.last_order_name COLLATE "C",
                                        dwh.menu_name_at(h.product_id, w.load_dt) COLLATE "C")
                     END ORDER BY p.h_product_pk)
    INTO keys, times, names
    FROM dds.product_namings p
    JOIN dds.h_product h USING (h_product_pk)
    CROSS JOIN LATERAL (
        SELECT dwh.order_naming_time(p.first_order_dt, p.last_order_dt,
                                     p.last_menu_dt) AS load_dt) w
    WHERE p.h_product_pk = ANY (sorted) AND p.first_order_dt IS NOT NULL;

    -- The places left: the menu naming of that time, or nothing.
    WITH leaving AS MATERIALIZED (
        SELECT s.h_product_pk, s.load_dt,
               dwh.menu_name_at(h.product_id, s.load_dt) AS menu_name
        FROM dds.s_product_names s
        JOIN dds.h_product h USING (h_product_pk)
        -- The time above, looked up by key: a join with the arrays would be
        -- a nested loop in a generic plan, quadratic in the dishes.
        LEFT JOIN dds.product_namings p
               ON p.h_product_pk = s.h_product_pk AND p.first_order_dt IS NOT NULL
        WHERE s.h_product_pk = ANY (sorted) AND s.load_src = 'stg.order_events'
          AND s.load_dt IS DISTINCT FROM
              dwh.order_naming_time(p.first_order_dt, p.last_order_dt, p.last_menu_dt)
    ),
    kept AS (
        UPDATE dds.s_product_names s
        SET name = l.menu_name,
            hk_product_names_hashdiff = dwh.hash_key(s.h_product_pk::text || l.menu_name),
            load_src = 'stg.restaurants'
        FROM leaving l
        WHERE s.h_product_pk = l.h_product_pk AND s.load_dt = l.load_dt
          AND l.menu_name IS NOT NULL
    )
    DELETE FROM dds.s_product_names s
    USING leaving l
    WHERE s.h_product_pk = l.h_product_pk AND s.load_dt = l.load_dt
      AND l.menu_name IS NULL;

    INSERT INTO dds.s_product_names AS s
           (h_product_pk, name, hk_product_names_hashdiff, load_dt, load_src)
    SELECT w.h_product_pk, w.name, dwh.hash_key(w.h_product_pk::text || w.name),
           w.load_dt, 'stg.order_events'
    FROM unnest(keys, names, times) AS w(h_product_pk, name, load_dt)
    ORDER BY 1
    ON CONFLICT (h_product_pk, load_dt) DO UPDATE
    SET name = EXCLUDED.name,
        hk_product_names_hashdiff = EXCLUDED.hk_product_names_hashdiff,
        load_src = EXCLUDED.load_src
    WHERE s.name IS DISTINCT FROM EXCLUDED.name
       OR s.load_src IS DISTINCT FROM EXCLUDED.load_src;

    RETURN dwh.products_renamed(sorted, before);
END
$fn$;
COMMENT ON FUNCTION dwh.place_order_namings(uuid[]) IS
    'Internal: move the order naming row of these dishes where dds.product_namings places it; returns the dishes whose current name changed';

-- Menu namings: dish hubs and one satellite row per dish and menu time
-- (a time where the dish's order naming row is stays that row), then the
-- order naming rows that the newest menu naming moves.  Returns the
-- dishes whose current name changed.
CREATE FUNCTION dwh.load_menu_namings(ids text[], names text[], versions timestamp[])
    RETURNS uuid[]
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    dishes uuid[];
    before varchar[];
    placed uuid[];
BEGIN
    WITH naming AS MATERIALIZED (
        SELECT DISTINCT ON (n.product_id, n.load_dt)
               dwh.hash_key(n.product_id) AS h_product_pk, n.product_id, n.name, n.load_dt
        FROM unnest(ids, names, versions) AS n(product_id, name, load_dt)
        ORDER BY n.product_id, n.load_dt, n.name COLLATE "C" DESC
    ),
    hub AS (
        INSERT INTO dds.h_product (h_product_pk, product_id, load_dt, load_src)
        SELECT DISTINCT h_product_pk, product_id, now() AT TIME ZONE 'UTC', 'stg.restaurants'
        FROM naming
        ORDER BY 1
        ON CONFLICT DO NOTHING
    ),
    before AS MATERIALIZED (
        SELECT c.h_product_pk, c.name
        FROM dwh.current_product_names(ARRAY(SELECT DISTINCT h_product_pk FROM naming)) c
    ),
    satellite AS (
        INSERT INTO dds.s_product_names AS s
               (h_product_pk, name, hk_product_names_hashdiff, load_dt, load_src)
        SELECT h_product_pk, name, dwh.hash_key(h_product_pk::text || name), load_dt,
               'stg.restaurants'
        FROM naming
        ORDER BY h_product_pk, load_dt
        ON CONFLICT (h_product_pk, load_dt) DO UPDATE
        SET name = EXCLUDED.name,
            hk_product_names_hashdiff = EXCLUDED.hk_product_names_hashdiff
        WHERE EXCLUDED.name COLLATE "C" > s.name COLLATE "C"
          AND s.load_src = 'stg.restaurants'
    )
    SELECT array_agg(h_product_pk ORDER BY h_product_pk),
           array_agg(name ORDER BY h_product_pk)
    INTO dishes, before
    FROM before;

    UPDATE dds.product_namings p
    SET last_menu_dt = n.load_dt
    FROM (SELECT dwh.hash_key(m.product_id) AS h_product_pk, max(m.load_dt) AS load_dt
          FROM unnest(ids, versions) AS m(product_id, load_dt)
          GROUP BY 1) n
    WHERE p.h_product_pk = n.h_product_pk
      AND (p.last_menu_dt IS NULL OR n.load_dt > p.last_menu_dt);

    -- Every dish of these menus that orders name: a menu naming at the
    -- time of its order naming row may change the name that row holds.
    SELECT array_agg(p.h_product_pk) INTO placed
    FROM dds.product_namings p
    WHERE p.h_product_pk = ANY (dishes) AND p.first_order_dt IS NOT NULL;
    IF placed IS NOT NULL THEN
        PERFORM dwh.place_order_namings(placed);
    END IF;

    RETURN dwh.products_renamed(dishes, before);
END
$fn$;
COMMENT ON FUNCTION dwh.load_menu_namings(text[], text[], timestamp[]) IS
    'Internal: load dish hubs and the name satellite rows of menu namings; returns the dishes whose current name changed';

-- Step 6 of the lock order, after the marts: the dishes' rows of
-- dds.product_namings, locked in key order, take the batch's first and
-- newest naming of each dish.  Most batches move only the newest order
-- naming there, which leaves the order naming row where it is; a batch
-- that moves it (the first naming by orders, an older first one, a new
-- name) places it.  Under a shared dictionary lock no current name
-- changes (see dwh.claim_order_keys); under an exclusive one the marts
-- follow.
CREATE FUNCTION dwh.load_order_namings(product_ids text[], product_names text[],
                                       name_versions timestamp[],
                                       first_versions timestamp[])
    RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    moved uuid[];
    renamed uuid[];
BEGIN
    IF product_ids IS NULL THEN
        RETURN;
    END IF;

    WITH naming AS MATERIALIZED (
        SELECT dwh.hash_key(n.id) AS h_product_pk, n.name, n.version, n.first
        FROM unnest(product_ids, product_names, name_versions, first_versions)
             AS n(id, name, version, first)
    ),
    locked AS MATERIALIZED (
        SELECT p.h_product_pk, p.first_order_dt, p.last_order_dt, p.last_order_name,
               p.last_menu_dt
        FROM dds.product_namings p
        WHERE p.h_product_pk IN (SELECT h_product_pk FROM naming)
        ORDER BY p.h_product_pk
        FOR NO KEY UPDATE
    ),
    change AS MATERIALIZED (
        SELECT l.*, least(l.first_order_dt, n.first) AS first,
               CASE WHEN x.newer THEN n.version ELSE l.last_order_dt END AS last,
               CASE WHEN x.newer THEN n.name ELSE l.last_order_name END AS name
        FROM locked l
        JOIN naming n USING (h_product_pk)
        CROSS JOIN LATERAL (
            SELECT l.last_order_dt IS NULL
                   OR n.version > l.last_order_dt
                   OR (n.version = l.last_order_dt
                       AND n.name COLLATE "C" > l.last_order_name COLLATE "C") AS newer) x
        WHERE x.newer OR n.first < l.first_order_dt
    ),
    written AS (
        UPDATE dds.product_namings p
        SET first_order_dt = c.first, last_order_dt = c.last, last_order_name = c.name
        FROM change c
        WHERE p.h_product_pk = c.h_product_pk
    )
    SELECT array_agg(c.h_product_pk) INTO moved
    FROM change c
    CROSS JOIN LATERAL (
        SELECT dwh.order_naming_time(c.first_order_dt, c.last_order_dt, c.last_menu_dt) AS was,
               dwh.order_naming_time(c.first, c.last, c.last_menu_dt) AS now) t
    WHERE t.was IS DISTINCT FROM t.now
       OR c.last_order_name IS DISTINCT FROM c.name
       OR (c.last_order_dt = t.was) IS DISTINCT FROM (c.last = t.now);

    IF moved IS NULL THEN
        RETURN;
    END IF;
    renamed := dwh.place_order_namings(moved);
    IF renamed IS NOT NULL THEN
        IF NOT dwh.dictionary_lock_exclusive() THEN
            RAISE EXCEPTION 'dish names changed while the batch held the dictionary lock shared'
                USING ERRCODE = '40001',
                      HINT = 'Retry the statement.';
        END IF;
        PERFORM dwh.refresh_product_names(renamed);
    END IF;
END
$fn$;
COMMENT ON FUNCTION dwh.load_order_namings(text[], text[], timestamp[], timestamp[]) IS
    'Internal: take the first and newest order naming of each dish into dds.product_namings, and move its order naming row where that places it';

-- Mart rows carry the dish name: follow a rename on every row of the dish.
CREATE FUNCTION dwh.refresh_product_names(products uuid[]) RETURNS void
    LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $fn$
    UPDATE cdm.user_product_counters m
    SET product_name = n.name
    FROM dwh.current_product_names(products) n
    WHERE m.product_id = n.h_product_pk
      AND m.product_name IS DISTINCT FROM n.name;
$fn$;
COMMENT ON FUNCTION dwh.refresh_product_names(uuid[]) IS
    'Internal: set product_name of every mart row of these dishes to their current name';

-- Lock order.  Every writer of orders takes its locks in one order, so
-- that two batches wait for each other but never deadlock:
--   1. the dictionary lock, shared (exclusive when the batch renames a dish
--      or names one for the first time; menus always take it exclusive);
--   2. the keys that batches share, each table in one sorted pass: dish
--      hubs and the dishes' rows of dds.product_namings, restaurant and
--      user hubs, (dish, restaurant) pairs;
--   3. the batch's rows of stg.order_events, in object_id order, then the
--      tag lock (dwh.tag_lock_key(), shared; rule changes,
--      dwh.expire_tags() and dwh.rebuild() take it exclusive), which the
--      order triggers take before they read DDS, so that no tag window
--      moves while a batch counts its orders in it (a menu change takes
--      it after the dictionary lock, for the same reason);
--   4. each order's own vault rows (under its stg.order_events row lock);
--   5. the mart rows, in one sorted pass per mart: dishes, categories,
--      then the users' order counts, whose rows stand for the users (each
--      batch that changes an order of a user locks the user's row there,
--      when it has one and some tag rule exists), and the users' windowed
--      counts and tag rows;
--   6. the rows of dds.product_namings of the dishes the batch names, in
--      key order, which stand for their order naming rows of
--      dds.s_product_names, held only from here to commit.
-- Steps 1 and 2 are dwh.claim_order_keys(), step 6 dwh.load_order_namings(),
-- both run over every version of the batch by dwh.ingest_orders (the
-- order triggers run them over what their statement wrote when no ingest
-- did, a chunk at a time under the dictionary lock held exclusive:
-- install/50_orders.sql).  Any other statement that writes orders takes
-- the dictionary lock and the user lock exclusive before its first row
-- (dwh.stg_statement_lock).

-- Does loading these namings change the current name of some dish, or
-- name a dish for the first time?  Asked under the dictionary lock held
-- shared: the current name only grows (in (time, name) order), so a "no"
-- stays true while batches that hold the lock shared only add namings that
-- keep every name.
-- In C (src/dwh_order_keys.c): a lookup of each dish's newest row in the
-- primary key, which no plan made on a small table turns into a scan.
CREATE FUNCTION dwh.namings_rename(ids text[], names text[], versions timestamp[])
    RETURNS boolean
    AS 'MODULE_PATHNAME', 'dwh_namings_rename'
    LANGUAGE C STABLE;
COMMENT ON FUNCTION dwh.namings_rename(text[], text[], timestamp[]) IS
    'Internal: would these dish namings change the current name of some dish?';

-- The batch's newest naming of each dish, and the shared keys that DDS
-- lacks: walks of the payloads and lookups by primary key, in C
-- (src/dwh_order_keys.c).
CREATE FUNCTION dwh.order_namings(payloads jsonb[], versions timestamp[],
                                  OUT ids text[], OUT names text[],
                                  OUT item_versions timestamp[],
                                  OUT first_versions timestamp[])
    AS 'MODULE_PATHNAME', 'dwh_order_namings'
    LANGUAGE C STRICT IMMUTABLE;
COMMENT ON FUNCTION dwh.order_namings(jsonb[], timestamp[]) IS
    'Internal: the newest naming (version, then greatest name) and the oldest version of each dish among the items of these order versions';

CREATE FUNCTION dwh.order_keys_missing(payloads jsonb[],
                                       OUT products text[], OUT restaurants text[],
                                       OUT users text[], OUT pair_restaurants text[],
                                       OUT pair_products text[], OUT namings text[])
    AS 'MODULE_PATHNAME', 'dwh_order_keys_missing'
    LANGUAGE C STRICT VOLATILE;
COMMENT ON FUNCTION dwh.order_keys_missing(jsonb[]) IS
    'Internal: the dishes, restaurants, users and (restaurant, dish) pairs of these orders that DDS has no hub or link for yet, and the dishes without a row in dds.product_namings';

-- Steps 1 and 2 of the lock order for these order versions: the dictionary
-- lock, then dish, restaurant and user hubs and (dish, restaurant) pairs.
-- The namings come at step 6 (dwh.load_order_namings).  The lock is taken
-- shared unless the caller asks for it exclusive; a batch that finds under
-- the shared lock that it renames a dish (or names one first, or a
-- concurrent batch renamed one meanwhile) fails with 40001: dwh.ingest_orders
-- rolls the claim back and claims again with the lock exclusive.  Only the
-- keys that DDS lacks are written: once a key exists, its upsert would
-- insert nothing and wait for no one.
CREATE FUNCTION dwh.claim_order_keys(payloads jsonb[], versions timestamp[],
                                     exclusive boolean DEFAULT false,
                                     OUT ids text[], OUT names text[],
                                     OUT item_versions timestamp[],
                                     OUT first_versions timestamp[])
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    named record;
    missing record;
BEGIN
    IF payloads IS NULL THEN
        RETURN;
    END IF;

    -- The batch's newest naming of each dish (what step 6 needs too).
    named := dwh.order_namings(payloads, versions);
    ids := named.ids;
    names := named.names;
    item_versions := named.item_versions;
    first_versions := named.first_versions;

    IF exclusive THEN
        PERFORM dwh.xact_lock(dwh.dictionary_lock_key(), true);
    ELSE
        PERFORM dwh.xact_lock(dwh.dictionary_lock_key(), false);
        IF dwh.namings_rename(ids, names, item_versions) THEN
            RAISE EXCEPTION 'the batch renames a dish under the dictionary lock held shared'
                USING ERRCODE = '40001',
                      DETAIL = 'A batch that renames a dish, or names one first, holds the lock exclusive.',
                      HINT = 'Retry the statement with the lock exclusive; dwh.ingest_orders does so by itself.';
        END IF;
    END IF;

    -- A key that a transaction in progress inserted counts as missing: its
    -- upsert below waits for that transaction.
    missing := dwh.order_keys_missing(payloads);

    IF missing.products IS NOT NULL THEN
        INSERT INTO dds.h_product (h_product_pk, product_id, load_dt, load_src)
        SELECT dwh.hash_key(id), id, now() AT TIME ZONE 'UTC', 'stg.order_events'
        FROM unnest(missing.products) AS i(id)
        ORDER BY 1
        ON CONFLICT DO NOTHING;
    END IF;

    -- A dish's row of dds.product_namings, empty until step 6 fills it;
    -- its newest menu naming is its newest name row (no order naming row
    -- is there before this one).
    IF missing.namings IS NOT NULL THEN
        INSERT INTO dds.product_namings (h_product_pk, last_menu_dt)
        SELECT k.h_product_pk,
               (SELECT max(s.load_dt) FROM dds.s_product_names s
                WHERE s.h_product_pk = k.h_product_pk)
        FROM unnest(missing.namings) AS i(id)
        CROSS JOIN LATERAL (SELECT dwh.hash_key(i.id) AS h_product_pk) k
        ORDER BY 1
        ON CONFLICT DO NOTHING;
    END IF;

    -- One statement each, in the lock order (data-modifying CTEs would run
    -- after the statement's own insert, in an order PostgreSQL does not
    -- promise).
    IF missing.restaurants IS NOT NULL THEN
        INSERT INTO dds.h_restaurant (h_restaurant_pk, restaurant_id, load_dt, load_src)
        SELECT dwh.hash_key(restaurant_id), restaurant_id, now() AT TIME ZONE 'UTC', 'stg.order_events'
        FROM unnest(missing.restaurants) AS r(restaurant_id)
        ORDER BY 1
        ON CONFLICT DO NOTHING;
    END IF;
    IF missing.users IS NOT NULL THEN
        INSERT INTO dds.h_user (h_user_pk, user_id, load_dt, load_src)
        SELECT dwh.hash_key(user_id), user_id, now() AT TIME ZONE 'UTC', 'stg.order_events'
        FROM unnest(missing.users) AS u(user_id)
        ORDER BY 1
        ON CONFLICT DO NOTHING;
    END IF;
    IF missing.pair_products IS NOT NULL THEN
        INSERT INTO dds.l_product_restaurant
               (hk_product_restaurant_pk, h_product_pk, h_restaurant_pk, load_dt, load_src)
        SELECT dwh.hash_key(p.h_product_pk, r.h_restaurant_pk), p.h_product_pk,
               r.h_restaurant_pk, now() AT TIME ZONE 'UTC', 'stg.order_events'
        FROM unnest(missing.pair_restaurants, missing.pair_products)
             AS x(restaurant_id, product_id)
        CROSS JOIN LATERAL (SELECT dwh.hash_key(x.product_id) AS h_product_pk) p
        CROSS JOIN LATERAL (SELECT dwh.hash_key(x.restaurant_id) AS h_restaurant_pk) r
        ORDER BY 1
        ON CONFLICT DO NOTHING;
    END IF;
END
$fn$;
COMMENT ON FUNCTION dwh.claim_order_keys(jsonb[], timestamp[], boolean) IS
    'Internal: take the dictionary lock and load the keys that order batches share (dishes, restaurants, users, dish-restaurant pairs), in the one lock order; returns the batch''s newest naming and oldest version of each dish';

-- Apply per-key count deltas to the marts.  Each mart's rows are locked in
-- one pass in key order, new rows included, so that concurrent batches
-- never deadlock: an upsert adds the counts that go up and locks the rows
-- whose counts go down (ON CONFLICT DO UPDATE locks a row even where its
-- WHERE says not to update it), which an UPDATE then takes down.  (CHECK
-- constraints are evaluated on the row an INSERT proposes before ON
-- CONFLICT, so decrements cannot go through the upsert; and an UPDATE does
-- not promise an order, nor can a lock taken before it cover a row that
-- another batch is inserting: test/isolation/specs/mart_new_rows.spec.)
-- The row of a count that goes down exists: the orders it counted are
-- still counted.  A row lives while its count is positive.  The category deltas carry the
-- users' CLOSED order counts and the users touched under keys of their own
-- (install/30_cdm.sql), and the windowed tag counts under
-- dwh.tag_window_key() (install/78_tag_windows.sql).  Then the user tags of
-- what changed follow (install/79_tag_refresh.sql), unless refresh_tags is
-- false: with some rule, the new count of every mart row written goes with
-- them.
CREATE FUNCTION dwh.apply_mart_deltas(product_users uuid[], products uuid[],
                                      product_deltas integer[],
                                      category_users uuid[], categories uuid[],
                                      category_deltas integer[],
                                      refresh_tags boolean DEFAULT true)
    RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    zero_users uuid[];
    zero_keys uuid[];
    order_users uuid[];
    order_deltas integer[];
    touched uuid[];
    window_users uuid[];
    window_keys uuid[];
    window_deltas integer[];
    tagging boolean;
    moved_product_users uuid[];
    moved_products uuid[];
    moved_product_counts integer[];
    moved_category_users uuid[];
    moved_categories uuid[];
    moved_category_counts integer[];
    crossed_users uuid[];
    crossed_tags text[];
    rule_products uuid[];
    rule_categories uuid[];
BEGIN
    IF products IS NULL AND categories IS NULL THEN
        RETURN;
    END IF;

    -- Step 3 of the lock order: the order triggers and menu changes took
    -- the tag lock already (this takes it again, in case a caller did
    -- not).  With some rule, the marts' new counts are kept for the tags.
    PERFORM dwh.xact_lock(dwh.tag_lock_key(), false);
    -- Whether some rule exists, and the keys of the mart rows that an
    -- all-time rule counts (only those can cross a threshold).
    SELECT count(*) > 0,
           coalesce(array_agg(dwh.hash_key(r.product_id))
                    FILTER (WHERE r.kind = 'dish' AND r.window_days IS NULL), '{}'),
           coalesce(array_agg(dwh.hash_key(r.category_name))
                    FILTER (WHERE r.kind = 'category' AND r.window_days IS NULL), '{}')
    INTO tagging, rule_products, rule_categories
    FROM dwh.tag_rules r;
    tagging := tagging AND refresh_tags AND NOT dwh.tags_restoring();
    IF NOT tagging THEN
        rule_products := NULL;
        rule_categories := NULL;
    END IF;

    IF categories IS NOT NULL THEN
        SELECT array_agg(d.user_id) FILTER (WHERE d.category_id = dwh.all_orders_key()),
               array_agg(d.d) FILTER (WHERE d.category_id = dwh.all_orders_key()),
               array_agg(d.user_id) FILTER (WHERE d.category_id = dwh.touched_user_key()),
               array_agg(d.user_id) FILTER (WHERE d.window_key),
               array_agg(d.category_id) FILTER (WHERE d.window_key),
               array_agg(d.d) FILTER (WHERE d.window_key),
               array_agg(d.user_id) FILTER (WHERE NOT d.window_key
                                              AND d.category_id NOT IN (dwh.all_orders_key(),
                                                                        dwh.touched_user_key())),
               array_agg(d.category_id) FILTER (WHERE NOT d.window_key
                                                  AND d.category_id NOT IN (dwh.all_orders_key(),
                                                                            dwh.touched_user_key())),
               array_agg(d.d) FILTER (WHERE NOT d.window_key
                                        AND d.category_id NOT IN (dwh.all_orders_key(),
                                                                  dwh.touched_user_key()))
        INTO order_users, order_deltas, touched, window_users, window_keys, window_deltas,
             category_users, categories, category_deltas
        FROM (SELECT x.*, dwh.is_tag_window_key(x.category_id) AS window_key
              FROM unnest(category_users, categories, category_deltas)
                   AS x(user_id, category_id, d)) d;
    END IF;

    IF products IS NOT NULL THEN
        WITH delta AS MATERIALIZED (
            SELECT * FROM unnest(product_users, products, product_deltas)
                     AS d(user_id, product_id, d)
            WHERE d.d <> 0
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
            SELECT d.user_id, d.product_id, coalesce(n.name, ''), greatest(d.d, 0)
            FROM delta d LEFT JOIN name n USING (product_id)
            ORDER BY d.user_id, d.product_id
            ON CONFLICT (user_id, product_id) DO UPDATE
            SET order_cnt = m.order_cnt + EXCLUDED.order_cnt
            WHERE EXCLUDED.order_cnt > 0
            RETURNING m.user_id, m.product_id, m.order_cnt
        )
        SELECT array_agg(user_id) FILTER (WHERE product_id = ANY (rule_products)),
               array_agg(product_id) FILTER (WHERE product_id = ANY (rule_products)),
               array_agg(order_cnt) FILTER (WHERE product_id = ANY (rule_products))
        INTO moved_product_users, moved_products, moved_product_counts
        FROM up;

        IF EXISTS (SELECT FROM unnest(product_deltas) d WHERE d < 0) THEN
            WITH down AS (
                UPDATE cdm.user_product_counters m
                SET order_cnt = m.order_cnt + d.d
                FROM unnest(product_users, products, product_deltas)
                     AS d(user_id, product_id, d)
                WHERE d.d < 0 AND m.user_id = d.user_id AND m.product_id = d.product_id
                RETURNING m.user_id, m.product_id, m.order_cnt
            )
            SELECT array_agg(user_id) FILTER (WHERE order_cnt = 0),
                   array_agg(product_id) FILTER (WHERE order_cnt = 0),
                   moved_product_users
                   || array_agg(user_id) FILTER (WHERE product_id = ANY (rule_products)),
                   moved_products
                   || array_agg(product_id) FILTER (WHERE product_id = ANY (rule_products)),
                   moved_product_counts
                   || array_agg(order_cnt) FILTER (WHERE product_id = ANY (rule_products))
            INTO zero_users, zero_keys,
                 moved_product_users, moved_products, moved_product_counts
            FROM down;

            IF zero_keys IS NOT NULL THEN
                DELETE FROM cdm.user_product_counters m
                USING unnest(zero_users, zero_keys) AS z(user_id, product_id)
                WHERE m.user_id = z.user_id AND m.product_id = z.product_id
                  AND m.order_cnt = 0;
            END IF;
        END IF;
    END IF;

    IF categories IS NOT NULL THEN
        WITH up AS (
            INSERT INTO cdm.user_category_counters AS m
                   (user_id, category_id, category_name, order_cnt)
            SELECT d.user_id, d.category_id, h.category_name, greatest(d.d, 0)
            FROM unnest(category_users, categories, category_deltas)
                 AS d(user_id, category_id, d)
            JOIN dds.h_category h ON h.h_category_pk = d.category_id
            WHERE d.d <> 0
            ORDER BY d.user_id, d.category_id
            ON CONFLICT (user_id, category_id) DO UPDATE
            SET order_cnt = m.order_cnt + EXCLUDED.order_cnt
            WHERE EXCLUDED.order_cnt > 0
            RETURNING m.user_id, m.category_id, m.order_cnt
        )
        SELECT array_agg(user_id) FILTER (WHERE category_id = ANY (rule_categories)),
               array_agg(category_id) FILTER (WHERE category_id = ANY (rule_categories)),
               array_agg(order_cnt) FILTER (WHERE category_id = ANY (rule_categories))
        INTO moved_category_users, moved_categories, moved_category_counts
        FROM up;

        IF EXISTS (SELECT FROM unnest(category_deltas) d WHERE d < 0) THEN
            WITH down AS (
                UPDATE cdm.user_category_counters m
                SET order_cnt = m.order_cnt + d.d
                FROM unnest(category_users, categories, category_deltas)
                     AS d(user_id, category_id, d)
                WHERE d.d < 0 AND m.user_id = d.user_id AND m.category_id = d.category_id
                RETURNING m.user_id, m.category_id, m.order_cnt
            )
            SELECT array_agg(user_id) FILTER (WHERE order_cnt = 0),
                   array_agg(category_id) FILTER (WHERE order_cnt = 0),
                   moved_category_users
                   || array_agg(user_id) FILTER (WHERE category_id = ANY (rule_categories)),
                   moved_categories
                   || array_agg(category_id) FILTER (WHERE category_id = ANY (rule_categories)),
                   moved_category_counts
                   || array_agg(order_cnt) FILTER (WHERE category_id = ANY (rule_categories))
            INTO zero_users, zero_keys,
                 moved_category_users, moved_categories, moved_category_counts
            FROM down;

            IF zero_keys IS NOT NULL THEN
                DELETE FROM cdm.user_category_counters m
                USING unnest(zero_users, zero_keys) AS z(user_id, category_id)
                WHERE m.user_id = z.user_id AND m.category_id = z.category_id
                  AND m.order_cnt = 0;
            END IF;
        END IF;
    END IF;

    IF moved_product_users IS NOT NULL OR moved_category_users IS NOT NULL THEN
        SELECT array_agg(c.user_id), array_agg(c.tag)
        INTO crossed_users, crossed_tags
        FROM (SELECT * FROM dwh.tags_crossed('dish', product_users, products, product_deltas,
                                             moved_product_users, moved_products,
                                             moved_product_counts)
              UNION ALL
              SELECT * FROM dwh.tags_crossed('category', category_users, categories,
                                             category_deltas, moved_category_users,
                                             moved_categories, moved_category_counts)) c;
    END IF;

    PERFORM dwh.apply_order_deltas_and_tags(order_users, order_deltas, touched, category_users,
                                            window_users, window_keys, window_deltas,
                                            tagging, crossed_users, crossed_tags);
END
$fn$;
COMMENT ON FUNCTION dwh.apply_mart_deltas(uuid[], uuid[], integer[], uuid[], uuid[], integer[], boolean) IS
    'Internal: add per-key order count deltas to the marts, in key order (rows reaching zero are deleted), then refresh the user tags they change';

-- Deltas of several chunks of one statement, summed per key, as
-- dwh.apply_mart_deltas takes them (each key once).  A key whose sum is
-- zero changes nothing and is left out, but for the users touched, whose
-- tags are looked at whatever their counts did.
CREATE FUNCTION dwh.sum_mart_deltas(users uuid[], keys uuid[], deltas integer[],
                                    OUT summed_users uuid[], OUT summed_keys uuid[],
                                    OUT summed_deltas integer[])
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT array_agg(s.user_id), array_agg(s.key), array_agg(s.d)
    FROM (SELECT x.user_id, x.key, sum(x.d)::integer AS d
          FROM unnest(users, keys, deltas) AS x(user_id, key, d)
          GROUP BY x.user_id, x.key
          HAVING sum(x.d) <> 0 OR x.key = dwh.touched_user_key()) s
$fn$;
COMMENT ON FUNCTION dwh.sum_mart_deltas(uuid[], uuid[], integer[]) IS
    'Internal: sum mart deltas per (user, key), leaving out the sums of zero';
