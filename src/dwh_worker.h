/*-------------------------------------------------------------------------
 *
 * dwh_worker.h
 *	  What the Kafka, Redis and tags background workers share: registration,
 *	  start-up and connection, latch waits, states logged once, reload,
 *	  readiness and error recovery.
 *
 *-------------------------------------------------------------------------
 */
#ifndef DWH_WORKER_H
#define DWH_WORKER_H

#include <pthread.h>

#include "dwh_status.h"

/* Waits between attempts after an error: doubled from MIN up to MAX. */
#define DWH_WORKER_BACKOFF_MIN_MS	500
#define DWH_WORKER_BACKOFF_MAX_MS	30000

/* How often a worker that is not ready checks again. */
#define DWH_WORKER_RECHECK_MS		5000

extern bool dwh_workers_registered;
extern void dwh_workers_register(void);

extern DwhWorkerStatus *dwh_worker_start(DwhWorkerKind kind, int index);
extern void dwh_worker_wait(long timeout_ms);
extern void dwh_worker_backoff(long timeout_ms);
extern void dwh_worker_wait_for_signal(void);
extern int	dwh_worker_next_backoff(int backoff_ms);
extern int	dwh_worker_start_thread(pthread_t *thread,
									void *(*thread_main) (void *), void *arg);

extern void dwh_worker_set_state_logged(const char *state, const char *hint);
extern bool dwh_worker_note_logged(const char *text);
extern void dwh_worker_forget_logged(void);

extern bool dwh_worker_reload(void);
extern bool dwh_worker_ready(bool (*tables_present) (void));
extern void dwh_worker_recover(int *backoff_ms);

#endif							/* DWH_WORKER_H */
