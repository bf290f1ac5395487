//! Is a matched device ready to be attached? Blocking probes, run off the event loop.
//!
//! A kernel `add` arrives before a device can be used from dom0: a card reader has no media,
//! a CD drive reports a size but cannot be read, Qubes has not yet published the device in
//! qubesdb (and `qvm-block attach` fails with "doesn't expose device"). [`Prober::check`]
//! answers for one device, and may block (it reads the first sector, runs `qubesdb-read`), so
//! the agent runs it on worker threads and replay runs it inline.
//!
//! - Block device: still present; `size` non-zero; its node under `--dev` is a block device
//!   with the event's major:minor; its first 512 bytes can be read; published in qubesdb.
//! - USB device: still present; `idVendor`/`idProduct` readable; a driver bound (or the bind
//!   event seen); published in qubesdb.
//!
//! "No media" (size 0, or the first sector unreadable) is not retried on a timer: the kernel
//! announces media with a `change` event, which re-runs the probe.

use std::ffi::OsStr;
use std::fmt;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::names::Kind;
use crate::sysfs::{MAX_ATTR, Sysfs};

/// What to probe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub kind: Kind,
    pub devpath: String,
    /// The name dom0 will see: block node name, or USB bus id.
    pub dev: String,
    /// The event's MAJOR:MINOR (block devices).
    pub devnum: Option<(u32, u32)>,
    /// A `bind` event was seen (USB devices).
    pub bound: bool,
}

/// The answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Ready,
    /// Not yet; try again soon (until the timeout).
    Wait(String),
    /// No media: wait for the kernel's change event.
    NoMedia(String),
    /// The device is gone.
    Gone,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Ready => f.write_str("ready"),
            Verdict::Wait(why) => write!(f, "not ready: {why}"),
            Verdict::NoMedia(why) => write!(f, "no media: {why}"),
            Verdict::Gone => f.write_str("gone"),
        }
    }
}

/// How device nodes are checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Nodes {
    /// The node must be a block device with the event's major:minor.
    Real,
    /// Fixture trees: a regular file stands in for the node.
    Fixture,
}

/// Where Qubes publishes devices to dom0.
#[derive(Clone, Debug)]
pub struct Qubesdb {
    /// The `qubesdb-read` program.
    pub reader: PathBuf,
    /// How long one read may take before it is killed.
    pub bound: Duration,
}

impl Qubesdb {
    /// The qubesdb key Qubes writes when it exposes a device (qubes-linux-utils udev scripts).
    pub fn key(kind: Kind, dev: &str) -> String {
        match kind {
            Kind::Block => format!("/qubes-block-devices/{dev}/desc"),
            Kind::Usb => format!("/qubes-usb-devices/{}/desc", dev.replace('.', "_")),
        }
    }

    /// True if `key` exists. A reader that fails, hangs or is missing counts as "not yet".
    pub fn has(&self, key: &str) -> Result<bool, String> {
        self.read(key).map(|v| v.is_some())
    }

    /// Reads `key`: Some(value), None if absent.
    pub fn read(&self, key: &str) -> Result<Option<Vec<u8>>, String> {
        let mut child = Command::new(&self.reader)
            .arg(OsStr::new(key))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", self.reader.display()))?;
        let start = Instant::now();
        loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    let mut out = Vec::new();
                    if let Some(mut stdout) = child.stdout.take() {
                        let _ = std::io::Read::read_to_end(&mut stdout, &mut out);
                    }
                    return Ok(status.success().then_some(out));
                }
                Ok(None) if start.elapsed() < self.bound => std::thread::sleep(Duration::from_millis(5)),
                Ok(None) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!("{} {key} took longer than {:?}", self.reader.display(), self.bound));
                }
                Err(e) => return Err(format!("waiting for {}: {e}", self.reader.display())),
            }
        }
    }
}

/// Runs readiness checks.
#[derive(Debug)]
pub struct Prober {
    pub sysfs: Arc<Sysfs>,
    pub dev: PathBuf,
    pub nodes: Nodes,
    pub qubesdb: Option<Qubesdb>,
}

