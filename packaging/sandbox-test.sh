#!/bin/bash
# packaging/sandbox-test.sh: run autoattach.service for real, under systemd, on a machine
# where systemd is not PID 1 (a CI box, a container), and check what its sandbox allows
# and denies. Opt-in (`make check-sandbox`): it needs root and boots a systemd.
#
# How: a new mount and PID namespace gets a throwaway root (an overlay of / whose upper
# layer is a tmpfs), its own /dev with a few nodes (loop devices and vda in group disk),
# /sys and /proc/sys read-only, the staged package installed with its user, stand-ins
# for the Qubes daemons in /run/qubes (qubes-db.service: the project's qubesdb daemon,
# tests/support/qubesdb-standin.c, which speaks qubesdb's protocol; qubes-qrexec-agent:
# packaging/sandbox/fake-qubes.py, a socket that accepts), and systemd as its init. Units
# that could touch the shared kernel (sysctl, udev trigger, module loading, timers) are
# masked. The checks then run with nsenter and systemctl:
#   - the condition: without /run/qubes-service/autoattach the unit is skipped
#   - the shipped unit starts its binary (no exec failure, no seccomp kill) and keeps
#     running: its rules from qubesdb (/vm-config/autoattach-rules) are absent, not an error
#   - end to end: a rule from qubesdb matches a loop device this test sets up; the agent
#     waits until the device is published in qubesdb as Qubes' udev script publishes it,
#     then spawns its call, identity included (a stand-in qrexec-client-vm that exits 0)
#   - a qubesdb that hangs up at start: the agent exits 4 and the unit restarts it
#   - packaging/sandbox/probe.py as ExecStart (a drop-in): uid, groups, capabilities,
#     netlink with SO_RCVBUFFORCE, private netns, sockets in a read-only /run/qubes,
#     devices, files, denied syscalls, a detached child; then a real uevent
#     (`change` written to a loop device's uevent file) must reach it
#   - reload sends SIGHUP; restart leaves the children running (KillMode=process)
#   - exit 2 and 3 are not restarted, exit 4 is
# Leaves nothing: killing the namespace's init ends every process in it, the mounts go
# with the namespace, and the cgroups the inner systemd made are removed.
#
#   packaging/sandbox-test.sh [STAGE]     STAGE: tree from `make stage-deb` (target/pkg/deb-root)
# The stand-ins (tests/support/*.c) are built here with cc, into target/sandbox-bin/.
set -uo pipefail

here=$(cd "$(dirname "$0")" && pwd)
cgroup_names=(init.scope system.slice dev-hugepages.mount dev-mqueue.mount sys-fs-fuse-connections.mount)

