"""Every rejected request leaves the database exactly as it was (all writes
are transactional), and says what to fix."""
from __future__ import annotations

import grpc
import pytest
from server_fixtures import module_server  # noqa: F401

from step_ssh.proto import stepssh_pb2 as pb

C = grpc.StatusCode


@pytest.fixture(scope="module")
def world(module_server):
    s = module_server
    a = s.admin
    a.CreateUser(pb.DirectoryUser(name="alice", uid=71000), timeout=10)
    a.CreateUser(pb.DirectoryUser(name="bob"), timeout=10)
    a.CreateGroup(pb.DirectoryGroup(name="devs", members=["alice"]), timeout=10)
    staff = a.CreateGroup(pb.DirectoryGroup(name="staff"), timeout=10)
    a.CreateUser(pb.DirectoryUser(name="sam", gid=staff.gid), timeout=10)
    a.AddGrant(pb.Grant(group="devs", tags={"env": "prod"}, access=pb.ACCESS_SSH), timeout=10)
    web = s.enroll("web1", {"env": "prod"})
    s.enroll("web2", {"env": "prod"})
    bastion = s.enroll("bastion1", {"role": "bastion"})
    bastion.register(is_bastion=True, tags={"role": "bastion"})
    return s, web


def U(**kw):
    return pb.DirectoryUser(**kw)


ADMIN_REJECTIONS = [
    # (method, request, expected code, words in the message)
    ("CreateUser", U(name="alice"), C.ALREADY_EXISTS, "already exists"),
    ("CreateUser", U(name="Alice"), C.INVALID_ARGUMENT, "useradd"),
    ("CreateUser", U(name="9lives"), C.INVALID_ARGUMENT, "not a valid account name"),
    ("CreateUser", U(name="x" * 33), C.INVALID_ARGUMENT, "1-32 characters"),
    ("CreateUser", U(name="carol", uid=71000), C.ALREADY_EXISTS, "uid 71000 is taken by user alice"),
    ("CreateUser", U(name="carol", uid=500), C.INVALID_ARGUMENT, "system range"),
    ("CreateUser", U(name="carol", uid=999), C.INVALID_ARGUMENT, "system range"),
    ("CreateUser", U(name="carol", gid=100), C.INVALID_ARGUMENT, "system range"),
    ("CreateUser", U(name="carol", uid=65534), C.INVALID_ARGUMENT, "reserved"),
    ("CreateUser", U(name="carol", gid=69999), C.INVALID_ARGUMENT, "reserved"),
    ("CreateUser", U(name="carol", gid=69998), C.INVALID_ARGUMENT, "reserved"),
    ("CreateUser", U(name="step-jump"), C.INVALID_ARGUMENT, "reserved for a group step-ssh synthesizes"),
    ("CreateUser", U(name="step-sudo"), C.INVALID_ARGUMENT, "reserved for a group step-ssh synthesizes"),
    ("CreateUser", U(name="carol", uid=2**32 - 1), C.INVALID_ARGUMENT, "out of range"),
    ("CreateUser", U(name="carol", principals=["has space"]), C.INVALID_ARGUMENT, "principal"),
    ("CreateUser", U(name="carol", shell="bin/sh"), C.INVALID_ARGUMENT, "absolute path"),
    ("CreateUser", U(name="carol", gecos="a:b"), C.INVALID_ARGUMENT, "gecos"),
    ("CreateUser", U(name="devs"), C.ALREADY_EXISTS, "group named 'devs'"),
    ("DeleteUser", pb.NameRef(name="nobody"), C.NOT_FOUND, "no user named"),
    ("CreateGroup", pb.DirectoryGroup(name="devs"), C.ALREADY_EXISTS, "already exists"),
    ("CreateGroup", pb.DirectoryGroup(name="step-sudo"), C.INVALID_ARGUMENT, "reserved"),
    ("CreateGroup", pb.DirectoryGroup(name="step-jump"), C.INVALID_ARGUMENT, "reserved"),
    ("CreateGroup", pb.DirectoryGroup(name="ops", members=["ghost"]), C.NOT_FOUND, "no user named 'ghost'"),
    ("CreateGroup", pb.DirectoryGroup(name="Ops"), C.INVALID_ARGUMENT, "not a valid account name"),
    ("CreateGroup", pb.DirectoryGroup(name="alice", gid=80123), C.ALREADY_EXISTS, "private group"),
    ("DeleteGroup", pb.NameRef(name="staff"), C.FAILED_PRECONDITION, "primary group of sam"),
    ("DeleteGroup", pb.NameRef(name="nope"), C.NOT_FOUND, "no group named"),
    ("AddMember", pb.MemberRequest(group="devs", user="alice"), C.ALREADY_EXISTS, "already a member"),
    ("AddMember", pb.MemberRequest(group="devs", user="ghost"), C.NOT_FOUND, "no user named"),
    ("AddMember", pb.MemberRequest(group="ghosts", user="alice"), C.NOT_FOUND, "no group named"),
    ("RemoveMember", pb.MemberRequest(group="devs", user="bob"), C.NOT_FOUND, "not a member"),
    ("AddGrant", pb.Grant(group="nope", tags={"env": "prod"}, access=pb.ACCESS_SSH), C.NOT_FOUND,
     "unknown group 'nope' in grant"),
    ("AddGrant", pb.Grant(group="devs", tags={"env": "bad value"}, access=pb.ACCESS_SSH), C.INVALID_ARGUMENT,
     "malformed value"),
    ("AddGrant", pb.Grant(group="devs", tags={"-env": "x"}, access=pb.ACCESS_SSH), C.INVALID_ARGUMENT,
     "malformed tag key"),
    ("AddGrant", pb.Grant(group="devs", tags={}, access=pb.ACCESS_SSH), C.INVALID_ARGUMENT, "at least one tag"),
    ("AddGrant", pb.Grant(group="devs", tags={"env": "prod"}, access=pb.ACCESS_JUMP), C.INVALID_ARGUMENT, "access"),
    ("AddGrant", pb.Grant(group="devs", tags={"env": "prod"}, access=pb.ACCESS_SSH), C.ALREADY_EXISTS,
     "already exists"),
    ("RemoveGrant", pb.IdRef(id="gdeadbeef"), C.NOT_FOUND, "no grant"),
    ("GetHost", pb.NameRef(name="nohost"), C.NOT_FOUND, "no host"),
    ("TagHost", pb.TagRequest(host="nohost", tags={"a": "b"}), C.NOT_FOUND, "no host"),
    ("TagHost", pb.TagRequest(host="web1", tags={"a": ""}), C.INVALID_ARGUMENT, "malformed value"),
    ("UntagHost", pb.UntagRequest(host="web1", keys=["missing"]), C.NOT_FOUND, "has no tag"),
    ("DeleteHost", pb.NameRef(name="nohost"), C.NOT_FOUND, "no host"),
    ("CreateEnrollToken", pb.TokenRequest(hostname="bad_host!"), C.INVALID_ARGUMENT, "invalid hostname"),
    ("CreateEnrollToken", pb.TokenRequest(hostname="h", tags={"x": "a b"}), C.INVALID_ARGUMENT, "malformed"),
    ("AddUserCA", pb.UserCA(public_key="not a key"), C.INVALID_ARGUMENT, "OpenSSH public key"),
    ("AddUserCA", pb.UserCA(public_key="ssh-ed25519 AAAAC3NzaC1yc2E="), C.INVALID_ARGUMENT, "corrupt"),
    ("RemoveUserCA", pb.IdRef(id="SHA256:nope"), C.NOT_FOUND, "no SSH user CA"),
    ("SignUserKey", pb.SignRequest(user="ghost", public_key="x"), C.NOT_FOUND, "no user named"),
    ("SignUserKey", pb.SignRequest(user="alice", public_key="garbage"), C.INVALID_ARGUMENT, "public key"),
    ("SignUserKey", pb.SignRequest(user="alice", public_key="x", ttl_seconds=30 * 86400), C.INVALID_ARGUMENT,
     "lifetime"),
    ("ImportDirectory", pb.DirectoryImport(groups=[pb.DirectoryGroup(name="devs", members=["ghost"])]),
     C.INVALID_ARGUMENT, "member 'ghost' is not a user"),
    ("ImportDirectory", pb.DirectoryImport(users=[U(name="zed"), U(name="Bad")]), C.INVALID_ARGUMENT,
     "not a valid account name"),
    ("ImportDirectory", pb.DirectoryImport(users=[U(name="zed"), U(name="zed")]), C.INVALID_ARGUMENT,
     "listed twice"),
    ("ImportDirectory", pb.DirectoryImport(users=[U(name="zed", uid=10)]), C.INVALID_ARGUMENT, "system range"),
    ("ImportDirectory", pb.DirectoryImport(users=[U(name="sam", active=True), U(name="alice", active=True)],
                                           groups=[pb.DirectoryGroup(name="devs", members=["alice"])], prune=True),
     C.FAILED_PRECONDITION, "primary group of sam"),
]


