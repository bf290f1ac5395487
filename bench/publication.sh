#!/usr/bin/env bash
# Publication in qubesdb -> exec of the qrexec client, by the real agent on this machine's kernel,
# through the stand-in qubesdb daemon (tests/support/qubesdb-standin.c, the real daemon's framing)
# serving the real socket paths: inside a private mount namespace, /run is a tmpfs and
# /run/qubes (= /var/run/qubes) is a bind mount of the work directory's qubes/, where the daemon
# listens on qubesdb.sock and qubesdb.ro.sock. The host's /run is never touched.
#
#   before  the agent reads qubesdb with qubesdb-read (--qubesdb-read: the stand-in as
#           qubesdb-read, run per probe and polled with growing gaps: the main branch's way)
#   after   the agent as it runs by default (the native client and its watch, once the run
#           loop uses src/qubesdb.rs); with an agent that does not wait for qubesdb at all, the
#           calls come before the publication and the script says so instead of a figure
#   floor   the least any watcher can do on this machine at this moment: one C thread that
#           watches the record, reads it on each event and posix_spawns the client (the
#           stand-in's `floor` mode); the agent's figure is read against it
#
# Each round: RM the device's record through the daemon (as Qubes' udev scripts do when a
# device goes), write "remove" then "add" to a loop device's uevent file. The agent matches
# the device, probes it, finds it unpublished and waits. The daemon publishes the record as
# Qubes' udev-block-add-change writes it, its desc and then the trigger key
# /qubes-block-devices that the agent watches (an R4.2 record: an R4.3 one adds an empty
# `parent`, read by the same one multiread), DELAY_MS after the first command that names each
# (a read of the record, the watch of the trigger), logging CLOCK_MONOTONIC just before the
# watches fire; latency is counted from the desc's publication; the stand-in qrexec client logs
# CLOCK_MONOTONIC as its first act. Latency = client time - publication time: both clocks are
# read by the processes themselves, not by this script.
#
# Run as root: bench/publication.sh. Prints a Markdown table on stdout, progress on stderr.
# Environment: COUNT (rounds per variant, default 100), DELAY_MS (publication delay, default
# 1500: the issue's measurement), GAP_MS (pause after each remove, default 50), VARIANTS
# (default "before after"), BEFORE_BIN / AFTER_BIN (agent binaries; default: this tree's
# release build), KEEP=1 (keep the work directory).
set -euo pipefail

COUNT=${COUNT:-100}
DELAY_MS=${DELAY_MS:-1500}
GAP_MS=${GAP_MS:-50}
VARIANTS=${VARIANTS:-floor before after}
WARMUP=2

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")

say() { printf 'publication.sh: %s\n' "$*" >&2; }
die() {
	say "error: $*"
	exit 1
}

