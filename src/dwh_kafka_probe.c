/*-------------------------------------------------------------------------
 *
 * dwh_kafka_probe.c
 *	  Ask the brokers (a partition's offset, the topic's partition count)
 *	  without holding up SIGTERM.
 *
 * A Kafka worker showing a broker error asks a leader for its next offset
 * every few seconds, to learn that the brokers answer again
 * (src/dwh_kafka_worker.c).  With the brokers down the request lasts its
 * whole deadline, two seconds, inside librdkafka, where no signal reaches
 * the worker: a SIGTERM waited for it, although a worker stops within half
 * a second.  So the request runs in a thread of its own, which calls
 * nothing of PostgreSQL's and takes no signal, while the worker waits for
 * it and serves its interrupts.  A SIGTERM meanwhile ends the process at
 * once; the thread, and the client it uses, are left to the exit
 * (dwh_kafka_probe_in_flight() tells the consumer's exit callback not to
 * destroy that client).  The watermarks a worker asks for at a gap
 * (dwh_kafka_consumer_query_watermarks()) are asked the same way.
 *
 * The topic's partition count and the group's assignment
 * (dwh_kafka_partitions.c), asked every 10 s whether or not anything is
 * wrong, are not waited for: the worker goes on applying its batches and
 * takes the answer once it is there.  Waiting held up every message
 * fetched meanwhile, for as long as the slowest broker took to answer (up
 * to twice the timeout).  The client the thread uses is then not destroyed
 * until it is done (dwh_kafka_probe_topic_cancel()).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <pthread.h>

#include "miscadmin.h"
#include "port/atomics.h"
#include "storage/latch.h"
#include "utils/wait_event.h"

#include "dwh_kafka_probe.h"
#include "dwh_worker.h"

/* What the thread asks. */
typedef enum ProbeKind
{
	PROBE_OFFSET,				/* one partition's offset (ListOffsets) */
	PROBE_TOPIC					/* the topic's partitions (Metadata) and the
								 * group's assignment (DescribeGroups) */
} ProbeKind;

/* Shared with the asking thread: malloc'd, as it may outlive the wait. */
typedef struct ProbeJob
{
	ProbeKind	kind;
	rd_kafka_t *rk;
	rd_kafka_topic_partition_list_t *list;	/* PROBE_OFFSET */
	char	   *topic;			/* PROBE_TOPIC */
	char	   *group;
	DwhKafkaTopicView view;
	int			timeout_ms;
	rd_kafka_resp_err_t err;
	pg_atomic_uint32 done;
} ProbeJob;

/* Threads asking now (and, once SIGTERM came, for good). */
static int	threads_in_flight = 0;

/* The question about the topic not yet taken back, and its thread. */
static ProbeJob *topic_job = NULL;
static pthread_t topic_thread;
static bool topic_threaded = false;

/* Big-endian readers of a member's assignment; false past its end. */
static bool
read_i16(const uint8 **p, const uint8 *end, int *v)
{
	if (end - *p < 2)
		return false;
	*v = (int16) (((*p)[0] << 8) | (*p)[1]);
	*p += 2;
	return true;
}

static bool
read_i32(const uint8 **p, const uint8 *end, int32 *v)
{
	if (end - *p < 4)
		return false;
	*v = (int32) (((uint32) (*p)[0] << 24) | ((uint32) (*p)[1] << 16) |
				  ((uint32) (*p)[2] << 8) | (uint32) (*p)[3]);
	*p += 4;
	return true;
}

/*
 * Mark in held the partitions of topic that one member's assignment lists
 * (Kafka's consumer protocol: a version, then topics with their partition
 * numbers, then user data, which is not read).  False if it is malformed.
 */
static bool
read_assignment(const void *data, int size, const char *topic, bool *held)
{
	const uint8 *p = data;
	const uint8 *end = p + Max(size, 0);
	size_t		topic_len = strlen(topic);
	int			version;
	int32		n_topics;

	if (size == 0)
		return true;			/* a member given nothing */
	if (!read_i16(&p, end, &version) || !read_i32(&p, end, &n_topics) ||
		n_topics < 0)
		return false;
	while (n_topics-- > 0)
	{
		int			name_len;
		int32		n_parts;
		bool		ours;

		if (!read_i16(&p, end, &name_len) || name_len < 0 || end - p < name_len)
			return false;
		ours = ((size_t) name_len == topic_len &&
				memcmp(p, topic, topic_len) == 0);
		p += name_len;
		if (!read_i32(&p, end, &n_parts) || n_parts < 0)
			return false;
		while (n_parts-- > 0)
		{
			int32		partition;

			if (!read_i32(&p, end, &partition))
				return false;
			if (ours && partition >= 0 && partition < DWH_MAX_PARTITIONS)
				held[partition] = true;
		}
	}
	return true;
}

