/*-------------------------------------------------------------------------
 *
 * dwh_kafka_producer.h
 *	  One idempotent librdkafka producer, served from the worker's own
 *	  thread only.
 *
 *-------------------------------------------------------------------------
 */
#ifndef DWH_KAFKA_PRODUCER_H
#define DWH_KAFKA_PRODUCER_H

typedef struct DwhKafkaProducer DwhKafkaProducer;

/* Called for each message the broker acknowledged (error NULL) or not. */
typedef void (*DwhKafkaDelivered) (void *arg, int tag, const char *error);

/* What dwh_kafka_producer_serve() saw besides deliveries. */
typedef struct DwhKafkaProducerReport
{
	int			delivered;		/* messages acknowledged */
	int			failed;			/* messages that failed */
	bool		error;			/* a client error (librdkafka retries) */
	bool		broker_down;	/* ... saying that no broker answers */
	bool		fatal;			/* the producer must be recreated */
	char		error_text[512];	/* the last error or failure */
} DwhKafkaProducerReport;

extern DwhKafkaProducer *dwh_kafka_producer_create(const char *topic,
												   char *error,
												   size_t error_size);
extern void dwh_kafka_producer_destroy(DwhKafkaProducer *producer, bool exiting);
extern bool dwh_kafka_producer_send(DwhKafkaProducer *producer,
									const char *key, int key_len,
									const char *value, int value_len,
									int tag, char *error, size_t error_size);
extern void dwh_kafka_producer_serve(DwhKafkaProducer *producer,
									 DwhKafkaDelivered delivered, void *arg,
									 DwhKafkaProducerReport *report);
extern void dwh_kafka_producer_wait(DwhKafkaProducer *producer,
									long timeout_ms);
extern const char *dwh_kafka_producer_topic(DwhKafkaProducer *producer);

#endif							/* DWH_KAFKA_PRODUCER_H */
