#!/usr/bin/env bash
# Hostile arguments for the dom0 service, beyond those tests/dom0/run.sh already tries: the
# forms issue 6 lists (empty, `+__+` alone, three fields, `../`, dom0, very long, unicode)
# for BOTH services (Attach and Detach), passed BOTH ways qrexec passes them ($1, and
# QREXEC_SERVICE_ARGUMENT), with unicode that looks like ASCII (homoglyphs, full-width
# digits, bidi overrides, zero-width characters) and sizes up to 64 KiB.
#
# Whatever the form, the service must refuse it with one of its argument codes (64 bad
# argument, 65 bad qube, 66 bad device), call no qvm-* tool at all, print nothing on stdout
# (qrexec sends stdout to the caller) and only printable ASCII on stderr and to logger.
# A valid request through the same harness must succeed, so a broken harness cannot pass.
#
# Usage: tests/dom0/hostile.sh     one line per failure, a summary; exit 1 on any failure
set -euo pipefail
export LC_ALL=C
here=$(cd "$(dirname "$0")" && pwd)
svc=$(cd "$here/../../dom0" && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
bin=$tmp/bin
STATE=$tmp/state
export STATE
mkdir -p "$bin"
for f in qvm-check qvm-start logger; do ln -s "$here/standins/$f" "$bin/$f"; done
ln -s "$here/standins/qvm-device" "$bin/qvm-block"
ln -s "$here/standins/qvm-device" "$bin/qvm-usb"

reset() {
	rm -rf "$STATE"
	mkdir -p "$STATE"
	printf '%s\n' dom0 sys-usb work vault >"$STATE/qubes"
	printf '%s\n' dom0 sys-usb work >"$STATE/running"
	printf '%s\n' 'sys-usb block work' 'sys-usb usb work' >"$STATE/autoattach.conf"
	printf '%s\n' 'sys-usb:sda 1 SanDisk ()' >"$STATE/block.devices"
	printf '%s\n' 'sys-usb:sda work' >"$STATE/block.attached"
	: >"$STATE/calls"
	: >"$STATE/log"
}

# run SHELL SERVICE VIA ARG: the service as qrexec runs it; sets $code.
run() {
	local sh=$1 name=$2 via=$3 arg=$4
	local -a env=(PATH="$bin:/usr/bin:/bin" STATE="$STATE" AUTOATTACH_CONF="$STATE/autoattach.conf"
		AUTOATTACH_WAIT=1 AUTOATTACH_POLL=0.01 QREXEC_REMOTE_DOMAIN=sys-usb)
	code=0
	if [ "$via" = env ]; then
		env -i "${env[@]}" QREXEC_SERVICE_ARGUMENT="$arg" "$sh" "$svc/custom.USBDevice$name" \
			>"$tmp/stdout" 2>"$tmp/stderr" || code=$?
	else
		env -i "${env[@]}" "$sh" "$svc/custom.USBDevice$name" "$arg" >"$tmp/stdout" 2>"$tmp/stderr" || code=$?
	fi
}

u() { printf '%b' "$1"; } # unicode from \u escapes
long() { head -c "$1" /dev/zero | tr '\0' "$2"; }

# shellcheck disable=SC2016 # hostile text, deliberately unexpanded
forms=(
	'' '+__+' '+__++__+' 'work+__+sda+__+' 'a+__+b+__+c' '+' '__' 'work+__' '+__+sda'
	'../+__+sda' 'work+__+../' '..+__+..' 'work+__+..' '../../etc/passwd+__+sda'
	'dom0+__+sda' 'dom0+__+2-1' 'Domain-0+__+sda'
	"$(long 31 w)x+__+sda" "work+__+$(long 33 s)" "$(long 65536 w)" "work+__+$(long 65536 9)"
	"$(long 8192 +)" "$(long 4096 _)+__+sda"
	"w$(u '\u043e')rk+__+sda" "work+__+sd$(u '\u0430')" "work+__+$(u '\uff12')-1"
	"work$(u '\u202e')+__+sda" "work+__+sda$(u '\u200b')" "$(u '\u200d')work+__+sda"
	"work+__+sda$(u '\u0301')" "$(u '\U0001f4be')+__+sda" "work+__+$(u '\U0001f4be')"
	"work+__+$(u '\xff\xfe')" "$(u '\xc3\x28')+__+sda"
	' work+__+sda' 'work +__+sda' 'work+__+sda ' 'work+__+ sda' $'work\t+__+sda'
	'--help+__+sda' 'work+__+--help' '-+__+-' 'work+__+-' 'work+__+2-1 --force'
)

passed=0 failed=0
fail() { failed=$((failed + 1)); printf 'FAIL %s\n' "$*"; }
shown() { printf '%s' "${1:0:40}" | tr -c ' -~' '?'; }

for sh in dash bash; do
	command -v "$sh" >/dev/null || { fail "$sh is not installed"; continue; }
	reset
	run "$sh" Attach arg work+__+sda
	if [ "$code" != 0 ]; then fail "$sh: the control request work+__+sda exited $code"; fi
	for name in Attach Detach; do
		for via in arg env; do
			for form in "${forms[@]}"; do
				reset
				run "$sh" "$name" "$via" "$form"
				what="$sh $name via $via '$(shown "$form")' (${#form} bytes)"
				case $code in
				64 | 65 | 66) ;;
				*) fail "$what: exit $code, want 64, 65 or 66"; continue ;;
				esac
				if [ -s "$STATE/calls" ]; then fail "$what: called $(paste -sd ';' "$STATE/calls")"
				elif [ -s "$tmp/stdout" ]; then fail "$what: wrote on stdout"
				elif grep -q '[^ -~]' "$tmp/stderr"; then fail "$what: raw bytes on stderr"
				elif grep -q UNSAFE "$STATE/log"; then fail "$what: raw bytes reached logger"
				elif ! grep -q '^logger -t autoattach -- ' "$STATE/log"; then fail "$what: refusal not logged"
				else passed=$((passed + 1)); fi
			done
		done
	done
done
printf '%d passed, %d failed\n' "$passed" "$failed"
[ "$failed" -eq 0 ]
