# dwh's metrics as Prometheus sees them: the real prometheus-postgres-exporter
# (Debian's package) started with the shipped monitoring/queries.yaml,
# connected as the role of the README's recipe (prometheus), in front of a
# node whose workers consume a real Kafka broker and mirror a real
# redis-server.  Its /metrics is scraped over HTTP and every dwh metric is
# checked: its type (counters end in _total) and HELP text, and its value
# against the warehouse (messages applied, one malformed message
# dead-lettered, no lag on any partition after the drain, Redis keys
# mirrored and missing, tag events by kind and as the tags worker produced
# them to a topic, its expiry passes, the state of each worker).  Then the
# broker is stopped (the metrics show the error and the state of the Kafka
# workers, and a tag event waiting for the broker) and started again (the
# error clears, new messages are counted, the event is produced), then
# Redis is stopped (the Redis worker's error and state); last a Kafka
# worker is terminated (up 0 until it is started again).

use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;

use DwhTest;
use HTTP::Tiny;
use IPC::Run;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use RedisServer;
use Test::More;
use Time::HiRes qw(usleep);

my $exporter_bin = '/usr/bin/prometheus-postgres-exporter';
-x $exporter_bin
  or die "$exporter_bin is missing: apt-get install prometheus-postgres-exporter (tools/install-deps.sh)";

my $root = dwh_root();
my $tmp = $PostgreSQL::Test::Utils::tmp_check;

# Redis holds the dictionaries before the node starts.
my $redis = RedisServer->new(password => 'metrics-test');
system('/usr/bin/python3', "$root/tools/dwh-gen", 'dictionaries', '--redis', $redis->url) == 0
  or die 'dwh-gen dictionaries --redis failed';
my $redis_keys = $redis->cli('DBSIZE');
cmp_ok($redis_keys, '>', 0, "Redis holds $redis_keys dictionary keys");

my $broker = start_broker(partitions => 2);
broker_command('create-topic', $broker->{dir}, 'user-tags', 1);
my $node = new_dwh_node(
	'prometheus_metrics',
	'dwh.tags_topic' => 'user-tags',
	'dwh.tags_expire_interval' => '1s',
	'dwh.kafka_consumers' => 2,
	'dwh.kafka_batch_wait' => '50ms',
	'dwh.kafka_brokers' => $broker->{bootstrap},
	'dwh.redis_url' => $redis->url,
	'dwh.redis_scan_pattern' => '*',
	'dwh.redis_refresh_interval' => '1s');

sub psql { return $node->safe_psql('postgres', $_[0]) }

ok( wait_for($node,
		"SELECT keys_mirrored = $redis_keys FROM dwh.status WHERE worker = 'redis'"),
	'the Redis worker mirrors every dictionary key');

# A tag rule, so that orders grant tags; then the orders, with one
# malformed message among them.
psql(q{INSERT INTO dwh.tag_rules (tag, kind) VALUES ('customer', 'all_orders')});
generate_orders("$tmp/orders.txt", '--count 300 --seed 42 --clean',
	"--manifest $tmp/orders.json");
my $manifest = read_manifest("$tmp/orders.json");
open(my $fh, '>>', "$tmp/orders.txt") or die "could not append to $tmp/orders.txt: $!";
print $fh "this is not an order\n";
close $fh;
my $messages = $manifest->{messages} + 1;
produce($broker, "$tmp/orders.txt");
ok(wait_applied($node, $messages), "all $messages messages applied");
ok( wait_for($node,
		'SELECT count(*) = 2 AND bool_and(lag = 0 AND stored_offset = high_watermark) FROM dwh.kafka_partitions'
	),
	'no lag on either partition');
is(psql(q{SELECT count(*) FROM dwh.dead_letters WHERE source = 'kafka'}),
	'1', 'the malformed message is dead-lettered');

