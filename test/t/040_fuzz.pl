# Hostile input, as a seeded mutation fuzzer (issue 12): valid order
# messages and dictionary values from the generator (tools/dwh-gen),
# mutated (test/t/Fuzz.pm: bit flips, truncation, invalid UTF-8, NUL bytes,
# \u0000, lone surrogates, type swaps, odd numbers and timestamps, deep
# nesting, large arrays, duplicate, renamed, missing and extra keys), fed
# through the three ways bytes from outside reach dwh:
#
#   ingest  dwh.ingest_orders in random batches, each message at its own
#           Kafka position, under a random dwh.dead_letter_keep_bytes;
#   stg     INSERT ... ON CONFLICT, plain INSERT, UPDATE and COPY into
#           stg.order_events, stg.users and stg.restaurants;
#   redis   values written to a real redis-server under valid keys, read by
#           the Redis worker (keys stay valid: see "Redis keys" below).
#
# Proven after every batch, statement script or Redis round: the server did
# not crash (no "terminated by signal" or reinitialisation in its log, no
# internal error XX000, no leak warning, the same postmaster); every
# message is accounted for (received = applied + unchanged + other_type +
# dead_lettered + replayed, and each message is, at its position, one dead
# letter, one other event, or an order version held in STG as PostgreSQL
# reads it); every dead letter keeps its bytes (raw is the message's first
# dwh.dead_letter_keep_bytes bytes, raw_length its length, raw_sha256 its
# SHA-256); a direct write either succeeds, and its value is in STG, or
# fails with a SQLSTATE a user can cause (never an internal error); each
# Redis value is mirrored into STG or refused with a dead letter keeping
# its bytes.  Some batches are fed again: nothing is written, the counts
# say replayed and unchanged, and every table of stg, dds, cdm and dwh is
# unchanged.  At the end dwh.verify() is empty in both databases, and
# pg_dump -Fc then pg_restore into a fresh database gives the same rows in
# every table of stg, dds, cdm and dwh (load-time columns aside, as in
# docs/data-rule.md).
#
# A failure prints the seed and the smallest failing input found within
# DWH_FUZZ_SHRINK_SECONDS (delta debugging over the batch, then over the
# message's JSON members and bytes, each try on a fresh database).
#
# Environment: DWH_FUZZ_SEED (default: from the clock, printed),
# DWH_FUZZ_SECONDS (time spent fuzzing, default 60), DWH_FUZZ_SHRINK_SECONDS
# (default 60).
#
# Redis keys stay valid here: keys that cannot be text are tested key by
# key by 029_redis_hostile_keys.pl; this test mutates values.

use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;

use Digest::SHA qw(sha256);
use IPC::Run;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use DwhTest qw(dwh_root);
use Fuzz;
use RedisServer;
use SameEvents qw(new_rng);
use Test::More;
use Time::HiRes qw(time usleep);

my $seed = $ENV{DWH_FUZZ_SEED} // (int(time() * 1000) ^ ($$ << 10)) % 1000000000;
my $budget = $ENV{DWH_FUZZ_SECONDS} // 60;
my $shrink_budget = $ENV{DWH_FUZZ_SHRINK_SECONDS} // 60;
diag("040_fuzz: seed $seed (DWH_FUZZ_SEED=$seed to repeat), fuzzing for $budget s");

my $root = dwh_root();
my $tmp = PostgreSQL::Test::Utils::tempdir();
my $rng = new_rng($seed);

# The bytes of dwh.dead_letter_keep_bytes in postgresql.conf (the Redis
# worker's); ingest batches SET their own.
my $worker_keep = 4096;

my $redis = RedisServer->new(password => 'fuzz-redis');

my $node = PostgreSQL::Test::Cluster->new('fuzz');
$node->init(extra => [ '--encoding=UTF8', '--locale=C' ]);
$node->append_conf(
	'postgresql.conf', qq{
shared_preload_libraries = 'dwh'
restart_after_crash = on
log_line_prefix = '%m [%p] %e %q%a '
dwh.redis_url = '@{[ $redis->url ]}'
dwh.redis_scan_pattern = '*'
dwh.redis_refresh_interval = 1
dwh.redis_batch_size = 7
dwh.redis_max_value_size = '64kB'
dwh.dead_letter_keep_bytes = '${worker_keep}B'
});
$node->start;

#
# Talking to the server, and watching it.
#

sub sql { my ($db, $query) = @_; return $node->safe_psql($db, $query); }

sub hex_literal { return q{'\x} . unpack('H*', $_[0]) . q{'::bytea}; }

# Run a script with psql (every statement in its own transaction, going on
# after errors, verbose errors: "psql:FILE:LINE: ERROR:  SQLSTATE: ...").
# Returns (exit status, stdout, stderr).
my $script_counter = 0;

sub run_script
{
	my ($db, $script) = @_;
	my $file = sprintf('%s/script_%d.sql', $tmp, $script_counter++ % 4);
	open(my $fh, '>', $file) or die "could not write $file: $!";
	binmode $fh;
	print $fh $script;
	close $fh;
	my ($out, $err) = ('', '');
	IPC::Run::run(
		[ 'psql', '-X', '-q', '-A', '-t', '-v', 'VERBOSITY=verbose',
			'-d', $node->connstr($db), '-f', $file ],
		'<', \undef, '>', \$out, '2>', \$err);
	chomp $out;
	return ($? >> 8, $out, $err);
}

sub postmaster_pid
{
	my $file = $node->data_dir . '/postmaster.pid';
	return '(none)' unless -e $file;
	my ($pid) = split /\n/, slurp_file($file);
	return $pid;
}

my $first_postmaster = postmaster_pid();
my $log_pos = 0;

# Lines of the server log that mean a crash or a bug: a backend or worker
# killed by a signal, a reinitialisation, a PANIC or assertion, an internal
# error (SQLSTATE class XX, from log_line_prefix), a leak warning.  Also a
# new postmaster.  (A dwh worker exits with code 1 when dwh.database
# changes, on purpose: exits are not trouble in themselves.)
my $trouble_re = qr{
	terminated\ by\ signal | terminated\ by\ exception
	| all\ server\ processes\ terminated | \bPANIC: | \bTRAP:
	| \[\d+\]\ XX\d{3}\  | WARNING:.*(?:leak|not\ closed)
}x;

