# Who may own a secret file.  The README: a file named by
# dwh.kafka_options_file or dwh.redis_url_file is read when it is a regular
# file owned by the server's user with no group or world access (0600, as
# test/t/028_secret_files.pl checks), or owned by root with no world
# access (0640: group read, as for the server's ssl_key_file); any other
# file is refused.  Files owned by root or by another user can only be
# made by root: test/run-tests.sh makes them in DWH_SECRET_FILE_FIXTURES
# before the tests run as postgres.  Each holds a property librdkafka does
# not know, so a file the Kafka worker read reports that property, and a
# refused one says why it was refused.  (Both settings go through the same
# check, src/dwh_secret_files.c.)

use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;

use DwhTest;
use PostgreSQL::Test::Utils;
use Test::More;

my $fixtures = $ENV{DWH_SECRET_FILE_FIXTURES};
die "DWH_SECRET_FILE_FIXTURES is not set: this test needs secret files owned by "
  . "root and by nobody, which test/run-tests.sh makes (as root) before the tests\n"
  unless defined $fixtures && $fixtures ne '';

# The fixtures must be what their names say, or the test proves nothing.
my %expected = (
	'root-0640' => [ 0, 0640 ],
	'root-0600' => [ 0, 0600 ],
	'root-0660' => [ 0, 0660 ],
	'root-0644' => [ 0, 0644 ],
	'nobody-0644' => [ scalar(getpwnam('nobody')), 0644 ]);
foreach my $name (sort keys %expected)
{
	my @st = stat("$fixtures/$name")
	  or die "$fixtures/$name: $! (made by test/run-tests.sh)\n";
	my ($uid, $mode) = @{ $expected{$name} };
	die sprintf("%s/%s is owned by uid %d with mode %04o, not uid %d with %04o\n",
		$fixtures, $name, $st[4], $st[2] & 07777, $uid, $mode)
	  unless $st[4] == $uid && ($st[2] & 07777) == $mode;
}
isnt($>, 0, 'the server runs as another user than root');

# No broker: a closed port.  The worker reads the file when it starts and
# at every reload.
my $closed_port = PostgreSQL::Test::Cluster::get_free_port();
my $node = new_dwh_node(
	'secret_file_owners',
	'dwh.kafka_brokers' => "127.0.0.1:$closed_port",
	'dwh.kafka_options_file' => "$fixtures/root-0640");

sub kafka_status
{
	return $node->safe_psql('postgres',
		"SELECT state || ' | ' || coalesce(last_error, '') FROM dwh.status WHERE worker = 'kafka 1'"
	);
}

# Wait until the worker's status matches.
sub wait_status
{
	my ($pattern, $label) = @_;
	my $deadline = time() + $PostgreSQL::Test::Utils::timeout_default;
	my $status = kafka_status();
	while ($status !~ $pattern && time() < $deadline)
	{
		select(undef, undef, undef, 0.2);
		$status = kafka_status();
	}
	like($status, $pattern, $label);
	return;
}

# Name the file, reload, and wait until the worker's status matches.
sub try_file
{
	my ($name, $pattern, $label) = @_;
	$node->safe_psql('postgres',
		"ALTER SYSTEM SET dwh.kafka_options_file = '$fixtures/$name'; SELECT pg_reload_conf()"
	);
	wait_status($pattern, $label);
	return;
}

my $read = qr/^waiting: invalid Kafka settings \| invalid Kafka options in the file named by dwh\.kafka_options_file: name=value pair 1 names no librdkafka property$/;
my $loose = qr/\| the file named by dwh\.kafka_options_file has group or world access: /;
my $owner = qr/\| the file named by dwh\.kafka_options_file must be owned by the user the server runs as or by root$/;

# Read when the worker starts, before any reload.
wait_status($read, 'the file named at start is read when the worker starts');

# Consecutive files give different statuses: each one is seen.
try_file('root-0640', $read,
	'a file of root that its group may read (0640) is read');
try_file('root-0660', $loose,
	'a file of root that its group may write (0660) is refused');
try_file('nobody-0644', $owner,
	'a file of another user (nobody) is refused, however readable');
try_file('root-0644', $loose,
	'a file of root that others may read (0644) is refused');
try_file('root-0600', qr/\| could not open the file named by dwh\.kafka_options_file: Permission denied$/,
	'a file of root the server cannot read is reported');
try_file('root-0640', $read, 'and the first file is read again');

# No message quotes a fixture's path, but the server's own line on the
# reload that changed the setting.
$node->stop;
my @paths =
  grep { index($_, $fixtures) >= 0 && !/parameter "dwh\.kafka_options_file" changed to/ }
  split /\n/, slurp_file($node->logfile);
ok(!@paths, 'no message quotes the path of a file') or diag(join("\n", @paths));

done_testing();
