#!/usr/bin/env bash
#
# Benchmark of the Kafka consumers draining a backlog into the marts.
#
# Starts a throw-away Kafka broker (tools/kafka/kafka.sh, one topic of
# PARTITIONS partitions) and a throw-away PostgreSQL cluster with dwh
# preloaded and CONSUMERS Kafka workers; pre-produces ORDERS orders of the
# generator's default mix (tools/dwh-gen: redelivered duplicates, status
# changes, out-of-order versions, 1% malformed messages) with kcat, loads
# the dictionaries into STG, and only then points the workers at the broker
# (ALTER SYSTEM SET dwh.kafka_brokers; pg_reload_conf()).  The orders are
# dated 15 s apart up to about now.  With BENCH_TAG_RULES=N, N user tag
# rules of mixed kinds (bench_tag_rules in kafka_common.sh: categories,
# dishes, all orders, the favourite category, a quarter of them windowed)
# are defined before the drain, so that every batch keeps the tags too.
# It times the drain until every message is applied and prints:
#
#   - orders/s and messages/s over the whole drain;
#   - the lag over time (a sample every SAMPLE seconds: elapsed, messages
#     applied, lag, rate in the interval, each worker's resident memory);
#   - each worker's peak memory (VmHWM, and the peak of its private memory
#     RssAnon sampled every 0.2 s) against the documented bound of
#     32 MB + 5 x dwh.kafka_prefetch_memory + work_mem, and whether the
#     bound held;
#   - where the CPU went during the drain (workers, rest of PostgreSQL,
#     broker JVM, everything else on the machine), from /proc.
#
# Ends with dwh.verify() empty (the tags recounted too), every message
# accounted for and the marts equal to the generator's manifest.  A benchmark that reports figures, not
# a test with a threshold.  The last lines are "RESULT key=value" lines for
# bench/run-all.sh.
#
# Usage: bench/kafka_drain.sh
# Environment: BENCH_ORDERS (1000000), BENCH_CONSUMERS (2),
#   BENCH_PARTITIONS (4), BENCH_SAMPLE (5: seconds between lag samples),
#   BENCH_SEED (1: generator seed), BENCH_WAL_SEGMENTS (WAL segments made
#   ready before the drain, as on a server in service; default: enough for
#   the orders at 5 kB each; 0: none),
#   BENCH_PREFETCH_MEMORY, BENCH_BATCH_SIZE
#   (dwh.kafka_prefetch_memory, dwh.kafka_batch_size; default: the
#   settings' defaults), BENCH_SHARED_BUFFERS (25% of RAM, at most 8GB),
#   BENCH_PERF (0; 1: perf samples the workers, a profile at the end),
#   BENCH_STATEMENTS (0; 1: pg_stat_statements, the workers' statements by
#   time at the end),
#   BENCH_TAG_RULES (0: user tag rules defined before the drain),
#   BENCH_TAG_WINDOWS (1; 0: the rules that have a window count all of time),
#   BENCH_PLOT_DIR (none: where the lag over time goes, as drain-lag.tsv
#   and drain-lag.png; with tag rules drain-lag-tags.*), BENCH_KEEP (0: remove everything), BENCH_SKIP_INSTALL (0: make install
#   first), BENCH_DIR (/tmp), PG_CONFIG (/usr/lib/postgresql/15/bin/pg_config).

set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
# shellcheck source=kafka_common.sh
. "$here/kafka_common.sh"

ORDERS=${BENCH_ORDERS:-1000000}
SAMPLE=${BENCH_SAMPLE:-5}
SEED=${BENCH_SEED:-1}

extra=""
[ -z "${BENCH_PREFETCH_MEMORY:-}" ] || extra+="dwh.kafka_prefetch_memory = '$BENCH_PREFETCH_MEMORY'"$'\n'
[ -z "${BENCH_BATCH_SIZE:-}" ] || extra+="dwh.kafka_batch_size = $BENCH_BATCH_SIZE"$'\n'

bench_install
bench_workdir kafka-drain
bench_broker_start

log "generating $ORDERS orders (dwh-gen, default mix, seed $SEED)"
$GEN orders --count "$ORDERS" --seed "$SEED" --start "$(bench_orders_start "$ORDERS")" \
	--manifest "$work/manifest.json" >"$work/orders.txt"
