/*-------------------------------------------------------------------------
 *
 * dwh_worker.c
 *	  The skeleton the Kafka, Redis and tags background workers share.
 *
 * A worker's source file holds only what is specific to its source (the
 * consumer or the connection, its settings, its loop); everything else is
 * here, written once:
 *
 *	- registration of every worker, from _PG_init when preloaded;
 *	- start-up: signal handlers, the worker's slot in dwh.status, the
 *	  connection to dwh.database and the application name;
 *	- one latch wait and one backoff rule;
 *	- states published in dwh.status and logged once: a new text is logged,
 *	  a repeated one never (a worker that waits re-checks every few seconds
 *	  and must not fill the log);
 *	- reload: SIGHUP, and a change of dwh.database, which ends the process
 *	  so that the postmaster starts it again connected to the new database;
 *	- readiness: not on a standby, extension dwh created with the worker's
 *	  tables, and at the library's version (src/dwh_version.c);
 *	- recovery from an ERROR, in one order for both (dwh_worker_recover).
 *
 * A process runs one worker, so the state kept here (the slot, the database
 * connected to, the text logged last) is per process, like MyProc.
 *
 * A missing dwh.database: BackgroundWorkerInitializeConnection() ends the
 * process with FATAL when the database does not exist, and the postmaster
 * starts the worker again bgw_restart_time later, to fail the same way: a
 * FATAL in the log every few seconds, and nothing in dwh.status.  So each
 * worker's status slot remembers that a connection attempt is under way; a
 * worker that finds the mark of an attempt that never returned connects to
 * no database instead, looks the name up in the shared catalog pg_database,
 * and waits until the database exists (or dwh.database names another),
 * saying so in dwh.status.  Then it exits, to be started again and connect.
 * A missing database thus costs one FATAL, not one every few seconds.  So
 * does one that does not allow connections (ALTER DATABASE ...
 * ALLOW_CONNECTIONS false, which its owner may set): the worker waits until
 * it does again.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <signal.h>

#include "access/genam.h"
#include "access/htup_details.h"
#include "access/table.h"
#include "access/xact.h"
#include "access/xlog.h"
#include "catalog/pg_database.h"
#include "commands/dbcommands.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/bgworker_internals.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "tcop/tcopprot.h"
#include "utils/builtins.h"
#include "utils/fmgroids.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/rel.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"
#include "utils/wait_event.h"

#include "dwh_settings.h"
#include "dwh_trust.h"
#include "dwh_version.h"
#include "dwh_worker.h"

/* This process's worker. */
static DwhWorkerStatus *slot = NULL;
static char *connected_database = NULL;

/* The last state or error logged, in TopMemoryContext; NULL: none. */
static char *last_logged = NULL;

/*
 * Where dwh_worker_recover copies an error, emptied once it is published:
 * FreeErrorData() does not free the filename, funcname, domain and
 * message_id strings that CopyErrorData() copies, so freeing the copy with
 * it would leave a few bytes behind at every error.
 */
static MemoryContext error_copy_context = NULL;

/* The background workers registered so far, every library's. */
static int
registered_workers(void)
{
	slist_iter	iter;
	int			n = 0;

	slist_foreach(iter, &BackgroundWorkerList)
		n++;
	return n;
}

/*
 * Register one worker of a kind; index is its 1-based number.  A worker
 * for which max_worker_processes leaves no slot is said so in the log and
 * in dwh.status.
 */
