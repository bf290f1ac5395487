#!/usr/bin/env bash
# Tests of the dom0 side (dom0/custom.USBDeviceAttach, run under both service names).
#
# The real scripts run under dash and bash with stand-ins for qvm-check, qvm-start,
# qvm-block, qvm-usb and logger first on PATH (tests/dom0/standins/). The stand-ins keep
# a small Qubes in $STATE (which qubes exist and run, which devices the USB qube exposes
# and from which poll on, what is attached where) and record every call, so each case
# asserts the exit code AND the exact qvm-* calls made. Then: shellcheck on every script,
# a structural check of the policy files, and a mutation check that this suite fails
# when the allowlist check is taken out of the service.
#
# Usage: tests/dom0/run.sh         prints one line per case, exits non-zero on any failure
set -euo pipefail
export LC_ALL=C
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
bin=$tmp/bin
STATE=$tmp/state
export STATE
mkdir -p "$bin"
for f in qvm-check qvm-start logger; do ln -s "$here/standins/$f" "$bin/$f"; done
ln -s "$here/standins/qvm-device" "$bin/qvm-block"
ln -s "$here/standins/qvm-device" "$bin/qvm-usb"

svc=$root/dom0    # where custom.USBDeviceAttach and custom.USBDeviceDetach are
sh_=dash          # the shell running the service (the suite runs once per shell)
label=$sh_        # what the output lines say ran
passed=0
failed=0
say() { printf '%s\n' "$*"; }
pass() { passed=$((passed + 1)); say "ok   $label: $1"; }
fail() { failed=$((failed + 1)); say "FAIL $label: $1: $2"; }

# need COMMAND PACKAGE: install PACKAGE with apt-get if COMMAND is missing (fresh CI machines).
need() {
	command -v "$1" >/dev/null && return 0
	[ "$(id -u)" = 0 ] && command -v apt-get >/dev/null || return 0
	say "installing $2 (for $1)"
	apt-get -o DPkg::Lock::Timeout=600 install -y -q "$2" >/dev/null 2>&1 ||
		{ apt-get -o DPkg::Lock::Timeout=600 update -q >/dev/null 2>&1 &&
			apt-get -o DPkg::Lock::Timeout=600 install -y -q "$2" >/dev/null 2>&1; } || :
}
need shellcheck shellcheck
need dash dash
need python3 python3

# A fresh Qubes: dom0, sys-usb and sys-net run; work, vault and personal exist but are
# halted; `gone` is in the allowlist but does not exist. Polls are fast, the bound 5 s.
reset() {
	rm -rf "$STATE"
	mkdir -p "$STATE"
	printf '%s\n' dom0 sys-usb sys-net work vault personal >"$STATE/qubes"
	printf '%s\n' dom0 sys-usb sys-net >"$STATE/running"
	: >"$STATE/calls"
	: >"$STATE/log"
	cat >"$STATE/autoattach.conf" <<-'EOF'
		# SOURCE  CLASS  TARGET  [start|nostart]
		sys-usb   block  work
		sys-usb   usb    work
		sys-usb   block  vault   nostart
		sys-usb   usb    personal  start
		sys-usb   block  gone
		# malformed entries grant nothing:
		sys-usb   block
		sys-usb   disk   personal
		sys-usb   block  personal  sometimes
		sys-usb   block  personal  start extra
		sys-usb   block  dom0-dm
	EOF
	SRC=sys-usb VIA=arg WAIT=5 POLL=0.01
}
running() { printf '%s\n' "$@" >>"$STATE/running"; }
# expose CLASS ID [N [DESCRIPTION]]: the backend shows ID from its Nth listing on.
expose() { printf '%s %s %s\n' "$2" "${3:-1}" "${4:-SanDisk_Cruzer ()}" >>"$STATE/$1.devices"; }
attached() { printf '%s %s\n' "$2" "$3" >>"$STATE/$1.attached"; }

