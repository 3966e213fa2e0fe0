/*-------------------------------------------------------------------------
 *
 * dwh_json_syntax.h
 *	  JSON syntax check of raw bytes that never raises an error.
 *
 *-------------------------------------------------------------------------
 */
#ifndef DWH_JSON_SYNTAX_H
#define DWH_JSON_SYNTAX_H

typedef enum DwhJsonSyntax
{
	DWH_JSON_OK,
	DWH_JSON_INVALID,			/* not JSON, or not an object or array */
	DWH_JSON_NUL_CHARACTER,		/* \u0000, which text cannot store */
	DWH_JSON_TOO_DEEP			/* nested deeper than DWH_JSON_MAX_DEPTH */
} DwhJsonSyntax;

extern const int dwh_json_max_depth;

extern DwhJsonSyntax dwh_json_syntax_check(const char *data, int len,
										   char *detail, int detail_len);

#endif							/* DWH_JSON_SYNTAX_H */