# --- inside the new namespaces: build the root, exec systemd -------------------------
if [ "${1-}" = --boot ]; then
    set -eu
    ct=$2 stage=$3 files=$4 bins=$5
    mount -t tmpfs tmpfs "$ct/t"
    mkdir "$ct/t/upper" "$ct/t/work"
    mount -t overlay overlay -o "lowerdir=/,upperdir=$ct/t/upper,workdir=$ct/t/work" "$ct/root"
    r=$ct/root
    mount -t proc proc "$r/proc"
    # The kernel is the host's: nothing in here may change its settings.
    mount --bind "$r/proc/sys" "$r/proc/sys"
    mount -o remount,bind,ro "$r/proc/sys"
    mount --rbind /sys "$r/sys"
    mount -o remount,bind,ro "$r/sys"
    mount -t tmpfs -o mode=0755,nosuid tmpfs "$r/dev"
    mkdir -p "$r/dev/pts" "$r/dev/shm"
    mknod -m 0666 "$r/dev/null" c 1 3
    mknod -m 0666 "$r/dev/zero" c 1 5
    mknod -m 0666 "$r/dev/full" c 1 7
    mknod -m 0666 "$r/dev/random" c 1 8
    mknod -m 0666 "$r/dev/urandom" c 1 9
    mknod -m 0666 "$r/dev/tty" c 5 0
    mknod -m 0600 "$r/dev/loop-control" c 10 237
    for i in 0 1 2 3 4 5 6 7; do
        mknod -m 0660 "$r/dev/loop$i" b 7 "$i"
        chgrp disk "$r/dev/loop$i"
    done
    # A disk that is not a USB one: group disk may read it, the unit may not.
    mknod -m 0660 "$r/dev/vda" b 254 0
    chgrp disk "$r/dev/vda"
    ln -s /proc/self/fd "$r/dev/fd"
    cp -a "$stage/." "$r/"
    systemd-sysusers --root="$r" autoattach.conf
    groupadd -R "$r" -r qubes
    mkdir -p "$r/usr/local/lib/aatest" "$r/rw/config/autoattach" "$r/rw/home/user" \
        "$r/etc/systemd/system/autoattach.service.d"
    cp "$files/probe.py" "$files/fake-qubes.py" "$bins/qubesdb-standin" "$bins/qrexec-client-vm" \
        "$r/usr/local/lib/aatest/"
    echo '# empty' >"$r/rw/config/autoattach/test.rules"
    echo secret >"$r/rw/home/user/secret"
    # qubes-db.service as qubes-core-qubesdb's daemon/qubes-db.service: early, group qubes;
    # ready (Type=notify there) once its sockets listen. The read-only socket is 4.3.3's.
    cat >"$r/etc/systemd/system/qubes-db.service" <<'UNIT'
[Unit]
Description=stand-in for qubesdb-daemon (tests/support/qubesdb-standin.c)
DefaultDependencies=no
[Service]
Group=qubes
ExecStartPre=/usr/bin/install -d -m 0775 -g qubes /run/qubes
ExecStart=/usr/local/lib/aatest/qubesdb-standin daemon -l /run/aatest-qubesdb.log -r /run/qubes/qubesdb.ro.sock /run/qubes/qubesdb.sock
ExecStartPost=/bin/sh -c 'until [ -S /run/qubes/qubesdb.ro.sock ]; do sleep 0.05; done'
UNIT
    cat >"$r/etc/systemd/system/qubes-qrexec-agent.service" <<'UNIT'
[Unit]
Description=stand-in for the socket of the qrexec agent
After=qubes-db.service
[Service]
ExecStart=/usr/bin/python3 /usr/local/lib/aatest/fake-qubes.py
UNIT
    cat >"$r/etc/systemd/system/aatest.target" <<'UNIT'
[Unit]
Description=autoattach sandbox test
Requires=basic.target qubes-db.service qubes-qrexec-agent.service
After=basic.target qubes-db.service qubes-qrexec-agent.service
UNIT
    for u in systemd-sysctl.service systemd-udevd.service systemd-udev-trigger.service \
        systemd-modules-load.service systemd-binfmt.service systemd-pstore.service \
        systemd-remount-fs.service systemd-timesyncd.service systemd-hwdb-update.service \
        apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer e2scrub_all.timer \
        fstrim.timer man-db.timer e2scrub_reap.service postgresql.service getty@tty1.service \
        systemd-journald-audit.socket; do
        ln -sf /dev/null "$r/etc/systemd/system/$u"
    done
    exec chroot "$r" /usr/bin/env -i container=autoattach-sandbox-test PATH=/usr/sbin:/usr/bin:/sbin:/bin \
        /usr/bin/setpriv --bounding-set=-sys_module,-sys_time,-sys_boot,-sys_rawio \
        /lib/systemd/systemd --unit=aatest.target
fi

