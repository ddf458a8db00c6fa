"""Hostile and corrupt cache files through the C reader, in-process (cffi).

DESIGN.md invariant 2: a torn, truncated or corrupt file makes the modules
answer NSS_STATUS_UNAVAIL — never crash the caller, never garbage.  The corpus
and the meaning of each oracle kind are in hostile_corpus.py.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import hostile_corpus as hc  # noqa: E402

from step_ssh.native import Group, NssClient, Passwd, Unavailable, verify_file  # noqa: E402

UNAVAIL = "UNAVAIL"
CASES = hc.corpus()
BASES = hc.bases()
INDEX = {c.name: i for i, c in enumerate(CASES)}


def _group_of(case: hc.Case) -> str:
    base, rest = case.name.split("/", 1)
    cat = re.match(r"[a-z_-]+", rest).group(0)
    if cat.startswith("hdr"):
        cat = "hdr"
    if "resealed" in rest and cat == "flip":
        cat = "flip-resealed"
    return f"{base}/{cat}"


GROUPS: dict[str, list[hc.Case]] = defaultdict(list)
for _c in CASES:
    GROUPS[_group_of(_c)].append(_c)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hostile")


def _ask(fn, *args):
    try:
        return fn(*args)
    except Unavailable:
        return UNAVAIL


def _short(x, n: int = 160) -> str:
    r = repr(x)
    return r if len(r) <= n else r[:n] + "..."


def _key_ok(got, key_attr: str, key) -> bool:
    """Any served record must match the key asked for and never carry id 0."""
    if isinstance(got, Passwd):
        return getattr(got, key_attr) == key and got.uid != 0 and got.gid != 0
    if isinstance(got, Group):
        return getattr(got, key_attr) == key and got.gid != 0
    return False


def _judge(kind: str, got, correct, key_attr: str, key) -> bool:
    if got is UNAVAIL:
        return True
    if kind == "reject":
        return False
    if got is None:
        return correct is None or kind in ("lenient", "safe")
    if not _key_ok(got, key_attr, key):
        return False
    return kind == "safe" or got == correct


def check_case(case: hc.Case, path: Path, bufsize: int = 1024) -> list[str]:
    """Every lookup the NSS module offers, judged by the case's oracle."""
    exp = BASES[case.base].exp
    kind = case.kind
    c = NssClient(path, require_root_owner=case.secure, bufsize=bufsize)
    errs: list[str] = []

    def judge(what, got, correct, key_attr, key):
        if not _judge(kind, got, correct, key_attr, key):
            errs.append(f"{what}: got {_short(got)}, correct {_short(correct)}")

    for n in exp.names:
        judge(f"getpwnam({n[:20]!r})", _ask(c.getpwnam, n), exp.users.get(n), "name", n)
    for u in exp.uids:
        judge(f"getpwuid({u})", _ask(c.getpwuid, u), exp.by_uid.get(u), "uid", u)
    for n in exp.gnames:
        judge(f"getgrnam({n[:20]!r})", _ask(c.getgrnam, n), exp.groups.get(n), "name", n)
    for g in exp.gids:
        judge(f"getgrgid({g})", _ask(c.getgrgid, g), exp.by_gid.get(g), "gid", g)

    for n in exp.names:
        primary, correct = exp.initgroups.get(n, (4321, None))
        got = _ask(c.initgroups, n, primary)
        if got is UNAVAIL:
            continue
        ok = {
            "reject": False,
            "strict": got == correct,
            "lenient": got is None or got == correct,
            "safe": got is None or (0 not in got and primary not in got),
        }[kind]
        if not ok:
            errs.append(f"initgroups({n[:20]!r}, {primary}): got {_short(got)}, correct {_short(correct)}")

    for what, fn, full in (("passwd", c.passwd_entries, exp.pw_list),
                           ("group", c.group_entries, exp.gr_list)):
        got = _ask(fn)
        if got is UNAVAIL:
            continue
        ok = {
            "reject": False,
            "strict": got == full,
            # Records are served by index: fewer may be listed, never others.
            "lenient": got == full[:len(got)],
            "safe": all((e.gid != 0 and getattr(e, "uid", 1) != 0) for e in got),
        }[kind]
        if not ok:
            errs.append(f"enumerate {what}: got {_short(got)}")
    return errs


def test_valid_bases_answer_exactly(workdir):
    """The oracle itself: the untouched files give every expected answer."""
    for b in BASES.values():
        p = workdir / f"valid-{b.name}.cache"
        p.write_bytes(b.data)
        assert verify_file(p) == (True, "ok")
        assert check_case(hc.Case(f"{b.name}/valid", "strict", b.name, b.data), p) == []
        # ... and never by luck: each answer really is a hit.
        c = NssClient(p)
        assert c.passwd_entries() == b.exp.pw_list
        assert c.group_entries() == b.exp.gr_list
        for n, p_ in b.exp.users.items():
            assert c.getpwnam(n) == p_
        for g in b.exp.gr_list:
            assert c.getgrgid(g.gid) == g


@pytest.mark.parametrize("group", sorted(g for g in GROUPS if not g.startswith("fs/")))
def test_hostile_files(group, workdir):
    errors = []
    for i, case in enumerate(GROUPS[group]):
        path = hc.materialize(case, workdir, INDEX[case.name], BASES[case.base].data)
        # Small buffers on every other case so the ERANGE path meets the damage too.
        errs = check_case(case, path, bufsize=16 if i % 2 else 1024)
        if errs:
            errors.append(f"{case.name} [{case.kind}]: " + "; ".join(errs[:4]))
        if case.kind == "reject" or case.name.split("/")[1].startswith("flip") and "resealed" not in case.name:
            # The full check (`step-ssh cache show`) must see the damage too.
            ok, why = verify_file(path)
            if ok:
                errors.append(f"{case.name}: verify_file says ok")
        path.unlink()
    assert not errors, f"{len(errors)} of {len(GROUPS[group])} cases failed:\n" + "\n".join(errors[:25])


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create files owned by another user")
@pytest.mark.parametrize("case", [c for c in CASES if c.name.startswith("fs/") and c.special != "fifo"],
                         ids=lambda c: c.name)
def test_filesystem_oddities(case, workdir):
    path = hc.materialize(case, workdir, INDEX[case.name], BASES[case.base].data)
    assert check_case(case, path) == []


def test_fifo_at_cache_path_does_not_hang(workdir):
    """A FIFO at the cache path (nobody writing) must be refused, not block
    every getpwnam in the system.  Run in a child so a hang fails the test
    instead of the suite."""
    case = next(c for c in CASES if c.special == "fifo")
    path = hc.materialize(case, workdir, INDEX[case.name], b"")
    code = (
        "import sys\n"
        "from step_ssh.native import NssClient, Unavailable\n"
        "c = NssClient(sys.argv[1])\n"
        "for f, a in ((c.getpwnam, 'alice'), (c.getpwuid, 1001), (c.getgrgid, 2000), (c.initgroups, 'bob')):\n"
        "    try:\n"
        "        f(a); sys.exit('answered from a fifo')\n"
        "    except Unavailable:\n"
        "        pass\n"
    )
    try:
        r = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail("opening a FIFO at the cache path blocked the lookup")
    assert r.returncode == 0, r.stderr


def test_every_case_kind_is_exercised():
    kinds = {c.kind for c in CASES}
    assert kinds == {"reject", "strict", "lenient", "safe"}
    assert len(CASES) > 1000
