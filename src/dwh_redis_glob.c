/*-------------------------------------------------------------------------
 *
 * dwh_redis_glob.c
 *	  Redis glob patterns, matched in the worker: which keys
 *	  dwh.redis_key_pattern lets it read.
 *
 * The language is the one of Redis's SCAN MATCH and KEYS, so that a DBA
 * can try a pattern with redis-cli first: "*" any bytes, "?" one byte,
 * "[abc]", "[a-z]" and "[^a-z]" one byte of a class (a range may be
 * written high to low), and "\" makes the next byte literal.  Bytes, not
 * characters, as in Redis.  Unlike Redis, a pattern with an unclosed "[",
 * a trailing "\" or a range past ASCII ("[a-é]") is refused when set
 * rather than given a meaning.
 *
 * Redis never matches an empty key, nor any key against a pattern of more
 * than a thousand stars; here "*" matches the empty key (no order names
 * one: ids are not empty) and stars are not counted (no recursion).
 *
 * Matching keeps one backtracking point, the last "*": every other token
 * takes exactly one byte, so resuming after that star one byte further is
 * enough, and a pattern of many stars costs O(pattern * key) steps, never
 * exponential time.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "dwh_redis_glob.h"

/*
 * Scan the class starting at p (just after "["), as Redis reads it: "\x"
 * is x, "a-z" a range whenever a byte follows the "-" (even "]": Redis's
 * "[a-]" is not closed there), and the first other "]" closes it.  Sets
 * *matched to whether byte c is in the class, *end to the byte after its
 * "]" and *wide_range when a range has a byte past ASCII at either end
 * (Redis compares those as C chars, signed on some machines and not on
 * others); returns false when nothing closes it.
 */
static bool
scan_class(const char *p, const char *pend, unsigned char c, bool *matched,
		   const char **end, bool *wide_range)
{
	bool		negate = false;
	bool		in = false;

	*wide_range = false;

	if (p < pend && *p == '^')
	{
		negate = true;
		p++;
	}
	for (;;)
	{
		if (p == pend)
			return false;
		if (*p == '\\' && pend - p >= 2)
		{
			p++;
			if ((unsigned char) *p == c)
				in = true;
		}
		else if (*p == ']')
			break;
		else if (pend - p >= 3 && p[1] == '-')
		{
			unsigned char lo = (unsigned char) p[0];
			unsigned char hi = (unsigned char) p[2];

			if (lo >= 0x80 || hi >= 0x80)
				*wide_range = true;
			if (lo > hi)
			{
				unsigned char t = lo;

				lo = hi;
				hi = t;
			}
			if (c >= lo && c <= hi)
				in = true;
			p += 2;
		}
		else if ((unsigned char) *p == c)
			in = true;
		p++;
	}
	*matched = negate ? !in : in;
	*end = p + 1;
	return true;
}

/*
 * dwh_redis_glob_match
 *		Does key[0..key_len) match the pattern (a well-formed one: see
 *		dwh_redis_glob_problem)?
 */
bool
dwh_redis_glob_match(const char *pattern, const char *key, size_t key_len)
{
	const char *p = pattern;
	const char *pend = pattern + strlen(pattern);
	const char *k = key;
	const char *kend = key + key_len;
	const char *star = NULL;	/* the byte after the last "*" seen */
	const char *star_k = NULL;	/* where that star's match ends now */

	while (k < kend)
	{
		if (p < pend && *p == '*')
		{
			while (p < pend && *p == '*')
				p++;
			if (p == pend)
				return true;
			star = p;
			star_k = k;
			continue;
		}
		if (p < pend)
		{
			const char *next = p + 1;
			bool		ok;

			if (*p == '?')
				ok = true;
			else if (*p == '[')
			{
				bool		wide_range;

				if (!scan_class(p + 1, pend, (unsigned char) *k, &ok, &next,
								&wide_range))
					return false;	/* refused when set */
			}
			else
			{
				if (*p == '\\' && p + 1 < pend)
				{
					p++;
					next = p + 1;
				}
				ok = (*p == *k);
			}
			if (ok)
			{
				p = next;
				k++;
				continue;
			}
		}
		/* A mismatch: let the last star take one more byte. */
		if (star == NULL)
			return false;
		p = star;
		k = ++star_k;
	}
	while (p < pend && *p == '*')
		p++;
	return p == pend;
}

/*
 * dwh_redis_glob_problem
 *		NULL for a pattern this module matches, otherwise why not.
 */
const char *
dwh_redis_glob_problem(const char *pattern)
{
	const char *p = pattern;
	const char *pend = pattern + strlen(pattern);

	if (p == pend)
		return "An empty pattern would match no key; \"*\" lets the worker read every key.";
	while (p < pend)
	{
		if (*p == '\\')
		{
			if (p + 1 == pend)
				return "A pattern cannot end with \"\\\", which makes the next byte literal.";
			p += 2;
		}
		else if (*p == '[')
		{
			bool		matched;
			bool		wide_range;

			if (!scan_class(p + 1, pend, 0, &matched, &p, &wide_range))
				return "A \"[\" opens a class of bytes that a \"]\" must close (\"\\[\" stands for a \"[\"; in \"[a-]\" the \"-\" makes a range to \"]\").";
			if (wide_range)
				return "A range in a class must be between ASCII characters: Redis compares other bytes as signed on some machines and as unsigned on others.";
		}
		else
			p++;
	}
	return NULL;
}
