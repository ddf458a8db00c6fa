"""`step-ssh cache build|show`."""
from __future__ import annotations

import time
from pathlib import Path

import click

from step_ssh.cache.format import FLAG_BASTION, Header
from step_ssh.cache.local import LocalAccounts, ViewRejected
from step_ssh.cache.writer import write_cache
from step_ssh.cli.common import emit_json, load_structured, parse_model
from step_ssh.native import verify_file
from step_ssh.paths import CACHE_PATH
from step_ssh.view import DEFAULT_MIN_ID, HostView


@click.group()
def cache() -> None:
    """Build and inspect the local cache file."""


@cache.command()
@click.argument("input_path", metavar="INPUT")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Cache file to publish (atomically replaced).")
@click.option("--passwd", "passwd_file", default="/etc/passwd", show_default=True,
              help="The host's passwd file: names and uids here are never shadowed.")
@click.option("--group", "group_file", default="/etc/group", show_default=True,
              help="The host's group file: names and gids here are never shadowed.")
@click.option("--min-id", default=DEFAULT_MIN_ID, show_default=True, type=click.IntRange(1),
              help="Lowest uid/gid a managed entry may have.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def build(input_path: str, output: str, passwd_file: str, group_file: str, min_id: int, as_json: bool) -> None:
    """Build a cache from a YAML or JSON host view and publish it.

    INPUT holds `users: [{name, uid, gid, gecos, home, shell, principals,
    access}]` and `groups: [{name, gid, members}]` (see docs/cache-format.md).
    Entries that collide with the host's own accounts, ids below --min-id and
    names useradd would refuse are all reported, and nothing is written.
    Use '-' to read standard input.
    """
    view = parse_model(HostView, load_structured(input_path), input_path)
    try:
        data = write_cache(view, output, local=LocalAccounts.load(passwd_file, group_file), min_id=min_id)
    except ViewRejected as e:
        raise click.ClickException(f"{input_path}: {e}") from None
    except OSError as e:
        raise click.ClickException(f"cannot write {output}: {e.strerror}") from None
    h = Header.parse(data)
    result = {"path": str(output), "users": h.n_users, "groups": h.n_groups, "bytes": h.file_size,
              "revision": h.revision}
    if as_json:
        emit_json(result)
    else:
        click.echo(f"published {output}: {h.n_users} users, {h.n_groups} groups, "
                   f"{h.file_size} bytes, revision {h.revision}")


def describe(path: Path, now: int | None = None) -> dict:
    """Everything `cache show` and `doctor` report about a cache file."""
    now = int(time.time()) if now is None else now
    info: dict = {"path": str(path)}
    try:
        raw = path.read_bytes()
    except OSError as e:
        return {**info, "valid": False, "error": f"cannot read: {e.strerror}"}
    try:
        h = Header.parse(raw)
    except ValueError as e:
        return {**info, "valid": False, "error": str(e)}
    ok, why = verify_file(path)
    age = now - h.confirmed_at
    info.update({
        "valid": ok, "checksum": why, "format_version": h.version, "revision": h.revision,
        "users": h.n_users, "groups": h.n_groups, "bytes": h.file_size,
        "generated_at": h.generated_at, "confirmed_at": h.confirmed_at, "age_seconds": age,
        "max_stale_seconds": h.max_stale, "stale": bool(h.max_stale) and age > h.max_stale,
        "bastion": bool(h.flags & FLAG_BASTION),
    })
    if not ok:
        info["error"] = why
    return info


def _ago(seconds: int) -> str:
    """'42s', '5m 3s', '2h 5m', '3d 4h'."""
    if seconds < 0:
        return f"{seconds}s (clock behind the writer)"
    d, rem = divmod(seconds, 86400)
    h, rem = divmod(rem, 3600)
    m, s = divmod(rem, 60)
    parts = [(d, "d"), (h, "h"), (m, "m"), (s, "s")]
    while len(parts) > 1 and parts[0][0] == 0:
        parts.pop(0)
    return " ".join(f"{n}{u}" for n, u in parts[:2])


@cache.command()
@click.argument("path", default=str(CACHE_PATH), type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
def show(path: str, as_json: bool) -> None:
    """Show a cache file's header, counts, age and checksum status.

    Exits 1 when the file is missing, corrupt or of another format version.
    """
    info = describe(Path(path))
    if as_json:
        emit_json(info)
    elif "revision" not in info:
        click.echo(f"{path}: INVALID: {info['error']}")
    else:
        ts = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(info["confirmed_at"]))
        stale = " (STALE: PAM denies managed logins)" if info["stale"] else ""
        rows = [
            ("path", path),
            ("status", "valid" if info["valid"] else f"INVALID: {info['error']}"),
            ("format version", info["format_version"]),
            ("revision", info["revision"]),
            ("users", info["users"]),
            ("groups", info["groups"]),
            ("size", f"{info['bytes']} bytes"),
            ("confirmed", f"{ts}, {_ago(info['age_seconds'])} ago{stale}"),
            ("stale after", f"{info['max_stale_seconds']}s" if info["max_stale_seconds"] else "never"),
            ("bastion", "yes" if info["bastion"] else "no"),
        ]
        for k, v in rows:
            click.echo(f"{k + ':':16}{v}")
    if not info["valid"]:
        raise SystemExit(1)
