#!/usr/bin/env bash
#
# Benchmark of freshness: the time from producing an order to Kafka until
# the transaction that applied it is visible to a reader of the marts.
#
# Starts a throw-away Kafka broker and PostgreSQL cluster (as
# bench/kafka_drain.sh), loads the dictionaries, lets all CONSUMERS
# workers join the topic, warms the broker's JVM for BROKER_WARMUP seconds
# with the same stream on another topic, and the workers with
# WORKER_WARMUP orders of their own on the measured one (their first
# batches build plans and caches), then produces SECONDS x RATE
# orders of the generator's default mix at a steady RATE orders a second
# (the redelivered, late and malformed messages of the mix come on top)
# with the workers' default batching (dwh.kafka_batch_wait 0: a batch
# closes once nothing more has arrived; dwh.kafka_batch_size 1000).  Prints p50, p90, p99 and max of the
# time from produce to visibility: over all orders, over those sent after
# the first window (WINDOW seconds), and per window; the achieved
# produce rate; the share of the time the workers spent applying batches
# (dwh.status.apply_time); and the CPU of the workers (per batch and per message),
# the broker and the rest of the machine meanwhile.  Ends with dwh.verify() empty and the marts, less what
# the warm-up orders left, equal to the generator's manifest.  The orders are dated 15 s apart up to about now.
#
# With BENCH_TAG_RULES=N, N user tag rules of mixed kinds (as in
# bench/kafka_drain.sh) are defined first, and it also prints the latency
# of the tag events: from the produce of an order to its user's grant or
# revoke visible (see below).  The warehouse starts empty, as for the
# orders' figure (bench/kafka_drain.sh measures the cost with a history).
#
# How it measures (nothing is added to the extension):
#   - the producer (a Python pacer over librdkafka, python3-confluent-kafka)
#     hands each message to librdkafka at its scheduled time and records, per
#     object_id, the wall-clock time at which the order's first message was
#     handed over; the producer's batching (linger.ms, BENCH_LINGER_MS,
#     librdkafka's default 5 ms) is part of what is measured;
#   - a poller session (one psql process kept open) asks every POLL_MS
#     which object_ids stg.order_events holds at or above the lowest one not
#     seen yet; an order's row is written by the same transaction that
#     updates DDS and the marts, so its first sighting is the first poll
#     whose snapshot sees that commit.  The time of a sighting is the
#     server's clock when the poll's statement runs (clock_timestamp(),
#     just after its snapshot), not the time the poller sent it, which
#     may be much earlier on a busy machine: a latency is never
#     understated, and overstated by at most one poll period (half of it on
#     average) and the time the poll's session waits for a CPU;
#   - the same clock (time.time(), one machine) stamps both ends;
#   - with tag rules, the same poll also reads the new rows of
#     cdm.user_tag_events (one statement: one snapshot).  A grant or revoke
#     is written by the transaction that applied orders of its user, so it
#     becomes visible in the poll that first sees them; its latency runs
#     from the latest send among its user's orders first seen in that poll
#     (one of them earned it; a batch holds several) to that poll.  Events
#     with no such order (a later version of an order already seen) are
#     counted as not attributed.
# The poller and the pacer use some CPU of the same machine; the output
# gives the poll period achieved.
#
# A benchmark that reports figures, not a test with a threshold.  The last
# lines are "RESULT key=value" lines for bench/run-all.sh.
#
# Usage: bench/kafka_freshness.sh
# BENCH_RATE may be a fraction of an order a second (0.0833: 5 a minute).
# Environment: BENCH_RATE (1000 orders/s), BENCH_SECONDS (60),
#   BENCH_POLL_MS (5), BENCH_LINGER_MS (5), BENCH_LABEL (the rate: names
#   the files written to BENCH_PLOT_DIR), BENCH_PLOT_DIR (none: where the
#   latency distribution goes, as freshness-LABEL.tsv and .png), BENCH_WINDOW (10: seconds per line of the
#   latency over time), BENCH_BROKER_WARMUP (40: seconds of the same stream
#   on another topic first, so that the broker's JVM is warm; 0: none),
#   BENCH_WORKER_WARMUP (20: orders of their own, with every kind of
#   message of the mix, through the workers first, on the measured topic,
#   left out of the figures and the checks;
#   0: none, the first orders then include the workers' first batches),
#   BENCH_TAG_RULES (0: user tag rules defined first),
#   BENCH_STATEMENTS (0; 1: pg_stat_statements, the workers' statements by
#   time spent over the measured orders, as in bench/kafka_drain.sh),
#   BENCH_KEYED (0; 1: each order's messages keyed by its object_id, so
#   that all versions of an order go to one partition; the contract's
#   producer sends no key),
#   BENCH_CONSUMERS (2), BENCH_PARTITIONS (4), BENCH_SEED (2),
#   BENCH_WAL_SEGMENTS (as in bench/kafka_drain.sh), BENCH_BATCH_WAIT, BENCH_BATCH_SIZE (default: the
#   settings' defaults), BENCH_KAFKA_OPTIONS (none: dwh.kafka_options of the workers, librdkafka
#   properties such as fetch.wait.max.ms; no single quotes), BENCH_SHARED_BUFFERS, BENCH_KEEP (0),
#   BENCH_SKIP_INSTALL (0), BENCH_DIR (/tmp),
#   PG_CONFIG (/usr/lib/postgresql/15/bin/pg_config).

