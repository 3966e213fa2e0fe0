# The data rule (docs/data-rule.md), as a seeded property test: the same
# events give the same warehouse, whatever their arrival order, batching,
# connections, redeliveries, or a dump and restore.
#
# For each seed a small random world is generated (SameEvents.pm): users,
# restaurants whose menus move, rename, drop and add dishes, and 10-40
# events mixing order versions (status reversals, changing items, ties on
# update_ts, exact redeliveries), user values and restaurant values (ties
# on update_ts_utc, values without it, blank menu entries).  The same event
# list is applied to fresh databases of one cluster:
#
#   inorder     one statement per event, in time order (the reference)
#   shuffled    one statement per event, in a random order
#   batches     dwh.ingest_orders() batches and multi-row dictionary upserts
#   concurrent  2-3 connections at once, one transaction per statement
#   copy        COPY of the events whose keys are new, upserts for the rest
#               (orders several in one, whose UPDATE is chunked too),
#               carried through DDS in chunks of 1 to 3 rows
#               (dwh.trigger_chunk_rows, as in both restores)
#   kafka       order messages produced to 3 partitions of a real broker and
#               applied by two workers, dictionary values written before,
#               while and after; then one partition replayed from the
#               world's first message with dwh.kafka_seek()
#   restore_j   pg_dump -Fc of one of them, pg_restore -j 4 into a new database
#   restore_data  the same dump, pg_restore --data-only after CREATE EXTENSION
#   icu         one statement per event, in a random order, in a database
#               whose default collation is ICU's root locale (the others
#               sort by bytes): names differing in case and script sort
#               otherwise there, and every tie must still be broken by bytes
#
# Proven for each database: every statement succeeds and nothing is
# dead-lettered; dwh.verify() is empty; every table of stg, dds and cdm
# (found in the catalog, so new tables are compared too) holds the same rows
# as the reference, load-time columns aside; and the tables equal an
# independent recount written here from the event list (SameEvents.pm):
# current and superseded versions in STG, hubs, links, satellites, and the
# two marts.  Tag rules of every kind, all-time and windowed, are defined in
# each database before its events (restores bring them), so the user tags
# are compared too (cdm.user_tag_events, the order of grants and revokes,
# is not).  The windows end at one fixed window_as_of in the future, which
# dwh.expire_tags() never moves, and start in the middle of the orders'
# dates: versions that change an order's date move it in and out of them.
# Ties between versions are settled by the payload's jsonb text
# form, which the test writes itself (checked against PostgreSQL's).
#
# On a failure the event list is shrunk (delta debugging, on fresh
# databases, within DWH_PROPERTY_SHRINK_SECONDS) and the smallest failing
# list is printed.
#
# Environment: DWH_PROPERTY_SEED (first seed; world i uses seed + i),
# DWH_PROPERTY_SECONDS (worlds are run until this many seconds are spent,
# default 180), DWH_PROPERTY_WORLDS (run exactly this many worlds instead),
# DWH_PROPERTY_SHRINK_SECONDS (default 60), DWH_PROPERTY_KEEP_GOING (go on
# with more worlds after a failing one).

use strict;
use warnings;
use utf8;

use FindBin;
use lib $FindBin::RealBin;

use Encode qw(decode encode);
use IPC::Run;
use JSON::PP;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use DwhTest qw(start_broker);
use SameEvents;
use Test::More;
use Time::HiRes qw(time usleep);

# Test::More's handles are the framework's (tied to the log file): text
# goes out as UTF-8 bytes.
sub utf8_diag { diag(map { encode('UTF-8', $_) } @_); return; }
sub utf8_note { note(map { encode('UTF-8', $_) } @_); return; }
$ENV{PGCLIENTENCODING} = 'UTF8';

my $base_seed = $ENV{DWH_PROPERTY_SEED} // (int(time() * 1000) ^ ($$ << 10)) % 1000000000;
my $budget = $ENV{DWH_PROPERTY_SECONDS} // 180;
my $fixed_worlds = $ENV{DWH_PROPERTY_WORLDS};
my $shrink_budget = $ENV{DWH_PROPERTY_SHRINK_SECONDS} // 60;
my $keep_going = $ENV{DWH_PROPERTY_KEEP_GOING};

diag("030_same_events: seed $base_seed (DWH_PROPERTY_SEED=$base_seed to repeat)");

# Path (k): a broker with one topic that this test alone writes, and two
# workers pointed at each world's database in turn (dwh.database), idle in
# between.
my $kafka_partitions = 3;
my $kafka_topic = 'property_orders';
my @kafka_end = (0) x $kafka_partitions;
my $broker = start_broker(topic => $kafka_topic, partitions => $kafka_partitions);

my $node = PostgreSQL::Test::Cluster->new('same_events');
$node->init(extra => [ '--encoding=UTF8', '--locale=C' ]);
$node->append_conf('postgresql.conf', <<"EOC");
shared_preload_libraries = 'dwh'
dwh.kafka_brokers = '$broker->{bootstrap}'
dwh.kafka_topic = '$kafka_topic'
dwh.kafka_consumers = 2
dwh.kafka_batch_wait = 10
dwh.database = 'kafka_idle'
EOC
$node->start;
$node->safe_psql('postgres', 'CREATE DATABASE kafka_idle');

my $tmp = PostgreSQL::Test::Utils::tempdir();

#
# Talking to the databases.
#

# Run SQL and return its output, as characters.
sub sql
{
	my ($db, $query) = @_;
	return decode('UTF-8', $node->safe_psql($db, encode('UTF-8', $query)));
}

# psql running a script file, each statement in its own transaction, going
# on after an error.  A statement is one line, except a COPY with its data.
# Returns the command and the first line of each statement.
my $script_counter = 0;

