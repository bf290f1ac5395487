//! A client of the qubesdb daemon of a Qubes qube, and the `qubesdb-read` fallback.
//!
//! Qubes publishes what dom0 may attach in the qube's qubesdb (`/qubes-block-devices/NAME/`,
//! `/qubes-usb-devices/BUSID/`), and dom0's `vm-config.*` features appear there as
//! `/vm-config/KEY`. The agent must wait until a device is published before it asks dom0 to
//! attach it. Running `qubesdb-read` for each look costs a process start and can only poll;
//! this module speaks the daemon's own socket protocol instead and is told of publication by a
//! **watch**. Where there is no daemon socket, [`Program`] runs `qubesdb-read`.
//!
//! # The protocol (qubes-core-qubesdb, identical from R4.1 to R4.3: v4.1.0 … v4.3.3)
//!
//! Citations are `file:line` at v4.3.3 (commit aeb3c8d).
//!
//! - Every message, both ways, is a `struct qdb_hdr` (include/qubesdb.h:123-132): `uint8_t type`,
//!   `char path[64]` (NUL-terminated), 3 bytes of padding, `uint32_t data_len` in the host's byte
//!   order at offset 68: 72 bytes, followed by `data_len` bytes of data. A command carries no
//!   data (db-cmds.c:505 `handle_read` disconnects a READ with data).
//! - Commands (include/qubesdb.h:11-66): READ 0, WRITE 1, MULTIREAD 2, LIST 3, RM 4, WATCH 5,
//!   UNWATCH 6; answers: OK 7, ERROR_NOENT 8, ERROR 9, READ 10, MULTIREAD 11, LIST 12, WATCH 13.
//! - Paths: at most 63 bytes (`QDB_MAX_PATH` 64 with the NUL), starting with `/` (client
//!   qdb-client.c:365 `verify_path`), of `[A-Za-z0-9_/.:@-]` and not starting with `-`
//!   (db-cmds.c:38 `verify_path`). An invalid header is answered with ERROR, path echoed
//!   (db-cmds.c:811-819, 303 `discard_data_and_send_error`).
//! - Values: the daemon refuses a `data_len` of `QDB_MAX_DATA` (3072) or more (db-cmds.c:126) and
//!   any NUL byte (db-cmds.c:80 `verify_data`), so a value is at most 3071 bytes without NUL.
//! - READ (db-cmds.c:505): answer READ with the command's own header echoed (same path) and the
//!   value, or ERROR_NOENT. A path ending in `/` is never an entry (db-core.c:102).
//! - MULTIREAD (db-cmds.c:545): one MULTIREAD answer per entry whose path starts with the given
//!   prefix, in path order, then an end marker: MULTIREAD with empty path and no data
//!   (include/qubesdb.h:28-29, qdb-client.c:573).
//! - WATCH / UNWATCH (db-cmds.c:843-859): OK; UNWATCH of an unknown watch: ERROR_NOENT. A watch
//!   on a path ending in `/` matches every path under it, otherwise exactly that path
//!   (db-core.c:207-209). The key need not exist yet.
//! - A watch fires after every WRITE and RM of a matching path (db-cmds.c:437, 490) as a WATCH
//!   message carrying the **modified** path and no data (db-core.c:244-275). It can arrive at any
//!   time, before or between the answers to a command (include/qubesdb.h:51-53; qdb-client.c:324
//!   `get_response` keeps them for later): this client queues them, never drops them.
//! - Sockets (include/qubesdb.h:114-115; db-daemon.c:537-641): `/var/run/qubes/qubesdb.sock`
//!   (read-write, mode 0666 unless the daemon is started with `--rw-socket-perms`) and, since
//!   4.3.3, `/var/run/qubes/qubesdb.ro.sock` (mode 0666), whose clients may not WRITE or RM
//!   (db-cmds.c:401, 459: answered ERROR) but may READ, MULTIREAD, LIST, WATCH and UNWATCH. The
//!   agent only reads and watches, so [`Client::connect_local`] takes the read-only socket first
//!   and the read-write one where the read-only one does not exist (qubesdb before 4.3.3).
//! - A connection ends with the daemon or after a fatal client error; the C client then
//!   reconnects at its next command but loses its watches (qdb-client.c:228 "FIXME: register
//!   watches again"). This client re-registers them, and reports every watched path as changed
//!   (a publication may have happened meanwhile).
//!
//! # Bounds
//!
//! Every blocking step has a deadline (connect, send, each answer): a daemon that never answers
//! costs the caller at most the client's timeout. After any failure but a clean ERROR answer the
//! connection is closed (a late answer must never be read as the answer to the next command)
//! and reopened at the next call. An answer qubesdb never sends (unknown type, a path that is
//! not terminated or not a qubesdb path, an oversized length, a NUL in a value, an entry outside
//! the prefix, an echo of another path) is [`QdbError::Garbage`].
//!
//! # Waiting for a key
//!
//! Watch first, then read: `watch(prefix)`, `read(key)`; if the key is absent, wait until the fd
//! ([`AsFd`]) is readable, take the events ([`Client::take_watch_events`]) and read again for
//! those under the prefix. A publication between the watch and the read is seen by the read; one
//! after it fires the watch.

use std::fmt;
use std::io::{self, Read as _};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt as _, ExitStatusExt as _};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::socket::{self, AddressFamily, MsgFlags, SockFlag, SockType, UnixAddr, sockopt};
use nix::sys::time::TimeVal;

use crate::log::Escaped;

/// The daemon's read-write socket in a qube (include/qubesdb.h:114).
pub const SOCKET: &str = "/var/run/qubes/qubesdb.sock";
/// The daemon's read-only socket, qubesdb 4.3.3 and later (include/qubesdb.h:115).
pub const SOCKET_RO: &str = "/var/run/qubes/qubesdb.ro.sock";
/// `QDB_MAX_PATH`: a path and its NUL.
pub const MAX_PATH: usize = 64;
/// `QDB_MAX_DATA`: no value reaches this length (db-cmds.c:126 refuses it in a write).
pub const MAX_DATA: usize = 3072;
/// `sizeof(struct qdb_hdr)` on Linux: type, path, padding to 4, `data_len`.
const HDR_LEN: usize = 72;
const LEN_AT: usize = 68;
/// Entries one multiread may return: a qube's whole database holds a few hundred.
pub const MAX_ENTRIES: usize = 4096;
/// Distinct paths kept between two [`Client::take_watch_events`]; past it, every watched path
/// is reported instead (the caller re-checks everything, as after a reconnect).
const MAX_EVENTS: usize = 256;

