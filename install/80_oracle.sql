-- The oracle: the marts recomputed from DDS from scratch.  dwh.verify()
-- lists every difference with the maintained marts (none: consistent),
-- dwh.rebuild() makes the marts equal to the recomputation.

-- Is a key in this part of the key space?  dwh.verify(parts) and
-- dwh.verify_vault(part, parts) check one part at a time, so that a large
-- warehouse is checked without sorting all of it at once: orders by the
-- hash of their business key here.  With one part, every key is in it: the
-- planner folds the test away (and in dwh.uuid_in_part below).
CREATE FUNCTION dwh.key_in_part(k text, part integer, parts integer)
    RETURNS boolean
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $fn$
    SELECT parts OPERATOR(pg_catalog.=) 1
        OR (pg_catalog.abs(pg_catalog.hashtext(coalesce(k, ''))::pg_catalog.int8)
            OPERATOR(pg_catalog.%) parts) OPERATOR(pg_catalog.=) part
$fn$;
COMMENT ON FUNCTION dwh.key_in_part(text, integer, integer) IS
    'Internal: whether a key falls in part "part" (from 0) of "parts" parts of the key space (by its hash), as dwh.verify_vault(part, parts) checks orders';

-- A user's part, for the marts and tags: a range of its hash key (the
-- first 32 bits cut evenly), so that a part's rows are read by index.
-- Hash keys are SHA-1 based (docs/formats.md), so the parts are even.
CREATE FUNCTION dwh.key_part_start(part integer, parts integer)
    RETURNS uuid
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $fn$
    SELECT (pg_catalog.lpad(pg_catalog.to_hex((part::pg_catalog.int8 OPERATOR(pg_catalog.<<) 32)
                                              OPERATOR(pg_catalog./) parts), 8, '0')
            OPERATOR(pg_catalog.||) '-0000-0000-0000-000000000000')::pg_catalog.uuid
$fn$;
COMMENT ON FUNCTION dwh.key_part_start(integer, integer) IS
    'Internal: the smallest hash key of part "part" (from 0) of "parts" parts of the key space, as dwh.verify(parts) checks users';

CREATE FUNCTION dwh.uuid_in_part(k uuid, part integer, parts integer)
    RETURNS boolean
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $fn$
    SELECT parts OPERATOR(pg_catalog.=) 1
        OR (k OPERATOR(pg_catalog.>=) dwh.key_part_start(part, parts)
            AND (part OPERATOR(pg_catalog.=) (parts OPERATOR(pg_catalog.-) 1)
                 OR k OPERATOR(pg_catalog.<) dwh.key_part_start(part OPERATOR(pg_catalog.+) 1, parts)))
$fn$;
COMMENT ON FUNCTION dwh.uuid_in_part(uuid, integer, integer) IS
    'Internal: whether a hash key falls in part "part" (from 0) of "parts" parts of the key space (by range), as dwh.verify(parts) checks users';

CREATE VIEW dwh.order_current_status AS
SELECT DISTINCT ON (h_order_pk) h_order_pk, status, load_dt
FROM dds.s_order_status
ORDER BY h_order_pk, load_dt DESC;
COMMENT ON VIEW dwh.order_current_status IS 'Current final status of every order (its newest status satellite row)';

CREATE VIEW dwh.product_current_name AS
SELECT DISTINCT ON (h_product_pk) h_product_pk, name, load_dt
FROM dds.s_product_names
ORDER BY h_product_pk, load_dt DESC;
COMMENT ON VIEW dwh.product_current_name IS 'Current name of every dish (its newest name satellite row)';

-- Each CLOSED order with its user: the order's newest status satellite row
-- is read by key for each of a user's links, so that a check of some users
-- (dwh.verify(parts)) reads their orders alone, and nothing is sorted.
CREATE VIEW dwh.closed_orders AS
SELECT ou.h_user_pk, ou.h_order_pk
FROM dds.l_order_user ou
WHERE (SELECT s.status FROM dds.s_order_status s
       WHERE s.h_order_pk = ou.h_order_pk
       ORDER BY s.load_dt DESC LIMIT 1) = 'CLOSED';
COMMENT ON VIEW dwh.closed_orders IS 'Every order whose current status is CLOSED, with its user (an order of two users twice)';

CREATE VIEW dwh.expected_user_product_counters AS
SELECT x.user_id, x.product_id, pn.name AS product_name, x.order_cnt
FROM (SELECT c.h_user_pk AS user_id, op.h_product_pk AS product_id,
             count(*)::integer AS order_cnt
      FROM dwh.closed_orders c
      JOIN dds.l_order_product op USING (h_order_pk)
      GROUP BY c.h_user_pk, op.h_product_pk) x
LEFT JOIN dwh.product_current_name pn ON pn.h_product_pk = x.product_id;
COMMENT ON VIEW dwh.expected_user_product_counters IS 'cdm.user_product_counters recomputed from DDS';

CREATE VIEW dwh.expected_user_category_counters AS
SELECT c.h_user_pk AS user_id, pc.h_category_pk AS category_id,
       hc.category_name, count(DISTINCT c.h_order_pk)::integer AS order_cnt
FROM dwh.closed_orders c
JOIN dds.l_order_product op USING (h_order_pk)
JOIN dds.l_product_category pc USING (h_product_pk)
JOIN dds.h_category hc USING (h_category_pk)
GROUP BY c.h_user_pk, pc.h_category_pk, hc.category_name;
COMMENT ON VIEW dwh.expected_user_category_counters IS 'cdm.user_category_counters recomputed from DDS';

