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

/*
 * Called once per key of an MGET, in key order, while the reply is alive:
 * found is false when the key holds no string (absent, or another type).
 */
typedef void (*DwhRedisValueFn) (void *arg, int index, bool found,
								 const char *data, size_t len);

/* Called once per key returned by a SCAN step: any bytes, NUL included. */
typedef void (*DwhRedisKeyFn) (void *arg, const char *key, size_t len);

extern DwhRedisConn *dwh_redis_connect(const DwhRedisUrl *url, int timeout_ms,
									   DwhRedisError *error);
extern void dwh_redis_disconnect(DwhRedisConn *conn);
extern bool dwh_redis_conn_is_clean(DwhRedisConn *conn);
extern bool dwh_redis_mget(DwhRedisConn *conn, char **keys,
						   const size_t *lens, int n,
						   DwhRedisValueFn fn, void *arg,
						   DwhRedisError *error);
extern bool dwh_redis_scan(DwhRedisConn *conn, const char *cursor,
						   const char *pattern, int count,
						   char *next_cursor, size_t next_cursor_size,
						   DwhRedisKeyFn fn, void *arg,
						   DwhRedisError *error);

#endif							/* DWH_REDIS_CONN_H */
