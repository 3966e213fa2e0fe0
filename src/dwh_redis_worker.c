/*-------------------------------------------------------------------------
 *
 * dwh_redis_worker.c
 *	  The Redis dictionary worker: users and restaurants mirrored into STG.
 *
 * One worker, registered when dwh is preloaded, serves dwh.database.  It
 * loops:
 *
 *	- every second, it takes the user and restaurant ids that new orders
 *	  named (queued in dwh.redis_wanted by a trigger on the DDS hubs) and
 *	  reads the ones never read, in batches of dwh.redis_batch_size, each
 *	  batch written in one transaction (src/dwh_redis_conn.c reads a value
 *	  no further than dwh.redis_max_value_size; a larger one is read in
 *	  chunks for its dead letter, never whole);
 *	- every dwh.redis_refresh_interval (and on each new connection), a
 *	  refresh pass: SCAN for new keys when dwh.redis_scan_pattern is set,
 *	  a full comparison of the hubs with dwh.redis_keys, then every known
 *	  key read again, page by page; a value whose hash did not change
 *	  costs no write.
 *
 * Orders never wait for this worker: DDS links what it knows, and the
 * marts catch up when a dictionary value arrives.
 *
 * When Redis is down, restarting, or refuses the password or database,
 * the worker publishes the error in dwh.status, logs each new error once,
 * drops the connection and retries with backoff (0.5 s doubling to 30 s;
 * at once after a reload that changes the connection settings).  An error
 * of the database aborts the transaction and the same work is retried
 * with backoff.  While dwh.redis_url is empty, the extension is not
 * created or not updated to the library's version, or the server is a
 * standby, it sleeps on its latch and says why.
 *
 * The URL may come from a file instead (dwh.redis_url_file), read at start,
 * on every reload, and every few seconds while it cannot be used.
 *
 * Registration, start-up, waits, reload, readiness and error recovery are
 * the skeleton both workers share (src/dwh_worker.c).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <signal.h>

#include "lib/stringinfo.h"
#include "miscadmin.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "dwh_dead_letter.h"
#include "dwh_redis_conn.h"
#include "dwh_redis_glob.h"
#include "dwh_redis_store.h"
#include "dwh_redis_url.h"
#include "dwh_secret_files.h"
#include "dwh_settings.h"
#include "dwh_status.h"
#include "dwh_worker.h"

#define WANTED_POLL_MS		1000

PGDLLEXPORT void dwh_redis_worker_main(Datum main_arg);

static DwhWorkerStatus *slot;
static DwhRedisConn *conn = NULL;
static char *conn_settings = NULL;

/* The URL connected to, and the one read from dwh.redis_url_file. */
static const DwhRedisUrl *used_url = NULL;
static DwhRedisUrl *file_url = NULL;

/* Why no URL can be used (a file that cannot be read), or empty. */
static char url_problem[DWH_ERROR_LEN];
static MemoryContext cycle_context;
static MemoryContext page_context;
static int	backoff_ms = 0;
static TimestampTz next_refresh = 0;
static TimestampTz last_refresh_start = 0;
static int	refresh_interval_used = 0;
static bool new_keys_pending = true;
static char *key_pattern_used = NULL;	/* to see a reload change it */
static bool counts_stale = true;
static int64 keys_mirrored = 0;
static int64 keys_missing = 0;
static int64 refreshes = 0;
static int64 changes_found = 0;

/*
 * Choose the URL to connect to: dwh.redis_url, or the one in the file
 * named by dwh.redis_url_file (read now), and say why neither can be used.
 * Returns the settings the connection is made from, with the file's
 * content: a change means reconnecting.  Kept in memory only (it holds
 * the password).
 */
