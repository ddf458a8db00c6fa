"""SCIM resources over the control plane's store (runs on the DB thread).

Every write is one `Store._write` transaction: the same validation, id
allocation and name rules as `step-ssh-ctl` (Store._validate_user,
_insert_user, _update_user, _delete_user, _insert_group, _delete_group,
_change_members), one revision bump and one `changes` row whose detail names
the users and groups it touched (so the ViewEngine recomputes only what it
must), then the same commit hook that wakes every Watch stream. A request
that fails changes nothing.

What SCIM sees: only users and groups it created (rows in scim_users /
scim_groups, which map a SCIM id to the account). Accounts made with
`step-ssh-ctl` are invisible here, and their names count as taken.

Stored per resource: the account itself (users / groups: what hosts get,
authoritative for `active` and the step-ssh extension), and the rest of the
SCIM document as the IdP last wrote it (`data`, JSON) so GET returns it.
"""
from __future__ import annotations

import datetime as dt
import json
import secrets
import sqlite3
import time
import uuid
from typing import Any, Iterable, Optional

from scim2_models import (Context, InvalidValueException, MutabilityException, NotFoundException, PatchOp,
                          PatchOperation, SCIMException, UniquenessException)
from scim2_models.path import FilterNode

from step_ssh.limits import JUMP_GROUP
from step_ssh.server import log
from step_ssh.server.rules import RuleError, check_account_name
from step_ssh.server.scim import schema as S
from step_ssh.server.scim.names import posix_name
from step_ssh.server.scim.query import GROUPS, USERS, SqlFilter, fold, iso, to_sql
from step_ssh.server.store import GroupIn, Store, StoreError, UserIn, token_hash

LOG = log.get("step_ssh.server.scim")

TOKEN_PREFIX = "ssc_"
LAST_USED_WRITE_SECONDS = 60


class _NoChange(Exception):
    """Raised inside a write to roll it back: the request changed nothing."""


def _now() -> str:
    return iso(dt.datetime.now(dt.timezone.utc))


def store_error(e: StoreError | RuleError) -> SCIMException:
    """A store refusal in SCIM terms (RFC 7644 §3.12)."""
    code = getattr(e, "code", "INVALID_ARGUMENT")
    msg = e.message if hasattr(e, "message") else str(e)
    if code == "ALREADY_EXISTS":
        return UniquenessException(detail=msg)
    if code == "NOT_FOUND":
        return InvalidValueException(detail=msg)
    if code == "FAILED_PRECONDITION":
        exc = SCIMException(detail=msg)
        exc.status = 409
        return exc
    return InvalidValueException(detail=msg)


def _replace(m, original) -> None:
    """PUT semantics (scim2-models): read-only attributes come from the stored
    resource, immutable ones must not change."""
    try:
        m.replace(original)
    except MutabilityException as e:
        attr = getattr(e, "attribute", None) or "an attribute"
        scim = "".join(w.capitalize() if i else w for i, w in enumerate(str(attr).split("_")))
        raise MutabilityException(detail=f"{scim} is immutable: it cannot change once set") from None


def _gecos(m) -> str:
    name = m.name
    text = m.display_name or (name.formatted if name else None) or \
        " ".join(p for p in ((name.given_name, name.family_name) if name else ()) if p) or ""
    text = " ".join(text.replace(":", " ").split())  # no ':' or newlines in passwd fields
    return text[:256]


def _email(m) -> str:
    emails = m.emails or []
    pick = next((e for e in emails if e.primary), emails[0] if emails else None)
    return str(pick.value) if pick is not None and pick.value else ""


