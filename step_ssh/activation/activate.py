"""`step-ssh activate` / `deactivate`: configure a host, reversibly.

Activate, in order, as one transaction (any failure puts back everything this
run changed, including a fresh enrollment):

1. files: NSS and PAM modules, principals helper, nsswitch.conf, sshd
   drop-in, sudoers drop-in (checked with `visudo -c` before it goes live),
   agent config, systemd unit; plus the PAM wiring: a pam-auth-update profile
   on Debian, marked edits of /etc/pam.d/{sshd,sudo} elsewhere; and, where
   sudo is installed, the sudo audit plugin with a marked `Plugin` line in
   /etc/sudo.conf (docs/audit.md);
2. checks: `sshd -t` and `sudo -V` (sudo loads every plugin) on the resulting
   configuration;
3. enrollment (skipped when a valid identity for this CA exists, so a second
   run needs no new token) and registration of hostname/tags/bastion flags;
4. the agent: `systemctl enable --now` under systemd, otherwise started in
   the background (test hosts, containers), and awaited.

Deactivate stops the agent, removes the PAM profile and restores every
recorded file byte for byte; `--purge` also removes cache, identity and spool.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from step_ssh import hostconfig, paths, pki
from step_ssh.activation.changes import ChangeFailed, FileChange, Host

CONFIG_DIR = "/etc/step-ssh"
AGENT_CONFIG = f"{CONFIG_DIR}/agent.yaml"
IDENTITY_DIR = f"{CONFIG_DIR}/identity"
STATE_DIR = "/var/lib/step-ssh"
UNIT_PATH = "/etc/systemd/system/step-ssh.service"
PRINCIPALS_PATH = "/usr/lib/step-ssh/step-ssh-principals"
PIDFILE = "/run/step-ssh/agent.pid"
AGENT_LOG = "/var/log/step-ssh/agent.log"
REGISTRATION = f"{STATE_DIR}/activation/registration.json"
UNIT_TEMPLATE = Path(__file__).resolve().parent.parent / "templates" / "step-ssh.service"  # -> systemd/


class ActivationError(RuntimeError):
    """Activation failed; `undone` says whether everything was put back."""


@dataclass
class Options:
    server: str
    fingerprint: str
    token: Optional[str] = None
    hostname: Optional[str] = None
    tags: dict[str, str] = field(default_factory=dict)
    is_bastion: bool = False
    bastions: list[str] = field(default_factory=list)
    server_name: Optional[str] = None
    root: str = "/"
    dry_run: bool = False
    start_agent: bool = True
    wait_seconds: float = 30.0


@dataclass
class Result:
    changed: bool = False
    dry_run: bool = False
    files: list[str] = field(default_factory=list)
    actions: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    diff: str = ""
    host_id: Optional[str] = None

    def as_dict(self) -> dict:
        return {k: v for k, v in vars(self).items() if k != "diff" or self.dry_run}


# ---- what the host should look like ---------------------------------------------------

def _step_ssh_command() -> str:
    """The installed `step-ssh` script, for the systemd unit."""
    cand = Path(sys.prefix) / "bin" / "step-ssh"
    return str(cand) if cand.exists() else f"{sys.executable} -m step_ssh.cli"


def use_pam_auth_update(host: Host) -> bool:
    return (host.p("/usr/sbin/pam-auth-update").exists() and host.p("/usr/share/pam-configs").is_dir()
            and (host.root == Path("/") or _can_chroot(host)))


def _can_chroot(host: Host) -> bool:
    return os.geteuid() == 0 and host.p("/bin/sh").exists()


def _chroot(host: Host, argv: list[str]) -> list[str]:
    return argv if host.root == Path("/") else ["chroot", str(host.root)] + argv


def agent_config_text(opts: Options) -> str:
    server_name = f"server_name: {opts.server_name}\n" if opts.server_name else ""
    return (
        "# step-ssh agent configuration, written by `step-ssh activate` (docs/agent.md)\n"
        f"server: {opts.server}\n{server_name}"
        "identity:\n"
        "  type: builtin\n"
        f"  dir: {IDENTITY_DIR}\n"
    )


def file_changes(opts: Options, host: Host) -> list[FileChange]:
    lib = paths.lib_dir()
    sshd_text = hostconfig.sshd_dropin(PRINCIPALS_PATH, hostconfig.USER_CA_KEYS_PATH)
    sudoers = hostconfig.sudoers_dropin()
    nss_conf = host.current("/etc/nsswitch.conf")[0]
    changes = [
        FileChange(f"{lib}/libnss_stepssh.so.2", paths.NSS_MODULE.read_bytes(), 0o644, why="NSS module"),
        FileChange(f"{lib}/security/pam_stepssh.so", paths.PAM_MODULE.read_bytes(), 0o644, why="PAM module"),
        FileChange(PRINCIPALS_PATH, paths.PRINCIPALS_COMMAND.read_bytes(), 0o755,
                   why="sshd AuthorizedPrincipalsCommand"),
        FileChange("/etc/nsswitch.conf",
                   hostconfig.nsswitch_with((nss_conf or b"").decode()).encode(), 0o644,
                   why="stepssh after files for passwd and group"),
        FileChange(hostconfig.SSHD_DROPIN_PATH, sshd_text.encode(), 0o644, why="sshd: certificates + principals"),
        FileChange(hostconfig.SUDOERS_PATH, sudoers.encode(), hostconfig.SUDOERS_MODE,
                   validate=hostconfig.validate_sudoers, why="sudo for the step-sudo group"),
        FileChange(AGENT_CONFIG, agent_config_text(opts).encode(), 0o644, why="agent configuration"),
        FileChange(UNIT_PATH, UNIT_TEMPLATE.read_text().replace("@STEP_SSH@", _step_ssh_command()).encode(),
                   0o644, why="systemd unit"),
    ]
    changes += sudo_audit_changes(host)
    if use_pam_auth_update(host):
        changes.append(FileChange(hostconfig.PAM_PROFILE_PATH, hostconfig.pam_auth_update_profile().encode(),
                                  0o644, why="pam-auth-update profile"))
    else:
        for service, session in hostconfig.PAM_SERVICES.items():
            path = f"/etc/pam.d/{service}"
            current = host.current(path)[0]
            if current is None:
                continue
            text = hostconfig.pam_service_config(current.decode(), session=session)
            changes.append(FileChange(path, text.encode(), host.current(path)[1] or 0o644,
                                      why=f"PAM for {service} (marked block)"))
    return changes


def sudo_installed(host: Host) -> bool:
    return host.p("/usr/bin/sudo").exists()


def sudo_audit_changes(host: Host) -> list[FileChange]:
    """The sudo audit plugin and its sudo.conf line; the plugin first, so
    sudo.conf never names a file that is not there yet."""
    if not sudo_installed(host) or not paths.SUDO_AUDIT_PLUGIN.exists():
        return []
    current = host.current(hostconfig.SUDO_CONF_PATH)
    text = hostconfig.sudo_conf_with(current[0].decode() if current[0] is not None else None)
    return [
        FileChange(hostconfig.SUDO_PLUGIN_PATH, paths.SUDO_AUDIT_PLUGIN.read_bytes(), 0o644,
                   why="sudo audit plugin (sudo commands to the audit spool)"),
        FileChange(hostconfig.SUDO_CONF_PATH, text.encode(), current[1] or 0o644,
                   validate=lambda _staged: check_sudo_plugin(host),
                   why="sudo.conf: load the audit plugin (marked block)"),
    ]


def check_sudo_plugin(host: Host) -> None:
    """Before sudo.conf names the plugin: it is there, root's, loadable and
    exports the audit plugin structure (else sudo would refuse to run)."""
    import ctypes
    p = host.p(hostconfig.SUDO_PLUGIN_PATH)
    st = p.stat()
    if st.st_uid != 0 or st.st_mode & 0o022:
        raise ChangeFailed(f"{p} must be owned by root and writable only by root (sudo refuses it otherwise)")
    try:
        lib = ctypes.CDLL(str(p))
        getattr(lib, hostconfig.SUDO_PLUGIN_SYMBOL)
    except (OSError, AttributeError) as e:
        raise ChangeFailed(f"{p} is not a usable sudo audit plugin: {e}") from None


def check_sudo(host: Host) -> Optional[str]:
    """`sudo -V` as root loads every plugin sudo.conf names; None when sudo
    is absent or cannot be run for this root."""
    if not sudo_installed(host) or not host.p(hostconfig.SUDO_PLUGIN_PATH).exists():
        return None
    if host.root != Path("/") and not _can_chroot(host):
        return "cannot chroot: skipped `sudo -V`"
    r = _run(_chroot(host, ["sudo", "-V"]), "sudo -V (sudo loading its plugins)")
    if "step-ssh audit plugin" not in r.stdout:
        raise ChangeFailed(f"sudo does not load the step-ssh audit plugin: {r.stdout.strip()[-300:]}")
    return None


def touched_paths(changes: list[FileChange]) -> list[str]:
    return [c.path for c in changes] + hostconfig.PAM_AUTH_UPDATE_FILES + [REGISTRATION]


# ---- steps ------------------------------------------------------------------------------

def _run(argv: list[str], what: str) -> subprocess.CompletedProcess:
    r = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    if r.returncode != 0:
        raise ChangeFailed(f"{what} failed ({' '.join(argv)}): {(r.stderr or r.stdout).strip()}")
    return r


def pam_auth_update(host: Host, enable: bool) -> None:
    flag = "--enable" if enable else "--remove"
    _run(_chroot(host, ["pam-auth-update", "--package", flag, hostconfig.PAM_PROFILE_NAME]),
         "pam-auth-update")


def check_sshd(host: Host) -> Optional[str]:
    """`sshd -t` on the host's configuration; None when sshd is absent."""
    if not host.p("/usr/sbin/sshd").exists() or (host.root != Path("/") and not _can_chroot(host)):
        return "sshd not installed: skipped `sshd -t`"
    _run(_chroot(host, ["/usr/sbin/sshd", "-t"]), "sshd -t (the sshd configuration check)")
    return None


