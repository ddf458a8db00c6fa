/* step-ssh cache reader.  See cache.h and docs/cache-format.md.
 *
 * Validation is split in two so that a short-lived process (`id`, sshd's
 * children) pays only for what it reads:
 *   - at map time: header fields, section bounds, and one CRC over the header
 *     and the per-block CRC table;
 *   - on access: every byte range handed out is bounds-checked (overflow safe)
 *     and each 4 KiB block it touches is CRC-checked once, remembered in a
 *     bitmap.  A bad block poisons the whole mapping. */
#define _GNU_SOURCE
#include "cache.h"

#include <errno.h>
#include <fcntl.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

struct sc_map {
    const unsigned char *base;
    size_t size;
    struct sc_header h;        /* validated copy */
    const uint32_t *crcs;      /* n_blocks entries, inside the mapping */
    unsigned char *verified;   /* one byte per block: 0 unknown, 1 good */
    int bad;                   /* a block failed its CRC */
    unsigned refs;             /* owned by handle mutex; 1 for the handle's own ref */
    dev_t dev;
    ino_t ino;
    off_t fsize;
    struct timespec mtime;
};

/* ---- hashing, shared with step_ssh/cache/format.py ---- */

static uint32_t fnv1a(const char *s) {
    uint32_t h = 2166136261u;
    for (; *s; s++) {
        h ^= (unsigned char)*s;
        h *= 16777619u;
    }
    return h;
}

static uint32_t mix32(uint32_t h) {
    h ^= h >> 16;
    h *= 0x85ebca6bu;
    h ^= h >> 13;
    h *= 0xc2b2ae35u;
    h ^= h >> 16;
    return h;
}

/* ---- mapping and validation ---- */

static int in_data(const struct sc_header *h, uint64_t off, uint64_t len) {
    return off >= h->header_size && off <= h->crc_off && len <= (uint64_t)h->crc_off - off;
}

static int validate_header(const struct sc_map *m) {
    const struct sc_header *h = &m->h;
    if (memcmp(h->magic, SC_MAGIC, 8) != 0 || h->version != SC_VERSION ||
        h->byte_order != SC_BYTE_ORDER || h->header_size != sizeof(struct sc_header) ||
        h->block_size != SC_BLOCK_SIZE || h->file_size != m->size)
        return -1;
    if (h->crc_off < h->header_size || h->crc_off % 4 != 0)
        return -1;
    uint64_t data = (uint64_t)h->crc_off - h->header_size;
    if (h->n_blocks != (data + SC_BLOCK_SIZE - 1) / SC_BLOCK_SIZE)
        return -1;
    if ((uint64_t)h->crc_off + 4ull * h->n_blocks != m->size)
        return -1;
    /* Sections: aligned and inside the data region.  Index and pool contents
     * are checked again on every access. */
    uint32_t offs[] = {h->strings_off, h->users_off, h->groups_off, h->pool_off,
                       h->uname_idx_off, h->uid_idx_off, h->gname_idx_off, h->gid_idx_off};
    for (size_t i = 0; i < sizeof offs / sizeof offs[0]; i++)
        if (offs[i] % 4 != 0 || !in_data(h, offs[i], 4))
            return -1;
    if (!in_data(h, h->strings_off, h->strings_size) || h->strings_size == 0 ||
        !in_data(h, h->users_off, (uint64_t)h->n_users * sizeof(struct sc_user_rec)) ||
        !in_data(h, h->groups_off, (uint64_t)h->n_groups * sizeof(struct sc_group_rec)) ||
        !in_data(h, h->pool_off, (uint64_t)h->pool_count * 4))
        return -1;
    /* The fixed-size sections must not overlap, and no index may start inside
     * one: otherwise a file whose checksums are right but whose offsets or
     * counts lie would serve records assembled from the wrong bytes (a
     * principal as a group member, a group's gid as a user's).  Empty
     * sections take no room. */
    const uint64_t sec[4][2] = {
        {h->strings_off, h->strings_size},
        {h->users_off, (uint64_t)h->n_users * sizeof(struct sc_user_rec)},
        {h->groups_off, (uint64_t)h->n_groups * sizeof(struct sc_group_rec)},
        {h->pool_off, (uint64_t)h->pool_count * 4},
    };
    for (size_t i = 0; i < 4; i++) {
        if (sec[i][1] == 0)
            continue;
        uint64_t lo = sec[i][0], hi = sec[i][0] + sec[i][1];
        for (size_t j = i + 1; j < 4; j++)
            if (sec[j][1] != 0 && sec[j][0] < hi && lo < sec[j][0] + sec[j][1])
                return -1;
        for (size_t j = 4; j < sizeof offs / sizeof offs[0]; j++)
            if (offs[j] >= lo && offs[j] < hi)
                return -1;
    }
    /* Header CRC covers the header (crc field zeroed) and the block table. */
    struct sc_header tmp = *h;
    tmp.header_crc = 0;
    tmp.superseded = 0;
    uLong crc = crc32(0L, (const Bytef *)&tmp, sizeof tmp);
    crc = crc32(crc, m->base + h->crc_off, 4u * h->n_blocks);
    return (uint32_t)crc == h->header_crc ? 0 : -1;
}

