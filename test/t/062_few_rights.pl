# What the roles of the README's "Security" recipes can do to the workers
# and to what others read, beyond the refusals of 025_privileges.pl: a
# red team's findings, kept as tests.
#
# Stalls: the loader with an ingest left uncommitted, the tag editor with
# a rule change left uncommitted and with LOCK TABLE dwh.tag_rules (its
# DELETE allows every mode) each stop the tags worker's expiry passes for
# as long as they keep their transaction open, and the loader's ingest a
# Kafka worker's order naming the same dish (mock cluster).  dwh sets no bound on that
# (a role may undo any timeout set for it); dwh.status must name the
# holder (blocked_by, the holder's pid, and blocked_since), as the
# exporter's role and the operator read it, and clear it once the holder
# is gone, the worker going on by itself; a Kafka worker queued behind
# the waiting tags worker names the loader both wait for.  Before: dwh.status said
# "expiring tags every 30 s" and nothing else while the worker slept in
# the lock wait.
#
# The database owner's ALLOW_CONNECTIONS false: each worker fails to
# connect once, then waits, saying why in the log (before: a FATAL and an
# exit every 5 s).
#
# Reasons: numbers of a few bytes and many digits (1e130000) as a
# quantity or an object_id are dead-lettered with a reason quoting their
# first digits.  Before: all 130,000 of them, in the reason of an 800-byte
# value, whatever dwh.dead_letter_keep_bytes.
#
# What held, kept as assertions: a loader's session settings (DateStyle,
# TimeZone, IntervalStyle, extra_float_digits, bytea_output) do not change
# what the ingest writes (dwh.verify() empty, the marts equal to the
# recount); a tag editor's TimeZone does not move a rule's window_as_of
# (UTC); tag names built to break what carries them (control characters,
# quotes, backslashes, a newline, SQL and format() text, 200 four-byte
# characters) reach cdm.user_tags as written, every NOTIFY payload is one
# JSON object naming the tag exactly, within PostgreSQL's 8000 bytes, and
# pg_dump -Fc | pg_restore brings the rules, tags and events back as they
# were, dwh.verify() empty in the restored database.

use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;

use DwhTest;
use IPC::Run;
use JSON::PP;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);

my $mock = start_mock_cluster(brokers => 1, partitions => 1);
my $node = new_dwh_node(
	'few_rights',
	'dwh.tags_expire_interval' => '1s',
	'dwh.kafka_brokers' => $mock->{bootstrap});

