/*
 * ember-agent: JSON. The writer of reply payloads (struct jw, see JW in agent.h)
 * and the parser of the protocol's flat request objects (struct req).
 */
#include "agent.h"

#include <ctype.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------- JSON output */

static void jw_raw(struct jw *w, const char *s, size_t n)
{
    if (w->len + n + 1 > w->cap)
        n = w->cap - w->len - 1;  /* truncate; callers keep well below cap */
    memcpy(w->buf + w->len, s, n);
    w->len += n;
    w->buf[w->len] = 0;
}

void jw_puts(struct jw *w, const char *s) { jw_raw(w, s, strlen(s)); }

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

void jw_key(struct jw *w, const char *k)
{
    jw_puts(w, w->len > 1 ? ",\"" : "\"");
    jw_puts(w, k);
    jw_puts(w, "\":");
}

void jw_int(struct jw *w, const char *k, long long v)
{
    char num[32];
    jw_key(w, k);
    snprintf(num, sizeof num, "%lld", v);
    jw_puts(w, num);
}

void jw_kstr(struct jw *w, const char *k, const char *v)
{
    jw_key(w, k);
    jw_str(w, v);
}

/* -------------------------------------------------------------- JSON input */

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

void req_free(struct req *r)
{
    free_strv(r->argv, r->argc);
    free_strv(r->env, r->envc);
    free(r->cwd);
    free(r->user);
    free(r->hostname);
    free(r->entropy);
    free(r->machine_id);
    free(r->snapshot);
    free(r->rw);
    free(r->volumes);
    free(r->shares);
    memset(r, 0, sizeof *r);
}

/* Parse a control payload (a JSON object) into r. Returns -1 with *err set. */
int parse_req(const unsigned char *buf, size_t len, struct req *r, const char **err)
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
            } else if (!strcmp(key, "time_ns")) {
                rc = jp_int(&p, &r->time_ns);
                r->has_time = 1;
            } else if (!strcmp(key, "hostname") || !strcmp(key, "entropy") ||
                       !strcmp(key, "machine_id") || !strcmp(key, "snapshot") ||
                       !strcmp(key, "rw") || !strcmp(key, "volumes") ||
                       !strcmp(key, "shares")) {
                char **slot = !strcmp(key, "hostname") ? &r->hostname
                    : !strcmp(key, "entropy") ? &r->entropy
                    : !strcmp(key, "machine_id") ? &r->machine_id
                    : !strcmp(key, "rw") ? &r->rw
                    : !strcmp(key, "volumes") ? &r->volumes
                    : !strcmp(key, "shares") ? &r->shares : &r->snapshot;
                free(*slot);
                *slot = NULL;
                rc = jp_string(&p, slot);
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
