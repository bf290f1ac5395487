#!/bin/bash
# packaging/test.sh: check the packaging of autoattach, one line per check.
#
#   tools:         installs what the checks need (Debian packages; rpmlint and Salt from PyPI)
#   the Makefile:  says what is missing (build tools, an old rustc, man pages, dom0 files)
#                  instead of failing with a bare "Error 127"
#   the binary:    the static musl build, at most 1.5 MiB; the copyright file names every
#                  crate linked into it
#   the unit:      systemd-analyze verify on a staged root (nothing is installed on this
#                  machine), systemd-analyze security (fails above 2.0), every hardening
#                  line still there, the preset enables it offline
#   the packages:  make deb rpm dom0-rpm; each file in each package with its mode; metadata
#                  and dependencies; man pages that `man --warnings` reads silently
#   the linters:   lintian (no error, no warning; overrides carry their reason), rpmlint with
#                  Fedora's configuration (no error; packaging/rpm/autoattach.rpmlintrc),
#                  Debian's rpmlint (no error beyond the false positives packaging/README.md
#                  lists)
#   the scripts:   the Debian maintainer scripts are debhelper's, block for block (debhelper
#                  regenerates them here); deb and rpm scripts run with stub commands, with
#                  and without a running systemd; shellcheck
#   Salt:          salt/test.sh (the formula rendered offline)
#
# Exits 1 if any check failed. Environment: PKG_BIN (binary to package; default the static
# musl build, made with `make static` when missing), DOM0_DIR (default dom0), KEEP=1 keeps
# the scratch directory. Make variables (MAN_OUT, BASH_COMPLETION, ...) pass through MAKEFLAGS.
set -uo pipefail

cd "$(dirname "$0")/.." || exit 2
PKG_BIN=${PKG_BIN:-target/x86_64-unknown-linux-musl/release/autoattach}
DOM0_DIR=${DOM0_DIR:-dom0}
MAX_SCORE=2.0
UNIT=packaging/autoattach.service
# rpmlint as Fedora runs it: the same version from PyPI, Fedora's configuration files from
# its source distribution (configs/Fedora, which Fedora's rpmlint package installs in
# /etc/xdg/rpmlint), Debian's python3-rpm for the rpm bindings.
RPMLINT_VERSION=2.10.0
RPMLINT_VENV=target/rpmlint-venv

pass=0 fail=0
ok() { echo "ok   - $1"; pass=$((pass + 1)); }
bad() {
    echo "FAIL - $1"
    if [ -n "${2-}" ]; then printf '%s\n' "$2" | sed 's/^/       /' | head -n 30; fi
    fail=$((fail + 1))
}
# check DESCRIPTION COMMAND...: ok when COMMAND exits 0, else FAIL with its output.
check() {
    local desc=$1 out
    shift
    if out=$("$@" 2>&1); then ok "$desc"; else bad "$desc" "$out"; fi
}
show() { sed 's/^/#      /'; }

scratch=$(mktemp -d)
cleanup() { if [ "${KEEP:-}" = 1 ]; then echo "scratch kept: $scratch"; else rm -rf "$scratch"; fi; }
trap cleanup EXIT

# --- tools ------------------------------------------------------------------------
# tool:package pairs; python3-rpm and python3-enchant + hunspell-en-us serve rpmlint
# (its rpm bindings, its spelling check as in Fedora), devscripts its bashism check
# (checkbashisms), debhelper the maintainer-script comparison, man-db `man --warnings`,
# scdoc the man pages.
need_pkgs=()
for pair in shellcheck:shellcheck rpmbuild:rpm dpkg-deb:dpkg dpkg-parsechangelog:dpkg-dev \
    lintian:lintian rpmlint:rpmlint dh_installsystemd:debhelper checkbashisms:devscripts \
    man:man-db scdoc:scdoc systemd-analyze:systemd rpm2cpio:rpm2cpio cpio:cpio file:file readelf:binutils; do
    command -v "${pair%%:*}" >/dev/null || need_pkgs+=("${pair#*:}")
