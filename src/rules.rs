//! Rules: udev's matching syntax, with one action, `ATTACH="qube"`.
//!
//! ```text
//! # The seed recipe's udev rule, ported by changing its action:
//! SUBSYSTEM=="block", ENV{DEVTYPE}=="partition", ATTRS{idVendor}=="0781", \
//!   ATTRS{serial}=="4C530001230101115543", ATTACH="backup"
//! ```
//!
//! Matching is udev's (systemd src/udev/udev-rules.c), exactly:
//! - keys ACTION, DEVPATH, KERNEL, SUBSYSTEM, DRIVER, ENV{K}, ATTR{f} test the event device;
//!   KERNELS, SUBSYSTEMS, DRIVERS, ATTRS{f} test it or an ancestor, and all of a rule's
//!   parent keys must hold on ONE device, walking up from the event device;
//! - `==` and `!=`; a pattern is a glob ([`crate::fnmatch`], `*` crosses `/`) or a plain
//!   string, with `|` alternatives, where an empty alternative matches an empty value;
//!   `"?*"` means "not empty";
//! - a missing string (ENV, DRIVER, ...) compares as empty; a missing or unreadable attribute
//!   fails the key whatever its operator;
//! - an attribute value loses its trailing whitespace unless the pattern ends in whitespace.
//!
//! Parsing is pure (from `&str`) and reports every error of every file at once as
//! `file:line:col: message`, with a hint where one helps. [`Matcher`] evaluates rules in
//! order (first match wins), reading each sysfs attribute lazily and at most once per event
//! into buffers allocated when the rules load, so matching allocates nothing.

use std::fmt::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use smallvec::SmallVec;

use crate::fnmatch::{fnmatch, is_glob};
use crate::names;
use crate::sysfs::{MAX_ATTR, Sysfs};
use crate::uevent::Uevent;

/// A loaded set of rules, in order.
#[derive(Debug, Default)]
pub struct RuleSet {
    pub rules: Vec<Rule>,
    /// Attribute names the rules read, interned: a [`Key::Attr`] holds an index here.
    attrs: Vec<Arc<str>>,
    /// How many distinct tests on the event device the rules make (see [`Test::memo`]).
    memos: usize,
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
    /// The qube to attach to (checked with [`names::check_qube`]).
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
    fn is_parent(&self) -> bool {
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
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let op = if self.negate != self.pattern.flipped { "!=" } else { "==" };
        write!(f, "{}{}\"{}\"", self.key, op, self.pattern.source)
    }
}

/// A compiled pattern, as udev compiles it.
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
    source: Box<str>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PatternKind {
    Empty,
    Plain,
    Glob,
    /// `SUBSYSTEM(S)=="subsystem"|"bus"|"class"`: udev's legacy spelling of all three.
    Subsystem,
}

impl Pattern {
    fn compile(source: &str, key: &Key) -> Pattern {
        let bytes = source.as_bytes();
        let subsystem_key = matches!(key, Key::Subsystem | Key::Subsystems);
        let mut flipped = false;
        let kind = if subsystem_key && matches!(source, "subsystem" | "bus" | "class") {
            PatternKind::Subsystem
        } else if source.is_empty() {
            PatternKind::Empty
        } else if source == "?*" {
            flipped = true;
            PatternKind::Empty
        } else if is_glob(bytes) {
            PatternKind::Glob
        } else {
            PatternKind::Plain
        };
        let mut alts = SmallVec::new();
        let mut or_empty = false;
        if matches!(kind, PatternKind::Plain | PatternKind::Glob) {
            let mut start = 0;
            for alt in bytes.split(|&b| b == b'|') {
                if alt.is_empty() {
                    or_empty = true;
                } else {
                    alts.push((start as u32, (start + alt.len()) as u32));
                }
                start += alt.len() + 1;
            }
        }
        let attr = matches!(key, Key::Attr(..) | Key::Attrs(..));
        // udev asks C's isspace(), which also counts \v.
        let trim_value = attr && bytes.last().is_some_and(|b| !(b.is_ascii_whitespace() || *b == 0x0b));
        Pattern { kind, alts, or_empty, trim_value, flipped, source: source.into() }
    }

    fn alts(&self) -> impl Iterator<Item = &[u8]> {
        let source = self.source.as_bytes();
        self.alts.iter().map(move |&(a, b)| source.get(a as usize..b as usize).unwrap_or_default())
    }

    /// True if `value` matches (before the operator is applied).
    pub fn matches(&self, value: &[u8]) -> bool {
        match self.kind {
            PatternKind::Empty => value.is_empty(),
            PatternKind::Subsystem => matches!(value, b"subsystem" | b"bus" | b"class"),
            PatternKind::Plain => (self.or_empty && value.is_empty()) || self.alts().any(|a| a == value),
            PatternKind::Glob => (self.or_empty && value.is_empty()) || self.alts().any(|a| fnmatch(a, value)),
        }
    }
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
}

// ---------------------------------------------------------------------------------------------
// Parsing

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

/// The result of parsing: what loaded, what is wrong, and what looks risky.
#[derive(Debug, Default)]
pub struct Parsed {
    pub set: RuleSet,
    pub errors: Vec<RuleError>,
    pub warnings: Vec<RuleError>,
    /// The distinct event-device tests seen so far, as text, for [`Test::memo`].
    memo_keys: Vec<Box<str>>,
}

impl Parsed {
    /// Parses one more source (a file's text, or qubesdb's), appending to what is loaded.
    pub fn add(&mut self, origin: &str, text: &str) {
        let origin: Arc<str> = origin.into();
        for line in logical_lines(text) {
            let mut p = LineParser {
                origin: &origin,
                line: &line,
                pos: 0,
                errors: &mut self.errors,
                attrs: &mut self.set.attrs,
                memo_keys: &mut self.memo_keys,
            };
            if let Some(rule) = p.rule() {
                self.warnings.extend(lint(&rule, &line));
                self.set.rules.push(rule);
            }
        }
        self.set.rules.shrink_to_fit();
        self.set.memos = self.memo_keys.len();
    }

    /// An error that is not tied to a line (unreadable file).
    pub fn file_error(&mut self, origin: &str, message: String) {
        self.errors.push(RuleError { origin: origin.into(), line: 0, col: 0, message, hint: None });
    }

