/*-------------------------------------------------------------------------
 *
 * dwh_stg_guard.c
 *	  BEFORE ROW trigger of the STG tables: validation and version guard.
 *
 * Whoever writes STG (the ingest functions, the workers, a DBA's INSERT,
 * COPY or upsert), the same rules hold: a row must be well-formed, its
 * version column is derived from its payload, and an update that does not
 * carry a newer version is skipped, so an older version never overwrites a
 * newer one and the same version twice changes nothing.  Versions are
 * ordered by (update_ts, payload): the payload comparison breaks ties
 * deterministically, so any arrival order ends in the same row.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "access/xact.h"
#include "commands/trigger.h"
#include "executor/spi.h"
#include "utils/builtins.h"
#include "utils/lsyscache.h"
#include "utils/jsonb.h"
#include "utils/timestamp.h"

#include "dwh_ingest.h"
#include "dwh_message.h"

PG_FUNCTION_INFO_V1(dwh_stg_guard);

/*
 * Column number of name in the trigger's relation; the install script
 * creates every column this trigger uses.
 */
static int
column_number(TupleDesc tupdesc, const char *name)
{
	int			attnum = SPI_fnumber(tupdesc, name);

	if (attnum <= 0)
		elog(ERROR, "dwh_stg_guard: column \"%s\" not found", name);
	return attnum;
}

/*
 * Is the version (ts, payload) newer than (old_ts, old_payload)?  A null
 * timestamp sorts before every timestamp.  Between two values without a
 * timestamp nothing tells which is newer: the last one written wins.
 */
static bool
version_is_newer(bool has_ts, Timestamp ts, Jsonb *payload,
				 bool old_has_ts, Timestamp old_ts, Jsonb *old_payload)
{
	int			cmp = compareJsonbContainers(&payload->root, &old_payload->root);

	if (has_ts != old_has_ts)
		return has_ts;
	if (!has_ts)
		return cmp != 0;
	if (ts != old_ts)
		return ts > old_ts;
	return cmp > 0;
}

/*
 * dwh.stg_guard() trigger, argument 'order', 'user' or 'restaurant'.
 */
Datum
dwh_stg_guard(PG_FUNCTION_ARGS)
{
	TriggerData *trigdata = (TriggerData *) fcinfo->context;
	TupleDesc	tupdesc;
	HeapTuple	newtuple;
	const char *kind;
	int			payload_col,
				version_col,
				loaded_col,
				key_col;
	bool		isnull;
	Jsonb	   *payload;
	bool		has_ts = true;
	Timestamp	ts = 0;
	DwhProblem	problem;
	bool		ok;
	int			ncols;
	int			cols[2];
	Datum		values[2];
	bool		nulls[2];

	if (!CALLED_AS_TRIGGER(fcinfo) ||
		!TRIGGER_FIRED_BEFORE(trigdata->tg_event) ||
		!TRIGGER_FIRED_FOR_ROW(trigdata->tg_event) ||
		trigdata->tg_trigger->tgnargs != 1)
		elog(ERROR, "dwh_stg_guard: must be a BEFORE ROW trigger with one argument");

	kind = trigdata->tg_trigger->tgargs[0];
	tupdesc = trigdata->tg_relation->rd_att;
	newtuple = TRIGGER_FIRED_BY_UPDATE(trigdata->tg_event) ?
		trigdata->tg_newtuple : trigdata->tg_trigtuple;

	payload_col = column_number(tupdesc, "payload");
	version_col = column_number(tupdesc, "update_ts");
	loaded_col = column_number(tupdesc, "loaded_at");
	key_col = column_number(tupdesc, "object_id");

	payload = DatumGetJsonbP(SPI_getbinval(newtuple, tupdesc, payload_col,
										   &isnull));
	if (isnull)
		ereport(ERROR,
				(errcode(ERRCODE_NOT_NULL_VIOLATION),
				 errmsg("payload of %s must not be null",
						RelationGetRelationName(trigdata->tg_relation))));

	if (strcmp(kind, "order") == 0)
	{
		Datum		object_id = SPI_getbinval(newtuple, tupdesc, key_col, &isnull);

		/* The ingest has just checked these very bytes: once is enough. */
		ok = (!isnull &&
			  dwh_ingest_checked_order(DatumGetInt64(object_id), payload, &ts)) ||
			dwh_order_payload_check(&payload->root, &ts, &problem);
	}
	else if (strcmp(kind, "user") == 0)
		ok = dwh_user_value_check(&payload->root, &has_ts, &ts, &problem);
	else if (strcmp(kind, "restaurant") == 0)
		ok = dwh_restaurant_value_check(&payload->root, &has_ts, &ts, &problem);
	else
		elog(ERROR, "dwh_stg_guard: unknown kind \"%s\"", kind);

	if (!ok)
		ereport(ERROR,
				(errcode(problem.sqlstate),
				 errmsg("invalid %s for %s.%s: %s", kind,
						get_namespace_name(RelationGetNamespace(trigdata->tg_relation)),
						RelationGetRelationName(trigdata->tg_relation),
						problem.reason),
				 errdetail("The row has object_id %s.",
						   SPI_getvalue(newtuple, tupdesc, key_col)),
				 errhint("Load raw values through the dwh ingest functions, which record refused ones in dwh.dead_letters.")));

	if (TRIGGER_FIRED_BY_UPDATE(trigdata->tg_event))
	{
		HeapTuple	oldtuple = trigdata->tg_trigtuple;
		Jsonb	   *old_payload;
		Datum		old_ts;
		bool		old_ts_null;

		old_payload = DatumGetJsonbP(SPI_getbinval(oldtuple, tupdesc,
												   payload_col, &isnull));
		old_ts = SPI_getbinval(oldtuple, tupdesc, version_col, &old_ts_null);
		if (isnull ||
			!version_is_newer(has_ts, ts, payload,
							  !old_ts_null, DatumGetTimestamp(old_ts),
							  old_payload))
			return PointerGetDatum(NULL);	/* not newer: skip this row */
	}

	cols[0] = version_col;
	values[0] = TimestampGetDatum(ts);
	nulls[0] = !has_ts;
	ncols = 1;
	if (TRIGGER_FIRED_BY_UPDATE(trigdata->tg_event))
	{
		/*
		 * A new version was stored now.  An INSERT keeps what it was given
		 * (the column default, or the original time in a restore's COPY).
		 */
		cols[1] = loaded_col;
		values[1] = TimestampTzGetDatum(GetCurrentTransactionStartTimestamp());
		nulls[1] = false;
		ncols = 2;
	}

	return PointerGetDatum(heap_modify_tuple_by_cols(newtuple, tupdesc, ncols,
													 cols, values, nulls));
}
