/* Drive the cache reader and the NSS entry points over cache files, for
 * running under AddressSanitizer + UndefinedBehaviorSanitizer (tests/test_asan.py).
 *
 * Build: cc -DSTEPSSH_PATH_OVERRIDE -Inss_shim -fsanitize=address,undefined
 *           -fno-sanitize-recover=all -Wall -Wextra -Werror
 *           tests/c/hostile_main.c nss_shim/cache.c nss_shim/nss.c -lz
 *
 * Usage: hostile_main [OPTION | FILE]...
 *   --name=NAME  --id=N   keys every following file is queried with (repeatable)
 *   --secure=0|1          require_root_owner for the following files
 *   --hostile             (default) any answer is fine, as long as nothing is
 *                         read or written out of bounds and every answer is
 *                         well formed: strings inside the caller's buffer,
 *                         member array aligned, the key asked for, no id 0
 *   --valid               following files are intact: every lookup must
 *                         succeed, buffers grow one byte at a time from 1 so
 *                         every ERANGE boundary is hit, and the answers are
 *                         printed getent-style for the caller to compare:
 *                           P name:x:uid:gid:gecos:home:shell
 *                           G name:x:gid:mem,mem
 *                           I name: gid gid ...
 *   --list=FILE           read "SECURE PATH" lines (SECURE 0 or 1) from FILE
 *
 * Exit status 0 when every file was handled; a violated check aborts with a
 * message (and a sanitizer report aborts on its own).
 *
 * Built with -Dmmap=sc_test_mmap -Dmunmap=sc_test_munmap, the reader's file
 * mapping becomes an exact-size heap copy (nss_shim/test_harness.c), so ASan reports a read even
 * one byte past the end of the file -- a real mmap would silently return the
 * zeros of the last page, or whatever mapping happens to follow.  For the
 * same reason crc32 is defined there (compiled with the sanitizer) instead of
 * coming from the uninstrumented libz: a CRC over bytes past the end of the
 * file must be reported too. */
#define _GNU_SOURCE
#include <errno.h>
#include <grp.h>
#include <limits.h>
#include <nss.h>
#include <pwd.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <zlib.h>

#include "cache.h"
#include "test_harness.h"


#define MAX_BUF (1u << 22)
#define MAX_ENUM 100000u
#define MAX_KEYS 256

static const char *cur_file = "";

static void die(const char *fmt, ...) {
    va_list ap;
    fprintf(stderr, "hostile_main: %s: ", cur_file);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    abort();
}

/* ---- one NSS call with glibc's buffer negotiation, exact-size heap buffers ---- */

enum kind { PWNAM, PWUID, GRNAM, GRGID, PWENT, GRENT };

struct res {
    enum nss_status st;
    int err;
    char *buf;
    size_t len;
    size_t min_ok; /* buffer size that first succeeded */
    struct passwd pw;
    struct group gr;
};

static enum nss_status call1(enum kind k, const char *name, uint32_t id, struct res *r) {
    int e = 0;
    enum nss_status st = NSS_STATUS_UNAVAIL;
    memset(&r->pw, 0, sizeof r->pw);
    memset(&r->gr, 0, sizeof r->gr);
    switch (k) {
    case PWNAM: st = _nss_stepssh_getpwnam_r(name, &r->pw, r->buf, r->len, &e); break;
    case PWUID: st = _nss_stepssh_getpwuid_r(id, &r->pw, r->buf, r->len, &e); break;
    case GRNAM: st = _nss_stepssh_getgrnam_r(name, &r->gr, r->buf, r->len, &e); break;
    case GRGID: st = _nss_stepssh_getgrgid_r(id, &r->gr, r->buf, r->len, &e); break;
    case PWENT: st = _nss_stepssh_getpwent_r(&r->pw, r->buf, r->len, &e); break;
    case GRENT: st = _nss_stepssh_getgrent_r(&r->gr, r->buf, r->len, &e); break;
    }
    r->err = e;
    if (st != NSS_STATUS_SUCCESS && st != NSS_STATUS_NOTFOUND && st != NSS_STATUS_UNAVAIL &&
        st != NSS_STATUS_TRYAGAIN)
        die("status %d out of range", (int)st);
    if (st == NSS_STATUS_TRYAGAIN && e != ERANGE)
        die("TRYAGAIN with errno %d, not ERANGE", e);
    return st;
}

