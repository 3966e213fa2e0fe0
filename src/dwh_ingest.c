/*-------------------------------------------------------------------------
 *
 * dwh_ingest.c
 *	  Set-based ingestion of raw order messages into STG.
 *
 * A batch is classified message by message in C (never raising an error
 * for a bad message), then written with one statement per destination:
 * orders are upserted into stg.order_events (whose triggers carry them on
 * to DDS and the marts), other object types go to stg.other_events, refused
 * messages to dwh.dead_letters.  The whole batch runs in a subtransaction;
 * if it fails for a reason that is about its data, it is retried message by
 * message, each in its own subtransaction, and only the messages that fail
 * again are dead-lettered, with the error.  Errors that are not about data
 * (deadlock, cancel, disk full, missing privilege) are raised to the caller,
 * which retries the batch: no message is ever skipped for them.
 *
 * The triggers that the batch's statements fire learn what the batch is
 * doing from its session (dwh_ingest_session.c, which describes the whole
 * path of a batch from C to SQL and back).  The SQL functions that hand a
 * batch in are in dwh_ingest_sql.c; the Kafka worker calls
 * dwh_ingest_batch() directly.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/jsonb.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "dwh_columns.h"
#include "dwh_dead_letter.h"
#include "dwh_inflight.h"
#include "dwh_ingest.h"
#include "dwh_ingest_session.h"
#include "dwh_locks.h"
#include "dwh_message.h"
#include "dwh_replan.h"
#include "dwh_session_mode.h"
#include "dwh_spi.h"

/*
 * Batches of at most this many messages, and this many bytes of them, run
 * with generic plans (ingest_batch; docs/benchmarks.md).  The bytes bound
 * the items: a generic plan estimates an array of a few elements, and
 * joins one large order's thousands of items by nested loops.
 */
#define SMALL_BATCH 8
#define SMALL_BATCH_BYTES (16 * 1024)

/*
 * The plans of the statements below, kept for the life of the backend.  They
 * are the only state of this file that outlives a call, and they hold no
 * state of a batch: what a batch shares with its triggers is in its session.
 */
static SPIPlanPtr upsert_orders_plan = NULL;
static SPIPlanPtr insert_others_plan = NULL;
static SPIPlanPtr insert_dead_plan = NULL;
static SPIPlanPtr apply_direct_plan = NULL;
static SPIPlanPtr insert_history_plan = NULL;
static SPIPlanPtr claim_plan = NULL;
static SPIPlanPtr namings_plan = NULL;

/*
 * The statements below run with search_path pg_catalog, pg_temp: the SET
 * clause of the SQL entry points, or the workers' own
 * (dwh_worker_settings).  A multi-argument unnest in FROM cannot be
 * schema-qualified.
 *
 * The orders come one row per object_id, in object_id order (parallel
 * batches lock their rows in the same order), newest version only: see
 * newest_orders().  Every row of the batch's orders is locked, but one
 * that is older than the stored version is not updated (nor seen by the
 * STG guard): it goes to the history table with the batch's other
 * superseded versions.  RETURNING names the orders that were stored.
 * Set-returning functions in the select list hand the array elements over
 * one by one, where unnest() in FROM would first copy every payload into a
 * tuplestore.
 */
static const char *upsert_orders_sql =
"INSERT INTO stg.order_events AS t (object_id, object_type, sent_dttm, payload) "
"SELECT unnest($1::bigint[]), 'order', unnest($2::timestamp[]), unnest($3::jsonb[]) "
"ON CONFLICT (object_id) DO UPDATE "
"SET object_type = EXCLUDED.object_type, sent_dttm = EXCLUDED.sent_dttm, "
"    payload = EXCLUDED.payload "
"WHERE EXCLUDED.update_ts >= t.update_ts "
"RETURNING t.object_id";

/*
 * Other events and dead letters are identified by their source, Kafka
 * position and bytes (the unique index on stg.other_events and on
 * dwh.dead_letters): the same bytes handed in again from the same source at
 * the same position are a replay and are not written; a position that a
 * SQL caller named is another identity than the Kafka worker's.  A message
 * stored where other bytes are already stored, in either table or earlier
 * in the statement ($10, computed in C), is flagged.  RETURNING says what
 * was written.
 */
static const char *insert_others_sql =
"INSERT INTO stg.other_events AS t "
"  (object_id, object_type, sent_dttm, message, topic, kafka_partition, kafka_offset, "
"   source, raw_sha256, position_mismatch) "
"SELECT m.object_id, m.object_type, m.sent_dttm, m.message, $5, m.kafka_partition, m.kafka_offset, "
"       $8, m.raw_sha256, "
"       m.kafka_offset IS NOT NULL AND (m.mismatch "
"         OR EXISTS (SELECT FROM stg.other_events x "
"                    WHERE x.kafka_partition = m.kafka_partition AND x.kafka_offset = m.kafka_offset "
"                      AND x.source = $8 AND x.topic IS NOT DISTINCT FROM $5 "
"                      AND x.raw_sha256 <> m.raw_sha256) "
"         OR EXISTS (SELECT FROM dwh.dead_letters x "
"                    WHERE x.kafka_partition = m.kafka_partition AND x.kafka_offset = m.kafka_offset "
"                      AND x.source = $8 AND x.topic IS NOT DISTINCT FROM $5 "
"                      AND x.raw_sha256 <> m.raw_sha256)) "
"FROM unnest($1::bigint[], $2::text[], $3::timestamp[], $4::jsonb[], $6::int[], $7::bigint[], "
"            $9::bytea[], $10::boolean[]) "
"     AS m(object_id, object_type, sent_dttm, message, kafka_partition, kafka_offset, "
"          raw_sha256, mismatch) "
"ON CONFLICT (kafka_partition, kafka_offset, source, topic, raw_sha256) "
"  WHERE kafka_offset IS NOT NULL "
"DO NOTHING "
"RETURNING t.position_mismatch";

