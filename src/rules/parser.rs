//! Reading rule text, as systemd's `src/udev/udev-rules.c` reads it.
//!
//! - Lines (udev_rules_parse_file): a line ends at `\n`, `\r\n`, `\r` or NUL (read_line);
//!   leading whitespace is dropped; a line whose first other byte is `#` is skipped, even in
//!   the middle of a continuation; a line ending in `\` continues on the next one (the `\`
//!   removed, the next line's leading whitespace dropped); a joined line that comes out
//!   empty is skipped; a continuation cut by the end of the file is an error, as is a line of
//!   16384 bytes or more (UDEV_LINE_SIZE).
//! - Tokens (parse_line, udev_rule_parse_value): `KEY{attr} op value` separated by
//!   whitespace and commas (a missing comma is only a style warning, see [`super::lint`]);
//!   a value is `"..."` (only `\"` is an escape), `e"..."` (C escapes: cunescape), `i"..."`
//!   (case-insensitive match), or `ei"..."`/`ie"..."`.
//!
//! Every error of every line is collected, with its place (`file:line:col`), and a hint
//! where one helps; a line with an error loads no rule.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::{Key, NO_MEMO, Pattern, Rule, RuleError, RuleSet, Test};
use crate::names;

/// udev's UDEV_LINE_SIZE: the longest line it reads, continuations joined, is one less.
pub const LINE_SIZE: usize = 16384;

/// Where rules were looked for, and what was found there (for `check`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Source {
    /// A path, or `qubesdb:/vm-config/autoattach-rules`.
    pub origin: String,
    pub found: Found,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Found {
    /// Text read: this many rules loaded from it.
    Rules(usize),
    /// A directory with this many `*.rules` files.
    Directory(usize),
    /// Not there (and not required).
    Missing,
    /// There, but it could not be read (the error says why).
    Unreadable,
    /// It could not be asked this time (qubesdb not answering): nothing is wrong with the
    /// rules, but they are incomplete without it ([`Parsed::unreachable`] says why).
    Unreachable,
}

/// The result of parsing: what loaded, what is wrong, and what looks risky.
#[derive(Debug, Default)]
pub struct Parsed {
    pub set: RuleSet,
    pub errors: Vec<RuleError>,
    pub warnings: Vec<RuleError>,
    /// Every place rules were looked for, in order.
    pub sources: Vec<Source>,
    /// Why a source could not be asked (qubesdb not answering): not an error in the rules,
    /// and one that may heal by waiting. Rules loaded without it are incomplete: `run` does
    /// not start on them (exit 4, which systemd restarts), and a reload keeps the old ones.
    pub unreachable: Vec<RuleError>,
    /// The distinct event-device tests seen so far, as text, for [`Test::memo`].
    memo_keys: Vec<Box<str>>,
}

impl Parsed {
    /// Parses one more source (a file's text, or qubesdb's), appending to what is loaded.
    pub fn add(&mut self, origin: &str, text: &str) {
        let origin: Arc<str> = origin.into();
        let before = self.set.rules.len();
        for line in logical_lines(&origin, text, &mut self.errors) {
            let mut p = LineParser {
                origin: &origin,
                line: &line,
                pos: 0,
                errors: &mut self.errors,
                warnings: &mut self.warnings,
                attrs: &mut self.set.attrs,
                memo_keys: &mut self.memo_keys,
            };
            if let Some(rule) = p.rule() {
                self.warnings.extend(super::lint::rule(&rule, line.place(line.first())));
                self.set.rules.push(rule);
            }
        }
        self.set.rules.shrink_to_fit();
        self.set.memos = self.memo_keys.len();
        let found = Found::Rules(self.set.rules.len() - before);
        self.sources.push(Source { origin: origin.to_string(), found });
    }

    /// An error that is not tied to a line (unreadable file).
    pub fn file_error(&mut self, origin: &str, message: String) {
        self.errors.push(RuleError { origin: origin.into(), line: 0, col: 0, message, hint: None });
    }

