"""step-ssh-ctl against a real server: tables, --json, exit codes, and
errors that say what to fix."""
from __future__ import annotations

import datetime as dt
import json
import subprocess
import time
from pathlib import Path

import yaml
from server_fixtures import module_server  # noqa: F401

from step_ssh import pki
from step_ssh.proto import stepssh_pb2 as pb


def ok(r):
    assert r.exit_code == 0, r.output
    return r.output


def js(s, *args):
    return json.loads(ok(s.ctl("--json", *args)))


def test_users_groups_grants_tables_and_json(module_server):
    s = module_server
    assert "created user alice (uid" in ok(s.ctl("user", "add", "alice", "--principal", "alice",
                                                 "--principal", "alice@example.com", "--email", "alice@example.com",
                                                 "--gecos", "Alice Admin"))
    ok(s.ctl("user", "add", "bob", "--uid", "73000", "--shell", "/bin/zsh"))
    out = ok(s.ctl("user", "list"))
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "UID", "GID", "ACTIVE", "PRINCIPALS", "EMAIL", "GECOS"]
    assert any(l.split()[:3] == ["bob", "73000", "73000"] for l in lines)
    data = {u["name"]: u for u in js(s, "user", "list")}
    assert data["alice"]["principals"] == ["alice", "alice@example.com"] and data["bob"]["uid"] == 73000
    assert data["bob"]["shell"] == "/bin/zsh" and data["alice"]["active"] is True

    ok(s.ctl("group", "add", "devs"))
    ok(s.ctl("group", "add-member", "devs", "alice", "bob"))
    g = {x["name"]: x for x in js(s, "group", "list")}
    assert g["devs"]["members"] == ["alice", "bob"]
    out = ok(s.ctl("grant", "add", "--group", "devs", "--tag", "env=prod", "--tag", "role=web", "--access", "sudo"))
    assert "devs gets sudo on hosts with env=prod,role=web" in out
    grants = js(s, "grant", "list")
    assert grants == [{"id": grants[0]["id"], "group": "devs", "access": "sudo",
                       "tags": {"env": "prod", "role": "web"}}]
    assert grants[0]["id"] in ok(s.ctl("grant", "list"))
    ok(s.ctl("group", "rm-member", "devs", "bob"))
    assert js(s, "group", "list")[0]["members"] == ["alice"]

    h = s.enroll("web-ctl", {"env": "prod", "role": "web"})
    out = ok(s.ctl("host", "list"))
    assert "web-ctl" in out and h.id in out and "env=prod,role=web" in out
    shown = js(s, "host", "show", "web-ctl")
    assert shown["id"] == h.id and shown["tags"] == {"env": "prod", "role": "web"}
    assert isinstance(shown["cert_not_after"], int) and shown["cert_not_after"] > time.time()
    view = js(s, "host", "view", "web-ctl")
    assert [(u["name"], u["access"]) for u in view["users"]] == [("alice", "sudo")]
    assert "alice" in ok(s.ctl("host", "view", "web-ctl"))
    ok(s.ctl("host", "tag", "web-ctl", "tier=1"))
    assert js(s, "host", "show", h.id)["tags"] == {"env": "prod", "role": "web", "tier": "1"}
    ok(s.ctl("host", "untag", "web-ctl", "role", "tier"))
    assert js(s, "host", "view", "web-ctl")["users"] == []
    ok(s.ctl("grant", "rm", grants[0]["id"]))
    assert js(s, "grant", "list") == []
    assert "removed host web-ctl" in ok(s.ctl("host", "rm", "web-ctl"))
    assert js(s, "host", "list") == []


def test_directory_import_file(module_server, tmp_path):
    s = module_server
    f = tmp_path / "dir.yaml"
    f.write_text(yaml.safe_dump({
        "users": [{"name": "ivan", "uid": 74000, "principals": ["ivan", "ivan@corp"], "email": "i@corp"},
                  {"name": "judy"}],
        "groups": [{"name": "eng", "gid": 74500, "members": ["ivan", "judy"]}],
    }))
    out = ok(s.ctl("directory", "import", str(f)))
    assert "users 2 created" in out and "groups 1 created" in out
    u = {x["name"]: x for x in js(s, "user", "list")}
    assert u["ivan"]["uid"] == 74000 and u["ivan"]["principals"] == ["ivan", "ivan@corp"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"users": [{"name": "root2", "uid": 0}, {"name": "x", "colour": "red"}]}))
    r = s.ctl("directory", "import", str(bad))
    assert r.exit_code == 2
    assert "users.0.uid" in r.output and "root" in r.output and "users.1.colour" in r.output
    r = s.ctl("directory", "import", str(tmp_path / "missing.yaml"))
    assert r.exit_code == 2 and "cannot read" in r.output


