"""Hostile / corrupt cache files, shared by test_hostile.py (cffi, in-process),
test_asan.py (ASan+UBSan C harness) and test_fuzz.py (fuzzer seeds).

Every case is a file (or a thing at the cache path) plus an oracle *kind*:

``reject``   the reader must refuse the file at map time: every lookup is
             UNAVAIL (``Unavailable``).
``strict``   damage the reader must detect where it is read: every answer is
             either ``Unavailable`` or exactly what the valid file answers
             (a miss stays a miss, a hit is the exact record).  Used for
             CRC-protected damage and for structural lies with re-computed
             checksums that the bounds checks must catch.
``lenient``  a checksum-consistent file whose structure lies in a way that can
             hide records: answers are ``Unavailable``, a miss, or exactly the
             valid answer — never a different record.
``safe``     a checksum-consistent file with arbitrary changes (it is, in
             effect, a different cache): no crash, and every hit is
             self-consistent (getpwnam(n) has name n, getpwuid(u) has uid u, ...).

Checksum-consistent cases are made with :func:`reseal`, which recomputes the
block CRCs and the header CRC exactly as the reader checks them, so the
corruption gets past the checksums and reaches the bounds checks.
"""
from __future__ import annotations

import os
import random
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from step_ssh.cache.format import BLOCK_SIZE, GROUP_WORDS, HEADER, HEADER_FIELDS, SUPERSEDED_OFFSET, USER_WORDS, Header
from step_ssh.cache.writer import build, effective_groups
from step_ssh.native import Group, Passwd
from step_ssh.view import HostView

NOW = 1_700_000_000
U32 = 0xFFFFFFFF

# ---- header geometry, derived from the writer's struct format ----------------

_FMT = HEADER.format.lstrip("=")
_CODES: list[str] = []
_i = 0
while _i < len(_FMT):  # expand "8s" into one code, keep the rest one char each
    if _FMT[_i].isdigit():
        _CODES.append(_FMT[_i:_i + 2])
        _i += 2
    else:
        _CODES.append(_FMT[_i])
        _i += 1
assert len(_CODES) == len(HEADER_FIELDS)
FIELD_OFF: dict[str, int] = {}
FIELD_CODE: dict[str, str] = {}
for _name, _code in zip(HEADER_FIELDS, _CODES):
    FIELD_OFF[_name] = struct.calcsize("=" + "".join(_CODES[:HEADER_FIELDS.index(_name)]))
    FIELD_CODE[_name] = _code
assert FIELD_OFF["header_crc"] == 120 and HEADER.size == 128


def header(data: bytes) -> Header:
    return Header(*HEADER.unpack_from(data))


def set_field(buf: bytearray, name: str, value) -> None:
    code = FIELD_CODE[name]
    if code in "IQ":
        value &= (1 << (8 * struct.calcsize(code))) - 1
    struct.pack_into("=" + code, buf, FIELD_OFF[name], value)


def get_u32(buf: bytes, off: int) -> int:
    return struct.unpack_from("=I", buf, off)[0]


def put_u32(buf: bytearray, off: int, value: int) -> None:
    struct.pack_into("=I", buf, off, value & U32)


def reseal(data: bytes | bytearray) -> bytes:
    """Recompute block CRCs and the header CRC the way the reader checks them,
    trusting whatever (possibly lying) geometry the header states."""
    b = bytearray(data)
    if len(b) < HEADER.size:
        return bytes(b)
    h = header(b)
    co, nb, hs = h.crc_off, h.n_blocks, h.header_size
    table_ok = hs <= co and co + 4 * nb <= len(b)
    if table_ok:
        for i in range(nb):
            start = hs + i * BLOCK_SIZE
            if start >= co:
                break
            put_u32(b, co + 4 * i, zlib.crc32(b[start:min(start + BLOCK_SIZE, co)]))
    hdr = bytearray(b[:HEADER.size])
    set_field(hdr, "header_crc", 0)
    set_field(hdr, "superseded", 0)  # excluded from the header CRC (set in place by writers)
    crc = zlib.crc32(hdr)
    if table_ok:
        crc = zlib.crc32(b[co:co + 4 * nb], crc)
    set_field(b, "header_crc", crc)
    return bytes(b)