CREATE VIEW dwh.expected_user_order_counters AS
SELECT c.h_user_pk AS user_id, count(*)::integer AS order_cnt
FROM dwh.closed_orders c
GROUP BY c.h_user_pk;
COMMENT ON VIEW dwh.expected_user_order_counters IS 'cdm.user_order_counters recomputed from DDS';

-- The tags of every rule recounted from DDS (not from the marts, which
-- dwh.verify() checks on their own): a user's CLOSED orders dated from
-- the rule's window start on (all of them without a window), those with
-- the dish or a dish of the category; the favourite category is the one
-- of most orders, the smallest name (byte by byte) among equals.  For the
-- users of one part (dwh.verify(parts)): their orders are read by key and
-- held once, for every rule.
CREATE FUNCTION dwh.expected_user_tags_in_part(part integer, parts integer)
    RETURNS TABLE (user_id uuid, tag text, value text, order_cnt integer)
    LANGUAGE sql STABLE PARALLEL SAFE
    SET search_path = pg_catalog, pg_temp
AS $fn$
WITH closed AS MATERIALIZED (
    SELECT c.h_user_pk AS user_id, c.h_order_pk, o.order_dt
    FROM dwh.closed_orders c
    JOIN dds.h_order o USING (h_order_pk)
    WHERE dwh.uuid_in_part(c.h_user_pk, part, parts)
),
item AS MATERIALIZED (
    SELECT c.user_id, c.h_order_pk, c.order_dt, op.h_product_pk, pc.h_category_pk
    FROM closed c
    JOIN dds.l_order_product op USING (h_order_pk)
    LEFT JOIN dds.l_product_category pc USING (h_product_pk)
),
rule AS MATERIALIZED (
    SELECT r.tag, r.kind, r.threshold,
           coalesce(r.window_as_of - make_interval(days => r.window_days),
                    '-infinity') AS window_start,
           dwh.hash_key(r.category_name) AS category_id,
           dwh.hash_key(r.product_id) AS product_id
    FROM dwh.tag_rules r
),
counted AS (
    SELECT c.user_id, r.tag, NULL::text AS value, count(*)::integer AS order_cnt, r.threshold
    FROM rule r JOIN closed c ON c.order_dt >= r.window_start
    WHERE r.kind = 'all_orders'
    GROUP BY c.user_id, r.tag, r.threshold
    UNION ALL
    SELECT i.user_id, r.tag, NULL, count(DISTINCT i.h_order_pk)::integer, r.threshold
    FROM rule r
    JOIN item i ON i.order_dt >= r.window_start
               AND ((r.kind = 'dish' AND i.h_product_pk = r.product_id)
                    OR (r.kind = 'category' AND i.h_category_pk = r.category_id))
    GROUP BY i.user_id, r.tag, r.threshold
    UNION ALL
    SELECT * FROM (
        SELECT DISTINCT ON (i.user_id, r.tag) i.user_id, r.tag, h.category_name::text,
               count(DISTINCT i.h_order_pk)::integer, r.threshold
        FROM rule r
        JOIN item i ON i.order_dt >= r.window_start
        JOIN dds.h_category h ON h.h_category_pk = i.h_category_pk
        WHERE r.kind = 'favourite_category'
        GROUP BY i.user_id, r.tag, r.threshold, h.category_name
        ORDER BY i.user_id, r.tag, count(DISTINCT i.h_order_pk) DESC,
                 h.category_name COLLATE "C") f
)
SELECT user_id, tag, value, order_cnt
FROM counted
WHERE order_cnt >= threshold
$fn$;
COMMENT ON FUNCTION dwh.expected_user_tags_in_part(integer, integer) IS
    'Internal: dwh.expected_user_tags for the users of part "part" (from 0) of "parts" parts of the key space, as dwh.verify(parts) checks them';

CREATE VIEW dwh.expected_user_tags AS
SELECT * FROM dwh.expected_user_tags_in_part(0, 1);
COMMENT ON VIEW dwh.expected_user_tags IS 'cdm.user_tags recounted from DDS and dwh.tag_rules (windowed rules as of their window_as_of)';

-- The vault recomputed from STG (docs/data-rule.md): every version
-- received, current or superseded, and what each table holds as a function
-- of them.  dwh.verify_vault() lists where DDS differs.

CREATE VIEW dwh.order_versions AS
SELECT object_id, update_ts, payload, true AS is_current FROM stg.order_events
UNION ALL
SELECT object_id, update_ts, payload, false FROM stg.order_event_history;
COMMENT ON VIEW dwh.order_versions IS 'Every order version received: the current one of each order and the superseded ones';

CREATE VIEW dwh.restaurant_versions AS
SELECT object_id, coalesce(update_ts, '-infinity') AS version, payload FROM stg.restaurants
UNION ALL
SELECT object_id, coalesce(update_ts, '-infinity'), payload FROM stg.restaurant_history;
COMMENT ON VIEW dwh.restaurant_versions IS 'Every restaurant value received, with its version time (-infinity when it has none)';

CREATE VIEW dwh.user_versions AS
SELECT object_id, coalesce(update_ts, '-infinity') AS version, payload FROM stg.users
UNION ALL
SELECT object_id, coalesce(update_ts, '-infinity'), payload FROM stg.user_history;
COMMENT ON VIEW dwh.user_versions IS 'Every user value received, with its version time (-infinity when it has none)';

