"""Where things live: fixed system paths and the artifacts this package built."""
from __future__ import annotations

from pathlib import Path

CACHE_PATH = Path("/var/lib/step-ssh/cache")  # compiled into the C modules too
LIB_DIR = Path(__file__).resolve().parent / "_lib"
NSS_MODULE = LIB_DIR / "libnss_stepssh.so.2"


def installed() -> dict[str, str]:
    return {
        "nss_module": str(NSS_MODULE),
        "cache": str(CACHE_PATH),
    }
