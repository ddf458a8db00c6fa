"""X.509 for step-ssh's mTLS: the control plane's CA, host and admin
certificates, CSRs, and the fingerprint hosts pin.

Identity lives in a URI SAN: `stepssh://host/<host-id>` for hosts and
`stepssh://admin/<name>` for administrators. The server trusts only that, never
a request field (DESIGN.md invariant 5).
"""
from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
from typing import Iterable, Optional

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

URI_PREFIX = "stepssh://"
HOST_CERT_LIFETIME = dt.timedelta(hours=24)
ADMIN_CERT_LIFETIME = dt.timedelta(days=365)
SERVER_CERT_LIFETIME = dt.timedelta(days=825)
CA_LIFETIME = dt.timedelta(days=3650)
BACKDATE = dt.timedelta(minutes=5)  # tolerate small clock skew


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


# ---- keys and CSRs ------------------------------------------------------------

def new_private_key() -> bytes:
    """A new P-256 key, PKCS#8 PEM, unencrypted (store it with mode 0600)."""
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def load_key(pem: bytes):
    return serialization.load_pem_private_key(pem, password=None)


def make_csr(key_pem: bytes, common_name: str) -> bytes:
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
           .sign(load_key(key_pem), hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM)


def load_csr(pem: bytes) -> x509.CertificateSigningRequest:
    csr = x509.load_pem_x509_csr(pem)
    if not csr.is_signature_valid:
        raise ValueError("CSR signature is invalid")
    return csr


# ---- certificates -------------------------------------------------------------

def load_cert(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def fingerprint(cert_pem_bytes: bytes) -> str:
    """`SHA256:<base64, no padding>` of the certificate's DER, as hosts pin it."""
    der = load_cert(cert_pem_bytes).public_bytes(serialization.Encoding.DER)
    return "SHA256:" + base64.b64encode(hashlib.sha256(der).digest()).decode().rstrip("=")


def create_ca(common_name: str = "step-ssh control plane CA") -> tuple[bytes, bytes]:
    """(cert_pem, key_pem) of a new self-signed CA."""
    key_pem = new_private_key()
    key = load_key(key_pem)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    t = now()
    cert = (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(t - BACKDATE).not_valid_after(t + CA_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return cert_pem(cert), key_pem


def _san(names: Iterable[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for n in names:
        if n.startswith(URI_PREFIX):
            out.append(x509.UniformResourceIdentifier(n))
            continue
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            out.append(x509.DNSName(n))
    return out


def issue(
    ca_cert_pem: bytes,
    ca_key_pem: bytes,
    public_key,
    common_name: str,
    sans: Iterable[str] = (),
    *,
    client: bool = True,
    server: bool = False,
    lifetime: dt.timedelta = HOST_CERT_LIFETIME,
    not_before: Optional[dt.datetime] = None,
) -> bytes:
    """Sign `public_key` (a cryptography public key object) into a leaf cert."""
    ca_cert, ca_key = load_cert(ca_cert_pem), load_key(ca_key_pem)
    start = not_before or (now() - BACKDATE)
    usages = ([ExtendedKeyUsageOID.CLIENT_AUTH] if client else []) + ([ExtendedKeyUsageOID.SERVER_AUTH] if server else [])
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
               .issuer_name(ca_cert.subject)
               .public_key(public_key)
               .serial_number(x509.random_serial_number())
               .not_valid_before(start).not_valid_after(start + lifetime)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False))
    names = _san(sans)
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return cert_pem(builder.sign(ca_key, hashes.SHA256()))


def host_uri(host_id: str) -> str:
    return f"{URI_PREFIX}host/{host_id}"


def admin_uri(name: str) -> str:
    return f"{URI_PREFIX}admin/{name}"


def identity_of(cert: x509.Certificate) -> Optional[tuple[str, str]]:
    """("host", id) or ("admin", name) from the URI SAN, else None."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        if uri.startswith(URI_PREFIX):
            kind, _, ident = uri[len(URI_PREFIX):].partition("/")
            if kind in ("host", "admin") and ident:
                return kind, ident
    return None


def key_matches_cert(key_pem: bytes, cert_pem_bytes: bytes) -> bool:
    pub = load_key(key_pem).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    cpub = load_cert(cert_pem_bytes).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return pub == cpub


# ---- anonymous enrollment bootstrap -------------------------------------------
#
# gRPC's Python server can either require a client certificate or not ask for
# one at all; it cannot ask for one optionally. The control plane therefore
# requires a client certificate on every connection and also trusts a second,
# *public* CA whose private key is derived from a published constant: anyone
# can mint a certificate under it, so such a certificate proves nothing and
# grants nothing but a TLS handshake. The server derives identity only from
# certificates signed directly by its own CA (see `verify_issued_by`); the only
# RPC an anonymous caller may use is Enroll, which a one-time token guards.

BOOTSTRAP_SEED = b"step-ssh anonymous enrollment bootstrap v1 (public, grants nothing)"
BOOTSTRAP_CN = "step-ssh anonymous enrollment (public key, grants nothing)"
_BOOTSTRAP_EPOCH = dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc)
_BOOTSTRAP_END = dt.datetime(2120, 1, 1, tzinfo=dt.timezone.utc)
_bootstrap_cache: dict[str, bytes] = {}


def _bootstrap_ca_key():
    seed = int.from_bytes(hashlib.sha256(BOOTSTRAP_SEED).digest(), "big")
    order = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551  # P-256
    return ec.derive_private_key(seed % (order - 1) + 1, ec.SECP256R1())


def bootstrap_ca_pem() -> bytes:
    """The public enrollment CA the server adds to its client trust roots."""
    if "ca" not in _bootstrap_cache:
        key = _bootstrap_ca_key()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, BOOTSTRAP_CN)])
        cert = (x509.CertificateBuilder()
                .subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(1).not_valid_before(_BOOTSTRAP_EPOCH).not_valid_after(_BOOTSTRAP_END)
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=False,
                                             content_commitment=False, key_encipherment=False,
                                             data_encipherment=False, key_agreement=False,
                                             encipher_only=False, decipher_only=False), critical=True)
                .sign(key, hashes.SHA256()))
        _bootstrap_cache["ca"] = cert_pem(cert)
    return _bootstrap_cache["ca"]


def bootstrap_client_identity() -> tuple[bytes, bytes]:
    """(key_pem, cert_pem) an enrolling host presents before it has a
    certificate of its own: `grpc.ssl_channel_credentials(ca_pem, key, cert)`."""
    if "leaf" not in _bootstrap_cache:
        ca_key = _bootstrap_ca_key()
        key_pem = new_private_key()
        issuer = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, BOOTSTRAP_CN)])
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "step-ssh enrollment")]))
                .issuer_name(issuer).public_key(load_key(key_pem).public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(_BOOTSTRAP_EPOCH).not_valid_after(_BOOTSTRAP_END)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .sign(ca_key, hashes.SHA256()))
        _bootstrap_cache["leaf"] = cert_pem(cert)
        _bootstrap_cache["leaf_key"] = key_pem
    return _bootstrap_cache["leaf_key"], _bootstrap_cache["leaf"]


def verify_issued_by(cert: x509.Certificate, ca_cert: x509.Certificate) -> bool:
    """True when `cert` is signed directly by `ca_cert` (name and signature)."""
    try:
        cert.verify_directly_issued_by(ca_cert)
        return True
    except (ValueError, TypeError, Exception):  # InvalidSignature is not a ValueError
        return False


def serial_hex(cert: x509.Certificate) -> str:
    return format(cert.serial_number, "x")
