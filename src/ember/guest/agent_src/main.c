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
 * This file: logging, power off, SHUTDOWN and the main loop. agent.h maps the
 * other files.
 *
 * Build: gcc -static -Os -Wall -Wextra -o ember-agent *.c
 */
#include "agent.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/reboot.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <unistd.h>

int g_pid1;
int g_test_mode;
static int g_sigfd = -1;

/* ------------------------------------------------------------------ logging */

void logmsg(const char *fmt, ...)
{
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    dprintf(2, "ember-agent: %s\n", buf);
}

void power_off(void)
{
    sync();
    reboot(RB_AUTOBOOT);
    /* Not reached; should reboot fail, PID 1 exiting panics the kernel (panic=-1). */
    _exit(1);
}

void die(const char *fmt, ...)
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

long long now_ms(clockid_t clk)
{
    struct timespec ts;
    clock_gettime(clk, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

void sleep_ms(long ms)
{
    struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR) {
    }
}

/* ------------------------------------------------------------------ shutdown */

void do_shutdown(void)
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
