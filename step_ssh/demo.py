"""The README's main job: step-ssh end to end on one machine.

A real control plane (embedded SQLite, mTLS on loopback) gets a small
directory; a *test host* (private mount namespace over /etc, /usr, /var,
/home, so the machine's own files are untouched) is activated against it and
runs a real OpenSSH sshd; then real certificate logins: one allowed, one with
sudo, one denied; a grant is revoked and the next login is refused; the
audit trail the host shipped is listed at the control plane; and
`step-ssh doctor` checks the host. Run as root: `python -m step_ssh.demo`.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from step_ssh.testhost import TestHost

PY = sys.executable


def say(msg: str) -> None:
    print(f"\n==> {msg}", flush=True)


def tool(name: str) -> str:
    """An installed console script of this package (same virtualenv first)."""
    cand = Path(sys.prefix) / "bin" / name
    found = str(cand) if cand.exists() else shutil.which(name)
    if not found:
        raise SystemExit(f"demo failed: {name} is not installed (run scripts/setup.sh)")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Demo:
    def __init__(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="step-ssh-demo-"))
        self.cp_dir = self.tmp / "control-plane"
        self.keys = self.tmp / "keys"
        self.keys.mkdir(mode=0o700)
        self.server: Optional[subprocess.Popen] = None
        self.address = f"127.0.0.1:{free_port()}"
        self.host: Optional[TestHost] = None
        self.ssh_port = free_port()

    # -- helpers -------------------------------------------------------------
    def ctl(self, *args: str, quiet: bool = False) -> str:
        argv = [tool("step-ssh-ctl"), "--profile", str(self.cp_dir / "admin-profile.yaml"), "--server", self.address, *args]
        r = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if not quiet:
            print(f"    $ step-ssh-ctl {' '.join(args)}")
            for line in (r.stdout + r.stderr).strip().splitlines():
                print(f"      {line}")
        if r.returncode != 0:
            raise SystemExit(f"demo failed: step-ssh-ctl {' '.join(args)}: {r.stderr.strip()}")
        return r.stdout

    def inside(self, cmd: str, expect_ok: Optional[bool] = True, show: bool = True, label: str = "") -> subprocess.CompletedProcess:
        assert self.host
        r = self.host.run(cmd, timeout=60)
        if show:
            print(f"    [web1]$ {label or cmd}")
            for line in (r.stdout + r.stderr).rstrip().splitlines():
                if line.strip():
                    print(f"      {line}")
        if expect_ok is True and r.returncode != 0:
            raise SystemExit(f"demo failed: `{label or cmd}` exited {r.returncode}")
        if expect_ok is False and r.returncode == 0:
            raise SystemExit(f"demo failed: `{label or cmd}` should have been refused")
        return r

    def ssh(self, user: str, command: str, expect_ok: bool) -> subprocess.CompletedProcess:
        k = f"/run/demo-keys/{user}"
        cmd = (f"ssh -F /dev/null -o BatchMode=yes -o IdentitiesOnly=yes -o StrictHostKeyChecking=no "
               f"-o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -i {k} -o CertificateFile={k}-cert.pub "
               f"-p {self.ssh_port} {user}@127.0.0.1 '{command}'")
        return self.inside(cmd, expect_ok, label=f"ssh {user}@web1 '{command}'")

    # -- the story -----------------------------------------------------------
    def control_plane(self) -> None:
        say("Starting a control plane (step-ssh-server, SQLite, gRPC over mutual TLS on loopback)")
        r = subprocess.run([tool("step-ssh-server"), "init", "--dir", str(self.cp_dir), "--json"],
                           capture_output=True, text=True, check=True)
        info = json.loads(r.stdout)
        self.fingerprint = info["ca_fingerprint"]
        print(f"    CA fingerprint hosts pin: {self.fingerprint}")
        log = open(self.tmp / "server.log", "wb")
        self.server = subprocess.Popen([tool("step-ssh-server"), "run", "--dir", str(self.cp_dir),
                                        "--listen", self.address, "--heartbeat", "2"],
                                       stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", int(self.address.split(":")[1])), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        else:
            raise SystemExit("demo failed: the control plane did not start:\n" + (self.tmp / "server.log").read_text())
        print(f"    listening on {self.address}")

    def directory(self) -> None:
        say("Adding a directory: alice (ops: sudo on env=prod), bob (dev: ssh on env=prod), carol (no grant)")
        for u in ("alice", "bob", "carol"):
            self.ctl("user", "add", u, "--principal", u)
        self.ctl("group", "add", "ops")
        self.ctl("group", "add", "dev")
        self.ctl("group", "add-member", "ops", "alice")
        self.ctl("group", "add-member", "dev", "bob")
        self.ctl("grant", "add", "--group", "ops", "--tag", "env=prod", "--access", "sudo")
        out = self.ctl("grant", "add", "--group", "dev", "--tag", "env=prod", "--access", "ssh", "--json", quiet=True)
        self.dev_grant = json.loads(out)["id"]
        print(f"    $ step-ssh-ctl grant add --group dev --tag env=prod --access ssh\n      grant {self.dev_grant}")

    def certificates(self) -> None:
        say("Each user gets a short-lived SSH certificate from the control plane's user CA (their principals only)")
        for u in ("alice", "bob", "carol"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", u, "-f", str(self.keys / u)], check=True)
            self.ctl("ssh", "sign", "--user", u, "--pubkey", str(self.keys / f"{u}.pub"), "--ttl", "1h")

    def activate_host(self) -> None:
        say("Starting a test host `web1` (private mount namespace) and activating it in one command")
        self.host = TestHost(extra_overlays=["/usr"]).start()
        token = self.ctl("token", "create", "--hostname", "web1", "--tag", "env=prod", quiet=True).strip().split()[-1]
        self.host.run(f"mkdir -p /run/demo-keys && cp {self.keys}/* /run/demo-keys/ && chmod 600 /run/demo-keys/*",
                      check=True)
        self.inside(f"STEP_SSH_TOKEN={token} {PY} -m step_ssh.cli activate --server {self.address} "
                    f"--fingerprint {self.fingerprint} --tag env=prod",
                    label=f"step-ssh activate --server {self.address} --fingerprint {self.fingerprint[:20]}… "
                          "--tag env=prod   (token in $STEP_SSH_TOKEN)")
        self.inside(f"{PY} -m step_ssh.cli activate --server {self.address} --fingerprint {self.fingerprint} "
                    "--tag env=prod", label="step-ssh activate …   (again: idempotent)")
        self.inside("grep -E '^(passwd|group):' /etc/nsswitch.conf")
        self.inside("getent passwd alice bob; getent passwd carol || echo 'carol: no such user on this host'",
                    label="getent passwd alice bob carol")

    def sshd(self) -> None:
        say(f"Starting the distribution's OpenSSH sshd inside web1 on 127.0.0.1:{self.ssh_port}")
        assert self.host
        self.host.run("ssh-keygen -A >/dev/null", check=True)
        self.host.write("/etc/ssh/sshd_config.d/00-demo.conf",
                        f"ListenAddress 127.0.0.1:{self.ssh_port}\nPasswordAuthentication no\n"
                        "KbdInteractiveAuthentication no\nPidFile none\n")
        self.host.run("/usr/sbin/sshd -t", check=True)
        self.sshd_proc = self.host.popen(["/usr/sbin/sshd", "-D", "-e"], stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.ssh_port), timeout=1) as s:
                    if s.recv(16).startswith(b"SSH-"):
                        return
            except OSError:
                time.sleep(0.05)
        raise SystemExit("demo failed: sshd did not start")

    def logins(self) -> None:
        say("Real certificate logins")
        print("    bob holds ssh: he gets in with his synced uid, groups and a fresh home; sudo is refused")
        self.ssh("bob", "id; ls -ld $HOME; sudo -n true && echo SUDO-OK || echo sudo refused", True)
        print("    alice holds sudo: she gets root through sudo")
        self.ssh("alice", "id -un; sudo -n id -u", True)
        print("    carol has no grant: no such user here, so sshd refuses her certificate")
        self.ssh("carol", "true", False)

    def revoke(self) -> None:
        say("Revoking dev's grant at the control plane: pushed to web1, bob's next login is refused")
        t0 = time.monotonic()
        self.ctl("grant", "rm", self.dev_grant)
        while time.monotonic() - t0 < 15:
            if self.host and self.host.run("getent passwd bob").returncode != 0:
                break
            time.sleep(0.05)
        print(f"    web1's cache no longer lists bob after {time.monotonic() - t0:.2f}s")
        self.ssh("bob", "true", False)
        self.ssh("alice", "echo alice still gets in", True)

    def audit(self) -> None:
        say("The audit trail: PAM and sudo wrote to web1's spool, the agent shipped it to the control plane")
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:  # the agent ships within about a second
            events = json.loads(self.ctl("audit", "list", "--host", "web1", "--json", quiet=True))
            if sum(e["type"] == "session_close" for e in events) >= 3 and \
                    any(e["type"] == "access_changed" for e in events):
                break
            time.sleep(0.2)
        self.ctl("audit", "list", "--host", "web1")

    def doctor(self) -> None:
        say("step-ssh doctor on web1")
        self.inside(f"{PY} -m step_ssh.cli doctor", label="step-ssh doctor")

    def close(self) -> None:
        if self.host:
            self.host.close()
        if self.server and self.server.poll() is None:
            self.server.send_signal(signal.SIGTERM)
            try:
                self.server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.server.kill()
        shutil.rmtree(self.tmp, ignore_errors=True)


def main() -> int:
    if os.geteuid() != 0:
        sys.exit("the demo needs root: it builds a test host with mount namespaces")
    d = Demo()
    try:
        d.control_plane()
        d.directory()
        d.certificates()
        d.activate_host()
        d.sshd()
        d.logins()
        d.revoke()
        d.audit()
        d.doctor()
    finally:
        d.close()
    say("Done: the control plane and the test host are gone; nothing outside them changed.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
