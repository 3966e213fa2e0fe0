# No byte of a secret setting (dwh.kafka_options, dwh.redis_url) reaches the
# server log, a message sent to the client, pg_stat_activity or
# pg_stat_statements, however a statement spells the setting's name.
#
# The node logs everything PostgreSQL can log about a statement: every
# statement (log_statement = 'all'), its duration line, the STATEMENT line
# of every message (log_min_error_statement = debug5), bind parameters, the
# plans of auto_explain, DEBUG2 messages (a backend's "parameter changed"
# on reload), with the verbose error format (DETAIL, HINT, CONTEXT, QUERY).
# pg_stat_statements keeps utility statements (track_utility) and nested
# ones.  Each statement below sets a secret, valid or refused by a check
# hook, in another spelling; each secret is a distinct random string.  The
# whole log, the messages psql received, the text pg_stat_activity shows
# for the session once it is idle after the statement (read from another
# session), and pg_stat_statements are then searched for every secret.
# Neither Kafka nor Redis runs: the workers idle or fail to connect.

use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use IPC::Run;
use Test::More;

my $hidden_activity =
  '/* dwh: statement not shown, it may hold the value of a secret setting */';
my $hidden_text = '<not shown: it may hold the value of a secret dwh setting>';

my $node = PostgreSQL::Test::Cluster->new('secrets');
$node->init(extra => [ '--encoding=UTF8', '--locale=C' ]);
$node->append_conf(
	'postgresql.conf', q{
shared_preload_libraries = 'pg_stat_statements, auto_explain, dwh'
log_statement = 'all'
log_min_error_statement = debug5
log_min_duration_statement = 0
log_min_messages = debug2
log_error_verbosity = verbose
log_parameter_max_length = -1
log_parameter_max_length_on_error = -1
compute_query_id = on
pg_stat_statements.track = all
pg_stat_statements.track_utility = on
auto_explain.log_min_duration = 0
auto_explain.log_verbose = on
auto_explain.log_nested_statements = on
});
$node->start;
$node->safe_psql('postgres',
	'CREATE EXTENSION dwh; CREATE EXTENSION pg_stat_statements');

# Distinct, random-looking secrets: none can occur by chance.
my @secrets;
my %secret_of;

sub secret
{
	my ($label) = @_;
	my $s = 'Zq';
	$s .= (0 .. 9, 'a' .. 'z', 'A' .. 'Z')[ int(rand(62)) ] for 1 .. 22;
	push @secrets, $s;
	$secret_of{$s} = $label;
	return $s;
}

# Messages psql received, without its own echo of the statement ("LINE n:"
# and the caret under it are psql's rendering of the text it sent).
my $client_messages = '';

sub client_text
{
	my ($stderr) = @_;
	my @lines = split /\n/, $stderr;
	my @kept;
	for (my $i = 0; $i < @lines; $i++)
	{
		if ($lines[$i] =~ /^LINE \d+: /)
		{
			$i++ if $i + 1 < @lines && $lines[ $i + 1 ] =~ /^\s*\^\s*$/;
			next;
		}
		push @kept, $lines[$i];
	}
	return join("\n", @kept) . "\n";
}

my $session = $node->background_psql('postgres', on_error_stop => 0);
$session->query_safe('\set VERBOSITY verbose');
$session->query_safe('\set SHOW_CONTEXT always');
my $session_pid = $session->query_safe('SELECT pg_backend_pid()');
$session->{stderr} = '';

# Run statements in the session; once it is idle, read what
# pg_stat_activity shows for it from another session.
my %activity_of;

sub run_in_session
{
	my ($label, $sql) = @_;
	$session->query($sql);
	$client_messages .= client_text($session->{stderr});
	$session->{stderr} = '';
	my $activity = $node->safe_psql('postgres',
		"SELECT state || ': ' || query FROM pg_stat_activity WHERE pid = $session_pid"
	);
	$activity_of{$label} = $activity;
	return $activity;
}

my ($s, $t);

# ALTER SYSTEM, valid values, in every spelling of the name.
$s = secret('upper case');
run_in_session('upper case',
	"ALTER SYSTEM SET DWH.KAFKA_OPTIONS = 'sasl.username=dwh sasl.password=$s'");
