/* libnss_stepssh.so.2: glibc NSS entry points over the shared cache reader.
 *
 * The path is fixed at build time (STEPSSH_CACHE_PATH); no environment
 * variable is consulted because setuid programs load this module.  Only the
 * cffi build for tests and the CLI may redirect it (STEPSSH_PATH_OVERRIDE). */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <nss.h>
#include <stdlib.h>
#include <string.h>

#include "cache.h"

#define EXPORT __attribute__((visibility("default")))

static struct sc_handle handle = SC_HANDLE_INIT(STEPSSH_CACHE_PATH, 1);

#ifdef STEPSSH_PATH_OVERRIDE
/* Not present in the module glibc loads.  The path is copied: callers (cffi)
 * may pass a temporary. */
void stepssh_nss_set_path(const char *path, int require_root_owner) {
    static char copy[4096];
    pthread_mutex_lock(&handle.mu);
    int same = handle.path == copy && strcmp(copy, path) == 0 &&
               handle.require_root_owner == require_root_owner;
    pthread_mutex_unlock(&handle.mu);
    if (same)
        return; /* keep the mapping, as glibc's long-lived callers do */
    sc_reset(&handle);
    pthread_mutex_lock(&handle.mu);
    snprintf(copy, sizeof copy, "%s", path);
    handle.path = copy;
    handle.require_root_owner = require_root_owner;
    pthread_mutex_unlock(&handle.mu);
}
#endif

static enum nss_status to_nss(int r, int *errnop) {
    switch (r) {
    case SC_OK:
        return NSS_STATUS_SUCCESS;
    case SC_NOTFOUND:
        *errnop = ENOENT;
        return NSS_STATUS_NOTFOUND;
    case SC_ERANGE:
        *errnop = ERANGE;
        return NSS_STATUS_TRYAGAIN;
    default:
        *errnop = ENOENT;
        return NSS_STATUS_UNAVAIL;
    }
}

/* Look a record up and fill it, holding the mapping for the whole call. */
#define LOOKUP(find, key, fill, out)                                                   \
    do {                                                                               \
        struct sc_map *m = sc_acquire(&handle);                                        \
        if (!m)                                                                        \
            return to_nss(SC_UNAVAIL, errnop);                                         \
        uint32_t idx;                                                                  \
        int r = find(m, key, &idx);                                                    \
        if (r == SC_OK)                                                                \
            r = fill(m, idx, out, buf, buflen);                                        \
        sc_release(&handle, m);                                                        \
        return to_nss(r, errnop);                                                      \
    } while (0)

EXPORT enum nss_status _nss_stepssh_getpwnam_r(const char *name, struct passwd *pw, char *buf,
                                               size_t buflen, int *errnop) {
    LOOKUP(sc_user_by_name, name, sc_fill_passwd, pw);
}

EXPORT enum nss_status _nss_stepssh_getpwuid_r(uid_t uid, struct passwd *pw, char *buf,
                                               size_t buflen, int *errnop) {
    LOOKUP(sc_user_by_uid, uid, sc_fill_passwd, pw);
}

EXPORT enum nss_status _nss_stepssh_getgrnam_r(const char *name, struct group *gr, char *buf,
                                               size_t buflen, int *errnop) {
    LOOKUP(sc_group_by_name, name, sc_fill_group, gr);
}

EXPORT enum nss_status _nss_stepssh_getgrgid_r(gid_t gid, struct group *gr, char *buf,
                                               size_t buflen, int *errnop) {
    LOOKUP(sc_group_by_gid, gid, sc_fill_group, gr);
}

/* ---- enumeration: one snapshot per setXXent, so a concurrent replacement
 * never mixes two files in one listing ---- */

struct cursor {
    pthread_mutex_t mu;
    struct sc_map *m;
    uint32_t next;
};

static struct cursor pw_cur = {PTHREAD_MUTEX_INITIALIZER, NULL, 0};
static struct cursor gr_cur = {PTHREAD_MUTEX_INITIALIZER, NULL, 0};

static void cursor_set(struct cursor *c) {
    pthread_mutex_lock(&c->mu);
    sc_release(&handle, c->m);
    c->m = sc_acquire(&handle);
    c->next = 0;
    pthread_mutex_unlock(&c->mu);
}

static void cursor_end(struct cursor *c) {
    pthread_mutex_lock(&c->mu);
    sc_release(&handle, c->m);
    c->m = NULL;
    c->next = 0;
    pthread_mutex_unlock(&c->mu);
}