static void
register_worker(DwhWorkerKind kind, int index)
{
	BackgroundWorker worker;
	int			n_before;

	memset(&worker, 0, sizeof(worker));
	worker.bgw_flags = BGWORKER_SHMEM_ACCESS |
		BGWORKER_BACKEND_DATABASE_CONNECTION;
	/* Started on a standby too, where it waits for promotion. */
	worker.bgw_start_time = BgWorkerStart_ConsistentState;
	worker.bgw_restart_time = 5;
	snprintf(worker.bgw_library_name, BGW_MAXLEN, "dwh");
	if (kind == DWH_WORKER_KAFKA)
	{
		snprintf(worker.bgw_function_name, BGW_MAXLEN, "dwh_kafka_worker_main");
		snprintf(worker.bgw_name, BGW_MAXLEN, "dwh kafka worker %d", index);
		snprintf(worker.bgw_type, BGW_MAXLEN, "dwh kafka worker");
	}
	else if (kind == DWH_WORKER_TAGS)
	{
		snprintf(worker.bgw_function_name, BGW_MAXLEN, "dwh_tags_worker_main");
		snprintf(worker.bgw_name, BGW_MAXLEN, "dwh tags worker");
		snprintf(worker.bgw_type, BGW_MAXLEN, "dwh tags worker");
	}
	else
	{
		snprintf(worker.bgw_function_name, BGW_MAXLEN, "dwh_redis_worker_main");
		snprintf(worker.bgw_name, BGW_MAXLEN, "dwh redis worker");
		snprintf(worker.bgw_type, BGW_MAXLEN, "dwh redis worker");
	}
	worker.bgw_main_arg = Int32GetDatum(index);
	n_before = registered_workers();
	RegisterBackgroundWorker(&worker);
	if (registered_workers() == n_before)
	{
		/* Said at LOG level by the postmaster, without naming the worker. */
		ereport(WARNING,
				(errcode(ERRCODE_CONFIGURATION_LIMIT_EXCEEDED),
				 errmsg("could not register background worker \"%s\"",
						worker.bgw_name),
				 errdetail("max_worker_processes (%d) leaves no slot for it.",
						   max_worker_processes),
				 errhint("Raise max_worker_processes and restart the server.")));
		dwh_status_note_unregistered(kind, index);
	}
}

/* Set in the postmaster, so in every process forked from it. */
bool		dwh_workers_registered = false;

/*
 * dwh_workers_register
 *		Register dwh.kafka_consumers Kafka workers, the Redis worker and the
 *		tags worker (from _PG_init, when preloaded).
 */
void
dwh_workers_register(void)
{
	int			i;

	dwh_workers_registered = true;

	for (i = 1; i <= dwh_kafka_consumers; i++)
		register_worker(DWH_WORKER_KAFKA, i);
	register_worker(DWH_WORKER_REDIS, 1);
	register_worker(DWH_WORKER_TAGS, 1);
}

/*
 * dwh_worker_wait
 *		Sleep on the latch until it is set or timeout_ms pass.  A deadline
 *		already passed (zero or negative, as a computed one can be) still
 *		sleeps 1 ms: no value of timeout_ms means "forever", so that a
 *		deadline missed by a millisecond cannot park the worker until the
 *		next signal.
 */
void
dwh_worker_wait(long timeout_ms)
{
	(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
					 Max(timeout_ms, 1), PG_WAIT_EXTENSION);
	ResetLatch(MyLatch);
}

/*
 * dwh_worker_backoff
 *		Sleep timeout_ms after a failure, however often the latch is set
 *		meanwhile: a wake-up meant for work must not shorten the backoff.
 *		One comes after every lock timeout: the deadlock timer's SIGALRM,
 *		which PostgreSQL does not cancel when the error ends the lock wait,
 *		sets the latch deadlock_timeout after the wait began.  A reload
 *		ends the backoff (corrected settings are tried at once), SIGTERM
 *		ends the process.
 */
void
dwh_worker_backoff(long timeout_ms)
{
	TimestampTz end = TimestampTzPlusMilliseconds(GetCurrentTimestamp(),
												  timeout_ms);

	for (;;)
	{
		long		left;

		CHECK_FOR_INTERRUPTS();
		if (ConfigReloadPending)
			return;
		left = TimestampDifferenceMilliseconds(GetCurrentTimestamp(), end);
		if (left <= 0)
			return;
		dwh_worker_wait(left);
	}
}

/*
 * dwh_worker_start_thread
 *		pthread_create() a thread that takes no signal: it inherits the mask
 *		it is created with, all blocked, so that the server's handlers
 *		always run in the worker's own thread.  The thread must call nothing
 *		of PostgreSQL's.  Returns pthread_create()'s result.
 */
int
dwh_worker_start_thread(pthread_t *thread, void *(*thread_main) (void *),
						void *arg)
{
	sigset_t	all;
	sigset_t	old;
	int			rc;

	sigfillset(&all);
	pthread_sigmask(SIG_SETMASK, &all, &old);
	rc = pthread_create(thread, NULL, thread_main, arg);
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	return rc;
}

