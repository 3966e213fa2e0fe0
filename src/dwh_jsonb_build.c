/*-------------------------------------------------------------------------
 *
 * dwh_jsonb_build.c
 *	  Raw JSON text to jsonb in one pass, for the usual, plainly valid value.
 *
 * jsonb_in tokenizes the text with PostgreSQL's JSON lexer, which copies
 * every string character by character, and builds jsonb through semantic
 * callbacks; it raises an error on bad input.  Almost every message is a
 * small, plainly valid object: this scanner reads it once and hands each
 * token straight to pushJsonbValue, the very calls jsonb_in makes, so the
 * result is the same jsonb.  Whatever it is unsure of (a \u escape of NUL
 * or of a surrogate, a number jansson might refuse, deep nesting, anything
 * invalid) it leaves to the careful path of dwh_json_parse: jansson judges
 * and explains, then jsonb_in builds.  It never raises an error on input.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "mb/pg_wchar.h"
#include "utils/builtins.h"
#include "utils/jsonb.h"
#include "utils/numeric.h"

#include "dwh_jsonb_build.h"

/* Deepest nesting handled here; deeper values take the careful path. */
#define BUILD_MAX_DEPTH 256

/* Longest number handled here (see scan_number). */
#define BUILD_MAX_NUMBER 30

static inline const char *
skip_ws(const char *p, const char *end)
{
	while (p < end && (*p == ' ' || *p == '\n' || *p == '\r' || *p == '\t'))
		p++;
	return p;
}

/* The value of hex digit h, or -1. */
static inline int
hex_value(char h)
{
	if (h >= '0' && h <= '9')
		return h - '0';
	if (h >= 'a' && h <= 'f')
		return h - 'a' + 10;
	if (h >= 'A' && h <= 'F')
		return h - 'A' + 10;
	return -1;
}

/*
 * Scan the string whose opening quote is at p into out (a jbvString);
 * returns the position after the closing quote, or NULL when unsure.  A
 * string without escapes points into the input; one with escapes is
 * decoded into a copy, as the JSON lexer decodes it for a UTF-8 database.
 * \u escapes of NUL and of surrogates are left to the careful path, which
 * refuses some of them.
 */
static const char *
scan_string(const char *p, const char *end, JsonbValue *out)
{
	const char *start = ++p;
	bool		escaped = false;
	char	   *buf;
	char	   *w;
	const char *s;

	for (; p < end; p++)
	{
		unsigned char c = (unsigned char) *p;

		if (c == '"')
			break;
		if (c < 0x20)
			return NULL;
		if (c == '\\')
		{
			escaped = true;
			if (++p >= end)
				return NULL;
			if (*p == 'u')
			{
				if (end - p < 5)
					return NULL;
				p += 4;
			}
		}
	}
	if (p >= end || p - start > JENTRY_OFFLENMASK)
		return NULL;

	out->type = jbvString;
	if (!escaped)
	{
		out->val.string.val = (char *) start;
		out->val.string.len = p - start;
		return p + 1;
	}

	/* An escape never decodes to more bytes than it takes. */
	buf = w = palloc(p - start);
	for (s = start; s < p; s++)
	{
		unsigned int code = 0;
		int			i;

		if (*s != '\\')
		{
			*w++ = *s;
			continue;
		}
		switch (*++s)
		{
			case '"':
			case '\\':
			case '/':
				*w++ = *s;
				break;
			case 'b':
				*w++ = '\b';
				break;
			case 'f':
				*w++ = '\f';
				break;
			case 'n':
				*w++ = '\n';
				break;
			case 'r':
				*w++ = '\r';
				break;
			case 't':
				*w++ = '\t';
				break;
			case 'u':
				for (i = 1; i <= 4; i++)
				{
					int			h = hex_value(s[i]);

					if (h < 0)
						return NULL;
					code = (code << 4) | h;
				}
				if (code == 0 || (code >= 0xD800 && code <= 0xDFFF))
					return NULL;
				unicode_to_utf8(code, (unsigned char *) w);
				w += pg_utf_mblen((unsigned char *) w);
				s += 4;
				break;
			default:
				return NULL;
		}
	}
	out->val.string.val = buf;
	out->val.string.len = w - buf;
	return p + 1;
}

/*
 * Scan the number starting at p into out (a jbvNumeric, through numeric_in
 * as jsonb_in does); returns the position after it, or NULL when unsure.
 * Integers of up to 18 digits and reals of up to 30 characters with an
 * exponent of up to 2 digits are what jansson surely accepts.
 */