-- The part of the vault check of the keys in one part: the rows of the
-- part's orders (by the order's key), and in part 0 every row of the
-- tables of users, restaurants, dishes and categories.  Those are small,
-- but which of them the orders name takes every version of every order:
-- read once, in part 0, into hash aggregates (small, never sorted), not
-- once per part.  Custom plans: with one part the test of the part is
-- folded away and the plan is the one of a whole check.
CREATE FUNCTION dwh.verify_vault(part integer, parts integer)
    RETURNS TABLE (table_name text, business_key text, expected text, actual text)
    LANGUAGE plpgsql STABLE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp SET plan_cache_mode = force_custom_plan
    -- The times in the keys read the same from every session.
    SET DateStyle = 'ISO, YMD'
    -- It reads dwh's own views, whoever restricts them for the session.
    SET restrict_nonsystem_relation_kind = ''
AS $fn$
#variable_conflict use_column
BEGIN
    IF part IS NULL OR parts IS NULL THEN
        RAISE EXCEPTION 'part and parts must not be null'
            USING ERRCODE = 'null_value_not_allowed',
                  HINT = 'Parts are numbered from 0 to parts - 1; dwh.verify_vault() checks everything at once.';
    END IF;
    IF parts < 1 OR part < 0 OR part >= parts THEN
        RAISE EXCEPTION 'part % of % parts does not exist', part, parts
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Parts are numbered from 0 to parts - 1, and there is at least one.';
    END IF;
    RETURN QUERY
    WITH order_version AS MATERIALIZED (
        SELECT * FROM dwh.order_versions v
        WHERE dwh.key_in_part(v.object_id::text, part, parts)
    ),
    -- Every version, in part 0 (the ones just read when there is one part).
    every_version AS NOT MATERIALIZED (
        SELECT * FROM order_version WHERE parts = 1
        UNION ALL
        SELECT * FROM dwh.order_versions WHERE parts > 1 AND part = 0
    ),
    menu_entry AS MATERIALIZED (
        SELECT r.object_id AS restaurant_id, r.version, e->>'_id' AS product_id,
               e->>'name' AS name, nullif(e->>'category', '') AS category_name
        FROM dwh.restaurant_versions r, jsonb_array_elements(r.payload->'menu') e
        WHERE part = 0 AND e->>'_id' <> ''
    ),
    -- The items of every version, read by each aggregate below.
    order_item AS NOT MATERIALIZED (
        SELECT v.update_ts, v.payload->'restaurant'->>'id' AS restaurant_id,
               e->>'id' AS product_id, e->>'name' AS name
        FROM every_version v, jsonb_array_elements(v.payload->'order_items') e
    ),
    -- Each dish at each restaurant the orders name, and its oldest and
    -- newest version.
    item_key AS MATERIALIZED (
        SELECT product_id, restaurant_id, min(update_ts) AS oldest, max(update_ts) AS newest
        FROM order_item GROUP BY product_id, restaurant_id
    ),
    -- The name of each dish in its newest version (the greatest, byte by
    -- byte, among those of that version; none if one has none), and its
    -- oldest version.
    item_name AS (
        SELECT i.product_id, i.update_ts AS version, min(n.oldest) AS oldest,
               CASE WHEN bool_or(i.name IS NULL) THEN NULL
                    ELSE max(i.name COLLATE "C") END AS name
        FROM order_item i
        JOIN (SELECT product_id, min(oldest) AS oldest, max(newest) AS newest
              FROM item_key GROUP BY product_id) n
          ON n.product_id = i.product_id AND n.newest = i.update_ts
        GROUP BY i.product_id, i.update_ts
    ),
    -- The greatest name that menus give each dish at each time.
    menu_name AS MATERIALIZED (
        SELECT product_id, version, max(name COLLATE "C") AS name
        FROM menu_entry GROUP BY 1, 2
    ),
    -- Where each dish's order naming row belongs: at its oldest order
    -- naming, or at its newest menu naming when no order naming is older
    -- than that (docs/data-rule.md).
    order_naming AS MATERIALIZED (
        SELECT o.product_id, o.oldest, o.version AS newest, o.name, m.newest_menu,
               CASE WHEN m.newest_menu IS NULL OR o.version >= m.newest_menu
                    THEN greatest(o.oldest, m.newest_menu)
                    ELSE o.oldest END AS version
        FROM item_name o
        LEFT JOIN (SELECT product_id, max(version) AS newest_menu
                   FROM menu_entry GROUP BY 1) m USING (product_id)
    ),
    -- Each table as (key, value) pairs, expected and actual.
    expected AS (
        SELECT 'dds.h_order' AS t, object_id::text AS k,
               (payload->>'date')::timestamp::text AS v
        FROM order_version WHERE is_current
        UNION ALL
        -- An order without a current version (a restore that left it out):
        -- the date of its greatest version.
        SELECT 'dds.h_order', k, v FROM (
            SELECT DISTINCT ON (o.object_id) o.object_id::text AS k,
                   (o.payload->>'date')::timestamp::text AS v
            FROM order_version o
            WHERE NOT EXISTS (SELECT FROM order_version c
                              WHERE c.is_current AND c.object_id = o.object_id)
            ORDER BY o.object_id, o.update_ts DESC, o.payload::text COLLATE "C" DESC) x
        UNION ALL
        SELECT 'dds.h_user', k, '' FROM (
            SELECT payload->'user'->>'id' AS k FROM every_version
            UNION SELECT object_id FROM dwh.user_versions WHERE part = 0) x
        UNION ALL
        SELECT 'dds.h_restaurant', k, '' FROM (
            SELECT payload->'restaurant'->>'id' AS k FROM every_version
            UNION SELECT object_id FROM dwh.restaurant_versions WHERE part = 0) x
        UNION ALL
        SELECT 'dds.h_product', k, '' FROM (
            SELECT product_id AS k FROM item_key
            UNION SELECT product_id FROM menu_entry) x
        UNION ALL
        SELECT DISTINCT 'dds.h_category', category_name, ''
        FROM menu_entry
        WHERE category_name IS NOT NULL
        UNION ALL
        SELECT 'dds.l_order_user', object_id::text, payload->'user'->>'id'
        FROM order_version WHERE is_current
        UNION ALL
        SELECT DISTINCT 'dds.l_order_product', v.object_id::text || ' ' || (e->>'id'), ''
        FROM order_version v, jsonb_array_elements(v.payload->'order_items') e
        WHERE v.is_current
        UNION ALL
        SELECT 'dds.l_product_restaurant', k, '' FROM (
            SELECT product_id || ' ' || restaurant_id AS k FROM item_key
            UNION SELECT product_id || ' ' || restaurant_id FROM menu_entry) x
        UNION ALL
        SELECT * FROM (
            SELECT DISTINCT ON (product_id) 'dds.l_product_category', product_id,
                   category_name || ' @ ' || version::text
            FROM menu_entry
            WHERE category_name IS NOT NULL
            ORDER BY product_id, version DESC, category_name COLLATE "C" DESC) x
        UNION ALL
        SELECT * FROM (
            SELECT DISTINCT ON (object_id, update_ts) 'dds.s_order_status',
                   object_id::text || ' @ ' || update_ts::text, payload->>'final_status'
            FROM order_version
            ORDER BY object_id, update_ts, payload::text COLLATE "C" DESC) x
        UNION ALL
        SELECT * FROM (
            SELECT DISTINCT ON (object_id, update_ts) 'dds.s_order_cost',
                   object_id::text || ' @ ' || update_ts::text,
                   (payload->>'cost')::numeric(19, 5)::text || ' '
                   || (payload->>'payment')::numeric(19, 5)::text
            FROM order_version
            ORDER BY object_id, update_ts, payload::text COLLATE "C" DESC) x
        UNION ALL
        SELECT * FROM (
            SELECT DISTINCT ON (object_id, version) 'dds.s_user_names',
                   object_id || ' @ ' || version::text,
                   (payload->>'name') || ' / ' || (payload->>'login')
            FROM dwh.user_versions
            WHERE part = 0
            ORDER BY object_id, version, payload::text COLLATE "C" DESC) x
        UNION ALL
        SELECT * FROM (
            SELECT DISTINCT ON (object_id, version) 'dds.s_restaurant_names',
                   object_id || ' @ ' || version::text, payload->>'name'
            FROM dwh.restaurant_versions
            WHERE part = 0
            ORDER BY object_id, version, payload::text COLLATE "C" DESC) x
        UNION ALL
        -- The order naming row holds the newest order naming's name, the
        -- menus' of its time too when it is that naming's time.
        SELECT 'dds.s_product_names', coalesce(m.product_id, o.product_id) || ' @ '
               || coalesce(m.version, o.version)::text,
               CASE WHEN o.product_id IS NULL THEN m.name || ' / stg.restaurants'
                    WHEN o.newest > o.version OR m.name IS NULL
                         OR o.name COLLATE "C" > m.name COLLATE "C"
                    THEN o.name || ' / stg.order_events'
                    ELSE m.name || ' / stg.order_events' END
        FROM menu_name m
        FULL JOIN order_naming o
          ON o.product_id = m.product_id AND o.version = m.version
        UNION ALL
        SELECT 'dds.product_namings', product_id,
               oldest::text || ' / ' || newest::text || ' / ' || name
               || ' / ' || coalesce(newest_menu::text, '')
        FROM order_naming
    ),
    actual AS (
        SELECT 'dds.h_order' AS t, order_id::text AS k, order_dt::text AS v FROM dds.h_order
        WHERE dwh.key_in_part(order_id::text, part, parts)
        UNION ALL SELECT 'dds.h_user', user_id, '' FROM dds.h_user WHERE part = 0
        UNION ALL SELECT 'dds.h_restaurant', restaurant_id, '' FROM dds.h_restaurant WHERE part = 0
        UNION ALL SELECT 'dds.h_product', product_id, '' FROM dds.h_product WHERE part = 0
        UNION ALL SELECT 'dds.h_category', category_name, '' FROM dds.h_category WHERE part = 0
        UNION ALL
        SELECT 'dds.l_order_user', o.order_id::text, u.user_id
        FROM dds.l_order_user l JOIN dds.h_order o USING (h_order_pk) JOIN dds.h_user u USING (h_user_pk)
        WHERE dwh.key_in_part(o.order_id::text, part, parts)
        UNION ALL
        SELECT 'dds.l_order_product', o.order_id::text || ' ' || p.product_id, ''
        FROM dds.l_order_product l JOIN dds.h_order o USING (h_order_pk) JOIN dds.h_product p USING (h_product_pk)
        WHERE dwh.key_in_part(o.order_id::text, part, parts)
        UNION ALL
        SELECT 'dds.l_product_restaurant', p.product_id || ' ' || r.restaurant_id, ''
        FROM dds.l_product_restaurant l JOIN dds.h_product p USING (h_product_pk)
        JOIN dds.h_restaurant r USING (h_restaurant_pk)
        WHERE part = 0
        UNION ALL
        SELECT 'dds.l_product_category', p.product_id, c.category_name || ' @ ' || l.load_dt::text
        FROM dds.l_product_category l JOIN dds.h_product p USING (h_product_pk)
        JOIN dds.h_category c USING (h_category_pk)
        WHERE part = 0
        UNION ALL
        SELECT 'dds.s_order_status', o.order_id::text || ' @ ' || s.load_dt::text, s.status
        FROM dds.s_order_status s JOIN dds.h_order o USING (h_order_pk)
        WHERE dwh.key_in_part(o.order_id::text, part, parts)
        UNION ALL
        SELECT 'dds.s_order_cost', o.order_id::text || ' @ ' || s.load_dt::text,
               s.cost::text || ' ' || s.payment::text
        FROM dds.s_order_cost s JOIN dds.h_order o USING (h_order_pk)
        WHERE dwh.key_in_part(o.order_id::text, part, parts)
        UNION ALL
        SELECT 'dds.s_user_names', u.user_id || ' @ ' || s.load_dt::text,
               s.username || ' / ' || s.userlogin
        FROM dds.s_user_names s JOIN dds.h_user u USING (h_user_pk)
        WHERE part = 0
        UNION ALL
        SELECT 'dds.s_restaurant_names', r.restaurant_id || ' @ ' || s.load_dt::text, s.name
        FROM dds.s_restaurant_names s JOIN dds.h_restaurant r USING (h_restaurant_pk)
        WHERE part = 0
        UNION ALL
        SELECT 'dds.s_product_names', p.product_id || ' @ ' || s.load_dt::text,
               s.name || ' / ' || s.load_src
        FROM dds.s_product_names s JOIN dds.h_product p USING (h_product_pk)
        WHERE part = 0
        UNION ALL
        SELECT 'dds.product_namings', p.product_id,
               n.first_order_dt::text || ' / ' || n.last_order_dt::text || ' / '
               || n.last_order_name || ' / ' || coalesce(n.last_menu_dt::text, '')
        FROM dds.product_namings n JOIN dds.h_product p USING (h_product_pk)
        WHERE part = 0
    )
    SELECT coalesce(e.t, a.t), coalesce(e.k, a.k), e.v, a.v
    FROM expected e
    FULL JOIN actual a ON a.t = e.t AND a.k = e.k
    WHERE e.k IS NULL OR a.k IS NULL OR e.v IS DISTINCT FROM a.v
    ORDER BY 1, 2;
