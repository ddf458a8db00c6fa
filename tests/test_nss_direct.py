"""The NSS entry points called directly through cffi, as glibc calls them."""
from __future__ import annotations

import os
import time

import pytest

from conftest import make_view, write_view
from step_ssh._native import ffi, lib
from step_ssh.native import ERANGE, Group, NssClient, Passwd, Unavailable


def test_hits_by_name_and_id(example_cache):
    c = NssClient(example_cache)
    assert c.getpwnam("alice") == Passwd("alice", "x", 70001, 70001, "Alice Admin", "/home/alice", "/bin/bash")
    assert c.getpwuid(70003) == Passwd("carol", "x", 70003, 70100, "", "/srv/carol", "/bin/sh")
    assert c.getgrnam("developers") == Group("developers", "x", 70100, ("bob", "carol"))
    assert c.getgrgid(70101) == Group("oncall", "x", 70101, ("alice", "bob"))


def test_synthesized_groups(example_cache):
    c = NssClient(example_cache)
    # alice's gid 70001 has no directory group: a user-private group appears
    assert c.getgrgid(70001) == Group("alice", "x", 70001, ())
    # sudo holders are members of the sudo group
    assert c.getgrnam("step-sudo") == Group("step-sudo", "x", 69999, ("alice",))


def test_misses_are_authoritative(example_cache):
    c = NssClient(example_cache)
    assert c.getpwnam("mallory") is None
    assert c.getpwuid(1) is None
    assert c.getgrnam("wheel") is None
    assert c.getgrgid(70999) is None
    assert c.initgroups("mallory") is None


def test_missing_file_is_unavailable(tmp_path):
    c = NssClient(tmp_path / "nope")
    with pytest.raises(Unavailable):
        c.getpwnam("alice")
    with pytest.raises(Unavailable):
        c.passwd_entries()


@pytest.mark.parametrize("size", [0, 1, 8, 16, 40])
def test_erange_then_success(example_cache, size):
    """Too small a buffer: TRYAGAIN + ERANGE, never a partial answer; then the
    retry with a larger buffer succeeds."""
    lib.stepssh_nss_set_path(str(example_cache).encode(), 0)
    err = ffi.new("int *")
    pw = ffi.new("struct passwd *")
    buf = ffi.new("char[]", max(size, 1))
    st = lib._nss_stepssh_getpwnam_r(b"alice", pw, buf, size, err)
    assert st == lib.NSS_STATUS_TRYAGAIN and err[0] == ERANGE
    big = ffi.new("char[]", 256)
    assert lib._nss_stepssh_getpwnam_r(b"alice", pw, big, 256, err) == lib.NSS_STATUS_SUCCESS
    assert ffi.string(pw.pw_gecos) == b"Alice Admin"


def test_group_buffer_alignment(example_cache):
    """gr_mem must be pointer-aligned even when the caller's buffer is not."""
    lib.stepssh_nss_set_path(str(example_cache).encode(), 0)
    err = ffi.new("int *")
    gr = ffi.new("struct group *")
    raw = ffi.new("char[]", 512)
    for shift in range(1, 8):
        st = lib._nss_stepssh_getgrnam_r(b"developers", gr, raw + shift, 512 - shift, err)
        assert st == lib.NSS_STATUS_SUCCESS
        assert int(ffi.cast("uintptr_t", gr.gr_mem)) % ffi.sizeof("char *") == 0
        assert [ffi.string(gr.gr_mem[i]) for i in range(2)] == [b"bob", b"carol"]
        assert gr.gr_mem[2] == ffi.NULL


def test_group_erange_at_every_size(example_cache):
    lib.stepssh_nss_set_path(str(example_cache).encode(), 0)
    err = ffi.new("int *")
    gr = ffi.new("struct group *")
    ok_at = None
    for size in range(0, 128):
        buf = ffi.new("char[]", max(size, 1))
        st = lib._nss_stepssh_getgrnam_r(b"oncall", gr, buf, size, err)
        if st == lib.NSS_STATUS_SUCCESS:
            ok_at = ok_at or size
            assert [ffi.string(gr.gr_mem[i]) for i in range(2)] == [b"alice", b"bob"]
        else:
            assert ok_at is None, "a larger buffer must never fail once a smaller one worked"
            assert st == lib.NSS_STATUS_TRYAGAIN and err[0] == ERANGE
    assert ok_at is not None


