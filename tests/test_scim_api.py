"""The SCIM endpoint driven over HTTPS the way Okta and Entra ID drive it: a
real `step-ssh-server run`, bearer tokens from step-ssh-ctl, and what the
control plane then gives hosts (GetHostView, Watch)."""
from __future__ import annotations

import json
import time

from scim_fixtures import (EXT, GEXT, GROUP, LIST, PATCH, USER, module_scim_server, scim_error,  # noqa: F401
                           scim_server)
from server_fixtures import next_change
from step_ssh.proto import stepssh_pb2 as pb


def users_of(s) -> dict:
    return {u.name: u for u in s.admin.ListUsers(pb.Empty(), timeout=10).users}


def groups_of(s) -> dict:
    return {g.name: g for g in s.admin.ListGroups(pb.Empty(), timeout=10).groups}


def view_users(s, host: str) -> dict:
    return {u.name: u for u in s.admin.GetHostView(pb.NameRef(name=host), timeout=10).users}


# ---- discovery and authentication -----------------------------------------------------------

def test_discovery(module_scim_server):
    h = module_scim_server.http
    spc = h.get("/ServiceProviderConfig")
    assert spc.status_code == 200 and spc.headers["content-type"].startswith("application/scim+json")
    spc = spc.json()
    assert spc["patch"]["supported"] is True and spc["filter"] == {"supported": True, "maxResults": 1000}
    assert spc["bulk"]["supported"] is False and spc["authenticationSchemes"][0]["type"] == "oauthbearertoken"
    rts = {r["id"]: r for r in h.get("/ResourceTypes").json()["Resources"]}
    assert rts["User"]["endpoint"] == "/Users" and rts["Group"]["endpoint"] == "/Groups"
    assert EXT in [e["schema"] for e in rts["User"]["schemaExtensions"]]
    assert [e["schema"] for e in rts["Group"]["schemaExtensions"]] == [GEXT]
    assert h.get("/ResourceTypes/User").json()["schema"] == USER
    schemas = {x["id"]: x for x in h.get("/Schemas").json()["Resources"]}
    assert {USER, GROUP, EXT, GEXT} <= set(schemas)
    ext = {a["name"]: a for a in h.get(f"/Schemas/{EXT}").json()["attributes"]}
    assert ext["uidNumber"]["type"] == "integer" and ext["uidNumber"]["mutability"] == "immutable"
    assert ext["sshPrincipals"]["multiValued"] is True and ext["loginName"]["mutability"] == "immutable"
    scim_error(h.get("/Schemas/urn:nope"), 404)
    scim_error(h.get("/Nothing"), 404)
    scim_error(h.post("/Bulk", json={}), 501)
    scim_error(h.delete("/Users"), 405)


def test_authentication(module_scim_server):
    s = module_scim_server
    before = s.db_dump()
    body = {"schemas": [USER], "userName": "mallory@evil.example"}
    anon = s.client()
    r = anon.post("/Users", json=body)
    assert "Bearer" in r.headers["www-authenticate"]
    assert "Authorization: Bearer" in scim_error(r, 401)
    assert "bearer" in scim_error(s.client(None, auth=("u", "p")).get("/Users"), 401)
    assert "unknown token" in scim_error(s.client("ssc_" + "A" * 43).post("/Users", json=body), 401)
    assert "not a step-ssh SCIM token" in scim_error(s.client("hunter2").get("/Users"), 401)
    assert s.db_dump() == before

    # created, listed, used, revoked with step-ssh-ctl
    out = s.ctl("scim", "token", "create", "--name", "okta", "--json")
    assert out.exit_code == 0, out.output
    tok = json.loads(out.stdout)
    assert tok["token"].startswith("ssc_") and tok["name"] == "okta" and tok["revoked_at"] == 0
    c = s.client(tok["token"])
    assert c.get("/Users").status_code == 200
    listed = {t["id"]: t for t in json.loads(s.ctl("scim", "token", "list", "--json").stdout)}
    assert "token" not in listed[tok["id"]] and listed[tok["id"]]["last_used_at"] > 0
    text = s.ctl("scim", "token", "list").stdout
    assert tok["id"] in text and "okta" in text and "valid" in text
    # only the hash is stored
    assert tok["token"] not in s.db_dump()
    out = s.ctl("scim", "token", "revoke", tok["id"])
    assert out.exit_code == 0 and f"revoked SCIM token {tok['id']}" in out.stdout
    before = s.db_dump()
    assert "was revoked" in scim_error(c.post("/Users", json=body), 401)
    assert s.db_dump() == before
    assert "revoked" in s.ctl("scim", "token", "list").stdout
    out = s.ctl("scim", "token", "revoke", "stnope")
    assert out.exit_code == 3 and "no SCIM token" in out.stderr
    out = s.ctl("scim", "token", "create")  # plain output: the token alone on stdout
    assert out.exit_code == 0 and out.stdout.strip().startswith("ssc_") and len(out.stdout.split()) == 1


