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
        Action::ALL.into_iter().find(|a| a.as_str().as_bytes() == s)
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
    vars: heapless::Vec<Var<'a>, MAX_VARS>,
    dropped: u8,
    first_dropped: &'a [u8],
}

impl<'a> Uevent<'a> {
    /// Parses a kernel datagram (`ACTION@DEVPATH\0KEY=VALUE\0...`).
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
        let mut fields = body.split(|&b| b == 0);
        let header = fields.next().unwrap_or_default();
        let at = header.iter().position(|&b| b == b'@').ok_or(ParseError::NoHeader)?;
        let action = Action::parse(&header[..at]).ok_or(ParseError::UnknownAction)?;
        let devpath = std::str::from_utf8(&header[at + 1..]).map_err(|_| ParseError::BadDevpath)?;
        let mut builder = Builder::default();
        for field in fields {
            let eq = field.iter().position(|&b| b == b'=');
            let eq = eq.ok_or(ParseError::BadVariable)?;
            builder.push(&field[..eq], &field[eq + 1..])?;
        }
        builder.finish(Some((action, devpath)))
    }

    /// The value of `key`, if the event carries it (first occurrence).
    pub fn get(&self, key: &str) -> Option<&'a str> {
        self.vars.iter().find(|v| v.key == key).map(|v| v.value)
    }

    /// Every variable, in order.
    pub fn vars(&self) -> &[Var<'a>] {
        &self.vars
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

    /// Writes the event as `udevadm monitor --kernel --property` prints it.
    pub fn write_monitor(&self, out: &mut impl Write) -> io::Result<()> {
        writeln!(out, "KERNEL[0.000000] {:<8} {} ({})", self.action.as_str(), self.devpath, self.subsystem)?;
        for v in &self.vars {
            writeln!(out, "{}={}", v.key, v.value)?;
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
        for v in &self.vars {
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
    let Some(rest) = devpath.strip_prefix('/') else {
        return false;
    };
    !rest.is_empty()
        && !devpath.bytes().any(|b| b < 0x20 || b == 0x7f)
        && rest.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
}

/// Collects variables and checks the whole event once they are all seen.
#[derive(Default)]
struct Builder<'a> {
    vars: heapless::Vec<Var<'a>, MAX_VARS>,
    dropped: u8,
    first_dropped: &'a [u8],
}

impl<'a> Builder<'a> {
    fn push(&mut self, key: &'a [u8], value: &'a [u8]) -> Result<(), ParseError> {
        if key.is_empty() || !key.iter().all(|&b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(ParseError::BadVariable);
        }
        let key = std::str::from_utf8(key).map_err(|_| ParseError::BadVariable)?;
        match std::str::from_utf8(value) {
            Ok(value) if value.len() <= MAX_VALUE && !value.bytes().any(|b| b.is_ascii_control()) => {
                self.vars.push(Var { key, value }).map_err(|_| ParseError::TooManyVariables)
            }
            _ => {
                if self.dropped == 0 {
                    self.first_dropped = key.as_bytes();
                }
                self.dropped = self.dropped.saturating_add(1);
                if self.vars.len() + usize::from(self.dropped) > MAX_VARS {
                    return Err(ParseError::TooManyVariables);
                }
                Ok(())
            }
        }
    }

    /// Checks that ACTION, DEVPATH and SUBSYSTEM are present, consistent with the header (if
    /// any) and with their own repetitions, and builds the event.
    fn finish(self, header: Option<(Action, &'a str)>) -> Result<Uevent<'a>, ParseError> {
        let one = |key: &'static str| -> Result<Option<&'a str>, ParseError> {
            let mut found = None;
            for v in self.vars.iter().filter(|v| v.key == key) {
                match found {
                    Some(f) if f != v.value => return Err(ParseError::Mismatch(key)),
                    _ => found = Some(v.value),
                }
            }
            Ok(found)
        };
        let action_var = one("ACTION")?;
        let devpath_var = one("DEVPATH")?;
        let subsystem = one("SUBSYSTEM")?.ok_or(ParseError::Missing("SUBSYSTEM"))?;
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
        if !devpath_is_safe(devpath) {
            return Err(ParseError::BadDevpath);
        }
        if subsystem.is_empty() || subsystem.contains('/') {
            return Err(ParseError::Mismatch("SUBSYSTEM"));
        }
        let seqnum = one("SEQNUM")?.and_then(|s| s.parse().ok());
        Ok(Uevent {
            action,
            devpath,
            subsystem,
            seqnum,
            vars: self.vars,
            dropped: self.dropped,
            first_dropped: self.first_dropped,
        })
    }
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

/// An error in `udevadm monitor` text, with its 1-based line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TextError {
    pub line: usize,
    pub error: ParseError,
}

impl fmt::Display for TextError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.error)
    }
}

impl std::error::Error for TextError {}

/// Numbered lines of a text.
type Lines<'a> = std::iter::Enumerate<std::slice::Split<'a, u8, fn(&u8) -> bool>>;

/// Reads the text printed by `udevadm monitor --kernel --property` (or without `--property`:
/// the header alone then gives ACTION, DEVPATH and SUBSYSTEM). `UDEV[...]` blocks (udev's own
/// events) are skipped; lines outside blocks are ignored, except `#!` directives.
#[derive(Debug)]
pub struct MonitorText<'a> {
    lines: Lines<'a>,
}