END
$fn$;
COMMENT ON FUNCTION dwh.verify_vault(integer, integer) IS
    'Differences between DDS and its recomputation from STG, for the orders of one part (from 0) of the key space cut in "parts" parts, and in part 0 the other hubs, links and satellites';

CREATE FUNCTION dwh.verify_vault()
    RETURNS TABLE (table_name text, business_key text, expected text, actual text)
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT * FROM dwh.verify_vault(0, 1);
$fn$;
COMMENT ON FUNCTION dwh.verify_vault() IS
    'Differences between DDS and its recomputation from every version held in STG; no rows means DDS is what STG implies';

-- The whole check, a part of the key space at a time: the marts and tags
-- of the part's users, and the vault's part.  Each part is one query, whose
-- sorts and temporary files end with it; all parts read one snapshot.
CREATE FUNCTION dwh.verify(parts integer)
    RETURNS TABLE (mart text, user_id uuid, item_id uuid,
                   expected_name text, actual_name text,
                   expected_cnt integer, actual_cnt integer)
    LANGUAGE plpgsql STABLE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp SET plan_cache_mode = force_custom_plan
    SET restrict_nonsystem_relation_kind = ''
AS $fn$
#variable_conflict use_column
DECLARE
    part integer;
    part_rows bigint;
    differences bigint := 0;
