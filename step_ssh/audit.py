"""The host's audit spool from Python: layout, reading, conversion to
``pb.AuditEvent``, and appending through the C writer (docs/audit.md).

Layout of the spool directory (root, 0700):

- ``events``: where pam_stepssh.so, the sudo audit plugin and the agent
  append (one JSON line per event, O_APPEND, shared flock, fdatasync);
- ``events.shipping.NNNNNNNNNN``: ``events`` renamed by the agent, being
  shipped; deleted once the control plane acknowledged every event in it;
- ``dropped``: ``COUNT LAST_DROP_UNIX_TIME`` — events not recorded because
  the spool was full (or the disk), counted by the writer that dropped them.

Nothing here needs the agent's configuration, so doctor, tests and the
benchmark use it too.
"""
from __future__ import annotations

import datetime as dt
import errno
import fcntl
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from step_ssh.proto import stepssh_pb2 as pb

EVENTS = "events"
SHIPPING_PREFIX = "events.shipping."
DROPPED = "dropped"
DEFAULT_SPOOL_DIR = Path("/var/lib/step-ssh/spool")  # compiled into the PAM module and the sudo plugin
DEFAULT_SPOOL_MAX = 64 << 20

TYPES = ("session_open", "session_close", "sudo", "sudo_exit", "login_denied", "home_created", "access_changed",
         "audit_dropped")
RESULTS = ("success", "denied", "failure")
MAX_LINE = 64 * 1024        # a line longer than this is garbage, whatever it holds
WINDOW = 1 << 20            # bytes read at a time
MAX_FIELD = 8192            # longest string field passed on

_ID_OK = re.compile(r"^[0-9A-Za-z_-]{8,128}$").match
_ULID = re.compile(r"^[0-7][0-9A-HJKMNP-TV-Z]{25}$")
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"

# spool fields that map onto pb.AuditEvent fields (the rest go to extra_json)
_STRINGS = {"type": "type", "user": "user", "service": "service", "tty": "tty", "rhost": "remote_host",
            "session_id": "session_id", "command": "command", "cwd": "cwd", "target_user": "target_user",
            "result": "result", "reason": "reason", "ruser": "ruser", "access": "access",
            "old_access": "old_access"}
_INTS = {"pid": "pid", "revision": "cache_revision", "audit_session": "audit_session"}
_MAPPED = set(_STRINGS) | set(_INTS) | {"v", "id", "time", "uid"}


# ---- ids and times --------------------------------------------------------------

def ulid_time_ms(ulid: str) -> Optional[int]:
    """The millisecond timestamp of a ULID (None when `ulid` is not one)."""
    if not _ULID.match(ulid):
        return None
    v = 0
    for c in ulid[:10]:
        v = v * 32 + _CROCKFORD.index(c)
    return v


def parse_time_us(value: Any) -> int:
    """RFC 3339 (as the writers produce it) -> microseconds since the epoch; 0 if unusable."""
    if not isinstance(value, str) or len(value) > 64:
        return 0
    try:
        t = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return 0
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.timezone.utc)
    return (t - dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)) // dt.timedelta(microseconds=1)


# ---- records -> pb.AuditEvent ----------------------------------------------------------

class BadRecord(ValueError):
    """A line of the spool that is not an event (torn, corrupt, foreign)."""


def _str(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (str, int, float)):
        return str(v)[:MAX_FIELD]
    return json.dumps(v, sort_keys=True)[:MAX_FIELD]


def _int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        return 0
    return max(-(1 << 63), min(v, (1 << 63) - 1))


