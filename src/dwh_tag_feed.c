/*-------------------------------------------------------------------------
 *
 * dwh_tag_feed.c
 *	  The database side of the Kafka feed of user tag events: the outbox
 *	  read and emptied by the tags worker, and the wake-up at commit.
 *
 * dwh.refresh_user_tags() writes every grant and revoke to
 * cdm.user_tag_events and, while dwh.tags_topic names a topic, the event's
 * id to dwh.tag_outbox in the same statement: the event and its outbox row
 * commit together or not at all.  The tags worker takes the oldest rows,
 * produces their events, and deletes the rows of the events the broker
 * acknowledged (docs/tags.md, "The Kafka feed").  Rows of transactions
 * not committed yet are invisible to it and taken by a later look.
 *
 * A transaction that queued events wakes the worker when it commits
 * (dwh.tag_feed_wake()), so that the feed does not wait for the worker's
 * next look.
 *
 * The functions that read or write run inside the caller's transaction,
 * with SPI; the worker's search_path is pg_catalog, pg_temp, and every
 * name below is qualified all the same.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "catalog/pg_type.h"
#include "commands/extension.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/memutils.h"

#include "dwh_status.h"
#include "dwh_tag_feed.h"

/*
 * The outbox's oldest rows with their events.  The key is the user's
 * business id (dds.h_user.user_id), so that a user's events share a
 * partition; "at" is written in UTC whatever the worker's TimeZone.  A
 * row whose event, or the event's user, cannot be read yet is not ready.
 */
#define TAKE_SQL \
	"SELECT o.event_id, e.id IS NOT NULL AND u.user_id IS NOT NULL," \
	"       COALESCE(u.user_id::pg_catalog.text, e.user_id::pg_catalog.text)," \
	"       pg_catalog.json_build_object(" \
	"           'id', e.id, 'user', u.user_id, 'tag', e.tag, 'value', e.value," \
	"           'kind', e.kind, 'order_cnt', e.order_cnt," \
	"           'at', pg_catalog.to_char(pg_catalog.timezone('UTC', e.at)," \
	"                                    'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'))::pg_catalog.text" \
	" FROM dwh.tag_outbox o" \
	" LEFT JOIN cdm.user_tag_events e ON e.id OPERATOR(pg_catalog.=) o.event_id" \
	" LEFT JOIN dds.h_user u ON u.h_user_pk OPERATOR(pg_catalog.=) e.user_id" \
	" ORDER BY o.event_id" \
	" LIMIT $1"

#define FORGET_SQL \
	"DELETE FROM dwh.tag_outbox o" \
	" WHERE o.event_id OPERATOR(pg_catalog.=) ANY ($1)"

#define COUNT_SQL \
	"SELECT pg_catalog.count(*) FROM dwh.tag_outbox"

static void
connect_spi(void)
{
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
}

/*
 * dwh_tag_feed_tables_present
 *		Is extension dwh there?  Its tag tables are new in 1.1: an older
 *		schema lacks them, and the version check that follows says so
 *		(rather than "not created").  The catalog lookup runs in a
 *		transaction of its own.
 */
bool
dwh_tag_feed_tables_present(void)
{
	bool		installed;
	MemoryContext caller = CurrentMemoryContext;

	StartTransactionCommand();
	installed = OidIsValid(get_extension_oid("dwh", true));
	CommitTransactionCommand();
	MemoryContextSwitchTo(caller);
	return installed;
}

/*
 * dwh_tag_feed_take
 *		The oldest limit events of the outbox, in id order (which is commit
 *		order for each user and tag), copied into the caller's memory
 *		context.  Returns how many events *events holds.
 *
 * They stop before the first row whose event (or the event's user in
 * dds.h_user) cannot be read, whose id is then *not_ready (else -1): a
 * parallel restore commits the outbox before the events, and rebuilds DDS
 * from STG, so a row may come before what it names.  Such a row holds the
 * feed back until it can be read: a row dropped then would be an event
 * never produced.  (One whose event a DBA deleted holds it back until the
 * row is deleted too; dwh.status says which.)
 */
