/*-------------------------------------------------------------------------
 *
 * dwh_kafka_destroy.h
 *	  Destroy a librdkafka client within a deadline.
 *
 *-------------------------------------------------------------------------
 */
#ifndef DWH_KAFKA_DESTROY_H
#define DWH_KAFKA_DESTROY_H

#include <librdkafka/rdkafka.h>

/* How long a client's destruction may take before it is given up. */
#define DWH_KAFKA_DESTROY_MS	3000

extern bool dwh_kafka_destroy_within(rd_kafka_t *rk, int flags, int timeout_ms);
extern void dwh_kafka_client_abandoned(const char *client) pg_attribute_noreturn();

#endif							/* DWH_KAFKA_DESTROY_H */