BEGIN
    IF parts IS NULL THEN
        RAISE EXCEPTION 'parts must not be null'
            USING ERRCODE = 'null_value_not_allowed',
                  HINT = 'Give 1 to 1000 parts; dwh.verify() checks everything at once.';
    END IF;
    -- Each part is a pass over the marts, the tags and DDS, however few
    -- rows it holds: a check in two billion parts never ends.  A thousand
    -- parts of a million orders each is a billion orders.
    IF parts < 1 OR parts > 1000 THEN
        RAISE EXCEPTION 'a check in % parts is not possible', parts
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Give 1 to 1000 parts (about one per million orders); dwh.verify() checks everything at once.';
    END IF;
    FOR part IN 0 .. parts - 1 LOOP
        RETURN QUERY
        SELECT 'user_product_counters', coalesce(e.user_id, a.user_id),
               coalesce(e.product_id, a.product_id), e.product_name::text,
               a.product_name::text, e.order_cnt, a.order_cnt
        FROM (SELECT * FROM dwh.expected_user_product_counters x
              WHERE dwh.uuid_in_part(x.user_id, part, parts)) e
        FULL JOIN (SELECT * FROM cdm.user_product_counters x
                   WHERE dwh.uuid_in_part(x.user_id, part, parts)) a
          ON a.user_id = e.user_id AND a.product_id = e.product_id
        WHERE e.user_id IS NULL OR a.user_id IS NULL
           OR e.order_cnt <> a.order_cnt OR e.product_name IS DISTINCT FROM a.product_name
        UNION ALL
        SELECT 'user_category_counters', coalesce(e.user_id, a.user_id),
               coalesce(e.category_id, a.category_id), e.category_name, a.category_name,
               e.order_cnt, a.order_cnt
        FROM (SELECT * FROM dwh.expected_user_category_counters x
              WHERE dwh.uuid_in_part(x.user_id, part, parts)) e
        FULL JOIN (SELECT * FROM cdm.user_category_counters x
                   WHERE dwh.uuid_in_part(x.user_id, part, parts)) a
          ON a.user_id = e.user_id AND a.category_id = e.category_id
        WHERE e.user_id IS NULL OR a.user_id IS NULL
           OR e.order_cnt <> a.order_cnt OR e.category_name IS DISTINCT FROM a.category_name
        UNION ALL
        SELECT 'user_order_counters', coalesce(e.user_id, a.user_id), NULL, NULL, NULL,
               e.order_cnt, a.order_cnt
        FROM (SELECT * FROM dwh.expected_user_order_counters x
              WHERE dwh.uuid_in_part(x.user_id, part, parts)) e
        FULL JOIN (SELECT * FROM cdm.user_order_counters x
                   WHERE dwh.uuid_in_part(x.user_id, part, parts)) a
          ON a.user_id = e.user_id
        WHERE e.user_id IS NULL OR a.user_id IS NULL OR e.order_cnt <> a.order_cnt
        UNION ALL
        -- Tags: the tag and its value in the name columns.
        SELECT 'user_tags', coalesce(e.user_id, a.user_id), NULL,
               e.tag || coalesce(': ' || e.value, ''), a.tag || coalesce(': ' || a.value, ''),
               e.order_cnt, a.order_cnt
        FROM dwh.expected_user_tags_in_part(part, parts) e
        FULL JOIN (SELECT * FROM cdm.user_tags x
                   WHERE dwh.uuid_in_part(x.user_id, part, parts)) a
          ON a.user_id = e.user_id AND a.tag = e.tag
        -- The counts are the marts' (cdm.user_tags reads them), compared above.
        WHERE e.user_id IS NULL OR a.user_id IS NULL OR e.value IS DISTINCT FROM a.value
        UNION ALL
        -- What windowed rules count: the tag in the name columns, the category
        -- of a favourite in item_id.
        SELECT 'user_window_counters', coalesce(e.user_id, a.user_id),
               nullif(coalesce(e.category_id, a.category_id), dwh.all_orders_key()),
               e.tag, a.tag, e.order_cnt, a.order_cnt
        FROM (SELECT * FROM dwh.tag_window_counts(NULL, NULL, NULL) x
              WHERE dwh.uuid_in_part(x.user_id, part, parts)) e
        FULL JOIN (SELECT * FROM cdm.user_window_counters x
                   WHERE dwh.uuid_in_part(x.user_id, part, parts)) a
          ON a.user_id = e.user_id AND a.tag = e.tag AND a.category_id = e.category_id
        WHERE e.user_id IS NULL OR a.user_id IS NULL OR e.order_cnt <> a.order_cnt
        UNION ALL
        -- DDS against what STG implies: the table in mart, the key and values
        -- in the name columns.
        SELECT v.table_name, NULL, NULL,
               v.business_key || ': ' || coalesce(v.expected, '(no row)'),
               v.business_key || ': ' || coalesce(v.actual, '(no row)'), NULL, NULL
        FROM dwh.verify_vault(part, parts) v
        ORDER BY 1, 2, 3, 4;
        -- A long check says how far it is (client_min_messages hides it).
        IF parts > 1 THEN
            GET DIAGNOSTICS part_rows = ROW_COUNT;
            differences := differences + part_rows;
            RAISE NOTICE 'checked part % of %: % differences so far',
                part + 1, parts, differences;
        END IF;
    END LOOP;
