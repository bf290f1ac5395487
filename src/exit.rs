//! Exit codes: the agent's own, and what the exit status of a call to dom0 means.
//!
//! Two tables, each written once here: [`CODES`] for `autoattach`'s own exit status, and
//! [`CALLS`] for the exit status of `qrexec-client-vm dom0 custom.USBDeviceAttach+...`,
//! which the agent logs with its meaning. `--help` prints the first; the log uses the
//! second. `tests/docs.rs` checks that README.md, the man pages and the dom0 handler's
//! header (`dom0/custom.USBDeviceAttach`, lines `#   NN  meaning`) say the same.
//!
//! Every failure that ends the program is a [`Failure`]: what to print and which code.
//! Only `main.rs` turns it into the process's exit status.

use std::fmt;

/// Success; for `test`, a rule matches the device.
pub const SUCCESS: u8 = 0;
/// `test`: no rule matches the device (or, with `--action remove`, nothing would be attached).
pub const NO_MATCH: u8 = 1;
/// The command line is wrong.
pub const USAGE: u8 = 2;
/// The rules have errors (the agent does not start; systemd does not restart it).
pub const RULES: u8 = 3;
/// Could not start, or a fatal error while running.
pub const FATAL: u8 = 4;
/// Input not found or unreadable.
pub const INPUT: u8 = 5;

/// The agent's exit codes and their meanings, as `--help`, the man page and README.md show.
pub const CODES: [(u8, &str); 6] = [
    (SUCCESS, "success (test: a rule matches)"),
    (NO_MATCH, "test: no rule matches the device"),
    (USAGE, "usage error"),
    (RULES, "the rules have errors"),
    (FATAL, "could not start, or a fatal error while running (uevent socket, signals, sysfs, poll)"),
    (INPUT, "input not found or unreadable (device, fixture, events)"),
];

/// The meaning of one of the agent's exit codes.
pub fn meaning(code: u8) -> Option<&'static str> {
    CODES.iter().find(|(c, _)| *c == code).map(|(_, m)| *m)
}

/// Why the program stops: the message to print and the exit code.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    pub code: u8,
    pub message: String,
}

impl Failure {
    pub fn new(code: u8, message: impl Into<String>) -> Failure {
        Failure { code, message: message.into() }
    }

    /// A usage error; the message says where to read more.
    pub fn usage(message: impl fmt::Display) -> Failure {
        Failure::new(USAGE, format!("{message}; see `autoattach --help`"))
    }

    pub fn rules(message: impl Into<String>) -> Failure {
        Failure::new(RULES, message)
    }

    pub fn fatal(message: impl Into<String>) -> Failure {
        Failure::new(FATAL, message)
    }