static char *
current_conn_settings(void)
{
	char		error[DWH_ERROR_LEN];
	char	   *contents = NULL;
	char	   *joined;
	char	   *settings;

	used_url = NULL;
	url_problem[0] = '\0';
	if (file_url == NULL)
		file_url = MemoryContextAllocZero(TopMemoryContext, sizeof(DwhRedisUrl));
	explicit_bzero(file_url, sizeof(DwhRedisUrl));

	if (dwh_redis_url_file[0] == '\0')
		used_url = dwh_redis_url_current();
	else if (dwh_redis_url[0] != '\0')
		strlcpy(url_problem,
				"dwh.redis_url and dwh.redis_url_file are both set: empty one of them and reload",
				sizeof(url_problem));
	else if ((contents = dwh_secret_file_read("dwh.redis_url_file",
											  dwh_redis_url_file, error,
											  sizeof(error))) == NULL)
		strlcpy(url_problem, error, sizeof(url_problem));
	else if (contents[0] == '\0')
		strlcpy(url_problem, "the file named by dwh.redis_url_file is empty",
				sizeof(url_problem));
	else if (!dwh_redis_url_parse(contents, file_url, error, sizeof(error)))
		snprintf(url_problem, sizeof(url_problem),
				 "invalid Redis URL in the file named by dwh.redis_url_file: %s",
				 error);
	else
		used_url = file_url;

	joined = psprintf("%s|%d|%s|%s", dwh_redis_url, dwh_redis_timeout,
					  dwh_redis_url_file, contents ? contents : url_problem);
	settings = MemoryContextStrdup(TopMemoryContext, joined);
	explicit_bzero(joined, strlen(joined));
	pfree(joined);
	dwh_secret_file_forget(contents);
	return settings;
}

/* Take new connection settings, wiping the old ones. */
static void
replace_conn_settings(char *settings)
{
	if (conn_settings != NULL)
	{
		explicit_bzero(conn_settings, strlen(conn_settings));
		pfree(conn_settings);
	}
	conn_settings = settings;
}

static void
drop_connection(void)
{
	if (conn != NULL)
	{
		dwh_redis_disconnect(conn);
		conn = NULL;
	}
}

static void
shutdown_connection(int code, Datum arg)
{
	drop_connection();
}

/*
 * The JSON parser of dwh refuses values beyond dwh.max_message_size: in
 * this process, that limit is dwh.redis_max_value_size (values beyond it
 * are refused before parsing, with their own reason).
 */
static void
apply_value_size_limit(void)
{
	char		buf[32];

	snprintf(buf, sizeof(buf), "%d", dwh_redis_max_value_size);
	SetConfigOption("dwh.max_message_size", buf, PGC_SUSET, PGC_S_OVERRIDE);
}

/*
 * Reload the configuration.  Another database means another process
 * (dwh_worker_reload); another URL or timeout means another connection,
 * made at once.
 */
static void
process_reload(void)
{
	char	   *settings;

	if (!dwh_worker_reload())
		return;
	apply_value_size_limit();

	/* A new interval counts from the start of the last pass. */
	if (dwh_redis_refresh_interval != refresh_interval_used &&
		last_refresh_start != 0)
	{
		next_refresh = TimestampTzPlusMilliseconds(last_refresh_start,
												   (int64) dwh_redis_refresh_interval * 1000);
		refresh_interval_used = dwh_redis_refresh_interval;
	}

	/* Another key pattern: judge every known key by it at once. */
	if (strcmp(dwh_redis_key_pattern, key_pattern_used) != 0)
	{
		pfree(key_pattern_used);
		key_pattern_used = MemoryContextStrdup(TopMemoryContext,
											   dwh_redis_key_pattern);
		next_refresh = 0;
	}

	settings = current_conn_settings();
	if (strcmp(settings, conn_settings) != 0)
	{
		if (conn != NULL)
			ereport(LOG,
					(errmsg("Redis settings changed, reconnecting")));
		drop_connection();
		backoff_ms = 0;
		dwh_worker_forget_logged();
	}
	replace_conn_settings(settings);
}

/*
 * Can the worker mirror?  Publishes why not.
 */
static bool
ready_to_mirror(void)
{
	if (url_problem[0] != '\0')
	{
		/* Read the file again: a chmod needs no reload. */
		replace_conn_settings(current_conn_settings());
		if (url_problem[0] != '\0')
		{
			dwh_status_set_error(slot, "%s", url_problem);
			dwh_worker_set_state_logged(psprintf("error: %s", url_problem),
										NULL);
			return false;
		}
	}
	if (used_url == NULL)
	{
		/* Told to do nothing: no error keeps the worker from its work. */
		dwh_status_clear_error(slot);
		dwh_worker_set_state_logged("idle: dwh.redis_url is empty", NULL);
		return false;
	}
	return dwh_worker_ready(dwh_redis_store_ready);
}

