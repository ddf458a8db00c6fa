/* stepssh_sudo_audit.so: a sudo (1.9+) audit plugin that records every sudo
 * command sudo accepts or rejects in the step-ssh audit spool (docs/audit.md).
 *
 *   /etc/sudo.conf:
 *     Plugin stepssh_audit /usr/lib/step-ssh/stepssh_sudo_audit.so [spool=DIR] [spool_max=BYTES]
 *
 * sudo calls the audit plugin itself, with the policy's decision, the command
 * line it will run (argv, resolved path), the invoking user, their working
 * directory and terminal, and the target user — no parsing of sudo's log.
 * Events are written by the sudo process (still euid 0) with the same code as
 * pam_stepssh.so: one durable line per event, and a copy to the system log.
 *
 * When the command ends, audit_close records a `sudo_exit` event with its exit
 * status (or signal) and duration, linked to the `sudo` event by `sudo_id`.
 * sudo calls close() for every audit plugin that has one: having it also
 * keeps sudo from exec'ing the command in place of itself.
 *
 * Fail-open: an event that cannot be recorded is reported to syslog, and the
 * command still runs (an audit outage must not lock administrators out).  A
 * sudoers Defaults option can't turn this plugin off; only sudo.conf can. */
#define _GNU_SOURCE
#include <errno.h>
#include <pwd.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <syslog.h>
#include <time.h>
#include <unistd.h>

#include <sudo_plugin.h>

#include "audit.h"

#ifndef STEPSSH_VERSION
#define STEPSSH_VERSION "0"
#endif
#define EXPORT __attribute__((visibility("default")))
#define CMD_MAX 4000 /* bytes of command line kept in an event */
#define SUDO_EXIT_CMD_MAX 1024 /* sudo_exit repeats the command, shorter: sudo_id links the full one */

static struct {
    char spool[1024];
    unsigned long spool_max;
    sudo_printf_t say; /* sudo's printf, for show_version */
    char user[256], cwd[2048], tty[256], progname[64], runas_user[256], session_id[SS_ULID_LEN + 1];
    long long uid;
    char submitted[CMD_MAX + 64]; /* the command as typed (after sudo's options) */
    int submitted_cut;
    char *const *argv;            /* sudo's own argv from the command on (lives as long as sudo) */
    /* set when the command was accepted: what sudo_exit repeats */
    char accepted_id[SS_ULID_LEN + 1], command[CMD_MAX + 64], target[256];
    int command_cut;
    struct timespec started;      /* CLOCK_MONOTONIC at accept */
} st;

static void copy(char *dst, size_t n, const char *src) {
    snprintf(dst, n, "%s", src ? src : "");
}

static const char *find(char *const v[], const char *name) {
    size_t n = strlen(name);
    for (; v && *v; v++)
        if (strncmp(*v, name, n) == 0 && (*v)[n] == '=')
            return *v + n + 1;
    return NULL;
}

/* Appends `a` to out[0..*len) as a word a shell would read back: plain words
 * as they are, the rest in single quotes.  Returns 1 when it does not fit. */
static int add_word(char *out, size_t n, size_t *len, const char *a) {
    int plain = *a != '\0' && strspn(a, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
                                       "0123456789_@%+=:,./-") == strlen(a);
    size_t need = (*len ? 1 : 0) + (plain ? 0 : 2);
    for (const char *c = a; *c; c++)
        need += (*c == '\'' && !plain) ? 4 : 1;
    if (*len + need >= n)
        return 1;
    char *o = out + *len;
    if (*len)
        *o++ = ' ';
    if (!plain)
        *o++ = '\'';
    for (const char *c = a; *c; c++) {
        if (*c == '\'' && !plain) {
            memcpy(o, "'\\''", 4);
            o += 4;
        } else {
            *o++ = *c;
        }
    }
    if (!plain)
        *o++ = '\'';
    *o = '\0';
    *len = (size_t)(o - out);
    return 0;
}

/* `first` (if any) then argv, as one shell-readable line; 1 when cut short. */
static int join(char *out, size_t n, const char *first, char *const argv[]) {
    size_t len = 0;
    out[0] = '\0';
    if (first && add_word(out, n, &len, first))
        return 1;
    for (; argv && *argv; argv++)
        if (add_word(out, n, &len, *argv))
            return 1;
    return 0;
}

