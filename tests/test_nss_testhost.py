"""Real glibc inside a test host: getent, id, Python pwd/grp resolve managed
users after the local files, and never shadow them."""
from __future__ import annotations

import json
import sys

import pytest

from conftest import EXAMPLE

CACHE = "/var/lib/step-ssh/cache"


def publish(host, data: dict) -> None:
    host.write("/run/view.json", json.dumps(data))
    host.run([sys.executable, "-m", "step_ssh.cli", "cache", "build", "/run/view.json", "-o", CACHE], check=True)


@pytest.fixture
def host(testhost):
    publish(testhost, EXAMPLE)
    return testhost


def out(host, cmd) -> str:
    r = host.run(cmd)
    assert r.returncode == 0, f"{cmd}: {r.returncode} {r.stderr}"
    return r.stdout.strip()


def test_getent_passwd_and_group(host):
    assert out(host, "getent passwd alice") == "alice:x:70001:70001:Alice Admin:/home/alice:/bin/bash"
    assert out(host, "getent passwd 70002") == "bob:x:70002:70100:Bob Builder:/home/bob:/bin/bash"
    assert out(host, "getent group developers") == "developers:x:70100:bob,carol"
    assert out(host, "getent group 69999") == "step-sudo:x:69999:alice"
    assert host.run("getent passwd mallory").returncode == 2


def test_managed_users_come_after_local_files(host):
    lines = out(host, "getent passwd").splitlines()
    local = [line.split(":")[0] for line in host.read("/etc/passwd").splitlines() if line]
    assert [line.split(":")[0] for line in lines] == local + ["alice", "bob", "carol"]
    assert out(host, "getent passwd root").startswith("root:x:0:0:")


def test_id_shows_supplementary_groups(host):
    assert out(host, "id alice") == "uid=70001(alice) gid=70001(alice) groups=70001(alice),70101(oncall),69999(step-sudo)"
    assert out(host, "id bob") == "uid=70002(bob) gid=70100(developers) groups=70100(developers),70101(oncall)"
    assert out(host, "getent initgroups bob").split() == ["bob", "70100", "70101"]


def test_python_pwd_and_grp(host):
    code = ("import pwd, grp; p = pwd.getpwnam('carol'); g = grp.getgrgid(70101);"
            "print(p.pw_uid, p.pw_dir, p.pw_shell, g.gr_name, ','.join(g.gr_mem))")
    assert out(host, [sys.executable, "-c", code]) == "70003 /srv/carol /bin/sh oncall alice,bob"


def test_local_account_wins(host):
    # A local user appears later with a name the directory also uses: the
    # local files answer first and the cache never shadows it.
    host.run("echo 'bob:x:1500:1500:Local Bob:/home/lbob:/bin/sh' >> /etc/passwd", check=True)
    assert out(host, "getent passwd bob") == "bob:x:1500:1500:Local Bob:/home/lbob:/bin/sh"


def test_replacement_seen_by_next_process_and_revocation(host):
    data = json.loads(json.dumps(EXAMPLE))
    data["users"] = [u for u in data["users"] if u["name"] != "carol"]
    data["groups"][0]["members"] = ["bob"]
    publish(host, data)
    assert host.run("getent passwd carol").returncode == 2
    assert out(host, "getent group developers") == "developers:x:70100:bob"


def test_missing_or_corrupt_cache_keeps_local_lookups(host):
    host.run(f"head -c 100 {CACHE} > /run/t && cat /run/t > {CACHE}", check=True)
    assert host.run("getent passwd alice").returncode == 2
    assert out(host, "getent passwd root").startswith("root:")
    host.run(f"rm {CACHE}", check=True)
    assert host.run("getent passwd alice").returncode == 2
    assert out(host, "id -u root") == "0"


def test_world_writable_cache_refused_by_glibc_module(host):
    host.run(f"chmod 0666 {CACHE}", check=True)
    assert host.run("getent passwd alice").returncode == 2
    host.run(f"chmod 0644 {CACHE}", check=True)
    assert out(host, "getent passwd alice").startswith("alice:")
