#!/usr/bin/env bash
# Fuzzes every cargo-fuzz target of this directory for a bounded time, one after the other.
#
#   fuzz/run.sh [SECONDS]    SECONDS per target (default 60; 0 only builds the targets)
#
# Installs cargo-fuzz if it is missing, builds the targets on the stable toolchain (no
# sanitizer: AddressSanitizer needs nightly; libFuzzer's coverage guidance works without it),
# seeds each corpus from the fixtures, and prints per target the inputs executed and the
# crashes found. Exits non-zero if any target crashed, hung or failed to run; the input that
# did it is in fuzz/artifacts/TARGET/, and the log tells how to replay it.
set -euo pipefail
seconds=${1:-60}
case $seconds in '' | *[!0-9]*) echo "usage: $0 [SECONDS]" >&2; exit 2 ;; esac
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
cd "$here"
export PATH="$HOME/.cargo/bin:$PATH"
targets=(uevent_datagram monitor_text umockdev_recording rules_parse rules_match)
# Same flags for build and run, so `cargo fuzz run` does not rebuild: no sanitizer (stable),
# debug assertions and overflow checks on (they turn silent wrong answers into crashes).
flags=(-s none --debug-assertions)

if ! cargo fuzz --version >/dev/null 2>&1; then
	echo "installing cargo-fuzz"
	cargo install cargo-fuzz --locked
fi
nice -n 19 cargo fuzz build "${flags[@]}"
[ "$seconds" -gt 0 ] || { echo "fuzz targets built (0 s: not run)"; exit 0; }

seeds=$(mktemp -d)
trap 'rm -rf "$seeds"' EXIT

# datagrams EVENTS DIR: each event block of a `udevadm monitor --property` capture, as the
# kernel datagram it came from (ACTION@DEVPATH, then KEY=VALUE, each NUL-terminated).
datagrams() {
	local events=$1 dir=$2 n=0 header='' line
	local -a vars=()
	flush() {
		[ -n "$header" ] || return 0
		{
			printf '%s\0' "$header"
			[ ${#vars[@]} -eq 0 ] || printf '%s\0' "${vars[@]}"
		} >"$dir/$(basename "$(dirname "$events")")-$n"
		n=$((n + 1)) header='' vars=()
	}
	while IFS= read -r line || [ -n "$line" ]; do
		line=${line%$'\r'}
		if [[ $line == KERNEL\[* ]]; then
			flush
			read -r action devpath _ <<<"${line#*]}"
			header="$action@$devpath"
		elif [ -z "$line" ]; then
			flush
		elif [ -n "$header" ] && [[ $line == *=* ]]; then
			vars+=("$line")
		fi
	done <"$events"
	flush
}

for t in "${targets[@]}"; do mkdir -p "$seeds/$t"; done
for events in "$root"/tests/fixtures/*/events; do
	cp "$events" "$seeds/monitor_text/$(basename "$(dirname "$events")")"
	datagrams "$events" "$seeds/uevent_datagram"
done
for rules in "$root"/tests/fixtures/*/rules "$root"/examples/*.rules "$root"/packaging/examples/*.rules; do
	[ -f "$rules" ] && cp "$rules" "$seeds/rules_parse/$(basename "$(dirname "$rules")")-$(basename "$rules")"
done
for rec in "$root"/tests/fixtures/*/*.umockdev; do
	cp "$rec" "$seeds/umockdev_recording/$(basename "$(dirname "$rec")")"
done

failed=0
printf '\n%-20s %12s %8s  %s\n' target executions crashes result
for t in "${targets[@]}"; do
	log=$here/artifacts/$t.log
	mkdir -p "$here/artifacts/$t" "$here/corpus/$t"
	before=$(find "$here/artifacts/$t" -type f | wc -l)
	status=0
	nice -n 19 cargo fuzz run "${flags[@]}" "$t" "$here/corpus/$t" "$seeds/$t" -- \
		-max_total_time="$seconds" -timeout=10 -print_final_stats=1 >"$log" 2>&1 || status=$?
	execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
	crashes=$(($(find "$here/artifacts/$t" -type f | wc -l) - before))
	if [ "$status" -ne 0 ] && [ "$crashes" -eq 0 ]; then crashes=1; fi
	if [ "$status" -eq 0 ]; then
		result=ok
	else
		result="FAILED (exit $status; log: ${log#"$root"/})"
		failed=1
	fi
	printf '%-20s %12s %8s  %s\n' "$t" "${execs:-?}" "$crashes" "$result"
	if [ "$status" -ne 0 ]; then
		grep -E -m 20 "panicked|assertion|ERROR|Test unit written|reproduce" "$log" | sed 's/^/    /' || :
	fi
done
exit "$failed"
