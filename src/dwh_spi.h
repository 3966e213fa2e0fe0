/*-------------------------------------------------------------------------
 *
 * dwh_spi.h
 *	  SPI and subtransaction helpers shared by every batch writer: plans
 *	  kept for the life of the backend, and work run in a subtransaction
 *	  with the one rule of what an error means.
 *
 *-------------------------------------------------------------------------
 */
#ifndef DWH_SPI_H
#define DWH_SPI_H

#include "executor/spi.h"

extern SPIPlanPtr dwh_prepare_kept(const char *sql, int nargs, Oid *argtypes);
extern bool dwh_error_is_about_data(ErrorData *edata);
extern ErrorData *dwh_run_in_subtransaction(void (*work) (void *arg),
											void *arg, bool keep,
											bool (*returned) (ErrorData *edata));
extern ErrorData *dwh_try_in_subtransaction(void (*work) (void *arg),
											void *arg);

#endif							/* DWH_SPI_H */
