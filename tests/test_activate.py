"""`step-ssh activate` / `deactivate` on real test hosts against a real
control plane: what is configured, idempotence, dry run, byte-identical
restore, rollback after injected failures, --root."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from activation_fixtures import PY, activate_cmd, infra, new_host, run_json, seed_directory, snapshot
from server_fixtures import module_server  # noqa: F401  (pytest fixture)
from step_ssh import hostconfig, paths


@pytest.fixture(scope="module")
def server(module_server):  # noqa: F811
    seed_directory(module_server)
    return module_server


@pytest.fixture
def host():
    th = new_host()
    try:
        yield th
    finally:
        th.close()


def test_activate_configures_everything_and_deactivate_restores(server, host):
    before = snapshot(host)
    token = server.token("web1", {"env": "prod"})

    # dry run: a diff of every file, nothing changed
    rc, dry, err = run_json(host, activate_cmd(server, "--dry-run", token=token))
    assert rc == 0, err
    assert dry["dry_run"] and dry["changed"]
    for f in ("/etc/nsswitch.conf", hostconfig.SUDOERS_PATH, hostconfig.SSHD_DROPIN_PATH,
              hostconfig.PAM_PROFILE_PATH, "/etc/step-ssh/agent.yaml"):
        assert f in dry["files"]
    assert "+passwd:        files stepssh" in dry["diff"]
    assert "+%step-sudo ALL=(ALL:ALL) NOPASSWD: ALL" in dry["diff"]
    assert any("enroll" in a for a in dry["actions"])
    assert snapshot(host) == before

    rc, res, err = run_json(host, activate_cmd(server, "--tag", "env=prod", token=token))
    assert rc == 0, err
    assert res["changed"] and any("enrolled as web1" in a for a in res["actions"])

    t = infra(host)
    ns = t.file("/etc/nsswitch.conf").content_string
    assert "passwd:        files stepssh systemd" in ns and "group:         files stepssh systemd" in ns
    for path, mode in ((f"{paths.lib_dir()}/libnss_stepssh.so.2", 0o644),
                       (f"{paths.security_dir()}/pam_stepssh.so", 0o644),
                       ("/usr/lib/step-ssh/step-ssh-principals", 0o755),
                       (hostconfig.SUDOERS_PATH, 0o440), (hostconfig.SSHD_DROPIN_PATH, 0o644),
                       ("/etc/step-ssh/identity/host.key", 0o600)):
        f = t.file(path)
        assert f.exists and f.user == "root" and f.mode == mode, path
    acct = [line for line in t.file("/etc/pam.d/common-account").content_string.splitlines()
            if line and not line.startswith("#")]
    assert acct[0].split() == ["account", "[success=2", "ignore=ignore", "default=die]", "pam_stepssh.so", "default=ssh"]
    assert "pam_unix.so" in acct[1]
    assert "required pam_stepssh.so" in t.file("/etc/pam.d/common-session").content_string
    dropin = t.file(hostconfig.SSHD_DROPIN_PATH).content_string
    assert "AuthorizedPrincipalsCommand /usr/lib/step-ssh/step-ssh-principals %u %U" in dropin
    assert "TrustedUserCAKeys /var/lib/step-ssh/trusted-user-ca-keys" in dropin
    assert t.run("/usr/sbin/sshd -t").rc == 0
    assert t.run("visudo -c").rc == 0
    # sudo commands go to the audit spool through the audit plugin
    plugin = t.file(hostconfig.SUDO_PLUGIN_PATH)
    assert plugin.exists and plugin.user == "root" and plugin.mode == 0o644
    assert hostconfig.sudo_conf_plugin_path(t.file(hostconfig.SUDO_CONF_PATH).content_string) == \
        hostconfig.SUDO_PLUGIN_PATH
    assert "step-ssh audit plugin" in t.run("sudo -V").stdout
    assert "ExecStart=" in t.file("/etc/systemd/system/step-ssh.service").content_string
    # the agent runs and the directory reached the host through it
    assert t.user("alice").uid >= 1000 and "step-sudo" in t.user("alice").groups
    assert t.user("bob").exists and not t.user("carol").exists
    assert t.user("root").uid == 0

    # idempotent: the second run changes nothing and needs no token
    rc, again, err = run_json(host, activate_cmd(server, "--tag", "env=prod"))
    assert rc == 0, err
    assert again["changed"] is False and again["files"] == []

    rc, off, err = run_json(host, f"{PY} -m step_ssh.cli deactivate")
    assert rc == 0, err
    assert any("stopped the agent" in a for a in off["actions"])
    after = snapshot(host)
    # identity stays (re-activation needs no new token); everything else is byte-identical
    extra = {k for k in after if k.startswith("/etc/step-ssh/")}
    assert {k: v for k, v in after.items() if k not in extra} == before
    assert t.run("pgrep -f '[s]tep_ssh.cli agent'").rc == 1

    rc, purged, err = run_json(host, f"{PY} -m step_ssh.cli deactivate --purge")
    assert rc == 0 and snapshot(host) == before
    assert not t.file("/var/lib/step-ssh").exists


def test_failed_sudoers_check_rolls_back_everything(server, host):
    before = snapshot(host)
    # a visudo that refuses everything, first on PATH inside the test host
    host.write("/usr/local/sbin/visudo", "#!/bin/sh\necho 'visudo: syntax error (injected)' >&2\nexit 1\n", 0o755)
    token = server.token("web2", {"env": "prod"})
    r = host.run("PATH=/usr/local/sbin:$PATH " + activate_cmd(server, token=token))
    assert r.returncode == 1
    assert "syntax error (injected)" in r.stderr and "nothing was changed" in r.stderr
    host.run("rm /usr/local/sbin/visudo", check=True)
    after = snapshot(host)
    assert after == before
    # the token was not spent: enrollment comes after the checks
    rc, res, err = run_json(host, activate_cmd(server, "--no-start", token=token))
    assert rc == 0, err


def test_failed_enrollment_rolls_back_files(server, host):
    before = snapshot(host)
    r = host.run(activate_cmd(server, token="not-a-valid-token"))
    assert r.returncode == 1 and "enrollment failed" in r.stderr
    assert snapshot(host) == before
    assert host.run("test -e /etc/step-ssh/identity").returncode == 1


def test_missing_token_and_wrong_fingerprint_are_clear(server, host):
    r = host.run(f"{PY} -m step_ssh.cli activate --server {server.address} --fingerprint {server.fingerprint}")
    assert r.returncode == 1 and "--token or $STEP_SSH_TOKEN" in r.stderr
    wrong = "SHA256:" + "A" * 43
    before = snapshot(host)
    r = host.run(f"STEP_SSH_TOKEN={server.token('web3')} {PY} -m step_ssh.cli activate "
                 f"--server {server.address} --fingerprint {wrong}")
    assert r.returncode == 1 and "fingerprint" in r.stderr
    assert snapshot(host) == before


def test_root_directory_uses_marked_pam_edits(server, tmp_path):
    root = tmp_path / "image"
    (root / "etc/pam.d").mkdir(parents=True)
    (root / "etc/nsswitch.conf").write_text("passwd: files\ngroup: files\nhosts: files dns\n")
    (root / "etc/pam.d/sshd").write_text("@include common-auth\n@include common-account\n@include common-session\n")
    (root / "etc/pam.d/sudo").write_text("@include common-auth\n@include common-account\n")
    originals = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    cmd = [PY, "-m", "step_ssh.cli", "activate", "--server", server.address, "--fingerprint", server.fingerprint,
           "--root", str(root), "--json"]
    env = {"STEP_SSH_TOKEN": server.token("img1"), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    sshd = (root / "etc/pam.d/sshd").read_text()
    assert sshd.index("pam_stepssh.so") < sshd.index("@include common-account")
    assert hostconfig.MARK_BEGIN in (root / "etc/pam.d/sudo").read_text()
    assert (root / "etc/nsswitch.conf").read_text().startswith("passwd:        files stepssh\n")
    assert (root / "etc/step-ssh/identity/host.crt").exists()
    assert not (root / "usr/share/pam-configs/step-ssh").exists()
    r = subprocess.run([PY, "-m", "step_ssh.cli", "deactivate", "--root", str(root), "--purge"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    now = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    assert now == originals


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze not installed")
def test_systemd_unit_verifies(tmp_path):
    unit = tmp_path / "step-ssh.service"
    unit.write_text((Path(__file__).resolve().parent.parent / "systemd/step-ssh.service").read_text()
                    .replace("@STEP_SSH@", shutil.which("step-ssh") or f"{PY}"))
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    text = unit.read_text()
    for directive in ("Type=notify", "NoNewPrivileges=yes", "ProtectSystem=strict", "PrivateTmp=yes",
                      "CapabilityBoundingSet=\n", "RestrictAddressFamilies=", "Before=nss-user-lookup.target"):
        assert directive in text
