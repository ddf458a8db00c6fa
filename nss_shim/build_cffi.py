"""cffi (API mode) binding of the cache reader, the NSS entry points and the
audit spool writer (pam_module/audit.c: the agent appends its own events with
the code the PAM module and the sudo plugin use).

The extension compiles the very sources of libnss_stepssh.so.2, plus a path
override that the module glibc loads does not have, so the CLI and the tests
run the same C code glibc does against any cache file.
"""

from cffi import FFI


CDEF = """
typedef unsigned int uid_t;
typedef unsigned int gid_t;
typedef long time_t;
struct passwd { char *pw_name; char *pw_passwd; uid_t pw_uid; gid_t pw_gid;
                char *pw_gecos; char *pw_dir; char *pw_shell; };
struct group { char *gr_name; char *gr_passwd; gid_t gr_gid; char **gr_mem; };

static const int NSS_STATUS_TRYAGAIN, NSS_STATUS_UNAVAIL, NSS_STATUS_NOTFOUND,
                 NSS_STATUS_SUCCESS;
static const int SC_OK, SC_NOTFOUND, SC_UNAVAIL, SC_ERANGE;

void stepssh_nss_set_path(const char *path, int require_root_owner);
int _nss_stepssh_getpwnam_r(const char *, struct passwd *, char *, size_t, int *);
int _nss_stepssh_getpwuid_r(uid_t, struct passwd *, char *, size_t, int *);
int _nss_stepssh_getgrnam_r(const char *, struct group *, char *, size_t, int *);
int _nss_stepssh_getgrgid_r(gid_t, struct group *, char *, size_t, int *);
int _nss_stepssh_setpwent(int);
int _nss_stepssh_getpwent_r(struct passwd *, char *, size_t, int *);
int _nss_stepssh_endpwent(void);
int _nss_stepssh_setgrent(int);
int _nss_stepssh_getgrent_r(struct group *, char *, size_t, int *);
int _nss_stepssh_endgrent(void);
int _nss_stepssh_initgroups_dyn(const char *, gid_t, long *, long *, gid_t **, long, int *);

struct sc_map;
struct sc_map *sc_open_path(const char *path, int require_root_owner, int *err);
void sc_close(struct sc_map *m);
int sc_verify_all(struct sc_map *m);
int sc_is_stale(const struct sc_map *m, time_t now);
int sc_user_by_name(struct sc_map *m, const char *name, uint32_t *idx);
int sc_user_principal(struct sc_map *m, uint32_t idx, uint32_t i, const char **out);

/* pam_module/audit.c */
#define SS_EVENT_MAX ...
#define SS_ULID_LEN ...
struct ss_json { char buf[...]; size_t len; int overflow; };
void ss_json_begin(struct ss_json *j);
void ss_json_str(struct ss_json *j, const char *key, const char *value);
void ss_json_int(struct ss_json *j, const char *key, long long value);
void ss_json_bool(struct ss_json *j, const char *key, int value);
int ss_json_end(struct ss_json *j);
void ss_ulid(char *out);
void ss_ulid_encode(uint64_t ms, const unsigned char *rnd, char *out);
void ss_event_begin(struct ss_json *j, const char *type, char *id_out);
long long ss_audit_session(void);
int ss_spool_append_raw(const char *dir, unsigned long max_bytes, const char *line, size_t len,
                        char *why, size_t whylen);
int ss_spool_append(const char *dir, unsigned long max_bytes, const struct ss_json *j, char *why,
                    size_t whylen);
int ss_spool_append_lines(const char *dir, unsigned long max_bytes, const char *lines, size_t len,
                          char *why, size_t whylen);
void ss_syslog_line(const char *line, size_t len);
int ss_audit_record(const char *dir, unsigned long max_bytes, const struct ss_json *j, char *why,
                    size_t whylen);
/* the access a cache gives `name`: 0..3, or -1 when not in it */
int stepssh_user_access(struct sc_map *m, const char *name);
uint32_t stepssh_n_users(struct sc_map *m);
/* name of user record idx into buf; 0 or -1 */
int stepssh_user_name_at(struct sc_map *m, uint32_t idx, char *buf, size_t len);

void *malloc(size_t);
void free(void *);
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "step_ssh._native",
    '#include <nss.h>\n#include <pwd.h>\n#include <stdlib.h>\n#include <string.h>\n#include "cache.h"\n#include "audit.h"\n'
    "void stepssh_nss_set_path(const char *path, int require_root_owner);\n"
    "enum nss_status _nss_stepssh_getpwnam_r(const char *, struct passwd *, char *, size_t, int *);\n"
    "enum nss_status _nss_stepssh_getpwuid_r(uid_t, struct passwd *, char *, size_t, int *);\n"
    "enum nss_status _nss_stepssh_getgrnam_r(const char *, struct group *, char *, size_t, int *);\n"
    "enum nss_status _nss_stepssh_getgrgid_r(gid_t, struct group *, char *, size_t, int *);\n"
    "enum nss_status _nss_stepssh_setpwent(int);\n"
    "enum nss_status _nss_stepssh_getpwent_r(struct passwd *, char *, size_t, int *);\n"
    "enum nss_status _nss_stepssh_endpwent(void);\n"
    "enum nss_status _nss_stepssh_setgrent(int);\n"
    "enum nss_status _nss_stepssh_getgrent_r(struct group *, char *, size_t, int *);\n"
    "enum nss_status _nss_stepssh_endgrent(void);\n"
    "enum nss_status _nss_stepssh_initgroups_dyn(const char *, gid_t, long *, long *, gid_t **, long, int *);\n"
    "int stepssh_user_access(struct sc_map *m, const char *name) {\n"
    "    uint32_t idx; struct sc_user_rec u;\n"
    "    if (sc_user_by_name(m, name, &idx) != SC_OK || sc_user_record(m, idx, &u) != SC_OK) return -1;\n"
    "    return (int)u.access;\n"
    "}\n"
    "uint32_t stepssh_n_users(struct sc_map *m) { return sc_header_of(m)->n_users; }\n"
    "int stepssh_user_name_at(struct sc_map *m, uint32_t idx, char *buf, size_t len) {\n"
    "    struct passwd pw; char tmp[4096];\n"
    "    if (sc_fill_passwd(m, idx, &pw, tmp, sizeof tmp) != SC_OK) return -1;\n"
    "    if (strlen(pw.pw_name) >= len) return -1;\n"
    "    strcpy(buf, pw.pw_name); return 0;\n"
    "}\n",
    sources=["nss_shim/cache.c", "nss_shim/nss.c", "pam_module/audit.c"],  # relative: setuptools runs from the root
    include_dirs=["nss_shim", "pam_module"],
    define_macros=[("STEPSSH_PATH_OVERRIDE", "1")],
    libraries=["z"],
    extra_compile_args=["-O2", "-Wall"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
