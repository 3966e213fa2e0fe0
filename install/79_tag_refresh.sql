-- Keeping the user tags (docs/tags.md, "Maintenance"): what a pair of
-- user and rule counts now, the crossings of thresholds, the refresh that
-- grants and revokes with its events, the tag step of every batch, and the
-- recounts of a rule change, dwh.rebuild_tags() and dwh.expire_tags().  The
-- tables are in install/77_tags.sql.

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
    SELECT coalesce(pg_catalog.current_setting('dwh.tags_topic', true), '') OPERATOR(pg_catalog.<>) ''
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
-- each grant and revoke, in (user, tag) order, notify its id (any role may
-- LISTEN: the payload names no user and no tag), and queue it for
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
        RETURNING id
    ),
    queued AS (
        INSERT INTO dwh.tag_outbox (event_id)
        SELECT e.id FROM event e
        WHERE dwh.tag_feed_on()
        RETURNING event_id
    )
    SELECT count(*)::integer, (SELECT count(*) FROM queued)::integer
    INTO written, to_produce
    FROM (SELECT e.id FROM event e ORDER BY e.id) e
    CROSS JOIN LATERAL pg_notify('dwh_user_tags',
                                 json_build_object('id', e.id)::text) n;
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
-- users/keys/deltas (summed, should a key come twice: a key given n times
-- on both sides would otherwise join n times n rows).  Only these can gain
-- or lose the tag: the tags held are what the counts before said (they
-- are kept in the same transactions as the counts, and dwh.verify()
-- checks it).  No nested loop: a plan made for arrays of unknown length
-- (10 rows, it guesses) joins the two arrays of a batch, some thousand
-- elements each, by comparing every pair.
CREATE FUNCTION dwh.tags_crossed(kind text, users uuid[], keys uuid[], deltas integer[],
                                 moved_users uuid[], moved_keys uuid[],
                                 moved_counts integer[])
    RETURNS TABLE (user_id uuid, tag text)
    LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
    SET enable_nestloop = off
AS $fn$
#variable_conflict use_column
BEGIN
    RETURN QUERY
        SELECT m.user_id, r.tag
        FROM (SELECT r.tag, r.threshold,
                     CASE r.kind WHEN 'dish' THEN dwh.hash_key(r.product_id)
                                 ELSE dwh.hash_key(r.category_name) END AS key
              FROM dwh.tag_rules r
              WHERE r.kind = tags_crossed.kind AND r.window_days IS NULL) r
        JOIN unnest(moved_users, moved_keys, moved_counts) AS m(user_id, key, order_cnt)
          ON m.key = r.key
        JOIN (SELECT x.user_id, x.key, sum(x.d) AS d
              FROM unnest(users, keys, deltas) AS x(user_id, key, d)
              GROUP BY x.user_id, x.key) d
          ON d.user_id = m.user_id AND d.key = m.key
        WHERE (m.order_cnt - d.d >= r.threshold) <> (m.order_cnt >= r.threshold);
END
$fn$;
COMMENT ON FUNCTION dwh.tags_crossed(text, uuid[], uuid[], integer[], uuid[], uuid[], integer[]) IS
    'Internal: the (user, tag) pairs of all-time rules of this kind (dish or category) whose count crossed the threshold, from the mart rows written and their deltas';

-- Step 5 of the lock order, after the marts of dishes and categories (see
-- dwh.apply_mart_deltas): the users' CLOSED order counts, then, with some
-- rule (tagging), the windowed counts and the tags that the batch may
-- change: the pairs whose count crossed its threshold (crossed_users and
-- crossed_tags for dish and category rules; all_orders and windowed rules
-- here, from the counts written), and the favourite categories of the
-- users with a category delta (category_users) or a windowed one.  The
-- users' rows are locked in one pass in key order, new ones included (as
-- in dwh.apply_mart_deltas): those whose count changes and, with some
-- rule, every user touched, whose row then stands for the user, so that
-- two batches changing orders of one user refresh its tags one after the
-- other, each from what the other committed.  A user without a row gets
-- one for the lock, deleted again before the end unless counted.  The
-- caller holds the tag lock shared.
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
    found_keys uuid[];
    found_tags text[];
    found_categories uuid[];
    lost_keys bigint;