static void unmap(struct sc_map *m) {
    if (!m)
        return;
    munmap((void *)m->base, m->size);
    free(m->verified);
    free(m);
}

struct sc_map *sc_open_path(const char *path, int require_root_owner, int *err) {
    /* O_NONBLOCK: a FIFO at the path must be refused below, not block the
     * caller's getpwnam forever; it changes nothing for regular files. */
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NOCTTY | O_NONBLOCK);
    if (fd < 0) {
        if (err)
            *err = errno;
        return NULL;
    }
    struct stat st;
    struct sc_map *m = NULL;
    int e = EIO;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        goto out;
    }
    if (require_root_owner && (st.st_uid != 0 || (st.st_mode & 022) != 0)) {
        e = EPERM;
        goto out;
    }
    if ((uint64_t)st.st_size < sizeof(struct sc_header) || (uint64_t)st.st_size > UINT32_MAX)
        goto out;
    m = calloc(1, sizeof *m);
    if (!m) {
        e = ENOMEM;
        goto out;
    }
    void *p = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) {
        free(m);
        m = NULL;
        goto out;
    }
    m->base = p;
    m->size = (size_t)st.st_size;
    memcpy(&m->h, m->base, sizeof m->h);
    if (validate_header(m) != 0) {
        munmap(p, m->size);
        free(m);
        m = NULL;
        goto out;
    }
    m->crcs = (const uint32_t *)(m->base + m->h.crc_off);
    m->verified = calloc(m->h.n_blocks ? m->h.n_blocks : 1, 1);
    if (!m->verified) {
        munmap(p, m->size);
        free(m);
        m = NULL;
        e = ENOMEM;
        goto out;
    }
    m->dev = st.st_dev;
    m->ino = st.st_ino;
    m->fsize = st.st_size;
    m->mtime = st.st_mtim;
    m->refs = 1;
    e = 0;
out:
    close(fd);
    if (err)
        *err = e;
    return m;
}

void sc_close(struct sc_map *m) { unmap(m); }

const struct sc_header *sc_header_of(const struct sc_map *m) { return &m->h; }

int sc_is_stale(const struct sc_map *m, time_t now) {
    if (m->h.max_stale == 0)
        return 0;
    /* now - confirmed_at > max_stale, without signed overflow whatever
     * confirmed_at the file holds (it is covered by the CRC, not trusted). */
    int64_t t = (int64_t)now, c = m->h.confirmed_at;
    if (t <= c)
        return 0;
    return (uint64_t)t - (uint64_t)c > (uint64_t)m->h.max_stale;
}

