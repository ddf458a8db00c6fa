"""uid/gid allocation: stable fleet-wide, never reused for someone else.

Every id ever handed out has a row in `ids` (kind 'uid' or 'gid', the id, its
owner 'user:NAME' or 'group:NAME', and the revision at which it was retired,
if it was). Rows are never deleted, so an id that belonged to a removed user is
never given to anybody else; the same name coming back gets its old id again
("sticky"), which keeps file ownership on hosts right.

The gid space is shared by groups and by users' private groups (a user whose
primary gid is not a group's gets that gid reserved in their name).
"""
from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import Optional

from step_ssh.limits import JUMP_GID
from step_ssh.server.config import ServerConfig
from step_ssh.server.rules import RuleError, check_id_range
from step_ssh.view import MAX_ID


class IdTaken(RuleError):
    code = "ALREADY_EXISTS"


@dataclass
class Claim:
    id: int
    warning: Optional[str] = None


def reserved(cfg: ServerConfig, kind: str) -> set[int]:
    r = set(cfg.reserved_ids)
    if kind == "gid":
        r.update((cfg.sudo_group.gid, JUMP_GID))
    return r


def owner_of(conn: sqlite3.Connection, kind: str, value: int) -> Optional[tuple[str, Optional[int]]]:
    row = conn.execute("SELECT owner, retired_rev FROM ids WHERE kind=? AND id=?", (kind, value)).fetchone()
    return (row[0], row[1]) if row else None


def describe_owner(owner: str, retired: Optional[int]) -> str:
    kind, _, name = owner.partition(":")
    what = {"user": "user", "group": "group", "upg": "the private group of user"}.get(kind, kind)
    s = f"{what} {name}"
    if retired is not None:
        s += f" (removed at revision {retired}; ids are never reused for someone else)"
    return s


def _take(conn: sqlite3.Connection, kind: str, value: int, owner: str) -> None:
    conn.execute(
        "INSERT INTO ids(kind, id, owner, retired_rev) VALUES (?,?,?,NULL) "
        "ON CONFLICT(kind, id) DO UPDATE SET retired_rev=NULL WHERE owner=excluded.owner",
        (kind, value, owner))


def retire(conn: sqlite3.Connection, kind: str, value: int, owner: str, rev: int) -> None:
    conn.execute("UPDATE ids SET retired_rev=? WHERE kind=? AND id=? AND owner=?", (rev, kind, value, owner))


def is_free(conn: sqlite3.Connection, kind: str, value: int, owner: str) -> bool:
    o = owner_of(conn, kind, value)
    return o is None or o[0] == owner


def _next_free(conn: sqlite3.Connection, kind: str, cfg: ServerConfig) -> int:
    lo, hi = cfg.alloc_min, cfg.alloc_max
    skip = reserved(cfg, kind)
    (top,) = conn.execute("SELECT MAX(id) FROM ids WHERE kind=? AND id BETWEEN ? AND ?", (kind, lo, hi)).fetchone()
    cand = lo if top is None else top + 1
    while cand in skip:
        cand += 1
    if cand <= hi:
        return cand
    # The top of the range is used: look for a gap (ids of removed owners are not gaps).
    row = conn.execute(
        "SELECT a.id + 1 FROM ids a WHERE a.kind=? AND a.id BETWEEN ? AND ? "
        "AND NOT EXISTS (SELECT 1 FROM ids b WHERE b.kind=a.kind AND b.id=a.id+1) "
        "AND a.id + 1 <= ? ORDER BY a.id LIMIT 1", (kind, lo, hi, hi)).fetchone()
    if not conn.execute("SELECT 1 FROM ids WHERE kind=? AND id=?", (kind, lo)).fetchone() and lo not in skip:
        return lo
    if row and row[0] not in skip:
        return row[0]
    raise RuleError(f"the {kind} allocation range {lo}-{hi} is exhausted; widen alloc_min/alloc_max in server.yaml")


def claim(conn: sqlite3.Connection, kind: str, owner: str, wanted: int, cfg: ServerConfig, *,
          strict: bool, prefer: int = 0) -> Claim:
    """Reserve an id for `owner`.

    wanted != 0: honour it if it is in the allowed range and free (or already
    this owner's); in range but taken -> IdTaken when `strict` (an admin asked
    for exactly this id), else allocate and return a warning (a directory sync
    should not fail because of one bad value). Out of range is always an error.
    wanted == 0: the owner's retired id if it had one, else `prefer` if free
    (a user's private gid prefers the uid), else the next id in the range.
    """
    label = "uid" if kind == "uid" else "gid"
    warning = None
    if wanted:
        check_id_range(wanted, label, cfg.min_id, reserved(cfg, kind))
        o = owner_of(conn, kind, wanted)
        if o is None or o[0] == owner:
            _take(conn, kind, wanted, owner)
            return Claim(wanted)
        msg = f"{label} {wanted} is taken by {describe_owner(*o)}"
        if strict:
            raise IdTaken(msg + "; choose another or omit it to allocate one")
        warning = f"{owner.partition(':')[2]}: {msg}; allocated another"
    row = conn.execute("SELECT id FROM ids INDEXED BY ids_owner WHERE kind=? AND owner=? "
                       "ORDER BY retired_rev IS NULL DESC, id LIMIT 1",
                       (kind, owner)).fetchone()
    if row:
        _take(conn, kind, row[0], owner)
        return Claim(row[0], warning)
    if prefer and cfg.min_id <= prefer <= MAX_ID and prefer not in reserved(cfg, kind) \
            and owner_of(conn, kind, prefer) is None:
        _take(conn, kind, prefer, owner)
        return Claim(prefer, warning)
    value = _next_free(conn, kind, cfg)
    _take(conn, kind, value, owner)
    return Claim(value, warning)
