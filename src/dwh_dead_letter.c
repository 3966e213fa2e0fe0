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

/*
 * dwh_sha256
 *		SHA-256 of len bytes into out[DWH_SHA256_LEN], with PostgreSQL's
 *		cryptohash API (OpenSSL's when the server is built with it).
 *
 * OpenSSL's contexts are tracked by the current resource owner; a worker
 * between two transactions (the Redis worker reading a reply) has none, so
 * one is made for the computation.
 */
void
dwh_sha256(const void *data, size_t len, uint8 *out)
{
	ResourceOwner caller = CurrentResourceOwner;
	ResourceOwner own = NULL;
	pg_cryptohash_ctx *ctx;
	const char *why = NULL;

	if (caller == NULL)
		CurrentResourceOwner = own = ResourceOwnerCreate(NULL, "dwh sha256");
	ctx = pg_cryptohash_create(PG_SHA256);
	if (ctx == NULL)
		why = "out of memory";
	else
	{
		if (pg_cryptohash_init(ctx) < 0 ||
			pg_cryptohash_update(ctx, (const uint8 *) data, len) < 0 ||
			pg_cryptohash_final(ctx, out, DWH_SHA256_LEN) < 0)
			why = pstrdup(pg_cryptohash_error(ctx));
		pg_cryptohash_free(ctx);
	}
	if (own != NULL)
	{
		/* Empty again: the context is freed. */
		CurrentResourceOwner = caller;
		ResourceOwnerDelete(own);
	}
	if (why != NULL)
		elog(ERROR, "could not compute a SHA-256 hash: %s", why);
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
