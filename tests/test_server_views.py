"""Effective host views over real gRPC + mTLS: tag combinations, several
grants, sudo beating ssh, primary groups, bastions, deactivation, and the
removal of the last grant."""
from __future__ import annotations

import grpc
import pytest
from server_fixtures import module_server  # noqa: F401

from step_ssh.proto import stepssh_pb2 as pb
from step_ssh.view import Access
from step_ssh.viewconv import view_from_pb


def view(s, host: str):
    v = s.admin.GetHostView(pb.NameRef(name=host), timeout=10)
    hv = view_from_pb(v)  # every view the server computes must be valid for the cache writer
    return {u.name: u.access for u in hv.users}, {g.name: g.members for g in hv.groups}, hv


@pytest.fixture(scope="module")
def fleet(module_server):
    s = module_server
    a = s.admin
    for name in ("alice", "bob", "carol", "dave", "erin", "frank"):
        a.CreateUser(pb.DirectoryUser(name=name), timeout=10)
    a.CreateGroup(pb.DirectoryGroup(name="devs", members=["alice", "bob"]), timeout=10)
    a.CreateGroup(pb.DirectoryGroup(name="dbas", members=["bob", "carol"]), timeout=10)
    a.CreateGroup(pb.DirectoryGroup(name="ops", members=["dave"]), timeout=10)
    staff = a.CreateGroup(pb.DirectoryGroup(name="staff"), timeout=10)
    # erin's primary group is staff (frank is in it too, but has no access anywhere)
    a.ImportDirectory(pb.DirectoryImport(
        users=[pb.DirectoryUser(name="erin", gid=staff.gid, active=True)],
        groups=[pb.DirectoryGroup(name="staff", members=["erin", "frank"])]), timeout=10)
    a.AddMember(pb.MemberRequest(group="devs", user="erin"), timeout=10)
    grants = {
        "devs_prod": a.AddGrant(pb.Grant(group="devs", tags={"env": "prod"}, access=pb.ACCESS_SSH), timeout=10).id,
        "dbas_db": a.AddGrant(pb.Grant(group="dbas", tags={"env": "prod", "role": "db"}, access=pb.ACCESS_SUDO),
                              timeout=10).id,
        "ops_stg": a.AddGrant(pb.Grant(group="ops", tags={"env": "staging"}, access=pb.ACCESS_SUDO), timeout=10).id,
        "ops_db": a.AddGrant(pb.Grant(group="ops", tags={"role": "db"}, access=pb.ACCESS_SSH), timeout=10).id,
    }
    hosts = {
        "web": s.enroll("web.example.com", {"env": "prod", "role": "web"}),
        "db": s.enroll("db.example.com", {"env": "prod", "role": "db"}),
        "stg": s.enroll("stg.example.com", {"env": "staging", "role": "db"}),
        "dev": s.enroll("dev.example.com", {"env": "dev"}),
    }
    return s, grants, hosts


def test_single_tag_grant(fleet):
    s, _, _ = fleet
    users, groups, hv = view(s, "web.example.com")
    assert users == {"alice": Access.ssh, "bob": Access.ssh, "erin": Access.ssh}
    # groups that matter: the granting group, plus primary groups (staff, with only in-view members);
    # alice's and bob's primary gids are private (synthesized by the cache)
    assert groups == {"devs": ["alice", "bob", "erin"], "staff": ["erin"]}
    assert hv.revision == s.revision()
    assert hv.sudo_group.name == "step-sudo" and hv.sudo_group.gid == 69999
    assert len(hv.ssh_user_ca_keys) == 1 and hv.ssh_user_ca_keys[0].startswith("ssh-ed25519 ")


def test_all_tags_must_match_and_sudo_beats_ssh(fleet):
    s, _, _ = fleet
    users, groups, _ = view(s, "db.example.com")
    # bob: ssh via devs (env=prod) and sudo via dbas (env=prod,role=db) -> sudo
    assert users == {"alice": Access.ssh, "bob": Access.sudo, "carol": Access.sudo, "dave": Access.ssh,
                     "erin": Access.ssh}
    assert set(groups) == {"devs", "dbas", "ops", "staff"}
    users, _, _ = view(s, "stg.example.com")
    # dbas' grant needs env=prod too; ops has sudo (staging) and ssh (role=db) -> sudo
    assert users == {"dave": Access.sudo}


def test_host_without_matching_grant_sees_nobody(fleet):
    s, _, _ = fleet
    users, groups, hv = view(s, "dev.example.com")
    assert users == {} and groups == {}
    assert hv.ssh_user_ca_keys  # settings still arrive


def test_uids_and_principals_in_view(fleet):
    s, _, _ = fleet
    _, _, hv = view(s, "web.example.com")
    listed = {u.name: u for u in s.admin.ListUsers(pb.Empty(), timeout=10).users}
    for u in hv.users:
        assert (u.uid, u.gid) == (listed[u.name].uid, listed[u.name].gid)
        assert u.principals == [u.name]  # default principal is the name


