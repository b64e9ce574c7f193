/*
 * ember-agent: PID 1 of every Ember microVM.
 *
 * Boots the guest (mounts, overlay root, switch_root, hostname), then serves
 * the framed protocol of docs/agent-protocol.md on a virtio-serial port: it
 * starts processes, pumps their stdin/stdout/stderr, reports their exit, and
 * reaps every zombie. One static binary, no libc name service (NSS): users and
 * groups are read from /etc/passwd and /etc/group by hand.
 *
 * Test mode: `ember-agent --serve-fd N` (or EMBER_AGENT_FD=N) when not PID 1
 * skips the boot and serves the protocol on fd N (a socket); SHUTDOWN then
 * kills the children and exits 0 instead of rebooting.
 *
 * Build: gcc -static -Os -Wall -Wextra -o ember-agent agent.c
 */
#define _GNU_SOURCE
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <arpa/inet.h>
#include <net/if.h>
#include <net/route.h>
#include <netinet/in.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/reboot.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define AGENT_NAME "ember-agent/0.1"
#define PROTO_VERSION 1
#define HDR 9
#define MAX_PAYLOAD (1u << 20)
#define CHUNK 65536
#define STDIN_HIGH (1u << 20)     /* stop reading the port while a stdin buffer is this full */
#define DRAIN_MAX_READS 64        /* at exit: at most 64 x 64 KiB more output per stream */
#define BACKOFF_MS 50             /* virtio port without a host: retry every 50 ms */
#define MAX_GROUPS 64
#define TOOL_MAX (8u << 20)       /* the largest tool (a static busybox is ~2 MiB) */
#define DEFAULT_PATH "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

enum {
    T_HELLO = 0x01, T_READY = 0x02,
    T_EXEC = 0x10, T_STDIN = 0x11, T_SIGNAL = 0x12, T_RESIZE = 0x13, T_TOOL = 0x14,
    T_SHUTDOWN = 0x1F,
    T_STARTED = 0x20, T_STDOUT = 0x21, T_STDERR = 0x22, T_EXIT = 0x23, T_ERROR = 0x24,
    T_TOOL_STATUS = 0x25,
};

/* ERROR codes: 127/126 on a process channel (never started); these otherwise. */
#define E_BAD_REQUEST 1
#define E_FRAMING 2

static int g_pid1;
static int g_test_mode;
static int g_port = -1;
static int g_sigfd = -1;
static int g_quit;                /* test mode: the host hung up */
static int g_desync;              /* framing error: drop input until the host reconnects */
static struct timespec g_backoff_until;
static int g_backoff;

static unsigned char *g_rx;       /* HDR + MAX_PAYLOAD */
static size_t g_rxlen;
static unsigned char g_tx[HDR + CHUNK];

/* The tool (a static busybox the host sends with TOOL frames): a sealed,
 * read-only memfd that EXEC "tool": true runs with execveat. It never touches
 * the guest's filesystem. g_tool_load is the memfd of a load in progress. */
static int g_tool_fd = -1;
static int g_tool_load = -1;
static size_t g_tool_len;
static char g_tool_err[256];      /* why the load in progress failed; "" = fine so far */

/* ------------------------------------------------------------------ logging */

