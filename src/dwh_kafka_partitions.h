/*-------------------------------------------------------------------------
 *
 * dwh_kafka_partitions.h
 *	  Changes of the topic's number of partitions that the consumer group
 *	  does not see: partitions assigned to no one, partitions that are gone.
 *
 *-------------------------------------------------------------------------
 */
#ifndef DWH_KAFKA_PARTITIONS_H
#define DWH_KAFKA_PARTITIONS_H

#include "dwh_kafka_consumer.h"

extern int	dwh_kafka_partitions_check(DwhKafkaConsumer *consumer,
									   int worker_index);

#endif							/* DWH_KAFKA_PARTITIONS_H */
