-- User tags (docs/tags.md): rules that a DBA or analyst writes in
-- dwh.tag_rules, the tags they give users in cdm.user_tags, kept in the
-- transaction of the order, retraction, menu change or rule change that
-- causes them, and every grant and revoke in cdm.user_tag_events with a
-- NOTIFY on channel dwh_user_tags.  Tags are a function of the rules and of
-- the marts and DDS (all-time rules count from the marts, windowed ones
-- from DDS as of the rule's window_as_of); dwh.verify() recounts them.

-- The tag lock: order batches take it shared when they refresh the tags of
-- what they changed (step 5 of the lock order, install/40_products.sql);
-- rule changes, dwh.expire_tags() and dwh.rebuild() take it exclusive, so
-- that they recount from marts that no batch is changing underneath.
CREATE FUNCTION dwh.tag_lock_key() RETURNS bigint
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS 'SELECT 3482019573612840177::bigint';
COMMENT ON FUNCTION dwh.tag_lock_key() IS
    'Advisory lock key serialising tag rule changes, dwh.expire_tags() and dwh.rebuild() against the tag refresh of order batches';

-- A restore (pg_restore, or a script of pg_dump run by psql) sets
-- check_function_bodies off for its whole session, whatever its options
-- (row_security too, unless --enable-row-security).  It
-- brings cdm.user_tags_held and cdm.user_tag_events back as they were dumped
-- (one snapshot, consistent with the rules and STG dumped with them), so
-- while it rebuilds the marts from STG the tags are not maintained: else
-- each table restored would grant and revoke again what the dump holds.
CREATE FUNCTION dwh.tags_restoring() RETURNS boolean
    LANGUAGE sql STABLE
    AS $fn$
    SELECT pg_catalog.current_setting('check_function_bodies') = 'off'
$fn$;
COMMENT ON FUNCTION dwh.tags_restoring() IS
    'Internal: does this session restore a dump (check_function_bodies off, as pg_restore and pg_dump''s scripts set it whatever their options)? Tags are then restored, not maintained';

-- Rules: plain rows that a DBA or analyst writes.  The checks below are
-- also made by the BEFORE trigger, first, with messages that say what to
-- write instead.
CREATE TABLE dwh.tag_rules (
    tag           text PRIMARY KEY,
    kind          text NOT NULL,
    category_name text,
    product_id    text,
    threshold     integer NOT NULL DEFAULT 1,
    window_days   integer,
    window_as_of  timestamp,
    CONSTRAINT tag_rules_tag_check CHECK (tag <> '' AND length(tag) <= 200),
    CONSTRAINT tag_rules_kind_check
        CHECK (kind IN ('category', 'dish', 'all_orders', 'favourite_category')),
    CONSTRAINT tag_rules_names_check
        CHECK (CASE kind
               WHEN 'category' THEN category_name <> '' AND product_id IS NULL
               WHEN 'dish' THEN product_id <> '' AND category_name IS NULL
               ELSE category_name IS NULL AND product_id IS NULL END),
    CONSTRAINT tag_rules_threshold_check CHECK (threshold >= 1),
    CONSTRAINT tag_rules_window_days_check CHECK (window_days >= 1),
    CONSTRAINT tag_rules_window_as_of_check
        CHECK ((window_days IS NULL) = (window_as_of IS NULL))
);
COMMENT ON TABLE dwh.tag_rules IS 'User tag rules: a user holds a rule''s tag while the orders it counts reach its threshold; written with plain SQL, each change recomputes the rule''s tags';
COMMENT ON COLUMN dwh.tag_rules.tag IS 'The tag''s name (unique, 1 to 200 characters)';
COMMENT ON COLUMN dwh.tag_rules.kind IS 'What it counts: category (the user''s CLOSED orders with a dish of category_name), dish (those with the dish product_id), all_orders (all of them), favourite_category (the user''s most ordered category, the tag''s value)';
COMMENT ON COLUMN dwh.tag_rules.category_name IS 'kind category: the category''s name, as in cdm.user_category_counters.category_name and dds.h_category (compared byte by byte); it may not be known yet';
COMMENT ON COLUMN dwh.tag_rules.product_id IS 'kind dish: the dish''s id in the orders and menus (dds.h_product.product_id); it may not be known yet';
COMMENT ON COLUMN dwh.tag_rules.threshold IS 'At least this many orders (1 or more): for favourite_category, in the favourite category';
COMMENT ON COLUMN dwh.tag_rules.window_days IS 'Count only the orders whose order time (payload.date, UTC) lies within this many days (1 or more) before window_as_of; null: all of them';
COMMENT ON COLUMN dwh.tag_rules.window_as_of IS 'Set by dwh, not by the rule''s writer: the UTC time that windowed counts end at, set when the rule is written and moved on by dwh.expire_tags(); null without a window';

-- Tags: one row per user and tag held, written only when a tag is
-- granted, revoked or its value changes; what the rule counts now is read
-- from the counts by the view cdm.user_tags (below), so that an order that
-- moves a count without crossing a threshold writes no tag row.
CREATE TABLE cdm.user_tags_held (
    user_id     uuid NOT NULL,
    tag         text NOT NULL,
    value       text,
    since       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, tag)
);
-- "Who holds tag X"; a rule change reads its holders.
CREATE INDEX user_tags_held_tag_idx ON cdm.user_tags_held (tag);
COMMENT ON TABLE cdm.user_tags_held IS 'The user tags held: a row per user and tag while the user meets the rule of dwh.tag_rules (read cdm.user_tags, which adds the count)';
COMMENT ON COLUMN cdm.user_tags_held.user_id IS 'The user: dds.h_user.h_user_pk';
COMMENT ON COLUMN cdm.user_tags_held.tag IS 'The tag (dwh.tag_rules.tag)';
COMMENT ON COLUMN cdm.user_tags_held.value IS 'favourite_category: the user''s most ordered category (the smallest name, byte by byte, among equals); null for the other kinds';
COMMENT ON COLUMN cdm.user_tags_held.since IS 'When the tag was granted (with its current value): the time of the granting transaction, a load-time column';

