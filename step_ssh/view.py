"""The host view: what one host needs to know, as validated pydantic models.

Shared by the cache writer, the control plane and the agent. Validation here is
about shape and syntax (names `useradd` accepts, ids in range, no characters that
break passwd/group lines); checks against the host's own files live in
``step_ssh.cache.local``.
"""
from __future__ import annotations

from enum import Enum
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from step_ssh.limits import (  # noqa: F401  (re-exported: the models' public rules)
    DEFAULT_MAX_STALE,
    DEFAULT_MIN_ID,
    DEFAULT_SUDO_GID,
    DEFAULT_SUDO_GROUP,
    JUMP_GID,
    JUMP_GROUP,
    MAX_ID,
    NAME_MAX,
    NAME_RE,
    PRINCIPAL_RE,
)


def check_name(name: str, what: str = "name") -> str:
    if not NAME_RE.match(name) or len(name) > NAME_MAX:
        raise ValueError(
            f"{what} {name!r} is not a valid account name: use 1-{NAME_MAX} characters, "
            "lower-case letters, digits, '_' or '-', starting with a letter or '_' "
            "(the rules useradd applies)"
        )
    return name


def _check_field(value: str, what: str) -> str:
    if any(c in value for c in ":\n\r\x00"):
        raise ValueError(f"{what} must not contain ':', newlines or NUL: {value!r}")
    return value


class Access(str, Enum):
    """What a user may do on the host. `jump` is bastion port-forwarding only."""

    none = "none"
    ssh = "ssh"
    sudo = "sudo"
    jump = "jump"


ACCESS_CODES = {Access.none: 0, Access.ssh: 1, Access.sudo: 2, Access.jump: 3}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)


class User(_Strict):
    name: str
    uid: int = Field(ge=1, le=MAX_ID)
    gid: int = Field(ge=1, le=MAX_ID)
    gecos: str = ""
    home: Optional[str] = None
    shell: str = "/bin/bash"
    principals: list[str] = Field(default_factory=list)
    access: Access = Access.ssh

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name(v, "user name")

    @field_validator("gecos")
    @classmethod
    def _gecos(cls, v: str) -> str:
        return _check_field(v, "gecos")

    @field_validator("home", "shell")
    @classmethod
    def _path(cls, v: Optional[str]) -> Optional[str]:
        if v is None:
            return v
        _check_field(v, "path")
        if not v.startswith("/"):
            raise ValueError(f"must be an absolute path, got {v!r}")
        return v

    @field_validator("principals")
    @classmethod
    def _principals(cls, v: list[str]) -> list[str]:
        for p in v:
            if not PRINCIPAL_RE.match(p):
                raise ValueError(
                    f"principal {p!r} must be 1-256 characters without spaces, commas or control characters"
                )
        return list(dict.fromkeys(v))

    @property
    def home_dir(self) -> str:
        return self.home or f"/home/{self.name}"


class Group(_Strict):
    name: str
    gid: int = Field(ge=1, le=MAX_ID)
    members: list[str] = Field(default_factory=list)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name(v, "group name")

    @field_validator("members")
    @classmethod
    def _members(cls, v: list[str]) -> list[str]:
        return list(dict.fromkeys(v))


class SudoGroup(_Strict):
    """The synthesized group whose members are the users holding `sudo`."""

    name: str = DEFAULT_SUDO_GROUP
    gid: int = Field(default=DEFAULT_SUDO_GID, ge=1, le=MAX_ID)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name(v, "sudo group name")


class HostView(_Strict):
    """Everything a host's cache holds. Unknown keys are errors, not ignored."""

    revision: int = Field(default=0, ge=0)
    confirmed_at: Optional[int] = None
    max_stale_seconds: int = Field(default=DEFAULT_MAX_STALE, ge=0, le=2**32 - 1)
    bastion: bool = False
    sudo_group: SudoGroup = Field(default_factory=SudoGroup)
    users: list[User] = Field(default_factory=list)
    groups: list[Group] = Field(default_factory=list)
    ssh_user_ca_keys: list[str] = Field(default_factory=list)

    def synthesized_groups(self) -> list["Group"]:
        """The groups the cache adds to the directory's: the sudo group, and on
        a bastion the jump group (members are filled in by the writer)."""
        out = [Group(name=self.sudo_group.name, gid=self.sudo_group.gid)]
        if self.bastion:
            out.append(Group(name=JUMP_GROUP, gid=JUMP_GID))
        return out

    @model_validator(mode="after")
    def _consistent(self) -> "HostView":
        errors = []
        seen: dict[str, str] = {}
        uids: dict[int, str] = {}
        for u in self.users:
            if u.name in seen:
                errors.append(f"user {u.name}: listed twice")
            seen[u.name] = "user"
            if u.uid in uids:
                errors.append(f"user {u.name}: uid {u.uid} already used by {uids[u.uid]}")
            uids[u.uid] = u.name
        gnames: dict[str, int] = {}
        gids: dict[int, str] = {}
        for g in self.groups + self.synthesized_groups():
            if g.name in gnames:
                errors.append(f"group {g.name}: listed twice")
            gnames[g.name] = g.gid
            if g.gid in gids:
                errors.append(f"group {g.name}: gid {g.gid} already used by group {gids[g.gid]}")
            gids[g.gid] = g.name
        for name in [u.name for u in self.users] + [g.name for g in self.groups]:
            if name == JUMP_GROUP:  # sshd's Match Group step-jump would confine whoever holds it
                errors.append(f"{name}: the name is reserved for the group of jump-only users")
        if self.bastion:
            for u in self.users:
                if u.gid == JUMP_GID and u.access != Access.jump:
                    errors.append(f"user {u.name}: primary gid {JUMP_GID} is the jump group's on a bastion "
                                  "(it would confine the user to jumping)")
        for g in self.groups:
            for mname in g.members:
                if mname not in seen:
                    errors.append(f"group {g.name}: member {mname!r} is not a user in this view")
        # A user-private group will be synthesized for a gid no group has; its
        # name (the user's) must then be free.
        for u in self.users:
            if u.gid not in gids and u.name in gnames:
                errors.append(
                    f"user {u.name}: gid {u.gid} has no group and the group name {u.name!r} "
                    f"is taken by gid {gnames[u.name]}"
                )
        if errors:
            raise ValueError("; ".join(errors))
        return self
