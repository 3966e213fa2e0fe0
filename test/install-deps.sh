#!/usr/bin/env bash
# Install the Debian bookworm packages that dwh needs to build and test:
# PostgreSQL 15 and its PGXS toolchain (gcc, and clang-14/llvm-14 for the
# JIT bitcode), the Kafka, Redis and JSON client libraries, the Perl
# modules of the TAP tests, redis-server, kcat and pg_bsd_indent.
# Idempotent and non-interactive: apt is skipped entirely when every
# package is already installed.  Run it as root (or as a user with sudo).

set -euo pipefail

packages=(
	postgresql-15
	postgresql-client-15
	postgresql-server-dev-15
	libpq-dev
	clang-14
	llvm-14-dev
	gcc
	libc6-dev
	make
	librdkafka-dev
	libhiredis-dev
	libjansson-dev
	perl
	libipc-run-perl
	redis-server
	kcat
	pg-bsd-indent
)

missing=()
for pkg in "${packages[@]}"; do
	status=$(dpkg-query -W -f='${db:Status-Abbrev}' "$pkg" 2>/dev/null || true)
	if [[ $status != ii* ]]; then
		missing+=("$pkg")
	fi
done

if [[ ${#missing[@]} -eq 0 ]]; then
	echo "install-deps: all ${#packages[@]} packages are installed"
	exit 0
fi

echo "install-deps: installing ${missing[*]}"

as_root=()
if [[ $(id -u) -ne 0 ]]; then
	if command -v sudo >/dev/null 2>&1; then
		echo "install-deps: not running as root, using sudo for apt-get" >&2
		as_root=(sudo)
	else
		echo "install-deps: must run as root to install ${missing[*]} (sudo is not available)" >&2
		exit 1
	fi
fi

apt_env=(env DEBIAN_FRONTEND=noninteractive NEEDRESTART_MODE=a)
"${as_root[@]}" "${apt_env[@]}" apt-get update </dev/null
"${as_root[@]}" "${apt_env[@]}" apt-get install -y --no-install-recommends \
	-o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
	"${missing[@]}" </dev/null
