//! Rules: udev's matching syntax, with one action, `ATTACH="qube"`.
//!
//! ```text
//! # The seed recipe's udev rule, ported by changing its action:
//! SUBSYSTEM=="block", ENV{DEVTYPE}=="partition", ATTRS{idVendor}=="0781", \
//!   ATTRS{serial}=="4C530001230101115543", ATTACH="backup"
//! ```
//!
//! The language is udev's as systemd's `src/udev/udev-rules.c` reads and matches it (systemd
//! main at commit 0052418bf8a2a93b0ac83e42b90d591a03ddcb26; values as sd-device presents them,
//! `src/libsystemd/sd-device/`), for the match keys that make sense without udev's database:
//! - keys ACTION, DEVPATH, KERNEL, SUBSYSTEM, DRIVER, ENV{K}, ATTR{f} test the event device;
//!   KERNELS, SUBSYSTEMS, DRIVERS, ATTRS{f} test it or an ancestor, and all of a rule's
//!   parent keys must hold on ONE device, walking up from the event device;
//! - `==` and `!=`; a pattern is a glob ([`crate::fnmatch`], `*` crosses `/`) or a plain
//!   string, with `|` alternatives, where an empty alternative matches an empty value;
//!   `"?*"` means "not empty"; `i"..."` matches case-insensitively, `e"..."` takes C escapes;
//! - a missing string (ENV, DRIVER, ...) compares as empty; a missing or unreadable attribute
//!   fails the key whatever its operator;
//! - an attribute value loses its trailing whitespace unless the pattern's first alternative
//!   ends in whitespace;
//! - KERNEL and KERNELS see the sysfs name with `!` as `/` (sd-device's sysname), and
//!   `ENV{DEVNAME}` is the node path (`/dev/sdb1`), as udev's rules see them.
//!
//! [`parser`] reads rule text (pure, from `&str`) and reports every error of every file at
//! once as `file:line:col: message`; [`matcher`] evaluates rules against events; [`lint`]
//! finds rules that load but can never attach, or attach more than meant.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use smallvec::SmallVec;

use crate::fnmatch::{fnmatch, fnmatch_casefold, is_glob};

pub mod lint;
pub mod matcher;
pub mod parser;

pub use lint::{AccessCheckError, unreadable_by};
pub use matcher::{MAX_DEPTH, Matcher, Trace, show_value};
pub use parser::{Found, Parsed, Source, parse, parse_duration};

/// A loaded set of rules, in order.
#[derive(Debug, Default)]
pub struct RuleSet {
    pub rules: Vec<Rule>,
    /// Attribute names the rules read, interned: a [`Key::Attr`] holds an index here.
    attrs: Vec<Arc<str>>,
    /// How many distinct tests on the event device the rules make (see [`Test::memo`]).
    memos: usize,
}

impl RuleSet {
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The attribute names the rules read.
    pub fn attr_names(&self) -> &[Arc<str>] {
        &self.attrs
    }
}

/// One rule: tests and an action.
#[derive(Debug)]
pub struct Rule {
    pub origin: Arc<str>,
    pub line: usize,
    /// Tests on the event device, cheapest first.
    pub tests: Vec<Test>,
    /// Tests that must all hold on one device: the event device or an ancestor.
    pub parent_tests: Vec<Test>,
    /// The qube to attach to (checked with [`crate::names::check_qube`]).
    pub attach: Box<str>,
    /// How long to wait for the device to be ready, if not the global default.
    pub timeout: Option<Duration>,
    /// Minimum time between two calls for the same device (flapping devices).
    pub debounce: Option<Duration>,
    /// At most this many calls in this window, for the whole rule.
    pub rate_limit: Option<(u32, Duration)>,
}

impl Rule {
    /// `file:line`, for logs.
    pub fn location(&self) -> String {
        format!("{}:{}", self.origin, self.line)
    }

    /// Every test, event device first.
    pub fn all_tests(&self) -> impl Iterator<Item = &Test> {
        self.tests.iter().chain(&self.parent_tests)
    }
}

