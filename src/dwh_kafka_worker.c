/*-------------------------------------------------------------------------
 *
 * dwh_kafka_worker.c
 *	  The Kafka consumer background workers: batches of order messages
 *	  applied exactly once, with their offsets, in one transaction each.
 *
 * dwh.kafka_consumers workers are registered when dwh is preloaded; they
 * share the topic's partitions through the Kafka consumer group.  A worker
 * loops: serve the consumer queue, gather up to dwh.kafka_batch_size
 * messages or wait dwh.kafka_batch_wait, then apply them in one transaction
 * that first locks the partitions' rows of dwh.kafka_offsets, drops the
 * messages already applied, hands the rest to dwh_ingest_batch() and
 * stores the next offsets.  A crash anywhere before the commit loses
 * nothing (the batch is fetched again from the stored offsets); after it,
 * nothing is applied twice.
 *
 * An error that is not about a message (the ingest isolates and dead-letters
 * those) aborts the transaction and the same batch is retried with backoff;
 * the batch lives in its own memory context, outside the transaction.
 *
 * While dwh.kafka_brokers is empty, the extension is not created or not
 * updated to the library's version, or the server is a standby, the worker
 * sleeps on its latch and says why in dwh.status, logging each new reason
 * once.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "access/xlog.h"
#include "catalog/namespace.h"
#include "commands/extension.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "tcop/tcopprot.h"
#include "utils/guc.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"
#include "utils/wait_event.h"

#include "dwh_ingest.h"
#include "dwh_kafka_consumer.h"
#include "dwh_kafka_offsets.h"
#include "dwh_kafka_worker.h"
#include "dwh_secret_files.h"
#include "dwh_settings.h"
#include "dwh_status.h"
#include "dwh_version.h"
#include "dwh_worker_connect.h"

#define BACKOFF_MIN_MS		500
#define BACKOFF_MAX_MS		30000
#define NOT_READY_RECHECK_MS	5000
#define WATERMARK_INTERVAL_MS	1000

PGDLLEXPORT void dwh_kafka_worker_main(Datum main_arg);

/* Messages gathered for the next transaction. */
typedef struct Batch
{
	MemoryContext context;		/* outlives aborted transactions */
	int			n;
	int			capacity;
	DwhIngestItem *items;
	int64		bytes;
	TimestampTz first_at;
} Batch;

static int	worker_index;
static DwhWorkerStatus *slot;
static DwhKafkaConsumer *consumer = NULL;
static char *consumer_settings = NULL;
static char *connected_database = NULL;
static Batch batch;
static bool ready_checked = false;
static char last_logged_wait[DWH_STATE_LEN];
static int	backoff_ms = 0;
static TimestampTz last_watermarks = 0;
static MemoryContext loop_context = NULL;
/* dwh.status says "waiting for the broker" (librdkafka said all are down). */
static bool waiting_for_broker = false;

/* A rebalance received but not yet served (its DB lookup may fail). */
static DwhKafkaEventKind pending_rebalance = DWH_KAFKA_NOTHING;
static int	pending_n = 0;
static int32 *pending_partitions = NULL;

/*
 * dwh_kafka_register_workers
 *		Register dwh.kafka_consumers workers (from _PG_init, when preloaded).
 */
void
dwh_kafka_register_workers(void)
{
	int			i;

	for (i = 1; i <= dwh_kafka_consumers; i++)
	{
		BackgroundWorker worker;

		memset(&worker, 0, sizeof(worker));
		worker.bgw_flags = BGWORKER_SHMEM_ACCESS |
			BGWORKER_BACKEND_DATABASE_CONNECTION;
		/* Started on a standby too, where it waits for promotion. */
		worker.bgw_start_time = BgWorkerStart_ConsistentState;
		worker.bgw_restart_time = 5;
		snprintf(worker.bgw_library_name, BGW_MAXLEN, "dwh");
		snprintf(worker.bgw_function_name, BGW_MAXLEN, "dwh_kafka_worker_main");
		snprintf(worker.bgw_name, BGW_MAXLEN, "dwh kafka worker %d", i);
		snprintf(worker.bgw_type, BGW_MAXLEN, "dwh kafka worker");
		worker.bgw_main_arg = Int32GetDatum(i);
		RegisterBackgroundWorker(&worker);
	}
}

