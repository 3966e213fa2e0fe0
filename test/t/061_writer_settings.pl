# The data rule (docs/data-rule.md) against the settings of whoever writes
# or repairs the warehouse: a seeded property test.
#
# For each seed the random world of test/t/030_same_events.pl (SameEvents.pm:
# orders with versions, users, menus with renames and moved dishes) and two
# messages that are not orders (a date in another DateStyle, "today" as an
# update_ts) is applied twice, to fresh databases of one cluster:
#
#   reference  a superuser's session with the server's settings (UTC, ISO),
#              the tag rules first, then one upsert per event in time order
#              (the bad messages through dwh.ingest_orders)
#   hostile    an ordinary role's sessions (rights to write STG and the
#              tag rules, to ingest, and dwh.verify(), dwh.rebuild(),
#              dwh.expire_tags()), 2 or 3 of them one after the other, each
#              with settings drawn for the connection (PGOPTIONS: a
#              TimeZone and a DateStyle always), then for every statement
#              more drawn and SET: TimeZone, DateStyle, IntervalStyle,
#              extra_float_digits, plan_cache_mode, planner switches and
#              costs, work_mem, JIT, geqo, parallel query, lc_numeric and
#              friends, client_encoding, bytea_output,
#              standard_conforming_strings, transform_null_equals,
#              array_nulls, row_security, search_path,
#              check_function_bodies and more (@pool below).  The events go
#              in a random order, in dwh.ingest_orders() batches (the bad
#              messages among them), multi-row upserts and COPY; the rule
#              set is written in pieces, one all-time rule inserted with
#              another threshold and set back later, another inserted and
#              deleted on the way.  Now and then a statement is first tried
#              under default_transaction_isolation 'repeatable read' or
#              'serializable' (refused, 25000) or
#              default_transaction_read_only (refused, 25006), then again.
#
# The statements are ASCII: strings go as hex of their UTF-8 bytes, COPY
# data with ENCODING 'UTF8', so that any client_encoding writes the same
# characters.
#
# Proven: every statement succeeds but the refusals, which fail with their
# SQLSTATE; every stg, dds and cdm table (found in the catalog), the tags
# held and the dead letters equal the reference's, load-time columns aside;
# dwh.verify() is empty, also called from a hostile session; the load_dt
# of every hub and link is between the world's start and now, UTC (it was
# the writer's local time).  Then, from hostile sessions: dwh.rebuild(), a
# damage of the marts and the vault (written with session_replication_role
# replica) that dwh.verify() reports alike, to the text of the times in
# the vault's keys, in a default session and in hostile ones,
# dwh.rebuild(vault => true), and dwh.expire_tags() in both databases (two
# windowed rules whose windows end in 2023 move to now, UTC; their orders
# leave their counts): the tables equal the reference's again.  A windowed rule written in a hostile
# session ends its window now, UTC, whatever the session's TimeZone.
#
# On a failure the seed, the events and every statement's settings are
# printed.
#
# Environment: DWH_SETTINGS_SEED (first seed; world i uses seed + i),
# DWH_SETTINGS_SECONDS (worlds are run until this many seconds are spent,
# default 40), DWH_SETTINGS_WORLDS (run exactly this many worlds instead).

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
use SameEvents;
use Test::More;
use Time::HiRes qw(time);

sub utf8_diag { diag(map { encode('UTF-8', $_) } @_); return; }
sub utf8_note { note(map { encode('UTF-8', $_) } @_); return; }
$ENV{PGCLIENTENCODING} = 'UTF8';

my $base_seed = $ENV{DWH_SETTINGS_SEED} // (int(time() * 1000) ^ ($$ << 10)) % 1000000000;
my $budget = $ENV{DWH_SETTINGS_SECONDS} // 40;
my $fixed_worlds = $ENV{DWH_SETTINGS_WORLDS};

diag("061_writer_settings: seed $base_seed (DWH_SETTINGS_SEED=$base_seed to repeat)");

# The server's own settings are the reference's: UTC and ISO.  dwh is not
# preloaded: no worker writes (the tags worker would move windows).
my $node = PostgreSQL::Test::Cluster->new('writer_settings');
$node->init(extra => [ '--encoding=UTF8', '--locale=C' ]);
$node->append_conf('postgresql.conf', <<'EOC');
timezone = 'UTC'
datestyle = 'iso, mdy'
intervalstyle = 'postgres'
extra_float_digits = 1
jit = off
max_worker_processes = 8
max_parallel_workers = 4
EOC
$node->start;
$node->safe_psql('postgres', 'CREATE ROLE hostile LOGIN');

my $tmp = PostgreSQL::Test::Utils::tempdir();

sub sql
{
	my ($db, $query) = @_;
	return decode('UTF-8', $node->safe_psql($db, encode('UTF-8', $query)));
}