static const char *insert_dead_sql =
"INSERT INTO dwh.dead_letters AS t "
"  (source, topic, kafka_partition, kafka_offset, raw, reason, sqlstate, "
"   raw_length, raw_sha256, position_mismatch) "
"SELECT $1, $2, d.kafka_partition, d.kafka_offset, d.raw, d.reason, d.sqlstate, "
"       d.raw_length, d.raw_sha256, "
"       d.kafka_offset IS NOT NULL AND (d.mismatch "
"         OR EXISTS (SELECT FROM dwh.dead_letters x "
"                    WHERE x.kafka_partition = d.kafka_partition AND x.kafka_offset = d.kafka_offset "
"                      AND x.source = $1 AND x.topic IS NOT DISTINCT FROM $2 "
"                      AND x.raw_sha256 <> d.raw_sha256) "
"         OR EXISTS (SELECT FROM stg.other_events x "
"                    WHERE x.kafka_partition = d.kafka_partition AND x.kafka_offset = d.kafka_offset "
"                      AND x.source = $1 AND x.topic IS NOT DISTINCT FROM $2 "
"                      AND x.raw_sha256 <> d.raw_sha256)) "
"FROM unnest($3::int[], $4::bigint[], $5::bytea[], $6::text[], $7::text[], "
"            $8::bigint[], $9::bytea[], $10::boolean[]) "
"     AS d(kafka_partition, kafka_offset, raw, reason, sqlstate, raw_length, raw_sha256, mismatch) "
"ON CONFLICT (kafka_partition, kafka_offset, source, topic, raw_sha256) "
"  WHERE kafka_offset IS NOT NULL "
"DO NOTHING "
"RETURNING t.position_mismatch";

/*
 * Versions of the batch that are not current: superseded by a newer one of
 * the same batch or by the stored one (unless they are the stored one).
 */
static const char *insert_history_sql =
"INSERT INTO stg.order_event_history AS h (object_id, update_ts, payload, sent_dttm) "
"SELECT v.* FROM unnest($1::bigint[], $2::timestamp[], $3::jsonb[], $4::timestamp[]) "
"     AS v(object_id, update_ts, payload, sent_dttm) "
"WHERE NOT EXISTS (SELECT FROM stg.order_events e "
"                  WHERE e.object_id = v.object_id AND e.update_ts = v.update_ts "
"                    AND e.payload::text = v.payload::text) "
"ORDER BY 1, 2 "
"ON CONFLICT (object_id, update_ts, payload_md5) DO UPDATE "
"SET sent_dttm = EXCLUDED.sent_dttm WHERE EXCLUDED.sent_dttm > h.sent_dttm";

/*
 * Steps 1 and 2 of the lock order (install/40_products.sql): the dictionary
 * lock and the keys that batches share, for every version of the batch.
 */
static const char *claim_sql =
"SELECT ids, names, item_versions, first_versions FROM dwh.claim_order_keys($1::jsonb[], $2::timestamp[], $3)";

/* Step 6: the dishes' first and newest order namings, after the marts. */
static const char *namings_sql =
"SELECT dwh.load_order_namings($1::text[], $2::text[], $3::timestamp[], $4::timestamp[])";

/* The claim's results, load_order_namings' arguments. */
#define NAMING_ARRAYS 4

static void
prepare_plans(void)
{
	if (upsert_orders_plan == NULL)
	{
		Oid			types[3] = {INT8ARRAYOID, TIMESTAMPARRAYOID, JSONBARRAYOID};

		upsert_orders_plan = dwh_prepare_kept(upsert_orders_sql, 3, types);
	}
	if (insert_others_plan == NULL)
	{
		Oid			types[10] = {INT8ARRAYOID, TEXTARRAYOID, TIMESTAMPARRAYOID,
			JSONBARRAYOID, TEXTOID, INT4ARRAYOID, INT8ARRAYOID, TEXTOID,
		BYTEAARRAYOID, BOOLARRAYOID};

		insert_others_plan = dwh_prepare_kept(insert_others_sql, 10, types);
	}
	if (insert_dead_plan == NULL)
	{
		Oid			types[10] = {TEXTOID, TEXTOID, INT4ARRAYOID, INT8ARRAYOID,
			BYTEAARRAYOID, TEXTARRAYOID, TEXTARRAYOID, INT8ARRAYOID,
		BYTEAARRAYOID, BOOLARRAYOID};

		insert_dead_plan = dwh_prepare_kept(insert_dead_sql, 10, types);
	}
	if (insert_history_plan == NULL)
	{
		Oid			types[4] = {INT8ARRAYOID, TIMESTAMPARRAYOID, JSONBARRAYOID,
		TIMESTAMPARRAYOID};

		insert_history_plan = dwh_prepare_kept(insert_history_sql, 4, types);
	}
	if (claim_plan == NULL)
	{
		Oid			types[3] = {JSONBARRAYOID, TIMESTAMPARRAYOID, BOOLOID};

		claim_plan = dwh_prepare_kept(claim_sql, 3, types);
	}
	if (namings_plan == NULL)
	{
		Oid			types[NAMING_ARRAYS] = {TEXTARRAYOID, TEXTARRAYOID,
		TIMESTAMPARRAYOID, TIMESTAMPARRAYOID};

		namings_plan = dwh_prepare_kept(namings_sql, NAMING_ARRAYS, types);
	}
}

