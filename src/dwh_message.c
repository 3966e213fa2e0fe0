/*-------------------------------------------------------------------------
 *
 * dwh_message.c
 *	  Parsing and validation of order messages and dictionary values.
 *
 * A Kafka value is bytes.  It goes through size, UTF-8 and nesting checks,
 * then through jsonb_in in a subtransaction, so that whatever is wrong with
 * one message is a reason in dwh.dead_letters, not an error that aborts
 * its batch; PostgreSQL's JSON parser, which reports without raising, says
 * why.  The shape checks work on jsonb so that the very same rules guard
 * direct writes to the STG tables.
 *
 * Parsing used to be longer: a one-pass scanner built plainly valid values
 * into jsonb without a subtransaction, and jansson judged the rest.  Side
 * by side in the SQL chain benchmark (docs/benchmarks.md, twelve
 * interleaved pairs of runs), the ingesting backend spent a median 4% less
 * CPU time with the scanner (-5% to 9% by pair) and the rate was a median
 * 6% higher (0.44 to 1.40 times by pair), within the spread of the figures
 * on the shared machine (one build's CPU time varied by 11% from run to
 * run, its rate by a factor of 2.5); jansson never ran for a valid
 * message, and was no faster than this code for the others.  Both were
 * removed, and jansson with them as a dependency.  A profile puts all of
 * jsonb_in at 7% of the backend's CPU and its subtransaction at 1%: no
 * parser could give back more, and a few per cent do not pay for a second
 * grammar that must refuse exactly what jsonb_in refuses.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <stdlib.h>

#include "common/jsonapi.h"
#include "mb/pg_wchar.h"
#include "utils/builtins.h"
#include "utils/jsonb.h"
#include "utils/numeric.h"

#include "dwh_message.h"
#include "dwh_settings.h"
#include "dwh_spi.h"
#include "dwh_timestamp.h"

/*
 * Deepest nesting of a value accepted.  jsonb_in stops only where the stack
 * ends (max_stack_depth); a bound of our own makes what is accepted the same
 * on every server, and keeps every stored value within what jsonb_in of a
 * server with default settings reads back (a restore).
 */
#define DWH_JSON_MAX_DEPTH 2048

/* Longest part of a parser's explanation kept in a reason, in bytes. */
#define DWH_JSON_MAX_DETAIL 200

static bool problem_set(DwhProblem *problem, int sqlstate, const char *fmt,...)
			pg_attribute_printf(3, 4);

/*
 * Record a problem; always returns false so that checks can "return
 * problem_set(...)".
 */
static bool
problem_set(DwhProblem *problem, int sqlstate, const char *fmt,...)
{
	va_list		args;
	StringInfoData buf;

	initStringInfo(&buf);
	for (;;)
	{
		int			needed;

		va_start(args, fmt);
		needed = appendStringInfoVA(&buf, fmt, args);
		va_end(args);
		if (needed == 0)
			break;
		enlargeStringInfo(&buf, needed);
	}
	problem->sqlstate = sqlstate;
	/* A reason may quote the value: it goes to a text column. */
	problem->reason = dwh_valid_utf8(buf.data);
	return false;
}

/*
 * dwh_valid_utf8
 *		s as valid UTF-8: each byte that does not start a valid character
 *		becomes U+FFFD.  Text columns must hold valid text, or pg_dump
 *		writes a table that pg_restore cannot load.  Returns s itself when
 *		it is valid.
 */
char *
dwh_valid_utf8(const char *s)
{
	int			len = strlen(s);
	StringInfoData buf;
	int			i = 0;

	if (pg_verify_mbstr(PG_UTF8, s, len, true))
		return (char *) s;
	initStringInfo(&buf);
	while (i < len)
	{
		int			l = pg_utf_mblen((const unsigned char *) s + i);

		if (i + l <= len && pg_utf8_islegal((const unsigned char *) s + i, l))
		{
			appendBinaryStringInfo(&buf, s + i, l);
			i += l;
		}
		else
		{
			appendStringInfoString(&buf, "\xEF\xBF\xBD");
			i++;
		}
	}
	return buf.data;
}

/*
 * dwh_valid_utf8_in_place
 *		Make s valid UTF-8 without changing its length: each byte that does
 *		not start a valid character becomes '?'.  For fixed-size buffers
 *		(shared memory, error texts), where vsnprintf may also have cut the
 *		last character in two.
 */
