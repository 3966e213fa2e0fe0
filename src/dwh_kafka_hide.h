/*-------------------------------------------------------------------------
 *
 * dwh_kafka_hide.h
 *	  Hide the values of the DBA's librdkafka properties in what librdkafka
 *	  says.
 *
 *-------------------------------------------------------------------------
 */
#ifndef DWH_KAFKA_HIDE_H
#define DWH_KAFKA_HIDE_H

#include <librdkafka/rdkafka.h>

extern void dwh_kafka_hide_forget(void);
extern void dwh_kafka_hide_property(const char *name);
extern const char *dwh_kafka_hide_values(const rd_kafka_conf_t *conf,
										 const char *text);

#endif							/* DWH_KAFKA_HIDE_H */
