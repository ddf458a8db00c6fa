"""TLS and gRPC failures in words an operator can act on (DESIGN.md invariant 5).

gRPC reports a failed handshake as ``UNAVAILABLE: failed to connect to all
addresses ... Ssl handshake failed ... CERTIFICATE_VERIFY_FAILED``, which
names neither the certificate nor the fix. When a connection fails the agent
instead finds the precise cause itself:

1. local checks of its own identity with `cryptography` (key matches the
   certificate, validity window against this host's clock, issued by the CA
   it trusts);
2. a probe of the server: resolve, connect, do a TLS handshake *without*
   verification to read the server's certificate chain, then check that chain
   against the trusted CA, its validity window (with the clock skew) and its
   names against the address; finally see whether the server accepts this
   host's certificate (a TLS alert after the handshake says why not).

Every `Diagnosis` has a stable `kind`, a `message` that starts with the words
the operator will search for ("unknown CA", "fingerprint mismatch",
"certificate expired", "not yet valid", "SAN mismatch", "key does not match
certificate", "server unreachable") and a `hint`: what to check.
"""
from __future__ import annotations

import datetime as dt
import ipaddress
import os
import socket
import ssl
import tempfile
from dataclasses import asdict, dataclass
from typing import Optional

from step_ssh import pki
from step_ssh.timefmt import span

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


@dataclass
class Diagnosis:
    kind: str
    message: str
    hint: str

    def text(self) -> str:
        return f"{self.message} (check: {self.hint})" if self.hint else self.message

    def as_dict(self) -> dict:
        return asdict(self)


def _ago(delta: dt.timedelta) -> str:
    return span(delta.total_seconds())


def _ts(d: dt.datetime) -> str:
    return d.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _name(cert) -> str:
    return cert.subject.rfc4514_string() or "(empty subject)"


CLOCK_HINT = "this host's clock: `timedatectl status` (is NTP synchronized?), `chronyc tracking`"


# ---- this host's own identity ------------------------------------------------------

def check_local(cert_pem: bytes, key_pem: bytes, ca_pem: bytes, *, kind: str = "builtin",
                now: Optional[dt.datetime] = None) -> list[Diagnosis]:
    """Problems with (cert, key, CA) that need no network, most fundamental first."""
    now = now or pki.now()
    out: list[Diagnosis] = []
    fix_ident = ("re-enroll this host (`step-ssh enroll` with a new token)" if kind == "builtin"
                 else "identity.cert / identity.key / identity.ca and the tool that writes them")
    try:
        cert = pki.load_cert(cert_pem)
    except ValueError:
        return [Diagnosis("identity_invalid", "this host's certificate is not a PEM certificate", fix_ident)]
    try:
        matches = pki.key_matches_cert(key_pem, cert_pem)
    except (ValueError, TypeError):
        return [Diagnosis("identity_invalid", "this host's private key is not an unencrypted PEM key", fix_ident)]
    if not matches:
        out.append(Diagnosis(
            "key_mismatch",
            f"key does not match certificate: the private key is not the key of the certificate "
            f"{_name(cert)} (serial {pki.serial_hex(cert)}); TLS cannot use them together",
            "that the key and certificate files come from the same enrollment or issuance; " + fix_ident))
    if cert.not_valid_after_utc <= now:
        out.append(Diagnosis(
            "client_cert_expired",
            f"certificate expired: this host's certificate {_name(cert)} expired at "
            f"{_ts(cert.not_valid_after_utc)} ({_ago(now - cert.not_valid_after_utc)} ago; "
            f"this host's clock says {_ts(now)})",
            ("the agent renews at 2/3 of the lifetime, so it could not reach the control plane in time or the "
             "clock jumped; check " + CLOCK_HINT + ", then re-enroll with a new token") if kind == "builtin"
            else "renew it with the tool that issues it; check " + CLOCK_HINT))
    if cert.not_valid_before_utc > now:
        skew = cert.not_valid_before_utc - now
        out.append(Diagnosis(
            "client_cert_not_yet_valid",
            f"certificate not yet valid: this host's certificate is valid from {_ts(cert.not_valid_before_utc)}, "
            f"but this host's clock says {_ts(now)}: clock skew of at least {_ago(skew)} "
            f"(this host is behind, or the issuer's clock is ahead)",
            CLOCK_HINT))
    try:
        ca = pki.load_cert(ca_pem)
    except ValueError:
        out.append(Diagnosis("identity_invalid", "the trusted CA file is not a PEM certificate", fix_ident))
        return out
    if not pki.verify_issued_by(cert, ca):
        out.append(Diagnosis(
            "unknown_ca",
            f"unknown CA: this host's certificate was issued by {cert.issuer.rfc4514_string()}, not by the CA "
            f"this host trusts ({_name(ca)}, {pki.fingerprint(ca_pem)}); the control plane will refuse it",
            fix_ident))
    return out