$s = secret('spaces around the dot');
run_in_session('spaces around the dot',
	"ALTER SYSTEM SET dwh . redis_url = 'redis://:$s\@127.0.0.1:1/0'");
$s = secret('quoted schema part');
run_in_session('quoted schema part',
	"ALTER SYSTEM SET \"dwh\".kafka_options = 'sasl.password=$s'");
$s = secret('comments around the dot');
run_in_session('comments around the dot',
	"ALTER SYSTEM SET dwh /* a */ . /* b */ \"redis_url\" TO 'redis://:$s\@127.0.0.1:1/0'"
);
$s = secret('one quoted identifier');
run_in_session('one quoted identifier',
	"ALTER SYSTEM SET \"dwh.redis_url\" = 'redis://:$s\@127.0.0.1:1/0'");
$s = secret('unicode escapes');
run_in_session('unicode escapes',
	"ALTER SYSTEM SET dwh.U&\"redis!005furl\" UESCAPE '!' = 'redis://:$s\@127.0.0.1:1/0'"
);
$s = secret('line comment before the dot');
run_in_session('line comment before the dot',
	"ALTER SYSTEM SET dwh -- the secret one\n.kafka_options = 'sasl.password=$s'");
$s = secret('dollar-quoted value');
run_in_session('dollar-quoted value',
	"ALTER SYSTEM SET dwh.redis_url = \$v\$redis://:$s\@127.0.0.1:1/0\$v\$");

is( $activity_of{'upper case'},
	"idle: $hidden_activity",
	'pg_stat_activity shows the placeholder for a session idle after ALTER SYSTEM'
);

# Values the check hooks refuse: no message quotes any part of them.
$s = secret('unquoted password with a space');
run_in_session('unquoted password with a space',
	"ALTER SYSTEM SET dwh.kafka_options = 'sasl.password=Pass $s'");
$s = secret('pair named by a secret');
run_in_session('pair named by a secret',
	"ALTER SYSTEM SET dwh.kafka_options = 'sasl.password=a ${s}=c'");
$s = secret('librdkafka refuses the value');
run_in_session('librdkafka refuses the value',
	"ALTER SYSTEM SET dwh.kafka_options = 'security.protocol=$s'");
$s = secret('bad port');
run_in_session('bad port',
	"ALTER SYSTEM SET dwh.redis_url = 'redis://:$s\@127.0.0.1:99999'");
$s = secret('syntax error');
run_in_session('syntax error',
	"ALTER SYSTEM SET dwh.redis_url = redis $s");
$s = secret('quoted identifier in a syntax error');
run_in_session('quoted identifier in a syntax error',
	"ALTER SYSTEM SET dwh.redis_url = 'x' \"$s\"");

# SET, SET LOCAL, RESET then SET (refused: the settings change on reload).
$s = secret('SET');
run_in_session('SET', "SET dwh.redis_url = 'redis://:$s\@h:1'");
$s = secret('SET LOCAL');
run_in_session('SET LOCAL',
	"BEGIN;\nSET LOCAL dwh.kafka_options = 'sasl.password=$s'");
$session->query('ROLLBACK');
$s = secret('RESET then SET');
run_in_session('RESET then SET',
	"RESET dwh.redis_url; SET dwh.redis_url TO 'redis://:$s\@h:1'");

# set_config, with a constant name in any case or a computed one.
$s = secret('set_config computed name');
run_in_session('set_config computed name',
	"SELECT set_config('dwh.' || 'redis_url', 'redis://:$s\@h:1', false)");
$s = secret('set_config upper case');
run_in_session('set_config upper case',
	"SELECT pg_catalog.set_config('DWH.KAFKA_OPTIONS', 'sasl.password=$s', true)"
);
$s = secret('set_config escaped name');
run_in_session('set_config escaped name',
	"SELECT set_config(E'dwh.redis\\x5furl', '$s', false)");
$s = secret('set_config formatted name');
run_in_session('set_config formatted name',
	"SELECT set_config(format('%s.%s', 'dwh', 'redis' || '_url'), '$s', false)");
$s = secret('standard_conforming_strings off');
run_in_session('standard_conforming_strings off',
	"SET standard_conforming_strings = off;\n"
	  . "SELECT set_config('dwh.redis\\137url', '$s', false)");
