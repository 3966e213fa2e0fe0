/*-------------------------------------------------------------------------
 *
 * dwh_secret_scan.c
 *	  Does a text (a statement, a message, a context line) mention a
 *	  secret dwh setting, however it is spelt?
 *
 * PostgreSQL matches setting names without regard to case, and its lexer
 * lets a statement spell a name in many ways: upper case, white space or
 * comments around the dot, a quoted identifier ("dwh"."redis_url", or
 * "dwh.redis_url" as one identifier), Unicode
 * escapes (U&"redis\005furl", with or without UESCAPE), a string with
 * backslash escapes (E'redis\x5furl', or any string when
 * standard_conforming_strings is off), SQL inside a string (a DO body, an
 * EXECUTE of dynamic SQL), or a name computed at run time
 * (set_config('dwh.' || 'redis_url', ...)).
 *
 * The scan is deliberately wider than any one spelling.  A text is
 * sensitive when
 *
 *	- its bytes, or the decoded content of any identifier or string it
 *	  holds (recursively, since a string may be SQL run later), contain
 *	  "kafka_options" or "redis_url" in any case, with or without "dwh."
 *	  before them;
 *	- it calls set_config() with a first argument that is not a plain
 *	  string constant (the name is computed: it cannot be known from the
 *	  text);
 *	- it sets (SET, ALTER SYSTEM/DATABASE/ROLE ... SET, set_config()) a
 *	  name under "dwh." that no setting has: the prefix is reserved, so the
 *	  statement fails, but a misspelt secret setting ("dwh.redis_ulr")
 *	  comes with its value;
 *	- it updates pg_settings (whose rule calls set_config());
 *	- a string in it builds an ALTER SYSTEM statement (dynamic SQL);
 *	- it runs EXECUTE of a prepared statement whose text is sensitive.
 *
 * A text judged sensitive by mistake is only redacted more than needed;
 * a sensitive one missed would leak, so every doubt counts as sensitive.
 * The scan never raises an error (it runs inside error reporting): any
 * text, even one the real lexer refuses, is scanned to its end.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "commands/prepare.h"
#include "lib/stringinfo.h"
#include "parser/parser.h"
#include "utils/guc.h"

#include "dwh_secret_scan.h"

/* How deep strings holding SQL holding strings are followed. */
#define MAX_DEPTH	4

/*
 * The shortest sensitive text: "redis_url".  A shorter string cannot hold
 * SQL that names a secret setting or calls set_config().
 */
#define MIN_SENSITIVE	9

/* The names that make a text sensitive, as parts of any word. */
static const char *const secret_words[] = {
	"kafka_options",
	"redis_url",
	NULL
};

/* The settings themselves, as messages spell them; longest first. */
static const char *const secret_settings[] = {
	"dwh.kafka_options_file",
	"dwh.redis_url_file",
	"dwh.kafka_options",
	"dwh.redis_url",
	NULL
};

typedef enum TokenKind
{
	TOKEN_IDENT,				/* unquoted identifier or keyword, lower case */
	TOKEN_QUOTED_IDENT,			/* "...", U&"..." decoded */
	TOKEN_STRING,				/* any string constant, decoded */
	TOKEN_PARAM,				/* $1 */
	TOKEN_CHAR,					/* one character of punctuation or operator */
	TOKEN_OTHER					/* a number */
} TokenKind;

typedef struct Token
{
	TokenKind	kind;
	StringInfoData text;		/* identifier or string content; the char */
} Token;

typedef struct Scanner
{
	const char *p;
	const char *end;
} Scanner;

/* Where a set_config( call is in its first argument. */
typedef enum CallState
{
	CALL_NONE,
	CALL_NAME,					/* after "set_config" */
	CALL_OPEN,					/* after "set_config(" */
	CALL_LITERAL				/* after "set_config('constant'" */
} CallState;

/* Where a SET is in the name of the setting it sets. */
typedef enum SetState
{
	SET_NONE,
	SET_NAME,					/* after "set" (and "local" or "session") */
	SET_DOT,					/* after "set dwh" */
	SET_FIELD					/* after "set dwh." */
} SetState;

static bool scan_text(const char *text, size_t len, int depth,
					  bool look_up_prepared);

/*
 * Words without which only the secret words themselves (already looked
 * for in the raw bytes) can make a text sensitive: escapes that could spell
 * them, and the calls and statements that take a computed name.
 */
static const char *const lexing_words[] = {
	"\\",
	"u&",
	"set_config",
	"pg_settings",
	"execute",
	"system",
	NULL
};

