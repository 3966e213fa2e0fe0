# Redis keys that cannot be text, and the last error of a recovered worker
# (issue 12, points 2 and 8).
#
# 1. A wrong password, a server whose error reply is not UTF-8, then the
#    right server: dwh.status shows valid UTF-8, and once the worker has
#    connected and done a pass, last_error is empty again.  The wrong
#    password is '*', which occurs in the "***" that stands for a password
#    in every message naming Redis.
# 2. Keys found by SCAN that are not valid UTF-8 (0xff, a surrogate encoded
#    in UTF-8, overlong forms), that hold a NUL byte ("u1\0x" next to a
#    real "u1"), that are empty (SCAN returns it; the worker left it unread
#    and uncounted) or that are longer than 128 bytes are dead-lettered once,
#    with the key's bytes in raw and no source_key, however many refresh
#    passes find them again, and again once the dead letters are deleted;
#    the log counts them; no text column holds them; the valid keys
#    beside them (a 128-byte one, a Cyrillic one) are mirrored.
# 3. pg_dump -Fc, then pg_restore into a fresh database: every table of
#    stg, dds, cdm and dwh holds the same rows, but for the load-time
#    columns of docs/data-rule.md.

use strict;
use warnings;
use utf8;

use Digest::SHA qw(sha256_hex);
use Encode qw(encode_utf8);
use FindBin;
use IO::Socket::INET;
use IPC::Run;
use JSON::PP;
use lib $FindBin::RealBin;
use POSIX ();
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use RedisServer;
use Test::More;

my $json = JSON::PP->new->utf8->canonical;
my $redis = RedisServer->new(password => 'hostile-keys-pw');

my $node = PostgreSQL::Test::Cluster->new('redis_hostile_keys');
$node->init(extra => [ '--encoding=UTF8', '--locale=C' ]);
$node->append_conf(
	'postgresql.conf', q{
shared_preload_libraries = 'dwh'
dwh.redis_refresh_interval = 1
dwh.redis_batch_size = 3
dwh.redis_scan_pattern = '*'
dwh.redis_timeout = 1000
dwh.dead_letter_keep_bytes = 1kB
} . "dwh.redis_url = '" . $redis->url(password => '*') . "'\n");
$node->start;
$node->safe_psql('postgres', 'CREATE EXTENSION dwh');

sub psql { return $node->safe_psql('postgres', $_[0]) }

sub redis_row
{
	my ($columns) = @_;
	return psql("SELECT $columns FROM dwh.status WHERE worker = 'redis'");
}

sub wait_for
{
	my ($sql, $what) = @_;
	ok($node->poll_query_until('postgres', $sql), $what)
	  or diag(redis_row('state, refreshes, last_error'));
}

# Wait for two more refresh passes than now: one that may have started
# before a change, one that surely saw it.
sub wait_two_refreshes
{
	my ($what) = @_;
	my $r = redis_row('refreshes') + 2;
	wait_for("SELECT refreshes >= $r FROM dwh.status WHERE worker = 'redis'",
		"two refresh passes: $what");
}

sub user_id { sprintf('626a81ce9a8cd1920641e2%02d', $_[0]) }
sub restaurant_id { sprintf('a51e4e31ae4602047ec525%02d', $_[0]) }
sub dish_id { sprintf('6276e8cd0cf48b4cded00%03d', $_[0]) }

sub user_value
{
	my ($name, $login) = @_;
	return $json->encode({ _id => user_id(9), name => $name, login => $login,
		update_ts_utc => '2023-08-11 16:44:59' });
}

sub ingest_order
{
	my ($id, $user, @dishes) = @_;
	my $ts = '2023-09-01 10:00:00';
	my $msg = $json->encode({ object_id => $id, object_type => 'order', sent_dttm => $ts,
		payload => { restaurant => { id => restaurant_id(1) }, date => $ts,
			user => { id => $user },
			order_items => [ map { { id => dish_id($_), name => "Dish $_", price => 100,
				quantity => 1 } } @dishes ],
			bonus_payment => 0, cost => 100 * @dishes, payment => 100 * @dishes,
			bonus_grant => 0, statuses => [ { status => 'CLOSED', dttm => $ts } ],
			final_status => 'CLOSED', update_ts => $ts } });
	# Bytes, as a Kafka message would be.
	my $hex = unpack('H*', $msg);
	is(psql("SELECT dwh.ingest_order(decode('$hex', 'hex'))"),
		'applied', "order $id applied");
}

