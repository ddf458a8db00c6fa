"""The agent's publishing path (wire view -> cache) against the reference
writer, through the C reader; per-entry dropping of what must not be
published; the wire-level view the agent keeps (deltas, snapshots)."""
from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from step_ssh.agent.publish import publish_view
from step_ssh.agent.rawview import RawView, decode_event
from step_ssh.cache.local import LocalAccounts, ViewRejected, drop_conflicts
from step_ssh.cache.writer import build, publish_bytes
from step_ssh.native import NssClient, principals, verify_file
from step_ssh.proto import stepssh_pb2 as pb
from step_ssh.view import HostView
from step_ssh.viewconv import apply_delta, diff_views, view_from_pb, view_to_pb
from test_roundtrip import views

NOBODY = LocalAccounts()


def same_answers(a: Path, b: Path, view: HostView) -> None:
    """Every lookup NSS and the principals helper can make answers the same."""
    ca, cb = NssClient(a, bufsize=64), NssClient(b, bufsize=64)
    assert ca.passwd_entries() == cb.passwd_entries()
    assert ca.group_entries() == cb.group_entries()
    for u in view.users:
        assert ca.getpwnam(u.name) == cb.getpwnam(u.name)
        assert ca.getpwuid(u.uid) == cb.getpwuid(u.uid)
        assert ca.initgroups(u.name, u.gid) == cb.initgroups(u.name, u.gid)
        assert principals(a, u.name) == principals(b, u.name)
    for g in ca.group_entries():
        assert ca.getgrnam(g.name) == cb.getgrnam(g.name) == g
        assert ca.getgrgid(g.gid) == cb.getgrgid(g.gid) == g


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(views())
def test_lean_publish_answers_like_the_reference_writer(view):
    with tempfile.TemporaryDirectory() as d:
        ref, lean = Path(d) / "ref", Path(d) / "lean"
        publish_bytes(build(view, now=1000), ref)
        res = publish_view(view_to_pb(view), lean, NOBODY, 1000, now=1000)
        assert res.problems == []
        assert verify_file(lean) == (True, "ok")
        assert res.header.revision == view.revision and res.header.n_users == len(view.users)
        same_answers(ref, lean, view)


@st.composite
def views_and_locals(draw):
    view = draw(views())
    names = [u.name for u in view.users] + [g.name for g in view.groups] + ["root", "step-sudo-x"]
    ids = [u.uid for u in view.users] + [g.gid for g in view.groups] + [0, 5]
    local = LocalAccounts()
    for _ in range(draw(st.integers(0, 4))):
        n, i = draw(st.sampled_from(names)), draw(st.sampled_from(ids))
        if i in (69998, 69999):
            continue
        if draw(st.booleans()):
            local.user_names.setdefault(n, i)
            local.uids.setdefault(i, n)
        else:
            local.group_names.setdefault(n, i)
            local.gids.setdefault(i, n)
    return view, local, draw(st.sampled_from([1000, 2000]))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(views_and_locals())
def test_conflicts_are_dropped_entry_by_entry(case):
    view, local, min_id = case
    kept, expected = drop_conflicts(view, local, min_id)
    with tempfile.TemporaryDirectory() as d:
        ref, lean = Path(d) / "ref", Path(d) / "lean"
        publish_bytes(build(kept, now=1000), ref)
        res = publish_view(view_to_pb(view), lean, local, min_id, now=1000)
        same_answers(ref, lean, kept)
        # the same entries are reported, and nothing local is shadowed
        dropped = lambda ps: sorted(p.split(" (")[0] for p in ps if " dropped: " in p)  # noqa: E731
        assert dropped(res.problems) == dropped(expected)
        c = NssClient(lean)
        for pw in c.passwd_entries():
            assert pw.name not in local.user_names and pw.uid not in local.uids and pw.uid >= min_id
        for gr in c.group_entries():
            assert gr.name not in local.group_names and gr.gid not in local.gids and gr.gid >= min_id


