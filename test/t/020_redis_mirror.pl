# The Redis dictionary worker against a real redis-server with a password:
# dictionaries found by SCAN before the orders, fetched after the orders
# that name them, and changing between orders (a renamed user, a renamed
# dish, a dish moved to another category); missing keys; malformed values
# dead-lettered once; a refresh that finds nothing changed writes nothing;
# keys of another type, values whose _id is not their key, refused keys
# read again on demand; a user whose id the queue missed, found by the
# refresh's comparison of the hubs with dwh.redis_keys.
# Every step ends with dwh.verify() empty and both marts equal to a recount
# of the orders and menus this test wrote, made here in Perl.

use strict;
use warnings;
use utf8;

use Encode qw(encode_utf8);
use FindBin;
use JSON::PP;
use lib $FindBin::RealBin;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use RedisServer;
use Test::More;

my $json = JSON::PP->new->utf8->canonical;
my $redis = RedisServer->new(password => 'pa:ss@w/rd%25x');

my $node = PostgreSQL::Test::Cluster->new('redis_mirror');
$node->init(extra => [ '--encoding=UTF8', '--locale=C' ]);
$node->append_conf(
	'postgresql.conf', qq{
shared_preload_libraries = 'dwh'
dwh.redis_refresh_interval = 1
dwh.redis_batch_size = 3
dwh.redis_max_value_size = 2kB
dwh.dead_letter_keep_bytes = 1kB
});
$node->start;
$node->safe_psql('postgres', 'CREATE EXTENSION dwh');

# The password holds ':', '@', '/' and a percent-encoded '%'.
my $url = 'redis://:pa:ss@w/rd%2525x@127.0.0.1:' . $redis->port . '/0';

sub psql { return $node->safe_psql('postgres', $_[0]) }

sub wait_for
{
	my ($sql, $what) = @_;
	ok($node->poll_query_until('postgres', $sql), $what)
	  or diag(psql("SELECT state, keys_mirrored, keys_missing, last_error FROM dwh.status WHERE worker = 'redis'"));
}

sub redis_status
{
	return psql(
		"SELECT keys_mirrored || '/' || keys_missing FROM dwh.status WHERE worker = 'redis'"
	);
}

sub refreshes
{
	return psql("SELECT refreshes FROM dwh.status WHERE worker = 'redis'");
}

# Wait for two more refresh passes than now: one that may have started
# before a change, one that surely saw it.
sub wait_two_refreshes
{
	my ($what) = @_;
	my $r = refreshes() + 2;
	wait_for("SELECT refreshes >= $r FROM dwh.status WHERE worker = 'redis'",
		"two refresh passes: $what");
}

# The dictionaries, as this test writes them to Redis.
my %users;
my %restaurants;

sub user_id { sprintf('626a81ce9a8cd1920641e2%02d', $_[0]) }
sub restaurant_id { sprintf('a51e4e31ae4602047ec525%02d', $_[0]) }
sub dish_id { sprintf('6276e8cd0cf48b4cded00%03d', $_[0]) }

sub put_user
{
	my ($n, $name, $login, $ts) = @_;
	my $id = user_id($n);
	$users{$id} =
	  { _id => $id, name => $name, login => $login, update_ts_utc => $ts };
	$redis->set($id, $json->encode($users{$id}));
}

# Dishes given as [number, name, category].
sub put_restaurant
{
	my ($n, $name, $ts, @dishes) = @_;
	my $id = restaurant_id($n);
	$restaurants{$id} = {
		_id => $id,
		name => $name,
		update_ts_utc => $ts,
		menu => [
			map {
				{
					_id => dish_id($_->[0]),
					name => $_->[1],
					price => 100 + $_->[0],
					category => $_->[2]
				}
			} @dishes
		]
	};
	$redis->set($id, $json->encode($restaurants{$id}));
}

# The orders this test ingested: id => {user, dishes, status}.
my %orders;

# SQL run after the order in its transaction (section 8).
my $with_order = '';