END
$fn$;
COMMENT ON FUNCTION dwh.verify(integer) IS
    'dwh.verify() a part of the key space at a time (users for the marts and tags, orders, dishes and the other hubs'' keys for DDS), in "parts" parts: the same differences, in less temporary space; rows ordered within each part; a NOTICE as each part ends';

CREATE FUNCTION dwh.verify()
    RETURNS TABLE (mart text, user_id uuid, item_id uuid,
                   expected_name text, actual_name text,
                   expected_cnt integer, actual_cnt integer)
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT * FROM dwh.verify(1) ORDER BY 1, 2, 3, 4;
$fn$;
COMMENT ON FUNCTION dwh.verify() IS
    'Differences between the marts and the user tags and their recomputation from DDS, and between DDS and its recomputation from STG; no rows means consistent';

-- DDS and the marts recomputed from every version in STG, through the
-- same loaders as the triggers, orders by chunks of object_id.  Writers of
-- STG wait meanwhile, at the dictionary or user lock that each takes
-- before it reads or writes DDS; readers go on until the final truncation.
-- STG's tables themselves are not locked: a writer holds its table's lock
-- from the start of its statement (a menu's or a batch's upsert, a DBA's
-- INSERT) and waits for the dictionary lock after it, so a lock of STG
-- taken here, after the dictionary lock, waited for writers that waited
-- for the rebuild: a deadlock, PostgreSQL cancelling one of the two
-- (often the rebuild, after its check of DDS: a batch waiting since then
-- had looked for a deadlock while there was none yet), with Kafka workers
-- running nearly every time (test/isolation/specs/rebuild_menu_tags.spec).
-- Writes that skip dwh's triggers (docs/data-rule.md) take neither lock
-- and are not waited for: rebuild again once they are done.
CREATE FUNCTION dwh.rebuild_vault(chunk integer DEFAULT 10000)
    RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    bounds record;
    object_ids bigint[];
    versions timestamp[];
    payloads jsonb[];
    named record;
    d record;
    tables regclass[] := ARRAY['dds.h_user', 'dds.h_product', 'dds.h_category',
                               'dds.h_restaurant', 'dds.h_order', 'dds.l_order_user',
                               'dds.l_order_product', 'dds.l_product_restaurant',
                               'dds.l_product_category', 'dds.s_user_names',
                               'dds.s_product_names', 'dds.product_namings',
                               'dds.s_restaurant_names', 'dds.s_order_cost',
                               'dds.s_order_status', 'cdm.user_product_counters',
                               'cdm.user_category_counters', 'cdm.user_order_counters'];
    readers text;
