/*-------------------------------------------------------------------------
 *
 * dwh_kafka_hide.c
 *	  Hide the values of the DBA's librdkafka properties in what librdkafka
 *	  says.
 *
 * librdkafka quotes property values in its own texts: "Unsupported SASL
 * mechanism: X" when it refuses a configuration, the path of a key store it
 * cannot open, and maybe a user name in an error or a log line.  Any
 * property of dwh.kafka_options or of the file named by
 * dwh.kafka_options_file may hold a secret, so every text of librdkafka
 * that dwh shows (dwh.status, the server log) first goes through
 * dwh_kafka_hide_values(), which replaces each of their values by the name
 * of its property.  The names are remembered when the options are applied;
 * the values are read back from the client's configuration when a text is
 * hidden, so that no copy of a secret outlives the client.  A value with
 * "%{property}" placeholders, which librdkafka expands before it quotes
 * it, is also hidden piece by piece.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <ctype.h>

#include "lib/stringinfo.h"
#include "nodes/pg_list.h"
#include "utils/memutils.h"

#include "dwh_kafka_hide.h"

/*
 * Values shorter than this are left in place: hiding every "1" or "ok" in a
 * text would leave nothing readable, and no secret is that short.
 */
#define MIN_HIDDEN_LEN	3

/*
 * A value shorter than this is hidden only as a whole word, since it may be
 * a piece of other words ("ssl" of "ssl.keystore.location").  A longer one
 * is hidden wherever it occurs.
 */
#define MIN_ANYWHERE_LEN	8

/* Names of the properties the DBA set for the client being configured. */
static List *dba_properties = NIL;

/* Where the last hidden text lives, until the next one. */
static MemoryContext hidden_text_context = NULL;

/*
 * dwh_kafka_hide_forget
 *		A new client is being configured: forget the properties of the last.
 */
void
dwh_kafka_hide_forget(void)
{
	list_free_deep(dba_properties);
	dba_properties = NIL;
}

/*
 * Properties whose value librdkafka takes only from a few words, none of
 * them a secret, and names in its texts (SASL_SSL://host:9092/1).
 */
static const char *const word_properties[] = {
	"security.protocol",
	NULL
};

/*
 * dwh_kafka_hide_property
 *		The DBA set this property: hide its value from now on.
 */
void
dwh_kafka_hide_property(const char *name)
{
	MemoryContext old;
	int			i;

	for (i = 0; word_properties[i] != NULL; i++)
		if (strcmp(name, word_properties[i]) == 0)
			return;
	old = MemoryContextSwitchTo(TopMemoryContext);

	dba_properties = lappend(dba_properties, pstrdup(name));
	MemoryContextSwitchTo(old);
}

typedef struct HiddenValue
{
	const char *name;
	char	   *value;
	size_t		len;
} HiddenValue;

/* Longest values first: one that holds another is hidden whole. */
static int
longest_first(const void *a, const void *b)
{
	size_t		la = ((const HiddenValue *) a)->len;
	size_t		lb = ((const HiddenValue *) b)->len;

	return (la < lb) - (la > lb);
}

/* Part of a word, or of a property's name ("ssl.keystore.location")? */
static bool
is_word_char(char c)
{
	return isalnum((unsigned char) c) || c == '_' || c == '.' || c == '-';
}

/* Does value (of len bytes) occur in text at p, to be hidden there? */
static bool
hidden_at(const char *text, const char *p, const char *value, size_t len)
{
	if (pg_strncasecmp(p, value, len) != 0)
		return false;
	if (len >= MIN_ANYWHERE_LEN)
		return true;
	return (p == text || !is_word_char(p[-1]) || !is_word_char(value[0])) &&
		(!is_word_char(p[len]) || !is_word_char(value[len - 1]));
}

/* Add len bytes at s to the values to hide, if long enough to hide. */
static void
add_hidden(HiddenValue **values, int *n, int *size, const char *name,
		   const char *s, size_t len)
{
	if (len < MIN_HIDDEN_LEN)
		return;
	if (*n == *size)
	{
		*size *= 2;
		*values = repalloc(*values, sizeof(HiddenValue) * *size);
	}
	(*values)[*n].name = name;
	(*values)[*n].value = pnstrdup(s, len);
	(*values)[*n].len = len;
	(*n)++;
}

/*
 * Add a value to hide.  librdkafka expands "%{property}" in a value
 * before it runs or quotes it (sasl.kerberos.kinit.cmd): the text between
 * the placeholders is hidden too, piece by piece, since the whole no
 * longer occurs.
 */
static void
add_value(HiddenValue **values, int *n, int *size, const char *name,
		  const char *value)
{
	const char *piece = value;
	const char *p;

	add_hidden(values, n, size, name, value, strlen(value));
	if (strstr(value, "%{") == NULL)
		return;
	while ((p = strstr(piece, "%{")) != NULL)
	{
		const char *end = strchr(p, '}');

		add_hidden(values, n, size, name, piece, p - piece);
		if (end == NULL)
			return;
		piece = end + 1;
	}
	add_hidden(values, n, size, name, piece, strlen(piece));
}

/*
 * dwh_kafka_hide_values
 *		A copy of text (from librdkafka) in which every value the DBA set in
 *		conf is "(the value of NAME)", matched without regard to case
 *		(librdkafka may give back an enum value in its own case).  The copy
 *		lasts until the next call: callers copy or report it at once, and
 *		nothing piles up in a worker's long-lived memory.
 */
const char *
dwh_kafka_hide_values(const rd_kafka_conf_t *conf, const char *text)
{
	HiddenValue *values;
	int			n = 0;
	int			size = list_length(dba_properties) + 1;
	ListCell   *lc;
	StringInfoData out;
	const char *p;
	int			i;
	MemoryContext old;

	if (hidden_text_context == NULL)
		hidden_text_context = AllocSetContextCreate(TopMemoryContext,
													"dwh hidden Kafka text",
													ALLOCSET_SMALL_SIZES);
	MemoryContextReset(hidden_text_context);
	old = MemoryContextSwitchTo(hidden_text_context);
	if (text == NULL)
		text = "";
	values = palloc(sizeof(HiddenValue) * size);
	foreach(lc, dba_properties)
	{
		const char *name = lfirst(lc);
		size_t		value_size = 0;
		char	   *value;

		if (conf == NULL ||
			rd_kafka_conf_get(conf, name, NULL, &value_size) != RD_KAFKA_CONF_OK ||
			value_size <= MIN_HIDDEN_LEN)
			continue;
		value = palloc0(value_size);
		if (rd_kafka_conf_get(conf, name, value, &value_size) == RD_KAFKA_CONF_OK)
			add_value(&values, &n, &size, name, value);
		explicit_bzero(value, strlen(value));
		pfree(value);
	}
	qsort(values, n, sizeof(HiddenValue), longest_first);

	initStringInfo(&out);
	for (p = text; *p != '\0';)
	{
		for (i = 0; i < n; i++)
		{
			if (hidden_at(text, p, values[i].value, values[i].len))
				break;
		}
		if (i < n)
		{
			appendStringInfo(&out, "(the value of %s)", values[i].name);
			p += values[i].len;
		}
		else
			appendStringInfoChar(&out, *p++);
	}

	for (i = 0; i < n; i++)
	{
		explicit_bzero(values[i].value, values[i].len);
		pfree(values[i].value);
	}
	MemoryContextSwitchTo(old);
	return out.data;
}
