"""The reversible file-change engine behind activate/deactivate."""
from __future__ import annotations

import os
import stat

import pytest

from step_ssh.activation.changes import ChangeFailed, FileChange, Host


@pytest.fixture
def root(tmp_path):
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/nsswitch.conf").write_text("passwd: files\n")
    os.chmod(tmp_path / "etc/nsswitch.conf", 0o644)
    (tmp_path / "etc/keep").write_text("untouched\n")
    return tmp_path


def snapshot(root):
    out = {}
    for dirpath, _, files in os.walk(root):
        if "var/lib/step-ssh" in dirpath:
            continue
        for f in files:
            p = os.path.join(dirpath, f)
            st = os.stat(p)
            out[os.path.relpath(p, root)] = (open(p, "rb").read(), stat.S_IMODE(st.st_mode))
    return out


CHANGES = [
    FileChange("/etc/nsswitch.conf", b"passwd: files stepssh\n"),
    FileChange("/etc/sudoers.d/step-ssh", b"%step-sudo ALL=(ALL:ALL) NOPASSWD: ALL\n", 0o440),
]


def test_apply_idempotent_and_restore_byte_identical(root):
    h = Host(root)
    before = snapshot(root)
    assert h.apply(CHANGES) == ["/etc/nsswitch.conf", "/etc/sudoers.d/step-ssh"]
    assert (root / "etc/nsswitch.conf").read_text() == "passwd: files stepssh\n"
    assert stat.S_IMODE((root / "etc/sudoers.d/step-ssh").stat().st_mode) == 0o440
    assert h.apply(CHANGES) == []           # second run: nothing to do
    assert h.diff(CHANGES) == ""
    assert sorted(h.restore()) == ["/etc/nsswitch.conf", "/etc/sudoers.d/step-ssh"]
    assert snapshot(root) == before
    assert not h.manifest_path.exists()


def test_reapply_after_change_keeps_first_original(root):
    h = Host(root)
    h.apply(CHANGES)
    h.apply([FileChange("/etc/nsswitch.conf", b"passwd: files stepssh systemd\n")])
    h.restore()
    assert (root / "etc/nsswitch.conf").read_text() == "passwd: files\n"


def test_diff_shows_every_file_and_changes_nothing(root):
    h = Host(root)
    before = snapshot(root)
    d = h.diff(CHANGES)
    assert "--- a/etc/nsswitch.conf" in d and "+passwd: files stepssh" in d and "-passwd: files" in d
    assert "--- /dev/null" in d and "+++ b/etc/sudoers.d/step-ssh" in d and "# mode 0440" in d
    assert snapshot(root) == before and not h.state.exists()


def test_validation_failure_rolls_back_everything(root):
    h = Host(root)
    before = snapshot(root)

    def refuse(path):
        assert path.read_bytes().startswith(b"bad")
        raise ValueError("visudo: syntax error")

    bad = CHANGES + [FileChange("/etc/sudoers.d/zz", b"bad line\n", 0o440, validate=refuse)]
    with pytest.raises(ChangeFailed, match="syntax error"):
        h.apply(bad)
    assert snapshot(root) == before
    assert h.manifest() == {}
    assert not list((root / "etc/sudoers.d").glob(".*"))  # no staged file left behind


def test_refuses_to_replace_non_regular(root):
    (root / "etc/link").symlink_to("/etc/passwd")
    with pytest.raises(ChangeFailed, match="not a regular file"):
        Host(root).apply([FileChange("/etc/link", b"x")])
    assert os.path.islink(root / "etc/link")


def test_removal_and_restore(root):
    h = Host(root)
    h.apply([FileChange("/etc/keep", None)])
    assert not (root / "etc/keep").exists()
    h.restore()
    assert (root / "etc/keep").read_text() == "untouched\n"


def test_corrupt_manifest_is_reported(root):
    h = Host(root)
    h.apply(CHANGES)
    h.manifest_path.write_text("{not json")
    with pytest.raises(ChangeFailed, match="unreadable"):
        h.restore()
