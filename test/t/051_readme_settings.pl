# The README's "Settings" section is what the server says: every dwh.*
# setting the library defines has a row in its table and every row is a
# setting; each row's default is what SHOW gives on a server that sets
# nothing; its context is pg_settings.context ("reload" sighup, "restart"
# postmaster, "superuser, per session" superuser); "superuser only" is
# said exactly of the settings an ordinary role cannot see; and each range
# the section gives (the "Ranges" paragraph, and "(a to b)" in a row) is
# pg_settings' min_val and max_val in the setting's unit, and every numeric
# setting has one.

use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;

use DwhTest;
use PostgreSQL::Test::Utils;
use Test::More;

my $readme = slurp_file(dwh_root() . '/README.md');
my ($section) = $readme =~ /^## Settings\n(.*?)^## /ms
  or die 'README.md has no "## Settings" section';

# Bytes or milliseconds in a number with an optional unit ("64 MB", "1 s",
# "100,000"); dies on what it cannot read.
my %factor = (
	'' => 1,
	'B' => 1, 'kB' => 1024, 'MB' => 1024**2, 'GB' => 1024**3,
	'8kB' => 8192,
	'ms' => 1, 's' => 1000, 'min' => 60_000, 'h' => 3_600_000,
	'day' => 86_400_000, 'days' => 86_400_000);

sub quantity
{
	my ($text, $unit_of_bare) = @_;
	$text =~ /^\s*(-?[\d,]+)\s*([A-Za-z0-9]*)\s*$/ or die "not a quantity: \"$text\"";
	my ($number, $unit) = ($1, $2);
	$number =~ s/,//g;
	$unit = $unit_of_bare // '' if $unit eq '';
	die "unknown unit \"$unit\" in \"$text\"" unless exists $factor{$unit};
	return $number * $factor{$unit};
}

# The README's table.
my %row;
foreach my $line (split /\n/, $section)
{
	next unless $line =~ /^\| `(dwh\.[a-z_]+)` \| ([^|]*) \| ([^|]*) \| (.*) \|$/;
	my ($name, $default, $context, $meaning) = ($1, $2, $3, $4);
	die "$name has two rows" if $row{$name};
	$default =~ s/^`(.*)`$/$1/;
	$default = '' if $default eq 'empty';
	$row{$name} = { default => $default, context => $context, meaning => $meaning };
	$row{$name}{range} = [ $1, $2 ] if $meaning =~ /\(([\d,]+) to ([\d,]+)\)/;
}
cmp_ok(scalar(keys %row), '>=', 20, 'the README\'s settings table has its rows');

# The "Ranges" paragraph: "`a` and `b` X to Y; `c` X to Y; ...".
my ($ranges) = $section =~ /^Ranges \(a value outside is refused, naming the range\):\n(.*?)\n\n/ms
  or die 'the Settings section has no "Ranges" paragraph';
$ranges =~ s/\s+/ /g;
$ranges =~ s/\.\s*$//;
foreach my $part (split /;\s*/, $ranges)
{
	my @names = $part =~ /`(dwh\.[a-z_]+)`/g;
	die "a range without a setting: \"$part\"" unless @names;
	next if $part =~ /as in the table$/;
	$part =~ /([\d,]+(?: ?[A-Za-z]+)?) to ([\d,]+(?: ?[A-Za-z]+)?)$/
	  or die "no range in \"$part\"";
	my ($low, $high) = ($1, $2);
	foreach my $name (@names)
	{
		die "$name: range given twice" if $row{$name}{range};
		die "$name: a range for a setting without a row" unless $row{$name};
		$row{$name}{range} = [ $low, $high ];
	}
}

my $node = new_dwh_node('readme_settings');
$node->safe_psql('postgres', 'CREATE ROLE plain LOGIN');

my %server;
foreach my $line (split /\n/,
	$node->safe_psql('postgres',
		q{SELECT name, current_setting(name), context, vartype, coalesce(unit, ''),
		         coalesce(min_val, ''), coalesce(max_val, '')
		  FROM pg_settings WHERE name LIKE 'dwh.%' ORDER BY name}))
{
	my ($name, $value, $context, $type, $unit, $min, $max) = split /\|/, $line, -1;
	$server{$name} = { value => $value, context => $context, type => $type,
		unit => $unit, min => $min, max => $max };
}
my %visible = map { $_ => 1 } split /\n/,
  $node->safe_psql('postgres',
	q{SET ROLE plain; SELECT name FROM pg_settings WHERE name LIKE 'dwh.%'});

is(join(' ', sort keys %row), join(' ', sort keys %server),
	'the README lists every dwh.* setting the server has, and no other');

my %context_of = (reload => 'sighup', restart => 'postmaster', superuser => 'superuser');
foreach my $name (sort keys %server)
{
	my ($readme, $s) = ($row{$name}, $server{$name});
	next unless $readme;
	is($readme->{default}, $s->{value}, "$name: the README's default is the server's");

	my ($first) = $readme->{context} =~ /^(reload|restart|superuser)\b/
	  or die "$name: context \"$readme->{context}\" not understood";
	is($context_of{$first}, $s->{context}, "$name: the README's context ($first) is the server's");
	is($readme->{context} =~ /superuser only/ ? 1 : 0, $visible{$name} ? 0 : 1,
		"$name: \"superuser only\" in the README exactly when an ordinary role cannot see it");

	if ($s->{type} eq 'integer' || $s->{type} eq 'real')
	{
		ok($readme->{range}, "$name: the README gives its range") or next;
		my ($low, $high) = @{ $readme->{range} };
		# A bare number is in the setting's own unit.
		is(quantity($low, $s->{unit}), quantity($s->{min}, $s->{unit}),
			"$name: lowest value $low");
		is(quantity($high, $s->{unit}), quantity($s->{max}, $s->{unit}),
			"$name: highest value $high");
	}
	else
	{
		ok(!$readme->{range}, "$name: no range for a setting of type $s->{type}");
	}
}

$node->stop;
done_testing();
