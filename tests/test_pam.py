"""pam_stepssh.so and step-ssh-principals, driven through pamtester, python-pam
and directly, inside a test host: account decisions per service, stale and
broken caches, home directory creation (including hostile layouts), the audit
spool, syslog reasons, and one run under valgrind."""
from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from login_fixtures import (BASE_VIEW, EVENTS, LOCAL_DAVE_UID, PRINCIPALS, SPOOL, Keys,
                            LoginHost, unavailable, view_with)
from login_fixtures import keys  # noqa: F401  (pytest fixture)
from step_ssh import hostconfig

pytestmark = pytest.mark.testhost

EXTRA_USERS = [
    # homes in awkward places, for the home-creation cases
    {"name": "sym", "uid": 70010, "gid": 70010, "principals": ["sym"], "access": "ssh"},
    {"name": "tina", "uid": 70011, "gid": 70011, "home": "/home/shared/tina", "access": "ssh"},
    {"name": "ursula", "uid": 70012, "gid": 70012, "home": "/home/deep/er/ursula", "access": "ssh"},
    {"name": "vera", "uid": 70013, "gid": 70100, "access": "ssh"},
]
VIEW = {**BASE_VIEW, "users": BASE_VIEW["users"] + EXTRA_USERS}

PAM_PERM_DENIED = 6


@pytest.fixture(scope="module")
def lh(keys):
    why = unavailable()
    if why:
        pytest.fail(f"cannot run PAM tests: {why}")
    h = LoginHost(keys, VIEW).start()
    try:
        h.probe_service("stepssh-probe", "service=stepssh-probe:ssh")
        yield h
    finally:
        h.close()


@pytest.fixture(autouse=True)
def base_cache(request):
    if "lh" in request.fixturenames:
        request.getfixturevalue("lh").publish(VIEW)
    yield


def pamtester(lh, service: str, user: str, *ops: str, items: dict | None = None, prefix=()):
    argv = list(prefix) + ["pamtester", "-v"]
    for k, v in (items or {}).items():
        argv += ["-I", f"{k}={v}"]
    return lh.host.run(argv + [service, user, *ops])


def outcome(r) -> str:
    """'allowed', 'ignored' or 'denied: <our message>' for a PROBE_STACK run."""
    text = r.stdout + r.stderr
    if r.returncode == 0:
        return "ignored" if "STEPSSH-IGNORED" in text else "allowed"
    for line in text.splitlines():
        if "step-ssh: access denied: " in line:
            return "denied: " + line.split("step-ssh: access denied: ", 1)[1].strip()
    return f"failed without a step-ssh message: {text.strip()}"


# -- account ----------------------------------------------------------------------

def test_real_sshd_and_sudo_stacks(lh):
    acct = lambda svc, user: pamtester(lh, svc, user, "acct_mgmt")  # noqa: E731
    assert acct("sshd", "alice").returncode == 0
    assert acct("sshd", "bob").returncode == 0
    r = acct("sshd", "erin")
    assert r.returncode != 0 and "has no access to this host" in r.stderr
    r = acct("sshd", "jack")
    assert r.returncode != 0 and "only a bastion honours" in r.stderr
    assert acct("sshd", "root").returncode == 0  # local: the distribution's stack decides
    assert acct("sudo", "alice").returncode == 0
    r = acct("sudo", "bob")
    assert r.returncode != 0 and "needs 'sudo' access on this host, has 'ssh'" in r.stderr
    assert acct("sudo", "root").returncode == 0


def test_outcomes_for_a_mapped_service(lh):
    probe = lambda user: outcome(pamtester(lh, "stepssh-probe", user, "acct_mgmt"))  # noqa: E731
    assert probe("bob") == "allowed"
    assert probe("alice") == "allowed"
    assert probe("erin") == "denied: has no access to this host"
    assert probe("jack").startswith("denied: needs 'ssh' access on this host, has 'jump'")
    assert probe("root") == "ignored"
    assert probe("dave") == "ignored"     # local account, though the cache has a dave
    assert probe("mallory") == "ignored"  # unknown to the cache: not ours to decide


