#!/usr/bin/env bash
# Python starts of the dom0 handler per happy path, for BENCHMARKS.md (issue 10.4): every
# qvm-* tool is a Python start in dom0 (hundreds of ms there). The real handler
# (dom0/custom.USBDeviceAttach) runs under dash, as qrexec would run it, in the small Qubes of
# stand-ins that tests/dom0/run.sh uses (tests/dom0/lib.sh, tests/dom0/standins: they speak
# the R4.1/R4.2 and R4.3 formats and log every call); this script only counts the qvm-* calls
# each path makes. tests/dom0/run.sh asserts the same calls exactly, case by case.
#
# Paths: Qubes R4.3 and R4.2; a block device (sda) and a USB device (2-1); the target qube
# running, and halted (the handler starts it). R4.3 requests carry the id form, R4.2 ones the
# desc form (what the agent sends for each release's records).
#
# Usage: bench/dom0-starts.sh   (no root needed). Prints a Markdown table on stdout.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=../tests/dom0/lib.sh
. "$(dirname "$0")/../tests/dom0/lib.sh"
command -v dash >/dev/null || need dash dash
command -v flock >/dev/null || need flock util-linux

A_ID=0781:5581:4C530001230101115543:u080650:1.0 A_DESC='Cruzer_Blade (BACKUP)'
K_ID=1050:0407::u030000u030101u0b0000 K_DESC='1050:0407 Yubico_YubiKey_OTP+FIDO+CCID'

# one RELEASE CLASS STATE: run the happy path once; prints "CODE<TAB>CALLS" (qvm-* calls, ';').
one() {
	local release=$1 class=$2 target=$3 port desc id ident
	if [ "$class" = block ]; then port=sda desc=$A_DESC id=$A_ID; else port=2-1 desc=$K_DESC id=$K_ID; fi
	world "$release"
	allow "sys-usb $class work"
	[ "$target" = halted ] || running work
	if [ "$release" = 43 ]; then
		publish sys-usb "$class" "$port" "$desc" "$id"
		ident=$(enc "$id")
	else
		publish sys-usb "$class" "$port" "$desc"
		ident=desc+$(enc "$desc")
	fi
	call Attach "work+__+$port+__+$ident"
	printf '%s\t%s\n' "$code" "$( (grep '^qvm-' "$STATE/calls" || :) | sed 's/ -- .*//' | paste -sd ';')"
}

echo "| release | device | target | exit | qvm-* calls (Python starts) | starts | target |"
echo "|---|---|---|---|---|---|---|"
bad=0
for release in 43 42; do
	for class in block usb; do
		for target in running halted; do
			IFS=$'\t' read -r code calls < <(one "$release" "$class" "$target")
			n=$(printf '%s' "$calls" | awk -F';' '{ print NF }')
			# issue 10.4: a running target takes at most 2; a halted one the start and the
			# attach. R4.1/R4.2 block devices take one more, the USED BY list (qubes-issues#4692).
			want=2 note=""
			if [ "$release" = 42 ] && [ "$class" = block ]; then
				note=" (incl. USED BY, qubes-issues#4692)"
				[ "$target" = running ] || want=3
			fi
			met=yes
			{ [ "$code" = 0 ] && [ "$n" -le "$want" ]; } || { met=no; bad=1; }
			echo "| R4.${release#4} | $class | $target | $code | \`${calls//;/\`; \`}\` | $n | <= $want$note: $met |"
		done
	done
done
exit "$bad"
