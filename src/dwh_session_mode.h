/*-------------------------------------------------------------------------
 *
 * dwh_session_mode.h
 *	  What kind of session writes the warehouse: one restoring a dump, one
 *	  in a READ COMMITTED transaction.
 *
 *-------------------------------------------------------------------------
 */
#ifndef DWH_SESSION_MODE_H
#define DWH_SESSION_MODE_H

extern bool dwh_session_restores(void);
extern void dwh_require_read_committed(void);
extern void dwh_require_triggers(void);

#endif							/* DWH_SESSION_MODE_H */