sub ingest_order
{
	my ($id, $user, $restaurant, $status, $ts, @dishes) = @_;
	my @items =
	  map { { id => dish_id($_), name => "Dish $_", price => 100, quantity => 1 } }
	  @dishes;
	my $msg = $json->encode(
		{
			object_id => $id,
			object_type => 'order',
			sent_dttm => $ts,
			payload => {
				restaurant => { id => restaurant_id($restaurant) },
				date => $ts,
				user => { id => user_id($user) },
				order_items => \@items,
				bonus_payment => 0,
				cost => 100 * @items,
				payment => 100 * @items,
				bonus_grant => 0,
				statuses => [ { status => $status, dttm => $ts } ],
				final_status => $status,
				update_ts => $ts
			}
		});
	is(psql("BEGIN; SELECT dwh.ingest_order(\$m\$$msg\$m\$); $with_order COMMIT"),
		'applied', "order $id applied at once, whatever Redis holds");
	$orders{$id} =
	  { user => user_id($user), dishes => [ map { dish_id($_) } @dishes ], status => $status };
}

# The recount: product and category counts of CLOSED orders, from the
# orders and from the menus the worker could mirror (valid restaurant
# values in Redis; the newest menu naming a dish decides its category).
sub expected_marts
{
	my %category;
	my %version;
	for my $r (values %restaurants)
	{
		for my $d (@{ $r->{menu} })
		{
			next
			  if exists $version{ $d->{_id} }
			  && $version{ $d->{_id} } ge $r->{update_ts_utc};
			$version{ $d->{_id} } = $r->{update_ts_utc};
			$category{ $d->{_id} } = $d->{category};
		}
	}
	my (%products, %categories);
	for my $o (values %orders)
	{
		next unless $o->{status} eq 'CLOSED';
		my %seen;
		for my $d (@{ $o->{dishes} })
		{
			$products{"$o->{user}|$d"}++;
			my $c = $category{$d};
			next unless defined $c;
			$categories{ "$o->{user}|" . encode_utf8($c) }++ unless $seen{$c}++;
		}
	}
	return (
		join("\n", map { "$_|$products{$_}" } sort keys %products),
		join("\n", map { "$_|$categories{$_}" } sort keys %categories));
}

sub check_marts
{
	my ($what) = @_;
	my ($products, $categories) = expected_marts();
	is( psql(
			q{SELECT u.user_id || '|' || p.product_id || '|' || m.order_cnt
			  FROM cdm.user_product_counters m
			  JOIN dds.h_user u ON u.h_user_pk = m.user_id
			  JOIN dds.h_product p ON p.h_product_pk = m.product_id
			  ORDER BY 1}),
		$products,
		"$what: product mart equals the recount");
	is( psql(
			q{SELECT u.user_id || '|' || m.category_name || '|' || m.order_cnt
			  FROM cdm.user_category_counters m
			  JOIN dds.h_user u ON u.h_user_pk = m.user_id
			  ORDER BY 1}),
		$categories,
		"$what: category mart equals the recount");
	is(psql('SELECT count(*) FROM dwh.verify()'), '0', "$what: dwh.verify() is empty");
}

# 1. Dictionaries before the orders: SCAN finds them and they reach STG
#    and DDS before any order names them.
put_user(1, 'Гаврила Архипович Игнатьев', 'gavaii_2222', '2023-08-11 16:44:59');
put_user(2, 'Pavel Petrovich', 'pp_1', '2023-08-11 16:45:00');
put_restaurant(1, 'Кубдари', '2023-08-11 16:50:44',
	[ 1, 'Пхали с фасолью', 'Закуски' ],
	[ 2, 'Салат Греческий', 'Салаты' ],
	[ 3, 'Долма', 'Закуски' ],
	[ 4, 'Хачапури', 'Выпечка' ]);
$redis->set('unrelated:counter', '42');

$node->safe_psql('postgres',
	"ALTER SYSTEM SET dwh.redis_url = '$url'; ALTER SYSTEM SET dwh.redis_scan_pattern = '*'"
);
$node->reload;
wait_for(
	q{SELECT count(*) = 2 FROM stg.users},
	'SCAN: the users are mirrored before any order');
