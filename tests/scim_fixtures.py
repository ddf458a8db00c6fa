"""A control plane serving SCIM (tests/test_scim*.py): the real
`step-ssh-server run` from server_fixtures, with `scim_listen` in its
server.yaml, a bearer token made through step-ssh-ctl's RPC, and an httpx
client that talks to it the way an IdP does (HTTPS, pinned CA, bearer token).

    from scim_fixtures import scim_server  # noqa: F401  (pytest fixture)

    def test_x(scim_server):
        r = scim_server.http.post("/Users", json={...})
"""
from __future__ import annotations

import ssl
from pathlib import Path
from typing import Iterator, Optional

import httpx
import pytest
import yaml

from server_fixtures import RunningServer, serving
from step_ssh.proto import stepssh_pb2 as pb

USER = "urn:ietf:params:scim:schemas:core:2.0:User"
GROUP = "urn:ietf:params:scim:schemas:core:2.0:Group"
PATCH = "urn:ietf:params:scim:api:messages:2.0:PatchOp"
ERROR = "urn:ietf:params:scim:api:messages:2.0:Error"
LIST = "urn:ietf:params:scim:api:messages:2.0:ListResponse"
EXT = "urn:ietf:params:scim:schemas:extension:stepssh:2.0:User"
GEXT = "urn:ietf:params:scim:schemas:extension:stepssh:2.0:Group"


class ScimServer(RunningServer):
    def __init__(self, base: Path, heartbeat: float = 1.0):
        super().__init__(base, heartbeat)
        # port 0: the server picks a free one and logs it (no race with other processes)
        cfg = yaml.safe_load((self.dir / "server.yaml").read_text()) or {}
        cfg["scim_listen"] = "127.0.0.1:0"
        (self.dir / "server.yaml").write_text(yaml.safe_dump(cfg))
        self.scim_port = 0
        self.base_url = ""
        self._clients: list[httpx.Client] = []
        self.scim_token: Optional[str] = None
        self._http: Optional[httpx.Client] = None

    def start(self) -> None:
        super().start()
        rec = [r for r in self.log_records() if r.get("msg") == "listening"][-1]
        if rec["scim_port"] != self.scim_port:  # first start, or a restart on another port: clients follow
            self.scim_port = rec["scim_port"]
            self.base_url = f"https://127.0.0.1:{self.scim_port}/scim/v2"
            if self._http is not None:
                self._http = self.client(self.scim_token)

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.dir / "ca.crt"))

    def client(self, token: Optional[str] = None, **kw) -> httpx.Client:
        headers = {"Accept": "application/scim+json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        c = httpx.Client(base_url=self.base_url, verify=self.ssl_context(), headers=headers, timeout=30, **kw)
        self._clients.append(c)
        return c

    def new_token(self, name: str = "test") -> pb.ScimToken:
        return self.admin.CreateScimToken(pb.ScimTokenRequest(name=name), timeout=10)

    @property
    def http(self) -> httpx.Client:
        """A client with a valid token (created on first use)."""
        if self._http is None:
            self.scim_token = self.new_token("idp").token
            self._http = self.client(self.scim_token)
        return self._http

    def close(self) -> None:
        for c in self._clients:
            c.close()
        super().close()

    # ---- payload helpers -------------------------------------------------------------

    def create_user(self, user_name: str, **kw) -> dict:
        body = {"schemas": [USER], "userName": user_name, "active": True, **kw}
        r = self.http.post("/Users", json=body)
        assert r.status_code == 201, r.text
        return r.json()

    def create_group(self, display_name: str, members: tuple = (), **kw) -> dict:
        body = {"schemas": [GROUP], "displayName": display_name, "members": [{"value": m} for m in members], **kw}
        r = self.http.post("/Groups", json=body)
        assert r.status_code == 201, r.text
        return r.json()

    def patch(self, kind: str, rid: str, *ops: dict) -> httpx.Response:
        return self.http.patch(f"/{kind}/{rid}", json={"schemas": [PATCH], "Operations": list(ops)})


def scim_error(r: httpx.Response, status: int, scim_type: Optional[str] = None) -> str:
    """Assert `r` is a SCIM error with this status (and scimType); returns its detail."""
    assert r.status_code == status, f"{r.status_code} {r.text}"
    assert r.headers["content-type"].startswith("application/scim+json"), r.headers
    body = r.json()
    assert body["schemas"] == [ERROR], body
    assert body["status"] == str(status), body
    if scim_type is not None:
        assert body.get("scimType") == scim_type, body
    assert body["detail"], body
    return body["detail"]


@pytest.fixture
def scim_server(tmp_path: Path) -> Iterator[ScimServer]:
    yield from serving(ScimServer(tmp_path))


@pytest.fixture(scope="module")
def module_scim_server(tmp_path_factory) -> Iterator[ScimServer]:
    yield from serving(ScimServer(tmp_path_factory.mktemp("scim")))
