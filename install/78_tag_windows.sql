-- Windowed tag counts (docs/tags.md, "Windows and dwh.expire_tags()"): the
-- keys under which their deltas travel with the category mart's, and what
-- orders count for the windowed rules, read from DDS.  The tables are in
-- install/77_tags.sql.

-- The deltas of cdm.user_window_counters travel with the category mart
-- deltas (install/30_cdm.sql), under a key per (rule, category) that no
-- category can have: a category key is a UUID version 5, in these the
-- version digit (the 13th) is f.  Hex digits 17 to 24 hold the rule's rank
-- among the windowed rules (dwh.tag_window_rules), the other 23 the
-- category's own (dwh.all_orders_key() for rules that count orders, not
-- categories), so that the tag step finds the category back by one probe of
-- dds.h_category's primary key (dwh.tag_window_category_range).  One
-- expression each, so that the planner inlines them.
CREATE FUNCTION dwh.tag_window_key(rule_rank integer, category_id uuid) RETURNS uuid
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $fn$
    SELECT (pg_catalog.substr($2::pg_catalog.text, 1, 14) OPERATOR(pg_catalog.||) 'f'
            OPERATOR(pg_catalog.||) pg_catalog.substr($2::pg_catalog.text, 16, 3)
            OPERATOR(pg_catalog.||) pg_catalog.lpad(pg_catalog.to_hex($1), 8, '0')
            OPERATOR(pg_catalog.||) pg_catalog.substr($2::pg_catalog.text, 29, 8)
           )::pg_catalog.uuid
$fn$;
COMMENT ON FUNCTION dwh.tag_window_key(integer, uuid) IS
    'Internal: the key that carries the deltas of cdm.user_window_counters for this rule (its rank among the windowed rules) and category among the category mart deltas';

CREATE FUNCTION dwh.is_tag_window_key(key uuid) RETURNS boolean
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $fn$
    SELECT pg_catalog.get_byte(pg_catalog.uuid_send($1), 6) OPERATOR(pg_catalog.>=) 240
$fn$;
COMMENT ON FUNCTION dwh.is_tag_window_key(uuid) IS
    'Internal: is this key among the category mart deltas one of dwh.tag_window_key()?';

CREATE FUNCTION dwh.tag_window_key_rank(key uuid) RETURNS integer
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $fn$
    SELECT (('x' OPERATOR(pg_catalog.||) pg_catalog.substr($1::pg_catalog.text, 20, 4)
             OPERATOR(pg_catalog.||) pg_catalog.substr($1::pg_catalog.text, 25, 4)
            )::pg_catalog.bit(32))::pg_catalog.int4
$fn$;
COMMENT ON FUNCTION dwh.tag_window_key_rank(uuid) IS
    'Internal: the rank of the windowed rule that a key of dwh.tag_window_key() carries';

-- The keys whose first 12 hex digits are the key's: the category of a key
-- is among them.
CREATE FUNCTION dwh.tag_window_category_range(key uuid, OUT low uuid, OUT high uuid)
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $fn$
    SELECT (pg_catalog.substr($1::pg_catalog.text, 1, 13)
            OPERATOR(pg_catalog.||) '-0000-0000-000000000000')::pg_catalog.uuid,
           (pg_catalog.substr($1::pg_catalog.text, 1, 13)
            OPERATOR(pg_catalog.||) '-ffff-ffff-ffffffffffff')::pg_catalog.uuid
$fn$;
COMMENT ON FUNCTION dwh.tag_window_category_range(uuid) IS
    'Internal: the range of category keys that holds the category of a key of dwh.tag_window_key()';

-- The windowed rules and their ranks, in the order of their tags.  The tag
-- lock, held shared from the making of the keys to their use, keeps the
-- rules as they are in between.
CREATE FUNCTION dwh.tag_window_rules()
    RETURNS TABLE (tag text, kind text, rule_rank integer)
    LANGUAGE sql STABLE
    SET search_path = pg_catalog, pg_temp
    AS $fn$
    SELECT r.tag, r.kind, row_number() OVER (ORDER BY r.tag COLLATE "C")::integer
    FROM dwh.tag_rules r
    WHERE r.window_days IS NOT NULL
$fn$;
COMMENT ON FUNCTION dwh.tag_window_rules() IS
    'Internal: the windowed tag rules, each with its rank in dwh.tag_window_key()';

-- What orders count for windowed rules, from DDS as the calling statement
-- sees it, per (user, rule, category) as cdm.user_window_counters keeps
-- it: the given orders (null: every order dated in a window), for the
-- given rules (null: every windowed rule).  With moved_to, only the orders
-- that leave a window when its end moves on to moved_to (dated before
-- moved_to - window_days), for the rules whose window ends before.
CREATE FUNCTION dwh.tag_window_counts(orders uuid[], rule_tags text[], moved_to timestamp)
    RETURNS TABLE (user_id uuid, tag text, category_id uuid, order_cnt integer)
    LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $fn$
