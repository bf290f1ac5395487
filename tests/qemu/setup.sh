#!/usr/bin/env bash
# Prepare what tests/qemu.rs needs to boot a real Debian kernel with real USB hotplug.
#
# - qemu-system-x86_64 and depmod (kmod) are installed with apt-get when missing (root only).
# - busybox-static and the newest unsigned Debian linux-image-6.1.0-N-amd64 are fetched with
#   `apt-get download` and only unpacked under the cache, never installed: nothing touches /boot,
#   and busybox-static is not installed because it conflicts with the `busybox` package that
#   other tests may want.
# - The kernel's modules.dep is generated with `depmod -b` (the .deb ships none).
#
# Everything is cached under ${CARGO_TARGET_DIR:-target}/qemu/; a second run with a complete
# cache uses no network. Delete that directory to pick up a newer kernel.
#
# Output (stdout, one KEY=VALUE per line, nothing else), for tests/qemu.rs to read:
#   QEMU=/usr/bin/qemu-system-x86_64
#   BUSYBOX=.../busybox            a static busybox
#   KERNEL=.../vmlinuz-6.1.0-N-amd64
#   MODULES=.../lib/modules/6.1.0-N-amd64   with modules.dep
#   KVER=6.1.0-N-amd64
#   UDEVADM=.../bin/udevadm            Debian's udevadm, unpacked from the udev package
#   UDEV=252.39-1~deb12u2              that package's version
#   SFDISK=/usr/sbin/sfdisk            for the partition tables of the capture images
# Progress and errors go to stderr. Exit status: 0 ready, 1 something is missing and could not
# be installed or fetched (the message says what).
#
# Usage: tests/qemu/setup.sh
set -euo pipefail
export LC_ALL=C

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
target=${CARGO_TARGET_DIR:-$root/target}
case $target in /*) ;; *) target=$root/$target ;; esac
cache=$target/qemu
mkdir -p "$cache"
# One setup at a time per cache: two test runs may start together.
exec 9>"$cache/.lock"
flock 9
work=$(mktemp -d "$cache/tmp.XXXXXX")
trap 'rm -rf "$work"' EXIT

say() { printf 'setup.sh: %s\n' "$*" >&2; }
die() {
	say "$*"
	exit 1
}

# apt_get ARGS...: apt-get that waits for other users of the dpkg lock and retries the lists lock.
apt_get() {
	local try
	for try in 1 2 3 4 5 6; do
		if apt-get -o DPkg::Lock::Timeout=600 -q "$@" >&2; then
			return 0
		fi
		say "apt-get $* failed (try $try), retrying in 10 s"
		sleep 10
	done
	return 1
}

updated=no
apt_update_once() {
	[ "$updated" = yes ] && return 0
	apt_get update && updated=yes
}

# need COMMAND PACKAGE: install PACKAGE if COMMAND is not on PATH.
need() {
	command -v "$1" >/dev/null && return 0
	[ "$(id -u)" = 0 ] || die "$1 is missing and only root can install $2: apt-get install $2"
	command -v apt-get >/dev/null || die "$1 is missing and there is no apt-get to install $2"
	say "installing $2 (for $1)"
	apt-get -o DPkg::Lock::Timeout=600 -q install -y --no-install-recommends "$2" >&2 ||
		{ apt_update_once && apt_get install -y --no-install-recommends "$2"; } ||
		die "could not install $2"
	command -v "$1" >/dev/null || die "$2 installed but $1 is still not on PATH"
}

# newest_package REGEX: the highest version-sorted package name apt knows that matches REGEX.
newest_package() {
	local names
	names=$(apt-cache search --names-only "$1" | cut -d' ' -f1 | sort -V)
	if [ -z "$names" ]; then
		apt_update_once || return 1
		names=$(apt-cache search --names-only "$1" | cut -d' ' -f1 | sort -V)
	fi
	[ -n "$names" ] || return 1
	printf '%s\n' "$names" | tail -n 1
}

# unpack_package NAME DIR: apt-get download NAME and extract it into DIR (atomically: DIR
# appears only when complete).
unpack_package() {
	local name=$1 dir=$2 dl=$work/$1
	mkdir "$dl"
	say "downloading $name"
	# As root, apt downloads as _apt, which cannot write into our private directory.
	local sandbox=()
	[ "$(id -u)" != 0 ] || sandbox=(-o APT::Sandbox::User=root)
	(cd "$dl" && apt-get -q "${sandbox[@]}" download "$name" >&2) ||
		{ apt_update_once && (cd "$dl" && apt-get -q "${sandbox[@]}" download "$name" >&2); } ||
		die "could not download $name"
	mkdir "$dl/root"
	dpkg-deb -x "$dl"/*.deb "$dl/root"
	rm -rf "$dir"
	mv "$dl/root" "$dir"
}

# The machine image may carry a newer qemu-utils (qemu-img) from backports that Debian 12's
# qemu-system-x86 conflicts with: apt removes it. Put Debian 12's qemu-utils back then, so
# qemu-img stays available to whoever used it.
had_qemu_img=no
command -v qemu-img >/dev/null && had_qemu_img=yes
need qemu-system-x86_64 qemu-system-x86
if [ "$had_qemu_img" = yes ] && ! command -v qemu-img >/dev/null; then
	need qemu-img qemu-utils
fi
need depmod kmod
need dpkg-deb dpkg
need sfdisk fdisk
qemu=$(command -v qemu-system-x86_64)
depmod=$(command -v depmod)

# busybox: unpacked, not installed.
busybox=$cache/busybox-static/bin/busybox
if [ ! -x "$busybox" ]; then
	unpack_package busybox-static "$cache/busybox-static"
fi
[ -x "$busybox" ] || die "busybox-static has no bin/busybox"

# Kernel: reuse the newest complete cached one; else download the newest known to apt.
kroot=$(printf '%s\n' "$cache"/kernel-*/.complete | sort -V | tail -n 1)
if [ -e "$kroot" ]; then
	kroot=${kroot%/.complete}
