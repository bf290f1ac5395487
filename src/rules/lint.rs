//! Rules that load but do not do what their author meant: warnings with hints, for `check`
//! and for the agent's start-up log.
//!
//! - it can never attach anything: no block device or `usb_device` can pass its SUBSYSTEM and
//!   DEVTYPE tests; its ACTION allows none of the events a device is attached on (add,
//!   change, bind, online); it tests an `ENV{}` key that only udev's database has (`ID_*`,
//!   `DEVLINKS`, ...), never a kernel uevent; it names an attribute in the wrong case
//!   (`ATTRS{idvendor}`: sysfs names are case-sensitive);
//! - it attaches more than one device: a disk and its partitions, or any device of its kind;
//! - a missing comma between two keys (the parser reports it, as udev 254+'s `udevadm verify`
//!   does);
//! - [`unreadable_by`]: a rules file or directory that the service's user cannot read (the
//!   agent runs as `autoattach`, and a file `check` read as root may be closed to it).

use std::ffi::CString;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{Key, Rule, RuleError, Test};

/// The actions a device is attached on (the engine's appearances).
const ATTACH_ACTIONS: &[&str] = &["add", "change", "bind", "online"];

/// udev database keys with the sysfs attribute that holds the same value, for hints.
const DB_KEYS: &[(&str, &str)] = &[
    ("ID_SERIAL_SHORT", "ATTRS{serial}"),
    ("ID_SERIAL", "ATTRS{serial}"),
    ("ID_VENDOR_ID", "ATTRS{idVendor}"),
    ("ID_MODEL_ID", "ATTRS{idProduct}"),
    ("ID_VENDOR", "ATTRS{manufacturer}"),
    ("ID_VENDOR_ENC", "ATTRS{manufacturer}"),
    ("ID_MODEL", "ATTRS{product}"),
    ("ID_MODEL_ENC", "ATTRS{product}"),
    ("ID_REVISION", "ATTRS{bcdDevice}"),
    ("ID_USB_INTERFACES", "ATTRS{bInterfaceClass} on the interface"),
];

/// Sysfs attribute names of USB devices, USB interfaces, SCSI devices and block devices, for
/// the case check.
const KNOWN_ATTRS: &[&str] = &[
    "idVendor",
    "idProduct",
    "serial",
    "manufacturer",
    "product",
    "bcdDevice",
    "bDeviceClass",
    "bDeviceSubClass",
    "bDeviceProtocol",
    "bConfigurationValue",
    "bNumConfigurations",
    "bNumInterfaces",
    "bMaxPacketSize0",
    "bMaxPower",
    "bmAttributes",
    "busnum",
    "devnum",
    "devpath",
    "speed",
    "version",
    "maxchild",
    "removable",
    "authorized",
    "configuration",
    "quirks",
    "urbnum",
    "bInterfaceClass",
    "bInterfaceSubClass",
    "bInterfaceProtocol",
    "bInterfaceNumber",
    "bAlternateSetting",
    "bNumEndpoints",
    "interface",
    "modalias",
    "size",
    "ro",
    "range",
    "ext_range",
    "capability",
    "events",
    "hidden",
    "dev",
    "partition",
    "start",
    "diskseq",
    "vendor",
    "model",
    "rev",
    "type",
    "scsi_level",
    "queue_depth",
    "state",
    "wwid",
    "driver",
    "subsystem",
];

/// Warnings for one rule that parsed, which starts at `place` (line, column).
pub(super) fn rule(rule: &Rule, place: (usize, usize)) -> Vec<RuleError> {
    let warn = |(message, hint): (String, String)| {
        let (line, col) = place;
        RuleError { origin: rule.origin.clone(), line, col, message, hint: Some(hint) }
    };
    let never: Vec<RuleError> = never(rule).into_iter().map(warn).collect();
    if !never.is_empty() {
        return never;
    }
    broad(rule).into_iter().map(|(m, h)| warn((m.into(), h.into()))).collect()
}

/// Could `rule` pass its string tests of `key` with `value`?
fn can(rule: &Rule, key: &Key, value: &str) -> bool {
    rule.tests.iter().filter(|t| t.key == *key).all(|t| t.holds_for(Some(value.as_bytes())))
}

