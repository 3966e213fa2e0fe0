-- The oracle: the marts recomputed from DDS from scratch.  dwh.verify()
-- lists every difference with the maintained marts (none: consistent),
-- dwh.rebuild() makes the marts equal to the recomputation.

CREATE VIEW dwh.order_current_status AS
SELECT DISTINCT ON (h_order_pk) h_order_pk, status, load_dt
FROM dds.s_order_status
ORDER BY h_order_pk, load_dt DESC;
COMMENT ON VIEW dwh.order_current_status IS 'Current final status of every order (its newest status satellite row)';

CREATE VIEW dwh.product_current_name AS
SELECT DISTINCT ON (h_product_pk) h_product_pk, name, load_dt
FROM dds.s_product_names
ORDER BY h_product_pk, load_dt DESC;
COMMENT ON VIEW dwh.product_current_name IS 'Current name of every dish (its newest name satellite row)';

CREATE VIEW dwh.expected_user_product_counters AS
SELECT ou.h_user_pk AS user_id, op.h_product_pk AS product_id,
       pn.name AS product_name, count(*)::integer AS order_cnt
FROM dwh.order_current_status st
JOIN dds.l_order_user ou USING (h_order_pk)
JOIN dds.l_order_product op USING (h_order_pk)
LEFT JOIN dwh.product_current_name pn USING (h_product_pk)
WHERE st.status = 'CLOSED'
GROUP BY ou.h_user_pk, op.h_product_pk, pn.name;
COMMENT ON VIEW dwh.expected_user_product_counters IS 'cdm.user_product_counters recomputed from DDS';

CREATE VIEW dwh.expected_user_category_counters AS
SELECT ou.h_user_pk AS user_id, pc.h_category_pk AS category_id,
       hc.category_name, count(DISTINCT st.h_order_pk)::integer AS order_cnt
FROM dwh.order_current_status st
JOIN dds.l_order_user ou USING (h_order_pk)
JOIN dds.l_order_product op USING (h_order_pk)
JOIN dds.l_product_category pc USING (h_product_pk)
JOIN dds.h_category hc USING (h_category_pk)
WHERE st.status = 'CLOSED'
GROUP BY ou.h_user_pk, pc.h_category_pk, hc.category_name;
COMMENT ON VIEW dwh.expected_user_category_counters IS 'cdm.user_category_counters recomputed from DDS';

CREATE FUNCTION dwh.verify()
    RETURNS TABLE (mart text, user_id uuid, item_id uuid,
                   expected_name text, actual_name text,
                   expected_cnt integer, actual_cnt integer)
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT 'user_product_counters', coalesce(e.user_id, a.user_id),
           coalesce(e.product_id, a.product_id), e.product_name, a.product_name,
           e.order_cnt, a.order_cnt
    FROM dwh.expected_user_product_counters e
    FULL JOIN cdm.user_product_counters a
      ON a.user_id = e.user_id AND a.product_id = e.product_id
    WHERE e.user_id IS NULL OR a.user_id IS NULL
       OR e.order_cnt <> a.order_cnt OR e.product_name IS DISTINCT FROM a.product_name
    UNION ALL
    SELECT 'user_category_counters', coalesce(e.user_id, a.user_id),
           coalesce(e.category_id, a.category_id), e.category_name, a.category_name,
           e.order_cnt, a.order_cnt
    FROM dwh.expected_user_category_counters e
    FULL JOIN cdm.user_category_counters a
      ON a.user_id = e.user_id AND a.category_id = e.category_id
    WHERE e.user_id IS NULL OR a.user_id IS NULL
       OR e.order_cnt <> a.order_cnt OR e.category_name IS DISTINCT FROM a.category_name
    ORDER BY 1, 2, 3;
$fn$;
COMMENT ON FUNCTION dwh.verify() IS
    'Differences between the marts and their recomputation from DDS; no rows means consistent';

CREATE FUNCTION dwh.rebuild(OUT mart text, OUT rows_changed bigint)
    RETURNS SETOF record
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    -- No order batch or dictionary change runs meanwhile; readers go on.
    PERFORM pg_advisory_xact_lock(dwh.dictionary_lock_key());
    LOCK TABLE cdm.user_product_counters, cdm.user_category_counters
        IN SHARE ROW EXCLUSIVE MODE;

    mart := 'user_product_counters';
    WITH e AS MATERIALIZED (SELECT * FROM dwh.expected_user_product_counters),
    upsert AS (
        INSERT INTO cdm.user_product_counters AS m (user_id, product_id, product_name, order_cnt)
        SELECT user_id, product_id, coalesce(product_name, ''), order_cnt
        FROM e
        ORDER BY user_id, product_id
        ON CONFLICT (user_id, product_id) DO UPDATE
        SET product_name = EXCLUDED.product_name, order_cnt = EXCLUDED.order_cnt
        WHERE (m.product_name, m.order_cnt) IS DISTINCT FROM
              (EXCLUDED.product_name, EXCLUDED.order_cnt)
        RETURNING 1
    ),
    extra AS (
        DELETE FROM cdm.user_product_counters m
        WHERE NOT EXISTS (SELECT FROM e
                          WHERE e.user_id = m.user_id AND e.product_id = m.product_id)
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM upsert) + (SELECT count(*) FROM extra) INTO rows_changed;
    RETURN NEXT;

    mart := 'user_category_counters';
    WITH e AS MATERIALIZED (SELECT * FROM dwh.expected_user_category_counters),
    upsert AS (
        INSERT INTO cdm.user_category_counters AS m (user_id, category_id, category_name, order_cnt)
        SELECT user_id, category_id, category_name, order_cnt
        FROM e
        ORDER BY user_id, category_id
        ON CONFLICT (user_id, category_id) DO UPDATE
        SET category_name = EXCLUDED.category_name, order_cnt = EXCLUDED.order_cnt
        WHERE (m.category_name, m.order_cnt) IS DISTINCT FROM
              (EXCLUDED.category_name, EXCLUDED.order_cnt)
        RETURNING 1
    ),
    extra AS (
        DELETE FROM cdm.user_category_counters m
        WHERE NOT EXISTS (SELECT FROM e
                          WHERE e.user_id = m.user_id AND e.category_id = m.category_id)
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM upsert) + (SELECT count(*) FROM extra) INTO rows_changed;
    RETURN NEXT;
END
$fn$;
COMMENT ON FUNCTION dwh.rebuild() IS
    'Make both marts equal to their recomputation from DDS; returns the rows changed per mart';