sub server_trouble
{
	my @trouble;

	# First the server must take connections: after a crash it does once
	# it has restarted, and by then the crash is in its log.
	push @trouble, 'crash: the server does not take connections'
	  unless $node->poll_query_until('postgres', 'SELECT true');
	my $log = slurp_file($node->logfile, $log_pos);
	# Only whole lines: the rest is read next time.
	my $end = rindex($log, "\n") + 1;
	$log_pos += $end;
	foreach my $line (split /\n/, substr($log, 0, $end))
	{
		push @trouble, "crash: server log: $line" if $line =~ $trouble_re;
	}
	my $pid = postmaster_pid();
	push @trouble, "crash: the postmaster was $first_postmaster, is now $pid"
	  if $pid ne $first_postmaster;
	return @trouble;
}

#
# Databases.  fuzz_template: dwh and the test's helpers, the model of every
# database here; fuzz: the ingest and direct writes; fuzz_redis: the
# database of the Redis worker (dwh.database).  Shrinking uses fresh copies
# of the template.
#

sql('postgres', 'CREATE DATABASE fuzz_template');
sql('fuzz_template', 'CREATE EXTENSION dwh');
sql(
	'fuzz_template', q{
CREATE SCHEMA t;

-- Every message handed to dwh.ingest_orders, at its position.
CREATE TABLE t.fed (
    batch           integer NOT NULL,
    idx             integer NOT NULL,
    keep            integer NOT NULL,
    kafka_partition integer NOT NULL,
    kafka_offset    bigint NOT NULL,
    msg             bytea NOT NULL,
    PRIMARY KEY (kafka_partition, kafka_offset)
);

-- PostgreSQL's own reading of bytes: their jsonb, or null when they are not
-- UTF-8 JSON.
CREATE FUNCTION t.as_jsonb(m bytea) RETURNS jsonb
LANGUAGE plpgsql AS $$
BEGIN
    RETURN convert_from(m, 'UTF8')::jsonb;
EXCEPTION WHEN others THEN
    RETURN NULL;
END
$$;

-- Is the order version of this message (as PostgreSQL reads it) held in
-- STG, current or superseded?
CREATE FUNCTION t.order_stored(m bytea) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    j jsonb := t.as_jsonb(m);
    order_id numeric;
    p text;
BEGIN
    IF j IS NULL OR jsonb_typeof(j) <> 'object'
       OR jsonb_typeof(j->'object_id') IS DISTINCT FROM 'number'
       OR jsonb_typeof(j->'payload') IS DISTINCT FROM 'object' THEN
        RETURN false;
    END IF;
    order_id := (j->'object_id')::numeric;
    IF order_id <> trunc(order_id) OR order_id < 1 OR order_id > 9223372036854775807 THEN
        RETURN false;
    END IF;
    p := (j->'payload')::text;
    RETURN EXISTS (SELECT FROM stg.order_events e
                   WHERE e.object_id = order_id::bigint AND e.payload::text = p)
        OR EXISTS (SELECT FROM stg.order_event_history h
                   WHERE h.object_id = order_id::bigint AND h.payload::text = p);
END
$$;

-- What is wrong with where the messages of a batch went: each must be one
-- dead letter at its position keeping its bytes, or one other event at its
-- position holding it, or an order version held in STG.
CREATE FUNCTION t.unaccounted(b integer) RETURNS TABLE (idx integer, problem text)
LANGUAGE sql AS $$
SELECT * FROM (
    SELECT f.idx,
           CASE
           WHEN d.n + o.n > 1 THEN
               format('stored as %s dead letters and %s other events', d.n, o.n)
           WHEN d.n = 1 AND NOT d.ok THEN
               format('its dead letter (%s %s) does not keep its bytes: raw %s bytes, raw_length %s, length %s, keep %s',
                      d.sqlstate, d.reason, d.raw_bytes, d.raw_length, length(f.msg), f.keep)
           WHEN o.n = 1 AND NOT o.ok THEN
               'its other event does not hold it'
           WHEN d.n + o.n = 0 AND NOT t.order_stored(f.msg) THEN
               'neither a dead letter, nor an other event, nor an order version in STG'
           END AS problem
    FROM t.fed f
    CROSS JOIN LATERAL (
        SELECT count(*) AS n,
               bool_and(x.raw = substring(f.msg FROM 1 FOR f.keep)
                        AND x.raw_length = length(f.msg)
                        AND x.raw_sha256 = sha256(f.msg)
                        AND x.sqlstate ~ '^[0-9A-Z]{5}$'
                        AND x.sqlstate !~ '^XX') AS ok,
               min(x.sqlstate) AS sqlstate, min(x.reason) AS reason,
               min(length(x.raw)) AS raw_bytes, min(x.raw_length) AS raw_length
        FROM dwh.dead_letters x
        WHERE x.source = 'sql' AND x.topic = 'fuzz'
          AND x.kafka_partition = f.kafka_partition AND x.kafka_offset = f.kafka_offset) d
    CROSS JOIN LATERAL (
        SELECT count(*) AS n,
               bool_and(x.raw_sha256 = sha256(f.msg)
                        AND x.message::text = t.as_jsonb(f.msg)::text
                        AND x.object_type = x.message->>'object_type'
                        AND x.object_type <> 'order') AS ok
        FROM stg.other_events x
        WHERE x.source = 'sql' AND x.topic = 'fuzz'
          AND x.kafka_partition = f.kafka_partition AND x.kafka_offset = f.kafka_offset) o
    WHERE f.batch = b) s
WHERE problem IS NOT NULL
ORDER BY idx
$$;

-- Dead letters and other events stored at the positions of a batch.
CREATE FUNCTION t.stored_at(b integer, OUT dead bigint, OUT other bigint)
LANGUAGE sql AS $$
SELECT (SELECT count(*) FROM t.fed f JOIN dwh.dead_letters x
          ON x.source = 'sql' AND x.topic = 'fuzz'
         AND x.kafka_partition = f.kafka_partition AND x.kafka_offset = f.kafka_offset
        WHERE f.batch = b),
       (SELECT count(*) FROM t.fed f JOIN stg.other_events x
          ON x.source = 'sql' AND x.topic = 'fuzz'
         AND x.kafka_partition = f.kafka_partition AND x.kafka_offset = f.kafka_offset
        WHERE f.batch = b)
$$;

-- Is this value of a key held in STG (current or superseded)?  kind is
-- order, user, restaurant, or dictionary (either).  A key that does not
-- exist counts as held when missing_ok (an UPDATE of no row).
CREATE FUNCTION t.stg_stored(kind text, k text, m bytea, missing_ok boolean)
RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    p text := t.as_jsonb(m)::text;
BEGIN
    IF kind = 'order' THEN
        IF missing_ok AND NOT EXISTS (SELECT FROM stg.order_events WHERE object_id = k::bigint) THEN
            RETURN true;
        END IF;
        RETURN EXISTS (SELECT FROM stg.order_events WHERE object_id = k::bigint AND payload::text = p)
            OR EXISTS (SELECT FROM stg.order_event_history WHERE object_id = k::bigint AND payload::text = p);
    END IF;
    IF missing_ok AND kind = 'user' AND NOT EXISTS (SELECT FROM stg.users WHERE object_id = k)
       OR missing_ok AND kind = 'restaurant' AND NOT EXISTS (SELECT FROM stg.restaurants WHERE object_id = k) THEN
        RETURN true;
    END IF;
    RETURN (kind IN ('user', 'dictionary')
            AND (EXISTS (SELECT FROM stg.users WHERE object_id = k AND payload::text = p)
                 OR EXISTS (SELECT FROM stg.user_history WHERE object_id = k AND payload::text = p)))
        OR (kind IN ('restaurant', 'dictionary')
            AND (EXISTS (SELECT FROM stg.restaurants WHERE object_id = k AND payload::text = p)
                 OR EXISTS (SELECT FROM stg.restaurant_history WHERE object_id = k AND payload::text = p)));
END
$$;

-- Where the last value written to a Redis key went.
CREATE FUNCTION t.redis_unaccounted(k text, v bytea, keep integer) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    s text;
BEGIN
    SELECT state INTO s FROM dwh.redis_keys WHERE key = k;
    IF s IS NULL THEN
        RETURN 'the key is not in dwh.redis_keys';
    ELSIF s = 'mirrored' THEN
        IF t.as_jsonb(v) IS NULL THEN
            RETURN 'mirrored, but PostgreSQL does not read the value as JSON';
        ELSIF NOT t.stg_stored('dictionary', k, v, false) THEN
            RETURN 'mirrored, but the value is in no STG table';
        END IF;
    ELSIF s = 'refused' THEN
        IF NOT EXISTS (SELECT FROM dwh.dead_letters
                       WHERE source = 'redis' AND source_key = k
                         AND raw_sha256 = sha256(v) AND raw_length = length(v)
                         AND raw = substring(v FROM 1 FOR keep)
                         AND sqlstate !~ '^XX') THEN
            RETURN 'refused, but no dead letter keeps the value; the key''s dead letters: '
                || coalesce((SELECT string_agg(format('%s %s bytes %s', sqlstate, raw_length, left(reason, 80)), '; ' ORDER BY id)
                             FROM dwh.dead_letters WHERE source = 'redis' AND source_key = k), 'none')
                || '; its state: ' || (SELECT concat_ws(' ', kind, state, reason) FROM dwh.redis_keys WHERE key = k);
        END IF;
    ELSE
        RETURN 'state ' || s || ' after two refreshes';
    END IF;
    RETURN NULL;
END
$$;

-- Every row of every table of stg, dds, cdm and dwh: one line per table,
-- its row count and the MD5 of its rows' text, sorted.
CREATE FUNCTION t.fingerprint() RETURNS SETOF text
LANGUAGE plpgsql AS $$
DECLARE
    r record;
    h text;
BEGIN
    FOR r IN SELECT format('%I.%I', n.nspname, c.relname) AS name
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.relkind = 'r' AND n.nspname IN ('stg', 'dds', 'cdm', 'dwh')
             ORDER BY 1
    LOOP
        EXECUTE format('SELECT count(*) || '' '' || coalesce(md5(string_agg(x::text, E''\n'' ORDER BY x::text COLLATE "C")), '''') FROM %s x',
                       r.name) INTO h;
        RETURN NEXT r.name || ' ' || h;
    END LOOP;
END
$$;
});
sql('postgres', 'CREATE DATABASE fuzz TEMPLATE fuzz_template');
sql('postgres', 'CREATE DATABASE fuzz_redis TEMPLATE fuzz_template');
# Only now that it exists (a missing dwh.database is another matter).
sql('postgres', "ALTER SYSTEM SET dwh.database = 'fuzz_redis'");
$node->reload;

# A fresh database for one try of a shrinker.
sub scratch_db
{
	sql('postgres', 'DROP DATABASE IF EXISTS fuzz_scratch WITH (FORCE)');
	sql('postgres', 'CREATE DATABASE fuzz_scratch TEMPLATE fuzz_template');
	return 'fuzz_scratch';
}

#
# The corpus: the generator's orders (with its own malformed lines,
# redeliveries, status changes, late versions and escaped names), messages
# of another type, and its dictionaries.
#

my $gen = "/usr/bin/python3 $root/tools/dwh-gen";
my $gen_seed = $seed % 1000000 + 1;
my @orders = split /\n/,
  `$gen orders --count 300 --seed $gen_seed --escaped 0.3 --reversals 0.05 --malformed 0.03 --unknown-dishes 0.05`;
die 'dwh-gen orders failed' if $? != 0 || !@orders;
my @order_ids = map { /^\{"object_id":(\d+),/ ? $1 : () } @orders;
my @dictionary = map { [ split /\t/, $_, 2 ] } split /\n/, `$gen dictionaries`;
die 'dwh-gen dictionaries failed' if $? != 0 || !@dictionary;
my @heartbeats = map {
	sprintf('{"object_id":%d,"object_type":"%s","sent_dttm":"2023-01-0%d 12:00:00"}',
		$_, $_ % 3 ? 'heartbeat' : 'status', $_ % 9 + 1)
} 1 .. 20;
note('corpus: ' . scalar(@orders) . ' order lines, ' . scalar(@dictionary) . ' dictionary values');

# A message for the ingest: a quarter of them as the generator wrote them.
sub next_message
{
	my ($r) = @_;
	my $base = $r->chance(0.06) ? $r->pick(@heartbeats) : $r->pick(@orders);
	return ($base, 'as generated') if $r->chance(0.25);
	return mutate($r, $base);
}

#
# Failures: each is reported with the seed and the smallest failing input
# found within the shrink budget.
#

my @failures;
my $shrink_deadline;

sub report_failure
{
	my ($path, $where, $problems, $inputs, $fails) = @_;
	my $report = "040_fuzz: FAILED with seed $seed (DWH_FUZZ_SEED=$seed to repeat): "
	  . "$path, $where:\n  " . join("\n  ", @$problems[ 0 .. ($#$problems < 9 ? $#$problems : 9) ]);
	diag($report);
	push @failures, $report;

	# Shrink: first the list of inputs, then the one input left.
	$shrink_deadline //= time() + $shrink_budget;
	my $started = time();
	my @small = @$inputs;
	if (@small > 1 && time() < $shrink_deadline)
	{
		@small = shrink_list(\@small, $fails, $shrink_deadline);
	}
	if (@small == 1 && time() < $shrink_deadline)
	{
		my $item = $small[0];
		my $bytes = shrink_message($item->{bytes},
			sub { $fails->([ { %$item, bytes => $_[0] } ]) }, $shrink_deadline);
		@small = ({ %$item, bytes => $bytes });
	}
	diag(sprintf('smallest failing input found in %.0f s (%s): %d item(s)',
			time() - $started,
			time() >= $shrink_deadline ? 'shrink budget spent' : 'no smaller one fails',
			scalar @small));
	foreach my $item (@small)
	{
		diag("  $item->{label}: " . show_bytes($item->{bytes}, 2000));
		diag('  hex: ' . unpack('H*', $item->{bytes})) if length($item->{bytes}) <= 1000;
	}
	return;
}

#
# Path 1: dwh.ingest_orders.
#

my @next_offset = (0, 0, 0, 0);
my $batch_counter = 0;
my %ingest_stats = (batches => 0, messages => 0, refed => 0);

# Feed messages as batch $b at the given positions; returns the problems
# found.  Some batches are fed a second time, which must change nothing.
sub feed_batch
{
	my ($db, $b, $msgs, $positions, $keep, $refeed) = @_;
	my @problems;
	my $values = join(",\n",
		map { sprintf('(%d, %d, %d, %d, %d, %s)', $b, $_, $keep, @{ $positions->[$_] }, hex_literal($msgs->[$_])) }
		  0 .. $#$msgs);
	my $call = "SELECT concat_ws('|', received, applied, unchanged, other_type, dead_lettered, replayed, mismatched) "
	  . "FROM dwh.ingest_orders(ARRAY(SELECT msg FROM t.fed WHERE batch = $b ORDER BY idx), 'fuzz', "
	  . "ARRAY(SELECT kafka_partition FROM t.fed WHERE batch = $b ORDER BY idx), "
	  . "ARRAY(SELECT kafka_offset FROM t.fed WHERE batch = $b ORDER BY idx));\n";
	my ($rc, $out, $err) = run_script($db,
		"SET dwh.dead_letter_keep_bytes = $keep;\nINSERT INTO t.fed VALUES $values;\n$call");
	push @problems, server_trouble();
	if ($rc != 0 || $err ne '')
	{
		push @problems, "ingest error: dwh.ingest_orders failed: $err";
		return @problems;
	}
	my %n;
	@n{qw(received applied unchanged other dead replayed mismatched)} = split /\|/, $out;
	my $n = @$msgs;
	push @problems, "counts: received $n{received}, handed $n" if $n{received} != $n;
	my $sum = $n{applied} + $n{unchanged} + $n{other} + $n{dead} + $n{replayed};
	push @problems, "counts: received $n{received} but applied + unchanged + other_type + dead_lettered + replayed = $sum ($out)"
	  if $sum != $n{received};
	push @problems, "counts: replayed $n{replayed}, mismatched $n{mismatched} at fresh positions ($out)"
	  if $n{replayed} != 0 || $n{mismatched} != 0;
	my ($dead, $other) = split /\|/, sql($db, "SELECT dead, other FROM t.stored_at($b)");
	push @problems, "counts: dead_lettered $n{dead} and other_type $n{other}, but $dead dead letters and $other other events stored"
	  if $dead != $n{dead} || $other != $n{other};
	foreach my $line (split /\n/, sql($db, "SELECT idx || ': ' || problem FROM t.unaccounted($b)"))
	{
		push @problems, "unaccounted: message $line";
	}
	return @problems if @problems || !$refeed;

	# The same messages at the same positions again.
	my $before = sql($db, 'SELECT * FROM t.fingerprint()');
	($rc, $out, $err) = run_script($db, "SET dwh.dead_letter_keep_bytes = $keep;\n$call");
	push @problems, server_trouble();
	if ($rc != 0 || $err ne '')
	{
		push @problems, "refeed: dwh.ingest_orders failed the second time: $err";
		return @problems;
	}
	my $expected = join('|', $n, 0, $n{applied} + $n{unchanged}, 0, 0, $n{dead} + $n{other}, 0);
	push @problems, "refeed: fed again, the counts are $out, not $expected" if $out ne $expected;
	my $after = sql($db, 'SELECT * FROM t.fingerprint()');
	if ($after ne $before)
	{
		my %was = map { (split / /)[0] => $_ } split /\n/, $before;
		push @problems, map { "refeed: fed again, a table changed: $was{(split / /)[0]} -> $_" }
		  grep { ($was{ (split / /)[0] } // '') ne $_ } split /\n/, $after;
	}
	return @problems;
}

my $ingest_rng = $rng->child;

sub ingest_round
{
	my $r = $ingest_rng;
	my $n = $r->pick(1, 1, 2, 5, 10, 20, 30, 40, 60);
	my (@msgs, @what, @positions);
	for (1 .. $n)
	{
		my ($bytes, $what) = next_message($r);
		push @msgs, $bytes;
		push @what, $what;
		my $p = $r->below(4);
		push @positions, [ $p, $next_offset[$p]++ ];
	}
	my $keep = $r->pick(0, 1, 17, 100, 1024, 4096, 65536, 1048576);
	my $refeed = $r->chance(0.3);
	my $b = ++$batch_counter;
	my @problems = feed_batch('fuzz', $b, \@msgs, \@positions, $keep, $refeed);
	$ingest_stats{batches}++;
	$ingest_stats{messages} += $n;
	$ingest_stats{refed}++ if $refeed;
	return 1 unless @problems;

	my ($kind) = $problems[0] =~ /^(\w+):/;
	$kind //= 'other';
	report_failure(
		'ingest', "batch $b ($n messages, dwh.dead_letter_keep_bytes $keep"
		  . ($refeed ? ', fed twice' : '') . ')',
		\@problems,
		[ map { { bytes => $msgs[$_], label => "message $_ ($what[$_])" } } 0 .. $#msgs ],
		sub {
			my ($items) = @_;
			my @bytes = map { $_->{bytes} } @$items;
			my @pos = map { [ 0, $_ ] } 0 .. $#bytes;
			my @again = feed_batch(scratch_db(), 1, \@bytes, \@pos, $keep, $refeed);
			return scalar grep { /^\Q$kind\E:/ } @again;
		});
	return 0;
}

#
# Path 2: direct writes to the STG tables.
#

my $stg_rng = $rng->child;
my %stg_stats = (statements => 0, ok => 0);
my %sqlstates;

my %stg_table = (order => 'stg.order_events', user => 'stg.users', restaurant => 'stg.restaurants');

# The payload of an order line, as bytes (the generator's malformed lines
# have none: a payload of another order then).
sub order_payload
{
	my ($r) = @_;
	for (1 .. 10)
	{
		my $tree = parse_json($r->pick(@orders));
		next unless $tree && $tree->{t} eq 'o';
		my ($pair) = grep { $_->[0] eq 'payload' } @{ $tree->{v} };
		return encode_json_tree($pair->[1]) if $pair;
	}
	return '{}';
}

# One row of a direct write: kind, key (as SQL literal text), payload bytes
# (or undef for NULL), and for orders the sent_dttm text.
sub stg_row
{
	my ($r, $kind) = @_;
	my ($key, $value);
	if ($kind eq 'order')
	{
		$key = $r->chance(0.9) ? $r->pick(@order_ids)
		  : $r->pick('0', '-1', '9223372036854775807', '1e3', '99999999999999999999');
		$value = order_payload($r);
	}
	else
	{
		my $d = $r->pick(@dictionary);
		$key = $d->[0];
		$value = $d->[1];
	}
	($value, my $what) = $r->chance(0.8) ? mutate($r, $value) : ($value, 'as generated');
	my $sent = $r->chance(0.9) ? '2023-02-01 12:00:00'
	  : $r->pick('2023-01-01 24:00:00', '10000-01-01 00:00:00', 'now', 'garbage',
		'2023-01-01 23:59:59.9999999');
	return {
		kind => $kind,
		key => $key,
		value => $r->chance(0.03) ? undef : $value,
		what => $what,
		sent => $sent
	};
}

sub payload_sql
{
	my ($row) = @_;
	return 'NULL' unless defined $row->{value};
	return "convert_from(" . hex_literal($row->{value}) . ", 'UTF8')::jsonb";
}

sub columns_of
{
	return $_[0] eq 'order' ? '(object_id, object_type, sent_dttm, payload)' : '(object_id, payload)';
}

# COPY text format of a value: backslash, tab, newline and return escaped,
# and a NUL byte written in octal (psql reads a script's COPY data as C
# strings: a raw NUL would cut the line, and the rest of the script would
# become data).
sub copy_field
{
	my ($bytes) = @_;
	return '\\N' unless defined $bytes;
	$bytes =~ s/\\/\\\\/g;
	$bytes =~ s/\t/\\t/g;
	$bytes =~ s/\n/\\n/g;
	$bytes =~ s/\r/\\r/g;
	$bytes =~ s/\x00/\\000/g;
	return $bytes;
}

# The SQL of a direct write.
sub statement_sql
{
	my ($s) = @_;
	my ($kind, $form, $rows) = @$s{qw(kind form rows)};
	my $table = $stg_table{$kind};
	my $cols = columns_of($kind);
	if ($form eq 'update')
	{
		return "UPDATE $table SET payload = " . payload_sql($rows->[0])
		  . " WHERE object_id = '$rows->[0]{key}';";
	}
	if ($form eq 'copy')
	{
		return "COPY $table $cols FROM STDIN;\n"
		  . join('', map {
				join("\t", $_->{key}, $kind eq 'order' ? ('order', $_->{sent}) : (),
					copy_field($_->{value})) . "\n"
			} @$rows)
		  . "\\.";
	}
	my $set = $kind eq 'order'
	  ? 'SET payload = EXCLUDED.payload, sent_dttm = EXCLUDED.sent_dttm'
	  : 'SET payload = EXCLUDED.payload';
	return "INSERT INTO $table $cols VALUES "
	  . join(', ', map {
			$kind eq 'order'
			  ? "('$_->{key}', 'order', '$_->{sent}', " . payload_sql($_) . ')'
			  : "('$_->{key}', " . payload_sql($_) . ')'
		} @$rows)
	  . ($form eq 'insert' ? '' : " ON CONFLICT (object_id) DO UPDATE $set") . ';';
}

# A direct write of 1 to 3 rows of one kind: an upsert, a plain insert, an
# update, a multi-row upsert (which may name a key twice) or a COPY.
sub stg_statement
{
	my ($r) = @_;
	my $kind = $r->pick('order', 'order', 'user', 'restaurant');
	my $form = $r->pick('upsert', 'upsert', 'upsert', 'insert', 'update', 'multi', 'copy');
	my $n = $form eq 'multi' || $form eq 'copy' ? $r->range(1, 3) : 1;
	return { kind => $kind, form => $form, rows => [ map { stg_row($r, $kind) } 1 .. $n ] };
}

# Run statements as one psql script; returns the problems found.  Each
# statement is announced on stderr (\warn), so that its errors follow its
# announcement: psql's line numbers do not count what it skips of a COPY's
# data after an error.
sub run_stg_statements
{
	my ($db, $statements) = @_;
	my @problems;
	my $script = '';
	foreach my $i (0 .. $#$statements)
	{
		my $st = $statements->[$i];

		$script .= "\\warn fuzz statement $i\n";
		# Whether an UPDATE's row is there before it (a row count would not
		# say: an older version goes to the history, and the count is 0).
		$script .= "SELECT 'fuzz row $i ' || EXISTS (SELECT FROM $stg_table{$st->{kind}} WHERE object_id = '$st->{rows}[0]{key}');\n"
		  if $st->{form} eq 'update';
		$script .= statement_sql($st) . "\n";
	}
	my ($rc, $out, $err) = run_script($db, $script);
	push @problems, server_trouble();

	my %error;
	my $i = -1;
	my $announced = 0;
	foreach my $l (split /\n/, $err)
	{
		if ($l =~ /^fuzz statement (\d+)$/)
		{
			$i = $1;
			$announced++;
		}
		elsif ($l =~ /^psql:[^:]*:\d+: (ERROR|FATAL|PANIC):\s+([0-9A-Z]{5}): (.*)$/)
		{
			$error{$i} //= [ $2, $3 ];
			$sqlstates{$2}++;
			push @problems, "internal error: statement $i: $2 $3" if $2 =~ /^XX/;
		}
		elsif ($l =~ /^psql:.*(server closed|connection to server|no connection)/)
		{
			push @problems, "crash: psql: $l";
		}
		elsif ($l =~ /^psql:[^:]*:\d+: (?!NOTICE|WARNING|INFO)/)
		{
			# An error without a SQLSTATE, or psql itself refusing the script.
			push @problems, "script: statement $i: $l";
		}
	}
	push @problems, "crash: psql exited with $rc" if $rc > 1;
	push @problems, "script: psql ran $announced of " . scalar(@$statements) . ' statements'
	  if $announced != @$statements && !@problems;

	# What went through must be in STG.  An UPDATE of a key absent before it
	# wrote nothing (a later statement may write the key).
	my %row_before = $out =~ /^fuzz row (\d+) (true|false)$/mg;
	my @checks;
	foreach my $i (0 .. $#$statements)
	{
		next if $error{$i};
		next if $statements->[$i]{form} eq 'update' && ($row_before{$i} // 'true') eq 'false';
		$stg_stats{ok}++;
		my $s = $statements->[$i];
		foreach my $row (grep { defined $_->{value} } @{ $s->{rows} })
		{
			push @checks, sprintf("(%d, '%s', '%s', %s, %s)", $i, $s->{kind}, $row->{key},
				hex_literal($row->{value}), $s->{form} eq 'update' ? 'true' : 'false');
		}
	}
	$stg_stats{statements} += @$statements;
	if (@checks && !grep { /^crash:/ } @problems)
	{
		foreach my $i (split /\n/, sql($db,
			'SELECT DISTINCT i FROM (VALUES ' . join(",\n", @checks)
			  . ') v(i, kind, k, m, missing_ok) WHERE NOT t.stg_stored(kind, k, m, missing_ok) ORDER BY i'))
		{
			push @problems, "unaccounted: statement $i succeeded, but its value is in no STG table";
		}
	}
	return @problems;
}

sub stg_round
{
	my $r = $stg_rng;
	my @statements = map { stg_statement($r) } 1 .. $r->range(1, 8);
	my @problems = run_stg_statements('fuzz', \@statements);
	return 1 unless @problems;

	my ($kind) = $problems[0] =~ /^(\w+):/;
	$kind //= 'other';
	report_failure(
		'stg', 'a script of ' . scalar(@statements) . ' direct writes',
		\@problems,
		[
			map {
				{
					bytes => $_->{rows}[0]{value} // '',
					label => "$_->{form} into $stg_table{$_->{kind}} ($_->{rows}[0]{what}): "
					  . show_bytes(statement_sql($_), 300),
					statement => $_
				}
			} @statements
		],
		sub {
			my ($items) = @_;
			# The first row's value is what a message shrinker changes.
			my @s = map {
				my %copy = %{ $_->{statement} };
				$copy{rows} = [ @{ $copy{rows} } ];
				$copy{rows}[0] = { %{ $copy{rows}[0] }, value => $_->{bytes} }
				  if defined $copy{rows}[0]{value};
				\%copy;
			} @$items;
			my @again = run_stg_statements(scratch_db(), \@s);
			return scalar grep { /^\Q$kind\E:/ } @again;
		});
	return 0;
}

#
# Path 3: the Redis worker.
#

my $redis_rng = $rng->child;
my %redis_stats = (rounds => 0, values => 0);

sub refreshes
{
	return sql('fuzz_redis', q{SELECT coalesce(max(refreshes), 0) FROM dwh.status WHERE worker = 'redis'});
}

# Wait for two more refresh passes than now: one may have begun before the
# values changed, the next saw them.
sub wait_two_refreshes
{
	my $target = refreshes() + 2;
	my $deadline = time() + 60;
	while (time() < $deadline)
	{
		return 1 if refreshes() >= $target;
		usleep(100_000);
	}
	return 0;
}

# SET a key to a value.  IPC::Run hands nothing to redis-cli's stdin for
# the one value "0" (false in Perl): that one goes as an argument.
sub redis_set
{
	my ($key, $value) = @_;
	if ($value eq '0')
	{
		my $out = $redis->cli('SET', $key, '0');
		die "SET $key: $out" unless $out eq 'OK';
		return;
	}
	$redis->set($key, $value);
	return;
}

# Set values and check where each went; returns the problems found.
sub redis_values
{
	my (%values) = @_;
	my @problems;
	redis_set($_, $values{$_}) foreach sort keys %values;
	push @problems, 'stalled: the Redis worker did not refresh twice in 60 s: '
	  . sql('fuzz_redis', q{SELECT state || ' ' || coalesce(last_error, '') FROM dwh.status WHERE worker = 'redis'})
	  unless wait_two_refreshes();
	push @problems, server_trouble();
	my $checks = join(",\n", map { sprintf("('%s', %s)", $_, hex_literal($values{$_})) } sort keys %values);
	foreach my $line (split /\n/, sql('fuzz_redis',
		"SELECT k || ': ' || p FROM (SELECT k, t.redis_unaccounted(k, v, $worker_keep) AS p FROM (VALUES $checks) x(k, v)) s WHERE p IS NOT NULL"))
	{
		push @problems, "unaccounted: key $line";
	}
	return @problems;
}

my $shrink_key = 0;

sub redis_round
{
	my $r = $redis_rng;
	my %values;
	my %what;
	for (1 .. $r->range(1, 12))
	{
		my $d = $r->pick(@dictionary);
		my ($value, $what) = $r->chance(0.8) ? mutate($r, $r->chance(0.9) ? $d->[1] : $r->pick(@dictionary)->[1]) : ($d->[1], 'as generated');
		$values{ $d->[0] } = $value;
		$what{ $d->[0] } = $what;
	}
	my @problems = redis_values(%values);
	$redis_stats{rounds}++;
	$redis_stats{values} += keys %values;
	return 1 unless @problems;

	my ($kind) = $problems[0] =~ /^(\w+):/;
	$kind //= 'other';
	report_failure(
		'redis', 'a round of ' . scalar(keys %values) . ' values',
		\@problems,
		[ map { { bytes => $values{$_}, label => "key $_ ($what{$_})" } } sort keys %values ],
		sub {
			my ($items) = @_;
			# Under fresh keys, so that nothing before counts.
			my %v = map { ('fuzz-shrink-' . $shrink_key++ => $_->{bytes}) } @$items;
			my @again = redis_values(%v);
			$redis->del(keys %v);
			return scalar grep { /^\Q$kind\E:/ } @again;
		});
	return 0;
}

#
# The run.
#

# The Redis worker's database holds orders too, so that menus and users
# count in its marts; the dictionaries are mirrored before fuzzing starts.
my @clean = split /\n/, `$gen orders --count 150 --clean --seed $gen_seed`;
is( sql('fuzz_redis',
		'SELECT applied FROM dwh.ingest_orders(ARRAY['
		  . join(', ', map { hex_literal($_) } @clean) . '])'),
	scalar(@clean),
	'the orders of the Redis worker\'s database are applied');
$redis->set($_->[0], $_->[1]) foreach @dictionary;
ok( $node->poll_query_until('fuzz_redis',
		"SELECT count(*) = " . scalar(@dictionary) . " FROM dwh.redis_keys WHERE state = 'mirrored'"),
	'the Redis worker mirrors the dictionaries');

# What the fuzzer found, checked on its own on every run.  A Redis value
# holding a number beyond numeric's range is refused with 22003, and the
# other values of its batch are mirrored (the worker retried the batch
# for good: the error was raised while the value was classified).
$redis->set('fuzz-found-1', '{"name": "n", "login": "l", "tiny": 1e-100000}');
$redis->set('fuzz-found-2', '{"name": "m", "login": "k", "huge": 1e131071}');
ok( $node->poll_query_until('fuzz_redis',
		q{SELECT count(*) = 2 FROM dwh.redis_keys
		  WHERE key LIKE 'fuzz-found-%' AND state IN ('mirrored', 'refused')}),
	'a value with a number beyond numeric\'s range does not stall the Redis worker');
is( sql('fuzz_redis',
		q{SELECT string_agg(key || ' ' || state || ' ' || coalesce(reason, '-'), E'\n' ORDER BY key)
		  FROM dwh.redis_keys WHERE key LIKE 'fuzz-found-%'}),
	"fuzz-found-1 refused value cannot be stored as jsonb: value overflows numeric format\n"
	  . 'fuzz-found-2 mirrored -',
	'it is refused with its reason, its neighbour with a huge number is mirrored');
is( sql('fuzz_redis',
		q{SELECT concat_ws(' ', sqlstate, raw_length,
		                   raw = convert_to('{"name": "n", "login": "l", "tiny": 1e-100000}', 'UTF8'))
		  FROM dwh.dead_letters WHERE source_key = 'fuzz-found-1'}),
	'22003 46 t', 'and dead-lettered with 22003, its bytes kept');
is(join("\n", server_trouble()), '', 'no trouble in the server log before fuzzing');

my $deadline = time() + $budget;
while (time() < $deadline && !@failures)
{
	# A fixed pattern, so that a seed gives the same inputs in the same
	# order whatever the machine's speed.
	foreach my $round (qw(ingest ingest ingest stg ingest ingest ingest stg redis))
	{
		my $ok = $round eq 'ingest' ? ingest_round() : $round eq 'stg' ? stg_round() : redis_round();
		last unless $ok;
		last if time() >= $deadline;
	}
}
diag(sprintf('040_fuzz: %d ingest batches (%d messages, %d fed twice), %d direct writes (%d succeeded), %d Redis values in %d rounds',
		$ingest_stats{batches}, $ingest_stats{messages}, $ingest_stats{refed},
		$stg_stats{statements}, $stg_stats{ok}, $redis_stats{values}, $redis_stats{rounds}));
note('SQLSTATEs of refused direct writes: ' . join(', ', map { "$_ x$sqlstates{$_}" } sort keys %sqlstates));
note('dead letters by SQLSTATE: '
	  . sql('fuzz', q{SELECT string_agg(sqlstate || ' x' || n, ', ' ORDER BY sqlstate) FROM (SELECT sqlstate, count(*) n FROM dwh.dead_letters GROUP BY 1) s}));

ok(!@failures, 'every batch, direct write and Redis value accounted for, no crash')
  or diag(join("\n", @failures));
ok($ingest_stats{batches} > 0 && $stg_stats{statements} > 0 && $redis_stats{rounds} > 0,
	'all three paths were fuzzed');

#
# The end: the warehouses are consistent and survive a dump and restore.
#

# The Redis worker goes idle first: nothing writes while the dump is taken.
$node->safe_psql('postgres', "ALTER SYSTEM SET dwh.redis_url = ''");
$node->reload;
ok( $node->poll_query_until('fuzz_redis',
		q{SELECT state LIKE 'idle%' FROM dwh.status WHERE worker = 'redis'}),
	'the Redis worker is idle');

# Columns that record when and how a row was loaded (docs/data-rule.md,
# "Load-time columns").
sub load_time_column
{
	my ($schema, $table, $column) = @_;
	return 1 if $column eq 'id' && $schema ne 'dds';
	return 1 if $column eq 'loaded_at' || $column eq 'received_at';
	return 1
	  if $schema eq 'dds'
	  && $table =~ /^[hl]_/
	  && $table ne 'l_product_category'
	  && ($column eq 'load_dt' || $column eq 'load_src');
	return 0;
}

# Every table of stg, dds, cdm and dwh as sorted lines of text, load-time
# columns aside.  dwh.redis_wanted is a queue: distinct rows (a restore
# queues the ids of the hubs it rebuilds again).
sub table_rows
{
	my ($db) = @_;
	my %columns;
	foreach my $line (split /\n/, sql($db, q{
SELECT c.table_schema, c.table_name, c.column_name
FROM information_schema.columns c
JOIN information_schema.tables t USING (table_schema, table_name)
WHERE c.table_schema IN ('stg', 'dds', 'cdm', 'dwh') AND t.table_type = 'BASE TABLE'
ORDER BY 1, 2, c.ordinal_position}))
	{
		my ($schema, $table, $column) = split /\|/, $line;
		push @{ $columns{"$schema.$table"} }, $column
		  unless load_time_column($schema, $table, $column);
	}
	my %rows;
	foreach my $t (sort keys %columns)
	{
		my $row = 'concat_ws(\' | \', ' . join(', ', map { qq{coalesce("$_"::text, 'NULL')} } @{ $columns{$t} }) . ')';
		my $distinct = $t eq 'dwh.redis_wanted' ? 'DISTINCT ' : '';
		$rows{$t} = sql($db, "SELECT r FROM (SELECT $distinct$row AS r FROM $t) s ORDER BY r COLLATE \"C\"");
	}
	return \%rows;
}

# Dump a database, restore it into a fresh one; returns the problems.
sub dump_restore
{
	my ($db) = @_;
	my @problems;
	my $dump = "$tmp/$db.dump";
	my $restored = "${db}_restored";
	my ($out, $err) = ('', '');
	IPC::Run::run([ 'pg_dump', '-Fc', '-f', $dump, '-d', $node->connstr($db) ], '>', \$out, '2>', \$err)
	  or push @problems, "pg_dump failed: $err";
	return @problems if @problems;
	sql('postgres', "DROP DATABASE IF EXISTS $restored");
	sql('postgres', "CREATE DATABASE $restored");
	($out, $err) = ('', '');
	IPC::Run::run([ 'pg_restore', '-d', $node->connstr($restored), $dump ], '>', \$out, '2>', \$err)
	  or push @problems, "pg_restore failed: $err";
	push @problems, "pg_restore reported: $err" if $err ne '' && !@problems;
	push @problems, server_trouble();

	my $before = table_rows($db);
	my $after = table_rows($restored);
	foreach my $t (sort keys %$before)
	{
		my ($b, $a) = ($before->{$t}, $after->{$t} // '(no such table)');
		if ($t eq 'dwh.redis_wanted')
		{
			my %has = map { $_ => 1 } split /\n/, $a;
			my @lost = grep { !$has{$_} } split /\n/, $b;
			push @problems, "$t: the restore lost " . scalar(@lost) . " queued keys" if @lost;
			next;
		}
		next if $a eq $b;
		my %in_after = map { $_ => 1 } split /\n/, $a;
		my %in_before = map { $_ => 1 } split /\n/, $b;
		my @gone = grep { !$in_after{$_} } split /\n/, $b;
		my @new = grep { !$in_before{$_} } split /\n/, $a;
		push @problems, sprintf("%s differs after the restore: %d rows lost, %d rows new; first lost: %s; first new: %s",
			$t, scalar @gone, scalar @new, $gone[0] // '-', $new[0] // '-');
	}
	my $verify = sql($restored, 'SELECT count(*) FROM dwh.verify()');
	push @problems, "dwh.verify() returns $verify rows after the restore" if $verify ne '0';
	return @problems;
}

foreach my $db ('fuzz', 'fuzz_redis')
{
	is(sql($db, 'SELECT count(*) FROM dwh.verify()'), '0', "$db: dwh.verify() is empty")
	  or diag(sql($db, 'SELECT * FROM dwh.verify() LIMIT 20'));
	my @problems = dump_restore($db);
	ok(!@problems, "$db: pg_dump -Fc and pg_restore give the same rows in every table of stg, dds, cdm and dwh")
	  or diag("seed $seed: " . join("\n", @problems));
}
is(join("\n", server_trouble()), '', 'no trouble in the server log at the end');

$node->stop;
$redis->stop;
done_testing();
