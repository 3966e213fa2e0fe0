/*-------------------------------------------------------------------------
 *
 * dwh_kafka_offsets.c
 *	  Kafka offsets stored in dwh.kafka_offsets, in the transaction of the
 *	  batch they belong to, and dwh.kafka_seek() to move them.
 *
 * The row of a partition is the single truth of how far it has been
 * applied: next_offset is the first offset not applied yet.  A worker locks
 * the rows of its batch's partitions (in partition order) before it
 * applies anything, and drops the messages below next_offset.  So if two
 * workers ever hold the same partition (a rebalance, a worker that has not
 * noticed it lost a partition), the second waits for the first to commit
 * and then skips what the first applied: a message is never applied twice.
 *
 * A partition whose stored offset the broker no longer holds has a gap:
 * dwh_kafka_offsets_gap() records it in dwh.kafka_gaps in the transaction
 * that moves the stored offset past it, or, when dwh.kafka_on_gap is
 * "stop", leaves the offset and records the gap as open: an open gap stops
 * the partition until dwh.kafka_seek() moves it, which closes the gap.  So
 * a gap is recorded exactly once, whatever crashes in between.
 *
 * With the offset, a batch stores the offset and SHA-256 of the message
 * it applied last (last_offset, last_sha256; with transactions, markers lie
 * between it and the stored offset): a worker starting the partition
 * checks that the broker still holds that message there
 * (dwh_kafka_verify.c).
 * Another log there is a gap too (replaced), from the stored offset back
 * to that log's start.  dwh.kafka_seek() and a skipped gap forget it.
 *
 * All functions here run inside the caller's transaction, with SPI.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "utils/array.h"
#include "utils/builtins.h"

#include "dwh_columns.h"
#include "dwh_dead_letter.h"
#include "dwh_kafka_offsets.h"
#include "dwh_kafka_options.h"
#include "dwh_settings.h"
#include "dwh_spi.h"
#include "dwh_status.h"
#include "dwh_version.h"

static Datum
int4_array(const int32 *values, int n)
{
	Datum	   *d = palloc(sizeof(Datum) * Max(n, 1));
	int			i;

	for (i = 0; i < n; i++)
		d[i] = Int32GetDatum(values[i]);
	return PointerGetDatum(construct_array(d, n, INT4OID, 4, true, TYPALIGN_INT));
}

static Datum
int8_array(const int64 *values, int n)
{
	Datum	   *d = palloc(sizeof(Datum) * Max(n, 1));
	int			i;

	for (i = 0; i < n; i++)
		d[i] = Int64GetDatum(values[i]);
	return PointerGetDatum(construct_array(d, n, INT8OID, 8, FLOAT8PASSBYVAL,
										   TYPALIGN_DOUBLE));
}

static void
connect_spi(void)
{
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
}

/*
 * Kept plans of the statements below: a worker runs some of them in every
 * batch, where parsing and planning them again cost more than running them.
 */
static SPIPlanPtr clear_seeks_plan = NULL;
static SPIPlanPtr lookup_plan = NULL;
static SPIPlanPtr create_rows_plan = NULL;
static SPIPlanPtr lock_plan = NULL;
static SPIPlanPtr store_plan = NULL;
static SPIPlanPtr skip_plan = NULL;
static SPIPlanPtr start_plan = NULL;
static SPIPlanPtr gap_lock_plan = NULL;

/* Create the partitions' missing rows, in partition order. */
#define CREATE_ROWS_SQL \
	"INSERT INTO dwh.kafka_offsets (topic, kafka_partition) " \
	"SELECT $1, p FROM unnest($2::integer[]) AS p ORDER BY p " \
	"ON CONFLICT DO NOTHING"

/* Clear the partitions' seek requests, returning where they asked to go. */
#define CLEAR_SEEKS_SQL \
	"UPDATE dwh.kafka_offsets SET seek_requested = false " \
	"WHERE topic = $1 AND kafka_partition = ANY ($2) AND seek_requested " \
	"RETURNING kafka_partition, next_offset"

/*
 * Run sql with ($1 topic, $2 partitions[]) through its kept plan (prepared
 * on first use) and check the result code.
 */
