/* step-ssh-principals: sshd's AuthorizedPrincipalsCommand.
 *
 *   AuthorizedPrincipalsCommand /path/step-ssh-principals %u %U
 *   AuthorizedPrincipalsCommandUser nobody
 *
 * Prints, one per line, the certificate principals that may log in as the
 * account on this host, from the cache alone (no network, no agent, no
 * Python).  Prints nothing — so sshd refuses every certificate — for:
 * accounts in the host's own passwd file (local accounts always win), names
 * the cache does not hold, access `none`, `jump` on a host that is not a
 * bastion, a cache past its staleness limit, and an unreadable or corrupt
 * cache.  When sshd passes %U (the uid it resolved), a different uid also
 * prints nothing: the name then belongs to someone else's account.
 *
 * On a bastion, a jump-only user's lines carry SS_JUMP_OPTIONS, restricting
 * the login to port forwarding.  Exit status: 0 (also when printing
 * nothing, which is an answer, not a failure), 2 on usage errors. */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <pwd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <syslog.h>
#include <time.h>
#include <unistd.h>

#include "cache.h"
#include "common.h"

static struct sc_handle handle = SC_HANDLE_INIT(STEPSSH_CACHE_PATH, 1);

static void note(int prio, const char *fmt, const char *user) {
    openlog("step-ssh-principals", LOG_PID, LOG_AUTHPRIV);
    syslog(prio, fmt, user);
    closelog();
}

static int parse_uid(const char *s, uid_t *out) {
    char *end;
    errno = 0;
    unsigned long v = strtoul(s, &end, 10);
    if (errno || end == s || *end || s[0] == '-' || v > UINT32_MAX - 1)
        return -1;
    *out = (uid_t)v;
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2 || argc > 3 || argv[1][0] == '-') {
        fprintf(stderr, "usage: step-ssh-principals USER [UID]\n"
                        "  (sshd_config: AuthorizedPrincipalsCommand %s %%u %%U)\n", argv[0]);
        return 2;
    }
    const char *user = argv[1];
    uid_t want_uid = 0;
    int have_uid = argc == 3;
    if (have_uid && parse_uid(argv[2], &want_uid) != 0) {
        fprintf(stderr, "step-ssh-principals: bad uid %s\n", argv[2]);
        return 2;
    }
    if (ss_local_user(user) != 0)
        return 0;

    struct sc_map *m = sc_acquire(&handle);
    if (!m) {
        note(LOG_WARNING, "cache " STEPSSH_CACHE_PATH " unavailable: no principals for %s", user);
        return 0;
    }
    uint32_t idx;
    struct sc_user_rec u;
    int r = sc_user_by_name(m, user, &idx);
    if (r == SC_OK)
        r = sc_user_record(m, idx, &u);
    if (r != SC_OK) {
        if (r == SC_UNAVAIL)
            note(LOG_WARNING, "cache corrupt: no principals for %s", user);
        sc_release(&handle, m);
        return 0;
    }
    const char *prefix = NULL;
    if (u.access == SC_ACCESS_SSH || u.access == SC_ACCESS_SUDO)
        prefix = "";
    else if (u.access == SC_ACCESS_JUMP && (sc_header_of(m)->flags & SC_FLAG_BASTION))
        prefix = SS_JUMP_OPTIONS " ";
    if (!prefix || u.uid == 0 || u.gid == 0) {
        sc_release(&handle, m);
        return 0;
    }
    if (have_uid) {
        if (want_uid != u.uid) {
            sc_release(&handle, m);
            return 0;
        }
    } else {
        /* Without %U, ask NSS which account the name resolves to. */
        struct passwd *pw = getpwnam(user);
        if (!pw || pw->pw_uid != u.uid) {
            sc_release(&handle, m);
            return 0;
        }
    }
    if (sc_is_stale(m, time(NULL))) {
        sc_release(&handle, m);
        note(LOG_WARNING, "cache is stale: no principals for %s until the agent refreshes it", user);
        return 0;
    }
    /* Build the whole answer first so a corrupt record prints nothing at all. */
    char *out = NULL;
    size_t outlen = 0;
    FILE *buf = open_memstream(&out, &outlen);
    if (!buf) {
        sc_release(&handle, m);
        return 0;
    }
    int bad = 0;
    for (uint32_t i = 0;; i++) {
        const char *p;
        r = sc_user_principal(m, idx, i, &p);
        if (r == SC_NOTFOUND)
            break;
        if (r != SC_OK) {
            bad = 1;
            break;
        }
        if (ss_principal_ok(p))
            fprintf(buf, "%s%s\n", prefix, p);
    }
    sc_release(&handle, m);
    if (fclose(buf) != 0)
        bad = 1;
    if (!bad && outlen)
        bad = fwrite(out, 1, outlen, stdout) != outlen || fflush(stdout) != 0;
    free(out);
    if (bad)
        note(LOG_WARNING, "cache corrupt or output failed: no principals for %s", user);
    return 0;
}
