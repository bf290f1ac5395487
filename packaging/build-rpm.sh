#!/bin/bash
# Build the .rpm of autoattach from a tree staged by `make install DESTDIR=STAGE`, with
# packaging/autoattach.spec (which only copies the staged tree). Called by `make rpm`.
#
#   packaging/build-rpm.sh STAGE OUTDIR VERSION
set -euo pipefail

if [ $# -ne 3 ]; then
    echo "usage: $0 STAGE OUTDIR VERSION" >&2
    exit 2
fi
stage=$1 outdir=$2 version=$3
here=$(cd "$(dirname "$0")" && pwd)

command -v rpmbuild >/dev/null || {
    echo "error: rpmbuild missing: apt-get install rpm (Debian) or dnf install rpm-build" >&2
    exit 1
}
[ -x "$stage/usr/bin/autoattach" ] || { echo "error: $stage/usr/bin/autoattach missing: run make stage first" >&2; exit 1; }

mkdir -p "$outdir"
stage_abs=$(cd "$stage" && pwd)
top=$(cd "$outdir" && pwd)/rpmbuild
rm -rf "$top"
mkdir -p "$top"

# _build_id_links none: no /usr/lib/.build-id links for a binary cargo already stripped.
rpmbuild -bb --quiet \
    --define "_topdir $top" \
    --define "stagedir $stage_abs" \
    --define "pkgversion $version" \
    --define "_build_id_links none" \
    "$here/autoattach.spec"

rpm=$(find "$top/RPMS" -name 'autoattach-*.rpm' | head -n 1)
[ -n "$rpm" ] || { echo "error: rpmbuild made no package" >&2; exit 1; }
mv "$rpm" "$outdir/"
rm -rf "$top"
echo "$outdir/$(basename "$rpm")"
