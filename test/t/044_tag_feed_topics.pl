# The Kafka feed of user tags when its settings change (docs/tags.md,
# "Without a topic, and when it changes"), against a mock cluster:
#
#  1. A topic but no broker: the grants wait in dwh.tag_outbox, and the
#     tags worker says why and counts them.
#  2. The broker set and the topic changed before anything was produced:
#     every pending event goes to the new topic, once, and none to the old
#     one.
#  3. The topic emptied: later events are written but not queued, and
#     nothing more reaches the topic.
#  4. A topic set again: only the events written from then on are queued
#     and produced.
#  5. A commit that queues an event wakes the worker: it is produced at
#     once, not at the worker's next look.
#  6. The topic emptied while an event waits for the broker: it stays in
#     the outbox, counted pending, and is produced when a topic and a
#     broker are set again.
#  7. Outbox rows that no commit announced (a restore) are produced at the
#     worker's next look.
#  8. enable.idempotence=false in dwh.kafka_options does not reach the
#     producer: dwh sets it after the DBA's options.
#  9. A broker that cannot be reached: logged with SQLSTATE 08006, the
#     library's text as detail, a text not repeated line after line.

use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;

use DwhTest;
use PostgreSQL::Test::Utils;
use Test::More;

my $mock = start_mock_cluster(brokers => 1, partitions => 1);
mock_command($mock, 'create-topic tags-old 1');
mock_command($mock, 'create-topic tags-new 1');
my $node = new_dwh_node(
	'tag_feed_topics',
	'dwh.kafka_consumers' => 0,
	'dwh.tags_topic' => 'tags-old',
	'dwh.tags_expire_interval' => 0);

sub psql { return $node->safe_psql('postgres', $_[0]); }

# One CLOSED order of a user of its own: one grant of the rule below.
sub order_of_new_user
{
	my ($n) = @_;
	psql(qq{SELECT dwh.ingest_order('{"object_id": $n, "object_type": "order", "sent_dttm": "2023-01-02 10:00:00", "payload": {"restaurant": {"id": "r1"}, "date": "2023-01-02 10:00:00", "user": {"id": "u$n"}, "order_items": [{"id": "d1", "name": "Dolma", "price": 100, "quantity": 1}], "cost": 100, "payment": 100, "statuses": [], "final_status": "CLOSED", "update_ts": "2023-01-02 10:00:00"}}'::text)}
	);
	return;
}

# The event ids in a topic, sorted, comma-separated.
sub topic_ids
{
	my ($topic) = @_;
	my $out = `kcat -C -q -e -b $mock->{bootstrap} -t $topic -o beginning -f '%s\\n'`;
	die "kcat could not read topic $topic" if $? != 0;
	my @ids = map { /"id"\s*:\s*(\d+)/ ? $1 : die "no event id in: $_" }
	  grep { $_ ne '' } split /\n/, $out;
	return join(',', sort { $a <=> $b } @ids);
}

sub event_ids
{
	my ($where) = @_;
	return psql(
		"SELECT coalesce(string_agg(id::text, ',' ORDER BY id), '') FROM cdm.user_tag_events WHERE $where"
	);
}

sub tags_status
{
	return psql(
		q{SELECT state || ' | ' || events_produced || '/' || events_pending FROM dwh.status WHERE worker = 'tags'}
	);
}

# Wait until every session takes the setting (a reload reaches them at
# their next statement).
sub reload
{
	my ($setting, $value) = @_;
	ok(set_and_reload($node, $setting, $value), "$setting is now '$value'");
	return;
}

psql(q{INSERT INTO dwh.tag_rules (tag, kind, threshold) VALUES ('customer', 'all_orders', 1)});

# 1. A topic, no broker.
order_of_new_user($_) foreach 1 .. 3;
my $pending = event_ids('true');
my @pending = split /,/, $pending;
is(scalar @pending, 3, "three grants written ($pending)");
is(psql(q{SELECT string_agg(event_id::text, ',' ORDER BY event_id) FROM dwh.tag_outbox}),
	$pending, 'each is queued in the outbox');
ok( wait_for(
		$node,
		q{SELECT state = 'waiting: dwh.kafka_brokers is empty, tag events wait in dwh.tag_outbox'
		  FROM dwh.status WHERE worker = 'tags'}),
	'the tags worker waits for a broker, and says the events wait')
  or diag(tags_status());
