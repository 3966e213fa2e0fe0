/*-------------------------------------------------------------------------
 *
 * dwh_redis_url.h
 *	  dwh.redis_url: where the Redis dictionaries live, its syntax, its
 *	  validation and its redacted form for logs and status.
 *
 *-------------------------------------------------------------------------
 */
#ifndef DWH_REDIS_URL_H
#define DWH_REDIS_URL_H

#include "utils/guc.h"

#define DWH_REDIS_DEFAULT_PORT	6379
#define DWH_REDIS_HOST_LEN		256
#define DWH_REDIS_PATH_LEN		108 /* sizeof(sun_path) on Linux */
#define DWH_REDIS_SECRET_LEN	512

/*
 * A parsed dwh.redis_url.  One flat block, so that it can be a GUC "extra"
 * (which is released with free()).
 */
typedef struct DwhRedisUrl
{
	bool		unix_socket;
	char		host[DWH_REDIS_HOST_LEN];	/* TCP: host name or address */
	char		path[DWH_REDIS_PATH_LEN];	/* unix socket: its path */
	int			port;
	int			db;
	char		username[DWH_REDIS_SECRET_LEN]; /* empty: the default user */
	char		password[DWH_REDIS_SECRET_LEN]; /* empty: no AUTH */
} DwhRedisUrl;

extern bool dwh_redis_url_parse(const char *text, DwhRedisUrl *url,
								char *error, size_t error_size);
extern void dwh_redis_url_redacted(const DwhRedisUrl *url, char *buf,
								   size_t size);
extern const DwhRedisUrl *dwh_redis_url_current(void);

extern bool dwh_redis_url_check(char **newval, void **extra, GucSource source);
extern void dwh_redis_url_assign(const char *newval, void *extra);

#endif							/* DWH_REDIS_URL_H */