def test_service_mapping_arguments(lh):
    lh.probe_service("custom-app")  # no mapping: managed users denied, others untouched
    assert outcome(pamtester(lh, "custom-app", "bob", "acct_mgmt")) == \
        "denied: service custom-app is not open to managed users (no service= mapping)"
    assert outcome(pamtester(lh, "custom-app", "root", "acct_mgmt")) == "ignored"
    lh.probe_service("custom-app", "service=custom-app:sudo")
    assert outcome(pamtester(lh, "custom-app", "bob", "acct_mgmt")).startswith("denied: needs 'sudo'")
    assert outcome(pamtester(lh, "custom-app", "alice", "acct_mgmt")) == "allowed"
    lh.probe_service("custom-app", "default=ignore")
    assert outcome(pamtester(lh, "custom-app", "bob", "acct_mgmt")) == "ignored"
    lh.probe_service("custom-app", "service=other:ssh service=custom-app:deny")
    assert outcome(pamtester(lh, "custom-app", "alice", "acct_mgmt")).startswith("denied: service custom-app")
    # sshd's built-in level can be overridden too
    lh.probe_service("sshd-alt", "service=sshd-alt:jump")
    lh.publish(view_with(VIEW, bastion=True))
    assert outcome(pamtester(lh, "sshd-alt", "jack", "acct_mgmt")) == "allowed"
    assert outcome(pamtester(lh, "stepssh-probe", "jack", "acct_mgmt")).startswith("denied")


def test_su_needs_sudo_from_the_invoking_user(lh):
    lh.probe_service("su")
    su = lambda target, ruser: outcome(  # noqa: E731
        pamtester(lh, "su", target, "acct_mgmt", items={"ruser": ruser}))
    assert su("root", "bob") == "denied: invoking user bob: needs 'sudo' access on this host, has 'ssh'"
    assert su("root", "alice") == "ignored"   # alice may escalate; root's own stack decides
    assert su("root", "root") == "ignored"
    assert su("bob", "root") == "allowed"     # a managed target needs ssh
    assert su("erin", "root") == "denied: has no access to this host"


def test_stale_cache_denies_managed_users(lh):
    lh.publish(view_with(VIEW, max_stale_seconds=3600, confirmed_at=int(time.time()) - 4000))
    r = pamtester(lh, "stepssh-probe", "alice", "acct_mgmt")
    assert outcome(r).startswith("denied: cache is stale: last confirmed 4")
    assert outcome(r).endswith("limit 3600 s")
    assert outcome(pamtester(lh, "stepssh-probe", "root", "acct_mgmt")) == "ignored"
    assert pamtester(lh, "sudo", "alice", "acct_mgmt").returncode != 0
    # NSS still answers, so files keep their owners' names
    assert lh.host.run("getent passwd alice").returncode == 0


@pytest.mark.parametrize("damage", ["header", "data", "missing", "world-writable"])
def test_unreadable_cache_denies_non_local_users(lh, damage):
    h = lh.host
    if damage in ("header", "data"):
        data = bytearray(lh.publish(VIEW))
        data[20 if damage == "header" else 200] ^= 0x01
        lh.publish_bytes(bytes(data))
    elif damage == "missing":
        h.run("rm -f /var/lib/step-ssh/cache", check=True)
    else:
        h.run("chmod 0666 /var/lib/step-ssh/cache", check=True)
    r = pamtester(lh, "stepssh-probe", "bob", "acct_mgmt")
    if damage == "data":  # the file maps; the record's block fails its CRC
        assert outcome(r) == "denied: cache /var/lib/step-ssh/cache is corrupt"
    else:
        assert outcome(r) == "denied: cache /var/lib/step-ssh/cache is missing, unreadable or corrupt"
    assert outcome(pamtester(lh, "stepssh-probe", "root", "acct_mgmt")) == "ignored"
    assert outcome(pamtester(lh, "stepssh-probe", "dave", "acct_mgmt")) == "ignored"


def test_denials_reach_syslog_and_the_spool(lh):
    before = len(lh.events())
    pamtester(lh, "sshd", "erin", "acct_mgmt", items={"rhost": "203.0.113.9", "tty": "pts/9"})
    assert lh.has_logged("pam_stepssh(sshd:account): step-ssh: denied sshd for erin from 203.0.113.9: "
                         "has no access to this host")
    ev = lh.events()[before:]
    assert len(ev) == 1
    e = ev[0]
    assert e["type"] == "login_denied" and e["result"] == "denied" and e["user"] == "erin" and e["uid"] == 70005
    assert e["access"] == "none" and e["rhost"] == "203.0.113.9" and e["tty"] == "pts/9"
    assert e["reason"] == "has no access to this host" and e["service"] == "sshd"
    assert e["v"] == 2 and len(e["id"]) == 26 and e["time"].endswith("Z")
    # the same line, for local tooling, in the system log
    assert e in lh.syslog_events(e["id"])


