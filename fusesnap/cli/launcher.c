/* The console scripts' launcher: the mount server's client without a Python interpreter.
 *
 * A mount program's start is on every container's critical path (podman runs
 * `fusesnap-overlay` per container, containerd's mount.fuse3 runs `fusesnap`),
 * and a Python interpreter takes 7-10 ms to start before the client
 * (cli/mountclient.py) can hand the command to the mount server. This program
 * speaks the same protocol for the command lines that go to the server
 * (cli/mountargs.py, as cli/entry.py picks them) and execs the Python console
 * script for everything else: another command line, no server listening yet (the
 * script starts one), a refusal, non-ASCII arguments, a request too large, or any
 * error before the command was handed over. Nothing has run before the worker's
 * "S", so falling back before it is always safe.
 *
 * cli/launcher.py compiles it once per command with launcher_build.h, which names
 * the command and the install it belongs to: the interpreter, its version and the
 * client module whose stat is part of the server's socket name, and the Python
 * script to fall back on. FUSESNAP_LAUNCHER_TRACE=1 prints what it decided.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/un.h>
#include <unistd.h>

#include "launcher_build.h"   /* FUSESNAP_KIND, FUSESNAP_PYTHON, FUSESNAP_PYVERSION, FUSESNAP_CLIENT,
                                 FUSESNAP_SCRIPT */

extern char **environ;

#define MAX_REQUEST 200000
#define START_TIMEOUT_MS (120 * 1000)

static int trace;

static void note(const char *what)
{
    if (trace)
        fprintf(stderr, "%s: launcher: %s\n", FUSESNAP_KIND, what);
}

/* ---- a growable byte buffer ---- */

struct buf { unsigned char *p; size_t len, cap; int failed; };

static void put(struct buf *b, const void *data, size_t n)
{
    if (b->failed)
        return;
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->len + n)
            cap *= 2;
        unsigned char *p = realloc(b->p, cap);
        if (!p) { b->failed = 1; return; }
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->len, data, n);
    b->len += n;
}

static void puts_(struct buf *b, const char *s) { put(b, s, strlen(s)); }

static void put_file(struct buf *b, const char *path)
{
    /* the whole file, or "-" when it cannot be read (procctx._read) */
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) { puts_(b, "-"); return; }
    size_t start = b->len;
    char chunk[4096];
    for (;;) {
        ssize_t n = read(fd, chunk, sizeof chunk);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            b->len = start;
            puts_(b, "-");
            break;
        }
        if (n == 0)
            break;
        put(b, chunk, (size_t)n);
    }
    close(fd);
}

/* ---- SHA-256 (FIPS 180-4) ---- */

static const uint32_t K[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
};

#define ROR(x, n) (((x) >> (n)) | ((x) << (32 - (n))))

