"""A test host wired for logins: NSS + PAM modules, principals helper, PAM
stacks for sshd and sudo, sudoers drop-in, a syslog catcher, real sshd.

Used by test_pam.py, test_login_e2e.py and benchmarks/login_bench.py. The
configuration text comes from step_ssh.hostconfig, the same functions the
activate command uses; only test-specific sshd settings (port, host key) are
added here.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, Optional, Sequence

import pytest

from step_ssh import hostconfig, paths
from step_ssh.cache.writer import build
from step_ssh.testhost import TestHost
from step_ssh.view import HostView

CACHE = str(paths.CACHE_PATH)
SPOOL = "/var/lib/step-ssh/spool"
EVENTS = f"{SPOOL}/events"
PRINCIPALS = "/usr/local/sbin/step-ssh-principals"
SUDO_PLUGIN = "/usr/local/lib/step-ssh/stepssh_sudo_audit.so"
CA_PUB = hostconfig.USER_CA_KEYS_PATH
SYSLOG = "/run/step-ssh-test/syslog.txt"
TEST_DIR = "/run/step-ssh-test"

# A directory most tests share. dave is also a *local* account on the host
# (created before the cache is published, as if the cache had been built
# elsewhere), so "local accounts always win" can be checked end to end.
BASE_VIEW = {
    "revision": 1,
    "users": [
        {"name": "alice", "uid": 70001, "gid": 70001, "gecos": "Alice Admin",
         "principals": ["alice", "alice@example.com"], "access": "sudo"},
        {"name": "bob", "uid": 70002, "gid": 70100, "gecos": "Bob Builder",
         "principals": ["bob"], "access": "ssh"},
        {"name": "carol", "uid": 70003, "gid": 70100, "principals": ["carol"], "access": "ssh"},
        {"name": "dave", "uid": 70004, "gid": 70004, "principals": ["dave"], "access": "sudo"},
        {"name": "erin", "uid": 70005, "gid": 70005, "principals": ["erin"], "access": "none"},
        {"name": "jack", "uid": 70006, "gid": 70006, "principals": ["jack"], "access": "jump"},
    ],
    "groups": [
        {"name": "developers", "gid": 70100, "members": ["bob", "carol"]},
        {"name": "oncall", "gid": 70101, "members": ["alice", "bob"]},
    ],
}

LOCAL_DAVE_UID = 1500

# A PAM stack that tells the three outcomes apart: allowed → success and
# nothing printed; PAM_IGNORE → success with the marker; denied → failure.
PROBE_STACK = """\
auth     required pam_permit.so
account  [success=done ignore=ignore default=die] pam_stepssh.so {args}
account  required pam_echo.so STEPSSH-IGNORED
account  required pam_permit.so
session  required pam_stepssh.so {args}
session  required pam_permit.so
"""

# Started inside the host: a /dev/log that writes each datagram to a file.
_SYSLOG_SERVER = r"""
import os, socket, sys
path, out = sys.argv[1], sys.argv[2]
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(path)
os.chmod(path, 0o666)
with open(out, "ab", buffering=0) as f:
    print("ready", flush=True)
    while True:
        f.write(s.recv(65536).rstrip(b"\0\n") + b"\n")
"""

# Give the test host its own /dev (a tmpfs with every real entry bound in) so
# /dev/log can point at our catcher without touching the machine's /dev.
_PRIVATE_DEV = r"""
set -e
real=/run/step-ssh-test/realdev
mkdir -p "$real"
mount --rbind /dev "$real"
mount -t tmpfs -o mode=0755,nosuid tmpfs /dev
for e in $(ls -A "$real"); do
  src="$real/$e"
  if [ -L "$src" ]; then ln -s "$(readlink "$src")" "/dev/$e"
  elif [ -d "$src" ]; then mkdir "/dev/$e"; mount --rbind "$src" "/dev/$e"
  else touch "/dev/$e"; mount --bind "$src" "/dev/$e"
  fi
done
rm -f /dev/log
ln -s /run/step-ssh-test/log /dev/log
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unavailable() -> Optional[str]:
    if os.geteuid() != 0:
        return "login tests need root (mount namespaces, sshd)"
    for tool in ("unshare", "nsenter", "/usr/sbin/sshd", "ssh", "ssh-keygen", "sudo", "pamtester",
                 "visudo", "useradd"):
        if not shutil.which(tool):
            return f"{tool} is not installed"
    for f in (paths.NSS_MODULE, paths.PAM_MODULE, paths.PRINCIPALS_COMMAND):
        if not Path(f).exists():
            return f"{f} is not built (pip install -e .)"
    return None


