/*-------------------------------------------------------------------------
 *
 * dwh_version.h
 *	  The version of the extension's SQL objects in this database against
 *	  the version of this library.
 *
 *-------------------------------------------------------------------------
 */
#ifndef DWH_VERSION_H
#define DWH_VERSION_H

/* The version whose install script this library was built with. */
extern const char *const dwh_library_version;

extern char *dwh_installed_version(void);
extern char *dwh_schema_mismatch(void);
extern char *dwh_schema_wait_state(const char *installed);
extern char *dwh_schema_wait_hint(const char *database);
extern bool dwh_schema_is_current(void);
extern void dwh_require_current_schema(void);
extern bool dwh_schema_keeps_history(void);

#endif							/* DWH_VERSION_H */