# call SERVICE [ARG...]: run the service as qrexec would, in an empty environment.
call() {
	local name=$1 env
	shift
	env=(PATH="$bin:/usr/bin:/bin" STATE="$STATE" AUTOATTACH_CONF="$STATE/autoattach.conf"
		AUTOATTACH_WAIT="$WAIT" AUTOATTACH_POLL="$POLL")
	[ -z "$SRC" ] || env+=(QREXEC_REMOTE_DOMAIN="$SRC")
	if [ "$VIA" = env ] && [ "$#" -gt 0 ]; then
		env+=(QREXEC_SERVICE_ARGUMENT="$1")
		shift
	fi
	code=0
	env -i "${env[@]}" "$sh_" "$svc/custom.USBDevice$name" "$@" 2>"$tmp/stderr" >"$tmp/stdout" || code=$?
}
calls() { paste -sd ';' "$STATE/calls"; }

# check NAME CODE CALLS: the last call exited CODE after making exactly CALLS (the
# qvm-* command lines joined by ';'), logged through logger, printed one clean line.
check() {
	local got
	got=$(calls)
	if [ "$code" != "$2" ]; then fail "$1" "exit $code, want $2 ($(tr '\n' ' ' <"$tmp/stderr"))"
	elif [ "$got" != "$3" ]; then fail "$1" "calls [$got], want [$3]"
	elif hygiene "$1"; then pass "$1"; fi
}
# check_calls NAME CODE ERE: as check, but the calls need only match ERE (timing-bound).
check_calls() {
	local got
	got=$(calls)
	if [ "$code" != "$2" ]; then fail "$1" "exit $code, want $2 ($(tr '\n' ' ' <"$tmp/stderr"))"
	elif ! printf '%s\n' "$got" | grep -Eqx -- "$3"; then fail "$1" "calls [$got] do not match [$3]"
	elif hygiene "$1"; then pass "$1"; fi
}
# hygiene NAME: whatever the request, the service logged with tag autoattach, wrote
# nothing on stdout, and its stderr and log hold printable ASCII only, never raw bytes.
hygiene() {
	if grep -q UNSAFE "$STATE/log"; then fail "$1" "raw bytes reached logger"
	elif ! grep -q '^logger -t autoattach -- ' "$STATE/log"; then fail "$1" "nothing logged"
	elif [ -s "$tmp/stdout" ]; then fail "$1" "wrote on stdout (which qrexec sends to the caller)"
	elif grep -q '[^ -~]' "$tmp/stderr"; then fail "$1" "raw bytes on stderr"
	else return 0; fi
	return 1
}
# assert NAME WHY COMMAND...: pass if COMMAND succeeds, else fail with WHY.
assert() {
	local name=$1 why=$2
	shift 2
	if "$@"; then pass "$name"; else fail "$name" "$why"; fi
}
# logged NAME TEXT: the log has TEXT (fixed string).
logged() { if grep -qF -- "$2" "$STATE/log"; then pass "$1"; else fail "$1" "log lacks '$2'"; fi; }

Q='qvm-check --quiet -- work'
R='qvm-check --quiet --running -- work'
S='qvm-start --skip-if-running -- work'
LS='qvm-block list -- sys-usb'
LW='qvm-block list -- work'
AT='qvm-block attach -- work sys-usb:sda'