/*
 * The settings a consumer is built from, with the content of the options
 * file (or why it cannot be read): a change means reconnecting.  Kept in
 * memory only (it may hold a password).
 */
static char *
current_consumer_settings(void)
{
	char	   *file = NULL;
	char		error[600] = "";
	char	   *joined;
	char	   *settings;

	if (dwh_kafka_options_file[0] != '\0')
		file = dwh_secret_file_read("dwh.kafka_options_file",
									dwh_kafka_options_file, error,
									sizeof(error));
	joined = psprintf("%s|%s|%s|%s|%d|%d|%s|%s",
					  dwh_kafka_brokers, dwh_kafka_topic, dwh_kafka_group_id,
					  dwh_kafka_options, dwh_kafka_prefetch_memory,
					  dwh_kafka_start_offset, dwh_kafka_options_file,
					  file ? file : error);
	settings = MemoryContextStrdup(TopMemoryContext, joined);
	explicit_bzero(joined, strlen(joined));
	pfree(joined);
	dwh_secret_file_forget(file);
	return settings;
}

static void
batch_clear(void)
{
	MemoryContextReset(batch.context);
	batch.n = 0;
	batch.bytes = 0;
	batch.capacity = Max(dwh_kafka_batch_size, 16);
	batch.items = MemoryContextAlloc(batch.context,
									 sizeof(DwhIngestItem) * batch.capacity);
}

/* Forget the gathered messages of partitions no longer ours. */
static void
batch_drop_partitions(const int32 *partitions, int n)
{
	int			kept = 0;
	int			i;
	int			j;

	for (i = 0; i < batch.n; i++)
	{
		bool		drop = false;

		for (j = 0; j < n && !drop; j++)
			drop = (batch.items[i].partition == partitions[j]);
		if (!drop)
			batch.items[kept++] = batch.items[i];
	}
	batch.n = kept;
}

static void
drop_consumer(void)
{
	if (consumer != NULL)
	{
		dwh_kafka_consumer_destroy(consumer);
		consumer = NULL;
	}
	pending_rebalance = DWH_KAFKA_NOTHING;
	waiting_for_broker = false;
	dwh_status_set_assigned(slot, NULL, 0);
	batch_clear();
}

static void
shutdown_consumer(int code, Datum arg)
{
	if (consumer != NULL)
	{
		dwh_kafka_consumer_destroy(consumer);
		consumer = NULL;
	}
}

/*
 * Publish a waiting state; a new reason is logged once (with the hint, if
 * any), a repeated one never.
 */
static void
set_waiting_hint(const char *reason, const char *hint)
{
	dwh_status_set_state(slot, "%s", reason);
	if (strcmp(last_logged_wait, reason) != 0)
	{
		strlcpy(last_logged_wait, reason, sizeof(last_logged_wait));
		ereport(LOG,
				(errmsg("dwh kafka worker %d: %s", worker_index, reason),
				 hint ? errhint("%s", hint) : 0));
	}
}

static void
set_waiting(const char *reason)
{
	set_waiting_hint(reason, NULL);
}

/*
 * Back to "consuming" after "waiting for the broker", on the first sign
 * that the brokers answer again: a message fetched or a partition
 * assignment.  librdkafka says when every broker is down, never when they
 * are back, so without this an idle worker would say it waits long after
 * the brokers returned.
 */
static void
broker_answered(void)
{
	if (waiting_for_broker)
	{
		waiting_for_broker = false;
		dwh_status_set_state(slot, "consuming");
	}
}

static void
wait_latch(long timeout_ms)
{
	(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
					 timeout_ms, PG_WAIT_EXTENSION);
	ResetLatch(MyLatch);
}

