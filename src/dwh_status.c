/*-------------------------------------------------------------------------
 *
 * dwh_status.c
 *	  Shared memory where the background workers publish their state, and
 *	  the set-returning functions behind the dwh.status and
 *	  dwh.kafka_partitions views.
 *
 * Each worker owns one slot and is its only writer; readers copy a slot
 * under its lock, so a row never mixes two moments.  Nothing here is
 * durable: a server restart starts every counter from zero, while the
 * offsets that matter live in dwh.kafka_offsets.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "catalog/pg_type.h"
#include "commands/dbcommands.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "storage/ipc.h"
#include "storage/lwlock.h"
#include "storage/proc.h"
#include "storage/procarray.h"
#include "storage/shmem.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/timestamp.h"

#include "dwh_message.h"
#include "dwh_status.h"

static DwhSharedStatus *shared = NULL;

/* One lock a slot, and one for the watermarks. */
#define STATUS_TRANCHE "dwh status"

/*
 * dwh_status_shmem_request
 *		Reserve the shared memory (PG15: from shmem_request_hook only).
 */
void
dwh_status_shmem_request(void)
{
	RequestAddinShmemSpace(MAXALIGN(sizeof(DwhSharedStatus)));
	RequestNamedLWLockTranche(STATUS_TRANCHE, DWH_STATUS_SLOTS + 1);
}

/*
 * The workers that found no background worker slot when the postmaster
 * registered them (its own "too many background workers" names none).
 * Noted in the postmaster before shared memory exists, and shown in their
 * status slots whenever it is made, after a crash too.
 */
typedef struct UnregisteredWorker
{
	DwhWorkerKind kind;
	int			index;
} UnregisteredWorker;

static UnregisteredWorker unregistered[DWH_STATUS_SLOTS];
static int	n_unregistered = 0;

/* The status slot of worker number index (1-based) of a kind. */
static int
slot_number(DwhWorkerKind kind, int index)
{
	if (kind == DWH_WORKER_REDIS)
		return DWH_REDIS_SLOT;
	if (kind == DWH_WORKER_TAGS)
		return DWH_TAGS_SLOT;
	Assert(index >= 1 && index <= DWH_MAX_KAFKA_WORKERS);
	return index - 1;
}

/*
 * dwh_status_note_unregistered
 *		Remember that a worker could not be registered (in the postmaster).
 */
void
dwh_status_note_unregistered(DwhWorkerKind kind, int index)
{
	if (n_unregistered == DWH_STATUS_SLOTS)
		return;
	unregistered[n_unregistered].kind = kind;
	unregistered[n_unregistered].index = index;
	n_unregistered++;
}

/* Show the workers that could not be registered, in fresh shared memory. */
static void
publish_unregistered(void)
{
	TimestampTz now = GetCurrentTimestamp();
	int			i;

	for (i = 0; i < n_unregistered; i++)
	{
		DwhWorkerStatus *slot =
		&shared->workers[slot_number(unregistered[i].kind,
									 unregistered[i].index)];

		slot->kind = unregistered[i].kind;
		slot->index = unregistered[i].index;
		strlcpy(slot->state, "not started: no background worker slot was left",
				DWH_STATE_LEN);
		slot->state_since = now;
		snprintf(slot->last_error, DWH_ERROR_LEN,
				 "max_worker_processes (%d) left no background worker slot for this worker at server start; raise it and restart the server",
				 max_worker_processes);
		slot->last_error_at = now;
	}
}

/*
 * dwh_status_shmem_startup
 *		Create or attach to the shared status (from shmem_startup_hook).
 */
void
dwh_status_shmem_startup(void)
{
	bool		found;

	LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
	shared = ShmemInitStruct("dwh status", sizeof(DwhSharedStatus), &found);
	if (!found)
	{
		LWLockPadded *locks = GetNamedLWLockTranche(STATUS_TRANCHE);
		int			i;

		memset(shared, 0, sizeof(DwhSharedStatus));
		for (i = 0; i < DWH_STATUS_SLOTS; i++)
			shared->workers[i].lock = &locks[i].lock;
		shared->watermark_lock = &locks[DWH_STATUS_SLOTS].lock;
		publish_unregistered();
	}
	LWLockRelease(AddinShmemInitLock);
}

