/*-------------------------------------------------------------------------
 *
 * dwh_kafka_worker.c
 *	  The Kafka consumer background workers: batches of order messages
 *	  applied exactly once, with their offsets, in one transaction each.
 *
 * dwh.kafka_consumers workers are registered when dwh is preloaded; they
 * share the topic's partitions through the Kafka consumer group.  A worker
 * loops: serve the consumer queue until it is empty or holds
 * dwh.kafka_batch_size messages (waiting up to dwh.kafka_batch_wait for
 * more, 0 by default: a trickle is applied at once, message by message, a
 * backlog in full batches), then apply them in one transaction
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
 * once.  Registration, start-up, waits, reload, readiness and error
 * recovery are the skeleton both workers share (src/dwh_worker.c).
 *
 * An offset out of range (the broker no longer holds a partition's stored
 * offset) is kept as a pending gap until it is served: the batch gathered
 * so far is applied first, so that the stored offset is where the stream
 * broke, then the gap is recorded (dwh_kafka_offsets_gap) and every owned
 * partition is assigned again at its stored offset, the stopped ones
 * paused (a partition that only stops is just paused where it is).  A
 * failure on the way leaves the gap pending, to be served again.  So is a
 * partition whose log was replaced (dwh_kafka_verify.c): the message
 * before its stored offset is not the one applied there.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "catalog/namespace.h"
#include "commands/extension.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "storage/ipc.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

#include "dwh_dead_letter.h"
#include "dwh_inflight.h"
#include "dwh_ingest.h"
#include "dwh_kafka_consumer.h"
#include "dwh_kafka_offsets.h"
#include "dwh_kafka_partitions.h"
#include "dwh_kafka_verify.h"
#include "dwh_secret_files.h"
#include "dwh_settings.h"
#include "dwh_status.h"
#include "dwh_trust.h"
#include "dwh_worker.h"

#define WATERMARK_INTERVAL_MS	1000
#define RECOVERY_PROBE_MS		5000
#define STOPPED_REFRESH_MS		5000
#define GAP_RETRY_MS			1000

/*
 * A batch of nothing but messages left by the batch before waits this long
 * for the other worker's commit, unless new messages come first; after
 * MAX_CARRY_ROUNDS batches in a row that left some, a batch leaves none.
 */
#define CARRY_RETRY_MS			5
#define MAX_CARRY_ROUNDS		10

PGDLLEXPORT void dwh_kafka_worker_main(Datum main_arg);

/*
 * Messages gathered for the next transaction.  Those of orders another
 * worker was applying (dwh_inflight.c) stay for the next one, at the front:
 * the carry.  Their partitions' stored offsets stay at the first of them
 * meanwhile, so the batch that applies them stores at least the floors, the
 * offsets that followed the batch that left them; and it may store an
 * offset that follows a message it no longer holds: known keeps the offset
 * and SHA-256 of those messages for the partitions' checks
 * (dwh_kafka_verify.c).
 */
typedef struct KnownMessage
{
	int32		partition;
	DwhKafkaLastApplied message;
} KnownMessage;

typedef struct Batch
{
	MemoryContext context;		/* outlives aborted transactions */
	int			n;
	int			capacity;
	DwhIngestItem *items;
	int64		bytes;
	TimestampTz first_at;
	int			carried;		/* items[0..carried-1] were left before */
	int			carry_rounds;	/* batches in a row that left some */
	int			n_floors;
	int32	   *floor_parts;
	int64	   *floors;
	int			n_known;
	KnownMessage *known;
} Batch;

static int	worker_index;
static DwhWorkerStatus *slot;
static DwhKafkaConsumer *consumer = NULL;
static char *consumer_settings = NULL;
static Batch batch;
static bool ready_checked = false;

/*
 * The extension the partitions were started for.  Dropped and created
 * again meanwhile, dwh.kafka_offsets holds none of the offsets the
 * consumer's positions came from: the worker starts its partitions again.
 */
static Oid	extension_oid = InvalidOid;
static bool extension_replaced = false;
static int	backoff_ms = 0;
static TimestampTz last_watermarks = 0;
static TimestampTz last_stopped_refresh = 0;
static TimestampTz last_recovery_probe = 0;
static MemoryContext loop_context = NULL;

/* dwh.status says "waiting for the broker" (librdkafka said all are down). */
static bool waiting_for_broker = false;

/* Offsets out of range, one per partition, not yet served. */
typedef struct PendingGap
{
	int32		partition;
	int64		offset;			/* the offset that could not be fetched */
	int64		low;			/* the broker's watermarks, -1 if unknown */
	int64		high;
	bool		replaced;		/* another log holds the stored offset */
} PendingGap;

static PendingGap *pending_gaps = NULL;
static int	n_pending_gaps = 0;
static TimestampTz gaps_not_before = 0;

/* The consumer has served a rebalance: it is a member of the group. */
static bool in_group = false;

/*
 * Left the group to be dropped by the coordinator: no new consumer before
 * this, even after a reload (back sooner, it would be handed its old
 * assignment again).
 */
static TimestampTz rejoin_not_before = 0;

/* A rebalance received but not yet served (its DB lookup may fail). */
static DwhKafkaEventKind pending_rebalance = DWH_KAFKA_NOTHING;
static int	pending_n = 0;
static int32 *pending_partitions = NULL;

/* The items array starts this large; batch_add() doubles it as needed. */
#define BATCH_INITIAL_CAPACITY Min(Max(dwh_kafka_batch_size, 16), 1024)

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
	batch.capacity = BATCH_INITIAL_CAPACITY;
	batch.items = MemoryContextAlloc(batch.context,
									 sizeof(DwhIngestItem) * batch.capacity);
	batch.carried = 0;
	batch.carry_rounds = 0;
	batch.n_floors = 0;
	batch.n_known = 0;
}