/*
 * dwh_worker_wait_for_signal
 *		Sleep on the latch until it is set (a reload, a shutdown), however
 *		long.
 */
void
dwh_worker_wait_for_signal(void)
{
	(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_EXIT_ON_PM_DEATH, -1L,
					 PG_WAIT_EXTENSION);
	ResetLatch(MyLatch);
}

/*
 * dwh_worker_next_backoff
 *		The wait after one more failure in a row: DWH_WORKER_BACKOFF_MIN_MS
 *		first, then doubled up to DWH_WORKER_BACKOFF_MAX_MS.
 */
int
dwh_worker_next_backoff(int backoff_ms)
{
	if (backoff_ms == 0)
		return DWH_WORKER_BACKOFF_MIN_MS;
	return Min(backoff_ms * 2, DWH_WORKER_BACKOFF_MAX_MS);
}

/*
 * dwh_worker_note_logged
 *		Remember text as the last thing logged; returns whether it differs
 *		from the one before, that is whether the caller logs it.  Texts of
 *		any length are compared whole.
 */
bool
dwh_worker_note_logged(const char *text)
{
	if (last_logged != NULL && strcmp(last_logged, text) == 0)
		return false;
	if (last_logged != NULL)
		pfree(last_logged);
	last_logged = MemoryContextStrdup(TopMemoryContext, text);
	return true;
}

/*
 * dwh_worker_forget_logged
 *		Log the next state or error whatever it is (after a connection, or a
 *		change of settings, the same trouble again is news).
 */
void
dwh_worker_forget_logged(void)
{
	if (last_logged != NULL)
		pfree(last_logged);
	last_logged = NULL;
}

/*
 * dwh_worker_set_state_logged
 *		Publish a state in dwh.status; a new one is also logged (with the
 *		hint, if any), a repeated one never.
 */
void
dwh_worker_set_state_logged(const char *state, const char *hint)
{
	dwh_status_set_state(slot, "%s", state);
	/* Untranslated: a state is read by programs too (monitoring/). */
	if (dwh_worker_note_logged(state))
		ereport(LOG,
				(errmsg("%s", state),
				 hint ? errhint("%s", hint) : 0));
}

/* Take a new configuration if SIGHUP asked for one; true when it did. */
static bool
reload_config(void)
{
	if (!ConfigReloadPending)
		return false;
	ConfigReloadPending = false;
	ProcessConfigFile(PGC_SIGHUP);
	return true;
}

/*
 * dwh_worker_reload
 *		Reload the configuration if SIGHUP asked for it; returns whether it
 *		did, for the worker to compare its own settings.  Another database
 *		means another process: the worker exits and is started again.
 */
bool
dwh_worker_reload(void)
{
	if (!reload_config())
		return false;
	if (strcmp(dwh_database, connected_database) != 0)
	{
		ereport(LOG,
				(errmsg("dwh.database changed from \"%s\" to \"%s\", restarting",
						connected_database, dwh_database)));
		proc_exit(1);
	}
	return true;
}

static void
set_connect_pending(bool pending)
{
	LWLockAcquire(slot->lock, LW_EXCLUSIVE);
	slot->connect_pending = pending;
	LWLockRelease(slot->lock);
}

/* What connect_to_database() would find of a database, by its name. */
typedef enum DatabaseState
{
	DATABASE_MISSING,
	DATABASE_CLOSED,			/* exists, datallowconn false */
	DATABASE_OPEN
} DatabaseState;

/*
 * The database's row in the shared catalog pg_database, read as
 * get_database_oid() does: connected to no database, only shared catalogs
 * can be read.
 */
static DatabaseState
database_state(const char *name)
{
	DatabaseState state = DATABASE_MISSING;
	MemoryContext caller = CurrentMemoryContext;
	Relation	rel;
	ScanKeyData key;
	SysScanDesc scan;
	HeapTuple	tuple;

	StartTransactionCommand();
	rel = table_open(DatabaseRelationId, AccessShareLock);
	ScanKeyInit(&key, Anum_pg_database_datname, BTEqualStrategyNumber,
				F_NAMEEQ, CStringGetDatum(name));
	scan = systable_beginscan(rel, DatabaseNameIndexId, true, NULL, 1, &key);
	tuple = systable_getnext(scan);
	if (HeapTupleIsValid(tuple))
		state = ((Form_pg_database) GETSTRUCT(tuple))->datallowconn ?
			DATABASE_OPEN : DATABASE_CLOSED;
	systable_endscan(scan);
	table_close(rel, AccessShareLock);
	CommitTransactionCommand();
	MemoryContextSwitchTo(caller);
	return state;
}

