#!/usr/bin/env bash
# Real-kernel figures for BENCHMARKS.md, autoattach beside the daemons people run today, all in
# one run on this machine's kernel:
#
#   storm    STORM (20,000) synthetic `change` events written as fast as possible to one loop
#            device's uevent file, while one daemon runs: CPU per event (on-CPU time of the
#            daemon and its children: schedstat, in ns), events the kernel sent (a listener with
#            a 256 MiB buffer, and the SEQNUM range) against events the daemon received or
#            processed, receive-buffer overflows. autoattach, busybox `mdev -d`, systemd-udevd.
#   latency  LATENCY (200) synthetic `add`s of an attached loop device, each timed from the
#            write(2) to the first instruction of the stand-in qrexec client: autoattach (a real
#            run, readiness checks included), the seed recipe (systemd-udevd with
#            RUN+="/bin/sh -c 'CLIENT ... &'"), the floor (bench/floor.c), and the floor
#            making autoattach's readiness checks inline (floor --ready), in ROUNDS
#            interleaved rounds so that a change in the machine's load hits all alike.
#   memory   RSS and private dirty memory (/proc/PID/smaps_rollup), idle with 100 rules and at
#            peak during the storm, beside systemd-udevd's and mdev's.
#   size     the stripped release binary, dynamic and static (musl, as `make static` builds it;
#            and glibc +crt-static).
#
# systemd-udevd and mdev create and remove device nodes: each runs only inside its own mount
# and PID namespace (unshare), with a private tmpfs /dev (and, for udevd, /run and its rules
# directories), so the host's /dev and /run/udev are never touched; killing the namespace's
# first process ends every process in it. Every daemon this script starts is stopped on exit
# (trap), and the loop devices it made are removed.
#
# Run as root: bench/kernel.sh. Prints a Markdown table on stdout, progress on stderr.
# Environment: STORM, STORM_ROUNDS (storms per contestant for the CPU figure, default 5),
# LATENCY, ROUNDS, GAP_MS (pause around each latency event, default 20),
# SKIP_STATIC=1 (no static build), KEEP=1 (keep the work directory), AUTOATTACH_BIN (use this
# binary instead of building one), DEB (a .deb from `make deb`: its /usr/bin/autoattach is the
# static binary measured, instead of this tree's musl build).
set -euo pipefail

STORM=${STORM:-20000}
STORM_ROUNDS=${STORM_ROUNDS:-5}
LATENCY=${LATENCY:-200}
ROUNDS=${ROUNDS:-4}
GAP_MS=${GAP_MS:-20}
WARMUP=3
HZ=$(getconf CLK_TCK)

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")
udevd=/lib/systemd/systemd-udevd

say() { printf 'kernel.sh: %s\n' "$*" >&2; }
die() {
	say "error: $*"
	exit 1
}

[[ $(id -u) -eq 0 ]] || die "run as root (loop devices, uevent writes, namespaces)"
[[ -e /dev/loop-control ]] || die "no /dev/loop-control"

# --- what the script needs ------------------------------------------------------------------

