#!/usr/bin/env bash
# A single-node Apache Kafka broker (KRaft: broker and controller in one JVM)
# on 127.0.0.1 for the tests, the demo and the benchmark of dwh.  Debian has
# no Kafka package: `fetch` resolves the official jars from Maven Central
# (tools/kafka/pom.xml) into a cache folder that every user can read, and the
# other subcommands run the broker from there as the current user, with its
# configuration, data, logs and pid in a folder of its own.
#
# Usage: kafka.sh fetch
#        kafka.sh start DIR [--port N] [--sasl-port N] [--partitions N]
#        kafka.sh stop|kill|restart|status DIR
#        kafka.sh bootstrap DIR [--sasl]
#        kafka.sh create-topic DIR TOPIC [PARTITIONS] [TopicCommand options...]
#        kafka.sh tool CLASS [ARGS...]
# Run `kafka.sh help` for the details and the environment variables.

set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
readonly here
readonly jars=${DWH_KAFKA_JARS:-/var/cache/dwh/kafka-libs}
readonly m2=${DWH_KAFKA_M2:-$(dirname "$jars")/m2}
readonly host=127.0.0.1
readonly start_timeout=${DWH_KAFKA_START_TIMEOUT:-90}
readonly stop_timeout=${DWH_KAFKA_STOP_TIMEOUT:-30}
readonly heap=${DWH_KAFKA_HEAP:-512m}
readonly sasl_user_default=dwh
readonly sasl_password_default=dwh-test-secret
readonly kafka_version_hint=3.9

