# The settings of the database the workers serve do not reach them.  Its
# owner, an ordinary role, can set parameters for it (ALTER DATABASE ...
# SET) that every new session takes, the workers' included; the workers
# run as the bootstrap superuser, and override what would make them
# misbehave (src/dwh_settings.c, dwh_worker_settings):
#
#   role = the owner                      the workers would act as the owner
#   default_transaction_isolation =       a batch would count from a snapshot
#     'serializable'                      older than the locks it waited for
#   default_transaction_read_only = on    every write refused
#   check_function_bodies = off           what a restore sets: the tags
#                                         would not be maintained
#   jit = on, jit_above_cost = 0          a plan compiled at each execution
#   search_path = public, pg_catalog      look-alikes of what dwh calls,
#     (test/search_path_traps.sql)        planted in public by the owner,
#                                         that make the owner a superuser
#   session_authorization = the owner     what a client's login overrides
#                                         but a worker's connection did
#                                         not: the workers ran as the owner
#   exit_on_error = on                    the error of a bad message, caught
#                                         to dead-letter it, ended the
#                                         worker, again at each restart
#   session_replication_role = replica    (a superuser's) STG's triggers
#                                         did not fire: every order a dead
#                                         letter, no menu carried
#
# With all of them set, the Redis worker mirrors a menu that moves a dish
# to another category, and a Kafka worker applies an order from a mock
# cluster; the marts follow, the tags of a category rule and of an
# all-orders rule are granted, the tags worker hands the grants to the
# feed's topic, dwh.verify() is empty, a trigger of the test's own sees
# each of the three workers write as the superuser, in READ COMMITTED,
# read-write, without JIT, and no trap sprang (test/t/023 plants the same
# ones before the Redis worker and the SQL entry points alone).  A bad
# value before each good one (a NUL in the text, refused by jsonb) is a
# dead letter, and the workers that met them did not exit.

use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Time::HiRes qw(sleep);
use DwhTest;
use RedisServer;
use Test::More;

my $redis = RedisServer->new;
my $mock = start_mock_cluster(brokers => 1, partitions => 1);
mock_command($mock, 'create-topic user-tags 1');
my $node = PostgreSQL::Test::Cluster->new('worker_settings');
$node->init(extra => [ '--encoding=UTF8', '--locale=C' ]);
$node->append_conf(
	'postgresql.conf', qq{
shared_preload_libraries = 'dwh'
dwh.database = 'shop'
dwh.redis_url = '@{[ $redis->url ]}'
dwh.redis_scan_pattern = '*'
dwh.redis_refresh_interval = 1
dwh.kafka_brokers = '$mock->{bootstrap}'
dwh.kafka_consumers = 1
dwh.tags_topic = 'user-tags'
});
$node->start;

$node->safe_psql('postgres', q{
CREATE ROLE shop_owner LOGIN;
CREATE DATABASE shop OWNER shop_owner;
});
$node->safe_psql('shop', 'CREATE EXTENSION dwh');

# The test's own sessions in shop undo the database's settings first.
sub shop
{
	my ($sql) = @_;
	return $node->safe_psql('shop',
		"SET ROLE NONE; SET default_transaction_isolation = 'read committed'; "
		  . "SET default_transaction_read_only = off; SET check_function_bodies = on; "
		  . "SET search_path = pg_catalog, public; "
		  . $sql);
}

# Wait until sql, run by shop(), returns t.
sub shop_until
{
	my ($sql) = @_;
	foreach (1 .. 10 * $PostgreSQL::Test::Utils::timeout_default)
	{
		return 1 if shop($sql) eq 't';
		sleep 0.1;
	}
	return 0;
}

my $menu = sub {
	my ($ts, $category) = @_;
	return qq{{"_id": "r1", "name": "Kubdari", "update_ts_utc": "$ts", "menu": [{"_id": "d1", "name": "Dolma", "price": 100, "category": "$category"}]}};
};
$redis->set('r1', $menu->('2023-01-01 10:00:00', 'Starters'));
ok( $node->poll_query_until('shop', 'SELECT count(*) = 1 FROM stg.restaurants'),
	'the Redis worker mirrored the first menu');

# An order of the dish (object_id n, on day d of January 2023).
my $order = sub {
	my ($n, $d) = @_;
	return qq{{"object_id": $n, "object_type": "order", "sent_dttm": "2023-01-0$d 10:00:00", "payload": {"restaurant": {"id": "r1"}, "date": "2023-01-0$d 10:00:00", "user": {"id": "u1"}, "order_items": [{"id": "d1", "name": "Dolma", "price": 100, "quantity": 1}], "cost": 100, "payment": 100, "statuses": [], "final_status": "CLOSED", "update_ts": "2023-01-0$d 10:00:00"}}};
};

# The first order, a rule on the category the dish moves to, and one that
# the second order (from Kafka) reaches.
shop(qq{
SELECT dwh.ingest_order('@{[ $order->(1, 2) ]}'::text);
INSERT INTO dwh.tag_rules (tag, kind, category_name) VALUES ('soup lover', 'category', 'Soups');
INSERT INTO dwh.tag_rules (tag, kind, threshold) VALUES ('regular', 'all_orders', 2);
});

