"""The gRPC servicers (grpc.aio), caller authentication, and the Watch hub.

Threads: the asyncio event loop serves every RPC and stream; all SQLite work
(writes, reads, view computation) runs on one dedicated thread (`DB`), so the
loop never blocks on the database and the Store needs no locking.
"""
from __future__ import annotations

import asyncio
import bisect
import datetime as dt
import functools
import secrets
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Optional

import grpc

from step_ssh import pki
from step_ssh.proto import stepssh_pb2 as pb
from step_ssh.proto import stepssh_pb2_grpc as pbg
from step_ssh.server import log, sshca
from step_ssh.server.config import ServerConfig, ServerDir
from step_ssh.server.rules import RuleError
from step_ssh.server.store import GroupIn, Store, StoreError, UserIn
from step_ssh.server.views import ComputedView, ViewEngine, _field, diff_computed, stamped
from step_ssh.wire import encode_varint

LOG = log.get("step_ssh.server")
TAIL_RECHECK_SECONDS = 30.0  # how long a revoked admin's open audit tail may idle on

ACCESS_NAMES = {pb.ACCESS_SSH: "ssh", pb.ACCESS_SUDO: "sudo"}
ACCESS_PB = {"ssh": pb.ACCESS_SSH, "sudo": pb.ACCESS_SUDO}
STATE_FLUSH_SECONDS = 0.25
VIEW_GC_SECONDS = 60.0
AUDIT_PRUNE_SECONDS = 3600.0


# ---- the database thread ----------------------------------------------------------

class DB:
    def __init__(self, path, cfg: ServerConfig, on_commit: Callable[[int, bool], None]):
        self.ex = ThreadPoolExecutor(1, thread_name_prefix="step-ssh-db")
        self.store: Store = self.ex.submit(Store, path, cfg, on_commit).result()
        self.engine = ViewEngine(self.store)

    async def run(self, fn: Callable, *args, **kw):
        return await asyncio.get_running_loop().run_in_executor(self.ex, functools.partial(fn, *args, **kw))

    def close(self) -> None:
        self.ex.submit(self.store.close).result()
        self.ex.shutdown()


# ---- callers ----------------------------------------------------------------------

@dataclass
class Caller:
    kind: str  # "host", "admin" or "anonymous"
    id: str = ""
    serial: str = ""
    why: str = ""  # for anonymous: why no identity

    def __str__(self) -> str:
        return f"{self.kind}:{self.id}" if self.id else self.kind


def _expired(c: "Caller") -> Optional[str]:
    """"expired at …" when the caller's certificate is past its notAfter."""
    na = getattr(c, "_not_after", None)
    if na is not None and na < dt.datetime.now(dt.timezone.utc):
        return f"expired at {na.isoformat()}"
    return None


