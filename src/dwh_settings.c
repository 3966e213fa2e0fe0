/*-------------------------------------------------------------------------
 *
 * dwh_settings.c
 *	  Definition of the dwh.* configuration parameters.
 *
 * Every setting is documented in README.md; keep the two in step.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "catalog/pg_authid_d.h"
#include "miscadmin.h"
#include "utils/guc.h"

#include "dwh_kafka_options.h"
#include "dwh_redis_glob.h"
#include "dwh_redis_url.h"
#include "dwh_settings.h"
#include "dwh_status.h"

char	   *dwh_database = NULL;
int			dwh_max_message_size = 1024 * 1024;
int			dwh_max_order_items = 1000;
int			dwh_dead_letter_keep_bytes = 64 * 1024;

/* Read by the order triggers through current_setting() (install/50_orders.sql). */
static int	trigger_chunk_rows = 10000;

char	   *dwh_kafka_brokers = NULL;
char	   *dwh_kafka_topic = NULL;
char	   *dwh_kafka_group_id = NULL;
char	   *dwh_kafka_options = NULL;
char	   *dwh_kafka_options_file = NULL;
int			dwh_kafka_consumers = 1;
int			dwh_kafka_batch_size = 1000;
int			dwh_kafka_batch_wait = 0;
int			dwh_kafka_prefetch_memory = 16 * 1024;
int			dwh_kafka_start_offset = DWH_KAFKA_START_EARLIEST;
int			dwh_kafka_on_gap = DWH_KAFKA_GAP_SKIP;

int			dwh_tags_expire_interval = 30;
char	   *dwh_tags_topic = NULL;

char	   *dwh_redis_url = NULL;
char	   *dwh_redis_url_file = NULL;
int			dwh_redis_refresh_interval = 60;
int			dwh_redis_batch_size = 1000;
char	   *dwh_redis_scan_pattern = NULL;
char	   *dwh_redis_key_pattern = NULL;
int			dwh_redis_max_value_size = 1024 * 1024;
int			dwh_redis_timeout = 5000;

static const struct config_enum_entry start_offset_options[] = {
	{"earliest", DWH_KAFKA_START_EARLIEST, false},
	{"latest", DWH_KAFKA_START_LATEST, false},
	{NULL, 0, false}
};

static const struct config_enum_entry on_gap_options[] = {
	{"skip", DWH_KAFKA_GAP_SKIP, false},
	{"stop", DWH_KAFKA_GAP_STOP, false},
	{NULL, 0, false}
};

/*
 * Kafka settings.  All but the number of consumers take effect on reload:
 * the workers reconnect when one of them changes.
 */