static const char *
scan_number(const char *p, const char *end, JsonbValue *out)
{
	const char *start = p;
	bool		real = false;
	int			exp_digits = 0;
	char		token[BUILD_MAX_NUMBER + 1];

	if (p < end && *p == '-')
		p++;
	if (p < end && *p == '0')
		p++;
	else if (p < end && *p >= '1' && *p <= '9')
		while (p < end && *p >= '0' && *p <= '9')
			p++;
	else
		return NULL;
	if (p < end && *p == '.')
	{
		real = true;
		if (++p >= end || *p < '0' || *p > '9')
			return NULL;
		while (p < end && *p >= '0' && *p <= '9')
			p++;
	}
	if (p < end && (*p == 'e' || *p == 'E'))
	{
		real = true;
		p++;
		if (p < end && (*p == '+' || *p == '-'))
			p++;
		while (p < end && *p >= '0' && *p <= '9')
		{
			p++;
			exp_digits++;
		}
		if (exp_digits == 0)
			return NULL;
	}
	if (real ? (p - start > BUILD_MAX_NUMBER || exp_digits > 2) : (p - start > 18))
		return NULL;

	memcpy(token, start, p - start);
	token[p - start] = '\0';
	out->type = jbvNumeric;
	out->val.numeric = DatumGetNumeric(DirectFunctionCall3(numeric_in,
														   CStringGetDatum(token),
														   ObjectIdGetDatum(InvalidOid),
														   Int32GetDatum(-1)));
	return p;
}

/*
 * dwh_jsonb_build
 *		jsonb of data (len bytes of valid UTF-8) if it is plainly a valid JSON
 *		object or array; NULL means "take the careful path", not "invalid".
 */
Jsonb *
dwh_jsonb_build(const char *data, int len)
{
	const char *p = data;
	const char *end = data + len;
	char		stack[BUILD_MAX_DEPTH];
	int			depth = 0;
	JsonbParseState *state = NULL;
	JsonbValue *result = NULL;
	JsonbValue	v;

	if (GetDatabaseEncoding() != PG_UTF8)
		return NULL;

	p = skip_ws(p, end);
	if (p >= end || (*p != '{' && *p != '['))
		return NULL;

	for (;;)
	{
		bool		scalar = true;

		/* p is at a value */
		if (p >= end)
			return NULL;
		switch (*p)
		{
			case '{':
			case '[':
				if (depth == BUILD_MAX_DEPTH)
					return NULL;
				stack[depth++] = *p;
				result = pushJsonbValue(&state,
										*p == '{' ? WJB_BEGIN_OBJECT : WJB_BEGIN_ARRAY,
										NULL);
				p = skip_ws(p + 1, end);
				if (p < end && *p == (stack[depth - 1] == '{' ? '}' : ']'))
				{
					/* empty: closed below */
					scalar = false;
					break;
				}
				if (stack[depth - 1] == '{')
					goto key;
				continue;
			case '"':
				p = scan_string(p, end, &v);
				break;
			case 't':
				p = (end - p >= 4 && memcmp(p, "true", 4) == 0) ? p + 4 : NULL;
				v.type = jbvBool;
				v.val.boolean = true;
				break;
			case 'f':
				p = (end - p >= 5 && memcmp(p, "false", 5) == 0) ? p + 5 : NULL;
				v.type = jbvBool;
				v.val.boolean = false;
				break;
			case 'n':
				p = (end - p >= 4 && memcmp(p, "null", 4) == 0) ? p + 4 : NULL;
				v.type = jbvNull;
				break;
			default:
				p = scan_number(p, end, &v);
				break;
		}
		if (p == NULL)
			return NULL;
		if (scalar)
			result = pushJsonbValue(&state,
									stack[depth - 1] == '{' ? WJB_VALUE : WJB_ELEM,
									&v);

		/* after a value: a comma, the end of containers, or of the data */
		for (;;)
		{
			p = skip_ws(p, end);
			if (depth == 0)
				return p == end ? JsonbValueToJsonb(result) : NULL;
			if (p >= end)
				return NULL;
			if (*p == (stack[depth - 1] == '{' ? '}' : ']'))
			{
				result = pushJsonbValue(&state,
										stack[depth - 1] == '{' ? WJB_END_OBJECT : WJB_END_ARRAY,
										NULL);
				p++;
				depth--;
				continue;
			}
			if (*p != ',')
				return NULL;
			p = skip_ws(p + 1, end);
			break;
		}
		if (stack[depth - 1] == '[')
			continue;
key:
		if (p >= end || *p != '"' || (p = scan_string(p, end, &v)) == NULL)
			return NULL;
		result = pushJsonbValue(&state, WJB_KEY, &v);
		p = skip_ws(p, end);
		if (p >= end || *p != ':')
			return NULL;
		p = skip_ws(p + 1, end);
	}
}
