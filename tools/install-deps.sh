#!/usr/bin/env bash
# Install the Debian bookworm packages that dwh needs to build and test:
# PostgreSQL 15 and its PGXS toolchain (gcc, and clang-14/llvm-14 for the
# JIT bitcode), the Kafka and Redis client libraries (and jansson, which
# version 1.0 needs when the upgrade test builds it), the Perl
# modules of the TAP tests, redis-server, redis-cli, kcat, pg_bsd_indent and
# the shell linter, and what the test Kafka broker and the data generator
# need (Java 17, Maven, OpenSSL, Python 3), and the benchmarks' Kafka
# producer (python3-confluent-kafka); what builds the Debian package
# (tools/build-deb.sh: debhelper, dpkg-dev, postgresql-server-dev-all for
# pg_buildext's debhelper sequence); Graphviz and its font for the picture
# of the tables (tools/erd.sh, test/t/041_vault_diagram.pl); gnuplot for
# the benchmarks' images; Prometheus
# (promtool, for tools/lint.sh) and its PostgreSQL exporter (started by
# test/t/042_prometheus_metrics.pl on a port of its own), with python3-yaml
# for the lint of the exporter's queries file; then fetch
# the Kafka broker's jars once (tools/kafka/kafka.sh fetch, into
# /var/cache/dwh).
# Idempotent and non-interactive: apt is skipped entirely when every
# package is already installed, the fetch when the jars are there.  Run it
# as root (or as a user with sudo).

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
	# Version 1.0 (commit aa4d7d2) parsed with jansson: test/t/006_upgrade_live.pl
	# builds it to upgrade a live 1.0 installation.
	libjansson-dev
	perl
	libipc-run-perl
	redis-server
	kcat
	pg-bsd-indent
	openjdk-17-jre-headless
	maven
	python3
	python3-confluent-kafka
	openssl
	redis-tools
	stunnel4
	shellcheck
	build-essential
	debhelper
	dpkg-dev
	postgresql-server-dev-all
	graphviz
	# The benchmarks' images (bench/kafka_common.sh, bench_plot).
	gnuplot-nox
	fonts-dejavu-core
	prometheus
	prometheus-postgres-exporter
	python3-yaml
)

missing=()
for pkg in "${packages[@]}"; do
	status=$(dpkg-query -W -f='${db:Status-Abbrev}' "$pkg" 2>/dev/null || true)
	if [[ $status != ii* ]]; then
		missing+=("$pkg")
	fi
done

as_root=()
if [[ $(id -u) -ne 0 ]] && command -v sudo >/dev/null 2>&1; then
	as_root=(sudo)
fi

if [[ ${#missing[@]} -eq 0 ]]; then
	echo "install-deps: all ${#packages[@]} packages are installed"
else
	echo "install-deps: installing ${missing[*]}"

	if [[ $(id -u) -ne 0 ]]; then
		if [[ ${#as_root[@]} -gt 0 ]]; then
			echo "install-deps: not running as root, using sudo for apt-get" >&2
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

	# Debian starts the services of prometheus (port 9090) and
	# prometheus-postgres-exporter (9187) where systemd runs: this machine
	# builds and tests, the tests start their own exporter, so the
	# services that this run installed are stopped and disabled.
	if [[ -d /run/systemd/system ]]; then
		for service in prometheus prometheus-postgres-exporter; do
			if [[ " ${missing[*]} " == *" $service "* ]]; then
				"${as_root[@]}" systemctl disable --now "$service.service" </dev/null || true
			fi
		done
	fi
fi

# The Kafka jars come from Maven Central, not apt: fetched once into a
# cache that every user (the TAP tests run as postgres) can read.  A no-op
# when they are already there, so no root is needed then.
kafka_sh="$(dirname "$0")/kafka/kafka.sh"
if ! bash "$kafka_sh" fetch </dev/null; then
	if [[ $(id -u) -ne 0 && ${#as_root[@]} -gt 0 ]]; then
		echo "install-deps: fetching the Kafka jars again with sudo" >&2
		"${as_root[@]}" bash "$kafka_sh" fetch </dev/null
	else
		exit 1
	fi
fi
