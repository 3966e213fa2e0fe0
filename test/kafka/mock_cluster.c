/*-------------------------------------------------------------------------
 *
 * mock_cluster.c
 *	  A librdkafka mock Kafka cluster for the tests, with faults injected on
 *	  demand, one command per line.
 *
 * Usage: mock_cluster [--brokers N] [--topic NAME] [--partitions P]
 *
 * Creates a mock cluster of N brokers (ids 1..N, default 3) holding a topic
 * of P partitions (default 4), prints "bootstrap <servers>" on stdout, then
 * reads commands from stdin, one a line, and answers each with one line:
 * "ok [value]" or "error <why>".  It exits cleanly on EOF, "quit", SIGTERM
 * or SIGINT.  The brokers accept Produce, so kcat -b <servers> -P works.
 *
 * Commands (API: Fetch, OffsetCommit, JoinGroup, Heartbeat, ... or its
 * number; ERROR: a Kafka error name such as NOT_LEADER_FOR_PARTITION,
 * _TRANSPORT for a disconnect, or its number; BROKER: an id, -1 for all):
 *
 *	 errors API ERROR [COUNT]		the next COUNT requests of API, on any
 *									broker, fail with ERROR
 *	 broker-errors BROKER API ERROR [COUNT [RTT_MS]]
 *									the same on one broker, each answered
 *									after RTT_MS
 *	 error-count BROKER API			errors still stacked on a broker for API
 *	 clear-errors API				forget the cluster-wide errors of API
 *	 down BROKER, up BROKER			close a broker's connections and refuse
 *									new ones / accept them again
 *	 rtt BROKER MS					delay every response of a broker
 *	 leader PARTITION BROKER		move the partition leader of the topic
 *	 coordinator GROUP BROKER		move the coordinator of a consumer group
 *	 create-topic NAME PARTITIONS	another topic
 *	 bootstrap, quit
 *
 * The mock cluster is librdkafka's own (rdkafka_mock.h, an experimental
 * API): it lives in the threads of this process, so faults are injected
 * synchronously, before the command's answer is printed.
 *
 *-------------------------------------------------------------------------
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <librdkafka/rdkafka.h>
#include <librdkafka/rdkafka_mock.h>

#define MAX_ARGS	8

static volatile sig_atomic_t stop_requested = 0;
static rd_kafka_mock_cluster_t *mcluster;
static const char *topic = "order-service_orders";

/* Kafka protocol request types, by the names the protocol gives them. */
static const struct
{
	const char *name;
	int16_t		key;
}			api_keys[] = {
	{"Produce", 0},
	{"Fetch", 1},
	{"ListOffsets", 2},
	{"Metadata", 3},
	{"OffsetCommit", 8},
	{"OffsetFetch", 9},
	{"FindCoordinator", 10},
	{"JoinGroup", 11},
	{"Heartbeat", 12},
	{"LeaveGroup", 13},
	{"SyncGroup", 14},
	{"ApiVersion", 18},
	{NULL, 0}
};

static void
on_signal(int signo)
{
	(void) signo;
	stop_requested = 1;
}

/* Parse a whole decimal number; false if s is not one. */
static int
parse_int(const char *s, long *value)
{
	char	   *end;

	errno = 0;
	*value = strtol(s, &end, 10);
	return errno == 0 && end != s && *end == '\0';
}

static int
parse_api(const char *s, int16_t *key)
{
	long		n;
	int			i;

	for (i = 0; api_keys[i].name != NULL; i++)
	{
		if (strcasecmp(s, api_keys[i].name) == 0)
		{
			*key = api_keys[i].key;
			return 1;
		}
	}
	if (parse_int(s, &n) && n >= 0 && n < 100)
	{
		*key = (int16_t) n;
		return 1;
	}
	return 0;
}

/* An error code from its librdkafka name (without the RD_KAFKA_RESP_ERR_). */
static int
parse_error(const char *s, rd_kafka_resp_err_t *err)
{
	const struct rd_kafka_err_desc *descs;
	size_t		n;
	size_t		i;
	long		code;

	rd_kafka_get_err_descs(&descs, &n);
	for (i = 0; i < n; i++)
	{
		if (descs[i].name != NULL && strcasecmp(s, descs[i].name) == 0)
		{
			*err = descs[i].code;
			return 1;
		}
	}
	if (parse_int(s, &code))
	{
		*err = (rd_kafka_resp_err_t) code;
		return 1;
	}
	return 0;
}

