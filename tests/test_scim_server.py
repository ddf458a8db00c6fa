"""Serving SCIM from `step-ssh-server`: off unless configured, `--scim-listen`,
server.yaml settings, its own TLS certificate, failures explained, state kept
across restarts."""
from __future__ import annotations

import datetime as dt
import json
import ssl
import subprocess
import sys

import httpx
import pytest
import yaml
from click.testing import CliRunner

from scim_fixtures import ScimServer
from server_fixtures import free_port, running_server  # noqa: F401
from step_ssh import pki
from step_ssh.server.cli import main as server_main


def run_server(d, *args, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "step_ssh.server.cli", "run", "--dir", str(d),
                           "--listen", "127.0.0.1:0", *args], capture_output=True, text=True, timeout=timeout)


def test_off_unless_configured(running_server):
    rec = next(r for r in running_server.log_records() if r.get("msg") == "listening")
    assert "scim" not in rec


def test_init_and_run_options(tmp_path):
    d = tmp_path / "srv"
    out = CliRunner().invoke(server_main, ["init", "--dir", str(d), "--scim-listen", "0.0.0.0:8444"])
    assert out.exit_code == 0, out.output
    assert yaml.safe_load((d / "server.yaml").read_text())["scim_listen"] == "0.0.0.0:8444"
    out = CliRunner().invoke(server_main, ["init", "--dir", str(tmp_path / "x"), "--scim-listen", "nope"])
    assert out.exit_code != 0 and "HOST:PORT" in out.output
    # --scim-listen overrides server.yaml; a bad value in server.yaml is reported before anything starts
    (d / "server.yaml").write_text("listen: 127.0.0.1:0\nscim_listen: 'no port'\n")
    r = run_server(d)
    assert r.returncode == 1 and "scim_listen 'no port' is not HOST:PORT" in r.stderr
    (d / "server.yaml").write_text("listen: 127.0.0.1:0\nscim_tls_cert: only-cert.pem\n")
    r = run_server(d)
    assert r.returncode == 1 and "give both scim_tls_cert and scim_tls_key" in r.stderr
    (d / "server.yaml").write_text("listen: 127.0.0.1:0\nscim_tls_cert: missing.crt\nscim_tls_key: missing.key\n")
    r = run_server(d, "--scim-listen", "127.0.0.1:0")
    assert r.returncode == 1
    err = [json.loads(x) for x in r.stderr.splitlines() if x.startswith("{")]
    bad = next(x for x in err if x["msg"] == "cannot start the SCIM endpoint")
    assert "missing.crt" in bad["error"]
    # the port is in use
    port = free_port()
    import socket
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port))
        busy.listen()
        (d / "server.yaml").write_text("listen: 127.0.0.1:0\n")
        r = run_server(d, "--scim-listen", f"127.0.0.1:{port}")
        assert r.returncode == 1 and "cannot listen on" in r.stderr


def test_own_certificate_and_restart(tmp_path):
    s = ScimServer(tmp_path)
    # a certificate from another CA, as a public one would be for a cloud IdP
    ca, ca_key = pki.create_ca()
    key = pki.new_private_key()
    cert = pki.issue(ca, ca_key, pki.load_key(key).public_key(), "scim.corp.example", ["127.0.0.1"],
                     client=False, server=True, lifetime=dt.timedelta(days=30))
    (s.dir / "scim.crt").write_bytes(cert)
    (s.dir / "scim.key").write_bytes(key)
    cfg = yaml.safe_load((s.dir / "server.yaml").read_text())
    cfg.update(scim_tls_cert="scim.crt", scim_tls_key=str(s.dir / "scim.key"))  # relative and absolute
    (s.dir / "server.yaml").write_text(yaml.safe_dump(cfg))
    s.start()
    try:
        s.ssl_context = lambda: ssl.create_default_context(cadata=ca.decode())
        u = s.create_user("persist@corp.example")
        g = s.create_group("Persist", members=(u["id"],))
        with pytest.raises(httpx.ConnectError):  # not the control plane's CA any more
            httpx.get(s.base_url + "/Users", verify=ssl.create_default_context(cafile=str(s.dir / "ca.crt")))
        s.restart()
        assert s.http.get(f"/Users/{u['id']}").json()["userName"] == "persist@corp.example"
        assert s.http.get(f"/Groups/{g['id']}").json()["members"][0]["value"] == u["id"]
        rec = [r for r in s.log_records() if r.get("msg") == "listening"][-1]
        assert rec["scim"] == f"https://127.0.0.1:{s.scim_port}/scim/v2"
    finally:
        s.close()