/* Forget the gathered messages of partitions no longer ours. */
static void
batch_drop_partitions(const int32 *partitions, int n)
{
	int			kept = 0;
	int			carried = 0;
	int			i;
	int			j;

	for (i = 0; i < batch.n; i++)
	{
		bool		drop = false;

		for (j = 0; j < n && !drop; j++)
			drop = (batch.items[i].partition == partitions[j]);
		if (drop)
			continue;
		if (i < batch.carried)
			carried++;
		batch.items[kept++] = batch.items[i];
	}
	batch.n = kept;
	batch.carried = carried;

	/* A floor must not outlive its partition: it may come back elsewhere. */
	kept = 0;
	for (i = 0; i < batch.n_floors; i++)
	{
		bool		drop = false;

		for (j = 0; j < n && !drop; j++)
			drop = (batch.floor_parts[i] == partitions[j]);
		if (drop)
			continue;
		batch.floor_parts[kept] = batch.floor_parts[i];
		batch.floors[kept++] = batch.floors[i];
	}
	batch.n_floors = kept;
}

static void
drop_consumer(void)
{
	if (consumer != NULL)
	{
		DwhKafkaConsumer *c = consumer;

		/*
		 * Forgotten first: a destruction given up leaves the process, whose
		 * exit callback must not destroy the consumer a second time.
		 */
		consumer = NULL;
		dwh_kafka_consumer_destroy(c, false, waiting_for_broker);
	}
	pending_rebalance = DWH_KAFKA_NOTHING;
	in_group = false;
	n_pending_gaps = 0;
	dwh_kafka_verify_reset();
	waiting_for_broker = false;
	dwh_status_set_assigned(slot, NULL, 0);
	batch_clear();
}

/* Forget the pending gaps of partitions no longer ours. */
static void
forget_gaps(const int32 *partitions, int n)
{
	int			kept = 0;
	int			i;
	int			j;

	for (i = 0; i < n_pending_gaps; i++)
	{
		bool		drop = false;

		for (j = 0; j < n && !drop; j++)
			drop = (pending_gaps[i].partition == partitions[j]);
		if (!drop)
			pending_gaps[kept++] = pending_gaps[i];
	}
	n_pending_gaps = kept;
}

/*
 * Keep an offset out of range, or one that another log holds (replaced:
 * dwh_kafka_verify.c), for serve_gaps(); one per partition, and only for
 * partitions still ours (an error may outlive an assignment).
 */
static void
add_gap(const DwhKafkaEvent *ev, bool replaced)
{
	int32	   *owned;
	int			n_owned = dwh_kafka_consumer_assignment(consumer, &owned);
	int			i;

	for (i = 0; i < n_owned; i++)
		if (owned[i] == ev->partition)
			break;
	if (i == n_owned)
		return;
	if (pending_gaps == NULL)
		pending_gaps = MemoryContextAlloc(TopMemoryContext,
										  sizeof(PendingGap) * DWH_MAX_PARTITIONS);
	for (i = 0; i < n_pending_gaps; i++)
		if (pending_gaps[i].partition == ev->partition)
			break;
	if (i == n_pending_gaps)
	{
		if (n_pending_gaps == DWH_MAX_PARTITIONS)
			return;				/* served with the others, found again */
		n_pending_gaps++;
	}
	pending_gaps[i].partition = ev->partition;
	pending_gaps[i].offset = ev->offset;
	pending_gaps[i].low = replaced ? -1 : ev->low;
	pending_gaps[i].high = replaced ? -1 : ev->high;
	pending_gaps[i].replaced = replaced;
	ereport(DEBUG1,
			(errmsg_internal("Kafka partition %d: offset " INT64_FORMAT " out of range (watermarks " INT64_FORMAT ", " INT64_FORMAT "): %s",
							 ev->partition, ev->offset, ev->low, ev->high,
							 ev->error)));
}

/*
 * A partition checked at the message it applied last (dwh_kafka_verify.c)
 * whose log now ends there or before was replaced: a gap, as if its stored
 * offset were out of range (the watermarks are asked for afresh).
 */
static void
find_short_logs(void)
{
	int32	   *owned;
	int			n_owned = dwh_kafka_consumer_assignment(consumer, &owned);
	int			i;

	for (i = 0; i < n_owned; i++)
	{
		int64		high = dwh_kafka_consumer_high_watermark(consumer, owned[i]);
		DwhKafkaEvent ev = {0};

		if (!dwh_kafka_verify_log_end(owned[i], high))
			continue;
		ev.partition = owned[i];
		ev.offset = high;
		ev.low = -1;
		ev.high = -1;
		snprintf(ev.error, sizeof(ev.error),
				 "the log ends at offset " INT64_FORMAT ", before the message last applied",
				 high);
		add_gap(&ev, false);
	}
}

/*
 * With nothing left to apply, the partitions whose log ended past the last
 * message they delivered: the offsets between are transaction markers or
 * aborted messages, which a consumer reading committed messages never
 * sees.  Their stored offsets move to the end, so that the lag reaches 0
 * (dwh_kafka_offsets_skip_to_end, one transaction each; none where the
 * log ends right after its last message, as without transactions).
 */
static void
skip_to_log_ends(void)
{
	int32	   *owned;
	int			n_owned = dwh_kafka_consumer_assignment(consumer, &owned);
	const char *topic = dwh_kafka_consumer_topic(consumer);
	int			i;

	for (i = 0; i < n_owned; i++)
	{
		int64		delivered_next;
		int64		end = dwh_kafka_consumer_take_log_end(consumer, owned[i],
														  &delivered_next);
		bool		moved;

		if (end < 0 || (delivered_next >= 0 && end <= delivered_next) ||
			dwh_kafka_consumer_is_stopped(consumer, owned[i]))
			continue;
		SetCurrentStatementStartTimestamp();
		StartTransactionCommand();
		PushActiveSnapshot(GetTransactionSnapshot());
		moved = dwh_kafka_offsets_skip_to_end(topic, owned[i], delivered_next,
											  end);
		PopActiveSnapshot();
		CommitTransactionCommand();
		MemoryContextSwitchTo(loop_context);
		if (moved)
			ereport(DEBUG1,
					(errmsg_internal("Kafka partition %d: stored offset moved to the end of its log, " INT64_FORMAT ", past offsets that hold no message to apply",
									 owned[i], end)));
	}
}

