"""Shared fixtures: sample host views, cache files, and test hosts."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from step_ssh import paths
from step_ssh.cache.writer import build, publish_bytes
from step_ssh.view import HostView

EXAMPLE = {
    "revision": 7,
    "users": [
        {"name": "alice", "uid": 70001, "gid": 70001, "gecos": "Alice Admin",
         "principals": ["alice", "alice@example.com"], "access": "sudo"},
        {"name": "bob", "uid": 70002, "gid": 70100, "gecos": "Bob Builder",
         "principals": ["bob"], "access": "ssh"},
        {"name": "carol", "uid": 70003, "gid": 70100, "shell": "/bin/sh",
         "home": "/srv/carol", "principals": ["carol"], "access": "ssh"},
    ],
    "groups": [
        {"name": "developers", "gid": 70100, "members": ["bob", "carol"]},
        {"name": "oncall", "gid": 70101, "members": ["alice", "bob"]},
    ],
}


def make_view(data: dict | None = None, **overrides) -> HostView:
    d = dict(EXAMPLE if data is None else data)
    d.update(overrides)
    return HostView.model_validate(d)


def write_view(path: Path, view: HostView) -> Path:
    publish_bytes(build(view), path)
    return path


@pytest.fixture
def example_view() -> HostView:
    return make_view()


@pytest.fixture
def example_cache(tmp_path: Path, example_view: HostView) -> Path:
    return write_view(tmp_path / "cache", example_view)


def _testhost_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "test hosts need root (mount namespaces and overlayfs)"
    for tool in ("unshare", "nsenter", "getent"):
        if not shutil.which(tool):
            return f"{tool} is not installed"
    return None


@pytest.fixture
def testhost():
    """A fresh test host with the NSS module installed and nsswitch wired."""
    why = _testhost_unavailable()
    if why:
        pytest.fail(f"cannot build a test host: {why}")
    from step_ssh.testhost import TestHost

    with TestHost() as host:
        host.install_nss_module(paths.NSS_MODULE)
        yield host
