/*-------------------------------------------------------------------------
 *
 * dwh_kafka_verify.c
 *	  Is the log a partition resumes in the one its stored offset was read
 *	  from?
 *
 * The gap check (dwh_kafka_offsets_gap) asks whether the broker still
 * holds a partition's stored offset.  A topic deleted and recreated whose
 * new log has reached that offset holds it too, in another log: a worker
 * going on from there would never apply the new messages before it, and
 * record no gap.  So each batch stores, with a partition's next offset N,
 * the offset L and the SHA-256 of the message it applied last
 * (dwh.kafka_offsets.last_offset, last_sha256): L is N - 1, or earlier
 * when the markers that end transactions lie between.  A worker that
 * starts a partition where they are known starts at L: the first message
 * it fetches there must be the one applied.  The same bytes: the same log,
 * and the message is dropped (it was applied).  Other bytes: the log was
 * replaced, and the worker records a gap from N back to the new log's
 * start, which it reads from there (or stops at, with dwh.kafka_on_gap =
 * stop); until then it drops whatever else that log brings.  A log that
 * ends at L or before (its high watermark) was replaced too, with no
 * message to compare.
 *
 * Nothing to compare, and the partition goes on as before: no message
 * known (a partition moved by dwh.kafka_seek or past a gap, or never
 * applied), or a message at L the broker no longer holds (retention
 * deleted what was applied), or skips: a compacted topic, or another log
 * with a marker or an aborted message at L, which a consumer reading
 * committed messages never sees.  Then its first message is past L and is
 * applied as usual.  A message of another log that has the very bytes of
 * the one applied at the same offset is not told apart; orders carry
 * their id and version, so a real stream repeats them only when it repeats
 * the order itself.
 *
 * The state is the worker's own, for the partitions it owns.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "dwh_dead_letter.h"
#include "dwh_kafka_verify.h"
#include "dwh_status.h"

/* A partition started one message early, waiting for that message. */
typedef struct Checking
{
	int32		partition;
	DwhKafkaLastApplied last;	/* L and its SHA-256 */
	bool		replaced;		/* found replaced: drop what follows */
} Checking;

static Checking checking[DWH_MAX_PARTITIONS];
static int	n_checking = 0;

/*
 * Partitions whose message at L the broker no longer held: started at
 * N, without a check, the next time they are started.
 */
static int32 unverifiable[DWH_MAX_PARTITIONS];
static int	n_unverifiable = 0;

static int
find_checking(int32 partition)
{
	int			i;

	for (i = 0; i < n_checking; i++)
		if (checking[i].partition == partition)
			return i;
	return -1;
}

static void
stop_checking(int i)
{
	checking[i] = checking[--n_checking];
}

/* Is the partition unverifiable?  If so it no longer is. */
static bool
take_unverifiable(int32 partition)
{
	int			i;

	for (i = 0; i < n_unverifiable; i++)
		if (unverifiable[i] == partition)
		{
			unverifiable[i] = unverifiable[--n_unverifiable];
			return true;
		}
	return false;
}

/*
 * dwh_kafka_verify_start
 *		The partitions are about to be started at offsets[] (their stored
 *		next offsets, DWH_NO_OFFSET where none): those whose message applied
 *		last is known start there instead, and are checked.
 */
void
dwh_kafka_verify_start(const int32 *partitions, int64 *offsets,
					   const bool *stopped, const DwhKafkaLastApplied *last,
					   int n)
{
	int			i;

	dwh_kafka_verify_forget(partitions, n);
	for (i = 0; i < n; i++)
	{
		Checking   *c;

		if (take_unverifiable(partitions[i]))
			continue;
		if (stopped[i] || last[i].offset < 0 || last[i].offset >= offsets[i] ||
			n_checking == DWH_MAX_PARTITIONS)
			continue;
		c = &checking[n_checking++];
		c->partition = partitions[i];
		c->last = last[i];
		offsets[i] = last[i].offset;
		c->replaced = false;
	}
}

/*
 * dwh_kafka_verify_message
 *		What the fetched message at (partition, offset) says.  Once a log is
 *		found replaced, every message of the partition is dropped until the
 *		partition is started again (its gap served): none of that log is
 *		applied at the offsets of the old one.
 */
DwhKafkaVerdict
dwh_kafka_verify_message(int32 partition, int64 offset, const char *data,
						 int len)
{
	int			i = find_checking(partition);
	uint8		sha256[DWH_SHA256_LEN];
	int64		expected;

	if (i < 0)
		return DWH_VERIFY_NONE;
	if (checking[i].replaced)
		return DWH_VERIFY_DROP;
	expected = checking[i].last.offset;
	if (offset < expected)
		return DWH_VERIFY_NONE; /* before the check: below the stored offset */
	if (offset > expected)
	{
		/*
		 * Skipped: compacted away, or a marker or an aborted message of
		 * another log.  Nothing to compare.
		 */
		stop_checking(i);
		return DWH_VERIFY_NONE;
	}
	dwh_sha256(data, len, sha256);
	if (memcmp(sha256, checking[i].last.sha256, DWH_SHA256_LEN) == 0)
	{
		stop_checking(i);
		return DWH_VERIFY_DROP;
	}
	checking[i].replaced = true;
	return DWH_VERIFY_REPLACED;
}

/*
 * dwh_kafka_verify_out_of_range
 *		The broker no longer holds offset of partition.  If that was the
 *		message to check (retention deleted what was applied), the partition
 *		starts at its stored offset, unchecked, the next time; the caller
 *		then treats it as any offset out of range (the stored one may be
 *		gone too).
 */
void
dwh_kafka_verify_out_of_range(int32 partition, int64 offset)
{
	int			i = find_checking(partition);

	if (i < 0 || checking[i].last.offset != offset)
		return;
	stop_checking(i);
	if (n_unverifiable < DWH_MAX_PARTITIONS)
		unverifiable[n_unverifiable++] = partition;
}

/*
 * dwh_kafka_verify_log_end
 *		The partition's log ends at high (its high watermark as last
 *		fetched).  A log that ends at L or before does not hold the message
 *		applied there: the topic was recreated or truncated.  At exactly L
 *		the fetch is not out of range but waits for a message, which the
 *		check would wait for with the new log unread: the log is found
 *		replaced now.  True if it is.
 */
bool
dwh_kafka_verify_log_end(int32 partition, int64 high)
{
	int			i = find_checking(partition);

	if (i < 0 || checking[i].replaced || high < 0 || high > checking[i].last.offset)
		return false;
	checking[i].replaced = true;
	return true;
}

/*
 * dwh_kafka_verify_forget
 *		Forget the checks of these partitions (revoked, moved, started
 *		again).
 */
void
dwh_kafka_verify_forget(const int32 *partitions, int n)
{
	int			i;

	for (i = 0; i < n; i++)
	{
		int			c = find_checking(partitions[i]);

		if (c >= 0)
			stop_checking(c);
	}
}

/*
 * dwh_kafka_verify_reset
 *		Forget everything: a new consumer.
 */
void
dwh_kafka_verify_reset(void)
{
	n_checking = 0;
	n_unverifiable = 0;
}