/*
 * Must the text be tokenized?  Most statements hold none of the lexing
 * words, nor both "set" and "dwh" (a SET of a misspelt setting): their raw
 * bytes decide.
 */
static bool
needs_lexing(const char *text, size_t len)
{
	size_t		i;
	int			w;
	bool		dwh = false;
	bool		set = false;

	for (i = 0; i < len; i++)
	{
		char		c = text[i] | 0x20;

		/* Both "dwh" and "set": a SET of a misspelt setting, maybe */
		if (c == 'd' && len - i >= 3 && pg_strncasecmp(text + i, "dwh", 3) == 0)
			dwh = true;
		else if (c == 's' && len - i >= 3 && pg_strncasecmp(text + i, "set", 3) == 0)
			set = true;
		if (dwh && set)
			return true;
		for (w = 0; lexing_words[w] != NULL; w++)
		{
			size_t		wlen = strlen(lexing_words[w]);

			if (c == (lexing_words[w][0] | 0x20) &&
				len - i >= wlen &&
				pg_strncasecmp(text + i, lexing_words[w], wlen) == 0)
				return true;
		}
	}
	return false;
}

/*
 * Do len bytes at text hold one of the secret words, in any case?
 */
static bool
holds_secret_word(const char *text, size_t len)
{
	size_t		i;
	int			w;

	for (i = 0; i < len; i++)
	{
		char		c = text[i] | 0x20;

		if (c != 'k' && c != 'r')
			continue;
		for (w = 0; secret_words[w] != NULL; w++)
		{
			size_t		wlen = strlen(secret_words[w]);

			if (len - i >= wlen &&
				pg_strncasecmp(text + i, secret_words[w], wlen) == 0)
				return true;
		}
	}
	return false;
}

/*
 * Is name "dwh.something" that no setting of dwh has?  (Not an error
 * when it is not: the scan runs inside error reporting.)
 */
static bool
unknown_dwh_setting(const char *name)
{
	return pg_strncasecmp(name, "dwh.", 4) == 0 &&
		GetConfigOption(name, true, false) == NULL;
}

/*
 * dwh_secret_is_setting_name
 *		Is text exactly the name of a secret setting (in any case)?
 *		Messages may name these settings: the name is not a secret.
 */
bool
dwh_secret_is_setting_name(const char *text, size_t len)
{
	int			i;

	for (i = 0; secret_settings[i] != NULL; i++)
	{
		if (strlen(secret_settings[i]) == len &&
			pg_strncasecmp(text, secret_settings[i], len) == 0)
			return true;
	}
	return false;
}

/*
 * Length of the name under "dwh." that no setting has at p, in double
 * quotes ("dwh.redis_ulr"), or 0.  A misspelt name is no secret, and a
 * message about one says only the name.
 */
static size_t
quoted_unknown_name(const char *text, const char *p)
{
	const char *end;
	char	   *name;
	bool		unknown;

	if (p == text || p[-1] != '"' || pg_strncasecmp(p, "dwh.", 4) != 0)
		return 0;
	end = p + 4;
	while (isalnum((unsigned char) *end) || *end == '_' || *end == '.')
		end++;
	if (*end != '"')
		return 0;
	name = pnstrdup(p, end - p);
	unknown = unknown_dwh_setting(name);
	pfree(name);
	return unknown ? end - p : 0;
}

/*
 * dwh_secret_strip_setting_names
 *		The text without the names of the secret settings (in any case) and
 *		of the names under "dwh." in double quotes that no setting has,
 *		palloc'd: what remains of a message once the names it may say are
 *		taken out.
 */
char *
dwh_secret_strip_setting_names(const char *text)
{
	StringInfoData buf;
	const char *p = text;

	initStringInfo(&buf);
	while (*p != '\0')
	{
		size_t		unknown = quoted_unknown_name(text, p);
		int			i;
		bool		name = false;

		for (i = 0; secret_settings[i] != NULL && !name; i++)
		{
			size_t		len = strlen(secret_settings[i]);

			if (pg_strncasecmp(p, secret_settings[i], len) == 0)
			{
				p += len;
				name = true;
			}
		}
		if (!name && unknown > 0)
		{
			p += unknown;
			name = true;
		}
		if (!name)
			appendStringInfoChar(&buf, *p++);
	}
	return buf.data;
}

static bool
is_ident_start(unsigned char c)
{
	return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' ||
		c >= 0x80;
}

static bool
is_ident_char(unsigned char c)
{
	return is_ident_start(c) || (c >= '0' && c <= '9') || c == '$';
}