impl Prober {
    /// Checks `target` once. May block (sector read, qubesdb-read).
    pub fn check(&self, target: &Target) -> Verdict {
        let local = match target.kind {
            Kind::Block => self.block(target),
            Kind::Usb => self.usb(target),
        };
        if local != Verdict::Ready {
            // Not ready, or not there at all: only then is it worth asking which.
            return if self.sysfs.exists(&target.devpath, "uevent") { local } else { Verdict::Gone };
        }
        match &self.qubesdb {
            None => Verdict::Ready,
            Some(db) => match db.has(&Qubesdb::key(target.kind, &target.dev)) {
                Ok(true) => Verdict::Ready,
                Ok(false) => Verdict::Wait("not yet published to dom0 in qubesdb".into()),
                Err(why) => Verdict::Wait(why),
            },
        }
    }

    fn block(&self, target: &Target) -> Verdict {
        let mut buf = [0u8; MAX_ATTR];
        let size = match self.sysfs.attr(&target.devpath, "size", &mut buf) {
            Ok(v) => std::str::from_utf8(v).ok().and_then(|s| s.trim().parse::<u64>().ok()),
            Err(_) => None,
        };
        match size {
            None => return Verdict::Wait("size unreadable".into()),
            Some(0) => return Verdict::NoMedia("size is 0".into()),
            Some(_) => {}
        }
        let node = self.dev.join(&target.dev);
        let meta = match std::fs::metadata(&node) {
            Ok(m) => m,
            Err(_) => return Verdict::Wait(format!("no device node {}", node.display())),
        };
        match self.nodes {
            Nodes::Real => {
                if !meta.file_type().is_block_device() {
                    return Verdict::Wait(format!("{} is not a block device", node.display()));
                }
                let rdev = meta.rdev();
                let (major, minor) = (nix::sys::stat::major(rdev) as u32, nix::sys::stat::minor(rdev) as u32);
                if let Some(want) = target.devnum.filter(|&want| want != (major, minor)) {
                    return Verdict::Wait(format!(
                        "{} is {major}:{minor}, expected {}:{}",
                        node.display(),
                        want.0,
                        want.1
                    ));
                }
            }
            Nodes::Fixture if !(meta.is_file() || meta.file_type().is_block_device()) => {
                return Verdict::Wait(format!("{} is not a file", node.display()));
            }
            Nodes::Fixture => {}
        }
        match read_first_sector(&node, self.nodes == Nodes::Real) {
            Ok(()) => Verdict::Ready,
            Err(why) => Verdict::NoMedia(format!("cannot read the first sector of {}: {why}", node.display())),
        }
    }

    fn usb(&self, target: &Target) -> Verdict {
        let mut buf = [0u8; MAX_ATTR];
        for attr in ["idVendor", "idProduct"] {
            if self.sysfs.attr(&target.devpath, attr, &mut buf).is_err() {
                return Verdict::Wait(format!("{attr} unreadable"));
            }
        }
        if !target.bound && !self.sysfs.exists(&target.devpath, "driver") {
            return Verdict::Wait("no driver bound".into());
        }
        Verdict::Ready
    }
}