static void logmsg(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void logmsg(const char *fmt, ...)
{
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    dprintf(2, "ember-agent: %s\n", buf);
}

static void power_off(void)
{
    sync();
    reboot(RB_AUTOBOOT);
    /* Not reached; should reboot fail, PID 1 exiting panics the kernel (panic=-1). */
    _exit(1);
}

static void die(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static void die(const char *fmt, ...)
{
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    dprintf(2, "ember-agent: fatal: %s\n", buf);
    if (g_pid1)
        power_off();
    exit(1);
}

static long long now_ms(clockid_t clk)
{
    struct timespec ts;
    clock_gettime(clk, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void sleep_ms(long ms)
{
    struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR) {
    }
}

/* ------------------------------------------------------------- JSON output */

struct jw {
    char *buf;
    size_t cap, len;
};

static void jw_raw(struct jw *w, const char *s, size_t n)
{
    if (w->len + n + 1 > w->cap)
        n = w->cap - w->len - 1;  /* truncate; callers keep well below cap */
    memcpy(w->buf + w->len, s, n);
    w->len += n;
    w->buf[w->len] = 0;
}

static void jw_puts(struct jw *w, const char *s) { jw_raw(w, s, strlen(s)); }

/* Length of the valid UTF-8 sequence at s (n bytes left), 0 if invalid. */
static size_t utf8_seq(const unsigned char *s, size_t n)
{
    unsigned c = s[0];
    size_t len;
    unsigned cp;
    if (c < 0x80) return 1;
    if (c >= 0xC2 && c <= 0xDF) { len = 2; cp = c & 0x1F; }
    else if (c >= 0xE0 && c <= 0xEF) { len = 3; cp = c & 0x0F; }
    else if (c >= 0xF0 && c <= 0xF4) { len = 4; cp = c & 0x07; }
    else return 0;
    if (n < len) return 0;
    for (size_t i = 1; i < len; i++) {
        if ((s[i] & 0xC0) != 0x80) return 0;
        cp = (cp << 6) | (s[i] & 0x3F);
    }
    if ((len == 3 && cp < 0x800) || (len == 4 && (cp < 0x10000 || cp > 0x10FFFF)))
        return 0;
    if (cp >= 0xD800 && cp <= 0xDFFF) return 0;
    return len;
}

/* A JSON string literal; invalid UTF-8 becomes U+FFFD so the host can decode it. */
static void jw_str(struct jw *w, const char *s)
{
    const unsigned char *p = (const unsigned char *)s;
    size_t n = strlen(s);
    jw_puts(w, "\"");
    while (n > 0 && w->len + 64 < w->cap) {  /* leave room for the rest */
        unsigned c = *p;
        char esc[8];
        if (c == '"') jw_puts(w, "\\\"");
        else if (c == '\\') jw_puts(w, "\\\\");
        else if (c == '\n') jw_puts(w, "\\n");
        else if (c == '\t') jw_puts(w, "\\t");
        else if (c < 0x20 || c == 0x7F) {
            snprintf(esc, sizeof esc, "\\u%04x", c);
            jw_puts(w, esc);
        } else if (c >= 0x80) {
            size_t l = utf8_seq(p, n);
            if (l == 0) {
                jw_puts(w, "\\ufffd");
                l = 1;
            } else {
                jw_raw(w, (const char *)p, l);
            }
            p += l;
            n -= l;
            continue;
        } else {
            jw_raw(w, (const char *)p, 1);
        }
        p++;
        n--;
    }
    jw_puts(w, "\"");
}

static void jw_key(struct jw *w, const char *k)
{
    jw_puts(w, w->len > 1 ? ",\"" : "\"");
    jw_puts(w, k);
    jw_puts(w, "\":");
}

static void jw_int(struct jw *w, const char *k, long long v)
{
    char num[32];
    jw_key(w, k);
    snprintf(num, sizeof num, "%lld", v);
    jw_puts(w, num);
}

static void jw_kstr(struct jw *w, const char *k, const char *v)
{
    jw_key(w, k);
    jw_str(w, v);
}

/* -------------------------------------------------------------- JSON input */

/* The flat request objects of the protocol. Unknown keys are skipped. */
struct req {
    char **argv; size_t argc; int has_argv;
    char **env; size_t envc;
    char *cwd;
    char *user;
    int tty, stdin_, tool;
    long long rows, cols, sig;
    int has_rows, has_cols, has_sig;
};

struct jp {
    const char *s, *e;
    const char *err;
};

static void jp_ws(struct jp *p)
{
    while (p->s < p->e && (*p->s == ' ' || *p->s == '\t' || *p->s == '\n' || *p->s == '\r'))
        p->s++;
}

static int jp_fail(struct jp *p, const char *msg)
{
    if (!p->err) p->err = msg;
    return -1;
}

static int jp_expect(struct jp *p, char c)
{
    jp_ws(p);
    if (p->s >= p->e || *p->s != c) return jp_fail(p, "malformed JSON");
    p->s++;
    return 0;
}

static int jp_hex4(struct jp *p, unsigned *out)
{
    unsigned v = 0;
    if (p->e - p->s < 4) return jp_fail(p, "bad \\u escape");
    for (int i = 0; i < 4; i++) {
        char c = p->s[i];
        v <<= 4;
        if (c >= '0' && c <= '9') v |= (unsigned)(c - '0');
        else if (c >= 'a' && c <= 'f') v |= (unsigned)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F') v |= (unsigned)(c - 'A' + 10);
        else return jp_fail(p, "bad \\u escape");
    }
    p->s += 4;
    *out = v;
    return 0;
}

/* Parse a string; with out != NULL, return it decoded, NUL-terminated, malloc'd.
 * NUL characters are refused (they cannot reach a C string). */
static int jp_string(struct jp *p, char **out)
{
    char *buf = NULL, *q = NULL;
    jp_ws(p);
    if (p->s >= p->e || *p->s != '"') return jp_fail(p, "expected a string");
    p->s++;
    if (out) {
        /* decoded length <= encoded length */
        const char *t = p->s;
        while (t < p->e && *t != '"') t += (*t == '\\' && t + 1 < p->e) ? 2 : 1;
        buf = q = malloc((size_t)(t - p->s) + 1);
        if (!buf) return jp_fail(p, "out of memory");
    }
    for (;;) {
        unsigned char c;
        if (p->s >= p->e) goto bad;
        c = (unsigned char)*p->s++;
        if (c == '"') break;
        if (c < 0x20) goto bad;
        if (c != '\\') {
            if (q) *q++ = (char)c;
            continue;
        }
        if (p->s >= p->e) goto bad;
        c = (unsigned char)*p->s++;
        switch (c) {
        case '"': case '\\': case '/': if (q) *q++ = (char)c; break;
        case 'b': if (q) *q++ = '\b'; break;
        case 'f': if (q) *q++ = '\f'; break;
        case 'n': if (q) *q++ = '\n'; break;
        case 'r': if (q) *q++ = '\r'; break;
        case 't': if (q) *q++ = '\t'; break;
        case 'u': {
            unsigned cp, lo;
            if (jp_hex4(p, &cp) < 0) goto fail;
            if (cp >= 0xDC00 && cp <= 0xDFFF) goto bad;
            if (cp >= 0xD800 && cp <= 0xDBFF) {
                if (p->e - p->s < 6 || p->s[0] != '\\' || p->s[1] != 'u') goto bad;
                p->s += 2;
                if (jp_hex4(p, &lo) < 0) goto fail;
                if (lo < 0xDC00 || lo > 0xDFFF) goto bad;
                cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
            }
            if (cp == 0) {
                jp_fail(p, "NUL character in a string");
                goto fail;
            }
            if (!q) break;
            if (cp < 0x80) {
                *q++ = (char)cp;
            } else if (cp < 0x800) {
                *q++ = (char)(0xC0 | (cp >> 6));
                *q++ = (char)(0x80 | (cp & 0x3F));
            } else if (cp < 0x10000) {
                *q++ = (char)(0xE0 | (cp >> 12));
                *q++ = (char)(0x80 | ((cp >> 6) & 0x3F));
                *q++ = (char)(0x80 | (cp & 0x3F));
            } else {
                *q++ = (char)(0xF0 | (cp >> 18));
                *q++ = (char)(0x80 | ((cp >> 12) & 0x3F));
                *q++ = (char)(0x80 | ((cp >> 6) & 0x3F));
                *q++ = (char)(0x80 | (cp & 0x3F));
            }
            break;
        }
        default:
            goto bad;
        }
    }
    if (out) {
        if (!q) return jp_fail(p, "out of memory");
        *q = 0;
        *out = buf;
    }
    return 0;
bad:
    jp_fail(p, "malformed JSON string");
fail:
    free(buf);
    return -1;
}

/* A JSON number; *is_int tells whether it is an integer that fits *out. */
static int jp_number(struct jp *p, long long *out, int *is_int)
{
    int integer = 1, digits = 0;
    long long v = 0;
    int neg = 0, overflow = 0;
    jp_ws(p);
    if (p->s < p->e && *p->s == '-') { neg = 1; p->s++; }
    if (p->s < p->e && *p->s == '0') {
        p->s++;
        digits = 1;
    } else {
        while (p->s < p->e && isdigit((unsigned char)*p->s)) {
            if (v > (LLONG_MAX - 9) / 10) overflow = 1;
            else v = v * 10 + (*p->s - '0');
            p->s++;
            digits++;
        }
    }
    if (!digits) return jp_fail(p, "malformed JSON number");
    if (p->s < p->e && *p->s == '.') {
        integer = 0;
        p->s++;
        if (p->s >= p->e || !isdigit((unsigned char)*p->s))
            return jp_fail(p, "malformed JSON number");
        while (p->s < p->e && isdigit((unsigned char)*p->s)) p->s++;
    }
    if (p->s < p->e && (*p->s == 'e' || *p->s == 'E')) {
        integer = 0;
        p->s++;
        if (p->s < p->e && (*p->s == '+' || *p->s == '-')) p->s++;
        if (p->s >= p->e || !isdigit((unsigned char)*p->s))
            return jp_fail(p, "malformed JSON number");
        while (p->s < p->e && isdigit((unsigned char)*p->s)) p->s++;
    }
    *is_int = integer && !overflow;
    *out = neg ? -v : v;
    return 0;
}

static int jp_literal(struct jp *p, const char *lit)
{
    size_t n = strlen(lit);
    jp_ws(p);
    if ((size_t)(p->e - p->s) < n || memcmp(p->s, lit, n) != 0)
        return jp_fail(p, "malformed JSON");
    p->s += n;
    return 0;
}

static int jp_skip(struct jp *p, int depth)
{
    long long n;
    int is_int;
    if (depth > 32) return jp_fail(p, "JSON nested too deeply");
    jp_ws(p);
    if (p->s >= p->e) return jp_fail(p, "malformed JSON");
    switch (*p->s) {
    case '"': return jp_string(p, NULL);
    case 't': return jp_literal(p, "true");
    case 'f': return jp_literal(p, "false");
    case 'n': return jp_literal(p, "null");
    case '[':
        p->s++;
        jp_ws(p);
        if (p->s < p->e && *p->s == ']') { p->s++; return 0; }
        for (;;) {
            if (jp_skip(p, depth + 1) < 0) return -1;
            jp_ws(p);
            if (p->s < p->e && *p->s == ',') { p->s++; continue; }
            return jp_expect(p, ']');
        }
    case '{':
        p->s++;
        jp_ws(p);
        if (p->s < p->e && *p->s == '}') { p->s++; return 0; }
        for (;;) {
            if (jp_string(p, NULL) < 0 || jp_expect(p, ':') < 0 || jp_skip(p, depth + 1) < 0)
                return -1;
            jp_ws(p);
            if (p->s < p->e && *p->s == ',') { p->s++; continue; }
            return jp_expect(p, '}');
        }
    default:
        return jp_number(p, &n, &is_int);
    }
}

static int jp_is_null(struct jp *p)
{
    jp_ws(p);
    if (p->e - p->s >= 4 && memcmp(p->s, "null", 4) == 0) {
        p->s += 4;
        return 1;
    }
    return 0;
}

static void free_strv(char **v, size_t n)
{
    if (!v) return;
    for (size_t i = 0; i < n; i++) free(v[i]);
    free(v);
}

static int jp_strv(struct jp *p, char ***out, size_t *outn)
{
    char **v = NULL;
    size_t n = 0, cap = 0;
    if (jp_expect(p, '[') < 0) return -1;
    jp_ws(p);
    if (p->s < p->e && *p->s == ']') {
        p->s++;
    } else {
        for (;;) {
            char *s = NULL;
            if (n + 1 >= cap) {
                size_t ncap = cap ? cap * 2 : 8;
                char **nv = realloc(v, ncap * sizeof *nv);
                if (!nv) { jp_fail(p, "out of memory"); goto fail; }
                v = nv;
                cap = ncap;
            }
            if (jp_string(p, &s) < 0) { jp_fail(p, "expected an array of strings"); goto fail; }
            v[n++] = s;
            jp_ws(p);
            if (p->s < p->e && *p->s == ',') { p->s++; continue; }
            if (jp_expect(p, ']') < 0) goto fail;
            break;
        }
    }
    if (!v) {
        v = malloc(sizeof *v);
        if (!v) return jp_fail(p, "out of memory");
    }
    v[n] = NULL;
    *out = v;
    *outn = n;
    return 0;
fail:
    free_strv(v, n);
    return -1;
}

static int jp_bool(struct jp *p, int *out)
{
    jp_ws(p);
    if (p->s < p->e && *p->s == 't') { *out = 1; return jp_literal(p, "true"); }
    if (p->s < p->e && *p->s == 'f') { *out = 0; return jp_literal(p, "false"); }
    return jp_fail(p, "expected a boolean");
}

static int jp_int(struct jp *p, long long *out)
{
    int is_int;
    jp_ws(p);
    if (p->s >= p->e || !(*p->s == '-' || isdigit((unsigned char)*p->s)))
        return jp_fail(p, "expected an integer");
    if (jp_number(p, out, &is_int) < 0) return -1;
    if (!is_int) return jp_fail(p, "expected an integer");
    return 0;
}

static void req_free(struct req *r)
{
    free_strv(r->argv, r->argc);
    free_strv(r->env, r->envc);
    free(r->cwd);
    free(r->user);
    memset(r, 0, sizeof *r);
}

/* Parse a control payload (a JSON object) into r. Returns -1 with *err set. */
static int parse_req(const unsigned char *buf, size_t len, struct req *r, const char **err)
{
    struct jp p = { (const char *)buf, (const char *)buf + len, NULL };
    memset(r, 0, sizeof *r);
    r->stdin_ = 1;
    if (jp_expect(&p, '{') < 0) {
        p.err = "payload is not a JSON object";
        goto fail;
    }
    jp_ws(&p);
    if (p.s < p.e && *p.s == '}') {
        p.s++;
    } else {
        for (;;) {
            char *key = NULL;
            int rc = 0;
            if (jp_string(&p, &key) < 0 || jp_expect(&p, ':') < 0) {
                free(key);
                goto fail;
            }
            if (jp_is_null(&p)) {
                /* null: as if absent */
            } else if (!strcmp(key, "argv")) {
                free_strv(r->argv, r->argc);
                r->argv = NULL;
                rc = jp_strv(&p, &r->argv, &r->argc);
                r->has_argv = rc == 0;
            } else if (!strcmp(key, "env")) {
                free_strv(r->env, r->envc);
                r->env = NULL;
                r->envc = 0;
                rc = jp_strv(&p, &r->env, &r->envc);
            } else if (!strcmp(key, "cwd")) {
                free(r->cwd);
                r->cwd = NULL;
                rc = jp_string(&p, &r->cwd);
            } else if (!strcmp(key, "user")) {
                free(r->user);
                r->user = NULL;
                rc = jp_string(&p, &r->user);
            } else if (!strcmp(key, "tty")) {
                rc = jp_bool(&p, &r->tty);
            } else if (!strcmp(key, "stdin")) {
                rc = jp_bool(&p, &r->stdin_);
            } else if (!strcmp(key, "tool")) {
                rc = jp_bool(&p, &r->tool);
            } else if (!strcmp(key, "rows")) {
                rc = jp_int(&p, &r->rows);
                r->has_rows = 1;
            } else if (!strcmp(key, "cols")) {
                rc = jp_int(&p, &r->cols);
                r->has_cols = 1;
            } else if (!strcmp(key, "signal")) {
                rc = jp_int(&p, &r->sig);
                r->has_sig = 1;
            } else {
                rc = jp_skip(&p, 1);
            }
            free(key);
            if (rc < 0) goto fail;
            jp_ws(&p);
            if (p.s < p.e && *p.s == ',') { p.s++; continue; }
            if (jp_expect(&p, '}') < 0) goto fail;
            break;
        }
    }
    jp_ws(&p);
    if (p.s != p.e) {
        p.err = "trailing data after the JSON object";
        goto fail;
    }
    return 0;
fail:
    *err = p.err ? p.err : "malformed JSON";
    req_free(r);
    return -1;
}

/* ---------------------------------------------------------------- the port */

static void host_gone(void)
{
    if (g_test_mode) {
        g_quit = 1;
        return;
    }
    /* virtio-serial without a host: reads give 0, poll gives POLLHUP for as long
     * as nobody is connected. Forget any half frame and poll the port again later. */
    g_desync = 0;
    g_backoff = 1;       /* the main loop also drops g_rx */
    clock_gettime(CLOCK_MONOTONIC, &g_backoff_until);
    g_backoff_until.tv_nsec += BACKOFF_MS * 1000000L;
    if (g_backoff_until.tv_nsec >= 1000000000L) {
        g_backoff_until.tv_sec++;
        g_backoff_until.tv_nsec -= 1000000000L;
    }
}

/* Write a whole buffer to the port, waiting while it is full. Dropped when the
 * host is gone. Returns 0 or -1 (dropped). */
static int port_write(const unsigned char *p, size_t len)
{
    if (g_quit || g_port < 0) return -1;
    while (len > 0) {
        ssize_t n = write(g_port, p, len);
        if (n > 0) {
            p += n;
            len -= (size_t)n;
            continue;
        }
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && errno == EAGAIN) {
            struct pollfd pfd = { g_port, POLLOUT, 0 };
            if (poll(&pfd, 1, -1) < 0 && errno != EINTR) {
                host_gone();
                return -1;
            }
            if (pfd.revents & POLLOUT) continue;
            if (pfd.revents & (POLLHUP | POLLERR | POLLNVAL)) {
                host_gone();
                return -1;
            }
            continue;
        }
        host_gone();
        return -1;
    }
    return 0;
}

static void put_be32(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)(v >> 24);
    p[1] = (unsigned char)(v >> 16);
    p[2] = (unsigned char)(v >> 8);
    p[3] = (unsigned char)v;
}

static uint32_t get_be32(const unsigned char *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

/* Send g_tx whose payload (len bytes) is already at g_tx + HDR. */
static void send_tx(int type, uint32_t ch, size_t len)
{
    put_be32(g_tx, (uint32_t)(5 + len));
    g_tx[4] = (unsigned char)type;
    put_be32(g_tx + 5, ch);
    port_write(g_tx, HDR + len);
}

static void send_frame(int type, uint32_t ch, const char *payload, size_t len)
{
    if (len > CHUNK) len = CHUNK;
    memmove(g_tx + HDR, payload, len);
    send_tx(type, ch, len);
}

static void send_json(int type, uint32_t ch, struct jw *w)
{
    jw_puts(w, "}");
    send_frame(type, ch, w->buf, w->len);
}

#define JW(name) char name##_buf[4096]; struct jw name = { name##_buf, sizeof name##_buf, 0 }; \
    jw_puts(&name, "{")

static void send_error(uint32_t ch, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void send_error(uint32_t ch, int code, const char *fmt, ...)
{
    char msg[1024];
    va_list ap;
    JW(w);
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    jw_kstr(&w, "message", msg);
    jw_int(&w, "code", code);
    send_json(T_ERROR, ch, &w);
}

/* --------------------------------------------------------------- processes */

struct proc {
    uint32_t ch;
    pid_t pid;
    int out, err, in;      /* parent ends, -1 once closed; tty: out = master, in = dup */
    int tty;
    int in_eof_pending;    /* close stdin once the buffer is written */
    unsigned char *ibuf;
    size_t ilen, icap;
};

static struct proc *g_procs;
static size_t g_nprocs, g_capprocs;

static struct proc *find_proc(uint32_t ch)
{
    for (size_t i = 0; i < g_nprocs; i++)
        if (g_procs[i].ch == ch) return &g_procs[i];
    return NULL;
}

static void close_fd(int *fd)
{
    if (*fd >= 0) close(*fd);
    *fd = -1;
}

static void close_stdin(struct proc *p)
{
    close_fd(&p->in);
    free(p->ibuf);
    p->ibuf = NULL;
    p->ilen = p->icap = 0;
    p->in_eof_pending = 0;
}

/* Read once from a stream and forward it. 1: got data; 0: would block; -1: closed. */
static int pump(struct proc *p, int is_err)
{
    int *fd = is_err ? &p->err : &p->out;
    ssize_t n;
    if (*fd < 0) return -1;
    do {
        n = read(*fd, g_tx + HDR, CHUNK);
    } while (n < 0 && errno == EINTR);
    if (n > 0) {
        send_tx(is_err ? T_STDERR : T_STDOUT, p->ch, (size_t)n);
        return 1;
    }
    if (n < 0 && errno == EAGAIN) return 0;
    close_fd(fd);  /* EOF, or EIO on a pty master whose slave is closed */
    return -1;
}

static void flush_stdin(struct proc *p)
{
    while (p->in >= 0 && p->ilen > 0) {
        ssize_t n = write(p->in, p->ibuf, p->ilen);
        if (n > 0) {
            memmove(p->ibuf, p->ibuf + n, p->ilen - (size_t)n);
            p->ilen -= (size_t)n;
            continue;
        }
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && errno == EAGAIN) return;
        close_stdin(p);  /* EPIPE: the reader is gone */
        return;
    }
    if (p->ilen == 0 && p->in_eof_pending) close_stdin(p);
}

static void remove_proc(struct proc *p)
{
    close_fd(&p->out);
    close_fd(&p->err);
    close_stdin(p);
    *p = g_procs[--g_nprocs];
}

/* The process was reaped: forward what is left in its pipes, then EXIT. */
static void finish_proc(struct proc *p, int status)
{
    JW(w);
    for (int i = 0; i < DRAIN_MAX_READS && pump(p, 0) > 0; i++) {
    }
    for (int i = 0; i < DRAIN_MAX_READS && pump(p, 1) > 0; i++) {
    }
    if (WIFSIGNALED(status))
        jw_int(&w, "signal", WTERMSIG(status));
    else
        jw_int(&w, "code", WEXITSTATUS(status));
    send_json(T_EXIT, p->ch, &w);
    remove_proc(p);
}

/* Reap every zombie. Returns 1 while children remain, 0 when there are none. */
static int reap_all(void)
{
    for (;;) {
        int status;
        pid_t pid = waitpid(-1, &status, WNOHANG);
        if (pid == 0) return 1;
        if (pid < 0) {
            if (errno == EINTR) continue;
            return 0;
        }
        for (size_t i = 0; i < g_nprocs; i++) {
            if (g_procs[i].pid == pid) {
                finish_proc(&g_procs[i], status);
                break;
            }
        }
    }
}

/* ------------------------------------------------------ users and groups */

struct creds {
    uid_t uid;
    gid_t gid;
    gid_t groups[MAX_GROUPS];
    int ngroups;
    char name[256];        /* user name, "" when unknown */
    char home[PATH_MAX];
};

/* Split a colon-separated line in place into at most max fields. */
static int split_fields(char *line, char **f, int max)
{
    int n = 0;
    char *nl = strchr(line, '\n');
    if (nl) *nl = 0;
    f[n++] = line;
    for (char *c = line; *c && n < max; c++) {
        if (*c == ':') {
            *c = 0;
            f[n++] = c + 1;
        }
    }
    return n;
}

static int parse_id(const char *s, unsigned long *out)
{
    char *end;
    unsigned long v;
    if (!*s || !isdigit((unsigned char)*s)) return -1;
    errno = 0;
    v = strtoul(s, &end, 10);
    if (errno || *end || v > 0xFFFFFFFEul) return -1;
    *out = v;
    return 0;
}

/* Look a user up by name (name != NULL) or by uid. Returns 1 if found. */
static int passwd_lookup(const char *name, uid_t uid, struct creds *c)
{
    FILE *f = fopen("/etc/passwd", "re");
    char *line = NULL;
    size_t cap = 0;
    int found = 0;
    if (!f) return 0;
    while (getline(&line, &cap, f) > 0) {
        char *fl[7];
        unsigned long u, g;
        if (split_fields(line, fl, 7) < 4) continue;
        if (parse_id(fl[2], &u) < 0 || parse_id(fl[3], &g) < 0) continue;
        if (name ? strcmp(fl[0], name) != 0 : (uid_t)u != uid) continue;
        c->uid = (uid_t)u;
        c->gid = (gid_t)g;
        snprintf(c->name, sizeof c->name, "%s", fl[0]);
        snprintf(c->home, sizeof c->home, "%s", fl[5] && *fl[5] ? fl[5] : "/");
        found = 1;
        break;
    }
    free(line);
    fclose(f);
    return found;
}

/* Resolve a group by name, and/or collect the groups that list user as member. */
static int group_scan(const char *gname, gid_t *gid_out, const char *user, struct creds *c)
{
    FILE *f = fopen("/etc/group", "re");
    char *line = NULL;
    size_t cap = 0;
    int found = 0;
    if (!f) return 0;
    while (getline(&line, &cap, f) > 0) {
        char *fl[4];
        unsigned long g;
        if (split_fields(line, fl, 4) < 3 || parse_id(fl[2], &g) < 0) continue;
        if (gname && !found && !strcmp(fl[0], gname)) {
            *gid_out = (gid_t)g;
            found = 1;
        }
        if (user && *user && fl[3] && c->ngroups < MAX_GROUPS) {
            char *save = NULL;
            for (char *m = strtok_r(fl[3], ",", &save); m; m = strtok_r(NULL, ",", &save)) {
                if (!strcmp(m, user)) {
                    int dup = 0;
                    for (int i = 0; i < c->ngroups; i++) dup |= c->groups[i] == (gid_t)g;
                    if (!dup) c->groups[c->ngroups++] = (gid_t)g;
                    break;
                }
            }
        }
    }
    free(line);
    fclose(f);
    return found;
}

/* OCI user forms: "", name, uid, name:group, uid:gid (and mixes). */
static int resolve_user(const char *spec, struct creds *c, char *err, size_t errlen)
{
    char ubuf[256];
    const char *gpart = NULL;
    const char *colon = strchr(spec, ':');
    unsigned long v;
    memset(c, 0, sizeof *c);
    snprintf(c->home, sizeof c->home, "/");
    if (!*spec) {
        passwd_lookup(NULL, 0, c);
        c->uid = 0;
        c->gid = 0;
        return 0;
    }
    if (colon) {
        size_t n = (size_t)(colon - spec);
        if (n >= sizeof ubuf) n = sizeof ubuf - 1;
        memcpy(ubuf, spec, n);
        ubuf[n] = 0;
        gpart = colon + 1;
    } else {
        snprintf(ubuf, sizeof ubuf, "%s", spec);
    }
    if (!*ubuf || (gpart && !*gpart)) {
        snprintf(err, errlen, "invalid user \"%s\"", spec);
        return -1;
    }
    if (parse_id(ubuf, &v) == 0) {
        if (!passwd_lookup(NULL, (uid_t)v, c)) {
            c->uid = (uid_t)v;
            c->gid = 0;
        }
    } else if (!passwd_lookup(ubuf, 0, c)) {
        snprintf(err, errlen, "unknown user \"%s\" (not in /etc/passwd)", ubuf);
        return -1;
    }
    if (gpart) {
        if (parse_id(gpart, &v) == 0) {
            c->gid = (gid_t)v;
        } else {
            gid_t g;
            if (!group_scan(gpart, &g, NULL, c)) {
                snprintf(err, errlen, "unknown group \"%s\" (not in /etc/group)", gpart);
                return -1;
            }
            c->gid = g;
        }
        c->groups[0] = c->gid;
        c->ngroups = 1;
    } else {
        c->groups[0] = c->gid;
        c->ngroups = 1;
        if (*c->name) group_scan(NULL, NULL, c->name, c);
    }
    return 0;
}

/* --------------------------------------------------------------------- exec */

struct exec_err {
    int code;
    char msg[512];
};

static void child_fail(int fd, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4), noreturn));
static void child_fail(int fd, int code, const char *fmt, ...)
{
    struct exec_err e;
    va_list ap;
    memset(&e, 0, sizeof e);
    e.code = code;
    va_start(ap, fmt);
    vsnprintf(e.msg, sizeof e.msg, fmt, ap);
    va_end(ap);
    while (write(fd, &e, sizeof e) < 0 && errno == EINTR) {
    }
    _exit(code);
}

