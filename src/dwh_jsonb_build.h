/*-------------------------------------------------------------------------
 *
 * dwh_jsonb_build.h
 *	  Raw JSON text to jsonb in one pass, for the usual, plainly valid value.
 *
 *-------------------------------------------------------------------------
 */
#ifndef DWH_JSONB_BUILD_H
#define DWH_JSONB_BUILD_H

#include "utils/jsonb.h"

extern Jsonb *dwh_jsonb_build(const char *data, int len);

#endif							/* DWH_JSONB_BUILD_H */
