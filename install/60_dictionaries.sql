-- Dictionaries: users and restaurants (with their menus) from Redis.  Users
-- only reach DDS (the marts carry no user names).  A menu names, renames and
-- categorises dishes: it takes the dictionary lock exclusively, because a
-- dish that moves to another category changes the category counts of every
-- CLOSED order holding it.  The current tables and their history tables
-- share one loader per kind: a version's contribution does not depend on
-- whether it is current.  A value without update_ts_utc has the version
-- time -infinity (older than any other).

-- Hubs and name satellite rows of these (user, version time) pairs: each
-- row takes the values of the greatest version of that time, current or
-- superseded.
CREATE FUNCTION dwh.load_user_versions(keys text[], versions timestamp[])
    RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    IF keys IS NULL THEN
        RETURN;
    END IF;
    -- The winners below are read after this lock: see dwh.user_lock_key().
    PERFORM dwh.xact_lock(dwh.user_lock_key(), true);

    WITH touched AS MATERIALIZED (
        SELECT DISTINCT k AS object_id, coalesce(v, '-infinity') AS load_dt
        FROM unnest(keys, versions) AS t(k, v)
    ),
    hub AS (
        INSERT INTO dds.h_user (h_user_pk, user_id, load_dt, load_src)
        SELECT DISTINCT dwh.hash_key(object_id), object_id, now() AT TIME ZONE 'UTC', 'stg.users'
        FROM touched
        ORDER BY 1
        ON CONFLICT DO NOTHING
    ),
    candidate AS (
        SELECT c.object_id, coalesce(c.update_ts, '-infinity') AS load_dt, c.payload
        FROM stg.users c JOIN touched t USING (object_id)
        WHERE coalesce(c.update_ts, '-infinity') = t.load_dt
        UNION ALL
        SELECT h.object_id, coalesce(h.update_ts, '-infinity'), h.payload
        FROM stg.user_history h JOIN touched t USING (object_id)
        WHERE coalesce(h.update_ts, '-infinity') = t.load_dt
    ),
    winner AS (
        SELECT DISTINCT ON (object_id, load_dt)
               dwh.hash_key(object_id) AS h_user_pk, load_dt,
               payload->>'name' AS username, payload->>'login' AS userlogin
        FROM candidate
        ORDER BY object_id, load_dt, payload::text COLLATE "C" DESC
    )
    INSERT INTO dds.s_user_names AS s
           (h_user_pk, username, userlogin, hk_user_names_hashdiff, load_dt, load_src)
    SELECT h_user_pk, username, userlogin,
           dwh.hash_key(h_user_pk::text || username || userlogin), load_dt, 'stg.users'
    FROM winner
    ORDER BY h_user_pk, load_dt
    ON CONFLICT (h_user_pk, load_dt) DO UPDATE
    SET username = EXCLUDED.username, userlogin = EXCLUDED.userlogin,
        hk_user_names_hashdiff = EXCLUDED.hk_user_names_hashdiff
    WHERE (s.username, s.userlogin) IS DISTINCT FROM (EXCLUDED.username, EXCLUDED.userlogin);
END
$fn$;
COMMENT ON FUNCTION dwh.load_user_versions(text[], timestamp[]) IS
    'Internal: load user hubs and the name satellite rows of these (user, version time) pairs from stg.users and stg.user_history';

-- The trigger of stg.users (INSERT and UPDATE) and of stg.user_history.
-- A statement's rows are carried dwh.trigger_chunk_rows at a time, so that
-- a restore's COPY of millions of users holds one chunk in memory; their
-- hubs come first, all in key order, as order batches insert them (a hub
-- of a later chunk inserted after an earlier chunk's could wait for a
-- batch that waits for that one).  Without JIT, as the order trigger.
CREATE FUNCTION dwh.users_changed() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
AS $fn$
DECLARE
    total bigint;
    chunk_rows integer := current_setting('dwh.trigger_chunk_rows')::integer;
    seen bigint := 0;
    n integer := 0;
    row_key text;
    row_version timestamp;
    keys text[];
    versions timestamp[];
