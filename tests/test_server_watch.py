"""Watch over real gRPC + mTLS: snapshot vs delta, heartbeats, resuming
after a server restart without a snapshot, shrink_intended, revocation of a
watching host, superseded streams, graceful shutdown."""
from __future__ import annotations

import signal
import threading
import time

import grpc
import pytest
from server_fixtures import next_change, next_event, running_server  # noqa: F401

from step_ssh.proto import stepssh_pb2 as pb
from step_ssh.viewconv import apply_delta, view_from_pb


def setup_fleet(s):
    a = s.admin
    for n in ("alice", "bob", "carol"):
        a.CreateUser(pb.DirectoryUser(name=n), timeout=10)
    a.CreateGroup(pb.DirectoryGroup(name="devs", members=["alice", "bob"]), timeout=10)
    a.CreateGroup(pb.DirectoryGroup(name="other", members=["carol"]), timeout=10)
    g = a.AddGrant(pb.Grant(group="devs", tags={"env": "prod"}, access=pb.ACCESS_SSH), timeout=10)
    return g.id


def kind(ev) -> str:
    return ev.WhichOneof("event")


def test_snapshot_then_deltas_then_heartbeats(running_server):
    s = running_server
    grant = setup_fleet(s)
    h = s.enroll("web1", {"env": "prod"})
    call = h.watch(0)
    ev = next_event(call)
    assert kind(ev) == "snapshot" and not ev.snapshot.shrink_intended
    held = ev.snapshot.view
    assert [u.name for u in held.users] == ["alice", "bob"] and held.revision == s.revision()

    # a change that adds a user: a delta, not a snapshot
    s.admin.AddMember(pb.MemberRequest(group="devs", user="carol"), timeout=10)
    ev = next_change(call)
    assert kind(ev) == "delta"
    d = ev.delta
    assert d.base_revision == held.revision and d.revision == s.revision()
    assert [u.name for u in d.upsert_users] == ["carol"] and not d.remove_users and not d.shrink_intended
    held = apply_delta(held, d)
    view_from_pb(held)

    # an unrelated change bumps the revision but sends nothing but heartbeats at the held revision
    s.admin.CreateUser(pb.DirectoryUser(name="zed"), timeout=10)
    ev = next_event(call, timeout=5)
    assert kind(ev) == "heartbeat" and ev.heartbeat.revision == held.revision
    assert abs(ev.heartbeat.server_time - time.time()) < 5

    # removing the last grant: a delta that empties the view, marked as intended
    s.admin.RemoveGrant(pb.IdRef(id=grant), timeout=10)
    ev = next_change(call)
    d = ev.delta
    assert sorted(d.remove_users) == ["alice", "bob", "carol"] and d.shrink_intended
    held = apply_delta(held, d)
    assert not held.users and not held.groups
    call.cancel()


def test_resume_after_restart_sends_no_snapshot(running_server):
    s = running_server
    setup_fleet(s)
    h = s.enroll("web1", {"env": "prod"})
    call = h.watch(0)
    held = next_event(call).snapshot.view
    # the server records what it sent right after logging it, then persists within 250 ms
    s.wait_log(lambda r: r.get("msg") == "watch sent")
    call.cancel()
    time.sleep(0.6)

    s.restart()
    call = h.watch(held.revision)
    ev = next_event(call)
    assert kind(ev) == "heartbeat" and ev.heartbeat.revision == held.revision
    call.cancel()

    # changed while the host was away, across another restart: a delta from the held revision
    s.admin.RemoveMember(pb.MemberRequest(group="devs", user="bob"), timeout=10)
    s.restart()
    call = h.watch(held.revision)
    ev = next_event(call)
    assert kind(ev) == "delta", ev
    assert ev.delta.base_revision == held.revision and ev.delta.remove_users == ["bob"]
    assert ev.delta.shrink_intended
    held = apply_delta(held, ev.delta)
    call.cancel()
    assert any(r.get("msg") == "watch sent" for r in s.wait_log(lambda r: r.get("msg") == "watch sent"))