#
# Hostile settings: what an ordinary role may SET.  Each entry is a setting
# and the values drawn for it; a value may bring settings that go with it
# ("on, jit_above_cost = 0").
#

my @pool = (
	[ 'TimeZone', "'Pacific/Kiritimati'", "'America/St_Johns'", "'-12'", "'Asia/Kathmandu'",
		"'Pacific/Chatham'", "'<+0530>-05:30'" ],
	[ 'DateStyle', "'SQL, DMY'", "'German'", "'Postgres, MDY'", "'SQL, MDY'", "'Postgres, DMY'",
		"'ISO, DMY'" ],
	[ 'IntervalStyle', "'sql_standard'", "'iso_8601'", "'postgres_verbose'" ],
	[ 'extra_float_digits', '-15', '3', '0' ],
	[ 'plan_cache_mode', 'force_generic_plan', 'force_custom_plan' ],
	[ 'work_mem', "'64kB'" ],
	[ 'hash_mem_multiplier', '1', '1000' ],
	[ 'enable_hashjoin', 'off' ],
	[ 'enable_mergejoin', 'off' ],
	[ 'enable_nestloop', 'off' ],
	[ 'enable_seqscan', 'off' ],
	[ 'enable_indexscan', 'off' ],
	[ 'enable_indexonlyscan', 'off' ],
	[ 'enable_bitmapscan', 'off' ],
	[ 'enable_hashagg', 'off' ],
	[ 'enable_sort', 'off' ],
	[ 'enable_incremental_sort', 'off' ],
	[ 'enable_material', 'off' ],
	[ 'enable_memoize', 'off' ],
	[ 'enable_gathermerge', 'off' ],
	[ 'enable_partition_pruning', 'off' ],
	[ 'random_page_cost', '0.001', '1000' ],
	[ 'cpu_tuple_cost', '10', '0' ],
	[ 'jit', 'on, jit_above_cost = 0' ],
	[ 'geqo', 'on, geqo_threshold = 2, geqo_effort = 1, geqo_seed = 0.7' ],
	[ 'max_parallel_workers_per_gather',
		'4, parallel_setup_cost = 0, parallel_tuple_cost = 0, min_parallel_table_scan_size = 0, min_parallel_index_scan_size = 0',
		'0' ],
	[ 'force_parallel_mode', 'on' ],
	[ 'parallel_leader_participation', 'off' ],
	[ 'from_collapse_limit', '1, join_collapse_limit = 1' ],
	[ 'constraint_exclusion', 'on', 'off' ],
	[ 'cursor_tuple_fraction', '0.01', '1' ],
	[ 'lc_numeric', "'C.utf8'", "'POSIX'" ],
	[ 'lc_monetary', "'C.utf8'", "'POSIX'" ],
	[ 'lc_time', "'C.utf8'", "'POSIX'" ],
	[ 'client_encoding', "'LATIN1'", "'SQL_ASCII'", "'WIN1251'", "'EUC_JP'", "'LATIN5'" ],
	[ 'bytea_output', "'escape'" ],
	[ 'standard_conforming_strings', 'off, escape_string_warning = off' ],
	[ 'default_toast_compression', "'lz4'", "'pglz'" ],
	[ 'synchronous_commit', 'off', 'local' ],
	[ 'row_security', 'off' ],
	[ 'transform_null_equals', 'on' ],
	[ 'array_nulls', 'off' ],
	[ 'check_function_bodies', 'off' ],
	[ 'search_path', "''", "'pg_temp'", "'cdm, dds, stg, dwh, public'" ],
	[ 'timezone_abbreviations', "'India'", "'Australia'" ],
	[ 'gin_fuzzy_search_limit', '1' ],
	[ 'default_transaction_deferrable', 'on' ],
	[ 'recursive_worktable_factor', '0.001' ],
	[ 'xmloption', 'document' ],
	[ 'xmlbinary', 'hex' ],
	[ 'enable_async_append', 'off' ],
	[ 'enable_partitionwise_join', 'on, enable_partitionwise_aggregate = on' ],
	[ 'client_min_messages', 'error', 'log', 'debug5' ]);

# A draw of $n settings: a list of "name = value" texts.
sub draw_settings
{
	my ($rng, $n) = @_;
	my @entries = ($rng->shuffle(@pool))[ 0 .. $n - 1 ];
	return map {
		my ($name, @values) = @$_;
		"$name = " . $rng->pick(@values)
	} @entries;
}

# The settings as SET statements (one per setting: "a = x, b = y" splits).
sub set_statements
{
	my (@settings) = @_;
	return map { "SET $_;" } map { split /, (?=[a-z_]+ = )/ } @settings;
}

# The settings as PGOPTIONS.
sub pgoptions
{
	my (@settings) = @_;
	return join(' ',
		map {
			my ($name, $value) = /^(\S+) = (.*)$/;
			$value =~ s/^'(.*)'$/$1/;
			$value =~ s/([ \\])/\\$1/g;
			"-c $name=$value"
		} map { split /, (?=[a-z_]+ = )/ } @settings);
}

