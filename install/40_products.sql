-- Dishes are named by menus and by orders (docs/data-rule.md).  The name
-- satellite keeps one row per dish and time at which a menu version names
-- it, and one row at the time of its newest naming by an order (the
-- greatest (update_ts, name) over every order version's items), each with
-- the greatest name named at its time (byte-wise).  Orders name dishes in
-- every batch: one row per order item would cost a row per item, so only
-- the newest naming is kept, and it moves forward.  A dish's current name
-- is its newest row's.

-- Menu namings: dish hubs and one satellite row per dish and menu time.
-- A row that is also the newest order naming's keeps its load_src.
-- Returns the dishes whose current name changed.
CREATE FUNCTION dwh.load_menu_namings(ids text[], names text[], versions timestamp[])
    RETURNS uuid[]
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    renamed uuid[];
BEGIN
    WITH naming AS MATERIALIZED (
        SELECT DISTINCT ON (n.product_id, n.load_dt)
               dwh.hash_key(n.product_id) AS h_product_pk, n.product_id, n.name, n.load_dt
        FROM unnest(ids, names, versions) AS n(product_id, name, load_dt)
        ORDER BY n.product_id, n.load_dt, n.name COLLATE "C" DESC
    ),
    hub AS (
        INSERT INTO dds.h_product (h_product_pk, product_id, load_dt, load_src)
        SELECT DISTINCT h_product_pk, product_id, now(), 'stg.restaurants'
        FROM naming
        ORDER BY 1
        ON CONFLICT DO NOTHING
    ),
    newest AS MATERIALIZED (
        SELECT DISTINCT ON (h_product_pk) h_product_pk, name, load_dt
        FROM naming
        ORDER BY h_product_pk, load_dt DESC, name COLLATE "C" DESC
    ),
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
    )
    SELECT array_agg(h_product_pk) INTO renamed
    FROM before
    WHERE cur_name IS NULL
       OR (name <> cur_name
           AND (load_dt > cur_load_dt
                OR (load_dt = cur_load_dt AND name COLLATE "C" > cur_name COLLATE "C")));

    RETURN renamed;
END
$fn$;
COMMENT ON FUNCTION dwh.load_menu_namings(text[], text[], timestamp[]) IS
    'Internal: load dish hubs and the name satellite rows of menu namings; returns the dishes whose current name changed';

-- The greatest name that menus give a dish at a time, if any.
CREATE FUNCTION dwh.menu_name_at(product_id text, version timestamp)
    RETURNS text
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT max(e->>'name' COLLATE "C")
    FROM (SELECT payload FROM stg.restaurants
          WHERE coalesce(update_ts, '-infinity') = version
          UNION ALL
          SELECT payload FROM stg.restaurant_history
          WHERE coalesce(update_ts, '-infinity') = version) r,
         jsonb_array_elements(r.payload->'menu') e
    WHERE e->>'_id' = product_id;
$fn$;
COMMENT ON FUNCTION dwh.menu_name_at(text, timestamp) IS
    'Internal: the greatest name that menu versions of this time give the dish, or null';

-- Step 6 of the lock order, after the marts: the newest naming of each dish
-- by an order.  Its satellite row is the one with load_src
-- stg.order_events (one per dish); when a batch names a dish later, the row
-- moves there, and the menu naming of its old time, if any, gets its row
-- back.  Under a shared dictionary lock no current name changes (see
-- dwh.claim_order_keys); under an exclusive one the marts follow.
CREATE FUNCTION dwh.load_order_namings(product_ids text[], product_names text[],
                                       name_versions timestamp[])
    RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    keys uuid[];
    ids text[];
    names text[];
    times timestamp[];
    old_times timestamp[];
    renamed uuid[];
    moved uuid[];