attach_success() {
	for fmt in r41 r43; do
		reset; echo "$fmt" >"$STATE/format"; running work; expose block sys-usb:sda
		call Attach work+__+sda
		check "attach: running target, device exposed ($fmt listing)" 0 "$Q;$R;$LS;$LW;$AT"

		reset; echo "$fmt" >"$STATE/format"; running work; expose block sys-usb:sda; attached block sys-usb:sda work
		call Attach work+__+sda
		check "attach: already attached to the target is success ($fmt)" 0 "$Q;$R;$LS;$LW"
	done

	reset; expose block sys-usb:sda
	call Attach work+__+sda
	check "attach: halted target is started first" 0 "$Q;$R;$S;$LS;$LW;$AT"
	assert "attach: target now runs" "not started" grep -qxF work "$STATE/running"

	reset; running work; expose block sys-usb:sdb1 3
	call Attach work+__+sdb1
	check "attach: waits until the third poll exposes the device" 0 \
		"$Q;$R;qvm-block list -- sys-usb;qvm-block list -- sys-usb;qvm-block list -- sys-usb;qvm-block list -- work;qvm-block attach -- work sys-usb:sdb1"

	reset; expose usb sys-usb:2-1.4 2
	call Attach personal+__+2-1.4
	check "attach: usb bus id, entry says start, halted target started" 0 \
		"qvm-check --quiet -- personal;qvm-check --quiet --running -- personal;qvm-start --skip-if-running -- personal;qvm-usb list -- sys-usb;qvm-usb list -- sys-usb;qvm-usb list -- personal;qvm-usb attach -- personal sys-usb:2-1.4"

	reset; running work; expose block sys-usb:mmcblk0p1; VIA='env'
	call Attach work+__+mmcblk0p1
	check "attach: argument from QREXEC_SERVICE_ARGUMENT when \$1 is absent" 0 "$Q;$R;qvm-block list -- sys-usb;qvm-block list -- work;qvm-block attach -- work sys-usb:mmcblk0p1"

	reset; running work; expose block sys-usb:sda; touch "$STATE/attach.race"
	call Attach work+__+sda
	check "attach: lost a race to a concurrent attach to the same target" 0 "$Q;$R;$LS;$LW;$AT;$LW"

	reset; running work; expose block sys-usb:sda 1 'x  work (attached)'
	expose block sys-usb:sdb 1 'sys-usb:sda  work'
	call Attach work+__+sda
	check "attach: a crafted description cannot fake 'already attached'" 0 "$Q;$R;$LS;$LW;$AT"
	logged "attach: success is logged" "attach src=sys-usb target=work dev=sda class=block: attached"

	reset; running work; expose block sys-usb:loop200
	printf '%s\n' 'sys-usb block work nostart' >"$STATE/autoattach.conf"
	call Attach work+__+loop200
	check "attach: nostart entry, target already running" 0 "$Q;$R;$LS;qvm-block list -- work;qvm-block attach -- work sys-usb:loop200"
}