def _user(name, uid, gid=None, **kw):
    return pb.User(name=name, uid=uid, gid=gid or uid, access=kw.pop("access", pb.ACCESS_SSH), **kw)


def test_bad_entries_from_the_wire_are_dropped_not_the_view(tmp_path):
    v = pb.HostView(revision=9, users=[
        _user("alice", 70001, principals=["alice"]),
        _user("Bad-Name", 70002),
        _user("bob", 70001),                          # uid taken by alice
        _user("carol", 70004, gecos="x:y"),          # ':' breaks passwd lines
        _user("dave", 70005, home="relative/home"),
        _user("erin", 70006, principals=["has space"]),
        _user("alice", 70007),                        # listed twice
        _user("root", 70008),                         # a local account's name
        _user("frank", 500),                          # below min_id
        _user("grace", 70009, access=7),              # unknown access value
        _user("heidi", 70010, gid=4242),              # private group would take local gid 4242
    ], groups=[
        pb.Group(name="devs", gid=71000, members=["alice", "bob", "ghost"]),
        pb.Group(name="wheel", gid=71001, members=["alice"]),   # local group name
        pb.Group(name="devs", gid=71002),                       # listed twice
    ])
    v.settings.ssh_user_ca_keys.extend(["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMq user-ca", "not a key\nline"])
    local = LocalAccounts(user_names={"root": 0}, uids={0: "root"}, group_names={"wheel": 10, "hg": 4242},
                          gids={10: "wheel", 4242: "hg"})
    res = publish_view(v, tmp_path / "cache", local, 1000)
    c = NssClient(tmp_path / "cache")
    assert [p.name for p in c.passwd_entries()] == ["alice"]
    assert c.getgrnam("devs").members == ("alice",)
    assert c.getgrnam("wheel") is None
    text = "\n".join(res.problems)
    for who in ("'Bad-Name'", "'bob'", "'carol'", "'dave'", "'erin'", "'root'", "'frank'", "'grace'", "'heidi'",
                "group 'wheel'", "'ghost'", "SSH user CA key"):
        assert who in text, (who, text)
    assert "listed twice" in text and "name already used" in text
    assert res.ca_keys == ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMq user-ca"]


def test_sudo_group_colliding_with_a_local_group_refuses_the_view(tmp_path):
    v = pb.HostView(revision=1, users=[_user("alice", 70001, access=pb.ACCESS_SUDO)])
    v.settings.sudo_group_name = "sudo"
    v.settings.sudo_group_gid = 27
    local = LocalAccounts(group_names={"sudo": 27}, gids={27: "sudo"})
    with pytest.raises(ViewRejected) as e:
        publish_view(v, tmp_path / "cache", local, 1000)
    assert "sudo group" in str(e.value)
    assert not (tmp_path / "cache").exists()
    with pytest.raises(ViewRejected):
        drop_conflicts(view_from_pb(v), local, 1000)



