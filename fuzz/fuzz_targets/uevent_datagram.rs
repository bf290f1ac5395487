//! The kernel datagram parser: whatever arrives on the socket, `Uevent::parse` returns, and an
//! accepted event survives `to_datagram` -> `parse` unchanged, and says only what the module
//! promises (a safe devpath, values without control bytes and within the kernel's bounds).
#![no_main]

use autoattach::uevent::{MAX_VALUE, MAX_VARS, Uevent, devpath_is_safe};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(event) = Uevent::parse(data) else {
        return;
    };
    assert!(devpath_is_safe(event.devpath), "unsafe devpath accepted: {:?}", event.devpath);
    assert!(!event.subsystem.is_empty() && !event.subsystem.contains('/'));
    assert!(event.vars().len() <= MAX_VARS);
    for v in event.vars() {
        assert!(v.value.len() <= MAX_VALUE);
        assert!(!v.value.bytes().any(|b| b.is_ascii_control()), "control byte kept in {}", v.key);
        assert!(!v.key.is_empty() && v.key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'));
    }
    // What the accessors compute must not panic either.
    let _ = (event.kernel(), event.devnum(), event.media_change(), event.devtype(), event.dropped());

    let again = event.to_datagram();
    let back = Uevent::parse(&again).unwrap_or_else(|e| panic!("re-parse of {again:?} failed: {e}"));
    assert_eq!(back.vars(), event.vars());
    assert_eq!(
        (back.action, back.devpath, back.subsystem, back.seqnum),
        (event.action, event.devpath, event.subsystem, event.seqnum)
    );
    assert_eq!(back.dropped().0, 0, "to_datagram writes only kept variables");
});
