# The picture of the vault, docs/vault.svg, is the catalog of this build:
# it was drawn from the DOT text that tools/erd.py makes of a fresh CREATE
# EXTENSION dwh (a change of a table, column, key or comment needs
# `tools/erd.sh` to draw it again).  The diagram holds every table of stg,
# dds, cdm and dwh, the foreign keys, and the references that the
# statement trigger dwh.order_references_exist() checks instead of foreign
# keys, drawn dashed.

use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use FindBin;
my $root = "$FindBin::RealBin/../..";

my $node = PostgreSQL::Test::Cluster->new('vault_diagram');
$node->init(extra => [ '--encoding=UTF8', '--locale=C' ]);
$node->start;
$node->safe_psql('postgres', 'CREATE EXTENSION dwh');
my $version = $node->safe_psql('postgres',
	q{SELECT extversion FROM pg_extension WHERE extname = 'dwh'});

my $dot_file = "$PostgreSQL::Test::Utils::tmp_check/vault.dot";
my $svg_file = "$PostgreSQL::Test::Utils::tmp_check/vault.svg";
{
	local $ENV{PGHOST} = $node->host;
	local $ENV{PGPORT} = $node->port;
	local $ENV{PGDATABASE} = 'postgres';
	my ($stdout, $stderr);
	my $ok = IPC::Run::run(
		[ 'python3', "$root/tools/erd.py", '--title', "dwh $version" ],
		'>', \$stdout, '2>', \$stderr);
	ok($ok, 'tools/erd.py draws the catalog') or diag($stderr);
	open(my $fh, '>', $dot_file) or die "$dot_file: $!";
	print $fh $stdout;
	close($fh);
}
my $dot = slurp_file($dot_file);

my $tables = $node->safe_psql('postgres',
	q{SELECT string_agg(n.nspname || '__' || c.relname, ' ' ORDER BY 1)
	  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
	  WHERE n.nspname IN ('stg', 'dds', 'cdm', 'dwh') AND c.relkind = 'r'});
my @missing = grep { $dot !~ /^    \Q$_\E \[label=</m } split / /, $tables;
is("@missing", '', 'every table of stg, dds, cdm and dwh is drawn');

my $fks = $node->safe_psql('postgres',
	q{SELECT count(*) FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace
	  WHERE c.contype = 'f' AND n.nspname IN ('stg', 'dds', 'cdm', 'dwh')});
my @fk_edges = $dot =~ /^  \S+ -> \S+ \[color="#2c3e50"/mg;
is(scalar(@fk_edges), $fks, "each of the $fks foreign keys is an arrow");

my @dashed = sort map { s/:"[^"]*"//gr } $dot =~ /^  (\S+ -> \S+) \[color="#8e44ad", style=dashed/mg;
is_deeply(
	\@dashed,
	[
		'dds__l_order_product -> dds__h_order',
		'dds__l_order_product -> dds__h_product',
		'dds__l_order_user -> dds__h_order',
		'dds__l_order_user -> dds__h_user',
		'dds__s_order_cost -> dds__h_order',
		'dds__s_order_status -> dds__h_order',
	],
	'the references checked by dwh.order_references_exist() are dashed arrows');

like($dot, qr/Hub of orders/, 'table comments are in it');
like($dot, qr/Order id \(business key: message object_id\)/,
	'column comments are in it');

# The picture carries the SHA-256 of the DOT text it was drawn from (the
# layout depends on the fonts of the machine that drew it, the text does
# not).
my ($digest) = $dot =~ /comment="erd\.py catalog sha256:([0-9a-f]{64})"/;
ok(defined $digest, 'the DOT text names its SHA-256');
my $svg = slurp_file("$root/docs/vault.svg");
my ($drawn) = $svg =~ /erd\.py catalog sha256:([0-9a-f]{64})/;
is($drawn // 'none', $digest,
	'docs/vault.svg is drawn from the catalog of this build (else run tools/erd.sh and commit it)');

my ($dot_ok, $dot_err) = (0, '');
$dot_ok = IPC::Run::run([ 'dot', '-Tsvg', $dot_file, '-o', $svg_file ],
	'2>', \$dot_err);
ok($dot_ok && $dot_err eq '', 'dot renders it without a complaint') or diag($dot_err);

done_testing();
