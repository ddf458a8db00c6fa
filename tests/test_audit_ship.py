"""Shipping the spool to the control plane, with faults: a real
`step-ssh-server run` (mTLS on loopback) and a real `step-ssh agent`
process, events appended with the C writer the PAM module uses.

After each fault the control plane must hold every event that was
acknowledged to the spool exactly once, and the counts must add up."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from agent_helpers import AgentProc, identity_files
from server_fixtures import running_server  # noqa: F401  (pytest fixture)
from step_ssh import audit, doctor
from step_ssh.proto import stepssh_pb2 as pb


def fill(spool: Path, n: int, type_: str = "session_open", tag: str = "u", chunk: int = 500) -> list[str]:
    """n events in the spool, durable (one fdatasync per chunk); their ids."""
    ids = []
    for start in range(0, n, chunk):
        got, why = audit.append_many(spool, [(type_, {"user": f"{tag}{i}", "service": "sshd", "pid": i})
                                             for i in range(start, min(n, start + chunk))], syslog=False)
        assert got, why
        ids += got
    return ids


def stored(server, host_id: str) -> list[str]:
    """Event ids the control plane holds for a host (straight from its database)."""
    conn = sqlite3.connect(f"file:{server.dir / 'server.db'}?mode=ro", uri=True, timeout=10)
    try:
        return [r[0] for r in conn.execute("SELECT id FROM audit WHERE host_id=? ORDER BY seq", (host_id,))]
    finally:
        conn.close()


class Site:
    def __init__(self, server, tmp_path: Path, hostname: str = "web1", **audit_cfg):
        self.server = server
        self.host = server.enroll(hostname, {"env": "prod"})
        self.spool = tmp_path / "state" / "spool"
        self.cfg = {"server": server.address, "identity": identity_files(self.host.identity),
                    "state_dir": str(tmp_path / "state"), "status_file": str(tmp_path / "status.json"),
                    "audit": {"poll_interval": 0.1, **audit_cfg}}
        self.agent = AgentProc(tmp_path, self.cfg)

    def ids(self) -> list[str]:
        return stored(self.server, self.host.id)

    def drained(self, want: int, timeout: float = 60.0) -> dict:
        """Wait until the control plane holds `want` events of this host and the spool is empty."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.agent.status() or {}
            a = st.get("audit") or {}
            if len(self.ids()) >= want and a.get("backlog_bytes") == 0 and a.get("backlog_files") == 0:
                return st
            time.sleep(0.05)
        raise AssertionError(f"not drained: {len(self.ids())} of {want} stored; status "
                             f"{json.dumps((self.agent.status() or {}).get('audit'), indent=1)}\n{self.agent.log()[-3000:]}")


@pytest.fixture
def site(running_server, tmp_path):  # noqa: F811
    s = Site(running_server, tmp_path)
    yield s
    s.agent.kill()


def test_ships_in_order_with_host_from_the_certificate(site):
    ids = fill(site.spool, 1200, chunk=100)
    site.agent.start()
    st = site.drained(1200)
    assert site.ids() == ids  # in spool order, each once
    a = st["audit"]
    assert a["counters"]["shipped"] == 1200 and a["counters"]["skipped"] == 0 and a["last_error"] is None
    ev = site.server.admin.ListAudit(pb.AuditQuery(host="web1", user="u7"), timeout=10).events
    assert len(ev) == 1
    e = ev[0]
    assert e.host_id == site.host.id and e.hostname == "web1" and e.received_us >= e.time_us > 0
    assert e.type == "session_open" and e.result == "success" and e.service == "sshd" and e.pid == 7
    assert json.loads(e.extra_json) == {"host": os.uname().nodename}
    assert not list(site.spool.glob("events*"))
    # `step-ssh status` shows the audit line
    r = subprocess.run([sys.executable, "-m", "step_ssh.cli", "status", "--status-file", site.cfg["status_file"]],
                       capture_output=True, text=True)
    assert "audit:        0 bytes waiting" in r.stdout and "1200 events shipped" in r.stdout, r.stdout


def test_control_plane_down_for_a_while(site):
    s = site.server
    site.agent.start()
    first = fill(site.spool, 100)
    site.drained(100)
    s.stop()
    during = fill(site.spool, 300, tag="d")
    st = site.agent.wait(lambda st: st["audit"]["last_error"] is not None and st["audit"]["backlog_bytes"] > 0,
                         what="the agent noticing")
    assert "UNAVAILABLE" in st["audit"]["last_error"]["message"]
    during += fill(site.spool, 200, tag="e")  # keeps accepting while the control plane is away
    time.sleep(1.5)
    s.start()
    st = site.drained(600)
    assert sorted(site.ids()) == sorted(first + during)
    assert len(site.ids()) == len(set(site.ids())) == 600
    assert st["audit"]["last_error"] is None and st["audit"]["counters"]["failures"] >= 1