void
dwh_valid_utf8_in_place(char *s)
{
	int			len = strlen(s);
	int			i = 0;

	while (i < len)
	{
		int			l = pg_utf_mblen((const unsigned char *) s + i);

		if (i + l <= len && pg_utf8_islegal((const unsigned char *) s + i, l))
			i += l;
		else
			s[i++] = '?';
	}
}

/* jsonb_in of a C string, for dwh_try_in_subtransaction. */
typedef struct JsonbInCall
{
	char	   *text;
	Jsonb	   *result;
} JsonbInCall;

static void
jsonb_in_call(void *arg)
{
	JsonbInCall *call = (JsonbInCall *) arg;

	call->result = DatumGetJsonbP(DirectFunctionCall1(jsonb_in,
													  CStringGetDatum(call->text)));
}

/*
 * Does data start with an object or an array, nested at most
 * DWH_JSON_MAX_DEPTH deep?  Counts the brackets outside strings; what is
 * not JSON is left to the parser, which stops at or before the first place
 * where the count could go wrong.
 */
static bool
check_nesting(const char *data, int len, DwhProblem *problem)
{
	const char *p = data;
	const char *end = data + len;
	bool		in_string = false;
	int			depth = 0;

	while (p < end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r'))
		p++;
	if (p == end || (*p != '{' && *p != '['))
		return problem_set(problem, ERRCODE_INVALID_JSON_TEXT,
						   "value is not a JSON object or array");
	for (; p < end; p++)
	{
		if (in_string)
		{
			if (*p == '\\' && p + 1 < end)
				p++;
			else if (*p == '"')
				in_string = false;
		}
		else if (*p == '"')
			in_string = true;
		else if (*p == '{' || *p == '[')
		{
			if (++depth > DWH_JSON_MAX_DEPTH)
				return problem_set(problem, ERRCODE_STATEMENT_TOO_COMPLEX,
								   "value is nested deeper than %d levels",
								   DWH_JSON_MAX_DEPTH);
		}
		else if ((*p == '}' || *p == ']') && --depth == 0)
			break;
	}
	return true;
}

/*
 * dwh_jsonb_nesting_check
 *		Is a stored value nested at most DWH_JSON_MAX_DEPTH deep, as every
 *		value the ingest and the Redis worker read must be?  For writes of
 *		STG that did not come through them.
 */
bool
dwh_jsonb_nesting_check(Jsonb *value, DwhProblem *problem)
{
	JsonbIterator *it = JsonbIteratorInit(&value->root);
	JsonbIteratorToken token;
	JsonbValue	v;
	int			depth = 0;

	while ((token = JsonbIteratorNext(&it, &v, false)) != WJB_DONE)
	{
		if (token == WJB_BEGIN_ARRAY || token == WJB_BEGIN_OBJECT)
		{
			if (++depth > DWH_JSON_MAX_DEPTH)
				return problem_set(problem, ERRCODE_STATEMENT_TOO_COMPLEX,
								   "value is nested deeper than %d levels",
								   DWH_JSON_MAX_DEPTH);
		}
		else if (token == WJB_END_ARRAY || token == WJB_END_OBJECT)
			depth--;
	}
	return true;
}

/*
 * dwh_dictionary_key_check
 *		Can a user or restaurant have this key (len bytes)?  The Redis worker
 *		reads no other (dwh_redis_key_refused), and orders name no other.
 */
bool
dwh_dictionary_key_check(const char *key, int len, DwhProblem *problem)
{
	if (len == 0)
		return problem_set(problem, ERRCODE_ZERO_LENGTH_CHARACTER_STRING,
						   "object_id is empty: no order can name it");
	if (len > DWH_MAX_KEY_LEN)
		return problem_set(problem, ERRCODE_STRING_DATA_RIGHT_TRUNCATION,
						   "object_id of %d bytes is longer than %d bytes, the longest id an order can name",
						   len, DWH_MAX_KEY_LEN);
	return true;
}

/*
 * Say why jsonb_in refused text (len bytes), which failed with edata.
 * PostgreSQL's JSON parser, which reports a syntax error without raising
 * one, tells bad syntax and \u0000 from a value that is JSON but does not
 * fit jsonb (a number beyond numeric's range).
 */
static void
explain_refusal(char *text, int len, ErrorData *edata, DwhProblem *problem)
{
	JsonLexContext *lex;
	JsonParseErrorType result;
	char	   *at;
	int			column;
	char	   *detail;

	/* Out of stack in jsonb_in: the parser would be too. */
	if (edata->sqlerrcode == ERRCODE_STATEMENT_TOO_COMPLEX)
	{
		problem_set(problem, edata->sqlerrcode,
					"value cannot be stored as jsonb: %s", edata->message);
		return;
	}

	lex = makeJsonLexContextCstringLen(text, len, GetDatabaseEncoding(), true);
	result = pg_parse_json(lex, &nullSemAction);
	if (result == JSON_SUCCESS)
	{
		problem_set(problem, edata->sqlerrcode,
					"value cannot be stored as jsonb: %s", edata->message);
		return;
	}

	/* Where the parser stopped: the token it refused, or the end. */
	at = lex->token_start ? lex->token_start : lex->token_terminator;
	column = pg_mbstrlen_with_len(lex->line_start, at - lex->line_start) + 1;
	if (result == JSON_UNICODE_CODE_POINT_ZERO)
	{
		problem_set(problem, ERRCODE_UNTRANSLATABLE_CHARACTER,
					"value holds \\u0000, which a text value cannot store (line %d, column %d)",
					lex->line_number, column);
		return;
	}

	/* The detail quotes the bad token, which may be long. */
	detail = json_errdetail(result, lex);
	if (strlen(detail) > DWH_JSON_MAX_DETAIL)
	{
		detail[pg_mbcliplen(detail, strlen(detail), DWH_JSON_MAX_DETAIL)] = '\0';
		detail = psprintf("%s...", detail);
	}
	problem_set(problem, ERRCODE_INVALID_JSON_TEXT,
				"value is not valid JSON (line %d, column %d): %s",
				lex->line_number, column, detail);
}

/*
 * dwh_json_parse
 *		Turn raw bytes into jsonb, or return NULL and say why; never raises an
 *		error about the bytes.  Needs a transaction: jsonb_in runs in a
 *		subtransaction, so that whatever it refuses is the value's problem.
 */
Jsonb *
dwh_json_parse(const char *data, int len, DwhProblem *problem)
{
	int			valid_len;
	JsonbInCall call;
	ErrorData  *edata;

	if (len > dwh_max_message_size)
	{
		problem_set(problem, ERRCODE_PROGRAM_LIMIT_EXCEEDED,
					"value of %d bytes exceeds dwh.max_message_size (%d bytes)",
					len, dwh_max_message_size);
		return NULL;
	}
	if (len == 0)
	{
		problem_set(problem, ERRCODE_INVALID_JSON_TEXT, "value is empty");
		return NULL;
	}

	valid_len = pg_encoding_verifymbstr(PG_UTF8, data, len);
	if (valid_len < len)
	{
		if (data[valid_len] == '\0')
			problem_set(problem, ERRCODE_CHARACTER_NOT_IN_REPERTOIRE,
						"value holds a NUL byte at offset %d", valid_len);
		else
			problem_set(problem, ERRCODE_CHARACTER_NOT_IN_REPERTOIRE,
						"value is not valid UTF-8: invalid byte 0x%02x at offset %d",
						(unsigned char) data[valid_len], valid_len);
		return NULL;
	}

	if (!check_nesting(data, len, problem))
		return NULL;

	/*
	 * jsonb_in raises an error for whatever it refuses: bad syntax, \u0000, a
	 * number beyond numeric's range (22003).  That refusal is the value's:
	 * raised, it would fail every retry of a Kafka batch holding such a
	 * message, and stall the Redis worker on the value for good.  Errors that
	 * are not about the value (out of memory) are raised.
	 */
	call.text = pnstrdup(data, len);
	call.result = NULL;
	edata = dwh_try_in_subtransaction(jsonb_in_call, &call);
	if (edata != NULL)
	{
		explain_refusal(call.text, len, edata, problem);
		FreeErrorData(edata);
		return NULL;
	}
	return call.result;
}

/*
 * Look up key in an object container; false when absent.
 */
static bool
get_field(JsonbContainer *obj, const char *key, JsonbValue *out)
{
	return getKeyJsonValueFromContainer(obj, key, strlen(key), out) != NULL;
}

/*
 * Is v an object (or array) container?
 */
static bool
is_object(JsonbValue *v)
{
	return v->type == jbvBinary && JsonContainerIsObject(v->val.binary.data);
}

static bool
is_array(JsonbValue *v)
{
	return v->type == jbvBinary && JsonContainerIsArray(v->val.binary.data);
}

/*
 * A required string field of at most maxlen bytes (0: no limit), non-empty
 * when nonempty is set.
 */
static bool
check_string(JsonbContainer *obj, const char *key, const char *path,
			 bool nonempty, int maxlen, JsonbValue *out, DwhProblem *problem)
{
	if (!get_field(obj, key, out))
		return problem_set(problem, ERRCODE_INVALID_TEXT_REPRESENTATION,
						   "%s%s is missing", path, key);
	if (out->type != jbvString)
		return problem_set(problem, ERRCODE_INVALID_TEXT_REPRESENTATION,
						   "%s%s must be a string, not %s",
						   path, key, JsonbTypeName(out));
	if (nonempty && out->val.string.len == 0)
		return problem_set(problem, ERRCODE_INVALID_TEXT_REPRESENTATION,
						   "%s%s must not be empty", path, key);
	if (maxlen > 0 && out->val.string.len > maxlen)
		return problem_set(problem, ERRCODE_STRING_DATA_RIGHT_TRUNCATION,
						   "%s%s is longer than %d bytes", path, key, maxlen);
	return true;
}

/*
 * A required timestamp field, "YYYY-MM-DD HH:MM:SS".
 */
static bool
check_timestamp(JsonbContainer *obj, const char *key, const char *path,
				Timestamp *ts, DwhProblem *problem)
{
	JsonbValue	v;

	if (!check_string(obj, key, path, true, 64, &v, problem))
		return false;
	if (!dwh_parse_timestamp(v.val.string.val, v.val.string.len, ts))
		return problem_set(problem, ERRCODE_INVALID_DATETIME_FORMAT,
						   "%s%s is not a valid timestamp \"YYYY-MM-DD HH:MM:SS\": \"%.*s\"",
						   path, key, v.val.string.len, v.val.string.val);
	return true;
}

/*
 * The decimal text of a jsonb number; numeric_out never fails on a number
 * that jsonb holds.
 */
static char *
number_text(JsonbValue *v)
{
	return DatumGetCString(DirectFunctionCall1(numeric_out,
											   NumericGetDatum(v->val.numeric)));
}

/*
 * A number's text as a reason quotes it: its first digits, cut in place.
 * Eight bytes of a message (1e130000) are 130,000 digits, which a dead
 * letter's reason would keep whatever dwh.dead_letter_keep_bytes says.
 * numeric_out() writes ASCII: any byte is a character boundary.
 */
static char *
reason_digits(char *digits)
{
	if (strlen(digits) > 32)
		strcpy(digits + 29, "...");
	return digits;
}

/*
 * Is the decimal text of a number not negative (numeric_out's form: no
 * exponent, no leading zeros but one before the point) below 1e14 once
 * rounded to the 5 decimals amounts are stored with (numeric(19, 5))?
 * Read from the digits: as a double, 99999999999999.999 is 1e14.
 */
static bool
below_max_amount(const char *digits)
{
	const char *p = digits + (digits[0] == '-' || digits[0] == '+');
	size_t		whole = strcspn(p, ".");
	const char *fraction;

	if (whole < 14)
		return true;
	if (whole > 14 || strspn(p, "9") < 14)
		return whole == 14;
	/* 14 nines: rounded up to 1e14 from .999995 on */
	fraction = p[14] == '.' ? p + 15 : "";
	return !(strspn(fraction, "9") >= 5 && fraction[5] >= '5' &&
			 fraction[5] <= '9');
}

/*
 * A required number field within [0, 1e14).
 */
static bool
check_amount(JsonbContainer *obj, const char *key, const char *path,
			 bool required, DwhProblem *problem)
{
	JsonbValue	v;
	char	   *digits;

	if (!get_field(obj, key, &v))
	{
		if (!required)
			return true;
		return problem_set(problem, ERRCODE_INVALID_TEXT_REPRESENTATION,
						   "%s%s is missing", path, key);
	}
	if (v.type != jbvNumeric)
		return problem_set(problem, ERRCODE_INVALID_TEXT_REPRESENTATION,
						   "%s%s must be a number, not %s",
						   path, key, JsonbTypeName(&v));
	digits = number_text(&v);

	/* The exact decimal's: -1e-400 is negative, -0 is not */
	if ((digits[0] == '-' && strpbrk(digits, "123456789") != NULL) ||
		!below_max_amount(digits))
		return problem_set(problem, ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE,
						   "%s%s must be between 0 and 1e14, not %s",
						   path, key, reason_digits(digits));
	return true;
}

/*
 * Parse the decimal text of a jsonb number as an integer in [min, max].
 */
static bool
number_as_int64(JsonbValue *v, int64 min, int64 max, int64 *result)
{
	char	   *s = number_text(v);
	char	   *end;
	long long	n;

	/* numeric_out writes a scale: "5.0" is not an integer here */
	if (strchr(s, '.') != NULL)
		return false;
	errno = 0;
	n = strtoll(s, &end, 10);
	if (errno != 0 || *end != '\0' || n < min || n > max)
		return false;
	*result = n;
	return true;
}

/*
 * One element of payload.order_items.
 */
static bool
check_order_item(JsonbValue *item, int i, DwhProblem *problem)
{
	JsonbContainer *obj;
	JsonbValue	v;
	char		path[64];
	int64		quantity;

	snprintf(path, sizeof(path), "payload.order_items[%d].", i);
	if (!is_object(item))
		return problem_set(problem, ERRCODE_INVALID_TEXT_REPRESENTATION,
						   "payload.order_items[%d] must be an object", i);
	obj = item->val.binary.data;
	if (!check_string(obj, "id", path, true, DWH_MAX_KEY_LEN, &v, problem) ||
		!check_string(obj, "name", path, false, 0, &v, problem) ||
		!check_amount(obj, "price", path, true, problem))
		return false;
	if (!get_field(obj, "quantity", &v))
		return problem_set(problem, ERRCODE_INVALID_TEXT_REPRESENTATION,
						   "%squantity is missing", path);
	if (v.type != jbvNumeric)
		return problem_set(problem, ERRCODE_INVALID_TEXT_REPRESENTATION,
						   "%squantity must be a number, not %s",
						   path, JsonbTypeName(&v));
	if (!number_as_int64(&v, 1, 1000000, &quantity))
		return problem_set(problem, ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE,
						   "%squantity must be an integer between 1 and 1000000, not %s",
						   path, reason_digits(number_text(&v)));
	return true;
}

/*
 * A required object field holding a non-empty "id" string.
 */
static bool
check_reference(JsonbContainer *payload, const char *key, DwhProblem *problem)
{
	JsonbValue	v;
	char		path[64];

	if (!get_field(payload, key, &v))
		return problem_set(problem, ERRCODE_INVALID_TEXT_REPRESENTATION,
						   "payload.%s is missing", key);
	if (!is_object(&v))
		return problem_set(problem, ERRCODE_INVALID_TEXT_REPRESENTATION,
						   "payload.%s must be an object", key);
	snprintf(path, sizeof(path), "payload.%s.", key);
	return check_string(v.val.binary.data, "id", path, true, DWH_MAX_KEY_LEN,
						&v, problem);
}

/*
 * dwh_order_payload_check
 *		Is payload a well-formed order of at most max_items items?  On
 *		success *update_ts is its version.
 */
bool
dwh_order_payload_check(JsonbContainer *payload, int max_items,
						Timestamp *update_ts, DwhProblem *problem)
{
	JsonbValue	v;
	Timestamp	date;
	int			n,
				i;

	if (!JsonContainerIsObject(payload))
		return problem_set(problem, ERRCODE_INVALID_TEXT_REPRESENTATION,
						   "payload must be an object");
	if (!check_reference(payload, "user", problem) ||
		!check_reference(payload, "restaurant", problem) ||
		!check_timestamp(payload, "date", "payload.", &date, problem) ||
		!check_timestamp(payload, "update_ts", "payload.", update_ts, problem) ||
		!check_string(payload, "final_status", "payload.", true, 64, &v, problem) ||
		!check_amount(payload, "cost", "payload.", true, problem) ||
		!check_amount(payload, "payment", "payload.", true, problem) ||
		!check_amount(payload, "bonus_payment", "payload.", false, problem) ||
		!check_amount(payload, "bonus_grant", "payload.", false, problem))
		return false;

	if (!get_field(payload, "order_items", &v))
		return problem_set(problem, ERRCODE_INVALID_TEXT_REPRESENTATION,
						   "payload.order_items is missing");
	if (!is_array(&v))
		return problem_set(problem, ERRCODE_INVALID_TEXT_REPRESENTATION,
						   "payload.order_items must be an array");
	n = JsonContainerSize(v.val.binary.data);
	if (n > max_items)
		return problem_set(problem, ERRCODE_PROGRAM_LIMIT_EXCEEDED,
						   "payload.order_items lists %d items, more than dwh.max_order_items (%d)",
						   n, max_items);
	for (i = 0; i < n; i++)
	{
		JsonbValue *item = getIthJsonbValueFromContainer(v.val.binary.data, i);

		if (!check_order_item(item, i, problem))
			return false;
	}

	if (get_field(payload, "statuses", &v) && !is_array(&v))
		return problem_set(problem, ERRCODE_INVALID_TEXT_REPRESENTATION,
						   "payload.statuses must be an array");
	return true;
}

/*
 * dwh_message_parse
 *		Classify one raw Kafka value.  Raises an error only for what is not
 *		about the message (out of memory).
 */
void
dwh_message_parse(const char *data, int len, DwhMessage *msg)
{
	Jsonb	   *jb;
	JsonbContainer *root;
	JsonbValue	v;
	DwhProblem *problem = &msg->problem;

	memset(msg, 0, sizeof(DwhMessage));
	msg->kind = DWH_MESSAGE_INVALID;

	jb = dwh_json_parse(data, len, problem);
	if (jb == NULL)
		return;
	root = &jb->root;
	if (!JsonContainerIsObject(root) || JsonContainerIsScalar(root))
	{
		problem_set(problem, ERRCODE_INVALID_TEXT_REPRESENTATION,
					"message must be a JSON object");
		return;
	}

	if (get_field(root, "object_id", &v) && v.type == jbvNumeric)
		msg->has_object_id = number_as_int64(&v, 1, PG_INT64_MAX,
											 &msg->object_id);
	if (get_field(root, "object_type", &v) && v.type == jbvString)
		msg->object_type = pnstrdup(v.val.string.val, v.val.string.len);
	if (get_field(root, "sent_dttm", &v) && v.type == jbvString)
		msg->has_sent_dttm = dwh_parse_timestamp(v.val.string.val,
												 v.val.string.len,
												 &msg->sent_dttm);

	if (msg->object_type == NULL)
	{
		if (get_field(root, "object_type", &v))
			problem_set(problem, ERRCODE_INVALID_TEXT_REPRESENTATION,
						"object_type must be a string");
		else
			problem_set(problem, ERRCODE_INVALID_TEXT_REPRESENTATION,
						"object_type is missing");
		return;
	}
	if (strcmp(msg->object_type, "order") != 0)
	{
		/* Not an order: kept whole in stg.other_events, out of the counts. */
		msg->kind = DWH_MESSAGE_OTHER;
		msg->message = jb;
		return;
	}

	if (!get_field(root, "object_id", &v))
	{
		problem_set(problem, ERRCODE_INVALID_TEXT_REPRESENTATION,
					"object_id is missing");
		return;
	}
	if (!msg->has_object_id)
	{
		if (v.type == jbvNumeric)
			problem_set(problem, ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE,
						"object_id must be an integer between 1 and 9223372036854775807, not %s",
						reason_digits(number_text(&v)));
		else
			problem_set(problem, ERRCODE_INVALID_TEXT_REPRESENTATION,
						"object_id must be an integer, not %s",
						JsonbTypeName(&v));
		return;
	}
	if (!check_timestamp(root, "sent_dttm", "", &msg->sent_dttm, problem))
		return;
	if (!get_field(root, "payload", &v))
	{
		problem_set(problem, ERRCODE_INVALID_TEXT_REPRESENTATION,
					"payload is missing");
		return;
	}
	if (!is_object(&v))
	{
		problem_set(problem, ERRCODE_INVALID_TEXT_REPRESENTATION,
					"payload must be an object");
		return;
	}
	if (!dwh_order_payload_check(v.val.binary.data, dwh_max_order_items,
								 &msg->update_ts, problem))
		return;

	msg->payload = JsonbValueToJsonb(&v);
	msg->kind = DWH_MESSAGE_ORDER;
}

/*
 * The optional update_ts_utc of a dictionary value: absent is fine, present
 * must be a valid timestamp.
 */
static bool
check_dictionary_version(JsonbContainer *value, bool *has_update_ts,
						 Timestamp *update_ts, DwhProblem *problem)
{
	JsonbValue	v;

	*has_update_ts = false;
	if (!get_field(value, "update_ts_utc", &v) || v.type == jbvNull)
		return true;
	if (!check_timestamp(value, "update_ts_utc", "", update_ts, problem))
		return false;
	*has_update_ts = true;
	return true;
}

/*
 * dwh_user_value_check
 *		Is value a user: {"name": ..., "login": ..., "update_ts_utc": ...}?
 */
bool
dwh_user_value_check(JsonbContainer *value, bool *has_update_ts,
					 Timestamp *update_ts, DwhProblem *problem)
{
	JsonbValue	v;

	if (!JsonContainerIsObject(value) || JsonContainerIsScalar(value))
		return problem_set(problem, ERRCODE_INVALID_TEXT_REPRESENTATION,
						   "user value must be a JSON object");
	return check_string(value, "name", "", false, 0, &v, problem) &&
		check_string(value, "login", "", false, 0, &v, problem) &&
		check_dictionary_version(value, has_update_ts, update_ts, problem);
}

/*
 * dwh_restaurant_value_check
 *		Is value a restaurant: {"name": ..., "menu": [{"_id", "name",
 *		"category"}...]}?  Entries with an empty _id are allowed (the source
 *		has one) and ignored downstream.
 */
bool
dwh_restaurant_value_check(JsonbContainer *value, bool *has_update_ts,
						   Timestamp *update_ts, DwhProblem *problem)
{
	JsonbValue	v;
	JsonbContainer *menu;
	int			n,
				i;

	if (!JsonContainerIsObject(value) || JsonContainerIsScalar(value))
		return problem_set(problem, ERRCODE_INVALID_TEXT_REPRESENTATION,
						   "restaurant value must be a JSON object");
	if (!check_string(value, "name", "", false, 0, &v, problem) ||
		!check_dictionary_version(value, has_update_ts, update_ts, problem))
		return false;
	if (!get_field(value, "menu", &v))
		return problem_set(problem, ERRCODE_INVALID_TEXT_REPRESENTATION,
						   "menu is missing");
	if (!is_array(&v))
		return problem_set(problem, ERRCODE_INVALID_TEXT_REPRESENTATION,
						   "menu must be an array");
	menu = v.val.binary.data;
	n = JsonContainerSize(menu);
	for (i = 0; i < n; i++)
	{
		JsonbValue *entry = getIthJsonbValueFromContainer(menu, i);
		char		path[32];

		snprintf(path, sizeof(path), "menu[%d].", i);
		if (!is_object(entry))
			return problem_set(problem, ERRCODE_INVALID_TEXT_REPRESENTATION,
							   "menu[%d] must be an object", i);
		if (!check_string(entry->val.binary.data, "_id", path, false,
						  DWH_MAX_KEY_LEN, &v, problem) ||
			!check_string(entry->val.binary.data, "name", path, false, 0,
						  &v, problem) ||
			!check_string(entry->val.binary.data, "category", path, false,
						  DWH_MAX_CATEGORY_LEN, &v, problem))
			return false;
	}
	return true;
}

/*
 * dwh_jsonb_text_cmp
 *		Compare two jsonb values by their text, byte by byte; 0 only for the
 *		same value.  The order of versions that share a version time.
 */
int
dwh_jsonb_text_cmp(Jsonb *a, Jsonb *b)
{
	char	   *ta,
			   *tb;
	int			cmp;

	if (VARSIZE(a) == VARSIZE(b) && memcmp(a, b, VARSIZE(a)) == 0)
		return 0;
	ta = JsonbToCString(NULL, &a->root, VARSIZE(a));
	tb = JsonbToCString(NULL, &b->root, VARSIZE(b));
	cmp = strcmp(ta, tb);
	pfree(ta);
	pfree(tb);
	return cmp;
}
