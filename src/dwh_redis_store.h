/*-------------------------------------------------------------------------
 *
 * dwh_redis_store.h
 *	  The database side of the Redis worker: which keys to read, and one
 *	  set-based write per batch of values into STG, dead letters and
 *	  dwh.redis_keys.
 *
 *-------------------------------------------------------------------------
 */
#ifndef DWH_REDIS_STORE_H
#define DWH_REDIS_STORE_H

#include "dwh_dead_letter.h"

#define DWH_REDIS_HASH_LEN	16

typedef enum DwhRedisKind
{
	DWH_REDIS_KIND_UNKNOWN = 0, /* found by SCAN, never read yet */
	DWH_REDIS_KIND_USER,
	DWH_REDIS_KIND_RESTAURANT
} DwhRedisKind;

typedef enum DwhRedisState
{
	DWH_REDIS_STATE_NEW = 0,	/* named by an order or found by SCAN */
	DWH_REDIS_STATE_MIRRORED,	/* its value is in STG */
	DWH_REDIS_STATE_MISSING,	/* Redis has no string under this key */
	DWH_REDIS_STATE_REFUSED,	/* its value was dead-lettered */
	DWH_REDIS_STATE_EXCLUDED	/* not read: dwh.redis_key_pattern, an ACL */
} DwhRedisState;

/* One key of a batch: what the database knows, then what Redis said. */
typedef struct DwhRedisKey
{
	char	   *key;			/* valid UTF-8, no NUL: text */
	size_t		key_len;
	DwhRedisKind kind;
	DwhRedisState state;
	bool		has_hash;
	uint8		hash[DWH_REDIS_HASH_LEN];	/* of the last value read */
	char	   *reason;			/* its reason, when it was excluded */
	const char *excluded;		/* why it is not read now, or NULL */
	/* Filled from what Redis answered. */
	bool		found;
	bool		changed;		/* found, and its hash differs */
	uint8		new_hash[DWH_REDIS_HASH_LEN];
	char	   *value;			/* a copy, only when changed */
	int64		value_len;		/* bytes in the copy */
	int64		len;			/* its full length in Redis */
	bool		has_sha256;		/* sha256 is set (the copy is a prefix) */
	uint8		sha256[DWH_SHA256_LEN]; /* of the whole value */
} DwhRedisKey;

/*
 * A key found by SCAN that cannot be a text key: not valid UTF-8, a NUL
 * byte, or longer than any id an order can name.  Its dead letter keeps
 * the key's bytes as a value's would be kept.
 */
typedef struct DwhRedisRefusedKey
{
	char	   *raw;			/* the first kept bytes of the key */
	size_t		kept;
	size_t		len;			/* the key's full length */
	uint8		sha256[DWH_SHA256_LEN]; /* of the whole key */
	int			sqlstate;
	char	   *reason;
} DwhRedisRefusedKey;

/* What a batch did. */
typedef struct DwhRedisApplyResult
{
	int			stg_written;	/* STG rows inserted or changed */
	int			dead_lettered;
	int			values_changed; /* values whose hash differed */
	int			states_changed; /* keys whose state was written */
} DwhRedisApplyResult;

extern bool dwh_redis_store_ready(void);
extern int	dwh_redis_store_take_wanted(void);
extern int	dwh_redis_store_sync_hubs(void);
extern bool dwh_redis_key_refused(const char *key, size_t len,
								  DwhRedisRefusedKey *refused);
extern int	dwh_redis_store_add_keys(char **keys, size_t *lens, int n);
extern int	dwh_redis_store_refuse_keys(DwhRedisRefusedKey *keys, int n);
extern int	dwh_redis_store_new_keys(const char *after, int limit,
									 DwhRedisKey **keys);
extern int	dwh_redis_store_page(const char *after, int limit,
								 DwhRedisKey **keys);
extern void dwh_redis_key_denied(DwhRedisKey *key, const char *text);
extern void dwh_redis_value_seen(DwhRedisKey *key, bool found,
								 const char *data, size_t len);
extern void dwh_redis_large_value_seen(DwhRedisKey *key, int64 len,
									   const char *prefix, size_t kept,
									   const uint8 *sha256);
extern void dwh_redis_store_apply(DwhRedisKey *keys, int n,
								  int max_value_size,
								  DwhRedisApplyResult *result);
extern void dwh_redis_store_counts(int64 *mirrored, int64 *missing);

#endif							/* DWH_REDIS_STORE_H */
