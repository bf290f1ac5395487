//! The kernel uevent socket: NETLINK_KOBJECT_UEVENT, multicast group 1, kernel senders only.
//!
//! Only the kernel may feed the agent. A datagram is accepted only if its source address has
//! portid 0 and group mask 1, and its SCM_CREDENTIALS say uid 0 and pid 0. The kernel sends
//! exactly that (lib/kobject_uevent.c, alloc_uevent_skb); a process that injects an event
//! through the kernel (uevent_net_rcv_skb, CAP_SYS_ADMIN) gets portid 0 but keeps its own pid,
//! and a process multicasting to group 1 itself has its own portid. Both are refused. The
//! udev group (2) is never joined.
//!
//! The receive buffer absorbs bursts: [`UeventSocket::open`] asks SO_RCVBUFFORCE
//! (CAP_NET_ADMIN) for [`DEFAULT_RCVBUF`] and falls back to SO_RCVBUF. When it overflows
//! anyway, `recv` reports [`Received::Overflow`] (ENOBUFS) and the agent resyncs from sysfs,
//! which is the real defence: the buffer only has to make overflows rare, not impossible.
//!
//! The fd is an [`OwnedFd`] held here and never cloned; `recv` fills the caller's buffer with
//! one `recvmsg` and allocates nothing.

use std::fmt;
use std::io;
use std::mem::{size_of, zeroed};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd};

use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_KOBJECT_UEVENT};
use nix::errno::Errno;
use nix::libc;
use nix::sys::socket::{getsockopt, setsockopt, sockopt};

/// The kernel's uevent multicast group (udev's own rebroadcasts use group 2).
pub const KERNEL_GROUP: u32 = 1;

/// Receive buffer size asked for by default: 8 MiB, which the kernel doubles for its
/// bookkeeping to 16 MiB, room for about 20,000 small uevents (each costs about 832 bytes of
/// buffer) even while the agent is not reading. The memory is unswappable, and taken only
/// while events wait: 64 MiB (128 MiB counted) would be a third of a 400 MB sys-usb at worst.
/// A storm beyond it costs a resync, not lost devices (tests/reliability.rs).
pub const DEFAULT_RCVBUF: usize = 8 << 20;

/// Who sent a refused datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sender {
    pub portid: u32,
    pub groups: u32,
    /// (pid, uid) from SCM_CREDENTIALS, if present.
    pub creds: Option<(i32, u32)>,
}

impl fmt::Display for Sender {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "portid {} groups {:#x}", self.portid, self.groups)?;
        match self.creds {
            Some((pid, uid)) => write!(f, " pid {pid} uid {uid}"),
            None => f.write_str(" without credentials"),
        }
    }
}

/// What one receive produced.
#[derive(Debug)]
pub enum Received<'b> {
    /// A datagram from the kernel, in the caller's buffer.
    Kernel(&'b [u8]),
    /// A datagram from someone else: drop it and log who.
    Refused(Sender),
    /// A datagram larger than the buffer (its real length): dropped.
    Truncated(usize),
    /// ENOBUFS: the kernel dropped events because the receive buffer was full.
    Overflow,
    /// Nothing to read now.
    Empty,
}

/// Opening the socket failed.
#[derive(Debug)]
pub struct OpenError {
    pub step: &'static str,
    pub source: io::Error,
}

impl fmt::Display for OpenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "uevent socket: {}: {}", self.step, self.source)
    }
}

impl std::error::Error for OpenError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// A bound NETLINK_KOBJECT_UEVENT socket.
#[derive(Debug)]
pub struct UeventSocket {
    fd: OwnedFd,
    rcvbuf: usize,
    forced: bool,
}

