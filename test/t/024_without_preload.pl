# dwh loaded without shared_preload_libraries: CREATE EXTENSION, LOAD and
# every SQL entry point work (it used to end the session with "FATAL:
# cannot create PGC_POSTMASTER variables after startup"), the workers are
# absent, and dwh.status says why and what to do; the exporter's query of
# the workers reports one worker, none, down; a session that loads dwh
# warns while a secret setting, then unprotected, holds a value.  Then preloaded with too few
# background worker slots: the workers left out are named in the log and
# in dwh.status, and reported down.

use strict;
use warnings;

use FindBin;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $node = PostgreSQL::Test::Cluster->new('without_preload');
$node->init(extra => [ '--encoding=UTF8', '--locale=C' ]);
$node->start;

my ($ret, $out, $err) = $node->psql('postgres', q{LOAD 'dwh'; SELECT 1});
is($ret, 0, 'LOAD dwh works without the preload') or diag($err);
($ret, $out, $err) = $node->psql('postgres', 'CREATE EXTENSION dwh');
is($ret, 0, 'CREATE EXTENSION dwh works without the preload') or diag($err);

is( $node->safe_psql('postgres', 'SELECT worker, state, last_error FROM dwh.status'),
	'none|not started: dwh is not in shared_preload_libraries|'
	  . 'The workers need dwh in shared_preload_libraries and a server restart; '
	  . 'the SQL functions and triggers work without it.',
	'dwh.status says the workers are absent, why, and what to do');
is($node->safe_psql('postgres', 'SELECT count(*) FROM dwh.kafka_partitions'),
	'0', 'dwh.kafka_partitions is empty');

my $order = q{{"object_id": 1, "object_type": "order", "sent_dttm": "2023-01-01 10:00:00", "payload": {"restaurant": {"id": "r1"}, "date": "2023-01-01 10:00:00", "user": {"id": "u1"}, "order_items": [{"id": "d1", "name": "Плов", "price": 100, "quantity": 1}], "bonus_payment": 0, "cost": 100, "payment": 100, "bonus_grant": 0, "statuses": [{"status": "CLOSED", "dttm": "2023-01-01 10:00:00"}], "final_status": "CLOSED", "update_ts": "2023-01-01 10:00:00"}}};
is($node->safe_psql('postgres', "SELECT dwh.ingest_order(\$m\$$order\$m\$::text)"),
	'applied', 'an order is ingested');
is( $node->safe_psql('postgres',
		'SELECT product_name || \' \' || order_cnt FROM cdm.user_product_counters'),
	'Плов 1', 'and counted in the mart');
($ret, $out, $err) = $node->psql('postgres', 'SELECT dwh.kafka_seek(0, 0)');
is($ret, 0, 'dwh.kafka_seek works (there is no worker to wake)') or diag($err);
is($node->safe_psql('postgres', 'SELECT count(*) FROM dwh.verify()'),
	'0', 'dwh.verify() is empty');
is($node->safe_psql('postgres', q{LOAD 'dwh'; SHOW dwh.kafka_consumers}), '1',
	'once loaded, dwh.kafka_consumers is defined (and read by nothing)');

# Without the preload, the secret settings are PostgreSQL's placeholders
# in every process that has not loaded dwh: readable by any role, logged
# on reload.  A session that loads dwh says so while one holds a value,
# without quoting it.
$node->safe_psql('postgres',
	q{LOAD 'dwh'; ALTER SYSTEM SET dwh.redis_url = 'redis://:Pw7341@127.0.0.1:1'; SELECT pg_reload_conf()});
ok($node->poll_query_until('postgres', q{SELECT current_setting('dwh.redis_url') <> ''}),
	'dwh.redis_url holds a value');
($ret, $out, $err) = $node->psql('postgres', q{SELECT dwh.hash_key('u1') IS NOT NULL});
is($out, 't', 'dwh loads');
like($err,
	qr/WARNING:  dwh is not in shared_preload_libraries: its secret settings are not protected/,
	'and warns that its secret settings are not protected');
like($err, qr/HINT:  Add dwh to shared_preload_libraries and restart the server, or keep the secrets in the files/,
	'saying what to do');
unlike($err, qr/Pw7341/, 'without quoting the value');
$node->safe_psql('postgres', q{LOAD 'dwh'; ALTER SYSTEM RESET dwh.redis_url; SELECT pg_reload_conf()});
ok($node->poll_query_until('postgres', q{SELECT current_setting('dwh.redis_url') = ''}),
	'dwh.redis_url is empty again');
($ret, $out, $err) = $node->psql('postgres', q{SELECT dwh.hash_key('u1') IS NOT NULL});
is($err, '', 'without a secret set, no warning');

# The exporter's query of the workers (monitoring/queries.yaml) reports
# one worker "none", down, which DwhWorkerAbsent takes up
# (docs/monitoring.md).
my ($worker_query) = slurp_file("$FindBin::RealBin/../../monitoring/queries.yaml")
  =~ /^dwh_worker:\n  master: true\n  query: \|\n(.*?)^  metrics:/ms
  or die 'no dwh_worker query in monitoring/queries.yaml';
$worker_query =~ s/^    //mg;
is($node->safe_psql('postgres', "SELECT worker, kind, up FROM ($worker_query) q"),
	'none|none|0', 'the exporter\'s worker query reports worker none, down');

# Preloaded, with fewer background worker slots than workers: two slots
# (no logical replication launcher to take one) for two Kafka workers, the
# Redis worker and the tags worker.  The postmaster's own message names
# none; dwh names each worker left out, in the log and in dwh.status, and
# the exporter reports them down.
$node->append_conf(
	'postgresql.conf', q{
shared_preload_libraries = 'dwh'
max_worker_processes = 2
max_logical_replication_workers = 0
dwh.kafka_consumers = 2
});
my $log_offset = -s $node->logfile;
$node->restart;
ok($node->poll_query_until('postgres',
		q{SELECT count(*) = 2 FROM dwh.status WHERE pid IS NOT NULL}),
	'both Kafka workers run');
is( $node->safe_psql('postgres',
		q{SELECT worker || ' ' || coalesce(pid::text, 'no process') || ' ' || state
		  FROM dwh.status WHERE pid IS NULL ORDER BY worker}),
	"redis no process not started: no background worker slot was left\n"
	  . 'tags no process not started: no background worker slot was left',
	'dwh.status shows the Redis and the tags worker not started, and why');
is( $node->safe_psql('postgres',
		q{SELECT DISTINCT last_error FROM dwh.status WHERE pid IS NULL}),
	'max_worker_processes (2) left no background worker slot for this worker at server start; raise it and restart the server',
	'and what to do');
my $log = slurp_file($node->logfile, $log_offset);
my @named = $log =~ /WARNING:  could not register background worker "([^"]+)"/g;
is("@named", 'dwh redis worker dwh tags worker',
	'the log names the two workers left out');
like($log,
	qr/could not register background worker "dwh tags worker"\n.*DETAIL:  max_worker_processes \(2\) leaves no slot for it\.\n.*HINT:  Raise max_worker_processes and restart the server\./,
	'with the setting and the hint');
is( $node->safe_psql('postgres',
		"SELECT string_agg(worker || ' ' || up, ', ' ORDER BY worker) FROM ($worker_query) q"),
	'kafka 1 1, kafka 2 1, redis 0, tags 0',
	'the exporter\'s worker query reports the two down');

$node->stop;
done_testing();
