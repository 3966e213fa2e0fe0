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
 * A transaction that holds the tag lock exclusive (it changed a rule) and
 * then writes orders, users or menus takes the dictionary lock exclusive
 * before its first row, or is refused at once (the order tables' trigger,
 * and dwh.stg_dictionary_statement_lock() on those of users and
 * restaurants): waiting would be out of the lock order.
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

/*
 * Does another session hold (granted, not merely wait for) dwh's lock of
 * this tag in a mode that conflicts with mode?  Prepared transactions
 * count.
 */
static bool
held_by_another(const LOCKTAG *tag, LOCKMODE mode)
{
	int			count = 0;
	VirtualTransactionId *conflicts = GetLockConflicts(tag, mode, &count);

	pfree(conflicts);
	return count > 0;
}

/*
 * The tag lock exclusive, in a transaction that holds it shared: its
 * batches (orders, menus, users) took it shared, then their rows; a rule
 * change (or dwh.expire_tags(), dwh.rebuild()) after them would wait for
 * another session's batch that holds it shared and may wait for those
 * rows.  The lock order puts the exclusive tag lock first: such a
 * transaction gets it only if no other session holds it, else it is
 * refused at once, rather than one of the two being ended by the deadlock
 * detector (a script that loads and defines rules alone still runs).
 *
 * Sessions that only wait for the lock (a rule change, or the tags
 * worker's expiry pass, asking for it exclusive; batches queued behind
 * them) do not stop it: LockAcquire() without waiting refuses any request
 * that conflicts with a waiter, but the waiters wait for this
 * transaction's shared hold, so a request that waits is put ahead of them
 * and granted at once.  (Refused whenever a rule change or the expiry was
 * queued, the transaction was told that another session's batch held the
 * lock, which none did: test/isolation/specs/menu_tags_concurrency.spec,
 * m_rule.)  A waiter that gives up between the look and the request may
 * let a batch in, which this request then waits for: the deadlock
 * detector's case, as before the refusal existed.
 */
static void
tag_lock_upgrade(const LOCKTAG *tag)
{
	if (LockAcquire(tag, ExclusiveLock, false, true) != LOCKACQUIRE_NOT_AVAIL)
		return;
	if (held_by_another(tag, ExclusiveLock))
		ereport(ERROR,
				(errcode(ERRCODE_LOCK_NOT_AVAILABLE),
				 errmsg("could not take the tag lock exclusive: another session's batch holds it"),
				 errdetail("This transaction wrote orders, menus or users before changing tag rules, expiring tags or rebuilding; waiting now could deadlock with that batch."),
				 errhint("Change tag rules, expire tags and rebuild in a transaction of their own.")));
	(void) LockAcquire(tag, ExclusiveLock, false, false);
}

/*
 * The dictionary lock, in a transaction that holds the tag lock exclusive
 * (it changed a tag rule, expired or rebuilt tags) and now writes orders
 * or menus, or rebuilds: step 1 of the lock order after step 3.  Every
 * other session that holds the dictionary lock is a writer of orders or
 * menus that has not reached the tag lock (this transaction holds it) and
 * will wait for it there, holding the dictionary lock, its keys and its
 * rows: waiting for its lock, or for a key or row it holds, is a deadlock.
 * So the lock is taken exclusive whatever the mode asked (no other writer
 * of orders or menus then holds anything a batch of this transaction may
 * wait for), and never waited for: refused at once if another session
 * holds it.  (Waiting, a rule change followed by a menu or an order batch
 * in the same transaction deadlocked with a batch or menu between its
 * dictionary lock and its tag lock, the other session ended after
 * deadlock_timeout: test/isolation/specs/menu_tags_concurrency.spec,
 * r_menu and r_load.)  A transaction holding the lock shared and no other
 * session holding it waits for the waiters only, and is put ahead of them.
 */
static void
dictionary_lock_after_tag_lock(const LOCKTAG *tag)
{
	if (LockHeldByMe(tag, ExclusiveLock))
		return;
	if (LockAcquire(tag, ExclusiveLock, false, true) != LOCKACQUIRE_NOT_AVAIL)
		return;
	if (!LockHeldByMe(tag, ShareLock) || held_by_another(tag, ExclusiveLock))
		ereport(ERROR,
				(errcode(ERRCODE_LOCK_NOT_AVAILABLE),
				 errmsg("could not take the dictionary lock: another session's batch or menu change holds it"),
				 errdetail("This transaction changed tag rules, expired or rebuilt tags before writing orders or menus or rebuilding; that session waits for the tag lock this transaction holds."),
				 errhint("Change tag rules, expire tags and rebuild in a transaction of their own.")));
	(void) LockAcquire(tag, ExclusiveLock, false, false);
}