/// Opens the node read-only and reads its first block. A real node (`direct`) is read with
/// O_DIRECT, one 4 KiB block (a multiple of every logical block size: 512, 2048 for CDs,
/// 4096), so that the check reads what it needs and not a 128 KiB readahead into a page
/// cache that the last close drops anyway; at least 512 bytes must come back. A fixture file,
/// or a node that refuses O_DIRECT, is read plainly.
fn read_first_sector(node: &std::path::Path, direct: bool) -> Result<(), String> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    #[repr(C, align(4096))]
    struct Block([u8; 4096]);
    let mut block = Block([0; 4096]);
    let open = |direct: bool| {
        let flags = nix::libc::O_NONBLOCK | nix::libc::O_NOCTTY | if direct { nix::libc::O_DIRECT } else { 0 };
        std::fs::OpenOptions::new().read(true).custom_flags(flags).open(node)
    };
    let einval = |e: &std::io::Error| e.raw_os_error() == Some(nix::libc::EINVAL);
    let direct = match direct.then(|| open(true)) {
        None => None,
        Some(Ok(file)) => match file.read_at(&mut block.0, 0) {
            Err(e) if einval(&e) => None,
            read => Some(read),
        },
        Some(Err(e)) if einval(&e) => None,
        Some(Err(e)) => return Err(e.to_string()),
    };
    let read = match direct {
        Some(read) => read,
        None => open(false).and_then(|file| file.read_at(&mut block.0[..512], 0)),
    };
    match read {
        Ok(n) if n >= 512 => Ok(()),
        Ok(n) => Err(format!("short read ({n} bytes)")),
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{STICK_DISK, STICK_USB, TempDir, Tree};

    fn prober(tree: &Tree, dev: &TempDir, qubesdb: Option<Qubesdb>) -> Prober {
        Prober {
            sysfs: Arc::new(Sysfs::new(tree.root()).unwrap()),
            dev: dev.path().to_owned(),
            nodes: Nodes::Fixture,
            qubesdb,
        }
    }

    fn disk() -> Target {
        Target { kind: Kind::Block, devpath: STICK_DISK.into(), dev: "sdb".into(), devnum: Some((8, 16)), bound: false }
    }

    #[test]
    fn block_readiness_steps() {
        let tree = Tree::stick(b"S1");
        let dev = TempDir::new("dev");
        let p = prober(&tree, &dev, None);
        assert!(matches!(p.check(&disk()), Verdict::Wait(w) if w.starts_with("no device node")));
        std::fs::write(dev.path().join("sdb"), [0u8; 100]).unwrap();
        assert!(matches!(p.check(&disk()), Verdict::NoMedia(w) if w.contains("short read")));
        std::fs::write(dev.path().join("sdb"), [0u8; 512]).unwrap();
        assert_eq!(p.check(&disk()), Verdict::Ready);
        std::fs::write(tree.root().join(&STICK_DISK[1..]).join("size"), "0\n").unwrap();
        assert_eq!(p.check(&disk()), Verdict::NoMedia("size is 0".into()));
        let mut gone = disk();
        gone.devpath.push_str("/nothing");
        assert_eq!(p.check(&gone), Verdict::Gone);
    }

    #[test]
    fn real_nodes_must_be_block_devices() {
        let tree = Tree::stick(b"S1");
        let dev = TempDir::new("dev");
        std::fs::write(dev.path().join("sdb"), [0u8; 512]).unwrap();
        let mut p = prober(&tree, &dev, None);
        p.nodes = Nodes::Real;
        assert!(matches!(p.check(&disk()), Verdict::Wait(w) if w.ends_with("is not a block device")));
    }

    #[test]
    fn usb_devices_need_a_driver() {
        let tree = Tree::stick(b"S1");
        let dev = TempDir::new("dev");
        let p = prober(&tree, &dev, None);
        let mut usb =
            Target { kind: Kind::Usb, devpath: STICK_USB.into(), dev: "2-1".into(), devnum: None, bound: false };
        assert_eq!(p.check(&usb), Verdict::Ready);
        std::fs::remove_file(tree.root().join(&STICK_USB[1..]).join("driver")).unwrap();
        assert_eq!(p.check(&usb), Verdict::Wait("no driver bound".into()));
        usb.bound = true;
        assert_eq!(p.check(&usb), Verdict::Ready);
    }

    #[test]
    fn qubesdb_publication_is_awaited_and_bounded() {
        let tree = Tree::stick(b"S1");
        let dev = TempDir::new("dev");
        std::fs::write(dev.path().join("sdb"), [0u8; 512]).unwrap();
        let reader = dev.path().join("qubesdb-read");
        let published = dev.path().join("published");
        std::fs::write(
            &reader,
            format!(
                "#!/bin/sh\n[ \"$1\" = /qubes-block-devices/sdb/desc ] && [ -e {} ] && echo desc\n",
                published.display()
            ),
        )
        .unwrap();
        std::os::unix::fs::PermissionsExt::set_mode(&mut std::fs::metadata(&reader).unwrap().permissions(), 0o755);
        std::fs::set_permissions(&reader, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let db = Qubesdb { reader: reader.clone(), bound: Duration::from_secs(5) };
        let p = prober(&tree, &dev, Some(db));
        assert_eq!(p.check(&disk()), Verdict::Wait("not yet published to dom0 in qubesdb".into()));
        std::fs::write(&published, "").unwrap();
        assert_eq!(p.check(&disk()), Verdict::Ready);
        std::fs::write(&reader, "#!/bin/sh\nexec sleep 10\n").unwrap();
        let slow = Prober { qubesdb: Some(Qubesdb { reader, bound: Duration::from_millis(100) }), ..p };
        let start = Instant::now();
        assert!(matches!(slow.check(&disk()), Verdict::Wait(w) if w.contains("took longer than")));
        assert!(start.elapsed() < Duration::from_secs(5));
        assert_eq!(Qubesdb::key(Kind::Usb, "2-1.4"), "/qubes-usb-devices/2-1_4/desc");
    }
}
