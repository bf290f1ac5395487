/*
 * Latency driver: makes a device appear COUNT times and times, for each appearance, the
 * interval from the write(2) of "add" to the device's sysfs uevent file until the first
 * instruction of the qrexec client (the stand-in client appends "<CLOCK_MONOTONIC ns> ..."
 * to CALLS_LOG as its first act).
 *
 * Each appearance: write "remove" (so that the next add is a new appearance for every
 * listener), sleep GAP ms, take CLOCK_MONOTONIC, write "add", wait (inotify, no polling; the
 * driver sleeps right after the write) until CALLS_LOG holds one more line, read that line's time, sleep GAP ms. The first
 * WARMUP appearances are made the same way but not printed.
 *
 * Prints one line per measured appearance: "<write ns> <client ns> <latency ns>", or
 * "<write ns> timeout" if no call came within 5 s. Exit 0 if every appearance was called.
 *
 * Usage: latency UEVENT_FILE CALLS_LOG COUNT GAP_MS WARMUP
 * Build: cc -O2 -o latency latency.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/inotify.h>
#include <time.h>
#include <unistd.h>

static long long now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (long long)t.tv_sec * 1000000000LL + t.tv_nsec;
}

static void sleep_ms(int ms)
{
    struct timespec t = {ms / 1000, (long)(ms % 1000) * 1000000L};
    while (nanosleep(&t, &t) < 0 && errno == EINTR) {
    }
}

/* The time field of line `want` (0-based) of the log, or -1 if it has fewer lines. */
static long long line_time(const char *log, long want)
{
    FILE *f = fopen(log, "r");
    if (!f)
        return -1;
    char line[8192];
    long n = 0;
    long long t = -1;
    while (fgets(line, sizeof line, f)) {
        if (n++ == want) {
            t = atoll(line);
            break;
        }
    }
    fclose(f);
    return t;
}

static long count_lines(const char *log)
{
    FILE *f = fopen(log, "r");
    if (!f)
        return 0;
    long n = 0;
    int c;
    while ((c = getc(f)) != EOF)
        n += c == '\n';
    fclose(f);
    return n;
}

static int write_action(int fd, const char *action)
{
    return pwrite(fd, action, strlen(action), 0) == (ssize_t)strlen(action) ? 0 : -1;
}

int main(int argc, char **argv)
{
    if (argc != 6) {
        fprintf(stderr, "usage: latency UEVENT_FILE CALLS_LOG COUNT GAP_MS WARMUP\n");
        return 2;
    }
    const char *uevent = argv[1], *log = argv[2];
    int count = atoi(argv[3]), gap = atoi(argv[4]), warmup = atoi(argv[5]);

    int fd = open(uevent, O_WRONLY | O_CLOEXEC);
    int ino = inotify_init1(IN_CLOEXEC | IN_NONBLOCK);
    int logfd = open(log, O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0 || ino < 0 || logfd < 0 || inotify_add_watch(ino, log, IN_MODIFY) < 0) {
        perror("latency: setup");
        return 4;
    }
    close(logfd);

    long base = count_lines(log);
    int missed = 0;
    for (int i = 0; i < warmup + count; i++) {
        if (write_action(fd, "remove") < 0) {
            perror("latency: write remove");
            return 4;
        }
        sleep_ms(gap);
        char drain[4096];
        while (read(ino, drain, sizeof drain) > 0) {
        }
        long long t0 = now_ns();
        if (write_action(fd, "add") < 0) {
            perror("latency: write add");
            return 4;
        }
        /* Sleep at once: the listener under test often runs on this CPU, and work done here
         * before sleeping (reading the log) would delay a listener that does not preempt us.
         * The inotify queue was drained before t0, so a change made since is never missed. */
        long long t1 = -1, deadline = t0 + 5000000000LL;
        do {
            struct pollfd p = {.fd = ino, .events = POLLIN};
            poll(&p, 1, 100);
            while (read(ino, drain, sizeof drain) > 0) {
            }
        } while ((t1 = line_time(log, base)) < 0 && now_ns() < deadline);
        if (t1 >= 0)
            base++;
        else
            missed++;
        if (i >= warmup) {
            if (t1 >= 0)
                printf("%lld %lld %lld\n", t0, t1, t1 - t0);
            else
                printf("%lld timeout\n", t0);
        }
        sleep_ms(gap);
        /* A late call for a timed-out appearance would shift every later pairing. */
        base = count_lines(log) > base ? count_lines(log) : base;
    }
    fflush(stdout);
    return missed ? 1 : 0;
}