# -- session: homes and audit ---------------------------------------------------

def stat(lh, path: str, fmt: str = "%u %g %a %F") -> str:
    r = lh.host.run(["stat", "-c", fmt, path])
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_home_is_created_with_owner_mode_and_skeleton(lh):
    h = lh.host
    h.run("rm -rf /home/vera /etc/stepssh-skel", check=True)
    h.run("mkdir -p /etc/stepssh-skel/.config/app && echo hi > /etc/stepssh-skel/.config/app/rc && "
          "echo x > /etc/stepssh-skel/tool && chmod 4755 /etc/stepssh-skel/tool && "
          "ln -s .config/app/rc /etc/stepssh-skel/link && ln -s /etc/shadow /etc/stepssh-skel/shadow-link && "
          "mkfifo /etc/stepssh-skel/fifo", check=True)
    lh.probe_service("stepssh-skel", "service=stepssh-skel:ssh mode=0750 skel=/etc/stepssh-skel")
    before = len(lh.events())
    r = pamtester(lh, "stepssh-skel", "vera", "acct_mgmt", "open_session", "close_session")
    assert r.returncode == 0, r.stderr
    assert stat(lh, "/home/vera") == "70013 70100 750 directory"
    assert stat(lh, "/home/vera/.config") == "70013 70100 755 directory"
    assert stat(lh, "/home/vera/.config/app/rc") == "70013 70100 644 regular file"
    assert stat(lh, "/home/vera/tool") == "70013 70100 755 regular file"  # setuid dropped
    assert stat(lh, "/home/vera/link") == "70013 70100 777 symbolic link"
    assert h.read("/home/vera/link") == "hi\n"
    # links are copied as links (owned by the user), never followed
    assert stat(lh, "/home/vera/shadow-link", "%u %F %N") == "70013 symbolic link '/home/vera/shadow-link' -> '/etc/shadow'"
    assert stat(lh, "/etc/shadow", "%u %a") == "0 640"
    assert h.run("test -e /home/vera/fifo").returncode != 0
    assert h.run("ls -A /home | grep step-ssh").stdout == ""  # no temporary left behind
    ev = lh.events()[before:]
    assert [e["type"] for e in ev] == ["home_created", "session_open", "session_close"]
    assert ev[0]["home"] == "/home/vera" and ev[0]["user"] == "vera"
    assert ev[1]["home_created"] is True and ev[1]["service"] == "stepssh-skel"
    # one session id from open to close (and on the home it made)
    assert len({e["session_id"] for e in ev}) == 1 and len(ev[0]["session_id"]) == 26


def test_existing_home_symlink_is_left_alone(lh):
    h = lh.host
    h.run("rm -rf /home/sym /etc/sym-victim && mkdir -m 0755 /etc/sym-victim && "
          "ln -s /etc/sym-victim /home/sym", check=True)
    r = pamtester(lh, "stepssh-probe", "sym", "open_session")
    assert r.returncode == 0, r.stderr
    assert stat(lh, "/home/sym", "%F") == "symbolic link"
    assert stat(lh, "/etc/sym-victim") == "0 0 755 directory"
    assert h.run("ls -A /etc/sym-victim").stdout == ""
    assert lh.has_logged("home of sym: /home/sym exists and is not a directory; left alone")


def test_home_under_a_directory_others_can_write_is_refused(lh):
    h = lh.host
    h.run("rm -rf /home/shared && mkdir -m 1777 /home/shared", check=True)
    r = pamtester(lh, "stepssh-probe", "tina", "open_session")
    assert r.returncode != 0
    assert h.run("ls -A /home/shared").stdout == ""
    assert lh.has_logged("cannot create the home of tina: refusing to create /home/shared/tina: its parent "
                         "directory is not owned by root or is writable by others")
    ev = lh.events()[-1]
    assert ev["type"] == "session_open" and ev["result"] == "failure" and ev["user"] == "tina"


def test_missing_parents_are_created_root_owned(lh):
    h = lh.host
    h.run("rm -rf /home/deep", check=True)
    r = pamtester(lh, "stepssh-probe", "ursula", "open_session")
    assert r.returncode == 0, r.stderr
    assert stat(lh, "/home/deep") == "0 0 755 directory"
    assert stat(lh, "/home/deep/er") == "0 0 755 directory"
    assert stat(lh, "/home/deep/er/ursula") == "70012 70012 700 directory"


