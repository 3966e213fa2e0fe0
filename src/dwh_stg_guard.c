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
#include "utils/datum.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/rel.h"
#include "utils/snapmgr.h"
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

/* Does column attnum hold the same value (or null) in both tuples? */
static bool
column_unchanged(HeapTuple a, HeapTuple b, TupleDesc tupdesc, int attnum)
{
	Form_pg_attribute att = TupleDescAttr(tupdesc, attnum - 1);
	bool		a_null,
				b_null;
	Datum		a_value = SPI_getbinval(a, tupdesc, attnum, &a_null);
	Datum		b_value = SPI_getbinval(b, tupdesc, attnum, &b_null);

	if (a_null || b_null)
		return a_null == b_null;
	return datumIsEqual(a_value, b_value, att->attbyval, att->attlen);
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
static SPIPlanPtr order_current_plan = NULL;
static SPIPlanPtr user_current_plan = NULL;
static SPIPlanPtr restaurant_current_plan = NULL;

/* Is keep_in_history writing (a version older than the current one)? */
static bool keeping_in_history = false;

static int	sent_cmp(TriggerData *trigdata, TupleDesc tupdesc);

/* Run keep_in_history's insert, with keeping_in_history set meanwhile. */
static int
execute_keeping(SPIPlanPtr plan, Datum *args, const char *nulls)
{
	volatile int rc = 0;

	keeping_in_history = true;
	PG_TRY();
	{
		rc = SPI_execute_plan(plan, args, nulls, false, 0);
	}
	PG_FINALLY();
	{
		keeping_in_history = false;
	}
	PG_END_TRY();
	return rc;
}

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
	rc = execute_keeping(*plan, args, nulls);
	if (rc != SPI_OK_INSERT)
		elog(ERROR, "could not keep a superseded version: %s",
			 SPI_result_code_string(rc));
	SPI_finish();
}

/*
 * Did SPI just read a current version (none, or one row)?  If so, *cmp
 * compares the row's version with it, as version_cmp() does.
 */
static bool
compare_with_current(bool has_ts, Timestamp ts, Jsonb *payload, int *cmp)
{
	HeapTuple	cur;
	TupleDesc	cur_desc;
	bool		cur_ts_null;
	bool		isnull;
	Datum		cur_ts;
	Datum		cur_payload;

	if (SPI_processed != 1)
		return false;
	cur = SPI_tuptable->vals[0];
	cur_desc = SPI_tuptable->tupdesc;
	cur_ts = SPI_getbinval(cur, cur_desc, 1, &cur_ts_null);
	cur_payload = SPI_getbinval(cur, cur_desc, 2, &isnull);
	*cmp = version_cmp(has_ts, ts, payload, !cur_ts_null,
					   cur_ts_null ? 0 : DatumGetTimestamp(cur_ts),
					   DatumGetJsonbP(cur_payload));
	return true;
}

/*
 * A history table holds the versions of a key other than its current one:
 * one newer than the current version belongs in the current table (whose
 * guard then moves the current one here), and so does the current version
 * itself (received again, it raises the current row's sent_dttm; kept here
 * too, it would be held twice, which a warehouse that received it once
 * does not).  Written here directly, a newer version would be taken by DDS
 * for what the key held before its next version arrives, and the marts
 * would never count the change.  Nor may the history of a key without a
 * current version be written: an older version written to the current
 * table next would become current beside a newer one, which nothing
 * counts.  A restore is the exception to both: it loads the history first,
 * its dump's current versions are the newest, and it brings back what the
 * server dumped accepted.
 */