ok(wait_for($node, q{SELECT events_pending = 3 FROM dwh.status WHERE worker = 'tags'}),
	'dwh.status counts the three waiting events')
  or diag(tags_status());

# 2. Another topic, then the broker: the pending events go to the new topic.
reload('dwh.tags_topic', 'tags-new');
reload('dwh.kafka_brokers', $mock->{bootstrap});
ok(wait_for($node, 'SELECT count(*) = 0 FROM dwh.tag_outbox'), 'the outbox is emptied')
  or diag(tags_status());
is(topic_ids('tags-new'), $pending, 'every pending event is in the new topic, once');
is(topic_ids('tags-old'), '', 'none is in the old topic');
is(psql(q{SELECT events_produced || '/' || events_pending FROM dwh.status WHERE worker = 'tags'}),
	'3/0', 'dwh.status: three produced, none pending');

# 3. The topic emptied: the events are written, not queued.
reload('dwh.tags_topic', '');
ok( wait_for(
		$node,
		q{SELECT state = 'idle: dwh.tags_expire_interval is 0 and dwh.tags_topic is empty'
		  FROM dwh.status WHERE worker = 'tags'}),
	'without a topic the worker idles, and says why')
  or diag(tags_status());
my $last = psql('SELECT max(id) FROM cdm.user_tag_events');
order_of_new_user(4);
my $unqueued = event_ids("id > $last");
isnt($unqueued, '', "the grant is written ($unqueued)");
is(psql('SELECT count(*) FROM dwh.tag_outbox'), '0', 'and not queued');

# 4. A topic set again: the events from then on, not the one before.
reload('dwh.tags_topic', 'tags-new');
ok( wait_for(
		$node,
		q{SELECT state = 'producing tag events to topic "tags-new"' FROM dwh.status WHERE worker = 'tags'}),
	'with the topic back the worker produces')
  or diag(tags_status());
$last = psql('SELECT max(id) FROM cdm.user_tag_events');
order_of_new_user(5);
my $later = event_ids("id > $last");
isnt($later, '', "the next grant is written ($later)");
ok(wait_for($node, 'SELECT count(*) = 0 FROM dwh.tag_outbox'), 'and produced')
  or diag(tags_status());
is(topic_ids('tags-new'), "$pending,$later",
	'the new topic holds the pending events and the later one, not the unqueued one');
is(topic_ids('tags-old'), '', 'the old topic is still empty');

# 5. A commit that queues an event wakes the worker, which produces it at
# once instead of at its next look (every second): five grants, each
# acknowledged well within half a second of its transaction.  (Without the
# wake-up each would be by chance, all five one time in 32.)
my @late;
foreach my $n (6 .. 10)
{
	my $produced =
	  psql(q{SELECT events_produced FROM dwh.status WHERE worker = 'tags'});
	order_of_new_user($n);
	ok( wait_for(
			$node,
			"SELECT events_produced > $produced FROM dwh.status WHERE worker = 'tags'"),
		"grant of user $n produced")
	  or diag(tags_status());
	my $ms = psql(
		qq{SELECT round(extract(epoch FROM s.last_produced_at - e.at) * 1000)
		   FROM dwh.status s, cdm.user_tag_events e
		   WHERE s.worker = 'tags' AND e.id = (SELECT max(id) FROM cdm.user_tag_events)});
	push @late, "user $n: $ms ms" if $ms >= 500;
}
is(join('; ', @late), '', 'each grant is acknowledged within 500 ms of its transaction');

# 6. The topic emptied while an event waits for the broker: it stays in
#    the outbox, counted as pending, and is produced once a topic and a
#    broker are set again.
reload('dwh.kafka_brokers', '');
$last = psql('SELECT max(id) FROM cdm.user_tag_events');
order_of_new_user(11);
my $waiting = event_ids("id > $last");
reload('dwh.tags_topic', '');
ok( wait_for(
		$node,
		q{SELECT state = 'idle: dwh.tags_expire_interval is 0 and dwh.tags_topic is empty'
		  AND events_pending = 1 FROM dwh.status WHERE worker = 'tags'}),
	'with the topic emptied the waiting event is still counted pending')
  or diag(tags_status());
is(psql('SELECT string_agg(event_id::text, \',\') FROM dwh.tag_outbox'),
	$waiting, 'and stays in the outbox');
