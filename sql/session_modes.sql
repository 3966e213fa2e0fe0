-- What kind of session writes the warehouse (src/dwh_session_mode.c).
--
-- Only READ COMMITTED: a batch that waited for the dictionary lock must see
-- what committed meanwhile; under an older snapshot it counted a moved
-- dish in its old category, and dwh.verify() disagreed for good.  Refused
-- whole, before anything is written or dead-lettered.
--
-- A restore (check_function_bodies off) brings the tags back rather than
-- maintaining them, and what the dumped server accepted back under its own
-- dwh.max_order_items; but any role can set check_function_bodies, so only
-- a role that could restore the tags restores: a loader with the README's
-- grants that turns it off still has its orders tagged.
\set ECHO none
\i test/regress_helpers.sql
\set ECHO all

CREATE VIEW t.tags AS
SELECT u.user_id, g.tag, g.order_cnt
FROM cdm.user_tags g JOIN dds.h_user u ON u.h_user_pk = g.user_id
ORDER BY 1, 2;

SELECT t.set_menu('rest-1', '2023-04-01 09:00:00', 'd1:Плов:Main', 'd2:Суп:Soups');
INSERT INTO dwh.tag_rules (tag, kind, threshold) VALUES ('customer', 'all_orders', 1);

-- REPEATABLE READ and SERIALIZABLE are refused, for the ingest functions
-- and for direct writes of every STG table of versions.
\set VERBOSITY sqlstate
BEGIN ISOLATION LEVEL REPEATABLE READ;
SELECT t.load(1, 'u1', 'CLOSED', '2023-04-01 10:00:00', 'd1:Плов');
ROLLBACK;
BEGIN ISOLATION LEVEL SERIALIZABLE;
SELECT * FROM dwh.ingest_orders(ARRAY[convert_to(t.order_msg(1, 'u1', 'CLOSED', '2023-04-01 10:00:00',
                                                         t.items('d1:Плов')), 'UTF8')]);
ROLLBACK;
SET default_transaction_isolation = 'repeatable read';
SELECT t.set_menu('rest-1', '2023-04-01 09:30:00', 'd1:Плов:Soups');
SELECT t.set_user('u1', 'Анна', 'anna', '2023-04-01 09:00:00');
INSERT INTO stg.order_events (object_id, object_type, sent_dttm, payload)
SELECT 1, 'order', '2023-04-01 10:00:00',
       t.order_msg(1, 'u1', 'CLOSED', '2023-04-01 10:00:00', t.items('d1:Плов'))::jsonb->'payload';
RESET default_transaction_isolation;
-- dwh.rebuild() too, also in a restore, where it leaves the tags alone.
BEGIN ISOLATION LEVEL REPEATABLE READ;
SET LOCAL check_function_bodies = off;
SELECT * FROM dwh.rebuild();
ROLLBACK;
-- A restore refused so (a database whose default_transaction_isolation
-- is SERIALIZABLE) is told how to restore.
\set VERBOSITY default
BEGIN ISOLATION LEVEL SERIALIZABLE;
SET LOCAL check_function_bodies = off;
INSERT INTO stg.users (object_id, payload)
VALUES ('u9', '{"_id": "u9", "name": "Ира", "login": "ira", "update_ts_utc": "2023-04-01 10:00:00"}');
ROLLBACK;
\set VERBOSITY sqlstate
-- The tags' recount and expiry pass, and direct writes of the histories.
BEGIN ISOLATION LEVEL REPEATABLE READ;
SELECT dwh.rebuild_tags();
ROLLBACK;
BEGIN ISOLATION LEVEL SERIALIZABLE;
SELECT * FROM dwh.expire_tags();
ROLLBACK;
SET default_transaction_isolation = 'repeatable read';
INSERT INTO stg.order_event_history (object_id, update_ts, payload, sent_dttm)
SELECT 1, '2023-04-01 10:00:00', t.order_msg(1, 'u1', 'CLOSED', '2023-04-01 10:00:00',
                                             t.items('d1:Плов'))::jsonb->'payload',
       '2023-04-01 10:00:00';
