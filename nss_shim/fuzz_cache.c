/* libFuzzer target for the cache reader and the NSS entry points.
 *
 *   clang -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all \
 *         -DSTEPSSH_PATH_OVERRIDE -Dmmap=sc_test_mmap -Dmunmap=sc_test_munmap \
 *         [-DFUZZ_FIX_CRC] -Inss_shim nss_shim/fuzz_cache.c nss_shim/test_harness.c nss_shim/cache.c \
 *         nss_shim/nss.c -lz -o fuzz_cache
 *   ./fuzz_cache -max_total_time=60 CORPUS_DIR SEED_DIR
 *
 * Each input is written to a temporary file and read the two ways the
 * project reads caches: sc_open_path (require_root_owner=0) plus the reader
 * API, and the NSS entry points through the path override.  Every answer is
 * checked to be well formed (strings inside the caller's buffer, the key that
 * was asked for, no id 0); a violation traps.
 *
 * A mutated file almost never passes its CRCs, so with -DFUZZ_FIX_CRC the
 * target first re-seals the input: it sets file_size to the input's size and
 * recomputes the block CRCs and the header CRC over whatever geometry the
 * (mutated) header states, so the fuzzer reaches the bounds checks behind
 * the checksums.
 *
 * With -Dmmap=sc_test_mmap -Dmunmap=sc_test_munmap the reader's mapping is an
 * exact-size heap copy (nss_shim/test_harness.c), so ASan reports a read even
 * one byte past the end of the file; crc32 is defined there for the same reason
 * (libz is not instrumented). */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <nss.h>
#include <pwd.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>
#include <zlib.h>

#include "cache.h"
#include "test_harness.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define FAIL(...)                                                                                  \
    do {                                                                                           \
        fprintf(stderr, "fuzz_cache: " __VA_ARGS__);                                               \
        fputc('\n', stderr);                                                                       \
        __builtin_trap();                                                                          \
    } while (0)

/* ---- FUZZ_FIX_CRC: make the checksums agree with whatever the input says ---- */

#ifdef FUZZ_FIX_CRC
static void reseal(uint8_t *b, size_t n) {
    struct sc_header h;
    if (n < sizeof h)
        return;
    memcpy(&h, b, sizeof h);
    h.file_size = n;
    uint64_t co = h.crc_off, nb = h.n_blocks, hs = h.header_size;
    int table_ok = hs <= co && co + 4 * nb <= n;
    if (table_ok) {
        for (uint64_t i = 0; i < nb; i++) {
            uint64_t start = hs + i * SC_BLOCK_SIZE;
            if (start >= co)
                break;
            uint64_t len = co - start < SC_BLOCK_SIZE ? co - start : SC_BLOCK_SIZE;
            uint32_t c = (uint32_t)crc32(0, b + start, (uInt)len);
            memcpy(b + co + 4 * i, &c, 4);
        }
    }
    h.header_crc = 0;
    uint32_t sup = h.superseded;
    h.superseded = 0;
    uint32_t c = (uint32_t)crc32(0, (const Bytef *)&h, sizeof h);
    h.superseded = sup;
    if (table_ok)
        c = (uint32_t)crc32(c, b + co, (uInt)(4 * nb));
    h.header_crc = c;
    memcpy(b, &h, sizeof h);
}
#endif

/* ---- answer checks ---- */

static void check_str(const char *s, const char *buf, size_t len, const char *what) {
    if (!s || s < buf || s >= buf + len || !memchr(s, '\0', (size_t)(buf + len - s)))
        FAIL("%s not a string inside the caller's buffer", what);
}

static void check_pw(const struct passwd *p, const char *buf, size_t len) {
    check_str(p->pw_name, buf, len, "pw_name");
    check_str(p->pw_passwd, buf, len, "pw_passwd");
    check_str(p->pw_gecos, buf, len, "pw_gecos");
    check_str(p->pw_dir, buf, len, "pw_dir");
    check_str(p->pw_shell, buf, len, "pw_shell");
    if (p->pw_uid == 0 || p->pw_gid == 0 || !p->pw_name[0])
        FAIL("served passwd entry with id 0 or no name");
}

static void check_gr(const struct group *g, const char *buf, size_t len) {
    check_str(g->gr_name, buf, len, "gr_name");
    check_str(g->gr_passwd, buf, len, "gr_passwd");
    char **mv = g->gr_mem;
    if ((char *)mv < buf || (char *)mv >= buf + len || (uintptr_t)mv % sizeof(char *))
        FAIL("gr_mem outside the buffer or misaligned");
    for (size_t i = 0;; i++) {
        if ((char *)(mv + i + 1) > buf + len)
            FAIL("gr_mem not terminated inside the buffer");
        if (!mv[i])
            break;
        check_str(mv[i], buf, len, "gr_mem[i]");
    }
    if (g->gr_gid == 0 || !g->gr_name[0])
        FAIL("served group with gid 0 or no name");
}

