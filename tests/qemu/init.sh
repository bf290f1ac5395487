#!/bin/sh
# PID 1 of the qemu test's guest (tests/qemu.rs builds it into the initramfs as /init).
# Mounts, loads the modules listed in /modules/order (modules.dep order, with parameters),
# then obeys the serial console: each line is `SEQ COMMAND`, the answer is COMMAND's output
# followed by `__DONE_SEQ_STATUS__` on a line of its own. Echo is off so the host reads only
# output, and the console log level is 1 so kernel messages do not interleave (see dmesg).
# Commands run in this shell, so background jobs can be `wait`ed for later.
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /tmp /run
echo "1 4 1 3" >/proc/sys/kernel/printk
while read -r mod args; do
	# shellcheck disable=SC2086 # $args holds zero or more parameters
	insmod "/modules/$mod" $args || echo "init: insmod $mod failed"
done </modules/order
stty -echo
echo __BOOTED__
while IFS= read -r line; do
	seq=${line%% *}
	eval "${line#* }" </dev/null
	printf '\n__DONE_%s_%s__\n' "$seq" "$?"
done
poweroff -f
