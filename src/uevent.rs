//! Kernel uevents: the netlink datagram format and the text `udevadm monitor` prints.
//!
//! A kernel uevent datagram is `ACTION@DEVPATH\0KEY=VALUE\0KEY=VALUE\0...` with no netlink
//! header (lib/kobject_uevent.c). [`Uevent`] borrows the receive buffer: parsing allocates
//! nothing, and at most [`MAX_VARS`] variables fit, as in the kernel (UEVENT_NUM_ENVP).
//!
//! Rejection happens before anything is trusted: a datagram that is empty, not NUL-terminated,
//! lacks the `ACTION@DEVPATH` header, names an unknown action or an unsafe devpath, lacks
//! ACTION/DEVPATH/SUBSYSTEM, or whose header disagrees with its variables is refused whole.
//! A variable whose value is not UTF-8, holds control characters or is longer than
//! [`MAX_VALUE`] costs only that variable (garbage USB strings exist); the event is kept and
//! the loss is counted.
//!
//! The same [`Uevent`] is built from the text of `udevadm monitor --kernel --property`, which
//! users can capture on a real sys-usb; [`MonitorText`] reads it and [`Uevent::write_monitor`]
//! prints it back, so fixtures round-trip.

use std::fmt;
use std::io::{self, Write};

/// The most variables a uevent carries (the kernel's UEVENT_NUM_ENVP).
pub const MAX_VARS: usize = 64;
/// The longest value kept (the kernel's whole variable buffer, UEVENT_BUFFER_SIZE).
pub const MAX_VALUE: usize = 2048;

/// What happened to the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    Add,
    Remove,
    Change,
    Move,
    Online,
    Offline,
    Bind,
    Unbind,
}

impl Action {
    /// Every action, in the kernel's order (kobject_actions[]).
    pub const ALL: [Action; 8] = [
        Action::Add,
        Action::Remove,
        Action::Change,
        Action::Move,
        Action::Online,
        Action::Offline,
        Action::Bind,
        Action::Unbind,
    ];

    pub fn parse(s: &[u8]) -> Option<Action> {
        Some(match s {
            b"add" => Action::Add,
            b"remove" => Action::Remove,
            b"change" => Action::Change,
            b"move" => Action::Move,
            b"online" => Action::Online,
            b"offline" => Action::Offline,
            b"bind" => Action::Bind,
            b"unbind" => Action::Unbind,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Action::Add => "add",
            Action::Remove => "remove",
            Action::Change => "change",
            Action::Move => "move",
            Action::Online => "online",
            Action::Offline => "offline",
            Action::Bind => "bind",
            Action::Unbind => "unbind",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One `KEY=VALUE` variable, borrowed from the datagram or text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Var<'a> {
    pub key: &'a str,
    pub value: &'a str,
}

/// Why a datagram or text block was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParseError {
    Empty,
    /// The last byte is not NUL: the datagram was cut, or is not a uevent.
    NotTerminated,
    /// A `libudev` message (udev's own format): not from the kernel.
    Libudev,
    /// No `ACTION@DEVPATH` header before the first NUL.
    NoHeader,
    UnknownAction,
    /// The devpath is not an absolute path of plain components (`..`, `//`, ...).
    BadDevpath,
    /// A variable without `=`, or with an empty or non-`[A-Za-z0-9_]` key.
    BadVariable,
    TooManyVariables,
    Missing(&'static str),
    /// The header and the variable of that name disagree.
    Mismatch(&'static str),
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParseError::Empty => f.write_str("empty datagram"),
            ParseError::NotTerminated => f.write_str("not NUL-terminated (truncated?)"),
            ParseError::Libudev => f.write_str("libudev message, not a kernel uevent"),
            ParseError::NoHeader => f.write_str("no ACTION@DEVPATH header"),
            ParseError::UnknownAction => f.write_str("unknown action"),
            ParseError::BadDevpath => f.write_str("devpath is not a plain absolute path"),
            ParseError::BadVariable => f.write_str("malformed KEY=VALUE variable"),
            ParseError::TooManyVariables => write!(f, "more than {MAX_VARS} variables"),
            ParseError::Missing(k) => write!(f, "no {k} variable"),
            ParseError::Mismatch(k) => write!(f, "header and {k} variable disagree"),
        }
    }
}

impl std::error::Error for ParseError {}

/// A parsed uevent borrowing its bytes. Nothing is allocated.
#[derive(Clone, Debug)]
pub struct Uevent<'a> {
    pub action: Action,
    pub devpath: &'a str,
    pub subsystem: &'a str,
    pub seqnum: Option<u64>,
    /// The bytes the variables lie in: the datagram, or the monitor text.
    base: &'a [u8],
    /// Where each kept variable lies in `base` (8 bytes each, so the event stays small).
    vars: heapless::Vec<Span, MAX_VARS>,
    dropped: u8,
    first_dropped: &'a [u8],
}

/// Where one `KEY=VALUE` lies: its key starts at `start`, its value `skip` bytes after the
/// `=` (a monitor capture's `DEVNAME=/dev/sdb` is the kernel's `sdb`). A kept value is valid
/// UTF-8 without control bytes, checked when it was pushed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Span {
    start: u32,
    key: u8,
    skip: u8,
    value: u16,
}

/// The longest variable name kept (the kernel's are a few bytes).
const MAX_KEY: usize = u8::MAX as usize;

impl Span {
    fn key(self, base: &[u8]) -> &[u8] {
        &base[self.start as usize..][..self.key as usize]
    }

    fn value(self, base: &[u8]) -> &str {
        let at = self.start as usize + self.key as usize + 1 + self.skip as usize;
        std::str::from_utf8(&base[at..][..self.value as usize]).unwrap_or_default()
    }

    fn var(self, base: &[u8]) -> Var<'_> {
        Var { key: std::str::from_utf8(self.key(base)).unwrap_or_default(), value: self.value(base) }
    }
}

/// The variables of an event, in order (see [`Uevent::vars`]). Two of them are equal when
/// they yield the same variables.
#[derive(Clone, Debug)]
pub struct Vars<'e, 'a> {
    event: &'e Uevent<'a>,
    next: usize,
}

impl<'a> Iterator for Vars<'_, 'a> {
    type Item = Var<'a>;

    fn next(&mut self) -> Option<Var<'a>> {
        let e = self.event;
        let var = e.vars.get(self.next)?.var(e.base);
        self.next += 1;
        Some(var)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = self.event.vars.len().saturating_sub(self.next);
        (left, Some(left))
    }
}

