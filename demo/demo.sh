#!/usr/bin/env bash
# Local demo of dwh, end to end: installs what it needs (tools/install-deps.sh),
# builds and installs the extension, then starts under .demo/ (never a system
# cluster) a PostgreSQL cluster with dwh preloaded, a redis-server and a
# one-node Kafka broker on loopback.  It loads the dictionaries into Redis
# and waits until the Redis worker has mirrored them, backfills orders
# produced to Kafka by the generator (tools/dwh-gen: duplicates, status
# changes, cancelled and a few malformed messages), then streams new orders
# live at a fixed rate, with a progress line.  Before the stream it defines
# three user tag rules (dwh.tag_rules, docs/tags.md): "pizza lover" (orders
# with a dish of Выпечка), "regular" (orders dated in the last 30 days) and
# "favourite" (the favourite category); the orders of a run are dated up to
# about now, so that the 30-day window holds them.  Once the lag is 0 it
# shows the marts, dwh.status, the dead letters, the tags per rule and the
# latest tag events.  It fails (exit 1) when dwh.verify() (which recounts
# the tags too) is not empty, a mart is empty, a rule has no holder, the lag
# does not reach 0 in time, or the warehouse disagrees with the generator's
# counts (orders, dead letters = malformed lines, sums of the marts).
# Everything keeps running; a second run reuses it (cluster, Redis, broker,
# topic, data) and adds orders with new object_ids.
#
# Usage, as root (a user with sudo is re-run under sudo):
#   demo/demo.sh           set up or reuse, load, stream, show
#   demo/demo.sh stop      stop PostgreSQL, Redis and Kafka of the demo
#
# Environment:
#   PG_CONFIG          pg_config of the PostgreSQL 15 to use
#                      (default /usr/lib/postgresql/15/bin/pg_config)
#   DEMO_ORDERS        orders of the backfill (default 50000)
#   DEMO_RATE          messages a second of the live stream (default 500)
#   DEMO_LIVE_SECONDS  length of the live stream: DEMO_RATE x DEMO_LIVE_SECONDS
#                      orders, a little longer with their extra versions
#                      (default 15; 0: no live stream)
#   DEMO_CONSUMERS     Kafka workers, dwh.kafka_consumers (default 2)
#   DEMO_PARTITIONS    partitions of the topic, on its creation (default 4)
#   DEMO_PORT          PostgreSQL port; the server listens only on its unix
#                      socket in .demo/run (default 54329)
#   DEMO_REDIS_PORT    Redis port on 127.0.0.1 (default: a free one)
#   DEMO_KAFKA_PORT    Kafka port on 127.0.0.1 (default: a free one)
#                      The ports are chosen on the first run and kept.
#   DEMO_MIN_ORDERS    threshold of the "pizza lover" tag: orders with a dish
#                      of Выпечка (default: the orders in STG after this run
#                      / 140, about twice the average user's, at least 10)
#   DEMO_REGULAR_ORDERS  threshold of the "regular" tag: orders dated in the
#                      last 30 days (default: the orders in STG after this
#                      run / 100, about the average user's, at least 10)
#   DEMO_TIMEOUT       seconds allowed for the lag to reach 0 (default 600)
#   DEMO_DIR           folder of the services and data (default .demo at the
#                      root of the tree); another folder, with other ports,
#                      runs a second demo beside the first
#   DEMO_SKIP_INSTALL  1: neither build nor install dwh; run the dwh that
#                      PG_CONFIG's installation holds (default 0)

set -euo pipefail
shopt -s nullglob

script=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")
root=$(cd "$(dirname "$script")/.." && pwd)
orders=${DEMO_ORDERS:-50000}
rate=${DEMO_RATE:-500}
live_seconds=${DEMO_LIVE_SECONDS:-15}
consumers=${DEMO_CONSUMERS:-2}
partitions=${DEMO_PARTITIONS:-4}
min_orders=${DEMO_MIN_ORDERS:-}
regular_orders=${DEMO_REGULAR_ORDERS:-}
skip_install=${DEMO_SKIP_INSTALL:-0}
timeout=${DEMO_TIMEOUT:-600}
topic=order-service_orders
database=dwh_demo
# PostgreSQL and Kafka run as postgres (initdb refuses root), Redis as
# nobody: without a password, a Redis client may make the server write
# files (CONFIG SET dir), so it must not run as a user who owns any.
pg_user=postgres
redis_user=nobody
python3=/usr/bin/python3

