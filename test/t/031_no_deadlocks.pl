# Concurrent writers never deadlock, and what they leave is what one writer
# leaves.  Several connections ingest overlapping random batches of one
# order stream (every message reaches two or three of them, in different
# orders and batch sizes), one writes order versions directly with upserts
# (carried through DDS in chunks of a few rows), and one changes menus all along (dishes renamed and moved to other
# categories, which takes the dictionary lock exclusively).  The test then
# asserts that the server logged no deadlock, that every statement
# succeeded, that dwh.verify() is empty, and that every stg, dds and cdm
# table holds the same rows (but for load-time columns) as a database that
# received the same messages and menus once, one at a time.
#
# Environment: DWH_DEADLOCK_ORDERS (150000) orders in the stream (a minute
# and a half of concurrent writing on 2 cores; more for longer runs),
# DWH_DEADLOCK_SEED (random) drives batching and interleaving; the seed is
# printed.

use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;

use DwhTest;
use IPC::Run;
use List::Util qw(shuffle);
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $orders = $ENV{DWH_DEADLOCK_ORDERS} // 150000;
my $seed = $ENV{DWH_DEADLOCK_SEED} // int(rand(1_000_000));
note("seed $seed (DWH_DEADLOCK_SEED=$seed reruns it), $orders orders");
srand($seed);

my $node = new_dwh_node('no_deadlocks');
$node->append_conf('postgresql.conf',
	"deadlock_timeout = '50ms'\nlog_lock_waits = on\nmax_connections = 40\n");
$node->restart;
my $tmp = PostgreSQL::Test::Utils::tempdir();

# The stream: status changes, redeliveries, late versions, reversals; no
# malformed lines, so that it can also be written directly.
my $stream = generate_orders("$tmp/orders.txt", '--count', $orders,
	'--seed', $seed % 1000 + 1, '--malformed', '0', '--unknown-dishes', '0.02');
my @lines = split /\n/, slurp_file($stream);
note(scalar(@lines) . ' messages');

foreach my $db ('concurrent', 'sequential')
{
	$node->safe_psql('postgres', "CREATE DATABASE $db");
	$node->safe_psql($db, 'CREATE EXTENSION dwh');
}
load_dictionaries($node);
foreach my $db ('concurrent', 'sequential')
{
	# The same dictionaries in both databases.
	$node->safe_psql(
		$db, qq{
CREATE TEMP TABLE dict (key text, value jsonb);
COPY dict FROM '$PostgreSQL::Test::Utils::tmp_check/dictionaries.tsv'
  WITH (FORMAT csv, DELIMITER E'\\t', QUOTE E'\\x01');
INSERT INTO stg.users (object_id, payload)
SELECT key, value FROM dict WHERE NOT value ? 'menu';
INSERT INTO stg.restaurants (object_id, payload)
SELECT key, value FROM dict WHERE value ? 'menu';
CREATE TABLE public.lines (n integer PRIMARY KEY, msg bytea NOT NULL);
});
}