def test_unknown_base_revision_gets_a_snapshot(running_server):
    s = running_server
    setup_fleet(s)
    h = s.enroll("web1", {"env": "prod"})
    call = h.watch(0)
    held = next_event(call).snapshot.view
    call.cancel()
    time.sleep(0.6)
    # the host claims an older revision than the one the server last sent it
    s.admin.RemoveMember(pb.MemberRequest(group="devs", user="bob"), timeout=10)
    call = h.watch(held.revision - 1)
    ev = next_event(call)
    assert kind(ev) == "snapshot"
    assert ev.snapshot.shrink_intended  # bob's removal was recorded after that revision
    assert [u.name for u in ev.snapshot.view.users] == ["alice"]
    call.cancel()


def test_revision_from_the_future_is_not_an_intended_shrink(running_server):
    """A host that holds a newer revision than the server has (database restored
    from an old backup or wiped) gets a snapshot the agent may refuse."""
    s = running_server
    setup_fleet(s)
    h = s.enroll("web1", {"env": "prod"})
    call = h.watch(s.revision() + 1000)
    ev = next_event(call)
    assert kind(ev) == "snapshot" and not ev.snapshot.shrink_intended
    call.cancel()
    def claims(r):
        return r.get("msg", "").startswith("host claims a revision newer")
    assert any(claims(r) for r in s.wait_log(claims))


def test_untagging_is_an_intended_shrink_and_host_rm_ends_the_stream(running_server):
    s = running_server
    setup_fleet(s)
    h = s.enroll("web1", {"env": "prod", "role": "web"})
    call = h.watch(0)
    assert len(next_event(call).snapshot.view.users) == 2
    s.admin.UntagHost(pb.UntagRequest(host="web1", keys=["env"]), timeout=10)
    ev = next_change(call)
    assert sorted(ev.delta.remove_users) == ["alice", "bob"] and ev.delta.shrink_intended
    s.admin.DeleteHost(pb.NameRef(name="web1"), timeout=10)
    with pytest.raises(grpc.RpcError) as e:
        next_change(call)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED and "removed" in e.value.details()


def test_fan_out_to_many_watchers(running_server):
    s = running_server
    setup_fleet(s)
    hosts = [s.enroll(f"web{i}", {"env": "prod"}) for i in range(20)]
    calls = [h.watch(0) for h in hosts]
    for c in calls:
        assert kind(next_event(c)) == "snapshot"
    s.admin.AddMember(pb.MemberRequest(group="devs", user="carol"), timeout=10)
    for c in calls:
        ev = next_change(c)
        assert [u.name for u in ev.delta.upsert_users] == ["carol"]
    # the server notes what it sent once the stream resumes after the send: poll
    deadline = time.monotonic() + 10
    while True:
        hl = s.admin.ListHosts(pb.Empty(), timeout=10).hosts
        if all(h.connected and h.sent_revision == s.revision() for h in hl) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert all(h.connected and h.sent_revision == s.revision() for h in hl)
    for c in calls:
        c.cancel()


def test_newer_stream_supersedes_older(running_server):
    s = running_server
    setup_fleet(s)
    h = s.enroll("web1", {"env": "prod"})
    first = h.watch(0)
    next_event(first)
    second = h.watch(0)
    next_event(second)
    with pytest.raises(grpc.RpcError) as e:
        next_change(first)
    assert e.value.code() == grpc.StatusCode.ABORTED and "newer Watch" in e.value.details()
    second.cancel()


def test_sigterm_ends_streams_cleanly(running_server):
    s = running_server
    setup_fleet(s)
    h = s.enroll("web1", {"env": "prod"})
    call = h.watch(0)
    next_event(call)
    done = {}

    def drain():
        try:
            for _ in call:
                pass
            done["code"] = call.code()
        except grpc.RpcError as e:
            done["code"] = e.code()
    t = threading.Thread(target=drain, daemon=True)
    t.start()
    t0 = time.monotonic()
    rc = s.stop(signal.SIGTERM)
    t.join(10)
    assert rc == 0
    assert done.get("code") == grpc.StatusCode.OK  # the stream ended, it did not break
    assert time.monotonic() - t0 < 8
    recs = [r["msg"] for r in s.log_records()]
    assert "shutting down" in recs and "stopped" in recs
    assert any(r.get("reason") == "server shutting down" for r in s.log_records())
