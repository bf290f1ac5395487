#!/bin/bash
# Build the .deb of autoattach from a tree staged by `make install DESTDIR=STAGE`:
# copy it, add DEBIAN/ (a generated control file, conffiles, the maintainer scripts of
# packaging/deb/), then dpkg-deb --build. Called by `make deb`.
#
#   packaging/build-deb.sh STAGE OUTDIR VERSION
set -euo pipefail

if [ $# -ne 3 ]; then
    echo "usage: $0 STAGE OUTDIR VERSION" >&2
    exit 2
fi
stage=$1 outdir=$2 version=$3
here=$(cd "$(dirname "$0")" && pwd)
maintainer=${MAINTAINER:-autoattach developers <autoattach@invalid>}
arch=$(dpkg --print-architecture)
bin=$stage/usr/bin/autoattach

[ -x "$bin" ] || { echo "error: $bin missing: run make stage first" >&2; exit 1; }

# Shared libraries the binary links (libc6, libgcc-s1), with the versions its symbols
# need, as dpkg-shlibdeps finds them; it wants a debian/control, so give it one.
shlibs_dir=$(mktemp -d)
trap 'rm -rf "$shlibs_dir"' EXIT
mkdir "$shlibs_dir/debian"
printf 'Source: autoattach\n\nPackage: autoattach\nArchitecture: any\n' >"$shlibs_dir/debian/control"
bin_abs=$(cd "$(dirname "$bin")" && pwd)/autoattach
shlibs=$(cd "$shlibs_dir" && dpkg-shlibdeps -O "$bin_abs" 2>/dev/null | sed -n 's/^shlibs:Depends=//p')
[ -n "$shlibs" ] || { echo "error: dpkg-shlibdeps found no library dependencies for $bin" >&2; exit 1; }

work=$outdir/deb-build
rm -rf "$work"
mkdir -p "$work"
cp -a "$stage/." "$work/"
install -d -m 0755 "$work/DEBIAN"

installed_size=$(du -sk --exclude=DEBIAN "$work" | cut -f1)

# Qubes packages: qrexec-client-vm is in qubes-core-qrexec (R4.1+) or
# qubes-core-agent-qrexec (R4.0); qubesdb-read in qubesdb; the services switch
# (/run/qubes-service) and the udev rules that publish devices in qubes-core-agent and
# its qubes-utils. procps: /bin/kill for ExecReload=.
cat >"$work/DEBIAN/control" <<CONTROL
Package: autoattach
Version: $version-1
Architecture: $arch
Maintainer: $maintainer
Installed-Size: $installed_size
Depends: $shlibs, systemd, procps, qubes-core-agent, qubes-core-qrexec | qubes-core-agent-qrexec, qubesdb
Recommends: qubes-usb-proxy
Section: admin
Priority: optional
Description: attach trusted USB devices from the Qubes USB qube to their qube
 autoattach runs in the Qubes OS USB qube (sys-usb). It listens to kernel
 uevents and, when a USB device matches one of the rules (udev syntax,
 ATTACH="qube"), asks dom0 to attach it, or its block device, to that qube,
 starting the qube if needed.
 .
 Turn it on per qube from dom0: qvm-service --enable sys-usb autoattach.
 The dom0 side is in /usr/share/autoattach/dom0/. qubes-usb-proxy is needed
 only to attach whole USB devices (qvm-usb), not block devices.
CONTROL

(cd "$work" && find etc -type f | sort | sed 's|^|/|') >"$work/DEBIAN/conffiles"
for script in postinst prerm postrm; do
    install -m 0755 "$here/deb/$script" "$work/DEBIAN/$script"
done
chmod 0644 "$work/DEBIAN/control" "$work/DEBIAN/conffiles"

deb=$outdir/autoattach_${version}-1_${arch}.deb
dpkg-deb --root-owner-group -Zxz --build "$work" "$deb" >/dev/null
rm -rf "$work"
echo "$deb"
