/*
 * ember-agent: what crosses its source files. Every .c file here includes this
 * header first (it defines _GNU_SOURCE before any system header).
 *
 *   main.c      logging, PID 1 lifecycle (power off, SHUTDOWN) and the main loop
 *   protocol.c  the port: framing, sending frames, dispatching requests, HELLO
 *   json.c      JSON output (replies) and input (the flat request objects)
 *   tool.c      TOOL: the sealed memfd that EXEC "tool": true runs
 *   process.c   processes: spawn via clone, pty, stdin/stdout/stderr, signals, reaping
 *   users.c     users and groups from /etc/passwd and /etc/group
 *   mounts.c    the boot: API mounts, initramfs -> overlay root, hostname; unmounting
 *   network.c   loopback and the static eth0 setup (ember.net=)
 *   identity.c  hostname at boot; IDENTITY, the refresh of a machine restored from a snapshot
 *
 * The host's builder (ember/guest/agent.py) compiles every .c file in this
 * directory into one static binary, and its cache key covers every file here.
 */
#ifndef EMBER_AGENT_H
#define EMBER_AGENT_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <limits.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <time.h>

#define AGENT_NAME "ember-agent/0.1"
#define PROTO_VERSION 1
#define HDR 9
#define MAX_PAYLOAD (1u << 20)
#define CHUNK 65536
#define STDIN_HIGH (1u << 20)     /* stop reading the port while a stdin buffer is this full */
#define DRAIN_MAX_READS 64        /* at exit: at most 64 x 64 KiB more output per stream */
#define BACKOFF_MS 50             /* virtio port without a host: retry every 50 ms */
#define BACKOFF_FIRST_MS 2        /* ... every 2 ms in the first second without one */
#define MAX_GROUPS 64
#define TOOL_MAX (8u << 20)       /* the largest tool (a static busybox is ~2 MiB) */
#define ENTROPY_MAX 512          /* IDENTITY: at most this many bytes of host entropy */
#define SNAPSHOT_ID_MAX 64
#define UPPER_FD 900              /* the root overlay's upper layer, for `ember diff` */
#define LOWER_FD 901              /* ... and its image */
#define DEFAULT_PATH "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

enum {
    T_HELLO = 0x01, T_READY = 0x02,
    T_EXEC = 0x10, T_STDIN = 0x11, T_SIGNAL = 0x12, T_RESIZE = 0x13, T_TOOL = 0x14,
    T_IDENTITY = 0x15,
    T_SHUTDOWN = 0x1F,
    T_STARTED = 0x20, T_STDOUT = 0x21, T_STDERR = 0x22, T_EXIT = 0x23, T_ERROR = 0x24,
    T_TOOL_STATUS = 0x25, T_IDENTITY_DONE = 0x26,
};

/* ERROR codes: 127/126 on a process channel (never started); these otherwise. */
#define E_BAD_REQUEST 1
#define E_FRAMING 2

/* ------------------------------------------------------------------ main.c */

extern int g_pid1;
extern int g_test_mode;

void logmsg(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void power_off(void);
void die(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
long long now_ms(clockid_t clk);
void sleep_ms(long ms);
void do_shutdown(void);

/* ------------------------------------------------------------------ json.c */

struct jw {
    char *buf;
    size_t cap, len;
};

/* A JSON object writer on a 4 KiB stack buffer, opened with "{"; send_json closes it. */
#define JW(name) char name##_buf[4096]; struct jw name = { name##_buf, sizeof name##_buf, 0 }; \
    jw_puts(&name, "{")

void jw_puts(struct jw *w, const char *s);
void jw_key(struct jw *w, const char *k);
void jw_int(struct jw *w, const char *k, long long v);
void jw_kstr(struct jw *w, const char *k, const char *v);

/* The flat request objects of the protocol. Unknown keys are skipped. */
struct req {
    char **argv; size_t argc; int has_argv;
    char **env; size_t envc;
    char *cwd;
    char *user;
    int tty, stdin_, tool;
    long long rows, cols, sig, time_ns;
    int has_rows, has_cols, has_sig, has_time;
    char *hostname, *entropy, *machine_id, *snapshot;  /* IDENTITY */
    char *rw, *volumes, *shares;                       /* IDENTITY: a late root */
};

int parse_req(const unsigned char *buf, size_t len, struct req *r, const char **err);
void req_free(struct req *r);

/* -------------------------------------------------------------- protocol.c */

extern int g_port;
extern int g_quit;                /* test mode: the host hung up */
extern struct timespec g_backoff_until;
extern int g_backoff;
extern long long g_gone_since;
extern unsigned char *g_rx;       /* HDR + MAX_PAYLOAD */
extern size_t g_rxlen;
extern unsigned char g_tx[HDR + CHUNK];

void host_gone(void);
void send_tx(int type, uint32_t ch, size_t len);
void send_json(int type, uint32_t ch, struct jw *w);
void send_error(uint32_t ch, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
void read_port(void);
int open_port(const char *name);

/* ------------------------------------------------------------------ tool.c */

extern int g_tool_fd;

void tool_abort_load(void);
void do_tool(uint32_t ch, const unsigned char *payload, size_t len);

/* --------------------------------------------------------------- process.c */

struct proc {
    uint32_t ch;
    pid_t pid;
    int out, err, in;      /* parent ends, -1 once closed; tty: out = master, in = dup */
    int tty;
    int in_eof_pending;    /* close stdin once the buffer is written */
    unsigned char *ibuf;
    size_t ilen, icap;
};

extern struct proc *g_procs;
extern size_t g_nprocs;

struct proc *find_proc(uint32_t ch);
void close_stdin(struct proc *p);
int pump(struct proc *p, int is_err);
void flush_stdin(struct proc *p);
void remove_proc(struct proc *p);
int reap_all(void);
int set_nonblock(int fd);
void do_exec(uint32_t ch, const unsigned char *payload, size_t len);
void do_stdin(uint32_t ch, const unsigned char *payload, size_t len);
void do_signal(uint32_t ch, const unsigned char *payload, size_t len);
void do_resize(uint32_t ch, const unsigned char *payload, size_t len);
void signal_all(int sig);
void wait_children(long ms, int resend);

/* ----------------------------------------------------------------- users.c */

struct creds {
    uid_t uid;
    gid_t gid;
    gid_t groups[MAX_GROUPS];
    int ngroups;
    char name[256];        /* user name, "" when unknown */
    char home[PATH_MAX];
};

int resolve_user(const char *spec, struct creds *c, char *err, size_t errlen);

/* ---------------------------------------------------------------- mounts.c */

void mkdirs(const char *path, mode_t mode);
void write_file(const char *path, const char *data);
void std_fds(const char *dev);
void boot(void);
extern int g_root_pending;        /* ember.late=1: no root until IDENTITY mounts it */
int late_root(const char *rw, char *vols, char *shares, const char **err);
void umount_all(void);

/* --------------------------------------------------------------- network.c */

void loopback_up(void);
void net_sysctls(void);
void net_up(const char *val);
void net_resolv(const char *val);

/* -------------------------------------------------------------- identity.c */

extern char g_restored_from[SNAPSHOT_ID_MAX + 1];  /* "" unless restored from a snapshot */

void set_hostname(const char *host, int at_boot);
void do_identity(uint32_t ch, const unsigned char *payload, size_t len);

#endif
