"""The step-ssh CLI as an operator uses it (a real subprocess each time)."""
from __future__ import annotations

import json
import subprocess
import sys

import yaml

from conftest import EXAMPLE


def cli(*args, input=None):
    return subprocess.run([sys.executable, "-m", "step_ssh.cli", *map(str, args)],
                          capture_output=True, text=True, input=input)


def test_build_show_lookup(tmp_path):
    src = tmp_path / "view.yaml"
    src.write_text(yaml.safe_dump(EXAMPLE))
    out = tmp_path / "cache"
    r = cli("cache", "build", src, "-o", out, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"path": str(out), "users": 3, "groups": 4,
                                    "bytes": out.stat().st_size, "revision": 7}
    show = json.loads(cli("cache", "show", out, "--json").stdout)
    assert show["valid"] and show["revision"] == 7 and show["users"] == 3 and not show["stale"]
    assert "revision:       7" in cli("cache", "show", out).stdout
    assert cli("lookup", "--cache", out, "passwd", "bob").stdout == "bob:x:70002:70100:Bob Builder:/home/bob:/bin/bash\n"
    assert cli("lookup", "--cache", out, "passwd", "70003").stdout.startswith("carol:")
    assert cli("lookup", "--cache", out, "group", "oncall").stdout == "oncall:x:70101:alice,bob\n"
    assert cli("lookup", "--cache", out, "initgroups", "alice").stdout.split() == ["alice", "70101", "69999"]
    assert len(cli("lookup", "--cache", out, "passwd").stdout.splitlines()) == 3
    assert cli("lookup", "--cache", out, "passwd", "nobody-here").returncode == 2


def test_build_from_stdin_json(tmp_path):
    r = cli("cache", "build", "-", "-o", tmp_path / "c", input=json.dumps(EXAMPLE))
    assert r.returncode == 0 and "3 users" in r.stdout


def test_bad_input_names_the_key_and_writes_nothing(tmp_path):
    bad = {"users": [{"name": "Bad Name", "uid": 0, "gid": 70000}], "colour": "blue"}
    src = tmp_path / "v.yaml"
    src.write_text(yaml.safe_dump(bad))
    r = cli("cache", "build", src, "-o", tmp_path / "c")
    assert r.returncode == 1
    assert "users.0.name" in r.stderr and "users.0.uid" in r.stderr and "colour" in r.stderr
    assert not (tmp_path / "c").exists()


def test_local_collision_reported(tmp_path):
    (tmp_path / "passwd").write_text("bob:x:1001:1001::/home/bob:/bin/sh\n")
    (tmp_path / "group").write_text("")
    src = tmp_path / "v.yaml"
    src.write_text(yaml.safe_dump(EXAMPLE))
    r = cli("cache", "build", src, "-o", tmp_path / "c", "--passwd", tmp_path / "passwd", "--group", tmp_path / "group")
    assert r.returncode == 1 and "user bob: name is a local account" in r.stderr
    assert "nothing was published" in r.stderr


def test_unreadable_and_malformed_input(tmp_path):
    r = cli("cache", "build", tmp_path / "missing.yaml", "-o", tmp_path / "c")
    assert r.returncode == 1 and "cannot read" in r.stderr
    (tmp_path / "x.yaml").write_text("users: [unclosed")
    r = cli("cache", "build", tmp_path / "x.yaml", "-o", tmp_path / "c")
    assert r.returncode == 1 and "not valid YAML" in r.stderr


def test_show_invalid_and_missing(tmp_path):
    (tmp_path / "junk").write_bytes(b"hello world" * 20)
    r = cli("cache", "show", tmp_path / "junk")
    assert r.returncode == 1 and "not a step-ssh cache" in r.stdout
    r = cli("cache", "show", tmp_path / "none", "--json")
    assert r.returncode == 1 and json.loads(r.stdout)["valid"] is False


def test_show_detects_flipped_block(tmp_path):
    src = tmp_path / "v.yaml"
    src.write_text(yaml.safe_dump(EXAMPLE))
    out = tmp_path / "c"
    cli("cache", "build", src, "-o", out)
    data = bytearray(out.read_bytes())
    data[200] ^= 0xFF
    out.write_bytes(bytes(data))
    r = cli("cache", "show", out)
    assert r.returncode == 1 and "checksum" in r.stdout


def test_lookup_unavailable(tmp_path):
    r = cli("lookup", "--cache", tmp_path / "none", "passwd", "x")
    assert r.returncode == 1 and "unavailable" in r.stderr


def test_paths_json():
    info = json.loads(cli("paths", "--json").stdout)
    assert info["cache"] == "/var/lib/step-ssh/cache"
    assert info["nss_module"].endswith("libnss_stepssh.so.2")
