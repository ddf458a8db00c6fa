"""`step-ssh doctor` on an activated test host: every check seen PASS, then
each broken on purpose and seen FAIL with a hint."""
from __future__ import annotations

import json
import time

import pytest

from activation_fixtures import PY, activate_cmd, new_host, seed_directory
from server_fixtures import running_server  # noqa: F401  (pytest fixture)

DOCTOR = f"{PY} -m step_ssh.cli doctor --json"


def doctor(host) -> tuple[int, dict[str, tuple[str, str]]]:
    r = host.run(DOCTOR)
    data = json.loads(r.stdout)
    assert data["ok"] == (r.returncode == 0)
    return r.returncode, {c["name"]: (c["status"], c["description"]) for c in data["checks"]}


@pytest.fixture
def activated(running_server):  # noqa: F811
    seed_directory(running_server)
    th = new_host()
    try:
        r = th.run(activate_cmd(running_server, "--tag", "env=prod", token=running_server.token("web1", {"env": "prod"})))
        assert r.returncode == 0, r.stderr
        yield th, running_server
    finally:
        th.close()


def doctor_until(host, pred, timeout: float = 15.0):
    """doctor, again until `pred(rc, checks)` holds: the agent finishes its
    first sync (CA keys, status) a moment after activate returns."""
    deadline = time.monotonic() + timeout
    while True:
        rc, checks = doctor(host)
        if pred(rc, checks) or time.monotonic() > deadline:
            return rc, checks
        time.sleep(0.2)


def test_every_check_passes_then_fails(activated):
    host, server = activated
    rc, checks = doctor_until(host, lambda rc, _: rc == 0)
    assert rc == 0, checks
    assert {name: st for name, (st, _) in checks.items()} == {name: "PASS" for name in checks}
    assert len(checks) == 12
    assert "sudo loads /usr/lib/step-ssh/stepssh_sudo_audit.so" in checks["sudo audit"][1]
    assert "alice" in checks["managed user lookup"][1] or "bob" in checks["managed user lookup"][1]

    # --renew: a new certificate, and everything still passes
    serial = host.run("openssl x509 -noout -serial -in /etc/step-ssh/identity/host.crt").stdout
    r = host.run(DOCTOR + " --renew")
    assert r.returncode == 0, r.stdout
    assert "renewed now" in r.stdout
    assert host.run("openssl x509 -noout -serial -in /etc/step-ssh/identity/host.crt").stdout != serial

    breakages = [
        # (check, how to break it, how to repair it, words the FAIL must contain)
        ("sudoers", "echo 'this is not sudoers' > /etc/sudoers.d/zz; chmod 440 /etc/sudoers.d/zz",
         "rm /etc/sudoers.d/zz", "visudo -c"),
        ("sshd", "mv /etc/ssh/sshd_config.d/10-step-ssh.conf /run/", "mv /run/10-step-ssh.conf /etc/ssh/sshd_config.d/",
         "step-ssh activate"),
        ("PAM", "mv /usr/lib/x86_64-linux-gnu/security/pam_stepssh.so /run/",
         "mv /run/pam_stepssh.so /usr/lib/x86_64-linux-gnu/security/", "missing"),
        ("nsswitch", "cp /etc/nsswitch.conf /run/ns; sed -i 's/ stepssh//' /etc/nsswitch.conf",
         "cp /run/ns /etc/nsswitch.conf", "stepssh"),
        # (a full `events` is shipped away by the running agent at once; the
        # drop counter is what stays: tests/test_audit_ship.py fills a spool for real)
        ("audit spool", "mkdir -p /var/lib/step-ssh/spool; echo \"3 $(date +%s)\" > /var/lib/step-ssh/spool/dropped",
         "rm /var/lib/step-ssh/spool/dropped", "3 event(s) dropped"),
        ("sudo audit", "cp /etc/sudo.conf /run/sudo.conf; sed -i '/stepssh_audit/d' /etc/sudo.conf",
         "cp /run/sudo.conf /etc/sudo.conf", "not audited"),
        ("identity certificate", f"cp /etc/step-ssh/identity/host.key /run/k; {PY} -c \"from step_ssh import pki;"
         "open('/etc/step-ssh/identity/host.key','wb').write(pki.new_private_key())\"",
         "cp /run/k /etc/step-ssh/identity/host.key", "key does not match"),
        ("configuration", "cp /etc/step-ssh/agent.yaml /run/a; echo 'colour: blue' >> /etc/step-ssh/agent.yaml",
         "cp /run/a /etc/step-ssh/agent.yaml", "colour"),
    ]
    for name, brk, fix, words in breakages:
        host.run(brk, check=True)
        rc, checks = doctor(host)
        assert rc == 1 and checks[name][0] == "FAIL" and words in checks[name][1], (name, checks[name])
        host.run(fix, check=True)
        rc, checks = doctor(host)
        assert checks[name][0] == "PASS", (name, checks[name])

    # a drop-in from before the jump group: a warning that says how to update it
    host.run("cp /etc/ssh/sshd_config.d/10-step-ssh.conf /run/d; "
             "sed -i '/^# jump-only/,$d' /etc/ssh/sshd_config.d/10-step-ssh.conf", check=True)
    rc, checks = doctor(host)
    assert checks["sshd"][0] == "WARN" and "step-ssh activate" in checks["sshd"][1], checks["sshd"]
    host.run("cp /run/d /etc/ssh/sshd_config.d/10-step-ssh.conf", check=True)
    assert doctor(host)[1]["sshd"][0] == "PASS"

    # the cache, and through it the NSS lookup: corrupt it (the agent is stopped first
    # so it does not republish), then the agent check fails too
    host.run("kill $(cat /run/step-ssh/agent.pid)", check=True)
    rc, checks = doctor_until(host, lambda _, c: c["agent"][0] == "FAIL")  # it exits in its own time
    assert checks["agent"][0] == "FAIL" and "not running" in checks["agent"][1]
    host.run("mkdir -p /var/lib/step-ssh && head -c 200 /dev/urandom > /var/lib/step-ssh/cache", check=True)
    rc, checks = doctor(host)
    assert checks["cache"][0] == "FAIL" and checks["managed user lookup"][0] == "FAIL"
    server.stop()
    rc, checks = doctor(host)
    assert checks["control plane"][0] == "FAIL" and "TCP" in checks["control plane"][1]