#
# Statements, in ASCII whatever they carry.
#

# A string literal: plain when it is plain ASCII, else the hex of its UTF-8
# bytes (no quote or backslash, so standard_conforming_strings cannot
# change it either).
sub lit
{
	my ($s) = @_;
	return 'NULL' unless defined $s;
	return "'$s'" if $s =~ /^[A-Za-z0-9 _.:\-]*$/;
	return "pg_catalog.convert_from(pg_catalog.decode('"
	  . unpack('H*', encode('UTF-8', $s)) . "', 'hex'), 'UTF8')";
}

sub bytes_lit
{
	my ($s) = @_;
	return "pg_catalog.decode('" . unpack('H*', encode('UTF-8', $s)) . "', 'hex')";
}

sub upsert_statement
{
	my (@events) = @_;
	if ($events[0]{kind} eq 'order')
	{
		return 'INSERT INTO stg.order_events (object_id, object_type, sent_dttm, payload) VALUES '
		  . join(', ', map { "($_->{key}, 'order', '$_->{sent}', " . lit($_->{text}) . '::jsonb)' } @events)
		  . ' ON CONFLICT (object_id) DO UPDATE'
		  . ' SET sent_dttm = EXCLUDED.sent_dttm, payload = EXCLUDED.payload;';
	}
	return 'INSERT INTO ' . dictionary_table($events[0]) . ' (object_id, payload) VALUES '
	  . join(', ', map { '(' . lit($_->{key}) . ', ' . lit($_->{text}) . '::jsonb)' } @events)
	  . ' ON CONFLICT (object_id) DO UPDATE SET payload = EXCLUDED.payload;';
}

sub ingest_statement
{
	my (@events) = @_;
	return 'SELECT received, applied, unchanged, dead_lettered FROM dwh.ingest_orders(ARRAY['
	  . join(', ', map { bytes_lit($_->{message}) } @events) . ']::bytea[]);';
}

#
# Tag rules of every kind, as 030_same_events.pl defines them (all-time and
# windowed, the windows ending at 2100-04-01 09:55, 2023-04-01 09:55 back),
# and two windowed rules whose windows end at 2023-04-02 09:55: those
# dwh.expire_tags() moves to now.
#

sub tag_rules
{
	my ($dishes) = @_;
	my @categories = ('Plov', 'Plov new', 'plov', 'Салаты', 'салаты', 'Салаты тёплые',
		'Супы', 'Супы и борщи', 'Напитки', 'Drinks', 'drinks', 'Выпечка', 'Десерты');
	my @base;
	foreach my $n (1, 2)
	{
		push @base, { tag => "category $_ $n", kind => 'category', category_name => $_,
			threshold => $n } foreach @categories;
		push @base, { tag => "dish $_ $n", kind => 'dish', product_id => $_,
			threshold => $n } foreach @$dishes;
		push @base, { tag => "favourite $n", kind => 'favourite_category', threshold => $n };
	}
	push @base, { tag => "orders $_", kind => 'all_orders', threshold => $_ } foreach 1 .. 3;
	my @rules;
	foreach my $r (@base)
	{
		push @rules, { %$r };
		push @rules, { %$r, tag => "windowed $r->{tag}", window_days => 28124,
			window_as_of => '2100-04-01 09:55:00' };
	}
	push @rules,
	  { tag => 'expiring orders', kind => 'all_orders', threshold => 1, window_days => 1,
		window_as_of => '2023-04-02 09:55:00' },
	  { tag => 'expiring favourite', kind => 'favourite_category', threshold => 1,
		window_days => 1, window_as_of => '2023-04-02 09:55:00' };
	return @rules;
}

