//! The sysfs tree under a root that is a parameter (`/sys`, or a fixture directory).
//!
//! Everything is read relative to a directory fd opened once, through paths built on the
//! stack, so reading an attribute allocates nothing. A devpath (`/devices/...`) is joined to
//! the root only after [`crate::uevent::devpath_is_safe`] accepted it, and attribute names
//! come from checked rules; the kernel resolves every path beneath the root
//! (`openat2(RESOLVE_BENEATH)`, see [`crate::beneath`]), so no read leaves the tree, through
//! `..` or a link. Reads are bounded ([`MAX_ATTR`], [`MAX_UEVENT`]).
//!
//! The kernel's own sysfs (the root's filesystem is sysfs) holds only relative links inside
//! it and no FIFO or device node: there an attribute is one `openat2` and a link one
//! `readlinkat`, the agent's hot path. Any other tree (a fixture) is a stranger's: there a
//! file's type is checked on an `O_PATH` fd before it is opened, and links are read through
//! fds resolved beneath the root.
//!
//! Semantics follow systemd's sd-device, which udev rules are written against: an attribute
//! value loses its trailing newlines and stops at a NUL; a parent is the nearest ancestor
//! directory that has a `uevent` file; `subsystem`, `driver` and `module` read as the name
//! their link points to.

use std::ffi::CStr;
use std::fmt;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::Mode;
use nix::unistd::AccessFlags;

use crate::beneath::{BeneathError, Links};
use crate::uevent::devpath_is_safe;

/// The most bytes read from one attribute: sysfs serves at most a page.
pub const MAX_ATTR: usize = 4096;
/// The longest relative path built (PATH_MAX).
const MAX_PATH: usize = 4096;
/// The longest `uevent` file read (the kernel's is at most a page).
pub const MAX_UEVENT: u64 = 8192;

/// An attribute could not be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttrError {
    /// No such attribute (or the device is gone).
    Missing,
    /// It exists but could not be read (write-only, a directory, I/O error).
    Unreadable(Errno),
    /// The devpath and name do not fit in PATH_MAX, or are not a safe relative path.
    BadPath,
    /// The path, or a link on it, leads outside the tree.
    Outside,
    /// Not a regular file (a FIFO, a device node), or longer than its bound.
    NotAFile,
}

impl fmt::Display for AttrError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AttrError::Missing => f.write_str("no such attribute"),
            AttrError::Unreadable(e) => write!(f, "unreadable: {}", e.desc()),
            AttrError::BadPath => f.write_str("path too long or unsafe"),
            AttrError::Outside => f.write_str("leads outside the sysfs tree: refused"),
            AttrError::NotAFile => f.write_str("not a regular file of bounded size: refused"),
        }
    }
}

/// A sysfs tree.
#[derive(Debug)]
pub struct Sysfs {
    root: PathBuf,
    dir: OwnedFd,
    /// The root is the kernel's sysfs (not a fixture).
    kernel: bool,
    /// `openat2` is refused here (asked once: see [`Sysfs::open_at`]), so the kernel's sysfs
    /// is opened with `openat` straight away instead of two syscalls per open.
    no_openat2: bool,
    reads: AtomicU64,
}

impl Sysfs {
    /// Opens the tree at `root` (normally `/sys`).
    pub fn new(root: impl Into<PathBuf>) -> io::Result<Sysfs> {
        let root = root.into();
        let flags = OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
        let dir = nix::fcntl::open(&root, flags, Mode::empty()).map_err(|e| {
            let kind = io::Error::from(e).kind();
            io::Error::new(kind, format!("{}: {}", root.display(), e.desc()))
        })?;
        let kernel =
            nix::sys::statfs::fstatfs(&dir).is_ok_and(|f| f.filesystem_type() == nix::sys::statfs::SYSFS_MAGIC);
        let no_openat2 = kernel
            && matches!(
                crate::beneath::open_errno(&dir, Path::new("."), OFlag::O_PATH, Mode::empty(), Links::Follow),
                Err(Errno::ENOSYS | Errno::EPERM)
            );
        Ok(Sysfs { root, dir, kernel, no_openat2, reads: AtomicU64::new(0) })
    }