sub psql_script
{
	my ($db, $statements) = @_;
	my $file = sprintf('%s/script_%d.sql', $tmp, ++$script_counter);
	my ($line, @starts) = (1);
	open(my $fh, '>:encoding(UTF-8)', $file) or die "could not write $file: $!";
	foreach my $statement (@$statements)
	{
		push @starts, $line;
		print $fh "$statement\n";
		$line += 1 + ($statement =~ tr/\n//);
	}
	close($fh);
	return ([ 'psql', '-X', '-q', '-A', '-t', '-v', 'ON_ERROR_STOP=0',
		'-h', $node->host, '-p', $node->port, '-d', $db, '-f', $file ], \@starts);
}

# The errors psql reports for a script: a list of [statement index,
# message].  A psql that exits non-zero without saying which line failed
# gives index -1.
sub script_errors
{
	my ($stderr, $exit, $starts) = @_;
	my (@errors, $current);
	foreach my $line (split /\n/, decode('UTF-8', $stderr))
	{
		if ($line =~ /^psql:[^:]*:(\d+): (ERROR|FATAL|PANIC):\s*(.*)$/)
		{
			my $at = $1;
			my $i = scalar grep { $_ <= $at } @$starts;
			$current = [ $i - 1, "$2: $3" ];
			push @errors, $current;
		}
		elsif ($line =~ /^psql:/)
		{
			$current = undef;
			push @errors, [ -1, $line ] if $line =~ /server closed|connection .* lost/;
		}
		elsif ($current)
		{
			$current->[1] .= "\n    $line";
		}
	}
	push @errors, [ -1, "psql exited with $exit: $stderr" ] if $exit && !@errors;
	return @errors;
}

# Run statements; returns their errors as [statement index, message].
sub run_statements
{
	my ($db, $statements) = @_;
	return () unless @$statements;
	my ($out, $err) = ('', '');
	my ($cmd, $starts) = psql_script($db, $statements);
	IPC::Run::run($cmd, '<', \undef, '>', \$out, '2>', \$err);
	return script_errors($err, $? >> 8, $starts);
}

# Run scripts on as many connections at once.  Each connection first waits
# on an advisory lock that is released once all of them wait, so that they
# really start together.  Returns, per script, its errors as [statement
# index, message].
sub run_concurrently
{
	my ($db, @scripts) = @_;
	my $barrier = 'SELECT pg_advisory_lock_shared(7070, 30), pg_advisory_unlock_shared(7070, 30);';
	my $holder = $node->background_psql($db);
	$holder->query_safe('SELECT pg_advisory_lock(7070, 30)');

	my @runs;
	foreach my $script (@scripts)
	{
		my %run = (out => '', err => '');
		my $cmd;
		($cmd, $run{starts}) = psql_script($db, [ $barrier, @$script ]);
		$run{handle} = IPC::Run::start($cmd, '<', \undef, '>', \$run{out}, '2>', \$run{err});
		push @runs, \%run;
	}
	my $deadline = time() + 60;
	my $waiting = 0;
	while (time() < $deadline)
	{
		$_->{handle}->pump_nb foreach @runs;
		$waiting = sql($db, q{
SELECT count(*) FROM pg_locks
WHERE locktype = 'advisory' AND classid = 7070 AND objid = 30 AND objsubid = 2
  AND NOT granted});
		last if $waiting >= @runs;
		usleep(10_000);
	}
	note("$waiting of " . scalar(@runs) . ' connections waited at the start line');
	$holder->query_safe('SELECT pg_advisory_unlock(7070, 30)');
	$holder->quit;

	my @errors;
	foreach my $run (@runs)
	{
		$run->{handle}->finish;
		push @errors, [
			map { [ $_->[0] - 1, $_->[1] ] }
			  script_errors($run->{err}, $run->{handle}->result(0), $run->{starts})
		];
	}
	return @errors;
}

# Run a client program; returns its error output when it fails.
sub run_client
{
	my (@cmd) = @_;
	my ($out, $err) = ('', '');
	note(join(' ', @cmd));
	my $ok = IPC::Run::run(\@cmd, '>', \$out, '2>', \$err);
	note("stderr: $err") if $err ne '';
	return $ok ? () : ("@cmd[0 .. 1] ... failed: " . decode('UTF-8', $err));
}

# The dishes of the world being run, for its dish tag rules.
our @tag_dish_ids;

# User tag rules of every kind (docs/tags.md), defined before any event:
# every category name the worlds draw from, the world's dishes, all orders
# and the favourite category, each at thresholds 1 and 2, all-time and
# windowed, so that the tags held (cdm.user_tags_held) are compared between
# databases too.  The orders are dated 2023-04-01 09:50 to 09:59 (SameEvents.pm); a windowed
# rule counts those dated 09:55 and later: its window ends at a fixed
# window_as_of, 2100-04-01 09:55 (set after the rules are written: a
# change of window_as_of alone is kept), and is that many days long.  A
# window_as_of in the future is never moved by dwh.expire_tags() (which
# moves those before now), so a tags worker's expiry pass cannot make one
# database differ from another.
sub tag_rules_statement
{
	my @categories = ('Plov', 'Plov new', 'plov', 'Салаты', 'салаты', 'Салаты тёплые',
		'Супы', 'Супы и борщи', 'Напитки', 'Drinks', 'drinks', 'Выпечка', 'Десерты');
	my $list = sub { 'ARRAY[' . join(', ', map { quote_literal($_) } @_) . ']::text[]' };
	return "INSERT INTO dwh.tag_rules (tag, kind, category_name, product_id, threshold, window_days)
SELECT w.prefix || r.tag, r.kind, r.category_name, r.product_id, r.threshold, w.days
FROM (SELECT 'category ' || c || ' ' || n AS tag, 'category' AS kind, c AS category_name,
             NULL AS product_id, n AS threshold
      FROM unnest(" . $list->(@categories) . ") c, generate_series(1, 2) n
      UNION ALL
      SELECT 'dish ' || d || ' ' || n, 'dish', NULL, d, n
      FROM unnest(" . $list->(@tag_dish_ids) . ") d, generate_series(1, 2) n
      UNION ALL
      SELECT 'orders ' || n, 'all_orders', NULL, NULL, n FROM generate_series(1, 3) n
      UNION ALL
      SELECT 'favourite ' || n, 'favourite_category', NULL, NULL, n
      FROM generate_series(1, 2) n) r,
     (VALUES ('', NULL::integer),
             ('windowed ', date '2100-04-01' - date '2023-04-01')) w(prefix, days);
UPDATE dwh.tag_rules SET window_as_of = '2100-04-01 09:55:00' WHERE window_days IS NOT NULL";
}

# A new database, with the extension and the tag rules unless a restore
# brings them.
sub create_database
{
	my ($db, $with_extension, $restore, $icu, $chunk) = @_;
	if ($icu)
	{
		sql('postgres', qq{CREATE DATABASE "$db" TEMPLATE template0 ENCODING 'UTF8'
		                   LOCALE_PROVIDER icu ICU_LOCALE 'und'});
		# ICU's root order is not the bytes': 'plov' < 'Plov' < 'Салаты'.
		sql($db, q{SELECT 'plov' < 'Plov' AND 'Plov' < 'Салаты' AND 'plov' > 'Plov' COLLATE "C"})
		  eq 't' or die "database $db does not sort by ICU's root locale";
	}
	else
	{
		sql('postgres', qq{CREATE DATABASE "$db"});
	}
	# Every later session of the database, the restore's too.
	sql('postgres', qq{ALTER DATABASE "$db" SET dwh.trigger_chunk_rows = $chunk}) if $chunk;
	sql($db, 'CREATE EXTENSION dwh') if $with_extension;
	sql($db, tag_rules_statement()) if $with_extension && !$restore;
	return;
}

sub drop_databases
{
	my (@dbs) = @_;
	sql('postgres', qq{DROP DATABASE IF EXISTS "$_" WITH (FORCE)}) foreach @dbs;
	return;
}

#
# Statements that write events.
#

sub quote_literal
{
	my ($s) = @_;
	$s =~ s/'/''/g;
	return "'$s'";
}

# (a) one upsert, or (for an order) one message through dwh.ingest_orders.
sub event_statement
{
	my ($e, $style) = @_;
	if ($e->{kind} ne 'order')
	{
		return 'INSERT INTO ' . dictionary_table($e) . ' (object_id, payload) VALUES ('
		  . quote_literal($e->{key}) . ", \$v\$$e->{text}\$v\$::jsonb)"
		  . ' ON CONFLICT (object_id) DO UPDATE SET payload = EXCLUDED.payload;';
	}
	return ingest_statement($e) if ($style // '') eq 'ingest';
	return 'INSERT INTO stg.order_events (object_id, object_type, sent_dttm, payload) VALUES ('
	  . "$e->{key}, 'order', '$e->{sent}', \$p\$$e->{text}\$p\$::jsonb)"
	  . ' ON CONFLICT (object_id) DO UPDATE SET sent_dttm = EXCLUDED.sent_dttm, payload = EXCLUDED.payload;';
}

# (b) a batch of order messages through dwh.ingest_orders.
sub ingest_statement
{
	my (@orders) = @_;
	return 'SELECT received, applied, unchanged, dead_lettered FROM dwh.ingest_orders(ARRAY['
	  . join(', ', map { "convert_to(\$m\$$_->{message}\$m\$, 'UTF8')" } @orders)
	  . ']::bytea[]);';
}

# (e) versions of orders of distinct keys, all loaded, in one multi-row
# upsert: its UPDATE carries them all.
sub order_upsert_statement
{
	my (@orders) = @_;
	return 'INSERT INTO stg.order_events (object_id, object_type, sent_dttm, payload) VALUES '
	  . join(', ', map { "($_->{key}, 'order', '$_->{sent}', \$p\$$_->{text}\$p\$::jsonb)" } @orders)
	  . ' ON CONFLICT (object_id) DO UPDATE SET sent_dttm = EXCLUDED.sent_dttm, payload = EXCLUDED.payload;';
}

# (b) several values of distinct keys in one multi-row upsert.
sub dictionary_batch_statement
{
	my (@values) = @_;
	return 'INSERT INTO ' . dictionary_table($values[0]) . ' (object_id, payload) VALUES '
	  . join(', ', map { '(' . quote_literal($_->{key}) . ", \$v\$$_->{text}\$v\$::jsonb)" } @values)
	  . ' ON CONFLICT (object_id) DO UPDATE SET payload = EXCLUDED.payload;';
}

#
# Plans: how each database receives the events.  A plan names events by
# number, so that it still applies, in the same relative order and
# grouping, to a subset of them while shrinking.
#

my %path_text = (
	a => '(a) one statement per event',
	b => '(b) ingest_orders batches and multi-row upserts',
	c => '(c) concurrent connections',
	d => '(d) pg_dump and pg_restore',
	e => '(e) COPY',
	k => '(k) the Kafka workers');

sub make_plans
{
	my ($rng, $events) = @_;
	my @n = map { $_->{n} } @$events;
	my %by_n = map { $_->{n} => $_ } @$events;
	my @plans;

	my @in_time = sort {
		($by_n{$a}{time} // '') cmp ($by_n{$b}{time} // '') or $a <=> $b
	} @n;
	push @plans, { name => 'inorder', path => 'a', order => \@in_time,
		what => 'in time order' };
	push @plans, { name => 'shuffled', path => 'a', order => [ $rng->shuffle(@n) ],
		what => 'in a random order' };

	# Batches: consecutive events of one kind, 1..5 of them; dictionary
	# batches hold distinct keys.
	my @order = $rng->shuffle(@n);
	my (%batch, @current, $number);
	foreach my $n (@order)
	{
		my $e = $by_n{$n};
		my $limit = $rng->range(1, 5);
		if (!@current || $current[0]{kind} ne $e->{kind} || @current >= $limit
			|| ($e->{kind} ne 'order' && grep { $_->{key} eq $e->{key} } @current))
		{
			@current = ();
			$number++;
		}
		push @current, $e;
		$batch{$n} = $number;
	}
	push @plans, { name => 'batches', path => 'b', order => \@order,
		batch => \%batch, what => 'in a random order, random batches' };

	# Concurrent connections, each with a random share of a random order;
	# orders by upsert or by dwh.ingest_orders.
	my $connections = $rng->range(2, 3);
	my (%connection, %style);
	@order = $rng->shuffle(@n);
	foreach my $n (@order)
	{
		$connection{$n} = $rng->below($connections);
		$style{$n} = $rng->chance(0.5) ? 'ingest' : 'upsert';
	}
	push @plans, { name => 'concurrent', path => 'c', order => \@order,
		connection => \%connection, style => \%style, connections => $connections,
		what => "$connections connections at once" };

	# COPY: a run of events of one kind whose keys are not loaded yet goes
	# in one COPY (1..6 rows); an event whose key is loaded is an upsert.
	my %limit;
	@order = $rng->shuffle(@n);
	$limit{$_} = $rng->range(1, 6) foreach @order;
	# Direct writes are carried through DDS in chunks (dwh.trigger_chunk_rows):
	# here and in the restores, of 1 to 3 rows.
	my $chunk = $rng->range(1, 3);
	push @plans, { name => 'copy', path => 'e', order => \@order, limit => \%limit,
		chunk => $chunk,
		what => "in a random order, COPY for new keys, upserts for the rest (orders several at once), chunks of $chunk" };

	# The Kafka workers: order messages produced to random partitions (each
	# partition in a random order) and consumed by two workers; dictionary
	# values written before, while and after they consume; then one
	# partition replayed with dwh.kafka_seek().
	my (%partition, %phase);
	@order = $rng->shuffle(@n);
	foreach my $n (@order)
	{
		$partition{$n} = $rng->below($kafka_partitions);
		$phase{$n} = $rng->pick('before', 'while', 'after');
	}
	my $replay = $rng->below($kafka_partitions);
	push @plans, { name => 'kafka', path => 'k', order => \@order, partition => \%partition,
		phase => \%phase, replay => $replay,
		what => "$kafka_partitions partitions, 2 workers, partition $replay replayed" };

	my $source = $rng->pick('shuffled', 'batches', 'concurrent', 'copy', 'kafka');
	$chunk = $rng->range(1, 3);
	push @plans, { name => 'restore_j', path => 'd', source => $source, chunk => $chunk,
		what => "pg_restore -j 4 of a dump of $source, chunks of $chunk" };
	$source = $rng->pick('inorder', 'shuffled', 'batches', 'concurrent', 'copy', 'kafka');
	$chunk = $rng->range(1, 3);
	push @plans, { name => 'restore_data', path => 'd', source => $source, data_only => 1,
		chunk => $chunk,
		what => "pg_restore --data-only of a dump of $source after CREATE EXTENSION, chunks of $chunk" };

	# Every tie-break and name comparison is by bytes, whatever the
	# database's default collation.
	push @plans, { name => 'icu', path => 'a', order => [ $rng->shuffle(@n) ], icu => 1,
		what => 'in a random order, in a database sorting by ICU\'s root locale' };
	return \@plans;
}

sub plan_label
{
	my ($plan) = @_;
	return "$plan->{name} ($path_text{ $plan->{path} }, $plan->{what})";
}

# Apply a plan's events to a new database $db; returns the error messages.
sub build_database
{
	my ($plan, $by_n, $db, $source_db) = @_;
	my @order = grep { $by_n->{$_} } @{ $plan->{order} // [] };
	my (@statements, @covers, @errors);

	if ($plan->{path} eq 'd')
	{
		my $dump = "$tmp/$source_db.dump";
		push @errors, run_client('pg_dump', '-Fc', '-f', $dump,
			'-h', $node->host, '-p', $node->port, '-d', $source_db)
		  unless -e $dump;
		create_database($db, $plan->{data_only}, 1, 0, $plan->{chunk});
		push @errors, run_client('pg_restore', ($plan->{data_only} ? '--data-only' : ('-j', '4')),
			'-h', $node->host, '-p', $node->port, '-d', $db, $dump);
		return @errors;
	}

	create_database($db, 1, 0, $plan->{icu}, $plan->{chunk});
	if ($plan->{path} eq 'a')
	{
		@statements = map { event_statement($by_n->{$_}) } @order;
		@covers = map { [$_] } @order;
	}
	elsif ($plan->{path} eq 'b')
	{
		my @group;
		foreach my $i (0 .. $#order)
		{
			push @group, $order[$i];
			next
			  if $i < $#order
			  && $plan->{batch}{ $order[ $i + 1 ] } == $plan->{batch}{ $order[$i] };
			my @events = map { $by_n->{$_} } @group;
			push @statements, $events[0]{kind} eq 'order'
			  ? ingest_statement(@events)
			  : dictionary_batch_statement(@events);
			push @covers, [@group];
			@group = ();
		}
	}
	elsif ($plan->{path} eq 'e')
	{
		# New keys go in a COPY; orders of loaded keys (distinct ones) in a
		# multi-row upsert, whose UPDATE is chunked as the COPY is; other
		# values of loaded keys in an upsert each.
		my (%loaded, @group, @updates);
		my $flush = sub {
			if (@group)
			{
				push @statements, copy_statement(map { $by_n->{$_} } @group);
				push @covers, [@group];
				@group = ();
			}
			if (@updates)
			{
				push @statements, order_upsert_statement(map { $by_n->{$_} } @updates);
				push @covers, [@updates];
				@updates = ();
			}
		};
		foreach my $n (@order)
		{
			my $e = $by_n->{$n};
			my $id = "$e->{kind} $e->{key}";
			if ($loaded{$id} && $e->{kind} eq 'order')
			{
				$flush->()
				  if @group
				  || @updates >= $plan->{limit}{$n}
				  || grep { $by_n->{$_}{key} eq $e->{key} } @updates;
				push @updates, $n;
				next;
			}
			if ($loaded{$id})
			{
				$flush->();
				push @statements, event_statement($e);
				push @covers, [$n];
				next;
			}
			$flush->()
			  if @updates
			  || (@group
				&& ($by_n->{ $group[0] }{kind} ne $e->{kind} || @group >= $plan->{limit}{$n}));
			push @group, $n;
			$loaded{$id} = 1;
		}
		$flush->();
	}
	if ($plan->{path} ne 'c')
	{
		foreach my $error (run_statements($db, \@statements))
		{
			my ($i, $message) = @$error;
			push @errors, sprintf('statement of events %s: %s',
				join(', ', map { "#$_" } @{ $i >= 0 ? $covers[$i] : [] }), $message);
		}
		return @errors;
	}

	# (c): one script per connection; statements that fail (a deadlock, say)
	# are reported, then applied again one by one so that the rest of the
	# comparison still means something.
	my @scripts = map { [] } 1 .. $plan->{connections};
	my @script_events = map { [] } 1 .. $plan->{connections};
	foreach my $n (@order)
	{
		my $c = $plan->{connection}{$n};
		push @{ $scripts[$c] }, event_statement($by_n->{$n}, $plan->{style}{$n});
		push @{ $script_events[$c] }, $n;
	}
	my @failed;
	my @script_errors = run_concurrently($db, @scripts);
	foreach my $c (0 .. $#scripts)
	{
		foreach my $error (@{ $script_errors[$c] })
		{
			my ($i, $message) = @$error;
			my $n = $i >= 0 ? $script_events[$c][$i] : undef;
			push @errors, sprintf('connection %d, event %s: %s', $c + 1,
				defined $n ? "#$n" : '?', $message);
			push @failed, $n if defined $n;
		}
	}
	foreach my $error (run_statements($db, [ map { event_statement($by_n->{$_}) } @failed ]))
	{
		push @errors, "event #$failed[$error->[0]] applied again: $error->[1]";
	}
	return @errors;
}

# (k) Start the Kafka plan in $db: the workers start where this world's
# messages begin, dictionary values of the phase "before" are written, and
# the order messages are produced.  The workers need a few seconds to move
# to the database; other plans are built meanwhile.  Returns the plan's
# state for finish_kafka_plan().
sub start_kafka_plan
{
	my ($plan, $by_n, $db) = @_;
	my @order = grep { $by_n->{$_} } @{ $plan->{order} };
	my %run = (start => [@kafka_end], order => \@order, errors => []);

	create_database($db, 1);
	sql($db, join("\n", map { "SELECT dwh.kafka_seek($_, $kafka_end[$_], '$kafka_topic');" }
		  0 .. $kafka_partitions - 1));
	sql('postgres', "ALTER SYSTEM SET dwh.database = '$db'");
	sql('postgres', 'SELECT pg_reload_conf()');
	push @{ $run{errors} }, kafka_dictionaries($plan, $by_n, $db, \@order, 'before');

	foreach my $p (0 .. $kafka_partitions - 1)
	{
		my @messages = map { $by_n->{$_}{message} }
		  grep { $by_n->{$_}{kind} eq 'order' && $plan->{partition}{$_} == $p } @order;
		next unless @messages;
		my $file = "$tmp/kafka_$db.$p.txt";
		open(my $fh, '>:encoding(UTF-8)', $file) or die "could not write $file: $!";
		print $fh map { "$_\n" } @messages;
		close($fh);
		push @{ $run{errors} }, run_client('kcat', '-P', '-q', '-b', $broker->{bootstrap},
			'-t', $kafka_topic, '-p', $p, '-l', $file);
		$kafka_end[$p] += @messages;
	}
	$run{end} = [@kafka_end];
	return \%run;
}

# The dictionary values of one phase, one statement each, in the plan's
# order.
sub kafka_dictionaries
{
	my ($plan, $by_n, $db, $order, $phase) = @_;
	my @events = grep { $_->{kind} ne 'order' && $plan->{phase}{ $_->{n} } eq $phase }
	  map { $by_n->{$_} } @$order;
	return map { "event #$events[$_->[0]]{n} ($phase the workers): $_->[1]" }
	  run_statements($db, [ map { event_statement($_) } @events ]);
}

# Wait until the workers applied every message of the run in $db and took
# every requested seek.
sub kafka_caught_up
{
	my ($db, $run, $what) = @_;
	my $expected = 0;
	$expected += $_ foreach @{ $run->{end} };
	my $deadline = time() + $PostgreSQL::Test::Utils::timeout_default;
	my $query = "SELECT coalesce(sum(next_offset), 0) = $expected"
	  . " AND NOT coalesce(bool_or(seek_requested), false)"
	  . " FROM dwh.kafka_offsets WHERE topic = '$kafka_topic'";
	while (time() < $deadline)
	{
		return () if sql($db, $query) eq 't';
		usleep(50_000);
	}
	return ("the workers did not apply every message $what: offsets "
		  . sql($db, "SELECT string_agg(kafka_partition || ':' || coalesce(next_offset::text, '-'), ' ') FROM dwh.kafka_offsets")
		  . " (expected @{ $run->{end} }); status: "
		  . sql('postgres', q{SELECT string_agg(worker || ' ' || state, '; ') FROM dwh.status}));
}

# (k) Finish the Kafka plan: dictionary values "while" the workers consume,
# wait for them, the values "after", then a replay of one partition from
# the world's first message.  The workers go back to the idle database.
sub finish_kafka_plan
{
	my ($plan, $by_n, $db, $run) = @_;
	my @errors = @{ $run->{errors} };
	push @errors, kafka_dictionaries($plan, $by_n, $db, $run->{order}, 'while');
	push @errors, kafka_caught_up($db, $run, 'produced');
	push @errors, kafka_dictionaries($plan, $by_n, $db, $run->{order}, 'after');
	my $p = $plan->{replay};
	sql($db, "SELECT dwh.kafka_seek($p, $run->{start}[$p], '$kafka_topic')");
	push @errors, kafka_caught_up($db, $run, "after the replay of partition $p");
	sql('postgres', "ALTER SYSTEM SET dwh.database = 'kafka_idle'");
	sql('postgres', 'SELECT pg_reload_conf()');
	return @errors;
}

#
# What a database holds.
#

# Every table of stg, dds and cdm with its columns and their types.
sub catalog
{
	my ($db) = @_;
	my %tables;
	foreach my $line (split /\n/, sql($db, q{
SELECT c.table_schema, c.table_name, c.column_name, c.data_type
FROM information_schema.columns c
JOIN information_schema.tables t USING (table_schema, table_name)
WHERE c.table_schema IN ('stg', 'dds', 'cdm') AND t.table_type = 'BASE TABLE'
ORDER BY 1, 2, c.ordinal_position}))
	{
		my ($schema, $table, $column, $type) = split /\|/, $line;
		push @{ $tables{"$schema.$table"} },
		  { name => $column, type => $type, schema => $schema, table => $table };
	}
	return \%tables;
}

# One query that returns, as JSON: every table as sorted text, the lines of
# each recount query, dwh.verify() and the dead letters.
sub snapshot
{
	my ($db, $recount_sql) = @_;
	my $tables = catalog($db);
	my @parts;
	foreach my $t (sort keys %$tables)
	{
		# The tag events are the order in which tags were granted and
		# revoked: arrival orders and batchings differ there, by design;
		# the tags they lead to (cdm.user_tags) do not.
		next if $t eq 'cdm.user_tag_events';
		my @columns = grep { !load_time_column($_->{schema}, $_->{table}, $_->{name}) }
		  @{ $tables->{$t} };
		my $header = 'columns: ' . join(', ', map { $_->{name} } @columns);
		my $row = 'concat_ws(\' | \', '
		  . join(', ', map { qq{coalesce("$_->{name}"::text, 'NULL')} } @columns) . ')';
		# By bytes whatever the database's collation (jsonb sorts its
		# strings by it).
		my $order = join(', ',
			map {
				    $_->{type} =~ /char|text/ ? qq{"$_->{name}" COLLATE "C"}
				  : $_->{type} eq 'jsonb' ? qq{"$_->{name}"::text COLLATE "C"}
				  : qq{"$_->{name}"}
			} @columns);
		push @parts, "SELECT 'table:$t', to_json(" . quote_literal("$header\n")
		  . " || coalesce((SELECT string_agg($row, E'\\n' ORDER BY $order) FROM $t), ''))";
	}

	# The history tables, recounted when they have the columns the rule
	# speaks of: object_id and payload (and sent_dttm for orders).
	my %sql = %$recount_sql;
	foreach my $t ('stg.order_event_history', 'stg.user_history', 'stg.restaurant_history')
	{
		my %has = map { $_->{name} => 1 } @{ $tables->{$t} // [] };
		next unless $has{object_id} && $has{payload};
		next if $t eq 'stg.order_event_history' && !$has{sent_dttm};
		$sql{$t} = "SELECT object_id || '|' || "
		  . ($has{sent_dttm} ? "sent_dttm || '|' || " : '')
		  . "payload FROM $t";
	}
	foreach my $t (sort keys %sql)
	{
		push @parts, "SELECT 'recount:$t', to_json(ARRAY(SELECT x::text FROM ($sql{$t}) q(x)))";
	}
	push @parts, q{SELECT 'verify', to_json(ARRAY(SELECT v::text FROM dwh.verify() v))};
	push @parts,
	  q{SELECT 'dead_letters', to_json(ARRAY(SELECT sqlstate || ' ' || reason FROM dwh.dead_letters))};

	my $all = JSON::PP->new->decode(sql($db,
		'SELECT json_object_agg(k, v) FROM (' . join("\nUNION ALL ", @parts) . ') s(k, v)'));
	my %snap = (tables => {}, recount => {});
	foreach my $k (keys %$all)
	{
		if ($k =~ /^table:(.*)$/)
		{
			$snap{tables}{$1} = $all->{$k};
		}
		elsif ($k =~ /^recount:(.*)$/)
		{
			$snap{recount}{$1} = [ sort map { $_ // 'NULL' } @{ $all->{$k} } ];
		}
		else
		{
			$snap{$k} = $all->{$k};
		}
	}
	return \%snap;
}

# Lines of $left missing from $right ("-") and of $right missing from
# $left ("+"), as multisets, at most $max of each.
sub line_diff
{
	my ($left, $right, $max) = @_;
	my (%count, @out);
	$count{$_}++ foreach @$left;
	$count{$_}-- foreach @$right;
	my @minus = grep { $count{$_} > 0 && $count{$_}-- } @$left;
	%count = ();
	$count{$_}++ foreach @$right;
	$count{$_}-- foreach @$left;
	my @plus = grep { $count{$_} > 0 && $count{$_}-- } @$right;
	push @out, map { "    - $_" } @minus[ 0 .. ($#minus < $max - 1 ? $#minus : $max - 1) ];
	push @out, "    - ... " . (@minus - $max) . ' more' if @minus > $max;
	push @out, map { "    + $_" } @plus[ 0 .. ($#plus < $max - 1 ? $#plus : $max - 1) ];
	push @out, "    + ... " . (@plus - $max) . ' more' if @plus > $max;
	return @out;
}

#
# Running plans and judging the result.
#

my $database_counter = 0;

# Build the databases of the given plans (and of the sources their dumps
# need) from the events; returns {plan name => {db, errors, snapshot}}.
sub run_plans
{
	my ($events, $plans, $prefix, $expected_sql) = @_;
	my %by_n = map { $_->{n} => $_ } @$events;
	my %plan = map { $_->{name} => $_ } @$plans;
	my (%built, %kafka_run);

	# The Kafka plan first: its workers move to the database meanwhile.
	foreach my $p (grep { $_->{path} eq 'k' } @$plans)
	{
		my $db = sprintf('%s_%d_%s', $prefix, ++$database_counter, $p->{name});
		$kafka_run{ $p->{name} } = start_kafka_plan($p, \%by_n, $db);
		$built{ $p->{name} } = { db => $db };
	}
	my $finish = sub {
		my ($name) = @_;
		my $run = delete $kafka_run{$name} or return;
		$built{$name}{errors} = [ finish_kafka_plan($plan{$name}, \%by_n, $built{$name}{db}, $run) ];
	};
	foreach my $p (grep { $_->{path} ne 'k' } @$plans)
	{
		my $source = $p->{source};
		if ($source && !$built{$source})
		{
			die "plan $p->{name} needs $source first" unless $plan{$source};
		}
		$finish->($source) if $source;
		my $db = sprintf('%s_%d_%s', $prefix, ++$database_counter, $p->{name});
		my @errors = build_database($p, \%by_n, $db, $source ? $built{$source}{db} : undef);
		$built{ $p->{name} } = { db => $db, errors => \@errors };
	}
	$finish->($_) foreach sort keys %kafka_run;
	$built{$_}{snapshot} = snapshot($built{$_}{db}, $expected_sql) foreach keys %built;
	unlink glob("$tmp/${prefix}_*.dump");
	return \%built;
}

# The checks of one database: a list of {kind, db, ok, detail, tables}.
sub judge
{
	my ($plan, $built, $reference, $expected) = @_;
	my $snap = $built->{snapshot};
	my @results;

	my @problems = @{ $built->{errors} };
	push @problems, map { "dead letter: $_" } @{ $snap->{dead_letters} };
	push @results, { kind => 'apply', ok => !@problems, detail => join("\n", @problems) };

	push @results,
	  {
		kind => 'verify',
		ok => !@{ $snap->{verify} },
		detail => join("\n", 'dwh.verify() rows:', map { "    $_" } @{ $snap->{verify} })
	  };

	if ($reference && $reference != $built)
	{
		my $ref = $reference->{snapshot}{tables};
		my (@differ, @detail);
		my %all = map { $_ => 1 } keys %$ref, keys %{ $snap->{tables} };
		foreach my $t (sort keys %all)
		{
			my $want = $ref->{$t} // '(no such table)';
			my $got = $snap->{tables}{$t} // '(no such table)';
			next if $want eq $got;
			push @differ, $t;
			push @detail, "  $t differs (- $reference->{db}, + $built->{db}):",
			  line_diff([ split /\n/, $want ], [ split /\n/, $got ], 6);
		}
		push @results, { kind => 'same', ok => !@differ, tables => \@differ,
			detail => join("\n", @detail) };
	}

	my (@wrong, @detail);
	foreach my $t (sort keys %{ $snap->{recount} })
	{
		my $got = $snap->{recount}{$t};
		my $want = $expected->{$t} // [];
		next if join("\n", @$got) eq join("\n", @$want);
		push @wrong, $t;
		push @detail, "  $t (- expected by the recount, + in $built->{db}):",
		  line_diff($want, $got, 6);
	}
	push @results, { kind => 'recount', ok => !@wrong, tables => \@wrong,
		detail => join("\n", @detail) };

	$_->{plan} = $plan->{name} foreach @results;
	return @results;
}

sub judge_all
{
	my ($events, $plans, $built) = @_;
	my ($expected) = expected_tables($events);
	my @results;
	foreach my $p (@$plans)
	{
		next unless $built->{ $p->{name} };
		push @results, judge($p, $built->{ $p->{name} }, $built->{inorder}, $expected);
	}
	return @results;
}

#
# Shrinking.
#

# The plans a failure needs: its own, the source of its dump, and the
# reference when it is a comparison with the reference.
sub plans_for
{
	my ($plans, $failure) = @_;
	my %plan = map { $_->{name} => $_ } @$plans;
	my %need = ($failure->{plan} => 1);
	$need{inorder} = 1 if $failure->{kind} eq 'same';
	$need{ $plan{ $failure->{plan} }{source} } = 1 if $plan{ $failure->{plan} }{source};
	return [ grep { $need{ $_->{name} } } @$plans ];
}

# Does the same check still fail, for the same first table, with only
# these events?
sub still_fails
{
	my ($events, $plans, $failure, $expected_sql) = @_;
	my $needed = plans_for($plans, $failure);
	my $built = run_plans($events, $needed, 'shrink', $expected_sql);
	my @results = judge_all($events, $needed, $built);
	drop_databases(map { $_->{db} } values %$built);
	foreach my $r (@results)
	{
		next if $r->{ok} || $r->{kind} ne $failure->{kind} || $r->{plan} ne $failure->{plan};
		return $r unless $failure->{tables};
		return $r if grep { $_ eq $failure->{tables}[0] } @{ $r->{tables} };
	}
	return undef;
}

# Delta debugging: drop chunks of events as long as the failure stays.
sub shrink
{
	my ($events, $plans, $failure, $deadline) = @_;
	my (undef, $expected_sql) = expected_tables($events);
	my @current = @$events;
	my $last = $failure;
	my $chunks = 2;
	my $tries = 0;
	while (@current > 1 && time() < $deadline)
	{
		my $size = int((@current + $chunks - 1) / $chunks);
		my $reduced = 0;
		for (my $start = 0; $start < @current && time() < $deadline; $start += $size)
		{
			my @rest = @current;
			splice(@rest, $start, $size);
			next unless @rest;
			$tries++;
			my $r = still_fails(\@rest, $plans, $failure, $expected_sql);
			next unless $r;
			@current = @rest;
			$last = $r;
			$chunks = $chunks > 2 ? $chunks - 1 : 2;
			$reduced = 1;
			last;
		}
		next if $reduced;
		last if $chunks >= @current;
		$chunks = $chunks * 2 > @current ? scalar @current : $chunks * 2;
	}
	return (\@current, $last, $tries, time() >= $deadline);
}

#
# Checks of the test's own oracle.
#

# The test's jsonb text form of each payload (by which the recount orders
# tied versions) is PostgreSQL's.
sub check_text_form
{
	my ($seed, $events) = @_;
	my $values = join(",\n", map { sprintf('(%d, $t$%s$t$)', $_->{n}, $_->{text}) } @$events);
	my @differ = grep { $_ ne '' } split /\n/, sql('postgres',
		"SELECT n || ': ' || t::jsonb::text FROM (VALUES $values) v(n, t) WHERE t::jsonb::text <> t ORDER BY n");
	ok(!@differ, "seed $seed: the test writes payloads in their jsonb text form")
	  or utf8_diag(join("\n", "seed $seed: PostgreSQL prints otherwise:", @differ));
	return;
}

# The Perl keys are dwh.hash_key()'s.
sql('postgres', 'CREATE EXTENSION dwh');
my @sample_keys = ('1371198', '626a81ce9a8cd1920641e200', 'Выпечка', 'Plov new', 'plov');
is( sql('postgres', q{SELECT string_agg(dwh.hash_key(k)::text, ' ' ORDER BY i) FROM (VALUES }
		  . join(', ', map { "($_, " . quote_literal($sample_keys[$_]) . ')' } 0 .. $#sample_keys)
		  . ') v(i, k)'),
	join(' ', map { hash_key($_) } @sample_keys),
	"the test's UUID v5 keys are dwh.hash_key()'s");

#
# The worlds.
#

sub print_events
{
	my ($world, $events, $how) = @_;
	$how->("  $_") foreach map { event_line($world, $_) } @$events;
	$how->("  ids: " . event_legend($world));
	return;
}

# Seconds left for shrinking, over all worlds.
my $shrink_left = $shrink_budget;

sub run_world
{
	my ($seed) = @_;
	my $world = generate_world($seed);
	@tag_dish_ids = map { $_->{id} } @{ $world->{dishes} };
	my $events = $world->{events};
	my $plans = make_plans($world->{rng}->child, $events);
	my (undef, $expected_sql) = expected_tables($events);

	utf8_note("seed $seed: " . scalar(@$events) . ' events');
	print_events($world, $events, \&utf8_note);
	check_text_form($seed, $events);

	my $built = run_plans($events, $plans, "w$seed", $expected_sql);
	my %plan = map { $_->{name} => $_ } @$plans;
	my @failures;
	foreach my $r (judge_all($events, $plans, $built))
	{
		my $label = plan_label($plan{ $r->{plan} });
		my $name = {
			apply => 'every statement succeeds, nothing dead-lettered',
			verify => 'dwh.verify() is empty',
			same => 'every stg, dds and cdm table equals the in-order database',
			recount => 'tables equal the recount from the events'
		}->{ $r->{kind} };
		ok($r->{ok}, "seed $seed: $r->{plan}: $name")
		  or utf8_diag("seed $seed: $label, database $built->{ $r->{plan} }{db}:\n$r->{detail}");
		push @failures, $r unless $r->{ok};
	}
	if (!@failures)
	{
		drop_databases(map { $_->{db} } values %$built);
		return 1;
	}

	utf8_diag("seed $seed failed (DWH_PROPERTY_SEED=$seed DWH_PROPERTY_WORLDS=1 to repeat); its "
		  . scalar(@$events) . ' events:');
	print_events($world, $events, \&utf8_diag);

	# Shrink up to two failures of different sorts, sharing the time left:
	# one of the in-order database (what the rule says, whatever the order),
	# then a difference between databases (what depends on the order, the
	# batching, the connections or the restore), else any other.
	my @groups = (
		[ grep { $_->{plan} eq 'inorder' } @failures ],
		[ grep { $_->{kind} eq 'same' } @failures ],
		\@failures);
	my @chosen;
	foreach my $group (@groups)
	{
		my ($f) = grep { my $x = $_; !grep { $_ == $x } @chosen } @$group;
		push @chosen, $f if $f && @chosen < 2;
	}
	foreach my $i (0 .. $#chosen)
	{
		last if $shrink_left <= 0;
		my $failure = $chosen[$i];
		my $shrink_start = time();
		my $share = $shrink_left / (@chosen - $i);
		my $what = "$failure->{plan}: $failure->{kind}"
		  . ($failure->{tables} ? " ($failure->{tables}[0])" : '');
		my ($minimal, $r, $tries, $timed_out) =
		  shrink($events, $plans, $failure, $shrink_start + $share);
		$shrink_left -= time() - $shrink_start;
		utf8_diag("seed $seed: shrunk \"$what\" to " . scalar(@$minimal) . ' of ' . scalar(@$events)
			  . " events in $tries runs" . ($timed_out ? ' (time is up: may not be minimal)' : '')
			  . '; applied ' . plan_label($plan{ $failure->{plan} })
			  . ($failure->{kind} eq 'same' ? ' and inorder' : '') . ':');
		print_events($world, $minimal, \&utf8_diag);
		utf8_diag('  messages and values:');
		utf8_diag("  #$_->{n} " . ($_->{message} // "$_->{key} $_->{text}")) foreach @$minimal;
		utf8_diag("  failure:\n$r->{detail}");
	}
	return 0;
}

my ($worlds, $seconds) = run_worlds(
	base_seed => $base_seed,
	budget => $budget,
	fixed => $fixed_worlds,
	keep_going => $keep_going,
	run => \&run_world);
note(sprintf('%d worlds in %.0f s', $worlds, $seconds));

$node->stop;
done_testing();