# ---- users -----------------------------------------------------------------------------------

def test_user_lifecycle_as_okta_does_it(module_scim_server):
    s = module_scim_server
    h = s.http
    # Okta: look the user up first, then create
    r = h.get("/Users", params={"filter": 'userName eq "Ada.Lovelace@corp.example"', "startIndex": 1, "count": 100})
    assert r.json() == {"schemas": [LIST], "totalResults": 0, "startIndex": 1, "itemsPerPage": 0, "Resources": []}
    body = {"schemas": [USER], "userName": "Ada.Lovelace@corp.example", "externalId": "00uada",
            "name": {"givenName": "Ada", "familyName": "Lovelace"}, "active": True,
            "emails": [{"primary": True, "value": "ada@corp.example", "type": "work"}],
            "groups": [], "password": "ignored-Secret1", "locale": "en-GB"}
    r = h.post("/Users", json=body)
    assert r.status_code == 201, r.text
    u = r.json()
    assert r.headers["location"] == u["meta"]["location"] == f"{s.base_url}/Users/{u['id']}"
    assert u["userName"] == "Ada.Lovelace@corp.example" and u["externalId"] == "00uada" and u["active"] is True
    assert u["name"] == {"givenName": "Ada", "familyName": "Lovelace"} and "password" not in u
    ext = u[EXT]
    assert ext["loginName"] == "ada_lovelace" and ext["uidNumber"] >= 70000 and ext["loginShell"] == "/bin/bash"
    assert ext["homeDirectory"] == "/home/ada_lovelace" and ext["sshPrincipals"] == ["ada_lovelace"]
    assert u["meta"]["resourceType"] == "User" and u["meta"]["created"].endswith("Z")
    acct = users_of(s)["ada_lovelace"]
    assert (acct.uid, acct.gecos, acct.email, acct.active) == (ext["uidNumber"], "Ada Lovelace", "ada@corp.example",
                                                               True)
    assert h.get(f"/Users/{u['id']}").json() == u
    r = h.get("/Users", params={"filter": 'userName eq "ada.lovelace@CORP.example"'})
    assert r.json()["totalResults"] == 1 and r.json()["Resources"][0]["id"] == u["id"]
    assert "already taken" in scim_error(h.post("/Users", json={**body, "externalId": "x"}), 409, "uniqueness")

    # Okta profile push: PUT the whole resource
    put = {**{k: v for k, v in u.items() if k != "meta"}, "title": "Analyst", "displayName": "Countess Lovelace",
           EXT: {"loginShell": "/bin/zsh", "sshPrincipals": ["ada", "ada@corp.example"]}}
    r = h.put(f"/Users/{u['id']}", json=put)
    assert r.status_code == 200, r.text
    u2 = r.json()
    assert u2["title"] == "Analyst" and u2[EXT]["uidNumber"] == ext["uidNumber"]  # immutable kept when left out
    assert u2[EXT]["loginShell"] == "/bin/zsh" and u2[EXT]["sshPrincipals"] == ["ada", "ada@corp.example"]
    acct = users_of(s)["ada_lovelace"]
    assert (acct.shell, acct.gecos, list(acct.principals)) == ("/bin/zsh", "Countess Lovelace",
                                                               ["ada", "ada@corp.example"])
    before = s.db_dump()
    r = h.put(f"/Users/{u['id']}", json={**put, EXT: {"uidNumber": ext["uidNumber"] + 1}})
    assert "immutable" in scim_error(r, 400, "mutability")
    r = h.put(f"/Users/{u['id']}", json={**put, EXT: {"loginName": "ada2"}})
    scim_error(r, 400, "mutability")
    assert s.db_dump() == before
    # the same PUT again changes nothing, not even the revision
    rev = s.revision()
    assert h.put(f"/Users/{u['id']}", json=put).status_code == 200 and s.revision() == rev

    # deactivation (Okta: PATCH replace without path), then reactivation
    r = s.patch("Users", u["id"], {"op": "replace", "value": {"active": False}})
    assert r.status_code == 200 and r.json()["active"] is False
    assert users_of(s)["ada_lovelace"].active is False
    r = s.patch("Users", u["id"], {"op": "replace", "value": {"active": True}})
    assert r.json()["active"] is True

    # userName renamed in the IdP: the account keeps its name and uid
    r = s.patch("Users", u["id"], {"op": "replace", "path": "userName", "value": "ada.king@corp.example"})
    assert r.status_code == 200 and r.json()["userName"] == "ada.king@corp.example"
    assert r.json()[EXT]["loginName"] == "ada_lovelace"

    # DELETE: gone from SCIM and from the directory; the uid is never given to anyone else
    assert h.delete(f"/Users/{u['id']}").status_code == 204
    scim_error(h.get(f"/Users/{u['id']}"), 404)
    scim_error(h.delete(f"/Users/{u['id']}"), 404)
    assert "ada_lovelace" not in users_of(s)
    again = s.create_user("ada.lovelace@corp.example")
    assert again[EXT]["loginName"] == "ada_lovelace" and again[EXT]["uidNumber"] == ext["uidNumber"]  # sticky
    h.delete(f"/Users/{again['id']}")