static void
run(SPIPlanPtr *plan, const char *sql, const char *topic,
	const int32 *partitions, int n, int expected)
{
	Datum		args[2];
	int			rc;

	if (*plan == NULL)
	{
		Oid			types[2] = {TEXTOID, INT4ARRAYOID};

		*plan = dwh_prepare_kept(sql, 2, types);
	}
	args[0] = CStringGetTextDatum(topic);
	args[1] = int4_array(partitions, n);
	rc = SPI_execute_plan(*plan, args, NULL, false, 0);
	if (rc != expected)
		elog(ERROR, "dwh.kafka_offsets: %s: %s", sql, SPI_result_code_string(rc));
}

/* The index of partition in the sorted array, or -1. */
static int
find_partition(const int32 *partitions, int n, int32 partition)
{
	int			lo = 0;
	int			hi = n - 1;

	while (lo <= hi)
	{
		int			mid = (lo + hi) / 2;

		if (partitions[mid] == partition)
			return mid;
		if (partitions[mid] < partition)
			lo = mid + 1;
		else
			hi = mid - 1;
	}
	return -1;
}

/* Is the partition of row o stopped at a gap (SQL, for the queries)? */
#define STOPPED_SQL \
	"EXISTS (SELECT FROM dwh.kafka_gaps AS g " \
	"        WHERE g.topic = o.topic AND g.kafka_partition = o.kafka_partition " \
	"          AND g.resumed_at IS NULL)"

/*
 * Read (partition, next_offset, stopped[, seek_requested]) rows of the
 * last query into arrays indexed like the sorted partitions.
 */
static void
read_rows(const int32 *partitions, int n, int64 *next_offsets, bool *stopped,
		  bool *seek)
{
	uint64		r;

	for (r = 0; r < SPI_processed; r++)
	{
		HeapTuple	tup = SPI_tuptable->vals[r];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		bool		isnull;
		int32		p = DatumGetInt32(SPI_getbinval(tup, desc, 1, &isnull));
		Datum		next = SPI_getbinval(tup, desc, 2, &isnull);
		int			i = find_partition(partitions, n, p);

		if (i < 0)
			continue;
		next_offsets[i] = isnull ? DWH_NO_OFFSET : DatumGetInt64(next);
		if (stopped)
			stopped[i] = DatumGetBool(SPI_getbinval(tup, desc, 3, &isnull));
		if (seek)
			seek[i] = DatumGetBool(SPI_getbinval(tup, desc, 4, &isnull));
	}
}

/*
 * dwh_kafka_offsets_lookup
 *		The stored next offsets of the (sorted) partitions, DWH_NO_OFFSET
 *		where none is stored, whether each is stopped at a gap, and the
 *		message each applied last where it is known.  For a new assignment:
 *		a seek requested for these partitions is fulfilled by starting
 *		there, so it is cleared.
 */
void
dwh_kafka_offsets_lookup(const char *topic, const int32 *partitions, int n,
						 int64 *next_offsets, bool *stopped,
						 DwhKafkaLastApplied *last)
{
	uint64		r;
	int			i;

	for (i = 0; i < n; i++)
	{
		next_offsets[i] = DWH_NO_OFFSET;
		stopped[i] = false;
		last[i].offset = DWH_NO_OFFSET;
	}
	connect_spi();
	run(&clear_seeks_plan, CLEAR_SEEKS_SQL, topic, partitions, n,
		SPI_OK_UPDATE_RETURNING);
	run(&lookup_plan,
		"SELECT o.kafka_partition, o.next_offset, " STOPPED_SQL ", false, "
		"       o.last_sha256, o.last_offset "
		"FROM dwh.kafka_offsets AS o "
		"WHERE o.topic = $1 AND o.kafka_partition = ANY ($2)",
		topic, partitions, n, SPI_OK_SELECT);
	read_rows(partitions, n, next_offsets, stopped, NULL);
	for (r = 0; r < SPI_processed; r++)
	{
		HeapTuple	tup = SPI_tuptable->vals[r];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		bool		isnull;
		bool		hash_null;
		bool		offset_null;
		int32		p = DatumGetInt32(SPI_getbinval(tup, desc, 1, &isnull));
		Datum		hash = SPI_getbinval(tup, desc, 5, &hash_null);
		Datum		offset = SPI_getbinval(tup, desc, 6, &offset_null);

		i = find_partition(partitions, n, p);
		if (i < 0 || hash_null || offset_null ||
			VARSIZE_ANY_EXHDR(DatumGetPointer(hash)) != DWH_SHA256_LEN)
			continue;
		/* Below the stored offset, or it says nothing of this log. */
		if (DatumGetInt64(offset) < 0 || next_offsets[i] == DWH_NO_OFFSET ||
			DatumGetInt64(offset) >= next_offsets[i])
			continue;
		last[i].offset = DatumGetInt64(offset);
		memcpy(last[i].sha256, VARDATA_ANY(DatumGetPointer(hash)),
			   DWH_SHA256_LEN);
	}
	SPI_finish();
}

