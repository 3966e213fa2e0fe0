-- Kafka positions named by SQL callers never suppress a later record: a
-- stored message is identified by its source (the Kafka worker, or a SQL
-- caller), its position and its bytes.  The same bytes again are a replay,
-- other bytes are kept and flagged, and the counts say what was written.
\set ECHO none
\i test/regress_helpers.sql
\set ECHO all

-- A loader as the README creates it: EXECUTE on the entry points only.
CREATE ROLE regress_dwh_forger;
GRANT USAGE ON SCHEMA dwh TO regress_dwh_forger;
GRANT EXECUTE ON FUNCTION dwh.ingest_orders(bytea[], text, integer[], bigint[]),
                          dwh.ingest_order(bytea, text, integer, bigint)
    TO regress_dwh_forger;

-- Each call's counts, checked: received = applied + unchanged + other_type
-- + dead_lettered + replayed.
CREATE FUNCTION t.ingest(messages text[], kafka_offsets bigint[],
                         topic text DEFAULT 'order-service_orders')
RETURNS TABLE (received int, applied int, unchanged int, other_type int,
               dead_lettered int, replayed int, mismatched int, balanced boolean)
LANGUAGE sql AS $$
    SELECT i.*, i.received = i.applied + i.unchanged + i.other_type
                             + i.dead_lettered + i.replayed
    FROM dwh.ingest_orders(ARRAY(SELECT convert_to(m, 'UTF8') FROM unnest(messages) m),
                           topic,
                           ARRAY(SELECT 0 FROM unnest(messages)),
                           kafka_offsets) i
$$;
GRANT USAGE ON SCHEMA t TO regress_dwh_forger;
GRANT EXECUTE ON FUNCTION t.ingest(text[], bigint[], text) TO regress_dwh_forger;

CREATE VIEW t.stored AS
    SELECT 'dead_letter' AS kind, source, topic, kafka_partition, kafka_offset,
           convert_from(raw, 'UTF8') AS value, position_mismatch
    FROM dwh.dead_letters
    UNION ALL
    SELECT 'other_event', source, topic, kafka_partition, kafka_offset,
           message::text, position_mismatch
    FROM stg.other_events;

-- 1. The loader names positions the Kafka worker has not read yet: a bad
--    value at offset 100, another type at offset 101.
SET ROLE regress_dwh_forger;
SELECT * FROM t.ingest(ARRAY['forged 100', '{"object_type": "ping", "n": 101}'],
                       ARRAY[100, 101]);
RESET ROLE;

-- 2. Later the worker reads the real messages there.  dwh.ingest_dead_letter
--    is the worker's write path (dwh_ingest_batch with source kafka), as
--    the replay of a Kafka dead letter uses it; test/t/016 does the same
--    with the worker and a broker.  Both are stored: nothing hides them.
SELECT dwh.ingest_dead_letter(convert_to('real 100', 'UTF8'), 'kafka',
                              'order-service_orders', 0, 100);
SELECT dwh.ingest_dead_letter(convert_to('{"object_type": "ping", "n": "real"}', 'UTF8'),
                              'kafka', 'order-service_orders', 0, 101);
SELECT * FROM t.stored ORDER BY kafka_offset, source;

-- 3. The same bytes at the same positions again, from the loader: replays,
--    nothing written.  The worker redelivering its own: replays too.
SET ROLE regress_dwh_forger;
SELECT * FROM t.ingest(ARRAY['forged 100', '{"object_type": "ping", "n": 101}'],
                       ARRAY[100, 101]);
SELECT dwh.ingest_order(convert_to('forged 100', 'UTF8'), 'order-service_orders', 0, 100);
RESET ROLE;
SELECT dwh.ingest_dead_letter(convert_to('real 100', 'UTF8'), 'kafka',
                              'order-service_orders', 0, 100);
SELECT count(*) AS rows_stored FROM t.stored;

-- 4. Other bytes at a position already used: kept, flagged, counted.
SET ROLE regress_dwh_forger;
SELECT * FROM t.ingest(ARRAY['other 100', '{"object_type": "ping", "n": "other"}'],
                       ARRAY[100, 101]);
SELECT dwh.ingest_order(convert_to('third 100', 'UTF8'), 'order-service_orders', 0, 100);
RESET ROLE;
SELECT * FROM t.stored ORDER BY kafka_offset, source, value;