impl<'a> MonitorText<'a> {
    pub fn new(text: &'a [u8]) -> MonitorText<'a> {
        let newline: fn(&u8) -> bool = |&b| b == b'\n';
        MonitorText { lines: text.split(newline).enumerate() }
    }

    fn block(&mut self, header: &'a [u8], line: usize) -> Result<Uevent<'a>, TextError> {
        let err = |error| TextError { line, error };
        // KERNEL[12.345678] add      /devices/... (subsystem)
        let rest = header.splitn(2, |&b| b == b']').nth(1).unwrap_or_default();
        let mut words = rest.split(|&b| b == b' ').filter(|w| !w.is_empty());
        let action = words.next().ok_or(err(ParseError::NoHeader))?;
        let action = Action::parse(action).ok_or(err(ParseError::UnknownAction))?;
        let devpath = words.next().ok_or(err(ParseError::NoHeader))?;
        let devpath = std::str::from_utf8(devpath).map_err(|_| err(ParseError::BadDevpath))?;
        let subsystem = words
            .next()
            .and_then(|s| s.strip_prefix(b"(")?.strip_suffix(b")"))
            .and_then(|s| std::str::from_utf8(s).ok());
        let mut builder = Builder::default();
        for (n, text) in self.lines.by_ref() {
            let text = text.strip_suffix(b"\r").unwrap_or(text);
            if text.is_empty() {
                break;
            }
            let eq = text.iter().position(|&b| b == b'=');
            let eq = eq.ok_or(TextError { line: n + 1, error: ParseError::BadVariable })?;
            builder.push(&text[..eq], &text[eq + 1..]).map_err(|error| TextError { line: n + 1, error })?;
        }
        if builder.vars.is_empty() && builder.dropped == 0 {
            // Captured without --property: the header is all there is.
            let subsystem = subsystem.ok_or(err(ParseError::Missing("SUBSYSTEM")))?;
            // Checked as a property line would be: a header value is trusted no more.
            for (key, value) in [("ACTION", action.as_str()), ("DEVPATH", devpath), ("SUBSYSTEM", subsystem)] {
                builder.push(key.as_bytes(), value.as_bytes()).map_err(err)?;
            }
        }
        let event = builder.finish(Some((action, devpath))).map_err(err)?;
        match subsystem {
            Some(s) if s != event.subsystem => Err(err(ParseError::Mismatch("SUBSYSTEM"))),
            _ => Ok(event),
        }
    }
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
                    Err(_) => Err(TextError { line: n + 1, error: ParseError::BadVariable }),
                });
            }
            if line.starts_with(b"KERNEL[") {
                return Some(self.block(line, n + 1).map(|e| Record::Event(e, n + 1)));
            }
            if line.starts_with(b"UDEV[") {
                // udev's processed copy of an event: skip its block.
                for (_, l) in self.lines.by_ref() {
                    if l.is_empty() || l == b"\r" {
                        break;
                    }
                }
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
";

    #[test]
    fn reads_udevadm_monitor_text() {
        let records: Vec<_> = MonitorText::new(MONITOR.as_bytes()).collect::<Result<_, _>>().unwrap();
        assert_eq!(records.len(), 3);
        let Record::Event(add, 4) = &records[0] else { panic!("{records:?}") };
        assert_eq!((add.action, add.devnum()), (Action::Add, Some((7, 200))));
        assert!(matches!(records[1], Record::Directive("wait 5s", 19)));
        let Record::Event(rm, 20) = &records[2] else { panic!("{records:?}") };
        assert_eq!((rm.action, rm.subsystem), (Action::Remove, "block"));
        assert_eq!(rm.get("DEVPATH"), Some("/devices/virtual/block/loop200"));
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

    #[test]
    fn monitor_text_errors_carry_their_line() {
        let text = b"KERNEL[1.0] add /devices/x (usb)\nACTION=add\nDEVPATH=/devices/y\nSUBSYSTEM=usb\n";
        let err = MonitorText::new(text).next().unwrap().unwrap_err();
        assert_eq!(err, TextError { line: 1, error: ParseError::Mismatch("DEVPATH") });
        let text = b"KERNEL[1.0] add /devices/x (usb)\nACTION=add\nbroken\n";
        let err = MonitorText::new(text).next().unwrap().unwrap_err();
        assert_eq!(err.line, 3);
    }
}
