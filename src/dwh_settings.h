/*-------------------------------------------------------------------------
 *
 * dwh_settings.h
 *	  The dwh.* configuration parameters.
 *
 *-------------------------------------------------------------------------
 */
#ifndef DWH_SETTINGS_H
#define DWH_SETTINGS_H

extern char *dwh_database;
extern int	dwh_max_message_size;
extern int	dwh_max_order_items;
extern int	dwh_dead_letter_keep_bytes;

/* Kafka */
typedef enum DwhKafkaStartOffset
{
	DWH_KAFKA_START_EARLIEST,
	DWH_KAFKA_START_LATEST
} DwhKafkaStartOffset;

/* What a worker does when a partition's stored offset is no longer held. */
typedef enum DwhKafkaOnGap
{
	DWH_KAFKA_GAP_SKIP,
	DWH_KAFKA_GAP_STOP
} DwhKafkaOnGap;

extern char *dwh_kafka_brokers;
extern char *dwh_kafka_topic;
extern char *dwh_kafka_group_id;
extern char *dwh_kafka_options;
extern char *dwh_kafka_options_file;
extern int	dwh_kafka_consumers;
extern int	dwh_kafka_batch_size;
extern int	dwh_kafka_batch_wait;
extern int	dwh_kafka_prefetch_memory;
extern int	dwh_kafka_start_offset;
extern int	dwh_kafka_on_gap;

/* User tags: the tags worker */
extern int	dwh_tags_expire_interval;
extern char *dwh_tags_topic;

/* Redis */
extern char *dwh_redis_url;
extern char *dwh_redis_url_file;
extern int	dwh_redis_refresh_interval;
extern int	dwh_redis_batch_size;
extern char *dwh_redis_scan_pattern;
extern char *dwh_redis_key_pattern;
extern int	dwh_redis_max_value_size;
extern int	dwh_redis_timeout;

extern void dwh_settings_define(void);
extern void dwh_worker_settings(void);

#endif							/* DWH_SETTINGS_H */
