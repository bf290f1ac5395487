//! umockdev recordings: read them into a sysfs tree for replay, write them for bug reports.
//!
//! The format is `umockdev-record`'s: one block per device, the device first and then its
//! parents, blocks separated by a blank line:
//!
//! ```text
//! P: /devices/pci0000:00/0000:00:14.0/usb2/2-1     the devpath
//! N: bus/usb/002/002[=HEX]                          node under /dev, optional contents
//!                                                   (`N: sr0=`: recorded empty, unreadable)
//! E: KEY=VALUE                                      properties (udev's, kernel's among them)
//! A: name=value                                     text attribute, g_strescape'd
//! H: name=HEX                                       binary attribute
//! L: name=target                                    symlink attribute
//! ```
//!
//! A recording becomes a tree like the kernel's: a directory per device with its attributes,
//! a `uevent` file holding the kernel's properties (udev's own, such as `ID_*` or `DEVLINKS`,
//! are left out: rules never see them live either), `subsystem` and `driver` links, and the
//! `class/block` and `bus/usb/devices` listings that coldplug reads. A recording does not hold
//! block device contents, so a recorded block node with a non-zero size gets 512 readable
//! bytes, and one with size 0, or recorded with empty contents (`autoattach record` writes
//! `N: sr0=` for a node whose first sector it could not read: an empty CD drive has a
//! non-zero size), an empty file (no media).
//!
//! Everything in a recording is checked before it touches the filesystem: devpaths and
//! attribute names must be plain relative paths, link targets must stay inside the tree.

use std::fmt;
use std::io::{self, Write};
use std::path::{Component, Path};

use crate::sysfs::Sysfs;
use crate::uevent::devpath_is_safe;

/// One recorded device.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Device {
    pub devpath: String,
    pub node: Option<(String, Option<Vec<u8>>)>,
    pub props: Vec<(String, String)>,
    pub attrs: Vec<(String, Vec<u8>)>,
    pub links: Vec<(String, String)>,
}

impl Device {
    pub fn prop(&self, key: &str) -> Option<&str> {
        self.props.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

/// A malformed recording line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FormatError {
    pub line: usize,
    pub message: String,
}

impl fmt::Display for FormatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

impl std::error::Error for FormatError {}

/// Parses a recording.
pub fn parse(text: &str) -> Result<Vec<Device>, FormatError> {
    let mut devices: Vec<Device> = Vec::new();
    let mut current: Option<Device> = None;
    for (n, line) in text.lines().enumerate() {
        let err = |message: String| FormatError { line: n + 1, message };
        if line.trim().is_empty() {
            devices.extend(current.take());
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let (tag, rest) = line.split_once(": ").ok_or_else(|| err("expected 'X: value'".into()))?;
        if tag == "P" {
            devices.extend(current.take());
            if !devpath_is_safe(rest) || !rest.starts_with("/devices/") {
                return Err(err(format!("devpath {rest:?} is not a plain path under /devices")));
            }
            current = Some(Device { devpath: rest.to_owned(), ..Device::default() });
            continue;
        }
        let device = current.as_mut().ok_or_else(|| err(format!("'{tag}:' before any 'P:' line")))?;
        let (name, value) = match tag {
            "N" | "S" => rest.split_once('=').map_or((rest, None), |(n, v)| (n, Some(v))),
            _ => rest
                .split_once('=')
                .map(|(n, v)| (n, Some(v)))
                .ok_or_else(|| err(format!("'{tag}:' needs name=value")))?,
        };
        let value_or_empty = value.unwrap_or_default();
        match tag {
            "N" => {
                check_rel(name).map_err(|m| err(format!("node {name:?}: {m}")))?;
                // `N: sr0` (no contents recorded) and `N: sr0=` (recorded empty: unreadable).
                let contents = match value {
                    None => None,
                    Some(hex) => Some(unhex(hex).ok_or_else(|| err("bad hex".into()))?),
                };
                device.node = Some((name.to_owned(), contents));
            }
            "S" => {}
            "E" => device.props.push((name.to_owned(), value_or_empty.to_owned())),
            "A" | "H" => {
                check_rel(name).map_err(|m| err(format!("attribute {name:?}: {m}")))?;
                let bytes = if tag == "A" { unescape(value_or_empty) } else { unhex(value_or_empty) };
                device.attrs.push((name.to_owned(), bytes.ok_or_else(|| err(format!("bad {tag}: value")))?));
            }
            "L" => {
                check_rel(name).map_err(|m| err(format!("link {name:?}: {m}")))?;
                device.links.push((name.to_owned(), value_or_empty.to_owned()));
            }
            _ => return Err(err(format!("unknown line type '{tag}:'"))),
        }
    }
    devices.extend(current);
    Ok(devices)
}

/// A relative path of plain components.
fn check_rel(name: &str) -> Result<(), &'static str> {
    let path = Path::new(name);
    if name.is_empty() || !path.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err("not a plain relative path");
    }
    Ok(())
}

