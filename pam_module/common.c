#define _GNU_SOURCE
#include "common.h"

#include <string.h>

#include "cache.h"

int ss_local_user(const char *name) { return sc_passwd_file_has(STEPSSH_PASSWD_PATH, name); }

const char *ss_access_name(uint32_t access) {
    switch (access) {
    case SC_ACCESS_NONE:
        return "none";
    case SC_ACCESS_SSH:
        return "ssh";
    case SC_ACCESS_SUDO:
        return "sudo";
    case SC_ACCESS_JUMP:
        return "jump";
    default:
        return "unknown";
    }
}

int ss_principal_ok(const char *p) {
    size_t n = strlen(p);
    if (n == 0 || n > 256 || p[0] == '#')
        return 0;
    for (const unsigned char *c = (const unsigned char *)p; *c; c++)
        if (*c <= ' ' || *c == 0x7f || *c == ',')
            return 0;
    return 1;
}
