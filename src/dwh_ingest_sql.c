/*-------------------------------------------------------------------------
 *
 * dwh_ingest_sql.c
 *	  The SQL entry points of the ingest: dwh.ingest_order(),
 *	  dwh.ingest_orders() and dwh.ingest_dead_letter().
 *
 * Each turns its arguments into a batch of items and hands it to
 * dwh_ingest_batch() (dwh_ingest.c), as the Kafka worker does with what it
 * consumed; they add only the checks of their arguments and the shape of
 * their result.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "catalog/pg_type.h"
#include "fmgr.h"
#include "funcapi.h"
#include "utils/array.h"
#include "utils/builtins.h"

#include "dwh_ingest.h"
#include "dwh_kafka_options.h"
#include "dwh_trust.h"
#include "dwh_version.h"

/*
 * The coordinates given to a SQL entry point, or none.
 */
static void
item_coordinates(DwhIngestItem *item, bool has_partition, int32 partition,
				 bool has_offset, int64 offset)
{
	item->has_coordinates = has_partition && has_offset;
	item->partition = has_partition ? partition : 0;
	item->offset = has_offset ? offset : 0;
}

/*
 * A position a SQL caller names: a partition and an offset, both or
 * neither, neither negative.  (Dead letters handed back keep theirs.)
 */
static void
check_position(bool has_partition, int32 partition, bool has_offset,
			   int64 offset, int message)
{
	if (has_partition != has_offset)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("message %d has a Kafka %s without its %s", message,
						has_partition ? "partition" : "offset",
						has_partition ? "offset" : "partition"),
				 errhint("Give both, or neither for a message read from no Kafka position.")));
	if ((has_partition && partition < 0) || (has_offset && offset < 0))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("message %d has a negative Kafka position", message),
				 errdetail("Partitions and offsets start at 0.")));
}

PG_FUNCTION_INFO_V1(dwh_ingest_order);
PG_FUNCTION_INFO_V1(dwh_ingest_orders);
PG_FUNCTION_INFO_V1(dwh_ingest_dead_letter);

/*
 * Ingest the message in argument 0 with the topic, partition and offset in
 * arguments topic_arg to topic_arg + 2, from source; say what became of
 * it.  Refused while the schema is at another version than the library
 * (src/dwh_version.c).
 */
static text *
ingest_one(FunctionCallInfo fcinfo, const char *source, int topic_arg)
{
	bytea	   *message;
	char	   *topic = NULL;
	DwhIngestItem item;
	DwhIngestResult result;
	const char *outcome;

	dwh_require_current_schema();
	dwh_require_safe_schemas();
	if (PG_ARGISNULL(0))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("message must not be null")));
	message = PG_GETARG_BYTEA_PP(0);
	if (!PG_ARGISNULL(topic_arg))
		topic = text_to_cstring(PG_GETARG_TEXT_PP(topic_arg));

	item.data = VARDATA_ANY(message);
	item.len = VARSIZE_ANY_EXHDR(message);
	item_coordinates(&item,
					 !PG_ARGISNULL(topic_arg + 1),
					 PG_ARGISNULL(topic_arg + 1) ? 0 : PG_GETARG_INT32(topic_arg + 1),
					 !PG_ARGISNULL(topic_arg + 2),
					 PG_ARGISNULL(topic_arg + 2) ? 0 : PG_GETARG_INT64(topic_arg + 2));

	dwh_ingest_batch(&item, 1, source, topic, &result);

	if (result.applied > 0)
		outcome = "applied";
	else if (result.unchanged > 0)
		outcome = "unchanged";
	else if (result.replayed > 0)
		outcome = "replayed";
	else if (result.mismatched > 0)
		outcome = "mismatch";
	else if (result.other_type > 0)
		outcome = "other_type";
	else
		outcome = "dead_letter";
	return cstring_to_text(outcome);
}

/*
 * dwh.ingest_order(message bytea|text, topic text, kafka_partition int,
 *					kafka_offset bigint) returns text
 *
 * Ingest one raw message; says what became of it: 'applied', 'unchanged',
 * 'other_type', 'dead_letter', 'replayed' (the same bytes were already
 * stored at this position by a SQL caller: nothing written) or 'mismatch'
 * (stored as an other event or dead letter, flagged: other bytes were
 * stored at this position before).  text and bytea share the varlena
 * layout, so one C function serves both signatures.
 */
Datum
dwh_ingest_order(PG_FUNCTION_ARGS)
{
	if (!PG_ARGISNULL(1))
		dwh_require_topic_name(text_to_cstring(PG_GETARG_TEXT_PP(1)));
	check_position(!PG_ARGISNULL(2), PG_ARGISNULL(2) ? 0 : PG_GETARG_INT32(2),
				   !PG_ARGISNULL(3), PG_ARGISNULL(3) ? 0 : PG_GETARG_INT64(3), 1);
	PG_RETURN_TEXT_P(ingest_one(fcinfo, "sql", 1));
}

/*
 * dwh.ingest_dead_letter(message bytea, source text, topic text,
 *						  kafka_partition int, kafka_offset bigint) returns text
 *
 * What dwh.replay_dead_letters hands back to the ingest: a dead letter's
 * value under the source that first handed it in, so that it keeps its
 * identity.  Returns what dwh.ingest_order returns.
 */
