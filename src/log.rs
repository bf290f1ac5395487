//! Logging to stderr, one line per message, for people and for journald.
//!
//! Under systemd (JOURNAL_STREAM set) each line starts with an sd-daemon `<N>` priority so
//! the journal records its level; otherwise lines read `autoattach: warning: ...`. A line is
//! formatted into a stack buffer and written with one `write`, so lines from threads never
//! interleave and logging allocates nothing.
//!
//! Device-provided bytes (serials, product strings, names) are printed through [`Escaped`],
//! which turns anything outside printable ASCII into `\xNN`: a hostile device cannot forge
//! log lines or terminal escapes.

use std::fmt::{self, Write as _};
use std::io::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum Level {
    Error = 3,
    Warning = 4,
    Notice = 5,
    Info = 6,
    Debug = 7,
}

impl Level {
    fn label(self) -> &'static str {
        match self {
            Level::Error => "error: ",
            Level::Warning => "warning: ",
            Level::Notice | Level::Info => "",
            Level::Debug => "debug: ",
        }
    }
}

static MAX_LEVEL: AtomicU8 = AtomicU8::new(Level::Info as u8);
static JOURNAL: AtomicBool = AtomicBool::new(false);

/// Sets the most verbose level printed, and whether to use journald's `<N>` prefixes.
pub fn init(max: Level) {
    MAX_LEVEL.store(max as u8, Ordering::Relaxed);
    JOURNAL.store(std::env::var_os("JOURNAL_STREAM").is_some(), Ordering::Relaxed);
}

pub fn enabled(level: Level) -> bool {
    level as u8 <= MAX_LEVEL.load(Ordering::Relaxed)
}

/// Writes one line at `level`. Use the macros.
pub fn write(level: Level, args: fmt::Arguments<'_>) {
    if !enabled(level) {
        return;
    }
    let mut line = Line { buf: [0; 2048], len: 0 };
    if JOURNAL.load(Ordering::Relaxed) {
        let _ = write!(line, "<{}>", level as u8);
    } else {
        let _ = write!(line, "autoattach: {}", level.label());
    }
    let _ = line.write_fmt(args);
    line.finish();
    let _ = std::io::stderr().lock().write_all(&line.buf[..line.len]);
}

/// A fixed line buffer that truncates instead of growing.
struct Line {
    buf: [u8; 2048],
    len: usize,
}

impl Line {
    fn finish(&mut self) {
        if self.len == self.buf.len() {
            self.len -= 4;
            self.buf[self.len..self.len + 3].copy_from_slice(b"...");
            self.len += 3;
        }
        self.buf[self.len] = b'\n';
        self.len += 1;
    }
}

impl fmt::Write for Line {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let room = self.buf.len() - self.len;
        let n = s.len().min(room);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        if n < s.len() { Err(fmt::Error) } else { Ok(()) }
    }
}

#[macro_export]
macro_rules! error {
    ($($t:tt)*) => { $crate::log::write($crate::log::Level::Error, format_args!($($t)*)) };
}
#[macro_export]
macro_rules! warning {
    ($($t:tt)*) => { $crate::log::write($crate::log::Level::Warning, format_args!($($t)*)) };
}
#[macro_export]
macro_rules! notice {
    ($($t:tt)*) => { $crate::log::write($crate::log::Level::Notice, format_args!($($t)*)) };
}
#[macro_export]
macro_rules! info {
    ($($t:tt)*) => { $crate::log::write($crate::log::Level::Info, format_args!($($t)*)) };
}
#[macro_export]
macro_rules! debug {
    ($($t:tt)*) => { $crate::log::write($crate::log::Level::Debug, format_args!($($t)*)) };
}

/// Bytes from a device, printed safely: printable ASCII as is (with `\` and `"` escaped),
/// everything else as `\xNN`.
#[derive(Clone, Copy, Debug)]
pub struct Escaped<'a>(pub &'a [u8]);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for &b in self.0 {
            match b {
                b'\\' => f.write_str("\\\\")?,
                b'"' => f.write_str("\\\"")?,
                0x20..=0x7e => f.write_char(b as char)?,
                _ => write!(f, "\\x{b:02x}")?,
            }
        }
        Ok(())
    }
}

impl<'a> Escaped<'a> {
    /// A device-derived `&str` (a devpath, a name from an event), escaped the same way.
    pub fn str(s: &'a str) -> Escaped<'a> {
        Escaped(s.as_bytes())
    }
}

/// A warning that a sender outside our control (the kernel on a device's behalf, a local
/// process) can cause at will: the first is logged with its detail, the next ones within the
/// window only counted, then summarised once per window. The caller owns the clock (ms).
#[derive(Clone, Debug, Default)]
pub struct RateLimited {
    /// Counted since the last line, not logged.
    pending: u64,
    /// When the next summary may be written (None: the next warning is logged at once).
    next: Option<u64>,
}

impl RateLimited {
    /// The window between two lines of the same warning.
    pub const WINDOW_MS: u64 = 10_000;

    /// A warning happened at `now`: true if it is to be logged now (the caller writes the
    /// detailed line), false if it was only counted.
    pub fn note(&mut self, now: u64) -> bool {
        match self.next {
            None => {
                self.next = Some(now + Self::WINDOW_MS);
                true
            }
            Some(_) => {
                self.pending += 1;
                false
            }
        }
    }

    /// When [`RateLimited::summary`] has something to say, for the loop's timer.
    pub fn next_report(&self) -> Option<u64> {
        self.next.filter(|_| self.pending > 0)
    }

    /// At or after [`RateLimited::next_report`]: how many were counted since the last line (to
    /// log as one summary), or None; the window starts again.
    pub fn summary(&mut self, now: u64) -> Option<u64> {
        match self.next {
            Some(at) if at <= now && self.pending > 0 => {
                let n = std::mem::take(&mut self.pending);
                self.next = Some(now + Self::WINDOW_MS);
                Some(n)
            }
            Some(at) if at <= now => {
                self.next = None;
                None
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_everything_a_device_could_abuse() {
        let hostile = b"a\"b\\c\nd\x1b[31me\xff$(rm -rf /)";
        assert_eq!(Escaped(hostile).to_string(), "a\\\"b\\\\c\\x0ad\\x1b[31me\\xff$(rm -rf /)");
    }

    #[test]
    fn rate_limited_warnings_log_once_then_summarise() {
        let mut r = RateLimited::default();
        assert!(r.note(0));
        assert!(!r.note(1) && !r.note(2));
        assert_eq!(r.next_report(), Some(RateLimited::WINDOW_MS));
        assert_eq!(r.summary(5), None, "not before the window ends");
        assert_eq!(r.summary(RateLimited::WINDOW_MS), Some(2));
        assert_eq!(r.summary(3 * RateLimited::WINDOW_MS), None);
        assert!(r.note(3 * RateLimited::WINDOW_MS + 1), "a quiet window later, the next one is logged");
        assert_eq!(Escaped::str("a\u{202e}b\n").to_string(), "a\\xe2\\x80\\xaeb\\x0a");
    }

    #[test]
    fn long_lines_are_cut_not_grown() {
        let mut line = Line { buf: [0; 2048], len: 0 };
        let long = "x".repeat(5000);
        assert!(write!(line, "{long}").is_err());
        line.finish();
        assert_eq!(line.len, 2048);
        assert!(line.buf[..line.len].ends_with(b"...\n"));
    }
}