def test_entra_user_patches(module_scim_server):
    s = module_scim_server
    h = s.http
    u = s.create_user("grace@corp.example", externalId="e-grace",
                      **{EXT: {"uidNumber": 88001, "loginName": "ghopper", "homeDirectory": "/srv/home/gh"}})
    assert u[EXT]["loginName"] == "ghopper" and u[EXT]["uidNumber"] == 88001
    r = s.patch("Users", u["id"],
                {"op": "Add", "path": "emails[type eq \"work\"].value", "value": "grace@corp.example"},
                {"op": "Replace", "path": "name.givenName", "value": "Grace"},
                {"op": "Replace", "path": "name.familyName", "value": "Hopper"},
                {"op": "Add", "path": "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:department",
                 "value": "Navy"},
                {"op": "Replace", "path": f"{EXT}:loginShell", "value": "/bin/sh"},
                {"op": "Add", "path": "urn:ietf:params:scim:schemas:extension:EntraSomething:1.0:User:foo",
                 "value": "dropped"},
                {"op": "Add", "path": "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:manager",
                 "value": "00000000-0000-0000-0000-00000000beef"})
    assert r.status_code == 200, r.text
    g = r.json()
    assert g["emails"] == [{"value": "grace@corp.example", "type": "work"}]
    assert g["name"] == {"givenName": "Grace", "familyName": "Hopper"}
    assert g["urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"] == {
        "department": "Navy", "manager": {"value": "00000000-0000-0000-0000-00000000beef"}}
    acct = users_of(s)["ghopper"]
    assert (acct.email, acct.gecos, acct.shell, acct.home) == ("grace@corp.example", "Grace Hopper", "/bin/sh",
                                                               "/srv/home/gh")
    # Entra deactivates with a string boolean and a capitalised op
    r = s.patch("Users", u["id"], {"op": "Replace", "path": "active", "value": "False"})
    assert r.status_code == 200 and r.json()["active"] is False and users_of(s)["ghopper"].active is False
    r = s.patch("Users", u["id"], {"op": "replace", "path": "active", "value": "True"})
    assert r.json()["active"] is True
    # a no-op PATCH: 200, no new revision
    rev = s.revision()
    assert s.patch("Users", u["id"], {"op": "replace", "path": "active", "value": True}).status_code == 200
    assert s.revision() == rev
    h.delete(f"/Users/{u['id']}")


# ---- groups ----------------------------------------------------------------------------------

