/*-------------------------------------------------------------------------
 *
 * dwh_redis_store.c
 *	  The database side of the Redis worker.
 *
 * dwh.redis_keys holds every key the worker mirrors, with its state and a
 * 128-bit hash of the value last read.  Keys come from three places:
 * dds.h_user and dds.h_restaurant (the ids orders name; a trigger queues
 * new ones in dwh.redis_wanted, and a full comparison runs on every
 * refresh), and SCAN when dwh.redis_scan_pattern is set.
 *
 * A value read from Redis is compared by hash with the one last read: an
 * unchanged value costs no write at all.  A changed one is classified by
 * its shape (a "menu" key makes a restaurant, otherwise a "login" key a
 * user), validated with the rules of the STG guard, and written with one
 * statement per destination for the whole batch: an upsert into
 * stg.users or stg.restaurants (whose guard skips a version that is not
 * newer, and whose triggers carry the change into DDS and the marts),
 * dead letters, and the new states in dwh.redis_keys.  A refused value
 * keeps its hash, so the same bad value is dead-lettered once, not on
 * every refresh; a new bad value is recorded again.
 *
 * The batch is written in a subtransaction; if it fails for a reason that
 * is about the data, each value is retried alone, and only those that fail
 * again are dead-lettered with the error.  Errors that are not about data
 * are raised: the worker retries the batch.
 *
 * A key is bytes too.  One that SCAN finds and that is not valid UTF-8,
 * holds a NUL byte or is longer than any id an order can name is never
 * written to a text column (pg_restore would refuse the whole table, and a
 * key cut at its NUL would stand for another key): it is dead-lettered
 * with the key in raw and no source_key, its value not read.  A unique
 * index on the SHA-256 of such keys makes a refused key one dead letter,
 * however many refresh passes find it again.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "catalog/namespace.h"
#include "catalog/pg_type.h"
#include "common/hashfn.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "utils/builtins.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/snapmgr.h"

#include "dwh_columns.h"
#include "dwh_dead_letter.h"
#include "dwh_message.h"
#include "dwh_redis_store.h"
#include "dwh_spi.h"
#include "dwh_trust.h"

static const char *const kind_names[] = {"unknown", "user", "restaurant"};
static const char *const state_names[] = {"new", "mirrored", "missing", "refused", "excluded"};

/* What to do with one key of a batch. */
typedef enum Target
{
	TARGET_NOTHING,				/* unchanged */
	TARGET_STATE,				/* only its state changes (missing, excluded) */
	TARGET_USER,
	TARGET_RESTAURANT,
	TARGET_DEAD
} Target;

typedef struct Decision
{
	Target		target;
	DwhRedisKind kind;
	DwhRedisState state;
	Jsonb	   *payload;		/* user, restaurant */
	int			sqlstate;		/* dead */
	char	   *reason;			/* dead */
} Decision;

static SPIPlanPtr upsert_users_plan = NULL;
static SPIPlanPtr upsert_restaurants_plan = NULL;
static SPIPlanPtr dead_letters_plan = NULL;
static SPIPlanPtr refused_keys_plan = NULL;
static SPIPlanPtr keys_plan = NULL;

static const char *upsert_users_sql =
"INSERT INTO stg.users AS t (object_id, payload) "
"SELECT u.k, u.p FROM unnest($1::text[], $2::jsonb[]) AS u(k, p) ORDER BY u.k "
"ON CONFLICT (object_id) DO UPDATE SET payload = EXCLUDED.payload";

static const char *upsert_restaurants_sql =
"INSERT INTO stg.restaurants AS t (object_id, payload) "
"SELECT u.k, u.p FROM unnest($1::text[], $2::jsonb[]) AS u(k, p) ORDER BY u.k "
"ON CONFLICT (object_id) DO UPDATE SET payload = EXCLUDED.payload";

static const char *dead_letters_sql =
"INSERT INTO dwh.dead_letters "
"  (source, source_key, raw, reason, sqlstate, raw_length, raw_sha256) "
"SELECT 'redis', d.k, d.raw, d.reason, d.sqlstate, d.raw_length, d.raw_sha256 "
"FROM unnest($1::text[], $2::bytea[], $3::text[], $4::text[], $5::bigint[], $6::bytea[]) "
"     AS d(k, raw, reason, sqlstate, raw_length, raw_sha256)";

static const char *refused_keys_sql =
"INSERT INTO dwh.dead_letters "
"  (source, raw, reason, sqlstate, raw_length, raw_sha256) "
"SELECT 'redis', d.raw, d.reason, d.sqlstate, d.raw_length, d.raw_sha256 "
"FROM unnest($1::bytea[], $2::text[], $3::text[], $4::bigint[], $5::bytea[]) "
"     AS d(raw, reason, sqlstate, raw_length, raw_sha256) "
"ORDER BY d.raw_sha256 "
"ON CONFLICT (raw_sha256) WHERE source = 'redis' AND source_key IS NULL "
"DO NOTHING";

