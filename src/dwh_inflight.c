/*-------------------------------------------------------------------------
 *
 * dwh_inflight.c
 *	  The orders each Kafka worker is applying, for the other workers.
 *
 * Versions of one order reach any partition, so two Kafka workers often
 * apply batches that hold versions of the same order at once.  The second
 * one to write that order's row in stg.order_events would wait there for
 * the first one's commit, its whole batch with it, and the workers would
 * take turns instead of working side by side.  So each worker marks the
 * orders of the batch it is applying in a bitmap of its own in shared
 * memory (two bits an order, a Bloom filter), and leaves out of its batch
 * the orders another worker has marked: their messages wait for its next
 * batch (dwh_kafka_worker.c), by which time the other has committed.
 *
 * A mark is only a hint.  A worker that misses one (read while the other
 * was still marking) waits on the row as before; a false match (the
 * filter's, about one order in 4,000 with 1,000 orders in flight) only
 * moves an order to the next batch.  Neither changes what is applied:
 * every layer is a function of the versions received, in any order.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "miscadmin.h"
#include "port/atomics.h"
#include "storage/ipc.h"
#include "storage/lwlock.h"
#include "storage/shmem.h"

#include "dwh_inflight.h"
#include "dwh_status.h"

/* 2^17 bits a worker: 16 kB, 256 kB for the most workers there can be. */
#define INFLIGHT_BITS		(1 << 17)
#define INFLIGHT_WORDS		(INFLIGHT_BITS / 64)

typedef struct InflightMap
{
	uint64		words[INFLIGHT_WORDS];
} InflightMap;

static InflightMap *maps = NULL;

/*
 * dwh_inflight_shmem_request
 *		Reserve the shared memory (PG15: from shmem_request_hook only).
 */
void
dwh_inflight_shmem_request(void)
{
	RequestAddinShmemSpace(MAXALIGN(sizeof(InflightMap) * DWH_MAX_KAFKA_WORKERS));
}

/*
 * dwh_inflight_shmem_startup
 *		Create or attach to the maps (from shmem_startup_hook).
 */
void
dwh_inflight_shmem_startup(void)
{
	bool		found;

	LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
	maps = ShmemInitStruct("dwh orders in flight",
						   sizeof(InflightMap) * DWH_MAX_KAFKA_WORKERS, &found);
	if (!found)
		memset(maps, 0, sizeof(InflightMap) * DWH_MAX_KAFKA_WORKERS);
	LWLockRelease(AddinShmemInitLock);
}

/* The two bits of an order: halves of a 64-bit mix of its id. */
static void
order_bits(int64 object_id, uint32 *a, uint32 *b)
{
	uint64		h = (uint64) object_id;

	/* The finalizer of MurmurHash3: every bit of the id moves each half. */
	h ^= h >> 33;
	h *= UINT64CONST(0xff51afd7ed558ccd);
	h ^= h >> 33;
	h *= UINT64CONST(0xc4ceb9fe1a85ec53);
	h ^= h >> 33;
	*a = (uint32) h % INFLIGHT_BITS;
	*b = (uint32) (h >> 32) % INFLIGHT_BITS;
}

static bool
map_has(const InflightMap *map, uint32 a, uint32 b)
{
	return (map->words[a / 64] & (UINT64CONST(1) << (a % 64))) != 0 &&
		(map->words[b / 64] & (UINT64CONST(1) << (b % 64))) != 0;
}

/*
 * dwh_inflight_claim
 *		Mark an order as applied by worker (1-based) unless another worker
 *		has marked it; returns whether it is this worker's now.
 */
bool
dwh_inflight_claim(int worker, int64 object_id)
{
	uint32		a,
				b;
	InflightMap *own;
	int			i;

	Assert(worker >= 1 && worker <= DWH_MAX_KAFKA_WORKERS);
	if (maps == NULL)
		return true;
	order_bits(object_id, &a, &b);
	own = &maps[worker - 1];

	/* Read the others' marks after ours are visible, not before. */
	own->words[a / 64] |= UINT64CONST(1) << (a % 64);
	own->words[b / 64] |= UINT64CONST(1) << (b % 64);
	pg_memory_barrier();
	for (i = 0; i < DWH_MAX_KAFKA_WORKERS; i++)
		if (i != worker - 1 && map_has(&maps[i], a, b))
			return false;
	return true;
}

/*
 * dwh_inflight_clear
 *		Forget the marks of worker (1-based): its batch committed or failed.
 */
void
dwh_inflight_clear(int worker)
{
	Assert(worker >= 1 && worker <= DWH_MAX_KAFKA_WORKERS);
	if (maps == NULL)
		return;
	memset(&maps[worker - 1], 0, sizeof(InflightMap));
	pg_memory_barrier();
}