class Auth:
    """Identity from the verified client certificate only (DESIGN.md invariant 5).

    The TLS layer accepts certificates from this control plane's CA and from
    the public enrollment bootstrap CA (see pki.bootstrap_ca_pem). Only
    certificates signed directly by our CA carry identity; host certificates
    must also be the host's current one (revocation on `host rm`, renewal and
    re-enrollment)."""

    def __init__(self, ca_pem: bytes, db: DB):
        self.ca = pki.load_cert(ca_pem)
        self.db = db
        self._cache: OrderedDict[bytes, Caller] = OrderedDict()

    def _parse(self, pem: bytes) -> Caller:
        cached = self._cache.get(pem)
        if cached is not None:
            self._cache.move_to_end(pem)
            return cached
        try:
            cert = pki.load_cert(pem)
        except ValueError:
            return Caller("anonymous", why="the client certificate could not be parsed")
        if not pki.verify_issued_by(cert, self.ca):
            c = Caller("anonymous", why="the client certificate is not issued by this control plane's CA "
                                        "(only the enrollment bootstrap certificate is, and it may only call Enroll)")
        else:
            ident = pki.identity_of(cert)
            if ident is None:
                c = Caller("anonymous", why="the client certificate has no stepssh:// URI SAN naming a host or admin")
            else:
                c = Caller(ident[0], ident[1], pki.serial_hex(cert))
                c._not_after = cert.not_valid_after_utc  # type: ignore[attr-defined]
        self._cache[pem] = c
        if len(self._cache) > 8192:
            self._cache.popitem(last=False)
        return c

    def identify(self, ctx) -> Caller:
        pems = ctx.auth_context().get("x509_pem_cert") or []
        if not pems:
            return Caller("anonymous", why="no client certificate was presented")
        c = self._parse(pems[0])
        expired = _expired(c)
        return Caller("anonymous", why=f"the client certificate {expired}") if expired else c

    async def host(self, ctx) -> Caller:
        c = self.identify(ctx)
        if c.kind == "anonymous":
            await ctx.abort(grpc.StatusCode.UNAUTHENTICATED,
                            f"{c.why}; this call needs the host's certificate (enroll the host first: "
                            "`step-ssh enroll`)")
        if c.kind != "host":
            await ctx.abort(grpc.StatusCode.PERMISSION_DENIED,
                            f"this call is for hosts; the certificate identifies {c} (use `step-ssh-ctl` admin "
                            "commands instead)")
        current = await self.db.run(self.db.store.host_auth, c.id)
        if current is None:
            await ctx.abort(grpc.StatusCode.UNAUTHENTICATED,
                            f"host {c.id} has been removed from the control plane (its certificate is revoked); "
                            "enroll it again with a new token")
        if current != c.serial:
            await ctx.abort(grpc.StatusCode.UNAUTHENTICATED,
                            f"certificate serial {c.serial} is no longer valid for host {c.id} (it was renewed "
                            "or the host re-enrolled); use the newest certificate in the identity directory")
        return c

    async def admin(self, ctx) -> Caller:
        c = self.identify(ctx)
        if c.kind == "anonymous":
            await ctx.abort(grpc.StatusCode.UNAUTHENTICATED,
                            f"{c.why}; admin calls need an admin certificate (an admin profile from "
                            "`step-ssh-server init` or `step-ssh-server profile`)")
        if c.kind != "admin":
            await ctx.abort(grpc.StatusCode.PERMISSION_DENIED,
                            f"a host certificate ({c}) cannot call admin RPCs; use an admin profile")
        await self.recheck_admin(ctx, c)
        return c

    async def recheck_admin(self, ctx, c: Caller) -> None:
        """Abort unless the admin certificate is still unrevoked and unexpired:
        at every call (identify checked the expiry just before) and again and
        again on long streams (audit tail)."""
        revoked = await self.db.run(self.db.store.cert_revoked_at, c.serial)
        if revoked is not None:
            when = dt.datetime.fromtimestamp(revoked, dt.timezone.utc).isoformat()
            await ctx.abort(grpc.StatusCode.UNAUTHENTICATED,
                            f"the admin certificate of {c} (serial {c.serial}) was revoked at {when}; "
                            "ask for a new profile (`step-ssh-server profile`)")
        expired = _expired(c)
        if expired:
            await ctx.abort(grpc.StatusCode.UNAUTHENTICATED, f"the admin certificate of {c} {expired}; "
                            "ask for a new profile (`step-ssh-server profile`)")


def rpc(kind: str):
    """Authenticate (kind: host/admin/none), map store errors to statuses, log."""

    def deco(fn):
        @functools.wraps(fn)
        async def wrapper(self, request, context):
            t0 = time.perf_counter()
            caller = None
            code = "OK"
            try:
                caller = self.auth.identify(context)
                if kind == "host":
                    caller = await self.auth.host(context)
                elif kind == "admin":
                    caller = await self.auth.admin(context)
                return await fn(self, request, context, caller)
            except (StoreError, RuleError) as e:
                code = e.code
                await context.abort(grpc.StatusCode[e.code], e.message)
            except asyncio.CancelledError:
                code = "CANCELLED"
                raise
            except Exception as e:
                if isinstance(e, grpc.aio.AbortError) or type(e).__name__ == "AbortError":
                    code = context.code().name if context.code() else "ABORTED"
                    raise
                code = "INTERNAL"
                LOG.exception("rpc failed", extra={"method": fn.__name__, "caller": str(caller)})
                await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {fn.__name__}: {e}")
            finally:
                LOG.info("rpc", extra={"method": fn.__name__, "caller": str(caller), "code": code,
                                       "ms": round((time.perf_counter() - t0) * 1000, 2)})
        return wrapper
    return deco


# ---- the hub: revisions and watchers ------------------------------------------------

@dataclass(eq=False)
class Watcher:
    host_id: str
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    superseded: bool = False
    sent_revision: int = 0


