#!/usr/bin/env bash
#
# The dwh benchmark suite in one command: runs the SQL chain benchmark (one
# and two connections), the Kafka drain (without tag rules, then with 20),
# the Kafka freshness (at three rates, then at 1,000 orders/s with 20 tag
# rules) and the Redis mirror benchmarks one after the other, keeps each
# one's full output, and
# prints one table of their key figures (the "RESULT key=value" lines each
# script ends with) under a description of the machine and the versions.
#
# Each benchmark starts its own throw-away cluster (and broker, Redis) and
# removes it.  Full sizes take about half an hour on 2 cores; BENCH_QUICK=1
# runs smaller sizes in a few minutes (to compare two builds side by side,
# run both at the same size on the same machine).
#
# Usage: bench/run-all.sh
# Environment: BENCH_QUICK (0; 1: smaller sizes), BENCH_ONLY (names of the
#   runs to do among sql1 sql2 history drain drain_tags freshness
#   freshness_tags redis, where drain and freshness include their runs
#   with tags; default all but history: the SQL chain on 10,000,000 orders
#   of history,
#   BENCH_LONG_HISTORY, about an hour),
#   BENCH_OUT (folder of the logs, data files and images, default
#   /tmp/dwh-bench-YYYYmmdd-HHMMSS: drain-lag.png, drain-lag-tags.png,
#   freshness.png),
#   BENCH_SKIP_INSTALL (0: tools/install-deps.sh when root, and make
#   install once first), BENCH_DIR (/tmp),
#   PG_CONFIG (/usr/lib/postgresql/15/bin/pg_config),
#   BENCH_BASELINE (a commit to measure beside this build, such as
#   42f1c82, the last one before adaptive batching: bench/build_baseline.sh
#   builds it into a private copy of PostgreSQL under BENCH_OUT/baseline,
#   and each run named in BENCH_BASELINE_RUNS is done with it first, then
#   with this build; the suite's table then ends with the goals of
#   docs/benchmarks.md, baseline and this build side by side),
#   BENCH_BASELINE_RUNS (sql1 history drain freshness_trickle
#   freshness_1000 freshness_5000; runs of BENCH_ONLY only),
#   BENCH_ROUNDS (1: each run is done that many times, alternating with
#   the baseline's, and the table gives the median of each figure; the
#   logs are KEY.rN.log, the images those of the last round).
#
# Sizes (full / quick): SQL chain history 1,000,000 / 100,000 orders and
# 100,000 / 20,000 measured; Kafka drain 1,000,000 / 100,000 orders (with
# and without tags); freshness at 5 orders a minute 240 / 60 s, at 1,000
# orders/s 60 / 20 s (with and without tags), at 5,000 orders/s 30 / 10 s;
# Redis 100,000 / 20,000 users,
# 1,000 / 200 restaurants, 10,000 / 2,000 dishes.

set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
QUICK=${BENCH_QUICK:-0}
ONLY=${BENCH_ONLY:-sql1 sql2 drain freshness redis}
OUT=${BENCH_OUT:-/tmp/dwh-bench-$(date +%Y%m%d-%H%M%S)}
PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}
export PG_CONFIG
# shellcheck source=kafka_common.sh
. "$here/kafka_common.sh"   # kafka_version

mkdir -p "$OUT"

if [ "${BENCH_SKIP_INSTALL:-0}" != 1 ]; then
	# What the benchmarks need (the broker's jars, kcat, gnuplot for the
	# images); quick when all of it is there.
	if [ "$(id -u)" = 0 ] && ! "$root/tools/install-deps.sh" >"$OUT/install-deps.log" 2>&1; then
		echo "tools/install-deps.sh failed: see $OUT/install-deps.log" >&2
		exit 1
	fi
	echo "building and installing the extension (make install)"
	if ! make -s -C "$root" PG_CONFIG="$PG_CONFIG" >/dev/null ||
		! make -s -C "$root" PG_CONFIG="$PG_CONFIG" install >/dev/null; then
		exit 1
	fi
