"""`step-ssh doctor`: every check an operator needs, each with what to do next.

Checks read files and run the same system tools an operator would (`sshd -t`,
`visudo -c`, a real NSS lookup through glibc); only the control-plane check
uses the network. Each returns PASS, WARN or FAIL with a description.
"""
from __future__ import annotations

import pwd
import shutil
import socket
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

from step_ssh import hostconfig, paths, pki
from step_ssh.limits import JUMP_GROUP

PASS, WARN, FAIL = "PASS", "WARN", "FAIL"
SPOOL_LIMIT = 64 << 20  # pam_stepssh's default spool_max


@dataclass
class Check:
    name: str
    status: str
    description: str

    def as_dict(self) -> dict:
        return asdict(self)


class Context:
    """What the checks share: the config, identity and status, loaded once."""

    def __init__(self, config_path: Path, root: Path = Path("/")):
        self.config_path = config_path
        self.root = root
        self.cfg = None
        self.cfg_error: Optional[str] = None
        self.material = None
        self.material_error: Optional[str] = None
        self.status: Optional[dict] = None
        self.ident = None

    def p(self, path: str | Path) -> Path:
        return self.root / str(path).lstrip("/")


def _load(ctx: Context) -> None:
    from step_ssh.agent.config import ConfigError, load_config
    try:
        ctx.cfg = load_config(ctx.config_path)
    except ConfigError as e:
        ctx.cfg_error = str(e)
        return
    from step_ssh.agent.status import read_status
    try:
        ctx.status = read_status(ctx.cfg.status_file)
    except (OSError, ValueError):
        ctx.status = None
    from step_ssh.agent.identity import Identity, IdentityError
    ctx.ident = Identity(ctx.cfg.identity)
    try:
        ctx.material = ctx.ident.load()
    except IdentityError as e:
        ctx.material_error = str(e) + (f" (check: {e.hint})" if getattr(e, "hint", None) else "")


# ---- the checks -----------------------------------------------------------------------

def check_config(ctx: Context) -> Check:
    if ctx.cfg_error:
        return Check("configuration", FAIL, ctx.cfg_error)
    return Check("configuration", PASS, f"{ctx.config_path} is valid (server {ctx.cfg.server})")


def check_agent(ctx: Context) -> Check:
    from step_ssh.agent.status import pid_alive
    if ctx.cfg is None:
        return Check("agent", FAIL, "no usable configuration, so no agent can run")
    st = ctx.status
    if not st:
        return Check("agent", FAIL, f"no status file at {ctx.cfg.status_file}: the agent is not running. "
                                    "Start it: `systemctl enable --now step-ssh` (or `step-ssh agent`).")
    if not pid_alive(st.get("pid")):
        return Check("agent", FAIL, f"the agent (pid {st.get('pid')}) is not running; its last state was "
                                    f"{st.get('state')!r}. Start it and read its log (`journalctl -u step-ssh`).")
    age = time.time() - float(st.get("updated_at") or 0)
    if not st.get("connected"):
        err = (st.get("last_error") or {}).get("message") if isinstance(st.get("last_error"), dict) else st.get("last_error")
        return Check("agent", WARN, f"running (pid {st['pid']}) but not connected to {st.get('server')}"
                                    + (f": {err}" if err else "") + "; logins keep working from the cache")
    return Check("agent", PASS, f"running (pid {st['pid']}), connected, revision {st.get('revision')}, "
                                f"status updated {age:.0f}s ago")


def check_control_plane(ctx: Context) -> Check:
    if ctx.cfg is None:
        return Check("control plane", FAIL, "no usable configuration")
    from step_ssh import rpc
    from step_ssh.agent import tlsdiag
    host, port = rpc.split_address(ctx.cfg.server)
    try:
        socket.create_connection((host, port), timeout=5).close()
    except OSError as e:
        return Check("control plane", FAIL, f"TCP to {ctx.cfg.server} failed ({e.strerror or e}). Check that "
                                            "step-ssh-server runs there, DNS, routes and firewalls.")
    if ctx.material is None:
        return Check("control plane", WARN, f"TCP to {ctx.cfg.server} works; TLS not tried: no usable identity")
    d = tlsdiag.probe(host, port, ctx.cfg.server_name, ctx.material, timeout=5.0)
    if d is not None:
        return Check("control plane", FAIL, d.text())
    try:
        import grpc

        from step_ssh.proto import stepssh_pb2 as pb
        from step_ssh.proto import stepssh_pb2_grpc as pbg
        ch = rpc.channel(ctx.cfg.server, ctx.material.credentials(), ctx.cfg.server_name)
        try:
            call = pbg.HostServiceStub(ch).Watch(pb.WatchRequest(since_revision=0), timeout=10)
            first = next(iter(call))
            call.cancel()
        finally:
            ch.close()
    except grpc.RpcError as e:
        return Check("control plane", FAIL, f"gRPC: {rpc.explain(e, ctx.cfg.server).text()}")
    kind = first.WhichOneof("event")
    return Check("control plane", PASS, f"{ctx.cfg.server}: TCP, mTLS and gRPC work (Watch answered with a {kind})")


