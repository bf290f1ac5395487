//! Is a matched device ready to be attached? Blocking probes, run off the event loop.
//!
//! A kernel `add` arrives before a device can be used from dom0: a card reader has no media,
//! a CD drive reports a size but cannot be read, Qubes has not yet published the device in
//! qubesdb (and `qvm-block attach` fails with "doesn't expose device"). [`Prober::check`]
//! answers for one device, and may block (it reads the first sector, asks qubesdb), so the
//! agent runs it on probe workers and replay and `test` run it inline.
//!
//! - Block device: still present; `size` non-zero; its node under `--dev` is a block device
//!   with the event's major:minor; its first 512 bytes can be read; published in qubesdb.
//! - USB device: still present; `idVendor`/`idProduct` readable; a driver bound (or the bind
//!   event seen); published in qubesdb.
//!
//! The answer is a [`Verdict`]; why a device is not ready is a [`Why`], never a string, so
//! the engine can tell "no media" (not retried on a timer: the kernel announces media with a
//! `change` event, which re-runs the probe) from "not published yet" (with a qubesdb watch,
//! waited for without polling) from everything else (retried with backoff until the
//! timeout). A ready device's verdict carries [`Facts`]: what the probe learnt that the call
//! needs (the device's identity, once it is wired in), so the call is completed on the
//! probe worker, before it is made.

use std::ffi::OsStr;
use std::fmt;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::errno::Errno;

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

/// What a probe learnt about a ready device that its call needs. Empty today; the device
/// identity (issue 9, see IDENTITY.md) goes here, read on the probe worker from sysfs and
/// qubesdb, and [`crate::engine::CallPlan::call`] puts it into the call.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Facts {}

/// The answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Ready(Facts),
    /// Not yet; try again soon (until the timeout).
    Wait(Why),
    /// Ready here, but Qubes has not published it to dom0 yet: its qubesdb directory (this
    /// key, e.g. `/qubes-block-devices/sdb/`) is awaited with a watch. Only a prober that
    /// reads qubesdb through a client that can watch answers this; the fallback program
    /// answers [`Verdict::Wait`] with [`Why::Unpublished`], and is asked again on a timer.
    Unpublished(String),
    /// No media: wait for the kernel's change event.
    NoMedia(Why),
    /// The device is gone.
    Gone,
}

/// Why a device is not ready.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Why {
    /// `size` could not be read.
    SizeUnreadable,
    /// `size` is 0: no media.
    SizeZero,
    /// The node does not exist (yet).
    NoNode(PathBuf),
    /// The node is not a block device.
    NotBlockDevice(PathBuf),
    /// A fixture's stand-in node is neither a file nor a block device.
    NotAFile(PathBuf),
    /// The node is another device than the event's.
    WrongDevnum { node: PathBuf, found: (u32, u32), want: (u32, u32) },
    /// The first sector could not be read.
    Unreadable { node: PathBuf, error: ReadError },
    /// A USB device attribute could not be read.
    AttrUnreadable(&'static str),
    /// No driver bound to the USB device.
    NoDriver,
    /// Not yet published in qubesdb (asked with the fallback program).
    Unpublished { key: String, reader: PathBuf },
    /// qubesdb could not be asked.
    Qubesdb(QubesdbError),
}

/// Why the first sector could not be read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReadError {
    Short(usize),
    Io(Errno),
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Ready(_) => f.write_str("ready"),
            Verdict::Wait(why) => write!(f, "not ready: {why}"),
            Verdict::Unpublished(key) => write!(f, "not yet published to dom0 in qubesdb ({key})"),
            Verdict::NoMedia(why) => write!(f, "no media: {why}"),
            Verdict::Gone => f.write_str("gone"),
        }
    }
}