# Valid keys: a user, a restaurant, "u1", a Cyrillic key and a key of 128
# bytes, the longest accepted.
my $cyrillic_id = "пользователь-7";
my $cyrillic = encode_utf8($cyrillic_id);
my $k128 = 'K' x 128;
$redis->set(user_id(1), user_value('User one', 'user1'));
$redis->set_bytes('u1', user_value('Real u1', 'u1'));
$redis->set_bytes($cyrillic, user_value('Пользователь', 'user7'));
$redis->set_bytes($k128, user_value('Long key', 'k128'));
$redis->set(
	restaurant_id(1),
	$json->encode({ _id => restaurant_id(1), name => 'Restaurant',
		update_ts_utc => '2023-08-11 16:50:44',
		menu => [
			{ _id => dish_id(1), name => 'Dish 1', price => 100, category => 'Soups' },
			{ _id => dish_id(2), name => 'Dish 2', price => 100, category => 'Salads' } ] }));
# A valid key whose value is not UTF-8: a dead letter of a value.
$redis->set_bytes('badvalue', "{\"login\": \"\xff\xfe\"}");

ingest_order(1000001, user_id(1), 1, 2);
ingest_order(1000002, 'u1', 1);
ingest_order(1000003, $cyrillic_id, 2);

# 1. The wrong password, then the right one.
wait_for(
	q{SELECT last_error LIKE '%refused the password%' FROM dwh.status WHERE worker = 'redis'},
	"a wrong password '*' is reported in dwh.status");
