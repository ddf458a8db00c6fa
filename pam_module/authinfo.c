/* See authinfo.h.  Why this exists: the principals helper restricts a
 * jump-only user to port forwarding, but sshd also accepts keys from the
 * user's own ~/.ssh/authorized_keys (plain keys, or `cert-authority` lines
 * naming a CA of their own), and those logins carry no restriction.  PAM's
 * account phase cannot tell them apart (sshd fills SSH_AUTH_INFO_0 only for
 * the session), so the session phase checks, and a failed PAM session makes
 * sshd refuse every command and forward.
 *
 * sshd tries TrustedUserCAKeys before authorized_keys, so a certificate
 * signed by a trusted CA whose principals include one of the user's was
 * accepted through the principals helper.  SSH_AUTH_INFO_0 comes from sshd,
 * which has verified the signature; we only read which CA signed and for
 * which principals.  The certificate format is PROTOCOL.certkeys in OpenSSH;
 * every field is bounds-checked. */
#define _GNU_SOURCE
#include "authinfo.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_BLOB 16384

/* ---- base64 ---- */

static int b64val(unsigned char c) {
    if (c >= 'A' && c <= 'Z')
        return c - 'A';
    if (c >= 'a' && c <= 'z')
        return c - 'a' + 26;
    if (c >= '0' && c <= '9')
        return c - '0' + 52;
    if (c == '+')
        return 62;
    if (c == '/')
        return 63;
    return -1;
}

/* Decodes src[0..n) into out (cap bytes); returns the length or -1. */
static long b64decode(const char *src, size_t n, unsigned char *out, size_t cap) {
    uint32_t acc = 0;
    int bits = 0;
    size_t len = 0, pad = 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)src[i];
        if (c == '=') {
            pad++;
            continue;
        }
        int v = b64val(c);
        if (v < 0 || pad)
            return -1;
        acc = (acc << 6) | (uint32_t)v;
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            if (len == cap)
                return -1;
            out[len++] = (unsigned char)(acc >> bits);
        }
    }
    return pad > 2 ? -1 : (long)len;
}

/* ---- SSH wire format ---- */

struct rd {
    const unsigned char *p;
    size_t n;
};

static int get_u32(struct rd *r, uint32_t *v) {
    if (r->n < 4)
        return -1;
    *v = (uint32_t)r->p[0] << 24 | (uint32_t)r->p[1] << 16 | (uint32_t)r->p[2] << 8 | r->p[3];
    r->p += 4;
    r->n -= 4;
    return 0;
}

static int skip(struct rd *r, size_t k) {
    if (r->n < k)
        return -1;
    r->p += k;
    r->n -= k;
    return 0;
}

static int get_str(struct rd *r, const unsigned char **s, size_t *len) {
    uint32_t l;
    if (get_u32(r, &l) != 0 || r->n < l)
        return -1;
    *s = r->p;
    *len = l;
    r->p += l;
    r->n -= l;
    return 0;
}

static int str_is(const unsigned char *s, size_t len, const char *want) {
    return len == strlen(want) && memcmp(s, want, len) == 0;
}

/* Length-prefixed public-key fields between the nonce and the serial. */
static int key_fields(const unsigned char *t, size_t n) {
    static const struct {
        const char *type;
        int fields;
    } types[] = {
        {"ssh-ed25519-cert-v01@openssh.com", 1},
        {"ssh-rsa-cert-v01@openssh.com", 2},
        {"ecdsa-sha2-nistp256-cert-v01@openssh.com", 2},
        {"ecdsa-sha2-nistp384-cert-v01@openssh.com", 2},
        {"ecdsa-sha2-nistp521-cert-v01@openssh.com", 2},
        {"sk-ssh-ed25519-cert-v01@openssh.com", 2},
        {"sk-ecdsa-sha2-nistp256-cert-v01@openssh.com", 3},
        {"ssh-dss-cert-v01@openssh.com", 4},
    };
    for (size_t i = 0; i < sizeof types / sizeof types[0]; i++)
        if (str_is(t, n, types[i].type))
            return types[i].fields;
    return -1;
}

/* Is `key` (a public key blob) one of the CAs in `ca_file`? */
static int trusted_ca(const char *ca_file, const unsigned char *key, size_t keylen) {
    FILE *f = fopen(ca_file, "re");
    if (!f)
        return 0;
    char *line = NULL;
    size_t cap = 0;
    int found = 0;
    unsigned char *blob = malloc(MAX_BLOB);
    while (blob && !found && getline(&line, &cap, f) >= 0) {
        char *save = NULL;
        char *type = strtok_r(line, " \t\r\n", &save);
        if (!type || type[0] == '#')
            continue;
        char *b64 = strtok_r(NULL, " \t\r\n", &save);
        if (!b64)
            continue;
        long n = b64decode(b64, strlen(b64), blob, MAX_BLOB);
        found = n >= 0 && (size_t)n == keylen && memcmp(blob, key, keylen) == 0;
    }
    free(blob);
    free(line);
    fclose(f);
    return found;
}