static const char *keys_sql =
"INSERT INTO dwh.redis_keys AS r (key, kind, state, value_hash, reason, changed_at) "
"SELECT k.key, k.kind, k.state, k.hash, k.reason, pg_catalog.now() "
"FROM unnest($1::text[], $2::text[], $3::text[], $4::bytea[], $5::text[]) "
"     AS k(key, kind, state, hash, reason) "
"ORDER BY k.key "
"ON CONFLICT (key) DO UPDATE "
"SET kind = EXCLUDED.kind, state = EXCLUDED.state, "
"    value_hash = EXCLUDED.value_hash, reason = EXCLUDED.reason, "
"    changed_at = EXCLUDED.changed_at";

/*
 * Start a transaction with a snapshot and SPI.  Statements of the worker
 * run with the privileges of the database user it connected as (the
 * bootstrap superuser).  end_work commits and goes back to the caller's
 * memory context (a commit leaves TopMemoryContext current).
 */
static MemoryContext work_caller = NULL;

static void
begin_work(const char *activity)
{
	work_caller = CurrentMemoryContext;
	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	PushActiveSnapshot(GetTransactionSnapshot());
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	pgstat_report_activity(STATE_RUNNING, activity);
	dwh_require_safe_schemas();
}

static void
end_work(void)
{
	SPI_finish();
	PopActiveSnapshot();
	CommitTransactionCommand();
	MemoryContextSwitchTo(work_caller);
	pgstat_report_activity(STATE_IDLE, NULL);
	pgstat_report_stat(false);
}

static void
prepare_plans(void)
{
	if (upsert_users_plan == NULL)
	{
		Oid			types[2] = {TEXTARRAYOID, JSONBARRAYOID};

		upsert_users_plan = dwh_prepare_kept(upsert_users_sql, 2, types);
	}
	if (upsert_restaurants_plan == NULL)
	{
		Oid			types[2] = {TEXTARRAYOID, JSONBARRAYOID};

		upsert_restaurants_plan = dwh_prepare_kept(upsert_restaurants_sql, 2, types);
	}
	if (dead_letters_plan == NULL)
	{
		Oid			types[6] = {TEXTARRAYOID, BYTEAARRAYOID, TEXTARRAYOID,
		TEXTARRAYOID, INT8ARRAYOID, BYTEAARRAYOID};

		dead_letters_plan = dwh_prepare_kept(dead_letters_sql, 6, types);
	}
	if (refused_keys_plan == NULL)
	{
		Oid			types[5] = {BYTEAARRAYOID, TEXTARRAYOID, TEXTARRAYOID,
		INT8ARRAYOID, BYTEAARRAYOID};

		refused_keys_plan = dwh_prepare_kept(refused_keys_sql, 5, types);
	}
	if (keys_plan == NULL)
	{
		Oid			types[5] = {TEXTARRAYOID, TEXTARRAYOID, TEXTARRAYOID,
		BYTEAARRAYOID, TEXTARRAYOID};

		keys_plan = dwh_prepare_kept(keys_sql, 5, types);
	}
}

/*
 * Forget the kept plans: after an error the extension may have been
 * dropped and created again, with other table OIDs.
 */
static void
forget_plans(void)
{
	upsert_users_plan = NULL;
	upsert_restaurants_plan = NULL;
	dead_letters_plan = NULL;
	refused_keys_plan = NULL;
	keys_plan = NULL;
}

/*
 * dwh_redis_store_ready
 *		Is the extension created, with the Redis worker's tables?  Runs in
 *		a transaction of its own.
 */
bool
dwh_redis_store_ready(void)
{
	MemoryContext caller = CurrentMemoryContext;
	bool		ready;
	Oid			nsp;

	StartTransactionCommand();
	nsp = get_namespace_oid("dwh", true);
	ready = OidIsValid(nsp) &&
		OidIsValid(get_relname_relid("redis_keys", nsp)) &&
		OidIsValid(get_relname_relid("redis_wanted", nsp));
	CommitTransactionCommand();
	MemoryContextSwitchTo(caller);
	if (!ready)
		forget_plans();
	return ready;
}

/* Run a statement that returns nothing; the number of rows it processed. */
static int
run(const char *sql, int expected)
{
	int			rc = SPI_execute(sql, false, 0);

	if (rc != expected)
		elog(ERROR, "statement failed: %s",
			 SPI_result_code_string(rc));
	return (int) SPI_processed;
}

/*
 * dwh_redis_store_take_wanted
 *		Move the ids queued by the hub trigger into dwh.redis_keys; returns
 *		how many keys are new to it.
 */
int
dwh_redis_store_take_wanted(void)
{
	int			added;

	begin_work("dwh: taking the Redis keys orders named");
	added = run("WITH w AS (DELETE FROM dwh.redis_wanted RETURNING key, kind) "
				"INSERT INTO dwh.redis_keys (key, kind, state) "
				"SELECT DISTINCT ON (key) key, kind, 'new' FROM w ORDER BY key "
				"ON CONFLICT (key) DO NOTHING",
				SPI_OK_INSERT);
	end_work();
	return added;
}

