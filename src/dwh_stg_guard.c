/*-------------------------------------------------------------------------
 *
 * dwh_stg_guard.c
 *	  BEFORE ROW trigger of the STG tables: validation and version guard.
 *
 * Whoever writes STG (the ingest functions, the workers, a DBA's INSERT,
 * COPY or upsert), the same rules hold: a row must be well-formed and its
 * version column is derived from its payload.  On the tables that hold the
 * current version of each key, an update that does not carry a newer
 * version is not applied: the version it carries goes to the key's history
 * table (unless it is the stored one again), so that nothing received is
 * dropped.  Versions are ordered by (update_ts, payload text): any
 * arrival order ends in the same rows.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "access/xact.h"
#include "catalog/pg_type.h"
#include "commands/trigger.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "storage/lock.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/rel.h"
#include "utils/timestamp.h"

#include "dwh_ingest_session.h"
#include "dwh_message.h"
#include "dwh_session_mode.h"
#include "dwh_settings.h"
#include "dwh_spi.h"
#include "dwh_version.h"

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
 * Compare two versions of one key: by version time (a missing time sorts
 * before every time), then by the payload's text, byte by byte (not by
 * jsonb order, which compares strings in the database's collation).
 * Returns <0, 0 (the same version) or >0.
 */
static int
version_cmp(bool has_ts, Timestamp ts, Jsonb *payload,
			bool old_has_ts, Timestamp old_ts, Jsonb *old_payload)
{
	if (has_ts != old_has_ts)
		return has_ts ? 1 : -1;
	if (has_ts && ts != old_ts)
		return ts > old_ts ? 1 : -1;
	return dwh_jsonb_text_cmp(payload, old_payload);
}

/*
 * The plans of keep_in_history, kept for the life of the backend: the only
 * state of this file that outlives a call.  What the guard knows of a
 * running ingest it asks of the ingest session (dwh_ingest_session.c).
 */
static SPIPlanPtr order_history_plan = NULL;
static SPIPlanPtr user_history_plan = NULL;
static SPIPlanPtr restaurant_history_plan = NULL;

/*
 * Keep a version that is not the current one in the history table of its
 * kind; the history table's own trigger carries it into DDS.
 */
static void
keep_in_history(const char *kind, HeapTuple tuple, TupleDesc tupdesc,
				bool has_ts, Timestamp ts)
{
	SPIPlanPtr *plan;
	const char *sql;
	Datum		args[4];
	char		nulls[4] = "    ";
	bool		isnull;
	int			rc;

	if (strcmp(kind, "order") == 0)
	{
		plan = &order_history_plan;
		sql = "INSERT INTO stg.order_event_history AS h "
			"  (object_id, update_ts, payload, sent_dttm) "
			"VALUES ($1, $2, $3, $4) "
			"ON CONFLICT (object_id, update_ts, payload_md5) DO UPDATE "
			"SET sent_dttm = EXCLUDED.sent_dttm "
			"WHERE EXCLUDED.sent_dttm OPERATOR(pg_catalog.>) h.sent_dttm";
	}
	else if (strcmp(kind, "user") == 0)
	{
		plan = &user_history_plan;
		sql = "INSERT INTO stg.user_history (object_id, update_ts, payload) "
			"VALUES ($1, $2, $3) ON CONFLICT DO NOTHING";
	}
	else
	{
		plan = &restaurant_history_plan;
		sql = "INSERT INTO stg.restaurant_history (object_id, update_ts, payload) "
			"VALUES ($1, $2, $3) ON CONFLICT DO NOTHING";
	}

	/*
	 * This runs as whoever writes STG, with their search_path: the statement
	 * names nothing that a search_path could redirect.
	 */
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	if (*plan == NULL)
	{
		Oid			types[4] = {strcmp(kind, "order") == 0 ? INT8OID : VARCHAROID,
		TIMESTAMPOID, JSONBOID, TIMESTAMPOID};

		*plan = dwh_prepare_kept(sql, strcmp(kind, "order") == 0 ? 4 : 3, types);
	}
	args[0] = SPI_getbinval(tuple, tupdesc, SPI_fnumber(tupdesc, "object_id"), &isnull);
	args[1] = TimestampGetDatum(ts);
	nulls[1] = has_ts ? ' ' : 'n';
	args[2] = SPI_getbinval(tuple, tupdesc, SPI_fnumber(tupdesc, "payload"), &isnull);
	if (strcmp(kind, "order") == 0)
		args[3] = SPI_getbinval(tuple, tupdesc, SPI_fnumber(tupdesc, "sent_dttm"),
								&isnull);
	rc = SPI_execute_plan(*plan, args, nulls, false, 0);
	if (rc != SPI_OK_INSERT)
		elog(ERROR, "could not keep a superseded version: %s",
			 SPI_result_code_string(rc));
	SPI_finish();
}

