/*-------------------------------------------------------------------------
 *
 * dwh_kafka_verify.h
 *	  Is the log a partition resumes in the one its stored offset was read
 *	  from?
 *
 *-------------------------------------------------------------------------
 */
#ifndef DWH_KAFKA_VERIFY_H
#define DWH_KAFKA_VERIFY_H

#include "dwh_kafka_offsets.h"

/* What a fetched message says about its partition's log. */
typedef enum DwhKafkaVerdict
{
	DWH_VERIFY_NONE,			/* nothing to check: apply it as usual */
	DWH_VERIFY_DROP,			/* the message applied last (the same log), or
								 * one of a replaced log whose gap is not
								 * served yet */
	DWH_VERIFY_REPLACED,		/* another message where the one applied was:
								 * drop it, and record the gap */
} DwhKafkaVerdict;

extern void dwh_kafka_verify_start(const int32 *partitions, int64 *offsets,
								   const bool *stopped,
								   const DwhKafkaLastApplied *last, int n);
extern DwhKafkaVerdict dwh_kafka_verify_message(int32 partition, int64 offset,
												const char *data, int len);
extern void dwh_kafka_verify_out_of_range(int32 partition, int64 offset);
extern bool dwh_kafka_verify_log_end(int32 partition, int64 high);
extern void dwh_kafka_verify_forget(const int32 *partitions, int n);
extern void dwh_kafka_verify_reset(void);

#endif							/* DWH_KAFKA_VERIFY_H */
