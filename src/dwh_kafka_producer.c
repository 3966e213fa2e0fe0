/*-------------------------------------------------------------------------
 *
 * dwh_kafka_producer.c
 *	  One idempotent librdkafka producer, served from the worker's own
 *	  thread only.
 *
 * The tags worker produces the user tag events with it (docs/tags.md, "The
 * Kafka feed").  As for the consumer (src/dwh_kafka_consumer.c), no
 * callback is set: delivery reports, errors and log lines arrive as events
 * on the producer's main queue (log.queue=true), which the worker serves
 * after rd_kafka_queue_poll() returns, on its own thread; the queue wakes
 * the worker through its latch's WaitEventSet (src/dwh_kafka_queue.c).
 *
 * The producer is idempotent (enable.idempotence, set after the DBA's
 * options so that none turns it off): librdkafka retries a message until
 * the broker acknowledges it or message.timeout.ms passes, without
 * writing it twice and without reordering a partition.  The worker counts
 * an event produced only when its delivery report says so.
 *
 * The brokers and their security are the consumer's: dwh.kafka_brokers,
 * dwh.kafka_options and dwh.kafka_options_file.  Consumer properties among
 * the options are ignored by librdkafka with a warning in the log.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <librdkafka/rdkafka.h>

#include "miscadmin.h"
#include "storage/latch.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"
#include "utils/wait_event.h"

#include "dwh_kafka_destroy.h"
#include "dwh_kafka_hide.h"
#include "dwh_kafka_options.h"
#include "dwh_kafka_producer.h"
#include "dwh_kafka_queue.h"
#include "dwh_settings.h"

struct DwhKafkaProducer
{
	rd_kafka_t *rk;
	rd_kafka_queue_t *queue;
	DwhKafkaQueue events;		/* the queue's wake-ups and log lines */
	char	   *topic;
};

/*
 * The producer configuration: the brokers, the DBA's options, then what
 * dwh needs whatever the options say.
 */
static rd_kafka_conf_t *
make_conf(char *error, size_t error_size)
{
	rd_kafka_conf_t *conf = rd_kafka_conf_new();

	dwh_kafka_conf_set(conf, "bootstrap.servers", dwh_kafka_brokers);
	dwh_kafka_conf_set(conf, "client.id", psprintf("dwh-%s-tags", dwh_database));
	if (!dwh_kafka_options_apply_settings(conf, error, error_size))
	{
		rd_kafka_conf_destroy(conf);
		return NULL;
	}
	dwh_kafka_conf_set(conf, "enable.idempotence", "true");
	dwh_kafka_conf_set(conf, "log.queue", "true");
	rd_kafka_conf_set_events(conf, RD_KAFKA_EVENT_DR | RD_KAFKA_EVENT_LOG |
							 RD_KAFKA_EVENT_ERROR);
	return conf;
}

/*
 * dwh_kafka_producer_create
 *		Create a producer for topic.  On a configuration that librdkafka
 *		refuses, returns NULL with the reason in error.
 */
DwhKafkaProducer *
dwh_kafka_producer_create(const char *topic, char *error, size_t error_size)
{
	DwhKafkaProducer *p;
	rd_kafka_conf_t *conf;
	char		errstr[512];
	MemoryContext old = MemoryContextSwitchTo(TopMemoryContext);

	conf = make_conf(error, error_size);
	if (conf == NULL)
	{
		MemoryContextSwitchTo(old);
		return NULL;
	}

	p = palloc0(sizeof(DwhKafkaProducer));
	p->topic = pstrdup(topic);
	p->rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, errstr, sizeof(errstr));
	if (p->rk == NULL)
	{
		snprintf(error, error_size, "could not create the Kafka producer: %s",
				 dwh_kafka_hide_values(conf, errstr));
		rd_kafka_conf_destroy(conf);
		pfree(p->topic);
		pfree(p);
		MemoryContextSwitchTo(old);
		return NULL;
	}

	/* Log lines go to the main queue too, with the delivery reports. */
	rd_kafka_set_log_queue(p->rk, NULL);
	p->queue = rd_kafka_queue_get_main(p->rk);

	dwh_kafka_queue_start(&p->events, p->rk, p->queue, "tags producer");

	MemoryContextSwitchTo(old);
	return p;
}

/*
 * dwh_kafka_producer_destroy
 *		Drop what is queued or in flight and close the producer at once, so
 *		that SIGTERM is honoured quickly even when the broker is gone.
 *		Nothing is lost: an event leaves the outbox only once acknowledged,
 *		and the reports of the purged messages are never served.  A
 *		destruction that does not end in time (src/dwh_kafka_destroy.c)
 *		leaves the process, unless it is exiting already.
 */
