"""The host's mTLS identity: enrollment, loading, renewal, reload.

Two kinds (config ``identity.type``):

- **builtin**: ``step-ssh enroll`` generated the key on this host (mode 0600,
  it never leaves), pinned the control plane's CA by fingerprint and stored
  ``host.crt``, ``host.key`` and ``ca.crt`` under CONFIG_DIR/identity. The
  agent calls ``Renew`` when two thirds of the certificate's lifetime have
  passed, with a CSR for the *same* key (like ``step ca renew``): only
  ``host.crt`` changes, atomically, so there is never a moment where the key
  and the certificate on disk disagree. Re-enroll to change the key.
- **files**: certificate, key and CA maintained by another tool (step-ca,
  Vault, SPIRE...). The agent never writes them and reloads them when they
  change on disk (checked every ``reload_interval`` seconds).
"""
from __future__ import annotations

import datetime as dt
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from step_ssh import __version__, pki, rpc
from step_ssh.agent.config import (
    CA_CERT, HOST_CERT, HOST_KEY, IDENTITY_SUBDIR, BuiltinIdentity, FilesIdentity, default_config_text,
)
from step_ssh.fsutil import atomic_write

log = logging.getLogger(__name__)


class IdentityError(Exception):
    """The identity cannot be used; the message says what to do."""

    def __init__(self, message: str, kind: str = "identity_invalid", hint: str = ""):
        super().__init__(message)
        self.kind = kind
        self.hint = hint


def _stat_sig(paths) -> tuple:
    out = []
    for p in paths:
        try:
            st = os.stat(p)
            out.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
        except OSError:
            out.append(None)
    return tuple(out)


def _utc(d: dt.datetime) -> str:
    return d.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Material:
    """One consistent (cert, key, CA) triple read from disk."""

    cert_pem: bytes
    key_pem: bytes
    ca_pem: bytes
    cert_path: Path
    key_path: Path
    ca_path: Path
    kind: str
    sig: tuple

    def __post_init__(self) -> None:
        self.cert = pki.load_cert(self.cert_pem)

    def credentials(self):
        return rpc.mtls_credentials(self.ca_pem, self.cert_pem, self.key_pem)

    @property
    def not_before(self) -> dt.datetime:
        return self.cert.not_valid_before_utc

    @property
    def not_after(self) -> dt.datetime:
        return self.cert.not_valid_after_utc

    @property
    def host_id(self) -> Optional[str]:
        ident = pki.identity_of(self.cert)
        return ident[1] if ident and ident[0] == "host" else None

    @property
    def start(self) -> dt.datetime:
        """When this certificate became usable here: its notBefore, or when it
        was written to disk if later. Issuers backdate notBefore (pki.BACKDATE:
        5 minutes) for clock skew; counting the lifetime from there would make
        a short-lived certificate due for renewal the moment it arrives."""
        written = self.sig[0][3] / 1e9 if self.sig and self.sig[0] else 0
        w = dt.datetime.fromtimestamp(written, dt.timezone.utc)
        return min(max(self.not_before, w), self.not_after)

    def renew_at(self, fraction: float) -> dt.datetime:
        """`fraction` of the way from `start` to notAfter (2/3 by default)."""
        return self.start + (self.not_after - self.start) * fraction

    def sans(self) -> list[str]:
        from cryptography import x509
        try:
            san = self.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            return []
        out: list[str] = []
        for v in san:
            out.append(str(v.value))
        return out

    def describe(self, renew_fraction: Optional[float] = None) -> dict:
        d = {
            "identity": self.kind,
            "path": str(self.cert_path),
            "subject": self.cert.subject.rfc4514_string(),
            "issuer": self.cert.issuer.rfc4514_string(),
            "serial": pki.serial_hex(self.cert),
            "sans": self.sans(),
            "host_id": self.host_id,
            "not_before": _utc(self.not_before),
            "not_after": _utc(self.not_after),
            "not_after_ts": int(self.not_after.timestamp()),
            "fingerprint": pki.fingerprint(self.cert_pem),
            "ca_fingerprint": _safe_fp(self.ca_pem),
            "pem": self.cert_pem.decode(errors="replace"),
        }
        if renew_fraction is not None:
            d["renew_at"] = _utc(self.renew_at(renew_fraction))
        return d


def _safe_fp(pem: bytes) -> Optional[str]:
    try:
        return pki.fingerprint(pem)
    except ValueError:
        return None


