#!/usr/bin/env bash
# The test command of dwh: as root, `bash test/run-tests.sh` (a user with
# sudo is re-run under sudo).
#
# Installs the build and test dependencies (tools/install-deps.sh), then
# installs the extension the way a DBA does: builds the Debian package
# (tools/build-deb.sh) and installs it with dpkg, checking that the files
# the server loads are the package's.  With DWH_TEST_INSTALL=make it
# builds and installs from source with `make install` instead (removing
# the package first when it is installed, so that the two never mix).
# It copies the source tree to a fresh directory and runs `make
# installcheck` there as the postgres user (initdb refuses to run as root)
# in three passes so that a failure in one suite does not hide the others:
# pg_regress (sql/*.sql), the isolation specs (test/isolation/specs) and
# the TAP tests (test/t/*.pl).  installcheck builds nothing: every test
# runs against the installed extension.  When something fails it prints
# the diffs and logs that say why.  The last line of output is always "dwh
# tests: N passed, M failed"; the exit status is 0 only when everything
# passed.
#
# Environment: DWH_TEST_INSTALL (package, the default, or make), PG_CONFIG
# (default /usr/lib/postgresql/15/bin/pg_config; another one needs
# DWH_TEST_INSTALL=make), DWH_KEEP_TEST_DIR=1 to keep the test directory
# even when all passed.  The tests get DWH_GIT_DIR, a mirror clone of this
# repository, and DWH_SECRET_FILE_FIXTURES, a directory of secret files
# owned by root and by nobody (see below).

set -euo pipefail

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$script_dir/.." && pwd)
PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}
DWH_TEST_INSTALL=${DWH_TEST_INSTALL:-package}
case $DWH_TEST_INSTALL in
package)
	if [[ $PG_CONFIG != /usr/lib/postgresql/15/bin/pg_config ]]; then
		echo "run-tests: the package is for /usr/lib/postgresql/15; with PG_CONFIG=$PG_CONFIG use DWH_TEST_INSTALL=make" >&2
		exit 1
	fi
	;;
make) ;;
*)
	echo "run-tests: DWH_TEST_INSTALL is package or make, not '$DWH_TEST_INSTALL'" >&2
	exit 1
	;;
esac

passed=0
failed=0
summary_printed=0
work=

# The summary line, always last.  An unexpected exit (a failed build, a
# missing tool) counts as one more failure.
on_exit()
{
	local status=$?

	if [[ $summary_printed -eq 0 ]]; then
		if [[ $status -eq 0 ]]; then
			status=1
		fi
		echo "run-tests: stopped before the tests finished (exit status $status)"
		[[ -n $work ]] && echo "run-tests: test directory kept: $work"
		echo "dwh tests: $passed passed, $((failed + 1)) failed"
	fi
	exit "$status"
}
trap on_exit EXIT

if [[ $(id -u) -ne 0 ]]; then
	if command -v sudo >/dev/null 2>&1; then
		echo "run-tests: building and installing the extension needs root; re-running under sudo" >&2
		exec sudo env PG_CONFIG="$PG_CONFIG" CI="${CI:-}" \
			DWH_TEST_INSTALL="$DWH_TEST_INSTALL" DWH_KEEP_TEST_DIR="${DWH_KEEP_TEST_DIR:-}" \
			bash "$script_dir/run-tests.sh" "$@"
	fi
	echo "run-tests: must run as root (or as a user with sudo): it installs the extension and runs the tests as the postgres user" >&2
	exit 1
fi

# Predictable client and server environment: UTF-8 (dwh needs a UTF8
# database), English messages, no connection settings from outside.
export LANG=C.UTF-8 LC_ALL=C.UTF-8
unset LANGUAGE PGHOST PGHOSTADDR PGPORT PGDATABASE PGUSER PGPASSWORD \
	PGPASSFILE PGSERVICE PGSERVICEFILE PGOPTIONS PGDATA PGSSLMODE

echo "== dependencies"
bash "$root/tools/install-deps.sh"

if ! id -u postgres >/dev/null 2>&1; then
	echo "run-tests: there is no postgres user to run the tests as (postgresql-15 creates it)" >&2
	exit 1
fi

