/*-------------------------------------------------------------------------
 *
 * dwh_secrets.h
 *	  Keep the values of secret dwh settings out of the server log, the
 *	  messages sent to clients, pg_stat_activity and pg_stat_statements.
 *
 *-------------------------------------------------------------------------
 */
#ifndef DWH_SECRETS_H
#define DWH_SECRETS_H

extern void dwh_secrets_install_hooks(void);
extern void dwh_secrets_check_hook_order(void);
extern void dwh_secrets_vouch_message(const char *message);

#endif							/* DWH_SECRETS_H */
