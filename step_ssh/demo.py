"""The README's main job: step-ssh end to end inside a test host.

Everything happens in a private mount namespace (step_ssh.testhost), so the
machine's own /etc, libraries and homes are untouched. Run with
`python -m step_ssh.demo` as root.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from step_ssh import paths
from step_ssh.testhost import TestHost

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "directory.yaml"


def say(msg: str) -> None:
    print(f"\n==> {msg}", flush=True)


def show(host: TestHost, cmd: str, expect_ok: bool = True) -> str:
    r = host.run(cmd)
    print(f"    $ {cmd}")
    for line in (r.stdout + r.stderr).strip().splitlines():
        print(f"      {line}")
    if expect_ok and r.returncode != 0:
        raise SystemExit(f"demo failed: `{cmd}` exited {r.returncode}")
    if not expect_ok and r.returncode == 0:
        raise SystemExit(f"demo failed: `{cmd}` should have been refused")
    return r.stdout


def main() -> int:
    say("Starting a test host (private mount namespace over /etc, /var, /home and the library dir)")
    with TestHost() as host:
        say("Installing the NSS module and adding `stepssh` after `files` in nsswitch.conf")
        host.install_nss_module(paths.NSS_MODULE)
        show(host, "grep -E '^(passwd|group):' /etc/nsswitch.conf")

        say(f"Publishing a cache built from {EXAMPLE.name} (the agent does this from the control plane)")
        show(host, f"{sys.executable} -m step_ssh.cli cache build {EXAMPLE} -o {paths.CACHE_PATH}")
        show(host, f"{sys.executable} -m step_ssh.cli cache show {paths.CACHE_PATH}")

        say("Real glibc now resolves managed users after the local files")
        show(host, "getent passwd alice bob")
        show(host, "id alice")
        show(host, "getent group developers step-sudo")
        show(host, "getent passwd root")

        say("Someone the directory does not list is simply unknown")
        show(host, "getent passwd mallory", expect_ok=False)
    say("Done: the test host is gone and nothing outside it changed.")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except subprocess.TimeoutExpired as e:
        sys.exit(f"demo failed: {e}")