class Identity:
    """Loads the configured identity; renews (builtin) or watches (files) it."""

    def __init__(self, cfg: BuiltinIdentity | FilesIdentity):
        self.cfg = cfg
        self.kind = cfg.type
        self.cert_path, self.key_path, self.ca_path = Path(cfg.cert), Path(cfg.key), Path(cfg.ca)
        self.material: Optional[Material] = None

    @property
    def paths(self) -> tuple[Path, Path, Path]:
        return self.cert_path, self.key_path, self.ca_path

    def signature(self) -> tuple:
        return _stat_sig(self.paths)

    def changed_on_disk(self) -> bool:
        return self.material is None or self.signature() != self.material.sig

    def load(self) -> Material:
        """Read and check the files; raise IdentityError in operator words."""
        sig = self.signature()
        data = []
        for what, p in (("certificate", self.cert_path), ("private key", self.key_path), ("CA certificate", self.ca_path)):
            try:
                data.append(p.read_bytes())
            except FileNotFoundError:
                if self.kind == "builtin":
                    raise IdentityError(
                        f"no host identity: {p} does not exist",
                        kind="identity_missing",
                        hint="enroll this host first: `step-ssh enroll --server HOST:PORT --token T "
                             "--fingerprint SHA256:...` (token from `step-ssh-server token` or `step-ssh-ctl`)",
                    ) from None
                key = {"certificate": "cert", "private key": "key"}.get(what, "ca")
                raise IdentityError(f"identity {what} {p} does not exist", kind="identity_missing",
                                    hint=f"identity.{key} in the agent configuration, and the tool that "
                                         "writes that file") from None
            except OSError as e:
                raise IdentityError(f"cannot read the {what} {p}: {e.strerror}", kind="identity_invalid",
                                    hint="the agent runs as root; check the file's permissions") from None
        cert_pem, key_pem, ca_pem = data
        try:
            pki.load_cert(cert_pem)
        except ValueError:
            raise IdentityError(f"{self.cert_path} is not a PEM certificate", hint="re-enroll or fix the file") from None
        try:
            pki.load_cert(ca_pem)
        except ValueError:
            raise IdentityError(f"{self.ca_path} is not a PEM CA certificate", hint="re-enroll or fix the file") from None
        try:
            pki.load_key(key_pem)
        except (ValueError, TypeError) as e:
            raise IdentityError(f"{self.key_path} is not an unencrypted PEM private key ({e})",
                                hint="re-enroll or fix the file") from None
        mat = Material(cert_pem, key_pem, ca_pem, self.cert_path, self.key_path, self.ca_path, self.kind, sig)
        self.material = mat
        return mat

    # -- builtin renewal --------------------------------------------------------
    def renew_due(self) -> Optional[dt.datetime]:
        if self.kind != "builtin" or self.material is None:
            return None
        return self.material.renew_at(self.cfg.renew_fraction)

    async def renew(self, address: str, server_name: Optional[str], timeout: float = 20.0) -> Material:
        """Renew over its own short-lived channel (the Watch stream stays up),
        check the result, replace host.crt atomically and return the new material."""
        from step_ssh.proto import stepssh_pb2 as pb
        from step_ssh.proto import stepssh_pb2_grpc as pbg

        mat = self.material
        assert mat is not None and self.kind == "builtin"
        cn = mat.cert.subject.rfc4514_string().removeprefix("CN=") or socket.gethostname()
        csr = pki.make_csr(mat.key_pem, cn)
        ch = rpc.aio_channel(address, mat.credentials(), server_name)
        try:
            resp = await pbg.HostServiceStub(ch).Renew(pb.RenewRequest(csr_pem=csr), timeout=timeout)
        finally:
            await ch.close()
        new_pem = bytes(resp.certificate_pem)
        problems = check_issued(new_pem, mat.key_pem, mat.ca_pem)
        new = pki.load_cert(new_pem)
        if pki.identity_of(new) != pki.identity_of(mat.cert):
            problems.append(f"it names {pki.identity_of(new)}, not this host ({pki.identity_of(mat.cert)})")
        if problems:
            raise IdentityError("the control plane returned an unusable certificate on renewal: " + "; ".join(problems),
                                kind="renew_failed", hint="the old certificate stays in place; check the server logs")
        atomic_write(self.cert_path, new_pem, mode=0o644)
        return self.load()


