"""The agent end to end: a real control plane (`step-ssh-server run`) and a
real `step-ssh agent` on loopback, the agent inside a test host so glibc's NSS
(our module) answers from the cache it publishes."""
from __future__ import annotations

import sys
import time

import pytest

from agent_helpers import AgentProc, enroll_in_host, grant
from server_fixtures import running_server  # noqa: F401  (pytest fixture)
from step_ssh.proto import stepssh_pb2 as pb

pytestmark = pytest.mark.testhost
STEP_SSH = [sys.executable, "-m", "step_ssh.cli"]


def getent(host, db: str, key: str) -> str | None:
    r = host.run(["getent", db, key])
    return r.stdout.strip() if r.returncode == 0 else None


def wait_for(fn, timeout: float = 15.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = fn()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_grant_appears_and_revoke_disappears(testhost, running_server, tmp_path):
    s = running_server
    s.admin.CreateUser(pb.DirectoryUser(name="alice", principals=["alice@example.com"]))
    s.admin.CreateUser(pb.DirectoryUser(name="carol"))
    s.admin.CreateGroup(pb.DirectoryGroup(name="devs", members=["alice", "carol"]))
    # a local account on this host with a managed user's name: local wins
    testhost.run("echo 'carol:x:4242:4242:Local Carol:/home/carol:/bin/sh' >> /etc/passwd", check=True)

    enroll_in_host(testhost, s, "web1", {"env": "prod"})
    mode = testhost.run(["stat", "-c", "%a", "/etc/step-ssh/identity/host.key"]).stdout.strip()
    assert mode == "600"
    assert "server: " + s.address in testhost.read("/etc/step-ssh/agent.yaml")

    # the configuration `enroll` wrote, plus fast test timings
    import yaml
    cfg = yaml.safe_load(testhost.read("/etc/step-ssh/agent.yaml"))
    agent = AgentProc(tmp_path, cfg, host=testhost).start()
    try:
        st = agent.wait(lambda s_: s_["connected"] and s_["ready"], what="connected")
        assert getent(testhost, "passwd", "alice") is None  # no grant yet
        assert st["counters"]["snapshots"] == 1

        gid = grant(s, "devs", {"env": "prod"})
        rev = s.revision()
        agent.wait_revision(rev)
        line = wait_for(lambda: getent(testhost, "passwd", "alice"), what="alice via NSS")
        assert line.startswith("alice:x:")
        assert "devs" in (getent(testhost, "group", "devs") or "")
        # carol stays the local account and the managed one is reported
        assert getent(testhost, "passwd", "carol") == "carol:x:4242:4242:Local Carol:/home/carol:/bin/sh"
        st = agent.status()
        assert st["dropped"]["count"] == 1 and "carol" in st["dropped"]["entries"][0]
        assert "local account" in st["dropped"]["entries"][0]
        # the SSH user CA reached the file sshd's TrustedUserCAKeys reads
        keys = testhost.read("/var/lib/step-ssh/trusted-user-ca-keys").splitlines()
        assert [k.split()[1] for k in keys] == [(s.dir / "ssh_user_ca.pub").read_text().split()[1]]
        # `step-ssh status` (inside the host, as an operator would run it)
        r = testhost.run(STEP_SSH + ["status", "--config", str(agent.config_path)])
        assert r.returncode == 1, r.stdout  # entries dropped: degraded
        assert "connected to" in r.stdout and "carol" in r.stdout and "stepssh://host/" in r.stdout
        r = testhost.run(STEP_SSH + ["status", "--config", str(agent.config_path), "--show-cert"])
        assert "BEGIN CERTIFICATE" in r.stdout and "CA sha256:  " + s.fingerprint in r.stdout
        import json
        js = json.loads(testhost.run(STEP_SSH + ["status", "--config", str(agent.config_path), "--json"]).stdout)
        assert js["running"] and js["connected"] and js["cache_file"]["valid"] and not js["cache_file"]["stale"]
        assert js["cache_file"]["revision"] == js["revision"] and "pem" not in js["certificate"]
        assert js["certificate"]["sans"] == [f"stepssh://host/{js['certificate']['host_id']}"]
        r = testhost.run(STEP_SSH + ["agent", "--config", str(agent.config_path), "--check"])
        assert r.returncode == 0 and ": ok; identity CN=web1" in r.stdout, r.stderr

        s.admin.RemoveGrant(pb.IdRef(id=gid))
        agent.wait_revision(s.revision())
        wait_for(lambda: getent(testhost, "passwd", "alice") is None, what="alice gone")
        assert getent(testhost, "group", "devs") is None
        st = agent.status()
        assert st["counters"]["snapshots"] == 1 and st["counters"]["deltas"] >= 2
        assert st["dropped"]["count"] == 0
    finally:
        assert agent.stop() == 0, agent.log()
    assert "stopping" in agent.log()
    st = agent.status()
    assert st["state"] == "stopped" and not st["connected"]


def test_server_stop_restart_and_agent_restart(testhost, running_server, tmp_path):
    s = running_server
    s.admin.CreateUser(pb.DirectoryUser(name="alice"))
    s.admin.CreateUser(pb.DirectoryUser(name="bob"))
    s.admin.CreateGroup(pb.DirectoryGroup(name="ops", members=["alice"]))
    grant(s, "ops", {"role": "db"}, pb.ACCESS_SUDO)
    enroll_in_host(testhost, s, "db1", {"role": "db"})
    agent = AgentProc(tmp_path, {"server": s.address}, host=testhost).start()
    try:
        agent.wait(lambda x: x["connected"] and x["cache"]["users"] == 1, what="first sync")
        assert getent(testhost, "passwd", "alice")
        cache_before = testhost.run(["sha256sum", "/var/lib/step-ssh/cache"]).stdout

        # -- server stopped: cache untouched, lookups work, status says disconnected
        s.stop()
        st = agent.wait(lambda x: not x["connected"] and x["last_error"] is not None, what="disconnected")
        assert st["state"] == "disconnected"
        assert st["last_error"]["kind"] == "unreachable"
        assert "server unreachable" in st["last_error"]["message"]
        r = testhost.run(STEP_SSH + ["status", "--config", str(agent.config_path)])
        assert r.returncode == 1 and "DISCONNECTED" in r.stdout and "server unreachable" in r.stdout
        time.sleep(1.0)  # a few reconnect attempts
        assert testhost.run(["sha256sum", "/var/lib/step-ssh/cache"]).stdout == cache_before
        assert getent(testhost, "passwd", "alice")
        assert "step-sudo" in (testhost.run(["id", "-nG", "alice"]).stdout)

        # -- server restarted: the agent resumes from its revision, no snapshot
        s.start()
        st = agent.wait(lambda x: x["connected"], what="reconnected")
        assert st["counters"]["connects"] == 2 and st["counters"]["snapshots"] == 1
        s.admin.AddMember(pb.MemberRequest(group="ops", user="bob"))
        st = agent.wait_revision(s.revision())
        assert st["counters"]["snapshots"] == 1 and st["counters"]["deltas"] >= 1
        assert getent(testhost, "passwd", "bob")

        # -- agent restarted: it resumes from the persisted view, deltas only
        assert agent.stop() == 0
        s.admin.RemoveMember(pb.MemberRequest(group="ops", user="alice"))
        agent.start()
        st = agent.wait_revision(s.revision())
        assert st["counters"]["snapshots"] == 0 and st["counters"]["deltas"] == 1
        assert getent(testhost, "passwd", "alice") is None and getent(testhost, "passwd", "bob")
    finally:
        agent.stop()


def test_enroll_refuses_wrong_fingerprint(testhost, running_server):
    s = running_server
    token = s.token("web9", {})
    bogus = "SHA256:" + "A" * 43
    r = testhost.run(STEP_SSH + ["enroll", "--server", s.address, "--token", token, "--fingerprint", bogus])
    assert r.returncode != 0
    assert "fingerprint mismatch" in r.stderr and s.fingerprint in r.stderr
    assert testhost.run(["test", "-e", "/etc/step-ssh/identity/host.key"]).returncode != 0
    # the same token still works with the right fingerprint (nothing was sent)
    r = testhost.run(STEP_SSH + ["enroll", "--server", s.address, "--token", token, "--fingerprint", s.fingerprint])
    assert r.returncode == 0, r.stderr
    # nothing listening
    r = testhost.run(STEP_SSH + ["enroll", "--server", "127.0.0.1:1", "--token", "x", "--fingerprint", bogus,
                                 "--config-dir", "/tmp/nowhere-step-ssh"])
    assert r.returncode != 0 and "server unreachable" in r.stderr and "connection refused" in r.stderr


def test_shrunken_snapshot_refused_and_reported(testhost, running_server, tmp_path):
    """The control plane's database is restored from an old backup: it now
    sends a snapshot with far fewer users, not marked as intended. The agent
    keeps its cache and says why."""
    import shutil
    s = running_server
    s.admin.CreateGroup(pb.DirectoryGroup(name="devs"))
    grant(s, "devs", {"env": "prod"})
    s.admin.CreateUser(pb.DirectoryUser(name="u00"))
    s.admin.AddMember(pb.MemberRequest(group="devs", user="u00"))
    enroll_in_host(testhost, s, "web1", {"env": "prod"})
    s.stop()
    backup = tmp_path / "backup"
    backup.mkdir()
    for f in s.dir.glob("server.db*"):
        shutil.copy2(f, backup / f.name)
    s.start()
    for i in range(1, 12):
        s.admin.CreateUser(pb.DirectoryUser(name=f"u{i:02d}"))
        s.admin.AddMember(pb.MemberRequest(group="devs", user=f"u{i:02d}"))
    agent = AgentProc(tmp_path, {"server": s.address}, host=testhost).start()
    try:
        st = agent.wait(lambda x: x["cache"]["users"] == 12, what="12 users")
        rev = st["revision"]
        s.stop()
        for f in s.dir.glob("server.db*"):
            f.unlink()
        for f in backup.iterdir():
            shutil.copy2(f, s.dir / f.name)
        s.start()
        st = agent.wait(lambda x: x["refused"] is not None, what="refusal")
        assert st["revision"] == rev and st["cache"]["revision"] == rev and st["cache"]["users"] == 12
        assert st["refused"]["users_before"] == 12 and st["refused"]["users_after"] == 1
        assert "refused" in st["refused"]["reason"] and "11 of 12" in st["refused"]["reason"]
        assert st["counters"]["refused"] >= 1
        assert getent(testhost, "passwd", "u11")  # still served
        r = testhost.run(STEP_SSH + ["status", "--config", str(agent.config_path)])
        assert r.returncode == 1 and "REFUSED" in r.stdout
        assert "REFUSED snapshot for revision" in agent.log()
    finally:
        agent.stop()
