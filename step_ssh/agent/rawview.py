"""The host view as the agent holds it: the serialized ``pb.HostView`` bytes.

A parsed view of 100k users costs ~30 MB of protobuf objects; its wire form
costs ~6 MB. The agent keeps (and persists, in state_dir/view.pb) the wire
form, and walks it record by record when it publishes or applies a delta,
parsing one ``pb.User`` / ``pb.Group`` at a time. The walker below knows only
the protobuf wire format (varints and length-delimited fields) and the field
numbers of HostView, Snapshot and WatchEvent in stepssh.proto; it skips fields
it does not know, so the proto can grow.

Delta semantics are those of ``step_ssh.viewconv.apply_delta``: removals
first, then upserts replace a record in place or append it.
"""
from __future__ import annotations

from array import array
from typing import Iterator, Optional

from step_ssh.proto import stepssh_pb2 as pb
from step_ssh.wire import I32, I64, LEN, VARINT, WireError, encode_varint, read_varint

# field numbers (stepssh.proto)
HV_REVISION, HV_USERS, HV_GROUPS, HV_SETTINGS = 1, 2, 3, 4
SNAP_VIEW, SNAP_SHRINK = 1, 2
EV_SNAPSHOT = 1


def fields(buf, start: int = 0, end: Optional[int] = None) -> Iterator[tuple[int, int, int, int, int]]:
    """(field number, wire type, value, payload start, record start) for each
    field in buf[start:end]. For LEN fields `value` is the payload end; for
    varints it is the value; for fixed fields, the payload end."""
    end = len(buf) if end is None else end
    pos = start
    while pos < end:
        rec = pos
        tag, pos = read_varint(buf, pos)
        num, wt = tag >> 3, tag & 7
        if num == 0:
            raise WireError("field number 0")
        if wt == VARINT:
            v, pos = read_varint(buf, pos)
            yield num, wt, v, pos, rec
        elif wt == LEN:
            n, pos = read_varint(buf, pos)
            if pos + n > end:
                raise WireError("length-delimited field runs past the end")
            yield num, wt, pos + n, pos, rec
            pos += n
        elif wt == I64:
            pos += 8
            yield num, wt, pos, pos - 8, rec
        elif wt == I32:
            pos += 4
            yield num, wt, pos, pos - 4, rec
        else:
            raise WireError(f"unsupported wire type {wt}")
        if pos > end:
            raise WireError("field runs past the end")


def _scan(mv: memoryview):
    """Top level of a HostView: (revision, settings parts, spans), where
    spans[field] = (record starts, payload starts, payload ends) for the
    users and groups. `fields` inlined: this runs over every record."""
    n = len(mv)
    pos = 0
    revision = 0
    settings: list[bytes] = []
    spans = {HV_USERS: (array("I"), array("I"), array("I")), HV_GROUPS: (array("I"), array("I"), array("I"))}
    urs, ups, ues = spans[HV_USERS]
    varint = read_varint
    while pos < n:
        rec = pos
        tag = mv[pos]
        if tag < 0x80:
            pos += 1
        else:
            tag, pos = varint(mv, pos)
        num, wt = tag >> 3, tag & 7
        if num == 0:
            raise WireError("field number 0")
        if wt == LEN:
            ln = mv[pos] if pos < n else 0x80
            if ln < 0x80:
                pos += 1
            else:
                ln, pos = varint(mv, pos)
            end = pos + ln
            if end > n:
                raise WireError("length-delimited field runs past the end")
            if num == HV_USERS:
                urs.append(rec)
                ups.append(pos)
                ues.append(end)
            elif num == HV_GROUPS:
                g = spans[HV_GROUPS]
                g[0].append(rec)
                g[1].append(pos)
                g[2].append(end)
            elif num == HV_SETTINGS:
                settings.append(bytes(mv[pos:end]))
            pos = end
        elif wt == VARINT:
            v, pos = varint(mv, pos)
            if num == HV_REVISION:
                revision = v
        elif wt == I64:
            pos += 8
        elif wt == I32:
            pos += 4
        else:
            raise WireError(f"unsupported wire type {wt}")
    if pos != n:
        raise WireError("truncated field at the end")
    return revision, settings, spans


