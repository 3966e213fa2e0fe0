/*-------------------------------------------------------------------------
 *
 * dwh_kafka_options.c
 *	  dwh.kafka_options: extra librdkafka properties, their syntax and
 *	  their validation.
 *
 * The syntax is the one of libpq connection strings: name=value pairs
 * separated by white space, a value in single quotes when it holds spaces,
 * with \' and \\ inside quotes.  Properties that dwh sets itself (brokers,
 * group, offset handling) are refused with a hint naming the dwh setting to
 * use instead.
 *
 * Validation runs in two places.  The check hook parses the value in every
 * process; in a backend (ALTER SYSTEM, SET) it also asks librdkafka whether
 * each property exists and takes that value, so a typo is an error at once.
 * The postmaster only parses: no library state is created there before the
 * fork.  A worker applies the properties again, with those of the file
 * named by dwh.kafka_options_file, and reports what librdkafka refuses (for
 * example an unreadable ssl.ca.location) in dwh.status.
 *
 * Any property may hold a secret (sasl.password, or an unquoted password
 * with a space in it, whose tail reads as another pair): no message quotes
 * a value, and a pair librdkafka does not know is named by its number.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <ctype.h>

#include "lib/stringinfo.h"
#include "miscadmin.h"

#include "dwh_kafka_hide.h"
#include "dwh_kafka_options.h"
#include "dwh_secret_files.h"
#include "dwh_secrets.h"
#include "dwh_settings.h"

/* Properties dwh manages itself, and the setting that replaces each. */
static const struct
{
	const char *property;
	const char *instead;
	const char *why;			/* when there is no setting instead */
}			reserved_properties[] = {
	{"bootstrap.servers", "dwh.kafka_brokers", NULL},
	{"metadata.broker.list", "dwh.kafka_brokers", NULL},
	{"group.id", "dwh.kafka_group_id", NULL},
	{"auto.offset.reset", "dwh.kafka_start_offset or dwh.kafka_on_gap", NULL},
	{"queued.max.messages.kbytes", "dwh.kafka_prefetch_memory", NULL},
	{"enable.auto.commit", NULL, NULL},
	{"auto.commit.enable", NULL, NULL},
	{"enable.auto.offset.store", NULL, NULL},
	{"offset.store.method", NULL, NULL},
	{"enable.partition.eof", NULL, NULL},
	{"isolation.level", NULL, "dwh reads committed messages only: those of aborted transactions must never reach the marts."},
	{"log.queue", NULL, NULL},
	{NULL, NULL, NULL}
};

/*
 * Properties refused, and why (a hint: no quotation marks, which the log
 * filter takes for a quoted value).  librdkafka 2.0.2's unsecured JWT builder,
 * meant for tests, crashes the process (and so the whole server) on a
 * malformed sasl.oauthbearer.config, and quotes that value, a secret, in
 * the error it reports.
 */
static const struct
{
	const char *property;
	const char *why;
}			refused_properties[] = {
	{"enable.sasl.oauthbearer.unsecure.jwt", "The unsecured JWT builder of librdkafka is meant for tests, and can crash the server on a malformed configuration: use OIDC tokens (sasl.oauthbearer.method) instead."},
	{NULL, NULL}
};

/*
 * dwh_kafka_option_reserved
 *		NULL if the property may be set in dwh.kafka_options; otherwise why
 *		not, as a hint, and *managed says whether dwh sets it itself (or
 *		refuses it).  librdkafka takes a topic property under its own name or
 *		under "topic." followed by it: both are the same property.
 */
const char *
dwh_kafka_option_reserved(const char *name, bool *managed)
{
	int			i;

	*managed = true;
	if (strncmp(name, "topic.", 6) == 0)
		name += 6;
	for (i = 0; reserved_properties[i].property != NULL; i++)
	{
		if (strcmp(name, reserved_properties[i].property) != 0)
			continue;
		if (reserved_properties[i].instead != NULL)
			return psprintf("Set %s instead.", reserved_properties[i].instead);
		if (reserved_properties[i].why != NULL)
			return pstrdup(reserved_properties[i].why);
		return pstrdup("dwh sets it itself: offsets are stored in the database, in the transaction of each batch.");
	}
	*managed = false;
	for (i = 0; refused_properties[i].property != NULL; i++)
	{
		if (strcmp(name, refused_properties[i].property) == 0)
			return pstrdup(refused_properties[i].why);
	}
	return NULL;
}

