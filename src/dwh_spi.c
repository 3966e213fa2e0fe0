/*-------------------------------------------------------------------------
 *
 * dwh_spi.c
 *	  SPI and subtransaction helpers shared by every batch writer.
 *
 * The ingest (dwh_ingest.c), the STG guard (dwh_stg_guard.c), the Redis
 * store (dwh_redis_store.c) and the message parser (dwh_message.c) write
 * or parse in batches: one kept plan per statement, and work run in a
 * subtransaction whose error either comes back to the caller, which
 * isolates the culprits, or is raised again.  Which errors come back is
 * one rule for all of them (dwh_error_is_about_data): what a writer says
 * no to is dead-lettered, everything else is retried and never skips
 * data.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "executor/spi.h"
#include "utils/resowner.h"

#include "dwh_spi.h"

/*
 * dwh_prepare_kept
 *		Prepare a statement and keep its plan for the life of the backend.
 *
 * A kept plan is the one kind of state these modules hold across calls:
 * it depends on nothing but the statement's text, and PostgreSQL's plan
 * cache invalidates it when the objects it names change.
 */
SPIPlanPtr
dwh_prepare_kept(const char *sql, int nargs, Oid *argtypes)
{
	SPIPlanPtr	plan = SPI_prepare(sql, nargs, argtypes);

	if (plan == NULL)
		elog(ERROR, "SPI_prepare failed: %s", SPI_result_code_string(SPI_result));
	if (SPI_keepplan(plan) != 0)
		elog(ERROR, "SPI_keepplan failed");
	return plan;
}

/*
 * dwh_error_is_about_data
 *		Is this error about the data being written (so that writing it item
 *		by item isolates the culprits), rather than about the system?  The
 *		one rule for every batch writer: what it says no to is dead-lettered,
 *		everything else is retried and never skips data.
 */
bool
dwh_error_is_about_data(ErrorData *edata)
{
	switch (ERRCODE_TO_CATEGORY(edata->sqlerrcode))
	{
		case ERRCODE_INTEGRITY_CONSTRAINT_VIOLATION:

			/*
			 * No message decides a unique key that the writers do not upsert
			 * on: a duplicate is a surrogate id whose sequence is behind its
			 * table (the middle of a restore, a table restored alone), which
			 * would refuse every message until the sequence moves on.
			 */
			return edata->sqlerrcode != ERRCODE_UNIQUE_VIOLATION;
		case ERRCODE_DATA_EXCEPTION:
		case ERRCODE_PROGRAM_LIMIT_EXCEEDED:
		case ERRCODE_PLPGSQL_ERROR:
			return true;
		default:
			return false;
	}
}

/*
 * dwh_run_in_subtransaction
 *		Run work(arg) in a subtransaction, kept when it succeeds if keep is
 *		true and rolled back otherwise.  Returns NULL when it succeeded, or
 *		its error when returned(error) says the caller handles it (the
 *		subtransaction is rolled back); any other error is raised again.
 *
 * The caller's memory context and resource owner are current again on
 * return.  work's allocations are made in the caller's context, so what it
 * returns survives the subtransaction.
 */
ErrorData *
dwh_run_in_subtransaction(void (*work) (void *arg), void *arg, bool keep,
						  bool (*returned) (ErrorData *edata))
{
	MemoryContext oldcontext = CurrentMemoryContext;
	ResourceOwner oldowner = CurrentResourceOwner;
	ErrorData  *volatile edata = NULL;

	BeginInternalSubTransaction(NULL);
	MemoryContextSwitchTo(oldcontext);
	PG_TRY();
	{
		work(arg);
	}
	PG_CATCH();
	{
		MemoryContextSwitchTo(oldcontext);
		edata = CopyErrorData();
		FlushErrorState();
	}
	PG_END_TRY();

	if (edata == NULL && keep)
		ReleaseCurrentSubTransaction();
	else
		RollbackAndReleaseCurrentSubTransaction();
	MemoryContextSwitchTo(oldcontext);
	CurrentResourceOwner = oldowner;
	if (edata != NULL && !returned(edata))
		ReThrowError(edata);
	return edata;
}

/*
 * dwh_try_in_subtransaction
 *		Run work(arg) in a subtransaction.  Returns NULL when it succeeded,
 *		or its error when the error is about the data (the subtransaction is
 *		rolled back and the caller isolates the culprits); any other error
 *		is raised again.
 */
ErrorData *
dwh_try_in_subtransaction(void (*work) (void *arg), void *arg)
{
	return dwh_run_in_subtransaction(work, arg, true, dwh_error_is_about_data);
}
