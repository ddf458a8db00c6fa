"""From the control plane's view (``stepssh_pb2.HostView``) to a published cache.

One pass over the users validates every entry with the rules of
``step_ssh.view`` (names `useradd` accepts, ids in range, no ``:`` or newlines
in fields, principals without spaces) and the host's own accounts
(``step_ssh.cache.local``: local names and ids always win, nothing below
``min_id``), and writes the records of those that pass. An entry that fails is
*dropped* and reported, never published; the rest of the view still is, so one
bad entry cannot freeze revocations. Only a broken host setting (the sudo
group colliding with a local group) refuses the whole view.

The cache has the semantics of ``writer.build`` (see step_ssh.cache.lean and
docs/cache-format.md); tests/test_agent_publish.py checks both agree through
the C reader.
"""
from __future__ import annotations

import gc
import re
import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from step_ssh.cache.format import FLAG_BASTION, GROUP_WORDS, USER_WORDS, Header, mix32
from step_ssh.cache.lean import fnv1a_table, index_table, write_sections
from step_ssh.cache.local import LocalAccounts, ViewRejected, group_conflicts
from step_ssh.cache.format import CACHE_MODE
from step_ssh.proto import stepssh_pb2 as pb
from step_ssh.limits import (
    DEFAULT_MAX_STALE,
    DEFAULT_SUDO_GID,
    DEFAULT_SUDO_GROUP,
    JUMP_GID,
    JUMP_GROUP,
    MAX_ID,
    NAME_MAX,
    NAME_RE,
    PRINCIPAL_RE,
)

DEFAULT_SHELL = "/bin/bash"
_NAME_OK = NAME_RE.match
_PRINCIPAL_OK = PRINCIPAL_RE.match
_BAD_FIELD = re.compile(r"[:\n\r\x00]").search
_ACCESS_SUDO = pb.ACCESS_SUDO
_ACCESS_JUMP = pb.ACCESS_JUMP
_JUMP_RESERVED = f"the name {JUMP_GROUP} is reserved for the group of jump-only users (sshd confines its members)"
_ACCESS_VALID = frozenset((pb.ACCESS_NONE, pb.ACCESS_SSH, pb.ACCESS_SUDO, pb.ACCESS_JUMP))
# an OpenSSH public key line: type, base64 blob, optional comment
_SSH_KEY = re.compile(r"^(ssh-[a-z0-9-]+|ecdsa-sha2-[a-z0-9-]+|sk-[a-z0-9@.-]+)(-cert-v01@openssh\.com)? "
                      r"[A-Za-z0-9+/]+={0,3}( [^\n\r\x00]*)?$")
_SHARED_LIMIT = 4096  # distinct repeated strings (shells, shared principals) kept deduplicated


@dataclass
class Published:
    header: Header
    problems: list[str]
    ca_keys: list[str]
    users: int
    groups: int
    seconds: float
    path: Path = field(default_factory=Path)


def sudo_group_of(view) -> tuple[str, int]:
    s = view.settings
    return (s.sudo_group_name or DEFAULT_SUDO_GROUP, s.sudo_group_gid or DEFAULT_SUDO_GID)


def max_stale_of(view) -> int:
    return view.settings.max_stale_seconds or DEFAULT_MAX_STALE


def ca_keys_of(view) -> tuple[list[str], list[str]]:
    """(valid OpenSSH public key lines, problems) from the host settings."""
    keys, problems = [], []
    for k in view.settings.ssh_user_ca_keys:
        line = k.strip()
        if _SSH_KEY.match(line):
            keys.append(line)
        else:
            problems.append(f"SSH user CA key {line[:40]!r}... dropped: not an OpenSSH public key line")
    return list(dict.fromkeys(keys)), problems


def _name_problem(name: str) -> Optional[str]:
    if len(name) > NAME_MAX or not _NAME_OK(name):
        return (f"{name!r} is not a valid account name (1-{NAME_MAX} characters, lower-case letters, "
                "digits, '_' or '-', starting with a letter or '_')")
    return None


