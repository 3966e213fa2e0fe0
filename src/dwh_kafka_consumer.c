/*-------------------------------------------------------------------------
 *
 * dwh_kafka_consumer.c
 *	  One librdkafka consumer, served from the worker's own thread only.
 *
 * librdkafka runs threads of its own; none of them may ever call into
 * PostgreSQL.  So no callback is set at all: rebalances, errors and log
 * lines arrive as events on the consumer queue (log.queue=true, the main
 * queue forwarded to it), together with the messages, and the worker
 * serves them after rd_kafka_queue_poll() returns, on its own thread.  The
 * queue wakes the worker through its latch's WaitEventSet
 * (src/dwh_kafka_queue.c), so SIGTERM and SIGHUP are seen at once.
 *
 * Partitions are assigned at the offsets stored in the database: the
 * worker looks them up between DWH_KAFKA_ASSIGN and
 * dwh_kafka_consumer_assign().  Offsets committed to Kafka are for
 * monitoring tools only.
 *
 * A stored offset the broker no longer holds (retention deleted messages
 * not applied yet, or the topic was recreated) is never skipped silently:
 * auto.offset.reset is "error", so librdkafka stops fetching the partition
 * and reports DWH_KAFKA_OUT_OF_RANGE, and the worker records the gap and
 * decides where to go on (dwh.kafka_on_gap).  A partition stopped in this
 * state cannot be moved by a seek (librdkafka refuses to seek a partition
 * that is not fetching): it is assigned again, and a partition that must
 * stay stopped is paused.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <librdkafka/rdkafka.h>

#include "access/xlog.h"
#include "lib/stringinfo.h"
#include "miscadmin.h"
#include "storage/latch.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"
#include "utils/wait_event.h"

#include "dwh_kafka_consumer.h"
#include "dwh_kafka_destroy.h"
#include "dwh_kafka_hide.h"
#include "dwh_kafka_options.h"
#include "dwh_kafka_probe.h"
#include "dwh_kafka_queue.h"
#include "dwh_settings.h"
#include "dwh_status.h"

struct DwhKafkaConsumer
{
	rd_kafka_t *rk;
	rd_kafka_queue_t *queue;
	DwhKafkaQueue events;		/* the queue's wake-ups and log lines */
	char		client[32];		/* "consumer N", for the log */
	char	   *topic;
	int			worker_index;
	/* The group's rebalance protocol, as of the last rebalance event. */
	bool		cooperative;
	/* The rebalance being served, between poll and assign or revoke. */
	rd_kafka_topic_partition_list_t *pending;
	bool		pending_lost;	/* a revocation of partitions already lost */
	/* Partitions owned now, sorted. */
	int			n_assigned;
	int32	   *assigned;
	/* Those of them paused because they are stopped at a gap, sorted. */
	int			n_stopped;
	int32	   *stopped;
	int			next_refreshed; /* of them, whose watermarks are asked next */

	/*
	 * By partition, since it was last started: the offset after the last
	 * message delivered, and the end of the log last reached (-1: none).
	 * Between the two lie offsets that hold nothing to deliver: the commit
	 * and abort markers of transactions, and aborted messages.
	 */
	int64		delivered_next[DWH_MAX_PARTITIONS];
	int64		log_end[DWH_MAX_PARTITIONS];
};

/* Forget what the partitions delivered: they start again. */
static void
forget_positions(DwhKafkaConsumer *c)
{
	int			i;

	for (i = 0; i < DWH_MAX_PARTITIONS; i++)
	{
		c->delivered_next[i] = -1;
		c->log_end[i] = -1;
	}
}

/*
 * The same for the partitions a rebalance adds or takes away: all of them
 * when it is eager (every partition starts again), only those listed when
 * it is cooperative (the others go on where they were).
 */
static void
forget_rebalanced(DwhKafkaConsumer *c, const int32 *parts, int n)
{
	int			i;

	if (!c->cooperative)
	{
		forget_positions(c);
		return;
	}
	for (i = 0; i < n; i++)
		if (parts[i] >= 0 && parts[i] < DWH_MAX_PARTITIONS)
		{
			c->delivered_next[parts[i]] = -1;
			c->log_end[parts[i]] = -1;
		}
}

/*
 * A text of librdkafka about c, the values of the DBA's properties hidden
 * (dwh_kafka_hide.c): valid until the next such text.
 */
static const char *
client_text(DwhKafkaConsumer *c, const char *text)
{
	return dwh_kafka_hide_values(rd_kafka_conf(c->rk), text);
}

/*
 * The consumer configuration: what dwh needs, then the DBA's options
 * (dwh.kafka_options, then the file of dwh.kafka_options_file), which may
 * override the defaults below but not the reserved properties.
 */
