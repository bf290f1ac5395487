/*
 * Creates or removes a loop device through /dev/loop-control, as the kernel tests do:
 *     loopctl add BASE     creates the first free loop device from index BASE (BASE..BASE+9)
 *                          and prints its index
 *     loopctl remove N     removes loopN (retrying for a second while it is busy)
 * Build: cc -O2 -o loopctl loopctl.c
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

#define LOOP_CTL_ADD 0x4C80
#define LOOP_CTL_REMOVE 0x4C81

int main(int argc, char **argv)
{
    if (argc != 3 || (strcmp(argv[1], "add") != 0 && strcmp(argv[1], "remove") != 0)) {
        fprintf(stderr, "usage: loopctl add BASE | loopctl remove N\n");
        return 2;
    }
    int fd = open("/dev/loop-control", O_RDWR | O_CLOEXEC);
    if (fd < 0) {
        perror("loopctl: /dev/loop-control");
        return 4;
    }
    long n = atol(argv[2]);
    if (strcmp(argv[1], "add") == 0) {
        for (long i = n; i < n + 10; i++) {
            if (ioctl(fd, LOOP_CTL_ADD, i) >= 0) {
                printf("%ld\n", i);
                return 0;
            }
        }
        fprintf(stderr, "loopctl: no free loop index in %ld..%ld\n", n, n + 9);
        return 1;
    }
    for (int tries = 0; tries < 50; tries++) {
        if (ioctl(fd, LOOP_CTL_REMOVE, n) >= 0)
            return 0;
        struct timespec t = {0, 20000000L};
        nanosleep(&t, NULL);
    }
    perror("loopctl: remove");
    return 1;
}
