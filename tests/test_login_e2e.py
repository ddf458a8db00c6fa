"""Logins end to end: real OpenSSH sshd on loopback inside a test host, real
PAM stacks (the distribution's, plus step-ssh's lines from hostconfig), real
sudo, certificates from a test CA. Each case checks what the user actually
gets: `id`, the home directory, whether sudo works.

Bastion: two test hosts (separate mount namespaces, so separate caches,
/etc and sshd) sharing the loopback network: a bastion whose cache carries
the bastion flag and gives jack `jump`, and a target where jack has `ssh`.
"""
from __future__ import annotations

import shutil
import time

import pytest

from login_fixtures import (BASE_VIEW, LOCAL_DAVE_UID, PRINCIPALS, Keys, LoginHost,
                            free_port, unavailable, view_with)
from login_fixtures import keys  # noqa: F401  (pytest fixture)

pytestmark = pytest.mark.testhost


@pytest.fixture(scope="module")
def site(keys):
    why = unavailable()
    if why:
        pytest.fail(f"cannot run login tests: {why}")
    lh = LoginHost(keys).start()
    try:
        lh.start_sshd()
        h = lh.host
        # dave (local) logs in with a plain key of his own
        h.run("install -d -o dave -g dave -m 700 /home/dave/.ssh", check=True)
        h.write("/home/dave/.ssh/authorized_keys", keys.pub("dave-local"), 0o600)
        h.run("chown dave:dave /home/dave/.ssh/authorized_keys", check=True)
        yield lh
    finally:
        lh.close()


@pytest.fixture(autouse=True)
def base_cache(request):
    if "site" in request.fixturenames:
        request.getfixturevalue("site").publish(BASE_VIEW)
    yield


def ok(r) -> str:
    assert r.returncode == 0, f"exit {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}"
    return r.stdout


def refused(r) -> None:
    assert r.returncode == 255, f"expected refusal, got exit {r.returncode}: {r.stdout}{r.stderr}"
    assert "Permission denied" in r.stderr or "Connection closed" in r.stderr, r.stderr


def stat(host, path: str, fmt: str = "%u %g %a %F") -> str:
    return ok(host.run(["stat", "-c", fmt, path])).strip()


# -- ssh access ----------------------------------------------------------------

def test_ssh_user_gets_synced_identity_and_a_fresh_home_but_no_sudo(site, keys):
    h = site.host
    h.run("rm -rf /home/bob", check=True)
    before = len(site.events())
    r = site.ssh("bob", "id; pwd; ls -A; sudo -n true; echo sudo=$?", "bob", keys.cert("bob", ["bob"]))
    lines = ok(r).splitlines()
    assert lines[0] == "uid=70002(bob) gid=70100(developers) groups=70100(developers),70101(oncall)"
    assert lines[1] == "/home/bob"
    assert {".bashrc", ".profile", ".bash_logout"} <= set(lines[2:-1])
    assert lines[-1] == "sudo=1"
    assert "a password is required" in r.stderr
    assert stat(h, "/home/bob") == "70002 70100 700 directory"
    assert stat(h, "/home/bob/.bashrc") == "70002 70100 644 regular file"
    # sshd writes session_close after the client has gone: wait for it
    deadline = time.monotonic() + 10
    while len(new := site.events()[before:]) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [e["type"] for e in new] == ["home_created", "session_open", "sudo", "session_close"]
    opened, sudo = new[1], new[2]
    assert opened["user"] == "bob" and opened["home_created"] is True
    assert opened["service"] == "sshd" and opened["rhost"] == "127.0.0.1"
    # the refused sudo inside the session: recorded by the sudo audit plugin, linked to the session
    # (sudoers reports a missing password as an error, before resolving the command: as typed)
    assert sudo["user"] == "bob" and sudo["result"] == "failure" and sudo["command"] == "true"
    assert sudo["reason"] == "authentication failure (sudoers_policy)" and sudo["cwd"] == "/home/bob"
    assert sudo["session_id"] == opened["session_id"] == new[3]["session_id"]
    # second login: the home is kept as it is
    h.run("touch /home/bob/keep", check=True)
    before = len(site.events())
    ok(site.ssh("bob", "test -f ~/keep", "bob", keys.cert("bob", ["bob"])))
    deadline = time.monotonic() + 10
    while len(new := site.events()[before:]) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [e["type"] for e in new] == ["session_open", "session_close"]
    assert new[0]["home_created"] is False