/*
 * dwh_kafka_options_parse
 *		Split spec into name=value pairs, palloc'd in the current context.
 *		On a syntax error returns false with *error set.  The error names
 *		the pair by its number, never by its text: an unquoted password
 *		with a space in it reads as a pair whose "name" is the password's
 *		tail.
 */
bool
dwh_kafka_options_parse(const char *spec, DwhKafkaOption **options, int *n,
						char **error)
{
	const char *p = spec ? spec : "";
	int			capacity = 8;

	*n = 0;
	*options = palloc(sizeof(DwhKafkaOption) * capacity);
	*error = NULL;

	for (;;)
	{
		StringInfoData name;
		StringInfoData value;

		while (isspace((unsigned char) *p))
			p++;
		if (*p == '\0')
			break;

		initStringInfo(&name);
		while (*p != '\0' && *p != '=' && !isspace((unsigned char) *p))
			appendStringInfoChar(&name, *p++);
		while (isspace((unsigned char) *p))
			p++;
		if (*p != '=')
		{
			*error = psprintf("name=value pair %d has no \"=\"", *n + 1);
			return false;
		}
		if (name.len == 0)
		{
			*error = psprintf("name=value pair %d has no name", *n + 1);
			return false;
		}
		p++;
		while (isspace((unsigned char) *p))
			p++;

		initStringInfo(&value);
		if (*p == '\'')
		{
			p++;
			for (;;)
			{
				if (*p == '\0')
				{
					*error = psprintf("the quoted value of name=value pair %d is not terminated",
									  *n + 1);
					return false;
				}
				if (*p == '\'')
				{
					p++;
					break;
				}
				if (*p == '\\' && p[1] != '\0')
					p++;
				appendStringInfoChar(&value, *p++);
			}
		}
		else
		{
			while (*p != '\0' && !isspace((unsigned char) *p))
			{
				if (*p == '\\' && p[1] != '\0')
					p++;
				appendStringInfoChar(&value, *p++);
			}
		}

		if (*n == capacity)
		{
			capacity *= 2;
			*options = repalloc(*options, sizeof(DwhKafkaOption) * capacity);
		}
		(*options)[*n].name = name.data;
		(*options)[*n].value = value.data;
		(*n)++;
	}
	return true;
}

/*
 * dwh_kafka_conf_set_options
 *		Apply the options to a librdkafka configuration.  On the first one
 *		refused returns false with the reason in error.  The reason names a
 *		property librdkafka knows, an unknown one only by its number (its
 *		"name" may be a piece of a value), and never quotes a value:
 *		librdkafka's own explanation is left out, as it may quote one.
 */
bool
dwh_kafka_conf_set_options(rd_kafka_conf_t *conf, const DwhKafkaOption *options,
						   int n, char *error, size_t error_size)
{
	int			i;

	for (i = 0; i < n; i++)
	{
		char		errstr[512];
		rd_kafka_conf_res_t res;

		res = rd_kafka_conf_set(conf, options[i].name, options[i].value,
								errstr, sizeof(errstr));
		if (res == RD_KAFKA_CONF_OK)
			continue;
		if (res == RD_KAFKA_CONF_UNKNOWN)
			snprintf(error, error_size,
					 "name=value pair %d names no librdkafka property", i + 1);
		else
			snprintf(error, error_size,
					 "invalid value for librdkafka property \"%s\"",
					 options[i].name);
		explicit_bzero(errstr, sizeof(errstr));
		return false;
	}
	return true;
}

