#!/usr/bin/env bash
# Static checks of the tree, run by .ci/run: shellcheck over every shell
# script in git (sourced files followed), that tools/typedefs.list holds
# the typedefs the sources use, and tools/pgindent --check over the C in
# src/, which prints the diff pgindent would make (tools/pgindent
# is Perl, not one for shellcheck); that the version of dwh.control is the
# one of debian/changelog (X.Y-N) and of META.json (X.Y.0, SemVer as PGXN
# wants it), and that debian/control is what pg_buildext makes of
# debian/control.in.  All run; exits non-zero on any finding.  Needs
# the linters shellcheck and pg_bsd_indent, dpkg-dev and postgresql-common
# (tools/install-deps.sh installs them).

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
echo "lint: debian/control made from debian/control.in (pg_buildext checkcontrol)"
pg_buildext checkcontrol || failed=1

if [[ $failed -ne 0 ]]; then
	echo "lint: findings above" >&2
	exit 1
fi
echo "lint: clean"
