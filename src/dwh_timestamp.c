/*-------------------------------------------------------------------------
 *
 * dwh_timestamp.c
 *	  Strict parsing of "YYYY-MM-DD HH:MM:SS[.ffffff]" timestamps.
 *
 * The order service and the dictionaries write UTC times without a zone in
 * this one form.  timestamp_in would accept far more (and throw on failure,
 * and depend on DateStyle); this parser accepts exactly that form, with an
 * optional 'T' separator, never throws, and so can decide in the middle of a
 * batch whether a message is fit for the warehouse.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "utils/datetime.h"
#include "utils/timestamp.h"

#include "dwh_timestamp.h"

/*
 * Read exactly n decimal digits at *p into *value.
 */
static bool
read_digits(const char **p, const char *end, int n, int *value)
{
	int			v = 0;

	if (end - *p < n)
		return false;
	while (n-- > 0)
	{
		if (**p < '0' || **p > '9')
			return false;
		v = v * 10 + (**p - '0');
		(*p)++;
	}
	*value = v;
	return true;
}

/*
 * Expect the character c at *p.
 */
static bool
read_char(const char **p, const char *end, char c)
{
	if (*p >= end || **p != c)
		return false;
	(*p)++;
	return true;
}

/*
 * dwh_parse_timestamp
 *		Parse str (len bytes, not necessarily NUL-terminated).  Returns false,
 *		without raising an error, when it is not a valid timestamp.
 */
bool
dwh_parse_timestamp(const char *str, int len, Timestamp *result)
{
	const char *p = str;
	const char *end = str + len;
	struct pg_tm tm;
	fsec_t		fsec = 0;

	memset(&tm, 0, sizeof(tm));
	if (!read_digits(&p, end, 4, &tm.tm_year) ||
		!read_char(&p, end, '-') ||
		!read_digits(&p, end, 2, &tm.tm_mon) ||
		!read_char(&p, end, '-') ||
		!read_digits(&p, end, 2, &tm.tm_mday))
		return false;
	if (p >= end || (*p != ' ' && *p != 'T'))
		return false;
	p++;
	if (!read_digits(&p, end, 2, &tm.tm_hour) ||
		!read_char(&p, end, ':') ||
		!read_digits(&p, end, 2, &tm.tm_min) ||
		!read_char(&p, end, ':') ||
		!read_digits(&p, end, 2, &tm.tm_sec))
		return false;
	if (p < end && *p == '.')
	{
		int			scale = 100000;

		p++;
		if (p >= end)
			return false;
		while (p < end && *p >= '0' && *p <= '9')
		{
			/*
			 * Microseconds at most: SQL's ::timestamp would round a seventh
			 * digit, possibly into the next day, where this truncates.
			 */
			if (scale == 0)
				return false;
			fsec += (*p - '0') * scale;
			scale /= 10;
			p++;
		}
	}
	if (p != end)
		return false;

	if (tm.tm_year < 1 || tm.tm_mon < 1 || tm.tm_mon > MONTHS_PER_YEAR ||
		tm.tm_mday < 1 ||
		tm.tm_mday > day_tab[isleap(tm.tm_year)][tm.tm_mon - 1] ||
		tm.tm_hour > 23 || tm.tm_min > 59 || tm.tm_sec > 59)
		return false;

	return tm2timestamp(&tm, fsec, NULL, result) == 0 &&
		IS_VALID_TIMESTAMP(*result);
}