/*
 * Reload the configuration.  Another database means another process; other
 * Kafka settings mean another consumer.  Gathered messages are dropped:
 * they are not applied yet, so they will be fetched again.
 */
static void
process_reload(void)
{
	char	   *settings;

	if (!ConfigReloadPending)
		return;
	ConfigReloadPending = false;
	ProcessConfigFile(PGC_SIGHUP);

	if (strcmp(dwh_database, connected_database) != 0)
	{
		ereport(LOG,
				(errmsg("dwh kafka worker %d: dwh.database changed from \"%s\" to \"%s\", restarting",
						worker_index, connected_database, dwh_database)));
		proc_exit(1);
	}

	settings = current_consumer_settings();
	if (consumer_settings == NULL || strcmp(settings, consumer_settings) != 0)
	{
		if (consumer != NULL)
			ereport(LOG,
					(errmsg("dwh kafka worker %d: Kafka settings changed, reconnecting",
							worker_index)));
		drop_consumer();
		ready_checked = false;
	}
	if (consumer_settings)
	{
		explicit_bzero(consumer_settings, strlen(consumer_settings));
		pfree(consumer_settings);
	}
	consumer_settings = settings;
}

/*
 * Can the worker consume?  Publishes why not.  The catalog lookups run in
 * a short transaction of their own.
 */
static bool
ready_to_consume(void)
{
	bool		installed;
	char	   *mismatch;

	if (dwh_kafka_brokers[0] == '\0')
	{
		set_waiting("idle: dwh.kafka_brokers is empty");
		return false;
	}
	if (RecoveryInProgress())
	{
		set_waiting("waiting: the server is a standby");
		return false;
	}

	StartTransactionCommand();
	installed = OidIsValid(get_extension_oid("dwh", true)) &&
		OidIsValid(get_relname_relid("kafka_offsets",
									 get_namespace_oid("dwh", true)));
	CommitTransactionCommand();
	if (!installed)
	{
		set_waiting(psprintf("waiting: extension dwh is not created in database \"%s\"",
							 connected_database));
		return false;
	}
	/* After a package upgrade, until ALTER EXTENSION dwh UPDATE. */
	mismatch = dwh_schema_mismatch();
	if (mismatch != NULL)
	{
		set_waiting_hint(dwh_schema_wait_state(mismatch),
						 dwh_schema_wait_hint(connected_database));
		return false;
	}
	return true;
}

static bool
connect_consumer(void)
{
	char		error[600];

	dwh_status_set_state(slot, "connecting");
	consumer = dwh_kafka_consumer_create(worker_index, error, sizeof(error));
	if (consumer == NULL)
	{
		dwh_status_set_error(slot, "%s", error);
		ereport(LOG,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("dwh kafka worker %d: %s", worker_index, error),
				 errhint("Correct the Kafka settings and reload the configuration.")));
		strlcpy(last_logged_wait, "waiting: invalid Kafka settings",
				sizeof(last_logged_wait));
		dwh_status_set_state(slot, "waiting: invalid Kafka settings");
		return false;
	}
	last_logged_wait[0] = '\0';
	dwh_status_set_state(slot, "consuming");
	return true;
}

/*
 * Serve a rebalance: on assignment, start each partition at its offset
 * stored in the database; on revocation, drop what was gathered for the
 * partitions lost (the new owner fetches it again from the stored offset).
 */
static void
serve_rebalance(void)
{
	int32	   *owned;
	int			n_owned;

	if (pending_rebalance == DWH_KAFKA_ASSIGN)
	{
		int64	   *offsets = palloc(sizeof(int64) * Max(pending_n, 1));

		StartTransactionCommand();
		PushActiveSnapshot(GetTransactionSnapshot());
		dwh_kafka_offsets_lookup(dwh_kafka_consumer_topic(consumer),
								 pending_partitions, pending_n, offsets);
		PopActiveSnapshot();
		CommitTransactionCommand();
		dwh_kafka_consumer_assign(consumer, offsets);
		broker_answered();
	}
	else
	{
		batch_drop_partitions(pending_partitions, pending_n);
		dwh_kafka_consumer_revoke(consumer);
	}
	pending_rebalance = DWH_KAFKA_NOTHING;

	n_owned = dwh_kafka_consumer_assignment(consumer, &owned);
	dwh_status_set_assigned(slot, owned, n_owned);
	ereport(DEBUG1,
			(errmsg("dwh kafka worker %d now owns %d partitions",
					worker_index, n_owned)));
}