def check_issued(cert_pem: bytes, key_pem: bytes, ca_pem: bytes) -> list[str]:
    """Why an issued certificate is not usable with this key and CA (empty: fine)."""
    out = []
    try:
        cert = pki.load_cert(cert_pem)
    except ValueError:
        return ["it is not a PEM certificate"]
    if not pki.key_matches_cert(key_pem, cert_pem):
        out.append("it is not for this host's key")
    if not pki.verify_issued_by(cert, pki.load_cert(ca_pem)):
        out.append("it is not signed by the pinned CA")
    now = pki.now()
    if cert.not_valid_after_utc <= now:
        out.append("it has already expired")
    return out


# ---- enrollment ------------------------------------------------------------------

@dataclass
class Enrolled:
    host_id: str
    hostname: str
    tags: dict
    identity_dir: Path
    config_written: Optional[Path]
    not_after: dt.datetime
    ca_fingerprint: str


def enroll(server: str, token: str, fingerprint: str, config_dir: Path, *, hostname: Optional[str] = None,
           server_name: Optional[str] = None, timeout: float = 20.0) -> Enrolled:
    """Pin the CA by fingerprint, generate the key here, get a certificate.

    Raises IdentityError (with a diagnosis) on any failure; nothing under
    `config_dir` changes unless enrollment succeeded."""
    import grpc

    from step_ssh.agent import tlsdiag
    from step_ssh.proto import stepssh_pb2 as pb
    from step_ssh.proto import stepssh_pb2_grpc as pbg

    fingerprint = fingerprint.strip()
    if not fingerprint.startswith("SHA256:"):
        raise IdentityError(f"--fingerprint must look like SHA256:<base64>, got {fingerprint!r}",
                            kind="usage", hint="copy it from `step-ssh-server init` output")
    host, port = rpc.split_address(server)
    # 1. the CA, pinned: read the chain without trusting it, keep the CA whose
    #    fingerprint the operator gave us, refuse anything else
    try:
        ca_pem = rpc.fetch_ca(server, fingerprint, timeout=timeout)
    except ValueError as e:
        raise IdentityError(f"fingerprint mismatch: {e}", kind="fingerprint_mismatch",
                            hint="compare with the `CA fingerprint` line `step-ssh-server init` printed; "
                                 "a different fingerprint means another server (or a man in the middle)") from None
    except (OSError, ConnectionError) as e:
        d = tlsdiag.probe(host, port, server_name, None, timeout=min(timeout, 5.0)) or \
            tlsdiag.Diagnosis("unreachable", f"server unreachable: cannot connect to {server}: {e}",
                              "the address and port, that step-ssh-server runs, firewalls")
        raise IdentityError(d.message, kind=d.kind, hint=d.hint) from None
    # 2. the key, generated here, never sent anywhere
    key_pem = pki.new_private_key()
    hostname = hostname or socket.gethostname()
    csr = pki.make_csr(key_pem, hostname)
    # 3. Enroll over TLS verified against the pinned CA
    ch = rpc.channel(server, rpc.enroll_credentials(ca_pem), server_name)
    try:
        resp = pbg.HostServiceStub(ch).Enroll(
            pb.EnrollRequest(token=token, csr_pem=csr, agent_version=__version__), timeout=timeout)
    except grpc.RpcError as e:
        d = tlsdiag.diagnose_rpc(e, server, server_name, None, during="enrollment")
        raise IdentityError(d.message, kind=d.kind, hint=d.hint) from None
    finally:
        ch.close()
    cert_pem = bytes(resp.certificate_pem)
    problems = check_issued(cert_pem, key_pem, ca_pem)
    if resp.ca_pem and _safe_fp(bytes(resp.ca_pem)) != fingerprint:
        problems.append("the server's answer names a different CA than the pinned one")
    if problems:
        raise IdentityError("the control plane returned an unusable certificate: " + "; ".join(problems),
                            kind="enroll_failed", hint="nothing was written; check the server's logs")
    ident = Path(config_dir) / IDENTITY_SUBDIR
    ident.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(ident, 0o700)
    atomic_write(ident / HOST_KEY, key_pem, mode=0o600, dir_mode=0o700)
    atomic_write(ident / CA_CERT, ca_pem, mode=0o644, dir_mode=0o700)
    atomic_write(ident / HOST_CERT, cert_pem, mode=0o644, dir_mode=0o700)
    cfg_path = Path(config_dir) / "agent.yaml"
    written = None
    if not cfg_path.exists():
        atomic_write(cfg_path, default_config_text(server, ident), mode=0o644)
        written = cfg_path
    cert = pki.load_cert(cert_pem)
    return Enrolled(host_id=resp.host_id, hostname=resp.hostname, tags=dict(resp.tags), identity_dir=ident,
                    config_written=written, not_after=cert.not_valid_after_utc, ca_fingerprint=fingerprint)