/// One `KEY op "pattern"` test.
#[derive(Debug)]
pub struct Test {
    pub key: Key,
    pub negate: bool,
    pub pattern: Pattern,
    pub col: usize,
    /// For a test on the event device: its index among the rule set's distinct such tests
    /// (same key, operator and pattern), so that the matcher evaluates it once per event
    /// however many rules make it. `NO_MEMO` for tests on the parent walk.
    memo: u16,
}

/// [`Test::memo`] of a test that is not memoised.
const NO_MEMO: u16 = u16::MAX;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Key {
    Action,
    Devpath,
    Kernel,
    Subsystem,
    Driver,
    Env(Box<str>),
    /// An attribute of the event device: (name, interned index).
    Attr(Arc<str>, u16),
    Kernels,
    Subsystems,
    Drivers,
    Attrs(Arc<str>, u16),
}

impl Key {
    pub fn is_parent(&self) -> bool {
        matches!(self, Key::Kernels | Key::Subsystems | Key::Drivers | Key::Attrs(..))
    }

    /// Evaluation order on the event device: event values before sysfs reads.
    fn cost(&self) -> u8 {
        match self {
            Key::Subsystem | Key::Action | Key::Kernel | Key::Devpath | Key::Env(_) => 0,
            Key::Driver => 1,
            _ => 2,
        }
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Key::Action => f.write_str("ACTION"),
            Key::Devpath => f.write_str("DEVPATH"),
            Key::Kernel => f.write_str("KERNEL"),
            Key::Subsystem => f.write_str("SUBSYSTEM"),
            Key::Driver => f.write_str("DRIVER"),
            Key::Env(k) => write!(f, "ENV{{{k}}}"),
            Key::Attr(a, _) => write!(f, "ATTR{{{a}}}"),
            Key::Kernels => f.write_str("KERNELS"),
            Key::Subsystems => f.write_str("SUBSYSTEMS"),
            Key::Drivers => f.write_str("DRIVERS"),
            Key::Attrs(a, _) => write!(f, "ATTRS{{{a}}}"),
        }
    }
}

impl fmt::Display for Test {
    /// As written (an `e"..."` value shown escaped), e.g. `KERNEL==i"sd*"`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let op = if self.negate != self.pattern.flipped { "!=" } else { "==" };
        let prefix = if self.pattern.casefold { "i" } else { "" };
        write!(f, "{}{}{prefix}\"{}\"", self.key, op, crate::log::Escaped(&self.pattern.source))
    }
}

/// The longest attribute value udev compares after removing trailing whitespace: it copies
/// the value into a buffer of UDEV_NAME_SIZE (512) bytes first (token_match_attr).
const TRIMMED_MAX: usize = 511;

/// A compiled pattern, as udev compiles it (rule_line_add_token).
#[derive(Debug)]
pub struct Pattern {
    kind: PatternKind,
    /// The `|` alternatives, without empty ones: byte ranges of `source`.
    alts: SmallVec<[(u32, u32); 2]>,
    /// An empty alternative was written (`"|foo"`): the empty value matches too.
    or_empty: bool,
    /// For attributes: remove trailing whitespace from the value first.
    trim_value: bool,
    /// Written as `"?*"`, compiled as "empty" with the operator flipped (udev does the same).
    flipped: bool,
    /// Written `i"..."`: compared with ASCII case folded (strcaseeq, FNM_CASEFOLD).
    casefold: bool,
    /// The value as udev sees it (after `\"` and, for `e"..."`, C escapes).
    source: Box<[u8]>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PatternKind {
    Empty,
    Plain,
    Glob,
    /// `SUBSYSTEM=="subsystem"|"bus"|"class"`: udev's legacy spelling of all three (only for
    /// SUBSYSTEM, not SUBSYSTEMS).
    Subsystem,
}

impl Pattern {
    /// Compiles `source` for `key` as rule_line_add_token does.
    fn compile(source: &[u8], key: &Key, casefold: bool) -> Pattern {
        let mut flipped = false;
        let kind = if *key == Key::Subsystem && matches!(source, b"subsystem" | b"bus" | b"class") {
            PatternKind::Subsystem
        } else if source.is_empty() {
            PatternKind::Empty
        } else if source == b"?*" {
            flipped = true;
            PatternKind::Empty
        } else if is_glob(source) {
            PatternKind::Glob
        } else {
            PatternKind::Plain
        };
        let mut alts = SmallVec::new();
        let mut or_empty = false;
        if matches!(kind, PatternKind::Plain | PatternKind::Glob) {
            let mut start = 0;
            for alt in source.split(|&b| b == b'|') {
                if alt.is_empty() {
                    or_empty = true;
                } else {
                    alts.push((start as u32, (start + alt.len()) as u32));
                }
                start += alt.len() + 1;
            }
        }
        // udev looks at the last byte of the value after turning `|` into NULs: the end of the
        // first non-empty alternative ("?*" and "" have none split off). C's isspace().
        let first = match alts.first() {
            Some(&(a, b)) => &source[a as usize..b as usize],
            None if kind == PatternKind::Empty => source,
            None => &[],
        };
        let attr = matches!(key, Key::Attr(..) | Key::Attrs(..));
        let trim_value = attr && first.last().is_some_and(|b| !(b.is_ascii_whitespace() || *b == 0x0b));
        Pattern { kind, alts, or_empty, trim_value, flipped, casefold, source: source.into() }
    }

