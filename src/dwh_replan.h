/*-------------------------------------------------------------------------
 *
 * dwh_replan.h
 *	  Make a session's plans again once the warehouse has grown.
 *
 *-------------------------------------------------------------------------
 */
#ifndef DWH_REPLAN_H
#define DWH_REPLAN_H

extern void dwh_replan_if_grown(void);

#endif							/* DWH_REPLAN_H */