wait_for(
	q{SELECT count(*) = 1 FROM stg.restaurants},
	'SCAN: the restaurant is mirrored before any order');
is(psql('SELECT count(*) FROM dds.l_product_category'),
	'4', 'its four dishes have their categories in DDS');
is( psql(
		q{SELECT sqlstate || ' ' || reason FROM dwh.dead_letters
		  WHERE source = 'redis' AND source_key = 'unrelated:counter'}),
	'22032 value is not a JSON object or array',
	'a key of the pattern that is no dictionary value is dead-lettered');
is( psql(
		q{SELECT payload = '{"_id": "626a81ce9a8cd1920641e201", "name": "Гаврила Архипович Игнатьев", "login": "gavaii_2222", "update_ts_utc": "2023-08-11 16:44:59"}'::jsonb
		  FROM stg.users WHERE object_id = '626a81ce9a8cd1920641e201'}),
	't', 'stg.users holds the value as it is in Redis');

ingest_order(1000001, 1, 1, 'CLOSED', '2023-09-01 10:00:00', 1, 2, 3);
ingest_order(1000002, 2, 1, 'CLOSED', '2023-09-01 10:05:00', 3, 4);
ingest_order(1000003, 1, 1, 'CANCELLED', '2023-09-01 10:10:00', 4);
check_marts('orders after their dictionaries');

# 2. Discovery off: only the keys that orders name are read.  Orders name
#    a user and a restaurant Redis does not hold yet: they count per dish
#    at once, the keys are reported missing, and the dictionaries join when
#    they appear in Redis.
$node->safe_psql('postgres',
	"ALTER SYSTEM RESET dwh.redis_scan_pattern");
$node->reload;
put_user(4, 'Never Named', 'nobody', '2023-08-11 16:45:00');
ingest_order(1000004, 3, 2, 'CLOSED', '2023-09-02 10:00:00', 11, 12);
ingest_order(1000005, 3, 2, 'CLOSED', '2023-09-02 11:00:00', 12, 13, 1);
wait_for(
	q{SELECT count(*) = 2 FROM dwh.redis_keys
	  WHERE state = 'missing' AND key IN ('626a81ce9a8cd1920641e203', 'a51e4e31ae4602047ec52502')},
	'the user and the restaurant the orders name are reported missing');
wait_for(
	q{SELECT keys_missing >= 2 FROM dwh.status WHERE worker = 'redis'},
	'dwh.status counts them as missing');
check_marts('orders before their dictionaries');

put_user(3, 'Late User', 'late', '2023-08-12 08:00:00');
put_restaurant(2, 'Вкус Индии', '2023-08-12 08:00:00',
	[ 11, 'Чиз Наан', 'Выпечка' ],
	[ 12, 'Палак Панир', 'Основные блюда' ],
	[ 13, 'Сладкий Ласси', 'Напитки' ]);
wait_for(
	q{SELECT count(*) = 2 FROM dwh.redis_keys
	  WHERE state = 'mirrored' AND key IN ('626a81ce9a8cd1920641e203', 'a51e4e31ae4602047ec52502')},
	'the late dictionaries are mirrored by a refresh');
wait_for(q{SELECT count(*) = 3 FROM stg.users}, 'three users in STG');
is(psql(q{SELECT count(*) FROM stg.users WHERE object_id = '626a81ce9a8cd1920641e204'}),
	'0', 'a user no order names is not read while discovery is off');
check_marts('dictionaries after the orders');

# 3. Dictionaries changing between orders: a renamed user, a renamed dish
#    and a dish moved to another category reach DDS and the marts.
put_user(1, 'Гаврила Игнатьев', 'gavaii_2023', '2023-09-05 09:00:00');
put_restaurant(1, 'Кубдари', '2023-09-05 09:00:00',
	[ 1, 'Пхали', 'Закуски' ],
	[ 2, 'Салат Греческий', 'Салаты' ],
	[ 3, 'Долма', 'Основные блюда' ],
	[ 4, 'Хачапури', 'Выпечка' ]);
