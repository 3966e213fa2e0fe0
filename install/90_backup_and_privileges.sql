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

-- PUBLIC gets nothing: functions are executable by PUBLIC by default.
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA dwh FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA dwh FROM PUBLIC;
-- But the view cdm.user_tags calls these two, and a view's functions run
-- with its reader's rights: pure functions of their arguments.
GRANT EXECUTE ON FUNCTION dwh.hash_key(text), dwh.all_orders_key() TO PUBLIC;
