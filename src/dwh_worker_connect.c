/*-------------------------------------------------------------------------
 *
 * dwh_worker_connect.c
 *	  A background worker's connection to dwh.database.
 *
 * BackgroundWorkerInitializeConnection() ends the process with FATAL when
 * the database does not exist, and the postmaster starts the worker again
 * bgw_restart_time later, to fail the same way: a FATAL in the log every
 * few seconds, and nothing in dwh.status.  So each worker's status slot
 * remembers that a connection attempt is under way; a worker that finds
 * the mark of an attempt that never returned connects to no database
 * instead, looks the name up in the shared catalog pg_database, and waits
 * until the database exists (or dwh.database names another), saying so in
 * dwh.status.  Then it exits, to be started again and connect.  A missing
 * database thus costs one FATAL, not one every few seconds.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "commands/dbcommands.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/wait_event.h"

#include "dwh_settings.h"
#include "dwh_worker_connect.h"

#define DATABASE_RECHECK_MS		5000

static void
set_connect_pending(DwhWorkerStatus *slot, bool pending)
{
	SpinLockAcquire(&slot->mutex);
	slot->connect_pending = pending;
	SpinLockRelease(&slot->mutex);
}

static bool
database_exists(const char *name)
{
	bool		exists;

	StartTransactionCommand();
	exists = OidIsValid(get_database_oid(name, true));
	CommitTransactionCommand();
	return exists;
}

/*
 * Connected to no database: wait until dwh.database exists, then exit so
 * that the postmaster starts the worker again, to connect to it.
 */
static void
wait_for_database(DwhWorkerStatus *slot)
{
	BackgroundWorkerInitializeConnection(NULL, NULL, 0);
	pgstat_report_activity(STATE_IDLE, NULL);

	for (;;)
	{
		CHECK_FOR_INTERRUPTS();
		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
		}
		if (database_exists(dwh_database))
		{
			ereport(LOG,
					(errmsg("database \"%s\" named by dwh.database exists, connecting",
							dwh_database)));
			set_connect_pending(slot, false);
			proc_exit(1);
		}
		dwh_status_set_state(slot, "waiting: database \"%s\" (dwh.database) does not exist",
							 dwh_database);
		(void) WaitLatch(MyLatch,
						 WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 DATABASE_RECHECK_MS, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
	}
}

/*
 * dwh_worker_connect
 *		Connect the calling worker to dwh.database, with the search_path of
 *		dwh's definer functions; returns the name connected to, in
 *		TopMemoryContext.  Does not return while the database is missing.
 */
char *
dwh_worker_connect(DwhWorkerStatus *slot)
{
	char	   *database;
	bool		pending;

	SpinLockAcquire(&slot->mutex);
	pending = slot->connect_pending;
	SpinLockRelease(&slot->mutex);
	if (pending)
		wait_for_database(slot);

	database = MemoryContextStrdup(TopMemoryContext, dwh_database);
	set_connect_pending(slot, true);
	BackgroundWorkerInitializeConnection(database, NULL, 0);
	set_connect_pending(slot, false);
	dwh_worker_search_path();
	return database;
}
