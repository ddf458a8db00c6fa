"""Local accounts always win: refuse any entry that would shadow the host's own.

Reads the host's passwd and group files directly (not through NSS, which would
include our own module) and reports every offending entry at once.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from step_ssh.view import DEFAULT_MIN_ID, HostView


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
    named = {g.gid for g in view.groups} | {view.sudo_group.gid}
    groups = [(g.name, g.gid) for g in view.groups] + [(view.sudo_group.name, view.sudo_group.gid)]
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
