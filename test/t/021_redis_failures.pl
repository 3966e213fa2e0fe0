# The Redis worker when things go wrong: a wrong password and a wrong
# database (a clear error in dwh.status and in the log, recovery after the
# URL is corrected and the configuration reloaded), Redis stopped and
# restarted while orders arrive (orders never wait; the worker resumes by
# itself), Redis frozen (bounded waits; SIGTERM honoured at once), and the
# password kept out of the log, dwh.status and the reach of non-superusers.
# Ends with dwh.verify() empty and the marts equal to a recount of the
# orders written here.

use strict;
use warnings;

use FindBin;
use JSON::PP;
use lib $FindBin::RealBin;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use RedisServer;
use Test::More;
use Time::HiRes qw(time usleep);

my $json = JSON::PP->new->utf8->canonical;
my $password = 'Sup3r-s3cret-redis-pw';
my $redis = RedisServer->new(password => $password);
my $wrong_url = $redis->url(password => 'not-the-password');

my $node = PostgreSQL::Test::Cluster->new('redis_failures');
$node->init(extra => [ '--encoding=UTF8', '--locale=C' ]);
$node->append_conf(
	'postgresql.conf', qq{
shared_preload_libraries = 'dwh'
log_error_verbosity = verbose
dwh.redis_refresh_interval = 1
dwh.redis_timeout = 1000
dwh.redis_url = '$wrong_url'
});
$node->start;
$node->safe_psql('postgres', 'CREATE EXTENSION dwh');

sub psql { return $node->safe_psql('postgres', $_[0]) }

sub wait_for
{
	my ($sql, $what) = @_;
	ok($node->poll_query_until('postgres', $sql), $what)
	  or diag(psql("SELECT state, last_error FROM dwh.status WHERE worker = 'redis'"));
}

sub redis_row
{
	my ($columns) = @_;
	return psql("SELECT $columns FROM dwh.status WHERE worker = 'redis'");
}

sub set_url
{
	my ($url) = @_;
	psql("ALTER SYSTEM SET dwh.redis_url = '$url'");
	$node->reload;
}

sub user_id { sprintf('626a81ce9a8cd1920641e2%02d', $_[0]) }
sub restaurant_id { sprintf('a51e4e31ae4602047ec525%02d', $_[0]) }
sub dish_id { sprintf('6276e8cd0cf48b4cded00%03d', $_[0]) }

sub put_user
{
	my ($n) = @_;
	$redis->set(user_id($n), $json->encode({ _id => user_id($n), name => "User $n",
		login => "user$n", update_ts_utc => '2023-08-11 16:44:59' }));
}

# Dishes as [number, category].
sub put_restaurant
{
	my ($n, @dishes) = @_;
	$redis->set(
		restaurant_id($n),
		$json->encode({ _id => restaurant_id($n), name => "Restaurant $n",
			update_ts_utc => '2023-08-11 16:50:44',
			menu => [ map { { _id => dish_id($_->[0]), name => "Dish $_->[0]",
				price => 100, category => $_->[1] } } @dishes ] }));
}

sub put_dictionaries
{
	put_user($_) for 1 .. 3;
	put_restaurant(1, [ 1, 'Soups' ], [ 2, 'Salads' ]);
	put_restaurant(2, [ 11, 'Drinks' ]);
}

sub ingest_order
{
	my ($id, $user, $restaurant, @dishes) = @_;
	my $ts = '2023-09-01 10:00:00';
	my $msg = $json->encode({ object_id => $id, object_type => 'order', sent_dttm => $ts,
		payload => { restaurant => { id => restaurant_id($restaurant) }, date => $ts,
			user => { id => user_id($user) },
			order_items => [ map { { id => dish_id($_), name => "Dish $_", price => 100,
				quantity => 1 } } @dishes ],
			bonus_payment => 0, cost => 100 * @dishes, payment => 100 * @dishes,
			bonus_grant => 0, statuses => [ { status => 'CLOSED', dttm => $ts } ],
			final_status => 'CLOSED', update_ts => $ts } });
	is(psql("SELECT dwh.ingest_order(\$m\$$msg\$m\$)"),
		'applied', "order $id applied at once");
}

