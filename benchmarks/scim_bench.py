#!/usr/bin/env python3
"""SCIM benchmark (issue 9): an IdP's group change reaching every host.

    /tmp/venv/bin/python benchmarks/scim_bench.py                  # 1,000 users, 20 hosts, 40 changes
    /tmp/venv/bin/python benchmarks/scim_bench.py --users 5000 --hosts 50 --changes 100 --json OUT

Everything is real and on loopback: `step-ssh-server run` (subprocess, its own
temporary directory) serving gRPC and SCIM over HTTPS; the directory is
provisioned through SCIM (users POSTed, one group holding all but one of them);
`--hosts` enrolled hosts each hold a Watch stream (their own certificate),
and the group is granted on their tag. Each change adds or removes the spare
user with a SCIM PATCH — Okta's `add` form and Entra's `remove` with a value
list, alternately — and the clock stops when *every* host has received the
delta. Baseline, same run, same hosts: the same changes through the admin
gRPC API (AddMember / RemoveMember), i.e. without HTTP, SCIM parsing and the
SCIM-to-directory mapping. Target (issue 9): within a second.
"""
from __future__ import annotations

import argparse
import json
import queue
import ssl
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx  # noqa: E402
import yaml  # noqa: E402

from agent_bench import Server, free_port, summary  # noqa: E402
from step_ssh import rpc  # noqa: E402
from step_ssh.proto import stepssh_pb2 as pb  # noqa: E402
from step_ssh.proto import stepssh_pb2_grpc as pbg  # noqa: E402

USER = "urn:ietf:params:scim:schemas:core:2.0:User"
GROUP = "urn:ietf:params:scim:schemas:core:2.0:Group"
PATCH = "urn:ietf:params:scim:api:messages:2.0:PatchOp"
TARGET_S = 1.0


class Watcher:
    """One host's Watch stream; each delta's arrival time goes to `arrivals`."""

    def __init__(self, server: Server, identity: dict, arrivals: "queue.Queue[tuple[int, float]]", idx: int):
        creds = rpc.mtls_credentials(Path(identity["ca"]).read_bytes(), Path(identity["cert"]).read_bytes(),
                                     Path(identity["key"]).read_bytes())
        self.ch = rpc.channel(server.address, creds)
        self.call = pbg.HostServiceStub(self.ch).Watch(pb.WatchRequest(since_revision=0, agent_version="bench"))
        self.snapshot = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(arrivals, idx), daemon=True)
        self.thread.start()

    def _run(self, arrivals, idx: int) -> None:
        try:
            for ev in self.call:
                kind = ev.WhichOneof("event")
                if kind == "snapshot":
                    self.snapshot.set()
                elif kind == "delta":
                    arrivals.put((idx, time.perf_counter()))
        except Exception:  # cancelled at the end
            pass

    def close(self) -> None:
        self.call.cancel()
        self.ch.close()