def test_errors_say_what_to_fix(module_server, tmp_path):
    s = module_server
    ok(s.ctl("user", "add", "kate", "--uid", "75000"))
    ok(s.ctl("group", "add", "kates", "--member", "kate"))
    r = s.ctl("grant", "add", "--group", "nosuch", "--tag", "env=prod", "--access", "ssh")
    assert r.exit_code == 3 and "unknown group 'nosuch' in grant" in r.output
    r = s.ctl("grant", "add", "--group", "kates", "--tag", "envprod", "--access", "ssh")
    assert r.exit_code == 2 and "malformed tag 'envprod': write tags as KEY=VALUE" in r.output
    r = s.ctl("user", "add", "leo", "--uid", "75000")
    assert r.exit_code == 1 and "uid 75000 is taken by user kate" in r.output
    r = s.ctl("user", "add", "leo", "--uid", "0")
    assert r.exit_code == 2 and "root" in r.output
    r = s.ctl("user", "add", "Leo")
    assert r.exit_code == 1 and "useradd" in r.output
    r = s.ctl("user", "rm", "nobody-here")
    assert r.exit_code == 3
    r = s.ctl("host", "untag", "x", "env=prod")
    assert r.exit_code == 2 and "KEYS, not KEY=VALUE" in r.output


def _profile(s, tmp_path, name, **changes) -> Path:
    prof = yaml.safe_load(s.profile.read_text())
    prof.update(changes)
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(prof))
    return p


def _cert(ca, ca_key, uri, **kw):
    key = pki.new_private_key()
    return key.decode(), pki.issue(ca, ca_key, pki.load_key(key).public_key(), "x", [uri], **kw).decode()


def test_connection_and_certificate_errors(module_server, tmp_path):
    from server_fixtures import free_port
    s = module_server
    ca_key = (s.dir / "ca.key").read_bytes()
    r = s.ctl("--server", f"127.0.0.1:{free_port()}", "user", "list")
    assert r.exit_code == 5 and "server unreachable" in r.output and "connection refused" in r.output
    r = s.ctl("user", "list", env={"STEP_SSH_PROFILE": str(tmp_path / "none.yaml")})
    assert r.exit_code == 2 and "no admin profile" in r.output

    key, cert = _cert(s.ca_pem, ca_key, pki.admin_uri("old"), not_before=pki.now() - dt.timedelta(days=3),
                      lifetime=dt.timedelta(days=1))
    r = s.ctl("--profile", str(_profile(s, tmp_path, "expired", key=key, cert=cert)), "user", "list")
    assert r.exit_code == 4 and "expired at" in r.output

    key, cert = _cert(s.ca_pem, ca_key, pki.admin_uri("early"), not_before=pki.now() + dt.timedelta(hours=2))
    r = s.ctl("--profile", str(_profile(s, tmp_path, "future", key=key, cert=cert)), "user", "list")
    assert r.exit_code == 4 and "not valid yet" in r.output and "clock" in r.output

    r = s.ctl("--profile", str(_profile(s, tmp_path, "mismatch", key=pki.new_private_key().decode())), "user", "list")
    assert r.exit_code == 4 and "does not match" in r.output

    other_ca, other_key = pki.create_ca("another control plane")
    key, cert = _cert(other_ca, other_key, pki.admin_uri("admin"))
    r = s.ctl("--profile", str(_profile(s, tmp_path, "foreign", key=key, cert=cert)), "user", "list")
    assert r.exit_code == 4 and "not issued by the CA" in r.output

    # a profile for another control plane altogether: the server's certificate does not verify
    p = _profile(s, tmp_path, "other", key=key, cert=cert, ca=other_ca.decode(), ca_fingerprint=pki.fingerprint(other_ca))
    r = s.ctl("--profile", str(p), "user", "list")
    assert r.exit_code == 5 and "not signed by the CA" in r.output

    r = s.ctl("--profile", str(_profile(s, tmp_path, "pin", ca_fingerprint="SHA256:" + "B" * 43)), "user", "list")
    assert r.exit_code == 4 and "pins" in r.output

    r = s.ctl("--profile", str(_profile(s, tmp_path, "san", server_name="wrong.example.com")), "user", "list")
    assert r.exit_code == 5 and "SAN mismatch" in r.output

    # connecting by a name the server certificate carries works
    host, port = s.address.split(":")
    ok(s.ctl("--server", f"localhost:{port}", "user", "list"))


