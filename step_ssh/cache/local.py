"""Local accounts always win: refuse any entry that would shadow the host's own.

Reads the host's passwd and group files directly (not through NSS, which would
include our own module) and reports every offending entry at once.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from step_ssh.limits import DEFAULT_MIN_ID

if TYPE_CHECKING:  # the agent uses this module without the pydantic view models
    from step_ssh.view import HostView


class ViewRejected(ValueError):
    """The view cannot be published; `problems` lists every reason."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__(
            f"{len(problems)} problem(s), nothing was published:\n  - " + "\n  - ".join(problems)
        )


@dataclass
class LocalAccounts:
    user_names: dict[str, int] = field(default_factory=dict)
    uids: dict[int, str] = field(default_factory=dict)
    group_names: dict[str, int] = field(default_factory=dict)
    gids: dict[int, str] = field(default_factory=dict)

    @classmethod
    def load(cls, passwd: str | Path = "/etc/passwd", group: str | Path = "/etc/group") -> "LocalAccounts":
        acc = cls()
        for name, num in _entries(passwd):
            acc.user_names.setdefault(name, num)
            acc.uids.setdefault(num, name)
        for name, num in _entries(group):
            acc.group_names.setdefault(name, num)
            acc.gids.setdefault(num, name)
        return acc


def _entries(path: str | Path):
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return
    for line in text.splitlines():
        if not line or line.startswith(("#", "+", "-")):
            continue
        parts = line.split(":")
        if len(parts) < 3:
            continue
        try:
            yield parts[0], int(parts[2])
        except ValueError:
            continue


def check_against_local(view: HostView, local: LocalAccounts, min_id: int = DEFAULT_MIN_ID) -> list[str]:
    """Every reason this view would shadow or undercut the host's accounts."""
    problems = []
    for u in view.users:
        if u.name in local.user_names:
            problems.append(f"user {u.name}: name is a local account (uid {local.user_names[u.name]})")
        if u.uid in local.uids:
            problems.append(f"user {u.name}: uid {u.uid} belongs to local user {local.uids[u.uid]}")
        if u.uid < min_id:
            problems.append(f"user {u.name}: uid {u.uid} is below the minimum {min_id}")
        if u.gid < min_id:
            problems.append(f"user {u.name}: gid {u.gid} is below the minimum {min_id}")
    synthesized = view.synthesized_groups()
    named = {g.gid for g in view.groups + synthesized}
    groups = [(g.name, g.gid) for g in view.groups + synthesized]
    # user-private groups the writer will synthesize must be free too
    groups += [(u.name, u.gid) for u in view.users if u.gid not in named]
    for name, gid in groups:
        if name in local.group_names:
            problems.append(f"group {name}: name is a local group (gid {local.group_names[name]})")
        if gid in local.gids:
            problems.append(f"group {name}: gid {gid} belongs to local group {local.gids[gid]}")
        if gid < min_id:
            problems.append(f"group {name}: gid {gid} is below the minimum {min_id}")
    return list(dict.fromkeys(problems))


def drop_conflicts(
    view: HostView, local: LocalAccounts, min_id: int = DEFAULT_MIN_ID
) -> tuple[HostView, list[str]]:
    """The view without every entry that would shadow or undercut the host's
    accounts, and one line per dropped entry.

    Unlike `check_against_local` (all or nothing, for `cache build`), this is
    what the agent does: one bad entry must not freeze every other change,
    revocations included, so only the offending entries go:

    - a user whose name or uid is local, or whose uid/gid is below `min_id`;
    - a group whose name or gid is local or whose gid is below `min_id`
      (its members stay, without it);
    - a user whose user-private group (synthesized for a primary gid no group
      has) would collide with a local group;
    - dropped users are removed from every group's members.

    The sudo group (and on a bastion the jump group) is a host setting, not
    an entry: when it collides, nothing can be dropped to fix it and
    ViewRejected is raised.
    """
    problems: list[str] = []
    synthesized = view.synthesized_groups()
    bad = [f"{what} group {g.name}: {w}" for what, g in zip(("sudo", "jump"), synthesized)
           for w in group_conflicts(g.name, g.gid, local, min_id)]
    if bad:
        raise ViewRejected(bad)

    groups = []
    for g in view.groups:
        why = group_conflicts(g.name, g.gid, local, min_id)
        if why:
            problems.append(f"group {g.name!r} (gid {g.gid}) dropped: " + "; ".join(why))
        else:
            groups.append(g)
    named = {g.gid for g in groups + synthesized}
    users = []
    for u in view.users:
        why = user_conflicts(u.name, u.uid, u.gid, local, min_id)
        if not why and u.gid not in named:
            why = [f"its private group {w}" for w in group_conflicts(u.name, u.gid, local, min_id)]
        if why:
            problems.append(f"user {u.name!r} (uid {u.uid}) dropped: " + "; ".join(why))
        else:
            users.append(u)
    if len(users) != len(view.users):
        kept = {u.name for u in users}
        groups = [g.model_copy(update={"members": [m for m in g.members if m in kept]})
                  if any(m not in kept for m in g.members) else g for g in groups]
    if not problems:
        return view, []
    return view.model_copy(update={"users": users, "groups": groups}), problems


def user_conflicts(name: str, uid: int, gid: int, local: LocalAccounts, min_id: int) -> list[str]:
    """Why a managed user with these fields may not be published (empty: fine)."""
    why = []
    if name in local.user_names:
        why.append(f"name is a local account (uid {local.user_names[name]})")
    if uid in local.uids:
        why.append(f"uid {uid} belongs to local user {local.uids[uid]}")
    if uid < min_id:
        why.append(f"uid {uid} is below the minimum {min_id}")
    if gid < min_id:
        why.append(f"gid {gid} is below the minimum {min_id}")
    return why


def group_conflicts(name: str, gid: int, local: LocalAccounts, min_id: int) -> list[str]:
    """Why a managed group with this name and gid may not be published."""
    why = []
    if name in local.group_names:
        why.append(f"name is a local group (gid {local.group_names[name]})")
    if gid in local.gids:
        why.append(f"gid {gid} belongs to local group {local.gids[gid]}")
    if gid < min_id:
        why.append(f"gid {gid} is below the minimum {min_id}")
    return why