static void check_str(const struct res *r, const char *s, const char *what) {
    if (!s || s < r->buf || s >= r->buf + r->len)
        die("%s points outside the caller's buffer", what);
    if (!memchr(s, '\0', (size_t)(r->buf + r->len - s)))
        die("%s is not terminated inside the caller's buffer", what);
}

static void check_answer(enum kind k, const char *name, uint32_t id, const struct res *r) {
    if (k == PWNAM || k == PWUID || k == PWENT) {
        const struct passwd *p = &r->pw;
        check_str(r, p->pw_name, "pw_name");
        check_str(r, p->pw_passwd, "pw_passwd");
        check_str(r, p->pw_gecos, "pw_gecos");
        check_str(r, p->pw_dir, "pw_dir");
        check_str(r, p->pw_shell, "pw_shell");
        if (p->pw_uid == 0 || p->pw_gid == 0)
            die("served a passwd entry with id 0 (%s)", p->pw_name);
        if (p->pw_name[0] == '\0')
            die("served a passwd entry with an empty name");
        if (k == PWNAM && strcmp(p->pw_name, name) != 0)
            die("getpwnam(%s) answered %s", name, p->pw_name);
        if (k == PWUID && p->pw_uid != id)
            die("getpwuid(%u) answered uid %u", id, (unsigned)p->pw_uid);
    } else {
        const struct group *g = &r->gr;
        check_str(r, g->gr_name, "gr_name");
        check_str(r, g->gr_passwd, "gr_passwd");
        char **mv = g->gr_mem;
        if ((char *)mv < r->buf || (char *)mv >= r->buf + r->len)
            die("gr_mem outside the caller's buffer");
        if ((uintptr_t)mv % sizeof(char *) != 0)
            die("gr_mem misaligned");
        for (size_t i = 0;; i++) {
            if ((char *)(mv + i + 1) > r->buf + r->len)
                die("gr_mem not NULL-terminated inside the buffer");
            if (!mv[i])
                break;
            check_str(r, mv[i], "gr_mem[i]");
            if (mv[i][0] == '\0')
                die("empty group member");
        }
        if (g->gr_gid == 0)
            die("served a group with gid 0 (%s)", g->gr_name);
        if (g->gr_name[0] == '\0')
            die("served a group with an empty name");
        if (k == GRNAM && strcmp(g->gr_name, name) != 0)
            die("getgrnam(%s) answered %s", name, g->gr_name);
        if (k == GRGID && g->gr_gid != id)
            die("getgrgid(%u) answered gid %u", id, (unsigned)g->gr_gid);
    }
}

/* Call until the answer fits.  `linear`: grow by one byte (valid files), else
 * double.  The buffer is malloc'd at exactly the size passed, so ASan sees
 * any write past it.  Result buffer stays in r->buf until res_free. */
static enum nss_status lookup(enum kind k, const char *name, uint32_t id, struct res *r,
                              size_t start, int linear) {
    size_t len = start ? start : 1;
    r->buf = NULL;
    for (;;) {
        free(r->buf);
        r->buf = malloc(len);
        r->len = len;
        if (!r->buf)
            die("out of memory");
        enum nss_status st = call1(k, name, id, r);
        r->st = st;
        if (st == NSS_STATUS_TRYAGAIN) {
            if (len >= MAX_BUF)
                return st;
            len = linear ? len + 1 : len * 2;
            continue;
        }
        if (st == NSS_STATUS_SUCCESS) {
            r->min_ok = len;
            check_answer(k, name, id, r);
        }
        return st;
    }
}

static void res_free(struct res *r) {
    free(r->buf);
    r->buf = NULL;
}