set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
# shellcheck source=kafka_common.sh
. "$here/kafka_common.sh"

RATE=${BENCH_RATE:-1000}
SECONDS_=${BENCH_SECONDS:-60}
POLL_MS=${BENCH_POLL_MS:-5}
WINDOW=${BENCH_WINDOW:-10}
BROKER_WARMUP=${BENCH_BROKER_WARMUP:-40}
WORKER_WARMUP=${BENCH_WORKER_WARMUP:-20}
LINGER_MS=${BENCH_LINGER_MS:-5}
SEED=${BENCH_SEED:-2}
# RATE may be a fraction (0.0833: 5 orders a minute, each one alone).
ORDERS=$(awk -v r="$RATE" -v s="$SECONDS_" 'BEGIN { printf "%d", r * s + 0.5 }')
[ "$ORDERS" -ge 1 ] || { echo "BENCH_RATE x BENCH_SECONDS is less than one order" >&2; exit 1; }
# The broker is warmed at the rate measured, but at least 100 orders/s.
WARM_RATE=$(awk -v r="$RATE" 'BEGIN { print (r < 100 ? 100 : r) }')
LABEL=${BENCH_LABEL:-$RATE}

extra=""
[ -z "${BENCH_BATCH_WAIT:-}" ] || extra+="dwh.kafka_batch_wait = '$BENCH_BATCH_WAIT'"$'\n'
[ -z "${BENCH_BATCH_SIZE:-}" ] || extra+="dwh.kafka_batch_size = $BENCH_BATCH_SIZE"$'\n'
[ -z "${BENCH_KAFKA_OPTIONS:-}" ] || extra+="dwh.kafka_options = '$BENCH_KAFKA_OPTIONS'"$'\n'

bench_install
bench_workdir kafka-freshness
bench_broker_start
log "starting PostgreSQL ($CONSUMERS Kafka workers) and loading the dictionaries"
bench_cluster_start "$extra"
bench_load_dictionaries
rules_defined=$(bench_tag_rules)
[ "$rules_defined" = "$TAG_RULES" ] || { echo "$rules_defined tag rules defined, not $TAG_RULES" >&2; exit 1; }
bench_checkpoint "$ORDERS"

log "generating $ORDERS orders (dwh-gen, default mix, seed $SEED)"
$GEN orders --count "$ORDERS" --seed "$SEED" --start "$(bench_orders_start "$ORDERS")" \
	--manifest "$work/manifest.json" >"$work/orders.txt"
messages=$(manifest "$work/manifest.json" messages)
first_id=$(manifest "$work/manifest.json" object_ids.first)