BEGIN
    IF chunk IS NULL THEN
        RAISE EXCEPTION 'chunk must not be null'
            USING ERRCODE = 'null_value_not_allowed',
                  HINT = 'Give the orders to load per statement, 1 or more (the default is 10000).';
    END IF;
    IF chunk < 1 THEN
        RAISE EXCEPTION 'a chunk of % orders is not possible', chunk
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Give the orders to load per statement, 1 or more (the default is 10000).';
    END IF;
    PERFORM dwh.xact_lock(dwh.dictionary_lock_key(), true);
    PERFORM dwh.xact_lock(dwh.user_lock_key(), true);
    -- A reader of DDS or the marts holds its tables until its transaction
    -- ends, and may then write: wait for the locks held here.  Waiting for
    -- its tables would be a deadlock, and the deadlock detector ended the
    -- writer.  So the tables are asked for without waiting, every 50 ms,
    -- for as long as no holder waits for this rebuild (itself, or behind
    -- sessions that do); the rebuild gives way (55P03) to one that does.
    LOOP
        BEGIN
            EXECUTE format('LOCK TABLE %s IN ACCESS EXCLUSIVE MODE NOWAIT',
                           array_to_string(tables, ', '));
            EXIT;
        EXCEPTION WHEN lock_not_available THEN
            WITH RECURSIVE waits(pid, holder) AS (
                SELECT l.pid, l.pid FROM pg_locks l
                WHERE l.granted AND l.pid <> pg_backend_pid()
                  AND l.relation = ANY (tables::oid[])
                UNION
                SELECT b, w.holder
                FROM waits w, unnest(pg_blocking_pids(w.pid)) b
                WHERE b <> pg_backend_pid()
            )
            SELECT string_agg(DISTINCT w.holder::text, ', ') INTO readers
            FROM waits w
            WHERE pg_backend_pid() = ANY (pg_blocking_pids(w.pid));
            IF readers IS NOT NULL THEN
                RAISE EXCEPTION 'could not rebuild DDS: a transaction that holds its tables waits for this rebuild'
                    USING ERRCODE = 'lock_not_available',
                          DETAIL = format('The sessions with process ids %s read DDS or the marts, and wait for the locks the rebuild holds; the rebuild gives way.',
                                          readers),
                          HINT = 'Run dwh.rebuild(vault => true) again once their transactions have ended.';
            END IF;
            PERFORM pg_sleep(0.05);
        END;
    END LOOP;
    EXECUTE format('TRUNCATE %s', array_to_string(tables, ', '));

    PERFORM dwh.load_user_versions(array_agg(object_id), array_agg(version))
    FROM dwh.user_versions;
    PERFORM dwh.load_restaurant_versions(array_agg(object_id), array_agg(version),
                                         array_agg(payload))
    FROM dwh.restaurant_versions;

    -- Every order in STG, those without a current version too (a restore
    -- that left it out).
    FOR bounds IN
        SELECT min(object_id) AS lo, max(object_id) AS hi
        FROM (SELECT object_id, (row_number() OVER (ORDER BY object_id) - 1) / chunk AS g
              FROM (SELECT object_id FROM stg.order_events
                    UNION
                    SELECT object_id FROM stg.order_event_history) o) x
        GROUP BY g ORDER BY g
    LOOP
        SELECT c.* INTO named
        FROM (SELECT array_agg(payload) AS p, array_agg(update_ts) AS v
              FROM dwh.order_versions
              WHERE object_id BETWEEN bounds.lo AND bounds.hi) x,
             dwh.claim_order_keys(x.p, x.v, true) c;

        -- Current versions first: dwh.load_new_orders() expects no DDS
        -- rows of their orders.
        SELECT array_agg(object_id), array_agg(update_ts), array_agg(payload)
        INTO object_ids, versions, payloads
        FROM stg.order_events
        WHERE object_id BETWEEN bounds.lo AND bounds.hi;
        d := dwh.load_new_orders(object_ids, versions, payloads);
        PERFORM dwh.apply_mart_deltas(d.product_users, d.products, d.product_deltas,
                                      d.category_users, d.categories, d.category_deltas,
                                      refresh_tags => false);

        PERFORM dwh.load_superseded_orders(array_agg(object_id), array_agg(update_ts),
                                           array_agg(payload))
        FROM stg.order_event_history
        WHERE object_id BETWEEN bounds.lo AND bounds.hi;

        PERFORM dwh.load_order_namings(named.ids, named.names, named.item_versions,
                                       named.first_versions);
    END LOOP;

    -- The tags, once the marts are whole again (not chunk by chunk: a
    -- count half loaded would revoke and grant again).
    IF NOT dwh.tags_restoring() THEN
        PERFORM dwh.rebuild_tags();
    END IF;
END
$fn$;
COMMENT ON FUNCTION dwh.rebuild_vault(integer) IS
    'Internal: truncate DDS and the marts and load them again from every version in STG, then recompute the user tags';

CREATE FUNCTION dwh.rebuild(vault boolean DEFAULT false,
                            OUT mart text, OUT rows_changed bigint)
    RETURNS SETOF record
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
    SET restrict_nonsystem_relation_kind = ''
AS $fn$
DECLARE
    vault_differences bigint;
    parts integer;
