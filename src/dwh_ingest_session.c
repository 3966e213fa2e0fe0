/*-------------------------------------------------------------------------
 *
 * dwh_ingest_session.c
 *	  The state that one ingest batch shares with the triggers its
 *	  statements fire.
 *
 * A batch goes from C to SQL and back to C several times, and the
 * triggers on the way must know whether an ingest is writing and what it
 * has done already.  All they may know is held here, in one session per
 * write of a batch, and asked for through the functions below; nothing
 * else in the ingest or the guard keeps state from one call to the next
 * (their kept SPI plans hold only a statement's plan).
 *
 * The path of one batch, and what each hop reads:
 *
 * C	dwh_ingest_batch() (dwh_ingest.c), called by the Kafka worker or by
 *		the SQL functions dwh.ingest_order() and dwh.ingest_orders()
 *		(dwh_ingest_sql.c):
 *		SPI_connect, then ingest_messages() in a subtransaction.
 * C	ingest_messages(): classifies the messages (dwh_message.c) and keeps
 *		the newest version of each order; then
 * SQL	dwh.claim_order_keys() (install/40_products.sql): steps 1 and 2 of
 *		the lock order.  No session yet: the claim reads none.
 * C	upsert_claimed(): dwh_ingest_session_push().  From here
 *		dwh.keys_claimed() is true.
 * C	upsert_orders_deferred(): dwh_ingest_session_start_upsert() with the batch's
 *		orders, then the upsert into stg.order_events, which fires:
 *	C	  dwh_stg_statement_lock() (dwh_stg_guard.c), BEFORE STATEMENT: the
 *		  dictionary lock is held already.  Reads no session.
 *	C	  dwh_stg_guard(), BEFORE ROW: asks
 *		  dwh_ingest_session_checked_order() whether the row's payload is,
 *		  byte for byte, one the session has checked; if so, it takes the
 *		  version time from the session instead of checking the payload
 *		  again.  A row that loses to the stored version goes to
 *		  stg.order_event_history (keep_in_history), whose triggers run as
 *		  below.
 *	SQL	  dwh.order_events_changed() (install/50_orders.sql), AFTER
 *		  STATEMENT, for the inserted rows and for the updated ones:
 *	C		dwh.keys_claimed() -> dwh_ingest_session_keys_claimed(): true,
 *			so the trigger claims no keys and loads no namings itself;
 *	SQL		dwh.load_order_versions(): dwh.load_new_orders(),
 *			dwh.load_known_orders(), dwh.unlink_replaced_items(),
 *			dwh.keep_superseded_orders() (an insert into
 *			stg.order_event_history: guard and history trigger as below):
 *			DDS, and the mart deltas;
 *	C		dwh.defer_mart_deltas() -> dwh_ingest_session_defer_deltas():
 *			the deltas are kept in the session, the trigger applies none.
 * C	dwh_ingest_session_end_upsert(): the deltas come back to C.  From
 *		here the guard checks every row again, and dwh.defer_mart_deltas()
 *		is false: a write to STG now applies its own deltas.
 * C	keep_superseded(): the batch's superseded versions go into
 *		stg.order_event_history, which fires
 *	C	  dwh_stg_guard(): the session has no orders, every row is checked;
 *	SQL	  dwh.order_event_history_added(): dwh.keys_claimed() is true, so
 *		  it only loads the versions' satellite rows.
 * SQL	dwh.apply_mart_deltas(): the kept deltas, in one sorted pass.
 * C	dwh_ingest_session_pop(): from here dwh.keys_claimed() is false (or
 *		the answer of an outer session, below).
 * SQL	dwh.load_order_namings() (step 6), then stg.other_events and
 *		dwh.dead_letters: no session.
 *
 * A write to STG outside an ingest (a DBA's INSERT, COPY or upsert, a
 * restore) finds no session: its guard checks every row, and its triggers
 * claim their keys, apply their deltas and load their namings themselves,
 * a chunk of dwh.trigger_chunk_rows rows at a time.
 *
 * Sessions nest.  A trigger of a batch's statement may run another batch
 * (a trigger of the DBA's that calls dwh.ingest_orders()): the inner
 * session hides the outer one until it is popped, then the outer one
 * answers again, its keys still claimed and its deltas still kept.
 *
 * A session never outlives the (sub)transaction that pushed it.  The
 * ingest pops it in PG_FINALLY, so an error pops it on its way up, before
 * the subtransaction that catches the error is rolled back.  Behind that,
 * a transaction and a subtransaction callback drop at every abort the
 * sessions pushed inside what aborts: the ingest's own subtransactions, a
 * savepoint or PL/pgSQL exception block of the caller, a worker's error
 * recovery (AbortCurrentTransaction).  With the callback a stale session
 * cannot exist whatever a future caller forgets, and it does not depend
 * on who runs next: a reset at the start of the next batch would leave a
 * direct write to STG in between with a stale session (its deltas
 * deferred to a batch that is gone), and would break nesting.  So that
 * the callback can walk the sessions after the frames that pushed them
 * are gone, they live in TopTransactionContext, which outlasts every
 * subtransaction; the batch's own memory (its orders, the deltas) is
 * never touched there.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "catalog/pg_type.h"
#include "fmgr.h"
#include "utils/array.h"
#include "utils/datum.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/uuid.h"

#include "dwh_columns.h"
#include "dwh_ingest_session.h"

struct DwhIngestSession
{
	DwhIngestSession *outer;	/* the session it hides, or NULL */
	SubTransactionId subxact;	/* the (sub)transaction that pushed it */

	/*
	 * The orders of the upsert that is running, checked in C and sorted by
	 * object_id; none outside the upsert.  What the guard may skip.
	 */
	const DwhIngestOrder *orders;
	int			n_orders;

	/* True while the upsert runs: the triggers' deltas are kept here. */
	bool		deferring;
	MemoryContext deltas_context;	/* the batch's memory, for the deltas */
	DwhMartDeltas deltas;
};

