#!/usr/bin/env bash
# Tests of the dom0 side (dom0/custom.USBDeviceAttach, run under both service names).
#
# The real script runs under bash with gawk (as in dom0) and under dash with mawk, with stand-ins for qvm-check, qvm-start,
# qvm-block, qvm-usb, qubesdb-read and logger first on PATH (tests/dom0/standins/). They
# keep a small Qubes in $STATE (which qubes exist and run, what each qube's qubesdb holds,
# the device ids R4.3 qubesd computes, what is attached where) and speak the R4.1/R4.2 or
# the R4.3 formats and messages, by $STATE/qubes-release. Every call is recorded, so each
# case asserts the exit code AND the exact qvm-* calls made (their number is the point of
# issue 10.4: each is a Python start in dom0). Concurrent cases run real handlers in
# parallel. Then: shellcheck, the policy file's syntax, the README's hashes and exit codes,
# tests/dom0/hostile.sh, and mutations of the service that this suite must catch.
#
# Usage: tests/dom0/run.sh         prints one line per case, exits non-zero on any failure
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"
label=$sh_ # what the output lines say ran (shell_as sets it)
passed=0
failed=0
say() { printf '%s\n' "$*"; }
pass() { passed=$((passed + 1)); say "ok   $label: $1"; }
fail() { failed=$((failed + 1)); say "FAIL $label: $1: $2"; }
need shellcheck shellcheck
need dash dash
need python3 python3
need flock util-linux
need column bsdextrautils
need gawk gawk

# Identities: stick A (the rule's), stick B (swapped in at the same name), a security key K
# and a keyboard L (swapped in at K's port).
A_ID=0781:5581:4C530001230101115543:u080650:1.0 A_DESC='Cruzer_Blade (BACKUP)'
B_ID=dead:beef:EV1L:u080650:1.0 B_DESC='Cruzer_Blade (BACKUP2)'
K_ID=1050:0407::u030000u030101u0b0000 K_DESC='1050:0407 Yubico_YubiKey_OTP+FIDO+CCID'
L_ID=046d:c31c::u030101u030000 L_DESC='046d:c31c Logitech_USB_Keyboard' # swapped in for K
A=$(enc "$A_ID") B=$(enc "$B_ID") K=$(enc "$K_ID")
DA=desc+$(enc "$A_DESC") DB=desc+$(enc "$B_DESC") DK=desc+$(enc "$K_DESC")

calls() { paste -sd ';' "$STATE/calls"; }
# qvm: the qvm-* calls only (Python starts in dom0), joined by ';'.
qvm() { grep '^qvm-' "$STATE/calls" | paste -sd ';' || :; }
# check NAME CODE QVM: the last call exited CODE after exactly the qvm-* calls QVM (joined
# by ';'), logged through logger, printed one clean line on stderr and nothing on stdout.
check() {
	local got
	got=$(qvm)
	if [ "$code" != "$2" ]; then fail "$1" "exit $code, want $2 ($(tr '\n' ' ' <"$tmp/fg.stderr"))"
	elif [ "$got" != "$3" ]; then fail "$1" "qvm-* calls [$got], want [$3]"
	elif hygiene "$1"; then pass "$1"; fi
}
# hygiene NAME: the service logged with tag autoattach, wrote nothing on stdout (qrexec's
# channel to the caller), and its stderr and log hold printable ASCII only.
hygiene() {
	if grep -q UNSAFE "$STATE/log"; then fail "$1" "raw bytes reached logger"
	elif ! grep -q '^logger -t autoattach -- ' "$STATE/log"; then fail "$1" "nothing logged"
	elif [ -s "$tmp/fg.stdout" ]; then fail "$1" "wrote on stdout (which qrexec sends to the caller)"
	elif grep -q '[^ -~]' "$tmp/fg.stderr"; then fail "$1" "raw bytes on stderr"
	else return 0; fi
	return 1
}
# assert NAME WHY COMMAND...: pass if COMMAND succeeds, else fail with WHY.
assert() {
	local name=$1 why=$2
	shift 2
	if "$@"; then pass "$name"; else fail "$name" "$why"; fi
}
logged() { if grep -qF -- "$2" "$STATE/log"; then pass "$1"; else fail "$1" "log lacks '$2'"; fi; }
holds() { grep -qxF -- "$2 $3" "$STATE/$1.attached" 2>/dev/null; }
nothing_attached() { [ ! -s "$STATE/block.attached" ] && [ ! -s "$STATE/usb.attached" ]; }

# Background handlers, for the concurrent cases: spawn NAME SERVICE ARG runs one, its exit
# code lands in $tmp/NAME.code; wait_for TEXT [N] waits up to N/20 s (default 20) for TEXT
# in a call line.
spawn() {
	local n=$1
	shift
	(OUT=$n call "$@" && echo "$code" >"$tmp/$n.code") &
}
wait_for() {
	local n=${2:-400}
	while [ "$n" -gt 0 ]; do
		grep -qF -- "$1" "$STATE/calls" && return 0
		sleep 0.05
		n=$((n - 1))
	done
	return 1
}
code_of() { cat "$tmp/$1.code" 2>/dev/null || echo none; }

# Short names for the qvm-* calls the cases expect.
S='qvm-start --skip-if-running -- work'
AT43="qvm-block attach -- work sys-usb:sda:$A_ID"
AT42='qvm-block attach -- work sys-usb:sda'
LS='qvm-block list -- sys-usb'