# A copy of the tree owned by postgres, without git metadata and without
# the build and test output of earlier runs, so that the build is fresh.
work=$(mktemp -d /tmp/dwh-tests.XXXXXX)
src=$work/dwh
logs=$work/logs
mkdir -p "$src" "$logs"
tar -C "$root" \
	--exclude=./.git --exclude=./.demo --exclude='./tmp_check*' --exclude=./results \
	--exclude=./log --exclude=./output_iso --exclude=./regression.diffs \
	--exclude=./regression.out --exclude=./test/isolation/results \
	--exclude='*.o' --exclude='*.bc' --exclude='*.so' \
	-cf - . | tar -C "$src" --no-same-owner -xf -

# test/t/006_upgrade_live.pl builds version 1.0 from its commit, and the
# copy above has no .git: it reads the history from DWH_GIT_DIR, a mirror
# clone of this repository in the test directory (which the postgres user
# can read wherever this clone is).  Without history the test fails and
# says why.
git_dir=
if git -c safe.directory='*' -C "$root" rev-parse --git-dir >/dev/null 2>&1; then
	git_dir=$work/dwh.git
	git -c safe.directory='*' clone --quiet --mirror --no-local "$root" "$git_dir"
fi

package=postgresql-15-dwh
installed_package()
{
	[[ $(dpkg-query -W -f='${db:Status-Abbrev}' "$package" 2>/dev/null || true) == ii* ]]
}

# README.md, "Installation": what the package depends on and holds, and
# that tools/build-deb.sh refuses a changelog of another version.
check_package()
{
	local deb=$1 depends contents t

	depends=$(dpkg-deb -f "$deb" Depends)
	for d in postgresql-15 postgresql-15-jit-llvm librdkafka1 libhiredis0.14; do
		if ! grep -Eq "(^|, )$d( |,|$)" <<<"$depends"; then
			echo "run-tests: the package does not depend on $d: $depends" >&2
			exit 1
		fi
	done
	contents=$(dpkg-deb -c "$deb" | awk '{ print $6 }')
	for f in ./usr/lib/postgresql/15/lib/dwh.so \
		./usr/lib/postgresql/15/lib/bitcode/dwh.index.bc \
		./usr/share/postgresql/15/extension/dwh.control \
		./usr/share/postgresql/15/extension/dwh--1.1.sql \
		./usr/share/postgresql/15/extension/dwh--1.0.sql \
		./usr/share/postgresql/15/extension/dwh--1.0--1.1.sql \
		./usr/share/doc/$package/README.Debian; do
		if ! grep -qxF "$f" <<<"$contents"; then
			echo "run-tests: the package lacks $f" >&2
			exit 1
		fi
	done
	if grep -E '/(t|regress|isolation|expected|sql)/|\.pl$|\.spec$' <<<"$contents"; then
		echo "run-tests: the package holds tests" >&2
		exit 1
	fi
	# No maintainer script: installing the package changes no cluster.
	if dpkg-deb -I "$deb" | grep -Ew 'preinst|postinst|prerm|postrm'; then
		echo "run-tests: the package has maintainer scripts" >&2
		exit 1
	fi
	t=$(mktemp -d)
	mkdir "$t/tools" "$t/debian"
	cp "$root/tools/build-deb.sh" "$t/tools/"
	cp "$root/debian/changelog" "$t/debian/"
	echo "default_version = '9.9'" >"$t/dwh.control"
	if bash "$t/tools/build-deb.sh" "$t/out" 2>"$t/err" ||
		! grep -q 'debian/changelog is at' "$t/err"; then
		echo "run-tests: tools/build-deb.sh built a package whose changelog is not at dwh.control's version" >&2
		exit 1
	fi
	rm -rf "$t"
	echo "package: dependencies, files and version checks as README.md says"
}

