#!/usr/bin/env bash
#
# Benchmark of the SQL chain STG -> DDS -> marts through the batch entry
# point dwh.ingest_orders(bytea[]).
#
# Loads HISTORY synthetic orders of the docs/formats.md section 5 profile, then
# times MEASURED more, BATCH messages per call and per transaction (as the
# Kafka consumer commits), and prints orders per second, how flat the rate
# stays, batch latencies and where the time goes (pg_stat_statements over
# the statements inside the triggers, auto_explain of one extra batch).
# Ends with dwh.verify() and an independent recount from the generator.
#
# It is a benchmark that reports figures, not a test with a threshold.  When
# the marts are consistent, the last lines are "RESULT key=value" lines for
# bench/run-all.sh.
#
# Runs as root on a machine where PostgreSQL 15 is installed (it builds and
# installs the extension first); it starts a throw-away cluster of its own
# (own directory, own socket directory, unix socket only) and removes it at
# the end.  Generation of the measured messages happens before the clock
# starts.
#
# Usage: bench/sql_chain.sh [--history N] [--measured N] [--batch N]
#                                [--clients N] [--synchronous-commit on|off] [--keep]
# Environment: BENCH_HISTORY (1000000), BENCH_MEASURED (100000),
#   BENCH_BATCH (1000), BENCH_CLIENTS (1: connections ingesting measured
#   batches side by side, like consumers of several Kafka partitions),
#   BENCH_SYNCHRONOUS_COMMIT (on), BENCH_JIT (off),
#   BENCH_MAX_WAL_SIZE (16GB: WAL kept between checkpoints; lower it where
#   the disk is short, as bench/run-all.sh does for its long history),
#   BENCH_SHARED_BUFFERS (25% of RAM, at most 8GB), BENCH_KEEP (0: remove
#   the cluster), BENCH_SKIP_INSTALL (0: run make install first),
#   BENCH_EXPLAIN (1: auto_explain one extra, rolled back batch),
#   BENCH_BATCH_COST ("1 10 100 1000": sizes of the rolled-back batches
#   whose CPU time is measured after the measured phase, each size for
#   about 2 s; empty: none),
#   BENCH_VERIFY_PARTS (1: the check is dwh.verify(); N > 1:
#   dwh.verify(N), a part of the key space at a time, in less temporary
#   space, as bench/run-all.sh does for its long history),
#   BENCH_DIR (parent of the cluster directory, default /tmp),
#   PG_CONFIG (/usr/lib/postgresql/15/bin/pg_config).

set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)

HISTORY=${BENCH_HISTORY:-1000000}
MEASURED=${BENCH_MEASURED:-100000}
BATCH=${BENCH_BATCH:-1000}
SYNC_COMMIT=${BENCH_SYNCHRONOUS_COMMIT:-on}
CLIENTS=${BENCH_CLIENTS:-1}
JIT=${BENCH_JIT:-off}
MAX_WAL_SIZE=${BENCH_MAX_WAL_SIZE:-16GB}
KEEP=${BENCH_KEEP:-0}
SKIP_INSTALL=${BENCH_SKIP_INSTALL:-0}
VERIFY_PARTS=${BENCH_VERIFY_PARTS:-1}
EXPLAIN=${BENCH_EXPLAIN:-1}
BATCH_COST=${BENCH_BATCH_COST-1 10 100 1000}
PARENT=${BENCH_DIR:-/tmp}
PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}

usage() {
	sed -n '/^# Usage:/,/^$/p' "$0" | sed 's/^# \{0,1\}//'
	exit "${1:-0}"
}

while [ $# -gt 0 ]; do
	case "$1" in
		--history) HISTORY=$2; shift 2 ;;
		--measured) MEASURED=$2; shift 2 ;;
		--batch) BATCH=$2; shift 2 ;;
		--clients) CLIENTS=$2; shift 2 ;;
		--synchronous-commit) SYNC_COMMIT=$2; shift 2 ;;
		--keep) KEEP=1; shift ;;
		-h|--help) usage 0 ;;
		*) echo "unknown option: $1" >&2; usage 2 ;;
	esac
