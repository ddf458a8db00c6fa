"""`step-ssh activate` and `step-ssh deactivate`."""
from __future__ import annotations

from typing import Optional

import click

from step_ssh.activation.activate import ActivationError, Options, activate as do_activate, deactivate as do_deactivate
from step_ssh.activation.changes import ChangeFailed
from step_ssh.cli.common import emit_json


def _tags(values: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for v in values:
        k, sep, val = v.partition("=")
        if not sep or not k or not val or any(c.isspace() for c in v):
            raise click.BadParameter(f"{v!r}: want KEY=VALUE without spaces", param_hint="--tag")
        out[k] = val
    return out


def _report(res, as_json: bool, verb: str) -> None:
    if as_json:
        emit_json(res.as_dict())
        return
    if res.dry_run:
        click.echo(res.diff, nl=False)
        for a in res.actions:
            click.echo(f"# would {a}")
        click.echo(f"# dry run: {len(res.files)} file(s) would change; nothing was changed")
        return
    if not res.changed:
        click.echo(f"nothing to do: this host is already {verb}")
    for f in res.files:
        click.echo(f"  changed  {f}")
    for a in res.actions:
        click.echo(f"  done     {a}")
    for w in res.warnings:
        click.echo(f"  note     {w}")


@click.command()
@click.option("--server", required=True, metavar="HOST:PORT", help="The control plane.")
@click.option("--token", envvar="STEP_SSH_TOKEN", default=None,
              help="One-time enrollment token (or $STEP_SSH_TOKEN, which keeps it out of `ps`). "
                   "Not needed when this host is already enrolled with this control plane.")
@click.option("--fingerprint", required=True, metavar="SHA256:…",
              help="The control plane's CA fingerprint, as `step-ssh-server init` printed it.")
@click.option("--hostname", default=None, help="Name to enroll as (default: the token's hostname).")
@click.option("--tag", "tags", multiple=True, metavar="KEY=VALUE",
              help="Host tag (repeatable). Given tags replace the host's tags at the control plane.")
@click.option("--is-bastion", is_flag=True, help="This host is a bastion (jump host).")
@click.option("--bastion", "bastions", multiple=True, help="A bastion this host sits behind (repeatable).")
@click.option("--server-name", default=None, help="Name in the server's certificate, if not HOST.")
@click.option("--root", default="/", show_default=True, type=click.Path(file_okay=False),
              help="Act on another root (an image being built); the agent is not started there.")
@click.option("--dry-run", is_flag=True, help="Print a unified diff of every file it would touch; change nothing.")
@click.option("--no-start", is_flag=True, help="Configure and enroll but do not start the agent.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON ({changed, files, actions, ...}).")
def activate(server: str, token: Optional[str], fingerprint: str, hostname: Optional[str], tags: tuple[str, ...],
             is_bastion: bool, bastions: tuple[str, ...], server_name: Optional[str], root: str, dry_run: bool,
             no_start: bool, as_json: bool) -> None:
    """Make this host enforce step-ssh access. Idempotent and reversible.

    Installs the NSS and PAM modules and the principals helper, adds
    `stepssh` after `files` in nsswitch.conf, wires PAM for sshd and sudo
    (a pam-auth-update profile on Debian), writes the sshd drop-in (checked
    with `sshd -t`) and the sudoers drop-in (checked with `visudo -c` before it
    goes live), enrolls the host, registers its tags and starts the agent.

    Run twice, the second run changes nothing. If any step fails, everything
    this run changed is put back. `step-ssh deactivate` restores the host.
    """
    opts = Options(server=server, fingerprint=fingerprint.strip(), token=token, hostname=hostname,
                   tags=_tags(tags), is_bastion=is_bastion, bastions=list(bastions), server_name=server_name,
                   root=root, dry_run=dry_run, start_agent=not no_start)
    try:
        res = do_activate(opts)
    except (ActivationError, ChangeFailed) as e:
        raise click.ClickException(str(e)) from None
    _report(res, as_json, "activated")


@click.command()
@click.option("--root", default="/", show_default=True, type=click.Path(file_okay=False),
              help="Act on another root.")
@click.option("--purge", is_flag=True, help="Also remove the cache, the host identity and the audit spool.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def deactivate(root: str, purge: bool, as_json: bool) -> None:
    """Undo `step-ssh activate`: stop the agent and restore every file it
    changed exactly as it was (kept under /var/lib/step-ssh/activation).

    Without --purge the identity stays, so activating again needs no token.
    """
    try:
        res = do_deactivate(root, purge)
    except ChangeFailed as e:
        raise click.ClickException(str(e)) from None
    _report(res, as_json, "deactivated")