/*
 * The topic's partition count (Metadata), then what the consumer group's
 * members hold of it, if the group is stable (DescribeGroups).
 */
static void
ask_topic(ProbeJob *job)
{
	DwhKafkaTopicView *view = &job->view;
	rd_kafka_topic_t *rkt = rd_kafka_topic_new(job->rk, job->topic, NULL);
	const struct rd_kafka_metadata *md = NULL;
	const struct rd_kafka_group_list *groups = NULL;
	const struct rd_kafka_group_info *g;
	rd_kafka_resp_err_t err;
	int			i;

	view->partition_count = -1;
	view->assignment_known = false;
	if (rkt == NULL)
	{
		job->err = rd_kafka_last_error();
		return;
	}
	job->err = rd_kafka_metadata(job->rk, 0, rkt, &md, job->timeout_ms);
	rd_kafka_topic_destroy(rkt);
	if (job->err != RD_KAFKA_RESP_ERR_NO_ERROR)
		return;
	if (md->topic_cnt != 1)
		job->err = RD_KAFKA_RESP_ERR__UNKNOWN_TOPIC;
	else if (md->topics[0].err != RD_KAFKA_RESP_ERR_NO_ERROR)
		job->err = md->topics[0].err;
	else
		view->partition_count = md->topics[0].partition_cnt;
	rd_kafka_metadata_destroy(md);
	if (job->err != RD_KAFKA_RESP_ERR_NO_ERROR)
		return;

	/*
	 * A partial answer (a broker did not answer) comes with a list too, to be
	 * freed; only a full one is read.
	 */
	err = rd_kafka_list_groups(job->rk, job->group, &groups, job->timeout_ms);
	if (groups == NULL)
		return;
	if (err == RD_KAFKA_RESP_ERR_NO_ERROR && groups->group_cnt == 1)
	{
		g = &groups->groups[0];
		if (g->err == RD_KAFKA_RESP_ERR_NO_ERROR &&
			g->state != NULL && strcmp(g->state, "Stable") == 0 &&
			g->protocol_type != NULL && strcmp(g->protocol_type, "consumer") == 0)
		{
			view->assignment_known = true;
			for (i = 0; i < g->member_cnt; i++)
				if (!read_assignment(g->members[i].member_assignment,
									 g->members[i].member_assignment_size,
									 job->topic, view->held))
					view->assignment_known = false;
		}
	}
	rd_kafka_group_list_destroy(groups);
}

static void *
probe_main(void *arg)
{
	ProbeJob   *job = (ProbeJob *) arg;

	if (job->kind == PROBE_OFFSET)
	{
		/* Unlike rd_kafka_query_watermark_offsets(), honours its timeout. */
		job->err = rd_kafka_offsets_for_times(job->rk, job->list,
											  job->timeout_ms);
	}
	else
		ask_topic(job);
	pg_atomic_write_u32(&job->done, 1);
	return NULL;
}

static ProbeJob *
new_job(ProbeKind kind, rd_kafka_t *rk, int timeout_ms)
{
	ProbeJob   *job = calloc(1, sizeof(ProbeJob));

	if (job == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("out of memory")));
	job->kind = kind;
	job->rk = rk;
	job->timeout_ms = Max(timeout_ms, 1);
	job->err = RD_KAFKA_RESP_ERR_NO_ERROR;
	pg_atomic_init_u32(&job->done, 0);
	return job;
}

/*
 * Wait for a job's thread to be done, serving interrupts meanwhile.
 *
 * Only a SIGTERM may end the wait (the process exits, leaving the client to
 * the thread): an ERROR, such as pg_cancel_backend()'s, would leave the
 * thread using a client that the worker, going on, could destroy.  A cancel
 * is served once the thread is done.
 */
static void
wait_for_job(ProbeJob *job)
{
	HOLD_CANCEL_INTERRUPTS();
	while (pg_atomic_read_u32(&job->done) == 0)
	{
		CHECK_FOR_INTERRUPTS();
		(void) WaitLatch(MyLatch, WL_TIMEOUT | WL_EXIT_ON_PM_DEATH, 5L,
						 PG_WAIT_EXTENSION);
	}
	RESUME_CANCEL_INTERRUPTS();
}

/* Run the job in a thread of its own, serving interrupts meanwhile. */
static void
run_job(ProbeJob *job)
{
	pthread_t	thread;

	if (dwh_worker_start_thread(&thread, probe_main, job) != 0)
	{
		probe_main(job);		/* no thread: ask from here */
		return;
	}
	threads_in_flight++;
	wait_for_job(job);
	pthread_join(thread, NULL);
	threads_in_flight--;
}

