# dwh.redis_key_pattern: the Redis keys the worker may read.
#
# A. The trust boundary.  Whoever may load orders chooses the ids they
#    name, and so which Redis keys the worker reads.  With a pattern that
#    matches the dictionaries' ids only, an order naming another key
#    ("session:...") gets its order applied, but the key is never asked
#    of Redis (MONITOR sees no command naming it), nothing of its value
#    lands in STG or dwh.dead_letters, and dwh.redis_keys says why.  A
#    reload that widens the pattern has the key read at once, without
#    waiting for the next refresh.  Malformed patterns are refused when
#    set.
# B. Redis's own fence: with an ACL that lets the worker's user read the
#    dictionaries' keys only, a key an order names that the ACL refuses
#    (NOPERM) is excluded the same way, with Redis's reason; the keys of
#    the same batch are mirrored, the worker shows no error, and refresh
#    passes that are refused again write nothing.
# C. The pattern language is Redis's own: on keys with every special byte
#    of the language (and a two-byte character), for seeded random
#    patterns, the keys the worker mirrors are exactly those SCAN MATCH of
#    the same pattern returns.  A failure prints the seed, the pattern and
#    one key on which the two disagree.
#
# Environment: DWH_KEY_PATTERN_SEED (default: from the clock, printed).

use strict;
use warnings;
use utf8;

use Encode qw(encode_utf8);
use FindBin;
use IPC::Run;
use JSON::PP;
use lib $FindBin::RealBin;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use RedisServer;
use Test::More;
use Time::HiRes qw(usleep);

my $json = JSON::PP->new->utf8->canonical;
my $redis = RedisServer->new;

my $node = PostgreSQL::Test::Cluster->new('redis_key_pattern');
$node->init(extra => [ '--encoding=UTF8', '--locale=C' ]);
$node->append_conf(
	'postgresql.conf', q{
shared_preload_libraries = 'dwh'
dwh.redis_refresh_interval = 3600
dwh.redis_key_pattern = '[0-9a-f][0-9a-f][0-9a-f][0-9a-f]*'
});
$node->start;
$node->safe_psql('postgres', 'CREATE EXTENSION dwh');

sub psql { return $node->safe_psql('postgres', $_[0]) }

sub wait_for
{
	my ($sql, $what) = @_;
	ok($node->poll_query_until('postgres', $sql), $what)
	  or diag(psql("SELECT state, keys_mirrored, keys_missing, refreshes, last_error FROM dwh.status WHERE worker = 'redis'"));
}

sub set_setting
{
	my ($name, $value) = @_;
	psql(encode_utf8("ALTER SYSTEM SET $name = '$value'"));
	psql('SELECT pg_reload_conf()');
}

sub refreshes
{
	return psql("SELECT refreshes FROM dwh.status WHERE worker = 'redis'");
}

sub put_user
{
	my ($key) = @_;
	$redis->set(encode_utf8($key),
		$json->encode(
			{
				_id => $key,
				name => "User $key",
				login => "login $key",
				update_ts_utc => '2023-04-01 10:00:00'
			}));
}

sub ingest_order
{
	my ($id, $user) = @_;
	my $msg = $json->encode(
		{
			object_id => $id,
			object_type => 'order',
			sent_dttm => '2023-04-01 10:00:00',
			payload => {
				restaurant => { id => 'a51e4e31ae4602047ec52501' },
				date => '2023-04-01 10:00:00',
				user => { id => $user },
				order_items => [
					{
						id => '6276e8cd0cf48b4cded00001',
						name => 'Dish 1',
						price => 100,
						quantity => 1
					}
				],
				bonus_payment => 0,
				cost => 100,
				payment => 100,
				bonus_grant => 0,
				statuses => [ { status => 'CLOSED', dttm => '2023-04-01 10:00:00' } ],
				final_status => 'CLOSED',
				update_ts => '2023-04-01 10:00:00'
			}
		});
	is(psql("SELECT dwh.ingest_order(\$m\$$msg\$m\$)"),
		'applied', "order $id naming user $user applied");
}

# --- A. The trust boundary ---------------------------------------------

