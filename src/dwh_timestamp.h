/*-------------------------------------------------------------------------
 *
 * dwh_timestamp.h
 *	  Strict parsing of the source systems' timestamps.
 *
 *-------------------------------------------------------------------------
 */
#ifndef DWH_TIMESTAMP_H
#define DWH_TIMESTAMP_H

#include "datatype/timestamp.h"

extern bool dwh_parse_timestamp(const char *str, int len, Timestamp *result);

#endif							/* DWH_TIMESTAMP_H */
