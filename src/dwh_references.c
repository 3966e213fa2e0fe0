/*-------------------------------------------------------------------------
 *
 * dwh_references.c
 *	  AFTER INSERT statement trigger of the order links and satellites:
 *	  every row's hub rows exist.
 *
 * The links and satellites of orders refer to their hubs without foreign
 * keys: a foreign key runs a query and locks a hub row for each row
 * inserted, about ten rows an order.  This trigger refuses the same rows
 * once per statement: it reads the statement's new rows (its transition
 * table), sorts each reference's keys, and looks each distinct key up in
 * the hub's primary key index, raising 23503 as a foreign key would.
 *
 * No row lock keeps the answer true until commit: hub rows are never
 * deleted and their keys never change (dwh.order_references_kept() refuses
 * both, and a TRUNCATE of a hub must take the tables that refer to it
 * along).  So a lookup may see any hub row that exists for good: those
 * this transaction wrote, the statement's own included, and those of
 * committed transactions (SnapshotSelf).  Like a foreign key's check, the
 * lookup does not ask for the inserting role's privileges on the hub.
 *
 * It replaced a PL/pgSQL function that ran an anti-join per reference; the
 * lookups are the same, without a plan, an executor or a GUC nesting level
 * around them (the check took 11% of a drain's CPU, then 5.5%: the index
 * descents themselves).
 *
 * Four tables refer to dds.h_order, and a batch writes the same orders into
 * each, one statement after the other: the keys that a check found are
 * remembered until the end of the transaction, and the next check of the
 * same hub looks up only the others (about three quarters of the descents
 * saved).  What was found stays found, for the reasons above, except when
 * the subtransaction that found it aborts (the rows it wrote are gone: it
 * and those it began forget what they found) or when the hub is truncated
 * in the transaction (nothing is remembered for a hub that was created or
 * given a new file in the transaction: TRUNCATE may then empty it in
 * place).  Another transaction cannot truncate it meanwhile: the checks
 * hold a lock on it until commit.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/table.h"
#include "access/xact.h"
#include "catalog/pg_type.h"
#include "commands/trigger.h"
#include "executor/executor.h"
#include "fmgr.h"
#include "lib/qunique.h"
#include "utils/lsyscache.h"
#include "utils/rel.h"
#include "utils/snapmgr.h"
#include "utils/tuplestore.h"
#include "utils/uuid.h"

#include "dwh_key_probe.h"
#include "dwh_uuid.h"

PG_FUNCTION_INFO_V1(dwh_order_references_exist);

/* A reference of a table of dds to a hub of the same schema. */
typedef struct Reference
{
	const char *table;
	const char *column;
	const char *hub;
} Reference;

/* The order first: a row missing several hubs reports its order's. */
static const Reference references[] = {
	{"l_order_user", "h_order_pk", "h_order"},
	{"l_order_user", "h_user_pk", "h_user"},
	{"l_order_product", "h_order_pk", "h_order"},
	{"l_order_product", "h_product_pk", "h_product"},
	{"s_order_status", "h_order_pk", "h_order"},
	{"s_order_cost", "h_order_pk", "h_order"},
};

/*
 * The keys of a hub that a check of this transaction found, sorted; one set
 * per hub (h_order, h_user, h_product), the last one checked.  Kept in
 * TopTransactionContext; the statements of a batch hold a few thousand.
 */
typedef struct FoundKeys
{
	Oid			hub;			/* InvalidOid: an empty slot */
	SubTransactionId subxact;	/* the (sub)transaction that found them */
	int			count;
	pg_uuid_t  *keys;
} FoundKeys;

#define FOUND_HUBS 3

/* A statement with more distinct keys than this is not remembered. */
#define FOUND_KEYS_MAX 65536

static FoundKeys found[FOUND_HUBS];
static bool callbacks_registered = false;

static void
forget(FoundKeys *f, bool free_keys)
{
	if (free_keys && f->keys != NULL)
		pfree(f->keys);
	f->hub = InvalidOid;
	f->count = 0;
	f->keys = NULL;
}

