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
 * the worker through a non-blocking pipe in the same WaitEventSet as its
 * latch.
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

#include <fcntl.h>
#include <unistd.h>

#include <librdkafka/rdkafka.h>

#include "miscadmin.h"
#include "storage/latch.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"
#include "utils/wait_event.h"

#include "dwh_kafka_options.h"
#include "dwh_kafka_producer.h"
#include "dwh_settings.h"

struct DwhKafkaProducer
{
	rd_kafka_t *rk;
	rd_kafka_queue_t *queue;
	int			pipe_read;
	int			pipe_write;
	WaitEventSet *wait_set;
	char	   *topic;
	/* For log lines that librdkafka repeats while a broker is down. */
	char		last_log[256];
	TimestampTz last_log_at;
};

static void
conf_set(rd_kafka_conf_t *conf, const char *name, const char *value)
{
	char		errstr[512];

	if (rd_kafka_conf_set(conf, name, value, errstr, sizeof(errstr)) != RD_KAFKA_CONF_OK)
		elog(ERROR, "could not set librdkafka property \"%s\": %s", name, errstr);
}

/*
 * The producer configuration: the brokers, the DBA's options, then what
 * dwh needs whatever the options say.
 */
static rd_kafka_conf_t *
make_conf(char *error, size_t error_size)
{
	rd_kafka_conf_t *conf = rd_kafka_conf_new();

	conf_set(conf, "bootstrap.servers", dwh_kafka_brokers);
	conf_set(conf, "client.id", psprintf("dwh-%s-tags", dwh_database));
	if (!dwh_kafka_options_apply_settings(conf, error, error_size))
	{
		rd_kafka_conf_destroy(conf);
		return NULL;
	}
	conf_set(conf, "enable.idempotence", "true");
	conf_set(conf, "log.queue", "true");
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
	int			fds[2];
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
		rd_kafka_conf_destroy(conf);
		snprintf(error, error_size, "could not create the Kafka producer: %s",
				 errstr);
		pfree(p->topic);
		pfree(p);
		MemoryContextSwitchTo(old);
		return NULL;
	}

	/* Log lines go to the main queue too, with the delivery reports. */
	rd_kafka_set_log_queue(p->rk, NULL);
	p->queue = rd_kafka_queue_get_main(p->rk);

	if (pipe2(fds, O_NONBLOCK | O_CLOEXEC) != 0)
		ereport(ERROR,
				(errcode_for_file_access(),
				 errmsg("could not create a pipe for the Kafka producer: %m")));
	p->pipe_read = fds[0];
	p->pipe_write = fds[1];
	rd_kafka_queue_io_event_enable(p->queue, p->pipe_write, "1", 1);

	p->wait_set = CreateWaitEventSet(TopMemoryContext, 3);
	AddWaitEventToSet(p->wait_set, WL_LATCH_SET, PGINVALID_SOCKET, MyLatch, NULL);
	AddWaitEventToSet(p->wait_set, WL_EXIT_ON_PM_DEATH, PGINVALID_SOCKET, NULL, NULL);
	AddWaitEventToSet(p->wait_set, WL_SOCKET_READABLE, p->pipe_read, NULL, NULL);

	MemoryContextSwitchTo(old);
	return p;
}

/*
 * dwh_kafka_producer_destroy
 *		Drop what is queued or in flight and close the producer at once, so
 *		that SIGTERM is honoured quickly even when the broker is gone.
 *		Nothing is lost: an event leaves the outbox only once acknowledged,
 *		and the reports of the purged messages are never served.
 */
void
dwh_kafka_producer_destroy(DwhKafkaProducer *p)
{
	rd_kafka_queue_io_event_enable(p->queue, -1, NULL, 0);
	(void) rd_kafka_purge(p->rk, RD_KAFKA_PURGE_F_QUEUE |
						  RD_KAFKA_PURGE_F_INFLIGHT |
						  RD_KAFKA_PURGE_F_NON_BLOCKING);
	rd_kafka_queue_destroy(p->queue);
	rd_kafka_destroy(p->rk);
	FreeWaitEventSet(p->wait_set);
	close(p->pipe_read);
	close(p->pipe_write);
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
 * Report a librdkafka log line, at LOG for warnings and worse, at DEBUG1
 * otherwise.  The same line repeated within a minute is reported once:
 * while a broker is down librdkafka repeats itself.
 */
static void
report_log_line(DwhKafkaProducer *p, int level, const char *fac,
				const char *text)
{
	TimestampTz now = GetCurrentTimestamp();
	char		line[256];

	snprintf(line, sizeof(line), "%s: %s", fac, text);
	if (strcmp(line, p->last_log) == 0 &&
		!TimestampDifferenceExceeds(p->last_log_at, now, 60 * 1000))
		return;
	strlcpy(p->last_log, line, sizeof(p->last_log));
	p->last_log_at = now;
	ereport(level <= 4 ? LOG : DEBUG1,
			(errmsg("Kafka producer of the tags worker: %s", line)));
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
		const char *fac;
		const char *text;
		int			level;

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
					err == RD_KAFKA_RESP_ERR__ALL_BROKERS_DOWN ||
					err == RD_KAFKA_RESP_ERR__TRANSPORT ||
					err == RD_KAFKA_RESP_ERR__RESOLVE;
				if (rd_kafka_event_error_is_fatal(ev))
				{
					char		reason[400];

					report->fatal = true;
					(void) rd_kafka_fatal_error(p->rk, reason, sizeof(reason));
					snprintf(report->error_text, sizeof(report->error_text),
							 "%s", reason);
				}
				else
					snprintf(report->error_text, sizeof(report->error_text),
							 "%s", rd_kafka_event_error_string(ev));
				break;

			case RD_KAFKA_EVENT_LOG:
				if (rd_kafka_event_log(ev, &fac, &text, &level) == 0)
					report_log_line(p, level, fac, text);
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
	WaitEvent	ev;
	char		buf[64];

	(void) WaitEventSetWait(p->wait_set, Max(timeout_ms, 1), &ev, 1,
							PG_WAIT_EXTENSION);
	ResetLatch(MyLatch);
	/* The pipe only says "not empty any more": drain it, then serve. */
	while (read(p->pipe_read, buf, sizeof(buf)) > 0)
		;
}

const char *
dwh_kafka_producer_topic(DwhKafkaProducer *p)
{
	return p->topic;
}
