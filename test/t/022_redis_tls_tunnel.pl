# Redis over TLS through a local stunnel, the documented workaround for
# bookworm's hiredis 0.14, which has no TLS: redis-server listens only on
# a TLS port with a certificate signed by a CA made here; the worker pointed
# straight at that port fails and shows why; pointed at a stunnel client on
# loopback that verifies the server's certificate as the README's recipe
# does (verifyChain, CAfile, checkHost), it mirrors every dictionary and
# follows a change.  The same recipe with another CA, or another host name,
# refuses the server: the worker shows the connection lost and mirrors
# nothing.

use strict;
use warnings;

use FindBin;
use IPC::Run;
use lib $FindBin::RealBin;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep);

my $root = "$FindBin::RealBin/../..";
my $dir = PostgreSQL::Test::Utils::tempdir();
my $password = 'tls-test-password';
my $tls_port = PostgreSQL::Test::Cluster::get_free_port();
my $tunnel_port = PostgreSQL::Test::Cluster::get_free_port();
my $other_ca_port = PostgreSQL::Test::Cluster::get_free_port();
my $other_host_port = PostgreSQL::Test::Cluster::get_free_port();

sub run_or_die
{
	my @cmd = @_;
	my ($out, $err) = ('', '');
	IPC::Run::run(\@cmd, '<', \'', '>', \$out, '2>', \$err)
	  or die "@cmd failed: $err";
	return $out;
}

# A CA and a server certificate for 127.0.0.1.
run_or_die('openssl', 'req', '-x509', '-new', '-newkey', 'rsa:2048', '-nodes',
	'-days', '2', '-subj', '/CN=dwh test CA', '-keyout', "$dir/ca.key",
	'-out', "$dir/ca.pem");
run_or_die('openssl', 'req', '-new', '-newkey', 'rsa:2048', '-nodes',
	'-subj', '/CN=127.0.0.1', '-keyout', "$dir/redis.key",
	'-out', "$dir/redis.csr");
append_to_file("$dir/san.ext", "subjectAltName = DNS:redis.test, IP:127.0.0.1\n");
run_or_die('openssl', 'x509', '-req', '-in', "$dir/redis.csr",
	'-CA', "$dir/ca.pem", '-CAkey', "$dir/ca.key", '-CAcreateserial',
	'-days', '2', '-extfile', "$dir/san.ext", '-out', "$dir/redis.pem");
chmod 0644, "$dir/redis.key";
# A CA that did not sign it.
run_or_die('openssl', 'req', '-x509', '-new', '-newkey', 'rsa:2048', '-nodes',
	'-days', '2', '-subj', '/CN=another CA', '-keyout', "$dir/other-ca.key",
	'-out', "$dir/other-ca.pem");

# redis-server with TLS only: no plain port.
run_or_die(
	'redis-server', '--port', '0', '--tls-port', $tls_port,
	'--bind', '127.0.0.1', '--tls-cert-file', "$dir/redis.pem",
	'--tls-key-file', "$dir/redis.key", '--tls-ca-cert-file', "$dir/ca.pem",
	'--tls-auth-clients', 'no', '--requirepass', $password,
	'--save', '', '--appendonly', 'no', '--daemonize', 'yes',
	'--dir', $dir, '--pidfile', "$dir/redis.pid",
	'--logfile', "$dir/redis.log");

# The tunnels: plain on loopback, TLS to Redis, the server's certificate
# checked against a CA and a host name as in the README; the right ones,
# another CA, another name.
append_to_file(
	"$dir/stunnel.conf", qq{foreground = yes
pid =
[redis]
client = yes
accept = 127.0.0.1:$tunnel_port
connect = 127.0.0.1:$tls_port
verifyChain = yes
CAfile = $dir/ca.pem
checkHost = redis.test
[other-ca]
client = yes
accept = 127.0.0.1:$other_ca_port
connect = 127.0.0.1:$tls_port
verifyChain = yes
CAfile = $dir/other-ca.pem
checkHost = redis.test
[other-host]
client = yes
accept = 127.0.0.1:$other_host_port
connect = 127.0.0.1:$tls_port
verifyChain = yes
CAfile = $dir/ca.pem
checkHost = other.test
});
my $stunnel = IPC::Run::start([ 'stunnel', "$dir/stunnel.conf" ],
	'<', \'', '>', "$dir/stunnel.out", '2>&1');

END
{
	$stunnel->kill_kill if $stunnel;
	if (-f "$dir/redis.pid")
	{
		my $pid = slurp_file("$dir/redis.pid");
		chomp $pid;
		kill 'TERM', $pid;
	}
}

# redis-cli through the tunnel, as a plain client.
sub tunnel_cli
{
	my ($stdin, @args) = @_;
	my ($out, $err) = ('', '');
	IPC::Run::run(
		[
			'redis-cli', '-h', '127.0.0.1', '-p', $tunnel_port,
			'-a', $password, '--no-auth-warning', @args
		],
		'<', \$stdin, '>', \$out, '2>', \$err);
	chomp $out;
	return $out;
}

