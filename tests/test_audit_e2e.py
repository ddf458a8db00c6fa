"""Audit end to end: a real sshd login and real sudo commands in a test
host reach the control plane with the right fields.

The host is enrolled with `step-ssh enroll` and runs `step-ssh agent` inside
a test host (private mount namespace) where OpenSSH's sshd, PAM (with
pam_stepssh.so) and sudo (with the step-ssh audit plugin in /etc/sudo.conf)
write to the host's spool; the agent ships it to a real control plane over
mTLS. `step-ssh-ctl audit list` and `audit tail` read it back."""
from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import time

import pytest
import yaml

from agent_helpers import AgentProc, enroll_in_host
from login_fixtures import Keys, LoginHost, unavailable
from server_fixtures import running_server  # noqa: F401  (pytest fixture)
from step_ssh.proto import stepssh_pb2 as pb

pytestmark = pytest.mark.testhost

EMPTY_VIEW = {"revision": 1, "users": [], "groups": []}


def wait_events(server, want, timeout: float = 20.0, **query) -> list[pb.AuditEvent]:
    deadline = time.monotonic() + timeout
    while True:
        evs = list(server.admin.ListAudit(pb.AuditQuery(limit=1000, **query), timeout=10).events)
        if want(evs):
            return evs
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out; the control plane has: {[(e.type, e.user, e.result) for e in evs]}")
        time.sleep(0.1)


