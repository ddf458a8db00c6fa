/* pam_stepssh.so: the account and session decisions for managed users.
 * docs/login.md describes the arguments and every decision; in short:
 *
 *   account  local account (in /etc/passwd) or not in the cache → PAM_IGNORE;
 *            managed user → PAM_SUCCESS when the access the service needs is
 *            held, PAM_PERM_DENIED otherwise (also for a stale cache), and
 *            PAM_AUTHINFO_UNAVAIL for a non-local user when the cache cannot
 *            be read.  Denials go to syslog (authpriv) and the audit spool.
 *   session  managed user → home directory created when missing, session
 *            open/close events in the audit spool.  Others → PAM_IGNORE.
 *
 * Arguments:
 *   service=NAME:LEVEL  LEVEL the service NAME needs (repeatable, wins over
 *                       the built-ins).  LEVEL: jump | ssh | sudo | deny | ignore
 *   default=LEVEL       for services not mapped (default: deny)
 *   mode=OCTAL          mode of created homes (default 0700, at most 0777)
 *   skel=DIR            skeleton copied into new homes (default /etc/skel)
 *   nohome              do not create homes
 *   ca_keys=FILE        the CAs sshd trusts (TrustedUserCAKeys), to check how
 *                       jump-only users logged in (default
 *                       /var/lib/step-ssh/trusted-user-ca-keys)
 *   spool=DIR           audit spool directory (default /var/lib/step-ssh/spool)
 *   spool_max=BYTES     spool size limit (default 64 MiB; 0 = unlimited)
 *   noaudit             do not write audit events
 *   debug               log allowed decisions too
 *
 * Built-in services: sshd → jump; sudo, sudo-i → sudo; su, su-l → sudo for
 * the invoking user (PAM_RUSER) and ssh for a managed target. */
#define _GNU_SOURCE
#include <errno.h>
#include <pwd.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <syslog.h>
#include <time.h>
#include <unistd.h>

#include <security/pam_ext.h>
#include <security/pam_modules.h>
#include <security/pam_modutil.h>

#include "audit.h"
#include "authinfo.h"
#include "cache.h"
#include "common.h"
#include "home.h"

#define EXPORT __attribute__((visibility("default")))

enum level { LVL_DENY, LVL_IGNORE, LVL_JUMP, LVL_SSH, LVL_SUDO, LVL_SU, LVL_BAD };

#define MAX_MAP 32

struct cfg {
    int debug, nohome, noaudit;
    mode_t home_mode;
    const char *skel, *spool, *ca_keys;
    unsigned long spool_max;
    int default_level;
    int nmap;
    struct {
        const char *name;
        size_t len;
        int level;
    } map[MAX_MAP];
};

static struct sc_handle handle = SC_HANDLE_INIT(STEPSSH_CACHE_PATH, 1);

/* PAM unloads modules with dlclose: drop our mapping with it. */
__attribute__((destructor)) static void unload(void) { sc_reset(&handle); }

static const char *level_name(int l) {
    static const char *names[] = {"deny", "ignore", "jump", "ssh", "sudo", "su"};
    return l >= 0 && l < LVL_BAD ? names[l] : "?";
}

static int parse_level(const char *s) {
    for (int l = 0; l < LVL_BAD; l++)
        if (l != LVL_SU && strcmp(s, level_name(l)) == 0)
            return l;
    return LVL_BAD;
}

