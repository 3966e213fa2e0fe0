/*-------------------------------------------------------------------------
 *
 * dwh_ingest_session.h
 *	  The state that one ingest batch shares with the triggers its
 *	  statements fire: pushed and popped by the C ingest, asked by the STG
 *	  guard and by the order triggers through dwh.keys_claimed() and
 *	  dwh.defer_mart_deltas().  dwh_ingest_session.c describes the path.
 *
 *-------------------------------------------------------------------------
 */
#ifndef DWH_INGEST_SESSION_H
#define DWH_INGEST_SESSION_H

#include "datatype/timestamp.h"
#include "utils/jsonb.h"

#include "dwh_columns.h"

/* A valid order message of a batch, checked in C by dwh_message_parse. */
typedef struct DwhIngestOrder
{
	int64		object_id;
	Timestamp	sent_dttm;
	Timestamp	update_ts;
	Jsonb	   *payload;
} DwhIngestOrder;

/*
 * The arrays of dwh.apply_mart_deltas(), in the order of its arguments:
 * product_users, products, product_deltas, category_users, categories,
 * category_deltas.
 */
#define DWH_MART_DELTA_ARRAYS 6

/*
 * The mart deltas that the order triggers handed to a session during its
 * upsert, for one sorted pass at its end.
 */
typedef struct DwhMartDeltas
{
	int			calls;			/* trigger calls that handed deltas over */
	/* The first call's arrays, as given: usually the only ones. */
	Datum		first[DWH_MART_DELTA_ARRAYS];
	bool		first_null[DWH_MART_DELTA_ARRAYS];
	/* From the second call on, every call's elements, regrouped at the end. */
	DwhColumn	all[DWH_MART_DELTA_ARRAYS];
	int			capacity[DWH_MART_DELTA_ARRAYS];	/* room in all[] */
} DwhMartDeltas;

typedef struct DwhIngestSession DwhIngestSession;

/* The C ingest: one session per write of a batch whose keys it claimed. */
extern DwhIngestSession *dwh_ingest_session_push(void);
extern void dwh_ingest_session_pop(DwhIngestSession *session);
extern void dwh_ingest_session_start_upsert(DwhIngestSession *session,
											const DwhIngestOrder *orders,
											int n);
extern DwhMartDeltas *dwh_ingest_session_end_upsert(DwhIngestSession *session);
extern void dwh_mart_deltas_summed(DwhMartDeltas *d, Datum *arrays,
								   bool *nulls);

/* The triggers: questions about the current session, if any. */
extern bool dwh_ingest_session_keys_claimed(void);
extern bool dwh_ingest_session_checked_order(int64 object_id, Jsonb *payload,
											 Timestamp *update_ts);
extern bool dwh_ingest_session_defer_deltas(Datum *arrays, bool *nulls);

#endif							/* DWH_INGEST_SESSION_H */