def test_ssh_user_cas_and_signing(module_server, tmp_path):
    s = module_server
    ok(s.ctl("user", "add", "mia", "--principal", "mia", "--principal", "mia@example.com"))
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "mia", "-f", str(tmp_path / "id")],
                   check=True)
    out = ok(s.ctl("ssh", "sign", "--user", "mia", "--pubkey", str(tmp_path / "id.pub"), "--ttl", "2h"))
    certf = tmp_path / "id-cert.pub"
    assert f"wrote {certf}" in out
    info = subprocess.run(["ssh-keygen", "-L", "-f", str(certf)], capture_output=True, text=True, check=True).stdout
    princ = info.split("Principals:")[1].split("Critical Options:")[0].split()
    assert princ == ["mia", "mia@example.com"]
    assert "user certificate" in info
    cas = js(s, "ca", "list")
    assert len(cas) == 1
    builtin = (s.dir / "ssh_user_ca.pub").read_text().split()[1]
    assert cas[0]["public_key"].split()[1] == builtin
    assert cas[0]["id"] in info  # "Signing CA: ED25519 SHA256:..." names the trusted CA
    r = s.ctl("ssh", "sign", "--user", "mia", "--pubkey", str(tmp_path / "id.pub"), "--ttl", "30d")
    assert r.exit_code == 1 and "lifetime" in r.output

    # rotation: a second CA is trusted alongside, then the first is removed
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "new-ca", "-f", str(tmp_path / "ca2")],
                   check=True)
    added = js(s, "ca", "add", str(tmp_path / "ca2.pub"))
    assert added["id"].startswith("SHA256:") and added["comment"] == "new-ca"
    r = s.ctl("ca", "add", str(tmp_path / "ca2.pub"))
    assert r.exit_code == 1 and "already trusted" in r.output
    h = s.enroll("ca-host", {"env": "ca"})
    keys = s.admin.GetHostView(pb.NameRef(name="ca-host"), timeout=10).settings.ssh_user_ca_keys
    assert len(keys) == 2
    ok(s.ctl("ca", "rm", added["id"]))
    assert len(js(s, "ca", "list")) == 1
    s.admin.DeleteHost(pb.NameRef(name=h.hostname), timeout=10)


def test_register_with_the_host_identity(module_server):
    s = module_server
    h = s.enroll("reg-host", {"env": "prod"})
    b = s.enroll("reg-bastion")
    ok(s.ctl("register", "--config-dir", str(b.config_dir), "--server", s.address, "--is-bastion",
             "--tag", "role=bastion"))
    out = ok(s.ctl("register", "--config-dir", str(h.config_dir), "--server", s.address, "--tag", "env=prod",
                   "--tag", "role=db", "--bastion", "reg-bastion"))
    assert "registered reg-host" in out and "behind reg-bastion" in out
    shown = js(s, "host", "show", "reg-host")
    assert shown["tags"] == {"env": "prod", "role": "db"} and shown["bastions"] == ["reg-bastion"]
    # register replaces everything it declares
    ok(s.ctl("register", "--config-dir", str(h.config_dir), "--server", s.address, "--hostname", "reg-host2"))
    shown = js(s, "host", "show", h.id)
    assert shown["hostname"] == "reg-host2" and shown["tags"] == {} and shown["bastions"] == []
    r = s.ctl("register", "--config-dir", str(h.config_dir), "--server", s.address, "--bastion", "nowhere")
    assert r.exit_code == 3 and "not a known host" in r.output
    r = s.ctl("register", "--config-dir", str(h.config_dir.parent / "not-enrolled"), "--server", s.address)
    assert r.exit_code == 2 and "not enrolled" in r.output
    ok(s.ctl("host", "rm", h.id))
    r = s.ctl("register", "--config-dir", str(h.config_dir), "--server", s.address)
    assert r.exit_code == 4 and "certificate rejected" in r.output and "removed" in r.output


def test_audit_list_and_tokens(module_server):
    s = module_server
    h = s.enroll("audit-host")
    now = int(time.time() * 1e6)
    h.stub.ReportAudit(pb.ReportAuditRequest(events=[
        pb.AuditEvent(id="01J00000000000000000000001", type="sudo", user="nia", command="/usr/bin/id",
                      result="success", time_us=now - 3_600_000_000 * 5),
        pb.AuditEvent(id="01J00000000000000000000002", type="login_denied", user="omar", result="denied",
                      reason="no grant", time_us=now)]), timeout=10)
    out = ok(s.ctl("audit", "list", "--host", "audit-host"))
    assert "login_denied" in out and "/usr/bin/id" in out
    evs = js(s, "audit", "list", "--since", "1h")
    assert [e["id"] for e in evs] == ["01J00000000000000000000002"]
    assert js(s, "audit", "list", "--user", "nia")[0]["command"] == "/usr/bin/id"
    assert js(s, "audit", "list", "--type", "sudo", "--since", "2000-01-01T00:00:00Z")[0]["user"] == "nia"
    r = s.ctl("audit", "list", "--since", "yesterday-ish")
    assert r.exit_code == 2

    tok = js(s, "token", "create", "--hostname", "tok-host", "--tag", "env=prod", "--ttl", "10m")
    assert tok["token"].startswith("sst_") and tok["expires_at"] > time.time() + 500
    r = s.enroll_raw(tok["token"], pki.new_private_key(), "tok-host")
    assert r.hostname == "tok-host" and dict(r.tags) == {"env": "prod"}
