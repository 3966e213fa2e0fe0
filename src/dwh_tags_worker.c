/*-------------------------------------------------------------------------
 *
 * dwh_tags_worker.c
 *	  The tags worker: windowed user tags expired as time passes, and every
 *	  grant and revoke produced to Kafka (docs/tags.md).
 *
 * One worker, registered when dwh is preloaded, serves dwh.database.  It
 * does two jobs in one loop, neither of which waits for the other:
 *
 *	- every dwh.tags_expire_interval (0: never), an expiry pass: if some
 *	  rule has a window, dwh.expire_tags() in a READ COMMITTED transaction
 *	  of its own with nothing locked before it (it takes the tag lock
 *	  exclusive, then user tag rows), committed at once;
 *	- while dwh.tags_topic names a topic, the Kafka feed: take the oldest
 *	  events of dwh.tag_outbox (a short transaction), produce them with an
 *	  idempotent producer outside any transaction, serve the delivery
 *	  reports as they come, and once every event of the batch is reported,
 *	  delete the rows of those the broker acknowledged (another short
 *	  transaction).  Events that failed stay in the outbox and are produced
 *	  again after a backoff.  A transaction that queues events wakes the
 *	  worker at commit; without that, it looks every second.
 *
 * Nothing is lost: an event leaves the outbox only after the broker
 * acknowledged it.  A crash (of the worker or the server) between the
 * acknowledgement and the delete produces those events again: duplicates,
 * each with its event id (docs/tags.md says how a consumer drops them).
 *
 * While a broker is down, librdkafka keeps retrying the batch in flight
 * (up to message.timeout.ms) and the expiry passes go on.  When the
 * extension is not created or not updated to the library's version, or the
 * server is a standby, the worker sleeps on its latch and says why.
 * Registration, start-up, waits, reload, readiness and error recovery are
 * the skeleton every worker shares (src/dwh_worker.c).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

#include "dwh_kafka_producer.h"
#include "dwh_secret_files.h"
#include "dwh_settings.h"
#include "dwh_status.h"
#include "dwh_tag_feed.h"
#include "dwh_trust.h"
#include "dwh_worker.h"

/* Events taken from the outbox and produced at a time. */
#define FEED_BATCH				1000
/* How often the outbox is looked at without a wake-up. */
#define FEED_LOOK_MS			1000
/* How often the outbox is counted while a backlog is worked off. */
#define COUNT_INTERVAL_MS		5000

PGDLLEXPORT void dwh_tags_worker_main(Datum main_arg);

/* What became of an event of the batch in flight. */
typedef enum Delivery
{
	DELIVERY_SENT,
	DELIVERY_ACKED,
	DELIVERY_FAILED
} Delivery;

/* The events produced and not yet all reported, outliving transactions. */
typedef struct Flight
{
	MemoryContext context;
	int			n;
	DwhTagEvent *events;
	Delivery   *delivery;
	int			reported;
	char		error[512];		/* the first failure, if any */
} Flight;

static DwhWorkerStatus *slot;
static MemoryContext loop_context;
static Flight flight;
static DwhKafkaProducer *producer = NULL;
static char *producer_settings = NULL;
static bool settings_refused = false;
static bool ready_checked = false;
static int	backoff_ms = 0;
static int	feed_backoff_ms = 0;
static TimestampTz next_expiry = 0;
static TimestampTz next_look = 0;
static TimestampTz last_count_at = 0;
static bool look_now = true;
static bool waiting_for_broker = false;
static int64 produced = 0;
static int64 pending = 0;

/*
 * The settings the producer is built from, with the content of the options
 * file (or why it cannot be read): a change means a new producer.  Kept in
 * memory only (it may hold a password).
 */
static char *
current_producer_settings(void)
{
	char	   *file = NULL;
	char		error[600] = "";
	char	   *joined;
	char	   *settings;

	if (dwh_kafka_options_file[0] != '\0')
		file = dwh_secret_file_read("dwh.kafka_options_file",
									dwh_kafka_options_file, error,
									sizeof(error));
	joined = psprintf("%s|%s|%s|%s|%s", dwh_kafka_brokers, dwh_tags_topic,
					  dwh_kafka_options, dwh_kafka_options_file,
					  file ? file : error);
	settings = MemoryContextStrdup(TopMemoryContext, joined);
	explicit_bzero(joined, strlen(joined));
	pfree(joined);
	dwh_secret_file_forget(file);
	return settings;
}

