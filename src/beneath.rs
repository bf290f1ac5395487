//! Files beneath a root directory, never outside it: what `replay`, `test`, `list` and
//! `record` use on fixtures that come from bug reports.
//!
//! Every path is resolved by the kernel relative to the root's fd with `openat2`:
//! `RESOLVE_BENEATH` (no `..` above the root, no absolute path or link) where links are
//! expected (sysfs trees are full of them: `subsystem`, `driver`, `class/block/sdb`), and
//! `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS` where they are not (a directive's path, a copy's
//! destination). Reads are bounded and of regular files only: the type is checked on an
//! `O_PATH` fd before anything is opened for reading, so a FIFO never blocks and a device node
//! is never opened (opening some has side effects); a `/dev/zero` reached by any path is
//! refused before it is read.

use std::fmt;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat2};
use nix::sys::stat::{Mode, SFlag, fstat};

/// Whether a path may go through symbolic links (all of them staying beneath the root).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Links {
    Follow,
    Refuse,
}

/// Why a file beneath the root could not be used.
#[derive(Debug)]
pub enum BeneathError {
    /// The path, or a link on it, leads outside the root (or through a link where none is
    /// allowed).
    Outside(PathBuf),
    /// Not a regular file (a FIFO, a device node, a socket, a directory).
    NotAFile(PathBuf, &'static str),
    /// Longer than the bound.
    TooLong(PathBuf, u64),
    /// The path is not a plain relative path.
    BadPath(PathBuf),
    Io(PathBuf, io::Error),
}

impl fmt::Display for BeneathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BeneathError::Outside(p) => {
                write!(f, "{}: leads outside the fixture (a link or '..'): refused", p.display())
            }
            BeneathError::NotAFile(p, kind) => write!(f, "{}: is a {kind}, not a regular file: refused", p.display()),
            BeneathError::TooLong(p, max) => write!(f, "{}: longer than {max} bytes: refused", p.display()),
            BeneathError::BadPath(p) => write!(f, "{}: not a plain relative path", p.display()),
            BeneathError::Io(p, e) => write!(f, "{}: {e}", p.display()),
        }
    }
}

impl std::error::Error for BeneathError {}

impl BeneathError {
    fn from_errno(path: &Path, e: Errno) -> BeneathError {
        match e {
            // RESOLVE_BENEATH refusing `..` or an absolute link; RESOLVE_NO_SYMLINKS a link.
            Errno::EXDEV | Errno::ELOOP => BeneathError::Outside(path.to_owned()),
            e => BeneathError::Io(path.to_owned(), io::Error::from(e)),
        }
    }

    /// True if the file is simply not there.
    pub fn is_not_found(&self) -> bool {
        matches!(self, BeneathError::Io(_, e) if e.kind() == io::ErrorKind::NotFound)
    }
}

/// The refusal of a file whose `st_mode` is `mode`.
pub fn not_a_file(path: &Path, mode: u32) -> BeneathError {
    BeneathError::NotAFile(path.to_owned(), kind(mode))
}

/// What a path names, from an `O_PATH` fd's `fstat`.
fn kind(mode: u32) -> &'static str {
    match SFlag::from_bits_truncate(mode & SFlag::S_IFMT.bits()) {
        SFlag::S_IFREG => "regular file",
        SFlag::S_IFDIR => "directory",
        SFlag::S_IFLNK => "symbolic link",
        SFlag::S_IFIFO => "FIFO",
        SFlag::S_IFCHR => "character device",
        SFlag::S_IFBLK => "block device",
        SFlag::S_IFSOCK => "socket",
        _ => "special file",
    }
}

/// Opens `rel` beneath `dir` (no `..` above it, no absolute path or link; no link at all with
/// [`Links::Refuse`]). Magic links (`/proc/self/fd/N`) are never followed.
pub fn open(dir: impl AsFd, rel: &Path, flags: OFlag, mode: Mode, links: Links) -> Result<OwnedFd, BeneathError> {
    open_errno(dir, rel, flags, mode, links).map_err(|e| BeneathError::from_errno(rel, e))
}

/// [`open`], failing with the bare errno: nothing is allocated (the agent's attribute reads on
/// the kernel's sysfs, where a missing attribute is the common case).
pub fn open_errno(dir: impl AsFd, rel: &Path, flags: OFlag, mode: Mode, links: Links) -> Result<OwnedFd, Errno> {
    // An empty path is the directory itself.
    let rel = if rel.as_os_str().is_empty() { Path::new(".") } else { rel };
    let mut resolve = ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS;
    if links == Links::Refuse {
        resolve |= ResolveFlag::RESOLVE_NO_SYMLINKS;
    }
    // openat2 refuses any flag but O_DIRECTORY and O_NOFOLLOW beside O_PATH.
    let flags = if flags.contains(OFlag::O_PATH) { flags } else { flags | OFlag::O_NOCTTY };
    let how = OpenHow::new().flags(flags | OFlag::O_CLOEXEC).mode(mode).resolve(resolve);
    openat2(dir, rel, how)
}

