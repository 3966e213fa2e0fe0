/*-------------------------------------------------------------------------
 *
 * dwh_dead_letter.h
 *	  What a dead letter keeps of a refused value: a bounded prefix, the
 *	  full length and a SHA-256 of the whole value.
 *
 *-------------------------------------------------------------------------
 */
#ifndef DWH_DEAD_LETTER_H
#define DWH_DEAD_LETTER_H

#define DWH_SHA256_LEN	32

typedef struct DwhSha256 DwhSha256;

extern DwhSha256 *dwh_sha256_begin(void);
extern void dwh_sha256_update(DwhSha256 *h, const void *data, size_t len);
extern void dwh_sha256_end(DwhSha256 *h, uint8 *out);
extern void dwh_sha256(const void *data, size_t len, uint8 *out);
extern Datum dwh_sha256_datum(const void *data, size_t len);
extern size_t dwh_dead_letter_kept(size_t len);

#endif							/* DWH_DEAD_LETTER_H */