def retable(data: bytes, cut: int) -> bytes:
    """A *consistently* truncated file: keep the header and data[:cut], then a
    fresh CRC table, with crc_off / n_blocks / file_size describing it."""
    b = bytearray(data[:cut])
    hs = HEADER.size
    nb = (cut - hs + BLOCK_SIZE - 1) // BLOCK_SIZE
    b += bytes(4 * nb)
    set_field(b, "crc_off", cut)
    set_field(b, "n_blocks", nb)
    set_field(b, "file_size", len(b))
    return reseal(b)


# ---- views and what a correct reader answers for them ------------------------

def small_view() -> HostView:
    return HostView.model_validate({
        "revision": 7, "confirmed_at": NOW, "max_stale_seconds": 3600,
        "users": [
            {"name": "alice", "uid": 1001, "gid": 1001, "gecos": "Alice Example",
             "principals": ["alice", "alice@example.com"], "access": "sudo"},
            {"name": "bob", "uid": 1002, "gid": 2000, "home": "/srv/bob", "shell": "/bin/zsh",
             "principals": ["bob"], "access": "ssh"},
            {"name": "carol", "uid": 1003, "gid": 1003, "access": "jump"},
            {"name": "dave", "uid": 1004, "gid": 2000, "gecos": "Dave,Room 4,,",
             "principals": ["dave", "ops-oncall"], "access": "none"},
            {"name": "erin_x-9", "uid": 65000, "gid": 2001, "principals": ["erin"]},
        ],
        "groups": [
            {"name": "devs", "gid": 2000, "members": ["alice", "bob", "dave"]},
            {"name": "ops", "gid": 2001, "members": ["alice", "erin_x-9"]},
            {"name": "empty", "gid": 2002, "members": []},
            {"name": "all", "gid": 2003, "members": ["alice", "bob", "carol", "dave", "erin_x-9"]},
        ],
    })


def medium_view(n: int = 60) -> HostView:
    """Enough users that the data spans several 4 KiB blocks."""
    users = [{"name": f"user{i:03d}", "uid": 10000 + i, "gid": 10000 + i if i % 3 else 20000 + i % 4,
              "gecos": f"User number {i}, Department of Rather Long Descriptions {'x' * (i % 17)}",
              "principals": [f"user{i:03d}", f"user{i:03d}@corp.example"],
              "access": ["ssh", "sudo", "none", "jump"][i % 4]} for i in range(n)]
    groups = [{"name": f"team{k}", "gid": 20000 + k,
               "members": [f"user{i:03d}" for i in range(n) if i % (k + 2) == 0]} for k in range(6)]
    return HostView.model_validate({"revision": 99, "confirmed_at": NOW, "users": users, "groups": groups})


def many_groups_view(ngroups: int = 1000) -> HostView:
    """One user in `ngroups` groups (initgroups under ASan), plus a bystander."""
    return HostView.model_validate({
        "users": [{"name": "many", "uid": 5000, "gid": 5000},
                  {"name": "few", "uid": 5001, "gid": 3000}],
        "groups": [{"name": f"g{k:04d}", "gid": 3000 + k,
                    "members": ["many"] + (["few"] if k % 100 == 0 else [])} for k in range(ngroups)],
    })


@dataclass
class Expect:
    """What a correct reader answers for a view."""

    users: dict[str, Passwd]
    by_uid: dict[int, Passwd]
    groups: dict[str, Group]
    by_gid: dict[int, Group]
    initgroups: dict[str, tuple[int, list[int]]]  # name -> (primary gid, supplementary gids)
    pw_list: list[Passwd]
    gr_list: list[Group]
    names: list[str] = field(default_factory=list)   # user names to query (hits + misses)
    uids: list[int] = field(default_factory=list)
    gnames: list[str] = field(default_factory=list)
    gids: list[int] = field(default_factory=list)


MISS_NAMES = ["nosuchuser", "root", "", "x" * 300, "alice2"]
MISS_IDS = [0, 1, 4242, 0xFFFFFFFE, U32]