class Hub:
    def __init__(self, cfg: ServerConfig):
        self.cfg = cfg
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self.gen = 0
        self.revision = 0
        self.removals: list[int] = []
        self.watchers: dict[str, Watcher] = {}
        self.tails: set[asyncio.Event] = set()
        self.stopping = False
        self.pending_state: dict[str, tuple[int, str, bytes]] = {}
        self.pending_touch: dict[str, dict] = {}
        self._delta_cache: OrderedDict = OrderedDict()

    # called on the DB thread after every committed revision bump
    def on_commit(self, rev: int, removal: bool) -> None:
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self._bumped, rev, removal)

    def _bumped(self, rev: int, removal: bool) -> None:
        self.revision = max(self.revision, rev)
        if removal:
            bisect.insort(self.removals, rev)
        self.gen += 1
        for w in self.watchers.values():
            w.wake.set()

    def removal_between(self, after: int, upto: int) -> bool:
        """Was anything removed by an admin (or host re-registration) in (after, upto]?"""
        i = bisect.bisect_right(self.removals, after)
        return i < len(self.removals) and self.removals[i] <= upto

    def attach(self, host_id: str) -> Watcher:
        old = self.watchers.get(host_id)
        if old is not None:
            old.superseded = True
            old.wake.set()
        w = self.watchers[host_id] = Watcher(host_id)
        return w

    def detach(self, w: Watcher) -> None:
        if self.watchers.get(w.host_id) is w:
            del self.watchers[w.host_id]

    def audit_arrived(self) -> None:
        for e in self.tails:
            e.set()

    def stop(self) -> None:
        self.stopping = True
        for w in self.watchers.values():
            w.wake.set()
        for e in self.tails:
            e.set()

    def delta_event(self, old: ComputedView, new: ComputedView, base: int, rev: int, shrink: bool) -> bytes:
        """An encoded WatchEvent{delta}: a thousand hosts moving between the
        same two views at the same revisions cost one diff and one encoding."""
        key = (old.hash, new.hash, base, rev, shrink)
        b = self._delta_cache.get(key)
        if b is None:
            d = diff_computed(old, new)
            d.base_revision, d.revision, d.shrink_intended = base, rev, shrink
            b = self._delta_cache[key] = pb.WatchEvent(delta=d).SerializeToString()
            if len(self._delta_cache) > 256:
                self._delta_cache.popitem(last=False)
        else:
            self._delta_cache.move_to_end(key)
        return b


def snapshot_event(cv: ComputedView, rev: int, shrink: bool) -> bytes:
    """WatchEvent{snapshot{view{revision, <cached view bytes>}, shrink_intended}},
    encoded without building the (possibly 100k-user) message."""
    view = (b"\x08" + encode_varint(rev) if rev else b"") + cv.blob
    snap = _field(b"\x0a", view) + (b"\x10\x01" if shrink else b"")
    return _field(b"\x0a", snap)


def _raw_or_serialize(msg) -> bytes:
    return msg if isinstance(msg, (bytes, bytearray)) else msg.SerializeToString()


def add_service(servicer, server, name: str, raw_responses: tuple = ()) -> None:
    """Register `servicer` for service `name` of stepssh.proto (like the
    generated add_*_to_server), letting the methods in `raw_responses` yield
    pre-encoded bytes."""
    sd = pb.DESCRIPTOR.services_by_name[name]
    handlers = {}
    for m in sd.methods:
        req, resp = getattr(pb, m.input_type.name), getattr(pb, m.output_type.name)
        ser = _raw_or_serialize if m.name in raw_responses else resp.SerializeToString
        make = grpc.unary_stream_rpc_method_handler if m.server_streaming else grpc.unary_unary_rpc_method_handler
        handlers[m.name] = make(getattr(servicer, m.name), request_deserializer=req.FromString,
                                response_serializer=ser)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(sd.full_name, handlers),))
    if hasattr(server, "add_registered_method_handlers"):
        server.add_registered_method_handlers(sd.full_name, handlers)


# ---- host-facing service ------------------------------------------------------------

