-- Backups: tables created by an extension are left out of pg_dump unless
-- registered here.  Every table of what was received (STG with its
-- history) and of operations is, with its sequence (one statement each:
-- every call rewrites the extension's catalog row).  DDS and the marts are
-- a function of STG: pg_restore rebuilds them through the STG triggers, the
-- same way they were built, whatever the order and parallelism of the
-- restore (docs/data-rule.md).
SELECT pg_catalog.pg_extension_config_dump('stg.order_events', '');
SELECT pg_catalog.pg_extension_config_dump('stg.order_events_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('stg.other_events', '');
SELECT pg_catalog.pg_extension_config_dump('stg.other_events_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('stg.users', '');
SELECT pg_catalog.pg_extension_config_dump('stg.users_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('stg.restaurants', '');
SELECT pg_catalog.pg_extension_config_dump('stg.restaurants_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('stg.order_event_history', '');
SELECT pg_catalog.pg_extension_config_dump('stg.user_history', '');
SELECT pg_catalog.pg_extension_config_dump('stg.restaurant_history', '');
SELECT pg_catalog.pg_extension_config_dump('dwh.dead_letters', '');
SELECT pg_catalog.pg_extension_config_dump('dwh.dead_letters_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('dwh.kafka_offsets', '');
SELECT pg_catalog.pg_extension_config_dump('dwh.kafka_gaps', '');
SELECT pg_catalog.pg_extension_config_dump('dwh.kafka_gaps_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('dwh.redis_keys', '');
SELECT pg_catalog.pg_extension_config_dump('dwh.redis_wanted', '');
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

-- PUBLIC gets nothing: functions are executable by PUBLIC by default.
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA dwh FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA dwh FROM PUBLIC;
-- But the view cdm.user_tags calls these two, and a view's functions run
-- with its reader's rights: pure functions of their arguments.
GRANT EXECUTE ON FUNCTION dwh.hash_key(text), dwh.all_orders_key() TO PUBLIC;