static rd_kafka_conf_t *
make_conf(int worker_index, char *error, size_t error_size)
{
	rd_kafka_conf_t *conf = rd_kafka_conf_new();
	int64		prefetch_bytes = (int64) dwh_kafka_prefetch_memory * 1024;

	dwh_kafka_conf_set(conf, "bootstrap.servers", dwh_kafka_brokers);
	dwh_kafka_conf_set(conf, "group.id", dwh_kafka_group_id);
	dwh_kafka_conf_set(conf, "enable.auto.commit", "false");
	dwh_kafka_conf_set(conf, "enable.auto.offset.store", "false");
	/* The end of a partition's log: how far its markers reach. */
	dwh_kafka_conf_set(conf, "enable.partition.eof", "true");
	/* Never a message of a transaction aborted or still open. */
	dwh_kafka_conf_set(conf, "isolation.level", "read_committed");
	dwh_kafka_conf_set(conf, "log.queue", "true");

	/*
	 * Partitions are always assigned at an explicit offset (stored, or the
	 * beginning or end for dwh.kafka_start_offset), so this only says what
	 * happens to an offset the broker no longer holds: report it, never reset
	 * silently.
	 */
	dwh_kafka_conf_set(conf, "auto.offset.reset", "error");

	/* Prefetch bound: the local queue, plus one fetch response in flight. */
	dwh_kafka_conf_set(conf, "queued.max.messages.kbytes",
					   psprintf("%d", dwh_kafka_prefetch_memory));
	dwh_kafka_conf_set(conf, "fetch.max.bytes",
					   psprintf("%lld", (long long) Max(prefetch_bytes / 2, 1048576)));
	dwh_kafka_conf_set(conf, "client.id",
					   psprintf("dwh-%s-%d", dwh_database, worker_index));

	/*
	 * Static membership: a restarted worker takes its partitions back at
	 * once.  The topic is part of the identity: a member that comes back
	 * subscribed to another topic would be handed its old assignment.
	 */
	dwh_kafka_conf_set(conf, "session.timeout.ms", "10000");

	/*
	 * Partitions added to the topic are assigned at the rebalance the group
	 * leader starts once its metadata shows them: within 10 s, not
	 * librdkafka's default of 5 minutes, during which their messages were
	 * consumed by no one and no lag showed them.
	 */
	dwh_kafka_conf_set(conf, "topic.metadata.refresh.interval.ms", "10000");
	dwh_kafka_conf_set(conf, "group.instance.id",
					   psprintf("dwh-" UINT64_FORMAT "-%s-%s-%d", GetSystemIdentifier(),
								dwh_database, dwh_kafka_topic, worker_index));

	if (!dwh_kafka_options_apply_settings(conf, error, error_size))
	{
		rd_kafka_conf_destroy(conf);
		return NULL;
	}

	rd_kafka_conf_set_events(conf, RD_KAFKA_EVENT_FETCH | RD_KAFKA_EVENT_LOG |
							 RD_KAFKA_EVENT_ERROR | RD_KAFKA_EVENT_REBALANCE);
	return conf;
}

/*
 * dwh_kafka_consumer_create
 *		Create a consumer subscribed to dwh.kafka_topic.  On a configuration
 *		that librdkafka refuses, returns NULL with the reason in error.
 */
DwhKafkaConsumer *
dwh_kafka_consumer_create(int worker_index, char *error, size_t error_size)
{
	DwhKafkaConsumer *c;
	rd_kafka_conf_t *conf;
	rd_kafka_topic_partition_list_t *topics;
	rd_kafka_resp_err_t err;
	char		errstr[512];
	MemoryContext old = MemoryContextSwitchTo(TopMemoryContext);

	conf = make_conf(worker_index, error, error_size);
	if (conf == NULL)
	{
		MemoryContextSwitchTo(old);
		return NULL;
	}

	c = palloc0(sizeof(DwhKafkaConsumer));
	forget_positions(c);
	c->topic = pstrdup(dwh_kafka_topic);
	c->worker_index = worker_index;
	c->rk = rd_kafka_new(RD_KAFKA_CONSUMER, conf, errstr, sizeof(errstr));
	if (c->rk == NULL)
	{
		snprintf(error, error_size, "could not create the Kafka consumer: %s",
				 dwh_kafka_hide_values(conf, errstr));
		rd_kafka_conf_destroy(conf);
		pfree(c);
		MemoryContextSwitchTo(old);
		return NULL;
	}

	rd_kafka_set_log_queue(c->rk, NULL);
	rd_kafka_poll_set_consumer(c->rk);
	c->queue = rd_kafka_queue_get_consumer(c->rk);

	snprintf(c->client, sizeof(c->client), "consumer %d", worker_index);
	dwh_kafka_queue_start(&c->events, c->rk, c->queue, c->client);

	topics = rd_kafka_topic_partition_list_new(1);
	rd_kafka_topic_partition_list_add(topics, c->topic, RD_KAFKA_PARTITION_UA);
	err = rd_kafka_subscribe(c->rk, topics);
	rd_kafka_topic_partition_list_destroy(topics);
	if (err != RD_KAFKA_RESP_ERR_NO_ERROR)
	{
		snprintf(error, error_size, "could not subscribe to topic \"%s\": %s",
				 c->topic, rd_kafka_err2str(err));
		MemoryContextSwitchTo(old);
		dwh_kafka_consumer_destroy(c, false, false);
		return NULL;
	}

	MemoryContextSwitchTo(old);
	return c;
}

/*
 * Does the group rebalance incrementally (cooperative-sticky)?  librdkafka
 * knows only once the group is joined: before, it answers "NONE".  So this
 * is asked at every rebalance event, never at subscribe time: a consumer
 * that took a cooperative group for an eager one would call assign(),
 * which librdkafka refuses in a cooperative group, and never fetch.
 */
static bool
rebalance_is_cooperative(rd_kafka_t *rk)
{
	const char *protocol = rd_kafka_rebalance_protocol(rk);

	return protocol != NULL && strcmp(protocol, "COOPERATIVE") == 0;
}