/*
 * Connected to no database: wait until dwh.database exists and allows
 * connections, then exit so that the postmaster starts the worker again, to
 * connect to it.  A database that does not allow connections is said once
 * in the log too: dwh.status, in that database, cannot be read meanwhile.
 */
static void
wait_for_database(void)
{
	BackgroundWorkerInitializeConnection(NULL, NULL, 0);
	pgstat_report_activity(STATE_IDLE, NULL);

	for (;;)
	{
		DatabaseState state;

		CHECK_FOR_INTERRUPTS();
		(void) reload_config();
		state = database_state(dwh_database);
		if (state == DATABASE_OPEN)
		{
			ereport(LOG,
					(errmsg("database \"%s\" named by dwh.database exists, connecting",
							dwh_database)));
			set_connect_pending(false);
			proc_exit(1);
		}
		if (state == DATABASE_CLOSED)
		{
			const char *name = quote_identifier(dwh_database);
			char	   *text = psprintf("waiting: database \"%s\" (dwh.database) does not allow connections",
										dwh_database);
			char	   *hint = psprintf("Run ALTER DATABASE %s ALLOW_CONNECTIONS true; dwh's workers then connect within seconds.",
										name);

			/* Every few seconds, in a context that lives on: freed. */
			dwh_worker_set_state_logged(text, hint);
			if (name != dwh_database)
				pfree((char *) name);
			pfree(text);
			pfree(hint);
		}
		else
			dwh_status_set_state(slot, "waiting: database \"%s\" (dwh.database) does not exist",
								 dwh_database);
		dwh_worker_wait(DWH_WORKER_RECHECK_MS);
	}
}

/*
 * Connect to dwh.database, with a worker's settings (dwh_worker_settings).
 * Does not return while the database is missing.
 */
static void
connect_to_database(void)
{
	bool		pending;

	LWLockAcquire(slot->lock, LW_SHARED);
	pending = slot->connect_pending;
	LWLockRelease(slot->lock);
	if (pending)
		wait_for_database();

	connected_database = MemoryContextStrdup(TopMemoryContext, dwh_database);
	set_connect_pending(true);
	BackgroundWorkerInitializeConnection(connected_database, NULL, 0);
	set_connect_pending(false);
	dwh_status_set_database(slot, MyDatabaseId);
	dwh_worker_settings();
}

/*
 * dwh_worker_start
 *		Start the calling worker: signal handlers (SIGTERM ends it, SIGHUP
 *		asks for a reload; a worker that needs another handler sets it
 *		before), its slot in dwh.status, its connection to dwh.database and
 *		its application name.  Returns the slot.
 */
DwhWorkerStatus *
dwh_worker_start(DwhWorkerKind kind, int index)
{
	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, die);
	BackgroundWorkerUnblockSignals();

	slot = dwh_status_attach(kind, index);
	error_copy_context = AllocSetContextCreate(TopMemoryContext,
											   "dwh worker error",
											   ALLOCSET_SMALL_SIZES);
	connect_to_database();
	pgstat_report_appname(MyBgworkerEntry->bgw_name);
	return slot;
}

/*
 * What makes one of dwh's schemas unsafe (dwh_trust.c), or NULL, in a
 * transaction of its own; the result and *fix in the caller's memory
 * context.
 */
static char *
schemas_unsafe(char **fix)
{
	MemoryContext caller = CurrentMemoryContext;
	char	   *unsafe;

	StartTransactionCommand();
	PushActiveSnapshot(GetTransactionSnapshot());
	unsafe = dwh_schemas_unsafe(fix);
	if (unsafe != NULL)
	{
		unsafe = MemoryContextStrdup(caller, unsafe);
		*fix = MemoryContextStrdup(caller, *fix);
	}
	PopActiveSnapshot();
	CommitTransactionCommand();
	MemoryContextSwitchTo(caller);
	return unsafe;
}