/*
 * dwh_kafka_offsets_lock
 *		Lock the rows of the (sorted) partitions of a batch, creating the
 *		missing ones, and return what they hold now, and whether each is
 *		stopped at a gap.
 */
void
dwh_kafka_offsets_lock(const char *topic, const int32 *partitions, int n,
					   int64 *next_offsets, bool *seek_requested,
					   bool *stopped)
{
	int			i;

	for (i = 0; i < n; i++)
	{
		next_offsets[i] = DWH_NO_OFFSET;
		seek_requested[i] = false;
		stopped[i] = false;
	}
	connect_spi();
	run(&create_rows_plan, CREATE_ROWS_SQL, topic, partitions, n, SPI_OK_INSERT);
	run(&lock_plan,
		"SELECT o.kafka_partition, o.next_offset, " STOPPED_SQL ", o.seek_requested "
		"FROM dwh.kafka_offsets AS o "
		"WHERE o.topic = $1 AND o.kafka_partition = ANY ($2) "
		"ORDER BY o.kafka_partition FOR UPDATE OF o",
		topic, partitions, n, SPI_OK_SELECT);
	read_rows(partitions, n, next_offsets, stopped, seek_requested);
	SPI_finish();
}

/*
 * dwh_kafka_offsets_store
 *		Record how far each partition has been applied, and the message it
 *		applied last where known; clears any seek request on it (the worker
 *		has just honoured it).  Where the batch knows no message below the
 *		new offset, it applied none: only markers or aborted messages lie
 *		between, and the message applied last stays the one stored.
 */
void
dwh_kafka_offsets_store(const char *topic, const int32 *partitions,
						const int64 *next_offsets,
						const DwhKafkaLastApplied *last, int n)
{
	Datum		args[5];
	Datum	   *hashes;
	Datum	   *offsets;
	bool	   *nulls;
	int			dims[1];
	int			lbs[1] = {1};
	int			rc;
	int			i;

	if (n == 0)
		return;
	hashes = palloc(sizeof(Datum) * n);
	offsets = palloc(sizeof(Datum) * n);
	nulls = palloc(sizeof(bool) * n);
	for (i = 0; i < n; i++)
	{
		nulls[i] = last[i].offset == DWH_NO_OFFSET;
		hashes[i] = nulls[i] ? (Datum) 0 :
			dwh_bytea_datum(last[i].sha256, DWH_SHA256_LEN);
		offsets[i] = Int64GetDatum(last[i].offset);
	}
	dims[0] = n;
	connect_spi();
	if (store_plan == NULL)
	{
		Oid			types[5] = {TEXTOID, INT4ARRAYOID, INT8ARRAYOID,
		BYTEAARRAYOID, INT8ARRAYOID};

		store_plan = dwh_prepare_kept("UPDATE dwh.kafka_offsets AS o "
									  "SET next_offset = v.next_offset, "
									  "    last_sha256 = CASE WHEN v.last_offset IS NULL "
									  "                       THEN o.last_sha256 ELSE v.last_sha256 END, "
									  "    last_offset = coalesce(v.last_offset, o.last_offset), "
									  "    seek_requested = false, updated_at = pg_catalog.now() "
									  "FROM unnest($2::integer[], $3::bigint[], $4::bytea[], $5::bigint[]) "
									  "     AS v(kafka_partition, next_offset, last_sha256, last_offset) "
									  "WHERE o.topic = $1 AND o.kafka_partition = v.kafka_partition",
									  5, types);
	}
	args[0] = CStringGetTextDatum(topic);
	args[1] = int4_array(partitions, n);
	args[2] = int8_array(next_offsets, n);
	args[3] = PointerGetDatum(construct_md_array(hashes, nulls, 1, dims, lbs,
												 BYTEAOID, -1, false,
												 TYPALIGN_INT));
	args[4] = PointerGetDatum(construct_md_array(offsets, nulls, 1, dims, lbs,
												 INT8OID, 8, FLOAT8PASSBYVAL,
												 TYPALIGN_DOUBLE));
	rc = SPI_execute_plan(store_plan, args, NULL, false, 0);
	if (rc != SPI_OK_UPDATE)
		elog(ERROR, "could not store Kafka offsets: %s", SPI_result_code_string(rc));
	SPI_finish();
}