/*
 * dwh_redis_store_sync_hubs
 *		Add every user and restaurant id of DDS that dwh.redis_keys lacks
 *		(in case the queue missed some: keys restored from a backup, hubs
 *		written before the extension had its Redis objects).
 */
int
dwh_redis_store_sync_hubs(void)
{
	int			added;

	begin_work("dwh: comparing hubs with the Redis keys");
	added = run("INSERT INTO dwh.redis_keys (key, kind, state) "
				"SELECT key, kind, 'new' FROM ("
				"  SELECT h.user_id AS key, 'user' AS kind FROM dds.h_user h "
				"  WHERE NOT EXISTS (SELECT FROM dwh.redis_keys k WHERE k.key = h.user_id) "
				"  UNION ALL "
				"  SELECT h.restaurant_id, 'restaurant' FROM dds.h_restaurant h "
				"  WHERE NOT EXISTS (SELECT FROM dwh.redis_keys k WHERE k.key = h.restaurant_id)"
				") n ORDER BY key "
				"ON CONFLICT (key) DO NOTHING",
				SPI_OK_INSERT);
	end_work();
	return added;
}

/*
 * dwh_redis_key_refused
 *		Can a key found by SCAN not be a text key?  If so, fill refused
 *		(the kept bytes are palloc'd) and return true.  Lengths, never
 *		strlen: a key may hold NUL bytes.
 */
bool
dwh_redis_key_refused(const char *key, size_t len, DwhRedisRefusedKey *refused)
{
	const char *nul;

	memset(refused, 0, sizeof(DwhRedisRefusedKey));
	if (len == 0)
	{
		refused->sqlstate = ERRCODE_ZERO_LENGTH_CHARACTER_STRING;
		refused->reason = pstrdup("Redis key is empty: no order can name it (its value was not read)");
	}
	else if (len > DWH_MAX_KEY_LEN)
	{
		refused->sqlstate = ERRCODE_STRING_DATA_RIGHT_TRUNCATION;
		refused->reason = psprintf("Redis key of %zu bytes is longer than %d bytes, the longest id an order can name (raw holds the key; its value was not read)",
								   len, DWH_MAX_KEY_LEN);
	}
	else if ((nul = memchr(key, '\0', len)) != NULL)
	{
		refused->sqlstate = ERRCODE_CHARACTER_NOT_IN_REPERTOIRE;
		refused->reason = psprintf("Redis key holds a NUL byte at byte %d (raw holds the key; its value was not read)",
								   (int) (nul - key) + 1);
	}
	else if (!pg_verify_mbstr(PG_UTF8, key, (int) len, true))
	{
		refused->sqlstate = ERRCODE_CHARACTER_NOT_IN_REPERTOIRE;
		refused->reason = psprintf("Redis key is not valid UTF-8 from byte %d on (raw holds the key; its value was not read)",
								   pg_encoding_verifymbstr(PG_UTF8, key, (int) len) + 1);
	}
	else
		return false;

	refused->len = len;
	refused->kept = dwh_dead_letter_kept(len);
	refused->raw = palloc(Max(refused->kept, 1));
	memcpy(refused->raw, key, refused->kept);
	dwh_sha256(key, len, refused->sha256);
	return true;
}

/*
 * dwh_redis_store_refuse_keys
 *		Dead-letter the keys SCAN found that cannot be text keys, each once:
 *		one already dead-lettered (the same bytes) is left alone.  Returns
 *		how many are new.
 */
int
dwh_redis_store_refuse_keys(DwhRedisRefusedKey *keys, int n)
{
	DwhColumn	raw,
				reason,
				sqlstate,
				length,
				hash;
	Datum		args[5];
	int			i;
	int			rc;
	int			added;

	if (n == 0)
		return 0;
	begin_work("dwh: dead-lettering Redis keys that cannot be text");
	prepare_plans();
	dwh_column_init(&raw, BYTEAOID, n);
	dwh_column_init(&reason, TEXTOID, n);
	dwh_column_init(&sqlstate, TEXTOID, n);
	dwh_column_init(&length, INT8OID, n);
	dwh_column_init(&hash, BYTEAOID, n);
	for (i = 0; i < n; i++)
	{
		dwh_column_add(&raw, dwh_bytea_datum(keys[i].raw, (int) keys[i].kept), false);
		dwh_column_add(&reason, CStringGetTextDatum(keys[i].reason), false);
		dwh_column_add(&sqlstate,
					   CStringGetTextDatum(unpack_sql_state(keys[i].sqlstate)), false);
		dwh_column_add(&length, Int64GetDatum((int64) keys[i].len), false);
		dwh_column_add(&hash, dwh_bytea_datum(keys[i].sha256, DWH_SHA256_LEN), false);
	}
	args[0] = dwh_column_array(&raw);
	args[1] = dwh_column_array(&reason);
	args[2] = dwh_column_array(&sqlstate);
	args[3] = dwh_column_array(&length);
	args[4] = dwh_column_array(&hash);
	rc = SPI_execute_plan(refused_keys_plan, args, NULL, false, 0);
	if (rc != SPI_OK_INSERT)
		elog(ERROR, "could not record dead letters of Redis keys: %s",
			 SPI_result_code_string(rc));
	added = (int) SPI_processed;
	end_work();
	return added;
}