    /// Reads files and directories in order: a directory contributes its `*.rules` files in
    /// name order (not subdirectories, even named `*.rules`; a dangling link is reported). A
    /// path that does not exist is an error if `required`.
    pub fn add_path(&mut self, path: &Path, required: bool) {
        let shown = path.display().to_string();
        let meta = match std::fs::metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => return,
            Err(e) => return self.file_error(&shown, format!("cannot read: {}", io_reason(&e))),
        };
        if !meta.is_dir() {
            return match std::fs::read_to_string(path) {
                Ok(text) => self.add(&shown, &text),
                Err(e) => self.file_error(&shown, format!("cannot read: {}", io_reason(&e))),
            };
        }
        let entries = match std::fs::read_dir(path) {
            Ok(entries) => entries,
            Err(e) => return self.file_error(&shown, format!("cannot list: {}", io_reason(&e))),
        };
        let mut files: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "rules") && !p.is_dir())
            .collect();
        files.sort();
        for file in files {
            self.add_path(&file, true);
        }
    }
}

fn io_reason(e: &std::io::Error) -> String {
    let text = e.to_string();
    text.split(" (os error").next().unwrap_or(&text).to_owned()
}

/// Parses rule text from one origin.
pub fn parse(origin: &str, text: &str) -> Parsed {
    let mut parsed = Parsed::default();
    parsed.add(origin, text);
    parsed
}

/// A rule line after `\` continuations are joined, with where each piece came from.
struct LogicalLine {
    text: String,
    /// (offset in `text`, 1-based line, 1-based column of that offset).
    pieces: Vec<(usize, usize, usize)>,
}

impl LogicalLine {
    /// The line and column of byte `offset` of the joined text.
    fn place(&self, offset: usize) -> (usize, usize) {
        let &(start, line, col) =
            self.pieces.iter().rev().find(|(start, ..)| *start <= offset).unwrap_or(&self.pieces[0]);
        (line, col + self.text[start..offset.min(self.text.len())].chars().count())
    }
}

/// Splits text into rule lines: comments and blank lines dropped, `\` joins lines.
fn logical_lines(text: &str) -> Vec<LogicalLine> {
    let mut out = Vec::new();
    let mut current: Option<LogicalLine> = None;
    for (n, raw) in text.lines().enumerate() {
        let raw = raw.strip_suffix('\r').unwrap_or(raw);
        let (body, continued) = match raw.strip_suffix('\\') {
            Some(body) => (body, true),
            None => (raw, false),
        };
        let line = match current.take() {
            Some(mut l) => {
                l.pieces.push((l.text.len(), n + 1, 1));
                l.text.push_str(body);
                l
            }
            None => {
                let trimmed = body.trim_start();
                if trimmed.is_empty() && !continued || trimmed.starts_with('#') {
                    continue;
                }
                LogicalLine { text: body.to_owned(), pieces: vec![(0, n + 1, 1)] }
            }
        };
        if continued {
            current = Some(line);
        } else {
            out.push(line);
        }
    }
    out.extend(current);
    out
}

/// Keys of udev's rule language that autoattach does not have, and why.
const UDEV_ONLY: &[(&str, &str)] = &[
    ("RUN", "autoattach runs nothing; its only action is ATTACH=\"qube\""),
    ("PROGRAM", "autoattach runs nothing; match on sysfs attributes instead"),
    ("RESULT", "autoattach runs no PROGRAM"),
    ("IMPORT", "there is no udev database here; match on ATTRS{...} of the device"),
    ("GOTO", "rules have no labels; write one rule per device"),
    ("LABEL", "rules have no labels; write one rule per device"),
    ("NAME", "autoattach names nothing"),
    ("SYMLINK", "autoattach creates no links"),
    ("OWNER", "autoattach changes no permissions"),
    ("GROUP", "autoattach changes no permissions"),
    ("MODE", "autoattach changes no permissions"),
    ("TAG", "there are no tags without udev"),
    ("TAGS", "there are no tags without udev"),
    ("TEST", "use ATTR{file}==\"?*\" to test that an attribute exists"),
    ("OPTIONS", "use TIMEOUT, DEBOUNCE or RATELIMIT for autoattach's options"),
    ("SYSCTL", "autoattach reads no sysctls"),
    ("CONST", "not supported"),
    ("SECLABEL", "not supported"),
    ("WAIT_FOR", "autoattach waits for readiness by itself"),
    ("ENV_ASSIGN", ""),
];

const MATCH_KEYS: &[&str] =
    &["ACTION", "DEVPATH", "KERNEL", "SUBSYSTEM", "DRIVER", "ENV", "ATTR", "KERNELS", "SUBSYSTEMS", "DRIVERS", "ATTRS"];
const ACTION_KEYS: &[&str] = &["ATTACH", "TIMEOUT", "DEBOUNCE", "RATELIMIT"];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Match,
    NoMatch,
    Assign,
    Add,
    Remove,
    Final,
}

impl Op {
    fn as_str(self) -> &'static str {
        match self {
            Op::Match => "==",
            Op::NoMatch => "!=",
            Op::Assign => "=",
            Op::Add => "+=",
            Op::Remove => "-=",
            Op::Final => ":=",
        }
    }
}

struct LineParser<'a> {
    origin: &'a Arc<str>,
    line: &'a LogicalLine,
    pos: usize,
    errors: &'a mut Vec<RuleError>,
    attrs: &'a mut Vec<Arc<str>>,
    memo_keys: &'a mut Vec<Box<str>>,
}

/// One `KEY{attr} op "value"` as written, with offsets for messages.
struct Token<'t> {
    key: &'t str,
    key_at: usize,
    attr: Option<&'t str>,
    op: Op,
    op_at: usize,
    value: String,
    value_at: usize,
}

impl<'a> LineParser<'a> {
    fn error(&mut self, offset: usize, message: String, hint: Option<String>) {
        let (line, col) = self.line.place(offset);
        self.errors.push(RuleError { origin: self.origin.clone(), line, col, message, hint });
    }

    fn rest(&self) -> &str {
        &self.line.text[self.pos..]
    }

    fn skip(&mut self, what: impl Fn(char) -> bool) {
        let n = self.rest().len() - self.rest().trim_start_matches(what).len();
        self.pos += n;
    }

