/*-------------------------------------------------------------------------
 *
 * dwh_kafka_probe.h
 *	  Ask a partition's leader for an offset without holding up SIGTERM.
 *
 *-------------------------------------------------------------------------
 */
#ifndef DWH_KAFKA_PROBE_H
#define DWH_KAFKA_PROBE_H

#include <librdkafka/rdkafka.h>

extern rd_kafka_resp_err_t dwh_kafka_probe_offset(rd_kafka_t *rk,
												  const char *topic,
												  int32 partition,
												  int64 *offset,
												  int timeout_ms);
extern bool dwh_kafka_probe_in_flight(void);

#endif							/* DWH_KAFKA_PROBE_H */