/*
 * dwh_kafka_offsets_skip_to_end
 *		Move a partition's stored offset up to end, the end of its log,
 *		across offsets that hold nothing to apply (the markers that end
 *		transactions, aborted messages): a consumer reading committed
 *		messages never sees them, and the lag would never reach 0.  Only
 *		if the offset is at or past expected (the one after the last message
 *		delivered; -1: nothing delivered since the partition started, where
 *		it started): every message delivered is applied, and the log ended
 *		after the last one, so nothing lies between but markers, even past
 *		an offset an earlier move stored.  And only if the partition is
 *		neither asked to move nor stopped at a gap.  The message applied last (last_offset, last_sha256)
 *		stays what it was: the next start checks the log there
 *		(dwh_kafka_verify.c).  In a transaction of its own; returns whether
 *		the offset moved.
 */
bool
dwh_kafka_offsets_skip_to_end(const char *topic, int32 partition,
							  int64 expected, int64 end)
{
	Datum		args[4];
	int			rc;
	bool		moved;

	connect_spi();
	if (skip_plan == NULL)
	{
		Oid			types[4] = {TEXTOID, INT4OID, INT8OID, INT8OID};

		skip_plan = dwh_prepare_kept("UPDATE dwh.kafka_offsets AS o "
									 "SET next_offset = $4, updated_at = pg_catalog.now() "
									 "WHERE o.topic = $1 AND o.kafka_partition = $2 "
									 "  AND o.next_offset < $4 "
									 "  AND ($3 < 0 OR o.next_offset >= $3) "
									 "  AND NOT o.seek_requested AND NOT " STOPPED_SQL,
									 4, types);
	}
	args[0] = CStringGetTextDatum(topic);
	args[1] = Int32GetDatum(partition);
	args[2] = Int64GetDatum(expected);
	args[3] = Int64GetDatum(end);
	rc = SPI_execute_plan(skip_plan, args, NULL, false, 0);
	if (rc != SPI_OK_UPDATE)
		elog(ERROR, "could not store Kafka offsets: %s", SPI_result_code_string(rc));
	moved = SPI_processed > 0;
	SPI_finish();
	return moved;
}

/*
 * dwh_kafka_offsets_start_at
 *		Store where a partition with no offset stored starts (the end of its
 *		log, for dwh.kafka_start_offset = latest) before anything is fetched
 *		from it: resolved again at its next start, "latest" would be later,
 *		and what arrived between the two never applied.  Not over an offset
 *		stored meanwhile or a seek asked for.  In the caller's transaction;
 *		returns the offset the partition starts at, DWH_NO_OFFSET if a seek
 *		is pending (the worker serves it next).
 */