static void
shutdown_consumer(int code, Datum arg)
{
	if (consumer != NULL)
	{
		dwh_kafka_consumer_destroy(consumer, true, waiting_for_broker);
		consumer = NULL;
	}
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

/*
 * dwh.status's last error says what keeps the worker from consuming now.
 * Each applied batch clears it; an idle worker with an error shown asks
 * the leader of a partition it owns, every few seconds, and clears it once
 * the broker answers.  A worker that owns none (more workers than
 * partitions) asks about partition 0: it has nothing to apply, and the
 * brokers answering is all its error was about.  (The log keeps every
 * error.)
 */
static void
probe_recovery(void)
{
	int32	   *owned;
	int32		partition = 0;

	if (!dwh_status_has_error(slot) ||
		!TimestampDifferenceExceeds(last_recovery_probe, GetCurrentTimestamp(),
									RECOVERY_PROBE_MS))
		return;
	last_recovery_probe = GetCurrentTimestamp();
	if (dwh_kafka_consumer_assignment(consumer, &owned) > 0)
		partition = owned[0];
	ereport(DEBUG1,
			(errmsg("dwh kafka worker %d asks the leader of partition %d whether the brokers answer",
					worker_index, partition)));

	/*
	 * A generous deadline: a loaded broker or machine answers in more than a
	 * few hundred milliseconds, and a probe that times out leaves the error
	 * shown for good on a worker with nothing to apply.
	 */
	if (dwh_kafka_consumer_leader_answers(consumer, partition, 2000))
	{
		dwh_status_clear_error(slot);
		broker_answered();
	}
}

/*
 * Reload the configuration.  Another database means another process
 * (dwh_worker_reload); other Kafka settings mean another consumer.
 * Gathered messages are dropped: they are not applied yet, so they will be
 * fetched again.
 */
static void
process_reload(void)
{
	char	   *settings;

	if (!dwh_worker_reload())
		return;

	settings = current_consumer_settings();
	if (consumer_settings == NULL || strcmp(settings, consumer_settings) != 0)
	{
		if (consumer != NULL)
			ereport(LOG,
					(errmsg("Kafka settings changed, reconnecting")));
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
 * Are extension dwh and the offsets table there?  The catalog lookups run
 * in a transaction of their own.
 */
static bool
kafka_tables_present(void)
{
	bool		installed;
	MemoryContext caller = CurrentMemoryContext;

	StartTransactionCommand();
	extension_oid = get_extension_oid("dwh", true);
	installed = OidIsValid(extension_oid) &&
		OidIsValid(get_relname_relid("kafka_offsets",
									 get_namespace_oid("dwh", true)));
	CommitTransactionCommand();
	MemoryContextSwitchTo(caller);
	return installed;
}

/*
 * Is the extension the one the partitions were started for?  Asked between
 * batches (a batch asks in its own transaction): a worker with nothing to
 * apply would otherwise keep its positions into a new extension.
 */
static bool
extension_unchanged(void)
{
	Oid			now;

	StartTransactionCommand();
	now = get_extension_oid("dwh", true);
	CommitTransactionCommand();
	MemoryContextSwitchTo(loop_context);
	if (now == extension_oid)
		return true;
	ereport(LOG,
			(errmsg("extension dwh was dropped or created again since this worker started its partitions"),
			 errdetail("The worker starts them again from the offsets stored now.")));
	return false;
}

/*
 * Can the worker consume?  Publishes why not.
 */
static bool
ready_to_consume(void)
{
	if (dwh_kafka_brokers[0] == '\0')
	{
		/* Told to do nothing: no error keeps the worker from its work. */
		dwh_status_clear_error(slot);
		dwh_worker_set_state_logged("idle: dwh.kafka_brokers is empty", NULL);
		return false;
	}
	return dwh_worker_ready(kafka_tables_present);
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
				 errmsg("could not create the Kafka consumer"),
				 errdetail_internal("%s", error),
				 errhint("Correct the Kafka settings and reload the configuration.")));
		/* Logged just now: only a change of state is logged next. */
		(void) dwh_worker_note_logged("waiting: invalid Kafka settings");
		dwh_status_set_state(slot, "waiting: invalid Kafka settings");
		return false;
	}
	dwh_worker_forget_logged();
	dwh_status_set_state(slot, "consuming");
	return true;
}

/*
 * With dwh.kafka_start_offset = latest, the partitions with no offset
 * stored start at the end of their logs as the broker reports it now, and
 * that offset is stored before anything is fetched: left to librdkafka's
 * "end", it was resolved again at every start of the partition (a
 * reconnection, a crash) until a batch stored an offset, later each time,
 * and what had arrived meanwhile was never applied, with no gap recorded.
 */
static void
store_latest_starts(const int32 *partitions, int n, int64 *offsets,
					const bool *stopped)
{
	const char *topic = dwh_kafka_consumer_topic(consumer);
	MemoryContext caller = CurrentMemoryContext;
	int64	   *ends;
	bool		any = false;
	int			i;

	if (dwh_kafka_start_offset != DWH_KAFKA_START_LATEST)
		return;
	ends = palloc(sizeof(int64) * Max(n, 1));
	for (i = 0; i < n; i++)
	{
		char		error[256];
		int64		low;

		if (offsets[i] != DWH_NO_OFFSET || stopped[i])
			continue;
		if (!dwh_kafka_consumer_query_watermarks(consumer, partitions[i], &low,
												 &ends[i], 3000, error,
												 sizeof(error)))
			ereport(ERROR,
					(errcode(ERRCODE_CONNECTION_FAILURE),
					 errmsg("could not find where Kafka partition %d of topic \"%s\" ends",
							partitions[i], topic),
					 errdetail("The Kafka client library reported: %s.  With dwh.kafka_start_offset \"latest\", a partition with no offset stored starts at the end of its log, stored before anything is fetched; the worker tries again.",
							   error)));
		any = true;
	}
	if (!any)
		return;
	StartTransactionCommand();
	PushActiveSnapshot(GetTransactionSnapshot());
	for (i = 0; i < n; i++)
		if (offsets[i] == DWH_NO_OFFSET && !stopped[i])
			offsets[i] = dwh_kafka_offsets_start_at(topic, partitions[i], ends[i]);
	PopActiveSnapshot();
	CommitTransactionCommand();
	MemoryContextSwitchTo(caller);
}

