/*-------------------------------------------------------------------------
 *
 * dwh_secret_files.h
 *	  Secrets read from files that only the server's OS user can read.
 *
 *-------------------------------------------------------------------------
 */
#ifndef DWH_SECRET_FILES_H
#define DWH_SECRET_FILES_H

#define DWH_SECRET_FILE_MAX		(64 * 1024)

extern char *dwh_secret_file_read(const char *setting, const char *path,
								  char *error, size_t error_size);
extern void dwh_secret_file_forget(char *contents);

#endif							/* DWH_SECRET_FILES_H */