class Keys:
    """A user CA and user keys/certificates, made with ssh-keygen in a temp dir."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="step-ssh-keys-"))
        os.chmod(self.dir, 0o700)
        self.ca = self.dir / "ca"
        self._keygen("-t", "ed25519", "-N", "", "-C", "step-ssh test CA", "-f", str(self.ca))
        self._keys: dict[str, Path] = {}

    def _keygen(self, *args: str) -> None:
        subprocess.run(["ssh-keygen", "-q", *args], check=True, capture_output=True)

    @property
    def ca_pub(self) -> str:
        return (self.dir / "ca.pub").read_text()

    def key(self, name: str) -> Path:
        """A private key (no certificate next to it, so nothing is offered by accident)."""
        if name not in self._keys:
            p = self.dir / f"key-{name}"
            self._keygen("-t", "ed25519", "-N", "", "-C", name, "-f", str(p))
            self._keys[name] = p
        return self._keys[name]

    def pub(self, name: str) -> str:
        return Path(str(self.key(name)) + ".pub").read_text()

    def cert(self, name: str, principals: Sequence[str], validity: str = "-5m:+1h",
             tag: str = "") -> Path:
        """Certificate for key `name`, stored under a name ssh never picks up by itself."""
        key = self.key(name)
        tmp = self.dir / f"tmp-{name}"
        shutil.copy(str(key) + ".pub", str(tmp) + ".pub")
        self._keygen("-s", str(self.ca), "-I", f"{name}{tag}", "-n", ",".join(principals),
                     "-V", validity, str(tmp) + ".pub")
        out = self.dir / f"cert-{name}{tag}.pub"
        os.replace(str(tmp) + "-cert.pub", out)
        os.unlink(str(tmp) + ".pub")
        return out

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def keys() -> Iterator[Keys]:
    """One user CA and its keys for a test module."""
    k = Keys()
    yield k
    k.close()


class LoginHost:
    """A TestHost with the whole login path installed."""

    def __init__(self, keys: Keys, view: dict | HostView = BASE_VIEW, local_dave: bool = True,
                 marker: str = "host"):
        self.keys = keys
        self.host = TestHost(extra_overlays=["/usr/local"])
        self.view = view
        self.local_dave = local_dave
        self.marker = marker
        self.port: Optional[int] = None
        self._sshd: Optional[subprocess.Popen] = None
        self._syslogd: Optional[subprocess.Popen] = None
        self.sshd_log = self.host.tmp / "sshd.log"

    # -- setup -------------------------------------------------------------
    def start(self) -> "LoginHost":
        h = self.host.start()
        try:
            self._setup()
        except BaseException:
            self.close()
            raise
        return self

    def _setup(self) -> None:
        h = self.host
        h.run(f"mkdir -p {TEST_DIR} && chmod 0755 {TEST_DIR}", check=True)
        h.write("/etc/step-ssh-test-marker", self.marker + "\n")
        self._start_syslog()
        if self.local_dave:
            # Before stepssh is in nsswitch: useradd would otherwise see the
            # directory's dave and refuse.
            h.run(["useradd", "-m", "-u", str(LOCAL_DAVE_UID), "-U", "-s", "/bin/bash", "dave"], check=True)
            h.run(["usermod", "-p", "*", "dave"], check=True)
        h.install_nss_module(paths.NSS_MODULE)
        h.run(["install", "-m", "0644", str(paths.PAM_MODULE), f"{h.libdir}/security/pam_stepssh.so"], check=True)
        h.run(["install", "-D", "-m", "0755", str(paths.PRINCIPALS_COMMAND), PRINCIPALS], check=True)
        for service, session in hostconfig.PAM_SERVICES.items():
            original = h.read(f"/etc/pam.d/{service}")
            h.write(f"/etc/pam.d/{service}", hostconfig.pam_service_config(original, session=session))
        if paths.SUDO_AUDIT_PLUGIN.exists():  # sudo commands to the audit spool, as activate sets it up
            h.run(["install", "-D", "-m", "0644", str(paths.SUDO_AUDIT_PLUGIN), SUDO_PLUGIN], check=True)
            conf = h.run(["cat", hostconfig.SUDO_CONF_PATH])
            h.write(hostconfig.SUDO_CONF_PATH,
                    hostconfig.sudo_conf_with(conf.stdout if conf.returncode == 0 else None, SUDO_PLUGIN))
        sudoers = hostconfig.sudoers_dropin()
        h.write("/run/sudoers.new", sudoers, 0o440)
        h.run(["visudo", "-c", "-q", "-f", "/run/sudoers.new"], check=True)
        h.run(["mv", "/run/sudoers.new", hostconfig.SUDOERS_PATH], check=True)
        h.write(CA_PUB, self.keys.ca_pub)
        self.publish(self.view)

    def _start_syslog(self) -> None:
        h = self.host
        h.run(_PRIVATE_DEV, check=True)
        self._syslogd = h.popen([sys.executable, "-c", _SYSLOG_SERVER, f"{TEST_DIR}/log", SYSLOG],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self._syslogd.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"syslog catcher did not start: {self._syslogd.stderr.read()}")

    # -- cache ---------------------------------------------------------------
    def publish(self, view: dict | HostView, now: Optional[int] = None) -> bytes:
        """Build a cache from `view` and replace the host's cache atomically."""
        if isinstance(view, dict):
            view = HostView.model_validate(view)
        data = build(view, now=now)
        self.publish_bytes(data)
        return data

    def publish_bytes(self, data: bytes) -> None:
        tmp = f"{CACHE}.new"
        self.host.write(tmp, data, 0o644)
        self.host.run(["mv", "-f", tmp, CACHE], check=True)

    # -- sshd ----------------------------------------------------------------
    def start_sshd(self, extra: Optional[dict] = None) -> int:
        h = self.host
        if not h.run("test -f /etc/ssh/step-ssh-test-host-key").returncode == 0:
            h.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", "/etc/ssh/step-ssh-test-host-key"], check=True)
        self.port = free_port()
        settings = {
            "ListenAddress": f"127.0.0.1:{self.port}",
            "HostKey": "/etc/ssh/step-ssh-test-host-key",
            "PidFile": "none",
            "PasswordAuthentication": "no",
            "KbdInteractiveAuthentication": "no",
            "LogLevel": "VERBOSE",
            "MaxStartups": "100",
            "MaxAuthTries": "10",
        }
        settings.update(extra or {})
        h.write(hostconfig.SSHD_DROPIN_PATH, hostconfig.sshd_dropin(PRINCIPALS, CA_PUB, settings))
        t = h.run(["/usr/sbin/sshd", "-t"])
        if t.returncode != 0:
            raise RuntimeError(f"sshd -t rejects the configuration: {t.stderr}")
        log = open(self.sshd_log, "ab")
        self._sshd = h.popen(["/usr/sbin/sshd", "-D", "-e"], stdout=log, stderr=log,
                             stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    if s.recv(64).startswith(b"SSH-"):
                        return self.port
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"sshd did not start:\n{self.sshd_log.read_text(errors='replace')}")

    def ssh_argv(self, user: str, command: str | Sequence[str], key: str, cert: Optional[Path] = None,
                 port: Optional[int] = None, options: Sequence[str] = ()) -> list[str]:
        argv = ["ssh", "-F", "/dev/null", "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
                "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=10", "-i", str(self.keys.key(key))]
        if cert is not None:
            argv += ["-o", f"CertificateFile={cert}"]
        argv += list(options)
        argv += ["-p", str(port or self.port), f"{user}@127.0.0.1"]
        argv += [command] if isinstance(command, str) else list(command)
        return argv

    def ssh(self, user: str, command: str | Sequence[str], key: str, cert: Optional[Path] = None,
            port: Optional[int] = None, options: Sequence[str] = (), timeout: float = 30):
        return self.host.run(self.ssh_argv(user, command, key, cert, port, options), timeout=timeout)

    # -- evidence ------------------------------------------------------------
    def syslog(self, *expect: str, timeout: float = 10.0) -> str:
        """The test host's system log. The catcher writes what it receives a
        moment later, so with `expect` this waits until every string is in
        it (or the timeout passes) instead of reading once."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.host.run(["cat", SYSLOG]).stdout
            if all(x in text for x in expect) or time.monotonic() > deadline:
                return text
            time.sleep(0.05)

    def events(self) -> list[dict]:
        r = self.host.run(["cat", EVENTS])
        return [json.loads(line) for line in r.stdout.splitlines() if line.strip()]

    def has_logged(self, text: str, timeout: float = 10.0) -> bool:
        return text in self.syslog(text, timeout=timeout)

    def syslog_events(self, *ids: str) -> list[dict]:
        """The JSON lines the writers sent to the system log (tag step-ssh-audit);
        with `ids`, once those events are there (see `syslog`)."""
        out = []
        for line in self.syslog(*(f'"id":"{i}"' for i in ids)).splitlines():
            head, sep, body = line.partition(" step-ssh-audit[")
            if sep:
                out.append(json.loads(body.split("]: ", 1)[1]))
        return out

    def sshd_output(self) -> str:
        try:
            return self.sshd_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def probe_service(self, name: str, args: str = "") -> None:
        """Install PROBE_STACK as /etc/pam.d/NAME."""
        self.host.write(f"/etc/pam.d/{name}", PROBE_STACK.format(args=args))

    def close(self) -> None:
        for p in (self._sshd, self._syslogd):
            if p and p.poll() is None:
                p.kill()
        self.host.close()  # kills everything else in the namespace
        for p in (self._sshd, self._syslogd):
            if p:
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
                for f in (p.stdout, p.stderr):
                    if f:
                        f.close()

    def __enter__(self) -> "LoginHost":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


def view_with(base: dict = BASE_VIEW, **changes) -> dict:
    """BASE_VIEW with top-level keys replaced and per-user changes:
    view_with(users={"bob": {"access": "none"}}, bastion=True); a user mapped
    to None is removed."""
    import copy
    v = copy.deepcopy(base)
    user_changes = changes.pop("users", {})
    users = []
    for u in v["users"]:
        c = user_changes.get(u["name"], {})
        if c is None:
            continue
        users.append({**u, **c})
    v["users"] = users
    v["groups"] = [{**g, "members": [m for m in g["members"] if m in {u["name"] for u in users}]}
                   for g in v["groups"]]
    v.update(changes)
    return v