    /// A source that could not be asked this time ([`Parsed::unreachable`]).
    pub fn unreachable(&mut self, origin: &str, message: String, hint: &str) {
        let error = RuleError { origin: origin.into(), line: 0, col: 0, message, hint: Some(hint.into()) };
        self.unreachable.push(error);
        self.sources.push(Source { origin: origin.into(), found: Found::Unreachable });
    }

    /// Reads files and directories in order: a directory contributes its `*.rules` files in
    /// name order (not subdirectories, even named `*.rules`; a dangling link is reported). A
    /// path that does not exist is an error if `required`.
    pub fn add_path(&mut self, path: &Path, required: bool) {
        let shown = path.display().to_string();
        let unreadable = |p: &mut Parsed, what: &str, e: &std::io::Error| {
            p.file_error(&shown, format!("cannot {what}: {}", io_reason(e)));
            p.sources.push(Source { origin: shown.clone(), found: Found::Unreadable });
        };
        let meta = match std::fs::metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {
                return self.sources.push(Source { origin: shown, found: Found::Missing });
            }
            Err(e) => return unreadable(self, "read", &e),
        };
        if !meta.is_dir() {
            return match std::fs::read_to_string(path) {
                Ok(text) => self.add(&shown, &text),
                Err(e) => unreadable(self, "read", &e),
            };
        }
        let files = match rules_files(path) {
            Ok(files) => files,
            Err(e) => return unreadable(self, "list", &e),
        };
        self.sources.push(Source { origin: shown, found: Found::Directory(files.len()) });
        for file in files {
            self.add_path(&file, true);
        }
    }
}

/// The `*.rules` entries of a directory that are not directories, sorted by name.
pub fn rules_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "rules") && !p.is_dir())
        .collect();
    files.sort();
    Ok(files)
}

pub(super) fn io_reason(e: &std::io::Error) -> String {
    let text = e.to_string();
    text.split(" (os error").next().unwrap_or(&text).to_owned()
}

/// Parses rule text from one origin.
pub fn parse(origin: &str, text: &str) -> Parsed {
    let mut parsed = Parsed::default();
    parsed.add(origin, text);
    parsed
}

// ---------------------------------------------------------------------------------------------
// Lines

/// A rule line after `\` continuations are joined, with where each piece came from.
pub(super) struct LogicalLine {
    pub(super) text: String,
    /// (offset in `text`, 1-based line, 1-based column of that offset).
    pieces: Vec<(usize, usize, usize)>,
}

impl LogicalLine {
    /// The line and column of byte `offset` of the joined text.
    pub(super) fn place(&self, offset: usize) -> (usize, usize) {
        let &(start, line, col) =
            self.pieces.iter().rev().find(|(start, ..)| *start <= offset).unwrap_or(&self.pieces[0]);
        let end = offset.min(self.text.len());
        (line, col + self.text.get(start..end).map_or(end - start, |s| s.chars().count()))
    }

    /// The offset of the first byte that is not whitespace.
    pub(super) fn first(&self) -> usize {
        self.text.len() - self.text.trim_start_matches(is_ws).len()
    }

    fn push(&mut self, piece: &str, line: usize, col: usize) {
        self.pieces.push((self.text.len(), line, col));
        self.text.push_str(piece);
    }
}

/// udev's WHITESPACE (" \t\n\r").
fn is_ws(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r')
}

/// The physical lines of `text` as systemd's read_line ends them: at `\n`, `\r\n`, `\r` or NUL.
fn physical_lines(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = Some(text);
    std::iter::from_fn(move || {
        let t = rest?;
        match t.find(['\n', '\r', '\0']) {
            Some(i) => {
                let skip = if t[i..].starts_with("\r\n") { 2 } else { 1 };
                rest = Some(&t[i + skip..]).filter(|r| !r.is_empty());
                Some(&t[..i])
            }
            None => {
                rest = None;
                Some(t).filter(|t| !t.is_empty())
            }
        }
    })
}

