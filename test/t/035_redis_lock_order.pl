# The Redis worker takes its locks in the order every writer takes them
# (install/40_products.sql, "Lock order"): the dictionary lock before the
# keys that order batches share.  The worker writes a batch of new keys, a
# user and a restaurant, in one transaction.  Written users first, the user's hub
# row was inserted, and the menu then waited for the dictionary lock
# exclusive behind an order batch that held it shared and waited for that
# hub row: a deadlock.  Here an order batch holds the lock shared while
# the worker waits for it, then writes an order of that user: the batch
# goes through, the worker follows, no deadlock is logged, and the
# warehouse is right.

use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;

use DwhTest;
use PostgreSQL::Test::Utils;
use RedisServer;
use Test::More;

my $redis = RedisServer->new;
my $node = new_dwh_node(
	'redis_lock_order',
	'dwh.redis_url' => $redis->url,
	'dwh.redis_scan_pattern' => '*',
	'dwh.redis_refresh_interval' => 1,
	'deadlock_timeout' => '100ms',
	'log_lock_waits' => 'on');

sub psql { return $node->safe_psql('postgres', $_[0]) }

my $menu = sub {
	my ($id, $dish) = @_;
	return qq{{"_id": "$id", "name": "Kubdari", "update_ts_utc": "2023-01-01 10:00:00", "menu": [{"_id": "$dish", "name": "Dolma", "price": 100, "category": "Starters"}]}};
};
$redis->set('r1', $menu->('r1', 'd1'));
ok($node->poll_query_until('postgres', 'SELECT count(*) = 1 FROM stg.restaurants'),
	'the worker mirrored the first menu');

# An order batch holds the dictionary lock shared (as it does from its
# claim to its commit); the worker's next pass, a new user and a new
# restaurant read in one batch, waits for it.
my $batch = $node->background_psql('postgres', on_error_stop => 0);
$batch->query_safe(
	'BEGIN; SELECT dwh.xact_lock(dwh.dictionary_lock_key(), false)');
$redis->cli(
	'MSET', 'u9',
	'{"_id": "u9", "name": "Anna", "login": "anna", "update_ts_utc": "2023-01-02 10:00:00"}',
	'r2', $menu->('r2', 'd2'));
ok( $node->poll_query_until(
		'postgres', q{
SELECT count(*) > 0 FROM pg_locks l JOIN pg_stat_activity a USING (pid)
WHERE a.backend_type = 'dwh redis worker' AND l.locktype = 'advisory' AND NOT l.granted}),
	'the worker waits for the dictionary lock');

# The batch writes an order of the new user, and commits.
my $order =
  q{{"object_id": 1, "object_type": "order", "sent_dttm": "2023-01-03 10:00:00", "payload": {"restaurant": {"id": "r1"}, "date": "2023-01-03 10:00:00", "user": {"id": "u9"}, "order_items": [{"id": "d1", "name": "Dolma", "price": 100, "quantity": 1}], "cost": 100, "payment": 100, "statuses": [], "final_status": "CLOSED", "update_ts": "2023-01-03 10:00:00"}}};
$batch->{stderr} = '';
my $applied = $batch->query(
	"SELECT applied FROM dwh.ingest_orders(ARRAY[convert_to(\$m\$$order\$m\$, 'UTF8')])");
my $error = $batch->{stderr};
$batch->query('COMMIT');
$batch->quit;
is($applied, '1', 'the order batch applied its order');
is($error, '', 'without an error');

ok( $node->poll_query_until(
		'postgres', q{
SELECT (SELECT count(*) FROM stg.users) = 1 AND (SELECT count(*) FROM stg.restaurants) = 2}),
	'the worker wrote the user and the restaurant');
unlike(slurp_file($node->logfile), qr/deadlock detected/, 'no deadlock was logged');
is(psql(q{SELECT count(*) FROM dwh.status WHERE worker = 'redis' AND last_error IS NOT NULL}),
	'0', 'the worker shows no error');
is(psql('SELECT product_name, order_cnt FROM cdm.user_product_counters'),
	'Dolma|1', 'the order is counted');
is(psql('SELECT count(*) FROM dwh.verify()'), '0', 'dwh.verify() is empty');

$node->stop;
$redis->stop;
done_testing();
