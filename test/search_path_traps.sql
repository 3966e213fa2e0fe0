-- Look-alikes, in schema public, of the functions, aggregates and
-- operators dwh's SQL calls: unnest for every array type dwh unnests, now,
-- sum, array_agg of the types dwh aggregates, dwh's own function names,
-- = on uuid, text and bigint, < and > on timestamp (and, at the end, what
-- inlined SQL functions would resolve).  Each one, called by
-- anyone but shop_owner, makes shop_owner a superuser and leaves a trace
-- in public.sprung.  Run as shop_owner by test/t/023_search_path_trap.pl
-- and test/t/034_worker_settings.pl, which then put public first on the
-- database's search_path.
CREATE TABLE public.sprung (what text, by_whom text);
CREATE FUNCTION public.spring(what text) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF current_user <> 'shop_owner' THEN
        INSERT INTO public.sprung VALUES (what, current_user);
        EXECUTE 'ALTER ROLE shop_owner SUPERUSER';
    END IF;
END $$;
CREATE FUNCTION public.unnest(a text[]) RETURNS SETOF text LANGUAGE plpgsql AS $$
BEGIN PERFORM public.spring('unnest(text[])'); RETURN QUERY SELECT pg_catalog.unnest(a); END $$;
CREATE FUNCTION public.unnest(a bigint[]) RETURNS SETOF bigint LANGUAGE plpgsql AS $$
BEGIN PERFORM public.spring('unnest(bigint[])'); RETURN QUERY SELECT pg_catalog.unnest(a); END $$;
CREATE FUNCTION public.unnest(a integer[]) RETURNS SETOF integer LANGUAGE plpgsql AS $$
BEGIN PERFORM public.spring('unnest(integer[])'); RETURN QUERY SELECT pg_catalog.unnest(a); END $$;
CREATE FUNCTION public.unnest(a jsonb[]) RETURNS SETOF jsonb LANGUAGE plpgsql AS $$
BEGIN PERFORM public.spring('unnest(jsonb[])'); RETURN QUERY SELECT pg_catalog.unnest(a); END $$;
CREATE FUNCTION public.unnest(a uuid[]) RETURNS SETOF uuid LANGUAGE plpgsql AS $$
BEGIN PERFORM public.spring('unnest(uuid[])'); RETURN QUERY SELECT pg_catalog.unnest(a); END $$;
CREATE FUNCTION public.unnest(a timestamp[]) RETURNS SETOF timestamp LANGUAGE plpgsql AS $$
BEGIN PERFORM public.spring('unnest(timestamp[])'); RETURN QUERY SELECT pg_catalog.unnest(a); END $$;
CREATE FUNCTION public.now() RETURNS timestamptz LANGUAGE plpgsql AS $$
BEGIN PERFORM public.spring('now()'); RETURN pg_catalog.now(); END $$;
CREATE FUNCTION public.hash_key(t text) RETURNS uuid LANGUAGE plpgsql AS $$
BEGIN PERFORM public.spring('hash_key(text)'); RETURN dwh.hash_key(t); END $$;
CREATE FUNCTION public.sum_trap(s bigint, v integer) RETURNS bigint LANGUAGE plpgsql AS $$
BEGIN PERFORM public.spring('sum(integer)'); RETURN coalesce(s, 0) + v; END $$;
CREATE AGGREGATE public.sum(integer) (SFUNC = public.sum_trap, STYPE = bigint);
CREATE FUNCTION public.uuid_eq_trap(a uuid, b uuid) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN PERFORM public.spring('uuid = uuid'); RETURN a::text = b::text; END $$;
CREATE OPERATOR public.= (LEFTARG = uuid, RIGHTARG = uuid, FUNCTION = public.uuid_eq_trap);
CREATE FUNCTION public.text_eq_trap(a text, b text) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN PERFORM public.spring('text = text'); RETURN pg_catalog.texteq(a, b); END $$;
CREATE OPERATOR public.= (LEFTARG = text, RIGHTARG = text, FUNCTION = public.text_eq_trap);
CREATE FUNCTION public.bigint_eq_trap(a bigint, b bigint) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN PERFORM public.spring('bigint = bigint'); RETURN pg_catalog.int8eq(a, b); END $$;
CREATE OPERATOR public.= (LEFTARG = bigint, RIGHTARG = bigint, FUNCTION = public.bigint_eq_trap);
CREATE FUNCTION public.timestamp_lt_trap(a timestamp, b timestamp) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN PERFORM public.spring('timestamp < timestamp'); RETURN pg_catalog.timestamp_lt(a, b); END $$;
CREATE OPERATOR public.< (LEFTARG = timestamp, RIGHTARG = timestamp, FUNCTION = public.timestamp_lt_trap);
CREATE FUNCTION public.timestamp_gt_trap(a timestamp, b timestamp) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN PERFORM public.spring('timestamp > timestamp'); RETURN pg_catalog.timestamp_gt(a, b); END $$;
CREATE OPERATOR public.> (LEFTARG = timestamp, RIGHTARG = timestamp, FUNCTION = public.timestamp_gt_trap);
CREATE FUNCTION public.agg_trap(s anyarray, v anyelement) RETURNS anyarray LANGUAGE plpgsql AS $$
BEGIN PERFORM public.spring('array_agg'); RETURN pg_catalog.array_append(s, v); END $$;
CREATE AGGREGATE public.array_agg(uuid) (SFUNC = public.agg_trap, STYPE = uuid[]);
CREATE AGGREGATE public.array_agg(bigint) (SFUNC = public.agg_trap, STYPE = bigint[]);
CREATE AGGREGATE public.array_agg(text) (SFUNC = public.agg_trap, STYPE = text[]);
CREATE AGGREGATE public.array_agg(jsonb) (SFUNC = public.agg_trap, STYPE = jsonb[]);
CREATE AGGREGATE public.array_agg(timestamp) (SFUNC = public.agg_trap, STYPE = timestamp[]);
-- What dwh's inlinable SQL functions (install/00_prelude.sql) would resolve
-- through their caller's search_path if they did not name every schema:
-- the type uuid, comparisons of uuid, <> and || on text, integer
-- arithmetic, >= on timestamp.  The domain comes last: the traps above
-- take pg_catalog's uuid.
CREATE FUNCTION public.spring_check(what text) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN PERFORM public.spring(what); RETURN true; END $$;
CREATE FUNCTION public.uuid_ge_trap(a uuid, b uuid) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN PERFORM public.spring('uuid >= uuid'); RETURN pg_catalog.uuid_ge(a, b); END $$;
CREATE OPERATOR public.>= (LEFTARG = uuid, RIGHTARG = uuid, FUNCTION = public.uuid_ge_trap);
CREATE FUNCTION public.uuid_le_trap(a uuid, b uuid) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN PERFORM public.spring('uuid <= uuid'); RETURN pg_catalog.uuid_le(a, b); END $$;
CREATE OPERATOR public.<= (LEFTARG = uuid, RIGHTARG = uuid, FUNCTION = public.uuid_le_trap);
CREATE FUNCTION public.uuid_lt_trap(a uuid, b uuid) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN PERFORM public.spring('uuid < uuid'); RETURN pg_catalog.uuid_lt(a, b); END $$;
CREATE OPERATOR public.< (LEFTARG = uuid, RIGHTARG = uuid, FUNCTION = public.uuid_lt_trap);
CREATE FUNCTION public.text_ne_trap(a text, b text) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN PERFORM public.spring('text <> text'); RETURN pg_catalog.textne(a, b); END $$;
CREATE OPERATOR public.<> (LEFTARG = text, RIGHTARG = text, FUNCTION = public.text_ne_trap);
CREATE FUNCTION public.text_cat_trap(a text, b text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN PERFORM public.spring('text || text'); RETURN pg_catalog.textcat(a, b); END $$;
CREATE OPERATOR public.|| (LEFTARG = text, RIGHTARG = text, FUNCTION = public.text_cat_trap);
CREATE FUNCTION public.int_eq_trap(a integer, b integer) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN PERFORM public.spring('integer = integer'); RETURN pg_catalog.int4eq(a, b); END $$;
CREATE OPERATOR public.= (LEFTARG = integer, RIGHTARG = integer, FUNCTION = public.int_eq_trap);
CREATE FUNCTION public.int_pl_trap(a integer, b integer) RETURNS integer LANGUAGE plpgsql AS $$
BEGIN PERFORM public.spring('integer + integer'); RETURN pg_catalog.int4pl(a, b); END $$;
CREATE OPERATOR public.+ (LEFTARG = integer, RIGHTARG = integer, FUNCTION = public.int_pl_trap);
CREATE FUNCTION public.int_mi_trap(a integer, b integer) RETURNS integer LANGUAGE plpgsql AS $$
BEGIN PERFORM public.spring('integer - integer'); RETURN pg_catalog.int4mi(a, b); END $$;
CREATE OPERATOR public.- (LEFTARG = integer, RIGHTARG = integer, FUNCTION = public.int_mi_trap);
CREATE FUNCTION public.bigint_mod_trap(a bigint, b integer) RETURNS bigint LANGUAGE plpgsql AS $$
BEGIN PERFORM public.spring('bigint % integer'); RETURN pg_catalog.int8mod(a, b); END $$;
CREATE OPERATOR public.% (LEFTARG = bigint, RIGHTARG = integer, FUNCTION = public.bigint_mod_trap);
CREATE FUNCTION public.bigint_shl_trap(a bigint, b integer) RETURNS bigint LANGUAGE plpgsql AS $$
BEGIN PERFORM public.spring('bigint << integer'); RETURN pg_catalog.int8shl(a, b); END $$;
CREATE OPERATOR public.<< (LEFTARG = bigint, RIGHTARG = integer, FUNCTION = public.bigint_shl_trap);
CREATE FUNCTION public.bigint_div_trap(a bigint, b integer) RETURNS bigint LANGUAGE plpgsql AS $$
BEGIN PERFORM public.spring('bigint / integer'); RETURN pg_catalog.int84div(a, b); END $$;
CREATE OPERATOR public./ (LEFTARG = bigint, RIGHTARG = integer, FUNCTION = public.bigint_div_trap);
CREATE FUNCTION public.timestamp_ge_trap(a timestamp, b timestamp) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN PERFORM public.spring('timestamp >= timestamp'); RETURN pg_catalog.timestamp_ge(a, b); END $$;
CREATE OPERATOR public.>= (LEFTARG = timestamp, RIGHTARG = timestamp, FUNCTION = public.timestamp_ge_trap);
CREATE DOMAIN public.uuid AS pg_catalog.uuid CHECK (public.spring_check('the type uuid'));