static void
define_kafka_settings(void)
{
	DefineCustomStringVariable("dwh.kafka_brokers",
							   "Kafka bootstrap servers (host:port, comma separated); empty: the Kafka workers idle.",
							   NULL,
							   &dwh_kafka_brokers,
							   "",
							   PGC_SIGHUP,
							   0,
							   NULL, NULL, NULL);

	DefineCustomStringVariable("dwh.kafka_topic",
							   "Kafka topic of the order stream.",
							   NULL,
							   &dwh_kafka_topic,
							   "order-service_orders",
							   PGC_SIGHUP,
							   0,
							   dwh_kafka_topic_check, NULL, NULL);

	DefineCustomStringVariable("dwh.kafka_group_id",
							   "Kafka consumer group of the dwh workers.",
							   "Offsets committed to this group are for monitoring only; dwh resumes from dwh.kafka_offsets.",
							   &dwh_kafka_group_id,
							   "dwh",
							   PGC_SIGHUP,
							   0,
							   dwh_kafka_group_id_check, NULL, NULL);

	DefineCustomStringVariable("dwh.kafka_options",
							   "Extra librdkafka consumer properties, as name=value pairs separated by spaces.",
							   "Values holding spaces are single-quoted. Visible to superusers and members of pg_read_all_settings only; secret values are never logged.",
							   &dwh_kafka_options,
							   "",
							   PGC_SIGHUP,
							   GUC_SUPERUSER_ONLY,
							   dwh_kafka_options_check, NULL, NULL);

	DefineCustomStringVariable("dwh.kafka_options_file",
							   "File of more librdkafka consumer properties, added to dwh.kafka_options: for secrets that must not pass through SQL.",
							   "Same syntax as dwh.kafka_options. Read by the Kafka workers at start and on reload; it must be readable by the server's user only (0600).",
							   &dwh_kafka_options_file,
							   "",
							   PGC_SIGHUP,
							   GUC_SUPERUSER_ONLY,
							   NULL, NULL, NULL);

	/*
	 * Read when the workers are registered, in the postmaster.  A backend
	 * that loads dwh without the preload may not define a postmaster setting
	 * (that is FATAL): there it is a plain one, read by nothing.
	 */
	DefineCustomIntVariable("dwh.kafka_consumers",
							"Number of Kafka consumer workers sharing the topic's partitions.",
							"Takes effect at server start, when dwh is in shared_preload_libraries.",
							&dwh_kafka_consumers,
							1,
							0,
							DWH_MAX_KAFKA_WORKERS,
							process_shared_preload_libraries_in_progress ?
							PGC_POSTMASTER : PGC_SIGHUP,
							0,
							NULL, NULL, NULL);

	DefineCustomIntVariable("dwh.kafka_batch_size",
							"Most messages applied in one transaction.",
							NULL,
							&dwh_kafka_batch_size,
							1000,
							1,
							100000,
							PGC_SIGHUP,
							0,
							NULL, NULL, NULL);

	/*
	 * 0 closes a batch as soon as the consumer's queue is empty: a trickle is
	 * applied message by message at once, a backlog in full batches.
	 */
	DefineCustomIntVariable("dwh.kafka_batch_wait",
							"Longest a batch waits for more messages after its first one; 0 applies it as soon as nothing more has arrived.",
							NULL,
							&dwh_kafka_batch_wait,
							0,
							0,
							60000,
							PGC_SIGHUP,
							GUC_UNIT_MS,
							NULL, NULL, NULL);

	DefineCustomIntVariable("dwh.kafka_prefetch_memory",
							"Most message data a Kafka worker prefetches ahead of its batches.",
							"Bounds each worker's memory whatever the backlog (librdkafka queued.max.messages.kbytes).",
							&dwh_kafka_prefetch_memory,
							16 * 1024,
							1024,
							1024 * 1024,
							PGC_SIGHUP,
							GUC_UNIT_KB,
							NULL, NULL, NULL);

	DefineCustomEnumVariable("dwh.kafka_start_offset",
							 "Where a partition with no offset stored in dwh.kafka_offsets starts.",
							 NULL,
							 &dwh_kafka_start_offset,
							 DWH_KAFKA_START_EARLIEST,
							 start_offset_options,
							 PGC_SIGHUP,
							 0,
							 NULL, NULL, NULL);

	/*
	 * Read when a gap is found, so a reload needs no new consumer.  A
	 * partition already stopped waits for dwh.kafka_seek() whatever the
	 * setting says later.
	 */
	DefineCustomEnumVariable("dwh.kafka_on_gap",
							 "What a Kafka worker does when the broker no longer holds a partition's stored offset.",
							 "skip: record the gap in dwh.kafka_gaps and go on from the first offset the broker holds; stop: record it and consume nothing more from that partition until dwh.kafka_seek() moves it.",
							 &dwh_kafka_on_gap,
							 DWH_KAFKA_GAP_SKIP,
							 on_gap_options,
							 PGC_SIGHUP,
							 0,
							 NULL, NULL, NULL);
}

/*
 * Check hook of dwh.database: a database name, which PostgreSQL would
 * otherwise truncate to its first NAMEDATALEN - 1 bytes.
 */
static bool
database_check(char **newval, void **extra, GucSource source)
{
	if (*newval == NULL || (*newval)[0] == '\0')
	{
		GUC_check_errdetail("The workers need a database to serve.");
		return false;
	}
	if (strlen(*newval) >= NAMEDATALEN)
	{
		GUC_check_errdetail("A database name has at most %d bytes.", NAMEDATALEN - 1);
		return false;
	}
	return true;
}

/*
 * Check hook of dwh.redis_key_pattern: a pattern the worker can match
 * (dwh_redis_glob.c says how it differs from Redis on malformed ones).
 */
static bool
key_pattern_check(char **newval, void **extra, GucSource source)
{
	const char *problem;

	if (*newval == NULL)
		return false;
	problem = dwh_redis_glob_problem(*newval);
	if (problem != NULL)
	{
		GUC_check_errdetail("%s", problem);
		return false;
	}
	return true;
}

/* Check hook of dwh.tags_topic: empty (no feed), or a Kafka topic name. */
static bool
tags_topic_check(char **newval, void **extra, GucSource source)
{
	if (*newval == NULL || (*newval)[0] == '\0')
		return true;
	return dwh_kafka_topic_check(newval, extra, source);
}

/*
 * Settings of the tags worker (docs/tags.md).  Both take effect on reload.
 * The expiry interval bounds how long a windowed tag outlives its window:
 * 30 s revokes within a minute what leaves a window.
 */
