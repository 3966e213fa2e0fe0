# Redis values larger than dwh.redis_max_value_size are never received
# whole (README, "Redis dictionaries", "Memory"): the worker reads at most
# the limit and a byte of each value, and a larger one in chunks for its
# dead letter (its first dwh.dead_letter_keep_bytes, its full length, the
# SHA-256 of all of it).  Three values of 64 MB, found by SCAN beside a
# good user: the worker's private memory (RssAnon, sampled every 20 ms)
# grows by far less than one of them; each is dead-lettered once with the
# right length and SHA-256, the user is mirrored, refreshes of unchanged
# values write nothing, and a changed large value is dead-lettered again.
# An empty string (which GETRANGE answers as it answers for no key) is a
# value, refused as such; a hash is a key of another type: missing.  A
# batch of twenty large menus is written a statement at a time.

use strict;
use warnings;

use Digest::SHA qw(sha256_hex);
use FindBin;
use lib $FindBin::RealBin;
use DwhTest qw(rss_anon_kb);
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use RedisServer;
use Test::More;
use Time::HiRes qw(usleep);

my $size = 64 * 1024 * 1024;
my $redis = RedisServer->new;

my $node = PostgreSQL::Test::Cluster->new('redis_large_values');
$node->init(extra => [ '--encoding=UTF8', '--locale=C' ]);
$node->append_conf(
	'postgresql.conf', qq{
shared_preload_libraries = 'dwh'
dwh.redis_refresh_interval = 1
dwh.redis_scan_pattern = '*'
dwh.dead_letter_keep_bytes = 1kB
});
$node->start;
$node->safe_psql('postgres', 'CREATE EXTENSION dwh');

sub psql { return $node->safe_psql('postgres', $_[0]) }

# SETRANGE past the end makes a value of $size bytes in Redis at once:
# zeros, then the byte given.
my %value_of;
foreach my $n (1 .. 3)
{
	is($redis->cli('SETRANGE', "big:$n", $size - 1, "$n"), $size,
		"value big:$n holds $size bytes");
	$value_of{"big:$n"} = ("\0" x ($size - 1)) . $n;
}
$redis->set('empty', '');
$redis->cli('HSET', 'hash', 'field', 'value');
my $user = '626a81ce9a8cd1920641e201';
$redis->set($user,
	qq({"_id": "$user", "name": "Large Values", "login": "large", "update_ts_utc": "2023-08-11 16:44:59"})
);

my $url = $redis->url;
psql("ALTER SYSTEM SET dwh.redis_url = '$url'");
ok( $node->poll_query_until('postgres',
		"SELECT pid IS NOT NULL AND state = 'idle: dwh.redis_url is empty' FROM dwh.status WHERE worker = 'redis'"
	),
	'the Redis worker waits for its URL');
my $pid = psql("SELECT pid FROM dwh.status WHERE worker = 'redis'");
my $before_kb = rss_anon_kb($pid);
psql('SELECT pg_reload_conf()');

# Sample the worker's memory until the three dead letters are written.
my $peak_kb = $before_kb;
my $deadline = time() + 120;
while (time() < $deadline)
{
	my $kb = rss_anon_kb($pid);
	$peak_kb = $kb if defined $kb && $kb > $peak_kb;
	last
	  if psql(
		"SELECT count(*) FROM dwh.dead_letters WHERE source_key LIKE 'big:%'") ==
	  3;
	usleep(20_000);
}
note "Redis worker RssAnon: $before_kb kB before, $peak_kb kB at most";
is(psql("SELECT count(*) FROM dwh.dead_letters WHERE source_key LIKE 'big:%'"),
	'3', 'each large value is dead-lettered');
cmp_ok(
	$peak_kb - $before_kb,
	'<', 24 * 1024,
	'the worker grew by less than 24 MB reading three values of 64 MB');
is(rss_anon_kb($pid) ? 'alive' : 'gone', 'alive', 'the worker did not restart');

my $expected = join("\n",
	map { "$_|$size|" . sha256_hex($value_of{$_}) . '|1024|54000|t' }
	  sort keys %value_of);
is( psql(
		q{SELECT source_key, raw_length, encode(raw_sha256, 'hex'), length(raw), sqlstate,
		         reason LIKE 'value of % bytes exceeds dwh.redis_max_value_size (1048576 bytes)'
		  FROM dwh.dead_letters WHERE source_key LIKE 'big:%' ORDER BY source_key}),
	$expected,
	'each dead letter keeps the first 1 kB, the full length and the SHA-256 of the whole value');
