/*-------------------------------------------------------------------------
 *
 * dwh_redis_glob.h
 *	  Redis glob patterns (SCAN MATCH's language), matched in the worker.
 *
 *-------------------------------------------------------------------------
 */
#ifndef DWH_REDIS_GLOB_H
#define DWH_REDIS_GLOB_H

extern bool dwh_redis_glob_match(const char *pattern, const char *key,
								 size_t key_len);
extern const char *dwh_redis_glob_problem(const char *pattern);

#endif							/* DWH_REDIS_GLOB_H */
