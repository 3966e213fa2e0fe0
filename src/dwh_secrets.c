/*-------------------------------------------------------------------------
 *
 * dwh_secrets.c
 *	  Keep the values of secret dwh settings out of the server log, the
 *	  messages sent to clients, pg_stat_activity and pg_stat_statements.
 *
 * dwh.kafka_options may hold a SASL password and dwh.redis_url a Redis
 * password.  PostgreSQL shows a statement's text in many places: the
 * log_statement and log_min_duration_statement lines, the STATEMENT line
 * of a logged error, CONTEXT lines ("SQL statement ..."), a QUERY line,
 * the parameters of an extended-protocol statement, the plan logged by
 * auto_explain, pg_stat_activity and pg_stat_statements (which, in
 * PostgreSQL 15, keeps the text of utility statements as written).  The
 * postmaster logs 'parameter "x" changed to "..."' on every reload.
 *
 * Which statements are sensitive is decided by dwh_secret_scan.c, without
 * regard to how the setting's name is spelt.  For a sensitive statement,
 * or a message that names a secret setting:
 *
 *	- an emit_log_hook (installed in every process) rewrites the message
 *	  before it reaches the log or the client: the statement's text is
 *	  replaced, other messages keep their text only if it is one of dwh's
 *	  own setting errors (which never quote a value) or names nothing but
 *	  the setting; any other message is replaced by its format string with
 *	  every argument shown as ***; details, hints, CONTEXT and QUERY lines
 *	  that may quote the statement are replaced; the STATEMENT line is
 *	  left out;
 *	- the backend's pg_stat_activity text is replaced as soon as a hook
 *	  sees the statement (parse analysis, executor start, utility start, or
 *	  a log line about it);
 *	- a ProcessUtility hook passes a masked text of the same length down
 *	  to the hooks below it, pg_stat_statements among them, so that the
 *	  text they keep is the mask.  Only hooks installed before dwh's are
 *	  below it: dwh must come after pg_stat_statements in
 *	  shared_preload_libraries, and says so at startup otherwise.
 *
 * What cannot be hidden is documented in README.md ("Secrets").
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "executor/executor.h"
#include "lib/stringinfo.h"
#include "parser/analyze.h"
#include "tcop/tcopprot.h"
#include "tcop/utility.h"
#include "utils/backend_status.h"

#include "dwh_secret_scan.h"
#include "dwh_secrets.h"

/* What replaces a text in the log and in messages. */
#define HIDDEN_TEXT "<not shown: it may hold the value of a secret dwh setting>"

/* What pg_stat_activity shows instead of a sensitive statement. */
#define HIDDEN_ACTIVITY "/* dwh: statement not shown, it may hold the value of a secret setting */"

/* The format PostgreSQL logs a changed setting with (guc-file.l). */
#define CHANGED_TO_FORMAT "parameter \"%s\" changed to \"%s\""

/* The lexer's and parser's errors (scanner_yyerror). */
#define NEAR_FORMAT "%s at or near \"%s\""
#define NEAR_TEXT " at or near \""

/*
 * Formats whose arguments PostgreSQL makes itself (a duration, a command
 * tag): kept as they are whatever the statement.
 */
static const char *const safe_formats[] = {
	"duration: %s ms",
	"%s cannot run inside a transaction block",
	"%s cannot run inside a subtransaction",
	"%s cannot be executed from a function",
	"%s cannot be executed within a pipeline",
	"%s at end of input",
	NULL
};

/* A syntax error in a configuration file quotes a token of a value. */
#define CONF_SYNTAX_FORMAT "syntax error in file \"%s\" line %u, near token \"%s\""

static emit_log_hook_type previous_emit_log_hook = NULL;
static post_parse_analyze_hook_type previous_post_parse_analyze_hook = NULL;
static ExecutorStart_hook_type previous_ExecutorStart_hook = NULL;
static ProcessUtility_hook_type previous_ProcessUtility_hook = NULL;

/*
 * The last top-level statement judged (debug_query_string): one scan per
 * statement, however many nested queries and log lines it has.  The
 * statement start time and the first bytes tell a new statement that
 * reuses the same buffer.
 */
static struct
{
	const char *text;
	TimestampTz started;
	char		head[64];
	bool		sensitive;
}			judged;

/*
 * The last query string a utility statement came with, when it is not the
 * top-level one: an extension script or a function body runs many
 * statements with one string.
 */