like(redis_row('last_error'), qr{Redis at redis://:\*\*\*\@127\.0\.0\.1:\d+/0 refused},
	'the error names Redis by its redacted URL, as is');
is(redis_row('last_error_at IS NOT NULL'), 't', 'with its time');

# A server whose error reply is not UTF-8: what dwh.status shows is.  A
# child process answers every read with the same error.
my $fake = IO::Socket::INET->new(LocalAddr => '127.0.0.1', LocalPort => 0,
	Listen => 5, ReuseAddr => 1) or die "could not listen: $!";
my $fake_port = $fake->sockport;
my $fake_pid;
# The server goes away with the test, even one that fails half-way.
END { kill 'KILL', $fake_pid if $fake_pid; }
$fake_pid = fork() // die "could not fork: $!";
if ($fake_pid == 0)
{
	while (my $client = $fake->accept)
	{
		my $buf;
		syswrite($client, "-ERR \xff\xfe bad\r\n") while sysread($client, $buf, 4096);
		close $client;
	}
	POSIX::_exit(0);
}
close $fake;
psql("ALTER SYSTEM SET dwh.redis_url = 'redis://127.0.0.1:$fake_port/0'");
$node->reload;
wait_for(q{SELECT last_error LIKE '%refused PING%' FROM dwh.status WHERE worker = 'redis'},
	'an error reply that is not UTF-8 is reported');
my ($ret, $shown, $err) = $node->psql('postgres',
	q{SELECT convert_from(textsend(last_error), 'UTF8') FROM dwh.status WHERE worker = 'redis'});
is($shown, "Redis at redis://127.0.0.1:$fake_port/0 refused PING: ERR ?? bad",
	'as valid UTF-8, each other byte a "?"')
  or diag($err);
kill 'KILL', $fake_pid;
waitpid($fake_pid, 0);
$fake_pid = undef;

psql("ALTER SYSTEM SET dwh.redis_url = '" . $redis->url . "'");
$node->reload;
wait_for(
	q{SELECT state = 'mirroring' AND refreshes >= 1 FROM dwh.status WHERE worker = 'redis'},
	'the right password: connected, and a refresh pass done');
is(redis_row(q{coalesce(last_error, '<none>') || ' ' || coalesce(last_error_at::text, '<none>')}),
	'<none> <none>', 'the recovered worker shows no last error');
wait_for(q{SELECT count(*) = 4 FROM stg.users}, 'the four valid users are mirrored');

# 2. Keys that cannot be text, next to the valid ones.
my %refused = (
	"bad\xffkey" => [ '22021', qr/^Redis key is not valid UTF-8 from byte 4 on/ ],
	"sur\xed\xa0\x80" => [ '22021', qr/^Redis key is not valid UTF-8 from byte 4 on/ ],
	"ov\xc0\xaf" => [ '22021', qr/^Redis key is not valid UTF-8 from byte 3 on/ ],
	"ov3\xe0\x80\xaf" => [ '22021', qr/^Redis key is not valid UTF-8 from byte 4 on/ ],
	"u1\0x" => [ '22021', qr/^Redis key holds a NUL byte at byte 3/ ],
	'' => [ '2200F', qr/^Redis key is empty/ ],
	('K' x 129) => [ '22001', qr/^Redis key of 129 bytes is longer than 128 bytes/ ],
	('L' x 2000) => [ '22001', qr/^Redis key of 2000 bytes is longer than 128 bytes/ ]);
$redis->set_bytes($_, user_value('Impostor', 'impostor')) for sort keys %refused;
wait_two_refreshes('the hostile keys are seen');

# Each is one dead letter: the key's bytes (its first kB) in raw, its
# length and SHA-256, no source_key.
my $expected = join("\n",
	map {
		join('|', unpack('H*', substr($_, 0, 1024)), length($_), sha256_hex($_),
			$refused{$_}[0])
	} sort { unpack('H*', substr($a, 0, 1024)) cmp unpack('H*', substr($b, 0, 1024)) }
	  keys %refused);
my $key_letters = q{
SELECT encode(raw, 'hex') || '|' || raw_length || '|' || encode(raw_sha256, 'hex')
       || '|' || sqlstate
FROM dwh.dead_letters WHERE source = 'redis' AND source_key IS NULL
ORDER BY encode(raw, 'hex')};
is(psql($key_letters), $expected,
	'each refused key is one dead letter holding its bytes, length and SHA-256');
for my $key (sort keys %refused)
{
	my $hex = unpack('H*', substr($key, 0, 1024));
	like(psql("SELECT reason FROM dwh.dead_letters WHERE source = 'redis' AND source_key IS NULL "
		  . "AND raw = decode('$hex', 'hex')"),
		$refused{$key}[1], "the reason for key " . substr($hex, 0, 24) . ' says why');
}
is(psql(q{SELECT count(*) FROM dwh.dead_letters WHERE source = 'redis' AND source_key = 'badvalue'
	AND sqlstate = '22021'}), '1', 'a bad value under a valid key is a dead letter of its key');

wait_two_refreshes('the hostile keys are found again');
is(psql($key_letters), $expected, 'refresh passes dead-letter a refused key once');
# New ones are counted in the log, one line per SCAN page that found any,
# never again while their dead letters stay.
sub logged_refusals
{
	my $sum = 0;
	$sum += $_ foreach slurp_file($node->logfile) =~
	  /LOG:  (\d+) Redis keys found by SCAN cannot be text keys and were dead-lettered/g;
	return $sum;
}
is(logged_refusals(), scalar(keys %refused), 'the log counts the new ones, once');
# A deleted dead letter comes back at the next refresh while the key is in
# Redis.
psql(q{DELETE FROM dwh.dead_letters WHERE source = 'redis' AND source_key IS NULL});
wait_two_refreshes('the hostile keys are found after their dead letters are deleted');
is(psql($key_letters), $expected, 'deleted dead letters of refused keys come back');
is(logged_refusals(), 2 * scalar(keys %refused), 'counted in the log again');

# The valid keys are mirrored, each with its own value; nothing else is.
my @valid_users = sort (user_id(1), 'u1', $cyrillic, $k128);
is(psql(q{SELECT string_agg(object_id, ',' ORDER BY object_id COLLATE "C") FROM stg.users}),
	join(',', @valid_users), 'stg.users holds the valid keys only');
is(psql(q{SELECT payload->>'name' FROM stg.users WHERE object_id = 'u1'}),
	'Real u1', '"u1" holds its own value, not that of "u1\\0x"');
is(psql(q{SELECT string_agg(user_id, ',' ORDER BY user_id COLLATE "C") FROM dds.h_user}),
	join(',', @valid_users), 'dds.h_user holds the valid keys only');
is( psql(
		q{SELECT string_agg(key || ':' || state, ',' ORDER BY key COLLATE "C") FROM dwh.redis_keys}
	),
	join(',', map { "$_->[0]:$_->[1]" }
		  sort { $a->[0] cmp $b->[0] } ([ user_id(1), 'mirrored' ], [ 'u1', 'mirrored' ],
			[ $cyrillic, 'mirrored' ], [ $k128, 'mirrored' ],
			[ restaurant_id(1), 'mirrored' ], [ 'badvalue', 'refused' ])),
	'dwh.redis_keys holds the valid keys only');
is(psql('SELECT count(*) FROM dwh.verify()'), '0', 'dwh.verify() is empty');
is(psql(q{SELECT count(*) FROM cdm.user_product_counters}), '4',
	'the marts count the orders of the valid users');
is(redis_row(q{coalesce(last_error, '<none>')}), '<none>', 'no error in dwh.status');

# No text column of stg, dds, cdm or dwh holds text that is not UTF-8.
my $invalid_text_sql = q{
CREATE FUNCTION pg_temp.utf8_ok(b bytea) RETURNS boolean LANGUAGE plpgsql AS $f$
BEGIN
    PERFORM pg_catalog.convert_from(b, 'UTF8');
    RETURN true;
EXCEPTION WHEN character_not_in_repertoire THEN
    RETURN false;
END $f$;
CREATE FUNCTION pg_temp.invalid_text() RETURNS SETOF text LANGUAGE plpgsql AS $f$
DECLARE
    col record;
    n bigint;
    checked integer := 0;
BEGIN
    FOR col IN
        SELECT c.oid::regclass AS tbl, a.attname
        FROM pg_class c
        JOIN pg_namespace s ON s.oid = c.relnamespace
        JOIN pg_attribute a ON a.attrelid = c.oid
        WHERE s.nspname IN ('stg', 'dds', 'cdm', 'dwh') AND c.relkind IN ('r', 'p')
          AND a.attnum > 0 AND NOT a.attisdropped
          AND a.atttypid IN ('text'::regtype, 'varchar'::regtype, 'bpchar'::regtype)
        ORDER BY 1, 2
    LOOP
        EXECUTE format('SELECT count(*) FROM %s WHERE NOT pg_temp.utf8_ok(pg_catalog.textsend(%I::text))',
                       col.tbl, col.attname) INTO n;
        IF n > 0 THEN
            RETURN NEXT format('%s.%s: %s rows not UTF-8', col.tbl, col.attname, n);
        END IF;
        checked := checked + 1;
    END LOOP;
    RETURN NEXT format('checked %s text columns', checked);
END $f$;
SELECT * FROM pg_temp.invalid_text();
};
my $checked = psql($invalid_text_sql);
like($checked, qr/^checked \d+ text columns$/,
	'no text column holds text that is not UTF-8')
  or diag($checked);

# 3. Dump and restore into a fresh database; every table compared.
my @tables = split /\n/, psql(q{
SELECT format('%I.%I', n.nspname, c.relname)
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p') AND n.nspname IN ('stg', 'dds', 'cdm', 'dwh')
ORDER BY 1});
cmp_ok(scalar(@tables), '>=', 25, 'found ' . scalar(@tables) . ' tables to compare');

# The rows of a table as sorted text, without the load-time columns of
# docs/data-rule.md.  dwh.redis_wanted is a queue that the worker empties
# and that a restore fills again from the hubs it rebuilds: what it holds
# beyond the known keys is compared.
sub rows_of
{
	my ($db, $table) = @_;
	my @drop = ('loaded_at', 'received_at');
	push @drop, 'id'
	  if $table =~ /^(stg|cdm)\./ || $table eq 'dwh.dead_letters';
	push @drop, 'load_dt', 'load_src'
	  if $table =~ /^dds\.[hl]_/ && $table ne 'dds.l_product_category';
	push @drop, 'source', 'position_mismatch' if $table eq 'stg.other_events';
	my $drop = join(', ', map { "'$_'" } @drop);
	my $where = $table eq 'dwh.redis_wanted'
	  ? 'WHERE NOT EXISTS (SELECT FROM dwh.redis_keys k WHERE k.key = t.key)'
	  : '';
	return $node->safe_psql($db,
		"SELECT r FROM (SELECT (to_jsonb(t) - ARRAY[$drop]::text[])::text AS r FROM $table t $where) s "
		  . 'ORDER BY r COLLATE "C"');
}

my %before = map { $_ => rows_of('postgres', $_) } @tables;
for my $t ('stg.users', 'stg.restaurants', 'stg.order_events', 'dds.h_user',
	'dds.s_user_names', 'cdm.user_product_counters', 'cdm.user_category_counters',
	'dwh.dead_letters', 'dwh.redis_keys')
{
	isnt($before{$t}, '', "$t has rows before the dump");
}

my $dump = PostgreSQL::Test::Utils::tempdir() . '/hostile_keys.dump';

sub run_client
{
	my ($name, @cmd) = @_;
	my ($stdout, $stderr) = ('', '');
	note(join(' ', @cmd));
	ok(IPC::Run::run(\@cmd, '>', \$stdout, '2>', \$stderr), "$name exits 0");
	is($stderr, '', "$name reports no error");
}

run_client('pg_dump', 'pg_dump', '-Fc', '-f', $dump,
	'-h', $node->host, '-p', $node->port, '-d', 'postgres');
psql('CREATE DATABASE restored');
run_client('pg_restore', 'pg_restore', '-h', $node->host,
	'-p', $node->port, '-d', 'restored', $dump);

is(rows_of('restored', $_), $before{$_}, "$_: the same rows after restore")
  for @tables;
is($node->safe_psql('restored', 'SELECT count(*) FROM dwh.verify()'),
	'0', 'dwh.verify() is empty after restore');
like($node->safe_psql('restored', $invalid_text_sql), qr/^checked \d+ text columns$/,
	'no text column of the restored database holds text that is not UTF-8');

$node->stop;
$redis->stop;
done_testing();
