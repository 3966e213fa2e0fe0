/*-------------------------------------------------------------------------
 *
 * dwh_kafka_queue.c
 *	  A librdkafka event queue that wakes a worker through its latch's
 *	  WaitEventSet, and the relay of librdkafka's log lines.
 *
 * The consumer and the producer of the workers set no callback:
 * librdkafka's threads may never call into PostgreSQL.  Everything they
 * report arrives as events on one queue of the client, which the worker
 * polls on its own thread.  librdkafka writes a byte to a non-blocking
 * pipe when that queue stops being empty; the pipe sits in one
 * WaitEventSet with the worker's latch, so a message, a signal and the
 * postmaster's death all end the same wait.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <fcntl.h>
#include <unistd.h>

#include "miscadmin.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"
#include "utils/wait_event.h"

#include "dwh_kafka_hide.h"
#include "dwh_kafka_queue.h"

/* The same log line is relayed once a minute at most. */
#define LOG_REPEAT_MS	(60 * 1000)

/*
 * dwh_kafka_queue_start
 *		Serve queue, of the client rk (both owned by the caller), through q;
 *		client names the client in the log ("consumer 1"), and must outlive
 *		q.
 */
void
dwh_kafka_queue_start(DwhKafkaQueue *q, rd_kafka_t *rk,
					  rd_kafka_queue_t *queue, const char *client)
{
	int			fds[2];

	memset(q, 0, sizeof(DwhKafkaQueue));
	q->rk = rk;
	q->queue = queue;
	q->client = client;
	if (pipe2(fds, O_NONBLOCK | O_CLOEXEC) != 0)
		ereport(ERROR,
				(errcode_for_file_access(),
				 errmsg("could not create a pipe for the Kafka client (%s): %m", client)));
	q->pipe_read = fds[0];
	q->pipe_write = fds[1];
	rd_kafka_queue_io_event_enable(queue, q->pipe_write, "1", 1);

	q->wait_set = CreateWaitEventSet(TopMemoryContext, 3);
	AddWaitEventToSet(q->wait_set, WL_LATCH_SET, PGINVALID_SOCKET, MyLatch, NULL);
	AddWaitEventToSet(q->wait_set, WL_EXIT_ON_PM_DEATH, PGINVALID_SOCKET, NULL, NULL);
	AddWaitEventToSet(q->wait_set, WL_SOCKET_READABLE, q->pipe_read, NULL, NULL);
}

/*
 * dwh_kafka_queue_mute
 *		librdkafka stops writing to the pipe (before the queue is closed).
 */
void
dwh_kafka_queue_mute(DwhKafkaQueue *q)
{
	rd_kafka_queue_io_event_enable(q->queue, -1, NULL, 0);
}

/*
 * dwh_kafka_queue_stop
 *		Release the pipe and the wait set, once the queue is destroyed.
 */
void
dwh_kafka_queue_stop(DwhKafkaQueue *q)
{
	FreeWaitEventSet(q->wait_set);
	close(q->pipe_read);
	close(q->pipe_write);
	q->wait_set = NULL;
	q->queue = NULL;
}

/*
 * dwh_kafka_queue_wait
 *		Sleep until the queue has something, the latch is set or
 *		timeout_ms pass; a timeout of zero or less sleeps 1 ms, never
 *		forever.
 */
void
dwh_kafka_queue_wait(DwhKafkaQueue *q, long timeout_ms)
{
	WaitEvent	ev;
	char		buf[64];

	(void) WaitEventSetWait(q->wait_set, Max(timeout_ms, 1), &ev, 1,
							PG_WAIT_EXTENSION);
	ResetLatch(MyLatch);
	/* The pipe only says "not empty any more": drain it, then poll. */
	while (read(q->pipe_read, buf, sizeof(buf)) > 0)
		;
}

/*
 * dwh_kafka_queue_relay_log
 *		Relay the log line of a RD_KAFKA_EVENT_LOG event: our own message,
 *		librdkafka's text in the detail; warnings and worse at LOG, the
 *		rest at DEBUG1.  The same line again within a minute is dropped:
 *		while a broker is down librdkafka repeats itself.  The values of the
 *		DBA's properties are hidden: a line may quote one.
 */
void
dwh_kafka_queue_relay_log(DwhKafkaQueue *q, rd_kafka_event_t *ev)
{
	const char *fac;
	const char *text;
	int			level;
	char		line[256];
	TimestampTz now;

	if (rd_kafka_event_log(ev, &fac, &text, &level) != 0)
		return;
	now = GetCurrentTimestamp();
	snprintf(line, sizeof(line), "%s: %s", fac,
			 dwh_kafka_hide_values(rd_kafka_conf(q->rk), text));
	if (strcmp(line, q->last_log) == 0 &&
		!TimestampDifferenceExceeds(q->last_log_at, now, LOG_REPEAT_MS))
		return;
	strlcpy(q->last_log, line, sizeof(q->last_log));
	q->last_log_at = now;
	ereport(level <= 4 ? LOG : DEBUG1,
			(errmsg("Kafka client library log (%s)", q->client),
			 errdetail_internal("%s", line)));
}

/*
 * dwh_kafka_error_is_broker_down
 *		Does this client error say that no broker can be reached (rather
 *		than that one refused something)?
 */
bool
dwh_kafka_error_is_broker_down(rd_kafka_resp_err_t err)
{
	return err == RD_KAFKA_RESP_ERR__ALL_BROKERS_DOWN ||
		err == RD_KAFKA_RESP_ERR__TRANSPORT ||
		err == RD_KAFKA_RESP_ERR__RESOLVE;
}
