"""A *test host*: a private mount + pid namespace whose /etc, library directory,
/var and /home are overlays on the real ones, and whose /run is a tmpfs.

Real glibc, PAM, sshd and sudo run inside against our modules while nothing
outside changes: every write lands in upper directories under a temp dir that
is removed on close. Requires root, util-linux `unshare`/`nsenter`, overlayfs.
Used by the tests and by the README's demo (see DESIGN.md, "Testing on a real
host, safely").
"""
from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

from step_ssh.hostconfig import nsswitch_with
from step_ssh.paths import lib_dir, security_dir  # noqa: F401  (re-exported for tests)

OVERLAID = ["/etc", "/var", "/home"]


class TestHost:
    __test__ = False  # not a pytest class

    def __init__(self, keep: bool = False, extra_overlays: Sequence[str] = ()):
        self.tmp = Path(tempfile.mkdtemp(prefix="step-ssh-host-"))
        self.keep = keep
        # e.g. "/usr/local": a root-owned place for helpers sshd insists on
        self.extra_overlays = [d for d in extra_overlays if d not in OVERLAID]
        self.libdir = lib_dir()
        self._proc: Optional[subprocess.Popen] = None
        self.pid: Optional[int] = None

    # -- lifecycle -------------------------------------------------------
    def start(self) -> "TestHost":
        lines = ["set -e"]
        for d in OVERLAID + self.extra_overlays + [self.libdir]:
            key = d.strip("/").replace("/", "_")
            up, work = self.tmp / f"{key}.up", self.tmp / f"{key}.work"
            up.mkdir()
            work.mkdir()
            lines.append(f"mount -t overlay overlay -o lowerdir={d},upperdir={up},workdir={work} {d}")
        lines += ["mount -t tmpfs -o mode=0755 tmpfs /run", "mkdir -p /run/sshd",
                  "echo ready", "exec sleep infinity"]
        self._proc = subprocess.Popen(
            ["unshare", "-m", "-p", "--fork", "--mount-proc", "--propagation", "private",
             "sh", "-c", "\n".join(lines)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        line = self._proc.stdout.readline()
        if line.strip() != "ready":
            err = self._proc.stderr.read()
            self.close()
            raise RuntimeError(f"test host did not start: {err.strip() or line}")
        self.pid = self._inner_pid()
        return self

    def _inner_pid(self) -> int:
        assert self._proc is not None
        for _ in range(100):
            p = Path(f"/proc/{self._proc.pid}/task/{self._proc.pid}/children")
            kids = p.read_text().split() if p.exists() else []
            if kids:
                return int(kids[0])
            time.sleep(0.01)
        raise RuntimeError("test host: cannot find the namespace's init process")

    def close(self) -> None:
        if self._proc and self._proc.poll() is None:
            # Killing the namespace's init ends every process started inside.
            if self.pid:
                try:
                    os.kill(self.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self._proc.kill()
            self._proc.wait(timeout=10)
        if self._proc:
            for f in (self._proc.stdout, self._proc.stderr):
                if f:
                    f.close()
        if not self.keep:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> "TestHost":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- running things inside ---------------------------------------------
    def _prefix(self) -> list[str]:
        assert self.pid, "test host not started"
        return ["nsenter", "-t", str(self.pid), "-m", "-p", "--"]

    def run(self, cmd: Sequence[str] | str, *, check: bool = False, input: Optional[str] = None,
            env: Optional[dict] = None, timeout: float = 120, user: Optional[str] = None) -> subprocess.CompletedProcess:
        """Run a command inside; a string is given to `sh -c`."""
        argv = ["sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        if user:
            argv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", "--"] + argv
        r = subprocess.run(self._prefix() + argv, capture_output=True, text=True, input=input,
                           env=env, timeout=timeout, stdin=None if input is not None else subprocess.DEVNULL)
        if check and r.returncode != 0:
            raise RuntimeError(f"in test host: {shlex.join(argv)} exited {r.returncode}\n{r.stdout}{r.stderr}")
        return r

    def popen(self, cmd: Sequence[str], **kw) -> subprocess.Popen:
        return subprocess.Popen(self._prefix() + list(cmd), **kw)

    def write(self, path: str, content: str | bytes, mode: int = 0o644) -> None:
        data = content.encode() if isinstance(content, str) else content
        r = subprocess.run(self._prefix() + ["sh", "-c", f'mkdir -p "$(dirname "$1")" && cat > "$1" && chmod {mode:o} "$1"',
                                             "sh", path], input=data, capture_output=True)
        if r.returncode != 0:
            raise RuntimeError(f"cannot write {path} in test host: {r.stderr.decode()}")

    def read(self, path: str) -> str:
        return self.run(["cat", path], check=True).stdout

    def install_nss_module(self, module: str | Path) -> None:
        """Put our NSS module where glibc looks and add `stepssh` after `files`."""
        self.run(["install", "-m", "0644", str(module), f"{self.libdir}/libnss_stepssh.so.2"], check=True)
        conf = self.read("/etc/nsswitch.conf")
        self.write("/etc/nsswitch.conf", nsswitch_with(conf))