impl ExactSizeIterator for Vars<'_, '_> {}

impl PartialEq for Vars<'_, '_> {
    fn eq(&self, other: &Self) -> bool {
        self.clone().eq(other.clone())
    }
}

impl<'a> Uevent<'a> {
    /// Parses a kernel datagram (`ACTION@DEVPATH\0KEY=VALUE\0...`).
    ///
    /// A datagram of printable UTF-8 (the kernel's usual) is checked as UTF-8 once, scanned a
    /// word at a time for its NULs and sliced in place; one with control bytes or invalid
    /// UTF-8 anywhere takes the general path, which checks each value on its own so that a
    /// bad value costs only its key.
    #[inline]
    pub fn parse(buf: &'a [u8]) -> Result<Uevent<'a>, ParseError> {
        if buf.is_empty() {
            return Err(ParseError::Empty);
        }
        if buf.starts_with(b"libudev\0") {
            return Err(ParseError::Libudev);
        }
        if buf.last() != Some(&0) {
            return Err(ParseError::NotTerminated);
        }
        let body = &buf[..buf.len() - 1];
        // The fast path keeps offsets in 16 bits: kernel datagrams are under 8 KiB.
        if body.len() <= usize::from(u16::MAX) && !has_control_bytes(body) {
            // SAFETY: every byte of `body` is NUL or in 0x20..=0x7e (has_control_bytes is exact
            // and tested against a byte-at-a-time check), so it is ASCII and thus valid UTF-8.
            let text = unsafe { std::str::from_utf8_unchecked(body) };
            return Self::parse_clean(text);
        }
        let mut fields = body.split(|&b| b == 0);
        let header = fields.next().unwrap_or_default();
        let at = header.iter().position(|&b| b == b'@').ok_or(ParseError::NoHeader)?;
        let action = Action::parse(&header[..at]).ok_or(ParseError::UnknownAction)?;
        let devpath = std::str::from_utf8(&header[at + 1..]).map_err(|_| ParseError::BadDevpath)?;
        let mut builder = Builder::new(body);
        for field in fields {
            let eq = field.iter().position(|&b| b == b'=');
            let eq = eq.ok_or(ParseError::BadVariable)?;
            builder.push(&field[..eq], &field[eq + 1..])?;
        }
        builder.finish(Some((action, devpath)))
    }

    /// The fast path of [`Uevent::parse`]: `text` is valid UTF-8 without control bytes but
    /// the NUL separators, so fields need no check of their own beyond their shape.
    #[inline(always)]
    fn parse_clean(text: &'a str) -> Result<Uevent<'a>, ParseError> {
        let bytes = text.as_bytes();
        let end = find_nul(bytes, 0);
        let header = &text[..end];
        let at = header.find('@').ok_or(ParseError::NoHeader)?;
        let action = Action::parse(&bytes[..at]).ok_or(ParseError::UnknownAction)?;
        let devpath = &header[at + 1..];
        let mut builder = Builder { clean: true, ..Builder::new(bytes) };
        let mut pos = end + 1;
        while pos <= bytes.len() {
            // The key: [A-Za-z0-9_]+, then '='.
            let eq = key_len(bytes, pos);
            if eq == 0 || bytes.get(pos + eq) != Some(&b'=') {
                return Err(ParseError::BadVariable);
            }
            let end = find_nul(bytes, pos + eq + 1);
            builder.push_ascii(text, pos, eq, end)?;
            pos = end + 1;
        }
        builder.finish(Some((action, devpath)))
    }

    /// The value of `key`, if the event carries it (first occurrence).
    pub fn get(&self, key: &str) -> Option<&'a str> {
        let base = self.base;
        self.vars.iter().find(|s| s.key(base) == key.as_bytes()).map(|s| s.value(base))
    }

    /// Every variable, in order.
    pub fn vars(&self) -> Vars<'_, 'a> {
        Vars { event: self, next: 0 }
    }

    /// How many variables were dropped (value not UTF-8, or longer than [`MAX_VALUE`]), and the
    /// key of the first one, for a warning.
    pub fn dropped(&self) -> (u8, &'a [u8]) {
        (self.dropped, self.first_dropped)
    }

    pub fn devtype(&self) -> Option<&'a str> {
        self.get("DEVTYPE")
    }

    /// The kernel name: the last component of the devpath.
    pub fn kernel(&self) -> &'a str {
        kernel_name(self.devpath)
    }

    /// `MAJOR:MINOR`, when the event carries a valid pair.
    pub fn devnum(&self) -> Option<(u32, u32)> {
        let major = self.get("MAJOR")?.parse().ok()?;
        let minor = self.get("MINOR")?.parse().ok()?;
        Some((major, minor))
    }

    /// True for the kernel's "media changed" announcement on a removable block device.
    pub fn media_change(&self) -> bool {
        self.get("DISK_MEDIA_CHANGE") == Some("1")
    }

    /// Writes the event as `udevadm monitor --kernel --property` prints it (sd-device's
    /// DEVNAME: a path under `/dev/`). The kernel's names are relative and never empty, so
    /// every non-empty DEVNAME gets the prefix: the exact inverse of the monitor reader, which
    /// strips one `/dev/` (an empty or absolute name, which no kernel sends, reads back as is).
    pub fn write_monitor(&self, out: &mut impl Write) -> io::Result<()> {
        writeln!(out, "KERNEL[0.000000] {:<8} {} ({})", self.action.as_str(), self.devpath, self.subsystem)?;
        for v in self.vars() {
            let dev = if v.key == "DEVNAME" && !v.value.is_empty() { "/dev/" } else { "" };
            writeln!(out, "{}={dev}{}", v.key, v.value)?;
        }
        writeln!(out)
    }

    /// Serialises the event as the kernel would send it (for tests, benches and fuzzing).
    pub fn to_datagram(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(self.action.as_str().as_bytes());
        out.push(b'@');
        out.extend_from_slice(self.devpath.as_bytes());
        out.push(0);
        for v in self.vars() {
            out.extend_from_slice(v.key.as_bytes());
            out.push(b'=');
            out.extend_from_slice(v.value.as_bytes());
            out.push(0);
        }
        out
    }
}

/// The last component of a devpath (`/devices/.../sda1` -> `sda1`).
pub fn kernel_name(devpath: &str) -> &str {
    devpath.rsplit('/').next().unwrap_or(devpath)
}