static void
refuse_newer_than_current(const char *kind, Relation rel, HeapTuple tuple,
						  TupleDesc tupdesc, int key_col, bool has_ts,
						  Timestamp ts, Jsonb *payload)
{
	SPIPlanPtr *plan;
	const char *current;
	bool		isnull;
	Datum		key;
	int			cmp;
	int			rc;

	if (strcmp(kind, "order") == 0)
	{
		plan = &order_current_plan;
		current = "stg.order_events";
	}
	else if (strcmp(kind, "user") == 0)
	{
		plan = &user_current_plan;
		current = "stg.users";
	}
	else
	{
		plan = &restaurant_current_plan;
		current = "stg.restaurants";
	}

	key = SPI_getbinval(tuple, tupdesc, key_col, &isnull);
	if (isnull)
		return;					/* refused by the NOT NULL constraint */

	/* As in keep_in_history: nothing a search_path could redirect. */
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	if (*plan == NULL)
	{
		Oid			type = TupleDescAttr(tupdesc, key_col - 1)->atttypid;
		char	   *sql = psprintf("SELECT update_ts, payload FROM %s "
								   "WHERE object_id OPERATOR(pg_catalog.=) $1",
								   current);

		*plan = dwh_prepare_kept(sql, 1, &type);
	}

	/*
	 * Read with the statement's snapshot, and again with a new one before a
	 * refusal: the statement may have waited for its writers' locks
	 * (dwh_stg_statement_lock) while another writer committed a current
	 * version, which the row is to be judged by.  Versions only grow, so the
	 * older snapshot can only refuse wrongly, never accept wrongly.  (A
	 * restore, which accepts the current version itself and a key without
	 * one, asks again for those: one probe more a row of a history restored
	 * before its current versions.)
	 */
	rc = SPI_execute_plan(*plan, &key, NULL, true, 1);
	if (rc == SPI_OK_SELECT &&
		!(compare_with_current(has_ts, ts, payload, &cmp) && cmp < 0))
		rc = SPI_execute_snapshot(*plan, &key, NULL, GetLatestSnapshot(),
								  InvalidSnapshot, true, false, 1);
	if (rc != SPI_OK_SELECT)
		elog(ERROR, "could not read the current version: %s",
			 SPI_result_code_string(rc));
	if (compare_with_current(has_ts, ts, payload, &cmp))
	{
		if (cmp > 0)
			ereport(ERROR,
					(errcode(ERRCODE_CHECK_VIOLATION),
					 errmsg("a version newer than the current one cannot be written to %s.%s",
							get_namespace_name(RelationGetNamespace(rel)),
							RelationGetRelationName(rel)),
					 errdetail("The row has object_id %s, whose current version in %s is older.",
							   SPI_getvalue(tuple, tupdesc, key_col), current),
					 errhint("Write it to %s: the version it replaces moves to the history.",
							 current)));
		else if (cmp == 0 && !dwh_session_restores())
			ereport(ERROR,
					(errcode(ERRCODE_CHECK_VIOLATION),
					 errmsg("the current version cannot be written to %s.%s",
							get_namespace_name(RelationGetNamespace(rel)),
							RelationGetRelationName(rel)),
					 errdetail("The row has object_id %s, whose current version in %s is this one.",
							   SPI_getvalue(tuple, tupdesc, key_col), current),
					 strcmp(kind, "order") == 0 ?
					 errhint("Write it to %s: a version received again raises the sent_dttm of its row there.",
							 current) :
					 errhint("%s holds it already.", current)));
	}
	else if (!dwh_session_restores())
		ereport(ERROR,
				(errcode(ERRCODE_CHECK_VIOLATION),
				 errmsg("a version cannot be written to %s.%s before its key has a current version",
						get_namespace_name(RelationGetNamespace(rel)),
						RelationGetRelationName(rel)),
				 errdetail("The row has object_id %s, which has no row in %s.",
						   SPI_getvalue(tuple, tupdesc, key_col), current),
				 errhint("Write it to %s: a version older than the current one moves to the history by itself.",
						 current)));
	SPI_finish();
}

/*
 * What identifies a row does not change: its object_id (a row moved to
 * another key would take an order or a value away from the first without
 * a trace in DDS), and in a history table its version, which is what was
 * received (only its sent_dttm changes, and only to grow).
 */
