"""`step-ssh enroll`, `step-ssh agent` and `step-ssh status` (docs/agent.md)."""
from __future__ import annotations

import datetime as dt
import logging
import os
import sys
import time
from pathlib import Path
from typing import Optional

import click

from step_ssh.cli.common import emit_json
from step_ssh.timefmt import span

EXIT_DEGRADED = 1     # status: running but not connected, refused a view, or entries dropped
EXIT_NOT_RUNNING = 3  # status: no agent (or no status file)


# ---- enroll ------------------------------------------------------------------------

@click.command()
@click.option("--server", required=True, metavar="HOST:PORT", help="The control plane's address.")
@click.option("--token", required=True, envvar="STEP_SSH_TOKEN",
              help="One-time enrollment token (or $STEP_SSH_TOKEN, which keeps it out of `ps`).")
@click.option("--fingerprint", required=True, metavar="SHA256:...",
              help="Fingerprint of the control plane's CA certificate, as `step-ssh-server init` printed it.")
@click.option("--config-dir", default="/etc/step-ssh", show_default=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="Where identity/ (host.key, host.crt, ca.crt) and agent.yaml go.")
@click.option("--hostname", default=None, help="Name in the certificate request (default: this host's name; "
                                               "the control plane uses the token's hostname).")
@click.option("--server-name", default=None, help="Name to expect in the server's certificate when it "
                                                  "differs from the HOST in --server.")
@click.option("--force", is_flag=True, help="Replace an existing identity.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def enroll(server: str, token: str, fingerprint: str, config_dir: Path, hostname: Optional[str],
           server_name: Optional[str], force: bool, as_json: bool) -> None:
    """Enroll this host with the control plane.

    Reads the CA certificate the server presents and keeps it only if its
    fingerprint is FINGERPRINT (pinning), generates this host's private key
    locally (mode 0600; it never leaves the host), and exchanges the one-time
    TOKEN for a certificate over TLS verified against the pinned CA. Writes
    CONFIG_DIR/identity/{host.key,host.crt,ca.crt} and, if absent,
    CONFIG_DIR/agent.yaml pointing at SERVER.
    """
    from step_ssh.agent.config import HOST_CERT, IDENTITY_SUBDIR
    from step_ssh.agent.identity import IdentityError
    from step_ssh.agent.identity import enroll as do_enroll

    existing = config_dir / IDENTITY_SUBDIR / HOST_CERT
    if existing.exists() and not force:
        raise click.ClickException(f"{existing} exists: this host is already enrolled (use --force to replace "
                                   "its identity; the running agent picks the new one up)")
    try:
        res = do_enroll(server, token, fingerprint, config_dir, hostname=hostname, server_name=server_name)
    except IdentityError as e:
        msg = str(e) + (f"\n  check: {e.hint}" if e.hint else "")
        raise click.ClickException(msg) from None
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    info = {"host_id": res.host_id, "hostname": res.hostname, "tags": res.tags,
            "identity_dir": str(res.identity_dir), "not_after": res.not_after.isoformat(),
            "ca_fingerprint": res.ca_fingerprint,
            "config": str(res.config_written) if res.config_written else None}
    if as_json:
        emit_json(info)
        return
    click.echo(f"enrolled as {res.hostname} (host id {res.host_id})")
    if res.tags:
        click.echo("  tags:        " + ", ".join(f"{k}={v}" for k, v in sorted(res.tags.items())))
    click.echo(f"  identity:    {res.identity_dir} (certificate valid until {res.not_after:%Y-%m-%d %H:%M} UTC)")
    if res.config_written:
        click.echo(f"  config:      {res.config_written}")
    click.echo("next: start the agent (`systemctl enable --now step-ssh-agent` or `step-ssh agent`)")


# ---- agent -------------------------------------------------------------------------

class _JournalFormatter(logging.Formatter):
    """sd-daemon(3) priority prefixes when stderr goes to the journal."""

    LEVELS = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}

    def format(self, record: logging.LogRecord) -> str:
        return f"<{self.LEVELS.get(record.levelno, 6)}>" + super().format(record)