attach_refusals() {
	reset; running work; expose block sys-usb:sda; SRC=
	call Attach work+__+sda
	check "refuse 64: no QREXEC_REMOTE_DOMAIN" 64 ""
	for bad in 'sys usb' '-x' 'sys-usb;id' ''; do
		reset; SRC=$bad
		call Attach work+__+sda
		check "refuse 64: QREXEC_REMOTE_DOMAIN '$bad'" 64 ""
	done
	for arg in '' '+__+' 'work+__+' '+__+sda' 'work' 'work+sda' 'work+__+sda+__+x' \
		'a+__+b+__+c' 'work++__+sda' 'work+__++sda' 'work__sda' "$(printf 'w%.0s' {1..4096})"; do
		reset; running work; expose block sys-usb:sda
		call Attach "$arg"
		check "refuse 64: argument '${arg:0:24}'" 64 ""
	done
	reset
	call Attach
	check "refuse 64: no argument at all" 64 ""
	reset; VIA='env'
	call Attach ''
	check "refuse 64: empty QREXEC_SERVICE_ARGUMENT" 64 ""
	reset
	call Attach work+__+sda extra
	check "refuse 64: two arguments" 64 ""

	# shellcheck disable=SC2016 # hostile text, deliberately unexpanded
	for arg in 'dom0+__+sda' 'sys-usb+__+sda' '../+__+sda' '..+__+sda' 'wörk+__+sda' \
		'work;reboot+__+sda' '$(reboot)+__+sda' '`id`+__+sda' 'work&+__+sda' \
		"$(printf 'work\nx')+__+sda" $'work\x01+__+sda' \
		'none+__+sda' 'default+__+sda' 'Domain-0+__+sda' 'work-dm+__+sda' '1work+__+sda' \
		'_work+__+sda' "$(printf 'q%.0s' {1..32})+__+sda" "$(printf 'q%.0s' {1..4096})+__+sda" \
		'@adminvm+__+sda' '*+__+sda' 'work/..+__+sda' ' work+__+sda'; do
		reset; running work; expose block sys-usb:sda
		call Attach "$arg"
		check "refuse 65: qube in '$(printf '%s' "${arg:0:24}" | tr -c ' -~' '?')'" 65 ""
	done

	# shellcheck disable=SC2016 # hostile text, deliberately unexpanded
	for arg in 'work+__+../sda' 'work+__+sda/..' 'work+__+-sda' 'work+__+_sda' 'work+__+sda;reboot' \
		'work+__+$(id)' 'work+__+`id`' 'work+__+sdä' $'work+__+sda\n' $'work+__+sda\nsdb' \
		'work+__+sd a' "work+__+$(printf 'b%.0s' {1..33})" "work+__+$(printf 'b%.0s' {1..4096})" \
		'work+__+2-' 'work+__+2' 'work+__+1234-1' 'work+__+2-1.' 'work+__+2-1..4' \
		'work+__+2-1.1.1.1.1.1.1.1' 'work+__+2-1:1.0' 'work+__+0x1' 'work+__+*' 'work+__+sda*'; do
		reset; running work; expose block sys-usb:sda
		call Attach "$arg"
		check "refuse 66: device in '$(printf '%s' "${arg:0:40}" | tr -c ' -~' '?')'" 66 ""
	done

	reset
	call Attach gone+__+sda
	check "refuse 67: target listed but does not exist" 67 "qvm-check --quiet -- gone"

	reset; running personal; expose block sys-usb:sda
	call Attach personal+__+sda
	check "refuse 68: no entry (malformed entries grant nothing)" 68 ""
	logged "refuse 68: logged with source, target and device" \
		"attach src=sys-usb target=personal dev=sda class=block: refused (68)"
	logged "refuse 68: malformed allowlist lines are reported" "autoattach.conf:8: malformed entry ignored"
	reset
	call Attach ghost+__+sda
	check "refuse 68: an unlisted, nonexistent qube gives no hint that it does not exist" 68 ""
	reset; running vault; expose usb sys-usb:2-1
	call Attach vault+__+2-1
	check "refuse 68: entry is for another class" 68 ""
	reset; SRC=sys-net; running work; expose block sys-net:sda
	call Attach work+__+sda
	check "refuse 68: entry is for another source" 68 ""
	reset; running work; expose block sys-usb:sda; rm "$STATE/autoattach.conf"
	call Attach work+__+sda
	check "refuse 68: no allowlist file at all" 68 ""
	reset; SRC=dom0-dm
	call Attach work+__+sda
	check "refuse 64: source name Qubes would reject" 64 ""

	reset; expose block sys-usb:sda
	call Attach vault+__+sda
	check "refuse 69: halted target, entry says nostart (no qvm-start)" 69 \
		"qvm-check --quiet -- vault;qvm-check --quiet --running -- vault"
	reset; expose block sys-usb:sda; touch "$STATE/start.fail"
	call Attach work+__+sda
	check "refuse 69: qvm-start fails" 69 "$Q;$R;$S"
	logged "refuse 69: the reason from qvm-start is logged" "Not enough memory"

	reset; running work; WAIT=1; POLL=0.05
	call Attach work+__+sda
	check_calls "refuse 70: never exposed within the bound, no attach" 70 "$Q;$R(;$LS){2,}"
	reset; running work; WAIT=0; expose block sys-usb:sda 2
	call Attach work+__+sda
	check "refuse 70: a zero bound looks once" 70 "$Q;$R;$LS"

	reset; running work personal; expose block sys-usb:sda; attached block sys-usb:sda personal
	call Attach work+__+sda
	check "refuse 71: attached to another qube (Qubes refuses, nothing changes)" 71 "$Q;$R;$LS;$LW;$AT;$LW"
	assert "refuse 71: still attached to personal" "changed" grep -qxF 'sys-usb:sda personal' "$STATE/block.attached"
	reset; running work personal; expose usb sys-usb:3-2; attached usb sys-usb:3-2 personal
	call Attach work+__+3-2
	check "refuse 71: usb device attached to another qube" 71 \
		"$Q;$R;qvm-usb list -- sys-usb;qvm-usb list -- work;qvm-usb attach -- work sys-usb:3-2;qvm-usb list -- work"

	reset; running work; expose block sys-usb:sda; touch "$STATE/attach.fail"
	call Attach work+__+sda
	check "refuse 72: qvm-block attach fails" 72 "$Q;$R;$LS;$LW;$AT;$LW"
	logged "refuse 72: Qubes' message is logged" "Got empty response from qubesd"
}