/*
 * dwh_redis_store_add_keys
 *		Record keys found by SCAN (each checked by dwh_redis_key_refused);
 *		those already known are left alone (and cost no write).  Returns
 *		how many are new.
 */
int
dwh_redis_store_add_keys(char **keys, size_t *lens, int n)
{
	DwhColumn	col;
	Datum		args[1];
	Oid			types[1] = {TEXTARRAYOID};
	int			i;
	int			rc;
	int			added;

	if (n == 0)
		return 0;
	begin_work("dwh: recording the Redis keys found by SCAN");
	dwh_column_init(&col, TEXTOID, n);
	for (i = 0; i < n; i++)
		dwh_column_add(&col, PointerGetDatum(cstring_to_text_with_len(keys[i], (int) lens[i])),
					   false);
	args[0] = dwh_column_array(&col);

	/*
	 * ON CONFLICT DO NOTHING probes the key's index before inserting: a known
	 * key costs one probe and writes nothing.  (An anti-join here would be
	 * planned as a hash join over the whole table, per batch.)
	 */
	rc = SPI_execute_with_args("INSERT INTO dwh.redis_keys (key, kind, state) "
							   "SELECT DISTINCT k, 'unknown', 'new' FROM unnest($1) k "
							   "ORDER BY 1 ON CONFLICT (key) DO NOTHING",
							   1, types, args, NULL, false, 0);
	if (rc != SPI_OK_INSERT)
		elog(ERROR, "could not record keys: %s",
			 SPI_result_code_string(rc));
	added = (int) SPI_processed;
	end_work();
	return added;
}

static DwhRedisKind
kind_from_name(const char *name)
{
	int			i;

	for (i = 0; i < lengthof(kind_names); i++)
		if (strcmp(name, kind_names[i]) == 0)
			return (DwhRedisKind) i;
	return DWH_REDIS_KIND_UNKNOWN;
}

static DwhRedisState
state_from_name(const char *name)
{
	int			i;

	for (i = 0; i < lengthof(state_names); i++)
		if (strcmp(name, state_names[i]) == 0)
			return (DwhRedisState) i;
	return DWH_REDIS_STATE_NEW;
}

/*
 * Run a query returning (key, kind, state, value_hash, reason) rows and
 * copy them into the caller's memory context (the reason of an excluded key
 * only: whether it is still the reason).
 */
static int
fetch_keys(const char *activity, const char *sql, int nargs, Oid *types,
		   Datum *args, DwhRedisKey **keys)
{
	MemoryContext caller = CurrentMemoryContext;
	DwhRedisKey *result;
	int			rc;
	uint64		i;
	int			n;

	begin_work(activity);
	rc = SPI_execute_with_args(sql, nargs, types, args, NULL, true, 0);
	if (rc != SPI_OK_SELECT)
		elog(ERROR, "could not read dwh.redis_keys: %s",
			 SPI_result_code_string(rc));
	n = (int) SPI_processed;
	result = MemoryContextAllocZero(caller, sizeof(DwhRedisKey) * Max(n, 1));
	for (i = 0; i < SPI_processed; i++)
	{
		HeapTuple	tup = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		DwhRedisKey *k = &result[i];
		bool		isnull;
		Datum		hash;
		text	   *key;

		key = DatumGetTextPP(SPI_getbinval(tup, desc, 1, &isnull));
		k->key_len = VARSIZE_ANY_EXHDR(key);
		k->key = MemoryContextAlloc(caller, k->key_len + 1);
		memcpy(k->key, VARDATA_ANY(key), k->key_len);
		k->key[k->key_len] = '\0';
		k->kind = kind_from_name(SPI_getvalue(tup, desc, 2));
		k->state = state_from_name(SPI_getvalue(tup, desc, 3));
		k->reason = SPI_getvalue(tup, desc, 5);
		if (k->reason != NULL)
			k->reason = MemoryContextStrdup(caller, k->reason);
		hash = SPI_getbinval(tup, desc, 4, &isnull);
		if (!isnull)
		{
			bytea	   *b = DatumGetByteaPP(hash);

			if (VARSIZE_ANY_EXHDR(b) == DWH_REDIS_HASH_LEN)
			{
				memcpy(k->hash, VARDATA_ANY(b), DWH_REDIS_HASH_LEN);
				k->has_hash = true;
			}
		}
	}
	end_work();
	*keys = result;
	return n;
}

/*
 * dwh_redis_store_new_keys
 *		Up to limit keys never read yet after the key "after" ("" for the
 *		first), in key order.  (A key read and left new, a large value
 *		written while it was read, is not listed again in the same round.)
 */
int
dwh_redis_store_new_keys(const char *after, int limit, DwhRedisKey **keys)
{
	Oid			types[2] = {TEXTOID, INT4OID};
	Datum		args[2] = {CStringGetTextDatum(after), Int32GetDatum(limit)};

	return fetch_keys("dwh: listing new Redis keys",
					  "SELECT key, kind, state, value_hash, NULL::text FROM dwh.redis_keys "
					  "WHERE state = 'new' AND key > $1 ORDER BY key LIMIT $2",
					  2, types, args, keys);
}

