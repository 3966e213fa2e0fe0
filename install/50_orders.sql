-- Orders: every statement that writes stg.order_events carries its rows on
-- to DDS and the marts, in the lock order of dwh.claim_order_keys().  The
-- mart delta of a batch is (what its orders count now) minus (what they
-- counted before), both computed set-based from the batch and from DDS
-- before it changes; no user is ever recounted whole.  Each step below is
-- a function over the batch's arrays (object_ids, versions = update_ts,
-- payloads); the triggers at the end call them in order.  They are
-- PL/pgSQL, whose plans last the session: an SQL function is planned again
-- at every call, which costs a small batch more than running it.

-- Orders new to DDS (the usual case): nothing counted before.  No other
-- transaction can write their hub, links or satellites meanwhile: an ingest
-- or an upsert would first conflict on stg.order_events.object_id, and a
-- direct write of history (a restore, say) holds the dictionary lock
-- exclusively (dwh.stg_statement_lock()).  So all are plain INSERTs: no
-- arbiter probes, no speculative insertions.  Rows go in hub key order:
-- the random UUID keys then fill index pages one after the other, and so
-- do the foreign-key checks.
CREATE FUNCTION dwh.load_new_orders(object_ids bigint[], versions timestamp[],
                                    payloads jsonb[],
                                    OUT product_users uuid[], OUT products uuid[],
                                    OUT product_deltas integer[],
                                    OUT category_users uuid[], OUT categories uuid[],
                                    OUT category_deltas integer[])
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    WITH batch AS MATERIALIZED (
        SELECT c.object_id,
               dwh.hash_key(c.object_id::text) AS h_order_pk,
               c.update_ts,
               (c.payload->>'date')::timestamp AS order_dt,
               c.payload->>'final_status' AS status,
               (c.payload->>'cost')::numeric(19, 5) AS cost,
               (c.payload->>'payment')::numeric(19, 5) AS payment,
               dwh.hash_key(c.payload->'user'->>'id') AS h_user_pk,
               c.payload->'order_items' AS items
        FROM unnest(object_ids, versions, payloads) AS c(object_id, update_ts, payload)
        ORDER BY h_order_pk
    ),
    item AS MATERIALIZED (
        SELECT DISTINCT b.h_order_pk, b.h_product_pk, b.h_user_pk, b.status
        FROM (SELECT b.*, dwh.hash_key(e->>'id') AS h_product_pk
              FROM batch b, jsonb_array_elements(b.items) e) b
        ORDER BY b.h_order_pk, b.h_product_pk
    ),
    category AS MATERIALIZED (
        SELECT l.h_product_pk, l.h_category_pk
        FROM dds.l_product_category l
        WHERE l.h_product_pk IN (SELECT h_product_pk FROM item)
    ),
    order_hub AS (
        INSERT INTO dds.h_order (h_order_pk, order_id, order_dt, load_dt, load_src)
        SELECT h_order_pk, object_id, order_dt, now() AT TIME ZONE 'UTC', 'stg.order_events'
        FROM batch
    ),
    order_user_link AS (
        INSERT INTO dds.l_order_user (hk_order_user_pk, h_order_pk, h_user_pk, load_dt, load_src)
        SELECT dwh.hash_key(h_order_pk, h_user_pk), h_order_pk, h_user_pk, now() AT TIME ZONE 'UTC', 'stg.order_events'
        FROM batch
    ),
    order_product_link AS (
        INSERT INTO dds.l_order_product (hk_order_product_pk, h_order_pk, h_product_pk, load_dt, load_src)
        SELECT dwh.hash_key(h_order_pk, h_product_pk), h_order_pk, h_product_pk, now() AT TIME ZONE 'UTC', 'stg.order_events'
        FROM item
    ),
    status_satellite AS (
        INSERT INTO dds.s_order_status
               (h_order_pk, status, hk_order_status_hashdiff, load_dt, load_src)
        SELECT h_order_pk, status, dwh.hash_key(h_order_pk::text || status),
               update_ts, 'stg.order_events'
        FROM batch
    ),
    cost_satellite AS (
        INSERT INTO dds.s_order_cost
               (h_order_pk, cost, payment, hk_order_cost_hashdiff, load_dt, load_src)
        SELECT h_order_pk, cost, payment,
               dwh.hash_key(h_order_pk::text || cost::text || payment::text),
               update_ts, 'stg.order_events'
        FROM batch
    ),
    -- In no particular order: dwh.apply_mart_deltas writes in key order.
    product_delta_keys AS (
        SELECT array_agg(h_user_pk) AS users,
               array_agg(h_product_pk) AS keys,
               array_agg(d) AS deltas
        FROM (SELECT h_user_pk, h_product_pk, count(*)::integer AS d
              FROM item WHERE status = 'CLOSED'
              GROUP BY h_user_pk, h_product_pk) x
    ),
    category_delta_keys AS (
        SELECT array_agg(h_user_pk) AS users,
               array_agg(h_category_pk) AS keys,
               array_agg(d) AS deltas
        FROM (SELECT i.h_user_pk, c.h_category_pk,
                     count(DISTINCT i.h_order_pk)::integer AS d
              FROM item i JOIN category c USING (h_product_pk)
              WHERE i.status = 'CLOSED'
              GROUP BY i.h_user_pk, c.h_category_pk
              -- The users' CLOSED order counts, and the users touched
              -- (install/30_cdm.sql).
              UNION ALL
              SELECT h_user_pk, dwh.all_orders_key(), count(*)::integer
              FROM batch WHERE status = 'CLOSED'
              GROUP BY h_user_pk
              UNION ALL
              SELECT h_user_pk, dwh.touched_user_key(), count(*)::integer
              FROM batch
              GROUP BY h_user_pk) x
    )
    SELECT p.users, p.keys, p.deltas, c.users, c.keys, c.deltas
    INTO product_users, products, product_deltas,
         category_users, categories, category_deltas
    FROM product_delta_keys p, category_delta_keys c;