def test_jump_group_on_a_bastion_lists_the_jump_users_and_must_be_free(tmp_path):
    v = pb.HostView(revision=1, users=[_user("jack", 70001, access=pb.ACCESS_JUMP),
                                       _user("bob", 70002, access=pb.ACCESS_SSH)])
    publish_view(v, tmp_path / "plain", NOBODY, 1000)
    assert NssClient(tmp_path / "plain").getgrnam("step-jump") is None  # not a bastion: no jump group
    v.settings.bastion = True
    publish_view(v, tmp_path / "cache", NOBODY, 1000)
    c = NssClient(tmp_path / "cache")
    assert c.getgrnam("step-jump").members == ("jack",) and c.getgrgid(69998).name == "step-jump"
    assert c.initgroups("jack", 70001) == [69998] and c.initgroups("bob", 70002) == []
    local = LocalAccounts(group_names={"ops": 69998}, gids={69998: "ops"})
    with pytest.raises(ViewRejected) as e:
        publish_view(v, tmp_path / "cache2", local, 1000)
    assert "jump group step-jump: gid 69998 belongs to local group ops" in str(e.value)
    assert "clear this host's bastion flag" in str(e.value)
    assert not (tmp_path / "cache2").exists()
    with pytest.raises(ViewRejected):
        drop_conflicts(view_from_pb(v), local, 1000)
    # whoever holds a group named step-jump is confined by sshd: the name is never served for anything else
    v = pb.HostView(revision=2, users=[_user("step-jump", 70003), _user("bob", 70002, gid=69998),
                                       _user("jack", 70001, access=pb.ACCESS_JUMP)],
                    groups=[pb.Group(name="step-jump", gid=71000, members=["bob"])])
    res = publish_view(v, tmp_path / "plain2", NOBODY, 1000)
    c = NssClient(tmp_path / "plain2")
    assert c.getpwnam("step-jump") is None and c.getgrnam("step-jump") is None
    assert c.getpwnam("bob").gid == 69998 and c.getgrgid(69998).name == "bob"  # not a bastion: a private group
    assert sum("is reserved for the group of jump-only users" in p for p in res.problems) == 2
    v.groups.pop()
    v.settings.bastion = True
    res = publish_view(v, tmp_path / "bastion2", NOBODY, 1000)
    c = NssClient(tmp_path / "bastion2")
    assert [p.name for p in c.passwd_entries()] == ["jack"]  # bob's primary gid would make him a jump user
    assert c.getgrnam("step-jump").members == ("jack",)
    assert any("'bob'" in p and "primary gid 69998 is the jump group's" in p for p in res.problems)

@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(views(), views(), st.booleans())
def test_raw_view_applies_deltas_like_viewconv(a, b, intended):
    pa, pbv = view_to_pb(a), view_to_pb(b)
    pa.revision, pbv.revision = 5, 9
    d = diff_views(pa, pbv, shrink_intended=intended)
    want = apply_delta(pa, d)
    raw = RawView.from_pb(pa).apply_delta(d)
    assert raw.to_pb() == want
    assert raw.revision == 9 and raw.n_users == len(want.users) and raw.n_groups == len(want.groups)
    # and through the wire envelope
    kind, payload = decode_event(pb.WatchEvent(delta=d).SerializeToString())
    assert kind == "delta" and payload == d
    kind, (snap, shrink) = decode_event(pb.WatchEvent(snapshot=pb.Snapshot(view=pbv, shrink_intended=intended))
                                        .SerializeToString())
    assert kind == "snapshot" and snap.to_pb() == pbv and shrink is intended


def test_raw_view_keeps_unknown_fields_and_heartbeats_decode():
    v = pb.HostView(revision=3, users=[_user("alice", 70001)])
    data = v.SerializeToString() + bytes([0xF8, 0x01, 0x07])  # field 31, varint 7: from a newer server
    r = RawView(data)
    assert r.revision == 3 and r.n_users == 1 and [u.name for u in r.iter_users()] == ["alice"]
    kind, hb = decode_event(pb.WatchEvent(heartbeat=pb.Heartbeat(revision=3, server_time=5)).SerializeToString())
    assert kind == "heartbeat" and hb.revision == 3
    assert decode_event(b"") == ("empty", None)


def test_wire_walker_field_numbers_match_the_proto():
    """rawview walks the wire format by field number: keep it in step with stepssh.proto."""
    from step_ssh.agent import rawview as rv
    hv = pb.HostView.DESCRIPTOR.fields_by_name
    assert (hv["revision"].number, hv["users"].number, hv["groups"].number, hv["settings"].number) == \
        (rv.HV_REVISION, rv.HV_USERS, rv.HV_GROUPS, rv.HV_SETTINGS)
    sn = pb.Snapshot.DESCRIPTOR.fields_by_name
    assert (sn["view"].number, sn["shrink_intended"].number) == (rv.SNAP_VIEW, rv.SNAP_SHRINK)
    ev = pb.WatchEvent.DESCRIPTOR.fields_by_name
    assert (ev["snapshot"].number, ev["delta"].number, ev["heartbeat"].number) == (rv.EV_SNAPSHOT, 2, 3)