BEGIN
    SELECT count(*) INTO total FROM changed;
    IF total = 0 THEN
        RETURN NULL;
    END IF;
    -- The winners are read after this lock: see dwh.user_lock_key().
    PERFORM dwh.xact_lock(dwh.user_lock_key(), true);
    INSERT INTO dds.h_user (h_user_pk, user_id, load_dt, load_src)
    SELECT DISTINCT dwh.hash_key(c.object_id), c.object_id, now() AT TIME ZONE 'UTC', 'stg.users'
    FROM changed c
    ORDER BY 1
    ON CONFLICT DO NOTHING;

    FOR row_key, row_version IN SELECT c.object_id, c.update_ts FROM changed c LOOP
        n := n + 1;
        seen := seen + 1;
        keys[n] := row_key;
        versions[n] := row_version;
        IF n = chunk_rows OR seen = total THEN
            PERFORM dwh.load_user_versions(keys, versions);
            n := 0;
            keys := NULL;
            versions := NULL;
        END IF;
    END LOOP;

    IF TG_OP = 'UPDATE' THEN
        -- Replaced values are superseded versions.
        INSERT INTO stg.user_history (object_id, update_ts, payload)
        SELECT o.object_id, o.update_ts, o.payload
        FROM superseded o JOIN changed c USING (object_id)
        WHERE CASE WHEN o.update_ts IS DISTINCT FROM c.update_ts THEN true
                   ELSE o.payload::text <> c.payload::text END
        ORDER BY o.object_id
        ON CONFLICT DO NOTHING;
    END IF;

    RETURN NULL;
END
$fn$;
COMMENT ON FUNCTION dwh.users_changed() IS
    'AFTER INSERT/UPDATE statement trigger of stg.users and AFTER INSERT statement trigger of stg.user_history: user hubs and name satellites';

CREATE TRIGGER users_inserted
    AFTER INSERT ON stg.users
    REFERENCING NEW TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION dwh.users_changed();

CREATE TRIGGER users_updated
    AFTER UPDATE ON stg.users
    REFERENCING OLD TABLE AS superseded NEW TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION dwh.users_changed();

CREATE TRIGGER user_history_added
    AFTER INSERT ON stg.user_history
    REFERENCING NEW TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION dwh.users_changed();

-- Move dishes to new categories and carry the change into the category
-- mart: only the CLOSED orders holding a moved dish are recounted.
CREATE FUNCTION dwh.move_products(products uuid[], categories uuid[],
                                  versions timestamp[])
    RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    category_users uuid[];
    category_keys uuid[];
    category_deltas integer[];
    windows boolean;
    orders uuid[];
    before_users uuid[];
    before_tags text[];
    before_categories uuid[];
    before_counts integer[];
    w record;