messages=$(manifest "$work/manifest.json" messages)
msg_bytes=$(($(stat -c %s "$work/orders.txt") / messages))

log "producing $messages messages with kcat"
t0=$(now)
bench_produce_file "$work/orders.txt"
t1=$(now)
produce_s=$(calc "$t1 - $t0")
held=$(bench_topic_messages)
[ "$held" = "$messages" ] || { echo "the topic holds $held messages, not $messages" >&2; exit 1; }
rm -f "$work/orders.txt"

log "starting PostgreSQL ($CONSUMERS Kafka workers) and loading the dictionaries"
bench_cluster_start "$extra"
bench_load_dictionaries
rules_defined=$(bench_tag_rules)
[ "$rules_defined" = "$TAG_RULES" ] || { echo "$rules_defined tag rules defined, not $TAG_RULES" >&2; exit 1; }
bench_checkpoint "$ORDERS"

prefetch_kb=$(q "SELECT setting FROM pg_settings WHERE name = 'dwh.kafka_prefetch_memory'")
batch_size=$(q "SHOW dwh.kafka_batch_size")
batch_wait=$(q "SHOW dwh.kafka_batch_wait")
work_mem_kb=$(q "SELECT setting FROM pg_settings WHERE name = 'work_mem'")
# The README's bound: librdkafka's queue and one fetch response (1.5 x the
# prefetch memory), applying one batch (at most an eighth of it in data,
# about sixteen times that in memory: 2 x), with room for the allocator's
# slack (5 x in all, measured 4.3 to 4.6), and what any backend running
# the ingest needs (caches, plans: 32 MB; a sort or hash: work_mem).
bound_kb=$((32 * 1024 + prefetch_kb * 5 + work_mem_kb))

# The workers run (idle: no broker set) from the start; their pids stay.
pids=$(bench_worker_pids)
[ "$(wc -w <<<"$pids")" = "$CONSUMERS" ] ||
	{ echo "expected $CONSUMERS Kafka workers in dwh.status, found: $pids" >&2; exit 1; }
status_kb() { awk -v f="$2:" '$1 == f { print $2 }' "/proc/$1/status" 2>/dev/null || echo 0; }
declare -A idle_anon
for wp in $pids; do
	idle_anon[$wp]=$(status_kb "${wp#*=}" RssAnon)
done