/// Properties udev adds (see [`crate::uevent::udev_property`]) and those the kernel's `uevent`
/// file never has (the event's own header values).
fn udev_only(key: &str) -> bool {
    const KEYS: &[&str] = &["ACTION", "DEVPATH", "SUBSYSTEM", "SEQNUM", "SYNTH_UUID"];
    KEYS.contains(&key) || crate::uevent::udev_property(key)
}

/// Writes `devices` as a tree: `root/sys` (the sysfs root) and `root/dev`.
pub fn write_tree(devices: &[Device], root: &Path) -> io::Result<()> {
    let sys = root.join("sys");
    let dev = root.join("dev");
    std::fs::create_dir_all(&dev)?;
    for d in devices {
        let dir = sys.join(&d.devpath[1..]);
        no_link_on(&sys, &dir)?;
        std::fs::create_dir_all(&dir)?;
        let mut uevent = String::new();
        for (k, v) in d.props.iter().filter(|(k, _)| !udev_only(k)) {
            let v = if k == "DEVNAME" { v.strip_prefix("/dev/").unwrap_or(v) } else { v };
            uevent.push_str(&format!("{k}={v}\n"));
        }
        std::fs::write(dir.join("uevent"), uevent)?;
        for (name, value) in &d.attrs {
            let path = dir.join(name);
            std::fs::create_dir_all(path.parent().unwrap_or(&dir))?;
            std::fs::write(path, value)?;
        }
        for (name, target) in &d.links {
            let link = dir.join(name);
            if !stays_inside(&sys, &link, target) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: link {name} -> {target} leaves the tree", d.devpath),
                ));
            }
            no_link_on(&sys, link.parent().unwrap_or(&dir))?;
            std::fs::create_dir_all(link.parent().unwrap_or(&dir))?;
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(target, link)?;
        }
        link_subsystem(d, &sys, &dir)?;
        if let Some((name, contents)) = &d.node {
            let path = dev.join(name);
            std::fs::create_dir_all(path.parent().unwrap_or(&dev))?;
            let sized =
                d.attrs.iter().find(|(n, _)| n == "size").map(|(_, v)| String::from_utf8_lossy(v).trim() != "0");
            let bytes = match (contents, sized) {
                (Some(c), _) => c.clone(),
                (None, Some(true)) => vec![0; 512],
                _ => Vec::new(),
            };
            std::fs::write(path, bytes)?;
        }
    }
    Ok(())
}

