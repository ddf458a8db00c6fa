"""Reversible, idempotent changes to a host's files.

`activate` describes the files it wants as a list of `FileChange`s; this module
shows them as a diff, applies them (validating each on a temp file first, e.g.
`visudo -c -f`), rolls back what it did if anything fails part-way, and records
each file's original state once so `deactivate` can restore it byte for byte.

State lives under ROOT/var/lib/step-ssh/activation/: manifest.json plus a copy
of every original file (mode 0600).
"""
from __future__ import annotations

import difflib
import hashlib
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from step_ssh.fsutil import atomic_write

STATE_SUBDIR = "var/lib/step-ssh/activation"


class ChangeFailed(RuntimeError):
    """A change could not be applied; everything done in this run was undone."""


@dataclass
class FileChange:
    path: str                       # absolute path on the target system
    content: Optional[bytes]        # None: the file must not exist
    mode: int = 0o644
    # Called with the staged temp file before it goes live; raise to refuse.
    validate: Optional[Callable[[Path], None]] = None
    why: str = ""

    def text(self) -> str:
        return "" if self.content is None else self.content.decode("utf-8", "replace")


@dataclass
class Original:
    existed: bool
    mode: int = 0
    uid: int = 0
    gid: int = 0
    backup: Optional[str] = None   # file name under backups/