static void parse_args(pam_handle_t *pamh, struct cfg *c, int argc, const char **argv) {
    memset(c, 0, sizeof *c);
    c->home_mode = 0700;
    c->skel = "/etc/skel";
    c->spool = STEPSSH_SPOOL_DIR;
    c->ca_keys = STEPSSH_CA_KEYS;
    c->spool_max = STEPSSH_SPOOL_MAX;
    c->default_level = LVL_DENY;
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "debug") == 0) {
            c->debug = 1;
        } else if (strcmp(a, "nohome") == 0) {
            c->nohome = 1;
        } else if (strcmp(a, "noaudit") == 0) {
            c->noaudit = 1;
        } else if (strncmp(a, "mode=", 5) == 0) {
            char *end;
            errno = 0;
            unsigned long m = strtoul(a + 5, &end, 8);
            if (errno || *end || end == a + 5 || m > 0777)
                pam_syslog(pamh, LOG_ERR, "bad argument %s: want an octal mode up to 0777; using 0700", a);
            else
                c->home_mode = (mode_t)m;
        } else if (strncmp(a, "skel=", 5) == 0) {
            c->skel = a + 5;
        } else if (strncmp(a, "ca_keys=", 8) == 0 && a[8] == '/') {
            c->ca_keys = a + 8;
        } else if (strncmp(a, "spool=", 6) == 0 && a[6] == '/') {
            c->spool = a + 6;
        } else if (strncmp(a, "spool_max=", 10) == 0) {
            char *end;
            errno = 0;
            unsigned long v = strtoul(a + 10, &end, 10);
            if (errno || *end || end == a + 10)
                pam_syslog(pamh, LOG_ERR, "bad argument %s: want a byte count", a);
            else
                c->spool_max = v;
        } else if (strncmp(a, "default=", 8) == 0) {
            int l = parse_level(a + 8);
            if (l == LVL_BAD)
                pam_syslog(pamh, LOG_ERR, "bad argument %s: level is jump|ssh|sudo|deny|ignore", a);
            else
                c->default_level = l;
        } else if (strncmp(a, "service=", 8) == 0) {
            const char *name = a + 8, *colon = strrchr(name, ':');
            int l = colon ? parse_level(colon + 1) : LVL_BAD;
            if (!colon || colon == name || l == LVL_BAD) {
                pam_syslog(pamh, LOG_ERR, "bad argument %s: want service=NAME:jump|ssh|sudo|deny|ignore", a);
            } else if (c->nmap == MAX_MAP) {
                pam_syslog(pamh, LOG_ERR, "too many service= arguments; %s ignored", a);
            } else {
                c->map[c->nmap].name = name;
                c->map[c->nmap].len = (size_t)(colon - name);
                c->map[c->nmap].level = l;
                c->nmap++;
            }
        } else {
            pam_syslog(pamh, LOG_ERR, "unknown argument %s ignored", a);
        }
    }
}

static int service_level(const struct cfg *c, const char *service) {
    if (!service)
        return c->default_level;
    size_t n = strlen(service);
    for (int i = 0; i < c->nmap; i++)
        if (c->map[i].len == n && memcmp(c->map[i].name, service, n) == 0)
            return c->map[i].level;
    if (strcmp(service, "sshd") == 0)
        return LVL_JUMP;
    if (strcmp(service, "sudo") == 0 || strcmp(service, "sudo-i") == 0)
        return LVL_SUDO;
    if (strcmp(service, "su") == 0 || strcmp(service, "su-l") == 0)
        return LVL_SU;
    return c->default_level;
}

static const char *item(pam_handle_t *pamh, int type) {
    const void *v = NULL;
    if (pam_get_item(pamh, type, &v) != PAM_SUCCESS)
        return NULL;
    return v;
}

/* ---- what the cache says about one account ---- */

enum verdict { V_NOT_MANAGED, V_ALLOW, V_DENY, V_UNAVAIL };

struct who {
    const char *user;
    int managed;      /* in the cache, not local */
    uint32_t uid, gid, access;
    uint64_t revision;
    int bastion;
};

/* Looks `user` up: V_NOT_MANAGED, V_UNAVAIL (cannot tell), or V_ALLOW with
 * `w` filled (the caller then decides). `reason` set for V_UNAVAIL. */
