#!/usr/bin/env bash
#
# Benchmark of the Redis dictionary worker.
#
# Fills a throw-away redis-server (password on, no persistence) with
# USERS users and RESTAURANTS restaurants of DISHES dishes in all, 10
# categories, generated deterministically here; starts a throw-away
# PostgreSQL cluster with dwh preloaded, points the worker at Redis with
# discovery on (dwh.redis_scan_pattern = '*') and prints:
#
#   - the time to mirror everything (from the reload until STG holds every
#     value), and the worker's own time for that first pass;
#   - the cost of one refresh pass when nothing changed (the median of
#     PASSES passes, with and without SCAN discovery), with a check that
#     such a pass wrote nothing (no new row version in STG, DDS or
#     dwh.redis_keys);
#   - the cost of one refresh pass after 1% of the values changed (renamed
#     users, restaurants whose dishes moved to another category).
#
# Pass times come from the worker's DEBUG1 line "refresh pass done in X
# ms".  Ends with dwh.verify() empty.  It is a benchmark that reports
# figures, not a test with a threshold; the last lines are "RESULT
# key=value" lines for bench/run-all.sh.
#
# Runs as root on a machine with PostgreSQL 15 and redis-server; builds and
# installs the extension first (unless BENCH_SKIP_INSTALL=1).  Everything
# lives under a temporary directory removed at the end (BENCH_KEEP=1 keeps
# it).
#
# Usage: bench/redis_mirror.sh
# Environment: BENCH_USERS (100000), BENCH_RESTAURANTS (1000),
#   BENCH_DISHES (10000), BENCH_PASSES (5), BENCH_BATCH (1000: the
#   dwh.redis_batch_size), BENCH_KEEP (0), BENCH_SKIP_INSTALL (0),
#   BENCH_DIR (/tmp), PG_CONFIG (/usr/lib/postgresql/15/bin/pg_config).

set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)

USERS=${BENCH_USERS:-100000}
RESTAURANTS=${BENCH_RESTAURANTS:-1000}
DISHES=${BENCH_DISHES:-10000}
PASSES=${BENCH_PASSES:-5}
BATCH=${BENCH_BATCH:-1000}
KEEP=${BENCH_KEEP:-0}
SKIP_INSTALL=${BENCH_SKIP_INSTALL:-0}
PARENT=${BENCH_DIR:-/tmp}
PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}
BIN=$("$PG_CONFIG" --bindir)
PASSWORD='bench-redis-password'

if [ "$(id -u)" -ne 0 ]; then
	echo "run as root: it installs the extension and runs the cluster as postgres" >&2
	exit 1
fi
export LANG=C.UTF-8 LC_ALL=C.UTF-8

if [ "$SKIP_INSTALL" != 1 ]; then
	make -s -C "$root" PG_CONFIG="$PG_CONFIG" >/dev/null
	make -s -C "$root" PG_CONFIG="$PG_CONFIG" install >/dev/null
fi

work=$(mktemp -d "$PARENT/dwh-redis-bench.XXXXXX")
chown postgres: "$work"
pgdata=$work/pgdata
log=$work/postgresql.log