fi

BASELINE=${BENCH_BASELINE:-}
BASELINE_RUNS=${BENCH_BASELINE_RUNS:-sql1 history drain freshness_trickle freshness_1000 freshness_5000}
base_pg_config=
base_commit=
if [ -n "$BASELINE" ]; then
	echo "building the baseline $BASELINE into $OUT/baseline (bench/build_baseline.sh)"
	base_pg_config=$("$here/build_baseline.sh" "$BASELINE" "$OUT/baseline" | tail -n 1) || exit 1
	base_commit=$(git -C "$root" rev-parse --short "$BASELINE")
	mkdir -p "$OUT/baseline/plots"
fi

if [ "$QUICK" = 1 ]; then
	sql_sizes=(BENCH_HISTORY=100000 BENCH_MEASURED=20000)
	drain_sizes=(BENCH_ORDERS=100000)
	fresh_seconds=(60 20 10)
	redis_sizes=(BENCH_USERS=20000 BENCH_RESTAURANTS=200 BENCH_DISHES=2000)
else
	sql_sizes=(BENCH_HISTORY=1000000 BENCH_MEASURED=100000)
	drain_sizes=(BENCH_ORDERS=1000000)
	fresh_seconds=(240 60 30)
	redis_sizes=(BENCH_USERS=100000 BENCH_RESTAURANTS=1000 BENCH_DISHES=10000)
fi

# The commit measured: the one installed at the start.
commit=$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo '?')
git -C "$root" diff --quiet HEAD 2>/dev/null || commit+=" (with uncommitted changes)"

ROUNDS=${BENCH_ROUNDS:-1}
case $ROUNDS in
'' | *[!0-9]* | 0) echo "BENCH_ROUNDS must be a positive integer" >&2; exit 1 ;;
esac

# R[KEY.key]: a run's figure (the median of its rounds); RS[KEY.key]: the
# figure of each round, one per line.
declare -A R
declare -A RS
declare -A STATUS
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
started=$(date -u '+%Y-%m-%d %H:%M UTC')

# run_one KEY ROUND SCRIPT VAR=VALUE...: run a benchmark, keep its output in
# KEY.log (KEY.rROUND.log with rounds), add its RESULT lines to RS[KEY.key].
run_one() {
	local key=$1 round=$2 script=$3 t0 rc log
	shift 3
	log=$OUT/$key.log
	[ "$ROUNDS" = 1 ] || log=$OUT/$key.r$round.log
	echo "== $key: $script $* (log $log)"
	t0=$SECONDS
	env BENCH_SKIP_INSTALL=1 BENCH_PLOT_DIR="$OUT" "$@" "$here/$script" >"$log" 2>&1
	rc=$?
	while IFS='=' read -r k value; do
		RS[$key.$k]+=$value$'\n'
	done < <(sed -n -E 's/^RESULT ([a-z0-9_]+=.*)$/\1/p' "$log")
	if [ "$rc" = 0 ]; then
		[ -n "${STATUS[$key]:-}" ] || STATUS[$key]=ok
	else
		STATUS[$key]="FAILED (exit $rc)"
		tail -n 15 "$log" | sed 's/^/   | /'
	fi
	echo "   exit $rc in $((SECONDS - t0)) s"
}

# R[KEY.key] from RS: the median of the rounds' figures when they are all
# numbers, the figure when all rounds agree, else each round's.
summarise() {
	local key=$1 k vals
	for k in "${!RS[@]}"; do
		[ "${k%.*}" = "$key" ] || continue
		vals=$(printf '%s' "${RS[$k]}")
		if ! grep -qvE '^-?[0-9]+(\.[0-9]+)?$' <<<"$vals"; then
			R[$k]=$(sort -g <<<"$vals" | awk '{ v[NR] = $0 }
				END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }')
		elif [ "$(sort -u <<<"$vals" | wc -l)" = 1 ]; then
			R[$k]=$(head -n 1 <<<"$vals")
		else
			R[$k]=$(paste -sd, <<<"$vals")
		fi
	done
}