/*
 * dwh_kafka_probe_offset
 *		rd_kafka_offsets_for_times() for one partition: *offset is the
 *		logical offset asked for (RD_KAFKA_OFFSET_END, ...) and, on success,
 *		the answer.  Waits at most about timeout_ms, and serves interrupts
 *		meanwhile.
 */
rd_kafka_resp_err_t
dwh_kafka_probe_offset(rd_kafka_t *rk, const char *topic, int32 partition,
					   int64 *offset, int timeout_ms)
{
	ProbeJob   *job = new_job(PROBE_OFFSET, rk, timeout_ms);
	rd_kafka_topic_partition_t *tp;
	rd_kafka_resp_err_t err;

	job->list = rd_kafka_topic_partition_list_new(1);
	tp = rd_kafka_topic_partition_list_add(job->list, topic, partition);
	tp->offset = *offset;
	run_job(job);

	err = job->err;
	if (err == RD_KAFKA_RESP_ERR_NO_ERROR)
		err = tp->err;
	if (err == RD_KAFKA_RESP_ERR_NO_ERROR)
		*offset = tp->offset;
	rd_kafka_topic_partition_list_destroy(job->list);
	free(job);
	return err;
}

/*
 * Join the thread of the topic question, which is done: the join, not the
 * flag, makes what the thread wrote visible here.
 */
static void
end_topic_job(void)
{
	if (topic_threaded)
	{
		pthread_join(topic_thread, NULL);
		threads_in_flight--;
	}
	topic_threaded = false;
}

/* Free the topic question, once its thread is joined. */
static void
free_topic_job(void)
{
	free(topic_job->topic);
	free(topic_job->group);
	free(topic_job);
	topic_job = NULL;
}

/*
 * dwh_kafka_probe_topic_start
 *		Ask, from a thread, for the number of partitions of topic (a metadata
 *		request to a broker) and which of them the members of the consumer
 *		group hold, if the group is stable; dwh_kafka_probe_topic_answer()
 *		takes the answer, in about twice timeout_ms at most.  False if the
 *		last question is still unanswered.
 */
bool
dwh_kafka_probe_topic_start(rd_kafka_t *rk, const char *topic,
							const char *group, int timeout_ms)
{
	ProbeJob   *job;

	if (topic_job != NULL)
		return false;
	job = new_job(PROBE_TOPIC, rk, timeout_ms);
	job->topic = strdup(topic);
	job->group = strdup(group);
	if (job->topic == NULL || job->group == NULL)
	{
		free(job->topic);
		free(job->group);
		free(job);
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("out of memory")));
	}
	topic_job = job;
	topic_threaded = (dwh_worker_start_thread(&topic_thread, probe_main,
											  job) == 0);
	if (topic_threaded)
		threads_in_flight++;
	else
		probe_main(job);		/* no thread: ask from here */
	return true;
}

/*
 * dwh_kafka_probe_topic_answer
 *		The answer to dwh_kafka_probe_topic_start()'s question, once there:
 *		false while there is none (or no question).
 */
bool
dwh_kafka_probe_topic_answer(DwhKafkaTopicView *view, rd_kafka_resp_err_t *err)
{
	if (topic_job == NULL || pg_atomic_read_u32(&topic_job->done) == 0)
		return false;
	end_topic_job();
	*err = topic_job->err;
	memcpy(view, &topic_job->view, sizeof(DwhKafkaTopicView));
	free_topic_job();
	return true;
}

/*
 * dwh_kafka_probe_topic_cancel
 *		Forget the question about the topic, if any, once its thread no
 *		longer uses the client: called before the client is destroyed.
 *		Serves interrupts meanwhile.
 */
void
dwh_kafka_probe_topic_cancel(void)
{
	if (topic_job == NULL)
		return;
	wait_for_job(topic_job);
	end_topic_job();
	free_topic_job();
}

/*
 * dwh_kafka_probe_topic_reap
 *		Forget the question about the topic if its thread is done, without
 *		waiting: in the exit of a process, whose client may then be
 *		destroyed, as it could not while a thread used it.
 */
void
dwh_kafka_probe_topic_reap(void)
{
	if (topic_job == NULL || pg_atomic_read_u32(&topic_job->done) == 0)
		return;
	end_topic_job();
	free_topic_job();
}

/*
 * dwh_kafka_probe_in_flight
 *		Is a thread still using a client?  Only in the exit of a process that
 *		a signal interrupted while it waited for an answer, or that leaves a
 *		question about the topic unanswered: the client must then be left
 *		to the exit, not destroyed.
 */
bool
dwh_kafka_probe_in_flight(void)
{
	return threads_in_flight > 0;
}
