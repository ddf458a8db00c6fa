"""8 threads look up while the cache is replaced 1,000 times: no crash, and
every answer comes whole from one snapshot or the other."""
from __future__ import annotations

import threading

from conftest import make_view
from step_ssh._native import ffi, lib
from step_ssh.cache.writer import build, publish_bytes

ENUM_LOCK = threading.Lock()


def snapshot(tag: str):
    v = make_view()
    for u in v.users:
        u.gecos = f"{tag}-{u.name}"
        u.home = f"/home/{tag}/{u.name}"
    v.groups[0].members = ["bob", "carol"] if tag == "A" else ["carol"]
    v.revision = 1 if tag == "A" else 2
    return build(v)


def _lookup_loop(stop, errors, counts):
    err = ffi.new("int *")
    pw = ffi.new("struct passwd *")
    gr = ffi.new("struct group *")
    buf = ffi.new("char[]", 4096)
    while not stop.is_set():
        st = lib._nss_stepssh_getpwnam_r(b"bob", pw, buf, 4096, err)
        if st != lib.NSS_STATUS_SUCCESS:
            errors.append(f"getpwnam status {st} errno {err[0]}")
            continue
        gecos, home = ffi.string(pw.pw_gecos).decode(), ffi.string(pw.pw_dir).decode()
        tag = gecos.split("-")[0]
        if gecos != f"{tag}-bob" or home != f"/home/{tag}/bob" or tag not in "AB":
            errors.append(f"mixed answer {gecos!r} {home!r}")
        st = lib._nss_stepssh_getgrnam_r(b"developers", gr, buf, 4096, err)
        if st == lib.NSS_STATUS_SUCCESS:
            mem = []
            i = 0
            while gr.gr_mem[i] != ffi.NULL:
                mem.append(ffi.string(gr.gr_mem[i]))
                i += 1
            if mem not in ([b"bob", b"carol"], [b"carol"]):
                errors.append(f"bad members {mem}")
        else:
            errors.append(f"getgrnam status {st}")
        # Enumeration must also come from one snapshot. The cursor is
        # process-wide (getpwent is not per-thread); glibc serializes callers
        # with a lock, and so do we.
        with ENUM_LOCK:
            lib._nss_stepssh_setpwent(0)
            tags = []
            while lib._nss_stepssh_getpwent_r(pw, buf, 4096, err) == lib.NSS_STATUS_SUCCESS:
                tags.append(ffi.string(pw.pw_gecos).decode().split("-")[0])
            lib._nss_stepssh_endpwent()
        if len(tags) != 3 or len(set(tags)) != 1:
            errors.append(f"enumeration mixed snapshots {tags}")
        counts.append(1)


def test_lookups_during_1000_replacements(tmp_path):
    path = tmp_path / "cache"
    a, b = snapshot("A"), snapshot("B")
    publish_bytes(a, path)
    lib.stepssh_nss_set_path(str(path).encode(), 0)
    stop, errors, counts = threading.Event(), [], []
    threads = [threading.Thread(target=_lookup_loop, args=(stop, errors, counts)) for _ in range(8)]
    for t in threads:
        t.start()
    try:
        for i in range(1000):
            publish_bytes(b if i % 2 == 0 else a, path)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert errors == []
    assert len(counts) > 100  # the readers really ran alongside the writer