def _setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(_JournalFormatter("%(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("grpc").setLevel(logging.WARNING)


@click.command()
@click.option("--config", "config_path", default="/etc/step-ssh/agent.yaml", show_default=True,
              type=click.Path(dir_okay=False, path_type=Path), help="Agent configuration (YAML).")
@click.option("--log-level", default=None, type=click.Choice(["debug", "info", "warning", "error"]),
              help="Override the configuration's log_level.")
@click.option("--accept-shrink", is_flag=True,
              help="Accept the next view the agent would refuse as an implausible shrink (once).")
@click.option("--check", is_flag=True, help="Validate the configuration and identity, then exit.")
def agent(config_path: Path, log_level: Optional[str], accept_shrink: bool, check: bool) -> None:
    """Run the agent in the foreground (systemd Type=notify).

    Keeps this host's cache true to the control plane: watches for changes
    over mTLS and publishes each one atomically. READY=1 once a cache is
    published or confirmed; SIGTERM stops it cleanly. Logs go to stderr.
    """
    from step_ssh.agent.config import ConfigError, load_config
    try:
        cfg = load_config(config_path)
    except ConfigError as e:
        raise click.ClickException(str(e)) from None
    _setup_logging(log_level or cfg.log_level)
    if check:
        from step_ssh.agent import tlsdiag
        from step_ssh.agent.identity import Identity, IdentityError
        try:
            mat = Identity(cfg.identity).load()
        except IdentityError as e:
            raise click.ClickException(f"{e}\n  check: {e.hint}") from None
        problems = tlsdiag.check_local(mat.cert_pem, mat.key_pem, mat.ca_pem, kind=mat.kind)
        for p in problems:
            click.echo(f"problem: {p.text()}", err=True)
        if problems:
            sys.exit(1)
        click.echo(f"{config_path}: ok; identity {mat.cert.subject.rfc4514_string()} valid until "
                   f"{mat.not_after:%Y-%m-%d %H:%M} UTC")
        return
    from step_ssh.agent.sync import run_agent
    sys.exit(run_agent(cfg, accept_shrink=accept_shrink))


# ---- status ------------------------------------------------------------------------

def _ago(ts: Optional[float], now: float) -> str:
    if ts is None:
        return "never"
    s = int(now - ts)
    if s < 0:
        return f"in {span(-s)}"
    return f"{span(s)} ago"


def _when(ts: Optional[float]) -> str:
    if ts is None:
        return "-"
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _status_path(config_path: Path, status_file: Optional[Path]) -> tuple[Path, Optional[Path]]:
    """(status file, cache path) from --status-file, else the configuration."""
    from step_ssh.agent.config import DEFAULT_STATUS_FILE, ConfigError, load_config
    if status_file is not None:
        return status_file, None
    try:
        cfg = load_config(config_path)
        return cfg.status_file, cfg.cache_path
    except ConfigError:
        return DEFAULT_STATUS_FILE, None


@click.command()
@click.option("--config", "config_path", default="/etc/step-ssh/agent.yaml", show_default=True,
              type=click.Path(dir_okay=False, path_type=Path), help="Agent configuration (to find the status file).")
@click.option("--status-file", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="Read this status file instead of the configured one.")
@click.option("--json", "as_json", is_flag=True, help="Print the agent's status as JSON.")
@click.option("--show-cert", is_flag=True, help="Also show the host certificate in full (PEM included).")
def status(config_path: Path, status_file: Optional[Path], as_json: bool, show_cert: bool) -> None:
    """Show the agent's state: connection, revision, cache age, certificate.

    Reads the file the agent keeps up to date (no root, no IPC). Exit status:
    0 connected and healthy, 1 degraded (disconnected, a refused view, or
    entries not published), 3 no agent running.
    """
    from step_ssh.agent.status import pid_alive, read_status
    from step_ssh.cli.cache_cmds import describe

    path, cfg_cache = _status_path(config_path, status_file)
    try:
        st = read_status(path)
    except (OSError, ValueError) as e:
        raise click.ClickException(f"cannot read {path}: {e}") from None
    now = time.time()
    if st is None:
        if as_json:
            emit_json({"running": False, "status_file": str(path)})
        else:
            click.echo(f"agent: not running (no status file at {path})")
        sys.exit(EXIT_NOT_RUNNING)
    running = st.get("state") != "stopped" and pid_alive(st.get("pid"))
    cache_path = Path((st.get("config") or {}).get("cache_path") or cfg_cache or "/var/lib/step-ssh/cache")
    cache = describe(cache_path, int(now))
    st["running"] = running
    st["status_file"] = str(path)
    st["cache_file"] = cache
    cert = st.get("certificate")
    if cert and not show_cert:
        cert.pop("pem", None)
    healthy = running and st.get("connected") and not st.get("refused") and not (st.get("dropped") or {}).get("count")
    code = 0 if healthy else (EXIT_NOT_RUNNING if not running else EXIT_DEGRADED)
    if as_json:
        emit_json(st)
        sys.exit(code)

    out = click.echo
    if running:
        conn = (f"connected to {st['server']} since {_when(st.get('connected_since'))}"
                if st.get("connected") else f"DISCONNECTED from {st['server']}")
        out(f"agent:        running (pid {st.get('pid')}), {conn}")
    else:
        out(f"agent:        NOT RUNNING (last status {_ago(st.get('updated_at'), now)}, state {st.get('state')})")
    if not st.get("connected") and st.get("next_retry_at") and running:
        out(f"              next attempt {_ago(st['next_retry_at'], now)}")
    err = st.get("last_error")
    if err:
        out(f"last error:   {err['message']}")
        if err.get("hint"):
            out(f"              check: {err['hint']}")
    out(f"revision:     {st.get('revision')}  (last sync {_ago(st.get('last_sync_at'), now)})")
    if cache.get("valid"):
        stale = " STALE: managed logins are denied" if cache.get("stale") else ""
        out(f"cache:        {cache_path}: {cache['users']} users, {cache['groups']} groups, revision "
            f"{cache['revision']}, confirmed {_ago(cache['confirmed_at'], now)} "
            f"(age {span(max(0, cache['age_seconds']))}, limit {span(cache['max_stale_seconds'])}){stale}")
    else:
        out(f"cache:        {cache_path}: {cache.get('error') or cache.get('checksum') or 'invalid'}")
    ref = st.get("refused")
    if ref:
        out(f"REFUSED:      {ref['reason']}")
    dropped = st.get("dropped") or {}
    if dropped.get("count"):
        out(f"not published ({dropped['count']}, conflicts with local accounts or invalid):")
        for p in dropped.get("entries", []):
            out(f"  - {p}")
        if dropped["count"] > len(dropped.get("entries", [])):
            out(f"  ... and {dropped['count'] - len(dropped['entries'])} more")
    if cert:
        out(f"certificate:  {cert['subject']} ({cert['identity']} identity)")
        out(f"  SANs:       {', '.join(cert.get('sans') or []) or '-'}")
        left = cert.get("not_after_ts", 0) - now
        out(f"  valid:      {cert['not_before']} .. {cert['not_after']}"
            + (f" (EXPIRED {span(int(-left))} ago)" if left < 0 else f" ({span(int(left))} left)"))
        if cert.get("renew_at"):
            out(f"  renews at:  {cert['renew_at']}")
        if show_cert:
            out(f"  issuer:     {cert['issuer']}")
            out(f"  serial:     {cert['serial']}")
            out(f"  host id:    {cert.get('host_id')}")
            out(f"  sha256:     {cert['fingerprint']}")
            out(f"  CA sha256:  {cert.get('ca_fingerprint')}")
            out(f"  file:       {cert['path']}")
            out(cert.get("pem", "").rstrip())
    else:
        out("certificate:  none loaded")
    au = st.get("audit") or {}
    if au.get("enabled"):
        ac = au.get("counters") or {}
        out(f"audit:        {au.get('backlog_bytes', 0)} bytes waiting in {au.get('spool_dir')} "
            f"({au.get('backlog_files', 0)} file(s)); {ac.get('shipped', 0)} events shipped, last "
            f"{_ago(au.get('last_shipped_at'), now)}")
        if au.get("dropped"):
            out(f"  DROPPED:    {au['dropped']} event(s) not recorded (spool full), the last "
                f"{_ago(au.get('last_drop_at'), now)}")
        if ac.get("skipped"):
            out(f"  skipped:    {ac['skipped']} torn or corrupt record(s) (see the agent's log)")
        if au.get("last_error"):
            out(f"  not shipping: {au['last_error']['message']}"
                + (f"; next attempt {_ago(au['next_retry_at'], now)}" if au.get("next_retry_at") else ""))
    elif au:
        out("audit:        shipping disabled (audit.enabled: false)")
    c = st.get("counters") or {}
    out("counters:     " + ", ".join(f"{k} {v}" for k, v in c.items() if v))
    sys.exit(code)