/* initgroups as glibc drives it: a small array that the module grows. */
static enum nss_status call_initgroups(const char *user, gid_t primary, long limit, long presize,
                                  const gid_t *pre, long npre, gid_t **out, long *nout) {
    long size = presize, start = npre;
    gid_t *g = malloc((size_t)(size > 0 ? size : 1) * sizeof *g);
    if (!g)
        die("out of memory");
    for (long i = 0; i < npre; i++)
        g[i] = pre[i];
    int e = 0;
    enum nss_status st = _nss_stepssh_initgroups_dyn(user, primary, &start, &size, &g, limit, &e);
    if (st == NSS_STATUS_SUCCESS) {
        if (start < npre || start > size || (limit > 0 && size > limit && size > presize))
            die("initgroups(%s): start %ld size %ld limit %ld", user, start, size, limit);
        for (long i = npre; i < start; i++) {
            if (g[i] == 0 || g[i] == primary)
                die("initgroups(%s) added gid %u", user, (unsigned)g[i]);
            for (long j = 0; j < npre; j++)
                if (g[i] == pre[j])
                    die("initgroups(%s) duplicated gid %u", user, (unsigned)g[i]);
        }
    } else if (st != NSS_STATUS_NOTFOUND && st != NSS_STATUS_UNAVAIL && st != NSS_STATUS_TRYAGAIN) {
        die("initgroups status %d", (int)st);
    }
    *out = g;
    *nout = start;
    return st;
}

/* ---- hostile files: no crash, no out-of-bounds, well-formed answers ---- */

static volatile uint32_t sink;
static const char *names[MAX_KEYS];
static uint32_t ids[MAX_KEYS];
static size_t n_names, n_ids;

static void any_initgroups(const char *user, gid_t primary) {
    static const gid_t pre[] = {4242, 2000, 1001};
    gid_t *g;
    long n;
    call_initgroups(user, primary, -1, 1, NULL, 0, &g, &n);
    free(g);
    call_initgroups(user, primary, 2, 0, NULL, 0, &g, &n);
    free(g);
    call_initgroups(user, primary, -1, 3, pre, 3, &g, &n);
    free(g);
}

static void direct_reader(const char *path, int secure) {
    int err = 0;
    struct sc_map *m = sc_open_path(path, secure, &err);
    if (!m)
        return;
    const struct sc_header *h = sc_header_of(m);
    (void)sc_is_stale(m, time(NULL));
    (void)sc_is_stale(m, 0);
    (void)sc_is_stale(m, (time_t)INT64_MAX);
    (void)sc_is_stale(m, (time_t)INT64_MIN);
    uint32_t nu = h->n_users < 2048 ? h->n_users : 2048;
    uint32_t extra[] = {h->n_users, h->n_users + 1, UINT32_MAX};
    static const size_t sizes[] = {1, 7, 64, 4096};
    for (uint32_t k = 0; k < nu + 3; k++) {
        uint32_t idx = k < nu ? k : extra[k - nu];
        struct sc_user_rec u;
        if (sc_user_record(m, idx, &u) != SC_OK)
            continue;
        const uint32_t *gids;
        uint32_t n;
        uint32_t sum = 0;
        if (sc_user_gids(m, idx, &gids, &n) == SC_OK)
            for (uint32_t i = 0; i < n; i++)
                sum += gids[i];
        uint32_t np = u.princ_count < 4096 ? u.princ_count : 4096;
        for (uint32_t i = 0; i <= np; i++) {
            const char *s;
            if (sc_user_principal(m, idx, i, &s) == SC_OK)
                sum += (uint32_t)strlen(s);
        }
        (void)sc_user_principal(m, idx, UINT32_MAX, &(const char *){NULL});
        sink += sum; /* every gid and principal byte really was read */
        for (size_t j = 0; j < sizeof sizes / sizeof sizes[0]; j++) {
            char *buf = malloc(sizes[j]);
            struct passwd pw;
            if (sc_fill_passwd(m, idx, &pw, buf, sizes[j]) == SC_OK) {
                struct res r = {.buf = buf, .len = sizes[j], .pw = pw};
                check_answer(PWENT, NULL, 0, &r);
            }
            free(buf);
        }
    }
    uint32_t ng = h->n_groups < 2048 ? h->n_groups : 2048;
    uint32_t gextra[] = {h->n_groups, h->n_groups + 1, UINT32_MAX};
    static const size_t gsizes[] = {1, 9, 64, 4096, 65536};
    for (uint32_t k = 0; k < ng + 3; k++) {
        uint32_t idx = k < ng ? k : gextra[k - ng];
        for (size_t j = 0; j < sizeof gsizes / sizeof gsizes[0]; j++) {
            char *buf = malloc(gsizes[j]);
            struct group gr;
            if (sc_fill_group(m, idx, &gr, buf, gsizes[j]) == SC_OK) {
                struct res r = {.buf = buf, .len = gsizes[j], .gr = gr};
                check_answer(GRENT, NULL, 0, &r);
            }
            free(buf);
        }
    }
    for (size_t i = 0; i < n_names; i++) {
        uint32_t idx;
        (void)sc_user_by_name(m, names[i], &idx);
        (void)sc_group_by_name(m, names[i], &idx);
    }
    for (size_t i = 0; i < n_ids; i++) {
        uint32_t idx;
        (void)sc_user_by_uid(m, ids[i], &idx);
        (void)sc_group_by_gid(m, ids[i], &idx);
    }
    (void)sc_verify_all(m);
    (void)sc_verify_all(m);
    sc_close(m);
}

