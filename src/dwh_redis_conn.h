/*-------------------------------------------------------------------------
 *
 * dwh_redis_conn.h
 *	  A connection to Redis whose every exchange is bounded in time and
 *	  interruptible: hiredis in non-blocking mode, the worker sleeping in
 *	  WaitEventSetWait on its latch and the connection's socket.
 *
 *-------------------------------------------------------------------------
 */
#ifndef DWH_REDIS_CONN_H
#define DWH_REDIS_CONN_H

#include "dwh_redis_url.h"

typedef struct DwhRedisConn DwhRedisConn;

/* Why an exchange with Redis failed. */
typedef struct DwhRedisError
{
	int			sqlstate;		/* ERRCODE_* */
	bool		transient;		/* retry as is (down, restarting, timeout) */
	char		message[512];	/* never holds the password */
	const char *hint;			/* NULL or a sentence */
} DwhRedisError;

/* What Redis answered for a key. */
typedef enum DwhRedisAnswer
{
	DWH_REDIS_VALUE,			/* a string: data and len */
	DWH_REDIS_NO_VALUE,			/* no key, or another type than a string */
	DWH_REDIS_DENIED			/* NOPERM (its ACL): data is Redis's text */
} DwhRedisAnswer;

/* Called once per key read, in key order, while the reply is alive. */
typedef void (*DwhRedisValueFn) (void *arg, int index, DwhRedisAnswer answer,
								 const char *data, size_t len);

/* Called with each chunk of a value streamed, in order. */
typedef void (*DwhRedisChunkFn) (void *arg, const char *data, size_t len);

/* What dwh_redis_stream_value() did. */
typedef enum DwhRedisStreamResult
{
	DWH_REDIS_STREAM_READ,		/* the whole value, as it was throughout */
	DWH_REDIS_STREAM_CHANGED,	/* written meanwhile, or not a string */
	DWH_REDIS_STREAM_FAILED		/* the exchange failed: error is set */
} DwhRedisStreamResult;

/* Called once per key returned by a SCAN step: any bytes, NUL included. */
typedef void (*DwhRedisKeyFn) (void *arg, const char *key, size_t len);

extern DwhRedisConn *dwh_redis_connect(const DwhRedisUrl *url, int timeout_ms,
									   DwhRedisError *error);
extern void dwh_redis_disconnect(DwhRedisConn *conn);
extern bool dwh_redis_conn_is_clean(DwhRedisConn *conn);
extern bool dwh_redis_read_values(DwhRedisConn *conn, char **keys,
								  const size_t *lens, int n, int max_len,
								  DwhRedisValueFn fn, void *arg,
								  DwhRedisError *error);
extern DwhRedisStreamResult dwh_redis_stream_value(DwhRedisConn *conn,
												   const char *key,
												   size_t key_len,
												   int chunk_len,
												   DwhRedisChunkFn fn,
												   void *arg, int64 *length,
												   DwhRedisError *error);
extern bool dwh_redis_scan(DwhRedisConn *conn, const char *cursor,
						   const char *pattern, int count,
						   char *next_cursor, size_t next_cursor_size,
						   DwhRedisKeyFn fn, void *arg,
						   DwhRedisError *error);

#endif							/* DWH_REDIS_CONN_H */