static struct
{
	const char *text;
	TimestampTz started;
	char		head[64];
	bool		sensitive;
}			judged_utility;

/*
 * The last message or detail dwh vouched for (its setting errors): it never
 * quotes a value.
 */
static char vouched_message[1024];

/* Set while the log hook runs: a message raised inside it is not filtered. */
static bool in_log_hook = false;

/*
 * dwh_secrets_vouch_message
 *		Record a message of dwh's own setting checks, written never to quote
 *		a value: the log filter keeps it as it is, as a message or a detail.
 */
void
dwh_secrets_vouch_message(const char *message)
{
	if (message != NULL)
		strlcpy(vouched_message, message, sizeof(vouched_message));
}

/* Is the judgement cached for the current statement? */
static bool
judged_current(void)
{
	const char *q = debug_query_string;

	return q != NULL && q == judged.text &&
		judged.started == GetCurrentStatementStartTimestamp() &&
		strncmp(q, judged.head, sizeof(judged.head) - 1) == 0;
}

static void
judge_current(bool sensitive)
{
	judged.text = debug_query_string;
	judged.started = GetCurrentStatementStartTimestamp();
	strlcpy(judged.head, debug_query_string, sizeof(judged.head));
	judged.sensitive = sensitive;
}

/*
 * Is the current top-level statement sensitive?
 */
static bool
statement_sensitive(void)
{
	if (debug_query_string == NULL)
		return false;
	if (!judged_current())
		judge_current(dwh_secret_text_sensitive(debug_query_string,
												strlen(debug_query_string),
												true));
	return judged.sensitive;
}

/*
 * A message about the current statement named a secret setting (for
 * example "parameter ... cannot be changed now" from a function called
 * with the value): the statement's text may hold the value.
 */
static void
mark_statement_sensitive(void)
{
	if (debug_query_string != NULL)
		judge_current(true);
}

/*
 * Show the placeholder in pg_stat_activity instead of the current
 * statement.  Only this backend writes its entry, so reading it needs no
 * lock.  The query id, reset by pgstat_report_activity, is kept.
 */
static void
hide_activity(void)
{
	volatile PgBackendStatus *be = MyBEEntry;
	uint64		query_id;

	if (be == NULL || !pgstat_track_activities ||
		be->st_state == STATE_UNDEFINED || be->st_state == STATE_DISABLED)
		return;
	if (strncmp((const char *) be->st_activity_raw, HIDDEN_ACTIVITY,
				strlen(HIDDEN_ACTIVITY)) == 0)
		return;
	query_id = be->st_query_id;
	pgstat_report_activity(be->st_state, HIDDEN_ACTIVITY);
	if (query_id != UINT64CONST(0))
		pgstat_report_query_id(query_id, true);
}

/*
 * Does the text name a secret setting in any way?  Then the statement it
 * is about may hold the value, even if its text does not name the setting
 * (a function called with the value).
 */
static bool
part_mentions(const char *text)
{
	return text != NULL &&
		dwh_secret_text_sensitive(text, strlen(text), false);
}

/*
 * May a part of a message (outside a sensitive statement) quote a value?
 * Only if it names a secret setting and quotes something: PostgreSQL
 * quotes values, SQL text and parameters ('...', "...", $$...$$), and a
 * setting's exact name in double quotes is no quotation of a value.
 */
static bool
part_sensitive(const char *text)
{
	StringInfoData rest;
	const char *p;
	bool		sensitive;

	if (!part_mentions(text))
		return false;

	initStringInfo(&rest);
	for (p = text; *p != '\0'; p++)
	{
		const char *close;

		if (*p == '"' && (close = strchr(p + 1, '"')) != NULL &&
			dwh_secret_is_setting_name(p + 1, close - p - 1))
		{
			p = close;
			continue;
		}
		appendStringInfoChar(&rest, *p);
	}
	sensitive = strpbrk(rest.data, "\"'$") != NULL &&
		dwh_secret_text_sensitive(rest.data, rest.len, false);
	pfree(rest.data);
	return sensitive;
}

/*
 * Does the format take only double-quoted arguments ('parameter "%s"
 * cannot be changed now'), and are they all names of secret settings?
 * Then the message says nothing but the name.  Checked on the text itself:
 * the message without the names must be the format without its arguments
 * (a translated message is not, and is shown as its format instead).
 */
