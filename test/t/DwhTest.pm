# Shared pieces of the dwh TAP tests: a PostgreSQL node with dwh preloaded,
# a real Kafka broker (tools/kafka/kafka.sh) or librdkafka's mock cluster
# with faults on demand (test/kafka/mock_cluster.c), orders from the
# generator (tools/dwh-gen) produced with kcat, and the checks every
# scenario ends with: dwh.verify() empty and the marts equal to an
# independent recount.

package DwhTest;

use strict;
use warnings;

use Cwd qw(abs_path);
use File::Basename qw(basename dirname);
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use IPC::Run;
use Test::More;
use Time::HiRes qw(usleep);

use Exporter 'import';
our @EXPORT = qw(
  dwh_root new_dwh_node start_broker broker_command generate_orders produce
  wait_applied wait_for check_consistent stored_total status_of
  load_dictionaries read_manifest check_manifest_counts
  start_mock_cluster mock_command stop_mock_cluster split_stream
  set_and_reload rss_anon_kb
);

my $root = abs_path(dirname(__FILE__) . '/../..');
my @started_brokers;
my @started_mocks;

# The private anonymous memory of a process, in kB (undef once it is gone).
sub rss_anon_kb
{
	my ($pid) = @_;
	open(my $fh, '<', "/proc/$pid/status") or return undef;
	while (<$fh>)
	{
		return $1 if /^RssAnon:\s+(\d+) kB/;
	}
	return undef;
}

# Brokers go away with the test, even one that fails half-way.
END
{
	foreach my $dir (@started_brokers)
	{
		system("bash $root/tools/kafka/kafka.sh stop $dir >/dev/null 2>&1");
	}
	foreach my $mock (@started_mocks)
	{
		$mock->{handle}->kill_kill if $mock->{handle}->pumpable;
	}
}

sub dwh_root { return $root; }

# A node with dwh preloaded, the extension created in postgres, and the
# given dwh.* settings (a hash) in postgresql.conf.
sub new_dwh_node
{
	my ($name, %settings) = @_;
	my $node = PostgreSQL::Test::Cluster->new($name);

	$node->init(extra => [ '--encoding=UTF8', '--locale=C' ]);
	# restart_after_crash: the crash tests kill processes on purpose.
	my $conf = "shared_preload_libraries = 'dwh'\n"
	  . "restart_after_crash = on\n"
	  . "log_min_messages = info\n";
	$conf .= "$_ = '$settings{$_}'\n" foreach sort keys %settings;
	$node->append_conf('postgresql.conf', $conf);
	$node->start;
	$node->safe_psql('postgres', 'CREATE EXTENSION dwh');
	$node->safe_psql('postgres', 'CREATE SCHEMA t');
	$node->safe_psql('postgres', slurp_file("$root/test/recount.sql"));
	return $node;
}

# Run tools/kafka/kafka.sh with these arguments; returns its stdout.
sub broker_command
{
	my @args = @_;
	my $out = `bash $root/tools/kafka/kafka.sh @args 2>&1`;
	die "kafka.sh @args failed:\n$out" if $? != 0;
	return $out;
}

# Start a broker in the test's folder with one topic; returns a hash with
# dir, bootstrap (and sasl_bootstrap, ca with sasl => 1).
sub start_broker
{
	my (%opts) = @_;
	my $name = $opts{name} // 'kafka';
	my $topic = $opts{topic} // 'order-service_orders';
	my $partitions = $opts{partitions} // 4;
	# tmp_check is shared by all the TAP tests: one folder per test script.
	my $script = basename($0, '.pl');
	my $dir = "$PostgreSQL::Test::Utils::tmp_check/${name}_$script";
	my @start = ('start', $dir);

	if ($opts{sasl})
	{
		my $port = PostgreSQL::Test::Cluster::get_free_port();
		push @start, '--sasl-port', $port;
	}
	broker_command(@start);
	push @started_brokers, $dir;
	broker_command('create-topic', $dir, $topic, $partitions);

	my %broker = (dir => $dir, topic => $topic, partitions => $partitions);
	($broker{bootstrap} = broker_command('bootstrap', $dir)) =~ s/\s+$//;
	if ($opts{sasl})
	{
		($broker{sasl_bootstrap} = broker_command('bootstrap', $dir, '--sasl'))
		  =~ s/\s+$//;
		$broker{ca} = "$dir/ca.pem";
	}
	return \%broker;
}

# Write orders from the generator to a file; returns the file name.  Extra
# arguments go to `dwh-gen orders`.
sub generate_orders
{
	my ($file, @args) = @_;
	system("/usr/bin/python3 $root/tools/dwh-gen orders @args > $file") == 0
	  or die "dwh-gen orders @args failed";
	return $file;
}

