/*
 * Stand-in for the qubesdb daemon of a qube, and for its qubesdb-read client, used by
 * autoattach's tests (tests/qubesdb.rs) and benchmarks (bench/publication.sh). Our own code,
 * written from qubes-core-qubesdb v4.3.3 (commit aeb3c8d; the local protocol is the same since
 * v4.1.0); citations are file:line there.
 *
 * The framing is the real one by construction: messages are this file's `struct qdb_hdr`,
 * declared as include/qubesdb.h:123-132 declares it (type, char path[64], uint32_t data_len:
 * 72 bytes with the compiler's padding), so the Rust client is checked against the C ABI
 * layout rather than against its own idea of it.
 *
 * Daemon:
 *     qubesdb-standin daemon [-l LOG] [-r RO_SOCKET] SOCKET [SPEC...]
 * serves SOCKET (read-write) and RO_SOCKET (read-only: WRITE and RM answered ERROR, as
 * db-cmds.c:401,459 do for clients of qubesdb.ro.sock), prints "ready" on stdout once both
 * listen, and runs until killed. LOG gets one line per event, "<CLOCK_MONOTONIC ns> WHAT":
 * "accept rw|ro", "CMD PATH" for each command, "publish KEY" just before a publication's
 * watches fire. SPECs:
 *     KEY=VALUE             an entry present from the start
 *     publish:MS:KEY=VALUE  MS ms after a command first names KEY while KEY is absent, write
 *                           it as a client's WRITE would (db-cmds.c:395 handle_write: entry,
 *                           then watches fire); re-armed when KEY is removed
 *     touch:KEY=VALUE       before answering any READ/MULTIREAD/LIST, write KEY (another
 *                           client's write processed first): watch events precede the answer
 *     touchmid:KEY=VALUE    the same, and also between MULTIREAD entries (include/qubesdb.h:51-53)
 *     silent:KEY            never answer a command naming KEY (the connection stays open)
 *     drop:KEY              close the connection on a command naming KEY, answering nothing
 *     cut:KEY               answer it with a READ header announcing 100 bytes, send 10, close
 *     garbage:KEY           answer it with 72 bytes that are no header (type 0xee)
 *     oversize:KEY          answer it with a READ header announcing 1 MiB
 * A command names KEY when its path is KEY, or a prefix of KEY ending in '/', or (MULTIREAD,
 * LIST) any prefix of KEY.
 *
 * Client, for scripts: qubesdb-standin write SOCKET KEY VALUE | rm SOCKET KEY
 *
 * Benchmark floor: qubesdb-standin floor SOCKET PREFIX KEY PROGRAM [ARGS...] (see floor_main)
 *
 * qubesdb-read: run under any other name, it is qubesdb-cmd (client/qubesdb-cmd.c at v4.2.10,
 * the R4.2 behaviour): the command is what follows the FIRST '-' of argv[0] (line 290), so
 * "/opt/qubes-tools/qubesdb-read" prints usage on stderr and exits 0 (364-366). Only `read`
 * is implemented, with -r (value + newline, 34-41), -q, -h; a missing key exits 2 after
 * "Failed to read KEY" on stderr (101, 112-113). It connects to `qubesdb.sock` beside its own
 * executable if there is one, else to /var/run/qubes/qubesdb.sock then qubesdb.ro.sock as
 * qdb-client.c:102-158 does.
 *
 * Build: cc -O2 -o qubesdb-standin qubesdb-standin.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <libgen.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* include/qubesdb.h:11-96 */
enum { CMD_READ, CMD_WRITE, CMD_MULTIREAD, CMD_LIST, CMD_RM, CMD_WATCH, CMD_UNWATCH,
       RESP_OK, RESP_ERROR_NOENT, RESP_ERROR, RESP_READ, RESP_MULTIREAD, RESP_LIST, RESP_WATCH };
#define MAX_DATA 3072
#define MAX_PATH 64

struct qdb_hdr {
    uint8_t type;
    char path[MAX_PATH];
    uint32_t data_len;
};

#define MAX_ENTRIES 1024
#define MAX_WATCHES 1024
#define MAX_CLIENTS 256 /* qubesdb_internal.h:28 */
#define MAX_SPECS 64

