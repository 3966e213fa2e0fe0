/*-------------------------------------------------------------------------
 *
 * dwh_redis_conn.c
 *	  A connection to Redis whose every exchange is bounded in time and
 *	  interruptible.
 *
 * hiredis is used in non-blocking mode: it only formats commands into its
 * output buffer, writes and reads what the socket accepts or holds, and
 * parses replies.  Every wait happens here, in WaitEventSetWait on the
 * worker's latch, the postmaster's death and the connection's socket.
 * So SIGTERM ends the worker at once whatever Redis does, a reload is seen
 * between batches, and a silent Redis costs at most dwh.redis_timeout of
 * inactivity before the exchange fails (blocking hiredis with a socket
 * timeout would hold SIGTERM for up to that timeout on every read, since
 * hiredis retries a read interrupted by a signal).
 *
 * No PostgreSQL error is ever raised from inside a hiredis call: replies
 * are handed to callbacks from this file, after hiredis returned.  A reply
 * is freed even if a callback raises an error; the connection is then out
 * of step (replies pending) and dwh_redis_conn_is_clean() says so, and the
 * worker drops it.
 *
 * Host names are resolved by getaddrinfo() inside redisConnectNonBlock(),
 * which may block on a slow DNS server; use an address or /etc/hosts when
 * that matters.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <sys/socket.h>
#include <hiredis/hiredis.h>

#include "lib/stringinfo.h"
#include "miscadmin.h"
#include "storage/latch.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"
#include "utils/wait_event.h"

#include "dwh_message.h"
#include "dwh_redis_conn.h"

struct DwhRedisConn
{
	redisContext *ctx;
	WaitEventSet *events;
	int			socket_event;	/* position of the socket in events */
	int			timeout_ms;
	bool		in_exchange;	/* replies pending: out of step */
	char		password[DWH_REDIS_SECRET_LEN]; /* to scrub error texts */
	char		address[DWH_REDIS_HOST_LEN + DWH_REDIS_PATH_LEN + 64];
};

/*
 * Handle reply number index of an exchange.  Returns false (with error
 * set) when the reply is not what the command should answer.
 */
typedef bool (*ReplyHandler) (DwhRedisConn *conn, int index,
							  redisReply *reply, void *arg,
							  DwhRedisError *error);

static void set_error(DwhRedisConn *conn, DwhRedisError *error, int sqlstate,
					  bool transient, const char *hint, const char *fmt,...)
			pg_attribute_printf(6, 7);

/*
 * Record an error.  The text is made valid UTF-8: a server's error reply
 * may quote any bytes (a key, an argument), and a long text is cut at the
 * size of the buffer, maybe inside a character.
 */
static void
set_error(DwhRedisConn *conn, DwhRedisError *error, int sqlstate,
		  bool transient, const char *hint, const char *fmt,...)
{
	va_list		args;

	va_start(args, fmt);
	vsnprintf(error->message, sizeof(error->message), fmt, args);
	va_end(args);
	error->sqlstate = sqlstate;
	error->transient = transient;
	error->hint = hint;
	dwh_valid_utf8_in_place(error->message);
}

/*
 * A copy of a text the server sent, the password replaced by "***" in case
 * the server echoed it.  Only server texts are scrubbed: the rest of a
 * message names Redis by its redacted URL, whose "***" a short password
 * could otherwise match again and again.
 */
static char *
server_text(DwhRedisConn *conn, const char *text)
{
	StringInfoData buf;
	size_t		plen = strlen(conn->password);
	const char *p;

	if (plen == 0)
		return pstrdup(text);
	initStringInfo(&buf);
	while ((p = strstr(text, conn->password)) != NULL)
	{
		appendBinaryStringInfo(&buf, text, p - text);
		appendStringInfoString(&buf, "***");
		text = p + plen;
	}
	appendStringInfoString(&buf, text);
	return buf.data;
}

/*
 * The connection's socket failed, closed or timed out.  A server that
 * closes the connection during the handshake is often one that speaks only
 * TLS, which this hiredis cannot: say so.
 */