def test_home_that_cannot_be_made_safely_means_no_session(site, keys):
    h = site.host
    view = view_with()
    view["users"].append({"name": "tina", "uid": 70011, "gid": 70011, "home": "/home/shared/tina",
                          "principals": ["tina"], "access": "ssh"})
    site.publish(view)
    h.run("rm -rf /home/shared && mkdir -m 1777 /home/shared", check=True)
    r = site.ssh("tina", "id", "tina", keys.cert("tina", ["tina"]))
    assert r.returncode != 0 and "uid=" not in r.stdout
    assert h.run("ls -A /home/shared").stdout == ""
    assert "PAM: pam_open_session(): Cannot make/remove an entry for the specified session" in site.sshd_output()
    h.run("rm -rf /home/shared", check=True)


def test_sudo_user_gets_root(site, keys):
    before = len(site.events())
    r = site.ssh("alice", "id -G; sudo -n id -u; sudo -n /bin/false; sudo -n /bin/sh -c 'kill -TERM $$'; "
                 "sudo -n /etc/hostname; true", "alice", keys.cert("alice", ["alice@example.com"]))
    groups, uid = ok(r).split("\n")[:2]
    assert "69999" in groups.split()  # the synthesized step-sudo group
    assert uid == "0"
    # each accepted command: a `sudo` event before it runs, a `sudo_exit` when it ends
    evs = [e for e in site.events()[before:] if e["type"] in ("sudo", "sudo_exit")]
    assert [e["type"] for e in evs] == ["sudo", "sudo_exit"] * 4
    starts, exits = evs[0::2], evs[1::2]
    for st, ex in zip(starts, exits):
        assert ex["sudo_id"] == st["id"] < ex["id"] and ex["command"] == st["command"]
        assert ex["user"] == "alice" and ex["target_user"] == "root" and ex["pid"] == st["pid"]
        assert ex["session_id"] == st["session_id"] and ex["duration_ms"] >= 0
    # /etc/hostname is not executable: sudo reports that as exit status 127, as a shell would
    assert [(e["result"], e.get("exit_status"), e.get("signal")) for e in exits] == \
        [("success", 0, None), ("failure", 1, None), ("failure", None, 15), ("failure", 127, None)]
    assert exits[2]["reason"] == "killed by SIGTERM" and "reason" not in exits[0]



def test_sudo_audit_plugin_under_valgrind(site):
    """The plugin runs inside sudo: no memory error in accept, close and reject."""
    if not shutil.which("valgrind"):
        pytest.fail("valgrind is not installed (scripts/setup.sh installs it)")
    h = site.host
    before = len(site.events())
    # valgrind will not run a setuid binary; a plain copy run by root is sudo all the same
    h.run(["install", "-m", "0755", "/usr/bin/sudo", "/run/sudo-plain"], check=True)
    vg = ["valgrind", "-q", "--error-exitcode=99", "--run-libc-freeres=no", "/run/sudo-plain", "-n"]
    # the last one's line is too long once escaped: both events fall back to their essentials
    for args, rc in ((["/bin/sh", "-c", "exit 3"], 3), (["-u", "nobody", "/bin/true"], 0),
                     (["/nonexistent"], 1), (["/bin/true", "\x01" * 1500], 0)):
        r = h.run(vg + args)
        assert r.returncode == rc and "==" not in r.stderr, f"{args}: {r.stderr}"
    evs = [e for e in site.events()[before:] if e["type"].startswith("sudo")]
    got = [(e["type"], e["result"], e.get("exit_status"), e.get("target_user")) for e in evs]
    assert got[:4] == [("sudo", "success", None, "root"), ("sudo_exit", "failure", 3, "root"),
                       ("sudo", "success", None, "nobody"), ("sudo_exit", "success", 0, "nobody")]
    assert [g[:2] for g in got[4:5]] == [("sudo", "denied")]  # command not found: rejected, no sudo_exit
    long_start, long_exit = evs[5:]
    assert long_start["truncated"] is True and "command" not in long_start  # the fallback event
    assert long_exit["sudo_id"] == long_start["id"]
    assert long_exit["exit_status"] == 0