/* Bounds-check [off, off+len) and CRC-check the blocks it covers. */
static const void *span(struct sc_map *m, uint64_t off, uint64_t len) {
    if (__atomic_load_n(&m->bad, __ATOMIC_ACQUIRE) || !in_data(&m->h, off, len))
        return NULL;
    uint64_t rel = off - m->h.header_size;
    uint64_t first = rel / SC_BLOCK_SIZE;
    uint64_t last = len ? (rel + len - 1) / SC_BLOCK_SIZE : first;
    for (uint64_t b = first; b <= last && b < m->h.n_blocks; b++) {
        if (__atomic_load_n(&m->verified[b], __ATOMIC_ACQUIRE))
            continue;
        uint64_t start = m->h.header_size + b * SC_BLOCK_SIZE;
        uint64_t blen = m->h.crc_off - start < SC_BLOCK_SIZE ? m->h.crc_off - start : SC_BLOCK_SIZE;
        uint32_t want;
        memcpy(&want, &m->crcs[b], 4);
        if ((uint32_t)crc32(0L, m->base + start, (uInt)blen) != want) {
            __atomic_store_n(&m->bad, 1, __ATOMIC_RELEASE);
            return NULL;
        }
        /* Racing verifiers compute the same answer; the store is idempotent. */
        __atomic_store_n(&m->verified[b], 1, __ATOMIC_RELEASE);
    }
    return m->base + off;
}

int sc_verify_all(struct sc_map *m) {
    uint64_t len = (uint64_t)m->h.crc_off - m->h.header_size;
    return span(m, m->h.header_size, len) ? 0 : -1;
}

/* A NUL-terminated string at offset `off` of the string section. */
static const char *str_at(struct sc_map *m, uint32_t off, size_t *lenp) {
    if (off >= m->h.strings_size)
        return NULL;
    uint64_t abs = (uint64_t)m->h.strings_off + off;
    size_t max = m->h.strings_size - off;
    /* Verify blocks one at a time while searching so we never read unchecked
     * bytes, and stop at the section end (unterminated strings are corrupt). */
    size_t done = 0;
    while (done < max) {
        uint64_t pos = abs + done;
        uint64_t rel = pos - m->h.header_size;
        size_t chunk = SC_BLOCK_SIZE - (size_t)(rel % SC_BLOCK_SIZE);
        if (chunk > max - done)
            chunk = max - done;
        const char *p = span(m, pos, chunk);
        if (!p)
            return NULL;
        const char *nul = memchr(p, '\0', chunk);
        if (nul) {
            if (lenp)
                *lenp = done + (size_t)(nul - p);
            return (const char *)(m->base + abs);
        }
        done += chunk;
    }
    return NULL;
}

static int get_user(struct sc_map *m, uint32_t idx, struct sc_user_rec *u) {
    if (idx >= m->h.n_users)
        return SC_UNAVAIL;
    const void *p = span(m, (uint64_t)m->h.users_off + (uint64_t)idx * sizeof *u, sizeof *u);
    if (!p)
        return SC_UNAVAIL;
    memcpy(u, p, sizeof *u);
    return SC_OK;
}

static int get_group(struct sc_map *m, uint32_t idx, struct sc_group_rec *g) {
    if (idx >= m->h.n_groups)
        return SC_UNAVAIL;
    const void *p = span(m, (uint64_t)m->h.groups_off + (uint64_t)idx * sizeof *g, sizeof *g);
    if (!p)
        return SC_UNAVAIL;
    memcpy(g, p, sizeof *g);
    return SC_OK;
}

static const uint32_t *pool(struct sc_map *m, uint32_t start, uint32_t count) {
    if (start > m->h.pool_count || count > m->h.pool_count - start)
        return NULL;
    return span(m, (uint64_t)m->h.pool_off + 4ull * start, 4ull * count);
}

int sc_user_record(struct sc_map *m, uint32_t idx, struct sc_user_rec *out) {
    return get_user(m, idx, out);
}

/* ---- hash indexes: u32 nbuckets (power of two), then slots holding idx+1 ---- */

typedef int (*match_fn)(struct sc_map *m, uint32_t idx, const void *key);

