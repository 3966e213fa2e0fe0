/*-------------------------------------------------------------------------
 *
 * dwh_ingest.h
 *	  Set-based ingestion of raw order messages into STG.
 *
 *-------------------------------------------------------------------------
 */
#ifndef DWH_INGEST_H
#define DWH_INGEST_H

/* One raw message value and, when known, where it came from. */
typedef struct DwhIngestItem
{
	const char *data;
	int			len;
	bool		has_coordinates;
	int32		partition;
	int64		offset;
} DwhIngestItem;

/*
 * What became of a batch: received = applied + unchanged + other_type +
 * dead_lettered + replayed + deferred.
 */
typedef struct DwhIngestResult
{
	int			received;
	int			applied;		/* new or newer order versions stored */
	int			unchanged;		/* same or older versions, skipped */
	int			other_type;		/* stored in stg.other_events */
	int			dead_lettered;	/* stored in dwh.dead_letters */
	int			replayed;		/* already stored: same source, position and
								 * bytes; nothing written */
	int			mismatched;		/* of other_type and dead_lettered: stored
								 * where other bytes were stored before */
	int			deferred;		/* left out: another Kafka worker is applying
								 * their order (see dwh_inflight.c) */
} DwhIngestResult;

extern void dwh_ingest_batch(DwhIngestItem *items, int n, const char *source,
							 const char *topic, DwhIngestResult *result);
extern void dwh_ingest_batch_deferring(DwhIngestItem *items, int n,
									   const char *topic, int worker,
									   bool *deferred,
									   DwhIngestResult *result);

#endif							/* DWH_INGEST_H */
