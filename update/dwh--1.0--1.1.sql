-- dwh 1.0 -> 1.1, run by ALTER EXTENSION dwh UPDATE.
--
-- Version 1.0 is the schema of update/dwh--1.0.sql (commit aa4d7d2); 1.1 is
-- install/*.sql.  This script carries every change between them, in the
-- order of the install files, with the same text: test/t/005_upgrade.pl
-- compares the catalog of an updated database with a fresh install.  The
-- rules for writing it are in docs/upgrades.md.
--
-- The data rule (docs/data-rule.md): STG keeps every version received, and
-- DDS and the marts are a function of the versions in STG.  1.0 kept only
-- the current version of each order, user and restaurant; at the end, DDS
-- and the marts are recomputed from STG, and whatever 1.0's DDS held that
-- STG no longer implies is kept aside (see the last section).

\echo Use "ALTER EXTENSION dwh UPDATE" to load this file. \quit

-- Prelude (install/00_prelude.sql): the dictionary lock's key comes from
-- the C constant that the STG statement trigger takes (same value as 1.0's
-- SQL function); a lock key for writers of user values.

CREATE OR REPLACE FUNCTION dwh.dictionary_lock_key() RETURNS bigint
    AS 'MODULE_PATHNAME', 'dwh_dictionary_lock_key'
    LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION dwh.dictionary_lock_key() IS
    'Advisory lock key serialising dish category and name changes against order batches';

-- Writers of user values take this one exclusively: the satellite row of
-- a version time is chosen among the values stored in stg.users and
-- stg.user_history, so two writers of the same user take turns.
CREATE FUNCTION dwh.user_lock_key() RETURNS bigint
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS 'SELECT 7238964021746305794::pg_catalog.int8';
COMMENT ON FUNCTION dwh.user_lock_key() IS
    'Advisory lock key serialising writers of user values';

-- dwh's locks are advisory locks that no SQL function but this one takes
-- (src/dwh_locks.c): pg_advisory_lock() and its kin are PUBLIC's, and a
-- role holding dwh's keys with them would stop every writer.
CREATE FUNCTION dwh.xact_lock(key bigint, exclusive boolean) RETURNS void
    AS 'MODULE_PATHNAME', 'dwh_xact_lock'
    LANGUAGE C STRICT;
COMMENT ON FUNCTION dwh.xact_lock(bigint, boolean) IS
    'Internal: take dwh''s lock of this key (dwh.dictionary_lock_key(), dwh.user_lock_key(), dwh.tag_lock_key()) until the transaction ends, exclusive or shared; not the lock pg_advisory_xact_lock() takes';

-- STG (install/10_stg.sql): the statement lock of the order tables, the
-- history tables of superseded versions, and what identifies an other
-- event with its Kafka position.

CREATE FUNCTION dwh.stg_statement_lock() RETURNS trigger
    AS 'MODULE_PATHNAME', 'dwh_stg_statement_lock'
    LANGUAGE C;
COMMENT ON FUNCTION dwh.stg_statement_lock() IS
    'BEFORE STATEMENT trigger of the order tables: the dictionary lock, exclusive, unless the transaction holds it; in its later write of orders, menus or users, the dictionary and user locks, refused if another session holds them';

CREATE FUNCTION dwh.dictionary_lock_exclusive() RETURNS boolean
    AS 'MODULE_PATHNAME', 'dwh_dictionary_lock_exclusive'
    LANGUAGE C STRICT;
COMMENT ON FUNCTION dwh.dictionary_lock_exclusive() IS
    'Internal: does this transaction hold the dictionary lock exclusively?';

-- Before any row: see install/40_products.sql, "Lock order".
CREATE TRIGGER order_events_lock
    BEFORE INSERT OR UPDATE ON stg.order_events
    FOR EACH STATEMENT EXECUTE FUNCTION dwh.stg_statement_lock();

-- Superseded versions: one row per distinct version, the payload's digest
-- standing for the payload in the unique key (a jsonb is too large for a
-- btree entry).
CREATE TABLE stg.order_event_history (
    object_id   bigint NOT NULL,
    update_ts   timestamp NOT NULL,
    payload     jsonb NOT NULL,
    payload_md5 uuid NOT NULL
        GENERATED ALWAYS AS (pg_catalog.md5(payload::text)::uuid) STORED,
    sent_dttm   timestamp NOT NULL,
    loaded_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (object_id, update_ts, payload_md5)
);
COMMENT ON TABLE stg.order_event_history IS 'Every version of an order received other than its current one (older, or losing a tie on update_ts), once';
COMMENT ON COLUMN stg.order_event_history.object_id IS 'Order id (message object_id)';
COMMENT ON COLUMN stg.order_event_history.update_ts IS 'Version time: payload.update_ts';
COMMENT ON COLUMN stg.order_event_history.payload IS 'The message''s payload object, as is';
COMMENT ON COLUMN stg.order_event_history.payload_md5 IS 'MD5 of the payload''s text: identifies the version with object_id and update_ts';
COMMENT ON COLUMN stg.order_event_history.sent_dttm IS 'Greatest sent_dttm of the messages that carried this version';
COMMENT ON COLUMN stg.order_event_history.loaded_at IS 'When this version was first stored here';

CREATE TRIGGER order_event_history_guard
    BEFORE INSERT OR UPDATE ON stg.order_event_history
    FOR EACH ROW EXECUTE FUNCTION dwh.stg_guard('order');

CREATE TRIGGER order_event_history_lock
    BEFORE INSERT OR UPDATE ON stg.order_event_history
    FOR EACH STATEMENT EXECUTE FUNCTION dwh.stg_statement_lock();

CREATE TABLE stg.user_history (
    object_id   varchar NOT NULL,
    update_ts   timestamp,
    payload     jsonb NOT NULL,
    payload_md5 uuid NOT NULL
        GENERATED ALWAYS AS (pg_catalog.md5(payload::text)::uuid) STORED,
    loaded_at   timestamptz NOT NULL DEFAULT now(),
    UNIQUE NULLS NOT DISTINCT (object_id, update_ts, payload_md5)
);
COMMENT ON TABLE stg.user_history IS 'User values mirrored from Redis other than the current one (older, or losing a tie on update_ts_utc), once';
COMMENT ON COLUMN stg.user_history.object_id IS 'Redis key';
COMMENT ON COLUMN stg.user_history.update_ts IS 'Version time: payload.update_ts_utc (null when absent: older than any time)';
COMMENT ON COLUMN stg.user_history.payload IS 'The Redis value, as is';
COMMENT ON COLUMN stg.user_history.payload_md5 IS 'MD5 of the value''s text: identifies the version with object_id and update_ts';
COMMENT ON COLUMN stg.user_history.loaded_at IS 'When this version was first stored here';

CREATE TRIGGER user_history_guard
    BEFORE INSERT OR UPDATE ON stg.user_history
    FOR EACH ROW EXECUTE FUNCTION dwh.stg_guard('user');

CREATE TABLE stg.restaurant_history (
    object_id   varchar NOT NULL,
    update_ts   timestamp,
    payload     jsonb NOT NULL,
    payload_md5 uuid NOT NULL
        GENERATED ALWAYS AS (pg_catalog.md5(payload::text)::uuid) STORED,
    loaded_at   timestamptz NOT NULL DEFAULT now(),
    UNIQUE NULLS NOT DISTINCT (object_id, update_ts, payload_md5)
);
COMMENT ON TABLE stg.restaurant_history IS 'Restaurant values mirrored from Redis other than the current one (older, or losing a tie on update_ts_utc), once';
COMMENT ON COLUMN stg.restaurant_history.object_id IS 'Redis key';
COMMENT ON COLUMN stg.restaurant_history.update_ts IS 'Version time: payload.update_ts_utc (null when absent: older than any time)';
COMMENT ON COLUMN stg.restaurant_history.payload IS 'The Redis value, as is';
COMMENT ON COLUMN stg.restaurant_history.payload_md5 IS 'MD5 of the value''s text: identifies the version with object_id and update_ts';
COMMENT ON COLUMN stg.restaurant_history.loaded_at IS 'When this version was first stored here';

CREATE TRIGGER restaurant_history_guard
    BEFORE INSERT OR UPDATE ON stg.restaurant_history
    FOR EACH ROW EXECUTE FUNCTION dwh.stg_guard('restaurant');
CREATE INDEX restaurant_history_update_ts_idx ON stg.restaurant_history (update_ts);

-- Menu times: a dish's order naming row that moves looks up whether
-- some menu version named it at its old time (dwh.place_order_namings).
CREATE INDEX restaurants_update_ts_idx ON stg.restaurants (update_ts);

-- 1.0's unique indexes let a message repeat at a position given without a
-- topic (nulls were distinct there); 1.1's keep a message delivered again
-- at the same position once, and cannot be built over such repeats.  They
-- are exact copies (same position, source and bytes), but the update
-- removes no row of what was received: it stops and says which.
DO $repeats$
DECLARE
    others bigint;
    dead bigint;
BEGIN
    SELECT pg_catalog.count(*) INTO others
    FROM (SELECT FROM stg.other_events
          WHERE kafka_offset IS NOT NULL
          GROUP BY kafka_partition, kafka_offset, topic,
                   pg_catalog.sha256(pg_catalog.convert_to(message::text, 'UTF8'))
          HAVING pg_catalog.count(*) > 1) r;
    SELECT pg_catalog.count(*) INTO dead
    FROM (SELECT FROM dwh.dead_letters
          WHERE kafka_offset IS NOT NULL
          GROUP BY kafka_partition, kafka_offset, source, topic, pg_catalog.sha256(raw)
          HAVING pg_catalog.count(*) > 1) r;
    IF others > 0 OR dead > 0 THEN
        RAISE EXCEPTION 'cannot update dwh to 1.1: a message is stored more than once at the same Kafka position'
            USING ERRCODE = 'unique_violation',
                  DETAIL = pg_catalog.format('%s messages of stg.other_events and %s of dwh.dead_letters are stored more than once with the same partition, offset and bytes and no topic; dwh 1.1 keeps such a message once.', others, dead),
                  HINT = 'Delete all but the first row (lowest id) of each, then run ALTER EXTENSION dwh UPDATE again.';
    END IF;
END
$repeats$;

-- Other events (issue 11): who handed a message in and the SHA-256 of its
-- bytes identify it with its Kafka position.  1.0 kept no source (its
-- worker and the SQL functions wrote alike): a row with a Kafka offset is
-- taken for the worker's, one without for a SQL caller's (a wrong guess
-- costs nothing: a later message at that position is stored, flagged at
-- worst).  1.0 kept no raw bytes either: the message's text stands for
-- them, as the BEFORE INSERT trigger below does for rows written in 1.0's
-- shape.  The columns are filled before they become NOT NULL, and the
-- unique index is made after.
ALTER TABLE stg.other_events
    ADD COLUMN source text,
    ADD COLUMN raw_sha256 bytea,
    ADD COLUMN position_mismatch boolean NOT NULL DEFAULT false;
UPDATE stg.other_events
SET source = CASE WHEN kafka_offset IS NOT NULL THEN 'kafka' ELSE 'sql' END,
    raw_sha256 = pg_catalog.sha256(pg_catalog.convert_to(message::text, 'UTF8'));
ALTER TABLE stg.other_events
    ALTER COLUMN source SET NOT NULL,
    ALTER COLUMN raw_sha256 SET NOT NULL;
DROP INDEX stg.other_events_kafka_position_idx;
-- A message is identified by who handed it in, its Kafka position and its
-- bytes: delivered again (dwh.kafka_seek, a loader's retry) it is kept
-- once, and a position a SQL caller named never hides what the Kafka worker
-- later reads there.  Other bytes at a known position are kept too,
-- flagged (see dwh.ingest_orders).
CREATE UNIQUE INDEX other_events_kafka_position_idx
    ON stg.other_events (kafka_partition, kafka_offset, source, topic, raw_sha256)
    NULLS NOT DISTINCT
    WHERE kafka_offset IS NOT NULL;
COMMENT ON COLUMN stg.other_events.source IS 'Who handed it in: kafka (the Kafka worker) or sql (dwh.ingest_order[s]); part of what identifies it with its Kafka position';
COMMENT ON COLUMN stg.other_events.raw_sha256 IS 'SHA-256 of the message exactly as received: the same bytes at the same source and position are a replay, kept once';
COMMENT ON COLUMN stg.other_events.position_mismatch IS 'True when other bytes were already stored at this source and Kafka position (as an other event or a dead letter): a recreated topic, or a caller that named a wrong position';

-- Rows written in 1.0's shape (a 1.0 dump restored with --data-only, a
-- loader's INSERT naming 1.0's columns) lack source and raw_sha256: they
-- are filled as the update from 1.0 fills the rows it finds (the raw bytes
-- are not known, the message's text stands for them).  The ingest names
-- both columns, so the WHEN clause never calls the function for its rows.
CREATE FUNCTION dwh.other_events_complete() RETURNS trigger
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    IF NEW.source IS NULL THEN
        NEW.source := CASE WHEN NEW.kafka_offset IS NOT NULL THEN 'kafka' ELSE 'sql' END;
    END IF;
    IF NEW.raw_sha256 IS NULL THEN
        NEW.raw_sha256 := pg_catalog.sha256(pg_catalog.convert_to(NEW.message::text, 'UTF8'));
    END IF;
    RETURN NEW;
END
$fn$;
COMMENT ON FUNCTION dwh.other_events_complete() IS
    'BEFORE INSERT trigger of stg.other_events: fills source and raw_sha256 of a row written without them (1.0''s columns), as the update from 1.0 filled its rows';

CREATE TRIGGER other_events_complete
    BEFORE INSERT ON stg.other_events
    FOR EACH ROW WHEN (NEW.source IS NULL OR NEW.raw_sha256 IS NULL)
    EXECUTE FUNCTION dwh.other_events_complete();

-- DDS (install/20_dds.sql): the references of the order links and
-- satellites are checked once per statement instead of by foreign keys.
ALTER TABLE dds.l_order_user DROP CONSTRAINT l_order_user_h_order_pk_fkey,
    DROP CONSTRAINT l_order_user_h_user_pk_fkey;
ALTER TABLE dds.l_order_product DROP CONSTRAINT l_order_product_h_order_pk_fkey,
    DROP CONSTRAINT l_order_product_h_product_pk_fkey;
ALTER TABLE dds.s_order_cost DROP CONSTRAINT s_order_cost_h_order_pk_fkey;
ALTER TABLE dds.s_order_status DROP CONSTRAINT s_order_status_h_order_pk_fkey;

-- References of the order tables, checked once per statement.  The links
-- and satellites of orders take about ten rows per order; as foreign keys,
-- each row ran a query of its own and locked its hub rows (about a third
-- of the CPU of a batch).  They refuse the same rows set-based instead:
-- after each INSERT, each distinct key of the statement's new rows is
-- looked up in its hub (SQLSTATE 23503, as a foreign key would say;
-- src/dwh_references.c).  No row lock is needed to keep the check true
-- until commit, because hub rows are never deleted and their keys never
-- change (refused below); a TRUNCATE of a hub must take the tables that
-- refer to it along.  Updates of the reference columns are refused: dwh
-- replaces a link, it never repoints it.
CREATE FUNCTION dwh.order_references_exist() RETURNS trigger
    AS 'MODULE_PATHNAME', 'dwh_order_references_exist'
    LANGUAGE C;
COMMENT ON FUNCTION dwh.order_references_exist() IS
    'AFTER INSERT statement trigger of the order links and satellites: every row''s hubs exist (23503 otherwise)';

CREATE FUNCTION dwh.order_references_kept() RETURNS trigger
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'rows of dds.% cannot be deleted', TG_TABLE_NAME
            USING ERRCODE = '23503',
                  DETAIL = 'Links and satellites refer to hub rows, which DDS never deletes.',
                  HINT = 'DDS is derived from STG: SELECT * FROM dwh.rebuild(vault => true) recomputes it.';
    ELSIF TG_OP = 'UPDATE' THEN
        RAISE EXCEPTION 'key columns of dds.% cannot be updated', TG_TABLE_NAME
            USING ERRCODE = '23503',
                  DETAIL = 'Hub keys are fixed, and a link is replaced, never repointed.',
                  HINT = 'DDS is derived from STG: SELECT * FROM dwh.rebuild(vault => true) recomputes it.';
    END IF;
    -- TRUNCATE: the tables that refer to the hub must be empty now (taken
    -- along in the same command).
    IF (TG_TABLE_NAME = 'h_order'
        AND (EXISTS (SELECT FROM dds.l_order_user) OR EXISTS (SELECT FROM dds.l_order_product)
             OR EXISTS (SELECT FROM dds.s_order_status) OR EXISTS (SELECT FROM dds.s_order_cost)))
       OR (TG_TABLE_NAME = 'h_user' AND EXISTS (SELECT FROM dds.l_order_user))
       OR (TG_TABLE_NAME = 'h_product' AND EXISTS (SELECT FROM dds.l_order_product)) THEN
        RAISE EXCEPTION 'cannot truncate dds.% while rows refer to it', TG_TABLE_NAME
            USING ERRCODE = '23503',
                  DETAIL = 'Order links and satellites refer to its rows.',
                  HINT = 'Truncate the tables that refer to it in the same command, or run SELECT * FROM dwh.rebuild(vault => true).';
    END IF;
    RETURN NULL;
END
$fn$;
COMMENT ON FUNCTION dwh.order_references_kept() IS
    'Trigger of the hubs of orders, users and dishes and of the order links and satellites: refuses what would leave a reference dangling';

CREATE TRIGGER references_exist AFTER INSERT ON dds.l_order_user
    REFERENCING NEW TABLE AS added
    FOR EACH STATEMENT EXECUTE FUNCTION dwh.order_references_exist();
CREATE TRIGGER references_exist AFTER INSERT ON dds.l_order_product
    REFERENCING NEW TABLE AS added
    FOR EACH STATEMENT EXECUTE FUNCTION dwh.order_references_exist();
CREATE TRIGGER references_exist AFTER INSERT ON dds.s_order_status
    REFERENCING NEW TABLE AS added
    FOR EACH STATEMENT EXECUTE FUNCTION dwh.order_references_exist();
CREATE TRIGGER references_exist AFTER INSERT ON dds.s_order_cost
    REFERENCING NEW TABLE AS added
    FOR EACH STATEMENT EXECUTE FUNCTION dwh.order_references_exist();

CREATE TRIGGER references_kept BEFORE UPDATE OF h_order_pk, h_user_pk ON dds.l_order_user
    FOR EACH STATEMENT EXECUTE FUNCTION dwh.order_references_kept();
CREATE TRIGGER references_kept BEFORE UPDATE OF h_order_pk, h_product_pk ON dds.l_order_product
    FOR EACH STATEMENT EXECUTE FUNCTION dwh.order_references_kept();
CREATE TRIGGER references_kept BEFORE UPDATE OF h_order_pk ON dds.s_order_status
    FOR EACH STATEMENT EXECUTE FUNCTION dwh.order_references_kept();
CREATE TRIGGER references_kept BEFORE UPDATE OF h_order_pk ON dds.s_order_cost
    FOR EACH STATEMENT EXECUTE FUNCTION dwh.order_references_kept();
CREATE TRIGGER references_kept BEFORE DELETE OR UPDATE OF h_order_pk ON dds.h_order
    FOR EACH STATEMENT EXECUTE FUNCTION dwh.order_references_kept();
CREATE TRIGGER references_kept BEFORE DELETE OR UPDATE OF h_user_pk ON dds.h_user
    FOR EACH STATEMENT EXECUTE FUNCTION dwh.order_references_kept();
CREATE TRIGGER references_kept BEFORE DELETE OR UPDATE OF h_product_pk ON dds.h_product
    FOR EACH STATEMENT EXECUTE FUNCTION dwh.order_references_kept();
CREATE TRIGGER references_truncated AFTER TRUNCATE ON dds.h_order
    FOR EACH STATEMENT EXECUTE FUNCTION dwh.order_references_kept();
CREATE TRIGGER references_truncated AFTER TRUNCATE ON dds.h_user
    FOR EACH STATEMENT EXECUTE FUNCTION dwh.order_references_kept();
CREATE TRIGGER references_truncated AFTER TRUNCATE ON dds.h_product
    FOR EACH STATEMENT EXECUTE FUNCTION dwh.order_references_kept();

-- Where the order naming row of a dish belongs (docs/data-rule.md): its
-- first and newest naming by orders and its newest by menus.  Every batch
-- moves the newest order naming of the dishes it names; here that is an
-- update of columns no index holds, which PostgreSQL makes in the row's
-- page (the room fillfactor leaves) and prunes without a vacuum, while
-- the satellite row it decides stays where it is.  A row exists for each
-- dish that orders named; a batch's claim inserts it empty, at step 2 of
-- the lock order, and fills it at step 6.
CREATE TABLE dds.product_namings (
    h_product_pk    uuid PRIMARY KEY REFERENCES dds.h_product,
    first_order_dt  timestamp,
    last_order_dt   timestamp,
    last_order_name varchar,
    last_menu_dt    timestamp
) WITH (fillfactor = 50);
COMMENT ON TABLE dds.product_namings IS 'Each dish''s first and newest naming by orders and newest by menus: where its order naming row of s_product_names belongs';
COMMENT ON COLUMN dds.product_namings.h_product_pk IS 'The dish';
COMMENT ON COLUMN dds.product_namings.first_order_dt IS 'The oldest update_ts of an order version that names it';
COMMENT ON COLUMN dds.product_namings.last_order_dt IS 'The newest update_ts of an order version that names it';
COMMENT ON COLUMN dds.product_namings.last_order_name IS 'The greatest name (byte-wise) that order versions of last_order_dt give it';
COMMENT ON COLUMN dds.product_namings.last_menu_dt IS 'The newest version time of a menu that names it; null: no menu does';

-- A value without update_ts_utc has the version -infinity since 1.1 (1.0
-- gave it its load time, and the update recomputes DDS).
COMMENT ON COLUMN dds.s_user_names.load_dt IS 'Version: the value''s update_ts_utc (-infinity when absent)';
COMMENT ON COLUMN dds.s_restaurant_names.load_dt IS 'Version: the value''s update_ts_utc (-infinity when absent)';

-- CDM (install/30_cdm.sql): the users' CLOSED order counts, for the tag
-- rules over all of a user's orders.

-- Orders per user: what rules over all of a user's orders count (install/
-- 77_tags.sql).  Its deltas travel with the category mart's (the ingest
-- hands the order trigger's deltas over as six arrays, see
-- dwh.defer_mart_deltas) under two keys that no category has: a category
-- key is a UUID version 5, these are not.
CREATE TABLE cdm.user_order_counters (
    id          bigserial PRIMARY KEY,
    user_id     uuid NOT NULL UNIQUE,
    order_cnt   integer NOT NULL CHECK (order_cnt >= 0)
) WITH (fillfactor = 80);
COMMENT ON TABLE cdm.user_order_counters IS 'Orders per user: distinct CLOSED orders of the user';
COMMENT ON COLUMN cdm.user_order_counters.id IS 'Surrogate row number';
COMMENT ON COLUMN cdm.user_order_counters.user_id IS 'The user: dds.h_user.h_user_pk';
COMMENT ON COLUMN cdm.user_order_counters.order_cnt IS 'Number of the user''s CLOSED orders';

-- In the category deltas: the change of a user's CLOSED order count ...
CREATE FUNCTION dwh.all_orders_key() RETURNS uuid
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS 'SELECT ''00000000-0000-0000-0000-000000000000''::pg_catalog.uuid';
COMMENT ON FUNCTION dwh.all_orders_key() IS
    'Internal: the key that carries a user''s CLOSED order count delta among the category mart deltas (cdm.user_order_counters)';

-- ... and "some order of this user changed" (a positive delta, so that
-- summing the deltas of a batch never cancels it): the tag step locks
-- such users' rows before it refreshes their tags.
CREATE FUNCTION dwh.touched_user_key() RETURNS uuid
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS 'SELECT ''00000000-0000-0000-0000-000000000001''::pg_catalog.uuid';
COMMENT ON FUNCTION dwh.touched_user_key() IS
    'Internal: the key that marks, among the category mart deltas, a user some of whose orders changed (the tag step locks the user)';

-- Dishes (install/40_products.sql): menu namings and order namings have a
-- loader each, replacing dwh.load_products; the claim of the keys that
-- order batches share.
DROP FUNCTION dwh.load_products(uuid[], text[], text[], timestamp[], text);

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

-- Mart rows carry the dish name: follow a rename on every row of the dish.
CREATE OR REPLACE FUNCTION dwh.refresh_product_names(products uuid[]) RETURNS void
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

-- The marts' deltas carry the users' order counts and the users touched,
-- and refresh the user tags: a parameter more (install/77_tags.sql).  Each
-- mart's rows are locked in one pass in key order, new rows included
-- (test/isolation/specs/mart_new_rows.spec).
DROP FUNCTION dwh.apply_mart_deltas(uuid[], uuid[], integer[], uuid[], uuid[], integer[]);
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

-- Orders (install/50_orders.sql): the order trigger split into step
-- functions; the update trigger sees the versions it replaces; superseded
-- versions carried into DDS from their history table.

-- Orders new to DDS (the usual case): nothing counted before.  No other
-- transaction can write their hub, links or satellites meanwhile: an ingest
-- or an upsert would first conflict on stg.order_events.object_id, and a
-- direct write of history (a restore, say) holds the dictionary lock
-- exclusively (dwh.stg_statement_lock()).  So all are plain INSERTs: no
-- arbiter probes, no speculative insertions.  Rows go in hub key order:
-- the random UUID keys then fill index pages one after the other, and so
-- do the foreign-key checks.
CREATE FUNCTION dwh.load_new_orders(object_ids bigint[], versions timestamp[],
                                    payloads jsonb[],
                                    OUT product_users uuid[], OUT products uuid[],
                                    OUT product_deltas integer[],
                                    OUT category_users uuid[], OUT categories uuid[],
                                    OUT category_deltas integer[])
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    WITH batch AS MATERIALIZED (
        SELECT c.object_id,
               dwh.hash_key(c.object_id::text) AS h_order_pk,
               c.update_ts,
               (c.payload->>'date')::timestamp AS order_dt,
               c.payload->>'final_status' AS status,
               (c.payload->>'cost')::numeric(19, 5) AS cost,
               (c.payload->>'payment')::numeric(19, 5) AS payment,
               dwh.hash_key(c.payload->'user'->>'id') AS h_user_pk,
               c.payload->'order_items' AS items
        FROM unnest(object_ids, versions, payloads) AS c(object_id, update_ts, payload)
        ORDER BY h_order_pk
    ),
    item AS MATERIALIZED (
        SELECT DISTINCT b.h_order_pk, b.h_product_pk, b.h_user_pk, b.status
        FROM (SELECT b.*, dwh.hash_key(e->>'id') AS h_product_pk
              FROM batch b, jsonb_array_elements(b.items) e) b
        ORDER BY b.h_order_pk, b.h_product_pk
    ),
    category AS MATERIALIZED (
        SELECT l.h_product_pk, l.h_category_pk
        FROM dds.l_product_category l
        WHERE l.h_product_pk IN (SELECT h_product_pk FROM item)
    ),
    order_hub AS (
        INSERT INTO dds.h_order (h_order_pk, order_id, order_dt, load_dt, load_src)
        SELECT h_order_pk, object_id, order_dt, now() AT TIME ZONE 'UTC', 'stg.order_events'
        FROM batch
    ),
    order_user_link AS (
        INSERT INTO dds.l_order_user (hk_order_user_pk, h_order_pk, h_user_pk, load_dt, load_src)
        SELECT dwh.hash_key(h_order_pk, h_user_pk), h_order_pk, h_user_pk, now() AT TIME ZONE 'UTC', 'stg.order_events'
        FROM batch
    ),
    order_product_link AS (
        INSERT INTO dds.l_order_product (hk_order_product_pk, h_order_pk, h_product_pk, load_dt, load_src)
        SELECT dwh.hash_key(h_order_pk, h_product_pk), h_order_pk, h_product_pk, now() AT TIME ZONE 'UTC', 'stg.order_events'
        FROM item
    ),
    status_satellite AS (
        INSERT INTO dds.s_order_status
               (h_order_pk, status, hk_order_status_hashdiff, load_dt, load_src)
        SELECT h_order_pk, status, dwh.hash_key(h_order_pk::text || status),
               update_ts, 'stg.order_events'
        FROM batch
    ),
    cost_satellite AS (
        INSERT INTO dds.s_order_cost
               (h_order_pk, cost, payment, hk_order_cost_hashdiff, load_dt, load_src)
        SELECT h_order_pk, cost, payment,
               dwh.hash_key(h_order_pk::text || cost::text || payment::text),
               update_ts, 'stg.order_events'
        FROM batch
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
              GROUP BY i.h_user_pk, c.h_category_pk
              -- The users' CLOSED order counts, and the users touched
              -- (install/30_cdm.sql).
              UNION ALL
              SELECT h_user_pk, dwh.all_orders_key(), count(*)::integer
              FROM batch WHERE status = 'CLOSED'
              GROUP BY h_user_pk
              UNION ALL
              SELECT h_user_pk, dwh.touched_user_key(), count(*)::integer
              FROM batch
              GROUP BY h_user_pk) x
    )
    SELECT p.users, p.keys, p.deltas, c.users, c.keys, c.deltas
    INTO product_users, products, product_deltas,
         category_users, categories, category_deltas
    FROM product_delta_keys p, category_delta_keys c;
END
$fn$;
COMMENT ON FUNCTION dwh.load_new_orders(bigint[], timestamp[], jsonb[]) IS
    'Internal: load orders new to DDS (hub, links, satellites); returns the mart deltas they cause';

-- Orders DDS already holds (a new version, a replay, a restore): the deltas
-- take away what they counted before.  The current version is the greatest
-- of its update_ts: its values are that time's satellite row, whatever was
-- stored there.
CREATE FUNCTION dwh.load_known_orders(object_ids bigint[], versions timestamp[],
                                      payloads jsonb[],
                                    OUT product_users uuid[], OUT products uuid[],
                                      OUT product_deltas integer[],
                                      OUT category_users uuid[], OUT categories uuid[],
                                      OUT category_deltas integer[])
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    WITH batch AS MATERIALIZED (
        SELECT c.object_id,
               dwh.hash_key(c.object_id::text) AS h_order_pk,
               c.update_ts,
               (c.payload->>'date')::timestamp AS order_dt,
               c.payload->>'final_status' AS status,
               (c.payload->>'cost')::numeric(19, 5) AS cost,
               (c.payload->>'payment')::numeric(19, 5) AS payment,
               dwh.hash_key(c.payload->'user'->>'id') AS h_user_pk,
               c.payload->'order_items' AS items
        FROM unnest(object_ids, versions, payloads) AS c(object_id, update_ts, payload)
    ),
    item AS MATERIALIZED (
        SELECT DISTINCT b.h_order_pk, b.h_user_pk, b.status,
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
              FROM old_counted o JOIN category c USING (h_product_pk)
              -- The users' CLOSED order counts, and the users touched, the
              -- old ones too (install/30_cdm.sql).
              UNION ALL
              SELECT h_order_pk, h_user_pk, dwh.all_orders_key(), 1
              FROM batch WHERE status = 'CLOSED'
              UNION ALL
              SELECT c.h_order_pk, u.h_user_pk, dwh.all_orders_key(), -1
              FROM old_closed c JOIN old_user u USING (h_order_pk)
              UNION ALL
              SELECT h_order_pk, h_user_pk, dwh.touched_user_key(), 1
              FROM batch
              UNION ALL
              SELECT h_order_pk, h_user_pk, dwh.touched_user_key(), 1
              FROM old_user) x
        GROUP BY h_user_pk, h_category_pk
        HAVING sum(d) <> 0
    ),
    -- Hubs, links and satellites.
    order_hub AS (
        INSERT INTO dds.h_order AS h (h_order_pk, order_id, order_dt, load_dt, load_src)
        SELECT h_order_pk, object_id, order_dt, now() AT TIME ZONE 'UTC', 'stg.order_events'
        FROM batch
        ORDER BY h_order_pk
        ON CONFLICT (h_order_pk) DO UPDATE SET order_dt = EXCLUDED.order_dt
        WHERE h.order_dt IS DISTINCT FROM EXCLUDED.order_dt
    ),
    order_user_link AS (
        INSERT INTO dds.l_order_user (hk_order_user_pk, h_order_pk, h_user_pk, load_dt, load_src)
        SELECT dwh.hash_key(h_order_pk, h_user_pk), h_order_pk, h_user_pk, now() AT TIME ZONE 'UTC', 'stg.order_events'
        FROM batch
        ON CONFLICT DO NOTHING
    ),
    order_product_link AS (
        INSERT INTO dds.l_order_product (hk_order_product_pk, h_order_pk, h_product_pk, load_dt, load_src)
        SELECT dwh.hash_key(h_order_pk, h_product_pk), h_order_pk, h_product_pk, now() AT TIME ZONE 'UTC', 'stg.order_events'
        FROM item
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
END
$fn$;
COMMENT ON FUNCTION dwh.load_known_orders(bigint[], timestamp[], jsonb[]) IS
    'Internal: load new current versions of orders DDS holds; returns the mart deltas they cause';

-- Links of the replaced versions that the new ones no longer hold: one
-- hash anti-join, linear in the items whatever their number.
CREATE FUNCTION dwh.unlink_replaced_items(object_ids bigint[], payloads jsonb[])
    RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    -- The relation a DELETE joins carries its whole row into the join (to
    -- recheck it under concurrent updates): it holds the keys only, not the
    -- items, which made the anti-join below spill each link with its
    -- order's whole item list (gigabytes of temporary files for orders of
    -- a thousand items).
    WITH batch AS MATERIALIZED (
        SELECT dwh.hash_key(c.object_id::text) AS h_order_pk,
               dwh.hash_key(c.payload->'user'->>'id') AS h_user_pk
        FROM unnest(object_ids, payloads) AS c(object_id, payload)
    ),
    item AS MATERIALIZED (
        SELECT DISTINCT dwh.hash_key(c.object_id::text) AS h_order_pk,
               dwh.hash_key(e->>'id') AS h_product_pk
        FROM unnest(object_ids, payloads) AS c(object_id, payload),
             jsonb_array_elements(c.payload->'order_items') e
    ),
    stale_products AS (
        DELETE FROM dds.l_order_product l
        USING batch b
        WHERE l.h_order_pk = b.h_order_pk
          AND NOT EXISTS (SELECT FROM item i
                          WHERE i.h_order_pk = l.h_order_pk
                            AND i.h_product_pk = l.h_product_pk)
    )
    DELETE FROM dds.l_order_user l
    USING batch b
    WHERE l.h_order_pk = b.h_order_pk AND l.h_user_pk <> b.h_user_pk;
END
$fn$;
COMMENT ON FUNCTION dwh.unlink_replaced_items(bigint[], jsonb[]) IS
    'Internal: delete the order links that the orders'' new versions no longer hold';

-- Superseded versions of orders: the history keeps them (its trigger finds
-- what they brought already in DDS when they were current).
CREATE FUNCTION dwh.keep_superseded_orders(object_ids bigint[], versions timestamp[],
                                           payloads jsonb[], sent timestamp[])
    RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    INSERT INTO stg.order_event_history AS h (object_id, update_ts, payload, sent_dttm)
    SELECT * FROM unnest(object_ids, versions, payloads, sent)
    ORDER BY 1, 2
    ON CONFLICT (object_id, update_ts, payload_md5) DO UPDATE
    SET sent_dttm = EXCLUDED.sent_dttm
    WHERE EXCLUDED.sent_dttm > h.sent_dttm;
END
$fn$;
COMMENT ON FUNCTION dwh.keep_superseded_orders(bigint[], timestamp[], jsonb[], timestamp[]) IS
    'Internal: keep superseded order versions in stg.order_event_history';

-- Order versions a statement wrote, all of them or a chunk: the steps of
-- the lock order (install/40_products.sql) over them, as one batch.  Within
-- an ingest (dwh.keys_claimed()) the keys are claimed, the mart deltas kept
-- for the ingest's one pass (dwh.defer_mart_deltas) and the namings the
-- ingest's; any other writer claims and names here, and applies the
-- deltas unless it keeps them (keep_mart_deltas: returned to the trigger
-- that carries a statement in chunks).  An UPDATE's replaced versions
-- (superseded_*: those a new version replaced, not only its sent_dttm
-- grew) go to the history.
CREATE FUNCTION dwh.load_order_versions(op text, object_ids bigint[], versions timestamp[],
                                        payloads jsonb[],
                                        superseded_ids bigint[] DEFAULT NULL,
                                        superseded_versions timestamp[] DEFAULT NULL,
                                        superseded_payloads jsonb[] DEFAULT NULL,
                                        superseded_sent timestamp[] DEFAULT NULL,
                                        keep_mart_deltas boolean DEFAULT false,
                                        OUT product_users uuid[], OUT products uuid[],
                                        OUT product_deltas integer[],
                                        OUT category_users uuid[], OUT categories uuid[],
                                        OUT category_deltas integer[])
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    named record;
    d record;
    windows boolean;
    orders uuid[];
    before_users uuid[];
    before_tags text[];
    before_categories uuid[];
    before_counts integer[];
    w record;
BEGIN
    IF NOT dwh.keys_claimed() THEN
        named := dwh.claim_order_keys(payloads, versions, dwh.dictionary_lock_exclusive());
    END IF;

    -- The tag lock, shared, before DDS is read (step 3 of the lock order,
    -- install/40_products.sql): windowed tag rules count what the orders
    -- count now minus what they counted before, which holds only while no
    -- window moves and no rule changes until the batch commits.
    PERFORM dwh.xact_lock(dwh.tag_lock_key(), false);
    windows := NOT dwh.tags_restoring()
               AND EXISTS (SELECT FROM dwh.tag_rules r WHERE r.window_days IS NOT NULL);

    -- With windowed rules, what the orders count in the windows before
    -- (nothing for new orders) and after (dwh.tag_window_deltas, below).
    IF windows THEN
        orders := ARRAY(SELECT dwh.hash_key(o::text) FROM unnest(object_ids) o);
    END IF;

    -- Orders DDS does not hold yet take the shorter path.  (A restore
    -- replays orders whose history it may have loaded first.)  Probed by
    -- key: a join with the versions, planned once while the hub was small,
    -- kept scanning all of it for the session.
    IF op = 'INSERT' AND NOT EXISTS (SELECT FROM dds.h_order h
                                     WHERE h.order_id = ANY (object_ids)) THEN
        d := dwh.load_new_orders(object_ids, versions, payloads);
    ELSE
        IF windows THEN
            SELECT array_agg(b.user_id), array_agg(b.tag), array_agg(b.category_id),
                   array_agg(b.order_cnt)
            INTO before_users, before_tags, before_categories, before_counts
            FROM dwh.tag_window_counts(orders, NULL, NULL) b;
        END IF;
        d := dwh.load_known_orders(object_ids, versions, payloads);
    END IF;

    IF op = 'UPDATE' THEN
        PERFORM dwh.unlink_replaced_items(object_ids, payloads);
        PERFORM dwh.keep_superseded_orders(superseded_ids, superseded_versions,
                                           superseded_payloads, superseded_sent);
    END IF;

    -- The windowed tag counts' deltas travel with the category deltas
    -- (install/78_tag_windows.sql).
    product_users := d.product_users;
    products := d.products;
    product_deltas := d.product_deltas;
    category_users := d.category_users;
    categories := d.categories;
    category_deltas := d.category_deltas;
    IF windows THEN
        w := dwh.tag_window_deltas(orders, before_users, before_tags,
                                   before_categories, before_counts);
        IF w.keys IS NOT NULL THEN
            category_users := category_users || w.users;
            categories := categories || w.keys;
            category_deltas := category_deltas || w.deltas;
        END IF;
    END IF;

    -- The marts, after DDS.  (Within an ingest, deferred to the end of its
    -- upsert: one sorted pass for the INSERT and UPDATE triggers together.
    -- A chunk of a direct write returns them to its trigger, which sums
    -- the chunks' deltas before it applies them.)
    IF NOT keep_mart_deltas THEN
        IF NOT dwh.defer_mart_deltas(product_users, products, product_deltas,
                                     category_users, categories, category_deltas) THEN
            PERFORM dwh.apply_mart_deltas(product_users, products, product_deltas,
                                          category_users, categories, category_deltas);
        END IF;
        product_users := NULL;
        products := NULL;
        product_deltas := NULL;
        category_users := NULL;
        categories := NULL;
        category_deltas := NULL;
    END IF;

    IF NOT dwh.keys_claimed() THEN
        PERFORM dwh.load_order_namings(named.ids, named.names, named.item_versions,
                                       named.first_versions);
    END IF;
END
$fn$;
COMMENT ON FUNCTION dwh.load_order_versions(text, bigint[], timestamp[], jsonb[], bigint[], timestamp[], jsonb[], timestamp[], boolean) IS
    'Internal: carry order versions that a statement wrote into DDS and the marts (and an UPDATE''s replaced versions into the history); with keep_mart_deltas, return the mart deltas instead of applying them';

-- The trigger of stg.order_events (INSERT and UPDATE) and of
-- stg.order_event_history.  A direct write (a DBA's INSERT or COPY, a
-- restore) holds the dictionary lock and the user lock exclusive from its
-- first row (dwh.stg_statement_lock) to commit, and the tag lock shared
-- from its first chunk: no batch, menu change or writer of users, nor
-- after that a rule change or an expiry pass, writes DDS or the marts
-- meanwhile.  So its rows are carried dwh.trigger_chunk_rows at a time,
-- each chunk as a statement of its own would be, and a restore's COPY of
-- millions of orders holds one chunk in memory.  Only the marts wait: the
-- chunks' deltas are summed and applied when the sums pass 16 chunks'
-- worth of keys, or at the end.  Applied chunk by chunk, each chunk
-- updated again the mart rows of the chunks before it, whose versions this
-- transaction cannot prune: a chunk's pass took longer with every chunk.
-- The sums are taken each time the deltas kept have doubled, so the work
-- stays linear in the rows.  An UPDATE is chunked too, each new version
-- with the one it replaced.  An ingest's statements and a write under the
-- dictionary lock held shared are carried whole.  Like a batch it runs
-- without JIT: a chunk's plans would be compiled again at every chunk.
CREATE OR REPLACE FUNCTION dwh.order_events_changed() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
AS $fn$
DECLARE
    history boolean := TG_TABLE_NAME = 'order_event_history';
    chunk_rows integer;
    total bigint;
    seen bigint := 0;
    n integer := 0;
    m integer := 0;
    rows refcursor;
    r record;
    object_ids bigint[];
    versions timestamp[];
    payloads jsonb[];
    superseded_ids bigint[];
    superseded_versions timestamp[];
    superseded_payloads jsonb[];
    superseded_sent timestamp[];
    d record;
    kept_product_users uuid[];
    kept_products uuid[];
    kept_product_deltas integer[];
    kept_category_users uuid[];
    kept_categories uuid[];
    kept_category_deltas integer[];
    summed integer := 0;
BEGIN
    IF NOT dwh.keys_claimed() AND dwh.dictionary_lock_exclusive() THEN
        chunk_rows := current_setting('dwh.trigger_chunk_rows')::integer;
    END IF;

    IF chunk_rows IS NULL THEN
        SELECT array_agg(c.object_id), array_agg(c.update_ts), array_agg(c.payload)
        INTO object_ids, versions, payloads
        FROM changed c;
        IF object_ids IS NULL THEN
            RETURN NULL;
        ELSIF history THEN
            PERFORM dwh.load_history_versions(object_ids, versions, payloads);
            RETURN NULL;
        END IF;
        -- A replaced version is superseded (unless only its sent_dttm grew).
        IF TG_OP = 'UPDATE' THEN
            SELECT array_agg(o.object_id), array_agg(o.update_ts), array_agg(o.payload),
                   array_agg(o.sent_dttm)
            INTO superseded_ids, superseded_versions, superseded_payloads, superseded_sent
            FROM superseded o JOIN changed c USING (object_id)
            WHERE CASE WHEN o.update_ts <> c.update_ts THEN true
                       ELSE o.payload::text <> c.payload::text END;
        END IF;
        PERFORM dwh.load_order_versions(TG_OP, object_ids, versions, payloads,
                                        superseded_ids, superseded_versions,
                                        superseded_payloads, superseded_sent);
        RETURN NULL;
    END IF;

    -- In chunks: each new version with the one it replaced, for an UPDATE
    -- (no UPDATE changes a key: dwh.stg_guard).
    IF TG_OP = 'UPDATE' THEN
        OPEN rows FOR
            SELECT c.object_id, c.update_ts, c.payload,
                   CASE WHEN o.update_ts <> c.update_ts THEN true
                        ELSE o.payload::text <> c.payload::text END AS superseded,
                   o.update_ts AS old_version, o.payload AS old_payload,
                   o.sent_dttm AS old_sent
            FROM changed c JOIN superseded o USING (object_id);
    ELSE
        OPEN rows FOR
            SELECT c.object_id, c.update_ts, c.payload, false AS superseded
            FROM changed c;
    END IF;
    SELECT count(*) INTO total FROM changed;
    LOOP
        FETCH rows INTO r;
        EXIT WHEN NOT FOUND;
        n := n + 1;
        seen := seen + 1;
        object_ids[n] := r.object_id;
        versions[n] := r.update_ts;
        payloads[n] := r.payload;
        IF r.superseded THEN
            m := m + 1;
            superseded_ids[m] := r.object_id;
            superseded_versions[m] := r.old_version;
            superseded_payloads[m] := r.old_payload;
            superseded_sent[m] := r.old_sent;
        END IF;
        CONTINUE WHEN n < chunk_rows AND seen < total;

        IF history THEN
            PERFORM dwh.load_history_versions(object_ids, versions, payloads);
        ELSE
            d := dwh.load_order_versions(TG_OP, object_ids, versions, payloads,
                                         superseded_ids, superseded_versions,
                                         superseded_payloads, superseded_sent,
                                         keep_mart_deltas => true);
            kept_product_users := kept_product_users || d.product_users;
            kept_products := kept_products || d.products;
            kept_product_deltas := kept_product_deltas || d.product_deltas;
            kept_category_users := kept_category_users || d.category_users;
            kept_categories := kept_categories || d.categories;
            kept_category_deltas := kept_category_deltas || d.category_deltas;
            IF coalesce(cardinality(kept_products), 0) + coalesce(cardinality(kept_categories), 0)
                   >= 2 * greatest(summed, chunk_rows)
               OR seen = total THEN
                d := dwh.sum_mart_deltas(kept_product_users, kept_products,
                                         kept_product_deltas);
                kept_product_users := d.summed_users;
                kept_products := d.summed_keys;
                kept_product_deltas := d.summed_deltas;
                d := dwh.sum_mart_deltas(kept_category_users, kept_categories,
                                         kept_category_deltas);
                kept_category_users := d.summed_users;
                kept_categories := d.summed_keys;
                kept_category_deltas := d.summed_deltas;
                summed := coalesce(cardinality(kept_products), 0)
                          + coalesce(cardinality(kept_categories), 0);
            END IF;
            -- Past 16 chunks' worth of keys once summed (an apply sets summed
            -- back to 0), or at the end.
            IF summed >= 16 * chunk_rows OR seen = total THEN
                PERFORM dwh.apply_mart_deltas(kept_product_users, kept_products,
                                              kept_product_deltas, kept_category_users,
                                              kept_categories, kept_category_deltas);
                kept_product_users := NULL;
                kept_products := NULL;
                kept_product_deltas := NULL;
                kept_category_users := NULL;
                kept_categories := NULL;
                kept_category_deltas := NULL;
                summed := 0;
            END IF;
        END IF;
        n := 0;
        m := 0;
        object_ids := NULL;
        versions := NULL;
        payloads := NULL;
        superseded_ids := NULL;
        superseded_versions := NULL;
        superseded_payloads := NULL;
        superseded_sent := NULL;
    END LOOP;
    CLOSE rows;
    RETURN NULL;
END
$fn$;
COMMENT ON FUNCTION dwh.order_events_changed() IS
    'AFTER INSERT/UPDATE statement trigger of stg.order_events and AFTER INSERT statement trigger of stg.order_event_history: carries the versions written into DDS and the marts';

DROP TRIGGER order_events_updated ON stg.order_events;
CREATE TRIGGER order_events_updated
    AFTER UPDATE ON stg.order_events
    REFERENCING OLD TABLE AS superseded NEW TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION dwh.order_events_changed();

-- Superseded versions of orders (stg.order_event_history): they name
-- dishes, pair dishes with restaurants, bring hubs, and give the status and
-- cost rows of their update_ts when they are the greatest version of that
-- time.  An order's links and counts follow its current version only.
CREATE FUNCTION dwh.load_superseded_orders(object_ids bigint[], versions timestamp[],
                                           payloads jsonb[])
    RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    WITH version AS MATERIALIZED (
        SELECT v.object_id, dwh.hash_key(v.object_id::text) AS h_order_pk,
               v.update_ts, (v.payload->>'date')::timestamp AS order_dt
        FROM unnest(object_ids, versions, payloads) AS v(object_id, update_ts, payload)
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
        JOIN (SELECT DISTINCT object_id, update_ts FROM version) a
          USING (object_id, update_ts)
        WHERE NOT EXISTS (SELECT FROM stg.order_events c
                          WHERE c.object_id = h.object_id AND c.update_ts = h.update_ts)
        ORDER BY h.object_id, h.update_ts, h.payload::text COLLATE "C" DESC
    ),
    -- order_dt is the current version's: set here only for an order whose
    -- current version is not loaded yet (a restore), then by it (and
    -- below).
    order_hub AS (
        INSERT INTO dds.h_order (h_order_pk, order_id, order_dt, load_dt, load_src)
        SELECT DISTINCT ON (h_order_pk) h_order_pk, object_id, order_dt, now() AT TIME ZONE 'UTC',
               'stg.order_events'
        FROM version
        ORDER BY h_order_pk, update_ts DESC
        ON CONFLICT DO NOTHING
    ),
    -- A version the order held before (the usual case: its current
    -- version, just replaced) finds its rows as they are: not even locked.
    status_satellite AS (
        INSERT INTO dds.s_order_status AS s
               (h_order_pk, status, hk_order_status_hashdiff, load_dt, load_src)
        SELECT h_order_pk, status, dwh.hash_key(h_order_pk::text || status),
               update_ts, 'stg.order_events'
        FROM winner w
        WHERE NOT EXISTS (SELECT FROM dds.s_order_status p
                          WHERE p.h_order_pk = w.h_order_pk AND p.load_dt = w.update_ts
                            AND p.status = w.status)
        ORDER BY h_order_pk, update_ts
        ON CONFLICT (h_order_pk, load_dt) DO UPDATE
        SET status = EXCLUDED.status,
            hk_order_status_hashdiff = EXCLUDED.hk_order_status_hashdiff
        WHERE s.status IS DISTINCT FROM EXCLUDED.status
    )
    INSERT INTO dds.s_order_cost AS s
           (h_order_pk, cost, payment, hk_order_cost_hashdiff, load_dt, load_src)
    SELECT h_order_pk, cost, payment,
           dwh.hash_key(h_order_pk::text || cost::text || payment::text),
           update_ts, 'stg.order_events'
    FROM winner w
    WHERE NOT EXISTS (SELECT FROM dds.s_order_cost p
                      WHERE p.h_order_pk = w.h_order_pk AND p.load_dt = w.update_ts
                        AND p.cost = w.cost AND p.payment = w.payment)
    ORDER BY h_order_pk, update_ts
    ON CONFLICT (h_order_pk, load_dt) DO UPDATE
    SET cost = EXCLUDED.cost, payment = EXCLUDED.payment,
        hk_order_cost_hashdiff = EXCLUDED.hk_order_cost_hashdiff
    WHERE (s.cost, s.payment) IS DISTINCT FROM (EXCLUDED.cost, EXCLUDED.payment);

    -- An order without a current version (a restore that has not loaded it
    -- yet, or left it out) takes the date of its greatest version, not of
    -- whichever came first.  Ingests and direct writes of current versions
    -- never get here: their orders have one.
    UPDATE dds.h_order o
    SET order_dt = w.order_dt
    FROM (SELECT DISTINCT a.object_id
          FROM unnest(object_ids) AS a(object_id)
          WHERE NOT EXISTS (SELECT FROM stg.order_events c
                            WHERE c.object_id = a.object_id)) a
    CROSS JOIN LATERAL (
        SELECT (h.payload->>'date')::timestamp AS order_dt
        FROM stg.order_event_history h
        WHERE h.object_id = a.object_id
        ORDER BY h.update_ts DESC, h.payload::text COLLATE "C" DESC
        LIMIT 1) w
    WHERE o.h_order_pk = dwh.hash_key(a.object_id::text)
      AND o.order_dt IS DISTINCT FROM w.order_dt;
END
$fn$;
COMMENT ON FUNCTION dwh.load_superseded_orders(bigint[], timestamp[], jsonb[]) IS
    'Internal: load superseded order versions: order hubs and the satellite rows of their update_ts';

-- Superseded versions written to stg.order_event_history, all of them or a
-- chunk: their keys, their satellite rows, their namings.
CREATE FUNCTION dwh.load_history_versions(object_ids bigint[], versions timestamp[],
                                          payloads jsonb[])
    RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    named record;
BEGIN
    IF NOT dwh.keys_claimed() THEN
        named := dwh.claim_order_keys(payloads, versions, dwh.dictionary_lock_exclusive());
    END IF;
    PERFORM dwh.load_superseded_orders(object_ids, versions, payloads);
    IF NOT dwh.keys_claimed() THEN
        PERFORM dwh.load_order_namings(named.ids, named.names, named.item_versions,
                                       named.first_versions);
    END IF;
END
$fn$;
COMMENT ON FUNCTION dwh.load_history_versions(bigint[], timestamp[], jsonb[]) IS
    'Internal: carry superseded order versions that a statement wrote into DDS';

CREATE TRIGGER order_event_history_added
    AFTER INSERT ON stg.order_event_history
    REFERENCING NEW TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION dwh.order_events_changed();

-- Dictionaries (install/60_dictionaries.sql): one loader per kind for
-- current and superseded values; the update triggers see the values they
-- replace.

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
CREATE OR REPLACE FUNCTION dwh.users_changed() RETURNS trigger
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

DROP TRIGGER users_updated ON stg.users;
CREATE TRIGGER users_updated
    AFTER UPDATE ON stg.users
    REFERENCING OLD TABLE AS superseded NEW TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION dwh.users_changed();

CREATE TRIGGER user_history_added
    AFTER INSERT ON stg.user_history
    REFERENCING NEW TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION dwh.users_changed();

-- A dish moved to another category touches the users of the CLOSED
-- orders holding it (their windowed tag rules are recounted).
CREATE OR REPLACE FUNCTION dwh.move_products(products uuid[], categories uuid[],
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
CREATE OR REPLACE FUNCTION dwh.restaurants_changed() RETURNS trigger
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

DROP TRIGGER restaurants_updated ON stg.restaurants;
CREATE TRIGGER restaurants_updated
    AFTER UPDATE ON stg.restaurants
    REFERENCING OLD TABLE AS superseded NEW TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION dwh.restaurants_changed();

CREATE TRIGGER restaurant_history_added
    AFTER INSERT ON stg.restaurant_history
    REFERENCING NEW TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION dwh.restaurants_changed();

-- Ingest (install/70_ingest.sql).

-- Dead letters (issue 11): a bounded prefix of the value, its length and
-- the SHA-256 of all of it.  Rows of 1.0 kept their values whole: length
-- and hash come from raw, before the columns become NOT NULL (their raw is
-- not cut to dwh.dead_letter_keep_bytes: nothing says which were refused
-- for their size).  The unique index is made after.
ALTER TABLE dwh.dead_letters
    ADD COLUMN raw_length bigint,
    ADD COLUMN raw_sha256 bytea,
    ADD COLUMN position_mismatch boolean NOT NULL DEFAULT false;
UPDATE dwh.dead_letters
SET raw_length = pg_catalog.length(raw), raw_sha256 = pg_catalog.sha256(raw);
ALTER TABLE dwh.dead_letters
    ALTER COLUMN raw_length SET NOT NULL,
    ALTER COLUMN raw_sha256 SET NOT NULL;
DROP INDEX dwh.dead_letters_kafka_position_idx;
-- A message is identified by who handed it in, its Kafka position and its
-- bytes: delivered again (dwh.kafka_seek, a loader's retry) it is
-- dead-lettered once, and a position a SQL caller named never hides what
-- the Kafka worker later reads there.  Other bytes at a known position are
-- kept too, flagged (see dwh.ingest_orders).
CREATE UNIQUE INDEX dead_letters_kafka_position_idx
    ON dwh.dead_letters (kafka_partition, kafka_offset, source, topic, raw_sha256)
    NULLS NOT DISTINCT
    WHERE kafka_offset IS NOT NULL;
COMMENT ON TABLE dwh.dead_letters IS 'Values that could not be loaded, with their raw bytes (a bounded prefix), origin and reason';
COMMENT ON COLUMN dwh.dead_letters.source IS 'Who handed it in: kafka (the Kafka worker), redis (the Redis worker) or sql (dwh.ingest_order[s]); part of what identifies it with its Kafka position';
COMMENT ON COLUMN dwh.dead_letters.raw IS 'The value exactly as received (for a Redis key refused as a key: the key), or its first dwh.dead_letter_keep_bytes bytes when it is longer (then shorter than raw_length)';
COMMENT ON COLUMN dwh.dead_letters.source_key IS 'Redis key (or Kafka message key), when known; NULL for a Redis key refused as a key (not valid UTF-8, a NUL byte, longer than 128 bytes), whose bytes are in raw';
-- A Redis key found by SCAN that cannot be a text key (not valid UTF-8, a
-- NUL byte, longer than 128 bytes) is dead-lettered with source_key NULL
-- and the key in raw.  Every refresh pass finds it again: this index keeps
-- one dead letter per such key.  (1.0 always wrote source_key for Redis:
-- its rows cannot break it.  Keys that 1.0 stored and 1.1 would refuse stay
-- where they are; see docs/upgrades.md.)
CREATE UNIQUE INDEX dead_letters_redis_key_idx
    ON dwh.dead_letters (raw_sha256)
    WHERE source = 'redis' AND source_key IS NULL;
COMMENT ON COLUMN dwh.dead_letters.raw_length IS 'Length in bytes of the whole value';
COMMENT ON COLUMN dwh.dead_letters.raw_sha256 IS 'SHA-256 of the whole value: checks a copy found elsewhere, and the same bytes at the same source and position are a replay, kept once';
COMMENT ON COLUMN dwh.dead_letters.position_mismatch IS 'True when other bytes were already stored at this source and Kafka position (as a dead letter or an other event): a recreated topic, or a caller that named a wrong position';

-- Rows written in 1.0's shape (a 1.0 dump restored with --data-only)
-- lack raw_length and raw_sha256: 1.0 kept the whole value, so both come
-- from raw, as the update from 1.0 fills the rows it finds.  A row whose
-- raw is shorter than the raw_length it names is a prefix: its hash is not
-- made up, the row is refused (raw_sha256 stays null).  The ingest and
-- the Redis worker name both columns, so the WHEN clause never calls the
-- function for their rows.
CREATE FUNCTION dwh.dead_letters_complete() RETURNS trigger
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    IF NEW.raw_length IS NULL THEN
        NEW.raw_length := pg_catalog.length(NEW.raw);
    END IF;
    IF NEW.raw_sha256 IS NULL AND NEW.raw_length = pg_catalog.length(NEW.raw) THEN
        NEW.raw_sha256 := pg_catalog.sha256(NEW.raw);
    END IF;
    RETURN NEW;
END
$fn$;
COMMENT ON FUNCTION dwh.dead_letters_complete() IS
    'BEFORE INSERT trigger of dwh.dead_letters: fills raw_length and raw_sha256 of a row written without them (1.0''s columns) from its whole raw value, as the update from 1.0 filled its rows';

CREATE TRIGGER dead_letters_complete
    BEFORE INSERT ON dwh.dead_letters
    FOR EACH ROW WHEN (NEW.raw_length IS NULL OR NEW.raw_sha256 IS NULL)
    EXECUTE FUNCTION dwh.dead_letters_complete();

-- Removing or changing a dead letter (an operator's DELETE, or
-- dwh.replay_dead_letters()) is a write in the lock order: the rows it
-- locks are the ones a replay waits for, so it takes the dictionary lock
-- first, as a write of orders does (src/dwh_locks.c).
CREATE TRIGGER dead_letters_lock
    BEFORE UPDATE OR DELETE ON dwh.dead_letters
    FOR EACH STATEMENT EXECUTE FUNCTION dwh.stg_statement_lock();

COMMENT ON FUNCTION dwh.ingest_order(bytea, text, integer, bigint) IS
    'Ingest one raw Kafka message value; returns applied, unchanged, other_type, dead_letter, replayed or mismatch';
COMMENT ON FUNCTION dwh.ingest_order(text, text, integer, bigint) IS
    'Ingest one Kafka message value given as text; returns applied, unchanged, other_type, dead_letter, replayed or mismatch';

-- dwh.ingest_orders has two more OUT parameters: a changed result type
-- cannot be replaced.  The old function is renamed, not dropped, until the
-- privileges that DBAs granted on it (a loader's EXECUTE) are granted on
-- the new one, each by its grantor; see "Privileges" at the end.
ALTER FUNCTION dwh.ingest_orders(bytea[], text, integer[], bigint[])
    RENAME TO ingest_orders_1_0;
CREATE FUNCTION dwh.ingest_orders(messages bytea[], topic text DEFAULT NULL,
                                  kafka_partitions integer[] DEFAULT NULL,
                                  kafka_offsets bigint[] DEFAULT NULL,
                                  OUT received integer, OUT applied integer,
                                  OUT unchanged integer, OUT other_type integer,
                                  OUT dead_lettered integer, OUT replayed integer,
                                  OUT mismatched integer)
    AS 'MODULE_PATHNAME', 'dwh_ingest_orders'
    LANGUAGE C VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION dwh.ingest_orders(bytea[], text, integer[], bigint[]) IS
    'Ingest a batch of raw Kafka message values set-based: one statement per destination; received = applied + unchanged + other_type + dead_lettered + replayed, mismatched counts the stored ones flagged position_mismatch';

DO $grants$
DECLARE
    updater name := current_user;
    g record;
BEGIN
    -- A superuser's GRANT is the owner's; a grant by another role is made
    -- again as that role, after the grant that gave it the grant option.
    FOR g IN
        SELECT a.grantor, a.grantee, a.privilege_type, a.is_grantable,
               a.grantor <> p.proowner AS by_other
        FROM pg_catalog.pg_proc p, pg_catalog.aclexplode(p.proacl) a
        WHERE p.oid = 'dwh.ingest_orders_1_0(bytea[], text, integer[], bigint[])'::pg_catalog.regprocedure
          AND a.grantee <> p.proowner
    LOOP
        BEGIN
            IF g.by_other THEN
                EXECUTE pg_catalog.format('SET LOCAL ROLE %s', g.grantor::pg_catalog.regrole);
            END IF;
            EXECUTE pg_catalog.format('GRANT %s ON FUNCTION dwh.ingest_orders(bytea[], text, integer[], bigint[]) TO %s%s',
                                      g.privilege_type,
                                      CASE WHEN g.grantee = 0 THEN 'PUBLIC'
                                           ELSE g.grantee::pg_catalog.regrole::text END,
                                      CASE WHEN g.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END);
            IF g.by_other THEN
                EXECUTE pg_catalog.format('SET LOCAL ROLE %I', updater);
            END IF;
        EXCEPTION WHEN insufficient_privilege THEN
            -- The grantor may no longer reach schema dwh: the update goes
            -- on, and says what a DBA has to grant again.
            RAISE WARNING 'could not grant % on function dwh.ingest_orders again to %, as %',
                g.privilege_type,
                CASE WHEN g.grantee = 0 THEN 'PUBLIC' ELSE g.grantee::pg_catalog.regrole::text END,
                g.grantor::pg_catalog.regrole
                USING DETAIL = SQLERRM,
                      HINT = 'Grant it again after the update.';
        END;
    END LOOP;
END
$grants$;
DROP FUNCTION dwh.ingest_orders_1_0(bytea[], text, integer[], bigint[]);

CREATE FUNCTION dwh.keys_claimed() RETURNS boolean
    AS 'MODULE_PATHNAME', 'dwh_keys_claimed'
    LANGUAGE C VOLATILE;
COMMENT ON FUNCTION dwh.keys_claimed() IS
    'Internal: inside an ingest, has it claimed the keys of the versions being written (see dwh.claim_order_keys)?';

-- What dwh.replay_dead_letters hands back to the ingest: a dead letter's
-- value with its own source, so that a replayed Kafka message keeps its
-- identity (a later redelivery of it is still a replay).  EXECUTE is
-- revoked from PUBLIC below: only the replay, as the extension's owner,
-- calls it.
CREATE FUNCTION dwh.ingest_dead_letter(message bytea, source text, topic text,
                                       kafka_partition integer, kafka_offset bigint)
    RETURNS text
    AS 'MODULE_PATHNAME', 'dwh_ingest_dead_letter'
    LANGUAGE C VOLATILE SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION dwh.ingest_dead_letter(bytea, text, text, integer, bigint) IS
    'Internal: ingest a dead letter''s value again under its own source (kafka or sql); returns what dwh.ingest_order returns';

-- Replay: takes the dictionary lock (1.1), hands each dead letter back
-- under its own source, and leaves the truncated ones.
CREATE OR REPLACE FUNCTION dwh.replay_dead_letters(ids bigint[] DEFAULT NULL)
    RETURNS TABLE (dead_letter_id bigint, outcome text)
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    d dwh.dead_letters;
BEGIN
    -- One ingest per dead letter in one transaction: the dictionary lock
    -- and the user lock exclusive keep writes of other transactions from
    -- interleaving with them, and let each ingest after the first, a later
    -- write, go on (docs/data-rule.md, "one lock order").
    PERFORM dwh.xact_lock(dwh.dictionary_lock_key(), true);
    PERFORM dwh.xact_lock(dwh.user_lock_key(), true);
    FOR d IN
        SELECT * FROM dwh.dead_letters
        WHERE (ids IS NULL OR id = ANY (ids)) AND source IN ('kafka', 'sql')
        ORDER BY id
        FOR UPDATE
    LOOP
        dead_letter_id := d.id;
        IF pg_catalog.length(d.raw) < d.raw_length THEN
            outcome := 'truncated';
            RETURN NEXT;
            CONTINUE;
        END IF;
        DELETE FROM dwh.dead_letters WHERE id = d.id;
        outcome := dwh.ingest_dead_letter(d.raw, d.source, d.topic,
                                          d.kafka_partition, d.kafka_offset);
        RETURN NEXT;
    END LOOP;
END
$fn$;
COMMENT ON FUNCTION dwh.replay_dead_letters(bigint[]) IS
    'Ingest order dead letters again (all, or those ids); returns what became of each (truncated: kept, only a prefix of its value is stored)';

-- Kafka (install/75_kafka.sql): the gaps, and the views that show them
-- without ever waiting for a lock.
-- A gap is written in the transaction that moves the partition's stored
-- offset past it (dwh.kafka_on_gap = skip), or open, stopping the
-- partition, until dwh.kafka_seek() moves it (stop): never twice, never lost.
CREATE TABLE dwh.kafka_gaps (
    id               bigserial PRIMARY KEY,
    topic            text NOT NULL,
    kafka_partition  integer NOT NULL,
    next_offset      bigint NOT NULL,
    log_start_offset bigint NOT NULL,
    log_end_offset   bigint NOT NULL,
    action           text NOT NULL CHECK (action IN ('skipped', 'stopped')),
    detected_at      timestamptz NOT NULL DEFAULT now(),
    resumed_offset   bigint,
    resumed_at       timestamptz,
    CHECK ((resumed_offset IS NULL) = (resumed_at IS NULL))
);
-- At most one open gap per partition: it is what stops the partition.
CREATE UNIQUE INDEX kafka_gaps_open_idx ON dwh.kafka_gaps (topic, kafka_partition)
    WHERE resumed_at IS NULL;
CREATE INDEX kafka_gaps_partition_idx ON dwh.kafka_gaps (topic, kafka_partition, detected_at);
COMMENT ON TABLE dwh.kafka_gaps IS 'Kafka messages lost before they were applied: each time the broker no longer held a partition''s stored offset (retention, deleted records, a recreated topic)';
COMMENT ON COLUMN dwh.kafka_gaps.id IS 'Surrogate row number';
COMMENT ON COLUMN dwh.kafka_gaps.topic IS 'Kafka topic';
COMMENT ON COLUMN dwh.kafka_gaps.kafka_partition IS 'Partition number';
COMMENT ON COLUMN dwh.kafka_gaps.next_offset IS 'The stored offset of the first message not applied, which the broker no longer held: offsets next_offset to log_start_offset - 1 were never applied';
COMMENT ON COLUMN dwh.kafka_gaps.log_start_offset IS 'The first offset the broker held (its low watermark); below next_offset when the log ends before next_offset (topic recreated or truncated)';
COMMENT ON COLUMN dwh.kafka_gaps.log_end_offset IS 'The offset of the broker''s next message (its high watermark)';
COMMENT ON COLUMN dwh.kafka_gaps.action IS 'What the worker did (dwh.kafka_on_gap): skipped (went on from log_start_offset) or stopped (consumed nothing more from the partition until dwh.kafka_seek())';
COMMENT ON COLUMN dwh.kafka_gaps.detected_at IS 'When the worker found the gap';
COMMENT ON COLUMN dwh.kafka_gaps.resumed_offset IS 'Where consumption went on: log_start_offset when skipped, the offset given to dwh.kafka_seek() when stopped; NULL while the partition is stopped';
COMMENT ON COLUMN dwh.kafka_gaps.resumed_at IS 'When consumption went on; NULL while the partition is stopped';

-- What was applied last of each partition: a worker starting it again
-- checks that the broker holds that message there (src/dwh_kafka_verify.c).
ALTER TABLE dwh.kafka_offsets ADD COLUMN last_sha256 bytea,
    ADD COLUMN last_offset bigint;
COMMENT ON COLUMN dwh.kafka_offsets.last_sha256 IS 'SHA-256 of the value of the message at last_offset, the last applied: a worker that starts the partition again checks that the broker still holds it there, or the topic was recreated (NULL: not known, after dwh.kafka_seek() or a gap)';
COMMENT ON COLUMN dwh.kafka_offsets.last_offset IS 'Offset of the message last applied, whose SHA-256 is last_sha256: next_offset - 1, or earlier when the markers that end Kafka transactions follow it (NULL: not known)';

COMMENT ON FUNCTION dwh.kafka_seek(integer, bigint, text) IS
    'Rewind (replay) or skip a partition of the order topic (default dwh.kafka_topic): the next message applied from it is the one at next_offset; a partition stopped at a gap goes on from there';

-- The stored offsets and the gaps, for the views below, which must answer
-- at once whatever happens: a DBA's LOCK TABLE, VACUUM FULL or ALTER TABLE
-- on these tables would make a plain SELECT wait.  Then these return no
-- rows, and the views show the partitions without what is stored.
CREATE FUNCTION dwh.stored_offsets(OUT topic text, OUT kafka_partition integer,
                                   OUT next_offset bigint, OUT updated_at timestamptz)
    RETURNS SETOF record
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    LOCK TABLE dwh.kafka_offsets IN ACCESS SHARE MODE NOWAIT;
    RETURN QUERY SELECT o.topic, o.kafka_partition, o.next_offset, o.updated_at
                 FROM dwh.kafka_offsets o;
EXCEPTION WHEN lock_not_available THEN
    -- One row of NULLs (no stored row has a NULL topic): not known now.
    RETURN QUERY SELECT NULL::text, NULL::integer, NULL::bigint, NULL::timestamptz;
END
$fn$;
COMMENT ON FUNCTION dwh.stored_offsets() IS
    'Internal (dwh.kafka_partitions): dwh.kafka_offsets, or at once one row of NULLs while the table is locked';

CREATE FUNCTION dwh.stored_gaps(OUT topic text, OUT kafka_partition integer,
                                OUT gaps bigint, OUT last_gap_at timestamptz,
                                OUT stopped boolean)
    RETURNS SETOF record
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    LOCK TABLE dwh.kafka_gaps IN ACCESS SHARE MODE NOWAIT;
    RETURN QUERY SELECT g.topic, g.kafka_partition, count(*), max(g.detected_at),
                        bool_or(g.resumed_at IS NULL)
                 FROM dwh.kafka_gaps g
                 GROUP BY g.topic, g.kafka_partition;
EXCEPTION WHEN lock_not_available THEN
    RETURN QUERY SELECT NULL::text, NULL::integer, NULL::bigint, NULL::timestamptz,
                        NULL::boolean;
END
$fn$;
COMMENT ON FUNCTION dwh.stored_gaps() IS
    'Internal (dwh.kafka_partitions): gaps per partition of dwh.kafka_gaps, or at once one row of NULLs while the table is locked';

-- dwh.worker_status has more OUT parameters (the tags worker's expiry
-- passes and Kafka feed): a changed result type cannot be replaced.  The
-- old function is renamed, the views below are replaced over the new one,
-- then the privileges that DBAs granted on the old one (an operator's
-- EXECUTE) are granted on the new one, each by its grantor, as for
-- dwh.ingest_orders.
ALTER FUNCTION dwh.worker_status() RENAME TO worker_status_1_0;
CREATE FUNCTION dwh.worker_status(
        OUT worker text, OUT pid integer, OUT started_at timestamptz,
        OUT state text, OUT state_since timestamptz, OUT partitions integer[],
        OUT messages bigint, OUT batches bigint, OUT dead_letters bigint,
        OUT last_batch_at timestamptz,
        OUT keys_mirrored bigint, OUT keys_missing bigint,
        OUT refreshes bigint, OUT changes_found bigint,
        OUT last_error text, OUT last_error_at timestamptz,
        OUT worker_number integer,
        OUT expiry_passes bigint, OUT last_expiry_at timestamptz,
        OUT last_expiry_rules_moved integer, OUT last_expiry_events integer,
        OUT events_produced bigint, OUT events_pending bigint,
        OUT last_produced_at timestamptz, OUT apply_time double precision,
        OUT database text)
    RETURNS SETOF record
    AS 'MODULE_PATHNAME', 'dwh_worker_status'
    LANGUAGE C VOLATILE;
COMMENT ON FUNCTION dwh.worker_status() IS
    'State of each background worker since the server started (behind dwh.status)';

CREATE OR REPLACE VIEW dwh.kafka_partitions AS
-- While a table is locked its function returns one row of NULLs: the lag
-- (or the gaps) are then unknown (NULL), not computed from nothing.
WITH offsets AS MATERIALIZED (SELECT * FROM dwh.stored_offsets()),
     gaps AS MATERIALIZED (SELECT * FROM dwh.stored_gaps())
SELECT coalesce(o.topic, w.topic) AS topic,
       coalesce(o.kafka_partition, w.kafka_partition) AS kafka_partition,
       owner.worker,
       o.next_offset AS stored_offset,
       w.high_watermark,
       -- Unknown (NULL) until a worker has seen the partition's watermark.
       CASE WHEN w.high_watermark IS NOT NULL AND NOT locked.offsets
            THEN greatest(w.high_watermark - coalesce(o.next_offset, w.low_watermark), 0)
       END AS lag,
       o.updated_at AS stored_at,
       w.observed_at AS watermark_at,
       w.low_watermark,
       CASE WHEN NOT locked.gaps THEN coalesce(g.stopped, false) END AS stopped,
       CASE WHEN NOT locked.gaps THEN coalesce(g.gaps, 0) END AS gaps,
       g.last_gap_at
FROM (SELECT * FROM offsets WHERE topic IS NOT NULL) o
FULL JOIN dwh.kafka_watermarks() w
       ON w.topic = o.topic AND w.kafka_partition = o.kafka_partition
-- Owned by a worker of this database: one serving another owns its
-- partitions there.
LEFT JOIN (SELECT s.worker, p.p
           FROM dwh.worker_status() s, unnest(s.partitions) AS p(p)
           WHERE s.pid IS NOT NULL AND s.database = current_database()) owner
       ON owner.p = coalesce(o.kafka_partition, w.kafka_partition)
      AND coalesce(o.topic, w.topic) = current_setting('dwh.kafka_topic')
LEFT JOIN gaps g
       ON g.topic = coalesce(o.topic, w.topic)
      AND g.kafka_partition = coalesce(o.kafka_partition, w.kafka_partition)
CROSS JOIN (SELECT EXISTS (SELECT FROM offsets WHERE topic IS NULL) AS offsets,
                   EXISTS (SELECT FROM gaps WHERE topic IS NULL) AS gaps) locked;
COMMENT ON VIEW dwh.kafka_partitions IS
    'Per Kafka partition: the worker owning it, the offset stored in the database, the broker''s watermarks and the lag, whether it is stopped at a gap, and its gaps (dwh.kafka_gaps)';

CREATE OR REPLACE VIEW dwh.status AS
SELECT s.worker, s.pid, s.state, s.state_since,
       s.partitions,
       s.messages, s.batches, s.dead_letters, s.last_batch_at,
       p.lag,
       p.partition_offsets,
       s.keys_mirrored, s.keys_missing, s.refreshes, s.changes_found,
       s.last_error, s.last_error_at, s.started_at,
       p.gaps, p.stopped_partitions,
       s.expiry_passes, s.last_expiry_at, s.last_expiry_rules_moved, s.last_expiry_events,
       s.events_produced, s.events_pending, s.last_produced_at,
       s.apply_time,
       b.blocked_by, b.blocked_since,
       s.database
FROM dwh.worker_status() s
LEFT JOIN LATERAL (
    SELECT sum(k.lag)::bigint AS lag,
           jsonb_agg(jsonb_build_object('partition', k.kafka_partition,
                                        'stored_offset', k.stored_offset,
                                        'high_watermark', k.high_watermark,
                                        'lag', k.lag,
                                        'stopped', k.stopped,
                                        'gaps', k.gaps)
                     ORDER BY k.kafka_partition) AS partition_offsets,
           sum(k.gaps)::bigint AS gaps,
           array_agg(k.kafka_partition ORDER BY k.kafka_partition)
               FILTER (WHERE k.stopped) AS stopped_partitions
    FROM dwh.kafka_partitions k
    WHERE k.topic = current_setting('dwh.kafka_topic')
      AND k.kafka_partition = ANY (s.partitions)
      -- The offsets of this database: a worker serving another applies
      -- none of them.
      AND s.database = current_database()
) p ON true
-- Whoever keeps the worker waiting: any session whose transaction holds a
-- lock the worker needs (a loader's or tagger's left open, a LOCK TABLE)
-- stalls it for as long as it lasts, and the worker, asleep in the lock
-- wait, cannot say so itself.  The wait is followed to the sessions that
-- wait for nothing: a worker queued behind another waiter (a batch behind
-- the tags worker's expiry, which waits for a loader) names the loader,
-- the one to end.  Within a cycle no one is such: its members are named.
LEFT JOIN LATERAL (
    WITH RECURSIVE waits(pid) AS (
        SELECT p FROM pg_catalog.unnest(pg_catalog.pg_blocking_pids(s.pid)) p
        UNION
        SELECT p FROM waits w, pg_catalog.unnest(pg_catalog.pg_blocking_pids(w.pid)) p
    )
    SELECT coalesce(pg_catalog.array_agg(w.pid ORDER BY w.pid)
                        FILTER (WHERE pg_catalog.cardinality(pg_catalog.pg_blocking_pids(w.pid)) = 0),
                    pg_catalog.array_agg(w.pid ORDER BY w.pid)) AS blocked_by,
           (SELECT pg_catalog.min(l.waitstart) FROM pg_catalog.pg_locks l
            WHERE l.pid = s.pid AND NOT l.granted) AS blocked_since
    FROM waits w
    HAVING pg_catalog.count(*) > 0
) b ON s.pid IS NOT NULL
ORDER BY s.worker_number IS NULL, s.worker;
COMMENT ON VIEW dwh.status IS
    'One row per background worker: its state, partitions, throughput counters, lag, last error, gaps recorded on its partitions and those stopped at one; for the tags worker its expiry passes and the tag events it produced to Kafka; for a Kafka worker the time it spent applying batches; the sessions keeping it waiting for a lock, and since when; the database it serves (read in another, its lag and partitions'' offsets are not shown)';

DO $grants$
DECLARE
    updater name := current_user;
    g record;
BEGIN
    FOR g IN
        SELECT a.grantor, a.grantee, a.privilege_type, a.is_grantable,
               a.grantor <> p.proowner AS by_other
        FROM pg_catalog.pg_proc p, pg_catalog.aclexplode(p.proacl) a
        WHERE p.oid = 'dwh.worker_status_1_0()'::pg_catalog.regprocedure
          AND a.grantee <> p.proowner
    LOOP
        BEGIN
            IF g.by_other THEN
                EXECUTE pg_catalog.format('SET LOCAL ROLE %s', g.grantor::pg_catalog.regrole);
            END IF;
            EXECUTE pg_catalog.format('GRANT %s ON FUNCTION dwh.worker_status() TO %s%s',
                                      g.privilege_type,
                                      CASE WHEN g.grantee = 0 THEN 'PUBLIC'
                                           ELSE g.grantee::pg_catalog.regrole::text END,
                                      CASE WHEN g.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END);
            IF g.by_other THEN
                EXECUTE pg_catalog.format('SET LOCAL ROLE %I', updater);
            END IF;
        EXCEPTION WHEN insufficient_privilege THEN
            RAISE WARNING 'could not grant % on function dwh.worker_status() again to %, as %',
                g.privilege_type,
                CASE WHEN g.grantee = 0 THEN 'PUBLIC' ELSE g.grantee::pg_catalog.regrole::text END,
                g.grantor::pg_catalog.regrole
                USING DETAIL = SQLERRM,
                      HINT = 'Grant it again after the update.';
        END;
    END LOOP;
END
$grants$;
DROP FUNCTION dwh.worker_status_1_0();

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

-- The oracle (install/80_oracle.sql): every version received, DDS checked
-- and rebuilt against STG; dwh.rebuild() takes a parameter.

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

CREATE OR REPLACE VIEW dwh.expected_user_product_counters AS
SELECT x.user_id, x.product_id, pn.name AS product_name, x.order_cnt
FROM (SELECT c.h_user_pk AS user_id, op.h_product_pk AS product_id,
             count(*)::integer AS order_cnt
      FROM dwh.closed_orders c
      JOIN dds.l_order_product op USING (h_order_pk)
      GROUP BY c.h_user_pk, op.h_product_pk) x
LEFT JOIN dwh.product_current_name pn ON pn.h_product_pk = x.product_id;

CREATE OR REPLACE VIEW dwh.expected_user_category_counters AS
SELECT c.h_user_pk AS user_id, pc.h_category_pk AS category_id,
       hc.category_name, count(DISTINCT c.h_order_pk)::integer AS order_cnt
FROM dwh.closed_orders c
JOIN dds.l_order_product op USING (h_order_pk)
JOIN dds.l_product_category pc USING (h_product_pk)
JOIN dds.h_category hc USING (h_category_pk)
GROUP BY c.h_user_pk, pc.h_category_pk, hc.category_name;

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

-- The users' order counts of the DDS that 1.0 left (recomputed below with
-- the rest when DDS differs from what STG implies).
INSERT INTO cdm.user_order_counters (user_id, order_cnt)
SELECT user_id, order_cnt FROM dwh.expected_user_order_counters ORDER BY user_id;

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

CREATE OR REPLACE FUNCTION dwh.verify()
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

DROP FUNCTION dwh.rebuild();
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

-- Backups (install/90_backup_and_privileges.sql): DDS and the marts are no
-- longer dumped (pg_restore rebuilds them from STG); the history tables
-- are.  Dropping a table from the extension takes it out of the
-- extension's configuration list; adding it back makes it a member again.

ALTER EXTENSION dwh DROP TABLE dds.h_user;
ALTER EXTENSION dwh ADD TABLE dds.h_user;
ALTER EXTENSION dwh DROP TABLE dds.h_product;
ALTER EXTENSION dwh ADD TABLE dds.h_product;
ALTER EXTENSION dwh DROP TABLE dds.h_category;
ALTER EXTENSION dwh ADD TABLE dds.h_category;
ALTER EXTENSION dwh DROP TABLE dds.h_restaurant;
ALTER EXTENSION dwh ADD TABLE dds.h_restaurant;
ALTER EXTENSION dwh DROP TABLE dds.h_order;
ALTER EXTENSION dwh ADD TABLE dds.h_order;
ALTER EXTENSION dwh DROP TABLE dds.l_order_user;
ALTER EXTENSION dwh ADD TABLE dds.l_order_user;
ALTER EXTENSION dwh DROP TABLE dds.l_order_product;
ALTER EXTENSION dwh ADD TABLE dds.l_order_product;
ALTER EXTENSION dwh DROP TABLE dds.l_product_restaurant;
ALTER EXTENSION dwh ADD TABLE dds.l_product_restaurant;
ALTER EXTENSION dwh DROP TABLE dds.l_product_category;
ALTER EXTENSION dwh ADD TABLE dds.l_product_category;
ALTER EXTENSION dwh DROP TABLE dds.s_user_names;
ALTER EXTENSION dwh ADD TABLE dds.s_user_names;
ALTER EXTENSION dwh DROP TABLE dds.s_product_names;
ALTER EXTENSION dwh ADD TABLE dds.s_product_names;
ALTER EXTENSION dwh DROP TABLE dds.s_restaurant_names;
ALTER EXTENSION dwh ADD TABLE dds.s_restaurant_names;
ALTER EXTENSION dwh DROP TABLE dds.s_order_cost;
ALTER EXTENSION dwh ADD TABLE dds.s_order_cost;
ALTER EXTENSION dwh DROP TABLE dds.s_order_status;
ALTER EXTENSION dwh ADD TABLE dds.s_order_status;
ALTER EXTENSION dwh DROP TABLE cdm.user_product_counters;
ALTER EXTENSION dwh ADD TABLE cdm.user_product_counters;
ALTER EXTENSION dwh DROP TABLE cdm.user_category_counters;
ALTER EXTENSION dwh ADD TABLE cdm.user_category_counters;
ALTER EXTENSION dwh DROP SEQUENCE cdm.user_product_counters_id_seq;
ALTER EXTENSION dwh ADD SEQUENCE cdm.user_product_counters_id_seq;
ALTER EXTENSION dwh DROP SEQUENCE cdm.user_category_counters_id_seq;
ALTER EXTENSION dwh ADD SEQUENCE cdm.user_category_counters_id_seq;
SELECT pg_catalog.pg_extension_config_dump('stg.order_event_history', '');
SELECT pg_catalog.pg_extension_config_dump('stg.user_history', '');
SELECT pg_catalog.pg_extension_config_dump('stg.restaurant_history', '');
SELECT pg_catalog.pg_extension_config_dump('dwh.kafka_gaps', '');
SELECT pg_catalog.pg_extension_config_dump('dwh.kafka_gaps_id_seq', '');
-- The user tags are a function of the rules, the marts and DDS too, but
-- they carry when each was granted, and their events are the feed that
-- apps have read: both are dumped with the rules, and a restore brings
-- them back as they were instead of granting them again (docs/tags.md).
-- The windowed counts are dumped with them: a restore does not maintain
-- tags, so it brings back the counts that go with the tags it restores.
SELECT pg_catalog.pg_extension_config_dump('dwh.tag_rules', '');
SELECT pg_catalog.pg_extension_config_dump('cdm.user_tags_held', '');
SELECT pg_catalog.pg_extension_config_dump('cdm.user_tag_events', '');
SELECT pg_catalog.pg_extension_config_dump('cdm.user_tag_events_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('cdm.user_window_counters', '');
-- The events not yet produced to Kafka: a restore produces them (again).
SELECT pg_catalog.pg_extension_config_dump('dwh.tag_outbox', '');

-- Every version received stays in STG: DDS holds what each of them says,
-- and the marts count the current ones (docs/data-rule.md).  A row deleted
-- here would leave DDS and the marts with what STG no longer holds; an
-- order deleted from stg.order_events would let an older version replace
-- it.  (stg.other_events is not carried on, and may be deleted.)
CREATE FUNCTION dwh.stg_refuse_delete() RETURNS trigger
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    IF TG_TABLE_NAME = 'order_events' THEN
        RAISE EXCEPTION 'rows of %.% cannot be deleted', TG_TABLE_SCHEMA, TG_TABLE_NAME
            USING ERRCODE = '55000',
                  DETAIL = 'stg.order_events holds the latest version of every order; DDS and the marts are derived from it.',
                  HINT = 'To take an order out of the counts, load a newer version of it with another final_status.';
    END IF;
    RAISE EXCEPTION 'rows of %.% cannot be deleted', TG_TABLE_SCHEMA, TG_TABLE_NAME
        USING ERRCODE = '55000',
              DETAIL = 'STG keeps every version received; DDS and the marts are derived from them.',
              HINT = 'To change what a key holds, write a newer version of it.';
END
$fn$;
COMMENT ON FUNCTION dwh.stg_refuse_delete() IS
    'Refuses DELETE and TRUNCATE on the STG tables of versions';

-- 1.0's trigger of stg.order_events, pointed at the function of them all.
DROP TRIGGER order_events_no_delete ON stg.order_events;
DROP FUNCTION dwh.order_events_refuse_delete();
CREATE TRIGGER order_events_no_delete
    BEFORE DELETE OR TRUNCATE ON stg.order_events
    FOR EACH STATEMENT EXECUTE FUNCTION dwh.stg_refuse_delete();
CREATE TRIGGER order_event_history_no_delete
    BEFORE DELETE OR TRUNCATE ON stg.order_event_history
    FOR EACH STATEMENT EXECUTE FUNCTION dwh.stg_refuse_delete();
CREATE TRIGGER users_no_delete
    BEFORE DELETE OR TRUNCATE ON stg.users
    FOR EACH STATEMENT EXECUTE FUNCTION dwh.stg_refuse_delete();
CREATE TRIGGER user_history_no_delete
    BEFORE DELETE OR TRUNCATE ON stg.user_history
    FOR EACH STATEMENT EXECUTE FUNCTION dwh.stg_refuse_delete();
CREATE TRIGGER restaurants_no_delete
    BEFORE DELETE OR TRUNCATE ON stg.restaurants
    FOR EACH STATEMENT EXECUTE FUNCTION dwh.stg_refuse_delete();
CREATE TRIGGER restaurant_history_no_delete
    BEFORE DELETE OR TRUNCATE ON stg.restaurant_history
    FOR EACH STATEMENT EXECUTE FUNCTION dwh.stg_refuse_delete();

-- Redis keys that dwh.redis_key_pattern does not match are never read:
-- state 'excluded'.
ALTER TABLE dwh.redis_keys DROP CONSTRAINT redis_keys_state_check;
ALTER TABLE dwh.redis_keys ADD CONSTRAINT redis_keys_state_check
    CHECK (state IN ('new', 'mirrored', 'missing', 'refused', 'excluded'));
COMMENT ON COLUMN dwh.redis_keys.state IS 'new (not read yet), mirrored (its value is in stg.users or stg.restaurants), missing (Redis holds no string under it), refused (its value is in dwh.dead_letters), excluded (dwh.redis_key_pattern does not match it: never asked; or Redis''s ACL refuses it, NOPERM: asked on each refresh)';
COMMENT ON COLUMN dwh.redis_keys.reason IS 'Why the value was refused (state refused) or the key is not read (state excluded)';

-- PUBLIC gets nothing on the new functions and views either.
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA dwh FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA dwh FROM PUBLIC;
-- But the view cdm.user_tags calls these two, and a view's functions run
-- with its reader's rights: pure functions of their arguments.
GRANT EXECUTE ON FUNCTION dwh.hash_key(text), dwh.all_orders_key() TO PUBLIC;

-- Privileges.  Every GRANT and REVOKE of an extension script, an update's
-- too, records the privileges it leaves as the object's initial ones
-- (pg_init_privs), and pg_dump dumps only what differs from those: the
-- lines above, and the grants made again on dwh.ingest_orders, would make
-- the privileges that DBAs granted under 1.0 look like dwh's own, and a
-- dump taken after the update would lose them.  The initial privileges
-- of dwh's objects in schema dwh are set back to what a fresh install
-- records, the owner's alone; objects there that belong to no extension
-- have none.
UPDATE pg_catalog.pg_init_privs i
SET initprivs = ARRAY(SELECT x
                      FROM pg_catalog.unnest(pg_catalog.acldefault(o.kind, o.owner)) x
                      WHERE NOT EXISTS (SELECT FROM pg_catalog.aclexplode(ARRAY[x]) e
                                        WHERE e.grantee = 0))
FROM (SELECT 'pg_catalog.pg_proc'::pg_catalog.regclass AS classoid, p.oid,
             'f'::"char" AS kind, p.proowner AS owner
      FROM pg_catalog.pg_proc p
      WHERE p.pronamespace = 'dwh'::pg_catalog.regnamespace
      UNION ALL
      SELECT 'pg_catalog.pg_class'::pg_catalog.regclass, c.oid, 'r', c.relowner
      FROM pg_catalog.pg_class c
      WHERE c.relnamespace = 'dwh'::pg_catalog.regnamespace
        AND c.relkind IN ('r', 'p', 'v', 'm', 'f')) o
WHERE i.classoid = o.classoid AND i.objoid = o.oid AND i.objsubid = 0
  AND i.privtype = 'e'
  AND EXISTS (SELECT FROM pg_catalog.pg_depend d JOIN pg_catalog.pg_extension x
                ON x.oid = d.refobjid AND x.extname = 'dwh'
              WHERE d.classid = o.classoid AND d.objid = o.oid AND d.objsubid = 0
                AND d.refclassid = 'pg_catalog.pg_extension'::pg_catalog.regclass
                AND d.deptype = 'e');
DELETE FROM pg_catalog.pg_init_privs i
WHERE i.privtype = 'e'
  AND ((i.classoid = 'pg_catalog.pg_proc'::pg_catalog.regclass
        AND i.objoid IN (SELECT p.oid FROM pg_catalog.pg_proc p
                         WHERE p.pronamespace = 'dwh'::pg_catalog.regnamespace))
       OR (i.classoid = 'pg_catalog.pg_class'::pg_catalog.regclass
           AND i.objoid IN (SELECT c.oid FROM pg_catalog.pg_class c
                            WHERE c.relnamespace = 'dwh'::pg_catalog.regnamespace)))
  AND NOT EXISTS (SELECT FROM pg_catalog.pg_depend d
                  WHERE d.classid = i.classoid AND d.objid = i.objoid AND d.objsubid = 0
                    AND d.refclassid = 'pg_catalog.pg_extension'::pg_catalog.regclass
                    AND d.deptype = 'e');
-- The two functions PUBLIC may execute: that grant is dwh's own, as in a
-- fresh install.
UPDATE pg_catalog.pg_init_privs i
SET initprivs = pg_catalog.array_append(i.initprivs,
                                        pg_catalog.makeaclitem(0, p.proowner, 'EXECUTE', false))
FROM pg_catalog.pg_proc p
WHERE i.classoid = 'pg_catalog.pg_proc'::pg_catalog.regclass AND i.objoid = p.oid
  AND i.objsubid = 0 AND i.privtype = 'e'
  AND p.oid IN ('dwh.hash_key(text)'::pg_catalog.regprocedure,
                'dwh.all_orders_key()'::pg_catalog.regprocedure);

-- Data.  1.0 dropped superseded versions, so its DDS holds rows that STG
-- no longer implies (the status, cost and name satellite rows of versions
-- replaced since, keys that only those versions named) and lacks rows that
-- the data rule keeps (the satellite row of a value without a version time
-- is at -infinity, not at its load time).  DDS and the marts are
-- recomputed from STG, as a fresh install loaded with the same STG rows
-- holds them; every difference found first is kept in
-- dwh_update_1_1.vault_differences, a table that is not part of the
-- extension (drop it when it is no longer needed), so that no value 1.0
-- held is lost.  STG and the operational tables are not touched.  Readers
-- of DDS and the marts wait for the update to commit.  (A WARNING says so:
-- an extension script shows no NOTICE, it runs with client_min_messages at
-- least WARNING.)
DO $update$
DECLARE
    differences bigint;
    not_implied bigint;
BEGIN
    CREATE SCHEMA dwh_update_1_1;
    CREATE TABLE dwh_update_1_1.vault_differences AS
    SELECT v.table_name, v.business_key, v.actual AS value_1_0, v.expected AS value_1_1
    FROM dwh.verify_vault() v;
    ALTER EXTENSION dwh DROP TABLE dwh_update_1_1.vault_differences;
    ALTER EXTENSION dwh DROP SCHEMA dwh_update_1_1;

    SELECT count(*), count(*) FILTER (WHERE value_1_1 IS NULL)
    INTO differences, not_implied
    FROM dwh_update_1_1.vault_differences;
    IF differences = 0 THEN
        DROP SCHEMA dwh_update_1_1 CASCADE;
        RETURN;
    END IF;

    COMMENT ON SCHEMA dwh_update_1_1 IS
        'Left by ALTER EXTENSION dwh UPDATE to 1.1: what DDS held under 1.0 and 1.1 recomputed otherwise; not part of the extension';
    COMMENT ON TABLE dwh_update_1_1.vault_differences IS
        'Rows of DDS that differed from their recomputation from STG when dwh was updated from 1.0 to 1.1 (dwh.verify_vault() at that time)';
    COMMENT ON COLUMN dwh_update_1_1.vault_differences.value_1_0 IS
        'The row''s values under 1.0 (null: 1.0 had no such row)';
    COMMENT ON COLUMN dwh_update_1_1.vault_differences.value_1_1 IS
        'The row''s values recomputed from STG by 1.1 (null: STG does not imply the row, it was dropped)';

    PERFORM dwh.rebuild_vault();

    RAISE WARNING 'DDS and the marts were recomputed from STG: % rows of DDS differed, % of them not implied by STG',
        differences, not_implied
        USING DETAIL = 'dwh 1.0 kept only the current version of each order, user and restaurant: the rows of the versions it replaced cannot be recomputed, and a value without a version time now has its row at -infinity.',
              HINT = 'Table dwh_update_1_1.vault_differences keeps every difference, with the values of 1.0 and of 1.1; drop schema dwh_update_1_1 when you no longer need it.';
END
$update$;

-- After the recomputation: 1.0 could hold several rows from orders for a dish.
-- Each dish's one order naming row (dwh.place_order_namings), found by
-- key.
CREATE UNIQUE INDEX s_product_names_order_naming_idx ON dds.s_product_names (h_product_pk)
    WHERE load_src = 'stg.order_events';

-- A dump of 1.1 holds no rows of DDS or the marts; one taken under 1.0
-- does (1.0 dumped every table).  Restored into 1.1, those rows came
-- before STG's, whose triggers then took every order for known: the marts
-- 1.1 added stayed empty and dwh.verify() found differences, with
-- pg_restore's exit status 0.  A restore's own writes of these tables
-- (depth 0: the STG triggers' writes are deeper) are refused, loudly; STG
-- restored after them rebuilds them whole.
CREATE FUNCTION dwh.refuse_restored_derived_rows() RETURNS trigger
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    IF dwh.tags_restoring() THEN
        RAISE EXCEPTION 'rows of %.% are not restored: they are recomputed from STG',
            TG_TABLE_SCHEMA, TG_TABLE_NAME
            USING ERRCODE = '55000',
                  DETAIL = 'A dump of dwh 1.1 holds no rows of DDS or the marts; this one was taken under dwh 1.0, which dumped them. STG''s triggers recompute them as STG is restored.',
                  HINT = 'Let pg_restore go on (without --exit-on-error or --single-transaction) and check with dwh.verify() once it ends; or restore into 1.0, then update: CREATE EXTENSION dwh VERSION ''1.0''; pg_restore --data-only; ALTER EXTENSION dwh UPDATE.';
    END IF;
    RETURN NULL;
END
$fn$;
COMMENT ON FUNCTION dwh.refuse_restored_derived_rows() IS
    'BEFORE INSERT statement trigger of DDS and the marts: refuses the rows a restore writes itself (a dump of dwh 1.0), which STG''s triggers recompute';
REVOKE ALL ON FUNCTION dwh.refuse_restored_derived_rows() FROM PUBLIC;

DO $$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY[
        'dds.h_user', 'dds.h_product', 'dds.h_category', 'dds.h_restaurant',
        'dds.h_order', 'dds.l_order_user', 'dds.l_order_product',
        'dds.l_product_restaurant', 'dds.l_product_category',
        'dds.s_user_names', 'dds.s_product_names', 'dds.product_namings',
        'dds.s_restaurant_names', 'dds.s_order_cost', 'dds.s_order_status',
        'cdm.user_product_counters', 'cdm.user_category_counters',
        'cdm.user_order_counters']
    LOOP
        EXECUTE pg_catalog.format(
            'CREATE TRIGGER %I BEFORE INSERT ON %s FOR EACH STATEMENT'
            ' WHEN (pg_catalog.pg_trigger_depth() = 0)'
            ' EXECUTE FUNCTION dwh.refuse_restored_derived_rows()',
            pg_catalog.split_part(t, '.', 2) || '_not_restored', t);
    END LOOP;
END
$$;

-- A restore into the database the workers serve would race them: a Kafka
-- worker applies orders from the offsets restored before STG is (taking
-- the ids of the rows the restore then loads, whose COPY fails: orders
-- lost), the Redis worker writes the users being restored, an expiry pass
-- revokes windowed tags counted from a warehouse restored in part.  Each
-- table's restore is refused instead, with the way to restore.
CREATE FUNCTION dwh.refuse_restore_served() RETURNS trigger
    AS 'MODULE_PATHNAME', 'dwh_refuse_restore_served'
    LANGUAGE C;
COMMENT ON FUNCTION dwh.refuse_restore_served() IS
    'BEFORE INSERT statement trigger of the dumped tables: refuses a restore into the database the workers serve (dwh.database) while they may write it';
REVOKE ALL ON FUNCTION dwh.refuse_restore_served() FROM PUBLIC;
DO $$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY[
        'stg.order_events', 'stg.order_event_history', 'stg.other_events',
        'stg.users', 'stg.user_history', 'stg.restaurants',
        'stg.restaurant_history', 'dwh.dead_letters', 'dwh.kafka_offsets',
        'dwh.kafka_gaps', 'dwh.redis_keys', 'dwh.redis_wanted',
        'dwh.tag_rules', 'cdm.user_tags_held', 'cdm.user_tag_events',
        'cdm.user_window_counters', 'dwh.tag_outbox']
    LOOP
        EXECUTE pg_catalog.format(
            'CREATE TRIGGER %I BEFORE INSERT ON %s FOR EACH STATEMENT'
            ' EXECUTE FUNCTION dwh.refuse_restore_served()',
            pg_catalog.split_part(t, '.', 2) || '_restore_served', t);
    END LOOP;
END
$$;

-- STG (install/10_stg.sql): the tables of users and restaurants take
-- their writers' lock before their rows (the user lock, the dictionary
-- lock exclusive), refused at once in a transaction's later write or after
-- the tag lock exclusive if another session holds it: such writes
-- deadlocked with a batch naming a user first or a change of the same
-- menu (src/dwh_locks.c; docs/tags.md, "Locks").
CREATE FUNCTION dwh.stg_dictionary_statement_lock() RETURNS trigger
    AS 'MODULE_PATHNAME', 'dwh_stg_dictionary_statement_lock'
    LANGUAGE C;
COMMENT ON FUNCTION dwh.stg_dictionary_statement_lock() IS
    'BEFORE STATEMENT trigger of the user and restaurant tables: their lock before any row (the user lock for users, the dictionary lock exclusive for restaurants); in a later write of the transaction, or after the tag lock exclusive, both refused if another session holds them';
REVOKE ALL ON FUNCTION dwh.stg_dictionary_statement_lock() FROM PUBLIC;

CREATE TRIGGER users_lock
    BEFORE INSERT OR UPDATE ON stg.users
    FOR EACH STATEMENT EXECUTE FUNCTION dwh.stg_dictionary_statement_lock();
CREATE TRIGGER user_history_lock
    BEFORE INSERT OR UPDATE ON stg.user_history
    FOR EACH STATEMENT EXECUTE FUNCTION dwh.stg_dictionary_statement_lock();
CREATE TRIGGER restaurants_lock
    BEFORE INSERT OR UPDATE ON stg.restaurants
    FOR EACH STATEMENT EXECUTE FUNCTION dwh.stg_dictionary_statement_lock();
CREATE TRIGGER restaurant_history_lock
    BEFORE INSERT OR UPDATE ON stg.restaurant_history
    FOR EACH STATEMENT EXECUTE FUNCTION dwh.stg_dictionary_statement_lock();