r43_attach() {
	world 43; allow 'sys-usb block work'; running work; publish sys-usb block sda "$A_DESC" "$A_ID"
	call Attach "work+__+sda+__+$A"
	check "R4.3 attach, running target: one Python start, the id in the argv" 0 "$AT43"
	assert "R4.3 attach: attached" "not attached" holds block sys-usb:sda work

	world 43; allow 'sys-usb block work'; publish sys-usb block sda "$A_DESC" "$A_ID"
	call Attach "work+__+sda+__+$A"
	check "R4.3 attach, halted target: the start and the attach only" 0 "$S;$AT43"

	world 43; allow 'sys-usb block work'; running work
	(sleep 0.7; publish sys-usb block sda "$A_DESC" "$A_ID") &
	call Attach "work+__+sda+__+$A"
	wait
	check "R4.3 attach: waits on a qubesdb watch until the device is published, no polling of qvm-*" 0 "$AT43"
	assert "R4.3 attach: one qubesdb watch, not a poll" "$(calls)" \
		test "$(grep -c 'qubesdb-read -r -w -d sys-usb /qubes-block-devices/sda/parent' "$STATE/calls")" = 1

	world 43; allow 'sys-usb block work'; running work; WAIT=1
	call Attach "work+__+sda+__+$A"
	check "refuse 70: never published within the bound, Qubes not asked" 70 ""
	world 43; allow 'sys-usb block work'; running work; WAIT=0
	call Attach "work+__+sda+__+$A"
	check "refuse 70: a zero bound looks once" 70 ""

	world 43; allow 'sys-usb block work'; running work; publish sys-usb block sda "$B_DESC" "$B_ID"
	call Attach "work+__+sda+__+$A"
	check "refuse 73: another device at sda, qubesd refuses it twice" 73 "$AT43;$AT43"
	assert "refuse 73: nothing attached" "attached" nothing_attached
	assert "refuse 73: the record was read once more after the second refusal, and was there" "$(calls)" \
		test "$(tail -n 1 "$STATE/calls")" = 'qubesdb-read -r -d sys-usb /qubes-block-devices/sda/parent'
	world 43; allow 'sys-usb block work'; running work; publish sys-usb block sda "$B_DESC" "$B_ID"
	echo 2 >"$STATE/attach.unplug"
	call Attach "work+__+sda+__+$A"
	check "refuse 70, not 73: refused twice, and then the record is gone (the device left)" 70 "$AT43;$AT43"
	logged "refuse 70: the log says the device left" "no longer publishes sda: the device left"
	world 43; allow 'sys-usb block work'; running work; publish sys-usb block sda "$A_DESC" "$A_ID"
	touch "$STATE/qubesd.swap"; echo 2 >"$STATE/attach.unplug"
	call Attach "work+__+sda+__+$DA"
	check "refuse 70, not 72: a desc-form request refused twice, and then the record is gone" 70 "$AT42;$AT42"

	world 43; allow 'sys-usb block work'; running work; publish sys-usb block sda "$A_DESC" "$A_ID"
	touch "$STATE/qubesd.swap"
	call Attach "work+__+sda+__+$A"
	check "R4.3 attach: qubesd's refusal (ProtocolError) in a race, then the device is there" 0 "$AT43;$AT43"

	world 43; allow 'sys-usb block work'; running work; publish sys-usb block sda "$A_DESC" "$A_ID"
	attached block sys-usb:sda work
	call Attach "work+__+sda+__+$A"
	check "R4.3 attach: already attached to the target is success" 0 "$AT43"

	world 43; allow 'sys-usb block work'; running work personal; publish sys-usb block sda "$A_DESC" "$A_ID"
	attached block sys-usb:sda personal
	call Attach "work+__+sda+__+$A"
	check "refuse 71: attached to another qube (qubesd's message)" 71 "$AT43"

	world 43; allow 'sys-usb block gone'; publish sys-usb block sda "$A_DESC" "$A_ID"
	call Attach "gone+__+sda+__+$A"
	check "refuse 67: listed but no such qube (qvm-start says so)" 67 "qvm-start --skip-if-running -- gone"

	world 43; allow 'sys-usb block vault nostart'; publish sys-usb block sda "$A_DESC" "$A_ID"
	call Attach "vault+__+sda+__+$A"
	check "refuse 69: halted target, entry says nostart (no qvm-start)" 69 \
		"qvm-check --quiet --running -- vault;qvm-check --quiet -- vault"
	world 43; allow 'sys-usb block vault nostart'; running vault; publish sys-usb block sda "$A_DESC" "$A_ID"
	call Attach "vault+__+sda+__+$A"
	check "R4.3 attach: nostart entry, running target" 0 "qvm-block attach -- vault sys-usb:sda:$A_ID"

	world 43; allow 'sys-usb block work'; publish sys-usb block sda "$A_DESC" "$A_ID"; touch "$STATE/start.fail"
	call Attach "work+__+sda+__+$A"
	check "refuse 69: qvm-start fails" 69 "$S"
	logged "refuse 69: qvm-start's reason is logged" "Starting qube failed: work: Not enough memory"

	world 43; allow 'sys-usb block work'; running work; publish sys-usb block sda "$A_DESC" "$A_ID"
	touch "$STATE/attach.fail"
	call Attach "work+__+sda+__+$A"
	check "refuse 72: qubesd fails the attach" 72 "$AT43"
	logged "refuse 72: Qubes' message is logged" "Got empty response from qubesd"

	world 43; allow 'sys-usb block work'; running work; publish sys-usb block sda "$A_DESC" "$A_ID"
	echo work >"$STATE/qdb.silent"
	call Attach "work+__+sda+__+$A"
	check "R4.3 attach: a running target whose qubesdb is silent costs one qvm-start that skips" 0 "$S;$AT43"
	world 43; allow 'sys-usb block work'; publish sys-usb block sda "$A_DESC" "$A_ID"
	echo work >"$STATE/qdb.answers"
	call Attach "work+__+sda+__+$A"
	check "R4.3 attach: a halted target whose qubesdb still answers: attach says so, start, attach" 0 "$AT43;$S;$AT43"

	world 43; allow 'sys-usb usb work'; running work; publish sys-usb usb 2-1.4 "$K_DESC" "$K_ID"
	call Attach "work+__+2-1.4+__+$K"
	check "R4.3 attach: a USB device by bus id, its record under 2-1_4" 0 "qvm-usb attach -- work sys-usb:2-1.4:$K_ID"
	assert "R4.3 attach: waited on the record's last key" "$(calls)" \
		grep -qF 'qubesdb-read -r -w -d sys-usb /qubes-usb-devices/2-1_4/interfaces' "$STATE/calls"

	world 43; allow 'sys-usb block work'; running work; publish sys-usb block sda "$A_DESC" "$A_ID"
	call Attach "work+__+sda+__+$DA"
	check "R4.3 attach: a desc-form request (old template) attaches by port, after comparing" 0 "$AT42"
}