$session->query('RESET standard_conforming_strings');
$s = secret('UPDATE pg_settings');
run_in_session('UPDATE pg_settings',
	"UPDATE pg_settings SET setting = '$s' WHERE name = 'dwh.' || 'redis_url'");

# DO blocks: the failing EXECUTE's CONTEXT line, a caught failure (the DO
# succeeds, so pg_stat_statements keeps it), a dynamic ALTER SYSTEM.
$s = secret('DO failing');
run_in_session('DO failing',
	"DO \$\$ BEGIN EXECUTE 'SET dwh.kafka_options = ''sasl.password=$s'''; END \$\$"
);
$s = secret('DO caught');
run_in_session('DO caught',
	"DO \$\$ BEGIN EXECUTE 'SET dwh.redis_url = ''redis://:$s\@h:1'''; "
	  . "EXCEPTION WHEN OTHERS THEN RAISE NOTICE 'caught: %', SQLERRM; END \$\$");
$s = secret('DO dynamic ALTER SYSTEM');
run_in_session('DO dynamic ALTER SYSTEM',
	"DO \$\$ BEGIN EXECUTE format('ALTER SYSTEM SET %s = %L', 'dwh.' || 'redis' || '_url', '$s'); END \$\$"
);

# PREPARE and EXECUTE: the EXECUTE's text does not name the setting.
$s = secret('EXECUTE of set_config');
run_in_session('EXECUTE of set_config',
	"PREPARE set_url(text) AS SELECT set_config('dwh.redis_url', \$1, false);\n"
	  . "EXECUTE set_url('redis://:$s\@h:1')");
$s = secret('EXECUTE with a computed name');
run_in_session('EXECUTE with a computed name',
	"PREPARE set_any(text, text) AS SELECT set_config(\$1, \$2, false);\n"
	  . "EXECUTE set_any('dwh.' || 'kafka_options', 'sasl.password=$s')");

is( $activity_of{'EXECUTE of set_config'},
	"idle: $hidden_activity",
	'pg_stat_activity shows the placeholder for an EXECUTE of a statement that sets a secret'
);

# A name misspelt (refused: dwh is a reserved prefix) comes with the value
# all the same.
$s = secret('misspelt name');
run_in_session('misspelt name',
	"ALTER SYSTEM SET dwh.redis_ulr = 'redis://:$s\@127.0.0.1:1/0'");
$s = secret('misspelt name in SET');
run_in_session('misspelt name in SET', "SET LOCAL Dwh . kafka_option = 'sasl.password=$s'");
$s = secret('misspelt quoted name per database');
run_in_session('misspelt quoted name per database',
	"ALTER DATABASE postgres SET \"dwh.kafkaoptions\" TO 'sasl.password=$s'");
$s = secret('misspelt name in set_config');
run_in_session('misspelt name in set_config',
	"SELECT set_config('dwh.redisurl', 'redis://:$s\@h:1', false)");
like($client_messages, qr/ERROR:  42704: unrecognized configuration parameter "dwh\.redis_ulr"/,
	'the error names the misspelt setting');
is( $activity_of{'misspelt name in SET'},
	"idle: $hidden_activity",
	'pg_stat_activity shows the placeholder for a SET of a misspelt name');

# Per database, per role, per function (refused for a reload setting).
$s = secret('ALTER DATABASE');
run_in_session('ALTER DATABASE',
	"ALTER DATABASE postgres SET dwh.redis_url = 'redis://:$s\@h:1'");
$s = secret('ALTER ROLE');
run_in_session('ALTER ROLE',
	"ALTER ROLE CURRENT_USER SET dwh.kafka_options = 'sasl.password=$s'");
$s = secret('function SET clause');
run_in_session('function SET clause',
	"CREATE FUNCTION t_secret() RETURNS int LANGUAGE sql SET dwh.redis_url = 'redis://:$s\@h:1' AS 'SELECT 1'"
);

# Through a function and a procedure that call set_config().
run_in_session('setter function',
	"CREATE FUNCTION t_setter(n text, v text) RETURNS text LANGUAGE sql AS \$\$ SELECT pg_catalog.set_config(n, v, false) \$\$;\n"
	  . "CREATE PROCEDURE t_set(n text, v text) LANGUAGE sql AS \$\$ SELECT pg_catalog.set_config(n, v, false) \$\$;"
);
$s = secret('function call');
run_in_session('function call',
	"SELECT t_setter('dwh.redis_url', 'redis://:$s\@h:1')");