def test_sudo_checks_access_again_in_pam(site):
    h = site.host
    # A session opened while alice held sudo keeps its group list (69999,
    # step-sudo) after the grant is revoked: sudoers still matches, and
    # sudo's PAM account phase is what refuses her.
    alice_old_session = ["setpriv", "--reuid=70001", "--regid=70001", "--groups=70001,70101,69999", "--"]
    assert ok(h.run(alice_old_session + ["sudo", "-n", "id", "-u"])).strip() == "0"
    site.publish(view_with(revision=2, users={"alice": {"access": "ssh"}}))
    assert "alice" not in ok(h.run("getent group step-sudo"))
    r = h.run(alice_old_session + ["sudo", "-n", "id", "-u"])
    assert r.returncode == 1 and r.stdout == ""
    assert "PAM account management error: Permission denied" in r.stderr
    assert site.has_logged("step-ssh: denied sudo for alice: needs 'sudo' access on this host, has 'ssh'")
    # and a stale cache stops sudo too
    site.publish(view_with(max_stale_seconds=60, confirmed_at=int(time.time()) - 3600))
    r = h.run(alice_old_session + ["sudo", "-n", "id", "-u"])
    assert r.returncode == 1 and "PAM account management error" in r.stderr
    assert site.has_logged("step-ssh: denied sudo for alice: cache is stale")


def test_no_grant_means_no_such_user_and_no_login(site, keys):
    h = site.host
    assert h.run("getent passwd mallory").returncode == 2
    refused(site.ssh("mallory", "id", "mallory", keys.cert("mallory", ["mallory"])))
    assert "Invalid user mallory" in site.sshd_output()


def test_access_none_is_refused_by_principals_and_by_pam(site, keys):
    h = site.host
    # erin resolves (NSS serves every cached account) but holds nothing here
    assert ok(h.run("getent passwd erin")).startswith("erin:x:70005:")
    refused(site.ssh("erin", "id", "erin", keys.cert("erin", ["erin"])))
    # Even with a key sshd accepts on its own (authorized_keys), PAM's
    # account phase refuses her: the helper is not the only gate.
    h.run("install -d -o 70005 -g 70005 -m 700 /home/erin /home/erin/.ssh", check=True)
    h.write("/home/erin/.ssh/authorized_keys", keys.pub("erin"), 0o600)
    h.run("chown 70005:70005 /home/erin/.ssh/authorized_keys", check=True)
    before = len(site.events())
    r = site.ssh("erin", "id", "erin")
    assert r.returncode == 255 and "uid=" not in r.stdout
    denied = [e for e in site.events()[before:] if e["type"] == "login_denied"]
    assert denied and denied[0]["user"] == "erin"
    assert denied[0]["reason"] == "has no access to this host"
    assert site.has_logged("step-ssh: denied sshd for erin from 127.0.0.1: has no access to this host")
    h.run("rm -rf /home/erin", check=True)


def test_certificate_principals_must_match(site, keys):
    refused(site.ssh("bob", "id", "bob", keys.cert("bob", ["mallory"], tag="-wrong")))
    # a valid certificate for alice does not open bob's account
    refused(site.ssh("bob", "id", "alice", keys.cert("alice", ["alice"])))
    assert "Certificate does not contain an authorized principal" in site.sshd_output()


