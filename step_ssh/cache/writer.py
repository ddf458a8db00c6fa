"""Build a cache file from a HostView and publish it atomically."""
from __future__ import annotations

import time
import zlib
from array import array
from pathlib import Path
from typing import Optional

from step_ssh.cache.format import (
    BLOCK_SIZE,
    BYTE_ORDER,
    FLAG_BASTION,
    GROUP_WORDS,
    HEADER,
    MAGIC,
    USER_WORDS,
    VERSION,
    Header,
    fnv1a,
    mix32,
)
from step_ssh.cache.replace import publish_bytes, retire  # noqa: F401  (re-exported)
from step_ssh.cache.local import LocalAccounts, ViewRejected, check_against_local
from step_ssh.limits import JUMP_GID, JUMP_GROUP
from step_ssh.view import ACCESS_CODES, DEFAULT_MIN_ID, Access, Group, HostView



class _Strings:
    """Deduplicated NUL-terminated string table; offset 0 is the empty string."""

    def __init__(self) -> None:
        self.buf = bytearray(b"\0")
        self.offsets: dict[str, int] = {"": 0}

    def add(self, s: str) -> int:
        off = self.offsets.get(s)
        if off is None:
            off = len(self.buf)
            self.buf += s.encode("utf-8") + b"\0"
            self.offsets[s] = off
        return off


def effective_groups(view: HostView) -> list[Group]:
    """The groups as served: the directory's, the sudo group, on a bastion
    the jump group, then a user-private group for every primary gid no group
    has."""
    groups = list(view.groups)
    sudoers = [u.name for u in view.users if u.access == Access.sudo]
    groups.append(Group(name=view.sudo_group.name, gid=view.sudo_group.gid, members=sudoers))
    if view.bastion:
        jumpers = [u.name for u in view.users if u.access == Access.jump]
        groups.append(Group(name=JUMP_GROUP, gid=JUMP_GID, members=jumpers))
    have = {g.gid for g in groups}
    for u in view.users:
        if u.gid not in have:
            groups.append(Group(name=u.name, gid=u.gid))
            have.add(u.gid)
    return groups


def _index(keys: list[int]) -> array:
    """Open-addressing table: u32 bucket count (power of two), then slots of idx+1."""
    nb = 8
    while nb < 2 * len(keys):
        nb *= 2
    slots = array("I", bytes(4 * (nb + 1)))
    slots[0] = nb
    mask = nb - 1
    for i, h in enumerate(keys):
        j = h & mask
        while slots[1 + j]:
            j = (j + 1) & mask
        slots[1 + j] = i + 1
    return slots


def build(view: HostView, now: Optional[int] = None) -> bytes:
    """Serialize a validated view. Pure: no checks against the host's files."""
    now = int(time.time()) if now is None else now
    confirmed = view.confirmed_at if view.confirmed_at is not None else now
    strings = _Strings()
    pool = array("I")
    groups = effective_groups(view)

    member_gids: dict[str, list[int]] = {}
    for g in groups:
        for m in g.members:
            member_gids.setdefault(m, []).append(g.gid)

    users = array("I")
    for u in view.users:
        gids = list(dict.fromkeys(member_gids.get(u.name, [])))
        gstart = len(pool)
        pool.extend(gids)
        pstart = len(pool)
        pool.extend(strings.add(p) for p in u.principals)
        users.extend((
            u.uid, u.gid, strings.add(u.name), strings.add(u.gecos), strings.add(u.home_dir),
            strings.add(u.shell), gstart, len(gids), pstart, len(u.principals),
            ACCESS_CODES[u.access], 0,
        ))
    grecs = array("I")
    for g in groups:
        mstart = len(pool)
        pool.extend(strings.add(m) for m in g.members)
        grecs.extend((g.gid, strings.add(g.name), mstart, len(g.members), 0, 0))
    assert len(users) == USER_WORDS * len(view.users) and len(grecs) == GROUP_WORDS * len(groups)

    sections: list[bytes] = []
    offsets: list[int] = []
    pos = HEADER.size

    def place(data: bytes) -> int:
        nonlocal pos
        data = data + b"\0" * (-len(data) % 4)
        offsets.append(pos)
        sections.append(data)
        start, pos = pos, pos + len(data)
        return start

    strings_size = len(strings.buf)
    strings_off = place(bytes(strings.buf))
    users_off = place(users.tobytes())
    groups_off = place(grecs.tobytes())
    pool_off = place(pool.tobytes())
    uname = place(_index([fnv1a(u.name.encode()) for u in view.users]).tobytes())
    uid = place(_index([mix32(u.uid) for u in view.users]).tobytes())
    gname = place(_index([fnv1a(g.name.encode()) for g in groups]).tobytes())
    gid = place(_index([mix32(g.gid) for g in groups]).tobytes())
    data = b"".join(sections)
    crc_off = pos
    crcs = array("I", (zlib.crc32(data[i:i + BLOCK_SIZE]) for i in range(0, len(data), BLOCK_SIZE)))
    header = Header(
        magic=MAGIC, version=VERSION, byte_order=BYTE_ORDER, header_size=HEADER.size,
        block_size=BLOCK_SIZE, file_size=crc_off + 4 * len(crcs), revision=view.revision,
        generated_at=now, confirmed_at=confirmed, max_stale=view.max_stale_seconds,
        flags=FLAG_BASTION if view.bastion else 0, n_users=len(view.users), n_groups=len(groups),
        strings_off=strings_off, strings_size=strings_size, users_off=users_off,
        groups_off=groups_off, pool_off=pool_off, pool_count=len(pool), uname_idx_off=uname,
        uid_idx_off=uid, gname_idx_off=gname, gid_idx_off=gid, crc_off=crc_off,
        n_blocks=len(crcs), header_crc=0, superseded=0,
    )
    crc_table = crcs.tobytes()
    header.header_crc = zlib.crc32(crc_table, zlib.crc32(header.pack()))
    return header.pack() + data + crc_table


def write_cache(
    view: HostView,
    path: str | Path,
    *,
    local: Optional[LocalAccounts] = None,
    min_id: int = DEFAULT_MIN_ID,
    now: Optional[int] = None,
) -> bytes:
    """Check the view against the host's accounts, then build and publish it.
    Raises ViewRejected (listing every problem) before touching `path`."""
    local = local if local is not None else LocalAccounts.load()
    problems = check_against_local(view, local, min_id)
    if problems:
        raise ViewRejected(problems)
    data = build(view, now=now)
    publish_bytes(data, path)
    return data