static const char *env_get(char **env, const char *key)
{
    size_t k = strlen(key);
    for (; *env; env++)
        if (!strncmp(*env, key, k) && (*env)[k] == '=') return *env + k + 1;
    return NULL;
}

/* Runs in the child: execve argv[0] directly or searched in path. Returns only on failure. */
static void child_exec(int errfd, char **argv, char **env, const char *path)
{
    const char *prog = argv[0];
    int eacces = 0, other = 0;
    if (!*prog) child_fail(errfd, 127, "empty program name");
    if (strchr(prog, '/')) {
        execve(prog, argv, env);
        child_fail(errfd, errno == ENOENT || errno == ENOTDIR ? 127 : 126,
                   "%s: %s", prog, strerror(errno));
    }
    for (const char *d = path;; ) {
        const char *sep = strchr(d, ':');
        size_t dl = sep ? (size_t)(sep - d) : strlen(d);
        char buf[PATH_MAX];
        if (dl == 0) {
            snprintf(buf, sizeof buf, "%s", prog);    /* empty element: the cwd */
        } else if (dl + 1 + strlen(prog) + 1 <= sizeof buf) {
            memcpy(buf, d, dl);
            buf[dl] = '/';
            strcpy(buf + dl + 1, prog);
        } else {
            buf[0] = 0;
        }
        if (buf[0]) {
            struct stat st;
            /* a failing execve copies argv and env into the kernel first: skip
               the PATH entries that plainly do not hold the program */
            if (stat(buf, &st) < 0 && (errno == ENOENT || errno == ENOTDIR)) {
                if (!sep) break;
                d = sep + 1;
                continue;
            }
            execve(buf, argv, env);
            if (errno == EACCES) eacces = 1;
            else if (errno != ENOENT && errno != ENOTDIR && errno != ENAMETOOLONG) {
                other = errno;
                child_fail(errfd, 126, "%s: %s", buf, strerror(other));
            }
        }
        if (!sep) break;
        d = sep + 1;
    }
    if (eacces) child_fail(errfd, 126, "%s: permission denied", prog);
    child_fail(errfd, 127, "%s: command not found in PATH", prog);
}