INSERT INTO stg.user_history (object_id, payload)
VALUES ('u1', '{"_id": "u1", "name": "Анна", "login": "anna", "update_ts_utc": "2023-04-01 09:00:00"}');
INSERT INTO stg.restaurant_history (object_id, payload)
VALUES ('rest-1', '{"_id": "rest-1", "name": "R", "menu": [], "update_ts_utc": "2023-04-01 09:30:00"}');
-- A DBA's COPY and upsert, into a current table and a history.
COPY stg.users (object_id, payload) FROM STDIN;
u1	{"_id": "u1", "name": "Анна", "login": "anna", "update_ts_utc": "2023-04-01 09:00:00"}
\.
COPY stg.user_history (object_id, payload) FROM STDIN;
u1	{"_id": "u1", "name": "Анна", "login": "anna", "update_ts_utc": "2023-04-01 09:00:00"}
\.
INSERT INTO stg.users (object_id, payload)
VALUES ('u1', '{"_id": "u1", "name": "Анна", "login": "anna", "update_ts_utc": "2023-04-01 09:00:00"}')
ON CONFLICT (object_id) DO UPDATE SET payload = EXCLUDED.payload;
INSERT INTO stg.order_events (object_id, object_type, sent_dttm, payload)
SELECT 1, 'order', '2023-04-01 10:00:00',
       t.order_msg(1, 'u1', 'CLOSED', '2023-04-01 10:00:00', t.items('d1:Плов'))::jsonb->'payload'
ON CONFLICT (object_id) DO NOTHING;
RESET default_transaction_isolation;
\set VERBOSITY default
BEGIN ISOLATION LEVEL REPEATABLE READ;
SELECT t.load(1, 'u1', 'CLOSED', '2023-04-01 10:00:00', 'd1:Плов');
ROLLBACK;
-- Nor with session_replication_role replica (a superuser's setting, which
-- the workers pin to origin): STG's triggers would not fire, and every
-- order would be a dead letter (its update_ts unset).
SET session_replication_role = replica;
SELECT t.load(1, 'u1', 'CLOSED', '2023-04-01 10:00:00', 'd1:Плов');
SELECT * FROM dwh.ingest_orders(ARRAY[convert_to(t.order_msg(1, 'u1', 'CLOSED', '2023-04-01 10:00:00',
                                                         t.items('d1:Плов')), 'UTF8')]);
RESET session_replication_role;
-- Nothing written, nothing dead-lettered; READ COMMITTED goes through.
SELECT (SELECT count(*) FROM stg.order_events) AS orders,
       (SELECT count(*) FROM stg.users) AS users,
       (SELECT count(*) FROM dwh.dead_letters) AS dead_letters;
SELECT t.load(1, 'u1', 'CLOSED', '2023-04-01 10:00:00', 'd1:Плов');

-- check_function_bodies off: a restore for a superuser, not for a loader.
CREATE ROLE regress_dwh_mode_loader;
GRANT USAGE ON SCHEMA dwh TO regress_dwh_mode_loader;
GRANT EXECUTE ON FUNCTION dwh.ingest_orders(bytea[], text, integer[], bigint[])
    TO regress_dwh_mode_loader;
SELECT convert_to(t.order_msg(2, 'u2', 'CLOSED', '2023-04-01 11:00:00', t.items('d2:Суп')),
                  'UTF8') AS message \gset