my $dict_user = '626a81ce9a8cd1920641e201';
my $foreign = 'session:8f14e45f';
my $secret = 'token-of-another-application';
put_user($dict_user);
$redis->set($foreign, $secret);

# Every command Redis receives from now on.
my ($monitor_out, $monitor_err) = ('', '');
my $monitor = IPC::Run::start(
	[
		'redis-cli', '-h', '127.0.0.1', '-p', $redis->port,
		'-a', $redis->password, '--no-auth-warning', 'MONITOR'
	],
	'<', \undef, '>', \$monitor_out, '2>', \$monitor_err);
until ($monitor_out =~ /OK/ || !$monitor->pumpable)
{
	$monitor->pump_nb;
	usleep(10_000);
}

set_setting('dwh.redis_url', $redis->url);
ingest_order(1, $dict_user);
ingest_order(2, $foreign);

wait_for(
	"SELECT state = 'mirrored' FROM dwh.redis_keys WHERE key = '$dict_user'",
	'the dictionary id an order named is mirrored');
wait_for(
	"SELECT state = 'excluded' FROM dwh.redis_keys WHERE key = '$foreign'",
	'the key outside dwh.redis_key_pattern is excluded');
is( psql("SELECT reason FROM dwh.redis_keys WHERE key = '$foreign'"),
	'dwh.redis_key_pattern does not match the key: its value is not read',
	'dwh.redis_keys says why the key is not read');
is(psql("SELECT value_hash IS NULL FROM dwh.redis_keys WHERE key = '$foreign'"),
	't', 'no hash of a value never read');
is(psql('SELECT count(*) FROM dwh.dead_letters'),
	'0', 'nothing of the excluded value in dwh.dead_letters');
is(psql("SELECT count(*) FROM stg.users WHERE object_id = '$foreign'"),
	'0', 'nothing of it in stg.users');
wait_for(
	"SELECT keys_mirrored = 1 AND keys_missing = 2 FROM dwh.status WHERE worker = 'redis'",
	'dwh.status counts the excluded key among the keys not mirrored (with the missing restaurant)');
is(psql('SELECT order_cnt FROM cdm.user_product_counters ORDER BY 1'),
	"1\n1", 'both orders counted in the product mart');
is(psql('SELECT count(*) FROM dwh.verify()'), '0', 'dwh.verify() is empty');

# The worker asked Redis for the dictionary's key, never for the other:
# what MONITOR printed up to a sentinel sent after both were handled.
$redis->cli('ECHO', 'sentinel-060');
until ($monitor_out =~ /sentinel-060/ || !$monitor->pumpable)
{
	$monitor->pump_nb;
	usleep(10_000);
}
like($monitor_out, qr/"GETRANGE" "\Q$dict_user\E"/,
	'MONITOR saw the dictionary key read');
unlike($monitor_out, qr/\Q$foreign\E/,
	'MONITOR saw no command naming the excluded key');

# Malformed patterns are refused when set, the setting unchanged.
for my $bad ([ '', 'empty' ], [ '[abc', 'unclosed class' ],
	[ '[a-]', 'class whose "-" takes its "]"' ], [ 'abc\\', 'trailing backslash' ])
{
	my ($ret, $out, $err) = $node->psql('postgres',
		"ALTER SYSTEM SET dwh.redis_key_pattern = '$bad->[0]'");
	isnt($ret, 0, "pattern refused: $bad->[1]");
	like($err, qr/invalid value for parameter "dwh.redis_key_pattern"/,
		"the error names the setting: $bad->[1]");
	like($err, qr/DETAIL:  .+/, "the error says why: $bad->[1]");
}
is(psql('SHOW dwh.redis_key_pattern'), '[0-9a-f][0-9a-f][0-9a-f][0-9a-f]*',
	'the setting is unchanged');

# A wider pattern: the key is read at once (the refresh interval is an
# hour), and its value judged like any other.
set_setting('dwh.redis_key_pattern', '*');
wait_for(
	"SELECT state = 'refused' FROM dwh.redis_keys WHERE key = '$foreign'",
	'a reload that widens the pattern has the key read at once');