# Load the generator's dictionaries into stg.users and stg.restaurants, as
# the Redis worker would (a menu makes a restaurant).  Extra arguments go to
# `dwh-gen dictionaries`.
sub load_dictionaries
{
	my ($node, @args) = @_;
	my $file = "$PostgreSQL::Test::Utils::tmp_check/dictionaries.tsv";
	system("/usr/bin/python3 $root/tools/dwh-gen dictionaries @args > $file") == 0
	  or die "dwh-gen dictionaries @args failed";
	chmod 0644, $file;
	# csv with a quote that never occurs: no escape processing at all.
	$node->safe_psql(
		'postgres', qq{
CREATE TEMP TABLE dict (key text, value jsonb);
COPY dict FROM '$file' WITH (FORMAT csv, DELIMITER E'\t', QUOTE E'\x01');
INSERT INTO stg.users (object_id, payload)
SELECT key, value FROM dict WHERE NOT value ? 'menu'
ON CONFLICT (object_id) DO UPDATE SET payload = EXCLUDED.payload;
INSERT INTO stg.restaurants (object_id, payload)
SELECT key, value FROM dict WHERE value ? 'menu'
ON CONFLICT (object_id) DO UPDATE SET payload = EXCLUDED.payload;
});
	return;
}

sub read_manifest
{
	my ($file) = @_;
	require JSON::PP;
	return JSON::PP::decode_json(slurp_file($file));
}

# The marts hold exactly the rows and counts the generator expects.
sub check_manifest_counts
{
	my ($node, $manifest, $label) = @_;
	my $p = $manifest->{user_product_counts};
	my $c = $manifest->{user_category_counts};
	is( $node->safe_psql('postgres',
			'SELECT count(*) || \' \' || coalesce(sum(order_cnt), 0) FROM cdm.user_product_counters'
		),
		"$p->{rows} $p->{order_cnt_sum}",
		"$label: product mart rows and counts as generated");
	is( $node->safe_psql('postgres',
			'SELECT count(*) || \' \' || coalesce(sum(order_cnt), 0) FROM cdm.user_category_counters'
		),
		"$c->{rows} $c->{order_cnt_sum}",
		"$label: category mart rows and counts as generated");
	return;
}

# Produce every line of a file as one message, spread over the partitions,
# or all to $partition when given.
sub produce
{
	my ($broker, $file, $topic, $partition) = @_;
	$topic //= $broker->{topic};
	# No sticky partitioner: keyless messages go to random partitions.
	system('kcat', '-P', '-q', '-b', $broker->{bootstrap}, '-t', $topic,
		'-X', 'sticky.partitioning.linger.ms=0',
		(defined $partition ? ('-p', $partition) : ()), '-l', $file) == 0
	  or die "kcat could not produce $file";
	return;
}

# Build test/kafka/mock_cluster.c (once per test script) and start it: a
# librdkafka mock cluster of `brokers` brokers (ids 1..N) holding `topic`
# with `partitions` partitions.  Returns a hash with bootstrap and topic (so
# that produce() takes it like a broker) and the handle that
# mock_command() talks to.  Its librdkafka log goes to tmp_check/log.
sub start_mock_cluster
{
	my (%opts) = @_;
	my $topic = $opts{topic} // 'order-service_orders';
	my $partitions = $opts{partitions} // 4;
	my $brokers = $opts{brokers} // 3;
	my $script = basename($0, '.pl');
	my $bin = "$PostgreSQL::Test::Utils::tmp_check/mock_cluster_$script";
	my $cc = $ENV{CC} // 'cc';

	system($cc, '-O2', '-Wall', '-Wextra', '-Werror', '-o', $bin,
		"$root/test/kafka/mock_cluster.c", '-lrdkafka') == 0
	  or die "could not build test/kafka/mock_cluster.c with $cc -lrdkafka";

	my %mock = (topic => $topic, partitions => $partitions, in => '', out => '');
	$mock{timer} = IPC::Run::timer($PostgreSQL::Test::Utils::timeout_default);
	$mock{handle} = IPC::Run::start(
		[ $bin, '--brokers', $brokers, '--partitions', $partitions, '--topic', $topic ],
		'<', \$mock{in}, '>', \$mock{out},
		'2>', "$PostgreSQL::Test::Utils::log_path/${script}_mock_cluster.log",
		$mock{timer});
	push @started_mocks, \%mock;
	$mock{timer}->start;
	$mock{handle}->pump until $mock{out} =~ /^bootstrap (\S+)\n/m
	  || $mock{timer}->is_expired;
	die "the mock cluster did not start" unless $mock{out} =~ /^bootstrap (\S+)\n/m;
	$mock{bootstrap} = $1;
	$mock{out} = '';
	return \%mock;
}