/*
 * Where the (sorted) partitions start: their stored offsets, or the
 * message applied last where it is known, to check that the log is the one
 * read (dwh_kafka_verify.c); whether each is stopped at a gap.
 */
static void
look_up_offsets(const int32 *partitions, int n, int64 *offsets, bool *stopped)
{
	DwhKafkaLastApplied *last = palloc(sizeof(DwhKafkaLastApplied) * Max(n, 1));
	MemoryContext caller = CurrentMemoryContext;

	StartTransactionCommand();
	PushActiveSnapshot(GetTransactionSnapshot());
	dwh_kafka_offsets_lookup(dwh_kafka_consumer_topic(consumer), partitions, n,
							 offsets, stopped, last);
	PopActiveSnapshot();
	CommitTransactionCommand();
	MemoryContextSwitchTo(caller);
	store_latest_starts(partitions, n, offsets, stopped);
	dwh_kafka_verify_start(partitions, offsets, stopped, last, n);
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
		bool	   *stopped = palloc(sizeof(bool) * Max(pending_n, 1));

		look_up_offsets(pending_partitions, pending_n, offsets, stopped);
		dwh_kafka_consumer_assign(consumer, offsets, stopped);
		broker_answered();
	}
	else
	{
		batch_drop_partitions(pending_partitions, pending_n);
		forget_gaps(pending_partitions, pending_n);
		dwh_kafka_verify_forget(pending_partitions, pending_n);
		dwh_kafka_consumer_revoke(consumer);
	}
	pending_rebalance = DWH_KAFKA_NOTHING;
	in_group = true;

	n_owned = dwh_kafka_consumer_assignment(consumer, &owned);
	dwh_status_set_assigned(slot, owned, n_owned);
	ereport(DEBUG1,
			(errmsg("dwh kafka worker %d now owns %d partitions",
					worker_index, n_owned)));
}

/*
 * Start every owned partition again at its stored offset, pausing those
 * stopped at a gap.  What was gathered and not applied is dropped: it is
 * fetched again from the stored offsets.
 */