static void hostile_file(const char *path, int secure) {
    struct res r;
    stepssh_nss_set_path(path, secure);
    for (size_t i = 0; i < n_names; i++) {
        lookup(PWNAM, names[i], 0, &r, 16, 0);
        res_free(&r);
        lookup(GRNAM, names[i], 0, &r, 16, 0);
        res_free(&r);
        /* A primary gid that is not the cached user's makes the module ask
         * /etc/passwd (local accounts win); once per name is enough. */
        gid_t *g;
        long n;
        call_initgroups(names[i], 4242, -1, 1, NULL, 0, &g, &n);
        free(g);
    }
    for (size_t i = 0; i < n_ids; i++) {
        lookup(PWUID, NULL, ids[i], &r, 16, 0);
        res_free(&r);
        lookup(GRGID, NULL, ids[i], &r, 16, 0);
        res_free(&r);
    }
    /* Enumerate, and look every listed entry up again by its keys. */
    _nss_stepssh_setpwent(0);
    for (unsigned n = 0; n < MAX_ENUM; n++) {
        if (lookup(PWENT, NULL, 0, &r, 8, 0) != NSS_STATUS_SUCCESS) {
            res_free(&r);
            break;
        }
        struct res r2;
        lookup(PWNAM, r.pw.pw_name, 0, &r2, 8, 0);
        res_free(&r2);
        lookup(PWUID, NULL, r.pw.pw_uid, &r2, 8, 0);
        res_free(&r2);
        any_initgroups(r.pw.pw_name, r.pw.pw_gid);
        res_free(&r);
    }
    _nss_stepssh_endpwent();
    _nss_stepssh_setgrent(0);
    for (unsigned n = 0; n < MAX_ENUM; n++) {
        if (lookup(GRENT, NULL, 0, &r, 8, 0) != NSS_STATUS_SUCCESS) {
            res_free(&r);
            break;
        }
        struct res r2;
        lookup(GRNAM, r.gr.gr_name, 0, &r2, 8, 0);
        res_free(&r2);
        lookup(GRGID, NULL, r.gr.gr_gid, &r2, 8, 0);
        res_free(&r2);
        res_free(&r);
    }
    _nss_stepssh_endgrent();
    /* getXXent without setXXent, and end without set. */
    lookup(PWENT, NULL, 0, &r, 1, 0);
    res_free(&r);
    _nss_stepssh_endpwent();
    _nss_stepssh_endgrent();
    direct_reader(path, secure);
}

/* ---- valid files: everything succeeds, print it ---- */

static void print_pw(const struct passwd *p) {
    printf("P %s:%s:%u:%u:%s:%s:%s\n", p->pw_name, p->pw_passwd, (unsigned)p->pw_uid,
           (unsigned)p->pw_gid, p->pw_gecos, p->pw_dir, p->pw_shell);
}

static void print_gr(const struct group *g) {
    printf("G %s:%s:%u:", g->gr_name, g->gr_passwd, (unsigned)g->gr_gid);
    for (char **m = g->gr_mem; *m; m++)
        printf("%s%s", m == g->gr_mem ? "" : ",", *m);
    printf("\n");
}

static int same_pw(const struct passwd *a, const struct passwd *b) {
    return !strcmp(a->pw_name, b->pw_name) && !strcmp(a->pw_passwd, b->pw_passwd) &&
           a->pw_uid == b->pw_uid && a->pw_gid == b->pw_gid && !strcmp(a->pw_gecos, b->pw_gecos) &&
           !strcmp(a->pw_dir, b->pw_dir) && !strcmp(a->pw_shell, b->pw_shell);
}