# run NAME SCRIPT VAR=VALUE...: a run of BENCH_ONLY, with the baseline
# first (as base.NAME, its images in baseline/plots) when it is one of
# BENCH_BASELINE_RUNS.
run() {
	local name=$1 script=$2 round base=0
	shift 2
	case " $ONLY " in *" $name "* | *" ${name%%_*} "*) ;; *) return ;; esac
	if [ -n "$BASELINE" ]; then
		case " $BASELINE_RUNS " in *" $name "*) base=1 ;; esac
	fi
	for round in $(seq "$ROUNDS"); do
		[ "$base" = 0 ] ||
			run_one "base.$name" "$round" "$script" "$@" PG_CONFIG="$base_pg_config" \
				BENCH_PLOT_DIR="$OUT/baseline/plots"
		run_one "$name" "$round" "$script" "$@"
	done
	[ "$base" = 0 ] || summarise "base.$name"
	summarise "$name"
}

run sql1 sql_chain.sh "${sql_sizes[@]}" BENCH_CLIENTS=1 BENCH_EXPLAIN=0
run sql2 sql_chain.sh "${sql_sizes[@]}" BENCH_CLIENTS=2 BENCH_EXPLAIN=0
# Not in the default set (about an hour): the SQL chain on top of a
# history of 10,000,000 orders, the rate per tenth of the history.  Its
# data take about 25 GB and its WAL up to about 16 GB (max_wal_size, as in
# the other runs); the check is made in BENCH_VERIFY_PARTS parts (16), each
# with its own temporary files.
run history sql_chain.sh BENCH_HISTORY="${BENCH_LONG_HISTORY:-10000000}" BENCH_MEASURED=100000 \
	BENCH_CLIENTS=1 BENCH_EXPLAIN=0 BENCH_VERIFY_PARTS="${BENCH_VERIFY_PARTS:-16}"
run drain kafka_drain.sh "${drain_sizes[@]}"
# The same drain with 20 user tag rules of mixed kinds defined before it
# (bench_tag_rules in kafka_common.sh): the cost of keeping the tags.
run drain_tags kafka_drain.sh "${drain_sizes[@]}" BENCH_TAG_RULES=20
# Freshness at a trickle (5 orders a minute, each one alone), at 1,000 and
# at 5,000 orders a second.
fresh_rates=(0.0833 1000 5000)
fresh_names=(freshness_trickle freshness_1000 freshness_5000)
for i in 0 1 2; do
	run "${fresh_names[$i]}" kafka_freshness.sh BENCH_RATE="${fresh_rates[$i]}" \
		BENCH_SECONDS="${fresh_seconds[$i]}" BENCH_WINDOW="$((fresh_seconds[i] / 3))" \
		BENCH_LABEL="${fresh_names[$i]#freshness_}"
done
# Freshness at 1,000 orders/s with the 20 tag rules: the orders' latency
# and the tag events'.
run freshness_tags kafka_freshness.sh BENCH_RATE=1000 BENCH_SECONDS="${fresh_seconds[1]}" \
	BENCH_WINDOW="$((fresh_seconds[1] / 3))" BENCH_LABEL=tags_1000 BENCH_TAG_RULES=20