# An order naming a user and a restaurant that Redis does not hold: two
# missing keys.
# Its user is a customer until a newer version cancels the order: a
# grant, then a revoke.
sub ingest_lone_order
{
	my ($status, $ts) = @_;
	return psql(
		qq{SELECT dwh.ingest_order(\$m\${"object_id": 9000001, "object_type": "order", "sent_dttm": "$ts", "payload": {"restaurant": {"id": "no-such-restaurant"}, "date": "2023-05-01 12:00:00", "user": {"id": "no-such-user"}, "order_items": [{"id": "d1", "name": "Плов", "price": 100, "quantity": 1}], "bonus_payment": 0, "cost": 100, "payment": 100, "bonus_grant": 0, "statuses": [], "final_status": "$status", "update_ts": "$ts"}}\$m\$::text)}
	);
}
is(ingest_lone_order('CLOSED', '2023-05-01 12:00:00'), 'applied', 'an order of an unknown user');
is(ingest_lone_order('CANCELLED', '2023-05-01 13:00:00'), 'applied', 'and its cancellation');
ok( wait_for($node,
		"SELECT keys_missing = 2 AND keys_mirrored = $redis_keys FROM dwh.status WHERE worker = 'redis'"),
	'the Redis worker counts the two missing keys');
check_consistent($node, 'before the scrape');