/* Build the process's environment: the given one, plus PATH and HOME if absent. */
static char **build_env(struct req *r, const char *home)
{
    size_t n = r->envc;
    char **env = calloc(n + 3, sizeof *env);
    size_t k = 0;
    if (!env) return NULL;
    for (size_t i = 0; i < n; i++) env[k++] = r->env[i];
    env[k] = NULL;
    if (!env_get(env, "PATH")) env[k++] = "PATH=" DEFAULT_PATH;
    env[k] = NULL;
    if (!env_get(env, "HOME")) {
        static char homevar[PATH_MAX + 8];
        snprintf(homevar, sizeof homevar, "HOME=%s", home);
        env[k++] = homevar;
    }
    env[k] = NULL;
    return env;
}

static int set_nonblock(int fd)
{
    int fl = fcntl(fd, F_GETFL);
    return fl < 0 ? -1 : fcntl(fd, F_SETFL, fl | O_NONBLOCK);
}

static void mkdirs(const char *path, mode_t mode);

struct child_args {
    struct req *r;
    struct creds *c;
    char **env;
    int errfd_r, errfd, in, out, err;
    const char *slave;
};

static char g_child_stack[128 * 1024] __attribute__((aligned(16)));

/* The new process, between clone and exec (see do_exec). */
static int child_main(void *arg)
{
    struct child_args *a = arg;
    sigset_t empty;
    const char *cwd = a->r->cwd && *a->r->cwd ? a->r->cwd : "/";
    close(a->errfd_r);
    if (setsid() < 0) child_fail(a->errfd, 126, "setsid: %s", strerror(errno));
    if (a->r->tty) {
        int s = open(a->slave, O_RDWR);
        if (s < 0) child_fail(a->errfd, 126, "open %s: %s", a->slave, strerror(errno));
        if (ioctl(s, TIOCSCTTY, 0) < 0)
            child_fail(a->errfd, 126, "TIOCSCTTY: %s", strerror(errno));
        if (dup2(s, 0) < 0 || dup2(s, 1) < 0 || dup2(s, 2) < 0)
            child_fail(a->errfd, 126, "dup2: %s", strerror(errno));
        if (s > 2) close(s);
    } else {
        int in = a->r->stdin_ ? a->in : open("/dev/null", O_RDONLY | O_CLOEXEC);
        if (in < 0) child_fail(a->errfd, 126, "open /dev/null: %s", strerror(errno));
        if (dup2(in, 0) < 0 || dup2(a->out, 1) < 0 || dup2(a->err, 2) < 0)
            child_fail(a->errfd, 126, "dup2: %s", strerror(errno));
    }
    for (int s = 1; s < NSIG; s++) signal(s, SIG_DFL);
    sigemptyset(&empty);
    sigprocmask(SIG_SETMASK, &empty, NULL);
    /* Like Docker and runc: a working directory missing from the image is
     * created (as root, before dropping privileges). Not in test mode, where
     * "/" is the host's. */
    if (!g_test_mode && cwd[0] == '/') {
        struct stat cst;
        if (stat(cwd, &cst) < 0 && errno == ENOENT) mkdirs(cwd, 0755);
    }
    if (a->r->user && *a->r->user) {
        if (setgroups((size_t)a->c->ngroups, a->c->groups) < 0)
            child_fail(a->errfd, 126, "setgroups: %s", strerror(errno));
        if (setgid(a->c->gid) < 0)
            child_fail(a->errfd, 126, "setgid %u: %s", (unsigned)a->c->gid, strerror(errno));
        if (setuid(a->c->uid) < 0)
            child_fail(a->errfd, 126, "setuid %u: %s", (unsigned)a->c->uid, strerror(errno));
    }
    if (chdir(cwd) < 0) child_fail(a->errfd, 126, "cwd %s: %s", cwd, strerror(errno));
    if (a->r->tool) {
        /* the tool's applet is argv[0]; g_tool_fd is close-on-exec */
        syscall(SYS_execveat, g_tool_fd, "", a->r->argv, a->env, AT_EMPTY_PATH);
        child_fail(a->errfd, 126, "tool %s: %s", a->r->argv[0], strerror(errno));
    }
    child_exec(a->errfd, a->r->argv, a->env, env_get(a->env, "PATH"));
    _exit(127);
}

