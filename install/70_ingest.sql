-- Ingest entry points: raw Kafka message values in, STG rows or dead
-- letters out.  Nothing is lost: a value that cannot be stored is kept here
-- with its raw bytes, where it came from and why it was refused.

CREATE TABLE dwh.dead_letters (
    id              bigserial PRIMARY KEY,
    received_at     timestamptz NOT NULL DEFAULT now(),
    source          text NOT NULL,
    topic           text,
    kafka_partition integer,
    kafka_offset    bigint,
    source_key      text,
    raw             bytea NOT NULL,
    reason          text NOT NULL,
    sqlstate        char(5) NOT NULL,
    raw_length      bigint NOT NULL,
    raw_sha256      bytea NOT NULL,
    position_mismatch boolean NOT NULL DEFAULT false
);
CREATE INDEX dead_letters_received_at_idx ON dwh.dead_letters (received_at);
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
COMMENT ON COLUMN dwh.dead_letters.id IS 'Surrogate row number';
COMMENT ON COLUMN dwh.dead_letters.received_at IS 'When the value was refused';
COMMENT ON COLUMN dwh.dead_letters.source IS 'Who handed it in: kafka (the Kafka worker), redis (the Redis worker) or sql (dwh.ingest_order[s]); part of what identifies it with its Kafka position';
COMMENT ON COLUMN dwh.dead_letters.topic IS 'Kafka topic, when known';
COMMENT ON COLUMN dwh.dead_letters.kafka_partition IS 'Kafka partition, when known';
COMMENT ON COLUMN dwh.dead_letters.kafka_offset IS 'Kafka offset, when known';
COMMENT ON COLUMN dwh.dead_letters.source_key IS 'Redis key (or Kafka message key), when known; NULL for a Redis key refused as a key (not valid UTF-8, a NUL byte, longer than 128 bytes), whose bytes are in raw';
COMMENT ON COLUMN dwh.dead_letters.raw IS 'The value exactly as received (for a Redis key refused as a key: the key), or its first dwh.dead_letter_keep_bytes bytes when it is longer (then shorter than raw_length)';
COMMENT ON COLUMN dwh.dead_letters.reason IS 'Why it was refused';
COMMENT ON COLUMN dwh.dead_letters.raw_length IS 'Length in bytes of the whole value';
COMMENT ON COLUMN dwh.dead_letters.raw_sha256 IS 'SHA-256 of the whole value: checks a copy found elsewhere, and the same bytes at the same source and position are a replay, kept once';
COMMENT ON COLUMN dwh.dead_letters.position_mismatch IS 'True when other bytes were already stored at this source and Kafka position (as a dead letter or an other event): a recreated topic, or a caller that named a wrong position';
COMMENT ON COLUMN dwh.dead_letters.sqlstate IS 'SQLSTATE of the refusal (22P02 wrong shape, 22032 not JSON, 22021 bad UTF-8, 22007 bad timestamp, 22003 out of range, 54000 too large, ...)';

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

CREATE FUNCTION dwh.ingest_order(message bytea, topic text DEFAULT NULL,
                                 kafka_partition integer DEFAULT NULL,
                                 kafka_offset bigint DEFAULT NULL)
    RETURNS text
    AS 'MODULE_PATHNAME', 'dwh_ingest_order'
    LANGUAGE C VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION dwh.ingest_order(bytea, text, integer, bigint) IS
    'Ingest one raw Kafka message value; returns applied, unchanged, other_type, dead_letter, replayed or mismatch';

CREATE FUNCTION dwh.ingest_order(message text, topic text DEFAULT NULL,
                                 kafka_partition integer DEFAULT NULL,
                                 kafka_offset bigint DEFAULT NULL)
    RETURNS text
    AS 'MODULE_PATHNAME', 'dwh_ingest_order'
    LANGUAGE C VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION dwh.ingest_order(text, text, integer, bigint) IS
    'Ingest one Kafka message value given as text; returns applied, unchanged, other_type, dead_letter, replayed or mismatch';

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

CREATE FUNCTION dwh.keys_claimed() RETURNS boolean
    AS 'MODULE_PATHNAME', 'dwh_keys_claimed'
    LANGUAGE C VOLATILE;
COMMENT ON FUNCTION dwh.keys_claimed() IS
    'Internal: inside an ingest, has it claimed the keys of the versions being written (see dwh.claim_order_keys)?';

CREATE FUNCTION dwh.defer_mart_deltas(product_users uuid[], products uuid[],
                                      product_deltas integer[],
                                      category_users uuid[], categories uuid[],
                                      category_deltas integer[])
    RETURNS boolean
    AS 'MODULE_PATHNAME', 'dwh_defer_mart_deltas'
    LANGUAGE C VOLATILE;
COMMENT ON FUNCTION dwh.defer_mart_deltas(uuid[], uuid[], integer[], uuid[], uuid[], integer[]) IS
    'Internal: inside an ingest, keep the order trigger''s mart deltas for one sorted pass at the end of the upsert; false elsewhere';

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

-- Replay: after a fix (a new dwh version, a corrected producer, a raised
-- dwh.max_message_size), hand dead letters back to the ingest function.
-- Each replayed row is removed; one still refused is recorded again, with
-- its new reason, under a new id.  A dead letter that keeps only a prefix
-- of its value (dwh.dead_letter_keep_bytes) cannot be replayed: it stays,
-- with the outcome 'truncated'.
CREATE FUNCTION dwh.replay_dead_letters(ids bigint[] DEFAULT NULL)
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
