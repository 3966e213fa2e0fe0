/*-------------------------------------------------------------------------
 *
 * dwh_locks.h
 *	  dwh's transaction locks (src/dwh_locks.c).
 *
 *-------------------------------------------------------------------------
 */
#ifndef DWH_LOCKS_H
#define DWH_LOCKS_H

extern void dwh_locks_ingest_begin(void);
extern void dwh_locks_ingest_end(void);

#endif							/* DWH_LOCKS_H */
