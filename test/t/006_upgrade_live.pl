# Upgrades with the workers running: version 1.0 built from its commit and
# run as released, loading orders from a real Kafka broker and dictionaries
# from a real Redis server; then the build under test installed over it,
# the server restarted, ALTER EXTENSION dwh UPDATE, and the workers going on
# from where 1.0 left off (docs/upgrades.md).  test/t/005_upgrade.pl
# compares the catalogs; this test follows the data through the swap.
#
#   1. Commit aa4d7d2 (version 1.0), taken from the repository's history
#      (DWH_GIT_DIR, else the git directory of this tree), is built with
#      PGXS and installed into a copy of the PostgreSQL installation under
#      test (the pg_config on PATH) from which every file of dwh was
#      removed first.  Its install script is update/dwh--1.0.sql byte for
#      byte, and 1.0 is the only version the copy offers.
#   2. A node of the copy preloads 1.0's library: two Kafka workers share a
#      topic of four partitions, the Redis worker mirrors the generator's
#      dictionaries.  The first third of a generated stream (duplicates,
#      status changes, out-of-order versions, reversals, malformed lines,
#      and messages of another type) is applied by 1.0's workers; 1.0's
#      dwh.verify() is empty and the marts equal a recount of STG.  STG,
#      the operational tables and the marts are copied aside.
#   3. The node stops; the files of the build under test replace 1.0's in
#      the copy; the node starts.  The second third is produced while the
#      four workers (the tags worker is new) wait for the update (and say
#      so in dwh.status): they apply none of it.  ALTER EXTENSION dwh
#      UPDATE, and in its
#      transaction every row of STG and of the operational tables equals
#      the copy taken under 1.0 (dwh.redis_wanted may only gain keys the
#      Redis worker knows), and the marts hold the same counts.  The
#      last third is produced after the update, and a round of dictionary
#      changes (renamed users and dishes, dishes moved to another category)
#      is written to Redis.
#   4. Versions of one order fall on both sides of the swap, so a status
#      change, a reversal, a redelivery or an out-of-order version may
#      straddle it.  At the end: every version 1.0 stored is still in STG
#      (current or history), every dead letter and other event is kept,
#      and the dictionary values Redis did not change are the very rows 1.0
#      wrote; the marts equal the generator's counts of the whole stream and
#      a recount of STG; the stored Kafka offsets equal the broker's end
#      offsets of every partition (and so do the offsets committed to the
#      consumer group), and the workers applied exactly the messages
#      produced after the last offsets 1.0 stored (none twice);
#      no gap was recorded; the Redis changes arrived; dwh.verify() is
#      empty; the extension is at the version of the build.

use strict;
use warnings;

use File::Basename qw(dirname);
use File::Copy qw(copy);
use File::Path qw(make_path remove_tree);
use FindBin;
use IPC::Run;
use lib $FindBin::RealBin;

use DwhTest;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use RedisServer;
use Test::More;

# Version 1.0 as released.
my $released_commit = 'aa4d7d2';

my $root = dwh_root();
my $tmp = $PostgreSQL::Test::Utils::tmp_check;
my $log_path = $PostgreSQL::Test::Utils::log_path;

my $control = slurp_file("$root/dwh.control");
$control =~ /^default_version = '([^']+)'$/m
  or die 'no default_version in dwh.control';
my $version = $1;
isnt($version, '1.0', "this build is version $version");

# A directory of the installation under test, from the pg_config on PATH
# (the one `make installcheck` tests).
sub pg_config
{
	my ($what) = @_;
	my $out = `pg_config --$what`;
	die "pg_config --$what failed" if $? != 0;
	chomp $out;
	return $out;
}

my %dir = map { $_ => pg_config($_) } qw(bindir pkglibdir sharedir);

# Run a command, its output in $log; on failure, die showing the end of it.
sub run_logged
{
	my ($log, @cmd) = @_;
	open(my $fh, '>>', $log) or die "could not write $log: $!";
	print $fh "# @cmd\n";
	close $fh;
	IPC::Run::run(\@cmd, '<', \undef, '>>', $log, '2>&1')
	  and return;
	my @lines = split /\n/, slurp_file($log);
	splice(@lines, 0, @lines - 40) if @lines > 40;
	die "failed: @cmd\n" . join("\n", @lines) . "\n(whole output in $log)\n";
}