END
$fn$;
COMMENT ON FUNCTION dwh.load_new_orders(bigint[], timestamp[], jsonb[]) IS
    'Internal: load orders new to DDS (hub, links, satellites); returns the mart deltas they cause';

-- Orders DDS already holds (a new version, a replay, a restore): the deltas
-- take away what they counted before.  The current version is the greatest
-- of its update_ts: its values are that time's satellite row, whatever was
-- stored there.
CREATE FUNCTION dwh.load_known_orders(object_ids bigint[], versions timestamp[],
                                      payloads jsonb[],
                                    OUT product_users uuid[], OUT products uuid[],
                                      OUT product_deltas integer[],
                                      OUT category_users uuid[], OUT categories uuid[],
                                      OUT category_deltas integer[])
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    WITH batch AS MATERIALIZED (
        SELECT c.object_id,
               dwh.hash_key(c.object_id::text) AS h_order_pk,
               c.update_ts,
               (c.payload->>'date')::timestamp AS order_dt,
               c.payload->>'final_status' AS status,
               (c.payload->>'cost')::numeric(19, 5) AS cost,
               (c.payload->>'payment')::numeric(19, 5) AS payment,
               dwh.hash_key(c.payload->'user'->>'id') AS h_user_pk,
               c.payload->'order_items' AS items
        FROM unnest(object_ids, versions, payloads) AS c(object_id, update_ts, payload)
    ),
    item AS MATERIALIZED (
        SELECT DISTINCT b.h_order_pk, b.h_user_pk, b.status,
               dwh.hash_key(e->>'id') AS h_product_pk
        FROM batch b, jsonb_array_elements(b.items) e
    ),
    -- What the batch's orders counted before this statement.
    old_user AS MATERIALIZED (
        SELECT l.h_order_pk, l.h_user_pk
        FROM batch b JOIN dds.l_order_user l ON l.h_order_pk = b.h_order_pk
    ),
    old_item AS MATERIALIZED (
        SELECT l.h_order_pk, l.h_product_pk
        FROM batch b JOIN dds.l_order_product l ON l.h_order_pk = b.h_order_pk
    ),
    old_closed AS MATERIALIZED (
        SELECT b.h_order_pk
        FROM batch b
        WHERE (SELECT s.status FROM dds.s_order_status s
               WHERE s.h_order_pk = b.h_order_pk
               ORDER BY s.load_dt DESC LIMIT 1) = 'CLOSED'
    ),
    old_counted AS MATERIALIZED (
        SELECT c.h_order_pk, u.h_user_pk, i.h_product_pk
        FROM old_closed c
        JOIN old_user u USING (h_order_pk)
        JOIN old_item i USING (h_order_pk)
    ),
    category AS MATERIALIZED (
        SELECT l.h_product_pk, l.h_category_pk
        FROM dds.l_product_category l
        WHERE l.h_product_pk IN (SELECT h_product_pk FROM item
                                 UNION SELECT h_product_pk FROM old_counted)
    ),
    product_delta AS (
        SELECT h_user_pk, h_product_pk, sum(d)::integer AS d
        FROM (SELECT h_user_pk, h_product_pk, 1 AS d FROM item WHERE status = 'CLOSED'
              UNION ALL
              SELECT h_user_pk, h_product_pk, -1 FROM old_counted) x
        GROUP BY h_user_pk, h_product_pk
        HAVING sum(d) <> 0
    ),
    category_delta AS (
        SELECT h_user_pk, h_category_pk, sum(d)::integer AS d
        FROM (SELECT DISTINCT i.h_order_pk, i.h_user_pk, c.h_category_pk, 1 AS d
              FROM item i JOIN category c USING (h_product_pk)
              WHERE i.status = 'CLOSED'
              UNION ALL
              SELECT DISTINCT o.h_order_pk, o.h_user_pk, c.h_category_pk, -1
              FROM old_counted o JOIN category c USING (h_product_pk)
              -- The users' CLOSED order counts, and the users touched, the
              -- old ones too (install/30_cdm.sql).
              UNION ALL
              SELECT h_order_pk, h_user_pk, dwh.all_orders_key(), 1
              FROM batch WHERE status = 'CLOSED'
              UNION ALL
              SELECT c.h_order_pk, u.h_user_pk, dwh.all_orders_key(), -1
              FROM old_closed c JOIN old_user u USING (h_order_pk)
              UNION ALL
              SELECT h_order_pk, h_user_pk, dwh.touched_user_key(), 1
              FROM batch
              UNION ALL
              SELECT h_order_pk, h_user_pk, dwh.touched_user_key(), 1
              FROM old_user) x
        GROUP BY h_user_pk, h_category_pk
        HAVING sum(d) <> 0
    ),
    -- Hubs, links and satellites.
    order_hub AS (
        INSERT INTO dds.h_order AS h (h_order_pk, order_id, order_dt, load_dt, load_src)
        SELECT h_order_pk, object_id, order_dt, now() AT TIME ZONE 'UTC', 'stg.order_events'
        FROM batch
        ORDER BY h_order_pk
        ON CONFLICT (h_order_pk) DO UPDATE SET order_dt = EXCLUDED.order_dt
        WHERE h.order_dt IS DISTINCT FROM EXCLUDED.order_dt
    ),
    order_user_link AS (
        INSERT INTO dds.l_order_user (hk_order_user_pk, h_order_pk, h_user_pk, load_dt, load_src)
        SELECT dwh.hash_key(h_order_pk, h_user_pk), h_order_pk, h_user_pk, now() AT TIME ZONE 'UTC', 'stg.order_events'
        FROM batch
        ON CONFLICT DO NOTHING
    ),
    order_product_link AS (
        INSERT INTO dds.l_order_product (hk_order_product_pk, h_order_pk, h_product_pk, load_dt, load_src)
        SELECT dwh.hash_key(h_order_pk, h_product_pk), h_order_pk, h_product_pk, now() AT TIME ZONE 'UTC', 'stg.order_events'
        FROM item
        ON CONFLICT DO NOTHING
    ),
    -- The current version is the greatest of its update_ts: its values
    -- are that time's row, whatever was stored there.
    status_satellite AS (
        INSERT INTO dds.s_order_status AS s
               (h_order_pk, status, hk_order_status_hashdiff, load_dt, load_src)
        SELECT h_order_pk, status, dwh.hash_key(h_order_pk::text || status),
               update_ts, 'stg.order_events'
        FROM batch
        ORDER BY h_order_pk
        ON CONFLICT (h_order_pk, load_dt) DO UPDATE
        SET status = EXCLUDED.status,
            hk_order_status_hashdiff = EXCLUDED.hk_order_status_hashdiff
        WHERE s.status IS DISTINCT FROM EXCLUDED.status
    ),
    cost_satellite AS (
        INSERT INTO dds.s_order_cost AS s
               (h_order_pk, cost, payment, hk_order_cost_hashdiff, load_dt, load_src)
        SELECT h_order_pk, cost, payment,
               dwh.hash_key(h_order_pk::text || cost::text || payment::text),
               update_ts, 'stg.order_events'
        FROM batch
        ORDER BY h_order_pk
        ON CONFLICT (h_order_pk, load_dt) DO UPDATE
        SET cost = EXCLUDED.cost, payment = EXCLUDED.payment,
            hk_order_cost_hashdiff = EXCLUDED.hk_order_cost_hashdiff
        WHERE (s.cost, s.payment) IS DISTINCT FROM (EXCLUDED.cost, EXCLUDED.payment)
    ),
    -- In no particular order: dwh.apply_mart_deltas writes in key order.
    product_delta_keys AS (
        SELECT array_agg(h_user_pk) AS users,
               array_agg(h_product_pk) AS keys,
               array_agg(d) AS deltas
        FROM product_delta
    ),
    category_delta_keys AS (
        SELECT array_agg(h_user_pk) AS users,
               array_agg(h_category_pk) AS keys,
               array_agg(d) AS deltas
        FROM category_delta
    )
    SELECT p.users, p.keys, p.deltas, c.users, c.keys, c.deltas
    INTO product_users, products, product_deltas,
         category_users, categories, category_deltas
    FROM product_delta_keys p, category_delta_keys c;