# The messages, as bytes, into both databases.
open(my $fh, '>', "$tmp/lines.tsv") or die;
for my $i (0 .. $#lines)
{
	print $fh ($i + 1), "\t", unpack('H*', $lines[$i]), "\n";
}
close($fh);
chmod 0644, "$tmp/lines.tsv";
foreach my $db ('concurrent', 'sequential')
{
	$node->safe_psql($db, qq{
CREATE TEMP TABLE hex (n integer, h text);
COPY hex FROM '$tmp/lines.tsv';
INSERT INTO public.lines SELECT n, decode(h, 'hex') FROM hex;
});
}

# Menu versions: every few seconds of the stream's time, one restaurant
# renames a dish or moves it to another category.
my @restaurants = split /\n/, $node->safe_psql('concurrent',
	'SELECT object_id FROM stg.restaurants ORDER BY 1');
my @menu_statements;
for my $k (1 .. int($orders / 200) + 1)
{
	my $r = $restaurants[ $k % @restaurants ];
	my $ts = sprintf('2023-01-0%d %02d:%02d:00', 1 + $k % 7, $k % 24, $k % 60);
	my $change = $k % 2
	  ? qq{jsonb_set(e, '{name}', to_jsonb((e->>'name') || ' v$k'))}
	  : qq{jsonb_set(e, '{category}', to_jsonb(CASE WHEN e->>'category' = 'Супы' THEN 'Салаты' ELSE 'Супы' END))};
	push @menu_statements, qq{
INSERT INTO stg.restaurants (object_id, payload)
SELECT object_id, jsonb_set(jsonb_set(payload, '{update_ts_utc}', '"$ts"'), '{menu}',
       (SELECT jsonb_agg(CASE WHEN ord % 5 = $k % 5 AND e->>'_id' <> '' THEN $change ELSE e END ORDER BY ord)
        FROM jsonb_array_elements(payload->'menu') WITH ORDINALITY AS m(e, ord)))
FROM stg.restaurants WHERE object_id = '$r'
ON CONFLICT (object_id) DO UPDATE SET payload = EXCLUDED.payload;};
}
# The menus depend on what the restaurant held when the change ran: build
# them once, in the sequential database, and replay their results.
foreach my $statement (@menu_statements)
{
	$node->safe_psql('sequential', $statement);
}
my @menus = split /\n/, $node->safe_psql('sequential', q{
SELECT format('INSERT INTO stg.restaurants (object_id, payload) VALUES (%L, %L) '
              'ON CONFLICT (object_id) DO UPDATE SET payload = EXCLUDED.payload;',
              object_id, payload)
FROM (SELECT object_id, payload, update_ts FROM stg.restaurants
      UNION ALL SELECT object_id, payload, update_ts FROM stg.restaurant_history) v
WHERE update_ts >= '2023-01-01'
ORDER BY random()});
ok(scalar(@menus) >= 50, scalar(@menus) . ' menu versions to apply');

# Ingest statements of one connection: a random two thirds of the stream,
# in a random order, in batches of 1 to 400.
sub ingest_script
{
	my @mine = grep { rand() < 0.67 } shuffle(1 .. scalar(@lines));
	my @statements;
	while (@mine)
	{
		my @batch = splice(@mine, 0, 1 + int(rand(400)));
		push @statements,
		  'SELECT * FROM dwh.ingest_orders(ARRAY(SELECT msg FROM public.lines WHERE n = ANY (\'{'
		  . join(',', @batch) . '}\') ORDER BY n));';
	}
	return \@statements;
}

# Direct upserts of random orders' messages, a few at a time, carried
# through DDS in chunks of 3 to 10 rows (dwh.trigger_chunk_rows).
sub direct_script
{
	my @mine = grep { rand() < 0.3 } shuffle(1 .. scalar(@lines));
	my @statements;
	while (@mine)
	{
		my @batch = splice(@mine, 0, 1 + int(rand(20)));
		my $ids = join(',', @batch);
		my $chunk = 3 + int(rand(8));
		push @statements, qq{
SET dwh.trigger_chunk_rows = $chunk;
INSERT INTO stg.order_events AS t (object_id, object_type, sent_dttm, payload)
SELECT DISTINCT ON ((m->>'object_id')::bigint) (m->>'object_id')::bigint, 'order',
       (m->>'sent_dttm')::timestamp, m->'payload'
FROM (SELECT convert_from(msg, 'UTF8')::jsonb AS m FROM public.lines
      WHERE n = ANY ('{$ids}')) x
WHERE m->>'object_type' = 'order'
ORDER BY (m->>'object_id')::bigint, m->'payload'->>'update_ts' DESC,
         (m->'payload')::text COLLATE "C" DESC
ON CONFLICT (object_id) DO UPDATE
SET sent_dttm = EXCLUDED.sent_dttm, payload = EXCLUDED.payload;};
	}
	return \@statements;
}

# Run scripts on as many connections at once; returns their stderr.
sub run_at_once
{
	my ($db, @scripts) = @_;
	my @runs;
	my $k = 0;
	foreach my $script (@scripts)
	{
		my $file = "$tmp/script_" . $k++ . '.sql';
		open(my $out, '>', $file) or die;
		print $out "\\set ON_ERROR_STOP 0\n", join("\n", @$script), "\n";
		close($out);
		my %run = (out => '', err => '');
		$run{handle} = IPC::Run::start(
			[ 'psql', '-X', '-q', '-A', '-t', '-h', $node->host, '-p', $node->port,
			  '-d', $db, '-f', $file ],
			'<', \undef, '>', \$run{out}, '2>', \$run{err});
		push @runs, \%run;
	}
	$_->{handle}->finish foreach @runs;
	return map { $_->{err} } @runs;
}

my $log_start = -s $node->logfile;
my $started = time();
my @errors = run_at_once('concurrent', ingest_script(), ingest_script(),
	ingest_script(), direct_script(), [ map { ($_, 'SELECT pg_sleep(0.1);') } @menus ]);
note('concurrent writers took ' . (time() - $started) . ' s');
my $i = 0;
foreach my $err (@errors)
{
	is($err, '', 'connection ' . $i++ . ': every statement succeeded');
}

# Whatever a connection missed, another one brought: make sure every
# message was applied at least once, still concurrently with nothing.
$node->safe_psql('concurrent', q{
SELECT * FROM dwh.ingest_orders(ARRAY(SELECT msg FROM public.lines ORDER BY n))});

my $log = substr(slurp_file($node->logfile), $log_start);
my $deadlocks = () = $log =~ /deadlock detected/g;
is($deadlocks, 0, 'no deadlock detected in the server log');
my $waits = () = $log =~ /still waiting for/g;
note("$waits lock waits longer than deadlock_timeout");

# The same messages once, one batch at a time, menus after.
$node->safe_psql('sequential', q{
SELECT * FROM dwh.ingest_orders(ARRAY(SELECT msg FROM public.lines ORDER BY n))});

foreach my $db ('concurrent', 'sequential')
{
	is($node->safe_psql($db, 'SELECT count(*) FROM dwh.verify()'), '0',
		"$db: dwh.verify() is empty");
}

# Every table, but for load-time columns (docs/data-rule.md).
my @tables = split /\n/, $node->safe_psql('sequential', q{
SELECT format('%I.%I', table_schema, table_name) FROM information_schema.tables
WHERE table_schema IN ('stg', 'dds', 'cdm') AND table_type = 'BASE TABLE' ORDER BY 1});
foreach my $t (@tables)
{
	my @load_time = ('loaded_at', 'received_at');
	push @load_time, 'id' unless $t =~ /^dds\./;
	push @load_time, 'load_dt', 'load_src'
	  if $t =~ /^dds\.[hl]_/ && $t ne 'dds.l_product_category';
	my $drop = join(', ', map { "'$_'" } @load_time);
	my $query = qq{
SELECT count(*) || ' ' || md5(coalesce(string_agg(r, E'\\n' ORDER BY r COLLATE "C"), ''))
FROM (SELECT (to_jsonb(t) - ARRAY[$drop])::text AS r FROM $t t) s};
	is($node->safe_psql('concurrent', $query), $node->safe_psql('sequential', $query),
		"$t: the same rows as one writer leaves");
}

$node->stop;
done_testing();