/*
 * dwh_redis_store_page
 *		Up to limit known keys after the key "after" ("" for the first
 *		page), in key order: one page of a refresh pass.
 */
int
dwh_redis_store_page(const char *after, int limit, DwhRedisKey **keys)
{
	Oid			types[2] = {TEXTOID, INT4OID};
	Datum		args[2] = {CStringGetTextDatum(after), Int32GetDatum(limit)};

	return fetch_keys("dwh: listing Redis keys to refresh",
					  "SELECT key, kind, state, value_hash, "
					  "       CASE WHEN state = 'excluded' THEN reason END "
					  "FROM dwh.redis_keys "
					  "WHERE key > $1 ORDER BY key LIMIT $2",
					  2, types, args, keys);
}

/* 128-bit hash of a value: two 64-bit hashes with different seeds. */
static void
value_hash(const char *data, size_t len, uint8 *out)
{
	uint64		h1 = hash_bytes_extended((const unsigned char *) data, (int) len,
										 UINT64CONST(0x6477682d72656469));
	uint64		h2 = hash_bytes_extended((const unsigned char *) data, (int) len,
										 UINT64CONST(0x7320646963742031));

	memcpy(out, &h1, 8);
	memcpy(out + 8, &h2, 8);
}

/* Is key's new hash the one last read (and the key read before)? */
static bool
value_unchanged(const DwhRedisKey *key)
{
	return key->has_hash && key->state != DWH_REDIS_STATE_NEW &&
		memcmp(key->hash, key->new_hash, DWH_REDIS_HASH_LEN) == 0;
}

/*
 * dwh_redis_key_denied
 *		Record that Redis refused the worker's user access to a key (NOPERM,
 *		text its answer): the key is excluded as one dwh.redis_key_pattern
 *		does not match is, with Redis's reason.
 */
void
dwh_redis_key_denied(DwhRedisKey *key, const char *text)
{
	key->found = false;
	key->changed = false;
	key->excluded = psprintf("Redis does not let the worker's user read the key: %s",
							 text);
}

/*
 * dwh_redis_value_seen
 *		Record what Redis holds under a key, a value no longer than
 *		dwh.redis_max_value_size (called while the reply is alive).  Only a
 *		changed value is copied.
 */
void
dwh_redis_value_seen(DwhRedisKey *key, bool found, const char *data,
					 size_t len)
{
	key->found = found;
	key->changed = false;
	if (!found)
		return;
	value_hash(data, len, key->new_hash);
	if (value_unchanged(key))
		return;
	key->changed = true;
	key->len = len;
	key->has_sha256 = false;
	key->value = palloc(len + 1);
	memcpy(key->value, data, len);
	key->value[len] = '\0';
	key->value_len = len;
}

/*
 * dwh_redis_large_value_seen
 *		Record a value larger than dwh.redis_max_value_size, read in chunks:
 *		its full length, the prefix its dead letter keeps and the SHA-256 of
 *		all of it, whose first bytes stand for its hash (its bytes were
 *		never all in memory at once).
 */
void
dwh_redis_large_value_seen(DwhRedisKey *key, int64 len, const char *prefix,
						   size_t kept, const uint8 *sha256)
{
	key->found = true;
	key->changed = false;
	memcpy(key->new_hash, sha256, DWH_REDIS_HASH_LEN);
	if (value_unchanged(key))
		return;
	key->changed = true;
	key->len = len;
	key->has_sha256 = true;
	memcpy(key->sha256, sha256, DWH_SHA256_LEN);
	key->value = palloc(kept + 1);
	memcpy(key->value, prefix, kept);
	key->value[kept] = '\0';
	key->value_len = kept;
}

/* Make d a dead letter. */
static void
decide_dead(Decision *d, DwhRedisKind kind, int sqlstate, const char *reason)
{
	d->target = TARGET_DEAD;
	d->kind = kind;
	d->state = DWH_REDIS_STATE_REFUSED;
	d->sqlstate = sqlstate;
	d->reason = pstrdup(dwh_valid_utf8(reason));
}

/*
 * What to do with a key: the classification of its value.
 */