# Memory of each worker every 0.2 s: elapsed pid VmRSS RssAnon RssShmem (kB).
(
	start=$(date +%s%N)
	while :; do
		e=$((($(date +%s%N) - start) / 1000000))
		for wp in $pids; do
			p=${wp#*=}
			awk -v e="$e" -v p="$p" '
				$1 == "VmRSS:" { r = $2 } $1 == "RssAnon:" { a = $2 } $1 == "RssShmem:" { s = $2 }
				END { if (r != "") print e, p, r, a, s }' "/proc/$p/status" 2>/dev/null
		done
		sleep 0.2
	done
) >"$work/memory.log" &
bench_children=$!

# With BENCH_PERF=1, where the workers' CPU goes: perf samples both
# workers (call graphs) for the whole drain.
perf_pid=""
if [ "${BENCH_PERF:-0}" = 1 ]; then
	command -v perf >/dev/null || { echo "BENCH_PERF=1 needs perf (linux-perf)" >&2; exit 1; }
	perf record -q -e cpu-clock -F 499 -g -o "$work/perf.data" \
		-p "$(for wp in $pids; do printf '%s,' "${wp#*=}"; done | sed 's/,$//')" 2>/dev/null &
	perf_pid=$!
	bench_children+=" $perf_pid"
fi

declare -A cpu0
for wp in $pids; do
	cpu0[$wp]=$(cpu_ticks "${wp#*=}")
done
cluster0=$(cluster_ticks)
broker0=$(cpu_ticks "$broker_pid")
busy0=$(machine_busy_ticks)

echo
echo "dwh Kafka drain: $ORDERS orders ($messages messages, ~$msg_bytes bytes each) pre-produced"
echo "on $PARTITIONS partitions, drained by $CONSUMERS workers into the marts"
[ "$TAG_RULES" = 0 ] ||
	echo "and the user tags of $TAG_RULES rules ($(q "SELECT count(*) FILTER (WHERE window_days IS NOT NULL) FROM dwh.tag_rules") windowed)"
printf '%8s %10s %10s %9s' "elapsed" "applied" "lag" "msgs/s"
for wp in $pids; do printf ' %18s' "${wp%=*} RSS/anon MB"; done
echo

bench_statements_reset
wal0=$(q "SELECT pg_current_wal_insert_lsn()")
t0=$(now)
q "ALTER SYSTEM SET dwh.kafka_brokers = '$bootstrap'"
q "SELECT pg_reload_conf()" >/dev/null

applied=0
last_applied=0
last_t=$t0
next_sample=$SAMPLE
first_s=""
contexts_logged=""
progress_t=$t0
progress_n=0
while :; do
	sleep 0.2
	applied=$(bench_applied)
	t=$(now)
	el=$(calc "$t - $t0")
	if [ -z "$first_s" ] && [ "$applied" -gt 0 ]; then
		first_s=$el
	fi
	if [ "$applied" != "$progress_n" ]; then
		progress_n=$applied
		progress_t=$t
	elif ge "$t - $progress_t" 300; then
		echo "no progress for 300 s at $applied of $messages messages" >&2
		q "SELECT worker, state, last_error FROM dwh.status" >&2
		exit 1
	fi
	echo "$el $((messages - applied))" >>"$work/lag.tsv"
	done_now=$([ "$applied" -ge "$messages" ] && echo 1 || echo 0)
	# Half-way, each worker logs its PostgreSQL memory contexts: how much
	# of its private memory is PostgreSQL's own (caches, plans, batch).
	if [ -z "$contexts_logged" ] && [ $((applied * 2)) -ge "$messages" ]; then
		contexts_logged=$el
		q "SELECT pg_log_backend_memory_contexts(pid) FROM dwh.status WHERE worker LIKE 'kafka%'" >/dev/null
	fi
	if [ "$done_now" = 1 ] || ge "$el" "$next_sample"; then
		printf '%7.1fs %10d %10d %9.0f' "$el" "$applied" $((messages - applied)) \
			"$(calc "($applied - $last_applied) / ($t - $last_t)")"
		for wp in $pids; do
			printf ' %18s' "$(awk '$1 == "VmRSS:" { r = $2 } $1 == "RssAnon:" { a = $2 }
				END { printf "%.0f/%.0f", r / 1024, a / 1024 }' "/proc/${wp#*=}/status")"
		done
		echo
		last_applied=$applied
		last_t=$t
		while ge "$el" "$next_sample"; do
			next_sample=$((next_sample + SAMPLE))
		done
	fi
	[ "$done_now" = 1 ] && break
done
t1=$(now)
drain_s=$(calc "$t1 - $t0")
wal_bytes=$(q "SELECT pg_current_wal_insert_lsn() - '$wal0'::pg_lsn")

declare -A cpu1
for wp in $pids; do
	cpu1[$wp]=$(cpu_ticks "${wp#*=}")
done
cluster1=$(cluster_ticks)
broker1=$(cpu_ticks "$broker_pid")
busy1=$(machine_busy_ticks)
sleep 0.5
if [ -n "$perf_pid" ]; then
	kill -INT "$perf_pid" 2>/dev/null || true
	wait "$perf_pid" 2>/dev/null || true
fi
# shellcheck disable=SC2086 # a list of pids
kill $bench_children 2>/dev/null || true
wait 2>/dev/null || true
bench_children=""

workers_ticks=0
for wp in $pids; do
	workers_ticks=$((workers_ticks + cpu1[$wp] - cpu0[$wp]))
done
batches=$(q "SELECT sum(batches) FROM dwh.status WHERE worker LIKE 'kafka%'")
pids_after=$(bench_worker_pids)

orders_s=$(calc "$ORDERS / $drain_s")
messages_s=$(calc "$messages / $drain_s")
echo
printf 'drain          %d orders (%d messages) in %.1f s: %.0f orders/s, %.0f messages/s\n' \
	"$ORDERS" "$messages" "$drain_s" "$orders_s" "$messages_s"
printf '               first batch committed %.1f s after the reload (group join, first fetch);\n' "$first_s"
printf '               from then on %.0f orders/s\n' "$(calc "$ORDERS / ($drain_s - $first_s)")"
printf '               %s batches, %.0f messages per batch (dwh.kafka_batch_size %s, batch_wait %s)\n' \
	"$batches" "$(calc "$messages / $batches")" "$batch_size" "$batch_wait"
printf '               %.0f orders per CPU-second of the workers (%.1f CPU-seconds in all)\n' \
	"$(calc "$ORDERS * $CLK_TCK / $workers_ticks")" "$(calc "$workers_ticks / $CLK_TCK")"
printf 'WAL            %.0f MB written by the drain, %.2f kB an order (for min_wal_size: README)\n' \
	"$(calc "$wal_bytes / 1048576")" "$(calc "$wal_bytes / 1024 / $ORDERS")"
printf 'produce        %d messages with kcat in %.1f s (%.0f messages/s), before the drain\n' \
	"$messages" "$produce_s" "$(calc "$messages / $produce_s")"
# (A build older than the tags, for a comparison, has neither table.)
tags_held=0
tag_events=0
if [ "$(q "SELECT to_regclass('cdm.user_tags') IS NOT NULL")" = t ]; then
	tags_held=$(q "SELECT count(*) FROM cdm.user_tags")
	tag_events=$(q "SELECT count(*) FROM cdm.user_tag_events")
fi
printf 'tags           %d rules: %d tags held, %d grant and revoke events written by the drain\n' \
	"$TAG_RULES" "$tags_held" "$tag_events"
[ "$pids" = "$pids_after" ] || echo "NOTE: worker pids changed during the drain: $pids -> $pids_after"

echo
echo "MEMORY per worker (kB; dwh.kafka_prefetch_memory = ${prefetch_kb} kB, work_mem = ${work_mem_kb} kB;"
echo "documented bound 32 MB + 5 x prefetch + work_mem = ${bound_kb} kB, whatever the backlog)"
printf '  %-8s %8s %10s %10s %10s %10s %10s %10s\n' worker pid "idle anon" "peak anon" "growth" "pg ctx" "VmHWM" "shmem end"
bound_held=yes
peak_anon_max=0
peak_growth_max=0
for wp in $pids; do
	p=${wp#*=}
	peak_anon=$(awk -v p="$p" '$2 == p && $4 > m { m = $4 } END { print m + 0 }' "$work/memory.log")
	shmem_end=$(status_kb "$p" RssShmem)
	hwm=$(status_kb "$p" VmHWM)
	growth=$((peak_anon - idle_anon[$wp]))
	ctx=$(sed -n -E "s/^.*\[$p\] LOG:  Grand total: ([0-9]+) bytes.*$/\1/p" "$work/postgresql.log" | tail -n 1)
	ctx=$(( ${ctx:-0} / 1024 ))
	printf '  %-8s %8s %10s %10s %10s %10s %10s %10s\n' "${wp%=*}" "$p" "${idle_anon[$wp]}" "$peak_anon" \
		"$growth" "$ctx" "$hwm" "$shmem_end"
	[ "$peak_anon" -le "$bound_kb" ] || bound_held=no
	[ "$peak_anon" -le "$peak_anon_max" ] || peak_anon_max=$peak_anon
	[ "$growth" -le "$peak_growth_max" ] || peak_growth_max=$growth
done
echo "  anon = RssAnon, the worker's private memory (heap, librdkafka's queues and"
echo "  buffers), sampled every 0.2 s; pg ctx = PostgreSQL's memory contexts (palloc) of the"
echo "  worker half-way through the drain (at ${contexts_logged%.*} s); VmHWM = peak resident set from the kernel, which"
echo "  also counts the pages of shared_buffers ($shared_buffers, shared by every backend)"
echo "  that the worker touched (shmem end = RssShmem at the end) and the mapped binaries."
printf '  bound held with a backlog of %d messages: %s (peak private memory %d kB vs %d kB)\n' \
	"$messages" "$bound_held" "$peak_anon_max" "$bound_kb"

echo
echo "CPU during the drain (seconds; % of one core over ${drain_s%.*} s; $(nproc) cores)"
share() { awk -v t="$1" -v c="$CLK_TCK" -v d="$drain_s" 'BEGIN { printf "%8.1f s %6.0f%%", t / c, 100 * t / c / d }'; }
for wp in $pids; do
	w=$((cpu1[$wp] - cpu0[$wp]))
	printf '  %-40s %s\n' "${wp%=*} worker" "$(share "$w")"
done
cluster_d=$((cluster1 - cluster0))
broker_d=$((broker1 - broker0))
busy_d=$((busy1 - busy0))
printf '  %-40s %s\n' "rest of PostgreSQL (wal, checkpoints, ...)" "$(share $((cluster_d - workers_ticks)))"
printf '  %-40s %s\n' "Kafka broker (JVM)" "$(share "$broker_d")"
printf '  %-40s %s\n' "everything else (other users, this script)" "$(share $((busy_d - cluster_d - broker_d)))"
printf '  %-40s %s\n' "machine busy" "$(share "$busy_d")"

echo
echo "CHECKS"
checks_ok=0
bench_statements
bench_checks "$work/manifest.json" || checks_ok=1
echo "machine: $(bench_machine)"

echo "RESULT kafka_drain_orders=$ORDERS"
echo "RESULT kafka_drain_consumers=$CONSUMERS"
echo "RESULT kafka_drain_partitions=$PARTITIONS"
printf 'RESULT kafka_drain_orders_per_s=%.0f\n' "$orders_s"
printf 'RESULT kafka_drain_messages_per_s=%.0f\n' "$messages_s"
printf 'RESULT kafka_drain_s=%.1f\n' "$drain_s"
echo "RESULT kafka_drain_tag_rules=$TAG_RULES"
echo "RESULT kafka_drain_tags=$tags_held"
echo "RESULT kafka_drain_tag_events=$tag_events"
printf 'RESULT kafka_drain_orders_per_worker_cpu_s=%.0f\n' "$(calc "$ORDERS * $CLK_TCK / $workers_ticks")"
printf 'RESULT kafka_drain_wal_kb_per_order=%.2f\n' "$(calc "$wal_bytes / 1024 / $ORDERS")"
echo "RESULT kafka_worker_peak_anon_kb=$peak_anon_max"
echo "RESULT kafka_worker_peak_growth_kb=$peak_growth_max"
echo "RESULT kafka_worker_bound_kb=$bound_kb"
echo "RESULT kafka_worker_bound_held=$bound_held"
printf 'RESULT kafka_drain_cpu_workers_pct=%.0f\n' "$(calc "100 * $workers_ticks / $CLK_TCK / $drain_s")"
printf 'RESULT kafka_drain_cpu_broker_pct=%.0f\n' "$(calc "100 * $broker_d / $CLK_TCK / $drain_s")"
printf 'RESULT kafka_drain_cpu_other_pct=%.0f\n' "$(calc "100 * ($busy_d - $cluster_d - $broker_d) / $CLK_TCK / $drain_s")"
echo "RESULT kafka_drain_consistent=$([ "$checks_ok" = 0 ] && echo yes || echo no)"
# The lag over the drain beside the log, as data and as an image.
# A drain with tag rules writes drain-lag-tags.*, so that run-all.sh's two
# drains keep an image each.
if [ -n "$PLOT_DIR" ]; then
	plot_name=drain-lag
	plot_rules=""
	if [ "$TAG_RULES" != 0 ]; then
		plot_name=drain-lag-tags
		plot_rules=", $TAG_RULES tag rules"
	fi
	cp "$work/lag.tsv" "$PLOT_DIR/$plot_name.tsv"
	bench_plot "$PLOT_DIR/$plot_name.png" <<PLOT
set title "dwh: Kafka drain of $ORDERS orders ($messages messages), $CONSUMERS workers, $PARTITIONS partitions$plot_rules"
set xlabel "seconds since the workers were given the broker"
set ylabel "messages not yet applied (lag)"
set format y "%.0f"
set grid
set key top right
plot "$PLOT_DIR/$plot_name.tsv" using 1:2 with lines lw 2 title "lag, sampled every 0.2 s"
PLOT
fi
if [ -n "$perf_pid" ]; then
	[ -z "$PLOT_DIR" ] || cp "$work/perf.data" "$PLOT_DIR/drain-perf.data"
	echo
	echo "PERF: the workers' CPU by function (self time, at least 0.5%)"
	perf report -i "$work/perf.data" --no-children -g none --sort dso,symbol --percent-limit 0.5 \
		--stdio 2>/dev/null | grep -E '^ +[0-9]' | sed -n '1,60p'
	echo "PERF: by shared object"
	perf report -i "$work/perf.data" --no-children -g none --sort dso --stdio 2>/dev/null |
		grep -E '^ +[0-9]' | sed -n '1,15p'
fi
exit "$checks_ok"
