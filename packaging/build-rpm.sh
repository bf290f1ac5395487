#!/bin/bash
# Build an rpm of autoattach from a staged tree, with packaging/NAME.spec (which only copies
# the tree). Called by `make rpm` (NAME autoattach) and `make dom0-rpm` (NAME autoattach-dom0).
#
#   packaging/build-rpm.sh NAME STAGE OUTDIR VERSION
#
# The spec gets its %changelog from packaging/debian/changelog (one changelog for the
# project), converted to rpm's format. Where Fedora's systemd-rpm-macros are missing (a
# Debian build machine), packaging/rpm/macros.systemd-compat supplies %systemd_post and
# the other macros the template spec uses. HOMEPAGE (environment): the URL: tag, left out
# when empty (packaging/README.md).
set -euo pipefail

if [ $# -ne 4 ]; then
    echo "usage: $0 NAME STAGE OUTDIR VERSION" >&2
    exit 2
fi
name=$1 stage=$2 outdir=$3 version=$4
here=$(cd "$(dirname "$0")" && pwd)
spec=$here/$name.spec

command -v rpmbuild >/dev/null || {
    echo "error: rpmbuild missing: apt-get install rpm (Debian) or dnf install rpm-build (Fedora)" >&2
    exit 1
}
[ -f "$spec" ] || { echo "error: $spec missing" >&2; exit 1; }
[ -d "$stage" ] || { echo "error: $stage missing: run make stage-rpm (or dom0-rpm) first" >&2; exit 1; }

# rpm_changelog FILE: the Debian changelog FILE as rpm %changelog entries, newest first.
rpm_changelog() {
    dpkg-parsechangelog -l "$1" --all --format rfc822 | awk '
        function flush() { if (head != "") { print head; printf "%s", body; print ""; head = ""; body = "" } }
        /^Version: / { ver = $2 }
        /^Maintainer: / { sub(/^Maintainer: /, ""); who = $0 }
        /^Date: / { sub(/^Date: /, ""); cmd = "LC_ALL=C date -u -d \"" $0 "\" \"+%a %b %d %Y\""; cmd | getline day; close(cmd) }
        /^Changes:/ { flush(); head = "* " day " " who " - " ver; next }
        /^ / && head != "" {
            line = substr($0, 2)
            if (line ~ /^[^ ]+ \(/ || line == ".") next
            if (line ~ /^  \* /) { sub(/^  \* /, "- ", line) } else { sub(/^    /, "  ", line) }
            gsub(/%/, "%%", line)
            body = body line "\n"
        }
        END { flush() }'
}

mkdir -p "$outdir"
stage_abs=$(cd "$stage" && pwd)
top=$(cd "$outdir" && pwd)/rpmbuild-$name
rm -rf "$top"
mkdir -p "$top/SPECS"
{
    cat "$spec"
    printf '\n%%changelog\n'
    rpm_changelog "$here/debian/changelog"
} >"$top/SPECS/$name.spec"

args=(--define "_topdir $top" --define "stagedir $stage_abs" --define "pkgversion $version"
    --define "licensefile $(cd "$here/.." && pwd)/LICENSE" --define "_build_id_links none")
if [ -n "${HOMEPAGE:-}" ]; then args+=(--define "homepage $HOMEPAGE"); fi
if [ -z "$(rpm --eval '%{?systemd_post:1}')" ]; then
    args+=(--load "$here/rpm/macros.systemd-compat" --define "autoattach_sysusers_pre $here/rpm/sysusers-pre.sh")
fi

rpmbuild -bb --quiet "${args[@]}" "$top/SPECS/$name.spec"

rpm=$(find "$top/RPMS" -name "$name-$version-*.rpm" | head -n 1)
[ -n "$rpm" ] || { echo "error: rpmbuild made no $name package" >&2; exit 1; }
mv "$rpm" "$outdir/"
rm -rf "$top"
echo "$outdir/$(basename "$rpm")"
