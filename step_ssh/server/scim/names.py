"""SCIM userName / displayName -> POSIX account name (docs/scim.md, "Names").

The rule, applied once when a user or group is created by SCIM; the name never
changes afterwards, even if the IdP renames the user (hosts key files, homes
and sudo rules by name):

1. users: take the part before the first '@' (``jane.doe@corp.example`` ->
   ``jane.doe``) and after the last '\\' (``CORP\\jdoe`` -> ``jdoe``);
   groups: take the whole displayName;
2. transliterate to ASCII (``José`` -> ``jose``: NFKD, accents dropped) and
   lower-case it;
3. replace every run of characters other than ``a-z 0-9 _ -`` with one ``_``
   and strip ``_`` and ``-`` from both ends;
4. if that leaves nothing, or starts with a digit, prefix ``u`` (users) or
   ``g`` (groups);
5. if the result is longer than 32 characters, or is already taken (by any
   user or group, SCIM-managed or not, or by the synthesized sudo group), cut
   it to 25 characters and append ``_`` + 6 hex digits of
   sha256(lower-cased source); if that is taken too, hash ``source#1``,
   ``source#2``, ... until a free name comes out.

So the same userName always maps to the same name unless a collision forced a
suffix, and two different userNames can never end up sharing an account.
"""
from __future__ import annotations

import hashlib
import re
import unicodedata
from typing import Callable

from step_ssh.view import NAME_MAX, NAME_RE

_INVALID_RUN = re.compile(r"[^a-z0-9_-]+")
SUFFIX_HEX = 6
BASE_MAX = NAME_MAX - 1 - SUFFIX_HEX  # 25


def base_name(source: str, kind: str = "user") -> str:
    """Steps 1-4: the readable part of the name (may still be too long)."""
    s = source.strip()
    if kind == "user":
        s = s.split("@", 1)[0]
        s = s.rsplit("\\", 1)[-1]
    s = unicodedata.normalize("NFKD", s)
    s = "".join(c for c in s if not unicodedata.combining(c))
    s = s.encode("ascii", "ignore").decode().lower()
    s = _INVALID_RUN.sub("_", s).strip("_-")
    prefix = "u" if kind == "user" else "g"
    if not s or not (s[0].isalpha() or s[0] == "_"):
        s = prefix + s
    return s


def _suffixed(base: str, source: str, attempt: int) -> str:
    key = source.strip().lower() if attempt == 0 else f"{source.strip().lower()}#{attempt}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:SUFFIX_HEX]
    return f"{base[:BASE_MAX].rstrip('_-') or base[:1]}_{digest}"


def posix_name(source: str, taken: Callable[[str], bool], kind: str = "user") -> str:
    """The full rule: a valid account name that `taken` says is free."""
    base = base_name(source, kind)
    if len(base) <= NAME_MAX and NAME_RE.match(base) and not taken(base):
        return base
    for attempt in range(1000):
        name = _suffixed(base, source, attempt)
        if not taken(name):
            return name
    raise RuntimeError(f"no free account name for {source!r}")  # 1000 hash collisions: not happening
