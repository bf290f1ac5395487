//! autoattach: attach trusted USB devices from the Qubes OS USB qube to a chosen qube.
//!
//! Read top to bottom: the kernel's event format ([`uevent`]), the socket it arrives on
//! ([`netlink`]), the device tree it describes ([`sysfs`]), the rules that pick devices
//! ([`rules`]), the names that may reach dom0 ([`names`]), readiness ([`readiness`]),
//! detached children ([`spawn`]), and the loop that joins them ([`agent`]).

pub mod fnmatch;
pub mod uevent;
#[macro_use]
pub mod log;
pub mod names;
pub mod netlink;
pub mod readiness;
pub mod rules;
pub mod spawn;
pub mod sysfs;
#[cfg(test)]
pub(crate) mod testing;