BEGIN
    IF product_ids IS NULL THEN
        RETURN;
    END IF;

    -- Each dish's hub row, locked in key order, stands for its one order
    -- naming row: a dish that orders never named has no such row to lock,
    -- and two batches naming it at once would each insert one.
    PERFORM FROM dds.h_product h
    WHERE h.h_product_pk IN (SELECT dwh.hash_key(id) FROM unnest(product_ids) AS i(id))
    ORDER BY h.h_product_pk
    FOR NO KEY UPDATE;

    -- The batch's newest naming of each dish (from dwh.claim_order_keys),
    -- where it is newer than the dish's newest order naming; and the dishes
    -- whose current name it changes (or gives first), found before the
    -- write: the current name is the naming greatest in (time, name), and
    -- the row an order naming leaves is older than the one it gets.
    WITH naming AS MATERIALIZED (
        SELECT dwh.hash_key(n.id) AS h_product_pk, n.id, n.name, n.version
        FROM unnest(product_ids, product_names, name_versions) AS n(id, name, version)
    ),
    locked AS MATERIALIZED (
        SELECT s.h_product_pk, s.name, s.load_dt
        FROM dds.s_product_names s
        WHERE s.h_product_pk IN (SELECT h_product_pk FROM naming)
          AND s.load_src = 'stg.order_events'
    )
    SELECT array_agg(n.h_product_pk), array_agg(n.id), array_agg(n.name),
           array_agg(n.version), array_agg(l.load_dt),
           array_agg(n.h_product_pk)
               FILTER (WHERE cur.name IS NULL
                          OR (n.name <> cur.name
                              AND (n.version > cur.load_dt
                                   OR (n.version = cur.load_dt
                                       AND n.name COLLATE "C" > cur.name COLLATE "C"))))
    INTO keys, ids, names, times, old_times, renamed
    FROM naming n
    LEFT JOIN locked l USING (h_product_pk)
    LEFT JOIN LATERAL (
        SELECT s.name, s.load_dt FROM dds.s_product_names s
        WHERE s.h_product_pk = n.h_product_pk
        ORDER BY s.load_dt DESC LIMIT 1) cur ON true
    WHERE l.h_product_pk IS NULL
       OR n.version > l.load_dt
       OR (n.version = l.load_dt AND n.name COLLATE "C" > l.name COLLATE "C");

    IF keys IS NULL THEN
        RETURN;
    END IF;

    -- The rows left behind: the menu naming of their time, or nothing.
    -- Whether some menu version has that time, by index (an order's time
    -- is never null: it is parsed from its digits); menus are rarely of
    -- the time of an order.  A row no menu keeps moves to its new time
    -- in place (no new row to check against the hub), unless a menu
    -- naming already has that time: then it goes, and the menu's row
    -- takes the order naming below.
    WITH old AS MATERIALIZED (
        SELECT m.h_product_pk, m.name, m.load_dt, m.old_time,
               CASE WHEN EXISTS (SELECT FROM stg.restaurants r
                                 WHERE r.update_ts = m.old_time)
                         OR EXISTS (SELECT FROM stg.restaurant_history r
                                    WHERE r.update_ts = m.old_time)
                    THEN dwh.menu_name_at(m.product_id, m.old_time) END AS menu_name,
               EXISTS (SELECT FROM dds.s_product_names s
                       WHERE s.h_product_pk = m.h_product_pk
                         AND s.load_dt = m.load_dt) AS taken
        FROM unnest(keys, ids, names, times, old_times)
             AS m(h_product_pk, product_id, name, load_dt, old_time)
        WHERE m.old_time < m.load_dt
    ),
    kept AS (
        UPDATE dds.s_product_names s
        SET name = o.menu_name,
            hk_product_names_hashdiff = dwh.hash_key(s.h_product_pk::text || o.menu_name),
            load_src = 'stg.restaurants'
        FROM old o
        WHERE s.h_product_pk = o.h_product_pk AND s.load_dt = o.old_time
          AND o.menu_name IS NOT NULL
    ),
    dropped AS (
        DELETE FROM dds.s_product_names s
        USING old o
        WHERE s.h_product_pk = o.h_product_pk AND s.load_dt = o.old_time
          AND o.menu_name IS NULL AND o.taken
    ),
    moving AS (
        UPDATE dds.s_product_names s
        SET name = o.name,
            hk_product_names_hashdiff = dwh.hash_key(s.h_product_pk::text || o.name),
            load_dt = o.load_dt
        FROM old o
        WHERE s.h_product_pk = o.h_product_pk AND s.load_dt = o.old_time
          AND o.menu_name IS NULL AND NOT o.taken
        RETURNING s.h_product_pk
    )
    SELECT array_agg(h_product_pk) INTO moved FROM moving;

    -- The other new rows, merged with a menu naming of the same time.
    IF moved IS NULL OR cardinality(moved) < cardinality(keys) THEN
        INSERT INTO dds.s_product_names AS s
               (h_product_pk, name, hk_product_names_hashdiff, load_dt, load_src)
        SELECT m.h_product_pk, m.name, dwh.hash_key(m.h_product_pk::text || m.name),
               m.load_dt, 'stg.order_events'
        FROM unnest(keys, names, times) AS m(h_product_pk, name, load_dt)
        WHERE m.h_product_pk <> ALL (coalesce(moved, '{}'))
        ORDER BY 1
        ON CONFLICT (h_product_pk, load_dt) DO UPDATE
        SET name = CASE WHEN EXCLUDED.name COLLATE "C" > s.name COLLATE "C"
                        THEN EXCLUDED.name ELSE s.name END,
            hk_product_names_hashdiff = CASE WHEN EXCLUDED.name COLLATE "C" > s.name COLLATE "C"
                                             THEN EXCLUDED.hk_product_names_hashdiff
                                             ELSE s.hk_product_names_hashdiff END,
            load_src = 'stg.order_events';
    END IF;

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
COMMENT ON FUNCTION dwh.load_order_namings(text[], text[], timestamp[]) IS
    'Internal: move each dish''s newest order naming forward to the newest of these order versions';

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
--   1. the dictionary lock, shared (exclusive when the batch renames a dish
--      or names one for the first time; menus always take it exclusive);
--   2. the keys that batches share, each table in one sorted pass: dish,
--      restaurant and user hubs, (dish, restaurant) pairs;
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
--   6. the hub rows of the dishes the batch names, in key order, standing
--      for their newest order naming rows (which every batch updates, and
--      which a dish orders never named does not have yet), held only from
--      here to commit.
-- Steps 1 and 2 are dwh.claim_order_keys(), step 6 dwh.load_order_namings(),
-- both run over every version of the batch by dwh.ingest_orders (the
-- order triggers run them over what their statement wrote when no ingest
-- did).  Any other statement that writes orders takes the dictionary lock
-- exclusive before its first row (dwh.stg_statement_lock).

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
                                  OUT item_versions timestamp[])
    AS 'MODULE_PATHNAME', 'dwh_order_namings'
    LANGUAGE C STRICT IMMUTABLE;