# --- outside: start, check, tear down ---------------------------------------------
cd "$here/.." || exit 2
stage=${1:-target/pkg/deb-root}
[ "$(id -u)" = 0 ] || { echo "sandbox-test: needs root" >&2; exit 2; }
[ -x "$stage/usr/bin/autoattach" ] || { echo "sandbox-test: $stage: run make stage-deb first" >&2; exit 2; }
stage=$(cd "$stage" && pwd)
loopdev=$(basename "$(find /sys/class/block -maxdepth 1 -name 'loop[0-7]' | sort | tail -n 1)")
[ -n "$loopdev" ] || { echo "sandbox-test: no loop0..7 in /sys/class/block" >&2; exit 2; }

pass=0 fail=0
ok() { echo "ok   - $1"; pass=$((pass + 1)); }
bad() {
    echo "FAIL - $1"
    if [ -n "${2-}" ]; then printf '%s\n' "$2" | sed 's/^/       /' | head -n 30; fi
    fail=$((fail + 1))
}

# The stand-ins, built here and copied into the throwaway root while it is made (inside it, a
# checkout under /tmp is out of sight: the root mounts its own /tmp).
bins=$(pwd)/target/sandbox-bin
mkdir -p "$bins"
cc -O2 -static -o "$bins/qrexec-client-vm" tests/support/standin-client.c || exit 2
cc -O2 -static -o "$bins/qubesdb-standin" tests/support/qubesdb-standin.c || exit 2

ct=$(mktemp -d)
mkdir "$ct/t" "$ct/root"
declare -A had_cgroup
for h in /sys/fs/cgroup/*/; do
    for n in "${cgroup_names[@]}"; do [ -d "$h$n" ] && had_cgroup[$h$n]=1; done
done
unshare --mount --pid --fork --propagation private "$here/sandbox-test.sh" --boot \
    "$ct" "$stage" "$here/sandbox" "$bins" >"$ct/boot.log" 2>&1 &
unshare_pid=$!

init=
teardown() {
    if [ -n "$init" ] && kill -0 "$init" 2>/dev/null; then
        kill -9 "$init" # the init of a PID namespace takes every process in it along
    fi
    wait "$unshare_pid" 2>/dev/null
    local h n
    for h in /sys/fs/cgroup/*/; do
        for n in "${cgroup_names[@]}"; do
            if [ ! -d "$h$n" ] || [ -n "${had_cgroup[$h$n]-}" ]; then continue; fi
            find "$h$n" -depth -type d -exec rmdir {} \; 2>/dev/null
            [ -d "$h$n" ] && echo "sandbox-test: could not remove cgroup $h$n" >&2
        done
    done
    if [ -n "${e2e_loop-}" ]; then losetup -d "$e2e_loop" 2>/dev/null; fi
    rm -rf "$ct"
}
trap teardown EXIT

for _ in $(seq 1 100); do
    init=$(pgrep -P "$unshare_pid" -x systemd || true)
    [ -n "$init" ] && break
    sleep 0.2
done
if [ -z "$init" ]; then
    bad "systemd boots in the throwaway root" "$(tail -n 20 "$ct/boot.log")"
    echo "$pass passed, $fail failed"
    exit 1
fi
ns() { nsenter -t "$init" -m -p -r -w "$@"; }
state=
for _ in $(seq 1 150); do
    state=$(ns systemctl is-system-running 2>/dev/null)
    case $state in running | degraded) break ;; esac
    sleep 0.2
done
case $state in
running | degraded) ok "systemd boots in the throwaway root ($state)" ;;
*) bad "systemd boots in the throwaway root" "state: $state" ;;
esac

unit_state() { ns systemctl show -p ActiveState -p SubState -p NRestarts -p ExecMainStatus -p ExecMainCode autoattach.service | tr '\n' ' '; }
# `|| true`: with pipefail, `journal | grep -q` would fail whenever grep stops reading early
# and journalctl dies of SIGPIPE, even though the line was found.
journal() { ns journalctl -u autoattach.service --no-pager -o cat 2>/dev/null || true; }
# What the qubesdb stand-in was asked, one "COMMAND PATH" a line (its timestamps cut).
qdb_log() { ns cat /run/aatest-qubesdb.log 2>/dev/null | cut -d' ' -f2- || true; }
qdb() { ns /usr/local/lib/aatest/qubesdb-standin "$1" /run/qubes/qubesdb.sock "${@:2}"; }
settle() { # wait until the unit is neither starting nor stopping
    for _ in $(seq 1 50); do
        case $(ns systemctl show -p ActiveState --value autoattach.service) in activating | deactivating | reloading) sleep 0.2 ;; *) return ;; esac
    done
}