/*
 * dwh_kafka_consumer_destroy
 *		Close the consumer within about half a second, so that SIGTERM is
 *		honoured quickly even when the broker is gone, and at once when the
 *		caller knows every broker is down (brokers_down): the group could
 *		not be told anyway.  Nothing is lost by cutting the close short:
 *		offsets live in the database.
 *
 * When the process is exiting and the close did not finish in time (no
 * broker answers), or a probe's thread still uses the client (a SIGTERM
 * came while it waited, or while the question about the topic was not
 * answered), the library is left to the exit: rd_kafka_destroy()
 * would wait for the group's session to time out (seconds), and the
 * library's threads call nothing of the server's.  Otherwise it is
 * destroyed within DWH_KAFKA_DESTROY_MS (src/dwh_kafka_destroy.c): past
 * that, an exiting worker goes on exiting, and any other leaves its
 * process.
 */
void
dwh_kafka_consumer_destroy(DwhKafkaConsumer *c, bool exiting,
						   bool brokers_down)
{
	TimestampTz deadline;
	rd_kafka_error_t *error;

	/*
	 * A question about the topic may still use the client.  Exiting, it is
	 * not waited for (interrupts are held: a hung broker would hold up the
	 * exit for seconds), and the client is left to the exit if it is not
	 * done.
	 */
	if (exiting)
		dwh_kafka_probe_topic_reap();
	else
		dwh_kafka_probe_topic_cancel();
	deadline = TimestampTzPlusMilliseconds(GetCurrentTimestamp(),
										   brokers_down ? 0 : 500);
	dwh_kafka_queue_mute(&c->events);
	if (c->pending)
	{
		rd_kafka_topic_partition_list_destroy(c->pending);
		c->pending = NULL;
	}

	error = rd_kafka_consumer_close_queue(c->rk, c->queue);
	if (error != NULL)
		rd_kafka_error_destroy(error);
	else
	{
		while (!rd_kafka_consumer_closed(c->rk) &&
			   GetCurrentTimestamp() < deadline)
		{
			rd_kafka_event_t *ev = rd_kafka_queue_poll(c->queue, 50);

			if (ev == NULL)
				continue;
			/* A rebalance during close: give everything up. */
			if (rd_kafka_event_type(ev) == RD_KAFKA_EVENT_REBALANCE)
			{
				if (c->cooperative)
				{
					rd_kafka_error_t *e;

					e = rd_kafka_incremental_unassign(c->rk,
													  rd_kafka_event_topic_partition_list(ev));
					if (e)
						rd_kafka_error_destroy(e);
				}
				else
					rd_kafka_assign(c->rk, NULL);
			}
			rd_kafka_event_destroy(ev);
		}
	}

	if (exiting &&
		(!rd_kafka_consumer_closed(c->rk) || dwh_kafka_probe_in_flight()))
		return;
	rd_kafka_queue_destroy(c->queue);
	if (!dwh_kafka_destroy_within(c->rk, RD_KAFKA_DESTROY_F_NO_CONSUMER_CLOSE,
								  DWH_KAFKA_DESTROY_MS))
	{
		/* librdkafka may still write to the queue's pipe: keep it open. */
		if (exiting)
			return;
		dwh_kafka_client_abandoned(c->client);
	}
	dwh_kafka_queue_stop(&c->events);
	if (c->assigned)
		pfree(c->assigned);
	if (c->stopped)
		pfree(c->stopped);
	pfree(c->topic);
	pfree(c);
}

static int
compare_int32(const void *a, const void *b)
{
	int32		x = *(const int32 *) a;
	int32		y = *(const int32 *) b;

	return (x > y) - (x < y);
}

/* The partitions of our topic in a list, sorted, palloc'd. */
static int32 *
list_partitions(DwhKafkaConsumer *c, rd_kafka_topic_partition_list_t *list,
				int *n)
{
	int32	   *parts = palloc(sizeof(int32) * Max(list->cnt, 1));
	int			i;

	*n = 0;
	for (i = 0; i < list->cnt; i++)
		if (strcmp(list->elems[i].topic, c->topic) == 0)
			parts[(*n)++] = list->elems[i].partition;
	qsort(parts, *n, sizeof(int32), compare_int32);
	return parts;
}

/*
 * Fill event from a partition's "offset out of range" error (librdkafka
 * raises it with auto.offset.reset=error, and stops fetching the
 * partition).  The watermarks are those of the fetch response that failed,
 * when the broker sent them.  Returns false if the error names no
 * partition; event->kind stays DWH_KAFKA_NOTHING for another topic's.
 */
static bool
out_of_range(DwhKafkaConsumer *c, rd_kafka_event_t *ev, DwhKafkaEvent *event)
{
	rd_kafka_topic_partition_t *tp = rd_kafka_event_topic_partition(ev);
	int64_t		low = -1;
	int64_t		high = -1;

	if (tp == NULL)
		return false;
	if (strcmp(tp->topic, c->topic) == 0)
	{
		event->kind = DWH_KAFKA_OUT_OF_RANGE;
		event->partition = tp->partition;
		event->offset = tp->offset;
		if (rd_kafka_get_watermark_offsets(c->rk, c->topic, tp->partition,
										   &low, &high) != RD_KAFKA_RESP_ERR_NO_ERROR)
			low = high = -1;
		event->low = low;
		event->high = high;
		snprintf(event->error, sizeof(event->error), "%s",
				 client_text(c, rd_kafka_event_error_string(ev)));
	}
	rd_kafka_topic_partition_destroy(tp);
	return true;
}

/*
 * A partition's fetch reached the end of its log (enable.partition.eof),
 * after every message before it was delivered.
 */