// Message types (include/qubesdb.h:11-91).
const CMD_READ: u8 = 0;
const CMD_MULTIREAD: u8 = 2;
const CMD_WATCH: u8 = 5;
const CMD_UNWATCH: u8 = 6;
const RESP_OK: u8 = 7;
const RESP_ERROR_NOENT: u8 = 8;
const RESP_ERROR: u8 = 9;
const RESP_READ: u8 = 10;
const RESP_MULTIREAD: u8 = 11;
const RESP_WATCH: u8 = 13;

/// What errors name when no command was under way.
const WATCH_EVENTS: &str = "(watch events)";

// ---------------------------------------------------------------------------------------------
// Errors

/// What went wrong, naming the socket or program and the key.
#[derive(Debug)]
pub enum QdbError {
    /// The key is not one qubesdb accepts; nothing was sent.
    BadKey { key: String, why: &'static str },
    /// No connection to the daemon.
    Connect { socket: PathBuf, source: io::Error },
    /// The daemon did not answer in time; the connection is closed.
    Timeout { socket: PathBuf, key: String, after: Duration },
    /// The daemon closed the connection before it had answered.
    Closed { socket: PathBuf, key: String },
    /// Sending or receiving failed; the connection is closed.
    Io { socket: PathBuf, key: String, source: io::Error },
    /// An answer the qubesdb daemon never sends; the connection is closed.
    Garbage { socket: PathBuf, key: String, what: Garbage },
    /// The daemon answered ERROR (an invalid path or command, or a command this socket
    /// does not allow).
    Refused { socket: PathBuf, key: String },
    /// The `qubesdb-read` fallback failed.
    Program { program: PathBuf, key: String, what: ProgramError },
}

/// What was wrong with an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Garbage {
    /// A message type that is not an answer to this command.
    Type(u8),
    /// No NUL in the 64 bytes of the path.
    Unterminated,
    /// A byte a qubesdb path cannot hold.
    PathByte(u8),
    /// A data length above `QDB_MAX_DATA`.
    Length(u32),
    /// Data where the daemon sends none (an end marker, OK, ERROR, a watch event).
    Data(u32),
    /// A NUL byte in a value (the daemon refuses them in writes).
    Nul,
    /// A watch event without a path.
    Empty,
    /// The answer names another path than the command's.
    Echo(String),
    /// A multiread entry outside the prefix asked for.
    Outside(String),
    /// More than [`MAX_ENTRIES`] multiread entries.
    TooMany,
}

/// How the `qubesdb-read` fallback failed.
#[derive(Debug)]
pub enum ProgramError {
    /// It could not be started.
    Spawn(io::Error),
    /// It ran longer than its bound and was killed.
    Timeout(Duration),
    /// It exited 0 but wrote to stderr: usage text, not a value.
    Usage(Vec<u8>),
    /// Output no qubesdb value gives (too long, or a NUL byte).
    Output(&'static str),
    /// It exited with another status (stderr kept, bounded).
    Failed { status: ExitStatus, stderr: Vec<u8> },
}

impl QdbError {
    /// True when no daemon listens at the socket (no socket file, or nobody accepting): not a
    /// Qubes qube, or qubes-db is not running. The caller may fall back to [`Program`].
    pub fn absent(&self) -> bool {
        matches!(self, QdbError::Connect { source, .. }
            if matches!(source.kind(), io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused))
    }
}

impl fmt::Display for QdbError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const RETRY: &str = "the connection is reopened at the next request";
        match self {
            QdbError::BadKey { key, why } => write!(
                f,
                "bad qubesdb key \"{}\": {why} (a key is /-separated, at most 63 bytes of A-Z a-z 0-9 _ / . : @ -)",
                Escaped(key.as_bytes())
            ),
            QdbError::Connect { socket, source } => write!(
                f,
                "cannot connect to qubesdb at {}: {source} (is qubes-db running? systemctl status qubes-db)",
                socket.display()
            ),
            QdbError::Timeout { socket, key, after } => write!(
                f,
                "qubesdb at {} did not answer for {key} within {} ms ({RETRY}; is qubes-db stuck?)",
                socket.display(),
                after.as_millis()
            ),
            QdbError::Closed { socket, key } => {
                write!(f, "qubesdb at {} closed the connection while answering {key} ({RETRY})", socket.display())
            }
            QdbError::Io { socket, key, source } => {
                write!(f, "qubesdb at {}, {key}: {source} ({RETRY})", socket.display())
            }
            QdbError::Garbage { socket, key, what } => write!(
                f,
                "qubesdb at {} answered {key} with {what}: not the qubesdb protocol ({RETRY}; is {} a qubes-db socket?)",
                socket.display(),
                socket.display()
            ),
            QdbError::Refused { socket, key } => write!(
                f,
                "qubesdb at {} refused {key} (an invalid path, or a command this socket does not allow)",
                socket.display()
            ),
            QdbError::Program { program, key, what } => write!(f, "{} {key}: {what}", program.display()),
        }
    }
}

impl fmt::Display for Garbage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Garbage::Type(t) => write!(f, "a message of type {t}"),
            Garbage::Unterminated => f.write_str("a path of 64 bytes without NUL"),
            Garbage::PathByte(b) => write!(f, "a path holding byte 0x{b:02x}"),
            Garbage::Length(n) => write!(f, "a length of {n} bytes (at most {MAX_DATA})"),
            Garbage::Data(n) => write!(f, "{n} bytes of data where none belong"),
            Garbage::Nul => f.write_str("a NUL byte in a value"),
            Garbage::Empty => f.write_str("a watch event without a path"),
            Garbage::Echo(p) => write!(f, "an answer for {p}"),
            Garbage::Outside(p) => write!(f, "an entry {p} outside the prefix"),
            Garbage::TooMany => write!(f, "more than {MAX_ENTRIES} entries"),
        }
    }
}