def check_identity(ctx: Context, renew: bool = False) -> Check:
    if ctx.cfg is None:
        return Check("identity certificate", FAIL, "no usable configuration")
    if ctx.material is None:
        return Check("identity certificate", FAIL, f"{ctx.material_error}. Re-enroll: `step-ssh enroll` or "
                                                   "`step-ssh activate` with a new token.")
    from step_ssh.agent import tlsdiag
    m = ctx.material
    probs = tlsdiag.check_local(m.cert_pem, m.key_pem, m.ca_pem, kind=m.kind)
    if probs:
        return Check("identity certificate", FAIL, "; ".join(p.text() for p in probs))
    note = ""
    if renew and m.kind != "builtin":
        note = "not renewed (a files identity is renewed by the tool that writes it); "
    elif renew:
        import asyncio

        from step_ssh.agent.identity import IdentityError
        try:
            m = ctx.material = asyncio.run(ctx.ident.renew(ctx.cfg.server, ctx.cfg.server_name))
            note = f"renewed now (serial {pki.serial_hex(m.cert)}); "
        except IdentityError as e:
            return Check("identity certificate", FAIL, f"renewal failed: {e}" + (f" (check: {e.hint})" if e.hint else ""))
        except Exception as e:  # noqa: BLE001 - gRPC and network errors, in words
            return Check("identity certificate", FAIL, f"renewal failed: {e}")
    left = m.not_after - pki.now()
    hours = left.total_seconds() / 3600
    status = WARN if hours < 1 else PASS
    return Check("identity certificate", status,
                 f"{note}{m.cert.subject.rfc4514_string()}, valid for {hours:.1f} h more, key matches, "
                 "issued by the pinned CA" + ("; renewal is overdue: is the agent connected?" if status == WARN else ""))


def check_cache(ctx: Context) -> Check:
    from step_ssh.cli.cache_cmds import describe
    path = ctx.cfg.cache_path if ctx.cfg else paths.CACHE_PATH
    info = describe(ctx.p(path))
    if not info.get("valid"):
        return Check("cache", FAIL, f"{path}: {info.get('error')}. NSS answers UNAVAIL and PAM denies managed "
                                    "users until the agent publishes a valid cache: check the agent.")
    desc = (f"{path}: revision {info['revision']}, {info['users']} users, confirmed "
            f"{info['age_seconds']}s ago")
    if info["stale"]:
        return Check("cache", FAIL, desc + f" — older than the {info['max_stale_seconds']}s limit: managed "
                                           "logins are denied until the agent reconnects to the control plane")
    if info["max_stale_seconds"] and info["age_seconds"] > info["max_stale_seconds"] / 2:
        return Check("cache", WARN, desc + " — over half the staleness limit: is the agent connected?")
    return Check("cache", PASS, desc)


def check_nsswitch(ctx: Context) -> Check:
    try:
        text = ctx.p("/etc/nsswitch.conf").read_text()
    except OSError as e:
        return Check("nsswitch", FAIL, f"/etc/nsswitch.conf unreadable: {e.strerror}")
    if hostconfig.nsswitch_with(text) != text.rstrip("\n") + "\n":
        return Check("nsswitch", FAIL, "passwd/group do not list `stepssh` after `files`: managed users do not "
                                       "resolve. Run `step-ssh activate` again.")
    if not ctx.p(f"{paths.lib_dir()}/libnss_stepssh.so.2").exists():
        return Check("nsswitch", FAIL, f"{paths.lib_dir()}/libnss_stepssh.so.2 is missing: run `step-ssh activate`")
    return Check("nsswitch", PASS, "passwd and group: files stepssh; module installed")


def check_pam(ctx: Context) -> Check:
    if not ctx.p(f"{paths.security_dir()}/pam_stepssh.so").exists():
        return Check("PAM", FAIL, f"{paths.security_dir()}/pam_stepssh.so is missing: run `step-ssh activate`")
    wired = []
    for f in ("/etc/pam.d/common-account", "/etc/pam.d/sshd", "/etc/pam.d/sudo"):
        try:
            if "pam_stepssh.so" in ctx.p(f).read_text():
                wired.append(f)
        except OSError:
            pass
    if not any(w.endswith(("common-account", "sshd")) for w in wired):
        return Check("PAM", FAIL, "pam_stepssh.so is not in sshd's account stack: access is not enforced and "
                                  "managed users are denied by pam_unix. Run `step-ssh activate` again.")
    return Check("PAM", PASS, "pam_stepssh.so in " + ", ".join(wired))