static Datum
text_datum(const char *s)
{
	return PointerGetDatum(cstring_to_text(s));
}

static Datum
jsonb_copy(Jsonb *jb)
{
	Jsonb	   *copy = palloc(VARSIZE(jb));

	memcpy(copy, jb, VARSIZE(jb));
	return JsonbPGetDatum(copy);
}

/*
 * By object_id, then newest version first: versions are ordered by
 * (update_ts, payload text), as the STG guard orders them.
 */
static int
order_row_cmp(const void *a, const void *b)
{
	const DwhIngestOrder *x = (const DwhIngestOrder *) a;
	const DwhIngestOrder *y = (const DwhIngestOrder *) b;

	if (x->object_id != y->object_id)
		return x->object_id < y->object_id ? -1 : 1;
	if (x->update_ts != y->update_ts)
		return x->update_ts > y->update_ts ? -1 : 1;
	return -dwh_jsonb_text_cmp(x->payload, y->payload);
}

/*
 * Sort rows[0..n-1] and keep the newest version of each order in front;
 * returns how many rows that is.  One statement must not touch a row
 * twice, so the batch's other versions of the same orders are moved to
 * superseded[0..*n_superseded-1], for the history table.  A version that
 * comes twice is kept once, with the later sent_dttm.
 */
static int
newest_orders(DwhIngestOrder *rows, int n, DwhIngestOrder *superseded,
			  int *n_superseded)
{
	int			kept = 0;
	int			i;

	*n_superseded = 0;
	if (n > 1)
		qsort(rows, n, sizeof(DwhIngestOrder), order_row_cmp);
	for (i = 0; i < n; i++)
	{
		DwhIngestOrder *prev = NULL;

		if (*n_superseded > 0 &&
			superseded[*n_superseded - 1].object_id == rows[i].object_id)
			prev = &superseded[*n_superseded - 1];
		else if (kept > 0 && rows[kept - 1].object_id == rows[i].object_id)
			prev = &rows[kept - 1];

		if (prev == NULL)
		{
			rows[kept++] = rows[i];
			continue;
		}
		if (prev->update_ts == rows[i].update_ts &&
			VARSIZE(prev->payload) == VARSIZE(rows[i].payload) &&
			memcmp(prev->payload, rows[i].payload, VARSIZE(prev->payload)) == 0)
		{
			prev->sent_dttm = Max(prev->sent_dttm, rows[i].sent_dttm);
			continue;
		}
		superseded[(*n_superseded)++] = rows[i];
	}
	return kept;
}

/*
 * The position columns of a statement's rows: position_cmp orders row
 * numbers by position, then by row number.
 */
typedef struct PositionedColumns
{
	DwhColumn  *partition;
	DwhColumn  *offset;
} PositionedColumns;

static int
position_cmp(const void *a, const void *b, void *arg)
{
	PositionedColumns *c = (PositionedColumns *) arg;
	int			x = *(const int *) a;
	int			y = *(const int *) b;
	int32		px = DatumGetInt32(c->partition->values[x]);
	int32		py = DatumGetInt32(c->partition->values[y]);
	int64		ox = DatumGetInt64(c->offset->values[x]);
	int64		oy = DatumGetInt64(c->offset->values[y]);

	if (px != py)
		return px < py ? -1 : 1;
	if (ox != oy)
		return ox < oy ? -1 : 1;
	return x < y ? -1 : (x > y ? 1 : 0);
}

static bool
hash_equal(Datum a, Datum b)
{
	return memcmp(VARDATA_ANY(DatumGetPointer(a)), VARDATA_ANY(DatumGetPointer(b)),
				  DWH_SHA256_LEN) == 0;
}

/*
 * The mismatch column of a statement's rows: true for a row that comes
 * after another one with other bytes at the same position, in the
 * statement's own order.  The statement checks the rows stored before it
 * itself; these it cannot see.
 */
static Datum
mismatches_in_statement(DwhColumn *partition, DwhColumn *offset,
						DwhColumn *hash)
{
	PositionedColumns c = {partition, offset};
	DwhColumn	flags;
	bool	   *flagged = palloc0(sizeof(bool) * Max(hash->n, 1));
	int		   *order = palloc(sizeof(int) * Max(hash->n, 1));
	int			n = 0;
	int			i;

	for (i = 0; i < hash->n; i++)
		if (!offset->nulls[i])
			order[n++] = i;
	if (n > 1)
		qsort_arg(order, n, sizeof(int), position_cmp, &c);

	/*
	 * Rows of one position, in their order: a row is flagged when a row
	 * before it has other bytes, which is always true once two different
	 * hashes have been seen.
	 */
	for (i = 0; i < n;)
	{
		Datum		first = hash->values[order[i]];
		bool		mixed = false;
		int			k;

		for (k = i + 1;
			 k < n &&
			 DatumGetInt32(partition->values[order[k]]) ==
			 DatumGetInt32(partition->values[order[i]]) &&
			 DatumGetInt64(offset->values[order[k]]) ==
			 DatumGetInt64(offset->values[order[i]]);
			 k++)
		{
			if (mixed || !hash_equal(hash->values[order[k]], first))
			{
				flagged[order[k]] = true;
				mixed = true;
			}
		}
		i = k;
	}

	dwh_column_init(&flags, BOOLOID, Max(hash->n, 1));
	for (i = 0; i < hash->n; i++)
		dwh_column_add(&flags, BoolGetDatum(flagged[i]), false);
	return dwh_column_array(&flags);
}