my $pong = '';
for (1 .. 300)
{
	$pong = tunnel_cli('', 'PING');
	last if $pong eq 'PONG';
	usleep(100_000);
}
is($pong, 'PONG', 'redis-server answers through the stunnel client');

# The dictionaries of the generator's default profile.
my $dictionaries = run_or_die('/usr/bin/python3', "$root/tools/dwh-gen",
	'dictionaries', '--format', 'redis-proto');
like(tunnel_cli($dictionaries, '--pipe'), qr/errors: 0, replies: \d+/,
	'dictionaries loaded through the tunnel');
my $keys = tunnel_cli('', 'DBSIZE');
cmp_ok($keys, '>', 0, "Redis holds $keys dictionary keys");

my $node = PostgreSQL::Test::Cluster->new('redis_tls');
$node->init(extra => [ '--encoding=UTF8', '--locale=C' ]);
$node->append_conf(
	'postgresql.conf', qq{
shared_preload_libraries = 'dwh'
dwh.redis_refresh_interval = 1
dwh.redis_scan_pattern = '*'
dwh.redis_timeout = 2s
});
$node->start;
$node->safe_psql('postgres', 'CREATE EXTENSION dwh');

sub psql { return $node->safe_psql('postgres', $_[0]) }

sub set_url
{
	my ($port) = @_;
	psql("ALTER SYSTEM SET dwh.redis_url = 'redis://:$password\@127.0.0.1:$port/0'");
	psql('SELECT pg_reload_conf()');
}

# hiredis speaks plain RESP to the TLS port: refused, shown, nothing read.
set_url($tls_port);
ok( $node->poll_query_until(
		'postgres',
		"SELECT last_error IS NOT NULL FROM dwh.status WHERE worker = 'redis'"),
	'the worker pointed at the TLS port reports an error');
my $error = psql("SELECT last_error FROM dwh.status WHERE worker = 'redis'");
note "error at the TLS port: $error";
unlike($error, qr/\Q$password\E/, 'the error does not show the password');
like(slurp_file($node->logfile), qr/HINT:.*If the server requires TLS/,
	'the log hints at a TLS tunnel');
is(psql('SELECT count(*) FROM stg.users') + psql('SELECT count(*) FROM stg.restaurants'),
	0, 'nothing mirrored without the tunnel');

# Tunnels that do not trust the server: the handshake fails, stunnel
# closes the worker's connection, nothing is read.
foreach my $bad ([ $other_ca_port, 'another CA' ], [ $other_host_port, 'another host name' ])
{
	my ($port, $what) = @$bad;
	my $since = psql('SELECT clock_timestamp()');
	set_url($port);
	ok( $node->poll_query_until(
			'postgres',
			"SELECT last_error_at > '$since' AND last_error LIKE '%lost%' FROM dwh.status WHERE worker = 'redis'"
		),
		"a tunnel that checks $what refuses the server: the worker shows the connection lost")
	  or diag(psql("SELECT state, last_error FROM dwh.status WHERE worker = 'redis'"));
	is(psql('SELECT count(*) FROM stg.users') + psql('SELECT count(*) FROM stg.restaurants'),
		0, "nothing mirrored through the tunnel that checks $what");
}
# Refused by the checks, not by anything else: stunnel says which.
my $stunnel_log = slurp_file("$dir/stunnel.out");
like($stunnel_log, qr/Rejected by CERT at depth=1: CN=dwh test CA/,
	'stunnel rejected the chain that another CA does not sign');
like($stunnel_log, qr/CERT: Subject checks failed\n.*Rejected by CERT at depth=0: CN=127\.0\.0\.1/,
	'and the certificate that names another host');

# Through the tunnel: everything mirrored.
set_url($tunnel_port);
ok( $node->poll_query_until(
		'postgres',
		"SELECT (SELECT count(*) FROM stg.users) + (SELECT count(*) FROM stg.restaurants) = $keys"
	),
	"all $keys keys mirrored through the tunnel")
  or diag(psql("SELECT state, last_error FROM dwh.status WHERE worker = 'redis'"));
unlike(psql("SELECT state FROM dwh.status WHERE worker = 'redis'"),
	qr/waiting|error/, 'the worker is no longer waiting for Redis');

# A change made in Redis arrives with a refresh.
my $changes = run_or_die('/usr/bin/python3', "$root/tools/dwh-gen",
	'dictionaries', '--format', 'redis-proto', '--changes', '0.1');
like(tunnel_cli($changes, '--pipe'), qr/errors: 0/, 'changed dictionaries written');
my $json = run_or_die('/usr/bin/python3', "$root/tools/dwh-gen",
	'dictionaries', '--format', 'json', '--changes', '0.1');
my ($user_key, $user_value) = $json =~ /^(\S+)\t(\{"_id".*"login".*)$/m;
ok(defined $user_key, "a changed user in the generator's output");
(my $quoted = $user_value) =~ s/'/''/g;
ok( $node->poll_query_until(
		'postgres',
		"SELECT payload = '$quoted'::jsonb FROM stg.users WHERE object_id = '$user_key'"),
	'the changed user value is mirrored');
is(psql('SELECT count(*) FROM dwh.verify()'), '0', 'dwh.verify() is empty');

$node->stop;
done_testing();
