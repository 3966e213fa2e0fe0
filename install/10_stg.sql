-- STG: data as it arrived.  One row per key holding its current version;
-- the BEFORE trigger dwh.stg_guard validates each row and derives
-- update_ts.  A version that is not newer than the stored one goes to the
-- key's history table instead, and a version replaced by a newer one moves
-- there: nothing received is dropped, so DDS and the marts are a function
-- of the versions held here (docs/data-rule.md).

CREATE FUNCTION dwh.stg_guard() RETURNS trigger
    AS 'MODULE_PATHNAME', 'dwh_stg_guard'
    LANGUAGE C;
COMMENT ON FUNCTION dwh.stg_guard() IS
    'BEFORE ROW trigger of stg tables: validates the payload, derives update_ts, keeps the newest version';

CREATE TABLE stg.order_events (
    id          bigserial PRIMARY KEY,
    object_id   bigint NOT NULL UNIQUE,
    object_type varchar NOT NULL CHECK (object_type = 'order'),
    sent_dttm   timestamp NOT NULL,
    payload     jsonb NOT NULL,
    update_ts   timestamp NOT NULL,
    loaded_at   timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE stg.order_events IS 'Orders from Kafka topic order-service_orders: one row per order, its latest version';
COMMENT ON COLUMN stg.order_events.id IS 'Surrogate row number';
COMMENT ON COLUMN stg.order_events.object_id IS 'Order id (message object_id), the idempotency key of the stream';
COMMENT ON COLUMN stg.order_events.object_type IS 'Message object_type; always ''order'' here (other types go to stg.other_events)';
COMMENT ON COLUMN stg.order_events.sent_dttm IS 'When the message was sent (UTC)';
COMMENT ON COLUMN stg.order_events.payload IS 'The message''s payload object, as is';
COMMENT ON COLUMN stg.order_events.update_ts IS 'Version of the order: payload.update_ts; an older version never replaces a newer one';
COMMENT ON COLUMN stg.order_events.loaded_at IS 'When this version was stored';

CREATE TRIGGER order_events_guard
    BEFORE INSERT OR UPDATE ON stg.order_events
    FOR EACH ROW EXECUTE FUNCTION dwh.stg_guard('order');

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

-- The tables of users and restaurants take their writers' lock before
-- their rows, as the order tables do: the user lock, the dictionary lock
-- exclusive.  In a transaction's later write of orders, menus or users,
-- or after the tag lock exclusive (a rule change, dwh.expire_tags(),
-- dwh.rebuild_tags() before them), the locks are refused at once if
-- another session holds them (src/dwh_locks.c; docs/data-rule.md, "one
-- lock order"; docs/tags.md, "Locks").
CREATE FUNCTION dwh.stg_dictionary_statement_lock() RETURNS trigger
    AS 'MODULE_PATHNAME', 'dwh_stg_dictionary_statement_lock'
    LANGUAGE C;
COMMENT ON FUNCTION dwh.stg_dictionary_statement_lock() IS
    'BEFORE STATEMENT trigger of the user and restaurant tables: their lock before any row (the user lock for users, the dictionary lock exclusive for restaurants); in a later write of the transaction, or after the tag lock exclusive, both refused if another session holds them';

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

CREATE TABLE stg.other_events (
    id              bigserial PRIMARY KEY,
    object_id       bigint,
    object_type     varchar NOT NULL,
    sent_dttm       timestamp,
    message         jsonb NOT NULL,
    topic           text,
    kafka_partition integer,
    kafka_offset    bigint,
    received_at     timestamptz NOT NULL DEFAULT now(),
    source          text NOT NULL,
    raw_sha256      bytea NOT NULL,
    position_mismatch boolean NOT NULL DEFAULT false
);
-- A message is identified by who handed it in, its Kafka position and its
-- bytes: delivered again (dwh.kafka_seek, a loader's retry) it is kept
-- once, and a position a SQL caller named never hides what the Kafka worker
-- later reads there.  Other bytes at a known position are kept too,
-- flagged (see dwh.ingest_orders).
CREATE UNIQUE INDEX other_events_kafka_position_idx
    ON stg.other_events (kafka_partition, kafka_offset, source, topic, raw_sha256)
    NULLS NOT DISTINCT
    WHERE kafka_offset IS NOT NULL;
COMMENT ON TABLE stg.other_events IS 'Valid messages of an object_type other than ''order'': kept whole, out of the counts';
COMMENT ON COLUMN stg.other_events.id IS 'Surrogate row number';
COMMENT ON COLUMN stg.other_events.object_id IS 'Message object_id when it is an integer';
COMMENT ON COLUMN stg.other_events.object_type IS 'Message object_type';
COMMENT ON COLUMN stg.other_events.sent_dttm IS 'Message sent_dttm when it is a valid timestamp';
COMMENT ON COLUMN stg.other_events.message IS 'The whole message';
COMMENT ON COLUMN stg.other_events.topic IS 'Kafka topic it came from, when known';
COMMENT ON COLUMN stg.other_events.kafka_partition IS 'Kafka partition it came from, when known';
COMMENT ON COLUMN stg.other_events.kafka_offset IS 'Kafka offset it came from, when known';
COMMENT ON COLUMN stg.other_events.received_at IS 'When it was stored';
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

CREATE TABLE stg.users (
    id          bigserial PRIMARY KEY,
    object_id   varchar NOT NULL UNIQUE,
    payload     jsonb NOT NULL,
    update_ts   timestamp,
    loaded_at   timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE stg.users IS 'Users mirrored from Redis: one row per key, its latest value';
COMMENT ON COLUMN stg.users.id IS 'Surrogate row number';
COMMENT ON COLUMN stg.users.object_id IS 'Redis key: the user id';
COMMENT ON COLUMN stg.users.payload IS 'The Redis value, as is: {"_id", "name", "login", "update_ts_utc"}';
COMMENT ON COLUMN stg.users.update_ts IS 'Version of the value: payload.update_ts_utc (null when absent)';
COMMENT ON COLUMN stg.users.loaded_at IS 'When this version was stored';

CREATE TRIGGER users_guard
    BEFORE INSERT OR UPDATE ON stg.users
    FOR EACH ROW EXECUTE FUNCTION dwh.stg_guard('user');

CREATE TRIGGER users_lock
    BEFORE INSERT OR UPDATE ON stg.users
    FOR EACH STATEMENT EXECUTE FUNCTION dwh.stg_dictionary_statement_lock();

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

CREATE TRIGGER user_history_lock
    BEFORE INSERT OR UPDATE ON stg.user_history
    FOR EACH STATEMENT EXECUTE FUNCTION dwh.stg_dictionary_statement_lock();

CREATE TABLE stg.restaurants (
    id          bigserial PRIMARY KEY,
    object_id   varchar NOT NULL UNIQUE,
    payload     jsonb NOT NULL,
    update_ts   timestamp,
    loaded_at   timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE stg.restaurants IS 'Restaurants and their menus mirrored from Redis: one row per key, its latest value';
COMMENT ON COLUMN stg.restaurants.id IS 'Surrogate row number';
COMMENT ON COLUMN stg.restaurants.object_id IS 'Redis key: the restaurant id';
COMMENT ON COLUMN stg.restaurants.payload IS 'The Redis value, as is: {"_id", "name", "menu": [{"_id", "name", "price", "category"}], "update_ts_utc"}';
COMMENT ON COLUMN stg.restaurants.update_ts IS 'Version of the value: payload.update_ts_utc (null when absent)';
COMMENT ON COLUMN stg.restaurants.loaded_at IS 'When this version was stored';

CREATE TRIGGER restaurants_guard
    BEFORE INSERT OR UPDATE ON stg.restaurants
    FOR EACH ROW EXECUTE FUNCTION dwh.stg_guard('restaurant');

CREATE TRIGGER restaurants_lock
    BEFORE INSERT OR UPDATE ON stg.restaurants
    FOR EACH STATEMENT EXECUTE FUNCTION dwh.stg_dictionary_statement_lock();

-- Menu times: a dish's order naming row that moves looks up whether
-- some menu version named it at its old time (dwh.place_order_namings).
CREATE INDEX restaurants_update_ts_idx ON stg.restaurants (update_ts);

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

CREATE TRIGGER restaurant_history_lock
    BEFORE INSERT OR UPDATE ON stg.restaurant_history
    FOR EACH STATEMENT EXECUTE FUNCTION dwh.stg_dictionary_statement_lock();

CREATE INDEX restaurant_history_update_ts_idx ON stg.restaurant_history (update_ts);

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
