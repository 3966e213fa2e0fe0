/*-------------------------------------------------------------------------
 *
 * dwh_kafka_probe.c
 *	  Ask a partition's leader for an offset without holding up SIGTERM.
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

/* Shared with the asking thread: malloc'd, as it may outlive the wait. */
typedef struct ProbeJob
{
	rd_kafka_t *rk;
	rd_kafka_topic_partition_list_t *list;
	int			timeout_ms;
	rd_kafka_resp_err_t err;
	pg_atomic_uint32 done;
} ProbeJob;

/* A thread is asking now (and, once SIGTERM came, for good). */
static bool in_flight = false;

static void *
probe_main(void *arg)
{
	ProbeJob   *job = (ProbeJob *) arg;

	/* Unlike rd_kafka_query_watermark_offsets(), honours its timeout. */
	job->err = rd_kafka_offsets_for_times(job->rk, job->list, job->timeout_ms);
	pg_atomic_write_u32(&job->done, 1);
	return NULL;
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
	ProbeJob   *job;
	rd_kafka_topic_partition_t *tp;
	rd_kafka_resp_err_t err;
	pthread_t	thread;
	int			rc;

	job = malloc(sizeof(ProbeJob));
	if (job == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("out of memory")));
	job->rk = rk;
	job->list = rd_kafka_topic_partition_list_new(1);
	tp = rd_kafka_topic_partition_list_add(job->list, topic, partition);
	tp->offset = *offset;
	job->timeout_ms = Max(timeout_ms, 1);
	job->err = RD_KAFKA_RESP_ERR_NO_ERROR;
	pg_atomic_init_u32(&job->done, 0);

	rc = dwh_worker_start_thread(&thread, probe_main, job);
	if (rc != 0)
		probe_main(job);		/* no thread: ask from here */
	else
	{
		/*
		 * Only a SIGTERM may end the wait (the process exits, leaving the
		 * client to the thread): an ERROR, such as pg_cancel_backend()'s,
		 * would leave the thread using a client that the worker, going on,
		 * could destroy.  A cancel is served once the thread is done.
		 */
		in_flight = true;
		HOLD_CANCEL_INTERRUPTS();
		while (pg_atomic_read_u32(&job->done) == 0)
		{
			CHECK_FOR_INTERRUPTS();
			(void) WaitLatch(MyLatch, WL_TIMEOUT | WL_EXIT_ON_PM_DEATH, 5L,
							 PG_WAIT_EXTENSION);
		}
		RESUME_CANCEL_INTERRUPTS();
		pthread_join(thread, NULL);
		in_flight = false;
	}

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
 * dwh_kafka_probe_in_flight
 *		Is a thread still using a client?  Only in the exit of a process that
 *		a signal interrupted while it waited for an answer: the client must
 *		then be left to the exit, not destroyed.
 */
bool
dwh_kafka_probe_in_flight(void)
{
	return in_flight;
}
