-- Kafka: the offsets applied, stored in the transaction of each batch, the
-- gaps (offsets the broker no longer held when they were due), and the
-- status of the workers.

CREATE TABLE dwh.kafka_offsets (
    topic           text NOT NULL,
    kafka_partition integer NOT NULL,
    next_offset     bigint,
    seek_requested  boolean NOT NULL DEFAULT false,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    last_sha256     bytea,
    last_offset     bigint,
    PRIMARY KEY (topic, kafka_partition)
);
COMMENT ON TABLE dwh.kafka_offsets IS 'How far each Kafka partition has been applied; written in the transaction of each batch, so the single truth a worker resumes from';
COMMENT ON COLUMN dwh.kafka_offsets.topic IS 'Kafka topic';
COMMENT ON COLUMN dwh.kafka_offsets.kafka_partition IS 'Partition number';
COMMENT ON COLUMN dwh.kafka_offsets.next_offset IS 'Offset of the first message not applied yet (NULL: none applied)';
COMMENT ON COLUMN dwh.kafka_offsets.seek_requested IS 'Set by dwh.kafka_seek(): the owning worker must move to next_offset';
COMMENT ON COLUMN dwh.kafka_offsets.updated_at IS 'When the row last changed';
COMMENT ON COLUMN dwh.kafka_offsets.last_sha256 IS 'SHA-256 of the value of the message at last_offset, the last applied: a worker that starts the partition again checks that the broker still holds it there, or the topic was recreated (NULL: not known, after dwh.kafka_seek() or a gap)';
COMMENT ON COLUMN dwh.kafka_offsets.last_offset IS 'Offset of the message last applied, whose SHA-256 is last_sha256: next_offset - 1, or earlier when the markers that end Kafka transactions follow it (NULL: not known)';

-- A gap is written in the transaction that moves the partition's stored
-- offset past it (dwh.kafka_on_gap = skip), or open, stopping the
-- partition, until dwh.kafka_seek() moves it (stop): never twice, never lost.
CREATE TABLE dwh.kafka_gaps (
    id               bigserial PRIMARY KEY,
    topic            text NOT NULL,
    kafka_partition  integer NOT NULL,
    next_offset      bigint NOT NULL,
    log_start_offset bigint NOT NULL,
    log_end_offset   bigint NOT NULL,
    action           text NOT NULL CHECK (action IN ('skipped', 'stopped')),
    detected_at      timestamptz NOT NULL DEFAULT now(),
    resumed_offset   bigint,
    resumed_at       timestamptz,
    CHECK ((resumed_offset IS NULL) = (resumed_at IS NULL))
);
-- At most one open gap per partition: it is what stops the partition.
CREATE UNIQUE INDEX kafka_gaps_open_idx ON dwh.kafka_gaps (topic, kafka_partition)
    WHERE resumed_at IS NULL;
CREATE INDEX kafka_gaps_partition_idx ON dwh.kafka_gaps (topic, kafka_partition, detected_at);
COMMENT ON TABLE dwh.kafka_gaps IS 'Kafka messages lost before they were applied: each time the broker no longer held a partition''s stored offset (retention, deleted records, a recreated topic)';
COMMENT ON COLUMN dwh.kafka_gaps.id IS 'Surrogate row number';
COMMENT ON COLUMN dwh.kafka_gaps.topic IS 'Kafka topic';
COMMENT ON COLUMN dwh.kafka_gaps.kafka_partition IS 'Partition number';
COMMENT ON COLUMN dwh.kafka_gaps.next_offset IS 'The stored offset of the first message not applied, which the broker no longer held: offsets next_offset to log_start_offset - 1 were never applied';
COMMENT ON COLUMN dwh.kafka_gaps.log_start_offset IS 'The first offset the broker held (its low watermark); below next_offset when the log ends before next_offset (topic recreated or truncated)';
COMMENT ON COLUMN dwh.kafka_gaps.log_end_offset IS 'The offset of the broker''s next message (its high watermark)';
COMMENT ON COLUMN dwh.kafka_gaps.action IS 'What the worker did (dwh.kafka_on_gap): skipped (went on from log_start_offset) or stopped (consumed nothing more from the partition until dwh.kafka_seek())';
COMMENT ON COLUMN dwh.kafka_gaps.detected_at IS 'When the worker found the gap';
COMMENT ON COLUMN dwh.kafka_gaps.resumed_offset IS 'Where consumption went on: log_start_offset when skipped, the offset given to dwh.kafka_seek() when stopped; NULL while the partition is stopped';
COMMENT ON COLUMN dwh.kafka_gaps.resumed_at IS 'When consumption went on; NULL while the partition is stopped';

CREATE FUNCTION dwh.kafka_seek(kafka_partition integer, next_offset bigint,
                               topic text DEFAULT NULL)
    RETURNS void
    AS 'MODULE_PATHNAME', 'dwh_kafka_seek'
    LANGUAGE C VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION dwh.kafka_seek(integer, bigint, text) IS
    'Rewind (replay) or skip a partition of the order topic (default dwh.kafka_topic): the next message applied from it is the one at next_offset; a partition stopped at a gap goes on from there';

