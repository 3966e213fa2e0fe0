-- What an ingest batch shares with the triggers its statements fire (its
-- session, src/dwh_ingest_session.c) lasts as long as the batch: a batch run
-- by a trigger of another one gives the outer batch its state back, and no
-- failed batch leaves state behind for the next write to STG in the same
-- connection, whether its error was caught by a savepoint, by the ingest's
-- own retry, or ended the transaction.
\set ECHO none
\i test/regress_helpers.sql
\set ECHO all

CREATE FUNCTION t.msg(object_id bigint, user_id text, update_ts text, dish text)
RETURNS bytea
LANGUAGE sql AS $$
    SELECT convert_to(t.order_msg(object_id, user_id, 'CLOSED', update_ts, t.items(dish)), 'UTF8')
$$;

CREATE FUNCTION t.payload(object_id bigint, user_id text, update_ts text, dish text)
RETURNS jsonb
LANGUAGE sql AS $$
    SELECT t.order_msg(object_id, user_id, 'CLOSED', update_ts, t.items(dish))::jsonb->'payload'
$$;

-- What the order triggers are told: dwh.keys_claimed() at each statement
-- that writes stg.order_events, seen by a statement trigger that fires
-- before the extension's own (triggers fire in name order).
CREATE TABLE t.seen (n serial, statement text, keys_claimed boolean);
CREATE FUNCTION t.probe() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO t.seen (statement, keys_claimed)
    SELECT string_agg(c.object_id::text, ',' ORDER BY c.object_id), dwh.keys_claimed()
    FROM changed c;
    RETURN NULL;
END $$;
CREATE TRIGGER a_probe AFTER INSERT ON stg.order_events
    REFERENCING NEW TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION t.probe();

-- A batch run by a trigger of another batch: order 100 brings order 101
-- along, ingested in its own batch while the outer batch's upsert runs.
-- The outer statement's triggers still see the outer batch's keys claimed
-- (they used to see none once the inner batch was over), and both batches'
-- mart deltas land once.
CREATE FUNCTION t.bring_along() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.object_id = 100 THEN
        PERFORM dwh.ingest_orders(ARRAY[t.msg(101, 'u1', '2023-05-01 10:01:00', 'd2:Лагман')]);
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER bring_along AFTER INSERT ON stg.order_events
    FOR EACH ROW EXECUTE FUNCTION t.bring_along();
SELECT * FROM dwh.ingest_orders(ARRAY[t.msg(100, 'u1', '2023-05-01 10:00:00', 'd1:Плов'),
                                      t.msg(102, 'u2', '2023-05-01 10:02:00', 'd1:Плов')]);
SELECT statement, keys_claimed FROM t.seen ORDER BY n;
SELECT dwh.keys_claimed() AS keys_claimed_after;
SELECT * FROM t.products;
SELECT * FROM t.check();
DROP TRIGGER bring_along ON stg.order_events;

-- A batch that fails in the middle of its upsert, with an error that is not
-- about the data (raised to the caller), caught by a savepoint; then a
-- direct write in the same transaction.  The write applies its own mart
-- deltas and claims its own keys: none is left to a batch that is gone.
CREATE FUNCTION t.fail_666() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.object_id = 666 THEN
        RAISE EXCEPTION 'order 666 cannot be written now' USING ERRCODE = TG_ARGV[0];
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER fail_666 BEFORE INSERT ON stg.order_events
    FOR EACH ROW EXECUTE FUNCTION t.fail_666('lock_not_available');
TRUNCATE t.seen;
\set VERBOSITY terse
BEGIN;
SAVEPOINT before_batch;
SELECT * FROM dwh.ingest_orders(ARRAY[t.msg(200, 'u3', '2023-05-02 10:00:00', 'd3:Шурпа'),
                                      t.msg(666, 'u3', '2023-05-02 10:01:00', 'd3:Шурпа')]);
ROLLBACK TO SAVEPOINT before_batch;
SELECT dwh.keys_claimed() AS keys_claimed_after_rollback;
INSERT INTO stg.order_events (object_id, object_type, sent_dttm, payload)
VALUES (201, 'order', '2023-05-02 10:02:00', t.payload(201, 'u3', '2023-05-02 10:02:00', 'd3:Шурпа'));
SELECT statement, keys_claimed FROM t.seen ORDER BY n;
SELECT * FROM t.products WHERE user_id = 'u3';
SELECT * FROM t.check();
COMMIT;

-- The same error ending the transaction, then a direct write in the next.
TRUNCATE t.seen;
SELECT * FROM dwh.ingest_orders(ARRAY[t.msg(300, 'u4', '2023-05-03 10:00:00', 'd4:Чай'),
                                      t.msg(666, 'u4', '2023-05-03 10:01:00', 'd4:Чай')]);
\set VERBOSITY default
INSERT INTO stg.order_events (object_id, object_type, sent_dttm, payload)
VALUES (301, 'order', '2023-05-03 10:02:00', t.payload(301, 'u4', '2023-05-03 10:02:00', 'd4:Чай'));
SELECT statement, keys_claimed FROM t.seen ORDER BY n;
SELECT * FROM t.products WHERE user_id = 'u4';
SELECT * FROM t.check();

-- An error about the data: the batch finds its culprit message by message
-- (each trial in a subtransaction rolled back in the middle of its
-- session) and writes the others again; then a direct write in the same
-- transaction.
DROP TRIGGER fail_666 ON stg.order_events;
CREATE TRIGGER fail_666 BEFORE INSERT ON stg.order_events
    FOR EACH ROW EXECUTE FUNCTION t.fail_666('check_violation');
TRUNCATE t.seen;
BEGIN;
SELECT * FROM dwh.ingest_orders(ARRAY[t.msg(400, 'u5', '2023-05-04 10:00:00', 'd5:Долма'),
                                      t.msg(666, 'u5', '2023-05-04 10:01:00', 'd5:Долма'),
                                      t.msg(401, 'u5', '2023-05-04 10:02:00', 'd5:Долма')]);
SELECT sqlstate, reason FROM dwh.dead_letters;
INSERT INTO stg.order_events (object_id, object_type, sent_dttm, payload)
VALUES (402, 'order', '2023-05-04 10:03:00', t.payload(402, 'u5', '2023-05-04 10:03:00', 'd5:Долма'));
SELECT statement, keys_claimed FROM t.seen ORDER BY n;
SELECT * FROM t.products WHERE user_id = 'u5';
SELECT * FROM t.check();
COMMIT;
DROP TRIGGER fail_666 ON stg.order_events;
DROP TRIGGER a_probe ON stg.order_events;
