"""Conversions between the wire host view (``stepssh_pb2.HostView``) and the
validated pydantic model (``step_ssh.view.HostView``), plus the delta helpers
both ends use.

Mapping (1:1 except where proto3 cannot say "unset"):

=============================  =====================================
pb.HostView                    step_ssh.view.HostView
=============================  =====================================
revision                       revision
users[] (name, uid, gid, ...)  users[]; ``home == ""`` <-> ``None``;
                               ``shell == ""`` -> "/bin/bash"
users[].access (enum)          users[].access (Access.none/ssh/sudo/jump)
groups[]                       groups[]
settings.bastion               bastion
settings.sudo_group_name/gid   sudo_group (empty/0 -> defaults)
settings.ssh_user_ca_keys      ssh_user_ca_keys
settings.max_stale_seconds     max_stale_seconds (0 -> default, 24 h)
(not on the wire)              confirmed_at (the agent sets it)
=============================  =====================================

``view_from_pb`` validates (pydantic raises ``ValueError`` on a view that
breaks the rules, e.g. a member that is not a user). ``apply_delta`` applies a
``pb.Delta`` on top of a ``pb.HostView`` and ``diff_views`` produces one.
"""
from __future__ import annotations

from typing import Optional

from step_ssh.proto import stepssh_pb2 as pb
from step_ssh.view import DEFAULT_MAX_STALE, Access, Group, HostView, SudoGroup, User

_ACCESS_TO_PB = {
    Access.none: pb.ACCESS_NONE,
    Access.ssh: pb.ACCESS_SSH,
    Access.sudo: pb.ACCESS_SUDO,
    Access.jump: pb.ACCESS_JUMP,
}
_ACCESS_FROM_PB = {v: k for k, v in _ACCESS_TO_PB.items()}

DEFAULT_SHELL = "/bin/bash"


# ---- single records ------------------------------------------------------------

def user_from_pb(u: pb.User) -> User:
    if u.access not in _ACCESS_FROM_PB:
        raise ValueError(f"user {u.name}: unknown access value {u.access}")
    return User(
        name=u.name, uid=u.uid, gid=u.gid, gecos=u.gecos,
        home=u.home or None, shell=u.shell or DEFAULT_SHELL,
        principals=list(u.principals), access=_ACCESS_FROM_PB[u.access],
    )


def user_to_pb(u: User) -> pb.User:
    return pb.User(
        name=u.name, uid=u.uid, gid=u.gid, gecos=u.gecos, home=u.home or "",
        shell=u.shell, principals=list(u.principals), access=_ACCESS_TO_PB[Access(u.access)],
    )


def group_from_pb(g: pb.Group) -> Group:
    return Group(name=g.name, gid=g.gid, members=list(g.members))


def group_to_pb(g: Group) -> pb.Group:
    return pb.Group(name=g.name, gid=g.gid, members=list(g.members))


def settings_to_pb(v: HostView) -> pb.HostSettings:
    return pb.HostSettings(
        bastion=v.bastion,
        sudo_group_name=v.sudo_group.name,
        sudo_group_gid=v.sudo_group.gid,
        ssh_user_ca_keys=list(v.ssh_user_ca_keys),
        max_stale_seconds=v.max_stale_seconds,
    )


# ---- whole views ---------------------------------------------------------------

def view_from_pb(p: pb.HostView, *, confirmed_at: Optional[int] = None) -> HostView:
    """pb.HostView -> validated HostView (raises ValueError/ValidationError)."""
    s = p.settings
    sudo = SudoGroup(
        name=s.sudo_group_name or SudoGroup.model_fields["name"].default,
        gid=s.sudo_group_gid or SudoGroup.model_fields["gid"].default,
    )
    return HostView(
        revision=p.revision,
        confirmed_at=confirmed_at,
        max_stale_seconds=s.max_stale_seconds or DEFAULT_MAX_STALE,
        bastion=s.bastion,
        sudo_group=sudo,
        users=[user_from_pb(u) for u in p.users],
        groups=[group_from_pb(g) for g in p.groups],
        ssh_user_ca_keys=list(s.ssh_user_ca_keys),
    )


def view_to_pb(v: HostView) -> pb.HostView:
    """HostView -> pb.HostView (confirmed_at is not sent)."""
    return pb.HostView(
        revision=v.revision,
        users=[user_to_pb(u) for u in v.users],
        groups=[group_to_pb(g) for g in v.groups],
        settings=settings_to_pb(v),
    )


# ---- deltas ------------------------------------------------------------------

def diff_views(old: pb.HostView, new: pb.HostView, *, shrink_intended: bool = False) -> pb.Delta:
    """The delta that turns `old` into `new` (settings are always sent whole)."""
    old_u = {u.name: u for u in old.users}
    new_u = {u.name: u for u in new.users}
    old_g = {g.name: g for g in old.groups}
    new_g = {g.name: g for g in new.groups}
    d = pb.Delta(base_revision=old.revision, revision=new.revision, shrink_intended=shrink_intended)
    d.upsert_users.extend(u for n, u in new_u.items() if old_u.get(n) != u)
    d.remove_users.extend(sorted(n for n in old_u if n not in new_u))
    d.upsert_groups.extend(g for n, g in new_g.items() if old_g.get(n) != g)
    d.remove_groups.extend(sorted(n for n in old_g if n not in new_g))
    d.settings.CopyFrom(new.settings)
    return d


def delta_is_empty(d: pb.Delta) -> bool:
    return not (d.upsert_users or d.remove_users or d.upsert_groups or d.remove_groups)


def apply_delta(base: pb.HostView, d: pb.Delta) -> pb.HostView:
    """Apply `d` to `base`; raises ValueError when `d.base_revision` does not
    match (the agent should then reconnect with since_revision=0).
    Order of users and groups: kept where unchanged, new ones appended."""
    if d.base_revision != base.revision:
        raise ValueError(f"delta is based on revision {d.base_revision}, the view is at {base.revision}")
    users = {u.name: u for u in base.users}
    for n in d.remove_users:
        users.pop(n, None)
    for u in d.upsert_users:
        users[u.name] = u
    groups = {g.name: g for g in base.groups}
    for n in d.remove_groups:
        groups.pop(n, None)
    for g in d.upsert_groups:
        groups[g.name] = g
    out = pb.HostView(revision=d.revision, users=users.values(), groups=groups.values())
    out.settings.CopyFrom(d.settings if d.HasField("settings") else base.settings)
    return out
