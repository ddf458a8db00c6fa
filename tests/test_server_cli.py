"""step-ssh-server init / token / profile / run as commands."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
import time

import grpc
import yaml

from click.testing import CliRunner
from cryptography import x509
from server_fixtures import module_server, running_server  # noqa: F401

from step_ssh import pki, rpc
from step_ssh.proto import stepssh_pb2 as pb
from step_ssh.proto import stepssh_pb2_grpc as pbg
from step_ssh.server.cli import main


def run_cli(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def server_cmd(*args, **kw):
    return subprocess.run([sys.executable, "-m", "step_ssh.server.cli", *args], capture_output=True, text=True,
                          timeout=60, **kw)


def test_init_layout_modes_and_sans(tmp_path):
    d = tmp_path / "srv"
    r = run_cli("init", "--dir", str(d), "--san", "cp.example.com", "--san", "10.0.0.5")
    assert r.exit_code == 0, r.output
    fp = pki.fingerprint((d / "ca.crt").read_bytes())
    assert f"CA fingerprint (hosts pin this): {fp}" in r.output
    for name in ("ca.key", "server.key", "admin-profile.yaml", "ssh_user_ca", "server.db"):
        assert stat.S_IMODE(os.stat(d / name).st_mode) == 0o600, name
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    cert = pki.load_cert((d / "server.crt").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names = set(san.get_values_for_type(x509.DNSName)) | {str(i) for i in san.get_values_for_type(x509.IPAddress)}
    assert {"localhost", "127.0.0.1", "::1", "cp.example.com", "10.0.0.5"} <= names
    r = run_cli("init", "--dir", str(d))
    assert r.exit_code == 1 and "already initialized" in r.output


def test_init_with_an_existing_ca(tmp_path):
    ca, key = pki.create_ca("corp CA")
    (tmp_path / "ca.pem").write_bytes(ca)
    (tmp_path / "ca.key").write_bytes(key)
    (tmp_path / "other.key").write_bytes(pki.new_private_key())
    leaf_key = pki.new_private_key()
    (tmp_path / "leaf.pem").write_bytes(pki.issue(ca, key, pki.load_key(leaf_key).public_key(), "leaf"))
    r = run_cli("init", "--dir", str(tmp_path / "a"), "--ca-cert", str(tmp_path / "ca.pem"), "--ca-key",
                str(tmp_path / "other.key"))
    assert r.exit_code == 1 and "does not match" in r.output
    r = run_cli("init", "--dir", str(tmp_path / "b"), "--ca-cert", str(tmp_path / "leaf.pem"), "--ca-key",
                str(tmp_path / "ca.key"))
    assert r.exit_code == 1 and "not a CA certificate" in r.output
    r = run_cli("init", "--dir", str(tmp_path / "c"), "--ca-cert", str(tmp_path / "ca.pem"))
    assert r.exit_code == 1 and "both --ca-cert and --ca-key" in r.output
    r = run_cli("init", "--dir", str(tmp_path / "d"), "--ca-cert", str(tmp_path / "ca.pem"), "--ca-key",
                str(tmp_path / "ca.key"), "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["ca_fingerprint"] == pki.fingerprint(ca)
    assert not (tmp_path / "a").exists() or not (tmp_path / "a" / "server.db").exists()


def test_token_command_against_a_running_server(module_server):
    s = module_server
    r = server_cmd("token", "--dir", str(s.dir), "--hostname", "cli-host", "--tag", "env=prod", "--ttl", "5m")
    assert r.returncode == 0, r.stderr
    tok = r.stdout.strip()
    assert tok.startswith("sst_") and len(r.stdout.splitlines()) == 1
    e = s.enroll_raw(tok, pki.new_private_key(), "cli-host")
    assert e.hostname == "cli-host" and dict(e.tags) == {"env": "prod"}
    r = server_cmd("token", "--dir", str(s.dir), "--hostname", "x", "--tag", "nonsense")
    assert r.returncode == 1 and "malformed tag" in r.stderr
    r = server_cmd("token", "--dir", str(s.dir), "--hostname", "x", "--ttl", "soon")
    assert r.returncode == 1 and "invalid duration" in r.stderr
    r = server_cmd("token", "--dir", str(s.base / "nowhere"), "--hostname", "x")
    assert r.returncode == 1 and "not an initialized server directory" in r.stderr


def test_profile_command_issues_a_working_admin_profile(module_server, tmp_path):
    s = module_server
    out = tmp_path / "ops.yaml"
    r = run_cli("profile", "--dir", str(s.dir), "--name", "ops", "--out", str(out), "--server", s.address)
    assert r.exit_code == 0, r.output
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600
    r = s.ctl("--profile", str(out), "--json", "user", "list")
    assert r.exit_code == 0, r.output
    def by_ops(rec):
        return rec.get("caller") == "admin:ops"
    assert any(by_ops(rec) for rec in s.wait_log(by_ops))


def test_run_refuses_a_busy_port_and_logs_json(module_server):
    s = module_server
    r = server_cmd("run", "--dir", str(s.dir), "--listen", s.address)
    assert r.returncode == 1
    recs = [json.loads(line) for line in r.stderr.splitlines() if line.startswith("{")]
    assert any(rec["msg"] == "cannot start" and rec["level"] == "error" for rec in recs), r.stderr
    r = server_cmd("run", "--dir", str(s.base / "nowhere"))
    assert r.returncode == 1 and "step-ssh-server init" in r.stderr


def test_admin_profiles_are_listed_and_revoked_without_a_restart(module_server, tmp_path):
    s = module_server
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    for out in (a, b):
        r = run_cli("profile", "--dir", str(s.dir), "--name", "leaver", "--out", str(out), "--server", s.address)
        assert r.exit_code == 0, r.output
    serial_a = pki.serial_hex(pki.load_cert(yaml_cert(a)))

    def listed():
        r = run_cli("profiles", "--dir", str(s.dir), "--json")
        assert r.exit_code == 0, r.output
        return {(x["name"], x["serial"]): x["status"] for x in json.loads(r.stdout)}

    mine = {k: v for k, v in listed().items() if k[0] == "leaver"}
    assert len(mine) == 2 and set(mine.values()) == {"valid"} and ("leaver", serial_a) in mine
    assert "admin" in {k[0] for k in listed()}  # the profile `init` wrote
    assert s.ctl("--profile", str(a), "user", "list").exit_code == 0

    openssl_style = ":".join(f"{int(serial_a, 16):040X}"[i:i + 2] for i in range(0, 40, 2))
    r = run_cli("revoke-profile", "--dir", str(s.dir), "--serial", openssl_style)
    assert r.exit_code == 0 and f"revoked admin leaver certificate {serial_a}" in r.output, r.output
    r = s.ctl("--profile", str(a), "user", "list")
    assert r.exit_code != 0 and f"(serial {serial_a}) was revoked at" in r.output, r.output
    assert s.ctl("--profile", str(b), "user", "list").exit_code == 0  # the other one still works

    # b follows the audit log; revoking b ends that stream at its next wake-up
    pb_ = yaml.safe_load(b.read_text())
    stub = pbg.AdminServiceStub(rpc.channel(s.address, rpc.mtls_credentials(
        pb_["ca"].encode(), pb_["cert"].encode(), pb_["key"].encode())))
    host = s.enroll("tail-host", {"env": "t"})
    # (with its backlog, the tail also gets an event stored before it subscribed)
    tail = stub.TailAudit(pb.AuditQuery(host="tail-host"), timeout=30)
    seen, ended = [], {}

    def follow():
        try:
            for ev in tail:
                seen.append(ev.id)
        except grpc.RpcError as e:
            ended.update(code=e.code(), details=e.details())
    t = threading.Thread(target=follow, daemon=True)
    t.start()
    report = lambda i: host.stub.ReportAudit(pb.ReportAuditRequest(events=[  # noqa: E731
        pb.AuditEvent(id=f"01HZREV000000000000000000{i}", type="sudo", user="x", time_us=int(time.time() * 1e6))]),
        timeout=10)
    report(1)
    deadline = time.monotonic() + 10
    while not seen and time.monotonic() < deadline:
        time.sleep(0.05)
    assert seen == ["01HZREV0000000000000000001"]

    r = run_cli("revoke-profile", "--dir", str(s.dir), "--name", "leaver", "--json")
    assert r.exit_code == 0 and [x["name"] for x in json.loads(r.stdout)] == ["leaver"]  # only b was live
    assert s.ctl("--profile", str(b), "user", "list").exit_code != 0
    report(2)
    t.join(10)
    assert ended.get("code") == grpc.StatusCode.UNAUTHENTICATED and "was revoked" in ended["details"], ended
    assert seen == ["01HZREV0000000000000000001"]  # nothing after the revocation
    assert set(v for k, v in listed().items() if k[0] == "leaver") == {"revoked"}
    r = run_cli("revoke-profile", "--dir", str(s.dir), "--name", "leaver")
    assert r.exit_code == 0 and "already revoked; nothing changed" in r.output
    assert s.ctl("user", "list").exit_code == 0  # everyone else is unaffected

    r = server_cmd("revoke-profile", "--dir", str(s.dir), "--name", "nobody-here")
    assert r.returncode == 3 and "no admin certificate issued to 'nobody-here'" in r.stderr
    r = server_cmd("revoke-profile", "--dir", str(s.dir), "--serial", "xyz")
    assert r.returncode == 1 and "not a hexadecimal certificate serial" in r.stderr
    r = server_cmd("revoke-profile", "--dir", str(s.dir))
    assert r.returncode == 2 and "exactly one of --name or --serial" in r.stderr
    text = server_cmd("profiles", "--dir", str(s.dir)).stdout
    assert text.splitlines()[0].split() == ["NAME", "SERIAL", "ISSUED", "EXPIRES", "STATUS"] and "revoked" in text


def yaml_cert(path) -> bytes:
    return yaml.safe_load(path.read_text())["cert"].encode()


def test_audit_retention_prunes_old_events_at_start_and_keeps_the_rest(running_server):
    s = running_server
    host = s.enroll("ret-host", {"env": "r"})
    now_us = int(time.time() * 1e6)
    day_us = 86400 * 10**6
    events = [pb.AuditEvent(id=f"01HZRET00000000000000000{i:02d}", type="sudo", user="x", time_us=now_us - age * day_us)
              for i, age in enumerate((40, 31, 29, 1, 0))]
    host.stub.ReportAudit(pb.ReportAuditRequest(events=events), timeout=10)

    def stored():
        r = s.ctl("--json", "audit", "list", "--host", "ret-host", "--limit", "100")
        assert r.exit_code == 0, r.output
        return sorted(e["id"] for e in json.loads(r.stdout))
    assert len(stored()) == 5
    s.restart()  # the default keeps everything
    assert len(stored()) == 5
    cfg = s.dir / "server.yaml"
    cfg.write_text(cfg.read_text() + "audit_retention_days: 30\n")
    s.restart()
    assert stored() == [e.id for e in events[2:]]
    def pruned(r):
        return r.get("msg") == "audit events pruned"
    rec = [r for r in s.wait_log(pruned) if pruned(r)]
    assert rec and rec[-1]["count"] == 2 and rec[-1]["retention_days"] == 30
    cfg.write_text(cfg.read_text().replace("audit_retention_days: 30", "audit_retention_days: -1"))
    r = server_cmd("run", "--dir", str(s.dir), "--listen", "127.0.0.1:0")
    assert r.returncode == 1 and "audit_retention_days" in r.stderr
