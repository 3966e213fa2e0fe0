#!/usr/bin/env bash
#
# Benchmark of a restore: what pg_restore of a dwh warehouse costs in time
# and in the restoring backend's memory, for several values of
# dwh.trigger_chunk_rows (README "Backup and restore").  The orders table's
# COPY dominates: its triggers carry its rows through DDS and the marts a
# chunk at a time.
#
# Builds a warehouse of BENCH_ORDERS orders of the docs/formats.md profile
# (bench/sql_chain_setup.sql: 100 users, 132 dishes, four menus) with direct
# writes of STG, dumps it with pg_dump -Fc, then restores it into a fresh
# database once per chunk size.  Each restore is checked: dwh.verify() empty
# and the marts equal to the source's.  Memory is the peak RssAnon of the
# restoring backend (sampled every 0.1 s): its private memory.
#
# It is a benchmark that reports figures, not a test with a threshold; it
# ends with "RESULT key=value" lines.  Runs as root (or the cluster owner)
# on a machine where PostgreSQL 15 and the extension are installed; starts
# a throw-away cluster of its own and removes it.
#
# Usage: bench/restore.sh
# Environment: BENCH_ORDERS (300000), BENCH_CHUNKS (chunk sizes, default
#   "1000 10000 100000 10000000": the last carries the table as one
#   statement), BENCH_DIR (/tmp), PG_CONFIG (/usr/lib/postgresql/15/bin/pg_config).

set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ORDERS=${BENCH_ORDERS:-300000}
CHUNKS=${BENCH_CHUNKS:-1000 10000 100000 10000000}
PARENT=${BENCH_DIR:-/tmp}
PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}
bindir=$("$PG_CONFIG" --bindir)

if ! [[ $ORDERS =~ ^[1-9][0-9]*$ ]]; then
	echo "BENCH_ORDERS must be a positive integer, not '$ORDERS'" >&2
	exit 2
fi
for c in $CHUNKS; do
	if ! [[ $c =~ ^[1-9][0-9]*$ ]] || [ "$c" -gt 10000000 ]; then
		echo "BENCH_CHUNKS: '$c' is not a dwh.trigger_chunk_rows value (1 to 10000000)" >&2
		exit 2
	fi
done

if [ "$(id -u)" = 0 ]; then
	as_owner() { runuser -u postgres -- "$@"; }
	owner=postgres
else
	as_owner() { "$@"; }
	owner=$(id -un)
fi

log() { printf '%s\n' "$*" >&2; }
now() { date +%s.%N; }
calc() { awk "BEGIN { print $* }"; }

work=$(mktemp -d "$PARENT/dwh-restore.XXXXXX")
chmod 755 "$work"
chown "$owner" "$work"
data=$work/data
cleanup() {
	local rc=$?
	if [ -f "$data/postmaster.pid" ]; then
		as_owner "$bindir/pg_ctl" -D "$data" -m fast -w stop >/dev/null 2>&1 || true
	fi
	rm -rf "$work"
	exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

as_owner "$bindir/initdb" -D "$data" -U postgres -E UTF8 --locale=C.UTF-8 \
	--auth=trust >"$work/initdb.log" 2>&1
cat >>"$data/postgresql.conf" <<EOF
listen_addresses = ''
unix_socket_directories = '$work'
shared_preload_libraries = 'dwh'
shared_buffers = 1GB
max_wal_size = 8GB
checkpoint_timeout = 30min
max_locks_per_transaction = 128
EOF
as_owner "$bindir/pg_ctl" -D "$data" -l "$work/server.log" -w start >/dev/null
psql_() {
	local db=$1
	shift
	as_owner "$bindir/psql" -X -q -A -t -h "$work" -U postgres -d "$db" -v ON_ERROR_STOP=1 "$@"
}

# ---------------------------------------------------------------- source

log "building a warehouse of $ORDERS orders"
psql_ postgres -c 'CREATE DATABASE source'
psql_ source -c 'CREATE EXTENSION dwh'
psql_ source -f - <"$here/sql_chain_setup.sql" >/dev/null
psql_ source <<EOF
SET client_min_messages = warning;
INSERT INTO stg.users (object_id, payload)
SELECT object_id, payload FROM bench.user_values ORDER BY object_id;
INSERT INTO stg.restaurants (object_id, payload)
SELECT object_id, payload FROM bench.restaurant_values ORDER BY object_id;
INSERT INTO stg.order_events (object_id, object_type, sent_dttm, payload)
SELECT (m->>'object_id')::bigint, 'order', (m->>'sent_dttm')::timestamp, m->'payload'
FROM (SELECT convert_from(message, 'UTF8')::jsonb AS m
      FROM bench.messages(1, $ORDERS)) x;
DROP SCHEMA bench CASCADE;
EOF
bad=$(psql_ source -c 'SELECT count(*) FROM dwh.verify()')
[ "$bad" = 0 ] || { echo "the source warehouse does not verify" >&2; exit 1; }

# The marts by business keys: what a restore must give again.
marts_sql="SELECT md5(string_agg(x, ',' ORDER BY x)) FROM (
    SELECT u.user_id || '/' || p.product_id || '/' || m.product_name || '/' || m.order_cnt AS x
    FROM cdm.user_product_counters m
    JOIN dds.h_user u ON u.h_user_pk = m.user_id
    JOIN dds.h_product p ON p.h_product_pk = m.product_id
    UNION ALL
    SELECT u.user_id || '/' || m.category_name || '/' || m.order_cnt
    FROM cdm.user_category_counters m
    JOIN dds.h_user u ON u.h_user_pk = m.user_id) s"
