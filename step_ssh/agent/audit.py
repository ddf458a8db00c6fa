"""The agent's audit side (docs/audit.md): ship the local spool to the
control plane, and record what the agent itself sees (access changes in the
published cache, events dropped by a full spool).

Shipping, one cycle:

1. if the `dropped` counter grew, append an `audit_dropped` event;
2. rename a non-empty `events` to `events.shipping.N` (new writers create a
   fresh `events`; at most `max_shipping_files` wait at a time);
3. for each shipping file in order: take its flock exclusively (writers hold
   it shared while they append), read complete lines from the acknowledged
   offset, send them in batches with ReportAudit and advance the offset only
   when the control plane acknowledged every id of the batch; once the whole
   file is acknowledged, delete it (still holding the lock).

A failed call stops the cycle; the next one starts again at the same offset
after a backoff. A crash loses only the in-memory offset: the file is sent
again and the control plane stores each id once.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Iterable, Optional

import grpc

from step_ssh import audit, rpc
from step_ssh.agent.config import AgentConfig
from step_ssh.proto import stepssh_pb2 as pb

log = logging.getLogger("step_ssh.agent.audit")

REPORT_METHOD = "/stepssh.v1.HostService/ReportAudit"
ACCESS_NAMES = {0: "none", 1: "ssh", 2: "sudo", 3: "jump"}
MAX_ACCESS_EVENTS = 1000   # per publication; the rest are summarized in one event


class NotAcknowledged(RuntimeError):
    """The control plane answered but did not acknowledge every event sent."""


class AuditShipper:
    def __init__(self, cfg: AgentConfig, identity):
        self.cfg = cfg
        self.acfg = cfg.audit
        self.identity = identity
        self.spool = audit.Spool(self.acfg.spool_dir)
        self.state_file = cfg.state_dir / "audit-state.json"
        self.files: dict[str, audit.ShippingFile] = {}
        self.counters = dict(shipped=0, batches=0, skipped=0, rotations=0, files_done=0, failures=0,
                             access_events=0, dropped_reported=0)
        self.state = "idle"
        self.last_error: Optional[dict] = None
        self.last_shipped_at: Optional[float] = None
        self.next_retry_at: Optional[float] = None
        self.waiting_lock: Optional[str] = None
        self._channel = None
        self._channel_mat = None
        self._wake: Optional[asyncio.Event] = None

    # ---- loop ------------------------------------------------------------------------
    async def run(self, on_change=None) -> None:
        from step_ssh.agent.sync import Backoff
        self._wake = asyncio.Event()
        backoff = Backoff(self.cfg.backoff_initial, self.cfg.backoff_max)
        try:
            await asyncio.to_thread(self.spool.ensure)
        except OSError as e:
            log.error("audit: cannot prepare the spool directory %s: %s", self.spool.dir, e)
        try:
            while True:
                try:
                    busy = await self.cycle()
                    backoff.reset()
                    if self.last_error is not None:
                        log.info("audit: shipping again")
                    self.last_error = None
                    self.state = "idle"
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # noqa: BLE001 - every failure: back off, keep the spool
                    self.counters["failures"] += 1
                    await self._close_channel()
                    delay = backoff.next()
                    msg = _describe(e)
                    if self.last_error is None or self.last_error.get("message") != msg:
                        log.warning("audit: cannot ship (%s); retrying in %.1fs", msg, delay)
                    self.last_error = {"message": msg, "at": int(time.time())}
                    self.state = "retrying"
                    self.next_retry_at = time.time() + delay
                    if on_change:
                        on_change()
                    await asyncio.sleep(delay)
                    self.next_retry_at = None
                    continue
                if on_change:
                    on_change()
                if not busy:
                    self._wake.clear()
                    try:
                        await asyncio.wait_for(self._wake.wait(), timeout=self.acfg.poll_interval)
                    except asyncio.TimeoutError:
                        pass
        finally:
            await self._close_channel()
            for f in self.files.values():
                f.close()
            self.files.clear()

    def wake(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def cycle(self) -> bool:
        """Ship what is in the spool now. True when a file could not be
        finished for want of its lock (worth another look soon)."""
        await asyncio.to_thread(self.report_drops)
        if await asyncio.to_thread(self.spool.rotate, self.acfg.max_shipping_files):
            self.counters["rotations"] += 1
        paths = await asyncio.to_thread(self.spool.shipping_files)
        for gone in set(self.files) - {p.name for p in paths}:
            self.files.pop(gone).close()
        pending_lock = False
        for path in paths:
            sf = self.files.get(path.name)
            if sf is None:
                try:
                    sf = self.files[path.name] = await asyncio.to_thread(audit.ShippingFile, path)
                except FileNotFoundError:
                    continue
            if not sf.locked and not await asyncio.to_thread(sf.try_lock, self.acfg.lock_timeout):
                # a writer is stuck mid-append (e.g. a stopped process): ship the
                # complete lines now, finish the file later
                if self.waiting_lock != path.name:
                    log.warning("audit: a writer still holds %s; shipping its complete lines and "
                                "coming back for the rest", path)
                self.waiting_lock = path.name
                pending_lock = True
            elif self.waiting_lock == path.name:
                self.waiting_lock = None
            self.state = "shipping"
            while True:
                b = await asyncio.to_thread(sf.next_batch, self.acfg.batch_size, self.acfg.batch_bytes)
                for off, why, head in b.skipped:
                    log.warning("audit: skipped a record in %s at offset %d (%s): %r", path.name, off, why, head)
                self.counters["skipped"] += len(b.skipped)
                if b.events:
                    await self._send(b.events)
                    self.counters["shipped"] += len(b.events)
                    self.counters["batches"] += 1
                    self.last_shipped_at = time.time()
                sf.offset = max(sf.offset, b.end)
                if b.exhausted:
                    break
            if await asyncio.to_thread(sf.done):
                await asyncio.to_thread(sf.remove)
                del self.files[path.name]
                self.counters["files_done"] += 1
        return pending_lock

    async def _send(self, events: list[pb.AuditEvent]) -> None:
        ch = self._get_channel()
        call = ch.unary_unary(REPORT_METHOD, request_serializer=pb.ReportAuditRequest.SerializeToString,
                              response_deserializer=pb.ReportAuditResponse.FromString)
        resp = await call(pb.ReportAuditRequest(events=events), timeout=self.acfg.rpc_timeout)
        acked = set(resp.acknowledged_ids)
        missing = [e.id for e in events if e.id not in acked]
        if missing:
            raise NotAcknowledged(f"the control plane acknowledged {len(events) - len(missing)} of "
                                  f"{len(events)} events (first missing: {missing[0]})")

    def _get_channel(self):
        mat = self.identity.material
        if mat is None:
            raise RuntimeError("no usable host identity")
        if self._channel is None or self._channel_mat is not mat:
            if self._channel is not None:
                asyncio.ensure_future(self._channel.close())
            self._channel = rpc.aio_channel(self.cfg.server, mat.credentials(), self.cfg.server_name)
            self._channel_mat = mat
        return self._channel

    async def _close_channel(self) -> None:
        if self._channel is not None:
            ch, self._channel, self._channel_mat = self._channel, None, None
            try:
                await ch.close()
            except Exception:  # noqa: BLE001
                pass

    # ---- events of the agent's own ----------------------------------------------------
    def _load_state(self) -> dict:
        try:
            return json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return {}

    def report_drops(self) -> None:
        """The writers count what a full spool made them drop; tell the
        control plane once per increase (an `audit_dropped` event)."""
        count, last = self.spool.dropped()
        st = self._load_state()
        reported = int(st.get("dropped_reported", 0))
        if count == reported:
            return
        if count > reported:
            n = count - reported
            when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(last)) if last else None
            eid, why = audit.append(self.spool.dir, "audit_dropped", {
                "result": "failure", "count": n, "total_dropped": count, "last_drop": when,
                "reason": f"{n} audit event(s) were not recorded on this host: the spool was full "
                          f"(or the disk); see the system log for which"}, spool_max=self.acfg.spool_max)
            if eid is None:
                log.warning("audit: %d dropped event(s) not reported yet: %s", n, why)
                return
            log.error("audit: %d event(s) were dropped because the spool was full (%d in all)", n, count)
            self.counters["dropped_reported"] += n
        st["dropped_reported"] = count  # also after the counter was reset by hand
        from step_ssh.fsutil import atomic_write
        atomic_write(self.state_file, json.dumps(st) + "\n", mode=0o600)

    # ---- status ----------------------------------------------------------------------
    def status(self) -> dict:
        try:
            b = self.spool.backlog()
            dropped, last_drop = self.spool.dropped()
        except OSError:
            b, dropped, last_drop = audit.Backlog(), 0, None
        acked = sum(f.offset for f in list(self.files.values()))
        return {
            "enabled": True,
            "spool_dir": str(self.spool.dir),
            "state": self.state,
            "backlog_bytes": max(0, b.bytes - acked),
            "backlog_files": b.files,
            "events_file_bytes": b.events_bytes,
            "spool_max": self.acfg.spool_max,
            "dropped": dropped,
            "last_drop_at": last_drop,
            "last_shipped_at": self.last_shipped_at and round(self.last_shipped_at, 3),
            "next_retry_at": self.next_retry_at and round(self.next_retry_at, 3),
            "waiting_for_lock": self.waiting_lock,
            "last_error": self.last_error,
            "counters": dict(self.counters),
        }


def _describe(e: BaseException) -> str:
    if isinstance(e, grpc.aio.AioRpcError):
        return f"{e.code().name}: {e.details()}"
    return f"{type(e).__name__}: {e}"


# ---- access changes -------------------------------------------------------------------

class CacheMap:
    """A mapped cache file (the C reader) for access lookups."""

    def __init__(self, path: Path):
        from step_ssh._native import ffi, lib
        self._ffi, self._lib = ffi, lib
        err = ffi.new("int *")
        self.m = lib.sc_open_path(str(path).encode(), 0, err)
        if self.m == ffi.NULL:
            raise FileNotFoundError(str(path))

    def access(self, name: str) -> Optional[int]:
        a = self._lib.stepssh_user_access(self.m, name.encode("utf-8", "surrogateescape"))
        return None if a < 0 else a

    def names(self) -> Iterable[str]:
        buf = self._ffi.new("char[256]")
        for i in range(self._lib.stepssh_n_users(self.m)):
            if self._lib.stepssh_user_name_at(self.m, i, buf, 256) == 0:
                yield self._ffi.string(buf).decode("utf-8", "surrogateescape")

    def close(self) -> None:
        if self.m is not None and self.m != self._ffi.NULL:
            self._lib.sc_close(self.m)
        self.m = None


def open_cache(path: Path) -> Optional[CacheMap]:
    try:
        return CacheMap(path)
    except (FileNotFoundError, OSError):
        return None


def access_changes(old: CacheMap, new: CacheMap, candidates: Optional[Iterable[str]]) -> list[tuple[str, str, str]]:
    """(user, old access, new access) for each user whose access differs
    between two published caches ("none": not on the host). `candidates`:
    the names that may have changed (None: compare everyone)."""
    names = set(candidates) if candidates is not None else set(old.names()) | set(new.names())
    out = []
    for n in sorted(names):
        a, b = old.access(n), new.access(n)
        if a != b:
            out.append((n, ACCESS_NAMES.get(a, "none") if a is not None else "none",
                        ACCESS_NAMES.get(b, "none") if b is not None else "none"))
    return [c for c in out if c[1] != c[2]]


def record_access_changes(cfg: AgentConfig, changes: list[tuple[str, str, str]], revision: int) -> int:
    """Append access_changed events (one write for all); returns how many were written."""
    events = []
    for i, (user, before, after) in enumerate(changes):
        if i == MAX_ACCESS_EVENTS:
            rest = len(changes) - MAX_ACCESS_EVENTS
            events.append(("access_changed", {
                "result": "success", "user": "", "revision": revision, "count": rest,
                "reason": f"{rest} further access changes at revision {revision} not listed one by one"}))
            break
        verb = "granted" if before == "none" else "revoked" if after == "none" else "changed"
        events.append(("access_changed", {
            "result": "success", "user": user, "old_access": before, "access": after, "revision": revision,
            "reason": f"{verb}: {before} -> {after} (cache revision {revision})"}))
    ids, why = audit.append_many(cfg.audit.spool_dir, events, spool_max=cfg.audit.spool_max)
    if not ids:
        log.warning("audit: %d access change(s) of revision %d not recorded: %s", len(events), revision, why)
    return len(ids)