static void
ensure_shared(void)
{
	if (shared == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("dwh status is not available"),
				 errhint("Add dwh to shared_preload_libraries and restart the server.")));
}

/* Mark the slot stopped when its worker exits, whatever the reason. */
static void
detach_slot(int code, Datum arg)
{
	DwhWorkerStatus *slot = (DwhWorkerStatus *) DatumGetPointer(arg);
	TimestampTz now = GetCurrentTimestamp();

	LWLockAcquire(slot->lock, LW_EXCLUSIVE);
	slot->pid = 0;
	slot->n_assigned = 0;
	slot->database = InvalidOid;
	strlcpy(slot->state, "stopped", DWH_STATE_LEN);
	slot->state_since = now;
	LWLockRelease(slot->lock);
}

/*
 * dwh_status_attach
 *		Claim the slot of worker number index (1-based) of a kind.  Counters
 *		start from zero for each process; the last error is kept, so that a
 *		worker that died of it still shows why.
 */
DwhWorkerStatus *
dwh_status_attach(DwhWorkerKind kind, int index)
{
	DwhWorkerStatus *slot;
	TimestampTz now = GetCurrentTimestamp();

	ensure_shared();
	slot = &shared->workers[slot_number(kind, index)];

	LWLockAcquire(slot->lock, LW_EXCLUSIVE);
	slot->kind = kind;
	slot->index = index;
	slot->pid = MyProcPid;
	slot->started_at = now;
	strlcpy(slot->state, "starting", DWH_STATE_LEN);
	slot->state_since = slot->started_at;
	slot->n_assigned = 0;
	slot->database = InvalidOid;
	slot->messages = 0;
	slot->batches = 0;
	slot->dead_letters = 0;
	slot->apply_time = 0;
	slot->last_batch_at = 0;
	slot->keys_mirrored = 0;
	slot->keys_missing = 0;
	slot->refreshes = 0;
	slot->changes_found = 0;
	slot->expiry_passes = 0;
	slot->last_expiry_at = 0;
	slot->last_expiry_rules_moved = 0;
	slot->last_expiry_events = 0;
	slot->events_produced = 0;
	slot->events_pending = 0;
	slot->last_produced_at = 0;
	LWLockRelease(slot->lock);

	before_shmem_exit(detach_slot, PointerGetDatum(slot));
	return slot;
}

/*
 * dwh_status_set_state
 *		Publish what the worker is doing; the time is kept only when the
 *		state actually changes, so "since" tells how long it has been so.
 */
void
dwh_status_set_state(DwhWorkerStatus *slot, const char *fmt,...)
{
	char		buf[DWH_STATE_LEN];
	va_list		args;
	TimestampTz now = GetCurrentTimestamp();

	va_start(args, fmt);
	vsnprintf(buf, sizeof(buf), fmt, args);
	va_end(args);
	/* Read as text by dwh.status: never invalid, even when cut short. */
	dwh_valid_utf8_in_place(buf);

	LWLockAcquire(slot->lock, LW_EXCLUSIVE);
	if (strcmp(slot->state, buf) != 0)
	{
		strlcpy(slot->state, buf, DWH_STATE_LEN);
		slot->state_since = now;
	}
	LWLockRelease(slot->lock);
}

/*
 * dwh_status_set_error
 *		Publish the last error and its time.  Callers pass text that holds
 *		no secret (librdkafka and hiredis messages never carry passwords).
 *		Library and server texts may hold any bytes, and a long one is cut
 *		at DWH_ERROR_LEN: what dwh.status shows is made valid UTF-8.
 */
void
dwh_status_set_error(DwhWorkerStatus *slot, const char *fmt,...)
{
	char		buf[DWH_ERROR_LEN];
	va_list		args;
	TimestampTz now = GetCurrentTimestamp();

	va_start(args, fmt);
	vsnprintf(buf, sizeof(buf), fmt, args);
	va_end(args);
	dwh_valid_utf8_in_place(buf);

	LWLockAcquire(slot->lock, LW_EXCLUSIVE);
	strlcpy(slot->last_error, buf, DWH_ERROR_LEN);
	slot->last_error_at = now;
	LWLockRelease(slot->lock);
}

/*
 * dwh_status_has_error
 *		Does the slot show an error?
 */
