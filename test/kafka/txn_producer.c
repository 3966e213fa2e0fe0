/*-------------------------------------------------------------------------
 *
 * txn_producer.c
 *	  Produce lines of a file as one Kafka transaction, committed or
 *	  aborted, for the tests (kcat has no transactions).
 *
 * Usage: txn_producer BOOTSTRAP TOPIC FILE commit|abort|hold [PARTITION]
 *
 * Each line of FILE is one message, without a key, to partition
 * (line number % partitions) of TOPIC, or to PARTITION if given, written to
 * the log before the transaction ends.  "commit" commits the transaction
 * and exits; "abort" aborts it; "hold" leaves it open: it prints "held"
 * once the messages are in the log, then waits for a line on stdin
 * ("commit" or "abort") and ends the transaction so.  Exits 0 on success, 1
 * with a message on stderr otherwise.
 *
 *-------------------------------------------------------------------------
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <librdkafka/rdkafka.h>

#define TIMEOUT_MS	30000

static void
fail(const char *what, rd_kafka_error_t *error)
{
	fprintf(stderr, "txn_producer: %s: %s\n", what,
			error ? rd_kafka_error_string(error) : "failed");
	exit(1);
}

static void
end_transaction(rd_kafka_t *rk, const char *how)
{
	rd_kafka_error_t *error;

	if (strcmp(how, "commit") == 0)
		error = rd_kafka_commit_transaction(rk, TIMEOUT_MS);
	else if (strcmp(how, "abort") == 0)
		error = rd_kafka_abort_transaction(rk, TIMEOUT_MS);
	else
	{
		fprintf(stderr, "txn_producer: \"%s\" is neither commit nor abort\n", how);
		exit(1);
	}
	if (error)
		fail(how, error);
}

int
main(int argc, char **argv)
{
	char		errstr[512];
	rd_kafka_conf_t *conf;
	rd_kafka_t *rk;
	rd_kafka_error_t *error;
	const rd_kafka_metadata_t *metadata;
	rd_kafka_topic_t *rkt;
	int			partitions;
	FILE	   *in;
	char	   *line = NULL;
	size_t		size = 0;
	ssize_t		len;
	long		n = 0;
	char		transactional_id[64];
	int			only = -1;

	if (argc != 5 && argc != 6)
	{
		fprintf(stderr, "usage: txn_producer BOOTSTRAP TOPIC FILE commit|abort|hold [PARTITION]\n");
		return 1;
	}
	if (argc == 6)
		only = atoi(argv[5]);

	conf = rd_kafka_conf_new();
	snprintf(transactional_id, sizeof(transactional_id), "dwh-test-%d", (int) getpid());
	if (rd_kafka_conf_set(conf, "bootstrap.servers", argv[1], errstr, sizeof(errstr)) ||
		rd_kafka_conf_set(conf, "transactional.id", transactional_id, errstr, sizeof(errstr)))
	{
		fprintf(stderr, "txn_producer: %s\n", errstr);
		return 1;
	}
	rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, errstr, sizeof(errstr));
	if (rk == NULL)
	{
		fprintf(stderr, "txn_producer: %s\n", errstr);
		return 1;
	}

	rkt = rd_kafka_topic_new(rk, argv[2], NULL);
	if (rd_kafka_metadata(rk, 0, rkt, &metadata, TIMEOUT_MS) != RD_KAFKA_RESP_ERR_NO_ERROR ||
		metadata->topic_cnt != 1 || metadata->topics[0].partition_cnt < 1)
	{
		fprintf(stderr, "txn_producer: no partitions of topic %s\n", argv[2]);
		return 1;
	}
	partitions = metadata->topics[0].partition_cnt;
	rd_kafka_metadata_destroy(metadata);
	rd_kafka_topic_destroy(rkt);

	if ((error = rd_kafka_init_transactions(rk, TIMEOUT_MS)) != NULL)
		fail("init_transactions", error);
	if ((error = rd_kafka_begin_transaction(rk)) != NULL)
		fail("begin_transaction", error);

	in = fopen(argv[3], "r");
	if (in == NULL)
	{
		perror(argv[3]);
		return 1;
	}
	while ((len = getline(&line, &size, in)) > 0)
	{
		rd_kafka_resp_err_t err;

		if (line[len - 1] == '\n')
			line[--len] = '\0';
		err = rd_kafka_producev(rk,
								RD_KAFKA_V_TOPIC(argv[2]),
								RD_KAFKA_V_PARTITION((int32_t) (only >= 0 ? only : n % partitions)),
								RD_KAFKA_V_VALUE(line, (size_t) len),
								RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
								RD_KAFKA_V_END);
		if (err)
		{
			fprintf(stderr, "txn_producer: produce: %s\n", rd_kafka_err2str(err));
			return 1;
		}
		n++;
	}
	fclose(in);
	free(line);

	if (strcmp(argv[4], "hold") == 0)
	{
		char		how[16];

		/* Written to the log (not yet committed) before saying so. */
		if (rd_kafka_flush(rk, TIMEOUT_MS) != RD_KAFKA_RESP_ERR_NO_ERROR)
		{
			fprintf(stderr, "txn_producer: flush timed out\n");
			return 1;
		}
		printf("held\n");
		fflush(stdout);
		if (fgets(how, sizeof(how), stdin) == NULL)
			fail("reading commit or abort from stdin", NULL);
		how[strcspn(how, "\n")] = '\0';
		end_transaction(rk, how);
	}
	else
	{
		/* Aborted after its messages reached the log, as an application's. */
		if (rd_kafka_flush(rk, TIMEOUT_MS) != RD_KAFKA_RESP_ERR_NO_ERROR)
		{
			fprintf(stderr, "txn_producer: flush timed out\n");
			return 1;
		}
		end_transaction(rk, argv[4]);
	}

	rd_kafka_destroy(rk);
	printf("done %ld\n", n);
	return 0;
}
