#!/usr/bin/env python3
"""Agent benchmarks (issue 4): revocation latency, a 100k-user snapshot, fan-out.

    /tmp/venv/bin/python benchmarks/agent_bench.py                 # all three, full size
    /tmp/venv/bin/python benchmarks/agent_bench.py --quick         # smaller, for a smoke run
    /tmp/venv/bin/python benchmarks/agent_bench.py --only revocation --changes 400 --json OUT

Everything is real and on loopback: `step-ssh-server run` as a subprocess
(its own temporary directory), `step-ssh agent` as a subprocess with a files
identity and its state in a temporary directory (it never touches
/var/lib/step-ssh), and lookups through the C reader the NSS module uses
(`step_ssh.native.NssClient` on the agent's cache file).

1. **Revocation latency.** A host whose view holds `--view-users` users (group
   `rev`, granted ssh). Each change adds or removes one user of `rev` through
   the admin API; the clock starts before the admin call and stops when
   getpwnam through the C reader on the agent's cache agrees (polled every
   0.5 ms). p50/p99 over `--changes` changes, revocations separately.
2. **Full snapshot of 100k users.** The directory (`--snapshot-users` users,
   1,000 teams of 100, all in `everyone`, granted ssh) is imported; a fresh
   agent enrolls and syncs. Reported: the agent's own apply time for the
   snapshot (decode + validate + build + publish + persist, `last_apply` in its
   status), wall time from agent start to the published cache, and the agent
   process's peak RSS (VmHWM). Then one revocation on that big view.
3. **Fan-out.** `--watchers` hosts are enrolled, each watched by a
   lightweight in-process watcher (one grpc.aio stream per host, same decoding,
   delta application and cache publishing code as the agent, caches on tmpfs).
   One group change at the control plane must reach all of them; repeated
   `--fanout-rounds` times. Reported: per-host latency from the admin call to
   "delta received" and to "cache published", p50/p99/max.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc  # noqa: E402
import yaml  # noqa: E402

from step_ssh import pki, rpc  # noqa: E402
from step_ssh.agent.publish import publish_view  # noqa: E402
from step_ssh.agent.rawview import decode_event  # noqa: E402
from step_ssh.cache.local import LocalAccounts  # noqa: E402
from step_ssh.native import NssClient  # noqa: E402
from step_ssh.proto import stepssh_pb2 as pb  # noqa: E402
from step_ssh.proto import stepssh_pb2_grpc as pbg  # noqa: E402

PY = sys.executable


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summary(xs: list[float]) -> dict:
    return {"n": len(xs), "p50_ms": round(pct(xs, 50) * 1000, 2), "p90_ms": round(pct(xs, 90) * 1000, 2),
            "p99_ms": round(pct(xs, 99) * 1000, 2), "max_ms": round(max(xs) * 1000, 2) if xs else None,
            "mean_ms": round(statistics.fmean(xs) * 1000, 2) if xs else None}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vm_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def vm_hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# ---- control plane ---------------------------------------------------------------------

class Server:
    def __init__(self, base: Path, heartbeat: float = 15.0):
        self.dir = base / "server"
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log = base / "server.log"
        r = subprocess.run([PY, "-m", "step_ssh.server.cli", "init", "--dir", str(self.dir), "--listen",
                            self.address, "--json"], capture_output=True, text=True, check=True)
        info = json.loads(r.stdout)
        self.fingerprint = info["ca_fingerprint"]
        self.ca_pem = (self.dir / "ca.crt").read_bytes()
        prof = yaml.safe_load(Path(info["admin_profile"]).read_text())
        self._admin_creds = (prof["ca"].encode(), prof["cert"].encode(), prof["key"].encode())
        self.heartbeat = heartbeat
        self.proc: Optional[subprocess.Popen] = None
        self._ch: Optional[grpc.Channel] = None

    def start(self) -> None:
        f = open(self.log, "ab")
        self.proc = subprocess.Popen([PY, "-m", "step_ssh.server.cli", "run", "--dir", str(self.dir), "--listen",
                                      self.address, "--heartbeat", str(self.heartbeat), "--log-level", "warning"],
                                     stdout=f, stderr=f)
        f.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(self.log.read_text())
                time.sleep(0.05)
        raise RuntimeError("server did not start")

    def stop(self) -> None:
        if self._ch is not None:
            self._ch.close()
            self._ch = None
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    @property
    def admin(self) -> pbg.AdminServiceStub:
        if self._ch is None:
            self._ch = rpc.channel(self.address, rpc.mtls_credentials(*self._admin_creds))
        return pbg.AdminServiceStub(self._ch)

    def enroll(self, hostname: str, tags: dict, dest: Path) -> dict:
        tok = self.admin.CreateEnrollToken(pb.TokenRequest(hostname=hostname, tags=tags, ttl_seconds=3600),
                                           timeout=30).token
        key = pki.new_private_key()
        ch = rpc.channel(self.address, rpc.enroll_credentials(self.ca_pem))
        try:
            r = pbg.HostServiceStub(ch).Enroll(pb.EnrollRequest(token=tok, csr_pem=pki.make_csr(key, hostname)),
                                               timeout=60)
        finally:
            ch.close()
        dest.mkdir(parents=True, exist_ok=True)
        (dest / "host.key").write_bytes(key)
        (dest / "host.key").chmod(0o600)
        (dest / "host.crt").write_bytes(r.certificate_pem)
        (dest / "ca.crt").write_bytes(r.ca_pem)
        return {"type": "files", "cert": str(dest / "host.crt"), "key": str(dest / "host.key"),
                "ca": str(dest / "ca.crt")}


class AgentProc:
    def __init__(self, base: Path, server: Server, identity: dict, name: str):
        self.dir = base / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.status_file = self.dir / "status.json"
        self.cache = self.dir / "state" / "cache"
        cfg = {"server": server.address, "identity": identity, "state_dir": str(self.dir / "state"),
               "status_file": str(self.status_file), "log_level": "warning", "backoff_max": 2}
        (self.dir / "agent.yaml").write_text(yaml.safe_dump(cfg))
        self.proc: Optional[subprocess.Popen] = None
        self.started = 0.0

    def start(self) -> None:
        f = open(self.dir / "agent.log", "ab")
        self.started = time.perf_counter()
        self.proc = subprocess.Popen([PY, "-m", "step_ssh.cli", "agent", "--config", str(self.dir / "agent.yaml")],
                                     stdout=f, stderr=f)
        f.close()

    def status(self) -> Optional[dict]:
        try:
            return json.loads(self.status_file.read_text())
        except (OSError, ValueError):
            return None

    def wait(self, pred, timeout: float = 120.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.status()
            if st is not None:
                try:
                    if pred(st):
                        return st
                except (KeyError, TypeError):
                    pass
            if self.proc.poll() is not None:
                raise RuntimeError((self.dir / "agent.log").read_text())
            time.sleep(0.01)
        raise RuntimeError(f"agent: timed out; status {st}\n{(self.dir / 'agent.log').read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# ---- 1. revocation latency ----------------------------------------------------------------

def bench_revocation(base: Path, changes: int, view_users: int) -> dict:
    s = Server(base / "rev")
    s.start()
    agent = None
    try:
        users = [pb.DirectoryUser(name=f"r{i:05d}", active=True) for i in range(view_users)]
        s.admin.ImportDirectory(pb.DirectoryImport(users=users, groups=[
            pb.DirectoryGroup(name="rev", members=[u.name for u in users])]), timeout=300)
        s.admin.AddGrant(pb.Grant(group="rev", tags={"env": "rev"}, access=pb.ACCESS_SSH), timeout=30)
        ident = s.enroll("rev1", {"env": "rev"}, base / "rev" / "id")
        agent = AgentProc(base / "rev", s, ident, "agent")
        agent.start()
        agent.wait(lambda st: st["connected"] and st["cache"] and st["cache"]["users"] == view_users)
        nss = NssClient(agent.cache)
        revokes, grants = [], []
        targets = [u.name for u in users[: max(1, min(50, view_users))]]
        for i in range(changes):
            name = targets[(i // 2) % len(targets)]
            revoke = i % 2 == 0
            t0 = time.perf_counter()
            if revoke:
                s.admin.RemoveMember(pb.MemberRequest(group="rev", user=name), timeout=30)
            else:
                s.admin.AddMember(pb.MemberRequest(group="rev", user=name), timeout=30)
            while True:
                present = nss.getpwnam(name) is not None
                if present != revoke:
                    break
                if time.perf_counter() - t0 > 30:
                    raise RuntimeError(f"change {i} not visible after 30 s")
                time.sleep(0.0005)
            (revokes if revoke else grants).append(time.perf_counter() - t0)
        st = agent.status()
        return {"changes": changes, "view_users": view_users, "all": summary(revokes + grants),
                "revocations": summary(revokes), "grants": summary(grants),
                "agent_counters": st["counters"], "agent_peak_rss_mb": round(vm_hwm_mb(agent.proc.pid), 1)}
    finally:
        if agent:
            agent.stop()
        s.stop()


# ---- 2. 100k-user snapshot ---------------------------------------------------------------

def bench_snapshot(base: Path, n_users: int, team_size: int = 100) -> dict:
    s = Server(base / "snap")
    s.start()
    agent = None
    try:
        t = time.perf_counter()
        users = [pb.DirectoryUser(name=f"user{i:06d}", gecos=f"User {i}", email=f"user{i}@example.com",
                                  principals=[f"user{i:06d}", f"user{i}@example.com"], active=True)
                 for i in range(n_users)]
        teams = [pb.DirectoryGroup(name=f"team{j:04d}", members=[u.name for u in users[j:j + team_size]])
                 for j in range(0, n_users, team_size)]
        everyone = pb.DirectoryGroup(name="everyone", members=[u.name for u in users])
        s.admin.ImportDirectory(pb.DirectoryImport(users=users, groups=teams + [everyone]), timeout=1800)
        s.admin.AddGrant(pb.Grant(group="everyone", tags={"env": "big"}, access=pb.ACCESS_SSH), timeout=30)
        import_s = time.perf_counter() - t
        ident = s.enroll("big1", {"env": "big"}, base / "snap" / "id")
        view = s.admin.GetHostView(pb.NameRef(name="big1"), timeout=600)
        wire = len(pb.WatchEvent(snapshot=pb.Snapshot(view=view)).SerializeToString())
        del view
        agent = AgentProc(base / "snap", s, ident, "agent")
        agent.start()
        st = agent.wait(lambda x: x["cache"] and x["cache"]["users"] == n_users, timeout=900)
        wall = time.perf_counter() - agent.started
        rss = vm_hwm_mb(agent.proc.pid)
        time.sleep(1.0)
        steady = vm_rss_mb(agent.proc.pid)
        out = {"users": n_users, "groups_in_view": st["cache"]["groups"], "cache_bytes": st["cache"]["bytes"],
               "snapshot_wire_bytes": wire, "apply_seconds": st["last_apply"]["seconds"],
               "apply_cpu_seconds": st["last_apply"]["cpu_seconds"],
               "publish_seconds": st["last_publish_seconds"],
               "agent_start_to_published_seconds": round(wall, 3), "agent_peak_rss_mb": round(rss, 1),
               "agent_rss_after_mb": round(steady, 1),
               "directory_import_seconds": round(import_s, 1)}
        # one revocation on the big view: delta -> full rebuild of the 100k cache
        nss = NssClient(agent.cache)
        victim = "user000042"
        t0 = time.perf_counter()
        rev = s.admin.RemoveMember(pb.MemberRequest(group="everyone", user=victim), timeout=60).revision
        while nss.getpwnam(victim) is not None:
            time.sleep(0.001)
        out["revocation_on_100k_view_seconds"] = round(time.perf_counter() - t0, 3)
        st = agent.wait(lambda x: x["revision"] >= rev)
        out["delta_apply_seconds"] = st["last_apply"]["seconds"]
        out["delta_apply_cpu_seconds"] = st["last_apply"]["cpu_seconds"]
        out["agent_peak_rss_mb_after_delta"] = round(vm_hwm_mb(agent.proc.pid), 1)
        return out
    finally:
        if agent:
            agent.stop()
        s.stop()


# ---- 3. fan-out ----------------------------------------------------------------------

class Watcher:
    """One host's stream, applying and publishing like the agent (no status file)."""

    def __init__(self, idx: int, address: str, ident: dict, cache_dir: Path):
        self.idx = idx
        self.address = address
        self.creds = rpc.mtls_credentials(Path(ident["ca"]).read_bytes(), Path(ident["cert"]).read_bytes(),
                                          Path(ident["key"]).read_bytes())
        self.cache = cache_dir / f"h{idx:04d}.cache"
        self.view = None
        self.received: dict[int, float] = {}
        self.published: dict[int, float] = {}
        self.ready = asyncio.Event()

    async def run(self, local: LocalAccounts) -> None:
        ch = rpc.aio_channel(self.address, self.creds)
        try:
            watch = ch.unary_stream("/stepssh.v1.HostService/Watch",
                                    request_serializer=pb.WatchRequest.SerializeToString,
                                    response_deserializer=None)
            call = watch(pb.WatchRequest(since_revision=0, agent_version="bench"))
            async for raw in call:
                now = time.perf_counter()
                kind, payload = decode_event(raw)
                if kind == "snapshot":
                    self.view = payload[0]
                elif kind == "delta":
                    self.received[payload.revision] = now
                    self.view = self.view.apply_delta(payload)
                else:
                    continue
                publish_view(self.view, self.cache, local, 1000)
                self.published[self.view.revision] = time.perf_counter()
                self.ready.set()
        finally:
            await ch.close()