def test_expired_certificate_is_refused(site, keys):
    refused(site.ssh("bob", "id", "bob", keys.cert("bob", ["bob"], validity="20200101:20200102",
                                                    tag="-expired")))
    assert "expired" in site.sshd_output() or "Certificate invalid" in site.sshd_output()


def test_local_account_with_a_directory_name_is_untouched(site, keys):
    h = site.host
    passwd_line = [line for line in h.read("/etc/passwd").splitlines() if line.startswith("dave:")]
    assert passwd_line == [f"dave:x:{LOCAL_DAVE_UID}:{LOCAL_DAVE_UID}::/home/dave:/bin/bash"]
    assert ok(h.run("getent passwd dave")).strip() == passwd_line[0]
    # the directory's dave (sudo access, principal dave) gets nothing here
    assert ok(h.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", PRINCIPALS,
                     "dave", str(LOCAL_DAVE_UID)])) == ""
    refused(site.ssh("dave", "id", "dave", keys.cert("dave", ["dave"])))
    # the local dave logs in with his own key, as himself, without step-sudo
    home_before = stat(h, "/home/dave")
    assert home_before.startswith(f"{LOCAL_DAVE_UID} {LOCAL_DAVE_UID} ")
    before = len(site.events())
    r = site.ssh("dave", "id; sudo -n true; echo sudo=$?", "dave-local")
    lines = ok(r).splitlines()
    assert lines[0] == f"uid={LOCAL_DAVE_UID}(dave) gid={LOCAL_DAVE_UID}(dave) groups={LOCAL_DAVE_UID}(dave)"
    assert lines[1] == "sudo=1"
    assert stat(h, "/home/dave") == home_before  # as useradd made it
    # no session events for a local account; its sudo is audited like every sudo on the host
    assert [e["type"] for e in site.events()[before:] if e["user"] == "dave"] == ["sudo"]


def test_revoked_access_refuses_the_next_login(site, keys):
    cert = keys.cert("carol", ["carol"])
    ok(site.ssh("carol", "true", "carol", cert))
    site.publish(view_with(revision=2, users={"carol": {"access": "none"}}))
    refused(site.ssh("carol", "true", "carol", cert))
    site.publish(view_with(revision=3, users={"carol": None}))
    refused(site.ssh("carol", "true", "carol", cert))
    assert site.host.run("getent passwd carol").returncode == 2
    site.publish(view_with(revision=4))
    ok(site.ssh("carol", "true", "carol", cert))


def test_stale_cache_refuses_managed_users_but_not_local_ones(site, keys):
    h = site.host
    site.publish(view_with(max_stale_seconds=3600, confirmed_at=int(time.time()) - 7200))
    refused(site.ssh("bob", "id", "bob", keys.cert("bob", ["bob"])))
    assert ok(h.run("getent passwd bob")).startswith("bob:x:70002:")  # ls -l keeps working
    assert site.has_logged("cache is stale: no principals for bob")
    ok(site.ssh("dave", "true", "dave-local"))


def test_corrupt_or_missing_cache_refuses_managed_users_only(site, keys):
    h = site.host
    good = site.publish(BASE_VIEW)
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0xFF
    site.publish_bytes(bytes(bad))
    refused(site.ssh("bob", "id", "bob", keys.cert("bob", ["bob"])))
    ok(site.ssh("dave", "true", "dave-local"))
    h.run("rm -f /var/lib/step-ssh/cache", check=True)
    refused(site.ssh("bob", "id", "bob", keys.cert("bob", ["bob"])))
    ok(site.ssh("dave", "true", "dave-local"))


def test_jump_access_on_a_host_that_is_not_a_bastion_is_nothing(site, keys):
    refused(site.ssh("jack", "id", "jack", keys.cert("jack", ["jack"])))