static bool
io_failure(DwhRedisConn *conn, DwhRedisError *error, const char *what)
{
	set_error(conn, error, ERRCODE_CONNECTION_FAILURE, true,
			  strcmp(what, "connecting") == 0 ?
			  "The worker reconnects by itself when Redis is back. If the server requires TLS, point dwh.redis_url at a local TLS tunnel such as stunnel (see Limits in the README)." :
			  "The worker reconnects by itself when Redis is back.",
			  "connection to Redis at %s lost while %s: %s",
			  conn->address, what,
			  conn->ctx->errstr[0] ? conn->ctx->errstr : "unknown error");
	return false;
}

/*
 * Map an error reply of the server to an error.  Authentication problems
 * are not transient: they need a change of dwh.redis_url or of Redis.
 */
static bool
server_error(DwhRedisConn *conn, DwhRedisError *error, const char *command,
			 const char *reply_text)
{
	const char *text = server_text(conn, reply_text);

	if (strncmp(text, "NOAUTH", 6) == 0)
		set_error(conn, error, ERRCODE_INVALID_PASSWORD, false,
				  "Redis requires a password: write it in dwh.redis_url as redis://:password@host:port/db and reload the configuration.",
				  "Redis at %s refused %s: %s", conn->address, command, text);
	else if (strncmp(text, "WRONGPASS", 9) == 0 ||
			 strstr(text, "invalid password") != NULL ||
			 strstr(text, "without any password configured") != NULL)
		set_error(conn, error, ERRCODE_INVALID_PASSWORD, false,
				  "Check the username and password in dwh.redis_url against the Redis configuration (requirepass or ACL), then reload the configuration.",
				  "Redis at %s refused the password: %s", conn->address, text);
	else if (strncmp(text, "NOPERM", 6) == 0)
		set_error(conn, error, ERRCODE_INSUFFICIENT_PRIVILEGE, false,
				  "Allow the Redis user the commands the README lists (\"Redis dictionaries\"): ACL SETUSER name +getrange +exists +strlen +watch +multi +exec +scan +select +ping.",
				  "Redis at %s refused %s: %s", conn->address, command, text);
	else if (strncmp(text, "LOADING", 7) == 0 ||
			 strncmp(text, "BUSY", 4) == 0 ||
			 strncmp(text, "MASTERDOWN", 10) == 0 ||
			 strncmp(text, "TRYAGAIN", 8) == 0)
		set_error(conn, error, ERRCODE_CONNECTION_FAILURE, true,
				  "Redis is starting or busy; the worker retries by itself.",
				  "Redis at %s is not ready for %s: %s", conn->address,
				  command, text);
	else
		set_error(conn, error, ERRCODE_CONNECTION_EXCEPTION, false, NULL,
				  "Redis at %s refused %s: %s", conn->address, command, text);
	return false;
}

/* Milliseconds left of the inactivity timeout since the last progress. */
static long
time_left(DwhRedisConn *conn, TimestampTz last_progress)
{
	long		elapsed = (long) ((GetCurrentTimestamp() - last_progress) / 1000);

	return conn->timeout_ms - elapsed;
}

/*
 * Sleep until the socket is ready for events, the latch is set or the
 * timeout runs out.  Interrupts are served here (SIGTERM exits).  Returns
 * the socket events that occurred, 0 on timeout.
 */
static uint32
wait_socket(DwhRedisConn *conn, uint32 events, long timeout_ms)
{
	WaitEvent	ev;
	int			rc;

	if (timeout_ms <= 0)
		return 0;
	ModifyWaitEvent(conn->events, conn->socket_event, events, NULL);
	rc = WaitEventSetWait(conn->events, timeout_ms, &ev, 1, PG_WAIT_EXTENSION);
	if (rc == 0)
		return 0;
	if (ev.events & WL_LATCH_SET)
	{
		ResetLatch(MyLatch);
		CHECK_FOR_INTERRUPTS();
		/* Not a socket event: let the caller loop. */
		return WL_LATCH_SET;
	}
	return ev.events & (WL_SOCKET_READABLE | WL_SOCKET_WRITEABLE);
}

/*
 * Hand a reply to its handler and free it, even if the handler raises an
 * error.
 */
