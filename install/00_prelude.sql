-- dwh install script, assembled by the Makefile from install/*.sql in order.

\echo Use "CREATE EXTENSION dwh" to load this file. \quit

DO $$
BEGIN
    IF pg_catalog.getdatabaseencoding() <> 'UTF8' THEN
        RAISE EXCEPTION 'dwh requires a database with UTF8 encoding, not %',
            pg_catalog.getdatabaseencoding()
            USING ERRCODE = '22023',
                  HINT = 'Create the database with ENCODING ''UTF8'' and install dwh there.';
    END IF;
END
$$;

-- The definer functions live in schema dwh and call each other by name:
-- whoever owns the schema could rename it and put functions of their own
-- in their place, and whoever may create objects in it could add an
-- overload that a call resolves to.  It must belong to a superuser, and
-- only superusers may create objects in it (src/dwh_trust.c checks the
-- same of all four schemas before the workers' and ingest's every batch).
DO $$
DECLARE
    owner name;
    creator text;
BEGIN
    SELECT r.rolname INTO owner
    FROM pg_catalog.pg_namespace n JOIN pg_catalog.pg_roles r ON r.oid = n.nspowner
    WHERE n.nspname = 'dwh' AND NOT r.rolsuper;
    IF FOUND THEN
        RAISE EXCEPTION 'schema dwh is owned by role %, which is not a superuser', owner
            USING ERRCODE = '42501',
                  DETAIL = 'The extension''s functions run as a superuser and live in this schema; its owner could replace them.',
                  HINT = 'Drop the schema, or give it to a superuser (ALTER SCHEMA dwh OWNER TO a superuser), then run CREATE EXTENSION dwh again.';
    END IF;
    SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE pg_catalog.quote_ident(r.rolname) END
    INTO creator
    FROM pg_catalog.pg_namespace n,
         LATERAL pg_catalog.aclexplode(n.nspacl) a
         LEFT JOIN pg_catalog.pg_roles r ON r.oid = a.grantee
    WHERE n.nspname = 'dwh' AND a.privilege_type = 'CREATE'
      AND (a.grantee = 0 OR NOT r.rolsuper)
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION '% may create objects in schema dwh, and is not a superuser',
            CASE creator WHEN 'PUBLIC' THEN creator ELSE 'role ' || creator END
            USING ERRCODE = '42501',
                  DETAIL = 'The extension''s functions run as a superuser and call one another by name; a role that may create objects in their schema could add functions that the calls resolve to.',
                  HINT = pg_catalog.format('Run REVOKE CREATE ON SCHEMA dwh FROM %s, then CREATE EXTENSION dwh again.', creator);
    END IF;
END
$$;

CREATE SCHEMA stg;
CREATE SCHEMA dds;
CREATE SCHEMA cdm;

COMMENT ON SCHEMA stg IS 'dwh raw layer: data as it arrived from Kafka and Redis, one row per key, latest version';
COMMENT ON SCHEMA dds IS 'dwh Data Vault 2.0: hubs, links and satellites, maintained by triggers on stg';
COMMENT ON SCHEMA cdm IS 'dwh counter marts read by analysts and BI tools';
COMMENT ON SCHEMA dwh IS 'dwh operations: ingest functions, dead letters, verify and rebuild';

-- SQL functions are written in two ways.  Those the planner should inline
-- (constants, the part predicates that must become index ranges) have no
-- SET clause, which would stop it, and name every type, function and
-- operator with its schema: inlined, their text is parsed under the
-- caller's search_path (a view's reader, a superuser whose database owner
-- put look-alikes first on it).  All others fix their search_path.
--
-- Vault keys: name-based UUID v5 (RFC 4122) in the namespace of the
-- services dwh replaces, 7f288a2e-0ad0-4039-8e59-6c9838d87307.
CREATE FUNCTION dwh.uuid_v5(namespace uuid, name text) RETURNS uuid
    AS 'MODULE_PATHNAME', 'dwh_uuid_v5_sql'
    LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION dwh.uuid_v5(uuid, text) IS
    'Name-based UUID version 5 (SHA-1) of name in namespace';

CREATE FUNCTION dwh.hash_key(business_key text) RETURNS uuid
    AS 'MODULE_PATHNAME', 'dwh_hash_key_text'
    LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION dwh.hash_key(text) IS
    'Hub key or hashdiff: UUID v5 of the text in the dwh namespace';

CREATE FUNCTION dwh.hash_key(first_key uuid, second_key uuid) RETURNS uuid
    AS 'MODULE_PATHNAME', 'dwh_hash_key_link'
    LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION dwh.hash_key(uuid, uuid) IS
    'Link key: UUID v5 of both hub keys written one after the other (lower-case, hyphenated)';

-- Every writer of order and dictionary data takes this advisory lock: order
-- batches in shared mode, changes of dish categories and names in exclusive
-- mode, so that a mart row is never computed from a dictionary state that
-- a concurrent transaction is changing.
CREATE FUNCTION dwh.dictionary_lock_key() RETURNS bigint
    AS 'MODULE_PATHNAME', 'dwh_dictionary_lock_key'
    LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION dwh.dictionary_lock_key() IS
    'Advisory lock key serialising dish category and name changes against order batches';

-- Writers of user values take this one exclusively: the satellite row of
-- a version time is chosen among the values stored in stg.users and
-- stg.user_history, so two writers of the same user take turns.
CREATE FUNCTION dwh.user_lock_key() RETURNS bigint
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS 'SELECT 7238964021746305794::pg_catalog.int8';
COMMENT ON FUNCTION dwh.user_lock_key() IS
    'Advisory lock key serialising writers of user values';

-- dwh's locks are advisory locks that no SQL function but this one takes
-- (src/dwh_locks.c): pg_advisory_lock() and its kin are PUBLIC's, and a
-- role holding dwh's keys with them would stop every writer.
CREATE FUNCTION dwh.xact_lock(key bigint, exclusive boolean) RETURNS void
    AS 'MODULE_PATHNAME', 'dwh_xact_lock'
    LANGUAGE C STRICT;
COMMENT ON FUNCTION dwh.xact_lock(bigint, boolean) IS
    'Internal: take dwh''s lock of this key (dwh.dictionary_lock_key(), dwh.user_lock_key(), dwh.tag_lock_key()) until the transaction ends, exclusive or shared; not the lock pg_advisory_xact_lock() takes';