def record_to_pb(rec: Any) -> pb.AuditEvent:
    """One decoded spool record -> pb.AuditEvent. Raises BadRecord.

    Version 1 records (before the audit pipeline: hex ids, types `denied`
    and `session_error`) are read as `login_denied` and a failed
    `session_open`."""
    if not isinstance(rec, dict):
        raise BadRecord("not a JSON object")
    eid = rec.get("id")
    if not isinstance(eid, str) or not _ID_OK(eid):
        raise BadRecord("no usable id")
    typ = rec.get("type")
    if not isinstance(typ, str) or not typ or len(typ) > 64:
        raise BadRecord("no usable type")
    ev = pb.AuditEvent(id=eid)
    for k, f in _STRINGS.items():
        if k in rec:
            setattr(ev, f, _str(rec[k]))
    for k, f in _INTS.items():
        if k in rec:
            v = _int(rec[k])
            setattr(ev, f, v if f != "cache_revision" else max(0, v))
    uid = rec.get("uid")
    if isinstance(uid, int) and not isinstance(uid, bool) and 0 <= uid < 1 << 32:
        ev.uid = uid
    if ev.type == "denied":  # version 1
        ev.type = "login_denied"
    elif ev.type == "session_error":  # version 1
        ev.type = "session_open"
        ev.result = ev.result or "failure"
    if not ev.result:
        ev.result = "denied" if ev.type == "login_denied" else "success"
    ev.time_us = parse_time_us(rec.get("time"))
    if not ev.time_us:
        ms = ulid_time_ms(eid)
        ev.time_us = ms * 1000 if ms else 0
    extra = {k: v for k, v in rec.items() if k not in _MAPPED}
    if extra:
        ev.extra_json = json.dumps(extra, sort_keys=True, separators=(",", ":"))[:4 * MAX_FIELD]
    return ev


def parse_line(line: bytes) -> pb.AuditEvent:
    try:
        rec = json.loads(line)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRecord(f"not JSON ({type(e).__name__})") from None
    return record_to_pb(rec)