# Send one command to the mock cluster and wait for its answer; dies on an
# error answer.  Returns the value after "ok", if any.
sub mock_command
{
	my ($mock, $command) = @_;

	$mock->{in} .= "$command\n";
	$mock->{timer}->start($PostgreSQL::Test::Utils::timeout_default);
	$mock->{handle}->pump until $mock->{out} =~ /\n/ || $mock->{timer}->is_expired;
	die "mock cluster: no answer to \"$command\"" unless $mock->{out} =~ s/^(.*)\n//;
	my $answer = $1;
	die "mock cluster: $command: $answer" unless $answer =~ /^ok ?(.*)$/;
	note("mock cluster: $command" . ($1 ne '' ? " -> $1" : ''));
	return $1;
}

sub stop_mock_cluster
{
	my ($mock) = @_;
	$mock->{in} .= "quit\n";
	$mock->{timer}->start($PostgreSQL::Test::Utils::timeout_default);
	$mock->{handle}->finish;
	return $mock->{handle}->result(0);
}

# Split a generated stream into $n consecutive chunks of about the same
# number of lines.  Returns a list of hashes: file, messages, malformed
# (lines that are not a valid order of the manifest: malformed lines never
# carry a valid order's id), ids (hash of the valid object_ids it holds).
sub split_stream
{
	my ($file, $manifest, $n) = @_;
	my @lines = split /^/m, slurp_file($file);
	my ($first, $last) = @{ $manifest->{object_ids} }{qw(first last)};
	my $size = int((@lines + $n - 1) / $n);
	my @chunks;

	for my $i (0 .. $n - 1)
	{
		my @part = grep { defined } @lines[ $i * $size .. ($i + 1) * $size - 1 ];
		my %chunk = (file => "$file.$i", messages => scalar(@part), malformed => 0, ids => {});
		open(my $fh, '>', $chunk{file}) or die "could not write $chunk{file}: $!";
		binmode $fh;
		print $fh @part;
		close $fh;
		foreach (@part)
		{
			if (/^\{"object_id":(\d+),/ && $1 >= $first && $1 <= $last)
			{
				$chunk{ids}{$1} = 1;
			}
			else
			{
				$chunk{malformed}++;
			}
		}
		push @chunks, \%chunk;
	}
	return @chunks;
}

# Messages applied so far: the sum of the stored next offsets of a topic.
sub stored_total
{
	my ($node, $topic) = @_;
	$topic //= 'order-service_orders';
	return $node->safe_psql('postgres',
		"SELECT coalesce(sum(next_offset), 0) FROM dwh.kafka_offsets WHERE topic = '$topic'"
	);
}

# Wait until $expected messages of the topic are applied (each partition
# starts at offset 0, so the stored next offsets add up to the count).
sub wait_applied
{
	my ($node, $expected, $topic, $timeout) = @_;
	$timeout //= $PostgreSQL::Test::Utils::timeout_default;
	my $deadline = time() + $timeout;
	my $total;
	while (time() < $deadline)
	{
		$total = stored_total($node, $topic);
		return 1 if $total == $expected;
		usleep(200_000);
	}
	diag("applied $total of $expected messages after $timeout s");
	diag($node->safe_psql('postgres', 'SELECT * FROM dwh.status'));
	return 0;
}

# Wait until a query returns 't'.
sub wait_for
{
	my ($node, $query, $timeout) = @_;
	$timeout //= $PostgreSQL::Test::Utils::timeout_default;
	my $deadline = time() + $timeout;
	my ($out, $err) = ('', '');
	while (time() < $deadline)
	{
		# The server may be restarting after a crash: retry on errors,
		# including psql exiting (refused) before it read its standard
		# input, which IPC::Run reports by dying of the broken pipe.
		my $ret = 1;
		($out, $err) = ('', '');
		eval {
			$ret = $node->psql('postgres', $query,
				stdout => \$out, stderr => \$err);
			1;
		} or ($ret, $err) = (1, "$@");
		return 1 if $ret == 0 && $out eq 't';
		usleep(200_000);
	}
	# What it saw last: a query that fails (a typo) waits out the timeout.
	diag("timed out after $timeout s waiting for: $query\n"
		  . "last output: '$out'"
		  . ($err ne '' ? "\nlast error: $err" : ''));
	return 0;
}

# ALTER SYSTEM SET a setting, reload, and wait until a new session sees
# the value (a reload reaches each session at its next statement).
# Returns whether it did in time.
sub set_and_reload
{
	my ($node, $setting, $value) = @_;
	$node->safe_psql('postgres',
		"ALTER SYSTEM SET $setting = '$value'; SELECT pg_reload_conf()");
	return wait_for($node, "SELECT current_setting('$setting') = '$value'");
}

# The state column of a worker in dwh.status.
sub status_of
{
	my ($node, $worker) = @_;
	return $node->safe_psql('postgres',
		"SELECT state FROM dwh.status WHERE worker = '$worker'");
}

# dwh.verify() empty and both marts equal to the recount from STG.
sub check_consistent
{
	my ($node, $label) = @_;
	my $problems = $node->safe_psql('postgres', 'SELECT * FROM t.check()');
	is($problems, '', "$label: dwh.verify() empty and marts equal the recount");
	return;
}

1;