class HostService(pbg.HostServiceServicer):
    def __init__(self, app: "App"):
        self.app = app
        self.auth = app.auth
        self.db = app.db
        self.hub = app.hub

    @rpc("none")
    async def Enroll(self, req: pb.EnrollRequest, ctx, caller: Caller):
        if not req.token:
            raise StoreError("INVALID_ARGUMENT", "an enrollment token is required (`step-ssh-server token`)")
        app = self.app
        res = await self.db.run(self.db.store.enroll, req.token, bytes(req.csr_pem), req.agent_version[:64],
                                app.ca_pem, app.ca_key, dt.timedelta(hours=app.cfg.host_cert_hours))
        LOG.info("host enrolled", extra={"host_id": res["host_id"], "hostname": res["hostname"]})
        return pb.EnrollResponse(host_id=res["host_id"], certificate_pem=res["certificate_pem"], ca_pem=app.ca_pem,
                                 hostname=res["hostname"], tags=res["tags"])

    @rpc("host")
    async def Renew(self, req: pb.RenewRequest, ctx, caller: Caller):
        app = self.app
        cert = await self.db.run(self.db.store.renew, caller.id, bytes(req.csr_pem), app.ca_pem, app.ca_key,
                                 dt.timedelta(hours=app.cfg.host_cert_hours))
        LOG.info("host certificate renewed", extra={"host_id": caller.id})
        return pb.RenewResponse(certificate_pem=cert)

    @rpc("host")
    async def Register(self, req: pb.RegisterRequest, ctx, caller: Caller):
        h = await self.db.run(self.db.store.register_host, caller.id, req.hostname, dict(req.tags),
                              req.is_bastion, list(req.bastions), req.agent_version)
        return pb.RegisterResponse(host=self.app.host_pb(h))

    @rpc("host")
    async def ReportAudit(self, req: pb.ReportAuditRequest, ctx, caller: Caller):
        now_us = int(time.time() * 1_000_000)
        host = await self.db.run(self.db.store.find_host, caller.id)
        hostname = host["hostname"] if host else ""
        rows = []
        for e in req.events:
            if not e.id or len(e.id) > 128:
                LOG.warning("audit event without a usable id dropped", extra={"host_id": caller.id})
                continue
            ev = pb.AuditEvent()
            ev.CopyFrom(e)
            ev.host_id, ev.hostname, ev.received_us = caller.id, hostname, now_us
            rows.append((ev.id, ev.type, ev.user, ev.time_us or now_us, ev.SerializeToString()))
        ids = await self.db.run(self.db.store.store_audit, caller.id, hostname, rows, now_us) if rows else []
        if ids:
            self.hub.audit_arrived()
        return pb.ReportAuditResponse(acknowledged_ids=ids)

    async def Watch(self, req: pb.WatchRequest, ctx):
        """Snapshot when needed, then deltas as revisions happen, heartbeats in between."""
        caller = await self.auth.host(ctx)
        hub, db = self.hub, self.db
        host_id = caller.id
        w = hub.attach(host_id)
        since = req.since_revision
        LOG.info("watch opened", extra={"host_id": host_id, "since": since, "agent_version": req.agent_version})
        hub.pending_touch.setdefault(host_id, {}).update(
            {"last_seen": int(time.time()), "applied_revision": since,
             **({"agent_version": req.agent_version[:64]} if req.agent_version else {})})
        reason = "client went away"
        try:
            gen = hub.gen
            rev, host, cv = await db.run(db.engine.host_view, host_id)
            if host is None:
                reason = "host removed"
                await ctx.abort(grpc.StatusCode.UNAUTHENTICATED, f"host {host_id} has been removed; enroll again")
            state = await db.run(db.store.host_state, host_id)
            if since == 0:
                first, kind = snapshot_event(cv, rev, False), "snapshot"
                cur_rev = rev
            elif since > rev:
                LOG.warning("host claims a revision newer than the server's (database restored or replaced?); "
                            "sending a snapshot not marked as an intended shrink",
                            extra={"host_id": host_id, "since": since, "revision": rev})
                first, kind = snapshot_event(cv, rev, False), "snapshot"
                cur_rev = rev
            elif state is not None and state[0] == since:
                if state[1] == cv.hash:
                    first = pb.WatchEvent(heartbeat=pb.Heartbeat(revision=since, server_time=int(time.time())))
                    kind, cur_rev = "heartbeat", since
                else:
                    first = hub.delta_event(ComputedView.from_blob(state[2]), cv, since, rev,
                                            hub.removal_between(since, rev))
                    kind, cur_rev = "delta", rev
            else:
                first = snapshot_event(cv, rev, hub.removal_between(since, rev))
                kind, cur_rev = "snapshot", rev
            yield first
            LOG.info("watch sent", extra={"host_id": host_id, "event": kind, "revision": cur_rev,
                                          "users": len(cv.user_bytes)})
            cur = cv
            w.sent_revision = cur_rev
            hub.pending_state[host_id] = (cur_rev, cv.hash, cv.blob)
            hb = self.app.cfg.heartbeat_seconds
            next_hb = time.monotonic() + hb
            while True:
                if hub.gen == gen and not hub.stopping and not w.superseded:
                    try:
                        await asyncio.wait_for(w.wake.wait(), timeout=max(0.0, next_hb - time.monotonic()))
                    except asyncio.TimeoutError:
                        pass
                    w.wake.clear()
                if hub.stopping:
                    reason = "server shutting down"
                    ctx.set_trailing_metadata((("step-ssh-reason", "shutdown"),))
                    return
                if w.superseded:
                    reason = "superseded"
                    await ctx.abort(grpc.StatusCode.ABORTED,
                                    "a newer Watch from the same host replaced this stream (two machines sharing "
                                    "one identity would cause this repeatedly)")
                if hub.gen != gen:
                    gen = hub.gen
                    rev, host, cv = await db.run(db.engine.host_view, host_id)
                    if host is None:
                        reason = "host removed"
                        await ctx.abort(grpc.StatusCode.UNAUTHENTICATED,
                                        f"host {host_id} has been removed from the control plane; enroll again")
                    if cv.hash != cur.hash:
                        yield hub.delta_event(cur, cv, cur_rev, rev, hub.removal_between(cur_rev, rev))
                        cur, cur_rev = cv, rev
                        w.sent_revision = rev
                        hub.pending_state[host_id] = (rev, cv.hash, cv.blob)
                        next_hb = time.monotonic() + hb
                        continue
                if time.monotonic() >= next_hb:
                    yield pb.WatchEvent(heartbeat=pb.Heartbeat(revision=cur_rev, server_time=int(time.time())))
                    hub.pending_touch.setdefault(host_id, {})["last_seen"] = int(time.time())
                    next_hb = time.monotonic() + hb
        finally:
            hub.detach(w)
            LOG.info("watch closed", extra={"host_id": host_id, "reason": reason})


