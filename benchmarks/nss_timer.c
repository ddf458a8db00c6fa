/* In-process timing loop for benchmarks/nss_bench.py.
 *
 * Compiled at bench time (gcc -O2) into a temp dir and run inside a test host,
 * so the lookups go through the real glibc NSS machinery with whatever
 * /etc/nsswitch.conf the test host has.
 *
 *   nss_timer OP KEYS MAX_CALLS WARMUP BUDGET_MS [MODULE]
 *
 * OP (through glibc):  getpwnam getpwuid getgrgid getgrouplist
 * OP (module direct):  d_getpwnam d_getpwuid d_getgrgid d_initgroups
 *     -- dlopen(MODULE) and call _nss_stepssh_* directly, bypassing glibc's
 *        dispatch and the `files` lookup in front of it (for attribution).
 * OP stat: stat() of the path in KEYS (the module's per-call freshness check).
 * KEYS: one key per line (a name or a number; getgrouplist/d_initgroups take
 *       "NAME GID").  Keys are used in file order, cycling.
 * WARMUP calls are made first (untimed), then up to MAX_CALLS timed calls or
 * until BUDGET_MS of wall time is spent, whichever comes first (at least 3).
 * Each call is timed on its own with clock_gettime(CLOCK_MONOTONIC).
 *
 * Output, one line:  calls=N median_ns=X p99_ns=Y mean_ns=Z min_ns=W groups=G clock_ns=C
 * Exits 2 if any lookup did not find its key (a benchmark of misses is not
 * what we want to report). */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <grp.h>
#include <nss.h>
#include <pwd.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#define BUFSZ (1u << 20)
#define MAXGROUPS 4096 /* getgrouplist mallocs this many gid_t: stay below mmap threshold */

static char buf[BUFSZ];

struct key {
    char *name;
    long num;
};

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

typedef enum nss_status (*pwnam_fn)(const char *, struct passwd *, char *, size_t, int *);
typedef enum nss_status (*pwuid_fn)(uid_t, struct passwd *, char *, size_t, int *);
typedef enum nss_status (*grgid_fn)(gid_t, struct group *, char *, size_t, int *);
typedef enum nss_status (*initgroups_fn)(const char *, gid_t, long *, long *, gid_t **, long, int *);

static pwnam_fn d_pwnam;
static pwuid_fn d_pwuid;
static grgid_fn d_grgid;
static initgroups_fn d_initgroups;
static gid_t *dyn_groups;
static long dyn_size;

enum op { GETPWNAM, GETPWUID, GETGRGID, GETGROUPLIST, D_PWNAM, D_PWUID, D_GRGID, D_INITGROUPS, STAT };

/* One lookup; returns the number of groups for the group-list ops, 1 for a
 * hit, 0 for a miss or error. */
static int call(enum op op, const struct key *k) {
    struct passwd pw, *pwp = NULL;
    struct group gr, *grp = NULL;
    int err = 0;
    switch (op) {
    case GETPWNAM:
        return getpwnam_r(k->name, &pw, buf, BUFSZ, &pwp) == 0 && pwp;
    case GETPWUID:
        return getpwuid_r((uid_t)k->num, &pw, buf, BUFSZ, &pwp) == 0 && pwp;
    case GETGRGID:
        return getgrgid_r((gid_t)k->num, &gr, buf, BUFSZ, &grp) == 0 && grp;
    case GETGROUPLIST: {
        static gid_t groups[MAXGROUPS];
        int n = MAXGROUPS;
        int r = getgrouplist(k->name, (gid_t)k->num, groups, &n);
        return r < 0 ? 0 : n;
    }
    case D_PWNAM:
        return d_pwnam(k->name, &pw, buf, BUFSZ, &err) == NSS_STATUS_SUCCESS;
    case D_PWUID:
        return d_pwuid((uid_t)k->num, &pw, buf, BUFSZ, &err) == NSS_STATUS_SUCCESS;
    case D_GRGID:
        return d_grgid((gid_t)k->num, &gr, buf, BUFSZ, &err) == NSS_STATUS_SUCCESS;
    case D_INITGROUPS: {
        /* As glibc does: the primary gid is already in slot 0. */
        long start = 1;
        dyn_groups[0] = (gid_t)k->num;
        if (d_initgroups(k->name, (gid_t)k->num, &start, &dyn_size, &dyn_groups, -1, &err) !=
            NSS_STATUS_SUCCESS)
            return 0;
        return (int)start;
    }
    case STAT: {
        struct stat st;
        return stat(k->name, &st) == 0;
    }
    }
    return 0;
}

static void *sym(void *h, const char *name) {
    void *p = dlsym(h, name);
    if (!p) {
        fprintf(stderr, "nss_timer: %s: %s\n", name, dlerror());
        exit(1);
    }
    return p;
}

