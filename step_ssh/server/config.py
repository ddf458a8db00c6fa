"""Server directory layout and DIR/server.yaml (validated; unknown keys are errors)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from step_ssh.limits import JUMP_GID, JUMP_GROUP
from step_ssh.view import MAX_ID, SudoGroup

DEFAULT_LISTEN = "127.0.0.1:8443"
DEFAULT_ALLOC = (70000, 2**31 - 1)


class ServerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    listen: str = DEFAULT_LISTEN
    # Ids a directory may supply: [min_id, MAX_ID] minus the reserved ones.
    # Below min_id is the system range (uid 0 included) and always refused.
    min_id: int = Field(default=1000, ge=1)
    # Where ids are allocated when none is supplied (or the supplied one is taken).
    alloc_min: int = Field(default=DEFAULT_ALLOC[0], ge=1)
    alloc_max: int = Field(default=DEFAULT_ALLOC[1], le=MAX_ID)
    reserved_ids: list[int] = Field(default_factory=lambda: [65534, 65535])  # nobody/nogroup, (uint16)-1
    sudo_group: SudoGroup = Field(default_factory=SudoGroup)
    max_stale_seconds: int = Field(default=24 * 3600, ge=60, le=2**32 - 1)
    # Audit events older than this (by event time) are deleted, hourly and at
    # start. 0 keeps them forever: deleting an audit trail is an explicit choice.
    audit_retention_days: int = Field(default=0, ge=0, le=36500)
    heartbeat_seconds: float = Field(default=15.0, gt=0, le=3600)
    host_cert_hours: float = Field(default=24.0, gt=0, le=24 * 90)
    token_ttl_seconds: int = Field(default=3600, ge=60, le=30 * 86400)
    ssh_cert_default_ttl: int = Field(default=16 * 3600, ge=60)
    ssh_cert_max_ttl: int = Field(default=7 * 86400, ge=60)
    # When false, Register may not change a host's tags or bastion flags
    # (only an admin may, with `host tag`): a compromised host then cannot
    # claim tags that would reveal other hosts' users.
    host_may_set_tags: bool = True
    # SCIM 2.0 endpoint for the identity provider (docs/scim.md): HOST:PORT to
    # serve HTTPS on, or null (the default) for none. `run --scim-listen`
    # overrides it. Certificate and key default to the server's own
    # (server.crt / server.key); an IdP in the cloud needs one it trusts.
    scim_listen: Optional[str] = None
    scim_tls_cert: str = ""
    scim_tls_key: str = ""

    @model_validator(mode="after")
    def _ranges(self) -> "ServerConfig":
        if self.alloc_min < self.min_id:
            raise ValueError(f"alloc_min {self.alloc_min} is below min_id {self.min_id} (the system range)")
        if self.alloc_min > self.alloc_max:
            raise ValueError("alloc_min must not exceed alloc_max")
        if self.sudo_group.name == JUMP_GROUP or self.sudo_group.gid == JUMP_GID:
            raise ValueError(f"sudo_group: {JUMP_GROUP} / gid {JUMP_GID} is the group step-ssh synthesizes for "
                             "jump-only users on bastions; choose another name and gid")
        if self.ssh_cert_default_ttl > self.ssh_cert_max_ttl:
            raise ValueError("ssh_cert_default_ttl must not exceed ssh_cert_max_ttl")
        if self.scim_listen is not None:
            host, sep, port = self.scim_listen.rpartition(":")
            if not sep or not host or not port.isdigit() or int(port) > 65535:
                raise ValueError(f"scim_listen {self.scim_listen!r} is not HOST:PORT (e.g. 0.0.0.0:8444)")
        if bool(self.scim_tls_cert) != bool(self.scim_tls_key):
            raise ValueError("give both scim_tls_cert and scim_tls_key, or neither (to use server.crt/server.key)")
        return self


class ServerDir:
    """Paths inside the server directory created by `step-ssh-server init`."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    ca_cert = property(lambda s: s.root / "ca.crt")
    ca_key = property(lambda s: s.root / "ca.key")
    server_cert = property(lambda s: s.root / "server.crt")
    server_key = property(lambda s: s.root / "server.key")
    ssh_ca_key = property(lambda s: s.root / "ssh_user_ca")
    ssh_ca_pub = property(lambda s: s.root / "ssh_user_ca.pub")
    db = property(lambda s: s.root / "server.db")
    config = property(lambda s: s.root / "server.yaml")
    admin_profile = property(lambda s: s.root / "admin-profile.yaml")

    def load_config(self) -> ServerConfig:
        try:
            data = yaml.safe_load(self.config.read_text()) if self.config.exists() else {}
        except yaml.YAMLError as e:
            raise ValueError(f"{self.config} is not valid YAML: {e}") from None
        try:
            return ServerConfig.model_validate(data or {})
        except ValidationError as e:
            lines = [f"  {'.'.join(map(str, err['loc'])) or '(top level)'}: {err['msg']}" for err in e.errors()]
            raise ValueError(f"{self.config} is invalid:\n" + "\n".join(lines)) from None

    def check(self) -> None:
        missing = [p.name for p in (self.ca_cert, self.ca_key, self.server_cert, self.server_key, self.db)
                   if not p.exists()]
        if missing:
            raise FileNotFoundError(
                f"{self.root} is not an initialized server directory (missing {', '.join(missing)}); "
                f"run `step-ssh-server init --dir {self.root}` first")
