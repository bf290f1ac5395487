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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_everything_a_device_could_abuse() {
        let hostile = b"a\"b\\c\nd\x1b[31me\xff$(rm -rf /)";
        assert_eq!(Escaped(hostile).to_string(), "a\\\"b\\\\c\\x0ad\\x1b[31me\\xff$(rm -rf /)");
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