class RawView:
    """A serialized pb.HostView with cheap access to what the agent needs."""

    __slots__ = ("mv", "revision", "settings", "_spans_of")

    def __init__(self, data=b"", lo: int = 0, hi: Optional[int] = None):
        """`data[lo:hi]` is the serialized view; it is not copied (a
        snapshot's view stays inside the received event's bytes). One pass
        records where each user and group record is (12 bytes per record)."""
        self.mv = memoryview(data)[lo:hi]
        self.revision, settings, self._spans_of = _scan(self.mv)
        # repeated occurrences of an embedded message merge, as in protobuf
        self.settings = pb.HostSettings.FromString(b"".join(settings))

    @property
    def n_users(self) -> int:
        return len(self._spans_of[HV_USERS][0])

    @property
    def n_groups(self) -> int:
        return len(self._spans_of[HV_GROUPS][0])

    @property
    def data(self) -> memoryview:
        """The serialized pb.HostView (bytes-like)."""
        return self.mv

    @classmethod
    def from_pb(cls, view: pb.HostView) -> "RawView":
        return cls(view.SerializeToString())

    def to_pb(self) -> pb.HostView:
        return pb.HostView.FromString(self.mv)

    def _spans(self, field_no: int):
        """(record start, payload start, payload end) of each `field_no` record."""
        return zip(*self._spans_of[field_no])

    def iter_users(self) -> Iterator[pb.User]:
        mv = self.mv
        parse = pb.User.FromString
        for _, p, e in self._spans(HV_USERS):
            yield parse(mv[p:e])

    def iter_groups(self) -> Iterator[pb.Group]:
        mv = self.mv
        parse = pb.Group.FromString
        for _, p, e in self._spans(HV_GROUPS):
            yield parse(mv[p:e])

    def _names(self, field_no: int) -> Iterator[str]:
        """The names of the `field_no` records, in order. Runs of adjacent
        records are parsed by protobuf in one call (exact protobuf semantics,
        C speed): a run of records of one field is itself a valid HostView."""
        rs, _, es = self._spans_of[field_no]
        mv = self.mv
        n = len(rs)
        i = 0
        while i < n:
            j = i + 1
            while j < n and j - i < 2048 and rs[j] == es[j - 1]:
                j += 1
            chunk = pb.HostView.FromString(mv[rs[i]:es[j - 1]])
            for rec in (chunk.users if field_no == HV_USERS else chunk.groups):
                yield rec.name
            i = j

    def apply_delta(self, d: pb.Delta) -> "RawView":
        """The view after `d` (whose base_revision the caller has checked).
        Untouched records are copied as byte ranges, never re-encoded."""
        mv = self.mv
        out = bytearray()
        out += encode_varint(HV_REVISION << 3 | VARINT) + encode_varint(d.revision)
        for field_no, removes, upserts in ((HV_USERS, d.remove_users, d.upsert_users),
                                           (HV_GROUPS, d.remove_groups, d.upsert_groups)):
            rs, _, es = self._spans_of[field_no]
            tag = encode_varint(field_no << 3 | LEN)
            remove = set(removes)
            ups: dict[str, bytes] = {}
            for rec in upserts:
                ups[rec.name] = rec.SerializeToString()
            placed: set[str] = set()
            run = [0, 0]  # a byte range of kept records not yet copied

            def flush() -> None:
                if run[1] > run[0]:
                    out.extend(mv[run[0]:run[1]])
                run[0] = run[1] = 0

            names = self._names(field_no) if (remove or ups) else None
            for k in range(len(rs)):
                name = next(names) if names is not None else None
                if name is None or (name not in remove and name not in ups):
                    if run[1] == rs[k] and run[1] > run[0]:
                        run[1] = es[k]
                    else:
                        flush()
                        run[0], run[1] = rs[k], es[k]
                    continue
                flush()
                if name in remove:
                    continue
                if name not in placed:
                    placed.add(name)
                    new = ups[name]
                    out += tag + encode_varint(len(new)) + new
            flush()
            for name, new in ups.items():
                if name not in placed:
                    out += tag + encode_varint(len(new)) + new
        settings = d.settings if d.HasField("settings") else self.settings
        sb = settings.SerializeToString()
        out += encode_varint(HV_SETTINGS << 3 | LEN) + encode_varint(len(sb)) + sb
        return RawView(out)  # the bytearray itself: no copy


def decode_event(raw: bytes) -> tuple[str, object]:
    """A serialized WatchEvent -> ("snapshot", (RawView, shrink_intended)) or
    ("delta", pb.Delta) or ("heartbeat", pb.Heartbeat) or ("empty", None).

    Snapshots are taken apart here without parsing the view; the others are
    small and parsed by protobuf."""
    mv = memoryview(raw)
    last = None
    for num, wt, v, p, _ in fields(mv):
        if num in (1, 2, 3) and wt == LEN:
            last = (num, p, v)
    if last is None:
        return "empty", None
    num, p, e = last
    if num != EV_SNAPSHOT:
        ev = pb.WatchEvent.FromString(raw)
        kind = ev.WhichOneof("event")
        return kind, getattr(ev, kind)
    spans = []
    shrink = False
    for fnum, wt, v, fp, _ in fields(mv, p, e):
        if fnum == SNAP_VIEW and wt == LEN:
            spans.append((fp, v))
        elif fnum == SNAP_SHRINK and wt == VARINT:
            shrink = bool(v)
    if len(spans) == 1:  # the usual case: the view stays inside `raw`, uncopied
        return "snapshot", (RawView(raw, *spans[0]), shrink)
    # absent (empty view) or split in parts (protobuf merges them)
    return "snapshot", (RawView(b"".join(bytes(mv[a:b]) for a, b in spans)), shrink)