# -- bastion ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def jump_site(keys):
    why = unavailable()
    if why:
        pytest.fail(f"cannot run login tests: {why}")
    bastion = LoginHost(keys, view_with(bastion=True), local_dave=False, marker="bastion")
    target = LoginHost(keys, view_with(users={"jack": {"access": "ssh"}}), local_dave=False,
                       marker="target")
    try:
        bastion.start()
        target.start()
        bastion.start_sshd()
        target.start_sshd()
        cfg = keys.dir / "jack-ssh-config"
        cfg.write_text(
            "Host *\n"
            f"  IdentityFile {keys.key('jack')}\n"
            f"  CertificateFile {keys.cert('jack', ['jack'])}\n"
            "  IdentitiesOnly yes\n  BatchMode yes\n  StrictHostKeyChecking no\n"
            "  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n  ConnectTimeout 10\n")
        yield bastion, target, cfg
    finally:
        bastion.close()
        target.close()


def test_jump_user_reaches_the_target_through_the_bastion(jump_site):
    bastion, target, cfg = jump_site
    log_before = len(bastion.sshd_output())
    r = bastion.host.run(["ssh", "-F", str(cfg), "-J", f"jack@127.0.0.1:{bastion.port}",
                          "-p", str(target.port), "jack@127.0.0.1", "cat /etc/step-ssh-test-marker; id -u"])
    assert ok(r).split() == ["target", "70006"]
    # the bastion let jack through (PAM account: jump on a bastion) and
    # created no home for him; no shell ran there
    assert bastion.host.run("test -e /home/jack").returncode != 0
    opened = [e for e in bastion.events() if e["user"] == "jack" and e["type"] == "session_open"]
    assert opened and opened[-1]["access"] == "jump" and opened[-1]["home_created"] is False
    assert "Starting session" not in bastion.sshd_output()[log_before:]


def test_jump_user_gets_no_shell_command_or_pty_on_the_bastion(jump_site):
    bastion, _, cfg = jump_site
    base = ["ssh", "-F", str(cfg), "-p", str(bastion.port)]
    r = bastion.host.run(base + ["jack@127.0.0.1", "cat /etc/step-ssh-test-marker"])
    assert r.returncode == 1 and "bastion" not in r.stdout
    assert "may only jump through this host" in r.stderr
    r = bastion.host.run(base + ["-tt", "jack@127.0.0.1"], input="")
    assert r.returncode != 0 and "bastion" not in r.stdout
    assert bastion.host.run("test -e /home/jack").returncode != 0
    # PAM let the connection in (jump on a bastion); the drop-in's Match
    # Group step-jump block forced the command (it overrides the principals
    # line's command=, which says the same)
    assert "forced-command (config)" in bastion.sshd_output()


def test_jump_user_cannot_open_remote_forwards_on_the_bastion(jump_site):
    """-J needs local TCP forwarding only: listeners on the bastion (-R, TCP or
    Unix socket) are refused. The Unix socket one shows the drop-in's Match
    Group block at work: no principals option can forbid it."""
    bastion, _, cfg = jump_site
    assert ok(bastion.host.run(["id", "-Gn", "jack"])).split() == ["jack", "step-jump"]
    base = ["timeout", "10", "ssh", "-F", str(cfg), "-p", str(bastion.port), "-N",
            "-o", "ExitOnForwardFailure=yes"]
    bastion.host.run("rm -f /tmp/jack-fwd.sock", check=True)
    p1, p2, p3 = free_port(), free_port(), free_port()
    for spec in (f"127.0.0.1:{p1}:127.0.0.1:22", "0:127.0.0.1:22", f"{p2}:127.0.0.1:22",
                 "no-remote-forwarding.invalid:1:127.0.0.1:22", "/tmp/jack-fwd.sock:127.0.0.1:22"):
        r = bastion.host.run(base + ["-R", spec, "jack@127.0.0.1"])
        assert r.returncode == 255 and "remote port forwarding failed" in r.stderr, (spec, r.returncode, r.stderr)
    assert bastion.host.run("test -e /tmp/jack-fwd.sock").returncode != 0
    # bob holds a grant on the bastion: his remote forwards work (timeout ends the -N session)
    log_before = len(bastion.sshd_output())
    bob = ["-o", f"CertificateFile={bastion.keys.cert('bob', ['bob'])}", "-o", f"IdentityFile={bastion.keys.key('bob')}"]
    r = bastion.host.run(["timeout", "3", "ssh", "-F", str(cfg), *bob, "-p", str(bastion.port), "-N",
                          "-o", "ExitOnForwardFailure=yes", "-R", f"127.0.0.1:{p3}:127.0.0.1:22", "bob@127.0.0.1"])
    assert r.returncode == 124, f"{r.stderr}\n{bastion.sshd_output()[log_before:]}"


