/*-------------------------------------------------------------------------
 *
 * dwh_kafka_consumer.h
 *	  One librdkafka consumer, served from the worker's own thread only.
 *
 *-------------------------------------------------------------------------
 */
#ifndef DWH_KAFKA_CONSUMER_H
#define DWH_KAFKA_CONSUMER_H

#include "dwh_status.h"

typedef struct DwhKafkaConsumer DwhKafkaConsumer;

/* The topic as the brokers see it: its partitions, and who holds them. */
typedef struct DwhKafkaTopicView
{
	int			partition_count;	/* -1: not known */
	bool		assignment_known;	/* the group is stable, held is filled */
	bool		held[DWH_MAX_PARTITIONS];	/* by some member of the group */
} DwhKafkaTopicView;

typedef enum DwhKafkaEventKind
{
	DWH_KAFKA_NOTHING,			/* the queue is empty */
	DWH_KAFKA_MESSAGE,
	DWH_KAFKA_ASSIGN,			/* partitions given: look up their offsets */
	DWH_KAFKA_REVOKE,			/* partitions taken away */
	DWH_KAFKA_OUT_OF_RANGE,		/* the broker no longer holds a position: the
								 * partition is not fetched until it is
								 * reassigned */
	DWH_KAFKA_ERROR,			/* librdkafka retries by itself */
	DWH_KAFKA_FATAL				/* the consumer must be recreated */
} DwhKafkaEventKind;

typedef struct DwhKafkaEvent
{
	DwhKafkaEventKind kind;
	/* DWH_KAFKA_MESSAGE: a copy of the value, in the caller's context */
	/* DWH_KAFKA_OUT_OF_RANGE: the offset that could not be fetched */
	int32		partition;
	int64		offset;
	/* DWH_KAFKA_OUT_OF_RANGE: the broker's watermarks, -1 if unknown */
	int64		low;
	int64		high;
	char	   *data;
	int			len;
	/* DWH_KAFKA_ASSIGN, DWH_KAFKA_REVOKE */
	int			n_partitions;
	int32	   *partitions;
	/* DWH_KAFKA_ERROR, DWH_KAFKA_FATAL, DWH_KAFKA_OUT_OF_RANGE */
	bool		broker_down;
	char		error[512];
} DwhKafkaEvent;

extern DwhKafkaConsumer *dwh_kafka_consumer_create(int worker_index,
												   char *error,
												   size_t error_size);
extern void dwh_kafka_consumer_destroy(DwhKafkaConsumer *consumer, bool exiting,
									   bool brokers_down);
extern void dwh_kafka_consumer_poll(DwhKafkaConsumer *consumer,
									DwhKafkaEvent *event);
extern void dwh_kafka_consumer_wait(DwhKafkaConsumer *consumer,
									long timeout_ms);
extern void dwh_kafka_consumer_assign(DwhKafkaConsumer *consumer,
									  const int64 *offsets,
									  const bool *stopped);
extern void dwh_kafka_consumer_reassign(DwhKafkaConsumer *consumer,
										const int64 *offsets,
										const bool *stopped);
extern void dwh_kafka_consumer_stop(DwhKafkaConsumer *consumer,
									int32 partition);
extern bool dwh_kafka_consumer_is_stopped(DwhKafkaConsumer *consumer,
										  int32 partition);
extern bool dwh_kafka_consumer_query_watermarks(DwhKafkaConsumer *consumer,
												int32 partition,
												int64 *low, int64 *high,
												int timeout_ms, char *error,
												size_t error_size);
extern bool dwh_kafka_consumer_ask_topic(DwhKafkaConsumer *c, int timeout_ms);
extern bool dwh_kafka_consumer_topic_view(DwhKafkaTopicView *view);
extern int	dwh_kafka_consumer_session_timeout_ms(DwhKafkaConsumer *c);
extern bool dwh_kafka_consumer_leader_answers(DwhKafkaConsumer *c, int32 partition,
											  int timeout_ms);
extern void dwh_kafka_consumer_revoke(DwhKafkaConsumer *consumer);
extern void dwh_kafka_consumer_seek(DwhKafkaConsumer *consumer,
									int32 partition, int64 offset);
extern void dwh_kafka_consumer_commit(DwhKafkaConsumer *consumer,
									  const int32 *partitions,
									  const int64 *next_offsets, int n);
extern int	dwh_kafka_consumer_assignment(DwhKafkaConsumer *consumer,
										  int32 **partitions);
extern void dwh_kafka_consumer_publish_watermarks(DwhKafkaConsumer *consumer);
extern void dwh_kafka_consumer_refresh_stopped(DwhKafkaConsumer *consumer,
											   int timeout_ms);
extern int64 dwh_kafka_consumer_high_watermark(DwhKafkaConsumer *consumer,
											   int32 partition);
extern int64 dwh_kafka_consumer_take_log_end(DwhKafkaConsumer *consumer,
											 int32 partition,
											 int64 *delivered_next);
extern const char *dwh_kafka_consumer_topic(DwhKafkaConsumer *consumer);

#endif							/* DWH_KAFKA_CONSUMER_H */