# Predictable output and no connection settings from the caller's
# environment (PG_CONFIG aside).
export LC_ALL=C.UTF-8
for v in $(compgen -e | grep '^PG[A-Z]' || true); do
	unset "$v"
done

die()
{
	echo "demo.sh: $*" >&2
	exit 1
}

step()
{
	echo "== $*"
}

for v in orders rate live_seconds consumers partitions timeout; do
	[[ ${!v} =~ ^[0-9]+$ ]] || die "DEMO_${v^^} must be a whole number, not '${!v}'"
done
[[ $min_orders =~ ^[0-9]*$ ]] || die "DEMO_MIN_ORDERS must be a whole number, not '$min_orders'"
[[ $regular_orders =~ ^[0-9]*$ ]] ||
	die "DEMO_REGULAR_ORDERS must be a whole number, not '$regular_orders'"
[[ $skip_install =~ ^[01]$ ]] || die "DEMO_SKIP_INSTALL must be 0 or 1, not '$skip_install'"
((orders > 0 || live_seconds > 0)) || die "nothing to do: DEMO_ORDERS and DEMO_LIVE_SECONDS are 0"

# Root is needed for apt-get and make install; re-run under sudo, keeping
# the settings of this file.
if [[ $(id -u) -ne 0 ]]; then
	command -v sudo >/dev/null 2>&1 ||
		die "run as root: it installs packages and the extension"
	keep=()
	for v in $(compgen -e | grep -E '^(DEMO_|PG_CONFIG$)'); do
		keep+=("$v=${!v}")
	done
	exec sudo env "${keep[@]}" bash "$script" "$@"
fi

PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}

# Run as postgres, from / (the tree may be closed to it); fd 9 holds the
# lock of this run: the services must not inherit it.
as_pg() { (cd / && runuser -u "$pg_user" -- "$@" 9>&-); }
kafka()
{
	local sh=$demo/bin/kafka.sh
	[[ -f $sh ]] || sh=$root/tools/kafka/kafka.sh
	as_pg bash "$sh" "$@"
}
# The time in microseconds, and microseconds as seconds with one decimal.
now_us() { echo "${EPOCHREALTIME/./}"; }
seconds() { printf '%d.%d' $(($1 / 1000000)) $(($1 % 1000000 / 100000)); }
# Commas every three digits.
num() { sed -E ':a; s/([0-9])([0-9]{3})($|[^0-9])/\1,\2\3/; ta' <<<"$1"; }

# ---------------------------------------------------------------- services

# Set demo to the real path of .demo (or of DEMO_DIR).  The services run as
# postgres and nobody: in a tree they cannot enter (a clone under /root),
# .demo is made a link to a folder of /var/tmp, the same for every run of
# this tree.
place_demo()
{
	local real
	if [[ -n ${DEMO_DIR:-} ]]; then
		mkdir -p "$DEMO_DIR"
		demo=$(cd "$DEMO_DIR" && pwd -P)
		if ! { runuser -u "$pg_user" -- test -x "$demo" && runuser -u "$redis_user" -- test -x "$demo"; }; then
			die "$pg_user and $redis_user must be able to enter DEMO_DIR ($demo)"
		fi
	elif [[ ! -e $root/.demo && ! -L $root/.demo ]] &&
		! { runuser -u "$pg_user" -- test -x "$root" && runuser -u "$redis_user" -- test -x "$root"; }; then
		real=/var/tmp/dwh-demo-$(sha1sum <<<"$root" | cut -c1-12)
		mkdir -p "$real"
		ln -s "$real" "$root/.demo"
		echo "demo.sh: $pg_user cannot enter $root: .demo links to $real"
	fi
	if [[ -z ${DEMO_DIR:-} ]]; then
		mkdir -p "$root/.demo"
		demo=$(cd "$root/.demo" && pwd -P)
	fi
	chmod 755 "$demo"
	# kafka.sh runs as postgres, from a copy that it can read.
	mkdir -p "$demo/bin"
	cp "$root/tools/kafka/kafka.sh" "$root/tools/kafka/pom.xml" "$demo/bin/"
	chmod 755 "$demo/bin" "$demo/bin/kafka.sh"
	chmod 644 "$demo/bin/pom.xml"
}

