/*-------------------------------------------------------------------------
 *
 * dwh_version.c
 *	  The version of the extension's SQL objects in this database against
 *	  the version of this library.
 *
 * One library serves every version of the schema.  Once a new package is
 * installed and the server restarted, a database keeps the schema of the
 * version it had until ALTER EXTENSION dwh UPDATE runs there.  Meanwhile
 * the C functions that the older SQL declares still resolve, with the
 * arguments it gives them (docs/upgrades.md), and nothing runs this
 * version's SQL against the older schema: the background workers wait,
 * the ingest functions refuse, and the STG guard keeps the older schema's
 * rule for a superseded version.  Reading, dwh.verify(), dwh.kafka_seek()
 * and the STG triggers of the older schema work as before.
 *
 * ALTER EXTENSION UPDATE sets pg_extension.extversion before it runs the
 * update script, so the script already sees the new version.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/genam.h"
#include "access/htup_details.h"
#include "access/table.h"
#include "access/xact.h"
#include "catalog/pg_extension.h"
#include "utils/builtins.h"
#include "utils/fmgroids.h"
#include "utils/rel.h"

#include "dwh_version.h"

/* The Makefile's EXTVERSION, which dwh.control's default_version equals. */
const char *const dwh_library_version = DWH_EXTVERSION;

/*
 * dwh_installed_version
 *		extversion of extension dwh in this database, or NULL when it is not
 *		created.  Runs inside a transaction; the result is palloc'd.
 */
char *
dwh_installed_version(void)
{
	Relation	rel;
	ScanKeyData key;
	SysScanDesc scan;
	HeapTuple	tuple;
	char	   *version = NULL;

	rel = table_open(ExtensionRelationId, AccessShareLock);
	ScanKeyInit(&key, Anum_pg_extension_extname, BTEqualStrategyNumber,
				F_NAMEEQ, CStringGetDatum("dwh"));
	scan = systable_beginscan(rel, ExtensionNameIndexId, true, NULL, 1, &key);
	tuple = systable_getnext(scan);
	if (HeapTupleIsValid(tuple))
	{
		bool		isnull;
		Datum		datum = heap_getattr(tuple, Anum_pg_extension_extversion,
										 RelationGetDescr(rel), &isnull);

		if (!isnull)
			version = text_to_cstring(DatumGetTextPP(datum));
	}
	systable_endscan(scan);
	table_close(rel, AccessShareLock);
	return version;
}

/* Is an installed version (NULL: not created) another than the library's? */
static bool
is_other_version(const char *installed)
{
	return installed != NULL && strcmp(installed, dwh_library_version) != 0;
}

/*
 * dwh_schema_mismatch
 *		For a background worker, between transactions: NULL when extension
 *		dwh in this database is at this library's version (or not created:
 *		the worker says so itself), else the version it is at.  Runs in a
 *		transaction of its own; the result is in the caller's memory
 *		context.
 */
char *
dwh_schema_mismatch(void)
{
	MemoryContext caller = CurrentMemoryContext;
	char	   *installed;
	char	   *mismatch = NULL;

	StartTransactionCommand();
	installed = dwh_installed_version();
	if (is_other_version(installed))
		mismatch = MemoryContextStrdup(caller, installed);
	CommitTransactionCommand();
	MemoryContextSwitchTo(caller);
	return mismatch;
}

/*
 * dwh_schema_wait_state
 *		The state a background worker publishes while the schema is at
 *		another version (it fits in dwh.status's state).
 */
char *
dwh_schema_wait_state(const char *installed)
{
	return psprintf("waiting: extension dwh is at version %s, its library at %s: run ALTER EXTENSION dwh UPDATE",
					installed, dwh_library_version);
}

/*
 * dwh_schema_wait_hint
 *		The hint of the log line that goes with it.
 */
char *
dwh_schema_wait_hint(const char *database)
{
	return psprintf("Run ALTER EXTENSION dwh UPDATE in database \"%s\"; the worker goes on by itself within seconds.",
					database);
}

/*
 * dwh_schema_is_current
 *		Is extension dwh in this database at this library's version (or not
 *		created)?  In a transaction.
 */
bool
dwh_schema_is_current(void)
{
	return !is_other_version(dwh_installed_version());
}

/*
 * dwh_require_current_schema
 *		Refuse to go on unless extension dwh in this database is at this
 *		library's version: for entry points that run SQL an older schema
 *		lacks.
 */
void
dwh_require_current_schema(void)
{
	char	   *installed = dwh_installed_version();

	if (is_other_version(installed))
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("extension dwh is at version %s in this database, but its library is version %s",
						installed, dwh_library_version),
				 errdetail("The library was upgraded and the extension's SQL objects were not."),
				 errhint("Run ALTER EXTENSION dwh UPDATE in this database.")));
}

/*
 * dwh_schema_keeps_history
 *		Does the schema in this database keep superseded versions of STG
 *		rows?  Version 1.0 has no history tables and dropped them; until
 *		ALTER EXTENSION dwh UPDATE, a 1.0 schema still does.
 */
bool
dwh_schema_keeps_history(void)
{
	char	   *installed = dwh_installed_version();

	return installed == NULL || strcmp(installed, "1.0") != 0;
}
