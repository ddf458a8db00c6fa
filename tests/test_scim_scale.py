"""Thousands of users through SCIM: provisioning in a loop as an IdP's first
sync does, filtering and paging over them, a group of all of them, and a
membership change still reaching a host by push (timing: benchmarks/scim_bench.py)."""
from __future__ import annotations

import time

import pytest

from scim_fixtures import module_scim_server  # noqa: F401
from server_fixtures import next_change
from step_ssh.proto import stepssh_pb2 as pb

N = 2000


@pytest.fixture(scope="module")
def fleet(module_scim_server):
    s = module_scim_server
    h = s.http
    t0 = time.monotonic()
    ids = []
    for i in range(N):
        body = {"schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"], "userName": f"user{i:04d}@scale.example",
                "externalId": f"ext-{i}", "active": i % 10 != 0,
                "name": {"givenName": f"Given{i}", "familyName": "Scale"},
                "emails": [{"value": f"user{i:04d}@scale.example", "type": "work", "primary": True}]}
        r = h.post("/Users", json=body)
        assert r.status_code == 201, r.text
        ids.append(r.json()["id"])
    elapsed = time.monotonic() - t0
    print(f"\n{N} users provisioned in {elapsed:.1f}s ({elapsed / N * 1000:.1f} ms each)")
    return s, ids


def test_paging_walks_every_user_once(fleet):
    s, ids = fleet
    seen, start = [], 1
    while True:
        r = s.http.get("/Users", params={"startIndex": start, "count": 300, "attributes": "userName"})
        body = r.json()
        assert body["totalResults"] == N
        assert body["startIndex"] == start and body["itemsPerPage"] == len(body["Resources"])
        if not body["Resources"]:
            break
        assert set(body["Resources"][0]) == {"schemas", "id", "userName"}
        seen += [x["id"] for x in body["Resources"]]
        start += len(body["Resources"])
    assert seen == ids  # creation order, no duplicates, none missing
    # no count: at most maxResults
    body = s.http.get("/Users").json()
    assert body["totalResults"] == N and body["itemsPerPage"] == 1000
    # count over the maximum is capped; count=0 only counts
    assert s.http.get("/Users", params={"count": 5000}).json()["itemsPerPage"] == 1000
    body = s.http.get("/Users", params={"count": 0}).json()
    assert body["totalResults"] == N and body["Resources"] == []


@pytest.mark.parametrize("flt, expected", [
    ('userName eq "user0042@scale.example"', 1),
    ('userName sw "user1"', 1000),
    ('userName sw "user01"', 100),
    ('userName co "99@"', 20),
    ('userName ew "7@scale.example"', 200),
    ('active eq false', 200),
    ('active eq false and userName sw "user00"', 10),
    ('userName eq "user0001@scale.example" or externalId eq "ext-1999"', 2),
    ('emails[type eq "work" and value co "user123"]', 10),
    ('name.givenName eq "given7" or name.givenName eq "given8"', 2),
    ('not (userName sw "user1") and active eq true', 900),
])
def test_filters_over_thousands(fleet, flt, expected):
    s, _ = fleet
    body = s.http.get("/Users", params={"filter": flt, "count": 1000, "attributes": "userName"}).json()
    assert body["totalResults"] == expected, body
    assert len(body["Resources"]) == min(expected, 1000)


def test_a_group_of_everyone_and_pushes_to_its_host(fleet):
    s, ids = fleet
    h = s.http
    host = s.enroll("big1", {"env": "big"})
    g = s.create_group("Everyone")
    s.admin.AddGrant(pb.Grant(group="everyone", tags={"env": "big"}, access=pb.ACCESS_SSH), timeout=10)
    call = host.watch(0)
    try:
        assert next_change(call).WhichOneof("event") == "snapshot"
        t0 = time.monotonic()
        r = s.patch("Groups", g["id"], {"op": "add", "path": "members", "value": [{"value": i} for i in ids]})
        assert r.status_code == 204, r.text
        d = next_change(call, timeout=10).delta
        print(f"\n{N} members added and pushed in {time.monotonic() - t0:.2f}s")
        assert len(d.upsert_users) == N * 9 // 10  # the inactive tenth get no access
        # one member removed (Okta's form), then another (Entra's): each pushed
        for op, gone in (({"op": "remove", "path": f'members[value eq "{ids[1]}"]'}, "user0001"),
                         ({"op": "Remove", "path": "members", "value": [{"value": ids[2]}]}, "user0002")):
            t0 = time.monotonic()
            assert s.patch("Groups", g["id"], op).status_code == 204
            d = next_change(call, timeout=5).delta  # pushed, not polled (latency: benchmarks/scim_bench.py)
            print(f"{gone} removed and pushed in {time.monotonic() - t0:.2f}s")
            assert list(d.remove_users) == [gone]
        # deactivating one member is pushed as a removal too
        t0 = time.monotonic()
        assert s.patch("Users", ids[3], {"op": "replace", "value": {"active": False}}).status_code == 200
        assert list(next_change(call, timeout=5).delta.remove_users) == ["user0003"]
        print(f"user0003 deactivated and pushed in {time.monotonic() - t0:.2f}s")
    finally:
        call.cancel()
    body = h.get(f"/Groups/{g['id']}").json()
    assert len(body["members"]) == N - 2
    body = h.get(f"/Groups/{g['id']}", params={"excludedAttributes": "members"}).json()
    assert "members" not in body
    body = h.get("/Groups", params={"filter": f'members[value eq "{ids[5]}"]'}).json()
    assert body["totalResults"] == 1
    # a user's groups attribute
    assert h.get(f"/Users/{ids[5]}").json()["groups"][0]["value"] == g["id"]