# Values of the last run, or of this one when there is none.
load_ports()
{
	pg_port=${DEMO_PORT:-54329}
	redis_port=${DEMO_REDIS_PORT:-}
	if [[ -f $demo/ports ]]; then
		# shellcheck disable=SC1091
		source "$demo/ports"
	fi
}

save_ports()
{
	printf 'pg_port=%s\nredis_port=%s\n' "$pg_port" "$redis_port" >"$demo/ports"
}

free_port()
{
	"$python3" -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])'
}

pg_running()
{
	[[ -f $demo/data/PG_VERSION ]] &&
		as_pg "$pgbin/pg_ctl" -D "$demo/data" status >/dev/null 2>&1
}

# The pid of the demo's redis-server, or nothing: the one of its pid file,
# if that process is a redis-server on the demo's port.
redis_pid()
{
	local pid
	[[ -f $demo/redis/redis.pid && -n $redis_port ]] || return 0
	pid=$(cat "$demo/redis/redis.pid")
	if [[ $pid =~ ^[0-9]+$ ]] && [[ $(cat "/proc/$pid/comm" 2>/dev/null) == redis-server ]] &&
		tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q ":$redis_port\b"; then
		echo "$pid"
	fi
}

stop_all()
{
	local pid i
	if pg_running; then
		as_pg "$pgbin/pg_ctl" -D "$demo/data" -m fast -w stop >/dev/null
		echo "demo.sh: PostgreSQL stopped"
	else
		echo "demo.sh: PostgreSQL is not running"
	fi
	if [[ -f $demo/kafka/.formatted ]]; then
		kafka stop "$demo/kafka"
	else
		echo "demo.sh: no Kafka broker set up"
	fi
	pid=$(redis_pid)
	if [[ -n $pid ]]; then
		kill -TERM "$pid"
		for ((i = 0; i < 100; i++)); do
			[[ -n $(redis_pid) ]] || break
			sleep 0.1
		done
		[[ -z $(redis_pid) ]] || kill -KILL "$pid" 2>/dev/null || true
		echo "demo.sh: Redis stopped"
	else
		echo "demo.sh: Redis is not running"
	fi
	rm -f "$demo/redis/redis.pid"
}

start_postgres()
{
	mkdir -p "$demo/run"
	chown "$pg_user" "$demo/run"
	# Only root and postgres reach the socket: the cluster trusts local users.
	chmod 700 "$demo/run"
	if [[ ! -f $demo/data/PG_VERSION ]]; then
		rm -rf "$demo/data"
		install -d -o "$pg_user" "$demo/data"
		as_pg "$pgbin/initdb" -D "$demo/data" -E UTF8 --locale=C.UTF-8 -A trust >"$demo/initdb.log"
		# dwh.kafka_consumers takes effect at start only.
		cat >>"$demo/data/postgresql.conf" <<EOF

# demo/demo.sh
shared_preload_libraries = 'dwh'
dwh.kafka_consumers = $consumers
port = $pg_port
listen_addresses = ''
unix_socket_directories = '$demo/run'
shared_buffers = 256MB
max_wal_size = 4GB
EOF
	fi
	if pg_running && [[ $library_changed == yes ]]; then
		echo "   the installed dwh library changed: restarting PostgreSQL"
		as_pg "$pgbin/pg_ctl" -D "$demo/data" -m fast -w stop >/dev/null
	fi
	if ! pg_running; then
		touch "$demo/postgres.log"
		chown "$pg_user" "$demo/postgres.log"
		as_pg "$pgbin/pg_ctl" -D "$demo/data" -l "$demo/postgres.log" -w start >/dev/null ||
			{ tail -n 20 "$demo/postgres.log" >&2; die "PostgreSQL did not start"; }
	fi
	echo "   PostgreSQL $("$pgbin/postgres" -V | awk '{print $3}'), socket $demo/run, port $pg_port, log $demo/postgres.log"
}

