"""`step-ssh doctor`."""
from __future__ import annotations

from pathlib import Path

import click

from step_ssh.cli.common import emit_json


@click.command()
@click.option("--config", "config_path", default="/etc/step-ssh/agent.yaml", show_default=True,
              type=click.Path(dir_okay=False, path_type=Path), help="The agent configuration to check.")
@click.option("--renew", is_flag=True, help="Also renew the host certificate now (built-in identity).")
@click.option("--json", "as_json", is_flag=True, help="Print the checks as JSON.")
def doctor(config_path: Path, renew: bool, as_json: bool) -> None:
    """Check everything step-ssh needs on this host and say what to fix.

    Configuration, agent, control plane (TCP, TLS, gRPC), identity
    certificate, cache freshness, nsswitch, PAM, sshd (`sshd -t`), sudoers
    (`visudo -c`), a real NSS lookup of a managed user, and the audit spool.
    Prints `Check | Status | Description`; exits 1 when any check FAILs.
    """
    from step_ssh.doctor import FAIL, run_checks, table

    checks = run_checks(config_path, renew=renew)
    failed = any(c.status == FAIL for c in checks)
    if as_json:
        emit_json({"ok": not failed, "checks": [c.as_dict() for c in checks]})
    else:
        click.echo(table(checks))
    if failed:
        raise SystemExit(1)