/* The innermost session, or NULL when no ingest is writing. */
static DwhIngestSession *current = NULL;

static bool callbacks_registered = false;

/*
 * At an abort, drop the sessions pushed in what aborts; at the end of the
 * transaction, every session (their memory goes with the transaction).
 */
static void
session_xact_callback(XactEvent event, void *arg)
{
	switch (event)
	{
		case XACT_EVENT_COMMIT:
		case XACT_EVENT_PARALLEL_COMMIT:
		case XACT_EVENT_PREPARE:
			/* Every ingest pops its session before it returns. */
			Assert(current == NULL);
			current = NULL;
			break;
		case XACT_EVENT_ABORT:
		case XACT_EVENT_PARALLEL_ABORT:
			current = NULL;
			break;
		default:
			break;
	}
}

static void
session_subxact_callback(SubXactEvent event, SubTransactionId mySubid,
						 SubTransactionId parentSubid, void *arg)
{
	if (event != SUBXACT_EVENT_ABORT_SUB)
		return;

	/*
	 * Subtransaction ids grow within a transaction: the sessions pushed in
	 * the aborting subtransaction or in one it began are those with an id not
	 * below its own, and they are the innermost ones.
	 */
	while (current != NULL && current->subxact >= mySubid)
		current = current->outer;
}

/*
 * dwh_ingest_session_push
 *		Begin the write of a batch whose keys the ingest has claimed (steps 1
 *		and 2 of the lock order): the triggers of what it writes need not
 *		claim them again.  The session hides any outer one until
 *		dwh_ingest_session_pop().  The mart deltas are kept in the current
 *		memory context.
 */