/*
 * Run one command; the answer goes to stdout.  Returns 0 when the program
 * should stop.
 */
static int
run_command(char **argv, int argc)
{
	const char *cmd = argv[0];
	rd_kafka_resp_err_t err = RD_KAFKA_RESP_ERR_NO_ERROR;
	rd_kafka_resp_err_t inject;
	int16_t		api;
	long		a;
	long		b;
	long		count = 1;
	long		rtt = 0;
	long		i;

	if (strcmp(cmd, "quit") == 0)
	{
		printf("ok\n");
		return 0;
	}
	else if (strcmp(cmd, "bootstrap") == 0 && argc == 1)
	{
		printf("ok %s\n", rd_kafka_mock_cluster_bootstraps(mcluster));
		return 1;
	}
	else if (strcmp(cmd, "errors") == 0 && (argc == 3 || argc == 4) &&
			 parse_api(argv[1], &api) && parse_error(argv[2], &inject) &&
			 (argc == 3 || (parse_int(argv[3], &count) && count > 0)))
	{
		rd_kafka_resp_err_t *errs = calloc(count, sizeof(*errs));

		if (errs == NULL)
		{
			printf("error out of memory\n");
			return 1;
		}
		for (i = 0; i < count; i++)
			errs[i] = inject;
		rd_kafka_mock_push_request_errors_array(mcluster, api, count, errs);
		free(errs);
	}
	else if (strcmp(cmd, "broker-errors") == 0 && argc >= 4 && argc <= 6 &&
			 parse_int(argv[1], &a) && parse_api(argv[2], &api) &&
			 parse_error(argv[3], &inject) &&
			 (argc < 5 || (parse_int(argv[4], &count) && count > 0)) &&
			 (argc < 6 || (parse_int(argv[5], &rtt) && rtt >= 0)))
	{
		/* One call per error: the call takes its tuples as varargs. */
		for (i = 0; i < count && err == RD_KAFKA_RESP_ERR_NO_ERROR; i++)
			err = rd_kafka_mock_broker_push_request_error_rtts(mcluster,
															   (int32_t) a,
															   api, 1,
															   inject,
															   (int) rtt);
	}
	else if (strcmp(cmd, "error-count") == 0 && argc == 3 &&
			 parse_int(argv[1], &a) && parse_api(argv[2], &api))
	{
		size_t		cnt = 0;

		err = rd_kafka_mock_broker_error_stack_cnt(mcluster, (int32_t) a,
												   api, &cnt);
		if (err == RD_KAFKA_RESP_ERR_NO_ERROR)
		{
			printf("ok %zu\n", cnt);
			return 1;
		}
	}
	else if (strcmp(cmd, "clear-errors") == 0 && argc == 2 &&
			 parse_api(argv[1], &api))
		rd_kafka_mock_clear_request_errors(mcluster, api);
	else if (strcmp(cmd, "down") == 0 && argc == 2 && parse_int(argv[1], &a))
		err = rd_kafka_mock_broker_set_down(mcluster, (int32_t) a);
	else if (strcmp(cmd, "up") == 0 && argc == 2 && parse_int(argv[1], &a))
		err = rd_kafka_mock_broker_set_up(mcluster, (int32_t) a);
	else if (strcmp(cmd, "rtt") == 0 && argc == 3 &&
			 parse_int(argv[1], &a) && parse_int(argv[2], &b) && b >= 0)
		err = rd_kafka_mock_broker_set_rtt(mcluster, (int32_t) a, (int) b);
	else if (strcmp(cmd, "leader") == 0 && argc == 3 &&
			 parse_int(argv[1], &a) && parse_int(argv[2], &b))
		err = rd_kafka_mock_partition_set_leader(mcluster, topic, (int32_t) a,
												 (int32_t) b);
	else if (strcmp(cmd, "coordinator") == 0 && argc == 3 &&
			 parse_int(argv[2], &b))
		err = rd_kafka_mock_coordinator_set(mcluster, "group", argv[1],
											(int32_t) b);
	else if (strcmp(cmd, "create-topic") == 0 && argc == 3 &&
			 parse_int(argv[2], &a) && a > 0)
		err = rd_kafka_mock_topic_create(mcluster, argv[1], (int) a, 1);
	else
	{
		printf("error unknown command or bad arguments: %s\n", cmd);
		return 1;
	}

	if (err != RD_KAFKA_RESP_ERR_NO_ERROR)
		printf("error %s\n", rd_kafka_err2name(err));
	else
		printf("ok\n");
	return 1;
}

