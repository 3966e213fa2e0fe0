/*-------------------------------------------------------------------------
 *
 * dwh_kafka_queue.h
 *	  A librdkafka event queue that wakes a worker through its latch's
 *	  WaitEventSet, and the relay of librdkafka's log lines.
 *
 *-------------------------------------------------------------------------
 */
#ifndef DWH_KAFKA_QUEUE_H
#define DWH_KAFKA_QUEUE_H

#include <librdkafka/rdkafka.h>

#include "datatype/timestamp.h"
#include "storage/latch.h"

typedef struct DwhKafkaQueue
{
	rd_kafka_t *rk;				/* the client */
	rd_kafka_queue_t *queue;	/* its queue, served by the worker */
	const char *client;			/* "consumer 1", for the log */
	int			pipe_read;		/* written to by librdkafka: not empty */
	int			pipe_write;
	WaitEventSet *wait_set;		/* latch, postmaster death, pipe */
	char		last_log[256];	/* the last log line relayed, and when */
	TimestampTz last_log_at;
} DwhKafkaQueue;

extern void dwh_kafka_queue_start(DwhKafkaQueue *q, rd_kafka_t *rk,
								  rd_kafka_queue_t *queue, const char *client);
extern void dwh_kafka_queue_mute(DwhKafkaQueue *q);
extern void dwh_kafka_queue_stop(DwhKafkaQueue *q);
extern void dwh_kafka_queue_wait(DwhKafkaQueue *q, long timeout_ms);
extern void dwh_kafka_queue_relay_log(DwhKafkaQueue *q, rd_kafka_event_t *ev);
extern bool dwh_kafka_error_is_broker_down(rd_kafka_resp_err_t err);

#endif							/* DWH_KAFKA_QUEUE_H */