/// Reasons the rule can never attach anything, with hints.
fn never(rule: &Rule) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let block = can(rule, &Key::Subsystem, "block");
    let usb = can(rule, &Key::Subsystem, "usb") && can(rule, &Key::Env("DEVTYPE".into()), "usb_device");
    if !block && !usb {
        out.push((
            "this rule can never attach anything".into(),
            "only block devices (SUBSYSTEM==\"block\") and whole USB devices (SUBSYSTEM==\"usb\", ENV{DEVTYPE}==\"usb_device\") can be attached".into(),
        ));
    }
    if !ATTACH_ACTIONS.iter().any(|a| can(rule, &Key::Action, a)) {
        out.push((
            "this rule can never attach anything: devices are attached on add, change and bind events only".into(),
            "remove the ACTION test: a removed device is detached by itself".into(),
        ));
    }
    for test in rule.all_tests() {
        if let Some(found) = db_key(test).or_else(|| wrong_case(test)).or_else(|| devname(test)) {
            out.push(found);
        }
    }
    out
}

/// A test of a key only udev's database has.
fn db_key(test: &Test) -> Option<(String, String)> {
    let Key::Env(name) = &test.key else { return None };
    if !crate::uevent::udev_property(name) {
        return None;
    }
    let instead = DB_KEYS.iter().find(|(k, _)| *k == &**name).map(|(_, a)| *a);
    let hint = match instead {
        Some(attr) => format!("match {attr} instead: it holds the same value in sysfs"),
        None => "match the device's sysfs attributes (ATTRS{...}): `autoattach test DEVICE` shows them".into(),
    };
    let effect = if test.holds_for(None) { "always holds" } else { "never holds: the rule can never attach" };
    Some((format!("{test}: {name} is set by udev, never in a kernel uevent, so this test {effect}"), hint))
}

/// An attribute name that differs only in case from a known one.
fn wrong_case(test: &Test) -> Option<(String, String)> {
    let (Key::Attr(name, _) | Key::Attrs(name, _)) = &test.key else { return None };
    let known = KNOWN_ATTRS.iter().find(|k| **k != &**name && k.eq_ignore_ascii_case(name))?;
    let kind = if matches!(test.key, Key::Attr(..)) { "ATTR" } else { "ATTRS" };
    Some((
        format!("{test}: sysfs names are case-sensitive: no device has \"{name}\", so the rule can never attach"),
        format!("write {kind}{{{known}}}"),
    ))
}

/// `ENV{DEVNAME}` compared with a bare kernel name: udev's rules see `/dev/sdb1`.
fn devname(test: &Test) -> Option<(String, String)> {
    if test.key != Key::Env("DEVNAME".into()) || test.negate {
        return None;
    }
    let source = test.pattern.source();
    let bare =
        !source.is_empty() && source.split(|&b| b == b'|').all(|a| !a.is_empty() && a[0] != b'/' && a[0] != b'*');
    bare.then(|| {
        let shown = String::from_utf8_lossy(source).into_owned();
        (
            format!("{test}: udev's DEVNAME is a path (/dev/{shown}), so this test never holds"),
            format!("write ENV{{DEVNAME}}==\"/dev/{shown}\", or KERNEL==\"{shown}\""),
        )
    })
}

/// Reasons the rule may attach more than the one device meant.
fn broad(rule: &Rule) -> Vec<(&'static str, &'static str)> {
    let mut out = Vec::new();
    let kernel_can = |name: &str| can(rule, &Key::Kernel, name);
    const DISKS: &[&str] = &["sda", "sdb", "sdz", "mmcblk0", "nvme0n1", "vda", "sr0", "loop0"];
    const PARTS: &[&str] = &["sda1", "sdb2", "sdz15", "mmcblk0p1", "nvme0n1p1", "vda1", "loop0p1"];
    let block = can(rule, &Key::Subsystem, "block");
    let disk = can(rule, &Key::Env("DEVTYPE".into()), "disk") && DISKS.iter().any(|n| kernel_can(n));
    let part = can(rule, &Key::Env("DEVTYPE".into()), "partition") && PARTS.iter().any(|n| kernel_can(n));
    if block && disk && part {
        out.push((
            "this rule can match both a disk and its partitions: the disk would be attached and then its partitions, or the other way round",
            "add ENV{DEVTYPE}==\"disk\" or ENV{DEVTYPE}==\"partition\"",
        ));
    }
    let identity = ["serial", "idVendor", "idProduct", "product", "manufacturer"];
    let has_identity = rule.all_tests().any(|t| match &t.key {
        Key::Attr(a, _) | Key::Attrs(a, _) => identity.contains(&&**a),
        Key::Env(e) => e.starts_with("ID_"),
        Key::Devpath | Key::Kernels => true,
        _ => false,
    });
    if !has_identity {
        out.push((
            "this rule matches any device of its kind, not one device",
            "add ATTRS{idVendor}, ATTRS{idProduct} and ATTRS{serial} so only your device is attached",
        ));
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Readable by the service's user

/// Why [`unreadable_by`] could not check.
#[derive(Debug)]
pub enum AccessCheckError {
    /// Only root can take another user's identity to try.
    NotRoot,
    /// No such user here (the package is not installed?).
    NoUser(String),
    /// Looking the user up, or taking its identity, failed.
    Failed(&'static str, nix::Error),
}

impl fmt::Display for AccessCheckError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AccessCheckError::NotRoot => f.write_str("only root can check what another user can read"),
            AccessCheckError::NoUser(u) => write!(f, "no user \"{u}\" on this system"),
            AccessCheckError::Failed(what, e) => write!(f, "{what}: {}", e.desc()),
        }
    }
}