r42_attach() {
	for r in 42 41; do
		world "$r"; allow 'sys-usb block work'; running work; publish sys-usb block sda "$A_DESC"
		call Attach "work+__+sda+__+$DA"
		check "R4.$((r % 10)) attach, block: compare, list USED BY (qubes-issues#4692), attach" 0 "$LS;$AT42"
		assert "R4.$((r % 10)) attach, block: attached" "not attached" holds block sys-usb:sda work
	done

	world 42; allow 'sys-usb block work'; running work
	(sleep 0.7; publish sys-usb block sda "$A_DESC") &
	call Attach "work+__+sda+__+$DA"
	wait
	check "R4.2 attach: waits on a qubesdb watch for the record" 0 "$LS;$AT42"

	world 42; allow 'sys-usb usb work'; running work; publish sys-usb usb 2-1 "$K_DESC"
	call Attach "work+__+2-1+__+$DK"
	check "R4.2 attach, usb: one Python start (qubesd checks USB attachments itself)" 0 "qvm-usb attach -- work sys-usb:2-1"

	world 42; allow 'sys-usb block work'; publish sys-usb block sda "$A_DESC"
	call Attach "work+__+sda+__+$DA"
	check "R4.2 attach, halted target: start, list, attach" 0 "$S;$LS;$AT42"

	world 42; allow 'sys-usb block work'; running work; publish sys-usb block sda "$B_DESC"
	call Attach "work+__+sda+__+$DA"
	check "refuse 73: another description at sda, nothing asked of Qubes" 73 ""

	world 42; allow 'sys-usb block work'; running work vault; publish sys-usb block sda "$A_DESC"
	attached block sys-usb:sda vault
	call Attach "work+__+sda+__+$DA"
	check "refuse 71: R4.2 block attached elsewhere, refused before qubesd attaches it twice" 71 "$LS"
	assert "refuse 71: still only in vault" "attached twice" test "$(cat "$STATE/block.attached")" = 'sys-usb:sda vault'

	world 42; allow 'sys-usb block work'; running work; publish sys-usb block sda "$A_DESC"
	attached block sys-usb:sda work
	call Attach "work+__+sda+__+$DA"
	check "R4.2 attach: already attached to the target, no attach" 0 "$LS"

	local fake='Stick  vault (read-only=no, frontend-dev=xvdi)'
	world 42; allow 'sys-usb block work'; running work vault; publish sys-usb block sda "$fake"
	call Attach "work+__+sda+__+desc+$(enc "$fake")"
	check "R4.2 attach: a description that mimics USED BY fools nothing" 0 "$LS;$AT42"

	world 42; allow 'sys-usb usb work'; running work personal; publish sys-usb usb 2-1 "$K_DESC"
	attached usb sys-usb:2-1 personal
	call Attach "work+__+2-1+__+$DK"
	check "refuse 71: R4.2 usb attached elsewhere (qubesd's message)" 71 "qvm-usb attach -- work sys-usb:2-1"

	world 42; allow 'sys-usb block work'; running work; publish sys-usb block sda "$A_DESC"
	printf '%s' "$B_DESC" >"$STATE/attach.swap"
	call Attach "work+__+sda+__+$DA"
	check "refuse 73: the device changed during the attach: detached again" 73 "$LS;$AT42;qvm-block detach -- work sys-usb:sda"
	assert "refuse 73: nothing stays attached" "attached" nothing_attached

	world 42; allow 'sys-usb block work'; running work; publish sys-usb block sda "$A_DESC"
	call Attach "work+__+sda+__+$A"
	check "refuse 73: an id on R4.2 cannot be checked, nothing asked of Qubes" 73 ""
	logged "refuse 73: the log says why" "cannot check a device id"
	world 42; allow 'sys-usb block work'; running work; publish sys-usb block sda "$A_DESC"
	printf 'Qubes release 4.2\n' >"$STATE/qubes-release"
	call Attach "work+__+sda+__+$A"
	check "refuse 73: an unreadable release is not R4.3" 73 ""
}

