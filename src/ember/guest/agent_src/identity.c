/*
 * identity.c: who the guest is -- its hostname and /etc/hosts at boot -- and
 * IDENTITY, the refresh a machine restored from a snapshot gets before any
 * user command runs: entropy for the kernel's RNG and a reseed (clones of one
 * snapshot must never read the same random bytes), the host's wall clock, a
 * hostname and a fresh /etc/machine-id where the image has one. A clone's agent remembers which snapshot it was restored from and
 * says so in READY.
 */
#include "agent.h"

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

/* <linux/random.h>'s, which musl's headers lack */
#ifndef RNDADDENTROPY
#define RNDADDENTROPY _IOW('R', 0x03, int[2])
#endif
#ifndef RNDRESEEDCRNG
#define RNDRESEEDCRNG _IO('R', 0x07)
#endif

char g_restored_from[SNAPSHOT_ID_MAX + 1];
static int g_hosts_ours;  /* /etc/hosts was written by the agent, not the image */

static void write_hosts(const char *host)
{
    char buf[256];
    snprintf(buf, sizeof buf, "127.0.0.1\tlocalhost\n::1\tlocalhost\n127.0.1.1\t%s\n", host);
    write_file("/etc/hosts", buf);
}

void set_hostname(const char *host, int at_boot)
{
    char buf[256];
    if (sethostname(host, strlen(host)) < 0) logmsg("sethostname: %s", strerror(errno));
    mkdirs("/etc", 0755);
    snprintf(buf, sizeof buf, "%s\n", host);
    write_file("/etc/hostname", buf);
    if (at_boot && access("/etc/hosts", F_OK) < 0) g_hosts_ours = 1;
    if (g_hosts_ours) write_hosts(host);
}

static int valid_hostname(const char *s)
{
    size_t n = strlen(s);
    if (n == 0 || n > 63 || !isalnum((unsigned char)s[0]) || !isalnum((unsigned char)s[n - 1]))
        return 0;
    for (size_t i = 0; i < n; i++)
        if (!isalnum((unsigned char)s[i]) && s[i] != '-' && s[i] != '.') return 0;
    return 1;
}

static int unhex(const char *s, unsigned char *out, size_t max, size_t *n)
{
    size_t len = strlen(s);
    if (len % 2 || len / 2 > max) return -1;
    for (size_t i = 0; i < len; i += 2) {
        unsigned v;
        if (!isxdigit((unsigned char)s[i]) || !isxdigit((unsigned char)s[i + 1])) return -1;
        if (sscanf(s + i, "%2x", &v) != 1) return -1;
        out[i / 2] = (unsigned char)v;
    }
    *n = len / 2;
    return 0;
}

static int valid_id(const char *s, size_t len)  /* lowercase hex of exactly len digits */
{
    if (strlen(s) != len) return 0;
    for (size_t i = 0; i < len; i++)
        if (!isdigit((unsigned char)s[i]) && !(s[i] >= 'a' && s[i] <= 'f')) return 0;
    return 1;
}

/* Credit `n` bytes of host entropy to the kernel's pool and reseed its CRNG. */
static const char *reseed(const unsigned char *bytes, size_t n)
{
    const char *err;
    struct {
        int entropy_count;
        int buf_size;
        unsigned char buf[ENTROPY_MAX];
    } info;
    int fd = open("/dev/urandom", O_WRONLY | O_CLOEXEC);
    if (fd < 0) return "cannot open /dev/urandom";
    info.entropy_count = (int)(n * 8);
    info.buf_size = (int)n;
    memcpy(info.buf, bytes, n);
    err = NULL;
    if (ioctl(fd, RNDADDENTROPY, &info) < 0) err = "RNDADDENTROPY failed";
    else if (ioctl(fd, RNDRESEEDCRNG) < 0) err = "RNDRESEEDCRNG failed";
    close(fd);
    return err;
}

void do_identity(uint32_t ch, const unsigned char *payload, size_t len)
{
    struct req r;
    const char *jerr, *rng_err = NULL;
    unsigned char entropy[ENTROPY_MAX];
    size_t nent = 0;
    int clock_set = 0, machine_id = 0;
    JW(w);
    if (ch != 0) {
        send_error(0, E_BAD_REQUEST, "IDENTITY on channel %u", ch);
        return;
    }
    if (parse_req(payload, len, &r, &jerr) < 0) {
        send_error(0, E_BAD_REQUEST, "bad IDENTITY: %s", jerr);
        return;
    }
    if ((r.hostname && !valid_hostname(r.hostname)) ||
        (r.entropy && unhex(r.entropy, entropy, sizeof entropy, &nent) < 0) ||
        (r.machine_id && !valid_id(r.machine_id, 32)) ||
        (r.snapshot && (strlen(r.snapshot) > SNAPSHOT_ID_MAX || !valid_id(r.snapshot,
                                                                          strlen(r.snapshot))))
        || (r.has_time && r.time_ns <= 0)) {
        send_error(0, E_BAD_REQUEST, "bad IDENTITY: a field is malformed");
        req_free(&r);
        return;
    }
    if (r.snapshot) snprintf(g_restored_from, sizeof g_restored_from, "%s", r.snapshot);
    if (r.rw && g_test_mode) {
        send_error(0, E_BAD_REQUEST, "bad IDENTITY: test mode has no root to mount");
        req_free(&r);
        return;
    }
    if (g_test_mode) {
        /* not PID 1 of a guest: the clock, hostname and RNG are the host's own */
        jw_key(&w, "reseeded");
        jw_puts(&w, "false");
        jw_kstr(&w, "rng_error", "test mode: the system's identity is left alone");
        jw_key(&w, "clock");
        jw_puts(&w, "false");
        send_json(T_IDENTITY_DONE, 0, &w);
        req_free(&r);
        return;
    }
    /* entropy first: nothing below may draw randomness the snapshot shares */
    if (nent) rng_err = reseed(entropy, nent);
    if (r.has_time) {
        struct timespec ts = { (time_t)(r.time_ns / 1000000000LL), (long)(r.time_ns % 1000000000LL) };
        clock_set = clock_settime(CLOCK_REALTIME, &ts) == 0;
    }
    if (r.rw) {
        /* the late root: before the hostname and machine-id, which live in it */
        const char *merr = NULL;
        if (late_root(r.rw, r.volumes, r.shares, &merr) < 0) {
            send_error(0, E_BAD_REQUEST, "bad IDENTITY: %s", merr);
            explicit_bzero(entropy, sizeof entropy);
            req_free(&r);
            return;
        }
    }
    if (r.hostname) set_hostname(r.hostname, 0);
    if (r.machine_id && access("/etc/machine-id", F_OK) == 0) {
        char buf[40];
        snprintf(buf, sizeof buf, "%s\n", r.machine_id);
        write_file("/etc/machine-id", buf);
        machine_id = 1;
    }
    explicit_bzero(entropy, sizeof entropy);
    jw_key(&w, "reseeded");
    jw_puts(&w, nent && !rng_err ? "true" : "false");
    if (rng_err) jw_kstr(&w, "rng_error", rng_err);
    jw_key(&w, "clock");
    jw_puts(&w, clock_set ? "true" : "false");
    jw_key(&w, "machine_id");
    jw_puts(&w, machine_id ? "true" : "false");
    send_json(T_IDENTITY_DONE, 0, &w);
    req_free(&r);
}