bool
dwh_status_has_error(DwhWorkerStatus *slot)
{
	bool		has;

	LWLockAcquire(slot->lock, LW_SHARED);
	has = slot->last_error[0] != '\0';
	LWLockRelease(slot->lock);
	return has;
}

/*
 * dwh_status_set_database
 *		The database the worker is connected to (InvalidOid: none), so that
 *		dwh.status read in another one says which it serves.
 */
void
dwh_status_set_database(DwhWorkerStatus *slot, Oid database)
{
	LWLockAcquire(slot->lock, LW_EXCLUSIVE);
	slot->database = database;
	LWLockRelease(slot->lock);
}

/*
 * dwh_status_clear_error
 *		Forget the last error: the worker has recovered from it.  (The
 *		server log keeps every error.)
 */
void
dwh_status_clear_error(DwhWorkerStatus *slot)
{
	LWLockAcquire(slot->lock, LW_EXCLUSIVE);
	slot->last_error[0] = '\0';
	slot->last_error_at = 0;
	LWLockRelease(slot->lock);
}

/*
 * dwh_status_set_assigned
 *		Publish the partitions the worker now owns (sorted by the caller).
 */
void
dwh_status_set_assigned(DwhWorkerStatus *slot, const int32 *partitions, int n)
{
	LWLockAcquire(slot->lock, LW_EXCLUSIVE);
	slot->n_assigned = Min(n, DWH_MAX_PARTITIONS);
	memcpy(slot->assigned, partitions, sizeof(int32) * slot->n_assigned);
	LWLockRelease(slot->lock);
}

/*
 * dwh_status_owned_partitions
 *		Mark in owned[0..DWH_MAX_PARTITIONS) the partitions that some Kafka
 *		worker of this server owns now.
 */
void
dwh_status_owned_partitions(bool *owned)
{
	int			i;

	memset(owned, 0, sizeof(bool) * DWH_MAX_PARTITIONS);
	for (i = 0; i < DWH_MAX_KAFKA_WORKERS; i++)
	{
		DwhWorkerStatus *s = &shared->workers[i];
		int			j;

		LWLockAcquire(s->lock, LW_SHARED);
		if (s->kind == DWH_WORKER_KAFKA && s->pid != 0)
		{
			for (j = 0; j < s->n_assigned; j++)
				if (s->assigned[j] >= 0 && s->assigned[j] < DWH_MAX_PARTITIONS)
					owned[s->assigned[j]] = true;
		}
		LWLockRelease(s->lock);
	}
}

/*
 * dwh_status_count_batch
 *		Count a committed batch, whose transaction started at started.
 */
void
dwh_status_count_batch(DwhWorkerStatus *slot, int64 messages,
					   int64 dead_letters, TimestampTz started)
{
	TimestampTz now = GetCurrentTimestamp();

	LWLockAcquire(slot->lock, LW_EXCLUSIVE);
	slot->messages += messages;
	slot->dead_letters += dead_letters;
	slot->batches++;
	slot->apply_time += Max(now - started, 0);
	slot->last_batch_at = now;
	LWLockRelease(slot->lock);
}

/*
 * dwh_status_set_redis
 *		Publish the Redis worker's counters.
 */
void
dwh_status_set_redis(DwhWorkerStatus *slot, int64 keys_mirrored,
					 int64 keys_missing, int64 refreshes, int64 changes_found)
{
	LWLockAcquire(slot->lock, LW_EXCLUSIVE);
	slot->keys_mirrored = keys_mirrored;
	slot->keys_missing = keys_missing;
	slot->refreshes = refreshes;
	slot->changes_found = changes_found;
	LWLockRelease(slot->lock);
}

/*
 * dwh_status_count_expiry
 *		Count an expiry pass of the tags worker, committed just now.
 */
void
dwh_status_count_expiry(DwhWorkerStatus *slot, int rules_moved, int events)
{
	TimestampTz now = GetCurrentTimestamp();

	LWLockAcquire(slot->lock, LW_EXCLUSIVE);
	slot->expiry_passes++;
	slot->last_expiry_at = now;
	slot->last_expiry_rules_moved = rules_moved;
	slot->last_expiry_events = events;
	LWLockRelease(slot->lock);
}

/*
 * dwh_status_set_feed
 *		Publish the tags worker's Kafka feed: the events the broker has
 *		acknowledged since the worker started, and those still in the
 *		outbox.  The time of the last acknowledgement moves when produced
 *		grows.
 */
