#define _GNU_SOURCE
#include "audit.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/random.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <syslog.h>
#include <time.h>
#include <unistd.h>

/* ---- JSON ---------------------------------------------------------------- */

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

/* Escapes at most `max` bytes of `s`; returns 1 when `s` was longer. */
static int put_escaped_n(struct ss_json *j, const char *s, size_t max) {
    size_t i = 0;
    put(j, "\"", 1);
    for (const unsigned char *c = (const unsigned char *)s; *c; c++, i++) {
        char tmp[8];
        if (i == max) {
            put(j, "\"", 1);
            return 1;
        }
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
    return 0;
}

static void key(struct ss_json *j, const char *k) {
    if (j->len > 1)
        put(j, ",", 1);
    put_escaped_n(j, k, (size_t)-1);
    put(j, ":", 1);
}

void ss_json_begin(struct ss_json *j) {
    j->len = 0;
    j->overflow = 0;
    put(j, "{", 1);
}

void ss_json_str(struct ss_json *j, const char *k, const char *v) { ss_json_strn(j, k, v, (size_t)-1); }

int ss_json_strn(struct ss_json *j, const char *k, const char *v, size_t max) {
    key(j, k);
    if (v)
        return put_escaped_n(j, v, max);
    puts_(j, "null");
    return 0;
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

/* ---- ids and event headers --------------------------------------------------- */

static const char CROCKFORD[] = "0123456789ABCDEFGHJKMNPQRSTVWXYZ";

void ss_ulid_encode(uint64_t ms, const unsigned char rnd[10], char out[SS_ULID_LEN + 1]) {
    unsigned __int128 v = (unsigned __int128)(ms & 0xffffffffffffull) << 80;
    for (int i = 0; i < 10; i++)
        v |= (unsigned __int128)rnd[i] << (8 * (9 - i));
    for (int i = SS_ULID_LEN - 1; i >= 0; i--) {
        out[i] = CROCKFORD[(unsigned)(v & 31)];
        v >>= 5;
    }
    out[SS_ULID_LEN] = '\0';
}

int ss_is_ulid(const char *s) {
    if (!s || strlen(s) != SS_ULID_LEN || s[0] > '7')
        return 0;
    for (; *s; s++)
        if (!strchr(CROCKFORD, *s))
            return 0;
    return 1;
}

int ss_env_session_id(char out[SS_ULID_LEN + 1]) {
    static const char key[] = "STEPSSH_SESSION_ID=";
    char buf[32768];
    int fd = open("/proc/self/environ", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    size_t len = 0;
    ssize_t n;
    while (len < sizeof buf - 1 && (n = read(fd, buf + len, sizeof buf - 1 - len)) > 0)
        len += (size_t)n;
    close(fd);
    buf[len] = '\0';
    for (size_t i = 0; i < len; i += strlen(buf + i) + 1) {
        if (strncmp(buf + i, key, sizeof key - 1) == 0 && ss_is_ulid(buf + i + sizeof key - 1)) {
            memcpy(out, buf + i + sizeof key - 1, SS_ULID_LEN + 1);
            return 0;
        }
    }
    return -1;
}

static void random_bytes(unsigned char *r, size_t n) {
    if (getrandom(r, n, GRND_NONBLOCK) == (ssize_t)n)
        return;
    /* Early boot without entropy: time, pid and an address are still unique
     * enough for deduplication (the time part of the ULID does the rest). */
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    uint64_t x = (uint64_t)ts.tv_nsec ^ ((uint64_t)getpid() << 32) ^ (uint64_t)(uintptr_t)&ts;
    for (size_t i = 0; i < n; i++) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        r[i] = (unsigned char)x;
    }
}

static uint64_t ms_of(const struct timespec *ts) {
    return (uint64_t)ts->tv_sec * 1000u + (uint64_t)ts->tv_nsec / 1000000u;
}

void ss_ulid(char out[SS_ULID_LEN + 1]) {
    struct timespec ts;
    unsigned char r[10];
    clock_gettime(CLOCK_REALTIME, &ts);
    random_bytes(r, sizeof r);
    ss_ulid_encode(ms_of(&ts), r, out);
}

void ss_event_begin(struct ss_json *j, const char *type, char *id_out) {
    char id[SS_ULID_LEN + 1], when[40], host[256];
    unsigned char r[10];
    struct timespec ts;
    struct tm tm;
    clock_gettime(CLOCK_REALTIME, &ts);
    random_bytes(r, sizeof r);
    ss_ulid_encode(ms_of(&ts), r, id);
    if (id_out)
        memcpy(id_out, id, sizeof id);
    gmtime_r(&ts.tv_sec, &tm);
    size_t n = strftime(when, sizeof when, "%Y-%m-%dT%H:%M:%S", &tm);
    snprintf(when + n, sizeof when - n, ".%06ldZ", ts.tv_nsec / 1000);
    if (gethostname(host, sizeof host) != 0)
        host[0] = '\0';
    host[sizeof host - 1] = '\0';
    ss_json_begin(j);
    ss_json_int(j, "v", SS_EVENT_VERSION);
    ss_json_str(j, "id", id);
    ss_json_str(j, "time", when);
    ss_json_strn(j, "host", host, 253);
    ss_json_str(j, "type", type);
}

long long ss_audit_session(void) {
    char b[32];
    int fd = open("/proc/self/sessionid", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    ssize_t n = read(fd, b, sizeof b - 1);
    close(fd);
    if (n <= 0)
        return -1;
    b[n] = '\0';
    char *end;
    errno = 0;
    unsigned long long v = strtoull(b, &end, 10);
    if (errno || end == b || v >= 4294967295ull) /* (unsigned)-1: no session */
        return -1;
    return (long long)v;
}

/* ---- the spool ------------------------------------------------------------ */

/* The spool directory must be ours alone: a directory owned by the current
 * euid (root in every caller that matters), not writable by anyone else. */
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

static int lock(int fd, int how) {
    int r;
    while ((r = flock(fd, how)) != 0 && errno == EINTR)
        ;
    return r;
}

static int safe_file(int fd, struct stat *st) {
    return fstat(fd, st) == 0 && S_ISREG(st->st_mode) && st->st_uid == geteuid() && st->st_nlink <= 1;
}

/* DIR/dropped holds "COUNT LAST_DROP_UNIX_TIME\n", rewritten under an
 * exclusive lock by whoever drops an event (doctor and the agent read it). */
static void count_drop(int dfd, unsigned long long dropped) {
    int fd = openat(dfd, STEPSSH_DROPPED_FILE, O_RDWR | O_CREAT | O_NOFOLLOW | O_CLOEXEC | O_NOCTTY, 0600);
    if (fd < 0)
        return;
    struct stat st;
    if (!safe_file(fd, &st) || st.st_nlink != 1 || lock(fd, LOCK_EX) != 0) {
        close(fd);
        return;
    }
    char b[64];
    ssize_t n = pread(fd, b, sizeof b - 1, 0);
    unsigned long long count = 0;
    if (n > 0) {
        b[n] = '\0';
        count = strtoull(b, NULL, 10);
    }
    int m = snprintf(b, sizeof b, "%llu %lld\n", count + dropped, (long long)time(NULL));
    if (pwrite(fd, b, (size_t)m, 0) == m && ftruncate(fd, m) == 0)
        fdatasync(fd);
    close(fd); /* releases the lock */
}

static unsigned long long lines_in(const char *s, size_t len) {
    unsigned long long n = 0;
    for (const char *p = s; (p = memchr(p, '\n', len - (size_t)(p - s))) != NULL; p++)
        n++;
    return n;
}

static int append_line(const char *dir, unsigned long max_bytes, const char *line, size_t len,
                       int raise_fsize, int many, char *why, size_t whylen) {
    if (len == 0 || line[len - 1] != '\n' || (!many && memchr(line, '\n', len - 1))) {
        snprintf(why, whylen, many ? "not whole lines" : "not one line");
        return -1;
    }
    int dfd = open_spool_dir(dir, why, whylen);
    if (dfd < 0)
        return -1;
    /* The invoking user sets sudo's resource limits: a small RLIMIT_FSIZE
     * must not tear or suppress the record. */
    struct rlimit saved;
    int restore = 0;
    if (raise_fsize && getrlimit(RLIMIT_FSIZE, &saved) == 0 && saved.rlim_cur != RLIM_INFINITY) {
        struct rlimit inf = {RLIM_INFINITY, RLIM_INFINITY}, soft = {saved.rlim_max, saved.rlim_max};
        /* raising the hard limit needs CAP_SYS_RESOURCE (sudo has it) */
        restore = setrlimit(RLIMIT_FSIZE, &inf) == 0 || setrlimit(RLIMIT_FSIZE, &soft) == 0;
    }
    int rc = -1, fd = -1, e = 0, created = 0;
    struct stat st;
    for (int attempt = 0; attempt < 8; attempt++) {
        created = 0;
        fd = openat(dfd, STEPSSH_SPOOL_FILE, O_RDWR | O_APPEND | O_NOFOLLOW | O_CLOEXEC | O_NOCTTY);
        if (fd < 0 && errno == ENOENT) {
            fd = openat(dfd, STEPSSH_SPOOL_FILE,
                        O_RDWR | O_APPEND | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC | O_NOCTTY, 0600);
            if (fd < 0 && errno == EEXIST)
                continue; /* another writer created it just now */
            created = fd >= 0;
        }
        if (fd < 0) {
            e = errno;
            snprintf(why, whylen, "cannot open %s/%s: %s", dir, STEPSSH_SPOOL_FILE, strerror(e));
            goto out;
        }
        /* Shared with other writers; the agent takes it exclusively before it
         * reads a file it renamed away, so no write is ever in flight then. */
        if (lock(fd, LOCK_SH) != 0) {
            e = errno;
            snprintf(why, whylen, "cannot lock %s/%s: %s", dir, STEPSSH_SPOOL_FILE, strerror(e));
            goto out;
        }
        if (!safe_file(fd, &st)) {
            snprintf(why, whylen, "refusing %s/%s: not a regular file owned by uid %u with one link", dir,
                     STEPSSH_SPOOL_FILE, (unsigned)geteuid());
            goto out;
        }
        if (st.st_nlink == 1)
            break;
        /* Shipped and removed by the agent between our open and our lock:
         * the next open finds (or creates) the new file. */
        close(fd);
        fd = -1;
    }
    if (fd < 0) {
        snprintf(why, whylen, "%s/%s kept disappearing", dir, STEPSSH_SPOOL_FILE);
        goto out;
    }
    if (st.st_mode & 077)
        fchmod(fd, 0600);
    if (max_bytes && (unsigned long long)st.st_size + len > max_bytes) {
        snprintf(why, whylen, "spool %s/%s is full (%lld bytes, limit %lu): event dropped", dir,
                 STEPSSH_SPOOL_FILE, (long long)st.st_size, max_bytes);
        count_drop(dfd, lines_in(line, len));
        goto out;
    }
    /* A record torn by a crash (no final newline, or zeros) must not swallow
     * this one: start on a fresh line. */
    char last = '\n';
    if (st.st_size > 0 && pread(fd, &last, 1, st.st_size - 1) != 1)
        last = '\n';
    struct iovec iov[2] = {{(void *)"\n", last != '\n'}, {(void *)line, len}};
    size_t total = iov[0].iov_len + len;
    /* One writev() per event: with O_APPEND, concurrent writers never
     * interleave within a line on a local filesystem. */
    ssize_t w = writev(fd, iov, 2);
    if (w == (ssize_t)total) {
        /* Durable before the login proceeds: the spool is the record. */
        if (fdatasync(fd) == 0 && (!created || fsync(dfd) == 0)) {
            rc = 0;
        } else {
            e = errno;
            snprintf(why, whylen, "cannot sync %s/%s: %s", dir, STEPSSH_SPOOL_FILE, strerror(e));
        }
    } else {
        e = w < 0 ? errno : ENOSPC;
        if (w > 0) {
            /* Torn line: terminate it so the next event starts clean;
             * readers skip lines that do not parse. */
            ssize_t ignored = write(fd, "\n", 1);
            (void)ignored;
        }
        snprintf(why, whylen, "cannot append to %s/%s: %s", dir, STEPSSH_SPOOL_FILE, strerror(e));
        count_drop(dfd, lines_in(line, len));
    }
out:
    if (fd >= 0)
        close(fd); /* releases the lock */
    close(dfd);
    if (restore)
        setrlimit(RLIMIT_FSIZE, &saved);
    return rc;
}

int ss_spool_append_raw(const char *dir, unsigned long max_bytes, const char *line, size_t len,
                        char *why, size_t whylen) {
    return append_line(dir, max_bytes, line, len, 0, 0, why, whylen);
}

int ss_spool_append_lines(const char *dir, unsigned long max_bytes, const char *lines, size_t len,
                          char *why, size_t whylen) {
    return append_line(dir, max_bytes, lines, len, 0, 1, why, whylen);
}

int ss_spool_append(const char *dir, unsigned long max_bytes, const struct ss_json *j, char *why,
                    size_t whylen) {
    return append_line(dir, max_bytes, j->buf, j->len, 1, 0, why, whylen);
}

/* ---- system log ------------------------------------------------------------ */

void ss_syslog_line(const char *line, size_t len) {
    if (len && line[len - 1] == '\n')
        len--;
    char hdr[96], ts[32];
    time_t now = time(NULL);
    struct tm tm;
    localtime_r(&now, &tm);
    strftime(ts, sizeof ts, "%b %e %H:%M:%S", &tm);
    int n = snprintf(hdr, sizeof hdr, "<%d>%s step-ssh-audit[%d]: ", LOG_AUTHPRIV | LOG_INFO, ts,
                     (int)getpid());
    if (n < 0 || (size_t)n >= sizeof hdr)
        return;
    int s = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (s < 0)
        return;
    struct sockaddr_un a;
    memset(&a, 0, sizeof a);
    a.sun_family = AF_UNIX;
    strcpy(a.sun_path, "/dev/log");
    struct iovec iov[2] = {{hdr, (size_t)n}, {(void *)line, len}};
    struct msghdr m;
    memset(&m, 0, sizeof m);
    m.msg_name = &a;
    m.msg_namelen = sizeof a;
    m.msg_iov = iov;
    m.msg_iovlen = 2;
    ssize_t ignored = sendmsg(s, &m, MSG_NOSIGNAL);
    (void)ignored;
    close(s);
}

int ss_audit_record(const char *dir, unsigned long max_bytes, const struct ss_json *j, char *why,
                    size_t whylen) {
    int rc = ss_spool_append(dir, max_bytes, j, why, whylen);
    ss_syslog_line(j->buf, j->len);
    return rc;
}
