#!/usr/bin/env bash
# Static checks of the tree, run by .ci/run: shellcheck over every shell
# script in git (sourced files followed), that tools/typedefs.list holds
# the typedefs the sources use, and tools/pgindent --check over the C in
# src/, which prints the diff pgindent would make (tools/pgindent
# is Perl, not one for shellcheck).  Both run; exits non-zero on any
# finding of either.  Needs shellcheck and pg_bsd_indent
# (tools/install-deps.sh installs both).

set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

failed=0

mapfile -t scripts < <(git ls-files | grep -E '\.sh$|^\.ci/run$')
echo "lint: shellcheck over ${#scripts[@]} scripts"
shellcheck -x -P SCRIPTDIR "${scripts[@]}" || failed=1

echo "lint: tools/typedefs.list up to date, pgindent --check over src/"
perl tools/pgindent --check --update-typedefs || failed=1
perl tools/pgindent --check || failed=1

if [[ $failed -ne 0 ]]; then
	echo "lint: findings above" >&2
	exit 1
fi
echo "lint: clean"
