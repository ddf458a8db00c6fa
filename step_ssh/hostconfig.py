"""The login path's host configuration, as text: PAM, sshd and sudoers.

Pure functions returning file contents, so `step-ssh activate` and the test
hosts write the same bytes. docs/login.md explains every line.

PAM placement. Debian's `common-account` ends in `pam_unix` followed by
`pam_deny`, and pam_unix answers PAM_AUTHINFO_UNAVAIL (→ pam_deny) for a
managed user, whose passwd entry says `x` but who has no shadow entry. So the
step-ssh account line goes *before* `@include common-account` with
`[success=done ignore=ignore default=die]`:

- managed user who holds the access the service needs → success, done (the
  local-account checks in common-account do not apply to them);
- managed user without it, stale or unreadable cache → die (denied);
- local or unknown user → PAM_IGNORE, and the stack goes on exactly as before.

Modules above it (pam_nologin in sshd's stack) still run for everyone.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from string import Template
from typing import Iterable, Mapping, Optional, Sequence

from step_ssh.limits import JUMP_GROUP

MARK_BEGIN = "# BEGIN step-ssh (managed by step-ssh activate; do not edit)"
MARK_END = "# END step-ssh"

PAM_MODULE_NAME = "pam_stepssh.so"
PAM_ACCOUNT_CONTROL = "[success=done ignore=ignore default=die]"
PAM_SESSION_CONTROL = "required"

SSHD_DROPIN_PATH = "/etc/ssh/sshd_config.d/10-step-ssh.conf"
# sshd's TrustedUserCAKeys, kept current by the agent (under its state dir, the
# only place the hardened unit may write); also pam_stepssh's ca_keys= default (jump-only
# sessions on a bastion must come from a certificate signed by one of these)
USER_CA_KEYS_PATH = "/var/lib/step-ssh/trusted-user-ca-keys"
SUDOERS_PATH = "/etc/sudoers.d/step-ssh"
# what a jump-only user's shell or command request runs instead (the same
# message as the principals helper's forced command, pam_module/common.h)
JUMP_MESSAGE_COMMAND = "echo 'step-ssh: this account may only jump through this host (ssh -J)' >&2; exit 1"
SUDOERS_MODE = 0o440
TEMPLATES = Path(__file__).resolve().parent / "templates"

# The services activate configures, and whether each gets the session line
# (home directory, session audit events). sudo's session runs for the target
# user (root), where the module has nothing to do.
PAM_SERVICES: dict[str, bool] = {"sshd": True, "sudo": False}


def _module_line(kind: str, control: str, module: str, args: Sequence[str]) -> str:
    for a in args:
        if not a or any(c.isspace() for c in a) or "[" in a or "]" in a:
            raise ValueError(f"PAM module argument {a!r} must be non-empty without spaces or brackets")
    return " ".join([kind, control, module, *args])


def pam_block(module: str = PAM_MODULE_NAME, args: Sequence[str] = (), *, kind: str) -> str:
    """The marked lines for one PAM phase ('account' or 'session')."""
    control = PAM_ACCOUNT_CONTROL if kind == "account" else PAM_SESSION_CONTROL
    if kind == "account":
        note = ("# managed users: allowed here when they hold the access this service needs,\n"
                "# denied otherwise; local users fall through (PAM_IGNORE) to the lines below\n")
    elif kind == "session":
        note = "# managed users: home directory created when missing, session audit events\n"
    else:
        raise ValueError(f"unknown PAM phase {kind!r}")
    return f"{MARK_BEGIN}\n{note}{_module_line(kind, control, module, args)}\n{MARK_END}\n"


def strip_pam_config(text: str) -> str:
    """The service file without step-ssh's blocks (what deactivate restores
    when no byte-identical backup exists)."""
    out, skipping = [], False
    for line in text.splitlines(keepends=True):
        if line.rstrip("\n") == MARK_BEGIN:
            skipping = True
            continue
        if skipping:
            if line.rstrip("\n") == MARK_END:
                skipping = False
            continue
        out.append(line)
    return "".join(out)


def _insert_before(lines: list[str], block: str, patterns: Iterable[str]) -> list[str]:
    for pat in patterns:
        rx = re.compile(pat)
        for i, line in enumerate(lines):
            if rx.match(line):
                return lines[:i] + [block] + lines[i:]
    tail = [] if not lines or lines[-1].endswith("\n") else ["\n"]
    return lines + tail + [block]


def pam_service_config(original: str, *, session: bool = True, module: str = PAM_MODULE_NAME,
                       account_args: Sequence[str] = (), session_args: Sequence[str] = ()) -> str:
    """`original` (e.g. /etc/pam.d/sshd) with step-ssh's account line inserted
    before the common account checks and, if `session`, its session line before
    the common session modules. Idempotent: existing step-ssh blocks are
    replaced, never duplicated."""
    lines = strip_pam_config(original).splitlines(keepends=True)
    lines = _insert_before(lines, pam_block(module, account_args, kind="account"), [
        r"^\s*@include\s+common-account\b",        # Debian, Ubuntu
        r"^\s*account\s+(include|substack)\s",     # Fedora/RHEL/SUSE (system-auth, password-auth)
        r"^\s*-?account\s",                        # anything else: before the first account module
    ])
    if session:
        lines = _insert_before(lines, pam_block(module, session_args, kind="session"), [
            r"^\s*@include\s+common-session",
            r"^\s*session\s+(include|substack)\s",
        ])
    return "".join(lines)


def sshd_dropin(principals_command: str | Path, ca_keys_file: str | Path = USER_CA_KEYS_PATH,
                extra: Optional[Mapping[str, str]] = None) -> str:
    """sshd_config.d drop-in: certificates from the fleet CA, principals from
    the cache. `extra` adds directives (tests: ListenAddress, HostKey, ...).
    sshd takes the first value it reads, and Debian includes sshd_config.d at
    the top of sshd_config, so these win over the main file.

    The `Match Group` block comes last (it runs to the end of this file; sshd
    9.x ends a Match at the end of an included file): jump-only users on a
    bastion, members of the synthesized step-jump group, may open local
    forwards (ssh -J) and nothing else — no remote or Unix-socket forwards,
    which no authorized_principals option can forbid. Elsewhere the group is
    absent and the block matches nobody."""
    cmd = str(principals_command)
    if not cmd.startswith("/") or any(c.isspace() for c in cmd):
        raise ValueError(f"principals command must be an absolute path without spaces: {cmd!r}")
    lines = [
        "# step-ssh: managed users log in with certificates from the fleet CA; the",
        "# principals each account accepts come from the local cache (docs/login.md).",
        f"TrustedUserCAKeys {ca_keys_file}",
        # %U lets the helper check the uid sshd resolved without an NSS lookup
        f"AuthorizedPrincipalsCommand {cmd} %u %U",
        "AuthorizedPrincipalsCommandUser nobody",
        "UsePAM yes",
    ]
    for k, v in (extra or {}).items():
        lines.append(f"{k} {v}")
    lines += [
        "",
        "# jump-only users on a bastion: forward to hosts behind it (ssh -J), nothing else",
        f"Match Group {JUMP_GROUP}",
        "    AllowTcpForwarding local",
        "    AllowStreamLocalForwarding no",
        "    AllowAgentForwarding no",
        "    X11Forwarding no",
        "    PermitTunnel no",
        "    PermitTTY no",
        "    PermitUserRC no",
        f"    ForceCommand {JUMP_MESSAGE_COMMAND}",
    ]
    return "\n".join(lines) + "\n"


def sudoers_dropin(group: str = "step-sudo", nopasswd: bool = True) -> str:
    """/etc/sudoers.d/step-ssh: the synthesized sudo group may run anything.
    Password-less by default: managed users have no local password."""
    from step_ssh.view import check_name
    check_name(group, "sudo group name")
    note = ("NOPASSWD: managed users have no local password to type." if nopasswd else
            "Password required: only for hosts where managed users have local passwords.")
    tmpl = Template((TEMPLATES / "sudoers.in").read_text())
    return tmpl.substitute(group=group, tag="NOPASSWD: " if nopasswd else "", password_note=note)


class SudoersInvalid(ValueError):
    pass


def validate_sudoers(path: str | Path) -> None:
    """Raise SudoersInvalid unless `visudo -c -f PATH` accepts the file."""
    visudo = shutil.which("visudo") or "/usr/sbin/visudo"
    r = subprocess.run([visudo, "-c", "-q", "-f", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        raise SudoersInvalid(f"visudo rejects {path}: {(r.stderr or r.stdout).strip()}")


def check_sudoers_text(text: str) -> None:
    """validate_sudoers for text not yet on disk."""
    with tempfile.NamedTemporaryFile("w", prefix="step-ssh-sudoers.", delete=True) as f:
        f.write(text)
        f.flush()
        validate_sudoers(f.name)


# ---- sudo.conf: the audit plugin --------------------------------------------------

SUDO_CONF_PATH = "/etc/sudo.conf"
SUDO_PLUGIN_PATH = "/usr/lib/step-ssh/stepssh_sudo_audit.so"
SUDO_PLUGIN_SYMBOL = "stepssh_audit"


def sudo_conf_with(original: Optional[str], plugin_path: str = SUDO_PLUGIN_PATH,
                   args: Sequence[str] = ()) -> str:
    """`original` /etc/sudo.conf (None: absent) with step-ssh's audit plugin
    in a marked block at the end. One `Plugin` line is enough: with no
    policy plugin configured sudo still uses sudoers for policy, I/O logging
    and its own audit plugin (sudo.conf(5)), and with one configured this
    only adds an audit plugin. Idempotent."""
    for a in [plugin_path, *args]:
        if not a or any(c.isspace() for c in a) or "#" in a:
            raise ValueError(f"sudo.conf word {a!r} must be non-empty without spaces or '#'")
    if not plugin_path.startswith("/"):
        raise ValueError(f"the plugin path must be absolute: {plugin_path!r}")
    text = strip_pam_config(original or "")
    if text and not text.endswith("\n"):
        text += "\n"
    line = " ".join(["Plugin", SUDO_PLUGIN_SYMBOL, plugin_path, *args])
    return (f"{text}{MARK_BEGIN}\n"
            "# every sudo command, accepted or rejected, to the step-ssh audit spool (docs/audit.md)\n"
            f"{line}\n{MARK_END}\n")


def sudo_conf_plugin_path(text: str) -> Optional[str]:
    """The path of the step-ssh audit plugin a sudo.conf loads, or None."""
    for raw in text.splitlines():
        words = raw.split("#", 1)[0].split()
        if len(words) >= 3 and words[0] == "Plugin" and words[1] == SUDO_PLUGIN_SYMBOL:
            return words[2]
    return None


# ---- nsswitch ---------------------------------------------------------------------

NSS_SERVICE = "stepssh"


def nsswitch_with(conf: str, service: str = NSS_SERVICE, databases: Sequence[str] = ("passwd", "group")) -> str:
    """`conf` with `service` right after `files` on the given databases,
    everything else kept as it is. Idempotent."""
    out = []
    for line in conf.splitlines():
        key, sep, rest = line.partition(":")
        if sep and not key.lstrip().startswith("#") and key.strip() in databases and service not in rest.split():
            words = rest.split()
            at = words.index("files") + 1 if "files" in words else 0
            words.insert(at, service)
            line = f"{key}:{' ' * max(1, 14 - len(key))}{' '.join(words)}"
        out.append(line)
    missing = [d for d in databases if not any(l.partition(":")[0].strip() == d for l in out)]
    out += [f"{d}:{' ' * max(1, 14 - len(d))}files {service}" for d in missing]
    return "\n".join(out) + "\n"


# ---- pam-auth-update (Debian) -------------------------------------------------------

PAM_PROFILE_NAME = "step-ssh"
PAM_PROFILE_PATH = "/usr/share/pam-configs/step-ssh"
# Files pam-auth-update rewrites or keeps its state in; activate records them
# before running it so deactivate can put them back byte for byte.
PAM_AUTH_UPDATE_FILES = [
    "/etc/pam.d/common-account", "/etc/pam.d/common-auth", "/etc/pam.d/common-password",
    "/etc/pam.d/common-session", "/etc/pam.d/common-session-noninteractive",
    "/var/lib/pam/account", "/var/lib/pam/auth", "/var/lib/pam/password",
    "/var/lib/pam/session", "/var/lib/pam/session-noninteractive", "/var/lib/pam/seen",
]


def pam_auth_update_profile(account_args: Sequence[str] = ("default=ssh",), session_args: Sequence[str] = ()) -> str:
    """A pam-auth-update profile: the account line is a Primary module placed
    before pam_unix, so a managed user who holds the access jumps past
    pam_unix (which would deny them: no shadow entry) while everyone else
    falls through unchanged; `default=ssh` gives services other than sshd,
    sudo and su (cron, login, systemd-user) the ssh requirement."""
    acct = _module_line("", PAM_ACCOUNT_CONTROL.replace("success=done", "success=end"), PAM_MODULE_NAME,
                        account_args).strip()
    sess = _module_line("", PAM_SESSION_CONTROL, PAM_MODULE_NAME, session_args).strip()
    return (
        "Name: step-ssh: centrally managed SSH access (account checks, home directories, audit)\n"
        "Default: yes\n"
        "Priority: 300\n"
        "Account-Type: Primary\n"
        "Account:\n"
        f"\t{acct}\n"
        "Session-Type: Additional\n"
        "Session:\n"
        f"\t{sess}\n"
    )
