"""Run the real `step-ssh agent` as a subprocess, inside a test host or not,
and watch its status file (tests/test_agent*.py)."""
from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import yaml

from step_ssh import pki
from step_ssh.proto import stepssh_pb2 as pb

FAST = {  # test timings: quick retries, frequent checks
    "backoff_initial": 0.2,
    "backoff_max": 1.0,
    "check_interval": 0.5,
    "ready_timeout": 5,
    "connect_timeout": 5,
    "refused_retry": 1.0,
}


# The agent must not outlive a killed pytest. Not with preexec_fn: that forks
# pytest (which has gRPC loaded) and runs Python before exec, and gRPC's fork
# handlers can abort the child ("epoll_wait error: Bad file descriptor").
# util-linux's setpriv sets the parent-death signal in the exec'd process.
DIE_WITH_PARENT = ["setpriv", "--pdeathsig", "KILL", "--"]


class AgentProc:
    """One `step-ssh agent` process. With `host`, it runs inside that test
    host (its /var/lib/step-ssh/cache is what NSS reads there)."""

    def __init__(self, workdir: Path, config: dict, host=None, name: str = "agent"):
        self.workdir = workdir
        self.host = host
        self.name = name
        self.config = {**FAST, **config}
        self.config_path = workdir / f"{name}.yaml"
        self.log_path = workdir / f"{name}.log"
        self.proc: Optional[subprocess.Popen] = None
        self.config_path.write_text(yaml.safe_dump(self.config))

    @property
    def status_file(self) -> str:
        return self.config.get("status_file", "/run/step-ssh/status.json")

    @property
    def cache_path(self) -> str:
        return self.config.get("cache_path") or str(Path(self.config.get("state_dir", "/var/lib/step-ssh")) / "cache")

    def start(self, *extra: str, env: Optional[dict] = None) -> "AgentProc":
        assert self.proc is None
        cmd = [sys.executable, "-m", "step_ssh.cli", "agent", "--config", str(self.config_path), *extra]
        log = open(self.log_path, "ab")
        if self.host is not None:
            # a stale status file would fool the waits below
            self.host.run(["rm", "-f", self.status_file])
            self.proc = self.host.popen(cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        else:
            try:
                os.unlink(self.status_file)
            except FileNotFoundError:
                pass
            self.proc = subprocess.Popen(DIE_WITH_PARENT + cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                         env={**os.environ, **(env or {})})
        log.close()
        return self

    def status(self) -> Optional[dict]:
        try:
            if self.host is not None:
                r = self.host.run(["cat", self.status_file])
                return json.loads(r.stdout) if r.returncode == 0 and r.stdout.strip() else None
            return json.loads(Path(self.status_file).read_text())
        except (OSError, ValueError):
            return None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait(self, pred: Callable[[dict], bool], timeout: float = 20.0, what: str = "condition") -> dict:
        deadline = time.monotonic() + timeout
        st = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"agent exited with {self.proc.returncode} while waiting for {what}:\n{self.log()}")
            st = self.status()
            if st is not None:
                try:
                    if pred(st):
                        return st
                except (KeyError, TypeError):
                    pass
            time.sleep(0.05)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}; status:\n"
                             f"{json.dumps(st, indent=1)[:4000]}\nlog:\n{self.log()[-4000:]}")

    def wait_revision(self, rev: int, timeout: float = 20.0) -> dict:
        return self.wait(lambda s: s["cache"] and s["cache"]["revision"] >= rev, timeout, f"revision {rev}")

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            st = self.status()
            if self.host is not None and st and st.get("pid"):
                self.host.run(["kill", "-TERM", str(st["pid"])])  # the pid inside the namespace
            else:
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        rc = self.proc.returncode
        self.proc = None
        return rc

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


def identity_files(identity_dir: Path) -> dict:
    return {"type": "files", "cert": str(identity_dir / "host.crt"), "key": str(identity_dir / "host.key"),
            "ca": str(identity_dir / "ca.crt")}


def issue_host_cert(server, host_id: str, key_pem: bytes, *, lifetime: dt.timedelta = dt.timedelta(hours=1),
                    not_before: Optional[dt.datetime] = None, ca=None, sans=None) -> bytes:
    """A host certificate signed directly with the server's CA key (or `ca`:
    (cert_pem, key_pem) of another CA)."""
    ca_cert, ca_key = ca or ((server.dir / "ca.crt").read_bytes(), (server.dir / "ca.key").read_bytes())
    return pki.issue(ca_cert, ca_key, pki.load_key(key_pem).public_key(), "test-host",
                     sans if sans is not None else [pki.host_uri(host_id)], lifetime=lifetime, not_before=not_before)


def grant(server, group: str, tags: dict, access=pb.ACCESS_SSH) -> str:
    return server.admin.AddGrant(pb.Grant(group=group, tags=tags, access=access), timeout=10).id


def revision(server) -> int:
    return server.revision()


def enroll_in_host(host, server, hostname: str, tags: dict) -> None:
    """`step-ssh enroll` inside the test host: it writes the host's own
    /etc/step-ssh (an overlay), exactly as on a real machine."""
    r = host.run([sys.executable, "-m", "step_ssh.cli", "enroll", "--server", server.address,
                  "--fingerprint", server.fingerprint, "--json"],
                 env={**os.environ, "STEP_SSH_TOKEN": server.token(hostname, tags)})
    assert r.returncode == 0, r.stderr
