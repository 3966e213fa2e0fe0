# The Kafka feed of user tags (docs/tags.md, "The Kafka feed"), against a
# real broker: orders arrive through the Kafka workers and the SQL entry
# point, rules in dwh.tag_rules grant and revoke tags, and the tags worker
# produces every event to a topic of its own.  The topic is read back with
# kcat and compared with cdm.user_tag_events: the same set of event ids,
# every JSON field right, the user's business id as the key (one partition
# per user), each user and tag in id order.
#
#  0. No topic set: events are written, nothing is queued or produced, and
#     the outbox stays empty; a session listening on dwh_user_tags hears
#     each event, notified by the Kafka workers.
#  1. A topic set by reload: every event from then on reaches it, once.
#  2. kill -9 of the tags worker while events are pending (the server
#     restarts): none is lost.
#  3. The broker stopped while events are pending (dwh.status shows them
#     and the error), the worker killed after the broker acknowledged a
#     batch and before it could delete it from the outbox, the broker
#     started again: none is lost, and the acknowledged batch is produced
#     twice, the duplicates docs/tags.md documents (same id, same JSON).
#  4. SASL_SSL: the same brokers' SASL_SSL listener, with the consumer's
#     options.
#
# The password is never logged.

use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;

use DwhTest;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);

my $password = 'Tag-Feed-Secret-7';
$ENV{DWH_KAFKA_SASL_USER} = 'dwh';
$ENV{DWH_KAFKA_SASL_PASSWORD} = $password;
my $broker = start_broker(partitions => 2, sasl => 1);
my $topic = 'user-tags';
broker_command('create-topic', $broker->{dir}, $topic, 3);

my $node = new_dwh_node(
	'kafka_tag_feed',
	'dwh.kafka_brokers' => $broker->{bootstrap},
	'dwh.kafka_batch_wait' => '50ms',
	'dwh.tags_expire_interval' => '0');
load_dictionaries($node);
my $tmp = $PostgreSQL::Test::Utils::tmp_check;

sub psql { return $node->safe_psql('postgres', $_[0]); }

# Ingest a generated file through dwh.ingest_orders (when the consumer
# cannot reach the broker).
sub ingest_sql
{
	my ($file) = @_;
	chmod 0644, $file;
	psql(qq{
CREATE TEMP TABLE lines (line text);
COPY lines FROM '$file' WITH (FORMAT csv, DELIMITER E'\\x02', QUOTE E'\\x01');
SELECT dwh.ingest_orders(array_agg(convert_to(line, 'UTF8'))) FROM lines;
});
	return;
}

# Every message of the topic, loaded into t.kafka (partition, offset, key,
# value as jsonb).
sub read_topic
{
	my $file = "$tmp/tag_feed_topic.tsv";
	system("kcat -C -q -e -b $broker->{bootstrap} -t $topic -o beginning "
		  . "-f '%p\\t%o\\t%k\\t%s\\n' > $file") == 0
	  or die "kcat could not read topic $topic";
	chmod 0644, $file;
	psql(qq{
DROP TABLE IF EXISTS t.kafka;
CREATE TABLE t.kafka (p integer, o bigint, k text, v jsonb);
COPY t.kafka FROM '$file' WITH (FORMAT csv, DELIMITER E'\\t', QUOTE E'\\x01');
});
	return psql('SELECT count(*) FROM t.kafka');
}

sub outbox_empty
{
	my ($label) = @_;
	ok(wait_for($node, 'SELECT count(*) = 0 FROM dwh.tag_outbox'), $label)
	  or diag(psql('SELECT * FROM dwh.status'));
	return;
}

sub tags_state { return psql(q{SELECT state FROM dwh.status WHERE worker = 'tags'}); }

my $producing = qq{producing tag events to topic "$topic"};

# Rules: the users' favourite category, and regulars (3 orders or more).
psql(q{INSERT INTO dwh.tag_rules (tag, kind, threshold) VALUES
       ('favourite', 'favourite_category', 1), ('regular', 'all_orders', 3)});

# 0. No topic: events are written, nothing is queued.  An application
#    listening on dwh_user_tags hears each event the Kafka workers' batches
#    commit, from the workers' processes.
my $listener = $node->background_psql('postgres');
$listener->query_safe('LISTEN dwh_user_tags');
generate_orders("$tmp/o0.txt", '--count 600 --seed 40 --first-id 100000 --reversals 0.05', "--manifest $tmp/o0.json");
produce($broker, "$tmp/o0.txt");
# Wait for every message, not every order: an order's first version makes
# its row, and its later versions (reversals) still grant and revoke.
my $sent = read_manifest("$tmp/o0.json")->{messages};
ok(wait_applied($node, $sent), 'phase 0 orders applied');
my $heard = $listener->query_safe('SELECT 1');
$listener->quit;
my (%heard_ids, %heard_pids);
while ($heard =~ /^Asynchronous notification "dwh_user_tags" with payload "(.*)" received from server process with PID (\d+)\.$/mg)
{
	my ($payload, $pid) = ($1, $2);
	$heard_ids{$1}++ if $payload =~ /"id" : (\d+)/;
	$heard_pids{$pid} = 1;
}
is( join(',', map { "$_ x$heard_ids{$_}" } sort { $a <=> $b } keys %heard_ids),
	psql(q{SELECT string_agg(id || ' x1', ',' ORDER BY id) FROM cdm.user_tag_events}),
	'a listener hears each event of the Kafka workers\' batches once');