source_marts=$(psql_ source -c "$marts_sql")
as_owner "$bindir/pg_dump" -h "$work" -U postgres -Fc -f "$work/source.dump" source
dump_bytes=$(stat -c %s "$work/source.dump")

# ---------------------------------------------------------------- restores

# Peak RssAnon (kB) of the backends of database $1 until file $2 exists.
sample_peak() {
	local db=$1 done_file=$2 peak=0 pid v
	while [ ! -e "$done_file" ]; do
		for pid in $(psql_ postgres -c "SELECT pid FROM pg_stat_activity
		                                 WHERE datname = '$db' AND pid <> pg_backend_pid()"); do
			v=$(awk '/^RssAnon:/ { print $2 }' "/proc/$pid/status" 2>/dev/null || true)
			if [ -n "$v" ] && [ "$v" -gt "$peak" ]; then
				peak=$v
			fi
		done
		sleep 0.1
	done
	echo "$peak"
}

printf '\n%-12s %10s %12s %14s\n' "chunk rows" "seconds" "orders/s" "peak MB" >&2
results=""
for chunk in $CHUNKS; do
	db=restored_$chunk
	psql_ postgres -c "CREATE DATABASE $db" -c "ALTER DATABASE $db SET dwh.trigger_chunk_rows = $chunk"
	rm -f "$work/restored"
	sample_peak "$db" "$work/restored" >"$work/peak" &
	sampler=$!
	t0=$(now)
	as_owner "$bindir/pg_restore" -h "$work" -U postgres -d "$db" --exit-on-error "$work/source.dump"
	t1=$(now)
	touch "$work/restored"
	wait "$sampler"
	peak_kb=$(cat "$work/peak")
	seconds=$(calc "$t1 - $t0")
	bad=$(psql_ "$db" -c 'SELECT count(*) FROM dwh.verify()')
	marts=$(psql_ "$db" -c "$marts_sql")
	if [ "$bad" != 0 ] || [ "$marts" != "$source_marts" ]; then
		echo "the restore at chunks of $chunk differs from the source (verify: $bad rows)" >&2
		exit 1
	fi
	printf '%-12s %10.1f %12.0f %14.0f\n' "$chunk" "$seconds" \
		"$(calc "$ORDERS / $seconds")" "$(calc "$peak_kb / 1024")" >&2
	results="${results}RESULT restore_seconds_chunk_$chunk=$seconds
RESULT restore_peak_mb_chunk_$chunk=$(calc "$peak_kb / 1024")
"
	psql_ postgres -c "DROP DATABASE $db"
done

printf '\nRESULT orders=%s\nRESULT dump_bytes=%s\n%s' "$ORDERS" "$dump_bytes" "$results"