static int
hex_digit(char c)
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
 * Read up to max hex digits at *p (not beyond end); -1 when there is none.
 */
static long
read_hex(const char **p, const char *end, int max)
{
	long		v = 0;
	int			n = 0;

	while (n < max && *p < end && hex_digit(**p) >= 0)
	{
		v = v * 16 + hex_digit(**p);
		(*p)++;
		n++;
	}
	return n == 0 ? -1 : v;
}

/*
 * Append a decoded code point: the names looked for are ASCII, so any
 * other character only needs to be something that is not part of them.
 */
static void
append_code_point(StringInfo buf, long c)
{
	appendStringInfoChar(buf, (c > 0 && c < 128) ? (char) c : '?');
}

/* Skip white space and comments (nested, like PostgreSQL's). */
static void
skip_space(Scanner *s)
{
	while (s->p < s->end)
	{
		if (isspace((unsigned char) *s->p))
			s->p++;
		else if (s->end - s->p >= 2 && s->p[0] == '-' && s->p[1] == '-')
		{
			while (s->p < s->end && *s->p != '\n')
				s->p++;
		}
		else if (s->end - s->p >= 2 && s->p[0] == '/' && s->p[1] == '*')
		{
			int			nesting = 1;

			s->p += 2;
			while (s->p < s->end && nesting > 0)
			{
				if (s->end - s->p >= 2 && s->p[0] == '/' && s->p[1] == '*')
				{
					nesting++;
					s->p += 2;
				}
				else if (s->end - s->p >= 2 && s->p[0] == '*' && s->p[1] == '/')
				{
					nesting--;
					s->p += 2;
				}
				else
					s->p++;
			}
		}
		else
			break;
	}
}

/*
 * Read a quoted body closed by quote (doubled inside), s->p just after the
 * opening quote.  With backslashes, decode E'' escapes.  An unterminated
 * body runs to the end of the text.
 */
static void
read_quoted(Scanner *s, char quote, bool backslashes, StringInfo out)
{
	while (s->p < s->end)
	{
		char		c = *s->p++;

		if (c == quote)
		{
			if (s->p < s->end && *s->p == quote)
			{
				appendStringInfoChar(out, quote);
				s->p++;
				continue;
			}
			return;
		}
		if (c != '\\' || !backslashes || s->p >= s->end)
		{
			appendStringInfoChar(out, c);
			continue;
		}
		c = *s->p++;
		switch (c)
		{
			case 'b':
				appendStringInfoChar(out, '\b');
				break;
			case 'f':
				appendStringInfoChar(out, '\f');
				break;
			case 'n':
				appendStringInfoChar(out, '\n');
				break;
			case 'r':
				appendStringInfoChar(out, '\r');
				break;
			case 't':
				appendStringInfoChar(out, '\t');
				break;
			case 'x':
				{
					long		v = read_hex(&s->p, s->end, 2);

					if (v < 0)
						appendStringInfoChar(out, 'x');
					else
						append_code_point(out, v);
				}
				break;
			case 'u':
			case 'U':
				{
					long		v = read_hex(&s->p, s->end, c == 'u' ? 4 : 8);

					if (v < 0)
						appendStringInfoChar(out, c);
					else
						append_code_point(out, v);
				}
				break;
			default:
				if (c >= '0' && c <= '7')
				{
					long		v = c - '0';
					int			n = 1;

					while (n < 3 && s->p < s->end && *s->p >= '0' && *s->p <= '7')
					{
						v = v * 8 + (*s->p++ - '0');
						n++;
					}
					append_code_point(out, v);
				}
				else
					appendStringInfoChar(out, c);
				break;
		}
	}
}

/*
 * The escape character of a U&"" or U&'' body: the one of a UESCAPE clause
 * that follows it, or a backslash.
 */
static char
unicode_escape_char(Scanner *s)
{
	Scanner		look = *s;

	skip_space(&look);
	if (look.end - look.p >= 7 && pg_strncasecmp(look.p, "uescape", 7) == 0 &&
		(look.end - look.p == 7 || !is_ident_char((unsigned char) look.p[7])))
	{
		look.p += 7;
		skip_space(&look);
		if (look.end - look.p >= 3 && look.p[0] == '\'' && look.p[2] == '\'')
			return look.p[1];
	}
	return '\\';
}