/*
 * Publish a Redis failure, drop the connection and choose the wait before
 * the next attempt.  Each new error is logged once, with its SQLSTATE and
 * hint; repeats are only counted in dwh.status.
 */
static void
redis_failed(DwhRedisError *error)
{
	drop_connection();
	dwh_status_set_error(slot, "%s", error->message);
	if (error->transient)
		backoff_ms = dwh_worker_next_backoff(backoff_ms);
	else
		backoff_ms = DWH_WORKER_BACKOFF_MAX_MS;
	dwh_status_set_state(slot, "%s, retrying every %d s at most",
						 error->transient ? "waiting for Redis" : "error: Redis refused the connection settings",
						 DWH_WORKER_BACKOFF_MAX_MS / 1000);
	/* The message is made by set_error(), and shown in dwh.status too. */
	if (dwh_worker_note_logged(error->message))
		ereport(LOG,
				(errcode(error->sqlstate),
				 errmsg("%s", error->message),
				 error->hint ? errhint("%s", error->hint) : 0));
}

static bool
connect_redis(void)
{
	DwhRedisError error;
	char		address[DWH_REDIS_HOST_LEN + DWH_REDIS_PATH_LEN + 64];

	dwh_status_set_state(slot, "connecting");
	conn = dwh_redis_connect(used_url, dwh_redis_timeout, &error);
	if (conn == NULL)
	{
		redis_failed(&error);
		return false;
	}
	dwh_redis_url_redacted(used_url, address, sizeof(address));
	ereport(LOG,
			(errmsg("connected to Redis at %s", address)));
	dwh_worker_forget_logged();
	return true;
}

/* Values larger than this are read again in chunks of this size. */
#define LARGE_VALUE_CHUNK	(1024 * 1024)
/* Times a large value written while it is read is read again. */
#define LARGE_VALUE_TRIES	3

/* Receives each value of a batch. */
typedef struct SeenArg
{
	DwhRedisKey *keys;
	int		   *asked;			/* by reply: the index of its key */
	bool	   *large;			/* by key: longer than the limit */
} SeenArg;

static void
value_seen(void *arg, int reply, DwhRedisAnswer answer, const char *data,
		   size_t len)
{
	SeenArg    *a = (SeenArg *) arg;
	int			index = a->asked[reply];

	if (answer == DWH_REDIS_DENIED)
	{
		dwh_redis_key_denied(&a->keys[index], data);
		return;
	}
	if (answer == DWH_REDIS_VALUE && len > (size_t) dwh_redis_max_value_size)
	{
		/* Only its first bytes came: read in chunks once the batch is. */
		a->large[index] = true;
		a->keys[index].found = true;
		a->keys[index].changed = false;
		return;
	}
	dwh_redis_value_seen(&a->keys[index], answer == DWH_REDIS_VALUE, data,
						 len);
}

/* A large value as its chunks come: its SHA-256 and kept prefix. */
typedef struct LargeValue
{
	DwhSha256  *sha256;
	StringInfoData prefix;
	size_t		keep;
} LargeValue;

static void
chunk_seen(void *arg, const char *data, size_t len)
{
	LargeValue *v = (LargeValue *) arg;

	dwh_sha256_update(v->sha256, data, len);
	if ((size_t) v->prefix.len < v->keep)
		appendBinaryStringInfo(&v->prefix, data,
							   Min(len, v->keep - (size_t) v->prefix.len));
}

/*
 * Read a value longer than dwh.redis_max_value_size in chunks, for its
 * dead letter: its length, its first dwh.dead_letter_keep_bytes and the
 * SHA-256 of all of it, without ever holding it whole.  A value written
 * meanwhile is read again; one written every time, or no longer large, is
 * left as it was, for the next pass.  Returns false with error set when
 * Redis failed.
 */
