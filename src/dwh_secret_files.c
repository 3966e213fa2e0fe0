/*-------------------------------------------------------------------------
 *
 * dwh_secret_files.c
 *	  Secrets read from files that only the server's OS user can read.
 *
 * dwh.kafka_options_file and dwh.redis_url_file name files whose content
 * is used as dwh.kafka_options (added to it) and dwh.redis_url (instead of
 * it).  A secret kept there never passes through SQL text, so no log line,
 * pg_stat_activity or pg_stat_statements can show it, and it is not in
 * postgresql.auto.conf.  The workers read the files when they start and on
 * every reload (SIGHUP); backends never do.
 *
 * Like libpq's password file, a file that others may read is refused: a
 * secret there is not one.  The rule is the server's own for ssl_key_file:
 * a regular file owned by the user the server runs as with no group or
 * world access (u=rw, 0600), or owned by root with no world access (0640,
 * for files that a secrets manager provides).  Messages name the setting,
 * never
 * the path (it is the setting's value: SHOW shows it to superusers) nor
 * any part of the content.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "dwh_secret_files.h"

/*
 * dwh_secret_file_read
 *		The content of the file, palloc'd, white space at its end removed;
 *		NULL with the reason in error when it cannot be used.  Release it
 *		with dwh_secret_file_forget.
 */
char *
dwh_secret_file_read(const char *setting, const char *path, char *error,
					 size_t error_size)
{
	struct stat st;
	char	   *buf;
	ssize_t		len = 0;
	int			fd;

	fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
	if (fd < 0)
	{
		snprintf(error, error_size,
				 "could not open the file named by %s: %s", setting,
				 strerror(errno));
		return NULL;
	}
	/* fstat of what was opened: the file cannot be swapped in between. */
	if (fstat(fd, &st) != 0)
	{
		snprintf(error, error_size,
				 "could not stat the file named by %s: %s", setting,
				 strerror(errno));
		close(fd);
		return NULL;
	}
	if (!S_ISREG(st.st_mode))
	{
		snprintf(error, error_size,
				 "the file named by %s is not a regular file", setting);
		close(fd);
		return NULL;
	}
	if (st.st_uid != geteuid() && st.st_uid != 0)
	{
		snprintf(error, error_size,
				 "the file named by %s must be owned by the user the server runs as or by root",
				 setting);
		close(fd);
		return NULL;
	}
	if ((st.st_uid == geteuid() && (st.st_mode & (S_IRWXG | S_IRWXO)) != 0) ||
		(st.st_uid == 0 && (st.st_mode & (S_IWGRP | S_IXGRP | S_IRWXO)) != 0))
	{
		/*
		 * No quote character in these texts: the log filter hides a line that
		 * names a secret setting beside one (src/dwh_secrets.c).
		 */
		snprintf(error, error_size,
				 "the file named by %s has group or world access: permissions should be u=rw (0600) or less if owned by the user the server runs as, u=rw,g=r (0640) or less if owned by root",
				 setting);
		close(fd);
		return NULL;
	}
	if (st.st_size > DWH_SECRET_FILE_MAX)
	{
		snprintf(error, error_size,
				 "the file named by %s is larger than %d bytes", setting,
				 DWH_SECRET_FILE_MAX);
		close(fd);
		return NULL;
	}

	buf = palloc(DWH_SECRET_FILE_MAX + 1);
	for (;;)
	{
		ssize_t		n = read(fd, buf + len, DWH_SECRET_FILE_MAX + 1 - len);

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
		{
			snprintf(error, error_size,
					 "could not read the file named by %s: %s", setting,
					 strerror(errno));
			close(fd);
			dwh_secret_file_forget(buf);
			return NULL;
		}
		if (n == 0)
			break;
		len += n;
		if (len > DWH_SECRET_FILE_MAX)
		{
			snprintf(error, error_size,
					 "the file named by %s is larger than %d bytes", setting,
					 DWH_SECRET_FILE_MAX);
			close(fd);
			dwh_secret_file_forget(buf);
			return NULL;
		}
	}
	close(fd);

	if (memchr(buf, '\0', len) != NULL)
	{
		snprintf(error, error_size,
				 "the file named by %s holds a NUL byte", setting);
		dwh_secret_file_forget(buf);
		return NULL;
	}
	while (len > 0 && isspace((unsigned char) buf[len - 1]))
		len--;
	buf[len] = '\0';
	return buf;
}

/*
 * dwh_secret_file_forget
 *		Wipe and free what dwh_secret_file_read returned.
 */
void
dwh_secret_file_forget(char *contents)
{
	if (contents == NULL)
		return;
	explicit_bzero(contents, DWH_SECRET_FILE_MAX + 1);
	pfree(contents);
}
