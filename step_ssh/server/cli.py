"""`step-ssh-server`: init | run | token | profile | profiles | revoke-profile (docs/control-plane.md)."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Optional

import click
import yaml
from cryptography import x509

from step_ssh import __version__, pki
from step_ssh.fsutil import atomic_write
from step_ssh.server import log, sshca
from step_ssh.server.config import DEFAULT_LISTEN, ServerDir
from step_ssh.server.rules import RuleError, parse_duration, parse_tags

DEFAULT_SANS = ["localhost", "127.0.0.1", "::1"]


def _fail(msg: str, code: int = 1):
    click.echo(f"error: {msg}", err=True)
    sys.exit(code)


def _load_dir(dir_: Path):
    """(ServerDir, ServerConfig) of an initialized server directory, or exit 1 saying what is wrong."""
    sd = ServerDir(dir_)
    try:
        sd.check()
        return sd, sd.load_config()
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e))


def split_hostport(addr: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise click.BadParameter(f"{addr!r} is not HOST:PORT (e.g. {DEFAULT_LISTEN}, [::1]:8443, 0.0.0.0:8443)")
    return host.strip("[]"), int(port)


def profile_address(listen: str, sans: list[str]) -> str:
    host, port = split_hostport(listen)
    if host in ("0.0.0.0", "::", ""):
        host = next((s for s in sans if s not in DEFAULT_SANS), "localhost")
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def write_admin_profile(sd: ServerDir, out: Path, name: str, server: str, days: int = 365) -> None:
    import datetime as dt
    ca, ca_key = sd.ca_cert.read_bytes(), sd.ca_key.read_bytes()
    key = pki.new_private_key()
    cert = pki.issue(ca, ca_key, pki.load_key(key).public_key(), f"admin {name}", [pki.admin_uri(name)],
                     lifetime=dt.timedelta(days=days))
    from step_ssh.server.config import ServerConfig
    from step_ssh.server.store import Store
    st = Store(sd.db, ServerConfig())
    try:
        st.record_cert(cert, "admin", name)
    finally:
        st.close()
    doc = {"server": server, "ca_fingerprint": pki.fingerprint(ca), "ca": ca.decode(), "cert": cert.decode(),
           "key": key.decode()}
    class _Dumper(yaml.SafeDumper):
        pass

    _Dumper.add_representer(str, lambda d, v: d.represent_scalar(
        "tag:yaml.org,2002:str", v, style="|" if "\n" in v else None))
    text = ("# step-ssh admin profile: it holds a private key, keep it secret (mode 0600).\n"
            "# Use with: step-ssh-ctl --profile THIS_FILE ... (or STEP_SSH_PROFILE=THIS_FILE)\n"
            + yaml.dump(doc, Dumper=_Dumper, sort_keys=False, width=1000))
    atomic_write(out, text, mode=0o600)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="step-ssh-server")
def main() -> None:
    """The step-ssh control plane: users, groups, grants and hosts, served
    over gRPC with mutual TLS."""


@main.command()
@click.option("--dir", "dir_", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Server directory to create (CA, certificates, database, admin profile).")
@click.option("--san", multiple=True, help="Extra DNS name or IP for the server certificate (repeatable).")
@click.option("--ca-cert", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Use this existing CA certificate (PEM) instead of creating one.")
@click.option("--ca-key", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The existing CA's private key (PEM, unencrypted).")
@click.option("--listen", default=DEFAULT_LISTEN, show_default=True, help="Address `run` listens on.")
@click.option("--admin", "admin_name", default="admin", show_default=True, help="Name in the admin certificate.")
@click.option("--scim-listen", default=None, metavar="HOST:PORT",
              help="Address `run` serves SCIM 2.0 on (written to server.yaml; default: no SCIM endpoint).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def init(dir_: Path, san, ca_cert, ca_key, listen, admin_name, scim_listen, as_json) -> None:
    """Create a server directory and print the CA fingerprint hosts pin."""
    sd = ServerDir(dir_)
    if sd.db.exists() or sd.ca_key.exists():
        _fail(f"{dir_} is already initialized (found {sd.db.name if sd.db.exists() else sd.ca_key.name}); "
              "use another directory or remove it")
    if bool(ca_cert) != bool(ca_key):
        _fail("give both --ca-cert and --ca-key, or neither (to create a new CA)")
    split_hostport(listen)
    if scim_listen:
        split_hostport(scim_listen)
    try:
        for s in san:
            if not s or any(c.isspace() for c in s):
                raise RuleError(f"invalid --san {s!r}")
    except RuleError as e:
        _fail(str(e))
    if ca_cert:
        ca, key = ca_cert.read_bytes(), ca_key.read_bytes()
        try:
            cert = pki.load_cert(ca)
            bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        except (ValueError, x509.ExtensionNotFound):
            _fail(f"{ca_cert} is not a PEM CA certificate (basicConstraints CA:TRUE is required)")
        if not bc.ca:
            _fail(f"{ca_cert} is not a CA certificate (basicConstraints CA:FALSE)")
        try:
            if not pki.key_matches_cert(key, ca):
                _fail(f"{ca_key} does not match {ca_cert} (the key belongs to another certificate)")
        except (ValueError, TypeError) as e:
            _fail(f"{ca_key} is not an unencrypted PEM private key: {e}")
    else:
        ca, key = pki.create_ca()
    dir_.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(dir_, 0o700)
    atomic_write(sd.ca_cert, ca, mode=0o644)
    atomic_write(sd.ca_key, key, mode=0o600)
    sans = list(dict.fromkeys(DEFAULT_SANS + list(san)))
    skey = pki.new_private_key()
    scert = pki.issue(ca, key, pki.load_key(skey).public_key(), sans[0] if not san else san[0], sans,
                      client=False, server=True, lifetime=pki.SERVER_CERT_LIFETIME)
    atomic_write(sd.server_key, skey, mode=0o600)
    atomic_write(sd.server_cert, scert + ca, mode=0o644)
    ssh_pub = sshca.generate_ca(sd.ssh_ca_key, comment="step-ssh control plane user CA")
    atomic_write(sd.config, yaml.safe_dump({"listen": listen, **({"scim_listen": scim_listen} if scim_listen else {})},
                                           sort_keys=False)
                 + "# Other settings and their defaults: see docs/control-plane.md\n", mode=0o644)
    from step_ssh.server.config import ServerConfig
    from step_ssh.server.store import Store
    st = Store(sd.db, ServerConfig())
    try:
        st.record_cert(scert, "server", ",".join(sans))
        st.add_user_ca(sshca.fingerprint(ssh_pub), sshca.normalize(ssh_pub), "step-ssh control plane user CA",
                       builtin=True, actor="init")
    finally:
        st.close()
    os.chmod(sd.db, 0o600)
    server = profile_address(listen, sans)
    write_admin_profile(sd, sd.admin_profile, admin_name, server)
    fp = pki.fingerprint(ca)
    if as_json:
        click.echo(json.dumps({"dir": str(dir_), "ca_fingerprint": fp, "admin_profile": str(sd.admin_profile),
                               "server": server, "ssh_user_ca": sshca.normalize(ssh_pub)}, indent=2))
        return
    click.echo(f"Initialized {dir_}")
    click.echo(f"  admin profile: {sd.admin_profile} (secret; copy to ~/.config/step-ssh/profile.yaml)")
    click.echo(f"  SSH user CA:   {sd.ssh_ca_pub}")
    click.echo(f"CA fingerprint (hosts pin this): {fp}")


@main.command()
@click.option("--dir", "dir_", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--listen", default=None, help=f"HOST:PORT (default: server.yaml, else {DEFAULT_LISTEN}); port 0 picks one.")
@click.option("--heartbeat", type=float, default=None, help="Seconds between heartbeats on Watch streams (default 15).")
@click.option("--scim-listen", default=None, metavar="HOST:PORT",
              help="Also serve SCIM 2.0 over HTTPS here (default: scim_listen in server.yaml, else off; "
                   "port 0 picks one). See docs/scim.md.")
@click.option("--log-level", default="info", show_default=True, type=click.Choice(["debug", "info", "warning", "error"]))
def run(dir_: Path, listen, heartbeat, scim_listen, log_level) -> None:
    """Serve gRPC over mutual TLS (and SCIM over HTTPS if configured) until
    SIGTERM/SIGINT (JSON logs on stderr)."""
    log.setup(log_level)
    sd, cfg = _load_dir(dir_)
    if heartbeat is not None:
        if heartbeat <= 0:
            _fail("--heartbeat must be positive")
        cfg.heartbeat_seconds = heartbeat
    listen = listen or cfg.listen
    split_hostport(listen)
    scim_listen = scim_listen or cfg.scim_listen
    if scim_listen:
        split_hostport(scim_listen)
    finish = log.capture_native_stderr()
    try:
        rc = asyncio.run(_serve(sd, cfg, listen, scim_listen))
    finally:
        finish()
    sys.exit(rc)


async def _serve(sd: ServerDir, cfg, listen: str, scim_listen: str | None = None) -> int:
    from step_ssh.server.service import App
    lg = log.get("step_ssh.server")
    try:
        app = App(sd, cfg)
    except Exception as e:  # unreadable files, a database from a newer version, ...
        lg.error("cannot open the server directory", extra={"dir": str(sd.root), "error": str(e)})
        return 1
    try:
        port = await app.start(listen)
    except (OSError, RuntimeError) as e:
        lg.error("cannot start", extra={"listen": listen, "error": str(e)})
        app.db.close()
        return 1
    scim = {}
    if scim_listen:
        try:
            scim_port = await app.start_scim(scim_listen)
        except (OSError, RuntimeError) as e:
            lg.error("cannot start the SCIM endpoint", extra={"scim_listen": scim_listen, "error": str(e)})
            await app.stop(grace=1.0)
            return 1
        shost, _ = split_hostport(scim_listen)
        scim = {"scim": f"https://{shost if ':' not in shost else f'[{shost}]'}:{scim_port}/scim/v2",
                "scim_port": scim_port}
    host, _ = split_hostport(listen)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    lg.info("listening", extra={"address": f"{host}:{port}", "port": port, "revision": app.hub.revision,
                                "ca_fingerprint": pki.fingerprint(app.ca_pem), "pid": os.getpid(), **scim})
    await stop.wait()
    lg.info("shutting down", extra={"watchers": len(app.hub.watchers)})
    await app.stop(grace=5.0)
    lg.info("stopped")
    return 0


@main.command()
@click.option("--dir", "dir_", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--hostname", required=True, help="The host this token enrolls (it becomes the host's name).")
@click.option("--tag", "tags", multiple=True, help="KEY=VALUE tag the host gets (repeatable).")
@click.option("--ttl", default="1h", show_default=True, help="How long the token is valid (e.g. 30m, 1h, 2d).")
@click.option("--json", "as_json", is_flag=True)
def token(dir_: Path, hostname, tags, ttl, as_json) -> None:
    """Print a one-time enrollment token (only its hash is stored)."""
    from step_ssh.server.store import Store, StoreError
    sd = ServerDir(dir_)
    try:
        sd.check()
        cfg = sd.load_config()
        seconds = parse_duration(ttl)
        tagmap = parse_tags(tags)
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e))
    st = Store(sd.db, cfg)
    try:
        tok, exp = st.create_token(hostname, tagmap, seconds)
    except StoreError as e:
        _fail(e.message)
    finally:
        st.close()
    if as_json:
        click.echo(json.dumps({"token": tok, "expires_at": exp, "hostname": hostname, "tags": tagmap}))
    else:
        click.echo(tok)


@main.command()
@click.option("--dir", "dir_", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--name", required=True, help="Administrator name (in the certificate and the logs).")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--server", default=None, help="Server address written into the profile (default: from server.yaml).")
@click.option("--days", default=365, show_default=True, type=click.IntRange(1, 3650))
def profile(dir_: Path, name, out, server, days) -> None:
    """Issue another admin profile (certificate + key + CA + address)."""
    from step_ssh.server.rules import check_account_name
    sd = ServerDir(dir_)
    try:
        sd.check()
        cfg = sd.load_config()
        check_account_name(name, "admin name")
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e))
    if out.exists():
        _fail(f"{out} exists; choose another path")
    write_admin_profile(sd, out, name, server or profile_address(cfg.listen, []), days)
    click.echo(f"wrote {out} (secret, mode 0600)")



def _open_store(dir_: Path):
    from step_ssh.server.store import Store
    sd, cfg = _load_dir(dir_)
    return Store(sd.db, cfg)


def _utc(ts: Optional[int]) -> str:
    import datetime as dt
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ") if ts else "-"


@main.command()
@click.option("--dir", "dir_", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="The server directory (`init --dir`).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array (name, serial, times, status).")
def profiles(dir_: Path, as_json: bool) -> None:
    """List the admin profiles (certificates) this control plane issued."""
    import time
    st = _open_store(dir_)
    try:
        rows = st.admin_certs()
    finally:
        st.close()
    now = int(time.time())
    for r in rows:
        r["status"] = "revoked" if r["revoked_at"] else ("expired" if r["not_after"] < now else "valid")
        r["name"] = r.pop("subject")
    if as_json:
        click.echo(json.dumps(rows))
        return
    table = [["NAME", "SERIAL", "ISSUED", "EXPIRES", "STATUS"]]
    table += [[r["name"], r["serial"], _utc(r["issued_at"]), _utc(r["not_after"]),
               r["status"] + (f" {_utc(r['revoked_at'])}" if r["revoked_at"] else "")] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())


@main.command("revoke-profile")
@click.option("--dir", "dir_", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="The server directory (`init --dir`); the server may be running.")
@click.option("--name", default=None, help="Revoke every certificate issued to this admin.")
@click.option("--serial", default=None, help="Revoke the certificate with this serial (see `profiles`; "
                                             "openssl's AA:BB:… form works too).")
@click.option("--json", "as_json", is_flag=True, help="Print what was revoked now as a JSON array.")
def revoke_profile(dir_: Path, name: Optional[str], serial: Optional[str], as_json: bool) -> None:
    """Revoke admin profiles: the running server refuses their certificates
    from the next call on (no restart). Issue a new one with `profile`."""
    from step_ssh.server.store import StoreError
    if (name is None) == (serial is None):
        _fail("give exactly one of --name or --serial", 2)
    st = _open_store(dir_)
    try:
        done = st.revoke_admin(serial=serial, name=name)
    except StoreError as e:
        _fail(e.message, 3 if e.code == "NOT_FOUND" else 1)
    finally:
        st.close()
    if as_json:
        click.echo(json.dumps(done))
    elif not done:
        click.echo("already revoked; nothing changed")
    else:
        for d in done:
            click.echo(f"revoked admin {d['name']} certificate {d['serial']}")

if __name__ == "__main__":
    main()
