/*
 * ember-agent: the wire protocol (docs/agent-protocol.md) on the port. Writing
 * frames, reading and parsing them, dispatching requests, HELLO; finding the
 * virtio-serial port at boot.
 */
#include "agent.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/utsname.h>
#include <unistd.h>

int g_port = -1;
int g_quit;                       /* test mode: the host hung up */
static int g_desync;              /* framing error: drop input until the host reconnects */
struct timespec g_backoff_until;
long long g_gone_since;  /* CLOCK_MONOTONIC ms when the host went away; 0 while connected */
int g_backoff;

unsigned char *g_rx;              /* HDR + MAX_PAYLOAD */
size_t g_rxlen;
unsigned char g_tx[HDR + CHUNK];

/* ---------------------------------------------------------------- the port */

void host_gone(void)
{
    if (g_test_mode) {
        g_quit = 1;
        return;
    }
    /* virtio-serial without a host: reads give 0, poll gives POLLHUP for as long
     * as nobody is connected. Forget any half frame and poll the port again later. */
    long long now = now_ms(CLOCK_MONOTONIC);
    g_desync = 0;
    g_backoff = 1;       /* the main loop also drops g_rx */
    if (!g_gone_since) g_gone_since = now;
    clock_gettime(CLOCK_MONOTONIC, &g_backoff_until);
    /* a host that just went away (a clone's port comes up closed, a daemon
       restarts) is back soon: look often at first, rarely after a second */
    g_backoff_until.tv_nsec += (now - g_gone_since < 1000 ? BACKOFF_FIRST_MS : BACKOFF_MS)
                               * 1000000L;
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
void send_tx(int type, uint32_t ch, size_t len)
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

void send_json(int type, uint32_t ch, struct jw *w)
{
    jw_puts(w, "}");
    send_frame(type, ch, w->buf, w->len);
}

void send_error(uint32_t ch, int code, const char *fmt, ...)
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

/* ------------------------------------------------------------------- HELLO */

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
    if (g_restored_from[0]) jw_kstr(&w, "restored_from", g_restored_from);
    if (g_root_pending) {  /* the host's IDENTITY is to mount it (ember.late=1) */
        jw_key(&w, "root_pending");
        jw_puts(&w, "true");
    }
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

/* ------------------------------------------------------------------- frames */

static void handle_frame(int type, uint32_t ch, const unsigned char *payload, size_t len)
{
    switch (type) {
    case T_HELLO: do_hello(payload, len); break;
    case T_EXEC:
    case T_TOOL:
        if (g_root_pending) {  /* nothing runs in the initramfs: the root comes first */
            send_error(ch, E_BAD_REQUEST, "the machine's root is not mounted yet");
            break;
        }
        if (type == T_EXEC) do_exec(ch, payload, len);
        else do_tool(ch, payload, len);
        break;
    case T_STDIN:
        if (ch == 0) send_error(0, E_BAD_REQUEST, "STDIN on channel 0");
        else do_stdin(ch, payload, len);
        break;
    case T_SIGNAL: do_signal(ch, payload, len); break;
    case T_RESIZE: do_resize(ch, payload, len); break;
    case T_IDENTITY: do_identity(ch, payload, len); break;
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

void read_port(void)
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
    g_gone_since = 0;  /* a host is here */
    if (g_desync) return;
    g_rxlen += (size_t)n;
    process_rx();
}

/* ---------------------------------------------------------- finding the port */

int open_port(const char *name)
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
