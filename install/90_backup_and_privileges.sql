-- Backups: tables created by an extension are left out of pg_dump unless
-- registered here.  Every data table and its sequence is (one statement
-- each: every call rewrites the extension's catalog row).
SELECT pg_catalog.pg_extension_config_dump('stg.order_events', '');
SELECT pg_catalog.pg_extension_config_dump('stg.order_events_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('stg.other_events', '');
SELECT pg_catalog.pg_extension_config_dump('stg.other_events_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('stg.users', '');
SELECT pg_catalog.pg_extension_config_dump('stg.users_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('stg.restaurants', '');
SELECT pg_catalog.pg_extension_config_dump('stg.restaurants_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('dds.h_user', '');
SELECT pg_catalog.pg_extension_config_dump('dds.h_product', '');
SELECT pg_catalog.pg_extension_config_dump('dds.h_category', '');
SELECT pg_catalog.pg_extension_config_dump('dds.h_restaurant', '');
SELECT pg_catalog.pg_extension_config_dump('dds.h_order', '');
SELECT pg_catalog.pg_extension_config_dump('dds.l_order_user', '');
SELECT pg_catalog.pg_extension_config_dump('dds.l_order_product', '');
SELECT pg_catalog.pg_extension_config_dump('dds.l_product_restaurant', '');
SELECT pg_catalog.pg_extension_config_dump('dds.l_product_category', '');
SELECT pg_catalog.pg_extension_config_dump('dds.s_user_names', '');
SELECT pg_catalog.pg_extension_config_dump('dds.s_product_names', '');
SELECT pg_catalog.pg_extension_config_dump('dds.s_restaurant_names', '');
SELECT pg_catalog.pg_extension_config_dump('dds.s_order_cost', '');
SELECT pg_catalog.pg_extension_config_dump('dds.s_order_status', '');
SELECT pg_catalog.pg_extension_config_dump('cdm.user_product_counters', '');
SELECT pg_catalog.pg_extension_config_dump('cdm.user_product_counters_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('cdm.user_category_counters', '');
SELECT pg_catalog.pg_extension_config_dump('cdm.user_category_counters_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('dwh.dead_letters', '');
SELECT pg_catalog.pg_extension_config_dump('dwh.dead_letters_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('dwh.kafka_offsets', '');
SELECT pg_catalog.pg_extension_config_dump('dwh.redis_keys', '');
SELECT pg_catalog.pg_extension_config_dump('dwh.redis_wanted', '');

-- PUBLIC gets nothing: functions are executable by PUBLIC by default.
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA dwh FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA dwh FROM PUBLIC;