/// The `subsystem` and `driver` links of a recorded device, and its entry in the listings
/// coldplug reads (`class/block`, `bus/usb/devices`).
fn link_subsystem(d: &Device, sys: &Path, dir: &Path) -> io::Result<()> {
    let depth = d.devpath.matches('/').count();
    let up = "../".repeat(depth);
    if let Some(subsystem) = d.prop("SUBSYSTEM") {
        check_rel(subsystem)
            .map_err(|m| io::Error::new(io::ErrorKind::InvalidData, format!("SUBSYSTEM {subsystem:?}: {m}")))?;
        let class = if subsystem == "block" { "class/block".to_owned() } else { format!("bus/{subsystem}") };
        std::fs::create_dir_all(sys.join(&class))?;
        link_fresh(&format!("{up}{class}"), &dir.join("subsystem"))?;
        let kernel = crate::uevent::kernel_name(&d.devpath);
        let listing = match subsystem {
            "block" => Some("class/block".to_owned()),
            "usb" if d.prop("DEVTYPE") == Some("usb_device") => Some("bus/usb/devices".to_owned()),
            _ => None,
        };
        if let Some(listing) = listing {
            std::fs::create_dir_all(sys.join(&listing))?;
            let back = "../".repeat(listing.matches('/').count() + 1);
            link_fresh(&format!("{}{}", back.trim_end_matches('/'), d.devpath), &sys.join(&listing).join(kernel))?;
        }
        if let Some(driver) = d.prop("DRIVER") {
            check_rel(driver)
                .map_err(|m| io::Error::new(io::ErrorKind::InvalidData, format!("DRIVER {driver:?}: {m}")))?;
            let drivers = format!("bus/{subsystem}/drivers/{driver}");
            std::fs::create_dir_all(sys.join(&drivers))?;
            link_fresh(&format!("{up}{drivers}"), &dir.join("driver"))?;
        }
    }
    Ok(())
}

fn link_fresh(target: &str, link: &Path) -> io::Result<()> {
    let _ = std::fs::remove_file(link);
    std::os::unix::fs::symlink(target, link)
}