is( psql(
		"SELECT string_agg(key || ':' || state, ',' ORDER BY key) FROM dwh.redis_keys"),
	"$user:mirrored,big:1:refused,big:2:refused,big:3:refused,empty:refused,hash:missing",
	'the user is mirrored, the large values and the empty one refused, the hash missing');
is( psql(
		"SELECT raw_length || '|' || sqlstate FROM dwh.dead_letters WHERE source_key = 'empty'"),
	'0|22032',
	'the empty value is dead-lettered as a value');
is(psql("SELECT payload->>'login' FROM stg.users WHERE object_id = '$user'"),
	'large', 'the user is in STG');

# Refreshes of unchanged values write nothing.
my $refreshes = psql("SELECT refreshes FROM dwh.status WHERE worker = 'redis'");
ok( $node->poll_query_until('postgres',
		"SELECT refreshes >= $refreshes + 2 FROM dwh.status WHERE worker = 'redis'"),
	'two more refreshes');
is(psql("SELECT count(*) FROM dwh.dead_letters WHERE source = 'redis'"),
	'4', 'no new dead letter for unchanged large values');

# A changed large value is judged again: one more dead letter.
$redis->cli('SETRANGE', 'big:2', 0, 'x');
substr($value_of{'big:2'}, 0, 1) = 'x';
ok( $node->poll_query_until('postgres',
		"SELECT count(*) = 5 FROM dwh.dead_letters WHERE source = 'redis'"),
	'the changed large value is dead-lettered again');
is( psql(
		"SELECT raw_length || '|' || encode(raw_sha256, 'hex') FROM dwh.dead_letters WHERE source = 'redis' ORDER BY id DESC LIMIT 1"
	),
	"$size|" . sha256_hex($value_of{'big:2'}),
	'with the SHA-256 of its new bytes');
cmp_ok(rss_anon_kb($pid) - $before_kb,
	'<', 24 * 1024, 'and the worker still holds none of them');

# A batch of large valid menus: what writing one costs lasts until its
# statement ends (some 200 MB for one of these), so the worker writes at
# most dwh.redis_max_value_size of values in one statement.  Twenty
# restaurants of 12,000 dishes (about 0.9 MB each, under the 1 MB limit)
# changed at once: the worker's private memory grows by about 310 MB, where
# one statement of all twenty took about 560 MB.
my $menus = 20;
# All in one batch: no refresh pass while they are written to Redis.
psql(q{ALTER SYSTEM SET dwh.redis_refresh_interval = '1h'; SELECT pg_reload_conf()});
my $passes = psql(q{SELECT refreshes FROM dwh.status WHERE worker = 'redis'});
foreach my $r (1 .. $menus)
{
	my $menu = join(',',
		map { qq({"_id": "m$r-$_", "name": "dish $_", "price": 100, "category": "c@{[ $_ % 3000 ]}"}) }
		  0 .. 11_999);
	$redis->set("menu:$r",
		qq({"_id": "menu:$r", "name": "Menu $r", "update_ts_utc": "2023-08-11 16:44:59", "menu": [$menu]}));
}
is(psql(q{SELECT refreshes FROM dwh.status WHERE worker = 'redis'}),
	$passes, 'no refresh pass while the menus were written');
$before_kb = rss_anon_kb($pid);
$peak_kb = $before_kb;
psql(q{ALTER SYSTEM SET dwh.redis_refresh_interval = '1s'; SELECT pg_reload_conf()});
$deadline = time() + 300;
while (time() < $deadline)
{
	my $kb = rss_anon_kb($pid);
	$peak_kb = $kb if defined $kb && $kb > $peak_kb;
	last
	  if psql("SELECT count(*) FROM stg.restaurants WHERE object_id LIKE 'menu:%'") == $menus;
	usleep(20_000);
}
is(psql("SELECT count(*) || '|' || sum(jsonb_array_length(payload->'menu')) FROM stg.restaurants WHERE object_id LIKE 'menu:%'"),
	"$menus|" . ($menus * 12_000), "the $menus large menus are in STG");
note(sprintf('the worker grew by %.0f MB writing them', ($peak_kb - $before_kb) / 1024));
cmp_ok(($peak_kb - $before_kb) / 1024, '<', 450,
	'writing them, the worker grows by far less than a statement of all of them costs');
is(psql('SELECT count(*) FROM dwh.verify()'), '0', 'dwh.verify() is empty');

$node->stop;
$redis->stop;
done_testing();