/// Reads the regular file `rel` beneath `dir`, at most `max` bytes (more is an error).
pub fn read(dir: impl AsFd, rel: &Path, max: u64, links: Links) -> Result<Vec<u8>, BeneathError> {
    let fd = open_file(dir, rel, OFlag::O_RDONLY | OFlag::O_NONBLOCK, links)?;
    let mut out = Vec::new();
    let mut file = io::Read::take(std::fs::File::from(fd), max + 1);
    io::Read::read_to_end(&mut file, &mut out).map_err(|e| BeneathError::Io(rel.to_owned(), e))?;
    if out.len() as u64 > max {
        return Err(BeneathError::TooLong(rel.to_owned(), max));
    }
    Ok(out)
}

/// Opens the regular file `rel` beneath `dir` with `flags`, having checked its type on an
/// `O_PATH` fd first (reopened through /proc/self/fd, the same file whatever happens to the
/// path meanwhile), so that no FIFO or device node is ever opened.
pub fn open_file(dir: impl AsFd, rel: &Path, flags: OFlag, links: Links) -> Result<OwnedFd, BeneathError> {
    let path = open(dir, rel, OFlag::O_PATH, Mode::empty(), links)?;
    let st = fstat(&path).map_err(|e| BeneathError::from_errno(rel, e))?;
    let k = kind(st.st_mode);
    if k != "regular file" {
        return Err(BeneathError::NotAFile(rel.to_owned(), k));
    }
    let proc = PathBuf::from(format!("/proc/self/fd/{}", path.as_raw_fd()));
    nix::fcntl::open(&proc, flags | OFlag::O_CLOEXEC | OFlag::O_NOCTTY, Mode::empty())
        .map_err(|e| BeneathError::from_errno(rel, e))
}

/// The target of the symbolic link `rel` beneath `dir` (the components before it resolved
/// beneath `dir`).
pub fn read_link(dir: impl AsFd, rel: &Path, links: Links) -> Result<PathBuf, BeneathError> {
    let fd = open(dir, rel, OFlag::O_PATH | OFlag::O_NOFOLLOW, Mode::empty(), links)?;
    let target = nix::fcntl::readlinkat(&fd, "").map_err(|e| BeneathError::from_errno(rel, e))?;
    Ok(PathBuf::from(target))
}

/// True if `rel` exists beneath `dir` (its last component, a link or not, is not followed).
pub fn exists(dir: impl AsFd, rel: &Path) -> bool {
    open(dir, rel, OFlag::O_PATH | OFlag::O_NOFOLLOW, Mode::empty(), Links::Follow).is_ok()
}

/// `rel` as plain relative components (no `.`, `..`, root or empty part), or an error.
pub fn plain(rel: &Path) -> Result<&Path, BeneathError> {
    let ok = !rel.as_os_str().is_empty() && rel.components().all(|c| matches!(c, Component::Normal(_)));
    if ok { Ok(rel) } else { Err(BeneathError::BadPath(rel.to_owned())) }
}

/// True if a link at `link` (relative to the root) with target `target` stays beneath the
/// root, read lexically: a relative target whose `..` never climbs above the root, and none
/// after a name (which could itself be a link).
pub fn link_stays_inside(link: &Path, target: &Path) -> bool {
    if target.is_absolute() {
        return false;
    }
    let mut depth = link.parent().map_or(0, |p| p.components().count()) as isize;
    let mut named = false;
    for c in target.components() {
        match c {
            Component::ParentDir if named => return false,
            Component::ParentDir => depth -= 1,
            Component::Normal(_) => {
                depth += 1;
                named = true;
            }
            Component::CurDir => {}
            _ => return false,
        }
        if depth < 0 {
            return false;
        }
    }
    true
}

/// The names in directory `rel` beneath `dir` (not `.` and `..`), unsorted. The directory is
/// opened beneath `dir`, then listed through its fd (/proc/self/fd).
pub fn list(dir: impl AsFd, rel: &Path, links: Links) -> Result<Vec<std::ffi::OsString>, BeneathError> {
    let fd = open(dir, rel, OFlag::O_RDONLY | OFlag::O_DIRECTORY, Mode::empty(), links)?;
    names(fd).map_err(|e| BeneathError::Io(rel.to_owned(), e))
}

/// The names in the open directory `fd` (not `.` and `..`), unsorted, read through
/// /proc/self/fd.
pub fn names(fd: OwnedFd) -> io::Result<Vec<std::ffi::OsString>> {
    let proc = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
    std::fs::read_dir(&proc)?.map(|e| e.map(|e| e.file_name())).collect()
}