impl fmt::Display for Why {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Why::SizeUnreadable => f.write_str("size unreadable"),
            Why::SizeZero => f.write_str("size is 0"),
            Why::NoNode(node) => write!(f, "no device node {}", node.display()),
            Why::NotBlockDevice(node) => write!(f, "{} is not a block device", node.display()),
            Why::NotAFile(node) => write!(f, "{} is not a file", node.display()),
            Why::WrongDevnum { node, found, want } => {
                write!(f, "{} is {}:{}, expected {}:{}", node.display(), found.0, found.1, want.0, want.1)
            }
            Why::Unreadable { node, error } => {
                write!(f, "cannot read the first sector of {}: {error}", node.display())
            }
            Why::AttrUnreadable(attr) => write!(f, "{attr} unreadable"),
            Why::NoDriver => f.write_str("no driver bound"),
            Why::Unpublished { key, reader } => {
                write!(f, "not yet published to dom0 in qubesdb ({key}, asked with {})", reader.display())
            }
            Why::Qubesdb(e) => e.fmt(f),
        }
    }
}

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadError::Short(n) => write!(f, "short read ({n} bytes)"),
            ReadError::Io(errno) => f.write_str(errno.desc()),
        }
    }
}

impl From<std::io::Error> for ReadError {
    fn from(e: std::io::Error) -> ReadError {
        ReadError::Io(e.raw_os_error().map_or(Errno::EIO, Errno::from_raw))
    }
}

/// The fallback qubesdb reader could not answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum QubesdbError {
    /// The program could not be started.
    Spawn { reader: PathBuf, errno: Errno },
    /// It did not answer within its bound (it was killed).
    Timeout { reader: PathBuf, key: String, bound: Duration },
    /// Waiting for it failed.
    Wait { reader: PathBuf, errno: Errno },
}

impl fmt::Display for QubesdbError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QubesdbError::Spawn { reader, errno } => write!(f, "cannot run {}: {}", reader.display(), errno.desc()),
            QubesdbError::Timeout { reader, key, bound } => {
                write!(f, "{} {key} took longer than {bound:?}", reader.display())
            }
            QubesdbError::Wait { reader, errno } => write!(f, "waiting for {}: {}", reader.display(), errno.desc()),
        }
    }
}

impl std::error::Error for QubesdbError {}

fn errno_of(e: &std::io::Error) -> Errno {
    e.raw_os_error().map_or(Errno::EIO, Errno::from_raw)
}

/// How devices are checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Nodes {
    /// The node must be a block device with the event's major:minor.
    Real,
    /// Fixture trees: a regular file stands in for the node.
    Fixture,
}

/// The qubesdb directory Qubes writes when it exposes a device (qubes-linux-utils
/// `udev/udev-block-add-change`, `udev-usb-add-change`: `/qubes-block-devices/NAME/` and
/// `/qubes-usb-devices/BUSID/` with `.` replaced by `_`, qubesdb allowing no dot in a key).
/// Its `desc` is written first, in the same `qubesdb-write` as the rest.
pub fn publication_dir(kind: Kind, dev: &str) -> String {
    match kind {
        Kind::Block => format!("/qubes-block-devices/{dev}/"),
        Kind::Usb => format!("/qubes-usb-devices/{}/", dev.replace('.', "_")),
    }
}

/// The fallback: the `qubesdb-read` program, run once per question (no watch possible, so a
/// device not yet published is asked about again on a timer).
#[derive(Clone, Debug)]
pub struct Qubesdb {
    /// The `qubesdb-read` program.
    pub reader: PathBuf,
    /// How long one read may take before it is killed.
    pub bound: Duration,
}

impl Qubesdb {
    /// The key whose presence means "published" (the record's `desc`).
    pub fn key(kind: Kind, dev: &str) -> String {
        publication_dir(kind, dev) + "desc"
    }

