/*-------------------------------------------------------------------------
 *
 * dwh_uuid.c
 *	  Name-based UUID version 5 (RFC 4122 section 4.3) over SHA-1.
 *
 * Every hub, link and hashdiff key of the vault is such a UUID in the dwh
 * namespace, so that any replay of the same data yields the same keys, and
 * the keys equal those of the services dwh replaces.  SHA-1 is written out
 * here (FIPS 180-4) rather than taken from pgcrypto or OpenSSL: it must run
 * without a resource owner (background workers) and is on the hot path of
 * every batch, where a context allocation per key would dominate.
 *
 * On x86-64 CPUs with the SHA extensions a block is hashed with them: four
 * times as fast as the portable code (a 28-byte key in 110 ns instead of
 * 490 ns), and in the SQL chain benchmark the ingesting backend spent a
 * median 6% less CPU time, less in every one of ten paired rounds
 * (docs/benchmarks.md, "Design choices behind the figures").
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#include <immintrin.h>
#define DWH_SHA1_X86
#endif

#include "fmgr.h"
#include "utils/builtins.h"

#include "dwh_uuid.h"

/* The namespace of the existing services: 7f288a2e-0ad0-4039-8e59-6c9838d87307 */
static const pg_uuid_t dwh_namespace = {{
		0x7f, 0x28, 0x8a, 0x2e, 0x0a, 0xd0, 0x40, 0x39,
		0x8e, 0x59, 0x6c, 0x98, 0x38, 0xd8, 0x73, 0x07
}};

typedef struct Sha1State
{
	uint32		h[5];
	uint64		total;			/* bytes hashed so far */
	uint8		block[64];
	int			used;			/* bytes waiting in block */
} Sha1State;

#define ROL32(x, n) (((x) << (n)) | ((x) >> (32 - (n))))

/*
 * Process one 64-byte block.
 */
static void
sha1_block_portable(Sha1State *s, const uint8 *p)
{
	uint32		w[80];
	uint32		a,
				b,
				c,
				d,
				e;
	int			t;

	for (t = 0; t < 16; t++)
		w[t] = ((uint32) p[4 * t] << 24) | ((uint32) p[4 * t + 1] << 16) |
			((uint32) p[4 * t + 2] << 8) | (uint32) p[4 * t + 3];
	for (t = 16; t < 80; t++)
		w[t] = ROL32(w[t - 3] ^ w[t - 8] ^ w[t - 14] ^ w[t - 16], 1);

	a = s->h[0];
	b = s->h[1];
	c = s->h[2];
	d = s->h[3];
	e = s->h[4];

	for (t = 0; t < 80; t++)
	{
		uint32		f,
					k,
					tmp;

		if (t < 20)
		{
			f = (b & c) | (~b & d);
			k = 0x5A827999;
		}
		else if (t < 40)
		{
			f = b ^ c ^ d;
			k = 0x6ED9EBA1;
		}
		else if (t < 60)
		{
			f = (b & c) | (b & d) | (c & d);
			k = 0x8F1BBCDC;
		}
		else
		{
			f = b ^ c ^ d;
			k = 0xCA62C1D6;
		}
		tmp = ROL32(a, 5) + f + e + k + w[t];
		e = d;
		d = c;
		c = ROL32(b, 30);
		b = a;
		a = tmp;
	}

	s->h[0] += a;
	s->h[1] += b;
	s->h[2] += c;
	s->h[3] += d;
	s->h[4] += e;
}

#ifdef DWH_SHA1_X86
/*
 * One block with the x86 SHA extensions, which most CPUs of the last years
 * have: four rounds an instruction, several times the speed of the code
 * above.
 */
#define SHA1_ROUNDS4(ex, ey, ma, mb, mc, md, f) \
	do { \
		ex = _mm_sha1nexte_epu32(ex, ma); \
		ey = abcd; \
		mb = _mm_sha1msg2_epu32(mb, ma); \
		abcd = _mm_sha1rnds4_epu32(abcd, ex, f); \
		md = _mm_sha1msg1_epu32(md, ma); \
		mc = _mm_xor_si128(mc, ma); \
	} while (0)

