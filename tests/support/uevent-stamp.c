/*
 * Timestamps kernel uevents, for the qemu test's latency measurement (tests/qemu.rs).
 *
 *     uevent-stamp FILE
 * binds a NETLINK_KOBJECT_UEVENT socket to the kernel's group 1, appends
 *     <CLOCK_MONOTONIC ns> listening
 * to FILE once it is bound (so a harness knows no later event is missed), then one line
 *     <CLOCK_MONOTONIC ns> ACTION@DEVPATH
 * per event, the time taken right after recv() returns. Each line is one O_APPEND write.
 * Same clock as tests/support/standin-client.c, so the two logs subtract. It runs until killed;
 * it exits 1 if the socket cannot be set up or FILE cannot be written.
 * Build: cc -O2 -static -o uevent-stamp uevent-stamp.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/netlink.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static long long now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (long long)t.tv_sec * 1000000000LL + t.tv_nsec;
}

static int append(int fd, long long ns, const char *what)
{
    char line[4200];
    int len = snprintf(line, sizeof line, "%lld %s\n", ns, what);
    if (len > (int)sizeof line - 1)
        len = (int)sizeof line - 1;
    return write(fd, line, (size_t)len) == len ? 0 : -1;
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: uevent-stamp FILE\n");
        return 2;
    }
    int out = open(argv[1], O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    int sock = socket(AF_NETLINK, SOCK_DGRAM | SOCK_CLOEXEC, NETLINK_KOBJECT_UEVENT);
    if (out < 0 || sock < 0) {
        perror("uevent-stamp: open or socket");
        return 1;
    }
    /* A few MiB so a burst of events during a plug is never dropped (root may force it). */
    int size = 8 << 20;
    if (setsockopt(sock, SOL_SOCKET, SO_RCVBUFFORCE, &size, sizeof size) < 0)
        setsockopt(sock, SOL_SOCKET, SO_RCVBUF, &size, sizeof size);
    struct sockaddr_nl addr = { .nl_family = AF_NETLINK, .nl_pid = 0, .nl_groups = 1 };
    if (bind(sock, (struct sockaddr *)&addr, sizeof addr) < 0) {
        perror("uevent-stamp: bind");
        return 1;
    }
    if (append(out, now_ns(), "listening") < 0)
        return 1;

    char buf[8192];
    for (;;) {
        ssize_t n = recv(sock, buf, sizeof buf - 1, 0);
        long long ns = now_ns();
        if (n < 0) {
            if (errno == EINTR)
                continue;
            /* ENOBUFS: events were lost; say so in the log rather than stop. */
            if (append(out, ns, errno == ENOBUFS ? "ENOBUFS" : "recv-error") < 0)
                return 1;
            continue;
        }
        buf[n] = '\0';
        /* Kernel messages start with ACTION@DEVPATH; libudev's start with "libudev". */
        if (!strchr(buf, '@'))
            continue;
        if (append(out, ns, buf) < 0)
            return 1;
    }
}