done

for v in HISTORY MEASURED BATCH CLIENTS; do
	if ! [[ ${!v} =~ ^[0-9]+$ ]]; then
		echo "$v must be a non-negative integer, not '${!v}'" >&2
		exit 2
	fi
done
if [ "$MEASURED" -lt 1 ] || [ "$BATCH" -lt 1 ] || [ "$CLIENTS" -lt 1 ]; then
	echo "MEASURED, BATCH and CLIENTS must be at least 1" >&2
	exit 2
fi
if [ $(( (MEASURED + BATCH - 1) / BATCH % CLIENTS )) -ne 0 ]; then
	echo "the number of measured batches must be a multiple of CLIENTS" >&2
	exit 2
fi

log() { printf '%s\n' "$*" >&2; }
now() { date +%s.%N; }
calc() { awk "BEGIN { print $* }"; }

# ---------------------------------------------------------------- install

if [ "$SKIP_INSTALL" != 1 ] && [ "$(id -u)" = 0 ]; then
	if [ ! -x "$PG_CONFIG" ] && [ -x "$root/tools/install-deps.sh" ]; then
		log "installing dependencies (tools/install-deps.sh)"
		"$root/tools/install-deps.sh" >&2
	fi
	log "building and installing the extension (make install)"
	make -C "$root" -s PG_CONFIG="$PG_CONFIG" >&2
	make -C "$root" -s PG_CONFIG="$PG_CONFIG" install >&2
fi

bindir=$("$PG_CONFIG" --bindir)
pkglibdir=$("$PG_CONFIG" --pkglibdir)
for lib in dwh pg_stat_statements auto_explain; do
	if [ ! -e "$pkglibdir/$lib.so" ]; then
		echo "$pkglibdir/$lib.so is missing: install the extension (make install) and postgresql-15" >&2
		exit 1
	fi
done

# ---------------------------------------------------------------- cluster

# initdb refuses to run as root: the cluster belongs to postgres.
if [ "$(id -u)" = 0 ]; then
	owner=postgres
	as_owner() { runuser -u postgres -- "$@"; }
else
	owner=$(id -un)
	as_owner() { "$@"; }
fi

work=$(mktemp -d "$PARENT/dwh-bench.XXXXXX")
chmod 755 "$work"
[ "$(id -u)" = 0 ] && chown "$owner" "$work"
data=$work/data
sock=$work

# A port no one listens on and whose socket name is free (we listen on our
# own unix socket directory only, never on TCP).
port=""
for p in $(seq 55400 55499); do
	if ! ss -ltnH "sport = :$p" 2>/dev/null | grep -q . &&
		[ ! -e "/tmp/.s.PGSQL.$p" ] && [ ! -e "/var/run/postgresql/.s.PGSQL.$p" ]; then
		port=$p
		break
	fi
done
[ -n "$port" ] || { echo "no free port in 55400-55499" >&2; exit 1; }

cleanup() {
	local rc=$?
	if [ -f "$data/postmaster.pid" ]; then
		as_owner "$bindir/pg_ctl" -D "$data" -m fast -w stop >/dev/null 2>&1 || true
	fi
	if [ "$KEEP" = 1 ]; then
		log "kept $work (stopped cluster, logs)"
	else
		rm -rf "$work"
	fi
	exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

mem_kb=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)
mem_mb=$((mem_kb / 1024))
if [ -n "${BENCH_SHARED_BUFFERS:-}" ]; then
	shared_buffers=$BENCH_SHARED_BUFFERS
else
	sb=$((mem_mb / 4))
	[ $sb -gt 8192 ] && sb=8192
	[ $sb -lt 128 ] && sb=128
	shared_buffers=${sb}MB
fi
ecs=$((mem_mb / 2))

log "initdb in $data (port $port, socket $sock)"
as_owner "$bindir/initdb" -D "$data" -U postgres -E UTF8 --locale=C.UTF-8 \
	--auth=trust >"$work/initdb.log" 2>&1

