# shellcheck shell=bash
# Shared pieces of the Kafka benchmarks (bench/kafka_drain.sh and
# bench/kafka_freshness.sh), sourced, not run: build and install, a
# throw-away PostgreSQL cluster with dwh preloaded, a throw-away Kafka
# broker (tools/kafka/kafka.sh), the generator's dictionaries loaded into
# STG, the final checks against the generator's manifest, CPU accounting
# from /proc, and clean-up.
#
# The caller sets `here` and `root`, then sources this file; it reads the
# environment variables listed in the callers' headers.

: "${root:?the caller sets root before sourcing kafka_common.sh}"

KEEP=${BENCH_KEEP:-0}
SKIP_INSTALL=${BENCH_SKIP_INSTALL:-0}
PARENT=${BENCH_DIR:-/tmp}
PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}
CONSUMERS=${BENCH_CONSUMERS:-2}
PARTITIONS=${BENCH_PARTITIONS:-4}
TOPIC=order-service_orders
GEN="/usr/bin/python3 $root/tools/dwh-gen"
KAFKA="bash $root/tools/kafka/kafka.sh"

if [ "$(id -u)" -ne 0 ]; then
	echo "run as root: it installs the extension and runs the cluster as postgres" >&2
	exit 1
fi
export LANG=C.UTF-8 LC_ALL=C.UTF-8

log() { printf '%s %s\n' "$(date +%T)" "$*" >&2; }
now() { date +%s.%N; }
calc() { awk "BEGIN { print $* }"; }

# Where a benchmark writes its data files and images (BENCH_PLOT_DIR; none
# when empty).  bench/run-all.sh sets it to its folder of logs.
# shellcheck disable=SC2034 # read by the benchmarks
PLOT_DIR=${BENCH_PLOT_DIR:-}
# bench_plot FILE.png: draw the gnuplot commands on standard input into a
# PNG image (gnuplot-nox); says so and goes on when gnuplot is missing.
bench_plot()
{
	if ! command -v gnuplot >/dev/null; then
		log "gnuplot is missing (tools/install-deps.sh): no $1"
		cat >/dev/null
		return 0
	fi
	{ printf 'set terminal pngcairo size 900,560 font "DejaVu Sans,10"\nset output "%s"\n' "$1"; cat; } |
		gnuplot || log "gnuplot failed: no $1"
}
# True when the expression $1 is at least $2.
ge() { awk "BEGIN { exit !(($1) >= ($2)) }"; }

bench_install()
{
	if [ "$SKIP_INSTALL" != 1 ]; then
		log "building and installing the extension (make install)"
		make -s -C "$root" PG_CONFIG="$PG_CONFIG" >/dev/null
		make -s -C "$root" PG_CONFIG="$PG_CONFIG" install >/dev/null
	fi
	BIN=$("$PG_CONFIG" --bindir)
	[ -e "$("$PG_CONFIG" --pkglibdir)/dwh.so" ] ||
		{ echo "dwh.so is not installed for $PG_CONFIG" >&2; exit 1; }
	command -v kcat >/dev/null || { echo "kcat is missing (tools/install-deps.sh)" >&2; exit 1; }
}