static void
reassign_owned(void)
{
	int32	   *owned;
	int			n_owned = dwh_kafka_consumer_assignment(consumer, &owned);
	int64	   *offsets = palloc(sizeof(int64) * Max(n_owned, 1));
	bool	   *stopped = palloc(sizeof(bool) * Max(n_owned, 1));

	batch_clear();
	look_up_offsets(owned, n_owned, offsets, stopped);
	dwh_kafka_consumer_reassign(consumer, offsets, stopped);
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
	MemoryContext caller = CurrentMemoryContext;

	if (n_owned == 0)
		return;
	StartTransactionCommand();
	PushActiveSnapshot(GetTransactionSnapshot());
	/* The partitions and offsets taken outlive the transaction. */
	MemoryContextSwitchTo(caller);
	n = dwh_kafka_offsets_take_seeks(dwh_kafka_consumer_topic(consumer),
									 owned, n_owned, &parts, &offsets);
	PopActiveSnapshot();
	CommitTransactionCommand();
	MemoryContextSwitchTo(caller);

	batch_drop_partitions(parts, n);
	dwh_kafka_verify_forget(parts, n);
	for (i = 0; i < n; i++)
		ereport(LOG,
				(errmsg("Kafka partition %d moved to offset " INT64_FORMAT,
						parts[i], offsets[i])));

	/*
	 * librdkafka does not seek a partition that is not fetching: one stopped
	 * at a gap is started again by a new assignment.
	 */
	for (i = 0; i < n; i++)
		if (dwh_kafka_consumer_is_stopped(consumer, parts[i]))
		{
			reassign_owned();
			return;
		}
	for (i = 0; i < n; i++)
		dwh_kafka_consumer_seek(consumer, parts[i], offsets[i]);
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
 * The message of partition with the greatest offset below below, that the
 * batch holds or knows from the batch before, into *last (its offset
 * DWH_NO_OFFSET if there is none).  Every such message was applied when
 * below is where the partition's offset is stored.
 */
static void
find_last_applied(int32 partition, int64 below, DwhKafkaLastApplied *last)
{
	const DwhIngestItem *found = NULL;
	int			known = -1;
	int			i;

	last->offset = DWH_NO_OFFSET;
	for (i = 0; i < batch.n; i++)
	{
		DwhIngestItem *item = &batch.items[i];

		if (item->partition == partition && item->offset < below &&
			item->offset > last->offset)
		{
			found = item;
			last->offset = item->offset;
		}
	}
	for (i = 0; i < batch.n_known; i++)
		if (batch.known[i].partition == partition &&
			batch.known[i].message.offset < below &&
			batch.known[i].message.offset > last->offset)
		{
			known = i;
			last->offset = batch.known[i].message.offset;
		}
	if (known >= 0)
		*last = batch.known[known].message;
	else if (found != NULL)
		dwh_sha256(found->data, found->len, last->sha256);
}

/*
 * The message applied last below each partition's next offset: what the
 * partition's check compares when it starts again (dwh_kafka_verify.c).
 */
static void
last_applied(const int32 *partitions, const int64 *next_offsets, int n,
			 DwhKafkaLastApplied *last)
{
	int			i;

	for (i = 0; i < n; i++)
		find_last_applied(partitions[i], next_offsets[i], &last[i]);
}

/*
 * Apply items[0..n-1] in one transaction with their offsets: the messages
 * not applied yet, of partitions neither moved nor stopped meanwhile.  With
 * deferred, the orders another worker is applying are left out
 * (deferred[i] set for their messages) and each partition's offset is
 * stored only up to its first message left out, so that a crash before
 * they are applied fetches them again.  An offset stored is at least the
 * one after[] gives for its partition (of after_parts[0..n_after-1]): the
 * batch before applied the messages up to it, but for those it left to this
 * one.  Returns in next_parts[0..*n_next-1] and next[] the offsets that
 * follow the messages applied or left out, and those after[] gives.
 */
static void
apply_in_transaction(const char *topic, DwhIngestItem *items, int n,
					 bool *deferred, const int32 *after_parts,
					 const int64 *after, int n_after,
					 DwhIngestResult *result, int32 *next_parts, int64 *next,
					 int *n_next, bool *any_seek)
{
	int32	   *parts = palloc(sizeof(int32) * n);
	int64	   *stored = palloc(sizeof(int64) * n);
	bool	   *seek = palloc(sizeof(bool) * n);
	bool	   *stopped = palloc(sizeof(bool) * n);
	int64	   *upto = palloc(sizeof(int64) * n);
	DwhKafkaLastApplied *last = palloc(sizeof(DwhKafkaLastApplied) * n);
	DwhIngestItem *keep = palloc(sizeof(DwhIngestItem) * n);
	int		   *kept_from = palloc(sizeof(int) * n);
	bool	   *kept_deferred = palloc0(sizeof(bool) * n);
	int32	   *store_parts = palloc(sizeof(int32) * n);
	int			n_parts = 0;
	int			n_keep = 0;
	int			n_store;
	int			i;

	for (i = 0; i < n; i++)
		if (partition_index(parts, n_parts, items[i].partition) < 0)
			parts[n_parts++] = items[i].partition;
	qsort(parts, n_parts, sizeof(int32), compare_int32);

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	PushActiveSnapshot(GetTransactionSnapshot());
	pgstat_report_activity(STATE_RUNNING, "dwh: applying a Kafka batch");
	dwh_require_safe_schemas();
	if (get_extension_oid("dwh", true) != extension_oid)
	{
		extension_replaced = true;
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("extension dwh was created again since this worker started its partitions"),
				 errdetail("The worker starts them again from the offsets stored now.")));
	}

	/* Lock the partitions' rows, then keep only what is not applied yet. */
	dwh_kafka_offsets_lock(topic, parts, n_parts, stored, seek, stopped);
	for (i = 0; i < n_parts; i++)
	{
		next[i] = -1;
		*any_seek = *any_seek || seek[i];
	}
	for (i = 0; i < n; i++)
	{
		int			p = partition_index(parts, n_parts, items[i].partition);

		/* Moved meanwhile, or stopped at a gap: not from here. */
		if (seek[p] || stopped[p] || (stored[p] != DWH_NO_OFFSET &&
									  items[i].offset < stored[p]))
			continue;
		kept_from[n_keep] = i;
		keep[n_keep++] = items[i];
		next[p] = Max(next[p], items[i].offset + 1);
	}

	if (deferred != NULL)
	{
		memset(deferred, 0, sizeof(bool) * n);
		dwh_ingest_batch_deferring(keep, n_keep, topic, worker_index,
								   kept_deferred, result);
	}
	else
		dwh_ingest_batch(keep, n_keep, "kafka", topic, result);

	/*
	 * Stored up to the first message left out, or past the last one, or past
	 * what the batch before applied.
	 */
	for (i = 0; i < n_after; i++)
	{
		int			p = partition_index(parts, n_parts, after_parts[i]);

		if (p >= 0 && next[p] >= 0)
			next[p] = Max(next[p], after[i]);
	}
	for (i = 0; i < n_parts; i++)
		upto[i] = next[i];
	for (i = 0; i < n_keep; i++)
	{
		int			p = partition_index(parts, n_parts, keep[i].partition);

		if (!kept_deferred[i])
			continue;
		deferred[kept_from[i]] = true;
		upto[p] = Min(upto[p], keep[i].offset);
	}

	/*
	 * An offset that does not move is not stored again: its message's SHA-256
	 * may be that of a batch gone (the first message of a partition left for
	 * the next batch).
	 */
	*n_next = 0;
	n_store = 0;
	for (i = 0; i < n_parts; i++)
	{
		if (next[i] < 0)
			continue;
		next_parts[*n_next] = parts[i];
		next[(*n_next)++] = next[i];
		if (upto[i] == stored[i])
			continue;
		store_parts[n_store] = parts[i];
		upto[n_store++] = upto[i];
	}
	last_applied(store_parts, upto, n_store, last);
	dwh_kafka_offsets_store(topic, store_parts, upto, last, n_store);

	PopActiveSnapshot();
	CommitTransactionCommand();
	MemoryContextSwitchTo(loop_context);
	pgstat_report_activity(STATE_IDLE, NULL);
	/* Publish the row counts, or autovacuum never sees this worker's. */
	pgstat_report_stat(false);
}

/*
 * Keep in the batch, for the next transaction, the messages of deferred[]
 * (orders another worker was applying), in a memory context of their own,
 * with the floors of the partitions (next_parts[0..n_next-1], next[]: the
 * offsets that follow the batch just applied, the floors before included)
 * and the messages that an offset stored later may follow (their offsets
 * and SHA-256): the last one below each floor and below each message
 * kept.
 */
static void
carry_deferred(const bool *deferred, int n_deferred, const int32 *next_parts,
			   const int64 *next, int n_next)
{
	MemoryContext context;
	int			capacity = BATCH_INITIAL_CAPACITY;
	DwhIngestItem *items;
	int			n = 0;
	bool		again = false;
	int			n_known = 0;
	KnownMessage *known;
	int32	   *floor_parts;
	int64	   *floors;
	int			max_known = n_next + n_deferred;
	int			i;

	context = AllocSetContextCreate(TopMemoryContext, "dwh kafka batch",
									ALLOCSET_DEFAULT_SIZES);
	items = MemoryContextAlloc(context, sizeof(DwhIngestItem) * Max(capacity, n_deferred));
	known = MemoryContextAlloc(context, sizeof(KnownMessage) * Max(max_known, 1));
	floor_parts = MemoryContextAlloc(context, sizeof(int32) * Max(n_next, 1));
	floors = MemoryContextAlloc(context, sizeof(int64) * Max(n_next, 1));

	for (i = 0; i < n_next; i++)
	{
		floor_parts[i] = next_parts[i];
		floors[i] = next[i];
		known[n_known].partition = floor_parts[i];
		find_last_applied(floor_parts[i], floors[i], &known[n_known].message);
		if (known[n_known].message.offset != DWH_NO_OFFSET)
			n_known++;
	}
	for (i = 0; i < batch.n; i++)
	{
		DwhIngestItem *item = &batch.items[i];
		char	   *data;

		if (!deferred[i])
			continue;
		again = again || i < batch.carried;
		known[n_known].partition = item->partition;
		find_last_applied(item->partition, item->offset, &known[n_known].message);
		if (known[n_known].message.offset != DWH_NO_OFFSET)
			n_known++;
		data = MemoryContextAlloc(context, Max(item->len, 1));
		memcpy(data, item->data, item->len);
		items[n] = *item;
		items[n++].data = data;
	}
	Assert(n == n_deferred);

	MemoryContextDelete(batch.context);
	batch.context = context;
	batch.items = items;
	batch.capacity = Max(capacity, n);
	batch.n = n;
	batch.bytes = 0;
	for (i = 0; i < n; i++)
		batch.bytes += items[i].len;
	batch.first_at = GetCurrentTimestamp();
	batch.carried = n;
	batch.carry_rounds = again ? batch.carry_rounds + 1 : 1;
	batch.n_floors = n_next;
	batch.floor_parts = floor_parts;
	batch.floors = floors;
	batch.n_known = n_known;
	batch.known = known;
	ereport(DEBUG1,
			(errmsg_internal("%d messages of orders another worker is applying kept for the next batch",
							 n)));
}