# ---- admin-facing service -----------------------------------------------------------

def user_in(m: pb.DirectoryUser) -> UserIn:
    return UserIn(name=m.name, uid=m.uid, gid=m.gid, gecos=m.gecos, shell=m.shell, email=m.email,
                  principals=list(m.principals), active=m.active, home=m.home)


def user_pb(u: dict) -> pb.DirectoryUser:
    return pb.DirectoryUser(name=u["name"], uid=u["uid"], gid=u["gid"], gecos=u["gecos"], shell=u["shell"],
                            email=u["email"], principals=u["principals"], active=u["active"], home=u["home"])


def group_pb(g: dict) -> pb.DirectoryGroup:
    return pb.DirectoryGroup(name=g["name"], gid=g["gid"], members=g["members"])


def scim_token_pb(t: dict) -> pb.ScimToken:
    return pb.ScimToken(id=t["id"], name=t["name"], token=t.get("token", ""), created_at=t["created_at"],
                        last_used_at=t["last_used_at"], revoked_at=t["revoked_at"])


def grant_pb(g: dict) -> pb.Grant:
    return pb.Grant(id=g["id"], group=g["group"], tags=g["tags"], access=ACCESS_PB[g["access"]])


class AdminService(pbg.AdminServiceServicer):
    def __init__(self, app: "App"):
        self.app = app
        self.auth = app.auth
        self.db = app.db
        self.hub = app.hub
        self.s = app.db.store

    async def _run(self, fn, *a, **kw):
        return await self.db.run(fn, *a, **kw)

    @rpc("admin")
    async def CreateUser(self, req, ctx, caller):
        u = user_in(req)
        u.active = True  # a new user is active; deactivate through directory import
        return user_pb(await self._run(self.s.create_user, u, actor=str(caller)))

    @rpc("admin")
    async def DeleteUser(self, req, ctx, caller):
        return pb.Revision(revision=await self._run(self.s.delete_user, req.name, actor=str(caller)))

    @rpc("admin")
    async def ListUsers(self, req, ctx, caller):
        return pb.UserList(users=[user_pb(u) for u in await self._run(self.s.list_users)])

    @rpc("admin")
    async def CreateGroup(self, req, ctx, caller):
        g = GroupIn(req.name, req.gid, list(req.members))
        return group_pb(await self._run(self.s.create_group, g, actor=str(caller)))

    @rpc("admin")
    async def DeleteGroup(self, req, ctx, caller):
        rev, grants = await self._run(self.s.delete_group, req.name, actor=str(caller))
        if grants:
            LOG.info("grants removed with their group", extra={"group": req.name, "grants": grants})
        return pb.Revision(revision=rev)

    @rpc("admin")
    async def AddMember(self, req, ctx, caller):
        return pb.Revision(revision=await self._run(self.s.add_member, req.group, req.user, actor=str(caller)))

    @rpc("admin")
    async def RemoveMember(self, req, ctx, caller):
        return pb.Revision(revision=await self._run(self.s.remove_member, req.group, req.user, actor=str(caller)))

    @rpc("admin")
    async def ListGroups(self, req, ctx, caller):
        return pb.GroupList(groups=[group_pb(g) for g in await self._run(self.s.list_groups)])

    @rpc("admin")
    async def ImportDirectory(self, req, ctx, caller):
        users = [user_in(u) for u in req.users]
        groups = [GroupIn(g.name, g.gid, list(g.members)) for g in req.groups]
        res = await self._run(self.s.import_directory, users, groups, req.prune, actor=str(caller))
        for w in res["warnings"]:
            LOG.warning("directory import", extra={"warning": w})
        return pb.ImportResult(revision=res["revision"], warnings=res["warnings"],
                               **{k: v for k, v in res.items() if k not in ("warnings", "revision")})

    @rpc("admin")
    async def AddGrant(self, req, ctx, caller):
        if req.access not in ACCESS_NAMES:
            raise StoreError("INVALID_ARGUMENT", "access must be ACCESS_SSH or ACCESS_SUDO")
        g = await self._run(self.s.add_grant, req.group, dict(req.tags), ACCESS_NAMES[req.access], actor=str(caller))
        return grant_pb(g)

    @rpc("admin")
    async def ListGrants(self, req, ctx, caller):
        return pb.GrantList(grants=[grant_pb(g) for g in await self._run(self.s.list_grants)])

    @rpc("admin")
    async def RemoveGrant(self, req, ctx, caller):
        return pb.Revision(revision=await self._run(self.s.remove_grant, req.id, actor=str(caller)))

    @rpc("admin")
    async def ListHosts(self, req, ctx, caller):
        return pb.HostList(hosts=[self.app.host_pb(h) for h in await self._run(self.s.list_hosts)])

    @rpc("admin")
    async def GetHost(self, req, ctx, caller):
        return self.app.host_pb(await self._run(self.s.get_host, req.name))

    @rpc("admin")
    async def TagHost(self, req, ctx, caller):
        return self.app.host_pb(await self._run(self.s.tag_host, req.host, dict(req.tags), actor=str(caller)))

    @rpc("admin")
    async def UntagHost(self, req, ctx, caller):
        return self.app.host_pb(await self._run(self.s.untag_host, req.host, list(req.keys), actor=str(caller)))

    @rpc("admin")
    async def DeleteHost(self, req, ctx, caller):
        rev = await self._run(self.s.delete_host, req.name, actor=str(caller))
        return pb.Revision(revision=rev)

    @rpc("admin")
    async def GetHostView(self, req, ctx, caller):
        h = await self._run(self.s.get_host, req.name)
        rev, _, cv = await self._run(self.db.engine.host_view, h["id"])
        if cv is None:
            raise StoreError("NOT_FOUND", f"host {req.name} was removed")
        return stamped(cv, rev)

    @rpc("admin")
    async def CreateEnrollToken(self, req, ctx, caller):
        ttl = req.ttl_seconds or self.app.cfg.token_ttl_seconds
        token, exp = await self._run(self.s.create_token, req.hostname, dict(req.tags), ttl)
        LOG.info("enrollment token created", extra={"hostname": req.hostname, "expires_at": exp, "by": str(caller)})
        return pb.TokenResponse(token=token, expires_at=exp)

    @rpc("admin")
    async def AddUserCA(self, req, ctx, caller):
        key = sshca.normalize(req.public_key)
        ca_id = sshca.fingerprint(key)
        parts = key.split(None, 2)
        comment = req.comment or (parts[2] if len(parts) > 2 else "")
        r = await self._run(self.s.add_user_ca, ca_id, key, comment or "", actor=str(caller))
        return pb.UserCA(id=r["id"], public_key=r["public_key"], comment=r["comment"])

    @rpc("admin")
    async def ListUserCAs(self, req, ctx, caller):
        return pb.UserCAList(cas=[pb.UserCA(id=c["id"], public_key=c["public_key"], comment=c["comment"])
                                  for c in await self._run(self.s.list_user_cas)])

    @rpc("admin")
    async def RemoveUserCA(self, req, ctx, caller):
        return pb.Revision(revision=await self._run(self.s.remove_user_ca, req.id, actor=str(caller)))

    @rpc("admin")
    async def SignUserKey(self, req, ctx, caller):
        cfg = self.app.cfg
        ttl = req.ttl_seconds or cfg.ssh_cert_default_ttl
        if ttl < 60 or ttl > cfg.ssh_cert_max_ttl:
            raise StoreError("INVALID_ARGUMENT", f"certificate lifetime must be between 60 s and "
                             f"{cfg.ssh_cert_max_ttl} s (ssh_cert_max_ttl in server.yaml)")
        user, principals = await self._run(self.s.user_principals, req.user)
        if not user["active"]:
            raise StoreError("FAILED_PRECONDITION", f"user {req.user} is deactivated")
        serial = secrets.randbits(63)
        cert, valid_before = await asyncio.to_thread(
            sshca.sign, self.app.dir.ssh_ca_key, req.public_key, identity=f"step-ssh:{req.user}:{serial:x}",
            principals=principals, ttl=ttl, serial=serial)
        LOG.info("ssh certificate signed", extra={"user": req.user, "principals": principals, "serial": serial,
                                                  "valid_before": valid_before, "by": str(caller)})
        return pb.SignResponse(certificate=cert, principals=principals, valid_before=valid_before)

    @rpc("admin")
    async def ListAudit(self, req, ctx, caller):
        limit = min(req.limit or 100, 10000)
        rows = await self._run(self.s.list_audit, req.host, req.user, req.type, req.since_us, limit)
        return pb.AuditList(events=[pb.AuditEvent.FromString(b) for _, b in rows])

    @rpc("admin")
    async def CreateScimToken(self, req, ctx, caller):
        t = await self._run(self.app.scim_directory.create_token, req.name)
        LOG.info("scim token created", extra={"token_id": t["id"], "token_name": t["name"], "by": str(caller)})
        return scim_token_pb(t)

    @rpc("admin")
    async def ListScimTokens(self, req, ctx, caller):
        return pb.ScimTokenList(tokens=[scim_token_pb(t) for t in
                                        await self._run(self.app.scim_directory.list_tokens)])

    @rpc("admin")
    async def RevokeScimToken(self, req, ctx, caller):
        t = await self._run(self.app.scim_directory.revoke_token, req.id)
        LOG.info("scim token revoked", extra={"token_id": t["id"], "token_name": t["name"], "by": str(caller)})
        return scim_token_pb(t)

    async def TailAudit(self, req, ctx):
        caller = await self.auth.admin(ctx)
        ev = asyncio.Event()
        self.hub.tails.add(ev)
        try:
            # Follow by arrival (seq), not by event time: events a host ships
            # after an outage are older than ones already shown.
            last = await self._run(self.s.max_audit_seq)
            if not req.no_backlog:
                rows = await self._run(self.s.list_audit, req.host, req.user, req.type, req.since_us,
                                       min(req.limit or 100, 10000))
                for seq, b in rows:
                    if seq <= last:
                        yield pb.AuditEvent.FromString(b)
            while not self.hub.stopping:
                try:
                    await asyncio.wait_for(ev.wait(), timeout=TAIL_RECHECK_SECONDS)
                except asyncio.TimeoutError:
                    await self.auth.recheck_admin(ctx, caller)  # a revoked admin's tail ends within this
                    continue
                ev.clear()
                await self.auth.recheck_admin(ctx, caller)
                while True:
                    rows = await self._run(self.s.list_audit, req.host, req.user, req.type, req.since_us, 1000,
                                           after_seq=last)
                    for seq, b in rows:
                        last = seq
                        yield pb.AuditEvent.FromString(b)
                    if len(rows) < 1000:
                        break
        finally:
            self.hub.tails.discard(ev)


