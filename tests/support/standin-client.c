/*
 * Stand-in for qrexec-client-vm, used by the real-kernel, qemu and benchmark tests.
 *
 * Invoked exactly as autoattach invokes the real client:
 *     standin-client dom0 custom.USBDeviceAttach+QUBE+__+DEV[+__+IDENT]
 * It records, in one O_APPEND write so concurrent children never interleave:
 *     <CLOCK_MONOTONIC ns> <argv[1]> <argv[2]> readable=<yes|no|n/a>
 * where "readable" says whether DEV's node (block names only; USB bus ids start with a digit)
 * could be opened and its first 512 bytes read at that moment.
 *
 * The time is taken before anything else, so latency measurements end at the client's first
 * instructions. Environment:
 *   AUTOATTACH_STANDIN_LOG   file to append to (default: calls.log beside this program)
 *   AUTOATTACH_STANDIN_DEV   device directory (default /dev)
 *   AUTOATTACH_STANDIN_EXIT  exit status to return (default 0), to play dom0's answers
 *   AUTOATTACH_STANDIN_SLEEP seconds to sleep before exiting (a slow dom0)
 * Build: cc -O2 -static -o standin-client standin-client.c
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static const char *device_of(const char *arg)
{
    const char *sep = arg ? strstr(arg, "+__+") : NULL;
    return sep ? sep + 4 : NULL;
}

static const char *readable(const char *dev)
{
    char path[4096], sector[512];
    const char *dir = getenv("AUTOATTACH_STANDIN_DEV");
    if (!dev || !*dev || (*dev >= '0' && *dev <= '9') || strchr(dev, '/'))
        return "n/a";
    /* DEV ends at the identity's separator, when the call carries one (QUBE+__+DEV+__+IDENT). */
    const char *end = strstr(dev, "+__+");
    int len = end ? (int)(end - dev) : (int)strlen(dev);
    snprintf(path, sizeof path, "%s/%.*s", dir ? dir : "/dev", len, dev);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return "no";
    ssize_t n = read(fd, sector, sizeof sector);
    close(fd);
    return n == (ssize_t)sizeof sector ? "yes" : "no";
}

int main(int argc, char **argv)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);

    char logpath[4096];
    const char *log = getenv("AUTOATTACH_STANDIN_LOG");
    if (!log) {
        const char *slash = strrchr(argv[0], '/');
        int dirlen = slash ? (int)(slash - argv[0]) : 1;
        snprintf(logpath, sizeof logpath, "%.*s/calls.log", dirlen, slash ? argv[0] : ".");
        log = logpath;
    }

    char line[8192];
    int len = snprintf(line, sizeof line, "%lld %s %s readable=%s\n",
                       (long long)now.tv_sec * 1000000000LL + now.tv_nsec,
                       argc > 1 ? argv[1] : "-", argc > 2 ? argv[2] : "-",
                       readable(device_of(argc > 2 ? argv[2] : NULL)));
    if (len > (int)sizeof line - 1)
        len = (int)sizeof line - 1;
    int fd = open(log, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (fd < 0 || write(fd, line, (size_t)len) != len)
        return 99;
    close(fd);

    const char *sleep_s = getenv("AUTOATTACH_STANDIN_SLEEP");
    if (sleep_s)
        sleep((unsigned)atoi(sleep_s));
    const char *code = getenv("AUTOATTACH_STANDIN_EXIT");
    return code ? atoi(code) : 0;
}
