/*
 * ember-agent: the boot as PID 1 (API filesystems, the initramfs -> overlay root
 * switch, hostname, then network and the port) and unmounting at shutdown.
 */
#include "agent.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

/* ------------------------------------------------------------------- boot */

void mkdirs(const char *path, mode_t mode)
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

void write_file(const char *path, const char *data)
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
void std_fds(const char *dev)
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

#define BLKFLSBUF_ _IO(0x12, 97) /* <linux/fs.h>'s, which clashes with <sys/mount.h> */
/* Volumes and the root layer: mkfs left the inode tables lazily unzeroed (ext4
 * tracks which are); the kernel's lazyinit thread zeroing them, and prefetching
 * bitmaps, would cost every idle guest CPU under TCG and fill the sparse image
 * with ~1/64 of its size in zeros. */
#define EXT4_OPTS "noinit_itable,no_prefetch_block_bitmaps"

/* The next "N:/path:mode" entry of a mount list, split in place; 0 at the end. */
static int next_entry(char **spec, char **save, long *n, char **target, int *ro)
{
    char *item = strtok_r(*spec, ",", save), *mode, *end;
    *spec = NULL; /* strtok_r goes on from *save */
    if (!item) return 0;
    *target = strchr(item, ':');
    if (!*target) die("bad mount entry %s", item);
    *(*target)++ = 0;
    mode = strrchr(*target, ':');
    if (!mode) die("bad mount entry %s", item);
    *mode++ = 0;
    *n = strtol(item, &end, 10);
    if (*end || *n < 0 || *n > 255 || (*target)[0] != '/' || strstr(*target, ".."))
        die("bad mount entry %s", item);
    *ro = strcmp(mode, "ro") == 0;
    return 1;
}

/* /dev/sdX of LUN n of the one SCSI controller, once the kernel has found it. */
static void lun_device(long n, char *out, size_t outlen)
{
    long long end = now_ms(CLOCK_MONOTONIC) + 5000;
    for (;;) {
        DIR *d = opendir("/sys/bus/scsi/devices");
        struct dirent *e;
        while (d && (e = readdir(d))) {
            int host, chan, id, lun;
            char tail;
            if (sscanf(e->d_name, "%d:%d:%d:%d%c", &host, &chan, &id, &lun, &tail) != 4
                || lun != n || chan != 0 || id != 0)
                continue;
            char path[PATH_MAX];
            snprintf(path, sizeof path, "/sys/bus/scsi/devices/%s/block", e->d_name);
            DIR *b = opendir(path);
            struct dirent *be;
            while (b && (be = readdir(b))) {
                if (be->d_name[0] == '.') continue;
                snprintf(out, outlen, "/dev/%s", be->d_name);
                struct stat st;
                if (stat(out, &st) == 0) {
                    closedir(b);
                    closedir(d);
                    return;
                }
            }
            if (b) closedir(b);
        }
        if (d) closedir(d);
        if (now_ms(CLOCK_MONOTONIC) > end) die("volume %ld: no disk at SCSI LUN %ld", n, n);
        sleep_ms(10);
    }
}

/*
 * ember.volumes=0:/data:rw,1:/logs:ro -- named volumes (ext4 disks, LUN N of the
 * SCSI controller being volume N), mounted into the new root before it becomes
 * "/". The host checked the paths (absolute, plain characters, no ".."); a
 * volume that will not mount is fatal: the machine must not run without the
 * data it was given.
 */
static void mount_volumes(char *spec)
{
    char *save = NULL, *target;
    long n;
    int ro;
    while (next_entry(&spec, &save, &n, &target, &ro)) {
        char devpath[PATH_MAX], dst[PATH_MAX], rescan[PATH_MAX];
        lun_device(n, devpath, sizeof devpath);
        /* a machine restored from a boot snapshot: the kernel probed the snapshot's
         * disks, so read this one's size again and drop what it cached of theirs */
        snprintf(rescan, sizeof rescan, "/sys/block/%s/device/rescan", devpath + 5);
        write_file(rescan, "1");
        int bfd = open(devpath, O_RDONLY | O_CLOEXEC);
        if (bfd >= 0) {
            ioctl(bfd, BLKFLSBUF_, 0);
            close(bfd);
        }
        snprintf(dst, sizeof dst, "/ember/root%s", target);
        unsigned long flags = MS_NOSUID | MS_NODEV | (ro ? MS_RDONLY : 0);
        mkdirs(dst, 0755);
        if (mount(devpath, dst, "ext4", flags, EXT4_OPTS) == 0) continue;
        if (ro && errno == EROFS) {
            /* its last machine died without unmounting it: a read-only disk cannot
             * replay the journal, so read it as it is (the last writes may be missing) */
            logmsg("volume %ld was not unmounted cleanly: mounted without its journal", n);
            do_mount(devpath, dst, "ext4", flags, "norecovery," EXT4_OPTS, 1);
            continue;
        }
        die("mount ext4 on %s: %s", dst, strerror(errno));
    }
}

/*
 * ember.shares=0:/src:rw,1:/cfg:ro -- host directories: entry N of the one 9p
 * export (tag ember.shares) is share N. The export is mounted once, each entry
 * bound at its path, and the export itself let go: the guest sees its shares
 * and nothing else. Read-only is the host's doing too (its bind is read-only).
 */
static void mount_shares(char *spec)
{
    char *save = NULL, *target;
    long n;
    int ro;
    do_mount("ember.shares", "/ember/shares", "9p", MS_NOSUID | MS_NODEV,
             "trans=virtio,version=9p2000.L,msize=512000,access=user", 1);
    while (next_entry(&spec, &save, &n, &target, &ro)) {
        char src[PATH_MAX], dst[PATH_MAX];
        snprintf(src, sizeof src, "/ember/shares/%ld", n);
        snprintf(dst, sizeof dst, "/ember/root%s", target);
        mkdirs(dst, 0755);
        do_mount(src, dst, NULL, MS_BIND, NULL, 1);
        if (ro)
            do_mount(NULL, dst, NULL, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV,
                     NULL, 1);
    }
    umount2("/ember/shares", MNT_DETACH);
}