CREATE FUNCTION dwh.worker_status(
        OUT worker text, OUT pid integer, OUT started_at timestamptz,
        OUT state text, OUT state_since timestamptz, OUT partitions integer[],
        OUT messages bigint, OUT batches bigint, OUT dead_letters bigint,
        OUT last_batch_at timestamptz,
        OUT keys_mirrored bigint, OUT keys_missing bigint,
        OUT refreshes bigint, OUT changes_found bigint,
        OUT last_error text, OUT last_error_at timestamptz,
        OUT worker_number integer,
        OUT expiry_passes bigint, OUT last_expiry_at timestamptz,
        OUT last_expiry_rules_moved integer, OUT last_expiry_events integer,
        OUT events_produced bigint, OUT events_pending bigint,
        OUT last_produced_at timestamptz, OUT apply_time double precision,
        OUT database text)
    RETURNS SETOF record
    AS 'MODULE_PATHNAME', 'dwh_worker_status'
    LANGUAGE C VOLATILE;
COMMENT ON FUNCTION dwh.worker_status() IS
    'State of each background worker since the server started (behind dwh.status)';

CREATE FUNCTION dwh.kafka_watermarks(
        OUT topic text, OUT kafka_partition integer,
        OUT low_watermark bigint, OUT high_watermark bigint,
        OUT observed_at timestamptz, OUT worker_number integer)
    RETURNS SETOF record
    AS 'MODULE_PATHNAME', 'dwh_kafka_watermarks'
    LANGUAGE C VOLATILE;
COMMENT ON FUNCTION dwh.kafka_watermarks() IS
    'The broker''s watermarks of each partition as the workers last saw them (behind dwh.kafka_partitions)';

-- The stored offsets and the gaps, for the views below, which must answer
-- at once whatever happens: a DBA's LOCK TABLE, VACUUM FULL or ALTER TABLE
-- on these tables would make a plain SELECT wait.  Then these return no
-- rows, and the views show the partitions without what is stored.
CREATE FUNCTION dwh.stored_offsets(OUT topic text, OUT kafka_partition integer,
                                   OUT next_offset bigint, OUT updated_at timestamptz)
    RETURNS SETOF record
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    LOCK TABLE dwh.kafka_offsets IN ACCESS SHARE MODE NOWAIT;
    RETURN QUERY SELECT o.topic, o.kafka_partition, o.next_offset, o.updated_at
                 FROM dwh.kafka_offsets o;
EXCEPTION WHEN lock_not_available THEN
    -- One row of NULLs (no stored row has a NULL topic): not known now.
    RETURN QUERY SELECT NULL::text, NULL::integer, NULL::bigint, NULL::timestamptz;
END
$fn$;
COMMENT ON FUNCTION dwh.stored_offsets() IS
    'Internal (dwh.kafka_partitions): dwh.kafka_offsets, or at once one row of NULLs while the table is locked';

CREATE FUNCTION dwh.stored_gaps(OUT topic text, OUT kafka_partition integer,
                                OUT gaps bigint, OUT last_gap_at timestamptz,
                                OUT stopped boolean)
    RETURNS SETOF record
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    LOCK TABLE dwh.kafka_gaps IN ACCESS SHARE MODE NOWAIT;
    RETURN QUERY SELECT g.topic, g.kafka_partition, count(*), max(g.detected_at),
                        bool_or(g.resumed_at IS NULL)
                 FROM dwh.kafka_gaps g
                 GROUP BY g.topic, g.kafka_partition;
EXCEPTION WHEN lock_not_available THEN
    RETURN QUERY SELECT NULL::text, NULL::integer, NULL::bigint, NULL::timestamptz,
                        NULL::boolean;
END
$fn$;
COMMENT ON FUNCTION dwh.stored_gaps() IS
    'Internal (dwh.kafka_partitions): gaps per partition of dwh.kafka_gaps, or at once one row of NULLs while the table is locked';

CREATE VIEW dwh.kafka_partitions AS
-- While a table is locked its function returns one row of NULLs: the lag
-- (or the gaps) are then unknown (NULL), not computed from nothing.
WITH offsets AS MATERIALIZED (SELECT * FROM dwh.stored_offsets()),
     gaps AS MATERIALIZED (SELECT * FROM dwh.stored_gaps())
SELECT coalesce(o.topic, w.topic) AS topic,
       coalesce(o.kafka_partition, w.kafka_partition) AS kafka_partition,
       owner.worker,
       o.next_offset AS stored_offset,
       w.high_watermark,
       -- Unknown (NULL) until a worker has seen the partition's watermark.
       CASE WHEN w.high_watermark IS NOT NULL AND NOT locked.offsets
            THEN greatest(w.high_watermark - coalesce(o.next_offset, w.low_watermark), 0)
       END AS lag,
       o.updated_at AS stored_at,
       w.observed_at AS watermark_at,
       w.low_watermark,
       CASE WHEN NOT locked.gaps THEN coalesce(g.stopped, false) END AS stopped,
       CASE WHEN NOT locked.gaps THEN coalesce(g.gaps, 0) END AS gaps,
       g.last_gap_at