static void
replace_producer_settings(char *settings)
{
	if (producer_settings != NULL)
	{
		explicit_bzero(producer_settings, strlen(producer_settings));
		pfree(producer_settings);
	}
	producer_settings = settings;
}

/*
 * Give up the producer.  What it had not reported is purged: those events
 * stay in the outbox, and the batch ends with them failed.
 */
static void
drop_producer(void)
{
	DwhKafkaProducer *old;
	int			i;

	if (producer == NULL)
		return;
	old = producer;

	/*
	 * Forgotten first: a destruction given up leaves the process, whose exit
	 * callback must not destroy the producer a second time.
	 */
	producer = NULL;
	dwh_kafka_producer_destroy(old, false);
	waiting_for_broker = false;
	for (i = 0; i < flight.n; i++)
		if (flight.delivery[i] == DELIVERY_SENT)
		{
			flight.delivery[i] = DELIVERY_FAILED;
			flight.reported++;
		}
}

static void
shutdown_producer(int code, Datum arg)
{
	if (producer != NULL)
	{
		dwh_kafka_producer_destroy(producer, true);
		producer = NULL;
	}
}

/*
 * Reload the configuration.  Another database means another process
 * (dwh_worker_reload); other Kafka settings mean another producer; a new
 * interval counts from now.
 */
static void
process_reload(void)
{
	char	   *settings;

	if (!dwh_worker_reload())
		return;
	next_expiry = 0;
	look_now = true;
	settings = current_producer_settings();
	if (strcmp(settings, producer_settings) != 0)
	{
		if (producer != NULL)
			ereport(LOG,
					(errmsg("Kafka settings of the tag feed changed, reconnecting")));
		drop_producer();
		settings_refused = false;
		feed_backoff_ms = 0;
		dwh_worker_forget_logged();
	}
	replace_producer_settings(settings);
}

/*
 * An expiry pass, if some rule has a window: dwh.expire_tags() in a
 * transaction of its own (READ COMMITTED: the worker's default, forced by
 * dwh_worker_settings), committed at once.  The outbox is counted by the
 * feed (count_outbox while it cannot run).
 */
static void
expiry_pass(void)
{
	bool		isnull;
	int			rules_moved = 0;
	int			events = 0;

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	PushActiveSnapshot(GetTransactionSnapshot());
	pgstat_report_activity(STATE_RUNNING, "dwh: expiring user tags");
	dwh_require_safe_schemas();
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	if (SPI_execute("SELECT EXISTS (SELECT FROM dwh.tag_rules r"
					" WHERE r.window_days IS NOT NULL)", true, 0) != SPI_OK_SELECT)
		elog(ERROR, "could not read dwh.tag_rules");
	if (DatumGetBool(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc,
								   1, &isnull)))
	{
		if (SPI_execute("SELECT e.rules_moved, e.events FROM dwh.expire_tags() e",
						false, 0) != SPI_OK_SELECT || SPI_processed != 1)
			elog(ERROR, "could not run dwh.expire_tags()");
		rules_moved = DatumGetInt32(SPI_getbinval(SPI_tuptable->vals[0],
												  SPI_tuptable->tupdesc, 1,
												  &isnull));
		events = DatumGetInt32(SPI_getbinval(SPI_tuptable->vals[0],
											 SPI_tuptable->tupdesc, 2,
											 &isnull));
	}
	SPI_finish();
	PopActiveSnapshot();
	CommitTransactionCommand();
	MemoryContextSwitchTo(loop_context);
	pgstat_report_activity(STATE_IDLE, NULL);
	pgstat_report_stat(false);

	dwh_status_count_expiry(slot, rules_moved, events);
	/* Done: an earlier error no longer holds, unless the feed's does. */
	if (!waiting_for_broker && feed_backoff_ms == 0)
		dwh_status_clear_error(slot);
	if (events > 0)
	{
		look_now = true;
		ereport(DEBUG1,
				(errmsg("tag expiry pass: %d rules moved, %d events", rules_moved,
						events)));
	}
}

/* Receives each delivery report of the batch in flight. */
static void
delivered(void *arg, int tag, const char *error)
{
	if (tag < 0 || tag >= flight.n || flight.delivery[tag] != DELIVERY_SENT)
		return;					/* not of this batch: cannot happen */
	flight.reported++;
	if (error == NULL)
		flight.delivery[tag] = DELIVERY_ACKED;
	else
	{
		flight.delivery[tag] = DELIVERY_FAILED;
		if (flight.error[0] == '\0')
			strlcpy(flight.error, error, sizeof(flight.error));
	}
}

