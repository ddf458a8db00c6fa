"""Python face of the C reader: the same code glibc loads, via cffi.

`NssClient` calls the NSS entry points exactly as glibc would (including the
ERANGE / TRYAGAIN buffer negotiation), against any cache path.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from step_ssh._native import ffi, lib

ERANGE = 34


class Unavailable(RuntimeError):
    """The cache is missing, unreadable, or failed validation."""


@dataclass(frozen=True)
class Passwd:
    name: str
    passwd: str
    uid: int
    gid: int
    gecos: str
    home: str
    shell: str

    def line(self) -> str:
        return f"{self.name}:{self.passwd}:{self.uid}:{self.gid}:{self.gecos}:{self.home}:{self.shell}"


@dataclass(frozen=True)
class Group:
    name: str
    passwd: str
    gid: int
    members: tuple[str, ...]

    def line(self) -> str:
        return f"{self.name}:{self.passwd}:{self.gid}:{','.join(self.members)}"


def _s(p) -> str:
    return ffi.string(p).decode("utf-8", "replace")


def _passwd(pw) -> Passwd:
    return Passwd(_s(pw.pw_name), _s(pw.pw_passwd), pw.pw_uid, pw.pw_gid, _s(pw.pw_gecos),
                  _s(pw.pw_dir), _s(pw.pw_shell))


def _group(gr) -> Group:
    mem = []
    i = 0
    while gr.gr_mem[i] != ffi.NULL:
        mem.append(_s(gr.gr_mem[i]))
        i += 1
    return Group(_s(gr.gr_name), _s(gr.gr_passwd), gr.gr_gid, tuple(mem))


# The extension has one process-wide handle; serialize path switches with calls.
_lock = threading.RLock()


class NssClient:
    """Calls _nss_stepssh_* against `path` with glibc's buffer-growing protocol."""

    def __init__(self, path: str | Path, require_root_owner: bool = False, bufsize: int = 1024):
        self.path = str(path)
        self._cpath = ffi.new("char[]", self.path.encode())
        self.secure = int(require_root_owner)
        self.bufsize = bufsize

    def _select(self) -> None:
        lib.stepssh_nss_set_path(self._cpath, self.secure)

    def _call(self, fn, key, out, max_buf: int = 1 << 26):
        size = self.bufsize
        err = ffi.new("int *")
        while True:
            buf = ffi.new("char[]", size)
            st = fn(key, out, buf, size, err)
            if st == lib.NSS_STATUS_TRYAGAIN and err[0] == ERANGE and size < max_buf:
                size *= 2
                continue
            if st == lib.NSS_STATUS_SUCCESS:
                return buf  # keep alive while `out` is read
            if st == lib.NSS_STATUS_NOTFOUND:
                return None
            raise Unavailable(f"cache {self.path} is unavailable (missing, unreadable or corrupt)")

    def getpwnam(self, name: str) -> Optional[Passwd]:
        with _lock:
            self._select()
            pw = ffi.new("struct passwd *")
            return _passwd(pw) if self._call(lib._nss_stepssh_getpwnam_r, name.encode(), pw) else None

    def getpwuid(self, uid: int) -> Optional[Passwd]:
        with _lock:
            self._select()
            pw = ffi.new("struct passwd *")
            return _passwd(pw) if self._call(lib._nss_stepssh_getpwuid_r, uid, pw) else None

    def getgrnam(self, name: str) -> Optional[Group]:
        with _lock:
            self._select()
            gr = ffi.new("struct group *")
            return _group(gr) if self._call(lib._nss_stepssh_getgrnam_r, name.encode(), gr) else None

    def getgrgid(self, gid: int) -> Optional[Group]:
        with _lock:
            self._select()
            gr = ffi.new("struct group *")
            return _group(gr) if self._call(lib._nss_stepssh_getgrgid_r, gid, gr) else None

    def _enumerate(self, setent, getent, endent, ctype, conv) -> Iterator:
        with _lock:
            self._select()
            setent(0)
            try:
                out = ffi.new(ctype)
                wrapped = lambda _k, o, b, n, e: getent(o, b, n, e)  # noqa: E731
                while self._call(wrapped, None, out) is not None:
                    yield conv(out)
            finally:
                endent()

    def passwd_entries(self) -> list[Passwd]:
        return list(self._enumerate(lib._nss_stepssh_setpwent, lib._nss_stepssh_getpwent_r,
                                    lib._nss_stepssh_endpwent, "struct passwd *", _passwd))

    def group_entries(self) -> list[Group]:
        return list(self._enumerate(lib._nss_stepssh_setgrent, lib._nss_stepssh_getgrent_r,
                                    lib._nss_stepssh_endgrent, "struct group *", _group))

    def initgroups(self, user: str, primary_gid: int = 0, limit: int = -1) -> Optional[list[int]]:
        """Supplementary gids as glibc's initgroups would collect them from us,
        or None when the user is not in the cache."""
        with _lock:
            self._select()
            start = ffi.new("long *", 0)
            size = ffi.new("long *", 4)
            groups = ffi.new("gid_t **", ffi.cast("gid_t *", lib.malloc(4 * ffi.sizeof("gid_t"))))
            err = ffi.new("int *")
            try:
                st = lib._nss_stepssh_initgroups_dyn(user.encode(), primary_gid, start, size, groups, limit, err)
                if st == lib.NSS_STATUS_NOTFOUND:
                    return None
                if st != lib.NSS_STATUS_SUCCESS:
                    raise Unavailable(f"cache {self.path} is unavailable (missing, unreadable or corrupt)")
                return [groups[0][i] for i in range(start[0])]
            finally:
                lib.free(groups[0])


def verify_file(path: str | Path) -> tuple[bool, str]:
    """(ok, reason): header, section bounds and every block CRC, by the C reader."""
    err = ffi.new("int *")
    m = lib.sc_open_path(str(path).encode(), 0, err)
    if m == ffi.NULL:
        import os
        return False, os.strerror(err[0]) if err[0] != 5 else "header, bounds or header checksum invalid"
    try:
        if lib.sc_verify_all(m) != 0:
            return False, "a data block failed its checksum"
        return True, "ok"
    finally:
        lib.sc_close(m)


def principals(path: str | Path, user: str) -> Optional[list[str]]:
    """The principals the cache lists for `user` (None when not a managed user)."""
    err = ffi.new("int *")
    m = lib.sc_open_path(str(path).encode(), 0, err)
    if m == ffi.NULL:
        raise Unavailable(f"cache {path} is unavailable")
    try:
        idx = ffi.new("uint32_t *")
        r = lib.sc_user_by_name(m, user.encode(), idx)
        if r == lib.SC_NOTFOUND:
            return None
        out, s, i = [], ffi.new("const char **"), 0
        while r == lib.SC_OK and (r := lib.sc_user_principal(m, idx[0], i, s)) == lib.SC_OK:
            out.append(_s(s[0]))
            i += 1
        if r == lib.SC_UNAVAIL:
            raise Unavailable(f"cache {path} is corrupt")
        return out
    finally:
        lib.sc_close(m)
