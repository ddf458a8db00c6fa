/* Checking how a jump-only user authenticated on a bastion (docs/login.md,
 * "Bastions"), from sshd's SSH_AUTH_INFO_0 in the PAM session phase. */
#ifndef STEPSSH_AUTHINFO_H
#define STEPSSH_AUTHINFO_H

#include <stddef.h>

#include "cache.h"

#ifndef STEPSSH_CA_KEYS
#define STEPSSH_CA_KEYS "/var/lib/step-ssh/trusted-user-ca-keys"
#endif

/* 0 when every method in `auth_info` is a public-key login with a user
 * certificate signed by a CA listed in `ca_file` and naming at least one of
 * the user's cached principals (so sshd accepted it through
 * TrustedUserCAKeys and the principals helper, whose forwarding-only options
 * then apply).  Otherwise -1 with the reason in `why`. */
int ss_check_cert_login(const char *auth_info, const char *ca_file, struct sc_map *m, uint32_t idx,
                        char *why, size_t whylen);

#endif
