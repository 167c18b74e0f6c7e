"""Who may read the run: the read routes take a token when enrollment is on (docs/PROTOCOL.md section 2).

Read routes: `GET /v1/global` (the adapter, trained on the clients' private data), `/v1/status` (the clients'
names), `/metrics`, and the API description (`/openapi.json`). They are protected when the server
has an enrollment secret or an allowlist, or an operator token, unless `public` (`--public-status`):
then the header `Authorization: Bearer <token>` must carry a client's token or the operator's
(`--admin-token-file`, compared in constant time); else 401 `missing_token` / `bad_token`.
`GET /v1/run` stays open: a client reads it before it registers.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from dataclasses import dataclass

from starlette.concurrency import run_in_threadpool

from hetlora.engine.errors import Unauthenticated
from server_stub.errors import ApiError, api_error

log = logging.getLogger("hetlora.server")
READ_ROUTES = frozenset({"/v1/global", "/v1/status", "/metrics", "/openapi.json"})


@dataclass(frozen=True)
class ReadAccess:
    """`admin_token`: the operator's token (None: none); `public`: leave the read routes open."""

    admin_token: str | None = None
    public: bool = False

    def protected(self, enrollment_open: bool) -> bool:
        return not self.public and (not enrollment_open or self.admin_token is not None)

    def is_admin(self, authorization: str | None) -> bool:
        scheme, _, token = (authorization or "").partition(" ")
        if self.admin_token is None or scheme.lower() != "bearer":
            return False
        digest = hashlib.sha256(token.strip().encode()).digest()
        return hmac.compare_digest(digest, hashlib.sha256(self.admin_token.encode()).digest())


class ReadGuard:
    """ASGI middleware: the read routes answer only with the operator's token or a client's (`authenticate`
    raises Unauthenticated for an unknown or missing token: 401)."""

    def __init__(self, app, access: ReadAccess, authenticate):
        self.app, self.access, self.authenticate = app, access, authenticate

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] not in READ_ROUTES:
            return await self.app(scope, receive, send)
        authorization = dict(scope.get("headers") or ()).get(b"authorization", b"").decode("latin-1")
        if not self.access.is_admin(authorization):
            try:
                await run_in_threadpool(self.authenticate, authorization or None)
            except Unauthenticated as exc:
                peer = (scope.get("client") or ("unknown",))[0]
                log.info("read of %s refused from %s: %s", scope["path"], peer, exc.code)
                return await _reply(send, api_error(exc))
        return await self.app(scope, receive, send)


async def _reply(send, exc: ApiError) -> None:
    body = json.dumps(exc.body()).encode()
    await send({"type": "http.response.start", "status": exc.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"www-authenticate", b"Bearer")]})
    await send({"type": "http.response.body", "body": body})