static bool
read_large_value(DwhRedisKey *key, DwhRedisError *error)
{
	LargeValue	v;
	int			tries;

	v.keep = Min((size_t) dwh_dead_letter_keep_bytes, MaxAllocSize - 1);
	initStringInfo(&v.prefix);
	for (tries = 0; tries < LARGE_VALUE_TRIES; tries++)
	{
		DwhRedisStreamResult result;
		uint8		sha256[DWH_SHA256_LEN];
		int64		length = 0;

		resetStringInfo(&v.prefix);
		v.sha256 = dwh_sha256_begin();
		PG_TRY();
		{
			result = dwh_redis_stream_value(conn, key->key, key->key_len,
											LARGE_VALUE_CHUNK, chunk_seen, &v,
											&length, error);
		}
		PG_CATCH();
		{
			dwh_sha256_end(v.sha256, NULL);
			PG_RE_THROW();
		}
		PG_END_TRY();

		if (result == DWH_REDIS_STREAM_READ &&
			length > dwh_redis_max_value_size)
		{
			dwh_sha256_end(v.sha256, sha256);
			dwh_redis_large_value_seen(key, length, v.prefix.data,
									   v.prefix.len, sha256);
			break;
		}
		dwh_sha256_end(v.sha256, NULL);
		if (result == DWH_REDIS_STREAM_FAILED)
			return false;
		if (result == DWH_REDIS_STREAM_READ)
			break;				/* shorter now: read whole at the next pass */
	}
	pfree(v.prefix.data);
	return true;
}

/*
 * Read keys[0..n) from Redis and write what changed.  A key that
 * dwh.redis_key_pattern does not match is not asked for: it is recorded as
 * excluded, as one Redis does not let the worker read is.  Returns false
 * with error set when Redis failed.
 */
static bool
mirror_batch(DwhRedisKey *keys, int n, DwhRedisApplyResult *result,
			 DwhRedisError *error)
{
	char	  **names = palloc(sizeof(char *) * Max(n, 1));
	size_t	   *lens = palloc(sizeof(size_t) * Max(n, 1));
	SeenArg		arg;
	int			n_asked = 0;
	int			i;

	memset(result, 0, sizeof(DwhRedisApplyResult));
	arg.keys = keys;
	arg.asked = palloc(sizeof(int) * Max(n, 1));
	arg.large = palloc0(sizeof(bool) * Max(n, 1));
	for (i = 0; i < n; i++)
	{
		if (!dwh_redis_glob_match(dwh_redis_key_pattern, keys[i].key,
								  keys[i].key_len))
		{
			keys[i].excluded = "dwh.redis_key_pattern does not match the key: its value is not read";
			continue;
		}
		names[n_asked] = keys[i].key;
		lens[n_asked] = keys[i].key_len;
		arg.asked[n_asked++] = i;
	}
	if (!dwh_redis_read_values(conn, names, lens, n_asked,
							   dwh_redis_max_value_size, value_seen, &arg,
							   error))
		return false;
	for (i = 0; i < n; i++)
	{
		if (arg.large[i] && !read_large_value(&keys[i], error))
			return false;
	}
	dwh_redis_store_apply(keys, n, dwh_redis_max_value_size, result);
	if (result->states_changed > 0)
		counts_stale = true;
	return true;
}

/*
 * Read every key never read yet, batch by batch.
 */
static bool
fetch_new_keys(DwhRedisError *error)
{
	char	   *after = MemoryContextStrdup(cycle_context, "");

	for (;;)
	{
		DwhRedisKey *keys;
		DwhRedisApplyResult result;
		int			n;

		CHECK_FOR_INTERRUPTS();
		MemoryContextReset(page_context);
		MemoryContextSwitchTo(page_context);
		n = dwh_redis_store_new_keys(after, dwh_redis_batch_size, &keys);
		if (n == 0)
			break;
		dwh_status_set_state(slot, "fetching keys named by orders");
		if (!mirror_batch(keys, n, &result, error))
			return false;
		counts_stale = true;
		after = MemoryContextStrdup(cycle_context, keys[n - 1].key);
	}
	MemoryContextSwitchTo(cycle_context);
	new_keys_pending = false;
	return true;
}

/* Gathers the keys of SCAN steps: text keys, and keys refused as such. */
typedef struct ScanKeys
{
	char	  **keys;
	size_t	   *lens;
	int			n;
	int			capacity;
	DwhRedisRefusedKey *refused;
	int			n_refused;
	int			refused_capacity;
} ScanKeys;

