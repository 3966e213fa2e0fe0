/*-------------------------------------------------------------------------
 *
 * dwh_trust.c
 *	  Only superusers may change what dwh's schemas hold.
 *
 * dwh's functions run as a superuser: the definer functions as their owner,
 * every function for the workers (which run as the bootstrap superuser),
 * and the triggers of STG for whoever writes it.  They call one another by
 * schema-qualified name, and PostgreSQL resolves such a call among every
 * function of that name in the schema: a role that may create objects in
 * schema dwh can add an overload that matches a call's argument types
 * better (dwh.menu_name_at(varchar, ...) beside (text, ...)), and the owner
 * of a schema can replace anything in it.  CREATE EXTENSION refuses a schema
 * dwh that is not safe; after it, a superuser may still give a schema away
 * (ALTER SCHEMA ... OWNER, REASSIGN OWNED, which hands over every function
 * and table too) or grant CREATE on it.  So the workers check before every
 * unit of work, and the ingest functions before every call, that each of
 * the four schemas belongs to a superuser, that no other role, PUBLIC
 * included, may create objects in it, and that every function, relation,
 * type and operator in it belongs to a superuser (one made while another
 * role could create objects there stays).  The schemas are checked in the
 * catalog caches, a few lookups a batch; the objects with one query, again
 * only once the catalog rows of functions, relations, types or roles have
 * changed (a cache invalidation callback says so).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "catalog/pg_namespace.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "utils/acl.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/inval.h"
#include "utils/syscache.h"

#include "dwh_trust.h"

static const char *const dwh_schemas[] = {"dwh", "stg", "dds", "cdm", NULL};

/* A role's name, or its OID if it has none any more. */
static const char *
role_name(Oid role)
{
	char	   *name = GetUserNameFromId(role, true);

	return name != NULL ? quote_identifier(name) : psprintf("with OID %u", role);
}

/*
 * What makes one schema unsafe, or NULL; *fix says how to make it safe (a
 * hint).
 */
static char *
schema_problem(const char *schema, char **fix)
{
	HeapTuple	tuple;
	Form_pg_namespace form;
	Datum		acl_datum;
	bool		isnull;
	char	   *problem = NULL;

	tuple = SearchSysCache1(NAMESPACENAME, CStringGetDatum(schema));
	if (!HeapTupleIsValid(tuple))
		return NULL;
	form = (Form_pg_namespace) GETSTRUCT(tuple);
	if (!superuser_arg(form->nspowner))
	{
		problem = psprintf("schema %s is owned by role %s, which is not a superuser",
						   schema, role_name(form->nspowner));
		*fix = psprintf("Give the schema to a superuser (ALTER SCHEMA %s OWNER TO ...); dwh goes on by itself.",
						schema);
	}
	acl_datum = SysCacheGetAttr(NAMESPACENAME, tuple, Anum_pg_namespace_nspacl,
								&isnull);
	if (problem == NULL && !isnull)
	{
		Acl		   *acl = DatumGetAclP(acl_datum);
		AclItem    *items = ACL_DAT(acl);
		int			i;

		for (i = 0; i < ACL_NUM(acl) && problem == NULL; i++)
		{
			Oid			grantee = items[i].ai_grantee;

			if ((ACLITEM_GET_PRIVS(items[i]) & ACL_CREATE) == 0)
				continue;
			if (grantee == ACL_ID_PUBLIC)
			{
				problem = psprintf("PUBLIC may create objects in schema %s", schema);
				*fix = psprintf("Run REVOKE CREATE ON SCHEMA %s FROM PUBLIC; dwh goes on by itself.",
								schema);
			}
			else if (!superuser_arg(grantee))
			{
				problem = psprintf("role %s may create objects in schema %s, and is not a superuser",
								   role_name(grantee), schema);
				*fix = psprintf("Run REVOKE CREATE ON SCHEMA %s FROM %s; dwh goes on by itself.",
								schema, role_name(grantee));
			}
		}
	}
	ReleaseSysCache(tuple);
	return problem;
}

/*
 * Catalog changes seen (of functions, relations, types, operators, roles),
 * and how many had been seen when the last check of the objects found
 * nothing wrong: the check is made again only after a change.
 */
static uint64 catalog_changes = 1;
static uint64 changes_checked = 0;
static bool callbacks_registered = false;

static void
count_catalog_change(Datum arg, int cacheid, uint32 hashvalue)
{
	catalog_changes++;
}

