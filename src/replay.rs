//! Replay: the agent's pipeline over a recorded tree and event stream, deterministically.
//!
//! Input is a sysfs tree (a directory), a case directory (`sys/`, optional `dev/`, `events`,
//! `rules`), or a umockdev recording; plus an optional event stream in the text format of
//! `udevadm monitor --property` ([`crate::uevent::MonitorText`]). Without a stream the tree's
//! devices are replayed as coldplug `add`s. The output is one line per call the agent would
//! make, in order.
//!
//! The [`Engine`] is the one `autoattach run` uses; probes run inline on the fixture
//! ([`Nodes::Fixture`]: a regular file stands in for a device node) and time is virtual: it
//! stands still while events are read, moves on `#! wait DURATION`, and at the end runs until
//! every pending wait is over. So retries, timeouts, debounce and rate limits replay exactly.
//!
//! Event streams may change the tree between events with directives (lines starting `#!`,
//! which udevadm never prints), applied to a private copy of the fixture:
//! - `#! wait 5s`: let virtual time pass;
//! - `#! set sys/devices/.../size 31116288`: write a file (the value plus a newline);
//! - `#! hex sys/devices/.../descriptors 12010002...`: write a file's bytes, in hex (a binary
//!   attribute, as umockdev's `H:` lines give it);
//! - `#! fill dev/sdc 512`: make a node file of that many readable bytes (0: no media; at most
//!   [`MAX_FILL`]);
//! - `#! rm sys/devices/...`: remove a file or directory;
//! - `#! dom0 5s [EXIT]`: from here on, each attach call returns that much later (`0s`: at once),
//!   with that
//!   exit status (default 0: attached; 73: dom0 found another device there, attached nothing),
//!   so removals and swaps while dom0 asks the user replay too (by default a call returns at
//!   once, attached).
//!
//! Fixtures come from bug reports, and replay runs as root: nothing is read or written outside
//! them. The copy is made in a fresh `mkdtemp` directory (0700, never reused); only regular
//! files (bounded), directories and links that stay inside the tree are copied, anything else
//! refuses the fixture; directive paths are resolved beneath the copy with no link allowed
//! ([`crate::beneath`]); the tree is then read through [`Sysfs`], which resolves every path
//! beneath its root.

use std::fmt;
use std::io::{self, Write as _};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::fcntl::OFlag;
use nix::sys::stat::Mode;

use crate::beneath::{self, BeneathError, Links};
use crate::engine::{Config, Effect, Engine, Ticket};
use crate::qubesdb::Program;
use crate::readiness::{Nodes, Prober, Publication};
use crate::rules::Parsed;
use crate::sysfs::Sysfs;
use crate::uevent::{MonitorText, Record, TextError};

/// What to replay.
#[derive(Debug, Default)]
pub struct ReplayOptions {
    pub fixture: PathBuf,
    pub events: Option<PathBuf>,
    /// Rules; None means the case directory's `rules` (file or directory).
    pub rules: Option<Vec<PathBuf>>,
    pub dev: Option<PathBuf>,
    pub qubesdb: Option<Program>,
    /// How the client is named in the output (`qrexec-client-vm`).
    pub client: String,
    pub config: Config,
}

/// The most bytes a `#! fill` makes (readiness reads only the first 4 KiB).
pub const MAX_FILL: u64 = 1 << 20;
/// The largest file copied from a fixture (sysfs attributes are a page; node stand-ins small).
pub const MAX_FILE: u64 = 16 << 20;
/// The most files and bytes a fixture may hold.
pub const MAX_FILES: usize = 200_000;
pub const MAX_BYTES: u64 = 256 << 20;