start_redis()
{
	install -d -o "$redis_user" -m 700 "$demo/redis"
	if [[ -z $(redis_pid) ]]; then
		[[ -n $redis_port ]] || redis_port=$(free_port)
		save_ports
		# No persistence: the dictionaries are loaded again on every run.
		runuser -u "$redis_user" -- redis-server --bind 127.0.0.1 --port "$redis_port" \
			--save '' --appendonly no --dir "$demo/redis" --daemonize yes \
			--pidfile "$demo/redis/redis.pid" --logfile "$demo/redis/redis.log" </dev/null 9>&-
		local i
		for ((i = 0; i < 100; i++)); do
			[[ $(redis-cli -p "$redis_port" ping 2>/dev/null) == PONG ]] && break
			sleep 0.1
		done
		[[ $(redis-cli -p "$redis_port" ping 2>/dev/null) == PONG ]] ||
			{ tail -n 20 "$demo/redis/redis.log" >&2; die "redis-server did not start"; }
	fi
	echo "   Redis 127.0.0.1:$redis_port, pid $(redis_pid), log $demo/redis/redis.log"
}

# Partitions of the topic on the broker; 0 when it does not exist.
count_partitions()
{
	kcat -L -b "$bootstrap" -t "$topic" -m 10 2>/dev/null |
		sed -n "s/^ *topic \"$topic\" with \([0-9]*\) partitions:\$/\1/p" | grep . || echo 0
}

start_kafka()
{
	local opts=()
	install -d -o "$pg_user" "$demo/kafka"
	if ! kafka status "$demo/kafka" >/dev/null; then
		# A broker set up before keeps its settings.
		if [[ ! -f $demo/kafka/.formatted ]]; then
			opts+=(--partitions "$partitions")
			[[ -z ${DEMO_KAFKA_PORT:-} ]] || opts+=(--port "$DEMO_KAFKA_PORT")
		fi
		kafka start "$demo/kafka" "${opts[@]}" | sed 's/^kafka.sh: /   /'
	fi
	bootstrap=$(kafka bootstrap "$demo/kafka")
	topic_partitions=$(count_partitions)
	if ((topic_partitions == 0)); then
		kafka create-topic "$demo/kafka" "$topic" "$partitions" >/dev/null
		topic_partitions=$(count_partitions)
	fi
	((topic_partitions > 0)) || die "topic $topic not found on $bootstrap"
	echo "   Kafka $bootstrap, topic $topic with $topic_partitions partitions, log $demo/kafka/logs/server.log"
}

# ---------------------------------------------------------------- queries

psql_demo()
{
	"$pgbin/psql" -X -q -P pager=off -h "$demo/run" -p "$pg_port" -U postgres -d "$database" \
		-v ON_ERROR_STOP=1 "$@"
}

# One value (or one row, |-separated) from a query.
sql()
{
	psql_demo -tAc "$1"
}

# Messages the broker holds in the topic: the sum of its end offsets.
broker_total()
{
	local args=() p
	for ((p = 0; p < topic_partitions; p++)); do
		args+=(-t "$topic:$p:-1")
	done
	kcat -Q -b "$bootstrap" "${args[@]}" | awk '{ s += $NF } END { print s + 0 }'
}

# Messages applied: the sum of the next offsets stored with the batches.
applied_total()
{
	sql "SELECT coalesce(sum(next_offset), 0) FROM dwh.kafka_offsets WHERE topic = '$topic'"
}

# ---------------------------------------------------------------- progress

