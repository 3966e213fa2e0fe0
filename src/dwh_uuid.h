/*-------------------------------------------------------------------------
 *
 * dwh_uuid.h
 *	  Name-based UUID version 5 (RFC 4122, SHA-1) for Data Vault keys.
 *
 *-------------------------------------------------------------------------
 */
#ifndef DWH_UUID_H
#define DWH_UUID_H

#include "utils/uuid.h"

/* Textual length of a hyphenated UUID, without the terminating NUL. */
#define DWH_UUID_TEXT_LEN 36

extern void dwh_uuid_v5(const pg_uuid_t *ns, const char *name, size_t len,
						pg_uuid_t *result);
extern void dwh_hash_key(const char *name, size_t len, pg_uuid_t *result);
extern void dwh_link_key(const pg_uuid_t *first, const pg_uuid_t *second,
						 pg_uuid_t *result);
extern void dwh_uuid_format(const pg_uuid_t *uuid, char *buf);

#endif							/* DWH_UUID_H */