# The condition.
ns systemctl start autoattach.service
if journal | grep -q 'unmet condition check (ConditionPathExists=/var/run/qubes-service/autoattach)' &&
    [ "$(ns systemctl show -p ActiveState --value autoattach.service)" = inactive ]; then
    ok "without /run/qubes-service/autoattach the unit is skipped"
else
    bad "without /run/qubes-service/autoattach the unit is skipped" "$(unit_state)"
fi
ns touch /run/qubes-service/autoattach

# The shipped unit and binary: the sandbox must let it run (exec failures are 200-243,
# a seccomp kill is SIGSYS), and it must keep running: qubesdb has no rules for it, which
# is no error (the stand-in answers the read with ERROR_NOENT, as qubesdb does).
ns systemctl start autoattach.service
sleep 3
st=$(unit_state)
if grep -qE 'ExecMainCode=2 .*|ExecMainStatus=2[0-4][0-9] ' <<<"$st" || journal | grep -q 'status=.*SYS'; then
    bad "the shipped unit runs its binary" "$st$(journal | tail -n 10)"
else
    ok "the shipped unit runs its binary: $st"
fi
if journal | grep -qE '^coldplug: [1-9][0-9]* device\(s\) present'; then
    ok "under the sandbox it reads sysfs: $(journal | grep -m1 '^coldplug:')"
else
    bad "under the sandbox it reads sysfs (coldplug finds the loop devices)" "$(journal | tail -n 5)"
fi
if grep -q 'ActiveState=active SubState=running' <<<"$st" && qdb_log | grep -q '^read /vm-config/autoattach-rules$'; then
    ok "it asks qubesdb for /vm-config/autoattach-rules and, finding none, keeps running"
else
    bad "it asks qubesdb for /vm-config/autoattach-rules and, finding none, keeps running" \
        "$st$(journal | tail -n 10)$(qdb_log | tail -n 5)"
fi
echo "#    its log:"
journal | grep -v '^Start\|^Stop\|unmet condition' | tail -n 10 | sed 's/^/#      /'
ns systemctl stop autoattach.service

# End to end under the sandbox: the real agent reads its rule from qubesdb, matches a real
# uevent, reads the device node through DevicePolicy/DeviceAllow and its groups, waits until
# the device is published to dom0 in qubesdb, and spawns a client (a static stand-in for
# qrexec-client-vm, installed in the throwaway root) that runs and exits 0 under the seccomp
# filter and without capabilities. The rule matches only this test's own backing file.
img=$ct/autoattach-sandbox.img
truncate -s 1M "$img"
e2e_loop=$(losetup -f)
e2e_name=$(basename "$e2e_loop")
e2e_rule='SUBSYSTEM=="block", KERNEL=="loop*", ENV{DEVTYPE}=="disk", ATTR{loop/backing_file}=="*/autoattach-sandbox.img", ATTACH="work"'
ns sh -c "install -m 0755 /usr/local/lib/aatest/qrexec-client-vm /usr/bin/qrexec-client-vm
    [ -e '$e2e_loop' ] || { mknod -m 0660 '$e2e_loop' b 7 '${e2e_name#loop}'; chgrp disk '$e2e_loop'; }
    printf '[Service]\nEnvironment=AUTOATTACH_STANDIN_LOG=/tmp/calls.log\nExecStart=\nExecStart=/usr/bin/autoattach run -v\n' >/etc/systemd/system/autoattach.service.d/standin.conf"