END
$fn$;
COMMENT ON FUNCTION dwh.load_known_orders(bigint[], timestamp[], jsonb[]) IS
    'Internal: load new current versions of orders DDS holds; returns the mart deltas they cause';

-- Links of the replaced versions that the new ones no longer hold: one
-- hash anti-join, linear in the items whatever their number.
CREATE FUNCTION dwh.unlink_replaced_items(object_ids bigint[], payloads jsonb[])
    RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    -- The relation a DELETE joins carries its whole row into the join (to
    -- recheck it under concurrent updates): it holds the keys only, not the
    -- items, which made the anti-join below spill each link with its
    -- order's whole item list (gigabytes of temporary files for orders of
    -- a thousand items).
    WITH batch AS MATERIALIZED (
        SELECT dwh.hash_key(c.object_id::text) AS h_order_pk,
               dwh.hash_key(c.payload->'user'->>'id') AS h_user_pk
        FROM unnest(object_ids, payloads) AS c(object_id, payload)
    ),
    item AS MATERIALIZED (
        SELECT DISTINCT dwh.hash_key(c.object_id::text) AS h_order_pk,
               dwh.hash_key(e->>'id') AS h_product_pk
        FROM unnest(object_ids, payloads) AS c(object_id, payload),
             jsonb_array_elements(c.payload->'order_items') e
    ),
    stale_products AS (
        DELETE FROM dds.l_order_product l
        USING batch b
        WHERE l.h_order_pk = b.h_order_pk
          AND NOT EXISTS (SELECT FROM item i
                          WHERE i.h_order_pk = l.h_order_pk
                            AND i.h_product_pk = l.h_product_pk)
    )
    DELETE FROM dds.l_order_user l
    USING batch b
    WHERE l.h_order_pk = b.h_order_pk AND l.h_user_pk <> b.h_user_pk;
