"""A real control plane for tests: `step-ssh-server init` + `run` as a
subprocess on a free loopback port, real mTLS, plus helpers to enroll hosts
and talk to it as admin or as a host.

Use it from any test module (no conftest needed):

    from server_fixtures import running_server  # noqa: F401  (pytest fixture)

    def test_x(running_server):
        s = running_server
        s.admin.CreateUser(pb.DirectoryUser(name="alice"))
        h = s.enroll("web1", {"env": "prod"})          # identity under h.config_dir/identity/
        ev = next(h.watch(0))                          # first WatchEvent
        s.restart()                                    # same dir, same port

`running_server` is per test; `module_server` is shared by a module's tests.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, Optional

import grpc
import pytest
import yaml

from step_ssh import pki, rpc
from step_ssh.proto import stepssh_pb2 as pb
from step_ssh.proto import stepssh_pb2_grpc as pbg

START_TIMEOUT = 20.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EnrolledHost:
    """A host identity laid out like the agent's: CONFIG_DIR/identity/{host.crt,host.key,ca.crt}."""

    def __init__(self, server: "RunningServer", config_dir: Path, host_id: str, hostname: str):
        self.server = server
        self.config_dir = config_dir
        self.id = host_id
        self.hostname = hostname
        self._channel: Optional[grpc.Channel] = None

    @property
    def identity(self) -> Path:
        return self.config_dir / "identity"

    def creds(self) -> grpc.ChannelCredentials:
        i = self.identity
        return rpc.mtls_credentials((i / "ca.crt").read_bytes(), (i / "host.crt").read_bytes(),
                                    (i / "host.key").read_bytes())

    def channel(self) -> grpc.Channel:
        if self._channel is None:
            self._channel = rpc.channel(self.server.address, self.creds())
        return self._channel

    def reset_channel(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    @property
    def stub(self) -> pbg.HostServiceStub:
        return pbg.HostServiceStub(self.channel())

    def admin_stub(self) -> pbg.AdminServiceStub:
        """The host's certificate used against the admin service (must be refused)."""
        return pbg.AdminServiceStub(self.channel())

    def watch(self, since: int = 0, timeout: float = 30.0):
        """The raw call: iterate it for WatchEvents, .cancel() to stop."""
        return self.stub.Watch(pb.WatchRequest(since_revision=since, agent_version="test"), timeout=timeout)

    def renew(self) -> bytes:
        key = pki.new_private_key()
        r = self.stub.Renew(pb.RenewRequest(csr_pem=pki.make_csr(key, self.hostname)), timeout=10)
        (self.identity / "host.key").write_bytes(key)
        (self.identity / "host.crt").write_bytes(r.certificate_pem)
        self.reset_channel()
        return r.certificate_pem

    def register(self, **kw) -> pb.Host:
        return self.stub.Register(pb.RegisterRequest(**kw), timeout=10).host

    def close(self) -> None:
        self.reset_channel()


class RunningServer:
    def __init__(self, base: Path, heartbeat: float = 1.0):
        self.base = base
        self.dir = base / "server"
        self.heartbeat = heartbeat
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.proc: Optional[subprocess.Popen] = None
        self.log_path = base / "server.log"
        self._admin_channel: Optional[grpc.Channel] = None
        self._hosts: list[EnrolledHost] = []
        from click.testing import CliRunner
        from step_ssh.server.cli import main as server_main
        out = CliRunner().invoke(server_main, ["init", "--dir", str(self.dir), "--listen", self.address, "--json"],
                                 catch_exceptions=False)
        assert out.exit_code == 0, out.output
        info = json.loads(out.stdout)
        self.fingerprint: str = info["ca_fingerprint"]
        self.profile = Path(info["admin_profile"])
        self.ca_pem = (self.dir / "ca.crt").read_bytes()

    # ---- process ------------------------------------------------------------------

    def start(self) -> None:
        assert self.proc is None, "already running"
        logf = open(self.log_path, "ab")
        offset = self.log_path.stat().st_size
        self.proc = subprocess.Popen(
            # setpriv sets the parent-death signal in the exec'd server; a
            # preexec_fn would run Python in a fork of a gRPC-loaded pytest,
            # which can abort the child ("epoll_wait error").
            ["setpriv", "--pdeathsig", "TERM", "--", sys.executable, "-m", "step_ssh.server.cli", "run",
             "--dir", str(self.dir), "--listen", self.address, "--heartbeat", str(self.heartbeat)],
            stdout=logf, stderr=logf)
        logf.close()
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"step-ssh-server exited with {self.proc.returncode}:\n{self.log_text()}")
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                if b'"msg":"listening"' in f.read():
                    return
            time.sleep(0.05)
        raise RuntimeError(f"step-ssh-server did not start in {START_TIMEOUT}s:\n{self.log_text()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.proc is None:
            return 0
        self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self.proc = None
        return rc

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        for h in self._hosts:
            h.close()
        if self._admin_channel is not None:
            self._admin_channel.close()
        self.stop()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_records(self) -> list[dict]:
        out = []
        for line in self.log_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def wait_log(self, pred, timeout: float = 10.0) -> list[dict]:
        """The server's stderr passes through a pump thread (see
        server/log.capture_native_stderr), so a line can land a moment after
        the RPC that logged it returned: poll until `pred` matches a record."""
        deadline = time.monotonic() + timeout
        while True:
            recs = self.log_records()
            if any(pred(r) for r in recs) or time.monotonic() > deadline:
                return recs
            time.sleep(0.05)

    # ---- clients ------------------------------------------------------------------

    def admin_creds(self) -> grpc.ChannelCredentials:
        p = yaml.safe_load(self.profile.read_text())
        return rpc.mtls_credentials(p["ca"].encode(), p["cert"].encode(), p["key"].encode())

    @property
    def admin(self) -> pbg.AdminServiceStub:
        if self._admin_channel is None:
            self._admin_channel = rpc.channel(self.address, self.admin_creds())
        return pbg.AdminServiceStub(self._admin_channel)

    def ctl(self, *args: str, input: Optional[str] = None, env: Optional[dict] = None):
        """Run step-ssh-ctl in-process (click's CliRunner) with this server's admin profile."""
        from click.testing import CliRunner
        from step_ssh.ctl import main
        e = {"STEP_SSH_PROFILE": str(self.profile), **(env or {})}
        return CliRunner().invoke(main, list(args), input=input, env=e, catch_exceptions=False)

    def token(self, hostname: str, tags: Optional[dict] = None, ttl: int = 600) -> str:
        return self.admin.CreateEnrollToken(pb.TokenRequest(hostname=hostname, tags=tags or {}, ttl_seconds=ttl),
                                            timeout=10).token

    def enroll_raw(self, token: str, key_pem: bytes, hostname: str = "host") -> pb.EnrollResponse:
        ch = rpc.channel(self.address, rpc.enroll_credentials(self.ca_pem))
        try:
            return pbg.HostServiceStub(ch).Enroll(
                pb.EnrollRequest(token=token, csr_pem=pki.make_csr(key_pem, hostname), agent_version="test"),
                timeout=10)
        finally:
            ch.close()

    def enroll(self, hostname: str, tags: Optional[dict] = None, config_dir: Optional[Path] = None) -> EnrolledHost:
        key = pki.new_private_key()
        r = self.enroll_raw(self.token(hostname, tags), key, hostname)
        config_dir = config_dir or (self.base / "hosts" / hostname)
        ident = config_dir / "identity"
        ident.mkdir(parents=True, exist_ok=True)
        (ident / "host.key").write_bytes(key)
        os.chmod(ident / "host.key", 0o600)
        (ident / "host.crt").write_bytes(r.certificate_pem)
        (ident / "ca.crt").write_bytes(r.ca_pem)
        h = EnrolledHost(self, config_dir, r.host_id, r.hostname)
        self._hosts.append(h)
        return h

    # ---- database -----------------------------------------------------------------

    def db_dump(self) -> str:
        """The state tables, row by row (what a rejected request must leave alone)."""
        from step_ssh.server.store import STATE_TABLES
        conn = sqlite3.connect(f"file:{self.dir / 'server.db'}?mode=ro", uri=True)
        try:
            out = []
            for t in STATE_TABLES:
                cols = "*"
                if t == "hosts":
                    cols = "id, hostname, tags, is_bastion, bastions, cert_serial, cert_not_after"
                out += [f"{t}: {row!r}" for row in conn.execute(f"SELECT {cols} FROM {t} ORDER BY 1")]
            return "\n".join(out)
        finally:
            conn.close()

    def revision(self) -> int:
        conn = sqlite3.connect(f"file:{self.dir / 'server.db'}?mode=ro", uri=True)
        try:
            return int(conn.execute("SELECT value FROM meta WHERE key='revision'").fetchone()[0])
        finally:
            conn.close()


def next_event(call, timeout: float = 10.0) -> pb.WatchEvent:
    """Next WatchEvent from a Watch call, failing (not hanging) after `timeout`."""
    import threading
    box: dict = {}

    def get():
        try:
            box["ev"] = next(call)
        except BaseException as e:  # noqa: BLE001
            box["err"] = e
    t = threading.Thread(target=get, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        call.cancel()
        t.join(5)
        raise AssertionError(f"no WatchEvent within {timeout}s")
    if "err" in box:
        raise box["err"]
    return box["ev"]


def next_change(call, timeout: float = 10.0) -> pb.WatchEvent:
    """Next snapshot or delta, skipping heartbeats."""
    deadline = time.monotonic() + timeout
    while True:
        ev = next_event(call, max(0.1, deadline - time.monotonic()))
        if ev.WhichOneof("event") != "heartbeat":
            return ev


def serving(server: RunningServer) -> Iterator[RunningServer]:
    """A fixture's body: start `server`, hand it out, close it afterwards."""
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def running_server(tmp_path: Path) -> Iterator[RunningServer]:
    yield from serving(RunningServer(tmp_path))


@pytest.fixture(scope="module")
def module_server(tmp_path_factory) -> Iterator[RunningServer]:
    yield from serving(RunningServer(tmp_path_factory.mktemp("server")))