static int same_gr(const struct group *a, const struct group *b) {
    if (strcmp(a->gr_name, b->gr_name) || strcmp(a->gr_passwd, b->gr_passwd) || a->gr_gid != b->gr_gid)
        return 0;
    size_t i = 0;
    for (; a->gr_mem[i] && b->gr_mem[i]; i++)
        if (strcmp(a->gr_mem[i], b->gr_mem[i]))
            return 0;
    return !a->gr_mem[i] && !b->gr_mem[i];
}

/* The answer must need exactly r->min_ok bytes: one less is ERANGE (checked by
 * the linear growth), and more is still the same answer. */
static void must_hit(enum kind k, const char *name, uint32_t id, struct res *r) {
    if (lookup(k, name, id, r, 1, 1) != NSS_STATUS_SUCCESS)
        die("lookup kind %d of %s/%u on a valid file: status %d", k, name ? name : "-", id, r->st);
    if (r->min_ok < 2)
        die("a one-byte buffer cannot hold an answer");
}

static void valid_file(const char *path, int secure) {
    stepssh_nss_set_path(path, secure);
    struct res e, r;
    unsigned npw = 0, ngr = 0;
    _nss_stepssh_setpwent(0);
    while (lookup(PWENT, NULL, 0, &e, 1, 1) == NSS_STATUS_SUCCESS) {
        print_pw(&e.pw);
        must_hit(PWNAM, e.pw.pw_name, 0, &r);
        if (!same_pw(&e.pw, &r.pw) || r.min_ok != e.min_ok)
            die("getpwnam(%s) differs from getpwent", e.pw.pw_name);
        res_free(&r);
        must_hit(PWUID, NULL, e.pw.pw_uid, &r);
        if (!same_pw(&e.pw, &r.pw) || r.min_ok != e.min_ok)
            die("getpwuid(%u) differs from getpwent", (unsigned)e.pw.pw_uid);
        res_free(&r);
        /* initgroups, growing from a one-entry array. */
        gid_t *g, *g2;
        long n, n2;
        if (call_initgroups(e.pw.pw_name, e.pw.pw_gid, -1, 1, NULL, 0, &g, &n) != NSS_STATUS_SUCCESS)
            die("initgroups(%s) failed on a valid file", e.pw.pw_name);
        printf("I %s:", e.pw.pw_name);
        for (long i = 0; i < n; i++)
            printf(" %u", (unsigned)g[i]);
        printf("\n");
        /* glibc's limit: keep what fits, a prefix of the full answer. */
        if (call_initgroups(e.pw.pw_name, e.pw.pw_gid, 5, 1, NULL, 0, &g2, &n2) != NSS_STATUS_SUCCESS ||
            n2 != (n < 5 ? n : 5) || memcmp(g, g2, (size_t)n2 * sizeof *g))
            die("initgroups(%s) with limit 5 gave %ld entries", e.pw.pw_name, n2);
        free(g2);
        /* Entries added by earlier modules are not repeated. */
        if (n > 0) {
            gid_t pre[2] = {77777, g[n - 1]};
            if (call_initgroups(e.pw.pw_name, e.pw.pw_gid, -1, 2, pre, 2, &g2, &n2) != NSS_STATUS_SUCCESS ||
                n2 != n + 1)
                die("initgroups(%s) with earlier entries gave %ld, want %ld", e.pw.pw_name, n2, n + 1);
            free(g2);
        }
        free(g);
        res_free(&e);
        npw++;
    }
    if (e.st != NSS_STATUS_NOTFOUND)
        die("passwd enumeration ended with status %d", e.st);
    res_free(&e);
    /* Past the end stays at the end. */
    if (lookup(PWENT, NULL, 0, &e, 64, 0) != NSS_STATUS_NOTFOUND)
        die("getpwent after the end did not say NOTFOUND");
    res_free(&e);
    _nss_stepssh_endpwent();

    _nss_stepssh_setgrent(0);
    while (lookup(GRENT, NULL, 0, &e, 1, 1) == NSS_STATUS_SUCCESS) {
        print_gr(&e.gr);
        must_hit(GRNAM, e.gr.gr_name, 0, &r);
        if (!same_gr(&e.gr, &r.gr) || r.min_ok != e.min_ok)
            die("getgrnam(%s) differs from getgrent", e.gr.gr_name);
        res_free(&r);
        must_hit(GRGID, NULL, e.gr.gr_gid, &r);
        if (!same_gr(&e.gr, &r.gr) || r.min_ok != e.min_ok)
            die("getgrgid(%u) differs from getgrent", (unsigned)e.gr.gr_gid);
        res_free(&r);
        res_free(&e);
        ngr++;
    }
    if (e.st != NSS_STATUS_NOTFOUND)
        die("group enumeration ended with status %d", e.st);
    res_free(&e);
    _nss_stepssh_endgrent();

    /* Misses are authoritative. */
    for (size_t i = 0; i < n_names; i++) {
        uint32_t found = 0;
        if (lookup(PWNAM, names[i], 0, &r, 4096, 0) == NSS_STATUS_SUCCESS)
            found = 1;
        else if (r.st != NSS_STATUS_NOTFOUND)
            die("getpwnam(%s) on a valid file: status %d", names[i], r.st);
        res_free(&r);
        printf("Q pwnam %s %s\n", names[i], found ? "hit" : "miss");
    }
    for (size_t i = 0; i < n_ids; i++) {
        int a = lookup(PWUID, NULL, ids[i], &r, 4096, 0);
        res_free(&r);
        int b = lookup(GRGID, NULL, ids[i], &r, 4096, 0);
        res_free(&r);
        if ((a != NSS_STATUS_SUCCESS && a != NSS_STATUS_NOTFOUND) ||
            (b != NSS_STATUS_SUCCESS && b != NSS_STATUS_NOTFOUND))
            die("id %u on a valid file: status %d/%d", ids[i], a, b);
        printf("Q id %u %s %s\n", ids[i], a == NSS_STATUS_SUCCESS ? "hit" : "miss",
               b == NSS_STATUS_SUCCESS ? "hit" : "miss");
    }
    direct_reader(path, secure);
    int err;
    struct sc_map *m = sc_open_path(path, secure, &err);
    if (!m || sc_verify_all(m) != 0)
        die("valid file does not verify");
    sc_close(m);
    printf("OK %u users %u groups\n", npw, ngr);
}

