/*-------------------------------------------------------------------------
 *
 * dwh_locks.c
 *	  dwh's transaction locks: the dictionary lock, the user lock and the
 *	  tag lock, which no other role can take.
 *
 * Every writer of orders takes the dictionary lock first (install/
 * 40_products.sql, "Lock order"): shared for a batch that keeps every
 * dish's name, exclusive for one that renames a dish and for menus.
 * dwh.ingest_orders takes it in the mode its batch needs; any other
 * statement that writes the order tables takes it exclusive before its
 * first row (dwh.stg_statement_lock()).  Writers of user values take the
 * user lock, and rule changes and the tag step of batches the tag lock.
 *
 * They are advisory locks of the database, named by their key (dwh.
 * dictionary_lock_key(), dwh.user_lock_key(), dwh.tag_lock_key()), but not
 * the ones pg_advisory_lock() and its kin take: those are PUBLIC's, and
 * any role that can connect could hold dwh's and stop every writer.  The
 * fourth field of the lock tag, 1 and 2 for the SQL functions' two kinds
 * of key, is DWH_LOCK_KIND here, which no SQL function reaches; pg_locks
 * shows them as advisory locks with objsubid 3.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "commands/trigger.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "storage/lock.h"

/*
 * The dictionary lock (install/00_prelude.sql, dwh.dictionary_lock_key()).
 */
#define DWH_DICTIONARY_LOCK_KEY INT64CONST(7238964021746305793)

/* The tag lock (install/77_tags.sql, dwh.tag_lock_key()). */
#define DWH_TAG_LOCK_KEY INT64CONST(3482019573612840177)

/* The fourth field of dwh's lock tags: not 1 or 2, the SQL functions'. */
#define DWH_LOCK_KIND 3

static void
dwh_locktag(LOCKTAG *tag, int64 key)
{
	SET_LOCKTAG_ADVISORY(*tag, MyDatabaseId, (uint32) (key >> 32),
						 (uint32) key, DWH_LOCK_KIND);
}

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
	dwh_locktag(tag, DWH_DICTIONARY_LOCK_KEY);
}

PG_FUNCTION_INFO_V1(dwh_xact_lock);

/*
 * dwh.xact_lock(key bigint, exclusive boolean) returns void
 *
 * Take dwh's lock of that key until the transaction ends, exclusive or
 * shared, waiting for it as pg_advisory_xact_lock() does (lock_timeout,
 * deadlock detection).
 *
 * A transaction that holds the tag lock shared does not wait to take it
 * exclusive: its batches (orders, menus, users) took it shared, then their
 * rows; a rule change (or dwh.expire_tags(), dwh.rebuild()) after them
 * would wait for another session's batch that holds it shared and may wait
 * for those rows.  The lock order puts the exclusive tag lock first: such a
 * transaction gets it only if no other session holds it, else it is
 * refused at once, rather than one of the two being ended by the deadlock
 * detector (a script that loads and defines rules alone still runs).  (The
 * dictionary lock is upgraded by design: a batch that finds it renames a
 * dish takes it exclusive, README "Concurrency".)
 */
Datum
dwh_xact_lock(PG_FUNCTION_ARGS)
{
	LOCKTAG		tag;
	int64		key = PG_GETARG_INT64(0);
	bool		exclusive = PG_GETARG_BOOL(1);

	dwh_locktag(&tag, key);
	if (exclusive && key == DWH_TAG_LOCK_KEY &&
		LockHeldByMe(&tag, ShareLock) && !LockHeldByMe(&tag, ExclusiveLock))
	{
		if (LockAcquire(&tag, ExclusiveLock, false, true) == LOCKACQUIRE_NOT_AVAIL)
			ereport(ERROR,
					(errcode(ERRCODE_LOCK_NOT_AVAILABLE),
					 errmsg("could not take the tag lock exclusive: another session's batch holds it"),
					 errdetail("This transaction wrote orders, menus or users before changing tag rules, expiring tags or rebuilding; waiting now could deadlock with that batch."),
					 errhint("Change tag rules, expire tags and rebuild in a transaction of their own.")));
		PG_RETURN_VOID();
	}
	(void) LockAcquire(&tag, exclusive ? ExclusiveLock : ShareLock,
					   false, false);
	PG_RETURN_VOID();
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