static void
define_tags_settings(void)
{
	DefineCustomIntVariable("dwh.tags_expire_interval",
							"Time between two expiry passes of the tags worker, which revoke the windowed tags whose orders left the window; 0 disables them.",
							NULL,
							&dwh_tags_expire_interval,
							30,
							0,
							24 * 3600,
							PGC_SIGHUP,
							GUC_UNIT_S,
							NULL, NULL, NULL);

	/*
	 * Read by every backend that writes tag events (dwh.tag_feed_on()): an
	 * event is queued for the worker while a topic is named.
	 */
	DefineCustomStringVariable("dwh.tags_topic",
							   "Kafka topic that the tags worker produces every user tag grant and revoke to; empty: no feed, nothing is queued.",
							   "The brokers and their security are those of dwh.kafka_brokers, dwh.kafka_options and dwh.kafka_options_file.",
							   &dwh_tags_topic,
							   "",
							   PGC_SIGHUP,
							   0,
							   tags_topic_check, NULL, NULL);
}

/*
 * Redis settings.  All take effect on reload; a new URL or timeout means a
 * new connection.
 */
static void
define_redis_settings(void)
{
	DefineCustomStringVariable("dwh.redis_url",
							   "Redis server of the user and restaurant dictionaries; empty: the Redis worker idles.",
							   "redis://[[username]:password@]host[:port][/db], unix://[[username]:password@]/path[?db=N] or a socket path. Visible to superusers and members of pg_read_all_settings only; the password is never logged.",
							   &dwh_redis_url,
							   "",
							   PGC_SIGHUP,
							   GUC_SUPERUSER_ONLY,
							   dwh_redis_url_check, dwh_redis_url_assign, NULL);

	DefineCustomStringVariable("dwh.redis_url_file",
							   "File holding the Redis URL, used instead of dwh.redis_url: for a password that must not pass through SQL.",
							   "Read by the Redis worker at start and on reload; it must be readable by the server's user only (0600). dwh.redis_url must then be empty.",
							   &dwh_redis_url_file,
							   "",
							   PGC_SIGHUP,
							   GUC_SUPERUSER_ONLY,
							   NULL, NULL, NULL);

	DefineCustomIntVariable("dwh.redis_refresh_interval",
							"Time between two refresh passes, which read every known dictionary key again.",
							NULL,
							&dwh_redis_refresh_interval,
							60,
							1,
							7 * 24 * 3600,
							PGC_SIGHUP,
							GUC_UNIT_S,
							NULL, NULL, NULL);

	DefineCustomIntVariable("dwh.redis_batch_size",
							"Most keys read from Redis (one pipeline of GETRANGE) and written in one transaction.",
							NULL,
							&dwh_redis_batch_size,
							1000,
							1,
							100000,
							PGC_SIGHUP,
							0,
							NULL, NULL, NULL);

	DefineCustomStringVariable("dwh.redis_scan_pattern",
							   "SCAN pattern of the dictionary keys to discover; empty: only the keys that orders name are read.",
							   NULL,
							   &dwh_redis_scan_pattern,
							   "",
							   PGC_SIGHUP,
							   0,
							   NULL, NULL, NULL);

	DefineCustomStringVariable("dwh.redis_key_pattern",
							   "Pattern every Redis key the worker reads must match, the keys orders name as well as those SCAN finds.",
							   "Redis glob syntax, as SCAN MATCH: * any bytes, ? one byte, [a-z] and [^a-z] classes, \\ escapes.",
							   &dwh_redis_key_pattern,
							   "*",
							   PGC_SIGHUP,
							   0,
							   key_pattern_check, NULL, NULL);

	DefineCustomIntVariable("dwh.redis_max_value_size",
							"Largest dictionary value accepted; larger ones are dead-lettered.",
							NULL,
							&dwh_redis_max_value_size,
							1024 * 1024,
							1024,
							64 * 1024 * 1024,
							PGC_SIGHUP,
							GUC_UNIT_BYTE,
							NULL, NULL, NULL);

	DefineCustomIntVariable("dwh.redis_timeout",
							"Longest wait for Redis to accept a connection or to send the next bytes of a reply.",
							NULL,
							&dwh_redis_timeout,
							5000,
							100,
							600000,
							PGC_SIGHUP,
							GUC_UNIT_MS,
							NULL, NULL, NULL);
}

/*
 * dwh_settings_define
 *		Define every dwh.* parameter and reserve the prefix, so that a
 *		misspelt dwh.* setting is reported instead of silently ignored.
 */
