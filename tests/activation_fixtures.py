"""Helpers for activate/deactivate tests: a control plane with a small
directory, test hosts that `activate` may really change, a testinfra backend
that runs inside a test host, and snapshots for byte-identical comparisons."""
from __future__ import annotations

import json
import sys
from typing import Optional

import testinfra
from testinfra.backend.local import LocalBackend

from step_ssh.testhost import TestHost

PY = sys.executable
# Everything activate may touch, for before/after comparisons.
WATCHED = ["/etc", "/var/lib/pam", "/usr/share/pam-configs", "/usr/lib/step-ssh",
           "/usr/lib/x86_64-linux-gnu/libnss_stepssh.so.2", "/usr/lib/x86_64-linux-gnu/security/pam_stepssh.so"]


class TestHostBackend(LocalBackend):
    """testinfra, with every command run inside a test host."""

    NAME = "testhost"
    __test__ = False

    def __init__(self, th: TestHost):
        super().__init__()
        self.th = th

    def run(self, command: str, *args: str, **kwargs):
        cmd = self.get_command(command, *args)
        r = self.th.run(cmd)
        return self.result(r.returncode, self.encode(cmd), r.stdout.encode(), r.stderr.encode())


def infra(th: TestHost) -> testinfra.host.Host:
    return testinfra.host.Host(TestHostBackend(th))


def seed_directory(server) -> None:
    """alice: sudo on env=prod (ops); bob: ssh on env=prod (dev); carol: nothing."""
    for args in (("user", "add", "alice", "--principal", "alice"), ("user", "add", "bob", "--principal", "bob"),
                 ("user", "add", "carol", "--principal", "carol"), ("group", "add", "ops"),
                 ("group", "add", "dev"), ("group", "add-member", "ops", "alice"),
                 ("group", "add-member", "dev", "bob"),
                 ("grant", "add", "--group", "ops", "--tag", "env=prod", "--access", "sudo"),
                 ("grant", "add", "--group", "dev", "--tag", "env=prod", "--access", "ssh")):
        r = server.ctl(*args)
        assert r.exit_code == 0, f"step-ssh-ctl {' '.join(args)}: {r.output}"


def new_host() -> TestHost:
    """A test host where /usr is an overlay too (activate installs modules)."""
    return TestHost(extra_overlays=["/usr"]).start()


SNAPSHOT = """
import hashlib, json, os, stat, sys
out = {}
for top in sys.argv[1:]:
    walk = [(top, [], [""])] if not os.path.isdir(top) or os.path.islink(top) else os.walk(top)
    for d, _, files in walk:
        for f in files:
            p = os.path.join(d, f) if f else d
            try:
                st = os.lstat(p)
            except FileNotFoundError:
                continue
            if stat.S_ISLNK(st.st_mode):
                what = "-> " + os.readlink(p)
            elif stat.S_ISREG(st.st_mode):
                what = hashlib.sha256(open(p, "rb").read()).hexdigest()
            else:
                continue
            out[p] = f"{stat.S_IMODE(st.st_mode):o} {st.st_uid}:{st.st_gid} {what}"
print(json.dumps(out))
"""


def snapshot(th: TestHost) -> dict[str, str]:
    """Mode, owner and sha256 (or link target) of every file activate could touch."""
    r = th.run([PY, "-c", SNAPSHOT, *WATCHED], check=True)
    out = json.loads(r.stdout)
    assert len(out) > 100, "snapshot saw too few files"
    return out


def activate_cmd(server, *extra: str, token: Optional[str] = None) -> str:
    env = f"STEP_SSH_TOKEN={token} " if token else ""
    return (f"{env}{PY} -m step_ssh.cli activate --server {server.address} "
            f"--fingerprint {server.fingerprint} " + " ".join(extra))


def run_json(th: TestHost, cmd: str) -> tuple[int, dict, str]:
    r = th.run(cmd + " --json")
    try:
        data = json.loads(r.stdout) if r.stdout.strip() else {}
    except ValueError:
        data = {}
    return r.returncode, data, r.stderr