impl fmt::Display for ProgramError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProgramError::Spawn(e) => {
                write!(f, "cannot run it: {e} (install qubes-core-qubesdb, or give --qubesdb-read PATH)")
            }
            ProgramError::Timeout(d) => write!(f, "no answer within {} ms, killed (is qubes-db stuck?)", d.as_millis()),
            ProgramError::Usage(text) => write!(
                f,
                "it printed \"{}\" and no value: its usage, not an answer (is it qubesdb-read? qubesdb-cmd picks its command from argv[0])",
                Escaped(first_line(text))
            ),
            ProgramError::Output(what) => write!(f, "{what}: not a qubesdb value"),
            ProgramError::Failed { status, stderr } => {
                write!(f, "failed ({}): \"{}\"", describe(*status), Escaped(first_line(stderr)))
            }
        }
    }
}

impl std::error::Error for QdbError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            QdbError::Connect { source, .. } | QdbError::Io { source, .. } => Some(source),
            QdbError::Program { what: ProgramError::Spawn(e), .. } => Some(e),
            _ => None,
        }
    }
}

fn first_line(text: &[u8]) -> &[u8] {
    let line = text.split(|&b| b == b'\n').find(|l| !l.is_empty()).unwrap_or(b"");
    &line[..line.len().min(200)]
}

fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit {code}"),
        (None, Some(sig)) => format!("signal {sig}"),
        _ => "unknown status".into(),
    }
}

// ---------------------------------------------------------------------------------------------
// Keys and headers (pure)

/// What a key is used for: an entry (READ: never ends in `/`) or a prefix (MULTIREAD, WATCH).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Use {
    Entry,
    Prefix,
}

/// Checks `key` as the daemon will (db-cmds.c:38, qdb-client.c:365), so a bad key fails here
/// with its reason rather than as an anonymous ERROR.
fn check_key(key: &str, usage: Use) -> Result<(), QdbError> {
    let bad = |why| Err(QdbError::BadKey { key: key.into(), why });
    if !key.starts_with('/') {
        return bad("it does not start with /");
    }
    if key.len() >= MAX_PATH {
        return bad("it is longer than 63 bytes");
    }
    if !key.bytes().all(path_byte) {
        return bad("it holds a byte qubesdb refuses");
    }
    if usage == Use::Entry && key.ends_with('/') {
        return bad("an entry's key does not end with /");
    }
    Ok(())
}

fn path_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'/' | b'.' | b':' | b'@')
}

/// A command header: no data, the rest zero.
fn encode(kind: u8, key: &str) -> [u8; HDR_LEN] {
    let mut hdr = [0u8; HDR_LEN];
    hdr[0] = kind;
    hdr[1..1 + key.len()].copy_from_slice(key.as_bytes());
    hdr
}

/// A received header, checked: its path is a qubesdb path (or empty), its length bounded.
#[derive(Debug, PartialEq, Eq)]
struct Hdr {
    kind: u8,
    path: String,
    len: u32,
}

fn decode(raw: &[u8]) -> Result<Hdr, Garbage> {
    let field = &raw[1..1 + MAX_PATH];
    let end = field.iter().position(|&b| b == 0).ok_or(Garbage::Unterminated)?;
    if let Some(&b) = field[..end].iter().find(|&&b| !path_byte(b)) {
        return Err(Garbage::PathByte(b));
    }
    let len = u32::from_ne_bytes(raw[LEN_AT..LEN_AT + 4].try_into().expect("4 bytes"));
    if len as usize > MAX_DATA {
        return Err(Garbage::Length(len));
    }
    // Only path bytes, checked above: ASCII.
    let path = String::from_utf8(field[..end].to_vec()).expect("ASCII");
    Ok(Hdr { kind: raw[0], path, len })
}

// ---------------------------------------------------------------------------------------------
// The client

/// One connection to the qubesdb daemon, with its watches.
///
/// Its fd ([`AsFd`]) stays the same across reconnects and is readable while watch events are
/// pending, including events that arrived during a command: poll it, then call
/// [`Client::take_watch_events`].
#[derive(Debug)]
pub struct Client {
    socket: PathBuf,
    timeout: Duration,
    /// None after a failure: reopened at the next call.
    conn: Option<UnixStream>,
    /// Received bytes not yet parsed, from `start`.
    inbuf: Vec<u8>,
    start: usize,
    /// Registered watches (the daemon counts duplicates; so does this list).
    watches: Vec<String>,
    /// Paths changed since the last take, in arrival order, without duplicates.
    events: Vec<String>,
    /// The fd callers poll: the socket and `wake`.
    epoll: Epoll,
    /// Readable while `events` is not empty.
    wake: EventFd,
}

impl AsFd for Client {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.epoll.0.as_fd()
    }
}