    /// True if the root is the kernel's sysfs (a fixture tree is read more carefully).
    pub fn is_kernel(&self) -> bool {
        self.kernel
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// How many attribute and link reads this tree has served (for benchmarks).
    pub fn reads(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
    }

    /// Reads attribute `name` of the device at `devpath` into `buf`, as sd-device does:
    /// trailing newlines removed, cut at the first NUL. Link attributes (`driver`,
    /// `subsystem`, `module`) read as the basename of their target.
    pub fn attr<'b>(&self, devpath: &str, name: &str, buf: &'b mut [u8; MAX_ATTR]) -> Result<&'b [u8], AttrError> {
        if matches!(name, "driver" | "subsystem" | "module") {
            return self.link(devpath, name, buf).ok_or(AttrError::Missing);
        }
        self.reads.fetch_add(1, Ordering::Relaxed);
        let fd = self.open_file(devpath, name)?;
        let mut len = 0;
        while len < buf.len() {
            match nix::unistd::read(fd.as_fd(), &mut buf[len..]) {
                Ok(0) => break,
                Ok(n) => len += n,
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(AttrError::Unreadable(e)),
            }
        }
        let mut value = &buf[..len];
        if let Some(nul) = value.iter().position(|&b| b == 0) {
            value = &value[..nul];
        }
        while let [rest @ .., b'\n' | b'\r'] = value {
            value = rest;
        }
        Ok(value)
    }

    /// The basename of the target of link `name` under `devpath` (`driver`, `subsystem`).
    pub fn link<'b>(&self, devpath: &str, name: &str, buf: &'b mut [u8; MAX_ATTR]) -> Option<&'b [u8]> {
        self.reads.fetch_add(1, Ordering::Relaxed);
        let mut path = [0u8; MAX_PATH];
        let cpath = rel_path(&mut path, devpath, name).ok()?;
        if !self.kernel {
            let target =
                crate::beneath::read_link(&self.dir, Path::new(OsStr::from_bytes(cpath.to_bytes())), Links::Follow)
                    .ok()?;
            let name = target.file_name()?.as_bytes();
            let n = name.len().min(buf.len());
            buf[..n].copy_from_slice(&name[..n]);
            return Some(&buf[..n]);
        }
        // SAFETY: `cpath` is NUL-terminated and lives across the call; `buf` is writable for
        // `buf.len()` bytes and readlinkat writes at most that many; `self.dir` is an open fd.
        let n = unsafe {
            nix::libc::readlinkat(
                std::os::fd::AsRawFd::as_raw_fd(&self.dir),
                cpath.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        let n = usize::try_from(n).ok().filter(|&n| n > 0 && n < buf.len())?;
        let target = &buf[..n];
        let start = target.iter().rposition(|&b| b == b'/').map_or(0, |i| i + 1);
        Some(&target[start..])
    }

    /// True if `devpath/name` exists.
    pub fn exists(&self, devpath: &str, name: &str) -> bool {
        let mut path = [0u8; MAX_PATH];
        let Ok(cpath) = rel_path(&mut path, devpath, name) else {
            return false;
        };
        if !self.kernel {
            return crate::beneath::exists(&self.dir, Path::new(OsStr::from_bytes(cpath.to_bytes())));
        }
        nix::unistd::faccessat(&self.dir, cpath, AccessFlags::F_OK, AtFlags::empty()).is_ok()
    }

    /// The nearest ancestor of `devpath` that is a device (has a `uevent` file), as
    /// sd_device_get_parent walks; None at the top of `/devices`.
    pub fn parent<'d>(&self, devpath: &'d str) -> Option<&'d str> {
        let mut path = devpath;
        loop {
            path = &path[..path.rfind('/')?];
            if path.is_empty() || path == "/devices" {
                return None;
            }
            if self.exists(path, "uevent") {
                return Some(path);
            }
        }
    }

    /// The contents of the device's `uevent` file (for coldplug and identity), at most
    /// [`MAX_UEVENT`] bytes.
    pub fn uevent_file(&self, devpath: &str) -> Result<Vec<u8>, AttrError> {
        self.read_file(devpath, "uevent", MAX_UEVENT)
    }

    /// Any regular file of a device, at most `max` bytes (for `record`).
    pub fn read_file(&self, devpath: &str, name: &str, max: u64) -> Result<Vec<u8>, AttrError> {
        let fd = self.open_file(devpath, name)?;
        let mut out = Vec::new();
        let mut file = io::Read::take(std::fs::File::from(fd), max + 1);
        io::Read::read_to_end(&mut file, &mut out)
            .map_err(|e| AttrError::Unreadable(Errno::from_raw(e.raw_os_error().unwrap_or(0))))?;
        if out.len() as u64 > max {
            return Err(AttrError::NotAFile);
        }
        Ok(out)
    }

    /// The entries of a device's directory, read beneath the root, sorted by name: regular
    /// files, links (with their target) and the rest (directories, anything else).
    pub fn entries(&self, devpath: &str) -> Vec<(String, Entry)> {
        let Some(rel) = devpath.strip_prefix('/').filter(|_| devpath_is_safe(devpath)) else {
            return Vec::new();
        };
        let Some(names) = self.list(Path::new(rel), Links::Follow) else {
            return Vec::new();
        };
        let mut out: Vec<(String, Entry)> = names
            .into_iter()
            .filter_map(|n| n.into_string().ok())
            .map(|name| {
                let path = Path::new(rel).join(&name);
                let flags = OFlag::O_PATH | OFlag::O_NOFOLLOW;
                let fd = self.open_at(&path, flags, Links::Follow);
                let mode = fd.ok().and_then(|fd| nix::sys::stat::fstat(&fd).ok()).map_or(0, |st| st.st_mode);
                let entry = match mode & nix::libc::S_IFMT {
                    nix::libc::S_IFREG => Entry::File,
                    nix::libc::S_IFLNK => self
                        .read_link(&path, Links::Follow)
                        .map_or(Entry::Other, |t| Entry::Link(Path::new(rel).join(&name), t)),
                    _ => Entry::Other,
                };
                (name, entry)
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Opens `rel` beneath the root ([`crate::beneath::open_errno`]). On the kernel's own sysfs
    /// where `openat2` is refused, plain `openat`: kernels before 5.6 have no `openat2`, and
    /// seccomp filters refuse it because they cannot see its flags, systemd's
    /// `RestrictSUIDSGID=` among them, which autoattach.service sets (systemd
    /// src/shared/seccomp-util.c `seccomp_restrict_sxid`: ENOSYS "to force programs to call
    /// open() or openat() instead"; older releases answered EPERM, which `openat2` never does
    /// for a read of sysfs). That is safe there only: every path built here is plain and
    /// relative ([`rel_path`], [`devpath_is_safe`]), and the kernel's sysfs holds only relative
    /// links that stay inside it. A fixture is never read without `openat2`.
    fn open_at(&self, rel: &Path, flags: OFlag, links: Links) -> Result<OwnedFd, Errno> {
        let plain = || nix::fcntl::openat(&self.dir, rel, flags | OFlag::O_CLOEXEC | OFlag::O_NOCTTY, Mode::empty());
        if self.no_openat2 {
            return plain();
        }
        match crate::beneath::open_errno(&self.dir, rel, flags, Mode::empty(), links) {
            Err(Errno::ENOSYS | Errno::EPERM) if self.kernel => plain(),
            r => r,
        }
    }

    /// The names in directory `rel` (see [`Sysfs::open_at`]), unsorted.
    fn list(&self, rel: &Path, links: Links) -> Option<Vec<std::ffi::OsString>> {
        let fd = self.open_at(rel, OFlag::O_RDONLY | OFlag::O_DIRECTORY, links).ok()?;
        crate::beneath::names(fd).ok()
    }

    /// The target of the link `rel` (see [`Sysfs::open_at`]).
    fn read_link(&self, rel: &Path, links: Links) -> Option<PathBuf> {
        let fd = self.open_at(rel, OFlag::O_PATH | OFlag::O_NOFOLLOW, links).ok()?;
        nix::fcntl::readlinkat(&fd, "").ok().map(PathBuf::from)
    }

    /// Opens the file `devpath/name` for reading, beneath the root: on the kernel's sysfs in
    /// one `openat2` (or `openat`, see [`Sysfs::open_at`]), in a fixture after checking it is a
    /// regular file.
    fn open_file(&self, devpath: &str, name: &str) -> Result<OwnedFd, AttrError> {
        let mut path = [0u8; MAX_PATH];
        let cpath = rel_path(&mut path, devpath, name)?;
        let flags = OFlag::O_RDONLY | OFlag::O_NONBLOCK;
        let rel = Path::new(OsStr::from_bytes(cpath.to_bytes()));
        if self.kernel {
            // Without building an error that names the path: no allocation on the agent's path.
            return self.open_at(rel, flags, Links::Follow).map_err(|e| match e {
                Errno::ENOENT | Errno::ENOTDIR => AttrError::Missing,
                Errno::EXDEV | Errno::ELOOP => AttrError::Outside,
                e => AttrError::Unreadable(e),
            });
        }
        crate::beneath::open_file(&self.dir, rel, flags, Links::Follow).map_err(|e| match e {
            BeneathError::Outside(_) => AttrError::Outside,
            BeneathError::NotAFile(..) | BeneathError::TooLong(..) => AttrError::NotAFile,
            BeneathError::Io(_, e) => match Errno::from_raw(e.raw_os_error().unwrap_or(0)) {
                Errno::ENOENT | Errno::ENOTDIR => AttrError::Missing,
                e => AttrError::Unreadable(e),
            },
            BeneathError::BadPath(_) => AttrError::BadPath,
        })
    }

    /// Every device that can be attached: block devices (`class/block`) and USB devices
    /// (`bus/usb/devices`, without interfaces), as devpaths, sorted.
    pub fn scan(&self) -> Vec<String> {
        let mut found = Vec::new();
        for (dir, keep) in [("class/block", None), ("bus/usb/devices", Some(':'))] {
            let Some(entries) = self.list(Path::new(dir), Links::Refuse) else {
                continue;
            };
            for name in entries {
                let Some(name) = name.to_str() else { continue };
                if keep.is_some_and(|c| name.contains(c)) {
                    continue;
                }
                if let Some(devpath) = self.devpath_of_link(&Path::new(dir).join(name)) {
                    found.push(devpath);
                }
            }
        }
        found.sort();
        found.dedup();
        found
    }

    /// Resolves a user's name for a device: `sda`, `/dev/sda`, a bus id `2-1`, a devpath
    /// `/devices/...` or a path `/sys/devices/...`.
    pub fn resolve(&self, name: &str) -> Option<String> {
        let name = name.strip_prefix("/dev/").unwrap_or(name);
        if let Some(rel) = Path::new(name).strip_prefix(&self.root).ok().and_then(Path::to_str) {
            let devpath = format!("/{}", rel.trim_start_matches('/'));
            return (devpath_is_safe(&devpath) && self.exists(&devpath, "uevent")).then_some(devpath);
        }
        if name.starts_with("/devices/") {
            return (devpath_is_safe(name) && self.exists(name, "uevent")).then(|| name.to_owned());
        }
        if name.is_empty() || name.contains('/') || name.starts_with('.') {
            return None;
        }
        ["class/block", "bus/usb/devices"].iter().find_map(|dir| self.devpath_of_link(&Path::new(dir).join(name)))
    }

    /// The devpath a `class/...` or `bus/.../devices` link (relative to the root) points to:
    /// its target read beneath the root and resolved lexically, which must stay inside it and
    /// name a device (`devices/.../uevent` exists).
    fn devpath_of_link(&self, link: &Path) -> Option<String> {
        let target = self.read_link(link, Links::Refuse)?;
        if !crate::beneath::link_stays_inside(link, &target) {
            return None;
        }
        let mut at: Vec<&OsStr> = link.parent()?.iter().collect();
        for c in target.components() {
            match c {
                std::path::Component::ParentDir => {
                    at.pop()?;
                }
                std::path::Component::Normal(n) => at.push(n),
                _ => {}
            }
        }
        let rel: Vec<&str> = at.iter().map(|c| c.to_str()).collect::<Option<_>>()?;
        let devpath = format!("/{}", rel.join("/"));
        let ok = devpath_is_safe(&devpath) && devpath.starts_with("/devices/") && self.exists(&devpath, "uevent");
        ok.then_some(devpath)
    }

    /// What is known of a device, for logs, `list` and `test`. Reads freely (allocates):
    /// used for matched devices and commands, not on the per-event path.
    pub fn identity(&self, devpath: &str) -> Identity {
        let mut buf = [0u8; MAX_ATTR];
        let text = |dp: &str, name: &str, buf: &mut [u8; MAX_ATTR]| self.attr(dp, name, buf).ok().map(<[u8]>::to_vec);
        let uevent = self.uevent_file(devpath).unwrap_or_default();
        let prop = |key: &str| {
            uevent
                .split(|&b| b == b'\n')
                .find_map(|l| l.strip_prefix(key.as_bytes())?.strip_prefix(b"="))
                .map(|v| String::from_utf8_lossy(v).into_owned())
        };
        let subsystem = self
            .link(devpath, "subsystem", &mut buf)
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .unwrap_or_default();
        let devtype = prop("DEVTYPE").unwrap_or_default();
        let block = (subsystem == "block").then(|| BlockId {
            name: prop("DEVNAME").unwrap_or_else(|| crate::uevent::kernel_name(devpath).to_owned()),
            size: text(devpath, "size", &mut buf)
                .and_then(|s| String::from_utf8(s).ok()?.trim().parse().ok())
                .unwrap_or(0),
        });
        let usb = self.usb_device_of(devpath).map(|dp| UsbId {
            busid: crate::uevent::kernel_name(&dp).to_owned(),
            vendor: text(&dp, "idVendor", &mut buf).unwrap_or_default(),
            product_id: text(&dp, "idProduct", &mut buf).unwrap_or_default(),
            serial: text(&dp, "serial", &mut buf),
            manufacturer: text(&dp, "manufacturer", &mut buf),
            product: text(&dp, "product", &mut buf),
            devpath: dp,
        });
        Identity { devpath: devpath.to_owned(), subsystem, devtype, block, usb }
    }

    /// The USB device (`usb_device`) at or above `devpath`, if any.
    pub fn usb_device_of(&self, devpath: &str) -> Option<String> {
        let mut buf = [0u8; MAX_ATTR];
        let mut at = Some(devpath);
        while let Some(dp) = at {
            if self.link(dp, "subsystem", &mut buf) == Some(b"usb") && self.exists(dp, "idVendor") {
                return Some(dp.to_owned());
            }
            at = self.parent(dp);
        }
        None
    }

    /// udev's ID_USB_INTERFACES for the `usb_device` at `usb_devpath` (`:080650:`, or empty
    /// when udev sets none): every distinct interface triple in its `descriptors`, in
    /// descriptor order, alternate settings and other configurations included, exactly as
    /// systemd's `usb_id` computes it (see [`crate::identity`]).
    pub fn usb_interfaces(&self, usb_devpath: &str) -> String {
        let interfaces = crate::identity::usb_interfaces(self, usb_devpath).unwrap_or_default();
        String::from_utf8_lossy(&interfaces).into_owned()
    }

    /// One `read()` of `devpath/name` into `buf`, as udev reads binary attributes: the bytes
    /// as they are (no NUL cut, no newline removed), at most what one read returns (kernfs
    /// serves a binary attribute a page per read).
    pub fn read_once(&self, devpath: &str, name: &str, buf: &mut [u8]) -> Result<usize, AttrError> {
        self.reads.fetch_add(1, Ordering::Relaxed);
        let fd = self.open_file(devpath, name)?;
        loop {
            match nix::unistd::read(fd.as_fd(), buf) {
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(AttrError::Unreadable(e)),
                Ok(n) => return Ok(n),
            }
        }
    }
}

/// Builds `devpath/name` (without the leading `/`) NUL-terminated in `buf`.
fn rel_path<'b>(buf: &'b mut [u8; MAX_PATH], devpath: &str, name: &str) -> Result<&'b CStr, AttrError> {
    let devpath = devpath.strip_prefix('/').ok_or(AttrError::BadPath)?;
    let len = devpath.len() + 1 + name.len();
    if len >= buf.len() || name.is_empty() || name.starts_with('/') || name.contains('\0') {
        return Err(AttrError::BadPath);
    }
    buf[..devpath.len()].copy_from_slice(devpath.as_bytes());
    buf[devpath.len()] = b'/';
    buf[devpath.len() + 1..len].copy_from_slice(name.as_bytes());
    buf[len] = 0;
    CStr::from_bytes_with_nul(&buf[..=len]).map_err(|_| AttrError::BadPath)
}

