# Pieces of test/t/040_fuzz.pl that need no database: a JSON tree that
# keeps what a mutation needs (key order, duplicate keys, number tokens and
# string escapes exactly as written), the mutations, and the shrinkers that
# make a failing input small.
#
# Everything here works on byte strings: a message is the bytes a producer
# would send, valid UTF-8 or not.  A JSON value is a tree of nodes:
#
#   { t => 'o', v => [ [ raw key, node ], ... ] }   object, pairs in order
#   { t => 'a', v => [ node, ... ] }                array
#   { t => 's', v => raw }                          string, raw text between
#                                                   the quotes (escapes kept)
#   { t => 'n', v => token }                        number, its token
#   { t => 'l', v => 'true' | 'false' | 'null' }    literal
#   { t => 'raw', v => text }                       any text, written as is
#                                                   (deep nesting, bad tokens)

package Fuzz;

use strict;
use warnings;
no warnings 'recursion';

use Time::HiRes qw(time);

use Exporter 'import';
our @EXPORT = qw(
  parse_json encode_json_tree mutate show_bytes shrink_list shrink_message
);

#
# JSON in and out.
#

# Parse bytes into a tree; undef when they are not one JSON value (as this
# parser sees it: a number is any run of number characters, so that odd
# tokens survive a round trip).
sub parse_json
{
	my ($text) = @_;
	my $pos = 0;
	my $node = eval { parse_value(\$text, \$pos) };
	return undef unless defined $node;
	skip_space(\$text, \$pos);
	return $pos == length($text) ? $node : undef;
}

sub skip_space
{
	my ($text, $pos) = @_;
	pos($$text) = $$pos;
	$$pos = pos($$text) if $$text =~ /\G[ \t\r\n]*/gc;
	return;
}

sub parse_value
{
	my ($text, $pos) = @_;
	skip_space($text, $pos);
	pos($$text) = $$pos;
	if ($$text =~ /\G"((?:[^"\\]|\\.)*)"/gcs)
	{
		$$pos = pos($$text);
		return { t => 's', v => $1 };
	}
	if ($$text =~ /\G(true|false|null)/gc)
	{
		$$pos = pos($$text);
		return { t => 'l', v => $1 };
	}
	if ($$text =~ /\G([-+0-9.eE]+)/gc)
	{
		$$pos = pos($$text);
		return { t => 'n', v => $1 };
	}
	if ($$text =~ /\G\[/gc)
	{
		$$pos = pos($$text);
		my @items;
		skip_space($text, $pos);
		pos($$text) = $$pos;
		if ($$text =~ /\G\]/gc)
		{
			$$pos = pos($$text);
			return { t => 'a', v => \@items };
		}
		for (;;)
		{
			push @items, parse_value($text, $pos);
			skip_space($text, $pos);
			pos($$text) = $$pos;
			if ($$text =~ /\G,/gc) { $$pos = pos($$text); next; }
			die "bad array" unless $$text =~ /\G\]/gc;
			$$pos = pos($$text);
			return { t => 'a', v => \@items };
		}
	}
	if ($$text =~ /\G\{/gc)
	{
		$$pos = pos($$text);
		my @pairs;
		skip_space($text, $pos);
		pos($$text) = $$pos;
		if ($$text =~ /\G\}/gc)
		{
			$$pos = pos($$text);
			return { t => 'o', v => \@pairs };
		}
		for (;;)
		{
			skip_space($text, $pos);
			pos($$text) = $$pos;
			die "bad key" unless $$text =~ /\G"((?:[^"\\]|\\.)*)"/gcs;
			my $key = $1;
			$$pos = pos($$text);
			skip_space($text, $pos);
			pos($$text) = $$pos;
			die "bad colon" unless $$text =~ /\G:/gc;
			$$pos = pos($$text);
			push @pairs, [ $key, parse_value($text, $pos) ];
			skip_space($text, $pos);
			pos($$text) = $$pos;
			if ($$text =~ /\G,/gc) { $$pos = pos($$text); next; }
			die "bad object" unless $$text =~ /\G\}/gc;
			$$pos = pos($$text);
			return { t => 'o', v => \@pairs };
		}
	}
	die "bad value";
}