/*
 * A function, relation, type, operator or extension of dwh's schemas owned
 * by a role that is not a superuser (one it made while it could create
 * objects there, one handed over, or a trusted extension it created there,
 * whose objects the bootstrap superuser owns but whose updates and removal
 * are its own), or NULL.
 */
static char *
object_problem(char **fix)
{
	char	   *problem = NULL;
	uint64		seen;
	MemoryContext caller;

	if (!callbacks_registered)
	{
		CacheRegisterSyscacheCallback(PROCOID, count_catalog_change, (Datum) 0);
		CacheRegisterSyscacheCallback(RELOID, count_catalog_change, (Datum) 0);
		CacheRegisterSyscacheCallback(TYPEOID, count_catalog_change, (Datum) 0);
		CacheRegisterSyscacheCallback(OPEROID, count_catalog_change, (Datum) 0);
		CacheRegisterSyscacheCallback(AUTHOID, count_catalog_change, (Datum) 0);
		callbacks_registered = true;
	}
	if (changes_checked == catalog_changes)
		return NULL;

	/* Counted first: a change seen while the query runs asks for another. */
	seen = catalog_changes;
	caller = CurrentMemoryContext;
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	if (SPI_execute("SELECT pg_catalog.pg_describe_object(o.classid, o.objid, 0),"
					"       pg_catalog.quote_ident(r.rolname)"
					" FROM (SELECT 'pg_catalog.pg_proc'::pg_catalog.regclass AS classid,"
					"              p.oid AS objid, p.proowner AS owner, p.pronamespace AS nsp"
					"       FROM pg_catalog.pg_proc p"
					"       UNION ALL"
					"       SELECT 'pg_catalog.pg_class'::pg_catalog.regclass, c.oid,"
					"              c.relowner, c.relnamespace"
					"       FROM pg_catalog.pg_class c"
					"       UNION ALL"
					"       SELECT 'pg_catalog.pg_type'::pg_catalog.regclass, t.oid,"
					"              t.typowner, t.typnamespace"
					"       FROM pg_catalog.pg_type t"
					"       UNION ALL"
					"       SELECT 'pg_catalog.pg_operator'::pg_catalog.regclass, o.oid,"
					"              o.oprowner, o.oprnamespace"
					"       FROM pg_catalog.pg_operator o"
					"       UNION ALL"
					"       SELECT 'pg_catalog.pg_extension'::pg_catalog.regclass, e.oid,"
					"              e.extowner, e.extnamespace"
					"       FROM pg_catalog.pg_extension e) o"
					" JOIN pg_catalog.pg_namespace n ON n.oid = o.nsp"
					" JOIN pg_catalog.pg_roles r ON r.oid = o.owner"
					" WHERE n.nspname IN ('dwh', 'stg', 'dds', 'cdm') AND NOT r.rolsuper"
					" LIMIT 1", true, 1) != SPI_OK_SELECT)
		elog(ERROR, "could not read the owners of the objects of dwh's schemas");
	if (SPI_processed > 0)
	{
		char	   *object = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1);
		char	   *owner = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2);

		problem = MemoryContextStrdup(caller,
									  psprintf("%s is owned by role %s, which is not a superuser",
											   object, owner));
		*fix = MemoryContextStrdup(caller,
								   psprintf("Drop the object if dwh did not create it, else give it to a superuser (REASSIGN OWNED BY %s TO a superuser gives all it owns); dwh goes on by itself.",
											owner));
	}
	else
		changes_checked = seen;
	SPI_finish();
	return problem;
}

/*
 * dwh_schemas_unsafe
 *		What makes one of dwh's schemas, or one of its objects, unsafe, or
 *		NULL; *fix says how to make it safe (a hint).  In a transaction.
 */
char *
dwh_schemas_unsafe(char **fix)
{
	int			i;

	for (i = 0; dwh_schemas[i] != NULL; i++)
	{
		char	   *problem = schema_problem(dwh_schemas[i], fix);

		if (problem != NULL)
			return problem;
	}
	return object_problem(fix);
}

/*
 * dwh_require_safe_schemas
 *		Refuse to go on while a role other than a superuser may change what
 *		one of dwh's schemas holds.
 */
void
dwh_require_safe_schemas(void)
{
	char	   *fix;
	char	   *problem = dwh_schemas_unsafe(&fix);

	if (problem != NULL)
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("dwh does not run while %s", problem),
				 errdetail("dwh's functions run as a superuser and call one another by name; a role that may create objects in their schemas could put functions of its own in their place."),
				 errhint("%s", fix)));
}