static void
usage(void)
{
	fprintf(stderr,
			"usage: mock_cluster [--brokers N] [--topic NAME] [--partitions P]\n"
			"then one command a line on stdin (see the comment at the top of mock_cluster.c)\n");
	exit(2);
}

int
main(int argc, char **argv)
{
	long		brokers = 3;
	long		partitions = 4;
	rd_kafka_conf_t *conf;
	rd_kafka_t *rk;
	char		errstr[512];
	char		line[1024];
	struct sigaction sa;
	int			i;
	rd_kafka_resp_err_t err;

	for (i = 1; i < argc; i++)
	{
		if (i + 1 >= argc)
			usage();
		if (strcmp(argv[i], "--brokers") == 0 && parse_int(argv[i + 1], &brokers) &&
			brokers > 0)
			i++;
		else if (strcmp(argv[i], "--partitions") == 0 &&
				 parse_int(argv[i + 1], &partitions) && partitions > 0)
			i++;
		else if (strcmp(argv[i], "--topic") == 0)
			topic = argv[++i];
		else
			usage();
	}

	/*
	 * No SA_RESTART: a signal interrupts the blocking read of stdin, so
	 * that the program stops at once.
	 */
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_signal;
	sigemptyset(&sa.sa_mask);
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);
	signal(SIGPIPE, SIG_IGN);

	/* The mock cluster needs a client handle of its own for bookkeeping. */
	conf = rd_kafka_conf_new();
	if (rd_kafka_conf_set(conf, "log_level", "4", errstr, sizeof(errstr)) != RD_KAFKA_CONF_OK)
	{
		fprintf(stderr, "mock_cluster: %s\n", errstr);
		return 1;
	}
	rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, errstr, sizeof(errstr));
	if (rk == NULL)
	{
		fprintf(stderr, "mock_cluster: could not create a client handle: %s\n", errstr);
		return 1;
	}
	mcluster = rd_kafka_mock_cluster_new(rk, (int) brokers);
	if (mcluster == NULL)
	{
		fprintf(stderr, "mock_cluster: could not create the mock cluster\n");
		rd_kafka_destroy(rk);
		return 1;
	}
	err = rd_kafka_mock_topic_create(mcluster, topic, (int) partitions, 1);
	if (err != RD_KAFKA_RESP_ERR_NO_ERROR)
	{
		fprintf(stderr, "mock_cluster: could not create topic %s: %s\n",
				topic, rd_kafka_err2str(err));
		rd_kafka_mock_cluster_destroy(mcluster);
		rd_kafka_destroy(rk);
		return 1;
	}

	printf("bootstrap %s\n", rd_kafka_mock_cluster_bootstraps(mcluster));
	fflush(stdout);

	while (!stop_requested && fgets(line, sizeof(line), stdin) != NULL)
	{
		char	   *args[MAX_ARGS];
		int			n = 0;
		char	   *save = NULL;
		char	   *tok;
		int			go_on = 1;

		for (tok = strtok_r(line, " \t\r\n", &save);
			 tok != NULL && n < MAX_ARGS;
			 tok = strtok_r(NULL, " \t\r\n", &save))
			args[n++] = tok;
		if (n == 0 || args[0][0] == '#')
			continue;
		if (tok != NULL)
			printf("error too many arguments\n");
		else
			go_on = run_command(args, n);
		fflush(stdout);
		if (!go_on)
			break;
	}

	rd_kafka_mock_cluster_destroy(mcluster);
	rd_kafka_destroy(rk);
	return 0;
}