static const char *const names[] = {"alice", "bob", "carol", "devs", "step-sudo", "user000", "", "root"};
static const uint32_t ids[] = {1001, 1002, 2000, 10000, 20000, 69999, 0, 0xFFFFFFFFu};
#define N(a) (sizeof(a) / sizeof((a)[0]))

/* ---- the reader API ---- */

static void direct(struct sc_map *m) {
    const struct sc_header *h = sc_header_of(m);
    (void)sc_is_stale(m, time(NULL));
    (void)sc_is_stale(m, 0);
    char buf[512];
    uint32_t nu = h->n_users < 32 ? h->n_users : 32;
    for (uint32_t k = 0; k <= nu; k++) {
        uint32_t idx = k < nu ? k : h->n_users - 1; /* and the last one */
        struct sc_user_rec u;
        if (sc_user_record(m, idx, &u) != SC_OK)
            continue;
        const uint32_t *gids;
        uint32_t n;
        volatile uint32_t sink = 0;
        if (sc_user_gids(m, idx, &gids, &n) == SC_OK)
            for (uint32_t i = 0; i < n && i < 4096; i++)
                sink += gids[i];
        for (uint32_t i = 0; i < 16; i++) {
            const char *s;
            if (sc_user_principal(m, idx, i, &s) != SC_OK)
                break;
            sink += (uint32_t)strlen(s);
        }
        (void)sink;
        struct passwd pw;
        if (sc_fill_passwd(m, idx, &pw, buf, sizeof buf) != SC_OK)
            continue;
        check_pw(&pw, buf, sizeof buf);
        /* The indexes may only lead to a record with the key asked for. */
        uint32_t j;
        char buf2[512];
        struct passwd pw2;
        if (sc_user_by_name(m, pw.pw_name, &j) == SC_OK &&
            sc_fill_passwd(m, j, &pw2, buf2, sizeof buf2) == SC_OK && strcmp(pw2.pw_name, pw.pw_name))
            FAIL("sc_user_by_name(%s) led to %s", pw.pw_name, pw2.pw_name);
        if (sc_user_by_uid(m, pw.pw_uid, &j) == SC_OK &&
            sc_fill_passwd(m, j, &pw2, buf2, sizeof buf2) == SC_OK && pw2.pw_uid != pw.pw_uid)
            FAIL("sc_user_by_uid(%u) led to uid %u", (unsigned)pw.pw_uid, (unsigned)pw2.pw_uid);
        (void)sc_fill_passwd(m, idx, &pw, buf, 9); /* ERANGE path */
    }
    uint32_t ng = h->n_groups < 32 ? h->n_groups : 32;
    for (uint32_t idx = 0; idx < ng; idx++) {
        static char gbuf[8192];
        struct group gr;
        if (sc_fill_group(m, idx, &gr, gbuf + 1, sizeof gbuf - 1) == SC_OK) /* misaligned buffer */
            check_gr(&gr, gbuf + 1, sizeof gbuf - 1);
        (void)sc_fill_group(m, idx, &gr, gbuf, 40);
    }
    for (size_t i = 0; i < N(names); i++) {
        uint32_t j;
        (void)sc_user_by_name(m, names[i], &j);
        (void)sc_group_by_name(m, names[i], &j);
    }
    for (size_t i = 0; i < N(ids); i++) {
        uint32_t j;
        (void)sc_user_by_uid(m, ids[i], &j);
        (void)sc_group_by_gid(m, ids[i], &j);
    }
    (void)sc_verify_all(m);
}

/* ---- the NSS entry points ---- */

static void try_initgroups(const char *user, gid_t primary) {
    long start = 0, size = 1;
    gid_t *g = malloc(sizeof *g);
    int e;
    if (_nss_stepssh_initgroups_dyn(user, primary, &start, &size, &g, 64, &e) == NSS_STATUS_SUCCESS)
        for (long i = 0; i < start; i++)
            if (g[i] == 0 || g[i] == primary)
                FAIL("initgroups(%s) added gid %u", user, (unsigned)g[i]);
    free(g);
}