/// One entry of a device's directory (see [`Sysfs::entries`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry {
    File,
    /// A symbolic link: its path relative to the root, and its target.
    Link(PathBuf, PathBuf),
    Other,
}

/// What an error opening or reading a device node (the first-sector read) says about the
/// device, so that a permission problem is reported as one and retried, not taken for "no
/// media".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeProblem {
    /// EACCES, EPERM: the agent's user may not read the node (a udev-less system leaves nodes
    /// root:disk 0660): retry until the timeout, then say what to fix.
    Permission,
    /// ENOMEDIUM, EIO, a short read: no readable media yet; the kernel announces media.
    NoMedia,
    /// ENOENT, ENODEV, ENXIO: the node or the device is gone.
    Gone,
    /// Anything else: retry until the timeout.
    Other,
}

/// Classifies an error from opening or reading a device node.
pub fn classify_node_error(e: &io::Error) -> NodeProblem {
    match e.raw_os_error().map(Errno::from_raw) {
        Some(Errno::EACCES | Errno::EPERM) => NodeProblem::Permission,
        Some(Errno::ENOMEDIUM | Errno::EIO) => NodeProblem::NoMedia,
        Some(Errno::ENOENT | Errno::ENODEV | Errno::ENXIO) => NodeProblem::Gone,
        _ => NodeProblem::Other,
    }
}