detach_cases() {
	DT='qvm-block detach -- work sys-usb:sda'
	reset; running work; expose block sys-usb:sda; attached block sys-usb:sda work
	call Detach work+__+sda
	check "detach: attached from the source to the target" 0 "$Q;$R;$LW;$DT"
	assert "detach: no longer attached" "still attached" test ! -s "$STATE/block.attached"

	reset; running work; attached block sys-usb:sda work
	call Detach work+__+sda
	check "detach: device already removed from the source (stale attachment)" 0 "$Q;$R;$LW;$DT"

	reset; running work; expose usb sys-usb:2-1; attached usb sys-usb:2-1 work
	call Detach work+__+2-1
	check "detach: usb device" 0 "$Q;$R;qvm-usb list -- work;qvm-usb detach -- work sys-usb:2-1"

	reset; running work; expose block sys-usb:sda
	call Detach work+__+sda
	check "detach: not attached is success, nothing detached" 0 "$Q;$R;$LW"

	reset; running work personal; expose block sys-usb:sda; attached block sys-usb:sda personal
	call Detach work+__+sda
	check "detach: attached to another qube is left alone" 0 "$Q;$R;$LW"

	reset; expose block sys-usb:sda
	call Detach work+__+sda
	check "detach: halted target has nothing attached, and is not started" 0 "$Q;$R"

	reset; running work; attached block sys-usb:sda work; touch "$STATE/detach.fail"
	call Detach work+__+sda
	check "refuse 72: qvm-block detach fails" 72 "$Q;$R;$LW;$DT"

	reset; running personal; attached block sys-usb:sda personal
	call Detach personal+__+sda
	check "refuse 68: detach without an entry" 68 ""
	reset
	call Detach gone+__+sda
	check "refuse 67: detach from a listed qube that does not exist" 67 "qvm-check --quiet -- gone"
	reset; SRC=
	call Detach work+__+sda
	check "refuse 64: detach without QREXEC_REMOTE_DOMAIN" 64 ""
	for arg in '+__+' 'work' 'a+__+b+__+c'; do
		reset; call Detach "$arg"; check "refuse 64: detach argument '$arg'" 64 ""
	done
	for arg in 'dom0+__+sda' 'sys-usb+__+sda' '../+__+sda'; do
		reset; call Detach "$arg"; check "refuse 65: detach argument '$arg'" 65 ""
	done
	for arg in 'work+__+../sda' $'work+__+sda\nx' 'work+__+2-1..1'; do
		reset; call Detach "$arg"; check "refuse 66: detach argument '$(printf '%s' "$arg" | tr -c ' -~' '?')'" 66 ""
	done
}

setup_cases() {
	reset; running work; expose block sys-usb:sda
	mkdir -p "$tmp/other"
	cp "$svc/custom.USBDeviceAttach" "$tmp/other/custom.USBDeviceOther"
	local keep=$svc
	svc=$tmp/other
	call Other work+__+sda
	svc=$keep
	check "refuse 64: installed under an unknown service name" 64 ""
	reset; running work; expose block sys-usb:sda; cp "$root/dom0/autoattach.conf" "$STATE/autoattach.conf"
	call Attach work+__+sda
	check "refuse 68: the shipped allowlist allows nothing" 68 ""
	if grep -q malformed "$STATE/log"; then fail "the shipped allowlist has no malformed line" "$(grep malformed "$STATE/log")"
	else pass "the shipped allowlist has no malformed line"; fi
	reset; running work vault; expose block sys-usb:sda
	sed 's/^#sys-usb/sys-usb/' "$root/dom0/autoattach.conf" >"$STATE/autoattach.conf"
	call Attach work+__+sda
	check "attach: the shipped examples, uncommented, work" 0 "$Q;$R;$LS;$LW;$AT"
	reset; running work; expose block sys-usb:sda; WAIT=abc
	call Attach work+__+sda
	check "refuse 64: AUTOATTACH_WAIT not a number" 64 ""
	reset; running work; expose block sys-usb:sda; POLL='1;reboot'
	call Attach work+__+sda
	check "refuse 64: AUTOATTACH_POLL not a number" 64 ""
}

suite() {
	attach_success
	attach_refusals
	detach_cases
	setup_cases
}

for sh_ in dash bash; do
	label=$sh_
	command -v "$sh_" >/dev/null || { fail "$sh_" "not installed"; continue; }
	suite
done
sh_=dash label=lint

# Lint every script with shellcheck, each as the shell it is written for.
if ! command -v shellcheck >/dev/null; then
	fail shellcheck "not installed (apt-get install shellcheck)"
