/*
 * Sends forged uevents for the agent's refusal tests (tests/reliability.rs). Never part of
 * the product. Needs CAP_NET_ADMIN in the network namespace (run inside `unshare -Urn`).
 *
 *   forge-flood udev DEVPATH      to the udev group (2), which the agent never joins: one
 *                                 datagram in libudev's format ("libudev\0" magic, header,
 *                                 properties) and one in the kernel's format
 *   forge-flood flood N DEVPATH   N kernel-format datagrams multicast to the kernel group (1),
 *                                 paced (a 1 ms pause every 20) so the agent reads them all
 * Exit 0 if every send succeeded.
 * Build: cc -O2 -o forge-flood forge-flood.c
 */
#include <arpa/inet.h>
#include <linux/netlink.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

/* libudev's struct monitor_netlink_header (src/libsystemd/sd-device/device-monitor.c). */
struct libudev_header {
    char prefix[8];
    unsigned magic;
    unsigned header_size;
    unsigned properties_off;
    unsigned properties_len;
    unsigned filter_subsystem_hash;
    unsigned filter_devtype_hash;
    unsigned filter_tag_bloom_hi;
    unsigned filter_tag_bloom_lo;
};

static int kernel_format(char *buf, size_t size, const char *devpath, int i)
{
    return snprintf(buf, size, "add@%s%cACTION=add%cDEVPATH=%s%cSUBSYSTEM=block%cDEVTYPE=disk%cDEVNAME=forged%cSEQNUM=%d%c",
                    devpath, 0, 0, devpath, 0, 0, 0, 0, i, 0);
}

static int send_to_group(int fd, unsigned group, const void *buf, size_t len)
{
    struct sockaddr_nl dst = {.nl_family = AF_NETLINK, .nl_groups = group};
    if (sendto(fd, buf, len, 0, (struct sockaddr *)&dst, sizeof dst) < 0) {
        perror("sendto");
        return -1;
    }
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: %s udev DEVPATH | flood N DEVPATH\n", argv[0]);
        return 2;
    }
    int fd = socket(AF_NETLINK, SOCK_DGRAM | SOCK_CLOEXEC, NETLINK_KOBJECT_UEVENT);
    struct sockaddr_nl self = {.nl_family = AF_NETLINK};
    if (fd < 0 || bind(fd, (struct sockaddr *)&self, sizeof self) < 0) {
        perror("socket");
        return 1;
    }
    char body[1024];
    if (strcmp(argv[1], "udev") == 0) {
        char msg[2048];
        const char *devpath = argv[2];
        int plen = snprintf(body, sizeof body, "ACTION=add%cDEVPATH=%s%cSUBSYSTEM=block%cDEVTYPE=disk%cDEVNAME=forged-udev%cSEQNUM=1%c",
                            0, devpath, 0, 0, 0, 0, 0);
        struct libudev_header h = {.prefix = "libudev", .magic = htonl(0xfeedcafe),
                                   .header_size = sizeof h, .properties_off = sizeof h,
                                   .properties_len = (unsigned)plen};
        memcpy(msg, &h, sizeof h);
        memcpy(msg + sizeof h, body, (size_t)plen);
        if (send_to_group(fd, 2, msg, sizeof h + (size_t)plen) < 0)
            return 1;
        int n = kernel_format(body, sizeof body, devpath, 2);
        return send_to_group(fd, 2, body, (size_t)n) < 0;
    }
    if (strcmp(argv[1], "flood") == 0 && argc == 4) {
        int count = atoi(argv[2]);
        struct timespec pause = {0, 1000000};
        for (int i = 0; i < count; i++) {
            int n = kernel_format(body, sizeof body, argv[3], i);
            if (send_to_group(fd, 1, body, (size_t)n) < 0)
                return 1;
            if (i % 20 == 19)
                nanosleep(&pause, NULL);
        }
        return 0;
    }
    fprintf(stderr, "usage: %s udev DEVPATH | flood N DEVPATH\n", argv[0]);
    return 2;
}