/* Say that the broker cannot be reached, or does not take the events. */
static void
feed_failed(const char *error, bool broker_down)
{
	dwh_status_set_error(slot, "%s", error);
	if (broker_down)
	{
		waiting_for_broker = true;
		dwh_status_set_state(slot, "waiting for the broker");
	}
	if (dwh_worker_note_logged(error))
		ereport(LOG,
				(errcode(ERRCODE_CONNECTION_FAILURE),
				 errmsg("could not produce user tag events to Kafka"),
				 errdetail_internal("%s", error),
				 errhint("The events stay in dwh.tag_outbox and are produced once the broker takes them.")));
}

/*
 * Serve the producer's queue: delivery reports, errors, log lines.  A
 * fatal error drops the producer (what it had not reported stays in the
 * outbox), to be created again after a backoff.
 */
static void
serve_producer(void)
{
	DwhKafkaProducerReport report;

	dwh_kafka_producer_serve(producer, delivered, NULL, &report);
	if (report.delivered > 0 && waiting_for_broker)
		waiting_for_broker = false;
	if (report.error)
		feed_failed(report.error_text, report.broker_down);
	if (report.fatal)
	{
		drop_producer();
		feed_backoff_ms = dwh_worker_next_backoff(feed_backoff_ms);
		next_look = TimestampTzPlusMilliseconds(GetCurrentTimestamp(),
												feed_backoff_ms);
	}
}

/*
 * Every event of the batch is reported: delete the rows of those the broker
 * acknowledged, in a transaction of their own.  A crash before the commit
 * produces them again (the documented duplicates).  Failed ones stay, and
 * the outbox is looked at again after a backoff.
 */
static void
finish_flight(void)
{
	int64	   *acked = palloc(sizeof(int64) * Max(flight.n, 1));
	int			n_acked = 0;
	int			i;

	for (i = 0; i < flight.n; i++)
		if (flight.delivery[i] == DELIVERY_ACKED)
			acked[n_acked++] = flight.events[i].id;

	if (n_acked > 0)
	{
		SetCurrentStatementStartTimestamp();
		StartTransactionCommand();
		PushActiveSnapshot(GetTransactionSnapshot());
		pgstat_report_activity(STATE_RUNNING, "dwh: user tag events produced");
		dwh_tag_feed_forget(acked, n_acked);
		PopActiveSnapshot();
		CommitTransactionCommand();
		MemoryContextSwitchTo(loop_context);
		pgstat_report_activity(STATE_IDLE, NULL);
		pgstat_report_stat(false);
	}

	produced += n_acked;
	pending = Max(pending - n_acked, 0);
	dwh_status_set_feed(slot, produced, pending);
	if (n_acked == flight.n)
	{
		/* All taken: there may be more; an earlier error no longer holds. */
		feed_backoff_ms = 0;
		look_now = true;
		if (n_acked > 0)
			dwh_status_clear_error(slot);
		waiting_for_broker = false;
	}
	else if (producer == NULL && flight.error[0] == '\0')
	{
		/* The producer was given up (settings changed): nothing failed. */
		look_now = true;
	}
	else
	{
		feed_failed(flight.error[0] ? flight.error : "the events were not acknowledged",
					waiting_for_broker);
		feed_backoff_ms = dwh_worker_next_backoff(feed_backoff_ms);
		next_look = TimestampTzPlusMilliseconds(GetCurrentTimestamp(),
												feed_backoff_ms);
	}
	MemoryContextReset(flight.context);
	flight.n = 0;
	flight.reported = 0;
	flight.error[0] = '\0';
}

/*
 * The outbox's next row names an event that cannot be read yet: say so,
 * once.  The feed looks again at its next look.
 */
static void
feed_held_back(int64 event_id)
{
	char	   *error = psprintf("queued tag event " INT64_FORMAT " cannot be read in cdm.user_tag_events and dds.h_user yet: the feed waits for it",
								 event_id);

	dwh_status_set_error(slot, "%s", error);
	if (dwh_worker_note_logged(error))
		ereport(LOG,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("queued tag event " INT64_FORMAT " cannot be read in cdm.user_tag_events and dds.h_user yet: the feed waits for it",
						event_id),
				 errdetail("A restore may not have committed the event, or its user, yet; the events after it wait so that each user's stay in order."),
				 errhint("If the event was deleted on purpose, delete its row from dwh.tag_outbox: DELETE FROM dwh.tag_outbox WHERE event_id = " INT64_FORMAT ";",
						 event_id)));
}