COMMENT ON FUNCTION dwh.order_namings(jsonb[], timestamp[]) IS
    'Internal: the newest naming (version, then greatest name) of each dish among the items of these order versions';

CREATE FUNCTION dwh.order_keys_missing(payloads jsonb[],
                                       OUT products text[], OUT restaurants text[],
                                       OUT users text[], OUT pair_restaurants text[],
                                       OUT pair_products text[])
    AS 'MODULE_PATHNAME', 'dwh_order_keys_missing'
    LANGUAGE C STRICT VOLATILE;
COMMENT ON FUNCTION dwh.order_keys_missing(jsonb[]) IS
    'Internal: the dishes, restaurants, users and (restaurant, dish) pairs of these orders that DDS has no hub or link for yet';

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
                                     OUT item_versions timestamp[])
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

    IF exclusive THEN
        PERFORM pg_advisory_xact_lock(dwh.dictionary_lock_key());
    ELSE
        PERFORM pg_advisory_xact_lock_shared(dwh.dictionary_lock_key());
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
        SELECT dwh.hash_key(id), id, now(), 'stg.order_events'
        FROM unnest(missing.products) AS i(id)
        ORDER BY 1
        ON CONFLICT DO NOTHING;
    END IF;

    IF missing.restaurants IS NOT NULL OR missing.users IS NOT NULL
       OR missing.pair_products IS NOT NULL THEN
        WITH restaurant_hub AS (
            INSERT INTO dds.h_restaurant (h_restaurant_pk, restaurant_id, load_dt, load_src)
            SELECT dwh.hash_key(restaurant_id), restaurant_id, now(), 'stg.order_events'
            FROM unnest(missing.restaurants) AS r(restaurant_id)
            ORDER BY 1
            ON CONFLICT DO NOTHING
        ),
        user_hub AS (
            INSERT INTO dds.h_user (h_user_pk, user_id, load_dt, load_src)
            SELECT dwh.hash_key(user_id), user_id, now(), 'stg.order_events'
            FROM unnest(missing.users) AS u(user_id)
            ORDER BY 1
            ON CONFLICT DO NOTHING
        )
        INSERT INTO dds.l_product_restaurant
               (hk_product_restaurant_pk, h_product_pk, h_restaurant_pk, load_dt, load_src)
        SELECT dwh.hash_key(p.h_product_pk, r.h_restaurant_pk), p.h_product_pk,
               r.h_restaurant_pk, now(), 'stg.order_events'
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
    'Internal: take the dictionary lock and load the keys that order batches share (dishes, restaurants, users, dish-restaurant pairs), in the one lock order; returns the batch''s newest naming of each dish';