void
dwh_status_set_feed(DwhWorkerStatus *slot, int64 produced, int64 pending)
{
	TimestampTz now = GetCurrentTimestamp();

	LWLockAcquire(slot->lock, LW_EXCLUSIVE);
	if (produced != slot->events_produced)
		slot->last_produced_at = now;
	slot->events_produced = produced;
	slot->events_pending = pending;
	LWLockRelease(slot->lock);
}

/*
 * dwh_status_wake_kafka_workers
 *		Tell every running Kafka worker that stored offsets changed, and wake
 *		it.  Called after the change is committed, so that the worker sees it.
 */
void
dwh_status_wake_kafka_workers(void)
{
	int			i;

	if (shared == NULL)
		return;					/* loaded without the preload: no workers */
	for (i = 0; i < DWH_MAX_KAFKA_WORKERS; i++)
	{
		DwhWorkerStatus *slot = &shared->workers[i];
		int			pid;
		PGPROC	   *proc;

		LWLockAcquire(slot->lock, LW_EXCLUSIVE);
		pid = slot->pid;
		if (pid != 0)
			slot->offsets_changed = true;
		LWLockRelease(slot->lock);
		if (pid != 0 && (proc = BackendPidGetProc(pid)) != NULL)
			SetLatch(&proc->procLatch);
	}
}

/*
 * dwh_status_wake_tags_worker
 *		Wake the tags worker, if it runs (after a commit that queued tag
 *		events for Kafka).
 */
void
dwh_status_wake_tags_worker(void)
{
	DwhWorkerStatus *slot;
	PGPROC	   *proc;
	int			pid;

	if (shared == NULL)
		return;					/* loaded without the preload: no worker */
	slot = &shared->workers[DWH_TAGS_SLOT];
	LWLockAcquire(slot->lock, LW_EXCLUSIVE);
	pid = slot->pid;
	slot->events_queued = true;
	LWLockRelease(slot->lock);
	if (pid != 0 && (proc = BackendPidGetProc(pid)) != NULL)
		SetLatch(&proc->procLatch);
}

/*
 * Wake-ups asked for at the commit of this backend's transaction: what it
 * changed is visible to the workers by then (the commit's callbacks run
 * after the transaction has left the proc array); an abort or a prepare
 * forgets them (a prepared transaction's changes are found by the workers'
 * next look).  One callback, registered once and never removed: one that
 * unregistered itself would free the list item PostgreSQL 15 reads the
 * next callback from once it returns.
 */
static bool wake_kafka_at_commit = false;
static bool wake_tags_at_commit = false;

static void
wake_at_commit(XactEvent event, void *arg)
{
	bool		kafka = wake_kafka_at_commit;
	bool		tags = wake_tags_at_commit;

	if (event != XACT_EVENT_COMMIT && event != XACT_EVENT_ABORT &&
		event != XACT_EVENT_PREPARE)
		return;
	wake_kafka_at_commit = false;
	wake_tags_at_commit = false;
	if (event != XACT_EVENT_COMMIT)
		return;
	if (kafka)
		dwh_status_wake_kafka_workers();
	if (tags)
		dwh_status_wake_tags_worker();
}

/*
 * dwh_status_wake_at_commit
 *		Wake the Kafka workers (stored offsets changed) or the tags worker
 *		(tag events queued) when the current transaction commits.
 */
void
dwh_status_wake_at_commit(DwhWorkerKind kind)
{
	static bool registered = false;

	if (!registered)
	{
		RegisterXactCallback(wake_at_commit, NULL);
		registered = true;
	}
	if (kind == DWH_WORKER_KAFKA)
		wake_kafka_at_commit = true;
	else if (kind == DWH_WORKER_TAGS)
		wake_tags_at_commit = true;
	else
		elog(ERROR, "no wake-up at commit for worker kind %d", (int) kind);
}

/*
 * dwh_status_take_events_queued
 *		Did a transaction queue tag events since the last call?
 */
bool
dwh_status_take_events_queued(DwhWorkerStatus *slot)
{
	bool		queued;

	LWLockAcquire(slot->lock, LW_EXCLUSIVE);
	queued = slot->events_queued;
	slot->events_queued = false;
	LWLockRelease(slot->lock);
	return queued;
}

