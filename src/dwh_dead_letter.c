/*-------------------------------------------------------------------------
 *
 * dwh_dead_letter.c
 *	  What a dead letter keeps of a refused value.
 *
 * dwh.max_message_size and dwh.redis_max_value_size limit what is
 * accepted, not what a refusal stores: a value refused for its size would
 * otherwise be stored whole, and a caller could fill the disk with them.
 * A dead letter keeps the first dwh.dead_letter_keep_bytes bytes of the
 * value, its full length and the SHA-256 of the whole value, for Kafka,
 * SQL and Redis alike.  The hash also identifies a message stored under a
 * Kafka position: the same bytes delivered again are a replay.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "common/cryptohash.h"
#include "utils/resowner.h"

#include "dwh_columns.h"
#include "dwh_dead_letter.h"
#include "dwh_settings.h"

struct DwhSha256
{
	pg_cryptohash_ctx *ctx;
	ResourceOwner own;			/* NULL: the caller's tracks ctx */
};

/*
 * dwh_sha256_begin, dwh_sha256_update, dwh_sha256_end
 *		A SHA-256 of data given piece by piece, with PostgreSQL's
 *		cryptohash API (OpenSSL's when the server is built with it).
 *		dwh_sha256_end() with out NULL abandons it (after an error).
 *
 * OpenSSL's contexts are tracked by the current resource owner; a worker
 * between two transactions (the Redis worker reading a reply) has none, so
 * one is made for the computation.
 */
DwhSha256 *
dwh_sha256_begin(void)
{
	DwhSha256  *h = palloc0(sizeof(DwhSha256));
	ResourceOwner caller = CurrentResourceOwner;

	if (caller == NULL)
		CurrentResourceOwner = h->own = ResourceOwnerCreate(NULL, "dwh sha256");
	PG_TRY();
	{
		h->ctx = pg_cryptohash_create(PG_SHA256);
	}
	PG_FINALLY();
	{
		CurrentResourceOwner = caller;
	}
	PG_END_TRY();
	if (h->ctx == NULL || pg_cryptohash_init(h->ctx) < 0)
	{
		const char *why = h->ctx ? pstrdup(pg_cryptohash_error(h->ctx)) : "out of memory";

		dwh_sha256_end(h, NULL);
		elog(ERROR, "could not compute a SHA-256 hash: %s", why);
	}
	return h;
}

void
dwh_sha256_update(DwhSha256 *h, const void *data, size_t len)
{
	if (pg_cryptohash_update(h->ctx, (const uint8 *) data, len) < 0)
		elog(ERROR, "could not compute a SHA-256 hash: %s",
			 pg_cryptohash_error(h->ctx));
}

void
dwh_sha256_end(DwhSha256 *h, uint8 *out)
{
	const char *why = NULL;

	if (h->ctx != NULL)
	{
		if (out != NULL && pg_cryptohash_final(h->ctx, out, DWH_SHA256_LEN) < 0)
			why = pstrdup(pg_cryptohash_error(h->ctx));
		pg_cryptohash_free(h->ctx);
	}
	/* Empty again: the context is freed. */
	if (h->own != NULL)
		ResourceOwnerDelete(h->own);
	pfree(h);
	if (why != NULL)
		elog(ERROR, "could not compute a SHA-256 hash: %s", why);
}

/*
 * dwh_sha256
 *		SHA-256 of len bytes into out[DWH_SHA256_LEN].
 */
void
dwh_sha256(const void *data, size_t len, uint8 *out)
{
	DwhSha256  *h = dwh_sha256_begin();

	PG_TRY();
	{
		dwh_sha256_update(h, data, len);
	}
	PG_CATCH();
	{
		dwh_sha256_end(h, NULL);
		PG_RE_THROW();
	}
	PG_END_TRY();
	dwh_sha256_end(h, out);
}

/*
 * dwh_sha256_datum
 *		The SHA-256 of len bytes as a bytea.
 */
Datum
dwh_sha256_datum(const void *data, size_t len)
{
	uint8		hash[DWH_SHA256_LEN];

	dwh_sha256(data, len, hash);
	return dwh_bytea_datum(hash, DWH_SHA256_LEN);
}

/*
 * dwh_dead_letter_kept
 *		How many of a refused value's len bytes its dead letter keeps.
 */
size_t
dwh_dead_letter_kept(size_t len)
{
	return Min(len, (size_t) dwh_dead_letter_keep_bytes);
}