/* The transaction's memory goes with it, and what it found with it. */
static void
found_xact_callback(XactEvent event, void *arg)
{
	switch (event)
	{
		case XACT_EVENT_COMMIT:
		case XACT_EVENT_PARALLEL_COMMIT:
		case XACT_EVENT_PREPARE:
		case XACT_EVENT_ABORT:
		case XACT_EVENT_PARALLEL_ABORT:
			for (int i = 0; i < FOUND_HUBS; i++)
				forget(&found[i], false);
			break;
		default:
			break;
	}
}

/*
 * Subtransaction ids grow within a transaction: what the aborting
 * subtransaction found, or one it began, has an id not below its own.
 */
static void
found_subxact_callback(SubXactEvent event, SubTransactionId mySubid,
					   SubTransactionId parentSubid, void *arg)
{
	if (event != SUBXACT_EVENT_ABORT_SUB)
		return;
	for (int i = 0; i < FOUND_HUBS; i++)
		if (OidIsValid(found[i].hub) && found[i].subxact >= mySubid)
			forget(&found[i], true);
}

/*
 * May what is found in hub be remembered?  Not if the hub was created or
 * given a new file in this transaction: TRUNCATE may empty it in place.
 */
static bool
hub_is_stable(Relation hub)
{
	return hub->rd_createSubid == InvalidSubTransactionId &&
		hub->rd_firstRelfilenodeSubid == InvalidSubTransactionId;
}

/*
 * What was found in hub, or NULL: nothing, or the hub was created or
 * truncated in this transaction.
 */
static FoundKeys *
found_in(Relation hub)
{
	if (!hub_is_stable(hub))
		return NULL;
	for (int i = 0; i < FOUND_HUBS; i++)
		if (found[i].hub == RelationGetRelid(hub))
			return &found[i];
	return NULL;
}

/* Remember that the count keys were found in hub. */
static void
remember(Relation hub, const pg_uuid_t *keys, int count)
{
	FoundKeys  *f = found_in(hub);

	if (!hub_is_stable(hub) || count > FOUND_KEYS_MAX)
		return;
	if (!callbacks_registered)
	{
		RegisterXactCallback(found_xact_callback, NULL);
		RegisterSubXactCallback(found_subxact_callback, NULL);
		callbacks_registered = true;
	}
	if (f == NULL)
	{
		for (int i = 0; i < FOUND_HUBS && f == NULL; i++)
			if (!OidIsValid(found[i].hub))
				f = &found[i];
		if (f == NULL)
			f = &found[0];
	}
	forget(f, true);
	f->keys = MemoryContextAlloc(TopTransactionContext,
								 Max(count, 1) * sizeof(pg_uuid_t));
	memcpy(f->keys, keys, count * sizeof(pg_uuid_t));
	f->count = count;
	f->subxact = GetCurrentSubTransactionId();
	f->hub = RelationGetRelid(hub);
}

/*
 * The distinct non-null values of column attnum (a uuid) among the rows of
 * the transition table, sorted; their number goes to *count.  The table is
 * read through a read pointer of its own, as the executor's scans of a
 * transition table do: other triggers of the statement read it too.
 */
static pg_uuid_t *
distinct_keys(Tuplestorestate *rows, TupleDesc tupdesc, AttrNumber attnum,
			  int *count)
{
	TupleTableSlot *slot = MakeSingleTupleTableSlot(tupdesc, &TTSOpsMinimalTuple);
	int			readptr = tuplestore_alloc_read_pointer(rows, EXEC_FLAG_REWIND);
	int			allocated = 64;
	int			n = 0;
	pg_uuid_t  *keys = palloc(allocated * sizeof(pg_uuid_t));

	tuplestore_select_read_pointer(rows, readptr);
	tuplestore_rescan(rows);
	while (tuplestore_gettupleslot(rows, true, false, slot))
	{
		bool		isnull;
		Datum		value = slot_getattr(slot, attnum, &isnull);

		if (isnull)
			continue;			/* as a foreign key: nothing to check */
		if (n == allocated)
		{
			allocated *= 2;
			keys = repalloc(keys, allocated * sizeof(pg_uuid_t));
		}
		memcpy(&keys[n++], DatumGetUUIDP(value), sizeof(pg_uuid_t));
	}
	ExecDropSingleTupleTableSlot(slot);

	qsort(keys, n, sizeof(pg_uuid_t), dwh_uuid_cmp);
	*count = qunique(keys, n, sizeof(pg_uuid_t), dwh_uuid_cmp);
	return keys;
}