detach_cases() {
	DT43="qvm-block detach -- work sys-usb:sda:$A_ID" DT42='qvm-block detach -- work sys-usb:sda'
	world 43; allow 'sys-usb block work'; running work; publish sys-usb block sda "$A_DESC" "$A_ID"
	attached block sys-usb:sda work
	call Detach "work+__+sda+__+$A"
	check "R4.3 detach: the device named, one Python start" 0 "$DT43"
	assert "R4.3 detach: detached" "still attached" nothing_attached

	world 43; allow 'sys-usb block work'; running work; publish sys-usb block sda "$B_DESC" "$B_ID"
	attached block sys-usb:sda work
	call Detach "work+__+sda+__+$A"
	check "R4.3 detach: another device at sda is left attached" 0 "$DT43"
	assert "R4.3 detach: B still attached" "detached B" holds block sys-usb:sda work

	world 43; allow 'sys-usb block work'; running work; attached block sys-usb:sda work
	call Detach "work+__+sda+__+$A"
	check "R4.3 detach: the device is gone (qubesd detaches removed devices itself)" 0 "$DT43"
	logged "R4.3 detach: the log says so" "gone or is another device now"

	world 43; allow 'sys-usb block work'; publish sys-usb block sda "$A_DESC" "$A_ID"
	call Detach "work+__+sda+__+$A"
	check "R4.3 detach: halted target, nothing to do, not started" 0 "$DT43"

	world 43; allow 'sys-usb block gone'
	call Detach "gone+__+sda+__+$A"
	check "refuse 67: detach from a listed qube that does not exist" 67 "qvm-block detach -- gone sys-usb:sda:$A_ID"

	world 43; allow 'sys-usb block work'; running work; publish sys-usb block sda "$A_DESC" "$A_ID"
	attached block sys-usb:sda work; touch "$STATE/detach.fail"
	call Detach "work+__+sda+__+$A"
	check "refuse 72: qvm-block detach fails" 72 "$DT43"

	world 42; allow 'sys-usb block work'; running work; publish sys-usb block sda "$A_DESC"
	attached block sys-usb:sda work
	call Detach "work+__+sda+__+$DA"
	check "R4.2 detach: the same description, one Python start" 0 "$DT42"
	assert "R4.2 detach: detached" "still attached" nothing_attached

	world 42; allow 'sys-usb block work'; running work; publish sys-usb block sda "$B_DESC"
	attached block sys-usb:sda work
	call Detach "work+__+sda+__+$DA"
	check "R4.2 detach: another device at sda is left attached, Qubes not asked" 0 ""

	world 42; allow 'sys-usb block work'; running work; attached block sys-usb:sda work
	call Detach "work+__+sda+__+$DA"
	check "R4.2 detach: a removed device's attachment is undone (Qubes keeps it, block.py)" 0 "$DT42"
	assert "R4.2 detach: the dead disk is gone" "still attached" nothing_attached

	world 42; allow 'sys-usb block work'; running work; publish sys-usb block sda "$A_DESC"
	call Detach "work+__+sda+__+$DA"
	check "R4.2 detach: not attached is success" 0 "$DT42"

	world 42; allow 'sys-usb usb work bare'; running work; attached usb sys-usb:2-1 work
	call Detach "work+__+2-1"
	check "R4.2 detach: the bare form, where its entry allows it" 0 "qvm-usb detach -- work sys-usb:2-1"
}