[[ $(id -u) -eq 0 ]] || die "run as root (loop devices, uevent writes, a mount namespace)"
[[ -e /dev/loop-control ]] || die "no /dev/loop-control"
missing=()
command -v cc >/dev/null || missing+=(gcc libc6-dev)
command -v losetup >/dev/null && command -v unshare >/dev/null || missing+=(util-linux mount)
if ((${#missing[@]})); then
	say "installing ${missing[*]}"
	apt-get -o DPkg::Lock::Timeout=600 install -y "${missing[@]}" >&2 ||
		{ apt-get -o DPkg::Lock::Timeout=600 update >&2 && apt-get -o DPkg::Lock::Timeout=600 install -y "${missing[@]}" >&2; }
fi

# No '-' in the path: qubesdb-read before 4.3.3 reads its command after the first '-' of argv[0],
# and the main branch's agent runs it by its full path (issue 10).
work=$(mktemp -d /tmp/aapub.XXXXXX)
chmod 755 "$work"
agent_pid='' daemon_pid='' loop_n='' floor_pid=''

cleanup() {
	[[ -n $floor_pid ]] && { kill -TERM "$floor_pid" 2>/dev/null || true; wait "$floor_pid" 2>/dev/null || true; }
	[[ -n $agent_pid ]] && { kill -TERM "$agent_pid" 2>/dev/null || true; wait "$agent_pid" 2>/dev/null || true; }
	[[ -n $daemon_pid ]] && { kill -TERM "$daemon_pid" 2>/dev/null || true; wait "$daemon_pid" 2>/dev/null || true; }
	if [[ -n $loop_n ]]; then
		losetup -d "/dev/loop$loop_n" 2>/dev/null || true
		"$work/bin/loopctl" remove "$loop_n" 2>/dev/null || true
	fi
	if [[ ${KEEP:-0} == 1 ]]; then say "kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- build ----------------------------------------------------------------------------------

if [[ -z ${BEFORE_BIN:-} || -z ${AFTER_BIN:-} ]]; then
	say "building the release binary"
	(cd "$root" && nice -n 10 cargo build --release --quiet)
fi
before_bin=${BEFORE_BIN:-$root/target/release/autoattach}
after_bin=${AFTER_BIN:-$root/target/release/autoattach}
mkdir "$work/bin" "$work/qubes"
cc -O2 -Wall -o "$work/bin/loopctl" "$here/loopctl.c"
cc -O2 -Wall -o "$work/bin/qubesdb-standin" "$root/tests/support/qubesdb-standin.c"
ln "$work/bin/qubesdb-standin" "$work/bin/qubesdb-read"
cc -O2 -static -o "$work/bin/qrexec-client-vm" "$root/tests/support/standin-client.c"

# --- the device, its rule, its record ----------------------------------------------------------

truncate -s 1M "$work/disk.img"
loop_n=$("$work/bin/loopctl" add 270)
losetup "/dev/loop$loop_n" "$work/disk.img"
uevent=/sys/class/block/loop$loop_n/uevent
[[ -e $uevent ]] || die "loop$loop_n was not made"
printf 'SUBSYSTEM=="block", KERNEL=="loop%s", ATTACH="work"\n' "$loop_n" >"$work/agent.rules"
record=/qubes-block-devices/loop$loop_n
say "device loop$loop_n, record $record/desc published $DELAY_MS ms after the agent first asks"

"$work/bin/qubesdb-standin" daemon -l "$work/qubesdb.log" -r "$work/qubes/qubesdb.ro.sock" \
	"$work/qubes/qubesdb.sock" "publish:$DELAY_MS:$record/desc=loop$loop_n ()" \
	"publish:$DELAY_MS:/qubes-block-devices=" >"$work/daemon.out" &
daemon_pid=$!
for _ in $(seq 100); do
	grep -q ready "$work/daemon.out" 2>/dev/null && break
	sleep 0.05
done
grep -q ready "$work/daemon.out" || die "the stand-in qubesdb daemon did not start"

# --- measuring --------------------------------------------------------------------------------

lines() { # lines FILE PATTERN: how many lines of FILE hold PATTERN (0 if there is no FILE)
	local n
	n=$(grep -c -- "$2" "$1" 2>/dev/null) || true
	echo "${n:-0}"
}

wait_more() { # wait_more FILE PATTERN N SECONDS: until FILE holds more than N such lines
	local deadline=$((SECONDS + $4))
	while (($(lines "$1" "$2") <= $3)); do
		((SECONDS < deadline)) || return 1
		sleep 0.01
	done
}

start_agent() { # start_agent BIN ARGS...: the agent in a mount namespace with the daemon's /run/qubes
	local bin=$1
	shift
	unshare --mount --propagation private -- sh -c \
		"mount -t tmpfs -o mode=755 tmpfs /run && mkdir /run/qubes && mount --bind '$work/qubes' /run/qubes && exec \"\$0\" \"\$@\"" \
		"$bin" run -v --no-detach --rate-limit 0 --rules "$work/agent.rules" \
		--qrexec-client "$work/bin/qrexec-client-vm" "$@" >"$work/agent.log" 2>&1 &
	agent_pid=$!
}

stop_agent() {
	kill -TERM "$agent_pid" 2>/dev/null || true
	wait "$agent_pid" 2>/dev/null || true
	agent_pid=''
}

start_floor() {
	"$work/bin/qubesdb-standin" floor "$work/qubes/qubesdb.ro.sock" "$record/" "$record/desc" \
		"$work/bin/qrexec-client-vm" dom0 "custom.USBDeviceAttach+work+__+loop$loop_n+__+desc+loop${loop_n}_20_28_29" >"$work/agent.log" 2>&1 &
	agent_pid=$!
}

round() { # round OUT: one remove/add; appends "<publish ns> <call ns> <latency ns>" or a reason
	local calls=$work/bin/calls.log log=$work/qubesdb.log n_calls n_pubs
	# The trigger first: an RM re-arms (and so cancels) every pending publication of a key that
	# is absent, and the floor arms the desc's when the record's removal wakes it.
	"$work/bin/qubesdb-standin" rm "$work/qubes/qubesdb.sock" /qubes-block-devices || true
	"$work/bin/qubesdb-standin" rm "$work/qubes/qubesdb.sock" "$record/" || true
	echo remove >"$uevent"
	sleep "$(awk "BEGIN { print $GAP_MS / 1000 }")"
	n_calls=$(lines "$calls" "USBDeviceAttach")
	n_pubs=$(lines "$log" " publish ")
	echo add >"$uevent"
	if ! wait_more "$calls" "USBDeviceAttach" "$n_calls" $((DELAY_MS / 1000 + 10)); then
		echo "timeout" >>"$1"
		return
	fi
	local call pub
	call=$(grep USBDeviceAttach "$calls" | sed -n "$((n_calls + 1))p" | cut -d' ' -f1)
	pub=$(grep ' publish ' "$log" | sed -n "$((n_pubs + 1))p" | cut -d' ' -f1)
	if [[ -z $pub ]]; then
		echo "unpublished $call" >>"$1" # called before any publication: the agent did not wait
	else
		echo "$pub $call $((call - pub))" >>"$1"
	fi
}

measure() { # measure VARIANT BIN ARGS...
	local variant=$1 bin=$2 out=$work/$1.latency i
	shift 2
	if [[ $variant == floor ]]; then say "floor: qubesdb-standin floor"; else say "$variant: $bin ${*:-(defaults)}"; fi
	: >"$out"
	"$work/bin/qubesdb-standin" rm "$work/qubes/qubesdb.sock" "$record/" || true
	if [[ $variant == floor ]]; then start_floor; else start_agent "$bin" "$@"; fi
	# The device is there at start: coldplug probes it; wait for that call first.
	wait_more "$work/bin/calls.log" "USBDeviceAttach" "$(lines "$work/bin/calls.log" USBDeviceAttach)" \
		$((DELAY_MS / 1000 + 10)) || say "$variant: no coldplug call"
	for i in $(seq $((WARMUP + COUNT))); do
		if ((i <= WARMUP)); then round "$work/warmup"; else round "$out"; fi
		((i % 20)) || say "$variant: $i/$((WARMUP + COUNT))"
	done
	stop_agent
	cp "$work/agent.log" "$work/$variant.agent.log"
}

for variant in $VARIANTS; do
	case $variant in
	floor) measure floor - ;;
	before) measure before "$before_bin" --qubesdb-read "$work/bin/qubesdb-read" ;;
	after) measure after "$after_bin" ;;
	*) die "unknown variant $variant" ;;
	esac
done

# --- report -----------------------------------------------------------------------------------

stats() { # stats FILE: "median p99 count timeouts unpublished" in ms (nearest rank)
	local t u
	t=$(lines "$1" timeout)
	u=$(lines "$1" unpublished)
	awk 'NF == 3 { print $3 / 1e6 }' "$1" | sort -n | awk -v t="$t" -v u="$u" '
		{ v[NR] = $1 }
		END {
			if (NR == 0) { print "-", "-", 0, t, u; exit }
			m = int((NR + 1) / 2); p = int(NR * 0.99); if (p < NR * 0.99) p++
			printf "%.3f %.3f %d %d %d\n", v[m], v[p], NR, t, u
		}'
}

echo "| publication -> exec ($COUNT rounds, record published $DELAY_MS ms after the first ask) | median | p99 | measured | timeouts | called before publication |"
echo "|---|---|---|---|---|---|"
for variant in $VARIANTS; do
	read -r med p99 n t u < <(stats "$work/$variant.latency")
	echo "| $variant | $med ms | $p99 ms | $n | $t | $u |"
done
say "load average $(cut -d' ' -f1-3 /proc/loadavg)"
