#!/usr/bin/env bash
# Draw the entity-relationship diagram of dwh's tables: docs/vault.svg.
#
#   tools/erd.sh [OUTPUT]        (default docs/vault.svg; .svg, .png or .dot)
#
# Starts a throw-away PostgreSQL cluster (unix socket in a private folder,
# no TCP), runs CREATE EXTENSION dwh there with the dwh installed for
# PG_CONFIG (default /usr/lib/postgresql/15/bin/pg_config: the package or a
# make install), and draws what the catalog holds (tools/erd.py: tables of
# stg, dds, cdm and dwh, columns and types, primary keys, foreign keys, the
# references that triggers enforce, the comments) with Graphviz's dot.
# The cluster is removed at the end.  Run it as root (the cluster runs as
# postgres) or as any user who can run initdb.  Needs graphviz and
# python3 (tools/install-deps.sh installs them).

set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}
output=${1:-$root/docs/vault.svg}
format=${output##*.}
case $format in
svg | png | dot) ;;
*)
	echo "erd: OUTPUT must end in .svg, .png or .dot, not $output" >&2
	exit 1
	;;
esac
if [[ $format != dot ]] && ! command -v dot >/dev/null 2>&1; then
	echo "erd: dot is missing: apt-get install graphviz (tools/install-deps.sh)" >&2
	exit 1
fi

bindir=$("$PG_CONFIG" --bindir)
sharedir=$("$PG_CONFIG" --sharedir)
if [[ ! -f $sharedir/extension/dwh.control ]]; then
	echo "erd: dwh is not installed for $PG_CONFIG (install the package, or make install)" >&2
	exit 1
fi

# initdb refuses root: the cluster runs as postgres then.
as_owner=()
if [[ $(id -u) -eq 0 ]]; then
	as_owner=(runuser -u postgres --)
fi

tmp=$(mktemp -d /tmp/dwh-erd.XXXXXX)
cleanup()
{
	if [[ -f $tmp/data/postmaster.pid ]]; then
		"${as_owner[@]}" "$bindir/pg_ctl" -D "$tmp/data" -m immediate stop >/dev/null 2>&1 || true
	fi
	rm -rf "$tmp"
}
trap cleanup EXIT
if [[ ${#as_owner[@]} -gt 0 ]]; then
	chown postgres: "$tmp"
fi

export LANG=C.UTF-8 LC_ALL=C.UTF-8
unset PGHOST PGHOSTADDR PGPORT PGDATABASE PGUSER PGPASSWORD PGSERVICE PGOPTIONS
"${as_owner[@]}" "$bindir/initdb" -D "$tmp/data" -U postgres -A trust -E UTF8 --locale=C.UTF-8 \
	>"$tmp/initdb.log" 2>&1 || {
	cat "$tmp/initdb.log" >&2
	exit 1
}
"${as_owner[@]}" "$bindir/pg_ctl" -D "$tmp/data" -l "$tmp/postgres.log" -w \
	-o "-c listen_addresses='' -c unix_socket_directories='$tmp' -c port=5432" start >/dev/null || {
	cat "$tmp/postgres.log" >&2
	exit 1
}

psql=("$bindir/psql" -X -q -v ON_ERROR_STOP=1 -h "$tmp" -p 5432 -U postgres -d postgres)
"${psql[@]}" -c 'CREATE EXTENSION dwh'
version=$("${psql[@]}" -At -c "SELECT extversion FROM pg_extension WHERE extname = 'dwh'")

PGHOST=$tmp PGPORT=5432 PGUSER=postgres PGDATABASE=postgres \
	python3 "$root/tools/erd.py" --psql "$bindir/psql" --title "dwh $version" >"$tmp/vault.dot"
mkdir -p "$(dirname "$output")"
if [[ $format == dot ]]; then
	cp "$tmp/vault.dot" "$output"
else
	dot -T"$format" "$tmp/vault.dot" -o "$output"
fi
echo "erd: $output (dwh $version)"
