"""Cache format v1 constants and hashes, mirrored from nss_shim/cache.h.

docs/cache-format.md is the specification; change all three together.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

MAGIC = b"STEPSSHC"
VERSION = 1
BYTE_ORDER = 0x01020304
BLOCK_SIZE = 4096
FLAG_BASTION = 1
CACHE_MODE = 0o644  # NSS runs in every process: the cache must be world-readable

# Native byte order: the cache is written and read on the same host, and the
# byte_order field lets a reader on the other endianness refuse it.
HEADER = struct.Struct("=8sIIIIQQqq" + "I" * 18)
HEADER_FIELDS = (
    "magic version byte_order header_size block_size file_size revision generated_at "
    "confirmed_at max_stale flags n_users n_groups strings_off strings_size users_off "
    "groups_off pool_off pool_count uname_idx_off uid_idx_off gname_idx_off gid_idx_off "
    "crc_off n_blocks header_crc superseded"
).split()
assert HEADER.size == 128
# Byte offset of `superseded`, the one field written after publication.
SUPERSEDED_OFFSET = HEADER.size - 4
USER_WORDS = 12  # struct sc_user_rec
GROUP_WORDS = 6  # struct sc_group_rec


def fnv1a(data: bytes) -> int:
    h = 2166136261
    for b in data:
        h = ((h ^ b) * 16777619) & 0xFFFFFFFF
    return h


def mix32(h: int) -> int:
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    h ^= h >> 16
    return h


@dataclass
class Header:
    magic: bytes
    version: int
    byte_order: int
    header_size: int
    block_size: int
    file_size: int
    revision: int
    generated_at: int
    confirmed_at: int
    max_stale: int
    flags: int
    n_users: int
    n_groups: int
    strings_off: int
    strings_size: int
    users_off: int
    groups_off: int
    pool_off: int
    pool_count: int
    uname_idx_off: int
    uid_idx_off: int
    gname_idx_off: int
    gid_idx_off: int
    crc_off: int
    n_blocks: int
    header_crc: int
    superseded: int

    @classmethod
    def parse(cls, data: bytes) -> "Header":
        if len(data) < HEADER.size:
            raise ValueError(f"file is {len(data)} bytes, shorter than the {HEADER.size}-byte header")
        h = cls(*HEADER.unpack_from(data))
        if h.magic != MAGIC:
            raise ValueError(f"not a step-ssh cache (magic {h.magic!r}, expected {MAGIC!r})")
        if h.byte_order != BYTE_ORDER:
            raise ValueError("written on a host with the other byte order")
        if h.version != VERSION:
            raise ValueError(f"format version {h.version}, this build reads version {VERSION}")
        return h

    def pack(self) -> bytes:
        return HEADER.pack(*(getattr(self, f) for f in HEADER_FIELDS))
