#!/bin/sh
# Helpers inside the qemu test's guest (/bin/aa): waits and sysfs look-ups the host asks for.
# Waits poll every 0.1 s at most TENTHS times and exit 1 when that runs out.
# aa wait-lines FILE N TENTHS     until FILE has at least N lines
# aa wait-grep FILE TEXT TENTHS   until a line of FILE contains TEXT
# aa wait-gone PATH TENTHS        until PATH does not exist
# aa wait-path PATH TENTHS        until PATH exists
# aa wait-part SERIAL TENTHS      until the stick with SERIAL has a partition; print its name
# aa usb-of SERIAL                bus id of the USB device with SERIAL
# aa wait-usb SERIAL TENTHS       until a USB device with SERIAL is there
# aa blocks-of SERIAL             block devices (disks, partitions) of the USB device with SERIAL
# aa wait-blocks SERIAL N TENTHS  until that USB device has at least N block devices
# aa wait-input BUSID TENTHS      until an input event device sits under the USB device BUSID
# aa record-tree OUT BUSID...     `autoattach record` of every device under each BUSID into OUT
#                                 (each with a subsystem; parents repeat, the host drops repeats)
# aa wait-exit PID TENTHS         until PID is gone or a zombie
lines() { if [ -f "$1" ]; then wc -l <"$1"; else echo 0; fi; }
# serial_above PATH: the serial of the USB device PATH (a /sys/class/block entry) sits under.
serial_above() {
	d=$(readlink -f "$1")
	while [ "${#d}" -gt 4 ]; do
		if [ -f "$d/idVendor" ]; then
			cat "$d/serial" 2>/dev/null
			return
		fi
		d=${d%/*}
	done
}
# These list what matches and succeed whatever the last entry was (callers test the output).
blocks_of() {
	for p in /sys/class/block/*; do
		[ "$(serial_above "$p")" != "$1" ] || echo "${p##*/}"
	done
}
part_of() {
	for p in /sys/class/block/*; do
		[ ! -f "$p/partition" ] || [ "$(serial_above "$p")" != "$1" ] || echo "${p##*/}"
	done
}
usb_of() {
	for d in /sys/bus/usb/devices/*; do
		[ ! -f "$d/idVendor" ] || [ "$(cat "$d/serial" 2>/dev/null)" != "$1" ] || echo "${d##*/}"
	done
}
gone() { [ ! -e "/proc/$1" ] || grep -q '^State:.*Z' "/proc/$1/status" 2>/dev/null; }
tick() { i=$((i + 1)); [ "$i" -le "$1" ] || exit 1; sleep 0.1; }
i=0
case $1 in
wait-lines) while [ "$(lines "$2")" -lt "$3" ]; do tick "$4"; done ;;
wait-grep) until grep -qF -- "$3" "$2" 2>/dev/null; do tick "$4"; done ;;
wait-gone) while [ -e "$2" ]; do tick "$3"; done ;;
wait-path) until [ -e "$2" ]; do tick "$3"; done ;;
wait-part)
	until part="$(part_of "$2")" && [ -n "$part" ]; do tick "$3"; done
	echo "$part" ;;
usb-of) usb_of "$2" ;;
wait-usb) until [ -n "$(usb_of "$2")" ]; do tick "$3"; done ;;
blocks-of) blocks_of "$2" ;;
wait-blocks) while [ "$(blocks_of "$2" | wc -l)" -lt "$3" ]; do tick "$4"; done ;;
wait-input)
	until ls -d "/sys/bus/usb/devices/$2"/*/*/input/input*/event* >/dev/null 2>&1; do tick "$3"; done ;;
record-tree)
	out=$2
	shift 2
	: >"$out"
	for busid in "$@"; do
		top=$(readlink -f "/sys/bus/usb/devices/$busid") && [ -d "$top" ] || exit 1
		# Devices without a subsystem (USB endpoints) send no uevents and are left out.
		find "$top" -name uevent | sort | while read -r u; do
			[ -e "${u%/uevent}/subsystem" ] || continue
			/harness/autoattach record "${u%/uevent}" || exit 1
		done >>"$out" || exit 1
	done ;;
wait-exit) until gone "$2"; do tick "$3"; done ;;
*) echo "aa: unknown $1" >&2; exit 2 ;;
esac
