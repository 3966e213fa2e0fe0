/*-------------------------------------------------------------------------
 *
 * dwh_secret_scan.h
 *	  Does a text (a statement, a message, a context line) mention a
 *	  secret dwh setting, however it is spelt?
 *
 *-------------------------------------------------------------------------
 */
#ifndef DWH_SECRET_SCAN_H
#define DWH_SECRET_SCAN_H

extern bool dwh_secret_text_sensitive(const char *text, size_t len,
									  bool look_up_prepared);
extern bool dwh_secret_is_setting_name(const char *text, size_t len);
extern char *dwh_secret_strip_setting_names(const char *text);

#endif							/* DWH_SECRET_SCAN_H */
