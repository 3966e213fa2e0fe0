-- User tags (docs/tags.md): rules that a DBA or analyst writes in
-- dwh.tag_rules, the tags they give users in cdm.user_tags, kept in the
-- transaction of the order, retraction, menu change or rule change that
-- causes them, and every grant and revoke in cdm.user_tag_events with a
-- NOTIFY on channel dwh_user_tags.  Tags are a function of the rules and of
-- the marts and DDS (all-time rules count from the marts, windowed ones
-- from cdm.user_window_counters as of the rule's window_as_of);
-- dwh.verify() recounts them.  This file holds the tables, the view and the
-- rules' checks; the windowed counting is install/78_tag_windows.sql, the
-- refresh of the tags install/79_tag_refresh.sql.

-- The tag lock: order batches take it shared before they read DDS (step 3
-- of the lock order, install/40_products.sql); rule changes,
-- dwh.expire_tags() and dwh.rebuild() take it exclusive, so that they
-- recount from marts that no batch is changing underneath.
CREATE FUNCTION dwh.tag_lock_key() RETURNS bigint
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS 'SELECT 3482019573612840177::pg_catalog.int8';
COMMENT ON FUNCTION dwh.tag_lock_key() IS
    'Advisory lock key serialising tag rule changes, dwh.expire_tags() and dwh.rebuild() against the tag refresh of order batches';

-- A restore (pg_restore, or a script of pg_dump run by psql) sets
-- check_function_bodies off for its whole session, whatever its options
-- (row_security too, unless --enable-row-security).  It
-- brings cdm.user_tags_held and cdm.user_tag_events back as they were dumped
-- (one snapshot, consistent with the rules and STG dumped with them), so
-- while it rebuilds the marts from STG the tags are not maintained: else
-- each table restored would grant and revoke again what the dump holds.
-- Any role can set check_function_bodies, and a database owner for every
-- session: the session must have set it itself, and its role must be one
-- that could restore the tags (src/dwh_session_mode.c).
CREATE FUNCTION dwh.tags_restoring() RETURNS boolean
    AS 'MODULE_PATHNAME', 'dwh_tags_restoring'
    LANGUAGE C STABLE;
COMMENT ON FUNCTION dwh.tags_restoring() IS
    'Internal: does this session restore a dump (check_function_bodies set off by the session itself, as pg_restore and pg_dump''s scripts do whatever their options, not by the database''s settings; and a role that may insert into cdm.user_tags_held)? Tags are then restored, not maintained';

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
    CONSTRAINT tag_rules_window_days_check CHECK (window_days BETWEEN 1 AND 36500),
    CONSTRAINT tag_rules_window_as_of_check
        CHECK ((window_days IS NULL) = (window_as_of IS NULL)),
    -- A window reaching back from before year 1 would start before the
    -- earliest timestamp: every count over it would fail.
    CONSTRAINT tag_rules_window_as_of_range
        CHECK (window_as_of >= '0001-01-01 00:00:00' OR NOT isfinite(window_as_of))
);
COMMENT ON TABLE dwh.tag_rules IS 'User tag rules: a user holds a rule''s tag while the orders it counts reach its threshold; written with plain SQL, each change recomputes the rule''s tags';
COMMENT ON COLUMN dwh.tag_rules.tag IS 'The tag''s name (unique, 1 to 200 characters)';
COMMENT ON COLUMN dwh.tag_rules.kind IS 'What it counts: category (the user''s CLOSED orders with a dish of category_name), dish (those with the dish product_id), all_orders (all of them), favourite_category (the user''s most ordered category, the tag''s value)';
COMMENT ON COLUMN dwh.tag_rules.category_name IS 'kind category: the category''s name, as in cdm.user_category_counters.category_name and dds.h_category (compared byte by byte); it may not be known yet';
COMMENT ON COLUMN dwh.tag_rules.product_id IS 'kind dish: the dish''s id in the orders and menus (dds.h_product.product_id); it may not be known yet';
COMMENT ON COLUMN dwh.tag_rules.threshold IS 'At least this many orders (1 or more): for favourite_category, in the favourite category';
COMMENT ON COLUMN dwh.tag_rules.window_days IS 'Count only the orders whose order time (payload.date, UTC) is at most this many days (1 to 36500: 100 years) before window_as_of (later ones count too, the future included); null: all of them';
COMMENT ON COLUMN dwh.tag_rules.window_as_of IS 'Set by dwh, not by the rule''s writer: the UTC time the window reaches back from, set when the rule is written and moved on by dwh.expire_tags(); null without a window';

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
    IF NEW.window_days < 1 OR NEW.window_days > 36500 THEN
        RAISE EXCEPTION 'window of tag rule "%" must be from 1 to 36500 days, not %',
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
        PERFORM dwh.xact_lock(dwh.tag_lock_key(), true);
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
    PERFORM dwh.xact_lock(dwh.tag_lock_key(), true);
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
