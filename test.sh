#!/usr/bin/env bash
# The whole test suite: what CI runs (.ci/run calls this), and what to run before a commit.
#
# Run as root on Debian 12 (a fresh machine is fine): it installs the Debian packages it needs,
# makes real devices (loop, zram, namespaces), boots a Debian kernel under qemu for real USB
# hotplug, builds the packages, and fuzzes for a bounded time. AUTOATTACH_FULL=1 is set, so a
# test that cannot run here fails instead of skipping.
#
#   ./test.sh              everything
#   FUZZ_SECONDS=N ./test.sh   fuzz each target N seconds (default 60; 0 only builds them)
#
# Exit status: 0 if every step passed; otherwise the first failing step's status.
set -euo pipefail
cd "$(dirname "$0")"
export AUTOATTACH_FULL=1 CARGO_TERM_COLOR=never LC_ALL=C.UTF-8
FUZZ_SECONDS=${FUZZ_SECONDS:-60}
start=$SECONDS

step() {
    printf '\n==> %s  (t=%ds)\n' "$*" $((SECONDS - start))
}

if [ "$(id -u)" != 0 ]; then
    echo "test.sh: run as root: it installs packages and makes real devices" >&2
    exit 1
fi

step "Debian packages"
need=(build-essential util-linux iproute2 kmod udev systemd shellcheck rpm python3 dash umockdev scdoc man-db bash-completion zsh fish)
missing=()
for p in "${need[@]}"; do
    [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" = "install ok installed" ] || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing: ${missing[*]}"
    apt-get -o DPkg::Lock::Timeout=600 update -qq
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}"
fi

step "format, lints, docs"
cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --locked

step "unit, fixture, allocation and real-kernel tests"
tests=()
for t in tests/*.rs; do
    name=$(basename "$t" .rs)
    [ "$name" = qemu ] || tests+=(--test "$name")
done
cargo test --locked --lib --bins
cargo test --locked --doc
cargo test --locked "${tests[@]}"

step "dom0 handler (stand-in qvm-* tools)"
bash tests/dom0/run.sh

step "packaging: unit verify and security score, .deb and .rpm"
bash packaging/test.sh

step "packaging: the unit run by a throwaway systemd"
bash packaging/sandbox-test.sh

step "real USB hotplug under qemu"
cargo test --locked --test qemu -- --test-threads=1 --nocapture

if [ -x fuzz/run.sh ]; then
    step "fuzzing (${FUZZ_SECONDS}s per target)"
    fuzz/run.sh "$FUZZ_SECONDS"
fi

step "benchmarks build"
cargo bench --locked --no-run

printf '\nall tests passed in %ds\n' $((SECONDS - start))
