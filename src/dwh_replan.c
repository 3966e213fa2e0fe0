/*-------------------------------------------------------------------------
 *
 * dwh_replan.c
 *	  Make a session's plans again once the warehouse has grown.
 *
 * A session keeps the plans of a batch's statements (PL/pgSQL's, and this
 * extension's SPI plans), and batches of a few messages always take the
 * generic ones (dwh_ingest.c): each is made once, for the sizes the tables
 * had then.  PostgreSQL makes them again when ANALYZE changes a table's
 * statistics, but autovacuum analyzes a table only once a tenth of it has
 * changed, and first at its next visit to the database.  A Kafka worker
 * that made its plans on a nearly empty warehouse hashed whole link tables
 * that had grown since, in every batch of changed orders, until then
 * (docs/benchmarks.md, "Design choices behind the figures").
 *
 * So whenever the order hub, which grows with every order and with it the
 * tables a batch reads, has doubled in pages since the session's plans were
 * made, the session drops them all and the next statements are planned for
 * the tables as they are now (the planner scales a table's statistics to
 * its current size).  That happens a few times in the life of a warehouse,
 * and a plan never serves a table more than twice the size it was made for.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/relation.h"
#include "catalog/namespace.h"
#include "storage/bufmgr.h"
#include "storage/lmgr.h"
#include "utils/lsyscache.h"
#include "utils/plancache.h"
#include "utils/rel.h"

#include "dwh_replan.h"

/* Below this size a table is read whole at little cost, whatever the plan. */
#define REPLAN_MIN_PAGES 8

/* Pages of the order hub when this session's plans were last dropped. */
static BlockNumber planned_for = InvalidBlockNumber;

/*
 * Drop this session's plans if the order hub has doubled since they were
 * made.  Call it in a transaction, before the statements it concerns.
 *
 * Reads the hub's size under a lock taken only if free and released at
 * once: a batch must not hold a lock on a DDS table before the dictionary
 * lock (lock order: install/40_products.sql), or dwh.rebuild(), which
 * truncates DDS under that lock, could wait for it while the batch waits
 * for the rebuild.  A batch that finds the lock taken looks next time.
 */
void
dwh_replan_if_grown(void)
{
	Oid			schema;
	Oid			relid;
	Relation	rel;
	BlockNumber pages;

	schema = get_namespace_oid("dds", true);
	if (!OidIsValid(schema))
		return;
	relid = get_relname_relid("h_order", schema);
	if (!OidIsValid(relid) || !ConditionalLockRelationOid(relid, AccessShareLock))
		return;
	rel = try_relation_open(relid, NoLock);
	if (rel == NULL)
	{
		UnlockRelationOid(relid, AccessShareLock);
		return;
	}
	pages = RelationGetNumberOfBlocks(rel);
	relation_close(rel, NoLock);
	UnlockRelationOid(relid, AccessShareLock);

	/* A session's first batch, or a hub emptied (dwh.rebuild(vault => true)). */
	if (planned_for == InvalidBlockNumber || pages < planned_for)
		planned_for = pages;
	else if (pages >= Max(2 * planned_for, REPLAN_MIN_PAGES))
	{
		elog(DEBUG1, "dds.h_order has grown from %u to %u pages since this session's plans were made: making them again",
			 planned_for, pages);
		ResetPlanCache();
		planned_for = pages;
	}
}