impl Client {
    /// Connects to the daemon at `socket`. `timeout` bounds each later call as well.
    pub fn connect(socket: &Path, timeout: Duration) -> Result<Client, QdbError> {
        let io = |source| QdbError::Connect { socket: socket.into(), source };
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(|e| io(e.into()))?;
        let wake = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK).map_err(|e| io(e.into()))?;
        epoll.add(wake.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, 0)).map_err(|e| io(e.into()))?;
        let mut client = Client {
            socket: socket.into(),
            timeout,
            conn: None,
            inbuf: Vec::new(),
            start: 0,
            watches: Vec::new(),
            events: Vec::new(),
            epoll,
            wake,
        };
        client.open()?;
        Ok(client)
    }

    /// Connects to this qube's daemon: the read-only socket, or the read-write one where there
    /// is no read-only socket (qubesdb before 4.3.3).
    pub fn connect_local(timeout: Duration) -> Result<Client, QdbError> {
        Client::connect_first(&[Path::new(SOCKET_RO), Path::new(SOCKET)], timeout)
    }

    /// Connects to the first of `sockets` that accepts. The error is that of the first socket
    /// that exists, or, if none does, the first one's ([`QdbError::absent`] is then true).
    pub fn connect_first(sockets: &[&Path], timeout: Duration) -> Result<Client, QdbError> {
        let mut error: Option<QdbError> = None;
        for socket in sockets {
            match Client::connect(socket, timeout) {
                Ok(client) => return Ok(client),
                // Keep the first error of a socket that exists: it says why its daemon did not
                // answer; a missing socket says less.
                Err(e) => {
                    if error.as_ref().is_none_or(|kept| kept.absent() && !e.absent()) {
                        error = Some(e);
                    }
                }
            }
        }
        Err(error.unwrap_or_else(|| QdbError::Connect {
            socket: PathBuf::new(),
            source: io::Error::from(io::ErrorKind::InvalidInput),
        }))
    }

    /// The socket this client talks to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Reads `key`: its value, or None if there is no such entry.
    pub fn read(&mut self, key: &str) -> Result<Option<Vec<u8>>, QdbError> {
        check_key(key, Use::Entry)?;
        let deadline = self.command(CMD_READ, key)?;
        let (hdr, data) = self.answer(key, deadline)?;
        match hdr.kind {
            RESP_READ | RESP_ERROR_NOENT if hdr.path != key => self.garbage(key, Garbage::Echo(hdr.path)),
            RESP_READ => Ok(Some(data)),
            RESP_ERROR_NOENT => Ok(None),
            RESP_ERROR => Err(self.refused(key)),
            other => self.garbage(key, Garbage::Type(other)),
        }
    }

    /// Every entry whose path starts with `prefix` (a `/` at its end or not), in path order.
    pub fn multiread(&mut self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, QdbError> {
        check_key(prefix, Use::Prefix)?;
        let deadline = self.command(CMD_MULTIREAD, prefix)?;
        let mut entries = Vec::new();
        loop {
            let (hdr, data) = self.answer(prefix, deadline)?;
            match hdr.kind {
                RESP_MULTIREAD if hdr.path.is_empty() => return Ok(entries),
                RESP_MULTIREAD if !hdr.path.starts_with(prefix) => {
                    return self.garbage(prefix, Garbage::Outside(hdr.path));
                }
                RESP_MULTIREAD if entries.len() == MAX_ENTRIES => return self.garbage(prefix, Garbage::TooMany),
                RESP_MULTIREAD => entries.push((hdr.path, data)),
                RESP_ERROR if entries.is_empty() => return Err(self.refused(prefix)),
                other => return self.garbage(prefix, Garbage::Type(other)),
            }
        }
    }

    /// Watches `key` (with a `/` at its end: every path under it). The key need not exist.
    pub fn watch(&mut self, key: &str) -> Result<(), QdbError> {
        check_key(key, Use::Prefix)?;
        self.simple(CMD_WATCH, key)?;
        self.watches.push(key.into());
        Ok(())
    }

    /// Removes one watch on `key`. False if the daemon had none. Events of the watch that
    /// arrived before may still be taken.
    pub fn unwatch(&mut self, key: &str) -> Result<bool, QdbError> {
        check_key(key, Use::Prefix)?;
        if let Some(i) = self.watches.iter().position(|w| w == key) {
            self.watches.remove(i);
        }
        self.simple(CMD_UNWATCH, key)
    }

    /// The paths changed since the last call, without blocking: each names a changed entry,
    /// or, after a reconnect or more events than kept, a watched key under which anything may
    /// have changed. Empty if none.
    ///
    /// A lost connection (the daemon restarted) is reopened here at once and its watches
    /// registered again; the error that ended it is returned, and the fd stays readable for
    /// the events of the reconnect. If it cannot be reopened, the error says why and the fd
    /// is not readable until a later call (from the caller's timer) reconnects.
    pub fn take_watch_events(&mut self) -> Result<Vec<String>, QdbError> {
        let drained = if self.conn.is_some() { self.drain() } else { Ok(()) };
        if self.conn.is_none() {
            if let Err(e) = self.reopen(WATCH_EVENTS) {
                let _ = self.wake.read();
                return Err(e);
            }
        }
        drained?;
        let _ = self.wake.read(); // EAGAIN when it was not signalled: nothing to undo.
        Ok(std::mem::take(&mut self.events))
    }

    /// OK for a WATCH; OK or NOENT for an UNWATCH.
    fn simple(&mut self, kind: u8, key: &str) -> Result<bool, QdbError> {
        let deadline = self.command(kind, key)?;
        let (hdr, _) = self.answer(key, deadline)?;
        match hdr.kind {
            RESP_OK | RESP_ERROR_NOENT if hdr.path != key => self.garbage(key, Garbage::Echo(hdr.path)),
            RESP_OK => Ok(true),
            RESP_ERROR_NOENT if kind == CMD_UNWATCH => Ok(false),
            RESP_ERROR => Err(self.refused(key)),
            other => self.garbage(key, Garbage::Type(other)),
        }
    }

    fn refused(&self, key: &str) -> QdbError {
        QdbError::Refused { socket: self.socket.clone(), key: key.into() }
    }

    /// Drops the connection (its stream can no longer be trusted) and fails with `what`.
    fn garbage<T>(&mut self, key: &str, what: Garbage) -> Result<T, QdbError> {
        self.close();
        Err(QdbError::Garbage { socket: self.socket.clone(), key: key.into(), what })
    }

    // --- connection ---------------------------------------------------------------------

    /// Connects, with connect(2) itself bounded (SO_SNDTIMEO bounds a unix connect that waits
    /// for room in a full backlog).
    fn open(&mut self) -> Result<(), QdbError> {
        let io = |source| QdbError::Connect { socket: self.socket.clone(), source };
        let fd: OwnedFd = socket::socket(AddressFamily::Unix, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)
            .map_err(|e| io(e.into()))?;
        // A zero SO_SNDTIMEO means "no bound": never ask for less than a millisecond.
        let timeout = self.timeout.max(Duration::from_millis(1));
        let bound = TimeVal::new(timeout.as_secs().try_into().unwrap_or(i64::MAX), timeout.subsec_micros().into());
        socket::setsockopt(&fd, sockopt::SendTimeout, &bound).map_err(|e| io(e.into()))?;
        let addr = UnixAddr::new(&self.socket).map_err(|e| io(e.into()))?;
        socket::connect(fd.as_raw_fd(), &addr).map_err(|e| io(e.into()))?;
        let stream = UnixStream::from(fd);
        stream.set_nonblocking(true).map_err(io)?;
        self.epoll.add(stream.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, 1)).map_err(|e| io(e.into()))?;
        self.conn = Some(stream);
        self.inbuf.clear();
        self.start = 0;
        Ok(())
    }

    fn close(&mut self) {
        if let Some(stream) = self.conn.take() {
            let _ = self.epoll.delete(stream.as_fd());
        }
        self.inbuf.clear();
        self.start = 0;
    }

    /// Reconnects after a failure, registers the watches again and reports each watched key
    /// as changed.
    fn reopen(&mut self, key: &str) -> Result<(), QdbError> {
        self.open()?;
        let watches = self.watches.clone();
        for watch in &watches {
            let deadline = self.send(CMD_WATCH, watch)?;
            let (hdr, _) = self.answer(watch, deadline)?;
            if hdr.kind != RESP_OK {
                self.close();
                return Err(QdbError::Refused {
                    socket: self.socket.clone(),
                    key: format!("{watch} (watch, for {key})"),
                });
            }
        }
        for watch in watches {
            self.push_event(watch);
        }
        Ok(())
    }

    /// Sends a command, reconnecting first if the connection was lost; returns the deadline
    /// of its answer.
    fn command(&mut self, kind: u8, key: &str) -> Result<Instant, QdbError> {
        if self.conn.is_none() {
            self.reopen(key)?;
        }
        match self.send(kind, key) {
            // The daemon closed the connection since the last command (it restarted): nothing
            // of this one was taken, so send it once more on a new connection, as
            // qdb-client.c:235-250 `send_command_to_daemon` does.
            Err(QdbError::Io { source, .. }) if source.raw_os_error() == Some(Errno::EPIPE as i32) => {
                self.reopen(key)?;
                self.send(kind, key)
            }
            other => other,
        }
    }

    fn send(&mut self, kind: u8, key: &str) -> Result<Instant, QdbError> {
        let deadline = Instant::now() + self.timeout;
        let hdr = encode(kind, key);
        let mut sent = 0;
        while sent < HDR_LEN {
            let fd = self.conn.as_ref().expect("connected").as_raw_fd();
            match socket::send(fd, &hdr[sent..], MsgFlags::MSG_NOSIGNAL) {
                Ok(n) => sent += n,
                Err(Errno::EINTR) => {}
                Err(Errno::EAGAIN) => self.wait(PollFlags::POLLOUT, key, deadline)?,
                Err(e) => return Err(self.lost(key, e.into())),
            }
        }
        Ok(deadline)
    }

    // --- receiving ----------------------------------------------------------------------

    /// The next message that is not a watch event (those are queued), whole.
    fn answer(&mut self, key: &str, deadline: Instant) -> Result<(Hdr, Vec<u8>), QdbError> {
        loop {
            if let Some(message) = self.parse(key)? {
                return Ok(message);
            }
            self.wait(PollFlags::POLLIN, key, deadline)?;
            self.fill(key)?;
        }
    }

    /// Reads whatever the socket holds without blocking, queueing watch events; any other
    /// message here answers no command: garbage.
    fn drain(&mut self) -> Result<(), QdbError> {
        while self.fill(WATCH_EVENTS)? > 0 {}
        match self.parse(WATCH_EVENTS)? {
            None => Ok(()),
            Some((hdr, _)) => self.garbage(WATCH_EVENTS, Garbage::Type(hdr.kind)),
        }
    }

    /// Takes one whole message from the buffer, queueing watch events on the way: None until
    /// one is complete. A bad header fails at once, before its data arrives.
    fn parse(&mut self, key: &str) -> Result<Option<(Hdr, Vec<u8>)>, QdbError> {
        loop {
            let buf = &self.inbuf[self.start..];
            if buf.len() < HDR_LEN {
                return Ok(None);
            }
            let hdr = match decode(&buf[..HDR_LEN]) {
                Ok(hdr) => hdr,
                Err(what) => return self.garbage(key, what),
            };
            // Answers that never carry data fail here, before their "data" is waited for.
            let dataless = matches!(hdr.kind, RESP_OK | RESP_ERROR_NOENT | RESP_ERROR | RESP_WATCH)
                || (hdr.kind == RESP_MULTIREAD && hdr.path.is_empty());
            if dataless && hdr.len != 0 {
                return self.garbage(key, Garbage::Data(hdr.len));
            }
            let len = hdr.len as usize;
            if buf.len() < HDR_LEN + len {
                return Ok(None);
            }
            let data = buf[HDR_LEN..HDR_LEN + len].to_vec();
            self.start += HDR_LEN + len;
            if data.contains(&0) {
                return self.garbage(key, Garbage::Nul);
            }
            if hdr.kind != RESP_WATCH {
                return Ok(Some((hdr, data)));
            }
            if hdr.path.is_empty() {
                return self.garbage(key, Garbage::Empty);
            }
            self.push_event(hdr.path);
        }
    }

    /// Appends what the socket holds now (never blocks): bytes read, 0 if none yet.
    fn fill(&mut self, key: &str) -> Result<usize, QdbError> {
        if self.start > 0 {
            self.inbuf.drain(..self.start);
            self.start = 0;
        }
        let have = self.inbuf.len();
        self.inbuf.resize(have + 4096, 0);
        let result = loop {
            match self.conn.as_mut().expect("connected").read(&mut self.inbuf[have..]) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                other => break other,
            }
        };
        match result {
            Ok(0) => {
                self.close();
                Err(QdbError::Closed { socket: self.socket.clone(), key: key.into() })
            }
            Ok(n) => {
                self.inbuf.truncate(have + n);
                Ok(n)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.inbuf.truncate(have);
                Ok(0)
            }
            Err(e) => Err(self.lost(key, e)),
        }
    }

    /// Waits until the socket is ready for `what`, or fails at the deadline.
    fn wait(&mut self, what: PollFlags, key: &str, deadline: Instant) -> Result<(), QdbError> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                self.close();
                return Err(QdbError::Timeout { socket: self.socket.clone(), key: key.into(), after: self.timeout });
            }
            // Round up, so that the last poll does not spin with a zero timeout.
            let ms = i32::try_from(left.as_micros().div_ceil(1000)).unwrap_or(i32::MAX);
            let conn = self.conn.as_ref().expect("connected");
            let mut fds = [PollFd::new(conn.as_fd(), what)];
            match poll(&mut fds, PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX)) {
                Ok(0) | Err(Errno::EINTR) => {}
                Ok(_) => return Ok(()),
                Err(e) => return Err(self.lost(key, e.into())),
            }
        }
    }

    fn lost(&mut self, key: &str, source: io::Error) -> QdbError {
        self.close();
        QdbError::Io { socket: self.socket.clone(), key: key.into(), source }
    }

    /// Queues a changed path (once), and makes the fd readable.
    fn push_event(&mut self, path: String) {
        if self.events.contains(&path) {
            return;
        }
        if self.events.len() >= MAX_EVENTS {
            // Too many to keep: report every watch instead, which covers them all.
            self.events.clear();
            let mut all = self.watches.clone();
            all.dedup();
            self.events.extend(all);
        } else {
            self.events.push(path);
        }
        let _ = self.wake.write(1);
    }
}

