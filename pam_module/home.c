/* Creating a managed user's home directory without symlink or race tricks.
 *
 * - Every directory on the way is opened relative to its parent's fd and
 *   must be root-owned and writable by nobody else before we look inside it
 *   (so any symlink found there was put there by root and may be followed).
 *   Missing parents are created root:root 0755.
 * - The home is built under a temporary name in its parent, as root with
 *   mode 0700 (nobody else can enter it), populated from skel with
 *   openat/mkdirat/symlinkat and O_NOFOLLOW, each entry chowned through its
 *   fd (fchownat with AT_SYMLINK_NOFOLLOW for links), then renamed into
 *   place with RENAME_NOREPLACE and finally fchmod/fchown'd through its fd.
 * - Anything already at the home path (directory, file, symlink) is left
 *   exactly as it is. */
#define _GNU_SOURCE
#include "home.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#define SKEL_MAX_DEPTH 8
#define MAX_COMPONENTS 64

static void say(char *buf, size_t len, const char *fmt, ...) {
    if (!buf || !len)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, len, fmt, ap);
    va_end(ap);
}

static int trusted_dir(int fd) {
    struct stat st;
    return fstat(fd, &st) == 0 && S_ISDIR(st.st_mode) && st.st_uid == 0 && !(st.st_mode & 022);
}

static void remove_tree(int dfd, const char *name, int depth) {
    if (unlinkat(dfd, name, 0) == 0 || depth > SKEL_MAX_DEPTH + 1)
        return;
    int fd = openat(dfd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0)
        return;
    DIR *d = fdopendir(fd);
    if (!d) {
        close(fd);
        return;
    }
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
            continue;
        remove_tree(dirfd(d), e->d_name, depth + 1);
    }
    closedir(d);
    unlinkat(dfd, name, AT_REMOVEDIR);
}