static void do_exec(uint32_t ch, const unsigned char *payload, size_t len)
{
    struct req r;
    const char *jerr;
    struct creds c;
    char err[512];
    char **env = NULL;
    int in_p[2] = { -1, -1 }, out_p[2] = { -1, -1 }, err_p[2] = { -1, -1 }, ep[2] = { -1, -1 };
    int master = -1, in_dup = -1;
    char slave[128];
    pid_t pid;
    struct exec_err ee;
    ssize_t got = 0;
    int saved;

    if (ch == 0) {
        send_error(0, E_BAD_REQUEST, "EXEC on channel 0");
        return;
    }
    if (find_proc(ch)) {
        send_error(0, E_BAD_REQUEST, "EXEC on channel %u, which is still live", ch);
        return;
    }
    if (parse_req(payload, len, &r, &jerr) < 0) {
        send_error(ch, E_BAD_REQUEST, "bad EXEC request: %s", jerr);
        return;
    }
    if (!r.has_argv || r.argc == 0) {
        send_error(ch, E_BAD_REQUEST, "bad EXEC request: argv is missing or empty");
        goto out;
    }
    if (r.tool && g_tool_fd < 0) {
        send_error(ch, 127, "%s: no tool is loaded (the host sends it with TOOL first)",
                   r.argv[0]);
        goto out;
    }
    if (resolve_user(r.user ? r.user : "", &c, err, sizeof err) < 0) {
        send_error(ch, 126, "%s", err);
        goto out;
    }
    if (!r.env) {
        r.env = calloc(1, sizeof *r.env);
        if (!r.env) goto oom;
    }
    env = build_env(&r, c.home);
    if (!env) goto oom;

    if (pipe2(ep, O_CLOEXEC) < 0) goto sys_err;
    if (r.tty) {
        struct winsize ws;
        master = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
        if (master < 0 || grantpt(master) < 0 || unlockpt(master) < 0 ||
            ptsname_r(master, slave, sizeof slave) != 0)
            goto sys_err;
        memset(&ws, 0, sizeof ws);
        ws.ws_row = (unsigned short)(r.has_rows && r.rows > 0 && r.rows < 65536 ? r.rows : 24);
        ws.ws_col = (unsigned short)(r.has_cols && r.cols > 0 && r.cols < 65536 ? r.cols : 80);
        ioctl(master, TIOCSWINSZ, &ws);
        in_dup = fcntl(master, F_DUPFD_CLOEXEC, 3);
        if (in_dup < 0 || set_nonblock(master) < 0) goto sys_err;
    } else {
        if (pipe2(out_p, O_CLOEXEC) < 0 || pipe2(err_p, O_CLOEXEC) < 0) goto sys_err;
        if (r.stdin_ && pipe2(in_p, O_CLOEXEC) < 0) goto sys_err;
        if (set_nonblock(out_p[0]) < 0 || set_nonblock(err_p[0]) < 0 ||
            (r.stdin_ && set_nonblock(in_p[1]) < 0))
            goto sys_err;
    }

    {
        struct child_args ca = { &r, &c, env, ep[0], ep[1], in_p[0], out_p[1], err_p[1], slave };
        /* CLONE_VM|CLONE_VFORK: no page tables copied, no copy-on-write faults in
           either process (each costs a lot under a software CPU); this thread waits
           until the child has exec'd or died. The child runs on its own stack and
           writes nothing the agent reads afterwards (errno aside). */
        pid = clone(child_main, g_child_stack + sizeof g_child_stack,
                    CLONE_VM | CLONE_VFORK | SIGCHLD, &ca);
    }
    if (pid < 0) goto sys_err;

    /* parent */
    close_fd(&ep[1]);
    close_fd(&in_p[0]);
    close_fd(&out_p[1]);
    close_fd(&err_p[1]);
    while (got < (ssize_t)sizeof ee) {
        ssize_t n = read(ep[0], (char *)&ee + got, sizeof ee - (size_t)got);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) break;
        got += n;
    }
    close_fd(&ep[0]);
    if (got > 0) {
        int st;
        while (waitpid(pid, &st, 0) < 0 && errno == EINTR) {
        }
        ee.msg[sizeof ee.msg - 1] = 0;
        if (got < (ssize_t)sizeof ee) {
            ee.code = 126;
            snprintf(ee.msg, sizeof ee.msg, "the process failed before exec");
        }
        close_fd(&master);
        close_fd(&in_dup);
        close_fd(&in_p[1]);
        close_fd(&out_p[0]);
        close_fd(&err_p[0]);
        send_error(ch, ee.code, "%s", ee.msg);
        goto out;
    }
    if (g_nprocs == g_capprocs) {
        size_t ncap = g_capprocs ? g_capprocs * 2 : 16;
        struct proc *np = realloc(g_procs, ncap * sizeof *np);
        if (!np) {
            /* cannot track it: kill it, the reaper collects it */
            kill(-pid, SIGKILL);
            close_fd(&master);
            close_fd(&in_dup);
            close_fd(&in_p[1]);
            close_fd(&out_p[0]);
            close_fd(&err_p[0]);
            goto oom;
        }
        g_procs = np;
        g_capprocs = ncap;
    }
    {
        struct proc *p = &g_procs[g_nprocs++];
        JW(w);
        memset(p, 0, sizeof *p);
        p->ch = ch;
        p->pid = pid;
        p->tty = r.tty;
        if (r.tty) {
            p->out = master;
            p->err = -1;
            p->in = in_dup;
        } else {
            p->out = out_p[0];
            p->err = err_p[0];
            p->in = in_p[1];
        }
        jw_int(&w, "pid", pid);
        send_json(T_STARTED, ch, &w);
    }
    goto out;

sys_err:
    saved = errno;
    close_fd(&ep[0]);
    close_fd(&ep[1]);
    close_fd(&master);
    close_fd(&in_dup);
    close_fd(&in_p[0]);
    close_fd(&in_p[1]);
    close_fd(&out_p[0]);
    close_fd(&out_p[1]);
    close_fd(&err_p[0]);
    close_fd(&err_p[1]);
    send_error(ch, 126, "cannot start %s: %s", r.argv[0], strerror(saved));
    goto out;
oom:
    send_error(ch, 126, "cannot start %s: out of memory", r.argv[0]);
out:
    free(env);
    req_free(&r);
}

/* ------------------------------------------------------------ other frames */

static void tool_abort_load(void);

static void do_hello(const unsigned char *payload, size_t len)
{
    struct req r;
    const char *jerr;
    struct utsname u;
    JW(w);
    if (parse_req(payload, len, &r, &jerr) < 0) {
        send_error(0, E_BAD_REQUEST, "bad HELLO: %s", jerr);
        return;
    }
    req_free(&r);
    tool_abort_load();  /* a new session: forget a load the last host left half done */
    if (uname(&u) < 0) snprintf(u.release, sizeof u.release, "unknown");
    jw_int(&w, "version", PROTO_VERSION);
    jw_kstr(&w, "agent", AGENT_NAME);
    jw_kstr(&w, "kernel", u.release);
    jw_int(&w, "uptime_ms", now_ms(CLOCK_BOOTTIME));
    jw_key(&w, "tool");
    jw_puts(&w, g_tool_fd >= 0 ? "true" : "false");
    /* the live process channels, so a reconnecting host learns which of the
       processes it knew of ended while it was away (omitted if too many to fit) */
    if (g_nprocs <= 300) {
        char num[16];
        jw_key(&w, "channels");
        jw_puts(&w, "[");
        for (size_t i = 0; i < g_nprocs; i++) {
            snprintf(num, sizeof num, "%s%u", i ? "," : "", g_procs[i].ch);
            jw_puts(&w, num);
        }
        jw_puts(&w, "]");
    }
    send_json(T_READY, 0, &w);
}

/* ---------------------------------------------------------------- the tool */

static void tool_abort_load(void)
{
    if (g_tool_load >= 0) close(g_tool_load);
    g_tool_load = -1;
    g_tool_len = 0;
    g_tool_err[0] = 0;
}

/* The end of a load: check, seal and reopen read-only. Returns the new tool's
 * fd, or -1 with g_tool_err set. */
static int tool_finish_load(void)
{
    unsigned char magic[4];
    char path[64];
    int fd;
    if (g_tool_err[0]) return -1;
    if (g_tool_load < 0 || g_tool_len == 0) {
        snprintf(g_tool_err, sizeof g_tool_err, "the tool is empty");
        return -1;
    }
    if (pread(g_tool_load, magic, 4, 0) != 4 || memcmp(magic, "\177ELF", 4) != 0) {
        snprintf(g_tool_err, sizeof g_tool_err, "the tool is not an ELF executable");
        return -1;
    }
    /* Sealed, nobody can change it, not even guest root through /proc/PID/exe. */
    if (fcntl(g_tool_load, F_ADD_SEALS,
              F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE | F_SEAL_SEAL) < 0) {
        snprintf(g_tool_err, sizeof g_tool_err, "sealing the tool: %s", strerror(errno));
        return -1;
    }
    /* A file open for writing cannot be executed (ETXTBSY): exec a read-only
     * reopening, and close the writable fd. */
    snprintf(path, sizeof path, "/proc/self/fd/%d", g_tool_load);
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        snprintf(g_tool_err, sizeof g_tool_err, "reopening the tool: %s", strerror(errno));
        return -1;
    }
    return fd;
}