if [[ $DWH_TEST_INSTALL == package ]]; then
	echo "== build the package (tools/build-deb.sh) and install it"
	deb=$(bash "$root/tools/build-deb.sh" "$work/deb" | tail -n 1)
	check_package "$deb"
	# dpkg -i replaces the files of an installed package of the same
	# version, and those of an earlier make install; its dependencies are
	# among those tools/install-deps.sh installed.
	env DEBIAN_FRONTEND=noninteractive dpkg -i "$deb" </dev/null
	# The server must load the package's files, unmodified.
	libdir=$("$PG_CONFIG" --pkglibdir)
	sharedir=$("$PG_CONFIG" --sharedir)
	for f in "$libdir/dwh.so" "$sharedir/extension/dwh.control"; do
		owner=$(dpkg-query -S "$f" 2>/dev/null | cut -d: -f1 || true)
		if [[ $owner != "$package" ]]; then
			echo "run-tests: $f is not the package's (owner: ${owner:-none})" >&2
			exit 1
		fi
	done
	if ! changed=$(dpkg --verify "$package") || [[ -n $changed ]]; then
		echo "run-tests: the files of $package differ from the package: $changed" >&2
		exit 1
	fi
	# README.md, "Monitoring with Prometheus": the package installs the
	# files of monitoring/ as examples, unchanged.
	examples=/usr/share/doc/$package/examples
	for f in "$root"/monitoring/*.yml "$root"/monitoring/*.yaml; do
		if ! cmp -s "$f" "$examples/${f##*/}"; then
			echo "run-tests: $examples/${f##*/} is not monitoring/${f##*/}" >&2
			exit 1
		fi
	done
	dpkg-query -W -f='installed ${Package} ${Version}\n' "$package"
else
	if installed_package; then
		echo "== remove the package $package (DWH_TEST_INSTALL=make)"
		env DEBIAN_FRONTEND=noninteractive dpkg -r "$package" </dev/null
	fi
	echo "== build and install ($PG_CONFIG) in $src"
	make -C "$src" -j"$(nproc)" PG_CONFIG="$PG_CONFIG"
	make -C "$src" PG_CONFIG="$PG_CONFIG" install
fi
chown -R postgres: "$work"

# test/t/049_secret_file_owners.pl needs secret files owned by root and by
# another user, which only root can make: made here, read-only for the
# tests.  Each holds a property librdkafka does not know, so that a file
# the workers read tells itself apart from one they refuse.
fixtures=$work/secret-file-owners
mkdir -m 0755 "$fixtures"
secret_fixture()
{
	local name=$1 owner=$2 mode=$3

	printf 'no.such.property=1\n' >"$fixtures/$name"
	chown "$owner" "$fixtures/$name"
	chmod "$mode" "$fixtures/$name"
}
secret_fixture root-0640 root:postgres 0640
secret_fixture root-0600 root:root 0600
secret_fixture root-0660 root:postgres 0660
secret_fixture root-0644 root:root 0644
secret_fixture nobody-0644 nobody:nogroup 0644

# Run `make installcheck` as postgres with the given variable overrides,
# its output shown and saved to $logs/$1.out; returns make's status.
run_installcheck()
{
	local name=$1
	shift
	local status

	echo "== $name"
	set +e
	(cd "$src" && runuser -u postgres -- env HOME="$work" DWH_GIT_DIR="$git_dir" \
		DWH_SECRET_FILE_FIXTURES="$fixtures" \
		make PG_CONFIG="$PG_CONFIG" installcheck "$@" </dev/null) 2>&1 |
		tee "$logs/$name.out"
	status=${PIPESTATUS[0]}
	set -e
	return "$status"
}

# Count the "... ok" and "... FAILED" lines of a pg_regress run (failures
# marked ignored count as passed).  A run that failed without any failed
# test (initdb or the server did not start) counts as one failure.
count_pg_regress()
{
	local name=$1 status=$2
	local ok bad

	ok=$(grep -cE '\.\.\. (ok|failed \(ignored\))' "$logs/$name.out" || true)
	bad=$(grep -cE '\.\.\. FAILED' "$logs/$name.out" || true)
	if [[ $status -ne 0 && $bad -eq 0 ]]; then
		echo "run-tests: $name failed outside of any test"
		bad=1
	fi
	passed=$((passed + ok))
	failed=$((failed + bad))
}