// ---------------------------------------------------------------------------------------------
// The fallback: qubesdb-read

/// The `qubesdb-read` program, where there is no daemon socket (or `--qubesdb-read PATH`).
///
/// It is run as `qubesdb-read -r KEY` with `argv[0]` exactly `qubesdb-read`: qubesdb-cmd picks its
/// command from `argv[0]` after the first `-` before 4.3.3 (client/qubesdb-cmd.c:290 at v4.2.10,
/// `strchr`; the last since 4.3.3, `strrchr`), so a path such as `/opt/qubes-tools/qubesdb-read`
/// would make it print its usage on stderr and exit 0 (qubesdb-cmd.c:364-366) instead of
/// reading. `-r` prints the value's bytes as they are (qubesdb-cmd.c:34-41), followed by a
/// newline since 4.1.13 (before: nothing after the value).
///
/// Its answer: exit 0 and nothing on stderr is a value (one trailing newline removed); exit 0
/// with stderr is usage text, an error ([`ProgramError::Usage`]); exit 2 is "no such entry"
/// (4.1.13+, qubesdb-cmd.c:112-113); exit 1 with nothing but "Failed to read KEY" lines on
/// stderr is also "no such entry" (before 4.1.13 it exited 1 for a missing key; since then, 1 is
/// a failed read, which a probe treats alike: not there yet). Anything else is an error. Output
/// is bounded (a value and its newline), and so is its run time.
#[derive(Clone, Debug)]
pub struct Program {
    pub path: PathBuf,
    pub timeout: Duration,
}