static void nss(void) {
    int e;
    for (size_t i = 0; i < N(names); i++) {
        size_t len = 8;
        for (;;) {
            char *buf = malloc(len);
            struct passwd pw;
            enum nss_status st = _nss_stepssh_getpwnam_r(names[i], &pw, buf, len, &e);
            if (st == NSS_STATUS_SUCCESS) {
                check_pw(&pw, buf, len);
                if (strcmp(pw.pw_name, names[i]))
                    FAIL("getpwnam(%s) answered %s", names[i], pw.pw_name);
            }
            free(buf);
            if (st != NSS_STATUS_TRYAGAIN || len >= (1u << 20))
                break;
            len *= 2;
        }
        char *buf = malloc(4096);
        struct group gr;
        if (_nss_stepssh_getgrnam_r(names[i], &gr, buf, 4096, &e) == NSS_STATUS_SUCCESS) {
            check_gr(&gr, buf, 4096);
            if (strcmp(gr.gr_name, names[i]))
                FAIL("getgrnam(%s) answered %s", names[i], gr.gr_name);
        }
        free(buf);
        try_initgroups(names[i], 4242);
    }
    for (size_t i = 0; i < N(ids); i++) {
        char *buf = malloc(1024);
        struct passwd pw;
        struct group gr;
        if (_nss_stepssh_getpwuid_r(ids[i], &pw, buf, 1024, &e) == NSS_STATUS_SUCCESS) {
            check_pw(&pw, buf, 1024);
            if (pw.pw_uid != ids[i])
                FAIL("getpwuid(%u) answered uid %u", ids[i], (unsigned)pw.pw_uid);
        }
        if (_nss_stepssh_getgrgid_r(ids[i], &gr, buf, 1024, &e) == NSS_STATUS_SUCCESS) {
            check_gr(&gr, buf, 1024);
            if (gr.gr_gid != ids[i])
                FAIL("getgrgid(%u) answered gid %u", ids[i], (unsigned)gr.gr_gid);
        }
        free(buf);
    }
    _nss_stepssh_setpwent(0);
    for (int n = 0; n < 64; n++) {
        size_t len = 16;
        enum nss_status st;
        char *buf;
        struct passwd pw;
        for (;;) {
            buf = malloc(len);
            st = _nss_stepssh_getpwent_r(&pw, buf, len, &e);
            if (st != NSS_STATUS_TRYAGAIN || len >= (1u << 20))
                break;
            free(buf);
            len *= 2;
        }
        if (st == NSS_STATUS_SUCCESS) {
            check_pw(&pw, buf, len);
            try_initgroups(pw.pw_name, pw.pw_gid);
        }
        free(buf);
        if (st != NSS_STATUS_SUCCESS)
            break;
    }
    _nss_stepssh_endpwent();
    _nss_stepssh_setgrent(0);
    for (int n = 0; n < 64; n++) {
        char *buf = malloc(2048);
        struct group gr;
        enum nss_status st = _nss_stepssh_getgrent_r(&gr, buf, 2048, &e);
        if (st == NSS_STATUS_SUCCESS)
            check_gr(&gr, buf, 2048);
        free(buf);
        if (st != NSS_STATUS_SUCCESS && st != NSS_STATUS_TRYAGAIN)
            break;
        if (st == NSS_STATUS_TRYAGAIN)
            break; /* a huge group: skip the rest of the listing */
    }
    _nss_stepssh_endgrent();
}

/* ---- driver ---- */

static char path[4096];

static void cleanup(void) {
    if (path[0])
        unlink(path);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (!path[0]) {
        /* tmpfs when there is one: rewriting a file thousands of times a
         * second on ext4 pays for its flush-on-truncate heuristics. */
        const char *dir = getenv("STEPSSH_FUZZ_DIR");
        if (!dir || !*dir)
            dir = access("/dev/shm", W_OK) == 0 ? "/dev/shm" : getenv("TMPDIR");
        snprintf(path, sizeof path, "%s/stepssh-fuzz-XXXXXX", dir && *dir ? dir : "/tmp");
        int fd = mkstemp(path);
        if (fd < 0)
            FAIL("mkstemp %s: %s", path, strerror(errno));
        close(fd);
        atexit(cleanup);
    }
    const uint8_t *in = data;
#ifdef FUZZ_FIX_CRC
    uint8_t *fixed = malloc(size ? size : 1);
    memcpy(fixed, data, size);
    reseal(fixed, size);
    in = fixed;
#endif
    /* Rewritten in place: no mapping of it is alive at this point. */
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0)
        FAIL("open %s: %s", path, strerror(errno));
    for (size_t done = 0; done < size;) {
        ssize_t n = pwrite(fd, in + done, size - done, (off_t)done);
        if (n <= 0)
            FAIL("write: %s", strerror(errno));
        done += (size_t)n;
    }
    if (ftruncate(fd, (off_t)size) != 0)
        FAIL("ftruncate: %s", strerror(errno));
    close(fd);
#ifdef FUZZ_FIX_CRC
    free(fixed);
#endif

    int err;
    struct sc_map *m = sc_open_path(path, 0, &err);
    if (m) {
        direct(m);
        sc_close(m);
    }
    stepssh_nss_set_path(path, 0); /* also forgets the previous input's mapping */
    nss();
    stepssh_nss_set_path(path, 0);
    return 0;
}