free_port() {
	python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
redis_port=$(free_port)
pg_port=$(free_port)

cleanup() {
	set +e
	if [ -f "$pgdata/postmaster.pid" ]; then
		runuser -u postgres -- "$BIN/pg_ctl" -D "$pgdata" -m fast stop >/dev/null 2>&1
	fi
	if [ -f "$work/redis.pid" ]; then
		local pid
		pid=$(cat "$work/redis.pid")
		kill "$pid" 2>/dev/null
		for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
	fi
	if [ "$KEEP" = 1 ]; then
		echo "kept: $work"
	else
		rm -rf "$work"
	fi
}
trap cleanup EXIT

rcli() { redis-cli -h 127.0.0.1 -p "$redis_port" -a "$PASSWORD" --no-auth-warning "$@"; }
psql_q() { runuser -u postgres -- "$BIN/psql" -h "$work" -p "$pg_port" -d postgres -XAtq -v ON_ERROR_STOP=1 -c "$1"; }
now_ms() { date +%s%3N; }

# The values, as Redis protocol for redis-cli --pipe.  version 1 is the
# initial data; version 2 changes every 100th user (a new name) and every
# 100th restaurant (its dishes move to the next category).
generate() {
	python3 - "$USERS" "$RESTAURANTS" "$DISHES" "$1" <<'EOF'
import json, sys
users, restaurants, dishes, version = map(int, sys.argv[1:])
categories = ["Закуски", "Салаты", "Супы", "Основные блюда", "Гарниры",
              "Выпечка", "Десерты", "Напитки", "Соусы", "Чай"]
out = sys.stdout.buffer
def put(key, value):
    k = key.encode(); v = json.dumps(value, ensure_ascii=False).encode()
    out.write(b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(k), k, len(v), v))
for i in range(users):
    changed = version == 2 and i % 100 == 0
    if version == 2 and not changed:
        continue
    uid = "626a81ce%016x" % i
    put(uid, {"_id": uid,
              "name": "Пользователь %d%s" % (i, " (переименован)" if changed else ""),
              "login": "user_%d" % i,
              "update_ts_utc": "2023-08-%02d 16:44:59" % (12 if changed else 11)})
per = dishes // restaurants
for r in range(restaurants):
    changed = version == 2 and r % 100 == 0
    if version == 2 and not changed:
        continue
    rid = "a51e4e31%016x" % r
    menu = [{"_id": "6276e8cd%016x" % (r * per + d), "name": "Блюдо %d" % (r * per + d),
             "price": 50 + (r * per + d) * 37 % 740,
             "category": categories[((r * per + d) + (1 if changed else 0)) % 10]}
            for d in range(per)]
    put(rid, {"_id": rid, "name": "Ресторан %d" % r, "menu": menu,
              "update_ts_utc": "2023-08-%02d 16:50:44" % (12 if changed else 11)})
EOF
}

echo "== redis-server on port $redis_port, $USERS users, $RESTAURANTS restaurants, $DISHES dishes"
redis-server --port "$redis_port" --bind 127.0.0.1 --requirepass "$PASSWORD" \
	--save '' --appendonly no --daemonize yes --dir "$work" \
	--pidfile "$work/redis.pid" --logfile "$work/redis.log"
for _ in $(seq 100); do rcli PING 2>/dev/null | grep -q PONG && break; sleep 0.1; done
generate 1 | rcli --pipe | tail -n 1
echo "keys in Redis: $(rcli DBSIZE)"

echo "== PostgreSQL cluster ($("$BIN/postgres" --version))"
runuser -u postgres -- "$BIN/initdb" -D "$pgdata" -E UTF8 --locale=C >/dev/null
cat >>"$pgdata/postgresql.conf" <<EOF
port = $pg_port
listen_addresses = ''
unix_socket_directories = '$work'
shared_preload_libraries = 'dwh'
shared_buffers = '512MB'
log_min_messages = debug1
dwh.redis_refresh_interval = '1h'
dwh.redis_batch_size = $BATCH
EOF
runuser -u postgres -- "$BIN/pg_ctl" -D "$pgdata" -l "$log" -w start >/dev/null
psql_q "CREATE EXTENSION dwh"

# Wait until the worker's log has n "refresh pass done" lines; print the
# last one's milliseconds.
pass_lines() { grep -c 'refresh pass done in' "$log" || true; }
wait_pass() {
	local n=$1
	for _ in $(seq 6000); do
		if [ "$(pass_lines)" -ge "$n" ]; then
			grep 'refresh pass done in' "$log" | sed -n "${n}p" |
				sed -E 's/.*refresh pass done in ([0-9.]+) ms: ([0-9]+) keys read, ([0-9]+) changes written.*/\1 \2 \3/'
			return
		fi
		sleep 0.1
	done
	echo "timed out waiting for refresh pass $n" >&2
	exit 1
}

# Row versions of every table a refresh could write: equal before and
# after a pass means the pass wrote nothing.
fingerprint() {
	psql_q "SELECT string_agg(t, ',' ORDER BY t) FROM (
	    SELECT 'u' || sum(xmin::text::bigint) || ':' || count(*) AS t FROM stg.users
	    UNION ALL SELECT 'r' || sum(xmin::text::bigint) || ':' || count(*) FROM stg.restaurants
	    UNION ALL SELECT 'k' || sum(xmin::text::bigint) || ':' || count(*) FROM dwh.redis_keys
	    UNION ALL SELECT 's' || count(*) FROM dds.s_user_names
	    UNION ALL SELECT 'c' || count(*) FROM dds.l_product_category
	    UNION ALL SELECT 'd' || count(*) FROM dwh.dead_letters) x"
}