/* Who ran sudo, from where, as whom: the same on `sudo` and `sudo_exit`. */
static void common_fields(struct ss_json *j, const char *target) {
    ss_json_str(j, "service", st.progname[0] ? st.progname : "sudo");
    ss_json_str(j, "user", st.user);
    if (st.uid >= 0)
        ss_json_int(j, "uid", st.uid);
    ss_json_str(j, "tty", st.tty[0] ? st.tty : NULL);
    ss_json_int(j, "pid", getpid());
    if (st.session_id[0])
        ss_json_str(j, "session_id", st.session_id);
    long long as = ss_audit_session();
    if (as >= 0)
        ss_json_int(j, "audit_session", as);
    ss_json_str(j, "target_user", target);
}

static void append(const struct ss_json *j, const char *type) {
    char why[512];
    if (ss_audit_record(st.spool, st.spool_max, j, why, sizeof why) != 0)
        syslog(LOG_AUTHPRIV | LOG_ERR, "step-ssh: audit event %s for %s not recorded: %s", type, st.user, why);
}

static void record(const char *result, const char *reason, char *const command_info[],
                   char *const run_argv[]) {
    struct ss_json j;
    char cmd[CMD_MAX + 64];
    int cut;
    const char *path = find(command_info, "command");
    if (run_argv && run_argv[0]) {
        /* what runs: the resolved path, then the arguments */
        cut = join(cmd, sizeof cmd, path ? path : run_argv[0], run_argv + 1);
    } else if (path && st.argv && st.argv[0]) {
        /* refused: the path the policy resolved, with the arguments as typed */
        cut = join(cmd, sizeof cmd, path, st.argv + 1);
    } else {
        copy(cmd, sizeof cmd, st.submitted);
        cut = st.submitted_cut;
    }
    const char *target = find(command_info, "runas_user");
    char tname[256] = "";
    if (!target) {
        const char *tuid = find(command_info, "runas_euid");
        if (!tuid)
            tuid = find(command_info, "runas_uid");
        if (tuid) {
            struct passwd pw, *res = NULL;
            char buf[4096];
            if (getpwuid_r((uid_t)strtoul(tuid, NULL, 10), &pw, buf, sizeof buf, &res) == 0 && res)
                copy(tname, sizeof tname, res->pw_name);
            else
                copy(tname, sizeof tname, tuid);
            target = tname;
        } else if (st.runas_user[0]) {
            target = st.runas_user;
        }
    }
    const char *run_cwd = find(command_info, "cwd");
    char id[SS_ULID_LEN + 1];
    ss_event_begin(&j, "sudo", id);
    ss_json_str(&j, "result", result);
    common_fields(&j, target);
    ss_json_strn(&j, "cwd", st.cwd, 1024);
    if (run_cwd && strcmp(run_cwd, st.cwd) != 0)
        ss_json_strn(&j, "run_cwd", run_cwd, 1024);
    if (ss_json_strn(&j, "command", cmd, CMD_MAX) || cut)
        ss_json_bool(&j, "truncated", 1);
    if (reason)
        ss_json_strn(&j, "reason", reason, 512);
    if (ss_json_end(&j) != 0) { /* too long once escaped: the essentials, under a new id */
        ss_event_begin(&j, "sudo", id);
        ss_json_str(&j, "result", result);
        ss_json_str(&j, "user", st.user);
        ss_json_str(&j, "target_user", target);
        ss_json_bool(&j, "truncated", 1);
        if (ss_json_end(&j) != 0)
            return;
    }
    if (strcmp(result, "success") == 0) { /* what sudo_exit repeats, with the id written */
        copy(st.accepted_id, sizeof st.accepted_id, id);
        copy(st.command, sizeof st.command, cmd);
        st.command_cut = cut;
        copy(st.target, sizeof st.target, target);
        clock_gettime(CLOCK_MONOTONIC, &st.started);
    }
    append(&j, "sudo");
}

