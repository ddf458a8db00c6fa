"""UIDs/GIDs are stable fleet-wide: allocated from the configured range,
honoured when supplied and free, never reused for someone else, unchanged
across server restarts and directory re-imports."""
from __future__ import annotations

import grpc
import pytest
from server_fixtures import running_server  # noqa: F401

from step_ssh.proto import stepssh_pb2 as pb


def users(s) -> dict:
    return {u.name: (u.uid, u.gid) for u in s.admin.ListUsers(pb.Empty(), timeout=10).users}


def groups(s) -> dict:
    return {g.name: g.gid for g in s.admin.ListGroups(pb.Empty(), timeout=10).groups}


def test_allocation_is_stable_across_restarts_and_never_reused(running_server):
    s = running_server
    a = s.admin
    alice = a.CreateUser(pb.DirectoryUser(name="alice"), timeout=10)
    bob = a.CreateUser(pb.DirectoryUser(name="bob"), timeout=10)
    devs = a.CreateGroup(pb.DirectoryGroup(name="devs", members=["alice", "bob"]), timeout=10)
    assert 70000 <= alice.uid < bob.uid and alice.gid == alice.uid  # private gid prefers the uid
    assert len({alice.gid, bob.gid, devs.gid}) == 3
    before_u, before_g = users(s), groups(s)

    s.restart()
    assert users(s) == before_u and groups(s) == before_g

    a.DeleteUser(pb.NameRef(name="bob"), timeout=10)
    a.DeleteGroup(pb.NameRef(name="devs"), timeout=10)
    s.restart()
    carol = a.CreateUser(pb.DirectoryUser(name="carol"), timeout=10)
    ops = a.CreateGroup(pb.DirectoryGroup(name="ops"), timeout=10)
    # bob's uid and gid, and devs' gid, are never given to someone else
    assert carol.uid not in (alice.uid, bob.uid) and carol.gid not in (alice.gid, bob.gid, devs.gid)
    assert ops.gid not in (alice.gid, bob.gid, devs.gid, carol.gid)
    with pytest.raises(grpc.RpcError) as e:
        a.CreateUser(pb.DirectoryUser(name="dave", uid=bob.uid), timeout=10)
    assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS and "never reused" in e.value.details()
    # ... but bob coming back gets his own ids again (file ownership on hosts stays right)
    bob2 = a.CreateUser(pb.DirectoryUser(name="bob"), timeout=10)
    assert (bob2.uid, bob2.gid) == (bob.uid, bob.gid)
    devs2 = a.CreateGroup(pb.DirectoryGroup(name="devs"), timeout=10)
    assert devs2.gid == devs.gid


def test_supplied_ids_are_honoured_when_free(running_server):
    s = running_server
    a = s.admin
    u = a.CreateUser(pb.DirectoryUser(name="legacy", uid=5001, gid=5001), timeout=10)
    assert (u.uid, u.gid) == (5001, 5001)
    g = a.CreateGroup(pb.DirectoryGroup(name="legacy-grp", gid=6000), timeout=10)
    assert g.gid == 6000
    # a primary gid that is a group's makes that group the user's primary group
    u = a.CreateUser(pb.DirectoryUser(name="member", gid=6000), timeout=10)
    assert u.gid == 6000
    # a private gid (no group) is the user's own; nobody else can take it
    with pytest.raises(grpc.RpcError) as e:
        a.CreateGroup(pb.DirectoryGroup(name="squatter", gid=5001), timeout=10)
    assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS and "private group of user legacy" in e.value.details()
    # a group named like a user adopts that user's private gid
    g = a.CreateGroup(pb.DirectoryGroup(name="legacy"), timeout=10)
    assert g.gid == 5001


def test_directory_import_honours_allocates_and_keeps(running_server):
    s = running_server
    a = s.admin
    a.CreateUser(pb.DirectoryUser(name="alice", uid=72000), timeout=10)
    r = a.ImportDirectory(pb.DirectoryImport(
        users=[pb.DirectoryUser(name="bob", uid=72001, active=True),
               pb.DirectoryUser(name="carol", uid=72000, active=True),   # taken by alice: allocated instead
               pb.DirectoryUser(name="alice", uid=99999, active=True)],  # existing: uid never changes
        groups=[pb.DirectoryGroup(name="devs", gid=72500, members=["alice", "bob", "carol"])]), timeout=10)
    assert (r.users_created, r.users_updated, r.groups_created) == (2, 0, 1)
    assert any("carol: uid 72000 is taken by user alice" in w for w in r.warnings)
    assert any("alice: keeps uid 72000" in w for w in r.warnings)
    u = users(s)
    assert u["alice"][0] == 72000 and u["bob"][0] == 72001 and u["carol"][0] not in (72000, 72001)
    assert groups(s)["devs"] == 72500
    s.restart()
    # importing the same directory again changes nothing
    rev = s.revision()
    r = a.ImportDirectory(pb.DirectoryImport(
        users=[pb.DirectoryUser(name=n, active=True) for n in ("alice", "bob", "carol")],
        groups=[pb.DirectoryGroup(name="devs", members=["alice", "bob", "carol"])]), timeout=10)
    assert (r.users_created, r.users_updated, r.groups_created, r.groups_updated) == (0, 0, 0, 0)
    assert users(s) == u
    # prune removes the unlisted; their ids stay retired
    r = a.ImportDirectory(pb.DirectoryImport(
        users=[pb.DirectoryUser(name="alice", active=True)],
        groups=[pb.DirectoryGroup(name="devs", members=["alice"])], prune=True), timeout=10)
    assert r.users_removed == 2 and r.revision > rev
    dave = a.CreateUser(pb.DirectoryUser(name="dave"), timeout=10)
    assert dave.uid not in {v[0] for v in u.values()}
