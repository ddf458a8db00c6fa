"""Effective host views: who may do what on one host.

Rules (issue 3, DESIGN.md invariant 4):
- a grant applies when every tag of the grant is among the host's tags;
- a user is in the view when they are active and a member of a group with an
  applying grant; their access is the highest one granted (sudo > ssh);
- the groups in the view are the groups with an applying grant plus the
  primary groups of the users in the view, each listing only members who are
  in the view (a primary gid that is no group's becomes a private group on the
  host, synthesized by the cache writer);
- a bastion additionally lists, with ACCESS_JUMP, the active users who may
  reach any host behind it and hold no grant on the bastion itself.

How it stays fast (benchmarks/server_bench.py, docs/performance.md):
- a view depends only on the host's *key* (tag set, bastion flag, tag sets of
  the hosts behind it), so hosts with equal keys share one computation;
- the ViewEngine lives on the database thread and keeps, across revisions,
  each user's encoded `User` message (per access level) and each group's
  member list; the change log (`changes` table) says what to forget;
- each computed view records what it read (groups, users, applying grants),
  so after a revision only the views a change can affect are recomputed; the
  rest are carried over (a CA rotation only re-encodes settings);
- views are assembled as bytes from the cached encodings, hashed, and parsed
  into a pb.HostView only when a snapshot is sent; deltas compare per-user
  encodings instead of message objects.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Iterable, Optional

from step_ssh.proto import stepssh_pb2 as pb
from step_ssh.server.config import ServerConfig
from step_ssh.wire import encode_varint

RANK_JUMP, RANK_SSH, RANK_SUDO = 1, 2, 3
RANK = {"ssh": RANK_SSH, "sudo": RANK_SUDO}
PB_ACCESS = {RANK_JUMP: pb.ACCESS_JUMP, RANK_SSH: pb.ACCESS_SSH, RANK_SUDO: pb.ACCESS_SUDO}

TagSet = frozenset  # frozenset[tuple[str, str]]

# HostView field tags (wire type 2): users=2, groups=3, settings=4
_TAG_USER, _TAG_GROUP, _TAG_SETTINGS = b"\x12", b"\x1a", b"\x22"


def _field(tag: bytes, payload: bytes) -> bytes:
    return tag + encode_varint(len(payload)) + payload


@dataclass(frozen=True)
class HostKey:
    tags: TagSet
    bastion: bool = False
    behind: frozenset = frozenset()  # frozenset[TagSet] of the hosts behind this bastion


@dataclass
class HostInfo:
    id: str
    hostname: str
    tags: dict
    is_bastion: bool
    bastions: list
    serial: str


@dataclass
class Fleet:
    """Grants, hosts and settings at one revision (cheap to reload)."""

    revision: int
    grants: list  # [(group, TagSet, rank)]
    hosts: dict  # id -> HostInfo
    keys: dict  # id -> HostKey
    ca_keys: list
    settings_base: pb.HostSettings = field(default_factory=pb.HostSettings)
    grant_index: dict = field(default_factory=dict)  # (key, value) -> grants indexed under their rarest tag

    def applying(self, tags: TagSet) -> dict[str, int]:
        """group -> highest rank granted to hosts carrying `tags`."""
        out: dict[str, int] = {}
        idx = self.grant_index
        for t in tags:
            for group, gtags, rank in idx.get(t, ()):
                if gtags <= tags and out.get(group, 0) < rank:
                    out[group] = rank
        for group, gtags, rank in idx.get(None, ()):
            if out.get(group, 0) < rank:
                out[group] = rank
        return out

    def compute_key(self, key: "HostKey") -> tuple:
        """What a view really depends on: the applying grants, the jump groups, the bastion flag.
        Hosts whose tags differ but whose grants do not share one computation."""
        granted = self.applying(key.tags)
        jump: set[str] = set()
        if key.bastion:
            for ts in key.behind:
                jump.update(self.applying(ts))
        return (frozenset(granted.items()), frozenset(jump), key.bastion)


def index_grants(grants: list) -> dict:
    counts: dict = {}
    for _, ts, _ in grants:
        for t in ts:
            counts[t] = counts.get(t, 0) + 1
    idx: dict = {}
    for g in grants:
        ts = g[1]
        anchor = min(ts, key=lambda t: (counts[t], t)) if ts else None
        idx.setdefault(anchor, []).append(g)
    return idx


@dataclass
class ComputedView:
    body: bytes                # encoded users + groups
    user_bytes: dict           # name -> encoded pb.User
    group_bytes: dict          # name -> encoded pb.Group
    settings_bytes: bytes
    granted: dict = field(default_factory=dict)     # group -> rank applying on this key
    jump_groups: frozenset = frozenset()
    groups_read: frozenset = frozenset()            # groups whose members/gid were consulted
    blob: bytes = b""
    hash: str = ""
    _view: Optional[pb.HostView] = None

    def __post_init__(self) -> None:
        if not self.blob:
            self.blob = self.body + _field(_TAG_SETTINGS, self.settings_bytes)
            self.hash = hashlib.sha256(self.blob).hexdigest()

    @property
    def view(self) -> pb.HostView:
        """The view as a message (revision 0); parsed once, on demand."""
        if self._view is None:
            self._view = pb.HostView.FromString(self.blob)
        return self._view

    def with_settings(self, settings_bytes: bytes) -> "ComputedView":
        return ComputedView(self.body, self.user_bytes, self.group_bytes, settings_bytes, self.granted,
                            self.jump_groups, self.groups_read)

    @classmethod
    def from_blob(cls, blob: bytes) -> "ComputedView":
        """A view stored earlier (host_state) -> comparable ComputedView."""
        v = pb.HostView.FromString(blob)
        users = {u.name: u.SerializeToString(deterministic=True) for u in v.users}
        groups = {g.name: g.SerializeToString(deterministic=True) for g in v.groups}
        cv = cls(b"", users, groups, v.settings.SerializeToString(deterministic=True), blob=blob,
                 hash=hashlib.sha256(blob).hexdigest())
        cv._view = v
        return cv


def diff_computed(old: ComputedView, new: ComputedView) -> pb.Delta:
    """The delta from `old` to `new` (revisions and shrink_intended left for the caller)."""
    d = pb.Delta()
    ou, nu = old.user_bytes, new.user_bytes
    for name, b in nu.items():
        if ou.get(name) != b:
            d.upsert_users.add().ParseFromString(b)
    d.remove_users.extend(sorted(n for n in ou if n not in nu))
    og, ng = old.group_bytes, new.group_bytes
    for name, b in ng.items():
        if og.get(name) != b:
            d.upsert_groups.add().ParseFromString(b)
    d.remove_groups.extend(sorted(n for n in og if n not in ng))
    d.settings.ParseFromString(new.settings_bytes)
    return d


def tagset(tags: dict) -> TagSet:
    return frozenset(tags.items())


def load_fleet(conn, cfg: ServerConfig) -> Fleet:
    """Read grants, hosts and CA keys in the caller's transaction."""
    rev = int(conn.execute("SELECT value FROM meta WHERE key='revision'").fetchone()[0])
    grants = [(g, tagset(json.loads(t)), RANK[a])
              for g, t, a in conn.execute("SELECT group_name, tags, access FROM grants ORDER BY id")]
    hosts = {}
    for r in conn.execute("SELECT id, hostname, tags, is_bastion, bastions, cert_serial FROM hosts"):
        hosts[r[0]] = HostInfo(r[0], r[1], json.loads(r[2]), bool(r[3]), json.loads(r[4]), r[5])
    behind: dict[str, set] = {}
    for h in hosts.values():
        for b in h.bastions:
            if b in hosts and hosts[b].is_bastion:
                behind.setdefault(b, set()).add(tagset(h.tags))
    keys = {h.id: HostKey(tagset(h.tags), h.is_bastion, frozenset(behind.get(h.id, ())) if h.is_bastion else frozenset())
            for h in hosts.values()}
    ca_keys = [r[0] for r in conn.execute("SELECT public_key FROM user_cas ORDER BY created_rev, id")]
    base = pb.HostSettings(sudo_group_name=cfg.sudo_group.name, sudo_group_gid=cfg.sudo_group.gid,
                           ssh_user_ca_keys=ca_keys, max_stale_seconds=cfg.max_stale_seconds)
    return Fleet(rev, grants, hosts, keys, ca_keys, base, index_grants(grants))