class Directory:
    def __init__(self, store: Store):
        self.store = store
        self.conn = store.conn
        self.conn.create_function("scim_fold", 1, fold, deterministic=True)
        self._last_used: dict[str, int] = {}

    # ---- tokens -------------------------------------------------------------------

    def create_token(self, name: str) -> dict:
        name = (name or "").strip() or "scim"
        if len(name) > 128 or any(ord(c) < 32 for c in name):
            raise StoreError("INVALID_ARGUMENT", "token name: at most 128 printable characters")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        tid = "st" + secrets.token_hex(5)
        now = int(time.time())
        with self.store._write("scim_token", "admin", bump=False) as t:
            t.conn.execute("INSERT INTO scim_tokens(id, name, hash, created_at) VALUES (?,?,?,?)",
                           (tid, name, token_hash(token), now))
        return {"id": tid, "name": name, "token": token, "created_at": now, "last_used_at": 0, "revoked_at": 0}

    def list_tokens(self) -> list[dict]:
        rows = self.conn.execute("SELECT t.*, COALESCE(u.last_used_at, 0) AS last_used FROM scim_tokens t "
                                 "LEFT JOIN scim_token_use u ON u.id = t.id ORDER BY t.created_at, t.id").fetchall()
        return [{"id": r["id"], "name": r["name"], "created_at": r["created_at"],
                 "last_used_at": max(r["last_used"], self._last_used.get(r["id"], 0)),
                 "revoked_at": r["revoked_at"] or 0} for r in rows]

    def revoke_token(self, tid: str) -> dict:
        with self.store._write("scim_token", "admin", bump=False) as t:
            row = t.conn.execute("SELECT * FROM scim_tokens WHERE id=?", (tid,)).fetchone()
            if row is None:
                raise StoreError("NOT_FOUND", f"no SCIM token with id {tid!r} (see `step-ssh-ctl scim token list`)")
            if not row["revoked_at"]:
                t.conn.execute("UPDATE scim_tokens SET revoked_at=? WHERE id=?", (int(time.time()), tid))
        return next(x for x in self.list_tokens() if x["id"] == tid)

    def check_token(self, token: str) -> tuple[Optional[str], str]:
        """(token id, "") if the token is valid, else (None, why)."""
        if not token.startswith(TOKEN_PREFIX):
            return None, ("not a step-ssh SCIM token (they start with 'ssc_'; create one with "
                          "`step-ssh-ctl scim token create`)")
        row = self.conn.execute("SELECT id, revoked_at FROM scim_tokens WHERE hash=?", (token_hash(token),)).fetchone()
        if row is None:
            return None, "unknown token"
        if row["revoked_at"]:
            return None, f"token {row['id']} was revoked"
        now = int(time.time())
        last = self._last_used.get(row["id"], 0)
        self._last_used[row["id"]] = now
        if now - last >= LAST_USED_WRITE_SECONDS:
            with self.store._write("scim_token_use", "scim", bump=False) as t:
                t.conn.execute("INSERT INTO scim_token_use(id, last_used_at) VALUES (?,?) ON CONFLICT(id) DO "
                               "UPDATE SET last_used_at=excluded.last_used_at", (row["id"], now))
        return row["id"], ""

    # ---- helpers ------------------------------------------------------------------

    def _taken(self, name: str) -> bool:
        return name in (self.store.cfg.sudo_group.name, JUMP_GROUP) or self.conn.execute(
            "SELECT 1 FROM users WHERE name=? UNION ALL SELECT 1 FROM groups WHERE name=?",
            (name, name)).fetchone() is not None

    def _explicit_name(self, name: str, what: str, attr: str) -> str:
        try:
            check_account_name(name, what)
        except RuleError as e:
            raise InvalidValueException(detail=f"{attr}: {e}") from None
        if name in (self.store.cfg.sudo_group.name, JUMP_GROUP):
            raise InvalidValueException(detail=f"{attr}: {name!r} is reserved for a group step-ssh "
                                               "synthesizes on hosts (sudo users, jump-only users)")
        if self._taken(name):
            raise UniquenessException(detail=f"{attr} {name!r} is already a user's or group's name on this control "
                                             "plane; choose another or leave it out to derive one")
        return name

    def _write(self, op: str, actor: str):
        return self.store._write(op, actor)

    def _run(self, fn, *a):
        """Run a write, mapping store refusals to SCIM errors; _NoChange -> None."""
        try:
            return fn(*a)
        except _NoChange:
            return None
        except (StoreError, RuleError) as e:
            raise store_error(e) from None

    # ---- users: reading -----------------------------------------------------------

    _USER_COLS = ("s.id, s.name, s.user_name, s.user_name_key, s.external_id, s.data, s.created, s.modified, "
                  "s.version, u.uid, u.gid, u.shell, u.home, u.principals, u.active")

    def _user_row(self, sid: str) -> Optional[sqlite3.Row]:
        return self.conn.execute(f"SELECT {self._USER_COLS} FROM {USERS.table} WHERE s.id=?", (sid,)).fetchone()

    def _need_user(self, sid: str) -> sqlite3.Row:
        r = self._user_row(sid)
        if r is None:
            raise NotFoundException(detail=f"no user with id {sid!r}")
        return r

    def _groups_of(self, names: list[str]) -> dict[str, list[dict]]:
        out: dict[str, list[dict]] = {}
        for i in range(0, len(names), 900):
            chunk = names[i:i + 900]
            q = ("SELECT m.user_name, g.id, g.display_name FROM members m JOIN scim_groups g ON g.name = m.group_name "
                 f"WHERE m.user_name IN ({','.join('?' * len(chunk))}) ORDER BY g.rowid")
            for user, gid, dn in self.conn.execute(q, chunk):
                out.setdefault(user, []).append({"value": gid, "display": dn, "type": "direct"})
        return out

    def _user_doc(self, r: sqlite3.Row, groups: Optional[list[dict]]) -> dict:
        data = json.loads(r["data"])
        schemas = [S.USER_URN] + ([S.ENTERPRISE_URN] if S.ENTERPRISE_URN in data else []) + [S.USER_EXT_URN]
        doc: dict[str, Any] = {"schemas": schemas, "id": r["id"]}
        if r["external_id"] is not None:
            doc["externalId"] = r["external_id"]
        doc["userName"] = r["user_name"]
        doc.update(data)
        doc["active"] = bool(r["active"])
        if groups:
            doc["groups"] = groups
        name = r["name"]
        doc[S.USER_EXT_URN] = {
            "loginName": name, "uidNumber": r["uid"], "gidNumber": r["gid"], "loginShell": r["shell"],
            "homeDirectory": r["home"] or f"/home/{name}",
            "sshPrincipals": json.loads(r["principals"]) or [name],
        }
        doc["meta"] = {"resourceType": "User", "created": r["created"], "lastModified": r["modified"],
                       "version": f'W/"{r["version"]}"'}
        return doc

    def get_user(self, sid: str) -> dict:
        with self.store.read():
            r = self._need_user(sid)
            return self._user_doc(r, self._groups_of([r["name"]]).get(r["name"]))

    def list_users(self, node: Optional[FilterNode], start: int, count: int) -> tuple[int, list[dict]]:
        cond, params = to_sql(USERS, node)
        with self.store.read():
            total = self.conn.execute(f"SELECT count(*) FROM {USERS.table} WHERE {cond}", params).fetchone()[0]
            rows = self.conn.execute(f"SELECT {self._USER_COLS} FROM {USERS.table} WHERE {cond} "
                                     "ORDER BY s.rowid LIMIT ? OFFSET ?", (*params, count, start - 1)).fetchall()
            groups = self._groups_of([r["name"] for r in rows]) if rows else {}
            return total, [self._user_doc(r, groups.get(r["name"])) for r in rows]

    def _user_model(self, r: sqlite3.Row):
        return S.UserModel.model_validate(self._user_doc(r, None), scim_policy=S.POLICY)

    # ---- users: writing -----------------------------------------------------------

    @staticmethod
    def _user_data(m) -> str:
        d = m.model_dump(scim_ctx=Context.RESOURCE_QUERY_RESPONSE, scim_policy=S.POLICY)
        for k in ("schemas", "id", "externalId", "meta", "groups", "active", "userName", "password",
                  S.USER_EXT_URN):
            d.pop(k, None)
        return json.dumps(d, sort_keys=True, separators=(",", ":"))

    def _user_in(self, m, name: str, keep_gid: int = 0) -> UserIn:
        ext = m[S.StepSSHUser] or S.StepSSHUser()
        home = ext.home_directory or ""
        if home == f"/home/{name}":
            home = ""
        principals = list(ext.ssh_principals or [])
        if principals == [name]:
            principals = []
        u = UserIn(name=name, uid=ext.uid_number or 0, gid=ext.gid_number or keep_gid, gecos=_gecos(m),
                   shell=ext.login_shell or "", email=_email(m), principals=principals,
                   active=True if m.active is None else bool(m.active), home=home)
        return self.store._validate_user(u)

    def _check_user_name(self, m, sid: Optional[str]) -> str:
        if not m.user_name or not m.user_name.strip():
            raise InvalidValueException(detail="userName is required and must not be empty")
        if len(m.user_name) > 256:
            raise InvalidValueException(detail="userName: at most 256 characters")
        key = fold(m.user_name)
        row = self.conn.execute("SELECT id FROM scim_users WHERE user_name_key=?", (key,)).fetchone()
        if row is not None and row[0] != sid:
            raise UniquenessException(detail=f"userName {m.user_name!r} is already taken (user {row[0]})")
        return key

    def create_user(self, m, actor: str) -> dict:
        def write() -> str:
            with self._write("scim_user_add", actor) as t:
                key = self._check_user_name(m, None)
                ext = m[S.StepSSHUser]
                if ext is not None and ext.login_name:
                    name = self._explicit_name(ext.login_name, "loginName", "loginName")
                else:
                    name = posix_name(m.user_name, self._taken, "user")
                u = self._user_in(m, name)
                out, warnings = self.store._insert_user(t, u, strict=True)
                sid = str(uuid.uuid4())
                now = _now()
                t.conn.execute("INSERT INTO scim_users(id, name, user_name, user_name_key, external_id, data, created, "
                               "modified, version) VALUES (?,?,?,?,?,?,?,?,?)",
                               (sid, name, m.user_name, key, m.external_id, self._user_data(m), now, now, t.rev))
                t.detail = {"id": sid, "userName": m.user_name, "users": [name], "uid": out["uid"], "gid": out["gid"]}
                return sid
        sid = self._run(write)
        return self.get_user(sid)

    def _apply_user(self, t, r: sqlite3.Row, m) -> None:
        """Write the state `m` of the existing user row `r` (raises _NoChange if none)."""
        name = r["name"]
        key = self._check_user_name(m, r["id"])
        ext = m[S.StepSSHUser] or S.StepSSHUser()
        if ext.login_name and ext.login_name != name:
            raise MutabilityException(detail=f"loginName is immutable (it is {name!r})")
        if ext.uid_number and ext.uid_number != r["uid"]:
            raise MutabilityException(detail=f"uidNumber is immutable (it is {r['uid']})")
        if ext.gid_number and ext.gid_number != r["gid"] and self.store._group_by_gid(ext.gid_number) is None:
            raise InvalidValueException(detail=f"gidNumber {ext.gid_number} is no group's gid; a user's primary gid "
                                               f"can only change to an existing group's (it is {r['gid']})")
        u = self._user_in(m, name, keep_gid=r["gid"])
        u.uid = 0
        urow = self.store._user(name)
        posix = self.store._update_user(t, urow, u, [])
        data = self._user_data(m)
        if not posix and data == r["data"] and m.user_name == r["user_name"] and m.external_id == r["external_id"]:
            raise _NoChange()
        t.conn.execute("UPDATE scim_users SET user_name=?, user_name_key=?, external_id=?, data=?, modified=?, "
                       "version=? WHERE id=?", (m.user_name, key, m.external_id, data, _now(), t.rev, r["id"]))
        t.detail = {"id": r["id"], "userName": m.user_name, "users": [name] if posix else [],
                    **({"active": bool(u.active)} if bool(u.active) != bool(r["active"]) else {})}

    def replace_user(self, sid: str, m, actor: str) -> dict:
        def write() -> None:
            with self._write("scim_user_update", actor) as t:
                r = self._need_user(sid)
                _replace(m, self._user_model(r))
                self._apply_user(t, r, m)
        self._run(write)
        return self.get_user(sid)

    def patch_user(self, sid: str, patch: PatchOp, actor: str) -> dict:
        def write() -> None:
            with self._write("scim_user_update", actor) as t:
                r = self._need_user(sid)
                m = self._user_model(r)
                if not patch.patch(m, scim_policy=S.POLICY):
                    raise _NoChange()
                self._apply_user(t, r, m)
        self._run(write)
        return self.get_user(sid)

    def delete_user(self, sid: str, actor: str) -> None:
        def write() -> None:
            with self._write("scim_user_rm", actor) as t:
                r = self._need_user(sid)
                self.store._delete_user(t, r["name"])
                t.removal = True
                t.detail = {"id": sid, "userName": r["user_name"], "users": [r["name"]]}
        self._run(write)

    # ---- groups: reading ----------------------------------------------------------

    _GROUP_COLS = "s.id, s.name, s.display_name, s.external_id, s.data, s.created, s.modified, s.version, g.gid"

    def _group_row(self, sid: str) -> Optional[sqlite3.Row]:
        return self.conn.execute(f"SELECT {self._GROUP_COLS} FROM {GROUPS.table} WHERE s.id=?", (sid,)).fetchone()

    def _need_group(self, sid: str) -> sqlite3.Row:
        r = self._group_row(sid)
        if r is None:
            raise NotFoundException(detail=f"no group with id {sid!r}")
        return r

    def _members_of(self, names: list[str]) -> dict[str, list[dict]]:
        out: dict[str, list[dict]] = {n: [] for n in names}
        for i in range(0, len(names), 900):
            chunk = names[i:i + 900]
            q = ("SELECT m.group_name, u.id, u.user_name FROM members m JOIN scim_users u ON u.name = m.user_name "
                 f"WHERE m.group_name IN ({','.join('?' * len(chunk))}) ORDER BY u.rowid")
            for group, uid, un in self.conn.execute(q, chunk):
                out[group].append({"value": uid, "display": un, "type": "User"})
        return out

    def _group_doc(self, r: sqlite3.Row, members: Optional[list[dict]]) -> dict:
        doc: dict[str, Any] = {"schemas": [S.GROUP_URN, S.GROUP_EXT_URN], "id": r["id"]}
        if r["external_id"] is not None:
            doc["externalId"] = r["external_id"]
        doc["displayName"] = r["display_name"]
        doc.update(json.loads(r["data"]))
        if members is not None:
            doc["members"] = members
        doc[S.GROUP_EXT_URN] = {"groupName": r["name"], "gidNumber": r["gid"]}
        doc["meta"] = {"resourceType": "Group", "created": r["created"], "lastModified": r["modified"],
                       "version": f'W/"{r["version"]}"'}
        return doc

    def get_group(self, sid: str, with_members: bool = True) -> dict:
        with self.store.read():
            r = self._need_group(sid)
            return self._group_doc(r, self._members_of([r["name"]])[r["name"]] if with_members else None)

    def list_groups(self, node: Optional[FilterNode], start: int, count: int,
                    with_members: bool = True) -> tuple[int, list[dict]]:
        cond, params = to_sql(GROUPS, node)
        with self.store.read():
            total = self.conn.execute(f"SELECT count(*) FROM {GROUPS.table} WHERE {cond}", params).fetchone()[0]
            rows = self.conn.execute(f"SELECT {self._GROUP_COLS} FROM {GROUPS.table} WHERE {cond} "
                                     "ORDER BY s.rowid LIMIT ? OFFSET ?", (*params, count, start - 1)).fetchall()
            members = self._members_of([r["name"] for r in rows]) if rows and with_members else {}
            return total, [self._group_doc(r, members.get(r["name"]) if with_members else None) for r in rows]

    # ---- groups: writing ----------------------------------------------------------

    @staticmethod
    def _group_data(m) -> str:
        d = m.model_dump(scim_ctx=Context.RESOURCE_QUERY_RESPONSE, scim_policy=S.POLICY)
        for k in ("schemas", "id", "externalId", "meta", "members", "displayName", S.GROUP_EXT_URN):
            d.pop(k, None)
        return json.dumps(d, sort_keys=True, separators=(",", ":"))

    def _check_display_name(self, m, sid: Optional[str]) -> str:
        if not m.display_name or not m.display_name.strip():
            raise InvalidValueException(detail="displayName is required and must not be empty")
        if len(m.display_name) > 256:
            raise InvalidValueException(detail="displayName: at most 256 characters")
        key = fold(m.display_name)
        row = self.conn.execute("SELECT id FROM scim_groups WHERE display_name_key=?", (key,)).fetchone()
        if row is not None and row[0] != sid:
            raise UniquenessException(detail=f"a group with displayName {m.display_name!r} exists (group {row[0]})")
        return key

    def _member_names(self, values: Iterable[Any]) -> dict[str, str]:
        """SCIM member entries -> {scim id: account name}; unknown ids are refused."""
        ids: list[str] = []
        for v in values:
            if hasattr(v, "model_dump"):
                v = v.model_dump(scim_ctx=None, by_alias=True)
            if isinstance(v, str):
                ids.append(v)
                continue
            if not isinstance(v, dict):
                raise InvalidValueException(detail=f"a member must be an object with a 'value', got {v!r}")
            vv = {str(k).lower(): x for k, x in v.items()}
            typ = vv.get("type")
            if isinstance(typ, str) and typ.lower() == "group":
                raise InvalidValueException(detail="nested groups are not supported: members must be users")
            if not isinstance(vv.get("value"), str) or not vv["value"]:
                raise InvalidValueException(detail=f"a member needs a 'value' (the user's id), got {v!r}")
            ids.append(vv["value"])
        out: dict[str, str] = {}
        for i in range(0, len(ids), 900):
            chunk = ids[i:i + 900]
            for sid, name in self.conn.execute(f"SELECT id, name FROM scim_users WHERE id IN "
                                               f"({','.join('?' * len(chunk))})", chunk):
                out[sid] = name
        missing = [i for i in ids if i not in out]
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise InvalidValueException(detail=f"member {', '.join(map(repr, missing[:3]))}{more}: no such user "
                                               "(members must be users provisioned through this SCIM service)")
        return {i: out[i] for i in ids}

    def _scim_members(self, group: str) -> set[str]:
        """Account names of the SCIM-managed members (others are left alone)."""
        return {r[0] for r in self.conn.execute("SELECT m.user_name FROM members m JOIN scim_users u ON "
                                                "u.name = m.user_name WHERE m.group_name=?", (group,))}

    def create_group(self, m, actor: str) -> dict:
        def write() -> str:
            with self._write("scim_group_add", actor) as t:
                key = self._check_display_name(m, None)
                ext = m[S.StepSSHGroup]
                if ext is not None and ext.group_name:
                    name = self._explicit_name(ext.group_name, "groupName", "groupName")
                else:
                    name = posix_name(m.display_name, self._taken, "group")
                self.store._claim_group_gid_check(GroupIn(name))
                self.store._insert_group(t, GroupIn(name, (ext.gid_number if ext else None) or 0), strict=True)
                members = self._member_names(m.members or [])
                self.store._change_members(t, name, set(members.values()), ())
                sid = str(uuid.uuid4())
                now = _now()
                t.conn.execute("INSERT INTO scim_groups(id, name, display_name, display_name_key, external_id, data, "
                               "created, modified, version) VALUES (?,?,?,?,?,?,?,?,?)",
                               (sid, name, m.display_name, key, m.external_id, self._group_data(m), now, now, t.rev))
                t.detail = {"id": sid, "displayName": m.display_name, "groups_added_or_removed": [name],
                            "members": len(members)}
                return sid
        sid = self._run(write)
        return self.get_group(sid)

    def _finish_group(self, t, r: sqlite3.Row, m, members_changed: int) -> None:
        key = self._check_display_name(m, r["id"])
        ext = m[S.StepSSHGroup] or S.StepSSHGroup()
        if ext.group_name and ext.group_name != r["name"]:
            raise MutabilityException(detail=f"groupName is immutable (it is {r['name']!r})")
        if ext.gid_number and ext.gid_number != r["gid"]:
            raise MutabilityException(detail=f"gidNumber is immutable (it is {r['gid']})")
        data = self._group_data(m)
        if not members_changed and data == r["data"] and m.display_name == r["display_name"] \
                and m.external_id == r["external_id"]:
            raise _NoChange()
        t.conn.execute("UPDATE scim_groups SET display_name=?, display_name_key=?, external_id=?, data=?, modified=?, "
                       "version=? WHERE id=?", (m.display_name, key, m.external_id, data, _now(), t.rev, r["id"]))
        t.detail = {"id": r["id"], "displayName": m.display_name, "groups": [r["name"]] if members_changed else [],
                    **({"memberships_changed": members_changed} if members_changed else {})}

    def _group_model(self, r: sqlite3.Row, members: Optional[list[dict]]):
        return S.GroupModel.model_validate(self._group_doc(r, members), scim_policy=S.POLICY)

    def replace_group(self, sid: str, m, actor: str) -> dict:
        def write() -> None:
            with self._write("scim_group_update", actor) as t:
                r = self._need_group(sid)
                _replace(m, self._group_model(r, None))
                want = set(self._member_names(m.members or []).values())
                cur = self._scim_members(r["name"])
                self._finish_group(t, r, m, self.store._change_members(t, r["name"], want - cur, cur - want))
        self._run(write)
        return self.get_group(sid)

    def patch_group(self, sid: str, patch: PatchOp, actor: str) -> None:
        def write() -> None:
            with self._write("scim_group_update", actor) as t:
                r = self._need_group(sid)
                name = r["name"]
                rest: list[PatchOperation] = []
                changed = 0
                for op in patch.operations or []:
                    members_op, other = _split_members(op)
                    if other is not None:
                        rest.append(other)
                    if members_op is None:
                        continue
                    a, d = self._member_op(name, *members_op)
                    if a or d:
                        changed += self.store._change_members(t, name, a, d)
                m = self._group_model(r, None)
                if rest:
                    patch.operations = rest
                    patch.patch(m, scim_policy=S.POLICY)
                self._finish_group(t, r, m, changed)
        self._run(write)

    def _member_op(self, group: str, op: str, value: Any, vfilter: Optional[FilterNode],
                   sub: Optional[str]) -> tuple[set[str], set[str]]:
        """One PATCH operation on Group.members -> (names to add, names to
        remove). Only replace and remove-all read the current members."""
        if op == "remove":
            if vfilter is not None:
                return set(), self._select_members(group, vfilter)
            if value is None:
                return set(), self._scim_members(group)
            values = value if isinstance(value, list) else [value]
            return set(), set(self._member_names_lenient(values))
        if sub is not None and sub.lower() != "value":
            return set(), set()  # display/type of a member are derived from the user; nothing to write
        if vfilter is not None:
            raise InvalidValueException(detail="add/replace on members[filter] is not supported; add members with "
                                               "{\"op\": \"add\", \"path\": \"members\", \"value\": [{\"value\": ID}]}")
        values = value if isinstance(value, list) else ([] if value is None else [value])
        want = set(self._member_names(values).values())
        if op == "add":
            return want, set()
        cur = self._scim_members(group)
        return want - cur, cur - want  # replace

    def _member_names_lenient(self, values: list) -> list[str]:
        """Members named in a remove: unknown ids are simply not members."""
        ids = []
        for v in values:
            if isinstance(v, dict):
                vv = {str(k).lower(): x for k, x in v.items()}
                if isinstance(vv.get("value"), str):
                    ids.append(vv["value"])
            elif isinstance(v, str):
                ids.append(v)
            else:
                raise InvalidValueException(detail=f"a member to remove must be {{\"value\": ID}}, got {v!r}")
        if not ids:
            raise InvalidValueException(detail="a remove on members with a value must name members by 'value'")
        out = []
        for i in range(0, len(ids), 900):
            chunk = ids[i:i + 900]
            q = f"SELECT name FROM scim_users WHERE id IN ({','.join('?' * len(chunk))})"
            out += [r[0] for r in self.conn.execute(q, chunk)]
        return out

    def _select_members(self, group: str, vfilter: FilterNode) -> set[str]:
        coll = GROUPS.special[(S.GROUP_URN.lower(), "members")]
        v = SqlFilter(GROUPS)
        v._item = (coll, "su")
        cond = v.visit(vfilter)
        q = (f"SELECT su.name FROM members m JOIN scim_users su ON su.name = m.user_name "
             f"WHERE m.group_name = ? AND {cond}")
        return {r[0] for r in self.conn.execute(q, (group, *v.params))}

    def delete_group(self, sid: str, actor: str) -> None:
        def write() -> None:
            with self._write("scim_group_rm", actor) as t:
                r = self._need_group(sid)
                grants = self.store._delete_group(t, r["name"])
                t.removal = True
                t.detail = {"id": sid, "displayName": r["display_name"], "groups_added_or_removed": [r["name"]],
                            "grants_removed": grants}
        self._run(write)


def _split_members(op: PatchOperation) -> tuple[Optional[tuple], Optional[PatchOperation]]:
    """Split a PATCH operation into its part on `members` (op, value, filter,
    sub-attribute), handled over the members table, and the rest, applied by
    scim2-models to the group without its members."""
    kind = op.op.value
    if op.path is not None and str(op.path):
        parts = op.path.parts
        schema = (op.path.schema or S.GROUP_URN).lower()
        if parts and parts[0].lower() == "members" and schema == S.GROUP_URN.lower():
            sub = parts[1] if len(parts) > 1 else None
            return (kind, op.value, op.path.value_filter, sub), None
        return None, op
    # no path: the value's keys are attributes
    if isinstance(op.value, dict):
        keys = {k: k for k in op.value}
        mkey = next((k for k in keys if k.lower() in ("members", f"{S.GROUP_URN.lower()}:members")), None)
        if mkey is not None:
            rest = {k: v for k, v in op.value.items() if k != mkey}
            other = op.model_copy(update={"value": rest}) if rest else None
            return (kind, op.value[mkey], None, None), other
    return None, op