static void
note_log_end(DwhKafkaConsumer *c, rd_kafka_event_t *ev)
{
	rd_kafka_topic_partition_t *tp = rd_kafka_event_topic_partition(ev);

	if (tp == NULL)
		return;
	if (strcmp(tp->topic, c->topic) == 0 &&
		tp->partition >= 0 && tp->partition < DWH_MAX_PARTITIONS)
		c->log_end[tp->partition] = tp->offset;
	rd_kafka_topic_partition_destroy(tp);
}

/*
 * dwh_kafka_consumer_poll
 *		Take the next event from the queue, without waiting.  Log lines are
 *		served here and not returned.  A message's value is copied into the
 *		current memory context; the library's copy is freed at once.
 */
void
dwh_kafka_consumer_poll(DwhKafkaConsumer *c, DwhKafkaEvent *event)
{
	memset(event, 0, sizeof(DwhKafkaEvent));

	for (;;)
	{
		rd_kafka_event_t *ev = rd_kafka_queue_poll(c->queue, 0);
		const rd_kafka_message_t *msg;

		if (ev == NULL)
		{
			event->kind = DWH_KAFKA_NOTHING;
			return;
		}

		switch (rd_kafka_event_type(ev))
		{
			case RD_KAFKA_EVENT_FETCH:
				msg = rd_kafka_event_message_next(ev);
				if (msg == NULL)
					break;
				if (msg->err != RD_KAFKA_RESP_ERR_NO_ERROR)
				{
					event->kind = DWH_KAFKA_ERROR;
					snprintf(event->error, sizeof(event->error), "%s",
							 client_text(c, rd_kafka_message_errstr(msg)));
					rd_kafka_event_destroy(ev);
					return;
				}
				/* A stale assignment may still hold another topic. */
				if (strcmp(rd_kafka_topic_name(msg->rkt), c->topic) != 0)
					break;
				event->kind = DWH_KAFKA_MESSAGE;
				event->partition = msg->partition;
				event->offset = msg->offset;
				if (msg->partition >= 0 && msg->partition < DWH_MAX_PARTITIONS)
				{
					c->delivered_next[msg->partition] = msg->offset + 1;
					c->log_end[msg->partition] = -1;
				}
				event->len = msg->payload ? (int) msg->len : 0;
				event->data = palloc(event->len + 1);
				if (event->len > 0)
					memcpy(event->data, msg->payload, event->len);
				event->data[event->len] = '\0';
				rd_kafka_event_destroy(ev);
				return;

			case RD_KAFKA_EVENT_REBALANCE:
				c->cooperative = rebalance_is_cooperative(c->rk);
				c->pending_lost = rd_kafka_assignment_lost(c->rk) == 1;
				if (c->pending)
					rd_kafka_topic_partition_list_destroy(c->pending);
				c->pending = rd_kafka_topic_partition_list_copy(
																rd_kafka_event_topic_partition_list(ev));
				event->kind = rd_kafka_event_error(ev) == RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS ?
					DWH_KAFKA_ASSIGN : DWH_KAFKA_REVOKE;
				event->partitions = list_partitions(c, c->pending,
													&event->n_partitions);
				rd_kafka_event_destroy(ev);
				return;

			case RD_KAFKA_EVENT_ERROR:
				if (rd_kafka_event_error(ev) == RD_KAFKA_RESP_ERR__PARTITION_EOF)
				{
					note_log_end(c, ev);
					break;
				}
				if (rd_kafka_event_error(ev) == RD_KAFKA_RESP_ERR__AUTO_OFFSET_RESET &&
					out_of_range(c, ev, event))
				{
					rd_kafka_event_destroy(ev);
					if (event->kind == DWH_KAFKA_NOTHING)
						break;	/* another topic's: not ours to serve */
					return;
				}
				event->kind = rd_kafka_event_error_is_fatal(ev) ?
					DWH_KAFKA_FATAL : DWH_KAFKA_ERROR;
				event->broker_down =
					dwh_kafka_error_is_broker_down(rd_kafka_event_error(ev));
				snprintf(event->error, sizeof(event->error), "%s",
						 client_text(c, rd_kafka_event_error_string(ev)));
				rd_kafka_event_destroy(ev);
				return;

			case RD_KAFKA_EVENT_LOG:
				dwh_kafka_queue_relay_log(&c->events, ev);
				break;

			default:
				break;
		}
		rd_kafka_event_destroy(ev);
	}
}

/*
 * dwh_kafka_consumer_wait
 *		Sleep until the queue has something, the latch is set (signal,
 *		offsets changed by dwh.kafka_seek) or the timeout passes.  A
 *		timeout of zero or less sleeps 1 ms, never forever.
 */
void
dwh_kafka_consumer_wait(DwhKafkaConsumer *c, long timeout_ms)
{
	dwh_kafka_queue_wait(&c->events, timeout_ms);
}

/* "0,2,5", or "none": partition numbers for a log line. */
static char *
format_partitions(const int32 *parts, int n)
{
	StringInfoData buf;
	int			i;

	if (n == 0)
		return pstrdup("none");
	initStringInfo(&buf);
	for (i = 0; i < n; i++)
		appendStringInfo(&buf, "%s%d", i > 0 ? "," : "", parts[i]);
	return buf.data;
}

/*
 * Log a served rebalance: which protocol, what changed and what is owned
 * now.  Rebalances are rare and explain pauses in consumption, so they are
 * logged; an incremental one that changed nothing for this consumer only
 * at DEBUG1.
 */