$s = secret('CALL');
run_in_session('CALL', "CALL t_set('dwh.kafka_options', 'sasl.password=$s')");

# The README's limit: a call whose text names neither setting nor
# set_config cannot be recognized before it runs, and log_statement logs
# it.  Once the error names the setting, the rest is hidden: the secret
# is in that one log line and nowhere else (checked below).  Not among
# @secrets, which must be in no log line at all.
my $unnamed = 'Zq';
$unnamed .= (0 .. 9, 'a' .. 'z', 'A' .. 'Z')[ int(rand(62)) ] for 1 .. 22;
my $unnamed_client_from = length $client_messages;
run_in_session('unrecognizable call',
	"SELECT t_setter('dwh.red' || 'is_url', 'redis://:$unnamed\@h:1')");
is( $activity_of{'unrecognizable call'},
	"idle: $hidden_activity",
	'pg_stat_activity shows the placeholder once the error named the setting');

# COPY and EXPLAIN of set_config (EXPLAIN succeeds: kept by
# pg_stat_statements), and a query that succeeds (auto_explain's plan).
$s = secret('COPY');
run_in_session('COPY',
	"COPY (SELECT set_config('dwh.redis_url', '$s', false)) TO STDOUT");
$s = secret('EXPLAIN');
run_in_session('EXPLAIN',
	"EXPLAIN (VERBOSE) SELECT set_config('dwh.' || 'kafka_options', '$s', false)"
);
$s = secret('auto_explain');
run_in_session('auto_explain',
	"SELECT current_setting('dwh.redis_url', true) IS NULL AS unset, '$s' AS tag"
);
# A column named like a setting: doubt counts as secret.
$s = secret('a column named redis_url');
run_in_session('a column named redis_url', "SELECT '$s' AS redis_url");

# The extended protocol, with the name and the value as bind parameters.
my $script = "${PostgreSQL::Test::Utils::tmp_check}/set_config.sql";
append_to_file($script, "SELECT set_config(:name, :value, false);\n");
foreach my $mode ('extended', 'prepared')
{
	$s = secret("pgbench $mode");
	my ($out, $err) = ('', '');
	IPC::Run::run(
		[
			'pgbench', '-n', '-t', '1', '-M', $mode,
			'-D', ($mode eq 'extended' ? 'name=DWH.REDIS_URL' : 'name=dwh.kafka_options'),
			'-D', "value=$s",
			'-f', $script,
			'-h', $node->host, '-p', $node->port, 'postgres'
		],
		'>', \$out, '2>', \$err);
	$client_messages .= $out . $err;
}

# Reload the values ALTER SYSTEM set: the postmaster (and, at DEBUG2,
# every backend) logs the change, and the Redis worker tries the URL.
$node->safe_psql('postgres', 'SELECT pg_reload_conf()');
ok( $node->poll_query_until(
		'postgres',
		"SELECT last_error IS NOT NULL FROM dwh.status WHERE worker = 'redis'"),
	'the Redis worker tried the URL set by ALTER SYSTEM');

# The configuration file: a valid value, then a broken line whose token a
# syntax error would quote.
$s = secret('postgresql.conf');
$node->append_conf('postgresql.conf',
	"dwh.kafka_options = 'sasl.password=$s'\n");
$node->reload;
$s = secret('postgresql.conf syntax error');
$node->append_conf('postgresql.conf', "dwh.kafka_options = sasl $s\n");
$node->reload;
$node->wait_for_log(qr/contains errors/);

# While the statement still runs: another session reads the placeholder
# in pg_stat_activity, not the statement (it sleeps before its secret
# setting is refused).
$s = secret('a statement still running');
my ($active_out, $active_err) = ('', '');
my $active = IPC::Run::start(
	[
		'psql', '-X', '-d',
		$node->connstr('postgres') . ' application_name=secret_active',
		'-c', "SELECT pg_sleep(3), set_config('dwh.redis_url', 'redis://:$s\@h/0', false)"
	],
	'>', \$active_out, '2>', \$active_err);