BEGIN
    IF order_users IS NULL AND touched IS NULL AND category_users IS NULL
       AND window_keys IS NULL AND crossed_users IS NULL THEN
        RETURN;
    END IF;

    WITH delta AS MATERIALIZED (
        SELECT x.user_id, sum(x.d)::integer AS d
        FROM (SELECT o.user_id, o.d FROM unnest(order_users, order_deltas) AS o(user_id, d)
              UNION ALL
              SELECT t.user_id, 0 FROM unnest(touched) AS t(user_id) WHERE tagging) x
        GROUP BY x.user_id
        HAVING sum(x.d) <> 0 OR tagging
    ),
    up AS (
        INSERT INTO cdm.user_order_counters AS m (user_id, order_cnt)
        SELECT d.user_id, greatest(d.d, 0)
        FROM delta d
        ORDER BY d.user_id
        ON CONFLICT (user_id) DO UPDATE
        SET order_cnt = m.order_cnt + EXCLUDED.order_cnt
        WHERE EXCLUDED.order_cnt > 0
        RETURNING m.user_id, m.order_cnt
    )
    SELECT array_agg(user_id) FILTER (WHERE order_cnt = 0),
           array_agg(user_id) FILTER (WHERE tagging AND order_cnt > 0),
           array_agg(order_cnt) FILTER (WHERE tagging AND order_cnt > 0)
    INTO zero_users, moved_users, moved_counts
    FROM up;

    IF EXISTS (SELECT FROM unnest(order_deltas) d WHERE d < 0) THEN
        WITH delta AS MATERIALIZED (
            SELECT x.user_id, sum(x.d)::integer AS d
            FROM unnest(order_users, order_deltas) AS x(user_id, d)
            GROUP BY x.user_id
            HAVING sum(x.d) < 0
        ),
        down AS (
            UPDATE cdm.user_order_counters m
            SET order_cnt = m.order_cnt + d.d
            FROM delta d
            WHERE m.user_id = d.user_id
            RETURNING m.user_id, m.order_cnt
        )
        SELECT zero_users || array_agg(user_id) FILTER (WHERE order_cnt = 0),
               moved_users || array_agg(user_id) FILTER (WHERE tagging),
               moved_counts || array_agg(order_cnt) FILTER (WHERE tagging)
        INTO zero_users, moved_users, moved_counts
        FROM down;
    END IF;

    IF zero_users IS NOT NULL THEN
        DELETE FROM cdm.user_order_counters m
        WHERE m.user_id = ANY (zero_users) AND m.order_cnt = 0;
    END IF;

    IF NOT tagging THEN
        RETURN;
    END IF;

    -- The windowed counts: each key's rule found back by its rank, and a
    -- favourite's category by a probe of dds.h_category's primary key.  A
    -- key found nowhere would be a count lost: an error.  Not 22023 (a
    -- batch would take it for bad data and dead-letter its orders), nor an
    -- internal error (a caller can pass such keys): 55000, the rules are
    -- not the ones the keys were made from.  The users' rows are locked.
    IF window_keys IS NOT NULL THEN
        SELECT array_agg(k.key), array_agg(f.tag), array_agg(f.category_id),
               count(*) FILTER (WHERE f.tag IS NULL)
        INTO found_keys, found_tags, found_categories, lost_keys
        FROM (SELECT DISTINCT x.key FROM unnest(window_keys) AS x(key)) k
        LEFT JOIN LATERAL (
            SELECT r.tag, c.category_id
            FROM dwh.tag_window_rules() r
            CROSS JOIN LATERAL (SELECT dwh.all_orders_key() AS category_id
                                WHERE r.kind <> 'favourite_category'
                                UNION ALL
                                SELECT h.h_category_pk FROM dds.h_category h,
                                       dwh.tag_window_category_range(k.key) g
                                WHERE r.kind = 'favourite_category'
                                  AND h.h_category_pk BETWEEN g.low AND g.high) c
            WHERE r.rule_rank = dwh.tag_window_key_rank(k.key)
              AND dwh.tag_window_key(r.rule_rank, c.category_id) = k.key
            LIMIT 1) f ON true;
        IF lost_keys > 0 THEN
            RAISE EXCEPTION 'windowed tag count deltas under % keys match no windowed rule',
                            lost_keys
                USING ERRCODE = 'object_not_in_prerequisite_state',
                      DETAIL = 'Each key is dwh.tag_window_key() of a windowed rule''s rank (dwh.tag_window_rules()) and a category, made while the tag lock is held; a count under another key would be lost.';
        END IF;

        WITH delta AS MATERIALIZED (
            SELECT x.user_id, f.tag, f.category_id, sum(x.d)::integer AS d
            FROM unnest(window_users, window_keys, window_deltas) AS x(user_id, key, d)
            JOIN unnest(found_keys, found_tags, found_categories)
                 AS f(key, tag, category_id) ON f.key = x.key
            GROUP BY x.user_id, f.tag, f.category_id
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
    PERFORM dwh.xact_lock(dwh.tag_lock_key(), true);
    -- Every tag with a rule, and those held or counted without one (their
    -- tags are revoked, their counts dropped).
    RETURN dwh.recompute_rule_tags(ARRAY(SELECT r.tag FROM dwh.tag_rules r
                                         UNION
                                         SELECT DISTINCT t.tag FROM cdm.user_tags_held t
                                         UNION
                                         SELECT DISTINCT w.tag FROM cdm.user_window_counters w));
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
    PERFORM dwh.xact_lock(dwh.tag_lock_key(), true);
    as_of := now() AT TIME ZONE 'UTC';

    -- The rules moved below, locked first.  A session may hold a rule's
    -- row without the tag lock (SELECT ... FOR UPDATE) and ask for the tag
    -- lock next (a rule change): waiting here for its row would be a
    -- deadlock.  The windows then move at the next pass instead.
    BEGIN
        PERFORM FROM dwh.tag_rules r
        WHERE r.window_days IS NOT NULL AND r.window_as_of < as_of
        FOR NO KEY UPDATE NOWAIT;
    EXCEPTION WHEN lock_not_available THEN
        RAISE LOG 'tag windows not moved: a tag rule''s row is locked by another transaction'
            USING DETAIL = 'The windows move at the next expiry pass.';
        rules_moved := 0;
        events := 0;
        RETURN;
    END;

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