/*
 * Count what an insert ... RETURNING position_mismatch wrote: the rows it
 * did not write were already stored (replays).
 */
static void
count_written(int handed, const char *what, int rc, int *stored,
			  DwhIngestResult *result)
{
	uint64		r;

	if (rc != SPI_OK_INSERT_RETURNING)
		elog(ERROR, "could not store %s: %s", what, SPI_result_code_string(rc));
	*stored += (int) SPI_processed;
	result->replayed += handed - (int) SPI_processed;
	for (r = 0; r < SPI_processed; r++)
	{
		bool		isnull;

		if (DatumGetBool(SPI_getbinval(SPI_tuptable->vals[r],
									   SPI_tuptable->tupdesc, 1, &isnull)))
			result->mismatched++;
	}
}

/* The dead letters of one batch, written with a single statement. */
typedef struct DeadLetters
{
	DwhColumn	partition,
				offset,
				raw,
				reason,
				sqlstate,
				length,
				hash;
} DeadLetters;

static void
dead_letters_init(DeadLetters *dl, int capacity)
{
	dwh_column_init(&dl->partition, INT4OID, capacity);
	dwh_column_init(&dl->offset, INT8OID, capacity);
	dwh_column_init(&dl->raw, BYTEAOID, capacity);
	dwh_column_init(&dl->reason, TEXTOID, capacity);
	dwh_column_init(&dl->sqlstate, TEXTOID, capacity);
	dwh_column_init(&dl->length, INT8OID, capacity);
	dwh_column_init(&dl->hash, BYTEAOID, capacity);
}

/*
 * Add a refused item: its first dwh.dead_letter_keep_bytes bytes, its
 * length and the hash of all of it.
 */
static void
dead_letters_add(DeadLetters *dl, DwhIngestItem *item, int sqlstate,
				 const char *reason)
{
	dwh_column_add(&dl->partition, Int32GetDatum(item->partition),
				   !item->has_coordinates);
	dwh_column_add(&dl->offset, Int64GetDatum(item->offset),
				   !item->has_coordinates);
	dwh_column_add(&dl->raw,
				   dwh_bytea_datum(item->data, (int) dwh_dead_letter_kept(item->len)),
				   false);
	dwh_column_add(&dl->reason, text_datum(dwh_valid_utf8(reason)), false);
	dwh_column_add(&dl->sqlstate, text_datum(unpack_sql_state(sqlstate)), false);
	dwh_column_add(&dl->length, Int64GetDatum((int64) item->len), false);
	dwh_column_add(&dl->hash, dwh_sha256_datum(item->data, item->len), false);
}

/*
 * The dictionary lock shared, before the rows of a batch that has no
 * claim to take it (step 1 of the lock order): dead letters and other
 * events are rows another batch may wait for (their positions are
 * unique).  Taken again by one that has, it changes nothing.
 */
static void
dictionary_lock_shared(void)
{
	if (SPI_execute("SELECT dwh.xact_lock(dwh.dictionary_lock_key(), false)",
					false, 0) != SPI_OK_SELECT)
		elog(ERROR, "could not take the dictionary lock");
}

static void
dead_letters_write(DeadLetters *dl, const char *source, const char *topic,
				   DwhIngestResult *result)
{
	Datum		args[10];
	char		nulls[10] = "          ";
	int			rc;

	if (dl->raw.n == 0)
		return;
	dictionary_lock_shared();
	args[0] = text_datum(source);
	args[1] = topic ? text_datum(topic) : (Datum) 0;
	nulls[1] = topic ? ' ' : 'n';
	args[2] = dwh_column_array(&dl->partition);
	args[3] = dwh_column_array(&dl->offset);
	args[4] = dwh_column_array(&dl->raw);
	args[5] = dwh_column_array(&dl->reason);
	args[6] = dwh_column_array(&dl->sqlstate);
	args[7] = dwh_column_array(&dl->length);
	args[8] = dwh_column_array(&dl->hash);
	args[9] = mismatches_in_statement(&dl->partition, &dl->offset, &dl->hash);
	rc = SPI_execute_plan(insert_dead_plan, args, nulls, false, 0);
	count_written(dl->raw.n, "dead letters", rc, &result->dead_lettered, result);
}

/*
 * The mart deltas that the order triggers of an upsert handed to its
 * session (dwh_ingest_session_defer_deltas), applied in one sorted pass:
 * one upsert fires both the INSERT and the UPDATE statement triggers of
 * stg.order_events, and two passes would let two batches cross between
 * them and deadlock.  One call's deltas are already grouped by key (the
 * usual case: a batch of new orders fires the INSERT trigger only); those
 * of several calls are summed per key first (dwh_mart_deltas_summed).
 */
static const char *apply_direct_sql =
"SELECT dwh.apply_mart_deltas($1, $2, $3, $4, $5, $6)";

/* Is this the claim's 40001 (the batch renames a dish)? */
static bool
is_serialization_failure(ErrorData *edata)
{
	return edata->sqlerrcode == ERRCODE_T_R_SERIALIZATION_FAILURE;
}

/*
 * The columns of rows[0..n-1] as arrays, for the statements below:
 * arrays[0] object_id, [1] update_ts, [2] payload, [3] sent_dttm.
 */