/*
 * dwh_status_take_offsets_changed
 *		Were stored offsets changed since the last call?
 */
bool
dwh_status_take_offsets_changed(DwhWorkerStatus *slot)
{
	bool		changed;

	LWLockAcquire(slot->lock, LW_EXCLUSIVE);
	changed = slot->offsets_changed;
	slot->offsets_changed = false;
	LWLockRelease(slot->lock);
	return changed;
}

/*
 * dwh_status_set_watermark
 *		Publish a partition's low and high watermarks as the broker last
 *		reported them.  A new topic forgets the old topic's partitions.
 */
void
dwh_status_set_watermark(const char *topic, int32 partition, int64 low,
						 int64 high, int worker)
{
	TimestampTz now = GetCurrentTimestamp();

	if (partition < 0 || partition >= DWH_MAX_PARTITIONS)
		return;
	LWLockAcquire(shared->watermark_lock, LW_EXCLUSIVE);
	if (strncmp(shared->watermark_topic, topic,
				sizeof(shared->watermark_topic)) != 0)
	{
		memset(shared->watermarks, 0, sizeof(shared->watermarks));
		strlcpy(shared->watermark_topic, topic,
				sizeof(shared->watermark_topic));
	}
	shared->watermarks[partition].low = low;
	shared->watermarks[partition].high = high;
	shared->watermarks[partition].observed_at = now;
	shared->watermarks[partition].worker = worker;
	LWLockRelease(shared->watermark_lock);
}

static Datum
timestamp_or_null(TimestampTz t, bool *isnull)
{
	*isnull = (t == 0);
	return TimestampTzGetDatum(t);
}

PG_FUNCTION_INFO_V1(dwh_worker_status);
PG_FUNCTION_INFO_V1(dwh_kafka_watermarks);

/* The columns of dwh.worker_status() as 1.1 declares it. */
#define STATUS_COLUMNS			26

/*
 * dwh.worker_status() returns setof record
 *
 * One row per worker slot ever used since the server started.  The row
 * has the columns that the SQL declaration asks for: 1.0 declares the first
 * 17 (a 1.0 schema served by this library until ALTER EXTENSION dwh
 * UPDATE), 1.1 all of them; tuplestore_putvalues() reads as many values
 * as the result's descriptor has columns.
 */
