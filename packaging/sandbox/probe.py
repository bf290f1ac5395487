#!/usr/bin/python3
# Probe of the autoattach.service sandbox, run by packaging/sandbox-test.sh as the unit's
# ExecStart (a drop-in): does what the agent and its children need, and tries what the
# sandbox must deny. One line per probe: "PROBE ok|FAIL name detail". Then it waits for
# uevents and signals, reporting each. PROBE_MODE=exitN exits with N at once instead.
import ctypes, errno, grp, os, pwd, select, signal, socket, struct, sys, time

MODE = os.environ.get("PROBE_MODE", "full")
if MODE.startswith("exit"):
    print(f"PROBE exiting with {MODE[4:]}", flush=True)
    sys.exit(int(MODE[4:]))
def rep(ok, name, detail=""):
    print(f"PROBE {'ok  ' if ok else 'FAIL'} {name} {detail}", flush=True)
def expect_ok(name, fn):
    try:
        r = fn(); rep(True, name, "" if r is None else str(r))
    except Exception as e:
        rep(False, name, repr(e))
def expect_err(name, fn, errnos):
    try:
        fn(); rep(False, name, "succeeded, must be denied")
    except OSError as e:
        rep(e.errno in errnos, name, f"denied: {errno.errorcode.get(e.errno, e.errno)}")

# identity and capabilities
me = pwd.getpwuid(os.getuid()).pw_name
groups = sorted(grp.getgrgid(g).gr_name for g in os.getgroups())
rep(me == "autoattach" and os.getuid() != 0, "user", f"{me} uid={os.getuid()}")
rep({"disk", "cdrom", "qubes"} <= set(groups), "groups", ",".join(groups))
caps = {l.split(":")[0]: int(l.split()[1], 16) for l in open("/proc/self/status") if l.startswith("Cap")}
rep(caps["CapEff"] == 1 << 12 and caps["CapBnd"] == 1 << 12, "capabilities",
    f"eff={caps['CapEff']:#x} bnd={caps['CapBnd']:#x} amb={caps['CapAmb']:#x} (CAP_NET_ADMIN=0x1000)")

# the uevent socket
nl = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 15)
SO_RCVBUFFORCE = 33
expect_ok("netlink SO_PASSCRED", lambda: nl.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1))
expect_ok("netlink SO_RCVBUFFORCE 32 MiB", lambda: nl.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 32 << 20))
rep(nl.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) >= 32 << 20, "netlink receive buffer",
    str(nl.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)))
expect_ok("netlink bind group 1", lambda: nl.bind((0, 1)))
expect_err("AF_INET socket", lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM), {errno.EAFNOSUPPORT, errno.EPERM})
expect_err("AF_PACKET socket", lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW), {errno.EAFNOSUPPORT, errno.EPERM})
ifaces = sorted(l.split(":")[0].strip() for l in open("/proc/self/net/dev").readlines()[2:])
rep(ifaces == ["lo"], "network namespace is private", ",".join(ifaces))

# what the children need: AF_UNIX sockets under a read-only /run/qubes
def connect(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); s.connect(path); s.close()
expect_ok("connect /run/qubes/qrexec-agent", lambda: connect("/run/qubes/qrexec-agent"))
expect_ok("connect /run/qubes/qubesdb.sock", lambda: connect("/run/qubes/qubesdb.sock"))
expect_err("create a file in /run/qubes (group qubes may write there)", lambda: open("/run/qubes/x", "w"), {errno.EROFS})
expect_err("create a file in /etc", lambda: open("/etc/x", "w"), {errno.EROFS, errno.EACCES})
expect_ok("write /tmp (private)", lambda: open("/tmp/x", "w").write("x"))

# files: rules readable, user data not
expect_ok("read /etc/autoattach/rules.d/README", lambda: len(open("/etc/autoattach/rules.d/README").read()))
expect_ok("read /rw/config/autoattach/test.rules", lambda: len(open("/rw/config/autoattach/test.rules").read()))
expect_err("read /rw/home/user/secret", lambda: open("/rw/home/user/secret").read(), {errno.EACCES, errno.ENOENT})
expect_err("list /home/user", lambda: os.listdir("/home/user"), {errno.EACCES, errno.ENOENT})
expect_err("read /root", lambda: os.listdir("/root"), {errno.EACCES, errno.ENOENT})

# devices: USB-like block devices read-only, nothing else
def read_first_sector(path):
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return f"read {len(os.read(fd, 512))} bytes"
    finally:
        os.close(fd)