static int probe(struct sc_map *m, uint32_t idx_off, uint32_t nrec, uint32_t hash,
                 match_fn match, const void *key, uint32_t *out) {
    const uint32_t *np = span(m, idx_off, 4);
    if (!np)
        return SC_UNAVAIL;
    uint32_t nb = *np;
    if (nb == 0 || (nb & (nb - 1)) != 0)
        return SC_UNAVAIL;
    /* Check slots one at a time: a lookup verifies only the blocks it reads. */
    if (!in_data(&m->h, (uint64_t)idx_off + 4, 4ull * nb))
        return SC_UNAVAIL;
    /* With at most nrec occupied slots, a real probe sequence meets an empty
     * slot within nrec + 1 steps; a longer one means a forged, full table. */
    for (uint32_t i = 0; i < nb; i++) {
        if (i > nrec)
            return SC_UNAVAIL;
        const uint32_t *sp = span(m, (uint64_t)idx_off + 4 + 4ull * ((hash + i) & (nb - 1)), 4);
        if (!sp)
            return SC_UNAVAIL;
        uint32_t s = *sp;
        if (s == 0)
            return SC_NOTFOUND;
        if (s > nrec)
            return SC_UNAVAIL;
        int r = match(m, s - 1, key);
        if (r == SC_OK) {
            *out = s - 1;
            return SC_OK;
        }
        if (r == SC_UNAVAIL)
            return SC_UNAVAIL;
    }
    return SC_NOTFOUND;
}

static int match_uname(struct sc_map *m, uint32_t idx, const void *key) {
    struct sc_user_rec u;
    if (get_user(m, idx, &u) != SC_OK)
        return SC_UNAVAIL;
    const char *n = str_at(m, u.name, NULL);
    if (!n)
        return SC_UNAVAIL;
    return strcmp(n, key) == 0 ? SC_OK : SC_NOTFOUND;
}

static int match_uid(struct sc_map *m, uint32_t idx, const void *key) {
    struct sc_user_rec u;
    if (get_user(m, idx, &u) != SC_OK)
        return SC_UNAVAIL;
    return u.uid == *(const uint32_t *)key ? SC_OK : SC_NOTFOUND;
}

static int match_gname(struct sc_map *m, uint32_t idx, const void *key) {
    struct sc_group_rec g;
    if (get_group(m, idx, &g) != SC_OK)
        return SC_UNAVAIL;
    const char *n = str_at(m, g.name, NULL);
    if (!n)
        return SC_UNAVAIL;
    return strcmp(n, key) == 0 ? SC_OK : SC_NOTFOUND;
}

static int match_gid(struct sc_map *m, uint32_t idx, const void *key) {
    struct sc_group_rec g;
    if (get_group(m, idx, &g) != SC_OK)
        return SC_UNAVAIL;
    return g.gid == *(const uint32_t *)key ? SC_OK : SC_NOTFOUND;
}

int sc_user_by_name(struct sc_map *m, const char *name, uint32_t *idx) {
    return probe(m, m->h.uname_idx_off, m->h.n_users, fnv1a(name), match_uname, name, idx);
}

int sc_user_by_uid(struct sc_map *m, uint32_t uid, uint32_t *idx) {
    return probe(m, m->h.uid_idx_off, m->h.n_users, mix32(uid), match_uid, &uid, idx);
}

int sc_group_by_name(struct sc_map *m, const char *name, uint32_t *idx) {
    return probe(m, m->h.gname_idx_off, m->h.n_groups, fnv1a(name), match_gname, name, idx);
}

int sc_group_by_gid(struct sc_map *m, uint32_t gid, uint32_t *idx) {
    return probe(m, m->h.gid_idx_off, m->h.n_groups, mix32(gid), match_gid, &gid, idx);
}

/* ---- copying into the caller's buffer ---- */

struct bufw {
    char *p;
    size_t left;
};

static char *put_str(struct bufw *b, const char *s, size_t n) {
    if (b->left < n + 1)
        return NULL;
    char *d = b->p;
    memcpy(d, s, n);
    d[n] = '\0';
    b->p += n + 1;
    b->left -= n + 1;
    return d;
}

static void *put_aligned(struct bufw *b, size_t align, size_t n) {
    size_t pad = (align - ((uintptr_t)b->p % align)) % align;
    if (b->left < pad || b->left - pad < n)
        return NULL;
    void *d = b->p + pad;
    b->p += pad + n;
    b->left -= pad + n;
    return d;
}

/* Fast path for the member loop of sc_fill_group (a group of 500 members
 * copies 500 names): a string that starts in an already-verified block, is
 * non-empty and ends (NUL) inside that block and inside the caller's buffer is
 * copied in one pass instead of memchr + memcpy through span().  Anything
 * else (unverified block, empty, crossing a block, buffer too small, mapping
 * marked bad) returns NULL and the caller takes the exact path (str_at +
 * put_str), so results never differ. */
