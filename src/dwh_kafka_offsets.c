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
 * All functions here run inside the caller's transaction, with SPI.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "utils/array.h"
#include "utils/builtins.h"

#include "dwh_kafka_offsets.h"
#include "dwh_settings.h"
#include "dwh_status.h"

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

/* Run sql with ($1 topic, $2 partitions[]) and check the result code. */
static void
run(const char *sql, const char *topic, const int32 *partitions, int n,
	int expected)
{
	Oid			types[2] = {TEXTOID, INT4ARRAYOID};
	Datum		args[2];
	int			rc;

	args[0] = CStringGetTextDatum(topic);
	args[1] = int4_array(partitions, n);
	rc = SPI_execute_with_args(sql, 2, types, args, NULL, false, 0);
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

/*
 * Read (partition, next_offset, seek_requested) rows of the last query
 * into arrays indexed like the sorted partitions.
 */
static void
read_rows(const int32 *partitions, int n, int64 *next_offsets, bool *seek)
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
		if (seek)
			seek[i] = DatumGetBool(SPI_getbinval(tup, desc, 3, &isnull));
	}
}

/*
 * dwh_kafka_offsets_lookup
 *		The stored next offsets of the (sorted) partitions, DWH_NO_OFFSET
 *		where none is stored.  For a new assignment: a seek requested for
 *		these partitions is fulfilled by starting there, so it is cleared.
 */
void
dwh_kafka_offsets_lookup(const char *topic, const int32 *partitions, int n,
						 int64 *next_offsets)
{
	int			i;

	for (i = 0; i < n; i++)
		next_offsets[i] = DWH_NO_OFFSET;
	connect_spi();
	run("UPDATE dwh.kafka_offsets SET seek_requested = false "
		"WHERE topic = $1 AND kafka_partition = ANY ($2) AND seek_requested",
		topic, partitions, n, SPI_OK_UPDATE);
	run("SELECT kafka_partition, next_offset FROM dwh.kafka_offsets "
		"WHERE topic = $1 AND kafka_partition = ANY ($2)",
		topic, partitions, n, SPI_OK_SELECT);
	read_rows(partitions, n, next_offsets, NULL);
	SPI_finish();
}

/*
 * dwh_kafka_offsets_lock
 *		Lock the rows of the (sorted) partitions of a batch, creating the
 *		missing ones, and return what they hold now.
 */
void
dwh_kafka_offsets_lock(const char *topic, const int32 *partitions, int n,
					   int64 *next_offsets, bool *seek_requested)
{
	int			i;

	for (i = 0; i < n; i++)
	{
		next_offsets[i] = DWH_NO_OFFSET;
		seek_requested[i] = false;
	}
	connect_spi();
	run("INSERT INTO dwh.kafka_offsets (topic, kafka_partition) "
		"SELECT $1, p FROM unnest($2::integer[]) AS p ORDER BY p "
		"ON CONFLICT DO NOTHING",
		topic, partitions, n, SPI_OK_INSERT);
	run("SELECT kafka_partition, next_offset, seek_requested FROM dwh.kafka_offsets "
		"WHERE topic = $1 AND kafka_partition = ANY ($2) "
		"ORDER BY kafka_partition FOR UPDATE",
		topic, partitions, n, SPI_OK_SELECT);
	read_rows(partitions, n, next_offsets, seek_requested);
	SPI_finish();
}

/*
 * dwh_kafka_offsets_store
 *		Record how far each partition has been applied; clears any seek
 *		request on it (the worker has just honoured it).
 */
void
dwh_kafka_offsets_store(const char *topic, const int32 *partitions,
						const int64 *next_offsets, int n)
{
	Oid			types[3] = {TEXTOID, INT4ARRAYOID, INT8ARRAYOID};
	Datum		args[3];
	int			rc;

	if (n == 0)
		return;
	connect_spi();
	args[0] = CStringGetTextDatum(topic);
	args[1] = int4_array(partitions, n);
	args[2] = int8_array(next_offsets, n);
	rc = SPI_execute_with_args("UPDATE dwh.kafka_offsets AS o "
							   "SET next_offset = v.next_offset, seek_requested = false, "
							   "    updated_at = pg_catalog.now() "
							   "FROM unnest($2::integer[], $3::bigint[]) AS v(kafka_partition, next_offset) "
							   "WHERE o.topic = $1 AND o.kafka_partition = v.kafka_partition",
							   3, types, args, NULL, false, 0);
	if (rc != SPI_OK_UPDATE)
		elog(ERROR, "could not store Kafka offsets: %s", SPI_result_code_string(rc));
	SPI_finish();
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
	run("UPDATE dwh.kafka_offsets SET seek_requested = false "
		"WHERE topic = $1 AND kafka_partition = ANY ($2) AND seek_requested "
		"RETURNING kafka_partition, next_offset",
		topic, partitions, n, SPI_OK_UPDATE_RETURNING);
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

/* Wake the workers once the seek is committed, never before. */
static bool wake_registered = false;

static void
wake_workers_at_commit(XactEvent event, void *arg)
{
	if (event == XACT_EVENT_COMMIT)
		dwh_status_wake_kafka_workers();
	if (event == XACT_EVENT_COMMIT || event == XACT_EVENT_ABORT)
	{
		UnregisterXactCallback(wake_workers_at_commit, NULL);
		wake_registered = false;
	}
}

PG_FUNCTION_INFO_V1(dwh_kafka_seek);

/*
 * dwh.kafka_seek(kafka_partition integer, next_offset bigint,
 *				  topic text DEFAULT NULL) returns void
 *
 * Rewind (replay) or skip a partition: the next message applied from it
 * will be the one at next_offset.  The worker that owns the partition moves
 * to it as soon as this commits; messages already applied again are
 * idempotent, but the counters of a skipped range are never applied.
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
	SPI_finish();

	if (!wake_registered)
	{
		RegisterXactCallback(wake_workers_at_commit, NULL);
		wake_registered = true;
	}
	PG_RETURN_VOID();
}
