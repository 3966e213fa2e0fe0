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
 * Loaded by a session, not preloaded: the secret settings are PostgreSQL's
 * placeholders in every process that has not loaded dwh (the postmaster
 * included), where any role can read them and a reload logs them.  Say so
 * while they hold a value.
 */
static void
warn_unprotected_secrets(void)
{
	if ((dwh_redis_url == NULL || dwh_redis_url[0] == '\0') &&
		(dwh_kafka_options == NULL || dwh_kafka_options[0] == '\0'))
		return;
	ereport(WARNING,
			(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
			 errmsg("dwh is not in shared_preload_libraries: its secret settings are not protected"),
			 errdetail("dwh.redis_url or dwh.kafka_options holds a value, which any role can read in a session that has not loaded dwh, and which a reload logs."),
			 errhint("Add dwh to shared_preload_libraries and restart the server, or keep the secrets in the files named by dwh.redis_url_file and dwh.kafka_options_file.")));
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
	{
		warn_unprotected_secrets();
		return;
	}

	previous_shmem_request_hook = shmem_request_hook;
	shmem_request_hook = dwh_shmem_request;
	previous_shmem_startup_hook = shmem_startup_hook;
	shmem_startup_hook = dwh_shmem_startup;

	/* pg_upgrade's server must not consume anything. */
	if (!IsBinaryUpgrade)
		dwh_workers_register();
}