sub insert_rules_statement
{
	my (@rules) = @_;
	return 'INSERT INTO dwh.tag_rules (tag, kind, category_name, product_id, threshold, window_days) VALUES '
	  . join(', ',
		map {
			sprintf('(%s, %s, %s, %s, %d, %s)', lit($_->{tag}), lit($_->{kind}),
				lit($_->{category_name}), lit($_->{product_id}), $_->{threshold},
				$_->{window_days} // 'NULL')
		} @rules) . ';';
}

# The windows' ends are set once the rules are written, before any order
# (a change of window_as_of alone recounts nothing).
sub window_statement
{
	my (@rules) = @_;
	my %at;
	push @{ $at{ $_->{window_as_of} } }, $_->{tag} foreach grep { $_->{window_days} } @rules;
	return map {
		"UPDATE dwh.tag_rules SET window_as_of = '$_' WHERE tag IN ("
		  . join(', ', map { lit($_) } @{ $at{$_} }) . ');'
	} sort keys %at;
}

#
# Databases.
#

sub create_database
{
	my ($db) = @_;
	sql('postgres', qq{CREATE DATABASE "$db"});
	sql($db, <<'EOS');
CREATE EXTENSION dwh;
GRANT USAGE ON SCHEMA stg, dds, cdm, dwh TO hostile;
GRANT SELECT, INSERT, UPDATE ON stg.order_events, stg.users, stg.restaurants,
    stg.order_event_history, stg.user_history, stg.restaurant_history TO hostile;
GRANT USAGE ON ALL SEQUENCES IN SCHEMA stg TO hostile;
GRANT EXECUTE ON FUNCTION dwh.ingest_orders(bytea[], text, integer[], bigint[]),
    dwh.verify(), dwh.rebuild(boolean), dwh.expire_tags() TO hostile;
GRANT SELECT, INSERT, UPDATE, DELETE ON dwh.tag_rules TO hostile;
EOS
	return;
}

# psql running a script as $user: each statement (a line, or a COPY with
# its data) in its own transaction, going on after an error, errors with
# their SQLSTATE.  Units are [lines...]; returns, per unit, its errors as
# "SQLSTATE: message".
sub run_units
{
	my ($db, $user, $options, $units) = @_;
	my $file = sprintf('%s/script_%s_%d.sql', $tmp, $db, int(rand(1e9)));
	my ($line, @starts) = (2);
	open(my $fh, '>:encoding(UTF-8)', $file) or die "could not write $file: $!";
	print $fh "\\set VERBOSITY verbose\n";
	foreach my $unit (@$units)
	{
		push @starts, $line;
		my $text = join("\n", @$unit) . "\n";
		print $fh $text;
		$line += ($text =~ tr/\n//);
	}
	close($fh);
	local $ENV{PGOPTIONS} = $options // '';
	my ($out, $err) = ('', '');
	IPC::Run::run([ 'psql', '-X', '-q', '-A', '-t', '-v', 'ON_ERROR_STOP=0',
		'-h', $node->host, '-p', $node->port, '-U', $user, '-d', $db, '-f', $file ],
		'<', \undef, '>', \$out, '2>', \$err);
	my $exit = $? >> 8;
	note("psql as $user in $db ($file): " . substr($err, 0, 4000)) if $err =~ /ERROR|FATAL/;
	my @errors = map { [] } @$units;
	foreach my $l (split /\n/, decode('UTF-8', $err, Encode::FB_DEFAULT))
	{
		if ($l =~ /^psql:[^:]*:(\d+): (?:ERROR|FATAL|PANIC):\s*(.*)$/)
		{
			my ($at, $message) = ($1, $2);
			my $i = (scalar grep { $_ <= $at } @starts) - 1;
			push @{ $errors[ $i < 0 ? 0 : $i ] }, $message;
		}
		elsif ($l =~ /^psql:.*(server closed|connection .* lost|could not)/)
		{
			push @{ $errors[0] }, $l;
		}
	}
	push @{ $errors[0] }, "psql exited with $exit: $err" if $exit && !grep { @$_ } @errors;
	return @errors;
}

#
# What a database holds (as 030_same_events.pl compares it), read in a
# default session.
#

sub snapshot
{
	my ($db) = @_;
	my %tables;
	foreach my $line (split /\n/, sql($db, q{
SELECT c.table_schema, c.table_name, c.column_name, c.data_type
FROM information_schema.columns c
JOIN information_schema.tables t USING (table_schema, table_name)
WHERE (c.table_schema IN ('stg', 'dds', 'cdm')
       OR (c.table_schema, c.table_name) IN (('dwh', 'dead_letters')))
  AND t.table_type = 'BASE TABLE'
ORDER BY 1, 2, c.ordinal_position}))
	{
		my ($schema, $table, $column, $type) = split /\|/, $line;
		next if load_time_column($schema, $table, $column);
		push @{ $tables{"$schema.$table"} }, { name => $column, type => $type };
	}
	my @parts;
	foreach my $t (sort keys %tables)
	{
		# The order of grants and revokes depends on the order of arrival.
		next if $t eq 'cdm.user_tag_events';
		my @columns = @{ $tables{$t} };
		my $row = q{concat_ws(' | ', }
		  . join(', ', map { qq{coalesce("$_->{name}"::text, 'NULL')} } @columns) . ')';
		my $order = join(', ',
			map {
				    $_->{type} =~ /char|text/ ? qq{"$_->{name}" COLLATE "C"}
				  : $_->{type} eq 'jsonb' ? qq{"$_->{name}"::text COLLATE "C"}
				  : qq{"$_->{name}"}
			} @columns);
		push @parts, "SELECT '$t', to_json(coalesce((SELECT string_agg($row, E'\\n' ORDER BY $order) FROM $t), ''))";
	}
	push @parts, q{SELECT 'dwh.verify()', to_json(coalesce((SELECT string_agg(v::text, E'\n' ORDER BY v::text COLLATE "C") FROM dwh.verify() v), ''))};
	return JSON::PP->new->decode(sql($db,
		'SELECT json_object_agg(k, v) FROM (' . join("\nUNION ALL ", @parts) . ') s(k, v)'));
}

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
	splice(@minus, $max) if @minus > $max;
	splice(@plus, $max) if @plus > $max;
	return ((map { "    - $_" } @minus), (map { "    + $_" } @plus));
}

# The tables of $db that differ from the reference's, with the lines that
# differ; dwh.verify() must be empty in both.
sub compare
{
	my ($reference, $db) = @_;
	my $want = snapshot($reference);
	my $got = snapshot($db);
	my @detail;
	my %all = map { $_ => 1 } keys %$want, keys %$got;
	foreach my $t (sort keys %all)
	{
		my $w = $t eq 'dwh.verify()' ? '' : $want->{$t} // '(no such table)';
		my $g = $got->{$t} // '(no such table)';
		next if $w eq $g;
		push @detail, "  $t differs (- $reference, + $db):",
		  line_diff([ split /\n/, $w ], [ split /\n/, $g ], 8);
	}
	push @detail, "  dwh.verify() of $reference is not empty:\n$want->{'dwh.verify()'}"
	  if $want->{'dwh.verify()'} ne '';
	return @detail;
}

# The hubs and links whose load_dt (when the row was loaded, UTC) is not
# between $since and now, UTC: "table: load_dt" of the first such row of
# each.
sub wrong_load_times
{
	my ($db, $since) = @_;
	my @tables = split /\n/, sql($db, q{
SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = 'dds' AND c.relkind = 'r' AND c.relname ~ '^[hl]_'
  AND c.relname <> 'l_product_category' ORDER BY 1});
	return () unless @tables;
	return grep { $_ ne '' } split /\n/, sql($db, join("\nUNION ALL ",
		map {
			"(SELECT 'dds.$_: ' || load_dt FROM dds.$_ WHERE load_dt NOT BETWEEN"
			  . " '$since'::timestamp - interval '1 second'"
			  . " AND now() AT TIME ZONE 'UTC' + interval '1 second' LIMIT 1)"
		} @tables));
}

#
# The worlds.
#

# Two order messages that are no orders: a date as another DateStyle
# writes it, and an update_ts of "today" (which ::timestamp would take).
sub bad_messages
{
	my ($world) = @_;
	my $e = (grep { $_->{kind} eq 'order' } @{ $world->{events} })[0] or return ();
	my @bad;
	foreach my $change ([ 2001, 'date', '01/04/2023 09:50:00' ], [ 2002, 'update_ts', 'today' ])
	{
		my %payload = (%{ $e->{payload} }, $change->[1] => $change->[2]);
		my $message = jsonb_text({ object_id => num($change->[0]), object_type => 'order',
			sent_dttm => $e->{sent}, payload => \%payload });
		push @bad, { kind => 'order', bad => 1, key => $change->[0], message => $message,
			n => "bad $change->[0]" };
	}
	return @bad;
}

# The hostile database's units: [lines], with what they do, the settings
# drawn and the error expected.
sub hostile_units
{
	my ($rng, $events, $rules) = @_;
	my @units;
	my $unit = sub {
		my ($what, $statement, %opt) = @_;
		my @settings = draw_settings($rng, $rng->range(2, 8));
		if (!$opt{copy} && !$opt{norefuse} && $rng->chance(0.12))
		{
			my ($setting, $state) = @{ $rng->pick(
				[ q{default_transaction_isolation = 'repeatable read'}, '25000' ],
				[ q{default_transaction_isolation = 'serializable'}, '25000' ],
				[ q{default_transaction_read_only = on}, '25006' ]) };
			push @units, { what => "$what, refused", settings => [ @settings, $setting ],
				statement => $statement, expect => $state };
		}
		push @units, { what => $what, settings => \@settings, statement => $statement };
	};

	# The rules: the windowed ones first (their windows are set before any
	# order), the all-time ones in pieces, one inserted with another
	# threshold and set back, one inserted and deleted on the way.
	my @windowed = grep { $_->{window_days} } @$rules;
	my @all_time = $rng->shuffle(grep { !$_->{window_days} } @$rules);
	$unit->('windowed rules', insert_rules_statement(@windowed));
	# A change of window_as_of alone recounts nothing, and is not refused
	# in any transaction.
	$unit->('window ends', $_, norefuse => 1) foreach window_statement(@windowed);
	my $changed = shift @all_time;
	my @first = splice(@all_time, 0, int(@all_time / 2));
	$unit->('rules (first half)', insert_rules_statement(@first,
			{ %$changed, threshold => $changed->{threshold} + 3 }));
	my @later = (
		[ 'rules (second half)', insert_rules_statement(@all_time) ],
		[ "rule \"$changed->{tag}\" set back",
			"UPDATE dwh.tag_rules SET threshold = $changed->{threshold} WHERE tag = "
			  . lit($changed->{tag}) . ';' ],
		[ 'rule "passing" deleted', q{DELETE FROM dwh.tag_rules WHERE tag = 'passing';} ]);
	my @temporary = ([ 'rule "passing" inserted', insert_rules_statement(
		{ tag => 'passing', kind => 'all_orders', threshold => 1 }) ]);

	# The events in a random order, in groups of one kind; orders as
	# ingest batches, upserts or COPY, dictionaries as upserts or COPY (a
	# COPY and an upsert of several rows only for distinct keys, COPY only
	# for keys not loaded yet).
	my @order = $rng->shuffle(@$events);
	my (%loaded, @groups, @group);
	foreach my $e (@order)
	{
		if (@group
			&& ($group[0]{kind} ne $e->{kind} || @group >= $rng->range(1, 5)
				|| grep { $_->{key} eq $e->{key} } @group))
		{
			push @groups, [@group];
			@group = ();
		}
		push @group, $e;
	}
	push @groups, [@group] if @group;
	my $at = 0;
	my @inserts = sort { $a <=> $b } map { $rng->below(scalar @groups) } 1 .. @later + 1;
	@later = (@temporary, @later);
	foreach my $i (0 .. $#groups)
	{
		while (@inserts && $inserts[0] == $i)
		{
			shift @inserts;
			$unit->(@{ shift @later });
		}
		my @g = @{ $groups[$i] };
		my $names = join(', ', map { "#$_->{n}" } @g);
		my $new = !grep { $loaded{"$_->{kind} $_->{key}"} } @g;
		$loaded{"$_->{kind} $_->{key}"} = 1 foreach @g;
		my $style =
		    (grep { $_->{bad} } @g) ? 'ingest'
		  : $g[0]{kind} eq 'order' ? $rng->pick('ingest', 'ingest', 'upsert', $new ? 'copy' : 'upsert')
		  : $rng->pick('upsert', $new ? 'copy' : 'upsert');
		if ($style eq 'ingest')
		{
			$unit->("dwh.ingest_orders of $names", ingest_statement(@g));
		}
		elsif ($style eq 'copy')
		{
			$unit->("COPY of $names", copy_statement(@g), copy => 1);
		}
		else
		{
			$unit->("upsert of $names", upsert_statement(@g));
		}
	}
	$unit->(@{ shift @later }) while @later;
	return \@units;
}

sub unit_lines
{
	my ($u) = @_;
	return [ 'RESET ALL;', set_statements(@{ $u->{settings} }), $u->{statement} ];
}

sub describe_units
{
	my ($sessions) = @_;
	my @lines;
	foreach my $s (0 .. $#$sessions)
	{
		push @lines, sprintf('  session %d, PGOPTIONS: %s', $s + 1,
			join('; ', @{ $sessions->[$s]{settings} }));
		push @lines, sprintf('    %s: %s%s', $_->{what}, join('; ', @{ $_->{settings} }),
			$_->{expect} ? " (expects $_->{expect})" : '')
		  foreach @{ $sessions->[$s]{units} };
	}
	return @lines;
}

# Run units in hostile sessions; returns the problems: unexpected errors,
# refusals that did not come.
sub run_hostile
{
	my ($db, $sessions) = @_;
	my @problems;
	foreach my $s (@$sessions)
	{
		my @errors = run_units($db, 'hostile', pgoptions(@{ $s->{settings} }),
			[ map { unit_lines($_) } @{ $s->{units} } ]);
		foreach my $i (0 .. $#{ $s->{units} })
		{
			my $u = $s->{units}[$i];
			my @e = @{ $errors[$i] };
			if ($u->{expect})
			{
				push @problems, "$u->{what}: expected $u->{expect}, got "
				  . (@e ? join(' / ', @e) : 'no error')
				  . ' (settings: ' . join('; ', @{ $u->{settings} }) . ')'
				  unless @e == 1 && $e[0] =~ /^$u->{expect}:/;
			}
			elsif (@e)
			{
				push @problems, "$u->{what}: " . join(' / ', @e)
				  . ' (settings: ' . join('; ', @{ $u->{settings} }) . ')';
			}
		}
	}
	return @problems;
}

# One hostile session running one statement; returns its output.
sub hostile_query
{
	my ($db, $rng, $query, $forced) = @_;
	my @settings = draw_settings($rng, $rng->range(3, 10));
	push @settings, $forced if $forced;
	my $file = sprintf('%s/query_%d.sql', $tmp, int(rand(1e9)));
	open(my $fh, '>', $file) or die "could not write $file: $!";
	print $fh join("\n", set_statements(@settings), $query), "\n";
	close($fh);
	my ($out, $err) = ('', '');
	IPC::Run::run([ 'psql', '-X', '-q', '-A', '-t', '-v', 'ON_ERROR_STOP=1',
		'-h', $node->host, '-p', $node->port, '-U', 'hostile', '-d', $db, '-f', $file ],
		'<', \undef, '>', \$out, '2>', \$err);
	my $settings = join('; ', @settings);
	chomp $out;
	return ($? == 0 ? $out : undef, $settings, $err, \@settings);
}

my $database_counter = 0;

sub run_world
{
	my ($seed) = @_;
	my $world = generate_world($seed);
	my $rng = $world->{rng}->child;
	my @dishes = map { $_->{id} } @{ $world->{dishes} };
	my @rules = tag_rules(\@dishes);
	my @events = (@{ $world->{events} }, bad_messages($world));
	my @failures;
	my $check = sub {
		my ($ok, $name, @detail) = @_;
		ok($ok, "seed $seed: $name") or utf8_diag(join("\n", "seed $seed: $name:", @detail));
		push @failures, $name unless $ok;
		return $ok;
	};

	utf8_note("seed $seed: " . scalar(@events) . ' events');
	utf8_note("  $_") foreach map { $_->{bad} ? "#$_->{n} $_->{message}" : event_line($world, $_) }
	  @events;

	# The reference: a superuser, the server's settings.
	my $world_start = sql('postgres', q{SELECT now() AT TIME ZONE 'UTC'});
	my $id = ++$database_counter;
	my ($reference, $hostile) = ("ref_$id", "hostile_$id");
	create_database($_) foreach $reference, $hostile;
	my @in_time = sort {
		($a->{time} // '') cmp($b->{time} // '') or $a->{n} cmp $b->{n}
	} @events;
	my @statements = (insert_rules_statement(@rules), window_statement(@rules),
		map { $_->{bad} ? ingest_statement($_) : upsert_statement($_) } @in_time);
	my @errors = run_units($reference, scalar getpwuid($<), '',
		[ map { [$_] } @statements ]);
	@errors = map { @$_ } @errors;
	$check->(!@errors, 'the reference is written', @errors);

	# The hostile sessions.
	my $units = hostile_units($rng, \@events, \@rules);
	my @sessions;
	my $count = $rng->range(2, 3);
	my $per = int((@$units + $count - 1) / $count);
	while (my @u = splice(@$units, 0, $per))
	{
		my @settings = draw_settings($rng, $rng->range(2, 6));
		unshift @settings, map { my ($name, @values) = @$_; "$name = " . $rng->pick(@values) }
		  grep { $_->[0] =~ /^(TimeZone|DateStyle)$/ } @pool;
		push @sessions, { settings => \@settings, units => \@u };
	}
	utf8_note("seed $seed: hostile sessions:");
	utf8_note($_) foreach describe_units(\@sessions);
	my @problems = run_hostile($hostile, \@sessions);
	$check->(!@problems, 'every hostile statement succeeds, every refusal is refused',
		@problems);

	my $same = sub {
		my ($what) = @_;
		my @detail = compare($reference, $hostile);
		return $check->(!@detail, "$what: every table equals the reference, verify() empty",
			@detail);
	};
	$same->('written under hostile settings');
	my $load_times = sub {
		my ($what) = @_;
		my @wrong = wrong_load_times($hostile, $world_start);
		$check->(!@wrong, "$what: hubs and links are loaded now, UTC",
			"not between $world_start and now, UTC:", @wrong);
	};
	$load_times->('written under hostile settings');

	# dwh.verify() from hostile sessions, in both databases.
	foreach my $db ($reference, $hostile)
	{
		my ($out, $settings, $err) = hostile_query($db, $rng, 'SELECT count(*) FROM dwh.verify();');
		$check->(defined $out && $out eq '0', "dwh.verify() of $db is empty in a hostile session",
			"settings: $settings", "output: " . ($out // '(failed)'), $err);
	}

	# dwh.rebuild() from a hostile session.
	my ($out, $settings, $err) = hostile_query($hostile, $rng, 'SELECT count(*) FROM dwh.rebuild();');
	$check->(defined $out, 'dwh.rebuild() in a hostile session', "settings: $settings", $err);
	$same->("after dwh.rebuild() ($settings)");

	# Damage, which dwh.verify() reports alike in a default session and in
	# hostile ones, and dwh.rebuild(vault => true) repairs.
	sql($hostile, <<'EOS');
SET session_replication_role = replica;
DELETE FROM cdm.user_product_counters WHERE ctid = (SELECT min(ctid) FROM cdm.user_product_counters);
UPDATE cdm.user_category_counters SET order_cnt = order_cnt + 1
WHERE ctid = (SELECT min(ctid) FROM cdm.user_category_counters);
UPDATE dds.s_order_status SET status = CASE status WHEN 'CLOSED' THEN 'CANCELLED' ELSE 'CLOSED' END
WHERE ctid = (SELECT max(ctid) FROM dds.s_order_status);
UPDATE dds.h_order SET order_dt = order_dt + interval '1 day'
WHERE ctid = (SELECT min(ctid) FROM dds.h_order);
DELETE FROM dds.l_product_category WHERE ctid = (SELECT min(ctid) FROM dds.l_product_category);
UPDATE dds.s_order_cost SET cost = cost + 1 WHERE ctid = (SELECT min(ctid) FROM dds.s_order_cost);
DELETE FROM cdm.user_tags_held WHERE ctid = (SELECT min(ctid) FROM cdm.user_tags_held);
EOS
	my $report = q{SELECT count(*) || ' ' || md5(coalesce(string_agg(v::text, E'\n' ORDER BY v::text COLLATE "C"), '')) FROM dwh.verify() v;};
	my $want = sql($hostile, $report);
	$check->($want !~ /^0 /, 'the damage is seen by dwh.verify()', $want);
	foreach my $i (1 .. 3)
	{
		($out, $settings, $err) = hostile_query($hostile, $rng, $report);
		$check->(defined $out && $out eq $want,
			'dwh.verify() reports the damage alike in a default and a hostile session',
			"settings: $settings", "default: $want", 'hostile: ' . ($out // '(failed)'), $err);
	}
	($out, $settings, $err) =
	  hostile_query($hostile, $rng, 'SELECT count(*) FROM dwh.rebuild(vault => true);');
	$check->(defined $out, 'dwh.rebuild(vault => true) in a hostile session',
		"settings: $settings", $err);
	$same->("after dwh.rebuild(vault => true) ($settings)");
	$load_times->("after dwh.rebuild(vault => true) ($settings)");

	# dwh.expire_tags(): the windows ending in 2023 move to now (UTC), the
	# others stay.  The reference's in a default session.
	my $utc_now = q{SELECT now() AT TIME ZONE 'UTC'};
	my $before = sql('postgres', $utc_now);
	sql($reference, 'SELECT dwh.expire_tags()');
	my $zone = "TimeZone = '" . $rng->pick('Pacific/Kiritimati', 'America/St_Johns', '-12', 'Etc/GMT+11') . "'";
	($out, $settings, $err) =
	  hostile_query($hostile, $rng, 'SELECT rules_moved FROM dwh.expire_tags();', $zone);
	my $after = sql('postgres', $utc_now);
	$check->(defined $out && $out eq '2', 'dwh.expire_tags() in a hostile session moves two windows',
		"settings: $settings", 'output: ' . ($out // '(failed)'), $err);
	$same->("after dwh.expire_tags() ($settings)");
	my $moved = sql($hostile, qq{SELECT string_agg(tag || ' ' || window_as_of, ', ' ORDER BY tag)
FROM dwh.tag_rules WHERE window_days IS NOT NULL
  AND NOT window_as_of BETWEEN '$before' AND '$after'
  AND window_as_of <> '2100-04-01 09:55:00'});
	$check->($moved eq '', 'dwh.expire_tags() in a hostile session moves the windows to now, UTC',
		"settings: $settings", "between $before and $after, not: $moved");

	# A windowed rule written in a hostile session ends its window now, UTC.
	$zone = "TimeZone = '" . $rng->pick('Pacific/Kiritimati', 'America/St_Johns', '-12', 'Etc/GMT+11') . "'";
	$before = sql('postgres', $utc_now);
	($out, $settings, $err) = hostile_query($hostile, $rng, q{
INSERT INTO dwh.tag_rules (tag, kind, threshold, window_days) VALUES ('new window', 'all_orders', 1, 7);
SELECT window_as_of >= '} . $before . q{' AND window_as_of <= now() AT TIME ZONE 'UTC'
FROM dwh.tag_rules WHERE tag = 'new window';
DELETE FROM dwh.tag_rules WHERE tag = 'new window';}, $zone);
	$check->(defined $out && $out eq 't',
		'a windowed rule written in a hostile session ends its window now, UTC',
		"settings: $settings", 'output: ' . ($out // '(failed)'), $err);
	$same->('after a windowed rule came and went');

	if (@failures)
	{
		utf8_diag("seed $seed failed (DWH_SETTINGS_SEED=$seed DWH_SETTINGS_WORLDS=1 to repeat); "
			  . "databases $reference and $hostile; the events:");
		utf8_diag("  $_")
		  foreach map { $_->{bad} ? "#$_->{n} $_->{message}" : event_line($world, $_) } @events;
		utf8_diag('  ids: ' . event_legend($world));
		utf8_diag("seed $seed: the hostile sessions and their settings:");
		utf8_diag($_) foreach describe_units(\@sessions);
		return 0;
	}
	sql('postgres', qq{DROP DATABASE "$_" WITH (FORCE)}) foreach $reference, $hostile;
	return 1;
}

my ($worlds, $seconds) = run_worlds(
	base_seed => $base_seed,
	budget => $budget,
	fixed => $fixed_worlds,
	run => \&run_world);
note(sprintf('%d worlds in %.0f s', $worlds, $seconds));

$node->stop;
done_testing();
