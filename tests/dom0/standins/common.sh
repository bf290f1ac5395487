# Sourced by the stand-ins: the small Qubes they share, kept in $STATE.
#   qubes, running            one qube name a line: which exist, which run
#   qubes-release             as dom0's /etc/qubes-release ("Qubes release 4.3.0 (R4.3)"):
#                             picks which release's messages and formats the stand-ins speak
#   qdb/QUBE/PATH             QUBE's qubesdb: the file holds the value's bytes, no newline
#   ids/QUBE/CLASS/PORT       the device id R4.3 qubesd computes for the device now at PORT
#                             (qubes/ext/block.py BlockDevice.device_id, core3ext USBDevice)
#   CLASS.attached            "BACKEND:PORT FRONTEND", one attachment a line
#   calls                     every stand-in call, one a line ("TOOL ARGS...")
# shellcheck shell=bash
export LC_ALL=C

# record: log this call (the tests count qvm-* lines, and check their order).
record() { printf '%s\n' "${0##*/} $*" >>"$STATE/calls"; }

# release: 41, 42 or 43 (R4.1 and R4.2 speak alike in everything the stand-ins do but
# qubesdb-read's exit code for a missing key).
release() {
	case $(cat "$STATE/qubes-release" 2>/dev/null) in
	*"release 4.1"*) echo 41 ;;
	*"release 4.2"*) echo 42 ;;
	*) echo 43 ;;
	esac
}

exists() { grep -qxF -- "$1" "$STATE/qubes"; }
runs() { grep -qxF -- "$1" "$STATE/running"; }

# record_dir BACKEND CLASS PORT: where BACKEND's qubesdb holds the device's record
# (a USB port's dots become underscores: qubesusbproxy/core3ext.py USBDevice._qdb_ident).
record_dir() {
	local port=$3
	[ "$2" = usb ] && port=${port//./_}
	printf '%s/qdb/%s/qubes-%s-devices/%s' "$STATE" "$1" "$2" "$port"
}
# exposed BACKEND CLASS PORT: qubesd sees the device: BACKEND runs and its record has a
# key (qubes/ext/block.py device_get: untrusted_qdb.list(path) is not empty).
exposed() {
	runs "$1" || return 1
	local d
	d=$(record_dir "$@")
	[ -d "$d" ] && [ -n "$(ls -A "$d")" ]
}
# device_id BACKEND CLASS PORT: what R4.3 qubesd computes for the device at PORT now.
device_id() { cat "$STATE/ids/$1/$2/$3" 2>/dev/null || echo '0000:0000::?******'; }