is( join(',', sort keys %heard_pids),
	psql(q{SELECT string_agg(pid::text, ',' ORDER BY pid::text) FROM dwh.status
	       WHERE worker LIKE 'kafka%' AND pid::text = ANY (string_to_array('}
		  . join(',', keys %heard_pids) . q{', ','))}),
	'from the Kafka workers\' processes');
ok(wait_for($node, "SELECT state = 'idle: dwh.tags_expire_interval is 0 and dwh.tags_topic is empty' FROM dwh.status WHERE worker = 'tags'"),
	'without a topic the tags worker idles, and says why');
my $before_topic = psql('SELECT max(id) FROM cdm.user_tag_events');
ok($before_topic > 0, "events are written without a topic ($before_topic)");
is(psql('SELECT count(*) FROM dwh.tag_outbox'), '0', 'without a topic nothing is queued');
is(psql(q{SELECT events_produced || '/' || events_pending FROM dwh.status WHERE worker = 'tags'}),
	'0/0', 'dwh.status: nothing produced, nothing pending');
is(read_topic(), '0', 'and the topic is empty');

# 1. The topic set by reload.
psql(qq{ALTER SYSTEM SET dwh.tags_topic = '$topic'; SELECT pg_reload_conf()});
ok(wait_for($node, "SELECT state = '$producing' FROM dwh.status WHERE worker = 'tags'"),
	'with a topic the worker produces, and says so')
  or diag(tags_state());
ok(wait_for($node, "SELECT current_setting('dwh.tags_topic') = '$topic'"),
	'new sessions see the topic');
generate_orders("$tmp/o1.txt", '--count 1500 --seed 41 --first-id 200000 --reversals 0.05 --status-changes 0.1', "--manifest $tmp/o1.json");
produce($broker, "$tmp/o1.txt");
$sent += read_manifest("$tmp/o1.json")->{messages};
ok(wait_applied($node, $sent), 'phase 1 orders applied');
outbox_empty('phase 1: the outbox is emptied');
my $phase1 = psql("SELECT count(*) FROM cdm.user_tag_events WHERE id > $before_topic");
ok($phase1 > 0, "phase 1 wrote $phase1 events");
# The worker deletes a batch from the outbox, then counts it produced.
ok(wait_for($node, qq{SELECT events_produced || '/' || events_pending = '$phase1/0'
                      FROM dwh.status WHERE worker = 'tags'}),
	'dwh.status counts them produced, none pending')
  or diag(psql('SELECT * FROM dwh.status'));
is(read_topic(), $phase1, 'each is in the topic once');

# 2. kill -9 of the tags worker while events are pending.
# The worker is stopped (SIGSTOP) before the orders are produced, so that
# events are surely pending when it is killed: stopped once they stream
# in, it could have produced them all first (the Kafka workers apply 3,000
# orders in well under a second).
generate_orders("$tmp/o2.txt", '--count 3000 --seed 42 --first-id 300000 --reversals 0.05', "--manifest $tmp/o2.json");
my $victim = psql(q{SELECT pid FROM dwh.status WHERE worker = 'tags'});
kill 'STOP', $victim;
produce($broker, "$tmp/o2.txt");
ok(wait_for($node, 'SELECT count(*) > 2600 FROM stg.order_events'), 'phase 2 orders streaming');
ok(wait_for($node, 'SELECT count(*) > 0 FROM dwh.tag_outbox'), 'phase 2: events pending');
kill 'KILL', $victim;
note("killed the tags worker $victim with events pending");
ok(wait_for($node, "SELECT pid <> $victim AND state = '$producing' FROM dwh.status WHERE worker = 'tags'"),
	'the server restarts, and a new tags worker produces');
$sent += read_manifest("$tmp/o2.json")->{messages};
ok(wait_applied($node, $sent), 'phase 2 orders applied');
outbox_empty('phase 2: the outbox is emptied after the kill');

# 3. The broker stopped while events are pending; the worker killed with
#    a batch acknowledged and not yet deleted; the broker back.
broker_command('stop', $broker->{dir});
generate_orders("$tmp/o3.txt", '--count 800 --seed 43 --first-id 400000 --reversals 0.1 --malformed 0');
ingest_sql("$tmp/o3.txt");
ok(wait_for($node,
		q{SELECT events_pending > 0 AND last_error IS NOT NULL FROM dwh.status WHERE worker = 'tags'}),
	'phase 3: dwh.status shows the events pending and the error');
my $pending = psql('SELECT count(*) FROM dwh.tag_outbox');
ok($pending > 0, "phase 3: $pending events wait in the outbox");
like(slurp_file($node->logfile), qr/LOG:  could not produce user tag events to Kafka\n.*DETAIL:  /,
	'the failure is logged, the library text as detail');

# SIGTERM with the broker down and events in flight: the worker exits at
# once (the purge drops them; they stay in the outbox for the next one).
my $termed = psql(q{SELECT pid FROM dwh.status WHERE worker = 'tags'});
my $term_at = time();
psql("SELECT pg_terminate_backend($termed)");
ok(wait_for($node, "SELECT NOT EXISTS (SELECT FROM pg_stat_activity WHERE pid = $termed)", 15),
	'phase 3: the tags worker stops on SIGTERM with the broker down');
cmp_ok(time() - $term_at, '<', 5, 'phase 3: SIGTERM honoured within a few seconds');
ok(wait_for($node,
		"SELECT pid IS NOT NULL AND pid <> $termed FROM dwh.status WHERE worker = 'tags'"),
	'phase 3: a new tags worker takes over');

# The outbox locked against the worker's delete: once the broker is back
# it produces the batch, is acknowledged, and waits for the lock.
my $locked = psql('SELECT array_agg(event_id ORDER BY event_id) FROM dwh.tag_outbox');
my $locker = $node->background_psql('postgres');
$locker->query_safe('BEGIN; LOCK dwh.tag_outbox IN EXCLUSIVE MODE;');
broker_command('restart', $broker->{dir});
ok(wait_for($node,
		q{SELECT count(*) = 1 FROM pg_stat_activity
          WHERE backend_type = 'dwh tags worker' AND wait_event_type = 'Lock'}),
	'the broker back, the worker has the batch acknowledged and waits to delete it');
$victim = psql(q{SELECT pid FROM dwh.status WHERE worker = 'tags'});
kill 'KILL', $victim;
eval { $locker->quit; };
ok(wait_for($node, "SELECT pid <> $victim AND state = '$producing' FROM dwh.status WHERE worker = 'tags'"),
	'the server restarts, and a new tags worker produces');
outbox_empty('phase 3: the outbox is emptied');

# An outbox row whose event cannot be read yet: pg_restore -j commits the
# outbox before the (larger) events table.  The feed waits for it, says
# so, and produces it once it is there (it used to drop the row: an event
# never produced).  A restore into the database the workers serve is now
# refused (test/t/064_backup_variants.pl); one with --disable-triggers is
# not, and writes as the plain INSERTs below do.
my $next = psql(q{SELECT nextval('cdm.user_tag_events_id_seq')});
psql("INSERT INTO dwh.tag_outbox (event_id) VALUES ($next)");
ok( wait_for(
		$node,
		"SELECT last_error LIKE 'queued tag event $next cannot be read in cdm.user_tag_events and dds.h_user yet: the feed waits for it'
		 FROM dwh.status WHERE worker = 'tags'"),
	'an outbox row whose event cannot be read yet holds the feed back, and dwh.status says which')
  or diag(psql('SELECT * FROM dwh.status'));
sleep(2);
is(psql("SELECT count(*) FROM dwh.tag_outbox WHERE event_id = $next"), '1',
	'the row stays in the outbox');
psql(qq{INSERT INTO cdm.user_tag_events (id, user_id, tag, value, kind, order_cnt, at)
SELECT $next, user_id, tag, value, kind, order_cnt, at
FROM cdm.user_tag_events ORDER BY id DESC LIMIT 1});
outbox_empty('once the event is there, it is produced');
read_topic();
is(psql("SELECT count(*) FROM t.kafka WHERE (v->>'id')::bigint = $next"), '1',
	'the event is on the topic, once');

# 4. SASL_SSL, with the consumer's options.
my $options = "security.protocol=SASL_SSL sasl.mechanisms=SCRAM-SHA-512 "
  . "sasl.username=dwh sasl.password=$password ssl.ca.location=$broker->{ca}";
my $log_offset = -s $node->logfile;
psql(qq{ALTER SYSTEM SET dwh.kafka_options = '$options';
        ALTER SYSTEM SET dwh.kafka_brokers = '$broker->{sasl_bootstrap}';
        SELECT pg_reload_conf()});
my $reconnected = 0;
foreach (1 .. 10 * $PostgreSQL::Test::Utils::timeout_default)
{
	$reconnected = slurp_file($node->logfile, $log_offset)
	  =~ /LOG:  Kafka settings of the tag feed changed, reconnecting/;
	last if $reconnected;
	usleep(100_000);
}
ok($reconnected, 'the tags worker takes the SASL_SSL settings');
generate_orders("$tmp/o4.txt", '--count 500 --seed 44 --first-id 500000 --reversals 0.1 --malformed 0');
my $before_sasl = psql('SELECT max(id) FROM cdm.user_tag_events');
ingest_sql("$tmp/o4.txt");
ok(psql("SELECT count(*) FROM cdm.user_tag_events WHERE id > $before_sasl") > 0,
	'phase 4 wrote events');
outbox_empty('phase 4: produced over SASL_SSL');
ok(wait_for($node, "SELECT state = '$producing' AND last_error IS NULL FROM dwh.status WHERE worker = 'tags'"),
	'over SASL_SSL the worker produces, without an error');

# The topic against the events table.
read_topic();
my $events = "(SELECT e.*, u.user_id AS business_id FROM cdm.user_tag_events e
              JOIN dds.h_user u ON u.h_user_pk = e.user_id WHERE e.id > $before_topic)";
is(psql(qq{SELECT count(*) FROM ((SELECT id FROM $events x)
                                 EXCEPT (SELECT (v->>'id')::bigint FROM t.kafka)) m}),
	'0', 'every event written with a topic set is in the topic');
is(psql(qq{SELECT count(*) FROM ((SELECT (v->>'id')::bigint FROM t.kafka)
                                 EXCEPT (SELECT id FROM $events x)) m}),
	'0', 'and nothing else (none of the events written before the topic)');
is(psql(qq{SELECT count(*) FROM t.kafka k LEFT JOIN $events e ON e.id = (k.v->>'id')::bigint
           WHERE e.id IS NULL OR k.k IS DISTINCT FROM e.business_id
              OR k.v->>'user' IS DISTINCT FROM e.business_id
              OR k.v->>'tag' IS DISTINCT FROM e.tag
              OR k.v->'value' IS DISTINCT FROM coalesce(to_jsonb(e.value), 'null'::jsonb)
              OR k.v->>'kind' IS DISTINCT FROM e.kind
              OR (k.v->>'order_cnt')::integer IS DISTINCT FROM e.order_cnt
              OR (k.v->>'at')::timestamptz IS DISTINCT FROM e.at
              OR k.v->>'at' !~ '^\\d{4}-\\d\\d-\\d\\dT\\d\\d:\\d\\d:\\d\\d\\.\\d{6}Z\$'
              OR (SELECT count(*) FROM jsonb_object_keys(k.v)) <> 7}),
	'0', 'each message: key and user the business id, every JSON field as in the table');
is(psql(q{SELECT string_agg(DISTINCT v->>'kind', ',' ORDER BY v->>'kind') FROM t.kafka}),
	'grant,revoke', 'grants and revokes both');
is(psql('SELECT count(*) FROM (SELECT k FROM t.kafka GROUP BY k HAVING count(DISTINCT p) > 1) x'),
	'0', "a user's events share one partition");
is(psql(q{SELECT count(*) FROM (
            SELECT id, lag(id) OVER (PARTITION BY p, k, v->>'tag' ORDER BY first_o) AS prev
            FROM (SELECT p, k, v, (v->>'id')::bigint AS id, min(o) AS first_o
                  FROM t.kafka GROUP BY p, k, v) f) x
          WHERE prev > id}),
	'0', 'the events of a user and tag are in id order');

# Duplicates: only the batch acknowledged and not deleted when the worker
# was killed (phase 3), and whatever the kill of phase 2 caught so; each a
# copy of the same message.
my $dups = psql(q{SELECT count(*) - count(DISTINCT v->>'id') FROM t.kafka});
note("$dups duplicate messages");
is(psql(q{SELECT count(*) FROM (SELECT v->>'id' FROM t.kafka GROUP BY 1
                                HAVING count(DISTINCT v) > 1 OR count(DISTINCT k) > 1) x}),
	'0', 'a duplicate is the same message');
is(psql(qq{SELECT count(*) FROM unnest('$locked'::bigint[]) l(id)
           WHERE (SELECT count(*) FROM t.kafka WHERE (v->>'id')::bigint = l.id) <> 2}),
	'0', 'the batch acknowledged before the kill of phase 3 was produced twice');
ok($dups <= 2 * 1000, 'no more duplicates than a batch per kill');

check_consistent($node, 'after the feed');

# The password stays secret.
my $log = slurp_file($node->logfile);
unlike($log, qr/\Q$password\E/, 'the server log does not hold the password');
unlike(psql('SELECT s::text FROM dwh.status s'), qr/\Q$password\E/,
	'dwh.status does not show it');

$node->stop;
broker_command('stop', $broker->{dir});
done_testing();