static void
report_rebalance(DwhKafkaConsumer *c, const char *what, const int32 *parts,
				 int n)
{
	ereport(n > 0 || !c->cooperative ? LOG : DEBUG1,
			(errmsg("Kafka consumer %d (%s rebalance): partitions %s %s, owns %s",
					c->worker_index, c->cooperative ? "cooperative" : "eager",
					format_partitions(parts, n), what,
					format_partitions(c->assigned, c->n_assigned))));
}

static void
set_assigned(DwhKafkaConsumer *c, int32 *parts, int n)
{
	MemoryContext old = MemoryContextSwitchTo(TopMemoryContext);

	if (c->assigned)
		pfree(c->assigned);
	c->assigned = palloc(sizeof(int32) * Max(n, 1));
	memcpy(c->assigned, parts, sizeof(int32) * n);
	c->n_assigned = n;
	MemoryContextSwitchTo(old);
}

/*
 * A list of our topic's partitions, each at offsets[i] (negative: no stored
 * offset, start as dwh.kafka_start_offset says).
 */
static rd_kafka_topic_partition_list_t *
make_list(DwhKafkaConsumer *c, const int32 *parts, const int64 *offsets, int n)
{
	rd_kafka_topic_partition_list_t *list;
	int			i;

	list = rd_kafka_topic_partition_list_new(Max(n, 1));
	for (i = 0; i < n; i++)
	{
		rd_kafka_topic_partition_t *tp;

		tp = rd_kafka_topic_partition_list_add(list, c->topic, parts[i]);
		if (offsets[i] >= 0)
			tp->offset = offsets[i];
		else
			tp->offset = dwh_kafka_start_offset == DWH_KAFKA_START_LATEST ?
				RD_KAFKA_OFFSET_END : RD_KAFKA_OFFSET_BEGINNING;
	}
	return list;
}

static bool
contains(const int32 *parts, int n, int32 p)
{
	return bsearch(&p, parts, n, sizeof(int32), compare_int32) != NULL;
}

/*
 * Resume the partitions among parts that are not stopped at a gap (a pause
 * outlives an assignment in librdkafka).  Must come before the assignment
 * that starts them: librdkafka (before 2.4) gives every resume a version
 * barrier, and an operation older than the newest barrier is dropped when
 * it is served.  A resume whose barrier came after the one of the
 * assignment's fetch start, made in librdkafka's own thread, but that was
 * queued first, made that start outdated: the partition was never fetched
 * (seen once in test/t/017_kafka_gaps.pl, a seek after a restart).
 * Resumed before the assignment, every operation of the assignment comes
 * after the resume.
 */
static void
resume_running(DwhKafkaConsumer *c, const int32 *parts, const bool *stopped, int n)
{
	rd_kafka_topic_partition_list_t *resume = rd_kafka_topic_partition_list_new(Max(n, 1));
	int			i;

	for (i = 0; i < n; i++)
		if (!stopped[i])
			rd_kafka_topic_partition_list_add(resume, c->topic, parts[i]);
	/* A partition librdkafka does not know yet was never paused. */
	if (resume->cnt > 0)
		(void) rd_kafka_resume_partitions(c->rk, resume);
	rd_kafka_topic_partition_list_destroy(resume);
}

/*
 * Pause the partitions among parts that are stopped at a gap, and remember
 * which are stopped.  Must follow the assignment that started them (the
 * pause then takes effect before their first fetch), as resume_running()
 * must precede it.
 */
static void
set_stopped(DwhKafkaConsumer *c, const int32 *parts, const bool *stopped, int n)
{
	rd_kafka_topic_partition_list_t *pause = rd_kafka_topic_partition_list_new(Max(n, 1));
	MemoryContext old;
	int32	   *now;
	int			n_now = 0;
	int			i;

	for (i = 0; i < n; i++)
		if (stopped[i])
			rd_kafka_topic_partition_list_add(pause, c->topic, parts[i]);
	if (pause->cnt > 0)
		(void) rd_kafka_pause_partitions(c->rk, pause);
	rd_kafka_topic_partition_list_destroy(pause);

	/* (the stopped ones not in parts) + (those of parts stopped now) */
	old = MemoryContextSwitchTo(TopMemoryContext);
	now = palloc(sizeof(int32) * (c->n_stopped + n + 1));
	MemoryContextSwitchTo(old);
	for (i = 0; i < c->n_stopped; i++)
		if (!contains(parts, n, c->stopped[i]))
			now[n_now++] = c->stopped[i];
	for (i = 0; i < n; i++)
		if (stopped[i])
			now[n_now++] = parts[i];
	qsort(now, n_now, sizeof(int32), compare_int32);
	if (c->stopped)
		pfree(c->stopped);
	c->stopped = now;
	c->n_stopped = n_now;
}

/* Forget that these partitions are stopped: they are no longer ours. */
static void
forget_stopped(DwhKafkaConsumer *c, const int32 *parts, int n)
{
	int			kept = 0;
	int			i;

	for (i = 0; i < c->n_stopped; i++)
		if (!contains(parts, n, c->stopped[i]))
			c->stopped[kept++] = c->stopped[i];
	c->n_stopped = kept;
}

/*
 * dwh_kafka_consumer_assign
 *		Take the partitions of the pending DWH_KAFKA_ASSIGN, starting each at
 *		offsets[i] (same order as the event's sorted partitions; negative:
 *		no stored offset, start as dwh.kafka_start_offset says); those with
 *		stopped[i] are paused.
 */
