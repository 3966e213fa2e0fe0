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

#include <jansson.h>

#include "dwh_json_syntax.h"

const int	dwh_json_max_depth = JSON_PARSER_MAX_DEPTH;

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