static int user_has_principal(struct sc_map *m, uint32_t idx, const unsigned char *p, size_t n) {
    for (uint32_t i = 0;; i++) {
        const char *s;
        int r = sc_user_principal(m, idx, i, &s);
        if (r != SC_OK)
            return 0;
        if (str_is(p, n, s))
            return 1;
    }
}

/* One "publickey TYPE BASE64" line. */
static int check_line(const char *line, size_t len, const char *ca_file, struct sc_map *m,
                      uint32_t idx, char *why, size_t whylen) {
    static const char pk[] = "publickey ";
    if (len < sizeof pk - 1 || memcmp(line, pk, sizeof pk - 1) != 0) {
        const char *sp = memchr(line, ' ', len);
        size_t mlen = sp ? (size_t)(sp - line) : len;
        snprintf(why, whylen, "authenticated by %.*s, not by a certificate", (int)(mlen > 40 ? 40 : mlen),
                 line);
        return -1;
    }
    const char *t = line + sizeof pk - 1, *end = line + len;
    const char *sp = memchr(t, ' ', (size_t)(end - t));
    if (!sp) {
        snprintf(why, whylen, "unexpected SSH_AUTH_INFO_0 line");
        return -1;
    }
    const char *b64 = sp + 1, *b64end = memchr(b64, ' ', (size_t)(end - b64));
    if (!b64end)
        b64end = end;
    unsigned char *blob = malloc(MAX_BLOB);
    if (!blob) {
        snprintf(why, whylen, "out of memory");
        return -1;
    }
    int rc = -1;
    long n = b64decode(b64, (size_t)(b64end - b64), blob, MAX_BLOB);
    struct rd r = {blob, n > 0 ? (size_t)n : 0};
    const unsigned char *type, *s, *principals, *sigkey;
    size_t tlen, slen, plen, sklen;
    uint32_t certtype;
    int fields;
    if (n <= 0 || get_str(&r, &type, &tlen) != 0) {
        snprintf(why, whylen, "unreadable key in SSH_AUTH_INFO_0");
        goto out;
    }
    if ((fields = key_fields(type, tlen)) < 0) {
        snprintf(why, whylen, "authenticated by a plain %.*s key, not by a certificate",
                 (int)(tlen > 40 ? 40 : tlen), (const char *)type);
        goto out;
    }
    if (get_str(&r, &s, &slen) != 0) /* nonce */
        goto bad;
    for (int i = 0; i < fields; i++)
        if (get_str(&r, &s, &slen) != 0)
            goto bad;
    if (skip(&r, 8) != 0 || get_u32(&r, &certtype) != 0 || certtype != 1 /* user */ ||
        get_str(&r, &s, &slen) != 0 /* key id */ || get_str(&r, &principals, &plen) != 0 ||
        skip(&r, 16) != 0 /* validity */ || get_str(&r, &s, &slen) != 0 /* critical options */ ||
        get_str(&r, &s, &slen) != 0 /* extensions */ || get_str(&r, &s, &slen) != 0 /* reserved */ ||
        get_str(&r, &sigkey, &sklen) != 0 || get_str(&r, &s, &slen) != 0 /* signature */ || r.n != 0)
        goto bad;
    if (!trusted_ca(ca_file, sigkey, sklen)) {
        snprintf(why, whylen, "certificate is not signed by a CA in %s", ca_file);
        goto out;
    }
    struct rd pr = {principals, plen};
    while (pr.n) {
        const unsigned char *p;
        size_t pl;
        if (get_str(&pr, &p, &pl) != 0)
            goto bad;
        if (user_has_principal(m, idx, p, pl)) {
            rc = 0;
            goto out;
        }
    }
    snprintf(why, whylen, "certificate names none of the user's principals");
    goto out;
bad:
    snprintf(why, whylen, "malformed certificate in SSH_AUTH_INFO_0");
out:
    free(blob);
    return rc;
}

int ss_check_cert_login(const char *auth_info, const char *ca_file, struct sc_map *m, uint32_t idx,
                        char *why, size_t whylen) {
    if (!auth_info || !*auth_info) {
        snprintf(why, whylen, "no SSH_AUTH_INFO_0 from sshd: cannot tell how the user logged in");
        return -1;
    }
    int lines = 0;
    for (const char *p = auth_info; *p;) {
        const char *nl = strchr(p, '\n');
        size_t len = nl ? (size_t)(nl - p) : strlen(p);
        if (len) {
            if (check_line(p, len, ca_file, m, idx, why, whylen) != 0)
                return -1;
            lines++;
        }
        p += len + (nl ? 1 : 0);
    }
    if (!lines) {
        snprintf(why, whylen, "empty SSH_AUTH_INFO_0 from sshd");
        return -1;
    }
    return 0;
}