@pytest.mark.parametrize("method,request_,code,words", ADMIN_REJECTIONS,
                         ids=[f"{m}-{i}" for i, (m, *_) in enumerate(ADMIN_REJECTIONS)])
def test_admin_rejection_changes_nothing(world, method, request_, code, words):
    s, _ = world
    before = s.db_dump()
    with pytest.raises(grpc.RpcError) as e:
        getattr(s.admin, method)(request_, timeout=10)
    assert e.value.code() == code, e.value.details()
    assert words in e.value.details()
    assert s.db_dump() == before


HOST_REJECTIONS = [
    (pb.RegisterRequest(hostname="web2"), C.ALREADY_EXISTS, "already registered"),
    (pb.RegisterRequest(hostname="not a name"), C.INVALID_ARGUMENT, "invalid hostname"),
    (pb.RegisterRequest(tags={"env": "pro d"}), C.INVALID_ARGUMENT, "malformed value"),
    (pb.RegisterRequest(bastions=["nowhere"]), C.NOT_FOUND, "not a known host"),
    (pb.RegisterRequest(bastions=["web2"]), C.FAILED_PRECONDITION, "not a bastion"),
]


@pytest.mark.parametrize("request_,code,words", HOST_REJECTIONS)
def test_host_rejection_changes_nothing(world, request_, code, words):
    s, web = world
    before = s.db_dump()
    with pytest.raises(grpc.RpcError) as e:
        web.stub.Register(request_, timeout=10)
    assert e.value.code() == code, e.value.details()
    assert words in e.value.details()
    assert s.db_dump() == before


def test_successful_write_bumps_the_revision_once(world):
    s, _ = world
    rev = s.revision()
    r = s.admin.AddMember(pb.MemberRequest(group="devs", user="bob"), timeout=10)
    assert r.revision == rev + 1 == s.revision()
    r = s.admin.RemoveMember(pb.MemberRequest(group="devs", user="bob"), timeout=10)
    assert r.revision == rev + 2