static void
order_arrays(DwhIngestOrder *rows, int n, Datum *arrays)
{
	DwhColumn	ids,
				versions,
				payloads,
				sent;
	int			i;

	dwh_column_init(&ids, INT8OID, n);
	dwh_column_init(&versions, TIMESTAMPOID, n);
	dwh_column_init(&payloads, JSONBOID, n);
	dwh_column_init(&sent, TIMESTAMPOID, n);
	for (i = 0; i < n; i++)
	{
		dwh_column_add(&ids, Int64GetDatum(rows[i].object_id), false);
		dwh_column_add(&versions, TimestampGetDatum(rows[i].update_ts), false);
		dwh_column_add(&payloads, JsonbPGetDatum(rows[i].payload), false);
		dwh_column_add(&sent, TimestampGetDatum(rows[i].sent_dttm), false);
	}
	arrays[0] = dwh_column_array(&ids);
	arrays[1] = dwh_column_array(&versions);
	arrays[2] = dwh_column_array(&payloads);
	arrays[3] = dwh_column_array(&sent);
}

/* Arguments and result of the claim. */
typedef struct ClaimCall
{
	Datum		args[3];
	Datum		namings[NAMING_ARRAYS]; /* the batch's namings of each dish */
	bool		namings_null[NAMING_ARRAYS];
} ClaimCall;

static void
claim_call(void *arg)
{
	ClaimCall  *c = (ClaimCall *) arg;
	MemoryContext caller = CurrentMemoryContext;
	int			i;

	if (SPI_execute_plan(claim_plan, c->args, NULL, false, 0) != SPI_OK_SELECT ||
		SPI_processed != 1)
		elog(ERROR, "could not claim the keys of the batch");
	for (i = 0; i < NAMING_ARRAYS; i++)
	{
		Datum		value = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc,
										  i + 1, &c->namings_null[i]);

		/* Out of SPI's memory: the upsert comes before they are used. */
		MemoryContextSwitchTo(caller);
		c->namings[i] = c->namings_null[i] ? (Datum) 0 :
			PointerGetDatum(PG_DETOAST_DATUM_COPY(value));
	}
}

/*
 * Steps 1 and 2 of the lock order for every version of the batch
 * (rows[0..n-1] and more[0..n_more-1]); call receives the batch's newest
 * naming of each dish, for step 6.  The dictionary lock is taken shared;
 * if the batch renames a dish (40001), the claim is rolled back, locks
 * included, and taken again with the lock exclusive.
 */
static void
claim_keys(DwhIngestOrder *rows, int n, DwhIngestOrder *more, int n_more,
		   ClaimCall *call)
{
	DwhIngestOrder *all = palloc(sizeof(DwhIngestOrder) * Max(n + n_more, 1));
	Datum		arrays[4];
	ErrorData  *edata;

	memcpy(all, rows, sizeof(DwhIngestOrder) * n);
	memcpy(all + n, more, sizeof(DwhIngestOrder) * n_more);
	order_arrays(all, n + n_more, arrays);
	call->args[0] = arrays[2];
	call->args[1] = arrays[1];
	call->args[2] = BoolGetDatum(false);

	edata = dwh_run_in_subtransaction(claim_call, call, true,
									  is_serialization_failure);
	if (edata != NULL)
	{
		FreeErrorData(edata);
		call->args[2] = BoolGetDatum(true);
		claim_call(call);
	}
}

/* Binary search of object_id in the sorted ids[0..n-1]. */
static bool
id_in(int64 object_id, const int64 *ids, int n)
{
	int			lo = 0;
	int			hi = n - 1;

	while (lo <= hi)
	{
		int			mid = lo + (hi - lo) / 2;

		if (ids[mid] == object_id)
			return true;
		if (ids[mid] < object_id)
			lo = mid + 1;
		else
			hi = mid - 1;
	}
	return false;
}

static int
compare_int64(const void *a, const void *b)
{
	int64		x = *(const int64 *) a;
	int64		y = *(const int64 *) b;

	return x < y ? -1 : (x > y ? 1 : 0);
}

/*
 * Keep rows[0..n-1] in the history table (step 4 of the lock order: every
 * order of the batch has its stg.order_events row locked by now).
 */
static void
keep_superseded(DwhIngestOrder *rows, int n)
{
	Datum		args[4];

	if (n == 0)
		return;
	order_arrays(rows, n, args);
	if (SPI_execute_plan(insert_history_plan, args, NULL, false, 0) != SPI_OK_INSERT)
		elog(ERROR, "could not keep superseded orders");
}

/*
 * Steps 3 to 5 of the lock order, in session (the batch's keys claimed):
 * upsert rows[0..n-1] (the newest version of each order of the batch)
 * with the triggers' mart deltas kept in the session, keep the versions
 * that are not current (superseded[0..n_superseded-1] and the rows older
 * than the stored version) in the history table, then apply the mart
 * deltas in one sorted pass.  Returns how many rows were stored.
 */
