"""The agent's configuration: one YAML file, validated by pydantic.

Unknown keys are errors (a typo must not silently fall back to a default), and
every error names the key it is about, e.g. ``identity.cert: Field required``.
See docs/agent.md for the annotated example.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from step_ssh.limits import DEFAULT_MIN_ID

DEFAULT_CONFIG_DIR = Path("/etc/step-ssh")
DEFAULT_CONFIG = DEFAULT_CONFIG_DIR / "agent.yaml"
DEFAULT_STATE_DIR = Path("/var/lib/step-ssh")
DEFAULT_STATUS_FILE = Path("/run/step-ssh/status.json")

# Names inside a built-in identity directory (agreed with the control plane).
IDENTITY_SUBDIR = "identity"
HOST_CERT = "host.crt"
HOST_KEY = "host.key"
CA_CERT = "ca.crt"

_HOSTPORT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")


class ConfigError(ValueError):
    """The configuration cannot be used; the message names every bad key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BuiltinIdentity(_Strict):
    """The certificate `step-ssh enroll` obtained from the control plane."""

    type: Literal["builtin"] = "builtin"
    dir: Path = DEFAULT_CONFIG_DIR / IDENTITY_SUBDIR
    # Renew when this fraction of the certificate's lifetime has passed.
    renew_fraction: float = Field(default=2 / 3, gt=0, lt=1)

    @property
    def cert(self) -> Path:
        return self.dir / HOST_CERT

    @property
    def key(self) -> Path:
        return self.dir / HOST_KEY

    @property
    def ca(self) -> Path:
        return self.dir / CA_CERT


class FilesIdentity(_Strict):
    """Certificate, key and CA maintained by something else (step-ca, Vault,
    SPIRE...). The agent never writes them; it reloads them when they change."""

    type: Literal["files"]
    cert: Path
    key: Path
    ca: Path
    reload_interval: float = Field(default=10.0, gt=0)


Identity = Annotated[Union[BuiltinIdentity, FilesIdentity], Field(discriminator="type")]


class AuditConfig(_Strict):
    """Shipping the local audit spool to the control plane (docs/audit.md)."""

    enabled: bool = True
    # must be the directory pam_stepssh.so (spool=) and the sudo plugin write
    # to; default: STATE_DIR/spool, i.e. /var/lib/step-ssh/spool
    spool_dir: Optional[Path] = None
    # bound for the events the agent itself appends (access_changed,
    # audit_dropped); the PAM module and sudo plugin have their own (spool_max=)
    spool_max: int = Field(default=64 << 20, ge=4096)
    # how often to look for new events when idle
    poll_interval: float = Field(default=1.0, gt=0)
    # events (and bytes) per ReportAudit call
    batch_size: int = Field(default=500, ge=1, le=10000)
    batch_bytes: int = Field(default=1 << 20, ge=4096, le=3 << 20)
    # renamed spool files waiting at most; bounds the spool on disk to about
    # (max_shipping_files + 1) x spool_max while the control plane is away
    max_shipping_files: int = Field(default=4, ge=1, le=1000)
    # wait this long for writers still appending to a renamed file
    lock_timeout: float = Field(default=2.0, gt=0)
    rpc_timeout: float = Field(default=30.0, gt=0)
    # record access_changed events when a published cache changes a user's access
    access_events: bool = True