-- The change feed: every grant and revoke, in the transaction that makes
-- it.  Ids grow in commit order for each (user, tag) (docs/tags.md).
CREATE TABLE cdm.user_tag_events (
    id          bigserial PRIMARY KEY,
    user_id     uuid NOT NULL,
    tag         text NOT NULL,
    value       text,
    kind        text NOT NULL CHECK (kind IN ('grant', 'revoke')),
    order_cnt   integer NOT NULL,
    at          timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE cdm.user_tag_events IS 'Every grant and revoke of a user tag, written in the transaction that makes it; each is also notified on channel dwh_user_tags';
COMMENT ON COLUMN cdm.user_tag_events.id IS 'The event''s id: unique, and growing in commit order for each user and tag';
COMMENT ON COLUMN cdm.user_tag_events.user_id IS 'The user: dds.h_user.h_user_pk';
COMMENT ON COLUMN cdm.user_tag_events.tag IS 'The tag';
COMMENT ON COLUMN cdm.user_tag_events.value IS 'favourite_category: the category granted or revoked; null for the other kinds';
COMMENT ON COLUMN cdm.user_tag_events.kind IS 'grant or revoke (a favourite category that changes: a revoke of the old one, then a grant of the new one)';
COMMENT ON COLUMN cdm.user_tag_events.order_cnt IS 'The orders the rule counts for the user after the change';
COMMENT ON COLUMN cdm.user_tag_events.at IS 'The time of the transaction that made the change';

-- The outbox of the Kafka feed (docs/tags.md, "The Kafka feed"): one row
-- per event that the tags worker has still to produce, written in the
-- transaction of the event while dwh.tags_topic names a topic, deleted by
-- the worker once the broker has acknowledged the event.  No foreign key:
-- a restore loads the two tables in any order.
CREATE TABLE dwh.tag_outbox (
    event_id    bigint PRIMARY KEY
);
COMMENT ON TABLE dwh.tag_outbox IS 'User tag events not yet acknowledged by the Kafka broker of dwh.tags_topic: written with each event while the setting names a topic, deleted by the tags worker once the broker has the event';
COMMENT ON COLUMN dwh.tag_outbox.event_id IS 'The event to produce (cdm.user_tag_events.id)';

-- Windowed rules read a user's orders by date: the orders of a user, and
-- the orders of a time (dwh.expire_tags, a rule's recount).
CREATE INDEX l_order_user_h_user_pk_idx ON dds.l_order_user (h_user_pk);
CREATE INDEX h_order_order_dt_idx ON dds.h_order (order_dt);

-- What windowed rules count, kept like the marts: for each windowed rule,
-- each user's CLOSED orders that the rule counts, dated from window_as_of -
-- window_days on (a favourite_category rule: per category).  A batch adds
-- what its orders count now minus what they counted before (computed with
-- the tag lock held shared, so that no window moves meanwhile: see
-- dwh.order_events_changed); dwh.expire_tags() takes away the orders that
-- leave a window; a rule change recounts its rows.  So a windowed tag costs
-- a batch what an all-time one does: no recount of the user's orders.
CREATE TABLE cdm.user_window_counters (
    user_id     uuid NOT NULL,
    tag         text NOT NULL,
    category_id uuid NOT NULL,
    order_cnt   integer NOT NULL CHECK (order_cnt >= 0),
    PRIMARY KEY (user_id, tag, category_id)
) WITH (fillfactor = 80);
-- A rule change deletes and recounts its rows.
CREATE INDEX user_window_counters_tag_idx ON cdm.user_window_counters (tag);
COMMENT ON TABLE cdm.user_window_counters IS 'What each windowed tag rule counts per user: the user''s CLOSED orders dated within the rule''s window (as of its window_as_of) that the rule counts; a row exists while its order_cnt is positive';
COMMENT ON COLUMN cdm.user_window_counters.user_id IS 'The user: dds.h_user.h_user_pk';
COMMENT ON COLUMN cdm.user_window_counters.tag IS 'The windowed rule (dwh.tag_rules.tag)';
COMMENT ON COLUMN cdm.user_window_counters.category_id IS 'favourite_category rules: the category (dds.h_category.h_category_pk); other rules: dwh.all_orders_key()';
COMMENT ON COLUMN cdm.user_window_counters.order_cnt IS 'The user''s CLOSED orders in the window that the rule counts (in the category, for favourite_category)';

-- The tags with what their rules count now: one key read per tag, from the
-- mart or windowed count that the rule counts (for a favourite, in its
-- category).
CREATE VIEW cdm.user_tags AS
SELECT h.user_id, h.tag, h.value,
       coalesce(CASE
                WHEN r.window_days IS NOT NULL THEN
                    (SELECT w.order_cnt FROM cdm.user_window_counters w
                     WHERE w.user_id = h.user_id AND w.tag = h.tag
                       AND w.category_id = CASE WHEN r.kind = 'favourite_category'
                                                THEN dwh.hash_key(h.value)
                                                ELSE dwh.all_orders_key() END)
                WHEN r.kind = 'category' THEN
                    (SELECT m.order_cnt FROM cdm.user_category_counters m
                     WHERE m.user_id = h.user_id
                       AND m.category_id = dwh.hash_key(r.category_name))
                WHEN r.kind = 'favourite_category' THEN
                    (SELECT m.order_cnt FROM cdm.user_category_counters m
                     WHERE m.user_id = h.user_id AND m.category_id = dwh.hash_key(h.value))
                WHEN r.kind = 'dish' THEN
                    (SELECT m.order_cnt FROM cdm.user_product_counters m
                     WHERE m.user_id = h.user_id AND m.product_id = dwh.hash_key(r.product_id))
                ELSE
                    (SELECT m.order_cnt FROM cdm.user_order_counters m
                     WHERE m.user_id = h.user_id)
                END, 0) AS order_cnt,
       h.since
FROM cdm.user_tags_held h
LEFT JOIN dwh.tag_rules r ON r.tag = h.tag;
COMMENT ON VIEW cdm.user_tags IS 'User tags: a row per user and tag while the user meets the rule of dwh.tag_rules, with what the rule counts now';
COMMENT ON COLUMN cdm.user_tags.user_id IS 'The user: dds.h_user.h_user_pk';
COMMENT ON COLUMN cdm.user_tags.tag IS 'The tag (dwh.tag_rules.tag)';
COMMENT ON COLUMN cdm.user_tags.value IS 'favourite_category: the user''s most ordered category (the smallest name, byte by byte, among equals); null for the other kinds';
COMMENT ON COLUMN cdm.user_tags.order_cnt IS 'The orders the rule counts for the user now (at least its threshold): read from the marts or cdm.user_window_counters';
COMMENT ON COLUMN cdm.user_tags.since IS 'When the tag was granted (with its current value): the time of the granting transaction, a load-time column';

-- The deltas of cdm.user_window_counters travel with the category mart
-- deltas (install/30_cdm.sql), under a key per (rule, category) that no
-- category can have: a category key is a UUID version 5, these are
-- ffffffff-ffff-0xxx-xxxx-xxxxxxxxxxxx, the rest from an MD5 of the rule's
-- tag and the category (one expression, so that the planner inlines it).
-- The tag step finds the rule and category back by computing the keys of
-- the windowed rules.
CREATE FUNCTION dwh.tag_window_key(tag text, category_id uuid) RETURNS uuid
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $fn$
    SELECT ('ffffffffffff0' || pg_catalog.substr(pg_catalog.md5($1 || '/' || $2::text), 1, 19))::uuid
$fn$;
COMMENT ON FUNCTION dwh.tag_window_key(text, uuid) IS
    'Internal: the key that carries the deltas of cdm.user_window_counters for this rule and category among the category mart deltas';

CREATE FUNCTION dwh.is_tag_window_key(key uuid) RETURNS boolean
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $fn$
    SELECT $1 >= 'ffffffff-ffff-0000-0000-000000000000'::uuid
       AND $1 <= 'ffffffff-ffff-0fff-ffff-ffffffffffff'::uuid
$fn$;
COMMENT ON FUNCTION dwh.is_tag_window_key(uuid) IS
    'Internal: is this key among the category mart deltas one of dwh.tag_window_key()?';

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
    SELECT array_agg(x.user_id), array_agg(dwh.tag_window_key(x.tag, x.category_id)),
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
          HAVING sum(c.n) <> 0) x;
END
$fn$;
COMMENT ON FUNCTION dwh.tag_window_deltas(uuid[], uuid[], text[], uuid[], integer[]) IS
    'Internal: the deltas of cdm.user_window_counters that a change of these orders makes, as category mart deltas under dwh.tag_window_key()';

-- What each (user, tag) pair counts now, and whether the tag is held:
-- all-time rules from the marts, windowed ones from
-- cdm.user_window_counters; a pair whose tag has no rule counts nothing.
-- One row per pair, each count read by key (OFFSET 0: one index probe per
-- pair, whatever the planner believes of the tables' sizes, which a batch
-- never analyzes); each rule's keys are computed once, not per pair.
CREATE FUNCTION dwh.tags_due(users uuid[], tags text[])
    RETURNS TABLE (user_id uuid, tag text, value text, order_cnt integer, held boolean)
    LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $fn$
#variable_conflict use_column
BEGIN
    RETURN QUERY
        WITH rule AS MATERIALIZED (
            SELECT r.tag, r.kind, r.threshold, r.window_days IS NOT NULL AS windowed,
                   dwh.hash_key(r.category_name) AS category_id,
                   dwh.hash_key(r.product_id) AS product_id
            FROM dwh.tag_rules r
        ),
        pair AS MATERIALIZED (
            SELECT p.user_id, p.tag, r.kind, r.windowed, r.threshold, r.category_id, r.product_id
            FROM (SELECT DISTINCT p.user_id, p.tag FROM unnest(users, tags) AS p(user_id, tag)) p
            LEFT JOIN rule r ON r.tag = p.tag
        ),
        counted AS (
            SELECT p.user_id, p.tag, NULL::text AS value, c.order_cnt, p.threshold
            FROM pair p
            LEFT JOIN LATERAL (SELECT m.order_cnt FROM cdm.user_category_counters m
                               WHERE m.user_id = p.user_id AND m.category_id = p.category_id
                               OFFSET 0) c ON true
            WHERE p.kind = 'category' AND NOT p.windowed
            UNION ALL
            SELECT p.user_id, p.tag, NULL, c.order_cnt, p.threshold
            FROM pair p
            LEFT JOIN LATERAL (SELECT m.order_cnt FROM cdm.user_product_counters m
                               WHERE m.user_id = p.user_id AND m.product_id = p.product_id
                               OFFSET 0) c ON true
            WHERE p.kind = 'dish' AND NOT p.windowed
            UNION ALL
            SELECT p.user_id, p.tag, NULL, c.order_cnt, p.threshold
            FROM pair p
            LEFT JOIN LATERAL (SELECT m.order_cnt FROM cdm.user_order_counters m
                               WHERE m.user_id = p.user_id
                               OFFSET 0) c ON true
            WHERE p.kind = 'all_orders' AND NOT p.windowed
            UNION ALL
            SELECT p.user_id, p.tag, c.category_name, c.order_cnt, p.threshold
            FROM pair p
            LEFT JOIN LATERAL (SELECT m.category_name::text AS category_name, m.order_cnt
                               FROM cdm.user_category_counters m
                               WHERE m.user_id = p.user_id
                               ORDER BY m.order_cnt DESC, m.category_name COLLATE "C"
                               LIMIT 1) c ON true
            WHERE p.kind = 'favourite_category' AND NOT p.windowed
            UNION ALL
            SELECT p.user_id, p.tag, NULL, c.order_cnt, p.threshold
            FROM pair p
            LEFT JOIN LATERAL (SELECT w.order_cnt FROM cdm.user_window_counters w
                               WHERE w.user_id = p.user_id AND w.tag = p.tag
                                 AND w.category_id = dwh.all_orders_key()
                               OFFSET 0) c ON true
            WHERE p.kind <> 'favourite_category' AND p.windowed
            UNION ALL
            SELECT p.user_id, p.tag, c.category_name, c.order_cnt, p.threshold
            FROM pair p
            LEFT JOIN LATERAL (SELECT h.category_name::text AS category_name, w.order_cnt
                               FROM cdm.user_window_counters w
                               JOIN dds.h_category h ON h.h_category_pk = w.category_id
                               WHERE w.user_id = p.user_id AND w.tag = p.tag
                               ORDER BY w.order_cnt DESC, h.category_name COLLATE "C"
                               LIMIT 1) c ON true
            WHERE p.kind = 'favourite_category' AND p.windowed
            UNION ALL
            SELECT p.user_id, p.tag, NULL, NULL, NULL
            FROM pair p
            WHERE p.kind IS NULL
        )
        SELECT c.user_id, c.tag, c.value, coalesce(c.order_cnt, 0),
               coalesce(c.order_cnt >= c.threshold, false)
        FROM counted c;
END
$fn$;
COMMENT ON FUNCTION dwh.tags_due(uuid[], text[]) IS
    'Internal: for each of these (user, tag) pairs, what its rule counts now (from the marts, or cdm.user_window_counters for windowed rules) and whether the tag is held';

-- Does the Kafka feed take events?  While dwh.tags_topic names a topic
-- (a setting of the tags worker; a value of postgresql.conf reads here
-- even where the library is not loaded), each event also goes to
-- dwh.tag_outbox.  Without a topic nothing is queued, so nothing grows.
CREATE FUNCTION dwh.tag_feed_on() RETURNS boolean
    LANGUAGE sql STABLE
    AS $fn$
    SELECT coalesce(pg_catalog.current_setting('dwh.tags_topic', true), '') <> ''
$fn$;
COMMENT ON FUNCTION dwh.tag_feed_on() IS
    'Internal: does dwh.tags_topic name a topic, so that tag events are queued in dwh.tag_outbox for the tags worker?';

-- Wake the tags worker when this transaction commits: it produces what
-- the transaction queued at once instead of at its next look (a second).
CREATE FUNCTION dwh.tag_feed_wake() RETURNS void
    AS 'MODULE_PATHNAME', 'dwh_tag_feed_wake'
    LANGUAGE C VOLATILE;
COMMENT ON FUNCTION dwh.tag_feed_wake() IS
    'Internal: wake the tags worker when the current transaction commits (it queued tag events for Kafka)';

-- Make the tags of these (user, tag) pairs what their rules say now:
-- revoke, grant, move a favourite to another category; write an event for
-- each grant and revoke, in (user, tag) order, notify it, and queue it for
-- Kafka while the feed is on (dwh.tag_outbox, in the event's own
-- transaction, so that the two commit together).  The caller holds what
-- keeps the pairs' users still: the tag lock exclusive, or, shared, the
-- users' rows of cdm.user_order_counters.  Returns the events written.
CREATE FUNCTION dwh.refresh_user_tags(users uuid[], tags text[])
    RETURNS integer
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    written integer;
    to_produce integer;
BEGIN
    IF users IS NULL THEN
        RETURN 0;
    END IF;

    -- What each pair counts now against the tag it holds (read by key).
    WITH due AS MATERIALIZED (
        SELECT * FROM dwh.tags_due(users, tags)
    ),
    change AS MATERIALIZED (
        SELECT d.user_id, d.tag, h.value AS old_value, d.value AS new_value,
               d.order_cnt AS new_cnt, h.user_id IS NOT NULL AS was_held, d.held AS is_held
        FROM due d
        LEFT JOIN LATERAL (SELECT t.user_id, t.value
                           FROM cdm.user_tags_held t
                           WHERE t.user_id = d.user_id AND t.tag = d.tag) h ON true
        WHERE (h.user_id IS NOT NULL) <> d.held
           OR (h.user_id IS NOT NULL AND d.held AND h.value IS DISTINCT FROM d.value)
    ),
    revoked AS (
        DELETE FROM cdm.user_tags_held t
        USING change c
        WHERE t.user_id = c.user_id AND t.tag = c.tag AND c.was_held AND NOT c.is_held
    ),
    moved AS (
        UPDATE cdm.user_tags_held t
        SET value = c.new_value, since = now()
        FROM change c
        WHERE t.user_id = c.user_id AND t.tag = c.tag AND c.was_held AND c.is_held
    ),
    granted AS (
        INSERT INTO cdm.user_tags_held (user_id, tag, value)
        SELECT c.user_id, c.tag, c.new_value
        FROM change c
        WHERE NOT c.was_held AND c.is_held
        ORDER BY c.user_id, c.tag
    ),
    event AS (
        INSERT INTO cdm.user_tag_events (user_id, tag, value, kind, order_cnt)
        SELECT e.user_id, e.tag, e.value, e.kind, e.order_cnt
        FROM (SELECT c.user_id, c.tag, c.old_value AS value, 'revoke' AS kind,
                     c.new_cnt AS order_cnt, 1 AS step
              FROM change c
              WHERE c.was_held AND (NOT c.is_held OR c.old_value IS DISTINCT FROM c.new_value)
              UNION ALL
              SELECT c.user_id, c.tag, c.new_value, 'grant', c.new_cnt, 2
              FROM change c
              WHERE c.is_held AND (NOT c.was_held OR c.old_value IS DISTINCT FROM c.new_value)) e
        ORDER BY e.user_id, e.tag, e.step
        RETURNING id, user_id, tag, kind
    ),
    queued AS (
        INSERT INTO dwh.tag_outbox (event_id)
        SELECT e.id FROM event e
        WHERE dwh.tag_feed_on()
        RETURNING event_id
    )
    SELECT count(*)::integer, (SELECT count(*) FROM queued)::integer
    INTO written, to_produce
    FROM (SELECT e.id, e.user_id, e.tag, e.kind FROM event e ORDER BY e.id) e
    CROSS JOIN LATERAL pg_notify('dwh_user_tags',
                                 json_build_object('id', e.id, 'user_id', e.user_id,
                                                   'tag', e.tag, 'kind', e.kind)::text) n;
    IF to_produce > 0 THEN
        PERFORM dwh.tag_feed_wake();
    END IF;
    RETURN written;
END
$fn$;
COMMENT ON FUNCTION dwh.refresh_user_tags(uuid[], text[]) IS
    'Internal: make the tags of these (user, tag) pairs what their rules say now, writing and notifying an event per grant and revoke; returns the events written';

-- The (user, rule) pairs of all-time dish or category rules (kind) whose
-- count crossed the rule's threshold: the mart rows moved_users/moved_keys
-- now count moved_counts, having changed by the delta of the same key in
-- users/keys/deltas.  Only these can gain or lose the tag: the tags held
-- are what the counts before said (they are kept in the same transactions
-- as the counts, and dwh.verify() checks it).  No nested loop: a plan
-- made for arrays of unknown length (10 rows, it guesses) joins the two
-- arrays of a batch, some thousand elements each, by comparing every
-- pair.
CREATE FUNCTION dwh.tags_crossed(kind text, users uuid[], keys uuid[], deltas integer[],
                                 moved_users uuid[], moved_keys uuid[],
                                 moved_counts integer[])
    RETURNS TABLE (user_id uuid, tag text)
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
    SET enable_nestloop = off
AS $fn$
    SELECT m.user_id, r.tag
    FROM (SELECT r.tag, r.threshold,
                 CASE r.kind WHEN 'dish' THEN dwh.hash_key(r.product_id)
                             ELSE dwh.hash_key(r.category_name) END AS key
          FROM dwh.tag_rules r
          WHERE r.kind = tags_crossed.kind AND r.window_days IS NULL) r
    JOIN unnest(moved_users, moved_keys, moved_counts) AS m(user_id, key, order_cnt)
      ON m.key = r.key
    JOIN unnest(users, keys, deltas) AS d(user_id, key, d)
      ON d.user_id = m.user_id AND d.key = m.key
    WHERE (m.order_cnt - d.d >= r.threshold) <> (m.order_cnt >= r.threshold)
$fn$;
COMMENT ON FUNCTION dwh.tags_crossed(text, uuid[], uuid[], integer[], uuid[], uuid[], integer[]) IS
    'Internal: the (user, tag) pairs of all-time rules of this kind (dish or category) whose count crossed the threshold, from the mart rows written and their deltas';

-- Step 5 of the lock order, after the marts of dishes and categories (see
-- dwh.apply_mart_deltas): the users' CLOSED order counts, then, with some
-- rule (tagging), the windowed counts and the tags that the batch may
-- change: the pairs whose count crossed its threshold (crossed_users and
-- crossed_tags for dish and category rules; all_orders and windowed rules
-- here, from the counts written), and the favourite categories of the
-- users with a category delta (category_users) or a windowed one.  With
-- some rule, the rows of every user touched are locked first, in key
-- order: they stand for the users, so that two batches changing orders of
-- one user refresh its tags one after the other, each from what the other
-- committed.  The caller holds the tag lock shared.
CREATE FUNCTION dwh.apply_order_deltas_and_tags(order_users uuid[], order_deltas integer[],
                                                touched uuid[], category_users uuid[],
                                                window_users uuid[], window_keys uuid[],
                                                window_deltas integer[],
                                                tagging boolean,
                                                crossed_users uuid[], crossed_tags text[])
    RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    zero_users uuid[];
    zero_tags text[];
    zero_categories uuid[];
    moved_users uuid[];
    moved_counts integer[];
    window_pair_users uuid[];
    window_pair_tags text[];
    pair_users uuid[];
    pair_tags text[];
BEGIN
    IF order_users IS NULL AND touched IS NULL AND category_users IS NULL
       AND window_keys IS NULL AND crossed_users IS NULL THEN
        RETURN;
    END IF;

    IF tagging OR EXISTS (SELECT FROM unnest(order_deltas) d WHERE d < 0) THEN
        PERFORM FROM cdm.user_order_counters m
        WHERE m.user_id IN (SELECT x.user_id
                            FROM unnest(order_users, order_deltas) AS x(user_id, d)
                            WHERE x.d < 0
                            UNION
                            SELECT t.user_id FROM unnest(touched) AS t(user_id)
                            WHERE tagging)
        ORDER BY m.user_id
        FOR UPDATE;
    END IF;

    IF order_users IS NOT NULL THEN
        WITH delta AS MATERIALIZED (
            SELECT x.user_id, sum(x.d)::integer AS d
            FROM unnest(order_users, order_deltas) AS x(user_id, d)
            GROUP BY x.user_id
            HAVING sum(x.d) <> 0
        ),
        up AS (
            INSERT INTO cdm.user_order_counters AS m (user_id, order_cnt)
            SELECT d.user_id, d.d
            FROM delta d
            WHERE d.d > 0
            ORDER BY d.user_id
            ON CONFLICT (user_id) DO UPDATE
            SET order_cnt = m.order_cnt + EXCLUDED.order_cnt
            RETURNING m.user_id, m.order_cnt
        ),
        down AS (
            UPDATE cdm.user_order_counters m
            SET order_cnt = m.order_cnt + d.d
            FROM delta d
            WHERE d.d < 0 AND m.user_id = d.user_id
            RETURNING m.user_id, m.order_cnt
        ),
        moved AS (
            SELECT * FROM up
            UNION ALL
            SELECT * FROM down
        )
        SELECT array_agg(user_id) FILTER (WHERE order_cnt = 0),
               array_agg(user_id) FILTER (WHERE tagging),
               array_agg(order_cnt) FILTER (WHERE tagging)
        INTO zero_users, moved_users, moved_counts
        FROM moved;

        IF zero_users IS NOT NULL THEN
            DELETE FROM cdm.user_order_counters m
            WHERE m.user_id = ANY (zero_users) AND m.order_cnt = 0;
        END IF;
    END IF;

    IF NOT tagging THEN
        RETURN;
    END IF;

    -- The windowed counts: each key found back among the windowed rules'
    -- (a favourite's, one per category).  The users' rows are locked.
    IF window_keys IS NOT NULL THEN
        WITH window_key AS MATERIALIZED (
            SELECT r.tag, c.category_id, dwh.tag_window_key(r.tag, c.category_id) AS key
            FROM dwh.tag_rules r
            CROSS JOIN LATERAL (SELECT dwh.all_orders_key() AS category_id
                                WHERE r.kind <> 'favourite_category'
                                UNION ALL
                                SELECT h.h_category_pk FROM dds.h_category h
                                WHERE r.kind = 'favourite_category') c
            WHERE r.window_days IS NOT NULL
        ),
        delta AS MATERIALIZED (
            SELECT x.user_id, k.tag, k.category_id, sum(x.d)::integer AS d
            FROM unnest(window_users, window_keys, window_deltas) AS x(user_id, key, d)
            JOIN window_key k ON k.key = x.key
            GROUP BY x.user_id, k.tag, k.category_id
            HAVING sum(x.d) <> 0
        ),
        up AS (
            INSERT INTO cdm.user_window_counters AS m (user_id, tag, category_id, order_cnt)
            SELECT d.user_id, d.tag, d.category_id, d.d
            FROM delta d
            WHERE d.d > 0
            ORDER BY d.user_id, d.tag, d.category_id
            ON CONFLICT (user_id, tag, category_id) DO UPDATE
            SET order_cnt = m.order_cnt + EXCLUDED.order_cnt
        ),
        down AS (
            UPDATE cdm.user_window_counters m
            SET order_cnt = m.order_cnt + d.d
            FROM delta d
            WHERE d.d < 0 AND m.user_id = d.user_id AND m.tag = d.tag
              AND m.category_id = d.category_id
            RETURNING m.user_id, m.tag, m.category_id, m.order_cnt
        ),
        zero AS MATERIALIZED (
            SELECT z.user_id, z.tag, z.category_id FROM down z WHERE z.order_cnt = 0
        ),
        -- A favourite may move with any of its counts; a threshold rule
        -- changes only where its count crossed the threshold.  The counts
        -- before are read by key, as this statement's snapshot has them
        -- (the users' rows are locked: no other batch changes them).
        pair AS MATERIALIZED (
            SELECT DISTINCT d.user_id, d.tag
            FROM delta d
            JOIN dwh.tag_rules r ON r.tag = d.tag
            LEFT JOIN LATERAL (SELECT w.order_cnt FROM cdm.user_window_counters w
                               WHERE r.kind <> 'favourite_category'
                                 AND w.user_id = d.user_id AND w.tag = d.tag
                                 AND w.category_id = d.category_id
                               OFFSET 0) b ON true
            WHERE r.kind = 'favourite_category'
               OR (coalesce(b.order_cnt, 0) >= r.threshold)
                  <> (coalesce(b.order_cnt, 0) + d.d >= r.threshold)
        )
        SELECT (SELECT array_agg(z.user_id) FROM zero z),
               (SELECT array_agg(z.tag) FROM zero z),
               (SELECT array_agg(z.category_id) FROM zero z),
               (SELECT array_agg(p.user_id) FROM pair p),
               (SELECT array_agg(p.tag) FROM pair p)
        INTO zero_users, zero_tags, zero_categories, window_pair_users, window_pair_tags;

        IF zero_users IS NOT NULL THEN
            DELETE FROM cdm.user_window_counters m
            USING unnest(zero_users, zero_tags, zero_categories) AS z(user_id, tag, category_id)
            WHERE m.user_id = z.user_id AND m.tag = z.tag AND m.category_id = z.category_id
              AND m.order_cnt = 0;
        END IF;
    END IF;

    -- The pairs whose tag may change: the crossings, and the favourites.
    WITH pair AS (
        SELECT c.user_id, c.tag
        FROM unnest(crossed_users, crossed_tags) AS c(user_id, tag)
        UNION
        SELECT m.user_id, r.tag
        FROM unnest(moved_users, moved_counts) AS m(user_id, order_cnt)
        JOIN (SELECT x.user_id, sum(x.d)::integer AS d
              FROM unnest(order_users, order_deltas) AS x(user_id, d)
              GROUP BY x.user_id) d USING (user_id)
        JOIN dwh.tag_rules r ON r.kind = 'all_orders' AND r.window_days IS NULL
        WHERE (m.order_cnt - d.d >= r.threshold) <> (m.order_cnt >= r.threshold)
        UNION
        SELECT c.user_id, r.tag
        FROM (SELECT DISTINCT c.user_id FROM unnest(category_users) AS c(user_id)) c
        JOIN dwh.tag_rules r ON r.kind = 'favourite_category' AND r.window_days IS NULL
        UNION
        SELECT w.user_id, w.tag
        FROM unnest(window_pair_users, window_pair_tags) AS w(user_id, tag)
    )
    SELECT array_agg(p.user_id ORDER BY p.user_id, p.tag),
           array_agg(p.tag ORDER BY p.user_id, p.tag)
    INTO pair_users, pair_tags
    FROM pair p;

    PERFORM dwh.refresh_user_tags(pair_users, pair_tags);
END
$fn$;
COMMENT ON FUNCTION dwh.apply_order_deltas_and_tags(uuid[], integer[], uuid[], uuid[], uuid[], uuid[], integer[], boolean, uuid[], text[]) IS
    'Internal: apply the users'' CLOSED order count deltas to cdm.user_order_counters, in key order, then, with some rule, the windowed count deltas and the tags that they and the crossings of the dish and category marts change';

-- Every tag of these rules recomputed (a rule written, changed or
-- dropped, or all of them: dwh.rebuild_tags): the windowed counts of the
-- rules recounted from the orders dated in the window, then the pairs of
-- the users that hold the tag, and of those that could: all-time rules
-- from the marts, windowed ones from their counts.  The caller holds the
-- tag lock exclusive.
CREATE FUNCTION dwh.recompute_rule_tags(rule_tags text[])
    RETURNS integer
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    pair_users uuid[];
    pair_tags text[];
BEGIN
    DELETE FROM cdm.user_window_counters w WHERE w.tag = ANY (rule_tags);
    INSERT INTO cdm.user_window_counters (user_id, tag, category_id, order_cnt)
    SELECT w.user_id, w.tag, w.category_id, w.order_cnt
    FROM dwh.tag_window_counts(NULL, rule_tags, NULL) w
    ORDER BY w.user_id, w.tag, w.category_id;

    WITH rule AS MATERIALIZED (
        SELECT r.tag, r.kind, r.threshold, r.window_days IS NOT NULL AS windowed,
               dwh.hash_key(r.category_name) AS category_id,
               dwh.hash_key(r.product_id) AS product_id
        FROM dwh.tag_rules r
        WHERE r.tag = ANY (rule_tags)
    ),
    pair AS (
        SELECT t.user_id, t.tag FROM cdm.user_tags_held t WHERE t.tag = ANY (rule_tags)
        UNION
        SELECT m.user_id, r.tag
        FROM rule r
        JOIN cdm.user_category_counters m ON m.category_id = r.category_id
        WHERE r.kind = 'category' AND NOT r.windowed AND m.order_cnt >= r.threshold
        UNION
        SELECT m.user_id, r.tag
        FROM rule r
        JOIN cdm.user_product_counters m ON m.product_id = r.product_id
        WHERE r.kind = 'dish' AND NOT r.windowed AND m.order_cnt >= r.threshold
        UNION
        SELECT m.user_id, r.tag
        FROM rule r
        JOIN cdm.user_order_counters m ON m.order_cnt >= r.threshold
        WHERE r.kind = 'all_orders' AND NOT r.windowed
        UNION
        SELECT m.user_id, r.tag
        FROM rule r
        JOIN cdm.user_category_counters m ON m.order_cnt >= r.threshold
        WHERE r.kind = 'favourite_category' AND NOT r.windowed
        UNION
        SELECT w.user_id, r.tag
        FROM rule r
        JOIN cdm.user_window_counters w ON w.tag = r.tag
        WHERE r.windowed AND w.order_cnt >= r.threshold
    )
    SELECT array_agg(p.user_id ORDER BY p.user_id, p.tag),
           array_agg(p.tag ORDER BY p.user_id, p.tag)
    INTO pair_users, pair_tags
    FROM pair p;

    RETURN dwh.refresh_user_tags(pair_users, pair_tags);
END
$fn$;
COMMENT ON FUNCTION dwh.recompute_rule_tags(text[]) IS
    'Internal: recompute every tag of these rules (a tag whose rule is gone is revoked); returns the events written';

-- Every tag recomputed, rules and tags held alike: after a restore that
-- did not bring the tags back, or a DBA's write to cdm.user_tags_held.
CREATE FUNCTION dwh.rebuild_tags()
    RETURNS integer
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    IF pg_catalog.current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'tags can only be recomputed in a READ COMMITTED transaction'
            USING ERRCODE = '25000',
                  DETAIL = 'The recount must see the orders committed while it waited for the tag lock.';
    END IF;
    PERFORM pg_advisory_xact_lock(dwh.tag_lock_key());
    RETURN dwh.recompute_rule_tags(ARRAY(SELECT r.tag FROM dwh.tag_rules r
                                         UNION
                                         SELECT DISTINCT t.tag FROM cdm.user_tags_held t));
END
$fn$;
COMMENT ON FUNCTION dwh.rebuild_tags() IS
    'Recompute every user tag from the rules, the marts and DDS (writing the grant and revoke events that makes); returns the events written';

-- Windows move on: each windowed rule's window_as_of becomes now (UTC);
-- the orders dated between the old and the new start of a window leave
-- its counts (cdm.user_window_counters), and the tags held by their users
-- are recounted (only they can change: a count that is below its
-- threshold only goes down as time passes, and a favourite needs one).
-- Meant to run once a minute; see docs/tags.md for what its caller needs.
CREATE FUNCTION dwh.expire_tags(OUT rules_moved integer, OUT events integer)
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    as_of timestamp;
    zero_users uuid[];
    zero_tags text[];
    zero_categories uuid[];
    pair_users uuid[];
    pair_tags text[];
BEGIN
    IF pg_catalog.current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'tags can only be expired in a READ COMMITTED transaction'
            USING ERRCODE = '25000',
                  DETAIL = 'The recount must see the orders committed while it waited for the tag lock.';
    END IF;
    PERFORM pg_advisory_xact_lock(dwh.tag_lock_key());
    as_of := now() AT TIME ZONE 'UTC';

    -- What leaves the windows, taken away from the counts (the windows as
    -- they are until the rules move below).
    WITH leaving AS MATERIALIZED (
        SELECT * FROM dwh.tag_window_counts(NULL, NULL, as_of)
    ),
    down AS (
        UPDATE cdm.user_window_counters m
        SET order_cnt = m.order_cnt - l.order_cnt
        FROM leaving l
        WHERE m.user_id = l.user_id AND m.tag = l.tag AND m.category_id = l.category_id
        RETURNING m.user_id, m.tag, m.category_id, m.order_cnt
    ),
    zero AS MATERIALIZED (
        SELECT z.user_id, z.tag, z.category_id FROM down z WHERE z.order_cnt = 0
    ),
    pair AS MATERIALIZED (
        SELECT DISTINCT t.user_id, t.tag
        FROM leaving l
        JOIN cdm.user_tags_held t ON t.user_id = l.user_id AND t.tag = l.tag
    )
    SELECT (SELECT array_agg(z.user_id) FROM zero z),
           (SELECT array_agg(z.tag) FROM zero z),
           (SELECT array_agg(z.category_id) FROM zero z),
           (SELECT array_agg(p.user_id ORDER BY p.user_id, p.tag) FROM pair p),
           (SELECT array_agg(p.tag ORDER BY p.user_id, p.tag) FROM pair p)
    INTO zero_users, zero_tags, zero_categories, pair_users, pair_tags;

    IF zero_users IS NOT NULL THEN
        DELETE FROM cdm.user_window_counters m
        USING unnest(zero_users, zero_tags, zero_categories) AS z(user_id, tag, category_id)
        WHERE m.user_id = z.user_id AND m.tag = z.tag AND m.category_id = z.category_id
          AND m.order_cnt = 0;
    END IF;

    UPDATE dwh.tag_rules r
    SET window_as_of = as_of
    WHERE r.window_days IS NOT NULL AND r.window_as_of < as_of;
    GET DIAGNOSTICS rules_moved = ROW_COUNT;

    events := dwh.refresh_user_tags(pair_users, pair_tags);
END
$fn$;
COMMENT ON FUNCTION dwh.expire_tags() IS
    'Move every windowed rule''s window to end now, take the orders leaving a window out of its counts and revoke (or recount) the tags that changes; returns the rules moved and the events written';

-- Rules are checked row by row before they are written, with messages
-- that say what to write; the CHECK constraints of the table say the same
-- in case the trigger is disabled.  window_as_of is dwh's: set to now
-- (UTC) when a rule is written or changed, kept when only it changes
-- (dwh.expire_tags) and when a restore brings it back.
CREATE FUNCTION dwh.tag_rules_check() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    IF NEW.tag IS NULL OR NEW.tag = '' OR length(NEW.tag) > 200 THEN
        RAISE EXCEPTION 'tag name must have 1 to 200 characters'
            USING ERRCODE = '23514',
                  DETAIL = format('The name given has %s characters.', coalesce(length(NEW.tag), 0));
    END IF;
    IF NEW.kind IS NULL
       OR NEW.kind NOT IN ('category', 'dish', 'all_orders', 'favourite_category') THEN
        RAISE EXCEPTION 'tag rule "%" has an unknown kind: %', NEW.tag, coalesce(NEW.kind, 'null')
            USING ERRCODE = '23514',
                  DETAIL = 'A rule counts the orders with a dish of a category (category), with one dish (dish), all orders (all_orders), or names the category of most of them (favourite_category).';
    END IF;
    IF NEW.threshold IS NULL OR NEW.threshold < 1 THEN
        RAISE EXCEPTION 'threshold of tag rule "%" must be at least 1, not %',
            NEW.tag, coalesce(NEW.threshold::text, 'null')
            USING ERRCODE = '23514',
                  DETAIL = 'A user holds the tag while the rule counts at least threshold of the user''s orders.';
    END IF;
    IF NEW.window_days < 1 THEN
        RAISE EXCEPTION 'window of tag rule "%" must be at least 1 day, not %',
            NEW.tag, NEW.window_days
            USING ERRCODE = '23514',
                  HINT = 'Leave window_days null to count the orders of all time.';
    END IF;
    IF NEW.kind = 'category' AND (NEW.category_name IS NULL OR NEW.category_name = '') THEN
        RAISE EXCEPTION 'tag rule "%" of kind category names no category', NEW.tag
            USING ERRCODE = '23514',
                  HINT = 'Set category_name to the category''s name, as cdm.user_category_counters shows it.';
    END IF;
    IF NEW.kind = 'dish' AND (NEW.product_id IS NULL OR NEW.product_id = '') THEN
        RAISE EXCEPTION 'tag rule "%" of kind dish names no dish', NEW.tag
            USING ERRCODE = '23514',
                  HINT = 'Set product_id to the dish''s id in the orders and menus (dds.h_product.product_id).';
    END IF;
    IF NEW.product_id IS NOT NULL AND NEW.kind <> 'dish' THEN
        RAISE EXCEPTION 'tag rule "%" of kind % names a dish', NEW.tag, NEW.kind
            USING ERRCODE = '23514',
                  DETAIL = 'Only a rule of kind dish counts the orders of one dish.',
                  HINT = 'Leave product_id null, or make the rule of kind dish.';
    END IF;
    IF NEW.category_name IS NOT NULL AND NEW.kind <> 'category' THEN
        RAISE EXCEPTION 'tag rule "%" of kind % names a category', NEW.tag, NEW.kind
            USING ERRCODE = '23514',
                  DETAIL = 'Only a rule of kind category counts the orders with a dish of one category.',
                  HINT = 'Leave category_name null, or make the rule of kind category.';
    END IF;

    IF NEW.window_days IS NULL THEN
        NEW.window_as_of := NULL;
    ELSIF TG_OP = 'INSERT'
          OR (OLD.tag, OLD.kind, OLD.category_name, OLD.product_id, OLD.threshold,
              OLD.window_days) IS DISTINCT FROM
             (NEW.tag, NEW.kind, NEW.category_name, NEW.product_id, NEW.threshold,
              NEW.window_days)
          OR NEW.window_as_of IS NULL THEN
        IF NEW.window_as_of IS NULL OR NOT dwh.tags_restoring() THEN
            NEW.window_as_of := now() AT TIME ZONE 'UTC';
        END IF;
    END IF;
    RETURN NEW;
END
$fn$;
COMMENT ON FUNCTION dwh.tag_rules_check() IS
    'BEFORE INSERT/UPDATE trigger of dwh.tag_rules: refuses a bad rule with a message that says what to write, and sets window_as_of';

CREATE TRIGGER tag_rules_check
    BEFORE INSERT OR UPDATE ON dwh.tag_rules
    FOR EACH ROW EXECUTE FUNCTION dwh.tag_rules_check();

-- A statement that writes rules takes the tag lock exclusive before it
-- locks any rule's row, as dwh.expire_tags() does before it moves the
-- windows: a rule change that locked its row first, then waited for the
-- tag lock held by dwh.expire_tags(), which then waited for that row, was
-- a deadlock.  Batches and rule changes hold the lock until commit.
CREATE FUNCTION dwh.tag_rules_lock() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    IF NOT dwh.tags_restoring() THEN
        PERFORM pg_advisory_xact_lock(dwh.tag_lock_key());
    END IF;
    RETURN NULL;
END
$fn$;
COMMENT ON FUNCTION dwh.tag_rules_lock() IS
    'BEFORE INSERT/UPDATE/DELETE statement trigger of dwh.tag_rules: takes the tag lock exclusive before any rule''s row is locked';

CREATE TRIGGER tag_rules_lock
    BEFORE INSERT OR UPDATE OR DELETE ON dwh.tag_rules
    FOR EACH STATEMENT EXECUTE FUNCTION dwh.tag_rules_lock();

-- A rule written, changed or dropped: its tags recomputed, under the tag
-- lock exclusive (order batches wait at their tag step meanwhile, and the
-- recount sees every batch committed before).  A change of window_as_of
-- alone recomputes nothing (dwh.expire_tags does what it needs).
CREATE FUNCTION dwh.tag_rules_changed() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    changed text[];
BEGIN
    IF dwh.tags_restoring() THEN
        RETURN NULL;
    END IF;
    IF TG_OP = 'INSERT' THEN
        SELECT array_agg(n.tag) INTO changed FROM new_rules n;
    ELSIF TG_OP = 'DELETE' THEN
        SELECT array_agg(o.tag) INTO changed FROM old_rules o;
    ELSE
        SELECT array_agg(DISTINCT x.tag) INTO changed
        FROM ((SELECT o.tag, o.kind, o.category_name, o.product_id, o.threshold, o.window_days
               FROM old_rules o
               EXCEPT
               SELECT n.tag, n.kind, n.category_name, n.product_id, n.threshold, n.window_days
               FROM new_rules n)
              UNION ALL
              (SELECT n.tag, n.kind, n.category_name, n.product_id, n.threshold, n.window_days
               FROM new_rules n
               EXCEPT
               SELECT o.tag, o.kind, o.category_name, o.product_id, o.threshold, o.window_days
               FROM old_rules o)) x;
    END IF;
    IF changed IS NULL THEN
        RETURN NULL;
    END IF;

    IF pg_catalog.current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'tag rules can only be changed in a READ COMMITTED transaction'
            USING ERRCODE = '25000',
                  DETAIL = 'The rule''s tags are recounted from the marts as committed once the tag lock is held; an older snapshot would miss orders.';
    END IF;
    PERFORM pg_advisory_xact_lock(dwh.tag_lock_key());
    PERFORM dwh.recompute_rule_tags(changed);
    RETURN NULL;
END
$fn$;
COMMENT ON FUNCTION dwh.tag_rules_changed() IS
    'AFTER INSERT/UPDATE/DELETE statement trigger of dwh.tag_rules: recomputes the tags of the rules written, changed or dropped';

CREATE TRIGGER tag_rules_inserted
    AFTER INSERT ON dwh.tag_rules
    REFERENCING NEW TABLE AS new_rules
    FOR EACH STATEMENT EXECUTE FUNCTION dwh.tag_rules_changed();

CREATE TRIGGER tag_rules_updated
    AFTER UPDATE ON dwh.tag_rules
    REFERENCING OLD TABLE AS old_rules NEW TABLE AS new_rules
    FOR EACH STATEMENT EXECUTE FUNCTION dwh.tag_rules_changed();

CREATE TRIGGER tag_rules_deleted
    AFTER DELETE ON dwh.tag_rules
    REFERENCING OLD TABLE AS old_rules
    FOR EACH STATEMENT EXECUTE FUNCTION dwh.tag_rules_changed();

-- TRUNCATE fires no DELETE trigger: it would leave the rules' tags held.
CREATE FUNCTION dwh.tag_rules_refuse_truncate() RETURNS trigger
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    RAISE EXCEPTION 'dwh.tag_rules cannot be truncated'
        USING ERRCODE = '55000',
              DETAIL = 'TRUNCATE would leave the rules'' tags held, without revoke events.',
              HINT = 'DELETE FROM dwh.tag_rules revokes the tags of the rules it deletes.';
END
$fn$;
COMMENT ON FUNCTION dwh.tag_rules_refuse_truncate() IS
    'Refuses TRUNCATE on dwh.tag_rules';

CREATE TRIGGER tag_rules_no_truncate
    BEFORE TRUNCATE ON dwh.tag_rules
    FOR EACH STATEMENT EXECUTE FUNCTION dwh.tag_rules_refuse_truncate();

-- Rules may name a category or dish before any menu or order does: they
-- are accepted and listed here until it arrives.
CREATE VIEW dwh.tag_rule_problems AS
SELECT r.tag, r.kind, r.category_name AS name,
       'no menu has named this category yet'::text AS problem
FROM dwh.tag_rules r
WHERE r.category_name IS NOT NULL
  AND NOT EXISTS (SELECT FROM dds.h_category h WHERE h.category_name = r.category_name)
UNION ALL
SELECT r.tag, r.kind, r.product_id,
       'no order or menu has named this dish yet'
FROM dwh.tag_rules r
WHERE r.product_id IS NOT NULL
  AND NOT EXISTS (SELECT FROM dds.h_product h WHERE h.product_id = r.product_id);
COMMENT ON VIEW dwh.tag_rule_problems IS 'Tag rules that name a category or dish that the warehouse does not know (yet): they hold no tag until it arrives';

-- Counts of the tag events by kind, for monitoring (monitoring/queries.yaml):
-- a role granted SELECT on this view reads the counts without reading the
-- users.  Both kinds always have a row.
CREATE VIEW dwh.tag_event_counts AS
SELECT k.kind, count(e.id) AS events, max(e.at) AS last_event_at
FROM (VALUES ('grant'::text), ('revoke'::text)) k(kind)
LEFT JOIN cdm.user_tag_events e ON e.kind = k.kind
GROUP BY k.kind;
COMMENT ON VIEW dwh.tag_event_counts IS 'Tag events (cdm.user_tag_events) by kind: how many and the time of the last; for monitoring without access to the users';