allowlist_cases() {
	world 43; allow 'sys-usb block personal'; running work; publish sys-usb block sda "$A_DESC" "$A_ID"
	call Attach "work+__+sda+__+$A"
	check "refuse 68: no entry" 68 ""
	assert "refuse 68: Qubes not even asked whether the qube runs" "$(calls)" test ! -s "$STATE/calls"

	world 43; allow 'sys-usb block work'; running work; publish sys-usb block sda "$A_DESC" "$A_ID"
	call Attach "work+__+sda"
	check "refuse 68: the bare form, unless the entry says bare" 68 ""
	logged "refuse 68: the log says how to allow it and what it gives up" "add the word bare to its entry"
	world 43; allow 'sys-usb block work bare'; running work; publish sys-usb block sda "$A_DESC" "$A_ID"
	call Attach "work+__+sda"
	check "R4.3 attach: the bare form, allowed by its entry" 0 "qvm-block attach -- work sys-usb:sda"
	world 42; allow 'sys-usb block work bare'; running work; publish sys-usb block sda "$A_DESC"
	call Attach "work+__+sda"
	check "R4.2 attach: the bare form, allowed by its entry" 0 "$LS;$AT42"

	world 43; allow 'sys-usb block work id=0781:5581:4C53*' 'sys-usb block work'; running work
	publish sys-usb block sda "$A_DESC" "$A_ID"
	call Attach "work+__+sda+__+$A"
	check "pins: an id matching the entry's id= glob" 0 "$AT43"
	world 43; allow 'sys-usb block work id=0781:5581:4C53*' 'sys-usb block work'; running work
	publish sys-usb block sda "$B_DESC" "$B_ID"
	call Attach "work+__+sda+__+$B"
	check "refuse 68: an id no pin matches (the first entry decides)" 68 ""
	world 43; allow 'sys-usb block work id=nope id=*:u080650:*'; running work; publish sys-usb block sda "$B_DESC" "$B_ID"
	call Attach "work+__+sda+__+$B"
	check "pins: any of several id= globs" 0 "qvm-block attach -- work sys-usb:sda:$B_ID"
	world 42; allow 'sys-usb block work desc=Cruzer_Blade?(BACKUP)'; running work; publish sys-usb block sda "$A_DESC"
	call Attach "work+__+sda+__+$DA"
	check "pins: a desc= glob (? for the blank)" 0 "$LS;$AT42"
	world 42; allow 'sys-usb block work desc=Cruzer_Blade?(BACKUP)'; running work; publish sys-usb block sda "$B_DESC"
	call Attach "work+__+sda+__+$DB"
	check "refuse 68: a desc no pin matches" 68 ""
	world 43; allow 'sys-usb block work desc=*'; running work; publish sys-usb block sda "$A_DESC" "$A_ID"
	call Attach "work+__+sda+__+$A"
	check "refuse 68: an id form against an entry pinning only descriptions" 68 ""
	world 43; allow 'sys-usb block work id=0781:*'; running work; publish sys-usb block sda "$A_DESC" "$A_ID"
	call Detach "work+__+sda+__+$B"
	check "refuse 68: pins bound Detach too" 68 ""

	# Each malformed line grants nothing and is logged as FILE:LINE:COL: what is wrong (what is
	# allowed); entry ignored. Columns count bytes, a tab as one.
	local q='a letter, then up to 30 of A-Za-z0-9_.-; not none, default, Domain-0 nor *-dm' line want shown
	while IFS='|' read -r line want; do
		line=$(printf '%b' "$line") shown=$(printf '%s' "$line" | tr -c ' -~' '?')
		world 43; allow '# a comment' "$line"; running work; publish sys-usb block sda "$A_DESC" "$A_ID"
		call Attach "work+__+sda+__+$A"
		check "refuse 68: malformed entry '$shown' grants nothing" 68 ""
		if grep -qxF -- "logger -t autoattach -- $STATE/autoattach.conf:2:$want; entry ignored" "$STATE/log"; then
			pass "malformed entry '$shown' is logged as FILE:2:$want"
		else fail "malformed entry '$shown' is logged as FILE:2:$want" "log: $(grep -F autoattach.conf "$STATE/log" || :)"; fi
	done <<EOF_CASES
sys-usb block work sometimes|20: unknown option 'sometimes' (start, nostart, bare, id=GLOB, desc=GLOB)
sys-usb block work bare id=*|25: 'id=*' with 'bare': a bare request has no identity for a pin to match; keep one of them
sys-usb block work desc=x* bare|28: 'bare' with a pin: a bare request has no identity for a pin to match; keep one of them
sys-usb block work start nostart|26: 'nostart' after 'start': an entry takes at most one of start, nostart
sys-usb block work id=|20: empty pin 'id=' (id=GLOB, desc=GLOB)
sys-usb block work # x|20: '#' after an entry: a comment takes a line of its own
sys-usb disk work|9: unknown class 'disk' (block, usb)
sys-usb block|14: missing TARGET (the qube to attach to) after the class
sys-usb|8: missing CLASS (block, usb) after the source
sys-usb block dom0-dm|15: target 'dom0-dm' is not a qube name ($q)
1sys-usb block work|1: source '1sys-usb' is not a qube name ($q)
\t  sys-usb\tblock  work \tnope|25: unknown option 'nope' (start, nostart, bare, id=GLOB, desc=GLOB)
sys-usb block w\xc3\xb6rk|15: target 'w??rk' is not a qube name ($q)
sys-usb block work\r|15: target 'work?' is not a qube name ($q)
EOF_CASES
	world 43; allow 'sys-usb block work sometimes' 'sys-usb block work'; running work; publish sys-usb block sda "$A_DESC" "$A_ID"
	call Attach "work+__+sda+__+$A"
	check "a malformed line is skipped: the next entry decides" 0 "$AT43"
	world 43; running work; publish sys-usb block sda "$A_DESC" "$A_ID"; rm "$STATE/autoattach.conf"
	call Attach "work+__+sda+__+$A"
	check "refuse 68: no allowlist file at all" 68 ""
	world 43; allow 'sys-usb usb work'; running work; publish sys-usb block sda "$A_DESC" "$A_ID"
	call Attach "work+__+sda+__+$A"
	check "refuse 68: the entry is for another class" 68 ""
	world 43; allow 'sys-usb block work'; SRC=sys-net; running work
	call Attach "work+__+sda+__+$A"
	check "refuse 68: the entry is for another source" 68 ""
	world 43; cp "$root/dom0/autoattach.conf" "$STATE/autoattach.conf"; running work; publish sys-usb block sda "$A_DESC" "$A_ID"
	call Attach "work+__+sda+__+$A"
	check "refuse 68: the shipped allowlist allows nothing" 68 ""
	assert "the shipped allowlist has no malformed line" "$(grep 'entry ignored' "$STATE/log" || :)" \
		test -z "$(grep 'entry ignored' "$STATE/log" || :)"
	world 43; sed 's/^#sys-usb/sys-usb/' "$root/dom0/autoattach.conf" >"$STATE/autoattach.conf"
	running work; publish sys-usb block sda "$A_DESC" "$A_ID"
	call Attach "work+__+sda+__+$A"
	check "the shipped examples, uncommented, work" 0 "$AT43"
}

