//! udev's matching written the slow, obvious way, to check `autoattach::rules::Matcher`
//! against: every value read afresh from the tree, globs by the C library's `fnmatch`.
//!
//! Semantics are systemd's src/udev/udev-rules.c and sd-device, as the rules module documents:
//! - a pattern is compiled whole: `"?*"` means "not empty", `""` means "empty",
//!   `SUBSYSTEM(S)=="subsystem"|"bus"|"class"` means any of those three, otherwise it is a glob
//!   if it has any of `*?[` (string_is_glob) and a plain string if not; its `|` alternatives
//!   are each compared the same way, and an empty alternative matches the empty value;
//! - a missing string value compares as empty; a missing or unreadable attribute fails the
//!   test whatever its operator;
//! - an attribute value loses its trailing `" \t\n\r"` (WHITESPACE) unless the pattern's first
//!   non-empty `|` alternative ends in a character C's isspace() accepts;
//! - attributes are read as sd_device_get_sysattr_value does: trailing newlines dropped, cut at
//!   the first NUL; a directory fails; a link is read as its target's basename for `driver`,
//!   `subsystem` and `module`, and fails for any other name;
//! - the event device's subsystem and driver are the event's SUBSYSTEM and DRIVER (sd-device
//!   takes them from the uevent); DRIVER falls back to the `driver` link when the event has none;
//! - parent keys (KERNELS, SUBSYSTEMS, DRIVERS, ATTRS) must all hold on one device, tried from
//!   the event device up through each ancestor directory with a `uevent` file, below /devices.
//!
//! One difference from udev is left out on purpose: udev's KERNEL is the sysname, where a `!`
//! in the kernel name reads as `/`; the fuzz trees have no `!` in names.

use std::ffi::CString;
use std::path::Path;

use autoattach::uevent::Uevent;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Key {
    Action,
    Devpath,
    Kernel,
    Subsystem,
    Driver,
    Env(String),
    Attr(String),
    Kernels,
    Subsystems,
    Drivers,
    Attrs(String),
}

impl Key {
    fn is_parent(&self) -> bool {
        matches!(self, Key::Kernels | Key::Subsystems | Key::Drivers | Key::Attrs(_))
    }
}

#[derive(Clone, Debug)]
pub struct Test {
    pub key: Key,
    pub negate: bool,
    pub pattern: Vec<u8>,
}

/// The index of the first rule (a list of tests) that matches `event` on the tree at `root`.
pub fn first_match(root: &Path, event: &Uevent<'_>, rules: &[Vec<Test>]) -> Option<usize> {
    rules.iter().position(|tests| rule_matches(root, event, tests))
}

fn rule_matches(root: &Path, event: &Uevent<'_>, tests: &[Test]) -> bool {
    let (parent, own): (Vec<&Test>, Vec<&Test>) = tests.iter().partition(|t| t.key.is_parent());
    if !own.iter().all(|t| event_test(root, event, t)) {
        return false;
    }
    if parent.is_empty() {
        return true;
    }
    let mut device = Some(event.devpath.to_owned());
    let mut level = 0;
    while let Some(devpath) = device {
        if parent.iter().all(|t| parent_test(root, event, &devpath, level, t)) {
            return true;
        }
        device = parent_of(root, &devpath);
        level += 1;
    }
    false
}

fn event_test(root: &Path, event: &Uevent<'_>, t: &Test) -> bool {
    let string = |v: Option<Vec<u8>>| string_test(t, &v.unwrap_or_default());
    match &t.key {
        Key::Action => string(Some(event.action.as_str().into())),
        Key::Devpath => string(Some(event.devpath.into())),
        Key::Kernel => string(Some(kernel(event.devpath).into())),
        Key::Subsystem => string(Some(event.subsystem.into())),
        Key::Driver => string(driver(root, event, event.devpath, 0)),
        Key::Env(k) => string(event.get(k).map(Into::into)),
        Key::Attr(name) => attr_test(t, attr(root, event.devpath, name)),
        _ => unreachable!(),
    }
}