/* ---- driver ---- */

static int valid_mode, secure_mode;
static unsigned n_files;

static void one_file(const char *path, int secure) {
    cur_file = path;
    alarm(30); /* a file that blocks the reader (a FIFO) fails the run */
    if (valid_mode)
        valid_file(path, secure);
    else
        hostile_file(path, secure);
    alarm(0);
    n_files++;
    fflush(stdout);
}

int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strncmp(a, "--name=", 7)) {
            if (n_names == MAX_KEYS)
                die("too many --name");
            names[n_names++] = a + 7;
        } else if (!strncmp(a, "--id=", 5)) {
            if (n_ids == MAX_KEYS)
                die("too many --id");
            ids[n_ids++] = (uint32_t)strtoul(a + 5, NULL, 0);
        } else if (!strncmp(a, "--secure=", 9)) {
            secure_mode = atoi(a + 9);
        } else if (!strcmp(a, "--valid")) {
            valid_mode = 1;
        } else if (!strcmp(a, "--hostile")) {
            valid_mode = 0;
        } else if (!strncmp(a, "--list=", 7)) {
            FILE *f = fopen(a + 7, "r");
            if (!f)
                die("cannot open %s", a + 7);
            char line[PATH_MAX + 16];
            while (fgets(line, sizeof line, f)) {
                line[strcspn(line, "\n")] = '\0';
                if (line[0] == '\0')
                    continue;
                if ((line[0] != '0' && line[0] != '1') || line[1] != ' ')
                    die("bad list line: %s", line);
                one_file(line + 2, line[0] == '1');
            }
            fclose(f);
        } else if (!strncmp(a, "--", 2)) {
            die("unknown option %s", a);
        } else {
            one_file(a, secure_mode);
        }
    }
    stepssh_nss_set_path(STEPSSH_CACHE_PATH, 1); /* drop the last mapping */
    fprintf(stderr, "hostile_main: %u files\n", n_files);
    return 0;
}