# Count TAP test files from prove's output: "Files=N" is the total, and a
# file fails when its line in the Test Summary Report shows a non-zero wait
# status or failed tests, or is followed by parse errors.  (A file listed
# there only for "TODO passed" still passes.)  The names of the failed
# files go to tap_failed_files.
tap_failed_files=()
count_prove()
{
	local name=$1 status=$2
	local files bad

	files=$(sed -nE 's/^Files=([0-9]+),.*/\1/p' "$logs/$name.out" | tail -n 1)
	mapfile -t tap_failed_files < <(awk '
		/^Test Summary Report/ { report = 1; next }
		/^Files=[0-9]+,/ { report = 0 }
		report && /^[^ ].* \(Wstat: / {
			file = $1
			if ($0 !~ /\(Wstat: 0 / || $0 !~ / Failed: 0\)/)
				failed[file] = 1
			next
		}
		report && /^  (Parse errors|Failed tests?|Non-zero)/ { failed[file] = 1 }
		END { for (f in failed) print f }' "$logs/$name.out")
	bad=${#tap_failed_files[@]}
	if [[ -z $files ]]; then
		echo "run-tests: prove did not report its results"
		failed=$((failed + (bad > 0 ? bad : 1)))
		return
	fi
	if [[ $status -ne 0 && $bad -eq 0 ]]; then
		echo "run-tests: $name failed outside of any test file"
		bad=1
		files=$((files + 1))
	fi
	passed=$((passed + files - bad))
	failed=$((failed + bad))
}

# Print a file under a header, whole or its last $2 lines.
show()
{
	local file=$1 lines=${2:-}

	[[ -f $file ]] || return 0
	if [[ -n $lines ]]; then
		echo "---- $file (last $lines lines)"
		tail -n "$lines" "$file"
	else
		echo "---- $file"
		cat "$file"
	fi
}

shopt -s nullglob

regress_status=0
isolation_status=0
tap_status=0

sql_tests=("$src"/sql/*.sql)
if [[ ${#sql_tests[@]} -gt 0 ]]; then
	run_installcheck regress ISOLATION= TAP_TESTS= || regress_status=$?
	count_pg_regress regress "$regress_status"
fi

specs=("$src"/test/isolation/specs/*.spec)
if [[ ${#specs[@]} -gt 0 ]]; then
	run_installcheck isolation REGRESS= TAP_TESTS= || isolation_status=$?
	count_pg_regress isolation "$isolation_status"
fi

tap_tests=("$src"/test/t/*.pl)
if [[ ${#tap_tests[@]} -gt 0 ]]; then
	run_installcheck tap REGRESS= ISOLATION= || tap_status=$?
	count_prove tap "$tap_status"
fi

if [[ $failed -ne 0 ]]; then
	echo
	echo "== why it failed"
	# Diffs when tests ran; the server's logs when it could not run them.
	if [[ $regress_status -ne 0 ]]; then
		show "$src/regression.diffs"
		if [[ ! -s $src/regression.diffs ]]; then
			show "$src/log/initdb.log" 50
			show "$src/log/postmaster.log" 200
		fi
	fi
	if [[ $isolation_status -ne 0 ]]; then
		iso=$src/test/isolation/results
		show "$iso/regression.diffs"
		show "$src/output_iso/regression.diffs"
		if [[ ! -s $iso/regression.diffs ]]; then
			show "$iso/log/initdb.log" 50
			show "$iso/log/postmaster.log" 200
		fi
	fi
	# The logs of each failed TAP test: its own log whole, the logs of
	# its servers' last lines.
	if [[ $tap_status -ne 0 ]]; then
		for t in "${tap_failed_files[@]}"; do
			base=$(basename "$t" .pl)
			show "$src/tmp_check/log/regress_log_$base"
			for f in "$src/tmp_check/log/${base}"_*.log; do
				show "$f" 300
			done
		done
		if [[ ${#tap_failed_files[@]} -eq 0 ]]; then
			for f in "$src"/tmp_check/log/*; do
				show "$f" 300
			done
		fi
	fi
	echo "run-tests: test directory kept: $work"
elif [[ -z ${DWH_KEEP_TEST_DIR:-} ]]; then
	rm -rf "$work"
else
	echo "run-tests: test directory kept: $work"
fi

summary_printed=1
echo "dwh tests: $passed passed, $failed failed"
[[ $failed -eq 0 ]]
