#!/bin/sh
# Helpers inside the qemu test's guest (/bin/aa): waits and sysfs look-ups the host asks for.
# Waits poll every 0.1 s at most TENTHS times and exit 1 when that runs out.
# aa wait-lines FILE N TENTHS     until FILE has at least N lines
# aa wait-grep FILE TEXT TENTHS   until a line of FILE contains TEXT
# aa wait-gone PATH TENTHS        until PATH does not exist
# aa wait-part SERIAL TENTHS      until the stick with SERIAL has a partition; print its name
# aa usb-of SERIAL                bus id of the USB device with SERIAL
# aa wait-exit PID TENTHS         until PID is gone or a zombie
lines() { if [ -f "$1" ]; then wc -l <"$1"; else echo 0; fi; }
part_of() {
	for p in /sys/class/block/*; do
		[ -f "$p/partition" ] || continue
		d=$(readlink -f "$p")
		while [ "${#d}" -gt 4 ]; do
			if [ -f "$d/idVendor" ]; then
				[ "$(cat "$d/serial" 2>/dev/null)" = "$1" ] && echo "${p##*/}"
				break
			fi
			d=${d%/*}
		done
	done
}
gone() { [ ! -e "/proc/$1" ] || grep -q '^State:.*Z' "/proc/$1/status" 2>/dev/null; }
tick() { i=$((i + 1)); [ "$i" -le "$1" ] || exit 1; sleep 0.1; }
i=0
case $1 in
wait-lines) while [ "$(lines "$2")" -lt "$3" ]; do tick "$4"; done ;;
wait-grep) until grep -qF -- "$3" "$2" 2>/dev/null; do tick "$4"; done ;;
wait-gone) while [ -e "$2" ]; do tick "$3"; done ;;
wait-part)
	until part="$(part_of "$2")" && [ -n "$part" ]; do tick "$3"; done
	echo "$part" ;;
usb-of)
	for d in /sys/bus/usb/devices/*; do
		[ -f "$d/idVendor" ] && [ "$(cat "$d/serial" 2>/dev/null)" = "$2" ] && echo "${d##*/}"
	done
	true ;;
wait-exit) until gone "$2"; do tick "$3"; done ;;
*) echo "aa: unknown $1" >&2; exit 2 ;;
esac