# Settings a DBA would use for a bulk-loading warehouse on this machine.
# Durability is untouched: fsync and full_page_writes stay on, every table
# is logged; synchronous_commit is a stated option (default on).
settings="listen_addresses = ''
port = $port
unix_socket_directories = '$sock'
shared_preload_libraries = 'dwh,pg_stat_statements'
max_connections = 20
shared_buffers = $shared_buffers
effective_cache_size = ${ecs}MB
work_mem = 64MB
maintenance_work_mem = 1GB
wal_buffers = 64MB
wal_compression = lz4
max_wal_size = $MAX_WAL_SIZE
min_wal_size = 1GB
checkpoint_timeout = 30min
checkpoint_completion_target = 0.9
synchronous_commit = $SYNC_COMMIT
random_page_cost = 1.1
effective_io_concurrency = 200
jit = $JIT
max_locks_per_transaction = 128
autovacuum = on
autovacuum_vacuum_cost_limit = 2000
track_io_timing = on
pg_stat_statements.track = all
pg_stat_statements.max = 5000
pg_stat_statements.track_utility = off"
printf '%s\n' "$settings" >>"$data/postgresql.conf"

as_owner "$bindir/pg_ctl" -D "$data" -l "$work/server.log" -w start >/dev/null

psql_() {
	as_owner "$bindir/psql" -X -q -v ON_ERROR_STOP=1 -h "$sock" -p "$port" -U postgres "$@"
}
q() { psql_ -d bench "$@"; }
qv() { q -At -c "$1"; }

psql_ -d postgres -c "CREATE DATABASE bench"
q -c "CREATE EXTENSION dwh" -c "CREATE EXTENSION pg_stat_statements"
q -f - <"$here/sql_chain_setup.sql" >/dev/null
q -c "INSERT INTO bench.params VALUES ($HISTORY, $MEASURED, $BATCH)"

# ---------------------------------------------------------------- dictionaries

t0=$(now)
q -c "INSERT INTO stg.users (object_id, payload)
      SELECT object_id, payload FROM bench.user_values ORDER BY object_id" \
	-c "INSERT INTO stg.restaurants (object_id, payload)
      SELECT object_id, payload FROM bench.restaurant_values ORDER BY object_id"
t1=$(now)
dict_s=$(calc "$t1 - $t0")

# ---------------------------------------------------------------- history

# One pgbench transaction = one batch = one call = one commit, on one
# connection, like one Kafka consumer.  History batches are generated in the
# same transaction (their rate includes generation, reported separately).
hist_batches=$(( (HISTORY + BATCH - 1) / BATCH ))
meas_batches=$(( (MEASURED + BATCH - 1) / BATCH ))