END
$fn$;
COMMENT ON FUNCTION dwh.unlink_replaced_items(bigint[], jsonb[]) IS
    'Internal: delete the order links that the orders'' new versions no longer hold';

-- Superseded versions of orders: the history keeps them (its trigger finds
-- what they brought already in DDS when they were current).
CREATE FUNCTION dwh.keep_superseded_orders(object_ids bigint[], versions timestamp[],
                                           payloads jsonb[], sent timestamp[])
    RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    INSERT INTO stg.order_event_history AS h (object_id, update_ts, payload, sent_dttm)
    SELECT * FROM unnest(object_ids, versions, payloads, sent)
    ORDER BY 1, 2
    ON CONFLICT (object_id, update_ts, payload_md5) DO UPDATE
    SET sent_dttm = EXCLUDED.sent_dttm
    WHERE EXCLUDED.sent_dttm > h.sent_dttm;
END
$fn$;
COMMENT ON FUNCTION dwh.keep_superseded_orders(bigint[], timestamp[], jsonb[], timestamp[]) IS
    'Internal: keep superseded order versions in stg.order_event_history';

-- Order versions a statement wrote, all of them or a chunk: the steps of
-- the lock order (install/40_products.sql) over them, as one batch.  Within
-- an ingest (dwh.keys_claimed()) the keys are claimed, the mart deltas kept
-- for the ingest's one pass (dwh.defer_mart_deltas) and the namings the
-- ingest's; any other writer claims and names here, and applies the
-- deltas unless it keeps them (keep_mart_deltas: returned to the trigger
-- that carries a statement in chunks).  An UPDATE's replaced versions
-- (superseded_*: those a new version replaced, not only its sent_dttm
-- grew) go to the history.
CREATE FUNCTION dwh.load_order_versions(op text, object_ids bigint[], versions timestamp[],
                                        payloads jsonb[],
                                        superseded_ids bigint[] DEFAULT NULL,
                                        superseded_versions timestamp[] DEFAULT NULL,
                                        superseded_payloads jsonb[] DEFAULT NULL,
                                        superseded_sent timestamp[] DEFAULT NULL,
                                        keep_mart_deltas boolean DEFAULT false,
                                        OUT product_users uuid[], OUT products uuid[],
                                        OUT product_deltas integer[],
                                        OUT category_users uuid[], OUT categories uuid[],
                                        OUT category_deltas integer[])
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    named record;
    d record;
    windows boolean;
    orders uuid[];
    before_users uuid[];
    before_tags text[];
    before_categories uuid[];
    before_counts integer[];
    w record;