#variable_conflict use_column
BEGIN
    RETURN QUERY
        WITH rule AS MATERIALIZED (
            SELECT r.tag, r.kind,
                   r.window_as_of - make_interval(days => r.window_days) AS window_start,
                   moved_to - make_interval(days => r.window_days) AS window_end,
                   dwh.hash_key(r.category_name) AS category_id,
                   dwh.hash_key(r.product_id) AS product_id
            FROM dwh.tag_rules r
            WHERE r.window_days IS NOT NULL
              AND (rule_tags IS NULL OR r.tag = ANY (rule_tags))
              AND (moved_to IS NULL OR r.window_as_of < moved_to)
        ),
        span AS MATERIALIZED (
            SELECT min(r.window_start) AS lo, max(r.window_end) AS hi FROM rule r
        ),
        -- The given orders by key (not a scan of the window filtered by
        -- them), or every order dated in a window.
        given AS MATERIALIZED (
            SELECT h.h_order_pk, h.order_dt
            FROM (SELECT DISTINCT x.pk FROM unnest(orders) AS x(pk)) x
            JOIN dds.h_order h ON h.h_order_pk = x.pk
        ),
        -- Each order's user and dishes by key (OFFSET 0: never a merge
        -- join over a whole link table, which a generic plan's estimate
        -- of the orders chose).
        closed AS MATERIALIZED (
            SELECT ou.h_user_pk AS user_id, o.h_order_pk, o.order_dt
            FROM (SELECT g.h_order_pk, g.order_dt
                  FROM given g, span s
                  WHERE orders IS NOT NULL AND g.order_dt >= s.lo
                  UNION ALL
                  SELECT h.h_order_pk, h.order_dt
                  FROM span s JOIN dds.h_order h
                    ON h.order_dt >= s.lo AND (s.hi IS NULL OR h.order_dt < s.hi)
                  WHERE orders IS NULL) o
            CROSS JOIN LATERAL (SELECT l.h_user_pk FROM dds.l_order_user l
                                WHERE l.h_order_pk = o.h_order_pk OFFSET 0) ou
            WHERE (SELECT s.status FROM dds.s_order_status s
                   WHERE s.h_order_pk = o.h_order_pk
                   ORDER BY s.load_dt DESC LIMIT 1) = 'CLOSED'
        ),
        item AS MATERIALIZED (
            SELECT c.user_id, c.h_order_pk, c.order_dt, op.h_product_pk, pc.h_category_pk
            FROM closed c
            CROSS JOIN LATERAL (SELECT l.h_product_pk FROM dds.l_order_product l
                                WHERE l.h_order_pk = c.h_order_pk OFFSET 0) op
            LEFT JOIN dds.l_product_category pc ON pc.h_product_pk = op.h_product_pk
            WHERE EXISTS (SELECT FROM rule r WHERE r.kind <> 'all_orders')
        )
        SELECT c.user_id, r.tag, dwh.all_orders_key(), count(*)::integer
        FROM rule r
        JOIN closed c ON c.order_dt >= r.window_start
                     AND (r.window_end IS NULL OR c.order_dt < r.window_end)
        WHERE r.kind = 'all_orders'
        GROUP BY c.user_id, r.tag
        UNION ALL
        SELECT k.user_id, k.tag, dwh.all_orders_key(), count(DISTINCT k.h_order_pk)::integer
        FROM (SELECT i.user_id, r.tag, i.h_order_pk
              FROM rule r
              JOIN item i ON i.h_product_pk = r.product_id
                         AND i.order_dt >= r.window_start
                         AND (r.window_end IS NULL OR i.order_dt < r.window_end)
              WHERE r.kind = 'dish'
              UNION ALL
              SELECT i.user_id, r.tag, i.h_order_pk
              FROM rule r
              JOIN item i ON i.h_category_pk = r.category_id
                         AND i.order_dt >= r.window_start
                         AND (r.window_end IS NULL OR i.order_dt < r.window_end)
              WHERE r.kind = 'category') k
        GROUP BY k.user_id, k.tag
        UNION ALL
        SELECT i.user_id, r.tag, i.h_category_pk, count(DISTINCT i.h_order_pk)::integer
        FROM rule r
        JOIN item i ON i.order_dt >= r.window_start
                   AND (r.window_end IS NULL OR i.order_dt < r.window_end)
                   AND i.h_category_pk IS NOT NULL
        WHERE r.kind = 'favourite_category'
        GROUP BY i.user_id, r.tag, i.h_category_pk;
END
$fn$;
COMMENT ON FUNCTION dwh.tag_window_counts(uuid[], text[], timestamp) IS
    'Internal: what orders count for windowed tag rules per (user, rule, category), from DDS: the given orders or every order in a window, or with moved_to those leaving the windows';

-- The windowed counts' deltas of these orders for the category mart
-- deltas: what they count now (dwh.tag_window_counts) minus what they
-- counted before (the arrays before_*, read the same way before the
-- caller changed DDS).
CREATE FUNCTION dwh.tag_window_deltas(orders uuid[],
                                      before_users uuid[], before_tags text[],
                                      before_categories uuid[], before_counts integer[],
                                      OUT users uuid[], OUT keys uuid[], OUT deltas integer[])
    LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    SELECT array_agg(x.user_id), array_agg(dwh.tag_window_key(r.rule_rank, x.category_id)),
           array_agg(x.d)
    INTO users, keys, deltas
    FROM (SELECT c.user_id, c.tag, c.category_id, sum(c.n)::integer AS d
          FROM (SELECT w.user_id, w.tag, w.category_id, w.order_cnt AS n
                FROM dwh.tag_window_counts(orders, NULL, NULL) w
                UNION ALL
                SELECT b.user_id, b.tag, b.category_id, -b.n
                FROM unnest(before_users, before_tags, before_categories, before_counts)
                     AS b(user_id, tag, category_id, n)) c
          GROUP BY c.user_id, c.tag, c.category_id
          HAVING sum(c.n) <> 0) x
    JOIN dwh.tag_window_rules() r ON r.tag = x.tag;
END
$fn$;
COMMENT ON FUNCTION dwh.tag_window_deltas(uuid[], uuid[], text[], uuid[], integer[]) IS
    'Internal: the deltas of cdm.user_window_counters that a change of these orders makes, as category mart deltas under dwh.tag_window_key()';