static int lookup(pam_handle_t *pamh, const char *user, struct who *w, int *stale, char *reason,
                  size_t rlen) {
    memset(w, 0, sizeof *w);
    w->user = user;
    *stale = 0;
    if (!user || !*user || ss_local_user(user) != 0)
        return V_NOT_MANAGED;
    struct sc_map *m = sc_acquire(&handle);
    if (!m) {
        snprintf(reason, rlen, "cache %s is missing, unreadable or corrupt", STEPSSH_CACHE_PATH);
        return V_UNAVAIL;
    }
    uint32_t idx;
    struct sc_user_rec u;
    int r = sc_user_by_name(m, user, &idx);
    if (r == SC_OK)
        r = sc_user_record(m, idx, &u);
    if (r == SC_NOTFOUND || (r == SC_OK && (u.uid == 0 || u.gid == 0))) {
        sc_release(&handle, m);
        return V_NOT_MANAGED;
    }
    if (r != SC_OK) {
        sc_release(&handle, m);
        snprintf(reason, rlen, "cache %s is corrupt", STEPSSH_CACHE_PATH);
        return V_UNAVAIL;
    }
    const struct sc_header *h = sc_header_of(m);
    time_t now = time(NULL);
    if (sc_is_stale(m, now)) {
        *stale = 1;
        snprintf(reason, rlen, "cache is stale: last confirmed %lld s ago, limit %u s",
                 (long long)(now - h->confirmed_at), h->max_stale);
    }
    w->managed = 1;
    w->uid = u.uid;
    w->gid = u.gid;
    w->access = u.access;
    w->revision = h->revision;
    w->bastion = (h->flags & SC_FLAG_BASTION) != 0;
    sc_release(&handle, m);
    /* A name another NSS source resolves to a different uid is not ours. */
    struct passwd *pw = pam_modutil_getpwnam(pamh, user);
    if (pw && pw->pw_uid != w->uid) {
        w->managed = 0;
        return V_NOT_MANAGED;
    }
    return V_ALLOW;
}

/* Decides whether `user` holds `need`.  Returns a verdict; `reason` is set
 * for V_DENY and V_UNAVAIL. */
static int decide(pam_handle_t *pamh, const char *user, int need, struct who *w, char *reason,
                  size_t rlen) {
    int stale;
    reason[0] = '\0';
    int v = lookup(pamh, user, w, &stale, reason, rlen);
    if (v != V_ALLOW)
        return v;
    if (stale)
        return V_DENY;
    const char *have = ss_access_name(w->access);
    switch (w->access) {
    case SC_ACCESS_SUDO:
        return V_ALLOW;
    case SC_ACCESS_SSH:
        if (need != LVL_SUDO)
            return V_ALLOW;
        snprintf(reason, rlen, "needs 'sudo' access on this host, has '%s'", have);
        return V_DENY;
    case SC_ACCESS_JUMP:
        if (need == LVL_JUMP && w->bastion)
            return V_ALLOW;
        if (need == LVL_JUMP)
            snprintf(reason, rlen, "has 'jump' access, which only a bastion honours");
        else
            snprintf(reason, rlen, "needs '%s' access on this host, has 'jump' (port forwarding "
                     "through a bastion only)", need == LVL_SUDO ? "sudo" : "ssh");
        return V_DENY;
    case SC_ACCESS_NONE:
        snprintf(reason, rlen, "has no access to this host");
        return V_DENY;
    default:
        snprintf(reason, rlen, "unknown access code %u in the cache", w->access);
        return V_DENY;
    }
}

/* ---- audit ---- */

#define SESSION_DATA "stepssh_session_id"

static void free_data(pam_handle_t *pamh, void *data, int status) {
    (void)pamh, (void)status;
    free(data);
}

/* The session id: a ULID made at open_session, kept with the PAM handle for
 * close_session and exported as STEPSSH_SESSION_ID into the session. */
static const char *session_id(pam_handle_t *pamh, char buf[SS_ULID_LEN + 1]) {
    const void *d = NULL;
    if (pam_get_data(pamh, SESSION_DATA, &d) == PAM_SUCCESS && d)
        return d;
    /* sudo / su inside a session: the id that session exported (as trustworthy
     * as the caller's environment; audit_session is the kernel's link) */
    return ss_env_session_id(buf) == 0 ? buf : NULL;
}