SET check_function_bodies = off;
SELECT dwh.tags_restoring() AS superuser_restores;
SET ROLE regress_dwh_mode_loader;
SELECT received, applied FROM dwh.ingest_orders(ARRAY[:'message'::bytea]);
RESET ROLE;
-- Nor for a tagger (the README's grants): a rule it adds with
-- check_function_bodies off grants its tags at once.
CREATE ROLE regress_dwh_mode_tagger;
GRANT USAGE ON SCHEMA dwh, cdm TO regress_dwh_mode_tagger;
GRANT SELECT, DELETE ON dwh.tag_rules TO regress_dwh_mode_tagger;
GRANT INSERT (tag, kind, category_name, product_id, threshold, window_days),
      UPDATE (tag, kind, category_name, product_id, threshold, window_days)
    ON dwh.tag_rules TO regress_dwh_mode_tagger;
SET ROLE regress_dwh_mode_tagger;
INSERT INTO dwh.tag_rules (tag, kind, threshold) VALUES ('buyer', 'all_orders', 1);
RESET ROLE;
-- What counts is the role outside any SECURITY DEFINER function: a
-- superuser's definer function called by the loader is no restore.
CREATE FUNCTION public.regress_restoring() RETURNS boolean
    LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog
    AS 'SELECT dwh.tags_restoring()';
GRANT EXECUTE ON FUNCTION public.regress_restoring() TO regress_dwh_mode_loader;
SET ROLE regress_dwh_mode_loader;
SELECT public.regress_restoring() AS loader_through_definer_restores;
RESET ROLE;
SELECT public.regress_restoring() AS superuser_through_definer_restores;
DROP FUNCTION public.regress_restoring();
RESET check_function_bodies;
SELECT * FROM t.tags;
SELECT count(*) FROM dwh.verify();

-- dwh.max_order_items: applied to what arrives, not to what a restore
-- brings back.
SET dwh.max_order_items = 1;
\set VERBOSITY sqlstate
INSERT INTO stg.order_events (object_id, object_type, sent_dttm, payload)
SELECT 3, 'order', '2023-04-01 12:00:00',
       t.order_msg(3, 'u1', 'CLOSED', '2023-04-01 12:00:00', t.items('d1:Плов', 'd2:Суп'))::jsonb->'payload';
\set VERBOSITY default
SET check_function_bodies = off;
INSERT INTO stg.order_events (object_id, object_type, sent_dttm, payload)
SELECT 3, 'order', '2023-04-01 12:00:00',
       t.order_msg(3, 'u1', 'CLOSED', '2023-04-01 12:00:00', t.items('d1:Плов', 'd2:Суп'))::jsonb->'payload';
RESET check_function_bodies;
RESET dwh.max_order_items;
SELECT object_id, jsonb_array_length(payload->'order_items') AS items FROM stg.order_events ORDER BY 1;
-- The restore's tags come with the dump: this session, which restored
-- without them, recomputes them as a restore's last step would.
SELECT dwh.rebuild_tags();
SELECT * FROM t.tags;
SELECT count(*) FROM dwh.verify();

-- A session that restricts non-system views (restrict_nonsystem_relation_kind,
-- which a database's owner can set for every session of it): the oracle
-- reads dwh's own all the same (before: "access to non-system view ... is
-- restricted").  The writers read none.
SET restrict_nonsystem_relation_kind = 'view';
SELECT count(*) FROM dwh.verify();
SELECT count(*) FROM dwh.verify(3);
SELECT count(*) FROM dwh.verify_vault();
SELECT mart, rows_changed FROM dwh.rebuild();
SELECT count(*) FROM dwh.rebuild(vault => true);
INSERT INTO stg.order_events (object_id, object_type, sent_dttm, payload)
SELECT 4, 'order', '2023-04-01 12:00:00',
       t.order_msg(4, 'u1', 'CLOSED', '2023-04-01 12:00:00', t.items('d1:Плов'))::jsonb->'payload';
SELECT object_id FROM stg.order_events ORDER BY 1;
RESET restrict_nonsystem_relation_kind;
SELECT * FROM t.tags;
SELECT count(*) FROM dwh.verify();

DROP OWNED BY regress_dwh_mode_loader, regress_dwh_mode_tagger;
DROP ROLE regress_dwh_mode_loader, regress_dwh_mode_tagger;
