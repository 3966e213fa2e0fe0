/*-------------------------------------------------------------------------
 *
 * dwh_kafka_partitions.c
 *	  Changes of the topic's number of partitions that the consumer group
 *	  does not see: partitions assigned to no one, partitions that are gone.
 *
 * Kafka worker 1 asks a broker every PARTITION_CHECK_MS for the topic's
 * partition count and for the consumer group's assignment (what each
 * member holds, as the coordinator describes a stable group), from a
 * thread, and once the answer is there compares them with what
 * dwh.kafka_offsets holds:
 *
 * - A partition of the topic that no member of the stable group holds, on
 *   UNASSIGNED_CHECKS checks in a row (a check that finds the group
 *   rebalancing neither counts nor breaks the row), was most likely added
 *   while the workers were away for less than the session timeout: they
 *   came back as the same static members, the coordinator handed them
 *   their old assignment and no member saw a reason to rebalance
 *   (KAFKA-13435, which librdkafka 2.0 cannot avoid).  Its messages would be read by no one, for good.  The
 *   worker leaves its consumer for its session timeout and a second: the
 *   coordinator then drops the member and the group rebalances over the
 *   topic as it is now.  Once per partition count, so that a cause this
 *   does not cure does not make the worker leave again and again.
 *
 * - A partition with a stored offset that the topic no longer has, on
 *   VANISHED_CHECKS checks in a row, was taken away by recreating the topic
 *   with fewer partitions.  It is a gap like any log that ends before its
 *   stored offset: recorded in dwh.kafka_gaps with an empty log (0, 0), so
 *   that nothing it held unapplied is lost without a row, and done with as
 *   dwh.kafka_on_gap says (a partition of that number added later is then
 *   a new log, read from offset 0, or stopped until dwh.kafka_seek()).
 *
 * Partitions numbered DWH_MAX_PARTITIONS and beyond are never found
 * unassigned, as the assignment read is kept for lower numbers only.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "lib/stringinfo.h"
#include "pgstat.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

#include "dwh_kafka_offsets.h"
#include "dwh_kafka_partitions.h"
#include "dwh_settings.h"
#include "dwh_status.h"

#define PARTITION_CHECK_MS		10000
#define METADATA_TIMEOUT_MS		2000
/* 20 to 30 s: a running group assigns new partitions within about 10 s. */
#define UNASSIGNED_CHECKS		3
#define VANISHED_CHECKS			2

static TimestampTz last_check = 0;
static char checked_topic[NAMEDATALEN * 4];
static int	last_count = -1;
static int	unassigned_checks = 0;
static int	vanished_checks = 0;

/* The partition count the worker last rejoined the group for. */
static int	rejoined_for_count = -1;

/* The partitions of a check, as a list for the log. */
static char *
partition_list(const int32 *partitions, int n)
{
	StringInfoData buf;
	int			i;

	initStringInfo(&buf);
	for (i = 0; i < n; i++)
		appendStringInfo(&buf, "%s%d", i > 0 ? ", " : "", partitions[i]);
	return buf.data;
}

/*
 * Record the gap of a partition the topic no longer has, in a transaction
 * of its own, and say so.
 */
static void
record_vanished(const char *topic, int32 partition, int64 stored, int count,
				int worker_index)
{
	MemoryContext caller = CurrentMemoryContext;
	bool		stop = (dwh_kafka_on_gap == DWH_KAFKA_GAP_STOP);
	DwhKafkaGapOutcome outcome;
	DwhKafkaGap gap;

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	PushActiveSnapshot(GetTransactionSnapshot());
	pgstat_report_activity(STATE_RUNNING,
						   "dwh: recording a Kafka partition that no longer exists");
	outcome = dwh_kafka_offsets_gap(topic, partition, stored, stored, 0, 0,
									false, stop, &gap);
	PopActiveSnapshot();
	CommitTransactionCommand();
	MemoryContextSwitchTo(caller);
	pgstat_report_activity(STATE_IDLE, NULL);

	if (outcome != DWH_GAP_SKIPPED && outcome != DWH_GAP_STOPPED)
		return;
	/* Its log is empty now: no lag left to show. */
	dwh_status_set_watermark(topic, partition, 0, 0, worker_index);
	ereport(WARNING,
			(errmsg("Kafka partition %d of topic \"%s\" no longer exists",
					partition, topic),
			 errdetail("The topic has %d partitions: it was recreated with fewer. Messages of the partition from its stored offset " INT64_FORMAT " on that were not applied are lost. The gap is recorded in dwh.kafka_gaps.",
					   count, gap.next_offset),
			 stop ?
			 errhint("dwh.kafka_on_gap is \"stop\": a partition %d added to the topic later is not consumed until dwh.kafka_seek(%d, 0) moves it.",
					 partition, partition) :
			 errhint("A partition %d added to the topic later is read from offset 0.",
					 partition)));
}

