/*-------------------------------------------------------------------------
 *
 * dwh_redis_worker.h
 *	  The Redis dictionary background worker.
 *
 *-------------------------------------------------------------------------
 */
#ifndef DWH_REDIS_WORKER_H
#define DWH_REDIS_WORKER_H

extern void dwh_redis_register_worker(void);

#endif							/* DWH_REDIS_WORKER_H */