/// Why a replay could not run.
#[derive(Debug)]
pub enum ReplayError {
    /// A file or directory of the input could not be read.
    Read(PathBuf, io::Error),
    /// The fixture holds what replay refuses: a link leaving it, a FIFO or device node, a
    /// file or a tree too large.
    Refused(PathBuf, BeneathError),
    /// A umockdev recording is malformed or leaves its tree.
    Recording(PathBuf, RecordingError),
    /// The event stream is malformed.
    Events(PathBuf, TextError),
    /// A directive is malformed or refused (path, 1-based line).
    Directive(PathBuf, usize, DirectiveError),
    /// The private work directory could not be made or filled.
    Work(PathBuf, io::Error),
    /// The rules have this many errors (reported already).
    Rules(usize),
}

impl ReplayError {
    /// The documented exit code: 3 for rules with errors, 5 for anything about the input.
    pub fn exit_code(&self) -> u8 {
        match self {
            ReplayError::Rules(_) => crate::exit::RULES,
            _ => crate::exit::INPUT,
        }
    }
}

impl fmt::Display for ReplayError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReplayError::Read(p, e) => write!(f, "{}: {e}", p.display()),
            ReplayError::Refused(p, e) => write!(f, "{}: {e}", p.display()),
            ReplayError::Recording(p, e) => write!(f, "{}: {e}", p.display()),
            ReplayError::Events(p, e) => write!(f, "{}: {e}", p.display()),
            ReplayError::Directive(p, line, e) => write!(f, "{}:{line}: {e}", p.display()),
            ReplayError::Work(p, e) => write!(f, "work directory {}: {e}", p.display()),
            ReplayError::Rules(n) => write!(f, "{n} error(s) in the rules"),
        }
    }
}

impl std::error::Error for ReplayError {}

/// What is wrong with a umockdev recording.
#[derive(Debug)]
pub enum RecordingError {
    NotUtf8,
    /// A line `umockdev-record` does not write, or one that leaves the tree.
    Format(crate::umockdev::FormatError),
    /// Its tree could not be written into the work directory.
    Write(io::Error),
}

impl fmt::Display for RecordingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RecordingError::NotUtf8 => f.write_str("not UTF-8 text"),
            RecordingError::Format(e) => e.fmt(f),
            RecordingError::Write(e) => write!(f, "cannot write its tree: {e}"),
        }
    }
}

/// What is wrong with a `#!` directive.
#[derive(Debug)]
pub enum DirectiveError {
    Unknown(String),
    /// The verb that needs one (`wait`, `dom0`).
    NoDuration(&'static str),
    NoPath(&'static str),
    NoCount,
    TooBig(u64),
    /// `hex` with no bytes, or not pairs of hex digits.
    BadHex,
    /// Not an exit status (0-255).
    BadExit(String),
    /// Not a plain path under `sys/` or `dev/`.
    BadPath(String),
    /// Resolved beneath the copy, the path went through a link or out of it.
    Refused(BeneathError),
    Io(String, io::Error),
}

impl fmt::Display for DirectiveError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DirectiveError::Unknown(v) => write!(f, "unknown directive '{v}' (wait, set, hex, fill, rm, dom0)"),
            DirectiveError::NoDuration(verb) => write!(f, "{verb} needs a duration, e.g. 5s"),
            DirectiveError::NoPath(verb) => write!(f, "{verb} needs a path"),
            DirectiveError::NoCount => f.write_str("fill needs a byte count"),
            DirectiveError::TooBig(n) => write!(f, "fill of {n} bytes refused: at most {MAX_FILL}"),
            DirectiveError::BadHex => f.write_str("hex needs the bytes as pairs of hex digits, e.g. 1201"),
            DirectiveError::BadExit(v) => write!(f, "dom0 {v}: an exit status is 0 to 255"),
            DirectiveError::BadPath(p) => write!(f, "{p}: directive paths are relative, under sys/ or dev/"),
            DirectiveError::Refused(e) => write!(f, "{e}"),
            DirectiveError::Io(p, e) => write!(f, "{p}: {e}"),
        }
    }
}

impl std::error::Error for DirectiveError {}

/// The longest a replay lets virtual time run after the last event.
const DRAIN_LIMIT: u64 = 24 * 3600 * 1000;