# Show progress until the producer $1 (a pid, or empty) has finished and
# every message the broker holds is applied; $2 names the phase.  One line
# rewritten every second on a terminal, a new line every 5 s otherwise; the
# rate is over that interval.  Sets phase_seconds, phase_applied,
# phase_rate and phase_max_lag (the highest lag dwh.status showed).
follow()
{
	local producer=$1 label=$2 every=5 cr=no deadline="" target=""
	local row applied stg lag pmart cmart start now first_n rate_t rate_n per_s line
	if [[ -t 1 ]]; then
		every=1
		cr=yes
	fi
	start=$(now_us)
	phase_max_lag=0
	first_n=$(applied_total)
	rate_t=$start
	rate_n=$first_n
	while :; do
		sleep 0.5
		row=$(sql "SELECT (SELECT coalesce(sum(next_offset), 0) FROM dwh.kafka_offsets
		                  WHERE topic = '$topic'),
		                 (SELECT count(*) FROM stg.order_events),
		                 (SELECT coalesce(sum(lag), 0) FROM dwh.kafka_partitions
		                  WHERE topic = '$topic'),
		                 (SELECT count(*) FROM cdm.user_product_counters),
		                 (SELECT count(*) FROM cdm.user_category_counters)")
		IFS='|' read -r applied stg lag pmart cmart <<<"$row"
		((lag <= phase_max_lag)) || phase_max_lag=$lag
		now=$(now_us)
		# Once the producer is done, the broker's end offsets are final.
		if [[ -z $target ]] && { [[ -z $producer ]] || ! kill -0 "$producer" 2>/dev/null; }; then
			target=$(broker_total)
			deadline=$((now + timeout * 1000000))
		fi
		local done=no
		[[ -n $target ]] && ((applied >= target)) && done=yes
		if [[ $done == yes ]] || ((now - rate_t >= every * 1000000)); then
			per_s=$(((applied - rate_n) * 1000000 / (now - rate_t)))
			rate_t=$now
			rate_n=$applied
			line=$(printf '   %s: %s messages applied, %s/s | %s orders in STG | lag %s | marts %s + %s rows' \
				"$label" "$(num $((applied - first_n)))" "$(num "$per_s")" "$(num "$stg")" \
				"$(num "$lag")" "$(num "$pmart")" "$(num "$cmart")")
			if [[ $cr == yes ]]; then
				printf '\r%s\033[K' "$line"
			else
				echo "$line"
			fi
		fi
		[[ $done == no ]] || break
		if [[ -n $deadline ]] && ((now > deadline)); then
			[[ $cr == no ]] || echo
			psql_demo -c "SELECT worker, state, partitions, messages, lag, last_error FROM dwh.status"
			die "$label: $(num "$applied") of $(num "$target") messages applied ${timeout} s after the last was produced"
		fi
	done
	[[ $cr == no ]] || echo
	phase_us=$((now - start))
	phase_seconds=$(seconds $((now - start)))
	phase_applied=$((applied - first_n))
	phase_rate=$((phase_applied * 1000000 / phase_us))
}

# -------------------------------------------------------------- the orders