/*
 * Take the oldest events of the outbox (a short transaction) and produce
 * them.  The outbox is counted when the batch is full, at most every few
 * seconds: it is what dwh.status shows as pending.
 */
static void
take_and_produce(void)
{
	DwhTagEvent *events;
	TimestampTz now = GetCurrentTimestamp();
	int64		not_ready;
	int			n;
	int			i;

	MemoryContextReset(flight.context);
	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	PushActiveSnapshot(GetTransactionSnapshot());
	dwh_require_safe_schemas();
	MemoryContextSwitchTo(flight.context);
	n = dwh_tag_feed_take(FEED_BATCH, &events, &not_ready);
	if (n < FEED_BATCH && not_ready < 0)
		pending = n;
	else if (TimestampDifferenceExceeds(last_count_at, now, COUNT_INTERVAL_MS))
	{
		pending = dwh_tag_feed_count();
		last_count_at = now;
	}
	else
		pending = Max(pending, n);
	PopActiveSnapshot();
	CommitTransactionCommand();
	MemoryContextSwitchTo(loop_context);
	dwh_status_set_feed(slot, produced, pending);
	if (not_ready >= 0)
		feed_held_back(not_ready);
	if (n == 0)
		return;

	flight.events = events;
	flight.delivery = MemoryContextAllocZero(flight.context,
											 sizeof(Delivery) * n);
	flight.n = n;
	flight.reported = 0;
	flight.error[0] = '\0';
	for (i = 0; i < n; i++)
	{
		char		error[256];

		if (!dwh_kafka_producer_send(producer, events[i].key, events[i].key_len,
									 events[i].value, events[i].value_len, i,
									 error, sizeof(error)))
		{
			/* Refused at once: it stays in the outbox, like a failure. */
			flight.delivery[i] = DELIVERY_FAILED;
			flight.reported++;
			if (flight.error[0] == '\0')
				strlcpy(flight.error, error, sizeof(flight.error));
		}
	}
}

/*
 * Create the producer.  A configuration that librdkafka refuses is
 * reported once, and waits for a reload that corrects it.
 */
static bool
connect_producer(void)
{
	char		error[600];

	producer = dwh_kafka_producer_create(dwh_tags_topic, error, sizeof(error));
	if (producer == NULL)
	{
		settings_refused = true;
		dwh_status_set_error(slot, "%s", error);
		ereport(LOG,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("could not create the Kafka producer of the tag feed"),
				 errdetail_internal("%s", error),
				 errhint("Correct the Kafka settings and reload the configuration.")));
		(void) dwh_worker_note_logged("waiting: invalid Kafka settings");
		return false;
	}
	return true;
}

/*
 * Count the outbox in a transaction of its own, for dwh.status, while the
 * feed does not run: what waits there (a topic without a broker, a topic
 * emptied, settings refused) is shown as it grows.
 */
static void
count_outbox(void)
{
	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	PushActiveSnapshot(GetTransactionSnapshot());
	pending = dwh_tag_feed_count();
	PopActiveSnapshot();
	CommitTransactionCommand();
	MemoryContextSwitchTo(loop_context);
	pgstat_report_stat(false);
	last_count_at = GetCurrentTimestamp();
	dwh_status_set_feed(slot, produced, pending);
}

/*
 * One step of the Kafka feed: serve the producer, finish a batch whose
 * events are all reported, take the next one when due.  While the feed
 * cannot run, count the outbox instead, after each commit that queued
 * events and at least every few seconds.
 */
static void
feed_step(void)
{
	bool		on = dwh_tags_topic[0] != '\0' && dwh_kafka_brokers[0] != '\0';

	if (!on || settings_refused)
		drop_producer();
	if (producer != NULL)
		serve_producer();
	if (flight.n > 0 && flight.reported == flight.n)
		finish_flight();
	if (flight.n > 0)
		return;
	if (!on || settings_refused)
	{
		if (look_now ||
			TimestampDifferenceExceeds(last_count_at, GetCurrentTimestamp(),
									   COUNT_INTERVAL_MS))
		{
			look_now = false;
			count_outbox();
		}
		return;
	}
	if (!look_now && GetCurrentTimestamp() < next_look)
		return;
	if (producer == NULL && !connect_producer())
		return;
	look_now = false;
	next_look = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), FEED_LOOK_MS);
	take_and_produce();
}

