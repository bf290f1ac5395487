#!/usr/bin/python3
# Stand-in for qubes-qrexec-agent and qubesdb-daemon in packaging/sandbox-test.sh:
# world-connectable sockets in /run/qubes (the real daemons bind them under umask 0),
# and /run/qubes made as qubes-sysinit makes it (0775 root:qubes).
import grp, os, select, socket
os.makedirs("/run/qubes", exist_ok=True)
os.chown("/run/qubes", 0, grp.getgrnam("qubes").gr_gid)
os.chmod("/run/qubes", 0o775)
os.makedirs("/run/qubes-service", exist_ok=True)
os.umask(0)
socks = []
for name in ("qrexec-agent", "qubesdb.sock"):
    path = "/run/qubes/" + name
    if os.path.exists(path):
        os.unlink(path)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path); s.listen(8); socks.append(s)
print("fake agent listening", flush=True)
while True:
    for s in select.select(socks, [], [])[0]:
        c, _ = s.accept()
        print("connection on", s.getsockname(), flush=True)
        c.close()