static void
key_found(void *arg, const char *key, size_t len)
{
	ScanKeys   *sk = (ScanKeys *) arg;
	DwhRedisRefusedKey refused;

	/* Not one the worker may read: as if SCAN had not found it. */
	if (!dwh_redis_glob_match(dwh_redis_key_pattern, key, len))
		return;
	if (dwh_redis_key_refused(key, len, &refused))
	{
		if (sk->n_refused == sk->refused_capacity)
		{
			sk->refused_capacity *= 2;
			sk->refused = repalloc(sk->refused,
								   sizeof(DwhRedisRefusedKey) * sk->refused_capacity);
		}
		sk->refused[sk->n_refused++] = refused;
		return;
	}
	if (sk->n == sk->capacity)
	{
		sk->capacity *= 2;
		sk->keys = repalloc(sk->keys, sizeof(char *) * sk->capacity);
		sk->lens = repalloc(sk->lens, sizeof(size_t) * sk->capacity);
	}
	sk->keys[sk->n] = palloc(len + 1);
	memcpy(sk->keys[sk->n], key, len);
	sk->keys[sk->n][len] = '\0';
	sk->lens[sk->n] = len;
	sk->n++;
}

/*
 * Walk the keyspace with SCAN MATCH dwh.redis_scan_pattern and record the
 * keys not known yet; dead-letter those that cannot be text keys (once:
 * every pass finds them again).
 */
static bool
scan_keys(DwhRedisError *error)
{
	char		cursor[64] = "0";
	int			refused;

	dwh_status_set_state(slot, "scanning Redis keys");
	do
	{
		ScanKeys	sk;
		char		next[64];

		CHECK_FOR_INTERRUPTS();
		MemoryContextReset(page_context);
		MemoryContextSwitchTo(page_context);
		sk.capacity = 1024;
		sk.n = 0;
		sk.keys = palloc(sizeof(char *) * sk.capacity);
		sk.lens = palloc(sizeof(size_t) * sk.capacity);
		sk.refused_capacity = 16;
		sk.n_refused = 0;
		sk.refused = palloc(sizeof(DwhRedisRefusedKey) * sk.refused_capacity);
		/* Gather about a batch of keys, then record them at once. */
		do
		{
			if (!dwh_redis_scan(conn, cursor, dwh_redis_scan_pattern,
								dwh_redis_batch_size, next, sizeof(next),
								key_found, &sk, error))
				return false;
			strlcpy(cursor, next, sizeof(cursor));
		} while (strcmp(cursor, "0") != 0 &&
				 sk.n + sk.n_refused < dwh_redis_batch_size);
		if (dwh_redis_store_add_keys(sk.keys, sk.lens, sk.n) > 0)
			new_keys_pending = true;
		refused = dwh_redis_store_refuse_keys(sk.refused, sk.n_refused);
		if (refused > 0)
			ereport(LOG,
					(errmsg("%d Redis keys found by SCAN cannot be text keys and were dead-lettered",
							refused),
					 errhint("See dwh.dead_letters rows with source 'redis' and no source_key: raw holds each key.")));
	} while (strcmp(cursor, "0") != 0);
	MemoryContextSwitchTo(cycle_context);
	return true;
}

/*
 * A refresh pass: discover, fetch what is new, then read every known key
 * again and write what changed.
 */
static bool
refresh_pass(DwhRedisError *error)
{
	TimestampTz start = GetCurrentTimestamp();
	char	   *after = pstrdup("");
	int64		changed = 0;
	int64		read = 0;

	if (dwh_redis_scan_pattern[0] != '\0' && !scan_keys(error))
		return false;
	if (dwh_redis_store_sync_hubs() + dwh_redis_store_take_wanted() > 0)
		new_keys_pending = true;
	if (new_keys_pending && !fetch_new_keys(error))
		return false;

	dwh_status_set_state(slot, "refreshing");
	for (;;)
	{
		DwhRedisKey *keys;
		DwhRedisApplyResult result;
		int			n;

		CHECK_FOR_INTERRUPTS();
		MemoryContextReset(page_context);
		MemoryContextSwitchTo(page_context);
		n = dwh_redis_store_page(after, dwh_redis_batch_size, &keys);
		if (n == 0)
			break;
		if (!mirror_batch(keys, n, &result, error))
			return false;
		changed += result.stg_written;
		read += n;
		MemoryContextSwitchTo(cycle_context);
		after = pstrdup(keys[n - 1].key);
	}
	MemoryContextSwitchTo(cycle_context);

	refreshes++;
	changes_found += changed;
	last_refresh_start = start;
	refresh_interval_used = dwh_redis_refresh_interval;
	next_refresh = TimestampTzPlusMilliseconds(start,
											   (int64) dwh_redis_refresh_interval * 1000);
	ereport(DEBUG1,
			(errmsg("refresh pass done in %.3f ms: " INT64_FORMAT " keys read, " INT64_FORMAT " changes written",
					(double) (GetCurrentTimestamp() - start) / 1000.0,
					read, changed)));
	return true;
}