int64
dwh_kafka_offsets_start_at(const char *topic, int32 partition, int64 offset)
{
	Datum		args[3];
	int64		start = DWH_NO_OFFSET;
	bool		isnull;
	int			rc;

	connect_spi();
	if (start_plan == NULL)
	{
		Oid			types[3] = {TEXTOID, INT4OID, INT8OID};

		start_plan = dwh_prepare_kept("INSERT INTO dwh.kafka_offsets AS o "
									  "  (topic, kafka_partition, next_offset) "
									  "VALUES ($1, $2, $3) "
									  "ON CONFLICT (topic, kafka_partition) DO UPDATE "
									  "SET next_offset = coalesce(o.next_offset, $3), "
									  "    updated_at = pg_catalog.now() "
									  "WHERE NOT o.seek_requested "
									  "RETURNING o.next_offset",
									  3, types);
	}
	args[0] = CStringGetTextDatum(topic);
	args[1] = Int32GetDatum(partition);
	args[2] = Int64GetDatum(offset);
	rc = SPI_execute_plan(start_plan, args, NULL, false, 0);
	if (rc != SPI_OK_INSERT_RETURNING)
		elog(ERROR, "could not store Kafka offsets: %s", SPI_result_code_string(rc));
	if (SPI_processed == 1)
		start = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0],
											SPI_tuptable->tupdesc, 1, &isnull));
	SPI_finish();
	return start;
}

/*
 * dwh_kafka_offsets_take_seeks
 *		The owned partitions that dwh.kafka_seek() moved, with their new
 *		offsets; the requests are cleared (in the caller's transaction).
 */
int
dwh_kafka_offsets_take_seeks(const char *topic, const int32 *partitions, int n,
							 int32 **seek_partitions, int64 **seek_offsets)
{
	int			count = 0;
	uint64		r;

	*seek_partitions = palloc(sizeof(int32) * Max(n, 1));
	*seek_offsets = palloc(sizeof(int64) * Max(n, 1));
	if (n == 0)
		return 0;
	connect_spi();
	run(&clear_seeks_plan, CLEAR_SEEKS_SQL, topic, partitions, n,
		SPI_OK_UPDATE_RETURNING);
	for (r = 0; r < SPI_processed; r++)
	{
		bool		isnull;
		Datum		next;

		(*seek_partitions)[count] =
			DatumGetInt32(SPI_getbinval(SPI_tuptable->vals[r],
										SPI_tuptable->tupdesc, 1, &isnull));
		next = SPI_getbinval(SPI_tuptable->vals[r], SPI_tuptable->tupdesc, 2,
							 &isnull);
		if (isnull)
			continue;
		(*seek_offsets)[count++] = DatumGetInt64(next);
	}
	SPI_finish();
	return count;
}

/*
 * dwh_kafka_offsets_gap
 *		Serve an offset out of range of a partition: the broker reported
 *		that it does not hold fetch_offset, and holds low to high - 1.  The
 *		partition's row is locked, then:
 *
 *		- a seek requested meanwhile, or a gap already open (the partition
 *		  is stopped), or a stored offset the broker holds after all (the
 *		  error was stale): nothing to record, the partition is started again
 *		  where its row says;
 *		- otherwise the gap from the stored offset (fetch_offset if none is
 *		  stored) to low is recorded, and with stop false the stored offset
 *		  moves to low in the same transaction; with stop true it stays, and
 *		  the open gap stops the partition.
 *
 *		With expected not DWH_NO_OFFSET, nothing is done either unless the
 *		stored offset is still expected (the caller's view may be stale).
 *
 *		Fills *gap (its next_offset is what was stored) and returns what was
 *		done.
 */
