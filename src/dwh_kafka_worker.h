/*-------------------------------------------------------------------------
 *
 * dwh_kafka_worker.h
 *	  The Kafka consumer background workers.
 *
 *-------------------------------------------------------------------------
 */
#ifndef DWH_KAFKA_WORKER_H
#define DWH_KAFKA_WORKER_H

extern void dwh_kafka_register_workers(void);

#endif							/* DWH_KAFKA_WORKER_H */
