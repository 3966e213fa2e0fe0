-- Whoever writes STG, DDS and the marts follow in the same transaction:
-- INSERT, multi-row INSERT, COPY and the usual upsert, with the same
-- version rules as the ingest functions.
\set ECHO none
\i test/regress_helpers.sql
\set ECHO all

-- Single-row INSERT.
INSERT INTO stg.order_events (object_id, object_type, sent_dttm, payload)
VALUES (1, 'order', '2023-04-01 20:10:00', t.payload(1, 'u1', 'CLOSED', '2023-04-01 20:00:00', 'd1:Плов'));
SELECT * FROM t.products;
SELECT update_ts FROM stg.order_events WHERE object_id = 1;

-- Multi-row INSERT, inside a transaction: the marts are up to date before
-- commit, in the same transaction.
BEGIN;
INSERT INTO stg.order_events (object_id, object_type, sent_dttm, payload) VALUES
    (2, 'order', '2023-04-02 20:10:00', t.payload(2, 'u1', 'CLOSED', '2023-04-02 20:00:00', 'd1:Плов', 'd2:Лагман')),
    (3, 'order', '2023-04-03 20:10:00', t.payload(3, 'u2', 'CLOSED', '2023-04-03 20:00:00', 'd2:Лагман'));
SELECT * FROM t.products;
COMMIT;

-- COPY.
COPY stg.order_events (object_id, object_type, sent_dttm, payload) FROM stdin;
4	order	2023-04-04 20:10:00	{"cost": 200, "date": "2023-04-04 20:00:00", "user": {"id": "u2"}, "payment": 200, "statuses": [], "update_ts": "2023-04-04 20:00:00", "restaurant": {"id": "rest-1"}, "bonus_grant": 0, "order_items": [{"id": "d3", "name": "Шурпа", "price": 100, "quantity": 2}], "final_status": "CLOSED", "bonus_payment": 0}
5	order	2023-04-05 20:10:00	{"cost": 200, "date": "2023-04-05 20:00:00", "user": {"id": "u3"}, "payment": 200, "statuses": [], "update_ts": "2023-04-05 20:00:00", "restaurant": {"id": "rest-1"}, "bonus_grant": 0, "order_items": [{"id": "d3", "name": "Шурпа", "price": 100, "quantity": 2}], "final_status": "CLOSED", "bonus_payment": 0}
\.
SELECT * FROM t.products;
SELECT * FROM t.check();

-- The usual upsert, with a newer version (cancelled), an older version and
-- the same version again in one statement per row.
INSERT INTO stg.order_events (object_id, object_type, sent_dttm, payload)
VALUES (2, 'order', '2023-04-02 21:10:00', t.payload(2, 'u1', 'CANCELLED', '2023-04-02 21:00:00', 'd1:Плов', 'd2:Лагман'))
ON CONFLICT (object_id) DO UPDATE
SET object_type = EXCLUDED.object_type, sent_dttm = EXCLUDED.sent_dttm, payload = EXCLUDED.payload;
INSERT INTO stg.order_events (object_id, object_type, sent_dttm, payload)
VALUES (3, 'order', '2023-04-03 19:10:00', t.payload(3, 'u2', 'CANCELLED', '2023-04-03 19:00:00', 'd2:Лагман'))
ON CONFLICT (object_id) DO UPDATE
SET object_type = EXCLUDED.object_type, sent_dttm = EXCLUDED.sent_dttm, payload = EXCLUDED.payload;
INSERT INTO stg.order_events (object_id, object_type, sent_dttm, payload)
VALUES (4, 'order', '2023-04-04 20:10:00', t.payload(4, 'u2', 'CLOSED', '2023-04-04 20:00:00', 'd3:Шурпа'))
ON CONFLICT (object_id) DO UPDATE
SET object_type = EXCLUDED.object_type, sent_dttm = EXCLUDED.sent_dttm, payload = EXCLUDED.payload;
SELECT object_id, payload->>'final_status' AS status, update_ts FROM stg.order_events ORDER BY 1;
SELECT * FROM t.products;
SELECT count(*) AS status_rows, count(*) FILTER (WHERE status = 'CANCELLED') AS cancelled
FROM dds.s_order_status;
SELECT * FROM t.check();

