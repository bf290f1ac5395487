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
//! needs, the device's identity, so the call is completed on the probe worker, before it is
//! made.
//!
//! **Identity.** The engine reads what Qubes would publish for the device from sysfs when
//! the rule matches it ([`Target::expected`], see [`crate::identity`]). Without qubesdb that
//! is the identity sent. In a Qubes qube the probe reads the published records and checks
//! them against it ([`identity::check`]): equal R4.3 records give the id; R4.1/R4.2 records
//! give the desc form; a record of another device (stale, a swap) is waited past, and records
//! no identity can be had from are refused ([`Verdict::Unverifiable`]). Qubes' scripts write
//! a record's `desc` before its `interfaces`/`parent` and then a trigger key; a check between
//! the two would read a half-written R4.3 record as an R4.1 one, so the desc form is taken
//! only after the trigger was seen or a short grace ([`Target::desc_settled`]).

use std::fmt;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use nix::errno::Errno;

use crate::identity::{self, IdError, Identity, QubesDbRead, Simulated};
use crate::names::Kind;
use crate::qubesdb::{Client, Program, QdbError};
use crate::sysfs::{MAX_ATTR, NodeProblem, Sysfs};

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
    /// The records Qubes' R4.3 scripts would publish for the device, read from sysfs when the
    /// rule matched it: the identity sent without qubesdb, and what the published records
    /// must agree with in a Qubes qube.
    pub expected: Arc<Simulated>,
    /// The desc form (R4.1/R4.2 records) may be taken: this probe runs after Qubes' trigger
    /// key was written, or a grace period after the desc form was first seen. Before that a
    /// desc-only record may be an R4.3 record half written ([`Pending::DescUnsettled`]).
    pub desc_settled: bool,
}

/// What a probe learnt about a ready device that its call needs: the identity the call
/// carries ([`crate::engine::CallPlan::call`] puts it into the call, on the probe worker).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Facts {
    pub identity: Identity,
}

/// The answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Ready(Facts),
    /// Not yet; try again soon (until the timeout).
    Wait(Why),
    /// Ready here, but not (yet) published to dom0 as this device: see [`Awaited`].
    Unpublished(Awaited),
    /// No media: wait for the kernel's change event.
    NoMedia(Why),
    /// The device is gone.
    Gone,
    /// Ready, but no identity can be had for it: it is not called.
    Unverifiable(Unverifiable),
}

/// Why no identity can be had for a ready device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Unverifiable {
    /// From its published records (the record's directory, `/qubes-usb-devices/2-1/`).
    Published { record: String, error: IdError },
    /// From sysfs, with no qubesdb to check against: qubesd would give the records sysfs
    /// simulates no id.
    Simulated(IdError),
}

impl fmt::Display for Unverifiable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unverifiable::Published { record, error } => write!(f, "from qubesdb's record {record}: {error}"),
            Unverifiable::Simulated(error) => write!(f, "from sysfs: {error}"),
        }
    }
}

/// A device whose publication is awaited: its record, what is wrong with it now, and how a
/// change is noticed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Awaited {
    /// The device's record, `/qubes-block-devices/sdb1/`.
    pub record: String,
    pub pending: Pending,
    pub how: How,
}

/// What is not there yet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pending {
    /// No record for the device.
    Absent,
    /// The records describe another device (a stale record, a swap, an unpublished USB
    /// parent): both identities, for the log.
    Mismatch { expected: String, published: String },
    /// A desc-only record, not yet known to be whole (see [`Target::desc_settled`]).
    DescUnsettled,
}

/// How a change of the records is noticed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum How {
    /// A qubesdb watch on these trigger keys (the native client; the run loop's connection).
    Watch(&'static [&'static str]),
    /// The `qubesdb-read` program, asked again on a timer (no watch without the socket).
    Ask(PathBuf),
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
    /// The agent's user may not read the node.
    Permission(PathBuf),
    /// A USB device attribute could not be read.
    AttrUnreadable(&'static str),
    /// No driver bound to the USB device.
    NoDriver,
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
            Verdict::Unpublished(awaited) => awaited.fmt(f),
            Verdict::NoMedia(why) => write!(f, "no media: {why}"),
            Verdict::Gone => f.write_str("gone"),
            Verdict::Unverifiable(why) => write!(f, "no identity can be had {why}"),
        }
    }
}