def test_agent_killed_mid_shipment_then_the_same_batches_again(site):
    ids = fill(site.spool, 6000)
    site.agent.config["audit"]["batch_size"] = 25
    site.agent.config_path.write_text(yaml.safe_dump(site.agent.config))
    site.agent.start()
    deadline = time.monotonic() + 30
    while len(site.ids()) < 1000 and time.monotonic() < deadline:
        time.sleep(0.005)
    site.agent.proc.send_signal(signal.SIGKILL)  # no goodbye: offsets in memory are lost
    site.agent.proc.wait()
    site.agent.proc = None
    at_kill = len(site.ids())
    assert 0 < at_kill < 6000, at_kill
    assert list(site.spool.glob("events.shipping.*")), "the unacknowledged rest must still be on disk"
    site.agent.start()
    st = site.drained(6000)
    got = site.ids()
    assert len(got) == 6000 and set(got) == set(ids)
    # the restarted agent sent its file again from the start: the control plane stored each id once
    assert st["audit"]["counters"]["shipped"] == 6000 > 6000 - at_kill

    # the very same lines once more (e.g. a backup put back): acknowledged, stored nothing new
    again = [json.dumps({"v": 2, "id": i, "type": "session_open", "user": "dup"}).encode() for i in ids[:50]]
    for line in again:
        assert audit.append_line(site.spool, line) == ""
    site.agent.wait(lambda st: st["audit"]["counters"]["shipped"] == 6050 and st["audit"]["backlog_bytes"] == 0,
                    what="the duplicates shipped")
    assert len(site.ids()) == 6000
    ev = site.server.admin.ListAudit(pb.AuditQuery(host="web1", user="dup"), timeout=10).events
    assert ev == []  # the first copy stands


def test_spool_truncated_mid_record(site):
    before = fill(site.spool, 100)
    events = site.spool / "events"
    os.truncate(events, events.stat().st_size - 20)  # power lost in the middle of the last record
    after = fill(site.spool, 50, tag="after")
    site.agent.start()
    st = site.drained(149)
    got = site.ids()
    assert got == before[:99] + after  # the torn one is skipped, the next one is whole
    assert st["audit"]["counters"]["skipped"] == 1
    assert "skipped a record in events.shipping.0000000001" in site.agent.log()


def test_full_spool(site):
    accepted, dropped = [], 0
    for i in range(200):
        eid, why = audit.append(site.spool, "sudo", {"user": "ops", "command": f"/usr/bin/step {i}"},
                                spool_max=16384, syslog=False)
        if eid:
            accepted.append(eid)
        else:
            dropped += 1
    assert accepted and dropped and len(accepted) + dropped == 200
    assert audit.Spool(site.spool).dropped()[0] == dropped

    # doctor tells, before anything is shipped
    ctx = doctor.Context(site.agent.config_path)
    doctor._load(ctx)
    c = doctor.check_audit_spool(ctx)
    assert c.status == "FAIL" and f"{dropped} event(s) dropped so far" in c.description, c

    site.agent.start()
    site.drained(len(accepted) + 1)
    got = site.ids()
    assert got[:len(accepted)] == accepted
    ev = site.server.admin.ListAudit(pb.AuditQuery(host="web1", type="audit_dropped"), timeout=10).events
    assert len(ev) == 1 and len(got) == len(accepted) + 1
    e = ev[0]
    extra = json.loads(e.extra_json)
    assert extra["count"] == dropped and extra["total_dropped"] == dropped and e.result == "failure"
    # accepted + reported dropped = everything that happened
    assert len(accepted) + extra["count"] == 200
    # reported once, not again after a restart
    site.agent.stop()
    site.agent.start()
    site.agent.wait(lambda st: st["audit"]["state"] == "idle", what="idle")
    time.sleep(0.5)
    assert len(site.ids()) == len(accepted) + 1


def test_tail_shows_the_backlog_then_says_when_the_control_plane_goes(site):
    ids = fill(site.spool, 5)
    site.agent.start()
    site.drained(5)
    tail = subprocess.Popen([sys.executable, "-c", "from step_ssh.ctl import main; main()", "--profile",
                             str(site.server.profile), "audit", "tail", "-n", "2", "--host", "web1", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        lines = []
        while len(lines) < 2 and time.monotonic() < deadline:
            lines.append(tail.stdout.readline())
        assert [json.loads(x)["id"] for x in lines] == ids[-2:]
        site.agent.stop()
        site.server.stop()
        out, err = tail.communicate(timeout=20)
        assert tail.returncode == 5 and "ended the stream" in err, (tail.returncode, out, err)
    finally:
        if tail.poll() is None:
            tail.kill()
            tail.communicate()


def test_doctor_on_a_full_and_a_stuck_spool(site):
    ctx = doctor.Context(site.agent.config_path)
    doctor._load(ctx)
    assert doctor.check_audit_spool(ctx).status == "PASS"
    fill(site.spool, 3)
    c = doctor.check_audit_spool(ctx)
    assert c.status == "PASS" and c.description.startswith("3 event(s)"), c
    os.truncate(site.spool / "events", 64 << 20)  # the PAM module's limit, reached
    c = doctor.check_audit_spool(ctx)
    assert c.status == "FAIL" and "full: new events are being dropped" in c.description, c
    os.truncate(site.spool / "events", 40 << 20)
    c = doctor.check_audit_spool(ctx)
    assert c.status == "WARN" and "over half full" in c.description, c
    # an agent that cannot ship says so through its status file
    ctx.status = {"audit": {"last_error": {"message": "UNAVAILABLE: connection refused"}}}
    c = doctor.check_audit_spool(ctx)
    assert c.status == "WARN" and "the agent cannot ship: UNAVAILABLE" in c.description, c