is( psql(
		"SELECT convert_from(raw, 'UTF8') FROM dwh.dead_letters WHERE source_key = '$foreign'"
	),
	$secret,
	'its value, of no known shape, is then a dead letter');
$monitor->kill_kill;

# --- B. Redis's own fence: an ACL ---------------------------------------
# (One key must not stop the worker: whoever loads orders names them.)
$redis->cli('ACL', 'SETUSER', 'dwh', 'on', '>acl-password', '~[0-9a-f]*',
	'+getrange', '+exists', '+strlen', '+watch', '+multi', '+exec', '+scan',
	'+select', '+ping');
my $denied = 'tmp:42';
my $second_user = '626a81ce9a8cd1920641e202';
$redis->set($denied, 'cached bytes');
put_user($second_user);
set_setting('dwh.redis_url',
	'redis://dwh:acl-password@127.0.0.1:' . $redis->port . '/0');
my $waited = 0;
until ($redis->cli('CLIENT', 'LIST') =~ /\buser=dwh\b/ || $waited++ > 300)
{
	usleep(100_000);
}
ok($waited <= 300, 'the worker connected as the ACL user');
ingest_order(3, $denied);
ingest_order(4, $second_user);
wait_for(
	"SELECT state = 'mirrored' FROM dwh.redis_keys WHERE key = '$second_user'",
	'a user named beside a key the ACL refuses is mirrored');
like(psql("SELECT state || ': ' || reason FROM dwh.redis_keys WHERE key = '$denied'"),
	qr/^excluded: Redis does not let the worker's user read the key: NOPERM/,
	'the key the ACL refuses is excluded, with Redis\'s reason');
is(psql("SELECT count(*) FROM dwh.dead_letters WHERE source_key = '$denied'"),
	'0', 'nothing of it in dwh.dead_letters');
wait_for(
	"SELECT last_error IS NULL AND state = 'mirroring' FROM dwh.status WHERE worker = 'redis'",
	'the worker shows no error');
my $excluded_at = psql(
	"SELECT changed_at FROM dwh.redis_keys WHERE key = '$denied'");
my $r = refreshes() + 2;
set_setting('dwh.redis_refresh_interval', '1');
wait_for("SELECT refreshes >= $r FROM dwh.status WHERE worker = 'redis'",
	'two refresh passes with the ACL');
is(psql("SELECT changed_at FROM dwh.redis_keys WHERE key = '$denied'"),
	$excluded_at, 'refreshes that find it refused again write nothing');

# A command the ACL refuses is the settings' fault, not the keys': an
# error in dwh.status, and no key excluded for it.
my $excluded = psql("SELECT count(*) FROM dwh.redis_keys WHERE state = 'excluded'");
$redis->cli('ACL', 'SETUSER', 'dwh', '-getrange');
put_user('626a81ce9a8cd1920641e203');
ingest_order(5, '626a81ce9a8cd1920641e203');
wait_for(
	"SELECT last_error LIKE '%NOPERM%getrange%' FROM dwh.status WHERE worker = 'redis'",
	'without +getrange the worker shows the refusal as its error');
is(psql("SELECT count(*) FROM dwh.redis_keys WHERE state = 'excluded'"),
	$excluded, 'and excludes no key for it');