int
dwh_tag_feed_take(int limit, DwhTagEvent **events, int64 *not_ready)
{
	MemoryContext caller = CurrentMemoryContext;
	Oid			types[1] = {INT4OID};
	Datum		args[1];
	int			n = 0;
	uint64		i;

	*not_ready = -1;

	connect_spi();
	args[0] = Int32GetDatum(limit);
	if (SPI_execute_with_args(TAKE_SQL, 1, types, args, NULL, true, 0) != SPI_OK_SELECT)
		elog(ERROR, "could not read dwh.tag_outbox");

	*events = MemoryContextAlloc(caller, sizeof(DwhTagEvent) * Max(SPI_processed, 1));
	for (i = 0; i < SPI_processed; i++)
	{
		HeapTuple	tuple = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		bool		isnull;
		int64		id = DatumGetInt64(SPI_getbinval(tuple, desc, 1, &isnull));
		DwhTagEvent *e;
		text	   *t;

		if (!DatumGetBool(SPI_getbinval(tuple, desc, 2, &isnull)))
		{
			*not_ready = id;
			break;
		}
		e = &(*events)[n++];
		e->id = id;
		t = DatumGetTextPP(SPI_getbinval(tuple, desc, 3, &isnull));
		e->key_len = VARSIZE_ANY_EXHDR(t);
		e->key = MemoryContextAlloc(caller, e->key_len + 1);
		memcpy(e->key, VARDATA_ANY(t), e->key_len);
		e->key[e->key_len] = '\0';
		t = DatumGetTextPP(SPI_getbinval(tuple, desc, 4, &isnull));
		e->value_len = VARSIZE_ANY_EXHDR(t);
		e->value = MemoryContextAlloc(caller, e->value_len + 1);
		memcpy(e->value, VARDATA_ANY(t), e->value_len);
		e->value[e->value_len] = '\0';
	}
	SPI_finish();
	return n;
}

/*
 * dwh_tag_feed_forget
 *		Delete the outbox rows of these events (acknowledged by the broker).
 */
void
dwh_tag_feed_forget(const int64 *ids, int n)
{
	Oid			types[1] = {INT8ARRAYOID};
	Datum		args[1];
	Datum	   *d = palloc(sizeof(Datum) * Max(n, 1));
	int			i;

	if (n == 0)
		return;
	for (i = 0; i < n; i++)
		d[i] = Int64GetDatum(ids[i]);
	args[0] = PointerGetDatum(construct_array(d, n, INT8OID, 8,
											  FLOAT8PASSBYVAL, TYPALIGN_DOUBLE));
	connect_spi();
	if (SPI_execute_with_args(FORGET_SQL, 1, types, args, NULL, false, 0) != SPI_OK_DELETE)
		elog(ERROR, "could not delete from dwh.tag_outbox");
	SPI_finish();
}

/*
 * dwh_tag_feed_count
 *		The rows of the outbox: the events not produced yet.
 */
int64
dwh_tag_feed_count(void)
{
	bool		isnull;
	int64		count;

	connect_spi();
	if (SPI_execute(COUNT_SQL, true, 0) != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "could not count the rows of dwh.tag_outbox");
	count = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0],
										SPI_tuptable->tupdesc, 1, &isnull));
	SPI_finish();
	return count;
}

PG_FUNCTION_INFO_V1(dwh_tag_feed_wake);

/*
 * dwh.tag_feed_wake() returns void
 *
 * Wake the tags worker when the current transaction commits.  A prepared
 * transaction's events are found by the worker's next look.
 */
Datum
dwh_tag_feed_wake(PG_FUNCTION_ARGS)
{
	dwh_status_wake_at_commit(DWH_WORKER_TAGS);
	PG_RETURN_VOID();
}