# What the worker's writes see, through a superuser's trigger.
shop(q{
CREATE TABLE public.seen (backend text, who text, isolation text, read_only text, jit text);
CREATE FUNCTION public.note() RETURNS trigger LANGUAGE plpgsql SET search_path = pg_catalog AS $$
BEGIN
    INSERT INTO public.seen
    SELECT a.backend_type, current_user, current_setting('transaction_isolation'),
           current_setting('transaction_read_only'), current_setting('jit')
    FROM pg_stat_activity a WHERE a.pid = pg_backend_pid();
    RETURN NULL;
END $$;
CREATE TRIGGER note AFTER INSERT OR UPDATE ON stg.restaurants
    FOR EACH STATEMENT EXECUTE FUNCTION public.note();
CREATE TRIGGER note AFTER INSERT OR UPDATE ON stg.order_events
    FOR EACH STATEMENT EXECUTE FUNCTION public.note();
CREATE TRIGGER note AFTER DELETE ON dwh.tag_outbox
    FOR EACH STATEMENT EXECUTE FUNCTION public.note();
});

# The owner's traps and settings for the database; the workers connect
# again.
$node->safe_psql('shop',
	"SET ROLE shop_owner;\n" . slurp_file("$FindBin::RealBin/../search_path_traps.sql"));
$node->safe_psql(
	'shop', q{
SET ROLE shop_owner;
ALTER DATABASE shop SET search_path = public, pg_catalog;
ALTER DATABASE shop SET role = 'shop_owner';
ALTER DATABASE shop SET default_transaction_isolation = 'serializable';
ALTER DATABASE shop SET default_transaction_read_only = on;
ALTER DATABASE shop SET check_function_bodies = off;
ALTER DATABASE shop SET jit = on;
ALTER DATABASE shop SET jit_above_cost = 0;
ALTER DATABASE shop SET session_authorization = 'shop_owner';
ALTER DATABASE shop SET exit_on_error = on;
});
# And a superuser's: STG's triggers would not fire for the workers.
$node->safe_psql('postgres', 'ALTER DATABASE shop SET session_replication_role = replica');
$node->restart;
is( $node->safe_psql('shop', 'SELECT current_user'),
	'shop_owner', 'a new session in shop runs as the owner');

my $worker_pids = sub {
	return shop(q{SELECT string_agg(pid::text, ',' ORDER BY backend_type)
                  FROM pg_stat_activity WHERE backend_type LIKE 'dwh % worker'});
};
ok( shop_until(
		q{SELECT count(*) = 3 FROM pg_stat_activity WHERE backend_type LIKE 'dwh % worker'}),
	'the three workers are connected');
my $pids_before = $worker_pids->();
$redis->set('r0',
	'{"_id": "r0", "name": "Bad\\u0000", "update_ts_utc": "2023-01-01 10:00:00", "menu": []}');
$redis->set('r1', $menu->('2023-01-03 10:00:00', 'Soups'));
ok( shop_until(
		q{SELECT count(*) = 1 FROM cdm.user_category_counters WHERE category_name = 'Soups'}),
	'the worker carried the menu change into the marts')
  or diag(shop(q{SELECT worker, state, last_error FROM dwh.status}));

# The second order, through Kafka: the all-orders rule's threshold.
my $file = "$PostgreSQL::Test::Utils::tmp_check/worker_settings_order.txt";
open(my $fh, '>', $file) or die "could not write $file: $!";
my $bad = $order->(3, 4);
$bad =~ s/"u1"/"u\\u0000"/;
print $fh $bad, "\n", $order->(2, 4), "\n";
close($fh);
produce($mock, $file);
ok( shop_until(
		q{SELECT count(*) = 1 FROM cdm.user_order_counters WHERE order_cnt = 2}),
	'the Kafka worker applied the order')
  or diag(shop(q{SELECT worker, state, last_error FROM dwh.status}));
ok(shop_until(q{SELECT NOT EXISTS (SELECT FROM dwh.tag_outbox)}),
	'the tags worker handed every tag event to the broker')
  or diag(shop(q{SELECT worker, state, last_error FROM dwh.status}));

my $superuser = $node->safe_psql('postgres', 'SELECT current_user');
foreach my $worker ('dwh redis worker', 'dwh kafka worker', 'dwh tags worker')
{
	is( shop(qq{SELECT string_agg(DISTINCT format('%s, %s, read only %s, jit %s',
                                                   who, isolation, read_only, jit), '; ')
                FROM public.seen WHERE backend = '$worker'}),
		"$superuser, read committed, read only off, jit off",
		"the $worker wrote as itself, in READ COMMITTED, read-write, without JIT");
}
is( shop(q{SELECT string_agg(u.user_id || ': ' || t.tag, ', ' ORDER BY t.tag)
           FROM cdm.user_tags t JOIN dds.h_user u ON u.h_user_pk = t.user_id}),
	'u1: regular, u1: soup lover',
	'the tags of both rules were granted by the workers');
is( shop(q{SELECT string_agg(source || ' ' || sqlstate, ', ' ORDER BY source)
           FROM dwh.dead_letters}),
	'kafka 22P05, redis 22P05',
	'the bad Kafka message and the bad Redis value are dead letters');
is($worker_pids->(), $pids_before, 'no worker exited');
is(shop('SELECT count(*) FROM dwh.verify()'), '0', 'dwh.verify() is empty');
is(shop(q{SELECT count(*) FROM dwh.status WHERE last_error IS NOT NULL}),
	'0', 'no worker shows an error');
is(shop(q{SELECT coalesce(string_agg(what || ' by ' || by_whom, ', '), '') FROM public.sprung}),
	'', 'no trap sprang');
is($node->safe_psql('postgres', q{SELECT rolsuper FROM pg_roles WHERE rolname = 'shop_owner'}),
	'f', 'the owner is still an ordinary role');

$node->stop;
$redis->stop;
stop_mock_cluster($mock);
done_testing();
