/*-------------------------------------------------------------------------
 *
 * dwh_settings.c
 *	  Definition of the dwh.* configuration parameters.
 *
 * Every setting is documented in README.md; keep the two in step.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "utils/guc.h"

#include "dwh_settings.h"

char	   *dwh_database = NULL;
int			dwh_max_message_size = 1024 * 1024;

/*
 * dwh_settings_define
 *		Define every dwh.* parameter and reserve the prefix, so that a
 *		misspelt dwh.* setting is reported instead of silently ignored.
 */
void
dwh_settings_define(void)
{
	DefineCustomStringVariable("dwh.database",
							   "Database whose warehouse the dwh background workers serve.",
							   NULL,
							   &dwh_database,
							   "postgres",
							   PGC_SIGHUP,
							   0,
							   NULL, NULL, NULL);

	DefineCustomIntVariable("dwh.max_message_size",
							"Largest message value accepted for ingestion; larger ones are dead-lettered.",
							NULL,
							&dwh_max_message_size,
							1024 * 1024,
							1024,
							64 * 1024 * 1024,
							PGC_SUSET,
							GUC_UNIT_BYTE,
							NULL, NULL, NULL);

	MarkGUCPrefixReserved("dwh");
}