def expect(view: HostView, sample: Optional[int] = None) -> Expect:
    groups = effective_groups(view)
    pw = [Passwd(u.name, "x", u.uid, u.gid, u.gecos, u.home_dir, u.shell) for u in view.users]
    gr = [Group(g.name, "x", g.gid, tuple(g.members)) for g in groups]
    member: dict[str, list[int]] = {}
    for g in groups:
        for m in g.members:
            member.setdefault(m, []).append(g.gid)
    ig = {u.name: (u.gid, [g for g in dict.fromkeys(member.get(u.name, [])) if g != u.gid])
          for u in view.users}
    pick_pw = pw if sample is None else pw[:: max(1, len(pw) // sample)]
    pick_gr = gr if sample is None else gr[:: max(1, len(gr) // sample)] + gr[-2:]
    return Expect(
        users={p.name: p for p in pw}, by_uid={p.uid: p for p in pw},
        groups={g.name: g for g in gr}, by_gid={g.gid: g for g in gr},
        initgroups=ig, pw_list=pw, gr_list=gr,
        names=[p.name for p in pick_pw] + MISS_NAMES,
        uids=[p.uid for p in pick_pw] + MISS_IDS,
        gnames=[g.name for g in pick_gr] + MISS_NAMES,
        gids=[g.gid for g in pick_gr] + MISS_IDS,
    )


# ---- the corpus ---------------------------------------------------------------

@dataclass
class Case:
    name: str
    kind: str                      # reject | strict | lenient | safe
    base: str                      # which valid file it was made from: small | medium
    data: Optional[bytes] = None   # file contents; None for `special` cases
    special: Optional[str] = None  # missing | dir | fifo | not_root | world_writable | group_writable
    secure: bool = False           # NssClient(require_root_owner=...)


@dataclass
class Base:
    name: str
    view: HostView
    data: bytes
    exp: Expect


def bases() -> dict[str, Base]:
    sv, mv = small_view(), medium_view()
    return {
        "small": Base("small", sv, build(sv, now=NOW), expect(sv)),
        "medium": Base("medium", mv, build(mv, now=NOW), expect(mv, sample=8)),
    }


def _sections(h: Header) -> list[tuple[str, int, int]]:
    """(name, start, end) of every region of a valid file, in file order."""
    offs = [("strings", h.strings_off), ("users", h.users_off), ("groups", h.groups_off),
            ("pool", h.pool_off), ("uname_idx", h.uname_idx_off), ("uid_idx", h.uid_idx_off),
            ("gname_idx", h.gname_idx_off), ("gid_idx", h.gid_idx_off), ("crc_table", h.crc_off)]
    out = []
    for (n, s), (_, e) in zip(offs, offs[1:] + [("end", h.file_size)]):
        out.append((n, s, e))
    return out


def _truncations(b: Base) -> list[Case]:
    d, h = b.data, header(b.data)
    cuts = {0, HEADER.size, len(d) - 1}
    cuts.update(FIELD_OFF.values())
    cuts.update(off + 1 for off in FIELD_OFF.values())
    for _, s, e in _sections(h):
        cuts.update({s, s + 1, s + 4, (s + e) // 2, max(s, e - 4), max(s, e - 1)})
    out = [Case(f"{b.name}/trunc@{c}", "reject", b.name, d[:c]) for c in sorted(cuts) if c < len(d)]
    # Consistent truncation: header, offsets and CRCs re-made for the shorter
    # file, so only the bounds checks stand between the reader and the cut.
    data_end = h.crc_off
    ccuts = {HEADER.size + 4, data_end - 1, data_end - 4, data_end - 5}
    for _, s, e in _sections(h)[:-1]:
        ccuts.update({s, s + 4, s + 8, (s + e) // 2, max(s, e - 4)})
    for c in sorted(ccuts):
        if HEADER.size < c < data_end:
            out.append(Case(f"{b.name}/trunc-resealed@{c}", "strict", b.name, retable(d, c)))
    return out


def _header_lies(b: Base) -> list[Case]:
    d, h = b.data, header(b.data)
    out: list[Case] = []

    def lie(tag: str, kind: str, resealed: bool = True, **fields) -> None:
        buf = bytearray(d)
        for k, v in fields.items():
            set_field(buf, k, v)
        out.append(Case(f"{b.name}/hdr:{tag}{'' if resealed else ':raw'}", kind, b.name,
                        reseal(buf) if resealed else bytes(buf)))

    # Identity: magic, version, byte order, sizes.  Raw (header CRC now wrong)
    # and re-sealed (only the field check can refuse them).
    for rs in (True, False):
        lie("magic", "reject", rs, magic=b"STEPSSHD")
        lie("magic0", "reject", rs, magic=b"\0" * 8)
        lie("magic-lc", "reject", rs, magic=b"stepsshc")
        for v in (0, 2, 0x01000000, U32):
            lie(f"version={v:#x}", "reject", rs, version=v)
        for v in (0x04030201, 0, U32):
            lie(f"byte_order={v:#x}", "reject", rs, byte_order=v)
    lie("header_crc+1", "reject", False, header_crc=h.header_crc + 1)
    lie("header_crc=0", "reject", False, header_crc=0)
    for v in (0, 64, 124, 132, 256, U32):
        lie(f"header_size={v}", "reject", header_size=v)
    for v in (0, 512, 4095, 8192, U32):
        lie(f"block_size={v}", "reject", block_size=v)
    for v in (0, h.file_size - 1, h.file_size + 1, h.file_size + 4, 1 << 40, (1 << 64) - 1):
        lie(f"file_size={v}", "reject", file_size=v)

    # Counts: huge, and just one more than the section holds.
    for f, n in (("n_users", h.n_users), ("n_groups", h.n_groups), ("pool_count", h.pool_count)):
        for v in (U32, 0x80000000, 0x40000000, 0x10000000, 0x00FFFFFF, n + 1, n + 2, n + 1000):
            lie(f"{f}={v:#x}", "reject", **{f: v})
    # Fewer records than written: the tail is hidden (lookups of it must not
    # return something else).
    lie("n_users-1", "lenient", n_users=h.n_users - 1)
    lie("n_users=0", "lenient", n_users=0)
    lie("n_groups-1", "lenient", n_groups=h.n_groups - 1)
    lie("pool_count-1", "lenient", pool_count=h.pool_count - 1)
    lie("pool_count=0", "lenient", pool_count=0)
    for v in (0, U32, 0x80000000, h.crc_off, h.crc_off - h.strings_off + 1, h.strings_size + 5000):
        lie(f"strings_size={v:#x}", "reject", strings_size=v)
    # Shorter string section: strings at its end become unterminated or out of range.
    for k in (1, 2, 3, 7, h.strings_size // 2, h.strings_size - 1):
        lie(f"strings_size-{k}", "strict", strings_size=h.strings_size - k)

    offs = ["strings_off", "users_off", "groups_off", "pool_off",
            "uname_idx_off", "uid_idx_off", "gname_idx_off", "gid_idx_off"]
    for f in offs:
        cur = getattr(h, f)
        # Past EOF, below the header, misaligned, at the CRC table: refused at map time.
        for v in (0, 4, 124, 126, h.crc_off, h.crc_off + 4, h.file_size, h.file_size + 4,
                  0x7FFFFFFC, 0xFFFFFFFC, U32, cur + 1, cur + 2, cur + 3, cur - 1):
            lie(f"{f}={v:#x}", "reject", **{f: v})
    # In-bounds, aligned, but wrong: records would be read from the wrong
    # place.  The data sections must not be allowed to overlap each other.
    for f in ("strings_off", "users_off", "groups_off", "pool_off"):
        cur = getattr(h, f)
        for delta in (-8, -4, 4, 8, 48, 24):
            v = cur + delta
            if HEADER.size <= v < h.crc_off - 4:
                lie(f"{f}{delta:+d}", "lenient", **{f: v})
        for g in offs:
            if g != f:
                lie(f"{f}={g}", "lenient", **{f: getattr(h, g)})
    # Index tables moved: an index can only lead to a record whose key matches.
    for f in ("uname_idx_off", "uid_idx_off", "gname_idx_off", "gid_idx_off"):
        cur = getattr(h, f)
        for delta in (-8, -4, 4, 8):
            lie(f"{f}{delta:+d}", "lenient", **{f: cur + delta})
        for g in offs:
            if g != f:
                lie(f"{f}={g}", "lenient", **{f: getattr(h, g)})
        lie(f"{f}=crc_off-4", "lenient", **{f: h.crc_off - 4})
    for v in (0, h.crc_off - 4, h.crc_off + 4, h.crc_off + 1, h.crc_off - 2, h.file_size, U32 - 3, 128):
        lie(f"crc_off={v:#x}", "reject", crc_off=v)
    for v in (0, h.n_blocks - 1, h.n_blocks + 1, U32):
        lie(f"n_blocks={v:#x}", "reject", n_blocks=v)
    lie("crc_off+n_blocks+1", "reject", crc_off=h.crc_off - 4, n_blocks=h.n_blocks + 1)
    # Fields the NSS path ignores: answers must be unchanged (the harness also
    # feeds them to sc_is_stale, where extreme values must not overflow).
    for ca in (-(1 << 63), (1 << 63) - 1, -1, 0):
        lie(f"confirmed_at={ca}", "strict", confirmed_at=ca)
    lie("max_stale=max", "strict", max_stale=U32, confirmed_at=-(1 << 63))
    lie("generated_at=min", "strict", generated_at=-(1 << 63))
    lie("revision=max", "strict", revision=(1 << 64) - 1)
    lie("flags", "strict", flags=U32)
    lie("superseded", "strict", superseded=0xDEADBEEF)
    # The other byte order, as a big-endian writer would lay the header out.
    swapped = bytearray(d)
    for f in HEADER_FIELDS:
        code = FIELD_CODE[f]
        if code in "IQqi":
            (v,) = struct.unpack_from("=" + code, d, FIELD_OFF[f])
            struct.pack_into(">" + code, swapped, FIELD_OFF[f], v)
    out.append(Case(f"{b.name}/hdr:other-endian", "reject", b.name, bytes(swapped)))
    out.append(Case(f"{b.name}/hdr:other-endian-resealed", "reject", b.name, reseal(swapped)))
    # Trailing junk, raw and with file_size adjusted.
    out.append(Case(f"{b.name}/append", "reject", b.name, d + b"\0" * 4))
    buf = bytearray(d + b"JUNKJUNK")
    set_field(buf, "file_size", len(buf))
    out.append(Case(f"{b.name}/append-resealed", "reject", b.name, reseal(buf)))
    return out


def _record_lies(b: Base) -> list[Case]:
    d, h = b.data, header(b.data)
    out: list[Case] = []
    users = range(h.n_users) if b.name == "small" else (0, h.n_users // 2, h.n_users - 1)
    groups = range(h.n_groups) if b.name == "small" else (0, h.n_groups - 1)

    def word(tag: str, kind: str, off: int, value: int) -> None:
        buf = bytearray(d)
        put_u32(buf, off, value)
        out.append(Case(f"{b.name}/{tag}", kind, b.name, reseal(buf)))

    ss, pc = h.strings_size, h.pool_count
    for i in users:
        base = h.users_off + 4 * USER_WORDS * i
        for w, wn in ((2, "name"), (3, "gecos"), (4, "home"), (5, "shell")):
            for v in (ss, ss + 1, U32, 0x80000000):
                word(f"user{i}.{wn}={v:#x}", "strict", base + 4 * w, v)
        word(f"user{i}.name=empty", "lenient", base + 8, 0)
        word(f"user{i}.name=last-nul", "lenient", base + 8, ss - 1)
        gstart, gcount = get_u32(d, base + 24), get_u32(d, base + 28)
        pstart, pcount = get_u32(d, base + 32), get_u32(d, base + 36)
        for v in (U32, pc + 1, pc - gstart + 1, 0x40000000):
            word(f"user{i}.gids_count={v:#x}", "strict", base + 28, v)
        for v in (U32, pc + 1, pc - gcount + 1 if gcount else pc + 1):
            word(f"user{i}.gids_start={v:#x}", "strict", base + 24, v)
        for v in (U32, pc + 1, pc - pstart + 1):
            word(f"user{i}.princ_count={v:#x}", "strict", base + 36, v)
        word(f"user{i}.princ_start=max", "strict", base + 32, U32)
        word(f"user{i}.uid=0", "lenient", base, 0)
        word(f"user{i}.gid=0", "lenient", base + 4, 0)
        word(f"user{i}.access=max", "strict", base + 40, U32)
        # The user's first gid / principal points at nonsense.
        if gcount:
            word(f"user{i}.gid[0]=0", "safe", h.pool_off + 4 * gstart, 0)
        if pcount:
            for v in (ss, U32):
                word(f"user{i}.princ[0]={v:#x}", "strict", h.pool_off + 4 * pstart, v)
    for i in groups:
        base = h.groups_off + 4 * GROUP_WORDS * i
        for v in (ss, ss + 1, U32):
            word(f"group{i}.name={v:#x}", "strict", base + 4, v)
        word(f"group{i}.name=empty", "lenient", base + 4, 0)
        mstart, mcount = get_u32(d, base + 8), get_u32(d, base + 12)
        for v in (U32, 0x80000000, 0x20000000, pc + 1, pc - mstart + 1):
            word(f"group{i}.mem_count={v:#x}", "strict", base + 12, v)
        for v in (U32, pc + 1, pc - mcount + 1):
            word(f"group{i}.mem_start={v:#x}", "strict", base + 8, v)
        word(f"group{i}.gid=0", "lenient", base, 0)
        if mcount:
            for v in (ss, U32):
                word(f"group{i}.mem[0]={v:#x}", "strict", h.pool_off + 4 * mstart, v)
            word(f"group{i}.mem[0]=empty", "strict", h.pool_off + 4 * mstart, 0)
    return out


def _index_lies(b: Base) -> list[Case]:
    d, h = b.data, header(b.data)
    out: list[Case] = []
    idxs = (("uname", h.uname_idx_off, h.n_users), ("uid", h.uid_idx_off, h.n_users),
            ("gname", h.gname_idx_off, h.n_groups), ("gid", h.gid_idx_off, h.n_groups))
    for tag, off, nrec in idxs:
        nb = get_u32(d, off)
        slots = [j for j in range(nb) if get_u32(d, off + 4 + 4 * j)]
        if b.name != "small":
            slots = slots[:2] + slots[-1:]

        def mut(name: str, kind: str, edits: dict[int, int]) -> None:
            buf = bytearray(d)
            for o, v in edits.items():
                put_u32(buf, o, v)
            out.append(Case(f"{b.name}/{tag}_idx:{name}", kind, b.name, reseal(buf)))

        # Slots naming a record past the count: every probe through them is UNAVAIL.
        for j in slots:
            for v in (nrec + 1, nrec + 1000, U32):
                mut(f"slot{j}={v:#x}", "strict", {off + 4 + 4 * j: v})
        mut("all-slots-past-count", "strict", {off + 4 + 4 * j: nrec + 1 for j in slots})
        # Bucket counts that are not a power of two or do not fit: UNAVAIL.
        for v in (0, 3, 6, nb + 1, U32, 0x80000000, 0x40000000):
            mut(f"nb={v:#x}", "strict", {off: v})
        # Structurally valid but wrong tables: misses, never wrong records.
        for v in (1, 2, nb // 2, nb * 2):
            if v:
                mut(f"nb={v}", "lenient", {off: v})
        for j in slots:
            mut(f"slot{j}=0", "lenient", {off + 4 + 4 * j: 0})
            mut(f"slot{j}=other", "lenient", {off + 4 + 4 * j: (get_u32(d, off + 4 + 4 * j) % nrec) + 1})
        mut("full-of-1", "lenient", {off + 4 + 4 * j: 1 for j in range(nb)})
        mut("full-of-last", "lenient", {off + 4 + 4 * j: nrec for j in range(nb)})
        mut("empty", "lenient", {off + 4 + 4 * j: 0 for j in range(nb)})
    return out


def _string_lies(b: Base) -> list[Case]:
    d, h = b.data, header(b.data)
    out = []
    end = h.strings_off + h.strings_size
    # The section's last NUL overwritten: the last string runs into the end of
    # the section (and past it into padding / the user table if not stopped).
    for k in (1, 2, 3):
        buf = bytearray(d)
        buf[end - 1] = ord("A")
        for p in range(end, end + k - 1):
            if p < h.users_off:
                buf[p] = ord("B")
        out.append(Case(f"{b.name}/strings:last-unterminated+{k}", "strict", b.name, reseal(buf)))
    # No NUL anywhere in the section.
    buf = bytearray(d)
    for p in range(h.strings_off, end):
        if buf[p] == 0:
            buf[p] = ord("Z")
    out.append(Case(f"{b.name}/strings:no-nul", "strict", b.name, reseal(buf)))
    # ... and the padding after it too.
    for p in range(end, h.users_off):
        buf[p] = ord("Z")
    out.append(Case(f"{b.name}/strings:no-nul-no-pad", "strict", b.name, reseal(buf)))
    # Non-UTF-8 / control bytes inside strings: just different data.
    buf = bytearray(d)
    for p in range(h.strings_off + 1, end, 7):
        if buf[p]:
            buf[p] = 0xFF
    out.append(Case(f"{b.name}/strings:binary", "safe", b.name, reseal(buf)))
    return out


def _flips(b: Base, rng: random.Random, n_raw: int, n_sealed: int) -> list[Case]:
    d = b.data
    out = []
    for i in range(n_raw + n_sealed):
        buf = bytearray(d)
        r = rng.random()
        if r < 0.6:  # one bit
            p = rng.randrange(len(buf))
            buf[p] ^= 1 << rng.randrange(8)
            what = f"bit@{p}"
        elif r < 0.85:  # one byte, any value but the original
            p = rng.randrange(len(buf))
            buf[p] ^= rng.randrange(1, 256)
            what = f"byte@{p}"
        else:  # a short burst of random bytes
            p = rng.randrange(len(buf))
            n = rng.randrange(2, 16)
            old = bytes(buf[p:p + n])
            new = bytes(rng.randrange(256) for _ in range(len(old)))
            if new == old:
                new = bytes(x ^ 0x55 for x in old)
            buf[p:p + n] = new
            what = f"burst@{p}+{len(old)}"
        # `superseded` is written in place by design and outside every
        # checksum; a flip there is not damage (covered by the "superseded" lie).
        buf[SUPERSEDED_OFFSET:SUPERSEDED_OFFSET + 4] = d[SUPERSEDED_OFFSET:SUPERSEDED_OFFSET + 4]
        if bytes(buf) == d:
            continue
        if i < n_raw:
            out.append(Case(f"{b.name}/flip{i}:{what}", "strict", b.name, bytes(buf)))
        else:
            out.append(Case(f"{b.name}/flip{i}-resealed:{what}", "safe", b.name, reseal(buf)))
    return out


def corpus(seed: int = 20240601) -> list[Case]:
    bs = bases()
    rng = random.Random(seed)
    cases: list[Case] = []
    for b in bs.values():
        cases += _truncations(b)
        cases += _header_lies(b)
        cases += _record_lies(b)
        cases += _index_lies(b)
        cases += _string_lies(b)
    cases += _flips(bs["small"], rng, 250, 150)
    cases += _flips(bs["medium"], rng, 100, 60)
    # Things at the cache path that are not a cache file.
    cases += [
        Case("fs/empty", "reject", "small", b""),
        Case("fs/missing", "reject", "small", special="missing"),
        Case("fs/dir", "reject", "small", special="dir"),
        Case("fs/fifo", "reject", "small", special="fifo"),
        Case("fs/not-root-owned", "reject", "small", special="not_root", secure=True),
        Case("fs/world-writable", "reject", "small", special="world_writable", secure=True),
        Case("fs/group-writable", "reject", "small", special="group_writable", secure=True),
        Case("fs/setuid-root-ok", "strict", "small", special="setuid", secure=True),
        Case("fs/root-owned-0644", "strict", "small", bs["small"].data, secure=True),
        # Without the ownership requirement the same files are just valid caches.
        Case("fs/not-root-owned-insecure", "strict", "small", special="not_root"),
        Case("fs/world-writable-insecure", "strict", "small", special="world_writable"),
    ]
    # Different formulas can land on the same value (e.g. crc_off == file_size - 4
    # for a one-block file): keep one case per name.
    return list({c.name: c for c in reversed(cases)}.values())[::-1]


def materialize(case: Case, directory: Path, index: int, base_data: bytes) -> Path:
    """Create the thing the case describes at a fresh path under `directory`."""
    path = directory / f"case{index:05d}.cache"
    sp = case.special
    if sp is None:
        path.write_bytes(case.data or b"")
        os.chmod(path, 0o644)
    elif sp == "missing":
        pass
    elif sp == "dir":
        path.mkdir()
    elif sp == "fifo":
        os.mkfifo(path)
    else:
        path.write_bytes(base_data)
        if sp == "not_root":
            os.chown(path, 1000, 1000)
        # chmod after chown: chown clears the setuid bit.
        os.chmod(path, {"not_root": 0o644, "world_writable": 0o666, "group_writable": 0o664,
                        "setuid": 0o4644}[sp])
    return path


def needs_root(case: Case) -> bool:
    return case.special in ("not_root", "setuid") or (case.secure and case.special is None)