@dataclass
class _UserRec:
    uid: int
    gid: int
    active: bool
    fields: dict
    enc: dict = field(default_factory=dict)  # rank -> encoded pb.User


class ViewEngine:
    """Computes and caches views; must be used from one thread (the DB thread)."""

    def __init__(self, store):
        self.store = store
        self.cfg: ServerConfig = store.cfg
        self.revision = -1
        self.fleet: Optional[Fleet] = None
        self.ckey_of: dict[HostKey, tuple] = {}      # host key -> compute key (depends on grants only)
        self.cache: dict[tuple, ComputedView] = {}   # compute key -> view at self.revision
        self.users: dict[str, Optional[_UserRec]] = {}
        self.members: dict[str, tuple] = {}
        self.member_sets: dict[str, frozenset] = {}
        self.user_groups: dict[str, set] = {}
        self.gid_group: Optional[dict] = None  # gid -> group name
        self.group_gid: Optional[dict] = None  # group name -> gid
        self.computed = 0
        self.carried = 0

    # ---- cache maintenance --------------------------------------------------------

    def _forget_all(self) -> None:
        self.users.clear()
        self.members.clear()
        self.member_sets.clear()
        self.user_groups.clear()
        self.gid_group = self.group_gid = None

    def _forget_group(self, g: str) -> None:
        self.members.pop(g, None)
        self.member_sets.pop(g, None)

    def sync(self, conn) -> Fleet:
        rev = int(conn.execute("SELECT value FROM meta WHERE key='revision'").fetchone()[0])
        if self.fleet is not None and rev == self.revision:
            return self.fleet
        old_fleet, old_cache = self.fleet, self.cache
        dirty_groups: set[str] = set()
        dirty_users: set[str] = set()
        everything = old_fleet is None or rev < self.revision
        if not everything:
            for op, detail in conn.execute("SELECT op, detail FROM changes WHERE revision > ? AND revision <= ? "
                                           "ORDER BY revision", (self.revision, rev)):
                d = json.loads(detail)

                def user_changed(u: str) -> None:
                    dirty_users.add(u)
                    self.users.pop(u, None)
                    for g in self.user_groups.pop(u, ()):
                        self._forget_group(g)
                        dirty_groups.add(g)

                def group_changed(g: str, added_or_removed: bool) -> None:
                    self._forget_group(g)
                    dirty_groups.add(g)
                    if added_or_removed:
                        self.gid_group = self.group_gid = None
                        # it may be someone's primary group now (adopted private gid)
                        row = conn.execute("SELECT gid FROM groups WHERE name=?", (g,)).fetchone()
                        if row:
                            dirty_users.update(r[0] for r in conn.execute("SELECT name FROM users WHERE gid=?",
                                                                          (row[0],)))

                if op in ("user_add", "user_rm"):
                    user_changed(d["user"])
                elif op in ("member_add", "member_rm"):
                    group_changed(d["group"], False)
                elif op in ("group_add", "group_rm"):
                    group_changed(d["group"], True)
                elif op.startswith("scim_"):
                    # One SCIM request, one revision: the users and groups it
                    # touched (step_ssh.server.scim.directory).
                    for u in d.get("users", ()):
                        user_changed(u)
                    for g in d.get("groups", ()):
                        group_changed(g, False)
                    for g in d.get("groups_added_or_removed", ()):
                        group_changed(g, True)
                elif op in ("grant_add", "grant_rm", "ca_add", "ca_rm", "host_tag", "host_untag", "host_rm",
                            "host_register", "host_enroll"):
                    pass  # the fleet reload below covers these
                else:  # directory_import and anything unknown
                    everything = True
                    break
        fleet = load_fleet(conn, self.cfg)
        if everything:
            self._forget_all()
            self.ckey_of = {}
            self.cache = {}
        else:
            if old_fleet.grants != fleet.grants:
                changed = set(old_fleet.grants) ^ set(fleet.grants)
                tagsets = {ts for _, ts, _ in changed}
                for key in list(self.ckey_of):
                    if any(ts <= key.tags or any(ts <= b for b in key.behind) for ts in tagsets):
                        del self.ckey_of[key]
            live_keys = set(fleet.keys.values())
            self.ckey_of = {k: v for k, v in self.ckey_of.items() if k in live_keys}
            live = set(self.ckey_of.values())
            settings_same = old_fleet.ca_keys == fleet.ca_keys
            self.cache = {}
            for ck, cv in old_cache.items():
                if ck not in live or cv.groups_read & dirty_groups or not dirty_users.isdisjoint(cv.user_bytes):
                    continue
                self.cache[ck] = cv if settings_same else cv.with_settings(self._settings(fleet, ck[2]))
                self.carried += 1
        self.fleet, self.revision = fleet, rev
        return fleet

    # ---- lookups (lazy, cached across revisions) ------------------------------------

    def _group_maps(self, conn) -> None:
        if self.group_gid is None:
            self.group_gid = dict(conn.execute("SELECT name, gid FROM groups"))
            self.gid_group = {gid: name for name, gid in self.group_gid.items()}

    def _members(self, conn, g: str) -> tuple:
        m = self.members.get(g)
        if m is None:
            m = tuple(r[0] for r in conn.execute("SELECT user_name FROM members WHERE group_name=?", (g,)))
            self.members[g] = m
            for u in m:
                self.user_groups.setdefault(u, set()).add(g)
        return m

    def _member_set(self, conn, g: str) -> frozenset:
        s = self.member_sets.get(g)
        if s is None:
            s = self.member_sets[g] = frozenset(self._members(conn, g))
        return s

    def _load_users(self, conn, names: Iterable[str]) -> None:
        missing = [n for n in names if n not in self.users]
        for i in range(0, len(missing), 20000):
            chunk = missing[i:i + 20000]
            for n in chunk:
                self.users[n] = None
            for name, uid, gid, gecos, shell, home, princ, active in conn.execute(
                    "SELECT name, uid, gid, gecos, shell, home, principals, active FROM users "
                    "WHERE name IN (SELECT value FROM json_each(?))", (json.dumps(chunk),)):
                p = json.loads(princ) if princ != "[]" else None
                self.users[name] = _UserRec(uid, gid, bool(active), dict(
                    name=name, uid=uid, gid=gid, gecos=gecos, home=home, shell=shell, principals=p or [name]))

    @staticmethod
    def _user_enc(rec: _UserRec, rank: int) -> tuple[bytes, bytes]:
        """(encoded pb.User, the same framed as HostView field 2), cached per access level."""
        b = pb.User(access=PB_ACCESS[rank], **rec.fields).SerializeToString()
        e = rec.enc[rank] = (b, _field(_TAG_USER, b))
        return e

    def _settings(self, fleet: Fleet, bastion: bool) -> bytes:
        s = pb.HostSettings()
        s.CopyFrom(fleet.settings_base)
        s.bastion = bastion
        return s.SerializeToString(deterministic=True)

    # ---- computation ----------------------------------------------------------------

    def compute(self, conn, fleet: Fleet, ckey: tuple) -> ComputedView:
        self.computed += 1
        granted, jump, bastion = dict(ckey[0]), ckey[1], ckey[2]
        ranks: dict[str, int] = {}
        for g, r in granted.items():
            for m in self._members(conn, g):
                if ranks.get(m, 0) < r:
                    ranks[m] = r
        for g in jump:
            for m in self._members(conn, g):
                if m not in ranks:
                    ranks[m] = RANK_JUMP
        self._load_users(conn, ranks)
        recs = self.users
        users = {n: r for n, r in ranks.items() if (u := recs.get(n)) is not None and u.active}

        self._group_maps(conn)
        read = set(granted) | set(jump)
        groups: dict[str, list] = {}
        for g in granted:
            groups[g] = sorted(m for m in self._members(conn, g) if m in users)
        for gid in {recs[n].gid for n in users}:
            g = self.gid_group.get(gid)
            if g is None or g in groups:
                continue
            read.add(g)
            mem = self._members(conn, g)
            if len(mem) <= len(users):
                groups[g] = sorted(m for m in mem if m in users)
            else:
                ms = self._member_set(conn, g)
                groups[g] = sorted(n for n in users if n in ms)

        user_bytes = {}
        parts = []
        enc = self._user_enc
        for name in sorted(users):
            rank = users[name]
            rec = recs[name]
            e = rec.enc.get(rank) or enc(rec, rank)
            user_bytes[name] = e[0]
            parts.append(e[1])
        group_bytes = {}
        for name in sorted(groups):
            b = pb.Group(name=name, gid=self.group_gid[name], members=groups[name]).SerializeToString()
            group_bytes[name] = b
            parts.append(_field(_TAG_GROUP, b))
        return ComputedView(b"".join(parts), user_bytes, group_bytes, self._settings(fleet, bastion), granted,
                            frozenset(jump), frozenset(read))

    def view_for_key(self, conn, fleet: Fleet, key: HostKey) -> ComputedView:
        ck = self.ckey_of.get(key)
        if ck is None:
            ck = self.ckey_of[key] = fleet.compute_key(key)
        cv = self.cache.get(ck)
        if cv is None:
            cv = self.cache[ck] = self.compute(conn, fleet, ck)
        return cv

    def host_view(self, host_id: str) -> tuple[int, Optional[HostInfo], Optional[ComputedView]]:
        """(revision, host, view) for a host at the current revision."""
        with self.store.read() as conn:
            fleet = self.sync(conn)
            host = fleet.hosts.get(host_id)
            if host is None:
                return fleet.revision, None, None
            return fleet.revision, host, self.view_for_key(conn, fleet, fleet.keys[host_id])


def stamped(cv: ComputedView, rev: int) -> pb.HostView:
    v = pb.HostView()
    v.CopyFrom(cv.view)
    v.revision = rev
    return v