impl fmt::Display for Awaited {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let record = &self.record;
        match &self.pending {
            Pending::Absent => write!(f, "not yet published to dom0 in qubesdb ({record}, {})", self.how),
            Pending::Mismatch { expected, published } => write!(
                f,
                "qubesdb's record {record} describes another device: published {published}, this device is \
                 {expected} ({})",
                self.how
            ),
            Pending::DescUnsettled => {
                write!(f, "{record} published in the desc form, perhaps half written ({})", self.how)
            }
        }
    }
}

impl fmt::Display for How {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            How::Watch(keys) => write!(f, "watching {}", keys.join(" and ")),
            How::Ask(reader) => write!(f, "asked with {}", reader.display()),
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
            Why::Permission(node) => write!(
                f,
                "permission denied reading the first sector of {} (the service user needs read access)",
                node.display()
            ),
            Why::AttrUnreadable(attr) => write!(f, "{attr} unreadable"),
            Why::NoDriver => f.write_str("no driver bound"),
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

    /// The qubesdb daemon at `socket` (`--qubesdb-socket`: a stand-in in tests, or a daemon
    /// whose socket is elsewhere).
    pub fn at(socket: &Path) -> Result<Publication, QdbError> {
        Client::connect(socket, QUBESDB_TIMEOUT).map(|client| Publication::Socket(Mutex::new(client)))
    }

    /// Reads `key`: Some(value), None if absent.
    pub fn read(&self, key: &str) -> Result<Option<Vec<u8>>, QdbError> {
        match self {
            Publication::Socket(client) => client.lock().unwrap_or_else(PoisonError::into_inner).read(key),
            Publication::Program(program) => program.read(key),
        }
    }