/// True for `/a/b/c`: absolute, no empty, `.` or `..` component, no control bytes.
/// A devpath becomes a path under the sysfs root, so this is what keeps reads inside it.
pub fn devpath_is_safe(devpath: &str) -> bool {
    !devpath.bytes().any(|c| c < 0x20 || c == 0x7f) && devpath_shape_is_safe(devpath)
}

/// The shape part of [`devpath_is_safe`]: a leading '/', and after each '/' neither the end,
/// another '/', nor a "." or ".." component.
#[inline(always)]
fn devpath_shape_is_safe(devpath: &str) -> bool {
    let b = devpath.as_bytes();
    if b.first() != Some(&b'/') || b.last() == Some(&b'/') {
        return false;
    }
    // Eight bytes at a time: no '/' is followed by '/' or '.' (sysfs paths never have one) means
    // every component is plain; otherwise decide byte by byte.
    if !slash_then_slash_or_dot(b) {
        return true;
    }
    shape_bytewise(b)
}

/// The high bit of each byte of `word` that equals `byte`, exactly (no carries across bytes).
#[inline(always)]
fn bytes_equal(word: u64, byte: u8) -> u64 {
    const LOW7: u64 = 0x7f7f_7f7f_7f7f_7f7f;
    let x = word ^ (u64::from(byte) * 0x0101_0101_0101_0101);
    !(((x & LOW7) + LOW7) | x | LOW7)
}

/// True if some '/' in `b` is followed by '/' or '.'.
#[inline(always)]
fn slash_then_slash_or_dot(b: &[u8]) -> bool {
    let mut carry = 0u64; // the previous word's last byte was a '/'
    let mut chunks = b.chunks_exact(8);
    for chunk in &mut chunks {
        let word = u64::from_le_bytes(chunk.try_into().unwrap_or([0; 8]));
        let slash = bytes_equal(word, b'/');
        // '.' (0x2e) and '/' (0x2f) are the only bytes that are 0x2f with their low bit set.
        let next = bytes_equal(word | 0x0101_0101_0101_0101, b'/');
        // Byte k+1 of the word sits 8 bits above byte k (little endian).
        if (slash & (next >> 8)) != 0 || (carry & next & 0x80) != 0 {
            return true;
        }
        carry = slash >> 56;
    }
    let tail = chunks.remainder();
    let mut prev_slash = carry != 0;
    for &c in tail {
        if prev_slash && (c == b'/' || c == b'.') {
            return true;
        }
        prev_slash = c == b'/';
    }
    false
}

/// The exact component check, for paths where a '/' is followed by '/' or '.'.
fn shape_bytewise(b: &[u8]) -> bool {
    let at = |i: usize| b.get(i).copied();
    for (i, &c) in b.iter().enumerate() {
        if c == b'/' {
            match (at(i + 1), at(i + 2), at(i + 3)) {
                (None | Some(b'/'), _, _) => return false,
                (Some(b'.'), None | Some(b'/'), _) => return false,
                (Some(b'.'), Some(b'.'), None | Some(b'/')) => return false,
                _ => {}
            }
        }
    }
    true
}

/// The bytes a uevent key may hold: `[A-Za-z0-9_]`.
static KEY_BYTE: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        table[b] = (b as u8).is_ascii_alphanumeric() || b == b'_' as usize;
        b += 1;
    }
    table
};

/// Collects variables and checks the whole event once they are all seen.
#[derive(Default)]
struct Builder<'a> {
    base: &'a [u8],
    vars: heapless::Vec<Span, MAX_VARS>,
    dropped: u8,
    first_dropped: &'a [u8],
    /// A monitor capture's block: `DEVNAME=/dev/NAME` is read as the kernel's `NAME`.
    text: bool,
    /// Every byte of the datagram was checked for control bytes already (the fast path).
    clean: bool,
    /// The first value of each variable the event itself is made of, noted as they come.
    action: Special<'a>,
    devpath: Special<'a>,
    subsystem: Special<'a>,
    seqnum: Special<'a>,
}

/// A variable that may appear more than once, but always with the same value.
#[derive(Default)]
struct Special<'a> {
    value: Option<&'a str>,
    /// It appeared again with another value.
    mismatch: bool,
}

impl<'a> Special<'a> {
    #[inline(always)]
    fn note(&mut self, value: &'a str) {
        match self.value {
            Some(v) => self.mismatch |= v != value,
            None => self.value = Some(value),
        }
    }