static bool
handle_reply(DwhRedisConn *conn, ReplyHandler handler, int index, void *reply,
			 void *arg, DwhRedisError *error)
{
	volatile bool ok = false;

	PG_TRY();
	{
		ok = handler(conn, index, (redisReply *) reply, arg, error);
	}
	PG_CATCH();
	{
		freeReplyObject(reply);
		PG_RE_THROW();
	}
	PG_END_TRY();
	freeReplyObject(reply);
	return ok;
}

/*
 * Send the commands appended to the context and read nreplies replies,
 * handing each to handler.  Writing and reading interleave, so a long
 * pipeline never waits for the server to read while the server waits for
 * us to read.  Fails when the socket does, or when no byte moves for
 * timeout_ms.
 */
static bool
exchange(DwhRedisConn *conn, int nreplies, const char *what,
		 ReplyHandler handler, void *arg, DwhRedisError *error)
{
	int			got = 0;
	int			written = 0;
	TimestampTz last_progress = GetCurrentTimestamp();

	conn->in_exchange = true;
	while (got < nreplies)
	{
		void	   *reply = NULL;
		uint32		occurred;

		if (!written && redisBufferWrite(conn->ctx, &written) == REDIS_ERR)
			return io_failure(conn, error, what);

		if (redisGetReplyFromReader(conn->ctx, &reply) == REDIS_ERR)
		{
			set_error(conn, error, ERRCODE_PROTOCOL_VIOLATION, false, NULL,
					  "invalid reply from Redis at %s while %s: %s",
					  conn->address, what, conn->ctx->errstr);
			return false;
		}
		if (reply != NULL)
		{
			if (!handle_reply(conn, handler, got, reply, arg, error))
				return false;
			got++;
			last_progress = GetCurrentTimestamp();
			continue;
		}

		occurred = wait_socket(conn, WL_SOCKET_READABLE |
							   (written ? 0 : WL_SOCKET_WRITEABLE),
							   time_left(conn, last_progress));
		if (occurred == 0)
		{
			set_error(conn, error, ERRCODE_CONNECTION_FAILURE, true,
					  "Check that Redis is not overloaded, or raise dwh.redis_timeout.",
					  "Redis at %s did not answer within %d ms while %s",
					  conn->address, conn->timeout_ms, what);
			return false;
		}
		if (occurred & WL_SOCKET_READABLE)
		{
			if (redisBufferRead(conn->ctx) == REDIS_ERR)
				return io_failure(conn, error, what);
			last_progress = GetCurrentTimestamp();
		}
		if (occurred & WL_SOCKET_WRITEABLE)
			last_progress = GetCurrentTimestamp();
	}
	conn->in_exchange = false;
	return true;
}

/* The commands of the handshake, in the order they are sent. */
typedef enum HandshakeStep
{
	STEP_AUTH,
	STEP_SELECT,
	STEP_PING
} HandshakeStep;

typedef struct Handshake
{
	HandshakeStep steps[3];
	int			db;
} Handshake;

static bool
handshake_reply(DwhRedisConn *conn, int index, redisReply *reply, void *arg,
				DwhRedisError *error)
{
	Handshake  *hs = (Handshake *) arg;

	/* After a failure the later replies only repeat it: keep the first. */
	if (error->message[0] != '\0')
		return true;
	if (reply->type == REDIS_REPLY_ERROR)
	{
		switch (hs->steps[index])
		{
			case STEP_AUTH:
				return server_error(conn, error, "AUTH", reply->str);
			case STEP_SELECT:
				if (strstr(reply->str, "out of range") != NULL ||
					strstr(reply->str, "invalid DB index") != NULL)
				{
					set_error(conn, error, ERRCODE_UNDEFINED_DATABASE, false,
							  "Redis has 16 databases (0 to 15) unless its \"databases\" setting says otherwise; correct the /db part of dwh.redis_url and reload the configuration.",
							  "Redis at %s has no database %d: %s",
							  conn->address, hs->db, server_text(conn, reply->str));
					return false;
				}
				return server_error(conn, error, "SELECT", reply->str);
			case STEP_PING:
				return server_error(conn, error, "PING", reply->str);
		}
	}
	if (hs->steps[index] == STEP_PING &&
		(reply->type != REDIS_REPLY_STATUS || strcmp(reply->str, "PONG") != 0))
	{
		set_error(conn, error, ERRCODE_PROTOCOL_VIOLATION, false,
				  "Check that dwh.redis_url names a Redis server.",
				  "unexpected answer to PING from %s", conn->address);
		return false;
	}
	return true;
}