async def _fanout(server: Server, idents: list[dict], cache_dir: Path, rounds: int) -> dict:
    local = LocalAccounts.load()
    watchers = [Watcher(i, server.address, ident, cache_dir) for i, ident in enumerate(idents)]
    tasks = [asyncio.create_task(w.run(local)) for w in watchers]
    t = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(w.ready.wait() for w in watchers)), timeout=600)
    connect_s = time.perf_counter() - t
    await asyncio.sleep(1.0)
    recv, pub, per_round = [], [], []
    for r in range(rounds):
        user = f"fan{(r // 2) % 5:02d}"  # removed in one round, added back in the next
        t0 = time.perf_counter()
        if r % 2 == 0:
            res = await asyncio.to_thread(server.admin.RemoveMember, pb.MemberRequest(group="fan", user=user),
                                          timeout=60)
        else:
            res = await asyncio.to_thread(server.admin.AddMember, pb.MemberRequest(group="fan", user=user),
                                          timeout=60)
        rev = res.revision
        deadline = time.perf_counter() + 120
        while any(rev not in w.published for w in watchers):
            if time.perf_counter() > deadline:
                missing = sum(rev not in w.published for w in watchers)
                raise RuntimeError(f"round {r}: {missing} watchers never got revision {rev}")
            await asyncio.sleep(0.005)
        rr = [w.received[rev] - t0 for w in watchers]
        pp = [w.published[rev] - t0 for w in watchers]
        recv += rr
        pub += pp
        per_round.append({"revision": rev, "received_p99_ms": round(pct(rr, 99) * 1000, 1),
                          "published_max_ms": round(max(pp) * 1000, 1)})
        await asyncio.sleep(0.5)
    for t_ in tasks:
        t_.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return {"connect_all_seconds": round(connect_s, 2), "received": summary(recv), "published": summary(pub),
            "rounds": per_round}