/// A device's identity, for people.
#[derive(Clone, Debug, Default)]
pub struct Identity {
    pub devpath: String,
    pub subsystem: String,
    pub devtype: String,
    pub block: Option<BlockId>,
    pub usb: Option<UsbId>,
}

#[derive(Clone, Debug, Default)]
pub struct BlockId {
    /// The device node name under /dev (`sdb1`).
    pub name: String,
    /// Size in 512-byte sectors (0: no media).
    pub size: u64,
}

#[derive(Clone, Debug, Default)]
pub struct UsbId {
    pub devpath: String,
    /// The USB bus id (`2-1.4`): the usb_device's kernel name.
    pub busid: String,
    pub vendor: Vec<u8>,
    pub product_id: Vec<u8>,
    pub serial: Option<Vec<u8>>,
    pub manufacturer: Option<Vec<u8>>,
    pub product: Option<Vec<u8>>,
}

impl fmt::Display for Identity {
    /// `sdb1 46f4:0001 "QEMU" "QEMU USB HARDDRIVE" serial "ABC123"`, every device string
    /// escaped (see [`crate::log::Escaped`]).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use crate::log::Escaped;
        match (&self.block, &self.usb) {
            (Some(b), _) => write!(f, "{}", Escaped(b.name.as_bytes()))?,
            (None, Some(u)) => write!(f, "usb {}", Escaped(u.busid.as_bytes()))?,
            (None, None) => write!(f, "{}", Escaped(crate::uevent::kernel_name(&self.devpath).as_bytes()))?,
        }
        if let Some(u) = &self.usb {
            write!(f, " {}:{}", Escaped(&u.vendor), Escaped(&u.product_id))?;
            for s in [&u.manufacturer, &u.product].into_iter().flatten() {
                write!(f, " \"{}\"", Escaped(s))?;
            }
            if let Some(s) = &u.serial {
                write!(f, " serial \"{}\"", Escaped(s))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Installs a seccomp filter on this process that refuses `openat2` with ENOSYS, as
    /// systemd's `RestrictSUIDSGID=` does (src/shared/seccomp-util.c `seccomp_restrict_sxid`).
    fn refuse_openat2() {
        use nix::libc::{self, sock_filter};
        let op = |code: u32, jt, jf, k| sock_filter { code: code as u16, jt, jf, k };
        let filter = [
            op(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, 0, 0, 0), // seccomp_data.nr
            op(libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K, 0, 1, libc::SYS_openat2 as u32),
            op(libc::BPF_RET | libc::BPF_K, 0, 0, libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32),
            op(libc::BPF_RET | libc::BPF_K, 0, 0, libc::SECCOMP_RET_ALLOW),
        ];
        let prog = libc::sock_fprog { len: filter.len() as u16, filter: filter.as_ptr().cast_mut() };
        // SAFETY: a plain system call with integer arguments.
        unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
        // SAFETY: `prog` and the `filter` it points to outlive the call (the kernel copies them).
        let r = unsafe { libc::syscall(libc::SYS_seccomp, libc::SECCOMP_SET_MODE_FILTER, 0, &raw const prog) };
        assert_eq!(r, 0, "seccomp: {}", io::Error::last_os_error());
    }

    /// What the agent reads of the kernel's sysfs: the devices present and each one's size.
    fn kernel_view() -> Vec<String> {
        let sysfs = Sysfs::new("/sys").expect("/sys");
        let mut buf = [0u8; MAX_ATTR];
        let devices = sysfs.scan();
        let sizes = devices.iter().filter_map(|d| sysfs.attr(d, "size", &mut buf).ok().map(<[u8]>::to_vec));
        devices.iter().cloned().chain(sizes.map(|s| String::from_utf8_lossy(&s).into_owned())).collect()
    }

    /// Under autoattach.service, `openat2` fails with ENOSYS: the agent still reads the kernel's
    /// sysfs (plain `openat` there), and still refuses to read a fixture without `openat2`. The
    /// filter is installed in a child (this test binary run again for this test alone).
    #[test]
    fn the_kernel_sysfs_is_read_where_openat2_is_refused() {
        const CHILD: &str = "AUTOATTACH_TEST_NO_OPENAT2";
        if std::env::var_os(CHILD).is_some() {
            refuse_openat2();
            let fixture = crate::testing::TempDir::new("no-openat2");
            std::fs::create_dir_all(fixture.path().join("class/block")).unwrap();
            let err =
                crate::beneath::list(std::fs::File::open(fixture.path()).unwrap(), Path::new("class"), Links::Refuse);
            assert!(err.is_err_and(|e| e.to_string().contains("Function not implemented")), "openat2 is refused");
            assert!(Sysfs::new(fixture.path()).unwrap().list(Path::new("class"), Links::Refuse).is_none());
            println!("VIEW {:?}", kernel_view());
            return;
        }
        let want = kernel_view();
        assert!(!want.is_empty(), "this machine's /sys has no block or USB device to compare");
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "sysfs::tests::the_kernel_sysfs_is_read_where_openat2_is_refused", "--nocapture"])
            .env(CHILD, "1")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
        assert!(
            stdout.contains(&format!("VIEW {want:?}")),
            "without openat2 the view differs:\n{stdout}\nwant {want:?}"
        );
    }

