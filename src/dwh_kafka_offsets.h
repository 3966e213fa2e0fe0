/*-------------------------------------------------------------------------
 *
 * dwh_kafka_offsets.h
 *	  Kafka offsets stored in dwh.kafka_offsets, in the transaction of the
 *	  batch they belong to.
 *
 *-------------------------------------------------------------------------
 */
#ifndef DWH_KAFKA_OFFSETS_H
#define DWH_KAFKA_OFFSETS_H

#include "dwh_dead_letter.h"

/* Stands for "no offset stored yet". */
#define DWH_NO_OFFSET	(-1)

/*
 * The message a partition applied last, below its stored offset: where a
 * worker that starts the partition checks its log (dwh_kafka_verify.c).
 * With transactions, markers lie between it and the stored offset.
 */
typedef struct DwhKafkaLastApplied
{
	int64		offset;			/* DWH_NO_OFFSET: not known */
	uint8		sha256[DWH_SHA256_LEN];
} DwhKafkaLastApplied;

/* What dwh_kafka_offsets_gap() did. */
typedef enum DwhKafkaGapOutcome
{
	DWH_GAP_NONE,				/* the broker holds the stored offset */
	DWH_GAP_MOVED,				/* dwh.kafka_seek() moved the partition */
	DWH_GAP_STILL_STOPPED,		/* its gap was recorded before, still open */
	DWH_GAP_SKIPPED,			/* recorded, stored offset moved past it */
	DWH_GAP_STOPPED				/* recorded open: the partition stops */
} DwhKafkaGapOutcome;

typedef struct DwhKafkaGap
{
	int64		next_offset;	/* stored offset the broker no longer holds */
	int64		log_start_offset;	/* the first offset it holds */
	int64		log_end_offset; /* the offset of its next message */
} DwhKafkaGap;

extern void dwh_kafka_offsets_lookup(const char *topic, const int32 *partitions,
									 int n, int64 *next_offsets, bool *stopped,
									 DwhKafkaLastApplied *last);
extern void dwh_kafka_offsets_lock(const char *topic, const int32 *partitions,
								   int n, int64 *next_offsets,
								   bool *seek_requested, bool *stopped);
extern DwhKafkaGapOutcome dwh_kafka_offsets_gap(const char *topic,
												int32 partition,
												int64 fetch_offset,
												int64 expected,
												int64 low, int64 high,
												bool replaced, bool stop,
												DwhKafkaGap *gap);
extern void dwh_kafka_offsets_store(const char *topic, const int32 *partitions,
									const int64 *next_offsets,
									const DwhKafkaLastApplied *last, int n);
extern int64 dwh_kafka_offsets_start_at(const char *topic, int32 partition,
										int64 offset);
extern bool dwh_kafka_offsets_skip_to_end(const char *topic, int32 partition,
										  int64 expected, int64 end);
extern int	dwh_kafka_offsets_list(const char *topic, int32 **partitions,
								   int64 **next_offsets, bool **stopped);
extern int	dwh_kafka_offsets_take_seeks(const char *topic,
										 const int32 *partitions, int n,
										 int32 **seek_partitions,
										 int64 **seek_offsets);

#endif							/* DWH_KAFKA_OFFSETS_H */