wait_for(
	q{SELECT userlogin = 'gavaii_2023' FROM dds.s_user_names
	  WHERE h_user_pk = dwh.hash_key('626a81ce9a8cd1920641e201')
	  ORDER BY load_dt DESC LIMIT 1},
	'the renamed user reaches DDS');
wait_for(
	q{SELECT c.category_name = 'Основные блюда'
	  FROM dds.l_product_category l JOIN dds.h_category c USING (h_category_pk)
	  WHERE l.h_product_pk = dwh.hash_key('6276e8cd0cf48b4cded00003')},
	'the moved dish has its new category in DDS');
is( psql(
		q{SELECT string_agg(DISTINCT product_name, ',') FROM cdm.user_product_counters
		  WHERE product_id = dwh.hash_key('6276e8cd0cf48b4cded00001')}),
	encode_utf8('Пхали'),
	'the renamed dish is renamed in the product mart');
is( psql(
		q{SELECT count(*) FROM dds.s_user_names
		  WHERE h_user_pk = dwh.hash_key('626a81ce9a8cd1920641e201')}),
	'2', 'the user has two name satellite rows');
check_marts('after the dictionaries changed');

ingest_order(1000006, 1, 1, 'CLOSED', '2023-09-06 10:00:00', 3, 4);
ingest_order(1000001, 1, 1, 'CANCELLED', '2023-09-06 11:00:00', 1, 2, 3);
check_marts('orders after the change');

# 4. Malformed values: dead-lettered once each, with the key and why;
#    other keys of the same batches are mirrored.
$redis->set(user_id(5), '{"_id": "x", "name": "Broken');
$redis->set(user_id(6), '{"_id": "x", "title": "no login, no menu"}');
$redis->set(user_id(7), '{"_id": "x", "name": 5, "login": "n"}');
$redis->set(restaurant_id(3), '{"_id": "x", "name": "big", "menu": [], "pad": "' . ('x' x 3000) . '"}');
$redis->set(user_id(8), "{\"name\": \"nul\x00\"}");
put_user(9, 'Fine User', 'fine', '2023-09-07 10:00:00');
ingest_order(1000007, 5, 1, 'CLOSED', '2023-09-07 10:00:00', 1);
ingest_order(1000008, 6, 1, 'CLOSED', '2023-09-07 10:01:00', 2);
ingest_order(1000009, 7, 3, 'CLOSED', '2023-09-07 10:02:00', 21);
ingest_order(1000010, 8, 1, 'CLOSED', '2023-09-07 10:03:00', 4);
ingest_order(1000011, 9, 1, 'CLOSED', '2023-09-07 10:04:00', 4);
wait_for(
	q{SELECT count(*) = 5 FROM dwh.redis_keys
	  WHERE state = 'refused' AND key <> 'unrelated:counter'},
	'five malformed values refused');
wait_for(q{SELECT count(*) = 1 FROM stg.users WHERE object_id = '626a81ce9a8cd1920641e209'},
	'the valid value of the same batch is mirrored');
is( psql(
		q{SELECT string_agg(source_key || ' ' || sqlstate || ' ' || reason, E'\n' ORDER BY source_key)
		  FROM dwh.dead_letters WHERE source = 'redis' AND source_key <> 'unrelated:counter'}),
	join("\n",
		q<626a81ce9a8cd1920641e205 22032 value is not valid JSON (line 1, column 22): Token ""Broken" is invalid.>,
		'626a81ce9a8cd1920641e206 22P02 value of unknown shape: neither a restaurant (no "menu") nor a user (no "login")',
		'626a81ce9a8cd1920641e207 22P02 invalid user: name must be a string, not number',
		'626a81ce9a8cd1920641e208 22021 value holds a NUL byte at offset 13',
		'a51e4e31ae4602047ec52503 54000 value of 3050 bytes exceeds dwh.redis_max_value_size (2048 bytes)'),
	'each malformed value is one dead letter with its key, SQLSTATE and reason');
is( psql(
		q{SELECT raw = convert_to('{"_id": "x", "name": 5, "login": "n"}', 'UTF8')
		  FROM dwh.dead_letters WHERE source_key = '626a81ce9a8cd1920641e207'}),
	't', 'the dead letter keeps the raw value');
