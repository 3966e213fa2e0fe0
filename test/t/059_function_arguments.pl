# Every SQL-callable function of the extension, called by a superuser with
# hostile arguments: found in the catalog (pg_proc members of extension
# dwh), so that a function added later is called too.  For each function:
#
#   - one call per argument position and hostile value of its type, the
#     other arguments at a plausible value (of their type, or of their name
#     where the type's would be refused at once: a source is sql, a topic
#     order-service_orders, a dish one of the menus'): NULL, zero, -1, the
#     extremes of integers, empty and 2 MB strings, NUL and invalid UTF-8
#     bytes, JSON nested 1,000 (jsonb) and 100,000 (bytes, text) deep, NaN
#     and infinities, timestamps at +-infinity and at the ends of their
#     range, and for arrays: NULL, empty, {NULL}, a NULL among values, each
#     hostile element, two dimensions, a lower bound of 0, 100,000
#     elements;
#   - a call with every argument NULL; one for each of those array shapes
#     given to every array argument at once (parallel arrays of one
#     length); one with every argument that has a default left out;
#   - DWH_ARGS_RANDOM calls (default 10) with each argument drawn at random
#     from those values (seeded: DWH_ARGS_SEED, default from the clock,
#     printed).
#
# Each call runs in a transaction of its own with statement_timeout = 5s,
# on a warehouse holding a few hundred orders, users, restaurants, tag
# rules of every kind and dead letters.  Proven for each call: the server
# is still up, and the postmaster did not reinitialise (the session
# answers after the call, the checkpointer is the same process, the server
# log says nothing of a signal, PANIC, TRAP, internal error or leak); no
# SQLSTATE of class XX (internal error), 57 (57014: the call ran past the
# timeout; crash shutdowns), 58 (system error) or 08 (connection); its
# error is at most 10,000 characters (no argument quoted whole); and a NULL
# given to a function that is not STRICT, in a parameter whose default is
# not NULL, is refused with 22004 or 22023 rather than taken for something
# else (internal functions aside, see below).  After the calls of each
# function that is not internal, and at the end, dwh.verify() is empty and
# the marts equal the recount from STG.
#
# A failure prints the seed and each failing call as one SQL statement to
# run on such a warehouse (calls slower than a second are noted in the
# log).
#
# Exceptions, each for a reason:
#   - Internal functions (their comment starts with "Internal:") are the
#     steps of the ingest and its triggers: they take what their caller
#     computed from STG (mart deltas, keys, namings) and write it, as an
#     UPDATE of the marts by a superuser would; made-up arguments make the
#     marts differ from their recount by design.  Their calls are rolled
#     back, and for them a NULL array means "nothing" (what array_agg gives
#     for no rows, which their callers pass), so the NULL rule above is
#     not theirs.  Every other function's calls are committed ...
#   - ... but those given a 100,000-element array, rolled back too (see
#     $large).
#   - Trigger and event trigger functions are not called: PostgreSQL calls
#     them only as triggers.  An aggregate or window function, or an
#     argument type without hostile values here (internal, cstring, or one
#     not in %values yet), fails the test instead of being skipped.

use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use DwhTest qw(new_dwh_node load_dictionaries generate_orders);
use SameEvents qw(new_rng);
use Test::More;
use Time::HiRes qw(time usleep);

my $seed = $ENV{DWH_ARGS_SEED} // (int(time() * 1000) ^ ($$ << 10)) % 1000000000;
my $random_calls = $ENV{DWH_ARGS_RANDOM} // 10;
diag("059_function_arguments: seed $seed (DWH_ARGS_SEED=$seed to repeat)");
my $rng = new_rng($seed);
my $started = time();

# Longest a call may run (statement_timeout), and longest the test waits
# for psql to come back from one (a call that does not answer a cancel).
# Every call here takes well under a second alone; 15 s leaves room for a
# loaded 2-core machine and still stops what never ends or is quadratic
# in a 100,000-element array.
my $call_timeout = 15;
my $psql_timeout = 30;