validation_cases() {
	world 43; allow 'sys-usb block work' 'sys-usb usb work'; running work
	SRC=
	call Attach "work+__+sda+__+$A"
	check "refuse 64: no QREXEC_REMOTE_DOMAIN" 64 ""
	for bad in 'sys usb' '-x' 'sys-usb;id' 'dom0-dm'; do
		SRC=$bad; call Attach "work+__+sda+__+$A"; check "refuse 64: QREXEC_REMOTE_DOMAIN '$bad'" 64 ""
	done
	SRC=sys-usb
	for arg in '' '+__+' 'work+__+' '+__+sda' 'work' 'work+sda' 'work++__+sda' 'work+__++sda' \
		'work__sda' "$(printf 'w%.0s' {1..4096})"; do
		call Attach "$arg"; check "refuse 64: argument '${arg:0:24}'" 64 ""
	done
	call Attach; check "refuse 64: no argument at all" 64 ""
	VIA='env'; call Attach ''; check "refuse 64: empty QREXEC_SERVICE_ARGUMENT" 64 ""
	VIA=arg; call Attach "work+__+sda+__+$A" extra; check "refuse 64: two arguments" 64 ""
	# shellcheck disable=SC2016 # hostile text, deliberately unexpanded
	for arg in 'dom0' 'sys-usb' '..' 'wörk' 'work;reboot' '$(reboot)' "$(printf 'work\nx')" \
		'none' 'default' 'Domain-0' 'work-dm' '1work' '_work' "$(printf 'q%.0s' {1..32})" '@adminvm' '*' ' work'; do
		call Attach "$arg+__+sda+__+$A"
		check "refuse 65: qube '$(printf '%s' "${arg:0:24}" | tr -c ' -~' '?')'" 65 ""
	done
	# shellcheck disable=SC2016 # hostile text, deliberately unexpanded
	for dev in '../sda' 'sda/..' '-sda' '_sda' 'sda;reboot' '$(id)' 'sdä' $'sda\n' 'sd a' \
		"$(printf 'b%.0s' {1..33})" '2-' '2' '1234-1' '2-1.' '2-1..4' '2-1.1.1.1.1.1.1.1' '2-1:1.0' \
		'0x1' 'sda*' 'sda.1'; do
		call Attach "work+__+$dev+__+$A"
		check "refuse 66: device '$(printf '%s' "${dev:0:24}" | tr -c ' -~' '?')'" 66 ""
	done
	local long
	long=0781+5581+$(printf 'x%.0s' {1..2038})
	for ident in '_4' '_zz' '_4G' '_4A' '_41' '_3a' '_2d' '0781+5581+ab__cd+u' '0781+5581+x_' \
		'0781+5581+_01' '0781+5581+_7f' '0781+5581+_ff' 'desc+a_00b' 'x' 'zzzz+1234+' '1234' '0781+5581' \
		"${long}y" 'desc+_4' 'desc+a__b' '0781+5581+a b' '0781+5581+*'; do
		call Attach "work+__+sda+__+$ident"
		check "refuse 66: identity '${ident:0:28}' (${#ident} bytes)" 66 ""
	done
	call Attach "work+__+sda+__+"
	check "refuse 66: an empty identity" 66 ""
	call Attach "work+__+sda+__+$A+__+x"
	check "refuse 66: a third +__+ (IDENT never holds __)" 66 ""
	world 43; allow 'sys-usb block work'; running work; publish sys-usb block sda x "$(printf '%s' "${long//+/:}")"
	call Attach "work+__+sda+__+$long"
	check "a 2048-byte identity is accepted" 0 "qvm-block attach -- work sys-usb:sda:${long//+/:}"
	world 43; allow 'sys-usb block work'; running work; publish sys-usb block sda $'caf\xc3\xa9\n(x)' "$A_ID"
	call Attach "work+__+sda+__+desc+$(enc $'caf\xc3\xa9\n(x)')"
	check "a description with bytes outside ASCII and a newline compares byte for byte" 0 "$AT42"
	world 43; allow 'sys-usb block work'; running work; publish sys-usb block sda "$A_DESC" "$A_ID"
	VIA='env'; call Attach "work+__+sda+__+$A"
	check "the argument from QREXEC_SERVICE_ARGUMENT when \$1 is absent" 0 "$AT43"
}

setup_cases() {
	world 43; allow 'sys-usb block work'; running work; publish sys-usb block sda "$A_DESC" "$A_ID"
	mkdir -p "$tmp/other"
	cp "$svc/custom.USBDeviceAttach" "$tmp/other/custom.USBDeviceOther"
	local keep=$svc
	svc=$tmp/other; call Other "work+__+sda+__+$A"; svc=$keep
	check "refuse 64: installed under an unknown service name" 64 ""
	for v in AUTOATTACH_WAIT=abc 'AUTOATTACH_POLL=1;reboot' AUTOATTACH_POLL=.5 AUTOATTACH_MAX=0 \
		AUTOATTACH_MAX=100 AUTOATTACH_LOCK_WAIT=-1; do
		world 43; allow 'sys-usb block work'; EXTRA=("$v")
		call Attach "work+__+sda+__+$A"
		check "refuse 64: $v" 64 ""
	done
}

# Issue 9's reproduction: an Attach waits for qvm-start (held by a gate until the test opens
# it), the Detach for the same device arrives meanwhile, then another device takes the
# device's place: stick B at the block name sda, or a keyboard at the USB port 2-1 where the
# security key was. On both releases the wrong device is never attached: the Attach refuses
# (73: R4.3's qubesd refuses the id, R4.2's published description differs), and the Detach,
# serialized after it, finds nothing of its device to undo. Without a swap, the Detach waits
# for the Attach and then undoes it.
swap_cases() {
	local r c
	for r in 43 42; do
		for c in block usb; do
			swap_case "$r" "$c"
		done
	done
}
# swap_case RELEASE CLASS: the swap and the lock for one release and class.
swap_case() {
	local r=$1 c=$2 port id ident desc other_desc other_id order what
	if [ "$c" = block ]; then
		port=sda desc=$A_DESC id=$A_ID other_desc=$B_DESC other_id=$B_ID what="stick B at sda"
	else
		port=2-1 desc=$K_DESC id=$K_ID other_desc=$L_DESC other_id=$L_ID what="a keyboard at port 2-1"
	fi
	if [ "$r" = 43 ]; then ident=$(enc "$id"); else ident=desc+$(enc "$desc") id='' other_id=''; fi
	world "$r"; allow "sys-usb $c vault"; touch "$STATE/start.gate"
	publish sys-usb "$c" "$port" "$desc" "$id"
	spawn attach Attach "vault+__+$port+__+$ident"
	wait_for qvm-start
	spawn detach Detach "vault+__+$port+__+$ident"
	sleep 0.5
	unpublish sys-usb "$c" "$port"
	publish sys-usb "$c" "$port" "$other_desc" "$other_id"
	rm "$STATE/start.gate"
	wait
	if [ "$(code_of attach)/$(code_of detach)" != 73/0 ]; then
		fail "R4.${r#4} $c swap: Attach 73, Detach 0" "got $(code_of attach)/$(code_of detach): $(calls)"
	elif ! nothing_attached; then fail "R4.${r#4} $c swap: $what is never attached" "$(cat "$STATE/$c.attached")"
	else pass "R4.${r#4} $c swap (issue 9): $what is never attached, Attach 73, Detach 0"; fi

	world "$r"; allow "sys-usb $c vault"; touch "$STATE/start.gate"
	publish sys-usb "$c" "$port" "$desc" "$id"
	spawn attach Attach "vault+__+$port+__+$ident"
	wait_for qvm-start
	spawn detach Detach "vault+__+$port+__+$ident"
	wait_for "qvm-$c detach" 30 || : # never, unless the lock is broken
	rm "$STATE/start.gate"
	wait
	order=$(grep -Eo "^qvm-$c (attach|detach)" "$STATE/calls" | paste -sd ' ')
	if [ "$(code_of attach)/$(code_of detach)" != 0/0 ]; then
		fail "R4.${r#4} $c lock: Attach 0, Detach 0" "got $(code_of attach)/$(code_of detach)"
	elif [ "$order" != "qvm-$c attach qvm-$c detach" ] || ! nothing_attached; then
		fail "R4.${r#4} $c lock: a Detach during an Attach waits, then undoes it" "[$order] $(calls)"
	else pass "R4.${r#4} $c lock: a Detach during an Attach waits for it, then undoes it"; fi
}

# The per-source bound and the lock, with real parallel handlers.
lock_cases() {
	local third other files
	world 43; allow 'sys-usb block vault' 'sys-usb block personal' 'sys-usb block work' 'sys-usb2 block work'
	touch "$STATE/start.gate"; EXTRA=(AUTOATTACH_MAX=2 AUTOATTACH_LOCK_WAIT=2); running work
	publish sys-usb block sda "$A_DESC" "$A_ID"; publish sys-usb block sdb "$B_DESC" "$B_ID"
	publish sys-usb block sdc "$A_DESC" "$A_ID"; publish sys-usb2 block sda "$A_DESC" "$A_ID"
	spawn one Attach "vault+__+sda+__+$A"
	spawn two Attach "personal+__+sdb+__+$B"
	wait_for 'qvm-start --skip-if-running -- vault' && wait_for 'qvm-start --skip-if-running -- personal'
	call Attach "work+__+sdc+__+$A" # sdc: another lock bucket than sda and sdb
	third=$code
	SRC=sys-usb2 call Attach "work+__+sda+__+$A"
	other=$code
	rm "$STATE/start.gate"
	wait
	assert "refuse 74: a third request while two run (AUTOATTACH_MAX=2) fails at once" "exit $third" test "$third" = 74
	assert "the bound is per source: sys-usb2 meanwhile attached" "exit $other" test "$other" = 0
	assert "the two running requests succeeded" "$(code_of one)/$(code_of two)" \
		test "$(code_of one)/$(code_of two)" = 0/0

	world 43; allow 'sys-usb block vault'; touch "$STATE/start.gate"; EXTRA=(AUTOATTACH_LOCK_WAIT=1)
	publish sys-usb block sda "$A_DESC" "$A_ID"
	spawn one Attach "vault+__+sda+__+$A"
	wait_for qvm-start
	call Detach "vault+__+sda+__+$A"
	rm "$STATE/start.gate"
	wait
	check "refuse 74: a Detach that waited AUTOATTACH_LOCK_WAIT for the Attach" 74 \
		"qvm-start --skip-if-running -- vault;qvm-block attach -- vault sys-usb:sda:$A_ID"

	world 43; allow 'sys-usb block work'; running work; publish sys-usb block sda "$A_DESC" "$A_ID"
	call Attach "work+__+sda+__+$A"
	files=$(cd "$STATE/run" && find . | sort | paste -sd ' ')
	assert "lock files: in \$XDG_RUNTIME_DIR/autoattach, named after the source only" "[$files]" \
		test "$files" = ". ./autoattach ./autoattach/sys-usb.dev$(($(printf sda | cksum | cut -d' ' -f1) % 64)) ./autoattach/sys-usb.run1"
	world 43; allow 'sys-usb block work'; running work; publish sys-usb block sda "$A_DESC" "$A_ID"
	chmod 755 "$STATE/run"
	call Attach "work+__+sda+__+$A"
	check "lock files: a runtime dir others may enter is not used" 0 "$AT43"
	assert "lock files: then \$TMPDIR/autoattach-UID, mode 0700" "$(ls -la "$STATE")" \
		test "$(stat -c %a "$STATE/autoattach-$(id -u)")/$(ls -A "$STATE/run")" = 700/
	world 43; allow 'sys-usb block work'; running work; chmod 755 "$STATE/run"
	mkdir "$tmp/elsewhere"; ln -s "$tmp/elsewhere" "$STATE/autoattach-$(id -u)"
	call Attach "work+__+sda+__+$A"
	check "refuse 74: a planted link is never followed" 74 ""
	assert "refuse 74: nothing written through it" "$(ls -A "$tmp/elsewhere")" test -z "$(ls -A "$tmp/elsewhere")"
	rm -rf "$tmp/elsewhere"
}

suite() {
	r43_attach
	r42_attach
	detach_cases
	allowlist_cases
	validation_cases
	setup_cases
	swap_cases
	lock_cases
}

# Twice: bash with gawk, as dom0 runs it (Fedora: /bin/sh is bash, awk is gawk), and dash
# with the awk Debian has first (mawk), so that it stays POSIX sh and POSIX awk.
for sh in bash dash; do
	command -v "$sh" >/dev/null || { fail "$sh" "not installed"; continue; }
	shell_as "$sh"
	suite
done
shell_as dash
sh_=dash label=static

# Lint every script with shellcheck, each as the shell it is written for.
if ! command -v shellcheck >/dev/null; then
	fail shellcheck "not installed (apt-get install shellcheck)"
else
	if out=$(shellcheck -s sh "$root/dom0/custom.USBDeviceAttach" 2>&1); then
		pass "shellcheck -s sh dom0/custom.USBDeviceAttach"
	else fail "shellcheck dom0/custom.USBDeviceAttach" "$out"; fi
	for f in "$here/run.sh" "$here/hostile.sh" "$here/lib.sh" "$here"/standins/*; do
		if out=$(shellcheck -x -s bash "$f" 2>&1); then pass "shellcheck ${f#"$root"/}"; else fail "shellcheck ${f#"$root"/}" "$out"; fi
	done
fi
assert "dom0/custom.USBDeviceDetach is the same script" "not a symlink to custom.USBDeviceAttach" \
	test "$(readlink "$root/dom0/custom.USBDeviceDetach")" = custom.USBDeviceAttach

# The policy file: a structural check against qrexec's grammar (tests/dom0/policy_check.py
# says what it checks and where the grammar comes from), and its own self-test.
if out=$(python3 "$here/policy_check.py" --self-test 2>&1); then pass "policy checker rejects known-bad lines"; else fail "policy checker self-test" "$out"; fi
if out=$(python3 "$here/policy_check.py" "$root/dom0/30-autoattach.policy" 2>&1); then
	pass "dom0/30-autoattach.policy parses (R4.1+ grammar)"
else fail "dom0/30-autoattach.policy" "$out"; fi

# dom0/README.md: its SHA-256 list (users compare their copies with it) is current, and its
# exit-code table is the handler's header table, code for code.
fence='```'
sums=$(sed -n "/^${fence}sha256\$/,/^${fence}\$/p" "$root/dom0/README.md" | grep -E '^[0-9a-f]{64}  ' || :)
if [ "$(printf '%s\n' "$sums" | grep -c .)" -ne 3 ]; then
	fail "dom0/README.md hashes" "want 3 lines in the sha256 block"
elif out=$(cd "$root/dom0" && printf '%s\n' "$sums" | sha256sum -c --quiet 2>&1); then
	pass "dom0/README.md lists the current SHA-256 of each file"
else fail "dom0/README.md hashes" "stale: $out"; fi
header=$(sed -nE 's/^#   ([0-9]+)  +(.*)$/\1 \2/p' "$root/dom0/custom.USBDeviceAttach")
table=$(sed -nE 's/^\| ([0-9]+) \| (.*) \|$/\1 \2/p' "$root/dom0/README.md")
assert "the handler's exit codes: 0 and 64 to 74, one a line" "$(printf '%s\n' "$header" | cut -d' ' -f1 | paste -sd ' ')" \
	test "$(printf '%s\n' "$header" | cut -d' ' -f1 | paste -sd ' ')" = "0 64 65 66 67 68 69 70 71 72 73 74"
assert "dom0/README.md's exit-code table is the handler's" "$(diff <(echo "$header") <(echo "$table") || :)" \
	test "$header" = "$table"

# tests/dom0/hostile.sh (584 hostile requests, minutes) runs from tests/reliability.rs.

# Mutations: mutant NAME TEXT LINE CASES... replaces the line holding TEXT in a copy of the
# service by LINE, taking one safeguard out; then the CASES that guard it must fail (under
# dash, their output kept aside).
mutant() {
	local name=$1 pattern=$2 replacement=$3 before=$failed saved=$passed
	shift 3
	mkdir -p "$tmp/mutant"
	rm -f "$tmp/mutant/"*
	awk -v p="$pattern" -v r="$replacement" 'index($0, p) { sub(/[^\t].*/, r); n++ } { print } END { exit n != 1 }' \
		"$root/dom0/custom.USBDeviceAttach" >"$tmp/mutant/custom.USBDeviceAttach" ||
		{ fail "mutation: $name" "the line to change is not found once"; return; }
	chmod +x "$tmp/mutant/custom.USBDeviceAttach"
	ln -s custom.USBDeviceAttach "$tmp/mutant/custom.USBDeviceDetach"
	local keep=$svc f
	svc=$tmp/mutant label=mutant
	exec 3>&1 1>"$tmp/mutant.out"
	for f in "$@"; do "$f"; done
	exec 1>&3 3>&-
	svc=$keep label=static
	local caught=$((failed - before))
	passed=$saved failed=$before
	if [ "$caught" -gt 0 ]; then pass "mutation: $name: $caught cases fail"
	else fail "mutation: $name" "the suite still passes"; fi
}
# shellcheck disable=SC2016 # the service's own text, unexpanded
if [ -z "${AUTOATTACH_MUTANT:-}" ]; then
	mutant "no allowlist" 'entry "$src" "$class" "$target" ||' 'start=yes bare=yes pins=' allowlist_cases
	mutant "no id in the R4.3 attach" 'spec=$src:$dev:$text' 'spec=$src:$dev' r43_attach swap_cases
	mutant "no description check" 'desc) same_desc ||' 'desc) now=$want ;;' r42_attach swap_cases
	mutant "no check after the attach" 'same_desc || {' 'true || {' r42_attach
	mutant "no second look at the record before 73" '[ -n "$(hex_of "$key")" ] ||' ':' r43_attach
	mutant "no USED BY check on R4.2" '|| used_elsewhere' ':' r42_attach
	mutant "no device lock" 'flock -w "$LOCK_WAIT" 9 ||' ':' swap_cases
	mutant "no bound per source" '! flock -n 8 || break' 'break' lock_cases
fi

say "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