is( psql(
		q{SELECT raw_length, raw_sha256 = sha256(raw)
		  FROM dwh.dead_letters WHERE source_key = '626a81ce9a8cd1920641e207'}),
	'37|t', 'with its length and hash');
# Bounded by dwh.dead_letter_keep_bytes, like a Kafka dead letter: the value
# too large keeps its first kilobyte, its length and the hash of all of it.
is( psql(
		q[SELECT length(raw), raw_length,
		         raw = convert_to('{"_id": "x", "name": "big", "menu": [], "pad": "' || repeat('x', 1024 - 48), 'UTF8'),
		         raw_sha256 = sha256(convert_to('{"_id": "x", "name": "big", "menu": [], "pad": "'
		                                        || repeat('x', 3000) || '"}', 'UTF8'))
		  FROM dwh.dead_letters WHERE source_key = 'a51e4e31ae4602047ec52503']),
	'1024|3050|t|t',
	'a value too large keeps a prefix of dwh.dead_letter_keep_bytes, its length and its hash');
# dwh.status counts the refused keys with the missing ones (README).
wait_for(
	q{SELECT s.keys_missing = k.missing + k.refused AND k.refused >= 5
	  FROM dwh.status s,
	       (SELECT count(*) FILTER (WHERE state = 'missing') AS missing,
	               count(*) FILTER (WHERE state = 'refused') AS refused
	        FROM dwh.redis_keys) k
	  WHERE s.worker = 'redis'},
	'keys_missing counts the refused keys with the missing ones');
check_marts('after malformed values');

# 5. Refreshes of unchanged values write nothing, and do not dead-letter the
#    same bad value again.
my $fingerprint_sql = q{
SELECT (SELECT string_agg(object_id || ':' || xmin || ':' || ctid, ',' ORDER BY object_id) FROM stg.users)
    || (SELECT string_agg(object_id || ':' || xmin || ':' || ctid, ',' ORDER BY object_id) FROM stg.restaurants)
    || (SELECT string_agg(key || ':' || xmin, ',' ORDER BY key) FROM dwh.redis_keys)
    || (SELECT count(*) FROM dwh.dead_letters)
    || (SELECT count(*) FROM dds.s_user_names)};
my $before = psql($fingerprint_sql);
my $changes = psql(q{SELECT changes_found FROM dwh.status WHERE worker = 'redis'});
wait_two_refreshes('nothing changed');
is(psql($fingerprint_sql), $before,
	'refreshes of unchanged values wrote nothing (no new row version anywhere)');
is(psql(q{SELECT changes_found FROM dwh.status WHERE worker = 'redis'}),
	$changes, 'and found no change');

# A fixed value is mirrored; a new bad value is dead-lettered again.
put_user(7, 'Fixed Seven', 'seven', '2023-09-08 10:00:00');
$redis->set(user_id(6), '[1, 2, 3]');
wait_for(q{SELECT count(*) = 1 FROM stg.users WHERE object_id = '626a81ce9a8cd1920641e207'},
	'the corrected value is mirrored');
wait_for(q{SELECT count(*) = 2 FROM dwh.dead_letters WHERE source_key = '626a81ce9a8cd1920641e206'},
	'the new bad value is dead-lettered');
is(psql(q{SELECT count(*) FROM dwh.dead_letters WHERE source = 'redis'}),
	'7', 'no other dead letter was added');

# 6. A key deleted from Redis: reported missing, its STG row stays.
$redis->del(user_id(2));
wait_for(q{SELECT state = 'missing' FROM dwh.redis_keys WHERE key = '626a81ce9a8cd1920641e202'},
	'a deleted key is reported missing');
is(psql(q{SELECT count(*) FROM stg.users WHERE object_id = '626a81ce9a8cd1920641e202'}),
	'1', 'its last value stays in STG');