/*
 * One turn of the loop: a refresh pass when due, else the keys that new
 * orders named.
 */
static bool
run_cycle(DwhRedisError *error)
{
	if (GetCurrentTimestamp() >= next_refresh)
	{
		if (!refresh_pass(error))
			return false;
	}
	else
	{
		if (dwh_redis_store_take_wanted() > 0)
			new_keys_pending = true;
		if (new_keys_pending && !fetch_new_keys(error))
			return false;
	}

	if (counts_stale)
	{
		dwh_redis_store_counts(&keys_mirrored, &keys_missing);
		counts_stale = false;
	}
	dwh_status_set_redis(slot, keys_mirrored, keys_missing, refreshes,
						 changes_found);
	return true;
}

/*
 * dwh_redis_worker_main
 *		Entry point of the Redis worker.
 */
void
dwh_redis_worker_main(Datum main_arg)
{
	sigjmp_buf	local_sigjmp_buf;

	/* A write to a socket Redis closed must fail, not kill the process. */
	pqsignal(SIGPIPE, SIG_IGN);
	slot = dwh_worker_start(DWH_WORKER_REDIS, 1);

	cycle_context = AllocSetContextCreate(TopMemoryContext, "dwh redis cycle",
										  ALLOCSET_DEFAULT_SIZES);
	page_context = AllocSetContextCreate(TopMemoryContext, "dwh redis page",
										 ALLOCSET_DEFAULT_SIZES);
	conn_settings = current_conn_settings();
	key_pattern_used = MemoryContextStrdup(TopMemoryContext,
										   dwh_redis_key_pattern);
	apply_value_size_limit();
	before_shmem_exit(shutdown_connection, (Datum) 0);

	if (sigsetjmp(local_sigjmp_buf, 1) != 0)
	{
		dwh_worker_recover(&backoff_ms);
		/* A connection cut in the middle of an exchange is out of step. */
		if (conn != NULL && !dwh_redis_conn_is_clean(conn))
			drop_connection();
		/* What the failed cycle did not finish is done again. */
		new_keys_pending = true;
		counts_stale = true;
		dwh_worker_backoff(backoff_ms);
	}
	PG_exception_stack = &local_sigjmp_buf;

	for (;;)
	{
		DwhRedisError error;
		long		sleep_ms;

		CHECK_FOR_INTERRUPTS();
		process_reload();
		MemoryContextSwitchTo(cycle_context);
		MemoryContextReset(cycle_context);

		if (!ready_to_mirror())
		{
			drop_connection();
			dwh_worker_wait(DWH_WORKER_RECHECK_MS);
			continue;
		}
		if (conn == NULL)
		{
			if (backoff_ms > 0)
			{
				dwh_worker_backoff(backoff_ms);
				/* The next failure doubles it from here. */
				if (ConfigReloadPending)
					continue;
			}
			if (!connect_redis())
				continue;
			/* Redis may have changed while we were away: refresh. */
			next_refresh = 0;
			new_keys_pending = true;
		}

		if (!run_cycle(&error))
		{
			MemoryContextSwitchTo(cycle_context);
			redis_failed(&error);
			continue;
		}
		backoff_ms = 0;
		/* Recovered: the last error no longer holds (the log keeps it). */
		dwh_status_clear_error(slot);
		dwh_status_set_state(slot, "mirroring");

		sleep_ms = WANTED_POLL_MS;
		if (next_refresh > 0)
			sleep_ms = Min(sleep_ms,
						   (long) ((next_refresh - GetCurrentTimestamp()) / 1000));
		dwh_worker_wait(sleep_ms);
	}
}