static void
refuse_changed_identity(TriggerData *trigdata, TupleDesc tupdesc, int key_col,
						int version_col, int payload_col, bool is_history)
{
	Relation	rel = trigdata->tg_relation;
	HeapTuple	old = trigdata->tg_trigtuple;
	HeapTuple	new = trigdata->tg_newtuple;
	bool		changed;

	if (!column_unchanged(old, new, tupdesc, key_col))
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("the object_id of a row of %s.%s cannot be changed",
						get_namespace_name(RelationGetNamespace(rel)),
						RelationGetRelationName(rel)),
				 errdetail("The row has object_id %s.",
						   SPI_getvalue(old, tupdesc, key_col)),
				 errhint("Write each version under its own object_id.")));
	if (!is_history)
		return;

	changed = !column_unchanged(old, new, tupdesc, version_col);
	if (!changed)
	{
		bool		old_null,
					new_null;
		Datum		old_payload = SPI_getbinval(old, tupdesc, payload_col, &old_null);
		Datum		new_payload = SPI_getbinval(new, tupdesc, payload_col, &new_null);

		changed = old_null || new_null ||
			dwh_jsonb_text_cmp(DatumGetJsonbP(old_payload),
							   DatumGetJsonbP(new_payload)) != 0;
	}
	if (changed)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("a version kept in %s.%s cannot be changed",
						get_namespace_name(RelationGetNamespace(rel)),
						RelationGetRelationName(rel)),
				 errdetail("The row has object_id %s; the history holds each version as it was received.",
						   SPI_getvalue(old, tupdesc, key_col)),
				 errhint("Write a new version to the current table instead.")));
	if (sent_cmp(trigdata, tupdesc) < 0)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("the sent_dttm of a version kept in %s.%s cannot go back",
						get_namespace_name(RelationGetNamespace(rel)),
						RelationGetRelationName(rel)),
				 errdetail("The row has object_id %s; a version keeps the greatest sent_dttm of the messages that brought it.",
						   SPI_getvalue(old, tupdesc, key_col))));
}

/*
 * How the new row of an update's sent_dttm compares with the old one's:
 * above 0 when it is later (or the old one NULL), below 0 when it is
 * earlier (or NULL where the old one was not), 0 when the same or when the
 * table has none (the dictionaries).  A version keeps the greatest
 * sent_dttm of the messages that brought it.
 */
static int
sent_cmp(TriggerData *trigdata, TupleDesc tupdesc)
{
	int			col = SPI_fnumber(tupdesc, "sent_dttm");
	bool		new_null,
				old_null;
	Timestamp	new_sent,
				old_sent;

	if (col <= 0)
		return 0;
	new_sent = DatumGetTimestamp(SPI_getbinval(trigdata->tg_newtuple, tupdesc,
											   col, &new_null));
	old_sent = DatumGetTimestamp(SPI_getbinval(trigdata->tg_trigtuple, tupdesc,
											   col, &old_null));
	if (new_null || old_null)
		return new_null == old_null ? 0 : (new_null ? -1 : 1);
	return new_sent > old_sent ? 1 : (new_sent < old_sent ? -1 : 0);
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
	bool		checked = false;	/* by the ingest, this very payload */
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
		 * dwh.max_order_items.  The limit is for what arrives: the history
		 * takes the versions replaced as they were accepted, under the limit
		 * of their day (a lower one since must not refuse the version that
		 * replaces them).
		 */
		checked = !isnull &&
			dwh_ingest_session_checked_order(DatumGetInt64(object_id),
											 payload, &ts);
		ok = checked ||
			dwh_order_payload_check(&payload->root,
									(is_history || dwh_session_restores()) ?
									INT_MAX : dwh_max_order_items,
									&ts, &problem);
	}
	else if (strcmp(kind, "user") == 0)
		ok = dwh_user_value_check(&payload->root, &has_ts, &ts, &problem);
	else if (strcmp(kind, "restaurant") == 0)
		ok = dwh_restaurant_value_check(&payload->root, &has_ts, &ts, &problem);
	else
		elog(ERROR, "dwh_stg_guard: unknown kind \"%s\"", kind);

	/*
	 * What the ingest and the Redis worker refuse before they write: keys no
	 * order can name, values nested deeper than they read.  Not in a restore,
	 * which brings back what the server dumped accepted.
	 */
	if (ok && !checked && !dwh_session_restores())
	{
		if (strcmp(kind, "order") != 0)
		{
			Datum		key = SPI_getbinval(newtuple, tupdesc, key_col, &isnull);

			if (!isnull)
			{
				text	   *t = DatumGetTextPP(key);

				ok = dwh_dictionary_key_check(VARDATA_ANY(t),
											  VARSIZE_ANY_EXHDR(t), &problem);
			}
		}
		if (ok)
			ok = dwh_jsonb_nesting_check(payload, &problem);
	}

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
		refuse_changed_identity(trigdata, tupdesc, key_col, version_col,
								payload_col, is_history);
	else if (is_history && !keeping_in_history)
		refuse_newer_than_current(kind, trigdata->tg_relation, newtuple,
								  tupdesc, key_col, has_ts, ts, payload);

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
		if (cmp == 0 && sent_cmp(trigdata, tupdesc) <= 0)
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