static const char *new_session_id(pam_handle_t *pamh) {
    char id[SS_ULID_LEN + 1], env[64];
    ss_ulid(id);
    char *copy = strdup(id);
    if (!copy || pam_set_data(pamh, SESSION_DATA, copy, free_data) != PAM_SUCCESS) {
        free(copy);
        return NULL;
    }
    snprintf(env, sizeof env, "STEPSSH_SESSION_ID=%s", id);
    pam_putenv(pamh, env);
    return copy;
}

struct extra {
    const char *result;    /* success (default), denied, failure */
    const char *reason;
    int home_created;      /* -1: not reported */
    const char *home;      /* home_created events */
};

static void emit(pam_handle_t *pamh, const struct cfg *c, const char *type, const struct who *w,
                 const struct extra *x) {
    if (c->noaudit)
        return;
    struct ss_json j;
    ss_event_begin(&j, type, NULL);
    ss_json_str(&j, "result", x->result ? x->result : "success");
    ss_json_str(&j, "service", item(pamh, PAM_SERVICE));
    ss_json_str(&j, "user", w->user);
    if (w->managed) {
        ss_json_int(&j, "uid", w->uid);
        ss_json_str(&j, "access", ss_access_name(w->access));
        ss_json_int(&j, "revision", (long long)w->revision);
    } else {
        ss_json_str(&j, "uid", NULL);
    }
    ss_json_str(&j, "rhost", item(pamh, PAM_RHOST));
    ss_json_str(&j, "ruser", item(pamh, PAM_RUSER));
    ss_json_str(&j, "tty", item(pamh, PAM_TTY));
    ss_json_int(&j, "pid", getpid());
    char sidbuf[SS_ULID_LEN + 1];
    const char *sid = session_id(pamh, sidbuf);
    if (sid)
        ss_json_str(&j, "session_id", sid);
    long long as = ss_audit_session();
    if (as >= 0)
        ss_json_int(&j, "audit_session", as);
    if (x->reason)
        ss_json_str(&j, "reason", x->reason);
    if (x->home)
        ss_json_str(&j, "home", x->home);
    if (x->home_created >= 0)
        ss_json_bool(&j, "home_created", x->home_created);
    if (ss_json_end(&j) != 0) {
        /* Only attacker-sized rhost/tty values get here: keep the essentials. */
        ss_event_begin(&j, type, NULL);
        ss_json_str(&j, "result", x->result ? x->result : "success");
        ss_json_str(&j, "user", w->user);
        ss_json_bool(&j, "truncated", 1);
        if (ss_json_end(&j) != 0)
            return;
    }
    char why[512];
    if (ss_audit_record(c->spool, c->spool_max, &j, why, sizeof why) != 0)
        pam_syslog(pamh, LOG_ERR, "audit event %s for %s not recorded: %s", type,
                   w->user ? w->user : "?", why);
}

static int deny(pam_handle_t *pamh, const struct cfg *c, int flags, const struct who *w,
                const char *service, const char *reason, int code) {
    const char *rhost = item(pamh, PAM_RHOST);
    pam_syslog(pamh, LOG_NOTICE, "step-ssh: denied %s for %s%s%s: %s", service ? service : "?",
               w->user, rhost ? " from " : "", rhost ? rhost : "", reason);
    struct extra x = {"denied", reason, -1, NULL};
    emit(pamh, c, "login_denied", w, &x);
    if (!(flags & PAM_SILENT))
        pam_error(pamh, "step-ssh: access denied: %s", reason);
    return code;
}

/* ---- entry points ---- */

