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
#
# With all of them set, the Redis worker mirrors a menu that moves a dish
# to another category; the marts follow, the tag of a category rule is
# granted, dwh.verify() is empty, and a trigger of the test's own sees the
# worker write as the superuser, in READ COMMITTED, without JIT.

use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Time::HiRes qw(sleep);
use RedisServer;
use Test::More;

my $redis = RedisServer->new;
my $node = PostgreSQL::Test::Cluster->new('worker_settings');
$node->init(extra => [ '--encoding=UTF8', '--locale=C' ]);
$node->append_conf(
	'postgresql.conf', qq{
shared_preload_libraries = 'dwh'
dwh.database = 'shop'
dwh.redis_url = '@{[ $redis->url ]}'
dwh.redis_scan_pattern = '*'
dwh.redis_refresh_interval = 1
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

# An order of the dish, and a rule on the category it moves to.
shop(q{
SELECT dwh.ingest_order('{"object_id": 1, "object_type": "order", "sent_dttm": "2023-01-02 10:00:00", "payload": {"restaurant": {"id": "r1"}, "date": "2023-01-02 10:00:00", "user": {"id": "u1"}, "order_items": [{"id": "d1", "name": "Dolma", "price": 100, "quantity": 1}], "cost": 100, "payment": 100, "statuses": [], "final_status": "CLOSED", "update_ts": "2023-01-02 10:00:00"}}'::text);
INSERT INTO dwh.tag_rules (tag, kind, category_name) VALUES ('soup lover', 'category', 'Soups');
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
});

# The owner's settings for the database; the workers connect again.
$node->safe_psql(
	'shop', q{
SET ROLE shop_owner;
ALTER DATABASE shop SET role = 'shop_owner';
ALTER DATABASE shop SET default_transaction_isolation = 'serializable';
ALTER DATABASE shop SET default_transaction_read_only = on;
ALTER DATABASE shop SET check_function_bodies = off;
ALTER DATABASE shop SET jit = on;
ALTER DATABASE shop SET jit_above_cost = 0;
});
$node->restart;
is( $node->safe_psql('shop', 'SELECT current_user'),
	'shop_owner', 'a new session in shop runs as the owner');

$redis->set('r1', $menu->('2023-01-03 10:00:00', 'Soups'));
ok( shop_until(
		q{SELECT count(*) = 1 FROM cdm.user_category_counters WHERE category_name = 'Soups'}),
	'the worker carried the menu change into the marts')
  or diag(shop(q{SELECT worker, state, last_error FROM dwh.status}));

is(shop(q{SELECT string_agg(DISTINCT format('%s: %s, %s, read only %s, jit %s',
                                             backend, who, isolation, read_only, jit), '; ')
          FROM public.seen WHERE backend = 'dwh redis worker'}),
	'dwh redis worker: ' . $node->safe_psql('postgres', 'SELECT current_user')
	  . ', read committed, read only off, jit off',
	'the worker wrote as itself, in READ COMMITTED, read-write, without JIT');
is( shop(q{SELECT u.user_id || ': ' || t.tag
           FROM cdm.user_tags t JOIN dds.h_user u ON u.h_user_pk = t.user_id}),
	'u1: soup lover',
	'the tag of the category rule was granted by the worker');
is(shop('SELECT count(*) FROM dwh.verify()'), '0', 'dwh.verify() is empty');
is(shop(q{SELECT count(*) FROM dwh.status WHERE last_error IS NOT NULL}),
	'0', 'no worker shows an error');

$node->stop;
$redis->stop;
done_testing();