/// Where the pieces of a fixture are, once copied.
struct Layout {
    /// The private copy (`sys/`, `dev/`), removed on drop.
    work: Work,
    events: Option<PathBuf>,
    rules: Vec<PathBuf>,
}

/// A directory of our own: made by mkdtemp (0700, a fresh name), removed on drop.
struct Work {
    path: PathBuf,
    fd: OwnedFd,
}

impl Drop for Work {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

impl Work {
    fn new() -> Result<Work, ReplayError> {
        let template = std::env::temp_dir().join("autoattach-replay-XXXXXX");
        let path = nix::unistd::mkdtemp(&template).map_err(|e| ReplayError::Work(template, e.into()))?;
        let flags = OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let fd =
            nix::fcntl::open(&path, flags, Mode::empty()).map_err(|e| ReplayError::Work(path.clone(), e.into()))?;
        for sub in ["sys", "dev"] {
            nix::sys::stat::mkdirat(&fd, sub, Mode::from_bits_truncate(0o755))
                .map_err(|e| ReplayError::Work(path.join(sub), e.into()))?;
        }
        Ok(Work { path, fd })
    }

    fn sys(&self) -> PathBuf {
        self.path.join("sys")
    }

    fn dev(&self) -> PathBuf {
        self.path.join("dev")
    }
}

/// Opens a directory given by the user as the root of what is read from it.
fn open_dir(path: &Path) -> Result<OwnedFd, ReplayError> {
    let flags = OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
    nix::fcntl::open(path, flags, Mode::empty()).map_err(|e| ReplayError::Read(path.to_owned(), e.into()))
}

/// Finds the tree, nodes, events and rules of `opts.fixture`, copying them to a private work
/// directory (directives change the copy, never the fixture).
fn layout(opts: &ReplayOptions) -> Result<Layout, ReplayError> {
    let fixture = &opts.fixture;
    let meta = std::fs::metadata(fixture).map_err(|e| ReplayError::Read(fixture.clone(), e))?;
    let work = Work::new()?;
    let (mut events, mut rules) = (opts.events.clone(), Vec::new());
    if meta.is_file() {
        write_recording(fixture, &work)?;
    } else {
        let case = open_dir(fixture)?;
        let has = |name: &str| beneath::exists(&case, Path::new(name));
        if events.is_none() && has("events") {
            events = Some(fixture.join("events"));
        }
        if has("rules") {
            rules.push(fixture.join("rules"));
        }
        let recording = recording_in(&case, fixture).filter(|_| !has("sys"));
        match recording {
            Some(recording) => write_recording(&recording, &work)?,
            None if has("sys") => {
                copy_tree(&case, Path::new("sys"), &work, Path::new("sys"), fixture)?;
                if has("dev") {
                    copy_tree(&case, Path::new("dev"), &work, Path::new("dev"), fixture)?;
                }
            }
            None => copy_tree(&case, Path::new(""), &work, Path::new("sys"), fixture)?,
        }
    }
    if let Some(dev) = &opts.dev {
        copy_tree(&open_dir(dev)?, Path::new(""), &work, Path::new("dev"), dev)?;
    }
    if let Some(r) = &opts.rules {
        rules = r.clone();
    }
    Ok(Layout { work, events, rules })
}

/// The `*.umockdev` file of a case directory, if any.
fn recording_in(case: &OwnedFd, fixture: &Path) -> Option<PathBuf> {
    let names = beneath::list(case, Path::new(""), Links::Refuse).ok()?;
    let mut found: Vec<_> =
        names.into_iter().filter(|n| Path::new(n).extension().is_some_and(|x| x == "umockdev")).collect();
    found.sort();
    found.first().map(|n| fixture.join(n))
}

/// Reads a umockdev recording (a regular file, bounded) and writes its tree into the work
/// directory.
fn write_recording(recording: &Path, work: &Work) -> Result<(), ReplayError> {
    let dir = recording.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = Path::new(recording.file_name().unwrap_or_default());
    let bytes = beneath::read(open_dir(dir)?, name, MAX_BYTES, Links::Refuse)
        .map_err(|e| ReplayError::Refused(dir.to_owned(), e))?;
    let fail = |e| ReplayError::Recording(recording.to_owned(), e);
    let text = String::from_utf8(bytes).map_err(|_| fail(RecordingError::NotUtf8))?;
    let devices = crate::umockdev::parse(&text).map_err(|e| fail(RecordingError::Format(e)))?;
    crate::umockdev::write_tree(&devices, &work.path).map_err(|e| fail(RecordingError::Write(e)))
}

/// What a copy has taken so far, against [`MAX_FILES`] and [`MAX_BYTES`].
#[derive(Default)]
struct Budget {
    files: usize,
    bytes: u64,
}

/// Copies directory `from_rel` of the fixture (`from`, shown as `shown`) to `to_rel` of the
/// work directory: regular files (bounded), directories, and links that stay inside the tree
/// copied; anything else refuses the fixture. No path on either side goes through a link.
fn copy_tree(from: &OwnedFd, from_rel: &Path, work: &Work, to_rel: &Path, shown: &Path) -> Result<(), ReplayError> {
    let mut budget = Budget::default();
    copy_dir(from, from_rel, Path::new(""), &work.fd, to_rel, shown, &mut budget)
}

/// One directory of [`copy_tree`]; `inner` is its path below the copied tree's top.
fn copy_dir(
    from: &OwnedFd,
    base: &Path,
    inner: &Path,
    to: &OwnedFd,
    to_base: &Path,
    shown: &Path,
    budget: &mut Budget,
) -> Result<(), ReplayError> {
    let refused = |e| ReplayError::Refused(shown.to_owned(), e);
    let mut names = beneath::list(from, &base.join(inner), Links::Refuse).map_err(refused)?;
    names.sort();
    for name in names {
        let rel = inner.join(&name);
        budget.files += 1;
        if budget.files > MAX_FILES {
            return Err(refused(BeneathError::TooLong(rel, MAX_FILES as u64)));
        }
        let src = base.join(&rel);
        let st = beneath::open(from, &src, OFlag::O_PATH | OFlag::O_NOFOLLOW, Mode::empty(), Links::Refuse)
            .and_then(|fd| nix::sys::stat::fstat(&fd).map_err(|e| BeneathError::Io(src.clone(), e.into())))
            .map_err(refused)?;
        let dst = to_base.join(&rel);
        match nix::sys::stat::SFlag::from_bits_truncate(st.st_mode & nix::libc::S_IFMT) {
            nix::sys::stat::SFlag::S_IFDIR => {
                make_dir(to, &dst).map_err(|e| ReplayError::Work(dst.clone(), e))?;
                copy_dir(from, base, &rel, to, to_base, shown, budget)?;
            }
            nix::sys::stat::SFlag::S_IFLNK => copy_link(from, &src, &rel, to, &dst).map_err(refused)?,
            nix::sys::stat::SFlag::S_IFREG => {
                let bytes = beneath::read(from, &src, MAX_FILE, Links::Refuse).map_err(refused)?;
                budget.bytes += bytes.len() as u64;
                if budget.bytes > MAX_BYTES {
                    return Err(refused(BeneathError::TooLong(shown.to_owned(), MAX_BYTES)));
                }
                write_new(to, &dst, &bytes).map_err(|e| ReplayError::Work(dst.clone(), e))?;
            }
            _ => return Err(refused(beneath::not_a_file(&src, st.st_mode))),
        }
    }
    Ok(())
}

/// Copies the link `src` (at `rel` in its tree) to `dst` if its target stays inside the tree.
fn copy_link(from: &OwnedFd, src: &Path, rel: &Path, to: &OwnedFd, dst: &Path) -> Result<(), BeneathError> {
    let target = beneath::read_link(from, src, Links::Refuse)?;
    if !beneath::link_stays_inside(rel, &target) {
        return Err(BeneathError::Outside(PathBuf::from(format!("{} -> {}", src.display(), target.display()))));
    }
    let (parent, name) = split(dst);
    let parent = beneath::open(to, parent, OFlag::O_PATH | OFlag::O_DIRECTORY, Mode::empty(), Links::Refuse)?;
    nix::unistd::symlinkat(&target, &parent, name).map_err(|e| BeneathError::Io(dst.to_owned(), e.into()))
}

/// `path` as (its parent, its last component).
fn split(path: &Path) -> (&Path, &Path) {
    (path.parent().unwrap_or(Path::new("")), Path::new(path.file_name().unwrap_or_default()))
}

/// Makes directory `rel` in the work directory (its parent resolved without links).
fn make_dir(to: &OwnedFd, rel: &Path) -> io::Result<()> {
    let (parent, name) = split(rel);
    let parent = beneath::open(to, parent, OFlag::O_PATH | OFlag::O_DIRECTORY, Mode::empty(), Links::Refuse)
        .map_err(io::Error::other)?;
    match nix::sys::stat::mkdirat(&parent, name, Mode::from_bits_truncate(0o755)) {
        Ok(()) | Err(nix::errno::Errno::EEXIST) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Writes a new file `rel` in the work directory (no link anywhere on its path).
fn write_new(to: &OwnedFd, rel: &Path, bytes: &[u8]) -> io::Result<()> {
    let flags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL;
    let fd = beneath::open(to, rel, flags, Mode::from_bits_truncate(0o644), Links::Refuse).map_err(io::Error::other)?;
    std::fs::File::from(fd).write_all(bytes)
}

/// Runs the replay and returns the calls, one line each.
pub fn replay(opts: &ReplayOptions, load_rules: &dyn Fn(&[PathBuf]) -> Parsed) -> Result<Vec<String>, ReplayError> {
    let layout = layout(opts)?;
    let parsed = load_rules(&layout.rules);
    if !crate::runloop::report_rules(&parsed) {
        return Err(ReplayError::Rules(parsed.errors.len()));
    }
    let sys = layout.work.sys();
    let sysfs = Arc::new(Sysfs::new(&sys).map_err(|e| ReplayError::Work(sys.clone(), e))?);
    let prober = Prober {
        sysfs: sysfs.clone(),
        dev: layout.work.dev(),
        nodes: Nodes::Fixture,
        qubesdb: opts.qubesdb.clone().map(Publication::Program),
    };
    let mut run = Run {
        engine: Engine::new(parsed.set, opts.config.clone()),
        prober,
        sysfs,
        now: 0,
        calls: Vec::new(),
        client: opts.client.clone(),
        dom0: Dom0::default(),
        pending: Vec::new(),
    };
    match &layout.events {
        None => {
            let mut effects = Vec::new();
            run.engine.resync(&run.sysfs, 0, &mut effects);
            run.engine.describe(&run.sysfs);
            run.perform(effects);
        }
        Some(path) => run.events(path, &layout.work)?,
    }
    run.advance(run.now + DRAIN_LIMIT, true);
    Ok(run.calls)
}

struct Run {
    engine: Engine,
    prober: Prober,
    sysfs: Arc<Sysfs>,
    now: u64,
    calls: Vec<String>,
    client: String,
    dom0: Dom0,
    /// Attach calls dom0 has not answered yet.
    pending: Vec<Answer>,
}

/// How dom0 answers attach calls (`#! dom0`): after `after` ms, with `exit`.
#[derive(Clone, Copy, Debug, Default)]
struct Dom0 {
    after: u64,
    exit: u8,
}

/// An attach call's answer, due at `at`.
struct Answer {
    at: u64,
    ticket: Ticket,
    exit: u8,
    device: String,
    call: String,
}

impl Run {
    /// Replays the event stream at `path` (a regular file, bounded).
    fn events(&mut self, path: &Path, work: &Work) -> Result<(), ReplayError> {
        let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let name = Path::new(path.file_name().unwrap_or_default());
        let text = beneath::read(open_dir(dir)?, name, MAX_BYTES, Links::Follow).map_err(|e| match e {
            BeneathError::Io(_, e) => ReplayError::Read(path.to_owned(), e),
            e => ReplayError::Refused(dir.to_owned(), e),
        })?;
        let mut monitor = MonitorText::new(&text);
        for record in monitor.by_ref() {
            match record.map_err(|e| ReplayError::Events(path.to_owned(), e))? {
                Record::Event(event, _) => {
                    sync_generation(&work.fd, &event);
                    let mut effects = Vec::new();
                    self.engine.on_event(&self.sysfs, &event, self.now, &mut effects);
                    self.engine.describe(&self.sysfs);
                    self.perform(effects);
                }
                Record::Directive(directive, line) => {
                    self.directive(directive, &work.fd).map_err(|e| ReplayError::Directive(path.to_owned(), line, e))?
                }
            }
        }
        note_ignored(path, monitor.ignored());
        Ok(())
    }

    /// Carries out effects until none are left: probes inline, calls recorded, attach calls
    /// answered at once or queued for dom0's answer (`#! dom0`).
    fn perform(&mut self, effects: Vec<Effect>) {
        let (calls, client, pending, dom0, now) =
            (&mut self.calls, &self.client, &mut self.pending, self.dom0, self.now);
        crate::engine::perform_inline(&mut self.engine, &self.prober, effects, now, &mut |call, device, ticket| {
            info!("{device}: would call {call}");
            calls.push(format!("{client} dom0 {}", call.service_arg()));
            match ticket {
                Some(ticket) if dom0.after > 0 => {
                    let (device, call) = (device.to_owned(), call.service_arg());
                    pending.push(Answer { at: now + dom0.after, ticket, exit: dom0.exit, device, call });
                    None
                }
                // As the run loop and a delayed answer read it (exit 125: may have attached).
                _ => Some(crate::spawn::Exit::Code(dom0.exit.into()).may_have_attached()),
            }
        });
    }

    /// Lets virtual time run to `until` (or, when draining, until nothing is pending): the
    /// engine's timers and dom0's answers, in time order.
    fn advance(&mut self, until: u64, drain: bool) {
        loop {
            let answer = self.pending.iter().map(|a| a.at).min();
            let Some(at) = [self.engine.next_wake(), answer].into_iter().flatten().min().filter(|&at| at <= until)
            else {
                break;
            };
            self.now = self.now.max(at);
            let mut effects = Vec::new();
            while let Some(i) = self.pending.iter().position(|a| a.at <= self.now) {
                let a = self.pending.remove(i);
                let exit = crate::spawn::Exit::Code(a.exit.into());
                info!("{}: {} {exit}", a.device, a.call);
                self.engine.on_call_exit(&a.ticket, exit.may_have_attached(), &mut effects);
            }
            self.engine.on_tick(self.now, &mut effects);
            self.perform(effects);
        }
        if !drain {
            self.now = until;
        }
    }

    fn directive(&mut self, directive: &str, work: &OwnedFd) -> Result<(), DirectiveError> {
        let mut words = directive.split_whitespace();
        let verb = words.next().unwrap_or_default();
        if verb == "wait" {
            let d = words.next().and_then(crate::rules::parse_duration).ok_or(DirectiveError::NoDuration("wait"))?;
            self.advance(self.now + d.as_millis() as u64, false);
            return Ok(());
        }
        if verb == "dom0" {
            // `0s` (or `0`): answered at once, with EXIT.
            let after = match words.next() {
                Some("0" | "0s" | "0ms") => std::time::Duration::ZERO,
                w => w.and_then(crate::rules::parse_duration).ok_or(DirectiveError::NoDuration("dom0"))?,
            };
            let exit = match words.next() {
                None => 0,
                Some(v) => v.parse().map_err(|_| DirectiveError::BadExit(v.to_owned()))?,
            };
            self.dom0 = Dom0 { after: after.as_millis() as u64, exit };
            return Ok(());
        }
        let verb = match verb {
            "set" => "set",
            "hex" => "hex",
            "fill" => "fill",
            "rm" => "rm",
            other => return Err(DirectiveError::Unknown(other.to_owned())),
        };
        let rel = words.next().ok_or(DirectiveError::NoPath(verb))?;
        let path = directive_path(rel)?;
        let rest: Vec<&str> = words.collect();
        let io = |e: io::Error| DirectiveError::Io(rel.to_owned(), e);
        match verb {
            "set" => write_beneath(work, path, format!("{}\n", rest.join(" ")).as_bytes()),
            "hex" => {
                let bytes = crate::umockdev::unhex(&rest.concat()).filter(|b| !b.is_empty());
                write_beneath(work, path, &bytes.ok_or(DirectiveError::BadHex)?)
            }
            "fill" => {
                let n: u64 = rest.first().and_then(|n| n.parse().ok()).ok_or(DirectiveError::NoCount)?;
                if n > MAX_FILL {
                    return Err(DirectiveError::TooBig(n));
                }
                write_beneath(work, path, &vec![0u8; n as usize])
            }
            _ => remove_beneath(work, path).map_err(io),
        }
    }
}

/// The keys that tell one device at a devpath from the next (see the engine's generation
/// check).
const GENERATION: [&str; 4] = ["DISKSEQ", "DEVNUM", "MAJOR", "MINOR"];

/// Sysfs shows a device as it is when the kernel sends its event: before an `add`, `change`,
/// `bind` or `online` is handled, the generation keys of its `uevent` file in the copy take
/// the event's values (a replayed reconnection has a new USB device number, new media a new
/// disk sequence), as the kernel's file would have them. Keys the file lacks stay absent; a
/// device the tree lacks is left so.
fn sync_generation(work: &OwnedFd, event: &crate::uevent::Uevent<'_>) {
    use crate::uevent::Action;
    if !matches!(event.action, Action::Add | Action::Change | Action::Bind | Action::Online) {
        return;
    }
    let rel = Path::new("sys").join(&event.devpath[1..]).join("uevent");
    let Ok(old) = beneath::read(work, &rel, MAX_FILE, Links::Refuse) else { return };
    let mut new = Vec::with_capacity(old.len());
    for line in old.split_inclusive(|&b| b == b'\n') {
        let value = GENERATION.iter().find_map(|key| {
            let rest = line.strip_prefix(key.as_bytes())?.strip_prefix(b"=")?;
            event.get(key).filter(|v| v.as_bytes() != rest.trim_ascii_end()).map(|v| (*key, v))
        });
        match value {
            Some((key, v)) => new.extend_from_slice(format!("{key}={v}\n").as_bytes()),
            None => new.extend_from_slice(line),
        }
    }
    if new != old {
        let _ = write_beneath(work, &rel, &new);
    }
}

/// A directive's path: plain relative components under `sys/` or `dev/` of the copy.
fn directive_path(rel: &str) -> Result<&Path, DirectiveError> {
    let path = Path::new(rel);
    let plain = beneath::plain(path).is_ok();
    if !plain || !(rel.starts_with("sys/") || rel.starts_with("dev/")) {
        return Err(DirectiveError::BadPath(rel.to_owned()));
    }
    Ok(path)
}

/// Writes `bytes` to `rel` of the copy (created if missing), through no link.
fn write_beneath(work: &OwnedFd, rel: &Path, bytes: &[u8]) -> Result<(), DirectiveError> {
    let flags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_TRUNC | OFlag::O_NONBLOCK;
    let fd = beneath::open(work, rel, flags, Mode::from_bits_truncate(0o644), Links::Refuse)
        .map_err(DirectiveError::Refused)?;
    let shown = rel.display().to_string();
    std::fs::File::from(fd).write_all(bytes).map_err(|e| DirectiveError::Io(shown, e))
}

/// Removes `rel` of the copy, a file, a link (not what it points to) or a directory, its
/// parent reached through no link.
fn remove_beneath(work: &OwnedFd, rel: &Path) -> io::Result<()> {
    let (parent, name) = split(rel);
    let dir = beneath::open(work, parent, OFlag::O_RDONLY | OFlag::O_DIRECTORY, Mode::empty(), Links::Refuse)
        .map_err(io::Error::other)?;
    let st = nix::sys::stat::fstatat(&dir, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW)?;
    if st.st_mode & nix::libc::S_IFMT == nix::libc::S_IFDIR {
        // The parent's fd, named through /proc: remove_dir_all never follows links inside.
        let fd = std::os::fd::AsRawFd::as_raw_fd(&dir.as_fd());
        return std::fs::remove_dir_all(Path::new(&format!("/proc/self/fd/{fd}")).join(name));
    }
    nix::unistd::unlinkat(&dir, name, nix::unistd::UnlinkatFlags::NoRemoveDir).map_err(Into::into)
}

/// Says what of a capture was read past, so that nobody wonders where udev's blocks went.
fn note_ignored(path: &Path, ignored: &crate::uevent::Ignored) {
    if ignored.udev_blocks > 0 {
        notice!(
            "{}: {} udev block(s) skipped: the kernel's own blocks are replayed",
            path.display(),
            ignored.udev_blocks
        );
    }
    if !ignored.udev_properties.is_empty() {
        let keys: Vec<&str> = ignored.udev_properties.iter().map(String::as_str).collect();
        notice!(
            "{}: read udev's blocks as the kernel's events and left out udev's properties: {}",
            path.display(),
            keys.join(", ")
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// The work directory is mkdtemp's: a fresh, unguessable name, 0700, never one that was
    /// there before (the old `autoattach-replay-PID-N` was predictable and reused).
    #[test]
    fn work_directories_are_fresh_and_private() {
        let (a, b) = (Work::new().unwrap(), Work::new().unwrap());
        assert_ne!(a.path, b.path);
        for w in [&a, &b] {
            let meta = std::fs::symlink_metadata(&w.path).unwrap();
            assert!(meta.is_dir());
            assert_eq!(meta.permissions().mode() & 0o777, 0o700);
            let name = w.path.file_name().unwrap().to_str().unwrap();
            assert!(!name.contains(&std::process::id().to_string()), "{name}");
        }
        let gone = a.path.clone();
        drop(a);
        assert!(!gone.exists());
    }

    /// A recording that is not text, or holds a line `umockdev-record` never writes, is
    /// refused with what is wrong and where.
    #[test]
    fn malformed_recordings_say_what_is_wrong() {
        let dir = Work::new().unwrap();
        let work = Work::new().unwrap();
        let binary = dir.path.join("binary.umockdev");
        std::fs::write(&binary, b"P: /devices/\xff\n").unwrap();
        let err = write_recording(&binary, &work).unwrap_err();
        assert!(matches!(&err, ReplayError::Recording(p, RecordingError::NotUtf8) if *p == binary), "{err:?}");
        assert_eq!(err.to_string(), format!("{}: not UTF-8 text", binary.display()));
        let odd = dir.path.join("odd.umockdev");
        std::fs::write(&odd, "P: /devices/x\nQ: what=1\n").unwrap();
        let err = write_recording(&odd, &work).unwrap_err();
        let ReplayError::Recording(_, RecordingError::Format(e)) = &err else { panic!("{err:?}") };
        assert_eq!(e.line, 2, "{err}");
        assert_eq!(err.to_string(), format!("{}: line 2: unknown line type 'Q:'", odd.display()));
    }
}
