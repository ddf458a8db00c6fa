from __future__ import annotations

import click

from step_ssh import paths as P
from step_ssh.cli.common import emit_json


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
def paths(as_json: bool) -> None:
    """Show where this installation keeps its built modules and the cache."""
    info = P.installed()
    if as_json:
        emit_json(info)
    else:
        for k, v in info.items():
            click.echo(f"{k:20} {v}")