# ---- the server ------------------------------------------------------------------

def _san_names(cert) -> tuple[list[str], list[str]]:
    from cryptography import x509
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [], []
    return (list(san.get_values_for_type(x509.DNSName)),
            [str(a) for a in san.get_values_for_type(x509.IPAddress)])


def name_matches(cert, name: str) -> bool:
    dns, ips = _san_names(cert)
    try:
        ip = ipaddress.ip_address(name)
        return any(ipaddress.ip_address(a) == ip for a in ips)
    except ValueError:
        pass
    name = name.lower().rstrip(".")
    for d in dns:
        d = d.lower().rstrip(".")
        if d == name:
            return True
        if d.startswith("*.") and "." in name and name.split(".", 1)[1] == d[2:]:
            return True
    return False


def check_server_chain(chain_pem: list[bytes], ca_pem: Optional[bytes], name: str, address: str,
                       *, kind: str = "builtin", now: Optional[dt.datetime] = None) -> Optional[Diagnosis]:
    """What is wrong with the chain the server presented, if anything."""
    now = now or pki.now()
    if not chain_pem:
        return Diagnosis("tls_error", f"the server at {address} presented no certificate",
                         "that the address points at step-ssh-server and not at another TLS service")
    leaf = pki.load_cert(chain_pem[0])
    fix_ca = ("if the control plane was re-initialized (new CA), re-enroll this host with the new "
              "`--fingerprint`; otherwise make `server:` point at the right control plane") if kind == "builtin" \
        else "identity.ca must be the CA that signed the control plane's server certificate"
    if ca_pem is not None:
        ca = pki.load_cert(ca_pem)
        if not pki.verify_issued_by(leaf, ca):
            presented = ", ".join(f"{_name(pki.load_cert(p))} {pki.fingerprint(p)}" for p in chain_pem[1:]) or "none"
            return Diagnosis(
                "unknown_ca",
                f"unknown CA: the server at {address} presented a certificate ({_name(leaf)}) issued by "
                f"{leaf.issuer.rfc4514_string()}, which this host does not trust; this host trusts only "
                f"{_name(ca)} ({pki.fingerprint(ca_pem)}); CA certificates the server sent: {presented}",
                fix_ca)
    if leaf.not_valid_after_utc <= now:
        return Diagnosis(
            "server_cert_expired",
            f"certificate expired: the server's certificate {_name(leaf)} expired at "
            f"{_ts(leaf.not_valid_after_utc)} ({_ago(now - leaf.not_valid_after_utc)} ago; this host's clock says "
            f"{_ts(now)})",
            "renew the control plane's server certificate; if it should still be valid, " + CLOCK_HINT)
    if leaf.not_valid_before_utc > now:
        skew = leaf.not_valid_before_utc - now
        return Diagnosis(
            "server_cert_not_yet_valid",
            f"certificate not yet valid: the server's certificate is valid from {_ts(leaf.not_valid_before_utc)}, "
            f"but this host's clock says {_ts(now)}: clock skew of at least {_ago(skew)}",
            CLOCK_HINT + "; and the control plane host's clock")
    if not name_matches(leaf, name):
        dns, ips = _san_names(leaf)
        return Diagnosis(
            "san_mismatch",
            f"SAN mismatch: the server's certificate is valid for {', '.join(dns + ips) or 'no names'}, "
            f"but the agent connects to {name!r}",
            "set `server:` (or `server_name:`) in the agent configuration to one of those names, or reissue "
            "the server certificate with this name (`step-ssh-server init --san NAME`)")
    return None


_ALERTS = [
    ("UNKNOWN_CA", "unknown_ca", "unknown CA: the control plane does not trust the CA that issued this host's "
                                 "certificate"),
    ("CERTIFICATE_EXPIRED", "client_cert_expired", "certificate expired: the control plane says this host's "
                                                   "certificate has expired"),
    ("CERTIFICATE_REQUIRED", "client_cert_rejected", "the control plane requires a client certificate and got none"),
    ("BAD_CERTIFICATE", "client_cert_rejected", "the control plane rejected this host's certificate (bad certificate)"),
    ("CERTIFICATE_UNKNOWN", "client_cert_rejected", "the control plane rejected this host's certificate"),
    ("UNSUPPORTED_CERTIFICATE", "client_cert_rejected", "the control plane rejected this host's certificate "
                                                        "(unsupported certificate)"),
    ("DECRYPT_ERROR", "key_mismatch", "key does not match certificate: the control plane could not verify this "
                                      "host's signature"),
]


