#!/usr/bin/env bash
# Static checks of the tree, run by .ci/run: shellcheck over every shell
# script in git (sourced files followed).  Exits non-zero on any finding.
# Needs shellcheck (tools/install-deps.sh installs it).

set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

mapfile -t scripts < <(git ls-files | grep -E '\.sh$|^\.ci/run$')
echo "lint: shellcheck over ${#scripts[@]} scripts"
shellcheck -x -P SCRIPTDIR "${scripts[@]}"
echo "lint: clean"
