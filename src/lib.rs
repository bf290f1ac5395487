//! autoattach: attach trusted USB devices from the Qubes OS USB qube to a chosen qube.
//!
//! Read top to bottom: the kernel's event format ([`uevent`]), the socket it arrives on
//! ([`netlink`]), the device tree it describes ([`sysfs`]), globs ([`fnmatch`]) and the rules
//! that pick devices ([`rules`]), the names that may reach dom0 ([`names`]), readiness
//! ([`readiness`], with Qubes' publication read from [`qubesdb`]), detached children
//! ([`spawn`]), the decisions ([`engine`]) and the loop that drives them ([`runloop`]),
//! fixtures ([`umockdev`], [`replay`]), exit codes ([`exit`]) and the command line ([`cli`]). `main.rs` only calls
//! [`cli::main`]; only `main.rs` may exit the process (`clippy::exit` is denied here).

#![deny(clippy::exit)]

#[macro_use]
pub mod log;

pub mod beneath;
pub mod cli;
pub mod engine;
pub mod exit;
pub mod fnmatch;
pub mod identity;
pub mod names;
pub mod netlink;
pub mod qubesdb;
pub mod readiness;
pub mod replay;
pub mod rules;
pub mod runloop;
pub mod spawn;
pub mod sysfs;
pub mod uevent;
pub mod umockdev;

#[cfg(test)]
pub(crate) mod testing;
