"""`step-ssh`: the host-side command."""
from __future__ import annotations

import click

from step_ssh import __version__
from step_ssh.cli.activate_cmds import activate, deactivate
from step_ssh.cli.cache_cmds import cache
from step_ssh.cli.doctor_cmd import doctor
from step_ssh.cli.lookup import lookup
from step_ssh.cli.paths import paths


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="step-ssh")
def main() -> None:
    """Enforce centrally managed SSH access on this host.

    The agent keeps a local cache of this host's users, groups and grants;
    the NSS and PAM modules answer logins from it without the network.
    """


main.add_command(cache)
main.add_command(lookup)
main.add_command(paths)
main.add_command(activate)
main.add_command(deactivate)
main.add_command(doctor)

from step_ssh.cli.agent_cmds import agent, enroll, status  # noqa: E402

main.add_command(enroll)
main.add_command(agent)
main.add_command(status)
