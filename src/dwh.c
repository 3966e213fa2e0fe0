/*-------------------------------------------------------------------------
 *
 * dwh.c
 *	  Module entry point of the dwh extension.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "fmgr.h"

#include "dwh_settings.h"

PG_MODULE_MAGIC;

void		_PG_init(void);

/*
 * _PG_init
 *		Define the settings.  No library thread and no connection is made
 *		here: when preloaded this runs in the postmaster.
 */
void
_PG_init(void)
{
	dwh_settings_define();
}