/*
 * dwh_kafka_partitions_check
 *		Ask for the topic's partitions and the group's assignment at most
 *		every PARTITION_CHECK_MS; once the answer is there, compare it with
 *		dwh.kafka_offsets and record the gaps of partitions that are gone.
 *		Returns 0, or how many milliseconds the worker must stay out of the
 *		consumer group before it joins again: its session timeout and a
 *		second, for the coordinator to drop it.
 *
 *		Called by one worker, between batches, outside a transaction.
 */
int
dwh_kafka_partitions_check(DwhKafkaConsumer *consumer, int worker_index)
{
	const char *topic = dwh_kafka_consumer_topic(consumer);
	MemoryContext caller = CurrentMemoryContext;
	DwhKafkaTopicView *view;
	bool		owned[DWH_MAX_PARTITIONS];
	int32	   *partitions;
	int64	   *next_offsets;
	bool	   *stopped;
	int32	   *unassigned;
	int			n_unassigned = 0;
	int			n_vanished = 0;
	int			count;
	int			wait_ms;
	int			n;
	int			i;
	TimestampTz now;
	bool		due;

	/*
	 * The question is asked, and its answer taken, here; meanwhile the worker
	 * applies its batches.  A consumer destroyed forgets its question: the
	 * answer is about the topic of this one.  An answer not taken for
	 * PARTITION_CHECK_MS (the worker waited for the brokers meanwhile) is
	 * stale: dropped, and the question asked again.
	 */
	now = GetCurrentTimestamp();
	due = TimestampDifferenceExceeds(last_check, now, PARTITION_CHECK_MS);
	view = palloc(sizeof(DwhKafkaTopicView));
	if (!dwh_kafka_consumer_topic_view(view) || due)
	{
		pfree(view);
		if (due && dwh_kafka_consumer_ask_topic(consumer, METADATA_TIMEOUT_MS))
			last_check = now;
		return 0;
	}

	if (strcmp(checked_topic, topic) != 0)
	{
		strlcpy(checked_topic, topic, sizeof(checked_topic));
		last_count = -1;
		rejoined_for_count = -1;
	}
	count = view->partition_count;
	if (count != last_count)
	{
		unassigned_checks = 0;
		vanished_checks = 0;
		last_count = count;
	}
	/* No answer, or no such topic (being recreated?): nothing to compare. */
	if (count <= 0)
		return 0;

	/* The topic's partitions that no member of the stable group holds. */
	if (view->assignment_known)
	{
		unassigned = palloc(sizeof(int32) * Min(count, DWH_MAX_PARTITIONS));
		for (i = 0; i < Min(count, DWH_MAX_PARTITIONS); i++)
			if (!view->held[i])
				unassigned[n_unassigned++] = i;
	}

	/*
	 * Stored partitions the topic no longer has and no worker owns (a
	 * partition a worker owns exists, whatever a stale broker says; one that
	 * is gone leaves the assignment at the rebalance its end causes).
	 */
	dwh_status_owned_partitions(owned);
	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	PushActiveSnapshot(GetTransactionSnapshot());
	/* The rows are read into the caller's context, which outlives it. */
	MemoryContextSwitchTo(caller);
	n = dwh_kafka_offsets_list(topic, &partitions, &next_offsets, &stopped);
	PopActiveSnapshot();
	CommitTransactionCommand();
	MemoryContextSwitchTo(caller);
	for (i = 0; i < n; i++)
	{
		if (partitions[i] >= count && next_offsets[i] > 0 && !stopped[i] &&
			!(partitions[i] < DWH_MAX_PARTITIONS && owned[partitions[i]]))
		{
			partitions[n_vanished] = partitions[i];
			next_offsets[n_vanished++] = next_offsets[i];
		}
	}
	vanished_checks = (n_vanished > 0) ? vanished_checks + 1 : 0;
	if (vanished_checks >= VANISHED_CHECKS)
	{
		vanished_checks = 0;
		for (i = 0; i < n_vanished; i++)
			record_vanished(topic, partitions[i], next_offsets[i], count,
							worker_index);
	}

	/* A group rebalancing now is looked at again at the next check. */
	if (!view->assignment_known)
		return 0;
	if (n_unassigned == 0 || count == rejoined_for_count)
	{
		unassigned_checks = 0;
		return 0;
	}
	if (++unassigned_checks < UNASSIGNED_CHECKS)
		return 0;
	unassigned_checks = 0;
	rejoined_for_count = count;
	wait_ms = dwh_kafka_consumer_session_timeout_ms(consumer) + 1000;
	ereport(WARNING,
			(errmsg("partitions %s of Kafka topic \"%s\" are assigned to no consumer",
					partition_list(unassigned, n_unassigned), topic),
			 errdetail("The topic has %d partitions, and the assignment of consumer group \"%s\" does not cover them: they were probably added while the workers were away for less than the session timeout.",
					   count, dwh_kafka_group_id),
			 errhint("Kafka worker %d leaves the consumer group and joins it again in %d ms, so that the group assigns every partition.",
					 worker_index, wait_ms)));
	return wait_ms;
}
