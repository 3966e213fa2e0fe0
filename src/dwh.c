/*-------------------------------------------------------------------------
 *
 * dwh.c
 *	  Module entry point of the dwh extension.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "fmgr.h"
#include "miscadmin.h"
#include "storage/ipc.h"

#include "dwh_inflight.h"
#include "dwh_secrets.h"
#include "dwh_settings.h"
#include "dwh_status.h"
#include "dwh_worker.h"

PG_MODULE_MAGIC;

void		_PG_init(void);

static shmem_request_hook_type previous_shmem_request_hook = NULL;
static shmem_startup_hook_type previous_shmem_startup_hook = NULL;

static void
dwh_shmem_request(void)
{
	if (previous_shmem_request_hook)
		previous_shmem_request_hook();
	dwh_status_shmem_request();
	dwh_inflight_shmem_request();
}

static void
dwh_shmem_startup(void)
{
	if (previous_shmem_startup_hook)
		previous_shmem_startup_hook();
	dwh_status_shmem_startup();
	dwh_inflight_shmem_startup();
	/* Every preloaded library has installed its hooks by now. */
	dwh_secrets_check_hook_order();
}

/*
 * _PG_init
 *		Define the settings; when preloaded, also reserve the shared status
 *		and register the background workers.  No library thread and no
 *		connection is made here: when preloaded this runs in the postmaster.
 */
void
_PG_init(void)
{
	dwh_settings_define();
	dwh_secrets_install_hooks();

	if (!process_shared_preload_libraries_in_progress)
		return;

	previous_shmem_request_hook = shmem_request_hook;
	shmem_request_hook = dwh_shmem_request;
	previous_shmem_startup_hook = shmem_startup_hook;
	shmem_startup_hook = dwh_shmem_startup;

	/* pg_upgrade's server must not consume anything. */
	if (!IsBinaryUpgrade)
		dwh_workers_register();
}
