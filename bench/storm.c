/*
 * Storm: writes ACTION to a device's sysfs uevent file COUNT times, as fast as it can. Each
 * write makes the kernel emit one synthetic uevent (synchronously, inside the write).
 * Prints "<successful writes> <elapsed ns>".
 *
 * Usage: storm UEVENT_FILE ACTION COUNT
 * Build: cc -O2 -o storm storm.c
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static long long now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (long long)t.tv_sec * 1000000000LL + t.tv_nsec;
}

int main(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: storm UEVENT_FILE ACTION COUNT\n");
        return 2;
    }
    const char *action = argv[2];
    size_t len = strlen(action);
    long count = atol(argv[3]), ok = 0;
    int fd = open(argv[1], O_WRONLY | O_CLOEXEC);
    if (fd < 0) {
        perror("storm: open");
        return 4;
    }
    long long start = now_ns();
    for (long i = 0; i < count; i++)
        ok += pwrite(fd, action, len, 0) == (ssize_t)len;
    printf("%ld %lld\n", ok, now_ns() - start);
    return ok == count ? 0 : 1;
}