static enum nss_status cursor_next(struct cursor *c, int is_user, void *out, char *buf,
                                   size_t buflen, int *errnop) {
    pthread_mutex_lock(&c->mu);
    if (!c->m) {
        c->m = sc_acquire(&handle);
        c->next = 0;
    }
    int r = SC_UNAVAIL;
    if (c->m) {
        uint32_t n = is_user ? sc_header_of(c->m)->n_users : sc_header_of(c->m)->n_groups;
        if (c->next >= n) {
            r = SC_NOTFOUND;
        } else {
            r = is_user ? sc_fill_passwd(c->m, c->next, out, buf, buflen)
                        : sc_fill_group(c->m, c->next, out, buf, buflen);
            if (r == SC_OK)
                c->next++; /* ERANGE keeps the position for the retry */
        }
    }
    pthread_mutex_unlock(&c->mu);
    return to_nss(r, errnop);
}

EXPORT enum nss_status _nss_stepssh_setpwent(int stayopen) {
    (void)stayopen;
    cursor_set(&pw_cur);
    return NSS_STATUS_SUCCESS;
}

EXPORT enum nss_status _nss_stepssh_endpwent(void) {
    cursor_end(&pw_cur);
    return NSS_STATUS_SUCCESS;
}

EXPORT enum nss_status _nss_stepssh_getpwent_r(struct passwd *pw, char *buf, size_t buflen,
                                               int *errnop) {
    return cursor_next(&pw_cur, 1, pw, buf, buflen, errnop);
}

EXPORT enum nss_status _nss_stepssh_setgrent(int stayopen) {
    (void)stayopen;
    cursor_set(&gr_cur);
    return NSS_STATUS_SUCCESS;
}

EXPORT enum nss_status _nss_stepssh_endgrent(void) {
    cursor_end(&gr_cur);
    return NSS_STATUS_SUCCESS;
}

EXPORT enum nss_status _nss_stepssh_getgrent_r(struct group *gr, char *buf, size_t buflen,
                                               int *errnop) {
    return cursor_next(&gr_cur, 0, gr, buf, buflen, errnop);
}

/* Supplementary groups from the user's precomputed gid list. Duplicates are
 * checked only against what earlier modules added; the list itself is unique. */
EXPORT enum nss_status _nss_stepssh_initgroups_dyn(const char *user, gid_t group, long int *start,
                                                   long int *size, gid_t **groupsp, long int limit,
                                                   int *errnop) {
    struct sc_map *m = sc_acquire(&handle);
    if (!m)
        return to_nss(SC_UNAVAIL, errnop);
    uint32_t idx, n = 0;
    const uint32_t *gids = NULL;
    int r = sc_user_by_name(m, user, &idx);
    if (r == SC_OK) {
        /* Local accounts are never granted managed groups (step-sudo!).
         * `group` is normally the primary gid of the account the caller
         * resolved: when it is the cached user's, that account is ours (no
         * file read on the common path); otherwise a local account with the
         * same name may have answered first, so ask the passwd file. */
        struct sc_user_rec u;
        r = sc_user_record(m, idx, &u);
        if (r == SC_OK && u.gid != (uint32_t)group && sc_passwd_file_has("/etc/passwd", user) != 0)
            r = SC_NOTFOUND;
    }
    if (r == SC_OK)
        r = sc_user_gids(m, idx, &gids, &n);
    if (r != SC_OK) {
        sc_release(&handle, m);
        return to_nss(r, errnop);
    }
    long int before = *start;
    for (uint32_t i = 0; i < n; i++) {
        gid_t g = gids[i];
        if (g == group || g == 0)
            continue;
        int dup = 0;
        for (long int j = 0; j < before && !dup; j++)
            dup = (*groupsp)[j] == g;
        if (dup)
            continue;
        if (*start == *size) {
            if (limit > 0 && *size >= limit)
                break; /* glibc's limit reached: keep what fits */
            long int nsize = *size ? *size * 2 : 16;
            if (limit > 0 && nsize > limit)
                nsize = limit;
            gid_t *ng = realloc(*groupsp, (size_t)nsize * sizeof(gid_t));
            if (!ng) {
                sc_release(&handle, m);
                *errnop = ENOMEM;
                return NSS_STATUS_TRYAGAIN;
            }
            *groupsp = ng;
            *size = nsize;
        }
        (*groupsp)[(*start)++] = g;
    }
    sc_release(&handle, m);
    return NSS_STATUS_SUCCESS;
}
