"""The agent: Watch the control plane, keep the cache true to it.

One asyncio loop runs:

- the **watch loop**: connect (mTLS), ``Watch(since_revision=<persisted>)``,
  apply what arrives, reconnect with exponential backoff and jitter. A
  snapshot replaces the view, a delta applies on top of the revision it names
  (anything else: reconnect and let the server decide), a heartbeat confirms
  the view. Every change becomes a new cache file (atomic replace, never an
  edit), then the view itself is persisted (STATE_DIR/view.pb) so that after
  an agent *or* server restart the stream resumes with deltas. A snapshot or
  delta that would empty the view or remove more than ``max_shrink_ratio`` of
  its users is refused unless the server marks it ``shrink_intended``.
- the **renew loop** (built-in identity): ``Renew`` at 2/3 of the
  certificate's lifetime over a separate call, then switch the stream to the
  new certificate (one reconnect, no backoff);
- the **audit loop** (step_ssh.agent.audit): ship the local audit spool with
  ReportAudit, removing only what the control plane acknowledged; each
  publication that changes a user's access on this host is recorded as an
  ``access_changed`` event;
- **housekeeping**: reload a files identity that changed on disk, republish
  when /etc/passwd or /etc/group change (local accounts always win), tell
  systemd READY=1 after ``ready_timeout`` if a valid cache from an earlier run
  is being served but the control plane is unreachable.

CPU-heavy work (decoding a snapshot, building a cache) runs in a worker
thread so heartbeats and signals are handled meanwhile.
"""
from __future__ import annotations

import asyncio
import json
import logging
import random
import signal
import threading
import time
from pathlib import Path
from typing import Optional

import grpc

from step_ssh import __version__, rpc
from step_ssh.agent import tlsdiag
from step_ssh.agent.audit import AuditShipper, access_changes, open_cache, record_access_changes
from step_ssh.agent.config import AgentConfig
from step_ssh.agent.identity import Identity, IdentityError, Material
from step_ssh.agent.notify import Notifier
from step_ssh.agent.publish import Published, max_stale_of, publish_view
from step_ssh.agent.rawview import RawView, WireError, decode_event
from step_ssh.agent.status import MAX_LISTED_PROBLEMS, STATUS_VERSION, write_status
from step_ssh.cache.format import Header
from step_ssh.cache.local import LocalAccounts, ViewRejected
from step_ssh.fsutil import atomic_write
from step_ssh.proto import stepssh_pb2 as pb

log = logging.getLogger("step_ssh.agent")

WATCH_METHOD = "/stepssh.v1.HostService/Watch"
_EOF = object()
_EVERYONE = object()  # _publish: compare every user's access with the previous cache


class Refused(Exception):
    """A view the agent will not publish (implausible shrink, bad sudo group)."""

    def __init__(self, info: dict):
        super().__init__(info["reason"])
        self.info = info


class Resync(Exception):
    """The stream and our view disagree: reconnect from our revision."""


class StreamEnded(Exception):
    """The server closed the stream without an error (e.g. it is shutting down)."""


class StreamIdle(Exception):
    """Nothing arrived for stream_idle_timeout seconds (heartbeats stopped)."""


class Backoff:
    """Exponential backoff with jitter: each delay is drawn from [d/2, d]."""

    def __init__(self, initial: float, maximum: float, rng: Optional[random.Random] = None):
        self.initial, self.maximum = initial, maximum
        self.current = initial
        self.rng = rng or random.Random()

    def reset(self) -> None:
        self.current = self.initial

    def next(self) -> float:
        d = self.current
        self.current = min(self.maximum, self.current * 2)
        return self.rng.uniform(d / 2, d)


def _stat_sig(*paths: Path) -> tuple:
    out = []
    for p in paths:
        try:
            st = p.stat()
            out.append((st.st_ino, st.st_size, st.st_mtime_ns))
        except OSError:
            out.append(None)
    return tuple(out)


_libc = None