    /// Reads the records published for `expected`'s device and checks them against it
    /// ([`identity::check`]): the identity a call would carry, or why there is none yet.
    pub fn check(&self, expected: &Simulated) -> Result<identity::Verdict, QdbError> {
        match self {
            Publication::Socket(client) => {
                identity::check(&mut *client.lock().unwrap_or_else(PoisonError::into_inner), expected)
            }
            Publication::Program(program) => identity::check(&mut &*program, expected),
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
            None => match target.expected.identity() {
                Ok(identity) => Verdict::Ready(Facts { identity }),
                Err(e) => Verdict::Unverifiable(Unverifiable::Simulated(e)),
            },
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
        read_first_sector(&node, self.nodes == Nodes::Real).map_err(|error| self.unreadable(target, node, error))
    }

    /// Why the first sector could not be read, as [`crate::sysfs::classify_node_error`] tells
    /// it: no media (waits for the kernel's media event), no permission (retried until the
    /// timeout, then said), gone (if sysfs agrees), anything else retried.
    fn unreadable(&self, target: &Target, node: PathBuf, error: ReadError) -> Verdict {
        let problem = match error {
            ReadError::Short(_) => NodeProblem::NoMedia,
            ReadError::Io(errno) => crate::sysfs::classify_node_error(&std::io::Error::from_raw_os_error(errno as i32)),
        };
        match problem {
            NodeProblem::Permission => Verdict::Wait(Why::Permission(node)),
            NodeProblem::Gone if !self.sysfs.exists(&target.devpath, "uevent") => Verdict::Gone,
            NodeProblem::NoMedia => Verdict::NoMedia(Why::Unreadable { node, error }),
            NodeProblem::Gone | NodeProblem::Other => Verdict::Wait(Why::Unreadable { node, error }),
        }
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

/// Whether Qubes has published the device as the device it is: its records, read from
/// qubesdb, checked against what sysfs gave when the rule matched ([`identity::check`]).
fn published(db: &Publication, target: &Target) -> Verdict {
    let expected = &*target.expected;
    let checked = db.check(expected);
    // Built only when the device is not published yet: a ready device needs neither.
    let awaited = |pending| {
        let how = match db {
            Publication::Socket(_) => How::Watch(expected.triggers()),
            Publication::Program(program) => How::Ask(program.path.clone()),
        };
        Verdict::Unpublished(Awaited { record: expected.port.qubesdb_dir(), pending, how })
    };
    match checked {
        Err(e) => Verdict::Wait(Why::Qubesdb(QdbFailure(Arc::new(e)))),
        Ok(identity::Verdict::Send(Identity::Desc(_))) if !target.desc_settled => awaited(Pending::DescUnsettled),
        Ok(identity::Verdict::Send(identity)) => Verdict::Ready(Facts { identity }),
        Ok(identity::Verdict::Unpublished) => awaited(Pending::Absent),
        Ok(identity::Verdict::Mismatch { expected, published }) => awaited(Pending::Mismatch { expected, published }),
        Ok(identity::Verdict::Unverifiable(error)) => {
            Verdict::Unverifiable(Unverifiable::Published { record: expected.port.qubesdb_dir(), error })
        }
    }
}

/// The daemon's socket, read as qubesd reads it: one multiread per record.
impl QubesDbRead for Client {
    type Error = QdbError;
    fn read(&mut self, key: &str) -> Result<Option<Vec<u8>>, QdbError> {
        Client::read(self, key)
    }
    fn multiread(&mut self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, QdbError> {
        Client::multiread(self, prefix)
    }
}

/// The `qubesdb-read` program reads one key per run and has no multiread: a record is read
/// key by key, only the keys an identity depends on ([`identity::record_keys`]), `desc`
/// first (without it nothing of the record is published yet, and nothing more is asked).
impl QubesDbRead for &Program {
    type Error = QdbError;
    fn read(&mut self, key: &str) -> Result<Option<Vec<u8>>, QdbError> {
        Program::read(self, key)
    }
    fn multiread(&mut self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, QdbError> {
        let mut found = Vec::new();
        for name in identity::record_keys(prefix) {
            let key = format!("{prefix}{name}");
            match Program::read(self, &key)? {
                Some(value) => found.push((key, value)),
                None if name == "desc" => break,
                None => {}
            }
        }
        Ok(found)
    }
}

/// True if the first sector of `node` can be read, as the readiness probe reads it (for
/// `autoattach record`, which notes an unreadable node in the recording).
pub fn first_sector_readable(node: &Path) -> bool {
    read_first_sector(node, true).is_ok()
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

    fn target(tree: &Tree, kind: Kind, devpath: &str, dev: &str) -> Target {
        let expected = identity::from_sysfs(&Sysfs::new(tree.root()).unwrap(), devpath).unwrap();
        Target {
            kind,
            devpath: devpath.into(),
            dev: dev.into(),
            devnum: (kind == Kind::Block).then_some((8, 16)),
            bound: false,
            expected: Arc::new(expected),
            desc_settled: false,
        }
    }

    fn disk(tree: &Tree) -> Target {
        target(tree, Kind::Block, STICK_DISK, "sdb")
    }

    /// The stick's disk, ready: its identity as Qubes R4.3 would give it.
    fn ready_disk(serial: &str) -> Verdict {
        Verdict::Ready(Facts { identity: Identity::Id(format!("46f4:0001:{serial}:u080650:1.0")) })
    }

    #[test]
    fn block_readiness_steps() {
        let tree = Tree::stick(b"S1");
        let dev = TempDir::new("dev");
        let p = prober(&tree, &dev, None);
        let node = dev.path().join("sdb");
        assert_eq!(p.check(&disk(&tree)), Verdict::Wait(Why::NoNode(node.clone())));
        assert_eq!(p.check(&disk(&tree)).to_string(), format!("not ready: no device node {}", node.display()));
        std::fs::write(&node, [0u8; 100]).unwrap();
        let short = Verdict::NoMedia(Why::Unreadable { node: node.clone(), error: ReadError::Short(100) });
        assert_eq!(p.check(&disk(&tree)), short);
        assert!(short.to_string().ends_with("short read (100 bytes)"), "{short}");
        std::fs::write(&node, [0u8; 512]).unwrap();
        assert_eq!(p.check(&disk(&tree)), ready_disk("S1"), "without qubesdb: the identity sysfs gives");
        std::fs::write(tree.root().join(&STICK_DISK[1..]).join("size"), "0\n").unwrap();
        assert_eq!(p.check(&disk(&tree)), Verdict::NoMedia(Why::SizeZero));
        let mut gone = disk(&tree);
        gone.devpath.push_str("/nothing");
        assert_eq!(p.check(&gone), Verdict::Gone);
    }

    /// The first sector's read errors as sysfs::classify_node_error tells them: permission is
    /// retried and said, not "no media"; a vanished node is gone only if sysfs agrees.
    #[test]
    fn first_sector_errors_are_classified() {
        let tree = Tree::stick(b"S1");
        let dev = TempDir::new("dev");
        let p = prober(&tree, &dev, None);
        let (t, node) = (disk(&tree), dev.path().join("sdb"));
        let io = ReadError::Io;
        let permission = p.unreadable(&t, node.clone(), io(Errno::EACCES));
        assert_eq!(permission, Verdict::Wait(Why::Permission(node.clone())));
        assert_eq!(
            permission.to_string(),
            format!(
                "not ready: permission denied reading the first sector of {} (the service user needs read access)",
                node.display()
            )
        );
        let unreadable = |errno| Why::Unreadable { node: node.clone(), error: io(errno) };
        assert_eq!(
            p.unreadable(&t, node.clone(), io(Errno::ENOMEDIUM)),
            Verdict::NoMedia(unreadable(Errno::ENOMEDIUM))
        );
        assert_eq!(p.unreadable(&t, node.clone(), io(Errno::EBUSY)), Verdict::Wait(unreadable(Errno::EBUSY)));
        assert_eq!(
            p.unreadable(&t, node.clone(), io(Errno::ENXIO)),
            Verdict::Wait(unreadable(Errno::ENXIO)),
            "sysfs still has it"
        );
        std::fs::remove_dir_all(tree.root().join(&STICK_DISK[1..])).unwrap();
        assert_eq!(p.unreadable(&t, node.clone(), io(Errno::ENXIO)), Verdict::Gone);
    }

    #[test]
    fn real_nodes_must_be_block_devices() {
        let tree = Tree::stick(b"S1");
        let dev = TempDir::new("dev");
        std::fs::write(dev.path().join("sdb"), [0u8; 512]).unwrap();
        let mut p = prober(&tree, &dev, None);
        p.nodes = Nodes::Real;
        assert_eq!(p.check(&disk(&tree)), Verdict::Wait(Why::NotBlockDevice(dev.path().join("sdb"))));
    }

    #[test]
    fn usb_devices_need_a_driver() {
        let tree = Tree::stick(b"S1");
        let dev = TempDir::new("dev");
        let p = prober(&tree, &dev, None);
        let mut usb = target(&tree, Kind::Usb, STICK_USB, "2-1");
        let ready = Verdict::Ready(Facts { identity: Identity::Id("46f4:0001:S1:u080650".into()) });
        assert_eq!(p.check(&usb), ready);
        std::fs::remove_file(tree.root().join(&STICK_USB[1..]).join("driver")).unwrap();
        assert_eq!(p.check(&usb), Verdict::Wait(Why::NoDriver));
        assert_eq!(Why::NoDriver.to_string(), "no driver bound");
        usb.bound = true;
        assert_eq!(p.check(&usb), ready);
    }

    /// A `qubesdb-read` stand-in answering from a directory of files named after the keys
    /// (`/` as `%`), as qubesdb-cmd answers: the value and exit 0, or exit 2.
    fn reader(dir: &Path) -> PathBuf {
        let reader = dir.join("qubesdb-read");
        let db = dir.join("db");
        std::fs::create_dir_all(&db).unwrap();
        let script = format!(
            "#!/bin/sh\nf={}/$(printf %s \"$2\" | tr / %)\n[ -e \"$f\" ] || exit 2\ncat \"$f\"\necho\n",
            db.display()
        );
        std::fs::write(&reader, script).unwrap();
        std::fs::set_permissions(&reader, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        reader
    }

    fn publish(dir: &Path, key: &str, value: &str) {
        std::fs::write(dir.join("db").join(key.replace('/', "%")), value).unwrap();
    }

    /// The fallback reader: records read key by key, checked against sysfs, and bounded.
    #[test]
    fn qubesdb_records_are_checked_through_the_program_and_bounded() {
        let tree = Tree::stick(b"S1");
        let dev = TempDir::new("dev");
        std::fs::write(dev.path().join("sdb"), [0u8; 512]).unwrap();
        let reader = reader(dev.path());
        let program = |timeout| Publication::Program(Program { path: reader.clone(), timeout });
        let p = prober(&tree, &dev, Some(program(Duration::from_secs(5))));
        let awaited = |pending| {
            let how = How::Ask(reader.clone());
            Verdict::Unpublished(Awaited { record: "/qubes-block-devices/sdb/".into(), pending, how })
        };
        assert_eq!(p.check(&disk(&tree)), awaited(Pending::Absent));
        assert_eq!(
            p.check(&disk(&tree)).to_string(),
            format!(
                "not yet published to dom0 in qubesdb (/qubes-block-devices/sdb/, asked with {})",
                reader.display()
            )
        );
        // R4.2: desc only. Taken once known whole (after the trigger, or the grace).
        publish(dev.path(), "/qubes-block-devices/sdb/desc", "QEMU_HARDDISK ()");
        assert_eq!(p.check(&disk(&tree)), awaited(Pending::DescUnsettled));
        let settled = Target { desc_settled: true, ..disk(&tree) };
        let desc = Verdict::Ready(Facts { identity: Identity::Desc(b"QEMU_HARDDISK ()".to_vec()) });
        assert_eq!(p.check(&settled), desc);
        // R4.3: the disk's parent is its USB interface; the USB device's record gives the id.
        publish(dev.path(), "/qubes-block-devices/sdb/parent", "2-1:1.0");
        publish(dev.path(), "/qubes-usb-devices/2-1/desc", "46f4:0001 QEMU QEMU\\x20USB\\x20HARDDRIVE S1");
        publish(dev.path(), "/qubes-usb-devices/2-1/interfaces", ":080650:");
        assert_eq!(p.check(&disk(&tree)), ready_disk("S1"), "an id is taken at once");
        // A stick with another serial at the same port: waited past, both named.
        publish(dev.path(), "/qubes-usb-devices/2-1/desc", "46f4:0001 QEMU QEMU\\x20USB\\x20HARDDRIVE EVIL");
        assert_eq!(
            p.check(&disk(&tree)),
            awaited(Pending::Mismatch {
                expected: "id \"46f4:0001:S1:u080650:1.0\"".into(),
                published: "id \"46f4:0001:EVIL:u080650:1.0\"".into(),
            })
        );
        // An interface entry qubesd would fail on: no identity, said where it came from.
        publish(dev.path(), "/qubes-usb-devices/2-1/interfaces", ":08065x:");
        let record = "/qubes-block-devices/sdb/".to_owned();
        let error = IdError::Interface(b"08065x".to_vec());
        let unverifiable = Verdict::Unverifiable(Unverifiable::Published { record, error: error.clone() });
        assert_eq!(p.check(&disk(&tree)), unverifiable);
        assert_eq!(
            unverifiable.to_string(),
            "no identity can be had from qubesdb's record /qubes-block-devices/sdb/: interface entry \"08065x\" is \
             not hex digits: qubesd would fail on it"
        );
        let simulated = Verdict::Unverifiable(Unverifiable::Simulated(error));
        assert!(simulated.to_string().starts_with("no identity can be had from sysfs: interface entry"), "{simulated}");
        std::fs::write(&reader, "#!/bin/sh\nexec sleep 10\n").unwrap();
        let slow = Prober { qubesdb: Some(program(Duration::from_millis(100))), ..p };
        let start = std::time::Instant::now();
        let Verdict::Wait(Why::Qubesdb(e)) = slow.check(&disk(&tree)) else { panic!("not a qubesdb failure") };
        assert!(e.to_string().contains("/qubes-block-devices/sdb/desc: no answer within 100 ms"), "{e}");
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    /// Through the daemon's socket (the stand-in daemon of tests/support), a device not yet
    /// published is `Unpublished` with the trigger keys to watch, and its R4.3 records are
    /// read with one multiread each.
    #[test]
    fn qubesdb_records_through_the_socket() {
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
        let how = How::Watch(&["/qubes-block-devices", "/qubes-usb-devices"]);
        let absent = Awaited { record: "/qubes-block-devices/sdb/".into(), pending: Pending::Absent, how };
        assert_eq!(p.check(&disk(&tree)), Verdict::Unpublished(absent));
        for (key, value) in [
            ("/qubes-usb-devices/2-1/desc", "46f4:0001 QEMU QEMU\\x20USB\\x20HARDDRIVE S1"),
            ("/qubes-usb-devices/2-1/interfaces", ":080650:"),
            ("/qubes-block-devices/sdb/desc", "QEMU_HARDDISK ()"),
            ("/qubes-block-devices/sdb/parent", "2-1:1.0"),
        ] {
            let wrote =
                std::process::Command::new(&standin).arg("write").arg(&socket).args([key, value]).status().unwrap();
            assert!(wrote.success());
        }
        assert_eq!(p.check(&disk(&tree)), ready_disk("S1"));
        let _ = daemon.kill();
        let _ = daemon.wait();
    }
}