DwhKafkaGapOutcome
dwh_kafka_offsets_gap(const char *topic, int32 partition, int64 fetch_offset,
					  int64 expected, int64 low, int64 high, bool replaced,
					  bool stop, DwhKafkaGap *gap)
{
	Oid			types[6] = {TEXTOID, INT4OID, INT8OID, INT8OID, INT8OID, TEXTOID};
	Datum		args[6];
	int			rc;
	bool		isnull;
	bool		seek;
	bool		open;
	int64		stored;
	DwhKafkaGapOutcome outcome;

	gap->next_offset = fetch_offset;
	gap->log_start_offset = low;
	gap->log_end_offset = high;

	connect_spi();
	run(&create_rows_plan, CREATE_ROWS_SQL, topic, &partition, 1, SPI_OK_INSERT);
	run(&gap_lock_plan,
		"SELECT o.next_offset, o.seek_requested, " STOPPED_SQL
		" FROM dwh.kafka_offsets AS o "
		"WHERE o.topic = $1 AND o.kafka_partition = ANY ($2) FOR UPDATE OF o",
		topic, &partition, 1, SPI_OK_SELECT);
	if (SPI_processed != 1)
		elog(ERROR, "dwh.kafka_offsets has no row for partition %d of topic \"%s\"",
			 partition, topic);
	stored = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0],
										 SPI_tuptable->tupdesc, 1, &isnull));
	if (isnull)
		stored = fetch_offset;
	seek = DatumGetBool(SPI_getbinval(SPI_tuptable->vals[0],
									  SPI_tuptable->tupdesc, 2, &isnull));
	open = DatumGetBool(SPI_getbinval(SPI_tuptable->vals[0],
									  SPI_tuptable->tupdesc, 3, &isnull));
	gap->next_offset = stored;

	if (seek)
		outcome = DWH_GAP_MOVED;
	else if (expected != DWH_NO_OFFSET && stored != expected)
		outcome = DWH_GAP_NONE;
	else if (open)
		outcome = DWH_GAP_STILL_STOPPED;
	else if (!replaced && (stored < 0 || (stored >= low && stored <= high)))
		outcome = DWH_GAP_NONE;
	else
		outcome = stop ? DWH_GAP_STOPPED : DWH_GAP_SKIPPED;

	if (outcome == DWH_GAP_SKIPPED || outcome == DWH_GAP_STOPPED)
	{
		args[0] = CStringGetTextDatum(topic);
		args[1] = Int32GetDatum(partition);
		args[2] = Int64GetDatum(stored);
		args[3] = Int64GetDatum(low);
		args[4] = Int64GetDatum(high);
		args[5] = CStringGetTextDatum(stop ? "stopped" : "skipped");
		rc = SPI_execute_with_args("INSERT INTO dwh.kafka_gaps "
								   "  (topic, kafka_partition, next_offset, log_start_offset, "
								   "   log_end_offset, action, resumed_offset, resumed_at) "
								   "SELECT $1, $2, $3, $4, $5, $6, "
								   "       CASE WHEN $6 = 'skipped' THEN $4 END, "
								   "       CASE WHEN $6 = 'skipped' THEN pg_catalog.now() END",
								   6, types, args, NULL, false, 0);
		if (rc != SPI_OK_INSERT)
			elog(ERROR, "could not record the Kafka gap: %s",
				 SPI_result_code_string(rc));
	}
	if (outcome == DWH_GAP_SKIPPED)
	{
		rc = SPI_execute_with_args("UPDATE dwh.kafka_offsets "
								   "SET next_offset = $4, last_sha256 = NULL, last_offset = NULL, "
								   "    updated_at = pg_catalog.now() "
								   "WHERE topic = $1 AND kafka_partition = $2",
								   4, types, args, NULL, false, 0);
		if (rc != SPI_OK_UPDATE)
			elog(ERROR, "could not store the Kafka offset: %s",
				 SPI_result_code_string(rc));
	}
	SPI_finish();
	return outcome;
}

/*
 * dwh_kafka_offsets_list
 *		Every partition of topic with a row, sorted, with its stored next
 *		offset (DWH_NO_OFFSET if none) and whether it is stopped at a gap;
 *		the arrays are allocated in the caller's memory context.  Returns
 *		the number of rows.
 */
int
dwh_kafka_offsets_list(const char *topic, int32 **partitions,
					   int64 **next_offsets, bool **stopped)
{
	Oid			types[1] = {TEXTOID};
	Datum		args[1];
	uint64		r;
	int			n;

	connect_spi();
	args[0] = CStringGetTextDatum(topic);
	if (SPI_execute_with_args("SELECT o.kafka_partition, o.next_offset, " STOPPED_SQL
							  " FROM dwh.kafka_offsets AS o WHERE o.topic = $1 "
							  "ORDER BY o.kafka_partition",
							  1, types, args, NULL, true, 0) != SPI_OK_SELECT)
		elog(ERROR, "could not read dwh.kafka_offsets");
	n = (int) SPI_processed;
	*partitions = SPI_palloc(sizeof(int32) * Max(n, 1));
	*next_offsets = SPI_palloc(sizeof(int64) * Max(n, 1));
	*stopped = SPI_palloc(sizeof(bool) * Max(n, 1));
	for (r = 0; r < SPI_processed; r++)
	{
		HeapTuple	tup = SPI_tuptable->vals[r];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		bool		isnull;
		Datum		next;

		(*partitions)[r] = DatumGetInt32(SPI_getbinval(tup, desc, 1, &isnull));
		next = SPI_getbinval(tup, desc, 2, &isnull);
		(*next_offsets)[r] = isnull ? DWH_NO_OFFSET : DatumGetInt64(next);
		(*stopped)[r] = DatumGetBool(SPI_getbinval(tup, desc, 3, &isnull));
	}
	SPI_finish();
	return n;
}