/// What a finished run left: its status and its bounded output.
#[derive(Debug)]
struct Run {
    status: ExitStatus,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

/// stderr kept for messages.
const MAX_STDERR: usize = 1024;

impl Program {
    /// Reads `key`: its value, or None if there is no such entry.
    pub fn read(&self, key: &str) -> Result<Option<Vec<u8>>, QdbError> {
        check_key(key, Use::Entry)?;
        let run = self.run(key).map_err(|what| self.error(key, what))?;
        interpret(key, run).map_err(|what| self.error(key, what))
    }

    fn error(&self, key: &str, what: ProgramError) -> QdbError {
        QdbError::Program { program: self.path.clone(), key: key.into(), what }
    }

    fn run(&self, key: &str) -> Result<Run, ProgramError> {
        let deadline = Instant::now() + self.timeout;
        let mut child = Command::new(&self.path)
            .arg0("qubesdb-read")
            .args(["-r", key])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(ProgramError::Spawn)?;
        let (mut out, mut err) = (child.stdout.take().expect("piped"), child.stderr.take().expect("piped"));
        let collected = collect(&mut out, &mut err, deadline, self.timeout);
        drop((out, err));
        let (stdout, stderr) = match collected {
            Ok(output) => output,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(e);
            }
        };
        // Both pipes are closed: it has exited, or is about to.
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return Ok(Run { status, stdout, stderr }),
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(1)),
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(ProgramError::Timeout(self.timeout));
                }
            }
        }
    }
}

/// Reads both pipes to their end, bounded in size and time.
fn collect(
    out: &mut std::process::ChildStdout,
    err: &mut std::process::ChildStderr,
    deadline: Instant,
    timeout: Duration,
) -> Result<(Vec<u8>, Vec<u8>), ProgramError> {
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let (mut out_open, mut err_open) = (true, true);
    let mut chunk = [0u8; 4096];
    while out_open || err_open {
        let left = deadline.saturating_duration_since(Instant::now());
        let ms = i32::try_from(left.as_micros().div_ceil(1000)).unwrap_or(i32::MAX);
        if ms == 0 {
            return Err(ProgramError::Timeout(timeout));
        }
        let flags = |open| if open { PollFlags::POLLIN } else { PollFlags::empty() };
        let mut fds = [PollFd::new(out.as_fd(), flags(out_open)), PollFd::new(err.as_fd(), flags(err_open))];
        match poll(&mut fds, PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX)) {
            Ok(0) | Err(Errno::EINTR) => continue,
            Ok(_) => {}
            Err(e) => return Err(ProgramError::Spawn(e.into())),
        }
        let ready = |fd: &PollFd| fd.revents().is_some_and(|r| !r.is_empty());
        let (out_ready, err_ready) = (ready(&fds[0]), ready(&fds[1]));
        if out_open && out_ready {
            let n = out.read(&mut chunk).unwrap_or(0);
            out_open = n > 0;
            stdout.extend_from_slice(&chunk[..n]);
            if stdout.len() > MAX_DATA + 1 {
                return Err(ProgramError::Output("more than 3071 bytes"));
            }
        }
        if err_open && err_ready {
            let n = err.read(&mut chunk).unwrap_or(0);
            err_open = n > 0;
            let room = MAX_STDERR.saturating_sub(stderr.len()).min(n);
            stderr.extend_from_slice(&chunk[..room]);
        }
    }
    Ok((stdout, stderr))
}