qdb write /vm-config/autoattach-rules "$e2e_rule"
ns systemctl daemon-reload
ns systemctl start autoattach.service
for _ in $(seq 1 50); do journal | grep -q 'coldplug:' && break; sleep 0.1; done
losetup "$e2e_loop" "$img"
# Qubes' identity of a disk with no parent is ":N" (qubes/ext/block.py), ENC'd "+N".
want="$e2e_name: custom.USBDeviceAttach+work+__+$e2e_name+__++${e2e_name#loop} exit 0: done"
for _ in $(seq 1 50); do journal | grep -q "$e2e_name.*not yet published" && break; sleep 0.1; done
sleep 1
if journal | grep -q "$e2e_name.*not yet published to dom0 in qubesdb (/qubes-block-devices/$e2e_name/, watching /qubes-block-devices" &&
    qdb_log | grep -qx 'watch /qubes-block-devices' && ! journal | grep -qF "custom.USBDeviceAttach+work+__+$e2e_name"; then
    ok "the agent waits for the device's record in qubesdb, with a watch: $(journal | grep -m1 "$e2e_name.*not yet published")"
else
    bad "the agent waits for the device's record in qubesdb, with a watch" "$(journal | tail -n 15)$(qdb_log | tail -n 8)"
fi
# qubes-linux-utils udev/udev-block-add-change: desc (a loop device's backing file), size in
# bytes, mode, parent (R4.3; none for a loop device), then the key that fires the watches.
qdb write "/qubes-block-devices/$e2e_name/desc" "$(cat "/sys/block/$e2e_name/loop/backing_file")"
qdb write "/qubes-block-devices/$e2e_name/size" "$(($(cat "/sys/block/$e2e_name/size") * 512))"
qdb write "/qubes-block-devices/$e2e_name/mode" w
qdb write "/qubes-block-devices/$e2e_name/parent" ''
qdb write /qubes-block-devices ''
for _ in $(seq 1 50); do journal | grep -qF "$want" && break; sleep 0.2; done
if journal | grep -qF "$want"; then
    ok "under the unit, once published, a real uevent leads to a spawned client that exits 0: $want"
else
    bad "under the unit, once published, a real uevent leads to a spawned client that exits 0" "$(journal | tail -n 15)"
fi
losetup -d "$e2e_loop"
ns systemctl stop autoattach.service
qdb rm /vm-config/autoattach-rules
qdb rm "/qubes-block-devices/$e2e_name/"
ns rm /etc/systemd/system/autoattach.service.d/standin.conf
ns systemctl daemon-reload

# A qubesdb that hangs up on the agent's first read (the stand-in's drop: spec) is a failure
# to start, exit 4, which the unit restarts (RestartPreventExitStatus= names only 2 and 3),
# not a rules error: a qubesdb late at boot must not leave autoattach down for good.
ns sh -c 'mkdir -p /etc/systemd/system/qubes-db.service.d
    printf "[Service]\nExecStart=\nExecStart=/usr/local/lib/aatest/qubesdb-standin daemon -l /run/aatest-qubesdb.log -r /run/qubes/qubesdb.ro.sock /run/qubes/qubesdb.sock drop:/vm-config/autoattach-rules\n" \
        >/etc/systemd/system/qubes-db.service.d/drop.conf'
ns systemctl daemon-reload
ns systemctl restart qubes-db.service
ns systemctl reset-failed autoattach.service 2>/dev/null
ns systemctl start autoattach.service
sleep 6.5
st=$(unit_state)
if grep -q 'ExecMainStatus=4 ' <<<"$st" && [ "$(ns systemctl show -p NRestarts --value autoattach.service)" -ge 1 ]; then
    ok "a qubesdb that hangs up at start: exit 4, restarted: $(journal | grep 'autoattach-rules' | tail -n 1 | cut -c1-160)"
else
    bad "a qubesdb that hangs up at start: exit 4, restarted" "$st$(journal | tail -n 6)"
