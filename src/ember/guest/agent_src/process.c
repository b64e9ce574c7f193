/*
 * ember-agent: processes. The table of live ones, pumping their output and
 * stdin, reaping; EXEC (clone, pty or pipes, credentials, exec); STDIN, SIGNAL
 * and RESIZE; signalling every process at shutdown.
 */
#include "agent.h"

#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>

/* --------------------------------------------------------------- processes */

struct proc *g_procs;
size_t g_nprocs;
static size_t g_capprocs;

struct proc *find_proc(uint32_t ch)
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

void close_stdin(struct proc *p)
{
    close_fd(&p->in);
    free(p->ibuf);
    p->ibuf = NULL;
    p->ilen = p->icap = 0;
    p->in_eof_pending = 0;
}

/* Read once from a stream and forward it. 1: got data; 0: would block; -1: closed. */
int pump(struct proc *p, int is_err)
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

void flush_stdin(struct proc *p)
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

void remove_proc(struct proc *p)
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
int reap_all(void)
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

int set_nonblock(int fd)
{
    int fl = fcntl(fd, F_GETFL);
    return fl < 0 ? -1 : fcntl(fd, F_SETFL, fl | O_NONBLOCK);
}

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

void do_exec(uint32_t ch, const unsigned char *payload, size_t len)
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

/* ------------------------------------------------- stdin, signals, terminal size */

void do_stdin(uint32_t ch, const unsigned char *payload, size_t len)
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

void do_signal(uint32_t ch, const unsigned char *payload, size_t len)
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

void do_resize(uint32_t ch, const unsigned char *payload, size_t len)
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

/* Signal every process: as PID 1 all of them; in test mode our process groups
 * and our direct children (orphans reparented to us, the subreaper). */
void signal_all(int sig)
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
void wait_children(long ms, int resend)
{
    long long end = now_ms(CLOCK_MONOTONIC) + ms;
    while (reap_all() && now_ms(CLOCK_MONOTONIC) < end) {
        sleep_ms(10);
        if (resend) signal_all(resend);
    }
}
