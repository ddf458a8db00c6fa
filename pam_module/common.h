/* Helpers shared by pam_stepssh.so and step-ssh-principals (docs/login.md). */
#ifndef STEPSSH_LOGIN_COMMON_H
#define STEPSSH_LOGIN_COMMON_H

#include <stddef.h>
#include <stdint.h>

#ifndef STEPSSH_PASSWD_PATH
#define STEPSSH_PASSWD_PATH "/etc/passwd"
#endif

/* Whether `name` has an entry in the host's own passwd file: 1 yes, 0 no,
 * -1 when the file cannot be read (callers treat that like "local": the
 * account is then never ours to grant). Local accounts always win. */
int ss_local_user(const char *name);

/* The access level's name as written in host views ("ssh", "sudo", ...). */
const char *ss_access_name(uint32_t access);

/* A principal safe to print on an authorized_principals line: 1..256 bytes,
 * no whitespace, control characters or commas, not starting with '#'. */
int ss_principal_ok(const char *p);

/* Options prepended to a jump-only user's principals on a bastion: port
 * forwarding only (restrict turns off pty, agent and X11 forwarding and
 * ~/.ssh/rc), and any command or shell request runs this message instead.
 * ssh -J needs local forwards only; `permitlisten` can't say "none", so it
 * names the one listener allowed on a host under the reserved .invalid TLD
 * (RFC 6761: never resolves), which no -R request can ever bind. */
#define SS_JUMP_OPTIONS                                                                  \
    "restrict,port-forwarding,permitlisten=\"no-remote-forwarding.invalid:1\","         \
    "command=\"echo 'step-ssh: this account may only jump through this host (ssh -J)' " \
    ">&2; exit 1\""

#endif
