-- Bad input through the entry points: each bad message ends as exactly one
-- dead letter with a clear reason; nothing else changes; its neighbours in
-- a batch are applied.
\set ECHO none
\i test/regress_helpers.sql
\set ECHO all

-- Counts of everything a bad message must not touch.
CREATE FUNCTION t.state() RETURNS TABLE (orders bigint, others bigint, hubs bigint, marts bigint)
LANGUAGE sql AS $$
    SELECT (SELECT count(*) FROM stg.order_events),
           (SELECT count(*) FROM stg.other_events),
           (SELECT count(*) FROM dds.h_order) + (SELECT count(*) FROM dds.h_user)
             + (SELECT count(*) FROM dds.h_product),
           (SELECT count(*) FROM cdm.user_product_counters)
$$;

SELECT t.load(1, 'u1', 'CLOSED', '2023-04-01 20:00:00', 'd1:Плов');
SELECT * FROM t.state();

-- A valid order, mutated by a jsonb path expression.
CREATE FUNCTION t.bad(path text[], value jsonb) RETURNS text
LANGUAGE sql AS $$
    SELECT jsonb_set(t.order_msg(2, 'u2', 'CLOSED', '2023-04-02 10:00:00',
                                 t.items('d2:Лагман'))::jsonb, path, value)::text
