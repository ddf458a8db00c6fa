#!/usr/bin/env python3
"""Benchmark libnss_stepssh.so.2 against nss_files holding the same accounts.

    /tmp/venv/bin/python benchmarks/nss_bench.py [--quick] [--json OUT]

Needs root (it starts a test host: a private mount + pid namespace with
overlays over /etc, /var, /home and the library directory, see DESIGN.md
"Testing on a real host, safely"); nothing outside the namespace changes.

Part 1, in-process lookups (benchmarks/nss_timer.c, compiled here with gcc and
run inside the test host, so every call goes through the real glibc NSS code):
for 1k, 10k and 100k managed users, getpwnam_r / getpwuid_r / getgrgid_r /
getgrouplist medians and p99, measured with

  * nsswitch `passwd: files stepssh` / `group: files stepssh`, our cache, the
    local /etc/passwd and /etc/group untouched (the shipped configuration);
  * nsswitch `passwd: stepssh` / `group: stepssh` (glibc dispatch + module,
    without the local-files lookup in front, for attribution);
  * the module's entry points called directly (dlopen, no glibc dispatch);
  * nsswitch `passwd: files` / `group: files` with the very same users and
    groups appended to the test host's /etc/passwd and /etc/group (nss_files;
    time-bounded, it needs milliseconds per lookup at 100k users).

Keys are random hits drawn from all users / all groups. getgrouplist is for a
user in 200 supplementary groups.

Part 2, `id USER` as a whole process, 10k users x 10k groups x 500 members on
average (each user in ~500 groups): median wall time with `hyperfine -N` (or a
perf_counter loop inside the test host when hyperfine is missing), for our
module and, bounded, for nss_files with the same data; plus `id -G USER` and
`id root` to separate group-name lookups and process start-up.

Prints a Markdown table; targets from DESIGN.md's performance table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from step_ssh.cache.local import LocalAccounts, check_against_local
from step_ssh.cache.writer import build, effective_groups
from step_ssh.paths import NSS_MODULE
from step_ssh.testhost import TestHost
from step_ssh.view import HostView

HERE = Path(__file__).resolve().parent
CACHE = "/var/lib/step-ssh/cache"
BASE_UID = 100_000
TEAM_GID = 1_000_000
INIT_GID = 2_000_000
N_INIT_GROUPS = 200

# DESIGN.md, "Performance targets"
T_LOOKUP_NS = 2_000
T_SPEEDUP = 100
T_INITGROUPS_NS = 20_000
T_ID_MS = 3.0

OPS = ["getpwnam", "getpwuid", "getgrgid", "getgrouplist"]
LABEL = {"getpwnam": "getpwnam", "getpwuid": "getpwuid", "getgrgid": "getgrgid",
         "getgrouplist": f"initgroups ({N_INIT_GROUPS} groups)"}
DIRECT = {"getpwnam": "d_getpwnam", "getpwuid": "d_getpwuid", "getgrgid": "d_getgrgid",
          "getgrouplist": "d_initgroups"}


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- data ----

def make_view(users: list[dict], groups: list[dict]) -> HostView:
    """A validated HostView (pydantic checks names, ids and that every member
    is a user); model_validate of 100k users takes a few seconds."""
    return HostView.model_validate({"revision": 1, "users": users, "groups": groups})


def lookup_view(n: int, rng: random.Random) -> tuple[HostView, str]:
    """n users with user-private groups, n/10 ten-member team groups, and
    `bench200`, a member of 200 further groups (each with 4 other members)."""
    names = [f"u{i:06d}" for i in range(n)]
    users = [{"name": nm, "uid": BASE_UID + i, "gid": BASE_UID + i, "gecos": f"Bench User {i}",
              "principals": [nm]} for i, nm in enumerate(names)]
    users.append({"name": "bench200", "uid": BASE_UID + n, "gid": BASE_UID + n,
                  "gecos": "Member of 200 groups", "principals": ["bench200"]})
    groups = [{"name": f"t{j:06d}", "gid": TEAM_GID + j, "members": rng.sample(names, min(10, n))}
              for j in range(max(1, n // 10))]
    groups += [{"name": f"ig{k:03d}", "gid": INIT_GID + k,
                "members": ["bench200"] + rng.sample(names, min(4, n))}
               for k in range(N_INIT_GROUPS)]
    return make_view(users, groups), "bench200"


def id_view(n_users: int, n_groups: int, avg_members: int, rng: random.Random) -> HostView:
    """n_users with user-private groups, n_groups groups whose sizes are
    uniform in [1, 2*avg-1] (mean avg), members drawn at random."""
    names = [f"u{i:06d}" for i in range(n_users)]
    users = [{"name": nm, "uid": BASE_UID + i, "gid": BASE_UID + i, "gecos": f"Bench User {i}",
              "principals": [nm]} for i, nm in enumerate(names)]
    hi = min(2 * avg_members - 1, n_users)
    groups = [{"name": f"g{j:06d}", "gid": TEAM_GID + j,
               "members": rng.sample(names, rng.randint(1, hi))} for j in range(n_groups)]
    return make_view(users, groups)


def check_local(view: HostView) -> None:
    problems = check_against_local(view, LocalAccounts.load())
    if problems:
        raise SystemExit("benchmark data collides with local accounts:\n  " + "\n  ".join(problems[:10]))


def files_text(view: HostView) -> tuple[str, str]:
    """The same accounts as /etc/passwd and /etc/group lines (what nss_files
    would need to answer exactly what the cache answers)."""
    pw = "".join(f"{u.name}:x:{u.uid}:{u.gid}:{u.gecos}:{u.home_dir}:{u.shell}\n" for u in view.users)
    gr = "".join(f"{g.name}:x:{g.gid}:{','.join(g.members)}\n" for g in effective_groups(view))
    return pw, gr


# ------------------------------------------------------------ test host ----

def set_nsswitch(host: TestHost, services: str) -> None:
    out = []
    for line in host.read("/etc/nsswitch.conf").splitlines():
        key = line.split(":", 1)[0].strip()
        if key in ("passwd", "group"):
            line = f"{key}:{' ' * (15 - len(key))}{services}"
        out.append(line)
    host.write("/etc/nsswitch.conf", "\n".join(out) + "\n")


def compile_timer(tmp: Path) -> Path:
    exe = tmp / "nss_timer"
    subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(exe),
                    str(HERE / "nss_timer.c"), "-ldl"], check=True)
    return exe


@dataclass
class Timing:
    median: float
    p99: float
    calls: int
    groups: int = 0

    @classmethod
    def parse(cls, out: str) -> "Timing":
        kv = dict(w.split("=", 1) for w in out.split())
        return cls(float(kv["median_ns"]), float(kv["p99_ns"]), int(kv["calls"]), int(kv["groups"]))


def run_timer(host: TestHost, exe: Path, op: str, keys: Path, max_calls: int, warmup: int,
              budget_ms: int, module: str = "") -> Timing:
    argv = [str(exe), op, str(keys), str(max_calls), str(warmup), str(budget_ms)]
    if module:
        argv.append(module)
    r = host.run(argv, timeout=budget_ms / 1000 * 3 + 300)
    if r.returncode != 0:
        raise RuntimeError(f"nss_timer {op} failed ({r.returncode}): {r.stderr.strip()}")
    return Timing.parse(r.stdout)


def install_cache(host: TestHost, view: HostView, tmp: Path) -> int:
    data = build(view)
    path = tmp / "cache"
    path.write_bytes(data)
    host.run(["install", "-D", "-o", "root", "-g", "root", "-m", "0644", str(path), CACHE], check=True)
    path.unlink()
    return len(data)


def append_files(host: TestHost, view: HostView, tmp: Path) -> None:
    pw, gr = files_text(view)
    (tmp / "passwd.add").write_text(pw)
    (tmp / "group.add").write_text(gr)
    host.run(f"cat {tmp}/passwd.add >> /etc/passwd && cat {tmp}/group.add >> /etc/group", check=True)


# ------------------------------------------------------------ part 1 ----

@dataclass
class LookupRow:
    users: int
    op: str
    chain: Timing          # files stepssh
    only: Timing           # stepssh alone via glibc
    direct: Timing         # module entry point
    files: Timing          # nss_files, same data
    cache_bytes: int = 0


def bench_lookups(sizes: list[int], exe: Path, tmp: Path, quick: bool, rng: random.Random,
                  refs: dict[str, Timing]) -> list[LookupRow]:
    fast_calls, fast_budget = (20_000, 300) if quick else (200_000, 2_000)
    slow_budget = 300 if quick else 3_000
    module = None
    rows: list[LookupRow] = []
    for n in sizes:
        t0 = time.perf_counter()
        view, initu = lookup_view(n, rng)
        check_local(view)
        log(f"[{n} users] view built in {time.perf_counter() - t0:.1f}s "
            f"({len(view.users)} users, {len(effective_groups(view))} groups)")
        k = min(n, 20_000)
        users = rng.sample(view.users, k)
        gids = [g.gid for g in rng.sample(effective_groups(view), k)]
        init = next(u for u in view.users if u.name == initu)
        keyfiles = {"getpwnam": "\n".join(u.name for u in users),
                    "getpwuid": "\n".join(str(u.uid) for u in users),
                    "getgrgid": "\n".join(map(str, gids)),
                    "getgrouplist": f"{init.name} {init.gid}"}
        kp = {}
        for op, text in keyfiles.items():
            kp[op] = tmp / f"keys.{op}"
            kp[op].write_text(text + "\n")

        res: dict[str, dict[str, Timing]] = {"chain": {}, "only": {}, "direct": {}, "files": {}}
        with TestHost() as host:
            host.install_nss_module(NSS_MODULE)
            module = f"{host.libdir}/libnss_stepssh.so.2"
            t0 = time.perf_counter()
            size = install_cache(host, view, tmp)
            log(f"[{n} users] cache {size / 1e6:.1f} MB written in {time.perf_counter() - t0:.1f}s")
            for mode, services in (("chain", "files stepssh"), ("only", "stepssh")):
                set_nsswitch(host, services)
                host.run(["getent", "passwd", users[0].name], check=True)
                for op in OPS:
                    res[mode][op] = run_timer(host, exe, op, kp[op], fast_calls, k, fast_budget)
                    log(f"[{n} users] {services:<14} {op:<13} {res[mode][op]}")
                if mode == "chain" and n == max(sizes):
                    # What glibc costs before our module is even asked, and what
                    # the module's one syscall per call (the freshness stat) costs.
                    (tmp / "keys.root").write_text("root\n")
                    (tmp / "keys.stat").write_text(CACHE + "\n")
                    refs["root"] = run_timer(host, exe, "getpwnam", tmp / "keys.root", fast_calls, 1000, fast_budget)
                    refs["stat"] = run_timer(host, exe, "stat", tmp / "keys.stat", fast_calls, 1000, fast_budget)
                    log(f"[{n} users] reference      {refs}")
            for op in OPS:
                res["direct"][op] = run_timer(host, exe, DIRECT[op], kp[op], fast_calls, k, fast_budget, module)
                log(f"[{n} users] module direct  {op:<13} {res['direct'][op]}")
            # nss_files with the same users: stepssh out of nsswitch, accounts appended.
            append_files(host, view, tmp)
            set_nsswitch(host, "files")
            host.run(["getent", "passwd", users[0].name], check=True)
            for op in OPS:
                res["files"][op] = run_timer(host, exe, op, kp[op], fast_calls, 3, slow_budget)
                log(f"[{n} users] files          {op:<13} {res['files'][op]}")
        for op in OPS:
            g = {res[m][op].groups for m in ("chain", "only", "direct", "files")}
            if op == "getgrouplist" and len(g) != 1:
                raise RuntimeError(f"group counts differ between configurations: {g}")
            rows.append(LookupRow(n, op, res["chain"][op], res["only"][op], res["direct"][op],
                                  res["files"][op], size))
    return rows


# ------------------------------------------------------------ part 2 ----

@dataclass
class IdResult:
    users: int
    groups: int
    avg_members: float
    user: str
    user_groups: int
    cache_bytes: int
    group_file_bytes: int
    runs: int
    median_ms: float
    p99_ms: float
    floor_ms: float                     # `id root` (local account only), same host
    g_median_ms: float                  # `id -G USER`: getpwnam + getgrouplist, no group names
    files_runs: int = 0
    files_median_ms: Optional[float] = None
    files_note: str = ""
    tool: str = ""


def time_process(host: TestHost, tmp: Path, argv: list[str], runs: int, warmup: int) -> tuple[list[float], str]:
    """Wall times in ms of `argv` run inside the test host."""
    if shutil.which("hyperfine"):
        out = str(tmp / "hyperfine.json")
        host.run(["hyperfine", "-N", "--style", "none", "--warmup", str(warmup), "--runs", str(runs),
                  "--export-json", out, " ".join(argv)], check=True, timeout=3600)
        times = json.loads(host.read(out))["results"][0]["times"]
        return [t * 1000 for t in times], "hyperfine -N"
    # Fallback: a timing loop in Python inside the test host (fork/exec per run).
    code = ("import subprocess,sys,time,json\n"
            "argv=json.loads(sys.argv[1]);r=int(sys.argv[2]);w=int(sys.argv[3]);t=[]\n"
            "for i in range(w+r):\n"
            " a=time.perf_counter();subprocess.run(argv,stdout=subprocess.DEVNULL,check=True)\n"
            " b=time.perf_counter()\n"
            " if i>=w:t.append((b-a)*1000)\n"
            "print(json.dumps(t))\n")
    r = host.run([sys.executable, "-c", code, json.dumps(argv), str(runs), str(warmup)], check=True, timeout=3600)
    return json.loads(r.stdout), "python perf_counter loop"


def p99(xs: list[float]) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(0.99 * (len(s) - 1))))]


def bench_id(n_users: int, n_groups: int, avg: int, tmp: Path, quick: bool,
             rng: random.Random) -> IdResult:
    t0 = time.perf_counter()
    view = id_view(n_users, n_groups, avg, rng)
    check_local(view)
    per_user: dict[str, int] = {}
    for g in view.groups:
        for m in g.members:
            per_user[m] = per_user.get(m, 0) + 1
    total = sum(len(g.members) for g in view.groups)
    # The user whose group count is the median: a typical `id`.
    ranked = sorted(per_user.items(), key=lambda kv: (kv[1], kv[0]))
    user, ngroups = ranked[len(ranked) // 2]
    log(f"[id] view {n_users} users x {n_groups} groups x {total / n_groups:.0f} members built in "
        f"{time.perf_counter() - t0:.1f}s; timing `id {user}` ({ngroups} groups + primary)")
    runs = 30 if quick else 300
    with TestHost() as host:
        host.install_nss_module(NSS_MODULE)
        set_nsswitch(host, "files stepssh")
        t0 = time.perf_counter()
        size = install_cache(host, view, tmp)
        log(f"[id] cache {size / 1e6:.1f} MB written in {time.perf_counter() - t0:.1f}s")
        ours = host.run(["id", user], check=True).stdout
        if len(ours.split("groups=")[1].split(",")) != ngroups + 1:
            raise RuntimeError(f"id {user}: expected {ngroups + 1} groups, got: {ours[:200]}")
        times, tool = time_process(host, tmp, ["id", user], runs, 10)
        floor, _ = time_process(host, tmp, ["id", "root"], runs, 10)
        gonly, _ = time_process(host, tmp, ["id", "-G", user], runs, 10)
        res = IdResult(n_users, n_groups, total / n_groups, user, ngroups + 1, size, 0, len(times),
                       statistics.median(times), p99(times), statistics.median(floor),
                       statistics.median(gonly), tool=tool)
        log(f"[id] stepssh: median {res.median_ms:.2f} ms p99 {res.p99_ms:.2f} ms "
            f"(`id root` floor {res.floor_ms:.2f} ms, `id -G` {res.g_median_ms:.2f} ms) via {tool}")

        append_files(host, view, tmp)
        res.group_file_bytes = (tmp / "group.add").stat().st_size
        set_nsswitch(host, "files")
        limit = 30.0
        t0 = time.perf_counter()
        try:
            theirs = host.run(["id", user], check=True, timeout=limit * 4).stdout
            first = time.perf_counter() - t0
        except subprocess.TimeoutExpired:
            theirs, first = "", None
        if first is None:
            res.files_note = f"skipped: one run did not finish in {limit * 4:.0f} s"
        elif first > limit:
            res.files_runs, res.files_median_ms = 1, first * 1000
            res.files_note = f"one run only (> {limit:.0f} s)"
        else:
            if sorted(theirs.split("groups=")[1].split(",")) != sorted(ours.split("groups=")[1].split(",")):
                raise RuntimeError("id output differs between nss_files and stepssh")
            ftimes, _ = time_process(host, tmp, ["id", user], 3, 0)
            res.files_runs, res.files_median_ms = len(ftimes), statistics.median(ftimes)
        log(f"[id] nss_files: {res.files_median_ms} ms {res.files_note}")
    return res


# ------------------------------------------------------------ report ----

def us(ns: float) -> str:
    if ns >= 1e6:
        return f"{ns / 1e6:,.2f} ms"
    return f"{ns / 1e3:,.2f} µs"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "**MISS**"


def report(rows: list[LookupRow], idr: Optional[IdResult], refs: dict[str, Timing], sizes: list[int]) -> str:
    big = max(sizes)
    out = []
    out.append("| lookup | users | stepssh, `files stepssh` median / p99 | stepssh alone via glibc | "
               "module entry point direct | nss_files median / p99 (calls) | speedup | target | result |")
    out.append("|---|---:|---:|---:|---:|---:|---:|---|---|")
    for r in rows:
        speed = r.files.median / r.chain.median
        target, res = "", ""
        if r.op == "getgrouplist":
            target = f"≤ {T_INITGROUPS_NS / 1000:.0f} µs"
            res = verdict(r.chain.median <= T_INITGROUPS_NS)
        elif r.users == big:
            target = f"≤ {T_LOOKUP_NS / 1000:.0f} µs, ≥ {T_SPEEDUP}×"
            fast, far = r.chain.median <= T_LOOKUP_NS, speed >= T_SPEEDUP
            res = verdict(fast and far)
            if not fast:
                res += (f": {us(r.chain.median)} through glibc; module itself "
                        f"{'≤' if r.direct.median <= T_LOOKUP_NS else '>'} 2 µs")
            res += f"; speedup {'✓' if far else '✗'}"
        out.append(f"| {LABEL[r.op]} | {r.users:,} | {us(r.chain.median)} / {us(r.chain.p99)} | "
                   f"{us(r.only.median)} | {us(r.direct.median)} | "
                   f"{us(r.files.median)} / {us(r.files.p99)} ({r.files.calls:,}) | {speed:,.0f}× | "
                   f"{target} | {res} |")
    if refs:
        out.append("")
        out.append("| reference, same test host | median / p99 |")
        out.append("|---|---:|")
        if "root" in refs:
            out.append(f"| getpwnam(\"root\") through glibc: nss_files hit on line 1 of the local /etc/passwd "
                       f"(floor of any lookup) | {us(refs['root'].median)} / {us(refs['root'].p99)} |")
        if "stat" in refs:
            out.append(f"| one stat() of {CACHE} (what every lookup paid before the superseded flag) | "
                       f"{us(refs['stat'].median)} / {us(refs['stat'].p99)} |")
    if idr:
        out.append("")
        out.append("| whole process | stepssh median / p99 (runs) | nss_files median (runs) | speedup | target | result |")
        out.append("|---|---:|---:|---:|---|---|")
        fm = (f"{idr.files_median_ms / 1000:,.2f} s ({idr.files_runs})" if idr.files_median_ms else "—")
        if idr.files_note:
            fm += f" — {idr.files_note}"
        sp = f"{idr.files_median_ms / idr.median_ms:,.0f}×" if idr.files_median_ms else "—"
        out.append(f"| `id {idr.user}` ({idr.user_groups} groups; {idr.users:,} users × {idr.groups:,} "
                   f"groups × {idr.avg_members:.0f} members avg) | {idr.median_ms:.2f} ms / {idr.p99_ms:.2f} ms "
                   f"({idr.runs}) | {fm} | {sp} | ≤ {T_ID_MS:.0f} ms | {verdict(idr.median_ms <= T_ID_MS)} |")
        out.append(f"| `id -G {idr.user}` (same user, numeric: no group lookups) | {idr.g_median_ms:.2f} ms | | | | |")
        out.append(f"| `id root` (local account: process start-up floor) | {idr.floor_ms:.2f} ms | | | | |")
        out.append("")
        out.append(f"cache file: {idr.cache_bytes / 1e6:.1f} MB; the same groups as /etc/group lines: "
                   f"{idr.group_file_bytes / 1e6:.1f} MB; process timings with {idr.tool}")
    return "\n".join(out)


def machine() -> str:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    glibc = " ".join(platform.libc_ver())
    return f"{os.cpu_count()} cores, {cpu}, kernel {platform.release()}, {glibc}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, short budgets (smoke run, < 60 s)")
    ap.add_argument("--json", metavar="OUT", help="also write the raw results as JSON")
    ap.add_argument("--skip-id", action="store_true", help="skip the `id` whole-process benchmark")
    ap.add_argument("--seed", type=int, default=2)
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("nss_bench needs root (it starts a test host: mount namespace + overlays)")
    if not NSS_MODULE.exists():
        raise SystemExit(f"{NSS_MODULE} is missing: pip install the package first")
    rng = random.Random(args.seed)
    load_before = os.getloadavg()
    sizes = [1_000, 5_000] if args.quick else [1_000, 10_000, 100_000]
    idsize = (1_000, 1_000, 100) if args.quick else (10_000, 10_000, 500)
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="nss-bench-"))
    os.chmod(tmp, 0o755)
    try:
        exe = compile_timer(tmp)
        refs: dict[str, Timing] = {}
        rows = bench_lookups(sizes, exe, tmp, args.quick, rng, refs)
        idr = None if args.skip_id else bench_id(*idsize, tmp, args.quick, rng)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    table = report(rows, idr, refs, sizes)
    load_after = os.getloadavg()
    print(f"# nss_bench{' --quick' if args.quick else ''}: {machine()}")
    print(f"# {time.perf_counter() - started:.0f} s total; load average before {load_before[0]:.2f}, "
          f"after {load_after[0]:.2f} (1 min)")
    if max(load_before[0], load_after[0]) > 0.7 * (os.cpu_count() or 1):
        print("# WARNING: the machine was busy; these numbers are inflated. Re-run on an idle host.")
    print()
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "machine": machine(), "quick": args.quick, "loadavg": [load_before, load_after],
            "lookups": [{"users": r.users, "op": r.op, "cache_bytes": r.cache_bytes,
                         **{m: vars(getattr(r, m)) for m in ("chain", "only", "direct", "files")}}
                        for r in rows],
            "refs": {k: vars(v) for k, v in refs.items()},
            "id": vars(idr) if idr else None}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