static int audit_open(unsigned int version, sudo_conv_t conversation, sudo_printf_t plugin_printf,
                      char *const settings[], char *const user_info[], int submit_optind,
                      char *const submit_argv[], char *const submit_envp[], char *const plugin_options[],
                      const char **errstr) {
    (void)version, (void)conversation, (void)errstr;
    memset(&st, 0, sizeof st);
    st.say = plugin_printf;
    copy(st.spool, sizeof st.spool, STEPSSH_SPOOL_DIR);
    st.spool_max = STEPSSH_SPOOL_MAX;
    for (char *const *o = plugin_options; o && *o; o++) {
        if (strncmp(*o, "spool=", 6) == 0 && (*o)[6] == '/') {
            copy(st.spool, sizeof st.spool, *o + 6);
        } else if (strncmp(*o, "spool_max=", 10) == 0) {
            char *end;
            errno = 0;
            unsigned long v = strtoul(*o + 10, &end, 10);
            if (!errno && *end == '\0' && end != *o + 10)
                st.spool_max = v;
            else
                syslog(LOG_AUTHPRIV | LOG_ERR, "step-ssh audit plugin: bad argument %s ignored", *o);
        } else {
            syslog(LOG_AUTHPRIV | LOG_ERR, "step-ssh audit plugin: unknown argument %s ignored", *o);
        }
    }
    copy(st.user, sizeof st.user, find(user_info, "user"));
    copy(st.cwd, sizeof st.cwd, find(user_info, "cwd"));
    copy(st.tty, sizeof st.tty, find(user_info, "tty"));
    const char *uid = find(user_info, "uid");
    st.uid = uid ? strtoll(uid, NULL, 10) : -1;
    copy(st.progname, sizeof st.progname, find(settings, "progname"));
    copy(st.runas_user, sizeof st.runas_user, find(settings, "runas_user"));
    const char *sid = find(submit_envp, "STEPSSH_SESSION_ID");
    if (ss_is_ulid(sid))
        copy(st.session_id, sizeof st.session_id, sid);
    if (submit_argv && submit_optind >= 0) {
        int n = 0;
        while (submit_argv[n])
            n++;
        if (submit_optind < n) {
            st.argv = submit_argv + submit_optind;
            st.submitted_cut = join(st.submitted, sizeof st.submitted, NULL, st.argv);
        }
    }
    return 1; /* never stop sudo because of auditing */
}

static const char *signal_name(int sig) {
#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 32))
    return sigabbrev_np(sig); /* "TERM", "KILL", ... */
#else
    (void)sig;
    return NULL;
#endif
}

/* How the command ended, as sudo_exit reports it. */
struct outcome {
    const char *result;
    int exit_status, signal; /* -1: not applicable */
    char reason[256];
};

static void outcome_of(int status_type, int status, struct outcome *o) {
    o->result = "failure";
    o->exit_status = o->signal = -1;
    o->reason[0] = '\0';
    if (status_type == SUDO_PLUGIN_WAIT_STATUS && WIFEXITED(status)) {
        o->exit_status = WEXITSTATUS(status);
        if (o->exit_status == 0)
            o->result = "success";
    } else if (status_type == SUDO_PLUGIN_WAIT_STATUS && WIFSIGNALED(status)) {
        const char *name = signal_name(WTERMSIG(status));
        o->signal = WTERMSIG(status);
        if (name)
            snprintf(o->reason, sizeof o->reason, "killed by SIG%s%s", name, WCOREDUMP(status) ? " (core dumped)" : "");
        else
            snprintf(o->reason, sizeof o->reason, "killed by signal %d%s", o->signal,
                     WCOREDUMP(status) ? " (core dumped)" : "");
    } else if (status_type == SUDO_PLUGIN_EXEC_ERROR || status_type == SUDO_PLUGIN_SUDO_ERROR) {
        snprintf(o->reason, sizeof o->reason, "%s: %s",
                 status_type == SUDO_PLUGIN_EXEC_ERROR ? "the command could not be run" : "sudo failed",
                 strerror(status));
    } else {
        copy(o->reason, sizeof o->reason, "sudo reported no exit status");
    }
}