void
dwh_kafka_consumer_assign(DwhKafkaConsumer *c, const int64 *offsets,
						  const bool *stopped)
{
	rd_kafka_topic_partition_list_t *list;
	int32	   *parts;
	int			n;
	int			i;
	rd_kafka_resp_err_t err = RD_KAFKA_RESP_ERR_NO_ERROR;

	Assert(c->pending != NULL);
	parts = list_partitions(c, c->pending, &n);
	forget_rebalanced(c, parts, n);

	/*
	 * Only partitions of our topic, each at its stored offset: after a topic
	 * change the group may still hand out the old topic's.
	 */
	list = make_list(c, parts, offsets, n);
	resume_running(c, parts, stopped, n);

	if (c->cooperative)
	{
		rd_kafka_error_t *e = rd_kafka_incremental_assign(c->rk, list);
		int32	   *all;
		int			total = 0;

		if (e)
		{
			ereport(WARNING,
					(errmsg("Kafka consumer %d could not add partitions",
							c->worker_index),
					 errdetail_internal("%s", client_text(c, rd_kafka_error_string(e)))));
			rd_kafka_error_destroy(e);
		}
		all = palloc(sizeof(int32) * (c->n_assigned + n + 1));
		for (i = 0; i < c->n_assigned; i++)
			all[total++] = c->assigned[i];
		for (i = 0; i < n; i++)
			all[total++] = parts[i];
		qsort(all, total, sizeof(int32), compare_int32);
		set_assigned(c, all, total);
	}
	else
	{
		err = rd_kafka_assign(c->rk, list);
		if (err != RD_KAFKA_RESP_ERR_NO_ERROR)
			ereport(WARNING,
					(errmsg("Kafka consumer %d could not assign partitions",
							c->worker_index),
					 errdetail_internal("%s", rd_kafka_err2str(err))));
		set_assigned(c, parts, n);
		c->n_stopped = 0;
	}
	set_stopped(c, parts, stopped, n);
	report_rebalance(c, "assigned", parts, n);

	rd_kafka_topic_partition_list_destroy(list);
	rd_kafka_topic_partition_list_destroy(c->pending);
	c->pending = NULL;
}

/*
 * dwh_kafka_consumer_reassign
 *		Start every owned partition again at offsets[i] (same order as
 *		dwh_kafka_consumer_assignment(); negative as for assign), pausing
 *		those with stopped[i].  The way to move a partition that hit an
 *		offset out of range, which librdkafka will not seek; what was
 *		fetched and not yet polled is fetched again.
 */
void
dwh_kafka_consumer_reassign(DwhKafkaConsumer *c, const int64 *offsets,
							const bool *stopped)
{
	rd_kafka_topic_partition_list_t *list;

	if (c->n_assigned == 0)
		return;
	forget_positions(c);
	list = make_list(c, c->assigned, offsets, c->n_assigned);
	resume_running(c, c->assigned, stopped, c->n_assigned);
	if (c->cooperative)
	{
		rd_kafka_error_t *e = rd_kafka_incremental_unassign(c->rk, list);

		if (e == NULL)
			e = rd_kafka_incremental_assign(c->rk, list);
		if (e)
		{
			ereport(WARNING,
					(errmsg("could not assign Kafka partitions %s again",
							format_partitions(c->assigned, c->n_assigned)),
					 errdetail_internal("%s", client_text(c, rd_kafka_error_string(e)))));
			rd_kafka_error_destroy(e);
		}
	}
	else
	{
		rd_kafka_resp_err_t err = rd_kafka_assign(c->rk, list);

		if (err != RD_KAFKA_RESP_ERR_NO_ERROR)
			ereport(WARNING,
					(errmsg("could not assign Kafka partitions %s again",
							format_partitions(c->assigned, c->n_assigned)),
					 errdetail_internal("%s", rd_kafka_err2str(err))));
	}
	set_stopped(c, c->assigned, stopped, c->n_assigned);
	rd_kafka_topic_partition_list_destroy(list);
	ereport(LOG,
			(errmsg("Kafka partitions %s assigned again at their stored offsets, stopped: %s",
					format_partitions(c->assigned, c->n_assigned),
					format_partitions(c->stopped, c->n_stopped))));
}

/*
 * dwh_kafka_consumer_stop
 *		Keep an owned partition that hit an offset out of range stopped
 *		(librdkafka stopped fetching it): pause it, so that no assignment
 *		starts it again, until dwh_kafka_consumer_reassign() says otherwise.
 */
void
dwh_kafka_consumer_stop(DwhKafkaConsumer *c, int32 partition)
{
	bool		stopped = true;

	set_stopped(c, &partition, &stopped, 1);
}

/*
 * dwh_kafka_consumer_is_stopped
 *		Is this owned partition paused at a gap?
 */
bool
dwh_kafka_consumer_is_stopped(DwhKafkaConsumer *c, int32 partition)
{
	return contains(c->stopped, c->n_stopped, partition);
}

/*
 * dwh_kafka_consumer_query_watermarks
 *		Ask the partition's leader for its first and next offsets.  Waits
 *		for at most timeout_ms, serving interrupts; on failure returns false
 *		with the reason.
 *
 * rd_kafka_query_watermark_offsets() would be the obvious call, but before
 * librdkafka 2.3.0 it waits for its replies without a deadline: with the
 * broker down it never returned, and the worker ignored SIGTERM until the
 * broker came back.  rd_kafka_offsets_for_times() honours its timeout
 * (ListOffsets takes RD_KAFKA_OFFSET_BEGINNING and RD_KAFKA_OFFSET_END as
 * the special timestamps "earliest" and "latest"), and is asked from a
 * thread so that a SIGTERM need not wait for it (src/dwh_kafka_probe.c).
 */