def test_no_home_and_no_session_events_for_local_users(lh):
    before = len(lh.events())
    r = pamtester(lh, "stepssh-probe", "dave", "open_session", "close_session")
    assert r.returncode == 0
    assert lh.events()[before:] == []
    assert stat(lh, "/home/dave", "%u") == str(LOCAL_DAVE_UID)


def test_spool_is_private_and_append_only_json(lh):
    h = lh.host
    pamtester(lh, "stepssh-probe", "bob", "open_session", "close_session")
    assert stat(lh, SPOOL) == "0 0 700 directory"
    assert stat(lh, EVENTS) == "0 0 600 regular file"
    raw = h.read(EVENTS)
    assert raw.endswith("\n")
    events = [json.loads(line) for line in raw.splitlines()]
    assert len({e["id"] for e in events}) == len(events)
    for e in events:
        assert {"v", "id", "time", "host", "type", "result", "service", "user", "uid", "rhost", "ruser", "tty",
                "pid"} <= e.keys()


def test_full_spool_drops_the_event_but_not_the_login(lh):
    lh.probe_service("stepssh-tiny", "service=stepssh-tiny:ssh spool_max=10")
    before = lh.host.read(EVENTS)
    r = pamtester(lh, "stepssh-tiny", "bob", "acct_mgmt", "open_session", "close_session")
    assert r.returncode == 0, r.stderr
    assert lh.host.read(EVENTS) == before
    assert lh.has_logged("audit event session_open for bob not recorded: spool /var/lib/step-ssh/spool/events is full")


def test_hostile_items_are_escaped_in_the_spool(lh):
    before = len(lh.events())
    pamtester(lh, "stepssh-probe", "erin", "acct_mgmt",
              items={"rhost": 'evil"host\\\x01\u00e9', "tty": "x" * 9000})
    e = lh.events()[before]
    # oversized items: the event is kept, with the essentials only
    assert e["type"] == "login_denied" and e["user"] == "erin" and e["truncated"] is True
    pamtester(lh, "stepssh-probe", "erin", "acct_mgmt", items={"rhost": 'evil"host\\\x01\u00e9'})
    e = lh.events()[-1]
    assert e["rhost"] == 'evil"host\\\x01\u00c3\u00a9'  # bytes kept, as \u00XX escapes


# -- other callers -----------------------------------------------------------------

PYTHON_PAM = r"""
import json, sys, pam
out = {}
for user in sys.argv[1:]:
    p = pam.pam()
    ok = p.authenticate(user, "", service="stepssh-probe", call_end=False)
    r = {"ok": ok, "code": p.code, "reason": p.reason}
    if ok:
        r["open"] = p.open_session()
        r["close"] = p.close_session()
    p.end()
    out[user] = r
print(json.dumps(out))
"""


def test_python_pam(lh):
    lh.host.run("rm -rf /home/carol", check=True)
    r = lh.host.run([sys.executable, "-c", PYTHON_PAM, "carol", "erin", "root"])
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["carol"]["ok"] is True and res["carol"]["open"] == 0 and res["carol"]["close"] == 0
    assert stat(lh, "/home/carol") == "70003 70100 700 directory"
    assert res["erin"]["ok"] is False and res["erin"]["code"] == PAM_PERM_DENIED
    assert res["root"]["ok"] is True  # ignored by us, allowed by the rest of the stack