# The git directory holding the released commit: DWH_GIT_DIR (set by
# test/run-tests.sh, which runs the tests from a copy without .git), else
# this tree's.  Named explicitly, git reads it whoever owns it.
sub git_dir
{
	my $git_dir = $ENV{DWH_GIT_DIR};
	if (!defined $git_dir || $git_dir eq '')
	{
		$git_dir = `git -C '$root' rev-parse --absolute-git-dir 2>/dev/null`;
		chomp $git_dir;
		$git_dir = undef if $? != 0 || $git_dir eq '';
	}
	die "no git history: this test builds version 1.0 from commit $released_commit; "
	  . "run it from a clone of dwh, or set DWH_GIT_DIR to the git directory of one\n"
	  unless defined $git_dir;
	my $user = getpwuid($>) // $>;
	system("git --git-dir='$git_dir' rev-parse --git-dir >/dev/null 2>&1") == 0
	  or die "$git_dir is not a git directory that user $user can read\n";
	system('git', "--git-dir=$git_dir", 'cat-file', '-e',
		"$released_commit^{commit}") == 0
	  or die "commit $released_commit (version 1.0) is not in $git_dir: "
	  . "this test needs the history of main (a full clone, not a shallow one)\n";
	return $git_dir;
}

# Build 1.0 from its commit and install it into a copy of the installation
# under test: its bin, lib and share directories under $copy, at the same
# paths below it, so that the copy's binaries find the copy's libraries and
# share files (PostgreSQL locates them relative to its bin directory).
# Returns the root of the copy.
sub build_released
{
	my $git_dir = git_dir();
	my $src = "$tmp/dwh-1.0";
	my $copy = "$tmp/install";
	my $log = "$log_path/006_upgrade_live_build_1.0.log";

	# Not this test's make: the one running it passes its flags and
	# variables down through the environment.
	my @make_env = qw(MAKEFLAGS MAKELEVEL MFLAGS MAKEOVERRIDES);
	local @ENV{@make_env};
	delete @ENV{@make_env};

	make_path($src);
	IPC::Run::run(
		[ 'git', "--git-dir=$git_dir", 'archive', '--format=tar', $released_commit ],
		'|', [ 'tar', '-x', '-C', $src ],
		'2>>', $log)
	  or die "git archive $released_commit failed (see $log)";

	foreach my $d (values %dir)
	{
		make_path(dirname("$copy$d"));
		run_logged($log, 'cp', '-a', $d, "$copy$d");
	}
	# The copy holds no dwh but the one installed next.
	unlink("$copy$dir{pkglibdir}/dwh.so", "$copy$dir{pkglibdir}/bitcode/dwh.index.bc",
		glob("$copy$dir{sharedir}/extension/dwh.control"),
		glob("$copy$dir{sharedir}/extension/dwh--*.sql"));
	remove_tree("$copy$dir{pkglibdir}/bitcode/dwh");

	# Without the LLVM bitcode: only JIT inlining reads it.
	my @make = ('make', '-C', $src, 'PG_CONFIG=pg_config', 'with_llvm=no');
	run_logged($log, @make, '-j2', 'all');
	run_logged($log, @make, 'install', "DESTDIR=$copy");
	return ($copy, $src);
}

# What goes wrong here is shown on the console, not only in the log.
my ($copy, $released_src) = eval { build_released() };
if (!defined $copy)
{
	diag($@);
	die "could not build version 1.0 from commit $released_commit\n";
}
my $install_path = dirname("$copy$dir{bindir}");

is(slurp_file("$released_src/dwh--1.0.sql"),
	slurp_file("$root/update/dwh--1.0.sql"),
	'the install script built from the released commit is update/dwh--1.0.sql');

# Install the build under test over the copy, as a package upgrade would:
# its library and every extension file it installed.
sub install_new_build
{
	my @files = (
		[ "$dir{pkglibdir}/dwh.so", "$copy$dir{pkglibdir}/dwh.so" ],
		map { [ $_, "$copy$_" ] } glob("$dir{sharedir}/extension/dwh.control"),
		glob("$dir{sharedir}/extension/dwh--*.sql"));
	die "the build under test is not installed in $dir{pkglibdir} and $dir{sharedir}"
	  unless -f $files[0][0] && -f "$dir{sharedir}/extension/dwh--$version.sql";
	foreach my $f (@files)
	{
		copy($f->[0], $f->[1]) or die "could not copy $f->[0] to $f->[1]: $!";
	}
	if (-d "$dir{pkglibdir}/bitcode/dwh")
	{
		remove_tree("$copy$dir{pkglibdir}/bitcode/dwh");
		system('cp', '-a', "$dir{pkglibdir}/bitcode/dwh",
			"$dir{pkglibdir}/bitcode/dwh.index.bc",
			"$copy$dir{pkglibdir}/bitcode/") == 0
		  or die "could not copy the bitcode of the build under test";
	}
	return;
}

