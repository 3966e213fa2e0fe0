/*-------------------------------------------------------------------------
 *
 * dwh_json_syntax.c
 *	  JSON syntax check of raw bytes that never raises an error.
 *
 * jsonb_in reports bad input with ereport(ERROR), which would abort a whole
 * batch for one bad message.  jansson parses without raising, bounds the
 * nesting depth and refuses \u0000, so whatever it accepts jsonb_in accepts
 * too.  jansson builds a tree of the whole value, though, which costs as
 * much as jsonb_in itself: it judges (and explains) only what the one-pass
 * builder of dwh_jsonb_build.c is unsure of.  This file is kept apart
 * because jansson's names (json_object...) collide with PostgreSQL's
 * function prototypes.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "common/jsonapi.h"
#include "mb/pg_wchar.h"

#include <jansson.h>

#include "dwh_json_syntax.h"

const int	dwh_json_max_depth = JSON_PARSER_MAX_DEPTH;

/*
 * Is data JSON by PostgreSQL's rules (numbers of any size)?  Reports like
 * dwh_json_syntax_check, without raising an error.
 */
static DwhJsonSyntax
syntax_check_by_postgres(const char *data, int len, char *detail, int detail_len)
{
	JsonLexContext *lex = makeJsonLexContextCstringLen(pnstrdup(data, len), len,
													   PG_UTF8, true);
	JsonParseErrorType result = pg_parse_json(lex, &nullSemAction);

	if (result == JSON_SUCCESS)
		return DWH_JSON_OK;
	snprintf(detail, detail_len, "%s", json_errdetail(result, lex));
	return DWH_JSON_INVALID;
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
		case json_error_numeric_overflow:
			/*
			 * jansson keeps numbers in int64 and double; jsonb keeps any
			 * number.  PostgreSQL's own parser, which raises no error, says
			 * whether the rest is JSON.
			 */
			return syntax_check_by_postgres(data, len, detail, detail_len);
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
