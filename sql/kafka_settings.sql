-- Kafka settings, their validation, the status views and dwh.kafka_seek().
-- (The workers against a real broker are tested in test/t/.)
\set ECHO none
\i test/regress_helpers.sql
\set ECHO all

-- Defaults.
SHOW dwh.kafka_brokers;
SHOW dwh.kafka_topic;
SHOW dwh.kafka_group_id;
SHOW dwh.kafka_consumers;
SHOW dwh.kafka_batch_size;
SHOW dwh.kafka_batch_wait;
SHOW dwh.kafka_prefetch_memory;
SHOW dwh.kafka_start_offset;
SHOW dwh.kafka_on_gap;

-- The workers' database: a name, not truncated.
ALTER SYSTEM SET dwh.database = '';
ALTER SYSTEM SET dwh.database = 'a_name_of_sixty_four_bytes_is_one_more_than_postgresql_keeps_xyz';

-- Options: librdkafka checks each property; dwh's own are refused with a hint.
ALTER SYSTEM SET dwh.kafka_options = 'bootstrap.servers=localhost:9092';
ALTER SYSTEM SET dwh.kafka_options = 'enable.auto.commit=true';
ALTER SYSTEM SET dwh.kafka_options = 'auto.offset.reset=earliest';
-- A topic property under its "topic." name is the same property.
ALTER SYSTEM SET dwh.kafka_options = 'topic.auto.offset.reset=earliest';
ALTER SYSTEM SET dwh.kafka_options = 'topic.auto.commit.enable=true';
-- librdkafka 2.0.2's unsecured JWT builder crashes on a malformed config,
-- and quotes the config, a secret, in its error.
ALTER SYSTEM SET dwh.kafka_options = 'security.protocol=SASL_PLAINTEXT sasl.mechanisms=OAUTHBEARER enable.sasl.oauthbearer.unsecure.jwt=true sasl.oauthbearer.config=''principal=admin secret=x''';
ALTER SYSTEM SET dwh.kafka_options = 'no.such.property=1';
ALTER SYSTEM SET dwh.kafka_options = 'session.timeout.ms=soon';
ALTER SYSTEM SET dwh.kafka_options = 'sasl.password';
ALTER SYSTEM SET dwh.kafka_options = 'sasl.password=''unterminated';
ALTER SYSTEM SET dwh.kafka_options = 'security.protocol=SASL_SSL sasl.mechanisms=SCRAM-SHA-512 sasl.username=dwh sasl.password=''it\''s secret'' ssl.ca.location=/nonexistent/ca.pem';
-- Every other property dwh manages is refused too.
ALTER SYSTEM SET dwh.kafka_options = 'metadata.broker.list=localhost:9092';
ALTER SYSTEM SET dwh.kafka_options = 'group.id=other';
ALTER SYSTEM SET dwh.kafka_options = 'queued.max.messages.kbytes=1024';
ALTER SYSTEM SET dwh.kafka_options = 'enable.auto.offset.store=true';
ALTER SYSTEM SET dwh.kafka_options = 'offset.store.method=broker';
ALTER SYSTEM SET dwh.kafka_options = 'enable.partition.eof=true';
ALTER SYSTEM SET dwh.kafka_options = 'isolation.level=read_uncommitted';
ALTER SYSTEM SET dwh.kafka_options = 'log.queue=true';
ALTER SYSTEM RESET dwh.kafka_options;
-- The documented ranges, and no setting of another name under dwh.
ALTER SYSTEM SET dwh.kafka_consumers = 17;
ALTER SYSTEM SET dwh.kafka_consumers = -1;
SET dwh.max_order_items = 0;
SET dwh.max_order_items = 100001;
-- A name under dwh. that no setting has may be a secret one misspelt: the
-- error names it, its detail is hidden as for a secret setting.
SET dwh.no_such_setting = 1;
ALTER SYSTEM SET dwh.kafka_topic = 'bad topic';
ALTER SYSTEM SET dwh.kafka_group_id = '';
SET dwh.kafka_consumers = 2;

-- The worker idles, and says why, while no broker is configured.
DO $$
BEGIN
    FOR i IN 1..100 LOOP
        EXIT WHEN EXISTS (SELECT FROM dwh.status WHERE state LIKE 'idle%');
        PERFORM pg_sleep(0.1);
    END LOOP;
END
$$;
SELECT worker, pid IS NOT NULL AS running, state, partitions, messages, lag
FROM dwh.status;

-- Rewind a partition: stored for whichever worker will own it.  No worker
-- has seen the partition's watermark: its lag is unknown (NULL), not 0.
SELECT dwh.kafka_seek(3, 42);
SELECT dwh.kafka_seek(3, 40);
SELECT topic, kafka_partition, next_offset, seek_requested FROM dwh.kafka_offsets;
SELECT topic, kafka_partition, worker, stored_offset, high_watermark, lag
FROM dwh.kafka_partitions;
SELECT dwh.kafka_seek(-1, 0);
SELECT dwh.kafka_seek(0, -5);
ALTER SYSTEM SET dwh.kafka_on_gap = 'pause';

-- A gap recorded open (dwh.kafka_on_gap = stop, as a worker writes it)
-- stops its partition, at most one per partition, until dwh.kafka_seek()
-- moves the partition: that closes the gap.  (The workers against a real
-- broker: test/t/017_kafka_gaps.pl.)
INSERT INTO dwh.kafka_gaps (topic, kafka_partition, next_offset, log_start_offset,
                            log_end_offset, action)
VALUES ('order-service_orders', 3, 40, 100, 150, 'stopped');
INSERT INTO dwh.kafka_gaps (topic, kafka_partition, next_offset, log_start_offset,
                            log_end_offset, action)
VALUES ('order-service_orders', 3, 40, 120, 150, 'stopped');
SELECT kafka_partition, stored_offset, stopped, gaps, last_gap_at IS NOT NULL AS has_gap
FROM dwh.kafka_partitions;
SELECT dwh.kafka_seek(3, 100);
SELECT kafka_partition, next_offset, log_start_offset, log_end_offset, action,
       resumed_offset, resumed_at IS NOT NULL AS resumed
FROM dwh.kafka_gaps;
SELECT kafka_partition, stored_offset, stopped, gaps FROM dwh.kafka_partitions;
SELECT topic, kafka_partition, next_offset, seek_requested FROM dwh.kafka_offsets;
-- A seek of a partition that is not stopped leaves its closed gaps alone.
SELECT dwh.kafka_seek(3, 120);
SELECT kafka_partition, resumed_offset FROM dwh.kafka_gaps;

-- Options are for superusers only; the views and the seek need a grant.
CREATE ROLE regress_dwh_monitor;
SET ROLE regress_dwh_monitor;
SHOW dwh.kafka_options;
SELECT count(*) FROM dwh.status;
SELECT dwh.kafka_seek(0, 0);
RESET ROLE;
GRANT USAGE ON SCHEMA dwh TO regress_dwh_monitor;
GRANT SELECT ON dwh.status, dwh.kafka_partitions, dwh.kafka_offsets TO regress_dwh_monitor;
GRANT EXECUTE ON FUNCTION dwh.worker_status(), dwh.kafka_watermarks() TO regress_dwh_monitor;
SET ROLE regress_dwh_monitor;
SELECT worker, state FROM dwh.status;
RESET ROLE;
DROP OWNED BY regress_dwh_monitor;
DROP ROLE regress_dwh_monitor;