/// What a finished `qubesdb-read -r KEY` said (see [`Program`]).
fn interpret(key: &str, run: Run) -> Result<Option<Vec<u8>>, ProgramError> {
    let Run { status, mut stdout, stderr } = run;
    let missing_line = format!("Failed to read {key}");
    let only_missing = stderr.split(|&b| b == b'\n').filter(|l| !l.is_empty()).all(|l| l == missing_line.as_bytes());
    match status.code() {
        Some(0) if !stderr.is_empty() => Err(ProgramError::Usage(stderr)),
        Some(0) => {
            if stdout.last() == Some(&b'\n') {
                stdout.pop();
            }
            if stdout.len() >= MAX_DATA {
                return Err(ProgramError::Output("more than 3071 bytes"));
            }
            if stdout.contains(&0) {
                return Err(ProgramError::Output("a NUL byte"));
            }
            Ok(Some(stdout))
        }
        Some(2) => Ok(None),
        Some(1) if only_missing => Ok(None),
        _ => Err(ProgramError::Failed { status, stderr }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TempDir;
    use std::io::Write as _;
    use std::os::unix::net::UnixListener;
    use std::thread::JoinHandle;

    /// A header as the daemon writes it: `struct qdb_hdr` bytes, padding included.
    fn hdr(kind: u8, path: &str, len: u32) -> Vec<u8> {
        let mut h = vec![0u8; HDR_LEN];
        h[0] = kind;
        h[1..1 + path.len()].copy_from_slice(path.as_bytes());
        h[LEN_AT..LEN_AT + 4].copy_from_slice(&len.to_ne_bytes());
        h
    }

    /// A one-connection daemon at a fresh socket: for each command it reads, it writes the
    /// next answer of `script` (each answer in the given chunks, flushed one by one).
    fn scripted(tag: &str, script: Vec<Vec<Vec<u8>>>) -> (TempDir, PathBuf, JoinHandle<Vec<Vec<u8>>>) {
        let dir = TempDir::new(tag);
        let path = dir.path().join("qubesdb.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut commands = Vec::new();
            for answer in script {
                let mut command = [0u8; HDR_LEN];
                if conn.read_exact(&mut command).is_err() {
                    break;
                }
                commands.push(command.to_vec());
                for chunk in answer {
                    conn.write_all(&chunk).unwrap();
                    conn.flush().unwrap();
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
            commands
        });
        (dir, path, server)
    }

    fn client(path: &Path) -> Client {
        Client::connect(path, Duration::from_secs(5)).unwrap()
    }

    fn readable(client: &Client) -> bool {
        let mut fds = [PollFd::new(client.as_fd(), PollFlags::POLLIN)];
        poll(&mut fds, PollTimeout::ZERO).unwrap() == 1
    }

    #[test]
    fn header_is_the_c_struct() {
        // struct qdb_hdr: type at 0, path at 1..65, padding, data_len at 68, 72 bytes.
        let h = encode(CMD_WATCH, "/qubes-usb-devices/2-1_4/");
        assert_eq!(h.len(), 72);
        assert_eq!(h[0], 5);
        assert_eq!(&h[1..26], b"/qubes-usb-devices/2-1_4/");
        assert!(h[26..].iter().all(|&b| b == 0));
        let mut raw = hdr(RESP_READ, "/a", 3071);
        raw[65..68].copy_from_slice(b"pad"); // padding is whatever the daemon's stack held
        raw[4..10].copy_from_slice(b"\0junk!"); // so are the bytes after the NUL
        assert_eq!(decode(&raw), Ok(Hdr { kind: RESP_READ, path: "/a".into(), len: 3071 }));
        assert_eq!(decode(&hdr(RESP_READ, "/a", 3073)), Err(Garbage::Length(3073)));
        assert_eq!(decode(&hdr(RESP_READ, "/a b", 0)), Err(Garbage::PathByte(b' ')));
        let mut full = hdr(RESP_READ, "", 0);
        full[1..65].fill(b'a');
        assert_eq!(decode(&full), Err(Garbage::Unterminated));
    }

    #[test]
    fn keys_are_checked_as_the_daemon_checks_them() {
        assert!(check_key("/qubes-block-devices/sda1/desc", Use::Entry).is_ok());
        assert!(check_key("/qubes-usb-devices/2-1_4/", Use::Prefix).is_ok());
        assert!(check_key(&format!("/{}", "a".repeat(62)), Use::Entry).is_ok());
        for (key, usage, why) in [
            ("qubes", Use::Entry, "it does not start with /"),
            (&format!("/{}", "a".repeat(63)), Use::Entry, "it is longer than 63 bytes"),
            ("/a b", Use::Entry, "it holds a byte qubesdb refuses"),
            ("/a\n", Use::Prefix, "it holds a byte qubesdb refuses"),
            ("/a/", Use::Entry, "an entry's key does not end with /"),
        ] {
            match check_key(key, usage) {
                Err(QdbError::BadKey { why: got, .. }) => assert_eq!(got, why, "{key:?}"),
                other => panic!("{key:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn answers_split_anywhere_are_put_together() {
        let mut answer = hdr(RESP_READ, "/vm-config/autoattach-rules", 5);
        answer.extend_from_slice(b"rules");
        let chunks: Vec<Vec<u8>> = answer.iter().map(|&b| vec![b]).collect();
        let (_dir, path, server) = scripted("qdb-split", vec![chunks]);
        let mut c = client(&path);
        assert_eq!(c.read("/vm-config/autoattach-rules").unwrap(), Some(b"rules".to_vec()));
        let commands = server.join().unwrap();
        assert_eq!(commands, vec![encode(CMD_READ, "/vm-config/autoattach-rules").to_vec()]);
    }

    #[test]
    fn watch_events_before_an_answer_are_queued_once() {
        let mut answer = hdr(RESP_WATCH, "/w/x", 0);
        answer.extend(hdr(RESP_WATCH, "/w/x", 0));
        answer.extend(hdr(RESP_WATCH, "/w/y", 0));
        answer.extend(hdr(RESP_ERROR_NOENT, "/a", 0));
        let (_dir, path, server) = scripted("qdb-queued", vec![vec![hdr(RESP_OK, "/w/", 0)], vec![answer]]);
        let mut c = client(&path);
        c.watch("/w/").unwrap();
        assert!(!readable(&c));
        assert_eq!(c.read("/a").unwrap(), None);
        assert!(readable(&c), "events taken in during the read make the fd readable");
        assert_eq!(c.take_watch_events().unwrap(), ["/w/x", "/w/y"]);
        assert!(!readable(&c));
        assert!(c.take_watch_events().unwrap().is_empty());
        server.join().unwrap();
    }

    #[test]
    fn too_many_events_become_every_watch() {
        let mut answer = Vec::new();
        for i in 0..=MAX_EVENTS {
            answer.extend(hdr(RESP_WATCH, &format!("/w/{i}"), 0));
        }
        answer.extend(hdr(RESP_ERROR_NOENT, "/a", 0));
        let script = vec![vec![hdr(RESP_OK, "/w/", 0)], vec![hdr(RESP_OK, "/v", 0)], vec![answer]];
        let (_dir, path, server) = scripted("qdb-overflow", script);
        let mut c = client(&path);
        c.watch("/w/").unwrap();
        c.watch("/v").unwrap();
        assert_eq!(c.read("/a").unwrap(), None);
        assert_eq!(c.take_watch_events().unwrap(), ["/w/", "/v"]);
        server.join().unwrap();
    }

    /// Each answer the daemon never gives, and what the client makes of it.
    #[test]
    fn garbage_is_named_and_the_connection_dropped() {
        let with = |h: Vec<u8>, data: &[u8]| [h, data.to_vec()].concat();
        let cases: Vec<(Vec<u8>, Garbage)> = vec![
            (with(hdr(RESP_READ, "/b", 1), b"x"), Garbage::Echo("/b".into())),
            (with(hdr(RESP_READ, "/a", 3), b"a\0b"), Garbage::Nul),
            (hdr(RESP_OK, "/a", 0), Garbage::Type(RESP_OK)),
            (hdr(RESP_ERROR_NOENT, "/a", 4), Garbage::Data(4)),
            (with(hdr(RESP_WATCH, "/w", 1), b"x"), Garbage::Data(1)),
            (hdr(RESP_WATCH, "", 0), Garbage::Empty),
            (hdr(0xee, "/a", 0), Garbage::Type(0xee)),
        ];
        for (answer, want) in cases {
            let (_dir, path, server) = scripted("qdb-garbage", vec![vec![answer]]);
            let mut c = client(&path);
            match c.read("/a") {
                Err(QdbError::Garbage { what, key, .. }) => assert_eq!((what, key.as_str()), (want, "/a")),
                other => panic!("want {want:?}, got {other:?}"),
            }
            assert!(c.conn.is_none(), "a stream that spoke garbage is not read again");
            server.join().unwrap();
        }
    }

    #[test]
    fn multiread_checks_entries_and_end_marker() {
        let entry = |p: &str, v: &[u8]| [hdr(RESP_MULTIREAD, p, v.len() as u32), v.to_vec()].concat();
        let good = [entry("/d/a", b"1"), entry("/d/b", b""), hdr(RESP_MULTIREAD, "", 0)].concat();
        let outside = [entry("/d/a", b"1"), entry("/e", b"2")].concat();
        let marker_with_data = [hdr(RESP_MULTIREAD, "", 1), b"x".to_vec()].concat();
        let script = vec![vec![good], vec![hdr(RESP_ERROR, "/d/", 0)]];
        let (_dir, path, server) = scripted("qdb-multi", script);
        let mut c = client(&path);
        assert_eq!(c.multiread("/d/").unwrap(), [("/d/a".to_string(), b"1".to_vec()), ("/d/b".into(), vec![])]);
        assert!(matches!(c.multiread("/d/"), Err(QdbError::Refused { .. })));
        assert!(c.conn.is_some(), "an ERROR answer leaves the stream in step");
        server.join().unwrap();
        for (answer, want) in [(outside, Garbage::Outside("/e".into())), (marker_with_data, Garbage::Data(1))] {
            let (_dir, path, server) = scripted("qdb-multi-bad", vec![vec![answer]]);
            match client(&path).multiread("/d/") {
                Err(QdbError::Garbage { what, .. }) => assert_eq!(what, want),
                other => panic!("want {want:?}, got {other:?}"),
            }
            server.join().unwrap();
        }
    }

    #[test]
    fn unsolicited_answers_are_garbage_and_watches_come_back() {
        // After the watch's OK, a READ answer nobody asked for.
        let script = vec![vec![hdr(RESP_OK, "/w/", 0), hdr(RESP_READ, "/x", 0)]];
        let (_dir, path, server) = scripted("qdb-unsolicited", script);
        let mut c = client(&path);
        c.watch("/w/").unwrap();
        server.join().unwrap(); // its listener is gone: a reconnect is refused
        assert!(readable(&c));
        match c.take_watch_events() {
            Err(QdbError::Connect { .. }) => {}
            other => panic!("{other:?}"),
        }
        assert!(!readable(&c), "a failed reconnect leaves nothing to take");
        // A daemon is back: the next call reconnects, watches again, and reports the watch.
        let (_dir2, path2, server) = scripted("qdb-back", vec![vec![hdr(RESP_OK, "/w/", 0)]]);
        c.socket = path2;
        assert_eq!(c.take_watch_events().unwrap(), ["/w/"]);
        assert_eq!(server.join().unwrap(), vec![encode(CMD_WATCH, "/w/").to_vec()]);
    }

    fn run(status: i32, stdout: &[u8], stderr: &[u8]) -> Run {
        Run { status: ExitStatus::from_raw(status << 8), stdout: stdout.into(), stderr: stderr.into() }
    }

    #[test]
    fn qubesdb_read_answers_are_told_apart() {
        let key = "/qubes-block-devices/sda/desc";
        // 4.1.13+: the value and a newline; an empty value is a lone newline.
        assert_eq!(interpret(key, run(0, b"SanDisk ()\n", b"")).unwrap(), Some(b"SanDisk ()".to_vec()));
        assert_eq!(interpret(key, run(0, b"\n", b"")).unwrap(), Some(vec![]));
        // Before 4.1.13, -r printed the value alone.
        assert_eq!(interpret(key, run(0, b"SanDisk", b"")).unwrap(), Some(b"SanDisk".to_vec()));
        // Missing: exit 2 (4.1.13+), or exit 1 with "Failed to read KEY" (before).
        assert_eq!(interpret(key, run(2, b"", b"Failed to read /qubes-block-devices/sda/desc\n")).unwrap(), None);
        assert_eq!(interpret(key, run(1, b"", b"Failed to read /qubes-block-devices/sda/desc\n")).unwrap(), None);
        assert_eq!(interpret(key, run(1, b"", b"")).unwrap(), None);
        // Usage on stderr with exit 0 is no value, whatever stdout holds.
        let usage = b"Usage: /opt/qubes-tools/qubesdb-read [-frq] [-c <command>]\n";
        assert!(matches!(interpret(key, run(0, b"", usage)), Err(ProgramError::Usage(_))));
        match interpret(key, run(1, b"", b"Failed connect to local daemon\n")) {
            Err(e @ ProgramError::Failed { .. }) => {
                assert_eq!(e.to_string(), "failed (exit 1): \"Failed connect to local daemon\"")
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(interpret(key, run(0, b"a\0b\n", b"")), Err(ProgramError::Output("a NUL byte"))));
        let long = vec![b'x'; MAX_DATA];
        assert!(matches!(interpret(key, run(0, &long, b"")), Err(ProgramError::Output(_))));
    }
}