    #[inline(always)]
    fn get(&self, key: &'static str) -> Result<Option<&'a str>, ParseError> {
        if self.mismatch { Err(ParseError::Mismatch(key)) } else { Ok(self.value) }
    }
}

impl<'a> Builder<'a> {
    /// A builder for variables that are slices of `base`.
    #[inline(always)]
    fn new(base: &'a [u8]) -> Builder<'a> {
        Builder { base, ..Builder::default() }
    }

    /// Pushes `key=value`, both slices of `base` (the key right before `=` and the value).
    fn push(&mut self, key: &'a [u8], value: &'a [u8]) -> Result<(), ParseError> {
        if key.is_empty() || !key.iter().all(|&b| KEY_BYTE[b as usize]) {
            return Err(ParseError::BadVariable);
        }
        let key_str = std::str::from_utf8(key).map_err(|_| ParseError::BadVariable)?;
        // Where the key lies in `base` (it is a slice of it).
        let start = (key.as_ptr() as usize).wrapping_sub(self.base.as_ptr() as usize);
        debug_assert!(start + key.len() + 1 + value.len() <= self.base.len(), "key outside base");
        match std::str::from_utf8(value) {
            Ok(value) if !value.bytes().any(|b| b.is_ascii_control()) => self.push_clean(start, key_str, value),
            _ => self.drop_var(key_str),
        }
    }

    /// Pushes a variable whose key is checked and whose value is UTF-8 without control bytes;
    /// `start` is where its key lies in `base`.
    fn push_clean(&mut self, start: usize, key: &'a str, value: &'a str) -> Result<(), ParseError> {
        if value.len() > MAX_VALUE {
            return self.drop_var(key);
        }
        if start > u32::MAX as usize || key.len() > MAX_KEY {
            return Err(ParseError::BadVariable);
        }
        // sd-device's DEVNAME (device_set_devname) back to the kernel's: `/dev/sdb` is `sdb`.
        let skip = match value.strip_prefix("/dev/") {
            Some(name) if self.text && key == "DEVNAME" && !name.is_empty() => 5,
            _ => 0,
        };
        let value = &value[skip..];
        let span = Span { start: start as u32, key: key.len() as u8, skip: skip as u8, value: value.len() as u16 };
        self.vars.push(span).map_err(|_| ParseError::TooManyVariables)?;
        // Most keys are none of these: the length alone says so.
        match (key.len(), key) {
            (6, "ACTION") => self.action.note(value),
            (7, "DEVPATH") => self.devpath.note(value),
            (9, "SUBSYSTEM") => self.subsystem.note(value),
            (6, "SEQNUM") => self.seqnum.note(value),
            _ => {}
        }
        Ok(())
    }

    /// [`Builder::push_clean`] for the fast path: `text` (the datagram, under 64 KiB, ASCII) holds
    /// a key of `key` bytes at `start`, then `=`, then the value up to `end`.
    #[inline(always)]
    fn push_ascii(&mut self, text: &'a str, start: usize, key: usize, end: usize) -> Result<(), ParseError> {
        let value_at = start + key + 1;
        let value = end - value_at;
        if value > MAX_VALUE {
            return self.drop_var(&text[start..start + key]);
        }
        if key > MAX_KEY {
            return Err(ParseError::BadVariable);
        }
        // Offsets fit: the fast path takes datagrams of at most u16::MAX bytes.
        let span = Span { start: start as u32, key: key as u8, skip: 0, value: value as u16 };
        self.vars.push(span).map_err(|_| ParseError::TooManyVariables)?;
        let special = match &text.as_bytes()[start..value_at - 1] {
            b"ACTION" => &mut self.action,
            b"DEVPATH" => &mut self.devpath,
            b"SUBSYSTEM" => &mut self.subsystem,
            b"SEQNUM" => &mut self.seqnum,
            _ => return Ok(()),
        };
        special.note(&text[value_at..end]);
        Ok(())
    }

    /// Counts a variable whose value cannot be kept (the event stays).
    fn drop_var(&mut self, key: &'a str) -> Result<(), ParseError> {
        if self.dropped == 0 {
            self.first_dropped = key.as_bytes();
        }
        self.dropped = self.dropped.saturating_add(1);
        if self.vars.len() + usize::from(self.dropped) > MAX_VARS {
            return Err(ParseError::TooManyVariables);
        }
        Ok(())
    }

    /// Checks that ACTION, DEVPATH and SUBSYSTEM are present, consistent with the header (if
    /// any) and with their own repetitions, and builds the event.
    #[inline(always)]
    fn finish(self, header: Option<(Action, &'a str)>) -> Result<Uevent<'a>, ParseError> {
        let action_var = self.action.get("ACTION")?;
        let devpath_var = self.devpath.get("DEVPATH")?;
        let subsystem = self.subsystem.get("SUBSYSTEM")?.ok_or(ParseError::Missing("SUBSYSTEM"))?;
        let (action, devpath) = match header {
            Some((action, devpath)) => {
                match action_var {
                    None => return Err(ParseError::Missing("ACTION")),
                    Some(a) if Action::parse(a.as_bytes()) != Some(action) => {
                        return Err(ParseError::Mismatch("ACTION"));
                    }
                    _ => {}
                }
                match devpath_var {
                    None => return Err(ParseError::Missing("DEVPATH")),
                    Some(d) if d != devpath => return Err(ParseError::Mismatch("DEVPATH")),
                    _ => {}
                }
                (action, devpath)
            }
            None => {
                let a = action_var.ok_or(ParseError::Missing("ACTION"))?;
                let action = Action::parse(a.as_bytes()).ok_or(ParseError::UnknownAction)?;
                (action, devpath_var.ok_or(ParseError::Missing("DEVPATH"))?)
            }
        };
        let safe = if self.clean { devpath_shape_is_safe(devpath) } else { devpath_is_safe(devpath) };
        if !safe {
            return Err(ParseError::BadDevpath);
        }
        if subsystem.is_empty() || subsystem.contains('/') {
            return Err(ParseError::Mismatch("SUBSYSTEM"));
        }
        let seqnum = self.seqnum.get("SEQNUM")?.and_then(|s| s.parse().ok());
        Ok(Uevent {
            action,
            devpath,
            subsystem,
            seqnum,
            base: self.base,
            vars: self.vars,
            dropped: self.dropped,
            first_dropped: self.first_dropped,
        })
    }
}

/// True if `bytes` holds a control byte other than NUL, or any byte above 0x7e. Eight bytes
/// at a time, each byte's test exact (no carry crosses a byte), so it does not depend on the
/// compiler vectorising a loop.
#[inline(always)]
fn has_control_bytes(bytes: &[u8]) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const LOW7: u64 = 0x7f7f_7f7f_7f7f_7f7f;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    let mut bad = 0u64;
    let mut chunks = bytes.chunks_exact(8);
    for chunk in &mut chunks {
        let x = u64::from_le_bytes(chunk.try_into().unwrap_or([0; 8]));
        let low = x & LOW7;
        // In each byte's high bit (the other bits are noise, masked off at the end):
        // below 0x20 is "x's high bit clear and low7 + 0x60 does not reach 0x80"; not NUL is
        // "low7 + 0x7f reaches 0x80"; 0x7f or above is "x's high bit set, or low7 + 1 reaches 0x80".
        let below_space = !((low + 0x60 * ONES) | x);
        bad |= (below_space & (low + LOW7)) | x | (low + ONES);
    }
    let bad = bad & HIGHS;
    let mut tail = 0u8;
    for &b in chunks.remainder() {
        tail |= u8::from(b.wrapping_sub(1) < 0x1f) | u8::from(b >= 0x7f);
    }
    bad != 0 || tail != 0
}

/// The length of the run of key bytes (`[A-Za-z0-9_]`) at `from`, eight bytes at a time.
/// `bytes` must be ASCII (the fast path's datagrams are).
#[inline(always)]
fn key_len(bytes: &[u8], from: usize) -> usize {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    // High bit of each byte of `x` (all below 0x80) that is `n` or above: no carry crosses a byte.
    let at_least = |x: u64, n: u8| (x + u64::from(0x80 - n) * ONES) & HIGHS;
    let mut i = from;
    while let Some(chunk) = bytes.get(i..).and_then(<[u8]>::first_chunk::<8>) {
        let x = u64::from_le_bytes(*chunk);
        let digit = at_least(x, b'0') & !at_least(x, b'9' + 1);
        // Folding case maps exactly the letters, and no other byte, onto a..z.
        let folded = x | (0x20 * ONES);
        let letter = at_least(folded, b'a') & !at_least(folded, b'z' + 1);
        let other = !(digit | letter | bytes_equal(x, b'_')) & HIGHS;
        if other != 0 {
            return i - from + (other.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    while i < bytes.len() && KEY_BYTE[bytes[i] as usize] {
        i += 1;
    }
    i - from
}

/// The index of the first NUL in `bytes` at or after `from` (or `bytes.len()`), eight bytes
/// at a time.
#[inline(always)]
fn find_nul(bytes: &[u8], from: usize) -> usize {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    let mut i = from;
    while let Some(chunk) = bytes.get(i..).and_then(<[u8]>::first_chunk::<8>) {
        let word = u64::from_le_bytes(*chunk);
        let zeros = word.wrapping_sub(ONES) & !word & HIGHS;
        if zeros != 0 {
            return i + (zeros.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    while i < bytes.len() && bytes[i] != 0 {
        i += 1;
    }
    i.min(bytes.len())
}

/// One item of `udevadm monitor` text.
// An Event is large (its 64-slot table) and a Directive small; boxing the event would allocate
// per event for nothing: records are consumed one at a time, never stored.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Record<'a> {
    /// A kernel event, with the line its block starts on.
    Event(Uevent<'a>, usize),
    /// A `#!` directive line (used by replay fixtures), without the `#!`, and its line.
    Directive(&'a str, usize),
}

/// What is wrong with `udevadm monitor` text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TextProblem {
    /// A block refused as a kernel datagram would be.
    Event(ParseError),
    /// An event header with no properties after it: captured without `--property`.
    NoProperties,
    /// A `#!` directive that is not UTF-8.
    BadDirective,
}

impl fmt::Display for TextProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TextProblem::Event(e) => e.fmt(f),
            TextProblem::NoProperties => f.write_str(
                "the event has no properties: capture with `udevadm monitor --kernel --property` (add \
                 `--subsystem-match=block --subsystem-match=usb` to keep it short)",
            ),
            TextProblem::BadDirective => f.write_str("directive is not UTF-8"),
        }
    }
}

/// An error in `udevadm monitor` text, with its 1-based line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TextError {
    pub line: usize,
    pub error: TextProblem,
}

impl TextError {
    fn at(line: usize, error: ParseError) -> TextError {
        TextError { line, error: TextProblem::Event(error) }
    }
}

impl fmt::Display for TextError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.error)
    }
}

impl std::error::Error for TextError {}

/// Numbered lines of a text.
type Lines<'a> = std::iter::Enumerate<std::slice::Split<'a, u8, fn(&u8) -> bool>>;

/// What [`MonitorText`] read past: udev's copies of events, and the properties udev added to
/// them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ignored {
    /// `UDEV [...]` blocks skipped because the capture has the kernel's own blocks.
    pub udev_blocks: usize,
    /// Properties left out of `UDEV [...]` blocks read as events (a capture with `--udev` only):
    /// udev's additions (`ID_*`, `DEVLINKS`, `TAGS`, ...), which no kernel uevent has.
    pub udev_properties: std::collections::BTreeSet<String>,
}

/// Reads the text `udevadm monitor --property` prints (systemd's udevadm-monitor.c, the same
/// since before systemd 247: a header naming the sources, then per event a line
/// `KERNEL[SECONDS] ACTION DEVPATH (SUBSYSTEM)` or `UDEV  [...] ...`, its `KEY=VALUE`
/// properties as sd-device holds them, and an empty line).
///
/// - A capture with `--kernel` blocks: those are the events; `UDEV` blocks are udev's copies
///   of them after its rules ran, and are skipped (counted in [`Ignored`]).
/// - A capture of `--udev` blocks only: each is read as the kernel's event, without the
///   properties udev adds (listed in [`Ignored`]).
/// - `DEVNAME=/dev/sdb` (sd-device's form) is read as the kernel's `DEVNAME=sdb`.
/// - An event without properties (a capture without `--property`) is an error that says how to
///   capture. Lines outside blocks are ignored, except `#!` directives (replay fixtures).
#[derive(Debug)]
pub struct MonitorText<'a> {
    text: &'a [u8],
    lines: Lines<'a>,
    /// The capture has `KERNEL[...]` blocks: `UDEV [...]` ones are only copies.
    has_kernel: bool,
    ignored: Ignored,
}

