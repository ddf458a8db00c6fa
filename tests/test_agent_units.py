"""The agent's parts without a server: applying events (shrink refusal,
resync, confirmation rate limit, persistence), configuration errors,
sd_notify, TLS diagnosis of crafted certificates, `step-ssh status`."""
from __future__ import annotations

import datetime as dt
import re
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from step_ssh import pki
from step_ssh.agent import tlsdiag
from step_ssh.agent.config import ConfigError, parse_config
from step_ssh.agent.notify import Notifier
from step_ssh.agent.sync import Agent, Backoff, Refused, Resync, read_cache_header
from step_ssh.native import NssClient
from step_ssh.proto import stepssh_pb2 as pb


def users(n: int, start: int = 0) -> list[pb.User]:
    return [pb.User(name=f"u{i:03d}", uid=70000 + i, gid=70000 + i, access=pb.ACCESS_SSH) for i in range(start, n)]


def snapshot(rev: int, n: int, intended: bool = False, **settings) -> bytes:
    v = pb.HostView(revision=rev, users=users(n), settings=pb.HostSettings(**settings))
    return pb.WatchEvent(snapshot=pb.Snapshot(view=v, shrink_intended=intended)).SerializeToString()


def delta(base: int, rev: int, remove=(), upsert=(), intended=False) -> bytes:
    return pb.WatchEvent(delta=pb.Delta(base_revision=base, revision=rev, remove_users=list(remove),
                                        upsert_users=list(upsert), shrink_intended=intended)).SerializeToString()


def heartbeat(rev: int) -> bytes:
    return pb.WatchEvent(heartbeat=pb.Heartbeat(revision=rev, server_time=int(time.time()))).SerializeToString()


