"""The control plane's state in SQLite (WAL, foreign keys, synchronous=FULL).

Every change to users, groups, grants, hosts or SSH user CAs runs in one
`BEGIN IMMEDIATE` transaction that also bumps the single monotonic revision
and appends a row to `changes` (what, who, and whether it can shrink a host's
view — see `removal`). A request that breaks a rule raises `StoreError` before
commit, so it changes nothing.

The Store is synchronous and not thread-safe; the server drives it from one
dedicated thread (`step_ssh.server.service.DB`).
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import secrets
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

from step_ssh import pki
from step_ssh.limits import JUMP_GROUP
from step_ssh.server import alloc
from step_ssh.server.config import ServerConfig
from step_ssh.server.rules import (RuleError, check_account_name, check_hostname, check_path,
                                   check_principals, check_tags, check_text)

SCHEMA_VERSION = 1
ACCESS_LEVELS = ("ssh", "sudo")

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS users (
    name TEXT PRIMARY KEY,
    uid INTEGER NOT NULL UNIQUE,
    gid INTEGER NOT NULL,
    gecos TEXT NOT NULL DEFAULT '',
    shell TEXT NOT NULL DEFAULT '/bin/bash',
    home TEXT NOT NULL DEFAULT '',
    email TEXT NOT NULL DEFAULT '',
    principals TEXT NOT NULL DEFAULT '[]',
    active INTEGER NOT NULL DEFAULT 1,
    created_rev INTEGER NOT NULL,
    updated_rev INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS users_gid ON users(gid);
CREATE TABLE IF NOT EXISTS groups (
    name TEXT PRIMARY KEY,
    gid INTEGER NOT NULL UNIQUE,
    created_rev INTEGER NOT NULL,
    updated_rev INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS members (
    group_name TEXT NOT NULL REFERENCES groups(name) ON DELETE CASCADE,
    user_name TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
    PRIMARY KEY (group_name, user_name)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS members_user ON members(user_name);
CREATE TABLE IF NOT EXISTS ids (
    kind TEXT NOT NULL CHECK (kind IN ('uid', 'gid')),
    id INTEGER NOT NULL,
    owner TEXT NOT NULL,
    retired_rev INTEGER,
    PRIMARY KEY (kind, id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS ids_owner ON ids(kind, owner);
CREATE TABLE IF NOT EXISTS grants (
    id TEXT PRIMARY KEY,
    group_name TEXT NOT NULL REFERENCES groups(name) ON DELETE CASCADE,
    tags TEXT NOT NULL,
    access TEXT NOT NULL CHECK (access IN ('ssh', 'sudo')),
    created_rev INTEGER NOT NULL,
    UNIQUE (group_name, tags, access)
);
CREATE TABLE IF NOT EXISTS hosts (
    id TEXT PRIMARY KEY,
    hostname TEXT NOT NULL UNIQUE,
    tags TEXT NOT NULL DEFAULT '{}',
    is_bastion INTEGER NOT NULL DEFAULT 0,
    bastions TEXT NOT NULL DEFAULT '[]',
    last_seen INTEGER NOT NULL DEFAULT 0,
    agent_version TEXT NOT NULL DEFAULT '',
    cert_serial TEXT NOT NULL DEFAULT '',
    cert_not_after INTEGER NOT NULL DEFAULT 0,
    applied_revision INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS certs (
    serial TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    subject TEXT NOT NULL,
    issued_at INTEGER NOT NULL,
    not_after INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS cert_revocations (
    serial TEXT PRIMARY KEY,
    revoked_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS tokens (
    hash TEXT PRIMARY KEY,
    hostname TEXT NOT NULL,
    tags TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    used_at INTEGER,
    host_id TEXT
);
CREATE TABLE IF NOT EXISTS user_cas (
    id TEXT PRIMARY KEY,
    public_key TEXT NOT NULL UNIQUE,
    comment TEXT NOT NULL DEFAULT '',
    builtin INTEGER NOT NULL DEFAULT 0,
    created_rev INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS changes (
    revision INTEGER PRIMARY KEY,
    at INTEGER NOT NULL,
    actor TEXT NOT NULL,
    op TEXT NOT NULL,
    detail TEXT NOT NULL,
    removal INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS views (hash TEXT PRIMARY KEY, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS host_state (
    host_id TEXT PRIMARY KEY,
    revision INTEGER NOT NULL,
    view_hash TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    host_id TEXT NOT NULL,
    hostname TEXT NOT NULL,
    type TEXT NOT NULL,
    user TEXT NOT NULL,
    time_us INTEGER NOT NULL,
    received_us INTEGER NOT NULL,
    data BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_time ON audit(time_us);
CREATE INDEX IF NOT EXISTS audit_user ON audit(user, time_us);
CREATE INDEX IF NOT EXISTS audit_host ON audit(host_id, time_us);
CREATE TABLE IF NOT EXISTS scim_users (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE REFERENCES users(name) ON DELETE CASCADE,
    user_name TEXT NOT NULL,
    user_name_key TEXT NOT NULL UNIQUE,
    external_id TEXT,
    data TEXT NOT NULL,
    created TEXT NOT NULL,
    modified TEXT NOT NULL,
    version INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS scim_users_external ON scim_users(external_id);
CREATE TABLE IF NOT EXISTS scim_groups (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE REFERENCES groups(name) ON DELETE CASCADE,
    display_name TEXT NOT NULL,
    display_name_key TEXT NOT NULL UNIQUE,
    external_id TEXT,
    data TEXT NOT NULL,
    created TEXT NOT NULL,
    modified TEXT NOT NULL,
    version INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS scim_groups_external ON scim_groups(external_id);
CREATE TABLE IF NOT EXISTS scim_tokens (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    hash TEXT NOT NULL UNIQUE,
    created_at INTEGER NOT NULL,
    revoked_at INTEGER
);
CREATE TABLE IF NOT EXISTS scim_token_use (id TEXT PRIMARY KEY, last_used_at INTEGER NOT NULL);
"""

# Tables whose content is the control plane's state of record (compared by
# the "rejections change nothing" tests). host_state/views are sync
# bookkeeping; hosts.last_seen/applied_revision change on every connect, and
# scim_token_use.last_used_at on every SCIM request.
STATE_TABLES = ("meta", "users", "groups", "members", "ids", "grants", "hosts", "certs", "cert_revocations",
                "tokens", "user_cas", "changes", "audit", "scim_users", "scim_groups", "scim_tokens")