static char *put_verified_str(struct sc_map *m, uint32_t off, struct bufw *b) {
    if (off >= m->h.strings_size || __atomic_load_n(&m->bad, __ATOMIC_ACQUIRE))
        return NULL;
    uint64_t abs = (uint64_t)m->h.strings_off + off;
    uint64_t rel = abs - m->h.header_size; /* strings section is in the data region */
    if (!__atomic_load_n(&m->verified[rel / SC_BLOCK_SIZE], __ATOMIC_ACQUIRE))
        return NULL;
    size_t lim = SC_BLOCK_SIZE - (size_t)(rel % SC_BLOCK_SIZE);
    if (lim > m->h.strings_size - off)
        lim = m->h.strings_size - off;
    if (lim > b->left)
        lim = b->left;
    const char *s = (const char *)m->base + abs;
    char *d = b->p;
    for (size_t i = 0; i < lim; i++) {
        if ((d[i] = s[i]) == '\0') {
            if (i == 0)
                return NULL;
            b->p += i + 1;
            b->left -= i + 1;
            return d;
        }
    }
    return NULL;
}

/* Records with id 0 are never served, whatever the file says. */
int sc_fill_passwd(struct sc_map *m, uint32_t idx, struct passwd *pw, char *buf, size_t len) {
    struct sc_user_rec u;
    if (get_user(m, idx, &u) != SC_OK || u.uid == 0 || u.gid == 0)
        return SC_UNAVAIL;
    size_t ln, lg, lh, ls;
    const char *name = str_at(m, u.name, &ln), *gecos = str_at(m, u.gecos, &lg);
    const char *home = str_at(m, u.home, &lh), *shell = str_at(m, u.shell, &ls);
    if (!name || !gecos || !home || !shell || ln == 0)
        return SC_UNAVAIL;
    struct bufw b = {buf, len};
    char *dn = put_str(&b, name, ln), *dp = put_str(&b, "x", 1);
    char *dg = put_str(&b, gecos, lg), *dh = put_str(&b, home, lh), *ds = put_str(&b, shell, ls);
    if (!dn || !dp || !dg || !dh || !ds)
        return SC_ERANGE;
    pw->pw_name = dn;
    pw->pw_passwd = dp;
    pw->pw_uid = u.uid;
    pw->pw_gid = u.gid;
    pw->pw_gecos = dg;
    pw->pw_dir = dh;
    pw->pw_shell = ds;
    return SC_OK;
}

int sc_fill_group(struct sc_map *m, uint32_t idx, struct group *gr, char *buf, size_t len) {
    struct sc_group_rec g;
    if (get_group(m, idx, &g) != SC_OK || g.gid == 0)
        return SC_UNAVAIL;
    const uint32_t *mem = pool(m, g.mem_start, g.mem_count);
    size_t ln;
    const char *name = str_at(m, g.name, &ln);
    if (!mem || !name || ln == 0)
        return SC_UNAVAIL;
    struct bufw b = {buf, len};
    /* Member pointer array first so it is naturally aligned. */
    char **mv = put_aligned(&b, sizeof(char *), ((size_t)g.mem_count + 1) * sizeof(char *));
    if (!mv)
        return SC_ERANGE;
    for (uint32_t i = 0; i < g.mem_count; i++) {
        if ((mv[i] = put_verified_str(m, mem[i], &b)))
            continue;
        size_t l;
        const char *s = str_at(m, mem[i], &l);
        if (!s || l == 0)
            return SC_UNAVAIL;
        if (!(mv[i] = put_str(&b, s, l)))
            return SC_ERANGE;
    }
    mv[g.mem_count] = NULL;
    char *dn = put_str(&b, name, ln), *dp = put_str(&b, "x", 1);
    if (!dn || !dp)
        return SC_ERANGE;
    gr->gr_name = dn;
    gr->gr_passwd = dp;
    gr->gr_gid = g.gid;
    gr->gr_mem = mv;
    return SC_OK;
}

