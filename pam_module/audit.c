#define _GNU_SOURCE
#include "audit.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static void put(struct ss_json *j, const char *s, size_t n) {
    /* Keep room for the closing "}\n". */
    if (j->overflow || n > sizeof j->buf - 2 - j->len) {
        j->overflow = 1;
        return;
    }
    memcpy(j->buf + j->len, s, n);
    j->len += n;
}

static void puts_(struct ss_json *j, const char *s) { put(j, s, strlen(s)); }

static void put_escaped(struct ss_json *j, const char *s) {
    put(j, "\"", 1);
    for (const unsigned char *c = (const unsigned char *)s; *c; c++) {
        char tmp[8];
        if (*c == '"' || *c == '\\') {
            tmp[0] = '\\';
            tmp[1] = (char)*c;
            put(j, tmp, 2);
        } else if (*c < 0x20 || *c >= 0x7f) {
            /* Control characters and every non-ASCII byte: \u00XX, so the
             * line is valid JSON (and ASCII) whatever bytes came in. */
            snprintf(tmp, sizeof tmp, "\\u%04x", *c);
            put(j, tmp, 6);
        } else {
            put(j, (const char *)c, 1);
        }
    }
    put(j, "\"", 1);
}

static void key(struct ss_json *j, const char *k) {
    if (j->len > 1)
        put(j, ",", 1);
    put_escaped(j, k);
    put(j, ":", 1);
}

void ss_json_begin(struct ss_json *j) {
    j->len = 0;
    j->overflow = 0;
    put(j, "{", 1);
}

void ss_json_str(struct ss_json *j, const char *k, const char *v) {
    key(j, k);
    if (v)
        put_escaped(j, v);
    else
        puts_(j, "null");
}

void ss_json_int(struct ss_json *j, const char *k, long long v) {
    char tmp[32];
    key(j, k);
    snprintf(tmp, sizeof tmp, "%lld", v);
    puts_(j, tmp);
}

void ss_json_bool(struct ss_json *j, const char *k, int v) {
    key(j, k);
    puts_(j, v ? "true" : "false");
}

int ss_json_end(struct ss_json *j) {
    if (j->overflow)
        return -1;
    /* put() always leaves two bytes free. */
    j->buf[j->len++] = '}';
    j->buf[j->len++] = '\n';
    return 0;
}

static void event_id(char out[33]) {
    unsigned char r[16];
    ssize_t n = getrandom(r, sizeof r, GRND_NONBLOCK);
    if (n != (ssize_t)sizeof r) {
        /* Early boot without entropy: time and pid are still unique enough
         * for deduplication on one host. */
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        uint64_t a = (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
        uint64_t b = ((uint64_t)getpid() << 32) ^ (uint64_t)(uintptr_t)&ts;
        memcpy(r, &a, 8);
        memcpy(r + 8, &b, 8);
    }
    for (int i = 0; i < 16; i++)
        snprintf(out + 2 * i, 3, "%02x", r[i]);
}

void ss_event_begin(struct ss_json *j, const char *type) {
    char id[33], when[40];
    struct timespec ts;
    struct tm tm;
    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    size_t n = strftime(when, sizeof when, "%Y-%m-%dT%H:%M:%S", &tm);
    snprintf(when + n, sizeof when - n, ".%06ldZ", ts.tv_nsec / 1000);
    event_id(id);
    ss_json_begin(j);
    ss_json_int(j, "v", 1);
    ss_json_str(j, "id", id);
    ss_json_str(j, "time", when);
    ss_json_str(j, "type", type);
}

/* The spool directory must be ours alone: a directory owned by the current
 * euid (root in every PAM caller that matters), not writable by anyone else. */
static int open_spool_dir(const char *dir, char *why, size_t whylen) {
    /* Create DIR (0700) and its parent (0755) when missing. */
    char parent[4096];
    size_t n = strlen(dir);
    if (n == 0 || n >= sizeof parent || dir[0] != '/') {
        snprintf(why, whylen, "spool directory %s is not an absolute path", dir);
        return -1;
    }
    memcpy(parent, dir, n + 1);
    char *slash = strrchr(parent, '/');
    if (slash && slash != parent) {
        *slash = '\0';
        if (mkdir(parent, 0755) != 0 && errno != EEXIST) {
            snprintf(why, whylen, "cannot create %s: %s", parent, strerror(errno));
            return -1;
        }
    }
    if (mkdir(dir, 0700) != 0 && errno != EEXIST) {
        snprintf(why, whylen, "cannot create %s: %s", dir, strerror(errno));
        return -1;
    }
    int dfd = open(dir, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (dfd < 0) {
        snprintf(why, whylen, "cannot open %s: %s", dir, strerror(errno));
        return -1;
    }
    struct stat st;
    if (fstat(dfd, &st) != 0 || st.st_uid != geteuid() || (st.st_mode & 022)) {
        snprintf(why, whylen, "refusing spool directory %s: not owned by uid %u or writable by others",
                 dir, (unsigned)geteuid());
        close(dfd);
        return -1;
    }
    return dfd;
}

int ss_spool_append(const char *dir, unsigned long max_bytes, const struct ss_json *j, char *why,
                    size_t whylen) {
    int dfd = open_spool_dir(dir, why, whylen);
    if (dfd < 0)
        return -1;
    int fd = openat(dfd, STEPSSH_SPOOL_FILE,
                    O_WRONLY | O_APPEND | O_CREAT | O_NOFOLLOW | O_CLOEXEC | O_NOCTTY, 0600);
    int e = errno;
    close(dfd);
    if (fd < 0) {
        snprintf(why, whylen, "cannot open %s/%s: %s", dir, STEPSSH_SPOOL_FILE, strerror(e));
        return -1;
    }
    struct stat st;
    int rc = -1;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) || st.st_uid != geteuid() || st.st_nlink != 1) {
        snprintf(why, whylen, "refusing %s/%s: not a regular file owned by uid %u", dir,
                 STEPSSH_SPOOL_FILE, (unsigned)geteuid());
    } else if (max_bytes && (unsigned long long)st.st_size + j->len > max_bytes) {
        snprintf(why, whylen, "spool %s/%s is full (%lld bytes, limit %lu): event dropped", dir,
                 STEPSSH_SPOOL_FILE, (long long)st.st_size, max_bytes);
    } else {
        /* One write() per event: with O_APPEND, concurrent writers never
         * interleave within a line on a local filesystem. */
        ssize_t w = write(fd, j->buf, j->len);
        if (w == (ssize_t)j->len) {
            /* Durable before the login proceeds: the spool is the record. */
            fdatasync(fd);
            rc = 0;
        } else {
            e = w < 0 ? errno : ENOSPC;
            if (w > 0) {
                /* Torn line: terminate it so the next event starts clean;
                 * readers skip lines that do not parse. */
                ssize_t ignored = write(fd, "\n", 1);
                (void)ignored;
            }
            snprintf(why, whylen, "cannot append to %s/%s: %s", dir, STEPSSH_SPOOL_FILE,
                     strerror(e));
        }
    }
    close(fd);
    return rc;
}