ok( $node->poll_query_until(
		'postgres', "SELECT count(*) = 1 FROM pg_stat_activity
			WHERE application_name = 'secret_active' AND state = 'active'"),
	'the statement runs');
$activity_of{$secret_of{$s}} = $node->safe_psql('postgres',
	"SELECT query FROM pg_stat_activity WHERE application_name = 'secret_active'");
is($activity_of{$secret_of{$s}}, $hidden_activity,
	'pg_stat_activity shows the placeholder while the statement runs');
$active->finish;
$client_messages .= client_text($active_err);

# What the other backends show, and what pg_stat_statements kept.
my $all_activity = $node->safe_psql('postgres',
	'SELECT string_agg(coalesce(query, \'\'), E\'\\n\') FROM pg_stat_activity');
my $statements = $node->safe_psql('postgres',
	'SELECT string_agg(query, E\'\\n\') FROM pg_stat_statements');
like(
	$statements,
	qr/\Q$hidden_activity\E/,
	'pg_stat_statements keeps the placeholder for ALTER SYSTEM and the caught DO block'
);

$session->quit;
$node->stop;
my $log = slurp_file($node->logfile);

like($log, qr/statement: \Q$hidden_text\E/,
	'the log says a statement was not shown');
like(
	$log,
	qr/parameter "dwh\.kafka_options" changed \(the new value is not logged/,
	'the reload says the setting changed without its value');
like($log, qr/invalid Kafka options: name=value pair 2 has no "="/,
	'the refused unquoted password is named by its pair number');
# What the README's table says each kind of line shows.
like($log, qr/ERROR:  42601: syntax error at or near "\*\*\*"/,
	'a syntax error shows its token as ***');
like($log, qr/ERROR:  55P02: parameter "dwh\.redis_url" cannot be changed now/,
	'a message that names nothing but the setting keeps its text');
like($log, qr/duration: \*\*\* ms  plan:\n\t\*\*\*\n/,
	"auto_explain's plan is shown as its format");
unlike($log, qr/STATEMENT:  \Q$hidden_text\E/, 'the STATEMENT line of a hidden statement is left out');
unlike($log, qr/STATEMENT:  [^\n]*(kafka_options|redis_url)/i, 'no STATEMENT line names a secret setting');

# The secret occurs nowhere in the text; on failure, show the lines that
# hold it (not the whole log).
sub nowhere
{
	my ($text, $secret, $name) = @_;
	my @hits = grep { index($_, $secret) >= 0 } split /\n/, $text;
	ok(!@hits, $name) or diag(join("\n", @hits));
	return;
}

my @unnamed_lines = grep { index($_, $unnamed) >= 0 } split /\n/, $log;
is(scalar(@unnamed_lines), 1,
	'the unrecognizable call is in one log line') or diag(join("\n", @unnamed_lines));
like(
	$unnamed_lines[0] // '',
	qr/ LOG:  00000: statement: SELECT t_setter\('dwh\.red' \|\| 'is_url'/,
	'its log_statement line, as the README says');
like(substr($client_messages, $unnamed_client_from),
	qr/dwh\.redis_url/, 'the client was told about the setting');
nowhere(substr($client_messages, $unnamed_client_from),
	$unnamed, 'client messages: nothing of the unrecognizable call');
nowhere($statements, $unnamed, 'pg_stat_statements: nothing of the unrecognizable call');

foreach my $secret (@secrets)
{
	my $label = $secret_of{$secret};
	nowhere($log, $secret, "server log: nothing of \"$label\"");
	nowhere($client_messages, $secret,
		"client messages: nothing of \"$label\"");
	nowhere($activity_of{$label} // '', $secret,
		"pg_stat_activity of the idle session: nothing of \"$label\"");
	nowhere($all_activity, $secret, "pg_stat_activity: nothing of \"$label\"");
	nowhere($statements, $secret,
		"pg_stat_statements: nothing of \"$label\"");
}

# pg_stat_statements loaded after dwh would see utility statements first:
# the server says so at start.
my $late = PostgreSQL::Test::Cluster->new('secrets_late_pgss');
$late->init(extra => [ '--encoding=UTF8', '--locale=C' ]);
$late->append_conf('postgresql.conf',
	"shared_preload_libraries = 'dwh, pg_stat_statements'\n");
$late->start;
$late->stop;
like(
	slurp_file($late->logfile),
	qr/WARNING:  a library loaded after dwh sees utility statements before dwh hides secret setting values from them/,
	'a library loaded after dwh is reported at start');

done_testing();