-- 5. Within one batch: a value twice (the second is a replay), two values
--    at one position (the second is flagged), an other event and a dead
--    letter at one position (one of them is flagged), an order with a
--    position (orders are versions: the position is not kept).
SELECT * FROM t.ingest(ARRAY['dup', 'dup', 'a 201', 'b 201',
                             '{"object_type": "ping", "n": 202}', 'bad 202',
                             t.order_msg(1, 'u1', 'CLOSED', '2023-05-01 10:00:00', t.items('d1:Плов'))],
                       ARRAY[200, 200, 201, 201, 202, 202, 203]);
SELECT * FROM t.stored WHERE kafka_offset >= 200 ORDER BY kafka_offset, value;

-- 6. Another topic, or none, is another position; without a topic the
--    same bytes at the same partition and offset are a replay.
SELECT * FROM t.ingest(ARRAY['dup'], ARRAY[200], 'another-topic');
SELECT * FROM t.ingest(ARRAY['no topic'], ARRAY[7], NULL);
SELECT * FROM t.ingest(ARRAY['no topic'], ARRAY[7], NULL);
SELECT * FROM t.ingest(ARRAY['no topic either'], ARRAY[7], NULL);
SELECT kind, topic, kafka_offset, value, position_mismatch FROM t.stored
WHERE topic IS DISTINCT FROM 'order-service_orders' ORDER BY topic, value;

-- Without a position nothing is a replay: each call stores its row.
SELECT * FROM dwh.ingest_orders(ARRAY[convert_to('no position', 'UTF8'),
                                      convert_to('no position', 'UTF8')]);
SELECT count(*) FROM dwh.dead_letters WHERE raw = convert_to('no position', 'UTF8');

-- 7. A replayed dead letter keeps its source: a Kafka dead letter still
--    refused is a Kafka dead letter again, and the worker's redelivery of
--    it afterwards is a replay, not a second row.
SELECT d.outcome, l.source, convert_from(l.raw, 'UTF8') AS value
FROM dwh.replay_dead_letters(ARRAY(SELECT id FROM dwh.dead_letters
                                   WHERE source = 'kafka' AND kafka_offset = 100)) d,
     dwh.dead_letters l
WHERE l.kafka_offset = 100 AND l.source = 'kafka';
SELECT dwh.ingest_dead_letter(convert_to('real 100', 'UTF8'), 'kafka',
                              'order-service_orders', 0, 100);
SELECT count(*) FROM dwh.dead_letters WHERE source = 'kafka' AND kafka_offset = 100;

-- 8. What the loader cannot do: write as the worker, or raise what a dead
--    letter keeps.
SET ROLE regress_dwh_forger;
\set VERBOSITY sqlstate
SELECT dwh.ingest_dead_letter(convert_to('x', 'UTF8'), 'kafka', 'order-service_orders', 0, 500);
SET dwh.dead_letter_keep_bytes = '1GB';
\set VERBOSITY default
RESET ROLE;
SELECT dwh.ingest_dead_letter(convert_to('x', 'UTF8'), 'redis', NULL, NULL, NULL);

-- 9. Rows written in 1.0's shape (a 1.0 dump restored with --data-only)
--    name neither source nor raw_sha256: a row with a Kafka offset is taken
--    for the worker's, one without for a SQL caller's, and the message's
--    text stands for its bytes, as the update from 1.0 fills its rows.  A
--    row that names them keeps what it names.
INSERT INTO stg.other_events (object_id, object_type, message, topic, kafka_partition, kafka_offset)
VALUES (901, 'ping', '{"object_type": "ping", "object_id": 901}', 'order-service_orders', 0, 901);
INSERT INTO stg.other_events (object_id, object_type, message)
VALUES (902, 'ping', '{"object_type": "ping", "object_id": 902}');
INSERT INTO stg.other_events (object_id, object_type, message, source, raw_sha256)
VALUES (903, 'ping', '{"object_type": "ping", "object_id": 903}', 'sql', '\x00');
SELECT object_id, source, kafka_offset,
       raw_sha256 = sha256(convert_to(message::text, 'UTF8')) AS hash_of_text,
       raw_sha256 = '\x00' AS as_named, position_mismatch
FROM stg.other_events WHERE object_id > 900 ORDER BY object_id;

SELECT * FROM t.check();

DROP OWNED BY regress_dwh_forger;
DROP ROLE regress_dwh_forger;
