/*-------------------------------------------------------------------------
 *
 * dwh_kafka_probe.h
 *	  Ask the brokers (a partition's offset, the topic's partition count)
 *	  without holding up SIGTERM.
 *
 *-------------------------------------------------------------------------
 */
#ifndef DWH_KAFKA_PROBE_H
#define DWH_KAFKA_PROBE_H

#include <librdkafka/rdkafka.h>

#include "dwh_kafka_consumer.h"

extern rd_kafka_resp_err_t dwh_kafka_probe_offset(rd_kafka_t *rk,
												  const char *topic,
												  int32 partition,
												  int64 *offset,
												  int timeout_ms);
extern bool dwh_kafka_probe_topic_start(rd_kafka_t *rk, const char *topic,
										const char *group, int timeout_ms);
extern bool dwh_kafka_probe_topic_answer(DwhKafkaTopicView *view,
										 rd_kafka_resp_err_t *err);
extern void dwh_kafka_probe_topic_cancel(void);
extern void dwh_kafka_probe_topic_reap(void);
extern bool dwh_kafka_probe_in_flight(void);

#endif							/* DWH_KAFKA_PROBE_H */