    #[test]
    fn node_errors_are_classified() {
        let e = |n| io::Error::from_raw_os_error(n);
        assert_eq!(classify_node_error(&e(nix::libc::EACCES)), NodeProblem::Permission);
        assert_eq!(classify_node_error(&e(nix::libc::EPERM)), NodeProblem::Permission);
        assert_eq!(classify_node_error(&e(nix::libc::ENOMEDIUM)), NodeProblem::NoMedia);
        assert_eq!(classify_node_error(&e(nix::libc::ENXIO)), NodeProblem::Gone);
        assert_eq!(classify_node_error(&e(nix::libc::EBUSY)), NodeProblem::Other);
    }

    /// A fixture's attribute that leaves the tree, is a FIFO or is endless is refused, never
    /// read (the kernel's sysfs is detected and read the quick way).
    #[test]
    fn fixture_reads_stay_beneath_the_root() {
        let tree = crate::testing::Tree::stick(b"S1");
        let sysfs = Sysfs::new(tree.root()).unwrap();
        assert!(!sysfs.is_kernel());
        assert!(Sysfs::new("/sys").unwrap().is_kernel());
        let dev = tree.root().join(&crate::testing::STICK_USB[1..]);
        std::os::unix::fs::symlink("/etc/hostname", dev.join("outside")).unwrap();
        std::os::unix::fs::symlink("../../../../../../../etc/hostname", dev.join("escape")).unwrap();
        std::os::unix::fs::symlink("/dev/zero", dev.join("zero")).unwrap();
        nix::unistd::mkfifo(&dev.join("fifo"), Mode::from_bits_truncate(0o644)).unwrap();
        let mut buf = [0u8; MAX_ATTR];
        for name in ["outside", "escape", "zero"] {
            assert_eq!(sysfs.attr(crate::testing::STICK_USB, name, &mut buf), Err(AttrError::Outside), "{name}");
        }
        assert_eq!(sysfs.attr(crate::testing::STICK_USB, "fifo", &mut buf), Err(AttrError::NotAFile));
        assert_eq!(sysfs.attr(crate::testing::STICK_USB, "idVendor", &mut buf), Ok(&b"46f4"[..]));
        std::fs::write(dev.join("big"), vec![b'x'; MAX_UEVENT as usize + 1]).unwrap();
        assert_eq!(sysfs.read_file(crate::testing::STICK_USB, "big", MAX_UEVENT), Err(AttrError::NotAFile));
    }
}
