/*-------------------------------------------------------------------------
 *
 * dwh_dictionary_lock.c
 *	  The dictionary lock: the first step of the lock order.
 *
 * Every writer of orders takes it first (install/40_products.sql, "Lock
 * order"): shared for a batch that keeps every dish's name, exclusive for
 * one that renames a dish and for menus.  dwh.ingest_orders takes it in the
 * mode its batch needs; any other statement that writes the order tables
 * takes it exclusive before its first row (dwh.stg_statement_lock()).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "commands/trigger.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "storage/lock.h"

/*
 * The dictionary lock (install/00_prelude.sql, dwh.dictionary_lock_key()):
 * the transaction-level advisory lock that pg_advisory_xact_lock() takes.
 */
#define DWH_DICTIONARY_LOCK_KEY INT64CONST(7238964021746305793)

PG_FUNCTION_INFO_V1(dwh_dictionary_lock_key);

/*
 * dwh.dictionary_lock_key() returns bigint: the key, for SQL.
 */
Datum
dwh_dictionary_lock_key(PG_FUNCTION_ARGS)
{
	PG_RETURN_INT64(DWH_DICTIONARY_LOCK_KEY);
}

static void
dictionary_locktag(LOCKTAG *tag)
{
	/* As pg_advisory_xact_lock(bigint) names it. */
	SET_LOCKTAG_ADVISORY(*tag, MyDatabaseId,
						 (uint32) (DWH_DICTIONARY_LOCK_KEY >> 32),
						 (uint32) DWH_DICTIONARY_LOCK_KEY, 1);
}

PG_FUNCTION_INFO_V1(dwh_dictionary_lock_exclusive);

/*
 * dwh.dictionary_lock_exclusive() returns boolean
 *
 * Does this transaction hold the dictionary lock exclusively?
 */
Datum
dwh_dictionary_lock_exclusive(PG_FUNCTION_ARGS)
{
	LOCKTAG		tag;

	dictionary_locktag(&tag);
	PG_RETURN_BOOL(LockHeldByMe(&tag, ExclusiveLock));
}

PG_FUNCTION_INFO_V1(dwh_stg_statement_lock);

/*
 * dwh.stg_statement_lock() trigger: BEFORE STATEMENT on the order tables.
 *
 * The first step of the lock order (install/40_products.sql) is the
 * dictionary lock, before any row.  dwh.ingest_orders takes it before its
 * statements, in the mode its batch needs; any other statement that writes
 * orders (a DBA's INSERT, COPY or upsert, a restore) takes it here,
 * exclusively, because only its AFTER triggers will know whether it renames
 * a dish, and by then it holds rows that a batch may wait for.
 */
Datum
dwh_stg_statement_lock(PG_FUNCTION_ARGS)
{
	TriggerData *trigdata = (TriggerData *) fcinfo->context;
	LOCKTAG		tag;

	if (!CALLED_AS_TRIGGER(fcinfo) ||
		!TRIGGER_FIRED_BEFORE(trigdata->tg_event) ||
		!TRIGGER_FIRED_FOR_STATEMENT(trigdata->tg_event))
		elog(ERROR, "dwh_stg_statement_lock: must be a BEFORE STATEMENT trigger");

	dictionary_locktag(&tag);
	if (!LockHeldByMe(&tag, ExclusiveLock) && !LockHeldByMe(&tag, ShareLock))
		(void) LockAcquire(&tag, ExclusiveLock, false, false);
	return PointerGetDatum(NULL);
}
