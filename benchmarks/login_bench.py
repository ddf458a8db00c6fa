#!/usr/bin/env python3
"""Benchmark the login path: step-ssh-principals as a whole process, and a
full `ssh host true` for a managed user versus a local user.

    /tmp/venv/bin/python benchmarks/login_bench.py [--quick] [--users N] [--json OUT]

Needs root: it starts a test host (private mount + pid namespace, overlays
over /etc, /var, /home, /usr/local and the library directory) with the whole
login path installed as tests/login_fixtures.py does it, and a real sshd on
loopback. Nothing outside the namespace changes.

1. step-ssh-principals, whole process (fork/exec to exit, as sshd runs it),
   against a cache of N managed users (default 100,000), run as `nobody`
   like AuthorizedPrincipalsCommandUser:
     * `%u %U` (the configured form: no NSS lookup),
     * `%u` only (the helper asks NSS which uid the name has),
     * a name the cache does not hold,
     * /bin/true, the cost of starting any process, for reference.
   Timed inside the test host with os.posix_spawn + waitpid; median and p90.
2. `ssh -p PORT USER@127.0.0.1 true`, wall time of the client, alternating a
   managed user (certificate; principals helper, PAM account + session,
   home already present, audit spool) and a local user (authorized_keys,
   the distribution's PAM stack, pam_stepssh answering PAM_IGNORE), same sshd,
   same run.

Prints a Markdown table; target (DESIGN.md): principals helper ≤ 2 ms median.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE.parent))

# Runs inside the test host: time N whole-process runs of argv.
_INNER = r"""
import json, os, sys, time
n = int(sys.argv[1]); argvs = json.loads(sys.argv[2])
devnull = os.open("/dev/null", os.O_WRONLY)
res = {name: [] for name in argvs}
for i in range(n + 20):
    for name, argv in argvs.items():  # interleaved: load changes hit all alike
        t = time.perf_counter_ns()
        pid = os.posix_spawn(argv[0], argv, {"PATH": "/usr/bin:/bin"},
                             file_actions=[(os.POSIX_SPAWN_DUP2, devnull, 1)])
        _, st = os.waitpid(pid, 0)
        dt = time.perf_counter_ns() - t
        if st != 0:
            raise SystemExit(f"{argv} exited {st}")
        if i >= 20:  # warm-up: page cache, dentries
            res[name].append(dt / 1e6)
print(json.dumps(res))
"""


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))]


def big_view(n: int) -> dict:
    users = [{"name": "alice", "uid": 70001, "gid": 70001, "principals": ["alice", "alice@example.com"],
              "access": "sudo"},
             {"name": "bob", "uid": 70002, "gid": 70100, "principals": ["bob"], "access": "ssh"}]
    for i in range(n - len(users)):
        users.append({"name": f"u{i:06d}", "uid": 200_000 + i, "gid": 70100,
                      "principals": [f"u{i:06d}", f"u{i:06d}@example.com"], "access": "ssh"})
    return {"revision": 1, "users": users,
            "groups": [{"name": "developers", "gid": 70100, "members": ["bob"]}]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer iterations, 10k users")
    ap.add_argument("--users", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None, help="also write results here")
    args = ap.parse_args()
    n_users = args.users or (10_000 if args.quick else 100_000)
    n_proc = 200 if args.quick else 1000
    n_ssh = 10 if args.quick else 40

    from login_fixtures import PRINCIPALS, Keys, LoginHost, unavailable
    why = unavailable()
    if why:
        print(f"login_bench: {why}", file=sys.stderr)
        return 1

    keys = Keys()
    lh = LoginHost(keys, big_view(n_users))
    results: dict = {"users": n_users, "machine": platform.node(), "kernel": platform.release()}
    try:
        t0 = time.perf_counter()
        lh.start()
        results["setup_s"] = round(time.perf_counter() - t0, 2)
        h = lh.host
        # The timing loop itself runs as nobody (AuthorizedPrincipalsCommandUser).
        nobody = ["/usr/bin/setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        argvs = {
            "principals %u %U": [PRINCIPALS, "u004242", str(200_000 + 4242)],
            "principals %u (NSS lookup)": [PRINCIPALS, "u004242"],
            "principals, unknown name": [PRINCIPALS, "mallory", "1234"],
            "/bin/true": ["/bin/true"],
        }
        r = h.run(nobody + [sys.executable, "-c", _INNER, str(n_proc), json.dumps(argvs)], timeout=600)
        if r.returncode != 0:
            raise RuntimeError(r.stderr)
        raw = json.loads(r.stdout)
        base = statistics.median(raw["/bin/true"])
        proc = {}
        for name, ts in raw.items():
            proc[name] = {"median_ms": round(statistics.median(ts), 3), "p90_ms": round(pct(ts, 0.9), 3),
                          "median_minus_true_ms": round(statistics.median(ts) - base, 3)}
        results["principals"] = proc
        out = h.run(nobody + [PRINCIPALS, "u004242", str(200_000 + 4242)]).stdout
        assert out == "u004242\nu004242@example.com\n", out

        # ssh host true: managed (certificate) vs local (authorized_keys)
        lh.start_sshd()
        h.run("install -d -o dave -g dave -m 700 /home/dave/.ssh", check=True)
        h.write("/home/dave/.ssh/authorized_keys", keys.pub("dave-local"), 0o600)
        h.run("chown dave:dave /home/dave/.ssh/authorized_keys", check=True)
        cert = keys.cert("bob", ["bob"])
        runs = {"managed (bob, certificate)": ("bob", "bob", cert),
                "local (dave, authorized_keys)": ("dave", "dave-local", None)}
        for user, key, c in runs.values():  # warm-up, and creates bob's home
            r = lh.ssh(user, "true", key, c)
            assert r.returncode == 0, r.stderr
        times: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(n_ssh):
            for name, (user, key, c) in runs.items():
                argv = lh.ssh_argv(user, "true", key, c)
                t = time.perf_counter()
                r = h.run(argv)
                times[name].append((time.perf_counter() - t) * 1000)
                assert r.returncode == 0, r.stderr
        results["ssh_true"] = {k: {"median_ms": round(statistics.median(v), 1),
                                   "p90_ms": round(pct(v, 0.9), 1), "n": len(v)} for k, v in times.items()}
    finally:
        lh.close()
        keys.close()

    print(f"\n### Login path, {n_users:,} managed users ({results['machine']}, {results['kernel']})\n")
    print("| what | median | p90 | median − /bin/true |")
    print("|---|---|---|---|")
    for name, v in results["principals"].items():
        print(f"| {name} | {v['median_ms']:.3f} ms | {v['p90_ms']:.3f} ms | {v['median_minus_true_ms']:+.3f} ms |")
    print("\n| `ssh 127.0.0.1 true` | median | p90 | runs |")
    print("|---|---|---|---|")
    for name, v in results["ssh_true"].items():
        print(f"| {name} | {v['median_ms']:.1f} ms | {v['p90_ms']:.1f} ms | {v['n']} |")
    p = results["principals"]["principals %u %U"]["median_ms"]
    print(f"\nprincipals helper target ≤ 2 ms median: {'met' if p <= 2 else 'MISSED'} ({p:.3f} ms)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