def bench_fanout(base: Path, n_watchers: int, rounds: int) -> dict:
    s = Server(base / "fan")
    s.start()
    try:
        users = [pb.DirectoryUser(name=f"fan{i:02d}", active=True) for i in range(20)]
        s.admin.ImportDirectory(pb.DirectoryImport(users=users, groups=[
            pb.DirectoryGroup(name="fan", members=[u.name for u in users])]), timeout=60)
        s.admin.AddGrant(pb.Grant(group="fan", tags={"fleet": "all"}, access=pb.ACCESS_SSH), timeout=30)
        t = time.perf_counter()
        idents = [s.enroll(f"f{i:04d}", {"fleet": "all"}, base / "fan" / "ids" / f"h{i:04d}")
                  for i in range(n_watchers)]
        enroll_s = time.perf_counter() - t
        shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else base
        cache_dir = Path(tempfile.mkdtemp(prefix="step-ssh-fanout-", dir=shm))
        try:
            out = asyncio.run(_fanout(s, idents, cache_dir, rounds))
        finally:
            shutil.rmtree(cache_dir, ignore_errors=True)
        out.update({"watchers": n_watchers, "rounds_n": rounds, "enroll_seconds": round(enroll_s, 1)})
        return out
    finally:
        s.stop()


# ---- main ----------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["revocation", "snapshot", "fanout"], action="append")
    ap.add_argument("--quick", action="store_true", help="10k-user snapshot, 100 watchers, 100 changes")
    ap.add_argument("--changes", type=int, default=None)
    ap.add_argument("--view-users", type=int, default=1000)
    ap.add_argument("--snapshot-users", type=int, default=None)
    ap.add_argument("--watchers", type=int, default=None)
    ap.add_argument("--fanout-rounds", type=int, default=6)
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    changes = args.changes or (100 if args.quick else 400)
    snap_users = args.snapshot_users or (10_000 if args.quick else 100_000)
    watchers = args.watchers or (100 if args.quick else 1000)
    parts = args.only or ["revocation", "snapshot", "fanout"]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    results: dict = {"machine": {"cpus": os.cpu_count(), "kernel": platform.release(),
                                 "load_avg_at_start": os.getloadavg(), "python": platform.python_version(),
                                 "grpc": grpc.__version__}}
    base = Path(tempfile.mkdtemp(prefix="step-ssh-agent-bench-"))
    try:
        if "revocation" in parts:
            print(f"revocation latency: {changes} changes, view of {args.view_users} users ...", flush=True)
            r = results["revocation"] = bench_revocation(base, changes, args.view_users)
            print(f"  all changes:  p50 {r['all']['p50_ms']} ms  p99 {r['all']['p99_ms']} ms  "
                  f"max {r['all']['max_ms']} ms")
            print(f"  revocations:  p50 {r['revocations']['p50_ms']} ms  p99 {r['revocations']['p99_ms']} ms "
                  f"(target p99 <= 500 ms)")
        if "snapshot" in parts:
            print(f"full snapshot: {snap_users} users ...", flush=True)
            r = results["snapshot"] = bench_snapshot(base, snap_users)
            print(f"  agent apply {r['apply_seconds']} s (cpu {r['apply_cpu_seconds']} s; target <= 2 s), peak RSS {r['agent_peak_rss_mb']} MB "
                  f"(target <= 100 MB); start->published {r['agent_start_to_published_seconds']} s; "
                  f"cache {r['cache_bytes'] / 1e6:.1f} MB; revocation on this view "
                  f"{r['revocation_on_100k_view_seconds']} s")
        if "fanout" in parts:
            print(f"fan-out: {watchers} watchers, {args.fanout_rounds} group changes ...", flush=True)
            r = results["fanout"] = bench_fanout(base, watchers, args.fanout_rounds)
            print(f"  delta received: p50 {r['received']['p50_ms']} ms p99 {r['received']['p99_ms']} ms; "
                  f"cache published: p50 {r['published']['p50_ms']} ms p99 {r['published']['p99_ms']} ms "
                  f"max {r['published']['max_ms']} ms (target p99 <= 3 s)")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    results["machine"]["load_avg_at_end"] = os.getloadavg()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
