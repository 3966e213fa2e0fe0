/*-------------------------------------------------------------------------
 *
 * dwh_kafka_destroy.c
 *	  Destroy a librdkafka client within a deadline.
 *
 * rd_kafka_destroy() joins librdkafka's threads, and librdkafka 2.0 can
 * keep a broker thread that never ends: after a broker went down and came
 * back (librdkafka issue 4674), and here after a topic was recreated with
 * fewer partitions, the call has been seen to wait for good.  A worker stuck
 * there serves nothing, ignores SIGTERM, and so keeps the server from
 * stopping.  The destruction runs in a thread of its own, which calls
 * nothing of PostgreSQL's and never takes a signal, while the worker
 * waits with a deadline.  Past it the client is given up: the worker
 * leaves its process, whose exit ends librdkafka's threads, and the
 * postmaster starts it again.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <pthread.h>

#include "miscadmin.h"
#include "port/atomics.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "utils/timestamp.h"
#include "utils/wait_event.h"

#include "dwh_kafka_destroy.h"
#include "dwh_worker.h"

/* Shared with the destroying thread: malloc'd, as it may outlive the wait. */
typedef struct DestroyJob
{
	rd_kafka_t *rk;
	int			flags;
	pg_atomic_uint32 done;
} DestroyJob;

static void *
destroy_main(void *arg)
{
	DestroyJob *job = (DestroyJob *) arg;

	rd_kafka_destroy_flags(job->rk, job->flags);
	pg_atomic_write_u32(&job->done, 1);
	return NULL;
}

/*
 * dwh_kafka_destroy_within
 *		rd_kafka_destroy_flags(rk, flags), waiting at most timeout_ms for it.
 *		False when it did not end in time, or when SIGTERM came meanwhile:
 *		the client is then abandoned to the process's exit, which the
 *		caller must bring about.
 *
 * The wait polls every millisecond, without WL_LATCH_SET and without
 * serving interrupts: it also runs from the worker's exit callbacks, where
 * the latch may be gone and interrupts must not be served again.
 */
bool
dwh_kafka_destroy_within(rd_kafka_t *rk, int flags, int timeout_ms)
{
	DestroyJob *job;
	pthread_t	thread;
	TimestampTz deadline;
	int			rc;

	job = malloc(sizeof(DestroyJob));
	if (job == NULL)
	{
		rd_kafka_destroy_flags(rk, flags);
		return true;
	}
	job->rk = rk;
	job->flags = flags;
	pg_atomic_init_u32(&job->done, 0);

	rc = dwh_worker_start_thread(&thread, destroy_main, job);
	if (rc != 0)
	{
		free(job);
		rd_kafka_destroy_flags(rk, flags);
		return true;
	}

	deadline = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), timeout_ms);
	while (pg_atomic_read_u32(&job->done) == 0)
	{
		if (GetCurrentTimestamp() >= deadline ||
			(ProcDiePending && !proc_exit_inprogress))
		{
			pthread_detach(thread);
			return false;
		}
		(void) WaitLatch(MyLatch, WL_TIMEOUT | WL_EXIT_ON_PM_DEATH, 1L,
						 PG_WAIT_EXTENSION);
	}
	pthread_join(thread, NULL);
	free(job);
	return true;
}

/*
 * dwh_kafka_client_abandoned
 *		After dwh_kafka_destroy_within() gave a client up outside the exit
 *		callbacks: leave the process.  SIGTERM ends it as usual; otherwise
 *		the postmaster starts the worker again.
 */
void
dwh_kafka_client_abandoned(const char *client)
{
	CHECK_FOR_INTERRUPTS();
	ereport(WARNING,
			(errmsg("Kafka %s did not shut down within %d ms; the worker restarts",
					client, DWH_KAFKA_DESTROY_MS),
			 errdetail("librdkafka's rd_kafka_destroy() waits for one of its threads; the process's exit ends them.")));
	proc_exit(1);
}