expect_ok("open /dev/loop3 read-only, read first sector", lambda: read_first_sector("/dev/loop3"))
expect_err("open /dev/loop3 read-write", lambda: os.open("/dev/loop3", os.O_RDWR), {errno.EPERM})
expect_err("open /dev/vda (the qube's own disk) read-only", lambda: os.open("/dev/vda", os.O_RDONLY), {errno.EPERM})
expect_err("open /dev/loop-control", lambda: os.open("/dev/loop-control", os.O_RDWR), {errno.EPERM, errno.EACCES})
expect_ok("open /dev/null read-write", lambda: os.close(os.open("/dev/null", os.O_RDWR)))
expect_ok("read /sys/class/block/loop3/size", lambda: open("/sys/class/block/loop3/size").read().strip())
expect_err("write /sys/class/block/loop3/uevent", lambda: open("/sys/class/block/loop3/uevent", "w").write("change"), {errno.EROFS, errno.EACCES})

# system calls
libc = ctypes.CDLL(None, use_errno=True)
def call(fn, *args):
    r = fn(*args)
    if r < 0:
        e = ctypes.get_errno(); raise OSError(e, os.strerror(e))
    return r
mask = ctypes.c_uint64((1 << (signal.SIGHUP - 1)) | (1 << (signal.SIGTERM - 1)))
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP, signal.SIGTERM})
sfd = call(libc.signalfd, -1, ctypes.byref(mask), os.O_CLOEXEC | os.O_NONBLOCK)
rep(True, "signalfd", f"fd {sfd}")
expect_err("mount", lambda: call(libc.mount, b"none", b"/tmp", b"tmpfs", 0, None), {errno.EPERM})
expect_err("unshare(CLONE_NEWUSER)", lambda: call(libc.unshare, 0x10000000), {errno.EPERM})
expect_err("setuid(0)", lambda: os.setuid(0), {errno.EPERM})
expect_err("setpriority (nice -5)", lambda: os.setpriority(os.PRIO_PROCESS, 0, -5), {errno.EPERM, errno.EACCES})
expect_err("kill(1, SIGTERM)", lambda: os.kill(1, signal.SIGTERM), {errno.EPERM})
expect_err("mmap write+exec", lambda: call(libc.mprotect, ctypes.c_void_p(libc.valloc(4096)), 4096, 7), {errno.EACCES, errno.EPERM})
expect_ok("prctl PR_CAP_AMBIENT_CLEAR_ALL", lambda: call(libc.prctl, 47, 4, 0, 0, 0))
# RestrictSUIDSGID= refuses openat2 whatever its flags (systemd src/shared/seccomp-util.c
# seccomp_restrict_sxid): the agent reads the kernel's sysfs with openat instead.
open_how = (ctypes.c_uint64 * 3)(os.O_RDONLY | os.O_CLOEXEC, 0, 0x08)  # RESOLVE_BENEATH
expect_err("openat2 (RestrictSUIDSGID=; the agent falls back to openat on sysfs)",
           lambda: call(libc.syscall, 437, -100, b"sys", ctypes.byref(open_how), 24), {errno.ENOSYS})
def drop_all_caps():
    hdr = (ctypes.c_uint32 * 2)(0x20080522, 0)
    data = (ctypes.c_uint32 * 6)()
    call(libc.capset, hdr, data)
    return [l.strip() for l in open("/proc/self/status") if l.startswith("CapEff")][0]

# a detached child, as the agent spawns qrexec-client-vm: fork, setsid, exec
pid = os.fork()
if pid == 0:
    # A blocked signal stays blocked across exec: unblock what signalfd needed blocked.
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    os.setsid()
    null = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.execv("/bin/sleep", ["sleep", "1000"])
rep(True, "spawned detached child", f"pid {pid} (sleep 1000)")
r = os.posix_spawn("/bin/true", ["true"], os.environ)
rep(os.waitpid(r, 0)[1] == 0, "posix_spawn /bin/true")

expect_ok("capset drops CAP_NET_ADMIN after use", drop_all_caps)
print("PROBE ready", flush=True)
poll = select.poll()
poll.register(nl, select.POLLIN)
poll.register(sfd, select.POLLIN)
while True:
    for fd, _ in poll.poll(1000):
        if fd == sfd:
            signo = struct.unpack("I", os.read(sfd, 128)[:4])[0]
            print(f"PROBE signal {signal.Signals(signo).name}", flush=True)
            if signo == signal.SIGTERM:
                sys.exit(0)
        else:
            data, anc, _, addr = nl.recvmsg(8192, socket.CMSG_SPACE(12))
            creds = [struct.unpack("iII", c[2][:12]) for c in anc if c[1] == socket.SCM_CREDENTIALS]
            head = data.split(b"\0")[0].decode()
            print(f"PROBE uevent {head} from portid {addr[0]} group {addr[1]} creds(pid,uid,gid)={creds}", flush=True)
    try:
        os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
        pass