my $node = new_dwh_node(
	'function_arguments',
	# No expiry passes of the tags worker in between the calls.
	'dwh.tags_expire_interval' => '0',
	# The SQLSTATE of every logged message (internal errors are found by
	# it).
	'log_line_prefix' => '%m [%p] %e %q%a ');
my $tmp = PostgreSQL::Test::Utils::tempdir();

#
# A small warehouse: the generator's users and restaurants, tag rules of
# every kind (all-time and windowed), and 300 orders through
# dwh.ingest_orders at Kafka positions (with their malformed lines, which
# become dead letters).
#
load_dictionaries($node);
$node->safe_psql(
	'postgres', q{
INSERT INTO dwh.tag_rules (tag, kind, category_name, product_id, threshold, window_days)
SELECT 'fa ' || r.tag, r.kind, r.category_name, r.product_id, r.threshold, r.window_days
FROM (SELECT min(e->>'category') AS category, min(e->>'_id') AS dish
      FROM stg.restaurants s, jsonb_array_elements(s.payload->'menu') e
      WHERE e->>'_id' <> '' AND e->>'category' <> '') m,
     LATERAL (VALUES
        ('category', 'category', m.category, NULL, 2, NULL::integer),
        ('dish', 'dish', NULL, m.dish, 1, NULL),
        ('regular', 'all_orders', NULL, NULL, 3, NULL),
        ('favourite', 'favourite_category', NULL, NULL, 1, NULL),
        ('recent', 'all_orders', NULL, NULL, 1, 36500),
        ('recent dish', 'dish', NULL, m.dish, 1, 36500),
        ('recent category', 'category', m.category, NULL, 1, 36500),
        ('recent favourite', 'favourite_category', NULL, NULL, 1, 36500))
        AS r(tag, kind, category_name, product_id, threshold, window_days);
});
my $orders = generate_orders("$tmp/orders.jsonl", '--count 300 --seed 5 --malformed 0.05');
# Bytes as they are (malformed lines are not all UTF-8).
my @messages = map { q{'\\x} . unpack('H*', $_) . q{'} } split /\n/, slurp_file($orders);
$node->safe_psql(
	'postgres',
	'SELECT * FROM dwh.ingest_orders(ARRAY['
	  . join(',', @messages)
	  . "]::bytea[], 'order-service_orders', "
	  . 'ARRAY(SELECT (n % 3)::integer FROM generate_series(0, ' . $#messages . ') n), '
	  . 'ARRAY(SELECT n / 3 FROM generate_series(0, ' . $#messages . ') n))');
my $loaded = $node->safe_psql(
	'postgres', q{
SELECT (SELECT count(*) FROM stg.order_events) || ' orders, '
    || (SELECT count(*) FROM dwh.dead_letters) || ' dead letters, '
    || (SELECT count(*) FROM cdm.user_tags_held) || ' tags held'});
note("loaded: $loaded");
like($loaded, qr/^[1-9]\d* orders, [1-9]\d* dead letters, [1-9]\d* tags held$/,
	'the warehouse holds orders, dead letters and tags');
is($node->safe_psql('postgres', 'SELECT count(*) FROM t.check()'),
	'0', 'loaded: dwh.verify() empty and the marts equal the recount');

#
# The values.  Each is an SQL expression of the type.  base: a plausible
# value, what the arguments not under test hold; hostile: what each
# argument is tried with (NULL is tried for every type).
#

# A user, a dish, a category and an order of the warehouse, and an order
# message as a producer sends it.
my $user_id = "'626a81ce9a8cd1920641e200'";
my $order_payload = '(SELECT o.payload FROM stg.order_events o ORDER BY o.object_id LIMIT 1)';
my $order_message =
  "(SELECT pg_catalog.convert_to(pg_catalog.jsonb_build_object('object_id', o.object_id, "
  . "'object_type', 'order', 'sent_dttm', o.sent_dttm, 'payload', o.payload)::text, 'UTF8') "
  . 'FROM stg.order_events o ORDER BY o.object_id LIMIT 1)';

my $long_text = "pg_catalog.repeat('x', 2000000)";
# Nesting: as deep as jsonb's own parser takes (the function gets it), and
# far deeper as bytes (the message parser's own).
sub nested
{
	my ($depth) = @_;
	return ("pg_catalog.repeat('[', $depth) || pg_catalog.repeat(']', $depth)",
		"pg_catalog.repeat('{\"a\":', $depth) || '1' || pg_catalog.repeat('}', $depth)");
}
my ($deep_json, $deep_object) = nested(1000);
my ($deeper_json, $deeper_object) = nested(100000);

my %values = (
	integer => {
		base => '1',
		hostile => [ '0', '-1', '2147483647', '-2147483648' ],
	},
	smallint => {
		base => '1',
		hostile => [ '0', '-1', '32767', '-32768' ],
	},
	bigint => {
		base => '1',
		hostile => [ '0', '-1', '2147483648', '9223372036854775807', '-9223372036854775808' ],
	},
	boolean => { base => 'false', hostile => ['true'] },
	text => {
		base => "'x'",
		hostile => [
			"''", $long_text, $deeper_json, q{E'%s%n\\\\''";--\\t\\n'},
			"'order-service_orders'", "'fa regular'", $user_id,
			q{'{"object_id": 1}'},
		],
	},
	bytea => {
		base => $order_message,
		small => q{'\\x7b7d'},
		hostile => [
			q{'\\x'}, q{'\\x00'}, q{'\\xff'}, q{'\\x7b00227d'},
			"pg_catalog.convert_to($long_text, 'UTF8')",
			"pg_catalog.convert_to($deeper_json, 'UTF8')",
			"pg_catalog.convert_to($deeper_object, 'UTF8')",
			q{'{}'}, q{'[]'}, q{'null'}, q{'{"object_id": 9223372036854775808}'},
		],
	},
	uuid => {
		base => "dwh.hash_key($user_id)",
		hostile => [
			"'00000000-0000-0000-0000-000000000000'",
			"'00000000-0000-0000-0000-000000000001'",
			"'ffffffff-ffff-ffff-ffff-ffffffffffff'",
		],
	},
	'timestamp without time zone' => {
		base => "'2023-01-02 00:00:00'",
		hostile => [
			"'infinity'", "'-infinity'", "'4714-11-24 00:00:00 BC'",
			"'294276-12-31 23:59:59.999999'",
		],
	},
	'timestamp with time zone' => {
		base => "'2023-01-02 00:00:00+00'",
		hostile => [
			"'infinity'", "'-infinity'", "'4714-11-24 00:00:00+00 BC'",
			"'294276-12-31 23:59:59.999999+00'",
		],
	},
	date => {
		base => "'2023-01-02'",
		hostile => [ "'infinity'", "'-infinity'", "'4714-11-24 BC'", "'5874897-12-31'" ],
	},
	interval => {
		base => "'1 day'",
		hostile => [ "'0'", "'-178000000 years'", "'178000000 years'" ],
	},
	numeric => {
		base => '1',
		hostile => [ "'NaN'", "'Infinity'", "'-Infinity'", '0', '-1', "'1e1000'" ],
	},
	'double precision' => {
		base => '1',
		hostile => [ "'NaN'", "'Infinity'", "'-Infinity'", '0', "'-0'", "'1e308'" ],
	},
	real => {
		base => '1',
		hostile => [ "'NaN'", "'Infinity'", "'-Infinity'", '0', "'-0'" ],
	},
	jsonb => {
		base => $order_payload,
		small => q{'{}'},
		hostile => [
			q{'{}'}, q{'[]'}, q{'null'}, q{'"x"'}, q{'0'},
			q{'{"order_items": null}'}, q{'{"order_items": [null]}'},
			q{'{"order_items": [{"id": null, "name": null}]}'},
			q{'{"order_items": [{"id": "", "name": ""}]}'},
			q{'{"menu": [{"_id": null}], "order_items": 7}'},
			"$order_payload || '{\"order_items\": []}'",
			"$deep_json", "$deep_object",
		],
	},
);
$values{'character varying'} = $values{text};

# Plausible values by parameter name and type, where the type's would be
# refused at once (a source must be sql or kafka) or find nothing (a tag,
# a dish, an order of the warehouse): the hostile value of another
# argument then reaches further.
my $dish_id =
  "(SELECT min(e->>'_id') FROM stg.restaurants r, pg_catalog.jsonb_array_elements(r.payload->'menu') e WHERE e->>'_id' <> '')";
my $category =
  "(SELECT min(e->>'category') FROM stg.restaurants r, pg_catalog.jsonb_array_elements(r.payload->'menu') e WHERE e->>'category' <> '')";
my $order_id = '(SELECT min(o.object_id) FROM stg.order_events o)';
my %base_by_name = (
	'source text' => "'sql'",
	'topic text' => "'order-service_orders'",
	'kind text' => "'dish'",
	'message text' => "pg_catalog.convert_from($order_message, 'UTF8')",
	'product_id text' => $dish_id,
	'ids text[]' => "ARRAY[$dish_id]",
	'product_ids text[]' => "ARRAY[$dish_id]",
	'keys text[]' => "ARRAY[$user_id]",
	'tags text[]' => "ARRAY['fa regular']",
	'rule_tags text[]' => "ARRAY['fa regular', 'fa recent favourite']",
	'before_tags text[]' => "ARRAY['fa recent']",
	'crossed_tags text[]' => "ARRAY['fa dish']",
	'products uuid[]' => "ARRAY[dwh.hash_key($dish_id)]",
	'categories uuid[]' => "ARRAY[dwh.hash_key($category)]",
	'category_id uuid' => "dwh.hash_key($category)",
	'orders uuid[]' => "ARRAY[dwh.hash_key(${order_id}::text)]",
	'object_ids bigint[]' => "ARRAY[$order_id]",
	'ids bigint[]' => '(SELECT ARRAY[min(d.id)] FROM dwh.dead_letters d)',
);

# The elements of a large array.  A call given one is rolled back even
# where the function is not internal: committed, its 100,000 rows (dead
# letters, say) would make the later calls that read every row
# (dwh.replay_dead_letters() replays each) slow for the size of the data,
# not for their arguments.
my $large = 100000;

# The values of an array type, from its element's: NULL elements, each
# hostile element alone, odd shapes and a large array (of a small value
# where the plausible one is large: an order).
sub array_values
{
	my ($element) = @_;
	my $v = $values{$element} or return undef;
	my $base = "($v->{base})::$element";
	my $small = "(" . ($v->{small} // $v->{base}) . ")::$element";
	# The shapes are also given to every array argument of a call at once
	# (parallel arrays of one length).
	my %shapes = (
		empty => "'{}'",
		null => "'{NULL}'",
		two_dimensions => "pg_catalog.array_fill($base, ARRAY[2, 2])",
		lower_bound_0 => "pg_catalog.array_fill($base, ARRAY[1], ARRAY[0])",
		large => "pg_catalog.array_fill($small, ARRAY[$large])",
	);
	return {
		base => "ARRAY[$base]",
		shapes => \%shapes,
		hostile => [
			(map { $shapes{$_} } sort keys %shapes),
			"ARRAY[$base, NULL]",
			(map { "ARRAY[($_)::$element]" } @{ $v->{hostile} }),
			"ARRAY[($v->{hostile}[0])::$element, $base, ($v->{hostile}[-1])::$element]",
		],
	};
}

sub values_of
{
	my ($type) = @_;
	return $values{$type} if $values{$type};
	if ($type =~ /^(.*)\[\]$/)
	{
		my $v = array_values($1);
		$values{$type} = $v if $v;
		return $v;
	}
	return undef;
}

#
# The functions.
#
my @functions;
foreach my $row (
	split /\n/,
	$node->safe_psql(
		'postgres', q{
SELECT p.oid, p.oid::regprocedure,
       quote_ident(n.nspname) || '.' || quote_ident(p.proname),
       p.prokind, p.proisstrict, p.proretset,
       coalesce(obj_description(p.oid, 'pg_proc'), '') LIKE 'Internal:%',
       p.pronargdefaults,
       array_to_string(ARRAY(SELECT format_type(t, NULL)
                             FROM unnest(p.proargtypes) WITH ORDINALITY AS a(t, i)
                             ORDER BY i), ';'),
       array_to_string(ARRAY(SELECT coalesce(pg_get_function_arg_default(p.oid, i::integer),
                                             '(none)')
                             FROM generate_series(1, p.pronargs) i ORDER BY i), ';'),
       array_to_string(ARRAY(SELECT coalesce(a.name, '')
                             FROM unnest(p.proargnames,
                                         coalesce(p.proargmodes,
                                                  array_fill('i'::"char",
                                                             ARRAY[coalesce(cardinality(p.proargnames), 0)])))
                                  WITH ORDINALITY AS a(name, mode, i)
                             WHERE a.mode IN ('i', 'b', 'v')
                             ORDER BY a.i), ';')
FROM pg_proc p
JOIN pg_namespace n ON n.oid = p.pronamespace
JOIN pg_depend d ON d.classid = 'pg_proc'::regclass AND d.objid = p.oid
                AND d.refclassid = 'pg_extension'::regclass AND d.deptype = 'e'
JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'dwh'
-- Triggers and event triggers run only as such (SQL cannot call them).
WHERE p.prorettype NOT IN ('trigger'::regtype, 'event_trigger'::regtype)
ORDER BY 2::text
}))
{
	my ($oid, $signature, $name, $kind, $strict, $set, $internal, $ndefaults, $types, $defaults,
		$names) = split /\|/, $row, -1;
	my @types = $types eq '' ? () : split /;/, $types;
	my @defaults = $defaults eq '' ? () : split /;/, $defaults;
	my @names = split /;/, $names, -1;
	push @functions,
	  {
		oid => $oid,
		signature => $signature,
		name => $name,
		kind => $kind,
		strict => $strict eq 't',
		internal => $internal eq 't',
		ndefaults => $ndefaults,
		types => \@types,
		defaults => \@defaults,
		names => \@names,
	  };
}
cmp_ok(scalar @functions, '>=', 60, 'the catalog lists the functions of dwh');

#
# Watching the server.
#

sub server_identity
{
	return $node->safe_psql('postgres',
		"SELECT pg_postmaster_start_time() || ' ' || pid FROM pg_stat_activity WHERE backend_type = 'checkpointer'"
	);
}

my $first_identity = server_identity();
my $identity = $first_identity;
my $log_pos = -s $node->logfile;
my $trouble_re = qr{
	terminated\ by\ signal | terminated\ by\ exception
	| all\ server\ processes\ terminated | \bPANIC: | \bTRAP:
	| \[\d+\]\ XX\d{3}\  | WARNING:.*(?:leak|not\ closed)
}x;

# What went wrong with the server since the last look: its log and the
# processes that a reinitialisation replaces.
sub server_trouble
{
	my @trouble;
	push @trouble, 'the server does not take connections'
	  unless $node->poll_query_until('postgres', 'SELECT true');
	my $log = slurp_file($node->logfile, $log_pos);
	my $end = rindex($log, "\n") + 1;
	$log_pos += $end;
	foreach my $line (split /\n/, substr($log, 0, $end))
	{
		push @trouble, "server log: $line" if $line =~ $trouble_re;
	}
	my $now = server_identity();
	if ($now ne $identity)
	{
		push @trouble,
		  "the postmaster reinitialised (start time and checkpointer were $identity, are $now)";
		$identity = $now;
	}
	return @trouble;
}

#
# Calling.  One psql session, each call in a transaction of its own; the
# session is replaced when a call kills it.
#

my $session;
my $session_pid;

sub open_session
{
	$session = $node->background_psql(
		'postgres',
		on_error_stop => 0,
		timeout => $psql_timeout);
	$session->set_query_timer_restart();
	$session->query_safe('\set VERBOSITY verbose');
	$session_pid = $session->query_safe('SELECT pg_backend_pid()');
	return;
}

sub close_session
{
	eval { $session->quit; 1 } or eval { $session->{run}->kill_kill; 1 };
	$session = undef;
	return;
}

# Run one call.  Returns a hash: sqlstate (undef if it succeeded), message,
# seconds, died (the session did not come back: crash or hang).
sub run_call
{
	my ($function, $sql) = @_;
	my $end = $function->{internal} || $sql =~ /ARRAY\[$large\]/ ? 'ROLLBACK' : 'COMMIT';
	my $t0 = time();
	my ($out, $err, $died) = ('', '', undef);

	open_session() unless $session;
	eval {
		($out) = $session->query(
			"BEGIN; SET LOCAL statement_timeout = '${call_timeout}s'; "
			  . "SET LOCAL client_min_messages = warning;\n$sql;\n$end;\nSELECT 'alive';");
		$err = $session->{stderr};
		1;
	} or $died = $@ || 'psql died';
	my $seconds = time() - $t0;
	$err = $session->{stderr} if $died && defined $session->{stderr};

	my %result = (seconds => $seconds, message => '', stderr => $err);
	if ($err =~ /(?:ERROR|FATAL|PANIC):\s+([0-9A-Z]{5}):\s*([^\n]*)/)
	{
		$result{sqlstate} = $1;
		$result{message} = $2;
	}
	if ($died || $out !~ /(?:^|\n)alive$/)
	{
		$died //= 'the session did not answer after the call';
		chomp $died;
		$result{died} = "$died; stderr: $err";
		# A call still running (no answer to the cancel): end it.
		$node->safe_psql('postgres',
			"SELECT pg_terminate_backend($session_pid)")
		  if $session_pid && $node->poll_query_until('postgres', 'SELECT true');
		close_session();
	}
	elsif ($err =~ /WARNING:\s+(?:XX\d{3}:|.*(?:leak|not closed))[^\n]*/)
	{
		$result{warning} = $&;
	}
	$session->{stderr} = '' if $session;
	return \%result;
}

# The SQL of a call with these argument expressions (undef: left out, for
# a default).
sub call_sql
{
	my ($function, @args) = @_;
	my @given;
	for my $i (0 .. $#args)
	{
		next unless defined $args[$i];
		push @given, "($args[$i])::$function->{types}[$i]";
	}
	my $list = join(', ', @given);
	return "CALL $function->{name}($list)" if $function->{kind} eq 'p';
	return "SELECT count(*) FROM $function->{name}($list) AS r";
}

#
# The calls of each function, and what must not happen.
#

my @failures;
my %sqlstates;    # function signature -> { sqlstate -> count }
my $calls_made = 0;

foreach my $function (@functions)
{
	my @problems;
	my $types = $function->{types};

	if ($function->{kind} eq 'a' || $function->{kind} eq 'w')
	{
		push @problems,
		  "an aggregate or window function: call it in a query written for it here";
	}
	my @vals = map { values_of($_) } @$types;
	for my $i (0 .. $#$types)
	{
		push @problems,
		  "no hostile values for type $types->[$i] (argument " . ($i + 1) . "): add them to %values"
		  unless $vals[$i];
	}

	# Which calls: [ argument expressions, NULL given where NULL is not a
	# documented value (the position, or undef) ].
	my @calls;
	my %seen;
	my $add = sub {
		my ($null_at, @args) = @_;
		my $sql = call_sql($function, @args);
		push @calls, [ $sql, $null_at ] unless $seen{$sql}++;
	};
	if (!@problems)
	{
		my @base = map {
			$base_by_name{"$function->{names}[$_] $types->[$_]"} // $vals[$_]{base}
		} 0 .. $#$types;
		$add->(undef, @base);
		for my $i (0 .. $#$types)
		{
			my @args = @base;
			$args[$i] = 'NULL';
			$add->($i, @args);
			foreach my $value (@{ $vals[$i]{hostile} })
			{
				$args[$i] = $value;
				$add->(undef, @args);
			}
		}
		$add->(undef, ('NULL') x @$types) if @$types > 1;
		foreach my $shape (qw(empty null two_dimensions lower_bound_0 large))
		{
			my @args = map { $vals[$_]{shapes} ? $vals[$_]{shapes}{$shape} : $base[$_] }
			  0 .. $#$types;
			$add->(undef, @args) if grep { $_->{shapes} } @vals;
		}
		if ($function->{ndefaults} > 0)
		{
			my @args = @base;
			$args[$_] = undef for (@$types - $function->{ndefaults}) .. $#$types;
			$add->(undef, @args);
		}
		if (@$types)
		{
			for (1 .. $random_calls)
			{
				my @args = map {
					my @choice = ('NULL', $base[$_], $vals[$_]{base}, @{ $vals[$_]{hostile} });
					$rng->pick(@choice);
				} 0 .. $#vals;
				$add->(undef, @args);
			}
		}
	}

	my $t0 = time();
	foreach my $call (@calls)
	{
		my ($sql, $null_at) = @$call;
		my $r = run_call($function, $sql);
		$calls_made++;
		my $state = $r->{sqlstate} // 'ok';
		note(sprintf('slow call: %.1f s (%s): %s', $r->{seconds}, $state, $sql))
		  if $r->{seconds} > 1;
		$sqlstates{ $function->{signature} }{$state}++;
		my $what;
		if ($r->{died})
		{
			$what = sprintf('the session died or hung after %.1f s: %s', $r->{seconds}, $r->{died});
		}
		elsif (defined $r->{sqlstate} && $r->{sqlstate} =~ /^(?:XX|57|58|08)/)
		{
			$what = sprintf('SQLSTATE %s after %.1f s: %s', $r->{sqlstate}, $r->{seconds}, $r->{message});
		}
		elsif ($r->{warning})
		{
			$what = "warning: $r->{warning}";
		}
		elsif (length($r->{stderr}) > 10000)
		{
			$what = sprintf('its error is %d characters long (an argument quoted whole?): %s...',
				length($r->{stderr}), substr($r->{stderr}, 0, 200));
		}
		elsif (defined $null_at
			&& !$function->{strict}
			&& !$function->{internal}
			&& $function->{defaults}[$null_at] !~ /^NULL\b/
			&& !(defined $r->{sqlstate} && $r->{sqlstate} =~ /^(?:22004|22023)$/))
		{
			$what = sprintf(
				'NULL as argument %d (%s) was %s: a NULL that is not a documented value must be refused (22004 or 22023), or the function STRICT',
				$null_at + 1, $types->[$null_at],
				defined $r->{sqlstate} ? "refused with $r->{sqlstate}: $r->{message}" : 'taken');
		}
		if ($what)
		{
			push @problems, "$what\n    $sql;";
		}
		if ($r->{died})
		{
			push @problems, map { "    $_" } server_trouble();
		}
	}
	note(sprintf('%s: %d calls in %.1f s (%s)', $function->{signature}, scalar @calls, time() - $t0,
		join(', ', map { "$_ x$sqlstates{ $function->{signature} }{$_}" }
			  sort keys %{ $sqlstates{ $function->{signature} } })));

	push @problems, server_trouble();
	# What a function that is not internal commits must leave the
	# warehouse consistent.
	if (!$function->{internal})
	{
		my $check = $node->safe_psql('postgres', 'SELECT count(*) FROM t.check()');
		push @problems, "after its calls, t.check() lists $check differences (dwh.verify() or the recount)"
		  if $check ne '0';
	}
	ok(!@problems, "$function->{signature}: " . scalar(@calls) . ' calls')
	  or diag("$function->{signature}:\n  " . join("\n  ", @problems));
	push @failures, map { "$function->{signature}: $_" } @problems;
}
close_session() if $session;

is($node->safe_psql('postgres', 'SELECT count(*) FROM t.check()'),
	'0', 'at the end: dwh.verify() empty and the marts equal the recount');
is($node->safe_psql('postgres', 'SELECT 1'), '1', 'the server is up');
is(server_identity(), $first_identity, 'the postmaster never reinitialised');

note(sprintf('%d calls of %d functions in %.0f s', $calls_made, scalar @functions, time() - $started));
diag("059_function_arguments: seed $seed; " . scalar(@failures) . ' failing calls')
  if @failures;

done_testing();