BEGIN
    -- Windowed tag rules count what the orders holding the dishes count
    -- after the move minus before, under the tag lock (see
    -- dwh.order_events_changed).
    PERFORM dwh.xact_lock(dwh.tag_lock_key(), false);
    windows := NOT dwh.tags_restoring()
               AND EXISTS (SELECT FROM dwh.tag_rules r
                           WHERE r.window_days IS NOT NULL
                             AND r.kind IN ('category', 'favourite_category'));
    IF windows THEN
        orders := ARRAY(SELECT DISTINCT op.h_order_pk
                        FROM dds.l_order_product op
                        WHERE op.h_product_pk = ANY (products));
        SELECT array_agg(b.user_id), array_agg(b.tag), array_agg(b.category_id),
               array_agg(b.order_cnt)
        INTO before_users, before_tags, before_categories, before_counts
        FROM dwh.tag_window_counts(orders, NULL, NULL) b;
    END IF;

    WITH moved AS MATERIALIZED (
        SELECT * FROM unnest(products, categories, versions)
                 AS m(h_product_pk, h_category_pk, load_dt)
    ),
    closed AS MATERIALIZED (
        SELECT a.h_order_pk
        FROM (SELECT DISTINCT op.h_order_pk
              FROM moved m JOIN dds.l_order_product op USING (h_product_pk)) a
        WHERE (SELECT s.status FROM dds.s_order_status s
               WHERE s.h_order_pk = a.h_order_pk
               ORDER BY s.load_dt DESC LIMIT 1) = 'CLOSED'
    ),
    item AS MATERIALIZED (
        SELECT c.h_order_pk, ou.h_user_pk, op.h_product_pk
        FROM closed c
        JOIN dds.l_order_user ou USING (h_order_pk)
        JOIN dds.l_order_product op USING (h_order_pk)
    ),
    delta AS (
        SELECT h_user_pk, h_category_pk, sum(d)::integer AS d
        FROM (SELECT DISTINCT i.h_order_pk, i.h_user_pk, pc.h_category_pk, -1 AS d
              FROM item i JOIN dds.l_product_category pc USING (h_product_pk)
              UNION ALL
              SELECT DISTINCT i.h_order_pk, i.h_user_pk,
                     coalesce(m.h_category_pk, pc.h_category_pk), 1
              FROM item i
              LEFT JOIN moved m USING (h_product_pk)
              LEFT JOIN dds.l_product_category pc USING (h_product_pk)
              WHERE coalesce(m.h_category_pk, pc.h_category_pk) IS NOT NULL) x
        GROUP BY h_user_pk, h_category_pk
        HAVING sum(d) <> 0
    ),
    relink AS (
        INSERT INTO dds.l_product_category AS l
               (hk_product_category_pk, h_product_pk, h_category_pk, load_dt, load_src)
        SELECT dwh.hash_key(h_product_pk, h_category_pk), h_product_pk, h_category_pk,
               load_dt, 'stg.restaurants'
        FROM moved
        ORDER BY h_product_pk
        ON CONFLICT (h_product_pk) DO UPDATE
        SET hk_product_category_pk = EXCLUDED.hk_product_category_pk,
            h_category_pk = EXCLUDED.h_category_pk,
            load_dt = EXCLUDED.load_dt,
            load_src = EXCLUDED.load_src
    ),
    -- The users of those orders are touched (install/30_cdm.sql): their
    -- rows are locked before their tags are refreshed.
    keys AS (
        SELECT array_agg(h_user_pk ORDER BY h_user_pk, h_category_pk) AS users,
               array_agg(h_category_pk ORDER BY h_user_pk, h_category_pk) AS keys,
               array_agg(d ORDER BY h_user_pk, h_category_pk) AS deltas
        FROM (SELECT h_user_pk, h_category_pk, d FROM delta
              UNION ALL
              SELECT DISTINCT h_user_pk, dwh.touched_user_key(), 1 FROM item) x
    )
    SELECT users, keys, deltas
    INTO category_users, category_keys, category_deltas
    FROM keys;

    IF windows THEN
        w := dwh.tag_window_deltas(orders, before_users, before_tags,
                                   before_categories, before_counts);
        IF w.keys IS NOT NULL THEN
            category_users := category_users || w.users;
            category_keys := category_keys || w.keys;
            category_deltas := category_deltas || w.deltas;
        END IF;
    END IF;

    PERFORM dwh.apply_mart_deltas(NULL, NULL, NULL,
                                  category_users, category_keys, category_deltas);
END
$fn$;
COMMENT ON FUNCTION dwh.move_products(uuid[], uuid[], timestamp[]) IS
    'Internal: relink dishes to new categories and recount the category mart for the CLOSED orders holding them';

-- Restaurants: hubs and name satellite rows of these (restaurant, version
-- time) pairs, as for users; then what the given menus say of their dishes:
-- names, the restaurants serving them, and categories (a dish takes the
-- category of the greatest (version time, category name) that lists it).
CREATE FUNCTION dwh.load_restaurant_versions(keys text[], versions timestamp[],
                                             payloads jsonb[])
    RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    renamed uuid[];
    moved_products uuid[];
    moved_categories uuid[];
    moved_versions timestamp[];
