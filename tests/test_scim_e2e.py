"""From the IdP to sshd: a group membership added over SCIM lets the user log
in to a tagged host; removed (or the user deactivated), the next login is
denied.

Everything is real: `step-ssh-server run` with SCIM on loopback, the host
enrolled with `step-ssh enroll` and running `step-ssh agent` inside a test
host (private mount namespace) where OpenSSH's sshd, PAM and NSS use the
cache the agent publishes, and a user certificate signed by the control
plane's own SSH user CA, which the agent installs as TrustedUserCAKeys.
"""
from __future__ import annotations

import time

import pytest
import yaml

from agent_helpers import AgentProc, enroll_in_host
from login_fixtures import Keys, LoginHost, unavailable
from scim_fixtures import scim_server  # noqa: F401  (pytest fixture)
from step_ssh.proto import stepssh_pb2 as pb

pytestmark = pytest.mark.testhost

EMPTY_VIEW = {"revision": 1, "users": [], "groups": []}


def wait_for(fn, timeout: float = 15.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if fn():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_scim_membership_opens_and_closes_ssh(scim_server, tmp_path):
    why = unavailable()
    if why:
        pytest.fail(f"cannot run login tests: {why}")
    s = scim_server
    keys = Keys()
    lh = LoginHost(keys, view=EMPTY_VIEW, local_dave=False)
    agent = None
    try:
        lh.start()
        lh.start_sshd()
        enroll_in_host(lh.host, s, "app1", {"env": "prod"})
        agent = AgentProc(tmp_path, yaml.safe_load(lh.host.read("/etc/step-ssh/agent.yaml")), host=lh.host).start()
        agent.wait(lambda st: st["connected"] and st["ready"], what="agent connected")

        # the IdP provisions a user and a group; an admin grants the group ssh on env=prod
        u = s.create_user("dana.scully@corp.example", name={"givenName": "Dana", "familyName": "Scully"})
        login = u["urn:ietf:params:scim:schemas:extension:stepssh:2.0:User"]["loginName"]
        assert login == "dana_scully"
        g = s.create_group("Prod Engineers")
        s.admin.AddGrant(pb.Grant(group="prod_engineers", tags={"env": "prod"}, access=pb.ACCESS_SSH), timeout=10)

        # her certificate, from the control plane's SSH user CA (principals: her account)
        cert = tmp_path / "dana-cert.pub"
        signed = s.admin.SignUserKey(pb.SignRequest(user=login, public_key=keys.pub("dana"), ttl_seconds=3600),
                                     timeout=10)
        cert.write_text(signed.certificate)
        agent.wait_revision(s.revision())
        wait_for(lambda: (s.dir / "ssh_user_ca.pub").read_text().split()[1]
                 in lh.host.read("/var/lib/step-ssh/trusted-user-ca-keys"), what="user CA on the host")

        def login_result():
            return lh.ssh(login, "id -un; pwd", "dana", cert)

        r = login_result()
        assert r.returncode == 255, f"not a member yet, but got in: {r.stdout}{r.stderr}"

        # membership added by SCIM (Okta's form) -> she gets in
        assert s.patch("Groups", g["id"], {"op": "add", "path": "members", "value": [{"value": u["id"]}]}
                       ).status_code == 204
        agent.wait_revision(s.revision())
        r = login_result()
        assert r.returncode == 0, f"{r.stdout}{r.stderr}\n{lh.sshd_output()[-2000:]}"
        assert r.stdout.split() == [login, f"/home/{login}"]

        # membership removed by SCIM (Entra's form) -> the next login is denied
        assert s.patch("Groups", g["id"], {"op": "Remove", "path": "members", "value": [{"value": u["id"]}]}
                       ).status_code == 204
        agent.wait_revision(s.revision())
        r = login_result()
        assert r.returncode == 255 and "Permission denied" in r.stderr, r.stderr

        # back in, then deactivated in the IdP -> denied again
        assert s.patch("Groups", g["id"], {"op": "add", "path": "members", "value": [{"value": u["id"]}]}
                       ).status_code == 204
        agent.wait_revision(s.revision())
        assert login_result().returncode == 0
        assert s.patch("Users", u["id"], {"op": "Replace", "path": "active", "value": "False"}).status_code == 200
        agent.wait_revision(s.revision())
        r = login_result()
        assert r.returncode == 255 and "Permission denied" in r.stderr, r.stderr
    finally:
        if agent is not None:
            agent.stop()
        lh.close()
        keys.close()
