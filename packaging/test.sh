#!/bin/bash
# packaging/test.sh: check the sys-usb packaging of autoattach, one line per check.
#
#   the unit:      systemd-analyze verify on a staged root (nothing is installed on this
#                  machine), systemd-analyze security (fails above 2.0), every hardening
#                  line still there, the preset enables it offline
#   the packages:  make deb rpm, each required file in both with its mode, the same file
#                  list in both, metadata and dependencies, maintainer scripts (run with
#                  stub systemctl, with and without a running systemd)
#   the Makefile:  fails clearly when a dom0 file is missing
#   the scripts:   shellcheck
#
# Exits 1 if any check failed. Environment: BIN (binary to package, built with
# `cargo build --release` when missing), DOM0_DIR (default dom0), KEEP=1 keeps the
# scratch directory.
set -uo pipefail

cd "$(dirname "$0")/.." || exit 2
BIN=${BIN:-target/release/autoattach}
DOM0_DIR=${DOM0_DIR:-dom0}
MAX_SCORE=2.0
UNIT=packaging/autoattach.service

pass=0 fail=0
ok() { echo "ok   - $1"; pass=$((pass + 1)); }
bad() {
    echo "FAIL - $1"
    if [ -n "${2-}" ]; then printf '%s\n' "$2" | sed 's/^/       /' | head -n 20; fi
    fail=$((fail + 1))
}
# check DESCRIPTION COMMAND...: ok when COMMAND exits 0, else FAIL with its output.
check() {
    local desc=$1 out
    shift
    if out=$("$@" 2>&1); then ok "$desc"; else bad "$desc" "$out"; fi
}

scratch=$(mktemp -d)
cleanup() { if [ "${KEEP:-}" = 1 ]; then echo "scratch kept: $scratch"; else rm -rf "$scratch"; fi; }
trap cleanup EXIT

