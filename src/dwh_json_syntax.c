/*-------------------------------------------------------------------------
 *
 * dwh_json_syntax.c
 *	  JSON syntax check of raw bytes that never raises an error.
 *
 * jsonb_in reports bad input with ereport(ERROR), which would abort a whole
 * batch for one bad message.  jansson parses without raising, bounds the
 * nesting depth and refuses \u0000, so whatever it accepts jsonb_in accepts
 * too.  jansson builds a tree of the whole value, though, which costs as
 * much as jsonb_in itself: a plain scan first accepts the usual message,
 * and jansson judges (and explains) only what the scan is unsure of.  This
 * file is kept apart because jansson's names (json_object...) collide with
 * PostgreSQL's function prototypes.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <jansson.h>

#include "dwh_json_syntax.h"

const int	dwh_json_max_depth = JSON_PARSER_MAX_DEPTH;

/* Deepest nesting the scan follows; deeper values go to jansson. */
#define SCAN_MAX_DEPTH 256

static inline const char *
scan_ws(const char *p, const char *end)
{
	while (p < end && (*p == ' ' || *p == '\n' || *p == '\r' || *p == '\t'))
		p++;
	return p;
}

/*
 * Scan the string starting at p (its opening quote); returns the position
 * after the closing quote, or NULL when unsure.  \u escapes of NUL and of
 * surrogates are left to jansson, which refuses some of them.
 */
static const char *
scan_string(const char *p, const char *end)
{
	for (p++; p < end; p++)
	{
		unsigned char c = (unsigned char) *p;

		if (c == '"')
			return p + 1;
		if (c < 0x20)
			return NULL;
		if (c != '\\')
			continue;
		if (++p >= end)
			return NULL;
		switch (*p)
		{
			case '"':
			case '\\':
			case '/':
			case 'b':
			case 'f':
			case 'n':
			case 'r':
			case 't':
				break;
			case 'u':
				{
					unsigned int code = 0;
					int			i;

					if (end - p < 5)
						return NULL;
					for (i = 1; i <= 4; i++)
					{
						char		h = p[i];

						code <<= 4;
						if (h >= '0' && h <= '9')
							code |= h - '0';
						else if (h >= 'a' && h <= 'f')
							code |= h - 'a' + 10;
						else if (h >= 'A' && h <= 'F')
							code |= h - 'A' + 10;
						else
							return NULL;
					}
					if (code == 0 || (code >= 0xD800 && code <= 0xDFFF))
						return NULL;
					p += 4;
				}
				break;
			default:
				return NULL;
		}
	}
	return NULL;
}

/*
 * Scan the number starting at p; returns the position after it, or NULL
 * when unsure.  Integers of up to 18 digits fit jansson's int64; reals of
 * up to 30 characters with an exponent of up to 2 digits cannot overflow a
 * double.  Longer ones are left to jansson, which refuses some of them.
 */
static const char *
scan_number(const char *p, const char *end)
{
	const char *start = p;
	bool		real = false;
	int			exp_digits = 0;

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
	if (real ? (p - start > 30 || exp_digits > 2) : (p - start > 18))
		return NULL;
	return p;
}

/*
 * Is data surely an object or array that jansson accepts?  False means
 * "ask jansson", not "invalid".
 */
static bool
scan_json(const char *data, int len)
{
	const char *p = data;
	const char *end = data + len;
	char		stack[SCAN_MAX_DEPTH];
	int			depth = 0;

	p = scan_ws(p, end);
	if (p >= end || (*p != '{' && *p != '['))
		return false;

	for (;;)
	{
		/* p is at a value */
		if (p >= end)
			return false;
		switch (*p)
		{
			case '{':
			case '[':
				if (depth == SCAN_MAX_DEPTH)
					return false;
				stack[depth++] = *p++;
				p = scan_ws(p, end);
				if (p < end && *p == (stack[depth - 1] == '{' ? '}' : ']'))
				{
					p++;
					depth--;
					break;
				}
				if (stack[depth - 1] == '{')
					goto key;
				continue;
			case '"':
				p = scan_string(p, end);
				break;
			case 't':
				p = (end - p >= 4 && memcmp(p, "true", 4) == 0) ? p + 4 : NULL;
				break;
			case 'f':
				p = (end - p >= 5 && memcmp(p, "false", 5) == 0) ? p + 5 : NULL;
				break;
			case 'n':
				p = (end - p >= 4 && memcmp(p, "null", 4) == 0) ? p + 4 : NULL;
				break;
			default:
				p = scan_number(p, end);
				break;
		}
		if (p == NULL)
			return false;

		/* after a value: a comma, the end of containers, or of the data */
		for (;;)
		{
			p = scan_ws(p, end);
			if (depth == 0)
				return p == end;
			if (p >= end)
				return false;
			if (*p == (stack[depth - 1] == '{' ? '}' : ']'))
			{
				p++;
				depth--;
				continue;
			}
			if (*p != ',')
				return false;
			p = scan_ws(p + 1, end);
			break;
		}
		if (stack[depth - 1] == '[')
			continue;
key:
		if (p >= end || *p != '"' || (p = scan_string(p, end)) == NULL)
			return false;
		p = scan_ws(p, end);
		if (p >= end || *p != ':')
			return false;
		p = scan_ws(p + 1, end);
	}
}

/*
 * dwh_json_syntax_check
 *		Is data (len bytes of valid UTF-8) a JSON object or array?  On failure
 *		detail receives jansson's explanation with its position.
 */
DwhJsonSyntax
dwh_json_syntax_check(const char *data, int len, char *detail, int detail_len)
{
	json_t	   *root;
	json_error_t error;

	if (scan_json(data, len))
		return DWH_JSON_OK;

	root = json_loadb(data, len, 0, &error);
	if (root != NULL)
	{
		json_decref(root);
		return DWH_JSON_OK;
	}

	snprintf(detail, detail_len, "%s (line %d, column %d)",
			 error.text, error.line, error.column);
	switch (json_error_code(&error))
	{
		case json_error_null_character:
			return DWH_JSON_NUL_CHARACTER;
		case json_error_stack_overflow:
			return DWH_JSON_TOO_DEEP;
		case json_error_out_of_memory:
			ereport(ERROR,
					(errcode(ERRCODE_OUT_OF_MEMORY),
					 errmsg("out of memory while parsing a message")));
			break;
		default:
			break;
	}
	return DWH_JSON_INVALID;
}