else
	if out=$(shellcheck -s sh "$root/dom0/custom.USBDeviceAttach" 2>&1); then
		pass "shellcheck -s sh dom0/custom.USBDeviceAttach"
	else fail "shellcheck dom0/custom.USBDeviceAttach" "$out"; fi
	for f in "$here/run.sh" "$here"/standins/*; do
		if out=$(shellcheck -s bash "$f" 2>&1); then pass "shellcheck ${f#"$root"/}"; else fail "shellcheck ${f#"$root"/}" "$out"; fi
	done
fi
if [ "$(readlink "$root/dom0/custom.USBDeviceDetach")" = custom.USBDeviceAttach ]; then
	pass "dom0/custom.USBDeviceDetach is the same script"
else
	fail "dom0/custom.USBDeviceDetach" "is not a symlink to custom.USBDeviceAttach"
fi

# Policy files: a structural check against qrexec's grammar (tests/dom0/policy_check.py
# says what it checks and where the grammar comes from), and its own self-test.
command -v python3 >/dev/null || fail "policy checks" "python3 is not installed"
if out=$(python3 "$here/policy_check.py" --self-test 2>&1); then pass "policy checker rejects known-bad lines"; else fail "policy checker self-test" "$out"; fi
if out=$(python3 "$here/policy_check.py" --new "$root/dom0/30-autoattach.policy" 2>&1); then
	pass "dom0/30-autoattach.policy parses (R4.1+ grammar)"
else fail "dom0/30-autoattach.policy" "$out"; fi
for f in "$root"/dom0/policy-r4.0/*; do
	if out=$(python3 "$here/policy_check.py" --legacy "$f" 2>&1); then
		pass "${f#"$root"/} parses (R4.0 grammar)"
	else fail "${f#"$root"/}" "$out"; fi
done

# The SHA-256 list in dom0/README.md, which users compare their copies with, is current.
fence='```'
sums=$(sed -n "/^${fence}sha256\$/,/^${fence}\$/p" "$root/dom0/README.md" | grep -E '^[0-9a-f]{64}  ' || :)
if [ "$(printf '%s\n' "$sums" | grep -c .)" -ne 5 ]; then
	fail "dom0/README.md hashes" "want 5 lines in the sha256 block"
elif out=$(cd "$root/dom0" && printf '%s\n' "$sums" | sha256sum -c --quiet 2>&1); then
	pass "dom0/README.md lists the current SHA-256 of each file"
else fail "dom0/README.md hashes" "stale: $out"; fi

# Mutation: with the allowlist check taken out of the service, this suite must fail.
if [ -z "${AUTOATTACH_MUTANT:-}" ]; then
	mkdir -p "$tmp/mutant/dom0"
	# shellcheck disable=SC2016 # a sed pattern, not an expansion
	sed 's/^opt=\$(entry .*$/opt=/' "$root/dom0/custom.USBDeviceAttach" >"$tmp/mutant/dom0/custom.USBDeviceAttach"
	if cmp -s "$root/dom0/custom.USBDeviceAttach" "$tmp/mutant/dom0/custom.USBDeviceAttach"; then
		fail "mutation" "could not remove the allowlist check (sed pattern out of date)"
	else
		chmod +x "$tmp/mutant/dom0/custom.USBDeviceAttach"
		ln -s custom.USBDeviceAttach "$tmp/mutant/dom0/custom.USBDeviceDetach"
		svc=$tmp/mutant/dom0 label=mutant
		saved=$passed/$failed
		exec 3>&1 1>"$tmp/mutant.out"
		attach_refusals
		detach_cases
		exec 1>&3 3>&-
		mutant_failed=$((failed - ${saved#*/}))
		say "mutation: $(grep -c '^FAIL' "$tmp/mutant.out") cases failed, as they should:"
		sed -n 's/^FAIL mutant: /  /p' "$tmp/mutant.out"
		passed=${saved%/*} failed=${saved#*/} label=lint
		if [ "$mutant_failed" -gt 0 ]; then
			pass "mutation: without the allowlist check, $mutant_failed cases fail"
		else
			fail "mutation" "the suite still passes without the allowlist check"
		fi
	fi
fi

say "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
