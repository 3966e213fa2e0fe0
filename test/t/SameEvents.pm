# Pieces of test/t/030_same_events.pl that need no database: a seeded
# random generator, JSON values printed as jsonb prints them, the vault's
# UUID v5 keys, the random world of events, and the independent recount of
# what every table must hold according to docs/data-rule.md.
#
# JSON values are plain Perl data: hashes (objects), arrays, strings, undef
# (null) and numbers made with num(), so that 5 and "5" stay apart.

package SameEvents;

use strict;
use warnings;
use utf8;

use Digest::SHA qw(sha1);
use Encode qw(encode);
use Time::HiRes ();

use Exporter 'import';
our @EXPORT = qw(
  new_rng num jsonb_text hash_key
  generate_world event_line event_legend version_cmp
  expected_tables dictionary_table copy_statement load_time_column
  run_worlds
);

#
# A seeded generator of its own (xorshift32), so that nothing else calling
# rand() can change a world, and every seed gives the same world anywhere.
#
package SameEvents::Rng;

sub next_u32
{
	my ($self) = @_;
	my $x = $self->{state};
	$x ^= ($x << 13) & 0xffffffff;
	$x ^= $x >> 17;
	$x ^= ($x << 5) & 0xffffffff;
	$self->{state} = $x;
	return $x;
}

# 0 .. $n - 1
sub below { my ($self, $n) = @_; return $self->next_u32 % $n; }

# $lo .. $hi
sub range { my ($self, $lo, $hi) = @_; return $lo + $self->below($hi - $lo + 1); }

sub chance { my ($self, $p) = @_; return $self->next_u32 / 4294967296 < $p; }

sub pick { my ($self, @from) = @_; return $from[ $self->below(scalar @from) ]; }

