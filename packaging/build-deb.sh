#!/bin/bash
# Build the .deb of autoattach from a tree staged by `make install DESTDIR=STAGE`: copy it,
# add what Debian wants of every package (copyright, changelog.Debian.gz, md5sums, conffiles,
# the maintainer scripts of packaging/debian/) and a control file, then dpkg-deb --build.
# Called by `make deb`.
#
#   packaging/build-deb.sh STAGE OUTDIR VERSION-REVISION
#
# HOMEPAGE (environment): the Homepage: field, left out when empty (packaging/README.md).
# The maintainer is the one of the top entry of packaging/debian/changelog.
set -euo pipefail

if [ $# -ne 3 ]; then
    echo "usage: $0 STAGE OUTDIR VERSION-REVISION" >&2
    exit 2
fi
stage=$1 outdir=$2 version=$3
here=$(cd "$(dirname "$0")" && pwd)
changelog=$here/debian/changelog
arch=$(dpkg --print-architecture)
bin=$stage/usr/bin/autoattach

[ -x "$bin" ] || { echo "error: $bin missing: run make stage-deb first" >&2; exit 1; }
top=$(dpkg-parsechangelog -l "$changelog" -S Version)
[ "$top" = "$version" ] || { echo "error: $changelog starts at $top, not $version" >&2; exit 1; }
maintainer=$(dpkg-parsechangelog -l "$changelog" -S Maintainer)

# A static binary needs no shared library; a dynamic one (PKG_BIN=target/release/autoattach)
# gets the library dependencies dpkg-shlibdeps finds, with the versions its symbols need.
shlibs=
if readelf -d "$bin" 2>/dev/null | grep -q '(NEEDED)'; then
    command -v dpkg-shlibdeps >/dev/null || { echo "error: dpkg-shlibdeps missing: apt-get install dpkg-dev" >&2; exit 1; }
    shlibs_dir=$(mktemp -d)
    trap 'rm -rf "$shlibs_dir"' EXIT
    mkdir "$shlibs_dir/debian"
    printf 'Source: autoattach\n\nPackage: autoattach\nArchitecture: any\n' >"$shlibs_dir/debian/control"
    bin_abs=$(cd "$(dirname "$bin")" && pwd)/autoattach
    shlibs=$(cd "$shlibs_dir" && dpkg-shlibdeps -O "$bin_abs" 2>/dev/null | sed -n 's/^shlibs:Depends=//p')
    [ -n "$shlibs" ] || { echo "error: dpkg-shlibdeps found no library dependencies for $bin" >&2; exit 1; }
    shlibs="$shlibs, "
fi

work=$outdir/deb-build
rm -rf "$work"
mkdir -p "$work"
cp -a "$stage/." "$work/"
install -d -m 0755 "$work/DEBIAN"
install -m 0644 "$here/debian/copyright" "$work/usr/share/doc/autoattach/copyright"
gzip -9n <"$changelog" >"$work/usr/share/doc/autoattach/changelog.Debian.gz"
chmod 0644 "$work/usr/share/doc/autoattach/changelog.Debian.gz"
install -D -m 0644 "$here/debian/lintian-overrides" "$work/usr/share/lintian/overrides/autoattach"

installed_size=$(du -sk --exclude=DEBIAN "$work" | cut -f1)

# Qubes packages: qrexec-client-vm is in qubes-core-qrexec (R4.1+); qubesdb-read (the
# fallback when qubesdb's socket is absent) in qubesdb; the services switch
# (/run/qubes-service) and the udev rules that publish devices in qubes-core-agent and
# its qubes-utils. procps: /bin/kill for ExecReload=. systemd: the unit, systemd-sysusers.
{
    echo "Package: autoattach"
    echo "Version: $version"
    echo "Architecture: $arch"
    echo "Maintainer: $maintainer"
    echo "Installed-Size: $installed_size"
    echo "Depends: ${shlibs}systemd, procps, qubes-core-agent, qubes-core-qrexec, qubesdb"
    echo "Recommends: qubes-usb-proxy"
    echo "Section: admin"
    echo "Priority: optional"
    if [ -n "${HOMEPAGE:-}" ]; then echo "Homepage: $HOMEPAGE"; fi
    cat <<'DESCRIPTION'
Description: attach trusted USB devices from the Qubes USB qube to their qube
 autoattach runs in the USB qube of Qubes OS (sys-usb). It reads the kernel's
 device events itself and, when a device matches one of the rules (written in
 the syntax of udev rules, with ATTACH="qube"), asks dom0 to attach the
 device, or its block device, to that qube, starting the qube if needed.
 .
 Turn it on from dom0 with: qvm-service --enable sys-usb autoattach
 The dom0 side is in /usr/share/autoattach/dom0/. qubes-usb-proxy is needed
 only to attach whole USB devices (qvm-usb), not block devices.
DESCRIPTION
} >"$work/DEBIAN/control"

(cd "$work" && find etc -type f | sort | sed 's|^|/|') >"$work/DEBIAN/conffiles"
(cd "$work" && find . -path ./DEBIAN -prune -o -type f -print | sed 's|^\./||' | LC_ALL=C sort |
    xargs md5sum) >"$work/DEBIAN/md5sums"
for script in postinst prerm postrm; do
    install -m 0755 "$here/debian/$script" "$work/DEBIAN/$script"
done
chmod 0644 "$work/DEBIAN/control" "$work/DEBIAN/conffiles" "$work/DEBIAN/md5sums"

deb=$outdir/autoattach_${version}_${arch}.deb
dpkg-deb --root-owner-group -Zxz --build "$work" "$deb" >/dev/null
rm -rf "$work"
echo "$deb"