__attribute__((target("sha,sse4.1")))
static void
sha1_block_shani(Sha1State *s, const uint8 *p)
{
	const __m128i bswap = _mm_set_epi64x(0x0001020304050607ULL,
										 0x08090a0b0c0d0e0fULL);
	__m128i		abcd,
				abcd_save,
				e0,
				e1,
				e_save,
				m0,
				m1,
				m2,
				m3;

	abcd = _mm_shuffle_epi32(_mm_loadu_si128((const __m128i *) s->h), 0x1B);
	e0 = _mm_set_epi32((int) s->h[4], 0, 0, 0);
	abcd_save = abcd;
	e_save = e0;

	/* rounds 0-15: load the message words, start the schedule */
	m0 = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *) p), bswap);
	e0 = _mm_add_epi32(e0, m0);
	e1 = abcd;
	abcd = _mm_sha1rnds4_epu32(abcd, e0, 0);

	m1 = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *) (p + 16)), bswap);
	e1 = _mm_sha1nexte_epu32(e1, m1);
	e0 = abcd;
	abcd = _mm_sha1rnds4_epu32(abcd, e1, 0);
	m0 = _mm_sha1msg1_epu32(m0, m1);

	m2 = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *) (p + 32)), bswap);
	e0 = _mm_sha1nexte_epu32(e0, m2);
	e1 = abcd;
	abcd = _mm_sha1rnds4_epu32(abcd, e0, 0);
	m1 = _mm_sha1msg1_epu32(m1, m2);
	m0 = _mm_xor_si128(m0, m2);

	m3 = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *) (p + 48)), bswap);
	SHA1_ROUNDS4(e1, e0, m3, m0, m1, m2, 0);

	/* rounds 16-79 (the last schedule steps compute words never used) */
	SHA1_ROUNDS4(e0, e1, m0, m1, m2, m3, 0);
	SHA1_ROUNDS4(e1, e0, m1, m2, m3, m0, 1);
	SHA1_ROUNDS4(e0, e1, m2, m3, m0, m1, 1);
	SHA1_ROUNDS4(e1, e0, m3, m0, m1, m2, 1);
	SHA1_ROUNDS4(e0, e1, m0, m1, m2, m3, 1);
	SHA1_ROUNDS4(e1, e0, m1, m2, m3, m0, 1);
	SHA1_ROUNDS4(e0, e1, m2, m3, m0, m1, 2);
	SHA1_ROUNDS4(e1, e0, m3, m0, m1, m2, 2);
	SHA1_ROUNDS4(e0, e1, m0, m1, m2, m3, 2);
	SHA1_ROUNDS4(e1, e0, m1, m2, m3, m0, 2);
	SHA1_ROUNDS4(e0, e1, m2, m3, m0, m1, 2);
	SHA1_ROUNDS4(e1, e0, m3, m0, m1, m2, 3);
	SHA1_ROUNDS4(e0, e1, m0, m1, m2, m3, 3);
	SHA1_ROUNDS4(e1, e0, m1, m2, m3, m0, 3);
	SHA1_ROUNDS4(e0, e1, m2, m3, m0, m1, 3);
	SHA1_ROUNDS4(e1, e0, m3, m0, m1, m2, 3);

	e0 = _mm_sha1nexte_epu32(e0, e_save);
	abcd = _mm_add_epi32(abcd, abcd_save);

	_mm_storeu_si128((__m128i *) s->h, _mm_shuffle_epi32(abcd, 0x1B));
	s->h[4] = (uint32) _mm_extract_epi32(e0, 3);
}

/* Does this CPU have the SHA extensions (and SSSE3, SSE4.1)?  -1: unknown */
static int	sha1_have_shani = -1;

static void
sha1_detect(void)
{
	unsigned int a,
				b,
				c,
				d;

	sha1_have_shani = __get_cpuid(1, &a, &b, &c, &d) &&
		(c & bit_SSSE3) && (c & bit_SSE4_1) &&
		__get_cpuid_count(7, 0, &a, &b, &c, &d) && (b & bit_SHA);
}
#endif							/* DWH_SHA1_X86 */

static inline void
sha1_block(Sha1State *s, const uint8 *p)
{
#ifdef DWH_SHA1_X86
	if (unlikely(sha1_have_shani < 0))
		sha1_detect();
	if (sha1_have_shani)
	{
		sha1_block_shani(s, p);
		return;
	}
#endif
	sha1_block_portable(s, p);
}

static void
sha1_init(Sha1State *s)
{
	s->h[0] = 0x67452301;
	s->h[1] = 0xEFCDAB89;
	s->h[2] = 0x98BADCFE;
	s->h[3] = 0x10325476;
	s->h[4] = 0xC3D2E1F0;
	s->total = 0;
	s->used = 0;
}

static void
sha1_update(Sha1State *s, const uint8 *data, size_t len)
{
	s->total += len;
	while (len > 0)
	{
		size_t		n = Min(len, (size_t) (64 - s->used));

		memcpy(s->block + s->used, data, n);
		s->used += n;
		data += n;
		len -= n;
		if (s->used == 64)
		{
			sha1_block(s, s->block);
			s->used = 0;
		}
	}
}