impl<'a> MonitorText<'a> {
    pub fn new(text: &'a [u8]) -> MonitorText<'a> {
        let newline: fn(&u8) -> bool = |&b| b == b'\n';
        let has_kernel = text.split(newline).any(|l| l.starts_with(b"KERNEL["));
        MonitorText { text, lines: text.split(newline).enumerate(), has_kernel, ignored: Ignored::default() }
    }

    /// What was read past so far (all of it, once the iterator is done).
    pub fn ignored(&self) -> &Ignored {
        &self.ignored
    }

    /// Reads the block whose header is `header`, on 1-based line `line`.
    fn block(&mut self, header: &'a [u8], line: usize, udev: bool) -> Result<Uevent<'a>, TextError> {
        let (action, devpath, subsystem) = parse_header(header).map_err(|e| TextError::at(line, e))?;
        let mut builder = Builder { text: true, ..Builder::new(self.text) };
        let mut properties = 0;
        for (n, text) in self.lines.by_ref() {
            let text = text.strip_suffix(b"\r").unwrap_or(text);
            if text.is_empty() {
                break;
            }
            if is_header(text) {
                return Err(TextError { line, error: TextProblem::NoProperties });
            }
            let eq = text.iter().position(|&b| b == b'=').ok_or(TextError::at(n + 1, ParseError::BadVariable))?;
            properties += 1;
            if udev {
                if let Some(key) = std::str::from_utf8(&text[..eq]).ok().filter(|k| udev_property(k)) {
                    self.ignored.udev_properties.insert(key.to_owned());
                    continue;
                }
            }
            builder.push(&text[..eq], &text[eq + 1..]).map_err(|e| TextError::at(n + 1, e))?;
        }
        if properties == 0 {
            return Err(TextError { line, error: TextProblem::NoProperties });
        }
        let event = builder.finish(Some((action, devpath))).map_err(|e| TextError::at(line, e))?;
        match subsystem {
            Some(s) if s != event.subsystem => Err(TextError::at(line, ParseError::Mismatch("SUBSYSTEM"))),
            _ => Ok(event),
        }
    }

    /// Skips the rest of a block.
    fn skip_block(&mut self) {
        for (_, l) in self.lines.by_ref() {
            if l.is_empty() || l == b"\r" {
                break;
            }
        }
    }
}

/// An event header line: `KERNEL[...]` or `UDEV` padded to six columns, then `[`.
fn is_header(line: &[u8]) -> bool {
    line.starts_with(b"KERNEL[") || line.starts_with(b"UDEV  [")
}

/// `KERNEL[12.345678] add      /devices/... (subsystem)`: the action, the devpath and the
/// subsystem if it is in parentheses (udevadm prints `(null)` for none, which no event has).
fn parse_header(header: &[u8]) -> Result<(Action, &str, Option<&str>), ParseError> {
    let rest = header.splitn(2, |&b| b == b']').nth(1).unwrap_or_default();
    let mut words = rest.split(|&b| b == b' ').filter(|w| !w.is_empty());
    let action = Action::parse(words.next().ok_or(ParseError::NoHeader)?).ok_or(ParseError::UnknownAction)?;
    let devpath = words.next().ok_or(ParseError::NoHeader)?;
    let devpath = std::str::from_utf8(devpath).map_err(|_| ParseError::BadDevpath)?;
    let subsystem =
        words.next().and_then(|s| s.strip_prefix(b"(")?.strip_suffix(b")")).and_then(|s| std::str::from_utf8(s).ok());
    Ok((action, devpath, subsystem))
}

/// True for a property udev adds to an event (its database, builtins and rules), which no
/// kernel uevent carries: the kernel's keys are plain `[A-Z0-9_]` names, none like these.
pub fn udev_property(key: &str) -> bool {
    const PREFIXES: &[&str] = &[
        "ID_",
        ".",
        "UDISKS_",
        "SYSTEMD_",
        "DM_",
        "LVM_",
        "MPATH_",
        "NM_",
        "COLORD_",
        "LIBINPUT_",
        "MTP_",
        "UPOWER_",
        "LIBSANE_",
        "ID-",
    ];
    const KEYS: &[&str] = &["DEVLINKS", "TAGS", "CURRENT_TAGS", "USEC_INITIALIZED"];
    KEYS.contains(&key)
        || PREFIXES.iter().any(|p| key.starts_with(p))
        || !key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

impl<'a> Iterator for MonitorText<'a> {
    type Item = Result<Record<'a>, TextError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let (n, line) = self.lines.next()?;
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if let Some(directive) = line.strip_prefix(b"#!") {
                return Some(match std::str::from_utf8(directive) {
                    Ok(d) => Ok(Record::Directive(d.trim(), n + 1)),
                    Err(_) => Err(TextError { line: n + 1, error: TextProblem::BadDirective }),
                });
            }
            let udev = line.starts_with(b"UDEV  [");
            if udev && self.has_kernel {
                self.ignored.udev_blocks += 1;
                self.skip_block();
                continue;
            }
            if udev || line.starts_with(b"KERNEL[") {
                return Some(self.block(line, n + 1, udev).map(|e| Record::Event(e, n + 1)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STICK: &[u8] = b"add@/devices/pci0000:00/0000:00:14.0/usb2/2-1/2-1:1.0/host6/target6:0:0/6:0:0:0/block/sdb\0ACTION=add\0DEVPATH=/devices/pci0000:00/0000:00:14.0/usb2/2-1/2-1:1.0/host6/target6:0:0/6:0:0:0/block/sdb\0SUBSYSTEM=block\0MAJOR=8\0MINOR=16\0DEVNAME=sdb\0DEVTYPE=disk\0DISKSEQ=9\0SEQNUM=4242\0";

    #[test]
    fn parses_a_kernel_datagram() {
        let e = Uevent::parse(STICK).unwrap();
        assert_eq!(e.action, Action::Add);
        assert_eq!(e.subsystem, "block");
        assert_eq!(e.kernel(), "sdb");
        assert_eq!(e.devtype(), Some("disk"));
        assert_eq!(e.devnum(), Some((8, 16)));
        assert_eq!(e.seqnum, Some(4242));
        assert_eq!(e.get("DEVNAME"), Some("sdb"));
        assert_eq!(e.get("NOPE"), None);
        assert_eq!(e.vars().len(), 9);
        assert_eq!(Uevent::parse(&e.to_datagram()).unwrap().vars(), e.vars());
    }

    fn rejects(buf: &[u8], want: ParseError) {
        assert_eq!(Uevent::parse(buf).unwrap_err(), want, "{:?}", String::from_utf8_lossy(buf));
    }

    #[test]
    fn rejects_malformed_datagrams() {
        rejects(b"", ParseError::Empty);
        rejects(b"libudev\0\xfe\xed\xca\xfe", ParseError::Libudev);
        rejects(&STICK[..STICK.len() - 1], ParseError::NotTerminated);
        rejects(b"add/devices/x\0ACTION=add\0DEVPATH=/devices/x\0SUBSYSTEM=a\0", ParseError::NoHeader);
        rejects(b"plug@/devices/x\0ACTION=plug\0DEVPATH=/devices/x\0SUBSYSTEM=a\0", ParseError::UnknownAction);
        rejects(b"add@/devices/x\0ACTION=remove\0DEVPATH=/devices/x\0SUBSYSTEM=a\0", ParseError::Mismatch("ACTION"));
        rejects(b"add@/devices/x\0ACTION=add\0DEVPATH=/devices/y\0SUBSYSTEM=a\0", ParseError::Mismatch("DEVPATH"));
        rejects(
            b"add@/devices/x\0ACTION=add\0DEVPATH=/devices/x\0DEVPATH=/devices/y\0SUBSYSTEM=a\0",
            ParseError::Mismatch("DEVPATH"),
        );
        rejects(b"add@/devices/x\0DEVPATH=/devices/x\0SUBSYSTEM=a\0", ParseError::Missing("ACTION"));
        rejects(b"add@/devices/x\0ACTION=add\0SUBSYSTEM=a\0", ParseError::Missing("DEVPATH"));
        rejects(b"add@/devices/x\0ACTION=add\0DEVPATH=/devices/x\0", ParseError::Missing("SUBSYSTEM"));
        rejects(b"add@/devices/../x\0ACTION=add\0DEVPATH=/devices/../x\0SUBSYSTEM=a\0", ParseError::BadDevpath);
        rejects(b"add@devices/x\0ACTION=add\0DEVPATH=devices/x\0SUBSYSTEM=a\0", ParseError::BadDevpath);
        rejects(b"add@/devices//x\0ACTION=add\0DEVPATH=/devices//x\0SUBSYSTEM=a\0", ParseError::BadDevpath);
        rejects(b"add@/devices/x\0ACTION=add\0DEVPATH=/devices/x\0SUBSYSTEM=a\0NOEQUALS\0", ParseError::BadVariable);
        rejects(b"add@/devices/x\0ACTION=add\0DEVPATH=/devices/x\0SUBSYSTEM=a\0=v\0", ParseError::BadVariable);
        rejects(b"add@/devices/x\0ACTION=add\0DEVPATH=/devices/x\0SUBSYSTEM=a\0K Y=v\0", ParseError::BadVariable);
    }

    #[test]
    fn at_most_64_variables() {
        let mut buf = b"add@/devices/x\0ACTION=add\0DEVPATH=/devices/x\0SUBSYSTEM=a\0".to_vec();
        for i in 0..61 {
            buf.extend_from_slice(format!("K{i}=v\0").as_bytes());
        }
        assert_eq!(Uevent::parse(&buf).unwrap().vars().len(), 64);
        buf.extend_from_slice(b"ONEMORE=v\0");
        rejects(&buf, ParseError::TooManyVariables);
    }

    #[test]
    fn a_bad_value_costs_only_its_key() {
        let mut buf = b"add@/devices/x\0ACTION=add\0DEVPATH=/devices/x\0SUBSYSTEM=usb\0SERIAL=\xff\xfe\0".to_vec();
        buf.extend_from_slice(b"BIG=");
        buf.extend(std::iter::repeat_n(b'a', MAX_VALUE + 1));
        buf.extend_from_slice(b"\0PRODUCT=46f4/1/0\0");
        let e = Uevent::parse(&buf).unwrap();
        assert_eq!(e.get("SERIAL"), None);
        assert_eq!(e.get("BIG"), None);
        assert_eq!(e.get("PRODUCT"), Some("46f4/1/0"));
        assert_eq!(e.dropped(), (2, &b"SERIAL"[..]));
    }

    const MONITOR: &str = "monitor will print the received events for:
KERNEL - the kernel uevent

KERNEL[3470.131416] add      /devices/virtual/block/loop200 (block)
ACTION=add
DEVPATH=/devices/virtual/block/loop200
SUBSYSTEM=block
MAJOR=7
MINOR=200
DEVNAME=loop200
DEVTYPE=disk
SEQNUM=4021

UDEV  [3470.140000] add      /devices/virtual/block/loop200 (block)
ACTION=add
DEVPATH=/devices/virtual/block/loop200
SUBSYSTEM=block

#! wait 5s
KERNEL[3471.000001] remove   /devices/virtual/block/loop200 (block)
ACTION=remove
DEVPATH=/devices/virtual/block/loop200
SUBSYSTEM=block
";

    #[test]
    fn reads_udevadm_monitor_text() {
        let mut text = MonitorText::new(MONITOR.as_bytes());
        let records: Vec<_> = text.by_ref().collect::<Result<_, _>>().unwrap();
        assert_eq!(records.len(), 3);
        let Record::Event(add, 4) = &records[0] else { panic!("{records:?}") };
        assert_eq!((add.action, add.devnum()), (Action::Add, Some((7, 200))));
        assert!(matches!(records[1], Record::Directive("wait 5s", 19)));
        let Record::Event(rm, 20) = &records[2] else { panic!("{records:?}") };
        assert_eq!((rm.action, rm.subsystem), (Action::Remove, "block"));
        assert_eq!(rm.get("DEVPATH"), Some("/devices/virtual/block/loop200"));
        assert_eq!(text.ignored().udev_blocks, 1);
    }

    /// The events of a capture, as (action, sorted variables).
    fn events(text: &[u8]) -> (Vec<(Action, Vec<String>)>, Ignored) {
        let mut monitor = MonitorText::new(text);
        let mut out = Vec::new();
        for record in monitor.by_ref() {
            if let Record::Event(e, _) = record.unwrap() {
                let mut vars: Vec<String> = e.vars().map(|v| format!("{}={}", v.key, v.value)).collect();
                vars.sort();
                out.push((e.action, vars));
            }
        }
        (out, monitor.ignored().clone())
    }

    /// Real captures from this machine (tests/fixtures/capture-real.sh, udevadm 252): the
    /// kernel's blocks, a mixed `--kernel --udev` capture and a `--udev` one read as the same
    /// events, with sd-device's `DEVNAME=/dev/loop870` read as the kernel's `loop870`.
    #[test]
    fn real_captures_read_alike() {
        for (kernel, mixed, udev) in [
            (
                &include_bytes!("../tests/fixtures/loop-real/events")[..],
                &include_bytes!("../tests/fixtures/loop-real/events-mixed")[..],
                &include_bytes!("../tests/fixtures/loop-real/events-udev")[..],
            ),
            (
                include_bytes!("../tests/fixtures/zram-real/events"),
                include_bytes!("../tests/fixtures/zram-real/events-mixed"),
                include_bytes!("../tests/fixtures/zram-real/events-udev"),
            ),
        ] {
            let (want, none) = events(kernel);
            assert!(want.len() >= 2 && none == Ignored::default());
            assert!(want.iter().all(|(_, v)| v.iter().any(|v| v.starts_with("DEVNAME=") && !v.contains('/'))));
            let (got, ignored) = events(mixed);
            assert_eq!(got, want);
            assert_eq!(ignored.udev_blocks, want.len());
            let (got, ignored) = events(udev);
            assert_eq!(got, want);
            assert!(ignored.udev_properties.contains("USEC_INITIALIZED"), "{ignored:?}");
        }
        let (loop_events, _) = events(include_bytes!("../tests/fixtures/loop-real/events"));
        let actions: Vec<Action> = loop_events.iter().map(|(a, _)| *a).collect();
        assert_eq!(actions, [Action::Add, Action::Change, Action::Change, Action::Change, Action::Remove]);
    }

    /// A capture without `--property` is refused with a message that says how to capture.
    #[test]
    fn captures_without_properties_say_how_to_capture() {
        let text = b"monitor will print the received events for:\nKERNEL - the kernel uevent\n\nKERNEL[1.5] add      /devices/virtual/block/loop0 (block)\nKERNEL[1.6] remove   /devices/virtual/block/loop0 (block)\n";
        let err = MonitorText::new(text).next().unwrap().unwrap_err();
        assert_eq!(err, TextError { line: 4, error: TextProblem::NoProperties });
        assert!(err.to_string().contains("capture with `udevadm monitor --kernel --property`"), "{err}");
        let last = MonitorText::new(b"KERNEL[1.5] add /devices/x (block)").next().unwrap().unwrap_err();
        assert_eq!(last.error, TextProblem::NoProperties);
    }

    /// udevadm's DEVNAME is sd-device's path; the event holds the kernel's name, and prints
    /// back as udevadm does.
    #[test]
    fn devname_is_read_as_the_kernel_sends_it() {
        let text = b"KERNEL[1.5] add /devices/virtual/block/loop0 (block)\nACTION=add\nDEVPATH=/devices/virtual/block/loop0\nSUBSYSTEM=block\nDEVNAME=/dev/loop0\n\n";
        let Some(Ok(Record::Event(e, 1))) = MonitorText::new(text).next() else { panic!() };
        assert_eq!(e.get("DEVNAME"), Some("loop0"));
        let mut out = Vec::new();
        e.write_monitor(&mut out).unwrap();
        assert!(String::from_utf8(out).unwrap().contains("\nDEVNAME=/dev/loop0\n"));
        // A datagram's DEVNAME is the kernel's as it is, whatever it holds.
        let d = b"add@/devices/x\0ACTION=add\0DEVPATH=/devices/x\0SUBSYSTEM=block\0DEVNAME=/dev/x\0";
        assert_eq!(Uevent::parse(d).unwrap().get("DEVNAME"), Some("/dev/x"));
    }

    #[test]
    fn monitor_text_round_trips() {
        let e = Uevent::parse(STICK).unwrap();
        let mut text = Vec::new();
        e.write_monitor(&mut text).unwrap();
        let Some(Ok(Record::Event(back, 1))) = MonitorText::new(&text).next() else { panic!() };
        assert_eq!(back.vars(), e.vars());
        assert_eq!((back.action, back.devpath), (e.action, e.devpath));
    }

    /// Found by fuzz/run.sh: an empty DEVNAME printed as `/dev/` read back as the value
    /// `/dev/`. Names no kernel sends (empty, absolute) still print and read back unchanged.
    #[test]
    fn odd_devnames_round_trip_through_monitor_text() {
        for name in ["", "/dev/", "/dev/x", "/x", "sdb"] {
            let d = format!("add@/devices/x\0ACTION=add\0DEVPATH=/devices/x\0SUBSYSTEM=block\0DEVNAME={name}\0");
            let e = Uevent::parse(d.as_bytes()).unwrap();
            let mut text = Vec::new();
            e.write_monitor(&mut text).unwrap();
            let Some(Ok(Record::Event(back, 1))) = MonitorText::new(&text).next() else { panic!("{name:?}") };
            assert_eq!(back.get("DEVNAME"), Some(name), "{:?}", String::from_utf8_lossy(&text));
        }
    }

    #[test]
    fn monitor_text_errors_carry_their_line() {
        let text = b"KERNEL[1.0] add /devices/x (usb)\nACTION=add\nDEVPATH=/devices/y\nSUBSYSTEM=usb\n";
        let err = MonitorText::new(text).next().unwrap().unwrap_err();
        assert_eq!(err, TextError::at(1, ParseError::Mismatch("DEVPATH")));
        let text = b"KERNEL[1.0] add /devices/x (usb)\nACTION=add\nbroken\n";
        let err = MonitorText::new(text).next().unwrap().unwrap_err();
        assert_eq!(err.line, 3);
    }
}

#[cfg(test)]
mod devpath_tests {
    use super::*;

    /// The word-at-a-time check agrees with a plain split on every short path over a small
    /// alphabet, whatever the alignment.
    #[test]
    fn devpath_checks_agree_with_a_plain_split() {
        let reference =
            |p: &str| p.strip_prefix('/').is_some_and(|r| r.split('/').all(|c| !matches!(c, "" | "." | "..")));
        let alphabet = ['/', '.', 'a'];
        for len in 1..=11 {
            let mut idx = vec![0usize; len];
            loop {
                let path: String = idx.iter().map(|&i| alphabet[i]).collect();
                assert_eq!(devpath_shape_is_safe(&path), reference(&path), "{path:?}");
                assert_eq!(devpath_is_safe(&path), reference(&path), "{path:?}");
                let mut k = 0;
                while k < len && idx[k] == alphabet.len() - 1 {
                    idx[k] = 0;
                    k += 1;
                }
                if k == len {
                    break;
                }
                idx[k] += 1;
            }
        }
        assert!(devpath_is_safe(
            "/devices/pci0000:00/0000:00:14.0/usb1/1-2/1-2:1.0/host0/target0:0:0/0:0:0:0/block/sda/sda1"
        ));
        assert!(!devpath_is_safe("/devices/x\ny"));
    }

    /// The word-at-a-time key scan agrees with the key-byte table for every ASCII byte at every
    /// position of a word and of the tail.
    #[test]
    fn key_scan_is_exact() {
        for len in [8usize, 11, 16, 21] {
            for at in 0..len {
                for v in 0..0x80u8 {
                    let mut buf = vec![b'K'; len];
                    buf[at] = v;
                    let want = buf.iter().take_while(|&&b| KEY_BYTE[b as usize]).count();
                    assert_eq!(key_len(&buf, 0), want, "len {len} at {at} v {v:#x}");
                    if at > 0 {
                        assert_eq!(key_len(&buf, 1), want.max(1) - 1, "from 1, len {len} at {at} v {v:#x}");
                    }
                }
            }
        }
    }

    /// The word-at-a-time control-byte scan agrees with a byte-at-a-time one for every byte
    /// value at every position of a word and of the tail, next to NULs and next to plain bytes.
    #[test]
    fn control_byte_scan_is_exact() {
        let slow = |b: &[u8]| b.iter().any(|&c| (1..0x20).contains(&c) || c >= 0x7f);
        for fill in [b'a', 0u8, 0x20, 0x7e] {
            for len in [8usize, 13, 16, 19] {
                for at in 0..len {
                    for v in 0..=255u8 {
                        let mut buf = vec![fill; len];
                        buf[at] = v;
                        assert_eq!(has_control_bytes(&buf), slow(&buf), "fill {fill:#x} len {len} at {at} v {v:#x}");
                    }
                }
            }
        }
    }
}