DwhIngestSession *
dwh_ingest_session_push(void)
{
	DwhIngestSession *session;
	int			i;

	Assert(IsTransactionState());
	if (!callbacks_registered)
	{
		RegisterXactCallback(session_xact_callback, NULL);
		RegisterSubXactCallback(session_subxact_callback, NULL);
		callbacks_registered = true;
	}

	session = MemoryContextAllocZero(TopTransactionContext,
									 sizeof(DwhIngestSession));
	session->outer = current;
	session->subxact = GetCurrentSubTransactionId();
	session->deltas_context = CurrentMemoryContext;
	for (i = 0; i < DWH_MART_DELTA_ARRAYS; i++)
	{
		/* User ids and keys are uuids, deltas integers. */
		dwh_column_init(&session->deltas.all[i],
						i % 3 == 2 ? INT4OID : UUIDOID, 1);
		session->deltas.capacity[i] = 1;
	}
	current = session;
	return session;
}

/*
 * dwh_ingest_session_pop
 *		End the session; the outer one, if any, is current again.  Called in
 *		PG_FINALLY: it must not fail.
 */
void
dwh_ingest_session_pop(DwhIngestSession *session)
{
	/*
	 * Sessions are popped innermost first.  One that is not current was
	 * dropped already, with a subtransaction that aborted: its memory goes
	 * with the transaction.
	 */
	Assert(session == current);
	if (session != current)
		return;
	current = session->outer;
	pfree(session);
}

/*
 * dwh_ingest_session_start_upsert
 *		The upsert of orders[0..n-1] (sorted by object_id, checked in C) is
 *		about to run: the guard may take their checks as done, and the order
 *		triggers hand their mart deltas to the session.  The caller keeps
 *		orders until dwh_ingest_session_end_upsert().
 */
void
dwh_ingest_session_start_upsert(DwhIngestSession *session,
								const DwhIngestOrder *orders, int n)
{
	Assert(session == current);
	session->orders = orders;
	session->n_orders = n;
	session->deferring = true;
}

/*
 * dwh_ingest_session_end_upsert
 *		The upsert is over: returns the deltas its triggers handed over, to
 *		be applied by the caller.  Nothing is skipped or kept any more.
 */
DwhMartDeltas *
dwh_ingest_session_end_upsert(DwhIngestSession *session)
{
	Assert(session == current);
	session->orders = NULL;
	session->n_orders = 0;
	session->deferring = false;
	return &session->deltas;
}

/*
 * dwh_ingest_session_keys_claimed
 *		Has the current session claimed the keys of the versions that the
 *		asking trigger writes?  False when no ingest is writing.
 */
bool
dwh_ingest_session_keys_claimed(void)
{
	return current != NULL;
}

/*
 * dwh_ingest_session_checked_order
 *		Is this payload, byte for byte, one that the current session's upsert
 *		writes for this order?  Then the ingest has checked it, the STG guard
 *		need not check it again, and update_ts receives the version derived
 *		from it.  Whoever wrote the row, the same bytes pass the same checks.
 */
bool
dwh_ingest_session_checked_order(int64 object_id, Jsonb *payload,
								 Timestamp *update_ts)
{
	int			lo = 0;
	int			hi;

	if (current == NULL)
		return false;
	hi = current->n_orders - 1;
	while (lo <= hi)
	{
		int			mid = lo + (hi - lo) / 2;
		const DwhIngestOrder *row = &current->orders[mid];

		if (row->object_id == object_id)
		{
			if (VARSIZE(row->payload) != VARSIZE(payload) ||
				memcmp(row->payload, payload, VARSIZE(payload)) != 0)
				return false;
			*update_ts = row->update_ts;
			return true;
		}
		if (row->object_id < object_id)
			lo = mid + 1;
		else
			hi = mid - 1;
	}
	return false;
}

/*
 * Append the elements of arr to col, which has room for *capacity.
 */
