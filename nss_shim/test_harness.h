/* For the C test harnesses (tests/c/hostile_main.c, nss_shim/fuzz_cache.c):
 * the NSS entry points they call directly, and test_harness.c's stand-ins. */
#ifndef STEPSSH_TEST_HARNESS_H
#define STEPSSH_TEST_HARNESS_H

#include <grp.h>
#include <nss.h>
#include <pwd.h>
#include <stddef.h>
#include <sys/types.h>

void stepssh_nss_set_path(const char *path, int require_root_owner);
enum nss_status _nss_stepssh_getpwnam_r(const char *, struct passwd *, char *, size_t, int *);
enum nss_status _nss_stepssh_getpwuid_r(uid_t, struct passwd *, char *, size_t, int *);
enum nss_status _nss_stepssh_getgrnam_r(const char *, struct group *, char *, size_t, int *);
enum nss_status _nss_stepssh_getgrgid_r(gid_t, struct group *, char *, size_t, int *);
enum nss_status _nss_stepssh_setpwent(int);
enum nss_status _nss_stepssh_getpwent_r(struct passwd *, char *, size_t, int *);
enum nss_status _nss_stepssh_endpwent(void);
enum nss_status _nss_stepssh_setgrent(int);
enum nss_status _nss_stepssh_getgrent_r(struct group *, char *, size_t, int *);
enum nss_status _nss_stepssh_endgrent(void);
enum nss_status _nss_stepssh_initgroups_dyn(const char *, gid_t, long int *, long int *, gid_t **,
                                            long int, int *);

#endif