# --- tools ------------------------------------------------------------------------
need_pkgs=()
command -v shellcheck >/dev/null || need_pkgs+=(shellcheck)
command -v rpmbuild >/dev/null || need_pkgs+=(rpm)
if [ ${#need_pkgs[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get -o DPkg::Lock::Timeout=600 install -y -q "${need_pkgs[@]}" >"$scratch/apt.log" 2>&1 ||
        { apt-get -o DPkg::Lock::Timeout=600 update -q >>"$scratch/apt.log" 2>&1 &&
            apt-get -o DPkg::Lock::Timeout=600 install -y -q "${need_pkgs[@]}" >>"$scratch/apt.log" 2>&1; }
fi
for tool in shellcheck rpmbuild rpm dpkg-deb systemd-analyze systemctl make sha256sum; do
    check "tool present: $tool" command -v "$tool"
done

# --- shell scripts ----------------------------------------------------------------
check "shellcheck packaging/*.sh packaging/deb/*" shellcheck packaging/*.sh packaging/deb/*

# --- binary and staged tree -------------------------------------------------------
if [ ! -x "$BIN" ]; then
    echo "#    building $BIN (cargo build --release)"
    nice cargo build --release >"$scratch/cargo.log" 2>&1 || true
fi
check "binary to package exists: $BIN" test -x "$BIN"

stage=target/pkg/root
check "make stage (install into $stage)" make --no-print-directory stage BIN="$BIN" DOM0_DIR="$DOM0_DIR"

# A root for systemd-analyze: the staged tree plus this machine's own units (targets,
# modprobe@.service) and /bin/kill, so ExecReload= and the dependencies resolve.
vroot=$scratch/vroot
mkdir -p "$vroot/lib/systemd" "$vroot/bin"
cp -a "$stage/." "$vroot/" 2>/dev/null
cp -a /lib/systemd/system "$vroot/lib/systemd/" 2>/dev/null
cp /bin/kill "$vroot/bin/kill" 2>/dev/null

# --- the unit ---------------------------------------------------------------------
verify_unit() {
    local out
    out=$(systemd-analyze verify --root="$vroot" autoattach.service 2>&1) || { echo "$out"; return 1; }
    # Unknown keys and bad values are only logged: any output is a failure.
    [ -z "$out" ] || { echo "$out"; return 1; }
}
check "systemd-analyze verify autoattach.service (no output, exit 0)" verify_unit

score=$(systemd-analyze security --offline=true --root="$vroot" autoattach.service 2>/dev/null |
    sed -n 's/.*Overall exposure level for autoattach.service: \([0-9.]*\).*/\1/p')
if [ -z "$score" ]; then
    bad "systemd-analyze security gives a score" "$(systemd-analyze security --offline=true --root="$vroot" autoattach.service 2>&1 | tail -n 5)"
elif awk -v s="$score" -v m="$MAX_SCORE" 'BEGIN { exit !(s <= m) }'; then
    ok "systemd-analyze security: exposure $score <= $MAX_SCORE"
else
    bad "systemd-analyze security: exposure $score > $MAX_SCORE" \
        "$(systemd-analyze security --offline=true --root="$vroot" autoattach.service 2>&1 | grep '✗')"
fi

# Each line the job depends on, or that hardening depends on, exactly as written:
# removing or weakening one fails here even when the score would still pass.
required_lines=(
    "ConditionPathExists=/var/run/qubes-service/autoattach"
    "After=qubes-sysinit.service qubes-db.service qubes-qrexec-agent.service"
    "Wants=modprobe@sd_mod.service modprobe@sr_mod.service modprobe@mmc_block.service"
    "After=modprobe@sd_mod.service modprobe@sr_mod.service modprobe@mmc_block.service"
    "ExecStart=/usr/bin/autoattach run"
    "ExecReload=/bin/kill -HUP \$MAINPID"
    "KillMode=process"
    "Restart=on-failure"
    "RestartSec=5s"
    "RestartPreventExitStatus=2 3"
    "User=autoattach"
    "Group=autoattach"
    "SupplementaryGroups=disk cdrom qubes"
    "CapabilityBoundingSet=CAP_NET_ADMIN"
    "AmbientCapabilities=CAP_NET_ADMIN"
    "NoNewPrivileges=yes"
    "ProtectSystem=strict"
    "ReadOnlyPaths=/run /dev"
    "ProtectHome=yes"
    "InaccessiblePaths=-/rw/home"
    "PrivateTmp=yes"
    "PrivateMounts=yes"
    "UMask=0077"
    "DevicePolicy=closed"
    "DeviceAllow=block-sd r"
    "DeviceAllow=block-sr r"
    "DeviceAllow=/dev/xen/evtchn rw"
    "DeviceAllow=/dev/xen/gntalloc rw"
    "DeviceAllow=/dev/xen/xenbus rw"
    "PrivateNetwork=yes"
    "IPAddressDeny=any"
    "RestrictAddressFamilies=AF_NETLINK AF_UNIX"
    "ProtectKernelTunables=yes"
    "ProtectKernelModules=yes"
    "ProtectKernelLogs=yes"
    "ProtectControlGroups=yes"
    "ProtectClock=yes"
    "ProtectHostname=yes"
    "ProtectProc=invisible"
    "ProcSubset=pid"
    "PrivateIPC=yes"
    "RemoveIPC=yes"
    "KeyringMode=private"
    "RestrictNamespaces=yes"
    "RestrictRealtime=yes"
    "RestrictSUIDSGID=yes"
    "LockPersonality=yes"
    "MemoryDenyWriteExecute=yes"
    "SystemCallArchitectures=native"
    "SystemCallFilter=@system-service"
    "SystemCallFilter=~@privileged @resources @setuid @keyring @memlock"
    "SystemCallErrorNumber=EPERM"
    "WantedBy=multi-user.target"
)
for line in "${required_lines[@]}"; do
    check "unit has: $line" grep -qxF -- "$line" "$UNIT"
done
# Lines that must never appear: PrivateUsers= cuts the agent off from uevents (its
# network namespace would belong to another user namespace); root or a write access to
# block devices would undo the rest.
lacks() { ! grep -E -- "$1" "$UNIT"; }
for pattern in '^PrivateUsers=' '^User=root' '^DeviceAllow=block-[^ ]* .*w' '^DynamicUser=' \
    '^DeviceAllow=block-\*' '^ProtectSystem=(no|false|yes)$'; do
    check "unit lacks: $pattern" lacks "$pattern"
done

preset_enables() {
    rm -rf "$vroot/etc/systemd/system"
    systemctl --root="$vroot" preset autoattach.service >/dev/null 2>&1 &&
        [ -L "$vroot/etc/systemd/system/multi-user.target.wants/autoattach.service" ]
}
check "preset enables autoattach.service offline (as in a template build)" preset_enables

# --- the Makefile fails clearly without the dom0 side -----------------------------
missing_dom0() {
    local out
    mkdir -p "$scratch/empty-dom0"
    if out=$(make --no-print-directory install DESTDIR="$scratch/never" DOM0_DIR="$scratch/empty-dom0" BIN="$BIN" 2>&1); then
        echo "make install succeeded without dom0 files"
        return 1
    fi
    grep -q "dom0 file(s) missing" <<<"$out" || { echo "$out"; return 1; }
    [ ! -e "$scratch/never" ] || { echo "make install wrote files before failing"; return 1; }
}
check "make install fails clearly, writing nothing, when a dom0 file is missing" missing_dom0

# --- packages ---------------------------------------------------------------------
version=$(sed -n 's/^version *= *"\([^"]*\)".*/\1/p' Cargo.toml | head -n 1)
arch=$(dpkg --print-architecture)
deb=target/pkg/autoattach_${version}-1_${arch}.deb
rpm_arch=$(rpm --eval '%{_arch}')
rpm=target/pkg/autoattach-${version}-1.${rpm_arch}.rpm
rm -f "$deb" "$rpm"
check "make deb rpm" make --no-print-directory deb rpm BIN="$BIN" DOM0_DIR="$DOM0_DIR"
check "deb built: $deb" test -f "$deb"
check "rpm built: $rpm" test -f "$rpm"

if [ -f "$deb" ]; then
    echo "#    contents of $deb:"
    dpkg-deb -c "$deb" | awk '{ print "#      " $1, $2, $6, $7, $8 }'
    dpkg-deb -c "$deb" | awk '{ p = $6; sub(/^\.\//, "/", p); sub(/\/$/, "", p); if (p != "") print $1, $2, p }' |
        sort -k3 >"$scratch/deb.list"
else
    : >"$scratch/deb.list"
fi
if [ -f "$rpm" ]; then
    echo "#    contents of $rpm:"
    rpm -qp --qf '[%{FILEMODES:perms} %{FILEUSERNAME}/%{FILEGROUPNAME} %{FILENAMES}\n]' "$rpm" 2>/dev/null |
        sort -k3 >"$scratch/rpm.list"
    sed 's/^/#      /' "$scratch/rpm.list"
else
    : >"$scratch/rpm.list"
fi

# PATH MODE: each package has PATH with MODE (ls -l style), owned by root.
expected=(
    "/usr/bin/autoattach -rwxr-xr-x"
    "/usr/lib/systemd/system/autoattach.service -rw-r--r--"
    "/usr/lib/systemd/system-preset/50-autoattach.preset -rw-r--r--"
    "/usr/lib/sysusers.d/autoattach.conf -rw-r--r--"
    "/etc/autoattach drwxr-xr-x"
    "/etc/autoattach/rules.d drwxr-xr-x"
    "/etc/autoattach/rules.d/README -rw-r--r--"
    "/usr/share/doc/autoattach/README.packaging.md -rw-r--r--"
    "/usr/share/doc/autoattach/README.minimal-templates.md -rw-r--r--"
    "/usr/share/doc/autoattach/examples/backup-disk.rules -rw-r--r--"
    "/usr/share/doc/autoattach/examples/security-key.rules -rw-r--r--"
    "/usr/share/autoattach/dom0 drwxr-xr-x"
    "/usr/share/autoattach/dom0/SHA256SUMS -rw-r--r--"
)
dom0_files=$(make --no-print-directory -s print-dom0-files DOM0_DIR="$DOM0_DIR")
for f in $dom0_files; do
    src=$DOM0_DIR/$f
    if [ -L "$src" ]; then mode=lrwxrwxrwx; elif [ -x "$src" ]; then mode=-rwxr-xr-x; else mode=-rw-r--r--; fi
    expected+=("/usr/share/autoattach/dom0/$f $mode")
done
has_file() {
    local list=$1 path=$2 mode=$3
    awk -v p="$path" -v m="$mode" '$3 == p && $1 == m && $2 == "root/root" { found = 1 } END { exit !found }' "$list" ||
        { echo "want $mode root/root $path; have: $(awk -v p="$path" '$3 == p' "$list")"; return 1; }
}
for entry in "${expected[@]}"; do
    path=${entry% *} mode=${entry##* }
    check "deb has $path $mode" has_file "$scratch/deb.list" "$path" "$mode"
    check "rpm has $path $mode" has_file "$scratch/rpm.list" "$path" "$mode"
done
# rpm lists no directories it does not own (/usr, /etc ...); compare what it lists.
same_files() {
    diff <(awk '{ print $3 }' "$scratch/rpm.list") \
        <(awk 'NR == FNR { want[$3] = 1; next } ($3 in want) { print $3 }' "$scratch/rpm.list" "$scratch/deb.list")
}
check "every path of the rpm is in the deb" same_files
no_stray_rpm_files() { ! grep -E ' /usr/lib/\.build-id' "$scratch/rpm.list"; }
check "rpm has no build-id links" no_stray_rpm_files

dom0_sums() {
    local x=$scratch/deb-x
    rm -rf "$x" && mkdir -p "$x" && dpkg-deb -x "$deb" "$x" &&
        (cd "$x/usr/share/autoattach/dom0" && sha256sum --quiet -c SHA256SUMS)
}
check "dom0/SHA256SUMS in the deb matches the dom0 files" dom0_sums

# --- metadata ---------------------------------------------------------------------
deb_field() { dpkg-deb -f "$deb" "$1" 2>/dev/null; }
field_is() { [ "$(deb_field "$1")" = "$2" ] || { echo "$1: $(deb_field "$1")"; return 1; }; }
field_has() { grep -qF -- "$2" <<<"$(deb_field "$1")" || { echo "$1: $(deb_field "$1")"; return 1; }; }
check "deb Package: autoattach" field_is Package autoattach
check "deb Version: $version-1" field_is Version "$version-1"
check "deb Architecture: $arch" field_is Architecture "$arch"
for dep in "libc6 (>= " "systemd" "procps" "qubes-core-agent," "qubes-core-qrexec | qubes-core-agent-qrexec" "qubesdb"; do
    check "deb Depends: $dep" field_has Depends "$dep"
done
check "deb Recommends: qubes-usb-proxy" field_is Recommends qubes-usb-proxy
deb_control() { dpkg-deb -I "$deb" "$1" 2>/dev/null; }
check "deb conffiles: /etc/autoattach/rules.d/README" grep -qxF /etc/autoattach/rules.d/README <(deb_control conffiles)

rpm_info() { rpm -qpi "$rpm" 2>/dev/null; }
check "rpm Name: autoattach" grep -qE '^Name +: autoattach$' <(rpm_info)
check "rpm Version: $version" grep -qE "^Version +: ${version//./\\.}\$" <(rpm_info)
check "rpm License: GPL-2.0-or-later" grep -qE '^License +: GPL-2.0-or-later$' <(rpm_info)
for dep in qubes-core-agent qubes-core-agent-qrexec qubes-db systemd /usr/bin/kill "libc.so.6()(64bit)"; do
    check "rpm Requires: $dep" grep -qxF -- "$dep" <(rpm -qpR "$rpm" 2>/dev/null)
done
check "rpm Recommends: qubes-usb-proxy" grep -qxF qubes-usb-proxy <(rpm -qp --recommends "$rpm" 2>/dev/null)
check "rpm config file: /etc/autoattach/rules.d/README" grep -qxF /etc/autoattach/rules.d/README <(rpm -qpc "$rpm" 2>/dev/null)

# --- maintainer scripts, run for real with stub commands ---------------------------
# A private mount namespace gets its own /run: without /run/systemd/system (a template
# being built in a chroot) and with it (a running qube). The stubs log their calls.
stubs=$scratch/stubs
mkdir -p "$stubs"
for cmd in systemctl systemd-sysusers; do
    # shellcheck disable=SC2016 # $* and $STUB_LOG belong to the stub, not to us
    printf '#!/bin/sh\necho "%s $*" >>"$STUB_LOG"\n' "$cmd" >"$stubs/$cmd"
    chmod 0755 "$stubs/$cmd"
done
dpkg-deb -e "$deb" "$scratch/DEBIAN" 2>/dev/null
rpm -qp --qf '%{POSTIN}\n' "$rpm" >"$scratch/rpm.post" 2>/dev/null
rpm -qp --qf '%{PREUN}\n' "$rpm" >"$scratch/rpm.preun" 2>/dev/null
rpm -qp --qf '%{POSTUN}\n' "$rpm" >"$scratch/rpm.postun" 2>/dev/null
# run_script SYSTEMD(yes|no) SCRIPT ARGS...: prints the stub calls the script made.
run_script() {
    local running=$1 script=$2
    shift 2
    : >"$scratch/stub.log"
    # shellcheck disable=SC2016 # the inner script expands its own arguments
    STUB_LOG="$scratch/stub.log" PATH="$stubs:$PATH" unshare -m sh -c '
        mount -t tmpfs tmpfs /run || exit 99
        [ "$0" = yes ] && mkdir -p /run/systemd/system
        shift
        exec sh "$@"' "$running" _ "$script" "$@" \
        </dev/null >/dev/null 2>&1 || echo "exit $?"
    cat "$scratch/stub.log"
}
# expect_calls DESCRIPTION WANT DONT_WANT SYSTEMD SCRIPT ARGS...
expect_calls() {
    local desc=$1 want=$2 dont=$3
    shift 3
    local calls
    calls=$(run_script "$@")
    local w missing=
    for w in $want; do grep -q -- "${w//_/ }" <<<"$calls" || missing="$missing $w"; done
    for w in $dont; do grep -q -- "${w//_/ }" <<<"$calls" && missing="$missing !$w"; done
    if [ -z "$missing" ]; then ok "$desc"; else bad "$desc" "wanted/unwanted:$missing; calls: $(tr '\n' ';' <<<"$calls")"; fi
}
expect_calls "deb postinst, first install, chroot: sysusers, preset, no daemon-reload" \
    "systemd-sysusers_autoattach.conf preset_autoattach.service" "daemon-reload try-restart" \
    no "$scratch/DEBIAN/postinst" configure ""
expect_calls "deb postinst, first install, systemd running: daemon-reload too" \
    "systemd-sysusers preset daemon-reload" "try-restart" \
    yes "$scratch/DEBIAN/postinst" configure ""
expect_calls "deb postinst, upgrade, systemd running: daemon-reload, try-restart, no preset" \
    "systemd-sysusers daemon-reload try-restart_autoattach.service" "preset" \
    yes "$scratch/DEBIAN/postinst" configure "0.0.1-1"
expect_calls "deb prerm remove, systemd running: stop and disable" \
    "stop_autoattach.service disable_autoattach.service" "" \
    yes "$scratch/DEBIAN/prerm" remove
expect_calls "deb prerm remove, chroot: disable, no stop" \
    "disable_autoattach.service" "stop" \
    no "$scratch/DEBIAN/prerm" remove
expect_calls "deb prerm upgrade: nothing" "" "stop disable" yes "$scratch/DEBIAN/prerm" upgrade "$version-1"
expect_calls "deb postrm remove, systemd running: daemon-reload" "daemon-reload" "" yes "$scratch/DEBIAN/postrm" remove
expect_calls "rpm %post, install, chroot: sysusers, preset, no daemon-reload" \
    "systemd-sysusers_autoattach.conf preset_autoattach.service" "daemon-reload" \
    no "$scratch/rpm.post" 1
expect_calls "rpm %post, upgrade, systemd running: daemon-reload, no preset" \
    "systemd-sysusers daemon-reload" "preset" \
    yes "$scratch/rpm.post" 2
expect_calls "rpm %preun, erase, systemd running: stop and disable" \
    "stop_autoattach.service disable_autoattach.service" "" \
    yes "$scratch/rpm.preun" 0
expect_calls "rpm %preun, upgrade: nothing" "" "stop disable" yes "$scratch/rpm.preun" 1
expect_calls "rpm %postun, upgrade, systemd running: daemon-reload, try-restart" \
    "daemon-reload try-restart_autoattach.service" "" \
    yes "$scratch/rpm.postun" 1
expect_calls "rpm %postun, erase, chroot: nothing" "" "daemon-reload try-restart" no "$scratch/rpm.postun" 0

echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
