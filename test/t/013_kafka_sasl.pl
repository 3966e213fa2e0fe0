# The production setup of the order stream: SASL_SSL with SCRAM-SHA-512,
# a user, a password and the CA of the broker's certificate (made by the
# test).  Orders flow; the password never appears in the server log, in
# dwh.status, or to a non-superuser; a wrong password shows as an error in
# dwh.status and nothing is consumed until it is corrected.

use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;

use DwhTest;
use PostgreSQL::Test::Utils;
use Test::More;

my $password = 'Sup3r-Secret-42';
$ENV{DWH_KAFKA_SASL_USER} = 'dwh';
$ENV{DWH_KAFKA_SASL_PASSWORD} = $password;
my $broker = start_broker(partitions => 2, sasl => 1);
my $node = new_dwh_node('kafka_sasl', 'dwh.kafka_batch_wait' => '50ms');
load_dictionaries($node);
my $tmp = $PostgreSQL::Test::Utils::tmp_check;

sub sasl_options
{
	my ($pw) = @_;
	return "security.protocol=SASL_SSL sasl.mechanisms=SCRAM-SHA-512 "
	  . "sasl.username=dwh sasl.password=$pw ssl.ca.location=$broker->{ca}";
}

# A wrong password first.
$node->safe_psql('postgres',
	"ALTER SYSTEM SET dwh.kafka_options = '" . sasl_options('wrong-password') . "'; "
	  . "ALTER SYSTEM SET dwh.kafka_brokers = '$broker->{sasl_bootstrap}'; SELECT pg_reload_conf()");
generate_orders("$tmp/orders.txt", '--count 2000 --seed 31', "--manifest $tmp/orders.json");
my $manifest = read_manifest("$tmp/orders.json");
produce($broker, "$tmp/orders.txt");
ok(wait_for($node,
		"SELECT bool_or(last_error ILIKE '%authentication%') FROM dwh.worker_status()"),
	'a wrong password shows as an authentication error in dwh.status');
is(stored_total($node), '0', 'nothing consumed with a wrong password');

# The right one, by reload.
$node->safe_psql('postgres',
	"ALTER SYSTEM SET dwh.kafka_options = '" . sasl_options($password) . "'; SELECT pg_reload_conf()");
ok(wait_applied($node, $manifest->{messages}), 'orders flow over SASL_SSL');
check_consistent($node, 'over SASL_SSL');
check_manifest_counts($node, $manifest, 'over SASL_SSL');

# The password stays secret.
my $status = $node->safe_psql('postgres', 'SELECT s::text FROM dwh.status s');
unlike($status, qr/\Q$password\E/, 'dwh.status does not show the password');
my $log = slurp_file($node->logfile);
unlike($log, qr/\Q$password\E/, 'the server log does not hold the password');
unlike($log, qr/wrong-password/, 'nor the wrong one');
like($log, qr/parameter "dwh.kafka_options" changed \(the new value is not logged/,
	'the reload is logged without the value');
$node->safe_psql('postgres', 'CREATE ROLE analyst LOGIN');
my ($ret, $out, $err) = $node->psql('postgres', 'SHOW dwh.kafka_options',
	extra_params => [ '-U', 'analyst' ]);
isnt($ret, 0, 'a non-superuser cannot read dwh.kafka_options');
unlike($out . $err, qr/\Q$password\E/, 'nor see the password');
is($node->safe_psql('postgres',
		"SELECT count(*) FROM pg_settings WHERE name = 'dwh.kafka_options'", extra_params => [ '-U', 'analyst' ]),
	'0', 'nor find it in pg_settings');

$node->stop;
broker_command('stop', $broker->{dir});
done_testing();
