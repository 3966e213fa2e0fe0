/*-------------------------------------------------------------------------
 *
 * dwh_key_probe.h
 *	  Look uuid keys up in a table's primary key index, without a query.
 *
 *-------------------------------------------------------------------------
 */
#ifndef DWH_KEY_PROBE_H
#define DWH_KEY_PROBE_H

#include "access/genam.h"
#include "access/skey.h"
#include "executor/tuptable.h"
#include "utils/relcache.h"
#include "utils/snapshot.h"
#include "utils/uuid.h"

typedef struct DwhKeyProbe
{
	Relation	index;
	IndexScanDesc scan;
	TupleTableSlot *slot;
	ScanKeyData skey;
} DwhKeyProbe;

extern void dwh_key_probe_begin(DwhKeyProbe *probe, Relation rel,
								Snapshot snapshot);
extern bool dwh_key_probe(DwhKeyProbe *probe, const pg_uuid_t *key);
extern TupleTableSlot *dwh_key_probe_last(DwhKeyProbe *probe,
										  const pg_uuid_t *key);
extern void dwh_key_probe_end(DwhKeyProbe *probe);
extern int	dwh_uuid_cmp(const void *a, const void *b);

#endif							/* DWH_KEY_PROBE_H */