-- An UPDATE with an older version is skipped, a newer one applied.
UPDATE stg.order_events
SET payload = t.payload(5, 'u3', 'CANCELLED', '2023-01-01 00:00:00', 'd3:Шурпа')
WHERE object_id = 5;
SELECT payload->>'final_status' AS status FROM stg.order_events WHERE object_id = 5;
UPDATE stg.order_events
SET payload = t.payload(5, 'u3', 'CLOSED', '2023-04-05 22:00:00', 'd3:Шурпа', 'd4:Чай')
WHERE object_id = 5;
SELECT * FROM t.products WHERE user_id = 'u3';
SELECT * FROM t.check();

-- Malformed rows are refused with the reason, a SQLSTATE and a hint.
CREATE FUNCTION t.error_of(statement text) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    state text;
    message text;
BEGIN
    EXECUTE statement;
    RETURN 'no error';
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS state = RETURNED_SQLSTATE, message = MESSAGE_TEXT;
    RETURN state || ': ' || message;
END $$;
INSERT INTO stg.order_events (object_id, object_type, sent_dttm, payload)
VALUES (6, 'order', '2023-04-06 20:10:00', '{"user": {"id": "u1"}}');
SELECT t.error_of($$INSERT INTO stg.order_events (object_id, object_type, sent_dttm, payload)
    VALUES (6, 'order', '2023-04-06 20:10:00', '{"user": {"id": "u1"}}')$$);
SELECT t.error_of($$INSERT INTO stg.order_events (object_id, object_type, sent_dttm, payload)
    VALUES (7, 'payment', '2023-04-06 20:10:00',
            t.payload(7, 'u1', 'CLOSED', '2023-04-06 20:00:00', 'd1:Плов'))$$);
SELECT t.error_of($$INSERT INTO stg.users (object_id, payload) VALUES ('u9', '{"name": "No Login"}')$$);
SELECT t.error_of($$INSERT INTO stg.restaurants (object_id, payload) VALUES ('r9', '{"name": "No Menu"}')$$);
SELECT t.error_of($$INSERT INTO stg.restaurants (object_id, payload)
    VALUES ('r9', '{"name": "Bad Version", "menu": [], "update_ts_utc": "soon"}')$$);
-- Deleting an order version would let an older one replace it.
DELETE FROM stg.order_events WHERE object_id = 1;
SELECT t.error_of('TRUNCATE stg.order_events');
SELECT t.error_of('TRUNCATE stg.order_events CASCADE');
SELECT count(*) AS orders FROM stg.order_events;
SELECT * FROM t.check();

-- Every version received stays, and keeps what identifies it.  A version
-- newer than the current one belongs in the current table: written to
-- the history, DDS took it for what the order held before, and the marts
-- never counted the change when it then arrived (a CANCELLED order stayed
-- counted).
SELECT t.set_user('u1', 'Анна', 'anna', '2023-04-01 09:00:00');
SELECT t.set_user('u1', 'Анна Б.', 'anna', '2023-04-02 09:00:00');
SELECT t.set_menu('rest-1', '2023-04-01 09:00:00', 'd1:Плов:Main');
SELECT t.set_menu('rest-1', '2023-04-02 09:00:00', 'd1:Плов:Main', 'd2:Лагман:Soups');
SELECT t.error_of($$INSERT INTO stg.order_event_history (object_id, update_ts, payload, sent_dttm)
    VALUES (2, '2023-04-03 12:00:00',
            t.payload(2, 'u1', 'CANCELLED', '2023-04-03 12:00:00', 'd1:Плов', 'd2:Лагман'),
            '2023-04-03 12:00:00')$$);
SELECT t.error_of($$INSERT INTO stg.user_history (object_id, payload)
    VALUES ('u1', '{"_id": "u1", "name": "Анна В.", "login": "anna", "update_ts_utc": "2023-04-03 09:00:00"}')$$);