PG_FUNCTION_INFO_V1(dwh_kafka_seek);

/*
 * dwh.kafka_seek(kafka_partition integer, next_offset bigint,
 *				  topic text DEFAULT NULL) returns void
 *
 * Rewind (replay) or skip a partition: the next message applied from it
 * will be the one at next_offset.  The worker that owns the partition moves
 * to it as soon as this commits; messages already applied again are
 * idempotent, but the counters of a skipped range are never applied.  A
 * partition stopped at a gap goes on from there: its gap is closed.
 */
Datum
dwh_kafka_seek(PG_FUNCTION_ARGS)
{
	int32		partition;
	int64		next_offset;
	char	   *topic;
	Oid			types[3] = {TEXTOID, INT4OID, INT8OID};
	Datum		args[3];
	int			rc;

	if (PG_ARGISNULL(0) || PG_ARGISNULL(1))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("kafka_partition and next_offset must not be null")));
	partition = PG_GETARG_INT32(0);
	next_offset = PG_GETARG_INT64(1);
	topic = PG_ARGISNULL(2) ? dwh_kafka_topic : text_to_cstring(PG_GETARG_TEXT_PP(2));
	dwh_require_topic_name(topic);
	if (partition < 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("invalid Kafka partition %d", partition)));
	if (next_offset < 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("invalid Kafka offset " INT64_FORMAT, next_offset),
				 errhint("Give the offset of the first message to apply; 0 replays the partition from its start.")));

	connect_spi();
	args[0] = CStringGetTextDatum(topic);
	args[1] = Int32GetDatum(partition);
	args[2] = Int64GetDatum(next_offset);
	rc = SPI_execute_with_args("INSERT INTO dwh.kafka_offsets AS o "
							   "  (topic, kafka_partition, next_offset, seek_requested) "
							   "VALUES ($1, $2, $3, true) "
							   "ON CONFLICT (topic, kafka_partition) DO UPDATE "
							   "SET next_offset = EXCLUDED.next_offset, seek_requested = true, "
							   "    updated_at = pg_catalog.now()",
							   3, types, args, NULL, false, 0);
	if (rc != SPI_OK_INSERT)
		elog(ERROR, "could not store the Kafka offset: %s", SPI_result_code_string(rc));

	/*
	 * The operator decided where the partition goes on: its gap is closed,
	 * and the message before it is not known.  (A 1.0 schema, not updated
	 * yet, has neither.)
	 */
	if (dwh_schema_is_current())
	{
		rc = SPI_execute_with_args("UPDATE dwh.kafka_offsets SET last_sha256 = NULL, last_offset = NULL "
								   "WHERE topic = $1 AND kafka_partition = $2",
								   2, types, args, NULL, false, 0);
		if (rc != SPI_OK_UPDATE)
			elog(ERROR, "could not store the Kafka offset: %s", SPI_result_code_string(rc));
		rc = SPI_execute_with_args("UPDATE dwh.kafka_gaps "
								   "SET resumed_offset = $3, resumed_at = pg_catalog.now() "
								   "WHERE topic = $1 AND kafka_partition = $2 AND resumed_at IS NULL",
								   3, types, args, NULL, false, 0);
		if (rc != SPI_OK_UPDATE)
			elog(ERROR, "could not close the Kafka gap: %s", SPI_result_code_string(rc));
	}
	SPI_finish();

	/* The workers move once the seek is committed, never before. */
	dwh_status_wake_at_commit(DWH_WORKER_KAFKA);
	PG_RETURN_VOID();
}
