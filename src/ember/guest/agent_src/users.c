/*
 * ember-agent: users and groups, read from /etc/passwd and /etc/group by hand
 * (a static binary has no name service).
 */
#include "agent.h"

#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------ users and groups */

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
int resolve_user(const char *spec, struct creds *c, char *err, size_t errlen)
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