cat >"$work/history.pgbench" <<'EOF'
SELECT nextval('bench.history_seq') AS k \gset
SELECT r.* FROM dwh.ingest_orders(bench.history_batch(:k), 'order-service_orders') r;
EOF
cat >"$work/measured.pgbench" <<'EOF'
SELECT nextval('bench.measured_seq') AS k \gset
INSERT INTO bench.results SELECT b.k, r.* FROM bench.batches b CROSS JOIN LATERAL dwh.ingest_orders(b.messages, 'order-service_orders') r WHERE b.k = :k;
EOF
chmod 644 "$work"/*.pgbench

pgbench_() {
	(cd "$work" && as_owner "$bindir/pgbench" -n -h "$sock" -p "$port" -U postgres "$@" bench)
}

load_latency() {
	local phase=$1 prefix=$2
	cat "$work/$prefix".[0-9]* | sort -k5,5n -k6,6n | awk -v p="$phase" '{ print p "," NR "," $3 }' |
		q -c "\\copy bench.latency FROM STDIN WITH (FORMAT csv)"
}

hist_s=0
if [ "$hist_batches" -gt 0 ]; then
	log "history: $HISTORY orders in $hist_batches batches (generated while loading)"
	t0=$(now)
	pgbench_ -c 1 -j 1 -t "$hist_batches" -f "$work/history.pgbench" -l --log-prefix=history_log \
		>"$work/history.out" 2>&1 || { cat "$work/history.out" >&2; exit 1; }
	t1=$(now)
	hist_s=$(calc "$t1 - $t0")
	load_latency history history_log
fi

# A DBA runs VACUUM ANALYZE after a backfill; a checkpoint now keeps the
# backfill's dirty pages out of the measured phase.
t0=$(now)
q -c "VACUUM ANALYZE" -c "CHECKPOINT"
t1=$(now)
vacuum_s=$(calc "$t1 - $t0")

# ---------------------------------------------------------------- measured

log "generating the $MEASURED measured orders ($meas_batches batches) before timing"
t0=$(now)
q -c "INSERT INTO bench.batches
      SELECT k, bench.batch($HISTORY, $HISTORY + $MEASURED, k, $BATCH)
      FROM generate_series(1, $meas_batches) k" -c "ANALYZE bench.batches" -c "CHECKPOINT"
t1=$(now)
gen_s=$(calc "$t1 - $t0")
msg_bytes=$(qv "SELECT round(avg(length(m)))
                FROM bench.batches, unnest(messages) m WHERE k = 1")

q -c "SELECT pg_stat_statements_reset()" -c "SELECT pg_stat_reset_shared('wal')" \
	-c "SELECT pg_stat_reset_shared('bgwriter')" >/dev/null
size_before=$(qv "SELECT pg_database_size(current_database())")

log "measured: $MEASURED orders in $meas_batches batches"
t0=$(now)
per_client=$(( (meas_batches + CLIENTS - 1) / CLIENTS ))
pgbench_ -c "$CLIENTS" -j "$CLIENTS" -t "$per_client" -f "$work/measured.pgbench" -l --log-prefix=measured_log -r \
	>"$work/measured.out" 2>&1 || { cat "$work/measured.out" >&2; exit 1; }
t1=$(now)
meas_s=$(calc "$t1 - $t0")
load_latency measured measured_log

# Snapshot the statistics of the measured phase before anything else runs.
q -c "CREATE TABLE bench.statements AS
      SELECT s.* FROM pg_stat_statements s
      JOIN pg_database d ON d.oid = s.dbid AND d.datname = current_database()" \
	-c "CREATE TABLE bench.wal AS SELECT * FROM pg_stat_wal" \
	-c "CREATE TABLE bench.bgwriter AS SELECT * FROM pg_stat_bgwriter"
size_after=$(qv "SELECT pg_database_size(current_database())")

# ---------------------------------------------------------------- explain

explain_ok=0
if [ "$EXPLAIN" = 1 ]; then
	log "auto_explain of one extra batch (rolled back)"
	first=$((HISTORY + MEASURED))
	if q -v ON_ERROR_STOP=1 >/dev/null 2>"$work/explain.txt" <<EOF
CREATE TEMP TABLE explain_batch AS
    SELECT bench.batch($first, $first + $BATCH, 1, $BATCH) AS messages;
BEGIN;
LOAD 'auto_explain';
SET auto_explain.log_min_duration = 0;
SET auto_explain.log_analyze = on;
SET auto_explain.log_buffers = on;
SET auto_explain.log_timing = on;
SET auto_explain.log_nested_statements = on;
SET auto_explain.log_triggers = on;
SET auto_explain.log_format = json;
SET auto_explain.log_level = notice;
SET client_min_messages = notice;
SELECT r.* FROM explain_batch b CROSS JOIN LATERAL dwh.ingest_orders(b.messages) r;
ROLLBACK;
EOF
	then
		explain_ok=1
	fi
fi

# ---------------------------------------------------------------- batch cost

# What a batch costs, by size: at a low rate a batch holds a few orders,
# and what every batch costs whatever its size (statements started and
# ended, plans, locks, commit) is most of its cost.  New orders after the
# measured ones, each batch rolled back so that every size meets the same
# warehouse; the CPU time of the backend (from /proc, in clock ticks) over
# ROUNDS batches, after 5 unmeasured ones (a session plans its statements
# in its first calls), pg_stat_statements off.  Generation is done before.
declare -A cost_us=()
if [ -n "$BATCH_COST" ]; then
	log "CPU time of rolled-back batches of $BATCH_COST orders"
	first=$((HISTORY + MEASURED))
	q -c "CREATE FUNCTION bench.backend_cpu_us() RETURNS bigint LANGUAGE sql AS \$\$
	          SELECT (split_part(s, ' ', 12)::bigint + split_part(s, ' ', 13)::bigint)
	                 * (1000000 / $(getconf CLK_TCK))
	          FROM (SELECT substr(t, strpos(t, ') ') + 2) AS s
	                FROM pg_catalog.pg_read_file('/proc/self/stat') t) x \$\$" \
		-c "CREATE PROCEDURE bench.rolled_back_batches(n integer)
	          LANGUAGE plpgsql AS \$\$
	          DECLARE m bytea[];
	          BEGIN
	              FOR i IN 1..n LOOP
	                  SELECT messages INTO m FROM cost_batches WHERE k = 1 + i % 50;
	                  PERFORM dwh.ingest_orders(m, 'order-service_orders');
	                  ROLLBACK;
	              END LOOP;
	          END \$\$" >/dev/null
	for size in $BATCH_COST; do
		# About 2 s of work a size: 0.5 ms a batch and 0.1 ms an order.
		rounds=$(calc "int(2000 / (0.5 + 0.1 * $size)) + 1")
		cost_us[$size]=$(q -At <<EOF
SET pg_stat_statements.track = none;
CREATE TEMP TABLE cost_batches AS
    SELECT k, bench.batch($first, $first + 50 * $size, k, $size) AS messages
    FROM generate_series(1, 50) k;
CALL bench.rolled_back_batches(5);
SELECT bench.backend_cpu_us() AS c0 \gset
CALL bench.rolled_back_batches($rounds);
SELECT (bench.backend_cpu_us() - :c0) / $rounds;
EOF
)
	done
fi

# ---------------------------------------------------------------- checks

verify_call='dwh.verify()'
# (A build older than dwh.verify(parts) checks everything at once.)
if [ "$VERIFY_PARTS" != 1 ] && [ "$(qv "SELECT to_regprocedure('dwh.verify(integer)') IS NOT NULL")" = t ]; then
	verify_call="dwh.verify($VERIFY_PARTS)"
fi
log "checking: $verify_call and an independent recount"
# The check's peak of temporary files, sampled every half second.
peak_file=$work/verify-temp-peak
(
	peak=0
	while :; do
		# (No folder until the first temporary file.)
		b=$(du -sb "$data"/base/pgsql_tmp 2>/dev/null | cut -f1) || b=0
		[ "${b:-0}" -le "$peak" ] || { peak=$b; echo "$peak" >"$peak_file"; }
		sleep 0.5
	done
) &
sampler=$!
t0=$(now)
verify=$(qv "SELECT count(*) FROM $verify_call")
t1=$(now)
kill "$sampler" 2>/dev/null || true
wait "$sampler" 2>/dev/null || true
verify_s=$(calc "$t1 - $t0")
verify_temp_mb=$(( $(cat "$peak_file" 2>/dev/null || echo 0) / 1048576 ))
recount=$(q -At -F ' ' -f - <<EOF
-- Expected marts straight from the generator (not from STG or DDS).
CREATE TEMP TABLE lines AS
    SELECT * FROM bench.order_lines(1, $HISTORY + $MEASURED) WHERE final_status = 'CLOSED';
CREATE TEMP TABLE exp_product AS
    SELECT dwh.hash_key(u.user_id) AS user_id, dwh.hash_key(d.dish_id) AS product_id,
           d.name, count(*)::integer AS cnt
    FROM lines l JOIN bench.users u ON u.idx = l.user_idx JOIN bench.dish d ON d.idx = l.dish_idx
    GROUP BY 1, 2, 3;
CREATE TEMP TABLE exp_category AS
    SELECT dwh.hash_key(u.user_id) AS user_id, dwh.hash_key(d.category) AS category_id,
           count(DISTINCT l.n)::integer AS cnt
    FROM lines l JOIN bench.users u ON u.idx = l.user_idx JOIN bench.dish d ON d.idx = l.dish_idx
    GROUP BY 1, 2;
SELECT (SELECT count(*) FROM stg.order_events),
       (SELECT count(*) FROM dds.h_order),
       (SELECT count(*) FROM dwh.dead_letters),
       (SELECT count(*) FROM exp_product),
       (SELECT count(*) FROM exp_product e FULL JOIN cdm.user_product_counters m
          ON m.user_id = e.user_id AND m.product_id = e.product_id
        WHERE e.cnt IS DISTINCT FROM m.order_cnt OR e.name IS DISTINCT FROM m.product_name),
       (SELECT count(*) FROM exp_category),
       (SELECT count(*) FROM exp_category e FULL JOIN cdm.user_category_counters m
          ON m.user_id = e.user_id AND m.category_id = e.category_id
        WHERE e.cnt IS DISTINCT FROM m.order_cnt),
       (SELECT coalesce(sum(applied), 0) FROM bench.results),
       (SELECT coalesce(sum(received - applied), 0) FROM bench.results);
EOF
)
read -r stg_rows hub_rows dead_rows exp_p bad_p exp_c bad_c meas_applied _ <<<"$recount"

# ---------------------------------------------------------------- report

cpu=$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)
pgver=$(qv "SELECT version()")
dbsize_mb=$(( size_after / 1048576 ))

hr() { printf '%s\n' "------------------------------------------------------------------------------"; }
rate() { awk "BEGIN { printf \"%d\", $1 / $2 }"; }

echo
echo "dwh SQL chain benchmark: STG -> DDS -> marts through dwh.ingest_orders(bytea[])"
hr
printf 'machine     %s CPUs (%s), %s MB RAM, %s\n' "$(nproc)" "$cpu" "$mem_mb" "$(uname -r)"
printf 'postgres    %s\n' "$pgver"
printf 'settings    shared_buffers=%s effective_cache_size=%sMB work_mem=64MB\n' "$shared_buffers" "$ecs"
printf '            maintenance_work_mem=1GB wal_buffers=64MB wal_compression=lz4\n'
printf '            max_wal_size=%s checkpoint_timeout=30min checkpoint_completion_target=0.9\n' "$MAX_WAL_SIZE"
printf '            synchronous_commit=%s jit=%s random_page_cost=1.1 autovacuum=on\n' "$SYNC_COMMIT" "$JIT"
printf '            fsync=on full_page_writes=on, all tables logged; locale C.UTF-8\n'
printf 'workload    %s users, 4 restaurants, 132 dishes in 10 categories (docs/formats.md 5)\n' "100"
printf '            history %s orders, measured %s orders, %s messages per call,\n' "$HISTORY" "$MEASURED" "$BATCH"
printf '            one call = one transaction = one commit; %s connection(s) in the measured\n' "$CLIENTS"
printf '            phase (1 for the history); ~%s bytes/message\n' "$msg_bytes"
hr
printf 'dictionaries  100 users + 4 menus loaded in %.2f s\n' "$dict_s"
if [ "$hist_batches" -gt 0 ]; then
	printf 'history       %s orders in %.1f s: %s orders/s (generation included)\n' \
		"$HISTORY" "$hist_s" "$(rate "$HISTORY" "$hist_s")"
	printf '              generation alone costs about %.0f orders/s worth of time\n' \
		"$(calc "$MEASURED / $gen_s")"
	echo "              rate per tenth of the history (orders already loaded -> orders/s):"
	q -At -F ' ' -c "
		WITH l AS (SELECT seq, usec, ntile(10) OVER (ORDER BY seq) AS tenth
		           FROM bench.latency WHERE phase = 'history')
		SELECT tenth, (min(seq) - 1) * $BATCH,
		       round(count(*) * $BATCH / (sum(usec) / 1e6))
		FROM l GROUP BY tenth ORDER BY tenth" >"$work/history-tenths.txt"
	awk '{ printf "                %9d -> %6d\n", $2, $3 }' "$work/history-tenths.txt"
	hist_first=$(awk 'NR == 1 { print $3 }' "$work/history-tenths.txt")
	hist_last=$(awk 'END { print $3 }' "$work/history-tenths.txt")
	printf '              last tenth / first tenth = %.2f\n' "$(calc "$hist_last / $hist_first")"
fi
printf 'vacuum        VACUUM ANALYZE + CHECKPOINT after the history: %.1f s\n' "$vacuum_s"
hr
echo "MEASURED: $MEASURED orders on top of $HISTORY (generated beforehand, not timed)"
q -At -F '|' -c "
	WITH l AS (SELECT seq, usec, count(*) OVER () AS n
	           FROM bench.latency WHERE phase = 'measured'),
	r AS (SELECT l.*, coalesce(b.received, $BATCH) AS orders,
	             l.seq <= ceil(l.n / 10.0) AS first_tenth,
	             l.seq > l.n - ceil(l.n / 10.0) AS last_tenth
	      FROM l LEFT JOIN bench.results b ON b.k = l.seq)
	SELECT round($MEASURED / $meas_s),
	       round(sum(orders) / (sum(usec) / 1e6)),
	       round(sum(orders) FILTER (WHERE first_tenth) / (sum(usec) FILTER (WHERE first_tenth) / 1e6)),
	       round(sum(orders) FILTER (WHERE last_tenth) / (sum(usec) FILTER (WHERE last_tenth) / 1e6)),
	       round((percentile_cont(0.5) WITHIN GROUP (ORDER BY usec) / 1000)::numeric, 1),
	       round((percentile_cont(0.99) WITHIN GROUP (ORDER BY usec) / 1000)::numeric, 1),
	       round(max(usec) / 1000.0, 1)
	FROM r" | {
	IFS='|' read -r overall busy first last p50 p99 pmax
	printf '  orders/s overall (wall clock)        %8s   (%.1f s)\n' "$overall" "$meas_s"
	printf '  orders/s inside the calls            %8s   (sum of batch latencies%s)\n' "$busy" \
		"$([ "$CLIENTS" -gt 1 ] && echo ', per connection')"
	printf '  orders/s first 10%% of batches        %8s\n' "$first"
	printf '  orders/s last 10%% of batches         %8s   (last/first = %s)\n' "$last" \
		"$(awk "BEGIN { printf \"%.2f\", $last / $first }")"
	printf '  batch latency p50 / p99 / max (ms)   %8s / %s / %s\n' "$p50" "$p99" "$pmax"
}
printf '  orders/s per tenth of the batches   '
q -At -c "
	WITH l AS (SELECT seq, usec, ntile(10) OVER (ORDER BY seq) AS tenth
	           FROM bench.latency WHERE phase = 'measured')
	SELECT string_agg(r::text, ' ' ORDER BY tenth)
	FROM (SELECT tenth, round(count(*) * $BATCH / (sum(usec) / 1e6)) AS r
	      FROM l GROUP BY tenth) x"
echo "  (the phase starts right after a CHECKPOINT: the first batches write a full-page"
echo "   image of every index page they touch, and random UUID keys touch many)"
q -At -F '|' -c "
	SELECT round(wal_bytes / $MEASURED), round(wal_fpi::numeric / $MEASURED, 2),
	       (SELECT checkpoints_timed + checkpoints_req FROM bench.bgwriter)
	FROM bench.wal" | {
	IFS='|' read -r walb fpi ckpt
	printf '  WAL per order                        %8s bytes (%s full-page images), %s checkpoint(s)\n' \
		"$walb" "$fpi" "$ckpt"
}
printf '  database size                        %8s MB (+%s MB in the measured phase)\n' \
	"$dbsize_mb" "$(( (size_after - size_before) / 1048576 ))"
printf '  applied %s of %s measured messages\n' "$meas_applied" "$MEASURED"
hr
echo "WHERE THE TIME GOES (pg_stat_statements, track = all, measured phase only)"
echo "  % = share of the time of the top-level ingest calls; nested statements are"
echo "  included in the statement that runs them (the STG upsert includes its"
echo "  AFTER triggers, a trigger's SELECT dwh.f() includes f's statements)."
q -P pager=off -P border=0 -P footer=off -c "
	WITH top AS (SELECT sum(total_exec_time) AS t FROM bench.statements
	             WHERE toplevel AND query ILIKE '%ingest_orders%')
	SELECT round((100 * s.total_exec_time / top.t)::numeric, 1) AS \"%\",
	       s.calls,
	       round((s.total_exec_time / s.calls)::numeric, 2) AS \"ms/call\",
	       round(s.rows::numeric / s.calls, 0) AS \"rows/call\",
	       round(s.shared_blks_hit::numeric / s.calls) AS \"hit/call\",
	       round(s.shared_blks_read::numeric / s.calls) AS \"read/call\",
	       CASE WHEN s.toplevel THEN '[top] ' ELSE '' END ||
	       left(regexp_replace(s.query, '\\s+', ' ', 'g'), 88) AS statement
	FROM bench.statements s, top
	WHERE s.total_exec_time >= 0.002 * top.t
	ORDER BY s.total_exec_time DESC
	LIMIT 22"
if [ "$explain_ok" = 1 ]; then
	hr
	echo "PLAN NODES BY OWN TIME (auto_explain ANALYZE of one extra batch of $BATCH, rolled back;"
	echo "timing inflates them, most of all the foreign-key checks, each logging a plan of its"
	echo "own: take their share from pg_stat_statements above; a node that calls a function"
	echo "includes the function's statements)"
	/usr/bin/python3 "$here/sql_chain_explain.py" "$work/explain.txt" 14 || true
fi
if [ -n "$BATCH_COST" ]; then
	hr
	echo "CPU OF A BATCH BY ITS SIZE (new orders, each batch rolled back; the backend's CPU time)"
	printf '  %14s %14s %16s\n' "orders a batch" "ms a batch" "us an order"
	for size in $BATCH_COST; do
		printf '  %14s %14.2f %16.0f\n' "$size" "$(calc "${cost_us[$size]} / 1000")" \
			"$(calc "${cost_us[$size]} / $size")"
	done
fi
hr
echo "CHECKS"
printf '  %-36s %s   (%.1f s, temporary files at most %s MB)%s\n' "SELECT count(*) FROM $verify_call" \
	"$verify" "$verify_s" "$verify_temp_mb" \
	"$([ "$verify" = 0 ] && echo '' || echo '   <-- MARTS INCONSISTENT')"
printf '  recount from the generator           product rows %s expected, %s differ;\n' "$exp_p" "$bad_p"
printf '                                       category rows %s expected, %s differ\n' "$exp_c" "$bad_c"
printf '  stg.order_events %s, dds.h_order %s, dead letters %s (expected %s, %s, 0)\n' \
	"$stg_rows" "$hub_rows" "$dead_rows" "$((HISTORY + MEASURED))" "$((HISTORY + MEASURED))"
hr
if [ "$verify" != 0 ] || [ "$bad_p" != 0 ] || [ "$bad_c" != 0 ] || [ "$dead_rows" != 0 ] ||
	[ "$stg_rows" != $((HISTORY + MEASURED)) ]; then
	echo "RESULT: the marts are NOT consistent; the figures above do not count"
	exit 1
fi

# Machine-readable figures for bench/run-all.sh.
echo "RESULT sql_chain_clients=$CLIENTS"
echo "RESULT sql_chain_history=$HISTORY"
echo "RESULT sql_chain_measured=$MEASURED"
echo "RESULT sql_chain_orders_per_s=$(rate "$MEASURED" "$meas_s")"
if [ -n "${hist_first:-}" ]; then
	echo "RESULT sql_chain_history_first_tenth_orders_per_s=$hist_first"
	echo "RESULT sql_chain_history_last_tenth_orders_per_s=$hist_last"
	printf 'RESULT sql_chain_history_last_vs_first=%.2f\n' "$(calc "$hist_last / $hist_first")"
fi
echo "RESULT sql_chain_consistent=yes"
for size in $BATCH_COST; do
	echo "RESULT sql_chain_batch_cpu_us_$size=${cost_us[$size]}"
done
echo "RESULT sql_chain_verify_parts=$VERIFY_PARTS"
printf 'RESULT sql_chain_verify_s=%.0f\n' "$verify_s"
echo "RESULT sql_chain_verify_temp_peak_mb=$verify_temp_mb"