static uint64
upsert_orders_deferred(DwhIngestSession *session, DwhIngestOrder *rows, int n,
					   DwhIngestOrder *superseded, int n_superseded)
{
	Oid			types[DWH_MART_DELTA_ARRAYS] = {UUIDARRAYOID, UUIDARRAYOID,
	INT4ARRAYOID, UUIDARRAYOID, UUIDARRAYOID, INT4ARRAYOID};
	DwhMartDeltas *d;
	Datum		arrays[4];
	Datum		args[3];
	int			rc;
	uint64		processed;
	int64	   *stored;
	uint64		r;
	int			i;

	order_arrays(rows, n, arrays);
	args[0] = arrays[0];		/* object_id */
	args[1] = arrays[3];		/* sent_dttm */
	args[2] = arrays[2];		/* payload */

	/*
	 * While the upsert runs, the guard takes these rows' checks as done and
	 * the order triggers hand their deltas to the session.
	 */
	dwh_ingest_session_start_upsert(session, rows, n);
	rc = SPI_execute_plan(upsert_orders_plan, args, NULL, false, 0);
	if (rc != SPI_OK_INSERT_RETURNING)
		elog(ERROR, "could not store orders: %s", SPI_result_code_string(rc));
	d = dwh_ingest_session_end_upsert(session);
	processed = SPI_processed;

	/* The rows not stored are not current: into the history with the rest. */
	stored = palloc(sizeof(int64) * Max(processed, 1));
	for (r = 0; r < processed; r++)
	{
		bool		isnull;

		stored[r] = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[r],
												SPI_tuptable->tupdesc, 1, &isnull));
	}
	qsort(stored, processed, sizeof(int64), compare_int64);
	for (i = 0; i < n; i++)
		if (!id_in(rows[i].object_id, stored, processed))
			superseded[n_superseded++] = rows[i];
	keep_superseded(superseded, n_superseded);

	if (d->calls >= 1)
	{
		Datum		summed[DWH_MART_DELTA_ARRAYS];
		bool		summed_null[DWH_MART_DELTA_ARRAYS];
		Datum	   *args = d->first;
		bool	   *arg_null = d->first_null;
		char		nulls[DWH_MART_DELTA_ARRAYS];

		if (d->calls > 1)
		{
			dwh_mart_deltas_summed(d, summed, summed_null);
			args = summed;
			arg_null = summed_null;
		}
		for (i = 0; i < DWH_MART_DELTA_ARRAYS; i++)
			nulls[i] = arg_null[i] ? 'n' : ' ';
		if (apply_direct_plan == NULL)
			apply_direct_plan = dwh_prepare_kept(apply_direct_sql,
												 DWH_MART_DELTA_ARRAYS, types);
		if (SPI_execute_plan(apply_direct_plan, args, nulls, false,
							 0) != SPI_OK_SELECT)
			elog(ERROR, "could not apply the mart deltas");
	}
	return processed;
}

/*
 * upsert_orders_deferred in an ingest session: the batch's keys are
 * claimed, so the order triggers skip their own claim (dwh.keys_claimed()).
 * The session is popped whatever happens (dwh_ingest_session.c says why
 * an abort would drop it too).
 */
static uint64
upsert_claimed(DwhIngestOrder *rows, int n, DwhIngestOrder *superseded,
			   int n_superseded)
{
	DwhIngestSession *session = dwh_ingest_session_push();
	volatile uint64 stored = 0;

	PG_TRY();
	{
		stored = upsert_orders_deferred(session, rows, n, superseded,
										n_superseded);
	}
	PG_FINALLY();
	{
		dwh_ingest_session_pop(session);
	}
	PG_END_TRY();
	return stored;
}

/*
 * Classify and write items[0..n-1].  Raises an error if any statement
 * fails; the caller decides what the error means.  With a Kafka worker's
 * number and deferred[], the orders another worker is applying are left
 * out (deferred[i] set) instead of written.
 */
