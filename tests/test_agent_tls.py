"""Every TLS failure the agent can meet produces a message an operator can
act on; certificates rotate without the stream going away for longer than a
reconnect; systemd hears READY/STATUS/STOPPING. Real server, real agent
processes on loopback."""
from __future__ import annotations

import datetime as dt
import shutil
import socket
import time
from pathlib import Path


from agent_helpers import AgentProc, grant, identity_files, issue_host_cert
from server_fixtures import free_port, running_server  # noqa: F401  (pytest fixture)
from step_ssh import pki
from step_ssh.proto import stepssh_pb2 as pb

NOW = dt.datetime.now(dt.timezone.utc)


def _identity_variant(src: Path, dst: Path, **files: bytes) -> Path:
    dst.mkdir(parents=True)
    for name in ("host.crt", "host.key", "ca.crt"):
        (dst / name).write_bytes(files.get(name.replace(".", "_"), (src / name).read_bytes()))
    (dst / "host.key").chmod(0o600)
    return dst


def _agent(tmp_path: Path, name: str, server: str, identity: dict, **extra) -> AgentProc:
    work = tmp_path / name
    work.mkdir(exist_ok=True)
    cfg = {"server": server, "identity": identity, "state_dir": str(work / "state"),
           "status_file": str(work / "status.json"), **extra}
    return AgentProc(work, cfg, name=name)


def test_tls_failures_are_explained(running_server, tmp_path):
    s = running_server
    h = s.enroll("web1", {"env": "prod"})
    good = h.identity
    key = (good / "host.key").read_bytes()
    other_ca = pki.create_ca("some other CA")
    rogue_key = pki.new_private_key()

    cases = {
        # name: (identity files, extra config, kind, words that must appear)
        "other_ca_trusted": (dict(ca_crt=other_ca[0]), {}, "unknown_ca",
                             ["unknown CA", "does not trust", pki.fingerprint(other_ca[0])]),
        "cert_from_other_ca": (dict(host_crt=issue_host_cert(s, h.id, rogue_key, ca=other_ca), host_key=rogue_key),
                               {}, "unknown_ca", ["unknown CA"]),
        "expired": (dict(host_crt=issue_host_cert(s, h.id, key, not_before=NOW - dt.timedelta(hours=3),
                                                  lifetime=dt.timedelta(hours=1))),
                    {}, "client_cert_expired", ["certificate expired", "2h", "re-enroll"]),
        "not_yet_valid": (dict(host_crt=issue_host_cert(s, h.id, key, not_before=NOW + dt.timedelta(hours=2))),
                          {}, "client_cert_not_yet_valid", ["not yet valid", "clock skew", "timedatectl"]),
        "wrong_san": ({}, {"server_name": "cp.wrong.example"}, "san_mismatch",
                      ["SAN mismatch", "cp.wrong.example", "127.0.0.1"]),
        "key_mismatch": (dict(host_key=pki.new_private_key()), {}, "key_mismatch",
                         ["key does not match certificate"]),
        "nothing_listening": ({}, {"server": f"127.0.0.1:{free_port()}"}, "unreachable",
                              ["server unreachable", "connection refused"]),
    }
    agents = {}
    try:
        for name, (files, extra, _, _) in cases.items():
            ident = _identity_variant(good, tmp_path / name / "identity", **files)
            agents[name] = _agent(tmp_path, name, extra.pop("server", s.address),
                                  {"type": "builtin", "dir": str(ident)}, **extra).start()
        failures = []
        for name, (_, _, kind, words) in cases.items():
            a = agents[name]
            try:
                st = a.wait(lambda x: x["last_error"] is not None, timeout=30, what=f"{name} error")
            except AssertionError as e:
                failures.append(str(e))
                continue
            err = st["last_error"]
            text = err["message"] + " " + err["hint"]
            if err["kind"] != kind or not all(w in text for w in words):
                failures.append(f"{name}: expected {kind} with {words}, got {err}")
            elif err["message"] not in a.log():
                failures.append(f"{name}: the message is not in the agent's log:\n{a.log()}")
            if st["connected"] or st["cache"]:
                failures.append(f"{name}: connected or published despite the failure: {st}")
        assert not failures, "\n\n".join(failures)
    finally:
        for a in agents.values():
            a.stop()


def test_server_certificate_expired_and_not_yet_valid(running_server, tmp_path):
    s = running_server
    h = s.enroll("web1", {})
    ca, ca_key = (s.dir / "ca.crt").read_bytes(), (s.dir / "ca.key").read_bytes()
    for case, nb, life, words in (
            ("expired", NOW - dt.timedelta(days=3), dt.timedelta(days=1), ["certificate expired", "server's"]),
            ("not_yet_valid", NOW + dt.timedelta(hours=5), dt.timedelta(days=1), ["not yet valid", "clock skew"])):
        s.stop()
        skey = pki.new_private_key()
        scert = pki.issue(ca, ca_key, pki.load_key(skey).public_key(), "localhost", ["localhost", "127.0.0.1"],
                          client=False, server=True, lifetime=life, not_before=nb)
        (s.dir / "server.key").write_bytes(skey)
        (s.dir / "server.crt").write_bytes(scert + ca)
        s.start()
        a = _agent(tmp_path, case, s.address, {"type": "builtin", "dir": str(h.identity)}).start()
        try:
            st = a.wait(lambda x: x["last_error"] is not None, timeout=30, what=case)
            err = st["last_error"]
            assert err["kind"] == f"server_cert_{case}", err
            assert all(w in err["message"] for w in words), err
        finally:
            a.stop()


