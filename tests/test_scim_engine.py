"""SCIM writes tell the view engine exactly what they touched: after every
step of a long random sequence of SCIM requests (mixed with admin changes),
the views a long-lived engine returns equal a fresh engine's."""
from __future__ import annotations

import datetime as dt
import random

import pytest
from scim2_models import Context, PatchOp, SCIMException

from step_ssh import pki
from step_ssh.server.config import ServerConfig
from step_ssh.server.scim import schema as S
from step_ssh.server.scim.directory import Directory
from step_ssh.server.store import Store, StoreError
from step_ssh.server.views import ViewEngine


def _user(payload):
    return S.UserModel.model_validate({"schemas": [S.USER_URN], **payload},
                                      scim_ctx=Context.RESOURCE_CREATION_REQUEST, scim_policy=S.POLICY)


def _group(payload):
    return S.GroupModel.model_validate({"schemas": [S.GROUP_URN], **payload},
                                       scim_ctx=Context.RESOURCE_CREATION_REQUEST, scim_policy=S.POLICY)


def _patch(model, *ops):
    return PatchOp[model].model_validate({"schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
                                          "Operations": list(ops)},
                                         scim_ctx=Context.RESOURCE_PATCH_REQUEST, scim_policy=S.POLICY)


@pytest.mark.parametrize("seed", [1, 2])
def test_engine_matches_a_fresh_computation_under_scim(tmp_path, seed):
    rng = random.Random(seed)
    store = Store(tmp_path / "db", ServerConfig())
    d = Directory(store)
    ca, ca_key = pki.create_ca()
    hosts = []
    for i, tags in enumerate([{"env": "prod"}, {"env": "dev"}, {"env": "prod", "role": "db"}]):
        tok, _ = store.create_token(f"h{i}", tags, 600)
        hosts.append(store.enroll(tok, pki.make_csr(pki.new_private_key(), "h"), "t", ca, ca_key,
                                  dt.timedelta(hours=1))["host_id"])
    engine = ViewEngine(store)
    users: list[str] = []    # SCIM ids
    groups: list[dict] = []  # SCIM group docs

    def op():
        kind = rng.randrange(12)
        if kind == 0 or not users:
            ext = {}
            if groups and rng.random() < .3:
                ext["gidNumber"] = rng.choice(groups)[S.GROUP_EXT_URN]["gidNumber"]
            users.append(d.create_user(_user({"userName": f"u{rng.randrange(60)}@x.example",
                                              "active": rng.random() < .8, S.USER_EXT_URN: ext}), "t")["id"])
        elif kind == 1:
            sid = users.pop(rng.randrange(len(users)))
            d.delete_user(sid, "t")
        elif kind == 2 or not groups:
            members = [{"value": u} for u in rng.sample(users, min(len(users), rng.randint(0, 4)))]
            groups.append(d.create_group(_group({"displayName": f"G {rng.randrange(15)}", "members": members}), "t"))
            if rng.random() < .7:
                store.add_grant(groups[-1][S.GROUP_EXT_URN]["groupName"], rng.choice([{"env": "prod"},
                                                                                      {"env": "dev"}, {"role": "db"}]),
                                rng.choice(["ssh", "sudo"]))
        elif kind == 3:
            g = groups.pop(rng.randrange(len(groups)))
            d.delete_group(g["id"], "t")
        elif kind in (4, 5):
            g = rng.choice(groups)
            d.patch_group(g["id"], _patch(S.GroupModel, {"op": "add", "path": "members",
                                                          "value": [{"value": rng.choice(users)}]}), "t")
        elif kind == 6:
            g = rng.choice(groups)
            u = rng.choice(users)
            form = rng.choice([{"op": "remove", "path": f'members[value eq "{u}"]'},
                               {"op": "remove", "path": "members", "value": [{"value": u}]}])
            d.patch_group(g["id"], _patch(S.GroupModel, form), "t")
        elif kind == 7:
            g = rng.choice(groups)
            members = [{"value": u} for u in rng.sample(users, min(len(users), rng.randint(0, 4)))]
            d.patch_group(g["id"], _patch(S.GroupModel, {"op": "replace", "path": "members", "value": members}), "t")
        elif kind == 8:
            d.patch_user(rng.choice(users), _patch(S.UserModel, {"op": "replace", "path": "active",
                                                                  "value": rng.choice(["True", "False"])}), "t")
        elif kind == 9:
            sid = rng.choice(users)
            d.patch_user(sid, _patch(S.UserModel, {"op": "replace", "path": f"{S.USER_EXT_URN}:sshPrincipals",
                                                   "value": [f"p{rng.randrange(3)}"]},
                                     {"op": "replace", "path": f"{S.USER_EXT_URN}:loginShell",
                                      "value": rng.choice(["/bin/sh", "/bin/bash"])}), "t")
        elif kind == 10 and groups:
            sid = rng.choice(users)
            gid = rng.choice(groups)[S.GROUP_EXT_URN]["gidNumber"]
            d.patch_user(sid, _patch(S.UserModel, {"op": "replace", "path": f"{S.USER_EXT_URN}:gidNumber",
                                                   "value": gid}), "t")
        else:
            store.tag_host(rng.choice(hosts), {"role": rng.choice(["db", "web"])})

    ok, seen_users = 0, 0
    for step in range(120):
        try:
            op()
            ok += 1
        except (StoreError, SCIMException):
            pass
        for h in hosts:
            _, _, cv = engine.host_view(h)
            _, _, expect = ViewEngine(store).host_view(h)
            assert cv.blob == expect.blob, f"seed {seed} step {step}: stale view for {h}"
            seen_users += len(cv.user_bytes)
    assert engine.carried > 0 and ok > 80 and seen_users > 200
    store.close()
