"""The C reader and NSS entry points under AddressSanitizer + UBSan.

tests/c/hostile_main.c is compiled together with nss_shim/cache.c and
nss_shim/nss.c (the sources of libnss_stepssh.so.2) and run over:
  - the whole hostile corpus of hostile_corpus.py (no sanitizer report, no
    malformed answer, exit 0);
  - valid caches, where every answer is checked against the view, buffers grow
    one byte at a time from 1 (every ERANGE boundary), and a user in 1,000
    groups goes through initgroups.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import hostile_corpus as hc  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SRC = [ROOT / "tests/c/hostile_main.c", ROOT / "nss_shim/test_harness.c", ROOT / "nss_shim/cache.c",
       ROOT / "nss_shim/nss.c"]
CFLAGS = ["-std=gnu11", "-g", "-O1", "-fno-omit-frame-pointer", "-fsanitize=address,undefined",
          "-fno-sanitize-recover=all", "-Wall", "-Wextra", "-Werror", "-DSTEPSSH_PATH_OVERRIDE",
          # the reader's mapping becomes an exact-size heap copy ASan can see past
          "-Dmmap=sc_test_mmap", "-Dmunmap=sc_test_munmap",
          f"-I{ROOT / 'nss_shim'}"]
SAN_ENV = {
    "ASAN_OPTIONS": "abort_on_error=1:detect_leaks=1:strict_string_checks=1:"
                    "detect_stack_use_after_return=1:check_initialization_order=1:"
                    "detect_invalid_pointer_pairs=1",
    "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
}
SAN_MARKERS = ("ERROR: AddressSanitizer", "ERROR: LeakSanitizer", "runtime error:",
               "UndefinedBehaviorSanitizer")
COMPILERS = [c for c in ("gcc", "clang") if shutil.which(c)]


def _san_report(stderr: str) -> bool:
    """A sanitizer report, or one of the harness's own check failures (every
    stderr line of the harness but its final "N files" is one)."""
    return any(m in stderr for m in SAN_MARKERS) or any(
        line.startswith("hostile_main: ") and not line.rstrip().endswith(" files")
        for line in stderr.splitlines())


@pytest.fixture(scope="module", params=COMPILERS or [None])
def harness(request, tmp_path_factory) -> Path:
    cc = request.param
    if cc is None:
        pytest.skip("no C compiler (gcc or clang) on PATH")
    out = tmp_path_factory.mktemp(f"asan-{cc}") / "hostile_main"
    r = subprocess.run([cc, *CFLAGS, "-o", str(out), *map(str, SRC), "-lz"],
                       capture_output=True, text=True)
    if r.returncode != 0 and ("cannot find" in r.stderr or "libasan" in r.stderr or "libubsan" in r.stderr):
        pytest.skip(f"{cc} cannot link the sanitizer runtimes: {r.stderr.strip()[-300:]}")
    assert r.returncode == 0, f"{cc} failed to build the harness:\n{r.stderr}"
    return out


@pytest.fixture(scope="module")
def corpus_list(tmp_path_factory) -> Path:
    """Every hostile case as a file, and a list file the harness reads."""
    d = tmp_path_factory.mktemp("asan-corpus")
    bases = hc.bases()
    lines = []
    for i, case in enumerate(hc.corpus()):
        if hc.needs_root(case) and os.geteuid() != 0:
            continue
        p = hc.materialize(case, d, i, bases[case.base].data)
        lines.append(f"{int(case.secure)} {p}")
    lst = d / "list"
    lst.write_text("\n".join(lines) + "\n")
    return lst


def _keys() -> list[str]:
    names, ids = [], []
    for b in hc.bases().values():
        names += b.exp.names + b.exp.gnames
        ids += b.exp.uids + b.exp.gids
    return [f"--name={n}" for n in dict.fromkeys(names)] + [f"--id={i}" for i in dict.fromkeys(ids)]


def _run(harness: Path, args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, **SAN_ENV)
    return subprocess.run([str(harness), *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_hostile_corpus_under_sanitizers(harness, corpus_list):
    # Two halves in parallel: the runner has two cores.
    lines = corpus_list.read_text().splitlines()
    halves = [lines[0::2], lines[1::2]]
    procs = []
    env = dict(os.environ, **SAN_ENV)
    for k, part in enumerate(halves):
        lst = corpus_list.with_name(f"list{k}")
        lst.write_text("\n".join(part) + "\n")
        procs.append(subprocess.Popen([str(harness), *_keys(), f"--list={lst}"],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    done = 0
    for p in procs:
        try:
            out, err = p.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("the harness hung on a hostile file")
        assert p.returncode == 0 and not _san_report(err), (
            f"harness exit {p.returncode} over the hostile corpus:\n{err[-6000:]}")
        done += int(err.strip().splitlines()[-1].split()[1])
    assert done == len(lines) > 1000


def _expected_lines(view) -> tuple[list[str], list[str], list[str]]:
    exp = hc.expect(view)
    pw = [f"P {p.line()}" for p in exp.pw_list]
    gr = [f"G {g.line()}" for g in exp.gr_list]
    ig = [f"I {u}:" + "".join(f" {g}" for g in gids) for u, (_, gids) in exp.initgroups.items()]
    return pw, gr, ig


@pytest.mark.parametrize("which", ["small", "medium", "many_groups"])
def test_valid_caches_under_sanitizers(harness, tmp_path, which):
    view = {"small": hc.small_view, "medium": hc.medium_view, "many_groups": hc.many_groups_view}[which]()
    path = tmp_path / f"{which}.cache"
    path.write_bytes(hc.build(view, now=hc.NOW))
    exp = hc.expect(view)
    keys = [f"--name={n}" for n in exp.names if n] + [f"--id={i}" for i in exp.uids]
    r = _run(harness, ["--valid", *keys, str(path)])
    assert r.returncode == 0 and not _san_report(r.stderr), r.stderr[-6000:]
    out = r.stdout.splitlines()
    pw, gr, ig = _expected_lines(view)
    assert [x for x in out if x.startswith("P ")] == pw
    assert [x for x in out if x.startswith("G ")] == gr
    assert [x for x in out if x.startswith("I ")] == ig
    for n in exp.names:
        if n:
            want = "hit" if n in exp.users else "miss"
            assert f"Q pwnam {n} {want}" in out
    for u in exp.uids:
        line = next(x for x in out if x.startswith(f"Q id {u} "))
        assert line.split()[3] == ("hit" if u in exp.by_uid else "miss")
        assert line.split()[4] == ("hit" if u in exp.by_gid else "miss")
    assert out[-1] == f"OK {len(pw)} users {len(gr)} groups"
    if which == "many_groups":
        many = next(x for x in out if x.startswith("I many:"))
        assert len(many.split()) - 2 == 1000


def test_valid_cache_as_root_owned_secure(harness, tmp_path):
    """require_root_owner=1 over a root-owned 0644 file answers normally."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    path = tmp_path / "secure.cache"
    path.write_bytes(hc.build(hc.small_view(), now=hc.NOW))
    os.chmod(path, 0o644)
    r = _run(harness, ["--valid", "--secure=1", str(path)])
    assert r.returncode == 0 and not _san_report(r.stderr), r.stderr[-6000:]
    assert r.stdout.splitlines()[-1].startswith("OK 5 users")
