/*-------------------------------------------------------------------------
 *
 * dwh_secrets.h
 *	  Keep the secrets of dwh settings out of the server log.
 *
 *-------------------------------------------------------------------------
 */
#ifndef DWH_SECRETS_H
#define DWH_SECRETS_H

extern void dwh_secrets_install_log_filter(void);

#endif							/* DWH_SECRETS_H */
