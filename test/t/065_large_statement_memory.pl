# A direct write of STG (a restore's COPY, a loader's INSERT ... SELECT) is
# carried through DDS dwh.trigger_chunk_rows rows at a time: the backend's
# memory follows the chunk, not the statement.  Carried as one statement,
# 120,000 orders took about 310 MB of private memory, and as many older
# versions into stg.order_event_history about 510 MB; in chunks of 10,000,
# about 100 MB each, whatever the number of rows (80,000 here).  An
# UPDATE of half of them took about 450 MB carried whole; in chunks about 190
# MB (a chunk carries the versions it replaces beside its new ones, and
# each SQL function it calls holds its own copy of the chunk).  Users and
# menus too (chunks of 10,000 users, or of menus of 10,000 entries).  The
# peak is the kernel's (VmHWM of the backend, read by the backend itself
# at the end of its session), so no sampling can miss it; shared_buffers
# is small so that the shared pages it counts stay few.

use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use DwhTest;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $orders = 80_000;
my $bound_mb = 150;
my $small_bound_mb = 60;
my $update_bound_mb = 250;

my $node = new_dwh_node('large_statement', shared_buffers => '16MB');

# Orders of three dishes each among 2,000 users and 300 dishes of one
# restaurant, every seventh cancelled; $version_sql gives update_ts.
sub orders_sql
{
	my ($version_sql, $status) = @_;
	return qq{
SELECT i, '$version_sql'::timestamp + i * interval '1 second',
       jsonb_build_object(
           'restaurant', jsonb_build_object('id', 'r1'),
           'date', to_char('$version_sql'::timestamp + i * interval '1 second',
                           'YYYY-MM-DD HH24:MI:SS'),
           'user', jsonb_build_object('id', 'u' || i % 2000),
           'order_items', jsonb_build_array(
               jsonb_build_object('id', 'd' || i % 300, 'name', 'dish ' || i % 300,
                                  'price', 100, 'quantity', 1),
               jsonb_build_object('id', 'd' || (i * 7) % 300, 'name', 'dish ' || (i * 7) % 300,
                                  'price', 150, 'quantity', 2),
               jsonb_build_object('id', 'd' || (i * 13) % 300, 'name', 'dish ' || (i * 13) % 300,
                                  'price', 200, 'quantity', 1)),
           'bonus_payment', 0, 'cost', 600, 'payment', 600, 'bonus_grant', 0,
           'statuses', jsonb_build_array(jsonb_build_object(
               'status', $status,
               'dttm', to_char('$version_sql'::timestamp + i * interval '1 second',
                               'YYYY-MM-DD HH24:MI:SS'))),
           'final_status', $status,
           'update_ts', to_char('$version_sql'::timestamp + i * interval '1 second',
                                'YYYY-MM-DD HH24:MI:SS'))
FROM generate_series(1, $orders) i};
}

# The statement in a session of its own; returns the session's peak
# resident memory less the shared memory it touched, in MB.
sub peak_private_mb
{
	my ($label, $sql) = @_;
	my $status = $node->safe_psql(
		'postgres', qq{
$sql;
SELECT pg_read_file('/proc/self/status');
});
	my ($hwm) = $status =~ /^VmHWM:\s+(\d+) kB/m;
	my ($shmem) = $status =~ /^RssShmem:\s+(\d+) kB/m;
	my ($file) = $status =~ /^RssFile:\s+(\d+) kB/m;
	ok(defined $hwm && defined $shmem && defined $file, "$label: VmHWM read")
	  or return 0;
	my $mb = ($hwm - $shmem - $file) / 1024;
	note sprintf("%s: VmHWM %d kB, RssShmem %d kB, RssFile %d kB", $label, $hwm, $shmem,
		$file);
	return $mb;
}

