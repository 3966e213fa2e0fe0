#!/usr/bin/env bash
#
# Build another commit of dwh into a private copy of PostgreSQL's
# installation, so that a benchmark can run it beside this build without
# touching the one installed on the machine: run-all.sh's BENCH_BASELINE.
#
# The copy holds PostgreSQL's programs, libraries and shared files (about
# 60 MB) laid out as the packages lay them out, under DIR/prefix; its
# pg_config then reports paths inside the copy (PostgreSQL finds its files
# relative to its programs), and the commit's dwh is installed there with
# DESTDIR.  The commit's source comes from git archive: nothing of the work
# tree is used.
#
# Usage: bench/build_baseline.sh COMMIT DIR
# Prints the copy's pg_config path as its last line.
# Environment: PG_CONFIG (/usr/lib/postgresql/15/bin/pg_config), the
#   installation copied and built against.

set -euo pipefail

if [ $# -ne 2 ]; then
	echo "usage: $0 COMMIT DIR" >&2
	exit 2
fi
commit=$1
dir=$2
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}

bindir=$("$PG_CONFIG" --bindir)
pkglibdir=$("$PG_CONFIG" --pkglibdir)
sharedir=$("$PG_CONFIG" --sharedir)
prefix=$dir/prefix

git -C "$root" rev-parse --verify --quiet "$commit^{commit}" >/dev/null ||
	{ echo "build_baseline: $commit is not a commit of $root" >&2; exit 1; }

rm -rf "$dir"
mkdir -p "$dir/src" "$prefix$(dirname "$bindir")" "$prefix$(dirname "$pkglibdir")" \
	"$prefix$(dirname "$sharedir")"
git -C "$root" archive "$commit" | tar -x -C "$dir/src"

# PostgreSQL itself, then the commit's dwh over it.
cp -a "$bindir" "$prefix$bindir"
[ -e "$prefix$pkglibdir" ] || cp -a "$pkglibdir" "$prefix$pkglibdir"
cp -a "$sharedir" "$prefix$sharedir"
rm -f "$prefix$pkglibdir"/dwh.so "$prefix$sharedir"/extension/dwh[-.]*

make -s -C "$dir/src" PG_CONFIG="$PG_CONFIG" >"$dir/build.log" 2>&1 ||
	{ tail -n 20 "$dir/build.log" >&2; exit 1; }
make -s -C "$dir/src" PG_CONFIG="$PG_CONFIG" DESTDIR="$prefix" install >>"$dir/build.log" 2>&1 ||
	{ tail -n 20 "$dir/build.log" >&2; exit 1; }

pg_config=$prefix$bindir/pg_config
[ -e "$("$pg_config" --pkglibdir)/dwh.so" ] ||
	{ echo "build_baseline: the copy's pg_config does not see its dwh.so" >&2; exit 1; }
echo "$pg_config"
