/*-------------------------------------------------------------------------
 *
 * dwh_message.h
 *	  Parsing and validation of order messages and dictionary values.
 *
 *-------------------------------------------------------------------------
 */
#ifndef DWH_MESSAGE_H
#define DWH_MESSAGE_H

#include "datatype/timestamp.h"
#include "utils/jsonb.h"

/*
 * Longest business key (user, restaurant, dish id) accepted, in bytes: in
 * orders, and for the Redis keys that dictionaries are read from.
 */
#define DWH_MAX_KEY_LEN 128

/*
 * Longest dish category accepted, in bytes: the business key of a hub, in
 * a unique index (whose entries must fit a third of a page).
 */
#define DWH_MAX_CATEGORY_LEN 1000

/* Why a value was refused: a SQLSTATE and a sentence for dead letters. */
typedef struct DwhProblem
{
	int			sqlstate;
	char	   *reason;
} DwhProblem;

typedef enum DwhMessageKind
{
	DWH_MESSAGE_ORDER,			/* an order, fit for stg.order_events */
	DWH_MESSAGE_OTHER,			/* valid JSON of another object_type */
	DWH_MESSAGE_INVALID			/* refused: see problem */
} DwhMessageKind;

/* One Kafka message value, classified. */
typedef struct DwhMessage
{
	DwhMessageKind kind;
	bool		has_object_id;
	int64		object_id;
	char	   *object_type;	/* NULL when absent */
	bool		has_sent_dttm;
	Timestamp	sent_dttm;
	Timestamp	update_ts;		/* orders only */
	Jsonb	   *payload;		/* orders only: the payload object */
	Jsonb	   *message;		/* other types: the whole message */
	DwhProblem	problem;		/* invalid only */
} DwhMessage;

extern Jsonb *dwh_json_parse(const char *data, int len, DwhProblem *problem);
extern void dwh_message_parse(const char *data, int len, DwhMessage *msg);
extern bool dwh_order_payload_check(JsonbContainer *payload, int max_items,
									Timestamp *update_ts,
									DwhProblem *problem);
extern bool dwh_user_value_check(JsonbContainer *value, bool *has_update_ts,
								 Timestamp *update_ts, DwhProblem *problem);
extern bool dwh_restaurant_value_check(JsonbContainer *value,
									   bool *has_update_ts,
									   Timestamp *update_ts,
									   DwhProblem *problem);
extern bool dwh_jsonb_nesting_check(Jsonb *value, DwhProblem *problem);
extern bool dwh_dictionary_key_check(const char *key, int len,
									 DwhProblem *problem);
extern int	dwh_jsonb_text_cmp(Jsonb *a, Jsonb *b);
extern char *dwh_valid_utf8(const char *s);
extern void dwh_valid_utf8_in_place(char *s);

#endif							/* DWH_MESSAGE_H */