    /// Reads `key`: Some(value), None if absent. The program is run with argv[0] exactly
    /// `qubesdb-read`: before qubesdb 4.3.3 it picks its command after the first `-` of
    /// argv[0], so a path with a `-` in a directory (`/opt/qubes-tools/qubesdb-read`) made it
    /// print its usage and exit 0, which read as "published".
    pub fn read(&self, key: &str) -> Result<Option<Vec<u8>>, QubesdbError> {
        let reader = || self.reader.clone();
        let mut child = Command::new(&self.reader)
            .arg0("qubesdb-read")
            .arg(OsStr::new(key))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| QubesdbError::Spawn { reader: reader(), errno: errno_of(&e) })?;
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
                    return Err(QubesdbError::Timeout { reader: reader(), key: key.to_owned(), bound: self.bound });
                }
                Err(e) => return Err(QubesdbError::Wait { reader: reader(), errno: errno_of(&e) }),
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
    /// Checks `target` once. May block (sector read, qubesdb).
    pub fn check(&self, target: &Target) -> Verdict {
        let local = match target.kind {
            Kind::Block => self.block(target),
            Kind::Usb => self.usb(target),
        };
        if let Err(not_ready) = local {
            // Not ready, or not there at all: only then is it worth asking which.
            return if self.sysfs.exists(&target.devpath, "uevent") { not_ready } else { Verdict::Gone };
        }
        match &self.qubesdb {
            None => Verdict::Ready(Facts::default()),
            Some(db) => {
                let key = Qubesdb::key(target.kind, &target.dev);
                match db.read(&key) {
                    Ok(Some(_)) => Verdict::Ready(Facts::default()),
                    Ok(None) => Verdict::Wait(Why::Unpublished { key, reader: db.reader.clone() }),
                    Err(e) => Verdict::Wait(Why::Qubesdb(e)),
                }
            }
        }
    }

    fn block(&self, target: &Target) -> Result<(), Verdict> {
        let mut buf = [0u8; MAX_ATTR];
        let size = match self.sysfs.attr(&target.devpath, "size", &mut buf) {
            Ok(v) => std::str::from_utf8(v).ok().and_then(|s| s.trim().parse::<u64>().ok()),
            Err(_) => None,
        };
        match size {
            None => return Err(Verdict::Wait(Why::SizeUnreadable)),
            Some(0) => return Err(Verdict::NoMedia(Why::SizeZero)),
            Some(_) => {}
        }
        let node = self.dev.join(&target.dev);
        let meta = std::fs::metadata(&node).map_err(|_| Verdict::Wait(Why::NoNode(node.clone())))?;
        self.node_is_the_device(&node, &meta, target.devnum).map_err(Verdict::Wait)?;
        read_first_sector(&node, self.nodes == Nodes::Real)
            .map_err(|error| Verdict::NoMedia(Why::Unreadable { node: node.clone(), error }))
    }

    /// A real node must be a block device with the event's major:minor; a fixture's stands
    /// in as a file.
    fn node_is_the_device(&self, node: &Path, meta: &std::fs::Metadata, devnum: Option<(u32, u32)>) -> Result<(), Why> {
        let block = meta.file_type().is_block_device();
        match self.nodes {
            Nodes::Real if !block => Err(Why::NotBlockDevice(node.to_owned())),
            Nodes::Real => {
                let rdev = meta.rdev();
                let found = (nix::sys::stat::major(rdev) as u32, nix::sys::stat::minor(rdev) as u32);
                match devnum {
                    Some(want) if want != found => Err(Why::WrongDevnum { node: node.to_owned(), found, want }),
                    _ => Ok(()),
                }
            }
            Nodes::Fixture if !(meta.is_file() || block) => Err(Why::NotAFile(node.to_owned())),
            Nodes::Fixture => Ok(()),
        }
    }

    fn usb(&self, target: &Target) -> Result<(), Verdict> {
        let mut buf = [0u8; MAX_ATTR];
        for attr in ["idVendor", "idProduct"] {
            if self.sysfs.attr(&target.devpath, attr, &mut buf).is_err() {
                return Err(Verdict::Wait(Why::AttrUnreadable(attr)));
            }
        }
        if !target.bound && !self.sysfs.exists(&target.devpath, "driver") {
            return Err(Verdict::Wait(Why::NoDriver));
        }
        Ok(())
    }
}

