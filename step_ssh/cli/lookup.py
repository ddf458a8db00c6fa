"""`step-ssh lookup`: ask the C reader what NSS would answer, like getent."""
from __future__ import annotations

import click

from step_ssh.native import NssClient, Unavailable
from step_ssh.paths import CACHE_PATH

NOT_FOUND = 2  # getent's exit code for "key not found"
NO_GID = 0xFFFFFFFF  # getent initgroups passes (gid_t)-1: list every group


def _client(ctx: click.Context) -> NssClient:
    return NssClient(ctx.obj["cache"])


def _run(fn):
    try:
        return fn()
    except Unavailable as e:
        raise click.ClickException(str(e)) from None


@click.group()
@click.option("--cache", "cache_path", default=str(CACHE_PATH), show_default=True,
              type=click.Path(dir_okay=False), help="Cache file to read.")
@click.pass_context
def lookup(ctx: click.Context, cache_path: str) -> None:
    """Resolve names through the C reader (the code glibc loads), like getent.

    Exit status: 0 found, 2 not found, 1 cache unavailable.
    """
    ctx.obj = {"cache": cache_path}


@lookup.command()
@click.argument("key", required=False)
@click.pass_context
def passwd(ctx: click.Context, key: str | None) -> None:
    """One user by NAME or UID, or every user."""
    c = _client(ctx)
    if key is None:
        for e in _run(c.passwd_entries):
            click.echo(e.line())
        return
    e = _run(lambda: c.getpwuid(int(key)) if key.isdigit() else c.getpwnam(key))
    if e is None:
        ctx.exit(NOT_FOUND)
    click.echo(e.line())


@lookup.command()
@click.argument("key", required=False)
@click.pass_context
def group(ctx: click.Context, key: str | None) -> None:
    """One group by NAME or GID, or every group."""
    c = _client(ctx)
    if key is None:
        for e in _run(c.group_entries):
            click.echo(e.line())
        return
    e = _run(lambda: c.getgrgid(int(key)) if key.isdigit() else c.getgrnam(key))
    if e is None:
        ctx.exit(NOT_FOUND)
    click.echo(e.line())


@lookup.command()
@click.argument("name")
@click.pass_context
def initgroups(ctx: click.Context, name: str) -> None:
    """A user's supplementary gids, as `getent initgroups NAME` prints them."""
    c = _client(ctx)
    gids = _run(lambda: c.initgroups(name, NO_GID))
    if gids is None:
        ctx.exit(NOT_FOUND)
    click.echo(f"{name:<21}" + "".join(f" {g}" for g in gids))