static void keep_fd(const char *path, int at)
{
    int fd = open(path, O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) {
        logmsg("open %s: %s", path, strerror(errno));
        return;
    }
    if (dup3(fd, at, O_CLOEXEC) < 0) logmsg("dup3 %s: %s", path, strerror(errno));
    close(fd);
}

/* What boot() read from the command line, for a late root (enter_root). */
static char g_host[65] = "ember", g_net[128] = "";
int g_root_pending;

/*
 * The root: an overlay of the image (mounted read-only at /ember/lower) under a
 * writable layer, then the volumes and shares, then it becomes "/". At boot, or
 * -- with ember.late=1 -- when the host's IDENTITY says how (``rw``,
 * ``volumes``, ``shares``): a boot snapshot is taken before, so that a machine
 * restored from it mounts its own disks, whatever the snapshot's were.
 */
static void enter_root(const char *rw, char *vols, char *shares)
{
    if (strcmp(rw, "tmpfs") == 0) {
        do_mount("tmpfs", "/ember/rw", "tmpfs", 0, "mode=0755", 1);
    } else if (!strncmp(rw, "/dev/vd", 7) && !strchr(rw + 5, '/') && strlen(rw) < 16) {
        /* the root layer on disk (volumes/layer.py): drop what the kernel cached of
         * the disk a boot snapshot had, then its ext4 (a crash's journal replayed) */
        int bfd = open(rw, O_RDONLY | O_CLOEXEC);
        if (bfd < 0) die("root layer %s: %s", rw, strerror(errno));
        ioctl(bfd, BLKFLSBUF_, 0);
        close(bfd);
        do_mount(rw, "/ember/rw", "ext4", 0, EXT4_OPTS, 1);
    } else {
        die("unknown writable layer %s", rw);
    }
    mkdirs("/ember/rw/upper", 0755);
    mkdirs("/ember/rw/work", 0755);
    do_mount("overlay", "/ember/root", "overlay", 0,
             "lowerdir=/ember/lower,upperdir=/ember/rw/upper,workdir=/ember/rw/work", 1);
    mount_inner("/ember/root", 1);
    if (vols && vols[0]) mount_volumes(vols);
    if (shares && shares[0]) mount_shares(shares);
    /* the initramfs's own API mounts are not needed any more */
    umount2("/dev", MNT_DETACH);
    umount2("/proc", MNT_DETACH);
    umount2("/sys", MNT_DETACH);
    /* the overlay's layers stay reachable at /proc/1/fd/900 (upper) and 901 (lower)
     * once they are out of the root's sight: `ember diff` reads them */
    keep_fd("/ember/rw/upper", UPPER_FD);
    keep_fd("/ember/lower", LOWER_FD);
    if (chdir("/ember/root") < 0) die("chdir /ember/root: %s", strerror(errno));
    if (mount(".", "/", NULL, MS_MOVE, NULL) < 0) die("move root: %s", strerror(errno));
    if (chroot(".") < 0) die("chroot: %s", strerror(errno));
    if (chdir("/") < 0) die("chdir /: %s", strerror(errno));
    set_hostname(g_host, 1);
    if (mkdir("/tmp", 01777) == 0) chmod("/tmp", 01777);
    g_root_pending = 0;
}

/* IDENTITY's late root: 0, or -1 with *err set. */
int late_root(const char *rw, char *vols, char *shares, const char **err)
{
    if (!g_root_pending) {
        *err = "the root is mounted already";
        return -1;
    }
    enter_root(rw, vols, shares);
    if (g_net[0]) net_resolv(g_net);
    return 0;
}

void boot(void)
{
    char cmdline[4096] = "", root[256] = "", fstype[64] = "erofs", late[8] = "";
    char port[128] = "ember.agent", vols[2048] = "", shares[2048] = "";
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
    cmdline_get(cmdline, "ember.hostname", g_host, sizeof g_host);
    cmdline_get(cmdline, "ember.port", port, sizeof port);
    cmdline_get(cmdline, "ember.net", g_net, sizeof g_net);
    cmdline_get(cmdline, "ember.volumes", vols, sizeof vols);
    cmdline_get(cmdline, "ember.shares", shares, sizeof shares);
    cmdline_get(cmdline, "ember.late", late, sizeof late);

    if (root[0]) {
        struct stat st;
        long long end = now_ms(CLOCK_MONOTONIC) + 5000;
        while (stat(root, &st) < 0) {
            if (now_ms(CLOCK_MONOTONIC) > end) die("root device %s: %s", root, strerror(errno));
            sleep_ms(10);
        }
        do_mount(root, "/ember/lower", fstype, MS_RDONLY, NULL, 1);
        if (strcmp(late, "1") == 0) {
            g_root_pending = 1;  /* the agent serves from the initramfs until IDENTITY */
            if (sethostname(g_host, strlen(g_host)) < 0)
                logmsg("sethostname: %s", strerror(errno));
        } else {
            enter_root("tmpfs", vols, shares);
        }
    } else {
        mount_inner("", 0);
        set_hostname(g_host, 1);
        if (mkdir("/tmp", 01777) == 0) chmod("/tmp", 01777);
    }

    loopback_up();
    net_sysctls();
    if (g_net[0]) net_up(g_net);
    g_port = open_port(port);
}

/* ---------------------------------------------------------------- unmounting */

void umount_all(void)
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
