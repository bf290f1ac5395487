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

use std::fmt;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use nix::errno::Errno;

use crate::names::Kind;
use crate::qubesdb::{Client, Program, QdbError};
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
    Qubesdb(QdbFailure),
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

/// A qubesdb failure, shared (verdicts are cloned and compared; the error is neither).
#[derive(Clone, Debug)]
pub struct QdbFailure(pub Arc<QdbError>);

impl PartialEq for QdbFailure {
    fn eq(&self, other: &QdbFailure) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || self.0.to_string() == other.0.to_string()
    }
}

impl Eq for QdbFailure {}

impl fmt::Display for QdbFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
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

/// How long one qubesdb question may take (socket or program).
pub const QUBESDB_TIMEOUT: Duration = Duration::from_secs(2);

/// Where a probe asks whether Qubes has published a device.
#[derive(Debug)]
pub enum Publication {
    /// The qubesdb daemon's socket: a device not yet published is awaited with a watch (on the
    /// run loop's own connection), never polled.
    Socket(Mutex<Client>),
    /// The `qubesdb-read` program (no daemon socket: not a Qubes qube, an old one, or tests):
    /// run per probe; a device not yet published is asked about again on a timer.
    Program(Program),
}

impl Publication {
    /// What `--no-qubesdb` and `--qubesdb-read PATH` ask for, or by default this qube's
    /// qubesdb socket, else `qubesdb-read` if it is installed, else nothing.
    pub fn choose(none: bool, reader: Option<&Path>) -> Option<Publication> {
        let program = |path: PathBuf| Publication::Program(Program { path, timeout: QUBESDB_TIMEOUT });
        if none {
            return None;
        }
        if let Some(path) = reader {
            return Some(program(path.to_owned()));
        }
        match Client::connect_local(QUBESDB_TIMEOUT) {
            Ok(client) => return Some(Publication::Socket(Mutex::new(client))),
            Err(e) if !e.absent() => warning!("{e}; asking qubesdb-read instead"),
            Err(_) => {}
        }
        crate::spawn::find_program(Path::new("qubesdb-read")).map(program)
    }

    /// Reads `key`: Some(value), None if absent.
    pub fn read(&self, key: &str) -> Result<Option<Vec<u8>>, QdbError> {
        match self {
            Publication::Socket(client) => client.lock().unwrap_or_else(PoisonError::into_inner).read(key),
            Publication::Program(program) => program.read(key),
        }
    }

    /// True if a device not yet published can be watched for.
    pub fn watches(&self) -> bool {
        matches!(self, Publication::Socket(_))
    }
}

impl fmt::Display for Publication {
    /// How publication is awaited, for the log.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Publication::Socket(client) => {
                let client = client.lock().unwrap_or_else(PoisonError::into_inner);
                write!(f, "a watch on the qubesdb socket {}", client.socket().display())
            }
            Publication::Program(p) => {
                write!(f, "{} run again with growing pauses (no qubesdb socket)", p.path.display())
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
    pub qubesdb: Option<Publication>,
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
            Some(db) => published(db, target),
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

/// Whether Qubes has published the device: its record's `desc` exists.
fn published(db: &Publication, target: &Target) -> Verdict {
    let dir = publication_dir(target.kind, &target.dev);
    let key = format!("{dir}desc");
    match (db.read(&key), db) {
        (Ok(Some(_)), _) => Verdict::Ready(Facts::default()),
        (Ok(None), Publication::Socket(_)) => Verdict::Unpublished(dir),
        (Ok(None), Publication::Program(p)) => Verdict::Wait(Why::Unpublished { key, reader: p.path.clone() }),
        (Err(e), _) => Verdict::Wait(Why::Qubesdb(QdbFailure(Arc::new(e)))),
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

    fn prober(tree: &Tree, dev: &TempDir, qubesdb: Option<Publication>) -> Prober {
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

    /// The fallback reader: asked per probe, and bounded.
    #[test]
    fn qubesdb_publication_is_asked_with_the_program_and_bounded() {
        let tree = Tree::stick(b"S1");
        let dev = TempDir::new("dev");
        std::fs::write(dev.path().join("sdb"), [0u8; 512]).unwrap();
        let reader = dev.path().join("qubesdb-read");
        let published = dev.path().join("published");
        let script = format!(
            "#!/bin/sh\n[ \"$2\" = /qubes-block-devices/sdb/desc ] && [ -e {} ] && echo desc && exit 0\nexit 2\n",
            published.display()
        );
        std::fs::write(&reader, script).unwrap();
        std::fs::set_permissions(&reader, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let program = |timeout| Publication::Program(Program { path: reader.clone(), timeout });
        let p = prober(&tree, &dev, Some(program(Duration::from_secs(5))));
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
        let slow = Prober { qubesdb: Some(program(Duration::from_millis(100))), ..p };
        let start = std::time::Instant::now();
        let Verdict::Wait(Why::Qubesdb(e)) = slow.check(&disk()) else { panic!("not a qubesdb failure") };
        assert!(e.to_string().contains("no answer within 100 ms"), "{e}");
        assert!(start.elapsed() < Duration::from_secs(5));
        assert_eq!(publication_dir(Kind::Usb, "2-1.4"), "/qubes-usb-devices/2-1_4/");
        assert_eq!(publication_dir(Kind::Block, "sdb1"), "/qubes-block-devices/sdb1/");
    }

    /// Through the daemon's socket (the stand-in daemon of tests/support), a device not yet
    /// published is `Unpublished` with its directory, for the run loop to watch.
    #[test]
    fn qubesdb_publication_through_the_socket_is_watched_for() {
        let tree = Tree::stick(b"S1");
        let dev = TempDir::new("dev");
        std::fs::write(dev.path().join("sdb"), [0u8; 512]).unwrap();
        let standin = dev.path().join("qubesdb-standin");
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/qubesdb-standin.c");
        let built = std::process::Command::new("cc").args(["-O2", "-o"]).arg(&standin).arg(&src).status().unwrap();
        assert!(built.success());
        let socket = dev.path().join("qubesdb.sock");
        let mut daemon = std::process::Command::new(&standin)
            .arg("daemon")
            .arg(&socket)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut ready = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(daemon.stdout.take().unwrap()), &mut ready).unwrap();
        let client = Client::connect(&socket, Duration::from_secs(5)).unwrap();
        let p = prober(&tree, &dev, Some(Publication::Socket(Mutex::new(client))));
        assert_eq!(p.check(&disk()), Verdict::Unpublished("/qubes-block-devices/sdb/".into()));
        let wrote = std::process::Command::new(&standin)
            .arg("write")
            .arg(&socket)
            .args(["/qubes-block-devices/sdb/desc", "Stick"])
            .status()
            .unwrap();
        assert!(wrote.success());
        assert_eq!(p.check(&disk()), READY);
        let _ = daemon.kill();
        let _ = daemon.wait();
    }
}
