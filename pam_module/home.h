/* Home directory creation for managed users (docs/login.md, "Home directories"). */
#ifndef STEPSSH_HOME_H
#define STEPSSH_HOME_H

#include <stddef.h>
#include <sys/types.h>

#define SS_HOME_EXISTS 0
#define SS_HOME_CREATED 1

/* Creates `path` for uid:gid when nothing exists there, populated from
 * `skel` (NULL or missing: empty), finally owned by uid:gid with `mode`.
 * Never follows a symlink it did not verify and never changes anything that
 * already exists.  Returns SS_HOME_EXISTS, SS_HOME_CREATED, or -1 with a
 * reason in `why`.  `warn` (may be empty) notes a suspicious existing home. */
int ss_make_home(const char *path, uid_t uid, gid_t gid, mode_t mode, const char *skel, char *why,
                 size_t whylen, char *warn, size_t warnlen);

#endif