def test_pamtester_under_valgrind(lh):
    if not shutil.which("valgrind"):
        pytest.fail("valgrind is not installed (scripts/setup.sh installs it)")
    h = lh.host
    h.run("rm -rf /home/carol /home/deep", check=True)
    # --run-libc-freeres=no: glibc would unload the NSS module at exit and turn
    # its (still referenced) cache mapping into a false "definitely lost".
    vg = ["valgrind", "-q", "--error-exitcode=99", "--leak-check=full", "--run-libc-freeres=no",
          "--errors-for-leak-kinds=definite", "--show-leak-kinds=definite"]
    cases = [("carol", ("acct_mgmt", "open_session", "close_session"), 0),   # allowed + new home
             ("ursula", ("acct_mgmt", "open_session", "close_session"), 0),  # parents created
             ("erin", ("acct_mgmt",), 1),                                       # denied
             ("root", ("acct_mgmt", "open_session", "close_session"), 0)]     # ignored
    for user, ops, want in cases:
        r = pamtester(lh, "stepssh-probe", user, *ops, prefix=vg)
        assert r.returncode == want, f"{user}: exit {r.returncode}\n{r.stderr}"
        assert "==" not in r.stderr, r.stderr  # no valgrind report at all
    lh.publish(view_with(VIEW, max_stale_seconds=1, confirmed_at=1))
    r = pamtester(lh, "stepssh-probe", "bob", "acct_mgmt", prefix=vg)
    assert r.returncode == 1 and "==" not in r.stderr, r.stderr
    h.run("rm -f /var/lib/step-ssh/cache", check=True)
    r = pamtester(lh, "stepssh-probe", "bob", "acct_mgmt", prefix=vg)
    assert r.returncode == 1 and "==" not in r.stderr, r.stderr
    # the principals helper too, as sshd runs it (nobody), on a bastion cache
    lh.publish(view_with(VIEW, bastion=True))
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    for args in (["alice", "70001"], ["jack", "70006"], ["bob"], ["dave"], ["mallory", "5"]):
        r = h.run(nobody + vg + [PRINCIPALS, *args])
        assert r.returncode == 0 and "==" not in r.stderr, f"{args}: {r.stderr}"


# -- principals helper ----------------------------------------------------------------

def principals(lh, *args: str, uid: int = 65534):
    return lh.host.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", PRINCIPALS, *args])


def test_principals_for_each_kind_of_account(lh):
    p = lambda *a: principals(lh, *a).stdout  # noqa: E731
    assert p("alice", "70001") == "alice\nalice@example.com\n"
    assert p("alice") == "alice\nalice@example.com\n"  # without %U: checked through NSS
    assert p("bob", "70002") == "bob\n"
    assert p("alice", "70002") == ""   # uid sshd resolved is not the cache's
    assert p("erin", "70005") == ""    # access none
    assert p("jack", "70006") == ""    # jump, not a bastion
    assert p("dave", "70004") == ""    # local account wins
    assert p("dave") == ""
    assert p("root", "0") == ""
    assert p("mallory") == ""
    lh.publish(view_with(VIEW, bastion=True))
    assert p("jack", "70006") == (
        "restrict,port-forwarding,permitlisten=\"no-remote-forwarding.invalid:1\","
        "command=\"echo 'step-ssh: this account may only jump through this host (ssh -J)' >&2; exit 1\" jack\n")
    assert p("bob", "70002") == "bob\n"  # a grant on the bastion itself: unrestricted


def test_principals_stale_or_broken_cache_prints_nothing(lh):
    lh.publish(view_with(VIEW, max_stale_seconds=60, confirmed_at=int(time.time()) - 120))
    r = principals(lh, "bob", "70002")
    assert r.returncode == 0 and r.stdout == ""
    assert lh.has_logged("cache is stale: no principals for bob")
    lh.host.run("rm -f /var/lib/step-ssh/cache", check=True)
    r = principals(lh, "bob", "70002")
    assert r.returncode == 0 and r.stdout == ""


def test_principals_usage_errors(lh):
    assert principals(lh).returncode == 2
    assert principals(lh, "bob", "notanumber").returncode == 2
    assert principals(lh, "bob", "1", "extra").returncode == 2
    assert principals(lh, "-h").returncode == 2


def test_hostconfig_is_idempotent_and_reversible():
    original = "#%PAM-1.0\n@include common-auth\naccount required pam_nologin.so\n" \
               "@include common-account\n@include common-session\n"
    once = hostconfig.pam_service_config(original)
    assert hostconfig.pam_service_config(once) == once
    assert hostconfig.strip_pam_config(once) == original
    lines = once.splitlines()
    acct = lines.index("account [success=done ignore=ignore default=die] pam_stepssh.so")
    assert lines.index("account required pam_nologin.so") < acct < lines.index("@include common-account")
    assert lines.index("session required pam_stepssh.so") < lines.index("@include common-session")
    fedora = "auth include system-auth\naccount required pam_nologin.so\naccount include password-auth\n"
    out = hostconfig.pam_service_config(fedora, session=False)
    assert out.index("pam_stepssh.so") < out.index("account include password-auth")
    with pytest.raises(ValueError):
        hostconfig.pam_service_config(original, account_args=["bad arg"])
    text = hostconfig.sudoers_dropin("ops-sudo")
    assert "%ops-sudo ALL=(ALL:ALL) NOPASSWD: ALL" in text
    hostconfig.check_sudoers_text(text)
    with pytest.raises(hostconfig.SudoersInvalid):
        hostconfig.check_sudoers_text("%ops ALL=(ALL NOPASSWD ALL\n")
    with pytest.raises(ValueError):
        hostconfig.sudoers_dropin("Bad Group")
    d = hostconfig.sshd_dropin("/usr/sbin/step-ssh-principals", "/etc/ssh/ca.pub")
    assert "AuthorizedPrincipalsCommand /usr/sbin/step-ssh-principals %u %U\n" in d
    assert "AuthorizedPrincipalsCommandUser nobody\n" in d


