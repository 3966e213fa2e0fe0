/*-------------------------------------------------------------------------
 *
 * dwh_key_probe.c
 *	  Look uuid keys up in a table's primary key index, without a query.
 *
 * The vault's hubs and links have a primary key of one uuid column, its
 * satellites one that starts with the hub's key.  A statement that only
 * asks whether a key is there, or for a satellite's newest row, pays for
 * a plan, an executor and a join; these lookups are the index descents
 * alone, and no plan made while the table was small can turn them into
 * scans of the table.  The caller opens the table and chooses the
 * snapshot: which rows count as there is its question (dwh_references.c,
 * dwh_order_keys.c).  Keys looked up in sorted order share the upper pages
 * of their descents.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/stratnum.h"
#include "access/tableam.h"
#include "executor/executor.h"
#include "utils/fmgroids.h"
#include "utils/rel.h"

#include "dwh_key_probe.h"

/* qsort order of pg_uuid_t: the order of the uuid type. */
int
dwh_uuid_cmp(const void *a, const void *b)
{
	return memcmp(a, b, UUID_LEN);
}

/*
 * Get ready to look keys up in the primary key of rel, under snapshot.  The
 * index's lock is held until commit, as a query's would be.
 */
void
dwh_key_probe_begin(DwhKeyProbe *probe, Relation rel, Snapshot snapshot)
{
	Oid			index_oid = RelationGetPrimaryKeyIndex(rel);

	if (!OidIsValid(index_oid))
		elog(ERROR, "table \"%s\" has no primary key",
			 RelationGetRelationName(rel));
	probe->index = index_open(index_oid, AccessShareLock);
	if (TupleDescAttr(RelationGetDescr(probe->index), 0)->atttypid != UUIDOID)
		elog(ERROR, "primary key of \"%s\" does not start with a uuid column",
			 RelationGetRelationName(rel));
	probe->slot = table_slot_create(rel, NULL);
	probe->scan = index_beginscan(rel, probe->index, snapshot, 1, 0);
	ScanKeyInit(&probe->skey, 1, BTEqualStrategyNumber, F_UUID_EQ, (Datum) 0);
}

/* Is there a row with this key (as the first column) that the snapshot sees? */
bool
dwh_key_probe(DwhKeyProbe *probe, const pg_uuid_t *key)
{
	probe->skey.sk_argument = UUIDPGetDatum(key);
	index_rescan(probe->scan, &probe->skey, 1, NULL, 0);
	return index_getnext_slot(probe->scan, ForwardScanDirection, probe->slot);
}

/*
 * The row with this key as the first column and the greatest rest of the
 * primary key that the snapshot sees, in a slot valid until the next
 * lookup; NULL if there is none.
 */
TupleTableSlot *
dwh_key_probe_last(DwhKeyProbe *probe, const pg_uuid_t *key)
{
	probe->skey.sk_argument = UUIDPGetDatum(key);
	index_rescan(probe->scan, &probe->skey, 1, NULL, 0);
	if (!index_getnext_slot(probe->scan, BackwardScanDirection, probe->slot))
		return NULL;
	return probe->slot;
}

void
dwh_key_probe_end(DwhKeyProbe *probe)
{
	index_endscan(probe->scan);
	ExecDropSingleTupleTableSlot(probe->slot);
	index_close(probe->index, NoLock);
}
