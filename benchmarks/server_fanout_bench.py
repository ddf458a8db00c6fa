"""Control plane fan-out: one `step-ssh-server run` process, N hosts watching
over real mTLS on loopback (lightweight grpc.aio watchers in this process,
each with its own enrolled identity and connection), one group change at a
time; measures change committed -> delta received by every watcher.

    python benchmarks/server_fanout_bench.py --watchers 1000 --changes 20

The watchers share this process's CPU with nothing else, but the server and
the client process share the machine's cores, so the numbers include that
contention.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from server_fixtures import RunningServer  # noqa: E402
from step_ssh import pki, rpc  # noqa: E402
from step_ssh.proto import stepssh_pb2 as pb  # noqa: E402
from step_ssh.proto import stepssh_pb2_grpc as pbg  # noqa: E402


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


async def main_async(a) -> None:
    base = Path(tempfile.mkdtemp(prefix="step-ssh-fanout-"))
    s = RunningServer(base, heartbeat=15.0)
    s.start()
    try:
        adm = s.admin
        t0 = time.perf_counter()
        users = [pb.DirectoryUser(name=f"u{i:05d}", active=True) for i in range(a.users)]
        adm.ImportDirectory(pb.DirectoryImport(users=users, groups=[
            pb.DirectoryGroup(name="team", members=[u.name for u in users[: a.users // 2]])]), timeout=120)
        adm.AddGrant(pb.Grant(group="team", tags={"env": "prod"}, access=pb.ACCESS_SSH), timeout=10)
        # identities: one token + CSR per host (key generation is the slow part)
        idents = []
        ch = rpc.channel(s.address, rpc.enroll_credentials(s.ca_pem))
        enroll = pbg.HostServiceStub(ch).Enroll
        for i in range(a.watchers):
            tok = s.token(f"h{i:05d}", {"env": "prod", "rack": f"r{i % 20}"})
            key = pki.new_private_key()
            r = enroll(pb.EnrollRequest(token=tok, csr_pem=pki.make_csr(key, "h")), timeout=30)
            idents.append((key, r.certificate_pem))
        ch.close()
        t_setup = time.perf_counter() - t0

        received: list[dict] = [dict() for _ in idents]  # revision -> monotonic time
        ready = asyncio.Event()
        connected = 0

        async def watcher(i: int, key: bytes, cert: bytes) -> None:
            nonlocal connected
            creds = rpc.mtls_credentials(s.ca_pem, cert, key)
            async with rpc.aio_channel(s.address, creds) as chan:
                call = pbg.HostServiceStub(chan).Watch(pb.WatchRequest(since_revision=0))
                first = True
                async for ev in call:
                    if first:
                        first = False
                        connected += 1
                        if connected == len(idents):
                            ready.set()
                        continue
                    if ev.WhichOneof("event") == "delta":
                        received[i][ev.delta.revision] = time.monotonic()

        t0 = time.perf_counter()
        tasks = [asyncio.create_task(watcher(i, k, c)) for i, (k, c) in enumerate(idents)]
        await asyncio.wait_for(ready.wait(), timeout=600)
        t_connect = time.perf_counter() - t0

        loop = asyncio.get_running_loop()
        lat_all, lat_p50 = [], []
        for n in range(a.changes):
            user = f"u{a.users // 2 + n:05d}"
            t_start = time.monotonic()
            rev = (await loop.run_in_executor(None, lambda: adm.AddMember(
                pb.MemberRequest(group="team", user=user), timeout=30))).revision
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not all(rev in r for r in received):
                await asyncio.sleep(0.005)
            got = [r[rev] - t_start for r in received if rev in r]
            if len(got) < len(received):
                print(f"change {n}: only {len(got)}/{len(received)} watchers got revision {rev}", file=sys.stderr)
            lat_all.append(max(got))
            lat_p50.append(statistics.median(got))
            await asyncio.sleep(a.pause)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        s.close()
    rows = [
        ("setup: import, grant, enroll", f"{t_setup:.1f} s", f"{a.users} users, {a.watchers} hosts"),
        ("all watchers connected (snapshot each)", f"{t_connect:.1f} s", f"{a.watchers} TLS connections"),
        ("change -> all watchers have the delta: p50", f"{statistics.median(lat_all) * 1000:.0f} ms",
         f"{a.changes} changes"),
        ("change -> all watchers have the delta: p99/max", f"{pct(lat_all, 99) * 1000:.0f} ms", ""),
        ("change -> median watcher has it: p50", f"{statistics.median(lat_p50) * 1000:.0f} ms", ""),
    ]
    print(f"step-ssh control plane fan-out: {a.watchers} watchers, {a.users} users in the view "
          f"(python {sys.version.split()[0]}, {os.cpu_count()} cpus)")
    w0 = max(len(r[0]) for r in rows)
    for r in rows:
        print(f"{r[0].ljust(w0)}  {r[1].rjust(9)}  {r[2]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--watchers", type=int, default=1000)
    ap.add_argument("--users", type=int, default=2000)
    ap.add_argument("--changes", type=int, default=20)
    ap.add_argument("--pause", type=float, default=0.2)
    asyncio.run(main_async(ap.parse_args()))


if __name__ == "__main__":
    main()