static void
decide(DwhRedisKey *k, int max_value_size, Decision *d)
{
	DwhProblem	problem;
	Jsonb	   *value;
	JsonbValue	v;
	bool		has_ts;
	Timestamp	ts;

	memset(d, 0, sizeof(Decision));
	d->kind = k->kind;
	if (k->excluded != NULL)
	{
		d->state = DWH_REDIS_STATE_EXCLUDED;
		d->reason = pstrdup(dwh_valid_utf8(k->excluded));
		d->target = k->state == DWH_REDIS_STATE_EXCLUDED &&
			k->reason != NULL && strcmp(k->reason, d->reason) == 0 ?
			TARGET_NOTHING : TARGET_STATE;
		return;
	}
	if (!k->found)
	{
		d->state = DWH_REDIS_STATE_MISSING;
		d->target = k->state == DWH_REDIS_STATE_MISSING ? TARGET_NOTHING : TARGET_STATE;
		return;
	}
	if (!k->changed)
	{
		d->target = TARGET_NOTHING;
		return;
	}
	if (k->len > max_value_size)
	{
		decide_dead(d, k->kind, ERRCODE_PROGRAM_LIMIT_EXCEEDED,
					psprintf("value of " INT64_FORMAT " bytes exceeds dwh.redis_max_value_size (%d bytes)",
							 k->len, max_value_size));
		return;
	}

	value = dwh_json_parse(k->value, (int) k->len, &problem);
	if (value == NULL)
	{
		decide_dead(d, k->kind, problem.sqlstate, problem.reason);
		return;
	}
	if (!JB_ROOT_IS_OBJECT(value))
	{
		decide_dead(d, k->kind, ERRCODE_INVALID_TEXT_REPRESENTATION,
					"value must be a JSON object (a user or a restaurant)");
		return;
	}

	/* The shape decides: a menu makes a restaurant, a login a user. */
	if (getKeyJsonValueFromContainer(&value->root, "menu", 4, &v) != NULL)
	{
		if (!dwh_restaurant_value_check(&value->root, &has_ts, &ts, &problem))
		{
			decide_dead(d, DWH_REDIS_KIND_RESTAURANT, problem.sqlstate,
						psprintf("invalid restaurant: %s", problem.reason));
			return;
		}
		d->target = TARGET_RESTAURANT;
		d->kind = DWH_REDIS_KIND_RESTAURANT;
	}
	else if (getKeyJsonValueFromContainer(&value->root, "login", 5, &v) != NULL)
	{
		if (!dwh_user_value_check(&value->root, &has_ts, &ts, &problem))
		{
			decide_dead(d, DWH_REDIS_KIND_USER, problem.sqlstate,
						psprintf("invalid user: %s", problem.reason));
			return;
		}
		d->target = TARGET_USER;
		d->kind = DWH_REDIS_KIND_USER;
	}
	else
	{
		decide_dead(d, k->kind, ERRCODE_INVALID_TEXT_REPRESENTATION,
					"value of unknown shape: neither a restaurant (no \"menu\") nor a user (no \"login\")");
		return;
	}
	d->state = DWH_REDIS_STATE_MIRRORED;
	d->payload = value;
}

/*
 * Upsert n values into a table of values (plan: upsert_users_plan or
 * upsert_restaurants_plan), in statements of at most max_bytes of values
 * each, one value at least.  What writing a value costs (a menu's dishes,
 * names and links, its history) lasts until its statement ends, some two
 * hundred times the value's size for a large menu: in one statement, a
 * batch of large values would cost that for all of them at once.  Returns
 * the rows written.
 */
static int
upsert_values(SPIPlanPtr plan, const char *what, Datum *keys, Datum *payloads,
			  int n, int max_bytes)
{
	int			written = 0;
	int			first = 0;

	while (first < n)
	{
		int64		bytes = VARSIZE_ANY(DatumGetPointer(payloads[first]));
		int			last = first + 1;
		DwhColumn	k,
					p;
		Datum		args[2];
		int			i;
		int			rc;

		while (last < n &&
			   bytes + VARSIZE_ANY(DatumGetPointer(payloads[last])) <= max_bytes)
		{
			/* VARSIZE_ANY reads its argument more than once */
			bytes += VARSIZE_ANY(DatumGetPointer(payloads[last]));
			last++;
		}
		dwh_column_init(&k, TEXTOID, last - first);
		dwh_column_init(&p, JSONBOID, last - first);
		for (i = first; i < last; i++)
		{
			dwh_column_add(&k, keys[i], false);
			dwh_column_add(&p, payloads[i], false);
		}
		args[0] = dwh_column_array(&k);
		args[1] = dwh_column_array(&p);
		rc = SPI_execute_plan(plan, args, NULL, false, 0);
		if (rc != SPI_OK_INSERT)
			elog(ERROR, "could not store %s: %s", what, SPI_result_code_string(rc));
		written += (int) SPI_processed;
		pfree(DatumGetPointer(args[0]));
		pfree(DatumGetPointer(args[1]));
		first = last;
	}
	return written;
}

/*
 * Write the decisions of the keys idx[0..n): restaurants and users in
 * statements of at most max_bytes of values each, dead letters and key
 * states in one statement each.  Raises an error if a statement fails.
 */