reload('dwh.tags_topic', 'tags-new');
reload('dwh.kafka_brokers', $mock->{bootstrap});
ok(wait_for($node, 'SELECT count(*) = 0 FROM dwh.tag_outbox'), 'a topic and a broker set again: it is produced')
  or diag(tags_status());
my @new_ids = split /,/, topic_ids('tags-new');
is(scalar(grep { $_ == $waiting } @new_ids), 1, 'once');

# 7. A row put in the outbox by a plain INSERT, which wakes nobody (as a
#    restore's COPY does): produced at the worker's next look.
my $restored = (split /,/, $pending)[0];
psql("INSERT INTO dwh.tag_outbox (event_id) VALUES ($restored)");
ok(wait_for($node, 'SELECT count(*) = 0 FROM dwh.tag_outbox'), 'the restored row is produced')
  or diag(tags_status());
@new_ids = split /,/, topic_ids('tags-new');
is(scalar(grep { $_ == $restored } @new_ids), 2, 'its event is in the topic again (a restored outbox is produced)');

# 8. The producer stays idempotent whatever dwh.kafka_options say: its
#    librdkafka log (debug=eos, relayed at DEBUG1) shows a producer id
#    acquired.
psql("ALTER SYSTEM SET log_min_messages = debug1");
my $idem_offset = -s $node->logfile;
reload('dwh.kafka_options', 'enable.idempotence=false debug=eos');
$last = psql('SELECT max(id) FROM cdm.user_tag_events');
order_of_new_user(12);
my $event12 = event_ids("id > $last");
ok(wait_for($node, 'SELECT count(*) = 0 FROM dwh.tag_outbox'),
	'with enable.idempotence=false in dwh.kafka_options, the event is produced')
  or diag(tags_status());
is(scalar(grep { $_ == $event12 } split /,/, topic_ids('tags-new')), 1, 'once');
like(slurp_file($node->logfile, $idem_offset),
	qr/Kafka client library log \(tags producer\)\n[^\n]*DETAIL:  IDEMPSTATE: [^\n]*Idempotent producer state change \S+ -> Assigned/,
	'the producer is idempotent all the same: it acquired a producer id');
psql("ALTER SYSTEM RESET log_min_messages");
reload('dwh.kafka_options', '');

# 9. No broker listening: the worker logs why, with SQLSTATE 08006 and the
#    library's text as detail; a text is logged again only after another.
#    A short message.timeout.ms fails each retry the same way ("Message
#    timed out"): without that rule the log repeats it line after line.
psql("ALTER SYSTEM SET log_error_verbosity = verbose");
my $down_offset = -s $node->logfile;
reload('dwh.kafka_options', 'message.timeout.ms=200');
reload('dwh.kafka_brokers', '127.0.0.1:' . PostgreSQL::Test::Cluster::get_free_port());
$last = psql('SELECT max(id) FROM cdm.user_tag_events');
order_of_new_user(13);
ok( wait_for(
		$node,
		q{SELECT state = 'waiting for the broker' AND events_pending = 1 AND last_error IS NOT NULL
		  FROM dwh.status WHERE worker = 'tags'}),
	'no broker listening: the worker waits for it, its event pending')
  or diag(tags_status());
sleep(5);
my @failures = slurp_file($node->logfile, $down_offset)
  =~ /^[^\n]*LOG:  (\w{5}): could not produce user tag events to Kafka\n[^\n]*DETAIL:  ([^\n]*)\n/mg;
ok(@failures >= 2, 'the failure is logged (' . @failures / 2 . ' lines)');
my @codes = map { $failures[ 2 * $_ ] } 0 .. $#failures / 2;
is(join(',', sort keys %{ { map { $_ => 1 } @codes } }), '08006', 'with SQLSTATE 08006');
my @details = map { $failures[ 2 * $_ + 1 ] } 0 .. $#failures / 2;
is(scalar(grep { $details[$_] eq $details[ $_ - 1 ] } 1 .. $#details), 0,
	'no text logged twice in a row') or diag(join("\n", @details));
psql("ALTER SYSTEM RESET log_error_verbosity");
reload('dwh.kafka_options', '');
reload('dwh.kafka_brokers', $mock->{bootstrap});
ok(wait_for($node, 'SELECT count(*) = 0 FROM dwh.tag_outbox'), 'the broker back, the event is produced')
  or diag(tags_status());

is(psql('SELECT count(*) FROM dwh.verify()'), '0', 'dwh.verify() is empty');

$node->stop;
stop_mock_cluster($mock);
done_testing();
