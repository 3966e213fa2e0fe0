/*-------------------------------------------------------------------------
 *
 * dwh_secrets.c
 *	  Keep the secrets of dwh settings out of the server log.
 *
 * dwh.kafka_options may hold a SASL password and dwh.redis_url a Redis
 * password.  PostgreSQL itself logs setting values: the postmaster logs
 * 'parameter "x" changed to "..."' on every reload, and a failing or
 * logged statement (ALTER SYSTEM SET ...) is written out with its text.
 * An emit_log_hook, installed in the postmaster and so inherited by every
 * process, rewrites such messages before they reach the log or a client.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "tcop/tcopprot.h"

#include "dwh_secrets.h"

static const char *const secret_settings[] = {
	"dwh.kafka_options",
	"dwh.redis_url",
	NULL
};

static emit_log_hook_type previous_emit_log_hook = NULL;

/* The first secret setting that text mentions, or NULL. */
static const char *
mentioned_secret_setting(const char *text, const char **where)
{
	int			i;

	if (text == NULL)
		return NULL;
	for (i = 0; secret_settings[i] != NULL; i++)
	{
		const char *p = strstr(text, secret_settings[i]);

		if (p != NULL)
		{
			*where = p;
			return secret_settings[i];
		}
	}
	return NULL;
}

/*
 * Can the text that follows a setting's name in a message hold its value?
 * Only if it quotes or assigns something, beyond the name's closing quote.
 */
static bool
may_quote_value(const char *rest)
{
	if (*rest == '"')
		rest++;
	return strpbrk(rest, "\"'=") != NULL;
}

/*
 * A message that names a secret setting keeps its text up to the name; what
 * follows may quote the value and is left out.
 */
static void
redact_log_message(ErrorData *edata)
{
	const char *where;
	const char *name;

	name = mentioned_secret_setting(edata->message, &where);
	if (name != NULL && may_quote_value(where + strlen(name)))
	{
		int			keep = (where - edata->message) + strlen(name);
		const char *rest = where + strlen(name);

		if (strncmp(rest, "\" changed to ", 13) == 0)
			edata->message = psprintf("%.*s\" changed (the new value is not logged: it may hold a secret)",
									  keep, edata->message);
		else
			edata->message = psprintf("%.*s ... (the rest is not logged: it may hold a secret)",
									  keep, edata->message);
	}
	if (mentioned_secret_setting(edata->detail, &where) != NULL)
		edata->detail = NULL;
	if (mentioned_secret_setting(edata->detail_log, &where) != NULL)
		edata->detail_log = NULL;
	if (mentioned_secret_setting(edata->internalquery, &where) != NULL)
		edata->internalquery = NULL;
	/* The STATEMENT: line repeats the query text. */
	if (mentioned_secret_setting(debug_query_string, &where) != NULL)
		edata->hide_stmt = true;

	if (previous_emit_log_hook)
		previous_emit_log_hook(edata);
}

/*
 * dwh_secrets_install_log_filter
 *		Install the hook (from _PG_init).
 */
void
dwh_secrets_install_log_filter(void)
{
	previous_emit_log_hook = emit_log_hook;
	emit_log_hook = redact_log_message;
}