fn parent_test(root: &Path, event: &Uevent<'_>, devpath: &str, level: usize, t: &Test) -> bool {
    let string = |v: Option<Vec<u8>>| string_test(t, &v.unwrap_or_default());
    match &t.key {
        Key::Kernels => string(Some(kernel(devpath).into())),
        Key::Subsystems if level == 0 => string(Some(event.subsystem.into())),
        Key::Subsystems => string(link(root, devpath, "subsystem")),
        Key::Drivers => string(driver(root, event, devpath, level)),
        Key::Attrs(name) => attr_test(t, attr(root, devpath, name)),
        _ => unreachable!(),
    }
}

fn kernel(devpath: &str) -> &str {
    devpath.rsplit('/').next().unwrap_or(devpath)
}

fn driver(root: &Path, event: &Uevent<'_>, devpath: &str, level: usize) -> Option<Vec<u8>> {
    match event.get("DRIVER").filter(|_| level == 0) {
        Some(d) => Some(d.into()),
        None => link(root, devpath, "driver"),
    }
}

fn parent_of(root: &Path, devpath: &str) -> Option<String> {
    let mut path = devpath;
    loop {
        path = &path[..path.rfind('/')?];
        if path.is_empty() || path == "/devices" {
            return None;
        }
        if root.join(&path[1..]).join("uevent").exists() {
            return Some(path.to_owned());
        }
    }
}

fn link(root: &Path, devpath: &str, name: &str) -> Option<Vec<u8>> {
    let target = std::fs::read_link(root.join(&devpath[1..]).join(name)).ok()?;
    Some(target.file_name()?.to_str()?.into())
}

fn attr(root: &Path, devpath: &str, name: &str) -> Option<Vec<u8>> {
    let path = root.join(&devpath[1..]).join(name);
    let meta = std::fs::symlink_metadata(&path).ok()?;
    if meta.file_type().is_symlink() {
        return if matches!(name, "driver" | "subsystem" | "module") { link(root, devpath, name) } else { None };
    }
    if meta.is_dir() {
        return None;
    }
    let mut value = std::fs::read(&path).ok()?;
    if let Some(nul) = value.iter().position(|&b| b == 0) {
        value.truncate(nul);
    }
    while value.last().is_some_and(|&b| b == b'\n' || b == b'\r') {
        value.pop();
    }
    Some(value)
}

/// C's isspace() in the C locale.
fn c_isspace(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
}

fn attr_test(t: &Test, value: Option<Vec<u8>>) -> bool {
    let Some(mut value) = value else { return false };
    // udev turns the pattern's `|` into NULs (dropping empty alternatives) before it looks at
    // the last byte (rule_line_add_token: strlen, isspace): the first non-empty alternative's.
    let first = t.pattern.split(|&b| b == b'|').find(|a| !a.is_empty()).unwrap_or_default();
    if first.last().is_some_and(|&b| !c_isspace(b)) {
        while value.last().is_some_and(|b| b" \t\n\r".contains(b)) {
            value.pop();
        }
    }
    string_test(t, &value)
}

fn string_test(t: &Test, value: &[u8]) -> bool {
    pattern_matches(&t.pattern, matches!(t.key, Key::Subsystem | Key::Subsystems), value) != t.negate
}

fn pattern_matches(pattern: &[u8], subsystem_key: bool, value: &[u8]) -> bool {
    const LEGACY: [&[u8]; 3] = [b"subsystem", b"bus", b"class"];
    if pattern == b"?*" {
        return !value.is_empty();
    }
    if pattern.is_empty() {
        return value.is_empty();
    }
    if subsystem_key && LEGACY.contains(&pattern) {
        return LEGACY.contains(&value);
    }
    let glob = pattern.iter().any(|b| b"*?[".contains(b));
    pattern.split(|&b| b == b'|').any(|alt| match alt {
        [] => value.is_empty(),
        alt if glob => libc_fnmatch(alt, value),
        alt => alt == value,
    })
}

fn libc_fnmatch(pattern: &[u8], value: &[u8]) -> bool {
    let (Ok(p), Ok(v)) = (CString::new(pattern), CString::new(value)) else {
        return false;
    };
    // SAFETY: both are NUL-terminated strings that outlive the call; flags 0 as udev passes.
    unsafe { libc::fnmatch(p.as_ptr(), v.as_ptr(), 0) == 0 }
}
