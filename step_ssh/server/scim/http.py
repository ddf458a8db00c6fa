"""The SCIM 2.0 HTTPS endpoint (RFC 7644): a Starlette app served by uvicorn
on the control plane's event loop, next to the gRPC server.

Every request needs `Authorization: Bearer <token>` (tokens from
`step-ssh-ctl scim token create`, stored as sha256). Database work goes to the
same single DB thread as gRPC, so SCIM writes are ordered with every other
change and wake Watch streams the same way. Errors are SCIM Error messages.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
import time
from typing import TYPE_CHECKING, Any, Optional

from pydantic import ValidationError
from scim2_models import Context, Error, PatchOp, SCIMException, SearchRequest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from step_ssh.server import log
from step_ssh.server.scim import schema as S
from step_ssh.server.scim.directory import Directory

if TYPE_CHECKING:
    from step_ssh.server.service import App

LOG = log.get("step_ssh.server.scim")
PREFIX = "/scim/v2"
MEDIA = "application/scim+json"


class ScimError(Exception):
    def __init__(self, status: int, detail: str, scim_type: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(detail)
        self.status, self.detail, self.scim_type, self.headers = status, detail, scim_type, headers or {}


def _json(body: Any, status: int = 200, headers: Optional[dict] = None) -> Response:
    return Response(json.dumps(body, separators=(",", ":")), status_code=status, media_type=MEDIA, headers=headers)


def error_response(status: int, detail: str, scim_type: Optional[str] = None,
                   headers: Optional[dict] = None) -> Response:
    body = {"schemas": [S.ERROR_URN], "status": str(status)}
    if scim_type:
        body["scimType"] = scim_type
    body["detail"] = detail
    return _json(body, status, headers)


def _validation_error(e: ValidationError) -> ScimError:
    errors = Error.from_validation_errors(e)
    first = errors[0]
    detail = "; ".join(dict.fromkeys(x.detail or "" for x in errors))
    return ScimError(int(first.status or 400), detail, first.scim_type or "invalidValue")


# ---- response projection (attributes / excludedAttributes, RFC 7644 §3.9) ----------------

def _split_attrs(value: Optional[str]) -> list[str]:
    return [p.strip() for p in (value or "").split(",") if p.strip()]


def _parse_attr(text: str, core: str, urns: tuple[str, ...]) -> tuple[str, Optional[str], Optional[str]]:
    """'urn:..:User:name.givenName' -> (urn, 'name', 'givenName'); a bare URN -> (urn, None, None)."""
    low = text.lower()
    for urn in sorted((core, *urns), key=len, reverse=True):
        u = urn.lower()
        if low == u:
            return urn, None, None
        if low.startswith(u + ":"):
            text = text[len(urn) + 1:]
            attr, _, sub = text.partition(".")
            return urn, attr, sub or None
    attr, _, sub = text.partition(".")
    return core, attr, sub or None


def _find(d: dict, key: str) -> Optional[str]:
    low = key.lower()
    return next((k for k in d if k.lower() == low), None)


def project(doc: dict, attributes: list[str], excluded: list[str], core: str, urns: tuple[str, ...]) -> dict:
    if not attributes and not excluded:
        return doc
    if attributes:
        out: dict[str, Any] = {"schemas": doc["schemas"], "id": doc["id"]}
        for a in attributes:
            urn, attr, sub = _parse_attr(a, core, urns)
            src, dst = doc, out
            if urn != core:
                if urn not in doc:
                    continue
                if attr is None:
                    out[urn] = doc[urn]
                    continue
                src, dst = doc[urn], out.setdefault(urn, {})
            k = _find(src, attr or "")
            if k is None:
                continue
            if sub is None or not isinstance(src[k], (dict, list)):
                dst[k] = src[k]
            elif isinstance(src[k], dict):
                sk = _find(src[k], sub)
                if sk is not None:
                    dst.setdefault(k, {})[sk] = src[k][sk]
            else:
                dst[k] = [{sk: e[sk] for sk in [_find(e, sub)] if sk} for e in src[k] if isinstance(e, dict)]
        return out
    out = dict(doc)
    for a in excluded:
        urn, attr, sub = _parse_attr(a, core, urns)
        tgt = out
        if urn != core:
            if urn not in out:
                continue
            if attr is None:
                out.pop(urn)
                continue
            tgt = out[urn] = dict(out[urn])
        k = _find(tgt, attr or "")
        if k is None or k in ("id", "schemas"):
            continue
        if sub is None:
            tgt.pop(k)
        elif isinstance(tgt[k], dict):
            tgt[k] = {x: y for x, y in tgt[k].items() if x.lower() != sub.lower()}
    return out


def _wants(attr: str, attributes: list[str], excluded: list[str]) -> bool:
    """Does the response need this (expensive) top-level core attribute?"""
    low = attr.lower()
    if attributes:
        return any(a.lower().split(".")[0].rsplit(":", 1)[-1] == low for a in attributes)
    return not any(a.lower() == low or a.lower().endswith(":" + low) for a in excluded)


_MANAGER = (S.ENTERPRISE_URN + ":manager").lower()


def _manager_as_string(op: Any) -> None:
    """Entra ID sends the enterprise `manager` (a complex attribute) as a bare
    id string: {"op": "Add", "path": "urn:...:enterprise:2.0:User:manager",
    "value": "ID"}. Read it as {"value": "ID"}."""
    if not isinstance(op, dict):
        return
    path = op.get("path")
    if isinstance(path, str) and path.lower() == _MANAGER and isinstance(op.get("value"), str):
        op["value"] = {"value": op["value"]}
    elif path is None and isinstance(op.get("value"), dict):
        for k, v in list(op["value"].items()):
            if isinstance(k, str) and k.lower() == _MANAGER and isinstance(v, str):
                op["value"][k] = {"value": v}


# ---- the service --------------------------------------------------------------------------

class ScimService:
    def __init__(self, app: "App"):
        self.app = app
        self.db = app.db
        self.dir: Directory = app.scim_directory
        self.server = None
        self.task: Optional[asyncio.Task] = None
        self.port = 0
        routes = [
            Route(PREFIX + "/ServiceProviderConfig", self.service_provider_config, methods=["GET"]),
            Route(PREFIX + "/ResourceTypes", self.resource_types, methods=["GET"]),
            Route(PREFIX + "/ResourceTypes/{rid}", self.resource_type, methods=["GET"]),
            Route(PREFIX + "/Schemas", self.schemas, methods=["GET"]),
            Route(PREFIX + "/Schemas/{sid:path}", self.schema, methods=["GET"]),
            Route(PREFIX + "/Users", self.users, methods=["GET", "POST"]),
            Route(PREFIX + "/Users/.search", self.users_search, methods=["POST"]),
            Route(PREFIX + "/Users/{rid}", self.user, methods=["GET", "PUT", "PATCH", "DELETE"]),
            Route(PREFIX + "/Groups", self.groups, methods=["GET", "POST"]),
            Route(PREFIX + "/Groups/.search", self.groups_search, methods=["POST"]),
            Route(PREFIX + "/Groups/{rid}", self.group, methods=["GET", "PUT", "PATCH", "DELETE"]),
            Route(PREFIX + "/Bulk", self.not_implemented, methods=["POST"]),
            Route(PREFIX + "/Me", self.not_implemented, methods=["GET", "POST", "PUT", "PATCH", "DELETE"]),
        ]
        self.asgi = Starlette(routes=routes, exception_handlers={404: self._not_found, 405: self._not_allowed})

    # -- plumbing ---------------------------------------------------------------------

    async def __call__(self, scope, receive, send):
        """ASGI entry: authentication, error mapping and one log line per request."""
        if scope["type"] != "http":
            return
        t0 = time.perf_counter()
        request = Request(scope, receive)
        token_id = None
        status_box: dict = {}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status_box["status"] = message["status"]
            await send(message)
        try:
            token_id = await self._authenticate(request)
            scope.setdefault("state", {})["token_id"] = token_id
            await self.asgi(scope, receive, send_wrapper)
        except ScimError as e:
            await error_response(e.status, e.detail, e.scim_type, e.headers)(scope, receive, send_wrapper)
        except Exception:  # noqa: BLE001  (handlers answer their own errors; this is a last resort)
            LOG.exception("scim request failed", extra={"path": scope["path"], "method": scope["method"]})
            if "status" not in status_box:
                await error_response(500, "internal error")(scope, receive, send_wrapper)
        status = status_box.get("status", 0)
        LOG.info("scim", extra={"method": scope["method"], "path": scope["path"], "status": status,
                                "token": token_id or "", "client": (scope.get("client") or ("", 0))[0],
                                "ms": round((time.perf_counter() - t0) * 1000, 2)})

    async def _authenticate(self, request: Request) -> str:
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        hdr = {"WWW-Authenticate": 'Bearer realm="step-ssh SCIM"'}
        if not auth:
            raise ScimError(401, "authentication required: send 'Authorization: Bearer TOKEN' with a token from "
                                 "`step-ssh-ctl scim token create`", headers=hdr)
        if scheme.lower() != "bearer" or not token.strip():
            raise ScimError(401, "only bearer tokens are accepted: 'Authorization: Bearer TOKEN'", headers=hdr)
        tid, why = await self.db.run(self.dir.check_token, token.strip())
        if tid is None:
            LOG.warning("scim authentication failed", extra={"reason": why, "path": request.url.path,
                                                             "client": request.client.host if request.client else ""})
            raise ScimError(401, f"invalid token: {why}",
                            headers={"WWW-Authenticate": 'Bearer realm="step-ssh SCIM", error="invalid_token"'})
        return tid

    async def _call(self, request: Request, handler) -> Response:
        try:
            return await handler()
        except ScimError as e:
            return error_response(e.status, e.detail, e.scim_type, e.headers)
        except SCIMException as e:
            err = e.to_error()
            detail = err.detail or str(e)
            if isinstance(e.__cause__, ValidationError):  # pydantic's multi-line text: say it in one line
                detail = _validation_error(e.__cause__).detail
            return error_response(int(err.status or 400), detail, err.scim_type)
        except ValidationError as e:
            v = _validation_error(e)
            return error_response(v.status, v.detail, v.scim_type)
        except Exception as e:  # noqa: BLE001
            LOG.exception("scim request failed", extra={"path": request.url.path, "method": request.method})
            return error_response(500, f"internal error: {type(e).__name__}")

    async def _body(self, request: Request) -> dict:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > S.MAX_PAYLOAD:
            raise ScimError(413, f"request body of {declared} bytes is over the limit of {S.MAX_PAYLOAD}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > S.MAX_PAYLOAD:
                raise ScimError(413, f"request body is over the limit of {S.MAX_PAYLOAD} bytes")
            chunks.append(chunk)
        raw = b"".join(chunks)
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise ScimError(400, f"the request body is not valid JSON: {e}", "invalidSyntax") from None
        if not isinstance(body, dict):
            raise ScimError(400, "the request body must be a JSON object", "invalidSyntax")
        return body

    def _actor(self, request: Request) -> str:
        return f"scim:{request.scope['state']['token_id']}"

    def _base(self, request: Request) -> str:
        return str(request.base_url).rstrip("/") + PREFIX

    def _located(self, request: Request, doc: dict, kind: str) -> dict:
        doc["meta"]["location"] = f"{self._base(request)}/{kind}/{doc['id']}"
        return doc

    @staticmethod
    def _validate(model, body: dict, ctx: Context):
        return model.model_validate(body, scim_ctx=ctx, scim_policy=S.POLICY)

    async def _not_found(self, request: Request, exc) -> Response:
        return error_response(404, f"no SCIM endpoint at {request.url.path} (the base is {PREFIX})")

    async def _not_allowed(self, request: Request, exc) -> Response:
        return error_response(405, f"{request.method} is not allowed on {request.url.path}")

    async def not_implemented(self, request: Request) -> Response:
        return error_response(501, f"{request.url.path} is not implemented (see /ServiceProviderConfig)")

    # -- discovery --------------------------------------------------------------------

    async def service_provider_config(self, request: Request) -> Response:
        doc = S.CONFIG.model_dump(scim_ctx=Context.RESOURCE_QUERY_RESPONSE)
        doc["meta"] = {"resourceType": "ServiceProviderConfig",
                       "location": self._base(request) + "/ServiceProviderConfig"}
        return _json(doc)

    def _resource_type_docs(self, request: Request) -> list[dict]:
        out = []
        for rt in S.PROVIDER.resource_types:
            d = rt.model_dump(scim_ctx=Context.RESOURCE_QUERY_RESPONSE)
            d["meta"] = {"resourceType": "ResourceType", "location": f"{self._base(request)}/ResourceTypes/{rt.id}"}
            out.append(d)
        return out

    async def resource_types(self, request: Request) -> Response:
        docs = self._resource_type_docs(request)
        return _json({"schemas": [S.LIST_URN], "totalResults": len(docs), "startIndex": 1,
                      "itemsPerPage": len(docs), "Resources": docs})

    async def resource_type(self, request: Request) -> Response:
        rid = request.path_params["rid"]
        for d in self._resource_type_docs(request):
            if d["id"].lower() == rid.lower():
                return _json(d)
        return error_response(404, f"no resource type {rid!r}")

    def _schema_docs(self, request: Request) -> list[dict]:
        out = []
        for d in S.schema_docs():
            d["meta"] = {"resourceType": "Schema", "location": f"{self._base(request)}/Schemas/{d['id']}"}
            out.append(d)
        return out

    async def schemas(self, request: Request) -> Response:
        docs = self._schema_docs(request)
        return _json({"schemas": [S.LIST_URN], "totalResults": len(docs), "startIndex": 1,
                      "itemsPerPage": len(docs), "Resources": docs})

    async def schema(self, request: Request) -> Response:
        sid = request.path_params["sid"]
        for d in self._schema_docs(request):
            if d["id"].lower() == sid.lower():
                return _json(d)
        return error_response(404, f"no schema {sid!r}")

    # -- lists ------------------------------------------------------------------------

    def _search(self, model, params: dict):
        """Query parameters or a .search body -> (filter node, start, count, attributes, excluded)."""
        def intparam(key: str) -> Optional[int]:
            v = params.get(key)
            if v is None or v == "":
                return None
            try:
                return int(v)
            except (TypeError, ValueError):
                raise ScimError(400, f"{key} must be an integer, got {v!r}", "invalidValue") from None
        start, count = intparam("startIndex"), intparam("count")
        raw_filter = params.get("filter")
        if raw_filter is not None and not isinstance(raw_filter, str):
            raise ScimError(400, "filter must be a string", "invalidFilter")
        try:
            req = SearchRequest[model].model_validate(
                {k: v for k, v in (("filter", raw_filter or None), ("startIndex", start), ("count", count))
                 if v is not None}, scim_policy=S.POLICY)
        except ValidationError as e:
            v = _validation_error(e)
            if any("filter" in map(str, x.get("loc", ())) for x in e.errors()):
                raise ScimError(400, f"filter {raw_filter!r}: {v.detail}", "invalidFilter") from None
            raise ScimError(400, v.detail, v.scim_type) from None
        attrs = params.get("attributes")
        excl = params.get("excludedAttributes")
        attrs = attrs if isinstance(attrs, list) else _split_attrs(attrs)
        excl = excl if isinstance(excl, list) else _split_attrs(excl)
        if attrs and excl:
            raise ScimError(400, "give attributes or excludedAttributes, not both", "invalidValue")
        start = req.start_index or 1
        count = S.MAX_RESULTS if req.count is None else min(req.count, S.MAX_RESULTS)
        return (req.filter.ast if req.filter else None), start, count, attrs, excl

    async def _list(self, request: Request, kind: str, params: dict) -> Response:
        if kind == "Users":
            node, start, count, attrs, excl = self._search(S.UserModel, params)
            total, docs = await self.db.run(self.dir.list_users, node, start, count)
            core, urns = S.USER_URN, (S.ENTERPRISE_URN, S.USER_EXT_URN)
        else:
            node, start, count, attrs, excl = self._search(S.GroupModel, params)
            total, docs = await self.db.run(self.dir.list_groups, node, start, count,
                                            _wants("members", attrs, excl))
            core, urns = S.GROUP_URN, (S.GROUP_EXT_URN,)
        res = [project(self._located(request, d, kind), attrs, excl, core, urns) for d in docs]
        return _json({"schemas": [S.LIST_URN], "totalResults": total, "startIndex": start,
                      "itemsPerPage": len(res), "Resources": res})

    # -- users ------------------------------------------------------------------------

    def _user_out(self, request: Request, doc: dict, status: int = 200, headers: Optional[dict] = None) -> Response:
        doc = self._located(request, doc, "Users")
        q = request.query_params
        doc = project(doc, _split_attrs(q.get("attributes")), _split_attrs(q.get("excludedAttributes")),
                      S.USER_URN, (S.ENTERPRISE_URN, S.USER_EXT_URN))
        return _json(doc, status, headers)

    async def users(self, request: Request) -> Response:
        async def go():
            if request.method == "GET":
                return await self._list(request, "Users", dict(request.query_params))
            m = self._validate(S.UserModel, await self._body(request), Context.RESOURCE_CREATION_REQUEST)
            doc = await self.db.run(self.dir.create_user, m, self._actor(request))
            LOG.info("scim user created", extra={"id": doc["id"], "userName": doc["userName"],
                                                  "login": doc[S.USER_EXT_URN]["loginName"]})
            return self._user_out(request, doc, 201, {"Location": f"{self._base(request)}/Users/{doc['id']}"})
        return await self._call(request, go)

    async def users_search(self, request: Request) -> Response:
        async def go():
            return await self._list(request, "Users", await self._body(request))
        return await self._call(request, go)

    async def user(self, request: Request) -> Response:
        rid = request.path_params["rid"]

        async def go():
            actor = self._actor(request)
            if request.method == "GET":
                return self._user_out(request, await self.db.run(self.dir.get_user, rid))
            if request.method == "DELETE":
                await self.db.run(self.dir.delete_user, rid, actor)
                return Response(status_code=204)
            body = await self._body(request)
            if request.method == "PUT":
                m = self._validate(S.UserModel, body, Context.RESOURCE_REPLACEMENT_REQUEST)
                return self._user_out(request, await self.db.run(self.dir.replace_user, rid, m, actor))
            patch = self._patch(S.UserModel, body)
            return self._user_out(request, await self.db.run(self.dir.patch_user, rid, patch, actor))
        return await self._call(request, go)

    def _patch(self, model, body: dict) -> PatchOp:
        ops = body.get("Operations", body.get("operations"))
        if isinstance(ops, list) and len(ops) > S.MAX_OPERATIONS:
            raise ScimError(400, f"at most {S.MAX_OPERATIONS} operations per PATCH", "tooMany")
        if isinstance(ops, list):
            for op in ops:
                _manager_as_string(op)
        return PatchOp[model].model_validate(body, scim_ctx=Context.RESOURCE_PATCH_REQUEST, scim_policy=S.POLICY)

    # -- groups -----------------------------------------------------------------------

    def _group_out(self, request: Request, doc: dict, status: int = 200, headers: Optional[dict] = None) -> Response:
        doc = self._located(request, doc, "Groups")
        q = request.query_params
        doc = project(doc, _split_attrs(q.get("attributes")), _split_attrs(q.get("excludedAttributes")),
                      S.GROUP_URN, (S.GROUP_EXT_URN,))
        return _json(doc, status, headers)

    def _group_members_wanted(self, request: Request) -> bool:
        q = request.query_params
        return _wants("members", _split_attrs(q.get("attributes")), _split_attrs(q.get("excludedAttributes")))

    async def groups(self, request: Request) -> Response:
        async def go():
            if request.method == "GET":
                return await self._list(request, "Groups", dict(request.query_params))
            m = self._validate(S.GroupModel, await self._body(request), Context.RESOURCE_CREATION_REQUEST)
            doc = await self.db.run(self.dir.create_group, m, self._actor(request))
            LOG.info("scim group created", extra={"id": doc["id"], "displayName": doc["displayName"],
                                                   "group": doc[S.GROUP_EXT_URN]["groupName"]})
            return self._group_out(request, doc, 201, {"Location": f"{self._base(request)}/Groups/{doc['id']}"})
        return await self._call(request, go)

    async def groups_search(self, request: Request) -> Response:
        async def go():
            return await self._list(request, "Groups", await self._body(request))
        return await self._call(request, go)

    async def group(self, request: Request) -> Response:
        rid = request.path_params["rid"]

        async def go():
            actor = self._actor(request)
            if request.method == "GET":
                return self._group_out(request, await self.db.run(self.dir.get_group, rid,
                                                                  self._group_members_wanted(request)))
            if request.method == "DELETE":
                await self.db.run(self.dir.delete_group, rid, actor)
                return Response(status_code=204)
            body = await self._body(request)
            if request.method == "PUT":
                m = self._validate(S.GroupModel, body, Context.RESOURCE_REPLACEMENT_REQUEST)
                return self._group_out(request, await self.db.run(self.dir.replace_group, rid, m, actor))
            patch = self._patch(S.GroupModel, body)
            await self.db.run(self.dir.patch_group, rid, patch, actor)
            if request.query_params.get("attributes") or request.query_params.get("excludedAttributes"):
                return self._group_out(request, await self.db.run(self.dir.get_group, rid,
                                                                  self._group_members_wanted(request)))
            return Response(status_code=204)
        return await self._call(request, go)

    # -- serving ----------------------------------------------------------------------

    async def start(self, listen: str, certfile: str, keyfile: str) -> int:
        import logging

        import uvicorn

        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)  # our own JSON lines say what matters
        host, _, port = listen.rpartition(":")
        host = host.strip("[]")
        try:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.load_cert_chain(certfile, keyfile)
        except (OSError, ssl.SSLError) as e:
            raise RuntimeError(f"SCIM TLS: cannot load certificate {certfile} / key {keyfile}: {e}") from None
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            # Accepted connections inherit it: without it, a response's TLS
            # records wait 40 ms for delayed ACKs (Nagle).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((host, int(port)))
        except OSError as e:
            sock.close()
            raise OSError(f"SCIM: cannot listen on {listen}: {e.strerror or e}") from None
        sock.setblocking(False)
        self.port = sock.getsockname()[1]

        class _Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self):  # the control plane handles SIGTERM/SIGINT itself
                yield

            def install_signal_handlers(self) -> None:
                pass

        config = uvicorn.Config(self, log_config=None, access_log=False, http="h11", ws="none", lifespan="off",
                                server_header=False, timeout_keep_alive=30, timeout_graceful_shutdown=5)
        config.load()
        config.ssl = ctx
        self.server = _Server(config)
        self.task = asyncio.create_task(self.server.serve(sockets=[sock]), name="scim")
        deadline = time.monotonic() + 10
        while not self.server.started:
            if self.task.done():
                exc = self.task.exception()
                raise RuntimeError(f"SCIM server did not start: {exc!r}")
            if time.monotonic() > deadline:
                raise RuntimeError("SCIM server did not start within 10 s")
            await asyncio.sleep(0.01)
        self._sock = sock
        return self.port

    async def stop(self) -> None:
        if self.server is None or self.task is None:
            return
        self.server.should_exit = True
        # uvicorn closes idle keep-alive connections, but a TLS close waits for
        # the client's close_notify, which an idle pooled client never sends:
        # drop those at once. Requests in flight get up to 5 s to finish.
        deadline = time.monotonic() + 10
        while not self.task.done() and time.monotonic() < deadline:
            for conn in list(getattr(self.server, "server_state", None).connections if
                             getattr(self.server, "server_state", None) else ()):
                cycle = getattr(conn, "cycle", None)
                transport = getattr(conn, "transport", None)
                if transport is not None and (cycle is None or getattr(cycle, "response_complete", True)):
                    transport.abort()
            await asyncio.sleep(0.05)
        if not self.task.done():
            self.server.force_exit = True
            self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self.task
        with contextlib.suppress(OSError):
            self._sock.close()