Datum
dwh_ingest_dead_letter(PG_FUNCTION_ARGS)
{
	char	   *source;

	if (PG_ARGISNULL(1))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("source must not be null")));
	source = text_to_cstring(PG_GETARG_TEXT_PP(1));
	if (strcmp(source, "kafka") != 0 && strcmp(source, "sql") != 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 strlen(source) <= 64 ?
				 errmsg("dead letters of source \"%s\" cannot be ingested again",
						source) :
				 errmsg("dead letters of a source of %zu bytes cannot be ingested again",
						strlen(source)),
				 errdetail("Only dead letters of the sources kafka and sql hold order messages.")));
	PG_RETURN_TEXT_P(ingest_one(fcinfo, source, 2));
}

/*
 * Elements of an optional int4 or int8 array argument, checked against the
 * number of messages.
 */
static void
coordinate_array(FunctionCallInfo fcinfo, int argno, Oid elemtype, int n,
				 const char *name, Datum **values, bool **nulls)
{
	ArrayType  *arr;
	int			count;

	*values = NULL;
	*nulls = NULL;
	if (PG_ARGISNULL(argno))
		return;
	arr = PG_GETARG_ARRAYTYPE_P(argno);
	if (ARR_NDIM(arr) > 1)
		ereport(ERROR,
				(errcode(ERRCODE_ARRAY_SUBSCRIPT_ERROR),
				 errmsg("%s must be a one-dimensional array", name)));
	deconstruct_array(arr, elemtype, elemtype == INT4OID ? 4 : 8,
					  elemtype == INT4OID ? true : FLOAT8PASSBYVAL,
					  elemtype == INT4OID ? TYPALIGN_INT : TYPALIGN_DOUBLE,
					  values, nulls, &count);
	if (count != n)
		ereport(ERROR,
				(errcode(ERRCODE_ARRAY_SUBSCRIPT_ERROR),
				 errmsg("%s has %d elements but there are %d messages",
						name, count, n)));
}

/*
 * dwh.ingest_orders(messages bytea[], topic text, kafka_partitions int[],
 *					 kafka_offsets bigint[])
 *		returns (received, applied, unchanged, other_type, dead_lettered,
 *				 replayed, mismatched)
 *
 * The set-based entry point: one call per batch.  The counts say what was
 * written: received = applied + unchanged + other_type + dead_lettered +
 * replayed; mismatched counts the other events and dead letters stored
 * where other bytes were already stored (flagged position_mismatch).
 * Refused while the schema is at another version than the library, as
 * dwh.ingest_order is.
 */
Datum
dwh_ingest_orders(PG_FUNCTION_ARGS)
{
	ArrayType  *messages;
	Datum	   *values;
	bool	   *isnull;
	int			n;
	Datum	   *partitions;
	bool	   *partition_nulls;
	Datum	   *offsets;
	bool	   *offset_nulls;
	char	   *topic = NULL;
	DwhIngestItem *items;
	DwhIngestResult result;
	TupleDesc	tupdesc;
	Datum		out[7];
	bool		out_nulls[7] = {false, false, false, false, false, false, false};
	int			i;

	dwh_require_current_schema();
	dwh_require_safe_schemas();
	if (PG_ARGISNULL(0))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("messages must not be null")));
	messages = PG_GETARG_ARRAYTYPE_P(0);
	if (ARR_NDIM(messages) > 1)
		ereport(ERROR,
				(errcode(ERRCODE_ARRAY_SUBSCRIPT_ERROR),
				 errmsg("messages must be a one-dimensional array")));
	deconstruct_array(messages, BYTEAOID, -1, false, TYPALIGN_INT,
					  &values, &isnull, &n);
	if (!PG_ARGISNULL(1))
	{
		topic = text_to_cstring(PG_GETARG_TEXT_PP(1));
		dwh_require_topic_name(topic);
	}
	coordinate_array(fcinfo, 2, INT4OID, n, "kafka_partitions",
					 &partitions, &partition_nulls);
	coordinate_array(fcinfo, 3, INT8OID, n, "kafka_offsets",
					 &offsets, &offset_nulls);

	items = palloc(sizeof(DwhIngestItem) * Max(n, 1));
	for (i = 0; i < n; i++)
	{
		bytea	   *b;

		if (isnull[i])
			ereport(ERROR,
					(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
					 errmsg("message %d of the batch is null", i + 1),
					 errhint("A Kafka message without a value carries nothing to ingest; leave it out of the batch.")));
		check_position(partitions != NULL && !partition_nulls[i],
					   partitions != NULL ? DatumGetInt32(partitions[i]) : 0,
					   offsets != NULL && !offset_nulls[i],
					   offsets != NULL ? DatumGetInt64(offsets[i]) : 0, i + 1);
		b = DatumGetByteaPP(values[i]);
		items[i].data = VARDATA_ANY(b);
		items[i].len = VARSIZE_ANY_EXHDR(b);
		item_coordinates(&items[i],
						 partitions != NULL && !partition_nulls[i],
						 partitions != NULL ? DatumGetInt32(partitions[i]) : 0,
						 offsets != NULL && !offset_nulls[i],
						 offsets != NULL ? DatumGetInt64(offsets[i]) : 0);
	}

	dwh_ingest_batch(items, n, "sql", topic, &result);

	if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "return type must be a row type");
	tupdesc = BlessTupleDesc(tupdesc);
	out[0] = Int32GetDatum(result.received);
	out[1] = Int32GetDatum(result.applied);
	out[2] = Int32GetDatum(result.unchanged);
	out[3] = Int32GetDatum(result.other_type);
	out[4] = Int32GetDatum(result.dead_lettered);
	out[5] = Int32GetDatum(result.replayed);
	out[6] = Int32GetDatum(result.mismatched);
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(tupdesc, out, out_nulls)));
}
