"""Where things live: fixed system paths and the artifacts this package built."""
from __future__ import annotations

import subprocess
import sysconfig
from pathlib import Path

CACHE_PATH = Path("/var/lib/step-ssh/cache")  # compiled into the C modules too
LIB_DIR = Path(__file__).resolve().parent / "_lib"
NSS_MODULE = LIB_DIR / "libnss_stepssh.so.2"
PAM_MODULE = LIB_DIR / "pam_stepssh.so"
PRINCIPALS_COMMAND = LIB_DIR / "step-ssh-principals"
SUDO_AUDIT_PLUGIN = LIB_DIR / "stepssh_sudo_audit.so"  # built only where <sudo_plugin.h> exists
AUDIT_SPOOL = Path("/var/lib/step-ssh/spool/events")  # compiled into the PAM module


def installed() -> dict[str, str]:
    return {
        "nss_module": str(NSS_MODULE),
        "pam_module": str(PAM_MODULE),
        "principals_command": str(PRINCIPALS_COMMAND),
        "audit_spool": str(AUDIT_SPOOL),
        "sudo_audit_plugin": str(SUDO_AUDIT_PLUGIN) if SUDO_AUDIT_PLUGIN.exists() else "",
        "cache": str(CACHE_PATH),
    }


def lib_dir() -> str:
    """The directory glibc searches for NSS modules (Debian multiarch)."""
    arch = sysconfig.get_config_var("MULTIARCH") or subprocess.run(
        ["gcc", "-print-multiarch"], capture_output=True, text=True).stdout.strip()
    for cand in (f"/usr/lib/{arch}", f"/lib/{arch}", "/usr/lib64", "/usr/lib"):
        if arch and Path(cand, "libc.so.6").exists():
            return cand
    return "/usr/lib"


def security_dir() -> str:
    """Where PAM loads modules from."""
    return str(Path(lib_dir()) / "security")