static int copy_file(int src, int dst, const char *name, mode_t mode, uid_t uid, gid_t gid,
                     char *why, size_t whylen, char *warn, size_t warnlen) {
    int in = openat(src, name, O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
    if (in < 0) {
        say(warn, warnlen, "skel entry %s skipped: %s", name, strerror(errno));
        return 0;
    }
    struct stat st;
    if (fstat(in, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(in);
        return 0; /* replaced while we looked: skip */
    }
    int out = openat(dst, name, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC | O_NOCTTY, 0600);
    if (out < 0) {
        say(why, whylen, "cannot create %s: %s", name, strerror(errno));
        close(in);
        return -1;
    }
    char buf[65536];
    int rc = 0;
    for (;;) {
        ssize_t n = read(in, buf, sizeof buf);
        if (n == 0)
            break;
        if (n < 0) {
            if (errno == EINTR)
                continue;
            say(warn, warnlen, "skel entry %s truncated: %s", name, strerror(errno));
            break;
        }
        for (ssize_t off = 0; off < n;) {
            ssize_t w = write(out, buf + off, (size_t)(n - off));
            if (w < 0 && errno == EINTR)
                continue;
            if (w <= 0) {
                say(why, whylen, "cannot write %s: %s", name, w < 0 ? strerror(errno) : "short write");
                rc = -1;
                break;
            }
            off += w;
        }
        if (rc)
            break;
    }
    if (rc == 0 && (fchmod(out, mode) != 0 || fchown(out, uid, gid) != 0)) {
        say(why, whylen, "cannot set owner of %s: %s", name, strerror(errno));
        rc = -1;
    }
    close(in);
    close(out);
    return rc;
}

static int copy_tree(int src, int dst, uid_t uid, gid_t gid, int depth, char *why, size_t whylen,
                     char *warn, size_t warnlen) {
    int fd = dup(src);
    if (fd < 0) {
        say(why, whylen, "dup: %s", strerror(errno));
        return -1;
    }
    DIR *d = fdopendir(fd);
    if (!d) {
        close(fd);
        say(why, whylen, "cannot read skel: %s", strerror(errno));
        return -1;
    }
    rewinddir(d);
    int rc = 0;
    struct dirent *e;
    while (rc == 0 && (e = readdir(d)) != NULL) {
        const char *name = e->d_name;
        if (strcmp(name, ".") == 0 || strcmp(name, "..") == 0)
            continue;
        struct stat st;
        if (fstatat(src, name, &st, AT_SYMLINK_NOFOLLOW) != 0)
            continue;
        mode_t mode = st.st_mode & 0777; /* never setuid, setgid or sticky */
        if (S_ISDIR(st.st_mode)) {
            if (depth >= SKEL_MAX_DEPTH)
                continue;
            int ns = openat(src, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
            if (ns < 0) {
                say(warn, warnlen, "skel directory %s skipped: %s", name, strerror(errno));
                continue;
            }
            if (mkdirat(dst, name, 0700) != 0) {
                say(why, whylen, "cannot create %s: %s", name, strerror(errno));
                close(ns);
                rc = -1;
                break;
            }
            int nd = openat(dst, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
            if (nd < 0) {
                say(why, whylen, "cannot open %s: %s", name, strerror(errno));
                close(ns);
                rc = -1;
                break;
            }
            rc = copy_tree(ns, nd, uid, gid, depth + 1, why, whylen, warn, warnlen);
            if (rc == 0 && (fchmod(nd, mode) != 0 || fchown(nd, uid, gid) != 0)) {
                say(why, whylen, "cannot set owner of %s: %s", name, strerror(errno));
                rc = -1;
            }
            close(ns);
            close(nd);
        } else if (S_ISREG(st.st_mode)) {
            rc = copy_file(src, dst, name, mode, uid, gid, why, whylen, warn, warnlen);
        } else if (S_ISLNK(st.st_mode)) {
            char target[PATH_MAX];
            ssize_t n = readlinkat(src, name, target, sizeof target - 1);
            if (n < 0)
                continue;
            target[n] = '\0';
            if (symlinkat(target, dst, name) != 0 ||
                fchownat(dst, name, uid, gid, AT_SYMLINK_NOFOLLOW) != 0) {
                say(why, whylen, "cannot create link %s: %s", name, strerror(errno));
                rc = -1;
            }
        }
        /* fifos, sockets and devices are not copied */
    }
    closedir(d);
    return rc;
}

int ss_make_home(const char *path, uid_t uid, gid_t gid, mode_t mode, const char *skel, char *why,
                 size_t whylen, char *warn, size_t warnlen) {
    say(why, whylen, "%s", "");
    say(warn, warnlen, "%s", "");
    char buf[PATH_MAX];
    if (!path || path[0] != '/' || strlen(path) >= sizeof buf) {
        say(why, whylen, "home %s is not an absolute path", path ? path : "(null)");
        return -1;
    }
    if (uid == 0 || gid == 0) {
        say(why, whylen, "refusing to create a home for uid/gid 0");
        return -1;
    }
    memcpy(buf, path, strlen(path) + 1);
    char *comps[MAX_COMPONENTS];
    int n = 0;
    char *save = NULL;
    for (char *c = strtok_r(buf, "/", &save); c; c = strtok_r(NULL, "/", &save)) {
        if (strcmp(c, ".") == 0)
            continue;
        if (strcmp(c, "..") == 0 || n == MAX_COMPONENTS) {
            say(why, whylen, "home %s: '..' or too many components", path);
            return -1;
        }
        comps[n++] = c;
    }
    if (n == 0) {
        say(why, whylen, "refusing home %s", path);
        return -1;
    }
    int dfd = open("/", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd < 0) {
        say(why, whylen, "cannot open /: %s", strerror(errno));
        return -1;
    }
    int rc = -1;
    for (int i = 0; i < n - 1; i++) {
        if (!trusted_dir(dfd)) {
            say(why, whylen, "refusing to create %s: a parent directory (before %s) is not "
                "owned by root or is writable by others", path, comps[i]);
            goto out;
        }
        int nfd = openat(dfd, comps[i], O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (nfd < 0 && errno == ENOENT) {
            if (mkdirat(dfd, comps[i], 0755) != 0 && errno != EEXIST) {
                say(why, whylen, "cannot create parent %s of %s: %s", comps[i], path, strerror(errno));
                goto out;
            }
            nfd = openat(dfd, comps[i], O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
            if (nfd >= 0) {
                struct stat st;
                if (fstat(nfd, &st) == 0 && st.st_uid == 0)
                    fchmod(nfd, 0755); /* undo the umask */
            }
        }
        if (nfd < 0) {
            say(why, whylen, "cannot open parent %s of %s: %s", comps[i], path, strerror(errno));
            goto out;
        }
        close(dfd);
        dfd = nfd;
    }
    if (!trusted_dir(dfd)) {
        say(why, whylen, "refusing to create %s: its parent directory is not owned by root or "
            "is writable by others", path);
        goto out;
    }
    const char *last = comps[n - 1];
    struct stat st;
    if (fstatat(dfd, last, &st, AT_SYMLINK_NOFOLLOW) == 0) {
        if (!S_ISDIR(st.st_mode))
            say(warn, warnlen, "%s exists and is not a directory; left alone", path);
        else if (st.st_uid != uid)
            say(warn, warnlen, "%s is owned by uid %u, not %u; left alone", path,
                (unsigned)st.st_uid, (unsigned)uid);
        rc = SS_HOME_EXISTS;
        goto out;
    }
    if (errno != ENOENT) {
        say(why, whylen, "cannot check %s: %s", path, strerror(errno));
        goto out;
    }

    char tmp[NAME_MAX + 1];
    int made = 0;
    for (int tries = 0; tries < 16 && !made; tries++) {
        uint32_t r = 0;
        if (getrandom(&r, sizeof r, GRND_NONBLOCK) != (ssize_t)sizeof r)
            r = (uint32_t)getpid() * 2654435761u + (uint32_t)tries;
        snprintf(tmp, sizeof tmp, ".%.200s.step-ssh-%08x", last, r);
        if (mkdirat(dfd, tmp, 0700) == 0)
            made = 1;
        else if (errno != EEXIST) {
            say(why, whylen, "cannot create %s: %s", path, strerror(errno));
            goto out;
        }
    }
    if (!made) {
        say(why, whylen, "cannot pick a temporary name next to %s", path);
        goto out;
    }
    int hfd = openat(dfd, tmp, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (hfd < 0 || fstat(hfd, &st) != 0 || st.st_uid != geteuid() || fchmod(hfd, 0700) != 0) {
        say(why, whylen, "cannot open the new %s: %s", path, strerror(errno));
        if (hfd >= 0)
            close(hfd);
        remove_tree(dfd, tmp, 0);
        goto out;
    }
    if (skel && *skel) {
        int sfd = open(skel, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (sfd >= 0) {
            int c = copy_tree(sfd, hfd, uid, gid, 0, why, whylen, warn, warnlen);
            close(sfd);
            if (c != 0) {
                close(hfd);
                remove_tree(dfd, tmp, 0);
                goto out;
            }
        } else if (errno != ENOENT) {
            say(warn, warnlen, "skeleton %s not copied: %s", skel, strerror(errno));
        }
    }
    int moved = renameat2(dfd, tmp, dfd, last, RENAME_NOREPLACE);
    if (moved != 0 && (errno == EINVAL || errno == ENOSYS)) {
        /* A filesystem without RENAME_NOREPLACE (NFS): the parent is
         * writable by root alone, so only root could race us here. */
        if (fstatat(dfd, last, &st, AT_SYMLINK_NOFOLLOW) == 0)
            errno = EEXIST;
        else
            moved = renameat(dfd, tmp, dfd, last);
    }
    if (moved != 0) {
        int e = errno;
        close(hfd);
        remove_tree(dfd, tmp, 0);
        if (e == EEXIST) { /* another session made it first */
            rc = SS_HOME_EXISTS;
        } else {
            say(why, whylen, "cannot move the new home into place at %s: %s", path, strerror(e));
        }
        goto out;
    }
    /* Through the fd: the inode we built, wherever its name is now. */
    if (fchmod(hfd, mode) != 0 || fchown(hfd, uid, gid) != 0) {
        say(why, whylen, "created %s but cannot set its owner or mode: %s", path, strerror(errno));
        close(hfd);
        goto out;
    }
    close(hfd);
    rc = SS_HOME_CREATED;
out:
    close(dfd);
    return rc;
}