/* Does this transaction hold the tag lock exclusive? */
static bool
tag_lock_held_exclusive(void)
{
	LOCKTAG		tag;

	dwh_locktag(&tag, DWH_TAG_LOCK_KEY);
	return LockHeldByMe(&tag, ExclusiveLock);
}

/*
 * The dictionary lock in this mode, unless this transaction holds it so
 * already (see dictionary_lock_after_tag_lock for a transaction that holds
 * the tag lock exclusive).
 */
static void
dictionary_lock(LOCKMODE mode)
{
	LOCKTAG		tag;

	dictionary_locktag(&tag);
	if (tag_lock_held_exclusive())
		dictionary_lock_after_tag_lock(&tag);
	else
		(void) LockAcquire(&tag, mode, false, false);
}

PG_FUNCTION_INFO_V1(dwh_xact_lock);

/*
 * dwh.xact_lock(key bigint, exclusive boolean) returns void
 *
 * Take dwh's lock of that key until the transaction ends, exclusive or
 * shared, waiting for it as pg_advisory_xact_lock() does (lock_timeout,
 * deadlock detection); but for the two requests that would take the locks
 * out of order, the tag lock exclusive after it shared
 * (tag_lock_upgrade) and the dictionary lock after the tag lock exclusive
 * (dictionary_lock_after_tag_lock), which are refused rather than waited
 * for where waiting could deadlock.  (The dictionary lock is upgraded by
 * design: a batch that finds it renames a dish takes it exclusive, README
 * "Concurrency".)
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
		tag_lock_upgrade(&tag);
		PG_RETURN_VOID();
	}
	if (key == DWH_DICTIONARY_LOCK_KEY)
	{
		dictionary_lock(exclusive ? ExclusiveLock : ShareLock);
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
 * a dish, and by then it holds rows that a batch may wait for.  After the
 * tag lock exclusive it is refused rather than waited for, as
 * dwh.xact_lock() does (dictionary_lock_after_tag_lock), also when the
 * transaction holds it shared: the rows come before the batch's claim.
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
	if (tag_lock_held_exclusive())
		dictionary_lock_after_tag_lock(&tag);
	else if (!LockHeldByMe(&tag, ExclusiveLock) && !LockHeldByMe(&tag, ShareLock))
		(void) LockAcquire(&tag, ExclusiveLock, false, false);
	return PointerGetDatum(NULL);
}

PG_FUNCTION_INFO_V1(dwh_stg_dictionary_statement_lock);

/*
 * dwh.stg_dictionary_statement_lock() trigger: BEFORE STATEMENT on the
 * tables of users and restaurants (current values and history).
 *
 * Their writers take no dictionary lock before their rows: a menu takes it
 * in its AFTER statement trigger, once its restaurants' rows are locked,
 * users take the user lock, and a refresh of unchanged values takes
 * nothing.  In a transaction that holds the tag lock exclusive (it changed
 * a tag rule, expired or rebuilt tags) that order waits for what another
 * session's batch or menu change holds before it waits for the tag lock:
 * a user's hub that a batch naming the user first inserted, a restaurant's
 * row that a menu change upserted.  Such a transaction takes the
 * dictionary lock here, before any row, as a write of orders does in
 * dwh_stg_statement_lock: exclusive, and refused at once if another
 * session holds it (dictionary_lock_after_tag_lock).  (A user's value or a
 * menu written after a rule change in the same transaction deadlocked with
 * a batch naming the user first, or a change of the same menu:
 * test/isolation/specs/menu_tags_concurrency.spec, r_user and r_menu1.)
 * Any other transaction takes nothing here.
 */
Datum
dwh_stg_dictionary_statement_lock(PG_FUNCTION_ARGS)
{
	TriggerData *trigdata = (TriggerData *) fcinfo->context;
	LOCKTAG		tag;

	if (!CALLED_AS_TRIGGER(fcinfo) ||
		!TRIGGER_FIRED_BEFORE(trigdata->tg_event) ||
		!TRIGGER_FIRED_FOR_STATEMENT(trigdata->tg_event))
		elog(ERROR, "dwh_stg_dictionary_statement_lock: must be a BEFORE STATEMENT trigger");

	if (tag_lock_held_exclusive())
	{
		dictionary_locktag(&tag);
		dictionary_lock_after_tag_lock(&tag);
	}
	return PointerGetDatum(NULL);
}