/*
 * Wait for a non-blocking connect to finish; its outcome is in SO_ERROR.
 */
static bool
finish_connect(DwhRedisConn *conn, DwhRedisError *error)
{
	TimestampTz start = GetCurrentTimestamp();
	int			so_error = 0;
	socklen_t	len = sizeof(so_error);

	for (;;)
	{
		uint32		occurred = wait_socket(conn, WL_SOCKET_WRITEABLE,
										   time_left(conn, start));

		if (occurred == 0)
		{
			set_error(conn, error, ERRCODE_SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION,
					  true, "Check that Redis runs and that the address in dwh.redis_url is reachable.",
					  "could not connect to Redis at %s: timed out after %d ms",
					  conn->address, conn->timeout_ms);
			return false;
		}
		if (occurred & WL_SOCKET_WRITEABLE)
			break;
	}
	if (getsockopt(conn->ctx->fd, SOL_SOCKET, SO_ERROR, &so_error, &len) < 0)
		so_error = errno;
	if (so_error != 0)
	{
		set_error(conn, error, ERRCODE_SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION,
				  true, "Check that Redis runs and that the address in dwh.redis_url is right; the worker retries by itself.",
				  "could not connect to Redis at %s: %s",
				  conn->address, strerror(so_error));
		return false;
	}
	return true;
}

/*
 * dwh_redis_connect
 *		Connect, authenticate, select the database and check with PING.
 *		Returns NULL and fills error on failure.
 */
DwhRedisConn *
dwh_redis_connect(const DwhRedisUrl *url, int timeout_ms, DwhRedisError *error)
{
	redisContext *ctx;
	DwhRedisConn *conn;
	Handshake	hs;
	int			n = 0;

	memset(error, 0, sizeof(DwhRedisError));
	conn = MemoryContextAllocZero(TopMemoryContext, sizeof(DwhRedisConn));
	conn->timeout_ms = timeout_ms;
	strlcpy(conn->password, url->password, sizeof(conn->password));
	dwh_redis_url_redacted(url, conn->address, sizeof(conn->address));

	if (url->unix_socket)
		ctx = redisConnectUnixNonBlock(url->path);
	else
		ctx = redisConnectNonBlock(url->host, url->port);
	if (ctx == NULL || ctx->err)
	{
		set_error(conn, error, ERRCODE_SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION,
				  true, "Check that Redis runs and that the address in dwh.redis_url is right; the worker retries by itself.",
				  "could not connect to Redis at %s: %s", conn->address,
				  ctx ? ctx->errstr : "out of memory");
		if (ctx)
			redisFree(ctx);
		pfree(conn);
		return NULL;
	}
	conn->ctx = ctx;

	/*
	 * The waits serve interrupts: a cancel raised in them (or an error making
	 * the wait set) must not leave the socket and the wait set open for the
	 * life of the process.
	 */
	PG_TRY();
	{
		conn->events = CreateWaitEventSet(TopMemoryContext, 3);
		AddWaitEventToSet(conn->events, WL_LATCH_SET, PGINVALID_SOCKET,
						  MyLatch, NULL);
		AddWaitEventToSet(conn->events, WL_EXIT_ON_PM_DEATH, PGINVALID_SOCKET,
						  NULL, NULL);
		conn->socket_event = AddWaitEventToSet(conn->events,
											   WL_SOCKET_WRITEABLE,
											   ctx->fd, NULL, NULL);
		if (finish_connect(conn, error))
		{
			hs.db = url->db;
			if (url->password[0] != '\0')
			{
				if (url->username[0] != '\0')
					redisAppendCommand(ctx, "AUTH %s %s", url->username,
									   url->password);
				else
					redisAppendCommand(ctx, "AUTH %s", url->password);
				hs.steps[n++] = STEP_AUTH;
			}
			if (url->db != 0)
			{
				redisAppendCommand(ctx, "SELECT %d", url->db);
				hs.steps[n++] = STEP_SELECT;
			}
			redisAppendCommand(ctx, "PING");
			hs.steps[n++] = STEP_PING;
			(void) exchange(conn, n, "connecting", handshake_reply, &hs, error);
		}
	}
	PG_CATCH();
	{
		dwh_redis_disconnect(conn);
		PG_RE_THROW();
	}
	PG_END_TRY();

	/* Connection refused shows on the first write or read. */
	if (error->message[0] != '\0')
	{
		dwh_redis_disconnect(conn);
		return NULL;
	}
	return conn;
}