def _alert(err: Exception, address: str, kind: str) -> Optional[Diagnosis]:
    text = f"{getattr(err, 'reason', '') or ''} {err}".upper()
    for key, k, msg in _ALERTS:
        if key in text:
            return Diagnosis(k, f"{msg} (TLS alert from {address}: {getattr(err, 'reason', err)})",
                             "re-enroll this host (`step-ssh enroll` with a new token)" if kind == "builtin"
                             else "that identity.cert is issued by a CA the control plane trusts and still valid")
    return None


class _ClientFiles:
    """The client certificate and key as files for ssl.load_cert_chain."""

    def __init__(self, cert_pem: Optional[bytes], key_pem: Optional[bytes]):
        if cert_pem is None or key_pem is None:
            key_pem, cert_pem = pki.bootstrap_client_identity()
        self.cert_pem, self.key_pem = cert_pem, key_pem
        self.dir: Optional[tempfile.TemporaryDirectory] = None

    def __enter__(self) -> tuple[str, str]:
        self.dir = tempfile.TemporaryDirectory(prefix="step-ssh-probe-")
        c, k = os.path.join(self.dir.name, "c"), os.path.join(self.dir.name, "k")
        for path, data in ((c, self.cert_pem), (k, self.key_pem)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        return c, k

    def __exit__(self, *exc) -> None:
        if self.dir is not None:
            self.dir.cleanup()


def probe(host: str, port: int, server_name: Optional[str], material=None, *, timeout: float = 5.0,
          ca_pem: Optional[bytes] = None) -> Optional[Diagnosis]:
    """Connect to the server and find what stops an mTLS session, or None.

    `material` (identity.Material) supplies the client certificate, key and the
    trusted CA; without it, the public enrollment bootstrap identity is used and
    only `ca_pem` (if given) is checked."""
    address = f"{host}:{port}"
    name = server_name or host
    kind = getattr(material, "kind", "builtin")
    if material is not None:
        ca_pem = material.ca_pem
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        return Diagnosis("unreachable", f"server unreachable: cannot resolve {host!r}: {e.strerror}",
                         "the `server:` address in the agent configuration, and DNS (`getent hosts NAME`)")
    last: Optional[Diagnosis] = None
    for family, stype, proto, _, sockaddr in infos:
        sock = socket.socket(family, stype, proto)
        sock.settimeout(timeout)
        try:
            sock.connect(sockaddr)
        except ConnectionRefusedError:
            last = Diagnosis("unreachable", f"server unreachable: nothing is listening on {address} "
                                            "(connection refused)",
                             "that step-ssh-server is running and listens on that address and port "
                             "(`ss -ltnp` on the server), and the agent's `server:` setting")
            sock.close()
            continue
        except socket.timeout:
            last = Diagnosis("unreachable", f"server unreachable: no answer from {address} within {timeout:g}s",
                             "firewalls and routing between this host and the control plane, and that the "
                             "server host is up")
            sock.close()
            continue
        except OSError as e:
            last = Diagnosis("unreachable", f"server unreachable: cannot connect to {address}: {e.strerror}",
                             "the network path to the control plane (routes, firewalls)")
            sock.close()
            continue
        try:
            return _tls_probe(sock, host, address, name, material, ca_pem, kind, timeout)
        finally:
            sock.close()
    return last


def _tls_probe(sock, host, address, name, material, ca_pem, kind, timeout) -> Optional[Diagnosis]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.set_alpn_protocols(["h2"])
    except NotImplementedError:
        pass
    with _ClientFiles(getattr(material, "cert_pem", None), getattr(material, "key_pem", None)) as (c, k):
        try:
            ctx.load_cert_chain(c, k)
        except ssl.SSLError:
            return Diagnosis("key_mismatch", "key does not match certificate: TLS refuses to use this host's "
                                             "private key with its certificate",
                             "that the key and certificate come from the same enrollment; re-enroll")
    try:
        tls = ctx.wrap_socket(sock, server_hostname=None if _is_ip(host) else host)
    except ssl.SSLError as e:
        return _alert(e, address, kind) or Diagnosis(
            "tls_error", f"TLS handshake with {address} failed: {e.reason or e}",
            "that `server:` points at step-ssh-server's gRPC port (not another service)")
    except (socket.timeout, OSError) as e:
        return Diagnosis("unreachable", f"server unreachable: the TLS handshake with {address} did not complete "
                                        f"({e})", "that `server:` points at step-ssh-server's gRPC port")
    try:
        chain = _peer_chain(tls)
        bad = check_server_chain(chain, ca_pem, name, address, kind=kind)
        if bad is not None:
            return bad
        # Does the server accept us? With TLS 1.3 its verdict on our
        # certificate arrives as an alert after our side of the handshake.
        try:
            tls.settimeout(min(timeout, 3.0))
            tls.sendall(H2_PREFACE)
            tls.recv(1)
        except ssl.SSLError as e:
            return _alert(e, address, kind) or Diagnosis(
                "client_cert_rejected", f"the control plane at {address} ended the TLS session: {e.reason or e}",
                "that this host's certificate is issued by the control plane's CA and still valid")
        except (socket.timeout, OSError):
            pass
        return None
    finally:
        tls.close()


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def _peer_chain(tls: ssl.SSLSocket) -> list[bytes]:
    """The certificates the server sent, leaf first, as PEM."""
    try:
        chain = tls._sslobj.get_unverified_chain() or []  # type: ignore[attr-defined]
        pems = [c.public_bytes(1) for c in chain]  # 1: ssl._ssl.ENCODING_PEM
        return [p.encode() if isinstance(p, str) else p for p in pems]
    except AttributeError:
        der = tls.getpeercert(binary_form=True)
        return [ssl.DER_cert_to_PEM_cert(der).encode()] if der else []


# ---- putting it together --------------------------------------------------------------

def diagnose_rpc(err, address: str, server_name: Optional[str], material, *, during: str = "the Watch stream",
                 timeout: float = 5.0) -> Diagnosis:
    """Explain a failed gRPC call. Blocking (it may probe the server): call it
    from a worker thread in async code."""
    import grpc

    code = err.code() if hasattr(err, "code") else None
    details = (err.details() if hasattr(err, "details") else str(err)) or ""
    kind = getattr(material, "kind", "builtin")
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    reenroll = ("re-enroll this host: a token from `step-ssh-server token` or `step-ssh-ctl`, then "
                "`step-ssh enroll`")
    if code == grpc.StatusCode.UNAUTHENTICATED:
        if "removed" in details:
            return Diagnosis("host_removed", f"the control plane no longer knows this host: {details}", reenroll)
        if during == "enrollment":
            return Diagnosis("enroll_refused", f"enrollment refused: {details}",
                             "that the token is complete, unused and not expired (tokens are one-time)")
        return Diagnosis("client_cert_rejected", f"the control plane rejected this host's certificate: {details}",
                         reenroll if kind == "builtin" else "identity.cert and its issuer")
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return Diagnosis("permission_denied", f"the control plane refused {during}: {details}",
                         "that the agent uses a host certificate (stepssh://host/...), not an admin one")
    if code == grpc.StatusCode.ABORTED and "replaced" in details:
        return Diagnosis("duplicate_identity", f"another connection with this host's identity replaced this one: "
                                               f"{details}",
                         "that no other machine uses this host's identity (cloned disk or image?); "
                         "enroll every machine separately")
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION,
                grpc.StatusCode.ALREADY_EXISTS) and during == "enrollment":
        return Diagnosis("enroll_refused", f"enrollment refused: {details}",
                         "that the token is complete, unused and not expired (tokens are one-time)")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return Diagnosis("rpc_error", f"{during}: message too large or server overloaded: {details}",
                         "the control plane's logs")
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNKNOWN,
                grpc.StatusCode.INTERNAL, None):
        if material is not None:
            local = check_local(material.cert_pem, material.key_pem, material.ca_pem, kind=kind)
            # key and validity problems are certain; an issuer mismatch may be
            # the server's side too, so let the probe speak first
            first = [d for d in local if d.kind != "unknown_ca"]
            if first:
                return first[0]
        try:
            d = probe(host, int(port), server_name, material, timeout=timeout)
        except Exception as e:  # a diagnosis must never take the agent down
            d = Diagnosis("rpc_error", f"{during} failed ({details}); probing the server failed too: {e}",
                          "the control plane's logs")
        if d is not None:
            return d
        if material is not None:
            local = check_local(material.cert_pem, material.key_pem, material.ca_pem, kind=kind)
            if local:
                return local[0]
        if code == grpc.StatusCode.UNAVAILABLE:
            return Diagnosis("unavailable", f"the control plane at {address} is unavailable: {details}",
                             "the control plane's logs; the agent retries with backoff")
    return Diagnosis("rpc_error", f"{during} failed: {code.name if code else 'error'}: {details}",
                     "the control plane's logs")
