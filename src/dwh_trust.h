/*-------------------------------------------------------------------------
 *
 * dwh_trust.h
 *	  Only superusers may change what dwh's schemas hold.
 *
 *-------------------------------------------------------------------------
 */
#ifndef DWH_TRUST_H
#define DWH_TRUST_H

extern char *dwh_schemas_unsafe(char **fix);
extern void dwh_require_safe_schemas(void);

#endif							/* DWH_TRUST_H */