-- Apply per-key count deltas to the marts.  Rows are written in key order
-- so that concurrent batches never deadlock; when some counts go down, the
-- existing rows are first locked in that order, because an UPDATE does not
-- promise one.  A row lives while its count is positive.  (CHECK constraints
-- are evaluated on the row an INSERT proposes before ON CONFLICT, so
-- decrements cannot go through the upsert.)  The category deltas carry the
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
    PERFORM pg_advisory_xact_lock_shared(dwh.tag_lock_key());
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
            RETURNING m.user_id, m.product_id, m.order_cnt
        ),
        down AS (
            UPDATE cdm.user_product_counters m
            SET order_cnt = m.order_cnt + d.d
            FROM delta d
            WHERE d.d < 0 AND m.user_id = d.user_id AND m.product_id = d.product_id
            RETURNING m.user_id, m.product_id, m.order_cnt
        ),
        moved AS (
            SELECT * FROM up
            UNION ALL
            SELECT * FROM down
        )
        SELECT array_agg(user_id) FILTER (WHERE order_cnt = 0),
               array_agg(product_id) FILTER (WHERE order_cnt = 0),
               array_agg(user_id) FILTER (WHERE product_id = ANY (rule_products)),
               array_agg(product_id) FILTER (WHERE product_id = ANY (rule_products)),
               array_agg(order_cnt) FILTER (WHERE product_id = ANY (rule_products))
        INTO zero_users, zero_keys,
             moved_product_users, moved_products, moved_product_counts
        FROM moved;

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
            RETURNING m.user_id, m.category_id, m.order_cnt
        ),
        down AS (
            UPDATE cdm.user_category_counters m
            SET order_cnt = m.order_cnt + d.d
            FROM delta d
            WHERE d.d < 0 AND m.user_id = d.user_id AND m.category_id = d.category_id
            RETURNING m.user_id, m.category_id, m.order_cnt
        ),
        moved AS (
            SELECT * FROM up
            UNION ALL
            SELECT * FROM down
        )
        SELECT array_agg(user_id) FILTER (WHERE order_cnt = 0),
               array_agg(category_id) FILTER (WHERE order_cnt = 0),
               array_agg(user_id) FILTER (WHERE category_id = ANY (rule_categories)),
               array_agg(category_id) FILTER (WHERE category_id = ANY (rule_categories)),
               array_agg(order_cnt) FILTER (WHERE category_id = ANY (rule_categories))
        INTO zero_users, zero_keys,
             moved_category_users, moved_categories, moved_category_counts
        FROM moved;

        IF zero_keys IS NOT NULL THEN
            DELETE FROM cdm.user_category_counters m
            USING unnest(zero_users, zero_keys) AS z(user_id, category_id)
            WHERE m.user_id = z.user_id AND m.category_id = z.category_id
              AND m.order_cnt = 0;
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
    'Add per-key order count deltas to the marts, in key order (rows reaching zero are deleted), then refresh the user tags they change';