# The world: a broker with a topic of four partitions, a Redis server
# holding the generator's dictionaries.
my $broker = start_broker(partitions => 4);
my $redis = RedisServer->new;
my $gen = "/usr/bin/python3 $root/tools/dwh-gen";
system("$gen dictionaries > $tmp/dictionaries.tsv") == 0
  or die 'dwh-gen dictionaries failed';
system("$gen dictionaries --redis '" . $redis->url . "' > /dev/null") == 0
  or die 'dwh-gen dictionaries --redis failed';
my $dictionary_keys = () = slurp_file("$tmp/dictionaries.tsv") =~ /\n/g;

# One stream in three parts, so that the versions of an order fall on both
# sides of the swap (a later version comes up to 800 orders later).  The
# marts' expected counts are those of the world after the dictionary
# changes written at the end: the same orders, dishes in other categories.
my $stream_args = '--count 2400 --seed 11 --duplicates 0.08 --status-changes 0.1 '
  . '--out-of-order 0.05 --reversals 0.05 --malformed 0.02 --max-delay 800';
my $changes = '--changes 0.1 --change-seed 5';
generate_orders("$tmp/orders.txt", $stream_args, "--manifest $tmp/orders.json");
generate_orders("/dev/null", $stream_args, $changes, "--expect-dir $tmp/expected");
generate_orders("/dev/null", $stream_args, "--expect-dir $tmp/expected-1.0");
my $manifest = read_manifest("$tmp/orders.json");
is(slurp_file("$tmp/expected/user_product_counts.tsv"),
	slurp_file("$tmp/expected-1.0/user_product_counts.tsv"),
	'the dictionary changes move no order (the oracle counts the same orders)');
my @parts = split_stream("$tmp/orders.txt", $manifest, 3);

# Messages of another type, one in the first part and one in the last.
sub add_other_event
{
	my ($part, $n) = @_;
	open(my $fh, '>>', $part->{file}) or die "could not write $part->{file}: $!";
	print $fh qq({"object_id":$n,"object_type":"restaurant_event","sent_dttm":"2023-01-01 00:00:0$n","payload":{"note":"other event $n"}}\n);
	close $fh;
	$part->{messages}++;
	return;
}
add_other_event($parts[0], 1);
add_other_event($parts[2], 2);
my $total_messages = 0;
$total_messages += $_->{messages} foreach @parts;
note('parts of ' . join(', ', map { $_->{messages} } @parts) . ' messages');

# Version 1.0, as released.
my $node = PostgreSQL::Test::Cluster->new('upgrade_live', install_path => $install_path);
$node->init(extra => [ '--encoding=UTF8', '--locale=C' ]);
$node->append_conf(
	'postgresql.conf', qq{
shared_preload_libraries = 'dwh'
dwh.kafka_brokers = '$broker->{bootstrap}'
dwh.kafka_consumers = 2
dwh.kafka_batch_wait = '50ms'
dwh.kafka_batch_size = 200
dwh.redis_url = '@{[ $redis->url ]}'
dwh.redis_refresh_interval = 1
dwh.redis_scan_pattern = '*'
});
$node->start;

sub psql { return $node->safe_psql('postgres', $_[0]) }

is(psql(q{SELECT string_agg(version, ',') FROM pg_available_extension_versions WHERE name = 'dwh'}),
	'1.0', 'the copy offers version 1.0 only');
psql('CREATE EXTENSION dwh');
is(psql(q{SELECT extversion FROM pg_extension WHERE extname = 'dwh'}),
	'1.0', 'CREATE EXTENSION dwh installs 1.0');
psql('CREATE SCHEMA t');
psql(slurp_file("$root/test/recount.sql"));