# The workers join the (empty) topic before the clock starts, all of them:
# the group's first member gets every partition, and the broker's initial
# rebalance delay (3 s) passes before the others share them.  Measuring
# before that would time a rebalance, not the steady state.
q "ALTER SYSTEM SET dwh.kafka_brokers = '$bootstrap'"
q "SELECT pg_reload_conf()" >/dev/null
sharing=$(( CONSUMERS < PARTITIONS ? CONSUMERS : PARTITIONS ))
joined=
for _ in $(seq 300); do
	joined=$(q "SELECT coalesce(sum(cardinality(partitions)), 0) = $PARTITIONS
	              AND count(*) FILTER (WHERE cardinality(partitions) > 0) = $sharing
	            FROM dwh.status WHERE worker LIKE 'kafka%'")
	[ "$joined" = t ] && break
	sleep 0.2
done
[ "$joined" = t ] || { echo "the $CONSUMERS workers did not share the $PARTITIONS partitions" >&2; exit 1; }
batch_wait=$(q "SHOW dwh.kafka_batch_wait")
batch_size=$(q "SHOW dwh.kafka_batch_size")

cat >"$work/freshness.py" <<'EOF'
# pace: produce the orders file at a steady rate, record send times.
# poll: record when each object_id becomes visible in stg.order_events.
# report: join both and print the figures.
import os, re, subprocess, sys, time

def pace(orders, rate, count, first_id, sent_file, bootstrap, topic, linger_ms):
    # librdkafka through its Python binding, each message handed over at its
    # time: kcat -P reads its standard input ahead and holds the last lines
    # of a pipe until more arrive, which at a trickle delays every message
    # by the time until the next one.
    from confluent_kafka import Producer
    lines = [l.rstrip(b'\n') for l in open(orders, 'rb').readlines()]
    ids = []
    for l in lines:
        m = re.match(rb'\{"object_id":(\d+),', l)
        ids.append(int(m.group(1)) if m else None)
    msg_rate = rate * len(lines) / count
    keyed = os.environ.get('BENCH_KEYED', '0') == '1'
    producer = Producer({'bootstrap.servers': bootstrap, 'linger.ms': linger_ms,
                         'sticky.partitioning.linger.ms': 0})
    # Connected, with the topic's metadata, before the clock starts: an
    # application's producer is long-lived, and a new one's first message
    # would wait for the connection and the metadata request.
    producer.list_topics(topic, timeout=30)
    sent = {}
    n, i = len(lines), 0
    t0 = time.monotonic()
    while i < n:
        due = min(n, int((time.monotonic() - t0) * msg_rate) + 1)
        if due > i:
            tw = time.time()
            for j in range(i, due):
                o = ids[j]
                if keyed and o is not None:
                    producer.produce(topic, lines[j], key=str(o))
                else:
                    producer.produce(topic, lines[j])
                if o is not None and first_id <= o < first_id + count and o not in sent:
                    sent[o] = tw
            producer.poll(0)
            i = due
        delay = t0 + i / msg_rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    elapsed = time.monotonic() - t0
    if producer.flush(30) != 0:
        raise SystemExit('pace: messages not delivered within 30 s')
    with open(sent_file, 'w') as f:
        for o, t in sent.items():
            f.write('%d %.6f\n' % (o, t))
    print('%.3f %d %d' % (elapsed, n, len(sent)))

def poll(psql_args, first_id, count, period_ms, seen_file, ready_file, timeout):
    p = subprocess.Popen(psql_args, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    def query(sql):
        # The semicolon sends the query; \echo then marks the end of its rows.
        p.stdin.write(sql.encode() + b';\n\\echo __end__\n')
        p.stdin.flush()
        rows = []
        while True:
            l = p.stdout.readline()
            if l == b'__end__\n' or not l:
                return rows
            rows.append(l)
    query('SELECT 1')
    open(ready_file, 'w').close()
    last = first_id + count - 1
    low, seen, above, periods = first_id, {}, set(), []
    # With tag rules: the user of each order seen, and each tag event seen
    # (id, user, time), read in the same statement (one snapshot) as the
    # orders.  Event ids may become visible out of order: the events above
    # the highest id seen a second ago are read again.
    tags = os.environ.get('BENCH_TAG_RULES', '0') != '0'
    # Events up to BENCH_TAG_EVENTS_AFTER came before (the workers' warm-up).
    ev_floor = int(os.environ.get('BENCH_TAG_EVENTS_AFTER', '0'))
    user, events, ev_max, ev_hist = {}, {}, ev_floor, []
    prev = None
    deadline = time.time() + timeout
    while low <= last and time.time() < deadline:
        tq = time.time()
        if prev is not None:
            periods.append(tq - prev)
        prev = tq
        # The server's clock when the statement runs stamps its sightings:
        # its snapshot was taken just before, however late the poll runs,
        # so a commit it sees was done by then (never later).
        sql = ("SELECT 't', (extract(epoch FROM clock_timestamp()) * 1e6)::bigint, '-'"
               " UNION ALL SELECT 'o', object_id, coalesce(payload->'user'->>'id', '-')"
               " FROM stg.order_events WHERE object_id BETWEEN %d AND %d" % (low, last))
        if tags:
            while len(ev_hist) > 1 and ev_hist[1][0] < tq - 1:
                ev_hist.pop(0)
            sql += (" UNION ALL SELECT 'e', e.id, u.user_id FROM cdm.user_tag_events e"
                    " JOIN dds.h_user u ON u.h_user_pk = e.user_id WHERE e.id > %d"
                    % (ev_hist[0][1] if ev_hist else ev_floor))
        rows = [r.decode().rstrip('\n').split('|', 2) for r in query(sql)]
        ts = next((int(i) / 1e6 for what, i, _ in rows if what == 't'), tq)
        for what, i, u in rows:
            o = int(i)
            if what == 't':
                continue
            if what == 'e':
                if o not in events:
                    events[o] = (u, ts)
                    ev_max = max(ev_max, o)
                continue
            if o not in seen:
                seen[o] = ts
                user[o] = u
                above.add(o)
        ev_hist.append((tq, ev_max))
        while low in above:
            above.discard(low)
            low += 1
        delay = tq + period_ms / 1000.0 - time.time()
        if delay > 0:
            time.sleep(delay)
    p.stdin.close()
    p.wait()
    with open(seen_file, 'w') as f:
        for o, t in seen.items():
            f.write('%d %.6f %s\n' % (o, t, user[o]))
    if tags:
        with open(seen_file + '.events', 'w') as f:
            for e, (u, t) in sorted(events.items()):
                f.write('%d %.6f %s\n' % (e, t, u))
    periods.sort()
    with open(seen_file + '.periods', 'w') as f:
        f.write('%d %.2f %.2f %.2f\n' % (len(periods), 1000 * periods[len(periods) // 2],
                                        1000 * periods[int(len(periods) * 0.99)], 1000 * periods[-1]))

def pct(v, q):
    return v[min(len(v) - 1, int(q * len(v)))]

def report(sent_file, seen_file, window):
    sent = dict((int(a), float(b)) for a, b in (l.split() for l in open(sent_file)))
    seen = dict((int(a), float(b)) for a, b, _ in (l.split() for l in open(seen_file)))
    t0 = min(sent.values())
    lat, windows = [], {}
    for o, ts in sent.items():
        if o in seen:
            ms = 1000 * (seen[o] - ts)
            lat.append(ms)
            windows.setdefault(int((ts - t0) // window), []).append(ms)
    lat.sort()
    # The distribution, for a plot: latency (ms) and the fraction of orders
    # seen within it.
    with open(seen_file + '.cdf', 'w') as f:
        for i, ms in enumerate(lat):
            f.write('%.2f %.5f\n' % (ms, (i + 1) / len(lat)))
    steady = sorted(ms for w, v in windows.items() if w > 0 for ms in v)
    if steady:
        for name, q in (('p50', 0.5), ('p90', 0.9), ('p99', 0.99), ('max', 1)):
            print('RESULT freshness_steady_%s_ms=%.0f' % (name, pct(steady, q)))
    print('RESULT freshness_orders_measured=%d' % len(lat))
    print('RESULT freshness_orders_unseen=%d' % (len(sent) - len(lat)))
    for name, q in (('p50', 0.5), ('p90', 0.9), ('p99', 0.99)):
        print('RESULT freshness_%s_ms=%.0f' % (name, pct(lat, q)))
    print('RESULT freshness_max_ms=%.0f' % lat[-1])
    print('RESULT freshness_min_ms=%.0f' % lat[0])
    print('RESULT freshness_mean_ms=%.0f' % (sum(lat) / len(lat)))
    for w in sorted(windows):
        v = sorted(windows[w])
        print('WINDOW %d %d %d %.0f %.0f %.0f' % (w * window, (w + 1) * window, len(v),
                                                 pct(v, 0.5), pct(v, 0.99), v[-1]))
    # Tag events: each is committed by the transaction that applied some
    # orders of its user; it counts from the latest send among that user's
    # orders first seen in the same poll as the event (the order that
    # earned the grant or revoke is one of them), to that poll.
    if os.path.exists(seen_file + '.events'):
        newest = {}
        for l in open(seen_file):
            o, t, u = l.split()
            if int(o) in sent:
                k = (t, u)
                newest[k] = max(newest.get(k, 0), sent[int(o)])
        tag_lat, other = [], 0
        for l in open(seen_file + '.events'):
            e, t, u = l.split()
            if (t, u) in newest:
                tag_lat.append(1000 * (float(t) - newest[(t, u)]))
            else:
                other += 1
        tag_lat.sort()
        print('RESULT freshness_tag_events_measured=%d' % len(tag_lat))
        print('RESULT freshness_tag_events_unattributed=%d' % other)
        if tag_lat:
            for name, q in (('p50', 0.5), ('p90', 0.9), ('p99', 0.99), ('max', 1)):
                print('RESULT freshness_tag_%s_ms=%.0f' % (name, pct(tag_lat, q)))

mode = sys.argv[1]
if mode == 'pace':
    pace(sys.argv[2], float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6],
         sys.argv[7], sys.argv[8], int(sys.argv[9]))
elif mode == 'poll':
    poll(sys.argv[7:], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), sys.argv[5], sys.argv[6], 600)
else:
    report(sys.argv[2], sys.argv[3], int(sys.argv[4]))
EOF

# A broker that has just started runs its JVM's code interpreted: its
# first seconds of produce and fetch are several times slower than a
# production broker's (measured here: p50 0.9 s in the first 2 s of a cold
# broker, 0.14 s once warm).  Warm it with the same stream on a topic of
# its own, which the workers never read, produced and fetched back.  Ten
# seconds were not enough: at 1,000 orders/s the broker then took 85% of a
# core for the first 15 s measured and the workers fell behind (p50 / p99
# 178 / 716 ms), against 66% and 42 / 170 ms after 40 s of warm-up.
if [ "$BROKER_WARMUP" -gt 0 ]; then
	log "warming the broker: $WARM_RATE orders/s for $BROKER_WARMUP s on topic dwh-bench-warmup"
	$KAFKA create-topic "$work/kafka" dwh-bench-warmup "$PARTITIONS" >/dev/null
	kcat -C -q -b "$bootstrap" -t dwh-bench-warmup -o beginning >/dev/null 2>&1 &
	warmup_reader=$!
	# Orders of the same mix, from another seed.
	warm_orders=$(awk -v r="$WARM_RATE" -v s="$BROKER_WARMUP" 'BEGIN { printf "%d", r * s }')
	$GEN orders --count "$warm_orders" --seed "$((SEED + 1000))" >"$work/warmup.txt"
	/usr/bin/python3 "$work/freshness.py" pace "$work/warmup.txt" "$WARM_RATE" "$warm_orders" \
		"$first_id" "$work/warmup-sent.txt" "$bootstrap" dwh-bench-warmup "$LINGER_MS" >/dev/null
	kill "$warmup_reader" 2>/dev/null || true
	wait "$warmup_reader" 2>/dev/null || true
fi

# A worker's first batches build its plans and caches: at a trickle, the
# first order after the workers start took 27 to 31 ms, those after it
# 10 to 16 ms, and so did the first one to take each other path (a
# redelivery, a new version, a malformed line).  The figures are of
# workers that have run: WORKER_WARMUP orders of their own (object_ids far
# above the measured ones), with every kind of message of the mix, go
# through them on the measured topic first, at 10 a second, and the checks
# count only what came after them.
events_after=0
if [ "$WORKER_WARMUP" -gt 0 ]; then
	log "warming the workers: $WORKER_WARMUP orders on $TOPIC"
	$GEN orders --count "$WORKER_WARMUP" --seed "$((SEED + 2000))" --first-id 900000000 \
		--duplicates 0.2 --status-changes 0.2 --out-of-order 0.2 --malformed 0.2 \
		--max-delay 3 --start "$(bench_orders_start "$WORKER_WARMUP")" \
		--manifest "$work/worker-warmup.json" >"$work/worker-warmup.txt"
	warm_messages=$(manifest "$work/worker-warmup.json" messages)
	/usr/bin/python3 "$work/freshness.py" pace "$work/worker-warmup.txt" 10 "$WORKER_WARMUP" \
		900000000 "$work/worker-warmup-sent.txt" "$bootstrap" "$TOPIC" "$LINGER_MS" >/dev/null
	for _ in $(seq 300); do
		[ "$(bench_applied)" -ge "$warm_messages" ] && break
		sleep 0.2
	done
	[ "$(bench_applied)" -ge "$warm_messages" ] ||
		{ echo "the workers did not apply the $warm_messages warm-up messages" >&2; exit 1; }
	bench_checks_base
	[ "$TAG_RULES" = 0 ] || events_after=$(q "SELECT coalesce(max(id), 0) FROM cdm.user_tag_events")
	read -r base_batches base_messages < <(q "SELECT sum(batches), sum(messages)
	                                          FROM dwh.status WHERE worker LIKE 'kafka%'" | tr '|' ' ')
fi

bench_statements_reset
log "poller: every $POLL_MS ms; producer: $RATE orders/s for $SECONDS_ s"
BENCH_TAG_EVENTS_AFTER=$events_after BENCH_TAG_RULES=$TAG_RULES /usr/bin/python3 "$work/freshness.py" poll "$first_id" "$ORDERS" "$POLL_MS" "$work/seen.txt" "$work/poll.ready" \
	runuser -u postgres -- "$BIN/psql" -h "$work" -p "$pg_port" -d postgres -XAtq &
poller=$!
bench_children=$poller
for _ in $(seq 100); do [ -e "$work/poll.ready" ] && break; sleep 0.1; done
[ -e "$work/poll.ready" ] || { echo "the poller did not start" >&2; exit 1; }

# CPU from the first order produced to the last one visible: the
# workers', the rest of PostgreSQL's, the broker's and the machine's.
pids=$(bench_worker_pids)
declare -A cpu0=()
for wp in $pids; do cpu0[$wp]=$(cpu_ticks "${wp#*=}"); done
cluster0=$(cluster_ticks)
broker0=$(cpu_ticks "$broker_pid")
busy0=$(machine_busy_ticks)
wal0=$(q "SELECT pg_current_wal_insert_lsn()")
# The time the workers spent applying batches (a build older than
# dwh.status.apply_time: none).
apply_time_sql="SELECT coalesce(sum(apply_time), 0) FROM dwh.status WHERE worker LIKE 'kafka%'"
[ "$(q "SELECT count(*) FROM pg_attribute WHERE attrelid = 'dwh.status'::regclass AND attname = 'apply_time'")" = 1 ] ||
	apply_time_sql=""
[ -z "$apply_time_sql" ] || apply0=$(q "$apply_time_sql")
cpu_t0=$(now)
read -r pace_s paced first_sent < <(/usr/bin/python3 "$work/freshness.py" pace "$work/orders.txt" "$RATE" "$ORDERS" \
	"$first_id" "$work/sent.txt" "$bootstrap" "$TOPIC" "$LINGER_MS")
log "produced $paced messages in $pace_s s; waiting for the last orders to become visible"
wait "$poller"
bench_children=""
for _ in $(seq 600); do
	[ "$(bench_applied)" -ge "$messages" ] && break
	sleep 0.2
done

cpu_s=$(calc "$(now) - $cpu_t0")
# Share of the time the workers were applying batches, in %.
busy_pct=""
[ -z "$apply_time_sql" ] ||
	busy_pct=$(calc "int(0.5 + 100 * ($(q "$apply_time_sql") - $apply0) / 1000 / $cpu_s / $CONSUMERS)")
wal_bytes=$(q "SELECT pg_current_wal_insert_lsn() - '$wal0'::pg_lsn")
workers_ticks=0
for wp in $pids; do workers_ticks=$((workers_ticks + $(cpu_ticks "${wp#*=}") - cpu0[$wp])); done
cluster_d=$(($(cluster_ticks) - cluster0))
broker_d=$(($(cpu_ticks "$broker_pid") - broker0))
busy_d=$(($(machine_busy_ticks) - busy0))
pct_core() { awk -v t="$1" -v c="$CLK_TCK" -v d="$cpu_s" 'BEGIN { printf "%.0f", 100 * t / c / d }'; }

/usr/bin/python3 "$work/freshness.py" report "$work/sent.txt" "$work/seen.txt" "$WINDOW" >"$work/report.txt"
r() { sed -n "s/^RESULT $1=//p" "$work/report.txt"; }
read -r polls poll_p50 poll_p99 poll_max <"$work/seen.txt.periods"

echo
echo "dwh Kafka freshness: produce -> visible in the marts, at a steady $RATE orders/s"
echo "($ORDERS orders, $messages messages with the mix's redeliveries, late versions and"
echo "malformed lines; $CONSUMERS workers, $PARTITIONS partitions, dwh.kafka_batch_wait $batch_wait,"
echo "dwh.kafka_batch_size $batch_size; the producer's linger.ms $LINGER_MS)"
printf 'produced       %d orders in %.1f s: %.0f orders/s, %.0f messages/s achieved\n' \
	"$first_sent" "$pace_s" "$(calc "$first_sent / $pace_s")" "$(calc "$paced / $pace_s")"
printf 'measured       %s orders seen, %s never seen\n' "$(r freshness_orders_measured)" "$(r freshness_orders_unseen)"
printf 'latency (ms)   p50 %s   p90 %s   p99 %s   max %s   (min %s, mean %s)\n' \
	"$(r freshness_p50_ms)" "$(r freshness_p90_ms)" "$(r freshness_p99_ms)" "$(r freshness_max_ms)" \
	"$(r freshness_min_ms)" "$(r freshness_mean_ms)"
if [ -n "$(r freshness_steady_p50_ms)" ]; then
	printf 'after %3s s    p50 %s   p90 %s   p99 %s   max %s   (the orders sent after the first window)\n' \
		"$WINDOW" "$(r freshness_steady_p50_ms)" "$(r freshness_steady_p90_ms)" \
		"$(r freshness_steady_p99_ms)" "$(r freshness_steady_max_ms)"
fi
if [ "$TAG_RULES" -gt 0 ]; then
	printf 'tag events (ms) p50 %s   p90 %s   p99 %s   max %s   (%s events of %s rules; %s not attributed)\n' \
		"$(r freshness_tag_p50_ms)" "$(r freshness_tag_p90_ms)" "$(r freshness_tag_p99_ms)" \
		"$(r freshness_tag_max_ms)" "$(r freshness_tag_events_measured)" "$TAG_RULES" \
		"$(r freshness_tag_events_unattributed)"
	echo "               produce -> a grant or revoke visible: from the latest send among the orders of"
	echo "               its user first seen in the same poll (one transaction commits both)"
fi
printf 'resolution     %s polls, period p50 %s ms, p99 %s ms, max %s ms: a latency is\n' \
	"$polls" "$poll_p50" "$poll_p99" "$poll_max"
echo "               overstated by at most one period (half of one on average), never understated"
read -r batches batch_mean < <(q "SELECT sum(batches) - ${base_batches:-0},
                                         round((sum(messages) - ${base_messages:-0})::numeric
                                               / nullif(sum(batches) - ${base_batches:-0}, 0), 1)
                                  FROM dwh.status WHERE worker LIKE 'kafka%'" | tr '|' ' ')
printf 'batches        %s, %s messages each on average (dwh.status)\n' "$batches" "$batch_mean"
[ -z "$busy_pct" ] ||
	printf 'busy           the workers applied batches %s%% of the time (dwh.status.apply_time)\n' "$busy_pct"
printf 'CPU            workers %s%%, rest of PostgreSQL (the poll too) %s%%, broker %s%%, the rest %s%% of one core\n' \
	"$(pct_core "$workers_ticks")" "$(pct_core $((cluster_d - workers_ticks)))" \
	"$(pct_core "$broker_d")" "$(pct_core $((busy_d - cluster_d - broker_d)))"
printf '               (%.1f s, %s cores); the workers: %.2f ms a batch, %.0f us a message\n' \
	"$cpu_s" "$(nproc)" "$(calc "1000 * $workers_ticks / $CLK_TCK / ($batches > 0 ? $batches : 1)")" \
	"$(calc "1000000 * $workers_ticks / $CLK_TCK / $paced")"
printf 'WAL            %.0f MB, %.2f kB an order\n' "$(calc "$wal_bytes / 1048576")" \
	"$(calc "$wal_bytes / 1024 / $ORDERS")"
echo "per $WINDOW s of send time:"
printf '  %9s %8s %8s %8s %8s\n' "window s" orders "p50 ms" "p99 ms" "max ms"
awk '/^WINDOW/ { printf "  %4d-%-4d %8d %8d %8d %8d\n", $2, $3, $4, $5, $6, $7 }' "$work/report.txt"
bench_statements

echo
echo "CHECKS"
checks_ok=0
bench_checks "$work/manifest.json" || checks_ok=1
echo "machine: $(bench_machine)"
echo "RESULT freshness_rate=$RATE"
echo "RESULT freshness_tag_rules=$TAG_RULES"
printf 'RESULT freshness_achieved_orders_per_s=%.4g\n' "$(calc "$first_sent / $pace_s")"
grep '^RESULT' "$work/report.txt"
echo "RESULT freshness_poll_p50_ms=$poll_p50"
echo "RESULT freshness_batches=$batches"
echo "RESULT freshness_batch_mean_messages=$batch_mean"
[ -z "$busy_pct" ] || echo "RESULT freshness_workers_busy_pct=$busy_pct"
echo "RESULT freshness_cpu_workers_pct=$(pct_core "$workers_ticks")"
echo "RESULT freshness_cpu_broker_pct=$(pct_core "$broker_d")"
echo "RESULT freshness_cpu_machine_pct=$(pct_core "$busy_d")"
# The latency distribution beside the log, as data and as an image.
if [ -n "$PLOT_DIR" ]; then
	cp "$work/seen.txt.cdf" "$PLOT_DIR/freshness-$LABEL.tsv"
	bench_plot "$PLOT_DIR/freshness-$LABEL.png" <<PLOT
set title "dwh: produce -> visible in the marts at $RATE orders/s ($CONSUMERS workers)"
set xlabel "latency (ms, log scale)"
set ylabel "fraction of orders visible"
set logscale x
set grid
set key top left
plot "$PLOT_DIR/freshness-$LABEL.tsv" using 1:2 with steps title "$RATE orders/s"
PLOT
fi
echo "RESULT freshness_consistent=$([ "$checks_ok" = 0 ] && echo yes || echo no)"
exit "$checks_ok"