static void
column_append_array(DwhColumn *col, ArrayType *arr, int *capacity)
{
	Datum	   *values;
	bool	   *nulls;
	int			n;
	int16		typlen;
	bool		typbyval;
	char		typalign;
	int			i;

	get_typlenbyvalalign(col->elemtype, &typlen, &typbyval, &typalign);
	deconstruct_array(arr, col->elemtype, typlen, typbyval, typalign,
					  &values, &nulls, &n);
	if (col->n + n > *capacity)
	{
		*capacity = Max(*capacity * 2, col->n + n);
		col->values = repalloc(col->values, sizeof(Datum) * *capacity);
		col->nulls = repalloc(col->nulls, sizeof(bool) * *capacity);
	}
	for (i = 0; i < n; i++)
		dwh_column_add(col,
					   nulls[i] ? (Datum) 0 : datumCopy(values[i], typbyval, typlen),
					   nulls[i]);
}

/*
 * dwh_ingest_session_defer_deltas
 *		Keep the mart deltas of an order trigger (the DWH_MART_DELTA_ARRAYS
 *		arrays of dwh.apply_mart_deltas(), NULL where nulls says so) for the
 *		end of the current session's upsert.  Returns false, keeping nothing,
 *		when no upsert of an ingest is running: the caller applies them.
 *
 * One upsert fires both the INSERT and the UPDATE statement triggers of
 * stg.order_events; applied at once, their deltas would lock mart rows in
 * two sorted passes, and two batches crossing between the passes would
 * deadlock.
 */
bool
dwh_ingest_session_defer_deltas(Datum *arrays, bool *nulls)
{
	DwhMartDeltas *d;
	MemoryContext old;
	int			i;

	if (current == NULL || !current->deferring)
		return false;

	d = &current->deltas;
	old = MemoryContextSwitchTo(current->deltas_context);
	for (i = 0; i < DWH_MART_DELTA_ARRAYS; i++)
	{
		if (d->calls == 0)
		{
			d->first_null[i] = nulls[i];
			d->first[i] = nulls[i] ? (Datum) 0 :
				PointerGetDatum(PG_DETOAST_DATUM_COPY(arrays[i]));
			continue;
		}
		/* The second call brings the first one's elements along. */
		if (d->calls == 1 && !d->first_null[i])
			column_append_array(&d->all[i], DatumGetArrayTypeP(d->first[i]),
								&d->capacity[i]);
		if (!nulls[i])
			column_append_array(&d->all[i], DatumGetArrayTypeP(arrays[i]),
								&d->capacity[i]);
	}
	d->calls++;
	MemoryContextSwitchTo(old);
	return true;
}

/* One delta of a mart, for sorting by key. */
typedef struct KeyedDelta
{
	Datum		user_id;		/* uuid */
	Datum		key;			/* uuid: dish, category or a key of its own */
	bool		user_null;
	bool		key_null;
	int32		delta;			/* 0 for a null one, as sum() ignores it */
} KeyedDelta;

/* uuids in byte order, a null after every value (as ORDER BY sorts them) */
static int
uuid_datum_cmp(Datum a, bool a_null, Datum b, bool b_null)
{
	if (a_null || b_null)
		return (int) a_null - (int) b_null;
	return memcmp(DatumGetUUIDP(a)->data, DatumGetUUIDP(b)->data,
				  UUID_LEN);
}

static int
keyed_delta_cmp(const void *a, const void *b)
{
	const KeyedDelta *x = (const KeyedDelta *) a;
	const KeyedDelta *y = (const KeyedDelta *) b;
	int			c = uuid_datum_cmp(x->user_id, x->user_null,
								   y->user_id, y->user_null);

	return c != 0 ? c : uuid_datum_cmp(x->key, x->key_null,
									   y->key, y->key_null);
}

/*
 * The deltas of one mart (columns users, keys, deltas), summed per (user,
 * key), sums of zero left out, as arrays in key order; null arrays when
 * none is left.  As GROUP BY would: a null key is a key of its own.
 */