/*
 * Options refused with error, which quotes only the name of a property
 * librdkafka knows: the log filter may show it (as the detail of the
 * worker's message), although it names a secret setting.
 */
static bool
vouched_refusal(const char *error)
{
	dwh_secrets_vouch_message(error);
	return false;
}

/*
 * dwh_kafka_options_apply
 *		Parse spec and apply it to a librdkafka configuration, refusing the
 *		properties dwh manages.  On failure returns false with the reason in
 *		error, naming where the options come from (source) and never
 *		quoting a value.
 */
bool
dwh_kafka_options_apply(rd_kafka_conf_t *conf, const char *spec,
						const char *source, char *error, size_t error_size)
{
	DwhKafkaOption *options;
	int			n;
	char	   *parse_error;
	char		reason[600];
	int			i;

	if (!dwh_kafka_options_parse(spec, &options, &n, &parse_error))
	{
		snprintf(error, error_size, "invalid Kafka options in %s: %s",
				 source, parse_error);
		return vouched_refusal(error);
	}
	for (i = 0; i < n; i++)
	{
		bool		managed;

		if (dwh_kafka_option_reserved(options[i].name, &managed) != NULL)
		{
			snprintf(error, error_size,
					 managed ?
					 "invalid Kafka options in %s: librdkafka property \"%s\" is managed by dwh" :
					 "invalid Kafka options in %s: librdkafka property \"%s\" is not supported by dwh",
					 source, options[i].name);
			return vouched_refusal(error);
		}
	}
	if (!dwh_kafka_conf_set_options(conf, options, n, reason, sizeof(reason)))
	{
		snprintf(error, error_size, "invalid Kafka options in %s: %s",
				 source, reason);
		return vouched_refusal(error);
	}
	for (i = 0; i < n; i++)
	{
		dwh_kafka_hide_property(options[i].name);
		explicit_bzero(options[i].value, strlen(options[i].value));
	}
	return true;
}

/*
 * dwh_kafka_options_apply_settings
 *		Apply the DBA's options to a librdkafka configuration, the consumer's
 *		or the tags worker's producer's: dwh.kafka_options, then those of the
 *		file named by dwh.kafka_options_file (which may hold the secrets, and
 *		override).  On failure returns false with the reason in error, which
 *		never quotes a value.
 */
bool
dwh_kafka_options_apply_settings(rd_kafka_conf_t *conf, char *error,
								 size_t error_size)
{
	char	   *contents;
	bool		ok;

	dwh_kafka_hide_forget();
	if (!dwh_kafka_options_apply(conf, dwh_kafka_options, "dwh.kafka_options",
								 error, error_size))
		return false;
	if (dwh_kafka_options_file[0] == '\0')
		return true;

	contents = dwh_secret_file_read("dwh.kafka_options_file",
									dwh_kafka_options_file, error, error_size);
	if (contents == NULL)
		return false;
	ok = dwh_kafka_options_apply(conf, contents,
								 "the file named by dwh.kafka_options_file",
								 error, error_size);
	dwh_secret_file_forget(contents);
	return ok;
}

/*
 * dwh_kafka_options_check
 *		Check hook of dwh.kafka_options.
 */