/// Refuses a directory under `root` reached through a symbolic link the recording made: the
/// lexical checks here (link targets, `../` counts) hold only where a path is what it says.
fn no_link_on(root: &Path, dir: &Path) -> io::Result<()> {
    let mut at = root.to_path_buf();
    for c in dir.strip_prefix(root).unwrap_or(dir).components() {
        at.push(c);
        match std::fs::symlink_metadata(&at) {
            Ok(m) if m.file_type().is_symlink() => {
                let shown = at.strip_prefix(root).unwrap_or(&at).display().to_string();
                let message = format!("{shown} is a link: nothing is written through a link");
                return Err(io::Error::new(io::ErrorKind::InvalidData, message));
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    Ok(())
}

/// True if the relative `target` of `link` resolves (lexically) inside `root`: the link's place
/// relative to the root, then [`crate::beneath::link_stays_inside`]'s rule.
fn stays_inside(root: &Path, link: &Path, target: &str) -> bool {
    link.strip_prefix(root).is_ok_and(|rel| crate::beneath::link_stays_inside(rel, Path::new(target)))
}

/// Records `devpath` and its parents from `sysfs`, in umockdev-record's format. With `nodes`
/// (the `/dev` the tree's nodes live in), a block device whose first sector cannot be read (an
/// empty CD drive, a card reader without a card: their `size` may not say so) is recorded as
/// `N: NAME=`, a node with empty contents, which replay makes unreadable; a readable one as
/// `N: NAME`. A disk's contents are never recorded.
pub fn record(sysfs: &Sysfs, devpath: &str, nodes: Option<&Path>, out: &mut impl Write) -> io::Result<()> {
    let mut at = Some(devpath.to_owned());
    while let Some(dp) = at {
        record_one(sysfs, &dp, nodes, out)?;
        at = sysfs.parent(&dp).map(str::to_owned);
    }
    Ok(())
}

fn record_one(sysfs: &Sysfs, devpath: &str, nodes: Option<&Path>, out: &mut impl Write) -> io::Result<()> {
    writeln!(out, "P: {devpath}")?;
    let uevent = sysfs.uevent_file(devpath).unwrap_or_default();
    let uevent = String::from_utf8_lossy(&uevent);
    let mut props: Vec<(&str, &str)> = uevent.lines().filter_map(|l| l.split_once('=')).collect();
    let mut buf = [0u8; crate::sysfs::MAX_ATTR];
    let subsystem = sysfs.link(devpath, "subsystem", &mut buf).map(|s| String::from_utf8_lossy(s).into_owned());
    if let Some((_, name)) = props.iter().find(|(k, _)| *k == "DEVNAME") {
        let block = subsystem.as_deref() == Some("block");
        let unreadable = block && nodes.is_some_and(|dev| !crate::readiness::first_sector_readable(&dev.join(name)));
        writeln!(out, "N: {name}{}", if unreadable { "=" } else { "" })?;
    }
    if let Some(s) = &subsystem {
        props.push(("SUBSYSTEM", s));
    }
    props.sort();
    for (k, v) in props {
        let v = if k == "DEVNAME" { format!("/dev/{v}") } else { v.to_owned() };
        writeln!(out, "E: {k}={v}")?;
    }
    for (name, entry) in sysfs.entries(devpath) {
        if matches!(name.as_str(), "subsystem" | "driver" | "firmware_node" | "uevent") {
            continue;
        }
        match entry {
            // A link is recorded if it stays in the tree and leads to a file there.
            crate::sysfs::Entry::Link(at, target) => {
                if crate::beneath::link_stays_inside(&at, &target) && sysfs.read_file(devpath, &name, 64 * 1024).is_ok()
                {
                    writeln!(out, "L: {name}={}", target.display())?;
                }
            }
            crate::sysfs::Entry::File => {
                if let Ok(value) = sysfs.read_file(devpath, &name, 64 * 1024) {
                    match std::str::from_utf8(&value) {
                        Ok(text) if !text.contains('\0') => writeln!(out, "A: {name}={}", escape(text.as_bytes()))?,
                        _ => writeln!(out, "H: {name}={}", hex(&value))?,
                    }
                }
            }
            crate::sysfs::Entry::Other => {}
        }
    }
    writeln!(out)
}

/// glib's g_strescape: `\b \f \n \r \t \v \\ \"` and octal `\NNN` for other control bytes and
/// anything above 0x7e.
pub fn escape(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for &b in bytes {
        match b {
            0x08 => out.push_str("\\b"),
            0x0c => out.push_str("\\f"),
            b'\n' => out.push_str("\\n"),
            b'\r' => out.push_str("\\r"),
            b'\t' => out.push_str("\\t"),
            0x0b => out.push_str("\\v"),
            b'\\' => out.push_str("\\\\"),
            b'"' => out.push_str("\\\""),
            0x20..=0x7e => out.push(b as char),
            _ => out.push_str(&format!("\\{b:03o}")),
        }
    }
    out
}

/// Reverses [`escape`] (g_strcompress). None on a dangling backslash.
pub fn unescape(text: &str) -> Option<Vec<u8>> {
    let b = text.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'\\' {
            out.push(b[i]);
            i += 1;
            continue;
        }
        let c = *b.get(i + 1)?;
        i += 2;
        match c {
            b'0'..=b'7' => {
                let mut v = u32::from(c - b'0');
                for _ in 0..2 {
                    match b.get(i) {
                        Some(&d @ b'0'..=b'7') => {
                            v = v * 8 + u32::from(d - b'0');
                            i += 1;
                        }
                        _ => break,
                    }
                }
                out.push(v as u8);
            }
            b'b' => out.push(0x08),
            b'f' => out.push(0x0c),
            b'n' => out.push(b'\n'),
            b'r' => out.push(b'\r'),
            b't' => out.push(b'\t'),
            b'v' => out.push(0x0b),
            other => out.push(other),
        }
    }
    Some(out)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02X}")).collect()
}

/// Bytes from hex digits (umockdev's `H:` values), None if they are not pairs of hex digits.
pub(crate) fn unhex(text: &str) -> Option<Vec<u8>> {
    let text = text.trim();
    if text.len() % 2 != 0 {
        return None;
    }
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{STICK_DISK, TempDir, Tree};

    #[test]
    fn escaping_round_trips_every_byte() {
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(unescape(&escape(&all)).unwrap(), all);
        assert_eq!(escape(b"0\n"), "0\\n");
        assert_eq!(unescape("QEMU\\040\\342\\n").unwrap(), b"QEMU \xe2\n");
        assert_eq!(unescape("bad\\"), None);
    }

    #[test]
    fn refuses_paths_that_leave_the_tree() {
        assert!(parse("P: /devices/../../etc\n").is_err());
        assert!(parse("P: /devices/x\nA: ../../x=1\n").is_err());
        assert!(parse("A: x=1\n").is_err());
        let devices = parse("P: /devices/x\nL: evil=../../../../etc/passwd\n").unwrap();
        let dir = TempDir::new("umockdev");
        assert!(write_tree(&devices, dir.path()).is_err());
        let devices = parse("P: /devices/x\nL: evil=/etc/passwd\n").unwrap();
        assert!(write_tree(&devices, dir.path()).is_err());
    }

    /// record(tree) -> parse -> write_tree -> record gives the same text: a recording holds
    /// everything the tree has that matters.
    #[test]
    fn record_then_replay_tree_round_trips() {
        let tree = Tree::stick(b"AB\"C\\1\xc3\xa9");
        std::fs::write(tree.root().join(&STICK_DISK[1..]).join("binary"), b"\x00\xff").unwrap();
        let sysfs = Sysfs::new(tree.root()).unwrap();
        let mut text = Vec::new();
        record(&sysfs, STICK_DISK, None, &mut text).unwrap();
        let text = String::from_utf8(text).unwrap();
        assert!(text.starts_with(&format!("P: {STICK_DISK}\nN: sdb\n")), "{text}");
        assert!(text.contains("A: serial=AB\\\"C\\\\1\\303\\251\\n\n"), "{text}");
        assert!(text.contains("H: binary=00FF\n"), "{text}");
        let devices = parse(&text).unwrap();
        assert_eq!(devices.len(), 9);
        let out = TempDir::new("replayed");
        write_tree(&devices, out.path()).unwrap();
        let again = Sysfs::new(out.path().join("sys")).unwrap();
        let mut text2 = Vec::new();
        record(&again, STICK_DISK, None, &mut text2).unwrap();
        assert_eq!(text, String::from_utf8(text2).unwrap());
        assert_eq!(std::fs::read(out.path().join("dev/sdb")).unwrap().len(), 512);
        assert_eq!(again.scan().len(), 3, "sdb, usb2 and 2-1 are listed for coldplug");
    }

    /// A block node whose first sector cannot be read (an empty CD drive: its size is not 0)
    /// is recorded as `N: NAME=`, and replayed as an unreadable (empty) node; a readable one
    /// as `N: NAME`, replayed readable. Nothing of the disk's contents is recorded.
    #[test]
    fn an_unreadable_node_is_recorded_and_replayed_unreadable() {
        let tree = Tree::stick(b"S1");
        let sysfs = Sysfs::new(tree.root()).unwrap();
        let dev = TempDir::new("dev");
        std::fs::write(dev.path().join("sdb"), [7u8; 100]).unwrap();
        let mut text = Vec::new();
        record(&sysfs, STICK_DISK, Some(dev.path()), &mut text).unwrap();
        let text = String::from_utf8(text).unwrap();
        assert!(text.starts_with(&format!("P: {STICK_DISK}\nN: sdb=\n")), "{text}");
        let out = TempDir::new("replayed");
        write_tree(&parse(&text).unwrap(), out.path()).unwrap();
        assert_eq!(std::fs::read(out.path().join("dev/sdb")).unwrap().len(), 0, "replayed unreadable");
        std::fs::write(dev.path().join("sdb"), [7u8; 512]).unwrap();
        let mut text = Vec::new();
        record(&sysfs, STICK_DISK, Some(dev.path()), &mut text).unwrap();
        let text = String::from_utf8(text).unwrap();
        assert!(text.starts_with(&format!("P: {STICK_DISK}\nN: sdb\n")), "{text}");
        assert!(!text.contains("0707"), "no contents recorded: {text}");
    }
}
