"""The audit spool on one host, without a control plane: the C writer (the
code pam_stepssh.so and the sudo plugin run, through cffi), ids, modes, the
full-spool counter, torn and corrupt records, and the rename + flock
protocol that lets the agent ship while writers append (docs/audit.md)."""
from __future__ import annotations

import json
import multiprocessing
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from step_ssh import audit, hostconfig
from step_ssh.proto import stepssh_pb2 as pb


def read_all(spool: audit.Spool) -> tuple[list[pb.AuditEvent], list]:
    """What the agent would ship now: rotate, lock, read, delete."""
    spool.rotate(1000)
    events, skipped = [], []
    for p in spool.shipping_files():
        f = audit.ShippingFile(p)
        assert f.try_lock(2.0)
        while True:
            b = f.next_batch(100000, 1 << 30)
            events += b.events
            skipped += b.skipped
            f.offset = b.end
            if b.exhausted:
                break
        assert f.done()
        f.remove()
    return events, skipped


# -- ids ------------------------------------------------------------------------

def test_ids_are_ulids_in_time_order():
    ids = [audit.new_ulid() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    now_ms = int(time.time() * 1000)
    for i in ids:
        assert len(i) == 26 and audit._ULID.match(i), i
        assert abs(audit.ulid_time_ms(i) - now_ms) < 5000
    # the 48-bit time prefix sorts as time does
    from step_ssh._native import ffi, lib
    out = ffi.new("char[27]")
    prev = ""
    for ms in (0, 1, 2**20, 1_700_000_000_000, 1_700_000_000_001, 2**48 - 1):
        lib.ss_ulid_encode(ms, b"\xff" * 10 if ms % 2 else b"\0" * 10, out)
        u = ffi.string(out).decode()
        assert audit.ulid_time_ms(u) == ms and u > prev
        prev = u
    assert prev == "7ZZZZZZZZZZZZZZZZZZZZZZZZZ"


def test_event_header_and_mapping(tmp_path):
    spool = tmp_path / "spool"
    eid, why = audit.append(spool, "sudo", {"result": "success", "user": "alice", "uid": 70001, "tty": "/dev/pts/1",
                                            "target_user": "root", "cwd": "/home/alice", "command": "/usr/bin/id -u",
                                            "session_id": "01HZZZZZZZZZZZZZZZZZZZZZZZ", "audit_session": 7,
                                            "pid": 42, "truncated": False}, syslog=False)
    assert eid and not why
    rec = json.loads((spool / "events").read_text())
    assert list(rec)[:5] == ["v", "id", "time", "host", "type"]
    assert rec["v"] == 2 and rec["id"] == eid and rec["host"] == os.uname().nodename
    ev = audit.record_to_pb(rec)
    assert (ev.id, ev.type, ev.user, ev.uid, ev.target_user, ev.cwd, ev.command, ev.result, ev.tty, ev.pid) == \
        (eid, "sudo", "alice", 70001, "root", "/home/alice", "/usr/bin/id -u", "success", "/dev/pts/1", 42)
    assert ev.session_id == "01HZZZZZZZZZZZZZZZZZZZZZZZ" and ev.audit_session == 7
    assert abs(ev.time_us / 1000 - audit.ulid_time_ms(eid)) < 1
    assert json.loads(ev.extra_json) == {"host": os.uname().nodename, "truncated": False}


def test_version_1_records_are_still_read():
    v1 = {"v": 1, "id": "2981df863633272b9f38867ffe3c0498", "time": "2026-11-23T17:04:53.808508Z",
          "type": "denied", "service": "sshd", "user": "erin", "uid": None, "rhost": "10.0.0.1", "pid": 3,
          "reason": "has no access to this host"}
    ev = audit.record_to_pb(v1)
    assert ev.type == "login_denied" and ev.result == "denied" and not ev.HasField("uid")
    assert ev.remote_host == "10.0.0.1" and ev.time_us == 1795453493808508
    ev = audit.record_to_pb({**v1, "type": "session_error", "reason": "cannot create the home"})
    assert ev.type == "session_open" and ev.result == "failure"
    for bad in ([], {"type": "x"}, {"id": "short", "type": "x"}, {"id": "a" * 200, "type": "x"},
                {"id": "01HZZZZZZZZZZZZZZZZZZZZZZZ"}, {"id": "../../etc/passwd", "type": "x"}):
        with pytest.raises(audit.BadRecord):
            audit.record_to_pb(bad)


# -- the writer's guarantees -----------------------------------------------------------

def test_modes_and_refusals(tmp_path):
    spool = tmp_path / "var" / "spool"
    assert audit.append(spool, "session_open", {"user": "bob"}, syslog=False)[0]
    assert stat.S_IMODE(os.stat(spool).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(spool / "events").st_mode) == 0o600
    # a mode loosened by hand is put back by the next writer
    os.chmod(spool / "events", 0o644)
    assert audit.append(spool, "session_open", {"user": "bob"}, syslog=False)[0]
    assert stat.S_IMODE(os.stat(spool / "events").st_mode) == 0o600
    # never through a symlink, never into a hard-linked file, never into a shared directory
    os.rename(spool / "events", tmp_path / "elsewhere")
    os.symlink(tmp_path / "elsewhere", spool / "events")
    eid, why = audit.append(spool, "session_open", {"user": "bob"}, syslog=False)
    assert eid is None and "cannot open" in why
    os.unlink(spool / "events")
    os.link(tmp_path / "elsewhere", spool / "events")
    eid, why = audit.append(spool, "session_open", {"user": "bob"}, syslog=False)
    assert eid is None and "with one link" in why
    os.unlink(spool / "events")
    os.chmod(spool, 0o777)
    eid, why = audit.append(spool, "session_open", {"user": "bob"}, syslog=False)
    assert eid is None and "writable by others" in why


def test_full_spool_drops_and_counts(tmp_path):
    spool = audit.Spool(tmp_path / "spool")
    accepted, dropped = [], 0
    for i in range(60):
        eid, why = audit.append(spool.dir, "session_open", {"user": f"u{i}"}, spool_max=4096, syslog=False)
        if eid:
            accepted.append(eid)
        else:
            assert "is full" in why
            dropped += 1
    assert accepted and dropped and len(accepted) + dropped == 60
    count, last = spool.dropped()
    assert count == dropped and abs(last - time.time()) < 60
    assert spool.events.stat().st_size <= 4096
    events, skipped = read_all(spool)
    assert [e.id for e in events] == accepted and not skipped
    # room again: accepted, the counter stays as it was
    assert audit.append(spool.dir, "session_open", {"user": "x"}, spool_max=4096, syslog=False)[0]
    assert spool.dropped()[0] == dropped


def test_torn_and_corrupt_records_are_skipped_never_propagated(tmp_path):
    spool = audit.Spool(tmp_path / "spool")
    first = [audit.append(spool.dir, "session_open", {"user": f"a{i}"}, syslog=False)[0] for i in range(5)]
    size = spool.events.stat().st_size
    os.truncate(spool.events, size - 17)  # a crash in the middle of the last record
    second = [audit.append(spool.dir, "session_close", {"user": f"b{i}"}, syslog=False)[0] for i in range(3)]
    with open(spool.events, "ab") as f:  # a crash that left zeros (delayed allocation)
        f.write(b"\0" * 300)
    third = [audit.append(spool.dir, "sudo", {"user": "c"}, syslog=False)[0]]
    with open(spool.events, "ab") as f:  # a foreign line, an event without id, an absurd line
        f.write(b"not json\n" + json.dumps({"type": "sudo"}).encode() + b"\n" + b"x" * 200_000 + b"\n")
    fourth = [audit.append(spool.dir, "sudo", {"user": "d"}, syslog=False)[0]]
    with open(spool.events, "ab") as f:  # torn at the very end
        f.write(b'{"v":2,"id":"01HZZZZZZZZZZZZZZZZZZZZZZZ","ty')
    events, skipped = read_all(spool)
    assert [e.id for e in events] == first[:4] + second + third + fourth
    reasons = [why for _, why, _ in skipped]  # (zeros are blank, not a record: skipped silently)
    assert reasons[:2] == ["not JSON (JSONDecodeError)"] * 2  # the torn record and the foreign line
    assert len(reasons) == 5, skipped
    assert reasons[-1] == "torn record at the end of the file"
    assert "line of 200000 bytes" in reasons


def test_partial_line_waits_while_a_writer_may_still_append(tmp_path):
    spool = audit.Spool(tmp_path / "spool")
    ids = [audit.append(spool.dir, "session_open", {"user": f"u{i}"}, syslog=False)[0] for i in range(3)]
    with open(spool.events, "ab") as f:
        f.write(b'{"v":2,"id":"01HZZZZZZZZZZZZZZZZZZZZZZZ","type":"sudo"')
    p = spool.rotate(4)
    f = audit.ShippingFile(p)  # not locked: complete lines only, the partial one stays
    b = f.next_batch(100, 1 << 20)
    assert [e.id for e in b.events] == ids and not b.skipped
    f.offset = b.end
    with open(p, "ab") as w:
        w.write(b"}\n")
    b = f.next_batch(100, 1 << 20)
    assert [e.id for e in b.events] == ["01HZZZZZZZZZZZZZZZZZZZZZZZ"]
    f.close()


_FSIZE_CHILD = r"""
import resource, sys
from step_ssh import audit
hard = int(sys.argv[2]) if sys.argv[2] != "inf" else resource.RLIM_INFINITY
resource.setrlimit(resource.RLIMIT_FSIZE, (10, hard))
from step_ssh._native import ffi, lib
j = ffi.new("struct ss_json *")
lib.ss_event_begin(j, b"sudo", ffi.NULL)
lib.ss_json_str(j, b"user", b"mallory")
lib.ss_json_end(j)
why = ffi.new("char[512]")
rc = lib.ss_spool_append(sys.argv[1].encode(), 0, j, why, 512)
print(rc, ffi.string(why).decode(), resource.getrlimit(resource.RLIMIT_FSIZE))
"""


def _has_cap_sys_resource() -> bool:
    eff = [line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("CapEff:")]
    return bool(int(eff[0].split()[1], 16) >> 24 & 1)


@pytest.mark.parametrize("hard", ["inf", "10"])
def test_a_tiny_file_size_limit_does_not_suppress_the_record(tmp_path, hard):
    # sudo runs with the invoking user's resource limits; a hard limit can only
    # be lifted with CAP_SYS_RESOURCE, which sudo (euid 0) has
    if hard != "inf" and not _has_cap_sys_resource():
        pytest.skip("no CAP_SYS_RESOURCE here (container): a hard RLIMIT_FSIZE cannot be lifted")
    spool = audit.Spool(tmp_path / "spool")
    audit.append(spool.dir, "session_open", {"user": "x" * 500}, syslog=False)
    r = subprocess.run([sys.executable, "-c", _FSIZE_CHILD, str(spool.dir), hard], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    want = f"(10, {-1 if hard == 'inf' else 10})"
    assert r.stdout.split()[0] == "0" and r.stdout.strip().endswith(want), r.stdout  # and put back afterwards
    events, _ = read_all(spool)
    assert [e.user for e in events] == ["x" * 500, "mallory"]


# -- shipping while writers append ------------------------------------------------------

def _writer(spool_dir: str, n: int, tag: str, out: str) -> None:
    ids = []
    for i in range(n):
        eid, why = audit.append(spool_dir, "session_open", {"user": f"{tag}-{i}"}, syslog=False)
        assert eid, why
        ids.append(eid)
    Path(out).write_text("\n".join(ids))


def test_rename_and_lock_lose_nothing_under_concurrent_writers(tmp_path):
    """8 processes append as fast as they can while the reader renames,
    locks, reads and deletes over and over: every acknowledged append is read
    exactly once."""
    spool = audit.Spool(tmp_path / "spool")
    spool.ensure()
    ctx = multiprocessing.get_context("fork")
    outs = [tmp_path / f"ids-{k}" for k in range(8)]
    procs = [ctx.Process(target=_writer, args=(str(spool.dir), 400, f"w{k}", str(outs[k]))) for k in range(8)]
    for p in procs:
        p.start()
    got: list[str] = []
    rounds = 0
    while any(p.is_alive() for p in procs) or spool.events.exists():
        events, skipped = read_all(spool)
        assert not skipped
        got += [e.id for e in events]
        rounds += 1
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    written = [i for o in outs for i in o.read_text().split()]
    events, _ = read_all(spool)
    got += [e.id for e in events]
    assert rounds > 3
    assert len(got) == len(written) == 3200
    assert set(got) == set(written)


def test_sudo_conf_block_is_idempotent_and_removable():
    original = "# sudo.conf\nSet disable_coredump false\n"
    once = hostconfig.sudo_conf_with(original)
    assert hostconfig.sudo_conf_with(once) == once
    assert hostconfig.strip_pam_config(once) == original
    assert hostconfig.sudo_conf_plugin_path(once) == hostconfig.SUDO_PLUGIN_PATH
    assert hostconfig.sudo_conf_plugin_path(original) is None
    assert hostconfig.sudo_conf_plugin_path(once.replace("Plugin", "# Plugin")) is None
    assert hostconfig.sudo_conf_with(None).startswith(hostconfig.MARK_BEGIN)
    with pytest.raises(ValueError):
        hostconfig.sudo_conf_with(original, "relative/plugin.so")


def test_access_changes_between_two_published_caches(tmp_path, monkeypatch):
    from step_ssh.agent import audit as agent_audit
    from step_ssh.agent.config import parse_config
    from step_ssh.cache.writer import build
    from step_ssh.view import HostView

    def cache(name, users):
        p = tmp_path / name
        p.write_bytes(build(HostView.model_validate({"revision": 1, "groups": [], "users": [
            {"name": n, "uid": 70000 + i, "gid": 70000 + i, "principals": [n], "access": a}
            for i, (n, a) in enumerate(users)]})))
        return agent_audit.open_cache(p)

    old = cache("old", [("alice", "sudo"), ("bob", "ssh"), ("carol", "ssh")])
    new = cache("new", [("alice", "ssh"), ("carol", "ssh"), ("dave", "sudo")])
    want = [("alice", "sudo", "ssh"), ("bob", "ssh", "none"), ("dave", "none", "sudo")]
    assert agent_audit.access_changes(old, new, None) == want
    assert agent_audit.access_changes(old, new, ["bob", "carol", "zed"]) == [("bob", "ssh", "none")]
    cfg = parse_config({"server": "cp:1", "state_dir": str(tmp_path / "state")})
    monkeypatch.setattr(agent_audit, "MAX_ACCESS_EVENTS", 2)
    assert agent_audit.record_access_changes(cfg, want, 7) == 3
    events, _ = read_all(audit.Spool(cfg.audit.spool_dir))
    assert [(e.type, e.user, e.old_access, e.access, e.cache_revision) for e in events] == [
        ("access_changed", "alice", "sudo", "ssh", 7), ("access_changed", "bob", "ssh", "none", 7),
        ("access_changed", "", "", "", 7)]
    assert events[0].reason == "changed: sudo -> ssh (cache revision 7)"
    assert json.loads(events[2].extra_json)["count"] == 1
    old.close()
    new.close()