static void
ingest_messages(DwhIngestItem *items, int n, const char *source,
				const char *topic, int worker, bool *deferred,
				DwhIngestResult *result)
{
	DwhIngestOrder *orders;
	int			n_orders = 0;
	DwhColumn	x_id,
				x_type,
				x_sent,
				x_message,
				x_partition,
				x_offset,
				x_hash;
	DeadLetters dl;
	MemoryContext parse_cxt;
	int			i;
	int			rc;

	orders = palloc(sizeof(DwhIngestOrder) * Max(n, 1));
	dwh_column_init(&x_id, INT8OID, n);
	dwh_column_init(&x_type, TEXTOID, n);
	dwh_column_init(&x_sent, TIMESTAMPOID, n);
	dwh_column_init(&x_message, JSONBOID, n);
	dwh_column_init(&x_partition, INT4OID, n);
	dwh_column_init(&x_offset, INT8OID, n);
	dwh_column_init(&x_hash, BYTEAOID, n);
	dead_letters_init(&dl, n);

	/*
	 * Parsing leaves several times a message's size of garbage: it goes with
	 * each message, so that a batch keeps only what it stores.
	 */
	parse_cxt = AllocSetContextCreate(CurrentMemoryContext,
									  "dwh message parsing",
									  ALLOCSET_DEFAULT_SIZES);
	for (i = 0; i < n; i++)
	{
		DwhMessage	msg;
		MemoryContext batch_cxt;

		CHECK_FOR_INTERRUPTS();
		batch_cxt = MemoryContextSwitchTo(parse_cxt);
		dwh_message_parse(items[i].data, items[i].len, &msg);
		MemoryContextSwitchTo(batch_cxt);
		switch (msg.kind)
		{
			case DWH_MESSAGE_ORDER:
				if (worker > 0 && !dwh_inflight_claim(worker, msg.object_id))
				{
					deferred[i] = true;
					result->deferred++;
					break;
				}
				orders[n_orders].object_id = msg.object_id;
				orders[n_orders].sent_dttm = msg.sent_dttm;
				orders[n_orders].update_ts = msg.update_ts;
				orders[n_orders].payload = DatumGetJsonbP(jsonb_copy(msg.payload));
				n_orders++;
				break;
			case DWH_MESSAGE_OTHER:
				dwh_column_add(&x_id, Int64GetDatum(msg.object_id),
							   !msg.has_object_id);
				dwh_column_add(&x_type, text_datum(msg.object_type), false);
				dwh_column_add(&x_sent, TimestampGetDatum(msg.sent_dttm),
							   !msg.has_sent_dttm);
				dwh_column_add(&x_message, jsonb_copy(msg.message), false);
				dwh_column_add(&x_partition, Int32GetDatum(items[i].partition),
							   !items[i].has_coordinates);
				dwh_column_add(&x_offset, Int64GetDatum(items[i].offset),
							   !items[i].has_coordinates);
				dwh_column_add(&x_hash, dwh_sha256_datum(items[i].data, items[i].len),
							   false);
				break;
			case DWH_MESSAGE_INVALID:
				dead_letters_add(&dl, &items[i], msg.problem.sqlstate,
								 msg.problem.reason);
				break;
		}
		MemoryContextReset(parse_cxt);
	}
	MemoryContextDelete(parse_cxt);

	if (n_orders > 0)
	{
		/* Room for every version: the stored rows' elders join them. */
		DwhIngestOrder *superseded = palloc(sizeof(DwhIngestOrder) * n_orders);
		int			n_superseded;
		int			kept = newest_orders(orders, n_orders, superseded,
										 &n_superseded);
		uint64		stored;
		ClaimCall	claim;
		char		nulls[NAMING_ARRAYS];
		int			j;

		claim_keys(orders, kept, superseded, n_superseded, &claim);
		stored = upsert_claimed(orders, kept, superseded, n_superseded);
		for (j = 0; j < NAMING_ARRAYS; j++)
			nulls[j] = claim.namings_null[j] ? 'n' : ' ';
		if (SPI_execute_plan(namings_plan, claim.namings, nulls, false, 0) != SPI_OK_SELECT)
			elog(ERROR, "could not load the namings of the batch");
		result->applied += stored;
		/* Not current: kept in the history (or the stored one again). */
		result->unchanged += n_orders - stored;
	}
	if (x_id.n > 0)
	{
		Datum		args[10];
		char		nulls[10] = "          ";

		args[0] = dwh_column_array(&x_id);
		args[1] = dwh_column_array(&x_type);
		args[2] = dwh_column_array(&x_sent);
		args[3] = dwh_column_array(&x_message);
		args[4] = topic ? text_datum(topic) : (Datum) 0;
		nulls[4] = topic ? ' ' : 'n';
		args[5] = dwh_column_array(&x_partition);
		args[6] = dwh_column_array(&x_offset);
		args[7] = text_datum(source);
		args[8] = dwh_column_array(&x_hash);
		args[9] = mismatches_in_statement(&x_partition, &x_offset, &x_hash);
		if (n_orders == 0)
			dictionary_lock_shared();
		rc = SPI_execute_plan(insert_others_plan, args, nulls, false, 0);
		count_written(x_id.n, "other events", rc, &result->other_type, result);
	}
	dead_letters_write(&dl, source, topic, result);
}

/* The arguments of ingest_messages, for dwh_try_in_subtransaction. */
typedef struct IngestCall
{
	DwhIngestItem *items;
	int			n;
	const char *source;
	const char *topic;
	int			worker;
	bool	   *deferred;
	DwhIngestResult *result;
} IngestCall;

static void
ingest_call(void *arg)
{
	IngestCall *c = (IngestCall *) arg;

	ingest_messages(c->items, c->n, c->source, c->topic, c->worker,
					c->deferred, c->result);
}

/*
 * Run ingest_messages in a subtransaction.  Returns NULL on success, or the
 * error if it is about the data; any other error is raised again.
 */
static ErrorData *
ingest_in_subtransaction(DwhIngestItem *items, int n, const char *source,
						 const char *topic, int worker, bool *deferred,
						 DwhIngestResult *result)
{
	IngestCall	call = {items, n, source, topic, worker, deferred, result};

	return dwh_try_in_subtransaction(ingest_call, &call);
}

/*
 * Run ingest_messages for one item in a subtransaction that is rolled back
 * even when it succeeds.  Returns its error when the error is about the
 * data; NULL when it went through; any other error is raised again.
 */
static ErrorData *
trial_in_subtransaction(DwhIngestItem *item, const char *source,
						const char *topic)
{
	DwhIngestResult ignored = {0};
	IngestCall	call = {item, 1, source, topic, 0, NULL, &ignored};

	return dwh_run_in_subtransaction(ingest_call, &call, false,
									 dwh_error_is_about_data);
}

/*
 * Apply items[0..n-1] one by one, each in its own subtransaction; the ones
 * that fail go to dl.
 */
static void
ingest_one_by_one(DwhIngestItem *items, int n, const char *source,
				  const char *topic, DeadLetters *dl, DwhIngestResult *result)
{
	int			i;

	memset(result, 0, sizeof(DwhIngestResult));
	for (i = 0; i < n; i++)
	{
		DwhIngestResult one = {0};
		ErrorData  *edata;

		CHECK_FOR_INTERRUPTS();
		edata = ingest_in_subtransaction(&items[i], 1, source, topic, 0, NULL,
										 &one);
		if (edata != NULL)
		{
			dead_letters_add(dl, &items[i], edata->sqlerrcode, edata->message);
			FreeErrorData(edata);
			continue;
		}
		result->applied += one.applied;
		result->unchanged += one.unchanged;
		result->other_type += one.other_type;
		result->dead_lettered += one.dead_lettered;
		result->replayed += one.replayed;
		result->mismatched += one.mismatched;
	}
}

/*
 * Ingest n raw messages in the current transaction; with a Kafka worker's
 * number, leaving out the orders another worker is applying (see
 * dwh_ingest_batch_deferring).
 */
