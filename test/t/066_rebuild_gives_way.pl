# dwh.rebuild(vault => true) empties DDS and the marts and loads them again,
# holding the dictionary, user and tag locks.  A transaction that read
# them holds their tables until it ends; when it then writes, it waits for
# those locks.  The rebuild waited for the tables: a deadlock, and the
# deadlock detector ended the writer (40P01; usually, and at once with a
# short deadlock_timeout).  Now the rebuild asks for the tables without
# waiting: it goes on asking while their reader waits for nothing it holds,
# and gives way (55P03, nothing changed) once the reader waits for it.  The
# writer goes on; the rebuild run again repairs.  A reader that only reads
# is waited for.

use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use DwhTest;
use PostgreSQL::Test::Utils;
use Test::More;

my $node = new_dwh_node('rebuild_gives_way', deadlock_timeout => '100ms');

sub order_sql
{
	my ($id, $ts) = @_;
	return qq{SELECT applied FROM dwh.ingest_orders(ARRAY[convert_to(jsonb_build_object(
    'object_id', $id, 'object_type', 'order', 'sent_dttm', '$ts',
    'payload', jsonb_build_object(
        'restaurant', jsonb_build_object('id', 'r1'), 'date', '$ts', 'update_ts', '$ts',
        'user', jsonb_build_object('id', 'u1'),
        'order_items', jsonb_build_array(jsonb_build_object('id', 'd1', 'name', 'Dish',
                                                            'price', 100, 'quantity', 1)),
        'cost', 100, 'payment', 100, 'final_status', 'CLOSED'))::text, 'UTF8')])};
}

$node->safe_psql(
	'postgres', q{
INSERT INTO stg.restaurants (object_id, payload)
VALUES ('r1', jsonb_build_object('name', 'R1', 'update_ts_utc', '2023-01-01 00:00:00',
        'menu', jsonb_build_array(jsonb_build_object('_id', 'd1', 'name', 'Dish', 'category', 'A'))));
} . order_sql(1, '2023-01-03 10:00:00'));

# Orders' dish links taken away: the rebuild puts them back.
my $damage = 'WITH d AS (DELETE FROM dds.l_order_product RETURNING 1) SELECT count(*) FROM d';
my $rebuild = 'SELECT mart, rows_changed FROM dwh.rebuild(vault => true) WHERE rows_changed > 0';

# The rebuild started in a session of its own, once it asks for the tables.
sub start_rebuild
{
	my $session = $node->background_psql('postgres', on_error_stop => 0);
	$session->query_until(qr/started/, "\\echo started\n$rebuild;\n");
	ok( $node->poll_query_until(
			'postgres', q{SELECT count(*) > 0 FROM pg_stat_activity
			WHERE wait_event = 'PgSleep' AND query LIKE '%dwh.rebuild(vault%'
			  AND pid <> pg_backend_pid()}),
		'the rebuild holds its locks and asks for the tables again and again');
	return $session;
}

my $log_from = -s $node->logfile;
my $n = 1;
foreach my $write (
	[ 'an order', sub { order_sql(++$n, "2023-01-0${n} 10:00:00") } ],
	[   'a user',
		sub {
			q{INSERT INTO stg.users (object_id, payload) VALUES ('u1', jsonb_build_object(
                '_id', 'u1', 'name', 'Ann', 'login', 'ann', 'update_ts_utc', '2023-01-01 00:00:00'))
              ON CONFLICT (object_id) DO UPDATE SET payload = EXCLUDED.payload};
		}
	])
{
	my ($what, $sql) = @$write;
	my $damaged = $node->safe_psql('postgres', $damage);
	my $reader = $node->background_psql('postgres');
	$reader->query_safe('BEGIN; SELECT sum(order_cnt) FROM cdm.user_product_counters;');
	my $rebuilder = start_rebuild();
	my ($out, $failed) = $reader->query($sql->());
	ok(!$failed, "the reader writes $what: it goes on")
	  or diag($reader->{stderr});
	$reader->query_safe('COMMIT');
	$reader->quit;
	$rebuilder->query('SELECT 1');
	like(
		$rebuilder->{stderr},
		qr/could not rebuild DDS: a transaction that holds its tables waits for this rebuild/,
		"and the rebuild gave way to it ($what)");
	$rebuilder->quit;
	is($node->safe_psql('postgres', $rebuild), "dds|$damaged", 'the rebuild run again repairs');
	check_consistent($node, "after the rebuild that gave way to $what");
}

# A reader that only reads: the rebuild waits for its commit.
my $damaged = $node->safe_psql('postgres', $damage);
my $reader = $node->background_psql('postgres');
$reader->query_safe('BEGIN; SELECT sum(order_cnt) FROM cdm.user_product_counters;');
my $rebuilder = start_rebuild();
$reader->query_safe('COMMIT');
$reader->quit;
is($rebuilder->query_safe('SELECT 1'), "dds|$damaged\n1",
	'the rebuild waited for a reader that only read, then repaired');
$rebuilder->quit;
check_consistent($node, 'after the rebuild that waited');

unlike(slurp_file($node->logfile, $log_from), qr/deadlock detected/, 'no deadlock');

$node->stop;
done_testing();