static bool
only_names_settings(const char *message, const char *format)
{
	StringInfoData bare;
	const char *p;
	char	   *rest;
	bool		same;

	if (format == NULL)
		return false;
	initStringInfo(&bare);
	for (p = format; *p != '\0'; p++)
	{
		if (*p != '%')
		{
			appendStringInfoChar(&bare, *p);
			continue;
		}
		if (p[1] == '%')
		{
			appendStringInfoChar(&bare, '%');
			p++;
			continue;
		}
		/* Only "%s" directly in double quotes. */
		if (p == format || p[-1] != '"' || p[1] != 's' || p[2] != '"')
		{
			pfree(bare.data);
			return false;
		}
		p++;
	}
	rest = dwh_secret_strip_setting_names(message);
	same = strcmp(rest, bare.data) == 0;
	pfree(rest);
	pfree(bare.data);
	return same;
}

/*
 * The message's format with every argument shown as ***: it says what
 * happened and cannot hold a value.
 */
static char *
format_without_arguments(const char *format)
{
	StringInfoData buf;
	const char *p;

	if (format == NULL || strspn(format, "%s") == strlen(format))
		return pstrdup(HIDDEN_TEXT);

	initStringInfo(&buf);
	for (p = format; *p != '\0'; p++)
	{
		if (*p != '%')
		{
			appendStringInfoChar(&buf, *p);
			continue;
		}
		if (p[1] == '%')
		{
			appendStringInfoChar(&buf, '%');
			p++;
			continue;
		}
		/* Flags, width, precision and length, then the conversion. */
		p++;
		while (*p != '\0' && strchr("-+ #0123456789.*hlLqjzt", *p) != NULL)
			p++;
		appendStringInfoString(&buf, "***");
		if (*p == '\0')
			break;
	}
	return buf.data;
}

/* The first double-quoted part of text, palloc'd, or NULL. */
static char *
first_quoted(const char *text)
{
	const char *open = strchr(text, '"');
	const char *close = open ? strchr(open + 1, '"') : NULL;

	return close ? pnstrdup(open + 1, close - open - 1) : NULL;
}

/*
 * The message to log instead of edata->message.
 */
static char *
redacted_message(ErrorData *edata, bool statement)
{
	const char *message = edata->message;
	const char *format = edata->message_id;
	size_t		qlen;
	size_t		mlen;
	int			i;

	if (message == NULL)
		return NULL;
	if (vouched_message[0] != '\0' && strcmp(message, vouched_message) == 0)
		return edata->message;

	/* A reload's 'parameter "dwh.redis_url" changed to "..."'. */
	if (format != NULL && strcmp(format, CHANGED_TO_FORMAT) == 0)
	{
		char	   *name = first_quoted(message);

		if (name != NULL && dwh_secret_is_setting_name(name, strlen(name)))
			return psprintf("parameter \"%s\" changed (the new value is not logged: it may hold a secret)",
							name);
		return edata->message;
	}

	/* A broken line of a configuration file: its token may be a value. */
	if (format != NULL && strcmp(format, CONF_SYNTAX_FORMAT) == 0)
	{
		const char *last = strrchr(message, '"');
		const char *open = NULL;
		const char *p;

		for (p = message; last != NULL && p < last; p++)
			if (*p == '"')
				open = p;
		if (open != NULL)
			return psprintf("%.*s***%s", (int) (open + 1 - message), message,
							last);
		return format_without_arguments(format);
	}

	if (!statement && !part_sensitive(message))
		return edata->message;

	/* A log line that ends with the statement's text. */
	mlen = strlen(message);
	qlen = debug_query_string ? strlen(debug_query_string) : 0;
	if (qlen > 0 && mlen >= qlen &&
		strcmp(message + mlen - qlen, debug_query_string) == 0)
		return psprintf("%.*s%s", (int) (mlen - qlen), message, HIDDEN_TEXT);

	/* Nothing but the names of the settings, or no argument at all. */
	if (format != NULL && strcmp(message, format) == 0 &&
		strchr(format, '%') == NULL)
		return edata->message;
	for (i = 0; format != NULL && safe_formats[i] != NULL; i++)
		if (strcmp(format, safe_formats[i]) == 0)
			return edata->message;
	if (only_names_settings(message, format))
		return edata->message;

	/*
	 * The lexer's and the parser's errors: a fixed phrase ("syntax error",
	 * "unterminated quoted string") and the text near the error, which may be
	 * a piece of the value.
	 */
	if (format != NULL && strcmp(format, NEAR_FORMAT) == 0)
	{
		const char *near = strstr(message, NEAR_TEXT);
		const char *next;

		while (near != NULL && (next = strstr(near + 1, NEAR_TEXT)) != NULL)
			near = next;
		if (near != NULL)
			return psprintf("%.*s***\"",
							(int) (near + strlen(NEAR_TEXT) - message), message);
	}

	return format_without_arguments(format);
}

