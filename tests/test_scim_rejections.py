"""Every refused SCIM request answers a SCIM Error with the right status and
scimType, says what is wrong, and leaves the database exactly as it was."""
from __future__ import annotations

import pytest

from scim_fixtures import EXT, GEXT, GROUP, PATCH, USER, module_scim_server, scim_error  # noqa: F401
from step_ssh.proto import stepssh_pb2 as pb


@pytest.fixture(scope="module")
def world(module_scim_server):
    s = module_scim_server
    u = s.create_user("taken@corp.example", **{EXT: {"uidNumber": 75000}})
    v = s.create_user("other@corp.example")
    g = s.create_group("Admins", members=(u["id"],))
    s.admin.CreateUser(pb.DirectoryUser(name="localonly"), timeout=10)
    return s, {"U": u["id"], "V": v["id"], "G": g["id"]}


def U(**kw):
    return {"schemas": [USER], "userName": "new@corp.example", **kw}


def P(*ops):
    return {"schemas": [PATCH], "Operations": list(ops)}


BIG = "x" * (4 * 1024 * 1024 + 10)

CASES = [
    # (method, path, body (dict, or str for raw), status, scimType, words in detail)
    ("POST", "/Users", "{not json", 400, "invalidSyntax", "not valid JSON"),
    ("POST", "/Users", "[1, 2]", 400, "invalidSyntax", "JSON object"),
    ("POST", "/Users", {"schemas": [USER]}, 400, None, "userName"),
    ("POST", "/Users", U(userName="  "), 400, "invalidValue", "userName"),
    ("POST", "/Users", U(active="maybe"), 400, "invalidValue", "active"),
    ("POST", "/Users", U(emails=[{"value": "not an email"}]), 400, "invalidValue", "emails"),
    ("POST", "/Users", U(userName="TAKEN@corp.example"), 409, "uniqueness", "already taken"),
    ("POST", "/Users", U(**{EXT: {"uidNumber": 75000}}), 409, "uniqueness", "uid 75000 is taken"),
    ("POST", "/Users", U(**{EXT: {"uidNumber": 500}}), 400, "invalidValue", "system range"),
    ("POST", "/Users", U(**{EXT: {"uidNumber": 65534}}), 400, "invalidValue", "reserved"),
    ("POST", "/Users", U(**{EXT: {"uidNumber": "many"}}), 400, "invalidValue", "uidNumber"),
    ("POST", "/Users", U(**{EXT: {"loginName": "Bad Name"}}), 400, "invalidValue", "not a valid account name"),
    ("POST", "/Users", U(**{EXT: {"loginName": "localonly"}}), 409, "uniqueness", "already a user's or group's"),
    ("POST", "/Users", U(**{EXT: {"loginShell": "bin/sh"}}), 400, "invalidValue", "absolute path"),
    ("POST", "/Users", U(**{EXT: {"sshPrincipals": ["has space"]}}), 400, "invalidValue", "principal"),
    ("POST", "/Users", U(**{EXT: {"gidNumber": 69999}}), 400, "invalidValue", "reserved"),
    ("POST", "/Users", BIG, 413, None, "over the limit"),
    ("GET", "/Users/nope", None, 404, None, "no user with id"),
    ("PUT", "/Users/nope", U(), 404, None, "no user"),
    ("PATCH", "/Users/nope", P({"op": "replace", "path": "active", "value": False}), 404, None, "no user"),
    ("DELETE", "/Users/nope", None, 404, None, "no user"),
    ("PUT", "/Users/{V}", U(userName="taken@corp.example"), 409, "uniqueness", "already taken"),
    ("PUT", "/Users/{U}", U(userName="taken@corp.example", **{EXT: {"uidNumber": 75001}}), 400, "mutability",
     "uidNumber is immutable"),
    ("PUT", "/Users/{U}", U(userName="taken@corp.example", **{EXT: {"gidNumber": 123456}}), 400, "invalidValue",
     "no group's gid"),
    ("PATCH", "/Users/{U}", P({"op": "frob", "path": "active", "value": False}), 400, "invalidValue",
     "not a PATCH operation"),
    ("PATCH", "/Users/{U}", P({"op": "remove"}), 400, "noTarget", "path"),
    ("PATCH", "/Users/{U}", P({"op": "remove", "path": "userName"}), 400, "mutability", "required"),
    ("PATCH", "/Users/{U}", P({"op": "replace", "path": "groups", "value": []}), 400, "mutability", "read-only"),
    ("PATCH", "/Users/{U}", P({"op": "replace", "path": "active", "value": "perhaps"}), 400, "invalidValue",
     "boolean"),
    ("PATCH", "/Users/{U}", P({"op": "replace", "path": "userName eq", "value": 1}), 400, "invalidPath", "syntax"),
    ("PATCH", "/Users/{U}", P({"op": "replace", "path": f"{EXT}:uidNumber", "value": 75009}), 400, "mutability",
     "immutable"),
    ("PATCH", "/Users/{U}", P({"op": "replace", "path": f"{EXT}:loginShell", "value": "sh"}), 400, "invalidValue",
     "absolute path"),
    ("PATCH", "/Users/{U}", P({"op": "replace", "path": "userName", "value": "OTHER@corp.example"}), 409,
     "uniqueness", "already taken"),
    ("PATCH", "/Users/{U}", {"schemas": [PATCH], "Operations": []}, 400, "invalidValue", "one or more"),
    ("PATCH", "/Users/{U}", {"schemas": [PATCH]}, 400, "invalidValue", "operations"),
    ("POST", "/Groups", {"schemas": [GROUP]}, 400, None, "displayName"),
    ("POST", "/Groups", {"schemas": [GROUP], "displayName": "admins"}, 409, "uniqueness", "exists"),
    ("POST", "/Groups", {"schemas": [GROUP], "displayName": "X", "members": [{"value": "ghost"}]}, 400,
     "invalidValue", "no such user"),
    ("POST", "/Groups", {"schemas": [GROUP], "displayName": "X", "members": [{"value": "{G}", "type": "Group"}]},
     400, "invalidValue", "nested groups"),
    ("POST", "/Groups", {"schemas": [GROUP], "displayName": "X", GEXT: {"groupName": "step-sudo"}}, 400,
     "invalidValue", "reserved"),
    ("POST", "/Groups", {"schemas": [GROUP], "displayName": "X", GEXT: {"gidNumber": 75000}}, 409, "uniqueness",
     "gid 75000 is taken"),
    ("PATCH", "/Groups/{G}", P({"op": "add", "path": "members", "value": [{"value": "ghost"}]}), 400,
     "invalidValue", "no such user"),
    ("PATCH", "/Groups/{G}", P({"op": "add", "path": "members", "value": [{"display": "no value"}]}), 400,
     "invalidValue", "needs a 'value'"),
    ("PATCH", "/Groups/{G}", P({"op": "add", "path": "members", "value": [{"value": "{V}"}]},
                               {"op": "add", "path": "members", "value": [{"value": "ghost"}]}), 400,
     "invalidValue", "no such user"),  # the first operation is rolled back too
    ("PATCH", "/Groups/{G}", P({"op": "replace", "path": f"{GEXT}:groupName", "value": "other"}), 400,
     "mutability", "immutable"),
    ("PATCH", "/Groups/{G}", P({"op": "replace", "path": "displayName", "value": None}), 400, "mutability",
     "required"),
    ("PUT", "/Groups/{G}", {"schemas": [GROUP], "displayName": "Admins", GEXT: {"gidNumber": 1}}, 400,
     "mutability", "immutable"),
    ("DELETE", "/Groups/nope", None, 404, None, "no group"),
    ("GET", "/Users?filter=bogus%20eq%20%22x%22", None, 400, "invalidFilter", "bogus"),
    ("GET", "/Users?filter=userName%20eq", None, 400, "invalidFilter", "syntax"),
    ("GET", "/Users?filter=active%20eq%20%22maybe%22", None, 400, "invalidFilter", "active"),
    ("GET", "/Users?startIndex=abc", None, 400, "invalidValue", "startIndex"),
    ("GET", "/Groups?filter=members.display%20xx%20%22a%22", None, 400, "invalidFilter", None),
    ("GET", "/Users?attributes=userName&excludedAttributes=emails", None, 400, "invalidValue", "not both"),
]


@pytest.mark.parametrize("method, path, body, status, scim_type, words", CASES,
                         ids=[f"{c[0]} {c[1]} {c[3]} {c[5] or ''}"[:60] for c in CASES])
def test_rejected_and_nothing_changed(world, method, path, body, status, scim_type, words):
    s, ids = world
    path = path.format(**ids)
    kw = {}
    if isinstance(body, str):
        kw["content"] = body.replace("{G}", ids["G"]).encode()
        kw["headers"] = {"Content-Type": "application/scim+json"}
    elif body is not None:
        import json
        kw["content"] = json.dumps(body).replace("{G}", ids["G"]).replace("{V}", ids["V"]).encode()
        kw["headers"] = {"Content-Type": "application/scim+json"}
    before = s.db_dump()
    r = s.http.request(method, path, **kw)
    detail = scim_error(r, status, scim_type)
    if words:
        assert words.lower() in detail.lower(), detail
    assert s.db_dump() == before
