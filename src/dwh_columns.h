/*-------------------------------------------------------------------------
 *
 * dwh_columns.h
 *	  Columns of values gathered for a set-based statement, handed to it as
 *	  arrays (unnest($1::type[], ...)).
 *
 *-------------------------------------------------------------------------
 */
#ifndef DWH_COLUMNS_H
#define DWH_COLUMNS_H

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

#endif							/* DWH_COLUMNS_H */