/* What dwh.status says the worker does (each new state logged once). */
static void
publish_state(void)
{
	bool		expiring = dwh_tags_expire_interval > 0;

	if (dwh_tags_topic[0] == '\0')
	{
		if (expiring)
			dwh_status_set_state(slot, "expiring tags every %d s",
								 dwh_tags_expire_interval);
		else
			dwh_worker_set_state_logged("idle: dwh.tags_expire_interval is 0 and dwh.tags_topic is empty",
										NULL);
	}
	else if (dwh_kafka_brokers[0] == '\0')
		dwh_worker_set_state_logged("waiting: dwh.kafka_brokers is empty, tag events wait in dwh.tag_outbox",
									NULL);
	else if (settings_refused)
		dwh_status_set_state(slot, "waiting: invalid Kafka settings");
	else if (waiting_for_broker)
		dwh_status_set_state(slot, "waiting for the broker");
	else
		dwh_status_set_state(slot, "producing tag events to topic \"%s\"",
							 dwh_tags_topic);
}

/* Sleep until the next job is due, a signal, a wake-up or a report. */
static void
sleep_until_due(void)
{
	TimestampTz now = GetCurrentTimestamp();
	long		sleep_ms = DWH_WORKER_RECHECK_MS;
	bool		on = dwh_tags_topic[0] != '\0' && dwh_kafka_brokers[0] != '\0' &&
	!settings_refused;

	if (dwh_tags_expire_interval > 0)
		sleep_ms = Min(sleep_ms, (long) ((next_expiry - now) / 1000));
	if (on && flight.n == 0)
		sleep_ms = look_now ? 0 : Min(sleep_ms, (long) ((next_look - now) / 1000));
	if (sleep_ms <= 0)
		return;
	if (producer != NULL)
		dwh_kafka_producer_wait(producer, sleep_ms);
	else
		dwh_worker_wait(sleep_ms);
}

/*
 * dwh_tags_worker_main
 *		Entry point of the tags worker.
 */
void
dwh_tags_worker_main(Datum main_arg)
{
	sigjmp_buf	local_sigjmp_buf;

	slot = dwh_worker_start(DWH_WORKER_TAGS, 1);

	loop_context = AllocSetContextCreate(TopMemoryContext, "dwh tags loop",
										 ALLOCSET_DEFAULT_SIZES);
	flight.context = AllocSetContextCreate(TopMemoryContext, "dwh tags flight",
										   ALLOCSET_DEFAULT_SIZES);
	producer_settings = current_producer_settings();
	before_shmem_exit(shutdown_producer, (Datum) 0);

	if (sigsetjmp(local_sigjmp_buf, 1) != 0)
	{
		/*
		 * The batch in flight is kept: its reports still come, and a delete
		 * that failed is made again once they are all in.
		 */
		dwh_worker_recover(&backoff_ms);
		ready_checked = false;
		look_now = true;
		dwh_worker_backoff(backoff_ms);
	}
	PG_exception_stack = &local_sigjmp_buf;

	for (;;)
	{
		MemoryContextSwitchTo(loop_context);
		MemoryContextReset(loop_context);
		CHECK_FOR_INTERRUPTS();
		process_reload();

		if (!ready_checked)
		{
			if (!dwh_worker_ready(dwh_tag_feed_tables_present))
			{
				drop_producer();
				dwh_worker_wait(DWH_WORKER_RECHECK_MS);
				continue;
			}
			ready_checked = true;
			dwh_worker_forget_logged();
		}

		if (dwh_tags_expire_interval > 0 && GetCurrentTimestamp() >= next_expiry)
		{
			expiry_pass();
			next_expiry = TimestampTzPlusMilliseconds(GetCurrentTimestamp(),
													  (int64) dwh_tags_expire_interval * 1000);
		}

		/*
		 * A commit queued events: look at once, not at the next look, unless
		 * the feed backs off after a failure.
		 */
		if (dwh_status_take_events_queued(slot) && feed_backoff_ms == 0)
			look_now = true;
		feed_step();
		backoff_ms = 0;
		publish_state();
		sleep_until_due();
	}
}