/*
 * A detail, hint or CONTEXT line: kept unless it may quote the value.  In
 * a sensitive statement any quotation may be a piece of it.
 */
static bool
line_hidden(const char *text, size_t len, bool statement)
{
	char	   *copy = pnstrdup(text, len);
	bool		hidden;

	hidden = (statement && strpbrk(copy, "\"'") != NULL) ||
		part_sensitive(copy);
	pfree(copy);
	return hidden;
}

static char *
redacted_part(char *text, bool statement)
{
	if (text == NULL || !line_hidden(text, strlen(text), statement))
		return text;
	if (!statement && vouched_message[0] != '\0' &&
		strcmp(text, vouched_message) == 0)
		return text;
	return pstrdup(HIDDEN_TEXT);
}

/* CONTEXT holds one line per level: judge each. */
static char *
redacted_context(char *context, bool statement)
{
	StringInfoData buf;
	const char *line = context;
	bool		changed = false;

	if (context == NULL)
		return NULL;
	initStringInfo(&buf);
	while (*line != '\0')
	{
		const char *end = strchr(line, '\n');
		size_t		len = end ? (size_t) (end - line) : strlen(line);

		if (buf.len > 0)
			appendStringInfoChar(&buf, '\n');
		if (line_hidden(line, len, statement))
		{
			appendStringInfoString(&buf, HIDDEN_TEXT);
			changed = true;
		}
		else
			appendBinaryStringInfo(&buf, line, len);
		line += len;
		if (*line == '\n')
			line++;
	}
	return changed ? buf.data : context;
}

/*
 * The emit_log_hook: rewrite a message that may carry a secret before it
 * reaches the log and the client.
 */
static void
redact_log_message(ErrorData *edata)
{
	bool		statement;

	if (!in_log_hook)
	{
		in_log_hook = true;

		/*
		 * An error here (out of memory while copying a huge message) must not
		 * leave redaction off for the rest of the session.
		 */
		PG_TRY();
		{
			statement = statement_sensitive();
			if (!statement && debug_query_string != NULL &&
				(part_mentions(edata->message) || part_mentions(edata->detail) ||
				 part_mentions(edata->detail_log) || part_mentions(edata->hint) ||
				 part_mentions(edata->context) ||
				 part_mentions(edata->internalquery)))
			{
				/*
				 * The statement's text may hold the value even though it does
				 * not name the setting (a function called with it): it is
				 * hidden from the STATEMENT line and its next log lines.
				 */
				mark_statement_sensitive();
				statement = true;
			}

			edata->message = redacted_message(edata, statement);
			edata->detail = redacted_part(edata->detail, statement);
			edata->detail_log = redacted_part(edata->detail_log, statement);
			edata->hint = redacted_part(edata->hint, statement);
			edata->context = redacted_context(edata->context, statement);
			if (edata->internalquery != NULL &&
				(statement || part_sensitive(edata->internalquery)))
			{
				edata->internalquery = pstrdup(HIDDEN_TEXT);
				edata->internalpos = 0;
			}
			if (statement)
			{
				/* The STATEMENT: line would repeat the text. */
				edata->hide_stmt = true;
				hide_activity();
			}
		}
		PG_FINALLY();
		{
			in_log_hook = false;
		}
		PG_END_TRY();
	}

	if (previous_emit_log_hook)
		previous_emit_log_hook(edata);
}

/*
 * After parse analysis: the earliest moment a hook sees a statement whose
 * text pg_stat_activity already shows.
 */
static void
hide_analyzed_statement(ParseState *pstate, Query *query, JumbleState *jstate)
{
	if (previous_post_parse_analyze_hook)
		previous_post_parse_analyze_hook(pstate, query, jstate);
	if (statement_sensitive())
		hide_activity();
}