int main(int argc, char **argv) {
    if (argc < 6) {
        fprintf(stderr, "usage: nss_timer OP KEYS MAX_CALLS WARMUP BUDGET_MS [MODULE]\n");
        return 1;
    }
    static const char *names[] = {"getpwnam",   "getpwuid",   "getgrgid",   "getgrouplist",
                                  "d_getpwnam", "d_getpwuid", "d_getgrgid", "d_initgroups",
                                  "stat"};
    int op = -1;
    for (int i = 0; i < 9; i++)
        if (strcmp(argv[1], names[i]) == 0)
            op = i;
    if (op < 0) {
        fprintf(stderr, "nss_timer: unknown op %s\n", argv[1]);
        return 1;
    }
    long max_calls = atol(argv[3]), warmup = atol(argv[4]);
    uint64_t budget = (uint64_t)atol(argv[5]) * 1000000ull;
    if (max_calls < 3)
        max_calls = 3;

    if (op >= D_PWNAM && op <= D_INITGROUPS) {
        if (argc < 7) {
            fprintf(stderr, "nss_timer: %s needs MODULE\n", argv[1]);
            return 1;
        }
        void *h = dlopen(argv[6], RTLD_NOW | RTLD_LOCAL);
        if (!h) {
            fprintf(stderr, "nss_timer: %s\n", dlerror());
            return 1;
        }
        d_pwnam = (pwnam_fn)sym(h, "_nss_stepssh_getpwnam_r");
        d_pwuid = (pwuid_fn)sym(h, "_nss_stepssh_getpwuid_r");
        d_grgid = (grgid_fn)sym(h, "_nss_stepssh_getgrgid_r");
        d_initgroups = (initgroups_fn)sym(h, "_nss_stepssh_initgroups_dyn");
        dyn_size = 16;
        dyn_groups = malloc((size_t)dyn_size * sizeof(gid_t));
    }

    FILE *f = fopen(argv[2], "r");
    if (!f) {
        perror(argv[2]);
        return 1;
    }
    size_t nkeys = 0, cap = 1024;
    struct key *keys = malloc(cap * sizeof *keys);
    char line[512];
    while (fgets(line, sizeof line, f)) {
        line[strcspn(line, "\n")] = '\0';
        if (!line[0])
            continue;
        if (nkeys == cap)
            keys = realloc(keys, (cap *= 2) * sizeof *keys);
        char *sp = strchr(line, ' ');
        if (sp) {
            *sp = '\0';
            keys[nkeys].num = atol(sp + 1);
        } else {
            keys[nkeys].num = atol(line);
        }
        keys[nkeys].name = strdup(line);
        nkeys++;
    }
    fclose(f);
    if (!nkeys) {
        fprintf(stderr, "nss_timer: no keys\n");
        return 1;
    }

    /* Clock overhead, for the reader: back-to-back clock_gettime. */
    uint64_t c0 = now_ns();
    for (int i = 0; i < 1000; i++)
        now_ns();
    uint64_t clock_ns = (now_ns() - c0) / 1001;

    uint64_t start = now_ns();
    int groups = 0;
    for (long i = 0; i < warmup; i++) {
        if (!call(op, &keys[(size_t)i % nkeys])) {
            fprintf(stderr, "nss_timer: %s %s: not found\n", argv[1], keys[(size_t)i % nkeys].name);
            return 2;
        }
        if (now_ns() - start > budget / 4)
            break;
    }

    uint64_t *t = malloc((size_t)max_calls * sizeof *t);
    long n = 0;
    start = now_ns();
    while (n < max_calls) {
        const struct key *k = &keys[(size_t)n % nkeys];
        uint64_t a = now_ns();
        int r = call(op, k);
        uint64_t b = now_ns();
        if (!r) {
            fprintf(stderr, "nss_timer: %s %s: not found\n", argv[1], k->name);
            return 2;
        }
        groups = r;
        t[n++] = b - a;
        if (n >= 3 && b - start > budget)
            break;
    }
    uint64_t sum = 0;
    for (long i = 0; i < n; i++)
        sum += t[i];
    qsort(t, (size_t)n, sizeof *t, cmp_u64);
    long p99 = (long)(0.99 * (double)(n - 1) + 0.5);
    printf("calls=%ld median_ns=%llu p99_ns=%llu mean_ns=%llu min_ns=%llu groups=%d clock_ns=%llu\n",
           n, (unsigned long long)(n % 2 ? t[n / 2] : (t[n / 2 - 1] + t[n / 2]) / 2),
           (unsigned long long)t[p99], (unsigned long long)(sum / (uint64_t)n),
           (unsigned long long)t[0], op == GETGROUPLIST || op == D_INITGROUPS ? groups : 0,
           (unsigned long long)clock_ns);
    return 0;
}