# 7. Keys and values beyond their shape: a key holding another type than a
#    string is missing, not refused; the _id inside a value is not compared
#    with its key; a value with a menu is a restaurant even with a login;
#    refused keys set back to 'new' are read again.
my $dead = psql(q{SELECT count(*) FROM dwh.dead_letters WHERE source = 'redis'});
$redis->cli('HSET', user_id(10), 'name', 'A Hash', 'login', 'hash');
$redis->set(user_id(11),
	$json->encode({ _id => 'not-the-key', name => 'Other Id', login => 'other', update_ts_utc => '2023-09-09 10:00:00' }));
ingest_order(1000012, 10, 1, 'CLOSED', '2023-09-09 10:00:00', 1);
ingest_order(1000013, 11, 1, 'CLOSED', '2023-09-09 10:01:00', 2);
wait_for(q{SELECT state = 'missing' FROM dwh.redis_keys WHERE key = '626a81ce9a8cd1920641e210'},
	'a key holding a hash is reported missing');
wait_for(
	q{SELECT count(*) = 1 FROM stg.users
	  WHERE object_id = '626a81ce9a8cd1920641e211' AND payload->>'_id' = 'not-the-key'},
	'a value whose _id is not its key is mirrored under its key');
# A value with a menu is a restaurant, even with a login beside it.
put_restaurant(5, 'Login Cafe', '2023-09-09 09:00:00', [ 50, 'Cafe Dish', 'Cafe' ]);
$restaurants{ restaurant_id(5) }{login} = 'cafe';
$redis->set(restaurant_id(5), $json->encode($restaurants{ restaurant_id(5) }));
ingest_order(1000015, 11, 5, 'CLOSED', '2023-09-09 10:02:00', 50);
wait_for(q{SELECT count(*) = 1 FROM stg.restaurants WHERE object_id = 'a51e4e31ae4602047ec52505'},
	'a value with a menu and a login is mirrored as a restaurant');
is( psql(q{SELECT (SELECT count(*) FROM stg.users WHERE object_id = 'a51e4e31ae4602047ec52505')
               || ' ' || (SELECT kind FROM dwh.redis_keys WHERE key = 'a51e4e31ae4602047ec52505')}),
	'0 restaurant', 'not as a user');
wait_two_refreshes('the hash read again');
is(psql(q{SELECT state FROM dwh.redis_keys WHERE key = '626a81ce9a8cd1920641e210'}),
	'missing', 'the key holding a hash stays missing');
is(psql(q{SELECT count(*) FROM dwh.dead_letters WHERE source = 'redis'}),
	$dead, 'neither is dead-lettered');

my $refused = psql(q{SELECT count(*) FROM dwh.redis_keys WHERE state = 'refused'});
cmp_ok($refused, '>', 0, "$refused keys are refused");
psql(q{UPDATE dwh.redis_keys SET state = 'new' WHERE state = 'refused'});
wait_for(
	"SELECT count(*) = $dead + $refused FROM dwh.dead_letters WHERE source = 'redis'",
	'set back to new, each refused value is read again: one more dead letter each');
wait_for("SELECT count(*) = $refused FROM dwh.redis_keys WHERE state = 'refused'",
	'and refused again');

# 8. The queue missed a key (here the order's transaction empties it, as a
#    restore of DDS without dwh.redis_wanted would): with discovery off,
#    only the refresh, which compares the hubs with dwh.redis_keys, finds
#    the new user, and it is mirrored.
put_user(12, 'Unqueued User', 'unqueued', '2023-08-13 08:00:00');
$with_order = 'DELETE FROM dwh.redis_wanted;';
ingest_order(1000014, 12, 1, 'CLOSED', '2023-09-10 10:00:00', 1);
$with_order = '';
is(psql(q{SELECT count(*) FROM dwh.redis_wanted WHERE key = '626a81ce9a8cd1920641e212'}),
	'0', 'the new user is not queued');
wait_for(
	q{SELECT count(*) = 1 FROM stg.users WHERE object_id = '626a81ce9a8cd1920641e212'},
	'a refresh finds the hub missing from dwh.redis_keys and mirrors it');

check_marts('at the end');
like(
	psql("SELECT state FROM dwh.status WHERE worker = 'redis'"),
	qr/^(mirroring|refreshing|fetching)/,
	'the worker is mirroring');

$node->stop;
$redis->stop;
done_testing();