impl UeventSocket {
    /// Opens a non-blocking socket bound to the kernel group, with credentials passing on and
    /// a receive buffer of about `rcvbuf` bytes (as large as permitted).
    pub fn open(rcvbuf: usize) -> Result<UeventSocket, OpenError> {
        let err = |step| move |source| OpenError { step, source };
        let mut socket = Socket::new(NETLINK_KOBJECT_UEVENT).map_err(err("socket"))?;
        socket.bind(&SocketAddr::new(0, KERNEL_GROUP)).map_err(err("bind to group 1"))?;
        socket.set_non_blocking(true).map_err(err("set non-blocking"))?;
        // SAFETY: `into_raw_fd` gives up the socket's only owner (it was created above with
        // SOCK_CLOEXEC and never shared), so the OwnedFd becomes the sole owner of a valid fd.
        let fd = unsafe { OwnedFd::from_raw_fd(socket.into_raw_fd()) };
        setsockopt(&fd, sockopt::PassCred, &true).map_err(|e| err("SO_PASSCRED")(e.into()))?;
        let forced = setsockopt(&fd, sockopt::RcvBufForce, &rcvbuf).is_ok();
        if !forced {
            // Without CAP_NET_ADMIN the kernel caps this at net.core.rmem_max.
            setsockopt(&fd, sockopt::RcvBuf, &rcvbuf).map_err(|e| err("SO_RCVBUF")(e.into()))?;
        }
        let rcvbuf = getsockopt(&fd, sockopt::RcvBuf).map_err(|e| err("SO_RCVBUF")(e.into()))?;
        Ok(UeventSocket { fd, rcvbuf, forced })
    }

    /// The receive buffer the kernel granted (it doubles the request for bookkeeping), and
    /// whether SO_RCVBUFFORCE was allowed.
    pub fn rcvbuf(&self) -> (usize, bool) {
        (self.rcvbuf, self.forced)
    }

    /// Receives one datagram into `buf` without blocking.
    pub fn recv<'b>(&self, buf: &'b mut [u8]) -> io::Result<Received<'b>> {
        let (len, flags, addr, creds) = loop {
            match recvmsg(self.fd.as_fd(), buf) {
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => return Ok(Received::Empty),
                Err(Errno::ENOBUFS) => return Ok(Received::Overflow),
                Err(e) => return Err(e.into()),
                Ok(got) => break got,
            }
        };
        if flags & libc::MSG_TRUNC != 0 || len > buf.len() {
            return Ok(Received::Truncated(len));
        }
        let sender = Sender { portid: addr.nl_pid, groups: addr.nl_groups, creds: creds.map(|c| (c.pid, c.uid)) };
        let from_kernel = sender.portid == 0 && sender.groups == KERNEL_GROUP && sender.creds == Some((0, 0));
        Ok(if from_kernel { Received::Kernel(&buf[..len]) } else { Received::Refused(sender) })
    }
}

impl AsFd for UeventSocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Control buffer for one `struct ucred`, aligned for `cmsghdr`.
#[repr(C, align(8))]
struct CmsgBuf([u8; 64]);

/// One `recvmsg(MSG_TRUNC)`: the datagram's real length, the message flags, the source
/// address and the sender's credentials.
fn recvmsg(fd: BorrowedFd<'_>, buf: &mut [u8]) -> Result<(usize, i32, libc::sockaddr_nl, Option<libc::ucred>), Errno> {
    // SAFETY: sockaddr_nl is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_nl = unsafe { zeroed() };
    let mut control = CmsgBuf([0; 64]);
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // SAFETY: msghdr is plain old data; all-zero is a valid value, fields are set below.
    let mut msg: libc::msghdr = unsafe { zeroed() };
    msg.msg_name = (&raw mut addr).cast();
    msg.msg_namelen = size_of::<libc::sockaddr_nl>() as libc::socklen_t;
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.0.as_mut_ptr().cast();
    // size_t on glibc, socklen_t on musl; 64 fits either.
    msg.msg_controllen = control.0.len() as _;
    // SAFETY: `msg` points at `addr`, `iov` (which covers exactly `buf`) and `control`, all
    // live and writable for the sizes given; the kernel writes at most those sizes.
    let n = unsafe { libc::recvmsg(fd.as_raw_fd(), &mut msg, libc::MSG_DONTWAIT | libc::MSG_TRUNC) };
    let len = usize::try_from(n).map_err(|_| Errno::last())?;
    Ok((len, msg.msg_flags, addr, credentials(&msg)))
}