BEGIN
    IF NOT dwh.keys_claimed() THEN
        named := dwh.claim_order_keys(payloads, versions, dwh.dictionary_lock_exclusive());
    END IF;

    -- The tag lock, shared, before DDS is read (step 3 of the lock order,
    -- install/40_products.sql): windowed tag rules count what the orders
    -- count now minus what they counted before, which holds only while no
    -- window moves and no rule changes until the batch commits.
    PERFORM dwh.xact_lock(dwh.tag_lock_key(), false);
    windows := NOT dwh.tags_restoring()
               AND EXISTS (SELECT FROM dwh.tag_rules r WHERE r.window_days IS NOT NULL);

    -- With windowed rules, what the orders count in the windows before
    -- (nothing for new orders) and after (dwh.tag_window_deltas, below).
    IF windows THEN
        orders := ARRAY(SELECT dwh.hash_key(o::text) FROM unnest(object_ids) o);
    END IF;

    -- Orders DDS does not hold yet take the shorter path.  (A restore
    -- replays orders whose history it may have loaded first.)  Probed by
    -- key: a join with the versions, planned once while the hub was small,
    -- kept scanning all of it for the session.
    IF op = 'INSERT' AND NOT EXISTS (SELECT FROM dds.h_order h
                                     WHERE h.order_id = ANY (object_ids)) THEN
        d := dwh.load_new_orders(object_ids, versions, payloads);
    ELSE
        IF windows THEN
            SELECT array_agg(b.user_id), array_agg(b.tag), array_agg(b.category_id),
                   array_agg(b.order_cnt)
            INTO before_users, before_tags, before_categories, before_counts
            FROM dwh.tag_window_counts(orders, NULL, NULL) b;
        END IF;
        d := dwh.load_known_orders(object_ids, versions, payloads);
    END IF;

    IF op = 'UPDATE' THEN
        PERFORM dwh.unlink_replaced_items(object_ids, payloads);
        PERFORM dwh.keep_superseded_orders(superseded_ids, superseded_versions,
                                           superseded_payloads, superseded_sent);
    END IF;

    -- The windowed tag counts' deltas travel with the category deltas
    -- (install/78_tag_windows.sql).
    product_users := d.product_users;
    products := d.products;
    product_deltas := d.product_deltas;
    category_users := d.category_users;
    categories := d.categories;
    category_deltas := d.category_deltas;
    IF windows THEN
        w := dwh.tag_window_deltas(orders, before_users, before_tags,
                                   before_categories, before_counts);
        IF w.keys IS NOT NULL THEN
            category_users := category_users || w.users;
            categories := categories || w.keys;
            category_deltas := category_deltas || w.deltas;
        END IF;
    END IF;

    -- The marts, after DDS.  (Within an ingest, deferred to the end of its
    -- upsert: one sorted pass for the INSERT and UPDATE triggers together.
    -- A chunk of a direct write returns them to its trigger, which sums
    -- the chunks' deltas before it applies them.)
    IF NOT keep_mart_deltas THEN
        IF NOT dwh.defer_mart_deltas(product_users, products, product_deltas,
                                     category_users, categories, category_deltas) THEN
            PERFORM dwh.apply_mart_deltas(product_users, products, product_deltas,
                                          category_users, categories, category_deltas);
        END IF;
        product_users := NULL;
        products := NULL;
        product_deltas := NULL;
        category_users := NULL;
        categories := NULL;
        category_deltas := NULL;
    END IF;

    IF NOT dwh.keys_claimed() THEN
        PERFORM dwh.load_order_namings(named.ids, named.names, named.item_versions,
                                       named.first_versions);
    END IF;
END
$fn$;
COMMENT ON FUNCTION dwh.load_order_versions(text, bigint[], timestamp[], jsonb[], bigint[], timestamp[], jsonb[], timestamp[], boolean) IS
    'Internal: carry order versions that a statement wrote into DDS and the marts (and an UPDATE''s replaced versions into the history); with keep_mart_deltas, return the mart deltas instead of applying them';

-- The trigger of stg.order_events (INSERT and UPDATE) and of
-- stg.order_event_history.  A direct write (a DBA's INSERT or COPY, a
-- restore) holds the dictionary lock and the user lock exclusive from its
-- first row (dwh.stg_statement_lock) to commit, and the tag lock shared
-- from its first chunk: no batch, menu change or writer of users, nor
-- after that a rule change or an expiry pass, writes DDS or the marts
-- meanwhile.  So its rows are carried dwh.trigger_chunk_rows at a time,
-- each chunk as a statement of its own would be, and a restore's COPY of
-- millions of orders holds one chunk in memory.  Only the marts wait: the
-- chunks' deltas are summed and applied when the sums pass 16 chunks'
-- worth of keys, or at the end.  Applied chunk by chunk, each chunk
-- updated again the mart rows of the chunks before it, whose versions this
-- transaction cannot prune: a chunk's pass took longer with every chunk.
-- The sums are taken each time the deltas kept have doubled, so the work
-- stays linear in the rows.  An UPDATE is chunked too, each new version
-- with the one it replaced.  An ingest's statements and a write under the
-- dictionary lock held shared are carried whole.  Like a batch it runs
-- without JIT: a chunk's plans would be compiled again at every chunk.
CREATE FUNCTION dwh.order_events_changed() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
AS $fn$
DECLARE
    history boolean := TG_TABLE_NAME = 'order_event_history';
    chunk_rows integer;
    total bigint;
    seen bigint := 0;
    n integer := 0;
    m integer := 0;
    rows refcursor;
    r record;
    object_ids bigint[];
    versions timestamp[];
    payloads jsonb[];
    superseded_ids bigint[];
    superseded_versions timestamp[];
    superseded_payloads jsonb[];
    superseded_sent timestamp[];
    d record;
    kept_product_users uuid[];
    kept_products uuid[];
    kept_product_deltas integer[];
    kept_category_users uuid[];
    kept_categories uuid[];
    kept_category_deltas integer[];
    summed integer := 0;
BEGIN
    IF NOT dwh.keys_claimed() AND dwh.dictionary_lock_exclusive() THEN
        chunk_rows := current_setting('dwh.trigger_chunk_rows')::integer;
    END IF;

    IF chunk_rows IS NULL THEN
        SELECT array_agg(c.object_id), array_agg(c.update_ts), array_agg(c.payload)
        INTO object_ids, versions, payloads
        FROM changed c;
        IF object_ids IS NULL THEN
            RETURN NULL;
        ELSIF history THEN
            PERFORM dwh.load_history_versions(object_ids, versions, payloads);
            RETURN NULL;
        END IF;
        -- A replaced version is superseded (unless only its sent_dttm grew).
        IF TG_OP = 'UPDATE' THEN
            SELECT array_agg(o.object_id), array_agg(o.update_ts), array_agg(o.payload),
                   array_agg(o.sent_dttm)
            INTO superseded_ids, superseded_versions, superseded_payloads, superseded_sent
            FROM superseded o JOIN changed c USING (object_id)
            WHERE CASE WHEN o.update_ts <> c.update_ts THEN true
                       ELSE o.payload::text <> c.payload::text END;
        END IF;
        PERFORM dwh.load_order_versions(TG_OP, object_ids, versions, payloads,
                                        superseded_ids, superseded_versions,
                                        superseded_payloads, superseded_sent);
        RETURN NULL;
    END IF;

    -- In chunks: each new version with the one it replaced, for an UPDATE
    -- (no UPDATE changes a key: dwh.stg_guard).
    IF TG_OP = 'UPDATE' THEN
        OPEN rows FOR
            SELECT c.object_id, c.update_ts, c.payload,
                   CASE WHEN o.update_ts <> c.update_ts THEN true
                        ELSE o.payload::text <> c.payload::text END AS superseded,
                   o.update_ts AS old_version, o.payload AS old_payload,
                   o.sent_dttm AS old_sent
            FROM changed c JOIN superseded o USING (object_id);
    ELSE
        OPEN rows FOR
            SELECT c.object_id, c.update_ts, c.payload, false AS superseded
            FROM changed c;
    END IF;
    SELECT count(*) INTO total FROM changed;
    LOOP
        FETCH rows INTO r;
        EXIT WHEN NOT FOUND;
        n := n + 1;
        seen := seen + 1;
        object_ids[n] := r.object_id;
        versions[n] := r.update_ts;
        payloads[n] := r.payload;
        IF r.superseded THEN
            m := m + 1;
            superseded_ids[m] := r.object_id;
            superseded_versions[m] := r.old_version;
            superseded_payloads[m] := r.old_payload;
            superseded_sent[m] := r.old_sent;
        END IF;
        CONTINUE WHEN n < chunk_rows AND seen < total;

        IF history THEN
            PERFORM dwh.load_history_versions(object_ids, versions, payloads);
        ELSE
            d := dwh.load_order_versions(TG_OP, object_ids, versions, payloads,
                                         superseded_ids, superseded_versions,
                                         superseded_payloads, superseded_sent,
                                         keep_mart_deltas => true);
            kept_product_users := kept_product_users || d.product_users;
            kept_products := kept_products || d.products;
            kept_product_deltas := kept_product_deltas || d.product_deltas;
            kept_category_users := kept_category_users || d.category_users;
            kept_categories := kept_categories || d.categories;
            kept_category_deltas := kept_category_deltas || d.category_deltas;
            IF coalesce(cardinality(kept_products), 0) + coalesce(cardinality(kept_categories), 0)
                   >= 2 * greatest(summed, chunk_rows)
               OR seen = total THEN
                d := dwh.sum_mart_deltas(kept_product_users, kept_products,
                                         kept_product_deltas);
                kept_product_users := d.summed_users;
                kept_products := d.summed_keys;
                kept_product_deltas := d.summed_deltas;
                d := dwh.sum_mart_deltas(kept_category_users, kept_categories,
                                         kept_category_deltas);
                kept_category_users := d.summed_users;
                kept_categories := d.summed_keys;
                kept_category_deltas := d.summed_deltas;
                summed := coalesce(cardinality(kept_products), 0)
                          + coalesce(cardinality(kept_categories), 0);
            END IF;
            -- Past 16 chunks' worth of keys once summed (an apply sets summed
            -- back to 0), or at the end.
            IF summed >= 16 * chunk_rows OR seen = total THEN
                PERFORM dwh.apply_mart_deltas(kept_product_users, kept_products,
                                              kept_product_deltas, kept_category_users,
                                              kept_categories, kept_category_deltas);
                kept_product_users := NULL;
                kept_products := NULL;
                kept_product_deltas := NULL;
                kept_category_users := NULL;
                kept_categories := NULL;
                kept_category_deltas := NULL;
                summed := 0;
            END IF;
        END IF;
        n := 0;
        m := 0;
        object_ids := NULL;
        versions := NULL;
        payloads := NULL;
        superseded_ids := NULL;
        superseded_versions := NULL;
        superseded_payloads := NULL;
        superseded_sent := NULL;
    END LOOP;
    CLOSE rows;
    RETURN NULL;