# First object_id of new orders: past every order in STG and every id the
# generator used for a malformed line before.
next_first_id()
{
	local stg_max
	stg_max=$(sql "SELECT coalesce(max(object_id), 999999) FROM stg.order_events")
	"$python3" - "$stg_max" "$demo"/orders/*.json <<'EOF'
import json, sys
top = int(sys.argv[1])
for name in sys.argv[2:]:
    try:
        m = json.load(open(name))
    except (OSError, ValueError):
        continue
    top = max(top, m["object_ids"]["last"],
              (m.get("malformed_object_ids") or {}).get("last") or 0)
print(top + 1)
EOF
}

# Time of the first of $1 new orders: a minute after the newest order in
# STG, or, if later, early enough for the newest of them to be dated about
# now (the generator spaces orders 15 s apart): the "regular" tag counts
# the orders dated in the last 30 days.
next_start()
{
	sql "SELECT to_char(greatest(max(update_ts) + interval '1 minute',
	                             date_trunc('second', now() AT TIME ZONE 'UTC')
	                             - $1 * interval '15 seconds'),
	                    'YYYY-MM-DD HH24:MI:SS') FROM stg.order_events"
}

# Produce $1 orders (at $2 a second, 0: at once) in the background, the
# pipeline's last process in $producer.  A marker file says "producing"
# until wait_producer has seen every line acknowledged by the broker and
# kept the manifest: .demo/orders/*.json then describe what Kafka holds, and
# a marker left by an interrupted run says that they no longer do.
start_producer()
{
	local count=$1 pace=$2 name=$3 first start
	first=$(next_first_id)
	start=$(next_start "$count")
	manifest=$demo/orders/$name-$first.json
	echo "   object_ids $(num "$first") to $(num $((first + count - 1))), seed $first, order times from $start"
	touch "$manifest.producing"
	"$python3" "$root/tools/dwh-gen" orders --count "$count" --first-id "$first" \
		--seed "$first" --start "$start" --rate "$pace" --manifest "$manifest.tmp" \
		--kafka "$bootstrap" --topic "$topic" &
	producer=$!
}

wait_producer()
{
	wait "$producer" || die "dwh-gen could not produce the orders to $bootstrap"
	producer=
	[[ -s $manifest.tmp ]] || die "dwh-gen orders failed"
	mv "$manifest.tmp" "$manifest"
	rm -f "$manifest.producing"
}

# ---------------------------------------------------------------- main

if [[ ${1:-} == stop ]]; then
	[[ -x $PG_CONFIG ]] || PG_CONFIG=/usr/lib/postgresql/15/bin/pg_config
	pgbin=$("$PG_CONFIG" --bindir 2>/dev/null || echo /usr/lib/postgresql/15/bin)
	dir=${DEMO_DIR:-$root/.demo}
	[[ -d $dir ]] || { echo "demo.sh: nothing to stop (no $dir)"; exit 0; }
	demo=$(cd "$dir" && pwd -P)
	load_ports
	stop_all
	exit 0
fi
[[ $# -eq 0 ]] || die "usage: demo/demo.sh [stop]"

t_begin=$(now_us)
place_demo
mkdir -p "$demo/orders"
exec 9>"$demo/lock"
flock -n 9 || die "another demo/demo.sh is running"
producer=
trap '[[ -z $producer ]] || kill "$producer" 2>/dev/null || true' EXIT

step "packages (tools/install-deps.sh)"
"$root/tools/install-deps.sh" </dev/null | sed 's/^/   /'
[[ -x $PG_CONFIG ]] || die "no pg_config at $PG_CONFIG (set PG_CONFIG)"
pgbin=$("$PG_CONFIG" --bindir)

library=$("$PG_CONFIG" --pkglibdir)/dwh.so
library_changed=no
if [[ $skip_install == 1 ]]; then
	step "using the dwh installed for $PG_CONFIG (DEMO_SKIP_INSTALL=1)"
	[[ -f $library ]] || die "no $library: install dwh for $PG_CONFIG first, or leave DEMO_SKIP_INSTALL unset"
	echo "   $library"
else
	step "building and installing dwh with $PG_CONFIG"
	before=$(sha256sum "$library" 2>/dev/null || true)
	{ make -C "$root" -j"$(nproc)" PG_CONFIG="$PG_CONFIG" && make -C "$root" PG_CONFIG="$PG_CONFIG" install; } \
		>"$demo/build.log" 2>&1 || { tail -n 30 "$demo/build.log" >&2; die "the build failed (log: $demo/build.log)"; }
	[[ -z $before || $before == "$(sha256sum "$library")" ]] || library_changed=yes
	echo "   installed $library"
fi

step "services under $demo"
load_ports
save_ports
start_redis
start_kafka
start_postgres

step "dictionaries: generator -> Redis"
dict_keys=$("$python3" "$root/tools/dwh-gen" dictionaries --format json | wc -l)
reply=$("$python3" "$root/tools/dwh-gen" dictionaries \
	--redis "redis://127.0.0.1:$redis_port/0" | tail -n 1)
[[ $reply == *"errors: 0,"* ]] || die "redis-cli --pipe: $reply"
echo "   $dict_keys keys SET in Redis ($reply)"

step "configuring dwh in database $database"
if [[ -z $(psql_demo -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = '$database'") ]]; then
	psql_demo -d postgres -c "CREATE DATABASE $database"
fi
# A demo set up by an older build holds an older version of the schema:
# update it the way a DBA does after installing a new build.
psql_demo -c "SET client_min_messages = warning" -c "CREATE EXTENSION IF NOT EXISTS dwh" \
	-c "ALTER EXTENSION dwh UPDATE"
psql_demo >/dev/null <<EOF
ALTER SYSTEM SET dwh.database = '$database';
ALTER SYSTEM SET dwh.kafka_brokers = '$bootstrap';
ALTER SYSTEM SET dwh.kafka_topic = '$topic';
ALTER SYSTEM SET dwh.kafka_consumers = $consumers;
ALTER SYSTEM SET dwh.redis_url = 'redis://127.0.0.1:$redis_port/0';
-- This Redis holds only the dictionaries: discover them all up front.
ALTER SYSTEM SET dwh.redis_scan_pattern = '*';
-- A value changed in Redis shows in the marts within 10 s (default 1 min).
ALTER SYSTEM SET dwh.redis_refresh_interval = '10s';
SELECT pg_reload_conf();
EOF
sleep 0.5
if [[ $(sql "SELECT count(*) FROM pg_settings WHERE pending_restart") != 0 ]]; then
	echo "   dwh.kafka_consumers changed: restarting PostgreSQL"
	as_pg "$pgbin/pg_ctl" -D "$demo/data" -m fast -w restart -l "$demo/postgres.log" >/dev/null
fi
echo "   dwh.kafka_brokers = $bootstrap, dwh.kafka_consumers = $consumers, dwh.redis_url = redis://127.0.0.1:$redis_port/0"

t_configured=$(now_us)

step "waiting for the Redis worker to mirror the dictionaries"
t0=$SECONDS
until [[ $(sql "SELECT keys_mirrored >= $dict_keys AND keys_missing = 0
                FROM dwh.status WHERE worker = 'redis'") == t ]]; do
	((SECONDS - t0 < 60)) || {
		psql_demo -c "SELECT worker, state, keys_mirrored, keys_missing, last_error FROM dwh.status WHERE worker = 'redis'"
		die "the Redis worker did not mirror $dict_keys keys within 60 s"
	}
	sleep 0.5
done
t_mirrored=$(now_us)
echo "   $(sql "SELECT format('%s users, %s restaurants in STG; %s dishes in %s categories in DDS',
                             (SELECT count(*) FROM stg.users), (SELECT count(*) FROM stg.restaurants),
                             (SELECT count(*) FROM dds.h_product), (SELECT count(*) FROM dds.h_category))")"

# The tag rules, before the stream: their tags are granted as the orders
# arrive.  The thresholds follow the volume (the generator's 100 users get
# the same shares of the orders whatever their number); a second run
# raises them, which recomputes the rules' tags at once.
step "user tag rules (dwh.tag_rules) -> cdm.user_tags"
total=$(($(sql "SELECT count(*) FROM stg.order_events") + orders + rate * live_seconds))
pizza_n=${min_orders:-$((total / 140 > 10 ? total / 140 : 10))}
regular_n=${regular_orders:-$((total / 100 > 10 ? total / 100 : 10))}
psql_demo <<EOF
INSERT INTO dwh.tag_rules (tag, kind, category_name, threshold, window_days) VALUES
    ('pizza lover', 'category', 'Выпечка', $pizza_n, NULL),
    ('regular', 'all_orders', NULL, $regular_n, 30),
    ('favourite', 'favourite_category', NULL, 1, NULL)
ON CONFLICT (tag) DO UPDATE
SET kind = EXCLUDED.kind, category_name = EXCLUDED.category_name,
    threshold = EXCLUDED.threshold, window_days = EXCLUDED.window_days;
EOF
echo "   pizza lover: at least $(num "$pizza_n") orders with a dish of Выпечка"
echo "   regular:     at least $(num "$regular_n") orders dated in the last 30 days"
echo "   favourite:   the category of most of the user's orders (the tag's value)"
rules=("pizza lover" regular favourite)

# An earlier run that stopped while producing left orders in Kafka that no
# manifest describes: the comparisons with the generator are then skipped.
history_complete=yes
! compgen -G "$demo/orders/*.producing" >/dev/null || history_complete=no

if ((orders > 0)); then
	step "backfill: $(num "$orders") orders -> Kafka -> dwh"
	start_producer "$orders" 0 backfill
	follow "$producer" backfill
	wait_producer
	backfill_line="backfill: $(num "$phase_applied") messages in $phase_seconds s, $(num "$phase_rate") messages/s"
	echo "   $backfill_line"
fi

if ((live_seconds > 0)); then
	step "live: $(num $((rate * live_seconds))) orders at $(num "$rate") messages/s -> Kafka -> dwh"
	start_producer $((rate * live_seconds)) "$rate" live
	follow "$producer" live
	wait_producer
	live_line="live: $(num "$phase_applied") messages in $phase_seconds s, $(num "$phase_rate") messages/s, lag at most $(num "$phase_max_lag")"
	echo "   $live_line"
fi

step "waiting for dwh.status to show no lag"
t0=$SECONDS
until [[ $(sql "SELECT coalesce(sum(lag), 0) = 0 AND count(pid) = $consumers
                FROM dwh.status WHERE worker LIKE 'kafka%'") == t ]]; do
	((SECONDS - t0 < timeout)) || die "dwh.status still shows a lag after ${timeout} s"
	sleep 0.5
done

step "results"
psql_demo -f "$root/demo/report.sql"

# What the generator says the warehouse must hold, summed over every run.
read -r want_orders want_dead want_prod want_cat want_kinds <<<"$("$python3" - "$demo"/orders/*.json <<'EOF'
import json, sys
orders = mal = prod = cat = 0
kinds = {}
for name in sys.argv[1:]:
    m = json.load(open(name))
    orders += m["object_ids"]["count"]
    mal += m["malformed"]
    prod += m["user_product_counts"]["order_cnt_sum"]
    cat += m["user_category_counts"]["order_cnt_sum"]
    for k, n in m["malformed_by_kind"].items():
        kinds[k] = kinds.get(k, 0) + n
print(orders, mal, prod, cat, ", ".join("%s %d" % kv for kv in sorted(kinds.items())))
EOF
)"
IFS='|' read -r got_orders got_dead got_prod got_cat prod_rows cat_rows differences <<<"$(sql "
	SELECT (SELECT count(*) FROM stg.order_events),
	       (SELECT count(*) FROM dwh.dead_letters WHERE source = 'kafka'),
	       (SELECT coalesce(sum(order_cnt), 0) FROM cdm.user_product_counters),
	       (SELECT coalesce(sum(order_cnt), 0) FROM cdm.user_category_counters),
	       (SELECT count(*) FROM cdm.user_product_counters),
	       (SELECT count(*) FROM cdm.user_category_counters),
	       (SELECT count(*) FROM dwh.verify())")"
declare -A holders
for tag in "${rules[@]}"; do
	holders[$tag]=$(sql "SELECT count(*) FROM cdm.user_tags WHERE tag = '$tag'")
done

failed=0
# check TEXT COMMAND...: one line of the summary; a failed COMMAND fails the run.
check()
{
	if "${@:2}"; then
		echo "   ok    $1"
	else
		echo "   FAIL  $1"
		failed=1
	fi
}
echo "Checks:"
check "SELECT count(*) FROM dwh.verify() = $differences (marts, vault and user tags recounted)" \
	[ "$differences" = 0 ]
for tag in "${rules[@]}"; do
	check "users tagged \"$tag\": ${holders[$tag]}" [ "${holders[$tag]}" -gt 0 ]
done
check "marts not empty: $(num "$prod_rows") + $(num "$cat_rows") rows" \
	[ "$prod_rows" -gt 0 -a "$cat_rows" -gt 0 ]
check "lag 0: $(num "$(applied_total)") messages applied = $(num "$(broker_total)") in the topic" true
if [[ $history_complete == yes ]]; then
	check "orders in STG: $(num "$got_orders"), generated: $(num "$want_orders")" \
		[ "$got_orders" = "$want_orders" ]
	check "dead letters from Kafka: $(num "$got_dead"), the generator's malformed lines: $(num "$want_dead") ($want_kinds)" \
		[ "$got_dead" = "$want_dead" ]
	check "sum(order_cnt) of the marts: $(num "$got_prod") and $(num "$got_cat"), the generator's recount: $(num "$want_prod") and $(num "$want_cat")" \
		[ "$got_prod" = "$want_prod" -a "$got_cat" = "$want_cat" ]
else
	echo "   (an earlier run stopped while producing: no comparison with the generator's counts)"
fi
echo "Timings:"
echo "   packages, build, services and settings: $(seconds $((t_configured - t_begin))) s; dictionaries mirrored $(seconds $((t_mirrored - t_configured))) s later"
[[ -z ${backfill_line:-} ]] || echo "   $backfill_line"
[[ -z ${live_line:-} ]] || echo "   $live_line"
echo "   whole run: $(seconds $(($(now_us) - t_begin))) s"

sudo_prefix=
[[ -z ${SUDO_USER:-} ]] || sudo_prefix="sudo "
# The settings that name this demo, for running it again or stopping it.
run_prefix=$sudo_prefix
for v in DEMO_DIR PG_CONFIG DEMO_SKIP_INSTALL; do
	if [[ -n ${!v:-} && ! ($v == PG_CONFIG && ${!v} == /usr/lib/postgresql/15/bin/pg_config) ]]; then
		run_prefix+="$v=${!v} "
	fi
done
cat <<EOF

The demo keeps running (PostgreSQL, Redis and Kafka under $demo):
  connect: ${sudo_prefix}$pgbin/psql -h $demo/run -p $pg_port -U postgres $database
  Redis:   redis-cli -p $redis_port      Kafka: kcat -L -b $bootstrap
  again:   ${run_prefix}$script        (adds new orders)
  stop:    ${run_prefix}$script stop
EOF

((failed == 0)) || die "some checks failed"
