/*-------------------------------------------------------------------------
 *
 * dwh_columns.h
 *	  Columns of values gathered for a set-based statement, handed to it as
 *	  arrays (unnest($1::type[], ...)), and the statement's plan, kept.
 *
 *-------------------------------------------------------------------------
 */
#ifndef DWH_COLUMNS_H
#define DWH_COLUMNS_H

#include "executor/spi.h"

typedef struct DwhColumn
{
	Oid			elemtype;
	int			n;
	Datum	   *values;
	bool	   *nulls;
} DwhColumn;

extern void dwh_column_init(DwhColumn *col, Oid elemtype, int capacity);
extern void dwh_column_add(DwhColumn *col, Datum value, bool isnull);
extern Datum dwh_column_array(DwhColumn *col);
extern Datum dwh_bytea_datum(const void *data, int len);
extern SPIPlanPtr dwh_prepare_kept(const char *sql, int nargs, Oid *argtypes);

#endif							/* DWH_COLUMNS_H */
