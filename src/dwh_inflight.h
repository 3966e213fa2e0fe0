/*-------------------------------------------------------------------------
 *
 * dwh_inflight.h
 *	  The orders each Kafka worker is applying, for the other workers.
 *
 *-------------------------------------------------------------------------
 */
#ifndef DWH_INFLIGHT_H
#define DWH_INFLIGHT_H

extern void dwh_inflight_shmem_request(void);
extern void dwh_inflight_shmem_startup(void);

extern bool dwh_inflight_claim(int worker, int64 object_id);
extern void dwh_inflight_clear(int worker);

#endif							/* DWH_INFLIGHT_H */