def test_login_and_sudo_reach_the_control_plane(running_server, tmp_path):  # noqa: F811
    why = unavailable()
    if why:
        pytest.fail(f"cannot run login tests: {why}")
    s = running_server
    # alice: sudo (ops) and ssh (dev); bob: ssh (dev)
    for name in ("alice", "bob"):
        s.admin.CreateUser(pb.DirectoryUser(name=name), timeout=10)
    s.admin.CreateGroup(pb.DirectoryGroup(name="ops", members=["alice"]), timeout=10)
    s.admin.CreateGroup(pb.DirectoryGroup(name="dev", members=["alice", "bob"]), timeout=10)
    ops = s.admin.AddGrant(pb.Grant(group="ops", tags={"env": "prod"}, access=pb.ACCESS_SUDO), timeout=10)
    s.admin.AddGrant(pb.Grant(group="dev", tags={"env": "prod"}, access=pb.ACCESS_SSH), timeout=10)

    keys = Keys()
    lh = LoginHost(keys, view=EMPTY_VIEW, local_dave=False)
    agent = tail = None
    try:
        lh.start()
        lh.start_sshd()
        enroll_in_host(lh.host, s, "app1", {"env": "prod"})
        host_id = s.admin.GetHost(pb.NameRef(name="app1"), timeout=10).id
        cfg = yaml.safe_load(lh.host.read("/etc/step-ssh/agent.yaml"))
        cfg["audit"] = {"poll_interval": 0.1}
        agent = AgentProc(tmp_path, cfg, host=lh.host).start()
        agent.wait(lambda st: st["connected"] and st["ready"], what="agent connected")
        agent.wait_revision(s.revision())

        # the agent's own events: the first view granted alice sudo and bob ssh on this host
        evs = wait_events(s, lambda e: len(e) == 2, host="app1", type="access_changed")
        assert {(e.user, e.old_access, e.access) for e in evs} == {("alice", "none", "sudo"), ("bob", "none", "ssh")}

        # `audit tail` from now on (a separate process, as an operator runs it): whatever
        # arrives before it has subscribed comes as backlog (--since), the rest as followed
        now = dt.datetime.now(dt.timezone.utc).isoformat()  # after the access_changed events above
        tail = subprocess.Popen([sys.executable, "-c", "from step_ssh.ctl import main; main()", "--profile",
                                 str(s.profile), "audit", "tail", "--since", now, "--count", "5", "--user", "alice",
                                 "--json"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

        def cert(user):
            signed = s.admin.SignUserKey(pb.SignRequest(user=user, public_key=keys.pub(user), ttl_seconds=3600),
                                         timeout=10)
            p = tmp_path / f"{user}-cert.pub"
            p.write_text(signed.certificate)
            return p

        wait_for_ca = time.monotonic() + 15
        while (s.dir / "ssh_user_ca.pub").read_text().split()[1] not in \
                lh.host.read("/var/lib/step-ssh/trusted-user-ca-keys"):
            assert time.monotonic() < wait_for_ca, "user CA not on the host"
            time.sleep(0.05)

        # a real login that runs sudo
        r = lh.ssh("alice", "cd /tmp && sudo -n /usr/bin/id -u && id -G", "alice", cert("alice"))
        assert r.returncode == 0, f"{r.stdout}{r.stderr}\n{lh.sshd_output()[-2000:]}"
        uid_line, groups = r.stdout.split("\n")[:2]
        assert uid_line == "0"
        def session_types(evs):
            return [x.type for x in evs if x.type != "access_changed"]

        evs = wait_events(s, lambda e: session_types(e) == ["home_created", "session_open", "sudo", "sudo_exit",
                                                             "session_close"], host="app1", user="alice")
        home, opened, sudo, sudo_exit, closed = [e for e in evs if e.type != "access_changed"]
        for e in evs:
            assert e.host_id == host_id and e.hostname == "app1" and len(e.id) == 26
        assert opened.service == "sshd" and opened.remote_host == "127.0.0.1" and opened.result == "success"
        assert opened.access == "sudo" and opened.uid > 0 and opened.cache_revision > 0
        assert json.loads(opened.extra_json)["home_created"] is True
        assert json.loads(home.extra_json)["home"] == "/home/alice"
        assert sudo.result == "success" and sudo.command == "/usr/bin/id -u" and sudo.target_user == "root"
        assert sudo.cwd == "/tmp" and sudo.service == "sudo" and sudo.uid == opened.uid
        # the command's end, linked to its start; exit status and duration in the extra fields
        assert sudo_exit.result == "success" and sudo_exit.command == sudo.command
        extra = json.loads(sudo_exit.extra_json)
        assert extra["sudo_id"] == sudo.id and extra["exit_status"] == 0 and extra["duration_ms"] >= 0
        # one session: the PAM session id, exported to the shell, carried by sudo
        assert opened.session_id == closed.session_id == home.session_id == sudo.session_id != ""
        assert opened.time_us <= sudo.time_us <= closed.time_us
        assert closed.id > sudo_exit.id > sudo.id > opened.id  # ULIDs sort by time
        if opened.audit_session:  # the kernel's audit session, when pam_loginuid could set it
            assert sudo.audit_session == opened.audit_session

        # revoke alice's sudo grant: her still-open session keeps the step-sudo group, sudoers
        # lets it through, and pam_stepssh (sudo's account phase) refuses: both are recorded
        s.admin.RemoveGrant(pb.IdRef(id=ops.id), timeout=10)
        agent.wait_revision(s.revision())
        alice_uid = opened.uid
        old_session = ["env", f"STEPSSH_SESSION_ID={opened.session_id}", "setpriv", f"--reuid={alice_uid}",
                       f"--regid={alice_uid}", "--groups=" + ",".join(groups.split()), "--"]
        r = lh.host.run(old_session + ["sudo", "-n", "/usr/bin/id", "-u"])
        assert r.returncode != 0 and "PAM account management error" in r.stderr, r.stderr
        evs = wait_events(s, lambda e: {"login_denied", "access_changed"} <= {x.type for x in e} and
                          sum(x.type == "sudo" for x in e) == 2, host="app1", user="alice")
        denied = [e for e in evs if e.type == "login_denied"][-1]
        assert denied.service == "sudo" and denied.result == "denied" and denied.access == "ssh"
        assert denied.reason == "needs 'sudo' access on this host, has 'ssh'"
        assert denied.session_id == opened.session_id  # from the session's environment
        refused = [e for e in evs if e.type == "sudo"][-1]
        # (sudoers reports a failed PAM account check as an authentication failure)
        assert refused.result == "denied" and refused.command == "/usr/bin/id -u"
        assert refused.reason == "authentication failure (sudoers_policy)"
        assert refused.session_id == opened.session_id
        changed = [e for e in evs if e.type == "access_changed"][-1]
        assert (changed.old_access, changed.access) == ("sudo", "ssh") and changed.result == "success"

        # `step-ssh-ctl audit list` with every filter
        out = s.ctl("--json", "audit", "list", "--host", "app1", "--user", "alice", "--type", "sudo",
                    "--since", "1h")
        assert out.exit_code == 0, out.output
        rows = json.loads(out.stdout)
        assert [(r["result"], r["command"], r["target_user"]) for r in rows] == \
            [("success", "/usr/bin/id -u", "root"), (refused.result, "/usr/bin/id -u", "root")]
        assert rows[0]["hostname"] == "app1" and rows[0]["session_id"] == opened.session_id
        text = s.ctl("audit", "list", "--host", "app1", "--type", "sudo").stdout
        assert "as root in /tmp: /usr/bin/id -u" in text and "app1" in text
        text = s.ctl("audit", "list", "--host", "app1", "--type", "sudo_exit").stdout
        assert "exit 0, 0." in text and ": /usr/bin/id -u" in text

        # the tail saw alice's events as they arrived
        out, err = tail.communicate(timeout=20)
        assert tail.returncode == 0, err
        got = [json.loads(line) for line in out.splitlines()]
        assert [g["type"] for g in got] == ["home_created", "session_open", "sudo", "sudo_exit", "session_close"]
        assert got[2]["command"] == "/usr/bin/id -u" and got[2]["extra"]["host"]

        # every event also went to the system log as one JSON line
        logged = {e["id"] for e in lh.syslog_events(home.id, opened.id, sudo.id, sudo_exit.id, closed.id,
                                                    denied.id, refused.id)}
        assert {home.id, opened.id, sudo.id, sudo_exit.id, closed.id, denied.id, refused.id} <= logged
        st = agent.status()
        assert st["audit"]["last_error"] is None and st["audit"]["counters"]["skipped"] == 0
    finally:
        if tail is not None and tail.poll() is None:
            tail.kill()
            tail.communicate()
        if agent is not None:
            agent.stop()
        lh.close()
        keys.close()