usage()
{
	cat <<EOF
Usage: $(basename "$0") COMMAND ...

  fetch
	Resolve the Kafka ${kafka_version_hint} jars (tools/kafka/pom.xml) from Maven
	Central into \$DWH_KAFKA_JARS (default /var/cache/dwh/kafka-libs), readable
	by every user.  Skipped when the folder is complete for this pom.xml.
	Needs java and mvn; run it as root for the default folder.

  start DIR [--port N] [--sasl-port N] [--partitions N]
	Set up DIR on first use (configuration, TLS files, storage format), start
	the broker in the background as the current user and wait until it
	answers.  --port: the PLAINTEXT client port (default: a free one).
	--sasl-port: also listen for SASL_SSL clients (SCRAM-SHA-512, user
	\$DWH_KAFKA_SASL_USER / \$DWH_KAFKA_SASL_PASSWORD, default
	${sasl_user_default} / ${sasl_password_default}); the test CA is written to DIR/ca.pem and
	a kcat configuration to DIR/kcat-sasl.conf (kcat -F DIR/kcat-sasl.conf).
	--partitions: num.partitions, the default of create-topic (default 1).
	On a DIR already set up, start reuses its ports and data (the options
	must then be absent or equal to the saved ones).
	Topics are not created automatically: create each with create-topic.

  stop DIR       SIGTERM, SIGKILL after \$DWH_KAFKA_STOP_TIMEOUT s (default ${stop_timeout}).
  kill DIR       SIGKILL at once (a crash).
  restart DIR    stop if running, then start again on the same ports and data.
  status DIR     print the state; exit 0 when running, 3 when not.
  bootstrap DIR [--sasl]
	print host:port of the PLAINTEXT (or SASL_SSL) listener.
  create-topic DIR TOPIC [PARTITIONS] [TopicCommand options...]
	create TOPIC with replication factor 1 and PARTITIONS partitions
	(default: the broker's --partitions), e.g. --config retention.ms=-1.
  tool CLASS [ARGS...]
	run a Kafka command-line class with the cached jars, e.g.
	org.apache.kafka.tools.consumer.group.ConsumerGroupCommand.

Files in DIR: server.properties, log4j.properties, broker.env (saved
settings), data/ (log.dirs), logs/server.log, logs/stdout.log, kafka.pid;
with --sasl-port also tls/, ca.pem, kcat-sasl.conf.

Environment: DWH_KAFKA_JARS, DWH_KAFKA_M2 (Maven local repository, default
next to the jars), DWH_KAFKA_HEAP (default ${heap}), DWH_KAFKA_JAVA_OPTS,
DWH_KAFKA_START_TIMEOUT (default ${start_timeout} s), DWH_KAFKA_STOP_TIMEOUT,
DWH_KAFKA_SASL_USER, DWH_KAFKA_SASL_PASSWORD, DWH_KAFKA_CDS=0 (ignore the
class archive that fetch writes next to the jars).
EOF
}

die()
{
	echo "kafka.sh: $*" >&2
	exit 1
}

note()
{
	echo "kafka.sh: $*" >&2
}

need()
{
	command -v "$1" >/dev/null 2>&1 ||
		die "$1 is not installed (run tools/install-deps.sh as root)"
}

java_bin()
{
	if [[ -n ${JAVA_HOME:-} && -x $JAVA_HOME/bin/java ]]; then
		echo "$JAVA_HOME/bin/java"
	else
		need java
		command -v java
	fi
}

# ---------------------------------------------------------------- fetch

# The stamp holds the checksum of the pom that filled the folder and the
# Java version (the class archive is only valid for the JVM that wrote
# it), so that a new pom.xml or a JDK upgrade fetches again.
pom_sum()
{
	{
		cat "$here/pom.xml"
		"$(java_bin)" -version 2>&1
	} | sha256sum | cut -d' ' -f1
}

jars_complete()
{
	[[ -f $jars/.complete && $(cat "$jars/.complete") == "$(pom_sum)" ]]
}

cmd_fetch()
{
	[[ $# -eq 0 ]] || die "fetch takes no arguments"
	if jars_complete; then
		echo "kafka.sh: jars already in $jars"
		return 0
	fi
	java_bin >/dev/null
	need mvn
	umask 022
	local parent
	parent=$(dirname "$jars")
	mkdir -p "$parent" ||
		die "cannot create $parent: run fetch as root or set DWH_KAFKA_JARS to a folder of yours"
	[[ -w $parent ]] ||
		die "$parent is not writable: run fetch as root or set DWH_KAFKA_JARS to a folder of yours"

	# One fetch at a time; the second one finds the folder complete.
	exec 9>"$parent/.kafka-fetch.lock"
	flock 9
	if jars_complete; then
		echo "kafka.sh: jars already in $jars"
		return 0
	fi

	# Maven writes target/ next to the pom: work on a copy so that the
	# source tree stays clean (and may be read-only).
	local work
	work=$(mktemp -d "$parent/.kafka-fetch.XXXXXX")
	fetch_work=$work
	trap 'rm -rf "$fetch_work"' EXIT
	cp "$here/pom.xml" "$work/pom.xml"
	echo "kafka.sh: resolving Kafka jars into $jars (Maven repository $m2)"
	# Maven's output goes to a log, shown only on failure (Debian's mvn
	# writes colour codes even with -B).
	if ! mvn -q -B -Dstyle.color=never -f "$work/pom.xml" -Dmaven.repo.local="$m2" \
		dependency:copy-dependencies -DincludeScope=runtime \
		-DoutputDirectory="$work/libs" </dev/null >"$work/mvn.log" 2>&1; then
		sed 's/\x1b\[[0-9;]*m//g' "$work/mvn.log" | tail -n 40 >&2
		die "mvn could not resolve the Kafka jars (is Maven Central reachable?)"
	fi
	compgen -G "$work/libs/kafka_2.13-*.jar" >/dev/null ||
		die "mvn finished but $work/libs has no kafka_2.13 jar"
	chmod -R a+rX "$work/libs"
	# Swap the folder in whole: a reader never sees half of it.
	rm -rf "$jars"
	mv "$work/libs" "$jars"
	rm -rf "$work"
	chmod a+rx "$parent"
	echo "kafka.sh: $(find "$jars" -name "*.jar" | wc -l) jars in $jars"
	pom_sum >"$jars/.complete"
	chmod a+r "$jars/.complete"
	# Brokers started meanwhile simply run without the archive.
	make_class_archive
}

# A class data sharing archive of the broker's classes (JDK 17 dynamic
# AppCDS) cuts its startup CPU by a third or more (3.3 s to 1.8-2.3 s on a
# 2-core machine).  It is written by a throw-away broker as it exits, for
# the jars' final paths.
# Best effort: without it the broker starts all the same, only slower.
make_class_archive()
{
	local tmp archive=$jars/kafka-classes.jsa
	rm -f "$archive"
	tmp=$(mktemp -d)
	echo "kafka.sh: writing the class archive $archive"
	# shellcheck disable=SC2030 # launch reads it in the same subshell
	if (
		cds_dump=$archive.tmp
		setup "$tmp" "" "" ""
		launch "$tmp"
		cmd_stop "$tmp"
	) >"$tmp.log" 2>&1 && [[ -s $archive.tmp ]]; then
		mv "$archive.tmp" "$archive"
		chmod a+r "$archive"
	else
		note "no class archive (the broker will start more slowly):"
		tail -n 20 "$tmp.log" >&2 || true
		rm -f "$archive.tmp"
	fi
	rm -rf "$tmp" "$tmp.log"
}

# ---------------------------------------------------------------- helpers

need_jars()
{
	[[ -f $jars/.complete ]] ||
		die "no Kafka jars in $jars: run 'tools/kafka/kafka.sh fetch' as root (or set DWH_KAFKA_JARS)"
	[[ -r $jars/.complete ]] || die "$jars is not readable by $(id -un)"
}

# An absolute DIR: the pid check matches it in the java command line.
# Only start creates it.
abs_dir()
{
	[[ -n ${1:-} ]] || die "missing DIR"
	if [[ ${2:-} == create ]]; then
		mkdir -p "$1" || die "cannot create $1"
	fi
	[[ -d $1 ]] || die "no such folder: $1"
	(cd "$1" && pwd -P)
}

# A free TCP port on the loopback interface, chosen by the kernel.
free_port()
{
	/usr/bin/python3 -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])'
}

check_port()
{
	[[ $2 =~ ^[0-9]+$ && $2 -ge 1 && $2 -le 65535 ]] || die "$1 must be a TCP port, not '$2'"
}

# Log settings of the command-line tools: warnings only, to stderr.
tools_log4j()
{
	local f=$1
	cat >"$f" <<'EOF'
log4j.rootLogger=WARN, stderr
log4j.appender.stderr=org.apache.log4j.ConsoleAppender
log4j.appender.stderr.Target=System.err
log4j.appender.stderr.layout=org.apache.log4j.PatternLayout
log4j.appender.stderr.layout.ConversionPattern=[%d] %p %m (%c)%n
EOF
}

# Run a Kafka tool class.  Short-lived JVMs start faster with the client
# compiler only and a serial collector.
run_tool()
{
	local log4j=$1
	shift
	"$(java_bin)" -Xmx256m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 -XX:-UsePerfData \
		-Djava.awt.headless=true -Dlog4j.configuration="file:$log4j" \
		-cp "$jars/*" "$@" </dev/null
}

# True when pid $1 is a live (not zombie) java broker of DIR $2.
broker_alive()
{
	local pid=$1 dir=$2 state
	[[ $pid =~ ^[0-9]+$ && -r /proc/$pid/stat ]] || return 1
	# A zombie still answers kill -0; its state letter is Z.
	state=$(sed 's/^.*) //' "/proc/$pid/stat" 2>/dev/null | cut -d' ' -f1) || return 1
	[[ $state != Z && $state != X ]] || return 1
	tr '\0' '\n' <"/proc/$pid/cmdline" 2>/dev/null | grep -qxF -- "-Ddwh.kafka.dir=$dir"
}

# The pid of DIR's running broker, or nothing.
running_pid()
{
	local dir=$1 pid
	[[ -f $dir/kafka.pid ]] || return 0
	pid=$(cat "$dir/kafka.pid")
	if broker_alive "$pid" "$dir"; then
		echo "$pid"
	fi
}

load_env()
{
	local dir=$1
	[[ -f $dir/broker.env && -f $dir/.formatted ]] ||
		die "$dir is not a broker folder (run 'kafka.sh start $dir' first)"
	# shellcheck disable=SC1091
	source "$dir/broker.env"
}

log_tail()
{
	local dir=$1 errors
	# The cause is among the first errors; the last lines are the shutdown.
	errors=$(grep -E '^\[[^]]*\] (ERROR|FATAL) |^[A-Za-z0-9_.$]+(Exception|Error): ' "$dir/logs/server.log" 2>/dev/null | tail -n 10 || true)
	if [[ -n $errors ]]; then
		echo "---- last errors in $dir/logs/server.log ----" >&2
		printf '%s\n' "$errors" | cut -c1-600 >&2
	fi
	echo "---- last lines of $dir/logs/server.log ----" >&2
	tail -n 15 "$dir/logs/server.log" 2>/dev/null | cut -c1-300 >&2 || true
	if [[ -s $dir/logs/stdout.log ]]; then
		echo "---- last lines of $dir/logs/stdout.log ----" >&2
		tail -n 20 "$dir/logs/stdout.log" >&2 || true
	fi
}

# ---------------------------------------------------------------- setup

# A test CA and a broker certificate for 127.0.0.1 and localhost (clients
# verify the host name), as a PKCS12 keystore for the broker's JVM.  Elliptic
# keys: generated in milliseconds.
make_tls()
{
	local dir=$1 pass=$2 t=$1/tls
	need openssl
	mkdir -p "$t"
	chmod 700 "$t"
	openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
		-keyout "$t/ca.key" -out "$t/ca.pem" -days 3650 -subj "/CN=dwh test CA" \
		-addext "basicConstraints=critical,CA:TRUE" \
		-addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null ||
		die "openssl could not make the test CA"
	openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
		-keyout "$t/broker.key" -out "$t/broker.csr" -subj "/CN=localhost" 2>/dev/null ||
		die "openssl could not make the broker key"
	printf '%s\n' \
		"subjectAltName=IP:127.0.0.1,DNS:localhost" \
		"basicConstraints=CA:FALSE" \
		"keyUsage=critical,digitalSignature,keyEncipherment" \
		"extendedKeyUsage=serverAuth" >"$t/broker.ext"
	openssl x509 -req -in "$t/broker.csr" -CA "$t/ca.pem" -CAkey "$t/ca.key" \
		-CAcreateserial -days 3650 -extfile "$t/broker.ext" -out "$t/broker.pem" 2>/dev/null ||
		die "openssl could not sign the broker certificate"
	openssl pkcs12 -export -in "$t/broker.pem" -inkey "$t/broker.key" \
		-certfile "$t/ca.pem" -name broker -out "$t/broker.p12" \
		-passout "pass:$pass" ||
		die "openssl could not write the broker keystore"
	cp "$t/ca.pem" "$dir/ca.pem"
	chmod 644 "$dir/ca.pem"
}

write_config()
{
	local dir=$1
	local listeners="PLAINTEXT://$host:$PORT,CONTROLLER://$host:$CONTROLLER_PORT"
	local advertised="PLAINTEXT://$host:$PORT"
	local protocols="PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT"
	if [[ -n $SASL_PORT ]]; then
		listeners+=",SASL_SSL://$host:$SASL_PORT"
		advertised+=",SASL_SSL://$host:$SASL_PORT"
		protocols+=",SASL_SSL:SASL_SSL"
	fi
	cat >"$dir/server.properties" <<EOF
# Written by tools/kafka/kafka.sh: a one-node KRaft cluster for tests.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@$host:$CONTROLLER_PORT
controller.listener.names=CONTROLLER
listeners=$listeners
advertised.listeners=$advertised
listener.security.protocol.map=$protocols
inter.broker.listener.name=PLAINTEXT
log.dirs=$dir/data

# Tests create every topic they use, with the partitions they mean: a
# misspelt topic fails instead of appearing empty.
auto.create.topics.enable=false
num.partitions=$PARTITIONS
default.replication.factor=1
min.insync.replicas=1

# One node: internal topics with one replica, few partitions (created fast).
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=4
# Consumers join at once instead of after 3 s.
group.initial.rebalance.delay.ms=0
# After a kill -9 the controller refuses the broker's new incarnation until
# the old one's session expires (default 9 s): keep it short so that crash
# tests restart fast, with heartbeats often enough for a loaded machine.
broker.session.timeout.ms=3000
broker.heartbeat.interval.ms=500

# A 2-core machine that may run several brokers.
num.network.threads=2
num.io.threads=2
background.threads=2
num.recovery.threads.per.data.dir=1
log.cleaner.threads=1
# Keep every message: tests may produce records with old timestamps.
log.retention.ms=-1
log.segment.bytes=134217728
EOF
	if [[ -n $SASL_PORT ]]; then
		cat >>"$dir/server.properties" <<EOF

# SASL_SSL clients: SCRAM-SHA-512 over TLS with the test CA of ca.pem.
sasl.enabled.mechanisms=SCRAM-SHA-512
listener.name.sasl_ssl.sasl.enabled.mechanisms=SCRAM-SHA-512
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.sasl_ssl.ssl.keystore.type=PKCS12
listener.name.sasl_ssl.ssl.keystore.location=$dir/tls/broker.p12
listener.name.sasl_ssl.ssl.keystore.password=$KEYSTORE_PASSWORD
listener.name.sasl_ssl.ssl.key.password=$KEYSTORE_PASSWORD
listener.name.sasl_ssl.ssl.client.auth=none
EOF
		# kcat -F: every librdkafka setting a SASL_SSL client needs.
		cat >"$dir/kcat-sasl.conf" <<EOF
bootstrap.servers=$host:$SASL_PORT
security.protocol=SASL_SSL
sasl.mechanisms=SCRAM-SHA-512
sasl.username=$SASL_USER
sasl.password=$SASL_PASSWORD
ssl.ca.location=$dir/ca.pem
EOF
	fi
	cat >"$dir/log4j.properties" <<'EOF'
log4j.rootLogger=INFO, file
log4j.appender.file=org.apache.log4j.FileAppender
log4j.appender.file.File=${kafka.logs.dir}/server.log
log4j.appender.file.Append=true
log4j.appender.file.layout=org.apache.log4j.PatternLayout
log4j.appender.file.layout.ConversionPattern=[%d] %p %m (%c)%n
log4j.logger.kafka.request.logger=WARN
log4j.logger.state.change.logger=WARN
log4j.logger.kafka.log.LogCleaner=WARN
log4j.logger.org.apache.kafka.storage.internals.log.LogConfig=WARN
log4j.logger.kafka.server.KafkaConfig=WARN
log4j.logger.org.apache.kafka.clients.admin.AdminClientConfig=WARN
EOF
	tools_log4j "$dir/tools-log4j.properties"
}

save_env()
{
	local dir=$1 v
	{
		for v in PORT CONTROLLER_PORT SASL_PORT PARTITIONS SASL_USER SASL_PASSWORD \
			KEYSTORE_PASSWORD; do
			printf '%s=%q\n' "$v" "${!v}"
		done
	} >"$dir/broker.env"
}

# First start of DIR: settings, TLS, configuration, storage format.
setup()
{
	local dir=$1 port=$2 sasl_port=$3 partitions=$4
	PORT=${port:-$(free_port)}
	CONTROLLER_PORT=$(free_port)
	while [[ $CONTROLLER_PORT == "$PORT" || $CONTROLLER_PORT == "$sasl_port" ]]; do
		CONTROLLER_PORT=$(free_port)
	done
	SASL_PORT=$sasl_port
	PARTITIONS=${partitions:-1}
	SASL_USER=${DWH_KAFKA_SASL_USER:-$sasl_user_default}
	SASL_PASSWORD=${DWH_KAFKA_SASL_PASSWORD:-$sasl_password_default}
	KEYSTORE_PASSWORD=dwh-test-keystore
	[[ $PORT != "$SASL_PORT" ]] || die "--port and --sasl-port must differ"
	if [[ -n $SASL_PORT ]]; then
		# The storage tool parses name=...,password=... inside [...].
		[[ $SASL_USER =~ ^[A-Za-z0-9_.@-]+$ ]] ||
			die "DWH_KAFKA_SASL_USER may hold only letters, digits and _ . @ -"
		[[ -n $SASL_PASSWORD && $SASL_PASSWORD != *[],[\"\ =]* ]] ||
			die "DWH_KAFKA_SASL_PASSWORD must be non-empty without , [ ] = \" or spaces"
	fi

	# A half-done setup (a failed format) is redone from scratch; anything
	# else in a non-empty DIR is not ours to delete.
	if [[ -n $(ls -A "$dir") ]] &&
		! grep -qs '^# Written by tools/kafka/kafka.sh' "$dir/server.properties"; then
		die "$dir is not empty and not a broker folder of kafka.sh: give an empty or new DIR"
	fi
	rm -rf "$dir/data" "$dir/tls" "$dir/ca.pem" "$dir/kcat-sasl.conf" "$dir/broker.env"
	mkdir -p "$dir/data" "$dir/logs"
	[[ -z $SASL_PORT ]] || make_tls "$dir" "$KEYSTORE_PASSWORD"
	write_config "$dir"

	# A cluster id is 16 random bytes in URL-safe base64 without padding
	# (what kafka-storage random-uuid prints, without starting a JVM).
	local cluster_id
	cluster_id=$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=')
	while [[ $cluster_id == -* ]]; do
		cluster_id=$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=')
	done
	local format=(kafka.tools.StorageTool format -t "$cluster_id"
		-c "$dir/server.properties")
	if [[ -n $SASL_PORT ]]; then
		format+=(--add-scram "SCRAM-SHA-512=[name=$SASL_USER,password=$SASL_PASSWORD]")
	fi
	if ! run_tool "$dir/tools-log4j.properties" "${format[@]}" >"$dir/logs/format.log" 2>&1; then
		cat "$dir/logs/format.log" >&2
		die "formatting the storage of $dir failed"
	fi
	save_env "$dir"
	touch "$dir/.formatted"
}

# ---------------------------------------------------------------- start

# Start the JVM of a set-up DIR and wait until the broker answers.
launch()
{
	local dir=$1 pid java
	java=$(java_bin)
	load_env "$dir"
	local started_before
	started_before=$(grep -c 'Kafka Server started' "$dir/logs/server.log" 2>/dev/null || true)
	# Small heap; a serial collector leaves the second core to PostgreSQL.
	local opts=(-Xms64m "-Xmx$heap" -XX:+UseSerialGC -XX:-UsePerfData -Djava.awt.headless=true
		-Dlog4j.configuration="file:$dir/log4j.properties"
		-Dkafka.logs.dir="$dir/logs" -Ddwh.kafka.dir="$dir")
	# The class archive of fetch; a JVM that cannot use it (another JDK)
	# says so in stdout.log and starts without it.
	# shellcheck disable=SC2031 # set by make_class_archive's subshell
	if [[ -n ${cds_dump:-} ]]; then
		opts+=("-XX:ArchiveClassesAtExit=$cds_dump")
	elif [[ ${DWH_KAFKA_CDS:-1} != 0 && -r $jars/kafka-classes.jsa ]]; then
		opts+=(-Xshare:auto "-XX:SharedArchiveFile=$jars/kafka-classes.jsa")
	fi
	# shellcheck disable=SC2206
	[[ -z ${DWH_KAFKA_JAVA_OPTS:-} ]] || opts+=($DWH_KAFKA_JAVA_OPTS)
	local t0=$SECONDS t0_real=$EPOCHREALTIME
	# setsid: the broker outlives this script and is not hit by a Ctrl-C
	# meant for the caller; nothing of ours stays open in it.
	setsid "$java" "${opts[@]}" -cp "$jars/*" kafka.Kafka "$dir/server.properties" \
		</dev/null >>"$dir/logs/stdout.log" 2>&1 &
	pid=$!
	echo "$pid" >"$dir/kafka.pid"

	local probe=()
	if command -v kcat >/dev/null 2>&1; then
		probe=(kcat -L -b "$host:$PORT" -m 2)
	fi
	while :; do
		if ! broker_alive "$pid" "$dir"; then
			# Looked at once more before giving up: a broker found running a
			# minute later was once reported gone here (the cause is not
			# known; what /proc showed is printed when it happens).
			sleep 0.5
			if ! broker_alive "$pid" "$dir"; then
				log_tail "$dir"
				rm -f "$dir/kafka.pid"
				die "the broker of $dir exited during startup"
			fi
			echo "kafka.sh: broker pid $pid looked gone during startup but runs:" \
				"$(head -c 120 "/proc/$pid/stat" 2>&1)" >&2
		fi
		local started
		started=$(grep -c 'Kafka Server started' "$dir/logs/server.log" 2>/dev/null || true)
		if [[ ${started:-0} -gt ${started_before:-0} ]]; then
			# The log says so; a metadata request proves the listener serves.
			if [[ ${#probe[@]} -eq 0 ]] || "${probe[@]}" >/dev/null 2>&1; then
				break
			fi
		fi
		if ((SECONDS - t0 >= start_timeout)); then
			log_tail "$dir"
			kill -KILL "$pid" 2>/dev/null || true
			rm -f "$dir/kafka.pid"
			die "the broker of $dir did not answer within ${start_timeout} s (killed)"
		fi
		sleep 0.2
	done
	local ms=$(((${EPOCHREALTIME/./} - ${t0_real/./}) / 1000))
	local msg
	msg=$(printf 'broker pid %s up in %d.%01d s, PLAINTEXT %s' "$pid" $((ms / 1000)) \
		$((ms % 1000 / 100)) "$host:$PORT")
	[[ -z $SASL_PORT ]] || msg+=", SASL_SSL $host:$SASL_PORT"
	echo "kafka.sh: $msg"
}

cmd_start()
{
	local dir port="" sasl_port="" partitions=""
	[[ -n ${1:-} ]] || die "missing DIR"
	need_jars
	dir=$(abs_dir "$1" create)
	shift
	while [[ $# -gt 0 ]]; do
		case $1 in
		--port)
			[[ $# -ge 2 ]] || die "--port needs a value"
			check_port --port "$2"
			port=$2
			shift 2
			;;
		--sasl-port)
			[[ $# -ge 2 ]] || die "--sasl-port needs a value"
			check_port --sasl-port "$2"
			sasl_port=$2
			shift 2
			;;
		--partitions)
			[[ $# -ge 2 && $2 =~ ^[1-9][0-9]*$ ]] || die "--partitions needs a positive integer"
			partitions=$2
			shift 2
			;;
		*) die "start: unknown option '$1' (see kafka.sh help)" ;;
		esac
	done

	local pid
	pid=$(running_pid "$dir")
	[[ -z $pid ]] || die "a broker of $dir is already running (pid $pid)"

	if [[ -f $dir/.formatted && -f $dir/broker.env ]]; then
		# Set up before: the saved settings win, and must not contradict.
		load_env "$dir"
		[[ -z $port || $port == "$PORT" ]] ||
			die "$dir was set up with --port $PORT, not $port (use a new DIR)"
		[[ -z $sasl_port || $sasl_port == "$SASL_PORT" ]] ||
			die "$dir was set up with --sasl-port ${SASL_PORT:-(none)}, not $sasl_port (use a new DIR)"
		[[ -z $partitions || $partitions == "$PARTITIONS" ]] ||
			die "$dir was set up with --partitions $PARTITIONS, not $partitions (use a new DIR)"
	else
		setup "$dir" "$port" "$sasl_port" "$partitions"
	fi
	launch "$dir"
}

# ---------------------------------------------------------------- stop

wait_gone()
{
	local pid=$1 dir=$2 seconds=$3 t0=$SECONDS
	while broker_alive "$pid" "$dir"; do
		((SECONDS - t0 < seconds)) || return 1
		sleep 0.1
	done
}

cmd_stop()
{
	local dir pid
	dir=$(abs_dir "${1:-}")
	pid=$(running_pid "$dir")
	if [[ -z $pid ]]; then
		rm -f "$dir/kafka.pid"
		echo "kafka.sh: no broker running in $dir"
		return 0
	fi
	kill -TERM "$pid" 2>/dev/null || true
	if ! wait_gone "$pid" "$dir" "$stop_timeout"; then
		note "broker pid $pid did not stop within ${stop_timeout} s: killing it"
		kill -KILL "$pid" 2>/dev/null || true
		wait_gone "$pid" "$dir" 10 || die "broker pid $pid survives SIGKILL"
	fi
	rm -f "$dir/kafka.pid"
	echo "kafka.sh: broker pid $pid stopped"
}

cmd_kill()
{
	local dir pid
	dir=$(abs_dir "${1:-}")
	pid=$(running_pid "$dir")
	if [[ -z $pid ]]; then
		rm -f "$dir/kafka.pid"
		echo "kafka.sh: no broker running in $dir"
		return 0
	fi
	kill -KILL "$pid" 2>/dev/null || true
	wait_gone "$pid" "$dir" 10 || die "broker pid $pid survives SIGKILL"
	rm -f "$dir/kafka.pid"
	echo "kafka.sh: broker pid $pid killed"
}

cmd_restart()
{
	local dir
	dir=$(abs_dir "${1:-}")
	[[ $# -le 1 ]] || die "restart takes only DIR (the saved settings are reused)"
	load_env "$dir"
	need_jars
	cmd_stop "$dir"
	launch "$dir"
}

cmd_status()
{
	local dir pid
	[[ -n ${1:-} ]] || die "missing DIR"
	if [[ ! -f $1/.formatted ]]; then
		echo "not set up: $1"
		return 3
	fi
	dir=$(abs_dir "$1")
	load_env "$dir"
	pid=$(running_pid "$dir")
	if [[ -z $pid ]]; then
		echo "stopped: $dir"
		return 3
	fi
	local msg="running: pid $pid, PLAINTEXT $host:$PORT"
	[[ -z $SASL_PORT ]] || msg+=", SASL_SSL $host:$SASL_PORT"
	echo "$msg"
}

cmd_bootstrap()
{
	local dir
	dir=$(abs_dir "${1:-}")
	load_env "$dir"
	case ${2:-} in
	"") echo "$host:$PORT" ;;
	--sasl)
		[[ -n $SASL_PORT ]] || die "$dir has no SASL_SSL listener (start it with --sasl-port)"
		echo "$host:$SASL_PORT"
		;;
	*) die "bootstrap: unknown option '$2'" ;;
	esac
}

cmd_create_topic()
{
	local dir topic partitions
	dir=$(abs_dir "${1:-}")
	topic=${2:-}
	[[ -n $topic ]] || die "usage: kafka.sh create-topic DIR TOPIC [PARTITIONS] [options]"
	shift 2
	load_env "$dir"
	need_jars
	partitions=$PARTITIONS
	if [[ $# -gt 0 && $1 =~ ^[0-9]+$ ]]; then
		[[ $1 -ge 1 ]] || die "PARTITIONS must be at least 1"
		partitions=$1
		shift
	fi
	[[ -n $(running_pid "$dir") ]] || die "no broker running in $dir"
	run_tool "$dir/tools-log4j.properties" org.apache.kafka.tools.TopicCommand \
		--bootstrap-server "$host:$PORT" --create --topic "$topic" \
		--partitions "$partitions" --replication-factor 1 "$@" ||
		die "could not create topic $topic"
}

cmd_tool()
{
	[[ $# -ge 1 ]] || die "usage: kafka.sh tool CLASS [ARGS...]"
	need_jars
	local log4j
	log4j=$(mktemp)
	tools_log4j "$log4j"
	local rc=0
	run_tool "$log4j" "$@" || rc=$?
	rm -f "$log4j"
	return "$rc"
}

main()
{
	local cmd=${1:-help}
	[[ $# -eq 0 ]] || shift
	case $cmd in
	fetch) cmd_fetch "$@" ;;
	start) cmd_start "$@" ;;
	stop) cmd_stop "$@" ;;
	kill) cmd_kill "$@" ;;
	restart) cmd_restart "$@" ;;
	status) cmd_status "$@" ;;
	bootstrap) cmd_bootstrap "$@" ;;
	create-topic) cmd_create_topic "$@" ;;
	tool) cmd_tool "$@" ;;
	help | -h | --help) usage ;;
	*)
		usage >&2
		die "unknown command '$cmd'"
		;;
	esac
}

main "$@"