# 1. A wrong password: a clear error with a hint, the password nowhere.
wait_for(
	q{SELECT last_error LIKE '%refused the password%' FROM dwh.status WHERE worker = 'redis'},
	'a wrong password is reported in dwh.status');
like(redis_row('state'), qr/^error: Redis refused the connection settings/,
	'the state says the settings are refused');
is(redis_row('last_error_at IS NOT NULL'), 't', 'with the time of the error');
like(redis_row('last_error'), qr{redis://:\*\*\*\@127\.0\.0\.1:\d+/0},
	'the error names Redis by its URL, password redacted');

# Logged once, and retried every 30 s, not at once: over 5 s, one line in
# the log and no new connection to Redis but redis-cli's own.
my $connections = sub {
	($redis->cli('INFO', 'stats') =~ /total_connections_received:(\d+)/)[0];
};
my $before = $connections->();
sleep 5;
is($connections->() - $before, 1, 'no new attempt within 5 s of the refusal');
my @refusals = (slurp_file($node->logfile) =~ /LOG:  28P01: Redis at \S+ refused the password/g);
is(scalar @refusals, 1, 'the refusal is logged once, with SQLSTATE 28P01');

# Then tried again by itself, 30 s after the refusal.  Each look at the
# counter is a connection of redis-cli's own: more than one new
# connection between two looks is the worker's.
my $refused_at =
  psql(q{SELECT extract(epoch FROM last_error_at) FROM dwh.status WHERE worker = 'redis'});
my ($retried_at, $seen) = (undef, $connections->());
while (!defined $retried_at && time() < $refused_at + 60)
{
	usleep(250_000);
	my $now = $connections->();
	$retried_at = time() if $now - $seen > 1;
	$seen = $now;
}
ok(defined $retried_at, 'the worker tries the refused settings again by itself');
my $retry_after = ($retried_at // time()) - $refused_at;
ok($retry_after > 25 && $retry_after < 40,
	sprintf('%.1f s after the refusal: it retries every 30 s', $retry_after));

# Non-superusers see neither the setting nor its value.
psql('CREATE ROLE regress_redis_reader LOGIN');
my ($ret, $out, $err) = $node->psql('postgres', 'SHOW dwh.redis_url',
	extra_params => [ '-U', 'regress_redis_reader' ]);
isnt($ret, 0, 'a non-superuser cannot SHOW dwh.redis_url');
like($err, qr/must be superuser or have privileges of pg_read_all_settings/,
	'and is told why');
is( $node->safe_psql('postgres',
		q{SELECT count(*) FROM pg_settings WHERE name = 'dwh.redis_url'},
		extra_params => [ '-U', 'regress_redis_reader' ]),
	'0', 'pg_settings hides it from non-superusers');

# A correct URL and a reload: the worker recovers at once, not at its
# next retry 30 s after the refusal.
put_dictionaries();
my $reloaded_at = time();
set_url($redis->url);
wait_for(q{SELECT state = 'mirroring' FROM dwh.status WHERE worker = 'redis'},
	'the corrected password is picked up on reload');
cmp_ok(time() - $reloaded_at, '<', 10, 'at once, not at the next retry 30 s after the refusal');

# 2. A database Redis does not have.
set_url($redis->url(db => 99));
wait_for(
	q{SELECT last_error LIKE '%has no database 99%' FROM dwh.status WHERE worker = 'redis'},
	'a wrong database is reported in dwh.status');
set_url($redis->url);
wait_for(q{SELECT state = 'mirroring' FROM dwh.status WHERE worker = 'redis'},
	'the corrected database is picked up on reload');

ingest_order(1000001, 1, 1, 1, 2);
wait_for(q{SELECT count(*) = 1 FROM stg.users}, 'the user of the first order is mirrored');
wait_for(q{SELECT count(*) = 1 FROM stg.restaurants}, 'and its restaurant');

# 3. Redis stopped while orders arrive: they are applied at once, the
#    worker waits, and resumes by itself when Redis is back, refreshing
#    everything at once (README): with a refresh interval of an hour, a
#    user renamed before the outage, which no order names, is seen right
#    after it.  (Redis keeps its data across the restart in a dump.)  With
#    that interval, a user an order names is read within seconds all the
#    same, without a refresh pass.
psql(q{ALTER SYSTEM SET dwh.redis_refresh_interval = '1h'});
$node->reload;
my $refreshes_of = sub { redis_row('refreshes') };
my ($r0, $r1) = ($refreshes_of->(), -1);
foreach (1 .. 60)
{
	sleep 3;
	$r1 = $refreshes_of->();
	last if $r1 == $r0;
	$r0 = $r1;
}
is($r1, $r0, 'with an interval of an hour, no refresh pass runs');
# Keys that orders name do not wait for a pass: read within a second or so.
put_user(4);
my $asked = time();
ingest_order(1000004, 4, 1, 1);
wait_for(q{SELECT count(*) = 1 FROM stg.users WHERE object_id = '626a81ce9a8cd1920641e204'},
	'a user an order names is read without a refresh pass');
my $took = time() - $asked;
cmp_ok($took, '<', 5, "within seconds ($took s)");
is($refreshes_of->(), $r1, 'no refresh pass ran meanwhile');
$redis->set(user_id(1), $json->encode({ _id => user_id(1), name => 'User 1 renamed',
	login => 'user1', update_ts_utc => '2023-08-12 10:00:00' }));
$redis->cli('SAVE');
sleep 2;
is(psql(q{SELECT payload->>'name' FROM stg.users WHERE object_id = '626a81ce9a8cd1920641e201'}),
	'User 1', 'a change in Redis waits for the next pass');
$redis->stop;
ingest_order(1000002, 2, 2, 11, 1);
wait_for(
	q{SELECT state LIKE 'waiting for Redis%' AND last_error LIKE '%could not connect to Redis%'
	  FROM dwh.status WHERE worker = 'redis'},
	'Redis down is reported in dwh.status');
# It tries again after 0.5 s, doubling the wait after each failure (up to
# 30 s): each failure rewrites last_error_at.
{
	my @failed_at;
	my $until = time() + 10;
	while (time() < $until)
	{
		my $at = redis_row(q{extract(epoch FROM last_error_at)});
		push @failed_at, $at if !@failed_at || $at != $failed_at[-1];
		usleep(50_000);
	}
	my @gaps = map { $failed_at[$_] - $failed_at[ $_ - 1 ] } 1 .. $#failed_at;
	my @off = grep { $gaps[$_] < 1.8 * $gaps[ $_ - 1 ] || $gaps[$_] > 2.2 * $gaps[ $_ - 1 ] + 0.2 }
	  1 .. $#gaps;
	ok(@gaps >= 2 && !@off && $gaps[0] >= 0.45,
		'while Redis is down the waits between tries double: '
		  . join(', ', map { sprintf('%.2f s', $_) } @gaps));
}
is(psql(q{SELECT count(*) FROM cdm.user_product_counters
	WHERE user_id = dwh.hash_key('626a81ce9a8cd1920641e202')}),
	'2', 'the order counts per dish while Redis is down');

$redis->start;
wait_for(q{SELECT count(*) = 3 FROM stg.users}, 'Redis back: the new user is mirrored');
wait_for(q{SELECT count(*) = 2 FROM stg.restaurants}, 'and the new restaurant');
wait_for(
	q{SELECT payload->>'name' = 'User 1 renamed' FROM stg.users WHERE object_id = '626a81ce9a8cd1920641e201'},
	'and, once connected, the renamed user: everything is refreshed');
psql(q{ALTER SYSTEM SET dwh.redis_refresh_interval = 1});
$node->reload;
wait_for(q{SELECT state = 'mirroring' FROM dwh.status WHERE worker = 'redis'},
	'the worker mirrors again');

# 4. Redis frozen (accepts bytes, answers nothing): each exchange gives up
#    after dwh.redis_timeout.
$redis->freeze;
ingest_order(1000003, 3, 1, 2);
wait_for(
	q{SELECT last_error LIKE '%did not answer within 1000 ms%' FROM dwh.status WHERE worker = 'redis'},
	'a frozen Redis is reported after dwh.redis_timeout');

# With a long timeout, the worker sits in a wait on Redis: SIGTERM must
# still end it at once.
psql(q{ALTER SYSTEM SET dwh.redis_timeout = '60s'});
$node->reload;
wait_for(q{SELECT state = 'connecting' FROM dwh.status WHERE worker = 'redis'},
	'the worker waits on the frozen Redis');
my $pid = redis_row('pid');
my $t0 = time();
psql("SELECT pg_terminate_backend($pid)");
wait_for("SELECT count(*) = 0 FROM pg_stat_activity WHERE pid = $pid",
	'the worker ends on SIGTERM');
my $elapsed = time() - $t0;
cmp_ok($elapsed, '<', 1.5, sprintf('SIGTERM honoured in %.2f s while waiting on Redis', $elapsed));

psql(q{ALTER SYSTEM SET dwh.redis_timeout = '1s'});
$node->reload;
$redis->thaw;
wait_for(q{SELECT pid IS NOT NULL AND pid <> } . $pid
	  . q{ AND state = 'mirroring' FROM dwh.status WHERE worker = 'redis'},
	'the restarted worker mirrors again');
wait_for(q{SELECT count(*) = 4 FROM stg.users}, 'the user of the order made while Redis froze is mirrored');

# 5. The marts equal the recount of the four orders.
my $products = join("\n",
	user_id(1) . '|' . dish_id(1) . '|1',
	user_id(1) . '|' . dish_id(2) . '|1',
	user_id(2) . '|' . dish_id(1) . '|1',
	user_id(2) . '|' . dish_id(11) . '|1',
	user_id(3) . '|' . dish_id(2) . '|1',
	user_id(4) . '|' . dish_id(1) . '|1');
my $categories = join("\n",
	user_id(1) . '|Salads|1',
	user_id(1) . '|Soups|1',
	user_id(2) . '|Drinks|1',
	user_id(2) . '|Soups|1',
	user_id(3) . '|Salads|1',
	user_id(4) . '|Soups|1');
is( psql(
		q{SELECT u.user_id || '|' || p.product_id || '|' || m.order_cnt
		  FROM cdm.user_product_counters m
		  JOIN dds.h_user u ON u.h_user_pk = m.user_id
		  JOIN dds.h_product p ON p.h_product_pk = m.product_id ORDER BY 1}),
	$products, 'product mart equals the recount');
is( psql(
		q{SELECT u.user_id || '|' || m.category_name || '|' || m.order_cnt
		  FROM cdm.user_category_counters m
		  JOIN dds.h_user u ON u.h_user_pk = m.user_id ORDER BY 1}),
	$categories, 'category mart equals the recount');
is(psql('SELECT count(*) FROM dwh.verify()'), '0', 'dwh.verify() is empty');

# 6. The log has the errors with their SQLSTATEs and hints, never the
#    password; neither has dwh.status.
my $log = slurp_file($node->logfile);
like($log, qr/LOG:  28P01: Redis at \S+ refused the password/,
	'the wrong password is logged with SQLSTATE 28P01');
like($log, qr/HINT:  Check the username and password in dwh.redis_url/,
	'with a hint');
like($log, qr/LOG:  3D000: Redis at \S+ has no database 99/,
	'the wrong database is logged with SQLSTATE 3D000');
like($log, qr/LOG:  08001: could not connect to Redis/,
	'Redis down is logged with SQLSTATE 08001');
unlike($log, qr/\Q$password\E/, 'the password never appears in the log');
unlike($log, qr/not-the-password/, 'nor does the wrong one');
is(psql(qq{SELECT count(*) FROM dwh.status WHERE last_error LIKE '%$password%' OR state LIKE '%$password%'}),
	'0', 'nor dwh.status');

# 7. A Redis worker with an error, then told to do nothing (dwh.redis_url
#    emptied): idle on purpose, it shows no error.
set_url($wrong_url);
wait_for(q{SELECT last_error IS NOT NULL FROM dwh.status WHERE worker = 'redis'},
	'a wrong password: the Redis worker shows an error');
set_url('');
wait_for(
	q{SELECT state = 'idle: dwh.redis_url is empty' AND last_error IS NULL AND last_error_at IS NULL FROM dwh.status WHERE worker = 'redis'},
	'dwh.redis_url emptied: idle on purpose, no error shown');

$node->stop;
$redis->stop;
done_testing();
