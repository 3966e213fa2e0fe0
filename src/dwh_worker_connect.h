/*-------------------------------------------------------------------------
 *
 * dwh_worker_connect.h
 *	  A background worker's connection to dwh.database, waiting for a
 *	  database that does not exist instead of failing again and again.
 *
 *-------------------------------------------------------------------------
 */
#ifndef DWH_WORKER_CONNECT_H
#define DWH_WORKER_CONNECT_H

#include "dwh_status.h"

extern char *dwh_worker_connect(DwhWorkerStatus *slot);

#endif							/* DWH_WORKER_CONNECT_H */
