/*-------------------------------------------------------------------------
 *
 * dwh_redis_url.c
 *	  dwh.redis_url: where the Redis dictionaries live.
 *
 * Accepted forms (README.md, "Redis dictionaries"):
 *
 *	  redis://[[username]:password@]host[:port][/db]
 *	  unix://[[username]:password@]/path/to/redis.sock[?db=N]
 *	  /path/to/redis.sock
 *
 * The host may be an IPv6 address in brackets.  The username and password
 * may be percent-encoded (%40 for '@', %25 for '%').  In redis:// the last
 * '@' ends them, so a password may also hold a raw '@', ':' or '/'.  In
 * unix:// the socket path starts with '/' and may hold '@' itself: a URL
 * whose path follows "unix://" at once has no credentials, and otherwise
 * the first "@/" ends them (a password holding "@/" writes it %40/).
 *
 * The value may hold a password: no message of this file ever quotes any
 * part of it, and the redacted form shown in logs and in dwh.status
 * replaces the password with "***".
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <ctype.h>

#include "dwh_redis_url.h"
#include "dwh_secrets.h"

/* The parsed value of dwh.redis_url; NULL while it is empty. */
static const DwhRedisUrl *current_url = NULL;

/* Value of a hexadecimal digit, or -1. */
static int
hex_value(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

/*
 * Percent-decode src[0..len) into dst (of dst_size bytes).  False when the
 * encoding is broken, the result holds a NUL byte or does not fit.
 */
static bool
percent_decode(const char *src, size_t len, char *dst, size_t dst_size,
			   const char *what, char *error, size_t error_size)
{
	size_t		i;
	size_t		n = 0;

	for (i = 0; i < len; i++)
	{
		char		c = src[i];

		if (c == '%')
		{
			int			hi = i + 1 < len ? hex_value(src[i + 1]) : -1;
			int			lo = i + 2 < len ? hex_value(src[i + 2]) : -1;

			if (hi < 0 || lo < 0)
			{
				snprintf(error, error_size,
						 "the %s holds a %% that does not start a %%XX escape (write %%25 for a %%)",
						 what);
				return false;
			}
			c = (char) (hi * 16 + lo);
			i += 2;
			if (c == '\0')
			{
				snprintf(error, error_size, "the %s holds an escaped NUL byte", what);
				return false;
			}
		}
		if (n + 1 >= dst_size)
		{
			snprintf(error, error_size, "the %s is longer than %zu bytes",
					 what, dst_size - 1);
			return false;
		}
		dst[n++] = c;
	}
	dst[n] = '\0';
	return true;
}

/*
 * Parse a decimal number of at most 10 digits in [min, max] from s[0..len).
 */
static bool
parse_number(const char *s, size_t len, long min, long max, int *result)
{
	long		v = 0;
	size_t		i;

	if (len == 0 || len > 10)
		return false;
	for (i = 0; i < len; i++)
	{
		if (!isdigit((unsigned char) s[i]))
			return false;
		v = v * 10 + (s[i] - '0');
	}
	if (v < min || v > max)
		return false;
	*result = (int) v;
	return true;
}

/*
 * Split "[[username]:password@]rest": fill url->username and url->password,
 * return rest.  The last '@' ends the credentials.
 */
static const char *
parse_credentials(const char *s, DwhRedisUrl *url, char *error,
				  size_t error_size)
{
	const char *at = strrchr(s, '@');
	const char *colon;

	if (at == NULL)
		return s;
	colon = memchr(s, ':', at - s);
	if (colon == NULL)
	{
		snprintf(error, error_size,
				 "credentials must be written :password@ or username:password@");
		return NULL;
	}
	if (!percent_decode(s, colon - s, url->username, sizeof(url->username),
						"username", error, error_size) ||
		!percent_decode(colon + 1, at - colon - 1, url->password,
						sizeof(url->password), "password", error, error_size))
		return NULL;
	if (url->username[0] != '\0' && url->password[0] == '\0')
	{
		snprintf(error, error_size, "a username needs a password");
		return NULL;
	}
	return at + 1;
}

/* Parse "host[:port][/db]" of a redis:// URL. */
static bool
parse_tcp_address(const char *s, DwhRedisUrl *url, char *error,
				  size_t error_size)
{
	const char *host_end;
	const char *p;
	size_t		host_len;

	if (*s == '[')
	{
		host_end = strchr(s, ']');
		if (host_end == NULL)
		{
			snprintf(error, error_size, "an IPv6 address in brackets lacks its closing bracket");
			return false;
		}
		s++;
		host_len = host_end - s;
		p = host_end + 1;
	}
	else
	{
		host_len = strcspn(s, ":/?");
		p = s + host_len;
	}
	if (host_len == 0)
	{
		snprintf(error, error_size, "the host is missing");
		return false;
	}
	if (host_len >= sizeof(url->host))
	{
		snprintf(error, error_size, "the host is longer than %zu bytes",
				 sizeof(url->host) - 1);
		return false;
	}
	memcpy(url->host, s, host_len);
	url->host[host_len] = '\0';

	if (*p == ':')
	{
		size_t		len = strcspn(p + 1, "/?");

		if (!parse_number(p + 1, len, 1, 65535, &url->port))
		{
			snprintf(error, error_size, "the port must be a number from 1 to 65535");
			return false;
		}
		p += 1 + len;
	}
	if (*p == '/')
	{
		size_t		len = strcspn(p + 1, "?");

		if (len > 0 && !parse_number(p + 1, len, 0, PG_INT32_MAX, &url->db))
		{
			snprintf(error, error_size, "the database must be a number, 0 or more");
			return false;
		}
		p += 1 + len;
	}
	if (*p != '\0')
	{
		snprintf(error, error_size,
				 "unexpected text after the %s (query parameters are not supported)",
				 *p == '?' ? "address" : "host");
		return false;
	}
	return true;
}

/* Parse "/path[?db=N]" of a unix:// URL or a bare path. */
static bool
parse_socket_path(const char *s, bool allow_db, DwhRedisUrl *url,
				  char *error, size_t error_size)
{
	const char *query = allow_db ? strchr(s, '?') : NULL;
	size_t		len = query ? (size_t) (query - s) : strlen(s);

	if (len == 0 || s[0] != '/')
	{
		snprintf(error, error_size, "the socket path must be absolute");
		return false;
	}
	if (len >= sizeof(url->path))
	{
		snprintf(error, error_size, "the socket path is longer than %zu bytes",
				 sizeof(url->path) - 1);
		return false;
	}
	memcpy(url->path, s, len);
	url->path[len] = '\0';
	url->unix_socket = true;
	if (query != NULL)
	{
		if (strncmp(query, "?db=", 4) != 0 ||
			!parse_number(query + 4, strlen(query + 4), 0, PG_INT32_MAX, &url->db))
		{
			snprintf(error, error_size, "the only parameter of a socket path is db=N, N a number, 0 or more");
			return false;
		}
	}
	return true;
}

/*
 * dwh_redis_url_parse
 *		Parse a non-empty dwh.redis_url into url.  On failure, error says
 *		why, without quoting any part of the value.
 */
bool
dwh_redis_url_parse(const char *text, DwhRedisUrl *url, char *error,
					size_t error_size)
{
	const char *rest;

	memset(url, 0, sizeof(DwhRedisUrl));
	url->port = DWH_REDIS_DEFAULT_PORT;

	if (text[0] == '/')
		return parse_socket_path(text, false, url, error, error_size);

	if (pg_strncasecmp(text, "redis://", 8) == 0)
	{
		rest = parse_credentials(text + 8, url, error, error_size);
		return rest != NULL && parse_tcp_address(rest, url, error, error_size);
	}
	if (pg_strncasecmp(text, "unix://", 7) == 0)
	{
		const char *path_at = strstr(text + 7, "@/");

		rest = text + 7;
		if (rest[0] != '/' && path_at != NULL)
		{
			/* Only what comes before the path can be credentials. */
			char	   *credentials = pnstrdup(rest, path_at + 1 - rest);

			if (parse_credentials(credentials, url, error, error_size) == NULL)
				return false;
			rest = path_at + 1;
		}
		else if (rest[0] != '/')
			rest = parse_credentials(rest, url, error, error_size);
		return rest != NULL &&
			parse_socket_path(rest, true, url, error, error_size);
	}
	if (pg_strncasecmp(text, "rediss://", 9) == 0)
	{
		snprintf(error, error_size, "TLS (rediss://) is not supported: the hiredis library dwh is built with has no TLS");
		return false;
	}
	snprintf(error, error_size, "it must start with redis://, unix:// or / (a unix socket path)");
	return false;
}

/*
 * dwh_redis_url_redacted
 *		The URL as shown in logs and dwh.status: the password is "***".
 */
void
dwh_redis_url_redacted(const DwhRedisUrl *url, char *buf, size_t size)
{
	const char *credentials = "";
	char		user[DWH_REDIS_SECRET_LEN + 8];

	if (url->password[0] != '\0')
	{
		snprintf(user, sizeof(user), "%s:***@", url->username);
		credentials = user;
	}
	if (url->unix_socket)
		snprintf(buf, size, "unix://%s%s?db=%d", credentials, url->path, url->db);
	else if (strchr(url->host, ':') != NULL)
		snprintf(buf, size, "redis://%s[%s]:%d/%d", credentials, url->host,
				 url->port, url->db);
	else
		snprintf(buf, size, "redis://%s%s:%d/%d", credentials, url->host,
				 url->port, url->db);
}

/*
 * dwh_redis_url_current
 *		The parsed dwh.redis_url, or NULL when it is empty.
 */
const DwhRedisUrl *
dwh_redis_url_current(void)
{
	return current_url;
}

/*
 * dwh_redis_url_check
 *		GUC check hook of dwh.redis_url: parse it once, keep the result as
 *		the setting's extra.  The message never quotes the value.
 */
bool
dwh_redis_url_check(char **newval, void **extra, GucSource source)
{
	DwhRedisUrl *url;
	char		error[256];

	if (*newval == NULL || (*newval)[0] == '\0')
		return true;

	/* A GUC extra is released with free(). */
	url = malloc(sizeof(DwhRedisUrl));
	if (url == NULL)
	{
		GUC_check_errcode(ERRCODE_OUT_OF_MEMORY);
		GUC_check_errmsg("out of memory");
		return false;
	}
	if (!dwh_redis_url_parse(*newval, url, error, sizeof(error)))
	{
		free(url);
		GUC_check_errcode(ERRCODE_INVALID_PARAMETER_VALUE);
		GUC_check_errmsg("invalid Redis URL: %s", error);
		dwh_secrets_vouch_message(GUC_check_errmsg_string);
		GUC_check_errhint("Write redis://[[username]:password@]host[:port][/db], unix://[[username]:password@]/path[?db=N] or an absolute socket path; percent-encode a %% in the password as %%25.");
		return false;
	}
	*extra = url;
	return true;
}

/*
 * dwh_redis_url_assign
 *		GUC assign hook of dwh.redis_url.
 */
void
dwh_redis_url_assign(const char *newval, void *extra)
{
	current_url = (const DwhRedisUrl *) extra;
}
