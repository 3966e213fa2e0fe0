/*-------------------------------------------------------------------------
 *
 * dwh_settings.h
 *	  The dwh.* configuration parameters.
 *
 *-------------------------------------------------------------------------
 */
#ifndef DWH_SETTINGS_H
#define DWH_SETTINGS_H

extern char *dwh_database;
extern int	dwh_max_message_size;

extern void dwh_settings_define(void);

#endif							/* DWH_SETTINGS_H */