# Wait until every dictionary key is mirrored and nothing is queued.
sub dictionaries_mirrored
{
	my ($label) = @_;
	ok( wait_for(
			$node,
			"SELECT (SELECT count(*) FROM dwh.redis_keys WHERE state = 'mirrored') = $dictionary_keys
			    AND (SELECT count(*) FROM stg.users) + (SELECT count(*) FROM stg.restaurants) = $dictionary_keys
			    AND NOT EXISTS (SELECT FROM dwh.redis_wanted)"),
		"$label: every dictionary key mirrored")
	  or diag(psql('SELECT state, count(*) FROM dwh.redis_keys GROUP BY 1'));
	return;
}

# The state of each worker, one line each.
sub worker_states
{
	return psql(
		"SELECT worker || ': ' || state || coalesce(' (' || last_error || ')', '') FROM dwh.status ORDER BY worker");
}

# dwh.verify() empty and the marts equal to the recount of STG.
sub check_marts
{
	my ($label) = @_;
	my $problems = psql('SELECT * FROM t.check()');
	is($problems, '', "$label: dwh.verify() empty and the marts equal a recount of STG");
	return;
}

produce($broker, $parts[0]{file});
ok(wait_applied($node, $parts[0]{messages}), '1.0: the first part applied')
  or diag(worker_states());
dictionaries_mirrored('1.0');
is(psql('SELECT count(*) FROM stg.order_events'),
	scalar(keys %{ $parts[0]{ids} }), '1.0: each order of the first part is in STG once');
is(psql('SELECT count(*) FROM stg.other_events'), '1', '1.0: the other event kept');
is(psql("SELECT count(*) FROM dwh.dead_letters WHERE source = 'kafka'"),
	$parts[0]{malformed}, '1.0: each malformed message dead-lettered');
is(psql("SELECT sum(messages) FROM dwh.status WHERE worker LIKE 'kafka%'"),
	$parts[0]{messages}, '1.0: the workers applied each message once');
is(psql('SELECT count(*) FROM dwh.verify()'), '0', '1.0: dwh.verify() is empty');
check_marts('1.0');

# What 1.0 stored, copied aside: STG, the operational tables, the marts.
my @kept_tables = qw(stg.order_events stg.other_events stg.users stg.restaurants
  dwh.dead_letters dwh.kafka_offsets dwh.redis_keys dwh.redis_wanted);
psql('CREATE SCHEMA snap');
psql(join('', map { (my $s = $_) =~ s/^\w+\./snap./; "CREATE TABLE $s AS TABLE $_;\n" } @kept_tables)
	  . "CREATE TABLE snap.user_product_counters AS
	     SELECT user_id, product_id, order_cnt FROM cdm.user_product_counters;
	   CREATE TABLE snap.user_category_counters AS
	     SELECT user_id, category_id, category_name, order_cnt FROM cdm.user_category_counters;");
my $offsets_1_0 = psql('SELECT sum(next_offset) FROM snap.kafka_offsets');
is($offsets_1_0, $parts[0]{messages}, '1.0 stored the offsets of the first part');

# The package upgrade: the build under test replaces 1.0's files.
$node->stop;
install_new_build();
$node->start;
is(psql(q{SELECT extversion FROM pg_extension WHERE extname = 'dwh'}),
	'1.0', 'after the restart the schema is still 1.0');

# The workers wait for the update, and say so; orders produced meanwhile
# wait in Kafka.
my $waiting = "waiting: extension dwh is at version 1.0, its library at $version: "
  . 'run ALTER EXTENSION dwh UPDATE';
ok( wait_for(
		$node,
		"SELECT count(*) = 4 AND bool_and(state = '$waiting') FROM dwh.status"),
	'both Kafka workers, the Redis worker and the tags worker wait for the update')
  or diag(worker_states());
produce($broker, $parts[1]{file});
# Time enough for a worker that did not wait to apply some of it.
sleep 3;
is(psql("SELECT count(*) FILTER (WHERE state = '$waiting') || '/' || coalesce(sum(messages), 0) FROM dwh.status"),
	'4/0', 'the workers still wait, and applied nothing');

# The update; in its transaction, before any worker can go on, every row
# of STG and of the operational tables is as 1.0 left it (in 1.0's
# columns), and the marts hold the same counts.
# A snapshot table against the table it copied, in the snapshot's (1.0's)
# columns: a line for rows of 1.0 that are gone or changed, and one for rows
# that were added.  dwh.redis_wanted is a queue that the update fills again
# as it rebuilds the hubs (every user and restaurant is new to the rebuilt
# DDS): rows may be added to it, for keys the Redis worker knows already.
my @diffs;
foreach my $table (@kept_tables)
{
	(my $snapshot = $table) =~ s/^\w+\./snap./;
	my $columns = psql(
		"SELECT string_agg(quote_ident(attname), ', ' ORDER BY attnum) FROM pg_attribute
		 WHERE attrelid = '$snapshot'::regclass AND attnum > 0 AND NOT attisdropped");
	push @diffs, snapshot_diff($table, "SELECT $columns FROM $table", $snapshot,
		$table eq 'dwh.redis_wanted'
		? 'WHERE key NOT IN (SELECT key FROM dwh.redis_keys)'
		: '');
}
push @diffs,
  snapshot_diff('cdm.user_product_counters',
	'SELECT user_id, product_id, order_cnt FROM cdm.user_product_counters',
	'snap.user_product_counters', ''),
  snapshot_diff('cdm.user_category_counters',
	'SELECT user_id, category_id, category_name, order_cnt FROM cdm.user_category_counters',
	'snap.user_category_counters', '');

sub snapshot_diff
{
	my ($name, $now, $snapshot, $added_filter) = @_;
	return "SELECT '$name: ' || count(*) || ' rows of 1.0 gone or changed'
	   FROM (SELECT * FROM $snapshot EXCEPT ALL $now) d HAVING count(*) > 0
	 UNION ALL
	 SELECT '$name: ' || count(*) || ' rows added'
	   FROM ($now EXCEPT ALL SELECT * FROM $snapshot) d $added_filter HAVING count(*) > 0";
}

# The comparison sees a change: nothing differs before the update, and
# a moved offset and a lost dead letter show in a rolled-back transaction.
my $diff_query = join("\nUNION ALL\n", @diffs);
is(psql($diff_query), '', 'before the update, nothing differs from the copy taken under 1.0');
is( psql(
		"BEGIN;
		 UPDATE dwh.kafka_offsets SET next_offset = next_offset + 1 WHERE kafka_partition = 0;
		 DELETE FROM dwh.dead_letters WHERE id = (SELECT min(id) FROM dwh.dead_letters);
		 $diff_query;
		 ROLLBACK;"),
	"dwh.dead_letters: 1 rows of 1.0 gone or changed
dwh.kafka_offsets: 1 rows of 1.0 gone or changed
dwh.kafka_offsets: 1 rows added",
	'the comparison sees a changed and a deleted row');

my ($ret, $update_out, $update_err) = $node->psql(
	'postgres',
	"BEGIN;
	 ALTER EXTENSION dwh UPDATE;
	 SELECT extversion FROM pg_extension WHERE extname = 'dwh';
	 $diff_query;
	 COMMIT;",
	on_error_stop => 1);
is($ret, 0, 'ALTER EXTENSION dwh UPDATE')
  or diag($update_err);
is($update_out, $version,
	"in the update's transaction, STG, the operational tables and the marts are as 1.0 left them");
note("update: $update_err") if $update_err ne '';

# The workers go on by themselves with what waited in Kafka.
ok(wait_applied($node, $parts[0]{messages} + $parts[1]{messages}),
	'after the update the second part is applied')
  or diag(worker_states());

# After the update: the last part, and a round of dictionary changes.
system("$gen dictionaries $changes > $tmp/changes.tsv") == 0
  or die 'dwh-gen dictionaries --changes failed';
chmod 0644, "$tmp/changes.tsv";
psql(qq{CREATE TABLE t.redis_changes (key text, value jsonb);
COPY t.redis_changes FROM '$tmp/changes.tsv' WITH (FORMAT csv, DELIMITER E'\t', QUOTE E'\x01')});
system("$gen dictionaries $changes --redis '" . $redis->url . "' > /dev/null") == 0
  or die 'dwh-gen dictionaries --changes --redis failed';
produce($broker, $parts[2]{file});
ok(wait_applied($node, $total_messages), 'the last part is applied')
  or diag(worker_states());
ok( wait_for(
		$node,
		"SELECT count(*) = (SELECT count(*) FROM t.redis_changes)
		 FROM t.redis_changes c
		 JOIN (SELECT object_id, payload FROM stg.users
		       UNION ALL SELECT object_id, payload FROM stg.restaurants) s
		   ON s.object_id = c.key AND s.payload = c.value"),
	'the Redis worker mirrors the values changed after the update')
  or diag(worker_states());
ok(psql('SELECT count(*) FROM t.redis_changes') > 0, 'some dictionary values changed');
# The keys the update queued again are read again, and nothing is missing.
dictionaries_mirrored('after the update');

# Every version 1.0 stored is in STG, current or superseded; every dead
# letter and other event 1.0 stored is as it was (in 1.0's columns).
is( psql(
		"SELECT count(*) FROM snap.order_events s
		 WHERE NOT EXISTS (SELECT FROM stg.order_events o
		                   WHERE o.object_id = s.object_id AND o.payload = s.payload)
		   AND NOT EXISTS (SELECT FROM stg.order_event_history h
		                   WHERE h.object_id = s.object_id AND h.payload = s.payload)"),
	'0', 'every order version 1.0 stored is still in STG');
is( psql(
		"SELECT count(*) FROM (
		   SELECT object_id, payload FROM snap.users
		   UNION ALL SELECT object_id, payload FROM snap.restaurants) s
		 WHERE NOT EXISTS (SELECT FROM (
		     SELECT object_id, payload FROM stg.users
		     UNION ALL SELECT object_id, payload FROM stg.user_history
		     UNION ALL SELECT object_id, payload FROM stg.restaurants
		     UNION ALL SELECT object_id, payload FROM stg.restaurant_history) v
		   WHERE v.object_id = s.object_id AND v.payload = s.payload)"),
	'0', 'every dictionary value 1.0 stored is still in STG');
is( psql(
		"SELECT count(*) FROM (
		   (SELECT id, object_id, payload, update_ts, loaded_at FROM snap.users
		    UNION ALL SELECT id, object_id, payload, update_ts, loaded_at FROM snap.restaurants)
		   EXCEPT ALL
		   (SELECT id, object_id, payload, update_ts, loaded_at FROM stg.users
		    UNION ALL SELECT id, object_id, payload, update_ts, loaded_at FROM stg.restaurants)) d
		 WHERE object_id NOT IN (SELECT key FROM t.redis_changes)"),
	'0', 'the dictionary values Redis did not change are the rows 1.0 wrote');
foreach my $table ('stg.other_events', 'dwh.dead_letters')
{
	(my $snapshot = $table) =~ s/^\w+\./snap./;
	my $columns = psql(
		"SELECT string_agg('t.' || quote_ident(attname), ', ' ORDER BY attnum) FROM pg_attribute
		 WHERE attrelid = '$snapshot'::regclass AND attnum > 0 AND NOT attisdropped");
	is(psql("SELECT count(*) FROM (SELECT * FROM $snapshot EXCEPT ALL SELECT $columns FROM $table t) d"),
		'0', "every row of $table that 1.0 stored is kept");
}
is(psql("SELECT count(*) FROM snap.redis_keys WHERE key NOT IN (SELECT key FROM dwh.redis_keys)"),
	'0', 'every Redis key 1.0 knew is still known');

# Nothing lost, nothing counted twice: the marts equal the generator's
# counts of the whole stream, and a recount of STG.
is(psql('SELECT count(*) FROM stg.order_events'),
	$manifest->{object_ids}{count}, 'each order of the stream is in STG once');
psql('CREATE TABLE t.expected_products (user_id text, product_id text, order_cnt integer)');
psql('CREATE TABLE t.expected_categories (user_id text, category_name text, order_cnt integer)');
chmod 0644, glob("$tmp/expected/*.tsv");
psql("COPY t.expected_products FROM '$tmp/expected/user_product_counts.tsv';
	  COPY t.expected_categories FROM '$tmp/expected/user_category_counts.tsv'");
my $mart_diff = psql(
	"SELECT format('product: user %s dish %s expected %s mart %s',
	               e.user_id, e.product_id, e.order_cnt, m.order_cnt)
	 FROM t.expected_products e
	 FULL JOIN cdm.user_product_counters m
	   ON m.user_id = dwh.hash_key(e.user_id) AND m.product_id = dwh.hash_key(e.product_id)
	 WHERE e.order_cnt IS DISTINCT FROM m.order_cnt
	 UNION ALL
	 SELECT format('category: user %s category %s expected %s mart %s',
	               e.user_id, e.category_name, e.order_cnt, m.order_cnt)
	 FROM t.expected_categories e
	 FULL JOIN cdm.user_category_counters m
	   ON m.user_id = dwh.hash_key(e.user_id) AND m.category_name = e.category_name
	 WHERE e.order_cnt IS DISTINCT FROM m.order_cnt
	 ORDER BY 1 LIMIT 20");
is($mart_diff, '', 'the marts equal the generator\'s counts of every order produced');
ok(psql('SELECT count(*) FROM t.expected_categories') > 0
	  && psql('SELECT count(*) FROM t.expected_products') > 0,
	'the generator\'s counts are not empty');
# (1.1's dwh.verify() also recomputes DDS from STG.)
check_marts('at the end');

# The stored offsets are the broker's end offsets, and the workers applied
# exactly what was produced after the offsets 1.0 stored.
my @query = map { ('-t', "$broker->{topic}:$_:-1") } 0 .. $broker->{partitions} - 1;
my ($kcat_out, $kcat_err) = ('', '');
IPC::Run::run([ 'kcat', '-Q', '-b', $broker->{bootstrap}, @query ],
	'<', \undef, '>', \$kcat_out, '2>', \$kcat_err)
  or die "kcat -Q failed: $kcat_err";
my %end = $kcat_out =~ /\[(\d+)\]\s+offset\s+(\d+)/g;
is(scalar(keys %end), $broker->{partitions}, 'the broker gives the end offset of each partition')
  or diag($kcat_out);
my $end_sum = 0;
$end_sum += $_ foreach values %end;
is($end_sum, $total_messages, 'the end offsets add up to the messages produced');
is( psql(
		"SELECT string_agg(kafka_partition || ':' || next_offset, ',' ORDER BY kafka_partition)
		 FROM dwh.kafka_offsets WHERE topic = '$broker->{topic}'"),
	join(',', map { "$_:$end{$_}" } sort { $a <=> $b } keys %end),
	'the stored offset of every partition is its end offset');
# The positions committed to the consumer group (for monitoring tools)
# follow them, asynchronously.
my $committed;
my $expected_committed = join(',', map { "$_:$end{$_}" } sort { $a <=> $b } keys %end);
for (1 .. 10)
{
	my $group = broker_command('tool',
		'org.apache.kafka.tools.consumer.group.ConsumerGroupCommand',
		'--bootstrap-server', $broker->{bootstrap}, '--describe', '--group', 'dwh');
	my %c = $group =~ /^dwh\s+\Q$broker->{topic}\E\s+(\d+)\s+(\S+)/mg;
	$committed = join(',', map { "$_:$c{$_}" } sort { $a <=> $b } keys %c);
	last if $committed eq $expected_committed;
	note($group);
	sleep 1;
}
is($committed, $expected_committed,
	'the offsets committed to the consumer group are the end offsets');
is(psql("SELECT sum(messages) FROM dwh.status WHERE worker LIKE 'kafka%'"),
	$total_messages - $offsets_1_0,
	'since the restart the workers applied each message after 1.0\'s offsets once');
is(psql('SELECT count(*) FROM dwh.kafka_gaps'), '0', 'no gap recorded');
is( psql(
		"SELECT count(*) || '/' || count(DISTINCT (kafka_partition, kafka_offset))
		 FROM dwh.dead_letters WHERE source = 'kafka'"),
	"$manifest->{malformed}/$manifest->{malformed}",
	'each malformed message dead-lettered once, at its own position');
is( psql(
		"SELECT count(*) || '/' || count(DISTINCT (kafka_partition, kafka_offset))
		 FROM stg.other_events WHERE kafka_offset IS NOT NULL"),
	'2/2', 'each message of another type kept once, at its own position');

is(psql(q{SELECT extversion FROM pg_extension WHERE extname = 'dwh'}),
	$version, "the extension is at version $version");
is(psql(q{SELECT count(*) FROM dwh.status WHERE state <> 'consuming' AND worker LIKE 'kafka%'}),
	'0', 'both Kafka workers consuming')
  or diag(worker_states());

if (!Test::More->builder->is_passing)
{
	diag(worker_states());
	diag(psql('SELECT * FROM dwh.kafka_partitions'));
	diag(psql('SELECT * FROM t.check() LIMIT 20'));
}

$node->stop;
done_testing();