/* Decode the escapes of a U&"" or U&'' body in place. */
static void
decode_unicode(StringInfo body, char escape)
{
	StringInfoData out;
	const char *p = body->data;
	const char *end = body->data + body->len;

	initStringInfo(&out);
	while (p < end)
	{
		if (*p != escape)
		{
			appendStringInfoChar(&out, *p++);
			continue;
		}
		p++;
		if (p < end && *p == escape)
		{
			appendStringInfoChar(&out, *p++);
			continue;
		}
		if (p < end && *p == '+')
		{
			long		v;

			p++;
			v = read_hex(&p, end, 6);
			append_code_point(&out, v);
		}
		else
			append_code_point(&out, read_hex(&p, end, 4));
	}
	pfree(body->data);
	*body = out;
}

/*
 * Read the next token; false at the end of the text.
 */
static bool
next_token(Scanner *s, Token *t)
{
	unsigned char c;

	skip_space(s);
	if (s->p >= s->end)
		return false;

	resetStringInfo(&t->text);
	c = (unsigned char) *s->p;

	/* U&"..." and U&'...' */
	if ((c == 'u' || c == 'U') && s->end - s->p >= 3 && s->p[1] == '&' &&
		(s->p[2] == '"' || s->p[2] == '\''))
	{
		char		quote = s->p[2];

		s->p += 3;
		read_quoted(s, quote, false, &t->text);
		decode_unicode(&t->text, unicode_escape_char(s));
		t->kind = quote == '"' ? TOKEN_QUOTED_IDENT : TOKEN_STRING;
		return true;
	}

	/* E'...', and N'...', B'...', X'...' */
	if (strchr("eEnNbBxX", c) != NULL && s->end - s->p >= 2 && s->p[1] == '\'')
	{
		s->p += 2;
		read_quoted(s, '\'', (c | 0x20) == 'e' || !standard_conforming_strings,
					&t->text);
		t->kind = TOKEN_STRING;
		return true;
	}

	if (is_ident_start(c))
	{
		while (s->p < s->end && is_ident_char((unsigned char) *s->p))
			appendStringInfoChar(&t->text, pg_ascii_tolower(*s->p++));
		t->kind = TOKEN_IDENT;
		return true;
	}

	if (c == '"')
	{
		s->p++;
		read_quoted(s, '"', false, &t->text);
		t->kind = TOKEN_QUOTED_IDENT;
		return true;
	}

	if (c == '\'')
	{
		s->p++;
		read_quoted(s, '\'', !standard_conforming_strings, &t->text);
		t->kind = TOKEN_STRING;
		return true;
	}

	if (c == '$')
	{
		const char *tag_end = s->p + 1;

		if (tag_end < s->end && isdigit((unsigned char) *tag_end))
		{
			while (tag_end < s->end && isdigit((unsigned char) *tag_end))
				tag_end++;
			s->p = tag_end;
			t->kind = TOKEN_PARAM;
			return true;
		}
		if (tag_end < s->end && is_ident_start((unsigned char) *tag_end))
		{
			while (tag_end < s->end && is_ident_char((unsigned char) *tag_end) &&
				   *tag_end != '$')
				tag_end++;
		}
		if (tag_end < s->end && *tag_end == '$')
		{
			size_t		tag_len = tag_end + 1 - s->p;
			const char *body = tag_end + 1;
			const char *q = body;

			while (q < s->end &&
				   !((size_t) (s->end - q) >= tag_len &&
					 memcmp(q, s->p, tag_len) == 0))
				q++;
			appendBinaryStringInfo(&t->text, body, q - body);
			s->p = q < s->end ? q + tag_len : s->end;
			t->kind = TOKEN_STRING;
			return true;
		}
	}

	if (isdigit(c))
	{
		while (s->p < s->end && (isalnum((unsigned char) *s->p) ||
								 *s->p == '.' || *s->p == '_'))
			s->p++;
		t->kind = TOKEN_OTHER;
		return true;
	}

	appendStringInfoChar(&t->text, (char) c);
	s->p++;
	t->kind = TOKEN_CHAR;
	return true;
}

static bool
token_is(const Token *t, const char *word)
{
	return (t->kind == TOKEN_IDENT || t->kind == TOKEN_QUOTED_IDENT) &&
		pg_strcasecmp(t->text.data, word) == 0;
}

static bool
token_is_char(const Token *t, char c)
{
	return t->kind == TOKEN_CHAR && t->text.data[0] == c;
}

/*
 * Is the text of the prepared statement of this name sensitive?
 */
static bool
prepared_statement_sensitive(const char *name, int depth)
{
	PreparedStatement *ps = FetchPreparedStatement(name, false);

	if (ps == NULL || ps->plansource == NULL ||
		ps->plansource->query_string == NULL)
		return false;
	return scan_text(ps->plansource->query_string,
					 strlen(ps->plansource->query_string), depth + 1, false);
}