def test_group_membership_in_every_form(module_scim_server):
    s = module_scim_server
    h = s.http
    a = s.create_user("m.one@corp.example")
    b = s.create_user("m.two@corp.example")
    c = s.create_user("m.three@corp.example")
    g = s.create_group("Platform Team", members=(a["id"],), externalId="okta-g1")
    assert g[GEXT]["groupName"] == "platform_team" and [m["value"] for m in g["members"]] == [a["id"]]
    assert g["members"][0] == {"value": a["id"], "display": "m.one@corp.example", "type": "User"}
    name = "platform_team"
    # a member added outside SCIM is left alone by SCIM
    s.admin.CreateUser(pb.DirectoryUser(name="opsbot"), timeout=10)
    s.admin.AddMember(pb.MemberRequest(group=name, user="opsbot"), timeout=10)

    def members():
        return set(groups_of(s)[name].members)

    # Okta: add with display
    r = s.patch("Groups", g["id"], {"op": "add", "path": "members",
                                    "value": [{"value": b["id"], "display": "m.two@corp.example"}]})
    assert r.status_code == 204, r.text
    assert members() == {"m_one", "m_two", "opsbot"}
    # Entra: "Add", several at once, one already there
    assert s.patch("Groups", g["id"], {"op": "Add", "path": "members",
                                       "value": [{"value": b["id"]}, {"value": c["id"]}]}).status_code == 204
    assert members() == {"m_one", "m_two", "m_three", "opsbot"}
    # Okta: remove by value path
    assert s.patch("Groups", g["id"], {"op": "remove", "path": f'members[value eq "{a["id"]}"]'}).status_code == 204
    assert members() == {"m_two", "m_three", "opsbot"}
    # Entra: remove naming the members in the value
    assert s.patch("Groups", g["id"], {"op": "Remove", "path": "members",
                                       "value": [{"value": b["id"]}]}).status_code == 204
    assert members() == {"m_three", "opsbot"}
    # removing someone who is not a member changes nothing
    rev = s.revision()
    assert s.patch("Groups", g["id"], {"op": "remove", "path": f'members[value eq "{a["id"]}"]'}).status_code == 204
    assert s.revision() == rev
    # replace the whole list
    assert s.patch("Groups", g["id"], {"op": "replace", "path": "members",
                                       "value": [{"value": a["id"]}, {"value": b["id"]}]}).status_code == 204
    assert members() == {"m_one", "m_two", "opsbot"}
    # Okta rename: replace without a path, with the id in the value; the POSIX name stays
    assert s.patch("Groups", g["id"], {"op": "replace", "value": {"id": g["id"], "displayName": "Platform"}}
                   ).status_code == 204
    got = h.get(f"/Groups/{g['id']}").json()
    assert got["displayName"] == "Platform" and got[GEXT]["groupName"] == name
    assert {m["value"] for m in got["members"]} == {a["id"], b["id"]}  # opsbot is no SCIM user: not listed
    # path-less add of members (with a rename in the same operation)
    assert s.patch("Groups", g["id"], {"op": "add", "value": {"members": [{"value": c["id"]}],
                                                              "displayName": "Platform Eng"}}).status_code == 204
    assert members() == {"m_one", "m_two", "m_three", "opsbot"}
    # remove all members (SCIM's; opsbot stays)
    assert s.patch("Groups", g["id"], {"op": "remove", "path": "members"}).status_code == 204
    assert members() == {"opsbot"}
    # PUT with the full membership (older Okta group push)
    r = h.put(f"/Groups/{g['id']}", json={"schemas": [GROUP], "displayName": "Platform Eng",
                                          "members": [{"value": c["id"]}]})
    assert r.status_code == 200 and [m["value"] for m in r.json()["members"]] == [c["id"]]
    assert members() == {"m_three", "opsbot"}
    # the user's groups attribute
    assert h.get(f"/Users/{c['id']}").json()["groups"] == [{"value": g["id"], "display": "Platform Eng",
                                                           "type": "direct"}]
    # filters and attribute selection
    r = h.get("/Groups", params={"filter": f'members[value eq "{c["id"]}"]', "excludedAttributes": "members"})
    assert [x["id"] for x in r.json()["Resources"]] == [g["id"]] and "members" not in r.json()["Resources"][0]
    r = h.get("/Groups", params={"filter": 'displayName eq "platform eng"', "attributes": "displayName"})
    assert r.json()["Resources"] == [{"schemas": [GROUP, GEXT], "id": g["id"], "displayName": "Platform Eng"}]
    # PATCH answering with the resource when asked
    r = h.patch(f"/Groups/{g['id']}", params={"excludedAttributes": "members"},
                json={"schemas": [PATCH], "Operations": [{"op": "add", "path": "externalId", "value": "okta-g2"}]})
    assert r.status_code == 200 and r.json()["externalId"] == "okta-g2" and "members" not in r.json()
    # DELETE: the group and its grants go, the users stay
    s.admin.AddGrant(pb.Grant(group=name, tags={"env": "x"}, access=pb.ACCESS_SSH), timeout=10)
    assert h.delete(f"/Groups/{g['id']}").status_code == 204
    assert name not in groups_of(s) and not [x for x in s.admin.ListGrants(pb.Empty()).grants if x.group == name]
    assert {"m_one", "m_two", "m_three"} <= set(users_of(s))
    for x in (a, b, c):
        h.delete(f"/Users/{x['id']}")