/*
 * Apply the gathered batch in one transaction with its offsets, but for
 * the orders another worker is applying right now (dwh_inflight.c): their
 * messages stay for the next batch, rather than make this one wait on
 * their rows for that worker's commit.  A batch after MAX_CARRY_ROUNDS in
 * a row that left some leaves none: two workers cannot keep leaving the
 * same order to each other.  Nor does a batch applied before a gap is
 * recorded (leave_none): the gap starts at the stored offset, and the
 * broker may no longer hold a message left for later.
 */
static void
apply_batch(bool leave_none)
{
	const char *topic = dwh_kafka_consumer_topic(consumer);
	bool	   *deferred = palloc0(sizeof(bool) * batch.n);
	int32	   *next_parts = palloc(sizeof(int32) * batch.n);
	int64	   *next = palloc(sizeof(int64) * batch.n);
	int			n_next = 0;
	bool		any_seek = false;
	DwhIngestResult result;
	TimestampTz started = GetCurrentTimestamp();

	apply_in_transaction(topic, batch.items, batch.n,
						 batch.carry_rounds < MAX_CARRY_ROUNDS && !leave_none ? deferred : NULL,
						 batch.floor_parts, batch.floors, batch.n_floors,
						 &result, next_parts, next, &n_next, &any_seek);
	dwh_inflight_clear(worker_index);

	dwh_status_count_batch(slot, result.received - result.deferred,
						   result.dead_lettered, started);
	/* Applied: an earlier error no longer holds (the log keeps it). */
	dwh_status_clear_error(slot);
	dwh_kafka_consumer_commit(consumer, next_parts, next, n_next);
	dwh_kafka_consumer_publish_watermarks(consumer);
	if (result.deferred > 0)
		carry_deferred(deferred, result.deferred, next_parts, next, n_next);
	else
		batch_clear();
	backoff_ms = 0;
	if (any_seek)
		serve_seeks();
}

/*
 * Say what was done about a gap, once its transaction is committed: a
 * recorded gap is a WARNING, whatever dwh.kafka_on_gap says.  fetched is
 * the offset whose fetch found it (for a replaced log: where it holds
 * another message than the one applied).
 */
static void
report_gap(const char *topic, int32 partition, DwhKafkaGapOutcome outcome,
		   bool replaced, int64 fetched, const DwhKafkaGap *gap)
{
	bool		stop = (outcome == DWH_GAP_STOPPED);
	char	   *then;

	if (outcome != DWH_GAP_SKIPPED && outcome != DWH_GAP_STOPPED)
	{
		ereport(outcome == DWH_GAP_NONE ? LOG : DEBUG1,
				(errmsg("Kafka partition %d of topic \"%s\" starts again at its stored offset " INT64_FORMAT,
						partition, topic, gap->next_offset),
				 errdetail("The broker holds offsets " INT64_FORMAT " to " INT64_FORMAT ".",
						   gap->log_start_offset, gap->log_end_offset - 1)));
		return;
	}

	if (stop)
		then = pstrdup("dwh.kafka_on_gap is \"stop\": the partition is not consumed until it is moved. The gap is recorded in dwh.kafka_gaps.");
	else
		then = psprintf("Consumption goes on from offset " INT64_FORMAT ". The gap is recorded in dwh.kafka_gaps.",
						gap->log_start_offset);

	if (replaced)
		ereport(WARNING,
				(errmsg("Kafka partition %d of topic \"%s\" is not the log its stored offset " INT64_FORMAT " was read from",
						partition, topic, gap->next_offset),
				 errdetail("The broker holds another message at offset " INT64_FORMAT " than the one applied there: the topic was recreated. Its log holds offsets " INT64_FORMAT " to " INT64_FORMAT ". %s",
						   fetched, gap->log_start_offset,
						   gap->log_end_offset - 1, then),
				 stop ? errhint("Move the partition with dwh.kafka_seek(%d, " INT64_FORMAT ") to read what the broker holds.",
								partition, gap->log_start_offset) : 0));
	else if (gap->next_offset < gap->log_start_offset)
		ereport(WARNING,
				(errmsg("offsets " INT64_FORMAT " to " INT64_FORMAT " of Kafka partition %d of topic \"%s\" can no longer be read",
						gap->next_offset, gap->log_start_offset - 1,
						partition, topic),
				 errdetail("The broker's log of the partition now starts at offset " INT64_FORMAT " (retention or deleted records). %s",
						   gap->log_start_offset, then),
				 stop ? errhint("Move the partition with dwh.kafka_seek(%d, " INT64_FORMAT ") to go on from the first offset the broker holds.",
								partition, gap->log_start_offset) : 0));
	else
		ereport(WARNING,
				(errmsg("Kafka partition %d of topic \"%s\" ends before its stored offset " INT64_FORMAT,
						partition, topic, gap->next_offset),
				 errdetail("The broker's log of the partition ends at offset " INT64_FORMAT ": the topic was recreated or truncated. %s",
						   gap->log_end_offset, then),
				 stop ? errhint("Move the partition with dwh.kafka_seek(%d, " INT64_FORMAT ") to read what the broker holds.",
								partition, gap->log_start_offset) : 0));
}

