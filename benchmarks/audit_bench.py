#!/usr/bin/env python3
"""Benchmark the audit pipeline (docs/audit.md, issue 7).

    /tmp/venv/bin/python benchmarks/audit_bench.py [--quick] [--events N] [--json OUT]

Needs root (part 2 runs in a test host). Nothing outside temporary
directories and the test host changes.

1. **Spool -> control plane**: N events (default 100,000) in one host's spool
   (written with the C writer, as pam_stepssh.so writes them); a real
   `step-ssh agent` process ships them to a real `step-ssh-server run`
   (mTLS, SQLite, loopback), batch sizes 100 / 500 (the default) / 2000.
   Timed from the agent's start until the control plane's database holds
   all N; events/s over the shipping itself (first to last event stored) and
   over the whole run (including the agent's start and first connection).
2. **The PAM session phase writing an event**:
   a. in-process, the exact C path pam_stepssh.so runs for a session event
      (build the JSON line: ULID, time, host, items; then lock, append,
      fdatasync and the system log copy), N x on the machine's disk;
   b. whole `pam_open_session` calls through libpam (python-pam) in a test
      host, pam_stepssh with and without `noaudit`, alternating: the
      difference of medians is what writing the event costs a login.
"""
from __future__ import annotations

import argparse
import json
import platform
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE.parent))


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))]


def stats_us(ts_ns: list[int]) -> dict:
    us = [t / 1000 for t in ts_ns]
    return {"median_us": round(statistics.median(us), 1), "p99_us": round(pct(us, 0.99), 1),
            "mean_us": round(statistics.fmean(us), 1), "n": len(us)}


# ---- 1. spool -> control plane ---------------------------------------------------------

def fill(spool: Path, n: int) -> None:
    from step_ssh import audit
    chunk = 2000
    for start in range(0, n, chunk):
        ids, why = audit.append_many(spool, [("session_open", {
            "result": "success", "service": "sshd", "user": f"u{i:06d}", "uid": 200000 + i, "access": "ssh",
            "revision": 42, "rhost": "192.0.2.17", "ruser": None, "tty": "ssh", "pid": 10000 + i % 50000,
            "session_id": "01JBENCHBENCHBENCHBENCHBEN", "home_created": False})
            for i in range(start, min(n, start + chunk))], spool_max=1 << 40, syslog=False)
        assert ids, why


