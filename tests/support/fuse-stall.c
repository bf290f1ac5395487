/*
 * A FUSE file system whose reads never answer: under a loop device, it makes a block device
 * whose first-sector read never returns, as a dying USB stick's does while the SCSI layer
 * retries (tests/reliability.rs, stalled probes). Never part of the product.
 *
 *   fuse-stall MOUNTPOINT SIZE
 *
 * Mounts MOUNTPOINT with one regular file, MOUNTPOINT/disk, of SIZE bytes, and serves it until
 * killed. Every request is answered (INIT, LOOKUP, GETATTR, OPEN, FLUSH, RELEASE, STATFS, ...;
 * anything else ENOSYS) except READ, which is read and held forever: the reader waits in the
 * kernel. Killing this process closes /dev/fuse, which aborts the connection: every held read
 * then fails (ECONNABORTED, EIO through the loop device), and the file system must still be
 * unmounted (umount -l MOUNTPOINT).
 *
 * Speaks the kernel's FUSE protocol on /dev/fuse directly (include/uapi/linux/fuse.h, the
 * request and reply layouts; fs/fuse/inode.c for the mount options fd=, rootmode=, user_id=,
 * group_id=), so it needs no FUSE library. Prints "ready" on stdout once INIT is answered.
 * Build: cc -O2 -o fuse-stall fuse-stall.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/fuse.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#define ROOT_ID FUSE_ROOT_ID
#define DISK_ID 2

static int fuse_fd;
static unsigned long long disk_size;

static void reply(uint64_t unique, int error, const void *body, size_t len)
{
    struct fuse_out_header out = {.len = (uint32_t)(sizeof out + len), .error = -error, .unique = unique};
    struct iovec iov[2] = {{&out, sizeof out}, {(void *)body, len}};
    if (writev(fuse_fd, iov, len ? 2 : 1) < 0 && errno != ENOENT)
        perror("fuse-stall: writev");
}

static void fill_attr(uint64_t node, struct fuse_attr *attr)
{
    memset(attr, 0, sizeof *attr);
    attr->ino = node;
    attr->nlink = 1;
    attr->blksize = 4096;
    if (node == ROOT_ID) {
        attr->mode = S_IFDIR | 0755;
        attr->nlink = 2;
    } else {
        attr->mode = S_IFREG | 0644;
        attr->size = disk_size;
        attr->blocks = disk_size / 512;
    }
}

static void init(const struct fuse_in_header *in, const struct fuse_init_in *arg)
{
    struct fuse_init_out out = {.major = FUSE_KERNEL_VERSION, .max_write = 4096};
    out.minor = arg->minor < FUSE_KERNEL_MINOR_VERSION ? arg->minor : FUSE_KERNEL_MINOR_VERSION;
    out.max_readahead = arg->max_readahead;
    reply(in->unique, 0, &out, sizeof out);
    printf("ready\n");
    fflush(stdout);
}

static void lookup(const struct fuse_in_header *in, const char *name)
{
    if (in->nodeid != ROOT_ID || strcmp(name, "disk") != 0) {
        reply(in->unique, ENOENT, NULL, 0);
        return;
    }
    struct fuse_entry_out out = {.nodeid = DISK_ID, .generation = 1, .entry_valid = 3600, .attr_valid = 3600};
    fill_attr(DISK_ID, &out.attr);
    reply(in->unique, 0, &out, sizeof out);
}

static void getattr(const struct fuse_in_header *in)
{
    struct fuse_attr_out out = {.attr_valid = 3600};
    fill_attr(in->nodeid, &out.attr);
    reply(in->unique, 0, &out, sizeof out);
}

static void serve(const char *buf)
{
    const struct fuse_in_header *in = (const void *)buf;
    const char *arg = buf + sizeof *in;
    switch (in->opcode) {
    case FUSE_INIT:
        init(in, (const void *)arg);
        break;
    case FUSE_LOOKUP:
        lookup(in, arg);
        break;
    case FUSE_GETATTR:
        getattr(in);
        break;
    case FUSE_OPEN:
    case FUSE_OPENDIR: {
        struct fuse_open_out out = {.fh = 1};
        reply(in->unique, 0, &out, sizeof out);
        break;
    }
    case FUSE_STATFS: {
        struct fuse_statfs_out out = {.st = {.bsize = 4096, .frsize = 4096, .namelen = 255}};
        reply(in->unique, 0, &out, sizeof out);
        break;
    }
    case FUSE_READ:
        /* Held forever: this is the point. */
        break;
    case FUSE_FORGET:
    case FUSE_BATCH_FORGET:
    case FUSE_INTERRUPT:
        /* No reply is expected (an interrupt of a held read is ignored: it stays held). */
        break;
    case FUSE_FLUSH:
    case FUSE_RELEASE:
    case FUSE_RELEASEDIR:
    case FUSE_FSYNC:
    case FUSE_ACCESS:
    case FUSE_DESTROY:
        reply(in->unique, 0, NULL, 0);
        break;
    default:
        reply(in->unique, ENOSYS, NULL, 0);
    }
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: %s MOUNTPOINT SIZE\n", argv[0]);
        return 2;
    }
    disk_size = strtoull(argv[2], NULL, 10);
    fuse_fd = open("/dev/fuse", O_RDWR | O_CLOEXEC);
    if (fuse_fd < 0) {
        perror("fuse-stall: /dev/fuse");
        return 1;
    }
    char options[256];
    snprintf(options, sizeof options, "fd=%d,rootmode=40000,user_id=0,group_id=0,allow_other", fuse_fd);
    if (mount("fuse-stall", argv[1], "fuse.fuse-stall", MS_NOSUID | MS_NODEV, options) < 0) {
        perror("fuse-stall: mount");
        return 1;
    }
    static char buf[FUSE_MIN_READ_BUFFER + 65536];
    for (;;) {
        ssize_t n = read(fuse_fd, buf, sizeof buf);
        if (n < 0 && (errno == EINTR || errno == ENOENT))
            continue;
        if (n < 0) {
            /* ENODEV: unmounted. */
            return errno == ENODEV ? 0 : 1;
        }
        if ((size_t)n >= sizeof(struct fuse_in_header))
            serve(buf);
    }
}