/*
 * Honour dwh.kafka_seek() on the partitions owned: move them, and drop
 * what was gathered for them from the old position.
 */
static void
serve_seeks(void)
{
	int32	   *owned;
	int			n_owned = dwh_kafka_consumer_assignment(consumer, &owned);
	int32	   *parts;
	int64	   *offsets;
	int			n;
	int			i;

	if (n_owned == 0)
		return;
	StartTransactionCommand();
	PushActiveSnapshot(GetTransactionSnapshot());
	n = dwh_kafka_offsets_take_seeks(dwh_kafka_consumer_topic(consumer),
									 owned, n_owned, &parts, &offsets);
	PopActiveSnapshot();
	CommitTransactionCommand();

	batch_drop_partitions(parts, n);
	for (i = 0; i < n; i++)
	{
		dwh_kafka_consumer_seek(consumer, parts[i], offsets[i]);
		ereport(LOG,
				(errmsg("dwh kafka worker %d: partition %d moved to offset " INT64_FORMAT,
						worker_index, parts[i], offsets[i])));
	}
}

static int
compare_int32(const void *a, const void *b)
{
	int32		x = *(const int32 *) a;
	int32		y = *(const int32 *) b;

	return (x > y) - (x < y);
}

static int
partition_index(const int32 *partitions, int n, int32 p)
{
	int			i;

	for (i = 0; i < n; i++)
		if (partitions[i] == p)
			return i;
	return -1;
}

/*
 * Apply the gathered batch in one transaction with its offsets.
 */
static void
apply_batch(void)
{
	const char *topic = dwh_kafka_consumer_topic(consumer);
	int32	   *parts = palloc(sizeof(int32) * batch.n);
	int64	   *stored = palloc(sizeof(int64) * batch.n);
	bool	   *seek = palloc(sizeof(bool) * batch.n);
	int64	   *next = palloc(sizeof(int64) * batch.n);
	DwhIngestItem *keep = palloc(sizeof(DwhIngestItem) * batch.n);
	int			n_parts = 0;
	int			n_keep = 0;
	int			n_next = 0;
	int32	   *next_parts = palloc(sizeof(int32) * batch.n);
	bool		any_seek = false;
	DwhIngestResult result;
	int			i;

	for (i = 0; i < batch.n; i++)
		if (partition_index(parts, n_parts, batch.items[i].partition) < 0)
			parts[n_parts++] = batch.items[i].partition;
	qsort(parts, n_parts, sizeof(int32), compare_int32);

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	PushActiveSnapshot(GetTransactionSnapshot());
	pgstat_report_activity(STATE_RUNNING, "dwh: applying a Kafka batch");

	/* Lock the partitions' rows, then keep only what is not applied yet. */
	dwh_kafka_offsets_lock(topic, parts, n_parts, stored, seek);
	for (i = 0; i < n_parts; i++)
	{
		next[i] = -1;
		any_seek = any_seek || seek[i];
	}
	for (i = 0; i < batch.n; i++)
	{
		int			p = partition_index(parts, n_parts, batch.items[i].partition);

		if (seek[p] || (stored[p] != DWH_NO_OFFSET &&
						batch.items[i].offset < stored[p]))
			continue;
		keep[n_keep++] = batch.items[i];
		next[p] = Max(next[p], batch.items[i].offset + 1);
	}
	for (i = 0; i < n_parts; i++)
	{
		if (next[i] < 0)
			continue;
		next_parts[n_next] = parts[i];
		next[n_next++] = next[i];
	}

	dwh_ingest_batch(keep, n_keep, "kafka", topic, &result);
	dwh_kafka_offsets_store(topic, next_parts, next, n_next);

	PopActiveSnapshot();
	CommitTransactionCommand();
	MemoryContextSwitchTo(loop_context);
	pgstat_report_activity(STATE_IDLE, NULL);
	/* Publish the row counts, or autovacuum never sees this worker's. */
	pgstat_report_stat(false);

	dwh_status_count_batch(slot, n_keep, result.dead_lettered);
	dwh_kafka_consumer_commit(consumer, next_parts, next, n_next);
	dwh_kafka_consumer_publish_watermarks(consumer);
	batch_clear();
	backoff_ms = 0;
	if (any_seek)
		serve_seeks();
}