    fn alts(&self) -> impl Iterator<Item = &[u8]> {
        let source = &self.source;
        self.alts.iter().map(move |&(a, b)| source.get(a as usize..b as usize).unwrap_or_default())
    }

    /// The pattern as written (after unescaping).
    pub fn source(&self) -> &[u8] {
        &self.source
    }

    /// True if `value` matches (before the operator is applied): udev's token_match_string.
    pub fn matches(&self, value: &[u8]) -> bool {
        let fold = self.casefold;
        match self.kind {
            PatternKind::Empty => value.is_empty(),
            PatternKind::Subsystem => [&b"subsystem"[..], b"bus", b"class"].iter().any(|s| eq(s, value, fold)),
            PatternKind::Plain => (self.or_empty && value.is_empty()) || self.alts().any(|a| eq(a, value, fold)),
            PatternKind::Glob if fold => {
                (self.or_empty && value.is_empty()) || self.alts().any(|a| fnmatch_casefold(a, value))
            }
            PatternKind::Glob => (self.or_empty && value.is_empty()) || self.alts().any(|a| fnmatch(a, value)),
        }
    }
}

/// streq, or strcaseeq in the C locale.
fn eq(a: &[u8], b: &[u8], fold: bool) -> bool {
    if fold { a.eq_ignore_ascii_case(b) } else { a == b }
}

impl Test {
    /// udev's token_match_string: a missing value compares as empty.
    fn on_string(&self, value: Option<&[u8]>) -> bool {
        self.pattern.matches(value.unwrap_or_default()) != (self.negate != self.pattern.flipped)
    }

    /// udev's token_match_attr: a missing attribute fails whatever the operator.
    fn on_attr(&self, value: Option<&[u8]>) -> bool {
        let Some(mut value) = value else { return false };
        if self.pattern.trim_value {
            value = &value[..value.len().min(TRIMMED_MAX)];
            while let [rest @ .., last] = value {
                // udev's WHITESPACE: not \f or \v.
                if !matches!(last, b' ' | b'\t' | b'\n' | b'\r') {
                    break;
                }
                value = rest;
            }
        }
        self.on_string(Some(value))
    }

    /// Would this test hold for a string `value` (udev's token_match_string; for lints).
    pub fn holds_for(&self, value: Option<&[u8]>) -> bool {
        self.on_string(value)
    }
}

/// An error (or a warning) in a rules file, with its place.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleError {
    pub origin: Arc<str>,
    /// 1-based; 0 for a problem with the whole file.
    pub line: usize,
    pub col: usize,
    pub message: String,
    pub hint: Option<String>,
}

impl fmt::Display for RuleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.origin, self.message)?;
        } else {
            write!(f, "{}:{}:{}: {}", self.origin, self.line, self.col, self.message)?;
        }
        if let Some(hint) = &self.hint {
            write!(f, " (hint: {hint})")?;
        }
        Ok(())
    }
}

impl std::error::Error for RuleError {}

#[cfg(test)]
mod tests;