def event_dict(ev: pb.AuditEvent) -> dict:
    """pb.AuditEvent as a flat dict (what `step-ssh-ctl audit ... --json` prints
    per event, with extra_json unpacked as `extra`)."""
    from google.protobuf.json_format import MessageToDict
    d = MessageToDict(ev, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    for f in ("pid", "time_us", "received_us", "cache_revision", "audit_session", "uid"):
        if f in d:
            d[f] = int(d[f])
    raw = d.pop("extra_json", "")
    try:
        d["extra"] = json.loads(raw) if raw else {}
    except ValueError:
        d["extra"] = {"unparsed": raw}
    return d


# ---- reading a shipping file ---------------------------------------------------------

@dataclass
class Batch:
    events: list[pb.AuditEvent] = field(default_factory=list)
    end: int = 0                       # offset after the last line consumed
    skipped: list[tuple[int, str, bytes]] = field(default_factory=list)  # (offset, why, first bytes)
    exhausted: bool = True             # nothing more to read now
    bytes: int = 0


class ShippingFile:
    """One renamed spool file being shipped. `offset` is how far the control
    plane has acknowledged (kept in memory: after a restart the file is sent
    again from the start, and the control plane deduplicates)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        st = os.fstat(self.fd)
        self.ino = st.st_ino
        self.offset = 0
        self.locked = False

    @property
    def seq(self) -> int:
        return int(self.path.name[len(SHIPPING_PREFIX):])

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def try_lock(self, timeout: float) -> bool:
        """Exclusive flock: no writer (they hold it shared while they append)
        is in the middle of a write any more. Writers that opened the file
        before it was renamed and lock after us find it unlinked and go to the
        new `events` (see audit.c)."""
        if self.locked:
            return True
        deadline = time.monotonic() + timeout
        delay = 0.001
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self.locked = True
                return True
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EINTR):
                    raise
            if time.monotonic() >= deadline:
                return False
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def next_batch(self, max_events: int, max_bytes: int) -> Batch:
        """Events from `offset` on, up to the limits. Only complete lines are
        read while the file is unlocked (a writer may still be appending);
        once locked, a last line without its newline is torn and skipped.
        Lines that are not events are skipped and reported, never sent."""
        b = Batch(end=self.offset)
        size = self.size()
        pos = self.offset
        while pos < size:
            data = os.pread(self.fd, min(WINDOW, size - pos), pos)
            if not data:
                break
            at_eof = pos + len(data) >= size
            start = 0
            while True:
                if len(b.events) >= max_events or b.bytes >= max_bytes:
                    b.exhausted = False
                    return b
                nl = data.find(b"\n", start)
                if nl < 0:
                    break
                self._take(b, data[start:nl], pos + start)
                start = nl + 1
                b.end = pos + start
            rest = len(data) - start
            if start > 0 and not at_eof:
                pos += start  # the next window starts with the partial line
                continue
            if at_eof:
                if rest and self.locked:
                    # a torn last record (crash mid-write): skipped, never glued to the next one
                    b.skipped.append((pos + start, "torn record at the end of the file", data[start:start + 80]))
                    b.end = size
                return b
            # a whole window without a newline: garbage longer than any record
            skip_to = self._find_newline(pos, size)
            if skip_to is None:
                if not self.locked:
                    return b
                skip_to = size
            b.skipped.append((pos, f"line of {skip_to - pos} bytes", data[:80]))
            pos = b.end = skip_to
        return b

    @staticmethod
    def _take(b: Batch, line: bytes, offset: int) -> None:
        stripped = line.strip(b" \t\r\0")
        if not stripped:
            return  # framing (the newline written after a torn record)
        if len(line) > MAX_LINE:
            b.skipped.append((offset, f"line of {len(line)} bytes", line[:80]))
            return
        try:
            ev = parse_line(stripped)
        except BadRecord as e:
            b.skipped.append((offset, str(e), line[:80]))
            return
        b.events.append(ev)
        b.bytes += len(line)

    def _find_newline(self, pos: int, size: int) -> Optional[int]:
        while pos < size:
            data = os.pread(self.fd, min(WINDOW, size - pos), pos)
            if not data:
                return None
            i = data.find(b"\n")
            if i >= 0:
                return pos + i + 1
            pos += len(data)
        return None

    def done(self) -> bool:
        return self.locked and self.offset >= self.size()

    def remove(self) -> None:
        """Delete the file (every event in it acknowledged) while still
        holding the lock, then make the removal durable."""
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        fsync_dir(self.path.parent)
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- the spool directory ---------------------------------------------------------------

@dataclass
class Backlog:
    files: int = 0          # shipping files plus `events` when not empty
    bytes: int = 0
    events_bytes: int = 0   # the live `events` file alone (what spool_max bounds)


class Spool:
    def __init__(self, directory: str | Path):
        self.dir = Path(directory)

    @property
    def events(self) -> Path:
        return self.dir / EVENTS

    def ensure(self) -> None:
        """The directory as the writers want it: root-owned (the caller's
        euid), 0700; its parent 0755."""
        self.dir.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        try:
            self.dir.mkdir(mode=0o700)
        except FileExistsError:
            st = self.dir.stat()
            if st.st_uid == os.geteuid() and st.st_mode & 0o077:
                os.chmod(self.dir, 0o700)  # nobody else may even list it

    def shipping_files(self) -> list[Path]:
        out = []
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return []
        for n in names:
            if n.startswith(SHIPPING_PREFIX) and n[len(SHIPPING_PREFIX):].isdigit():
                out.append(self.dir / n)
        return sorted(out, key=lambda p: int(p.name[len(SHIPPING_PREFIX):]))

    def rotate(self, max_files: int) -> Optional[Path]:
        """Rename a non-empty `events` to the next shipping file (atomic; new
        writers create a fresh `events`). None when there is nothing to ship
        or `max_files` shipping files are already waiting (which bounds the
        spool on disk to about (max_files + 1) x spool_max)."""
        files = self.shipping_files()
        if len(files) >= max_files:
            return None
        try:
            if self.events.stat().st_size == 0:
                return None
        except FileNotFoundError:
            return None
        seq = int(files[-1].name[len(SHIPPING_PREFIX):]) + 1 if files else 1
        target = self.dir / f"{SHIPPING_PREFIX}{seq:010d}"
        os.rename(self.events, target)
        fsync_dir(self.dir)
        return target

    def dropped(self) -> tuple[int, Optional[int]]:
        """(events dropped so far, unix time of the last drop)."""
        try:
            words = (self.dir / DROPPED).read_text().split()
        except (FileNotFoundError, UnicodeDecodeError):
            return 0, None
        try:
            return int(words[0]), int(words[1]) if len(words) > 1 else None
        except (ValueError, IndexError):
            return 0, None

    def backlog(self) -> Backlog:
        b = Backlog()
        for p in self.shipping_files() + [self.events]:
            try:
                size = p.stat().st_size
            except FileNotFoundError:
                continue
            if p == self.events:
                b.events_bytes = size
            if size:
                b.files += 1
                b.bytes += size
        return b

    def count_lines(self) -> int:
        """Lines waiting (events, give or take torn ones); reads everything."""
        n = 0
        for p in self.shipping_files() + [self.events]:
            try:
                with open(p, "rb") as f:
                    while chunk := f.read(WINDOW):
                        n += chunk.count(b"\n")
            except FileNotFoundError:
                pass
        return n


# ---- writing (the C writer, via cffi) --------------------------------------------------

def format_event(type_: str, fields: dict[str, Any]) -> tuple[str, bytes]:
    """(id, line) of an event as the C writer formats it: the same id, time
    and host header and the same escaping as pam_stepssh.so."""
    from step_ssh._native import ffi, lib
    j = ffi.new("struct ss_json *")
    eid = ffi.new("char[]", lib.SS_ULID_LEN + 1)
    lib.ss_event_begin(j, type_.encode(), eid)
    for k, v in fields.items():
        if v is None:
            lib.ss_json_str(j, k.encode(), ffi.NULL)
        elif isinstance(v, bool):
            lib.ss_json_bool(j, k.encode(), int(v))
        elif isinstance(v, int):
            lib.ss_json_int(j, k.encode(), v)
        else:
            lib.ss_json_str(j, k.encode(), str(v).encode("utf-8", "surrogateescape"))
    if lib.ss_json_end(j) != 0:
        raise ValueError("event too large for one spool line")
    return ffi.string(eid).decode(), bytes(ffi.buffer(j.buf, j.len))


def append_many(spool_dir: str | Path, events: list[tuple[str, dict[str, Any]]],
                spool_max: int = DEFAULT_SPOOL_MAX, syslog: bool = True) -> tuple[list[str], str]:
    """Append events with one write and one fdatasync (all or none), with the
    writer's locking; each also to the system log unless `syslog` is false.
    Returns (ids, '') or ([], why it failed)."""
    from step_ssh._native import ffi, lib
    ids, lines = [], []
    for type_, fields in events:
        try:
            eid, line = format_event(type_, fields)
        except ValueError as e:
            return [], str(e)
        ids.append(eid)
        lines.append(line)
    if not lines:
        return [], ""
    buf = b"".join(lines)
    why = ffi.new("char[512]")
    rc = lib.ss_spool_append_lines(str(spool_dir).encode(), spool_max, buf, len(buf), why, 512)
    if syslog:
        for line in lines:
            lib.ss_syslog_line(line, len(line))
    if rc != 0:
        return [], ffi.string(why).decode(errors="replace")
    return ids, ""


def append(spool_dir: str | Path, type_: str, fields: dict[str, Any], spool_max: int = DEFAULT_SPOOL_MAX,
           syslog: bool = True) -> tuple[Optional[str], str]:
    """Append one event (see append_many). Returns (event id or None, why it failed)."""
    ids, why = append_many(spool_dir, [(type_, fields)], spool_max, syslog)
    return (ids[0] if ids else None), why


def append_line(spool_dir: str | Path, line: bytes, spool_max: int = DEFAULT_SPOOL_MAX) -> str:
    """Append raw bytes as one line with the C writer (tests, benchmarks);
    returns '' or why it failed."""
    from step_ssh._native import ffi, lib
    why = ffi.new("char[512]")
    if not line.endswith(b"\n"):
        line += b"\n"
    rc = lib.ss_spool_append_raw(str(spool_dir).encode(), spool_max, line, len(line), why, 512)
    return "" if rc == 0 else ffi.string(why).decode(errors="replace")


def new_ulid() -> str:
    from step_ssh._native import ffi, lib
    out = ffi.new("char[]", lib.SS_ULID_LEN + 1)
    lib.ss_ulid(out)
    return ffi.string(out).decode()