class Host:
    """A target root ('/' or an image directory) and its activation state."""

    def __init__(self, root: str | Path = "/"):
        self.root = Path(root)
        self.state = self.root / STATE_SUBDIR
        self.manifest_path = self.state / "manifest.json"

    def p(self, path: str) -> Path:
        return self.root / path.lstrip("/")

    # -- manifest ----------------------------------------------------------
    def manifest(self) -> dict[str, Original]:
        try:
            raw = json.loads(self.manifest_path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            raise ChangeFailed(f"activation record {self.manifest_path} is unreadable ({e}); "
                               "restore it from backup before running activate/deactivate again") from None
        return {k: Original(**v) for k, v in raw.get("files", {}).items()}

    def _save_manifest(self, files: dict[str, Original]) -> None:
        data = {"version": 1, "files": {k: vars(v) for k, v in files.items()}}
        atomic_write(self.manifest_path, json.dumps(data, indent=2, sort_keys=True) + "\n", 0o600, 0o700)

    def _capture(self, path: str, persist: bool) -> tuple[Original, Optional[bytes]]:
        """A file's current state and bytes; `persist` keeps a private copy
        (only for the true original, recorded once)."""
        real = self.p(path)
        try:
            st = os.lstat(real)
        except FileNotFoundError:
            return Original(existed=False), None
        if not stat.S_ISREG(st.st_mode):
            raise ChangeFailed(f"{real} is not a regular file; refusing to replace it")
        data = real.read_bytes()
        name = None
        if persist:
            name = hashlib.sha256(path.encode()).hexdigest()[:24]
            atomic_write(self.state / "backups" / name, data, 0o600, 0o700)
        return Original(True, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, name), data

    def _put(self, path: str, orig: Original, data: Optional[bytes] = None) -> None:
        real = self.p(path)
        if not orig.existed:
            real.unlink(missing_ok=True)
            return
        if data is None:
            assert orig.backup
            data = (self.state / "backups" / orig.backup).read_bytes()
        atomic_write(real, data, orig.mode)
        os.chown(real, orig.uid, orig.gid)

    # -- planning ----------------------------------------------------------
    def current(self, path: str) -> tuple[Optional[bytes], int]:
        real = self.p(path)
        try:
            return real.read_bytes(), stat.S_IMODE(os.stat(real).st_mode)
        except FileNotFoundError:
            return None, 0

    def pending(self, changes: list[FileChange]) -> list[FileChange]:
        """The changes that would alter something (idempotence: the rest are no-ops)."""
        out = []
        for c in changes:
            data, mode = self.current(c.path)
            if data != c.content or (c.content is not None and mode != c.mode):
                out.append(c)
        return out

    def diff(self, changes: list[FileChange]) -> str:
        chunks = []
        for c in self.pending(changes):
            data, mode = self.current(c.path)
            old = [] if data is None else data.decode("utf-8", "replace").splitlines(keepends=True)
            new = c.text().splitlines(keepends=True)
            a = "/dev/null" if data is None else f"a{c.path}"
            b = "/dev/null" if c.content is None else f"b{c.path}"
            body = "".join(difflib.unified_diff(old, new, a, b))
            if not body and data is not None and c.content is not None:
                body = f"--- a{c.path}\n+++ b{c.path}\n"
            if c.content is not None and mode != c.mode:
                body += f"# mode {mode:04o} -> {c.mode:04o}\n" if data is not None else f"# mode {c.mode:04o}\n"
            chunks.append(body if body.endswith("\n") else body + "\n")
        return "".join(chunks)

    # -- applying ----------------------------------------------------------
    def apply(self, changes: list[FileChange]) -> list[str]:
        """Apply what differs; returns the paths changed. On any failure, every
        file changed in this call is put back and ChangeFailed is raised."""
        todo = self.pending(changes)
        if not todo:
            return []
        manifest = self.manifest()
        before: dict[str, tuple[Original, Optional[bytes]]] = {}
        added: list[str] = []
        done: list[str] = []
        try:
            for c in todo:
                first = c.path not in manifest  # first activation: the true original
                before[c.path] = self._capture(c.path, persist=first)
                if first:
                    manifest[c.path] = before[c.path][0]
                    added.append(c.path)
                    self._save_manifest(manifest)
                self._write(c)
                done.append(c.path)
        except BaseException as e:
            for path in reversed(done):
                self._put(path, *before[path])
            if added:  # forget what this run recorded for files it put back
                for path in added:
                    if manifest[path].backup:
                        (self.state / "backups" / manifest[path].backup).unlink(missing_ok=True)
                    del manifest[path]
                self._save_manifest(manifest)
            if isinstance(e, ChangeFailed):
                raise
            raise ChangeFailed(f"{e}; nothing was changed") from e
        return done

    def _write(self, c: FileChange) -> None:
        real = self.p(c.path)
        if c.content is None:
            real.unlink(missing_ok=True)
            return
        if c.validate:
            staged = real.parent / f".{real.name}.step-ssh-check"
            real.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(staged, c.content, c.mode)
            try:
                c.validate(staged)
            finally:
                staged.unlink(missing_ok=True)
        atomic_write(real, c.content, c.mode)

    # -- whole-run checkpoints (activate spans files, commands and services) --
    def checkpoint(self, paths: list[str]) -> dict:
        """Remember `paths` and the manifest as they are now (in memory)."""
        files = {}
        for path in paths:
            real = self.p(path)
            try:
                st = os.lstat(real)
                files[path] = (real.read_bytes(), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) \
                    if stat.S_ISREG(st.st_mode) else "other"
            except FileNotFoundError:
                files[path] = None
        try:
            manifest = self.manifest_path.read_bytes()
        except FileNotFoundError:
            manifest = None
        return {"files": files, "manifest": manifest, "backups": self._backup_names()}

    def _backup_names(self) -> set[str]:
        d = self.state / "backups"
        return {f.name for f in d.iterdir()} if d.is_dir() else set()

    def rollback(self, cp: dict) -> None:
        """Put every checkpointed path and the manifest back as they were."""
        for path, was in cp["files"].items():
            if was == "other":
                continue
            real = self.p(path)
            if was is None:
                real.unlink(missing_ok=True)
            else:
                data, mode, uid, gid = was
                atomic_write(real, data, mode)
                os.chown(real, uid, gid)
        for name in self._backup_names() - cp["backups"]:
            (self.state / "backups" / name).unlink()
        if cp["manifest"] is None:
            self.manifest_path.unlink(missing_ok=True)
        else:
            atomic_write(self.manifest_path, cp["manifest"], 0o600, 0o700)

    def record(self, paths: list[str]) -> None:
        """Record the originals of files an external tool is about to rewrite
        (pam-auth-update), so restore() can put them back."""
        manifest = self.manifest()
        for path in paths:
            if path not in manifest:
                manifest[path] = self._capture(path, persist=True)[0]
        self._save_manifest(manifest)

    def restore(self, keep_state: bool = False) -> list[str]:
        """Put every recorded file back exactly as it was before activation."""
        manifest = self.manifest()
        for path, orig in manifest.items():
            self._put(path, orig)
        if not keep_state:
            for f in (self.state / "backups").glob("*"):
                f.unlink()
            self.manifest_path.unlink(missing_ok=True)
        return sorted(manifest)