# The three latency distributions in one image.
plots=()
for i in 0 1 2; do
	f=$OUT/freshness-${fresh_names[$i]#freshness_}.tsv
	[ -s "$f" ] && plots+=("\"$f\" using 1:2 with steps lw 2 lc $((i + 1)) title \"${fresh_rates[$i]} orders/s\"")
	f=$OUT/baseline/plots/freshness-${fresh_names[$i]#freshness_}.tsv
	[ -s "$f" ] && plots+=("\"$f\" using 1:2 with steps lw 1 dt 2 lc $((i + 1)) title \"${fresh_rates[$i]} orders/s, $base_commit\"")
done
if [ ${#plots[@]} -gt 0 ]; then
	bench_plot "$OUT/freshness.png" <<PLOT
set title "dwh: produce -> visible in the marts (2 workers, 4 partitions)"
set xlabel "latency (ms, log scale)"
set ylabel "fraction of orders visible"
set logscale x
set grid
set key top left
plot $(IFS=,; echo "${plots[*]}")
PLOT
fi
run redis redis_mirror.sh "${redis_sizes[@]}"

# A figure, or "-" when its run was skipped or failed before printing it.
v() { printf '%s' "${R[$1]:--}"; }
# $1 / $2 as a percentage, or "-".
ratio()
{
	if [ "$1" = - ] || [ "$2" = - ] || [ "$2" = 0 ]; then
		echo -
	else
		awk -v a="$1" -v b="$2" 'BEGIN { printf "%.0f%%", 100 * a / b }'
	fi
}
kb_mb()
{
	if [ "$1" = - ]; then
		echo -
	else
		awk -v k="$1" 'BEGIN { printf "%.0f", k / 1024 }'
	fi
}
# Microseconds as milliseconds, or "-".
ms()
{
	if [ "$1" = - ]; then
		echo -
	else
		awk -v u="$1" 'BEGIN { printf "%.2f", u / 1000 }'
	fi
}
pkg() { dpkg-query -W -f '${Version}' "$1" 2>/dev/null || echo '?'; }
bin=$("$PG_CONFIG" --bindir)
dev=$(findmnt -n -o SOURCE --target "${BENCH_DIR:-/tmp}" 2>/dev/null | sed 's/\[.*//')
disk=$(lsblk -d -n -o NAME,SIZE,ROTA,MODEL "$dev" 2>/dev/null | awk '{ printf "%s %s %s %s", $1, $2, ($3 == 1 ? "(reported rotational)" : "(non-rotational)"), $4 }')

line() { printf '%s\n' "-------------------------------------------------------------------------------"; }
row() { printf '%-50s %s\n' "$1" "$2"; }

echo
echo "dwh benchmark suite$([ "$QUICK" = 1 ] && echo ' (quick sizes)')"
line
row "date" "$started"
row "machine" "$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo), $(nproc) cores, $(awk '/^MemTotal:/ { printf "%.0f GB", $2 / 1048576 }' /proc/meminfo) RAM"
row "disk" "${disk:-?} ($(df -h --output=size,avail "${BENCH_DIR:-/tmp}" | awk 'NR == 2 { print $1 " total, " $2 " free" }'))"
row "kernel" "$(uname -sr)"
row "load average before / after" "$load_before / $(cut -d' ' -f1-3 /proc/loadavg)"
row "PostgreSQL" "$("$bin/postgres" --version | sed 's/^postgres (PostgreSQL) //')"
row "librdkafka / Kafka broker / hiredis" "$(pkg librdkafka1) / $(kafka_version) / $(pkg libhiredis0.14)"
row "dwh commit" "$commit"
[ -z "$BASELINE" ] || row "baseline (runs marked base. in the logs)" "$base_commit"
[ "$ROUNDS" = 1 ] || row "figures" "the median of $ROUNDS rounds (each round: the baseline first)"
line
row "SQL chain, 1 connection" "$(v sql1.sql_chain_orders_per_s) orders/s  (history $(v sql1.sql_chain_history), $(v sql1.sql_chain_measured) measured)"
row "SQL chain, 2 connections" "$(v sql2.sql_chain_orders_per_s) orders/s"
row "  loading the history, first / last tenth" "$(v sql1.sql_chain_history_first_tenth_orders_per_s) / $(v sql1.sql_chain_history_last_tenth_orders_per_s) orders/s (last/first $(v sql1.sql_chain_history_last_vs_first))"
row "  CPU of a batch of 1 / 10 / 100 / 1000 orders" "$(ms "$(v sql1.sql_chain_batch_cpu_us_1)") / $(ms "$(v sql1.sql_chain_batch_cpu_us_10)") / $(ms "$(v sql1.sql_chain_batch_cpu_us_100)") / $(ms "$(v sql1.sql_chain_batch_cpu_us_1000)") ms (rolled back, new orders)"
if [ -n "${STATUS[history]:-}" ]; then
	row "SQL chain on $(v history.sql_chain_history) orders of history" "$(v history.sql_chain_orders_per_s) orders/s"
	row "  loading the history, first / last tenth" "$(v history.sql_chain_history_first_tenth_orders_per_s) / $(v history.sql_chain_history_last_tenth_orders_per_s) orders/s (last/first $(v history.sql_chain_history_last_vs_first))"
	row "  its check, dwh.verify in $(v history.sql_chain_verify_parts) parts" "$(v history.sql_chain_verify_s) s, temporary files at most $(v history.sql_chain_verify_temp_peak_mb) MB"
fi
row "Kafka drain, $(v drain.kafka_drain_consumers) workers, $(v drain.kafka_drain_partitions) partitions" "$(v drain.kafka_drain_orders_per_s) orders/s, $(v drain.kafka_drain_messages_per_s) messages/s  ($(v drain.kafka_drain_orders) orders in $(v drain.kafka_drain_s) s)"
row "  worker CPU" "$(v drain.kafka_drain_orders_per_worker_cpu_s) orders per CPU-second of the workers"
row "  CPU: workers / broker / rest of the machine" "$(v drain.kafka_drain_cpu_workers_pct)% / $(v drain.kafka_drain_cpu_broker_pct)% / $(v drain.kafka_drain_cpu_other_pct)% of one core"
row "Kafka drain with $(v drain_tags.kafka_drain_tag_rules) tag rules" "$(v drain_tags.kafka_drain_orders_per_s) orders/s  ($(v drain_tags.kafka_drain_tags) tags held, $(v drain_tags.kafka_drain_tag_events) events)"
row "  worker CPU" "$(v drain_tags.kafka_drain_orders_per_worker_cpu_s) orders per CPU-second of the workers"
row "  with tags / without" "$(ratio "$(v drain_tags.kafka_drain_orders_per_s)" "$(v drain.kafka_drain_orders_per_s)") of the rate, $(ratio "$(v drain_tags.kafka_drain_orders_per_worker_cpu_s)" "$(v drain.kafka_drain_orders_per_worker_cpu_s)") per worker CPU-second"
row "Kafka worker peak private memory" "$(kb_mb "$(v drain.kafka_worker_peak_anon_kb)") MB vs bound $(kb_mb "$(v drain.kafka_worker_bound_kb)") MB (32 MB + 5 x prefetch + work_mem): held $(v drain.kafka_worker_bound_held)"
row "Freshness, produce -> visible (ms)" "p50 / p90 / p99 / max  (orders measured, achieved rate)"
for i in 0 1 2; do
	n=${fresh_names[$i]}
	row "  at ${fresh_rates[$i]} orders/s" "$(v "$n.freshness_p50_ms") / $(v "$n.freshness_p90_ms") / $(v "$n.freshness_p99_ms") / $(v "$n.freshness_max_ms")  ($(v "$n.freshness_orders_measured") orders, $(v "$n.freshness_achieved_orders_per_s") orders/s)"
	row "    CPU: workers / broker / machine" "$(v "$n.freshness_cpu_workers_pct")% / $(v "$n.freshness_cpu_broker_pct")% / $(v "$n.freshness_cpu_machine_pct")% of one core"
	row "    batches, workers busy" "$(v "$n.freshness_batch_mean_messages") messages each, applying $(v "$n.freshness_workers_busy_pct")% of the time"
done
row "  at 1000 orders/s, $(v freshness_tags.freshness_tag_rules) tag rules: orders" "$(v freshness_tags.freshness_p50_ms) / $(v freshness_tags.freshness_p90_ms) / $(v freshness_tags.freshness_p99_ms) / $(v freshness_tags.freshness_max_ms)  ($(v freshness_tags.freshness_orders_measured) orders, $(v freshness_tags.freshness_achieved_orders_per_s) orders/s)"
row "    tag events (produce -> grant/revoke visible)" "$(v freshness_tags.freshness_tag_p50_ms) / $(v freshness_tags.freshness_tag_p90_ms) / $(v freshness_tags.freshness_tag_p99_ms) / $(v freshness_tags.freshness_tag_max_ms)  ($(v freshness_tags.freshness_tag_events_measured) events)"
row "Redis mirror, $(v redis.redis_users) users + $(v redis.redis_restaurants) restaurants" "$(v redis.redis_mirror_s) s"
row "Redis refresh pass: unchanged / SCAN / 1% changed" "$(v redis.redis_refresh_unchanged_ms) / $(v redis.redis_refresh_scan_ms) / $(v redis.redis_refresh_changed_ms) ms"
line
if [ -n "$BASELINE" ]; then
	# The goals (docs/benchmarks.md, "Goals"): the baseline, this build.
	us()
	{
		if [ "$1" = - ]; then
			echo -
		else
			awk -v n="$1" 'BEGIN { printf "%.0f", 1e6 / n }'
		fi
	}
	hist=history
	[ -n "${STATUS[history]:-}" ] || hist=sql1
	goal() { printf '%-38s %17s %17s  %s\n' "$1" "$2" "$3" "$4"; }
	goal "goal figure" "$base_commit" "${commit%% *}" "goal"
	f1k=() ftr=() f5k=() drn=() cpu=() tenth=() sql=() b10=()
	for p in base. ''; do
		f1k+=("$(v "${p}freshness_1000.freshness_p50_ms") / $(v "${p}freshness_1000.freshness_p99_ms")")
		ftr+=("$(v "${p}freshness_trickle.freshness_p99_ms")")
		f5k+=("$(v "${p}freshness_5000.freshness_p99_ms")")
		drn+=("$(v "${p}drain.kafka_drain_orders_per_s")")
		cpu+=("$(us "$(v "${p}drain.kafka_drain_orders_per_worker_cpu_s")")")
		tenth+=("$(v "${p}$hist.sql_chain_history_last_vs_first")")
		sql+=("$(v "${p}sql1.sql_chain_orders_per_s")")
		b10+=("$(ms "$(v "${p}sql1.sql_chain_batch_cpu_us_10")")")
	done
	goal "produce -> visible, 1000/s p50 / p99" "${f1k[0]}" "${f1k[1]}" "<= 15 / <= 50 ms"
	goal "produce -> visible, 5 a minute, p99" "${ftr[0]}" "${ftr[1]}" "<= 20 ms"
	goal "produce -> visible, 5000/s, p99" "${f5k[0]}" "${f5k[1]}" "<= 100 ms"
	goal "drain, $(v drain.kafka_drain_orders) orders (orders/s)" "${drn[0]}" "${drn[1]}" "not lower; 15000"
	goal "worker CPU per order in the drain (us)" "${cpu[0]}" "${cpu[1]}" "<= 90"
	goal "history $(v "$hist.sql_chain_history"), last / first tenth" "${tenth[0]}" "${tenth[1]}" ">= 0.90"
	goal "SQL chain, 1 connection (orders/s)" "${sql[0]}" "${sql[1]}" "not lower"
	goal "CPU of a batch of 10 new orders (ms)" "${b10[0]}" "${b10[1]}" "(what 1000/s pays)"
	line
fi
failed=0
for name in sql1 sql2 history drain drain_tags "${fresh_names[@]}" freshness_tags redis; do
	for key in "base.$name" "$name"; do
		[ -n "${STATUS[$key]:-}" ] || continue
		row "run $key" "${STATUS[$key]}"
		[ "${STATUS[$key]}" = ok ] || failed=1
	done
done
row "logs" "$OUT"
exit $failed
