/*-------------------------------------------------------------------------
 *
 * dwh_columns.c
 *	  Columns of values gathered for a set-based statement, handed to it as
 *	  arrays.  The ingest and the Redis worker build their batches this way:
 *	  one statement per destination, never one per message.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "utils/array.h"
#include "utils/lsyscache.h"

#include "dwh_columns.h"

/*
 * dwh_column_init
 *		An empty column of elemtype with room for capacity values.
 */
void
dwh_column_init(DwhColumn *col, Oid elemtype, int capacity)
{
	col->elemtype = elemtype;
	col->n = 0;
	col->values = palloc(sizeof(Datum) * Max(capacity, 1));
	col->nulls = palloc(sizeof(bool) * Max(capacity, 1));
}

/*
 * dwh_column_add
 *		Append a value (the caller sized the column).
 */
void
dwh_column_add(DwhColumn *col, Datum value, bool isnull)
{
	col->values[col->n] = isnull ? (Datum) 0 : value;
	col->nulls[col->n] = isnull;
	col->n++;
}

/*
 * dwh_column_array
 *		The column as a one-dimensional array datum.
 */
Datum
dwh_column_array(DwhColumn *col)
{
	int16		typlen;
	bool		typbyval;
	char		typalign;
	int			dims[1] = {col->n};
	int			lbs[1] = {1};

	get_typlenbyvalalign(col->elemtype, &typlen, &typbyval, &typalign);
	return PointerGetDatum(construct_md_array(col->values, col->nulls, 1,
											  dims, lbs, col->elemtype,
											  typlen, typbyval, typalign));
}

/*
 * dwh_bytea_datum
 *		A bytea holding a copy of len bytes.
 */
Datum
dwh_bytea_datum(const void *data, int len)
{
	bytea	   *b = palloc(VARHDRSZ + len);

	SET_VARSIZE(b, VARHDRSZ + len);
	memcpy(VARDATA(b), data, len);
	return PointerGetDatum(b);
}