EXPORT int pam_sm_acct_mgmt(pam_handle_t *pamh, int flags, int argc, const char **argv) {
    struct cfg c;
    parse_args(pamh, &c, argc, argv);
    const char *service = item(pamh, PAM_SERVICE);
    const char *user = NULL;
    if (pam_get_user(pamh, &user, NULL) != PAM_SUCCESS || !user || !*user)
        return PAM_IGNORE;
    int need = service_level(&c, service);
    if (need == LVL_IGNORE)
        return PAM_IGNORE;

    struct who w;
    char reason[256];
    const char *subject = user;
    int v = V_NOT_MANAGED;
    if (need == LVL_SU) {
        /* The person escalating needs sudo (a gate only: a local or unknown
         * invoker passes through); the target, when managed, needs ssh. */
        const char *ruser = item(pamh, PAM_RUSER);
        if (!ruser || !*ruser) {
            struct passwd *pw = pam_modutil_getpwuid(pamh, getuid());
            ruser = pw ? pw->pw_name : NULL;
        }
        if (ruser) {
            v = decide(pamh, ruser, LVL_SUDO, &w, reason, sizeof reason);
            if (v == V_DENY || v == V_UNAVAIL) {
                char r2[sizeof reason + 64];
                snprintf(r2, sizeof r2, "invoking user %.32s: %s", ruser, reason);
                return deny(pamh, &c, flags, &w, service, r2,
                            v == V_DENY ? PAM_PERM_DENIED : PAM_AUTHINFO_UNAVAIL);
            }
        }
        need = LVL_SSH; /* now the target, like any ssh-level service */
    }

    v = decide(pamh, subject, need == LVL_DENY ? LVL_SSH : need, &w, reason, sizeof reason);
    switch (v) {
    case V_NOT_MANAGED:
        return PAM_IGNORE;
    case V_UNAVAIL:
        return deny(pamh, &c, flags, &w, service, reason, PAM_AUTHINFO_UNAVAIL);
    case V_DENY:
        return deny(pamh, &c, flags, &w, service, reason, PAM_PERM_DENIED);
    default:
        break;
    }
    if (need == LVL_DENY) {
        snprintf(reason, sizeof reason, "service %s is not open to managed users (no service= "
                 "mapping)", service ? service : "?");
        return deny(pamh, &c, flags, &w, service, reason, PAM_PERM_DENIED);
    }
    if (c.debug)
        pam_syslog(pamh, LOG_INFO, "step-ssh: allowed %s for %s (access %s, revision %llu)",
                   service ? service : "?", user, ss_access_name(w.access),
                   (unsigned long long)w.revision);
    return PAM_SUCCESS;
}

/* Both session phases: the module arguments, the user, and whether the cache
 * manages them (lookup's V_*; the account phase decided access, here only
 * "is this ours"); -1 when PAM has no user. */
static int session_lookup(pam_handle_t *pamh, int argc, const char **argv, struct cfg *c,
                          const char **user, struct who *w, char *reason, size_t rlen) {
    parse_args(pamh, c, argc, argv);
    *user = NULL;
    if (pam_get_user(pamh, user, NULL) != PAM_SUCCESS || !*user || !**user)
        return -1;
    int stale;
    return lookup(pamh, *user, w, &stale, reason, rlen);
}

