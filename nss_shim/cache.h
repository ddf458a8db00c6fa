/* step-ssh cache reader: the one piece of C that NSS, PAM and the principals
 * helper share.  Format: docs/cache-format.md.  Every offset read from the file
 * is bounds-checked and every byte handed out has passed its block CRC, so a
 * hostile or torn file yields SC_UNAVAIL, never a crash or garbage. */
#ifndef STEPSSH_CACHE_H
#define STEPSSH_CACHE_H

#include <grp.h>
#include <pthread.h>
#include <pwd.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <time.h>

#define SC_MAGIC "STEPSSHC"
#define SC_VERSION 1u
#define SC_BYTE_ORDER 0x01020304u
#define SC_BLOCK_SIZE 4096u

#ifndef STEPSSH_CACHE_PATH
#define STEPSSH_CACHE_PATH "/var/lib/step-ssh/cache"
#endif

/* Results shared by all lookups. */
enum sc_result { SC_OK = 0, SC_NOTFOUND = 1, SC_UNAVAIL = 2, SC_ERANGE = 3 };

/* Access levels stored per user. */
enum sc_access { SC_ACCESS_NONE = 0, SC_ACCESS_SSH = 1, SC_ACCESS_SUDO = 2, SC_ACCESS_JUMP = 3 };

#define SC_FLAG_BASTION 1u

/* On-disk header, 128 bytes, host byte order (checked by byte_order). */
struct sc_header {
    char magic[8];
    uint32_t version;
    uint32_t byte_order;
    uint32_t header_size;
    uint32_t block_size;
    uint64_t file_size;
    uint64_t revision;
    int64_t generated_at;
    int64_t confirmed_at;
    uint32_t max_stale;
    uint32_t flags;
    uint32_t n_users;
    uint32_t n_groups;
    uint32_t strings_off;
    uint32_t strings_size;
    uint32_t users_off;
    uint32_t groups_off;
    uint32_t pool_off;
    uint32_t pool_count;
    uint32_t uname_idx_off;
    uint32_t uid_idx_off;
    uint32_t gname_idx_off;
    uint32_t gid_idx_off;
    uint32_t crc_off;
    uint32_t n_blocks;
    uint32_t header_crc;
    /* Set to 1 in place by the writer on the OLD file right after a new one
     * replaced it, so readers holding a mapping notice without a stat() per
     * call.  The one byte range ever written after publication; excluded from
     * header_crc. */
    uint32_t superseded;
};

/* User record: 12 x u32. */
struct sc_user_rec {
    uint32_t uid, gid, name, gecos, home, shell;
    uint32_t gids_start, gids_count, princ_start, princ_count;
    uint32_t access, flags;
};

/* Group record: 6 x u32. */
struct sc_group_rec {
    uint32_t gid, name, mem_start, mem_count, flags, reserved;
};

/* One mapped, header-validated file.  Opaque outside cache.c. */
struct sc_map;

/* A cache path plus the mapping currently in use for it.  Thread-safe. */
struct sc_handle {
    const char *path;
    int require_root_owner; /* refuse files not owned by root or writable by others */
    pthread_mutex_t mu;
    struct sc_map *cur;
    struct timespec checked; /* CLOCK_MONOTONIC_COARSE of the last stat() of path */
};

/* How long a mapping is trusted without a stat() when nobody marked it
 * superseded (covers writers that do not set the flag, e.g. a manual mv). */
#define SC_RECHECK_NS 1000000000LL

#define SC_HANDLE_INIT(p, secure) { (p), (secure), PTHREAD_MUTEX_INITIALIZER, NULL, {0, 0} }

/* Returns a referenced mapping of the file as it is now (remapping if it was
 * replaced), or NULL with *why set to SC_UNAVAIL. Pair with sc_release. */
struct sc_map *sc_acquire(struct sc_handle *h);
void sc_release(struct sc_handle *h, struct sc_map *m);
/* Drop the handle's mapping (for tests and unload). */
void sc_reset(struct sc_handle *h);

/* Map one file without a handle (CLI `cache show`); free with sc_close. */
struct sc_map *sc_open_path(const char *path, int require_root_owner, int *err);
void sc_close(struct sc_map *m);

const struct sc_header *sc_header_of(const struct sc_map *m);
/* Verify every block CRC now; returns 0 when the whole file is intact. */
int sc_verify_all(struct sc_map *m);
/* 1 when confirmed_at + max_stale < now (max_stale 0 = never stale). */
int sc_is_stale(const struct sc_map *m, time_t now);

/* Index lookups: SC_OK with *idx set, SC_NOTFOUND, or SC_UNAVAIL (corrupt). */
int sc_user_by_name(struct sc_map *m, const char *name, uint32_t *idx);
int sc_user_by_uid(struct sc_map *m, uint32_t uid, uint32_t *idx);
int sc_group_by_name(struct sc_map *m, const char *name, uint32_t *idx);
int sc_group_by_gid(struct sc_map *m, uint32_t gid, uint32_t *idx);

/* Copy a record into caller storage, glibc style: SC_ERANGE when buf is too small. */
int sc_fill_passwd(struct sc_map *m, uint32_t idx, struct passwd *pw, char *buf, size_t len);
int sc_fill_group(struct sc_map *m, uint32_t idx, struct group *gr, char *buf, size_t len);

/* Borrowed views into the mapping (valid until sc_release). */
int sc_user_record(struct sc_map *m, uint32_t idx, struct sc_user_rec *out);
int sc_user_gids(struct sc_map *m, uint32_t idx, const uint32_t **gids, uint32_t *n);
/* i-th principal of a user: SC_OK and *out, SC_NOTFOUND past the end. */
int sc_user_principal(struct sc_map *m, uint32_t idx, uint32_t i, const char **out);

/* Local accounts always win: 1 when `name` has an entry in the passwd-format
 * file `path` (the host's own accounts, normally /etc/passwd), 0 when not, -1
 * when the file cannot be read (callers then treat the name as local). */
int sc_passwd_file_has(const char *path, const char *name);

#endif