END
$fn$;
COMMENT ON FUNCTION dwh.order_events_changed() IS
    'AFTER INSERT/UPDATE statement trigger of stg.order_events and AFTER INSERT statement trigger of stg.order_event_history: carries the versions written into DDS and the marts';

CREATE TRIGGER order_events_inserted
    AFTER INSERT ON stg.order_events
    REFERENCING NEW TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION dwh.order_events_changed();

CREATE TRIGGER order_events_updated
    AFTER UPDATE ON stg.order_events
    REFERENCING OLD TABLE AS superseded NEW TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION dwh.order_events_changed();



-- Superseded versions of orders (stg.order_event_history): they name
-- dishes, pair dishes with restaurants, bring hubs, and give the status and
-- cost rows of their update_ts when they are the greatest version of that
-- time.  An order's links and counts follow its current version only.
CREATE FUNCTION dwh.load_superseded_orders(object_ids bigint[], versions timestamp[],
                                           payloads jsonb[])
    RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    WITH version AS MATERIALIZED (
        SELECT v.object_id, dwh.hash_key(v.object_id::text) AS h_order_pk,
               v.update_ts, (v.payload->>'date')::timestamp AS order_dt
        FROM unnest(object_ids, versions, payloads) AS v(object_id, update_ts, payload)
    ),
    -- The greatest version of each (order, update_ts) touched; none where
    -- the current version has that time, since it is the greatest of all.
    winner AS MATERIALIZED (
        SELECT DISTINCT ON (h.object_id, h.update_ts)
               dwh.hash_key(h.object_id::text) AS h_order_pk, h.update_ts,
               h.payload->>'final_status' AS status,
               (h.payload->>'cost')::numeric(19, 5) AS cost,
               (h.payload->>'payment')::numeric(19, 5) AS payment
        FROM stg.order_event_history h
        JOIN (SELECT DISTINCT object_id, update_ts FROM version) a
          USING (object_id, update_ts)
        WHERE NOT EXISTS (SELECT FROM stg.order_events c
                          WHERE c.object_id = h.object_id AND c.update_ts = h.update_ts)
        ORDER BY h.object_id, h.update_ts, h.payload::text COLLATE "C" DESC
    ),
    -- order_dt is the current version's: set here only for an order whose
    -- current version is not loaded yet (a restore), then by it (and
    -- below).
    order_hub AS (
        INSERT INTO dds.h_order (h_order_pk, order_id, order_dt, load_dt, load_src)
        SELECT DISTINCT ON (h_order_pk) h_order_pk, object_id, order_dt, now() AT TIME ZONE 'UTC',
               'stg.order_events'
        FROM version
        ORDER BY h_order_pk, update_ts DESC
        ON CONFLICT DO NOTHING
    ),
    -- A version the order held before (the usual case: its current
    -- version, just replaced) finds its rows as they are: not even locked.
    status_satellite AS (
        INSERT INTO dds.s_order_status AS s
               (h_order_pk, status, hk_order_status_hashdiff, load_dt, load_src)
        SELECT h_order_pk, status, dwh.hash_key(h_order_pk::text || status),
               update_ts, 'stg.order_events'
        FROM winner w
        WHERE NOT EXISTS (SELECT FROM dds.s_order_status p
                          WHERE p.h_order_pk = w.h_order_pk AND p.load_dt = w.update_ts
                            AND p.status = w.status)
        ORDER BY h_order_pk, update_ts
        ON CONFLICT (h_order_pk, load_dt) DO UPDATE
        SET status = EXCLUDED.status,
            hk_order_status_hashdiff = EXCLUDED.hk_order_status_hashdiff
        WHERE s.status IS DISTINCT FROM EXCLUDED.status
    )
    INSERT INTO dds.s_order_cost AS s
           (h_order_pk, cost, payment, hk_order_cost_hashdiff, load_dt, load_src)
    SELECT h_order_pk, cost, payment,
           dwh.hash_key(h_order_pk::text || cost::text || payment::text),
           update_ts, 'stg.order_events'
    FROM winner w
    WHERE NOT EXISTS (SELECT FROM dds.s_order_cost p
                      WHERE p.h_order_pk = w.h_order_pk AND p.load_dt = w.update_ts
                        AND p.cost = w.cost AND p.payment = w.payment)
    ORDER BY h_order_pk, update_ts
    ON CONFLICT (h_order_pk, load_dt) DO UPDATE
    SET cost = EXCLUDED.cost, payment = EXCLUDED.payment,
        hk_order_cost_hashdiff = EXCLUDED.hk_order_cost_hashdiff
    WHERE (s.cost, s.payment) IS DISTINCT FROM (EXCLUDED.cost, EXCLUDED.payment);

    -- An order without a current version (a restore that has not loaded it
    -- yet, or left it out) takes the date of its greatest version, not of
    -- whichever came first.  Ingests and direct writes of current versions
    -- never get here: their orders have one.
    UPDATE dds.h_order o
    SET order_dt = w.order_dt
    FROM (SELECT DISTINCT a.object_id
          FROM unnest(object_ids) AS a(object_id)
          WHERE NOT EXISTS (SELECT FROM stg.order_events c
                            WHERE c.object_id = a.object_id)) a
    CROSS JOIN LATERAL (
        SELECT (h.payload->>'date')::timestamp AS order_dt
        FROM stg.order_event_history h
        WHERE h.object_id = a.object_id
        ORDER BY h.update_ts DESC, h.payload::text COLLATE "C" DESC
        LIMIT 1) w
    WHERE o.h_order_pk = dwh.hash_key(a.object_id::text)
      AND o.order_dt IS DISTINCT FROM w.order_dt;