static void
write_decisions(DwhRedisKey *keys, Decision *decisions, int *idx, int n,
				int max_bytes, DwhRedisApplyResult *result)
{
	Datum	   *u_key = palloc(sizeof(Datum) * n);
	Datum	   *u_payload = palloc(sizeof(Datum) * n);
	Datum	   *r_key = palloc(sizeof(Datum) * n);
	Datum	   *r_payload = palloc(sizeof(Datum) * n);
	int			n_users = 0;
	int			n_restaurants = 0;
	DwhColumn	d_key,
				d_raw,
				d_reason,
				d_sqlstate,
				d_length,
				d_hash,
				k_key,
				k_kind,
				k_state,
				k_hash,
				k_reason;
	int			i;
	int			rc;

	dwh_column_init(&d_key, TEXTOID, n);
	dwh_column_init(&d_raw, BYTEAOID, n);
	dwh_column_init(&d_reason, TEXTOID, n);
	dwh_column_init(&d_sqlstate, TEXTOID, n);
	dwh_column_init(&d_length, INT8OID, n);
	dwh_column_init(&d_hash, BYTEAOID, n);
	dwh_column_init(&k_key, TEXTOID, n);
	dwh_column_init(&k_kind, TEXTOID, n);
	dwh_column_init(&k_state, TEXTOID, n);
	dwh_column_init(&k_hash, BYTEAOID, n);
	dwh_column_init(&k_reason, TEXTOID, n);

	for (i = 0; i < n; i++)
	{
		DwhRedisKey *k = &keys[idx[i]];
		Decision   *d = &decisions[idx[i]];
		Datum		key = PointerGetDatum(cstring_to_text_with_len(k->key,
																   (int) k->key_len));

		if (d->target == TARGET_NOTHING)
			continue;
		if (d->target == TARGET_USER)
		{
			u_key[n_users] = key;
			u_payload[n_users++] = JsonbPGetDatum(d->payload);
		}
		else if (d->target == TARGET_RESTAURANT)
		{
			r_key[n_restaurants] = key;
			r_payload[n_restaurants++] = JsonbPGetDatum(d->payload);
		}
		else if (d->target == TARGET_DEAD)
		{
			int64		kept = Min(k->value_len, (int64) dwh_dead_letter_kept(k->len));

			dwh_column_add(&d_key, key, false);
			dwh_column_add(&d_raw, dwh_bytea_datum(k->value, (int) kept), false);
			dwh_column_add(&d_length, Int64GetDatum(k->len), false);
			dwh_column_add(&d_hash,
						   k->has_sha256 ?
						   dwh_bytea_datum(k->sha256, DWH_SHA256_LEN) :
						   dwh_sha256_datum(k->value, k->value_len),
						   false);
			dwh_column_add(&d_reason, CStringGetTextDatum(d->reason), false);
			dwh_column_add(&d_sqlstate,
						   CStringGetTextDatum(unpack_sql_state(d->sqlstate)), false);
		}
		dwh_column_add(&k_key, key, false);
		dwh_column_add(&k_kind, CStringGetTextDatum(kind_names[d->kind]), false);
		dwh_column_add(&k_state, CStringGetTextDatum(state_names[d->state]), false);
		dwh_column_add(&k_hash, dwh_bytea_datum(k->new_hash, DWH_REDIS_HASH_LEN),
					   !k->found);
		dwh_column_add(&k_reason, d->reason ? CStringGetTextDatum(d->reason) : (Datum) 0,
					   d->reason == NULL);
		if (k->found)
			result->values_changed++;
		result->states_changed++;
	}

	/*
	 * Restaurants first: a menu takes the dictionary lock exclusive, and a
	 * transaction that has inserted user hubs before waiting for it could
	 * deadlock with an order batch that holds it shared and waits for one of
	 * those hub rows (step 1 of the lock order, install/40_products.sql,
	 * comes before step 2).
	 */
	result->stg_written += upsert_values(upsert_restaurants_plan, "restaurants",
										 r_key, r_payload, n_restaurants,
										 max_bytes);
	result->stg_written += upsert_values(upsert_users_plan, "users",
										 u_key, u_payload, n_users, max_bytes);
	if (d_key.n > 0)
	{
		Datum		args[6] = {dwh_column_array(&d_key), dwh_column_array(&d_raw),
			dwh_column_array(&d_reason), dwh_column_array(&d_sqlstate),
		dwh_column_array(&d_length), dwh_column_array(&d_hash)};

		rc = SPI_execute_plan(dead_letters_plan, args, NULL, false, 0);
		if (rc != SPI_OK_INSERT)
			elog(ERROR, "could not record dead letters: %s", SPI_result_code_string(rc));
		result->dead_lettered += d_key.n;
	}
	if (k_key.n > 0)
	{
		Datum		args[5] = {dwh_column_array(&k_key), dwh_column_array(&k_kind),
			dwh_column_array(&k_state), dwh_column_array(&k_hash),
		dwh_column_array(&k_reason)};
		char		nulls[5];
		int			j;

		for (j = 0; j < 5; j++)
			nulls[j] = ' ';
		rc = SPI_execute_plan(keys_plan, args, nulls, false, 0);
		if (rc != SPI_OK_INSERT)
			elog(ERROR, "could not record Redis key states: %s", SPI_result_code_string(rc));
	}
}

/* The arguments of write_decisions, for dwh_try_in_subtransaction. */
typedef struct WriteCall
{
	DwhRedisKey *keys;
	Decision   *decisions;
	int		   *idx;
	int			n;
	int			max_bytes;
	DwhRedisApplyResult *result;
} WriteCall;

static void
write_call(void *arg)
{
	WriteCall  *c = (WriteCall *) arg;

	write_decisions(c->keys, c->decisions, c->idx, c->n, c->max_bytes,
					c->result);
}