def _tool(ctx: Context, argv: list[str]) -> subprocess.CompletedProcess:
    argv = argv if ctx.root == Path("/") else ["chroot", str(ctx.root)] + argv
    return subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)


def check_sshd(ctx: Context) -> Check:
    try:
        dropin = ctx.p(hostconfig.SSHD_DROPIN_PATH).read_text()
    except OSError:
        return Check("sshd", FAIL, f"{hostconfig.SSHD_DROPIN_PATH} is missing: certificates are not trusted. "
                                   "Run `step-ssh activate`.")
    if "AuthorizedPrincipalsCommand" not in dropin or "TrustedUserCAKeys" not in dropin:
        return Check("sshd", FAIL, f"{hostconfig.SSHD_DROPIN_PATH} was edited: run `step-ssh activate` to restore it")
    if not ctx.p("/usr/sbin/sshd").exists():
        return Check("sshd", WARN, "drop-in present; sshd is not installed")
    r = _tool(ctx, ["/usr/sbin/sshd", "-t"])
    if r.returncode != 0:
        return Check("sshd", FAIL, f"`sshd -t` fails: {(r.stderr or r.stdout).strip()}")
    if f"Match Group {JUMP_GROUP}" not in dropin:
        return Check("sshd", WARN, f"{hostconfig.SSHD_DROPIN_PATH} has no `Match Group {JUMP_GROUP}` block (written "
                                   "by an older step-ssh?): on a bastion, jump-only users could open remote "
                                   "forwards. Run `step-ssh activate` again to update it.")
    keys = ctx.p(hostconfig.USER_CA_KEYS_PATH)
    if not keys.exists() or not keys.read_text().strip():
        return Check("sshd", WARN, f"`sshd -t` passes but {hostconfig.USER_CA_KEYS_PATH} has no CA keys yet: "
                                   "no certificate login can work until the agent syncs")
    return Check("sshd", PASS, "drop-in present, `sshd -t` passes, trusted user CA keys present")


def check_sudoers(ctx: Context) -> Check:
    if not ctx.p(hostconfig.SUDOERS_PATH).exists():
        return Check("sudoers", FAIL, f"{hostconfig.SUDOERS_PATH} is missing: managed sudo users cannot sudo. "
                                      "Run `step-ssh activate`.")
    if not shutil.which("visudo") and not ctx.p("/usr/sbin/visudo").exists():
        return Check("sudoers", WARN, "drop-in present; visudo not installed")
    r = _tool(ctx, ["visudo", "-c", "-q"])
    if r.returncode != 0:
        return Check("sudoers", FAIL, f"`visudo -c` fails: {(r.stderr or r.stdout).strip()}; sudo refuses to "
                                      "run while sudoers is invalid — fix the file it names")
    return Check("sudoers", PASS, "drop-in present, `visudo -c` passes")


def check_nss_lookup(ctx: Context) -> Check:
    from step_ssh.native import NssClient, Unavailable
    path = ctx.cfg.cache_path if ctx.cfg else paths.CACHE_PATH
    try:
        users = NssClient(ctx.p(path)).passwd_entries()
    except Unavailable as e:
        return Check("managed user lookup", FAIL, f"{e}: see the cache check")
    if not users:
        return Check("managed user lookup", WARN, "the cache lists no users for this host (no grant matches "
                                                  "its tags?): `step-ssh-ctl host show` on the control plane")
    u = users[0]
    if ctx.root != Path("/"):
        return Check("managed user lookup", WARN, f"--root: {u.name} is in the cache; glibc lookup not tried")
    try:
        pw = pwd.getpwnam(u.name)
    except KeyError:
        return Check("managed user lookup", FAIL, f"{u.name} is in the cache but glibc does not resolve it: "
                                                  "check the nsswitch check")
    if pw.pw_uid != u.uid:
        return Check("managed user lookup", WARN, f"{u.name} resolves to uid {pw.pw_uid}, not the cache's "
                                                  f"{u.uid}: a local account of that name wins")
    return Check("managed user lookup", PASS, f"getpwnam({u.name}) through glibc: uid {pw.pw_uid}, home {pw.pw_dir}")


