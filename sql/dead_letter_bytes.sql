-- What a dead letter keeps is bounded by dwh.dead_letter_keep_bytes: a
-- prefix of the value, its full length and the SHA-256 of all of it.  A
-- dead letter holding a prefix only is not replayed.
\set ECHO none
\i test/regress_helpers.sql
\set ECHO all

SHOW dwh.dead_letter_keep_bytes;

-- A 5 MB value refused for its size: 64 kB of it are stored, with its
-- length and the hash of the whole value.
CREATE TABLE t.big AS
    SELECT convert_to('{"object_id": 1, "pad": "' || repeat('x', 5 * 1024 * 1024) || '"}', 'UTF8') AS v;
SELECT * FROM dwh.ingest_orders(ARRAY[(SELECT v FROM t.big)], 'order-service_orders',
                                ARRAY[0], ARRAY[10]);
SELECT d.sqlstate, d.reason, length(d.raw) AS kept, d.raw_length,
       d.raw = substr(b.v, 1, 65536) AS prefix, d.raw_sha256 = sha256(b.v) AS hash_of_all,
       pg_column_size(d.raw) < 70000 AS bounded
FROM dwh.dead_letters d, t.big b;

-- The identity of a stored message is the hash of all of it: the same 5 MB
-- again is a replay; another 5 MB value with the same first 64 kB, at the
-- same position, is another message (kept, flagged).
SELECT * FROM dwh.ingest_orders(ARRAY[(SELECT v FROM t.big)], 'order-service_orders',
                                ARRAY[0], ARRAY[10]);
SELECT * FROM dwh.ingest_orders(ARRAY[(SELECT overlay(v placing 'y'::bytea from length(v) - 3) FROM t.big)],
                                'order-service_orders', ARRAY[0], ARRAY[10]);
SELECT id, length(raw) AS kept, raw_length, position_mismatch FROM dwh.dead_letters ORDER BY id;

-- A short value is kept whole, with its length and hash.
DELETE FROM dwh.dead_letters;
SELECT dwh.ingest_order('not json at all');
SELECT convert_from(raw, 'UTF8') AS raw, raw_length,
       raw_sha256 = sha256(convert_to('not json at all', 'UTF8')) AS hash_of_all
FROM dwh.dead_letters;

-- Any refusal is bounded, not only one for the size: with 16 bytes kept, a
-- value that is not JSON keeps its first 16.
SET dwh.dead_letter_keep_bytes = 16;
SELECT dwh.ingest_order('this value is not JSON and longer than sixteen bytes');
SELECT convert_from(raw, 'UTF8') AS raw, raw_length FROM dwh.dead_letters ORDER BY id;

-- A refusal for the size, once the limit is raised, replays only when the
-- whole value was kept; the truncated one stays, with the outcome
-- 'truncated'.
SET dwh.dead_letter_keep_bytes = '64kB';
SET dwh.max_message_size = 1024;
SELECT dwh.ingest_order(t.order_msg(2, 'u2', 'CLOSED', '2023-05-02 10:00:00',
                                    t.items('d2:' || repeat('Очень длинное имя ', 60))));
SELECT id, sqlstate, length(raw) = raw_length AS whole FROM dwh.dead_letters ORDER BY id;
RESET dwh.max_message_size;
SELECT * FROM dwh.replay_dead_letters();
SELECT id, sqlstate, convert_from(raw, 'UTF8') AS raw, raw_length FROM dwh.dead_letters ORDER BY id;
SELECT object_id FROM stg.order_events;

-- The setting's range.
SET dwh.dead_letter_keep_bytes = -1;
SET dwh.dead_letter_keep_bytes = '2GB';
SET dwh.dead_letter_keep_bytes = 0;
SELECT dwh.ingest_order('{');
SELECT length(raw) AS kept, raw_length FROM dwh.dead_letters WHERE raw_length = 1;
RESET dwh.dead_letter_keep_bytes;

-- A dead letter written in 1.0's shape (a 1.0 dump restored with
-- --data-only) names neither raw_length nor raw_sha256: 1.0 kept the whole
-- value, so both come from raw.  One that names a longer value than its
-- raw holds keeps a prefix: no hash is made up for it, it is refused.
INSERT INTO dwh.dead_letters (source, topic, kafka_partition, kafka_offset, raw, reason, sqlstate)
VALUES ('kafka', 'order-service_orders', 3, 30, convert_to('{not json', 'UTF8'),
        'not JSON', '22032');
SELECT raw_length, raw_sha256 = sha256(convert_to('{not json', 'UTF8')) AS hash_of_all,
       position_mismatch
FROM dwh.dead_letters WHERE kafka_offset = 30;
\set VERBOSITY terse
INSERT INTO dwh.dead_letters (source, raw, reason, sqlstate, raw_length)
VALUES ('sql', convert_to('{not', 'UTF8'), 'not JSON', '22032', 9);
\set VERBOSITY default

SELECT * FROM t.check();