def _malloc_tune() -> None:
    """glibc raises its mmap threshold after a large block is freed, so the
    next large blocks (a 10 MB snapshot, a 20 MB cache) come from the heap and
    stay there after they are freed. A fixed threshold keeps every block over
    256 KiB in its own mapping, returned to the system on free."""
    global _libc
    try:
        import ctypes
        _libc = ctypes.CDLL("libc.so.6")
        _libc.mallopt(-3, 256 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        _libc = None


def _malloc_trim() -> None:
    if _libc is not None:
        try:
            _libc.malloc_trim(0)
        except AttributeError:
            pass


def read_cache_header(path: Path) -> Optional[Header]:
    """The header of a valid cache at `path` (every block checked), else None."""
    from step_ssh.native import verify_file
    try:
        with open(path, "rb") as f:
            head = f.read(128)
        h = Header.parse(head)
    except (OSError, ValueError):
        return None
    ok, _ = verify_file(path)
    return h if ok else None


class Agent:
    def __init__(self, cfg: AgentConfig, *, notifier: Optional[Notifier] = None, accept_shrink: bool = False):
        self.cfg = cfg
        self.identity = Identity(cfg.identity)
        self.notifier = notifier or Notifier()
        self.accept_shrink = accept_shrink
        self.view: Optional[RawView] = None
        self.confirmed_at: Optional[int] = None        # last time the server confirmed self.view
        self.cache_confirmed_at: Optional[int] = None  # what the published cache says
        self.cache: dict = {}
        self.ca_keys_count: Optional[int] = None
        self.counters = dict(connects=0, connect_failures=0, snapshots=0, deltas=0, heartbeats=0, publishes=0,
                             confirm_republishes=0, refused=0, resyncs=0, renewals=0, renew_failures=0,
                             identity_reloads=0, stream_switches=0, local_republishes=0)
        self.connected = False
        self.connected_since: Optional[float] = None
        self.last_sync_at: Optional[float] = None
        self.last_error: Optional[dict] = None
        self.refused: Optional[dict] = None
        self.dropped: list[str] = []
        self.ready = False
        self.state = "starting"
        self.started_at = time.time()
        self.next_retry_at: Optional[float] = None
        self.last_publish_seconds: Optional[float] = None
        self.last_apply: Optional[dict] = None  # decode + apply + publish + persist of the last batch
        # serializes everything that reads or replaces the view and the cache
        # (the stream's worker thread vs housekeeping's republish)
        self._publish_lock = threading.RLock()
        self._held_revision: Optional[int] = None
        self._stop: Optional[asyncio.Event] = None
        self._rotate: Optional[asyncio.Event] = None
        self._local_sig = _stat_sig(cfg.passwd_file, cfg.group_file)
        self._cache_users_baseline = 0
        self._session_events = 0
        self.exit_code = 0
        self.audit: Optional[AuditShipper] = AuditShipper(cfg, self.identity) if cfg.audit.enabled else None

    # ---- lifecycle ------------------------------------------------------------------
    async def run(self) -> int:
        self._stop = asyncio.Event()
        self._rotate = asyncio.Event()
        _malloc_tune()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        await asyncio.to_thread(self._restore)
        self._load_identity(initial=True)
        self.write_status()
        tasks = [asyncio.create_task(self._watch_loop(), name="watch"),
                 asyncio.create_task(self._housekeeping(), name="housekeeping")]
        if self.identity.kind == "builtin":
            tasks.append(asyncio.create_task(self._renew_loop(), name="renew"))
        if self.audit is not None:
            tasks.append(asyncio.create_task(self.audit.run(on_change=self.write_status), name="audit"))
        for t in tasks:
            t.add_done_callback(self._task_done)
        await self._stop.wait()
        log.info("stopping")
        self.notifier.stopping()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.state = "stopped"
        self.connected = False
        self.write_status()
        self.notifier.close()
        return self.exit_code

    def _task_done(self, t: asyncio.Task) -> None:
        if t.cancelled() or self._stop is None or self._stop.is_set():
            return
        exc = t.exception()
        if exc is not None:
            log.error("internal error in the %s task, stopping (systemd restarts the agent)", t.get_name(),
                      exc_info=exc)
            self.exit_code = 1
            self._stop.set()

    def stop(self) -> None:
        if self._stop is not None:
            self._stop.set()

    # ---- persisted state ------------------------------------------------------------
    def _restore(self) -> None:
        cfg = self.cfg
        try:
            state = json.loads(cfg.state_file.read_text())
        except (OSError, ValueError):
            state = {}
        try:
            data = cfg.view_file.read_bytes()
            self.view = RawView(data)
            log.info("resuming from revision %d (%d users) persisted in %s", self.view.revision,
                     self.view.n_users, cfg.view_file)
        except FileNotFoundError:
            self.view = None
        except (OSError, WireError, Exception) as e:  # noqa: BLE001 - any damage: start over
            log.warning("ignoring the persisted view %s (%s); a full snapshot will be requested", cfg.view_file, e)
            self.view = None
        hdr = read_cache_header(cfg.cache_path)
        if hdr is not None:
            self._cache_users_baseline = hdr.n_users
            self.cache = {"path": str(cfg.cache_path), "revision": hdr.revision, "users": hdr.n_users,
                          "groups": hdr.n_groups, "published_at": hdr.generated_at,
                          "confirmed_at": hdr.confirmed_at}
            self.cache_confirmed_at = hdr.confirmed_at
        if self.view is None:
            return
        self.confirmed_at = state.get("confirmed_at") if state.get("revision") == self.view.revision else None
        if self.confirmed_at is None:
            try:
                self.confirmed_at = int(cfg.view_file.stat().st_mtime)
            except OSError:
                self.confirmed_at = 0
        if hdr is None or hdr.revision != self.view.revision:
            log.warning("the cache at %s is %s; republishing revision %d from the persisted view",
                        cfg.cache_path, "missing or invalid" if hdr is None else f"at revision {hdr.revision}",
                        self.view.revision)
            try:
                self._publish(self.view, self.confirmed_at)
            except (ViewRejected, OSError) as e:
                log.error("cannot republish the persisted view: %s", e)

    def _republish_current(self) -> bool:
        """Publish the view held now again (local accounts changed); the
        server confirmed nothing new, so confirmed_at stays."""
        with self._publish_lock:
            if self.view is None:
                return False
            self._publish(self.view, self.cache_confirmed_at)
            self._persist(view_changed=False)
            return True

    def _reload_view(self) -> Optional[RawView]:
        try:
            return RawView(self.cfg.view_file.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, WireError) as e:
            log.error("cannot re-read the persisted view %s: %s", self.cfg.view_file, e)
            return None

    def _persist(self, view_changed: bool) -> None:
        cfg = self.cfg
        if view_changed and self.view is not None:
            atomic_write(cfg.view_file, self.view.data, mode=0o600)
        state = {"revision": self.view.revision if self.view else 0, "confirmed_at": self.confirmed_at,
                 "cache_confirmed_at": self.cache_confirmed_at}
        atomic_write(cfg.state_file, json.dumps(state) + "\n", mode=0o644)

    # ---- publishing -------------------------------------------------------------------
    def _publish(self, view: RawView, confirmed_at: Optional[int], changed=_EVERYONE) -> Published:
        """Build and publish the cache (worker thread). Raises ViewRejected.

        `changed`: the user names whose access may differ from the cache in
        place (_EVERYONE: any; None: none, e.g. a confirmation), for the
        access_changed audit events."""
        cfg = self.cfg
        with self._publish_lock:
            old = None
            if self.audit is not None and cfg.audit.access_events and changed is not None:
                old = open_cache(cfg.cache_path)  # the mapping outlives the replacement
            try:
                self._local_sig = _stat_sig(cfg.passwd_file, cfg.group_file)
                local = LocalAccounts.load(cfg.passwd_file, cfg.group_file)
                res = publish_view(view, cfg.cache_path, local, cfg.min_id, confirmed_at=confirmed_at)
                self._write_ca_keys(res.ca_keys)
                if old is not None:
                    self._record_access_changes(old, None if changed is _EVERYONE else changed,
                                                res.header.revision)
            finally:
                if old is not None:
                    old.close()
        self.counters["publishes"] += 1
        self.last_publish_seconds = round(res.seconds, 4)
        h = res.header
        self.cache = {"path": str(cfg.cache_path), "revision": h.revision, "users": h.n_users,
                      "groups": h.n_groups, "published_at": h.generated_at, "confirmed_at": h.confirmed_at,
                      "max_stale_seconds": h.max_stale, "bytes": h.file_size}
        self.cache_confirmed_at = h.confirmed_at
        self._cache_users_baseline = h.n_users
        old = set(self.dropped)
        for p in res.problems:
            if p not in old:
                log.warning("NOT PUBLISHED: %s", p)
        if res.problems and len(res.problems) != len(old):
            log.warning("%d entr%s of revision %d not published (see `step-ssh status`)", len(res.problems),
                        "y" if len(res.problems) == 1 else "ies", h.revision)
        self.dropped = res.problems
        return res

    def _record_access_changes(self, old, changed, revision: int) -> None:
        new = open_cache(self.cfg.cache_path)
        if new is None:
            return
        try:
            changes = access_changes(old, new, changed)
            if changes:
                n = record_access_changes(self.cfg, changes, revision)
                self.audit.counters["access_events"] += n
        except Exception as e:  # noqa: BLE001 - auditing must never stop a publication
            log.error("cannot record access changes of revision %d: %r", revision, e)
        finally:
            new.close()

    def _write_ca_keys(self, keys: list[str]) -> None:
        path = self.cfg.trusted_user_ca_keys
        text = "".join(k + "\n" for k in keys)
        try:
            if path.read_text() == text:
                self.ca_keys_count = len(keys)
                return
        except (OSError, UnicodeDecodeError):
            pass
        atomic_write(path, text, mode=0o644)
        self.ca_keys_count = len(keys)
        log.info("wrote %d trusted SSH user CA key(s) to %s", len(keys), path)

    def confirm_interval(self) -> float:
        stale = max_stale_of(self.view) if self.view is not None else 24 * 3600
        return max(self.cfg.min_confirm_interval, stale / 8)

    # ---- applying events (worker thread) ---------------------------------------------------
    def _shrink_problem(self, old: Optional[RawView], new: RawView, intended: bool) -> Optional[str]:
        if intended:
            return None
        before = old.n_users if old is not None else self._cache_users_baseline
        after = new.n_users
        if before == 0 or after >= before:
            return None
        removed = before - after
        cfg = self.cfg
        if after == 0:
            why = f"it would remove every user ({before} -> 0)"
        elif removed >= cfg.shrink_min_users and removed / before > cfg.max_shrink_ratio:
            why = (f"it would remove {removed} of {before} users ({removed / before:.0%}; "
                   f"max_shrink_ratio is {cfg.max_shrink_ratio:.0%})")
        else:
            return None
        if self.accept_shrink:
            self.accept_shrink = False
            log.warning("accepting revision %d although %s (--accept-shrink)", new.revision, why)
            return None
        return why

    def _apply_batch(self, batch: list[bytes]) -> None:
        """Apply a burst of events, publish once. Raises Refused / Resync."""
        t0, c0 = time.perf_counter(), time.thread_time()
        if sum(len(b) for b in batch) > 1 << 20:
            _malloc_trim()  # what receiving a big message left behind, before the build
        try:
            with self._publish_lock:
                self._apply(batch)
        finally:
            self.last_apply = {"seconds": round(time.perf_counter() - t0, 4),
                               "cpu_seconds": round(time.thread_time() - c0, 4),
                               "events": len(batch), "bytes": sum(len(b) for b in batch)}

    def _apply(self, batch: list[bytes]) -> None:
        view = self.view
        changed = confirmed = False
        stop: Optional[BaseException] = None
        kinds = []
        touched: object = set()  # user names the batch may have changed (_EVERYONE after a snapshot)
        for raw in batch:
            kind, payload = decode_event(raw)
            kinds.append(kind)
            if kind == "snapshot":
                self.counters["snapshots"] += 1
                new, intended = payload
                why = self._shrink_problem(view, new, intended)
                if why:
                    stop = self._refusal(view, new, why, "snapshot")
                    break
                view, changed = new, True
                touched = _EVERYONE
            elif kind == "delta":
                self.counters["deltas"] += 1
                d: pb.Delta = payload
                cur = view.revision if view is not None else 0
                if view is None or d.base_revision != cur:
                    stop = Resync(f"a delta based on revision {d.base_revision} arrived, this host holds {cur}")
                    break
                new = view.apply_delta(d)
                why = self._shrink_problem(view, new, d.shrink_intended)
                if why:
                    stop = self._refusal(view, new, why, "delta")
                    break
                view, changed = new, True
                if touched is not _EVERYONE:
                    touched.update(u.name for u in d.upsert_users)
                    touched.update(d.remove_users)
            elif kind == "heartbeat":
                self.counters["heartbeats"] += 1
                hb: pb.Heartbeat = payload
                cur = view.revision if view is not None else None
                if hb.revision == cur:
                    confirmed = True
                else:
                    stop = Resync(f"the control plane is at revision {hb.revision}, this host holds {cur}")
                    break
        now = int(time.time())
        self.last_sync_at = time.time()
        if changed:
            users_before = self.view.n_users if self.view is not None else 0
            if self.view is not None:
                self._held_revision = self.view.revision
            # the old view is on disk (view.pb): let it go before the build, the
            # two together are what makes the peak on a large view
            self.view = None
            try:
                self._publish(view, now, touched)
            except BaseException as e:
                self.view = self._reload_view()
                if isinstance(e, ViewRejected):
                    raise Refused({"reason": "; ".join(e.problems), "revision": view.revision,
                                   "users_before": users_before, "users_after": view.n_users,
                                   "at": now}) from None
                raise
            self.view = view
            self.confirmed_at = now
            self.refused = None
            self._persist(view_changed=True)
            log.info("published revision %d: %d users, %d groups (%s, %.3fs)", view.revision,
                     self.cache.get("users", 0), self.cache.get("groups", 0), "+".join(kinds),
                     self.last_publish_seconds or 0)
            if view.n_users >= 10_000:
                _malloc_trim()  # give a big build's memory back
        elif confirmed:
            self.confirmed_at = now
            self.refused = None  # the control plane agrees with what we serve
            if self.cache_confirmed_at is None or now - self.cache_confirmed_at >= self.confirm_interval() \
                    or self.cache.get("revision") != self.view.revision:
                try:
                    self._publish(self.view, now, None)
                    self.counters["confirm_republishes"] += 1
                except ViewRejected as e:
                    log.error("cannot republish revision %d: %s", self.view.revision, e)
            self._persist(view_changed=False)
        if isinstance(stop, Refused):
            self.refused = stop.info
        if stop is not None:
            raise stop

    def _refusal(self, old: Optional[RawView], new: RawView, why: str, what: str) -> Refused:
        self.counters["refused"] += 1
        info = {"reason": f"{what} for revision {new.revision} refused: {why}, and the control plane did not "
                          "mark the shrink as intended",
                "revision": new.revision, "base_revision": old.revision if old else 0,
                "users_before": old.n_users if old else self._cache_users_baseline,
                "users_after": new.n_users, "at": int(time.time()), "kind": what}
        log.error("REFUSED %s; the cache stays at revision %s. If this is intended, remove the users at the "
                  "control plane (removals are marked intended) or restart the agent once with "
                  "--accept-shrink", info["reason"], old.revision if old else "(none)")
        return Refused(info)

    # ---- the watch loop ---------------------------------------------------------------
    def _load_identity(self, initial: bool = False) -> Optional[Material]:
        try:
            mat = self.identity.load()
        except IdentityError as e:
            self._set_error(tlsdiag.Diagnosis(e.kind, str(e), e.hint))
            return None
        if not initial:
            self.counters["identity_reloads"] += 1
        for d in tlsdiag.check_local(mat.cert_pem, mat.key_pem, mat.ca_pem, kind=mat.kind):
            log.warning("identity: %s", d.text())
        return mat

    def _set_error(self, d: tlsdiag.Diagnosis) -> None:
        new = {**d.as_dict(), "at": int(time.time())}
        same = self.last_error is not None and self.last_error.get("message") == d.message
        self.last_error = new
        if not same:
            log.error("%s", d.text())
        else:
            log.warning("still failing: %s", d.message)

    async def _watch_loop(self) -> None:
        cfg = self.cfg
        backoff = Backoff(cfg.backoff_initial, cfg.backoff_max)
        resyncs = 0
        while not self._stop.is_set():
            mat = self.identity.material
            if mat is None or self.identity.changed_on_disk():
                mat = self._load_identity() or mat
            delay: float
            if mat is None:
                delay = backoff.next()
                await self._sleep(delay, "no usable identity")
                continue
            self._rotate.clear()
            self._session_events = 0
            session = asyncio.create_task(self._session(mat))
            rot = asyncio.create_task(self._rotate.wait())
            stop = asyncio.create_task(self._stop.wait())
            done, _ = await asyncio.wait({session, rot, stop}, return_when=asyncio.FIRST_COMPLETED)
            for t in (rot, stop):
                t.cancel()
            if session not in done:
                session.cancel()
                try:
                    await session
                except (asyncio.CancelledError, Exception):  # noqa: BLE001
                    pass
                if self._stop.is_set():
                    break
                # new certificate: switch the stream now, no backoff
                self.counters["stream_switches"] += 1
                log.info("switching the stream to the new certificate")
                continue
            exc = session.exception()
            was_connected = self.connected
            self._disconnected()
            if self._session_events:
                backoff.reset()
            if isinstance(exc, Refused):
                self.refused = exc.info
                await self._sleep(cfg.refused_retry, f"refused revision {exc.info['revision']}")
                continue
            if isinstance(exc, Resync):
                resyncs += 1
                self.counters["resyncs"] += 1
                log.warning("resynchronizing: %s", exc)
                await self._sleep(0.05 if resyncs < 3 else backoff.next(), "resynchronizing")
                continue
            resyncs = 0
            if isinstance(exc, grpc.aio.AioRpcError):
                if not was_connected:
                    self.counters["connect_failures"] += 1
                d = await asyncio.to_thread(tlsdiag.diagnose_rpc, exc, cfg.server, cfg.server_name, mat,
                                            timeout=min(5.0, cfg.connect_timeout))
                self._set_error(d)
            elif isinstance(exc, StreamEnded):
                log.warning("disconnected: %s; reconnecting", exc)
            elif isinstance(exc, StreamIdle):
                log.warning("nothing from the control plane for %.0fs; reconnecting", cfg.stream_idle_timeout)
            elif exc is not None:
                log.error("watch failed unexpectedly: %r", exc, exc_info=exc)
                self._set_error(tlsdiag.Diagnosis("internal", f"internal error: {exc!r}", "the agent's log"))
            await self._sleep(backoff.next(), "reconnecting")

    async def _sleep(self, delay: float, why: str) -> None:
        self.next_retry_at = time.time() + delay
        if self.state not in ("stopped",):
            self.state = "refused" if why.startswith("refused") else "disconnected"
        self.notifier.status(self._status_line())
        self.write_status()
        try:
            await asyncio.wait_for(self._stop.wait(), timeout=delay)
        except asyncio.TimeoutError:
            pass
        self.next_retry_at = None

    def _disconnected(self) -> None:
        if self.connected:
            log.warning("disconnected from %s; serving the cache at revision %s", self.cfg.server,
                        self.cache.get("revision"))
        self.connected = False
        self.connected_since = None

    async def _session(self, mat: Material) -> None:
        """One Watch stream, until it fails (raises) or is cancelled."""
        cfg = self.cfg
        ch = rpc.aio_channel(cfg.server, mat.credentials(), cfg.server_name)
        call = None
        reader = None
        try:
            watch = ch.unary_stream(WATCH_METHOD, request_serializer=pb.WatchRequest.SerializeToString,
                                    response_deserializer=None)
            since = self.view.revision if self.view is not None else 0
            self.state = "connecting"
            call = watch(pb.WatchRequest(since_revision=since, agent_version=__version__))
            q: asyncio.Queue = asyncio.Queue()
            reader = asyncio.create_task(self._reader(call, q))
            first = True
            while True:
                item = await q.get()
                if item is _EOF:
                    raise StreamEnded("the server ended the stream, e.g. while shutting down")
                if isinstance(item, BaseException):
                    raise item
                batch = [item]
                while not q.empty():
                    nxt = q.get_nowait()
                    if nxt is _EOF or isinstance(nxt, BaseException):
                        q.put_nowait(nxt)  # handle after this batch
                        break
                    batch.append(nxt)
                self._session_events += len(batch)
                if first:
                    first = False
                    self._connected(since)
                try:
                    await asyncio.to_thread(self._apply_batch, batch)
                finally:
                    self.write_status()
                self._maybe_ready()
        finally:
            if reader is not None:
                reader.cancel()
            if call is not None:
                call.cancel()
            await ch.close()

    def _connected(self, since: int) -> None:
        """The first event of a stream arrived."""
        self.counters["connects"] += 1
        self.state = "connected"
        if self.connected:  # a certificate switch: the previous stream was up until now
            log.info("stream moved to the new certificate (watching from revision %d)", since)
            return
        self.connected = True
        self.connected_since = time.time()
        if self.last_error is not None:
            log.info("connected to %s again (watching from revision %d)", self.cfg.server, since)
        else:
            log.info("connected to %s (watching from revision %d)", self.cfg.server, since)
        self.last_error = None
        self.notifier.status(self._status_line())

    async def _reader(self, call, q: asyncio.Queue) -> None:
        idle = self.cfg.stream_idle_timeout
        try:
            while True:
                msg = await asyncio.wait_for(call.read(), timeout=idle)
                if msg is grpc.aio.EOF:
                    q.put_nowait(_EOF)
                    return
                q.put_nowait(msg)
        except asyncio.TimeoutError:
            q.put_nowait(StreamIdle())
        except grpc.aio.AioRpcError as e:
            q.put_nowait(e)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001
            q.put_nowait(e)

    def _maybe_ready(self) -> None:
        if not self.ready and self.cache.get("revision") is not None and self.view is not None \
                and self.confirmed_at is not None and self.last_sync_at is not None:
            self.ready = True
            self.write_status()
            log.info("ready: cache at revision %d confirmed by the control plane", self.view.revision)
            self.notifier.ready(self._status_line())

    # ---- certificate renewal ---------------------------------------------------------
    async def _renew_loop(self) -> None:
        while True:
            mat = self.identity.material
            if mat is None:
                await asyncio.sleep(1.0)
                continue
            due = self.identity.renew_due()
            now = time.time()
            wait = due.timestamp() - now if due else 3600
            if wait > 0:
                # re-evaluate at least hourly (the identity may be replaced meanwhile)
                await asyncio.sleep(min(wait, 3600))
                continue
            remaining = mat.not_after.timestamp() - now
            try:
                new = await self.identity.renew(self.cfg.server, self.cfg.server_name,
                                                timeout=self.cfg.connect_timeout)
            except (IdentityError, grpc.aio.AioRpcError, OSError, ValueError) as e:
                self.counters["renew_failures"] += 1
                if isinstance(e, grpc.aio.AioRpcError):
                    d = await asyncio.to_thread(tlsdiag.diagnose_rpc, e, self.cfg.server, self.cfg.server_name,
                                                mat, during="certificate renewal")
                    msg = d.text()
                else:
                    msg = str(e)
                retry = min(300.0, max(1.0, remaining / 10)) if remaining > 0 else 300.0
                log.error("certificate renewal failed (%s); the current certificate %s; retrying in %.0fs", msg,
                          f"expires in {remaining:.0f}s" if remaining > 0 else "has EXPIRED", retry)
                self.write_status()
                await asyncio.sleep(retry)
                continue
            self.counters["renewals"] += 1
            log.info("certificate renewed: valid until %s (was %s)", new.not_after.isoformat(),
                     mat.not_after.isoformat())
            self.write_status()
            self._rotate.set()

    # ---- housekeeping ---------------------------------------------------------------
    async def _housekeeping(self) -> None:
        cfg = self.cfg
        interval = cfg.check_interval
        if self.identity.kind == "files":
            interval = min(interval, cfg.identity.reload_interval)
        unstable = 0
        while True:
            await asyncio.sleep(interval)
            # a files identity rotated by its own tooling (or a re-enrollment)
            if self.identity.material is not None and self.identity.changed_on_disk():
                old = self.identity.material
                try:
                    new = self.identity.load()
                    problems = tlsdiag.check_local(new.cert_pem, new.key_pem, new.ca_pem, kind=new.kind)
                    if any(p.kind == "key_mismatch" for p in problems) and unstable < 3:
                        # probably caught between the writes of cert and key
                        unstable += 1
                        self.identity.material = old
                        continue
                    unstable = 0
                    self.counters["identity_reloads"] += 1
                    log.info("identity files changed on disk: now %s (valid until %s)",
                             new.cert.subject.rfc4514_string(), new.not_after.isoformat())
                    self._rotate.set()
                except IdentityError as e:
                    self.identity.material = old
                    log.warning("identity files changed but cannot be used (%s); keeping the loaded ones", e)
            # local accounts always win: republish when they change
            if self.view is not None and _stat_sig(cfg.passwd_file, cfg.group_file) != self._local_sig:
                log.info("%s or %s changed; republishing revision %d", cfg.passwd_file, cfg.group_file,
                         self.view.revision)
                try:
                    if await asyncio.to_thread(self._republish_current):
                        self.counters["local_republishes"] += 1
                except (ViewRejected, OSError) as e:
                    log.error("cannot republish after a local account change: %s", e)
                self.write_status()
            # systemd: do not fail the boot when the control plane is away but
            # a valid cache from an earlier run is serving logins
            if not self.ready and time.time() - self.started_at >= cfg.ready_timeout and self.cache:
                self.ready = True
                self.write_status()
                log.warning("ready after %.0fs without the control plane: serving the cache at revision %s",
                            cfg.ready_timeout, self.cache.get("revision"))
                self.notifier.ready(self._status_line())

    # ---- status -------------------------------------------------------------------
    def _status_line(self) -> str:
        rev = self.cache.get("revision")
        if self.state == "connected":
            return f"connected to {self.cfg.server}, revision {rev}, {self.cache.get('users', 0)} users"
        if self.state == "refused" and self.refused:
            return f"REFUSED revision {self.refused.get('revision')}; serving revision {rev}"
        err = (self.last_error or {}).get("message", "")
        return f"{self.state}: {err[:200]}; serving cached revision {rev}" if err else f"{self.state}"

    def status_dict(self) -> dict:
        cfg = self.cfg
        mat = self.identity.material
        frac = getattr(cfg.identity, "renew_fraction", None)
        return {
            "version": STATUS_VERSION,
            "pid": __import__("os").getpid(),
            "agent_version": __version__,
            "started_at": int(self.started_at),
            "updated_at": round(time.time(), 3),
            "state": self.state,
            "ready": self.ready,
            "server": cfg.server,
            "connected": self.connected,
            "connected_since": self.connected_since and int(self.connected_since),
            "revision": self.view.revision if self.view is not None else self._held_revision,
            "last_sync_at": self.last_sync_at and round(self.last_sync_at, 3),
            "confirmed_at": self.confirmed_at,
            "next_retry_at": self.next_retry_at and round(self.next_retry_at, 3),
            "cache": self.cache or None,
            "last_publish_seconds": self.last_publish_seconds,
            "last_apply": self.last_apply,
            "trusted_user_ca_keys": {"path": str(cfg.trusted_user_ca_keys), "keys": self.ca_keys_count},
            "confirm_interval": self.confirm_interval(),
            "counters": dict(self.counters),
            "last_error": self.last_error,
            "refused": self.refused,
            "dropped": {"count": len(self.dropped), "entries": self.dropped[:MAX_LISTED_PROBLEMS]},
            "certificate": mat.describe(frac) if mat is not None else None,
            "audit": self.audit.status() if self.audit is not None else {"enabled": False},
            "config": {"state_dir": str(cfg.state_dir), "cache_path": str(cfg.cache_path),
                       "status_file": str(cfg.status_file)},
        }

    def write_status(self) -> None:
        try:
            write_status(self.cfg.status_file, self.status_dict())
        except OSError as e:
            log.warning("cannot write the status file %s: %s", self.cfg.status_file, e)


def run_agent(cfg: AgentConfig, accept_shrink: bool = False) -> int:
    return asyncio.run(Agent(cfg, accept_shrink=accept_shrink).run())
