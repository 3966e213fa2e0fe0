#!/usr/bin/env bash
# Static checks of the tree, run by .ci/run: shellcheck over every shell
# script in git (sourced files followed), that tools/typedefs.list holds
# the typedefs the sources use, and tools/pgindent --check over the C in
# src/, which prints the diff pgindent would make (tools/pgindent
# is Perl, not one for shellcheck); that the version of dwh.control is the
# one of debian/changelog (X.Y-N) and of META.json (X.Y.0, SemVer as PGXN
# wants it), and that debian/control is what pg_buildext makes of
# debian/control.in; that the regression test readme_queries runs the
# README's queries as written (tools/check-readme-queries.py); and
# monitoring/: promtool checks the Prometheus configuration with the
# rules it names and runs the rules' unit tests, and the exporter's
# queries file is checked for its shape.  All run;
# exits non-zero on any finding.  Needs the linters shellcheck and
# pg_bsd_indent, dpkg-dev, postgresql-common, prometheus (promtool) and
# python3-yaml (tools/install-deps.sh installs them).

set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

failed=0

mapfile -t scripts < <(git ls-files | grep -E '\.sh$|^\.ci/run$')
echo "lint: shellcheck over ${#scripts[@]} scripts"
shellcheck -x -P SCRIPTDIR "${scripts[@]}" || failed=1

echo "lint: tools/typedefs.list up to date, pgindent --check over src/"
perl tools/pgindent --check --update-typedefs || failed=1
perl tools/pgindent --check || failed=1

echo "lint: versions of dwh.control, debian/changelog and META.json agree"
control_version=$(sed -n "s/^default_version = '\(.*\)'$/\1/p" dwh.control)
deb_version=$(dpkg-parsechangelog -l debian/changelog -S Version)
if [[ ${deb_version%-*} != "$control_version" ]]; then
	echo "debian/changelog is at $deb_version, dwh.control at $control_version: dch -v $control_version-1" >&2
	failed=1
fi
python3 - "$control_version" <<'PY' || failed=1
import json
import sys

control = sys.argv[1]
# PGXN versions are SemVer: 1.1 is 1.1.0.
semver = control if control.count(".") == 2 else control + ".0"
try:
    meta = json.load(open("META.json", encoding="utf-8"))
except ValueError as e:
    sys.exit(f"META.json is not JSON: {e}")
wrong = [f"{where} is {got!r}" for where, got in (
    ("version", meta.get("version")),
    ("provides.dwh.version", meta.get("provides", {}).get("dwh", {}).get("version")),
) if got != semver]
if wrong:
    sys.exit(f"META.json: {', '.join(wrong)}, dwh.control says {control} ({semver})")
PY
echo "lint: sql/readme_queries.sql runs the README's queries as written"
python3 tools/check-readme-queries.py || failed=1

echo "lint: monitoring/: promtool check config and rules, promtool test rules, the exporter's queries file"
# check config checks the rules file it names too.
promtool check config monitoring/prometheus.yml || failed=1
(cd monitoring && promtool test rules dwh.rules.test.yml) || failed=1
python3 - monitoring/queries.yaml <<'PY' || failed=1
import re
import sys

import yaml

# The shape prometheus-postgres-exporter 0.11 reads, and this project's
# rules for it: every query runs in the database of the connection string
# only (master), every column has a usage and a HELP text, counters end in
# _total and gauges do not, no metric name twice.  The real exporter
# loads the file in test/t/042_prometheus_metrics.pl.
path = sys.argv[1]
problems = []
try:
    queries = yaml.safe_load(open(path, encoding="utf-8"))
except yaml.YAMLError as e:
    sys.exit(f"{path}: not YAML: {e}")
if not isinstance(queries, dict) or not queries:
    sys.exit(f"{path}: not a mapping of namespaces to queries")
names = {}
for namespace, q in queries.items():
    where = f"{path}: {namespace}"
    if not isinstance(q, dict) or not isinstance(q.get("query"), str):
        problems.append(f"{where}: no query")
        continue
    if q.get("master") is not True:
        problems.append(f"{where}: not master: true")
    unknown = set(q) - {"query", "master", "metrics", "cache_seconds", "runonserver"}
    if unknown:
        problems.append(f"{where}: unknown keys {sorted(unknown)}")
    metrics = q.get("metrics")
    if not isinstance(metrics, list) or not metrics:
        problems.append(f"{where}: no metrics")
        continue
    samples = 0
    for m in metrics:
        if not isinstance(m, dict) or len(m) != 1:
            problems.append(f"{where}: a metric is not one column: {m!r}")
            continue
        ((column, spec),) = m.items()
        spec = spec or {}
        usage = spec.get("usage")
        if usage not in ("LABEL", "COUNTER", "GAUGE"):
            problems.append(f"{where}.{column}: usage {usage!r}, not LABEL, COUNTER or GAUGE")
        if not str(spec.get("description", "")).strip():
            problems.append(f"{where}.{column}: no description")
        if not re.search(rf"\b{re.escape(column)}\b", q["query"]):
            problems.append(f"{where}.{column}: not a column of the query")
        if usage in ("COUNTER", "GAUGE"):
            samples += 1
            name = f"{namespace}_{column}"
            if (usage == "COUNTER") != name.endswith("_total"):
                problems.append(f"{where}.{column}: a {usage.lower()} named {name}")
            if name in names:
                problems.append(f"{where}.{column}: {name} is also made by {names[name]}")
            names[name] = namespace
    if samples == 0:
        problems.append(f"{where}: no COUNTER or GAUGE column")
if problems:
    sys.exit("\n".join(problems))
PY

echo "lint: debian/control made from debian/control.in (pg_buildext checkcontrol)"
pg_buildext checkcontrol || failed=1

if [[ $failed -ne 0 ]]; then
	echo "lint: findings above" >&2
	exit 1
fi
echo "lint: clean"
