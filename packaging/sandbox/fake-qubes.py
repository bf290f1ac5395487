#!/usr/bin/python3
# Stand-in for qubes-qrexec-agent in packaging/sandbox-test.sh: its world-connectable
# socket /run/qubes/qrexec-agent (the real daemon binds it under umask 0), which accepts and
# closes connections (the sandbox's probe only checks that the unit may connect to it), and
# /run/qubes made as qubes-sysinit makes it (0775 root:qubes). qubesdb is not faked here:
# qubes-db.service runs the project's qubesdb daemon (tests/support/qubesdb-standin.c).
import grp, os, socket
os.makedirs("/run/qubes", exist_ok=True)
os.chown("/run/qubes", 0, grp.getgrnam("qubes").gr_gid)
os.chmod("/run/qubes", 0o775)
os.makedirs("/run/qubes-service", exist_ok=True)
os.umask(0)
path = "/run/qubes/qrexec-agent"
if os.path.exists(path):
    os.unlink(path)
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(path)
s.listen(8)
print("fake qrexec agent listening", flush=True)
while True:
    c, _ = s.accept()
    print("connection on", path, flush=True)
    c.close()