/// Joins physical lines into rule lines exactly as udev_rules_parse_file does.
fn logical_lines(origin: &Arc<str>, text: &str, errors: &mut Vec<RuleError>) -> Vec<LogicalLine> {
    let error = |errors: &mut Vec<RuleError>, line, message: &str| {
        errors.push(RuleError { origin: origin.clone(), line, col: 1, message: message.into(), hint: None });
    };
    let mut out = Vec::new();
    // A continuation being joined; `too_long` once it has passed LINE_SIZE (udev then ignores
    // it up to its end).
    let (mut current, mut too_long) = (None::<LogicalLine>, false);
    let mut last = 0;
    for (n, raw) in physical_lines(text).enumerate() {
        last = n + 1;
        if raw.len() >= LINE_SIZE {
            error(errors, n + 1, "line is longer than 16383 bytes: udev refuses the whole file");
            return Vec::new();
        }
        let body = raw.trim_start_matches(is_ws);
        if body.starts_with('#') {
            continue;
        }
        let col = raw.len() - body.len() + 1;
        let mut line = match current.take() {
            Some(mut joined) => {
                too_long |= joined.text.len() + body.len() >= LINE_SIZE;
                joined.push(body, n + 1, col);
                joined
            }
            None => LogicalLine { text: body.to_owned(), pieces: vec![(0, n + 1, col)] },
        };
        if line.text.ends_with('\\') {
            line.text.pop();
            current = Some(line);
            continue;
        }
        if too_long {
            error(errors, n + 1, "line is too long (16384 bytes or more with its continuations): udev ignores it");
        } else if !line.text.is_empty() {
            out.push(line);
        }
        too_long = false;
    }
    if current.is_some() {
        error(errors, last, "the file ends in a line continuation ('\\'): udev ignores that line");
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Tokens

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
    warnings: &'a mut Vec<RuleError>,
    attrs: &'a mut Vec<Arc<str>>,
    memo_keys: &'a mut Vec<Box<str>>,
}

/// One `KEY{attr} op value` as written, with offsets for messages.
struct Token<'t> {
    key: &'t str,
    key_at: usize,
    attr: Option<&'t str>,
    op: Op,
    op_at: usize,
    value: Vec<u8>,
    value_at: usize,
    /// Written `i"..."`.
    casefold: bool,
}

impl Token<'_> {
    /// The value as text, for messages.
    fn shown(&self) -> String {
        crate::log::Escaped(&self.value).to_string()
    }
}

impl<'a> LineParser<'a> {
    fn error(&mut self, offset: usize, message: String, hint: Option<String>) {
        let (line, col) = self.line.place(offset);
        self.errors.push(RuleError { origin: self.origin.clone(), line, col, message, hint });
    }

    fn rest(&self) -> &'a str {
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
        let first_at = self.line.first();
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
            let gap_at = self.pos;
            self.skip(|c| is_ws(c) || c == ',');
            if self.rest().is_empty() {
                break;
            }
            if gap_at > 0 {
                self.delimiter(gap_at);
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

    /// Between two tokens udev 254+ (`udevadm verify`, check_token_delimiters) expects one
    /// comma: without one it says "style: a comma between tokens is expected".
    fn delimiter(&mut self, gap_at: usize) {
        if !self.line.text[gap_at..self.pos].contains(',') {
            let (line, col) = self.line.place(self.pos);
            self.warnings.push(RuleError {
                origin: self.origin.clone(),
                line,
                col,
                message: "a comma between keys is expected (udevadm verify says so too)".into(),
                hint: Some("separate keys with \", \"".into()),
            });
        }
    }

    /// Reads one token; on a syntax error, records it and returns None (the rest of the line
    /// cannot be trusted).
    fn token(&mut self) -> Option<Token<'a>> {
        let text: &'a str = &self.line.text;
        let key_at = self.pos;
        let key_len = self.rest().find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(self.rest().len());
        if key_len == 0 {
            let c = self.rest().chars().next().unwrap_or(' ');
            self.error(key_at, format!("expected a key, found '{}'", c.escape_default()), None);
            return None;
        }
        self.pos += key_len;
        let attr = self.attr()?;
        self.skip(is_ws);
        let (op, op_at) = self.operator(&text[key_at..key_at + key_len])?;
        self.skip(is_ws);
        let value_at = self.pos;
        let (value, casefold) = self.value()?;
        Some(Token {
            key: &text[key_at..key_at + key_len],
            key_at,
            attr: attr.map(|(a, b)| &text[a..b]),
            op,
            op_at,
            value,
            value_at,
            casefold,
        })
    }