median() { sort -n | awk '{ a[NR] = $1 } END { print (NR % 2 ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2) }'; }

echo "== mirror (SCAN discovery, then every value read and written)"
t0=$(now_ms)
psql_q "ALTER SYSTEM SET dwh.redis_url = 'redis://:$PASSWORD@127.0.0.1:$redis_port/0'"
psql_q "ALTER SYSTEM SET dwh.redis_scan_pattern = '*'"
psql_q "SELECT pg_reload_conf()" >/dev/null
read -r first_ms _ _ < <(wait_pass 1)
t1=$(now_ms)
users_in=$(psql_q "SELECT count(*) FROM stg.users")
restaurants_in=$(psql_q "SELECT count(*) FROM stg.restaurants")
dishes_in=$(psql_q "SELECT count(*) FROM dds.l_product_category")
echo "mirrored: $users_in users, $restaurants_in restaurants, $dishes_in dishes with a category"
printf 'time to mirror: %.2f s (worker pass: %.2f s)\n' \
	"$(echo "($t1 - $t0) / 1000" | bc -l)" "$(echo "$first_ms / 1000" | bc -l)"

run_passes() {
	local label=$1 key=$2 before after times=() n ms keys changes
	before=$(fingerprint)
	n=$(pass_lines)
	psql_q "ALTER SYSTEM SET dwh.redis_refresh_interval = '1s'"
	psql_q "SELECT pg_reload_conf()" >/dev/null
	for i in $(seq "$PASSES"); do
		read -r ms keys changes < <(wait_pass $((n + i)))
		times+=("$ms")
		[ "$changes" -eq 0 ] || { echo "pass wrote $changes changes" >&2; exit 1; }
	done
	psql_q "ALTER SYSTEM SET dwh.redis_refresh_interval = '1h'"
	psql_q "SELECT pg_reload_conf()" >/dev/null
	after=$(fingerprint)
	printf 'refresh pass, nothing changed, %s: median %.1f ms over %d passes (%s ms), %s keys read, wrote nothing: %s\n' \
		"$label" "$(printf '%s\n' "${times[@]}" | median)" "$PASSES" \
		"$(printf '%.0f ' "${times[@]}" | sed 's/ $//')" "$keys" \
		"$([ "$before" = "$after" ] && echo yes || echo NO)"
	printf 'RESULT redis_refresh_%s_ms=%.1f\n' "$key" "$(printf '%s\n' "${times[@]}" | median)"
}

echo "== refresh passes when nothing changed"
run_passes "with SCAN discovery" scan
psql_q "ALTER SYSTEM RESET dwh.redis_scan_pattern"
psql_q "SELECT pg_reload_conf()" >/dev/null
run_passes "without discovery" unchanged

echo "== refresh pass after 1% of the values changed"
generate 2 | rcli --pipe | tail -n 1
n=$(pass_lines)
psql_q "ALTER SYSTEM SET dwh.redis_refresh_interval = '1s'"
psql_q "SELECT pg_reload_conf()" >/dev/null
read -r ms keys changes < <(wait_pass $((n + 1)))
if [ "$changes" -eq 0 ]; then
	# The change landed after that pass had read the values: the next one.
	read -r ms keys changes < <(wait_pass $((n + 2)))
fi
printf 'refresh pass, 1%% changed: %.1f ms, %s keys read, %s changes written\n' "$ms" "$keys" "$changes"
echo "renamed users in DDS: $(psql_q "SELECT count(*) FROM (SELECT h_user_pk FROM dds.s_user_names GROUP BY 1 HAVING count(*) > 1) x")"
echo "dwh.verify() differences: $(psql_q "SELECT count(*) FROM dwh.verify()")"
echo "machine: $(nproc) CPUs, $(awk '/MemTotal/ { printf "%.0f GB", $2 / 1048576 }' /proc/meminfo), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"

# Machine-readable figures for bench/run-all.sh.
echo "RESULT redis_users=$USERS"
echo "RESULT redis_restaurants=$RESTAURANTS"
printf 'RESULT redis_mirror_s=%.2f\n' "$(echo "($t1 - $t0) / 1000" | bc -l)"
printf 'RESULT redis_refresh_changed_ms=%.1f\n' "$ms"
echo "RESULT redis_consistent=$([ "$(psql_q "SELECT count(*) FROM dwh.verify()")" = 0 ] && echo yes || echo no)"
