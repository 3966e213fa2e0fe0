# The tags worker's expiry passes: a windowed rule, an order dated just
# inside the window's edge and one well inside it.  Both users are granted
# the tag by the ingest; the tags worker revokes the first within
# dwh.tags_expire_interval after its order leaves the window, with a revoke
# event that a listener on dwh_user_tags hears, and the second keeps it.
# dwh.status shows the worker's state and its last pass.  The passes run
# READ COMMITTED whatever the server's default isolation (here
# serializable, which dwh.expire_tags() and every write of the warehouse
# refuse: the test's own writes set READ COMMITTED); an interval of 0 stops
# them.  Without a windowed rule a pass takes no lock.

use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;

use DwhTest;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep);

my $interval = 5;
my $node = new_dwh_node(
	'tag_expiry',
	'dwh.tags_expire_interval' => "${interval}s",
	'default_transaction_isolation' => 'serializable');

sub psql { return $node->safe_psql('postgres', $_[0]); }

# The worker runs and says what it does.
ok(wait_for($node,
		"SELECT state = 'expiring tags every $interval s' AND pid IS NOT NULL FROM dwh.status WHERE worker = 'tags'"),
	'the tags worker expires tags every interval');

# An order of a user, dated (UTC) $offset ago.
sub order
{
	my ($id, $user, $age) = @_;
	my $date = psql("SELECT to_char(now() AT TIME ZONE 'UTC' - interval '$age', 'YYYY-MM-DD HH24:MI:SS')");
	return psql(qq{SET default_transaction_isolation = 'read committed'; SELECT dwh.ingest_order(\$m\${"object_id": $id, "object_type": "order", "sent_dttm": "$date", "payload": {"restaurant": {"id": "r1"}, "date": "$date", "user": {"id": "$user"}, "order_items": [{"id": "d1", "name": "Плов", "price": 100, "quantity": 1}], "bonus_payment": 0, "cost": 100, "payment": 100, "bonus_grant": 0, "statuses": [{"status": "CLOSED", "dttm": "$date"}], "final_status": "CLOSED", "update_ts": "$date"}}\$m\$::text)});
}

# Without a windowed rule a pass only reads dwh.tag_rules: it takes no
# lock, so passes go on while a session holds the tag lock shared (which
# dwh.expire_tags() would wait for: it takes it exclusive).
my $holder = $node->background_psql('postgres');
$holder->query_safe('BEGIN; SELECT dwh.xact_lock(dwh.tag_lock_key(), false)');
my $passes_before = psql(q{SELECT expiry_passes FROM dwh.status WHERE worker = 'tags'});
ok( wait_for(
		$node,
		"SELECT expiry_passes >= $passes_before + 2 FROM dwh.status WHERE worker = 'tags'",
		4 * $interval),
	'without a windowed rule, passes go on while the tag lock is held');
$holder->quit;

# Passes run, and say so, while there is no rule too: with a window the
# rule moves at each pass.
psql(q{SET default_transaction_isolation = 'read committed';
       INSERT INTO dwh.tag_rules (tag, kind, threshold, window_days) VALUES ('recent', 'all_orders', 1, 1)});
is(order(1, 'edge', '1 day - 6 seconds'), 'applied', 'an order dated 6 s inside the window');
is(order(2, 'inside', '12 hours'), 'applied', 'an order dated well inside it');
is(psql(q{SELECT string_agg(u.user_id, ',' ORDER BY u.user_id) FROM cdm.user_tags t
          JOIN dds.h_user u ON u.h_user_pk = t.user_id WHERE t.tag = 'recent'}),
	'edge,inside', 'both users hold the windowed tag');
my $edge = psql(q{SELECT o.order_dt + interval '1 day' FROM dds.h_order o WHERE o.order_id = 1});

# A session listening on dwh_user_tags hears the revoke from the tags
# worker.
my $listener = $node->background_psql('postgres');
$listener->query_safe('LISTEN dwh_user_tags');

# The pass that revokes it reports its event: the status is polled while
# it is the last pass (it stays so for the interval).
my $seen = 0;
my $deadline = time() + $PostgreSQL::Test::Utils::timeout_default;
while (time() < $deadline)
{
	if (psql(q{SELECT last_expiry_events = 1 AND last_expiry_rules_moved = 1
                 AND last_expiry_at IS NOT NULL AND expiry_passes > 1
               FROM dwh.status WHERE worker = 'tags'}) eq 't')
	{
		$seen = 1;
		last;
	}
	usleep(100_000);
}
ok($seen, 'dwh.status shows the pass that moved the rule and wrote one event');

is(psql(q{SELECT string_agg(u.user_id, ',') FROM cdm.user_tags t
          JOIN dds.h_user u ON u.h_user_pk = t.user_id WHERE t.tag = 'recent'}),
	'inside', 'the tag at the edge is revoked, the other stays');
is(psql(q{SELECT string_agg(u.user_id || ' ' || e.kind || ' ' || e.order_cnt, ', ' ORDER BY e.id)
          FROM cdm.user_tag_events e JOIN dds.h_user u ON u.h_user_pk = e.user_id}),
	'edge grant 1, inside grant 1, edge revoke 0',
	'the revoke has its event, after the two grants');
my $heard = $listener->query_safe('SELECT 1');
$listener->quit;
my @heard = $heard =~ /^Asynchronous notification "dwh_user_tags" with payload "(.*)" received from server process with PID (\d+)\.$/mg;
is( join(' ', @heard),
	psql(q{SELECT '{"id" : ' || e.id || '} ' || s.pid
	       FROM cdm.user_tag_events e, dwh.status s WHERE e.kind = 'revoke' AND s.worker = 'tags'}),
	'a listener hears the revoke once, from the tags worker');
my $late = psql(qq{SELECT extract(epoch FROM e.at - '$edge'::timestamp AT TIME ZONE 'UTC')
                   FROM cdm.user_tag_events e WHERE e.kind = 'revoke'});
note("revoked $late s after the order left the window");
ok($late >= 0 && $late <= $interval + 2,
	"revoked after the order left the window, within the interval ($late s)");
check_consistent($node, 'after the expiry');
is(psql('SELECT count(*) FROM dwh.verify()'), '0', 'dwh.verify() agrees with the tags');
is(psql(q{SELECT last_error FROM dwh.status WHERE worker = 'tags'}), '',
	'no error: the passes ran READ COMMITTED under a serializable default');

# An interval of 0: no more passes.
psql(q{ALTER SYSTEM SET dwh.tags_expire_interval = 0; SELECT pg_reload_conf()});
ok(wait_for($node,
		"SELECT state = 'idle: dwh.tags_expire_interval is 0 and dwh.tags_topic is empty' FROM dwh.status WHERE worker = 'tags'"),
	'an interval of 0 stops the passes, and dwh.status says so');
my $passes = psql(q{SELECT expiry_passes FROM dwh.status WHERE worker = 'tags'});
sleep 2;
is(psql(q{SELECT expiry_passes FROM dwh.status WHERE worker = 'tags'}), $passes,
	'no pass runs meanwhile');
like(slurp_file($node->logfile),
	qr/LOG:  idle: dwh.tags_expire_interval is 0 and dwh.tags_topic is empty/,
	'the idle state is logged once');

$node->stop;
done_testing();