def publish_view(
    view,
    path: str | Path,
    local: LocalAccounts,
    min_id: int,
    *,
    confirmed_at: Optional[int] = None,
    now: Optional[int] = None,
    mode: int = CACHE_MODE,
) -> Published:
    """`view` is a RawView (or a parsed pb.HostView). Validate it against the rules and the host's accounts, drop what
    fails, and atomically publish the rest at `path`. Raises ViewRejected
    (nothing written) only when the sudo group itself is unusable."""
    t0 = time.perf_counter()
    gc_was = gc.isenabled()
    gc.disable()  # the passes allocate nothing cyclic; collections only cost time
    try:
        result = _Build(view, local, min_id).run(path, confirmed_at, now, mode)
    finally:
        if gc_was:
            gc.enable()
    result.seconds = time.perf_counter() - t0
    result.path = Path(path)
    return result


class _Names:
    """name -> user index, for 100k names in ~3 MB instead of a dict's ~11.

    Open addressing on Python's (randomized, 64-bit) str hash, in two arrays;
    a hit is confirmed against the name's bytes in the string table, so the
    answer is exact. Only accepted users are added."""

    def __init__(self, capacity: int, strings: bytearray, name_off: array, name_len: array):
        nb = 8
        while nb < 2 * capacity:
            nb *= 2
        self.mask = nb - 1
        self.hashes = array("q", bytes(8 * nb))
        self.slots = array("I", bytes(4 * nb))  # user index + 1; 0: empty
        self.strings, self.name_off, self.name_len = strings, name_off, name_len
        self.count = 0

    def _find(self, name: str, b: Optional[bytes] = None) -> tuple[int, int]:
        """(slot, user index or -1)."""
        h = hash(name)
        mask, hashes, slots = self.mask, self.hashes, self.slots
        j = h & mask
        while True:
            s = slots[j]
            if not s:
                return j, -1
            if hashes[j] == h:
                i = s - 1
                off = self.name_off[i]
                if b is None:
                    b = name.encode()
                if len(b) == self.name_len[i] and self.strings[off:off + len(b)] == b:
                    return j, i
            j = (j + 1) & mask

    def get(self, name: str) -> Optional[int]:
        if not self.count:
            return None
        i = self._find(name)[1]
        return i if i >= 0 else None

    def add_at(self, slot: int, name: str, i: int) -> None:
        if self.count * 2 >= self.mask:  # cannot happen with capacity right; grow anyway
            self._grow()
            slot = self._find(name)[0]
        self.hashes[slot] = hash(name)
        self.slots[slot] = i + 1
        self.count += 1

    def _grow(self) -> None:
        old_h, old_s = self.hashes, self.slots
        nb = (self.mask + 1) * 2
        self.mask = nb - 1
        self.hashes = array("q", bytes(8 * nb))
        self.slots = array("I", bytes(4 * nb))
        for h, sv in zip(old_h, old_s):
            if sv:
                j = h & self.mask
                while self.slots[j]:
                    j = (j + 1) & self.mask
                self.hashes[j] = h
                self.slots[j] = sv


def _group_name_off(name: str, names: _Names, name_off: array, strings: bytearray) -> int:
    """Where a group's name is in the string table: a user's name is reused."""
    j = names.get(name)
    if j is not None:
        return name_off[j]
    off = len(strings)
    strings += name.encode()
    strings.append(0)
    return off


class _PbSource:
    """A parsed pb.HostView seen through RawView's interface."""

    def __init__(self, view: pb.HostView):
        self.view = view
        self.revision = view.revision
        self.settings = view.settings
        self.n_users = len(view.users)

    def iter_users(self):
        return iter(self.view.users)

    def iter_groups(self):
        return iter(self.view.groups)


def _source(view):
    return _PbSource(view) if isinstance(view, pb.HostView) else view


class _Restart(Exception):
    def __init__(self, dup_uids: frozenset[int]):
        self.dup_uids = dup_uids