def test_files_identity_is_reloaded_when_fixed(running_server, tmp_path):
    """A files identity whose key does not match: the agent says so, then
    connects as soon as the right key appears (no restart)."""
    s = running_server
    h = s.enroll("web1", {})
    ident = _identity_variant(h.identity, tmp_path / "ext", host_key=pki.new_private_key())
    a = _agent(tmp_path, "files", s.address, identity_files(ident), check_interval=0.2).start()
    try:
        st = a.wait(lambda x: x["last_error"] is not None, what="key mismatch")
        assert st["last_error"]["kind"] == "key_mismatch"
        shutil.copy(h.identity / "host.key", ident / "host.key")
        st = a.wait(lambda x: x["connected"], what="connected after the fix")
        assert st["last_error"] is None and st["certificate"]["identity"] == "files"
        # the external tool rotates the certificate (the server records the
        # newest one per host): reloaded, stream switched
        serial = st["certificate"]["serial"]
        csr = pki.make_csr((ident / "host.key").read_bytes(), "web1")
        (ident / "host.crt").write_bytes(h.stub.Renew(pb.RenewRequest(csr_pem=csr), timeout=10).certificate_pem)
        st = a.wait(lambda x: x["certificate"]["serial"] != serial and x["connected"]
                    and x["counters"]["stream_switches"] >= 1, what="reloaded certificate")
        assert st["counters"]["identity_reloads"] >= 1
    finally:
        a.stop()


def test_certificate_renewed_before_expiry_while_streaming(running_server, tmp_path):
    """The control plane issues 15-second host certificates: the agent renews
    each at ~10 s over a separate call and moves the stream to the new one."""
    s = running_server
    s.stop()
    lifetime = 15.0  # usable seconds; the server backdates notBefore by pki.BACKDATE
    with open(s.dir / "server.yaml", "a") as f:
        f.write(f"host_cert_hours: {(lifetime + pki.BACKDATE.total_seconds()) / 3600}\n")
    s.start()
    s.admin.CreateUser(pb.DirectoryUser(name="alice"))
    s.admin.CreateGroup(pb.DirectoryGroup(name="devs", members=[]))
    grant(s, "devs", {"env": "prod"})
    h = s.enroll("web1", {"env": "prod"})
    key = (h.identity / "host.key").read_bytes()
    first = pki.load_cert((h.identity / "host.crt").read_bytes())
    a = _agent(tmp_path, "renew", s.address, {"type": "builtin", "dir": str(h.identity)}).start()
    try:
        a.wait(lambda x: x["connected"], what="connected with the short certificate")
        st = a.wait(lambda x: x["counters"]["renewals"] >= 1 and x["connected"]
                    and x["counters"]["stream_switches"] >= 1, timeout=20, what="renewal")
        renewed = pki.load_cert((h.identity / "host.crt").read_bytes())
        assert renewed.serial_number != first.serial_number
        assert renewed.not_valid_after_utc > first.not_valid_after_utc
        assert (h.identity / "host.key").read_bytes() == key  # same key, new certificate
        assert st["counters"]["connect_failures"] == 0 and st["last_error"] is None
        # well past the first certificate's expiry, changes still flow
        time.sleep(max(0.0, first.not_valid_after_utc.timestamp() - time.time() + 0.5))
        s.admin.AddMember(pb.MemberRequest(group="devs", user="alice"))
        st = a.wait(lambda x: x["cache"]["users"] == 1, what="change after the first certificate expired")
        c = st["counters"]
        assert c["connect_failures"] == 0 and c["renew_failures"] == 0
        # every reconnect was a certificate switch, never a failure
        assert c["connects"] == 1 + c["stream_switches"] and c["snapshots"] == 1
        log = a.log()
        renew_lines = [ln for ln in log.splitlines() if "certificate renewed" in ln]
        assert renew_lines and "ERROR" not in log, log
    finally:
        a.stop()


def _notifications(sock: socket.socket, until: str, timeout: float = 20.0) -> list[str]:
    got = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            got.append(sock.recv(4096).decode())
        except socket.timeout:
            break
        if until in got[-1]:
            return got
    raise AssertionError(f"no {until!r} from the agent; got {got}")


def test_systemd_notifications(running_server, tmp_path):
    """READY=1 once the control plane confirmed the cache; STOPPING=1 on
    SIGTERM; and with the control plane down at start, READY=1 after
    ready_timeout because a valid cache from the earlier run is in place."""
    s = running_server
    h = s.enroll("web1", {})
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    a = _agent(tmp_path, "sd", s.address, {"type": "builtin", "dir": str(h.identity)}, ready_timeout=1)
    try:
        a.start(env={"NOTIFY_SOCKET": path})
        got = _notifications(sock, "READY=1")
        assert "STATUS=connected to" in got[-1]
        assert a.status()["ready"] and a.status()["connected"]
        assert a.stop() == 0
        assert any("STOPPING=1" in m for m in _notifications(sock, "STOPPING=1", timeout=5))
        s.stop()
        a.start(env={"NOTIFY_SOCKET": path})
        t0 = time.monotonic()
        got = _notifications(sock, "READY=1")
        assert time.monotonic() - t0 >= 0.9
        if not any("STATUS=disconnected: server unreachable" in m for m in got):  # may follow READY
            got += _notifications(sock, "STATUS=disconnected: server unreachable", timeout=10)
        st = a.wait(lambda x: x["last_error"] is not None, what="the connection failure in the status")
        assert st["ready"] and not st["connected"] and st["last_error"]["kind"] == "unreachable"
        assert "serving the cache" in a.log()
    finally:
        a.stop()
        sock.close()