class StoreError(Exception):
    """A request the store refuses. `code` is a grpc.StatusCode name."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(msg: str) -> StoreError:
    return StoreError("INVALID_ARGUMENT", msg)


def not_found(msg: str) -> StoreError:
    return StoreError("NOT_FOUND", msg)


def exists(msg: str) -> StoreError:
    return StoreError("ALREADY_EXISTS", msg)


def precondition(msg: str) -> StoreError:
    return StoreError("FAILED_PRECONDITION", msg)


_ULID_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"


def new_ulid() -> str:
    """A lower-case ULID (48-bit ms timestamp + 80 random bits, Crockford base32)."""
    n = (int(time.time() * 1000) << 80) | int.from_bytes(os.urandom(10), "big")
    return "".join(_ULID_ALPHABET[(n >> (5 * i)) & 31] for i in reversed(range(26)))


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def tags_json(tags: dict[str, str]) -> str:
    return json.dumps(dict(sorted(tags.items())), separators=(",", ":"))


@dataclass
class Txn:
    conn: sqlite3.Connection
    rev: int
    actor: str
    removal: bool = False
    detail: dict = field(default_factory=dict)


@dataclass
class UserIn:
    name: str
    uid: int = 0
    gid: int = 0
    gecos: str = ""
    shell: str = ""
    email: str = ""
    principals: list[str] = field(default_factory=list)
    active: bool = True
    home: str = ""


@dataclass
class GroupIn:
    name: str
    gid: int = 0
    members: Optional[list[str]] = None


class Store:
    def __init__(self, path: str | Path, cfg: ServerConfig,
                 on_commit: Optional[Callable[[int, bool], None]] = None):
        self.path = str(path)
        self.cfg = cfg
        self.on_commit = on_commit
        self.conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        self.conn.row_factory = sqlite3.Row
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")
        self.conn.execute("PRAGMA foreign_keys=ON")
        self.conn.execute("PRAGMA busy_timeout=30000")
        self._init_schema()

    def close(self) -> None:
        self.conn.close()

    # ---- schema and transactions ------------------------------------------------

    def _init_schema(self) -> None:
        c = self.conn
        c.execute("BEGIN IMMEDIATE")
        try:
            for stmt in SCHEMA.split(";"):
                if stmt.strip():
                    c.execute(stmt)
            row = c.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            if row is None:
                c.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
                c.execute("INSERT INTO meta VALUES ('revision', '0')")
                c.execute("INSERT INTO meta VALUES ('created_at', ?)", (str(int(time.time())),))
            elif int(row[0]) > SCHEMA_VERSION:
                raise RuntimeError(f"{self.path} has schema version {row[0]}, newer than this server "
                                   f"({SCHEMA_VERSION}); upgrade step-ssh")
            c.execute("COMMIT")
        except BaseException:
            c.execute("ROLLBACK")
            raise

    def revision(self) -> int:
        return int(self.conn.execute("SELECT value FROM meta WHERE key='revision'").fetchone()[0])

    @contextmanager
    def _write(self, op: str, actor: str, *, bump: bool = True) -> Iterator[Txn]:
        c = self.conn
        c.execute("BEGIN IMMEDIATE")
        try:
            rev = self.revision() + (1 if bump else 0)
            t = Txn(c, rev, actor)
            try:
                yield t
            except alloc.IdTaken as e:
                raise exists(str(e)) from None
            except RuleError as e:
                raise invalid(str(e)) from None
            except sqlite3.IntegrityError as e:  # a constraint the checks above should have caught
                raise precondition(f"refused by the database: {e}") from None
            if bump:
                c.execute("UPDATE meta SET value=? WHERE key='revision'", (str(rev),))
                c.execute("INSERT INTO changes(revision, at, actor, op, detail, removal) VALUES (?,?,?,?,?,?)",
                          (rev, int(time.time()), actor, op, json.dumps(t.detail, sort_keys=True), int(t.removal)))
            c.execute("COMMIT")
        except BaseException:
            c.execute("ROLLBACK")
            raise
        if bump and self.on_commit:
            self.on_commit(rev, t.removal)

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """A consistent snapshot for multi-query reads."""
        self.conn.execute("BEGIN")
        try:
            yield self.conn
        finally:
            self.conn.execute("COMMIT")

    def removal_revisions(self) -> list[int]:
        return [r[0] for r in self.conn.execute("SELECT revision FROM changes WHERE removal=1 ORDER BY revision")]

    def dump_state(self) -> str:
        """Every row of the state tables, for "rejections change nothing" checks."""
        out = []
        for t in STATE_TABLES:
            cols = "*"
            if t == "hosts":
                cols = "id, hostname, tags, is_bastion, bastions, agent_version, cert_serial, cert_not_after"
            for row in self.conn.execute(f"SELECT {cols} FROM {t} ORDER BY 1"):
                out.append(f"{t}: {tuple(row)!r}")
        return "\n".join(out)

    # ---- lookups ----------------------------------------------------------------

    def _user(self, name: str) -> Optional[sqlite3.Row]:
        return self.conn.execute("SELECT * FROM users WHERE name=?", (name,)).fetchone()

    def _group(self, name: str) -> Optional[sqlite3.Row]:
        return self.conn.execute("SELECT * FROM groups WHERE name=?", (name,)).fetchone()

    def _group_by_gid(self, gid: int) -> Optional[sqlite3.Row]:
        return self.conn.execute("SELECT * FROM groups WHERE gid=?", (gid,)).fetchone()

    def _need_user(self, name: str) -> sqlite3.Row:
        row = self._user(name)
        if row is None:
            raise not_found(f"no user named {name!r} (see `step-ssh-ctl user list`)")
        return row

    def _need_group(self, name: str) -> sqlite3.Row:
        row = self._group(name)
        if row is None:
            raise not_found(f"no group named {name!r} (see `step-ssh-ctl group list`)")
        return row

    def find_host(self, ref: str) -> Optional[sqlite3.Row]:
        row = self.conn.execute("SELECT * FROM hosts WHERE id=?", (ref,)).fetchone()
        if row is None:
            row = self.conn.execute("SELECT * FROM hosts WHERE hostname=?", (ref.strip().lower().rstrip("."),)).fetchone()
        return row

    def _need_host(self, ref: str) -> sqlite3.Row:
        row = self.find_host(ref)
        if row is None:
            raise not_found(f"no host with hostname or id {ref!r} (see `step-ssh-ctl host list`)")
        return row

    # ---- users ------------------------------------------------------------------

    def _validate_user(self, u: UserIn) -> UserIn:
        check_account_name(u.name, "user name")
        if u.name in (self.cfg.sudo_group.name, JUMP_GROUP):
            # its private group would be (or be mistaken by sshd for) a synthesized group
            raise invalid(f"user name {u.name!r} is reserved for a group step-ssh synthesizes on hosts "
                          "(sudo users, jump-only users)")
        u.gecos = check_text(u.gecos, "gecos")
        u.shell = check_path(u.shell, "shell") or "/bin/bash"
        u.home = check_path(u.home, "home")
        u.email = check_text(u.email, "email")
        u.principals = check_principals(u.principals, u.name)
        return u

    def _check_name_clash(self, user: str, gid: int) -> None:
        """A user whose primary gid is no group's gets a private group of the
        same name on hosts; that name must then not be a group's."""
        if self._group_by_gid(gid) is not None:
            return
        g = self._group(user)
        if g is not None:
            raise exists(f"user {user}: a group named {user!r} (gid {g['gid']}) exists, and hosts name a user's "
                         f"private group after the user; give the user gid {g['gid']} or rename one of them")

    def _primary_gid(self, t: Txn, u: UserIn, uid: int, strict: bool) -> tuple[int, Optional[str]]:
        if u.gid:
            g = self._group_by_gid(u.gid)
            if g is not None:
                return u.gid, None
        c = alloc.claim(t.conn, "gid", f"upg:{u.name}", u.gid, self.cfg, strict=strict, prefer=uid)
        return c.id, c.warning

    def _insert_user(self, t: Txn, u: UserIn, strict: bool) -> tuple[dict, list[str]]:
        warnings = []
        c = alloc.claim(t.conn, "uid", f"user:{u.name}", u.uid, self.cfg, strict=strict)
        if c.warning:
            warnings.append(c.warning)
        gid, w = self._primary_gid(t, u, c.id, strict)
        if w:
            warnings.append(w)
        self._check_name_clash(u.name, gid)
        t.conn.execute(
            "INSERT INTO users(name, uid, gid, gecos, shell, home, email, principals, active, created_rev, updated_rev)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (u.name, c.id, gid, u.gecos, u.shell, u.home, u.email, json.dumps(u.principals), int(u.active),
             t.rev, t.rev))
        return self._user_dict(self._user(u.name)), warnings

    def _update_user(self, t: Txn, row: sqlite3.Row, u: UserIn, warnings: list[str]) -> bool:
        """Apply the changeable fields of `u` (validated) to the existing user
        `row`. The uid never changes; the primary gid only to a group's gid
        (anything else is kept, with a warning). True if anything changed."""
        if u.uid and u.uid != row["uid"]:
            warnings.append(f"user {u.name}: keeps uid {row['uid']} (directory says {u.uid}); "
                            "uids never change once assigned")
        gid = row["gid"]
        if u.gid and u.gid != row["gid"]:
            if self._group_by_gid(u.gid) is not None:
                gid = u.gid
            else:
                warnings.append(f"user {u.name}: keeps gid {row['gid']} (directory says {u.gid}, "
                                "which is no group's)")
        self._check_name_clash(u.name, gid)
        new = (gid, u.gecos, u.shell, u.home, u.email, json.dumps(u.principals), int(u.active))
        old = (row["gid"], row["gecos"], row["shell"], row["home"], row["email"], row["principals"],
               row["active"])
        if new == old:
            return False
        if row["active"] and not u.active:
            t.removal = True
        if json.loads(row["principals"]) and set(json.loads(row["principals"])) - set(u.principals):
            t.removal = True
        t.conn.execute("UPDATE users SET gid=?, gecos=?, shell=?, home=?, email=?, principals=?, active=?, "
                       "updated_rev=? WHERE name=?", new + (t.rev, u.name))
        return True

    def _change_members(self, t: Txn, group: str, add: Iterable[str], remove: Iterable[str]) -> int:
        """Add and remove members of an existing group (users must exist;
        adding a member or removing a non-member is a no-op). Returns how
        many memberships changed."""
        c = t.conn
        before = c.total_changes
        c.executemany("DELETE FROM members WHERE group_name=? AND user_name=?", [(group, m) for m in remove])
        removed = c.total_changes - before
        c.executemany("INSERT OR IGNORE INTO members VALUES (?,?)", [(group, m) for m in sorted(add)])
        changed = c.total_changes - before
        if removed:
            t.removal = True
        if changed:
            c.execute("UPDATE groups SET updated_rev=? WHERE name=?", (t.rev, group))
        return changed

    def create_user(self, u: UserIn, actor: str = "admin") -> dict:
        u = self._validate_user(u)
        with self._write("user_add", actor) as t:
            if self._user(u.name) is not None:
                raise exists(f"user {u.name} already exists (remove it first, or use `directory import` to update)")
            out, _ = self._insert_user(t, u, strict=True)
            t.detail = {"user": u.name, "uid": out["uid"], "gid": out["gid"]}
            return out

    def _delete_user(self, t: Txn, name: str) -> None:
        row = self._user(name)
        alloc.retire(t.conn, "uid", row["uid"], f"user:{name}", t.rev)
        alloc.retire(t.conn, "gid", row["gid"], f"upg:{name}", t.rev)
        t.conn.execute("DELETE FROM users WHERE name=?", (name,))

    def delete_user(self, name: str, actor: str = "admin") -> int:
        with self._write("user_rm", actor) as t:
            self._need_user(name)
            self._delete_user(t, name)
            t.removal = True
            t.detail = {"user": name}
            return t.rev

    def _user_dict(self, r: sqlite3.Row) -> dict:
        return {"name": r["name"], "uid": r["uid"], "gid": r["gid"], "gecos": r["gecos"], "shell": r["shell"],
                "home": r["home"], "email": r["email"], "principals": json.loads(r["principals"]),
                "active": bool(r["active"])}

    def list_users(self) -> list[dict]:
        return [self._user_dict(r) for r in self.conn.execute("SELECT * FROM users ORDER BY name")]

    def user_principals(self, name: str) -> tuple[dict, list[str]]:
        u = self._user_dict(self._need_user(name))
        return u, (u["principals"] or [u["name"]])

    # ---- groups -----------------------------------------------------------------

    def _insert_group(self, t: Txn, g: GroupIn, strict: bool) -> list[str]:
        warnings = []
        if g.name == self.cfg.sudo_group.name:
            raise invalid(f"group name {g.name!r} is reserved for the sudo group that step-ssh synthesizes on hosts")
        if g.name == JUMP_GROUP:
            raise invalid(f"group name {g.name!r} is reserved for the group of jump-only users that step-ssh "
                          "synthesizes on bastions")
        u = self._user(g.name)
        if u is not None and self._group_by_gid(u["gid"]) is None:
            # User NAME has a private group NAME on hosts; a real group of that
            # name can only be that same group: it adopts the user's private gid.
            if g.gid not in (0, u["gid"]):
                raise exists(f"group {g.name}: user {g.name} has private group {g.name} with gid {u['gid']}; "
                             f"create the group with gid {u['gid']} (or no gid) or choose another name")
            t.conn.execute("UPDATE ids SET owner=? WHERE kind='gid' AND id=? AND owner=?",
                           (f"group:{g.name}", u["gid"], f"upg:{g.name}"))
            gid = u["gid"]
        else:
            c = alloc.claim(t.conn, "gid", f"group:{g.name}", g.gid, self.cfg, strict=strict)
            if c.warning:
                warnings.append(c.warning)
            gid = c.id
        t.conn.execute("INSERT INTO groups(name, gid, created_rev, updated_rev) VALUES (?,?,?,?)",
                       (g.name, gid, t.rev, t.rev))
        return warnings

    def _claim_group_gid_check(self, g: GroupIn) -> None:
        check_account_name(g.name, "group name")

    def create_group(self, g: GroupIn, actor: str = "admin") -> dict:
        self._claim_group_gid_check(g)
        with self._write("group_add", actor) as t:
            if self._group(g.name) is not None:
                raise exists(f"group {g.name} already exists")
            self._insert_group(t, g, strict=True)
            for m in g.members or []:
                self._need_user(m)
                t.conn.execute("INSERT OR IGNORE INTO members VALUES (?,?)", (g.name, m))
            t.detail = {"group": g.name}
            return self.group_dict(g.name)

    def _delete_group(self, t: Txn, name: str) -> list[str]:
        row = self._group(name)
        primary = [r[0] for r in t.conn.execute("SELECT name FROM users WHERE gid=? ORDER BY name LIMIT 6",
                                                (row["gid"],))]
        if primary:
            more = ", ..." if len(primary) > 5 else ""
            raise precondition(f"group {name} (gid {row['gid']}) is the primary group of "
                               f"{', '.join(primary[:5])}{more}; give them another primary gid first")
        grants = [r[0] for r in t.conn.execute("SELECT id FROM grants WHERE group_name=?", (name,))]
        alloc.retire(t.conn, "gid", row["gid"], f"group:{name}", t.rev)
        t.conn.execute("DELETE FROM groups WHERE name=?", (name,))  # members and grants cascade
        return grants

    def delete_group(self, name: str, actor: str = "admin") -> tuple[int, list[str]]:
        with self._write("group_rm", actor) as t:
            self._need_group(name)
            grants = self._delete_group(t, name)
            t.removal = True
            t.detail = {"group": name, "grants_removed": grants}
            return t.rev, grants

    def add_member(self, group: str, user: str, actor: str = "admin") -> int:
        with self._write("member_add", actor) as t:
            self._need_group(group)
            self._need_user(user)
            if t.conn.execute("SELECT 1 FROM members WHERE group_name=? AND user_name=?", (group, user)).fetchone():
                raise exists(f"{user} is already a member of {group}")
            t.conn.execute("INSERT INTO members VALUES (?,?)", (group, user))
            t.conn.execute("UPDATE groups SET updated_rev=? WHERE name=?", (t.rev, group))
            t.detail = {"group": group, "user": user}
            return t.rev

    def remove_member(self, group: str, user: str, actor: str = "admin") -> int:
        with self._write("member_rm", actor) as t:
            self._need_group(group)
            self._need_user(user)
            cur = t.conn.execute("DELETE FROM members WHERE group_name=? AND user_name=?", (group, user))
            if cur.rowcount == 0:
                raise not_found(f"{user} is not a member of {group}")
            t.conn.execute("UPDATE groups SET updated_rev=? WHERE name=?", (t.rev, group))
            t.removal = True
            t.detail = {"group": group, "user": user}
            return t.rev

    def group_dict(self, name: str) -> dict:
        r = self._group(name)
        members = [m[0] for m in self.conn.execute(
            "SELECT user_name FROM members WHERE group_name=? ORDER BY user_name", (name,))]
        return {"name": r["name"], "gid": r["gid"], "members": members}

    def list_groups(self) -> list[dict]:
        members: dict[str, list[str]] = {}
        for g, u in self.conn.execute("SELECT group_name, user_name FROM members ORDER BY group_name, user_name"):
            members.setdefault(g, []).append(u)
        return [{"name": r["name"], "gid": r["gid"], "members": members.get(r["name"], [])}
                for r in self.conn.execute("SELECT name, gid FROM groups ORDER BY name")]

    # ---- directory import -------------------------------------------------------

    def import_directory(self, users: list[UserIn], groups: list[GroupIn], prune: bool,
                         actor: str = "admin") -> dict:
        """Create or update the listed users and groups (a group's listed
        members replace its members); with `prune`, remove everyone else.
        Supplied ids that are taken are replaced by allocated ones (with a
        warning); ids of existing users and groups never change."""
        seen_u: set[str] = set()
        for u in users:
            self._validate_user(u)
            if u.name in seen_u:
                raise invalid(f"user {u.name} is listed twice")
            seen_u.add(u.name)
        seen_g: set[str] = set()
        for g in groups:
            check_account_name(g.name, "group name")
            if g.name in seen_g:
                raise invalid(f"group {g.name} is listed twice")
            seen_g.add(g.name)
        res = {"users_created": 0, "users_updated": 0, "users_removed": 0, "groups_created": 0,
               "groups_updated": 0, "groups_removed": 0, "warnings": []}
        with self._write("directory_import", actor) as t:
            c = t.conn
            if prune:
                listed = set(seen_g)
                for (name,) in c.execute("SELECT name FROM groups ORDER BY name").fetchall():
                    if name not in listed:
                        # users being pruned too must not block removal of their primary group
                        blockers = [r[0] for r in c.execute("SELECT name FROM users WHERE gid=(SELECT gid FROM groups "
                                                            "WHERE name=?)", (name,)) if r[0] in seen_u]
                        if blockers:
                            raise precondition(f"--prune would remove group {name}, the primary group of "
                                               f"{', '.join(blockers[:5])} who stay; list the group or change "
                                               "their gid")
                for (name,) in c.execute("SELECT name FROM users ORDER BY name").fetchall():
                    if name not in seen_u:
                        self._delete_user(t, name)
                        res["users_removed"] += 1
                for (name,) in c.execute("SELECT name FROM groups ORDER BY name").fetchall():
                    if name not in listed:
                        res["warnings"] += [f"grant {g} removed with group {name}" for g in self._delete_group(t, name)]
                        res["groups_removed"] += 1
            # groups first (so users can name them as primary groups), without members
            for g in groups:
                row = self._group(g.name)
                if row is None:
                    res["warnings"] += self._insert_group(t, GroupIn(g.name, g.gid), strict=False)
                    res["groups_created"] += 1
                elif g.gid and g.gid != row["gid"]:
                    res["warnings"].append(f"group {g.name}: keeps gid {row['gid']} (directory says {g.gid}); "
                                           "gids never change once assigned")
            for u in users:
                row = self._user(u.name)
                if row is None:
                    _, w = self._insert_user(t, u, strict=False)
                    res["warnings"] += w
                    res["users_created"] += 1
                    continue
                if self._update_user(t, row, u, res["warnings"]):
                    res["users_updated"] += 1
            for g in groups:
                if g.members is None:
                    continue
                for m in g.members:
                    if self._user(m) is None:
                        raise invalid(f"group {g.name}: member {m!r} is not a user (list it under users, "
                                      "or remove it from the group)")
                cur = {r[0] for r in c.execute("SELECT user_name FROM members WHERE group_name=?", (g.name,))}
                want = set(g.members)
                if self._change_members(t, g.name, want - cur, cur - want):
                    if self._group(g.name)["created_rev"] != t.rev:
                        res["groups_updated"] += 1
            if res["users_removed"] or res["groups_removed"]:
                t.removal = True
            t.detail = {k: v for k, v in res.items() if k != "warnings"}
            res["revision"] = t.rev
            return res

    # ---- grants -----------------------------------------------------------------

    def add_grant(self, group: str, tags: dict[str, str], access: str, actor: str = "admin") -> dict:
        if access not in ACCESS_LEVELS:
            raise invalid(f"access must be 'ssh' or 'sudo', got {access!r}")
        try:
            tags = check_tags(tags)
        except RuleError as e:
            raise invalid(str(e)) from None
        if not tags:
            raise invalid("a grant needs at least one tag (KEY=VALUE) that hosts must carry; to grant on every "
                          "host, tag them all (e.g. fleet=all)")
        with self._write("grant_add", actor) as t:
            if self._group(group) is None:
                raise not_found(f"unknown group {group!r} in grant: create it first (`step-ssh-ctl group add "
                                f"{group}`) or check the spelling (`step-ssh-ctl group list`)")
            dup = t.conn.execute("SELECT id FROM grants WHERE group_name=? AND tags=? AND access=?",
                                 (group, tags_json(tags), access)).fetchone()
            if dup:
                raise exists(f"the same grant already exists: {dup[0]}")
            gid = "g" + secrets.token_hex(4)
            t.conn.execute("INSERT INTO grants(id, group_name, tags, access, created_rev) VALUES (?,?,?,?,?)",
                           (gid, group, tags_json(tags), access, t.rev))
            t.detail = {"grant": gid, "group": group, "tags": tags, "access": access}
            return {"id": gid, "group": group, "tags": tags, "access": access}

    def remove_grant(self, grant_id: str, actor: str = "admin") -> int:
        with self._write("grant_rm", actor) as t:
            row = t.conn.execute("SELECT * FROM grants WHERE id=?", (grant_id,)).fetchone()
            if row is None:
                raise not_found(f"no grant with id {grant_id!r} (see `step-ssh-ctl grant list`)")
            t.conn.execute("DELETE FROM grants WHERE id=?", (grant_id,))
            t.removal = True
            t.detail = {"grant": grant_id, "group": row["group_name"], "tags": json.loads(row["tags"]),
                        "access": row["access"]}
            return t.rev

    def list_grants(self) -> list[dict]:
        return [{"id": r["id"], "group": r["group_name"], "tags": json.loads(r["tags"]), "access": r["access"]}
                for r in self.conn.execute("SELECT * FROM grants ORDER BY group_name, tags, access")]

    # ---- hosts ------------------------------------------------------------------

    def host_dict(self, r: sqlite3.Row) -> dict:
        ids = json.loads(r["bastions"])
        names = []
        for i in ids:
            b = self.conn.execute("SELECT hostname FROM hosts WHERE id=?", (i,)).fetchone()
            names.append(b[0] if b else i)
        return {"id": r["id"], "hostname": r["hostname"], "tags": json.loads(r["tags"]),
                "is_bastion": bool(r["is_bastion"]), "bastions": names, "last_seen": r["last_seen"],
                "agent_version": r["agent_version"], "certificate_serial": r["cert_serial"],
                "cert_not_after": r["cert_not_after"], "applied_revision": r["applied_revision"]}

    def list_hosts(self) -> list[dict]:
        return [self.host_dict(r) for r in self.conn.execute("SELECT * FROM hosts ORDER BY hostname")]

    def get_host(self, ref: str) -> dict:
        return self.host_dict(self._need_host(ref))

    def host_rows(self) -> list[sqlite3.Row]:
        return self.conn.execute("SELECT id, hostname, tags, is_bastion, bastions, cert_serial FROM hosts").fetchall()

    def tag_host(self, ref: str, tags: dict[str, str], actor: str = "admin") -> dict:
        try:
            tags = check_tags(tags)
        except RuleError as e:
            raise invalid(str(e)) from None
        if not tags:
            raise invalid("give at least one tag KEY=VALUE")
        with self._write("host_tag", actor) as t:
            row = self._need_host(ref)
            cur = json.loads(row["tags"])
            if any(k in cur and cur[k] != v for k, v in tags.items()):
                t.removal = True  # a changed value drops the old one
            new = check_tags({**cur, **tags})
            t.conn.execute("UPDATE hosts SET tags=? WHERE id=?", (tags_json(new), row["id"]))
            t.detail = {"host": row["id"], "tags": tags}
            return self.host_dict(self.find_host(row["id"]))

    def untag_host(self, ref: str, keys: list[str], actor: str = "admin") -> dict:
        if not keys:
            raise invalid("give at least one tag KEY to remove")
        with self._write("host_untag", actor) as t:
            row = self._need_host(ref)
            cur = json.loads(row["tags"])
            missing = [k for k in keys if k not in cur]
            if missing:
                raise not_found(f"host {row['hostname']} has no tag {', '.join(map(repr, missing))} "
                                f"(it has: {', '.join(f'{k}={v}' for k, v in cur.items()) or 'no tags'})")
            new = {k: v for k, v in cur.items() if k not in keys}
            t.conn.execute("UPDATE hosts SET tags=? WHERE id=?", (tags_json(new), row["id"]))
            t.removal = True
            t.detail = {"host": row["id"], "removed": keys}
            return self.host_dict(self.find_host(row["id"]))

    def delete_host(self, ref: str, actor: str = "admin") -> int:
        with self._write("host_rm", actor) as t:
            row = self._need_host(ref)
            hid = row["id"]
            t.conn.execute("DELETE FROM hosts WHERE id=?", (hid,))
            t.conn.execute("DELETE FROM host_state WHERE host_id=?", (hid,))
            for r in t.conn.execute("SELECT id, bastions FROM hosts WHERE bastions LIKE ?", (f'%"{hid}"%',)).fetchall():
                t.conn.execute("UPDATE hosts SET bastions=? WHERE id=?",
                               (json.dumps([b for b in json.loads(r[1]) if b != hid]), r[0]))
            t.removal = True
            t.detail = {"host": hid, "hostname": row["hostname"]}
            return t.rev

    def register_host(self, host_id: str, hostname: str, tags: dict[str, str], is_bastion: bool,
                      bastions: list[str], agent_version: str) -> dict:
        try:
            hostname = check_hostname(hostname) if hostname else ""
            tags = check_tags(tags)
            agent_version = check_text(agent_version, "agent_version", 64)
        except RuleError as e:
            raise invalid(str(e)) from None
        with self._write("host_register", f"host:{host_id}") as t:
            row = self.find_host(host_id)
            if row is None or row["id"] != host_id:
                raise StoreError("UNAUTHENTICATED", "this host has been removed from the control plane; enroll it "
                                 "again with a new token")
            hostname = hostname or row["hostname"]
            other = t.conn.execute("SELECT id FROM hosts WHERE hostname=? AND id<>?", (hostname, host_id)).fetchone()
            if other:
                raise exists(f"hostname {hostname} is already registered by host {other[0]}; remove that host "
                             "(`step-ssh-ctl host rm`) or choose another name")
            ids = []
            for b in bastions:
                br = self.find_host(b)
                if br is None:
                    raise not_found(f"bastion {b!r} is not a known host; enroll and register it with --is-bastion "
                                    "first")
                if not br["is_bastion"]:
                    raise precondition(f"host {br['hostname']} is not a bastion (it must register with "
                                       "--is-bastion)")
                if br["id"] == host_id:
                    raise invalid("a host cannot sit behind itself")
                if br["id"] not in ids:
                    ids.append(br["id"])
            old_tags = json.loads(row["tags"])
            if not self.cfg.host_may_set_tags and (tags != old_tags or bool(is_bastion) != bool(row["is_bastion"])
                                                    or ids != json.loads(row["bastions"])):
                raise StoreError("PERMISSION_DENIED", "this control plane does not let hosts set their own tags or "
                                 "bastion flags (host_may_set_tags: false); ask an admin to run `step-ssh-ctl host tag`")
            if any(tags.get(k) != v for k, v in old_tags.items()) \
                    or (row["is_bastion"] and not is_bastion) or set(json.loads(row["bastions"])) - set(ids):
                t.removal = True
            t.conn.execute("UPDATE hosts SET hostname=?, tags=?, is_bastion=?, bastions=?, agent_version=?, "
                           "last_seen=? WHERE id=?",
                           (hostname, tags_json(tags), int(is_bastion), json.dumps(ids),
                            agent_version or row["agent_version"], int(time.time()), host_id))
            t.detail = {"host": host_id, "hostname": hostname, "tags": tags, "is_bastion": bool(is_bastion),
                        "bastions": ids}
            return self.host_dict(self.find_host(host_id))

    def touch_hosts(self, updates: dict[str, dict]) -> None:
        """last_seen / agent_version / applied_revision; no revision bump."""
        if not updates:
            return
        with self._write("touch", "server", bump=False) as t:
            for hid, u in updates.items():
                sets = ", ".join(f"{k}=?" for k in u)
                t.conn.execute(f"UPDATE hosts SET {sets} WHERE id=?", (*u.values(), hid))

    def host_auth(self, host_id: str) -> Optional[str]:
        """The current certificate serial of the host, or None if it is gone."""
        row = self.conn.execute("SELECT cert_serial FROM hosts WHERE id=?", (host_id,)).fetchone()
        return row[0] if row else None

    # ---- tokens, enrollment, certificates ---------------------------------------

    def create_token(self, hostname: str, tags: dict[str, str], ttl: int) -> tuple[str, int]:
        try:
            hostname = check_hostname(hostname)
            tags = check_tags(tags)
        except RuleError as e:
            raise invalid(str(e)) from None
        if ttl <= 0 or ttl > 30 * 86400:
            raise invalid("token lifetime must be between 1 second and 30 days")
        token = "sst_" + secrets.token_urlsafe(32)
        now = int(time.time())
        with self._write("token", "admin", bump=False) as t:
            t.conn.execute("DELETE FROM tokens WHERE expires_at < ?", (now - 7 * 86400,))
            t.conn.execute("INSERT INTO tokens(hash, hostname, tags, created_at, expires_at) VALUES (?,?,?,?,?)",
                           (token_hash(token), hostname, tags_json(tags), now, now + ttl))
        return token, now + ttl

    def _record_cert(self, t: Txn, cert_pem_bytes: bytes, kind: str, subject: str) -> tuple[str, int]:
        cert = pki.load_cert(cert_pem_bytes)
        serial = pki.serial_hex(cert)
        not_after = int(cert.not_valid_after_utc.timestamp())
        t.conn.execute("INSERT INTO certs(serial, kind, subject, issued_at, not_after) VALUES (?,?,?,?,?)",
                       (serial, kind, subject, int(time.time()), not_after))
        return serial, not_after

    def record_cert(self, cert_pem_bytes: bytes, kind: str, subject: str) -> str:
        with self._write("cert", "server", bump=False) as t:
            return self._record_cert(t, cert_pem_bytes, kind, subject)[0]

    # ---- admin profiles -----------------------------------------------------------

    def admin_certs(self) -> list[dict]:
        """Every admin certificate this control plane issued, oldest first."""
        rows = self.conn.execute(
            "SELECT c.serial, c.subject, c.issued_at, c.not_after, r.revoked_at FROM certs c "
            "LEFT JOIN cert_revocations r ON r.serial = c.serial WHERE c.kind = 'admin' "
            "ORDER BY c.issued_at, c.serial")
        return [dict(r) for r in rows]

    def revoke_admin(self, *, serial: Optional[str] = None, name: Optional[str] = None) -> list[dict]:
        """Revoke one admin certificate (by serial) or every live one of an admin
        (by name). Returns what was revoked now; NOT_FOUND when nothing matches."""
        now = int(time.time())
        with self._write("admin_revoke", "server", bump=False) as t:
            if serial is not None:
                # as `profiles` prints it, or as openssl does (upper case, colons, leading zeros)
                digits = serial.strip().lower().removeprefix("0x").replace(":", "")
                try:
                    norm = format(int(digits, 16), "x")
                except ValueError:
                    raise invalid(f"serial {serial!r} is not a hexadecimal certificate serial") from None
                rows = t.conn.execute("SELECT serial, subject FROM certs WHERE kind='admin' AND serial=?",
                                      (norm,)).fetchall()
                what = f"admin certificate with serial {serial}"
            else:
                rows = t.conn.execute("SELECT serial, subject FROM certs WHERE kind='admin' AND subject=?",
                                      (name,)).fetchall()
                what = f"admin certificate issued to {name!r}"
            if not rows:
                raise not_found(f"no {what} (`step-ssh-server profiles` lists them)")
            done = []
            for r in rows:
                cur = t.conn.execute("INSERT OR IGNORE INTO cert_revocations(serial, revoked_at) VALUES (?,?)",
                                     (r["serial"], now))
                if cur.rowcount:
                    done.append({"serial": r["serial"], "name": r["subject"], "revoked_at": now})
            return done

    def cert_revoked_at(self, serial: str) -> Optional[int]:
        row = self.conn.execute("SELECT revoked_at FROM cert_revocations WHERE serial=?", (serial,)).fetchone()
        return row[0] if row else None

    def enroll(self, token: str, csr_pem: bytes, agent_version: str, ca_cert: bytes, ca_key: bytes,
               lifetime: dt.timedelta) -> dict:
        now = int(time.time())
        try:
            csr = pki.load_csr(csr_pem)
        except ValueError as e:
            raise invalid(f"the certificate signing request is not a valid PEM PKCS#10 CSR: {e}") from None
        check_csr_key(csr)
        with self._write("host_enroll", "enroll") as t:
            row = t.conn.execute("SELECT * FROM tokens WHERE hash=?", (token_hash(token),)).fetchone()
            if row is None:
                raise StoreError("UNAUTHENTICATED", "unknown enrollment token; create one with `step-ssh-server "
                                 "token --hostname H` (tokens are shown once and used once)")
            if row["used_at"]:
                raise StoreError("UNAUTHENTICATED", f"this enrollment token was already used (at "
                                 f"{_iso(row['used_at'])} by host {row['host_id']}); create a new one")
            if row["expires_at"] <= now:
                raise StoreError("UNAUTHENTICATED", f"this enrollment token expired at {_iso(row['expires_at'])}; "
                                 "create a new one")
            hostname, tags = row["hostname"], json.loads(row["tags"])
            existing = t.conn.execute("SELECT * FROM hosts WHERE hostname=?", (hostname,)).fetchone()
            host_id = existing["id"] if existing else new_ulid()
            cert = pki.issue(ca_cert, ca_key, csr.public_key(), hostname, [pki.host_uri(host_id)],
                             lifetime=lifetime)
            serial, not_after = self._record_cert(t, cert, "host", host_id)
            if existing:
                # Re-enrolling (a rebuilt machine): same id, new key; the old certificate stops working.
                t.conn.execute("UPDATE hosts SET tags=?, cert_serial=?, cert_not_after=?, agent_version=?, "
                               "last_seen=? WHERE id=?",
                               (tags_json(tags), serial, not_after, agent_version, now, host_id))
                t.conn.execute("DELETE FROM host_state WHERE host_id=?", (host_id,))
                if json.loads(existing["tags"]) != tags:
                    t.removal = True
            else:
                t.conn.execute("INSERT INTO hosts(id, hostname, tags, cert_serial, cert_not_after, agent_version, "
                               "last_seen, created_at) VALUES (?,?,?,?,?,?,?,?)",
                               (host_id, hostname, tags_json(tags), serial, not_after, agent_version, now, now))
            t.conn.execute("UPDATE tokens SET used_at=?, host_id=? WHERE hash=?", (now, host_id, row["hash"]))
            t.detail = {"host": host_id, "hostname": hostname, "tags": tags, "reenrolled": bool(existing)}
            return {"host_id": host_id, "certificate_pem": cert, "hostname": hostname, "tags": tags}

    def renew(self, host_id: str, csr_pem: bytes, ca_cert: bytes, ca_key: bytes, lifetime: dt.timedelta) -> bytes:
        try:
            csr = pki.load_csr(csr_pem)
        except ValueError as e:
            raise invalid(f"the certificate signing request is not a valid PEM PKCS#10 CSR: {e}") from None
        check_csr_key(csr)
        with self._write("host_renew", f"host:{host_id}", bump=False) as t:
            row = t.conn.execute("SELECT hostname FROM hosts WHERE id=?", (host_id,)).fetchone()
            if row is None:
                raise StoreError("UNAUTHENTICATED", "this host has been removed; enroll it again")
            cert = pki.issue(ca_cert, ca_key, csr.public_key(), row[0], [pki.host_uri(host_id)], lifetime=lifetime)
            serial, not_after = self._record_cert(t, cert, "host", host_id)
            t.conn.execute("UPDATE hosts SET cert_serial=?, cert_not_after=?, last_seen=? WHERE id=?",
                           (serial, not_after, int(time.time()), host_id))
            return cert

    # ---- SSH user CAs -----------------------------------------------------------

    def add_user_ca(self, ca_id: str, public_key: str, comment: str, builtin: bool = False,
                    actor: str = "admin") -> dict:
        with self._write("ca_add", actor) as t:
            row = t.conn.execute("SELECT id FROM user_cas WHERE id=? OR public_key=?", (ca_id, public_key)).fetchone()
            if row:
                raise exists(f"this SSH user CA is already trusted (id {row[0]})")
            t.conn.execute("INSERT INTO user_cas(id, public_key, comment, builtin, created_rev) VALUES (?,?,?,?,?)",
                           (ca_id, public_key, comment, int(builtin), t.rev))
            t.detail = {"ca": ca_id}
            return {"id": ca_id, "public_key": public_key, "comment": comment}

    def remove_user_ca(self, ca_id: str, actor: str = "admin") -> int:
        with self._write("ca_rm", actor) as t:
            if t.conn.execute("DELETE FROM user_cas WHERE id=?", (ca_id,)).rowcount == 0:
                raise not_found(f"no SSH user CA with id {ca_id!r} (see `step-ssh-ctl ca list`)")
            t.removal = True
            t.detail = {"ca": ca_id}
            return t.rev

    def list_user_cas(self) -> list[dict]:
        return [{"id": r["id"], "public_key": r["public_key"], "comment": r["comment"], "builtin": bool(r["builtin"])}
                for r in self.conn.execute("SELECT * FROM user_cas ORDER BY created_rev, id")]

    # ---- per-host sync state ----------------------------------------------------

    def host_state(self, host_id: str) -> Optional[tuple[int, str, bytes]]:
        row = self.conn.execute("SELECT s.revision, s.view_hash, v.data FROM host_state s JOIN views v "
                                "ON v.hash = s.view_hash WHERE s.host_id=?", (host_id,)).fetchone()
        return (row[0], row[1], row[2]) if row else None

    def save_host_states(self, states: Iterable[tuple[str, int, str, bytes]]) -> None:
        states = list(states)
        with self._write("state", "server", bump=False) as t:
            blobs = {h: blob for _, _, h, blob in states}
            for h, blob in blobs.items():
                if not t.conn.execute("SELECT 1 FROM views WHERE hash=?", (h,)).fetchone():
                    t.conn.execute("INSERT INTO views(hash, data) VALUES (?,?)", (h, blob))
            for host_id, rev, h, _ in states:
                if not t.conn.execute("SELECT 1 FROM hosts WHERE id=?", (host_id,)).fetchone():
                    continue
                t.conn.execute("INSERT INTO host_state(host_id, revision, view_hash) VALUES (?,?,?) "
                               "ON CONFLICT(host_id) DO UPDATE SET revision=excluded.revision, "
                               "view_hash=excluded.view_hash", (host_id, rev, h))

    def gc_views(self) -> int:
        with self._write("gc", "server", bump=False) as t:
            return t.conn.execute("DELETE FROM views WHERE hash NOT IN (SELECT view_hash FROM host_state)").rowcount

    # ---- audit ------------------------------------------------------------------

    def store_audit(self, host_id: str, hostname: str, events: list[tuple[str, str, str, int, bytes]],
                    received_us: int) -> list[str]:
        """events: (id, type, user, time_us, serialized pb.AuditEvent). Returns
        the ids now stored (new or earlier), which the agent may drop."""
        with self._write("audit", f"host:{host_id}", bump=False) as t:
            for eid, typ, user, time_us, blob in events:
                t.conn.execute("INSERT OR IGNORE INTO audit(id, host_id, hostname, type, user, time_us, received_us, "
                               "data) VALUES (?,?,?,?,?,?,?,?)",
                               (eid, host_id, hostname, typ, user, time_us, received_us, blob))
        return [e[0] for e in events]

    def list_audit(self, host: str = "", user: str = "", typ: str = "", since_us: int = 0, limit: int = 100,
                   after_seq: int = 0) -> list[tuple[int, bytes]]:
        where, args = ["seq > ?"], [after_seq]
        if host:
            h = self.find_host(host)
            where.append("(host_id=? OR hostname=?)")
            args += [h["id"] if h else host, host]
        if user:
            where.append("user=?")
            args.append(user)
        if typ:
            where.append("type=?")
            args.append(typ)
        if since_us:
            where.append("time_us>=?")
            args.append(since_us)
        order = "seq ASC" if after_seq else "time_us DESC, seq DESC"
        rows = self.conn.execute(f"SELECT seq, data FROM audit WHERE {' AND '.join(where)} ORDER BY {order} LIMIT ?",
                                 (*args, limit)).fetchall()
        if not after_seq:
            rows.reverse()
        return [(r[0], r[1]) for r in rows]

    def prune_audit(self, before_us: int, batch: int = 10_000) -> int:
        """Delete events that happened before `before_us`, `batch` rows per
        transaction so agents shipping meanwhile wait at most one batch."""
        total = 0
        while True:
            with self._write("audit_prune", "server", bump=False) as t:
                n = t.conn.execute("DELETE FROM audit WHERE seq IN (SELECT seq FROM audit WHERE time_us < ? "
                                   "ORDER BY time_us LIMIT ?)", (before_us, batch)).rowcount
            total += n
            if n < batch:
                return total

    def max_audit_seq(self) -> int:
        return self.conn.execute("SELECT COALESCE(MAX(seq), 0) FROM audit").fetchone()[0]


def check_csr_key(csr) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
    k = csr.public_key()
    if isinstance(k, rsa.RSAPublicKey) and k.key_size < 2048:
        raise invalid(f"RSA key of {k.key_size} bits is too weak; use P-256, Ed25519 or RSA >= 2048")
    if not isinstance(k, (rsa.RSAPublicKey, ec.EllipticCurvePublicKey, ed25519.Ed25519PublicKey)):
        raise invalid("unsupported key type in the CSR; use P-256, Ed25519 or RSA >= 2048")


def _iso(ts: int) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