FROM (SELECT * FROM offsets WHERE topic IS NOT NULL) o
FULL JOIN dwh.kafka_watermarks() w
       ON w.topic = o.topic AND w.kafka_partition = o.kafka_partition
-- Owned by a worker of this database: one serving another owns its
-- partitions there.
LEFT JOIN (SELECT s.worker, p.p
           FROM dwh.worker_status() s, unnest(s.partitions) AS p(p)
           WHERE s.pid IS NOT NULL AND s.database = current_database()) owner
       ON owner.p = coalesce(o.kafka_partition, w.kafka_partition)
      AND coalesce(o.topic, w.topic) = current_setting('dwh.kafka_topic')
LEFT JOIN gaps g
       ON g.topic = coalesce(o.topic, w.topic)
      AND g.kafka_partition = coalesce(o.kafka_partition, w.kafka_partition)
CROSS JOIN (SELECT EXISTS (SELECT FROM offsets WHERE topic IS NULL) AS offsets,
                   EXISTS (SELECT FROM gaps WHERE topic IS NULL) AS gaps) locked;
COMMENT ON VIEW dwh.kafka_partitions IS
    'Per Kafka partition: the worker owning it, the offset stored in the database, the broker''s watermarks and the lag, whether it is stopped at a gap, and its gaps (dwh.kafka_gaps)';

CREATE VIEW dwh.status AS
SELECT s.worker, s.pid, s.state, s.state_since,
       s.partitions,
       s.messages, s.batches, s.dead_letters, s.last_batch_at,
       p.lag,
       p.partition_offsets,
       s.keys_mirrored, s.keys_missing, s.refreshes, s.changes_found,
       s.last_error, s.last_error_at, s.started_at,
       p.gaps, p.stopped_partitions,
       s.expiry_passes, s.last_expiry_at, s.last_expiry_rules_moved, s.last_expiry_events,
       s.events_produced, s.events_pending, s.last_produced_at,
       s.apply_time,
       b.blocked_by, b.blocked_since,
       s.database
FROM dwh.worker_status() s
LEFT JOIN LATERAL (
    SELECT sum(k.lag)::bigint AS lag,
           jsonb_agg(jsonb_build_object('partition', k.kafka_partition,
                                        'stored_offset', k.stored_offset,
                                        'high_watermark', k.high_watermark,
                                        'lag', k.lag,
                                        'stopped', k.stopped,
                                        'gaps', k.gaps)
                     ORDER BY k.kafka_partition) AS partition_offsets,
           sum(k.gaps)::bigint AS gaps,
           array_agg(k.kafka_partition ORDER BY k.kafka_partition)
               FILTER (WHERE k.stopped) AS stopped_partitions
    FROM dwh.kafka_partitions k
    WHERE k.topic = current_setting('dwh.kafka_topic')
      AND k.kafka_partition = ANY (s.partitions)
      -- The offsets of this database: a worker serving another applies
      -- none of them.
      AND s.database = current_database()
) p ON true
-- Whoever keeps the worker waiting: any session whose transaction holds a
-- lock the worker needs (a loader's or tagger's left open, a LOCK TABLE)
-- stalls it for as long as it lasts, and the worker, asleep in the lock
-- wait, cannot say so itself.  The wait is followed to the sessions that
-- wait for nothing: a worker queued behind another waiter (a batch behind
-- the tags worker's expiry, which waits for a loader) names the loader,
-- the one to end.  Within a cycle no one is such: its members are named.
LEFT JOIN LATERAL (
    WITH RECURSIVE waits(pid) AS (
        SELECT p FROM pg_catalog.unnest(pg_catalog.pg_blocking_pids(s.pid)) p
        UNION
        SELECT p FROM waits w, pg_catalog.unnest(pg_catalog.pg_blocking_pids(w.pid)) p
    )
    SELECT coalesce(pg_catalog.array_agg(w.pid ORDER BY w.pid)
                        FILTER (WHERE pg_catalog.cardinality(pg_catalog.pg_blocking_pids(w.pid)) = 0),
                    pg_catalog.array_agg(w.pid ORDER BY w.pid)) AS blocked_by,
           (SELECT pg_catalog.min(l.waitstart) FROM pg_catalog.pg_locks l
            WHERE l.pid = s.pid AND NOT l.granted) AS blocked_since
    FROM waits w
    HAVING pg_catalog.count(*) > 0
) b ON s.pid IS NOT NULL
ORDER BY s.worker_number IS NULL, s.worker;
COMMENT ON VIEW dwh.status IS
    'One row per background worker: its state, partitions, throughput counters, lag, last error, gaps recorded on its partitions and those stopped at one; for the tags worker its expiry passes and the tag events it produced to Kafka; for a Kafka worker the time it spent applying batches; the sessions keeping it waiting for a lock, and since when; the database it serves (read in another, its lag and partitions'' offsets are not shown)';