EXPORT int pam_sm_open_session(pam_handle_t *pamh, int flags, int argc, const char **argv) {
    (void)flags;
    struct cfg c;
    const char *user;
    struct who w;
    char reason[256];
    int v = session_lookup(pamh, argc, argv, &c, &user, &w, reason, sizeof reason);
    if (v < 0)
        return PAM_IGNORE;
    if (v == V_UNAVAIL || v == V_ALLOW)
        new_session_id(pamh);
    if (v == V_UNAVAIL) { /* not local, maybe ours: record it, create nothing */
        struct extra x = {NULL, reason, 0, NULL};
        emit(pamh, &c, "session_open", &w, &x);
    }
    if (v != V_ALLOW)
        return PAM_IGNORE;
    if (w.access == SC_ACCESS_JUMP) {
        /* Only the fleet certificate's principals line restricts a jump-only
         * user to forwarding; a key of their own would not.  A failed
         * session makes sshd refuse every command and forward. */
        char why[512] = "the user is no longer in the cache";
        struct sc_map *m = sc_acquire(&handle);
        uint32_t idx;
        int ok = m && sc_user_by_name(m, user, &idx) == SC_OK &&
                 ss_check_cert_login(pam_getenv(pamh, "SSH_AUTH_INFO_0"), c.ca_keys, m, idx, why,
                                     sizeof why) == 0;
        if (!m)
            snprintf(why, sizeof why, "cache unavailable");
        sc_release(&handle, m);
        if (!ok) {
            char msg[600];
            snprintf(msg, sizeof msg, "jump-only login not made with a fleet certificate: %s", why);
            pam_syslog(pamh, LOG_NOTICE, "step-ssh: refused session of %s: %s", user, msg);
            struct extra x = {"denied", msg, -1, NULL};
            emit(pamh, &c, "login_denied", &w, &x);
            return PAM_SESSION_ERR;
        }
    }
    int created = 0;
    /* Jump-only users get no shell, so no home either. */
    if (!c.nohome && w.access != SC_ACCESS_JUMP) {
        struct passwd *pw = pam_modutil_getpwnam(pamh, user);
        if (!pw) {
            pam_syslog(pamh, LOG_ERR, "step-ssh: %s is in the cache but NSS does not resolve it "
                       "(is 'stepssh' in /etc/nsswitch.conf?)", user);
            return PAM_SESSION_ERR;
        }
        char why[512], warn[512];
        int r = ss_make_home(pw->pw_dir, pw->pw_uid, pw->pw_gid, c.home_mode, c.skel, why,
                             sizeof why, warn, sizeof warn);
        if (warn[0])
            pam_syslog(pamh, LOG_WARNING, "step-ssh: home of %s: %s", user, warn);
        if (r < 0) {
            pam_syslog(pamh, LOG_ERR, "step-ssh: cannot create the home of %s: %s", user, why);
            struct extra x = {"failure", why, 0, NULL};
            emit(pamh, &c, "session_open", &w, &x);
            return PAM_SESSION_ERR;
        }
        created = r == SS_HOME_CREATED;
        if (created) {
            pam_syslog(pamh, LOG_INFO, "step-ssh: created home %s for %s (mode %04o)", pw->pw_dir,
                       user, (unsigned)c.home_mode);
            struct extra h = {NULL, NULL, -1, pw->pw_dir};
            emit(pamh, &c, "home_created", &w, &h);
        }
    }
    struct extra x = {NULL, NULL, created, NULL};
    emit(pamh, &c, "session_open", &w, &x);
    return PAM_SUCCESS;
}

EXPORT int pam_sm_close_session(pam_handle_t *pamh, int flags, int argc, const char **argv) {
    (void)flags;
    struct cfg c;
    const char *user;
    struct who w;
    char reason[256];
    int v = session_lookup(pamh, argc, argv, &c, &user, &w, reason, sizeof reason);
    if (v < 0 || v == V_NOT_MANAGED)
        return PAM_IGNORE;
    struct extra x = {NULL, v == V_UNAVAIL ? reason : NULL, -1, NULL};
    emit(pamh, &c, "session_close", &w, &x);
    if (v != V_ALLOW)
        return PAM_IGNORE;
    return PAM_SUCCESS;
}

/* Listed in auth or password by mistake: stay out of the way. */
EXPORT int pam_sm_authenticate(pam_handle_t *pamh, int flags, int argc, const char **argv) {
    (void)pamh, (void)flags, (void)argc, (void)argv;
    return PAM_IGNORE;
}

EXPORT int pam_sm_setcred(pam_handle_t *pamh, int flags, int argc, const char **argv) {
    (void)pamh, (void)flags, (void)argc, (void)argv;
    return PAM_IGNORE;
}

EXPORT int pam_sm_chauthtok(pam_handle_t *pamh, int flags, int argc, const char **argv) {
    (void)pamh, (void)flags, (void)argc, (void)argv;
    return PAM_IGNORE;
}