BEGIN
    IF vault IS NULL THEN
        RAISE EXCEPTION 'vault must not be null'
            USING ERRCODE = 'null_value_not_allowed',
                  HINT = 'Pass vault => true to recompute DDS from STG first, or false (the default) to repair the marts against DDS as it is.';
    END IF;
    IF pg_catalog.current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'the marts can only be rebuilt in a READ COMMITTED transaction'
            USING ERRCODE = '25000',
                  DETAIL = 'The rebuild must see the orders committed while it waited for the dictionary lock.';
    END IF;
    -- No order batch, dictionary change or user write runs meanwhile,
    -- nor a rule change or dwh.expire_tags(); readers go on.  In the lock
    -- order: the dictionary lock, the user lock, the tag lock.  The
    -- rebuild of DDS and its claims are later writes (src/dwh_locks.c):
    -- they go on holding these.
    PERFORM dwh.xact_lock(dwh.dictionary_lock_key(), true);
    PERFORM dwh.xact_lock(dwh.user_lock_key(), true);
    PERFORM dwh.xact_lock(dwh.tag_lock_key(), true);

    -- DDS is checked in parts of about a million orders (the planner's
    -- estimate), as dwh.verify(parts) does: the same differences in a
    -- fraction of the temporary space.
    SELECT greatest(1, ceil(c.reltuples / 1000000))::integer INTO parts
    FROM pg_catalog.pg_class c WHERE c.oid = 'dds.h_order'::pg_catalog.regclass;
    SELECT count(*) INTO vault_differences
    FROM pg_catalog.generate_series(0, parts - 1) part,
         dwh.verify_vault(part, parts) v;
    IF vault THEN
        IF vault_differences > 0 THEN
            PERFORM dwh.rebuild_vault();
        END IF;
        mart := 'dds';
        rows_changed := vault_differences;
        RETURN NEXT;
    ELSIF vault_differences > 0 THEN
        RAISE NOTICE 'DDS differs from what STG implies in % rows; not repaired',
            vault_differences
            USING DETAIL = 'SELECT * FROM dwh.verify_vault() lists them. The marts are repaired against DDS as it is.',
                  HINT = 'SELECT * FROM dwh.rebuild(vault => true) recomputes DDS and the marts from STG; rows that STG does not imply are dropped.';
    END IF;

    LOCK TABLE cdm.user_product_counters, cdm.user_category_counters,
               cdm.user_order_counters
        IN SHARE ROW EXCLUSIVE MODE;

    mart := 'user_product_counters';
    WITH e AS MATERIALIZED (SELECT * FROM dwh.expected_user_product_counters),
    upsert AS (
        INSERT INTO cdm.user_product_counters AS m (user_id, product_id, product_name, order_cnt)
        SELECT user_id, product_id, coalesce(product_name, ''), order_cnt
        FROM e
        ORDER BY user_id, product_id
        ON CONFLICT (user_id, product_id) DO UPDATE
        SET product_name = EXCLUDED.product_name, order_cnt = EXCLUDED.order_cnt
        WHERE (m.product_name, m.order_cnt) IS DISTINCT FROM
              (EXCLUDED.product_name, EXCLUDED.order_cnt)
        RETURNING 1
    ),
    extra AS (
        DELETE FROM cdm.user_product_counters m
        WHERE NOT EXISTS (SELECT FROM e
                          WHERE e.user_id = m.user_id AND e.product_id = m.product_id)
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM upsert) + (SELECT count(*) FROM extra) INTO rows_changed;
    RETURN NEXT;

    mart := 'user_category_counters';
    WITH e AS MATERIALIZED (SELECT * FROM dwh.expected_user_category_counters),
    upsert AS (
        INSERT INTO cdm.user_category_counters AS m (user_id, category_id, category_name, order_cnt)
        SELECT user_id, category_id, category_name, order_cnt
        FROM e
        ORDER BY user_id, category_id
        ON CONFLICT (user_id, category_id) DO UPDATE
        SET category_name = EXCLUDED.category_name, order_cnt = EXCLUDED.order_cnt
        WHERE (m.category_name, m.order_cnt) IS DISTINCT FROM
              (EXCLUDED.category_name, EXCLUDED.order_cnt)
        RETURNING 1
    ),
    extra AS (
        DELETE FROM cdm.user_category_counters m
        WHERE NOT EXISTS (SELECT FROM e
                          WHERE e.user_id = m.user_id AND e.category_id = m.category_id)
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM upsert) + (SELECT count(*) FROM extra) INTO rows_changed;
    RETURN NEXT;

    mart := 'user_order_counters';
    WITH e AS MATERIALIZED (SELECT * FROM dwh.expected_user_order_counters),
    upsert AS (
        INSERT INTO cdm.user_order_counters AS m (user_id, order_cnt)
        SELECT user_id, order_cnt
        FROM e
        ORDER BY user_id
        ON CONFLICT (user_id) DO UPDATE
        SET order_cnt = EXCLUDED.order_cnt
        WHERE m.order_cnt <> EXCLUDED.order_cnt
        RETURNING 1
    ),
    extra AS (
        DELETE FROM cdm.user_order_counters m
        WHERE NOT EXISTS (SELECT FROM e WHERE e.user_id = m.user_id)
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM upsert) + (SELECT count(*) FROM extra) INTO rows_changed;
    RETURN NEXT;

    -- What windowed rules count, which dwh.rebuild_tags() below recounts:
    -- the rows it changes, counted first as dwh.verify() finds them.
    mart := 'user_window_counters';
    SELECT count(*) INTO rows_changed
    FROM dwh.tag_window_counts(NULL, NULL, NULL) e
    FULL JOIN cdm.user_window_counters a
      ON a.user_id = e.user_id AND a.tag = e.tag AND a.category_id = e.category_id
    WHERE e.user_id IS NULL OR a.user_id IS NULL OR e.order_cnt <> a.order_cnt;
    RETURN NEXT;

    -- The tags of the marts repaired: rows_changed counts the grant and
    -- revoke events written.
    mart := 'user_tags';
    rows_changed := dwh.rebuild_tags();
    RETURN NEXT;
END
$fn$;
COMMENT ON FUNCTION dwh.rebuild(boolean) IS
    'Make the marts equal to their recomputation from DDS (with vault => true, DDS first recomputed from STG), then the user tags to their recount; returns the rows changed per mart (for user_tags: the events written)';