void
dwh_kafka_producer_destroy(DwhKafkaProducer *p, bool exiting)
{
	dwh_kafka_queue_mute(&p->events);
	(void) rd_kafka_purge(p->rk, RD_KAFKA_PURGE_F_QUEUE |
						  RD_KAFKA_PURGE_F_INFLIGHT |
						  RD_KAFKA_PURGE_F_NON_BLOCKING);
	rd_kafka_queue_destroy(p->queue);
	if (!dwh_kafka_destroy_within(p->rk, 0, DWH_KAFKA_DESTROY_MS))
	{
		/* librdkafka may still write to the queue's pipe: keep it open. */
		if (exiting)
			return;
		dwh_kafka_client_abandoned("producer");
	}
	dwh_kafka_queue_stop(&p->events);
	pfree(p->topic);
	pfree(p);
}

/*
 * dwh_kafka_producer_send
 *		Queue one message for the topic, with tag to name it in its delivery
 *		report.  librdkafka copies key and value.  Returns false with the
 *		reason in error when librdkafka refuses it at once (its queue is
 *		full, or the producer is in a fatal state).
 */
bool
dwh_kafka_producer_send(DwhKafkaProducer *p, const char *key, int key_len,
						const char *value, int value_len, int tag,
						char *error, size_t error_size)
{
	rd_kafka_resp_err_t err;

	err = rd_kafka_producev(p->rk,
							RD_KAFKA_V_TOPIC(p->topic),
							RD_KAFKA_V_KEY(key, key_len),
							RD_KAFKA_V_VALUE(unconstify(char *, value), value_len),
							RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
							RD_KAFKA_V_OPAQUE((void *) (intptr_t) tag),
							RD_KAFKA_V_END);
	if (err != RD_KAFKA_RESP_ERR_NO_ERROR)
	{
		snprintf(error, error_size, "%s", rd_kafka_err2str(err));
		return false;
	}
	return true;
}

/*
 * dwh_kafka_producer_serve
 *		Serve every event queued now: call delivered for each message
 *		reported, report log lines, and sum up in report what else
 *		happened.  Never blocks.
 */
void
dwh_kafka_producer_serve(DwhKafkaProducer *p, DwhKafkaDelivered delivered,
						 void *arg, DwhKafkaProducerReport *report)
{
	memset(report, 0, sizeof(DwhKafkaProducerReport));
	for (;;)
	{
		rd_kafka_event_t *ev = rd_kafka_queue_poll(p->queue, 0);
		const rd_kafka_message_t *msg;
		rd_kafka_resp_err_t err;

		if (ev == NULL)
			return;
		switch (rd_kafka_event_type(ev))
		{
			case RD_KAFKA_EVENT_DR:
				while ((msg = rd_kafka_event_message_next(ev)) != NULL)
				{
					int			tag = (int) (intptr_t) msg->_private;

					if (msg->err == RD_KAFKA_RESP_ERR_NO_ERROR)
					{
						report->delivered++;
						delivered(arg, tag, NULL);
					}
					else
					{
						report->failed++;
						snprintf(report->error_text, sizeof(report->error_text),
								 "%s", rd_kafka_err2str(msg->err));
						delivered(arg, tag, report->error_text);
					}
				}
				break;

			case RD_KAFKA_EVENT_ERROR:
				err = rd_kafka_event_error(ev);
				report->error = true;
				report->broker_down = report->broker_down ||
					dwh_kafka_error_is_broker_down(err);
				if (rd_kafka_event_error_is_fatal(ev))
				{
					char		reason[400];

					report->fatal = true;
					(void) rd_kafka_fatal_error(p->rk, reason, sizeof(reason));
					snprintf(report->error_text, sizeof(report->error_text),
							 "%s", dwh_kafka_hide_values(rd_kafka_conf(p->rk), reason));
				}
				else
					snprintf(report->error_text, sizeof(report->error_text),
							 "%s", dwh_kafka_hide_values(rd_kafka_conf(p->rk),
														 rd_kafka_event_error_string(ev)));
				break;

			case RD_KAFKA_EVENT_LOG:
				dwh_kafka_queue_relay_log(&p->events, ev);
				break;

			default:
				break;
		}
		rd_kafka_event_destroy(ev);
	}
}

/*
 * dwh_kafka_producer_wait
 *		Sleep until the queue has something, the latch is set (a signal, a
 *		commit that queued events) or the timeout passes.
 */
void
dwh_kafka_producer_wait(DwhKafkaProducer *p, long timeout_ms)
{
	dwh_kafka_queue_wait(&p->events, timeout_ms);
}

const char *
dwh_kafka_producer_topic(DwhKafkaProducer *p)
{
	return p->topic;
}