SELECT t.error_of($$INSERT INTO stg.restaurant_history (object_id, payload)
    VALUES ('rest-1', '{"_id": "rest-1", "name": "R", "menu": [], "update_ts_utc": "2023-04-03 09:00:00"}')$$);
-- Nor does the current version itself: it would be held twice (the same
-- version received again raises the current row's sent_dttm).
SELECT t.error_of($$INSERT INTO stg.order_event_history (object_id, update_ts, payload, sent_dttm)
    SELECT object_id, update_ts, payload, sent_dttm + interval '1 hour'
    FROM stg.order_events WHERE object_id = 2$$);
SELECT t.error_of($$INSERT INTO stg.user_history (object_id, payload)
    SELECT object_id, payload FROM stg.users WHERE object_id = 'u1'$$);
SELECT t.error_of($$INSERT INTO stg.restaurant_history (object_id, payload)
    SELECT object_id, payload FROM stg.restaurants WHERE object_id = 'rest-1'$$);
-- An older version is history, as it should be.
SELECT t.error_of($$INSERT INTO stg.order_event_history (object_id, update_ts, payload, sent_dttm)
    VALUES (2, '2023-04-02 19:00:00',
            t.payload(2, 'u1', 'CANCELLED', '2023-04-02 19:00:00', 'd1:Плов', 'd2:Лагман'),
            '2023-04-02 19:00:00')$$);
-- Nor is a history written for a key without a current version: an older
-- version written to the current table next would become current beside a
-- newer one, which nothing counts.  Written to the current table first,
-- the newer version stays current and the older one goes to the history.
SELECT t.error_of($$INSERT INTO stg.order_event_history (object_id, update_ts, payload, sent_dttm)
    VALUES (80, '2023-04-03 12:00:00',
            t.payload(80, 'u1', 'CANCELLED', '2023-04-03 12:00:00', 'd1:Плов'),
            '2023-04-03 12:00:00')$$);
SELECT t.error_of($$INSERT INTO stg.user_history (object_id, payload)
    VALUES ('u80', '{"_id": "u80", "name": "Nobody", "login": "nobody", "update_ts_utc": "2023-04-03 09:00:00"}')$$);
SELECT t.error_of($$INSERT INTO stg.restaurant_history (object_id, payload)
    VALUES ('rest-80', '{"_id": "rest-80", "name": "R", "menu": [], "update_ts_utc": "2023-04-03 09:00:00"}')$$);
INSERT INTO stg.order_events (object_id, object_type, sent_dttm, payload)
VALUES (80, 'order', '2023-04-03 12:00:00',
        t.payload(80, 'u1', 'CANCELLED', '2023-04-03 12:00:00', 'd1:Плов'));
INSERT INTO stg.order_events (object_id, object_type, sent_dttm, payload)
VALUES (80, 'order', '2023-04-02 12:00:00',
        t.payload(80, 'u1', 'CLOSED', '2023-04-02 12:00:00', 'd1:Плов'))
ON CONFLICT (object_id) DO UPDATE SET payload = EXCLUDED.payload, sent_dttm = EXCLUDED.sent_dttm;
SELECT payload->>'final_status' AS current_status,
       (SELECT string_agg(payload->>'final_status', ',') FROM stg.order_event_history h
        WHERE h.object_id = 80) AS history
FROM stg.order_events WHERE object_id = 80;
SELECT * FROM t.check();
-- No version is deleted, from any table of versions.
SELECT t.error_of('DELETE FROM stg.order_event_history');
SELECT t.error_of('TRUNCATE stg.user_history');
SELECT t.error_of($$DELETE FROM stg.users WHERE object_id = 'u1'$$);
SELECT t.error_of('DELETE FROM stg.restaurant_history');
SELECT t.error_of('TRUNCATE stg.restaurants');
-- Messages of other types are kept whole, out of the counts: they may go.
SELECT t.error_of('TRUNCATE stg.other_events');
-- A kept version does not change; only its sent_dttm grows.
SELECT t.error_of($$UPDATE stg.order_event_history
    SET payload = t.payload(2, 'u1', 'CLOSED', '2023-04-02 19:00:00', 'd1:Плов')
    WHERE object_id = 2 AND update_ts = '2023-04-02 19:00:00'$$);
SELECT t.error_of($$UPDATE stg.user_history SET update_ts = '2023-04-05 00:00:00'$$);
SELECT t.error_of($$UPDATE stg.order_event_history SET sent_dttm = '2023-04-02 19:30:00'
    WHERE object_id = 2 AND update_ts = '2023-04-02 19:00:00'$$);
SELECT t.error_of($$UPDATE stg.order_event_history SET sent_dttm = '2023-04-02 19:10:00'
    WHERE object_id = 2 AND update_ts = '2023-04-02 19:00:00'$$);
-- No row moves to another key: the order would leave the marts without
-- a trace in DDS.
SELECT t.error_of($$UPDATE stg.order_events
    SET object_id = 50, payload = t.payload(50, 'u1', 'CLOSED', '2023-04-04 20:00:00', 'd1:Плов')
    WHERE object_id = 1$$);
SELECT t.error_of($$UPDATE stg.restaurants SET object_id = 'rest-2'$$);
SELECT t.error_of($$UPDATE stg.user_history SET object_id = 'u2'$$);
-- The newer version where it belongs: the order leaves the counts.
INSERT INTO stg.order_events (object_id, object_type, sent_dttm, payload)
VALUES (2, 'order', '2023-04-03 12:00:00',
        t.payload(2, 'u1', 'CANCELLED', '2023-04-03 12:00:00', 'd1:Плов', 'd2:Лагман'))
ON CONFLICT (object_id) DO UPDATE SET payload = EXCLUDED.payload, sent_dttm = EXCLUDED.sent_dttm;
SELECT * FROM t.products;
SELECT count(*) FROM dwh.verify();

-- A restore that leaves the current versions out (pg_dump
-- --exclude-table-data=stg.order_events, a COPY that failed): orders with
-- history only.  Each takes the date of its greatest version, whichever of
-- its versions arrives first (the first used to keep it), and the check
-- of DDS and dwh.rebuild(vault => true) agree (the rebuild used to drop
-- such orders, the check to expect their satellites but not their hub).
SET check_function_bodies = off;
INSERT INTO stg.order_event_history (object_id, update_ts, payload, sent_dttm)
VALUES (900, '2023-05-01 12:00:00',
        t.payload(900, 'u1', 'CLOSED', '2023-05-01 12:00:00', 'd1:Плов'), '2023-05-02 00:00:00');
INSERT INTO stg.order_event_history (object_id, update_ts, payload, sent_dttm)
VALUES (900, '2023-04-01 12:00:00',
        t.payload(900, 'u1', 'OPEN', '2023-04-01 12:00:00', 'd1:Плов'), '2023-05-02 00:00:00');
INSERT INTO stg.order_event_history (object_id, update_ts, payload, sent_dttm)
VALUES (901, '2023-04-01 12:00:00',
        t.payload(901, 'u1', 'OPEN', '2023-04-01 12:00:00', 'd1:Плов'), '2023-05-02 00:00:00');
INSERT INTO stg.order_event_history (object_id, update_ts, payload, sent_dttm)
VALUES (901, '2023-05-01 12:00:00',
        t.payload(901, 'u1', 'CLOSED', '2023-05-01 12:00:00', 'd1:Плов'), '2023-05-02 00:00:00');
RESET check_function_bodies;
SELECT order_id, order_dt FROM dds.h_order WHERE order_id IN (900, 901) ORDER BY 1;
SELECT * FROM dwh.verify_vault();
-- A damaged hub: the rebuild loads all of DDS again, these orders too.
UPDATE dds.h_order SET order_dt = '2000-01-01 00:00:00' WHERE order_id = 900;
SELECT * FROM dwh.rebuild(vault => true);
SELECT * FROM dwh.verify_vault();
SELECT order_id, order_dt FROM dds.h_order WHERE order_id IN (900, 901) ORDER BY 1;
SELECT count(*) FROM dwh.verify();
