# Shared pieces of the dwh TAP tests: a PostgreSQL node with dwh preloaded,
# a real Kafka broker (test/kafka/kafka.sh), orders from the generator
# (test/gen/dwh-gen) produced with kcat, and the checks every scenario ends
# with: dwh.verify() empty and the marts equal to an independent recount.

package DwhTest;

use strict;
use warnings;

use Cwd qw(abs_path);
use File::Basename qw(dirname);
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep);

use Exporter 'import';
our @EXPORT = qw(
  dwh_root new_dwh_node start_broker broker_command generate_orders produce
  wait_applied wait_for check_consistent stored_total status_of
);

my $root = abs_path(dirname(__FILE__) . '/../..');

sub dwh_root { return $root; }

# A node with dwh preloaded, the extension created in postgres, and the
# given dwh.* settings (a hash) in postgresql.conf.
sub new_dwh_node
{
	my ($name, %settings) = @_;
	my $node = PostgreSQL::Test::Cluster->new($name);

	$node->init(extra => [ '--encoding=UTF8', '--locale=C' ]);
	my $conf = "shared_preload_libraries = 'dwh'\n"
	  . "max_locks_per_transaction = 128\n"
	  . "log_min_messages = info\n";
	$conf .= "$_ = '$settings{$_}'\n" foreach sort keys %settings;
	$node->append_conf('postgresql.conf', $conf);
	$node->start;
	$node->safe_psql('postgres', 'CREATE EXTENSION dwh');
	$node->safe_psql('postgres', 'CREATE SCHEMA t');
	$node->safe_psql('postgres', slurp_file("$root/test/recount.sql"));
	return $node;
}

# Run test/kafka/kafka.sh with these arguments; returns its stdout.
sub broker_command
{
	my @args = @_;
	my $out = `bash $root/test/kafka/kafka.sh @args 2>&1`;
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
	my $dir = "$PostgreSQL::Test::Utils::tmp_check/$name";
	my @start = ('start', $dir);

	if ($opts{sasl})
	{
		my $port = PostgreSQL::Test::Cluster::get_free_port();
		push @start, '--sasl-port', $port;
	}
	broker_command(@start);
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
	system("/usr/bin/python3 $root/test/gen/dwh-gen orders @args > $file") == 0
	  or die "dwh-gen orders @args failed";
	return $file;
}

# Produce every line of a file as one message, spread over the partitions.
sub produce
{
	my ($broker, $file, $topic) = @_;
	$topic //= $broker->{topic};
	system('kcat', '-P', '-q', '-b', $broker->{bootstrap}, '-t', $topic,
		'-l', $file) == 0
	  or die "kcat could not produce $file";
	return;
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
	while (time() < $deadline)
	{
		my $r = $node->safe_psql('postgres', $query);
		return 1 if $r eq 't';
		usleep(200_000);
	}
	return 0;
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