like(psql("SELECT last_error FROM dwh.status WHERE worker = 'redis'"),
	qr{^Redis at redis://dwh:\*\*\*\@127\.0\.0\.1:\d+/0 refused GETRANGE: NOPERM},
	'the error names the command');

# Back to the default user: a new URL connects at once.
set_setting('dwh.redis_url', $redis->url);
wait_for(
	"SELECT state = 'mirrored' FROM dwh.redis_keys WHERE key = '626a81ce9a8cd1920641e203'",
	'with the default user the user is mirrored');

# --- C. The same language as Redis's SCAN MATCH -------------------------

my $seed = $ENV{DWH_KEY_PATTERN_SEED}
  // (int(time() * 1000) ^ ($$ << 10)) % 1000000000;
diag("060_redis_key_pattern: seed $seed (DWH_KEY_PATTERN_SEED=$seed to repeat)");
srand($seed);

# Keys of the bytes the language gives a meaning to, and 'é' (two bytes).
my @chars = ('a', 'b', 'c', 'x', '1', '2', '-', ':', '[', ']', '\\', '?', '*', '^', 'é');
my %keys;
while (keys %keys < 40)
{
	my $len = 1 + int(rand(5));
	$keys{ join('', map { $chars[ int(rand(@chars)) ] } 1 .. $len) } = 1;
}
$redis->cli('FLUSHDB');
put_user($_) for sort keys %keys;

sub random_member
{
	my @plain = ('a', 'b', 'c', 'x', '1', '2', ':');
	my $r = rand();
	return $plain[ int(rand(@plain)) ] . '-' . $plain[ int(rand(@plain)) ]
	  if $r < 0.3;
	return '\\' . $chars[ int(rand(@chars)) ] if $r < 0.45;
	return $plain[ int(rand(@plain)) ];
}

sub random_token
{
	my $r = rand();
	return '*' if $r < 0.25;
	return '?' if $r < 0.4;
	return '[' . (rand() < 0.3 ? '^' : '')
	  . join('', map { random_member() } 1 .. 1 + int(rand(3))) . ']'
	  if $r < 0.6;
	my $c = $chars[ int(rand(@chars)) ];
	return $c =~ /^[*?\[\]\\]$/ ? "\\$c" : $c;
}

# A pattern made from a key, so that it matches some: each character
# kept (escaped when special), made "?", "*" or a class holding it.
sub pattern_from_key
{
	my @k = sort keys %keys;
	my $pattern = '';
	for my $c (split //, $k[ int(rand(@k)) ])
	{
		my $r = rand();
		if ($r < 0.15) { $pattern .= '?'; }
		elsif ($r < 0.3) { $pattern .= '*'; }
		elsif ($r < 0.5 && $c =~ /^[abcx12:]$/)
		{
			$pattern .= '[' . (rand() < 0.2 ? '^' : '') . random_member() . $c . ']';
		}
		else { $pattern .= $c =~ /^[*?\[\]\\]$/ ? "\\$c" : $c; }
	}
	return $pattern;
}

set_setting('dwh.redis_scan_pattern', '*');
set_setting('dwh.redis_refresh_interval', '1');
my @patterns = ('*', '?', '??', '*\\**', '[\\[\\]]*', '*é', '?é*', '[^a-c]*');
push @patterns, join('', map { random_token() } 1 .. 1 + int(rand(4)))
  for 1 .. 8;
push @patterns, pattern_from_key() for 1 .. 12;

for my $pattern (@patterns)
{
	my $before = refreshes();
	(my $sql_pattern = $pattern) =~ s/'/''/g;
	set_setting('dwh.redis_key_pattern', $sql_pattern);
	# The reload reaches the worker within a pass or two: three passes.
	my $after = $before + 3;
	wait_for("SELECT refreshes >= $after FROM dwh.status WHERE worker = 'redis'",
		"refresh passes with the pattern $pattern");

	my %scan = map { $_ => 1 } grep { $_ ne '' } split /\n/,
	  $redis->cli('--scan', '--pattern', encode_utf8($pattern));
	my %mirrored = map { $_ => 1 } grep { $_ ne '' } split /\n/,
	  psql("SELECT key FROM dwh.redis_keys WHERE state = 'mirrored'");
	my @differ = grep { ($scan{ encode_utf8($_) } // 0) != ($mirrored{ encode_utf8($_) } // 0) }
	  sort keys %keys;
	ok(!@differ, "pattern $pattern: the worker mirrors what SCAN MATCH returns ("
		  . scalar(keys %scan) . ' keys)')
	  or diag("seed $seed: pattern '$pattern', key '$differ[0]': SCAN MATCH "
		  . ($scan{ encode_utf8($differ[0]) } ? 'returns it' : 'does not')
		  . ', the worker '
		  . ($mirrored{ encode_utf8($differ[0]) } ? 'mirrors it' : 'does not'));
}
is(psql('SELECT count(*) FROM dwh.verify()'), '0', 'dwh.verify() is empty');

$redis->stop;
$node->stop;
done_testing();