    /// Parses one logical line into a rule; on any error, records every error found and
    /// returns None.
    fn rule(&mut self) -> Option<Rule> {
        let errors_before = self.errors.len();
        let first_at = self.line.text.len() - self.line.text.trim_start().len();
        let mut rule = Rule {
            origin: self.origin.clone(),
            line: self.line.place(first_at).0,
            tests: Vec::new(),
            parent_tests: Vec::new(),
            attach: "".into(),
            timeout: None,
            debounce: None,
            rate_limit: None,
        };
        let mut attach_at = None;
        loop {
            self.skip(|c| c.is_whitespace() || c == ',');
            if self.rest().is_empty() {
                break;
            }
            let Some(token) = self.token() else { break };
            self.apply(token, &mut rule, &mut attach_at);
        }
        if attach_at.is_none() && self.errors.len() == errors_before {
            self.error(first_at, "rule has no action".into(), Some("end it with ATTACH=\"qube\"".into()));
        }
        if self.errors.len() > errors_before {
            return None;
        }
        rule.tests.sort_by_key(|t| t.key.cost());
        // Rules live as long as the agent: keep no spare capacity.
        rule.tests.shrink_to_fit();
        rule.parent_tests.shrink_to_fit();
        Some(rule)
    }

    /// Reads one token; on a syntax error, records it and returns None (the rest of the line
    /// cannot be trusted).
    fn token(&mut self) -> Option<Token<'a>> {
        let key_at = self.pos;
        let key_len = self.rest().find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(self.rest().len());
        if key_len == 0 {
            let c = self.rest().chars().next().unwrap_or(' ');
            self.error(key_at, format!("expected a key, found '{}'", c.escape_default()), None);
            return None;
        }
        self.pos += key_len;
        let mut attr = None;
        if self.rest().starts_with('{') {
            let Some(end) = self.rest().find('}') else {
                self.error(self.pos, "'{' without '}'".into(), None);
                return None;
            };
            attr = Some((self.pos + 1, self.pos + end));
            self.pos += end + 1;
        }
        self.skip(|c| c == ' ' || c == '\t');
        let op_at = self.pos;
        let op = [
            ("==", Op::Match),
            ("!=", Op::NoMatch),
            ("+=", Op::Add),
            ("-=", Op::Remove),
            (":=", Op::Final),
            ("=", Op::Assign),
        ]
        .into_iter()
        .find(|(s, _)| self.rest().starts_with(s));
        let Some((op_text, op)) = op else {
            let key = self.line.text[key_at..key_at + key_len].to_owned();
            self.error(op_at, format!("expected an operator after {key}"), Some("use == or != to match".into()));
            return None;
        };
        self.pos += op_text.len();
        self.skip(|c| c == ' ' || c == '\t');
        let value_at = self.pos;
        let value = self.value()?;
        if !self.rest().is_empty() && !self.rest().starts_with([',', ' ', '\t']) {
            self.error(self.pos, "expected ',' after the value".into(), None);
            return None;
        }
        let text: &'a str = &self.line.text;
        Some(Token {
            key: &text[key_at..key_at + key_len],
            key_at,
            attr: attr.map(|(a, b)| &text[a..b]),
            op,
            op_at,
            value,
            value_at,
        })
    }

    /// A double-quoted value; `\"` is a quote, other backslashes stay (for globs), as udev.
    fn value(&mut self) -> Option<String> {
        let at = self.pos;
        match self.rest().chars().next() {
            Some('"') => {}
            Some(p @ ('e' | 'i')) if self.rest()[1..].starts_with('"') => {
                self.error(
                    at,
                    format!("the {p}\"...\" string prefix is not supported"),
                    Some("write a plain \"...\" value".into()),
                );
                return None;
            }
            _ => {
                self.error(at, "expected a value in double quotes".into(), None);
                return None;
            }
        }
        let mut out = String::new();
        let mut chars = self.rest()[1..].char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                '"' => {
                    self.pos += 1 + i + 1;
                    return Some(out);
                }
                '\\' if self.rest()[1 + i + 1..].starts_with('"') => {
                    out.push('"');
                    chars.next();
                }
                '\0' => break,
                c => out.push(c),
            }
        }
        self.error(at, "value has no closing quote".into(), None);
        None
    }

    fn apply(&mut self, t: Token<'_>, rule: &mut Rule, attach_at: &mut Option<usize>) {
        let (key_at, op_at, value_at) = (t.key_at, t.op_at, t.value_at);
        let is_match = matches!(t.op, Op::Match | Op::NoMatch);
        if ACTION_KEYS.contains(&t.key) {
            return self.apply_action(t, rule, attach_at);
        }
        if !MATCH_KEYS.contains(&t.key) {
            return self.unknown_key(&t);
        }
        let wants_attr = matches!(t.key, "ENV" | "ATTR" | "ATTRS");
        match (wants_attr, t.attr) {
            (true, None) | (true, Some("")) => {
                return self.error(key_at, format!("{} needs a name: {}{{name}}", t.key, t.key), None);
            }
            (false, Some(_)) => {
                return self.error(key_at, format!("{} takes no {{...}}", t.key), None);
            }
            _ => {}
        }
        if !is_match {
            let hint = match t.key {
                "ATTR" | "ATTRS" | "ENV" => format!(
                    "{}{{{}}}{}\"...\" would set a value in udev; autoattach only matches: write {}{{{}}}==\"{}\"",
                    t.key,
                    t.attr.unwrap_or_default(),
                    t.op.as_str(),
                    t.key,
                    t.attr.unwrap_or_default(),
                    t.value
                ),
                _ => format!("to match, write {}==\"{}\"", t.key, t.value),
            };
            let message = format!("{} can only be matched with == or !=, not {}", t.key, t.op.as_str());
            return self.error(op_at, message, Some(hint));
        }
        if t.value.contains('\0') {
            return self.error(value_at, "value contains a NUL byte".into(), None);
        }
        let key = match t.key {
            "ACTION" => Key::Action,
            "DEVPATH" => Key::Devpath,
            "KERNEL" => Key::Kernel,
            "SUBSYSTEM" => Key::Subsystem,
            "DRIVER" => Key::Driver,
            "KERNELS" => Key::Kernels,
            "SUBSYSTEMS" => Key::Subsystems,
            "DRIVERS" => Key::Drivers,
            "ENV" => {
                let name = t.attr.unwrap_or_default();
                if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                    return self.error(key_at, format!("ENV{{{name}}}: not a variable name"), None);
                }
                Key::Env(name.into())
            }
            attr_key => {
                let name = t.attr.unwrap_or_default();
                if let Err(why) = check_attr_name(name) {
                    return self.error(key_at, format!("{attr_key}{{{name}}}: {why}"), None);
                }
                let (name, id) = intern(self.attrs, name);
                if attr_key == "ATTR" { Key::Attr(name, id) } else { Key::Attrs(name, id) }
            }
        };
        let negate = t.op == Op::NoMatch;
        let memo = if key.is_parent() {
            NO_MEMO
        } else {
            let text = format!("{key}{}\"{}\"", if negate { "!=" } else { "==" }, t.value);
            match self.memo_keys.iter().position(|k| **k == *text) {
                Some(i) => i as u16,
                None if self.memo_keys.len() < usize::from(NO_MEMO) => {
                    self.memo_keys.push(text.into());
                    (self.memo_keys.len() - 1) as u16
                }
                None => NO_MEMO,
            }
        };
        let test =
            Test { pattern: Pattern::compile(&t.value, &key), negate, col: self.line.place(key_at).1, key, memo };
        if test.key.is_parent() {
            rule.parent_tests.push(test);
        } else {
            rule.tests.push(test);
        }
    }

    fn apply_action(&mut self, t: Token<'_>, rule: &mut Rule, attach_at: &mut Option<usize>) {
        if t.attr.is_some() {
            return self.error(t.key_at, format!("{} takes no {{...}}", t.key), None);
        }
        if t.op != Op::Assign {
            let hint = format!("{} is an action: write {}=\"{}\"", t.key, t.key, t.value);
            return self.error(t.op_at, format!("{} takes =, not {}", t.key, t.op.as_str()), Some(hint));
        }
        match t.key {
            "ATTACH" => {
                if let Some(first) = *attach_at {
                    let (line, col) = self.line.place(first);
                    let message = format!("second ATTACH (the first is at {line}:{col})");
                    return self.error(t.key_at, message, Some("a rule attaches to one qube".into()));
                }
                *attach_at = Some(t.key_at);
                if let Err(e) = names::check_qube(&t.value) {
                    let hint = match e {
                        names::NameError::BadByte(_) | names::NameError::BadFirst => {
                            Some("qube names are 1-31 of [A-Za-z0-9_.-], starting with a letter".into())
                        }
                        _ => None,
                    };
                    let message = format!("ATTACH=\"{}\": {e}", crate::log::Escaped(t.value.as_bytes()));
                    return self.error(t.value_at, message, hint);
                }
                rule.attach = t.value.into();
            }
            "TIMEOUT" | "DEBOUNCE" => match parse_duration(&t.value) {
                Some(d) if t.key == "TIMEOUT" => rule.timeout = Some(d),
                Some(d) => rule.debounce = Some(d),
                None => self.error(
                    t.value_at,
                    format!("{}=\"{}\": not a duration", t.key, t.value),
                    Some("write e.g. \"30s\", \"2m\" or \"500ms\" (at most 24h)".into()),
                ),
            },
            _ => match parse_rate(&t.value) {
                Some(rate) => rule.rate_limit = Some(rate),
                None => self.error(
                    t.value_at,
                    format!("RATELIMIT=\"{}\": not a rate", t.value),
                    Some("write COUNT/DURATION, e.g. \"3/1m\"".into()),
                ),
            },
        }
    }

    fn unknown_key(&mut self, t: &Token<'_>) {
        if let Some((_, why)) = UDEV_ONLY.iter().find(|(k, _)| *k == t.key) {
            return self.error(t.key_at, format!("udev key {} is not supported", t.key), Some((*why).into()));
        }
        let upper = t.key.to_ascii_uppercase();
        let all = MATCH_KEYS.iter().chain(ACTION_KEYS);
        let hint = if all.clone().any(|k| *k == upper) {
            Some(format!("keys are upper case: {upper}"))
        } else {
            all.min_by_key(|k| distance(k, &upper))
                .filter(|k| distance(k, &upper) <= 2)
                .map(|k| format!("did you mean {k}?"))
        };
        self.error(t.key_at, format!("unknown key {}", t.key), hint);
    }
}

