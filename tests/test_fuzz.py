"""A short libFuzzer run of nss_shim/fuzz_cache.c, in two modes.

``raw``     the fuzzer's bytes as they are: exercises the header and checksum
            checks (nearly every mutant fails a CRC).
``fixcrc``  built with -DFUZZ_FIX_CRC: the target re-seals each input (file
            size, block CRCs, header CRC) so mutants reach the bounds checks
            behind the checksums.

Both run in parallel for STEPSSH_FUZZ_SECONDS (default 20) seconds, seeded with
valid caches and a few hostile ones from hostile_corpus.py, under ASan + UBSan.
Set STEPSSH_FUZZ_SECONDS higher for a real fuzzing session; crashes are left in
the test's tmp directory (artifact paths are printed).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import hostile_corpus as hc  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SECONDS = int(os.environ.get("STEPSSH_FUZZ_SECONDS", "20"))
MODES = {"raw": [], "fixcrc": ["-DFUZZ_FIX_CRC"]}
SEED_PREFIXES = (  # a few hostile shapes to start from: the first case named so
    "small/strings:last-unterminated+1", "small/hdr:n_users-1", "small/uname_idx:nb=1",
    "small/group0.mem_count=", "small/user1.gids_count=", "small/gid_idx:full-of-1",
    "small/trunc-resealed@10", "small/flip1:",
)


def _seed_cases() -> dict[str, hc.Case]:
    cases = hc.corpus()
    out = {}
    for pre in SEED_PREFIXES:
        c = next((c for c in cases if c.name.startswith(pre) and c.data), None)
        if c is not None:
            out[pre] = c
    return out


def _clang() -> str | None:
    for c in ("clang", "clang-14", "clang-15", "clang-16"):
        if shutil.which(c):
            return c
    return None


def _build_cmd(cc: str, mode: str, out: Path) -> list[str]:
    return [cc, "-g", "-O1", "-fsanitize=fuzzer,address,undefined", "-fno-sanitize-recover=all",
            "-Wall", "-Wextra", "-Werror", "-DSTEPSSH_PATH_OVERRIDE",
            "-Dmmap=sc_test_mmap", "-Dmunmap=sc_test_munmap", *MODES[mode],
            f"-I{ROOT / 'nss_shim'}", str(ROOT / "nss_shim/fuzz_cache.c"), str(ROOT / "nss_shim/test_harness.c"),
            str(ROOT / "nss_shim/cache.c"),
            str(ROOT / "nss_shim/nss.c"), "-lz", "-o", str(out)]


@pytest.fixture(scope="module")
def fuzzers(tmp_path_factory) -> dict[str, Path]:
    cc = _clang()
    if cc is None:
        pytest.skip("clang is not installed: libFuzzer targets need clang (apt install clang)")
    d = tmp_path_factory.mktemp("fuzz-bin")
    # Both builds at once: the runner has two cores.
    procs = {mode: (d / f"fuzz_cache_{mode}",
                    subprocess.Popen(_build_cmd(cc, mode, d / f"fuzz_cache_{mode}"),
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
             for mode in MODES}
    outs = {}
    for mode, (out, p) in procs.items():
        text, _ = p.communicate(timeout=300)
        if p.returncode != 0 and re.search(r"libclang_rt\.fuzzer|fsanitize=fuzzer|cannot find -l", text):
            pytest.skip(f"{cc} has no libFuzzer runtime (install libclang-rt-dev): {text.strip()[-300:]}")
        assert p.returncode == 0, f"building the {mode} fuzzer failed:\n{text}"
        outs[mode] = out
    return outs


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("fuzz-seeds")
    small = hc.small_view()
    (d / "valid-small").write_bytes(hc.build(small, now=hc.NOW))
    # A multi-block file small enough to mutate quickly.
    (d / "valid-2blocks").write_bytes(hc.build(hc.medium_view(30), now=hc.NOW))
    for c in _seed_cases().values():
        (d / re.sub(r"[^A-Za-z0-9.=+-]", "_", c.name)).write_bytes(c.data)
    return d


def test_seed_cases_exist():
    missing = set(SEED_PREFIXES) - set(_seed_cases())
    assert not missing, f"seed cases renamed in hostile_corpus.py: {missing}"


def test_fuzz_reader_both_modes(fuzzers, seeds, tmp_path):
    procs = {}
    env = dict(os.environ,
               ASAN_OPTIONS="abort_on_error=1:detect_leaks=1:strict_string_checks=1",
               UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1",
               STEPSSH_FUZZ_DIR=str(tmp_path))
    for mode, exe in fuzzers.items():
        work = tmp_path / mode
        (work / "corpus").mkdir(parents=True)
        log = (work / "log").open("w")
        procs[mode] = (work, log, subprocess.Popen(
            [str(exe), f"-max_total_time={SECONDS}", "-timeout=10", "-rss_limit_mb=2048",
             "-max_len=16384", "-print_final_stats=1", f"-artifact_prefix={work}/",
             str(work / "corpus"), str(seeds)],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=work))
    failures = []
    for mode, (work, log, p) in procs.items():
        try:
            p.wait(timeout=SECONDS + 120)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            failures.append(f"{mode}: libFuzzer did not stop after {SECONDS}s")
        log.close()
        text = (work / "log").read_text(errors="replace")
        artifacts = [str(a) for a in work.iterdir() if a.name.startswith(("crash-", "leak-", "timeout-", "oom-"))]
        bad = re.search(r"ERROR: (AddressSanitizer|LeakSanitizer|libFuzzer)|runtime error:|fuzz_cache: |"
                        r"deadly signal", text)
        if p.returncode != 0 or bad or artifacts:
            failures.append(f"{mode}: exit {p.returncode}, artifacts {artifacts}\n{text[-5000:]}")
            continue
        m = re.search(r"Done (\d+) runs", text)
        assert m and int(m.group(1)) >= 100, f"{mode}: the fuzzer barely ran:\n{text[-2000:]}"
    assert not failures, "\n\n".join(failures)