@pytest.fixture
def make_agent(tmp_path):
    (tmp_path / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (tmp_path / "group").write_text("root:x:0:\n")

    def make(**extra) -> Agent:
        cfg = parse_config({"server": "127.0.0.1:1", "state_dir": str(tmp_path / "state"),
                            "status_file": str(tmp_path / "status.json"),
                            "passwd_file": str(tmp_path / "passwd"), "group_file": str(tmp_path / "group"),
                            "identity": {"type": "builtin", "dir": str(tmp_path / "identity")}, **extra})
        a = Agent(cfg)
        a._restore()
        return a
    return make


def test_snapshot_then_deltas_are_published_and_persisted(make_agent, tmp_path):
    a = make_agent()
    a._apply_batch([snapshot(3, 5)])
    c = NssClient(a.cfg.cache_path)
    assert [p.name for p in c.passwd_entries()] == [f"u{i:03d}" for i in range(5)]
    a._apply_batch([delta(3, 4, remove=["u000"]), delta(4, 5, upsert=users(7, 5))])  # a burst: one publish
    assert a.counters["publishes"] == 2 and a.counters["deltas"] == 2
    assert [p.name for p in c.passwd_entries()] == [f"u{i:03d}" for i in range(1, 7)]
    assert read_cache_header(a.cfg.cache_path).revision == 5
    # a new agent process resumes from the persisted view
    b = make_agent()
    assert b.view.revision == 5 and b.view.n_users == 6 and b.counters["publishes"] == 0
    b._apply_batch([delta(5, 6, remove=["u001"])])
    assert c.getpwnam("u001") is None
    # the cache lost meanwhile: republished from the persisted view at start
    a.cfg.cache_path.unlink()
    d = make_agent()
    assert d.counters["publishes"] == 1 and read_cache_header(d.cfg.cache_path).revision == 6


def test_implausible_shrink_is_refused_unless_intended(make_agent):
    a = make_agent()
    a._apply_batch([snapshot(3, 30)])
    before = a.cfg.cache_path.read_bytes()
    with pytest.raises(Refused) as e:
        a._apply_batch([snapshot(9, 10)])           # 20 of 30 gone, not marked
    assert "20 of 30" in e.value.info["reason"] and a.refused["users_after"] == 10
    with pytest.raises(Refused):
        a._apply_batch([snapshot(9, 0)])            # empty
    with pytest.raises(Refused):
        a._apply_batch([delta(3, 9, remove=[f"u{i:03d}" for i in range(25)])])
    assert a.cfg.cache_path.read_bytes() == before and a.view.revision == 3
    assert a.counters["refused"] == 3
    a._apply_batch([delta(3, 4, remove=[f"u{i:03d}" for i in range(9)])])   # 9 users: a normal removal
    assert a.view.n_users == 21 and a.refused is None
    a._apply_batch([delta(4, 5, remove=[f"u{i:03d}" for i in range(9, 29)], intended=True)])
    assert a.view.n_users == 1
    a._apply_batch([snapshot(6, 0, intended=True)])
    assert a.view.n_users == 0 and NssClient(a.cfg.cache_path).passwd_entries() == []


def test_accept_shrink_once(make_agent):
    a = make_agent()
    a._apply_batch([snapshot(3, 30)])
    a.accept_shrink = True
    a._apply_batch([snapshot(4, 2)])
    assert a.view.n_users == 2 and not a.accept_shrink


def test_first_snapshot_compared_with_an_existing_cache(make_agent):
    """Persisted view lost but a cache in place: the cache is the baseline."""
    a = make_agent()
    a._apply_batch([snapshot(3, 30)])
    a.cfg.view_file.unlink()
    b = make_agent()
    assert b.view is None
    with pytest.raises(Refused):
        b._apply_batch([snapshot(1, 0)])


def test_out_of_step_events_resync(make_agent):
    a = make_agent()
    with pytest.raises(Resync):
        a._apply_batch([delta(0, 1)])
    a._apply_batch([snapshot(3, 2)])
    with pytest.raises(Resync):
        a._apply_batch([delta(2, 4)])
    with pytest.raises(Resync):
        a._apply_batch([heartbeat(7)])
    assert a.view.revision == 3


def test_heartbeats_confirm_and_republish_rate_limited(make_agent):
    a = make_agent(min_confirm_interval=1)
    a._apply_batch([snapshot(3, 2, max_stale_seconds=80)])
    assert a.confirm_interval() == 10
    a._apply_batch([heartbeat(3)])
    assert a.counters["confirm_republishes"] == 0 and a.counters["heartbeats"] == 1
    state = json.loads(a.cfg.state_file.read_text())
    assert state["revision"] == 3 and abs(state["confirmed_at"] - time.time()) < 5
    a.cache_confirmed_at -= 11
    a._apply_batch([heartbeat(3)])
    assert a.counters["confirm_republishes"] == 1
    assert abs(read_cache_header(a.cfg.cache_path).confirmed_at - time.time()) < 5


def test_trusted_user_ca_keys_written_only_when_changed(make_agent):
    a = make_agent()
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl ca"
    a._apply_batch([snapshot(3, 1, ssh_user_ca_keys=[key])])
    p = a.cfg.trusted_user_ca_keys
    assert p.read_text() == key + "\n" and oct(p.stat().st_mode & 0o777) == "0o644"
    ino = p.stat().st_ino
    a._apply_batch([delta(3, 4, upsert=users(2, 1))])
    assert p.stat().st_ino == ino  # unchanged content: not rewritten
    a._apply_batch([snapshot(5, 2, intended=True)])  # the CA removed: sshd trusts none
    assert p.read_text() == ""


def test_local_account_added_later_wins(make_agent, tmp_path):
    a = make_agent()
    a._apply_batch([snapshot(3, 3)])
    with open(tmp_path / "passwd", "a") as f:
        f.write("u001:x:5000:5000::/home/u001:/bin/sh\n")
    confirmed = a.cache_confirmed_at
    assert a._republish_current()
    assert NssClient(a.cfg.cache_path).getpwnam("u001") is None
    assert read_cache_header(a.cfg.cache_path).confirmed_at == confirmed  # nothing new confirmed
    assert len(a.dropped) == 1 and "u001" in a.dropped[0]


def test_backoff_grows_with_jitter_and_resets():
    b = Backoff(0.5, 4.0)
    seen = [b.next() for _ in range(6)]
    for d, cap in zip(seen, [0.5, 1, 2, 4, 4, 4]):
        assert cap / 2 <= d <= cap
    b.reset()
    assert b.next() <= 0.5


# ---- configuration -----------------------------------------------------------------------

def test_config_errors_name_the_key():
    with pytest.raises(ConfigError) as e:
        parse_config({"server": "cp:8443", "cache_pth": "/x", "identity": {"type": "files", "cert": "/c"},
                      "min_id": 0}, "agent.yaml")
    msg = str(e.value)
    assert "cache_pth: unknown key" in msg
    assert "identity.key: Field required" in msg and "identity.ca: Field required" in msg
    assert "min_id:" in msg and "agent.yaml is invalid" in msg
    with pytest.raises(ConfigError, match="server: must be HOST:PORT"):
        parse_config({"server": "no-port"})
    with pytest.raises(ConfigError, match="server: Field required"):
        parse_config({})
    cfg = parse_config({"server": "[::1]:8443", "state_dir": "/srv/s"})
    assert cfg.cache_path == Path("/srv/s/cache") and cfg.trusted_user_ca_keys == Path("/srv/s/trusted-user-ca-keys")
    assert cfg.host == "::1" and cfg.port == 8443
    assert parse_config({"server": "a:1"}).cache_path == Path("/var/lib/step-ssh/cache")


def test_agent_command_reports_config_errors(tmp_path):
    p = tmp_path / "agent.yaml"
    p.write_text("server: cp:8443\nbackof_max: 3\n")
    r = subprocess.run([sys.executable, "-m", "step_ssh.cli", "agent", "--config", str(p)],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "backof_max: unknown key" in r.stderr


# ---- sd_notify ----------------------------------------------------------------------

def test_sd_notify_messages(tmp_path):
    path = str(tmp_path / "notify")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(2)
    try:
        n = Notifier(path)
        n.ready("serving revision 3")
        assert s.recv(4096) == b"READY=1\nSTATUS=serving revision 3"
        n.status("x")
        n.status("x")  # unchanged: not resent
        n.stopping()
        assert s.recv(4096) == b"STATUS=x"
        assert s.recv(4096) == b"STOPPING=1"
    finally:
        s.close()
    assert Notifier("").send("READY=1") is False


# ---- TLS diagnosis ----------------------------------------------------------------------

NOW = dt.datetime.now(dt.timezone.utc)


def _leaf(ca, sans=("stepssh://host/h1",), **kw):
    key = pki.new_private_key()
    return pki.issue(ca[0], ca[1], pki.load_key(key).public_key(), "h", list(sans), **kw), key


def test_local_identity_checks():
    ca = pki.create_ca()
    cert, key = _leaf(ca)
    assert tlsdiag.check_local(cert, key, ca[0]) == []
    kinds = lambda ds: [d.kind for d in ds]  # noqa: E731
    assert kinds(tlsdiag.check_local(cert, pki.new_private_key(), ca[0])) == ["key_mismatch"]
    old, k2 = _leaf(ca, not_before=NOW - dt.timedelta(days=2), lifetime=dt.timedelta(days=1))
    d = tlsdiag.check_local(old, k2, ca[0])
    assert kinds(d) == ["client_cert_expired"] and "certificate expired" in d[0].message and "1d" in d[0].message
    future, k3 = _leaf(ca, not_before=NOW + dt.timedelta(minutes=30))
    d = tlsdiag.check_local(future, k3, ca[0])
    # 30 min ahead of NOW, which is taken at import: in a long run some minutes
    # have passed by the time this test runs
    assert kinds(d) == ["client_cert_not_yet_valid"] and "clock skew" in d[0].message
    assert re.search(r"clock skew of at least 2\dm", d[0].message), d[0].message
    other = pki.create_ca("other")
    d = tlsdiag.check_local(cert, key, other[0])
    assert kinds(d) == ["unknown_ca"] and pki.fingerprint(other[0]) in d[0].message


def test_server_chain_checks():
    ca = pki.create_ca()
    srv, _ = _leaf(ca, sans=("cp.example.com", "*.cp.example.org", "10.1.2.3"), server=True)
    chain = [srv, ca[0]]
    check = lambda name, ca_pem=ca[0]: tlsdiag.check_server_chain(chain, ca_pem, name, f"{name}:1")  # noqa: E731
    assert check("cp.example.com") is None and check("a.cp.example.org") is None and check("10.1.2.3") is None
    d = check("cp.wrong.example")
    assert d.kind == "san_mismatch" and "SAN mismatch" in d.message and "cp.example.com" in d.message
    assert check("a.b.cp.example.org").kind == "san_mismatch"
    assert check("10.1.2.4").kind == "san_mismatch"
    d = check("cp.example.com", pki.create_ca("other")[0])
    assert d.kind == "unknown_ca" and pki.fingerprint(ca[0]) in d.message
    old, _ = _leaf(ca, sans=("cp.example.com",), not_before=NOW - dt.timedelta(days=9), lifetime=dt.timedelta(days=1))
    assert tlsdiag.check_server_chain([old], ca[0], "cp.example.com", "x").kind == "server_cert_expired"


def test_probe_nothing_listening():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    d = tlsdiag.probe("127.0.0.1", port, None)
    assert d.kind == "unreachable" and "connection refused" in d.message
    d = tlsdiag.probe("no-such-host.invalid", 443, None)
    assert d.kind == "unreachable" and "cannot resolve" in d.message


# ---- step-ssh status ----------------------------------------------------------------------

def test_status_command_without_agent(tmp_path):
    cli = [sys.executable, "-m", "step_ssh.cli", "status", "--status-file", str(tmp_path / "status.json")]
    r = subprocess.run(cli, capture_output=True, text=True)
    assert r.returncode == 3 and "not running" in r.stdout
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / "status.json").write_text(json.dumps({
        "pid": dead.pid, "state": "connected", "connected": True, "server": "cp:8443", "revision": 4,
        "updated_at": time.time() - 60, "counters": {"snapshots": 1}, "dropped": {"count": 0, "entries": []},
        "config": {"cache_path": str(tmp_path / "cache")}}))
    r = subprocess.run(cli, capture_output=True, text=True)
    assert r.returncode == 3 and "NOT RUNNING" in r.stdout and "revision:     4" in r.stdout
    r = subprocess.run(cli + ["--json"], capture_output=True, text=True)
    st = json.loads(r.stdout)
    assert st["running"] is False and st["cache_file"]["valid"] is False