def test_users_with_a_grant_on_the_bastion_get_a_shell_there(jump_site, keys):
    bastion, _, _ = jump_site
    r = bastion.ssh("bob", "cat /etc/step-ssh-test-marker", "bob", keys.cert("bob", ["bob"]))
    assert ok(r).strip() == "bastion"


def test_jump_user_cannot_bypass_the_restriction_with_keys_of_their_own(jump_site, keys, tmp_path):
    """sshd also reads ~/.ssh/authorized_keys (think NFS homes): a plain key or
    a `cert-authority` line for a CA of jack's own would log him in without
    the forwarding-only principals line. The PAM session refuses such logins,
    and sshd then runs no command and opens no forward."""
    bastion, target, cfg = jump_site
    h = bastion.host
    rogue = Keys()
    try:
        rogue_cert = rogue.cert("jack", ["jack"])  # jack's own CA, jack's own key
        h.run("install -d -o 70006 -g 70006 -m 700 /home/jack /home/jack/.ssh", check=True)
        h.write("/home/jack/.ssh/authorized_keys",
                keys.pub("jack-plain") + f"cert-authority {rogue.ca_pub}", 0o600)
        h.run("chown 70006:70006 /home/jack/.ssh/authorized_keys", check=True)
        before = len(bastion.events())
        for key, cert, keysrc in (("jack-plain", None, keys), ("jack", rogue_cert, rogue)):
            argv = ["ssh", "-F", "/dev/null", "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
                    "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                    "-o", "LogLevel=ERROR", "-i", str(keysrc.key(key)), "-p", str(bastion.port)]
            if cert:
                argv += ["-o", f"CertificateFile={cert}"]
            r = h.run(argv + ["jack@127.0.0.1", "cat /etc/step-ssh-test-marker"])
            assert r.returncode != 0 and "bastion" not in r.stdout, r
            # and no forwarding either: -W through the bastion fails
            r = h.run(argv + ["-W", f"127.0.0.1:{target.port}", "jack@127.0.0.1"], input="")
            assert "SSH-2.0" not in r.stdout, r
        denied = [e for e in bastion.events()[before:] if e["type"] == "login_denied"]
        reasons = {e["reason"] for e in denied}
        assert "jump-only login not made with a fleet certificate: authenticated by a plain " \
               "ssh-ed25519 key, not by a certificate" in reasons
        assert "jump-only login not made with a fleet certificate: certificate is not signed by " \
               "a CA in /var/lib/step-ssh/trusted-user-ca-keys" in reasons
        assert "PAM: pam_open_session()" in bastion.sshd_output()
        # the fleet certificate still works
        r = h.run(["ssh", "-F", str(cfg), "-J", f"jack@127.0.0.1:{bastion.port}",
                   "-p", str(target.port), "jack@127.0.0.1", "cat /etc/step-ssh-test-marker"])
        assert ok(r).strip() == "target"
    finally:
        rogue.close()
        h.run("rm -rf /home/jack")
