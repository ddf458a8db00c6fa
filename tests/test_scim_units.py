"""SCIM pieces without HTTP: the name rule, filters -> SQL over a real store,
response projection."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scim2_models import Context, InvalidFilterException, SearchRequest

from step_ssh.server.config import ServerConfig
from step_ssh.server.scim import schema as S
from step_ssh.server.scim.directory import Directory
from step_ssh.server.scim.http import project
from step_ssh.server.scim.names import base_name, posix_name
from step_ssh.server.store import Store, UserIn
from step_ssh.view import NAME_RE

# ---- names ----------------------------------------------------------------------------


@pytest.mark.parametrize("source, kind, expected", [
    ("jane.doe@corp.example", "user", "jane_doe"),
    ("Jane.Doe@Corp.Example", "user", "jane_doe"),
    ("CORP\\jdoe", "user", "jdoe"),
    ("José Núñez", "user", "jose_nunez"),
    ("alice", "user", "alice"),
    ("o'brien+ops@x.io", "user", "o_brien_ops"),
    ("9lives@x.io", "user", "u9lives"),
    ("__--@x.io", "user", "u"),
    ("Дмитрий@x.io", "user", "u"),
    ("-admin-", "user", "admin"),
    ("svc_deploy", "user", "svc_deploy"),
    ("Engineering Team", "group", "engineering_team"),
    ("sg-eng@corp.example", "group", "sg-eng_corp_example"),
    ("2024 interns", "group", "g2024_interns"),
])
def test_base_name(source, kind, expected):
    assert base_name(source, kind) == expected


def test_collisions_and_overflow_get_a_stable_hash_suffix():
    taken = {"alice", "root"}
    a = posix_name("alice@corp.example", taken.__contains__)
    assert a.startswith("alice_") and len(a) == len("alice_") + 6 and NAME_RE.match(a)
    assert posix_name("alice@corp.example", taken.__contains__) == a  # stable
    assert posix_name("Alice@Corp.Example", taken.__contains__) == a  # userName is case-insensitive
    b = posix_name("alice@other.example", taken.__contains__)
    assert b != a and b.startswith("alice_")  # same base, different source: different suffix
    # the suffixed name itself taken: the next attempt differs, still stable
    c = posix_name("alice@corp.example", (taken | {a}).__contains__)
    assert c not in (a, "alice") and c == posix_name("alice@corp.example", (taken | {a}).__contains__)
    long = "a.very.long.user.name.that.goes.on.and.on@corp.example"
    n = posix_name(long, lambda _: False)
    assert len(n) == 32 and n.startswith("a_very_long_user_name_tha_") and NAME_RE.match(n)
    assert posix_name(long, lambda _: False) == n


@settings(max_examples=300, deadline=None)
@given(st.text(min_size=0, max_size=80), st.sampled_from(["user", "group"]))
def test_any_source_gives_a_valid_name(source, kind):
    n = posix_name(source, lambda x: x == "taken", kind)
    assert NAME_RE.match(n) and 1 <= len(n) <= 32 and n != "taken"


# ---- filters over a real store -------------------------------------------------------------

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    store = Store(tmp_path_factory.mktemp("db") / "server.db", ServerConfig())
    d = Directory(store)

    def user(payload: dict) -> dict:
        m = S.UserModel.model_validate({"schemas": [S.USER_URN], **payload},
                                       scim_ctx=Context.RESOURCE_CREATION_REQUEST, scim_policy=S.POLICY)
        return d.create_user(m, "test")

    users = {
        "bjensen": user({"userName": "bjensen@example.com", "externalId": "00u1",
                         "name": {"givenName": "Barbara", "familyName": "Jensen"}, "displayName": "Babs Jensen",
                         "emails": [{"value": "bjensen@example.com", "type": "work", "primary": True},
                                    {"value": "babs@home.example", "type": "home"}],
                         "title": "Tour Guide", S.ENTERPRISE_URN: {"employeeNumber": "701984"},
                         S.USER_EXT_URN: {"uidNumber": 81001, "loginShell": "/bin/zsh",
                                          "sshPrincipals": ["bjensen", "babs@example.com"]}}),
        "jsmith": user({"userName": "JSmith@Example.com", "externalId": "00u2", "active": False,
                        "emails": [{"value": "jsmith@example.com", "type": "work"}]}),
        "jose": user({"userName": "José@example.com", "name": {"givenName": "José"}}),
    }
    store.create_user(UserIn(name="localadmin"))  # made with step-ssh-ctl: invisible to SCIM
    gm = S.GroupModel.model_validate({"schemas": [S.GROUP_URN], "displayName": "Tour Guides",
                                      "members": [{"value": users["bjensen"]["id"]}]},
                                     scim_ctx=Context.RESOURCE_CREATION_REQUEST, scim_policy=S.POLICY)
    group = d.create_group(gm, "test")
    yield d, users, group
    store.close()


def names(d: Directory, flt: str | None, start: int = 1, count: int = 100) -> list[str]:
    req = SearchRequest[S.UserModel](filter=flt) if flt else None
    total, docs = d.list_users(req.filter.ast if req else None, start, count)
    return sorted(x[S.USER_EXT_URN]["loginName"] for x in docs)


@pytest.mark.parametrize("flt, expected", [
    (None, ["bjensen", "jose", "jsmith"]),
    ('userName eq "bjensen@example.com"', ["bjensen"]),
    ('userName eq "BJENSEN@EXAMPLE.COM"', ["bjensen"]),  # caseExact false
    ('userName eq "jsmith@example.com"', ["jsmith"]),
    ('userName co "SMITH"', ["jsmith"]),
    ('userName sw "j"', ["jose", "jsmith"]),
    ('userName ew "@example.com"', ["bjensen", "jose", "jsmith"]),
    ('userName eq "josé@example.com"', ["jose"]),
    ('externalId eq "00u1"', ["bjensen"]),
    ('externalId eq "00U1"', []),  # externalId is caseExact
    ('active eq true', ["bjensen", "jose"]),
    ('active eq false', ["jsmith"]),
    ('active eq "False"', ["jsmith"]),
    ('not (active eq true)', ["jsmith"]),
    ('emails.value eq "babs@home.example"', ["bjensen"]),
    ('emails co "SMITH@"', ["jsmith"]),
    ('emails[type eq "work" and value sw "bjensen"]', ["bjensen"]),
    ('emails[type eq "home"]', ["bjensen"]),
    ('emails pr', ["bjensen", "jsmith"]),
    ('title pr', ["bjensen"]),
    ('name.givenName eq "barbara"', ["bjensen"]),
    ('displayName co "babs"', ["bjensen"]),
    ('userName sw "b" or userName sw "jo"', ["bjensen", "jose"]),
    ('(userName sw "j" and active eq true) or externalId eq "00u1"', ["bjensen", "jose"]),
    ('userName ne "bjensen@example.com"', ["jose", "jsmith"]),
    ('urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:employeeNumber eq "701984"', ["bjensen"]),
    ('urn:ietf:params:scim:schemas:extension:stepssh:2.0:User:uidNumber eq 81001', ["bjensen"]),
    ('urn:ietf:params:scim:schemas:extension:stepssh:2.0:User:uidNumber gt 81001', ["jose", "jsmith"]),
    ('urn:ietf:params:scim:schemas:extension:stepssh:2.0:User:loginShell eq "/bin/zsh"', ["bjensen"]),
    ('urn:ietf:params:scim:schemas:extension:stepssh:2.0:User:loginName eq "jose"', ["jose"]),
    ('urn:ietf:params:scim:schemas:extension:stepssh:2.0:User:sshPrincipals eq "babs@example.com"', ["bjensen"]),
    ('urn:ietf:params:scim:schemas:extension:stepssh:2.0:User:sshPrincipals eq "jsmith"', ["jsmith"]),
    ('urn:ietf:params:scim:schemas:extension:stepssh:2.0:User:homeDirectory eq "/home/jose"', ["jose"]),
    ('meta.created gt "2000-01-01T00:00:00Z"', ["bjensen", "jose", "jsmith"]),
    ('meta.lastModified lt "2000-01-01T00:00:00Z"', []),
    ('groups.display eq "tour guides"', ["bjensen"]),
    ('groups pr', ["bjensen"]),
])
def test_user_filters(world, flt, expected):
    d, users, group = world
    assert names(d, flt) == expected


def test_user_filter_by_id_and_group_id(world):
    d, users, group = world
    assert names(d, f'id eq "{users["jose"]["id"]}"') == ["jose"]
    assert names(d, f'groups.value eq "{group["id"]}"') == ["bjensen"]


def test_group_filters(world):
    d, users, group = world

    def gnames(flt):
        req = SearchRequest[S.GroupModel](filter=flt)
        return [g["displayName"] for g in d.list_groups(req.filter.ast, 1, 100)[1]]
    assert gnames('displayName eq "TOUR GUIDES"') == ["Tour Guides"]
    assert gnames(f'members[value eq "{users["bjensen"]["id"]}"]') == ["Tour Guides"]
    assert gnames(f'members.value eq "{users["jose"]["id"]}"') == []
    assert gnames(f'members eq "{users["bjensen"]["id"]}"') == ["Tour Guides"]
    assert gnames('urn:ietf:params:scim:schemas:extension:stepssh:2.0:Group:groupName eq "tour_guides"') \
        == ["Tour Guides"]
    assert gnames('displayName sw "x" or members pr') == ["Tour Guides"]


def test_paging(world):
    d, users, group = world
    all3 = [x["id"] for x in d.list_users(None, 1, 100)[1]]
    assert len(all3) == 3
    assert [x["id"] for x in d.list_users(None, 2, 1)[1]] == all3[1:2]
    total, page = d.list_users(None, 3, 10)
    assert total == 3 and [x["id"] for x in page] == all3[2:]
    total, page = d.list_users(None, 4, 10)
    assert total == 3 and page == []
    total, page = d.list_users(None, 1, 0)
    assert total == 3 and page == []


@pytest.mark.parametrize("flt", [
    'bogus eq "x"',                     # no such attribute
    'active eq "maybe"',                # not a boolean
    'userName eq',                      # syntax
    'userName xx "a"',                  # operator
    'emails[type eq "work"',            # unbalanced
])
def test_bad_filters_are_refused_by_the_parser(flt):
    with pytest.raises(Exception) as e:
        SearchRequest[S.UserModel](filter=flt)
    assert "invalidFilter" in str(e.value) or isinstance(e.value, InvalidFilterException)


def test_users_made_outside_scim_are_invisible_and_their_names_taken(world):
    d, users, group = world
    assert "localadmin" not in names(d, None)
    m = S.UserModel.model_validate({"schemas": [S.USER_URN], "userName": "localadmin@corp.example"},
                                   scim_ctx=Context.RESOURCE_CREATION_REQUEST, scim_policy=S.POLICY)
    doc = d.create_user(m, "test")
    assert doc[S.USER_EXT_URN]["loginName"].startswith("localadmin_")
    d.delete_user(doc["id"], "test")


# ---- projection ----------------------------------------------------------------------------

DOC = {"schemas": [S.USER_URN, S.USER_EXT_URN], "id": "1", "userName": "a",
       "name": {"givenName": "A", "familyName": "B"}, "emails": [{"value": "a@x", "type": "work"}], "active": True,
       S.USER_EXT_URN: {"loginName": "a", "uidNumber": 7}, "meta": {"resourceType": "User"}}
URNS = (S.ENTERPRISE_URN, S.USER_EXT_URN)


def test_projection():
    assert project(DOC, [], [], S.USER_URN, URNS) is DOC
    assert project(DOC, ["userName"], [], S.USER_URN, URNS) == {"schemas": DOC["schemas"], "id": "1", "userName": "a"}
    assert project(DOC, ["name.givenName", "emails.value"], [], S.USER_URN, URNS) == {
        "schemas": DOC["schemas"], "id": "1", "name": {"givenName": "A"}, "emails": [{"value": "a@x"}]}
    assert project(DOC, [f"{S.USER_EXT_URN}:uidNumber", "USERNAME"], [], S.USER_URN, URNS) == {
        "schemas": DOC["schemas"], "id": "1", S.USER_EXT_URN: {"uidNumber": 7}, "userName": "a"}
    out = project(DOC, [], ["emails", "name.familyName", S.USER_EXT_URN, "id"], S.USER_URN, URNS)
    assert "emails" not in out and out["name"] == {"givenName": "A"} and S.USER_EXT_URN not in out
    assert out["id"] == "1" and DOC["name"]["familyName"] == "B"  # the original is untouched
