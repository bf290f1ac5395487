/*
 * The latency floor: the least a program can do between a kernel uevent and starting the
 * qrexec client. It listens on the kernel's uevent group, and on the first datagram whose
 * header is exactly "add@DEVPATH" it posix_spawns
 *     CLIENT dom0 custom.USBDeviceAttach+QUBE+__+NAME+__++N
 * (NAME: the last component of DEVPATH; N: the number NAME ends in), the argument autoattach
 * sends for a loop device without qubesdb (its identity ":N", encoded "+N"), so that both exec
 * the same argv; with no parsing, no rules, no sender check and no readiness check. Children
 * are not waited for (SIGCHLD ignored).
 *
 * With --ready it first makes, inline, the block readiness checks autoattach makes on its
 * probe threads (sysfs `size` non-zero; /dev/NAME a block device; its first 512 bytes
 * readable): the floor of a listener that checks readiness, which tells how much of
 * autoattach's latency is the checks themselves.
 *
 * Usage: floor CLIENT DEVPATH QUBE [--ready]
 * Build: cc -O2 -o floor floor.c
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/netlink.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

extern char **environ;

/* autoattach's block readiness checks (src/readiness.rs), in the same order. */
static int ready(const char *devpath, const char *name)
{
    static char block[4096] __attribute__((aligned(4096)));
    char path[4096], text[64];
    snprintf(path, sizeof path, "/sys%s/size", devpath);
    int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC | O_NOCTTY);
    ssize_t n = fd < 0 ? -1 : read(fd, text, sizeof text - 1);
    if (fd >= 0)
        close(fd);
    if (n <= 0 || atoll((text[n] = 0, text)) == 0)
        return 0;
    struct stat st;
    snprintf(path, sizeof path, "/dev/%s", name);
    if (stat(path, &st) < 0 || !S_ISBLK(st.st_mode))
        return 0;
    /* One block read directly, as autoattach reads it (O_DIRECT, 4 KiB, at least 512 back). */
    fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC | O_NOCTTY | O_DIRECT);
    n = fd < 0 ? -1 : pread(fd, block, sizeof block, 0);
    if (fd >= 0)
        close(fd);
    return n >= 512;
}

int main(int argc, char **argv)
{
    int check = argc == 5 && strcmp(argv[4], "--ready") == 0;
    if (argc != 4 && !check) {
        fprintf(stderr, "usage: floor CLIENT DEVPATH QUBE [--ready]\n");
        return 2;
    }
    const char *client = argv[1], *devpath = argv[2], *qube = argv[3];
    const char *name = strrchr(devpath, '/');
    name = name ? name + 1 : devpath;

    char want[4096], arg[512];
    snprintf(want, sizeof want, "add@%s", devpath);
    /* The identity of a device with no parent (loop, zram): ":" and its trailing number. */
    const char *number = name + strlen(name);
    while (number > name && number[-1] >= '0' && number[-1] <= '9')
        number--;
    snprintf(arg, sizeof arg, "custom.USBDeviceAttach+%s+__+%s+__++%s", qube, name, number);
    char *child_argv[] = {(char *)client, "dom0", arg, NULL};

    signal(SIGCHLD, SIG_IGN);
    int fd = socket(AF_NETLINK, SOCK_DGRAM | SOCK_CLOEXEC, NETLINK_KOBJECT_UEVENT);
    struct sockaddr_nl addr = {.nl_family = AF_NETLINK, .nl_groups = 1};
    int size = 64 << 20;
    if (fd < 0 || bind(fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
        perror("floor: uevent socket");
        return 4;
    }
    setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &size, sizeof size);
    fprintf(stderr, "floor: listening\n");

    static char buf[16384];
    for (;;) {
        ssize_t n = recv(fd, buf, sizeof buf - 1, 0);
        if (n <= 0)
            continue;
        buf[n] = 0;
        /* The header is the first NUL-terminated string of the datagram. */
        if (strcmp(buf, want) != 0)
            continue;
        if (check && !ready(devpath, name)) {
            fprintf(stderr, "floor: %s not ready\n", name);
            continue;
        }
        pid_t pid;
        int rc = posix_spawn(&pid, client, NULL, NULL, child_argv, environ);
        if (rc != 0)
            fprintf(stderr, "floor: posix_spawn %s: %s\n", client, strerror(rc));
    }
}
