"""`step-ssh-ctl`: drive the control plane (admin profile), or register this
host with its own identity. Tables for people, --json for scripts.

Exit codes: 0 ok, 1 request refused (invalid, conflict), 2 usage, 3 not found,
4 certificate rejected / not allowed, 5 server unreachable or TLS failure.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import click
import grpc
import yaml
from google.protobuf.json_format import MessageToDict
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from step_ssh import __version__, pki, rpc
from step_ssh.proto import stepssh_pb2 as pb
from step_ssh.proto import stepssh_pb2_grpc as pbg
from step_ssh.server.rules import RuleError, parse_duration, parse_tags

DEFAULT_CONFIG_DIR = Path("/etc/step-ssh")
ACCESS = {"ssh": pb.ACCESS_SSH, "sudo": pb.ACCESS_SUDO}
ACCESS_NAME = {pb.ACCESS_NONE: "none", pb.ACCESS_SSH: "ssh", pb.ACCESS_SUDO: "sudo", pb.ACCESS_JUMP: "jump"}


class CtlError(click.ClickException):
    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code

    def show(self, file=None) -> None:
        click.echo(f"error: {self.message}", err=True)


def default_profile() -> Path:
    env = os.environ.get("STEP_SSH_PROFILE")
    if env:
        return Path(env)
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "step-ssh" / "profile.yaml"


# ---- connection -------------------------------------------------------------------

@dataclass
class Conn:
    address: str
    ca: bytes
    cert: bytes
    key: bytes
    server_name: Optional[str]
    timeout: float
    what: str  # "admin profile PATH" / "host identity DIR"

    def channel(self) -> grpc.Channel:
        problems = rpc.check_identity(self.ca, self.cert, self.key, f"certificate in the {self.what}")
        if problems:
            raise CtlError("; ".join(problems), rpc.EXIT_AUTH)
        return rpc.channel(self.address, rpc.mtls_credentials(self.ca, self.cert, self.key), self.server_name)

    def call(self, method: str, request, service: str = "admin"):
        ch = self.channel()
        try:
            stub = (pbg.AdminServiceStub if service == "admin" else pbg.HostServiceStub)(ch)
            return getattr(stub, method)(request, timeout=self.timeout)
        except grpc.RpcError as e:
            p = rpc.explain(e, self.address)
            raise CtlError(p.message, p.exit_code) from None
        finally:
            ch.close()


def _pem(doc: dict, key: str, base: Path, what: str) -> bytes:
    if doc.get(key):
        return str(doc[key]).encode()
    f = doc.get(f"{key}_file")
    if f:
        p = (base / f) if not os.path.isabs(f) else Path(f)
        try:
            return p.read_bytes()
        except OSError as e:
            raise CtlError(f"{what}: cannot read {key}_file {p}: {e.strerror}", rpc.EXIT_USAGE)
    raise CtlError(f"{what} has no '{key}' (inline PEM) or '{key}_file'", rpc.EXIT_USAGE)


def load_profile(path: Path, server: Optional[str], timeout: float) -> Conn:
    if not path.exists():
        raise CtlError(f"no admin profile at {path}: pass --profile PATH, set STEP_SSH_PROFILE, or copy "
                       "DIR/admin-profile.yaml from `step-ssh-server init`", rpc.EXIT_USAGE)
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise CtlError(f"cannot read the admin profile {path}: {e}", rpc.EXIT_USAGE)
    if not isinstance(doc, dict):
        raise CtlError(f"{path} is not an admin profile (expected a YAML mapping)", rpc.EXIT_USAGE)
    unknown = set(doc) - {"server", "server_name", "ca", "ca_file", "cert", "cert_file", "key", "key_file",
                          "ca_fingerprint"}
    if unknown:
        raise CtlError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}", rpc.EXIT_USAGE)
    what = f"admin profile {path}"
    address = server or doc.get("server")
    if not address:
        raise CtlError(f"{what} has no 'server' (HOST:PORT); add it or pass --server", rpc.EXIT_USAGE)
    base = path.parent
    ca = _pem(doc, "ca", base, what)
    fp = doc.get("ca_fingerprint")
    if fp and pki.fingerprint(ca) != fp:
        raise CtlError(f"{what}: the CA certificate's fingerprint is {pki.fingerprint(ca)}, but the profile pins "
                       f"{fp}", rpc.EXIT_AUTH)
    return Conn(address, ca, _pem(doc, "cert", base, what), _pem(doc, "key", base, what), doc.get("server_name"),
                timeout, what)


def find_server_in_config(config_dir: Path) -> Optional[str]:
    for name in ("agent.yaml", "config.yaml", "step-ssh.yaml"):
        p = config_dir / name
        try:
            doc = yaml.safe_load(p.read_text())
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(doc, dict):
            for k in ("server", "address"):
                if isinstance(doc.get(k), str):
                    return doc[k]
            srv = doc.get("control_plane") or doc.get("server")
            if isinstance(srv, dict) and isinstance(srv.get("address"), str):
                return srv["address"]
    return None


def load_host_identity(config_dir: Path, server: Optional[str], timeout: float) -> Conn:
    ident = config_dir / "identity"
    what = f"host identity {ident}"
    files = {n: ident / n for n in ("host.crt", "host.key", "ca.crt")}
    missing = [str(p) for p in files.values() if not p.exists()]
    if missing:
        raise CtlError(f"this host is not enrolled (missing {', '.join(missing)}): run `step-ssh enroll` first, "
                       "or pass --config-dir", rpc.EXIT_USAGE)
    try:
        data = {n: p.read_bytes() for n, p in files.items()}
    except PermissionError as e:
        raise CtlError(f"cannot read {e.filename}: permission denied (run as root)", rpc.EXIT_AUTH)
    address = server or os.environ.get("STEP_SSH_SERVER") or find_server_in_config(config_dir)
    if not address:
        raise CtlError(f"no server address: pass --server HOST:PORT (none found in {config_dir})", rpc.EXIT_USAGE)
    return Conn(address, data["ca.crt"], data["host.crt"], data["host.key"], None, timeout, what)


# ---- output -----------------------------------------------------------------------

def table(rows: list[list[Any]], headers: list[str]) -> str:
    cells = [[str(c) for c in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    return "\n".join(lines)


def _lower_access(o):
    if isinstance(o, dict):
        return {k: (v[7:].lower() if k == "access" and isinstance(v, str) and v.startswith("ACCESS_")
                    else _lower_access(v)) for k, v in o.items()}
    if isinstance(o, list):
        return [_lower_access(v) for v in o]
    return o


def to_dict(msg) -> dict:
    """JSON-ready dict; 64-bit ints stay numbers, access is 'ssh'/'sudo'/'jump'/'none'."""
    d = MessageToDict(msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    return _lower_access(_ints(msg, d))


def _ints(msg, d):
    # MessageToDict renders (u)int64 as strings; scripts want numbers.
    for f in msg.DESCRIPTOR.fields:
        if f.name not in d:
            continue
        if f.type == f.TYPE_MESSAGE and not f.message_type.GetOptions().map_entry:
            if _repeated(f):
                d[f.name] = [_ints(m, x) for m, x in zip(getattr(msg, f.name), d[f.name])]
            else:
                d[f.name] = _ints(getattr(msg, f.name), d[f.name])
        elif f.type in (f.TYPE_INT64, f.TYPE_UINT64, f.TYPE_SINT64, f.TYPE_FIXED64, f.TYPE_SFIXED64):
            v = d[f.name]
            d[f.name] = [int(x) for x in v] if isinstance(v, list) else int(v)
    return d


def _repeated(f) -> bool:
    r = getattr(f, "is_repeated", None)
    return r if r is not None else f.label == f.LABEL_REPEATED


def tags_str(tags) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(dict(tags).items())) or "-"


def when(ts: int) -> str:
    if not ts:
        return "never"
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def emit(ctx: click.Context, data: Any, text: Callable[[], str]) -> None:
    if ctx.obj["json"]:
        click.echo(json.dumps(data, indent=2, sort_keys=True))
    else:
        out = text()
        if out:
            click.echo(out)


def json_option(f):
    def cb(ctx, param, value):
        if value:
            ctx.find_root().obj["json"] = True
    return click.option("--json", "json_", is_flag=True, expose_value=False, callback=cb,
                        help="Print JSON (for scripts).")(f)


def tag_args(values: Iterable[str]) -> dict[str, str]:
    try:
        return parse_tags(values)
    except RuleError as e:
        raise CtlError(str(e), rpc.EXIT_USAGE)


# ---- root -------------------------------------------------------------------------

@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="step-ssh-ctl")
@click.option("--profile", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Admin profile (default: $STEP_SSH_PROFILE, else ~/.config/step-ssh/profile.yaml).")
@click.option("--server", default=None, help="Override the server address (HOST:PORT).")
@click.option("--timeout", default=30.0, show_default=True, type=float, help="Seconds to wait for the server.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (for scripts).")
@click.pass_context
def main(ctx: click.Context, profile, server, timeout, as_json) -> None:
    """Manage step-ssh: users, groups, grants, hosts, SSH user CAs, audit, SCIM tokens."""
    ctx.ensure_object(dict)
    ctx.obj.update(profile=profile, server=server, timeout=timeout, json=as_json, _conn=None)


def conn(ctx: click.Context) -> Conn:
    o = ctx.find_root().obj
    if o["_conn"] is None:
        o["_conn"] = load_profile(o["profile"] or default_profile(), o["server"], o["timeout"])
    return o["_conn"]


def call(ctx: click.Context, method: str, request):
    return conn(ctx).call(method, request)


# ---- users ------------------------------------------------------------------------

def _id_opt(value: Optional[int], what: str) -> int:
    if value is None:
        return 0
    if value == 0:
        raise CtlError(f"{what} 0 is root's and is never managed by step-ssh; omit --{what} to allocate one",
                       rpc.EXIT_USAGE)
    if value < 0:
        raise CtlError(f"{what} must be positive", rpc.EXIT_USAGE)
    return value


@main.group()
def user() -> None:
    """Users (name, uid, gid, principals, ...)."""


@user.command("add")
@click.argument("name")
@click.option("--uid", type=int, help="uid to use (default: allocated; stable fleet-wide).")
@click.option("--gid", type=int, help="Primary gid: a group's gid, or a private gid (default: allocated).")
@click.option("--principal", "principals", multiple=True, help="SSH certificate principal (repeatable; default NAME).")
@click.option("--email", default="")
@click.option("--shell", default="", help="Login shell (default /bin/bash).")
@click.option("--gecos", default="", help="Full name / comment.")
@click.option("--home", default="", help="Home directory (default /home/NAME).")
@json_option
@click.pass_context
def user_add(ctx, name, uid, gid, principals, email, shell, gecos, home) -> None:
    """Create a user."""
    req = pb.DirectoryUser(name=name, uid=_id_opt(uid, "uid"), gid=_id_opt(gid, "gid"), principals=principals,
                           email=email, shell=shell, gecos=gecos, home=home, active=True)
    u = call(ctx, "CreateUser", req)
    emit(ctx, to_dict(u), lambda: f"created user {u.name} (uid {u.uid}, gid {u.gid})")


@user.command("rm")
@click.argument("name")
@json_option
@click.pass_context
def user_rm(ctx, name) -> None:
    """Remove a user (their uid is never given to anyone else)."""
    r = call(ctx, "DeleteUser", pb.NameRef(name=name))
    emit(ctx, {"revision": r.revision}, lambda: f"removed user {name} (revision {r.revision})")


@user.command("list")
@json_option
@click.pass_context
def user_list(ctx) -> None:
    r = call(ctx, "ListUsers", pb.Empty())
    emit(ctx, [to_dict(u) for u in r.users], lambda: table(
        [[u.name, u.uid, u.gid, "yes" if u.active else "no", ",".join(u.principals) or u.name, u.email, u.gecos]
         for u in r.users], ["NAME", "UID", "GID", "ACTIVE", "PRINCIPALS", "EMAIL", "GECOS"]))


# ---- groups -----------------------------------------------------------------------

@main.group()
def group() -> None:
    """Groups and membership."""


@group.command("add")
@click.argument("name")
@click.option("--gid", type=int)
@click.option("--member", "members", multiple=True, help="Initial member (repeatable).")
@json_option
@click.pass_context
def group_add(ctx, name, gid, members) -> None:
    """Create a group."""
    g = call(ctx, "CreateGroup", pb.DirectoryGroup(name=name, gid=_id_opt(gid, "gid"), members=members))
    emit(ctx, to_dict(g), lambda: f"created group {g.name} (gid {g.gid})")


@group.command("rm")
@click.argument("name")
@json_option
@click.pass_context
def group_rm(ctx, name) -> None:
    """Remove a group (and the grants that name it)."""
    r = call(ctx, "DeleteGroup", pb.NameRef(name=name))
    emit(ctx, {"revision": r.revision}, lambda: f"removed group {name} (revision {r.revision})")


@group.command("add-member")
@click.argument("group_name", metavar="GROUP")
@click.argument("users", nargs=-1, required=True)
@json_option
@click.pass_context
def group_add_member(ctx, group_name, users) -> None:
    """Add USERS to GROUP."""
    revs = [call(ctx, "AddMember", pb.MemberRequest(group=group_name, user=u)).revision for u in users]
    emit(ctx, {"revision": revs[-1]}, lambda: f"added {', '.join(users)} to {group_name} (revision {revs[-1]})")


@group.command("rm-member")
@click.argument("group_name", metavar="GROUP")
@click.argument("users", nargs=-1, required=True)
@json_option
@click.pass_context
def group_rm_member(ctx, group_name, users) -> None:
    """Remove USERS from GROUP."""
    revs = [call(ctx, "RemoveMember", pb.MemberRequest(group=group_name, user=u)).revision for u in users]
    emit(ctx, {"revision": revs[-1]}, lambda: f"removed {', '.join(users)} from {group_name} (revision {revs[-1]})")


@group.command("list")
@click.option("--members/--no-members", default=True, help="Show members.")
@json_option
@click.pass_context
def group_list(ctx, members) -> None:
    r = call(ctx, "ListGroups", pb.Empty())

    def text():
        rows = []
        for g in r.groups:
            m = ",".join(g.members)
            rows.append([g.name, g.gid, len(g.members)] + ([m if len(m) <= 80 else m[:77] + "..."] if members else []))
        return table(rows, ["NAME", "GID", "MEMBERS"] + (["WHO"] if members else []))
    emit(ctx, [to_dict(g) for g in r.groups], text)


# ---- directory import -------------------------------------------------------------

class _DirUser(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    uid: Optional[int] = None
    gid: Optional[int] = None
    gecos: str = ""
    shell: str = ""
    email: str = ""
    principals: list[str] = Field(default_factory=list)
    active: bool = True
    home: str = ""

    @field_validator("uid", "gid")
    @classmethod
    def _no_zero(cls, v):
        if v is not None and v <= 0:
            raise ValueError("uid/gid 0 (root) and negative ids are never managed by step-ssh; omit it to allocate")
        return v


class _DirGroup(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    gid: Optional[int] = None
    members: list[str] = Field(default_factory=list)

    @field_validator("gid")
    @classmethod
    def _no_zero(cls, v):
        if v is not None and v <= 0:
            raise ValueError("gid 0 (root) and negative ids are never managed by step-ssh; omit it to allocate")
        return v


class _Directory(BaseModel):
    model_config = ConfigDict(extra="forbid")
    users: list[_DirUser] = Field(default_factory=list)
    groups: list[_DirGroup] = Field(default_factory=list)


@main.group()
def directory() -> None:
    """Bulk directory import (YAML or JSON)."""


@directory.command("import")
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True))
@click.option("--prune", is_flag=True, help="Remove users and groups the file does not list.")
@json_option
@click.pass_context
def directory_import(ctx, file, prune) -> None:
    """Create/update the users and groups in FILE (a group's members are replaced).

    \b
    users:
      - {name: alice, uid: 70001, principals: [alice, alice@example.com], email: a@example.com}
    groups:
      - {name: devs, members: [alice]}
    """
    try:
        text = sys.stdin.read() if file == "-" else Path(file).read_text()
        data = yaml.safe_load(text) or {}
    except OSError as e:
        raise CtlError(f"cannot read {file}: {e.strerror}", rpc.EXIT_USAGE)
    except yaml.YAMLError as e:
        raise CtlError(f"{file} is not valid YAML: {e}", rpc.EXIT_USAGE)
    try:
        d = _Directory.model_validate(data)
    except ValidationError as e:
        lines = [f"  {'.'.join(map(str, err['loc'])) or '(top level)'}: {err['msg'].removeprefix('Value error, ')}"
                 for err in e.errors()]
        raise CtlError(f"{file} is invalid ({len(lines)} error(s)):\n" + "\n".join(lines), rpc.EXIT_USAGE)
    req = pb.DirectoryImport(prune=prune)
    for u in d.users:
        req.users.add(name=u.name, uid=u.uid or 0, gid=u.gid or 0, gecos=u.gecos, shell=u.shell, email=u.email,
                      principals=u.principals, active=u.active, home=u.home)
    for g in d.groups:
        req.groups.add(name=g.name, gid=g.gid or 0, members=g.members)
    r = call(ctx, "ImportDirectory", req)

    def text():
        s = (f"revision {r.revision}: users {r.users_created} created, {r.users_updated} updated, "
             f"{r.users_removed} removed; groups {r.groups_created} created, {r.groups_updated} updated, "
             f"{r.groups_removed} removed")
        return "\n".join([s] + [f"warning: {w}" for w in r.warnings])
    emit(ctx, to_dict(r), text)


# ---- grants -----------------------------------------------------------------------

@main.group()
def grant() -> None:
    """Grants: a group gets ssh or sudo on hosts carrying all the given tags."""


@grant.command("add")
@click.option("--group", "group_name", required=True)
@click.option("--tag", "tags", multiple=True, required=True, help="KEY=VALUE the host must carry (repeatable; all must match).")
@click.option("--access", type=click.Choice(["ssh", "sudo"]), required=True)
@json_option
@click.pass_context
def grant_add(ctx, group_name, tags, access) -> None:
    g = call(ctx, "AddGrant", pb.Grant(group=group_name, tags=tag_args(tags), access=ACCESS[access]))
    emit(ctx, to_dict(g), lambda: f"grant {g.id}: {g.group} gets {access} on hosts with {tags_str(g.tags)}")


@grant.command("list")
@json_option
@click.pass_context
def grant_list(ctx) -> None:
    r = call(ctx, "ListGrants", pb.Empty())
    emit(ctx, [to_dict(g) for g in r.grants], lambda: table(
        [[g.id, g.group, ACCESS_NAME[g.access], tags_str(g.tags)] for g in r.grants],
        ["ID", "GROUP", "ACCESS", "TAGS"]))


@grant.command("rm")
@click.argument("grant_id", metavar="ID")
@json_option
@click.pass_context
def grant_rm(ctx, grant_id) -> None:
    r = call(ctx, "RemoveGrant", pb.IdRef(id=grant_id))
    emit(ctx, {"revision": r.revision}, lambda: f"removed grant {grant_id} (revision {r.revision})")


# ---- hosts ------------------------------------------------------------------------

@main.group()
def host() -> None:
    """Enrolled hosts: list, show, tag, untag, remove (revokes its certificate)."""


def _host_text(h) -> str:
    return "\n".join([
        f"id:             {h.id}",
        f"hostname:       {h.hostname}",
        f"tags:           {tags_str(h.tags)}",
        f"bastion:        {'yes' if h.is_bastion else 'no'}",
        f"behind:         {', '.join(h.bastions) or '-'}",
        f"connected:      {'yes' if h.connected else 'no'}",
        f"last seen:      {when(h.last_seen)}",
        f"agent version:  {h.agent_version or '-'}",
        f"revision:       applied {h.applied_revision}" + (f", sent {h.sent_revision}" if h.connected else ""),
        f"cert serial:    {h.certificate_serial}",
        f"cert expires:   {when(h.cert_not_after)}",
    ])


@host.command("list")
@json_option
@click.pass_context
def host_list(ctx) -> None:
    r = call(ctx, "ListHosts", pb.Empty())
    emit(ctx, [to_dict(h) for h in r.hosts], lambda: table(
        [[h.hostname, h.id, tags_str(h.tags), "yes" if h.is_bastion else "", "yes" if h.connected else "no",
          when(h.last_seen), h.agent_version] for h in r.hosts],
        ["HOSTNAME", "ID", "TAGS", "BASTION", "CONNECTED", "LAST SEEN", "AGENT"]))


@host.command("show")
@click.argument("name", metavar="HOST")
@json_option
@click.pass_context
def host_show(ctx, name) -> None:
    h = call(ctx, "GetHost", pb.NameRef(name=name))
    emit(ctx, to_dict(h), lambda: _host_text(h))


@host.command("tag")
@click.argument("name", metavar="HOST")
@click.argument("tags", nargs=-1, required=True)
@json_option
@click.pass_context
def host_tag(ctx, name, tags) -> None:
    """Set tags KEY=VALUE on HOST (other tags stay)."""
    h = call(ctx, "TagHost", pb.TagRequest(host=name, tags=tag_args(tags)))
    emit(ctx, to_dict(h), lambda: f"{h.hostname}: {tags_str(h.tags)}")


@host.command("untag")
@click.argument("name", metavar="HOST")
@click.argument("keys", nargs=-1, required=True)
@json_option
@click.pass_context
def host_untag(ctx, name, keys) -> None:
    """Remove tag KEYs from HOST."""
    for k in keys:
        if "=" in k:
            raise CtlError(f"untag takes tag KEYS, not KEY=VALUE: {k!r} (did you mean {k.partition('=')[0]!r}?)",
                           rpc.EXIT_USAGE)
    h = call(ctx, "UntagHost", pb.UntagRequest(host=name, keys=keys))
    emit(ctx, to_dict(h), lambda: f"{h.hostname}: {tags_str(h.tags)}")


@host.command("rm")
@click.argument("name", metavar="HOST")
@json_option
@click.pass_context
def host_rm(ctx, name) -> None:
    """Remove HOST; its certificate stops working at once."""
    r = call(ctx, "DeleteHost", pb.NameRef(name=name))
    emit(ctx, {"revision": r.revision}, lambda: f"removed host {name} (revision {r.revision})")


@host.command("view")
@click.argument("name", metavar="HOST")
@json_option
@click.pass_context
def host_view(ctx, name) -> None:
    """What HOST gets now: users with access, groups, settings."""
    v = call(ctx, "GetHostView", pb.NameRef(name=name))

    def text():
        parts = [f"revision {v.revision}; bastion: {'yes' if v.settings.bastion else 'no'}; "
                 f"{len(v.settings.ssh_user_ca_keys)} trusted SSH user CA key(s)", "",
                 table([[u.name, u.uid, u.gid, ACCESS_NAME[u.access], ",".join(u.principals)] for u in v.users],
                       ["USER", "UID", "GID", "ACCESS", "PRINCIPALS"])]
        if v.groups:
            parts += ["", table([[g.name, g.gid, ",".join(g.members)] for g in v.groups], ["GROUP", "GID", "MEMBERS"])]
        return "\n".join(parts)
    emit(ctx, to_dict(v), text)


@main.group()
def token() -> None:
    """Enrollment tokens (same as `step-ssh-server token`, over the API)."""


@token.command("create")
@click.option("--hostname", required=True)
@click.option("--tag", "tags", multiple=True)
@click.option("--ttl", default="1h", show_default=True)
@json_option
@click.pass_context
def token_create(ctx, hostname, tags, ttl) -> None:
    try:
        seconds = parse_duration(ttl)
    except RuleError as e:
        raise CtlError(str(e), rpc.EXIT_USAGE)
    r = call(ctx, "CreateEnrollToken", pb.TokenRequest(hostname=hostname, tags=tag_args(tags), ttl_seconds=seconds))
    emit(ctx, {"token": r.token, "expires_at": r.expires_at}, lambda: r.token)


# ---- audit ------------------------------------------------------------------------

def _since(value: Optional[str]) -> int:
    if not value:
        return 0
    try:
        return int((time.time() - parse_duration(value)) * 1_000_000)
    except RuleError:
        pass
    try:
        t = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        if t.tzinfo is None:
            t = t.replace(tzinfo=dt.timezone.utc)
        return int(t.timestamp() * 1_000_000)
    except ValueError:
        raise CtlError(f"--since {value!r}: give a duration (30m, 2h, 7d) or a time (2024-05-01T12:00:00Z)",
                       rpc.EXIT_USAGE)


@main.group()
def audit() -> None:
    """Audit events shipped by hosts."""


def _event_row(e) -> list:
    t = dt.datetime.fromtimestamp(e.time_us / 1e6, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    if e.type == "sudo":
        what = (f"as {e.target_user} " if e.target_user else "") + f"in {e.cwd or '?'}: {e.command}" \
            + (f" ({e.reason})" if e.reason else "")
    elif e.type == "sudo_exit":
        try:
            extra = json.loads(e.extra_json or "{}")
        except ValueError:
            extra = {}
        status = e.reason or (f"exit {extra['exit_status']}" if "exit_status" in extra else "")
        took = f", {extra['duration_ms'] / 1000:.1f} s" if isinstance(extra.get("duration_ms"), (int, float)) else ""
        what = f"{status}{took}: {e.command}"
    elif e.type == "home_created":
        try:
            what = json.loads(e.extra_json or "{}").get("home", "")
        except ValueError:
            what = ""
    elif e.type == "access_changed":
        what = e.reason or f"{e.old_access} -> {e.access}"
    elif e.reason:
        what = e.reason
    else:
        what = " ".join(x for x in (f"from {e.remote_host}" if e.remote_host else "",
                                    f"tty {e.tty}" if e.tty else "") if x)
    return [t, e.hostname or e.host_id, e.type, e.user, e.result, what]


_EVENT_HEADERS = ["TIME (UTC)", "HOST", "TYPE", "USER", "RESULT", "DETAIL"]


def _event_json(e) -> dict:
    from step_ssh.audit import event_dict
    return event_dict(e)


def _audit_filters(f):
    for opt in reversed([
        click.option("--host", "host_", default="", help="Hostname or host id."),
        click.option("--user", "user_", default=""),
        click.option("--type", "type_", default="",
                     help="session_open, session_close, sudo, login_denied, home_created, access_changed, "
                          "audit_dropped"),
        click.option("--since", default=None, help="Duration (2h, 7d) or ISO time; by event time."),
    ]):
        f = opt(f)
    return f


@audit.command("list")
@_audit_filters
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1, 10000),
              help="The most recent N matching events (oldest first).")
@json_option
@click.pass_context
def audit_list(ctx, host_, user_, type_, since, limit) -> None:
    """Stored events, oldest first (docs/audit.md)."""
    r = call(ctx, "ListAudit", pb.AuditQuery(host=host_, user=user_, type=type_, since_us=_since(since), limit=limit))
    emit(ctx, [_event_json(e) for e in r.events],
         lambda: table([_event_row(e) for e in r.events], _EVENT_HEADERS))


@audit.command("tail")
@_audit_filters
@click.option("-n", "--lines", default=10, show_default=True, type=click.IntRange(0, 10000),
              help="Recent events to show first (0: only new ones).")
@click.option("--count", default=0, type=click.IntRange(0), help="Exit after this many events (0: follow forever).")
@json_option
@click.pass_context
def audit_tail(ctx, host_, user_, type_, since, lines, count) -> None:
    """Follow events as hosts ship them (Ctrl-C to stop). --json: one JSON object per line."""
    c = conn(ctx)
    as_json = ctx.obj["json"]
    req = pb.AuditQuery(host=host_, user=user_, type=type_, since_us=_since(since), limit=max(lines, 1),
                        no_backlog=lines == 0)
    ch = c.channel()
    seen = 0
    widths = [19, 12, 14, 12, 7]
    try:
        stream = pbg.AdminServiceStub(ch).TailAudit(req)
        if not as_json:
            click.echo("  ".join(h.ljust(w) for h, w in zip(_EVENT_HEADERS, widths + [0])).rstrip())
        for e in stream:
            if as_json:
                click.echo(json.dumps(_event_json(e), sort_keys=True))
            else:
                row = _event_row(e)
                click.echo("  ".join(str(v).ljust(w) for v, w in zip(row, widths + [0])).rstrip())
            seen += 1
            if count and seen >= count:
                stream.cancel()
                break
        else:
            raise CtlError("the control plane ended the stream (shutting down?); run `audit tail` again",
                           rpc.EXIT_UNREACHABLE)
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.CANCELLED and count and seen >= count:
            return
        p = rpc.explain(e, c.address)
        raise CtlError(p.message, p.exit_code) from None
    except KeyboardInterrupt:
        pass
    finally:
        ch.close()


# ---- SCIM --------------------------------------------------------------------------

@main.group()
def scim() -> None:
    """The SCIM 2.0 endpoint the identity provider pushes users and groups to (docs/scim.md)."""


@scim.group("token")
def scim_token() -> None:
    """Bearer tokens for the SCIM endpoint (stored hashed; shown once)."""


def _token_row(t) -> dict:
    d = to_dict(t)
    d.pop("token", None)
    return d


@scim_token.command("create")
@click.option("--name", default="scim", show_default=True, help="What the token is for (e.g. okta, entra).")
@json_option
@click.pass_context
def scim_token_create(ctx, name) -> None:
    """Create a token and print it (the only time it is shown)."""
    t = call(ctx, "CreateScimToken", pb.ScimTokenRequest(name=name))
    emit(ctx, {**_token_row(t), "token": t.token}, lambda: t.token)
    if not ctx.find_root().obj["json"]:
        click.echo(f"SCIM token {t.id} ({t.name}): give it to the IdP as its bearer token (Okta: API token, "
                   "Entra: secret token); it is not shown again", err=True)


@scim_token.command("list")
@json_option
@click.pass_context
def scim_token_list(ctx) -> None:
    """Tokens with their ids, names, creation, last use and state (never the tokens themselves)."""
    r = call(ctx, "ListScimTokens", pb.Empty())
    emit(ctx, [_token_row(t) for t in r.tokens], lambda: table(
        [[t.id, t.name, when(t.created_at), when(t.last_used_at),
          f"revoked {when(t.revoked_at)}" if t.revoked_at else "valid"] for t in r.tokens],
        ["ID", "NAME", "CREATED", "LAST USED", "STATE"]))


@scim_token.command("revoke")
@click.argument("token_id", metavar="ID")
@json_option
@click.pass_context
def scim_token_revoke(ctx, token_id) -> None:
    """Revoke a token: requests with it get 401 from now on."""
    t = call(ctx, "RevokeScimToken", pb.IdRef(id=token_id))
    emit(ctx, _token_row(t), lambda: f"revoked SCIM token {t.id} ({t.name})")


# ---- SSH user CAs and signing -----------------------------------------------------

@main.group()
def ca() -> None:
    """SSH user CA public keys that hosts trust (several at once, for rotation)."""


@ca.command("add")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--comment", default="")
@json_option
@click.pass_context
def ca_add(ctx, file, comment) -> None:
    c = call(ctx, "AddUserCA", pb.UserCA(public_key=Path(file).read_text(), comment=comment))
    emit(ctx, to_dict(c), lambda: f"trusted SSH user CA {c.id}")


@ca.command("list")
@json_option
@click.pass_context
def ca_list(ctx) -> None:
    r = call(ctx, "ListUserCAs", pb.Empty())
    emit(ctx, [to_dict(c) for c in r.cas], lambda: table(
        [[c.id, c.public_key.split()[0], c.comment] for c in r.cas], ["ID", "TYPE", "COMMENT"]))


@ca.command("rm")
@click.argument("ca_id", metavar="ID")
@json_option
@click.pass_context
def ca_rm(ctx, ca_id) -> None:
    r = call(ctx, "RemoveUserCA", pb.IdRef(id=ca_id))
    emit(ctx, {"revision": r.revision}, lambda: f"removed SSH user CA {ca_id} (revision {r.revision})")


@main.group()
def ssh() -> None:
    """SSH user certificates signed by the control plane's own user CA."""


@ssh.command("sign")
@click.option("--user", "user_", required=True)
@click.option("--pubkey", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--ttl", default="16h", show_default=True)
@click.option("-o", "--out", type=click.Path(dir_okay=False), default=None,
              help="Write the certificate here (default: next to the key as NAME-cert.pub).")
@json_option
@click.pass_context
def ssh_sign(ctx, user_, pubkey, ttl, out) -> None:
    """Sign PUBKEY into a certificate carrying exactly USER's principals."""
    try:
        seconds = parse_duration(ttl)
    except RuleError as e:
        raise CtlError(str(e), rpc.EXIT_USAGE)
    r = call(ctx, "SignUserKey", pb.SignRequest(user=user_, public_key=Path(pubkey).read_text(), ttl_seconds=seconds))
    if out is None:
        p = Path(pubkey)
        out = str(p.with_name(p.name[:-4] + "-cert.pub" if p.name.endswith(".pub") else p.name + "-cert.pub"))
    if out == "-":
        click.echo(r.certificate)
        return
    Path(out).write_text(r.certificate + "\n")
    emit(ctx, {"certificate_file": out, "principals": list(r.principals), "valid_before": r.valid_before},
         lambda: f"wrote {out}: principals {','.join(r.principals)}, valid until {when(r.valid_before)}")


# ---- host side --------------------------------------------------------------------

@main.command()
@click.option("--config-dir", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_CONFIG_DIR,
              show_default=True, help="The host's step-ssh config dir (identity/host.crt, host.key, ca.crt).")
@click.option("--hostname", default="", help="Name to register (default: keep the enrolled one).")
@click.option("--tag", "tags", multiple=True, help="KEY=VALUE (repeatable). Replaces all of the host's tags.")
@click.option("--is-bastion", is_flag=True, help="This host is a bastion (jump host).")
@click.option("--bastion", "bastions", multiple=True, help="A bastion (hostname or id) this host sits behind.")
@click.option("--server", "server_", default=None,
              help="Control plane HOST:PORT (default: --server before the command, $STEP_SSH_SERVER, or the "
                   "agent's config in --config-dir).")
@json_option
@click.pass_context
def register(ctx, config_dir, hostname, tags, is_bastion, bastions, server_) -> None:
    """Declare this host's name, tags and bastion flags, with its own identity.

    Everything is replaced: tags not given are removed, as a host re-declaring itself."""
    o = ctx.find_root().obj
    c = load_host_identity(config_dir, server_ or o["server"], o["timeout"])
    r = c.call("Register", pb.RegisterRequest(hostname=hostname, tags=tag_args(tags), is_bastion=is_bastion,
                                              bastions=bastions, agent_version=__version__), service="host")
    h = r.host
    emit(ctx, to_dict(h), lambda: f"registered {h.hostname} ({h.id}): tags {tags_str(h.tags)}"
         + ("; bastion" if h.is_bastion else "") + (f"; behind {', '.join(h.bastions)}" if h.bastions else ""))


if __name__ == "__main__":
    main()