def identity_ok(host: Host, fingerprint: str) -> bool:
    """An enrolled identity for this CA that is still valid: no token needed."""
    d = host.p(IDENTITY_DIR)
    try:
        ca, cert, key = ((d / n).read_bytes() for n in ("ca.crt", "host.crt", "host.key"))
        if pki.fingerprint(ca) != fingerprint or not pki.key_matches_cert(key, cert):
            return False
        return pki.load_cert(cert).not_valid_after_utc > pki.now()
    except (OSError, ValueError):
        return False


def systemd_running(host: Host) -> bool:
    return host.root == Path("/") and Path("/run/systemd/system").is_dir() and shutil.which("systemctl") is not None


def agent_pid(host: Host) -> Optional[int]:
    try:
        pid = int(host.p(PIDFILE).read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return pid if b"agent" in cmdline and b"step" in cmdline else None


def start_agent_background(host: Host) -> int:
    """Without systemd: start the agent detached, logging to AGENT_LOG."""
    log = host.p(AGENT_LOG)
    log.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    host.p(PIDFILE).parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    with open(log, "ab") as out:
        os.chmod(log, 0o640)
        p = subprocess.Popen([sys.executable, "-m", "step_ssh.cli", "agent", "--config", str(host.p(AGENT_CONFIG))],
                             stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
    host.p(PIDFILE).write_text(f"{p.pid}\n")
    return p.pid


def stop_agent(host: Host) -> Optional[str]:
    if systemd_running(host) and host.p(UNIT_PATH).exists():
        subprocess.run(["systemctl", "disable", "--now", "step-ssh.service"], capture_output=True)
        subprocess.run(["systemctl", "daemon-reload"], capture_output=True)
        return "stopped and disabled step-ssh.service"
    pid = agent_pid(host)
    if pid is None:
        return None
    os.kill(pid, signal.SIGTERM)
    for _ in range(100):
        if not Path(f"/proc/{pid}").exists() or b"Z" in _proc_state(pid):
            break
        time.sleep(0.1)
    else:
        os.kill(pid, signal.SIGKILL)
    host.p(PIDFILE).unlink(missing_ok=True)
    return f"stopped the agent (pid {pid})"


def _proc_state(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1][:3]
    except OSError:
        return b"Z"


def wait_for_cache(host: Host, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if host.p(str(paths.CACHE_PATH)).exists():
            return True
        time.sleep(0.2)
    return False


def _registration(opts: Options) -> Optional[dict]:
    # Register replaces all tags, so only when the operator declared them;
    # otherwise the token's hostname and tags stand.
    if not (opts.tags or opts.is_bastion or opts.bastions):
        return None
    return {"hostname": opts.hostname or "", "tags": dict(sorted(opts.tags.items())),
            "is_bastion": opts.is_bastion, "bastions": sorted(opts.bastions)}


def register(host: Host, opts: Options, want: dict) -> None:
    from step_ssh import __version__
    from step_ssh.ctl import load_host_identity
    from step_ssh.proto import stepssh_pb2 as pb

    client = load_host_identity(host.p(CONFIG_DIR), opts.server, 20.0)
    client.call("Register", pb.RegisterRequest(hostname=want["hostname"], tags=want["tags"],
                                               is_bastion=want["is_bastion"], bastions=want["bastions"],
                                               agent_version=__version__), service="host")


# ---- activate / deactivate -------------------------------------------------------------

def activate(opts: Options) -> Result:
    host = Host(opts.root)
    res = Result(dry_run=opts.dry_run)
    changes = file_changes(opts, host)
    pending = host.pending(changes)
    enrolled = identity_ok(host, opts.fingerprint)
    want_reg = _registration(opts)
    try:
        have_reg = json.loads(host.p(REGISTRATION).read_text())
    except (OSError, ValueError):
        have_reg = None
    pam_profile_new = any(c.path == hostconfig.PAM_PROFILE_PATH for c in pending)

    if not enrolled and not opts.token:
        raise ActivationError("this host is not enrolled yet: give the one-time enrollment token with "
                              "--token or $STEP_SSH_TOKEN (from `step-ssh-server token` or `step-ssh-ctl`)")
    if opts.dry_run:
        res.diff = host.diff(changes)
        res.files = [c.path for c in pending]
        if pam_profile_new:
            res.actions.append("run pam-auth-update --enable step-ssh (rewrites /etc/pam.d/common-account "
                               "and common-session)")
        res.actions += [] if enrolled else [f"enroll with {opts.server}"]
        res.actions += [f"register {want_reg}"] if want_reg and want_reg != have_reg else []
        res.changed = bool(res.files or res.actions)
        return res

    cp = host.checkpoint(touched_paths(changes))
    identity_existed = host.p(IDENTITY_DIR).exists()
    try:
        if pam_profile_new:
            host.record(hostconfig.PAM_AUTH_UPDATE_FILES)
        res.files = host.apply(changes)
        if pam_profile_new:
            pam_auth_update(host, enable=True)
            res.actions.append("pam-auth-update --enable step-ssh")
        if res.files:
            for check in (check_sshd, check_sudo):
                note = check(host)
                if note:
                    res.warnings.append(note)
        if not enrolled:
            from step_ssh.agent.identity import IdentityError, enroll
            try:
                e = enroll(opts.server, opts.token or "", opts.fingerprint, host.p(CONFIG_DIR),
                           hostname=opts.hostname, server_name=opts.server_name)
            except IdentityError as err:
                raise ChangeFailed(f"enrollment failed: {err}" + (f" (check: {err.hint})" if err.hint else ""))
            res.host_id = e.host_id
            res.actions.append(f"enrolled as {e.hostname} ({e.host_id})")
        if want_reg and want_reg != have_reg:
            register(host, opts, want_reg)
            host.p(REGISTRATION).parent.mkdir(parents=True, exist_ok=True)
            host.p(REGISTRATION).write_text(json.dumps(want_reg, sort_keys=True) + "\n")
            res.actions.append("registered hostname/tags/bastion flags")
    except BaseException as e:
        # The checkpoint includes pam-auth-update's outputs and its state
        # under /var/lib/pam, so this also undoes a profile it enabled.
        host.rollback(cp)
        if not identity_existed:
            shutil.rmtree(host.p(IDENTITY_DIR), ignore_errors=True)
        msg = str(e) if isinstance(e, (ChangeFailed, OSError)) else f"{type(e).__name__}: {e}"
        raise ActivationError(f"{msg}\nnothing was changed: every file is as it was before") from e

    if opts.start_agent and host.root == Path("/"):
        res.actions += _ensure_agent(host, bool(res.files), opts, res)
    elif host.root != Path("/"):
        res.warnings.append(f"--root {opts.root}: the agent is not started; it starts at the image's boot")
    res.changed = bool(res.files or res.actions)
    return res


def _ensure_agent(host: Host, restart: bool, opts: Options, res: Result) -> list[str]:
    if systemd_running(host):
        _run(["systemctl", "daemon-reload"], "systemctl daemon-reload")
        enabled = subprocess.run(["systemctl", "is-enabled", "--quiet", "step-ssh.service"]).returncode == 0
        active = subprocess.run(["systemctl", "is-active", "--quiet", "step-ssh.service"]).returncode == 0
        if enabled and active and not restart:
            return []
        _run(["systemctl", "enable", "--now", "step-ssh.service"], "systemctl enable --now step-ssh")
        if restart and active:
            _run(["systemctl", "restart", "step-ssh.service"], "systemctl restart step-ssh")
        subprocess.run(["systemctl", "reload-or-restart", "ssh.service"], capture_output=True)
        return ["systemctl enable --now step-ssh.service"]
    if agent_pid(host) is not None and not restart:
        return []
    if agent_pid(host) is not None:
        stop_agent(host)
    pid = start_agent_background(host)
    res.warnings.append(f"systemd is not running here: started the agent in the background (pid {pid}, "
                        f"log {AGENT_LOG}); it will not survive a reboot")
    if not wait_for_cache(host, opts.wait_seconds):
        res.warnings.append(f"the agent has not published a cache after {opts.wait_seconds:.0f}s: "
                            "run `step-ssh doctor`")
    return [f"started the agent (pid {pid})"]


def deactivate(root: str = "/", purge: bool = False) -> Result:
    host = Host(root)
    res = Result()
    note = stop_agent(host)
    if note:
        res.actions.append(note)
    manifest = host.manifest()
    if hostconfig.PAM_PROFILE_PATH in manifest and host.p(hostconfig.PAM_PROFILE_PATH).exists() \
            and use_pam_auth_update(host):
        pam_auth_update(host, enable=False)   # before the module file goes away
        res.actions.append("pam-auth-update --remove step-ssh")
    res.files = host.restore()
    host.p(REGISTRATION).unlink(missing_ok=True)
    if purge:
        from step_ssh.cache.writer import retire
        retire(host.p(str(paths.CACHE_PATH)))
        for d in (IDENTITY_DIR, STATE_DIR):
            if host.p(d).exists():
                shutil.rmtree(host.p(d))
                res.actions.append(f"removed {d}")
        try:
            host.p(CONFIG_DIR).rmdir()
        except OSError:
            pass
    res.changed = bool(res.files or res.actions)
    return res