/*
 * dwh_worker_ready
 *		Can the worker work on this database?  Not on a standby, not before
 *		extension dwh is created with the worker's tables (tables_present,
 *		which runs its catalog lookups in a transaction of its own), not
 *		while the extension is at another version than the library (after a
 *		package upgrade, until ALTER EXTENSION dwh UPDATE), not while a role
 *		other than a superuser may change what its schemas hold.  Publishes why
 *		not, and logs each new reason once.  The caller's memory context is
 *		current again on return (a commit leaves TopMemoryContext current).
 */
bool
dwh_worker_ready(bool (*tables_present) (void))
{
	MemoryContext caller = CurrentMemoryContext;
	bool		ready = false;
	char	   *mismatch;
	char	   *unsafe;
	char	   *fix;

	if (RecoveryInProgress())
		dwh_worker_set_state_logged("waiting: the server is a standby", NULL);
	else if (!tables_present())
	{
		MemoryContextSwitchTo(caller);
		dwh_worker_set_state_logged(psprintf("waiting: extension dwh is not created in database \"%s\"",
											 connected_database),
									NULL);
	}
	else if ((mismatch = dwh_schema_mismatch()) != NULL)
		dwh_worker_set_state_logged(dwh_schema_wait_state(mismatch),
									dwh_schema_wait_hint(connected_database));
	else if ((unsafe = schemas_unsafe(&fix)) != NULL)
		dwh_worker_set_state_logged(psprintf("waiting: %s", unsafe), fix);
	else
		ready = true;
	MemoryContextSwitchTo(caller);
	return ready;
}

/*
 * dwh_worker_recover
 *		From a worker's sigsetjmp block, after an ERROR: report it, leave the
 *		transaction, publish the error in dwh.status and that the worker is
 *		retrying, and lengthen *backoff_ms, which the caller then sleeps.
 *		Whatever the worker keeps across the error (a batch, a connection)
 *		is its own business.  Returns with TopMemoryContext current.
 *
 * The order, checked against PostgreSQL 15's sources, is PostgresMain's
 * with the copy of the error first:
 *
 * 1. EmitErrorReport() while the error is the top of the error stack.
 *
 * 2. CopyErrorData(), before the abort, into a context of the worker's
 *    own that outlives the transaction.  The abort releases the
 *    transaction's resource owners, JIT contexts included
 *    (ResourceOwnerReleaseInternal in resowner.c calls
 *    jit_release_context), which unloads JIT-compiled code; an error raised
 *    by a function that JIT inlined has its filename and funcname pointing
 *    into that code, which is why CopyErrorData() copies even those strings
 *    (see its comment in elog.c).  Copied after the abort, they may point
 *    to unloaded memory.  The abort also deletes TopTransactionContext,
 *    often current when the error is raised, so the copy cannot go there.
 *
 * 3. AbortOutOfAnyTransaction(): the transaction and any subtransactions,
 *    their locks, snapshots, SPI and memory; it leaves TopMemoryContext
 *    current.
 *
 * 4. FlushErrorState() last, as in PostgresMain: it empties the error
 *    stack and resets ErrorContext, where the reported error's strings
 *    live.  Until the abort is over the worker is still handling this
 *    error, so a report made by the abort stacks above it rather than
 *    replacing it.
 */
void
dwh_worker_recover(int *backoff_ms)
{
	ErrorData  *edata;

	/* Not in PG_TRY: the error context stack is reset by hand. */
	error_context_stack = NULL;
	HOLD_INTERRUPTS();
	EmitErrorReport();
	MemoryContextSwitchTo(error_copy_context);
	edata = CopyErrorData();
	AbortOutOfAnyTransaction();
	MemoryContextSwitchTo(TopMemoryContext);
	FlushErrorState();
	RESUME_INTERRUPTS();
	pgstat_report_activity(STATE_IDLE, NULL);

	dwh_status_set_error(slot, "%s (SQLSTATE %s)", edata->message,
						 unpack_sql_state(edata->sqlerrcode));
	MemoryContextReset(error_copy_context);

	*backoff_ms = dwh_worker_next_backoff(*backoff_ms);
	dwh_status_set_state(slot, "retrying after an error");
}
