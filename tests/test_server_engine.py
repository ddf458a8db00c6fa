"""The view engine's caches never serve a stale view: after every change in a
long random sequence, the views a long-lived engine returns (with carried
over views and cached users/members) equal those of a fresh engine, and every
view is valid for the cache writer."""
from __future__ import annotations

import datetime as dt
import random

import pytest

from step_ssh import pki
from step_ssh.server.config import ServerConfig
from step_ssh.server.store import GroupIn, Store, StoreError, UserIn
from step_ssh.server.views import ComputedView, ViewEngine, diff_computed
from step_ssh.viewconv import apply_delta, view_from_pb

TAGS = [("env", "prod"), ("env", "dev"), ("role", "web"), ("role", "db"), ("zone", "a")]


def random_tags(rng, n=None):
    n = rng.randint(1, 3) if n is None else n
    out = {}
    for k, v in rng.sample(TAGS, n):
        out[k] = v
    return out


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_engine_matches_a_fresh_computation(tmp_path, seed):
    rng = random.Random(seed)
    store = Store(tmp_path / "db", ServerConfig())
    ca, ca_key = pki.create_ca()
    hosts = []
    for i in range(6):
        tok, _ = store.create_token(f"h{i}", random_tags(rng), 600)
        r = store.enroll(tok, pki.make_csr(pki.new_private_key(), "h"), "t", ca, ca_key, dt.timedelta(hours=1))
        hosts.append(r["host_id"])
    store.register_host(hosts[0], "", {"role": "bastion"}, True, [], "t")
    engine = ViewEngine(store)
    held = {}  # host -> ComputedView last "sent"
    users, groups, grants = [], [], []

    def op():
        kind = rng.randrange(14)
        if kind == 0 or not users:
            name = f"u{rng.randrange(40)}"
            gid = rng.choice([0, 0, *[store.group_dict(g)["gid"] for g in groups[:2]]])
            store.create_user(UserIn(name, gid=gid, principals=[name, f"{name}@x"] if rng.random() < .3 else []))
            users.append(name)
        elif kind == 1:
            name = rng.choice(users)
            store.delete_user(name)
            users.remove(name)
        elif kind == 2 or not groups:
            name = rng.choice([f"g{rng.randrange(12)}", rng.choice(users)])  # sometimes named like a user
            store.create_group(GroupIn(name, 0, rng.sample(users, min(len(users), rng.randint(0, 4)))))
            groups.append(name)
        elif kind == 3:
            name = rng.choice(groups)
            store.delete_group(name)
            groups.remove(name)
        elif kind in (4, 5):
            store.add_member(rng.choice(groups), rng.choice(users))
        elif kind == 6:
            store.remove_member(rng.choice(groups), rng.choice(users))
        elif kind == 7:
            grants.append(store.add_grant(rng.choice(groups), random_tags(rng), rng.choice(["ssh", "sudo"]))["id"])
        elif kind == 8 and grants:
            store.remove_grant(grants.pop(rng.randrange(len(grants))))
        elif kind == 9:
            store.tag_host(rng.choice(hosts), random_tags(rng, 1))
        elif kind == 10:
            h = rng.choice(hosts[1:])
            store.register_host(h, "", random_tags(rng), False, [hosts[0]] if rng.random() < .5 else [], "t")
        elif kind == 11:
            picked = rng.sample(users, min(3, len(users)))
            store.import_directory([UserIn(u, active=rng.random() < .6) for u in picked], [], prune=False)
        elif kind == 12:
            store.add_user_ca(f"SHA256:{rng.random()}", f"ssh-ed25519 AAAA{rng.randrange(10**9)}", "")
        else:
            g = rng.choice(groups)
            members = rng.sample(users, min(len(users), rng.randint(0, 5)))
            store.import_directory([], [GroupIn(g, 0, members)], prune=False)

    changed = 0
    for step in range(150):
        try:
            op()
        except StoreError:
            pass  # refused requests are part of the sequence too
        for h in hosts:
            rev, _, cv = engine.host_view(h)
            fresh = ViewEngine(store)
            _, _, expect = fresh.host_view(h)
            assert cv.blob == expect.blob, f"seed {seed} step {step}: stale view for {h}"
            view_from_pb(cv.view)
            old = held.get(h)
            if old is not None and old.hash != cv.hash:
                # the delta a Watch stream would send turns the held view into the new one
                base = old.view
                d = diff_computed(old, cv)
                d.base_revision = base.revision
                got = apply_delta(base, d)
                got.revision = 0
                assert ComputedView.from_blob(got.SerializeToString()).user_bytes == cv.user_bytes
                assert {g.name: g for g in got.groups} == {g.name: g for g in cv.view.groups}
                changed += 1
            held[h] = cv
    assert engine.carried > 0 and changed > 10


def test_encoded_watch_events_match_the_messages(tmp_path):
    from step_ssh.proto import stepssh_pb2 as pb
    from step_ssh.server.service import Hub, snapshot_event
    from step_ssh.server.views import stamped

    store = Store(tmp_path / "db", ServerConfig())
    ca, ca_key = pki.create_ca()
    for n in ("ann", "ben"):
        store.create_user(UserIn(n))
    store.create_group(GroupIn("team", 0, ["ann"]))
    store.add_grant("team", {"env": "prod"}, "sudo")
    tok, _ = store.create_token("h", {"env": "prod"}, 60)
    hid = store.enroll(tok, pki.make_csr(pki.new_private_key(), "h"), "t", ca, ca_key, dt.timedelta(hours=1))["host_id"]
    eng = ViewEngine(store)
    rev, _, old = eng.host_view(hid)
    for shrink in (False, True):
        got = pb.WatchEvent.FromString(snapshot_event(old, rev, shrink))
        assert got == pb.WatchEvent(snapshot=pb.Snapshot(view=stamped(old, rev), shrink_intended=shrink))
    store.add_member("team", "ben")
    rev2, _, new = eng.host_view(hid)
    ev = pb.WatchEvent.FromString(Hub(ServerConfig()).delta_event(old, new, rev, rev2, False))
    assert ev.delta.base_revision == rev and ev.delta.revision == rev2
    assert [u.name for u in ev.delta.upsert_users] == ["ben"]
    assert apply_delta(stamped(old, rev), ev.delta) == stamped(new, rev2)