/*
 * dwh_redis_disconnect
 *		Close the connection and free it.
 */
void
dwh_redis_disconnect(DwhRedisConn *conn)
{
	if (conn == NULL)
		return;
	if (conn->events)
		FreeWaitEventSet(conn->events);
	if (conn->ctx)
		redisFree(conn->ctx);
	explicit_bzero(conn->password, sizeof(conn->password));
	pfree(conn);
}

/*
 * dwh_redis_conn_is_clean
 *		False when an exchange was cut short (an error was raised while
 *		replies were pending): the connection must be dropped.
 */
bool
dwh_redis_conn_is_clean(DwhRedisConn *conn)
{
	return !conn->in_exchange;
}

/* Append a command, or fail with the connection marked out of step. */
static void
append_argv(DwhRedisConn *conn, int argc, const char **argv,
			const size_t *argvlen)
{
	/* Commands appended and not answered: out of step until exchanged. */
	conn->in_exchange = true;
	if (redisAppendCommandArgv(conn->ctx, argc, argv, argvlen) != REDIS_OK)
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("out of memory while formatting a Redis command")));
}

/* The replies of a dwh_redis_read_values() pipeline. */
typedef struct ReadState
{
	DwhRedisValueFn fn;
	void	   *arg;
	int		   *empty;			/* keys that answered "": absent or empty */
	int			n_empty;
} ReadState;

/*
 * Is an error reply Redis's refusal of a key by the user's ACL ("NOPERM No
 * permissions to access a key", Redis 6: "... to access one of the keys
 * used as arguments"), not of the command ("NOPERM ... no permissions to
 * run the 'getrange' command"), which is a failure of the settings?
 */
static bool
key_denied(const char *text)
{
	return strncmp(text, "NOPERM", 6) == 0 &&
		strstr(text, " key") != NULL && strstr(text, "to run ") == NULL;
}

/*
 * GETRANGE: a string (at most max_len + 1 bytes), WRONGTYPE, or NOPERM: a
 * key the user's ACL does not let it read is that key's answer, not a
 * failure of the batch (orders name the keys: one of them must not stop
 * the worker).
 */
static bool
range_reply(DwhRedisConn *conn, int index, redisReply *reply, void *arg,
			DwhRedisError *error)
{
	ReadState  *st = (ReadState *) arg;

	if (reply->type == REDIS_REPLY_STRING && reply->len > 0)
		st->fn(st->arg, index, DWH_REDIS_VALUE, reply->str, reply->len);
	else if (reply->type == REDIS_REPLY_STRING)
		st->empty[st->n_empty++] = index;
	else if (reply->type == REDIS_REPLY_ERROR &&
			 strncmp(reply->str, "WRONGTYPE", 9) == 0)
		st->fn(st->arg, index, DWH_REDIS_NO_VALUE, NULL, 0);
	else if (reply->type == REDIS_REPLY_ERROR && key_denied(reply->str))
	{
		char	   *text = server_text(conn, reply->str);

		st->fn(st->arg, index, DWH_REDIS_DENIED, text, strlen(text));
		pfree(text);
	}
	else if (reply->type == REDIS_REPLY_ERROR)
		return server_error(conn, error, "GETRANGE", reply->str);
	else
	{
		set_error(conn, error, ERRCODE_PROTOCOL_VIOLATION, false, NULL,
				  "unexpected answer to GETRANGE from %s", conn->address);
		return false;
	}
	return true;
}