/*
 * Serve the pending gaps: apply all that was gathered before them, leaving
 * nothing for later (so that the stored offsets are where the stream
 * broke), record each in one transaction with the offsets it moves, then
 * start the partitions that go on again from the stored offsets.  Any
 * error leaves the gaps pending.
 */
static void
serve_gaps(void)
{
	const char *topic = dwh_kafka_consumer_topic(consumer);
	DwhKafkaGapOutcome *outcomes;
	DwhKafkaGap *gaps;
	bool		restart = false;
	int			n;
	int			i;

	if (GetCurrentTimestamp() < gaps_not_before)
		return;
	if (batch.n > 0)
		apply_batch(true);

	/* The broker's watermarks, when the failed fetch did not carry them. */
	for (i = 0; i < n_pending_gaps; i++)
	{
		PendingGap *g = &pending_gaps[i];
		char		error[256];

		if (g->low >= 0 && g->high >= 0)
			continue;
		if (!dwh_kafka_consumer_query_watermarks(consumer, g->partition,
												 &g->low, &g->high, 3000,
												 error, sizeof(error)))
		{
			dwh_status_set_error(slot, "could not read the watermarks of partition %d: %s",
								 g->partition, error);
			ereport(LOG,
					(errcode(ERRCODE_CONNECTION_FAILURE),
					 errmsg("could not read the watermarks of Kafka partition %d of topic \"%s\"",
							g->partition, topic),
					 errdetail("The Kafka client library reported: %s.  The partition's stored offset is out of range; the worker tries again.",
							   error)));
			gaps_not_before = TimestampTzPlusMilliseconds(GetCurrentTimestamp(),
														  GAP_RETRY_MS);
			return;
		}
	}

	n = n_pending_gaps;
	outcomes = palloc(sizeof(DwhKafkaGapOutcome) * Max(n, 1));
	gaps = palloc(sizeof(DwhKafkaGap) * Max(n, 1));
	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	PushActiveSnapshot(GetTransactionSnapshot());
	pgstat_report_activity(STATE_RUNNING, "dwh: recording a Kafka gap");
	for (i = 0; i < n; i++)
		outcomes[i] = dwh_kafka_offsets_gap(topic, pending_gaps[i].partition,
											pending_gaps[i].offset,
											DWH_NO_OFFSET,
											pending_gaps[i].low,
											pending_gaps[i].high,
											pending_gaps[i].replaced,
											dwh_kafka_on_gap == DWH_KAFKA_GAP_STOP,
											&gaps[i]);
	PopActiveSnapshot();
	CommitTransactionCommand();
	MemoryContextSwitchTo(loop_context);
	pgstat_report_activity(STATE_IDLE, NULL);

	/*
	 * A partition that stops stays as librdkafka left it, not fetching; the
	 * others are started again where their rows say.
	 */
	for (i = 0; i < n; i++)
	{
		report_gap(topic, pending_gaps[i].partition, outcomes[i],
				   pending_gaps[i].replaced, pending_gaps[i].offset, &gaps[i]);
		if (outcomes[i] == DWH_GAP_STOPPED || outcomes[i] == DWH_GAP_STILL_STOPPED)
		{
			dwh_kafka_consumer_stop(consumer, pending_gaps[i].partition);
			/* Fetched no more: its watermarks are the broker's answer. */
			if (gaps[i].log_end_offset >= 0)
				dwh_status_set_watermark(topic, pending_gaps[i].partition,
										 gaps[i].log_start_offset,
										 gaps[i].log_end_offset, worker_index);
		}
		else
			restart = true;
	}
	n_pending_gaps = 0;
	if (restart)
		reassign_owned();
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

/* How long the batch may wait for more messages (ms). */
static int
batch_wait_ms(void)
{
	if (batch.carried == batch.n)
		return Max(dwh_kafka_batch_wait, CARRY_RETRY_MS);
	return dwh_kafka_batch_wait;
}

/*
 * A batch is full at dwh.kafka_batch_size messages or at an eighth of
 * dwh.kafka_prefetch_memory of data.  librdkafka refills its queue as fast
 * as the batch takes from it, so only this bounds the batch; and applying
 * a batch takes about sixteen times its data in memory (the parsed values,
 * the statements' arrays and plans, the triggers' queues), about twice
 * the prefetch memory at this share.
 */
#define BATCH_PREFETCH_SHARE 8

static bool
batch_full(void)
{
	return batch.n >= dwh_kafka_batch_size ||
		batch.bytes >= (int64) dwh_kafka_prefetch_memory * 1024 / BATCH_PREFETCH_SHARE;
}

static bool
batch_due(void)
{
	if (batch.n == 0)
		return false;
	return batch_full() ||
		TimestampDifferenceExceeds(batch.first_at, GetCurrentTimestamp(),
								   batch_wait_ms());
}

/*
 * Serve the queue until it is empty, the batch is full or a rebalance
 * needs the database.
 */
static void
gather_events(void)
{
	for (;;)
	{
		DwhKafkaEvent ev;
		MemoryContext old;

		CHECK_FOR_INTERRUPTS();
		if (batch_full())
			return;

		old = MemoryContextSwitchTo(batch.context);
		dwh_kafka_consumer_poll(consumer, &ev);
		MemoryContextSwitchTo(old);

		switch (ev.kind)
		{
			case DWH_KAFKA_NOTHING:
				return;
			case DWH_KAFKA_MESSAGE:
				broker_answered();
				switch (dwh_kafka_verify_message(ev.partition, ev.offset,
												 ev.data, ev.len))
				{
					case DWH_VERIFY_NONE:
						batch_add(&ev);
						break;
					case DWH_VERIFY_DROP:
						break;
					case DWH_VERIFY_REPLACED:
						add_gap(&ev, true);
						return;
				}
				break;
			case DWH_KAFKA_OUT_OF_RANGE:
				dwh_kafka_verify_out_of_range(ev.partition, ev.offset);
				add_gap(&ev, false);
				broker_answered();
				return;
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
						 errmsg("Kafka consumer error"),
						 errdetail_internal("%s", ev.error)));
				break;
			case DWH_KAFKA_FATAL:
				dwh_status_set_error(slot, "%s", ev.error);
				ereport(LOG,
						(errcode(ERRCODE_CONNECTION_FAILURE),
						 errmsg("fatal Kafka consumer error, reconnecting"),
						 errdetail_internal("%s", ev.error)));
				drop_consumer();
				backoff_ms = DWH_WORKER_BACKOFF_MAX_MS;
				return;
		}
	}
}