static void sha256_block(uint32_t h[8], const unsigned char *p)
{
    uint32_t w[64], a, b, c, d, e, f, g, k;
    for (int i = 0; i < 16; i++)
        w[i] = (uint32_t)p[4 * i] << 24 | (uint32_t)p[4 * i + 1] << 16 | (uint32_t)p[4 * i + 2] << 8 | p[4 * i + 3];
    for (int i = 16; i < 64; i++) {
        uint32_t s0 = ROR(w[i - 15], 7) ^ ROR(w[i - 15], 18) ^ (w[i - 15] >> 3);
        uint32_t s1 = ROR(w[i - 2], 17) ^ ROR(w[i - 2], 19) ^ (w[i - 2] >> 10);
        w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    a = h[0]; b = h[1]; c = h[2]; d = h[3]; e = h[4]; f = h[5]; g = h[6]; k = h[7];
    for (int i = 0; i < 64; i++) {
        uint32_t t1 = k + (ROR(e, 6) ^ ROR(e, 11) ^ ROR(e, 25)) + ((e & f) ^ (~e & g)) + K[i] + w[i];
        uint32_t t2 = (ROR(a, 2) ^ ROR(a, 13) ^ ROR(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
        k = g; g = f; f = e; e = d + t1; d = c; c = b; b = a; a = t1 + t2;
    }
    h[0] += a; h[1] += b; h[2] += c; h[3] += d; h[4] += e; h[5] += f; h[6] += g; h[7] += k;
}

static void sha256_hex(const unsigned char *data, size_t len, char out[65])
{
    uint32_t h[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
    unsigned char tail[128] = {0};
    size_t full = len / 64 * 64, rest = len - full;
    for (size_t i = 0; i < full; i += 64)
        sha256_block(h, data + i);
    memcpy(tail, data + full, rest);
    tail[rest] = 0x80;
    size_t tlen = rest < 56 ? 64 : 128;
    uint64_t bits = (uint64_t)len * 8;
    for (int i = 0; i < 8; i++)
        tail[tlen - 1 - i] = (unsigned char)(bits >> (8 * i));
    for (size_t i = 0; i < tlen; i += 64)
        sha256_block(h, tail + i);
    for (int i = 0; i < 32; i++)
        sprintf(out + 2 * i, "%02x", (h[i / 4] >> (24 - 8 * (i % 4))) & 0xff);
}

/* ---- the server's socket name (mountclient.socket_name, procctx.context) ---- */

static const char *const STATUS_KEYS[] = {"Uid:", "Gid:", "Groups:", "CapInh:", "CapPrm:", "CapEff:", "CapBnd:",
                                          "CapAmb:", "NoNewPrivs:", "Seccomp:", NULL};
static const char *const NAMESPACES[] = {"cgroup", "ipc", "mnt", "net", "pid", "time", "user", "uts", NULL};

/* Python's bytes.splitlines() boundaries */
static int line_break(unsigned char c) { return c == '\n' || c == '\r'; }

static void context(struct buf *ctx, const struct buf *status)
{
    int first = 1;
    size_t i = 0;
    while (i < status->len) {
        size_t j = i;
        while (j < status->len && !line_break(status->p[j]))
            j++;
        for (const char *const *k = STATUS_KEYS; *k; k++) {
            size_t kl = strlen(*k);
            if (j - i >= kl && memcmp(status->p + i, *k, kl) == 0) {
                if (!first)
                    puts_(ctx, "\n");
                put(ctx, status->p + i, j - i);
                first = 0;
                break;
            }
        }
        if (j + 1 < status->len && status->p[j] == '\r' && status->p[j + 1] == '\n')
            j++;
        i = j + 1;
    }
    char path[64], link[256];
    for (const char *const *ns = NAMESPACES; *ns; ns++) {
        if (!first)
            puts_(ctx, "\n");
        first = 0;
        snprintf(path, sizeof path, "/proc/self/ns/%s", *ns);
        ssize_t n = readlink(path, link, sizeof link);
        if (n < 0 || n == (ssize_t)sizeof link)
            puts_(ctx, "-");
        else
            put(ctx, link, (size_t)n);
    }
    struct stat st;
    char line[96];
    if (stat("/proc/self/root", &st) == 0)
        snprintf(line, sizeof line, "\nroot %llu:%llu", (unsigned long long)st.st_dev, (unsigned long long)st.st_ino);
    else
        snprintf(line, sizeof line, "\nroot -");
    puts_(ctx, line);
    static const char *const FILES[] = {"/proc/self/cgroup", "/proc/self/limits", "/proc/self/oom_score_adj",
                                        "/proc/self/attr/current", NULL};
    for (const char *const *f = FILES; *f; f++) {
        puts_(ctx, "\n");
        put_file(ctx, *f);
    }
}

static int socket_name(const struct buf *status, struct sockaddr_un *addr, socklen_t *len)
{
    struct stat st;
    if (stat(FUSESNAP_CLIENT, &st) != 0)
        return -1;
    struct buf b = {0};
    context(&b, status);
    char install[128];
    snprintf(install, sizeof install, "%llu:%llu:%lld", (unsigned long long)st.st_dev,
             (unsigned long long)st.st_ino, (long long)st.st_mtim.tv_sec * 1000000000LL + st.st_mtim.tv_nsec);
    put(&b, "\0", 1);
    put(&b, FUSESNAP_PYTHON, strlen(FUSESNAP_PYTHON));
    put(&b, "\0", 1);
    put(&b, FUSESNAP_PYVERSION, strlen(FUSESNAP_PYVERSION));
    put(&b, "\0", 1);
    puts_(&b, install);
    if (b.failed) { free(b.p); return -1; }
    char hex[65];
    sha256_hex(b.p, b.len, hex);
    free(b.p);
    hex[32] = 0;
    memset(addr, 0, sizeof *addr);
    addr->sun_family = AF_UNIX;
    int n = snprintf(addr->sun_path + 1, sizeof addr->sun_path - 1, "fusesnap-mountd-%u-%s", (unsigned)geteuid(), hex);
    *len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + n);
    return 0;
}

/* ---- which command lines go to the server (cli/mountargs.py, cli/entry.py) ---- */

static int has_debug_option(const char *opts)
{
    const char *p = opts;
    for (;;) {
        const char *comma = strchr(p, ',');
        size_t n = comma ? (size_t)(comma - p) : strlen(p);
        if (n == 5 && memcmp(p, "debug", 5) == 0)
            return 1;
        if (!comma)
            return 0;
        p = comma + 1;
    }
}

/* overlay_daemonizes: a `fusesnap-overlay` command line that mounts and daemonizes */
static int overlay_daemonizes(int n, char **a)
{
    static const char *const LOCAL[] = {"-f", "-d", "--debug", "-h", "--help", "-V", "--version", NULL};
    if (n < 1)
        return 0;
    for (int i = 0; i < n; i++)
        for (const char *const *l = LOCAL; *l; l++)
            if (strcmp(a[i], *l) == 0)
                return 0;
    for (int i = 0; i < n; i++) {
        const char *opts = "";
        if (strcmp(a[i], "-o") == 0 && i + 1 < n)
            opts = a[i + 1];
        else if (strncmp(a[i], "-o", 2) == 0)
            opts = a[i] + 2;
        if (has_debug_option(opts))
            return 0;
    }
    return 1;
}

/* helper_source: mount(8) may have turned the helper form's SOURCE `fusesnap` into an
 * absolute path; a[i] then becomes "fusesnap" again */
static void helper_source(int n, char **a)
{
    for (int i = 0; i < n; i++) {
        if (strcmp(a[i], "--root") == 0)
            continue;
        if (a[i][0] != '-' && (i == 0 || strcmp(a[i - 1], "--root") != 0)) {
            const char *slash = strrchr(a[i], '/');
            if (a[i][0] == '/' && strcmp(slash + 1, "fusesnap") == 0)
                a[i] = "fusesnap";
            return;
        }
    }
}

/* plain_mount_args(...) is not None: `fusesnap [--root R] [-v] [--json] mount KEY MP
 * [-o OPT]... [--json]` or the helper form `fusesnap ... fusesnap TARGET [-o OPTS]...` */
static int plain_mount(int n, char **a)
{
    static const char *const GLOBAL[] = {"-v", "-vv", "-vvv", "--verbose", "--json", NULL};
    int i = 0;
    while (i < n && a[i][0] == '-') {
        int known = 0;
        for (const char *const *g = GLOBAL; *g; g++)
            known = known || strcmp(a[i], *g) == 0;
        if (strcmp(a[i], "--root") == 0 && i + 1 < n && a[i + 1][0] != '-')
            i += 2;
        else if ((strncmp(a[i], "--root=", 7) == 0 && a[i][7]) || known)
            i += 1;
        else
            return 0;
    }
    if (i >= n || (strcmp(a[i], "mount") != 0 && strcmp(a[i], "fusesnap") != 0))
        return 0;
    int mount = strcmp(a[i], "mount") == 0, positional = 0;
    for (int j = i + 1; j < n; j++) {
        if (strcmp(a[j], "-o") == 0 && j + 1 < n && a[j + 1][0] != '-')
            j++;
        else if (strncmp(a[j], "-o", 2) == 0 && a[j][2] && a[j][2] != '=' && a[j][2] != '-')
            continue;
        else if (strcmp(a[j], "--json") == 0)
            continue;
        else if (a[j][0] == '-')
            return 0;         /* -f, --help, anything argparse must judge */
        else
            positional++;
    }
    return positional == (mount ? 2 : 1);
}

/* ---- the request: marshal((1, kind, argv, orig_argv, environ, umask)) ---- */

static void m_int(struct buf *b, int32_t v)
{
    unsigned char x[4] = {(unsigned char)v, (unsigned char)(v >> 8), (unsigned char)(v >> 16), (unsigned char)(v >> 24)};
    put(b, x, 4);
}

static void m_obj(struct buf *b, char type, const char *data, size_t n)
{
    put(b, &type, 1);   /* 'u': str (ASCII here, checked by the caller), 's': bytes */
    m_int(b, (int32_t)n);
    put(b, data, n);
}

static void m_str(struct buf *b, const char *s) { m_obj(b, 'u', s, strlen(s)); }

static int ascii(const char *s)
{
    for (; *s; s++)
        if ((unsigned char)*s >= 0x80)
            return 0;
    return 1;
}

static void request(struct buf *b, int n, char **args, int argc, char **argv, int umask_)
{
    put(b, "(", 1);
    m_int(b, 6);
    put(b, "i", 1);
    m_int(b, 1);
    m_str(b, FUSESNAP_KIND);
    put(b, "[", 1);
    m_int(b, n);
    for (int i = 0; i < n; i++)
        m_str(b, args[i]);
    /* the command line a console script's process has: [interpreter, script, *args] */
    put(b, "[", 1);
    m_int(b, argc + 1);
    m_str(b, FUSESNAP_PYTHON);
    for (int i = 0; i < argc; i++)
        m_str(b, argv[i]);
    put(b, "{", 1);
    for (char **e = environ; *e; e++) {
        const char *eq = strchr(*e, '=');
        if (!eq || eq == *e)
            continue;      /* as os.environb: no name, no entry */
        m_obj(b, 's', *e, (size_t)(eq - *e));
        m_obj(b, 's', eq + 1, strlen(eq + 1));
    }
    put(b, "0", 1);
    put(b, "i", 1);
    m_int(b, umask_);
}

static int status_umask(const struct buf *status)
{
    const char *key = "\nUmask:";
    for (size_t i = 0; i + 7 < status->len; i++)
        if (memcmp(status->p + i, key, 7) == 0)
            return (int)strtol((const char *)status->p + i + 7, NULL, 8);
    mode_t m = umask(022);
    umask(m);
    return (int)m;
}

/* ---- talking to the server (mountclient.submit, _receive, _give_up) ---- */

enum { FALLBACK = -1, RETRY = -2 };

static int send_request(int sock, const struct buf *req, int cwd)
{
    int fds[4] = {0, 1, 2, cwd};
    char control[CMSG_SPACE(sizeof fds)];
    memset(control, 0, sizeof control);
    struct iovec iov = {req->p, req->len};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control, .msg_controllen = sizeof control};
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof fds);
    memcpy(CMSG_DATA(c), fds, sizeof fds);
    return sendmsg(sock, &msg, MSG_NOSIGNAL) == (ssize_t)req->len ? 0 : -1;
}

static int give_up(int sock)
{
    char msg[16];
    shutdown(sock, SHUT_RDWR);
    if (recv(sock, msg, sizeof msg, MSG_DONTWAIT) == 1 && msg[0] == 'S') {
        fputs("fusesnap: the mount server started the command late and no longer reports to it\n", stderr);
        return 1;
    }
    return FALLBACK;
}

/* The exit status, RETRY (the server went away before starting anything) or
 * FALLBACK (refused or not started in time: nothing ran). */
static int receive(int sock)
{
    int started = 0;
    char msg[4096];
    struct pollfd p = {sock, POLLIN, 0};
    for (;;) {
        if (!started) {
            int r = poll(&p, 1, START_TIMEOUT_MS);
            if (r < 0 && errno == EINTR)
                continue;
            if (r == 0)
                return give_up(sock);
        }
        ssize_t n = recv(sock, msg, sizeof msg - 1, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            if (!started)
                return RETRY;
            fputs(n == 0 ? "fusesnap: the mount server's worker ended without an exit status\n"
                         : "fusesnap: lost the mount server's worker before it reported\n", stderr);
            return 1;
        }
        msg[n] = 0;
        if (n == 1 && msg[0] == 'S')
            started = 1;
        else if (msg[0] == 'R')
            return atoi(msg + 1) & 0xff;     /* as _exit() would keep it; never < 0 (fallback) */
        else if (msg[0] == 'N' && !started)
            return FALLBACK;
    }
}

static void on_interrupt(int sig)
{
    (void)sig;
    _exit(130);
}

/* `args` (n of them): the command line as the server runs it; argv: as this process got it */
static int through_server(int n, char **args, int argc, char **argv)
{
    for (int fd = 0; fd < 3; fd++)   /* a closed stdio descriptor cannot be sent: give it /dev/null */
        if (fcntl(fd, F_GETFD) < 0 && open("/dev/null", O_RDWR) < 0)
            return FALLBACK;
    struct buf status = {0};
    put_file(&status, "/proc/self/status");
    struct sockaddr_un addr;
    socklen_t addrlen;
    if (status.failed || socket_name(&status, &addr, &addrlen) != 0) {
        note("fallback: no socket name (client module not found)");
        return FALLBACK;
    }
    struct buf req = {0};
    request(&req, n, args, argc, argv, status_umask(&status));
    free(status.p);
    if (req.failed || req.len > MAX_REQUEST) {
        note("fallback: request too large");
        return FALLBACK;
    }
    int cwd = open(".", O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (cwd < 0)
        return FALLBACK;
    signal(SIGINT, on_interrupt);
    int rc = FALLBACK;
    for (int attempt = 0; attempt < 3; attempt++) {
        int sock = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
        if (sock < 0)
            break;
        if (connect(sock, (struct sockaddr *)&addr, addrlen) != 0) {
            note("fallback: no mount server listening");
            close(sock);
            break;
        }
        if (send_request(sock, &req, cwd) != 0) {
            close(sock);
            continue;
        }
        rc = receive(sock);
        close(sock);
        if (rc != RETRY)
            break;
        rc = FALLBACK;
    }
    close(cwd);
    free(req.p);
    signal(SIGINT, SIG_DFL);
    if (rc >= 0)
        note("served by the mount server");
    return rc;
}

int main(int argc, char **argv)
{
    const char *t = getenv("FUSESNAP_LAUNCHER_TRACE");
    trace = t && strcmp(t, "1") == 0;
    const char *sw = getenv("FUSESNAP_MOUNT_SERVER");
    int plain = 1;
    for (int i = 0; i < argc; i++)
        plain = plain && ascii(argv[i]);
    int n = argc - 1;
    char **args = calloc((size_t)argc + 2, sizeof *args);
    if (!args)
        return 1;
    memcpy(args, argv + 1, (size_t)n * sizeof *args);
    int overlay = strcmp(FUSESNAP_KIND, "fusesnap-overlay") == 0;
    if (!overlay)
        helper_source(n, args);
    if (!plain)
        note("fallback: non-ASCII arguments");
    else if (sw && strcmp(sw, "0") == 0)
        note("fallback: FUSESNAP_MOUNT_SERVER=0");
    else if (overlay ? !overlay_daemonizes(n, args) : !plain_mount(n, args))
        note(overlay ? "fallback: not a mount that daemonizes" : "fallback: not a plain mount command");
    else {
        int rc = through_server(n, args, argc, argv);
        if (rc >= 0)
            return rc;          /* 0-255 (receive) */
    }
    /* the console script: [interpreter, script, *argv[1:]] */
    args[0] = (char *)FUSESNAP_PYTHON;
    args[1] = (char *)FUSESNAP_SCRIPT;
    memcpy(args + 2, argv + 1, (size_t)n * sizeof *args);
    args[argc + 1] = NULL;
    execv(FUSESNAP_PYTHON, args);
    fprintf(stderr, "%s: cannot run %s: %s\n", FUSESNAP_KIND, FUSESNAP_PYTHON, strerror(errno));
    return 1;
}