/// The index of `name` in `attrs` (added if new) and the shared name itself, so that a
/// hundred rules testing `serial` hold one copy of it.
fn intern(attrs: &mut Vec<Arc<str>>, name: &str) -> (Arc<str>, u16) {
    let i = match attrs.iter().position(|a| &**a == name) {
        Some(i) => i,
        None => {
            attrs.push(name.into());
            attrs.len() - 1
        }
    };
    (attrs[i].clone(), i as u16)
}

/// An attribute name reads a file under the device: relative, plain components, no
/// substitutions (`%`, `$`) or udev's `[subsystem/kernel]` form.
fn check_attr_name(name: &str) -> Result<(), &'static str> {
    if name.starts_with('[') {
        return Err("the [subsystem/kernel] form is not supported");
    }
    if name.contains(['%', '$']) {
        return Err("substitutions are not supported");
    }
    if name.contains(['*', '?']) {
        return Err("wildcards in attribute names are not supported");
    }
    if name.starts_with('/') || name.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
        return Err("must be a relative path without '.' or '..'");
    }
    if name.len() > 255 || name.bytes().any(|b| b.is_ascii_control() || b == b' ') {
        return Err("not a file name");
    }
    Ok(())
}

/// `30`, `30s`, `2m`, `1h`, `500ms`: from 1 ms to 24 h.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number.parse().ok()?;
    let ms = match unit.trim() {
        "" | "s" => n.checked_mul(1000)?,
        "ms" => n,
        "m" | "min" => n.checked_mul(60_000)?,
        "h" => n.checked_mul(3_600_000)?,
        _ => return None,
    };
    (1..=86_400_000).contains(&ms).then(|| Duration::from_millis(ms))
}

/// `COUNT/DURATION`, e.g. `3/1m`.
fn parse_rate(text: &str) -> Option<(u32, Duration)> {
    let (count, window) = text.split_once('/')?;
    let count: u32 = count.trim().parse().ok().filter(|&c| c > 0)?;
    Some((count, parse_duration(window.trim())?))
}

/// Edit distance, for "did you mean".
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