fi
ns systemctl stop autoattach.service
ns rm -r /etc/systemd/system/qubes-db.service.d
ns systemctl daemon-reload
ns systemctl restart qubes-db.service
ns systemctl reset-failed autoattach.service 2>/dev/null

# The probe.
ns sh -c 'printf "[Service]\nExecStart=\nExecStart=/usr/bin/python3 /usr/local/lib/aatest/probe.py\nEnvironment=PYTHONDONTWRITEBYTECODE=1\n" >/etc/systemd/system/autoattach.service.d/probe.conf'
ns systemctl daemon-reload
ns systemctl reset-failed autoattach.service 2>/dev/null
ns systemctl start autoattach.service
for _ in $(seq 1 50); do journal | grep -q '^PROBE ready' && break; sleep 0.2; done
while read -r line; do
    case $line in
    "PROBE ok "*) ok "sandbox: ${line#PROBE ok   }" ;;
    "PROBE FAIL "*) bad "sandbox: ${line#PROBE FAIL }" ;;
    esac
done < <(journal | grep -E '^PROBE (ok|FAIL) ')
journal | grep -q '^PROBE ready' || bad "the probe ran to the end" "$(journal | tail -n 15)"

echo change >"/sys/class/block/$loopdev/uevent"
for _ in $(seq 1 25); do journal | grep -q "^PROBE uevent change@.*/$loopdev from portid 0 group 1 creds(pid,uid,gid)=\[(0, 0, 0)\]" && break; sleep 0.2; done
if journal | grep -q "^PROBE uevent change@.*/$loopdev from portid 0 group 1"; then
    ok "a kernel uevent reaches the agent in its private network namespace: $(journal | grep -m1 "^PROBE uevent change@.*/$loopdev" | cut -c14-)"
else
    bad "a kernel uevent reaches the agent in its private network namespace" "$(journal | tail -n 5)"
fi

ns systemctl reload autoattach.service
for _ in $(seq 1 25); do journal | grep -q '^PROBE signal SIGHUP' && break; sleep 0.2; done
if journal | grep -q "^PROBE signal SIGHUP"; then ok "systemctl reload sends SIGHUP"; else bad "systemctl reload sends SIGHUP" "$(unit_state)$(journal | tail -n 12)"; fi

main_before=$(ns systemctl show -p MainPID --value autoattach.service)
children_before=$(ns pgrep -u autoattach -x sleep | sort)
ns systemctl restart autoattach.service
settle
main_after=$(ns systemctl show -p MainPID --value autoattach.service)
children_after=$(ns pgrep -u autoattach -x sleep | sort)
if [ -n "$children_before" ] && [ "$main_before" != "$main_after" ] &&
    [ -z "$(comm -23 <(echo "$children_before") <(echo "$children_after"))" ]; then
    ok "restart replaces the agent ($main_before -> $main_after) and keeps its children"
else
    bad "restart replaces the agent and keeps its children" "main $main_before -> $main_after; children before: $children_before; after: $children_after"
fi
ns systemctl stop autoattach.service
ns pkill -9 -u autoattach -x sleep

for code in 2 3 4; do
    ns sh -c "printf '[Service]\nEnvironment=PROBE_MODE=exit$code\n' >/etc/systemd/system/autoattach.service.d/mode.conf"
    ns systemctl daemon-reload
    ns systemctl reset-failed autoattach.service 2>/dev/null
    ns systemctl start autoattach.service
    sleep 6.5
    restarts=$(ns systemctl show -p NRestarts --value autoattach.service)
    if [ "$code" = 4 ]; then want=restarted; [ "$restarts" -ge 1 ] && got=restarted || got="not restarted"
    else want="not restarted"; [ "$restarts" -eq 0 ] && got="not restarted" || got=restarted; fi
    if [ "$got" = "$want" ]; then ok "exit $code is $want"; else bad "exit $code is $want" "$(unit_state)"; fi
    ns systemctl stop autoattach.service
done

echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
