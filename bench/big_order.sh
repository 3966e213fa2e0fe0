#!/usr/bin/env bash
#
# Benchmark of one large order: what an order of N items costs through
# dwh.ingest_order(), for its first version (new to DDS) and for a second
# version that swaps a tenth of its items and closes it (links unlinked and
# added, mart counts moved), for N from 100 up to an order of about 1 MB.
# The cost must grow linearly with N: the last column (microseconds per
# item) stays flat.
#
# It is a benchmark that reports figures, not a test with a threshold; it
# ends with "RESULT key=value" lines.  Runs as root (or the cluster owner)
# on a machine where PostgreSQL 15 and the extension are installed; starts
# a throw-away cluster of its own and removes it.
#
# Usage: bench/big_order.sh
# Environment: BENCH_ITEMS (sizes, default "100 1000 5000 13000": the last about 1 MB),
#   BENCH_DIR (/tmp), PG_CONFIG (/usr/lib/postgresql/15/bin/pg_config).

set -euo pipefail

SIZES=${BENCH_ITEMS:-100 1000 5000 13000}
PARENT=${BENCH_DIR:-/tmp}
PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}
bindir=$("$PG_CONFIG" --bindir)

if [ "$(id -u)" = 0 ]; then
	as_owner() { runuser -u postgres -- "$@"; }
	owner=postgres
else
	as_owner() { "$@"; }
	owner=$(id -un)
fi

work=$(mktemp -d "$PARENT/dwh-big-order.XXXXXX")
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

as_owner "$bindir/initdb" -D "$data" -U postgres -E UTF8 --locale=C.UTF-8 \
	--auth=trust >"$work/initdb.log" 2>&1
cat >>"$data/postgresql.conf" <<EOF
listen_addresses = ''
unix_socket_directories = '$work'
shared_preload_libraries = 'dwh'
shared_buffers = 1GB
max_locks_per_transaction = 128
EOF
as_owner "$bindir/pg_ctl" -D "$data" -l "$work/server.log" -w start >/dev/null
psql_() { as_owner "$bindir/psql" -X -q -A -t -h "$work" -U postgres -d postgres -v ON_ERROR_STOP=1 "$@"; }
psql_ -c 'CREATE EXTENSION dwh'

# One message of an order with n items (dish k of the restaurant's 100,000
# named "Блюдо k"), the items from first to first + n - 1.
psql_ <<'EOF'
CREATE FUNCTION public.big_order(id bigint, n integer, first integer, status text, ts text)
RETURNS text LANGUAGE sql AS $$
    SELECT jsonb_build_object(
        'object_id', id, 'object_type', 'order', 'sent_dttm', ts,
        'payload', jsonb_build_object(
            'restaurant', jsonb_build_object('id', 'r-big'),
            'date', ts, 'user', jsonb_build_object('id', 'u-big'),
            'order_items', (SELECT jsonb_agg(jsonb_build_object(
                                'id', 'dish-' || k, 'name', 'Блюдо ' || k,
                                'price', 100, 'quantity', 1))
                            FROM generate_series(first, first + n - 1) k),
            'bonus_payment', 0, 'cost', 100 * n, 'payment', 100 * n,
            'bonus_grant', 0,
            'statuses', jsonb_build_array(jsonb_build_object('status', status, 'dttm', ts)),
            'final_status', status, 'update_ts', ts))::text
$$;
EOF

printf '%-8s %10s %12s %12s %12s\n' items bytes 'v1 ms' 'v2 ms' 'v2 us/item'
id=0
results=()
for n in $SIZES; do
	id=$((id + 1))
	swap=$((n / 10 > 0 ? n / 10 : 1))
	# Each version's message is built before the clock starts; the timing
	# is the server's, around the ingest call only.
	out=$(psql_ <<EOF
SET dwh.max_order_items = 100000;
SET dwh.max_message_size = '64MB';
CREATE TEMP TABLE m AS
SELECT big_order($id, $n, 1, 'CANCELLED', '2023-05-01 10:00:00') AS v1,
       big_order($id, $n, 1 + $swap, 'CLOSED', '2023-05-01 11:00:00') AS v2;
CREATE TEMP TABLE t (k text, ms float8);
DO \$\$
DECLARE
    m record;
    t0 timestamptz;
    r text;
BEGIN
    SELECT * INTO m FROM m;
    t0 := clock_timestamp();
    r := dwh.ingest_order(convert_to(m.v1, 'UTF8'));
    INSERT INTO t VALUES ('v1', 1000 * extract(epoch FROM clock_timestamp() - t0));
    IF r <> 'applied' THEN RAISE EXCEPTION 'version 1: %', r; END IF;
    t0 := clock_timestamp();
    r := dwh.ingest_order(convert_to(m.v2, 'UTF8'));
    INSERT INTO t VALUES ('v2', 1000 * extract(epoch FROM clock_timestamp() - t0));
    IF r <> 'applied' THEN RAISE EXCEPTION 'version 2: %', r; END IF;
END
\$\$;
SELECT octet_length(v2) FROM m;
SELECT round(ms::numeric, 1) FROM t ORDER BY k;
SELECT count(*) FROM dds.l_order_product WHERE h_order_pk = dwh.hash_key('$id');
EOF
)
	read -r bytes v1 v2 links <<<"$(echo "$out" | tr '\n' ' ')"
	if [ "$links" != "$n" ]; then
		echo "order $id: $links links after version 2, expected $n" >&2
		exit 1
	fi
	per_item=$(awk -v ms="$v2" -v n="$n" 'BEGIN { printf "%.1f", 1000 * ms / n }')
	printf '%-8s %10s %12s %12s %12s\n' "$n" "$bytes" "$v1" "$v2" "$per_item"
	results+=("RESULT big_order_${n}_bytes=$bytes" "RESULT big_order_${n}_v1_ms=$v1" "RESULT big_order_${n}_v2_ms=$v2")
done

problems=$(psql_ -c 'SELECT count(*) FROM dwh.verify()')
echo "dwh.verify(): $problems rows"
[ "$problems" = 0 ] || exit 1
printf '%s\n' "${results[@]}"