/*
 * An event taken from the client is gone from it: an ERROR before it
 * reached the batch (out of memory copying a message) would lose it, and
 * the worker would store offsets past it.  So the recovery from an error
 * while gathering drops the consumer, and the partitions start again from
 * their stored offsets.
 */
static bool gathering = false;

static void
gather(void)
{
	gathering = true;
	gather_events();
	gathering = false;
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
	slot = dwh_worker_start(DWH_WORKER_KAFKA, worker_index);
	/* A predecessor that exited in the middle of a batch left its marks. */
	dwh_inflight_clear(worker_index);

	batch.context = AllocSetContextCreate(TopMemoryContext, "dwh kafka batch",
										  ALLOCSET_DEFAULT_SIZES);
	batch_clear();
	/* Created once: an error comes back to the sigsetjmp below. */
	loop_context = AllocSetContextCreate(TopMemoryContext, "dwh kafka loop",
										 ALLOCSET_DEFAULT_SIZES);
	consumer_settings = current_consumer_settings();
	before_shmem_exit(shutdown_consumer, (Datum) 0);

	if (sigsetjmp(local_sigjmp_buf, 1) != 0)
	{
		/*
		 * The batch is kept, and retried as it is after the backoff; after an
		 * error while gathering, the partitions start again (gather()).
		 */
		dwh_worker_recover(&backoff_ms);
		if (gathering || extension_replaced)
		{
			gathering = false;
			extension_replaced = false;
			drop_consumer();
		}
		dwh_inflight_clear(worker_index);
		ready_checked = false;
		dwh_worker_backoff(backoff_ms);
	}
	PG_exception_stack = &local_sigjmp_buf;

	for (;;)
	{
		int			rejoin_ms;

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
				dwh_worker_wait(DWH_WORKER_RECHECK_MS);
				continue;
			}
			ready_checked = true;
		}
		if (consumer == NULL)
		{
			long		rejoin_wait = TimestampDifferenceMilliseconds(GetCurrentTimestamp(),
																	  rejoin_not_before);

			if (backoff_ms > 0 || rejoin_wait > 0)
			{
				dwh_worker_backoff(Max(backoff_ms, rejoin_wait));
				backoff_ms = 0;
				continue;
			}
			if (!connect_consumer())
			{
				/* Wait for a reload that corrects the settings. */
				dwh_worker_wait_for_signal();
				continue;
			}
		}

		if (pending_rebalance != DWH_KAFKA_NOTHING)
		{
			serve_rebalance();
			continue;
		}
		if (n_pending_gaps > 0 && GetCurrentTimestamp() >= gaps_not_before)
		{
			serve_gaps();
			continue;
		}
		if (dwh_status_take_offsets_changed(slot))
			serve_seeks();

		gather();
		if (consumer == NULL || pending_rebalance != DWH_KAFKA_NOTHING)
			continue;
		/* A gap to serve now: the queue may hold more, so no sleep. */
		if (n_pending_gaps > 0 && GetCurrentTimestamp() >= gaps_not_before)
			continue;

		/*
		 * One worker compares the topic's partitions with the group's
		 * assignment (every 10 s, busy or not), once it is in the group.
		 * Leaving the group drops what was gathered: it is fetched again.
		 */
		if (worker_index == 1 && in_group && !waiting_for_broker &&
			(rejoin_ms = dwh_kafka_partitions_check(consumer, worker_index)) > 0)
		{
			drop_consumer();
			dwh_status_set_state(slot, "rejoining the consumer group");
			rejoin_not_before = TimestampTzPlusMilliseconds(GetCurrentTimestamp(),
															rejoin_ms);
			continue;
		}

		if (batch_due())
		{
			apply_batch(false);
			dwh_status_set_state(slot, "consuming");
			waiting_for_broker = false;
			continue;
		}

		if (TimestampDifferenceExceeds(last_watermarks, GetCurrentTimestamp(),
									   WATERMARK_INTERVAL_MS))
		{
			if (!extension_unchanged())
			{
				drop_consumer();
				ready_checked = false;
				continue;
			}

			/*
			 * librdkafka's last known watermarks: no news while the brokers
			 * are down, so their age (watermark_at) grows meanwhile.
			 */
			if (!waiting_for_broker)
			{
				dwh_kafka_consumer_publish_watermarks(consumer);
				find_short_logs();
				if (TimestampDifferenceExceeds(last_stopped_refresh,
											   GetCurrentTimestamp(),
											   STOPPED_REFRESH_MS))
				{
					dwh_kafka_consumer_refresh_stopped(consumer, 1000);
					last_stopped_refresh = GetCurrentTimestamp();
				}
			}
			last_watermarks = GetCurrentTimestamp();
			probe_recovery();
		}

		/* Nothing due: sleep until a message, a signal or the batch wait. */
		if (batch_full())
			continue;
		if (batch.n > 0)
		{
			long		elapsed = (long) ((GetCurrentTimestamp() - batch.first_at) / 1000);

			dwh_kafka_consumer_wait(consumer, Max(batch_wait_ms() - elapsed, 1));
		}
		else
		{
			/*
			 * Nothing kept to retry: whatever failed before (the offsets of
			 * an assignment, a seek) has gone through, so the next failure
			 * backs off from the start again, as one after an applied batch
			 * does.  (A gap being recorded is retried from its own rounds.)
			 */
			if (n_pending_gaps == 0)
			{
				backoff_ms = 0;
				skip_to_log_ends();
			}
			dwh_kafka_consumer_wait(consumer, WATERMARK_INTERVAL_MS);
		}
	}
}