/* Add a message to the batch (its value is already in batch.context). */
static void
batch_add(DwhKafkaEvent *ev)
{
	DwhIngestItem *item;

	if (batch.n == batch.capacity)
	{
		batch.capacity *= 2;
		batch.items = repalloc(batch.items, sizeof(DwhIngestItem) * batch.capacity);
	}
	item = &batch.items[batch.n++];
	item->data = ev->data;
	item->len = ev->len;
	item->has_coordinates = true;
	item->partition = ev->partition;
	item->offset = ev->offset;
	if (batch.n == 1)
		batch.first_at = GetCurrentTimestamp();
	batch.bytes += ev->len;
}

static bool
batch_due(void)
{
	if (batch.n == 0)
		return false;
	return batch.n >= dwh_kafka_batch_size ||
		batch.bytes >= (int64) dwh_kafka_prefetch_memory * 1024 ||
		TimestampDifferenceExceeds(batch.first_at, GetCurrentTimestamp(),
								   dwh_kafka_batch_wait);
}

/*
 * Serve the queue until it is empty, the batch is due or a rebalance
 * needs the database.
 */
static void
gather(void)
{
	for (;;)
	{
		DwhKafkaEvent ev;
		MemoryContext old;

		CHECK_FOR_INTERRUPTS();
		if (batch.n >= dwh_kafka_batch_size)
			return;

		old = MemoryContextSwitchTo(batch.context);
		dwh_kafka_consumer_poll(consumer, &ev);
		MemoryContextSwitchTo(old);

		switch (ev.kind)
		{
			case DWH_KAFKA_NOTHING:
				return;
			case DWH_KAFKA_MESSAGE:
				batch_add(&ev);
				broker_answered();
				break;
			case DWH_KAFKA_ASSIGN:
			case DWH_KAFKA_REVOKE:
				pending_rebalance = ev.kind;
				pending_n = ev.n_partitions;
				if (pending_partitions)
					pfree(pending_partitions);
				pending_partitions = MemoryContextAlloc(TopMemoryContext,
														sizeof(int32) * Max(ev.n_partitions, 1));
				memcpy(pending_partitions, ev.partitions,
					   sizeof(int32) * ev.n_partitions);
				return;
			case DWH_KAFKA_ERROR:
				dwh_status_set_error(slot, "%s", ev.error);
				if (ev.broker_down)
				{
					dwh_status_set_state(slot, "waiting for the broker");
					waiting_for_broker = true;
				}
				ereport(LOG,
						(errcode(ERRCODE_CONNECTION_FAILURE),
						 errmsg("dwh kafka worker %d: %s", worker_index, ev.error)));
				break;
			case DWH_KAFKA_FATAL:
				dwh_status_set_error(slot, "%s", ev.error);
				ereport(LOG,
						(errcode(ERRCODE_CONNECTION_FAILURE),
						 errmsg("dwh kafka worker %d: fatal consumer error, reconnecting: %s",
								worker_index, ev.error)));
				drop_consumer();
				backoff_ms = BACKOFF_MAX_MS;
				return;
		}
	}
}

/*
 * After an error: publish it, clean up the transaction, and wait before
 * retrying.  The batch is kept and retried as it is.
 */
