#!/usr/bin/env bash
# Local demo of dwh: installs what it needs, builds and installs the
# extension, starts a PostgreSQL cluster of its own under .demo/ (never a
# system cluster), loads the dictionaries of the production profile,
# backfills orders through dwh.ingest_orders() with a progress line, and
# shows the marts.  Run again, it reuses the cluster and its data.
#
#   sudo test/demo.sh            # 50,000 orders
#   sudo DEMO_ORDERS=5000 test/demo.sh
#   sudo test/demo.sh stop       # stop the demo cluster
#
# The Kafka and Redis workers are not part of dwh yet: orders enter through
# the same SQL entry point the Kafka worker will call, dictionaries through
# the STG tables the Redis worker will write.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
demo="$root/.demo"
pgbin=/usr/lib/postgresql/15/bin
port=${DEMO_PORT:-54329}
orders=${DEMO_ORDERS:-50000}
batch=1000

if [ "$(id -u)" -ne 0 ]; then
	if command -v sudo >/dev/null; then
		exec sudo -E "$0" "$@"
	fi
	echo "demo.sh: run as root (it installs packages and the extension)" >&2
	exit 1
fi

as_pg() { runuser -u postgres -- "$@"; }
psql_demo() { as_pg "$pgbin/psql" -X -q -h "$demo/run" -p "$port" -d dwh_demo -v ON_ERROR_STOP=1 "$@"; }

if [ "${1:-}" = stop ]; then
	as_pg "$pgbin/pg_ctl" -D "$demo/data" -m fast stop || true
	exit 0
fi

echo "== installing packages and dwh"
"$root/test/install-deps.sh"
make -s -C "$root" PG_CONFIG="$pgbin/pg_config" >/dev/null
make -s -C "$root" PG_CONFIG="$pgbin/pg_config" install >/dev/null

echo "== PostgreSQL cluster in $demo (port $port)"
mkdir -p "$demo/run"
chown -R postgres "$demo"
if [ ! -f "$demo/data/PG_VERSION" ]; then
	as_pg "$pgbin/initdb" -D "$demo/data" -E UTF8 --locale=C.UTF-8 -A trust >/dev/null
	cat >>"$demo/data/postgresql.conf" <<EOF
shared_preload_libraries = 'dwh'
port = $port
listen_addresses = ''
unix_socket_directories = '$demo/run'
shared_buffers = 512MB
max_wal_size = 4GB
EOF
fi
if ! as_pg "$pgbin/pg_ctl" -D "$demo/data" status >/dev/null 2>&1; then
	as_pg "$pgbin/pg_ctl" -D "$demo/data" -l "$demo/server.log" -w start >/dev/null
fi
as_pg "$pgbin/psql" -X -q -h "$demo/run" -p "$port" -d postgres -tAc \
	"SELECT 1 FROM pg_database WHERE datname = 'dwh_demo'" | grep -q 1 ||
	as_pg "$pgbin/createdb" -h "$demo/run" -p "$port" dwh_demo
psql_demo -c "CREATE EXTENSION IF NOT EXISTS dwh"
if ! psql_demo -tAc "SELECT 1 FROM pg_namespace WHERE nspname = 'bench'" | grep -q 1; then
	psql_demo -f "$root/test/bench/sql_chain_setup.sql" >/dev/null
	psql_demo -c "INSERT INTO bench.params VALUES ($orders, 0, $batch)"
fi

echo "== dictionaries: 100 users, 4 restaurants with their menus"
psql_demo <<'SQL'
INSERT INTO stg.users (object_id, payload) SELECT object_id, payload FROM bench.user_values
ON CONFLICT (object_id) DO UPDATE SET payload = EXCLUDED.payload;
INSERT INTO stg.restaurants (object_id, payload) SELECT object_id, payload FROM bench.restaurant_values
ON CONFLICT (object_id) DO UPDATE SET payload = EXCLUDED.payload;
SQL

echo "== backfill: $orders orders in batches of $batch through dwh.ingest_orders()"
start=$(date +%s.%N)
applied=0
for ((k = 1; (k - 1) * batch < orders; k++)); do
	n=$(psql_demo -tAc "SELECT applied FROM dwh.ingest_orders(bench.batch(0, $orders, $k, $batch), 'order-service_orders')")
	applied=$((applied + n))
	now=$(date +%s.%N)
	printf '\r   batches %d   orders applied %d   %.0f orders/s (generation included)   ' \
		"$k" "$applied" "$(echo "($k * $batch) / ($now - $start)" | bc -l)"
done
echo

echo "== the marts"
threshold=$(( orders / 500 > 1 ? orders / 500 : 1 ))
psql_demo -v threshold="$threshold" <<'SQL'
\pset footer off
\echo 'Top dishes per user (cdm.user_product_counters):'
SELECT n.username AS "user", m.product_name AS dish, m.order_cnt AS orders
FROM cdm.user_product_counters m
JOIN LATERAL (SELECT username FROM dds.s_user_names s WHERE s.h_user_pk = m.user_id
              ORDER BY load_dt DESC LIMIT 1) n ON true
ORDER BY m.order_cnt DESC, 1, 2 LIMIT 10;
\echo 'Top categories per user (cdm.user_category_counters):'
SELECT n.username AS "user", m.category_name AS category, m.order_cnt AS orders
FROM cdm.user_category_counters m
JOIN LATERAL (SELECT username FROM dds.s_user_names s WHERE s.h_user_pk = m.user_id
              ORDER BY load_dt DESC LIMIT 1) n ON true
ORDER BY m.order_cnt DESC, 1, 2 LIMIT 10;
\echo '"Pastry lovers": users with at least' :threshold 'orders holding a pastry (Выпечка):'
SELECT count(*) AS users, min(order_cnt) AS fewest, max(order_cnt) AS most
FROM cdm.user_category_counters
WHERE category_name = 'Выпечка' AND order_cnt >= :threshold;
\echo 'State of the warehouse:'
SELECT (SELECT count(*) FROM stg.order_events) AS orders,
       (SELECT count(*) FROM dwh.dead_letters) AS dead_letters,
       (SELECT count(*) FROM cdm.user_product_counters) AS product_rows,
       (SELECT count(*) FROM cdm.user_category_counters) AS category_rows,
       (SELECT count(*) FROM dwh.verify()) AS verify_differences;
SQL

cat <<EOF

The demo cluster keeps running:
  connect: sudo -u postgres $pgbin/psql -h $demo/run -p $port dwh_demo
  stop:    sudo test/demo.sh stop
EOF

differences=$(psql_demo -tAc "SELECT count(*) FROM dwh.verify()")
if [ "$differences" != 0 ]; then
	echo "demo.sh: dwh.verify() found $differences differences" >&2
	exit 1
fi