def shipping(n: int, batch: int, base: Path) -> dict:
    from agent_helpers import AgentProc, identity_files
    from server_fixtures import RunningServer
    s = RunningServer(base)
    s.start()
    agent = None
    try:
        h = s.enroll("bench1")
        state = base / "state"
        fill(state / "spool", n)
        spool_bytes = sum(p.stat().st_size for p in (state / "spool").glob("events*"))
        agent = AgentProc(base, {"server": s.address, "identity": identity_files(h.identity),
                                 "state_dir": str(state), "status_file": str(base / "status.json"),
                                 "audit": {"batch_size": batch, "poll_interval": 0.05}})
        db = s.dir / "server.db"
        t0 = time.perf_counter()
        agent.start()
        first = None
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
            try:
                have = conn.execute("SELECT COUNT(*) FROM audit").fetchone()[0]
            finally:
                conn.close()
            if have and first is None:
                first = time.perf_counter()
            if have >= n:
                break
            time.sleep(0.01)
        else:
            raise RuntimeError(f"only {have} of {n} stored in time")
        end = time.perf_counter()
        st = agent.wait(lambda st: st["audit"]["backlog_bytes"] == 0 and st["audit"]["backlog_files"] == 0,
                        timeout=60, what="spool empty")
        rss = None
        try:
            for line in Path(f"/proc/{agent.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    rss = int(line.split()[1]) // 1024
        except OSError:
            pass
        return {"events": n, "batch": batch, "spool_mb": round(spool_bytes / 2**20, 1),
                "total_s": round(end - t0, 2), "shipping_s": round(end - first, 2),
                "events_per_s": round(n / (end - first)), "events_per_s_total": round(n / (end - t0)),
                "batches": st["audit"]["counters"]["batches"], "agent_peak_rss_mb": rss}
    finally:
        if agent is not None:
            agent.stop()
        s.close()


# ---- 2a. the C write path -------------------------------------------------------------------

def c_write_path(n: int, base: Path) -> dict:
    """What pam_stepssh.so's emit() does for a session_open, timed per event."""
    from step_ssh._native import ffi, lib
    spool = str(base / "spool").encode()
    why = ffi.new("char[512]")
    j = ffi.new("struct ss_json *")
    out = {}
    for label, fn in (("append + fdatasync + syslog", lib.ss_audit_record),
                      ("append + fdatasync", lib.ss_spool_append)):
        ts = []
        for i in range(n + 50):
            t = time.perf_counter_ns()
            lib.ss_event_begin(j, b"session_open", ffi.NULL)
            lib.ss_json_str(j, b"result", b"success")
            lib.ss_json_str(j, b"service", b"sshd")
            lib.ss_json_str(j, b"user", b"bob")
            lib.ss_json_int(j, b"uid", 70002)
            lib.ss_json_str(j, b"access", b"ssh")
            lib.ss_json_int(j, b"revision", 42)
            lib.ss_json_str(j, b"rhost", b"192.0.2.17")
            lib.ss_json_str(j, b"ruser", ffi.NULL)
            lib.ss_json_str(j, b"tty", b"ssh")
            lib.ss_json_int(j, b"pid", 4242)
            lib.ss_json_str(j, b"session_id", b"01JBENCHBENCHBENCHBENCHBEN")
            lib.ss_json_int(j, b"audit_session", lib.ss_audit_session())
            lib.ss_json_bool(j, b"home_created", 0)
            lib.ss_json_end(j)
            rc = fn(spool, 0, j, why, 512)
            dt = time.perf_counter_ns() - t
            assert rc == 0, ffi.string(why)
            if i >= 50:
                ts.append(dt)
        out[label] = stats_us(ts)
    return out


# ---- 2b. whole PAM session calls in a test host -----------------------------------------------

_PAM_INNER = r"""
import json, sys, time, pam
n = int(sys.argv[1])
res = {"audit": {"open": [], "close": []}, "noaudit": {"open": [], "close": []}}
for i in range(n + 20):
    for svc in res:  # alternating: load changes hit both alike
        # a PAM handle per session, as sshd has (libpam keeps per-handle data
        # that grows with every call on one handle)
        p = pam.pam()
        assert p.authenticate("bob", "", service="stepssh-bench-" + svc, call_end=False), p.reason
        t = time.perf_counter_ns(); rc1 = p.open_session(); t1 = time.perf_counter_ns()
        rc2 = p.close_session(); t2 = time.perf_counter_ns()
        p.end()
        assert rc1 == 0 and rc2 == 0, (rc1, rc2)
        if i >= 20:
            res[svc]["open"].append(t1 - t); res[svc]["close"].append(t2 - t1)
print(json.dumps(res))
"""

_STACK = """\
auth     required pam_permit.so
account  required pam_permit.so
session  required pam_stepssh.so service={svc}:ssh {extra}
"""


def pam_sessions(n: int) -> dict:
    from login_fixtures import Keys, LoginHost, unavailable
    why = unavailable()
    if why:
        return {"skipped": why}
    keys = Keys()
    lh = LoginHost(keys)
    try:
        lh.start()
        h = lh.host
        h.run("mkdir -p /home/bob && chown 70002:70100 /home/bob && chmod 700 /home/bob", check=True)
        for svc, extra in (("stepssh-bench-audit", ""), ("stepssh-bench-noaudit", "noaudit")):
            h.write(f"/etc/pam.d/{svc}", _STACK.format(svc=svc, extra=extra))
        before = len(lh.events())
        r = h.run([sys.executable, "-c", _PAM_INNER, str(n)], timeout=900)
        if r.returncode != 0:
            raise RuntimeError(r.stderr)
        raw = json.loads(r.stdout)
        written = len(lh.events()) - before
        out = {k: {phase: stats_us(v) for phase, v in d.items()} for k, d in raw.items()}
        out["events_written"] = written
        out["open_median_diff_us"] = round(out["audit"]["open"]["median_us"] - out["noaudit"]["open"]["median_us"], 1)
        return out
    finally:
        lh.close()
        keys.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="20k events, one batch size, fewer PAM calls")
    ap.add_argument("--events", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None, help="also write results here")
    args = ap.parse_args()
    n = args.events or (20_000 if args.quick else 100_000)
    batches = [500] if args.quick else [100, 500, 2000]
    n_write = 500 if args.quick else 3000
    n_pam = 300 if args.quick else 2000
    results: dict = {"machine": platform.node(), "kernel": platform.release(), "shipping": [],
                     "cpus": len(__import__("os").sched_getaffinity(0))}
    for b in batches:
        with tempfile.TemporaryDirectory(prefix="audit-bench-") as d:
            results["shipping"].append(shipping(n, b, Path(d)))
            print(f"shipped: {results['shipping'][-1]}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="audit-bench-", dir="/var/tmp") as d:
        results["c_write"] = c_write_path(n_write, Path(d))
    results["pam_session"] = pam_sessions(n_pam)

    print(f"\n### Audit pipeline ({results['machine']}, {results['kernel']}, {results['cpus']} CPUs)\n")
    print("| spool -> control plane | events | spool | batch | shipping | events/s | incl. agent start | agent peak RSS |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results["shipping"]:
        print(f"| one host, loopback mTLS | {r['events']:,} | {r['spool_mb']} MB | {r['batch']} | {r['shipping_s']} s | "
              f"**{r['events_per_s']:,}** | {r['events_per_s_total']:,}/s in {r['total_s']} s | "
              f"{r['agent_peak_rss_mb']} MB |")
    print("\n| writing one session event | median | p99 | n |")
    print("|---|---|---|---|")
    for label, v in results["c_write"].items():
        print(f"| C path of pam_stepssh.so: build + {label} | {v['median_us']} µs | {v['p99_us']} µs | {v['n']} |")
    ps = results["pam_session"]
    if "skipped" not in ps:
        for svc in ("audit", "noaudit"):
            for phase in ("open", "close"):
                v = ps[svc][phase]
                print(f"| `pam_{phase}_session`, pam_stepssh {'with events' if svc == 'audit' else '`noaudit`'} "
                      f"(test host) | {v['median_us']} µs | {v['p99_us']} µs | {v['n']} |")
        print(f"\nwriting the event adds {ps['open_median_diff_us']} µs (median) to pam_open_session; "
              f"{ps['events_written']} events written")
    else:
        print(f"\nPAM session part skipped: {ps['skipped']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