BEGIN
    IF keys IS NULL THEN
        RETURN;
    END IF;

    PERFORM dwh.xact_lock(dwh.dictionary_lock_key(), true);

    WITH touched AS MATERIALIZED (
        SELECT DISTINCT k AS object_id, coalesce(v, '-infinity') AS load_dt
        FROM unnest(keys, versions) AS t(k, v)
    ),
    hub AS (
        INSERT INTO dds.h_restaurant (h_restaurant_pk, restaurant_id, load_dt, load_src)
        SELECT DISTINCT dwh.hash_key(object_id), object_id, now() AT TIME ZONE 'UTC', 'stg.restaurants'
        FROM touched
        ORDER BY 1
        ON CONFLICT DO NOTHING
    ),
    candidate AS (
        SELECT c.object_id, coalesce(c.update_ts, '-infinity') AS load_dt, c.payload
        FROM stg.restaurants c JOIN touched t USING (object_id)
        WHERE coalesce(c.update_ts, '-infinity') = t.load_dt
        UNION ALL
        SELECT h.object_id, coalesce(h.update_ts, '-infinity'), h.payload
        FROM stg.restaurant_history h JOIN touched t USING (object_id)
        WHERE coalesce(h.update_ts, '-infinity') = t.load_dt
    ),
    winner AS (
        SELECT DISTINCT ON (object_id, load_dt)
               dwh.hash_key(object_id) AS h_restaurant_pk, load_dt,
               payload->>'name' AS name
        FROM candidate
        ORDER BY object_id, load_dt, payload::text COLLATE "C" DESC
    )
    INSERT INTO dds.s_restaurant_names AS s
           (h_restaurant_pk, name, hk_restaurant_names_hashdiff, load_dt, load_src)
    SELECT h_restaurant_pk, name, dwh.hash_key(h_restaurant_pk::text || name),
           load_dt, 'stg.restaurants'
    FROM winner
    ORDER BY h_restaurant_pk, load_dt
    ON CONFLICT (h_restaurant_pk, load_dt) DO UPDATE
    SET name = EXCLUDED.name,
        hk_restaurant_names_hashdiff = EXCLUDED.hk_restaurant_names_hashdiff
    WHERE s.name IS DISTINCT FROM EXCLUDED.name;

    -- Menu entries with an empty _id name no dish and are skipped.
    SELECT dwh.load_menu_namings(array_agg(e->>'_id'), array_agg(e->>'name'),
                                 array_agg(coalesce(r.v, '-infinity')))
    INTO renamed
    FROM unnest(keys, versions, payloads) AS r(k, v, p),
         jsonb_array_elements(r.p->'menu') e
    WHERE e->>'_id' <> '';

    WITH dish AS MATERIALIZED (
        SELECT dwh.hash_key(r.k) AS h_restaurant_pk,
               dwh.hash_key(e->>'_id') AS h_product_pk,
               nullif(e->>'category', '') AS category_name,
               coalesce(r.v, '-infinity') AS version
        FROM unnest(keys, versions, payloads) AS r(k, v, p),
             jsonb_array_elements(r.p->'menu') e
        WHERE e->>'_id' <> ''
    ),
    restaurant_link AS (
        INSERT INTO dds.l_product_restaurant
               (hk_product_restaurant_pk, h_product_pk, h_restaurant_pk, load_dt, load_src)
        SELECT DISTINCT dwh.hash_key(h_product_pk, h_restaurant_pk), h_product_pk,
               h_restaurant_pk, now() AT TIME ZONE 'UTC', 'stg.restaurants'
        FROM dish
        ORDER BY 1
        ON CONFLICT DO NOTHING
    ),
    category_hub AS (
        INSERT INTO dds.h_category (h_category_pk, category_name, load_dt, load_src)
        SELECT DISTINCT dwh.hash_key(category_name), category_name, now() AT TIME ZONE 'UTC', 'stg.restaurants'
        FROM dish
        WHERE category_name IS NOT NULL
        ORDER BY 1
        ON CONFLICT DO NOTHING
    ),
    -- The greatest (version, category name) listing a dish decides its
    -- category.
    candidate AS (
        SELECT DISTINCT ON (h_product_pk) h_product_pk, category_name,
               dwh.hash_key(category_name) AS h_category_pk, version
        FROM dish
        WHERE category_name IS NOT NULL
        ORDER BY h_product_pk, version DESC, category_name COLLATE "C" DESC
    ),
    -- A newer menu keeping a dish in its category: the link's version.
    restamped AS (
        UPDATE dds.l_product_category l
        SET load_dt = c.version
        FROM candidate c
        WHERE l.h_product_pk = c.h_product_pk AND l.h_category_pk = c.h_category_pk
          AND c.version > l.load_dt
    ),
    moved AS (
        SELECT c.*
        FROM candidate c
        LEFT JOIN dds.l_product_category l USING (h_product_pk)
        LEFT JOIN dds.h_category h ON h.h_category_pk = l.h_category_pk
        WHERE l.h_product_pk IS NULL
           OR (l.h_category_pk <> c.h_category_pk
               AND (c.version > l.load_dt
                    OR (c.version = l.load_dt
                        AND c.category_name COLLATE "C" > h.category_name COLLATE "C")))
    )
    SELECT array_agg(h_product_pk), array_agg(h_category_pk), array_agg(version)
    INTO moved_products, moved_categories, moved_versions
    FROM moved;

    IF moved_products IS NOT NULL THEN
        PERFORM dwh.move_products(moved_products, moved_categories, moved_versions);
    END IF;
    IF renamed IS NOT NULL THEN
        PERFORM dwh.refresh_product_names(renamed);
    END IF;