/*
 * Does the new row of an update carry a later sent_dttm than the old one?
 * A version keeps the greatest sent_dttm of the messages that brought it.
 */
static bool
sent_later(TriggerData *trigdata, TupleDesc tupdesc)
{
	int			col = SPI_fnumber(tupdesc, "sent_dttm");
	bool		new_null,
				old_null;
	Datum		new_sent,
				old_sent;

	if (col <= 0)
		return false;			/* dictionaries have none */
	new_sent = SPI_getbinval(trigdata->tg_newtuple, tupdesc, col, &new_null);
	old_sent = SPI_getbinval(trigdata->tg_trigtuple, tupdesc, col, &old_null);
	return !new_null && (old_null ||
						 DatumGetTimestamp(new_sent) > DatumGetTimestamp(old_sent));
}

/*
 * dwh.stg_guard() trigger, argument 'order', 'user' or 'restaurant'.  On a
 * history table (its name ends in _history) it only validates.
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
	bool		is_history;
	Datum		payload_datum;
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
	dwh_require_read_committed();

	kind = trigdata->tg_trigger->tgargs[0];
	tupdesc = trigdata->tg_relation->rd_att;
	newtuple = TRIGGER_FIRED_BY_UPDATE(trigdata->tg_event) ?
		trigdata->tg_newtuple : trigdata->tg_trigtuple;

	payload_col = column_number(tupdesc, "payload");
	version_col = column_number(tupdesc, "update_ts");
	loaded_col = column_number(tupdesc, "loaded_at");
	key_col = column_number(tupdesc, "object_id");

	is_history = strstr(RelationGetRelationName(trigdata->tg_relation),
						"_history") != NULL;

	/* Null is refused before anything looks into the value. */
	payload_datum = SPI_getbinval(newtuple, tupdesc, payload_col, &isnull);
	if (isnull)
		ereport(ERROR,
				(errcode(ERRCODE_NOT_NULL_VIOLATION),
				 errmsg("payload of %s must not be null",
						RelationGetRelationName(trigdata->tg_relation))));
	payload = DatumGetJsonbP(payload_datum);

	if (strcmp(kind, "order") == 0)
	{
		Datum		object_id = SPI_getbinval(newtuple, tupdesc, key_col, &isnull);

		/*
		 * The ingest has just checked these very bytes: once is enough.  A
		 * restore brings back what the server dumped accepted, under its own
		 * dwh.max_order_items.
		 */
		ok = (!isnull &&
			  dwh_ingest_session_checked_order(DatumGetInt64(object_id),
											   payload, &ts)) ||
			dwh_order_payload_check(&payload->root,
									dwh_session_restores() ? INT_MAX :
									dwh_max_order_items,
									&ts, &problem);
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

	if (TRIGGER_FIRED_BY_UPDATE(trigdata->tg_event) && !is_history)
	{
		HeapTuple	oldtuple = trigdata->tg_trigtuple;
		Datum		old_payload;
		Datum		old_ts;
		bool		old_ts_null;
		int			cmp;

		old_payload = SPI_getbinval(oldtuple, tupdesc, payload_col, &isnull);
		old_ts = SPI_getbinval(oldtuple, tupdesc, version_col, &old_ts_null);
		cmp = isnull ? 1 :
			version_cmp(has_ts, ts, payload,
						!old_ts_null, DatumGetTimestamp(old_ts),
						DatumGetJsonbP(old_payload));
		if (cmp < 0)
		{
			/*
			 * Older, or losing a tie: a superseded version.  A 1.0 schema,
			 * not updated yet, has no history table: there it is dropped, as
			 * 1.0 did.
			 */
			if (dwh_schema_keeps_history())
				keep_in_history(kind, newtuple, tupdesc, has_ts, ts);
			return PointerGetDatum(NULL);
		}
		if (cmp == 0 && !sent_later(trigdata, tupdesc))
			return PointerGetDatum(NULL);	/* the stored version again */
	}

	cols[0] = version_col;
	values[0] = TimestampGetDatum(ts);
	nulls[0] = !has_ts;
	ncols = 1;
	if (TRIGGER_FIRED_BY_UPDATE(trigdata->tg_event) && !is_history)
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

/*
 * The dictionary lock (install/00_prelude.sql, dwh.dictionary_lock_key()):
 * the transaction-level advisory lock that pg_advisory_xact_lock() takes.
 */
#define DWH_DICTIONARY_LOCK_KEY INT64CONST(7238964021746305793)

PG_FUNCTION_INFO_V1(dwh_dictionary_lock_key);

/*
 * dwh.dictionary_lock_key() returns bigint: the key, for SQL.
 */
Datum
dwh_dictionary_lock_key(PG_FUNCTION_ARGS)
{
	PG_RETURN_INT64(DWH_DICTIONARY_LOCK_KEY);
}

static void
dictionary_locktag(LOCKTAG *tag)
{
	/* As pg_advisory_xact_lock(bigint) names it. */
	SET_LOCKTAG_ADVISORY(*tag, MyDatabaseId,
						 (uint32) (DWH_DICTIONARY_LOCK_KEY >> 32),
						 (uint32) DWH_DICTIONARY_LOCK_KEY, 1);
}

PG_FUNCTION_INFO_V1(dwh_dictionary_lock_exclusive);

/*
 * dwh.dictionary_lock_exclusive() returns boolean
 *
 * Does this transaction hold the dictionary lock exclusively?
 */
Datum
dwh_dictionary_lock_exclusive(PG_FUNCTION_ARGS)
{
	LOCKTAG		tag;

	dictionary_locktag(&tag);
	PG_RETURN_BOOL(LockHeldByMe(&tag, ExclusiveLock));
}

PG_FUNCTION_INFO_V1(dwh_stg_statement_lock);

/*
 * dwh.stg_statement_lock() trigger: BEFORE STATEMENT on the order tables.
 *
 * The first step of the lock order (install/40_products.sql) is the
 * dictionary lock, before any row.  dwh.ingest_orders takes it before its
 * statements, in the mode its batch needs; any other statement that writes
 * orders (a DBA's INSERT, COPY or upsert, a restore) takes it here,
 * exclusively, because only its AFTER triggers will know whether it renames
 * a dish, and by then it holds rows that a batch may wait for.
 */
Datum
dwh_stg_statement_lock(PG_FUNCTION_ARGS)
{
	TriggerData *trigdata = (TriggerData *) fcinfo->context;
	LOCKTAG		tag;

	if (!CALLED_AS_TRIGGER(fcinfo) ||
		!TRIGGER_FIRED_BEFORE(trigdata->tg_event) ||
		!TRIGGER_FIRED_FOR_STATEMENT(trigdata->tg_event))
		elog(ERROR, "dwh_stg_statement_lock: must be a BEFORE STATEMENT trigger");

	dictionary_locktag(&tag);
	if (!LockHeldByMe(&tag, ExclusiveLock) && !LockHeldByMe(&tag, ShareLock))
		(void) LockAcquire(&tag, ExclusiveLock, false, false);
	return PointerGetDatum(NULL);
}