$$;
CREATE FUNCTION t.without(path text[]) RETURNS text
LANGUAGE sql AS $$
    SELECT (t.order_msg(2, 'u2', 'CLOSED', '2023-04-02 10:00:00',
                        t.items('d2:Лагман'))::jsonb #- path)::text
$$;

CREATE TABLE t.cases (n serial, label text, message bytea);
INSERT INTO t.cases (label, message) VALUES
    ('not JSON', convert_to('this is not json', 'UTF8')),
    ('truncated JSON', convert_to('{"object_id": 2, "payload": {', 'UTF8')),
    ('not an object', convert_to('[1, 2, 3]', 'UTF8')),
    ('a JSON string', convert_to('"order"', 'UTF8')),
    ('empty value', ''::bytea),
    ('missing object_id', convert_to(t.without('{object_id}'), 'UTF8')),
    ('object_id a string', convert_to(t.bad('{object_id}', '"2"'), 'UTF8')),
    ('object_id fractional', convert_to(t.bad('{object_id}', '2.5'), 'UTF8')),
    ('object_id negative', convert_to(t.bad('{object_id}', '-2'), 'UTF8')),
    ('object_id out of range', convert_to(t.bad('{object_id}', '99999999999999999999999'), 'UTF8')),
    ('missing object_type', convert_to(t.without('{object_type}'), 'UTF8')),
    ('missing sent_dttm', convert_to(t.without('{sent_dttm}'), 'UTF8')),
    ('missing payload', convert_to(t.without('{payload}'), 'UTF8')),
    ('payload not an object', convert_to(t.bad('{payload}', '[]'), 'UTF8')),
    ('missing user', convert_to(t.without('{payload,user}'), 'UTF8')),
    ('user id empty', convert_to(t.bad('{payload,user,id}', '""'), 'UTF8')),
    ('missing restaurant', convert_to(t.without('{payload,restaurant}'), 'UTF8')),
    ('order_items not an array', convert_to(t.bad('{payload,order_items}', '{"id": "d2"}'), 'UTF8')),
    ('item not an object', convert_to(t.bad('{payload,order_items,0}', '"d2"'), 'UTF8')),
    ('item without id', convert_to(t.without('{payload,order_items,0,id}'), 'UTF8')),
    ('negative price', convert_to(t.bad('{payload,order_items,0,price}', '-100'), 'UTF8')),
    ('price a string', convert_to(t.bad('{payload,order_items,0,price}', '"100"'), 'UTF8')),
    ('negative quantity', convert_to(t.bad('{payload,order_items,0,quantity}', '-1'), 'UTF8')),
    ('fractional quantity', convert_to(t.bad('{payload,order_items,0,quantity}', '1.5'), 'UTF8')),
    ('quantity a string', convert_to(t.bad('{payload,order_items,0,quantity}', '"two"'), 'UTF8')),
    ('missing cost', convert_to(t.without('{payload,cost}'), 'UTF8')),
    ('invalid update_ts', convert_to(t.bad('{payload,update_ts}', '"2023-02-30 10:00:00"'), 'UTF8')),
    ('update_ts not a timestamp', convert_to(t.bad('{payload,update_ts}', '"yesterday"'), 'UTF8')),
    ('invalid date', convert_to(t.bad('{payload,date}', '"2023-04-02 25:00:00"'), 'UTF8')),
    ('invalid sent_dttm', convert_to(t.bad('{sent_dttm}', '"2023-04-02"'), 'UTF8')),
    ('missing final_status', convert_to(t.without('{payload,final_status}'), 'UTF8')),
    ('\u0000 in a string', convert_to(replace(t.bad('{payload,order_items,0,name}', '"X"'), '"X"', '"a\u0000b"'), 'UTF8')),
    ('invalid UTF-8', convert_to(t.order_msg(2, 'u2', 'CLOSED', '2023-04-02 10:00:00', t.items('d2:Лагман')), 'UTF8')
                      || '\xff'::bytea),
    ('NUL byte', '\x7b00'::bytea),
    ('10 MB message', convert_to('{"object_id": 2, "pad": "' || repeat('x', 10 * 1024 * 1024) || '"}', 'UTF8')),
    ('nested 10000 deep', convert_to(repeat('[', 10000) || repeat(']', 10000), 'UTF8'));

-- One at a time: each is a dead letter, the state does not move.
SELECT n, label, dwh.ingest_order(message) FROM t.cases ORDER BY n;
SELECT * FROM t.state();
SELECT c.n, c.label, d.sqlstate, d.reason,
       d.raw = substr(c.message, 1, 65536) AND d.raw_length = length(c.message)
           AND d.raw_sha256 = sha256(c.message) AS raw_kept,
       d.source
FROM t.cases c JOIN dwh.dead_letters d ON d.id = c.n
ORDER BY c.n;
SELECT count(*) AS dead_letters FROM dwh.dead_letters;

-- Every message kept whole up to dwh.dead_letter_keep_bytes (64kB): of the
-- 10 MB one, its first 64 kB, its length and its hash.
SELECT length(raw) AS kept, raw_length, length(raw) = raw_length AS whole
FROM dwh.dead_letters WHERE sqlstate IN ('54000', '54001') ORDER BY id;

-- In a batch, with their coordinates: the good neighbours are applied.
DELETE FROM dwh.dead_letters;
SELECT * FROM dwh.ingest_orders(
    ARRAY[convert_to(t.order_msg(3, 'u3', 'CLOSED', '2023-04-03 10:00:00', t.items('d3:Шурпа')), 'UTF8')]
    || ARRAY(SELECT message FROM t.cases ORDER BY n)
    || ARRAY[convert_to(t.order_msg(4, 'u4', 'CLOSED', '2023-04-04 10:00:00', t.items('d4:Чай')), 'UTF8')],
    'order-service_orders',
    ARRAY(SELECT 0 FROM generate_series(1, (SELECT count(*) + 2 FROM t.cases))),
    ARRAY(SELECT g::bigint + 1000 FROM generate_series(1, (SELECT count(*) + 2 FROM t.cases)) g));
SELECT * FROM t.state();
SELECT count(*) AS dead_letters, count(DISTINCT kafka_offset) AS distinct_offsets,
       min(kafka_offset), max(kafka_offset), min(topic) AS topic
FROM dwh.dead_letters;
SELECT * FROM t.products;
SELECT * FROM t.check();

-- Other object types are kept out of the counts, in stg.other_events.
SELECT dwh.ingest_order('{"object_id": 77, "object_type": "restaurant_review", "sent_dttm": "2023-04-05 10:00:00", "payload": {"stars": 5}}');
SELECT dwh.ingest_order('{"object_type": "heartbeat"}');
SELECT object_id, object_type, sent_dttm, message->'payload' AS payload FROM stg.other_events ORDER BY id;
SELECT * FROM t.state();

-- A failure after validation (here a constraint that rejects one order) is
-- retried message by message: only the culprit is dead-lettered.
CREATE FUNCTION t.reject_666() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.object_id = 666 THEN
        RAISE EXCEPTION 'order 666 is cursed' USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER reject_666 BEFORE INSERT ON stg.order_events
    FOR EACH ROW EXECUTE FUNCTION t.reject_666();
DELETE FROM dwh.dead_letters;
SELECT * FROM dwh.ingest_orders(ARRAY[
    convert_to(t.order_msg(5, 'u5', 'CLOSED', '2023-04-05 10:00:00', t.items('d5:Долма')), 'UTF8'),
    convert_to(t.order_msg(666, 'u5', 'CLOSED', '2023-04-05 11:00:00', t.items('d5:Долма')), 'UTF8'),
    convert_to(t.order_msg(7, 'u5', 'CLOSED', '2023-04-05 12:00:00', t.items('d5:Долма')), 'UTF8')]);
SELECT sqlstate, reason FROM dwh.dead_letters;
SELECT * FROM t.products WHERE user_id = 'u5';
-- The others are written again as one batch, by one (sub)transaction.
SELECT count(DISTINCT xmin::text) AS writers_of_5_and_7
FROM stg.order_events WHERE object_id IN (5, 7);

-- Culprits only: a lone message, and a batch whose every message fails on
-- its own, are dead-lettered too.  Both once freed an error twice and
-- crashed the server (found by test/t/040_fuzz.pl).
DELETE FROM dwh.dead_letters;
SELECT dwh.ingest_order(t.order_msg(666, 'u5', 'CLOSED', '2023-04-05 11:00:00', t.items('d5:Долма')));
SELECT * FROM dwh.ingest_orders(ARRAY[
    convert_to(t.order_msg(666, 'u5', 'CLOSED', '2023-04-05 11:00:00', t.items('d5:Долма')), 'UTF8')]);
SELECT * FROM dwh.ingest_orders(ARRAY[
    convert_to(t.order_msg(666, 'u5', 'CLOSED', '2023-04-05 11:00:00', t.items('d5:Долма')), 'UTF8'),
    convert_to(t.order_msg(666, 'u5', 'CLOSED', '2023-04-05 12:00:00', t.items('d5:Долма')), 'UTF8')]);
SELECT sqlstate, reason FROM dwh.dead_letters ORDER BY id;
SELECT count(*) AS order_666 FROM stg.order_events WHERE object_id = 666;

-- An error that is not about the data (here a serialization failure) is
-- raised to the caller: nothing is dead-lettered, nothing is applied.
CREATE OR REPLACE FUNCTION t.reject_666() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.object_id = 666 THEN
        RAISE EXCEPTION 'order 666 meets %', current_setting('t.errcode')
            USING ERRCODE = current_setting('t.errcode');
    END IF;
    RETURN NEW;
END $$;
SET t.errcode = '40001';
DELETE FROM dwh.dead_letters;
SELECT * FROM dwh.ingest_orders(ARRAY[
    convert_to(t.order_msg(8, 'u5', 'CLOSED', '2023-04-05 13:00:00', t.items('d5:Долма')), 'UTF8'),
    convert_to(t.order_msg(666, 'u5', 'CLOSED', '2023-04-05 14:00:00', t.items('d5:Долма')), 'UTF8')]);
SELECT count(*) AS dead_letters FROM dwh.dead_letters;
SELECT count(*) AS order_8 FROM stg.order_events WHERE object_id = 8;

-- So are the README's others: a deadlock, a cancel, disk or memory full, a
-- missing privilege, a lock timeout, an internal error.  Only an error of a
-- data class (here 22023) dead-letters the culprit and applies the rest.
CREATE FUNCTION t.ingest_8_and_666(errcode text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('t.errcode', errcode, true);
    PERFORM dwh.ingest_orders(ARRAY[
        convert_to(t.order_msg(8, 'u5', 'CLOSED', '2023-04-05 13:00:00', t.items('d5:Долма')), 'UTF8'),
        convert_to(t.order_msg(666, 'u5', 'CLOSED', '2023-04-05 14:00:00', t.items('d5:Долма')), 'UTF8')]);
    RETURN format('returned: %s dead letter(s), order 8 %s',
                  (SELECT count(*) FROM dwh.dead_letters),
                  CASE WHEN EXISTS (SELECT FROM stg.order_events WHERE object_id = 8)
                       THEN 'applied' ELSE 'not applied' END);
EXCEPTION WHEN OTHERS OR query_canceled THEN
    RETURN 'raised ' || SQLSTATE || ': ' || SQLERRM;
END $$;
SELECT errcode, t.ingest_8_and_666(errcode)
FROM unnest(ARRAY['40P01', '57014', '53100', '53200', '42501', '55P03', 'XX000', '22023']) AS errcode;
DROP TRIGGER reject_666 ON stg.order_events;
DELETE FROM dwh.dead_letters;

-- Arguments that are wrong, not messages.
SELECT * FROM dwh.ingest_orders(NULL);
SELECT * FROM dwh.ingest_orders(ARRAY[NULL]::bytea[]);
SELECT * FROM dwh.ingest_orders(ARRAY['{}']::bytea[], NULL, ARRAY[1, 2], NULL);
SELECT * FROM dwh.ingest_orders(ARRAY[]::bytea[]);
SELECT * FROM t.check();

-- Replay: a message refused for its size goes through once the limit is
-- raised; the others are refused again with the same reason.  A Redis
-- dead letter is no order: it stays for the Redis worker's next read.
DELETE FROM dwh.dead_letters;
SET dwh.max_message_size = 1024;
SELECT dwh.ingest_order(convert_to(t.order_msg(20, 'u7', 'CLOSED', '2023-04-20 10:00:00',
                        t.items('d7:' || repeat('Очень длинное имя ', 100))), 'UTF8'));
SELECT dwh.ingest_order('not json');
INSERT INTO dwh.dead_letters (source, source_key, raw, reason, sqlstate, raw_length, raw_sha256)
VALUES ('redis', 'u-broken', '\x7b', 'value is not valid JSON', '22P02', 1, sha256('\x7b'));
SELECT id, sqlstate, left(reason, 50) AS reason FROM dwh.dead_letters ORDER BY id;
RESET dwh.max_message_size;
SELECT * FROM dwh.replay_dead_letters();
SELECT id, sqlstate, left(reason, 50) AS reason FROM dwh.dead_letters ORDER BY id;
SELECT user_id, length(product_name) AS name_length, order_cnt FROM t.products WHERE user_id = 'u7';
SELECT * FROM t.check();

-- A NULL payload is refused with 23502, whatever the table and however it
-- is written (it used to crash the server).
\set VERBOSITY sqlstate
INSERT INTO stg.users (object_id, payload) VALUES ('u-null', NULL);
INSERT INTO stg.restaurants (object_id, payload) VALUES ('r-null', NULL);
INSERT INTO stg.order_events (object_id, object_type, sent_dttm, payload)
VALUES (99, 'order', '2023-01-01 00:00:00', NULL);
UPDATE stg.order_events SET payload = NULL
WHERE object_id = (SELECT min(object_id) FROM stg.order_events);
INSERT INTO stg.user_history (object_id, payload) VALUES ('u-null', NULL);
\set VERBOSITY default

-- What the ingest and the Redis worker refuse is refused written directly
-- too (it used to be stored): a user or restaurant key that no order can
-- name (empty, longer than 128 bytes), a value nested deeper than 2048
-- levels.  2048 levels and a key of 128 bytes are accepted.
\set VERBOSITY sqlstate
INSERT INTO stg.users (object_id, payload) VALUES ('', '{"name": "E", "login": "e"}');
INSERT INTO stg.restaurants (object_id, payload) VALUES (repeat('r', 129), '{"name": "R", "menu": []}');
INSERT INTO stg.users (object_id, payload)
VALUES ('u-deep', ('{"name": "D", "login": "d", "x": ' || repeat('[', 2048) || repeat(']', 2048) || '}')::jsonb);
INSERT INTO stg.order_events (object_id, object_type, sent_dttm, payload)
SELECT 98, 'order', '2023-01-01 00:00:00',
       t.payload(98, 'u1', 'CLOSED', '2023-01-01 00:00:00', 'd1:Плов')
       || jsonb_build_object('x', (repeat('[', 2048) || repeat(']', 2048))::jsonb);
\set VERBOSITY default
INSERT INTO stg.users (object_id, payload)
VALUES ('u-deep', ('{"name": "D", "login": "d", "x": ' || repeat('[', 2047) || repeat(']', 2047) || '}')::jsonb);
INSERT INTO stg.restaurants (object_id, payload) VALUES (repeat('r', 128), '{"name": "R", "menu": []}');
SELECT count(*) AS accepted FROM stg.users WHERE object_id = 'u-deep';

-- A reason that quotes the value is valid UTF-8 even when the value is
-- not: a parser's error text can cut a character in two (a dump of such a
-- dead letter could not be restored).
DELETE FROM dwh.dead_letters;
SELECT dwh.ingest_order('\x7b2261223a225c75d191227d'::bytea);
SELECT sqlstate, reason,
       pg_catalog.convert_from(pg_catalog.convert_to(reason, 'UTF8'), 'UTF8') = reason
           AS valid_utf8
FROM dwh.dead_letters;

-- Timestamps: microseconds at most.  A seventh digit would be truncated by
-- the validation and rounded by ::timestamp (here into the next day).
DELETE FROM dwh.dead_letters;
SELECT dwh.ingest_order(t.order_msg(30, 'u8', 'CLOSED', '2023-01-01 23:59:59.9999999',
                                    t.items('d1:Плов')));
SELECT dwh.ingest_order(t.order_msg(31, 'u8', 'CLOSED', '2023-01-01 23:59:59.999999',
                                    t.items('d1:Плов')));
SELECT sqlstate, reason FROM dwh.dead_letters;
SELECT object_id, update_ts, h.order_dt
FROM stg.order_events e JOIN dds.h_order h ON h.order_id = e.object_id
WHERE object_id IN (30, 31);

-- An order with many items, then a version with one item less: every
-- link but one stays (the unlinking is one anti-join, not one scan of the
-- items per link).
SET dwh.max_order_items = 2000;
SELECT dwh.ingest_order(t.order_msg(32, 'u8', 'CANCELLED', '2023-02-01 10:00:00',
                                    (SELECT jsonb_agg(jsonb_build_object('id', 'big' || n, 'name', 'Блюдо ' || n,
                                                                         'price', 100, 'quantity', 2))
                                     FROM generate_series(1, 2000) n)));
SELECT dwh.ingest_order(t.order_msg(32, 'u8', 'CANCELLED', '2023-02-01 11:00:00',
                                    (SELECT jsonb_agg(jsonb_build_object('id', 'big' || n, 'name', 'Блюдо ' || n,
                                                                         'price', 100, 'quantity', 2))
                                     FROM generate_series(2, 2000) n)));
RESET dwh.max_order_items;
SELECT count(*) AS links FROM dds.l_order_product WHERE h_order_pk = dwh.hash_key('32');
-- With the limit lowered since, a newer version of that order is still
-- applied: the version it replaces moves to the history as it was
-- accepted (it was dead-lettered, 54000, the history refusing the old one).
SELECT dwh.ingest_order(t.order_msg(32, 'u8', 'CANCELLED', '2023-02-01 12:00:00',
                                    t.items('d1:Плов')));
SELECT count(*) AS versions_in_history,
       max(jsonb_array_length(payload->'order_items')) AS most_items
FROM stg.order_event_history WHERE object_id = 32;
SELECT * FROM t.check();

-- Numbers of any size are JSON, as jsonb has them: only the fields dwh
-- reads have ranges.
DELETE FROM dwh.dead_letters;
SELECT dwh.ingest_order('{"object_id": 1, "object_type": "ping", "big": 123456789012345678901234567890}');
SELECT dwh.ingest_order('{"object_id": 2, "object_type": "ping", "huge": 1e400, "tiny": -1e-400}');
SELECT dwh.ingest_order(jsonb_set(t.order_msg(33, 'u8', 'CLOSED', '2023-03-01 10:00:00',
                                              t.items('d1:Плов'))::jsonb,
                                  '{payload,loyalty_id}', '123456789012345678901234567890')::text);
SELECT dwh.ingest_order('{"object_id": 3, "object_type": "ping", "big": 1e400, "bad": [}');
SELECT dwh.ingest_order('{"object_id": 123456789012345678901234567890, "object_type": "order"}');
SELECT sqlstate, reason FROM dwh.dead_letters ORDER BY id;
SELECT object_type, message->'big' AS big FROM stg.other_events WHERE object_type = 'ping' ORDER BY id;
SELECT object_id FROM stg.order_events WHERE object_id = 33;

-- A number beyond what jsonb holds (numeric's range) makes a value jsonb
-- refuses: dead-lettered with 22003, alone or in a batch, like any other
-- bad value (it was an error of the whole batch; test/t/040_fuzz.pl).
DELETE FROM dwh.dead_letters;
SELECT dwh.ingest_order('{"object_id": 4, "object_type": "ping", "tiny": 1e-100000}');
SELECT * FROM dwh.ingest_orders(ARRAY[convert_to('{"object_id": 5, "huge": 1e200000}', 'UTF8')]);
SELECT * FROM dwh.ingest_orders(ARRAY[convert_to('{"object_id": 6, "tiny": 1e-16384}', 'UTF8'),
                                      convert_to('{"object_id": 7, "huge": 1e131072}', 'UTF8')]);
SELECT sqlstate, reason, convert_from(raw, 'UTF8') AS raw FROM dwh.dead_letters ORDER BY id;
SELECT count(*) AS pings FROM stg.other_events WHERE object_type = 'ping';

-- Nesting is bounded at 2048 levels, counted outside strings: brackets in
-- a string (after an escaped quote too) do not count.
DELETE FROM dwh.dead_letters;
SELECT * FROM dwh.ingest_orders(ARRAY[
    convert_to('{"object_id": 8, "object_type": "ping", "deep": '
               || repeat('[', 2047) || repeat(']', 2047) || '}', 'UTF8'),
    convert_to('{"object_id": 9, "object_type": "ping", "deep": '
               || repeat('[', 2048) || repeat(']', 2048) || '}', 'UTF8'),
    convert_to('{"object_id": 10, "object_type": "ping", "s": "\ud83d\ude00 \"'
               || repeat('[', 3000) || '"}', 'UTF8')]);
SELECT sqlstate, reason FROM dwh.dead_letters ORDER BY id;
SELECT message->>'object_id' AS object_id, message->'deep' IS NOT NULL AS deep,
       length(message->>'s') AS s_length
FROM stg.other_events WHERE message->>'object_id' IN ('8', '9', '10') ORDER BY id;

-- Items per order are bounded by dwh.max_order_items: above it a message
-- is dead-lettered with 54000, a direct write fails with 54000; at the
-- limit it is applied.
DELETE FROM dwh.dead_letters;
SET dwh.max_order_items = 3;
SELECT * FROM dwh.ingest_orders(ARRAY[
    convert_to(t.order_msg(34, 'u9', 'CLOSED', '2023-03-02 10:00:00',
                           t.items('d1:Плов', 'd2:Лагман', 'd3:Шурпа', 'd4:Чай')), 'UTF8'),
    convert_to(t.order_msg(35, 'u9', 'CLOSED', '2023-03-02 10:00:00',
                           t.items('d1:Плов', 'd2:Лагман', 'd3:Шурпа')), 'UTF8')]);
SELECT sqlstate, reason FROM dwh.dead_letters ORDER BY id;
SELECT object_id FROM stg.order_events WHERE object_id IN (34, 35) ORDER BY 1;
\set VERBOSITY sqlstate
INSERT INTO stg.order_events (object_id, object_type, sent_dttm, payload)
SELECT 36, 'order', '2023-03-02 10:00:00',
       t.order_msg(36, 'u9', 'CLOSED', '2023-03-02 10:00:00',
                   t.items('d1:Плов', 'd2:Лагман', 'd3:Шурпа', 'd4:Чай'))::jsonb->'payload';
\set VERBOSITY default
RESET dwh.max_order_items;
SELECT outcome FROM dwh.replay_dead_letters();
SELECT count(*) AS dead_letters FROM dwh.dead_letters;
SELECT object_id FROM stg.order_events WHERE object_id IN (34, 35, 36) ORDER BY 1;
SELECT * FROM t.check();

-- The bounds of the message format (docs/formats.md): one step past each
-- is a dead letter with its SQLSTATE; the bound itself is applied.
DELETE FROM dwh.dead_letters;
CREATE FUNCTION t.bound(id bigint, path text[], value jsonb) RETURNS text
LANGUAGE sql AS $$
    SELECT jsonb_set(jsonb_set(t.bad('{object_id}', to_jsonb(id))::jsonb, path, value),
                     '{object_id}', to_jsonb(id))::text
$$;
CREATE TABLE t.bounds (n serial, label text, message text);
INSERT INTO t.bounds (label, message) VALUES
    ('object_id 0', t.bad('{object_id}', '0')),
    ('object_id 1.0', t.bad('{object_id}', '1.0')),
    ('user id of 129 bytes', t.bad('{payload,user,id}', to_jsonb(repeat('u', 129)))),
    ('item id of 129 bytes', t.bad('{payload,order_items,0,id}', to_jsonb(repeat('d', 129)))),
    ('quantity 1000001', t.bad('{payload,order_items,0,quantity}', '1000001')),
    ('price 1e14', t.bad('{payload,order_items,0,price}', '1e14')),
    ('price 1e14 once rounded to 5 decimals', t.bad('{payload,order_items,0,price}', '99999999999999.999995')),
    ('bonus_payment negative', t.bad('{payload,bonus_payment}', '-1')),
    ('cost negative and tiny', t.bad('{payload,cost}', '-1e-400')),
    ('price negative and tiny', t.bad('{payload,order_items,0,price}', '-1e-1000')),
    ('statuses not an array', t.bad('{payload,statuses}', '"CLOSED"')),
    ('final_status of 65 bytes', t.bad('{payload,final_status}', to_jsonb(repeat('S', 65)))),
    ('item without name', t.without('{payload,order_items,0,name}')),
    ('object_id 9223372036854775807', t.bad('{object_id}', '9223372036854775807')),
    ('object_id 1e3 (1000)', t.bad('{object_id}', '1e3')),
    ('user id of 128 bytes', t.bound(9001, '{payload,user,id}', to_jsonb(repeat('u', 128)))),
    ('quantity 1000000', t.bound(9002, '{payload,order_items,0,quantity}', '1000000')),
    ('price 99999999999999', t.bound(9003, '{payload,order_items,0,price}', '99999999999999')),
    ('cost 99999999999999.99999', t.bound(9008, '{payload,cost}', '99999999999999.99999')),
    ('empty item name', t.bound(9004, '{payload,order_items,0,name}', '""')),
    ('T in sent_dttm', t.bound(9005, '{sent_dttm}', '"2023-04-02T10:00:00"')),
    ('T in update_ts', t.bound(9006, '{payload,update_ts}', '"2023-04-02T11:00:00"')),
    ('no bonuses', (t.bound(9007, '{payload,cost}', '200')::jsonb
                    #- '{payload,bonus_payment}' #- '{payload,bonus_grant}')::text);
SELECT n, label, dwh.ingest_order(message) AS outcome FROM t.bounds ORDER BY n;
SELECT sqlstate, reason FROM dwh.dead_letters ORDER BY id;
SELECT object_id, sent_dttm, update_ts, length(payload->'user'->>'id') AS user_id_length,
       payload->'order_items'->0->>'quantity' AS quantity,
       payload->'order_items'->0->>'price' AS price
FROM stg.order_events
WHERE object_id IN (1000, 9223372036854775807) OR object_id BETWEEN 9001 AND 9008
ORDER BY object_id;
SELECT * FROM t.check();

-- The same order spelt otherwise is the same order: keys written with
-- escapes and whitespace, and object_type given twice (the last one
-- counts, as jsonb reads it).  It is applied, not dead-lettered, and STG
-- holds the payload as the plain spelling gives it.  A key in another case
-- is another key: that message has no object_id.
DELETE FROM dwh.dead_letters;
SELECT replace(replace(replace(
           t.order_msg(30, 'u30', 'CLOSED', '2023-04-21 10:00:00', t.items('d8:Самса')),
           '"object_id"', E' \n"\\u006fbject_id"\t'),
           '"payload"', '"object_type": "user", "p\u0061yload"'),
           '"order_items"', '"order_\u0069tems"') AS spelt \gset
SELECT strpos(:'spelt', '\u006fbject_id') > 0 AND strpos(:'spelt', 'p\u0061yload') > 0
       AND strpos(:'spelt', '_\u0069tems') > 0 AS escapes_in_the_bytes;
SELECT dwh.ingest_order(convert_to(:'spelt', 'UTF8'));
SELECT e.payload = (t.order_msg(30, 'u30', 'CLOSED', '2023-04-21 10:00:00',
                                t.items('d8:Самса'))::jsonb)->'payload' AS same_payload
FROM stg.order_events e WHERE e.object_id = 30;
SELECT * FROM t.products WHERE user_id = 'u30';
SELECT dwh.ingest_order(convert_to(replace(
           t.order_msg(31, 'u30', 'CLOSED', '2023-04-21 11:00:00', t.items('d8:Самса')),
           '"object_id"', '"Object_id"'), 'UTF8'));
SELECT sqlstate, reason FROM dwh.dead_letters ORDER BY id;
SELECT * FROM t.check();
DELETE FROM dwh.dead_letters;

-- A dish's category is the business key of a hub, in a unique index: at
-- most 1,000 bytes (22001; one of 6,400 bytes failed with the index's
-- 54000).  Here 500 two-byte letters, then one byte more.
\set VERBOSITY sqlstate
SELECT t.set_menu('r-long', '2023-04-22 10:00:00', 'd-long:Пирог:' || repeat('к', 500));
SELECT t.set_menu('r-longer', '2023-04-22 10:00:00', 'd-longer:Пирог:' || repeat('к', 500) || 'x');
\set VERBOSITY default
SELECT octet_length(category_name) AS category_bytes
FROM dds.h_category WHERE category_name LIKE 'кк%';

-- The topic of positions is a Kafka topic name, checked before anything
-- is written (22023): positions are kept by topic, in indexed columns.
SELECT dwh.ingest_order(t.order_msg(45, 'u30', 'CLOSED', '2023-04-22 10:00:00', t.items('d8:Самса')),
                        repeat('t', 250), 0, 1);
SELECT dwh.ingest_orders(ARRAY[convert_to(t.order_msg(45, 'u30', 'CLOSED', '2023-04-22 10:00:00',
                                                      t.items('d8:Самса')), 'UTF8')],
                         '', ARRAY[0], ARRAY[1::bigint]);
SELECT dwh.kafka_seek(0, 0, 'my topic');
-- A message's partition and offset come together, neither negative.
SELECT dwh.ingest_order(t.order_msg(45, 'u30', 'CLOSED', '2023-04-22 10:00:00', t.items('d8:Самса')),
                        'orders', 0, NULL);
SELECT dwh.ingest_order(t.order_msg(45, 'u30', 'CLOSED', '2023-04-22 10:00:00', t.items('d8:Самса')),
                        'orders', -1, -5);
SELECT dwh.ingest_orders(ARRAY[convert_to(t.order_msg(45, 'u30', 'CLOSED', '2023-04-22 10:00:00',
                                                      t.items('d8:Самса')), 'UTF8')],
                         'orders', ARRAY[0], NULL);
SELECT dwh.ingest_order(t.order_msg(45, 'u30', 'CLOSED', '2023-04-22 10:00:00', t.items('d8:Самса')),
                        repeat('t', 249), 0, 1);
SELECT count(*) AS orders_45 FROM stg.order_events WHERE object_id = 45;
SELECT * FROM t.check();
