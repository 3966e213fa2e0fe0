/*-------------------------------------------------------------------------
 *
 * dwh_kafka_options.h
 *	  dwh.kafka_options: extra librdkafka properties, their syntax and
 *	  their validation.
 *
 *-------------------------------------------------------------------------
 */
#ifndef DWH_KAFKA_OPTIONS_H
#define DWH_KAFKA_OPTIONS_H

#include <librdkafka/rdkafka.h>

#include "utils/guc.h"

typedef struct DwhKafkaOption
{
	char	   *name;
	char	   *value;
} DwhKafkaOption;

extern bool dwh_kafka_options_parse(const char *spec, DwhKafkaOption **options,
									int *n, char **error);
extern const char *dwh_kafka_option_reserved(const char *name, bool *managed);
extern void dwh_kafka_conf_set(rd_kafka_conf_t *conf, const char *name,
							   const char *value);
extern bool dwh_kafka_conf_set_options(rd_kafka_conf_t *conf,
									   const DwhKafkaOption *options, int n,
									   char *error, size_t error_size);

extern bool dwh_kafka_options_apply(rd_kafka_conf_t *conf, const char *spec,
									const char *source, char *error,
									size_t error_size);

extern bool dwh_kafka_options_apply_settings(rd_kafka_conf_t *conf,
											 char *error, size_t error_size);

extern bool dwh_kafka_options_check(char **newval, void **extra,
									GucSource source);
extern bool dwh_kafka_topic_check(char **newval, void **extra,
								  GucSource source);
extern void dwh_require_topic_name(const char *topic);
extern bool dwh_kafka_group_id_check(char **newval, void **extra,
									 GucSource source);

#endif							/* DWH_KAFKA_OPTIONS_H */