    pub fn input(message: impl Into<String>) -> Failure {
        Failure::new(INPUT, message)
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Failure {}

// ---------------------------------------------------------------------------------------------
// Calls

/// Who gives an exit status of a call its meaning.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum By {
    /// The dom0 handler, `dom0/custom.USBDeviceAttach` (its header lists the same codes).
    Handler,
    /// qrexec itself (qubes-core-qrexec `libqrexec/qrexec.h`, `QREXEC_EXIT_*`).
    Qrexec,
}

/// One exit status of a call and what it means.
#[derive(Clone, Copy, Debug)]
pub struct CallExit {
    pub code: i32,
    pub by: By,
    /// The meaning as its owner states it (for the handler: its header's words).
    pub text: &'static str,
    /// The line the agent logs: `text`, prefixed with who said it where that helps.
    pub logged: &'static str,
    /// An Attach that ended so attached nothing, for certain: the handler's refusals (each
    /// comes before its attach, or after undoing it), and qrexec's 126 and 127 (the service
    /// never ran). Not 125: qrexec can fail after the service ran, and the device was
    /// attached. An Attach that may have attached is undone by a Detach when the device goes
    /// (harmless when nothing is attached: the handler answers 0).
    pub attached_nothing: bool,
}

macro_rules! handler {
    ($code:literal, $text:literal) => {
        CallExit {
            code: $code,
            by: By::Handler,
            text: $text,
            logged: concat!("dom0 handler: ", $text),
            attached_nothing: true,
        }
    };
}

macro_rules! qrexec {
    ($code:literal, $attached_nothing:literal, $text:literal) => {
        CallExit {
            code: $code,
            by: By::Qrexec,
            text: $text,
            logged: concat!("qrexec: ", $text),
            attached_nothing: $attached_nothing,
        }
    };
}

/// The exit statuses of `qrexec-client-vm dom0 custom.USBDeviceAttach+...` (and Detach): the
/// dom0 handler's (IDENTITY.md §4) and qrexec's own.
pub const CALLS: [CallExit; 15] = [
    CallExit {
        code: 0,
        by: By::Handler,
        text: "attached or detached, or already in that state",
        logged: "done: attached or detached, or already in that state",
        attached_nothing: false,
    },
    handler!(
        64,
        "malformed request (caller, argument shape, encoding, installed under another name, bad test variables)"
    ),
    handler!(65, "bad qube name, or the target is dom0 or the calling qube"),
    handler!(66, "bad device name or identity (charset, shape, length)"),
    handler!(67, "the target qube does not exist"),
    handler!(68, "not allowed by the allowlist (no entry, identity not pinned by the entry, bare form not allowed)"),
    handler!(69, "the target is not running and could not, or may not, be started"),
    handler!(70, "the caller did not expose the device in time"),
    handler!(71, "the device is attached to another qube"),
    handler!(72, "qvm-block/qvm-usb attach or detach failed"),
    handler!(73, "identity mismatch: the device at DEV is not the one requested, or it cannot be verified here"),
    handler!(74, "busy: too many requests from this source in progress"),
    qrexec!(125, false, "qrexec failure (QREXEC_EXIT_PROBLEM)"),
    qrexec!(126, true, "refused by dom0's qrexec policy (QREXEC_EXIT_REQUEST_REFUSED)"),
    qrexec!(
        127,
        true,
        "the policy allows the call but dom0 has no such service: install the handler (QREXEC_EXIT_SERVICE_NOT_FOUND)"
    ),
];

/// The meaning of any other exit status of a call.
pub const CALL_OTHER: &str = "not a code of the dom0 handler or of qrexec";
/// The meaning of a call that ended on a signal.
pub const CALL_SIGNAL: &str = "qrexec-client-vm was killed by a signal";

/// What the exit status `code` of a call means, as the agent logs it.
pub fn call_meaning(code: i32) -> &'static str {
    CALLS.iter().find(|c| c.code == code).map_or(CALL_OTHER, |c| c.logged)
}

/// Whether an Attach that exited with `code` attached nothing, for certain (see
/// [`CallExit::attached_nothing`]); any code not in [`CALLS`] may come after an attach (a
/// handler killed by a signal exits 128+N).
pub fn call_attached_nothing(code: i32) -> bool {
    CALLS.iter().any(|c| c.code == code && c.attached_nothing)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_distinct_and_in_order() {
        for pair in CODES.windows(2) {
            assert!(pair[0].0 < pair[1].0, "{pair:?}");
        }
        for pair in CALLS.windows(2) {
            assert!(pair[0].code < pair[1].code, "{} then {}", pair[0].code, pair[1].code);
        }
    }

    #[test]
    fn every_handler_code_from_64_to_74_has_a_meaning() {
        for code in 64..=74 {
            let c = CALLS.iter().find(|c| c.code == code).unwrap_or_else(|| panic!("{code} missing"));
            assert_eq!(c.by, By::Handler);
            assert_eq!(call_meaning(code), format!("dom0 handler: {}", c.text));
        }
        assert!(call_meaning(0).starts_with("done"), "the logs and tests read `exit 0: done`");
        assert_eq!(call_meaning(1), CALL_OTHER);
        assert_eq!(call_meaning(-1), CALL_OTHER);
        assert_eq!(meaning(USAGE), Some("usage error"));
        assert_eq!(meaning(9), None);
    }

    #[test]
    fn usage_failures_say_where_to_read_more() {
        let f = Failure::usage("unknown option --x");
        assert_eq!((f.code, f.to_string().as_str()), (2, "unknown option --x; see `autoattach --help`"));
    }
}