# Users and menus first (the orders name some of them).
my $users = 200_000;
my $mb = peak_private_mb(
	"INSERT of $users users",
	qq{INSERT INTO stg.users (object_id, payload)
SELECT 'u' || i, jsonb_build_object('_id', 'u' || i, 'name', 'User ' || i,
                                    'login', 'login' || i, 'update_ts_utc', '2023-01-01 00:00:00')
FROM generate_series(0, $users - 1) i});
cmp_ok($mb, '<', $small_bound_mb,
	sprintf("INSERT of %d users in one statement: about %.0f MB at most", $users, $mb));

# 300 menus of 300 dishes in 20 categories; r1 lists the orders' dishes.
$mb = peak_private_mb(
	'INSERT of 300 menus of 300 dishes',
	q{INSERT INTO stg.restaurants (object_id, payload)
SELECT 'r' || r, jsonb_build_object(
           '_id', 'r' || r, 'name', 'Restaurant ' || r, 'update_ts_utc', '2023-01-01 00:00:00',
           'menu', (SELECT jsonb_agg(jsonb_build_object(
                               '_id', CASE WHEN r = 1 THEN 'd' || i ELSE 'r' || r || '_d' || i END,
                               'name', 'dish ' || i, 'price', 100, 'category', 'c' || i % 20))
                    FROM generate_series(0, 299) i))
FROM generate_series(1, 300) r});
cmp_ok($mb, '<', $small_bound_mb,
	sprintf("INSERT of 300 menus (90,000 dishes) in one statement: about %.0f MB at most", $mb));

$mb = peak_private_mb(
	"INSERT of $orders orders",
	qq{INSERT INTO stg.order_events (object_id, object_type, update_ts, payload, sent_dttm)
SELECT i, 'order', v, p, v FROM (} . orders_sql('2023-06-01 00:00:00',
		q{CASE WHEN i % 7 = 0 THEN 'CANCELLED' ELSE 'CLOSED' END}) . q{) AS o(i, v, p)});
cmp_ok($mb, '<', $bound_mb,
	sprintf("INSERT of %d orders in one statement: about %.0f MB of private memory at most",
		$orders, $mb));
is($node->safe_psql('postgres', 'SELECT count(*) FROM stg.order_events'),
	$orders, 'every order is in STG');

$mb = peak_private_mb(
	"INSERT of $orders older versions",
	qq{INSERT INTO stg.order_event_history (object_id, update_ts, payload, sent_dttm)
SELECT i, v, p, v FROM (} . orders_sql('2023-05-01 00:00:00',
		q{'OPEN'}) . q{) AS o(i, v, p)});
cmp_ok($mb, '<', $bound_mb,
	sprintf("INSERT of %d older versions in one statement: about %.0f MB at most",
		$orders, $mb));
is( $node->safe_psql('postgres',
		q{SELECT count(*) FROM dds.s_order_status WHERE status = 'OPEN'}),
	$orders,
	'every older version has its status row');
check_consistent($node, "after the INSERT of $orders older versions");

# A newer version of half of the orders in one UPDATE: chunked too, each
# new version with the one it replaces, which goes to the history.
my $updated = $orders / 2;
$mb = peak_private_mb(
	"UPDATE of $updated orders",
	qq{UPDATE stg.order_events e SET payload = o.p, sent_dttm = o.v
FROM (} . orders_sql('2023-07-01 00:00:00',
		q{CASE WHEN i % 3 = 0 THEN 'CANCELLED' ELSE 'CLOSED' END}) . qq{) AS o(i, v, p)
WHERE e.object_id = o.i AND o.i <= $updated});
cmp_ok($mb, '<', $update_bound_mb,
	sprintf("UPDATE of %d orders in one statement: about %.0f MB at most", $updated, $mb));
is( $node->safe_psql(
		'postgres', q{SELECT count(*) FROM stg.order_event_history
WHERE update_ts >= '2023-06-01'}),
	$updated,
	'every replaced version is in the history');
check_consistent($node, "after the UPDATE of $updated orders");

done_testing();
