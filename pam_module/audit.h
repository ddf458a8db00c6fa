/* The local audit spool (docs/audit-spool.md): one JSON object per line,
 * appended with a single write() to an O_APPEND file that only root can read. */
#ifndef STEPSSH_AUDIT_H
#define STEPSSH_AUDIT_H

#include <stddef.h>
#include <stdint.h>

#ifndef STEPSSH_SPOOL_DIR
#define STEPSSH_SPOOL_DIR "/var/lib/step-ssh/spool"
#endif
#define STEPSSH_SPOOL_FILE "events"
#define STEPSSH_SPOOL_MAX (64ul << 20) /* bytes; past this, new events are dropped */
#define SS_EVENT_MAX 4096              /* one line, newline included */

struct ss_json {
    char buf[SS_EVENT_MAX];
    size_t len;
    int overflow;
};

void ss_json_begin(struct ss_json *j);
/* Adds "key":"value" (value NULL → null), escaping as JSON needs. */
void ss_json_str(struct ss_json *j, const char *key, const char *value);
void ss_json_int(struct ss_json *j, const char *key, long long value);
void ss_json_bool(struct ss_json *j, const char *key, int value);
/* Closes the object and adds the newline; 0 when it fit in SS_EVENT_MAX. */
int ss_json_end(struct ss_json *j);

/* Starts an event: {"v":1,"id":...,"time":...,"type":type. */
void ss_event_begin(struct ss_json *j, const char *type);

/* Appends one finished event to DIR/events.  Returns 0, or -1 with a reason
 * in `why` (spool full, unsafe directory, write error). */
int ss_spool_append(const char *dir, unsigned long max_bytes, const struct ss_json *j, char *why,
                    size_t whylen);

#endif
