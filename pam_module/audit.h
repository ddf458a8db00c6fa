/* The local audit spool (docs/audit.md, docs/audit-spool.md): one JSON object
 * per line, appended with a single write() to an O_APPEND file that only root
 * can read.  Shared by pam_stepssh.so, the sudo audit plugin and (through
 * cffi) the agent, so every writer follows the same locking and framing. */
#ifndef STEPSSH_AUDIT_H
#define STEPSSH_AUDIT_H

#include <stddef.h>
#include <stdint.h>

#ifndef STEPSSH_SPOOL_DIR
#define STEPSSH_SPOOL_DIR "/var/lib/step-ssh/spool"
#endif
#define STEPSSH_SPOOL_FILE "events"
#define STEPSSH_DROPPED_FILE "dropped"   /* "COUNT LAST_DROP_UNIX_TIME\n" */
#define STEPSSH_SPOOL_MAX (64ul << 20)   /* bytes; past this, new events are dropped */
#define SS_EVENT_MAX 8192                /* one line, newline included */
#define SS_EVENT_VERSION 2
#define SS_ULID_LEN 26

struct ss_json {
    char buf[SS_EVENT_MAX];
    size_t len;
    int overflow;
};

void ss_json_begin(struct ss_json *j);
/* Adds "key":"value" (value NULL → null), escaping as JSON needs. */
void ss_json_str(struct ss_json *j, const char *key, const char *value);
/* Like ss_json_str, but at most `max` bytes of value; returns 1 when the
 * value was cut there. */
int ss_json_strn(struct ss_json *j, const char *key, const char *value, size_t max);
void ss_json_int(struct ss_json *j, const char *key, long long value);
void ss_json_bool(struct ss_json *j, const char *key, int value);
/* Closes the object and adds the newline; 0 when it fit in SS_EVENT_MAX. */
int ss_json_end(struct ss_json *j);

/* A ULID: 48-bit milliseconds since the epoch, then 80 random bits, in
 * Crockford base32 (26 characters, sortable by time).  `out` gets 27 bytes. */
void ss_ulid(char out[SS_ULID_LEN + 1]);
void ss_ulid_encode(uint64_t ms, const unsigned char rnd[10], char out[SS_ULID_LEN + 1]);
/* 1 when `s` is a well-formed ULID (e.g. a STEPSSH_SESSION_ID from an environment). */
int ss_is_ulid(const char *s);
/* STEPSSH_SESSION_ID from the environment this process was started with
 * (/proc/self/environ: what a caller like sudo cannot have cleaned yet);
 * 0 and `out` set when present and well formed, else -1. */
int ss_env_session_id(char out[SS_ULID_LEN + 1]);

/* Starts an event: {"v":2,"id":ULID,"time":...,"host":...,"type":type.
 * The id is copied to `id_out` when it is not NULL. */
void ss_event_begin(struct ss_json *j, const char *type, char *id_out);

/* The kernel audit session of this process (/proc/self/sessionid), or -1
 * when none is set. */
long long ss_audit_session(void);

/* Appends one finished line (ending in '\n') to DIR/events.  Returns 0, or -1
 * with a reason in `why` (spool full, unsafe directory, write error).  A
 * full spool drops the event and counts it in DIR/dropped. */
int ss_spool_append_raw(const char *dir, unsigned long max_bytes, const char *line, size_t len,
                        char *why, size_t whylen);
int ss_spool_append(const char *dir, unsigned long max_bytes, const struct ss_json *j, char *why,
                    size_t whylen);
/* Several whole lines with one write and one fdatasync (the agent's own
 * events); all or nothing against the limit. */
int ss_spool_append_lines(const char *dir, unsigned long max_bytes, const char *lines, size_t len,
                          char *why, size_t whylen);

/* Sends one line to the system log (/dev/log, facility authpriv, tag
 * "step-ssh-audit"), without blocking; best effort. */
void ss_syslog_line(const char *line, size_t len);

/* Append + system log: what every writer does with a finished event. */
int ss_audit_record(const char *dir, unsigned long max_bytes, const struct ss_json *j, char *why,
                    size_t whylen);

#endif