/* TOOL: chunks of the tool on channel 0; the empty one ends the load and is
 * answered with TOOL_STATUS. A failed load keeps the previous tool. */
static void do_tool(uint32_t ch, const unsigned char *payload, size_t len)
{
    JW(w);
    int fd;
    if (ch != 0) {
        send_error(0, E_BAD_REQUEST, "TOOL on channel %u (it belongs on channel 0)", ch);
        return;
    }
    if (len > 0) {
        if (g_tool_err[0]) return;  /* already failed: drop the rest, report at the end */
        if (g_tool_load < 0) {
            g_tool_load = memfd_create("ember-tool", MFD_CLOEXEC | MFD_ALLOW_SEALING);
            g_tool_len = 0;
            if (g_tool_load < 0) {
                snprintf(g_tool_err, sizeof g_tool_err, "memfd_create: %s", strerror(errno));
                return;
            }
        }
        if (len > TOOL_MAX - g_tool_len) {
            snprintf(g_tool_err, sizeof g_tool_err, "the tool exceeds %u bytes", TOOL_MAX);
            return;
        }
        while (len > 0) {
            ssize_t n = write(g_tool_load, payload, len);
            if (n < 0 && errno == EINTR) continue;
            if (n <= 0) {
                snprintf(g_tool_err, sizeof g_tool_err, "writing the tool: %s",
                         n < 0 ? strerror(errno) : "short write");
                return;
            }
            payload += n;
            len -= (size_t)n;
            g_tool_len += (size_t)n;
        }
        return;
    }
    fd = tool_finish_load();
    jw_key(&w, "loaded");
    jw_puts(&w, fd >= 0 ? "true" : "false");
    jw_int(&w, "size", (long long)g_tool_len);
    if (fd >= 0) {
        if (g_tool_fd >= 0) close(g_tool_fd);
        g_tool_fd = fd;
    } else {
        jw_kstr(&w, "message", g_tool_err);
        logmsg("tool not loaded: %s", g_tool_err);
    }
    tool_abort_load();
    send_json(T_TOOL_STATUS, 0, &w);
}

static void do_stdin(uint32_t ch, const unsigned char *payload, size_t len)
{
    struct proc *p = find_proc(ch);
    if (!p || p->in < 0 || p->in_eof_pending) return;  /* exited or closed: drop */
    if (len == 0) {
        if (p->tty) {
            /* a terminal has no EOF of its own: type the EOF character (^D) */
            static const unsigned char eof = 4;
            payload = &eof;
            len = 1;
        } else {
            p->in_eof_pending = 1;
            flush_stdin(p);
            return;
        }
    }
    if (p->ilen + len > p->icap) {
        size_t ncap = p->icap ? p->icap : 4096;
        unsigned char *nb;
        while (ncap < p->ilen + len) ncap *= 2;
        nb = realloc(p->ibuf, ncap);
        if (!nb) {
            logmsg("out of memory buffering stdin of channel %u: dropped", ch);
            return;
        }
        p->ibuf = nb;
        p->icap = ncap;
    }
    memcpy(p->ibuf + p->ilen, payload, len);
    p->ilen += len;
    flush_stdin(p);
}

static void do_signal(uint32_t ch, const unsigned char *payload, size_t len)
{
    struct req r;
    const char *jerr;
    struct proc *p;
    if (parse_req(payload, len, &r, &jerr) < 0) {
        send_error(0, E_BAD_REQUEST, "bad SIGNAL: %s", jerr);
        return;
    }
    if (!r.has_sig || r.sig < 1 || r.sig >= NSIG) {
        send_error(0, E_BAD_REQUEST, "bad SIGNAL: signal missing or out of range");
    } else if ((p = find_proc(ch)) != NULL) {
        if (kill(-p->pid, (int)r.sig) < 0) kill(p->pid, (int)r.sig);
    }
    req_free(&r);
}

static void do_resize(uint32_t ch, const unsigned char *payload, size_t len)
{
    struct req r;
    const char *jerr;
    struct proc *p;
    if (parse_req(payload, len, &r, &jerr) < 0) {
        send_error(0, E_BAD_REQUEST, "bad RESIZE: %s", jerr);
        return;
    }
    if (!r.has_rows || !r.has_cols || r.rows < 1 || r.rows > 65535 || r.cols < 1 ||
        r.cols > 65535) {
        send_error(0, E_BAD_REQUEST, "bad RESIZE: rows/cols missing or out of range");
    } else if ((p = find_proc(ch)) != NULL && p->tty && p->out >= 0) {
        struct winsize ws;
        memset(&ws, 0, sizeof ws);
        ws.ws_row = (unsigned short)r.rows;
        ws.ws_col = (unsigned short)r.cols;
        ioctl(p->out, TIOCSWINSZ, &ws);  /* the kernel sends SIGWINCH */
    }
    req_free(&r);
}

static void umount_all(void)
{
    FILE *f = fopen("/proc/self/mounts", "re");
    char *lines[256];
    int n = 0;
    char *line = NULL;
    size_t cap = 0;
    if (f) {
        while (n < 256 && getline(&line, &cap, f) > 0) {
            char mnt[PATH_MAX], *s, *d = mnt;
            s = strchr(line, ' ');
            if (!s) continue;
            s++;
            while (*s && *s != ' ' && d < mnt + sizeof mnt - 1) {
                if (s[0] == '\\' && s[1] >= '0' && s[1] <= '3' && s[2] && s[3]) {
                    *d++ = (char)(((s[1] - '0') << 6) | ((s[2] - '0') << 3) | (s[3] - '0'));
                    s += 4;
                } else {
                    *d++ = *s++;
                }
            }
            *d = 0;
            if (strcmp(mnt, "/") != 0) lines[n++] = strdup(mnt);
        }
        free(line);
        fclose(f);
    }
    while (n-- > 0) {
        if (lines[n]) umount2(lines[n], MNT_DETACH);
        free(lines[n]);
    }
    mount(NULL, "/", NULL, MS_REMOUNT | MS_RDONLY, NULL);
}

/* Signal every process: as PID 1 all of them; in test mode our process groups
 * and our direct children (orphans reparented to us, the subreaper). */
static void signal_all(int sig)
{
    for (size_t i = 0; i < g_nprocs; i++) kill(-g_procs[i].pid, sig);
    if (g_pid1) {
        kill(-1, sig);
    } else {
        char path[64], buf[4096];
        ssize_t n;
        int fd;
        snprintf(path, sizeof path, "/proc/self/task/%d/children", (int)getpid());
        fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0) return;
        n = read(fd, buf, sizeof buf - 1);
        close(fd);
        if (n <= 0) return;
        buf[n] = 0;
        char *save = NULL;
        for (char *t = strtok_r(buf, " \n", &save); t; t = strtok_r(NULL, " \n", &save)) {
            pid_t pid = (pid_t)atoi(t);
            if (pid > 1) kill(pid, sig);
        }
    }
}

/* Reap for up to ms; with resend, signal again each round (orphans keep arriving). */
static void wait_children(long ms, int resend)
{
    long long end = now_ms(CLOCK_MONOTONIC) + ms;
    while (reap_all() && now_ms(CLOCK_MONOTONIC) < end) {
        sleep_ms(10);
        if (resend) signal_all(resend);
    }
}

static void do_shutdown(void)
{
    logmsg("shutting down");
    signal_all(SIGTERM);
    wait_children(1000, 0);
    signal_all(SIGKILL);
    wait_children(1000, SIGKILL);
    while (g_nprocs > 0) remove_proc(&g_procs[0]);
    if (!g_pid1) exit(0);
    sync();
    umount_all();
    power_off();
}

/* ------------------------------------------------------------------- frames */

static void handle_frame(int type, uint32_t ch, const unsigned char *payload, size_t len)
{
    switch (type) {
    case T_HELLO: do_hello(payload, len); break;
    case T_EXEC: do_exec(ch, payload, len); break;
    case T_STDIN:
        if (ch == 0) send_error(0, E_BAD_REQUEST, "STDIN on channel 0");
        else do_stdin(ch, payload, len);
        break;
    case T_SIGNAL: do_signal(ch, payload, len); break;
    case T_RESIZE: do_resize(ch, payload, len); break;
    case T_TOOL: do_tool(ch, payload, len); break;
    case T_SHUTDOWN: do_shutdown(); break;
    default:
        /* Forward compatibility: a request type this agent does not know. On a
         * fresh channel it means that process never starts. */
        send_error(ch != 0 && !find_proc(ch) ? ch : 0, E_BAD_REQUEST,
                   "unknown frame type 0x%02x", type);
    }
}

/* Parse every whole frame in g_rx; keep the tail. */
static void process_rx(void)
{
    size_t off = 0;
    while (!g_desync && !g_quit && !g_backoff && g_rxlen - off >= 5) {
        const unsigned char *f = g_rx + off;
        uint32_t len = get_be32(f);
        if (len < 5 || len > 5 + MAX_PAYLOAD) {
            logmsg("framing error (length %u): ignoring input until the host reconnects", len);
            send_error(0, E_FRAMING, "bad frame length %u: input ignored until the host "
                       "reconnects", len);
            g_desync = 1;
            g_rxlen = 0;
            return;
        }
        if (g_rxlen - off < 4 + (size_t)len) break;
        handle_frame(f[4], get_be32(f + 5), f + HDR, len - 5);
        off += 4 + (size_t)len;
    }
    if (g_desync || g_quit || g_backoff) {
        g_rxlen = 0;
        return;
    }
    if (off > 0) {
        memmove(g_rx, g_rx + off, g_rxlen - off);
        g_rxlen -= off;
    }
}