static void
sum_per_key(DwhColumn *users, DwhColumn *keys, DwhColumn *deltas,
			Datum *arrays, bool *nulls)
{
	int			n = users->n;
	KeyedDelta *rows;
	DwhColumn	out[3];
	int			i;

	if (keys->n != n || deltas->n != n)
		elog(ERROR, "mart deltas of unequal lengths: %d, %d and %d",
			 n, keys->n, deltas->n);
	rows = palloc(sizeof(KeyedDelta) * Max(n, 1));
	for (i = 0; i < n; i++)
	{
		rows[i].user_id = users->values[i];
		rows[i].user_null = users->nulls[i];
		rows[i].key = keys->values[i];
		rows[i].key_null = keys->nulls[i];
		rows[i].delta = deltas->nulls[i] ? 0 : DatumGetInt32(deltas->values[i]);
	}
	qsort(rows, n, sizeof(KeyedDelta), keyed_delta_cmp);

	dwh_column_init(&out[0], UUIDOID, n);
	dwh_column_init(&out[1], UUIDOID, n);
	dwh_column_init(&out[2], INT4OID, n);
	i = 0;
	while (i < n)
	{
		int64		sum = 0;
		int			first = i;

		for (; i < n && keyed_delta_cmp(&rows[first], &rows[i]) == 0; i++)
			sum += rows[i].delta;
		if (sum == 0)
			continue;
		if (sum < PG_INT32_MIN || sum > PG_INT32_MAX)
			ereport(ERROR,
					(errcode(ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE),
					 errmsg("integer out of range")));
		dwh_column_add(&out[0], rows[first].user_id, rows[first].user_null);
		dwh_column_add(&out[1], rows[first].key, rows[first].key_null);
		dwh_column_add(&out[2], Int32GetDatum((int32) sum), false);
	}
	for (i = 0; i < 3; i++)
	{
		nulls[i] = out[0].n == 0;
		arrays[i] = nulls[i] ? (Datum) 0 : dwh_column_array(&out[i]);
	}
}

/*
 * dwh_mart_deltas_summed
 *		The deltas handed over by several trigger calls, as the arguments of
 *		dwh.apply_mart_deltas(): summed per key, each mart's in key order.
 */
void
dwh_mart_deltas_summed(DwhMartDeltas *d, Datum *arrays, bool *nulls)
{
	sum_per_key(&d->all[0], &d->all[1], &d->all[2], &arrays[0], &nulls[0]);
	sum_per_key(&d->all[3], &d->all[4], &d->all[5], &arrays[3], &nulls[3]);
}

/*
 * The session as the order triggers see it (install/50_orders.sql).
 */
PG_FUNCTION_INFO_V1(dwh_keys_claimed);

/*
 * dwh.keys_claimed() returns boolean
 *
 * Has the running ingest claimed the keys of the versions that the calling
 * trigger is writing?  False for any other writer.
 */
Datum
dwh_keys_claimed(PG_FUNCTION_ARGS)
{
	PG_RETURN_BOOL(dwh_ingest_session_keys_claimed());
}

PG_FUNCTION_INFO_V1(dwh_defer_mart_deltas);

/*
 * dwh.defer_mart_deltas(product_users uuid[], products uuid[],
 *		product_deltas int[], category_users uuid[], categories uuid[],
 *		category_deltas int[]) returns boolean
 *
 * True if the deltas were kept for the end of the current ingest upsert;
 * false if the caller must apply them itself (a direct write to STG).
 */
Datum
dwh_defer_mart_deltas(PG_FUNCTION_ARGS)
{
	Datum		arrays[DWH_MART_DELTA_ARRAYS];
	bool		nulls[DWH_MART_DELTA_ARRAYS];
	int			i;

	for (i = 0; i < DWH_MART_DELTA_ARRAYS; i++)
	{
		nulls[i] = PG_ARGISNULL(i);
		arrays[i] = nulls[i] ? (Datum) 0 : PG_GETARG_DATUM(i);
	}
	PG_RETURN_BOOL(dwh_ingest_session_defer_deltas(arrays, nulls));
}