# The README's recipes, as written (025_privileges.pl checks them).
my $readme = slurp_file(dwh_root() . '/README.md');
my ($security) = $readme =~ /^## Security\n(.*?)^## /ms;
my ($recipes) = ($security // '') =~ /```sql\n(.*?CREATE ROLE analyst.*?)```/s;
$node->safe_psql('postgres', $recipes // 'SELECT 1/0');
$node->safe_psql('postgres', 'CREATE ROLE nobody LOGIN');

my $order = sub {
	my ($id, $user, $dish, $cost) = @_;
	$cost //= 100;
	return qq{{"object_id": $id, "object_type": "order", "sent_dttm": "2023-01-01 10:00:00", "payload": {"restaurant": {"id": "r1"}, "date": "2023-01-01 10:00:00", "user": {"id": "$user"}, "order_items": [{"id": "$dish", "name": "Плов", "price": $cost, "quantity": 1}], "bonus_payment": 0, "cost": $cost, "payment": $cost, "bonus_grant": 0, "statuses": [{"status": "CLOSED", "dttm": "2023-01-01 10:00:00"}], "final_status": "CLOSED", "update_ts": "2023-01-01 10:00:00"}}};
};
my $ingest = sub {
	my @orders = @_;
	return 'SELECT applied FROM dwh.ingest_orders(ARRAY['
	  . join(', ', map { "convert_to(\$m\$$_\$m\$, 'UTF8')" } @orders) . '])';
};
$node->safe_psql('postgres',
	$ingest->(map { $order->($_, "u$_", 'd1') } 1 .. 3));
# A windowed rule: the tags worker's expiry pass takes the tag lock.
$node->safe_psql('postgres',
	q{INSERT INTO dwh.tag_rules (tag, kind, threshold, window_days) VALUES ('recent', 'all_orders', 1, 30)});

sub as
{
	my ($role, $sql) = @_;
	return $node->safe_psql('postgres', $sql, extra_params => [ '-U', $role ]);
}

# The tags worker's blocked_by and whether blocked_since is set, as role
# $role reads dwh.status.
sub blocked
{
	my ($role) = @_;
	return as($role,
		q{SELECT coalesce(array_to_string(blocked_by, ','), '') || ' ' || (blocked_since IS NOT NULL)
		  FROM dwh.status WHERE worker = 'tags'});
}

sub wait_blocked
{
	my ($want) = @_;
	my $deadline = time() + 30;
	my $got;
	while (time() < $deadline)
	{
		$got = blocked('prometheus');
		return $got if $got eq $want;
		usleep(100_000);
	}
	return $got;
}

sub expiry_passes
{
	return $node->safe_psql('postgres',
		q{SELECT expiry_passes FROM dwh.status WHERE worker = 'tags'});
}

ok(wait_for($node, q{SELECT expiry_passes > 0 FROM dwh.status WHERE worker = 'tags'}),
	'the tags worker makes expiry passes');
is(blocked('prometheus'), ' false', 'nothing blocks it: blocked_by and blocked_since NULL');

# Each holder, one after the other: a transaction of the role, left open.
my @holders = (
	[ 'loader', 'an ingest not committed', $ingest->($order->(10, 'u10', 'd1')) ],
	[ 'tagger', 'a rule change not committed',
		q{UPDATE dwh.tag_rules SET threshold = 2 WHERE tag = 'recent'} ],
	[ 'tagger', 'LOCK TABLE dwh.tag_rules', q{LOCK TABLE dwh.tag_rules IN ACCESS EXCLUSIVE MODE} ],);
foreach my $h (@holders)
{
	my ($role, $what, $sql) = @$h;
	my $holder = $node->background_psql('postgres', extra_params => [ '-U', $role ]);
	my $pid = $holder->query_safe('SELECT pg_backend_pid()');
	$holder->query_safe("BEGIN; $sql");
	is(wait_blocked("$pid true"), "$pid true",
		"$role, $what: dwh.status names the holder in blocked_by, with blocked_since");
	is(blocked('operator'), "$pid true", "$role, $what: the operator reads it too");
	my $passes = expiry_passes();
	sleep(3);
	is(expiry_passes(), $passes, "$role, $what: no expiry pass meanwhile (the worker waits)");
	$holder->query_safe('COMMIT');
	$holder->quit;
	is(wait_blocked(' false'), ' false', "$role, $what: blocked_by NULL again once it commits");
	ok( wait_for(
			$node, "SELECT expiry_passes > $passes FROM dwh.status WHERE worker = 'tags'"),
		"$role, $what: the worker goes on by itself");
}

# The Kafka worker: an order naming the dish of the loader's uncommitted
# ingest waits for the dish's row.
{
	my $holder = $node->background_psql('postgres', extra_params => [ '-U', 'loader' ]);
	my $pid = $holder->query_safe('SELECT pg_backend_pid()');
	$holder->query_safe('BEGIN; ' . $ingest->($order->(40, 'u40', 'd9')));
	my $file = PostgreSQL::Test::Utils::tempdir() . '/order.txt';
	append_to_file($file, $order->(41, 'u41', 'd9') . "\n");
	produce($mock, $file, undef, 0);
	ok( wait_for(
			$node,
			qq{SELECT blocked_by = ARRAY[$pid] AND blocked_since IS NOT NULL
			   FROM dwh.status WHERE worker = 'kafka 1'}),
		'kafka 1 waits for the dish of the loader\'s ingest: blocked_by names the loader');
	is(stored_total($node), '0', 'kafka 1 has applied nothing meanwhile');
	$holder->query_safe('COMMIT');
	$holder->quit;
	ok(wait_applied($node, 1), 'kafka 1 applies the order once the loader commits');
	is( $node->safe_psql('postgres',
			q{SELECT blocked_by IS NULL AND blocked_since IS NULL FROM dwh.status WHERE worker = 'kafka 1'}),
		't', 'kafka 1: blocked_by NULL again');
}

# Queued behind a waiter: the loader's uncommitted ingest holds the tag
# lock shared, the tags worker's expiry waits for it exclusive, and an
# order of another restaurant, user and dish (named before) waits for it
# shared, queued behind the expiry: not for the loader's lock, which does
# not conflict with its own.  blocked_by names the loader, the one to end,
# not the tags worker.
{
	my $holder = $node->background_psql('postgres', extra_params => [ '-U', 'loader' ]);
	my $pid = $holder->query_safe('SELECT pg_backend_pid()');
	$holder->query_safe('BEGIN; ' . $ingest->($order->(50, 'u50', 'd1')));
	is(wait_blocked("$pid true"), "$pid true", 'queued: the tags worker waits for the loader');
	my $file = PostgreSQL::Test::Utils::tempdir() . '/queued.txt';
	(my $other = $order->(51, 'u51', 'd9')) =~ s/"r1"/"r2"/;
	append_to_file($file, "$other\n");
	produce($mock, $file, undef, 0);
	my $tags_pid = $node->safe_psql('postgres', q{SELECT pid FROM dwh.status WHERE worker = 'tags'});
	ok( wait_for(
			$node,
			qq{SELECT pg_blocking_pids(pid) = ARRAY[$tags_pid] FROM dwh.status WHERE worker = 'kafka 1'}),
		'queued: kafka 1 waits behind the tags worker');
	is( $node->safe_psql('postgres',
			q{SELECT array_to_string(blocked_by, ',') FROM dwh.status WHERE worker = 'kafka 1'}),
		$pid, 'queued: kafka 1 names the loader in blocked_by, not the tags worker');
	$holder->query_safe('COMMIT');
	$holder->quit;
	ok(wait_applied($node, 2), 'queued: kafka 1 applies the order once the loader commits');
}
check_consistent($node, 'after the holders');

# A loader's session settings do not change what the ingest writes.
is( as( 'loader',
		q{SET DateStyle = 'SQL, DMY'; SET TimeZone = 'Pacific/Kiritimati'; SET IntervalStyle = 'sql_standard';
		  SET extra_float_digits = -15; SET bytea_output = 'escape';}
		  . $ingest->(
			$order->(20, 'u20', 'd2', '100.123456789012345678'),
			$order->(21, 'u21', 'd2', '1e2'))),
	'2', 'the loader ingests under odd DateStyle, TimeZone, IntervalStyle, extra_float_digits, bytea_output');
check_consistent($node, "orders ingested under the loader's settings");

# Numbers of a few bytes and many digits: a dead letter's reason quotes
# their first digits.
my @numbers = (
	[ 'quantity 1e130000', $order->(30, 'u30', 'd3') =~ s/"quantity": 1/"quantity": 1e130000/r ],
	[ 'object_id 1e130000', $order->(31, 'u31', 'd3') =~ s/"object_id": 31/"object_id": 1e130000/r ],
	[ 'object_id -1e130000', $order->(32, 'u32', 'd3') =~ s/"object_id": 32/"object_id": -1e130000/r ],
	[ 'price -1e-16000', $order->(33, 'u33', 'd3', '-1e-16000') ],);
my $dead_before = $node->safe_psql('postgres', 'SELECT coalesce(max(id), 0) FROM dwh.dead_letters');
is( as( 'loader',
		'SELECT dead_lettered FROM dwh.ingest_orders(ARRAY['
		  . join(', ', map { "convert_to(\$m\$$_->[1]\$m\$, 'UTF8')" } @numbers) . '])'),
	scalar(@numbers),
	'the loader\'s numbers of many digits are dead-lettered');
is( $node->safe_psql('postgres',
		"SELECT string_agg(length(reason) || ' ' || left(reason, 300), E'\\n' ORDER BY id)
		 FROM dwh.dead_letters WHERE id > $dead_before AND (length(reason) > 200 OR reason !~ '0\\.\\.\\.\$')"),
	'', 'each reason quotes the first digits of the number, and ends with "..."');
check_consistent($node, 'after the numbers of many digits');

# A tag editor's TimeZone does not move a window: window_as_of is UTC.
as('tagger',
	q{SET TimeZone = 'Pacific/Kiritimati'; INSERT INTO dwh.tag_rules (tag, kind, threshold, window_days) VALUES ('kiritimati', 'all_orders', 1, 7)});
is( $node->safe_psql('postgres',
		q{SELECT abs(extract(epoch FROM window_as_of - (now() AT TIME ZONE 'UTC'))) < 600
		  FROM dwh.tag_rules WHERE tag = 'kiritimati'}),
	't', "a rule written under the tag editor's TimeZone has its window_as_of in UTC");

# Tag names built to break what carries them, written by the tag editor.
my @tags = (
	[ 'control characters', q{repeat(chr(1), 100) || chr(27) || '[2J' || chr(127)} ],
	[ 'quotes, backslashes, a newline', q!'a"b\c' || chr(10) || '"}' || chr(9) || '\u0000' || chr(8232)! ],
	[ 'SQL and format() text', q{$t$'); DROP TABLE dwh.tag_rules; --%s%I%L%n$t$} ],
	[ '200 four-byte characters', q{repeat(chr(128512), 200)} ],
	[ '200 characters that JSON escapes', q{repeat(chr(31), 200)} ],);
my $listener = $node->background_psql('postgres', extra_params => [ '-U', 'nobody' ]);
$listener->query_safe('LISTEN dwh_user_tags');
my $events_before = $node->safe_psql('postgres', 'SELECT coalesce(max(id), 0) FROM cdm.user_tag_events');
foreach my $t (@tags)
{
	my ($what, $expr) = @$t;
	as('tagger', "INSERT INTO dwh.tag_rules (tag, kind, threshold) VALUES ($expr, 'all_orders', 1)");
	is( $node->safe_psql('postgres',
			"SELECT count(*) FROM cdm.user_tags WHERE tag = $expr"),
		$node->safe_psql('postgres',
			'SELECT count(DISTINCT h_user_pk) FROM dwh.closed_orders'),
		"tag of $what: granted to every user, the name as written");
}
my $notes = $listener->query_safe('SELECT 1');
$listener->quit;
my @payloads = $notes =~
  /^Asynchronous notification "dwh_user_tags" with payload "(.*)" received from server process with PID \d+\.$/mg;
my %expected = map { $_->[0] => $_->[1] } @{
	decode_json(
		$node->safe_psql(
			'postgres',
			"SELECT coalesce(json_agg(json_build_array(id, tag)), '[]') FROM cdm.user_tag_events WHERE id > $events_before"
		))
  };
cmp_ok(scalar(keys %expected), '>=', 5, 'the hostile tags have events');
is(scalar(@payloads), scalar(keys %expected), 'one notification per tag event');
my @bad;
foreach my $p (@payloads)
{
	my $bytes = length($p);    # psql's output, undecoded: bytes
	my $j = eval { JSON::PP->new->utf8->decode($p) };
	push @bad, "not one JSON object: $p" and next unless ref $j eq 'HASH';
	push @bad, "$bytes bytes: $p" if $bytes > 7999;
	# Any role may LISTEN: the payload names the event, not its user or tag.
	push @bad, "more than the event's id: $p"
	  unless join(',', sort keys %$j) eq 'id';
	push @bad, "no such event: $p" unless defined $expected{ $j->{id} // '' };
}
is(join("\n", @bad), '',
	'every payload, heard by a role without rights, is a JSON object of an event\'s id alone');
check_consistent($node, 'after the hostile tag names');

# The tag names through a backup.
my $fingerprint = q{SELECT md5(string_agg(x, E'\n' ORDER BY x)) FROM (
  SELECT 'rule ' || tag || ' ' || kind || ' ' || threshold || ' ' || coalesce(window_days::text, '') FROM dwh.tag_rules
  UNION ALL SELECT 'held ' || user_id || ' ' || tag || ' ' || coalesce(value, '') || ' ' || since FROM cdm.user_tags_held
  UNION ALL SELECT 'event ' || id || ' ' || user_id || ' ' || tag || ' ' || kind || ' ' || at FROM cdm.user_tag_events
) s(x)};
my $before = $node->safe_psql('postgres', $fingerprint);
my $dump = PostgreSQL::Test::Utils::tempdir() . '/few_rights.dump';
my ($out, $err) = ('', '');
ok( IPC::Run::run(
		[ 'pg_dump', '-Fc', '-f', $dump, '-h', $node->host, '-p', $node->port, '-d', 'postgres' ],
		'>', \$out, '2>', \$err),
	'pg_dump exits 0') or diag($err);
$node->safe_psql('postgres', 'CREATE DATABASE restored');
($out, $err) = ('', '');
ok( IPC::Run::run(
		[ 'pg_restore', '-h', $node->host, '-p', $node->port, '-d', 'restored', $dump ],
		'>', \$out, '2>', \$err),
	'pg_restore exits 0');
is($err, '', 'pg_restore reports no error');
is($node->safe_psql('restored', $fingerprint), $before,
	'the rules, tags and events come back as they were');
is($node->safe_psql('restored', 'SELECT count(*) FROM dwh.verify()'), '0',
	'dwh.verify() empty in the restored database');

# The database owner closes its database to connections (ALTER DATABASE
# ... ALLOW_CONNECTIONS false) and the workers start again (here
# terminated; a server restart does the same): each fails to connect once,
# then waits, saying why once in the log, and connects within seconds of
# the database opening again.  Before: a FATAL and an exit of each worker
# every 5 s for as long as the database stayed closed.
$node->safe_psql('postgres', 'CREATE ROLE dbowner LOGIN; ALTER DATABASE postgres OWNER TO dbowner');
my $offset = -s $node->logfile;
$node->safe_psql('template1', 'ALTER DATABASE postgres ALLOW_CONNECTIONS false',
	extra_params => [ '-U', 'dbowner' ]);
is( $node->safe_psql('template1',
		q{SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE backend_type LIKE 'dwh%'}),
	'3', 'the three workers are terminated');
my $count_log = sub {
	my ($re) = @_;
	return scalar(() = slurp_file($node->logfile, $offset) =~ /$re/g);
};
my $waiting = qr/LOG:  waiting: database "postgres" \(dwh\.database\) does not allow connections\n[^\n]*HINT:  Run ALTER DATABASE postgres ALLOW_CONNECTIONS true/;
# Up to 75 s, reading the log only.  PostgreSQL 15's postmaster chooses
# its sleep before it unblocks signals: a worker that fails within
# milliseconds of its start can be reaped then, and the postmaster still
# sleeps the minute it chose, so the restart waits for its next wakeup.
# (A connection wakes it, so polling with psql would hide this.)
my $deadline = time() + 75;
usleep(200_000) while $count_log->($waiting) < 3 && time() < $deadline;
is($count_log->($waiting), 3, 'each worker logs that it waits for the database to allow connections, with the hint');
sleep(11);    # two of the postmaster's restart intervals (5 s)
is($count_log->(qr/FATAL:  database "postgres" is not currently accepting connections/),
	3, 'each worker failed to connect once, not every 5 s');
is($count_log->($waiting), 3, 'and said it waits once');
$node->safe_psql('template1', 'ALTER DATABASE postgres ALLOW_CONNECTIONS true',
	extra_params => [ '-U', 'dbowner' ]);
ok( wait_for(
		$node,
		q{SELECT count(*) = 3 AND bool_and(pid IS NOT NULL AND state NOT LIKE 'waiting%' AND state <> 'stopped')
		  FROM dwh.status}),
	'the workers connect once the database allows connections again');
ok(wait_for($node, q{SELECT expiry_passes > 0 FROM dwh.status WHERE worker = 'tags'}),
	'the tags worker expires tags again');

$node->stop;
done_testing();