/*
 * Look each key (sorted) up in the hub's primary key, but for those an
 * earlier check found; returns the first key missing, or NULL.
 */
static pg_uuid_t *
first_missing(Relation hub, pg_uuid_t *keys, int count)
{
	FoundKeys  *f = found_in(hub);
	DwhKeyProbe probe;
	pg_uuid_t  *missing = NULL;
	int			known = 0;
	bool		probing = false;

	for (int i = 0; i < count && missing == NULL; i++)
	{
		/* Both are sorted: walk the found keys along. */
		if (f != NULL)
		{
			while (known < f->count &&
				   dwh_uuid_cmp(&f->keys[known], &keys[i]) < 0)
				known++;
			if (known < f->count &&
				dwh_uuid_cmp(&f->keys[known], &keys[i]) == 0)
				continue;
		}
		if (!probing)
		{
			dwh_key_probe_begin(&probe, hub, SnapshotSelf);
			probing = true;
		}
		if (!dwh_key_probe(&probe, &keys[i]))
			missing = &keys[i];
	}
	if (probing)
		dwh_key_probe_end(&probe);
	/* A check that found every key among the remembered ones keeps them. */
	if (missing == NULL && probing)
		remember(hub, keys, count);
	return missing;
}

/*
 * dwh_order_references_exist
 *		Trigger function: AFTER INSERT ... REFERENCING NEW TABLE ... FOR EACH
 *		STATEMENT on each table of references[].
 */
Datum
dwh_order_references_exist(PG_FUNCTION_ARGS)
{
	TriggerData *trigdata = (TriggerData *) fcinfo->context;
	Relation	rel;
	const char *table;
	bool		known = false;

	if (!CALLED_AS_TRIGGER(fcinfo) ||
		!TRIGGER_FIRED_AFTER(trigdata->tg_event) ||
		!TRIGGER_FIRED_FOR_STATEMENT(trigdata->tg_event) ||
		!TRIGGER_FIRED_BY_INSERT(trigdata->tg_event) ||
		trigdata->tg_newtable == NULL)
		elog(ERROR, "dwh_order_references_exist: not called as an AFTER INSERT statement trigger with a new table");

	rel = trigdata->tg_relation;
	table = RelationGetRelationName(rel);
	for (int r = 0; r < lengthof(references); r++)
	{
		const Reference *ref = &references[r];
		AttrNumber	attnum;
		Oid			hub_oid;
		Relation	hub;
		pg_uuid_t  *keys;
		pg_uuid_t  *missing;
		int			count;

		if (strcmp(ref->table, table) != 0)
			continue;
		known = true;
		attnum = get_attnum(RelationGetRelid(rel), ref->column);
		hub_oid = get_relname_relid(ref->hub, RelationGetNamespace(rel));
		if (attnum == InvalidAttrNumber || !OidIsValid(hub_oid) ||
			TupleDescAttr(RelationGetDescr(rel), attnum - 1)->atttypid != UUIDOID)
			elog(ERROR, "dwh_order_references_exist: uuid column \"%s\" of \"%s\" or hub \"%s\" not found",
				 ref->column, table, ref->hub);

		keys = distinct_keys(trigdata->tg_newtable, RelationGetDescr(rel), attnum,
							 &count);
		if (count == 0)
			continue;
		hub = table_open(hub_oid, AccessShareLock);
		missing = first_missing(hub, keys, count);
		table_close(hub, NoLock);
		if (missing != NULL)
		{
			char		key_text[DWH_UUID_TEXT_LEN + 1];

			dwh_uuid_format(missing, key_text);
			key_text[DWH_UUID_TEXT_LEN] = '\0';
			ereport(ERROR,
					(errcode(ERRCODE_FOREIGN_KEY_VIOLATION),
					 errmsg("insert on table \"dds.%s\" refers to a row missing from \"dds.%s\"",
							table, ref->hub),
					 errdetail("Key (%s)=(%s) is not present in table \"dds.%s\".",
							   ref->column, key_text, ref->hub),
					 errhint("Hub rows come first: dwh loads a hub in the statement that loads its links and satellites.")));
		}
		pfree(keys);
	}
	if (!known)
		elog(ERROR, "dwh_order_references_exist: fired on table \"%s\", which it does not know", table);

	return PointerGetDatum(NULL);
}