/*
 * A key that answered "" (an empty string, or no key) is asked again in a
 * transaction of its own, MULTI, EXISTS, GETRANGE, EXEC: four replies, the
 * last the answers of both commands at one moment (a key written between
 * two separate commands would pass for an empty value).
 */
#define EMPTY_REPLIES	4

static bool
empty_reply(DwhRedisConn *conn, int reply_number, redisReply *reply,
			void *arg, DwhRedisError *error)
{
	ReadState  *st = (ReadState *) arg;
	int			index = st->empty[reply_number / EMPTY_REPLIES];
	redisReply *exists;
	redisReply *range;

	if (reply_number % EMPTY_REPLIES < EMPTY_REPLIES - 1)
	{
		static const char *const commands[] = {"MULTI", "EXISTS", "GETRANGE"};

		/* MULTI's +OK, or a command's +QUEUED. */
		if (reply->type == REDIS_REPLY_ERROR)
			return server_error(conn, error,
								commands[reply_number % EMPTY_REPLIES],
								reply->str);
		return true;
	}
	if (reply->type == REDIS_REPLY_ERROR)
		return server_error(conn, error, "EXEC", reply->str);
	if (reply->type != REDIS_REPLY_ARRAY || reply->elements != 2 ||
		reply->element[0]->type != REDIS_REPLY_INTEGER)
	{
		set_error(conn, error, ERRCODE_PROTOCOL_VIOLATION, false, NULL,
				  "unexpected answer to EXEC from %s", conn->address);
		return false;
	}
	exists = reply->element[0];
	range = reply->element[1];
	/* WRONGTYPE: the key now holds another type. */
	if (exists->integer > 0 && range->type == REDIS_REPLY_STRING)
		st->fn(st->arg, index, DWH_REDIS_VALUE, range->str, range->len);
	else
		st->fn(st->arg, index, DWH_REDIS_NO_VALUE, NULL, 0);
	return true;
}

/*
 * dwh_redis_read_values
 *		Read the values of keys[0..n) (of lens[0..n) bytes), at most
 *		max_len + 1 bytes of each: fn sees each key once, while its reply is
 *		alive (no copy is made of values the caller does not keep), with
 *		max_len + 1 bytes of a value longer than max_len.
 *
 * A value is never received whole before its size is known: Redis allows
 * 512 MB a value, and hiredis receives a reply whole (MGET's, of all its
 * keys).  So each key is asked GETRANGE 0 max_len, all of them in one
 * pipeline whose replies are handled one by one; GETRANGE answers "" for
 * an empty string and for no key at all, which EXISTS then tells apart
 * (empty_reply()).
 */
bool
dwh_redis_read_values(DwhRedisConn *conn, char **keys, const size_t *lens,
					  int n, int max_len, DwhRedisValueFn fn, void *arg,
					  DwhRedisError *error)
{
	char		end[16];
	size_t		end_len = snprintf(end, sizeof(end), "%d", max_len);
	ReadState	st;
	int			i;

	memset(error, 0, sizeof(DwhRedisError));
	if (n == 0)
		return true;
	for (i = 0; i < n; i++)
	{
		const char *range[4] = {"GETRANGE", keys[i], "0", end};
		size_t		range_len[4] = {8, lens[i], 1, end_len};

		append_argv(conn, 4, range, range_len);
	}
	st.fn = fn;
	st.arg = arg;
	st.empty = palloc(sizeof(int) * n);
	st.n_empty = 0;
	if (!exchange(conn, n, "reading values", range_reply, &st, error))
		return false;
	if (st.n_empty == 0)
		return true;

	for (i = 0; i < st.n_empty; i++)
	{
		const char *multi[1] = {"MULTI"};
		size_t		multi_len[1] = {5};
		const char *exists[2] = {"EXISTS", keys[st.empty[i]]};
		size_t		exists_len[2] = {6, lens[st.empty[i]]};
		const char *range[4] = {"GETRANGE", keys[st.empty[i]], "0", end};
		size_t		range_len[4] = {8, lens[st.empty[i]], 1, end_len};
		const char *exec[1] = {"EXEC"};
		size_t		exec_len[1] = {4};

		append_argv(conn, 1, multi, multi_len);
		append_argv(conn, 2, exists, exists_len);
		append_argv(conn, 4, range, range_len);
		append_argv(conn, 1, exec, exec_len);
	}
	return exchange(conn, st.n_empty * EMPTY_REPLIES, "reading values",
					empty_reply, &st, error);
}

