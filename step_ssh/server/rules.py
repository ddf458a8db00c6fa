"""Validation of names, tags and ids shared by the server and step-ssh-ctl.

Every message says what is wrong and what would be accepted, so the CLI can
print it as is.
"""
from __future__ import annotations

import re
from typing import Iterable, Mapping

from step_ssh.view import MAX_ID, PRINCIPAL_RE, check_name

TAG_KEY_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._/-]{0,61}[A-Za-z0-9])?$")
TAG_VALUE_RE = re.compile(r"^[A-Za-z0-9._:@/+-]{1,128}$")
HOSTNAME_RE = re.compile(r"^(?=.{1,253}$)[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$")
MAX_TAGS = 64


class RuleError(ValueError):
    """A request that breaks a rule; the message is meant for a person."""

    code = "INVALID_ARGUMENT"  # a grpc.StatusCode name

    @property
    def message(self) -> str:
        return str(self)


def parse_tag(text: str) -> tuple[str, str]:
    """'key=value' -> (key, value), or RuleError saying what a tag looks like."""
    key, sep, value = text.partition("=")
    if not sep:
        raise RuleError(f"malformed tag {text!r}: write tags as KEY=VALUE, e.g. env=prod")
    check_tag(key, value)
    return key, value


def parse_tags(items: Iterable[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for t in items:
        k, v = parse_tag(t)
        if k in out and out[k] != v:
            raise RuleError(f"tag key {k!r} given twice ({out[k]!r} and {v!r}); a host has one value per key")
        out[k] = v
    return out


def check_tag(key: str, value: str) -> None:
    if not TAG_KEY_RE.match(key):
        raise RuleError(f"malformed tag key {key!r}: 1-63 letters, digits, '.', '_', '/' or '-', "
                        "starting and ending with a letter or digit")
    if not TAG_VALUE_RE.match(value):
        raise RuleError(f"malformed value {value!r} for tag {key!r}: 1-128 letters, digits or ._:@/+- "
                        "(no spaces, no '=')")


def check_tags(tags: Mapping[str, str]) -> dict[str, str]:
    if len(tags) > MAX_TAGS:
        raise RuleError(f"too many tags ({len(tags)}); at most {MAX_TAGS}")
    for k, v in tags.items():
        check_tag(k, v)
    return dict(sorted(tags.items()))


def check_hostname(name: str) -> str:
    n = name.strip().lower().rstrip(".")
    if not HOSTNAME_RE.match(n):
        raise RuleError(f"invalid hostname {name!r}: use DNS labels (letters, digits, '-') separated by dots")
    return n


def check_account_name(name: str, what: str) -> str:
    try:
        return check_name(name, what)
    except ValueError as e:
        raise RuleError(str(e)) from None


def check_principals(principals: Iterable[str], user: str) -> list[str]:
    out = []
    for p in principals:
        if not PRINCIPAL_RE.match(p):
            raise RuleError(f"user {user}: principal {p!r} must be 1-256 characters without spaces, "
                            "commas or control characters")
        out.append(p)
    return list(dict.fromkeys(out))


def check_text(value: str, what: str, limit: int = 256) -> str:
    if any(c in value for c in ":\n\r\x00") or len(value) > limit:
        raise RuleError(f"{what} must be at most {limit} characters without ':', newlines or NUL: {value!r}")
    return value


def check_path(value: str, what: str) -> str:
    check_text(value, what, 4096)
    if value and not value.startswith("/"):
        raise RuleError(f"{what} must be an absolute path, got {value!r}")
    return value


def check_id_range(value: int, what: str, min_id: int, reserved: Iterable[int]) -> int:
    """An id supplied by an admin or a directory (0 means "allocate" and is handled earlier)."""
    if value < 0 or value > MAX_ID:
        raise RuleError(f"{what} {value} is out of range (must be {min_id}-{MAX_ID})")
    if value < min_id:
        raise RuleError(f"{what} {value} is in the system range (below {min_id}); uid/gid 0 and system "
                        f"ids are never managed by step-ssh — omit it to allocate one")
    if value in set(reserved):
        raise RuleError(f"{what} {value} is reserved (nobody/nogroup, the sudo group or the jump group); "
                        "choose another or omit it")
    return value


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DUR_RE = re.compile(r"^\s*(\d+)\s*([smhdw]?)\s*$")


def parse_duration(text: str) -> int:
    """'90s', '30m', '16h', '7d', '1w' or plain seconds -> seconds."""
    total, rest = 0, text.strip().lower()
    parts = re.findall(r"(\d+)\s*([smhdw]?)", rest)
    if not parts or re.sub(r"(\d+)\s*([smhdw]?)", "", rest).strip():
        raise RuleError(f"invalid duration {text!r}: use e.g. 90s, 30m, 16h, 7d or 1h30m")
    for n, u in parts:
        total += int(n) * _UNITS[u or "s"]
    if total <= 0:
        raise RuleError(f"duration {text!r} must be positive")
    return total
