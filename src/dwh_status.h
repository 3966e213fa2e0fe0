/*-------------------------------------------------------------------------
 *
 * dwh_status.h
 *	  Shared memory where the background workers publish their state, read
 *	  by the dwh.status and dwh.kafka_partitions views.
 *
 *-------------------------------------------------------------------------
 */
#ifndef DWH_STATUS_H
#define DWH_STATUS_H

#include "datatype/timestamp.h"
#include "storage/lwlock.h"

#define DWH_MAX_KAFKA_WORKERS	16
#define DWH_STATUS_SLOTS		(DWH_MAX_KAFKA_WORKERS + 2)
#define DWH_REDIS_SLOT			DWH_MAX_KAFKA_WORKERS
#define DWH_TAGS_SLOT			(DWH_MAX_KAFKA_WORKERS + 1)

/*
 * Partitions numbered beyond this are consumed but not shown in status; a
 * worker may own every one of them.
 */
#define DWH_MAX_PARTITIONS		1024

#define DWH_STATE_LEN			128
#define DWH_ERROR_LEN			512

typedef enum DwhWorkerKind
{
	DWH_WORKER_NONE = 0,
	DWH_WORKER_KAFKA,
	DWH_WORKER_REDIS,
	DWH_WORKER_TAGS
} DwhWorkerKind;

/*
 * One worker's published state.  Written by its worker (and a flag or two
 * by the backends that wake it), read by any backend; the lock keeps a
 * reader from seeing a half-written string.  An LWLock, not a spinlock:
 * a reader copies the whole slot, partitions included (about 5 kB).
 */
typedef struct DwhWorkerStatus
{
	LWLock	   *lock;
	DwhWorkerKind kind;
	int			index;			/* 1-based number among workers of a kind */
	int			pid;			/* 0 when not running */
	TimestampTz started_at;
	char		state[DWH_STATE_LEN];
	TimestampTz state_since;
	/* Kafka */
	int			n_assigned;
	int32		assigned[DWH_MAX_PARTITIONS];
	int64		messages;		/* messages applied (orders, others, dead) */
	int64		batches;
	int64		dead_letters;
	int64		apply_time;		/* microseconds spent applying batches */
	TimestampTz last_batch_at;
	bool		offsets_changed;	/* set by dwh.kafka_seek() at commit */
	/* Redis */
	int64		keys_mirrored;
	int64		keys_missing;
	int64		refreshes;
	int64		changes_found;
	/* Tags: the expiry passes and the Kafka feed */
	int64		expiry_passes;
	TimestampTz last_expiry_at;
	int32		last_expiry_rules_moved;
	int32		last_expiry_events;
	int64		events_produced;	/* acknowledged by the broker */
	int64		events_pending; /* in dwh.tag_outbox, as last counted */
	TimestampTz last_produced_at;
	bool		events_queued;	/* set at the commit of a transaction that
								 * queued events */
	/* All */
	Oid			database;		/* connected to, InvalidOid if none */
	bool		connect_pending;	/* a connection attempt never returned */
	char		last_error[DWH_ERROR_LEN];
	TimestampTz last_error_at;
} DwhWorkerStatus;

/* The broker's offsets of one partition of the configured topic. */
typedef struct DwhPartitionWatermark
{
	int64		low;
	int64		high;
	TimestampTz observed_at;	/* 0: never observed */
	int			worker;			/* index of the Kafka worker that saw it */
} DwhPartitionWatermark;

typedef struct DwhSharedStatus
{
	DwhWorkerStatus workers[DWH_STATUS_SLOTS];
	LWLock	   *watermark_lock; /* over the topic and its watermarks */
	char		watermark_topic[NAMEDATALEN * 4];
	DwhPartitionWatermark watermarks[DWH_MAX_PARTITIONS];
} DwhSharedStatus;

extern void dwh_status_shmem_request(void);
extern void dwh_status_shmem_startup(void);

extern void dwh_status_note_unregistered(DwhWorkerKind kind, int index);
extern DwhWorkerStatus *dwh_status_attach(DwhWorkerKind kind, int index);
extern void dwh_status_set_state(DwhWorkerStatus *slot, const char *fmt,...)
			pg_attribute_printf(2, 3);
extern void dwh_status_set_error(DwhWorkerStatus *slot, const char *fmt,...)
			pg_attribute_printf(2, 3);
extern bool dwh_status_has_error(DwhWorkerStatus *slot);
extern void dwh_status_set_database(DwhWorkerStatus *slot, Oid database);
extern void dwh_status_clear_error(DwhWorkerStatus *slot);
extern void dwh_status_set_assigned(DwhWorkerStatus *slot,
									const int32 *partitions, int n);
extern void dwh_status_owned_partitions(bool *owned);
extern void dwh_status_count_batch(DwhWorkerStatus *slot, int64 messages,
								   int64 dead_letters, TimestampTz started);
extern void dwh_status_set_redis(DwhWorkerStatus *slot, int64 keys_mirrored,
								 int64 keys_missing, int64 refreshes,
								 int64 changes_found);
extern void dwh_status_count_expiry(DwhWorkerStatus *slot, int rules_moved,
									int events);
extern void dwh_status_set_feed(DwhWorkerStatus *slot, int64 produced,
								int64 pending);
extern void dwh_status_wake_kafka_workers(void);
extern void dwh_status_wake_tags_worker(void);
extern void dwh_status_wake_at_commit(DwhWorkerKind kind);
extern bool dwh_status_take_offsets_changed(DwhWorkerStatus *slot);
extern bool dwh_status_take_events_queued(DwhWorkerStatus *slot);
extern void dwh_status_set_watermark(const char *topic, int32 partition,
									 int64 low, int64 high, int worker);

#endif							/* DWH_STATUS_H */