/*
 * write_decisions in a subtransaction.  Returns NULL on success, or the
 * error if it is about the data; any other error is raised again.  The
 * counts of a rolled back attempt are not added to result.
 */
static ErrorData *
write_in_subtransaction(DwhRedisKey *keys, Decision *decisions, int *idx,
						int n, int max_bytes, DwhRedisApplyResult *result)
{
	DwhRedisApplyResult partial = {0};
	WriteCall	call = {keys, decisions, idx, n, max_bytes, &partial};
	ErrorData  *edata = dwh_try_in_subtransaction(write_call, &call);

	if (edata == NULL)
	{
		result->stg_written += partial.stg_written;
		result->dead_lettered += partial.dead_lettered;
		result->values_changed += partial.values_changed;
		result->states_changed += partial.states_changed;
	}
	return edata;
}

/*
 * A batch writing users or restaurants takes the dictionary lock and the
 * user lock exclusive first, in the lock order (install/40_products.sql).
 * Its restaurants and its users are two writes of one transaction, and so
 * is each value written again alone after the batch failed: a later write
 * that takes the two locks at once, or is refused (src/dwh_locks.c),
 * finds them held.
 */
static void
take_write_locks(const Decision *decisions, const int *idx, int n)
{
	int			i;

	for (i = 0; i < n; i++)
		if (decisions[idx[i]].target == TARGET_USER ||
			decisions[idx[i]].target == TARGET_RESTAURANT)
			break;
	if (i == n)
		return;
	run("SELECT dwh.xact_lock(dwh.dictionary_lock_key(), true)", SPI_OK_SELECT);
	run("SELECT dwh.xact_lock(dwh.user_lock_key(), true)", SPI_OK_SELECT);
}

/*
 * dwh_redis_store_apply
 *		Classify and write a batch of keys whose values were read, in one
 *		transaction.
 */
void
dwh_redis_store_apply(DwhRedisKey *keys, int n, int max_value_size,
					  DwhRedisApplyResult *result)
{
	Decision   *decisions = palloc(sizeof(Decision) * Max(n, 1));
	int		   *idx = palloc(sizeof(int) * Max(n, 1));
	int			n_idx = 0;
	ErrorData  *edata;
	int			i;

	memset(result, 0, sizeof(DwhRedisApplyResult));

	/*
	 * Classified in the transaction that writes them: parsing a value may
	 * need a subtransaction (dwh_json_parse).  A batch with nothing to write
	 * commits a transaction that wrote nothing.
	 */
	begin_work("dwh: writing Redis values");
	for (i = 0; i < n; i++)
	{
		CHECK_FOR_INTERRUPTS();
		decide(&keys[i], max_value_size, &decisions[i]);
	}
	/* Restaurants first, as in write_decisions, for the one-by-one pass. */
	for (i = 0; i < n; i++)
		if (decisions[i].target == TARGET_RESTAURANT)
			idx[n_idx++] = i;
	for (i = 0; i < n; i++)
		if (decisions[i].target != TARGET_NOTHING &&
			decisions[i].target != TARGET_RESTAURANT)
			idx[n_idx++] = i;
	if (n_idx == 0)
	{
		end_work();
		return;
	}

	prepare_plans();
	take_write_locks(decisions, idx, n_idx);
	edata = write_in_subtransaction(keys, decisions, idx, n_idx,
									max_value_size, result);
	if (edata != NULL)
	{
		/* Isolate the culprits: one subtransaction per key. */
		FreeErrorData(edata);
		for (i = 0; i < n_idx; i++)
		{
			Decision   *d = &decisions[idx[i]];

			CHECK_FOR_INTERRUPTS();
			edata = write_in_subtransaction(keys, decisions, &idx[i], 1,
											max_value_size, result);
			if (edata == NULL)
				continue;
			if (d->target == TARGET_DEAD || d->target == TARGET_STATE)
				ReThrowError(edata);	/* not the value's fault */
			decide_dead(d, d->kind, edata->sqlerrcode, edata->message);
			FreeErrorData(edata);
			write_decisions(keys, decisions, &idx[i], 1, max_value_size,
							result);
		}
	}
	end_work();
}

/*
 * dwh_redis_store_counts
 *		Keys mirrored, and keys wanted but without a value in STG from
 *		Redis (missing there, refused, or excluded by dwh.redis_key_pattern).
 */
void
dwh_redis_store_counts(int64 *mirrored, int64 *missing)
{
	int			rc;
	bool		isnull;

	begin_work("dwh: counting Redis keys");
	rc = SPI_execute("SELECT pg_catalog.count(*) FILTER (WHERE state = 'mirrored'), "
					 "       pg_catalog.count(*) FILTER (WHERE state IN ('missing', 'refused', 'excluded')) "
					 "FROM dwh.redis_keys", true, 0);
	if (rc != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "could not count keys: %s",
			 SPI_result_code_string(rc));
	*mirrored = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0],
											SPI_tuptable->tupdesc, 1, &isnull));
	*missing = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0],
										   SPI_tuptable->tupdesc, 2, &isnull));
	end_work();
}