struct entry { char path[MAX_PATH]; char value[MAX_DATA]; uint32_t len; };
struct watch { int client; char path[MAX_PATH]; size_t cmp_len; };
struct client { int fd; int can_write; };
enum kind { PUBLISH, TOUCH, TOUCHMID, SILENT, DROP, CUT, GARBAGE, OVERSIZE };
struct spec {
    enum kind kind;
    char key[MAX_PATH];
    char value[MAX_DATA];
    long long delay_ns, due_ns; /* due_ns 0: not armed */
};

static struct entry entries[MAX_ENTRIES]; /* sorted by path, as db-core.c keeps its list */
static size_t n_entries;
static struct watch watches[MAX_WATCHES];
static size_t n_watches;
static struct client clients[MAX_CLIENTS];
static size_t n_clients;
static struct spec specs[MAX_SPECS];
static size_t n_specs;
static int log_fd = -1;

static long long now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (long long)t.tv_sec * 1000000000LL + t.tv_nsec;
}

static void logf_(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void logf_(const char *fmt, ...)
{
    if (log_fd < 0)
        return;
    char line[256];
    int n = snprintf(line, sizeof line, "%lld ", now_ns());
    va_list ap;
    va_start(ap, fmt);
    n += vsnprintf(line + n, sizeof line - n - 1, fmt, ap);
    va_end(ap);
    if (n > (int)sizeof line - 2)
        n = sizeof line - 2;
    line[n++] = '\n';
    if (write(log_fd, line, n) < 0) {
        /* a lost log line shows in the test that reads it */
    }
}

static void die(const char *what)
{
    perror(what);
    exit(1);
}

/* ---- the database (db-core.c) ------------------------------------------------------------ */

/* db-cmds.c:38 verify_path */
static int verify_path(const char *path)
{
    size_t len = strlen(path);
    if (len >= MAX_PATH)
        return 0;
    for (size_t i = 0; i < len; i++) {
        char c = path[i];
        if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9'))
            continue;
        if (c == '-' && i)
            continue;
        if (c == '_' || c == '/' || c == '.' || c == ':' || c == '@')
            continue;
        return 0;
    }
    return 1;
}

static struct entry *find(const char *path)
{
    for (size_t i = 0; i < n_entries; i++)
        if (!strcmp(entries[i].path, path))
            return &entries[i];
    return NULL;
}

/* db-core.c:92 qubesdb_insert + 132 qubesdb_write */
static int db_write(const char *path, const char *value, uint32_t len)
{
    size_t plen = strlen(path);
    if (path[0] != '/' || path[plen - 1] == '/' || plen >= MAX_PATH || len >= MAX_DATA)
        return 0;
    struct entry *e = find(path);
    if (!e) {
        if (n_entries == MAX_ENTRIES)
            return 0;
        size_t at = 0;
        while (at < n_entries && strcmp(entries[at].path, path) < 0)
            at++;
        memmove(&entries[at + 1], &entries[at], (n_entries - at) * sizeof entries[0]);
        n_entries++;
        e = &entries[at];
        snprintf(e->path, sizeof e->path, "%s", path);
    }
    memcpy(e->value, value, len);
    e->len = len;
    return 1;
}

/* db-core.c:157 qubesdb_remove: a path ending in '/' removes everything under it */
static int db_remove(const char *path)
{
    size_t plen = strlen(path);
    int dir = plen && path[plen - 1] == '/', removed = 0;
    for (size_t i = 0; i < n_entries;) {
        if (dir ? !strncmp(entries[i].path, path, plen) : !strcmp(entries[i].path, path)) {
            memmove(&entries[i], &entries[i + 1], (n_entries - i - 1) * sizeof entries[0]);
            n_entries--;
            removed = 1;
        } else {
            i++;
        }
    }
    return removed;
}

/* ---- sending ----------------------------------------------------------------------------- */

static int send_all(int fd, const void *buf, size_t len)
{
    const char *p = buf;
    while (len) {
        ssize_t n = send(fd, p, len, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return 0;
        p += n;
        len -= n;
    }
    return 1;
}

static int send_hdr(int fd, int type, const char *path, uint32_t len)
{
    struct qdb_hdr h;
    memset(&h, 0, sizeof h);
    h.type = type;
    strncpy(h.path, path, sizeof h.path - 1);
    h.data_len = len;
    return send_all(fd, &h, sizeof h);
}

/* db-core.c:244 qubesdb_fire_watches: a WATCH message naming the modified path */
static void fire_watches(const char *path)
{
    for (size_t i = 0; i < n_watches; i++)
        if (!strncmp(watches[i].path, path, watches[i].cmp_len))
            send_hdr(clients[watches[i].client].fd, RESP_WATCH, path, 0);
}

static void publish(const char *key, const char *value)
{
    if (db_write(key, value, strlen(value))) {
        logf_("publish %s", key);
        fire_watches(key);
    }
}

/* ---- specs ------------------------------------------------------------------------------- */

static int names(int cmd, const char *path, const char *key)
{
    size_t plen = strlen(path);
    if (!strcmp(path, key))
        return 1;
    if (strncmp(key, path, plen))
        return 0;
    return (plen && path[plen - 1] == '/') || cmd == CMD_MULTIREAD || cmd == CMD_LIST;
}

static struct spec *special(int cmd, const char *path, enum kind kind)
{
    for (size_t i = 0; i < n_specs; i++)
        if (specs[i].kind == kind && names(cmd, path, specs[i].key))
            return &specs[i];
    return NULL;
}

static void arm_publications(int cmd, const char *path)
{
    for (size_t i = 0; i < n_specs; i++) {
        struct spec *s = &specs[i];
        if (s->kind == PUBLISH && !s->due_ns && !find(s->key) && names(cmd, path, s->key))
            s->due_ns = now_ns() + s->delay_ns;
    }
}

static void touch(enum kind kind)
{
    for (size_t i = 0; i < n_specs; i++)
        if (specs[i].kind == kind)
            publish(specs[i].key, specs[i].value);
}

/* The misbehaviours. Returns -1: disconnect; 1: handled (or never answered); 0: go on. */
static int misbehave(int fd, struct qdb_hdr *h)
{
    static const char junk[sizeof(struct qdb_hdr)] = {(char)0xee, 'j', 'u', 'n', 'k'};
    if (special(h->type, h->path, SILENT))
        return 1;
    if (special(h->type, h->path, DROP))
        return -1;
    if (special(h->type, h->path, GARBAGE))
        return send_all(fd, junk, sizeof junk) ? 1 : -1;
    if (special(h->type, h->path, OVERSIZE))
        return send_hdr(fd, RESP_READ, h->path, 1 << 20) ? 1 : -1;
    if (special(h->type, h->path, CUT)) {
        send_hdr(fd, RESP_READ, h->path, 100);
        send_all(fd, "0123456789", 10);
        return -1;
    }
    return 0;
}

/* ---- commands (db-cmds.c:795 handle_client_data) ----------------------------------------- */

/* db-cmds.c:303 discard_data_and_send_error */
static int discard_and_error(int fd, struct qdb_hdr *h)
{
    char buf[256];
    for (uint32_t left = h->data_len; left;) {
        ssize_t n = read(fd, buf, left < sizeof buf ? left : sizeof buf);
        if (n <= 0)
            return 0;
        left -= n;
    }
    h->type = RESP_ERROR;
    h->data_len = 0;
    return send_all(fd, h, sizeof *h);
}

/* db-cmds.c:545 handle_multiread and 609 handle_list */
static int handle_multi(int fd, struct qdb_hdr *h)
{
    int list = h->type == CMD_LIST, resp = list ? RESP_LIST : RESP_MULTIREAD, sent = 0;
    size_t plen = strlen(h->path);
    if (h->data_len)
        return discard_and_error(fd, h);
    for (size_t k = 0; k < n_entries; k++) {
        /* an empty MULTIREAD path dumps everything in reverse order (db-cmds.c:566-572) */
        size_t i = plen ? k : n_entries - 1 - k;
        if (strncmp(entries[i].path, h->path, plen))
            continue;
        uint32_t len = list ? 0 : entries[i].len;
        if (!send_hdr(fd, resp, entries[i].path, len) || !send_all(fd, entries[i].value, len))
            return 0;
        if (!sent++)
            touch(TOUCHMID);
    }
    return send_hdr(fd, resp, "", 0);
}

static int handle_write(int fd, struct client *c, struct qdb_hdr *h)
{
    char data[MAX_DATA];
    if (!c->can_write)
        return discard_and_error(fd, h);
    for (uint32_t got = 0; got < h->data_len;) {
        ssize_t n = read(fd, data + got, h->data_len - got);
        if (n <= 0)
            return 0;
        got += n;
    }
    if (memchr(data, 0, h->data_len)) { /* db-cmds.c:80 verify_data */
        h->data_len = 0;
        return discard_and_error(fd, h);
    }
    if (!db_write(h->path, data, h->data_len)) {
        send_hdr(fd, RESP_ERROR, h->path, 0);
        return 0;
    }
    for (size_t i = 0; i < n_specs; i++)
        if (specs[i].kind == PUBLISH && !strcmp(specs[i].key, h->path))
            specs[i].due_ns = 0;
    if (!send_hdr(fd, RESP_OK, h->path, 0))
        return 0;
    fire_watches(h->path);
    return 1;
}

static int handle_rm(int fd, struct client *c, struct qdb_hdr *h)
{
    if (!c->can_write || h->data_len)
        return discard_and_error(fd, h);
    if (!db_remove(h->path))
        return send_hdr(fd, RESP_ERROR_NOENT, h->path, 0);
    for (size_t i = 0; i < n_specs; i++) /* re-arm what was removed */
        if (specs[i].kind == PUBLISH && !find(specs[i].key))
            specs[i].due_ns = 0;
    if (!send_hdr(fd, RESP_OK, h->path, 0))
        return 0;
    fire_watches(h->path);
    return 1;
}

static int handle_watch(int fd, size_t client, struct qdb_hdr *h)
{
    if (h->type == CMD_WATCH) { /* db-core.c:190 qubesdb_add_watch */
        if (n_watches == MAX_WATCHES)
            return send_hdr(fd, RESP_ERROR, h->path, 0);
        struct watch *w = &watches[n_watches++];
        w->client = client;
        snprintf(w->path, sizeof w->path, "%s", h->path);
        w->cmp_len = strlen(w->path) + 1;
        if (w->cmp_len >= 2 && w->path[w->cmp_len - 2] == '/')
            w->cmp_len--;
        return send_hdr(fd, RESP_OK, h->path, 0);
    }
    for (size_t i = 0; i < n_watches; i++) { /* db-core.c:213 qubesdb_remove_watch: one */
        if (watches[i].client == (int)client && !strcmp(watches[i].path, h->path)) {
            watches[i] = watches[--n_watches];
            return send_hdr(fd, RESP_OK, h->path, 0);
        }
    }
    return send_hdr(fd, RESP_ERROR_NOENT, h->path, 0);
}

/* One command; 0: disconnect the client. */
static int handle_client(size_t client)
{
    struct client *c = &clients[client];
    struct qdb_hdr h;
    size_t got = 0;
    while (got < sizeof h) { /* db-cmds.c:228 read_vchan_or_client: the whole header */
        ssize_t n = read(c->fd, (char *)&h + got, sizeof h - got);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return 0;
        got += n;
    }
    /* db-cmds.c:96 verify_hdr */
    if (h.type > CMD_UNWATCH)
        return discard_and_error(c->fd, &h);
    h.path[sizeof h.path - 1] = 0;
    if (!verify_path(h.path) || h.data_len >= MAX_DATA)
        return discard_and_error(c->fd, &h);
    static const char *const name[] = {"read", "write", "multiread", "list", "rm", "watch", "unwatch"};
    logf_("%s %s", name[h.type], h.path);
    int odd = misbehave(c->fd, &h);
    if (odd)
        return odd > 0;
    arm_publications(h.type, h.path);
    if (h.type == CMD_READ || h.type == CMD_MULTIREAD || h.type == CMD_LIST) {
        touch(TOUCH);
        touch(TOUCHMID);
    }
    switch (h.type) {
    case CMD_READ: { /* db-cmds.c:505 handle_read */
        if (h.data_len)
            return 0;
        struct entry *e = find(h.path);
        if (!e)
            return send_hdr(c->fd, RESP_ERROR_NOENT, h.path, 0);
        return send_hdr(c->fd, RESP_READ, h.path, e->len) && send_all(c->fd, e->value, e->len);
    }
    case CMD_WRITE:
        return handle_write(c->fd, c, &h);
    case CMD_MULTIREAD:
    case CMD_LIST:
        return handle_multi(c->fd, &h);
    case CMD_RM:
        return handle_rm(c->fd, c, &h);
    default:
        return handle_watch(c->fd, client, &h);
    }
}

/* ---- the daemon -------------------------------------------------------------------------- */

static void disconnect(size_t client)
{
    /* db-cmds.c:874 handle_client_disconnect: its watches go */
    for (size_t i = 0; i < n_watches;) {
        if (watches[i].client == (int)client)
            watches[i] = watches[--n_watches];
        else
            i++;
    }
    close(clients[client].fd);
    /* the last client takes its place; its watches follow it */
    size_t last = --n_clients;
    if (client != last) {
        clients[client] = clients[last];
        for (size_t i = 0; i < n_watches; i++)
            if (watches[i].client == (int)last)
                watches[i].client = client;
    }
}

static int listen_on(const char *path)
{
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof a.sun_path) {
        fprintf(stderr, "socket path too long: %s\n", path);
        exit(1);
    }
    strcpy(a.sun_path, path);
    unlink(path);
    int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (s < 0 || bind(s, (struct sockaddr *)&a, sizeof a) < 0 || listen(s, 16) < 0)
        die(path);
    chmod(path, 0666);
    return s;
}

static void parse_spec(const char *arg)
{
    static const struct { const char *prefix; enum kind kind; } kinds[] = {
        {"publish:", PUBLISH}, {"touch:", TOUCH}, {"touchmid:", TOUCHMID}, {"silent:", SILENT},
        {"drop:", DROP}, {"cut:", CUT}, {"garbage:", GARBAGE}, {"oversize:", OVERSIZE},
    };
    if (n_specs == MAX_SPECS) {
        fprintf(stderr, "too many specs\n");
        exit(2);
    }
    struct spec *s = &specs[n_specs];
    for (size_t i = 0; i < sizeof kinds / sizeof kinds[0]; i++) {
        size_t n = strlen(kinds[i].prefix);
        if (strncmp(arg, kinds[i].prefix, n))
            continue;
        s->kind = kinds[i].kind;
        arg += n;
        if (s->kind == PUBLISH) {
            char *end;
            s->delay_ns = strtoll(arg, &end, 10) * 1000000LL;
            if (*end != ':') {
                fprintf(stderr, "bad spec, want publish:MS:KEY=VALUE\n");
                exit(2);
            }
            arg = end + 1;
        }
        const char *eq = strchr(arg, '=');
        size_t klen = eq && s->kind <= TOUCHMID ? (size_t)(eq - arg) : strlen(arg);
        snprintf(s->key, sizeof s->key, "%.*s", (int)klen, arg);
        if (eq && s->kind <= TOUCHMID)
            snprintf(s->value, sizeof s->value, "%s", eq + 1);
        n_specs++;
        return;
    }
    const char *eq = strchr(arg, '=');
    char key[MAX_PATH];
    if (!eq || (size_t)(eq - arg) >= sizeof key) {
        fprintf(stderr, "bad spec: %s\n", arg);
        exit(2);
    }
    snprintf(key, sizeof key, "%.*s", (int)(eq - arg), arg);
    if (!db_write(key, eq + 1, strlen(eq + 1))) {
        fprintf(stderr, "bad entry: %s\n", arg);
        exit(2);
    }
}

static int poll_timeout(void)
{
    long long next = -1, now = now_ns();
    for (size_t i = 0; i < n_specs; i++)
        if (specs[i].kind == PUBLISH && specs[i].due_ns && (next < 0 || specs[i].due_ns < next))
            next = specs[i].due_ns;
    if (next < 0)
        return -1;
    return next <= now ? 0 : (int)((next - now + 999999) / 1000000);
}

static void publish_due(void)
{
    long long now = now_ns();
    for (size_t i = 0; i < n_specs; i++) {
        struct spec *s = &specs[i];
        if (s->kind == PUBLISH && s->due_ns && s->due_ns <= now) {
            s->due_ns = 0; /* done: armed again by a command once the key is removed */
            if (!find(s->key))
                publish(s->key, s->value);
        }
    }
}

static void accept_client(int listener, int can_write)
{
    int fd = accept4(listener, NULL, NULL, SOCK_CLOEXEC);
    if (fd < 0)
        return;
    if (n_clients == MAX_CLIENTS) {
        close(fd);
        return;
    }
    clients[n_clients++] = (struct client){fd, can_write};
    logf_("accept %s", can_write ? "rw" : "ro");
}

static int daemon_main(int argc, char **argv)
{
    const char *ro_path = NULL;
    int opt;
    while ((opt = getopt(argc, argv, "+l:r:")) != -1) {
        if (opt == 'l') {
            log_fd = open(optarg, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
            if (log_fd < 0)
                die(optarg);
        } else if (opt == 'r') {
            ro_path = optarg;
        } else {
            return 2;
        }
    }
    if (optind >= argc) {
        fprintf(stderr, "usage: qubesdb-standin daemon [-l LOG] [-r RO_SOCKET] SOCKET [SPEC...]\n");
        return 2;
    }
    const char *rw_path = argv[optind++];
    for (; optind < argc; optind++)
        parse_spec(argv[optind]);
    int rw = listen_on(rw_path), ro = ro_path ? listen_on(ro_path) : -1;
    printf("ready\n");
    fflush(stdout);
    for (;;) {
        struct pollfd fds[MAX_CLIENTS + 2] = {{rw, POLLIN, 0}, {ro, POLLIN, 0}};
        for (size_t i = 0; i < n_clients; i++)
            fds[i + 2] = (struct pollfd){clients[i].fd, POLLIN, 0};
        size_t n = n_clients;
        if (poll(fds, n + 2, poll_timeout()) < 0 && errno != EINTR)
            die("poll");
        publish_due();
        for (size_t i = n; i-- > 0;) /* backwards: disconnect() moves the last one here */
            if (fds[i + 2].revents && !handle_client(i))
                disconnect(i);
        if (fds[0].revents)
            accept_client(rw, 1);
        if (fds[1].revents)
            accept_client(ro, 0);
    }
}

/* ---- clients ----------------------------------------------------------------------------- */

static int connect_to(const char *path)
{
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    snprintf(a.sun_path, sizeof a.sun_path, "%s", path);
    int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (s >= 0 && connect(s, (struct sockaddr *)&a, sizeof a) == 0)
        return s;
    if (s >= 0)
        close(s);
    return -1;
}

/* One response header, skipping watch events (qdb-client.c:324 get_response). */
static int response(int fd, struct qdb_hdr *h)
{
    do {
        size_t got = 0;
        while (got < sizeof *h) {
            ssize_t n = read(fd, (char *)h + got, sizeof *h - got);
            if (n <= 0)
                return 0;
            got += n;
        }
    } while (h->type == RESP_WATCH);
    return 1;
}

static int client_main(int argc, char **argv)
{
    if (argc < 4 || (strcmp(argv[1], "write") && strcmp(argv[1], "rm")) || (!strcmp(argv[1], "write") && argc < 5)) {
        fprintf(stderr, "usage: qubesdb-standin write SOCKET KEY VALUE | rm SOCKET KEY\n");
        return 2;
    }
    int fd = connect_to(argv[2]);
    if (fd < 0)
        die(argv[2]);
    int write_cmd = !strcmp(argv[1], "write");
    uint32_t len = write_cmd ? strlen(argv[4]) : 0;
    struct qdb_hdr h;
    if (!send_hdr(fd, write_cmd ? CMD_WRITE : CMD_RM, argv[3], len) || !send_all(fd, argv[4 - !write_cmd], len) ||
        !response(fd, &h))
        die("qubesdb");
    return h.type == RESP_OK ? 0 : h.type == RESP_ERROR_NOENT ? 2 : 1;
}

/*
 * The floor of publication -> exec, for bench/publication.sh: the least a watcher can do.
 * One thread, one connection: WATCH PREFIX, then for ever: READ KEY; if it is there (and was
 * not at the last look) posix_spawn PROGRAM ARGS and reap it; block until the next watch event.
 */
static int floor_main(int argc, char **argv)
{
    extern char **environ;
    if (argc < 6) {
        fprintf(stderr, "usage: qubesdb-standin floor SOCKET PREFIX KEY PROGRAM [ARGS...]\n");
        return 2;
    }
    int fd = connect_to(argv[2]), present = 0;
    struct qdb_hdr h;
    if (fd < 0 || !send_hdr(fd, CMD_WATCH, argv[3], 0) || !response(fd, &h) || h.type != RESP_OK)
        die("floor: watch");
    for (;;) {
        char value[MAX_DATA];
        if (!send_hdr(fd, CMD_READ, argv[4], 0) || !response(fd, &h))
            die("floor: read");
        if (h.type == RESP_READ && h.data_len <= MAX_DATA) {
            for (uint32_t got = 0; got < h.data_len;) {
                ssize_t n = read(fd, value + got, h.data_len - got);
                if (n <= 0)
                    die("floor: read");
                got += n;
            }
            if (!present) {
                pid_t pid;
                if (posix_spawn(&pid, argv[5], NULL, NULL, argv + 5, environ) == 0)
                    waitpid(pid, NULL, 0);
            }
        }
        present = h.type == RESP_READ;
        /* the next watch event (response() would skip it: read the header here) */
        for (size_t got = 0; got < sizeof h;) {
            ssize_t n = read(fd, (char *)&h + got, sizeof h - got);
            if (n <= 0)
                die("floor: watch event");
            got += n;
        }
    }
}

/* qubesdb-cmd.c (v4.2.10) usage(), abridged: what matters is where it goes and the exit code */
static void usage(const char *argv0)
{
    fprintf(stderr, "Usage: %s [-frq] [-c <command>] [-d <destination domain>] \n"
                    "       [command arguments]\n", argv0);
    fprintf(stderr, "  -r - print raw value (affects reading commands)\n");
}

static int reader_socket(void)
{
    char exe[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (n > 0) {
        exe[n] = 0;
        char beside[PATH_MAX + 16];
        snprintf(beside, sizeof beside, "%s/qubesdb.sock", dirname(exe));
        if (access(beside, F_OK) == 0)
            return connect_to(beside);
    }
    int fd = connect_to("/var/run/qubes/qubesdb.sock");
    return fd >= 0 ? fd : connect_to("/var/run/qubes/qubesdb.ro.sock");
}

/* One key, as cmd_read does (qubesdb-cmd.c:67-115): 0 printed, 1 failed, 2 no such entry. */
static int read_one(int fd, const char *key, int raw, int quiet)
{
    struct qdb_hdr h;
    char value[MAX_DATA + 1];
    if (key[0] != '/' || strlen(key) >= MAX_PATH || !send_hdr(fd, CMD_READ, key, 0) || !response(fd, &h) ||
        (h.type == RESP_READ && h.data_len > MAX_DATA))
        return 1;
    if (h.type != RESP_READ) {
        if (!quiet)
            fprintf(stderr, "Failed to read %s\n", key);
        return h.type == RESP_ERROR_NOENT ? 2 : 1;
    }
    for (uint32_t got = 0; got < h.data_len;) {
        ssize_t n = read(fd, value + got, h.data_len - got);
        if (n <= 0)
            return 1;
        got += n;
    }
    value[h.data_len] = '\n';
    if (raw) { /* qubesdb-cmd.c:34-41 */
        fwrite(value, 1, h.data_len + 1, stdout);
        return 0;
    }
    for (uint32_t k = 0; k < h.data_len; k++)
        if (value[k] >= 0x20 && (unsigned char)value[k] < 0x80)
            putchar(value[k]);
        else
            printf("\\x%02hhx", (unsigned char)value[k]);
    putchar('\n');
    return 0;
}

static int reader_main(int argc, char **argv)
{
    int raw = 0, quiet = 0, opt, is_read = 0;
    const char *cmd = strchr(argv[0], '-'); /* the FIRST '-' (qubesdb-cmd.c:290 at v4.2.10) */
    if (cmd && !strcmp(cmd + 1, "read"))
        is_read = 1;
    while ((opt = getopt(argc, argv, "hxc:d:n:e:frqw")) != -1) {
        if (opt == 'r')
            raw = 1;
        else if (opt == 'q')
            quiet = 1;
        else if (opt == 'h' || opt == '?') {
            usage(argv[0]);
            return opt == '?';
        }
    }
    if (argc <= 1 || !is_read) { /* qubesdb-cmd.c:364-366: usage, and success */
        usage(argv[0]);
        return 0;
    }
    int fd = reader_socket();
    if (fd < 0) {
        if (!quiet)
            fprintf(stderr, "Failed connect to local daemon\n");
        return 1;
    }
    int failed = 0, enoent = 0;
    for (int i = optind; i < argc; i++) {
        int r = read_one(fd, argv[i], raw, quiet);
        failed |= r == 1;
        enoent |= r == 2;
    }
    return failed ? 1 : enoent ? 2 : 0; /* qubesdb-cmd.c:112-114 */
}

int main(int argc, char **argv)
{
    signal(SIGPIPE, SIG_IGN);
    const char *base = strrchr(argv[0], '/');
    base = base ? base + 1 : argv[0];
    if (!strcmp(base, "qubesdb-standin")) {
        if (argc >= 2 && !strcmp(argv[1], "daemon"))
            return daemon_main(argc - 1, argv + 1);
        if (argc >= 2 && !strcmp(argv[1], "floor"))
            return floor_main(argc, argv);
        return client_main(argc, argv);
    }
    return reader_main(argc, argv);
}