/*
 * Scan one text at one depth (depth > 0: the content of a string).
 */
static bool
scan_text(const char *text, size_t len, int depth, bool look_up_prepared)
{
	Scanner		s;
	Token		t;
	CallState	call = CALL_NONE;
	SetState	set = SET_NONE;
	bool		after_execute = false;
	bool		after_alter = false;
	bool		pg_settings = false;
	bool		update = false;
	bool		sensitive = false;

	if (holds_secret_word(text, len))
		return true;
	if (!needs_lexing(text, len))
		return false;

	s.p = text;
	s.end = text + len;
	initStringInfo(&t.text);

	while (!sensitive && next_token(&s, &t))
	{
		bool		is_text = (t.kind == TOKEN_STRING ||
							   t.kind == TOKEN_QUOTED_IDENT);

		/* Decoded content: the name itself, or SQL that names it. */
		if (is_text || t.kind == TOKEN_IDENT)
		{
			if (holds_secret_word(t.text.data, t.text.len) ||
				(is_text && depth < MAX_DEPTH && t.text.len >= MIN_SENSITIVE &&
				 scan_text(t.text.data, t.text.len, depth + 1,
						   look_up_prepared)))
			{
				sensitive = true;
				break;
			}
		}

		/* set_config() with a name that is not a plain constant. */
		switch (call)
		{
			case CALL_NAME:
				call = token_is_char(&t, '(') ? CALL_OPEN : CALL_NONE;
				break;
			case CALL_OPEN:
				if (t.kind != TOKEN_STRING ||
					unknown_dwh_setting(t.text.data))
					sensitive = true;
				call = CALL_LITERAL;
				break;
			case CALL_LITERAL:
				if (!token_is_char(&t, ','))
					sensitive = true;
				call = CALL_NONE;
				break;
			case CALL_NONE:
				break;
		}
		if (token_is(&t, "set_config"))
			call = CALL_NAME;

		/* SET of a name under dwh. that no setting has: misspelt. */
		switch (set)
		{
			case SET_NAME:
				if (token_is(&t, "local") || token_is(&t, "session"))
					break;
				set = SET_NONE;
				if (t.kind != TOKEN_IDENT && t.kind != TOKEN_QUOTED_IDENT)
					break;
				if (strchr(t.text.data, '.') != NULL)
				{
					if (unknown_dwh_setting(t.text.data))
						sensitive = true;
				}
				else if (pg_strcasecmp(t.text.data, "dwh") == 0)
					set = SET_DOT;
				break;
			case SET_DOT:
				set = token_is_char(&t, '.') ? SET_FIELD : SET_NONE;
				break;
			case SET_FIELD:
				if (t.kind == TOKEN_IDENT || t.kind == TOKEN_QUOTED_IDENT)
				{
					char	   *name = psprintf("dwh.%s", t.text.data);

					if (unknown_dwh_setting(name))
						sensitive = true;
					pfree(name);
				}
				set = SET_NONE;
				break;
			case SET_NONE:
				break;
		}
		if (token_is(&t, "set"))
			set = SET_NAME;

		/* EXECUTE of a prepared statement: judge the statement's text. */
		if (after_execute && look_up_prepared &&
			(t.kind == TOKEN_IDENT || t.kind == TOKEN_QUOTED_IDENT) &&
			prepared_statement_sensitive(t.text.data, depth))
			sensitive = true;
		after_execute = token_is(&t, "execute");

		/* ALTER SYSTEM built in a string: its name may be computed. */
		if (depth > 0 && after_alter && token_is(&t, "system"))
			sensitive = true;
		after_alter = token_is(&t, "alter");

		/* UPDATE pg_settings calls set_config() through a rule. */
		if (token_is(&t, "pg_settings"))
			pg_settings = true;
		if (token_is(&t, "update"))
			update = true;
		if (pg_settings && update)
			sensitive = true;
	}

	pfree(t.text.data);
	return sensitive;
}

/*
 * dwh_secret_text_sensitive
 *		Does the text mention a secret setting, or may it set one under a
 *		name computed at run time?  look_up_prepared: follow EXECUTE to the
 *		text of the session's prepared statement (in a backend only).
 */
bool
dwh_secret_text_sensitive(const char *text, size_t len, bool look_up_prepared)
{
	if (text == NULL || len == 0)
		return false;
	return scan_text(text, len, 0, look_up_prepared);
}