def test_bastion_lists_jump_users(fleet):
    s, _, hosts = fleet
    bastion = s.enroll("bastion.example.com", {"role": "bastion"})
    bastion.register(is_bastion=True, tags={"role": "bastion"})
    users, _, hv = view(s, "bastion.example.com")
    assert hv.bastion and users == {}
    # web sits behind the bastion: everyone who may reach web may jump through
    hosts["web"].register(tags={"env": "prod", "role": "web"}, bastions=["bastion.example.com"])
    users, groups, hv = view(s, "bastion.example.com")
    assert users == {"alice": Access.jump, "bob": Access.jump, "erin": Access.jump}
    assert groups == {"staff": ["erin"]}  # only primary groups: devs grants nothing here
    # a grant on the bastion itself wins over jump
    g = s.admin.AddGrant(pb.Grant(group="dbas", tags={"role": "bastion"}, access=pb.ACCESS_SSH), timeout=10)
    users, groups, _ = view(s, "bastion.example.com")
    assert users == {"alice": Access.jump, "bob": Access.ssh, "carol": Access.ssh, "erin": Access.jump}
    assert set(groups) == {"dbas", "staff"}
    s.admin.RemoveGrant(pb.IdRef(id=g.id), timeout=10)
    # a bastion named by id works too, and unregistering the bastion flag drops the jump users
    hosts["web"].register(tags={"env": "prod", "role": "web"}, bastions=[bastion.id])
    assert set(view(s, "bastion.example.com")[0]) == {"alice", "bob", "erin"}
    bastion.register(tags={"role": "bastion"}, is_bastion=False)
    assert view(s, "bastion.example.com")[0] == {}
    with pytest.raises(grpc.RpcError) as e:
        hosts["db"].register(tags={"env": "prod", "role": "db"}, bastions=["bastion.example.com"])
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "not a bastion" in e.value.details()
    hosts["web"].register(tags={"env": "prod", "role": "web"})


def test_deactivated_user_disappears(fleet):
    s, _, _ = fleet
    a = s.admin
    a.ImportDirectory(pb.DirectoryImport(users=[pb.DirectoryUser(name="alice", active=False)]), timeout=10)
    users, groups, _ = view(s, "web.example.com")
    assert "alice" not in users and "alice" not in groups["devs"]
    a.ImportDirectory(pb.DirectoryImport(users=[pb.DirectoryUser(name="alice", active=True)]), timeout=10)
    assert "alice" in view(s, "web.example.com")[0]


def test_admin_tags_change_the_view(fleet):
    s, _, _ = fleet
    s.admin.TagHost(pb.TagRequest(host="dev.example.com", tags={"env": "prod"}), timeout=10)
    assert set(view(s, "dev.example.com")[0]) == {"alice", "bob", "erin"}
    s.admin.UntagHost(pb.UntagRequest(host="dev.example.com", keys=["env"]), timeout=10)
    assert view(s, "dev.example.com")[0] == {}


def test_removing_the_last_grant_empties_the_view(fleet):
    s, grants, _ = fleet
    a = s.admin
    assert view(s, "stg.example.com")[0] == {"dave": Access.sudo}
    a.RemoveGrant(pb.IdRef(id=grants["ops_stg"]), timeout=10)
    assert view(s, "stg.example.com")[0] == {"dave": Access.ssh}  # role=db grant is left
    a.RemoveGrant(pb.IdRef(id=grants["ops_db"]), timeout=10)
    users, groups, _ = view(s, "stg.example.com")
    assert users == {} and groups == {}
    # and the db host lost dave
    assert "dave" not in view(s, "db.example.com")[0]


def test_explicit_principals_and_private_group(module_server, fleet):
    s = module_server
    a = s.admin
    a.CreateUser(pb.DirectoryUser(name="gina", principals=["gina", "gina@example.com"], shell="/bin/zsh",
                                  gecos="Gina G", home="/srv/gina"), timeout=10)
    a.CreateGroup(pb.DirectoryGroup(name="gina-team", members=["gina"]), timeout=10)
    a.AddGrant(pb.Grant(group="gina-team", tags={"env": "dev"}, access=pb.ACCESS_SUDO), timeout=10)
    a.TagHost(pb.TagRequest(host="dev.example.com", tags={"env": "dev"}), timeout=10)
    _, _, hv = view(s, "dev.example.com")
    (u,) = [u for u in hv.users if u.name == "gina"]
    assert u.principals == ["gina", "gina@example.com"] and u.shell == "/bin/zsh" and u.home == "/srv/gina"
    assert u.gecos == "Gina G" and u.access == Access.sudo