/// The SCM_CREDENTIALS control message of a received `msg`, if any.
fn credentials(msg: &libc::msghdr) -> Option<libc::ucred> {
    // SAFETY: `msg` was filled by recvmsg; CMSG_FIRSTHDR/NXTHDR only walk within
    // msg_control..msg_control+msg_controllen, which the kernel set to what it wrote.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(msg) };
    while !cmsg.is_null() {
        // SAFETY: `cmsg` is non-null and points at a complete cmsghdr inside the buffer.
        let hdr = unsafe { &*cmsg };
        let want = size_of::<libc::ucred>() as u32;
        // SAFETY: CMSG_LEN is a pure computation.
        let full = unsafe { libc::CMSG_LEN(want) } as usize;
        #[allow(clippy::unnecessary_cast)] // size_t on glibc, socklen_t on musl
        let len = hdr.cmsg_len as usize;
        if hdr.cmsg_level == libc::SOL_SOCKET && hdr.cmsg_type == libc::SCM_CREDENTIALS && len >= full {
            // SAFETY: the header says its data holds a whole ucred; read_unaligned copies it
            // without assuming the data pointer is aligned for ucred.
            let data = unsafe { libc::CMSG_DATA(cmsg) };
            // SAFETY: see above: `data` points at size_of::<ucred>() readable bytes.
            return Some(unsafe { data.cast::<libc::ucred>().read_unaligned() });
        }
        // SAFETY: as for CMSG_FIRSTHDR: the walk stays inside the control buffer.
        cmsg = unsafe { libc::CMSG_NXTHDR(msg, cmsg) };
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Any process may listen to kernel uevents; root may ask for a forced buffer.
    #[test]
    fn opens_and_reports_its_buffer() {
        let s = UeventSocket::open(DEFAULT_RCVBUF).expect("open uevent socket");
        let (size, forced) = s.rcvbuf();
        assert!(size > 0);
        if nix::unistd::geteuid().is_root() {
            assert!(forced, "root may use SO_RCVBUFFORCE");
            assert!(size >= DEFAULT_RCVBUF, "{size}");
        }
        let mut buf = [0u8; 64];
        // Whatever the machine is doing, a receive never blocks and never errors.
        assert!(s.recv(&mut buf).is_ok());
    }

    /// A datagram sent by a process straight to our port is refused (portid, groups, pid).
    #[test]
    fn refuses_a_unicast_from_a_process() {
        let s = UeventSocket::open(1 << 20).unwrap();
        // SAFETY: sockaddr_nl is plain old data.
        let mut ours: libc::sockaddr_nl = unsafe { zeroed() };
        let mut len = size_of::<libc::sockaddr_nl>() as libc::socklen_t;
        // SAFETY: `ours`/`len` are valid for writing a sockaddr_nl; the fd is open.
        let rc = unsafe { libc::getsockname(s.fd.as_raw_fd(), (&raw mut ours).cast(), &mut len) };
        assert_eq!(rc, 0);
        let mut sender = Socket::new(NETLINK_KOBJECT_UEVENT).unwrap();
        sender.bind_auto().unwrap();
        let forged = crate::testing::datagram("add", "/devices/virtual/block/loop9", "block", &[]);
        sender.send_to(&forged, &SocketAddr::new(ours.nl_pid, 0), 0).unwrap();
        let mut buf = [0u8; 8192];
        for _ in 0..1000 {
            match s.recv(&mut buf).unwrap() {
                Received::Refused(who) => {
                    assert_ne!(who.portid, 0);
                    assert_eq!(who.groups, 0);
                    assert_eq!(who.creds.map(|c| c.0), Some(std::process::id() as i32));
                    return;
                }
                Received::Kernel(_) => continue, // a real event raced in
                Received::Empty => std::thread::sleep(std::time::Duration::from_millis(1)),
                other => panic!("{other:?}"),
            }
        }
        panic!("the forged datagram never arrived");
    }
}
