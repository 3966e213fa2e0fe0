# A throw-away redis-server for the TAP tests: loopback, a free port, a
# password, no persistence.  Started and stopped by the test.

package RedisServer;

use strict;
use warnings;

use IPC::Run;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep);

# RedisServer->new(password => 'x'): start a server.
sub new
{
	my ($class, %args) = @_;
	my $self = {
		password => $args{password} // 'redis-test-password',
		port => PostgreSQL::Test::Cluster::get_free_port(),
		dir => PostgreSQL::Test::Utils::tempdir(),
	};
	bless $self, $class;
	$self->start;
	return $self;
}

sub port { return $_[0]->{port} }
sub password { return $_[0]->{password} }

# The dwh.redis_url of this server; another password or db when given.
sub url
{
	my ($self, %args) = @_;
	my $password = $args{password} // $self->{password};
	my $db = $args{db} // 0;
	return "redis://:$password\@127.0.0.1:$self->{port}/$db";
}

sub start
{
	my ($self) = @_;
	my @cmd = (
		'redis-server', '--port', $self->{port}, '--bind', '127.0.0.1',
		'--requirepass', $self->{password}, '--save', '', '--appendonly', 'no',
		'--daemonize', 'yes', '--dir', $self->{dir},
		'--pidfile', "$self->{dir}/redis.pid",
		'--logfile', "$self->{dir}/redis.log");
	IPC::Run::run(\@cmd) or die "could not start redis-server: $?";
	for (1 .. 300)
	{
		my $out = eval { $self->cli('PING') } // '';
		if ($out eq 'PONG')
		{
			$self->{pid} = slurp_file("$self->{dir}/redis.pid");
			chomp $self->{pid};
			note "redis-server started on port $self->{port}, pid $self->{pid}";
			return;
		}
		usleep(100_000);
	}
	die "redis-server did not answer on port $self->{port}";
}

# Stop the server (its data is lost: it keeps none).
sub stop
{
	my ($self) = @_;
	return unless $self->{pid};
	kill 'CONT', $self->{pid};
	kill 'TERM', $self->{pid};
	for (1 .. 300)
	{
		last unless kill 0, $self->{pid};
		usleep(100_000);
	}
	delete $self->{pid};
}

# Freeze or thaw the server: connections stay open, nothing is answered.
sub freeze { kill 'STOP', $_[0]->{pid} }
sub thaw { kill 'CONT', $_[0]->{pid} }

# Run redis-cli with arguments; stdin, when given, is its last argument
# (-x), byte for byte.  Returns the output without its final newline.
sub cli
{
	my ($self, @args) = @_;
	my $stdin;
	if (@args && ref $args[-1] eq 'SCALAR')
	{
		$stdin = ${ pop @args };
	}
	my @cmd = ('redis-cli', '-h', '127.0.0.1', '-p', $self->{port},
		'-a', $self->{password}, '--no-auth-warning',
		defined $stdin ? ('-x') : (), @args);
	my ($out, $err) = ('', '');
	IPC::Run::run(\@cmd, '<', \($stdin // ''), '>', \$out, '2>', \$err)
	  or die "redis-cli @args failed: $err";
	chomp $out;
	return $out;
}

# SET key to the bytes of value.
sub set
{
	my ($self, $key, $value) = @_;
	my $out = $self->cli('SET', $key, \$value);
	die "SET $key: $out" unless $out eq 'OK';
}

# SET key to value, both any bytes (NUL included): the command goes to
# redis-cli --pipe in the protocol's own framing, which carries lengths.
sub set_bytes
{
	my ($self, $key, $value) = @_;
	my $command = '';
	$command .= '$' . length($_) . "\r\n$_\r\n" for ('SET', $key, $value);
	my @cmd = ('redis-cli', '-h', '127.0.0.1', '-p', $self->{port},
		'-a', $self->{password}, '--no-auth-warning', '--pipe');
	my ($out, $err) = ('', '');
	IPC::Run::run(\@cmd, '<', \"*3\r\n$command", '>', \$out, '2>', \$err)
	  or die "redis-cli --pipe failed: $err";
	die "SET of a binary key: $out" unless $out =~ /errors: 0, replies: 1/;
}

sub del
{
	my ($self, @keys) = @_;
	$self->cli('DEL', @keys);
}

sub DESTROY
{
	my ($self) = @_;
	$self->stop;
}

1;
