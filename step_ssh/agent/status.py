"""The agent's state as a file, for `step-ssh status` and monitoring.

The agent replaces STATUS_FILE (default /run/step-ssh/status.json, mode 0644)
atomically whenever its state changes, so readers never need root, never
talk to the agent and never see half a file. Nothing secret is in it: the
certificate is public, the key is not included.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Optional

from step_ssh.fsutil import replacing

STATUS_VERSION = 1
MAX_LISTED_PROBLEMS = 100


def write_status(path: str | Path, data: dict) -> None:
    """Atomic replace without fsync: the file lives on a tmpfs and is rewritten
    on every change; a crash loses nothing a restart does not rebuild."""
    with replacing(path, 0o644, durable=False) as f:
        f.write((json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def read_status(path: str | Path) -> Optional[dict]:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None


def pid_alive(pid: Optional[int]) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a recycled pid would be some other program: check it is ours
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True
    return b"step-ssh" in cmd or b"step_ssh" in cmd


def now() -> float:
    return time.time()