static void read_port(void)
{
    unsigned char scratch[4096];
    size_t room = HDR + MAX_PAYLOAD - g_rxlen;
    ssize_t n;
    if (room > CHUNK) room = CHUNK;
    if (g_desync)
        n = read(g_port, scratch, sizeof scratch);
    else
        n = read(g_port, g_rx + g_rxlen, room);
    if (n < 0) {
        if (errno == EAGAIN || errno == EINTR) return;
        host_gone();
        return;
    }
    if (n == 0) {
        host_gone();
        return;
    }
    if (g_desync) return;
    g_rxlen += (size_t)n;
    process_rx();
}

/* ------------------------------------------------------------------- boot */

static void mkdirs(const char *path, mode_t mode)
{
    char buf[PATH_MAX];
    snprintf(buf, sizeof buf, "%s", path);
    for (char *s = buf + 1; *s; s++) {
        if (*s == '/') {
            *s = 0;
            mkdir(buf, mode);
            *s = '/';
        }
    }
    mkdir(buf, mode);
}

static void do_mount(const char *src, const char *dst, const char *type, unsigned long flags,
                     const char *data, int fatal)
{
    mkdirs(dst, 0755);
    if (mount(src, dst, type, flags, data) == 0 || errno == EBUSY) return;
    if (fatal) die("mount %s on %s: %s", type ? type : src, dst, strerror(errno));
    logmsg("mount %s on %s: %s", type ? type : src, dst, strerror(errno));
}

static void write_file(const char *path, const char *data)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) {
        logmsg("write %s: %s", path, strerror(errno));
        return;
    }
    if (write(fd, data, strlen(data)) < 0) logmsg("write %s: %s", path, strerror(errno));
    close(fd);
}

