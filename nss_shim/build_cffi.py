"""cffi (API mode) binding of the cache reader and the NSS entry points.

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

void *malloc(size_t);
void free(void *);
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "step_ssh._native",
    '#include <nss.h>\n#include <stdlib.h>\n#include "cache.h"\n'
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
    "enum nss_status _nss_stepssh_initgroups_dyn(const char *, gid_t, long *, long *, gid_t **, long, int *);\n",
    sources=["nss_shim/cache.c", "nss_shim/nss.c"],  # relative: setuptools runs from the root
    include_dirs=["nss_shim"],
    define_macros=[("STEPSSH_PATH_OVERRIDE", "1")],
    libraries=["z"],
    extra_compile_args=["-O2", "-Wall"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