static void outcome_fields(struct ss_json *j, const struct outcome *o) {
    ss_json_str(j, "result", o->result);
    if (o->exit_status >= 0)
        ss_json_int(j, "exit_status", o->exit_status);
    if (o->signal >= 0)
        ss_json_int(j, "signal", o->signal);
    ss_json_str(j, "sudo_id", st.accepted_id);
    if (o->reason[0])
        ss_json_str(j, "reason", o->reason);
}

/* The accepted command has ended (or could not be started): one `sudo_exit`. */
static void audit_close(int status_type, int status) {
    if (!st.accepted_id[0])
        return; /* nothing ran: rejected, sudo -l, sudo -v, ... */
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    long long ms = (long long)(now.tv_sec - st.started.tv_sec) * 1000 + (now.tv_nsec - st.started.tv_nsec) / 1000000;
    struct outcome o;
    outcome_of(status_type, status, &o);
    const char *target = st.target[0] ? st.target : NULL;
    struct ss_json j;
    ss_event_begin(&j, "sudo_exit", NULL);
    outcome_fields(&j, &o);
    common_fields(&j, target);
    if (ss_json_strn(&j, "command", st.command, SUDO_EXIT_CMD_MAX) || st.command_cut)
        ss_json_bool(&j, "truncated", 1);
    ss_json_int(&j, "duration_ms", ms < 0 ? 0 : ms);
    if (ss_json_end(&j) != 0) { /* too long once escaped: the essentials */
        ss_event_begin(&j, "sudo_exit", NULL);
        outcome_fields(&j, &o);
        ss_json_str(&j, "user", st.user);
        ss_json_str(&j, "target_user", target);
        ss_json_bool(&j, "truncated", 1);
        if (ss_json_end(&j) != 0) {
            syslog(LOG_AUTHPRIV | LOG_ERR, "step-ssh: audit event sudo_exit for %s not recorded: too long", st.user);
            return;
        }
    }
    append(&j, "sudo_exit");
    st.accepted_id[0] = '\0';
}

static int audit_accept(const char *plugin_name, unsigned int plugin_type, char *const command_info[],
                        char *const run_argv[], char *const run_envp[], const char **errstr) {
    (void)plugin_name, (void)run_envp, (void)errstr;
    /* Called once per accepting plugin and once for the front end: the
     * front end's call is the final word (every policy and approval plugin
     * said yes). */
    if (plugin_type == SUDO_FRONT_END)
        record("success", NULL, command_info, run_argv);
    return 1;
}

/* A policy or approval plugin said no (`denied`) or failed (`failure`): sudo's
 * message, and which plugin, as the reason. */
static void record_refusal(const char *result, const char *fallback, const char *plugin_name,
                           const char *audit_msg, char *const command_info[]) {
    char reason[512];
    snprintf(reason, sizeof reason, "%s%s%s%s", audit_msg ? audit_msg : fallback, plugin_name ? " (" : "",
             plugin_name ? plugin_name : "", plugin_name ? ")" : "");
    record(result, reason, command_info, NULL);
}

static int audit_reject(const char *plugin_name, unsigned int plugin_type, const char *audit_msg,
                        char *const command_info[], const char **errstr) {
    (void)plugin_type, (void)errstr;
    record_refusal("denied", "rejected", plugin_name, audit_msg, command_info);
    return 1;
}

static int audit_error(const char *plugin_name, unsigned int plugin_type, const char *audit_msg,
                       char *const command_info[], const char **errstr) {
    (void)plugin_type, (void)errstr;
    record_refusal("failure", "error", plugin_name, audit_msg, command_info);
    return 1;
}

static int audit_show_version(int verbose) {
    if (st.say)
        st.say(SUDO_CONV_INFO_MSG, "step-ssh audit plugin version %s%s%s\n", STEPSSH_VERSION,
                  verbose ? ", spool " : "", verbose ? st.spool : "");
    return 1;
}

EXPORT struct audit_plugin stepssh_audit = {
    SUDO_AUDIT_PLUGIN,
    SUDO_API_VERSION,
    audit_open,
    audit_close,
    audit_accept,
    audit_reject,
    audit_error,
    audit_show_version,
    NULL, /* register_hooks */
    NULL, /* deregister_hooks */
    NULL, /* event_alloc */
};
