#!/usr/bin/env bash
# Hostile arguments for the dom0 service, beyond those tests/dom0/run.sh already tries: the
# forms issue 6 lists (empty, `+__+` alone, three fields, `../`, dom0, very long, unicode)
# and issue 9's identity encodings (bad escapes, `__` inside, escapes ENC never writes,
# over-long, NUL, an ID not printable once decoded), for BOTH services (Attach and Detach),
# passed BOTH ways qrexec passes them ($1, and QREXEC_SERVICE_ARGUMENT), with unicode that
# looks like ASCII (homoglyphs, full-width digits, bidi overrides, zero-width characters)
# and sizes up to 64 KiB.
#
# Whatever the form, the service must refuse it with one of its argument codes (64 bad
# argument, 65 bad qube, 66 bad device or identity), call no Qubes tool at all (no qvm-*,
# no qubesdb-read), print nothing on stdout (qrexec sends stdout to the caller) and only
# printable ASCII on stderr and to logger. A valid request through the same harness must
# succeed, so a broken harness cannot pass.
#
# Usage: tests/dom0/hostile.sh     one line per failure, a summary; exit 1 on any failure
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"

ID=0781:5581:4C530001230101115543:u080650:1.0
GOOD=$(enc "$ID")
reset() {
	world 43
	allow 'sys-usb block work' 'sys-usb usb work'
	running work
	publish sys-usb block sda 'Cruzer_Blade (BACKUP)' "$ID"
	attached block sys-usb:sda work
	WAIT=1
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
	"work+__+sda+__+$GOOD+__+$GOOD" "work+__+sda+__+${GOOD}_" "work+__+sda+__+${GOOD}_4"
	"work+__+sda+__+${GOOD}_g0" "work+__+sda+__+${GOOD}_0G" "work+__+sda+__+${GOOD}_4A"
	"work+__+sda+__+${GOOD}_41" "work+__+sda+__+${GOOD}_3a" "work+__+sda+__+${GOOD}_2e"
	"work+__+sda+__+${GOOD}__" "work+__+sda+__+${GOOD}_00" "work+__+sda+__+${GOOD}_0a"
	"work+__+sda+__+${GOOD}_1b_5b31m" "work+__+sda+__+${GOOD}_7f" "work+__+sda+__+${GOOD}_c3_a9"
	"work+__+sda+__+desc+a_00" "work+__+sda+__+desc+_" "work+__+sda+__+desc+__"
	"work+__+sda+__+$(long 2049 a)" "work+__+sda+__+desc+$(long 2044 a)"
	"work+__+sda+__+$(long 65000 a)" "work+__+sda+__+${GOOD}$(u '\u00e9')"
	"work+__+sda+__+$GOOD "$'work+__+sda+__+\n'"$GOOD" "work+__+sda+__+${GOOD}*"
	"work+__+sda+__+_30781+5581" "work+__+sda+__+ZZZZ+5581+x" "work+__+sda+__+desc"
	"work+__+sda+__+$(long 2048 +)" "work+__+2-1+__+desc+x+__+y"
	$'work+__+2-1\nx' $'work+__+2-1\n' $'work+__+x\n2-1' $'work+__+2-1\n../../x y+__+'"$GOOD"
)

passed=0 failed=0
fail() { failed=$((failed + 1)); printf 'FAIL %s\n' "$*"; }
shown() { printf '%s' "${1:0:40}" | tr -c ' -~' '?'; }

need gawk gawk
for sh in dash bash; do
	command -v "$sh" >/dev/null || { fail "$sh is not installed"; continue; }
	shell_as "$sh"
	reset
	call Detach "work+__+sda+__+$GOOD"
	if [ "$code" != 0 ] || [ -s "$STATE/block.attached" ]; then fail "$label: the control request exited $code"; fi
	reset
	for name in Attach Detach; do
		for via in arg env; do
			for form in "${forms[@]}"; do
				: >"$STATE/calls"
				: >"$STATE/log"
				VIA=$via
				call "$name" "$form"
				what="$label $name via $via '$(shown "$form")' (${#form} bytes)"
				case $code in
				64 | 65 | 66) ;;
				*) fail "$what: exit $code, want 64, 65 or 66"; continue ;;
				esac
				if [ -s "$STATE/calls" ]; then fail "$what: called $(paste -sd ';' "$STATE/calls")"
				elif [ -s "$tmp/fg.stdout" ]; then fail "$what: wrote on stdout"
				elif grep -q '[^ -~]' "$tmp/fg.stderr" || [ "$(wc -l <"$tmp/fg.stderr")" -gt 1 ]; then
					fail "$what: raw bytes or more than one line on stderr"
				elif grep -q UNSAFE "$STATE/log"; then fail "$what: raw bytes reached logger"
				elif ! grep -q '^logger -t autoattach -- ' "$STATE/log"; then fail "$what: refusal not logged"
				else passed=$((passed + 1)); fi
			done
		done
	done
done
printf '%d passed, %d failed\n' "$passed" "$failed"
[ "$failed" -eq 0 ]