# ---- the application ----------------------------------------------------------------

class App:
    def __init__(self, server_dir: ServerDir, cfg: Optional[ServerConfig] = None):
        self.dir = server_dir
        server_dir.check()
        self.cfg = cfg or server_dir.load_config()
        self.ca_pem = server_dir.ca_cert.read_bytes()
        self.ca_key = server_dir.ca_key.read_bytes()
        self.hub = Hub(self.cfg)
        self.db = DB(server_dir.db, self.cfg, self.hub.on_commit)
        self.auth = Auth(self.ca_pem, self.db)
        self.server: Optional[grpc.aio.Server] = None
        self.port = 0
        self._flusher: Optional[asyncio.Task] = None
        from step_ssh.server.scim.directory import Directory  # SCIM resources and tokens (docs/scim.md)
        self.scim_directory = self.db.ex.submit(Directory, self.db.store).result()
        self.scim = None  # step_ssh.server.scim.http.ScimService while serving
        self.scim_port = 0

    def host_pb(self, h: dict) -> pb.Host:
        w = self.hub.watchers.get(h["id"])
        return pb.Host(id=h["id"], hostname=h["hostname"], tags=h["tags"], is_bastion=h["is_bastion"],
                       bastions=h["bastions"], last_seen=h["last_seen"], agent_version=h["agent_version"],
                       certificate_serial=h["certificate_serial"], applied_revision=h["applied_revision"],
                       connected=w is not None, sent_revision=w.sent_revision if w else 0,
                       cert_not_after=h["cert_not_after"])

    async def start(self, listen: str) -> int:
        self.hub.loop = asyncio.get_running_loop()
        self.hub.revision = await self.db.run(self.db.store.revision)
        self.hub.removals = await self.db.run(self.db.store.removal_revisions)
        await self.db.run(self.db.store.gc_views)
        opts = [
            ("grpc.max_send_message_length", -1),
            ("grpc.max_receive_message_length", 256 * 1024 * 1024),
            ("grpc.keepalive_time_ms", 60_000),
            ("grpc.keepalive_timeout_ms", 20_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.so_reuseport", 0),
        ]
        self.server = grpc.aio.server(options=opts, maximum_concurrent_rpcs=None)
        add_service(HostService(self), self.server, "HostService", raw_responses=("Watch",))
        add_service(AdminService(self), self.server, "AdminService")
        chain = self.dir.server_cert.read_bytes()
        if self.ca_pem not in chain:
            chain = chain + self.ca_pem  # the CA in the chain lets enrolling hosts pin it by fingerprint
        creds = grpc.ssl_server_credentials([(self.dir.server_key.read_bytes(), chain)],
                                            root_certificates=self.ca_pem + pki.bootstrap_ca_pem(),
                                            require_client_auth=True)
        self.port = self.server.add_secure_port(listen, creds)
        if self.port == 0:
            raise OSError(f"cannot listen on {listen} (address in use or not available)")
        await self.server.start()
        await self.prune_audit()
        self._flusher = asyncio.create_task(self._flush_loop())
        return self.port

    async def prune_audit(self) -> int:
        """Apply `audit_retention_days` (0: keep everything)."""
        days = self.cfg.audit_retention_days
        if not days:
            return 0
        cutoff_us = int((time.time() - days * 86400) * 1_000_000)
        n = await self.db.run(self.db.store.prune_audit, cutoff_us)
        if n:
            LOG.info("audit events pruned", extra={"count": n, "retention_days": days,
                                                   "older_than": dt.datetime.fromtimestamp(
                                                       cutoff_us / 1e6, dt.timezone.utc).isoformat()})
        return n

    async def start_scim(self, listen: str) -> int:
        """Serve SCIM over HTTPS on `listen` (HOST:PORT, port 0 picks one)."""
        from step_ssh.server.scim.http import ScimService
        cert, key = self.cfg.scim_tls_cert, self.cfg.scim_tls_key
        if cert:
            cert, key = str(self.dir.root / cert), str(self.dir.root / key)  # absolute paths stay as they are
        else:
            cert, key = str(self.dir.server_cert), str(self.dir.server_key)
        scim = ScimService(self)
        self.scim_port = await scim.start(listen, cert, key)
        self.scim = scim
        return self.scim_port

    async def flush(self) -> None:
        hub = self.hub
        if hub.pending_state:
            states = [(h, *s) for h, s in hub.pending_state.items()]
            hub.pending_state = {}
            await self.db.run(self.db.store.save_host_states, states)
        if hub.pending_touch:
            touch, hub.pending_touch = hub.pending_touch, {}
            await self.db.run(self.db.store.touch_hosts, touch)

    async def _flush_loop(self) -> None:
        n = 0
        while True:
            await asyncio.sleep(STATE_FLUSH_SECONDS)
            n += 1
            try:
                await self.flush()
                if n % int(VIEW_GC_SECONDS / STATE_FLUSH_SECONDS) == 0:
                    await self.db.run(self.db.store.gc_views)  # views no host holds any more
                if n % int(AUDIT_PRUNE_SECONDS / STATE_FLUSH_SECONDS) == 0:
                    await self.prune_audit()
            except Exception:
                LOG.exception("saving host sync state failed")

    async def stop(self, grace: float = 5.0) -> None:
        if self.scim is not None:
            await self.scim.stop()
        self.hub.stop()
        if self.server is not None:
            await self.server.stop(grace)
        if self._flusher is not None:
            self._flusher.cancel()
        await self.flush()
        self.db.close()