Datum
dwh_worker_status(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	int			i;

	InitMaterializedSRF(fcinfo, 0);
	if (rsinfo->setDesc->natts > STATUS_COLUMNS)
		elog(ERROR, "dwh.worker_status() declares %d columns, this library returns %d at most",
			 rsinfo->setDesc->natts, STATUS_COLUMNS);

	if (shared == NULL)
	{
		/* Loaded without the preload: no workers, and one row saying why. */
		Datum		values[STATUS_COLUMNS];
		bool		nulls[STATUS_COLUMNS];

		memset(nulls, true, sizeof(nulls));
		values[0] = CStringGetTextDatum("none");
		nulls[0] = false;
		values[3] = CStringGetTextDatum("not started: dwh is not in shared_preload_libraries");
		nulls[3] = false;
		values[14] = CStringGetTextDatum("The workers need dwh in shared_preload_libraries and a server restart; the SQL functions and triggers work without it.");
		nulls[14] = false;
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
		return (Datum) 0;
	}

	for (i = 0; i < DWH_STATUS_SLOTS; i++)
	{
		DwhWorkerStatus s;
		Datum		values[STATUS_COLUMNS];
		bool		nulls[STATUS_COLUMNS];
		Datum	   *parts;
		char	   *database;
		int			j;

		LWLockAcquire(shared->workers[i].lock, LW_SHARED);
		memcpy(&s, &shared->workers[i], sizeof(s));
		LWLockRelease(shared->workers[i].lock);
		if (s.kind == DWH_WORKER_NONE)
			continue;

		memset(nulls, 0, sizeof(nulls));
		if (s.kind == DWH_WORKER_KAFKA)
			values[0] = CStringGetTextDatum(psprintf("kafka %d", s.index));
		else if (s.kind == DWH_WORKER_TAGS)
			values[0] = CStringGetTextDatum("tags");
		else
			values[0] = CStringGetTextDatum("redis");
		values[1] = Int32GetDatum(s.pid);
		nulls[1] = (s.pid == 0);
		values[2] = timestamp_or_null(s.started_at, &nulls[2]);
		values[3] = CStringGetTextDatum(s.state);
		values[4] = timestamp_or_null(s.state_since, &nulls[4]);

		parts = palloc(sizeof(Datum) * Max(s.n_assigned, 1));
		for (j = 0; j < s.n_assigned; j++)
			parts[j] = Int32GetDatum(s.assigned[j]);
		values[5] = PointerGetDatum(construct_array(parts, s.n_assigned,
													INT4OID, 4, true,
													TYPALIGN_INT));
		nulls[5] = (s.kind != DWH_WORKER_KAFKA);
		values[6] = Int64GetDatum(s.messages);
		values[7] = Int64GetDatum(s.batches);
		values[8] = Int64GetDatum(s.dead_letters);
		values[9] = timestamp_or_null(s.last_batch_at, &nulls[9]);
		values[10] = Int64GetDatum(s.keys_mirrored);
		values[11] = Int64GetDatum(s.keys_missing);
		values[12] = Int64GetDatum(s.refreshes);
		values[13] = Int64GetDatum(s.changes_found);
		for (j = 6; j <= 9; j++)
			nulls[j] = nulls[j] || (s.kind != DWH_WORKER_KAFKA);
		for (j = 10; j <= 13; j++)
			nulls[j] = (s.kind != DWH_WORKER_REDIS);
		values[14] = CStringGetTextDatum(s.last_error);
		nulls[14] = (s.last_error[0] == '\0');
		values[15] = timestamp_or_null(s.last_error_at, &nulls[15]);
		values[16] = Int32GetDatum(s.index);
		/* The tags worker's, null for the others. */
		values[17] = Int64GetDatum(s.expiry_passes);
		values[18] = timestamp_or_null(s.last_expiry_at, &nulls[18]);
		values[19] = Int32GetDatum(s.last_expiry_rules_moved);
		nulls[19] = (s.last_expiry_at == 0);
		values[20] = Int32GetDatum(s.last_expiry_events);
		nulls[20] = (s.last_expiry_at == 0);
		values[21] = Int64GetDatum(s.events_produced);
		values[22] = Int64GetDatum(s.events_pending);
		values[23] = timestamp_or_null(s.last_produced_at, &nulls[23]);
		for (j = 17; j <= 23; j++)
			nulls[j] = nulls[j] || (s.kind != DWH_WORKER_TAGS);
		/* A Kafka worker's, in milliseconds as pg_stat_database's times. */
		values[24] = Float8GetDatum(s.apply_time / 1000.0);
		nulls[24] = (s.kind != DWH_WORKER_KAFKA);
		/* Its name now; NULL if the worker is connected to none. */
		database = OidIsValid(s.database) ? get_database_name(s.database) : NULL;
		values[25] = database ? CStringGetTextDatum(database) : (Datum) 0;
		nulls[25] = (database == NULL);

		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	return (Datum) 0;
}

/*
 * dwh.kafka_watermarks() returns setof record
 *
 * The broker's low and high watermarks of each partition of the topic the
 * Kafka workers consume, as last reported to any of them.
 */
Datum
dwh_kafka_watermarks(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	char		topic[NAMEDATALEN * 4];
	DwhPartitionWatermark *marks;
	int			i;

	InitMaterializedSRF(fcinfo, 0);
	if (shared == NULL)
		return (Datum) 0;		/* no workers, no watermarks */

	marks = palloc(sizeof(shared->watermarks));
	LWLockAcquire(shared->watermark_lock, LW_SHARED);
	memcpy(topic, shared->watermark_topic, sizeof(topic));
	memcpy(marks, shared->watermarks, sizeof(shared->watermarks));
	LWLockRelease(shared->watermark_lock);

	for (i = 0; i < DWH_MAX_PARTITIONS; i++)
	{
		Datum		values[6];
		bool		nulls[6] = {false, false, false, false, false, false};

		if (marks[i].observed_at == 0)
			continue;
		values[0] = CStringGetTextDatum(topic);
		values[1] = Int32GetDatum(i);
		values[2] = Int64GetDatum(marks[i].low);
		values[3] = Int64GetDatum(marks[i].high);
		values[4] = TimestampTzGetDatum(marks[i].observed_at);
		values[5] = Int32GetDatum(marks[i].worker);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	return (Datum) 0;
}