bool
dwh_kafka_options_check(char **newval, void **extra, GucSource source)
{
	DwhKafkaOption *options;
	int			n;
	char	   *error;
	int			i;

	if (!dwh_kafka_options_parse(*newval, &options, &n, &error))
	{
		GUC_check_errcode(ERRCODE_INVALID_PARAMETER_VALUE);
		GUC_check_errmsg("invalid Kafka options: %s", error);
		dwh_secrets_vouch_message(GUC_check_errmsg_string);
		GUC_check_errhint("Write name=value pairs separated by spaces; quote a value holding spaces in single quotes.");
		return false;
	}

	for (i = 0; i < n; i++)
	{
		bool		managed;
		const char *instead = dwh_kafka_option_reserved(options[i].name,
														&managed);

		if (instead != NULL)
		{
			GUC_check_errcode(ERRCODE_INVALID_PARAMETER_VALUE);
			if (managed)
				GUC_check_errmsg("librdkafka property \"%s\" is managed by dwh",
								 options[i].name);
			else
				GUC_check_errmsg("librdkafka property \"%s\" is not supported by dwh",
								 options[i].name);
			dwh_secrets_vouch_message(GUC_check_errmsg_string);
			GUC_check_errhint("%s", instead);
			return false;
		}
	}

	/* Ask librdkafka, but never in the postmaster (see the file header). */
	if (IsUnderPostmaster && n > 0)
	{
		rd_kafka_conf_t *conf = rd_kafka_conf_new();
		char		reason[600];
		bool		ok;

		ok = dwh_kafka_conf_set_options(conf, options, n, reason,
										sizeof(reason));
		rd_kafka_conf_destroy(conf);
		if (!ok)
		{
			GUC_check_errcode(ERRCODE_INVALID_PARAMETER_VALUE);
			GUC_check_errmsg("invalid Kafka options: %s", reason);
			dwh_secrets_vouch_message(GUC_check_errmsg_string);
			GUC_check_errhint("See the librdkafka CONFIGURATION.md of librdkafka %s for the consumer properties.",
							  rd_kafka_version_str());
			return false;
		}
	}
	return true;
}

/*
 * What is wrong with a Kafka topic name (1 to 249 characters of
 * [a-zA-Z0-9._-], not "." or ".."), or NULL.
 */
static const char *
topic_name_problem(const char *name)
{
	const char *p;

	if (name == NULL || name[0] == '\0' || strlen(name) > 249 ||
		strcmp(name, ".") == 0 || strcmp(name, "..") == 0)
		return "A Kafka topic name has 1 to 249 characters.";
	for (p = name; *p; p++)
		if (!isalnum((unsigned char) *p) && *p != '.' && *p != '_' && *p != '-')
			return "A Kafka topic name holds only ASCII letters, digits, \".\", \"_\" and \"-\".";
	return NULL;
}

/*
 * dwh_kafka_topic_check
 *		A Kafka topic name: 1 to 249 characters of [a-zA-Z0-9._-].
 */
bool
dwh_kafka_topic_check(char **newval, void **extra, GucSource source)
{
	const char *problem = topic_name_problem(*newval);

	if (problem != NULL)
	{
		GUC_check_errdetail("%s", problem);
		return false;
	}
	return true;
}

/*
 * dwh_require_topic_name
 *		Refuse a topic argument of an SQL function that is no Kafka topic
 *		name: positions are kept by topic, in indexed columns.
 */
void
dwh_require_topic_name(const char *topic)
{
	const char *problem = topic_name_problem(topic);

	if (problem != NULL)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("\"%s\" is not a Kafka topic name",
						topic != NULL && strlen(topic) <= 64 ? topic : "(a long text)"),
				 errdetail_internal("%s", problem),
				 errhint("Name the Kafka topic the positions were read from.")));
}

/*
 * dwh_kafka_group_id_check
 *		A consumer group id must not be empty.
 */
bool
dwh_kafka_group_id_check(char **newval, void **extra, GucSource source)
{
	if (*newval == NULL || (*newval)[0] == '\0')
	{
		GUC_check_errdetail("The Kafka workers need a consumer group id.");
		return false;
	}
	return true;
}

/*
 * dwh_kafka_conf_set
 *		Set a property that dwh itself gives its clients.  librdkafka refuses
 *		a value only when a setting of dwh's made it (dwh.kafka_brokers, say):
 *		an error, the configuration destroyed first.
 */
void
dwh_kafka_conf_set(rd_kafka_conf_t *conf, const char *name, const char *value)
{
	char		errstr[512];

	if (rd_kafka_conf_set(conf, name, value, errstr, sizeof(errstr)) != RD_KAFKA_CONF_OK)
	{
		rd_kafka_conf_destroy(conf);
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("could not set librdkafka property \"%s\"", name),
				 errdetail_internal("%s", errstr)));
	}
}