impl std::error::Error for AccessCheckError {}

/// Opens each path (and each `*.rules` file of a directory) as `user` would: a thread of our
/// own takes the user's filesystem identity (setfsuid, setfsgid and its groups, which the
/// kernel keeps per thread and which drops root's file capabilities) and tries. A warning per
/// file or directory the user cannot read; paths that do not exist are skipped (the agent
/// skips them too).
pub fn unreadable_by(paths: &[PathBuf], user: &str) -> Result<Vec<RuleError>, AccessCheckError> {
    if !nix::unistd::geteuid().is_root() {
        return Err(AccessCheckError::NotRoot);
    }
    let found = nix::unistd::User::from_name(user).map_err(|e| AccessCheckError::Failed("looking up the user", e))?;
    let account = found.ok_or_else(|| AccessCheckError::NoUser(user.into()))?;
    let name = CString::new(user).map_err(|_| AccessCheckError::NoUser(user.into()))?;
    let groups = nix::unistd::getgrouplist(&name, account.gid)
        .map_err(|e| AccessCheckError::Failed("listing the user's groups", e))?;
    let paths = paths.to_vec();
    let user: Arc<str> = user.into();
    let (uid, gid) = (account.uid.as_raw(), account.gid.as_raw());
    let worker = std::thread::spawn(move || -> Result<Vec<RuleError>, AccessCheckError> {
        become_for_files(uid, gid, &groups)?;
        Ok(paths.iter().flat_map(|p| try_read(p, &user)).collect())
    });
    worker.join().unwrap_or(Err(AccessCheckError::Failed("checking", nix::Error::EIO)))
}

/// Takes `uid`'s filesystem identity for the calling thread only: the raw system calls, not
/// libc's wrappers, which would change every thread of the process.
fn become_for_files(uid: u32, gid: u32, groups: &[nix::unistd::Gid]) -> Result<(), AccessCheckError> {
    let raw: Vec<nix::libc::gid_t> = groups.iter().map(|g| g.as_raw()).collect();
    // SAFETY: `raw` is a live array of `raw.len()` gid_t, which is what setgroups reads; the
    // call changes only this thread's credentials (no glibc broadcast for a raw syscall).
    let r = unsafe { nix::libc::syscall(nix::libc::SYS_setgroups, raw.len(), raw.as_ptr()) };
    if r != 0 {
        return Err(AccessCheckError::Failed("setgroups", nix::Error::last()));
    }
    // SAFETY: setfsgid takes a plain integer and touches only this thread's credentials.
    unsafe { nix::libc::syscall(nix::libc::SYS_setfsgid, gid) };
    // SAFETY: as above; from 0 to another uid it also clears this thread's file capabilities.
    unsafe { nix::libc::syscall(nix::libc::SYS_setfsuid, uid) };
    // setfsuid reports the previous value whatever happened: ask again to know.
    // SAFETY: as above; -1 (u32::MAX) is never a valid id, so nothing changes.
    let now = unsafe { nix::libc::syscall(nix::libc::SYS_setfsuid, u32::MAX) };
    if now != i64::from(uid) {
        return Err(AccessCheckError::Failed("setfsuid", nix::Error::EPERM));
    }
    Ok(())
}

/// Warnings for `path` (and, for a directory, its rules files) that this thread cannot read.
fn try_read(path: &Path, user: &str) -> Vec<RuleError> {
    let warn = |p: &Path, e: std::io::Error| RuleError {
        origin: p.display().to_string().into(),
        line: 0,
        col: 0,
        message: format!("the service's user \"{user}\" cannot read this: {}", super::parser::io_reason(&e)),
        hint: Some(format!(
            "the agent would refuse to start; make it readable: chmod o+r, or chgrp {user} and chmod g+r"
        )),
    };
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => return vec![warn(path, e)],
    };
    if !meta.is_dir() {
        return std::fs::File::open(path).err().map(|e| warn(path, e)).into_iter().collect();
    }
    match super::parser::rules_files(path) {
        Ok(files) => files.iter().flat_map(|f| try_read(f, user)).collect(),
        Err(e) => vec![warn(path, e)],
    }
}
