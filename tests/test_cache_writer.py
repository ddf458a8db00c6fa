"""The writer: validation, local-account protection, atomic publishing."""
from __future__ import annotations

import os
import stat

import pytest
from pydantic import ValidationError

from conftest import make_view
from step_ssh.cache.format import Header
from step_ssh.cache.local import LocalAccounts, ViewRejected, check_against_local
from step_ssh.cache.writer import build, write_cache
from step_ssh.native import verify_file

PASSWD = "root:x:0:0:root:/root:/bin/bash\nbob:x:1001:1001::/home/bob:/bin/sh\nsvc:x:70003:70003::/:/bin/false\n"
GROUP = "root:x:0:\nbob:x:1001:\ndevelopers:x:2000:\noncall:x:70101:\n"


@pytest.fixture
def local(tmp_path):
    (tmp_path / "passwd").write_text(PASSWD)
    (tmp_path / "group").write_text(GROUP)
    return LocalAccounts.load(tmp_path / "passwd", tmp_path / "group")


@pytest.mark.parametrize("name", ["Alice", "1bob", "a b", "x" * 33, "-dash", "", "a:b", "é"])
def test_names_useradd_would_refuse(name):
    with pytest.raises(ValidationError, match="valid account name"):
        make_view({"users": [{"name": name, "uid": 70000, "gid": 70000}]})


@pytest.mark.parametrize("name", ["a", "_svc", "build-bot", "host$", "x" * 32, "a1_2-3"])
def test_names_useradd_accepts(name):
    assert make_view({"users": [{"name": name, "uid": 70000, "gid": 70000}]}).users[0].name == name


@pytest.mark.parametrize("field,value", [("uid", 0), ("gid", 0), ("uid", -5), ("uid", 2**32 - 1),
                                         ("gecos", "a:b"), ("home", "relative"), ("shell", "/bin/sh\n")])
def test_bad_fields(field, value):
    user = {"name": "z", "uid": 70000, "gid": 70000, field: value}
    with pytest.raises(ValidationError):
        make_view({"users": [user]})


def test_unknown_keys_and_bad_access_rejected():
    with pytest.raises(ValidationError):
        make_view({"users": [{"name": "z", "uid": 70000, "gid": 70000, "acess": "ssh"}]})
    with pytest.raises(ValidationError):
        make_view({"users": [{"name": "z", "uid": 70000, "gid": 70000, "access": "root"}]})


def test_duplicates_and_dangling_members_all_reported():
    with pytest.raises(ValidationError) as e:
        make_view({"users": [{"name": "a", "uid": 70000, "gid": 70000}, {"name": "a", "uid": 70000, "gid": 70000}],
                   "groups": [{"name": "g", "gid": 71000, "members": ["ghost"]}]})
    msg = str(e.value)
    assert "listed twice" in msg and "already used by a" in msg and "'ghost' is not a user" in msg


def test_principals_validated():
    with pytest.raises(ValidationError, match="principal"):
        make_view({"users": [{"name": "z", "uid": 70000, "gid": 70000, "principals": ["a b"]}]})


def test_local_collisions_listed_and_nothing_published(tmp_path, local):
    view = make_view({
        "users": [
            {"name": "bob", "uid": 70002, "gid": 70100},        # local name
            {"name": "dave", "uid": 70003, "gid": 70100},       # local uid (svc)
            {"name": "erin", "uid": 500, "gid": 500},           # below minimum
            {"name": "fay", "uid": 70010, "gid": 70101},        # fine, gid has a group below
        ],
        "groups": [
            {"name": "developers", "gid": 70100, "members": []},  # local group name
            {"name": "ops", "gid": 70101, "members": ["fay"]},     # local gid (oncall)
        ],
    })
    out = tmp_path / "out" / "cache"
    with pytest.raises(ViewRejected) as e:
        write_cache(view, out, local=local)
    problems = e.value.problems
    joined = "\n".join(problems)
    assert "user bob: name is a local account" in joined
    assert "user dave: uid 70003 belongs to local user svc" in joined
    assert "user erin: uid 500 is below the minimum 1000" in joined
    assert "group developers: name is a local group" in joined
    assert "group ops: gid 70101 belongs to local group oncall" in joined
    assert "group erin: gid 500 is below the minimum" in joined  # the synthesized user-private group
    assert not out.exists() and not out.parent.exists()


def test_existing_cache_untouched_on_rejection(tmp_path, local):
    out = tmp_path / "pub" / "cache"
    write_cache(make_view(), out, local=LocalAccounts())
    before = out.read_bytes()
    with pytest.raises(ViewRejected):
        write_cache(make_view({"users": [{"name": "bob", "uid": 70002, "gid": 70002}]}), out, local=local)
    assert out.read_bytes() == before
    assert [p.name for p in out.parent.iterdir()] == ["cache"]  # no temp files left


def test_min_id_configurable(local):
    view = make_view({"users": [{"name": "z", "uid": 5000, "gid": 5000}]})
    assert check_against_local(view, local, min_id=1000) == []
    assert len(check_against_local(view, local, min_id=6000)) == 3  # uid, gid, private group


def test_publish_is_atomic_and_mode_explicit(tmp_path):
    out = tmp_path / "d" / "cache"
    old_umask = os.umask(0o077)
    try:
        data = write_cache(make_view(), out, local=LocalAccounts())
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    assert out.read_bytes() == data
    assert verify_file(out) == (True, "ok")


def test_header_fields(example_view):
    h = Header.parse(build(example_view.model_copy(update={"confirmed_at": 1234, "bastion": True}), now=99))
    # groups: developers, oncall, step-sudo and, on a bastion, step-jump
    assert (h.revision, h.confirmed_at, h.generated_at, h.n_users, h.n_groups) == (7, 1234, 99, 3, 5)
    assert h.flags == 1 and h.max_stale == 86400
    h = Header.parse(build(example_view, now=99))
    assert (h.n_groups, h.flags) == (4, 0)


def test_build_is_deterministic(example_view):
    assert build(example_view, now=5) == build(example_view, now=5)


