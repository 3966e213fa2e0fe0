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

/* Stands for "no offset stored yet". */
#define DWH_NO_OFFSET	(-1)

extern void dwh_kafka_offsets_lookup(const char *topic, const int32 *partitions,
									 int n, int64 *next_offsets);
extern void dwh_kafka_offsets_lock(const char *topic, const int32 *partitions,
								   int n, int64 *next_offsets,
								   bool *seek_requested);
extern void dwh_kafka_offsets_store(const char *topic, const int32 *partitions,
									const int64 *next_offsets, int n);
extern int	dwh_kafka_offsets_take_seeks(const char *topic,
										 const int32 *partitions, int n,
										 int32 **seek_partitions,
										 int64 **seek_offsets);

#endif							/* DWH_KAFKA_OFFSETS_H */
