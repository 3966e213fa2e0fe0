/*-------------------------------------------------------------------------
 *
 * dwh_tag_feed.h
 *	  The database side of the Kafka feed of user tag events: the outbox
 *	  read and emptied by the tags worker, and the wake-up at commit.
 *
 *-------------------------------------------------------------------------
 */
#ifndef DWH_TAG_FEED_H
#define DWH_TAG_FEED_H

/* One event of the outbox, ready to produce. */
typedef struct DwhTagEvent
{
	int64		id;				/* cdm.user_tag_events.id */
	char	   *key;			/* the user's business id */
	int			key_len;
	char	   *value;			/* the event as JSON */
	int			value_len;
} DwhTagEvent;

extern bool dwh_tag_feed_tables_present(void);
extern int	dwh_tag_feed_take(int limit, DwhTagEvent **events,
							  int64 *not_ready);
extern void dwh_tag_feed_forget(const int64 *ids, int n);
extern int64 dwh_tag_feed_count(void);

#endif							/* DWH_TAG_FEED_H */