    /// An optional `{attr}` right after the key: its byte range.
    fn attr(&mut self) -> Option<Option<(usize, usize)>> {
        if !self.rest().starts_with('{') {
            return Some(None);
        }
        let Some(end) = self.rest().find('}') else {
            self.error(self.pos, "'{' without '}'".into(), None);
            return None;
        };
        let range = (self.pos + 1, self.pos + end);
        self.pos += end + 1;
        Some(Some(range))
    }

    fn operator(&mut self, key: &str) -> Option<(Op, usize)> {
        let op_at = self.pos;
        let ops = [
            ("==", Op::Match),
            ("!=", Op::NoMatch),
            ("+=", Op::Add),
            ("-=", Op::Remove),
            (":=", Op::Final),
            ("=", Op::Assign),
        ];
        let Some((op_text, op)) = ops.into_iter().find(|(s, _)| self.rest().starts_with(s)) else {
            self.error(op_at, format!("expected an operator after {key}"), Some("use == or != to match".into()));
            return None;
        };
        self.pos += op_text.len();
        Some((op, op_at))
    }

    /// A value with its optional `e`/`i` prefixes (udev_rule_parse_value): the bytes udev
    /// sees, and whether it matches case-insensitively.
    fn value(&mut self) -> Option<(Vec<u8>, bool)> {
        let at = self.pos;
        let (mut escaped, mut casefold) = (false, false);
        for c in self.rest().bytes().take(2).take_while(|&c| c != b'"') {
            match c {
                b'e' if !escaped => escaped = true,
                b'i' if !casefold => casefold = true,
                _ => {
                    let hint = "a value is \"...\", or e\"...\" (C escapes), i\"...\" (any case), ei\"...\"";
                    self.error(at, "expected a value in double quotes".into(), Some(hint.into()));
                    return None;
                }
            }
        }
        self.pos += usize::from(escaped) + usize::from(casefold);
        if !self.rest().starts_with('"') {
            self.error(at, "expected a value in double quotes".into(), None);
            return None;
        }
        let body = &self.rest()[1..];
        let (value, len) = if escaped { c_unescape(body) } else { Ok(plain(body)) }.unwrap_or_else(|e| (Err(e), 0));
        match value {
            Ok(v) => {
                self.pos += 1 + len + 1;
                Some((v, casefold))
            }
            Err(why) => {
                self.error(at, why, None);
                None
            }
        }
    }
}

type Unescaped = (Result<Vec<u8>, String>, usize);