/* The steps of dwh_redis_stream_value(), each one exchange. */
typedef enum StreamStep
{
	STREAM_LENGTH,				/* WATCH, STRLEN */
	STREAM_CHUNK,				/* GETRANGE from, to */
	STREAM_CHECK				/* MULTI, EXEC */
} StreamStep;

typedef struct StreamState
{
	StreamStep	step;
	int64		length;			/* STRLEN's answer, -1: not a string */
	int64		received;		/* bytes handed to fn */
	bool		executed;		/* EXEC ran: the key was not written */
	DwhRedisChunkFn fn;
	void	   *arg;
} StreamState;

static bool
stream_reply(DwhRedisConn *conn, int index, redisReply *reply, void *arg,
			 DwhRedisError *error)
{
	StreamState *st = (StreamState *) arg;
	static const char *const commands[3][2] = {
		{"WATCH", "STRLEN"}, {"GETRANGE", NULL}, {"MULTI", "EXEC"}
	};
	const char *command = commands[st->step][index];

	/* WRONGTYPE: the key holds no string (any more). */
	if (reply->type == REDIS_REPLY_ERROR &&
		strncmp(reply->str, "WRONGTYPE", 9) == 0 &&
		(st->step == STREAM_CHUNK || (st->step == STREAM_LENGTH && index == 1)))
	{
		st->length = -1;
		return true;
	}
	if (reply->type == REDIS_REPLY_ERROR)
		return server_error(conn, error, command, reply->str);

	switch (st->step)
	{
		case STREAM_LENGTH:
			if (index == 0)
				return true;
			if (reply->type != REDIS_REPLY_INTEGER)
				break;
			st->length = reply->integer;
			return true;
		case STREAM_CHUNK:
			if (reply->type != REDIS_REPLY_STRING)
				break;
			if (reply->len > 0)
			{
				st->received += reply->len;
				st->fn(st->arg, reply->str, reply->len);
			}
			return true;
		case STREAM_CHECK:
			/* EXEC: nil when WATCH saw a write. */
			if (index == 1)
				st->executed = (reply->type == REDIS_REPLY_ARRAY);
			return true;
	}
	set_error(conn, error, ERRCODE_PROTOCOL_VIOLATION, false, NULL,
			  "unexpected answer to %s from %s", command, conn->address);
	return false;
}

/*
 * dwh_redis_stream_value
 *		Read the string value of key, chunk_len bytes at a time, handing
 *		each chunk to fn (which must not keep it), as one consistent value:
 *		WATCH before, an empty MULTI/EXEC after, which fails if anything
 *		wrote the key meanwhile (a key that expired meanwhile may not make
 *		it fail before Redis 6.0.9: the bytes received are also counted).
 *		Returns DWH_REDIS_STREAM_READ with *length set,
 *		DWH_REDIS_STREAM_CHANGED (written meanwhile, or not a string: read
 *		again later), or DWH_REDIS_STREAM_FAILED with error set.
 */