sub shuffle
{
	my ($self, @list) = @_;
	for (my $i = $#list; $i > 0; $i--)
	{
		my $j = $self->below($i + 1);
		@list[ $i, $j ] = @list[ $j, $i ];
	}
	return @list;
}

# An independent generator drawn from this one.
sub child { my ($self) = @_; return SameEvents::new_rng($self->next_u32); }

package SameEvents;

sub new_rng
{
	my ($seed) = @_;
	my $state = ($seed ^ 0x5bd1e995) & 0xffffffff;
	$state = 0x2545f491 if $state == 0;
	my $rng = bless { state => $state }, 'SameEvents::Rng';
	$rng->next_u32 for 1 .. 10;
	return $rng;
}

#
# JSON as jsonb sees it.
#

sub num { my ($n) = @_; return bless \$n, 'SameEvents::Num'; }

sub json_type
{
	my ($v) = @_;
	return 'null' unless defined $v;
	my $ref = ref $v;
	return 'object' if $ref eq 'HASH';
	return 'array' if $ref eq 'ARRAY';
	return 'number' if $ref eq 'SameEvents::Num';
	die "unexpected JSON value $ref" if $ref;
	return 'string';
}

sub byte_length { return length(encode('UTF-8', $_[0])); }

# jsonb stores (and prints, and compares) the keys of an object shorter
# first, then byte-wise.
sub jsonb_keys
{
	my ($object) = @_;
	return sort { byte_length($a) <=> byte_length($b) or $a cmp $b }
	  keys %$object;
}

sub json_string
{
	my ($s) = @_;
	my %escape = ("\"" => '\\"', "\\" => '\\\\', "\b" => '\\b',
		"\f" => '\\f', "\n" => '\\n', "\r" => '\\r', "\t" => '\\t');
	$s =~ s{(["\\\x00-\x1f])}{$escape{$1} // sprintf('\\u%04x', ord($1))}ge;
	return "\"$s\"";
}

# The text jsonb prints for a value (jsonb_out): what a payload column
# holds as text, and a valid message to send.
sub jsonb_text
{
	my ($v) = @_;
	my $type = json_type($v);
	return 'null' if $type eq 'null';
	return json_string($v) if $type eq 'string';
	return ${$v} if $type eq 'number';
	return '[' . join(', ', map { jsonb_text($_) } @$v) . ']'
	  if $type eq 'array';
	return '{'
	  . join(', ',
		map { json_string($_) . ': ' . jsonb_text($v->{$_}) } jsonb_keys($v))
	  . '}';
}

#
# Vault keys: name-based UUID v5 (SHA-1) in dwh's namespace, over the
# business key's UTF-8 bytes.
#
my $namespace = pack('H*', '7f288a2e0ad040398e596c9838d87307');

sub hash_key
{
	my ($name) = @_;
	my @b = unpack('C16', substr(sha1($namespace . encode('UTF-8', $name)), 0, 16));
	$b[6] = ($b[6] & 0x0f) | 0x50;
	$b[8] = ($b[8] & 0x3f) | 0x80;
	my $hex = unpack('H*', pack('C16', @b));
	return join('-',
		substr($hex, 0, 8), substr($hex, 8, 4), substr($hex, 12, 4),
		substr($hex, 16, 4), substr($hex, 20, 12));
}

#
# The random world.
#

# Version times come from a small set, so that ties happen often.
my @times = map { sprintf('2023-04-01 10:%02d:00', $_) } 0 .. 6;

# Names that differ only in case, in script or by trailing text.
my @category_groups = (
	[ 'Plov', 'Plov new', 'plov' ],
	[ 'Салаты', 'салаты', 'Салаты тёплые' ],
	[ 'Супы', 'Супы и борщи' ],
	[ 'Напитки', 'Drinks', 'drinks' ],
	[ 'Выпечка' ], [ 'Десерты' ]);
my @dish_pool = (
	[ 'Плов', 'плов', 'Plov', 'Плов узбекский' ],
	[ 'Лагман', 'Lagman', 'лагман' ],
	[ 'Чиз Наан', 'Чиз наан', 'Cheese Naan' ],
	[ 'Салат Греческий', 'Салат греческий', 'Greek salad' ],
	[ 'Сладкий Ласси', 'Ласси', 'Lassi' ],
	[ 'Чай Масала', 'Chai', 'чай масала' ],
	[ 'Хачапури', 'Хачапури по-мегрельски' ],
	[ 'Борщ', 'борщ', 'Borscht' ],
	[ 'Самса', 'Samsa', 'Самса с тыквой' ],
	[ 'Долма', 'Dolma' ],
	[ 'Пхали', 'пхали', 'Пхали с фасолью' ]);
my @user_pool = (
	[ 'Иван Петров', 'иван петров', 'Ivan Petrov', 'Иван Петров мл.' ],
	[ 'Гаврила Игнатьев', 'Гаврила Архипович Игнатьев' ],
	[ 'Anna Smirnova', 'anna smirnova', 'Анна Смирнова' ],
	[ 'Олег', 'олег', 'Oleg' ],
	[ 'Мария Иванова', 'Мария' ],
	[ 'Pavel', 'Павел', 'pavel' ]);
my @restaurant_pool = (
	[ 'Кубдари', 'кубдари', 'Kubdari' ],
	[ 'Вкус Индии', 'Вкус индии' ],
	[ 'PLOV.com', 'Plov.com', 'Plov' ],
	[ 'Гриль', 'Grill' ]);

sub hex_id
{
	my ($rng) = @_;
	return sprintf('%08x%08x%08x', $rng->next_u32, $rng->next_u32, $rng->next_u32);
}

# n values drawn from @times, sorted; ties allowed.
sub some_times
{
	my ($rng, $n) = @_;
	return sort map { $rng->pick(@times) } 1 .. $n;
}

sub menu_entry
{
	my ($dish, $name, $category) = @_;
	return {
		_id => $dish->{id},
		name => $name,
		price => num($dish->{price}),
		category => $category
	};
}

# A restaurant's menu state: the dishes it lists, each with a name and a
# category.  Each later version changes it a little.
sub mutate_menu
{
	my ($rng, $state, $restaurant, $categories) = @_;
	my @listed = grep { $state->{$_} } map { $_->{id} } @{ $restaurant->{dishes} };
	my @unlisted = grep { !$state->{$_} } map { $_->{id} } @{ $restaurant->{dishes} };
	my %dish = map { $_->{id} => $_ } @{ $restaurant->{dishes} };
	my $what = $rng->pick('move', 'move', 'rename', 'rename', 'drop', 'add');

	if ($what eq 'add' && @unlisted)
	{
		my $d = $dish{ $rng->pick(@unlisted) };
		$state->{ $d->{id} } =
		  { name => $rng->pick(@{ $d->{names} }), category => $rng->pick(@$categories) };
	}
	elsif ($what eq 'drop' && @listed > 1)
	{
		delete $state->{ $rng->pick(@listed) };
	}
	elsif ($what eq 'rename' && @listed)
	{
		my $d = $dish{ $rng->pick(@listed) };
		$state->{ $d->{id} }{name} = $rng->pick(@{ $d->{names} });
	}
	elsif (@listed)
	{
		$state->{ $rng->pick(@listed) }{category} = $rng->pick(@$categories);
	}
	return;
}

sub menu_of
{
	my ($rng, $state, $restaurant) = @_;
	my @menu;
	foreach my $d (@{ $restaurant->{dishes} })
	{
		my $s = $state->{ $d->{id} } or next;
		# Now and then a dish listed without a category.
		my $category = $rng->chance(0.05) ? '' : $s->{category};
		push @menu, menu_entry($d, $s->{name}, $category);
	}
	# The source's blank entry.
	push @menu, { _id => '', name => '', price => num(0), category => '' }
	  if $rng->chance(0.3);
	return \@menu;
}

sub dictionary_event
{
	my ($kind, $key, $value) = @_;
	return {
		kind => $kind,
		key => $key,
		payload => $value,
		text => jsonb_text($value),
		time => $value->{update_ts_utc}
	};
}

sub restaurant_versions
{
	my ($rng, $restaurant, $categories) = @_;
	my $n = $rng->range(1, 3);
	my @when = some_times($rng, $n);
	my %state;
	foreach my $d (@{ $restaurant->{dishes} })
	{
		next if $d->{off_menu} || $d->{late};
		$state{ $d->{id} } = { name => $d->{names}[0], category => $d->{category} };
	}
	my @events;
	foreach my $i (0 .. $n - 1)
	{
		mutate_menu($rng, \%state, $restaurant, $categories) if $i > 0;
		mutate_menu($rng, \%state, $restaurant, $categories)
		  if $i > 0 && $rng->chance(0.5);
		my %value = (
			_id => $restaurant->{id},
			name => $rng->chance(0.7)
			? $restaurant->{names}[0]
			: $rng->pick(@{ $restaurant->{names} }),
			menu => menu_of($rng, \%state, $restaurant));
		# A value without update_ts_utc is older than any that has one.
		$value{update_ts_utc} = $when[$i] unless $rng->chance(0.15);
		push @events, dictionary_event('restaurant', $restaurant->{id}, \%value);

		# Another menu with the same update_ts_utc.
		if ($rng->chance(0.25))
		{
			my %other = map { $_ => { %{ $state{$_} } } } keys %state;
			mutate_menu($rng, \%other, $restaurant, $categories);
			my %tie = (%value, menu => menu_of($rng, \%other, $restaurant));
			push @events, dictionary_event('restaurant', $restaurant->{id}, \%tie);
		}
	}
	return @events;
}

sub user_versions
{
	my ($rng, $user) = @_;
	my $n = $rng->pick(0, 1, 1, 2, 2, 3);
	my @when = some_times($rng, $n);
	my @events;
	foreach my $i (0 .. $n - 1)
	{
		my %value = (
			_id => $user->{id},
			name => $rng->pick(@{ $user->{names} }),
			login => $rng->pick(@{ $user->{logins} }));
		$value{update_ts_utc} = $when[$i] unless $rng->chance(0.2);
		push @events, dictionary_event('user', $user->{id}, \%value);
		if ($rng->chance(0.2))
		{
			my %tie = (%value, name => $rng->pick(@{ $user->{names} }),
				login => $rng->pick(@{ $user->{logins} }));
			push @events, dictionary_event('user', $user->{id}, \%tie);
		}
	}
	return @events;
}

sub order_items
{
	my ($rng, $dishes) = @_;
	my @items;
	foreach my $d (@$dishes)
	{
		push @items,
		  {
			id => $d->{id},
			# Orders often name a dish otherwise than the menu does.
			name => $rng->chance(0.6) ? $d->{names}[0] : $rng->pick(@{ $d->{names} }),
			price => num($rng->chance(0.8) ? $d->{price} : $d->{price} + 10),
			quantity => num($rng->range(1, 3))
		  };
	}
	return \@items;
}

sub order_payload
{
	my ($o, $version) = @_;
	my $cost = 0;
	$cost += ${ $_->{price} } * ${ $_->{quantity} } foreach @{ $version->{items} };
	return {
		restaurant => { id => $o->{restaurant}{id} },
		date => $version->{date},
		user => { id => $version->{user}{id} },
		order_items => $version->{items},
		bonus_payment => num(0),
		cost => num($cost),
		payment => num($cost),
		bonus_grant => num(0),
		statuses => [ { status => $version->{status}, dttm => $version->{update_ts} } ],
		final_status => $version->{status},
		update_ts => $version->{update_ts}
	};
}

sub order_event
{
	my ($rng, $o, $payload) = @_;
	my $sent = substr($payload->{update_ts}, 0, 14)
	  . sprintf('%02d:%02d', substr($payload->{update_ts}, 14, 2) + $rng->range(0, 2),
		$rng->range(0, 59));
	my $message = {
		object_id => num($o->{id}),
		object_type => 'order',
		sent_dttm => $sent,
		payload => $payload
	};
	return {
		kind => 'order',
		key => $o->{id},
		payload => $payload,
		text => jsonb_text($payload),
		time => $payload->{update_ts},
		sent => $sent,
		message => jsonb_text($message)
	};
}

sub order_versions
{
	my ($rng, $o, $users) = @_;
	my $pool = $o->{restaurant}{dishes};
	my $n = $rng->range(1, 4);
	my @when = some_times($rng, $n);
	my @statuses;
	if ($n >= 3 && $rng->chance(0.5))
	{
		# CLOSED -> CANCELLED -> CLOSED ...
		@statuses = map { $_ % 2 ? 'CANCELLED' : 'CLOSED' } 0 .. $n - 1;
	}
	else
	{
		@statuses = map { $rng->chance(0.7) ? 'CLOSED' : 'CANCELLED' } 1 .. $n;
	}
	my @dishes = ($rng->shuffle(@$pool))[ 0 .. $rng->range(1, 4 < @$pool ? 4 : scalar @$pool) - 1 ];
	my %version = (
		user => $o->{user},
		date => sprintf('2023-04-01 09:%02d:00', $rng->range(50, 59)),
		items => order_items($rng, \@dishes));
	my @events;
	foreach my $i (0 .. $n - 1)
	{
		if ($i > 0)
		{
			# The item set changes: a dish more, a dish less, or another one.
			if ($rng->chance(0.5))
			{
				my %in = map { $_->{id} => 1 } @dishes;
				my @out = grep { !$in{ $_->{id} } } @$pool;
				my $what = $rng->pick('add', 'remove', 'replace');
				if ($what ne 'remove' && @out && @dishes < 4)
				{
					push @dishes, $rng->pick(@out);
					shift @dishes if $what eq 'replace' && @dishes > 1;
				}
				elsif (@dishes > 1)
				{
					splice(@dishes, $rng->below(scalar @dishes), 1);
				}
			}
			$version{items} = order_items($rng, \@dishes);
			$version{date} = sprintf('2023-04-01 09:%02d:00', $rng->range(50, 59))
			  if $rng->chance(0.2);
			$version{user} = $rng->pick(@$users) if $rng->chance(0.08);
		}
		$version{status} = $statuses[$i];
		$version{update_ts} = $when[$i];
		my $payload = order_payload($o, \%version);
		push @events, order_event($rng, $o, $payload);
		# An exact redelivery, sent again later or at the same time.
		push @events, order_event($rng, $o, $payload) if $rng->chance(0.25);
		# Another version with the same update_ts and another payload.
		if ($rng->chance(0.25))
		{
			my %tie = (%version,
				status => $version{status} eq 'CLOSED' ? 'CANCELLED' : 'CLOSED');
			$tie{items} = order_items($rng, [ $rng->shuffle(@dishes) ])
			  if $rng->chance(0.5);
			push @events, order_event($rng, $o, order_payload($o, \%tie));
		}
	}
	return @events;
}

# A world: 3-6 users, 2-3 restaurants with 4-8 dishes over 2-4 categories
# (plus dishes that no menu lists, or only later menus), and 10-40 events:
# order versions, user values and restaurant values.
sub generate_world
{
	my ($seed) = @_;
	my $rng = new_rng($seed);
	my %world = (seed => $seed);

	my @user_names = $rng->shuffle(@user_pool);
	foreach my $i (1 .. $rng->range(3, 6))
	{
		my $names = $user_names[ $i - 1 ];
		push @{ $world{users} },
		  {
			id => hex_id($rng),
			alias => "u$i",
			names => $names,
			logins => [ "user$i", "User$i", "user${i}_new" ]
		  };
	}

	# 2-4 categories, two of them alike when the first group allows.
	my $count = $rng->range(2, 4);
	my @groups = $rng->shuffle(@category_groups);
	my @categories = grep { defined } ($rng->shuffle(@{ shift @groups }))[ 0 .. 1 ];
	push @categories, $rng->pick(@{ shift @groups }) while @categories < $count;
	$world{categories} = \@categories;
	my @restaurant_names = $rng->shuffle(@restaurant_pool);
	my @dish_names = $rng->shuffle(@dish_pool);
	my $restaurants = $rng->range(2, 3);
	my $dishes = $rng->range(4, 8);
	foreach my $i (1 .. $restaurants)
	{
		push @{ $world{restaurants} },
		  {
			id => hex_id($rng),
			alias => "r$i",
			names => $restaurant_names[ $i - 1 ],
			dishes => []
		  };
	}
	foreach my $i (1 .. $dishes + $rng->range(1, 2))
	{
		my $r = $world{restaurants}[ ($i - 1) % $restaurants ];
		my $d = {
			id => hex_id($rng),
			alias => "d$i",
			restaurant => $r,
			names => $dish_names[ $i - 1 ],
			price => 10 * $rng->range(9, 45),
			category => $rng->pick(@categories),
			# Past the menu dishes: on no menu at all, or only on later ones.
			off_menu => $i > $dishes && $rng->chance(0.6),
			late => $i > $dishes
		};
		push @{ $r->{dishes} }, $d;
		push @{ $world{dishes} }, $d;
	}

	my @events;
	push @events, user_versions($rng, $_) foreach @{ $world{users} };
	push @events, restaurant_versions($rng, $_, \@categories)
	  foreach @{ $world{restaurants} };
	foreach my $i (1 .. $rng->range(3, 6))
	{
		my $o = {
			id => 1000 + $i,
			user => $rng->pick(@{ $world{users} }),
			restaurant => $rng->pick(@{ $world{restaurants} })
		};
		push @events, order_versions($rng, $o, $world{users});
	}
	# A dictionary value delivered twice.
	my @dictionary = grep { $_->{kind} ne 'order' } @events;
	push @events, { %{ $rng->pick(@dictionary) } }
	  if @dictionary && $rng->chance(0.5);

	# Keep it readable: at most 40 events.
	@events = $rng->shuffle(@events);
	splice(@events, 40) if @events > 40;
	# Numbered in the order they were generated (the time order is below).
	@events = sort { $a->{kind} cmp $b->{kind} or $a->{key} cmp $b->{key} or
		  ($a->{time} // '') cmp ($b->{time} // '') or $a->{text} cmp $b->{text} }
	  @events;
	$events[$_]{n} = $_ + 1 foreach 0 .. $#events;
	$world{events} = \@events;
	$world{rng} = $rng;
	return \%world;
}

#
# Readable lines.
#

# Short aliases (u1, r2, d3) for the world's ids.
sub aliases
{
	my ($world) = @_;
	my %alias;
	$alias{ $_->{id} } = $_->{alias}
	  foreach @{ $world->{users} }, @{ $world->{restaurants} }, @{ $world->{dishes} };
	return \%alias;
}

sub event_legend
{
	my ($world) = @_;
	return join(', ',
		map { "$_->{alias} = $_->{id}" } @{ $world->{users} },
		@{ $world->{restaurants} }, @{ $world->{dishes} });
}

sub short_time
{
	my ($ts) = @_;
	return '-infinity' unless defined $ts;
	return substr($ts, 11);
}

sub event_line
{
	my ($world, $e) = @_;
	my $alias = aliases($world);
	my $p = $e->{payload};
	my $id = sub { $alias->{ $_[0] } // $_[0] };
	if ($e->{kind} eq 'order')
	{
		my $items = join(', ',
			map {
				sprintf('%s "%s" %sx%s', $id->($_->{id}), $_->{name},
					${ $_->{price} }, ${ $_->{quantity} })
			} @{ $p->{order_items} });
		return sprintf(
			'#%d order %d update_ts %s %s user %s restaurant %s date %s items [%s] cost %s sent %s',
			$e->{n}, $e->{key}, short_time($p->{update_ts}), $p->{final_status},
			$id->($p->{user}{id}), $id->($p->{restaurant}{id}), short_time($p->{date}),
			$items, ${ $p->{cost} }, short_time($e->{sent}));
	}
	if ($e->{kind} eq 'user')
	{
		return sprintf('#%d user %s update_ts_utc %s name "%s" login "%s"',
			$e->{n}, $id->($e->{key}), short_time($p->{update_ts_utc}),
			$p->{name}, $p->{login});
	}
	my $menu = join(', ',
		map {
			$_->{_id} eq ''
			  ? '(blank entry)'
			  : sprintf('%s "%s" [%s]', $id->($_->{_id}), $_->{name}, $_->{category})
		} @{ $p->{menu} });
	return sprintf('#%d restaurant %s update_ts_utc %s name "%s" menu {%s}',
		$e->{n}, $id->($e->{key}), short_time($p->{update_ts_utc}),
		$p->{name}, $menu);
}

#
# The recount: what each table must hold, from the events alone, by the
# rule of docs/data-rule.md.
#

# Version order: version time (a dictionary value without update_ts_utc is
# -infinity), then the payload's jsonb text form, byte by byte (Perl's cmp
# on characters is the byte order of their UTF-8).
sub version_cmp
{
	my ($left, $right) = @_;
	return ($left->{time} // '') cmp ($right->{time} // '')
	  || $left->{text} cmp $right->{text};
}

sub time_text { return $_[0] // '-infinity'; }

sub amount { return sprintf('%d.00000', ${ $_[0] }); }

# The distinct versions of each object: {kind}{key} = [versions, oldest
# first]; an order version also carries the greatest sent_dttm of its
# messages.
sub versions_of
{
	my ($events) = @_;
	my %seen;
	foreach my $e (@$events)
	{
		my $v = $seen{ $e->{kind} }{ $e->{key} }{ $e->{text} } //= { %$e };
		$v->{sent} = $e->{sent}
		  if defined $e->{sent} && $e->{sent} gt $v->{sent};
	}
	my %versions;
	foreach my $kind (keys %seen)
	{
		foreach my $key (keys %{ $seen{$kind} })
		{
			$versions{$kind}{$key} =
			  [ sort { version_cmp($a, $b) } values %{ $seen{$kind}{$key} } ];
		}
	}
	return \%versions;
}

# Of versions, the greatest of each distinct version time: [time, version].
sub greatest_per_time
{
	my ($versions) = @_;
	my %at;
	$at{ $_->{time} // '' } = $_ foreach @$versions;    # oldest first
	return map { [ $_ eq '' ? undef : $_, $at{$_} ] } sort keys %at;
}

# Expected rows of each checked table, as sorted lines of '|'-separated
# values, and the SQL that reads the same lines from a database.  Keys are
# computed here (hash_key), not asked of the database.  The history tables
# (stg.order_event_history, stg.user_history, stg.restaurant_history) get
# expected rows ("object_id|sent_dttm|payload" for orders,
# "object_id|payload" for the others) but no SQL: their columns are the
# caller's to find.
sub expected_tables
{
	my ($events) = @_;
	my $V = versions_of($events);
	my (%rows, %sql);
	my $h = \&hash_key;

	# STG: the current version of every object, and every superseded one.
	foreach my $kind ('order', 'user', 'restaurant')
	{
		my $table = { order => 'order_events', user => 'users', restaurant => 'restaurants' }->{$kind};
		my $history = { order => 'stg.order_event_history', user => 'stg.user_history',
			restaurant => 'stg.restaurant_history' }->{$kind};
		$rows{$history} //= [];
		foreach my $key (keys %{ $V->{$kind} })
		{
			my @v = @{ $V->{$kind}{$key} };
			my $current = pop @v;
			push @{ $rows{"stg.$table"} },
			  $kind eq 'order'
			  ? "$key|$current->{sent}|$current->{text}"
			  : "$key|$current->{text}";
			push @{ $rows{$history} },
			  map { $kind eq 'order' ? "$key|$_->{sent}|$_->{text}" : "$key|$_->{text}" } @v;
		}
	}
	$sql{'stg.order_events'} = q{SELECT object_id || '|' || sent_dttm || '|' || payload FROM stg.order_events};
	$sql{'stg.users'} = q{SELECT object_id || '|' || payload FROM stg.users};
	$sql{'stg.restaurants'} = q{SELECT object_id || '|' || payload FROM stg.restaurants};

	my %orders = %{ $V->{order} // {} };
	my %current = map { $_ => $orders{$_}[-1]{payload} } keys %orders;
	my (%user_hub, %restaurant_hub, %product_hub, %category_hub, %product_restaurant);
	my (%namings, %categorised);

	$user_hub{$_} = 1 foreach keys %{ $V->{user} // {} };
	$restaurant_hub{$_} = 1 foreach keys %{ $V->{restaurant} // {} };
	foreach my $key (keys %orders)
	{
		foreach my $v (@{ $orders{$key} })
		{
			my $p = $v->{payload};
			$user_hub{ $p->{user}{id} } = 1;
			$restaurant_hub{ $p->{restaurant}{id} } = 1;
			foreach my $item (@{ $p->{order_items} })
			{
				$product_hub{ $item->{id} } = 1;
				$product_restaurant{"$item->{id}|$p->{restaurant}{id}"} = 1;
				push @{ $namings{ $item->{id} } },
				  [ $p->{update_ts}, $item->{name}, 'stg.order_events' ];
			}
		}
	}
	foreach my $key (keys %{ $V->{restaurant} // {} })
	{
		foreach my $v (@{ $V->{restaurant}{$key} })
		{
			foreach my $entry (@{ $v->{payload}{menu} })
			{
				next if $entry->{_id} eq '';
				$product_hub{ $entry->{_id} } = 1;
				$product_restaurant{"$entry->{_id}|$key"} = 1;
				push @{ $namings{ $entry->{_id} } },
				  [ $v->{time}, $entry->{name}, 'stg.restaurants' ];
				next if $entry->{category} eq '';
				$category_hub{ $entry->{category} } = 1;
				push @{ $categorised{ $entry->{_id} } }, [ $v->{time}, $entry->{category} ];
			}
		}
	}

	# Hubs.
	$rows{'dds.h_order'} = [ map { "$_|$current{$_}{date}" } keys %current ];
	$sql{'dds.h_order'} = q{SELECT order_id || '|' || order_dt FROM dds.h_order};
	$rows{'dds.h_user'} = [ keys %user_hub ];
	$sql{'dds.h_user'} = q{SELECT user_id FROM dds.h_user};
	$rows{'dds.h_restaurant'} = [ keys %restaurant_hub ];
	$sql{'dds.h_restaurant'} = q{SELECT restaurant_id FROM dds.h_restaurant};
	$rows{'dds.h_product'} = [ keys %product_hub ];
	$sql{'dds.h_product'} = q{SELECT product_id FROM dds.h_product};
	$rows{'dds.h_category'} = [ keys %category_hub ];
	$sql{'dds.h_category'} = q{SELECT category_name FROM dds.h_category};

	# Links.
	my %order_products;
	foreach my $key (keys %current)
	{
		my %distinct = map { $_->{id} => 1 } @{ $current{$key}{order_items} };
		$order_products{$key} = [ sort keys %distinct ];
	}
	$rows{'dds.l_order_user'} =
	  [ map { $h->($_) . '|' . $h->($current{$_}{user}{id}) } keys %current ];
	$sql{'dds.l_order_user'} = q{SELECT h_order_pk || '|' || h_user_pk FROM dds.l_order_user};
	$rows{'dds.l_order_product'} = [
		map {
			my $o = $_;
			map { $h->($o) . '|' . $h->($_) } @{ $order_products{$o} }
		} keys %current
	];
	$sql{'dds.l_order_product'} = q{SELECT h_order_pk || '|' || h_product_pk FROM dds.l_order_product};
	$rows{'dds.l_product_restaurant'} = [
		map { my ($d, $r) = split /\|/; $h->($d) . '|' . $h->($r) }
		  keys %product_restaurant
	];
	$sql{'dds.l_product_restaurant'} =
	  q{SELECT h_product_pk || '|' || h_restaurant_pk FROM dds.l_product_restaurant};

	# A dish's category: the greatest (version time, category) among the
	# menu entries that list it with one.
	my %category;
	foreach my $d (keys %categorised)
	{
		my ($best) = sort { ($b->[0] // '') cmp ($a->[0] // '') || $b->[1] cmp $a->[1] }
		  @{ $categorised{$d} };
		$category{$d} = $best;
	}
	$rows{'dds.l_product_category'} = [
		map { $h->($_) . '|' . $h->($category{$_}[1]) . '|' . time_text($category{$_}[0]) }
		  keys %category
	];
	$sql{'dds.l_product_category'} =
	  q{SELECT h_product_pk || '|' || h_category_pk || '|' || load_dt FROM dds.l_product_category};

	# Satellites: one row per object and distinct version time.
	foreach my $key (keys %orders)
	{
		foreach my $tv (greatest_per_time($orders{$key}))
		{
			my ($t, $v) = @$tv;
			my $p = $v->{payload};
			push @{ $rows{'dds.s_order_status'} }, $h->($key) . "|$p->{final_status}|$t";
			push @{ $rows{'dds.s_order_cost'} },
			  $h->($key) . '|' . amount($p->{cost}) . '|' . amount($p->{payment}) . "|$t";
		}
	}
	$sql{'dds.s_order_status'} =
	  q{SELECT h_order_pk || '|' || status || '|' || load_dt FROM dds.s_order_status};
	$sql{'dds.s_order_cost'} =
	  q{SELECT h_order_pk || '|' || cost || '|' || payment || '|' || load_dt FROM dds.s_order_cost};
	foreach my $key (keys %{ $V->{user} // {} })
	{
		foreach my $tv (greatest_per_time($V->{user}{$key}))
		{
			my ($t, $v) = @$tv;
			push @{ $rows{'dds.s_user_names'} },
			  $h->($key) . "|$v->{payload}{name}|$v->{payload}{login}|" . time_text($t);
		}
	}
	$sql{'dds.s_user_names'} =
	  q{SELECT h_user_pk || '|' || username || '|' || userlogin || '|' || load_dt FROM dds.s_user_names};
	foreach my $key (keys %{ $V->{restaurant} // {} })
	{
		foreach my $tv (greatest_per_time($V->{restaurant}{$key}))
		{
			my ($t, $v) = @$tv;
			push @{ $rows{'dds.s_restaurant_names'} },
			  $h->($key) . "|$v->{payload}{name}|" . time_text($t);
		}
	}
	$sql{'dds.s_restaurant_names'} =
	  q{SELECT h_restaurant_pk || '|' || name || '|' || load_dt FROM dds.s_restaurant_names};

	# Dish names (docs/data-rule.md): menus name a dish at their version
	# times, one row per time with the greatest name; orders by their first
	# and their newest naming, the greatest (update_ts, name).  The order
	# naming row sits at the first order naming, or at the newest menu
	# naming when the newest order naming is not older; it holds the newest
	# order naming's name (the greater of it and the menus' when of the same
	# time) and takes the place of a menu row of its time.  The current name
	# is the one of the latest row.
	my %current_name;
	foreach my $d (keys %namings)
	{
		my (%menu_at, $first, $last, $last_name, $last_menu);
		foreach my $n (@{ $namings{$d} })
		{
			my ($t, $name, $source) = @$n;
			my $key = $t // '';
			if ($source eq 'stg.restaurants')
			{
				$menu_at{$key} = $name
				  if !defined $menu_at{$key} || $name gt $menu_at{$key};
				$last_menu = $key if !defined $last_menu || $key gt $last_menu;
			}
			else
			{
				$first = $key if !defined $first || $key lt $first;
				($last, $last_name) = ($key, $name)
				  if !defined $last
				  || $key gt $last
				  || ($key eq $last && $name gt $last_name);
			}
		}
		my %row = map { $_ => [ $menu_at{$_}, 'stg.restaurants' ] } keys %menu_at;
		if (defined $first)
		{
			my $at = $first;
			$at = $last_menu
			  if defined $last_menu && $last ge $last_menu && $last_menu gt $first;
			my $name = $last_name;
			$name = $menu_at{$at}
			  if $last eq $at && defined $menu_at{$at} && $menu_at{$at} gt $name;
			$row{$at} = [ $name, 'stg.order_events' ];
			push @{ $rows{'dds.product_namings'} },
			  $h->($d) . "|$first|$last|$last_name|"
			  . (defined $last_menu ? time_text($last_menu eq '' ? undef : $last_menu) : '');
		}
		foreach my $t (sort keys %row)
		{
			my ($name, $source) = @{ $row{$t} };
			push @{ $rows{'dds.s_product_names'} },
			  $h->($d) . "|$name|" . time_text($t eq '' ? undef : $t) . "|$source";
			$current_name{$d} = $name;
		}
	}
	$sql{'dds.product_namings'} =
	  q{SELECT h_product_pk || '|' || first_order_dt || '|' || last_order_dt || '|' || last_order_name || '|' || coalesce(last_menu_dt::text, '') FROM dds.product_namings};
	$sql{'dds.s_product_names'} =
	  q{SELECT h_product_pk || '|' || name || '|' || load_dt || '|' || load_src FROM dds.s_product_names};

	# The marts: distinct CLOSED orders (by their current version) per
	# (user, dish) and per (user, category of one of its dishes).
	my (%per_product, %per_category);
	foreach my $key (keys %current)
	{
		next unless $current{$key}{final_status} eq 'CLOSED';
		my $user = $current{$key}{user}{id};
		my %categories;
		foreach my $d (@{ $order_products{$key} })
		{
			$per_product{$user}{$d}++;
			$categories{ $category{$d}[1] } = 1 if $category{$d};
		}
		$per_category{$user}{$_}++ foreach keys %categories;
	}
	foreach my $u (keys %per_product)
	{
		push @{ $rows{'cdm.user_product_counters'} },
		  map { $h->($u) . '|' . $h->($_) . "|$current_name{$_}|$per_product{$u}{$_}" }
		  keys %{ $per_product{$u} };
	}
	$sql{'cdm.user_product_counters'} =
	  q{SELECT user_id || '|' || product_id || '|' || product_name || '|' || order_cnt FROM cdm.user_product_counters};
	foreach my $u (keys %per_category)
	{
		push @{ $rows{'cdm.user_category_counters'} },
		  map { $h->($u) . '|' . $h->($_) . "|$_|$per_category{$u}{$_}" }
		  keys %{ $per_category{$u} };
	}
	$sql{'cdm.user_category_counters'} =
	  q{SELECT user_id || '|' || category_id || '|' || category_name || '|' || order_cnt FROM cdm.user_category_counters};

	$rows{$_} = [ sort @{ $rows{$_} // [] } ] foreach keys %rows, keys %sql;
	return (\%rows, \%sql);
}


#
# Statements and comparisons shared by the tests that write worlds
# (030_same_events.pl, 061_writer_settings.pl).
#

# The STG table of a user's or a restaurant's value.
sub dictionary_table
{
	my ($e) = @_;
	return $e->{kind} eq 'user' ? 'stg.users' : 'stg.restaurants';
}

sub copy_field
{
	my ($s) = @_;
	$s =~ s/\\/\\\\/g;
	$s =~ s/\t/\\t/g;
	$s =~ s/\n/\\n/g;
	$s =~ s/\r/\\r/g;
	return $s;
}

# Events of distinct new keys, of one kind, as one COPY (text format; the
# data are UTF-8 whatever the session's client_encoding).
sub copy_statement
{
	my (@events) = @_;
	my ($table, $columns, @rows);
	if ($events[0]{kind} eq 'order')
	{
		($table, $columns) = ('stg.order_events', 'object_id, object_type, sent_dttm, payload');
		@rows = map { join("\t", $_->{key}, 'order', $_->{sent}, copy_field($_->{text})) } @events;
	}
	else
	{
		($table, $columns) = (dictionary_table($events[0]), 'object_id, payload');
		@rows = map { join("\t", copy_field($_->{key}), copy_field($_->{text})) } @events;
	}
	return join("\n", "COPY $table ($columns) FROM STDIN WITH (ENCODING 'UTF8');", @rows, '\\.');
}

# Columns that record when and how a row was loaded (docs/data-rule.md,
# "Load-time columns"): left out of the comparison between databases.
sub load_time_column
{
	my ($schema, $table, $column) = @_;
	return 1 if $column eq 'id' && $schema ne 'dds';
	return 1 if $column eq 'loaded_at' || $column eq 'received_at';
	return 1 if $table eq 'user_tags_held' && $column eq 'since';
	return 1
	  if $schema eq 'dds'
	  && $table =~ /^[hl]_/
	  && $table ne 'l_product_category'
	  && ($column eq 'load_dt' || $column eq 'load_src');
	return 0;
}

# The worlds of a property test: seeds base_seed, base_seed + 1, ..., run
# by run->(seed), which returns whether the world passed; exactly fixed of
# them when fixed is defined, else until budget seconds have passed (one
# at least).  Stops at the first failure unless keep_going.  Returns the
# number of worlds run and the seconds they took.
sub run_worlds
{
	my (%arg) = @_;
	my $start = Time::HiRes::time();
	my $worlds = 0;
	while (1)
	{
		if (defined $arg{fixed})
		{
			last if $worlds >= $arg{fixed};
		}
		else
		{
			last if $worlds > 0 && Time::HiRes::time() - $start >= $arg{budget};
		}
		my $seed = ($arg{base_seed} + $worlds) % 2147483648;
		$worlds++;
		last if !$arg{run}->($seed) && !$arg{keep_going};
	}
	return ($worlds, Time::HiRes::time() - $start);
}

1;