def test_enumeration_order_and_completeness(example_cache, example_view):
    c = NssClient(example_cache, bufsize=8)  # force ERANGE retries mid-enumeration
    assert [p.name for p in c.passwd_entries()] == [u.name for u in example_view.users]
    assert [g.name for g in c.group_entries()] == ["developers", "oncall", "step-sudo", "alice"]


def test_enumeration_restarts_with_setent(example_cache):
    c = NssClient(example_cache)
    first = c.passwd_entries()
    assert c.passwd_entries() == first


def test_initgroups_user_in_1000_groups(tmp_path):
    groups = [{"name": f"g{i}", "gid": 80000 + i, "members": ["big"]} for i in range(1000)]
    view = make_view({"users": [{"name": "big", "uid": 75000, "gid": 80000}], "groups": groups})
    c = NssClient(write_view(tmp_path / "cache", view))
    got = c.initgroups("big", 80000)
    assert got == [80000 + i for i in range(1, 1000)]  # primary skipped, order kept
    assert len(c.getgrgid(80500).members) == 1


def test_initgroups_respects_limit_and_existing(example_cache):
    lib.stepssh_nss_set_path(str(example_cache).encode(), 0)
    start = ffi.new("long *", 1)
    size = ffi.new("long *", 1)
    arr = ffi.cast("gid_t *", lib.malloc(ffi.sizeof("gid_t")))
    arr[0] = 70101  # an earlier module already added oncall
    groups = ffi.new("gid_t **", arr)
    err = ffi.new("int *")
    try:
        st = lib._nss_stepssh_initgroups_dyn(b"alice", 70001, start, size, groups, 2, err)
        assert st == lib.NSS_STATUS_SUCCESS
        assert [groups[0][i] for i in range(start[0])] == [70101, 69999]
        assert size[0] <= 2
    finally:
        lib.free(groups[0])


def test_mapping_refreshed_when_file_replaced(tmp_path):
    path = tmp_path / "cache"
    write_view(path, make_view())
    c = NssClient(path)
    assert c.getpwnam("bob").gecos == "Bob Builder"
    data = make_view()
    data.users[1].gecos = "Robert"
    write_view(path, data)
    assert c.getpwnam("bob").gecos == "Robert"
    # A writer that does not flag the old file (a manual mv or rm) is
    # noticed within the recheck interval (SC_RECHECK_NS, 1 s).
    os.unlink(path)
    time.sleep(1.1)
    with pytest.raises(Unavailable):
        c.getpwnam("bob")


def test_insecure_file_refused_when_ownership_required(example_cache):
    os.chmod(example_cache, 0o666)
    with pytest.raises(Unavailable):
        NssClient(example_cache, require_root_owner=True).getpwnam("alice")
    assert NssClient(example_cache).getpwnam("alice") is not None
    os.chmod(example_cache, 0o644)
    if os.geteuid() == 0:
        assert NssClient(example_cache, require_root_owner=True).getpwnam("alice") is not None


def test_superseded_flag_set_on_replacement_and_purge(tmp_path):
    """The writer flags the file it replaced (readers then look again without
    a stat per call) and the flag is outside the checksums."""
    from step_ssh.cache.format import SUPERSEDED_OFFSET
    from step_ssh.cache.writer import retire
    from step_ssh.native import verify_file

    path = tmp_path / "cache"
    write_view(path, make_view())
    keep = os.open(path, os.O_RDONLY)  # like a reader's mapping of the old inode
    try:
        c = NssClient(path)
        assert c.getpwnam("bob").gecos == "Bob Builder"
        v = make_view()
        v.users[1].gecos = "Robert"
        write_view(path, v)
        assert os.pread(keep, 4, SUPERSEDED_OFFSET) == b"\x01\x00\x00\x00"
        assert c.getpwnam("bob").gecos == "Robert"   # seen at once, not after the recheck interval
        assert verify_file(path) == (True, "ok")
        assert retire(path) and not path.exists()
        with pytest.raises(Unavailable):
            c.getpwnam("bob")
    finally:
        os.close(keep)