bool
dwh_kafka_consumer_query_watermarks(DwhKafkaConsumer *c, int32 partition,
									int64 *low, int64 *high, int timeout_ms,
									char *error, size_t error_size)
{
	TimestampTz deadline = TimestampTzPlusMilliseconds(GetCurrentTimestamp(),
													   timeout_ms);
	int64		lo = RD_KAFKA_OFFSET_BEGINNING;
	int64		hi = RD_KAFKA_OFFSET_END;
	rd_kafka_resp_err_t err;

	err = dwh_kafka_probe_offset(c->rk, c->topic, partition, &lo,
								 timeout_ms * 2 / 3);
	if (err == RD_KAFKA_RESP_ERR_NO_ERROR)
	{
		long		left = TimestampDifferenceMilliseconds(GetCurrentTimestamp(),
														   deadline);

		err = dwh_kafka_probe_offset(c->rk, c->topic, partition, &hi,
									 (int) left);
	}
	if (err != RD_KAFKA_RESP_ERR_NO_ERROR)
	{
		snprintf(error, error_size, "%s", rd_kafka_err2str(err));
		return false;
	}
	/* An empty partition may answer "earliest" with no offset at all. */
	if (lo < 0 && hi >= 0)
		lo = hi;
	*low = lo;
	*high = hi;
	return true;
}

/*
 * dwh_kafka_consumer_leader_answers
 *		Does the partition's leader answer (its next offset) within
 *		timeout_ms?  One request, with the deadline that
 *		dwh_kafka_consumer_query_watermarks explains, asked from a thread
 *		so that a SIGTERM need not wait for it (src/dwh_kafka_probe.c).
 */
bool
dwh_kafka_consumer_leader_answers(DwhKafkaConsumer *c, int32 partition,
								  int timeout_ms)
{
	int64		high = RD_KAFKA_OFFSET_END;

	return dwh_kafka_probe_offset(c->rk, c->topic, partition, &high,
								  timeout_ms) == RD_KAFKA_RESP_ERR_NO_ERROR;
}

/*
 * dwh_kafka_consumer_ask_topic
 *		Ask a broker, from a thread (src/dwh_kafka_probe.c), for the topic's
 *		number of partitions and which of them the consumer group's members
 *		hold; dwh_kafka_consumer_topic_view() takes the answer.  False if
 *		the last question is still unanswered.
 */
bool
dwh_kafka_consumer_ask_topic(DwhKafkaConsumer *c, int timeout_ms)
{
	return dwh_kafka_probe_topic_start(c->rk, c->topic, dwh_kafka_group_id,
									   timeout_ms);
}

/*
 * dwh_kafka_consumer_topic_view
 *		The answer to dwh_kafka_consumer_ask_topic(), once there (false
 *		before): the topic's number of partitions as a broker's metadata
 *		said (-1 if no broker answered in time or the topic does not exist),
 *		and which of them the group's members hold.
 */
bool
dwh_kafka_consumer_topic_view(DwhKafkaTopicView *view)
{
	rd_kafka_resp_err_t err;

	if (!dwh_kafka_probe_topic_answer(view, &err))
		return false;
	if (err != RD_KAFKA_RESP_ERR_NO_ERROR)
		view->partition_count = -1;
	return true;
}

/*
 * dwh_kafka_consumer_session_timeout_ms
 *		The consumer's session.timeout.ms (dwh's, or dwh.kafka_options').
 */
int
dwh_kafka_consumer_session_timeout_ms(DwhKafkaConsumer *c)
{
	char		value[32];
	size_t		size = sizeof(value);

	if (rd_kafka_conf_get(rd_kafka_conf(c->rk), "session.timeout.ms", value,
						  &size) != RD_KAFKA_CONF_OK)
		return 45000;			/* librdkafka's default */
	return atoi(value);
}

/*
 * dwh_kafka_consumer_revoke
 *		Give up the partitions of the pending DWH_KAFKA_REVOKE.
 */
void
dwh_kafka_consumer_revoke(DwhKafkaConsumer *c)
{
	int32	   *parts;
	int			n;
	int			i;
	int			j;
	int			kept = 0;

	Assert(c->pending != NULL);
	parts = list_partitions(c, c->pending, &n);
	forget_rebalanced(c, parts, n);
	if (c->cooperative)
	{
		rd_kafka_error_t *e = rd_kafka_incremental_unassign(c->rk, c->pending);

		if (e)
		{
			ereport(WARNING,
					(errmsg("Kafka consumer %d could not give up partitions",
							c->worker_index),
					 errdetail_internal("%s", client_text(c, rd_kafka_error_string(e)))));
			rd_kafka_error_destroy(e);
		}
		for (i = 0; i < c->n_assigned; i++)
		{
			bool		gone = false;

			for (j = 0; j < n; j++)
				gone = gone || (parts[j] == c->assigned[i]);
			if (!gone)
				c->assigned[kept++] = c->assigned[i];
		}
		c->n_assigned = kept;
	}
	else
	{
		rd_kafka_assign(c->rk, NULL);
		c->n_assigned = 0;
	}
	forget_stopped(c, parts, n);
	if (!c->cooperative)
		c->n_stopped = 0;
	report_rebalance(c, c->pending_lost ? "lost" : "revoked", parts, n);
	rd_kafka_topic_partition_list_destroy(c->pending);
	c->pending = NULL;
}