class _Build:
    def __init__(self, view, local: LocalAccounts, min_id: int):
        self.view = _source(view)
        self.local = local
        self.min_id = min_id

    def run(self, path, confirmed_at, now, mode) -> Published:
        try:
            return self._run(path, confirmed_at, now, mode, frozenset())
        except _Restart as r:  # rare: a uid listed twice; now we know which
            return self._run(path, confirmed_at, now, mode, r.dup_uids)

    # -- groups (before users: a user's private group depends on them) --------
    def _groups(self, sudo: tuple[str, int], problems: list[str]) -> list[bool]:
        local, min_id = self.local, self.min_id
        sname, sgid = sudo
        bad = []
        why = _name_problem(sname)
        if why:
            bad.append(f"sudo group: {why}")
        if not 0 < sgid <= MAX_ID:
            bad.append(f"sudo group {sname}: gid {sgid} is out of range")
        bad += [f"sudo group {sname}: {w}" for w in group_conflicts(sname, sgid, local, min_id)]
        names = {sname: sgid}
        gids = {sgid: sname}
        if self.view.settings.bastion:
            bad += [f"jump group {JUMP_GROUP}: {w} (it is fixed: rename or renumber the local group, lower the "
                    f"agent's min_id, or clear this host's bastion flag)"
                    for w in group_conflicts(JUMP_GROUP, JUMP_GID, local, min_id)]
            if JUMP_GROUP == sname or JUMP_GID == sgid:
                bad.append(f"sudo group {sname} ({sgid}) collides with the jump group {JUMP_GROUP} ({JUMP_GID})")
            names[JUMP_GROUP] = JUMP_GID
            gids[JUMP_GID] = JUMP_GROUP
        if bad:
            raise ViewRejected(bad + ["the sudo and jump groups are host settings: fix them at the control "
                                      "plane or on this host (nothing was published; the previous cache stays)"])
        keep = []
        for g in self.view.iter_groups():
            name, gid = g.name, g.gid
            why = _name_problem(name)
            if why is None and not 0 < gid <= MAX_ID:
                why = f"gid {gid} is out of range"
            if why is None and name == JUMP_GROUP and not self.view.settings.bastion:
                why = _JUMP_RESERVED
            if why is None and name in names:
                why = f"name already used by the group with gid {names[name]}"
            if why is None and gid in gids:
                why = f"gid {gid} already used by group {gids[gid]}"
            if why is None:
                w = group_conflicts(name, gid, local, min_id)
                why = "; ".join(w) if w else None
            if why:
                problems.append(f"group {name!r} (gid {gid}) dropped: {why}")
                keep.append(False)
                continue
            names[name] = gid
            gids[gid] = name
            keep.append(True)
        self.group_names = names
        self.group_gids = gids
        return keep

    def _run(self, path, confirmed_at, now, mode, dup_uids: frozenset[int]) -> Published:
        view, local, min_id = self.view, self.local, self.min_id
        now = int(time.time()) if now is None else now
        problems: list[str] = []
        sudo = sudo_group_of(view)
        group_keep = self._groups(sudo, problems)
        ca_keys, ca_problems = ca_keys_of(view)

        strings = bytearray(b"\0")
        shared: dict[str, int] = {"": 0}
        name_off = array("I")
        name_len = array("I")
        names = _Names(getattr(view, "n_users", 0) or 1024, strings, name_off, name_len)
        find = names._find
        uid_h = array("I")
        uids = array("I")
        primary = array("I")
        sudoers = array("I")
        jumpers = array("I")
        pool = array("I")        # principals now; gids and members appended later
        urecs = array("I")
        dropped: set[str] = set()
        seen_dup_uids: set[int] = set()
        bastion = bool(view.settings.bastion)
        local_users, local_uids = local.user_names, local.uids
        local_groups, local_gids = local.group_names, local.gids
        group_names, group_gids = self.group_names, self.group_gids

        for u in view.iter_users():
            name, uid, gid, access = u.name, u.uid, u.gid, u.access
            why = _name_problem(name)
            if why is None:
                if not 0 < uid <= MAX_ID:
                    why = f"uid {uid} is out of range"
                elif not 0 < gid <= MAX_ID:
                    why = f"gid {gid} is out of range"
                elif access not in _ACCESS_VALID:
                    why = f"unknown access value {access}"
                elif name == JUMP_GROUP:
                    why = _JUMP_RESERVED
                elif gid == JUMP_GID and bastion and access != _ACCESS_JUMP:
                    why = f"primary gid {JUMP_GID} is the jump group's on a bastion (it would confine the user)"
                else:
                    slot, dup = find(name)
                    if dup >= 0:
                        why = "listed twice"
            if why is None:
                gecos, home, shell = u.gecos, u.home, u.shell
                principals = list(u.principals)
                if gecos and _BAD_FIELD(gecos):
                    why = "gecos contains ':', a newline or NUL"
                elif home and (_BAD_FIELD(home) or home[0] != "/"):
                    why = f"home {home!r} is not an absolute path without ':' or newlines"
                elif shell and (_BAD_FIELD(shell) or shell[0] != "/"):
                    why = f"shell {shell!r} is not an absolute path without ':' or newlines"
                else:
                    for p in principals:
                        if not _PRINCIPAL_OK(p):
                            why = f"principal {p!r} has spaces, commas or control characters"
                            break
            if why is None:
                w = []
                if name in local_users:
                    w.append(f"name is a local account (uid {local_users[name]})")
                if uid in local_uids:
                    w.append(f"uid {uid} belongs to local user {local_uids[uid]}")
                if uid < min_id:
                    w.append(f"uid {uid} is below the minimum {min_id}")
                if gid < min_id:
                    w.append(f"gid {gid} is below the minimum {min_id}")
                if not w and uid in dup_uids:
                    if uid in seen_dup_uids:
                        w.append(f"uid {uid} is already used by another user in this view")
                    seen_dup_uids.add(uid)
                if not w and gid not in group_gids:
                    # a private group NAME/gid is synthesized: it must be free
                    # (checked for every such user, as HostView validation does)
                    if name in group_names:
                        w.append(f"its primary gid {gid} has no group and the group name {name!r} "
                                 f"is taken by gid {group_names[name]}")
                    if name in local_groups:
                        w.append(f"its private group name is a local group (gid {local_groups[name]})")
                    if gid in local_gids:
                        w.append(f"its private group gid {gid} belongs to local group {local_gids[gid]}")
                why = "; ".join(w) if w else None
            if why is not None:
                problems.append(f"user {name!r} (uid {uid}) dropped: {why}")
                dropped.add(name)
                continue

            # -- accepted: emit -------------------------------------------------
            i = len(primary)
            b = name.encode()
            noff = len(strings)
            strings += b
            strings.append(0)
            name_off.append(noff)
            name_len.append(len(b))
            h = uid ^ (uid >> 16)
            h = (h * 0x85EBCA6B) & 0xFFFFFFFF
            h ^= h >> 13
            h = (h * 0xC2B2AE35) & 0xFFFFFFFF
            uid_h.append(h ^ (h >> 16))
            uids.append(uid)
            primary.append(gid)
            if access == _ACCESS_SUDO:
                sudoers.append(i)
            elif access == _ACCESS_JUMP:
                jumpers.append(i)
            if gecos:
                goff = len(strings)
                strings += gecos.encode()
                strings.append(0)
            else:
                goff = 0
            hoff = len(strings)
            strings += home.encode() if home else b"/home/" + b
            strings.append(0)
            shell = shell or DEFAULT_SHELL
            soff = shared.get(shell)
            if soff is None:
                soff = len(strings)
                strings += shell.encode()
                strings.append(0)
                if len(shared) < _SHARED_LIMIT:
                    shared[shell] = soff
            pstart = len(pool)
            if len(principals) > 1:
                principals = list(dict.fromkeys(principals))
            for p in principals:
                if p == name:  # the usual principal: the user's own name
                    pool.append(noff)
                    continue
                j = find(p)[1] if names.count else -1
                if j >= 0:
                    pool.append(name_off[j])
                    continue
                poff = shared.get(p)
                if poff is None:
                    poff = len(strings)
                    strings += p.encode()
                    strings.append(0)
                    if len(shared) < _SHARED_LIMIT:
                        shared[p] = poff
                pool.append(poff)
            urecs.extend((uid, gid, noff, goff, hoff, soff, 0, 0, pstart, len(principals), access, 0))
            names.add_at(slot, name, i)

        n = len(primary)
        # -- members: only users that made it; unknown names are reported ------
        member_lists = []
        kept_groups = []  # (name, gid, name offset in the string table)
        seen = bytearray(n)  # members listed twice count once (a bitmap, not a set of ints)
        for g, keep in zip(view.iter_groups(), group_keep):
            if not keep:
                continue
            idx = array("I")
            for m in g.members:
                j = names.get(m)
                if j is not None:
                    if not seen[j]:
                        seen[j] = 1
                        idx.append(j)
                elif m not in dropped:
                    problems.append(f"group {g.name!r}: member {m!r} is not a user in this view (ignored)")
            for j in idx:
                seen[j] = 0
            member_lists.append(idx)
            kept_groups.append((g.name, g.gid, _group_name_off(g.name, names, name_off, strings)))
        member_lists.append(sudoers)
        kept_groups.append((sudo[0], sudo[1], _group_name_off(sudo[0], names, name_off, strings)))
        if view.settings.bastion:
            member_lists.append(jumpers)
            kept_groups.append((JUMP_GROUP, JUMP_GID, _group_name_off(JUMP_GROUP, names, name_off, strings)))
        del names, find, dropped, seen

        if not dup_uids and n > 1:
            s = sorted(uids)
            dups = frozenset(a for a, b in zip(s, s[1:]) if a == b)
            del s
            if dups:
                raise _Restart(dups)
        del uids

        # -- private groups: the first user of each gid no group has ------------
        upg = array("I")
        if n:
            # (gid, index) packed in one int: sorting puts each gid's first user first
            order = sorted(array("Q", [(g << 32) | i for i, g in enumerate(primary)]))
            prev = -1
            for key in order:
                g = key >> 32
                if g != prev:
                    prev = g
                    if g not in group_gids:
                        upg.append(key & 0xFFFFFFFF)
            del order
            upg = array("I", sorted(upg))

        # -- supplementary gids per user (CSR in group order), after principals
        count = array("I", bytes(4 * (n + 1)))
        for ml in member_lists:
            for i in ml:
                count[i + 1] += 1
        for i in range(n):
            count[i + 1] += count[i]
        base = len(pool)
        pool.frombytes(bytes(4 * count[n]))
        fill = array("I", count[:n])
        for (_name, gid, _off), ml in zip(kept_groups, member_lists):
            for i in ml:
                pool[base + fill[i]] = gid
                fill[i] += 1
        del fill
        for i in range(n):
            r = i * USER_WORDS
            urecs[r + 6] = base + count[i]
            urecs[r + 7] = count[i + 1] - count[i]
        del count

        # -- group records: directory groups, sudo group, private groups --------
        uname_h = fnv1a_table(strings, name_off, name_len)
        del name_len
        grecs = array("I")
        gname_off = array("I")
        gname_len = array("I")
        gid_h = array("I")
        for (gname, gid, goff), ml in zip(kept_groups, member_lists):
            mstart = len(pool)
            pool.extend(name_off[i] for i in ml)
            grecs.extend((gid, goff, mstart, len(ml), 0, 0))
            gname_off.append(goff)
            gname_len.append(len(gname.encode()))
            gid_h.append(mix32(gid))
        gname_h = fnv1a_table(strings, gname_off, gname_len)
        del gname_off, gname_len
        for i in upg:
            grecs.extend((primary[i], name_off[i], len(pool), 0, 0, 0))
            gname_h.append(uname_h[i])
            gid_h.append(mix32(primary[i]))
        n_groups = len(gid_h)
        del member_lists, name_off, primary, upg
        assert len(urecs) == USER_WORDS * n and len(grecs) == GROUP_WORDS * n_groups

        strings_size = len(strings)
        strings.extend(b"\0" * (-len(strings) % 4))
        pool_count = len(pool)
        # sections and index builders; write_sections drops each once written
        keys = [uname_h, uid_h, gname_h, gid_h]
        parts = [strings, urecs, grecs, pool] + [(lambda k=k: index_table(keys.pop(0))) for k in range(4)]
        del strings, urecs, grecs, pool, uname_h, uid_h, gname_h, gid_h
        header = write_sections(
            path, parts, mode=mode, strings_size=strings_size, pool_count=pool_count,
            revision=view.revision, generated_at=now,
            confirmed_at=now if confirmed_at is None else confirmed_at,
            max_stale=max_stale_of(view), flags=FLAG_BASTION if view.settings.bastion else 0,
            n_users=n, n_groups=n_groups,
        )
        return Published(header=header, problems=problems + ca_problems, ca_keys=ca_keys,
                         users=n, groups=n_groups, seconds=0.0)