def run(users: int, hosts: int, changes: int) -> dict:
    base = Path(tempfile.mkdtemp(prefix="step-ssh-scim-bench."))
    s = Server(base, heartbeat=60.0)
    scim_port = free_port()
    cfg_path = s.dir / "server.yaml"
    cfg = yaml.safe_load(cfg_path.read_text()) or {}
    cfg["scim_listen"] = f"127.0.0.1:{scim_port}"
    cfg_path.write_text(yaml.safe_dump(cfg))
    s.start()
    watchers: list[Watcher] = []
    try:
        token = s.admin.CreateScimToken(pb.ScimTokenRequest(name="bench"), timeout=10).token
        http = httpx.Client(base_url=f"https://127.0.0.1:{scim_port}/scim/v2", timeout=60,
                            verify=ssl.create_default_context(cafile=str(s.dir / "ca.crt")),
                            headers={"Authorization": f"Bearer {token}", "Accept": "application/scim+json"})
        t = time.perf_counter()
        ids = []
        for i in range(users + 1):  # the last one is the spare that comes and goes
            r = http.post("/Users", json={"schemas": [USER], "userName": f"user{i:06d}@corp.example",
                                          "name": {"givenName": "U", "familyName": str(i)}, "active": True})
            r.raise_for_status()
            ids.append(r.json()["id"])
        spare = ids.pop()
        r = http.post("/Groups", json={"schemas": [GROUP], "displayName": "Engineering",
                                       "members": [{"value": i} for i in ids]})
        r.raise_for_status()
        gid = r.json()["id"]
        provision_s = time.perf_counter() - t
        group = s.admin.ListGroups(pb.Empty(), timeout=30).groups[0].name
        spare_name = next(u.name for u in s.admin.ListUsers(pb.Empty(), timeout=30).users
                          if u.name not in {m for g in s.admin.ListGroups(pb.Empty(), timeout=30).groups
                                            for m in g.members})
        s.admin.AddGrant(pb.Grant(group=group, tags={"env": "bench"}, access=pb.ACCESS_SSH), timeout=10)

        arrivals: "queue.Queue[tuple[int, float]]" = queue.Queue()
        for i in range(hosts):
            ident = s.enroll(f"host{i:04d}", {"env": "bench"}, base / f"id{i}")
            watchers.append(Watcher(s, ident, arrivals, i))
        for w in watchers:
            if not w.snapshot.wait(60):
                raise RuntimeError("a host got no snapshot")

        def measure(change) -> tuple[float, list[float]]:
            t0 = time.perf_counter()
            change()
            got: dict[int, float] = {}
            deadline = time.monotonic() + 30
            while len(got) < hosts:
                idx, at = arrivals.get(timeout=max(0.01, deadline - time.monotonic()))
                got.setdefault(idx, at)
            lat = [at - t0 for at in got.values()]
            return max(lat), lat

        def scim_change(k: int):
            if k % 2 == 0:
                op = {"op": "add", "path": "members", "value": [{"value": spare}]}
            else:
                op = {"op": "Remove", "path": "members", "value": [{"value": spare}]}
            r = http.patch(f"/Groups/{gid}", json={"schemas": [PATCH], "Operations": [op]})
            if r.status_code not in (200, 204):
                raise RuntimeError(f"PATCH failed: {r.status_code} {r.text}")

        def grpc_change(k: int):
            req = pb.MemberRequest(group=group, user=spare_name)
            (s.admin.AddMember if k % 2 == 0 else s.admin.RemoveMember)(req, timeout=10)

        out = {"users": users, "hosts": hosts, "changes": changes, "provision_seconds": round(provision_s, 2)}
        for name, fn in (("scim", scim_change), ("grpc_admin", grpc_change)):
            every, per_host = [], []
            for k in range(changes):
                m, lat = measure(lambda: fn(k))
                every.append(m)
                per_host += lat
            out[name] = {"to_every_host": summary(every), "per_host": summary(per_host)}
        return out
    finally:
        for w in watchers:
            w.close()
        s.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=1000)
    ap.add_argument("--hosts", type=int, default=20)
    ap.add_argument("--changes", type=int, default=40)
    ap.add_argument("--json", type=Path, default=None, help="also write the raw numbers here")
    a = ap.parse_args()
    print(f"provisioning {a.users} users over SCIM, {a.hosts} watching hosts ...", flush=True)
    r = run(a.users, a.hosts, a.changes)
    print(f"\nprovisioned in {r['provision_seconds']} s; {a.changes} membership changes of one user in a "
          f"{a.users}-member group granted on all {a.hosts} hosts\n")
    print("| path | p50 | p90 | p99 | max | target | result |")
    print("|---|---:|---:|---:|---:|---|---|")
    for name, label in (("scim", "SCIM PATCH → delta at every host"),
                        ("grpc_admin", "baseline: admin gRPC AddMember/RemoveMember → every host")):
        e = r[name]["to_every_host"]
        ok = e["p99_ms"] <= TARGET_S * 1000
        target = "≤ 1 s" if name == "scim" else ""
        result = ("PASS" if ok else "MISS") if name == "scim" else ""
        print(f"| {label} | {e['p50_ms']} ms | {e['p90_ms']} ms | {e['p99_ms']} ms | {e['max_ms']} ms "
              f"| {target} | {result} |")
    overhead = r["scim"]["to_every_host"]["p50_ms"] - r["grpc_admin"]["to_every_host"]["p50_ms"]
    print(f"\nSCIM's own cost (p50 difference to the baseline): {overhead:.1f} ms")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
