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
 * So is a transaction's later write: one write of orders, menus or users
 * (a batch, a statement writing an STG table) takes its locks in the
 * order, but a later one in the same transaction starts that order again
 * while holding the rows of the first, which another session's batch may
 * be waiting for.  Such a write takes the dictionary lock and the user
 * lock exclusive before its first row, or is refused at once if another
 * session holds or waits for either (later_write_locks()).  For that,
 * every writer takes one of them before its first row: writers of users
 * and restaurants too (the user lock, the dictionary lock exclusive), and
 * batches that store only other events or dead letters (the dictionary
 * lock shared); a session waiting for them holds no row.
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

#include "access/xact.h"
#include "commands/trigger.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "storage/lock.h"
#include "utils/fmgrprotos.h"
#include "utils/rel.h"

#include "dwh_locks.h"

/*
 * The dictionary lock (install/00_prelude.sql, dwh.dictionary_lock_key()).
 */
#define DWH_DICTIONARY_LOCK_KEY INT64CONST(7238964021746305793)

/* The user lock (install/00_prelude.sql, dwh.user_lock_key()). */
#define DWH_USER_LOCK_KEY INT64CONST(7238964021746305794)

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
 * The tag lock exclusive, in a transaction that holds it shared, or the
 * dictionary lock shared only (a batch that stored only other events or
 * dead letters, which takes no tag lock): its batches took it shared (or
 * not at all), then their rows; a rule
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
 * Take dwh's lock of this tag exclusive without waiting for another
 * session, or say that it cannot be had.  A transaction that holds the
 * lock shared, and no other session holding it, waits only for sessions
 * that ask for it (which wait for this transaction's hold) and is put
 * ahead of them.
 */
static bool
lock_exclusive_at_once(const LOCKTAG *tag)
{
	if (LockHeldByMe(tag, ExclusiveLock))
		return true;
	if (LockAcquire(tag, ExclusiveLock, false, true) != LOCKACQUIRE_NOT_AVAIL)
		return true;
	if (!LockHeldByMe(tag, ShareLock) || held_by_another(tag, ExclusiveLock))
		return false;
	(void) LockAcquire(tag, ExclusiveLock, false, false);
	return true;
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
	if (!lock_exclusive_at_once(tag))
		ereport(ERROR,
				(errcode(ERRCODE_LOCK_NOT_AVAILABLE),
				 errmsg("could not take the dictionary lock: another session's batch or menu change holds it"),
				 errdetail("This transaction changed tag rules, expired or rebuilt tags before ingesting orders, writing menus or users, or rebuilding; that session waits for the tag lock this transaction holds."),
				 errhint("Change tag rules, expire tags and rebuild in a transaction of their own.")));
}

/*
 * The user lock, in a transaction that holds the tag lock exclusive and
 * now writes users or writes orders directly (not in an ingest): the user
 * lock comes before the tag lock in the lock order (dwh.rebuild() takes
 * the dictionary lock, the user lock, then the tag lock), and a writer of
 * users that then changes a tag rule holds it while it waits for the tag
 * lock.  Taken at once, or refused.
 */
static void
user_lock_after_tag_lock(void)
{
	LOCKTAG		tag;

	dwh_locktag(&tag, DWH_USER_LOCK_KEY);
	if (!lock_exclusive_at_once(&tag))
		ereport(ERROR,
				(errcode(ERRCODE_LOCK_NOT_AVAILABLE),
				 errmsg("could not take the user lock: another session's write of users or direct write of orders holds it"),
				 errdetail("This transaction changed tag rules, expired or rebuilt tags before writing users or writing orders directly; that session may wait for the tag lock this transaction holds."),
				 errhint("Change tag rules, expire tags and rebuild in a transaction of their own.")));
}

/* Does this transaction hold the dictionary lock exclusive? */
static bool
dictionary_lock_held_exclusive(void)
{
	LOCKTAG		tag;

	dictionary_locktag(&tag);
	return LockHeldByMe(&tag, ExclusiveLock);
}

/* Does this transaction hold the dictionary lock shared, not exclusive? */
static bool
dictionary_lock_held_shared_only(void)
{
	LOCKTAG		tag;

	dictionary_locktag(&tag);
	return LockHeldByMe(&tag, ShareLock) && !LockHeldByMe(&tag, ExclusiveLock);
}

/* Does this transaction hold the user lock exclusive? */
static bool
user_lock_held_exclusive(void)
{
	LOCKTAG		tag;

	dwh_locktag(&tag, DWH_USER_LOCK_KEY);
	return LockHeldByMe(&tag, ExclusiveLock);
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

/*
 * The first write of orders, menus or users in this transaction: the
 * subtransaction that began it (invalid: none yet, or it was rolled back,
 * and its locks and rows with it).  A write is a call of dwh_ingest_batch()
 * (dwh.ingest_orders(), dwh.ingest_order(), a Kafka worker's batch), a
 * statement writing an STG table of orders, users or restaurants, or a
 * function taking the dictionary lock outside of these (dwh.rebuild(),
 * dwh.replay_dead_letters()); what they run themselves (the claim of a
 * batch, the history a trigger writes) is part of them.
 */
static SubTransactionId first_write_subxact = InvalidSubTransactionId;
static bool write_callbacks_registered = false;

/* Calls of dwh_ingest_batch() under way in this backend. */
static int	ingest_depth = 0;

/*
 * The table and command of the last statement whose BEFORE STATEMENT
 * trigger began a write: an INSERT ... ON CONFLICT DO UPDATE fires the
 * INSERT and the UPDATE ones, a single write.
 */
static Oid	write_statement_table = InvalidOid;
static CommandId write_statement_command = InvalidCommandId;

static void
first_write_xact_callback(XactEvent event, void *arg)
{
	first_write_subxact = InvalidSubTransactionId;
	write_statement_table = InvalidOid;
}

static void
first_write_subxact_callback(SubXactEvent event, SubTransactionId mySubid,
							 SubTransactionId parentSubid, void *arg)
{
	if (mySubid != first_write_subxact)
		return;
	if (event == SUBXACT_EVENT_ABORT_SUB)
	{
		first_write_subxact = InvalidSubTransactionId;
		write_statement_table = InvalidOid;
	}
	else if (event == SUBXACT_EVENT_COMMIT_SUB)
		first_write_subxact = parentSubid;
}

/*
 * A write begins: is it a later write of this transaction than its first?
 */
static bool
write_begins(void)
{
	if (first_write_subxact != InvalidSubTransactionId)
		return true;
	if (!write_callbacks_registered)
	{
		RegisterXactCallback(first_write_xact_callback, NULL);
		RegisterSubXactCallback(first_write_subxact_callback, NULL);
		write_callbacks_registered = true;
	}
	first_write_subxact = GetCurrentSubTransactionId();
	return false;
}

/* Does this transaction hold a write of orders, menus or users? */
static bool
wrote_before(void)
{
	return first_write_subxact != InvalidSubTransactionId;
}

/* pg_trigger_depth(): triggers under way, the caller's included. */
static int
trigger_depth(void)
{
	LOCAL_FCINFO(fcinfo, 0);

	InitFunctionCallInfoData(*fcinfo, NULL, 0, InvalidOid, NULL, NULL);
	return DatumGetInt32(pg_trigger_depth(fcinfo));
}

/*
 * Is this write of an STG history table the history that a trigger of the
 * current table writes (dwh.users_changed() and its kin), inside a write
 * of that table?  Those run in a trigger and hold the write's lock: the
 * dictionary lock exclusive for restaurants and orders, the user lock for
 * users.  A trigger of another table that writes history without them
 * begins a write of its own.
 */
static bool
history_of_write(const char *table, size_t len)
{
	if (len <= 8 || strcmp(table + len - 8, "_history") != 0 ||
		trigger_depth() <= 1)
		return false;
	if (strcmp(table, "user_history") == 0)
		return user_lock_held_exclusive();
	return dictionary_lock_held_exclusive();
}

/*
 * A BEFORE STATEMENT trigger of an STG table: does its statement begin a
 * later write (write_begins())?  Not if it is part of a write under way: a
 * batch's own statements, the history that a trigger of an STG table
 * writes, or the same statement as the trigger before (an upsert).
 */
static bool
statement_begins_later_write(TriggerData *trigdata)
{
	Relation	rel = trigdata->tg_relation;
	const char *table = RelationGetRelationName(rel);
	size_t		len = strlen(table);
	CommandId	command = GetCurrentCommandId(false);
	bool		same;

	if (ingest_depth > 0 || history_of_write(table, len))
		return false;
	same = wrote_before() &&
		write_statement_table == RelationGetRelid(rel) &&
		write_statement_command == command;
	write_statement_table = RelationGetRelid(rel);
	write_statement_command = command;
	return !same && write_begins();
}

/*
 * The locks of a later write of this transaction (write_begins()): its
 * first write holds rows of STG, DDS and the marts that another session's
 * batch, menu change or user write may wait for, and this write may need
 * rows that session holds.  Waiting for the dictionary lock or the user
 * lock behind such a session, or for its rows, would be a deadlock, one
 * of the two ended after deadlock_timeout.  So both locks are taken
 * exclusive before the write's first row, and never waited for: refused
 * at once if another session holds or asks for either.  Every writer of
 * orders, menus and users takes one of them before its first row and
 * keeps it until it commits: while this transaction holds both, no other
 * session holds a row this write may need.  (Waiting, a transaction that
 * wrote a user and then a batch of orders deadlocked with a batch naming
 * that user and a new dish: test/isolation/specs/later_writes.spec.)
 */
static void
later_write_locks(void)
{
	LOCKTAG		dictionary;
	LOCKTAG		users;

	dictionary_locktag(&dictionary);
	dwh_locktag(&users, DWH_USER_LOCK_KEY);
	if (!lock_exclusive_at_once(&dictionary) || !lock_exclusive_at_once(&users))
		ereport(ERROR,
				(errcode(ERRCODE_LOCK_NOT_AVAILABLE),
				 errmsg("could not write orders, menus or users again in this transaction: another session is writing or about to write them"),
				 errdetail("An earlier write of this transaction holds rows that session may wait for, and it holds or waits for the dictionary or user lock; waiting for it now could deadlock."),
				 errhint("Write orders, menus and users each in a transaction of its own, and a batch of orders in one call of dwh.ingest_orders().")));
}

/*
 * dwh_locks_ingest_begin
 *		A call of dwh_ingest_batch() begins: a write, unless one is under
 *		way (dwh_locks_ingest_end() when it ends, error or not).
 */
void
dwh_locks_ingest_begin(void)
{
	if (ingest_depth == 0 && write_begins())
		later_write_locks();
	ingest_depth++;
}

void
dwh_locks_ingest_end(void)
{
	Assert(ingest_depth > 0);
	ingest_depth--;
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
 * "Concurrency".)  The dictionary lock asked outside a batch begins a
 * write (dwh.rebuild(), dwh.replay_dead_letters()), unless a trigger asks
 * for it holding it exclusive: the claim or menu of a write of an STG
 * table, whose statement trigger took it.
 */
Datum
dwh_xact_lock(PG_FUNCTION_ARGS)
{
	LOCKTAG		tag;
	int64		key = PG_GETARG_INT64(0);
	bool		exclusive = PG_GETARG_BOOL(1);

	dwh_locktag(&tag, key);
	if (key == DWH_DICTIONARY_LOCK_KEY && ingest_depth == 0 &&
		(trigger_depth() == 0 || !dictionary_lock_held_exclusive()) &&
		write_begins())
	{
		later_write_locks();
		PG_RETURN_VOID();
	}
	if (exclusive && key == DWH_TAG_LOCK_KEY &&
		!LockHeldByMe(&tag, ExclusiveLock) &&
		(LockHeldByMe(&tag, ShareLock) || dictionary_lock_held_shared_only()))
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
	PG_RETURN_BOOL(dictionary_lock_held_exclusive());
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
 * a dish, and by then it holds rows that a batch may wait for.  Such a
 * statement takes the user lock exclusive too, as writers of users do:
 * its triggers insert user hubs in several passes (an upsert's UPDATE
 * trigger before its INSERT trigger, the history the guard writes row by
 * row, the chunks of a large statement), which a writer of users inserting
 * the same hubs in key order could wait for while holding one of them.
 * After the tag lock exclusive both are refused rather than waited for, as
 * dwh.xact_lock() does (dictionary_lock_after_tag_lock); the dictionary
 * lock also when the transaction holds it shared, since the rows come
 * before the batch's claim, and the user lock only when this statement
 * takes the dictionary lock itself.
 */
Datum
dwh_stg_statement_lock(PG_FUNCTION_ARGS)
{
	TriggerData *trigdata = (TriggerData *) fcinfo->context;
	LOCKTAG		tag;
	bool		held;

	if (!CALLED_AS_TRIGGER(fcinfo) ||
		!TRIGGER_FIRED_BEFORE(trigdata->tg_event) ||
		!TRIGGER_FIRED_FOR_STATEMENT(trigdata->tg_event))
		elog(ERROR, "dwh_stg_statement_lock: must be a BEFORE STATEMENT trigger");

	dictionary_locktag(&tag);
	held = LockHeldByMe(&tag, ExclusiveLock) || LockHeldByMe(&tag, ShareLock);
	if (statement_begins_later_write(trigdata))
		later_write_locks();
	else if (tag_lock_held_exclusive())
	{
		dictionary_lock_after_tag_lock(&tag);
		if (!held)
			user_lock_after_tag_lock();
	}
	else if (!held)
	{
		(void) LockAcquire(&tag, ExclusiveLock, false, false);
		dwh_locktag(&tag, DWH_USER_LOCK_KEY);
		(void) LockAcquire(&tag, ExclusiveLock, false, false);
	}
	return PointerGetDatum(NULL);
}

PG_FUNCTION_INFO_V1(dwh_stg_dictionary_statement_lock);

/*
 * dwh.stg_dictionary_statement_lock() trigger: BEFORE STATEMENT on the
 * tables of users and restaurants (current values and history).
 *
 * Their writers take their lock before their rows, as writers of orders
 * do: the user lock for users, the dictionary lock exclusive for menus
 * (which their AFTER statement triggers take again).  A session waiting
 * for either then holds no row that a later write of another transaction
 * may need (later_write_locks(); with the locks taken after the rows, a
 * transaction's second menu change could take both locks while another
 * session held that menu's row and was about to ask for them).  A refresh
 * of unchanged values takes them too; the Redis worker writes only
 * changed values.
 *
 * In a transaction that holds the tag lock exclusive (it changed a tag
 * rule, expired or rebuilt tags), waiting for the dictionary lock is a
 * deadlock with another session's batch or menu change, which waits for
 * the tag lock: the dictionary lock is taken exclusive and refused at
 * once if another session holds it (dictionary_lock_after_tag_lock).  (A
 * user's value or a menu written after a rule change in the same
 * transaction deadlocked with a batch naming the user first, or a change
 * of the same menu: test/isolation/specs/menu_tags_concurrency.spec,
 * r_user and r_menu1.)
 */
Datum
dwh_stg_dictionary_statement_lock(PG_FUNCTION_ARGS)
{
	TriggerData *trigdata = (TriggerData *) fcinfo->context;
	LOCKTAG		tag;
	const char *table;
	bool		users;

	if (!CALLED_AS_TRIGGER(fcinfo) ||
		!TRIGGER_FIRED_BEFORE(trigdata->tg_event) ||
		!TRIGGER_FIRED_FOR_STATEMENT(trigdata->tg_event))
		elog(ERROR, "dwh_stg_dictionary_statement_lock: must be a BEFORE STATEMENT trigger");

	table = RelationGetRelationName(trigdata->tg_relation);
	users = strcmp(table, "users") == 0 || strcmp(table, "user_history") == 0;
	if (statement_begins_later_write(trigdata))
	{
		later_write_locks();
		return PointerGetDatum(NULL);
	}
	dictionary_locktag(&tag);
	if (tag_lock_held_exclusive())
	{
		dictionary_lock_after_tag_lock(&tag);
		if (users)
			user_lock_after_tag_lock();
	}
	else
	{
		if (!users && !LockHeldByMe(&tag, ExclusiveLock))
			(void) LockAcquire(&tag, ExclusiveLock, false, false);
		if (users)
		{
			dwh_locktag(&tag, DWH_USER_LOCK_KEY);
			(void) LockAcquire(&tag, ExclusiveLock, false, false);
		}
	}
	return PointerGetDatum(NULL);
}