else
	pkg=$(newest_package '^linux-image-6\.1\.0-[0-9]+-amd64-unsigned$') ||
		die "apt knows no linux-image-6.1.0-N-amd64-unsigned package (is this Debian 12?)"
	kroot=$cache/kernel-${pkg#linux-image-}
	unpack_package "$pkg" "$kroot"
	kver=$(basename "$(find "$kroot/lib/modules" -mindepth 1 -maxdepth 1 -type d | head -n 1)")
	[ -n "$kver" ] || die "$pkg has no lib/modules/VERSION"
	say "depmod $kver"
	"$depmod" -b "$kroot" "$kver"
	touch "$kroot/.complete"
fi
kver=$(basename "$(find "$kroot/lib/modules" -mindepth 1 -maxdepth 1 -type d | head -n 1)")
kernel=$kroot/boot/vmlinuz-$kver
modules=$kroot/lib/modules/$kver
[ -f "$kernel" ] || die "no kernel image at $kernel"
[ -f "$modules/modules.dep" ] || die "no modules.dep in $modules"

# udevadm for `udevadm monitor --kernel --property` in the guest: the udev package unpacked,
# not installed (the host's own udev is left alone). Its shared libraries come from the host
# (ldd), which is Debian 12 too; tests/qemu.rs copies them into the initramfs.
udev_version=$(apt-cache policy udev | sed -n 's/^ *Candidate: //p')
if [ -z "$udev_version" ] || [ "$udev_version" = "(none)" ]; then
	apt_update_once || true
	udev_version=$(apt-cache policy udev | sed -n 's/^ *Candidate: //p')
fi
if [ -z "$udev_version" ] || [ "$udev_version" = "(none)" ]; then
	die "apt knows no udev package"
fi
udev_dir=$cache/udev-$(printf '%s' "$udev_version" | tr -c 'A-Za-z0-9.+\n-' '_')
# Debian 12 ships it as /bin/udevadm; later releases (merged /usr) as /usr/bin/udevadm.
find_udevadm() {
	local at
	for at in "$udev_dir/bin/udevadm" "$udev_dir/usr/bin/udevadm"; do
		[ -x "$at" ] && printf '%s\n' "$at" && return 0
	done
	return 1
}
udevadm=$(find_udevadm) || { unpack_package udev "$udev_dir" && udevadm=$(find_udevadm); } ||
	die "the udev package has no bin/udevadm nor usr/bin/udevadm"
if missing_libs=$(ldd "$udevadm" | grep 'not found'); then
	die "udevadm needs shared libraries this machine lacks (install them with apt-get): $missing_libs"
fi
sfdisk=$(command -v sfdisk)

printf 'QEMU=%s\nBUSYBOX=%s\nKERNEL=%s\nMODULES=%s\nKVER=%s\nUDEVADM=%s\nUDEV=%s\nSFDISK=%s\n' \
	"$qemu" "$busybox" "$kernel" "$modules" "$kver" "$udevadm" "$udev_version" "$sfdisk"