/*
 * dwh_kafka_consumer_seek
 *		Move a partition to offset.  Messages fetched before the seek are
 *		dropped by librdkafka, so none from the old position follows.
 */
void
dwh_kafka_consumer_seek(DwhKafkaConsumer *c, int32 partition, int64 offset)
{
	rd_kafka_topic_partition_list_t *list = rd_kafka_topic_partition_list_new(1);
	rd_kafka_error_t *e;

	rd_kafka_topic_partition_list_add(list, c->topic, partition)->offset = offset;
	if (partition >= 0 && partition < DWH_MAX_PARTITIONS)
	{
		c->delivered_next[partition] = -1;
		c->log_end[partition] = -1;
	}
	e = rd_kafka_seek_partitions(c->rk, list, 0);
	if (e)
	{
		ereport(WARNING,
				(errmsg("Kafka consumer %d could not move partition %d to offset " INT64_FORMAT,
						c->worker_index, partition, offset),
				 errdetail_internal("%s", client_text(c, rd_kafka_error_string(e)))));
		rd_kafka_error_destroy(e);
	}
	rd_kafka_topic_partition_list_destroy(list);
}

/*
 * dwh_kafka_consumer_commit
 *		Commit offsets to Kafka, asynchronously, for monitoring tools only:
 *		dwh itself resumes from dwh.kafka_offsets.
 */
void
dwh_kafka_consumer_commit(DwhKafkaConsumer *c, const int32 *partitions,
						  const int64 *next_offsets, int n)
{
	rd_kafka_topic_partition_list_t *list;
	int			i;

	if (n == 0)
		return;
	list = rd_kafka_topic_partition_list_new(n);
	for (i = 0; i < n; i++)
		rd_kafka_topic_partition_list_add(list, c->topic, partitions[i])->offset =
			next_offsets[i];
	(void) rd_kafka_commit(c->rk, list, 1);
	rd_kafka_topic_partition_list_destroy(list);
}

/*
 * dwh_kafka_consumer_assignment
 *		The partitions owned now, sorted (not to be freed).
 */
int
dwh_kafka_consumer_assignment(DwhKafkaConsumer *c, int32 **partitions)
{
	*partitions = c->assigned;
	return c->n_assigned;
}

/*
 * dwh_kafka_consumer_publish_watermarks
 *		Publish the owned partitions' watermarks as last seen in fetch
 *		responses (no request to the broker).  A partition stopped at a gap
 *		is not fetched, so its watermarks would stay those of the stop:
 *		they come from dwh_kafka_consumer_refresh_stopped() instead.
 */
void
dwh_kafka_consumer_publish_watermarks(DwhKafkaConsumer *c)
{
	int			i;

	for (i = 0; i < c->n_assigned; i++)
	{
		int64_t		low = -1;
		int64_t		high = -1;

		if (contains(c->stopped, c->n_stopped, c->assigned[i]))
			continue;
		if (rd_kafka_get_watermark_offsets(c->rk, c->topic, c->assigned[i],
										   &low, &high) == RD_KAFKA_RESP_ERR_NO_ERROR &&
			high >= 0)
			dwh_status_set_watermark(c->topic, c->assigned[i], low, high,
									 c->worker_index);
	}
}

/*
 * dwh_kafka_consumer_refresh_stopped
 *		Ask the leader of one partition stopped at a gap, the next in turn,
 *		for its watermarks, and publish them: its lag then shows what the
 *		broker holds past the gap.  Waits for at most timeout_ms; an answer
 *		that does not come leaves the last ones published.
 */
void
dwh_kafka_consumer_refresh_stopped(DwhKafkaConsumer *c, int timeout_ms)
{
	int32		partition;
	int64		low;
	int64		high;
	char		error[256];

	if (c->n_stopped == 0)
		return;
	if (c->next_refreshed >= c->n_stopped)
		c->next_refreshed = 0;
	partition = c->stopped[c->next_refreshed++];
	if (dwh_kafka_consumer_query_watermarks(c, partition, &low, &high,
											timeout_ms, error, sizeof(error)) &&
		high >= 0)
		dwh_status_set_watermark(c->topic, partition, low, high,
								 c->worker_index);
}

/*
 * dwh_kafka_consumer_high_watermark
 *		A partition's high watermark as last seen in a fetch response, or -1.
 */
int64
dwh_kafka_consumer_high_watermark(DwhKafkaConsumer *c, int32 partition)
{
	int64_t		low = -1;
	int64_t		high = -1;

	if (rd_kafka_get_watermark_offsets(c->rk, c->topic, partition,
									   &low, &high) != RD_KAFKA_RESP_ERR_NO_ERROR)
		return -1;
	return high;
}

/*
 * dwh_kafka_consumer_take_log_end
 *		The end of partition's log, if it was reached after the last message
 *		delivered (-1 otherwise), forgotten once taken; *delivered_next is
 *		the offset after the last message delivered since the partition
 *		started (-1: none).
 */
int64
dwh_kafka_consumer_take_log_end(DwhKafkaConsumer *c, int32 partition,
								int64 *delivered_next)
{
	int64		end;

	*delivered_next = -1;
	if (partition < 0 || partition >= DWH_MAX_PARTITIONS)
		return -1;
	end = c->log_end[partition];
	c->log_end[partition] = -1;
	*delivered_next = c->delivered_next[partition];
	return end;
}

const char *
dwh_kafka_consumer_topic(DwhKafkaConsumer *c)
{
	return c->topic;
}