def test_paths_lists_the_login_artifacts():
    r = subprocess.run([sys.executable, "-m", "step_ssh.cli", "paths", "--json"], capture_output=True,
                       text=True, check=True)
    info = json.loads(r.stdout)
    assert info["pam_module"].endswith("/pam_stepssh.so")
    assert info["principals_command"].endswith("/step-ssh-principals")
    assert info["audit_spool"] == EVENTS
    assert os.access(info["principals_command"], os.X_OK)
    # only the PAM entry points leave the module
    syms = subprocess.run(["nm", "-D", "--defined-only", info["pam_module"]], capture_output=True,
                          text=True, check=True).stdout.split()
    exported = sorted(s for s in syms if s.startswith(("pam_", "sc_", "ss_")))
    assert exported == ["pam_sm_acct_mgmt", "pam_sm_authenticate", "pam_sm_chauthtok",
                        "pam_sm_close_session", "pam_sm_open_session", "pam_sm_setcred"]


SESSION_WITH_AUTH_INFO = r"""
import json, sys, pam
user, infos = sys.argv[1], json.loads(sys.argv[2])
out = []
for info in infos:
    p = pam.pam()
    p.authenticate(user, "", service="stepssh-probe", call_end=False)
    if info is not None:
        p.putenv("SSH_AUTH_INFO_0=" + info)
    out.append(p.open_session())
    p.end()
print(json.dumps(out))
"""


def test_jump_sessions_must_come_from_a_fleet_certificate(lh, keys):
    """What sshd puts in SSH_AUTH_INFO_0, good and hostile, fed through python-pam."""
    lh.publish(view_with(VIEW, bastion=True))
    fleet = keys.cert("jack", ["jack"]).read_text().split()
    other_principal = keys.cert("jack", ["bob"], tag="-bob").read_text().split()
    rogue = Keys()
    try:
        rogue_cert = rogue.cert("jack", ["jack"]).read_text().split()
    finally:
        rogue.close()
    plain = keys.pub("jack").split()
    blob = base64.b64decode(fleet[1])
    truncated = base64.b64encode(blob[:-10]).decode()
    infos = {
        "fleet certificate": f"publickey {fleet[0]} {fleet[1]}",
        "missing": None,
        "empty": "",
        "plain key": f"publickey {plain[0]} {plain[1]}",
        "rogue CA": f"publickey {rogue_cert[0]} {rogue_cert[1]}",
        "other principal": f"publickey {other_principal[0]} {other_principal[1]}",
        "password": "password",
        "cert then password": f"publickey {fleet[0]} {fleet[1]}\npassword",
        "truncated": f"publickey {fleet[0]} {truncated}",
        "garbage": "publickey ssh-ed25519-cert-v01@openssh.com !!!notbase64",
        "huge": "publickey x " + "A" * 100000,
    }
    r = lh.host.run([sys.executable, "-c", SESSION_WITH_AUTH_INFO, "jack", json.dumps(list(infos.values()))])
    assert r.returncode == 0, r.stderr
    got = dict(zip(infos, json.loads(r.stdout)))
    PAM_SESSION_ERR = 14
    assert got == {k: (0 if k == "fleet certificate" else PAM_SESSION_ERR) for k in infos}
    log = lh.syslog("refused session of jack", "malformed certificate in SSH_AUTH_INFO_0")
    assert "refused session of jack: jump-only login not made with a fleet certificate: " \
           "certificate names none of the user's principals" in log
    assert "malformed certificate in SSH_AUTH_INFO_0" in log
    # users with ssh access are not subject to this
    r = lh.host.run([sys.executable, "-c", SESSION_WITH_AUTH_INFO, "bob", json.dumps([None, "password"])])
    assert json.loads(r.stdout) == [0, 0]
