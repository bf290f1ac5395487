/*
 * Counts the uevents of one device on a uevent multicast group: group 1 is what the kernel
 * sent, group 2 what systemd-udevd finished processing (it rebroadcasts each event there, in
 * libudev's format, once its rules have run). Its receive buffer is 256 MiB, and it reports
 * ENOBUFS, so its own count is exact or says it is not.
 *
 * Prints "<events> <first SEQNUM> <last SEQNUM> <ENOBUFS count>" once IDLE_MS have passed
 * without an event of the device (after the first one), or MAX_MS after it started.
 * Writes "listening" to stderr once bound.
 *
 * Usage: listen GROUP DEVPATH IDLE_MS MAX_MS
 * Build: cc -O2 -o listen listen.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/netlink.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static long long now_ms(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (long long)t.tv_sec * 1000LL + t.tv_nsec / 1000000;
}

/* libudev's header (systemd src/libsystemd/sd-device/device-monitor.c). */
struct libudev_header {
    char prefix[8];
    unsigned magic, header_size, properties_off, properties_len;
};

int main(int argc, char **argv)
{
    if (argc != 5) {
        fprintf(stderr, "usage: listen GROUP DEVPATH IDLE_MS MAX_MS\n");
        return 2;
    }
    unsigned group = (unsigned)atoi(argv[1]);
    const char *devpath = argv[2];
    long long idle = atoll(argv[3]), max = atoll(argv[4]);

    int fd = socket(AF_NETLINK, SOCK_DGRAM | SOCK_CLOEXEC | SOCK_NONBLOCK, NETLINK_KOBJECT_UEVENT);
    struct sockaddr_nl addr = {.nl_family = AF_NETLINK, .nl_groups = group};
    int size = 256 << 20;
    if (fd < 0 || bind(fd, (struct sockaddr *)&addr, sizeof addr) < 0 ||
        setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &size, sizeof size) < 0) {
        perror("listen: uevent socket");
        return 4;
    }
    fprintf(stderr, "listening\n");

    static char buf[16384];
    long events = 0, enobufs = 0;
    long long first = -1, last = -1, start = now_ms(), last_event = 0;
    for (;;) {
        long long t = now_ms();
        if (t - start > max || (events > 0 && t - last_event > idle))
            break;
        struct pollfd p = {.fd = fd, .events = POLLIN};
        if (poll(&p, 1, 50) <= 0)
            continue;
        ssize_t n;
        while ((n = recv(fd, buf, sizeof buf - 1, 0)) != 0) {
            if (n < 0) {
                if (errno == ENOBUFS) {
                    enobufs++;
                    continue;
                }
                break;
            }
            buf[n] = 0;
            char *props = buf, *end = buf + n;
            if (memcmp(buf, "libudev", 8) == 0 && (size_t)n >= sizeof(struct libudev_header)) {
                struct libudev_header *h = (struct libudev_header *)buf;
                if (h->properties_off + h->properties_len > (size_t)n)
                    continue;
                props = buf + h->properties_off;
                end = props + h->properties_len;
            }
            int ours = 0;
            long long seq = -1;
            for (char *s = props; s < end; s += strlen(s) + 1) {
                if (strncmp(s, "DEVPATH=", 8) == 0)
                    ours = strcmp(s + 8, devpath) == 0;
                else if (strncmp(s, "SEQNUM=", 7) == 0)
                    seq = atoll(s + 7);
            }
            if (!ours)
                continue;
            events++;
            last_event = now_ms();
            if (first < 0)
                first = seq;
            last = seq;
        }
    }
    printf("%ld %lld %lld %ld\n", events, first, last, enobufs);
    return 0;
}