int sc_user_gids(struct sc_map *m, uint32_t idx, const uint32_t **gids, uint32_t *n) {
    struct sc_user_rec u;
    if (get_user(m, idx, &u) != SC_OK)
        return SC_UNAVAIL;
    const uint32_t *p = pool(m, u.gids_start, u.gids_count);
    if (!p)
        return SC_UNAVAIL;
    *gids = p;
    *n = u.gids_count;
    return SC_OK;
}

int sc_user_principal(struct sc_map *m, uint32_t idx, uint32_t i, const char **out) {
    struct sc_user_rec u;
    if (get_user(m, idx, &u) != SC_OK)
        return SC_UNAVAIL;
    if (i >= u.princ_count)
        return SC_NOTFOUND;
    const uint32_t *p = pool(m, u.princ_start, u.princ_count);
    if (!p)
        return SC_UNAVAIL;
    const char *s = str_at(m, p[i], NULL);
    if (!s)
        return SC_UNAVAIL;
    *out = s;
    return SC_OK;
}

/* ---- handle: keep one mapping, swap when the file is replaced ---- */

static int same_file(const struct sc_map *m, const struct stat *st) {
    return m->dev == st->st_dev && m->ino == st->st_ino && m->fsize == st->st_size &&
           m->mtime.tv_sec == st->st_mtim.tv_sec && m->mtime.tv_nsec == st->st_mtim.tv_nsec;
}

static void drop_locked(struct sc_map *m) {
    if (m && --m->refs == 0)
        unmap(m);
}

static int64_t mono_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC_COARSE, &t);
    return (int64_t)t.tv_sec * 1000000000LL + t.tv_nsec;
}

static int superseded(const struct sc_map *m) {
    const uint32_t *flag = (const uint32_t *)(m->base + offsetof(struct sc_header, superseded));
    return __atomic_load_n(flag, __ATOMIC_ACQUIRE) != 0;
}

struct sc_map *sc_acquire(struct sc_handle *h) {
    int64_t now = mono_ns();
    /* Fast path: the mapping is current unless the writer flagged it or the
     * recheck interval passed.  No system call at all. */
    pthread_mutex_lock(&h->mu);
    struct sc_map *m = h->cur;
    int64_t last = (int64_t)h->checked.tv_sec * 1000000000LL + h->checked.tv_nsec;
    if (m && !superseded(m) && now - last < SC_RECHECK_NS && now >= last) {
        m->refs++;
        pthread_mutex_unlock(&h->mu);
        return m;
    }
    pthread_mutex_unlock(&h->mu);

    struct stat st;
    int have = stat(h->path, &st) == 0;
    pthread_mutex_lock(&h->mu);
    if (h->cur && (!have || !same_file(h->cur, &st))) {
        drop_locked(h->cur);
        h->cur = NULL;
    }
    if (!h->cur && have) {
        /* Mapped with the lock held: a replacement is rare and this keeps the
         * swap trivially correct. */
        h->cur = sc_open_path(h->path, h->require_root_owner, NULL);
    }
    m = h->cur;
    if (m) {
        m->refs++;
        h->checked.tv_sec = now / 1000000000LL;
        h->checked.tv_nsec = now % 1000000000LL;
    }
    pthread_mutex_unlock(&h->mu);
    return m;
}

void sc_release(struct sc_handle *h, struct sc_map *m) {
    if (!m)
        return;
    pthread_mutex_lock(&h->mu);
    drop_locked(m);
    pthread_mutex_unlock(&h->mu);
}

void sc_reset(struct sc_handle *h) {
    pthread_mutex_lock(&h->mu);
    drop_locked(h->cur);
    h->cur = NULL;
    pthread_mutex_unlock(&h->mu);
}

/* ---- the host's own accounts (not the cache): a plain scan, no NSS ---- */

int sc_passwd_file_has(const char *path, const char *name) {
    size_t n = strlen(name);
    if (n == 0)
        return 1;
    FILE *f = fopen(path, "re");
    if (!f)
        return -1;
    char *line = NULL;
    size_t cap = 0;
    int found = 0;
    while (getline(&line, &cap, f) >= 0) {
        if (strncmp(line, name, n) == 0 && line[n] == ':') {
            found = 1;
            break;
        }
    }
    int err = ferror(f);
    free(line);
    fclose(f);
    return found ? 1 : err ? -1 : 0;
}
