"""The SSH user CA side: public key parsing and fingerprints, and signing a
user's key with the control plane's own CA key via ssh-keygen (openssh-client)."""
from __future__ import annotations

import base64
import hashlib
import os
import shutil
import struct
import subprocess
import tempfile
import time
from pathlib import Path

from step_ssh.server.rules import RuleError

KEY_TYPES = {
    "ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com", "sk-ecdsa-sha2-nistp256@openssh.com",
}


def parse_public_key(text: str) -> tuple[str, str, str]:
    """An OpenSSH public key line -> (type, base64 blob, comment); RuleError if it is not one."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip() and not ln.startswith("#")]
    if len(lines) != 1:
        raise RuleError("expected exactly one OpenSSH public key line (like the content of id_ed25519.pub)")
    parts = lines[0].split(None, 2)
    if len(parts) < 2:
        raise RuleError("not an OpenSSH public key: expected 'TYPE BASE64 [COMMENT]'")
    typ, b64 = parts[0], parts[1]
    if typ.endswith("-cert-v01@openssh.com"):
        raise RuleError("this is an SSH certificate, not a public key; give the .pub key itself")
    if typ not in KEY_TYPES:
        raise RuleError(f"not a supported OpenSSH public key: type {typ!r} (use ssh-ed25519, ecdsa-sha2-nistp256/384/521 or ssh-rsa)")
    try:
        blob = base64.b64decode(b64, validate=True)
        (n,) = struct.unpack(">I", blob[:4])
        inner = blob[4:4 + n].decode()
    except Exception:
        raise RuleError("not an OpenSSH public key: the key data is not valid base64") from None
    if inner != typ:
        raise RuleError(f"corrupt SSH public key: the data says {inner!r} but the line says {typ!r}")
    return typ, b64, (parts[2] if len(parts) > 2 else "")


def fingerprint(text: str) -> str:
    _, b64, _ = parse_public_key(text)
    digest = hashlib.sha256(base64.b64decode(b64)).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def normalize(text: str) -> str:
    typ, b64, comment = parse_public_key(text)
    return f"{typ} {b64}" + (f" {comment}" if comment else "")


def _ssh_keygen() -> str:
    exe = shutil.which("ssh-keygen")
    if not exe:
        raise RuntimeError("ssh-keygen is not installed (Debian: apt-get install openssh-client)")
    return exe


def generate_ca(path: Path, comment: str = "step-ssh user CA") -> str:
    """Create an ed25519 CA key at `path` (0600) and `path`.pub; returns the public line."""
    subprocess.run([_ssh_keygen(), "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
                   check=True, capture_output=True)
    os.chmod(path, 0o600)
    return Path(str(path) + ".pub").read_text().strip()


def sign(ca_key: Path, public_key: str, *, identity: str, principals: list[str], ttl: int,
         serial: int) -> tuple[str, int]:
    """Sign `public_key` into a user certificate for exactly `principals`,
    valid from 5 minutes ago (clock skew) for `ttl` seconds. Returns
    (certificate line, valid_before unix time)."""
    if not principals:
        raise RuleError("the user has no principals to put in a certificate")
    key = normalize(public_key)
    now = int(time.time())
    valid_before = now + ttl
    with tempfile.TemporaryDirectory(prefix="step-ssh-sign-") as tmp:
        pub = Path(tmp) / "user.pub"
        pub.write_text(key + "\n")
        check = subprocess.run([_ssh_keygen(), "-l", "-f", str(pub)], capture_output=True, text=True)
        if check.returncode != 0:
            raise RuleError(f"ssh-keygen does not accept this public key: {check.stderr.strip()}")
        start = time.strftime("%Y%m%d%H%M%S", time.gmtime(now - 300))
        end = time.strftime("%Y%m%d%H%M%S", time.gmtime(valid_before))
        r = subprocess.run([_ssh_keygen(), "-q", "-s", str(ca_key), "-I", identity, "-n", ",".join(principals),
                            "-V", f"{start}Z:{end}Z", "-z", str(serial), str(pub)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"ssh-keygen failed to sign: {r.stderr.strip()}")
        return (Path(tmp) / "user-cert.pub").read_text().strip(), valid_before