class AgentConfig(_Strict):
    # where the control plane listens, HOST:PORT
    server: str
    # name expected in the server's certificate when it differs from HOST
    server_name: Optional[str] = None
    identity: Identity = Field(default_factory=BuiltinIdentity)

    state_dir: Path = DEFAULT_STATE_DIR
    cache_path: Optional[Path] = None            # default: STATE_DIR/cache (what the modules read)
    trusted_user_ca_keys: Optional[Path] = None  # default: STATE_DIR/trusted-user-ca-keys
    status_file: Path = DEFAULT_STATUS_FILE

    # local accounts always win (DESIGN.md invariant 3)
    passwd_file: Path = Path("/etc/passwd")
    group_file: Path = Path("/etc/group")
    min_id: int = Field(default=DEFAULT_MIN_ID, ge=1)

    # refuse a snapshot (or delta) that removes more than this fraction of the
    # users, unless the control plane marks it intended; removals of fewer
    # than shrink_min_users users are never "implausible" (an empty result is)
    max_shrink_ratio: float = Field(default=0.5, gt=0, le=1)
    shrink_min_users: int = Field(default=10, ge=1)

    # re-publish the unchanged cache only to refresh its confirmed_at at most
    # every max(min_confirm_interval, max_stale/8) seconds
    min_confirm_interval: float = Field(default=60.0, ge=0)
    # reconnect backoff: exponential from backoff_initial to backoff_max, with jitter
    backoff_initial: float = Field(default=0.5, gt=0)
    backoff_max: float = Field(default=30.0, gt=0)
    # after a refused (shrunken) view, wait this long before asking again
    refused_retry: float = Field(default=60.0, gt=0)
    # tell systemd READY=1 after this long even if the control plane is
    # unreachable, as long as a valid cache from an earlier run is in place
    ready_timeout: float = Field(default=60.0, ge=0)
    # how often to look at passwd/group (and files identities) for changes
    check_interval: float = Field(default=5.0, gt=0)
    # seconds of silence on the stream after which the connection is
    # considered dead and re-established (server heartbeats keep it alive)
    stream_idle_timeout: float = Field(default=300.0, gt=0)
    connect_timeout: float = Field(default=10.0, gt=0)
    audit: AuditConfig = Field(default_factory=AuditConfig)
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("server")
    @classmethod
    def _server(cls, v: str) -> str:
        m = _HOSTPORT.match(v)
        if not m or not 0 < int(m.group(2)) < 65536:
            raise ValueError(f"must be HOST:PORT (e.g. cp.example.com:8443), got {v!r}")
        return v

    @model_validator(mode="after")
    def _derived(self) -> "AgentConfig":
        if self.cache_path is None:
            self.cache_path = self.state_dir / "cache"
        if self.trusted_user_ca_keys is None:
            self.trusted_user_ca_keys = self.state_dir / "trusted-user-ca-keys"
        if self.audit.spool_dir is None:
            self.audit.spool_dir = self.state_dir / "spool"
        if self.backoff_max < self.backoff_initial:
            raise ValueError("backoff_max must not be smaller than backoff_initial")
        return self

    # -- derived -----------------------------------------------------------
    @property
    def host(self) -> str:
        return self.server.rsplit(":", 1)[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.server.rsplit(":", 1)[1])

    @property
    def tls_name(self) -> str:
        return self.server_name or self.host

    @property
    def view_file(self) -> Path:
        return self.state_dir / "view.pb"

    @property
    def state_file(self) -> Path:
        return self.state_dir / "state.json"


def format_errors(e: ValidationError, source: str) -> str:
    lines = []
    for err in e.errors():
        # drop the discriminator tag pydantic inserts ("identity.files.cert")
        loc = [str(p) for p in err["loc"]]
        if len(loc) >= 2 and loc[0] == "identity" and loc[1] in ("builtin", "files"):
            del loc[1]
        where = ".".join(loc) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see docs/agent.md)"
        lines.append(f"  {where}: {msg}")
    return f"{source} is invalid ({len(lines)} error(s)):\n" + "\n".join(lines)


def parse_config(data: object, source: str = "configuration") -> AgentConfig:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of keys to values at the top level")
    try:
        return AgentConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_errors(e, source)) from None


def load_config(path: str | Path = DEFAULT_CONFIG) -> AgentConfig:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"{path} does not exist: run `step-ssh enroll` (it writes one) or pass --config"
        ) from None
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    return parse_config(data, str(path))


def default_config_text(server: str, identity_dir: Path) -> str:
    """What `step-ssh enroll` writes when no configuration exists yet."""
    return (
        "# step-ssh agent configuration (see docs/agent.md for every key)\n"
        f"server: {server}\n"
        "identity:\n"
        "  type: builtin\n"
        f"  dir: {identity_dir}\n"
    )