/* Mount the API filesystems of the root at prefix ("" = the current root). */
static void mount_inner(const char *prefix, int with_basics)
{
    char p[PATH_MAX];
#define AT(rel) (snprintf(p, sizeof p, "%s%s", prefix, rel), p)
    if (with_basics) {
        do_mount("proc", AT("/proc"), "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL, 1);
        do_mount("sysfs", AT("/sys"), "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL, 1);
        do_mount("devtmpfs", AT("/dev"), "devtmpfs", MS_NOSUID, "mode=0755", 1);
    }
    do_mount("devpts", AT("/dev/pts"), "devpts", MS_NOSUID | MS_NOEXEC,
             "newinstance,ptmxmode=0666,mode=0620,gid=5", 1);
    unlink(AT("/dev/ptmx"));
    if (symlink("pts/ptmx", AT("/dev/ptmx")) < 0) die("symlink /dev/ptmx: %s", strerror(errno));
    symlink("/proc/self/fd", AT("/dev/fd"));
    symlink("/proc/self/fd/0", AT("/dev/stdin"));
    symlink("/proc/self/fd/1", AT("/dev/stdout"));
    symlink("/proc/self/fd/2", AT("/dev/stderr"));
    do_mount("tmpfs", AT("/dev/shm"), "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777", 0);
    do_mount("tmpfs", AT("/run"), "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755", 0);
#undef AT
}

/* Make sure fds 0-2 are open, so that no pipe of ours is ever one of them. */
static void std_fds(const char *dev)
{
    for (int fd = 0; fd < 3; fd++) {
        if (fcntl(fd, F_GETFD) >= 0) continue;
        int n = open(dev, O_RDWR | O_NOCTTY);
        if (n < 0) n = open("/dev/null", O_RDWR);
        if (n >= 0 && n != fd) {
            dup2(n, fd);
            close(n);
        }
    }
}

static int cmdline_get(const char *cmdline, const char *key, char *out, size_t outlen)
{
    size_t k = strlen(key);
    const char *s = cmdline;
    while (*s) {
        while (*s == ' ' || *s == '\n') s++;
        if (!strncmp(s, key, k) && s[k] == '=') {
            size_t n = 0;
            s += k + 1;
            while (s[n] && s[n] != ' ' && s[n] != '\n') n++;
            if (n >= outlen) n = outlen - 1;
            memcpy(out, s, n);
            out[n] = 0;
            return 1;
        }
        while (*s && *s != ' ' && *s != '\n') s++;
    }
    return 0;
}

static void loopback_up(void)
{
    struct ifreq ifr;
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (s < 0) return;
    memset(&ifr, 0, sizeof ifr);
    snprintf(ifr.ifr_name, sizeof ifr.ifr_name, "lo");
    if (ioctl(s, SIOCGIFFLAGS, &ifr) == 0) {
        ifr.ifr_flags |= IFF_UP;
        if (ioctl(s, SIOCSIFFLAGS, &ifr) < 0) logmsg("lo up: %s", strerror(errno));
    }
    close(s);
}

/*
 * ember.net=ADDR/PREFIX,GATEWAY,DNS: configure eth0 statically (no DHCP client,
 * no wait for a lease): address and netmask, up, default route, resolv.conf.
 * The host only passes it when the machine has a NIC; any failure is fatal, so
 * a machine never runs without the network it was asked to have.
 */
struct netcfg {
    struct in_addr addr, mask, gw, dns;
};

static int parse_netcfg(const char *val, struct netcfg *c)
{
    char buf[128], *prefix, *gw, *dns, *end;
    long bits;
    if (snprintf(buf, sizeof buf, "%s", val) >= (int)sizeof buf) return -1;
    if (!(prefix = strchr(buf, '/'))) return -1;
    *prefix++ = 0;
    if (!(gw = strchr(prefix, ','))) return -1;
    *gw++ = 0;
    if (!(dns = strchr(gw, ','))) return -1;
    *dns++ = 0;
    errno = 0;
    bits = strtol(prefix, &end, 10);
    if (errno || end == prefix || *end || bits < 1 || bits > 32) return -1;
    if (inet_pton(AF_INET, buf, &c->addr) != 1 || inet_pton(AF_INET, gw, &c->gw) != 1 ||
        inet_pton(AF_INET, dns, &c->dns) != 1)
        return -1;
    c->mask.s_addr = htonl(bits == 32 ? 0xffffffffu : ~(0xffffffffu >> bits));
    return 0;
}

static void set_sin(struct sockaddr *sa, struct in_addr a)
{
    struct sockaddr_in sin;
    memset(&sin, 0, sizeof sin);
    sin.sin_family = AF_INET;
    sin.sin_addr = a;
    memcpy(sa, &sin, sizeof sin);
}

static void net_up(const char *val)
{
    const char *ifname = "eth0";
    struct netcfg c;
    struct ifreq ifr;
    struct rtentry rt;
    char buf[128];
    long long end = now_ms(CLOCK_MONOTONIC) + 5000;
    int s;

    if (parse_netcfg(val, &c) < 0) die("ember.net=%s: expected ADDR/PREFIX,GATEWAY,DNS", val);
    /* virtio-net probes before init runs; wait a little in case it is late */
    snprintf(buf, sizeof buf, "/sys/class/net/%s", ifname);
    while (access(buf, F_OK) < 0) {
        if (now_ms(CLOCK_MONOTONIC) > end) die("ember.net: no network interface %s", ifname);
        sleep_ms(10);
    }
    /* IPv4 only (the host's NAT has no IPv6): no link-local address, no router
       solicitations, no duplicate address detection on this link */
    snprintf(buf, sizeof buf, "/proc/sys/net/ipv6/conf/%s/disable_ipv6", ifname);
    if (access(buf, F_OK) == 0) write_file(buf, "1\n");
    s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (s < 0) die("ember.net: socket: %s", strerror(errno));
    memset(&ifr, 0, sizeof ifr);
    snprintf(ifr.ifr_name, sizeof ifr.ifr_name, "%s", ifname);
    set_sin(&ifr.ifr_addr, c.addr);
    if (ioctl(s, SIOCSIFADDR, &ifr) < 0) die("%s: set address: %s", ifname, strerror(errno));
    set_sin(&ifr.ifr_netmask, c.mask);
    if (ioctl(s, SIOCSIFNETMASK, &ifr) < 0) die("%s: set netmask: %s", ifname, strerror(errno));
    if (ioctl(s, SIOCGIFFLAGS, &ifr) < 0) die("%s: get flags: %s", ifname, strerror(errno));
    ifr.ifr_flags |= IFF_UP | IFF_RUNNING;
    if (ioctl(s, SIOCSIFFLAGS, &ifr) < 0) die("%s: up: %s", ifname, strerror(errno));
    memset(&rt, 0, sizeof rt);
    set_sin(&rt.rt_dst, (struct in_addr){ INADDR_ANY });
    set_sin(&rt.rt_genmask, (struct in_addr){ INADDR_ANY });
    set_sin(&rt.rt_gateway, c.gw);
    rt.rt_flags = RTF_UP | RTF_GATEWAY;
    rt.rt_dev = (char *)ifname;
    if (ioctl(s, SIOCADDRT, &rt) < 0 && errno != EEXIST)
        die("%s: default route via %s: %s", ifname, inet_ntoa(c.gw), strerror(errno));
    close(s);
    /* into the overlay's upper layer; replace, never follow, an image's symlink */
    snprintf(buf, sizeof buf, "nameserver %s\n", inet_ntoa(c.dns));
    unlink("/etc/resolv.conf");
    write_file("/etc/resolv.conf", buf);
}

static int open_port(const char *name)
{
    long long end = now_ms(CLOCK_MONOTONIC) + 10000;
    char dev[PATH_MAX] = "";
    for (;;) {
        DIR *d = opendir("/sys/class/virtio-ports");
        if (d) {
            struct dirent *e;
            while ((e = readdir(d)) != NULL) {
                char path[PATH_MAX], buf[256];
                int fd;
                ssize_t n;
                if (e->d_name[0] == '.') continue;
                snprintf(path, sizeof path, "/sys/class/virtio-ports/%s/name", e->d_name);
                fd = open(path, O_RDONLY | O_CLOEXEC);
                if (fd < 0) continue;
                n = read(fd, buf, sizeof buf - 1);
                close(fd);
                if (n <= 0) continue;
                buf[n] = 0;
                buf[strcspn(buf, "\n")] = 0;
                if (!strcmp(buf, name)) snprintf(dev, sizeof dev, "/dev/%s", e->d_name);
            }
            closedir(d);
        }
        if (dev[0]) {
            int fd = open(dev, O_RDWR | O_NONBLOCK | O_CLOEXEC | O_NOCTTY);
            if (fd >= 0) return fd;
            if (errno != ENOENT || now_ms(CLOCK_MONOTONIC) > end)
                die("open %s: %s", dev, strerror(errno));
        } else if (now_ms(CLOCK_MONOTONIC) > end) {
            die("no virtio-serial port named \"%s\" (is the virtserialport there?)", name);
        }
        sleep_ms(10);
    }
}

static void boot(void)
{
    char cmdline[4096] = "", root[256] = "", fstype[64] = "erofs", host[65] = "ember";
    char port[128] = "ember.agent", net[128] = "";
    int fd;
    ssize_t n;

    umask(022);
    do_mount("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755", 1);
    std_fds("/dev/console");
    do_mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL, 1);
    do_mount("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL, 1);

    fd = open("/proc/cmdline", O_RDONLY | O_CLOEXEC);
    if (fd < 0) die("open /proc/cmdline: %s", strerror(errno));
    n = read(fd, cmdline, sizeof cmdline - 1);
    close(fd);
    if (n > 0) cmdline[n] = 0;
    cmdline_get(cmdline, "ember.root", root, sizeof root);
    cmdline_get(cmdline, "ember.rootfstype", fstype, sizeof fstype);
    cmdline_get(cmdline, "ember.hostname", host, sizeof host);
    cmdline_get(cmdline, "ember.port", port, sizeof port);
    cmdline_get(cmdline, "ember.net", net, sizeof net);

    if (root[0]) {
        struct stat st;
        long long end = now_ms(CLOCK_MONOTONIC) + 5000;
        while (stat(root, &st) < 0) {
            if (now_ms(CLOCK_MONOTONIC) > end) die("root device %s: %s", root, strerror(errno));
            sleep_ms(10);
        }
        do_mount(root, "/ember/lower", fstype, MS_RDONLY, NULL, 1);
        do_mount("tmpfs", "/ember/rw", "tmpfs", 0, "mode=0755", 1);
        mkdirs("/ember/rw/upper", 0755);
        mkdirs("/ember/rw/work", 0755);
        do_mount("overlay", "/ember/root", "overlay", 0,
                 "lowerdir=/ember/lower,upperdir=/ember/rw/upper,workdir=/ember/rw/work", 1);
        mount_inner("/ember/root", 1);
        /* the initramfs's own API mounts are not needed any more */
        umount2("/dev", MNT_DETACH);
        umount2("/proc", MNT_DETACH);
        umount2("/sys", MNT_DETACH);
        if (chdir("/ember/root") < 0) die("chdir /ember/root: %s", strerror(errno));
        if (mount(".", "/", NULL, MS_MOVE, NULL) < 0) die("move root: %s", strerror(errno));
        if (chroot(".") < 0) die("chroot: %s", strerror(errno));
        if (chdir("/") < 0) die("chdir /: %s", strerror(errno));
    } else {
        mount_inner("", 0);
    }

    if (sethostname(host, strlen(host)) < 0) logmsg("sethostname: %s", strerror(errno));
    mkdirs("/etc", 0755);
    {
        char buf[256];
        snprintf(buf, sizeof buf, "%s\n", host);
        write_file("/etc/hostname", buf);
        if (access("/etc/hosts", F_OK) < 0) {
            snprintf(buf, sizeof buf, "127.0.0.1\tlocalhost\n::1\tlocalhost\n127.0.1.1\t%s\n",
                     host);
            write_file("/etc/hosts", buf);
        }
    }
    if (mkdir("/tmp", 01777) == 0) chmod("/tmp", 01777);
    loopback_up();
    if (net[0]) net_up(net);
    g_port = open_port(port);
}

/* ------------------------------------------------------------------- main */

int main(int argc, char **argv)
{
    int serve_fd = -1;
    sigset_t mask;
    struct pollfd *pfds = NULL;
    size_t pcap = 0;

    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--serve-fd") && i + 1 < argc) serve_fd = atoi(argv[++i]);
    }
    if (serve_fd < 0 && getenv("EMBER_AGENT_FD")) serve_fd = atoi(getenv("EMBER_AGENT_FD"));
    g_pid1 = getpid() == 1;
    g_test_mode = !g_pid1 && serve_fd >= 0;
    if (!g_pid1 && !g_test_mode) {
        dprintf(2, "usage: ember-agent --serve-fd N   (test mode; as PID 1 it boots the guest)\n");
        return 2;
    }

    {
        struct rlimit rl;
        if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
            rl.rlim_cur = rl.rlim_max;
            setrlimit(RLIMIT_NOFILE, &rl);
        }
    }

    sigemptyset(&mask);
    sigaddset(&mask, SIGCHLD);
    sigprocmask(SIG_BLOCK, &mask, NULL);
    signal(SIGPIPE, SIG_IGN);

    if (g_pid1) {
        boot();
    } else {
        std_fds("/dev/null");
        g_port = serve_fd;
        if (fcntl(g_port, F_SETFD, FD_CLOEXEC) < 0) die("fd %d: %s", g_port, strerror(errno));
        set_nonblock(g_port);
        prctl(PR_SET_CHILD_SUBREAPER, 1);  /* reap orphans as PID 1 would */
    }

    g_sigfd = signalfd(-1, &mask, SFD_NONBLOCK | SFD_CLOEXEC);
    if (g_sigfd < 0) die("signalfd: %s", strerror(errno));
    g_rx = malloc(HDR + MAX_PAYLOAD);
    if (!g_rx) die("out of memory");

    for (;;) {
        size_t np = 0, need = 2 + 3 * g_nprocs;
        int port_idx = -1, timeout = -1, paused = 0, r;

        if (g_quit) {
            /* test mode: the host hung up; nobody can reconnect to a socketpair */
            signal_all(SIGKILL);
            wait_children(1000, SIGKILL);
            return 0;
        }
        reap_all();  /* cheap, and catches a SIGCHLD coalesced during a fork */
        if (g_backoff) g_rxlen = 0;  /* a half frame of a host that went away */

        if (need > pcap) {
            struct pollfd *n2 = realloc(pfds, need * sizeof *n2);
            if (!n2) die("out of memory");
            pfds = n2;
            pcap = need;
        }
        pfds[np++] = (struct pollfd){ g_sigfd, POLLIN, 0 };
        for (size_t i = 0; i < g_nprocs; i++) {
            struct proc *p = &g_procs[i];
            if (p->ilen >= STDIN_HIGH) paused = 1;
            pfds[np++] = (struct pollfd){ p->out, POLLIN, 0 };
            pfds[np++] = (struct pollfd){ p->err, POLLIN, 0 };
            pfds[np++] = (struct pollfd){ p->ilen > 0 ? p->in : -1, POLLOUT, 0 };
        }
        if (g_backoff) {
            struct timespec now;
            long long left;
            clock_gettime(CLOCK_MONOTONIC, &now);
            left = (long long)(g_backoff_until.tv_sec - now.tv_sec) * 1000 +
                   (g_backoff_until.tv_nsec - now.tv_nsec) / 1000000;
            if (left <= 0) g_backoff = 0;
            else timeout = (int)left + 1;
        }
        if (!g_backoff && !paused) {
            port_idx = (int)np;
            pfds[np++] = (struct pollfd){ g_port, POLLIN, 0 };
        }

        r = poll(pfds, np, timeout);
        if (r < 0) {
            if (errno == EINTR) continue;
            die("poll: %s", strerror(errno));
        }

        /* 1. process output and stdin (no process leaves the table here) */
        for (size_t i = 0; i < g_nprocs; i++) {
            struct proc *p = &g_procs[i];
            struct pollfd *f = &pfds[1 + 3 * i];
            if (f[0].revents) pump(p, 0);
            if (f[1].revents) pump(p, 1);
            if (f[2].revents) {
                if (f[2].revents & POLLOUT) flush_stdin(p);
                else close_stdin(p);  /* POLLERR: the reader is gone */
            }
        }
        /* 2. exits: what is left in the pipes, then EXIT */
        if (pfds[0].revents) {
            struct signalfd_siginfo si;
            while (read(g_sigfd, &si, sizeof si) > 0) {
            }
            reap_all();
        }
        /* 3. requests */
        if (port_idx >= 0 && pfds[port_idx].revents) {
            short re = pfds[port_idx].revents;
            if (re & POLLIN) read_port();
            else if (re & (POLLHUP | POLLERR | POLLNVAL)) host_gone();
        }
    }
}