/// Opens the node read-only and reads its first block. A real node (`direct`) is read with
/// O_DIRECT, one 4 KiB block (a multiple of every logical block size: 512, 2048 for CDs,
/// 4096), so that the check reads what it needs and not a 128 KiB readahead into a page
/// cache that the last close drops anyway; at least 512 bytes must come back. A fixture file,
/// or a node that refuses O_DIRECT, is read plainly.
///
/// This read is where a dying device holds a probe worker in the kernel (uninterruptible
/// sleep, for as long as the SCSI layer retries): see the run loop's probe deadline.
fn read_first_sector(node: &Path, direct: bool) -> Result<(), ReadError> {
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
        Some(Err(e)) => return Err(e.into()),
    };
    let read = match direct {
        Some(read) => read,
        None => open(false).and_then(|file| file.read_at(&mut block.0[..512], 0)),
    };
    match read {
        Ok(n) if n >= 512 => Ok(()),
        Ok(n) => Err(ReadError::Short(n)),
        Err(e) => Err(e.into()),
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

    const READY: Verdict = Verdict::Ready(Facts {});

    #[test]
    fn block_readiness_steps() {
        let tree = Tree::stick(b"S1");
        let dev = TempDir::new("dev");
        let p = prober(&tree, &dev, None);
        let node = dev.path().join("sdb");
        assert_eq!(p.check(&disk()), Verdict::Wait(Why::NoNode(node.clone())));
        assert_eq!(p.check(&disk()).to_string(), format!("not ready: no device node {}", node.display()));
        std::fs::write(&node, [0u8; 100]).unwrap();
        let short = Verdict::NoMedia(Why::Unreadable { node: node.clone(), error: ReadError::Short(100) });
        assert_eq!(p.check(&disk()), short);
        assert!(short.to_string().ends_with("short read (100 bytes)"), "{short}");
        std::fs::write(&node, [0u8; 512]).unwrap();
        assert_eq!(p.check(&disk()), READY);
        std::fs::write(tree.root().join(&STICK_DISK[1..]).join("size"), "0\n").unwrap();
        assert_eq!(p.check(&disk()), Verdict::NoMedia(Why::SizeZero));
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
        assert_eq!(p.check(&disk()), Verdict::Wait(Why::NotBlockDevice(dev.path().join("sdb"))));
    }

    #[test]
    fn usb_devices_need_a_driver() {
        let tree = Tree::stick(b"S1");
        let dev = TempDir::new("dev");
        let p = prober(&tree, &dev, None);
        let mut usb =
            Target { kind: Kind::Usb, devpath: STICK_USB.into(), dev: "2-1".into(), devnum: None, bound: false };
        assert_eq!(p.check(&usb), READY);
        std::fs::remove_file(tree.root().join(&STICK_USB[1..]).join("driver")).unwrap();
        assert_eq!(p.check(&usb), Verdict::Wait(Why::NoDriver));
        assert_eq!(Why::NoDriver.to_string(), "no driver bound");
        usb.bound = true;
        assert_eq!(p.check(&usb), READY);
    }

    /// The fallback reader: asked per probe, and bounded. (Its argv[0] is not observable from
    /// a script stand-in: the kernel replaces it with the interpreter's.)
    #[test]
    fn qubesdb_publication_is_awaited_and_bounded() {
        let tree = Tree::stick(b"S1");
        let dev = TempDir::new("dev");
        std::fs::write(dev.path().join("sdb"), [0u8; 512]).unwrap();
        let tools = dev.path().join("qubes-tools");
        std::fs::create_dir(&tools).unwrap();
        let reader = tools.join("qubesdb-read");
        let published = dev.path().join("published");
        let script = format!(
            "#!/bin/sh\n[ \"$1\" = /qubes-block-devices/sdb/desc ] && [ -e {} ] && echo desc\n",
            published.display()
        );
        std::fs::write(&reader, script).unwrap();
        std::fs::set_permissions(&reader, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let db = Qubesdb { reader: reader.clone(), bound: Duration::from_secs(5) };
        let p = prober(&tree, &dev, Some(db));
        let key = "/qubes-block-devices/sdb/desc".to_owned();
        let unpublished = Verdict::Wait(Why::Unpublished { key: key.clone(), reader: reader.clone() });
        assert_eq!(p.check(&disk()), unpublished);
        assert_eq!(
            unpublished.to_string(),
            format!("not ready: not yet published to dom0 in qubesdb ({key}, asked with {})", reader.display())
        );
        std::fs::write(&published, "").unwrap();
        assert_eq!(p.check(&disk()), READY);
        std::fs::write(&reader, "#!/bin/sh\nexec sleep 10\n").unwrap();
        let slow = Prober { qubesdb: Some(Qubesdb { reader: reader.clone(), bound: Duration::from_millis(100) }), ..p };
        let start = Instant::now();
        let timeout = QubesdbError::Timeout { reader, key, bound: Duration::from_millis(100) };
        assert_eq!(slow.check(&disk()), Verdict::Wait(Why::Qubesdb(timeout)));
        assert!(start.elapsed() < Duration::from_secs(5));
        assert_eq!(Qubesdb::key(Kind::Usb, "2-1.4"), "/qubes-usb-devices/2-1_4/desc");
        assert_eq!(publication_dir(Kind::Block, "sdb1"), "/qubes-block-devices/sdb1/");
    }
}