missing=()
command -v cc >/dev/null || missing+=(gcc libc6-dev)
command -v busybox >/dev/null || missing+=(busybox)
[[ -x $udevd ]] || missing+=(udev)
command -v losetup >/dev/null && command -v unshare >/dev/null || missing+=(util-linux mount)
if ((${#missing[@]})); then
	say "installing ${missing[*]}"
	apt-get -o DPkg::Lock::Timeout=600 install -y "${missing[@]}" >&2 ||
		{ apt-get -o DPkg::Lock::Timeout=600 update >&2 && apt-get -o DPkg::Lock::Timeout=600 install -y "${missing[@]}" >&2; }
fi

load_before=$(cut -d' ' -f1-3 /proc/loadavg)
work=$(mktemp -d /tmp/autoattach-kbench.XXXXXX)
chmod 755 "$work"

# --- cleanup: every daemon started, every loop device made ----------------------------------

declare -A running=() # wrapper pid -> measured pid
loops=()

stop() { # stop WRAPPER: SIGTERM the measured process, SIGKILL what is left, reap the wrapper
	local wrapper=$1 pid=${running[$1]} _
	kill -TERM "$pid" 2>/dev/null || true
	for _ in $(seq 30); do
		kill -0 "$pid" 2>/dev/null || break
		sleep 0.1
	done
	# A namespace's first process ignores SIGTERM unless it handles it (mdev does not);
	# SIGKILL of the wrapper reaches it (unshare --kill-child) and so every process inside.
	kill -KILL "$pid" 2>/dev/null || true
	[[ $wrapper == "$pid" ]] || kill -KILL "$wrapper" 2>/dev/null || true
	wait "$wrapper" 2>/dev/null || true
	unset "running[$wrapper]"
}

cleanup() {
	local w l
	for w in "${!running[@]}"; do stop "$w"; done
	for l in "${loops[@]}"; do
		losetup -d "/dev/loop$l" 2>/dev/null || true
		if [[ -x $work/bin/loopctl ]]; then "$work/bin/loopctl" remove "$l" 2>/dev/null || true; fi
	done
	if [[ ${KEEP:-0} == 1 ]]; then say "kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- build ----------------------------------------------------------------------------------

if [[ -n ${AUTOATTACH_BIN:-} ]]; then
	bin=$AUTOATTACH_BIN
else
	say "building the release binary"
	(cd "$root" && cargo build --release --quiet)
	bin=$root/target/release/autoattach
fi
[[ -x $bin ]] || die "no binary at $bin"
# A file just written by the linker sits dirty in the page cache until writeback, and smaps
# counts those pages of its mapping as the process's Private_Dirty (~650 kB of text here):
# flush it first so the memory figures are the daemon's own.
sync "$bin"

mkdir "$work/bin"
for tool in floor latency storm listen loopctl; do
	cc -O2 -Wall -o "$work/bin/$tool" "$here/$tool.c"
done
# The stand-in client, static so that exec costs the same for every contestant; one copy per
# contestant, each writing calls.log beside itself.
cc -O2 -static -o "$work/qrexec-client-vm" "$root/tests/support/standin-client.c"
for who in floor floor-ready autoattach udev; do
	mkdir -p "$work/$who"
	cp "$work/qrexec-client-vm" "$work/$who/"
done

# --- devices --------------------------------------------------------------------------------

truncate -s 1M "$work/disk.img"
new_loop() { # new_loop VAR BASE: an attached loop device from index BASE on; its index in VAR
	local n
	n=$("$work/bin/loopctl" add "$2")
	loops+=("$n")
	losetup "/dev/loop$n" "$work/disk.img"
	printf -v "$1" '%s' "$n"
}
lat_n='' storm_n=''
new_loop lat_n 250
new_loop storm_n 260
lat_dev=/devices/virtual/block/loop$lat_n
storm_dev=/devices/virtual/block/loop$storm_n
lat_uevent=/sys/class/block/loop$lat_n/uevent
storm_uevent=/sys/class/block/loop$storm_n/uevent
[[ -e $lat_uevent && -e $storm_uevent ]] || die "loop devices were not made"
say "latency device loop$lat_n, storm device loop$storm_n"

# 100 rules: the 99 of bench/hundred.rules that name absent devices, then the latency device's.
grep -v -e '^#' -e 4C530001230101115543 "$here/hundred.rules" >"$work/agent.rules"
printf 'SUBSYSTEM=="block", KERNEL=="loop%s", ATTACH="work"\n' "$lat_n" >>"$work/agent.rules"
[[ $(grep -c ATTACH "$work/agent.rules") -eq 100 ]] || die "agent.rules should hold 100 rules"

# The seed recipe's rule, the only rule udevd loads.
printf '%s\n' "ACTION==\"add\", SUBSYSTEM==\"block\", KERNEL==\"loop$lat_n\", RUN+=\"/bin/sh -c '$work/udev/qrexec-client-vm dom0 custom.USBDeviceAttach+work+__+%k+__++%n &'\"" \
	>"$work/udev.rules"

# --- starting and measuring daemons ---------------------------------------------------------

wrapper='' # the last started daemon: its wrapper pid, and the pid measured
pid=''

start_host() { # start_host LOG CMD...: a daemon in the host's namespaces
	local out=$1
	shift
	"$@" >"$out" 2>&1 &
	wrapper=$!
	pid=$wrapper
	running[$wrapper]=$pid
}

start_ns() { # start_ns LOG SETUP CMD: CMD after SETUP, in a private mount and PID namespace
	local out=$1 setup=$2 cmd=$3 _
	unshare --mount --pid --fork --kill-child --mount-proc --propagation private -- \
		sh -c "set -e; mount -t tmpfs -o mode=755 tmpfs /dev; mknod -m 666 /dev/null c 1 3; $setup; exec $cmd" \
		>"$out" 2>&1 &
	wrapper=$!
	pid=''
	for _ in $(seq 100); do
		read -r pid _ <"/proc/$wrapper/task/$wrapper/children" 2>/dev/null || true
		[[ -n $pid ]] && break
		sleep 0.05
	done
	[[ -n $pid ]] || die "$cmd did not start: $(cat "$out")"
	running[$wrapper]=$pid
}

start_udevd() {
	start_ns "$1" "mount -t tmpfs tmpfs /run; mkdir /run/udev; \
mount -t tmpfs tmpfs /etc/udev/rules.d; mount -t tmpfs tmpfs /usr/lib/udev/rules.d; \
cp $work/udev.rules /etc/udev/rules.d/50-bench.rules" "$udevd"
}

start_mdev() { start_ns "$1" true "busybox mdev ${2:-} -d -f"; }

start_agent() { # start_agent LOG [ARGS...]
	local out=$1 _
	shift
	start_host "$out" "$bin" run --no-qubesdb --no-detach --rate-limit 0 --rules "$work/agent.rules" \
		--qrexec-client "$work/autoattach/qrexec-client-vm" "$@"
	for _ in $(seq 200); do
		grep -q 'coldplug:' "$out" && return
		sleep 0.05
	done
	die "the agent did not start: $(cat "$out")"
}

tree() { # tree PID: PID and every descendant
	local c kids
	printf '%s\n' "$1"
	kids=$(cat /proc/"$1"/task/*/children 2>/dev/null || true)
	for c in $kids; do tree "$c"; done
}

ticks() { # ticks PID: utime+stime+cutime+cstime of PID and its descendants, in clock ticks
	local sum=0 p s f
	for p in $(tree "$1"); do
		s=$(cat "/proc/$p/stat" 2>/dev/null) || continue
		read -r -a f <<<"${s##*) }" # fields from the 3rd (state) on: utime is the 14th
		sum=$((sum + f[11] + f[12] + f[13] + f[14]))
	done
	printf '%s\n' "$sum"
}

cpu_ns() { # cpu_ns PID: on-CPU nanoseconds of PID's threads and its descendants' (schedstat),
	# plus what reaped children used (cutime+cstime, in ticks). Ticks alone are 10 ms: a storm of
	# 20,000 events at ~3 µs each is only ~6 of them.
	local sum=0 p t s f
	for p in $(tree "$1"); do
		for t in /proc/"$p"/task/*/schedstat; do
			read -r s _ <"$t" 2>/dev/null || continue
			sum=$((sum + s))
		done
		s=$(cat "/proc/$p/stat" 2>/dev/null) || continue
		read -r -a f <<<"${s##*) }"
		sum=$((sum + (f[13] + f[14]) * 1000000000 / HZ))
	done
	printf '%s\n' "$sum"
}

kb() { # kb PID FIELD: a field of /proc/PID/smaps_rollup or status, in kB
	awk -v f="$2:" '$1 == f { print $2; exit }' "/proc/$1/smaps_rollup" "/proc/$1/status" 2>/dev/null || echo 0
}

tree_dirty() { # tree_dirty PID: Private_Dirty of PID and its descendants, in kB
	local sum=0 p
	for p in $(tree "$1"); do sum=$((sum + $(kb "$p" Private_Dirty))); done
	printf '%s\n' "$sum"
}

wait_idle() { # wait_idle PID: until its CPU time stops growing for a second (at most 10 min)
	local a b _
	a=$(ticks "$1")
	for _ in $(seq 1200); do
		sleep 0.5
		b=$(ticks "$1")
		if [[ $a == "$b" ]]; then
			sleep 0.5
			[[ $(ticks "$1") == "$b" ]] && return
		fi
		a=$b
	done
}

wait_line() { # wait_line FILE TEXT: until FILE holds TEXT (at most 20 s)
	local _
	for _ in $(seq 400); do
		grep -q -- "$2" "$1" 2>/dev/null && return
		sleep 0.05
	done
	die "timed out waiting for '$2' in $1"
}

listeners=()
listen() { # listen GROUP OUT: count the storm device's events on GROUP into OUT, in the background
	"$work/bin/listen" "$1" "$storm_dev" 3000 900000 >"$2" 2>"$2.err" &
	listeners+=($!)
	wait_line "$2.err" listening
}

# --- storm and memory -----------------------------------------------------------------------

declare -A result=()

storm() { # storm NAME: the daemon started last, idle, then the storm; results under NAME.*
	local name=$1 t0 t1 out elapsed sampler n first last enobufs l
	listeners=()
	wait_idle "$pid"
	sleep 2 # autoattach gives memory back after 1 s idle (TRIM_AFTER_IDLE in src/runloop.rs)
	result[$name.idle_rss]=$(kb "$pid" Rss)
	result[$name.idle_dirty]=$(kb "$pid" Private_Dirty)
	result[$name.idle_tree_dirty]=$(tree_dirty "$pid")
	listen 1 "$work/$name.sent"
	[[ $name == udevd ]] && listen 2 "$work/$name.processed"
	: >"$work/$name.peak"
	(
		peak=0
		while [[ -e $work/$name.peak ]]; do
			d=$(tree_dirty "$pid")
			((d > peak)) && peak=$d && printf '%s\n' "$peak" >"$work/$name.peak.tmp"
			sleep 0.05
		done
	) &
	sampler=$!
	t0=$(cpu_ns "$pid")
	k0=$(ticks "$pid")
	say "$name: storm of $STORM change events"
	read -r out elapsed < <("$work/bin/storm" "$storm_uevent" change "$STORM")
	wait_idle "$pid"
	t1=$(cpu_ns "$pid")
	k1=$(ticks "$pid")
	rm -f "$work/$name.peak"
	wait "$sampler" || true
	result[$name.peak_dirty]=$(cat "$work/$name.peak.tmp" 2>/dev/null || echo 0)
	result[$name.peak_rss]=$(kb "$pid" VmHWM)
	result[$name.written]=$out
	result[$name.write_ms]=$((elapsed / 1000000))
	if kill -0 "$pid" 2>/dev/null; then
		result[$name.alive]=yes
		result[$name.cpu_us]=$(awk -v t=$((t1 - t0)) -v n="$out" 'BEGIN { printf "%.2f", t / 1000 / n }')
		result[$name.cpu_rounds]="${result[$name.cpu_rounds]:-} ${result[$name.cpu_us]}"
		result[$name.cpu_us_stat]=$(awk -v t=$((k1 - k0)) -v hz="$HZ" -v n="$out" 'BEGIN { printf "%.1f", t * 1e6 / hz / n }')
	else
		result[$name.alive]=no
		result[$name.cpu_us]=died
		result[$name.cpu_us_stat]=died
	fi
	for l in "${listeners[@]}"; do wait "$l" || true; done # each ends 3 s after its last event
	read -r n first last enobufs <"$work/$name.sent"
	result[$name.sent]=$n
	result[$name.seq_first]=$first
	result[$name.seq_last]=$last
	result[$name.listener_enobufs]=$enobufs
	if [[ $name == udevd ]]; then
		read -r n _ <"$work/$name.processed"
		result[$name.received]=$n
	fi
}

received_at_v() { # received_at_v NAME LOG PATTERN: the daemon started last at -v, storm, count
	local name=$1 log=$2 pattern=$3
	wait_idle "$pid"
	"$work/bin/storm" "$storm_uevent" change "$STORM" >/dev/null
	wait_idle "$pid"
	result[$name.received]=$(grep -c -- "$pattern" "$log" || true)
}

storm_cpu() { # storm_cpu NAME: CPU per event only (schedstat), one more round, into NAME.cpu_rounds
	local name=$1 t0 t1 out _
	wait_idle "$pid"
	t0=$(cpu_ns "$pid")
	read -r out _ < <("$work/bin/storm" "$storm_uevent" change "$STORM")
	wait_idle "$pid"
	t1=$(cpu_ns "$pid")
	result[$name.cpu_rounds]="${result[$name.cpu_rounds]:-} $(awk -v t=$((t1 - t0)) -v n="$out" 'BEGIN { printf "%.2f", t / 1000 / n }')"
}

median() { # median VALUES...: the median (mean of the middle two for an even count), and min-max
	printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END {
		m = NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
		printf "%.2f (%s-%s, %d rounds)\n", m, v[1], v[NR], NR }'
}

# --- static builds (their size is reported below; the musl one's memory too) ---------------

# Static twice: musl (what `make static` ships: Rust's own static target) and glibc with
# +crt-static (static glibc alone is ~0.65 MiB). The musl target comes from rustup; where it
# cannot be fetched, that row says so.
size_static=-
static_kind='not built (SKIP_STATIC=1)'
size_glibc=-
glibc_kind='not built (SKIP_STATIC=1)'
if [[ -n ${DEB:-} ]]; then
	# The binary the .deb carries (`make deb`: the static musl build), as dpkg would install it.
	# Extracting writes it, so it is synced below like a fresh build.
	[[ -f $DEB ]] || die "no package at $DEB"
	mkdir "$work/deb"
	dpkg-deb -x "$DEB" "$work/deb"
	sbin=$work/deb/usr/bin/autoattach
	[[ -x $sbin ]] || die "$DEB holds no /usr/bin/autoattach"
	sync "$sbin"
	size_static=$(stat -c %s "$sbin")
	static_kind="packaged in $(basename "$DEB"), $(file -b "$sbin" 2>/dev/null | grep -o 'static[a-z-]* linked' || echo 'not static')"
fi
if [[ ${SKIP_STATIC:-0} != 1 ]]; then
	say "building the static binaries (musl; glibc +crt-static)"
	if [[ -n ${DEB:-} ]]; then
		: # the packaged binary is the static one measured
	elif rustup target list --installed 2>/dev/null | grep -qx x86_64-unknown-linux-musl ||
		rustup target add x86_64-unknown-linux-musl >&2; then
		if (cd "$root" && cargo build --release --quiet --target x86_64-unknown-linux-musl); then
			sbin=$root/target/x86_64-unknown-linux-musl/release/autoattach
			sync "$sbin"
			size_static=$(stat -c %s "$sbin")
			static_kind="musl, $(file -b "$sbin" 2>/dev/null | grep -o 'static[a-z-]* linked' || echo static)"
		else
			static_kind='musl build failed'
		fi
	else
		static_kind='musl target not installed (rustup target add x86_64-unknown-linux-musl failed)'
	fi
	if (cd "$root" && RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --quiet --target x86_64-unknown-linux-gnu); then
		gbin=$root/target/x86_64-unknown-linux-gnu/release/autoattach
		size_glibc=$(stat -c %s "$gbin")
		glibc_kind="glibc +crt-static, $(file -b "$gbin" 2>/dev/null | grep -o 'static[a-z-]* linked' || echo static)"
	else
		glibc_kind='glibc static build failed'
	fi
fi
say "storm: autoattach (100 rules, default log level)"
start_agent "$work/agent-storm.log"
storm agent
result[agent.overflows]=$(grep -c 'receive buffer overflowed' "$work/agent-storm.log" || true)
result[agent.rcvbuf]=$(grep -o 'receive buffer [0-9]* KiB' "$work/agent-storm.log" | head -1 || true)
stop "$wrapper"
say "storm: autoattach at -v, to count what it received"
start_agent "$work/agent-v.log" -v
received_at_v agent "$work/agent-v.log" "uevent change $storm_dev (block)"
stop "$wrapper"
if [[ -n ${sbin:-} && -x $sbin ]]; then
	say "memory: the static build ($static_kind), idle"
	dynamic_bin=$bin
	bin=$sbin
	start_agent "$work/agent-static.log"
	wait_idle "$pid"
	sleep 2 # as above: after the idle trim
	result[static.idle_rss]=$(kb "$pid" Rss)
	result[static.idle_dirty]=$(kb "$pid" Private_Dirty)
	stop "$wrapper"
	bin=$dynamic_bin
fi

say "storm: busybox mdev -d"
start_mdev "$work/mdev-storm.log"
storm mdev
result[mdev.log]=$(grep -v -e '^$' "$work/mdev-storm.log" | tail -1 || true)
stop "$wrapper"
say "storm: busybox mdev -v -d, to count what it received"
start_mdev "$work/mdev-v.log" -v
received_at_v mdev "$work/mdev-v.log" "ACTION:change SEQNUM:[0-9]* SUBSYSTEM:block DEVNAME:loop$storm_n "
stop "$wrapper"

say "storm: systemd-udevd (one RUN rule)"
start_udevd "$work/udevd-storm.log"
storm udevd
stop "$wrapper"

# CPU per event moves with where the scheduler puts the writer and the daemon (a daemon that
# keeps up wakes once per event; one that falls behind reads a batch per wake-up): more rounds,
# autoattach (this build and the static one) and mdev interleaved, and the median of each.
for round in $(seq 2 "$STORM_ROUNDS"); do
	say "storm round $round/$STORM_ROUNDS: autoattach, static autoattach, mdev (CPU only)"
	start_agent "$work/agent-storm.log"
	storm_cpu agent
	stop "$wrapper"
	if [[ -n ${sbin:-} && -x $sbin ]]; then
		dynamic_bin=$bin
		bin=$sbin
		start_agent "$work/agent-static.log"
		storm_cpu static
		stop "$wrapper"
		bin=$dynamic_bin
	fi
	start_mdev "$work/mdev-storm.log"
	storm_cpu mdev
	stop "$wrapper"
done

# --- latency --------------------------------------------------------------------------------

per_round=$(((LATENCY + ROUNDS - 1) / ROUNDS))
for round in $(seq "$ROUNDS"); do
	for who in floor floor-ready autoattach udev; do
		say "latency round $round/$ROUNDS: $who"
		log=$work/$who/calls.log
		case $who in
		floor) start_host "$work/floor.log" "$work/bin/floor" "$work/floor/qrexec-client-vm" "$lat_dev" work ;;
		floor-ready)
			start_host "$work/floor.log" "$work/bin/floor" "$work/floor-ready/qrexec-client-vm" "$lat_dev" work --ready
			;;
		autoattach)
			start_agent "$work/agent-latency.log"
			# Coldplug attaches the device present at start: wait for that call first.
			# The call carries the identity (+__+IDENT; without qubesdb a loop device's is ":N",
			# encoded "+N"): "...+__+loopN+__++N exit 0: done".
			wait_line "$work/agent-latency.log" "USBDeviceAttach+work+__+loop$lat_n+__++$lat_n exit"
			;;
		udev) start_udevd "$work/udevd-latency.log" ;;
		esac
		[[ $who == floor* ]] && wait_line "$work/floor.log" listening
		"$work/bin/latency" "$lat_uevent" "$log" "$per_round" "$GAP_MS" "$WARMUP" >>"$work/$who.latency" ||
			say "$who: some events got no call within 5 s"
		stop "$wrapper"
	done
done

stats() { # stats FILE: "median p99 count timeouts" in ms (nearest rank)
	local t
	t=$(grep -c timeout "$1" || true)
	awk '$2 != "timeout" { print $3 / 1e6 }' "$1" | sort -n | awk -v t="$t" '
			{ v[NR] = $1 }
			END {
				if (NR == 0) { print "- - 0", t; exit }
				m = int((NR + 1) / 2); p = int(NR * 0.99); if (p < NR * 0.99) p++
				printf "%.3f %.3f %d %d\n", v[m], v[p], NR, t
			}'
}
read -r lat_agent_med lat_agent_p99 lat_agent_n lat_agent_to < <(stats "$work/autoattach.latency")
read -r lat_floor_med lat_floor_p99 lat_floor_n lat_floor_to < <(stats "$work/floor.latency")
read -r lat_ready_med lat_ready_p99 lat_ready_n lat_ready_to < <(stats "$work/floor-ready.latency")
read -r lat_udev_med lat_udev_p99 lat_udev_n lat_udev_to < <(stats "$work/udev.latency")

# Formatting for the table.
mib() { awk -v b="$1" 'BEGIN { if (b == "-") print "-"; else printf "%.2f MiB", b / 1048576 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b + 0 == 0 || a == "-" || b == "-") print "-"; else if (a / b < 0.1) printf "%.3f", a / b; else printf "%.2f", a / b }'; }
r() { printf '%s' "${result[$1]:-?}"; }

# --- size -----------------------------------------------------------------------------------

size_dyn=$(stat -c %s "$bin")
size_udevd=$(stat -L -c %s "$udevd") # a link to udevadm on Debian
# Some builds link systemd's code as a shared library (libsystemd-shared): count it too.
udevd_lib=$(ldd "$udevd" | awk '/libsystemd-shared/ { print $3 }')
udevd_size_text=$(mib "$size_udevd")
if [[ -n $udevd_lib ]]; then
	size_udevd=$((size_udevd + $(stat -c %s "$udevd_lib")))
	udevd_size_text="$udevd_size_text with $(basename "$udevd_lib")"
fi
size_busybox=$(stat -L -c %s "$(command -v busybox)")

# --- the table ------------------------------------------------------------------------------

# shellcheck disable=SC2086 # the rounds are a space-separated list of numbers
agent_cpu=$(median ${result[agent.cpu_rounds]:-0})
# shellcheck disable=SC2086
mdev_cpu=$(median ${result[mdev.cpu_rounds]:-0})
# shellcheck disable=SC2086
static_cpu=$([[ -n ${result[static.cpu_rounds]:-} ]] && median ${result[static.cpu_rounds]} || echo -)

cat <<EOF
Load before/after: $load_before / $(cut -d' ' -f1-3 /proc/loadavg); kernel $(uname -r); $(nproc) CPUs.

| figure | autoattach | peer(s), same run | ratio (autoattach / peer) | target |
|---|---|---|---|---|
| storm: CPU per event, all threads (on-CPU ns from schedstat, incl. children), median | $agent_cpu µs | mdev -d $mdev_cpu µs; systemd-udevd $(r udevd.cpu_us) µs (1 round) | $(ratio "${agent_cpu%% *}" "${mdev_cpu%% *}") vs mdev; $(ratio "${agent_cpu%% *}" "$(r udevd.cpu_us)") vs udevd | <= 0.5 vs mdev |
| storm: CPU per event, static build ($static_kind), median | $static_cpu µs | mdev -d $mdev_cpu µs | $(ratio "${static_cpu%% *}" "${mdev_cpu%% *}") vs mdev | <= 0.5 vs mdev |
| storm: CPU per event, /proc/PID/stat (utime+stime+cutime+cstime, 10 ms ticks) | $(r agent.cpu_us_stat) µs | mdev -d $(r mdev.cpu_us_stat) µs; systemd-udevd $(r udevd.cpu_us_stat) µs | $(ratio "$(r agent.cpu_us_stat)" "$(r mdev.cpu_us_stat)") vs mdev | <= 0.5 vs mdev |
| storm: events written / sent by the kernel (listener) | $(r agent.written) / $(r agent.sent) (SEQNUM $(r agent.seq_first)..$(r agent.seq_last)) | mdev $(r mdev.written) / $(r mdev.sent); udevd $(r udevd.written) / $(r udevd.sent) | | |
| storm: events received (autoattach, mdev: a second storm at -v; udevd: processed, group 2) | $(r agent.received) | mdev $(r mdev.received); udevd $(r udevd.received) | | all: zero loss |
| storm: receive-buffer overflows (ENOBUFS) | $(r agent.overflows) ($(r agent.rcvbuf)) | mdev alive after storm: $(r mdev.alive); udevd alive: $(r udevd.alive) | | 0 |
| storm: time to write the events | $(r agent.write_ms) ms | mdev $(r mdev.write_ms) ms; udevd $(r udevd.write_ms) ms | | |
| latency add -> client, median | $lat_agent_med ms | floor $lat_floor_med ms; floor with autoattach's readiness checks $lat_ready_med ms; udev recipe $lat_udev_med ms | $(ratio "$lat_agent_med" "$lat_floor_med") vs floor; $(ratio "$lat_agent_med" "$lat_ready_med") vs floor+checks; $(ratio "$lat_agent_med" "$lat_udev_med") vs udev | <= 1.4 vs floor |
| latency add -> client, p99 | $lat_agent_p99 ms | floor $lat_floor_p99 ms; floor+checks $lat_ready_p99 ms; udev recipe $lat_udev_p99 ms | $(ratio "$lat_agent_p99" "$lat_floor_p99") vs floor; $(ratio "$lat_agent_p99" "$lat_udev_p99") vs udev | |
| latency events measured (timeouts) | $lat_agent_n ($lat_agent_to) | floor $lat_floor_n ($lat_floor_to); floor+checks $lat_ready_n ($lat_ready_to); udev $lat_udev_n ($lat_udev_to) | | |
| memory idle: RSS | $(r agent.idle_rss) kB | udevd $(r udevd.idle_rss) kB; mdev $(r mdev.idle_rss) kB | $(ratio "$(r agent.idle_rss)" "$(r udevd.idle_rss)") vs udevd | |
| memory idle: private dirty | $(r agent.idle_dirty) kB | udevd $(r udevd.idle_dirty) kB (with workers $(r udevd.idle_tree_dirty) kB); mdev $(r mdev.idle_dirty) kB | $(ratio "$(r agent.idle_dirty)" "$(r udevd.idle_dirty)") vs udevd | <= 256 kB |
| memory idle, static build ($static_kind): RSS / private dirty | $(r static.idle_rss) kB / $(r static.idle_dirty) kB | udevd $(r udevd.idle_rss) kB / $(r udevd.idle_dirty) kB | $(ratio "$(r static.idle_dirty)" "$(r udevd.idle_dirty)") vs udevd (dirty) | <= 256 kB |
| memory storm peak: private dirty (sampled every 50 ms, with children) | $(r agent.peak_dirty) kB | udevd $(r udevd.peak_dirty) kB; mdev $(r mdev.peak_dirty) kB | $(ratio "$(r agent.peak_dirty)" "$(r udevd.peak_dirty)") vs udevd | <= 2048 kB |
| memory storm peak: RSS (VmHWM) | $(r agent.peak_rss) kB | udevd $(r udevd.peak_rss) kB; mdev $(r mdev.peak_rss) kB | $(ratio "$(r agent.peak_rss)" "$(r udevd.peak_rss)") vs udevd | |
| size: stripped release binary, dynamic | $(mib "$size_dyn") ($size_dyn B) | systemd-udevd $udevd_size_text; busybox $(mib "$size_busybox") | $(ratio "$size_dyn" "$size_udevd") vs udevd | |
| size: static ($static_kind) | $(mib "$size_static") ($size_static B) | | | <= 1.5 MiB |
| size: static ($glibc_kind) | $(mib "$size_glibc") ($size_glibc B) | | | |
EOF
if [[ $(r mdev.alive) == no ]]; then
	printf '\nmdev died during the storm; its last words: %s\n' "$(r mdev.log)"
fi
