/*
 * ember-agent: the tool, loaded by TOOL frames into a sealed memfd.
 */
#include "agent.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

/* The tool (a static busybox the host sends with TOOL frames): a sealed,
 * read-only memfd that EXEC "tool": true runs with execveat. It never touches
 * the guest's filesystem. g_tool_load is the memfd of a load in progress. */
int g_tool_fd = -1;
static int g_tool_load = -1;
static size_t g_tool_len;
static char g_tool_err[256];      /* why the load in progress failed; "" = fine so far */

/* ---------------------------------------------------------------- the tool */

void tool_abort_load(void)
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
void do_tool(uint32_t ch, const unsigned char *payload, size_t len)
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