# The exporter's role, as the README's recipe creates it.
my $readme = slurp_file("$root/README.md");
my ($security) = $readme =~ /^## Security\n(.*?)^## /ms;
my ($recipe) = ($security // '') =~ /\n((?:--[^\n]*\n)*CREATE ROLE prometheus\b.*?)(?:\n\n|```)/s;
ok(defined $recipe, "README's Security section has the recipe of role prometheus");
psql($recipe // 'SELECT');

# The exporter, on a port of its own, with the shipped queries file.
my $port = PostgreSQL::Test::Cluster::get_free_port();
my $log = "$PostgreSQL::Test::Utils::log_path/042_prometheus_exporter.log";
my $exporter;
{
	local $ENV{DATA_SOURCE_NAME} =
	    'host=' . $node->host . ' port=' . $node->port
	  . ' user=prometheus dbname=postgres sslmode=disable';
	$exporter = IPC::Run::start(
		[
			$exporter_bin, "--web.listen-address=127.0.0.1:$port",
			"--extend.query-path=$root/monitoring/queries.yaml",
		],
		'<', \undef, '>', $log, '2>&1');
}
END { $exporter->kill_kill if $exporter && $exporter->pumpable; }

my $http = HTTP::Tiny->new(timeout => 30);

# One scrape: the samples by metric name (each a hash of labels and a
# value), and the TYPE and HELP lines.
sub scrape
{
	my $res = $http->get("http://127.0.0.1:$port/metrics");
	return undef unless $res->{success};
	my %m = (samples => {}, type => {}, help => {});
	foreach my $line (split /\n/, $res->{content})
	{
		if ($line =~ /^# HELP (\S+) (.*)$/)
		{
			$m{help}{$1} = $2;
		}
		elsif ($line =~ /^# TYPE (\S+) (\S+)$/)
		{
			$m{type}{$1} = $2;
		}
		elsif ($line =~ /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$/)
		{
			my ($name, $labels, $value) = ($1, $2 // '', $3);
			my %l;
			$l{$1} = $2 while $labels =~ /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g;
			push @{ $m{samples}{$name} }, { labels => \%l, value => $value };
		}
		elsif ($line =~ /\S/ && $line !~ /^#/)
		{
			die "a line of /metrics that is not the text format: $line";
		}
	}
	return \%m;
}

# The value of the one sample of a metric with these labels (others may
# be there too); undef when none or several match.
sub value_of
{
	my ($m, $name, %want) = @_;
	my @hits = grep {
		my $l = $_->{labels};
		!grep { ($l->{$_} // "\0") ne $want{$_} } keys %want
	} @{ $m->{samples}{$name} // [] };
	return @hits == 1 ? 0 + $hits[0]{value} : undef;
}

sub sum_of
{
	my ($m, $name) = @_;
	my $sum = 0;
	$sum += $_->{value} foreach @{ $m->{samples}{$name} // [] };
	return $sum;
}

# Scrape until the condition holds of a scrape; returns the last scrape.
sub scrape_until
{
	my ($what, $cond) = @_;
	my $deadline = time() + $PostgreSQL::Test::Utils::timeout_default;
	my $m;
	while (time() < $deadline)
	{
		$m = scrape();
		return $m if $m && $cond->($m);
		usleep(500_000);
	}
	diag("timed out waiting for the metrics to show $what");
	diag(psql('SELECT worker, state, last_error FROM dwh.status'));
	return $m;
}

my $m = scrape_until('the dwh metrics', sub { exists $_[0]{samples}{dwh_worker_up} });
ok($m && exists $m->{samples}{dwh_worker_up}, 'the exporter serves dwh metrics')
  or BAIL_OUT('no dwh metrics from the exporter; its log: ' . slurp_file($log));

# The file is loaded and every query, dwh's and the exporter's own, runs
# as the role: nothing failed.
is(value_of($m, 'pg_up'), 1, 'the exporter is connected');
is(value_of($m, 'pg_exporter_user_queries_load_error'),
	0, 'the queries file is loaded without an error');
is(value_of($m, 'pg_exporter_last_scrape_error'), 0, 'the scrape had no error');
unlike(slurp_file($log), qr/level=error/, 'the exporter logged no error')
  or diag(slurp_file($log));

# Every metric of the queries file is there, with its type and HELP.
my %types = (
	dwh_worker_up => 'gauge',
	dwh_worker_error => 'gauge',
	dwh_worker_last_error_age_seconds => 'gauge',
	dwh_worker_state => 'gauge',
	dwh_kafka_worker_messages_total => 'counter',
	dwh_kafka_worker_batches_total => 'counter',
	dwh_kafka_worker_dead_letters_total => 'counter',
	dwh_kafka_worker_apply_seconds_total => 'counter',
	dwh_kafka_worker_lag => 'gauge',
	dwh_kafka_worker_partitions => 'gauge',
	dwh_kafka_partition_lag => 'gauge',
	dwh_kafka_partition_stored_offset => 'gauge',
	dwh_kafka_partition_high_watermark => 'gauge',
	dwh_kafka_partition_low_watermark => 'gauge',
	dwh_kafka_partition_owned => 'gauge',
	dwh_kafka_partition_stopped => 'gauge',
	dwh_kafka_partition_gaps_total => 'counter',
	dwh_kafka_partition_watermark_age_seconds => 'gauge',
	dwh_redis_keys_mirrored => 'gauge',
	dwh_redis_keys_missing => 'gauge',
	dwh_redis_refreshes_total => 'counter',
	dwh_redis_changes_found_total => 'counter',
	dwh_tags_worker_expiry_passes_total => 'counter',
	dwh_tags_worker_last_expiry_age_seconds => 'gauge',
	dwh_tags_worker_events_produced_total => 'counter',
	dwh_tags_worker_events_pending => 'gauge',
	dwh_tags_worker_last_produced_age_seconds => 'gauge',
	dwh_tag_events_total => 'counter');
my @served = sort grep { /^dwh_/ } keys %{ $m->{samples} };
is_deeply(\@served, [ sort keys %types ], 'the dwh metrics served are those of the queries file');
# The alerts' annotations name the server by this label.
my $server = $node->host . ':' . $node->port;
my @other_server = grep { ($_->{labels}{server} // '') ne $server }
  map { @{ $m->{samples}{$_} } } @served;
is(scalar(@other_server), 0, "every dwh sample carries the label server=\"$server\"");
foreach my $name (sort keys %types)
{
	is($m->{type}{$name}, $types{$name}, "$name is a $types{$name}");
	like($m->{help}{$name} // '', qr/\w{3,}.*\w{3,}/, "$name has a HELP text");
}

# The workers: all three run, none has an error, each in one state.
foreach my $worker ('kafka 1', 'kafka 2', 'redis')
{
	is(value_of($m, 'dwh_worker_up', worker => $worker), 1, "$worker is up");
	is(value_of($m, 'dwh_worker_error', worker => $worker), 0, "$worker has no error");
	is(value_of($m, 'dwh_worker_last_error_age_seconds', worker => $worker),
		0, "$worker: no last error age");
	my @on = map { $_->{labels}{state} }
	  grep { $_->{labels}{worker} eq $worker && $_->{value} == 1 }
	  @{ $m->{samples}{dwh_worker_state} };
	is(scalar(@on), 1, "$worker is in one state");
	is($on[0], $worker eq 'redis' ? 'mirroring' : 'consuming',
		"$worker is " . ($worker eq 'redis' ? 'mirroring' : 'consuming'));
}
is(value_of($m, 'dwh_worker_up', worker => 'redis', kind => 'redis'), 1,
	'the Redis worker has kind redis');
is(value_of($m, 'dwh_worker_up', worker => 'kafka 1', kind => 'kafka'), 1,
	'a Kafka worker has kind kafka');
is(value_of($m, 'dwh_worker_up', worker => 'tags', kind => 'tags'), 1,
	'the tags worker is up, of kind tags');
is(value_of($m, 'dwh_worker_error', worker => 'tags'), 0, 'the tags worker has no error');
is(join(',', map { $_->{labels}{state} }
		grep { $_->{labels}{worker} eq 'tags' && $_->{value} == 1 }
		@{ $m->{samples}{dwh_worker_state} }),
	'other', 'the tags worker is in one state, other (its own, in dwh.status)');

# Kafka: the counters add up to what was applied.
is(sum_of($m, 'dwh_kafka_worker_messages_total'), $messages, 'messages applied: every message');
is(sum_of($m, 'dwh_kafka_worker_dead_letters_total'), 1, 'dead letters: the malformed one');
is(sum_of($m, 'dwh_kafka_worker_batches_total'),
	psql(q{SELECT sum(batches) FROM dwh.status WHERE worker LIKE 'kafka%'}),
	'batches as dwh.status counts them');
cmp_ok(sum_of($m, 'dwh_kafka_worker_batches_total'), '>', 0, 'batches were applied');
foreach my $worker ('kafka 1', 'kafka 2')
{
	my $seconds = value_of($m, 'dwh_kafka_worker_apply_seconds_total', worker => $worker);
	is( psql(
			"SELECT abs(apply_time / 1000 - $seconds) < 1e-6 AND (apply_time > 0) = (batches > 0) AND apply_time < 1000 * extract(epoch FROM now() - started_at) FROM dwh.status WHERE worker = '$worker'"
		),
		't',
		"$worker: the seconds spent applying are dwh.status.apply_time, above 0 once it applied a batch, below the time since it started"
	);
}
cmp_ok(sum_of($m, 'dwh_kafka_worker_apply_seconds_total'), '>', 0, 'time was spent applying');
is(sum_of($m, 'dwh_kafka_worker_lag'), 0, 'no worker lags');
is(sum_of($m, 'dwh_kafka_worker_partitions'), 2, 'the two partitions are owned');
foreach my $p (0, 1)
{
	my %l = (topic => 'order-service_orders', partition => $p);
	my $stored = psql("SELECT next_offset FROM dwh.kafka_offsets WHERE kafka_partition = $p");
	is(value_of($m, 'dwh_kafka_partition_lag', %l), 0, "partition $p: lag 0 after the drain");
	is(value_of($m, 'dwh_kafka_partition_stored_offset', %l), $stored,
		"partition $p: the stored offset");
	is(value_of($m, 'dwh_kafka_partition_high_watermark', %l), $stored,
		"partition $p: the high watermark is the stored offset");
	is(value_of($m, 'dwh_kafka_partition_low_watermark', %l), 0, "partition $p: low watermark 0");
	is(value_of($m, 'dwh_kafka_partition_owned', %l), 1, "partition $p: owned");
	is(value_of($m, 'dwh_kafka_partition_stopped', %l), 0, "partition $p: not stopped");
	is(value_of($m, 'dwh_kafka_partition_gaps_total', %l), 0, "partition $p: no gap");
	my $age = value_of($m, 'dwh_kafka_partition_watermark_age_seconds', %l);
	ok(defined $age && $age >= 0 && $age < 60, "partition $p: watermarks seen lately");
}
is(sum_of($m, 'dwh_kafka_partition_stored_offset'), $messages,
	'the stored offsets add up to the messages');

# While dwh.kafka_offsets and dwh.kafka_gaps are locked, a scrape does not
# wait for them, and says "unknown": -1 for the gauges, NaN for the gaps
# counter (a counter at -1 would be taken for a reset).
my $locker = $node->background_psql('postgres');
$locker->query_safe(
	'BEGIN; LOCK dwh.kafka_offsets, dwh.kafka_gaps IN ACCESS EXCLUSIVE MODE;');
$m = scrape_until(
	'the partitions unknown while their tables are locked',
	sub {
		(value_of($_[0], 'dwh_kafka_partition_stored_offset',
				topic => 'order-service_orders', partition => 0) // 0) == -1;
	});
foreach my $p (0, 1)
{
	my %l = (topic => 'order-service_orders', partition => $p);
	is(value_of($m, 'dwh_kafka_partition_lag', %l), -1, "locked: partition ${p}'s lag is -1");
	is(value_of($m, 'dwh_kafka_partition_stored_offset', %l),
		-1, "locked: partition ${p}'s stored offset is -1");
	is(value_of($m, 'dwh_kafka_partition_stopped', %l), -1, "locked: partition ${p}'s stopped is -1");
	my @gaps = grep { $_->{labels}{partition} eq $p }
	  @{ $m->{samples}{dwh_kafka_partition_gaps_total} // [] };
	is(join(',', map { $_->{value} } @gaps), 'NaN', "locked: partition ${p}'s gaps are NaN");
}
# A worker may own both partitions (the other not yet assigned one): the one
# owning none lags by 0, known without the tables.
my $owners = 0;
foreach my $worker ('kafka 1', 'kafka 2')
{
	my $owned = value_of($m, 'dwh_kafka_worker_partitions', worker => $worker) // 0;
	$owners++ if $owned > 0;
	is(value_of($m, 'dwh_kafka_worker_lag', worker => $worker),
		$owned > 0 ? -1 : 0,
		"locked: $worker (partitions owned: $owned) has a lag of " . ($owned > 0 ? -1 : 0));
}
cmp_ok($owners, '>', 0, 'locked: a worker owns a partition');
$locker->query_safe('ROLLBACK;');
$locker->quit;
$m = scrape_until(
	'the partitions known again',
	sub {
		(value_of($_[0], 'dwh_kafka_partition_stored_offset',
				topic => 'order-service_orders', partition => 0) // -1) >= 0;
	});
is(sum_of($m, 'dwh_kafka_partition_stored_offset'), $messages,
	'unlocked: the stored offsets are back');
is(sum_of($m, 'dwh_kafka_partition_gaps_total'), 0, 'unlocked: no gap');

# Redis.
is(value_of($m, 'dwh_redis_keys_mirrored'), $redis_keys, 'Redis keys mirrored: every key');
is(value_of($m, 'dwh_redis_keys_missing'), 2, 'Redis keys missing: the two the last order named');
cmp_ok(value_of($m, 'dwh_redis_refreshes_total'), '>', 0, 'Redis refresh passes are counted');
is(value_of($m, 'dwh_redis_changes_found_total'),
	psql(q{SELECT changes_found FROM dwh.status WHERE worker = 'redis'}),
	'Redis: changes found as dwh.status counts them');

# Tag events, by kind, as cdm.user_tag_events holds them.
foreach my $kind ('grant', 'revoke')
{
	is(value_of($m, 'dwh_tag_events_total', kind => $kind),
		psql("SELECT count(*) FROM cdm.user_tag_events WHERE kind = '$kind'"),
		"tag events: ${kind}s");
}
is(value_of($m, 'dwh_tag_events_total', kind => 'grant'),
	psql(q{SELECT count(*) FROM cdm.user_tags WHERE tag = 'customer'}) + 1,
	'one grant per customer, and one to the user whose order was cancelled');
is(value_of($m, 'dwh_tag_events_total', kind => 'revoke'), 1, 'one revoke: the cancelled order');
cmp_ok(value_of($m, 'dwh_tag_events_total', kind => 'grant'), '>', 0, 'tags were granted');

# The tags worker produced every event to its topic (the topic was set
# before the first), and expires tags every second.
my $events = psql('SELECT count(*) FROM cdm.user_tag_events');
ok( wait_for($node,
		"SELECT events_produced = $events AND events_pending = 0 FROM dwh.status WHERE worker = 'tags'"
	),
	"the tags worker produced the $events tag events");
$m = scrape_until('the tag events produced',
	sub { (value_of($_[0], 'dwh_tags_worker_events_produced_total') // 0) == $events });
is(value_of($m, 'dwh_tags_worker_events_produced_total'), $events, 'tag events produced: every event');
is(value_of($m, 'dwh_tags_worker_events_pending'), 0, 'no tag event pending');
my $age = value_of($m, 'dwh_tags_worker_last_produced_age_seconds');
ok(defined $age && $age >= 0 && $age < 60, 'tag events were produced lately');
my $passes = value_of($m, 'dwh_tags_worker_expiry_passes_total');
cmp_ok($passes, '>', 0, 'expiry passes are counted');
is( psql(
		"SELECT expiry_passes >= $passes AND expiry_passes < $passes + 60 FROM dwh.status WHERE worker = 'tags'"
	),
	't',
	'expiry passes as dwh.status counts them');
$age = value_of($m, 'dwh_tags_worker_last_expiry_age_seconds');
ok(defined $age && $age >= 0 && $age < 60, 'an expiry pass ran lately');

# A user renamed in Redis: the next refresh pass finds the change.
my $changes = value_of($m, 'dwh_redis_changes_found_total');
$redis->set('626a81ce9a8cd1920641e200',
	'{"_id":"626a81ce9a8cd1920641e200","name":"Renamed User","login":"renamed_0001","update_ts_utc":"2024-01-01 00:00:00"}'
);
$m = scrape_until('the change found in Redis',
	sub { (value_of($_[0], 'dwh_redis_changes_found_total') // 0) > $changes });
is(value_of($m, 'dwh_redis_changes_found_total'), $changes + 1,
	'dwh_redis_changes_found_total counts the renamed user');
is(value_of($m, 'dwh_redis_keys_mirrored'), $redis_keys, 'the keys mirrored stay');

# The broker goes away: a Kafka worker shows the error and waits for it.
broker_command('stop', $broker->{dir});
$m = scrape_until(
	'a Kafka worker waiting for the broker',
	sub {
		my $m = shift;
		grep {
			(value_of($m, 'dwh_worker_error', worker => $_) // 0) == 1
			  && (value_of($m, 'dwh_worker_state', worker => $_, state => 'waiting_for_broker')
				// 0) == 1
		} ('kafka 1', 'kafka 2');
	});
my @failing = grep { (value_of($m, 'dwh_worker_error', worker => $_) // 0) == 1 } ('kafka 1', 'kafka 2');
ok(scalar(@failing), 'with the broker stopped, dwh_worker_error is 1 for ' . join(' and ', @failing));
ok( (grep {
		(value_of($m, 'dwh_worker_state', worker => $_, state => 'waiting_for_broker') // 0) == 1
	} @failing),
	'and dwh_worker_state says waiting_for_broker');
is(value_of($m, 'dwh_worker_up', worker => $failing[0] // 'kafka 1'), 1,
	'the worker is still up');
is(value_of($m, 'dwh_worker_error', worker => 'redis'), 0, 'the Redis worker has no error');
# An order of a new user grants a tag: its event waits for the broker.
is( psql(
		q{SELECT dwh.ingest_order($m${"object_id": 9000002, "object_type": "order", "sent_dttm": "2023-05-02 12:00:00", "payload": {"restaurant": {"id": "no-such-restaurant"}, "date": "2023-05-02 12:00:00", "user": {"id": "a-user-while-the-broker-is-down"}, "order_items": [{"id": "d1", "name": "Плов", "price": 100, "quantity": 1}], "bonus_payment": 0, "cost": 100, "payment": 100, "bonus_grant": 0, "statuses": [], "final_status": "CLOSED", "update_ts": "2023-05-02 12:00:00"}}$m$::text)}
	),
	'applied',
	'an order of a new user while the broker is down');
$m = scrape_until('a tag event pending',
	sub { (value_of($_[0], 'dwh_tags_worker_events_pending') // 0) >= 1 });
is(value_of($m, 'dwh_tags_worker_events_pending'), 1, 'its grant waits for the broker: 1 pending');
is(value_of($m, 'dwh_tags_worker_events_produced_total'), $events, 'and none more produced');
# Watermarks are not news while the brokers are down: the age of those of
# a waiting worker's partitions grows (a worker republished librdkafka's
# last known values every second, which kept it under about 3 s).
my @waiting = grep {
	(value_of($m, 'dwh_worker_state', worker => $_, state => 'waiting_for_broker') // 0) == 1
} ('kafka 1', 'kafka 2');
cmp_ok(scalar(@waiting), '>', 0, 'a Kafka worker waits for the broker');
sleep(6);
$m = scrape();
foreach my $worker (@waiting)
{
	foreach my $p (split /,/,
		psql("SELECT array_to_string(partitions, ',') FROM dwh.status WHERE worker = '$worker'"))
	{
		my $age = value_of($m, 'dwh_kafka_partition_watermark_age_seconds',
			topic => 'order-service_orders', partition => $p);
		cmp_ok($age // 0, '>=', 5,
			"with the broker stopped, the watermarks of partition $p of $worker, waiting for it, age");
	}
}

# The broker back, and more orders: the error clears, the workers consume
# again and count the new messages.  (The node is never stopped while the
# broker is down: a Kafka worker then ignores SIGTERM until the broker
# returns, stuck in librdkafka's rd_kafka_query_watermark_offsets.)
broker_command('restart', $broker->{dir});
generate_orders("$tmp/more.txt", '--count 40 --seed 43 --clean --first-id 5000000',
	"--manifest $tmp/more.json");
my $more = read_manifest("$tmp/more.json")->{messages};
produce($broker, "$tmp/more.txt");
ok(wait_applied($node, $messages + $more), "the $more new messages applied");
$m = scrape_until(
	'the Kafka workers consuming again',
	sub {
		my $m = shift;
		!grep {
			(value_of($m, 'dwh_worker_error', worker => $_) // 1) != 0
			  || (value_of($m, 'dwh_worker_state', worker => $_, state => 'consuming') // 0) != 1
		} ('kafka 1', 'kafka 2');
	});
foreach my $worker ('kafka 1', 'kafka 2')
{
	is(value_of($m, 'dwh_worker_error', worker => $worker), 0, "$worker: the error cleared");
	is(value_of($m, 'dwh_worker_state', worker => $worker, state => 'consuming'),
		1, "$worker: consuming again");
}
is(sum_of($m, 'dwh_kafka_worker_messages_total'), $messages + $more,
	'messages applied: the new ones counted');
is(sum_of($m, 'dwh_kafka_partition_lag'), 0, 'no lag after the new messages');
# The new orders may grant tags too.
my $all_events = psql('SELECT count(*) FROM cdm.user_tag_events');
$m = scrape_until(
	'every tag event produced',
	sub {
		(value_of($_[0], 'dwh_tags_worker_events_produced_total') // 0) == $all_events
		  && (value_of($_[0], 'dwh_tags_worker_events_pending') // 1) == 0;
	});
is(value_of($m, 'dwh_tags_worker_events_produced_total'),
	$all_events, 'the broker back, every tag event is produced, the pending grant too');
is(value_of($m, 'dwh_tags_worker_events_pending'), 0, 'none pending');

# Redis goes away: the Redis worker shows the error and waits for it.
$redis->stop;
$m = scrape_until(
	'the Redis worker waiting for Redis',
	sub {
		my $m = shift;
		(value_of($m, 'dwh_worker_error', worker => 'redis') // 0) == 1
		  && (value_of($m, 'dwh_worker_state', worker => 'redis', state => 'waiting_for_redis') // 0)
		  == 1;
	});
is(value_of($m, 'dwh_worker_error', worker => 'redis'), 1,
	'with Redis stopped, dwh_worker_error{worker="redis"} is 1');
is(value_of($m, 'dwh_worker_state', worker => 'redis', state => 'waiting_for_redis'),
	1, 'and its state is waiting_for_redis');
is(value_of($m, 'dwh_redis_keys_mirrored'), $redis_keys,
	'the keys mirrored stay as they were');

# A Kafka worker terminated: absent (up 0, state stopped) until the
# postmaster starts it again, 5 s later.
my $pid = psql(q{SELECT pid FROM dwh.status WHERE worker = 'kafka 2'});
psql("SELECT pg_terminate_backend($pid)");
$m = scrape_until('kafka 2 absent',
	sub { (value_of($_[0], 'dwh_worker_up', worker => 'kafka 2') // 1) == 0 });
is(value_of($m, 'dwh_worker_up', worker => 'kafka 2'), 0, 'kafka 2 terminated: up 0');
is(value_of($m, 'dwh_worker_state', worker => 'kafka 2', state => 'stopped'),
	1, 'and its state is stopped');
is(value_of($m, 'dwh_worker_up', worker => 'kafka 1'), 1, 'kafka 1 is still up');
$m = scrape_until('kafka 2 back',
	sub { (value_of($_[0], 'dwh_worker_up', worker => 'kafka 2') // 0) == 1 });
is(value_of($m, 'dwh_worker_up', worker => 'kafka 2'), 1, 'kafka 2 started again: up 1');

$exporter->kill_kill;
$node->stop;
done_testing();