done
for p in python3-rpm python3-venv python3-enchant hunspell-en-us; do
    [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" = "install ok installed" ] || need_pkgs+=("$p")
done
if [ ${#need_pkgs[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "#    installing: ${need_pkgs[*]}"
    { apt-get -o DPkg::Lock::Timeout=600 update -q &&
        DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -q \
            --no-install-recommends "${need_pkgs[@]}"; } >"$scratch/apt.log" 2>&1 ||
        echo "#    apt-get failed: $(tail -n 3 "$scratch/apt.log")"
fi
for tool in shellcheck rpmbuild rpm dpkg-deb dpkg-parsechangelog lintian rpmlint dh_installsystemd \
    checkbashisms man scdoc systemd-analyze systemctl make sha256sum; do
    check "tool present: $tool" command -v "$tool"
done
if ! "$RPMLINT_VENV/bin/rpmlint" --version 2>/dev/null | grep -qx "$RPMLINT_VERSION"; then
    echo "#    installing rpmlint $RPMLINT_VERSION and Fedora's configuration from PyPI into $RPMLINT_VENV"
    rm -rf "$RPMLINT_VENV"
    { /usr/bin/python3 -m venv --system-site-packages "$RPMLINT_VENV" &&
        "$RPMLINT_VENV/bin/pip" install -q "rpmlint==$RPMLINT_VERSION" &&
        "$RPMLINT_VENV/bin/pip" download -q --no-deps --no-binary :all: -d "$RPMLINT_VENV/sdist" \
            "rpmlint==$RPMLINT_VERSION" &&
        mkdir -p "$RPMLINT_VENV/xdg/rpmlint" &&
        tar -xzf "$RPMLINT_VENV/sdist/rpmlint-$RPMLINT_VERSION.tar.gz" -C "$RPMLINT_VENV/xdg/rpmlint" \
            --strip-components=3 --wildcards "rpmlint-$RPMLINT_VERSION/configs/Fedora/*.toml"; } \
        >"$scratch/rpmlint-install.log" 2>&1
fi
fedora_rpmlint() {
    XDG_CONFIG_DIRS=$(pwd)/$RPMLINT_VENV/xdg "$RPMLINT_VENV/bin/rpmlint" -r packaging/rpm/autoattach.rpmlintrc "$@"
}
check "rpmlint $RPMLINT_VERSION with Fedora's configuration (PyPI)" \
    test -x "$RPMLINT_VENV/bin/rpmlint" -a -f "$RPMLINT_VENV/xdg/rpmlint/fedora.toml"

# --- shell scripts ----------------------------------------------------------------
check "shellcheck packaging, maintainer scripts, salt/test.sh" shellcheck packaging/*.sh \
    packaging/debian/postinst packaging/debian/prerm packaging/debian/postrm packaging/rpm/*.sh salt/test.sh

# --- the Makefile says what is missing --------------------------------------------
# A PATH holding only stand-ins (and the tools make and the checks themselves use).
fakebin=$scratch/fakebin
mkdir -p "$fakebin"
for t in sh bash sed sort head grep printf cat env; do ln -sf "$(command -v "$t")" "$fakebin/$t"; done
printf '#!/bin/sh\necho "rustc 1.63.0 (4b91a6ea7 2022-08-08)"\n' >"$fakebin/rustc"
printf '#!/bin/sh\nexit 0\n' >"$fakebin/cargo"
chmod 0755 "$fakebin/rustc" "$fakebin/cargo"
make_says() { # make_says TEXT MAKE-ARGS...: make fails, and its stderr holds TEXT
    local want=$1 out
    shift
    if out=$(PATH=$fakebin "$(command -v make)" --no-print-directory "$@" 2>&1); then
        echo "make $* succeeded"; return 1
    fi
    grep -qF -- "$want" <<<"$out" || { echo "$out"; return 1; }
}
check "make build with Debian 12's rustc 1.63: says Rust 1.85 is needed" \
    make_says "needs Rust 1.85 or later" build
check "make deb without dpkg-deb: names the Debian package" make_says "apt-get install dpkg" check-deb-tools
check "make rpm without rpmbuild: names the Debian package" make_says "apt-get install rpm " check-rpm-tools
missing_docs() {
    local out
    if out=$(make --no-print-directory check-docs MAN_OUT="$scratch/no-man" 2>&1); then echo "passed"; return 1; fi
    if ! grep -q "man page(s) or shell completion(s) missing:.*no-man/autoattach.8" <<<"$out" ||
        ! grep -q 'make man' <<<"$out"; then
        echo "$out"
        return 1
    fi
}
check "make check-docs without man pages: lists them and says make man" missing_docs
missing_dom0() {
    local out
    mkdir -p "$scratch/empty-dom0"
    if out=$(make --no-print-directory install DESTDIR="$scratch/never" DOM0_DIR="$scratch/empty-dom0" BIN="$PKG_BIN" 2>&1); then
        echo "make install succeeded without dom0 files"
        return 1
    fi
    grep -q "dom0 file(s) missing" <<<"$out" || { echo "$out"; return 1; }
    [ ! -e "$scratch/never" ] || { echo "make install wrote files before failing"; return 1; }
}
check "make install fails clearly, writing nothing, when a dom0 file is missing" missing_dom0

# --- man pages --------------------------------------------------------------------
check "make man (man/*.scd through scdoc)" make --no-print-directory man
check "man pages and completions present" make --no-print-directory -s check-docs

# --- the binary -------------------------------------------------------------------
# The packages ship the static musl build: Rust's musl target comes from rustup.
if ! rustup target list --installed 2>/dev/null | grep -qx x86_64-unknown-linux-musl; then
    echo "#    rustup target add x86_64-unknown-linux-musl"
    rustup target add x86_64-unknown-linux-musl >"$scratch/rustup.log" 2>&1 || tail -n 5 "$scratch/rustup.log"
fi
if [ "$PKG_BIN" = target/x86_64-unknown-linux-musl/release/autoattach ]; then
    echo "#    make static (builds $PKG_BIN, or finds it up to date)"
    nice make --no-print-directory static >"$scratch/cargo.log" 2>&1 || tail -n 20 "$scratch/cargo.log"
fi
check "binary to package exists: $PKG_BIN" test -x "$PKG_BIN"
static_small() {
    local size
    size=$(stat -c %s "$PKG_BIN")
    echo "$size bytes"
    [ "$size" -le 1572864 ] || return 1
    [ "$PKG_BIN" != target/x86_64-unknown-linux-musl/release/autoattach ] ||
        file -b "$PKG_BIN" | grep -q 'static-pie linked\|statically linked'
}
check "the packaged binary is static and at most 1.5 MiB: $(stat -c %s "$PKG_BIN" 2>/dev/null) bytes" static_small
crates_in_copyright() { # every crate linked into the binary has a paragraph in debian/copyright
    local missing='' c
    for c in $(cargo tree -e normal --prefix none --target x86_64-unknown-linux-musl -f '{p}' 2>/dev/null |
        awk '{ print $1 }' | sort -u | grep -vx autoattach); do
        grep -qE "^Files:.* crate:$c( |\$)" packaging/debian/copyright || missing="$missing $c"
    done
    [ -z "$missing" ] || { echo "crates linked but not in packaging/debian/copyright:$missing"; return 1; }
}
check "packaging/debian/copyright names every crate linked into the binary" crates_in_copyright

stage=target/pkg/deb-root
check "make stage-deb (install into $stage)" make --no-print-directory stage-deb PKG_BIN="$PKG_BIN" DOM0_DIR="$DOM0_DIR"

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
    "TimeoutStopSec=90s"
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

# --- packages ---------------------------------------------------------------------
version=$(sed -n 's/^version *= *"\([^"]*\)".*/\1/p' Cargo.toml | head -n 1)
arch=$(dpkg --print-architecture)
deb=target/pkg/autoattach_${version}-1_${arch}.deb
rpm_arch=$(rpm --eval '%{_arch}')
rpm=target/pkg/autoattach-${version}-1.${rpm_arch}.rpm
dom0rpm=target/pkg/autoattach-dom0-${version}-1.noarch.rpm
rm -f "$deb" "$rpm" "$dom0rpm"
check "make deb rpm dom0-rpm" make --no-print-directory deb rpm dom0-rpm PKG_BIN="$PKG_BIN" DOM0_DIR="$DOM0_DIR"
for f in "$deb" "$rpm" "$dom0rpm"; do check "built: $f ($(stat -c %s "$f" 2>/dev/null) bytes)" test -f "$f"; done

# PATH MODE OWNER lists, sorted by path.
list_deb() { dpkg-deb -c "$1" | awk '{ p = $6; sub(/^\.\//, "/", p); sub(/\/$/, "", p); if (p != "") print $1, $2, p }' | sort -k3; }
list_rpm() { rpm -qp --qf '[%{FILEMODES:perms} %{FILEUSERNAME}/%{FILEGROUPNAME} %{FILENAMES}\n]' "$1" 2>/dev/null | sort -k3; }
touch "$scratch/deb.list" "$scratch/rpm.list" "$scratch/dom0.list"
[ -f "$deb" ] && list_deb "$deb" >"$scratch/deb.list"
[ -f "$rpm" ] && list_rpm "$rpm" >"$scratch/rpm.list"
[ -f "$dom0rpm" ] && list_rpm "$dom0rpm" >"$scratch/dom0.list"
for l in deb rpm dom0; do echo "#    contents of the $l package:"; show <"$scratch/$l.list"; done

# WHERE PATH MODE: the package (deb, rpm, both, dom0) has PATH with MODE, owned by root.
expected=(
    "both /usr/bin/autoattach -rwxr-xr-x"
    "both /usr/lib/systemd/system/autoattach.service -rw-r--r--"
    "both /usr/lib/systemd/system-preset/50-autoattach.preset -rw-r--r--"
    "both /usr/lib/sysusers.d/autoattach.conf -rw-r--r--"
    "both /etc/autoattach drwxr-xr-x"
    "both /etc/autoattach/rules.d drwxr-xr-x"
    "both /etc/autoattach/rules.d/README -rw-r--r--"
    "both /usr/share/man/man8/autoattach.8.gz -rw-r--r--"
    "both /usr/share/man/man5/autoattach.rules.5.gz -rw-r--r--"
    "both /usr/share/man/man8/autoattach-dom0.8.gz -rw-r--r--"
    "both /usr/share/bash-completion/completions/autoattach -rw-r--r--"
    "deb /usr/share/zsh/vendor-completions/_autoattach -rw-r--r--"
    "rpm /usr/share/zsh/site-functions/_autoattach -rw-r--r--"
    "both /usr/share/fish/vendor_completions.d/autoattach.fish -rw-r--r--"
    "both /usr/share/doc/autoattach/README.md -rw-r--r--"
    "both /usr/share/doc/autoattach/README.packaging.md -rw-r--r--"
    "both /usr/share/doc/autoattach/README.minimal-templates.md -rw-r--r--"
    "both /usr/share/doc/autoattach/examples/backup-disk.rules -rw-r--r--"
    "both /usr/share/doc/autoattach/examples/security-key.rules -rw-r--r--"
    "deb /usr/share/doc/autoattach/copyright -rw-r--r--"
    "deb /usr/share/doc/autoattach/changelog.Debian.gz -rw-r--r--"
    "deb /usr/share/lintian/overrides/autoattach -rw-r--r--"
    "rpm /usr/share/licenses/autoattach/LICENSE -rw-r--r--"
    "both /usr/share/autoattach/dom0 drwxr-xr-x"
    "both /usr/share/autoattach/dom0/SHA256SUMS -rw-r--r--"
    "both /usr/share/autoattach/salt/SHA256SUMS -rw-r--r--"
    "both /usr/share/autoattach/salt/README.md -rw-r--r--"
    "both /usr/share/autoattach/salt/user_salt/autoattach.top -rw-r--r--"
    "both /usr/share/autoattach/salt/user_salt/autoattach/dom0.sls -rw-r--r--"
    "both /usr/share/autoattach/salt/user_salt/autoattach/template.sls -rw-r--r--"
    "both /usr/share/autoattach/salt/user_salt/autoattach/map.jinja -rw-r--r--"
    "both /usr/share/autoattach/salt/user_pillar/autoattach.top -rw-r--r--"
    "both /usr/share/autoattach/salt/user_pillar/autoattach/init.sls -rw-r--r--"
    "dom0 /etc/qubes-rpc/custom.USBDeviceAttach -rwxr-xr-x"
    "dom0 /etc/qubes-rpc/custom.USBDeviceDetach lrwxrwxrwx"
    "dom0 /etc/qubes/policy.d/30-autoattach.policy -rw-r--r--"
    "dom0 /etc/qubes/autoattach.conf -rw-r--r--"
    "dom0 /usr/share/man/man8/autoattach-dom0.8.gz -rw-r--r--"
    "dom0 /usr/share/doc/autoattach-dom0/README.md -rw-r--r--"
    "dom0 /usr/share/licenses/autoattach-dom0/LICENSE -rw-r--r--"
)
for f in $(make --no-print-directory -s print-dom0-files DOM0_DIR="$DOM0_DIR"); do
    src=$DOM0_DIR/$f
    if [ -L "$src" ]; then mode=lrwxrwxrwx; elif [ -x "$src" ]; then mode=-rwxr-xr-x; else mode=-rw-r--r--; fi
    expected+=("both /usr/share/autoattach/dom0/$f $mode")
done
has_file() {
    local list=$1 path=$2 mode=$3
    awk -v p="$path" -v m="$mode" '$3 == p && $1 == m && $2 == "root/root" { found = 1 } END { exit !found }' "$list" ||
        { echo "want $mode root/root $path; have: $(awk -v p="$path" '$3 == p' "$list")"; return 1; }
}
: >"$scratch/expected.paths"
for entry in "${expected[@]}"; do
    read -r where path mode <<<"$entry"
    echo "$where $path" >>"$scratch/expected.paths"
    case $where in
    both) lists="deb rpm" ;;
    *) lists=$where ;;
    esac
    for l in $lists; do check "$l package has $path $mode" has_file "$scratch/$l.list" "$path" "$mode"; done
done
# Nothing else: every file (not directory) of each package is expected there.
no_stray() { # no_stray LIST WHERE...
    local list=$1 stray
    shift
    stray=$(awk '$1 !~ /^d/ { print $3 }' "$scratch/$list.list" | while read -r p; do
        grep -qE "^($(IFS='|'; echo "$*")) $p\$" "$scratch/expected.paths" || echo "$p"
    done)
    [ -z "$stray" ] || { echo "unexpected: $stray"; return 1; }
}
check "the deb holds no file beyond those" no_stray deb both deb
check "the rpm holds no file beyond those" no_stray rpm both rpm
check "the dom0 rpm holds no file beyond those" no_stray dom0 dom0

sums_match() { # the shipped SHA256SUMS match the shipped files
    local x=$scratch/deb-x
    rm -rf "$x" && mkdir -p "$x" && dpkg-deb -x "$deb" "$x" &&
        (cd "$x/usr/share/autoattach/dom0" && sha256sum --quiet -c SHA256SUMS) &&
        (cd "$x/usr/share/autoattach/salt" && sha256sum --quiet -c SHA256SUMS)
}
check "dom0/SHA256SUMS and salt/SHA256SUMS in the deb match their files" sums_match

# --- man pages, as installed --------------------------------------------------------
man_silent() { # man --warnings prints nothing for each installed page
    local page out all=
    for page in "$@"; do
        out=$(LC_ALL=C.UTF-8 MANWIDTH=80 man --warnings -l "$page" 2>&1 >/dev/null)
        [ -z "$out" ] || all="$all$page: $out"$'\n'
    done
    [ -z "$all" ] || { echo "$all"; return 1; }
}
check "man --warnings -l is silent on the installed pages" man_silent \
    "$scratch"/deb-x/usr/share/man/man*/*.gz
dom0_man() {
    local x=$scratch/dom0-x
    rm -rf "$x" && mkdir -p "$x" && (cd "$x" && rpm2cpio "$(cd - >/dev/null && pwd)/$dom0rpm" | cpio -idm --quiet) &&
        man_silent "$x"/usr/share/man/man8/*.gz
}
check "man --warnings -l is silent on the dom0 package's page" dom0_man

# --- metadata ---------------------------------------------------------------------
deb_field() { dpkg-deb -f "$deb" "$1" 2>/dev/null; }
field_is() { [ "$(deb_field "$1")" = "$2" ] || { echo "$1: $(deb_field "$1")"; return 1; }; }
field_has() { grep -qF -- "$2" <<<"$(deb_field "$1")" || { echo "$1: $(deb_field "$1")"; return 1; }; }
maintainer=$(dpkg-parsechangelog -l packaging/debian/changelog -S Maintainer)
check "deb Package: autoattach" field_is Package autoattach
check "deb Version: $version-1" field_is Version "$version-1"
check "deb Architecture: $arch" field_is Architecture "$arch"
check "deb Maintainer: the changelog's ($maintainer)" field_is Maintainer "$maintainer"
for dep in "systemd" "procps" "qubes-core-agent," "qubes-core-qrexec," "qubesdb"; do
    check "deb Depends: $dep" field_has Depends "$dep"
done
no_libc_dep() { ! grep -q libc6 <<<"$(deb_field Depends)"; }
check "deb Depends: no libc6 (the binary is static)" no_libc_dep
check "deb Recommends: qubes-usb-proxy" field_is Recommends qubes-usb-proxy
deb_control() { dpkg-deb -I "$deb" "$1" 2>/dev/null; }
check "deb conffiles: /etc/autoattach/rules.d/README" grep -qxF /etc/autoattach/rules.d/README <(deb_control conffiles)
md5_ok() { deb_control md5sums >"$scratch/md5sums" && (cd "$scratch/deb-x" && md5sum --quiet -c "$scratch/md5sums"); }
check "deb md5sums match the files" md5_ok
changelog_ok() { zcat "$scratch/deb-x/usr/share/doc/autoattach/changelog.Debian.gz" | cmp - packaging/debian/changelog; }
check "deb changelog.Debian.gz is packaging/debian/changelog" changelog_ok

rpm_q() { rpm -qp "$@" 2>/dev/null; }
check "rpm Name, Version, License" grep -qx "autoattach $version GPL-2.0-or-later" \
    <(rpm_q --qf '%{NAME} %{VERSION} %{LICENSE}\n' "$rpm")
for dep in qubes-core-agent qubes-core-agent-qrexec qubes-db systemd /usr/bin/kill shadow-utils; do
    check "rpm Requires: $dep" grep -qxF -- "$dep" <(rpm_q -R "$rpm")
done
no_libc_req() { ! rpm_q -R "$rpm" | grep -q 'libc\.so'; }
check "rpm Requires: no libc.so (the binary is static)" no_libc_req
check "rpm Recommends: qubes-usb-proxy" grep -qxF qubes-usb-proxy <(rpm_q --recommends "$rpm")
check "rpm config file: /etc/autoattach/rules.d/README" grep -qxF /etc/autoattach/rules.d/README <(rpm_q -c "$rpm")
check "rpm %changelog: $version-1 by $maintainer" grep -qF "$maintainer - $version-1" <(rpm_q --changelog "$rpm")
check "dom0 rpm: noarch, GPL-2.0-or-later" grep -qx "autoattach-dom0 noarch GPL-2.0-or-later" \
    <(rpm_q --qf '%{NAME} %{ARCH} %{LICENSE}\n' "$dom0rpm")
for f in /etc/qubes/autoattach.conf /etc/qubes/policy.d/30-autoattach.policy; do
    check "dom0 rpm: $f is %config(noreplace)" grep -qx "$f noreplace" \
        <(rpm_q --qf '[%{FILENAMES} %{FILEFLAGS:fflags}\n]' "$dom0rpm" | sed 's/ c*n$/ noreplace/')
done
for dep in qubes-core-admin-client qubes-core-qrexec-dom0 qubes-db util-linux; do
    check "dom0 rpm Requires: $dep" grep -qxF -- "$dep" <(rpm_q -R "$dom0rpm")
done
allowlist_commented() { ! rpm2cpio "$dom0rpm" | cpio -i --quiet --to-stdout ./etc/qubes/autoattach.conf | grep -v '^[[:space:]]*#' | grep -q '[^[:space:]]'; }
check "dom0 rpm: the allowlist has no active entry" allowlist_commented

# --- linters ----------------------------------------------------------------------
echo "#    lintian -I -E --pedantic --show-overrides $deb:"
lintian -I -E --pedantic --show-overrides "$deb" >"$scratch/lintian.out" 2>&1
grep -v 'running with root privileges' "$scratch/lintian.out" | show
lintian_clean() { ! grep -E '^[EW]: ' "$scratch/lintian.out"; }
check "lintian: no error, no warning" lintian_clean
lintian_reasons() { # every override in the package has a comment (its reason) just above it
    awk '/^#/ { c = 1; next } /^$/ { c = 0; next } { if (!c) { print "no reason: " $0; bad = 1 } }
        END { exit bad }' packaging/debian/lintian-overrides
}
check "lintian overrides each carry a reason" lintian_reasons

echo "#    rpmlint $RPMLINT_VERSION, Fedora's configuration, packaging/rpm/autoattach.rpmlintrc:"
fedora_rpmlint "$rpm" "$dom0rpm" >"$scratch/rpmlint.out" 2>&1
sed -n '/^checks:/,$p' "$scratch/rpmlint.out" | show
fedora_clean() { ! grep -E ': E: ' "$scratch/rpmlint.out" && grep -q ' 0 errors' "$scratch/rpmlint.out"; }
check "rpmlint (Fedora's checks): no error" fedora_clean

# Debian's rpmlint runs its own defaults, not Fedora's: the errors it reports that Fedora's
# does not are false positives for a Fedora package (packaging/README.md). Any other error fails.
echo "#    Debian's rpmlint ($(rpmlint --version 2>/dev/null)), its default configuration:"
rpmlint "$rpm" "$dom0rpm" >"$scratch/rpmlint-debian.out" 2>&1
sed -n '/^checks:/,$p' "$scratch/rpmlint-debian.out" | show
debian_known() {
    grep -E ': E: ' "$scratch/rpmlint-debian.out" |
        grep -vE ': E: (no-signature|no-packager-tag|no-group-tag)$|: E: statically-linked-binary /usr/bin/autoattach$'
    return 0
}
check "Debian's rpmlint: no error beyond the listed false positives" test -z "$(debian_known)"

# --- maintainer scripts: debhelper's, block for block ------------------------------
# debhelper generates the scripts for a package with this unit and sysusers file (as
# dh_installsystemd and dh_installsysusers with compat 13 defaults would), and every block it
# writes must appear in ours, verbatim and in the same order.
dh=$scratch/dh
mkdir -p "$dh/debian/autoattach/lib/systemd/system" "$dh/debian/autoattach/usr/lib/sysusers.d"
printf 'Source: autoattach\nMaintainer: %s\nBuild-Depends: debhelper-compat (= 13)\n\nPackage: autoattach\nArchitecture: any\nDescription: x\n x\n' \
    "$maintainer" >"$dh/debian/control"
cp packaging/debian/changelog "$dh/debian/changelog"
cp "$UNIT" "$dh/debian/autoattach/lib/systemd/system/autoattach.service"
cp packaging/autoattach.sysusers "$dh/debian/autoattach/usr/lib/sysusers.d/autoattach.conf"
(cd "$dh" && dh_installsystemd -pautoattach && dh_installsysusers -pautoattach && dh_installdeb -pautoattach) \
    >"$scratch/dh.log" 2>&1
# script_body FILE: the commands of a maintainer script, without its comments (debhelper's
# markers, our explanations), blank lines, shebang, `set -e` and the final `exit 0`.
script_body() { grep -vE '^(#|$|set -e$|exit 0$)' "$1"; }
same_script() { # same_script NAME: ours runs exactly debhelper's commands, in its order
    local gen=$dh/debian/autoattach/DEBIAN/$1
    [ -f "$gen" ] || { echo "debhelper wrote no $1: $(cat "$scratch/dh.log")"; return 1; }
    diff -u <(script_body "$gen") <(script_body "packaging/debian/$1")
}
for s in postinst prerm postrm; do check "deb $s: debhelper's commands, verbatim and in order" same_script "$s"; done

# --- maintainer scripts, run for real with stub commands ---------------------------
# A private mount namespace gets its own /run: without /run/systemd/system (a template
# being built in a chroot) and with it (a running qube), and its own /usr/lib/systemd
# holding a stub systemd-update-helper (Fedora's, which the rpm scriptlets call by path).
# The stubs log their calls; `getent` finds nobody, `was-enabled` says yes.
stubs=$scratch/stubs
mkdir -p "$stubs"
for cmd in systemctl systemd-sysusers deb-systemd-helper deb-systemd-invoke getent groupadd useradd \
    systemd-update-helper; do
    # shellcheck disable=SC2016 # $* and $STUB_LOG belong to the stub, not to us
    printf '#!/bin/sh\necho "%s $*" >>"$STUB_LOG"\n' "$cmd" >"$stubs/$cmd"
    [ "$cmd" = getent ] && echo 'exit 2' >>"$stubs/$cmd"
    chmod 0755 "$stubs/$cmd"
done
dpkg-deb -e "$deb" "$scratch/DEBIAN" 2>/dev/null
for s in PREIN POSTIN PREUN POSTUN; do rpm_q --qf "%{$s}\n" "$rpm" >"$scratch/rpm.$s"; done
# run_script SYSTEMD(yes|no) SCRIPT ARGS...: prints the stub calls the script made.
run_script() {
    local running=$1 script=$2
    shift 2
    : >"$scratch/stub.log"
    # shellcheck disable=SC2016 # the inner script expands its own arguments
    STUB_LOG="$scratch/stub.log" STUBS=$stubs PATH="$stubs:$PATH" unshare -m sh -c '
        mount -t tmpfs tmpfs /run || exit 99
        mount -t tmpfs tmpfs /usr/lib/systemd || exit 99
        cp "$STUBS/systemd-update-helper" /usr/lib/systemd/ || exit 99
        [ "$0" = yes ] && mkdir -p /run/systemd/system
        shift
        exec sh -e "$@"' "$running" _ "$script" "$@" \
        </dev/null >/dev/null 2>&1 || echo "exit $?"
    cat "$scratch/stub.log"
}
# expect_calls DESCRIPTION WANT DONT_WANT SYSTEMD SCRIPT ARGS...: WANT and DONT_WANT are
# blank-separated calls with _ for a blank inside one.
expect_calls() {
    local desc=$1 want=$2 dont=$3
    shift 3
    local calls w missing=
    calls=$(run_script "$@")
    for w in $want; do grep -qF -- "${w//_/ }" <<<"$calls" || missing="$missing $w"; done
    for w in $dont; do grep -qF -- "${w//_/ }" <<<"$calls" && missing="$missing !$w"; done
    if [ -z "$missing" ]; then ok "$desc"; else bad "$desc" "wanted/unwanted:$missing; calls: $(tr '\n' ';' <<<"$calls")"; fi
}
D=$scratch/DEBIAN
expect_calls "deb postinst, first install, systemd running: user, enable, daemon-reload, start" \
    "systemd-sysusers_autoattach.conf deb-systemd-helper_enable_autoattach.service systemctl_--system_daemon-reload deb-systemd-invoke_start_autoattach.service" \
    "restart" yes "$D/postinst" configure ""
expect_calls "deb postinst, upgrade, systemd running: restart, not start" \
    "systemd-sysusers deb-systemd-invoke_restart_autoattach.service" "invoke_start" yes "$D/postinst" configure "0.0.1-1"
expect_calls "deb postinst, template build (no systemd running): user and enable only" \
    "systemd-sysusers_autoattach.conf deb-systemd-helper_enable_autoattach.service" \
    "daemon-reload deb-systemd-invoke" no "$D/postinst" configure ""
expect_calls "deb prerm remove, systemd running: stop" "deb-systemd-invoke_stop_autoattach.service" "" yes "$D/prerm" remove
expect_calls "deb prerm upgrade: nothing (postinst restarts)" "" "stop" yes "$D/prerm" upgrade "$version-1"
expect_calls "deb postrm remove, systemd running: daemon-reload" "systemctl_--system_daemon-reload" "purge" yes "$D/postrm" remove
expect_calls "deb postrm purge: deb-systemd-helper purge" "deb-systemd-helper_purge_autoattach.service" "" no "$D/postrm" purge
expect_calls "rpm %pre: group and user autoattach, as Fedora's %sysusers_create_compat" \
    "groupadd_-r_autoattach useradd_-r_-g_autoattach_-d_/_-s_/usr/sbin/nologin" "" no "$scratch/rpm.PREIN" 1
expect_calls "rpm %post, install: systemd-update-helper install-system-units (preset)" \
    "systemd-update-helper_install-system-units_autoattach.service" "" no "$scratch/rpm.POSTIN" 1
expect_calls "rpm %post, upgrade: nothing" "" "systemd-update-helper" yes "$scratch/rpm.POSTIN" 2
expect_calls "rpm %preun, erase: remove-system-units" "systemd-update-helper_remove-system-units_autoattach.service" "" yes "$scratch/rpm.PREUN" 0
expect_calls "rpm %preun, upgrade: nothing" "" "systemd-update-helper" yes "$scratch/rpm.PREUN" 1
expect_calls "rpm %postun, upgrade: mark-restart-system-units" \
    "systemd-update-helper_mark-restart-system-units_autoattach.service" "" yes "$scratch/rpm.POSTUN" 1
expect_calls "rpm %postun, erase: nothing" "" "systemd-update-helper" yes "$scratch/rpm.POSTUN" 0

# --- Salt -------------------------------------------------------------------------
echo "#    salt/test.sh:"
if bash salt/test.sh >"$scratch/salt.out" 2>&1; then ok "the Salt formula renders as expected ($(tail -n 1 "$scratch/salt.out"))"
else bad "the Salt formula renders as expected" "$(grep -A30 '^FAIL' "$scratch/salt.out")"; fi
show <"$scratch/salt.out"

echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
