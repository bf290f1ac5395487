# Shared by tests/dom0/run.sh and tests/dom0/hostile.sh: a small Qubes of stand-ins
# (tests/dom0/standins, see common.sh there for the state they keep) and a way to run the
# real service in it as qrexec would.
# shellcheck shell=bash
export LC_ALL=C
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
bin=$tmp/bin
STATE=$tmp/state
export STATE
mkdir -p "$bin"
for f in qvm-check qvm-start logger qubesdb-read; do ln -s "$here/standins/$f" "$bin/$f"; done
ln -s "$here/standins/qvm-device" "$bin/qvm-block"
ln -s "$here/standins/qvm-device" "$bin/qvm-usb"
svc=$root/dom0 # where custom.USBDeviceAttach and custom.USBDeviceDetach are
sh_=dash       # the shell running the service

# need COMMAND PACKAGE: install PACKAGE with apt-get if COMMAND is missing (fresh CI machines).
need() {
	command -v "$1" >/dev/null && return 0
	[ "$(id -u)" = 0 ] && command -v apt-get >/dev/null || return 0
	printf 'installing %s (for %s)\n' "$2" "$1"
	apt-get -o DPkg::Lock::Timeout=600 install -y -q "$2" >/dev/null 2>&1 ||
		{ apt-get -o DPkg::Lock::Timeout=600 update -q >/dev/null 2>&1 &&
			apt-get -o DPkg::Lock::Timeout=600 install -y -q "$2" >/dev/null 2>&1; } || :
}

# shell_as SH: run the service with SH; bash with gawk, as dom0 runs it (Fedora: /bin/sh is
# bash, awk is gawk), dash with the first awk on PATH (mawk on Debian), to keep it POSIX.
# Sets label (SH+AWK) for the output.
# shellcheck disable=SC2034
shell_as() {
	sh_=$1
	rm -f "$bin/awk"
	[ "$1" != bash ] || ! command -v gawk >/dev/null || ln -s "$(command -v gawk)" "$bin/awk"
	label="$1+$(basename "$(readlink -f "$(PATH=$bin:$PATH command -v awk)")")"
}

# world RELEASE: a fresh Qubes of that release (41, 42, 43). dom0, sys-usb, sys-usb2 and
# sys-net run; work, vault and personal exist, halted; the allowlist is $STATE/autoattach.conf.
world() {
	rm -rf "$STATE"
	mkdir -p "$STATE/run"
	chmod 700 "$STATE/run"
	printf 'Qubes release 4.%s.0 (R4.%s)\n' "${1#4}" "${1#4}" >"$STATE/qubes-release"
	printf '%s\n' dom0 sys-usb sys-usb2 sys-net work vault personal >"$STATE/qubes"
	printf '%s\n' dom0 sys-usb sys-usb2 sys-net >"$STATE/running"
	: >"$STATE/calls"
	: >"$STATE/log"
	: >"$STATE/autoattach.conf"
	SRC=sys-usb VIA=arg WAIT=5 POLL=0.05 EXTRA=()
}
running() { printf '%s\n' "$@" >>"$STATE/running"; }
allow() { printf '%s\n' "$@" >>"$STATE/autoattach.conf"; }

# enc STRING: the identity encoding (IDENTITY.md section 2), written here independently
# of the service: [A-Za-z0-9.-] as is, ':' as '+', any other byte as _ and 2 hex digits.
enc() {
	printf '%s' "$1" | od -An -v -tx1 | tr -s ' ' '\n' | sed '/^$/d' | while read -r h; do
		case $h in
		3a) printf '+' ;;
		2d | 2e | 3[0-9] | 4[1-9a-f] | 5[0-9a] | 6[1-9a-f] | 7[0-9a]) printf '%b' "\\x$h" ;;
		*) printf '_%s' "$h" ;;
		esac
	done
}

# publish SRC CLASS PORT DESC [ID]: SRC's udev scripts publish the device (qubes-linux-utils
# udev/udev-block-add-change, udev-usb-add-change): with an ID, R4.3's keys too (block parent,
# usb interfaces, written last) and the id R4.3 qubesd computes from them.
publish() {
	local d=$STATE/qdb/$1/qubes-$2-devices/${3//./_}
	rm -rf "$d"
	mkdir -p "$d" "$STATE/ids/$1/$2"
	printf '%s' "$4" >"$d/desc"
	if [ "$2" = block ]; then printf 'w' >"$d/mode"; else printf '2' >"$d/usb-ver"; fi
	if [ -n "${5:-}" ]; then
		if [ "$2" = block ]; then printf '2-1:1.0' >"$d/parent"; else printf ':080650:' >"$d/interfaces"; fi
		printf '%s' "$5" >"$STATE/ids/$1/$2/$3"
	else
		rm -f "$STATE/ids/$1/$2/$3"
	fi
}
# unpublish SRC CLASS PORT: udev/udev-block-remove, udev-usb-remove.
unpublish() { rm -rf "$STATE/qdb/$1/qubes-$2-devices/${3//./_}" "$STATE/ids/$1/$2/$3"; }
attached() { printf '%s %s\n' "$2" "$3" >>"$STATE/$1.attached"; }

# call SERVICE [ARG...]: run the service as qrexec would, in an empty environment; sets code
# (read by the scripts that source this file).
# Its stdout and stderr go to $tmp/OUT.stdout and .stderr (OUT: fg unless set).
# shellcheck disable=SC2034
call() {
	local name=$1 env
	shift
	env=(PATH="$bin:/usr/bin:/bin" STATE="$STATE" AUTOATTACH_CONF="$STATE/autoattach.conf"
		AUTOATTACH_RELEASE_FILE="$STATE/qubes-release" AUTOATTACH_WAIT="$WAIT"
		AUTOATTACH_POLL="$POLL" XDG_RUNTIME_DIR="$STATE/run" TMPDIR="$STATE"
		AUTOATTACH_RUN_USER="$STATE/nowhere" "${EXTRA[@]}")
	[ -z "$SRC" ] || env+=(QREXEC_REMOTE_DOMAIN="$SRC")
	if [ "$VIA" = env ] && [ "$#" -gt 0 ]; then
		env+=(QREXEC_SERVICE_ARGUMENT="$1")
		shift
	fi
	code=0
	env -i "${env[@]}" "$sh_" "$svc/custom.USBDevice$name" "$@" 2>"$tmp/${OUT:-fg}.stderr" >"$tmp/${OUT:-fg}.stdout" || code=$?
}