static void
sha1_final(Sha1State *s, uint8 *digest)
{
	uint64		bits = s->total * 8;
	int			i;

	s->block[s->used++] = 0x80;
	if (s->used > 56)
	{
		memset(s->block + s->used, 0, 64 - s->used);
		sha1_block(s, s->block);
		s->used = 0;
	}
	memset(s->block + s->used, 0, 56 - s->used);
	for (i = 0; i < 8; i++)
		s->block[56 + i] = (uint8) (bits >> (56 - 8 * i));
	sha1_block(s, s->block);

	for (i = 0; i < 5; i++)
	{
		digest[4 * i] = (uint8) (s->h[i] >> 24);
		digest[4 * i + 1] = (uint8) (s->h[i] >> 16);
		digest[4 * i + 2] = (uint8) (s->h[i] >> 8);
		digest[4 * i + 3] = (uint8) s->h[i];
	}
}

/*
 * dwh_uuid_v5
 *		The version 5 UUID of name (len bytes) in namespace ns.
 */
void
dwh_uuid_v5(const pg_uuid_t *ns, const char *name, size_t len,
			pg_uuid_t *result)
{
	Sha1State	s;
	uint8		digest[20];

	sha1_init(&s);
	sha1_update(&s, ns->data, UUID_LEN);
	sha1_update(&s, (const uint8 *) name, len);
	sha1_final(&s, digest);

	memcpy(result->data, digest, UUID_LEN);
	result->data[6] = (result->data[6] & 0x0f) | 0x50;	/* version 5 */
	result->data[8] = (result->data[8] & 0x3f) | 0x80;	/* RFC 4122 variant */
}

/*
 * dwh_hash_key
 *		The vault key of a business key: UUID v5 in the dwh namespace.
 */
void
dwh_hash_key(const char *name, size_t len, pg_uuid_t *result)
{
	dwh_uuid_v5(&dwh_namespace, name, len, result);
}

/*
 * dwh_link_key
 *		The key of a link: the key over the text of both hub keys, one after
 *		the other, without formatting them through uuid_out.
 */
void
dwh_link_key(const pg_uuid_t *first, const pg_uuid_t *second,
			 pg_uuid_t *result)
{
	char		buf[2 * DWH_UUID_TEXT_LEN];

	dwh_uuid_format(first, buf);
	dwh_uuid_format(second, buf + DWH_UUID_TEXT_LEN);
	dwh_hash_key(buf, sizeof(buf), result);
}

/*
 * dwh_uuid_format
 *		Write the lower-case hyphenated form of uuid into buf, which must
 *		hold DWH_UUID_TEXT_LEN bytes; no terminating NUL is written.
 */
void
dwh_uuid_format(const pg_uuid_t *uuid, char *buf)
{
	static const char hex[] = "0123456789abcdef";
	int			i;
	char	   *p = buf;

	for (i = 0; i < UUID_LEN; i++)
	{
		if (i == 4 || i == 6 || i == 8 || i == 10)
			*p++ = '-';
		*p++ = hex[uuid->data[i] >> 4];
		*p++ = hex[uuid->data[i] & 0x0f];
	}
}

PG_FUNCTION_INFO_V1(dwh_uuid_v5_sql);
PG_FUNCTION_INFO_V1(dwh_hash_key_text);
PG_FUNCTION_INFO_V1(dwh_hash_key_link);

/*
 * dwh.uuid_v5(namespace uuid, name text) returns uuid
 */
Datum
dwh_uuid_v5_sql(PG_FUNCTION_ARGS)
{
	pg_uuid_t  *ns = PG_GETARG_UUID_P(0);
	text	   *name = PG_GETARG_TEXT_PP(1);
	pg_uuid_t  *result = palloc(sizeof(pg_uuid_t));

	dwh_uuid_v5(ns, VARDATA_ANY(name), VARSIZE_ANY_EXHDR(name), result);
	PG_RETURN_UUID_P(result);
}

/*
 * dwh.hash_key(business_key text) returns uuid
 *		Hub keys and hashdiffs.
 */
Datum
dwh_hash_key_text(PG_FUNCTION_ARGS)
{
	text	   *name = PG_GETARG_TEXT_PP(0);
	pg_uuid_t  *result = palloc(sizeof(pg_uuid_t));

	dwh_hash_key(VARDATA_ANY(name), VARSIZE_ANY_EXHDR(name), result);
	PG_RETURN_UUID_P(result);
}

/*
 * dwh.hash_key(first uuid, second uuid) returns uuid
 *		Link keys (dwh_link_key).
 */
Datum
dwh_hash_key_link(PG_FUNCTION_ARGS)
{
	pg_uuid_t  *result = palloc(sizeof(pg_uuid_t));

	dwh_link_key(PG_GETARG_UUID_P(0), PG_GETARG_UUID_P(1), result);
	PG_RETURN_UUID_P(result);
}
