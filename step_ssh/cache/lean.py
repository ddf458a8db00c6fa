"""Low-level, memory-lean pieces for writing a cache file section by section.

`writer.build` returns the whole file as one bytes object, which is simple and
fine for `cache build`. The agent publishes views of 100k users on hosts where
its memory matters, so it builds the sections as compact arrays and streams
them into the temporary file with `write_sections`, computing the block
checksums on the way (step_ssh.agent.publish). Same format, same header rules
(docs/cache-format.md); the reader cannot tell the writers apart.
"""
from __future__ import annotations

import zlib
from array import array
from pathlib import Path
from typing import Sequence, Union

from step_ssh.cache.format import BLOCK_SIZE, BYTE_ORDER, HEADER, MAGIC, VERSION, Header
from step_ssh.cache.replace import superseding
from step_ssh.fsutil import replacing

Section = Union[array, bytearray, bytes]


def fnv1a(data: bytes) -> int:
    """format.fnv1a with the loop kept tight (it runs once per name)."""
    h = 2166136261
    for b in data:
        h = ((h ^ b) * 16777619) & 0xFFFFFFFF
    return h


_FNV_OFFSET, _FNV_PRIME = 2166136261, 16777619


def fnv1a_table(buf, offsets: Sequence[int], lengths: Sequence[int]) -> array:
    """fnv1a of every string buf[offsets[i]:offsets[i]+lengths[i]], computed
    for all strings of one length at once.

    A Python loop over every byte of 100k names costs ~0.3 s. Instead each
    string gets a 64-bit lane of one big integer: XOR with the lane-packed
    next bytes, multiply by the FNV prime and mask each lane back to 32 bits.
    A lane never carries into the next (h < 2**32 and the prime < 2**25, so
    h * prime < 2**57), so one big-int operation steps every string at once."""
    out = array("I", bytes(4 * len(offsets)))
    by_len: dict[int, array] = {}
    for i, n in enumerate(lengths):
        a = by_len.get(n)
        if a is None:
            a = by_len[n] = array("I")
        a.append(i)
    mv = memoryview(buf)
    for n, idxs in by_len.items():
        k = len(idxs)
        if k < 8:  # not worth the packing
            for i in idxs:
                out[i] = fnv1a(bytes(mv[offsets[i]:offsets[i] + n]))
            continue
        flat = bytearray(k * n)
        pos = 0
        for i in idxs:
            o = offsets[i]
            flat[pos:pos + n] = mv[o:o + n]
            pos += n
        mask = int.from_bytes(b"\xff\xff\xff\xff\0\0\0\0" * k, "little")
        h = int.from_bytes(_FNV_OFFSET.to_bytes(8, "little") * k, "little")
        lanes = bytearray(8 * k)
        for j in range(n):
            lanes[0::8] = flat[j::n]
            h = ((h ^ int.from_bytes(lanes, "little")) * _FNV_PRIME) & mask
        vals = array("Q")
        vals.frombytes(h.to_bytes(8 * k, "little"))
        for i, v in zip(idxs, vals):
            out[i] = v
    return out


def index_table(keys: Sequence[int]) -> array:
    """Open-addressing table as writer._index builds it: u32 bucket count
    (a power of two, at least twice the keys), then slots holding idx+1."""
    nb = 8
    while nb < 2 * len(keys):
        nb *= 2
    slots = array("I", [0]) * (nb + 1)
    slots[0] = nb
    mask = nb - 1
    i = 0
    for h in keys:
        i += 1
        j = (h & mask) + 1
        while slots[j]:
            j = (j & mask) + 1  # (j-1+1) & mask, shifted past the count word
        slots[j] = i
    return slots


class _BlockCrc:
    """CRC-32 of every BLOCK_SIZE block of a byte stream fed in pieces."""

    def __init__(self) -> None:
        self.crcs = array("I")
        self.cur = 0
        self.fill = 0

    def feed(self, mv: memoryview) -> None:
        pos, n = 0, len(mv)
        while pos < n:
            take = min(BLOCK_SIZE - self.fill, n - pos)
            self.cur = zlib.crc32(mv[pos:pos + take], self.cur)
            self.fill += take
            pos += take
            if self.fill == BLOCK_SIZE:
                self.crcs.append(self.cur)
                self.cur, self.fill = 0, 0

    def finish(self) -> array:
        if self.fill:
            self.crcs.append(self.cur)
            self.cur, self.fill = 0, 0
        return self.crcs


def _bytes(s: Section) -> memoryview:
    return memoryview(s).cast("B")


def write_sections(path: str | Path, parts: list, *, mode: int, strings_size: int, pool_count: int,
                   **fields) -> Header:
    """Write the eight sections in the order writer.build lays them out
    (strings, users, groups, pool, then the user-name, uid, group-name and gid
    indexes) to a temporary file next to `path`, fill in the header last,
    fsync, rename over `path`, fsync the directory and flag the replaced file
    as superseded (as replace.publish_bytes does).

    `parts` holds each section (4-byte aligned) or a callable that builds it;
    every entry is dropped from the list once written, so a caller that keeps
    no other reference has at most one index table and none of the written
    sections in memory at a time. `fields` are the remaining header fields
    (revision, generated_at, confirmed_at, max_stale, flags, n_users, n_groups)."""
    assert len(parts) == 8
    with superseding(path), replacing(path, mode) as f:  # docs/cache-format.md: `superseded`
        f.write(b"\0" * HEADER.size)
        crc = _BlockCrc()
        offsets = []
        pos = HEADER.size
        for k in range(len(parts)):
            part = parts[k]
            parts[k] = None
            if callable(part):
                part = part()
            mv = _bytes(part)
            assert len(mv) % 4 == 0, "sections are 4-byte aligned"
            offsets.append(pos)
            pos += len(mv)
            crc.feed(mv)
            f.write(mv)
            del mv, part
        crc_off = pos
        crcs = crc.finish()
        table = crcs.tobytes()
        f.write(table)
        header = Header(
            magic=MAGIC, version=VERSION, byte_order=BYTE_ORDER, header_size=HEADER.size,
            block_size=BLOCK_SIZE, file_size=crc_off + len(table),
            strings_off=offsets[0], strings_size=strings_size, users_off=offsets[1],
            groups_off=offsets[2], pool_off=offsets[3], pool_count=pool_count,
            uname_idx_off=offsets[4], uid_idx_off=offsets[5], gname_idx_off=offsets[6],
            gid_idx_off=offsets[7], crc_off=crc_off, n_blocks=len(crcs), header_crc=0,
            superseded=0, **fields,
        )
        header.header_crc = zlib.crc32(table, zlib.crc32(header.pack()))
        f.seek(0)
        f.write(header.pack())
    return header