static void
recover_from_error(void)
{
	ErrorData  *edata;

	error_context_stack = NULL;
	HOLD_INTERRUPTS();
	EmitErrorReport();
	/* Copy the error while what it points to still exists. */
	MemoryContextSwitchTo(TopMemoryContext);
	edata = CopyErrorData();
	AbortOutOfAnyTransaction();
	MemoryContextSwitchTo(TopMemoryContext);
	FlushErrorState();
	RESUME_INTERRUPTS();
	pgstat_report_activity(STATE_IDLE, NULL);

	dwh_status_set_error(slot, "%s (SQLSTATE %s)", edata->message,
						 unpack_sql_state(edata->sqlerrcode));
	FreeErrorData(edata);

	backoff_ms = backoff_ms == 0 ? BACKOFF_MIN_MS : Min(backoff_ms * 2, BACKOFF_MAX_MS);
	dwh_status_set_state(slot, "retrying after an error");
	ready_checked = false;
	wait_latch(backoff_ms);
}

/*
 * dwh_kafka_worker_main
 *		Entry point of a Kafka worker; main_arg is its 1-based number.
 */
void
dwh_kafka_worker_main(Datum main_arg)
{
	sigjmp_buf	local_sigjmp_buf;

	worker_index = DatumGetInt32(main_arg);

	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, die);
	BackgroundWorkerUnblockSignals();

	slot = dwh_status_attach(DWH_WORKER_KAFKA, worker_index);
	connected_database = dwh_worker_connect(slot);
	pgstat_report_appname(psprintf("dwh kafka worker %d", worker_index));

	batch.context = AllocSetContextCreate(TopMemoryContext, "dwh kafka batch",
										  ALLOCSET_DEFAULT_SIZES);
	batch_clear();
	consumer_settings = current_consumer_settings();
	before_shmem_exit(shutdown_consumer, (Datum) 0);

	if (sigsetjmp(local_sigjmp_buf, 1) != 0)
		recover_from_error();
	PG_exception_stack = &local_sigjmp_buf;

	loop_context = AllocSetContextCreate(TopMemoryContext, "dwh kafka loop",
										 ALLOCSET_DEFAULT_SIZES);
	for (;;)
	{
		/* Whatever a round allocates outside a transaction goes here. */
		MemoryContextSwitchTo(loop_context);
		MemoryContextReset(loop_context);
		CHECK_FOR_INTERRUPTS();
		process_reload();

		if (!ready_checked || consumer == NULL)
		{
			if (!ready_to_consume())
			{
				drop_consumer();
				wait_latch(NOT_READY_RECHECK_MS);
				continue;
			}
			ready_checked = true;
		}
		if (consumer == NULL)
		{
			if (backoff_ms > 0)
			{
				wait_latch(backoff_ms);
				backoff_ms = 0;
				continue;
			}
			if (!connect_consumer())
			{
				/* Wait for a reload that corrects the settings. */
				wait_latch(-1);
				continue;
			}
		}

		if (pending_rebalance != DWH_KAFKA_NOTHING)
		{
			serve_rebalance();
			continue;
		}
		if (dwh_status_take_offsets_changed(slot))
			serve_seeks();

		gather();
		if (consumer == NULL || pending_rebalance != DWH_KAFKA_NOTHING)
			continue;

		if (batch_due())
		{
			apply_batch();
			dwh_status_set_state(slot, "consuming");
			waiting_for_broker = false;
			continue;
		}

		if (TimestampDifferenceExceeds(last_watermarks, GetCurrentTimestamp(),
									   WATERMARK_INTERVAL_MS))
		{
			dwh_kafka_consumer_publish_watermarks(consumer);
			last_watermarks = GetCurrentTimestamp();
		}

		/* Nothing due: sleep until a message, a signal or the batch wait. */
		if (batch.n >= dwh_kafka_batch_size)
			continue;
		if (batch.n > 0)
		{
			long		elapsed = (long) ((GetCurrentTimestamp() - batch.first_at) / 1000);

			dwh_kafka_consumer_wait(consumer,
									Max(dwh_kafka_batch_wait - elapsed, 1));
		}
		else
			dwh_kafka_consumer_wait(consumer, WATERMARK_INTERVAL_MS);
	}
}
