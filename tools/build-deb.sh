#!/usr/bin/env bash
# Build the Debian package of dwh: postgresql-15-dwh_<version>_amd64.deb.
#
#   tools/build-deb.sh [OUTDIR]
#
# Copies the tree (as it is in the working directory, uncommitted changes
# included; no build output, no .git) to a fresh folder under /tmp, runs
# `dpkg-buildpackage -us -uc -b` there (debian/: pg_buildext, one package
# per version of debian/pgversions), and moves the packages (.deb, its
# -dbgsym .deb), .buildinfo and .changes into OUTDIR (default .build/deb
# at the root of the tree; emptied of earlier packages first).  The last
# line of output is the path of the .deb, so that a script can take it:
#
#   deb=$(tools/build-deb.sh | tail -n 1)
#   apt-get install ./"${deb#./}"       # or: apt-get install "$deb"
#
# Needs the build dependencies of debian/control (tools/install-deps.sh
# installs them); no root.  Refuses to build when debian/changelog's
# upstream version is not dwh.control's default_version.

set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
outdir=${1:-$root/.build/deb}

control_version=$(sed -n "s/^default_version = '\(.*\)'$/\1/p" "$root/dwh.control")
deb_version=$(dpkg-parsechangelog -l "$root/debian/changelog" -S Version)
source_name=$(dpkg-parsechangelog -l "$root/debian/changelog" -S Source)
upstream_version=${deb_version%-*}
if [[ $upstream_version != "$control_version" ]]; then
	echo "build-deb: debian/changelog is at $deb_version, dwh.control at $control_version:" \
		"add a debian/changelog entry for $control_version-1 (dch -v $control_version-1)" >&2
	exit 1
fi

if ! (cd "$root" && dpkg-checkbuilddeps); then
	echo "build-deb: install the build dependencies first: tools/install-deps.sh (as root)" >&2
	exit 1
fi

work=$(mktemp -d /tmp/dwh-deb.XXXXXX)
trap 'rm -rf "$work"' EXIT
src=$work/$source_name-$upstream_version
mkdir -p "$src"
tar -C "$root" \
	--exclude=./.git --exclude=./.demo --exclude=./.build --exclude='./tmp_check*' \
	--exclude=./results --exclude=./log --exclude=./output_iso \
	--exclude=./regression.diffs --exclude=./regression.out \
	--exclude=./test/isolation/results \
	--exclude='./debian/postgresql-*-dwh' --exclude=./debian/.debhelper \
	--exclude=./debian/files --exclude='./debian/*.substvars' \
	--exclude='./debian/*debhelper*' --exclude='./dwh--[0-9]*.sql' \
	--exclude='*.o' --exclude='*.bc' --exclude='*.so' \
	-cf - . | tar -C "$src" --no-same-owner -xf -

echo "build-deb: dpkg-buildpackage -us -uc -b in $src" >&2
(cd "$src" && dpkg-buildpackage -us -uc -b) >&2

mkdir -p "$outdir"
rm -f "$outdir"/*.deb "$outdir"/*.buildinfo "$outdir"/*.changes
mv "$work"/*.deb "$work"/*.buildinfo "$work"/*.changes "$outdir"/
outdir=$(cd "$outdir" && pwd)

arch=$(dpkg-architecture -qDEB_HOST_ARCH)
shopt -s nullglob
debs=("$outdir"/postgresql-*-dwh_"${deb_version}_$arch".deb)
if [[ ${#debs[@]} -ne 1 ]]; then
	echo "build-deb: expected one package in $outdir, found ${#debs[@]}" >&2
	exit 1
fi
echo "build-deb: packages in $outdir:" >&2
ls -l "$outdir" >&2
echo "${debs[0]}"