def check_audit_spool(ctx: Context) -> Check:
    from step_ssh import audit
    spool = audit.Spool(ctx.p(ctx.cfg.audit.spool_dir if ctx.cfg else audit.DEFAULT_SPOOL_DIR))
    backlog = spool.backlog()
    dropped, last_drop = spool.dropped()
    n = spool.count_lines() if backlog.bytes else 0
    desc = (f"{n} event(s), {backlog.bytes} bytes waiting to be shipped in {backlog.files} file(s)"
            if backlog.bytes else "empty (no events waiting)")
    desc += f"; {dropped} event(s) dropped so far" + (f", the last at {_utc(last_drop)}" if last_drop else "") \
        if dropped else "; none dropped"
    if backlog.events_bytes >= SPOOL_LIMIT:
        return Check("audit spool", FAIL, desc + " — full: new events are being dropped (see the system log). "
                                                 "The agent is not shipping: check the agent and control plane")
    if dropped and last_drop and time.time() - last_drop < 86400:
        return Check("audit spool", FAIL, desc + " — events were dropped in the last 24 h because the spool was "
                                                 "full: check that the agent ships (`step-ssh status`); "
                                                 f"remove {spool.dir / audit.DROPPED} once understood")
    st = (ctx.status or {}).get("audit") or {}
    err = (st.get("last_error") or {}).get("message") if isinstance(st.get("last_error"), dict) else None
    if err and backlog.bytes:
        return Check("audit spool", WARN, desc + f" — the agent cannot ship: {err}")
    if backlog.events_bytes > SPOOL_LIMIT // 2:
        return Check("audit spool", WARN, desc + " — over half full: is the agent shipping?")
    if dropped:
        return Check("audit spool", WARN, desc + f" (more than 24 h ago; remove {spool.dir / audit.DROPPED} "
                                                 "once understood)")
    return Check("audit spool", PASS, desc)


def _utc(ts: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(ts))


def check_sudo_audit(ctx: Context) -> Check:
    name = "sudo audit"
    if not ctx.p("/usr/bin/sudo").exists():
        return Check(name, PASS, "sudo is not installed: nothing to audit")
    conf = ctx.p(hostconfig.SUDO_CONF_PATH)
    try:
        text = conf.read_text()
    except FileNotFoundError:
        text = ""
    plugin = hostconfig.sudo_conf_plugin_path(text)
    if plugin is None and not paths.SUDO_AUDIT_PLUGIN.exists():
        return Check(name, WARN, "the sudo audit plugin was not built (no <sudo_plugin.h> when step-ssh was "
                                 "installed): sudo commands are not audited. Install sudo's headers and reinstall.")
    if plugin is None:
        return Check(name, FAIL, f"{hostconfig.SUDO_CONF_PATH} has no `Plugin {hostconfig.SUDO_PLUGIN_SYMBOL}` "
                                 "line: sudo commands are not audited. Run `step-ssh activate`.")
    try:
        st = ctx.p(plugin).stat()
    except FileNotFoundError:
        return Check(name, FAIL, f"{hostconfig.SUDO_CONF_PATH} loads {plugin}, which is missing: sudo refuses "
                                 "to run at all. Run `step-ssh activate` (or `deactivate`).")
    if st.st_uid != 0 or st.st_mode & 0o022:
        return Check(name, FAIL, f"{plugin} must be owned by root and writable only by root, or sudo refuses "
                                 "to load it (and to run)")
    if ctx.root != Path("/"):
        return Check(name, PASS, f"{plugin} configured in {hostconfig.SUDO_CONF_PATH}")
    r = subprocess.run(["sudo", "-V"], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if "step-ssh audit plugin" not in r.stdout:
        return Check(name, FAIL, f"`sudo -V` does not list the step-ssh audit plugin: "
                                 f"{(r.stderr or r.stdout).strip()[-300:]}")
    return Check(name, PASS, f"sudo loads {plugin}: accepted and rejected commands go to the audit spool")


CHECKS: list[Callable[[Context], Check]] = [
    check_config, check_agent, check_control_plane, check_identity, check_cache, check_nsswitch, check_pam,
    check_sshd, check_sudoers, check_nss_lookup, check_audit_spool, check_sudo_audit,
]


def run_checks(config_path: Path, root: Path = Path("/"), renew: bool = False) -> list[Check]:
    ctx = Context(config_path, root)
    _load(ctx)
    out = []
    for fn in CHECKS:
        try:
            out.append(check_identity(ctx, renew) if fn is check_identity else fn(ctx))
        except Exception as e:  # noqa: BLE001 - a broken check must not hide the others
            out.append(Check(fn.__name__.removeprefix("check_").replace("_", " "), FAIL,
                             f"the check itself failed: {type(e).__name__}: {e}"))
    return out


def table(checks: list[Check]) -> str:
    w = max(len(c.name) for c in checks)
    lines = [f"{'Check':<{w}}  Status  Description", f"{'-' * w}  ------  {'-' * 11}"]
    lines += [f"{c.name:<{w}}  {c.status:<6}  {c.description}" for c in checks]
    return "\n".join(lines)