DwhRedisStreamResult
dwh_redis_stream_value(DwhRedisConn *conn, const char *key, size_t key_len,
					   int chunk_len, DwhRedisChunkFn fn, void *arg,
					   int64 *length, DwhRedisError *error)
{
	const char *watch[2] = {"WATCH", key};
	size_t		watch_len[2] = {5, key_len};
	const char *strlen_argv[2] = {"STRLEN", key};
	size_t		strlen_len[2] = {6, key_len};
	const char *multi[1] = {"MULTI"};
	size_t		multi_len[1] = {5};
	const char *exec[1] = {"EXEC"};
	size_t		exec_len[1] = {4};
	StreamState st;
	int64		offset;

	memset(error, 0, sizeof(DwhRedisError));
	memset(&st, 0, sizeof(st));
	st.fn = fn;
	st.arg = arg;

	st.step = STREAM_LENGTH;
	append_argv(conn, 2, watch, watch_len);
	append_argv(conn, 2, strlen_argv, strlen_len);
	if (!exchange(conn, 2, "reading a large value", stream_reply, &st, error))
		return DWH_REDIS_STREAM_FAILED;

	/* One chunk a round trip: only one is ever in this process. */
	st.step = STREAM_CHUNK;
	for (offset = 0; st.length > 0 && offset < st.length; offset += chunk_len)
	{
		char		from[24];
		char		to[24];
		const char *range[4] = {"GETRANGE", key, from, to};
		size_t		range_len[4] = {8, key_len, 0, 0};

		range_len[2] = snprintf(from, sizeof(from), INT64_FORMAT, offset);
		range_len[3] = snprintf(to, sizeof(to), INT64_FORMAT,
								offset + chunk_len - 1);
		append_argv(conn, 4, range, range_len);
		if (!exchange(conn, 1, "reading a large value", stream_reply, &st,
					  error))
			return DWH_REDIS_STREAM_FAILED;
	}

	/* EXEC also ends the WATCH, whatever it answers. */
	st.step = STREAM_CHECK;
	append_argv(conn, 1, multi, multi_len);
	append_argv(conn, 1, exec, exec_len);
	if (!exchange(conn, 2, "reading a large value", stream_reply, &st, error))
		return DWH_REDIS_STREAM_FAILED;
	if (!st.executed || st.length < 0 || st.received != st.length)
		return DWH_REDIS_STREAM_CHANGED;
	*length = st.length;
	return DWH_REDIS_STREAM_READ;
}

typedef struct ScanState
{
	char	   *next_cursor;
	size_t		next_cursor_size;
	DwhRedisKeyFn fn;
	void	   *arg;
} ScanState;

static bool
scan_reply(DwhRedisConn *conn, int index, redisReply *reply, void *arg,
		   DwhRedisError *error)
{
	ScanState  *st = (ScanState *) arg;
	redisReply *keys;
	size_t		i;

	if (reply->type == REDIS_REPLY_ERROR)
		return server_error(conn, error, "SCAN", reply->str);
	if (reply->type != REDIS_REPLY_ARRAY || reply->elements != 2 ||
		reply->element[0]->type != REDIS_REPLY_STRING ||
		reply->element[0]->len >= st->next_cursor_size ||
		reply->element[1]->type != REDIS_REPLY_ARRAY)
	{
		set_error(conn, error, ERRCODE_PROTOCOL_VIOLATION, false, NULL,
				  "unexpected answer to SCAN from %s", conn->address);
		return false;
	}
	memcpy(st->next_cursor, reply->element[0]->str, reply->element[0]->len);
	st->next_cursor[reply->element[0]->len] = '\0';
	keys = reply->element[1];
	for (i = 0; i < keys->elements; i++)
		if (keys->element[i]->type == REDIS_REPLY_STRING)
			st->fn(st->arg, keys->element[i]->str, keys->element[i]->len);
	return true;
}

/*
 * dwh_redis_scan
 *		One SCAN step from cursor ("0" to start): fn sees each key found,
 *		next_cursor receives the cursor to continue from ("0": done).
 */
bool
dwh_redis_scan(DwhRedisConn *conn, const char *cursor, const char *pattern,
			   int count, char *next_cursor, size_t next_cursor_size,
			   DwhRedisKeyFn fn, void *arg, DwhRedisError *error)
{
	ScanState	st;

	memset(error, 0, sizeof(DwhRedisError));
	conn->in_exchange = true;
	if (redisAppendCommand(conn->ctx, "SCAN %s MATCH %s COUNT %d",
						   cursor, pattern, count) != REDIS_OK)
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("out of memory while formatting a Redis command")));
	st.next_cursor = next_cursor;
	st.next_cursor_size = next_cursor_size;
	st.fn = fn;
	st.arg = arg;
	return exchange(conn, 1, "scanning keys", scan_reply, &st, error);
}