/// A `"..."` body up to its closing quote: `\"` is a quote, every other byte kept as is. The
/// value, and the length of the body consumed (without the closing quote).
fn plain(body: &str) -> Unescaped {
    let b = body.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'"' => return (Ok(out), i),
            b'\\' if b.get(i + 1) == Some(&b'"') => {
                out.push(b'"');
                i += 2;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    (Err("value has no closing quote".into()), 0)
}

/// An `e"..."` body: the end is the first `"` not after a `\`, and the whole body is then
/// unescaped as systemd's cunescape_length (flags 0: an unknown escape or a NUL is an error).
fn c_unescape(body: &str) -> Result<Unescaped, String> {
    let b = body.as_bytes();
    let mut end = 0;
    loop {
        match b.get(end) {
            None => return Err("value has no closing quote".into()),
            Some(b'"') => break,
            Some(b'\\') if end + 1 < b.len() => end += 2,
            Some(b'\\') => return Err("value has no closing quote".into()),
            Some(_) => end += 1,
        }
    }
    let raw = &b[..end];
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        if raw[i] != b'\\' {
            out.push(raw[i]);
            i += 1;
            continue;
        }
        let (n, bytes) = escape_one(&raw[i + 1..]).ok_or_else(|| {
            let seq = String::from_utf8_lossy(&raw[i..(i + 2).min(raw.len())]).into_owned();
            format!("invalid escape sequence {seq:?} in e\"...\" (cunescape refuses it)")
        })?;
        out.extend_from_slice(bytes.as_slice());
        i += 1 + n;
    }
    Ok((Ok(out), end))
}

/// One escape after its `\` (systemd's cunescape_one, no NUL accepted): how many bytes it
/// took and the bytes it stands for (a code point above 0x7f from `\u`/`\U` as UTF-8; `\x`
/// and octal as one raw byte).
fn escape_one(p: &[u8]) -> Option<(usize, smallvec::SmallVec<[u8; 4]>)> {
    let hex = |s: &[u8]| -> Option<u32> { s.iter().try_fold(0u32, |v, &c| Some(v * 16 + char::from(c).to_digit(16)?)) };
    let one = |b: u8| smallvec::smallvec![b];
    Some(match *p.first()? {
        b'a' => (1, one(0x07)),
        b'b' => (1, one(0x08)),
        b'f' => (1, one(0x0c)),
        b'n' => (1, one(b'\n')),
        b'r' => (1, one(b'\r')),
        b't' => (1, one(b'\t')),
        b'v' => (1, one(0x0b)),
        b'\\' => (1, one(b'\\')),
        b'"' => (1, one(b'"')),
        b'\'' => (1, one(b'\'')),
        b's' => (1, one(b' ')),
        b'x' => (3, one(u8::try_from(hex(p.get(1..3)?)?).ok().filter(|&v| v != 0)?)),
        b'0'..=b'7' => {
            let digits = p.get(..3)?;
            let v = digits.iter().try_fold(0u32, |v, &c| Some(v * 8 + char::from(c).to_digit(8)?))?;
            (3, one(u8::try_from(v).ok().filter(|&v| v != 0)?))
        }
        b'u' => (5, utf8(hex(p.get(1..5)?)?, false)?),
        b'U' => (9, utf8(hex(p.get(1..9)?)?, true)?),
        _ => return None,
    })
}

/// systemd's utf8_encode_unichar of a `\u`/`\U` escape. `\U` must be a valid code point
/// (unichar_is_valid); `\u` is encoded as is, surrogates included, as systemd does.
fn utf8(c: u32, checked: bool) -> Option<smallvec::SmallVec<[u8; 4]>> {
    if c == 0 || (checked && !unichar_is_valid(c)) {
        return None;
    }
    let mut out = smallvec::SmallVec::new();
    match c {
        0..=0x7f => out.push(c as u8),
        0x80..=0x7ff => out.extend([0xc0 | (c >> 6) as u8, 0x80 | (c & 0x3f) as u8]),
        0x800..=0xffff => out.extend([0xe0 | (c >> 12) as u8, 0x80 | ((c >> 6) & 0x3f) as u8, 0x80 | (c & 0x3f) as u8]),
        _ => out.extend([
            0xf0 | (c >> 18) as u8,
            0x80 | ((c >> 12) & 0x3f) as u8,
            0x80 | ((c >> 6) & 0x3f) as u8,
            0x80 | (c & 0x3f) as u8,
        ]),
    }
    Some(out)
}

/// systemd's unichar_is_valid: below 0x110000, not a UTF-16 surrogate, not U+FDD0..U+FDEF,
/// not U+xFFFE or U+xFFFF.
fn unichar_is_valid(c: u32) -> bool {
    c < 0x110000 && (c & 0xffff_f800) != 0xd800 && !(0xfdd0..=0xfdef).contains(&c) && (c & 0xfffe) != 0xfffe
}