END
$fn$;
COMMENT ON FUNCTION dwh.load_restaurant_versions(text[], timestamp[], jsonb[]) IS
    'Internal: load restaurant versions (current or superseded): hubs, names, and the names, restaurants and categories their menus give dishes';

-- The trigger of stg.restaurants (INSERT and UPDATE) and of
-- stg.restaurant_history.  A statement's rows are carried a chunk at a
-- time, a chunk closed once it holds dwh.trigger_chunk_rows menu entries
-- (what a menu costs to load grows with its dishes): a restore's COPY of
-- thousands of menus holds one chunk in memory.  Each chunk is loaded as a
-- statement of its own would be: the dictionary lock, held exclusive from
-- the statement's start, keeps every other writer of dishes, restaurants
-- and categories out until commit.  Without JIT, as the order trigger.
CREATE FUNCTION dwh.restaurants_changed() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
AS $fn$
DECLARE
    total bigint;
    chunk_entries integer := current_setting('dwh.trigger_chunk_rows')::integer;
    seen bigint := 0;
    entries bigint := 0;
    n integer := 0;
    row_key text;
    row_version timestamp;
    row_payload jsonb;
    keys text[];
    versions timestamp[];
    payloads jsonb[];
BEGIN
    SELECT count(*) INTO total FROM changed;
    IF total = 0 THEN
        RETURN NULL;
    END IF;
    FOR row_key, row_version, row_payload IN
        SELECT c.object_id, c.update_ts, c.payload FROM changed c
    LOOP
        n := n + 1;
        seen := seen + 1;
        keys[n] := row_key;
        versions[n] := row_version;
        payloads[n] := row_payload;
        entries := entries + 1 + CASE jsonb_typeof(row_payload->'menu')
                                 WHEN 'array' THEN jsonb_array_length(row_payload->'menu')
                                 ELSE 0 END;
        IF entries >= chunk_entries OR seen = total THEN
            PERFORM dwh.load_restaurant_versions(keys, versions, payloads);
            n := 0;
            entries := 0;
            keys := NULL;
            versions := NULL;
            payloads := NULL;
        END IF;
    END LOOP;

    IF TG_OP = 'UPDATE' THEN
        -- Replaced values are superseded versions.
        INSERT INTO stg.restaurant_history (object_id, update_ts, payload)
        SELECT o.object_id, o.update_ts, o.payload
        FROM superseded o JOIN changed c USING (object_id)
        WHERE CASE WHEN o.update_ts IS DISTINCT FROM c.update_ts THEN true
                   ELSE o.payload::text <> c.payload::text END
        ORDER BY o.object_id
        ON CONFLICT DO NOTHING;
    END IF;

    RETURN NULL;
END
$fn$;
COMMENT ON FUNCTION dwh.restaurants_changed() IS
    'AFTER INSERT/UPDATE statement trigger of stg.restaurants and AFTER INSERT statement trigger of stg.restaurant_history: restaurants, dishes, categories and the marts they change';

CREATE TRIGGER restaurants_inserted
    AFTER INSERT ON stg.restaurants
    REFERENCING NEW TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION dwh.restaurants_changed();

CREATE TRIGGER restaurants_updated
    AFTER UPDATE ON stg.restaurants
    REFERENCING OLD TABLE AS superseded NEW TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION dwh.restaurants_changed();

CREATE TRIGGER restaurant_history_added
    AFTER INSERT ON stg.restaurant_history
    REFERENCING NEW TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION dwh.restaurants_changed();