free_port()
{
	python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# The work folder; everything the benchmark makes lives in it.
bench_workdir()
{
	work=$(mktemp -d "$PARENT/dwh-$1.XXXXXX")
	chmod 755 "$work"
	chown postgres: "$work"
	pgdata=$work/pgdata
	trap bench_cleanup EXIT
	trap 'exit 130' INT TERM
}

bench_cleanup()
{
	local rc=$?
	set +e
	# Background samplers of the caller.
	for p in ${bench_children:-}; do
		kill "$p" 2>/dev/null
	done
	if [ -f "$pgdata/postmaster.pid" ]; then
		runuser -u postgres -- "$BIN/pg_ctl" -D "$pgdata" -m fast -w stop >/dev/null 2>&1
	fi
	if [ -d "$work/kafka" ]; then
		$KAFKA stop "$work/kafka" >/dev/null 2>&1
	fi
	if [ "$KEEP" = 1 ]; then
		log "kept $work (stopped cluster and broker, logs)"
	else
		rm -rf "$work"
	fi
	exit $rc
}

# A cluster with the settings of bench/sql_chain.sh (a DBA's settings
# for a bulk-loading warehouse, durability untouched), dwh preloaded, the
# extension created in postgres; extra postgresql.conf lines in $1.
bench_cluster_start()
{
	local extra=$1 mem_mb sb preload=dwh
	# With BENCH_STATEMENTS=1, pg_stat_statements sees every statement
	# that the workers' batches run (bench_statements prints them).
	if [ "${BENCH_STATEMENTS:-0}" = 1 ]; then
		preload=dwh,pg_stat_statements
		extra+=$'\npg_stat_statements.track = all\npg_stat_statements.max = 5000\npg_stat_statements.track_utility = off'
	fi
	pg_port=$(free_port)
	mem_mb=$(($(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024))
	sb=$((mem_mb / 4))
	[ $sb -gt 8192 ] && sb=8192
	[ $sb -lt 128 ] && sb=128
	shared_buffers=${BENCH_SHARED_BUFFERS:-${sb}MB}
	runuser -u postgres -- "$BIN/initdb" -D "$pgdata" -U postgres -E UTF8 --locale=C.UTF-8 \
		--auth=trust >"$work/initdb.log" 2>&1
	cat >>"$pgdata/postgresql.conf" <<EOF
listen_addresses = ''
port = $pg_port
unix_socket_directories = '$work'
shared_preload_libraries = '$preload'
max_connections = 20
shared_buffers = $shared_buffers
effective_cache_size = $((mem_mb / 2))MB
work_mem = 64MB
maintenance_work_mem = 1GB
wal_buffers = 64MB
wal_compression = lz4
max_wal_size = 16GB
min_wal_size = 8GB
checkpoint_timeout = 30min
checkpoint_completion_target = 0.9
random_page_cost = 1.1
jit = off
max_locks_per_transaction = 128
autovacuum_vacuum_cost_limit = 2000
dwh.kafka_consumers = $CONSUMERS
$extra
EOF
	runuser -u postgres -- "$BIN/pg_ctl" -D "$pgdata" -l "$work/postgresql.log" -w start >/dev/null
	postmaster_pid=$(head -n 1 "$pgdata/postmaster.pid")
	q "CREATE EXTENSION dwh"
	[ "${BENCH_STATEMENTS:-0}" != 1 ] || q "CREATE EXTENSION pg_stat_statements"
}

# With BENCH_STATEMENTS=1: forget what the set-up ran (call before the
# workers start), and at the end print where the workers' batches spent
# their time, per statement (nested statements included in their callers').
bench_statements_reset()
{
	[ "${BENCH_STATEMENTS:-0}" != 1 ] || q "SELECT pg_stat_statements_reset()" >/dev/null
}

bench_statements()
{
	[ "${BENCH_STATEMENTS:-0}" = 1 ] || return 0
	echo
	echo "WHERE THE TIME GOES (pg_stat_statements, track = all): % of the time of the"
	echo "workers' batches (dwh.ingest_orders); a statement includes the statements it runs"
	runuser -u postgres -- "$BIN/psql" -h "$work" -p "$pg_port" -d postgres -Xq \
		-P pager=off -P border=0 -P footer=off -c "
		WITH s AS (SELECT * FROM pg_stat_statements s
		           JOIN pg_database d ON d.oid = s.dbid AND d.datname = current_database()),
		top AS (SELECT sum(total_exec_time) FILTER (WHERE toplevel) AS t,
		               sum(calls) FILTER (WHERE query LIKE '%dwh.apply_mart_deltas(%') AS batches
		        FROM s)
		SELECT round((100 * s.total_exec_time / top.t)::numeric, 1) AS \"%\",
		       s.calls,
		       round((s.total_exec_time / top.batches)::numeric, 2) AS \"ms/batch\",
		       CASE WHEN s.toplevel THEN '[top] ' ELSE '' END ||
		       round(s.rows::numeric / s.calls, 0) AS \"rows/call\",
		       left(regexp_replace(s.query, '\\s+', ' ', 'g'), 100) AS statement
		FROM s, top
		WHERE s.total_exec_time >= 0.004 * top.t
		ORDER BY s.total_exec_time DESC
		LIMIT 30"
}

q() { runuser -u postgres -- "$BIN/psql" -h "$work" -p "$pg_port" -d postgres -XAtq -v ON_ERROR_STOP=1 -c "$1"; }

# A broker with the order topic of $PARTITIONS partitions.
bench_broker_start()
{
	log "starting a Kafka broker ($PARTITIONS partitions)"
	$KAFKA start "$work/kafka" --partitions "$PARTITIONS" >"$work/kafka-start.log" 2>&1 ||
		{ cat "$work/kafka-start.log" >&2; exit 1; }
	$KAFKA create-topic "$work/kafka" "$TOPIC" "$PARTITIONS" >/dev/null
	bootstrap=$($KAFKA bootstrap "$work/kafka")
	# shellcheck disable=SC2034 # read by the caller
	broker_pid=$(cat "$work/kafka/kafka.pid")
}

# Every line of file $1 as one message, keyless, spread over the
# partitions at random (as DwhTest.pm's produce does).
bench_produce_file()
{
	kcat -P -q -b "$bootstrap" -t "$TOPIC" -X sticky.partitioning.linger.ms=0 \
		-X linger.ms=20 -X batch.num.messages=10000 -l "$1"
}

# Messages the broker holds: the sum of the partitions' end offsets.
bench_topic_messages()
{
	local args=() p
	for p in $(seq 0 $((PARTITIONS - 1))); do
		args+=(-t "$TOPIC:$p:-1")
	done
	kcat -Q -b "$bootstrap" "${args[@]}" | awk '{ s += $NF } END { print s + 0 }'
}

# The generator's default dictionaries (docs/formats.md section 5) straight into
# STG, as the Redis worker would write them.
bench_load_dictionaries()
{
	$GEN dictionaries >"$work/dictionaries.tsv"
	chmod 644 "$work/dictionaries.tsv"
	runuser -u postgres -- "$BIN/psql" -h "$work" -p "$pg_port" -d postgres -Xq -v ON_ERROR_STOP=1 <<EOF
CREATE TEMP TABLE dict (key text, value jsonb);
COPY dict FROM '$work/dictionaries.tsv' WITH (FORMAT csv, DELIMITER E'\t', QUOTE E'\x01');
INSERT INTO stg.users (object_id, payload) SELECT key, value FROM dict WHERE NOT value ? 'menu';
INSERT INTO stg.restaurants (object_id, payload) SELECT key, value FROM dict WHERE value ? 'menu';
EOF
}

# bench_checkpoint ORDERS: a checkpoint, with WAL segments ready for the
# ORDERS to come.  A server that has run through checkpoints renames its
# old WAL segments into future ones (keeping min_wal_size of them); a new
# cluster has none, and the commit that first writes into a new segment
# creates it (16 MB of zeroes, synced: 70 to 100 ms on the 2-core machine)
# holding the WAL write lock, so every commit waits.  A batch writes about
# 4 kB of WAL an order (5 in small batches): at 5,000 orders/s, a stall
# every second.  Switching through enough segments for ORDERS at 5 kB
# (BENCH_WAL_SEGMENTS: so many instead) and then checkpointing leaves them
# as recycled future segments, as on a server in service.
# BENCH_WAL_SEGMENTS=0: the bare checkpoint of a new cluster.
bench_checkpoint()
{
	local segments=${BENCH_WAL_SEGMENTS:-$((($1 * 5 + 16383) / 16384 + 4))}

	if [ "$segments" -gt 0 ]; then
		q "CREATE TABLE public.bench_wal_fill (i integer)"
		q "DO \$\$ BEGIN
		     FOR i IN 1..$segments LOOP
		       INSERT INTO public.bench_wal_fill VALUES (i);
		       PERFORM pg_catalog.pg_switch_wal();
		     END LOOP;
		   END \$\$"
		q "DROP TABLE public.bench_wal_fill"
	fi
	q "CHECKPOINT"
}

# BENCH_TAG_RULES user tag rules (docs/tags.md) of mixed kinds, defined
# once the dictionaries are in DDS: categories and dishes (taken in name
# and id order from the menus), all orders, the favourite category, and
# five in twenty with a window of 30 days (the order dates of the
# benchmarks end about now, so that a window holds orders); with
# BENCH_TAG_WINDOWS=0 those five count all of time instead.  The pattern
# repeats every 20 rules, thresholds raised.  Prints the rules written.
TAG_RULES=${BENCH_TAG_RULES:-0}
TAG_WINDOWS=${BENCH_TAG_WINDOWS:-1}
bench_tag_rules()
{
	[ "$TAG_RULES" -gt 0 ] || { echo 0; return; }
	q "INSERT INTO dwh.tag_rules (tag, kind, category_name, product_id, threshold, window_days)
	   SELECT format('bench %s: %s', i, p.kind), p.kind,
	          CASE WHEN p.kind = 'category' THEN c.names[1 + i % cardinality(c.names)] END,
	          CASE WHEN p.kind = 'dish' THEN d.ids[1 + i % cardinality(d.ids)] END,
	          p.threshold * (1 + i / 20), CASE WHEN $TAG_WINDOWS = 1 THEN p.window_days END
	   FROM generate_series(0, $TAG_RULES - 1) i
	   JOIN (VALUES (0, 'category', 10, NULL::integer), (1, 'dish', 5, NULL), (2, 'all_orders', 50, NULL),
	                (3, 'favourite_category', 1, NULL), (4, 'category', 5, 30),
	                (5, 'category', 100, NULL), (6, 'dish', 20, NULL), (7, 'all_orders', 20, 30),
	                (8, 'category', 30, NULL), (9, 'dish', 2, NULL), (10, 'category', 3, NULL),
	                (11, 'dish', 10, NULL), (12, 'all_orders', 200, NULL),
	                (13, 'favourite_category', 5, 30), (14, 'dish', 3, 30),
	                (15, 'category', 50, NULL), (16, 'dish', 1, NULL), (17, 'category', 20, 30),
	                (18, 'all_orders', 10, NULL), (19, 'category', 300, NULL))
	        AS p(n, kind, threshold, window_days) ON p.n = i % 20,
	        (SELECT array_agg(category_name ORDER BY category_name COLLATE \"C\") AS names
	         FROM dds.h_category) c,
	        (SELECT array_agg(product_id ORDER BY product_id COLLATE \"C\") AS ids
	         FROM dds.h_product) d" >/dev/null
	q "SELECT count(*) FROM dwh.tag_rules"
}
# The first order time for $1 orders 15 s apart (the generator's step)
# whose newest is dated about now: windowed tag rules count some of them.
bench_orders_start() { date -u -d "@$(($(date +%s) - $1 * 15))" '+%Y-%m-%d %H:%M:%S'; }

# Messages applied so far: partitions start at offset 0, so the stored next
# offsets add up to the messages applied (dead letters included).
bench_applied() { q "SELECT coalesce(sum(next_offset), 0) FROM dwh.kafka_offsets WHERE topic = '$TOPIC'"; }

# pid of each Kafka worker, "worker=pid" words.
bench_worker_pids() { q "SELECT string_agg(replace(worker, ' ', '') || '=' || pid, ' ' ORDER BY worker) FROM dwh.status WHERE worker LIKE 'kafka%' AND pid IS NOT NULL"; }

# A manifest field (a dotted path) of the generator's JSON summary $1.
manifest() { python3 -c 'import json, sys
v = json.load(open(sys.argv[1]))
for k in sys.argv[2].split("."):
    v = v[k]
print(v)' "$1" "$2"; }

# Orders applied before the measured ones (the freshness benchmark warms
# the workers with orders of their own): bench_checks_base records what
# they left, and bench_checks then counts only what came on top of it (the
# mart rows by their difference: the two sets of orders are disjoint, so
# their counts add up).
checks_base_applied=0
checks_base_stg=0
checks_base_dead=0
checks_base_marts=0
bench_dead_letters() { q "SELECT count(*) FROM dwh.dead_letters WHERE source = 'kafka' AND kafka_offset IS NOT NULL"; }
bench_checks_base()
{
	checks_base_applied=$(bench_applied)
	checks_base_stg=$(q "SELECT count(*) FROM stg.order_events")
	checks_base_dead=$(bench_dead_letters)
	q "CREATE TABLE public.bench_base_products AS SELECT * FROM cdm.user_product_counters" >/dev/null
	q "CREATE TABLE public.bench_base_categories AS SELECT * FROM cdm.user_category_counters" >/dev/null
	checks_base_marts=1
}

# Rows and sum of the counts of mart $1 (key columns $2), less the base.
bench_mart_counts()
{
	if [ "$checks_base_marts" = 0 ]; then
		q "SELECT count(*) || ' ' || coalesce(sum(order_cnt), 0) FROM cdm.$1"
		return
	fi
	q "SELECT count(*) FILTER (WHERE d <> 0) || ' ' || coalesce(sum(d), 0)
	   FROM (SELECT coalesce(m.order_cnt, 0) - coalesce(b.order_cnt, 0) AS d
	         FROM cdm.$1 m FULL JOIN public.bench_base_${3} b USING ($2)) x"
}

# The checks every run ends with; prints them and returns non-zero when one
# fails.  $1: the manifest.
bench_checks()
{
	local m=$1 ok=0 verify stg dead applied prod cat want_p want_c
	verify=$(q "SELECT count(*) FROM dwh.verify()")
	stg=$(($(q "SELECT count(*) FROM stg.order_events") - checks_base_stg))
	dead=$(($(bench_dead_letters) - checks_base_dead))
	applied=$(($(bench_applied) - checks_base_applied))
	prod=$(bench_mart_counts user_product_counters "user_id, product_id" products)
	cat=$(bench_mart_counts user_category_counters "user_id, category_id" categories)
	want_p="$(manifest "$m" user_product_counts.rows) $(manifest "$m" user_product_counts.order_cnt_sum)"
	want_c="$(manifest "$m" user_category_counts.rows) $(manifest "$m" user_category_counts.order_cnt_sum)"
	check() {
		local what=$1 got=$2 want=$3
		if [ "$got" = "$want" ]; then
			printf '  %-44s %s\n' "$what" "$got (ok)"
		else
			printf '  %-44s %s\n' "$what" "$got, expected $want   <-- WRONG"
			ok=1
		fi
	}
	check "SELECT count(*) FROM dwh.verify()" "$verify" 0
	check "messages applied (stored offsets)" "$applied" "$(manifest "$m" messages)"
	check "orders in stg.order_events" "$stg" "$(manifest "$m" object_ids.count)"
	check "dead letters (malformed messages)" "$dead" "$(manifest "$m" malformed)"
	check "product mart rows, sum(order_cnt)" "$prod" "$want_p"
	check "category mart rows, sum(order_cnt)" "$cat" "$want_c"
	if [ "$TAG_RULES" -gt 0 ]; then
		printf '  %-44s %s\n' "user tags, tag events (recounted by verify)" \
			"$(q "SELECT (SELECT count(*) FROM cdm.user_tags) || ', ' || (SELECT count(*) FROM cdm.user_tag_events)")"
	fi
	return $ok
}

# CPU time in clock ticks: of a process; of the whole cluster (postmaster,
# its children alive now and those it reaped); busy time of the machine.
cpu_ticks() { awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$1/stat" 2>/dev/null || echo 0; }
cluster_ticks()
{
	local t
	t=$(awk '{ sub(/^.*\) /, ""); print $12 + $13 + $14 + $15 }' "/proc/$postmaster_pid/stat")
	for c in $(ps -o pid= --ppid "$postmaster_pid"); do
		t=$((t + $(cpu_ticks "$c")))
	done
	echo "$t"
}
machine_busy_ticks() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9; exit }' /proc/stat; }
# shellcheck disable=SC2034 # read by the callers
CLK_TCK=$(getconf CLK_TCK)

# The version of the broker's jars (kafka_2.13-X.jar).
kafka_version()
{
	local j
	for j in "${DWH_KAFKA_JARS:-/var/cache/dwh/kafka-libs}"/kafka_2.13-*.jar; do
		case $j in *-test.jar | *-sources.jar) continue ;; esac
		[ -e "$j" ] || continue
		j=${j##*/kafka_2.13-}
		echo "${j%.jar}"
		return
	done
	echo '?'
}

# One line describing the machine and the versions.
bench_machine()
{
	printf '%s CPUs (%s), %s MB RAM, kernel %s; %s; librdkafka %s; Kafka %s' \
		"$(nproc)" "$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)" \
		"$(($(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024))" "$(uname -r)" \
		"$("$BIN/postgres" --version)" \
		"$(dpkg-query -W -f '${Version}' librdkafka1 2>/dev/null || echo '?')" \
		"$(kafka_version)"
}