// ---------------------------------------------------------------------------------------------
// Tokens into tests and actions

impl LineParser<'_> {
    fn apply(&mut self, t: Token<'_>, rule: &mut Rule, attach_at: &mut Option<usize>) {
        let is_match = matches!(t.op, Op::Match | Op::NoMatch);
        if t.casefold && !is_match {
            let message = format!("the i\"...\" prefix is for == and != only, not {}{}", t.key, t.op.as_str());
            return self.error(t.value_at, message, Some("udev refuses it too".into()));
        }
        if ACTION_KEYS.contains(&t.key) {
            return self.apply_action(t, rule, attach_at);
        }
        if !MATCH_KEYS.contains(&t.key) {
            return self.unknown_key(&t);
        }
        let wants_attr = matches!(t.key, "ENV" | "ATTR" | "ATTRS");
        match (wants_attr, t.attr) {
            (true, None) | (true, Some("")) => {
                return self.error(t.key_at, format!("{} needs a name: {}{{name}}", t.key, t.key), None);
            }
            (false, Some(_)) => return self.error(t.key_at, format!("{} takes no {{...}}", t.key), None),
            _ => {}
        }
        if !is_match {
            return self.not_a_match(&t);
        }
        let Some(key) = self.key(&t) else { return };
        let negate = t.op == Op::NoMatch;
        let memo = if key.is_parent() { NO_MEMO } else { self.memo(&key, negate, &t) };
        let pattern = Pattern::compile(&t.value, &key, t.casefold);
        let test = Test { pattern, negate, col: self.line.place(t.key_at).1, key, memo };
        if test.key.is_parent() {
            rule.parent_tests.push(test);
        } else {
            rule.tests.push(test);
        }
    }

    /// The index of this test among the distinct event-device tests.
    fn memo(&mut self, key: &Key, negate: bool, t: &Token<'_>) -> u16 {
        let op = if negate { "!=" } else { "==" };
        let text = format!("{key}{op}{}\"{}\"", if t.casefold { "i" } else { "" }, t.shown());
        match self.memo_keys.iter().position(|k| **k == *text) {
            Some(i) => i as u16,
            None if self.memo_keys.len() < usize::from(NO_MEMO) => {
                self.memo_keys.push(text.into());
                (self.memo_keys.len() - 1) as u16
            }
            None => NO_MEMO,
        }
    }

    /// A match key written with an assignment operator.
    fn not_a_match(&mut self, t: &Token<'_>) {
        let (key, attr, op) = (t.key, t.attr.unwrap_or_default(), t.op.as_str());
        let hint = match key {
            "ATTR" | "ATTRS" | "ENV" => format!(
                "{key}{{{attr}}}{op}\"...\" would set a value in udev; autoattach only matches: write {key}{{{attr}}}==\"{}\"",
                t.shown()
            ),
            _ => format!("to match, write {key}==\"{}\"", t.shown()),
        };
        self.error(t.op_at, format!("{key} can only be matched with == or !=, not {op}"), Some(hint));
    }

    /// The key of a match token, its attribute name checked.
    fn key(&mut self, t: &Token<'_>) -> Option<Key> {
        Some(match t.key {
            "ACTION" => Key::Action,
            "DEVPATH" => Key::Devpath,
            "KERNEL" => Key::Kernel,
            "SUBSYSTEM" => Key::Subsystem,
            "DRIVER" => Key::Driver,
            "KERNELS" => Key::Kernels,
            "SUBSYSTEMS" => Key::Subsystems,
            "DRIVERS" => Key::Drivers,
            // udev takes any name; one that is not [A-Za-z0-9_] is in no kernel uevent, which
            // the lint says.
            "ENV" => Key::Env(t.attr.unwrap_or_default().into()),
            attr_key => {
                let name = t.attr.unwrap_or_default();
                if let Err(why) = check_attr_name(name) {
                    self.error(t.key_at, format!("{attr_key}{{{name}}}: {why}"), None);
                    return None;
                }
                let (name, id) = intern(self.attrs, name);
                if attr_key == "ATTR" { Key::Attr(name, id) } else { Key::Attrs(name, id) }
            }
        })
    }

    fn apply_action(&mut self, t: Token<'_>, rule: &mut Rule, attach_at: &mut Option<usize>) {
        if t.attr.is_some() {
            return self.error(t.key_at, format!("{} takes no {{...}}", t.key), None);
        }
        if t.op != Op::Assign {
            let hint = format!("{} is an action: write {}=\"{}\"", t.key, t.key, t.shown());
            return self.error(t.op_at, format!("{} takes =, not {}", t.key, t.op.as_str()), Some(hint));
        }
        let Ok(value) = std::str::from_utf8(&t.value) else {
            return self.error(t.value_at, format!("{}=\"{}\": not UTF-8", t.key, t.shown()), None);
        };
        match t.key {
            "ATTACH" => self.attach(&t, value, rule, attach_at),
            "TIMEOUT" | "DEBOUNCE" => match parse_duration(value) {
                Some(d) if t.key == "TIMEOUT" => rule.timeout = Some(d),
                Some(d) => rule.debounce = Some(d),
                None => self.error(
                    t.value_at,
                    format!("{}=\"{}\": not a duration", t.key, t.shown()),
                    Some("write e.g. \"30s\", \"2m\" or \"500ms\" (at most 24h)".into()),
                ),
            },
            _ => match parse_rate(value) {
                Some(rate) => rule.rate_limit = Some(rate),
                None => self.error(
                    t.value_at,
                    format!("RATELIMIT=\"{}\": not a rate", t.shown()),
                    Some("write COUNT/DURATION, e.g. \"3/1m\"".into()),
                ),
            },
        }
    }

    fn attach(&mut self, t: &Token<'_>, value: &str, rule: &mut Rule, attach_at: &mut Option<usize>) {
        if let Some(first) = *attach_at {
            let (line, col) = self.line.place(first);
            let message = format!("second ATTACH (the first is at {line}:{col})");
            return self.error(t.key_at, message, Some("a rule attaches to one qube".into()));
        }
        *attach_at = Some(t.key_at);
        if let Err(e) = names::check_qube(value) {
            let hint = match e {
                names::NameError::BadByte(_) | names::NameError::BadFirst => {
                    Some("qube names are 1-31 of [A-Za-z0-9_.-], starting with a letter".into())
                }
                _ => None,
            };
            return self.error(t.value_at, format!("ATTACH=\"{}\": {e}", t.shown()), hint);
        }
        rule.attach = value.into();
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
pub(super) fn distance(a: &str, b: &str) -> usize {
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

#[cfg(test)]
pub(super) fn value_for_test(text: &str) -> Option<(Vec<u8>, bool, usize)> {
    let line = LogicalLine { text: text.to_owned(), pieces: vec![(0, 1, 1)] };
    let origin: Arc<str> = "t".into();
    let (mut errors, mut warnings, mut attrs, mut memo) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut p = LineParser {
        origin: &origin,
        line: &line,
        pos: 0,
        errors: &mut errors,
        warnings: &mut warnings,
        attrs: &mut attrs,
        memo_keys: &mut memo,
    };
    let (v, i) = p.value()?;
    Some((v, i, p.pos))
}

#[cfg(test)]
pub(super) fn joined_for_test(text: &str) -> (Vec<(String, usize)>, Vec<String>) {
    let mut errors = Vec::new();
    let lines = logical_lines(&"t".into(), text, &mut errors);
    let lines = lines.iter().map(|l| (l.text.clone(), l.place(l.first()).0)).collect();
    (lines, errors.iter().map(|e| e.message.clone()).collect())
}
