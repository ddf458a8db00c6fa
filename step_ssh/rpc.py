"""Client side of the control plane's gRPC: channels with the right options,
the enrollment bootstrap, CA pinning by fingerprint, and gRPC/TLS failures
explained in words an operator can act on. Used by step-ssh-ctl (and
available to the agent).
"""
from __future__ import annotations

import datetime as dt
import os
import socket
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import grpc

from step_ssh import pki

# Snapshots of large fleets exceed gRPC's default 4 MiB receive limit.
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 512 * 1024 * 1024),
    ("grpc.max_send_message_length", 256 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]


def channel_options(server_name: Optional[str] = None) -> list:
    opts = list(CHANNEL_OPTIONS)
    if server_name:
        opts.append(("grpc.ssl_target_name_override", server_name))
    return opts


def mtls_credentials(ca_pem: bytes, cert_pem: bytes, key_pem: bytes) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(root_certificates=ca_pem, private_key=key_pem, certificate_chain=cert_pem)


def enroll_credentials(ca_pem: bytes) -> grpc.ChannelCredentials:
    """For Enroll: the public bootstrap identity (see pki.bootstrap_client_identity)."""
    key, cert = pki.bootstrap_client_identity()
    return grpc.ssl_channel_credentials(root_certificates=ca_pem, private_key=key, certificate_chain=cert)


def channel(address: str, creds: grpc.ChannelCredentials, server_name: Optional[str] = None) -> grpc.Channel:
    return grpc.secure_channel(address, creds, options=channel_options(server_name))


def aio_channel(address: str, creds: grpc.ChannelCredentials, server_name: Optional[str] = None):
    return grpc.aio.secure_channel(address, creds, options=channel_options(server_name))


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"server address {address!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def fetch_ca(address: str, fingerprint: str, timeout: float = 10.0) -> bytes:
    """Connect without verifying, read the certificate chain the server
    presents, and return the CA certificate whose fingerprint is `fingerprint`
    (PEM). Raises ValueError naming what was found instead."""
    host, port = split_address(address)
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    key, cert = pki.bootstrap_client_identity()  # the server asks every client for a certificate
    with tempfile.TemporaryDirectory() as d:
        kp, cp = os.path.join(d, "key.pem"), os.path.join(d, "cert.pem")
        Path(kp).write_bytes(key)
        Path(cp).write_bytes(cert)
        ctx.load_cert_chain(cp, kp)
    with socket.create_connection((host, port), timeout=timeout) as s:
        with ctx.wrap_socket(s, server_hostname=host) as tls:
            # Python 3.13 has get_unverified_chain() publicly; 3.10-3.12 on the C object
            chain = tls._sslobj.get_unverified_chain() or []  # type: ignore[attr-defined]
            pems = [c.public_bytes() for c in chain]
    pems = [p.encode() if isinstance(p, str) else p for p in pems]
    seen = []
    for p in pems:
        fp = pki.fingerprint(p)
        if fp == fingerprint:
            return p
        seen.append(fp)
    raise ValueError(f"the server at {address} presented no CA certificate with fingerprint {fingerprint} "
                     f"(it presented {', '.join(seen) or 'no certificates'}); check the fingerprint that "
                     "`step-ssh-server init` printed and that you are talking to the right server")


# ---- diagnosing failures ------------------------------------------------------------

@dataclass
class Problem:
    exit_code: int
    message: str


EXIT_REJECTED = 1      # the server refused the request (invalid, conflict, precondition)
EXIT_USAGE = 2         # bad command line (click)
EXIT_NOT_FOUND = 3
EXIT_AUTH = 4          # certificate rejected / not allowed
EXIT_UNREACHABLE = 5   # network or TLS failure before the server could answer


def check_identity(ca_pem: bytes, cert_pem: bytes, key_pem: bytes, what: str = "client certificate") -> list[str]:
    """Local checks before connecting: each problem in words."""
    out = []
    try:
        cert = pki.load_cert(cert_pem)
    except ValueError:
        return [f"the {what} is not a PEM certificate"]
    try:
        if not pki.key_matches_cert(key_pem, cert_pem):
            out.append(f"the private key does not match the {what} (they belong to different key pairs)")
    except (ValueError, TypeError):
        out.append(f"the private key for the {what} is not an unencrypted PEM key")
    now = dt.datetime.now(dt.timezone.utc)
    if cert.not_valid_after_utc < now:
        out.append(f"the {what} expired at {cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC "
                   f"({_ago(now - cert.not_valid_after_utc)} ago); renew it or get a new one")
    if cert.not_valid_before_utc > now:
        out.append(f"the {what} is not valid yet (from {cert.not_valid_before_utc:%Y-%m-%d %H:%M:%S} UTC, "
                   f"{_ago(cert.not_valid_before_utc - now)} from now): this machine's clock is probably behind")
    try:
        ca = pki.load_cert(ca_pem)
        if not pki.verify_issued_by(cert, ca):
            out.append(f"the {what} was not issued by the CA in this configuration "
                       f"({pki.fingerprint(ca_pem)}); it belongs to another control plane")
    except ValueError:
        out.append("the CA certificate is not PEM")
    return out


def _ago(delta: dt.timedelta) -> str:
    s = int(abs(delta.total_seconds()))
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= n:
            return f"{s // n}{unit}"
    return f"{s}s"


def explain(err: grpc.RpcError, address: str) -> Problem:
    code = err.code() if hasattr(err, "code") else None
    details = (err.details() if hasattr(err, "details") else str(err)) or ""
    low = details.lower()
    if code == grpc.StatusCode.UNAVAILABLE:
        if "connection refused" in low:
            return Problem(EXIT_UNREACHABLE, f"server unreachable: nothing listens at {address} (connection "
                                             "refused); is step-ssh-server running, and is the address right?")
        if "certificate_verify_failed" in low or "certificate verify failed" in low:
            return Problem(EXIT_UNREACHABLE, f"the server at {address} presented a certificate not signed by the CA "
                                             "in this configuration: wrong server, or the CA/fingerprint is stale")
        if "peer name" in low or "hostname verification" in low or ("hostname" in low and "mismatch" in low):
            return Problem(EXIT_UNREACHABLE, f"the server certificate does not name {address.rpartition(':')[0]} "
                                             f"(SAN mismatch): connect by a name it carries, set server_name in "
                                             f"the profile, or re-issue it with `init --san`. ({details})")
        if "socket closed" in low or "connection reset" in low or "handshake" in low or "tlsv1 alert" in low \
                or "ssl" in low:
            return Problem(EXIT_AUTH, "the server closed the TLS handshake: it rejected the client certificate "
                                      "(not issued by its CA, expired, or not yet valid) — check the certificate, "
                                      f"the clock, and that this is the right server ({details})")
        if "deadline" in low or "timeout" in low or "timed out" in low:
            return Problem(EXIT_UNREACHABLE, f"server unreachable: no answer from {address} in time")
        return Problem(EXIT_UNREACHABLE, f"server unreachable at {address}: {details}")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return Problem(EXIT_UNREACHABLE, f"server unreachable: no answer from {address} in time")
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return Problem(EXIT_AUTH, f"certificate rejected: {details}")
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return Problem(EXIT_AUTH, f"not allowed: {details}")
    if code == grpc.StatusCode.NOT_FOUND:
        return Problem(EXIT_NOT_FOUND, details)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return Problem(EXIT_REJECTED, f"message too large or server overloaded: {details}")
    return Problem(EXIT_REJECTED, details or str(code))