void
dwh_settings_define(void)
{
	DefineCustomStringVariable("dwh.database",
							   "Database whose warehouse the dwh background workers serve.",
							   NULL,
							   &dwh_database,
							   "postgres",
							   PGC_SIGHUP,
							   0,
							   database_check, NULL, NULL);

	DefineCustomIntVariable("dwh.max_message_size",
							"Largest message value accepted for ingestion; larger ones are dead-lettered.",
							NULL,
							&dwh_max_message_size,
							1024 * 1024,
							1024,
							64 * 1024 * 1024,
							PGC_SUSET,
							GUC_UNIT_BYTE,
							NULL, NULL, NULL);

	/*
	 * Each item costs a link and its share of the mart deltas at every
	 * version; the bound keeps one message from holding a partition for long.
	 */
	DefineCustomIntVariable("dwh.max_order_items",
							"Most items an order version may list; one with more is refused (dead-lettered by the ingest functions).",
							NULL,
							&dwh_max_order_items,
							1000,
							1,
							100000,
							PGC_SUSET,
							0,
							NULL, NULL, NULL);

	/*
	 * With chunks of 10,000 orders a restoring backend peaked at about 80 MB
	 * whatever the table's size; each chunk runs the statements of a batch,
	 * so smaller ones cost more a row.
	 */
	DefineCustomIntVariable("dwh.trigger_chunk_rows",
							"Rows of a direct write of an STG table (an INSERT, a COPY, a restore) that its triggers carry through DDS at a time; for menus, entries.",
							"Bounds the memory of such a statement whatever its size; the Kafka worker's and the ingest functions' batches are carried whole.",
							&trigger_chunk_rows,
							10000,
							1,
							10000000,
							PGC_SUSET,
							0,
							NULL, NULL, NULL);

	/*
	 * Superusers only: a loader that could raise it would fill the disk with
	 * refused values, which is what it bounds.
	 */
	DefineCustomIntVariable("dwh.dead_letter_keep_bytes",
							"Bytes of a refused value that its dead letter keeps; the full length and a SHA-256 of the whole value are kept too.",
							"A dead letter keeping a prefix only is not replayed by dwh.replay_dead_letters().",
							&dwh_dead_letter_keep_bytes,
							64 * 1024,
							0,
							1024 * 1024 * 1024,
							PGC_SUSET,
							GUC_UNIT_BYTE,
							NULL, NULL, NULL);

	define_kafka_settings();
	define_tags_settings();
	define_redis_settings();

	MarkGUCPrefixReserved("dwh");
}

/*
 * dwh_worker_settings
 *		Give a worker, once connected, the settings of its whole life.  They
 *		outrank every per-database or per-role setting, which the owner of
 *		the database (not a superuser) can write:
 *
 * - the search_path of dwh's definer functions.  A worker runs as the
 *	 bootstrap superuser: a name resolved through a schema that a less
 *	 trusted role can write (public, or one set by ALTER DATABASE or ALTER
 *	 ROLE) would run that role's code with the superuser's rights;
 * - its own session user and role: the bootstrap superuser it connected as
 *	 (ALTER DATABASE ... SET role, or SET session_authorization, which a
 *	 client's login outranks but a background worker's connection does not,
 *	 would make it another);
 * - READ COMMITTED and read-write transactions: dwh writes only in READ
 *	 COMMITTED transactions (a batch that waited for a lock must see what
 *	 committed meanwhile);
 * - check_function_bodies on: off is how a session says it restores a dump
 *	 (dwh_restore.c), and a worker never does;
 * - no JIT, which compiles a plan again at every execution once its cost
 *	 passes jit_above_cost, and takes longer than the short statements of a
 *	 worker's batches (dwh_ingest.c sets it for every batch, whoever runs
 *	 it);
 * - exit_on_error off: a worker catches the errors of bad input (a dead
 *	 letter, not a stop), which exit_on_error would turn into an exit, and
 *	 the restarted worker would meet the same message again;
 * - session_replication_role origin: as replica (a superuser's setting for
 *	 the database), the triggers that carry STG into DDS and the marts do
 *	 not fire, and every order would be a dead letter.
 */
void
dwh_worker_settings(void)
{
	/* The session user's name is a catalog lookup: in a transaction. */
	StartTransactionCommand();
	SetConfigOption("session_authorization",
					GetUserNameFromId(BOOTSTRAP_SUPERUSERID, false),
					PGC_SUSET, PGC_S_OVERRIDE);
	CommitTransactionCommand();
	SetConfigOption("search_path", "pg_catalog, pg_temp", PGC_SUSET,
					PGC_S_OVERRIDE);
	SetConfigOption("role", "none", PGC_SUSET, PGC_S_OVERRIDE);
	SetConfigOption("exit_on_error", "off", PGC_SUSET, PGC_S_OVERRIDE);
	SetConfigOption("default_transaction_isolation", "read committed",
					PGC_SUSET, PGC_S_OVERRIDE);
	SetConfigOption("default_transaction_read_only", "off", PGC_SUSET,
					PGC_S_OVERRIDE);
	SetConfigOption("check_function_bodies", "on", PGC_SUSET,
					PGC_S_OVERRIDE);
	SetConfigOption("jit", "off", PGC_SUSET, PGC_S_OVERRIDE);
	SetConfigOption("session_replication_role", "origin", PGC_SUSET,
					PGC_S_OVERRIDE);
}