/*
 * Executor start: a prepared statement executed through the extended
 * protocol is shown again by Bind and Execute, without parse analysis.
 */
static void
hide_executed_statement(QueryDesc *queryDesc, int eflags)
{
	if (statement_sensitive())
		hide_activity();
	if (previous_ExecutorStart_hook)
		previous_ExecutorStart_hook(queryDesc, eflags);
	else
		standard_ExecutorStart(queryDesc, eflags);
}

/*
 * A text as long as text, all ASCII, that shows no part of it.  Same
 * length: the statement's location and length, and the positions of its
 * constants, stay within the text for every hook below.
 */
static char *
masked_statement(const char *text)
{
	size_t		len = strlen(text);
	size_t		note = strlen(HIDDEN_ACTIVITY);
	char	   *mask = palloc(len + 1);

	if (len >= note)
	{
		memcpy(mask, HIDDEN_ACTIVITY, note);
		memset(mask + note, ' ', len - note);
	}
	else
		memset(mask, '-', len);
	mask[len] = '\0';
	return mask;
}

/*
 * Utility statements: pg_stat_statements keeps their text as written, so a
 * sensitive one is passed down masked.  PREPARE, EXECUTE and DEALLOCATE
 * are not kept by it; PREPARE keeps its text for EXECUTE to be judged by.
 */
static void
hide_utility_statement(PlannedStmt *pstmt, const char *queryString,
					   bool readOnlyTree, ProcessUtilityContext context,
					   ParamListInfo params, QueryEnvironment *queryEnv,
					   DestReceiver *dest, QueryCompletion *qc)
{
	Node	   *parsetree = pstmt->utilityStmt;
	bool		sensitive;

	if (statement_sensitive())
		hide_activity();

	if (queryString == NULL)
		sensitive = false;
	else if (queryString == debug_query_string)
		sensitive = statement_sensitive();
	else if (queryString == judged_utility.text &&
			 judged_utility.started == GetCurrentStatementStartTimestamp() &&
			 strncmp(queryString, judged_utility.head,
					 sizeof(judged_utility.head) - 1) == 0)
		sensitive = judged_utility.sensitive;
	else
	{
		sensitive = dwh_secret_text_sensitive(queryString, strlen(queryString),
											  true);
		judged_utility.text = queryString;
		judged_utility.started = GetCurrentStatementStartTimestamp();
		strlcpy(judged_utility.head, queryString, sizeof(judged_utility.head));
		judged_utility.sensitive = sensitive;
	}
	if (sensitive && !IsA(parsetree, PrepareStmt) &&
		!IsA(parsetree, ExecuteStmt) && !IsA(parsetree, DeallocateStmt))
		queryString = masked_statement(queryString);

	if (previous_ProcessUtility_hook)
		previous_ProcessUtility_hook(pstmt, queryString, readOnlyTree, context,
									 params, queryEnv, dest, qc);
	else
		standard_ProcessUtility(pstmt, queryString, readOnlyTree, context,
								params, queryEnv, dest, qc);
}

/*
 * dwh_secrets_install_hooks
 *		Install the hooks (from _PG_init).
 */
void
dwh_secrets_install_hooks(void)
{
	previous_emit_log_hook = emit_log_hook;
	emit_log_hook = redact_log_message;
	previous_post_parse_analyze_hook = post_parse_analyze_hook;
	post_parse_analyze_hook = hide_analyzed_statement;
	previous_ExecutorStart_hook = ExecutorStart_hook;
	ExecutorStart_hook = hide_executed_statement;
	previous_ProcessUtility_hook = ProcessUtility_hook;
	ProcessUtility_hook = hide_utility_statement;
}

/*
 * dwh_secrets_check_hook_order
 *		Once every preloaded library is loaded (in the postmaster): warn if
 *		a library loaded after dwh sees utility statements before dwh
 *		masks them.
 */
void
dwh_secrets_check_hook_order(void)
{
	if (ProcessUtility_hook != hide_utility_statement)
		ereport(WARNING,
				(errmsg("a library loaded after dwh sees utility statements before dwh hides secret setting values from them"),
				 errdetail("pg_stat_statements, for one, would keep the text of ALTER SYSTEM statements setting dwh.kafka_options or dwh.redis_url."),
				 errhint("List dwh after every other library in shared_preload_libraries.")));
}