static void
ingest_batch(DwhIngestItem *items, int n, const char *source,
			 const char *topic, int worker, bool *deferred,
			 DwhIngestResult *result)
{
	ErrorData  *edata;
	int			guc_level;
	int64		bytes = 0;
	int			i;

	memset(result, 0, sizeof(DwhIngestResult));
	result->received = n;
	if (n == 0)
		return;
	for (i = 0; i < n; i++)
		bytes += items[i].len;

	dwh_require_read_committed();
	dwh_require_triggers();
	dwh_replan_if_grown();
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	prepare_plans();

	/*
	 * A small batch takes the generic plans.  With arrays of a few elements a
	 * custom plan always looks cheaper, so the plan cache would plan every
	 * statement of the chain again at every batch: a third of the CPU of a
	 * batch of one order.  Restored at the end, or by the abort.
	 *
	 * And no JIT, which PostgreSQL enables by default: it compiles a plan
	 * anew at each execution once its estimated cost passes jit_above_cost,
	 * as some of the chain's do on a large warehouse (168 ms in one batch of
	 * a drain, for a statement taking 5 on average), and a batch is over
	 * before that pays back.
	 */
	guc_level = NewGUCNestLevel();
	(void) set_config_option("jit", "off", PGC_USERSET, PGC_S_SESSION,
							 GUC_ACTION_SAVE, true, 0, false);
	if (n <= SMALL_BATCH && bytes <= SMALL_BATCH_BYTES)
		(void) set_config_option("plan_cache_mode", "force_generic_plan",
								 PGC_USERSET, PGC_S_SESSION, GUC_ACTION_SAVE,
								 true, 0, false);

	edata = ingest_in_subtransaction(items, n, source, topic, worker, deferred,
									 result);
	if (edata != NULL)
	{
		DeadLetters dl;
		DwhIngestItem *good = palloc(sizeof(DwhIngestItem) * n);
		int			n_good = 0;

		/*
		 * Find the culprits: each message alone, in a subtransaction rolled
		 * back whatever happens.  Then the others go in as one batch again,
		 * which takes its locks in one pass (messages applied one by one
		 * would lock mart rows in several).  A lone message has just failed
		 * on its own: no second try.  Nothing is left out any more.
		 */
		if (deferred != NULL)
			memset(deferred, 0, sizeof(bool) * n);
		dead_letters_init(&dl, n);
		for (i = 0; i < n; i++)
		{
			CHECK_FOR_INTERRUPTS();
			if (n > 1)
				edata = trial_in_subtransaction(&items[i], source, topic);
			if (edata != NULL)
			{
				dead_letters_add(&dl, &items[i], edata->sqlerrcode,
								 edata->message);
				FreeErrorData(edata);
			}
			else
				good[n_good++] = items[i];
		}

		/*
		 * Every error above is freed, the batch's own included when a lone
		 * message failed: only a new attempt may leave one here.
		 */
		edata = NULL;
		memset(result, 0, sizeof(DwhIngestResult));
		if (n_good > 0)
			edata = ingest_in_subtransaction(good, n_good, source, topic, 0,
											 NULL, result);
		if (edata != NULL)
		{
			/*
			 * Good alone, bad together: apply them one by one, the dictionary
			 * lock exclusive, since one batch after another in one
			 * transaction would not take their locks in one order.
			 */
			FreeErrorData(edata);
			if (SPI_execute("SELECT dwh.xact_lock(dwh.dictionary_lock_key(), true)",
							false, 0) != SPI_OK_SELECT)
				elog(ERROR, "could not take the dictionary lock");
			ingest_one_by_one(good, n_good, source, topic, &dl, result);
		}
		result->received = n;
		dead_letters_write(&dl, source, topic, result);
	}

	AtEOXact_GUC(true, guc_level);
	SPI_finish();
}

/*
 * ingest_batch as one write of the lock order (src/dwh_locks.c), whose
 * count ends with it, error or not.  An empty batch writes nothing and is
 * no write.
 */
static void
ingest_batch_write(DwhIngestItem *items, int n, const char *source,
				   const char *topic, int worker, bool *deferred,
				   DwhIngestResult *result)
{
	if (n == 0)
	{
		ingest_batch(items, n, source, topic, worker, deferred, result);
		return;
	}
	dwh_locks_ingest_begin();
	PG_TRY();
	{
		ingest_batch(items, n, source, topic, worker, deferred, result);
	}
	PG_FINALLY();
	{
		dwh_locks_ingest_end();
	}
	PG_END_TRY();
}

/*
 * dwh_ingest_batch
 *		Ingest n raw messages in the current transaction.  source names the
 *		origin for dead letters ('kafka', 'sql'); topic may be NULL.
 */
void
dwh_ingest_batch(DwhIngestItem *items, int n, const char *source,
				 const char *topic, DwhIngestResult *result)
{
	ingest_batch_write(items, n, source, topic, 0, NULL, result);
}

/*
 * dwh_ingest_batch_deferring
 *		As dwh_ingest_batch, for Kafka worker number worker: the orders that
 *		another worker is applying are left out, deferred[i] set for each
 *		of their messages (result->deferred counts them), for the caller
 *		to apply in a transaction of their own after this one commits.
 *		This worker's orders stay marked until dwh_inflight_clear().
 */
void
dwh_ingest_batch_deferring(DwhIngestItem *items, int n, const char *topic,
						   int worker, bool *deferred, DwhIngestResult *result)
{
	memset(deferred, 0, sizeof(bool) * n);
	ingest_batch_write(items, n, "kafka", topic, worker, deferred, result);
}