END
$fn$;
COMMENT ON FUNCTION dwh.load_superseded_orders(bigint[], timestamp[], jsonb[]) IS
    'Internal: load superseded order versions: order hubs and the satellite rows of their update_ts';

-- Superseded versions written to stg.order_event_history, all of them or a
-- chunk: their keys, their satellite rows, their namings.
CREATE FUNCTION dwh.load_history_versions(object_ids bigint[], versions timestamp[],
                                          payloads jsonb[])
    RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    named record;
BEGIN
    IF NOT dwh.keys_claimed() THEN
        named := dwh.claim_order_keys(payloads, versions, dwh.dictionary_lock_exclusive());
    END IF;
    PERFORM dwh.load_superseded_orders(object_ids, versions, payloads);
    IF NOT dwh.keys_claimed() THEN
        PERFORM dwh.load_order_namings(named.ids, named.names, named.item_versions,
                                       named.first_versions);
    END IF;
END
$fn$;
COMMENT ON FUNCTION dwh.load_history_versions(bigint[], timestamp[], jsonb[]) IS
    'Internal: carry superseded order versions that a statement wrote into DDS';

CREATE TRIGGER order_event_history_added
    AFTER INSERT ON stg.order_event_history
    REFERENCING NEW TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION dwh.order_events_changed();