sub encode_json_tree
{
	my ($node) = @_;
	my $t = $node->{t};
	return '"' . $node->{v} . '"' if $t eq 's';
	return $node->{v} if $t eq 'n' || $t eq 'l' || $t eq 'raw';
	return '[' . join(',', map { encode_json_tree($_) } @{ $node->{v} }) . ']'
	  if $t eq 'a';
	return '{'
	  . join(',', map { '"' . $_->[0] . '":' . encode_json_tree($_->[1]) } @{ $node->{v} })
	  . '}';
}

sub copy_tree
{
	my ($node) = @_;
	my $t = $node->{t};
	return { t => 'a', v => [ map { copy_tree($_) } @{ $node->{v} } ] } if $t eq 'a';
	return { t => 'o', v => [ map { [ $_->[0], copy_tree($_->[1]) ] } @{ $node->{v} } ] }
	  if $t eq 'o';
	return {%$node};
}

# Every place in a tree that holds a node: [ container, index, key ]
# (key: the raw key of an object member, undef in an array).  The root is
# [ undef, undef, undef ].
sub places
{
	my ($root) = @_;
	my @places = ([ undef, undef, undef, $root ]);
	my @todo = ($root);
	while (my $node = shift @todo)
	{
		if ($node->{t} eq 'a')
		{
			for my $i (0 .. $#{ $node->{v} })
			{
				push @places, [ $node, $i, undef, $node->{v}[$i] ];
				push @todo, $node->{v}[$i];
			}
		}
		elsif ($node->{t} eq 'o')
		{
			for my $i (0 .. $#{ $node->{v} })
			{
				my $pair = $node->{v}[$i];
				push @places, [ $node, $i, $pair->[0], $pair->[1] ];
				push @todo, $pair->[1];
			}
		}
	}
	return @places;
}

# Put a node where a place is; returns the new root.
sub replace_at
{
	my ($root, $place, $new) = @_;
	my ($container, $i) = @$place;
	return $new unless defined $container;
	if ($container->{t} eq 'a')
	{
		$container->{v}[$i] = $new;
	}
	else
	{
		$container->{v}[$i][1] = $new;
	}
	return $root;
}

#
# What the mutations put in.
#

my @odd_numbers = (
	'1e400', '-1e400', '1e-400', '-0', '-0.0', '0.0', '007', '-007', '00',
	'123456789012345678901234567890', '9223372036854775807',
	'9223372036854775808', '-9223372036854775808', '-9223372036854775809',
	'18446744073709551616', '1.5', '1E2', '1e+2', '0.1e1', '1e14',
	'99999999999999.99999', '100000000000000', '-1', '0', '1.0',
	'NaN', 'Infinity', '-Infinity', '1.', '.5', '+1', '0x10', '1e', '--1',
	'4.9e-324', '2.2250738585072014e-308', '1.7976931348623157e308',
	'1' . ('0' x 400), '0.' . ('0' x 400) . '1', '1e2147483648',
	'1e-2147483649', '2147483647', '2147483648', '1000000', '1000001');

my @odd_timestamps = (
	'2023-01-01 23:59:59.9999999', '2023-01-01 23:59:59.999999',
	'2023-01-01 23:59:59.9999995', '2023-01-01 12:00:00.123456789012',
	'2023-01-01 24:00:00', '2023-01-01 24:00:00.000001', '2023-01-01 23:59:60',
	'0000-01-01 00:00:00', '0001-01-01 00:00:00', '10000-01-01 00:00:00',
	'294276-12-31 23:59:59', '294277-01-01 00:00:00',
	'4713-01-01 00:00:00 BC', '4714-11-24 00:00:00 BC', '4714-11-23 00:00:00 BC',
	'2023-01-01 12:00:00+03', '2023-01-01 12:00:00-12:00', '2023-01-01 12:00:00Z',
	'2023-01-01T12:00:00', '2023-01-01T12:00:00Z', '2023-01-01 12:00:00 UTC',
	'2023-01-01 12:00:00 Europe/Moscow', '2023-01-01 12:00:00 +14:00',
	'2023-02-29 00:00:00', '2024-02-29 00:00:00', '2023-13-01 00:00:00',
	'2023-00-10 00:00:00', '2023-01-32 00:00:00', '2023-01-01', '12:00:00',
	'epoch', 'infinity', '-infinity', 'now', 'today', 'allballs', 'J2451187',
	' 2023-01-01 00:00:00', '2023-01-01 00:00:00 ', '2023-1-1 0:0:0',
	'2023-01-01  00:00:00', '20230101 000000', '2023-01-01 00:00:00.',
	'2023-01-01 00:00', "2023-01-01\\t00:00:00", '1999-12-31 23:59:59.5',
	"\xd9\xa2\xd9\xa0\xd9\xa2\xd9\xa3-01-01 00:00:00", '');

# Raw string pieces (escapes as written inside the quotes).
my @odd_string_pieces = (
	'\\u0000', '\\ud800', '\\udc00', '\\udbff', '\\ud800\\u0041',
	'\\ud83d\\ude00', '\\udfff\\ud800', '\\uD800', '\\u00', '\\uZZZZ', '\\x41',
	'\\', "\x00", "\x01", "\x1f", "\n", "\t", "\x7f", "\xff", "\xc0\x80",
	"\xed\xa0\x80", "\xf4\x90\x80\x80", "\xe2\x82", "\x80", "\xef\xbb\xbf",
	"\xe2\x80\xae", "\xf0\x9f\x98\x80", '\\u200b', '\\"', '"', "'", '%s%n',
	'\\/', '\\b\\f\\n\\r\\t');

my @invalid_utf8 = (
	"\xff", "\xfe", "\xc0\x80", "\xc1\xbf", "\xed\xa0\x80", "\xed\xbf\xbf",
	"\xf4\x90\x80\x80", "\xf8\x88\x80\x80\x80", "\xe2\x82", "\xf0\x9f\x98",
	"\x80", "\xbf", "\xc3", "\xe0\x80\xaf");

my @odd_keys = (
	'', ' ', 'object_id', 'object_type', 'payload', 'update_ts', 'menu',
	'login', '_id', 'id', 'name', '\\u0000', '\\ud800', 'x' x 300,
	"\xd0\x9a\xd0\xbb\xd1\x8e\xd1\x87", '\\u006fbject_type', 'OBJECT_TYPE');

my @object_types = ('order', 'Order', 'ORDER', 'order ', ' order', 'heartbeat',
	'', 'orders', 'ord\\u0065r', "order\\u0000", 'user', 'restaurant');

# The largest array large_array builds, in encoded bytes.
my $large_array_bytes = 4 * 1024 * 1024;

my %timestamp_keys =
  map { $_ => 1 } qw(sent_dttm date update_ts dttm update_ts_utc);

# A random scalar or container, small.
sub random_value
{
	my ($rng) = @_;
	my $k = $rng->below(9);
	return { t => 's', v => $rng->pick('x', '', 'CLOSED', '5', '2023-01-01 00:00:00') }
	  if $k == 0;
	return { t => 'n', v => $rng->pick('5', '0', '-1', '1.5', '1e400') } if $k == 1;
	return { t => 'l', v => $rng->pick('true', 'false', 'null') } if $k == 2;
	return { t => 'a', v => [] } if $k == 3;
	return { t => 'o', v => [] } if $k == 4;
	return { t => 'a', v => [ { t => 'n', v => '1' }, { t => 's', v => 'x' } ] } if $k == 5;
	return { t => 'o', v => [ [ 'id', { t => 's', v => 'x' } ] ] } if $k == 6;
	return { t => 's', v => $rng->pick(@odd_string_pieces) } if $k == 7;
	return { t => 'n', v => $rng->pick(@odd_numbers) };
}

# A node of another JSON type than this one, often made from it.
sub swapped_type
{
	my ($rng, $node) = @_;
	my $t = $node->{t};
	my @choices;
	push @choices, sub { { t => 's', v => encode_json_string_raw(encode_json_tree($node)) } }
	  unless $t eq 's';
	push @choices, sub { { t => 'n', v => $node->{v} =~ /^[-0-9.eE+]+$/ ? $node->{v} : '42' } }
	  unless $t eq 'n';
	push @choices, sub { { t => 'a', v => [$node] } } unless $t eq 'a';
	push @choices, sub { { t => 'o', v => [ [ 'value', $node ] ] } } unless $t eq 'o';
	push @choices, sub { { t => 'l', v => 'null' } } unless $t eq 'l';
	push @choices, sub { { t => 'l', v => $rng->pick('true', 'false') } };
	push @choices, sub { { t => 'o', v => [] } };
	push @choices, sub { { t => 'a', v => [] } };
	return $rng->pick(@choices)->();
}

# Raw string text (between quotes) for arbitrary bytes.
sub encode_json_string_raw
{
	my ($s) = @_;
	$s =~ s{(["\\])}{\\$1}g;
	$s =~ s{([\x00-\x1f])}{sprintf('\\u%04x', ord($1))}ge;
	return $s;
}

# The same key spelt with an escape (\u006fbject_id for object_id): JSON
# reads it as the original, so it must go where the original would.
sub escaped_key
{
	my ($key) = @_;
	return '\\u0020' unless length $key;
	my $c = substr($key, 0, 1);
	return $key if $c eq '\\' || ord($c) > 0x7f;
	return sprintf('\\u%04x', ord($c)) . substr($key, 1);
}

# Nest a node $depth levels deep, as raw text (no recursion later).
sub nested
{
	my ($rng, $inner, $depth) = @_;
	my $text = encode_json_tree($inner);
	return { t => 'raw', v => ('[' x $depth) . $text . (']' x $depth) }
	  if $rng->chance(0.5);
	return { t => 'raw', v => ('{"a":' x $depth) . $text . ('}' x $depth) };
}

#
# The mutations.  Each takes the rng and a tree, changes it in place (or
# returns a new root) and returns (root, what it did).
#

sub pick_place
{
	my ($rng, $root, $filter) = @_;
	my @places = places($root);
	@places = grep { $filter->($_) } @places if $filter;
	return undef unless @places;
	return $rng->pick(@places);
}

my %tree_mutations = (
	type_swap => sub {
		my ($rng, $root) = @_;
		my $p = pick_place($rng, $root);
		my $new = swapped_type($rng, $p->[3]);
		return (replace_at($root, $p, $new), 'type swap at ' . ($p->[2] // 'an element'));
	},
	odd_number => sub {
		my ($rng, $root) = @_;
		my $p = pick_place($rng, $root, sub { $_[0][3]{t} eq 'n' })
		  // pick_place($rng, $root);
		my $token = $rng->pick(@odd_numbers);
		return (replace_at($root, $p, { t => 'n', v => $token }),
			'number ' . ($p->[2] // 'element') . " = $token");
	},
	odd_timestamp => sub {
		my ($rng, $root) = @_;
		my $p = pick_place($rng, $root,
			sub { defined $_[0][2] && $timestamp_keys{ $_[0][2] } })
		  // pick_place($rng, $root, sub { $_[0][3]{t} eq 's' })
		  // pick_place($rng, $root);
		my $ts = $rng->pick(@odd_timestamps);
		return (replace_at($root, $p, { t => 's', v => $ts }),
			'timestamp ' . ($p->[2] // 'element') . " = $ts");
	},
	deep_nesting => sub {
		my ($rng, $root) = @_;
		my $p = pick_place($rng, $root);
		my $depth = $rng->pick(2, 10, 63, 64, 100, 1000, 2046, 2047, 2048, 2049, 5000, 20000);
		return (replace_at($root, $p, nested($rng, $p->[3], $depth)),
			'nested ' . ($p->[2] // 'element') . " $depth deep");
	},
	large_array => sub {
		my ($rng, $root) = @_;
		my $p = pick_place($rng, $root, sub { $_[0][3]{t} eq 'a' && @{ $_[0][3]{v} } })
		  // pick_place($rng, $root);
		my $n = $rng->pick(2, 50, 999, 1000, 1001, 3000, 20000);
		my $node = $p->[3];
		my @proto = $node->{t} eq 'a' && @{ $node->{v} } ? @{ $node->{v} } : ({ t => 'n', v => '1' });
		# At most $large_array_bytes of copies: an element may already be
		# an odd string of 1.8 MB, and 20,000 copies of it would take more
		# memory than the machine has (seed 58175625 did).
		my $each = length(encode_json_tree({ t => 'a', v => \@proto })) / @proto;
		my $capped = '';
		if ($n * $each > $large_array_bytes)
		{
			$n = int($large_array_bytes / $each) || 1;
			$capped = ' (capped by size)';
		}
		my @items = map { copy_tree($proto[ $_ % @proto ]) } 0 .. $n - 1;
		return (replace_at($root, $p, { t => 'a', v => \@items }),
			'array ' . ($p->[2] // 'element') . " of $n$capped");
	},
	duplicate_key => sub {
		my ($rng, $root) = @_;
		my $p = pick_place($rng, $root, sub { $_[0][3]{t} eq 'o' && @{ $_[0][3]{v} } })
		  // return ($root, 'no object to duplicate a key in');
		my $pairs = $p->[3]{v};
		my $pair = $rng->pick(@$pairs);
		my $value = $rng->chance(0.5) ? random_value($rng) : swapped_type($rng, $pair->[1]);
		my $at = $rng->below(@$pairs + 1);
		splice(@$pairs, $at, 0, [ $pair->[0], $value ]);
		return ($root, "duplicate key $pair->[0]");
	},
	missing_field => sub {
		my ($rng, $root) = @_;
		my $p = pick_place($rng, $root, sub { $_[0][3]{t} eq 'o' && @{ $_[0][3]{v} } })
		  // return ($root, 'no field to drop');
		my $pairs = $p->[3]{v};
		my $i = $rng->below(scalar @$pairs);
		my ($gone) = splice(@$pairs, $i, 1);
		return ($root, "missing $gone->[0]");
	},
	extra_field => sub {
		my ($rng, $root) = @_;
		my $p = pick_place($rng, $root, sub { $_[0][3]{t} eq 'o' })
		  // return ($root, 'no object for a field');
		my $key = $rng->pick(@odd_keys);
		splice(@{ $p->[3]{v} }, $rng->below(@{ $p->[3]{v} } + 1), 0,
			[ $key, random_value($rng) ]);
		return ($root, "extra field $key");
	},
	renamed_key => sub {
		my ($rng, $root) = @_;
		my $p = pick_place($rng, $root, sub { defined $_[0][2] })
		  // return ($root, 'no key to rename');
		my $pair = $p->[0]{v}[ $p->[1] ];
		my $old = $pair->[0];
		my @siblings = map { $_->[0] } @{ $p->[0]{v} };
		my $new = $rng->pick(
			uc($old), ucfirst($old), " $old", "$old ", "$old\\u0000",
			"$old\\ud800", $old . $rng->pick(@invalid_utf8), substr($old, 1),
			escaped_key($old), escaped_key($old), $rng->pick(@siblings),
			$rng->pick(@odd_keys));
		$pair->[0] = $new;
		return ($root, 'key ' . show_bytes($old) . ' renamed ' . show_bytes($new));
	},
	odd_string => sub {
		my ($rng, $root) = @_;
		my $p = pick_place($rng, $root, sub { $_[0][3]{t} eq 's' })
		  // pick_place($rng, $root);
		my $old = $p->[3]{t} eq 's' ? $p->[3]{v} : 'x';
		my $piece = $rng->pick(@odd_string_pieces);
		my $at = $rng->below(length($old) + 1);
		my $new = substr($old, 0, $at) . $piece . substr($old, $at);
		$new = $piece x $rng->pick(1000, 70000, 600000) if $rng->chance(0.03);
		return (replace_at($root, $p, { t => 's', v => $new }),
			'string ' . ($p->[2] // 'element') . ' with ' . show_bytes($piece));
	},
	broken_escape => sub {
		my ($rng, $root) = @_;
		# An escape cut short by a multibyte character: an error text that
		# quotes the input up to there ends inside the character.
		my $p = pick_place($rng, $root, sub { $_[0][3]{t} eq 's' && $_[0][3]{v} =~ /[\xc2-\xf4]/ })
		  // return ($root, 'no string with a multibyte character');
		my @starts;
		while ($p->[3]{v} =~ /[\xc2-\xf4]/g) { push @starts, pos($p->[3]{v}) - 1; }
		my $at = $rng->pick(@starts);
		my $piece = $rng->pick('\\', '\\u', '\\u0', '\\u00', '\\u00d', '\\ud800\\u', '\\x');
		my $v = $p->[3]{v};
		return (replace_at($root, $p, { t => 's', v => substr($v, 0, $at) . $piece . substr($v, $at) }),
			'escape ' . show_bytes($piece) . ' cut by a character in ' . ($p->[2] // 'an element'));
	},
	object_type => sub {
		my ($rng, $root) = @_;
		my $p = pick_place($rng, $root, sub { ($_[0][2] // '') eq 'object_type' })
		  // return ($root, 'no object_type');
		my $type = $rng->pick(@object_types);
		return (replace_at($root, $p, { t => 's', v => $type }), "object_type $type");
	},
	swap_values => sub {
		my ($rng, $root) = @_;
		my @places = grep { defined $_->[0] } places($root);
		return ($root, 'nothing to swap') if @places < 2;
		my $a = $rng->pick(@places);
		my $b = $rng->pick(@places);
		my ($va, $vb) = (copy_tree($a->[3]), copy_tree($b->[3]));
		replace_at($root, $a, $vb);
		replace_at($root, $b, $va);
		return ($root, 'swapped ' . ($a->[2] // 'element') . ' and ' . ($b->[2] // 'element'));
	},
);

my %byte_mutations = (
	bit_flip => sub {
		my ($rng, $bytes) = @_;
		return ($bytes, 'empty') unless length $bytes;
		my $n = $rng->range(1, 4);
		for (1 .. $n)
		{
			my $i = $rng->below(length $bytes);
			substr($bytes, $i, 1) = chr(ord(substr($bytes, $i, 1)) ^ (1 << $rng->below(8)));
		}
		return ($bytes, "$n bit flips");
	},
	truncate => sub {
		my ($rng, $bytes) = @_;
		my $at = $rng->below(length($bytes) + 1);
		return (substr($bytes, 0, $at), "cut at $at");
	},
	invalid_utf8 => sub {
		my ($rng, $bytes) = @_;
		my $at = $rng->below(length($bytes) + 1);
		my $bad = $rng->pick(@invalid_utf8);
		return (substr($bytes, 0, $at) . $bad . substr($bytes, $at),
			'invalid UTF-8 ' . show_bytes($bad) . " at $at");
	},
	nul_byte => sub {
		my ($rng, $bytes) = @_;
		my $at = $rng->below(length($bytes) + 1);
		return (substr($bytes, 0, $at) . "\x00" . substr($bytes, $at), "NUL at $at");
	},
	delete_chunk => sub {
		my ($rng, $bytes) = @_;
		my $at = $rng->below(length($bytes) + 1);
		my $n = $rng->range(1, 40);
		substr($bytes, $at, $n) = '' if $at < length $bytes;
		return ($bytes, "deleted $n at $at");
	},
	duplicate_chunk => sub {
		my ($rng, $bytes) = @_;
		my $at = $rng->below(length($bytes) + 1);
		my $chunk = substr($bytes, $at, $rng->range(1, 60));
		return (substr($bytes, 0, $at) . $chunk . substr($bytes, $at), "duplicated a chunk at $at");
	},
	cut_character => sub {
		my ($rng, $bytes) = @_;
		# Cut a multibyte character in two (or lose its continuation).
		my @starts;
		while ($bytes =~ /[\xc2-\xf4]/g) { push @starts, pos($bytes) - 1; }
		return ($bytes, 'no multibyte character') unless @starts;
		my $at = $rng->pick(@starts);
		return (substr($bytes, 0, $at + 1) . substr($bytes, $at + 2), "cut the character at $at");
	},
	framing => sub {
		my ($rng, $bytes) = @_;
		my $k = $rng->below(6);
		return ("\xef\xbb\xbf$bytes", 'BOM') if $k == 0;
		return ("$bytes$bytes", 'two values') if $k == 1;
		return (" \n\t$bytes \r\n", 'whitespace around') if $k == 2;
		return ("$bytes,", 'trailing comma') if $k == 3;
		return ("$bytes\x00", 'trailing NUL') if $k == 4;
		return ($rng->pick('', ' ', 'null', '[]', '{}', '"order"', '0', "\x00"), 'replaced whole');
	},
);

my @tree_names = sort keys %tree_mutations;
my @byte_names = sort keys %byte_mutations;

# mutate($rng, $bytes): the bytes with 1 to 3 mutations applied; returns
# (bytes, description).  Structural mutations go first, on the parsed tree
# (when the bytes parse); byte mutations after, on the encoded bytes.
sub mutate
{
	my ($rng, $bytes) = @_;
	my @done;
	my $n = $rng->pick(1, 1, 1, 2, 2, 3);
	my $tree = parse_json($bytes);
	my $structural = $tree ? $rng->below($n + 1) : 0;
	$structural = $n if $tree && $structural == 0 && $rng->chance(0.6);
	if ($structural > 0)
	{
		for (1 .. $structural)
		{
			my $name = $rng->pick(@tree_names);
			my $what;
			($tree, $what) = $tree_mutations{$name}->($rng, $tree);
			push @done, $what;
		}
		$bytes = encode_json_tree($tree);
	}
	for ($structural + 1 .. $n)
	{
		my $name = $rng->pick(@byte_names);
		my $what;
		($bytes, $what) = $byte_mutations{$name}->($rng, $bytes);
		push @done, $what;
	}
	return ($bytes, join('; ', @done));
}

# Bytes as a readable Perl-style string: printable ASCII as is, everything
# else \xNN; long values shortened in the middle.
sub show_bytes
{
	my ($bytes, $max) = @_;
	$max //= 400;
	my $s = $bytes;
	$s =~ s/([\\"])/\\$1/g;
	$s =~ s/([^\x20-\x7e])/sprintf('\\x%02x', ord($1))/ge;
	if (length($s) > $max)
	{
		my $half = int($max / 2);
		$s = substr($s, 0, $half) . '...(' . length($bytes) . ' bytes)...'
		  . substr($s, -$half);
	}
	return "\"$s\"";
}

#
# Shrinking: delta debugging within a deadline.
#

# shrink_list(\@items, $fails, $deadline): a smaller list on which
# $fails->(\@list) still returns true (the list given must fail).  Drops
# chunks of halving size as long as the failure stays.
sub shrink_list
{
	my ($items, $fails, $deadline) = @_;
	my @list = @$items;
	my $chunk = int((@list + 1) / 2);
	while ($chunk >= 1 && @list > 1)
	{
		for (my $i = 0; $i < @list && @list > 1;)
		{
			return @list if time() > $deadline;
			my @without = @list;
			splice(@without, $i, $chunk);
			if ($fails->(\@without))
			{
				@list = @without;
			}
			else
			{
				$i += $chunk;
			}
		}
		last if $chunk == 1;
		$chunk = int(($chunk + 1) / 2);
		$chunk = 1 if $chunk > @list;
	}
	return @list;
}

# Simpler versions of a tree, one change each: a member or element dropped,
# a container emptied, a long string or deep nesting cut down.
sub simpler_trees
{
	my ($root) = @_;
	my @out;
	my @places = places($root);

	# A change to the node at place $k of a copy of the tree.
	my $changed = sub {
		my ($k, $change) = @_;
		my $copy = copy_tree($root);
		$change->((places($copy))[$k][3]);
		push @out, $copy;
	};
	for my $k (0 .. $#places)
	{
		my $node = $places[$k][3];
		my $n = ($node->{t} eq 'o' || $node->{t} eq 'a') ? @{ $node->{v} } : 0;
		if ($n > 1)
		{
			my $half = int($n / 2);
			$changed->($k, sub { splice(@{ $_[0]{v} }, $half) });
			$changed->($k, sub { splice(@{ $_[0]{v} }, 0, $half) });
		}
		if ($n > 0 && $n <= 64)
		{
			for my $i (reverse 0 .. $n - 1)
			{
				$changed->($k, sub { splice(@{ $_[0]{v} }, $i, 1) });
			}
		}
		if ($node->{t} eq 'raw' && $node->{v} =~ /^(\[+|(?:\{"a":)+)/)
		{
			# Halve the nesting, keep what is inside.
			my $open = $1;
			my $unit = substr($open, 0, 1) eq '[' ? '[' : '{"a":';
			my $close = $unit eq '[' ? ']' : '}';
			my $depth = int(length($open) / length($unit));
			# The value inside may open with the same character.
			$depth-- while $depth > 0 && substr($node->{v}, -$depth) ne $close x $depth;
			my $inner = substr($node->{v}, $depth * length($unit),
				length($node->{v}) - $depth * length($unit) - $depth);
			my $d = int($depth / 2);
			$changed->($k, sub { $_[0]{v} = ($unit x $d) . $inner . ($close x $d) });
		}
		elsif ($node->{t} eq 's' && length($node->{v}) > 8)
		{
			$changed->($k, sub { $_[0]{v} = substr($_[0]{v}, 0, int(length($_[0]{v}) / 2)) });
		}
	}
	return @out;
}

# shrink_message($bytes, $fails, $deadline): a smaller message that still
# fails.  First by its JSON structure (when it parses), then byte chunks.
sub shrink_message
{
	my ($bytes, $fails, $deadline) = @_;
	my $tree = parse_json($bytes);
	if ($tree)
	{
		my $progress = 1;
		while ($progress && time() < $deadline)
		{
			$progress = 0;
			foreach my $simpler (simpler_trees($tree))
			{
				last if time() > $deadline;
				my $candidate = encode_json_tree($simpler);
				next if length($candidate) >= length($bytes);
				if ($fails->($candidate))
				{
					($tree, $bytes, $progress) = ($simpler, $candidate, 1);
					last;
				}
			}
		}
	}
	my @chars = split //, $bytes;
	@chars = shrink_list(\@chars, sub { $fails->(join('', @{ $_[0] })) }, $deadline)
	  if length($bytes) <= 4096;
	return join('', @chars);
}

1;