def test_group_gid_from_extension_and_as_primary_group(module_scim_server):
    s = module_scim_server
    h = s.http
    g = s.create_group("Research", **{GEXT: {"gidNumber": 91000, "groupName": "research"}})
    assert g[GEXT] == {"groupName": "research", "gidNumber": 91000}
    u = s.create_user("curie@corp.example", **{EXT: {"gidNumber": 91000, "uidNumber": 91001}})
    assert u[EXT]["gidNumber"] == 91000 and users_of(s)["curie"].gid == 91000
    # the group is someone's primary group: DELETE is refused, with a reason
    assert "primary group" in scim_error(h.delete(f"/Groups/{g['id']}"), 409)
    r = s.patch("Groups", g["id"], {"op": "replace", "path": f"{GEXT}:gidNumber", "value": 91002})
    scim_error(r, 400, "mutability")
    h.delete(f"/Users/{u['id']}")
    assert h.delete(f"/Groups/{g['id']}").status_code == 204


# ---- what hosts get ----------------------------------------------------------------------

def test_changes_reach_hosts_by_push_within_a_second(scim_server):
    s = scim_server
    host = s.enroll("web1", {"env": "prod"})
    u = s.create_user("linus@corp.example")
    g = s.create_group("Prod SSH")
    s.admin.AddGrant(pb.Grant(group="prod_ssh", tags={"env": "prod"}, access=pb.ACCESS_SSH), timeout=10)
    call = host.watch(0)
    try:
        first = next_change(call)
        assert first.WhichOneof("event") == "snapshot" and not first.snapshot.view.users

        def pushed(*ops, kind="Groups", rid=None):
            t0 = time.monotonic()
            r = s.patch(kind, rid or g["id"], *ops)
            assert r.status_code in (200, 204), r.text
            ev = next_change(call, timeout=5)  # pushed, not polled (latency: benchmarks/scim_bench.py)
            print(f"pushed in {time.monotonic() - t0:.2f}s")
            return ev.delta

        d = pushed({"op": "add", "path": "members", "value": [{"value": u["id"]}]})
        assert [x.name for x in d.upsert_users] == ["linus"] and d.upsert_users[0].access == pb.ACCESS_SSH
        assert "linus" in view_users(s, "web1")
        d = pushed({"op": "replace", "path": "active", "value": "False"}, kind="Users", rid=u["id"])
        assert list(d.remove_users) == ["linus"] and d.shrink_intended
        assert "linus" not in view_users(s, "web1")
        d = pushed({"op": "replace", "path": "active", "value": True}, kind="Users", rid=u["id"])
        assert [x.name for x in d.upsert_users] == ["linus"]
        d = pushed({"op": "replace", "path": f"{EXT}:sshPrincipals", "value": ["linus", "lt@corp.example"]},
                   kind="Users", rid=u["id"])
        assert list(d.upsert_users[0].principals) == ["linus", "lt@corp.example"]
        d = pushed({"op": "remove", "path": f'members[value eq "{u["id"]}"]'})
        assert list(d.remove_users) == ["linus"] and d.shrink_intended
    finally:
        call.cancel()
    changes = [r for r in s.wait_log(lambda r: r.get("msg") == "scim") if r.get("msg") == "scim"]
    assert changes and all(c["token"].startswith("st") for c in changes)
