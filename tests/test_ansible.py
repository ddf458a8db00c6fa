"""The Ansible role, for real: ansible-playbook (connection local) inside a
test host against a real control plane, verified with testinfra; a second run
changes nothing; the deactivate path restores the host. Plus ansible-lint."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from activation_fixtures import infra, seed_directory, snapshot
from server_fixtures import module_server  # noqa: F401  (pytest fixture)
from step_ssh.testhost import TestHost

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.prefix) / "bin"
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

pytestmark = pytest.mark.skipif(not (BIN / "ansible-playbook").exists(), reason="ansible-core not installed")


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> Path:
    """step-ssh built as a wheel, as a package mirror would serve it."""
    out = tmp_path_factory.mktemp("wheels")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(ROOT)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="module")
def server(module_server):  # noqa: F811
    seed_directory(module_server)
    return module_server


def playbook(th: TestHost, extra: dict, tags: str = "") -> tuple[int, str, dict[str, int]]:
    th.write("/run/ansible/inventory.yml", yaml.safe_dump({"all": {"children": {"stepssh": {"hosts": {
        "localhost": {"ansible_connection": "local", "ansible_python_interpreter": "/usr/bin/python3"}}}}}}))
    th.write("/run/ansible/vars.yml", yaml.safe_dump(extra), 0o600)
    cmd = (f"cd {ROOT}/ansible && PATH={SYSTEM_PATH} ANSIBLE_LOCAL_TEMP=/run/ansible/tmp "
           f"ANSIBLE_HOME=/run/ansible/home ANSIBLE_NOCOLOR=1 {BIN}/ansible-playbook "
           f"-i /run/ansible/inventory.yml site.yml -e @/run/ansible/vars.yml" + (f" --tags {tags}" if tags else ""))
    r = th.run(cmd, timeout=600)
    out = r.stdout + r.stderr
    m = re.search(r"localhost\s*:\s*ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", out)
    recap = dict(zip(("ok", "changed", "unreachable", "failed"), map(int, m.groups()))) if m else {}
    return r.returncode, out, recap


def test_role_activates_idempotently_and_deactivates(server, wheels):
    th = TestHost(extra_overlays=["/usr", "/opt"]).start()
    try:
        th.run(f"mkdir -p /run/wheels && cp {wheels}/*.whl /run/wheels/", check=True)
        before = snapshot(th)
        token = server.token("web7", {"env": "prod"})
        vars_ = {"step_ssh_server": server.address, "step_ssh_fingerprint": server.fingerprint,
                 "step_ssh_token": token, "step_ssh_hostname": "web7",
                 "step_ssh_tags": {"env": "prod", "role": "web"},
                 "step_ssh_pip_extra_args": "--find-links /run/wheels"}

        rc, out, recap = playbook(th, vars_)
        assert rc == 0, out[-4000:]
        assert recap["failed"] == 0 and recap["changed"] >= 2
        assert token not in out, "the enrollment token must not appear in Ansible's output"

        t = infra(th)
        assert t.file("/opt/step-ssh/venv/bin/step-ssh").exists
        assert t.run("/opt/step-ssh/venv/bin/step-ssh --version").stdout.strip().endswith("0.1.0")
        assert "files stepssh" in t.file("/etc/nsswitch.conf").content_string
        assert t.file("/etc/sudoers.d/step-ssh").mode == 0o440
        assert t.file("/usr/lib/x86_64-linux-gnu/security/pam_stepssh.so").exists
        assert t.run("pgrep -f '[s]tep_ssh.cli agent'").rc == 0
        assert t.user("alice").exists and not t.user("carol").exists
        host = json.loads(server.ctl("host", "show", "web7", "--json").output)
        assert host["tags"] == {"env": "prod", "role": "web"}

        rc, out, recap = playbook(th, vars_)
        assert rc == 0, out[-4000:]
        assert recap["changed"] == 0, out[-4000:]

        rc, out, recap = playbook(th, {**vars_, "step_ssh_state": "absent", "step_ssh_purge": True})
        assert rc == 0, out[-4000:]
        assert recap["changed"] >= 1
        after = snapshot(th)
        assert {k: v for k, v in after.items() if not k.startswith("/opt/")} == before
        assert t.run("pgrep -f '[s]tep_ssh.cli agent'").rc == 1
    finally:
        th.close()


@pytest.mark.skipif(not (BIN / "ansible-lint").exists(), reason="ansible-lint not installed")
def test_ansible_lint_clean():
    r = subprocess.run([str(BIN / "ansible-lint"), "--offline", "-q", "site.yml", "roles/step_ssh"],
                       cwd=ROOT / "ansible", capture_output=True, text=True,
                       env={"PATH": f"{BIN}:{SYSTEM_PATH}", "HOME": "/tmp", "ANSIBLE_HOME": "/tmp/.ansible-lint"})
    assert r.returncode == 0, r.stdout + r.stderr