/// Warnings for a rule that parses but may not do what its author thinks.
fn lint(rule: &Rule, line: &LogicalLine) -> Vec<RuleError> {
    let mut out = Vec::new();
    let mut warn = |message: String, hint: &str| {
        out.push(RuleError {
            origin: rule.origin.clone(),
            line: rule.line,
            col: line.place(line.text.len() - line.text.trim_start().len()).1,
            message,
            hint: Some(hint.into()),
        })
    };
    let can = |key: &Key, value: &str| {
        rule.tests.iter().filter(|t| t.key == *key).all(|t| t.on_string(Some(value.as_bytes())))
    };
    let kernel_can = |name: &str| can(&Key::Kernel, name);
    let block = can(&Key::Subsystem, "block");
    let usb = can(&Key::Subsystem, "usb") && can(&Key::Env("DEVTYPE".into()), "usb_device");
    if !block && !usb {
        warn(
            "this rule can never attach anything".into(),
            "only block devices (SUBSYSTEM==\"block\") and whole USB devices (SUBSYSTEM==\"usb\", ENV{DEVTYPE}==\"usb_device\") can be attached",
        );
        return out;
    }
    const DISKS: &[&str] = &["sda", "sdb", "sdz", "mmcblk0", "nvme0n1", "vda", "sr0", "loop0"];
    const PARTS: &[&str] = &["sda1", "sdb2", "sdz15", "mmcblk0p1", "nvme0n1p1", "vda1", "loop0p1"];
    let disk = can(&Key::Env("DEVTYPE".into()), "disk") && DISKS.iter().any(|n| kernel_can(n));
    let part = can(&Key::Env("DEVTYPE".into()), "partition") && PARTS.iter().any(|n| kernel_can(n));
    if block && disk && part {
        warn(
            "this rule can match both a disk and its partitions: the disk would be attached and then its partitions, or the other way round".into(),
            "add ENV{DEVTYPE}==\"disk\" or ENV{DEVTYPE}==\"partition\"",
        );
    }
    let identity = ["serial", "idVendor", "idProduct", "product", "manufacturer"];
    let has_identity = rule.tests.iter().chain(&rule.parent_tests).any(|t| match &t.key {
        Key::Attr(a, _) | Key::Attrs(a, _) => identity.contains(&&**a),
        Key::Env(e) => e.starts_with("ID_"),
        Key::Devpath | Key::Kernels => true,
        _ => false,
    });
    if !has_identity {
        warn(
            "this rule matches any device of its kind, not one device".into(),
            "add ATTRS{idVendor}, ATTRS{idProduct} and ATTRS{serial} so only your device is attached",
        );
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Matching

/// The deepest parent walk: sysfs USB storage paths are about 12 levels deep.
pub const MAX_DEPTH: usize = 32;

/// Per-event cache slot: `UNREAD` until read, then the value's place in the arena or `MISSING`.
#[derive(Clone, Copy, Debug)]
struct Slot {
    stamp: u32,
    start: u32,
    len: u32,
}

const MISSING: u32 = u32::MAX;
/// Pseudo attribute ids after the interned names: the `subsystem` and `driver` links.
const SUBSYSTEM_LINK: usize = 0;
const DRIVER_LINK: usize = 1;

/// Evaluates rules against events; holds per-event caches allocated once per rule set.
#[derive(Debug)]
pub struct Matcher {
    /// The attribute names of the rule set this matcher was built for.
    attrs: Vec<Arc<str>>,
    names: usize,
    slots: Vec<Slot>,
    arena: Vec<u8>,
    stamp: u32,
    /// Devpath prefix lengths of the event device (level 0) and the ancestors found so far.
    chain: heapless::Vec<u16, MAX_DEPTH>,
    chain_complete: bool,
    buf: Box<[u8; MAX_ATTR]>,
    /// Per memoised test: the stamp of the event it was evaluated for, and its result.
    memo: Vec<(u32, bool)>,
}

/// Receives every test evaluated, for `autoattach test`.
pub trait Trace {
    fn rule(&mut self, index: usize, rule: &Rule);
    /// A test on the event device (`level` None) or on a device of the parent walk.
    fn test(&mut self, level: Option<(usize, &str)>, test: &Test, value: Option<&[u8]>, pass: bool);
    fn parents(&mut self, found: Option<(usize, &str)>);
    fn verdict(&mut self, matched: bool);
}

/// No tracing: the hot path.
struct Silent;

impl Trace for Silent {
    fn rule(&mut self, _: usize, _: &Rule) {}
    fn test(&mut self, _: Option<(usize, &str)>, _: &Test, _: Option<&[u8]>, _: bool) {}
    fn parents(&mut self, _: Option<(usize, &str)>) {}
    fn verdict(&mut self, _: bool) {}
}

impl Matcher {
    /// A matcher for `set` (build a new one when the rules change).
    pub fn new(set: &RuleSet) -> Matcher {
        let names = set.attrs.len() + 2;
        Matcher {
            attrs: set.attrs.clone(),
            names,
            slots: vec![Slot { stamp: 0, start: 0, len: 0 }; names * MAX_DEPTH],
            arena: Vec::with_capacity(4 * 1024),
            stamp: 0,
            chain: heapless::Vec::new(),
            chain_complete: false,
            buf: Box::new([0; MAX_ATTR]),
            memo: vec![(0, false); set.memos],
        }
    }

    /// The index of the first rule of `set` that matches `event`, reading `sysfs`.
    pub fn first_match(&mut self, sysfs: &Sysfs, set: &RuleSet, event: &Uevent<'_>) -> Option<usize> {
        debug_assert_eq!(self.attrs, set.attrs, "matcher built for another rule set");
        self.begin(event);
        let mut cx = Cx { m: self, sysfs, event, memoise: true };
        set.rules.iter().position(|rule| cx.rule_matches(rule, &mut Silent, false))
    }

    /// Like [`Matcher::first_match`], but evaluates every key of every rule and reports them.
    pub fn explain(
        &mut self,
        sysfs: &Sysfs,
        set: &RuleSet,
        event: &Uevent<'_>,
        trace: &mut dyn Trace,
    ) -> Option<usize> {
        self.begin(event);
        // Every test evaluated and reported with its value: nothing taken from the memo.
        let mut cx = Cx { m: self, sysfs, event, memoise: false };
        let mut first = None;
        for (i, rule) in set.rules.iter().enumerate() {
            trace.rule(i, rule);
            let matched = cx.rule_matches(rule, &mut Tracer(trace), true);
            trace.verdict(matched);
            if matched && first.is_none() {
                first = Some(i);
            }
        }
        first
    }

    fn begin(&mut self, event: &Uevent<'_>) {
        self.stamp = self.stamp.wrapping_add(1);
        if self.stamp == 0 {
            // Stamps wrapped: forget every slot so none looks current.
            self.slots.iter_mut().for_each(|s| s.stamp = 0);
            self.memo.iter_mut().for_each(|m| m.0 = 0);
            self.stamp = 1;
        }
        self.arena.clear();
        self.chain.clear();
        let _ = self.chain.push(event.devpath.len() as u16);
        self.chain_complete = false;
    }
}

/// One evaluation: the matcher's caches, the tree and the event.
struct Cx<'m, 'e> {
    m: &'m mut Matcher,
    sysfs: &'m Sysfs,
    event: &'m Uevent<'e>,
    /// Take event-device tests already evaluated for this event from the memo.
    memoise: bool,
}

impl Cx<'_, '_> {
    fn rule_matches(&mut self, rule: &Rule, trace: &mut impl Trace, all: bool) -> bool {
        let mut ok = true;
        for test in &rule.tests {
            ok &= self.event_test(test, trace);
            if !ok && !all {
                return false;
            }
        }
        if rule.parent_tests.is_empty() {
            return ok;
        }
        let mut found = None;
        let mut level = 0;
        while let Some(len) = self.level(level) {
            let mut here = true;
            for test in &rule.parent_tests {
                here &= self.parent_test(test, level, trace);
                if !here && !all {
                    break;
                }
            }
            if here {
                found = Some((level, len));
                break;
            }
            level += 1;
        }
        trace.parents(found.map(|(l, len)| (l, &self.event.devpath[..len])));
        ok && found.is_some()
    }

    /// The devpath length of the device `level` steps up the parent walk.
    fn level(&mut self, level: usize) -> Option<usize> {
        let m = &mut *self.m;
        while m.chain.len() <= level && !m.chain_complete {
            let last = *m.chain.last()? as usize;
            match self.sysfs.parent(&self.event.devpath[..last]) {
                Some(parent) if m.chain.push(parent.len() as u16).is_ok() => {}
                _ => m.chain_complete = true,
            }
        }
        m.chain.get(level).map(|&l| l as usize)
    }

    fn event_test(&mut self, test: &Test, trace: &mut impl Trace) -> bool {
        let memo = usize::from(test.memo);
        let stamp = self.m.stamp;
        if self.memoise {
            if let Some(&(_, pass)) = self.m.memo.get(memo).filter(|m| m.0 == stamp) {
                return pass;
            }
        }
        let pass = self.evaluate(test, trace);
        if let Some(slot) = self.m.memo.get_mut(memo) {
            *slot = (stamp, pass);
        }
        pass
    }

    fn evaluate(&mut self, test: &Test, trace: &mut impl Trace) -> bool {
        let event = self.event;
        let (value, attr) = match &test.key {
            Key::Action => (Some(event.action.as_str().as_bytes()), false),
            Key::Devpath => (Some(event.devpath.as_bytes()), false),
            Key::Kernel => (Some(event.kernel().as_bytes()), false),
            Key::Subsystem => (Some(event.subsystem.as_bytes()), false),
            Key::Env(k) => (event.get(k).map(str::as_bytes), false),
            Key::Driver => match event.get("DRIVER") {
                Some(d) => (Some(d.as_bytes()), false),
                None => (self.cached(0, DRIVER_LINK), false),
            },
            Key::Attr(_, id) => (self.cached(0, *id as usize + 2), true),
            _ => unreachable!("parent keys are evaluated on the parent walk"),
        };
        let pass = if attr { test.on_attr(value) } else { test.on_string(value) };
        trace.test(None, test, value, pass);
        pass
    }

    fn parent_test(&mut self, test: &Test, level: usize, trace: &mut impl Trace) -> bool {
        let event = self.event;
        let len = self.m.chain[level] as usize;
        let (value, attr) = match &test.key {
            Key::Kernels => (Some(crate::uevent::kernel_name(&event.devpath[..len]).as_bytes()), false),
            Key::Subsystems if level == 0 => (Some(event.subsystem.as_bytes()), false),
            Key::Subsystems => (self.cached(level, SUBSYSTEM_LINK), false),
            Key::Drivers => match event.get("DRIVER").filter(|_| level == 0) {
                Some(d) => (Some(d.as_bytes()), false),
                None => (self.cached(level, DRIVER_LINK), false),
            },
            Key::Attrs(_, id) => (self.cached(level, *id as usize + 2), true),
            _ => unreachable!("event keys are evaluated on the event device"),
        };
        let pass = if attr { test.on_attr(value) } else { test.on_string(value) };
        trace.test(Some((level, &event.devpath[..len])), test, value, pass);
        pass
    }

    /// Attribute `id` (or a link) of the device at `level`, read at most once per event.
    fn cached(&mut self, level: usize, id: usize) -> Option<&[u8]> {
        let m = &mut *self.m;
        let index = level * m.names + id;
        if m.slots[index].stamp != m.stamp {
            let devpath = &self.event.devpath[..m.chain[level] as usize];
            let value = match id {
                SUBSYSTEM_LINK => self.sysfs.link(devpath, "subsystem", &mut m.buf),
                DRIVER_LINK => self.sysfs.link(devpath, "driver", &mut m.buf),
                _ => self.sysfs.attr(devpath, &m.attrs[id - 2], &mut m.buf).ok(),
            };
            let start = m.arena.len() as u32;
            let len = match value {
                Some(v) => {
                    m.arena.extend_from_slice(v);
                    v.len() as u32
                }
                None => MISSING,
            };
            m.slots[index] = Slot { stamp: m.stamp, start, len };
        }
        let slot = m.slots[index];
        (slot.len != MISSING).then(|| &m.arena[slot.start as usize..(slot.start + slot.len) as usize])
    }
}

/// Adapts a `&mut dyn Trace` to the generic evaluation.
struct Tracer<'t>(&'t mut dyn Trace);

impl Trace for Tracer<'_> {
    fn rule(&mut self, i: usize, r: &Rule) {
        self.0.rule(i, r)
    }
    fn test(&mut self, level: Option<(usize, &str)>, test: &Test, value: Option<&[u8]>, pass: bool) {
        self.0.test(level, test, value, pass)
    }
    fn parents(&mut self, found: Option<(usize, &str)>) {
        self.0.parents(found)
    }
    fn verdict(&mut self, matched: bool) {
        self.0.verdict(matched)
    }
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

/// Writes a value for people: escaped, or `(missing)`.
pub fn show_value(out: &mut String, value: Option<&[u8]>) {
    match value {
        Some(v) => {
            let _ = write!(out, "\"{}\"", crate::log::Escaped(v));
        }
        None => out.push_str("(missing)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{STICK_DISK, STICK_PART, Tree, datagram};

    fn errors(text: &str) -> Vec<String> {
        parse("rules", text).errors.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn every_mistake_is_reported_with_its_place() {
        let text = concat!(
            "# a comment\n",
            "KERNEL=\"sdb\", ATTACH=\"work\"\n",
            "ATRS{serial}==\"x\", ATTACH=\"work\"\n",
            "SUBSYSTEM==\"block\", RUN+=\"/bin/sh -c x\", ATTACH=\"work\"\n",
            "SUBSYSTEM==\"block\", ATTACH=\"my work\"\n",
            "SUBSYSTEM==\"block\", \\\n",
            "  ATTRS{serial}==\"unterminated\n",
            "SUBSYSTEM==\"block\"\n",
            "ATTACH==\"work\"\n",
            "attrs{serial}==\"x\", ATTACH=\"dom0\"\n",
            "ATTR{../../x}==\"1\", ATTACH=\"work\"\n",
            "SUBSYSTEM==\"block\", ATTACH=\"a\", ATTACH=\"b\"\n",
            "SUBSYSTEM==\"block\" ATTACH=\"ok\"\n",
        );
        let got = errors(text);
        let want = [
            "rules:2:7: KERNEL can only be matched with == or !=, not = (hint: to match, write KERNEL==\"sdb\")",
            "rules:3:1: unknown key ATRS (hint: did you mean ATTRS?)",
            "rules:4:21: udev key RUN is not supported (hint: autoattach runs nothing; its only action is ATTACH=\"qube\")",
            "rules:5:28: ATTACH=\"my work\": ' ' is not allowed (qrexec would rewrite it to '_') (hint: qube names are 1-31 of [A-Za-z0-9_.-], starting with a letter)",
            "rules:7:18: value has no closing quote",
            "rules:8:1: rule has no action (hint: end it with ATTACH=\"qube\")",
            "rules:9:7: ATTACH takes =, not == (hint: ATTACH is an action: write ATTACH=\"work\")",
            "rules:10:1: unknown key attrs (hint: keys are upper case: ATTRS)",
            "rules:10:28: ATTACH=\"dom0\": dom0 is never a target",
            "rules:11:1: ATTR{../../x}: must be a relative path without '.' or '..'",
            "rules:12:33: second ATTACH (the first is at 12:21) (hint: a rule attaches to one qube)",
        ];
        assert_eq!(got, want);
        let parsed = parse("rules", text);
        assert_eq!(parsed.set.rules.len(), 1, "only the last line is a valid rule");
        assert_eq!(parsed.set.rules[0].line, 13);
    }

    #[test]
    fn attribute_assignment_is_refused_with_a_hint() {
        let got = errors("ATTRS{serial}=\"ABC\", ATTACH=\"work\"\n");
        assert_eq!(
            got,
            [
                "rules:1:14: ATTRS can only be matched with == or !=, not = (hint: ATTRS{serial}=\"...\" would set a value in udev; autoattach only matches: write ATTRS{serial}==\"ABC\")"
            ]
        );
    }

    #[test]
    fn a_directory_contributes_its_rules_files_only() {
        let dir = crate::testing::TempDir::new("rulesdir");
        std::fs::write(dir.path().join("20-b.rules"), "SUBSYSTEM==\"block\", ATTRS{serial}==\"2\", ATTACH=\"b\"\n")
            .unwrap();
        std::fs::write(dir.path().join("10-a.rules"), "SUBSYSTEM==\"block\", ATTRS{serial}==\"1\", ATTACH=\"a\"\n")
            .unwrap();
        std::fs::write(dir.path().join("notes.txt"), "not rules").unwrap();
        std::fs::create_dir(dir.path().join("old.rules")).unwrap();
        std::fs::write(
            dir.path().join("old.rules/x.rules"),
            "SUBSYSTEM==\"block\", ATTRS{serial}==\"9\", ATTACH=\"old\"\n",
        )
        .unwrap();
        let mut parsed = Parsed::default();
        parsed.add_path(dir.path(), true);
        assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
        let order: Vec<&str> = parsed.set.rules.iter().map(|r| &*r.attach).collect();
        assert_eq!(order, ["a", "b"]);
        std::os::unix::fs::symlink("/nonexistent", dir.path().join("30-c.rules")).unwrap();
        let mut parsed = Parsed::default();
        parsed.add_path(dir.path(), true);
        assert_eq!(parsed.errors.len(), 1, "a dangling link is an error: {:?}", parsed.errors);
    }

    #[test]
    fn options_parse() {
        let p = parse(
            "r",
            "SUBSYSTEM==\"block\", ATTRS{serial}==\"1\", ATTACH=\"w\", TIMEOUT=\"90s\", DEBOUNCE=\"2s\", RATELIMIT=\"3/1m\"\n",
        );
        assert!(p.errors.is_empty(), "{:?}", p.errors);
        let r = &p.set.rules[0];
        assert_eq!(r.timeout, Some(Duration::from_secs(90)));
        assert_eq!(r.debounce, Some(Duration::from_secs(2)));
        assert_eq!(r.rate_limit, Some((3, Duration::from_secs(60))));
        assert_eq!(errors("SUBSYSTEM==\"block\", ATTACH=\"w\", TIMEOUT=\"soon\"\n").len(), 1);
        assert_eq!(errors("SUBSYSTEM==\"block\", ATTACH=\"w\", RATELIMIT=\"0/1m\"\n").len(), 1);
    }

    #[test]
    fn lint_warns_about_risky_rules() {
        let warnings =
            |text: &str| -> Vec<String> { parse("r", text).warnings.iter().map(|w| w.message.clone()).collect() };
        let both = warnings("SUBSYSTEM==\"block\", KERNEL==\"sd*\", ATTRS{serial}==\"1\", ATTACH=\"w\"\n");
        assert_eq!(
            both,
            [
                "this rule can match both a disk and its partitions: the disk would be attached and then its partitions, or the other way round"
            ]
        );
        assert!(warnings("SUBSYSTEM==\"block\", KERNEL==\"sd[a-z]\", ATTRS{serial}==\"1\", ATTACH=\"w\"\n").is_empty());
        assert!(
            warnings("SUBSYSTEM==\"block\", ENV{DEVTYPE}==\"partition\", ATTRS{serial}==\"1\", ATTACH=\"w\"\n")
                .is_empty()
        );
        assert_eq!(
            warnings("SUBSYSTEM==\"block\", ENV{DEVTYPE}==\"disk\", ATTACH=\"w\"\n"),
            ["this rule matches any device of its kind, not one device"]
        );
        assert_eq!(
            warnings("SUBSYSTEM==\"net\", ATTRS{serial}==\"1\", ATTACH=\"w\"\n"),
            ["this rule can never attach anything"]
        );
        assert_eq!(
            warnings("SUBSYSTEM==\"usb\", ENV{DEVTYPE}==\"usb_interface\", ATTRS{serial}==\"1\", ATTACH=\"w\"\n"),
            ["this rule can never attach anything"]
        );
    }

    /// Matches `rule_text` against an event on the stick tree.
    fn matches(tree: &Tree, rule_text: &str, datagram: &[u8]) -> bool {
        let parsed = parse("r", &format!("{rule_text}, ATTACH=\"work\"\n"));
        assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
        let sysfs = Sysfs::new(tree.root()).unwrap();
        let event = Uevent::parse(datagram).unwrap();
        Matcher::new(&parsed.set).first_match(&sysfs, &parsed.set, &event).is_some()
    }

    fn disk_add() -> Vec<u8> {
        datagram("add", STICK_DISK, "block", &["MAJOR=8", "MINOR=16", "DEVNAME=sdb", "DEVTYPE=disk"])
    }

    #[test]
    fn udev_matching_semantics() {
        let t = Tree::stick(b"ABC123");
        let disk = disk_add();
        let part = datagram("add", STICK_PART, "block", &["DEVNAME=sdb1", "DEVTYPE=partition"]);
        let cases: &[(&str, &[u8], bool)] = &[
            ("SUBSYSTEM==\"block\"", &disk, true),
            ("SUBSYSTEM!=\"block\"", &disk, false),
            ("KERNEL==\"sd[a-z]\"", &disk, true),
            ("KERNEL==\"sd[a-z]\"", &part, false),
            ("KERNEL==\"sd*\"", &part, true),
            ("KERNEL==\"sda|sdb\"", &disk, true),
            ("KERNEL==\"sda|sdc\"", &disk, false),
            ("KERNEL!=\"sda|sdc\"", &disk, true),
            ("DEVPATH==\"*/usb2/2-1/*\"", &disk, true),
            ("ACTION==\"add\"", &disk, true),
            ("ACTION==\"remove\"", &disk, false),
            ("ENV{DEVTYPE}==\"disk\"", &disk, true),
            ("ENV{NOPE}==\"\"", &disk, true),
            ("ENV{NOPE}!=\"x\"", &disk, true),
            ("ENV{NOPE}==\"?*\"", &disk, false),
            ("ENV{DEVTYPE}==\"?*\"", &disk, true),
            ("ENV{NOPE}==\"|x\"", &disk, true),
            ("ATTR{size}==\"2048\"", &disk, true),
            ("ATTR{size}==\"2*\"", &disk, true),
            ("ATTR{nope}!=\"x\"", &disk, false),
            ("ATTR{nope}==\"\"", &disk, false),
            ("ATTRS{idVendor}==\"46f4\"", &disk, true),
            ("ATTRS{idVendor}==\"46f4\"", &part, true),
            ("ATTRS{serial}==\"ABC123\"", &part, true),
            ("ATTRS{serial}==\"ABC12\"", &part, false),
            ("ATTRS{vendor}==\"QEMU\"", &disk, true),
            ("ATTRS{vendor}==\"QEMU \"", &disk, false),
            ("ATTRS{vendor}==\"QEMU    \"", &disk, true),
            ("ATTRS{model}==\"QEMU HARDDISK\"", &disk, true),
            ("KERNELS==\"2-1\"", &disk, true),
            ("KERNELS==\"sdb\"", &disk, true),
            ("SUBSYSTEMS==\"usb\"", &disk, true),
            ("SUBSYSTEMS==\"pci\"", &disk, true),
            ("DRIVERS==\"usb-storage\"", &disk, true),
            ("DRIVERS==\"sd\"", &disk, true),
            ("DRIVERS==\"nvme\"", &disk, false),
            ("DRIVER==\"sd\"", &disk, false),
            // All parent keys on ONE device: the idVendor is on 2-1, the model on 6:0:0:0.
            ("ATTRS{idVendor}==\"46f4\", ATTRS{model}==\"QEMU HARDDISK\"", &disk, false),
            ("ATTRS{idVendor}==\"46f4\", ATTRS{serial}==\"ABC123\"", &disk, true),
            ("KERNELS==\"2-1\", ATTRS{serial}==\"ABC123\"", &disk, true),
            ("KERNELS==\"2-1:1.0\", ATTRS{serial}==\"ABC123\"", &disk, false),
            ("SUBSYSTEMS==\"scsi\", DRIVERS==\"sd\", ATTRS{vendor}==\"QEMU\"", &disk, true),
            ("SUBSYSTEMS==\"usb\", ATTRS{vendor}==\"QEMU\"", &disk, false),
            // != on a parent key holds on the first device where every parent key holds.
            ("ATTRS{serial}!=\"ABC123\", KERNELS==\"usb2\"", &disk, true),
            ("SUBSYSTEMS==\"subsystem\"", &disk, false),
        ];
        for (rule, event, want) in cases {
            assert_eq!(matches(&t, rule, event), *want, "{rule}");
        }
    }

    #[test]
    fn first_match_wins_and_attributes_are_read_once() {
        let t = Tree::stick(b"ABC123");
        let mut text = String::new();
        for i in 0..50 {
            text.push_str(&format!(
                "SUBSYSTEM==\"block\", ATTRS{{idVendor}}==\"46f4\", ATTRS{{serial}}==\"S{i}\", ATTACH=\"q{i}\"\n"
            ));
        }
        text.push_str("SUBSYSTEM==\"block\", ATTRS{idVendor}==\"46f4\", ATTRS{serial}==\"ABC123\", ATTACH=\"mine\"\n");
        text.push_str("SUBSYSTEM==\"block\", ATTRS{serial}==\"ABC123\", ATTACH=\"later\"\n");
        let parsed = parse("r", &text);
        let sysfs = Sysfs::new(t.root()).unwrap();
        let disk = disk_add();
        let event = Uevent::parse(&disk).unwrap();
        let mut m = Matcher::new(&parsed.set);
        let i = m.first_match(&sysfs, &parsed.set, &event).unwrap();
        assert_eq!(&*parsed.set.rules[i].attach, "mine");
        // idVendor and serial on each of the 9 levels walked, read once however many rules ask.
        let reads = sysfs.reads();
        assert!(reads <= 2 * 9, "{reads} reads");
        m.first_match(&sysfs, &parsed.set, &event).unwrap();
        assert_eq!(sysfs.reads(), 2 * reads, "a new event reads again");
    }
}
