"""Control plane benchmark: effective-view computation and delta production.

Default scale (issue 3): 100k users, 10k groups, 5k hosts. The directory is
loaded through the real Store (directory import, grants), views are computed by
the engine the server runs (views.ViewEngine on the DB thread), and deltas by
the same diff the Watch streams send.

    python benchmarks/server_bench.py                 # full scale (~2 min)
    python benchmarks/server_bench.py --users 10000 --groups 1000 --hosts 500

Shape of the fleet (seeded, reproducible):
- every user is in ~5 team groups (~50 members each) and in `everyone`;
- ~2,000 grants: team groups get ssh on {env, role} (70%), on {role} (15%),
  sudo on {env, role, region} (14%), a few get sudo on a whole env (1%);
  `everyone` gets ssh on role=sandbox (those hosts hold all 100k users);
- hosts carry env (prod/staging/dev), role (50 + sandbox) and region (5):
  at most ~800 distinct tag sets for 5,000 hosts; 1% are bastions with
  ~10 hosts behind each.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import random
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from step_ssh.proto import stepssh_pb2 as pb  # noqa: E402
from step_ssh.server.config import ServerConfig  # noqa: E402
from step_ssh.server.store import GroupIn, Store, UserIn, new_ulid, tags_json  # noqa: E402
from step_ssh.server.views import ViewEngine, diff_computed, stamped  # noqa: E402
from step_ssh.viewconv import apply_delta, view_from_pb  # noqa: E402

ENVS = ["prod", "staging", "dev"]
REGIONS = [f"r{i}" for i in range(5)]
ROLES = [f"role{i}" for i in range(50)]


def ms(x: float) -> str:
    return f"{x * 1000:.1f} ms" if x < 10 else f"{x:.2f} s"


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


def build(store: Store, n_users: int, n_groups: int, n_hosts: int, rng: random.Random) -> dict:
    t = {}
    users = [UserIn(name=f"u{i:06d}", principals=[f"u{i:06d}", f"u{i:06d}@example.com"] if i % 10 == 0 else [])
             for i in range(n_users)]
    members: dict[str, list[str]] = {f"g{j:05d}": [] for j in range(n_groups - 1)}
    gnames = list(members)
    for u in users:
        for g in rng.sample(gnames, 5):
            members[g].append(u.name)
    groups = [GroupIn(g, 0, m) for g, m in members.items()] + [GroupIn("everyone", 0, [u.name for u in users])]
    t0 = time.perf_counter()
    r = store.import_directory(users, groups, prune=False)
    t["import"] = time.perf_counter() - t0
    assert r["users_created"] == n_users and r["groups_created"] == n_groups, r

    t0 = time.perf_counter()
    store.add_grant("everyone", {"role": "sandbox"}, "ssh")
    n = 0
    while n < 2000:
        g = rng.choice(gnames)
        x = rng.random()
        if x < 0.70:
            tags, acc = {"env": rng.choice(ENVS), "role": rng.choice(ROLES)}, "ssh"
        elif x < 0.85:
            tags, acc = {"role": rng.choice(ROLES)}, "ssh"
        elif x < 0.99:
            tags, acc = {"env": rng.choice(ENVS), "role": rng.choice(ROLES), "region": rng.choice(REGIONS)}, "sudo"
        else:
            tags, acc = {"env": rng.choice(ENVS)}, "sudo"
        try:
            store.add_grant(g, tags, acc)
            n += 1
        except Exception:
            pass  # the same grant twice
    t["grants"] = time.perf_counter() - t0

    # hosts: written directly (enrollment needs certificates; the rows are what matters here)
    t0 = time.perf_counter()
    now = int(time.time())
    c = store.conn
    c.execute("BEGIN")
    ids = []
    for i in range(n_hosts):
        hid = new_ulid()
        ids.append(hid)
        role = "sandbox" if i % 50 == 7 else rng.choice(ROLES)
        tags = {"env": ENVS[i % 3], "role": role, "region": rng.choice(REGIONS)}
        c.execute("INSERT INTO hosts(id, hostname, tags, created_at) VALUES (?,?,?,?)",
                  (hid, f"h{i:05d}.example.com", tags_json(tags), now))
    bastions = ids[: max(1, n_hosts // 100)]
    for b in bastions:
        c.execute("UPDATE hosts SET is_bastion=1, tags=? WHERE id=?", (tags_json({"role": "bastion"}), b))
    for i, hid in enumerate(ids[len(bastions):]):
        if i % 10 == 0:
            c.execute("UPDATE hosts SET bastions=? WHERE id=?", (json.dumps([bastions[i % len(bastions)]]), hid))
    c.execute("UPDATE meta SET value=CAST(value AS INTEGER)+1 WHERE key='revision'")
    c.execute("COMMIT")
    t["hosts"] = time.perf_counter() - t0
    t["host_ids"] = ids
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=100_000)
    ap.add_argument("--groups", type=int, default=10_000)
    ap.add_argument("--hosts", type=int, default=5_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    rng = random.Random(a.seed)
    tmp = tempfile.mkdtemp(prefix="step-ssh-bench-")
    store = Store(os.path.join(tmp, "bench.db"), ServerConfig())
    rows = []

    setup = build(store, a.users, a.groups, a.hosts, rng)
    host_ids = setup.pop("host_ids")
    rows.append(("directory import (users+groups+memberships)", ms(setup["import"]),
                 f"{a.users} users, {a.groups} groups"))
    rows.append(("grants added (one transaction each)", ms(setup["grants"]), f"{len(store.list_grants())} grants"))

    # --- cold: every distinct key once ----------------------------------------------------
    eng = ViewEngine(store)
    gc.collect()
    with store.read() as conn:
        t0 = time.perf_counter()
        fleet = eng.sync(conn)
        t_fleet = time.perf_counter() - t0
        keys: dict = {}
        for hid in host_ids:
            keys.setdefault(fleet.keys[hid], []).append(hid)
        t0 = time.perf_counter()
        ckeys: dict = {}
        for k in keys:
            ck = eng.ckey_of[k] = fleet.compute_key(k)
            ckeys.setdefault(ck, []).append(k)
        t_match = time.perf_counter() - t0
        per_key, sizes = [], []
        t0 = time.perf_counter()
        for ck in ckeys:
            t1 = time.perf_counter()
            eng.cache[ck] = cv = eng.compute(conn, fleet, ck)
            per_key.append(time.perf_counter() - t1)
            sizes.append(len(cv.user_bytes))
        t_all = time.perf_counter() - t0
    rows.append(("fleet load (grants, hosts, CA keys)", ms(t_fleet), f"{len(fleet.hosts)} hosts"))
    rows.append(("distinct host keys (tag set, bastion set)", str(len(keys)), f"for {a.hosts} hosts"))
    rows.append(("grant matching for all host keys", ms(t_match), f"{len(fleet.grants)} grants, indexed by tag"))
    rows.append(("distinct views (applying grants, jump groups)", str(len(ckeys)), "one computation each"))
    rows.append(("all views, cold (empty caches)", ms(t_all), "includes loading users/members"))
    small = [(t, n) for t, n in zip(per_key, sizes) if n < a.users // 2]
    big = [(t, n) for t, n in zip(per_key, sizes) if n >= a.users // 2]
    if small:
        rows.append(("view of a typical host (cold): median / p99",
                     f"{ms(statistics.median(t for t, _ in small))} / {ms(pct([t for t, _ in small], 99))}",
                     f"median {int(statistics.median(n for _, n in small))} users, max {max(n for _, n in small)}"))
    if big:
        rows.append(("view of a sandbox host (everyone), cold", ms(statistics.median(t for t, _ in big)),
                     f"{max(n for _, n in big)} users"))
    with store.read() as conn:
        t0 = time.perf_counter()
        for ck in ckeys:
            eng.compute(conn, fleet, ck)
        rows.append(("all views recomputed, warm user/member caches", ms(time.perf_counter() - t0),
                     f"{len(ckeys)} views"))
    biggest = max(eng.cache.values(), key=lambda cv: len(cv.blob))
    rows.append(("largest snapshot on the wire", f"{len(biggest.blob) / 1e6:.1f} MB", f"{len(biggest.user_bytes)} users"))
    t0 = time.perf_counter()
    ev = pb.WatchEvent(snapshot=pb.Snapshot(view=stamped(biggest, 1)))
    ev.SerializeToString()
    rows.append(("largest snapshot: parse + stamp + serialize", ms(time.perf_counter() - t0), "sent once per host"))
    t0 = time.perf_counter()
    view_from_pb(biggest.view)
    rows.append(("largest view validated (pydantic, agent side)", ms(time.perf_counter() - t0), ""))

    # --- the server path: ViewEngine.host_view for every host, as Watch streams do ------------
    t0 = time.perf_counter()
    for hid in host_ids:
        eng.host_view(hid)
    dt_ = time.perf_counter() - t0
    rows.append(("host_view for every host (warm)", ms(dt_), f"{dt_ / len(host_ids) * 1e6:.0f} µs/host"))
    before = {hid: eng.host_view(hid)[2] for hid in host_ids}

    # --- changes: what a revision costs, and the deltas it produces -------------------------
    def change(label: str, fn) -> None:
        fn()
        c0, k0 = eng.computed, eng.carried
        t0 = time.perf_counter()
        after = {hid: eng.host_view(hid)[2] for hid in host_ids}
        t_views = time.perf_counter() - t0
        t0 = time.perf_counter()
        cache, changed, dsize = {}, 0, []
        for hid in host_ids:
            old, new = before[hid], after[hid]
            if old.hash == new.hash:
                continue
            changed += 1
            k = (old.hash, new.hash)
            if k not in cache:
                cache[k] = diff_computed(old, new)
            d = pb.Delta()
            d.CopyFrom(cache[k])
            dsize.append(len(d.upsert_users) + len(d.remove_users) + len(d.upsert_groups))
        t_diff = time.perf_counter() - t0
        rows.append((f"{label}: views for all hosts", ms(t_views),
                     f"{eng.computed - c0} recomputed, {eng.carried - k0} carried over"))
        rows.append((f"{label}: deltas", ms(t_diff),
                     f"{changed} hosts changed, {len(cache)} distinct diffs, max {max(dsize, default=0)} records"))
        before.update(after)

    granted_groups = [g["group"] for g in store.list_grants() if g["group"] != "everyone"]
    victim = granted_groups[0]
    members = set(store.group_dict(victim)["members"])
    user = next(u for u in (f"u{i:06d}" for i in range(a.users)) if u not in members)
    change("add a member to a granted group", lambda: store.add_member(victim, user))
    change("remove that member again", lambda: store.remove_member(victim, user))
    g = next(x for x in store.list_grants() if x["group"] != "everyone" and len(x["tags"]) == 2)
    change("remove one grant", lambda: store.remove_grant(g["id"]))
    change("remove a user", lambda: store.delete_user(sorted(members)[0]))
    change("trust another SSH user CA", lambda: store.add_user_ca(
        "SHA256:bench", "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFlT7C0ZV4q2j3HtMXMx2vBQ0YkL9jH3c5xJm5m8nqPf bench", ""))

    # worst case diff: a 100k-user view loses one user and changes another
    big_cv = next((cv for cv in eng.cache.values() if len(cv.user_bytes) >= a.users // 2), None)
    if big_cv is not None:
        from step_ssh.server.views import ComputedView
        v = pb.HostView()
        v.CopyFrom(big_cv.view)
        del v.users[0]
        v.users[1].gecos = "changed"
        other = ComputedView.from_blob(v.SerializeToString())
        t0 = time.perf_counter()
        d = diff_computed(big_cv, other)
        t_d = time.perf_counter() - t0
        t0 = time.perf_counter()
        apply_delta(big_cv.view, d)
        rows.append(("diff of two 100k-user views (1 removed, 1 changed)", ms(t_d),
                     f"apply_delta (agent side): {ms(time.perf_counter() - t0)}"))

    rows.append(("peak RSS of this process", f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB", ""))
    store.close()

    if a.json:
        print(json.dumps(rows, indent=2))
        return
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    print(f"step-ssh control plane: {a.users} users, {a.groups} groups, {a.hosts} hosts "
          f"(python {sys.version.split()[0]}, {os.cpu_count()} cpus)")
    print(f"{'measurement'.ljust(w0)}  {'time'.rjust(w1)}  notes")
    for r in rows:
        print(f"{r[0].ljust(w0)}  {r[1].rjust(w1)}  {r[2]}")


if __name__ == "__main__":
    main()
