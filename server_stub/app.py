"""The HTTP API (FastAPI) over the round coordinator. Endpoints and errors: docs/PROTOCOL.md."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Header, Path as PathParam, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from hetlora.protocol.wire import MAX_INT
from hetlora.engine.config import ServerConfig
from server_stub.enrollment import Enrollment
from hetlora.engine.errors import DomainError
from server_stub.errors import ApiError, api_error
from server_stub.limits import BodyLimit
from hetlora.engine.init_adapter import run_rule
from server_stub.metrics import install_metrics
from server_stub.read_access import ReadAccess, ReadGuard
from server_stub.rounds import Coordinator
from server_stub.store import Store

log = logging.getLogger("hetlora.server")
ADAPTER = "application/octet-stream"
TICK_SECONDS = 0.25


class RegisterRequest(BaseModel):
    profile: dict[str, Any] = Field(description="the device profile (any JSON object)")
    requested_rank: int = Field(le=MAX_INT, description="the LoRA rank the device asks for")
    n_samples: int = Field(le=MAX_INT, description="local training samples")
    name: str | None = Field(default=None, description="a human-readable device name (at most 200 characters: "
                                                     "hetlora.engine.registration checks it)")
    enroll_secret: str | None = Field(default=None, max_length=1000,
                                      description="the server's enrollment secret, when it requires one")


class ProfileRequest(BaseModel):
    profile: dict[str, Any]
    requested_rank: int | None = Field(default=None, le=MAX_INT)


RoundNumber = PathParam(ge=0, le=MAX_INT, description="the round number")


def build_coordinator(config: ServerConfig, state_dir: str | Path, on_finished=None) -> Coordinator:
    """Open (or create) the state dir for this run and the rule; UserError when the dir belongs to another run.
    `on_finished(wire bytes)`: called with the last global when the run finishes."""
    rule = run_rule(config)
    store = Store(state_dir)
    try:
        store.bind_identity(config.identity())
        store.sweep()
        return Coordinator(config, store, rule, on_finished=on_finished)
    except BaseException:
        store.close()
        raise


def create_app(config: ServerConfig, state_dir: str | Path, enrollment: Enrollment | None = None,
               access: ReadAccess | None = None, trusted_proxies: tuple[str, ...] = (), on_finished=None) -> FastAPI:
    """The FastAPI app for one run; state lives in `state_dir` (reused on restart).

    `enrollment`: who may register (default: anyone, 30 a minute per non-loopback address); `access`: who may read
    (server_stub.read_access); `trusted_proxies`: whose X-Forwarded-For is believed; `on_finished`: build_coordinator's."""
    coordinator = build_coordinator(config, state_dir, on_finished)
    enrollment = enrollment or Enrollment()
    access = access or ReadAccess()

    app = FastAPI(title="hetlora-edge aggregation server", version="1",
                  description="Federated LoRA rounds with heterogeneous ranks. Protocol: docs/PROTOCOL.md.",
                  lifespan=_lifespan(coordinator), docs_url=None, redoc_url=None)  # their pages load a CDN
    app.state.coordinator = coordinator
    _add_middleware(app, coordinator, access.protected(enrollment.open) and access, trusted_proxies)
    _add_error_handlers(app)

    def client_id(authorization: str | None = Header(default=None)) -> str:
        return coordinator.authenticate(authorization)

    @app.post("/v1/register", status_code=201, summary="register a client; returns id, token, rank and run config")
    def register(body: RegisterRequest, request: Request):
        _check_enrollment(enrollment, request.client.host if request.client else None, body)
        return coordinator.register(body.profile, body.requested_rank, body.n_samples, body.name,
                                    unique_name=enrollment.allowed_names is not None)

    @app.get("/v1/run", summary="the run config every client receives at registration")
    def run_config():
        return config.run_config()

    @app.get("/v1/round", summary="the current round as this client sees it")
    def current_round(cid: str = Depends(client_id)):
        return coordinator.round_for(cid)

    @app.post("/v1/profile", summary="report a fresh device profile; returns the rank for the next round")
    def profile(body: ProfileRequest, cid: str = Depends(client_id)):
        return coordinator.report_profile(cid, body.profile, body.requested_rank)

    @app.get("/v1/rounds/{n}/adapter", summary="download this client's adapter for round n (wire safetensors)",
             response_class=Response)
    def download(n: int = RoundNumber, cid: str = Depends(client_id)):
        data = coordinator.download(cid, n)
        return Response(data, media_type=ADAPTER, headers={"X-Round": str(n)})

    @app.post("/v1/rounds/{n}/update", summary="upload this client's update for round n (wire safetensors body)")
    async def upload(request: Request, n: int = RoundNumber, cid: str = Depends(client_id)):
        body = await request.body()  # at most --max-upload-mb: BodyLimit
        reply = await run_in_threadpool(coordinator.accept_upload, cid, n, body)
        return JSONResponse(reply, status_code=200 if reply["duplicate"] else 201)

    @app.get("/v1/global", summary="the current (or ?version=v) global adapter (wire safetensors)",
             response_class=Response)
    def global_adapter(version: int | None = Query(default=None, ge=0, le=MAX_INT)):
        return Response(coordinator.global_bytes(version), media_type=ADAPTER)

    @app.get("/v1/status", summary="round, clients, uploads and the history of aggregated rounds")
    def status():
        return coordinator.status()

    return app


def _add_middleware(app: FastAPI, coordinator: Coordinator, access, trusted_proxies: tuple[str, ...]) -> None:
    """Body limits, metrics, the read guard (`access`: a ReadAccess when reads are protected, else False) and, outermost
    so every part sees the client's address, X-Forwarded-For from the trusted proxies only."""
    app.add_middleware(BodyLimit, max_upload_bytes=coordinator.config.max_upload_bytes)
    install_metrics(app, coordinator)  # after BodyLimit: its middleware is outermost and sees the 413s
    if access:
        app.add_middleware(ReadGuard, access=access, authenticate=coordinator.authenticate)
    if trusted_proxies:
        app.add_middleware(ProxyHeadersMiddleware, trusted_hosts=list(trusted_proxies))


def _check_enrollment(enrollment: Enrollment, peer: str | None, body: RegisterRequest) -> None:
    """enrollment.check; a refusal (401, 403) is logged with the peer address (a 429 flood is not, line by line)."""
    try:
        enrollment.check(peer, body.name, body.enroll_secret)
    except ApiError as exc:
        if exc.status != 429:
            log.warning("registration refused from %s (name %r): %s", peer, body.name, exc.code)
        raise


def _lifespan(coordinator: Coordinator):
    """Run the deadline ticker while the app serves; close the store when it stops."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        ticker = asyncio.create_task(_tick_forever(coordinator))
        try:
            yield
        finally:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
            coordinator.store.close()

    return lifespan


def _add_error_handlers(app: FastAPI) -> None:
    """Every error as the JSON body of docs/PROTOCOL.md: {"error": {"code", "message"}}."""

    @app.exception_handler(ApiError)
    async def http_refusal(_request: Request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(DomainError)
    async def refusal(request: Request, exc: DomainError):
        return await http_refusal(request, api_error(exc))

    @app.exception_handler(RequestValidationError)
    async def bad_request(_request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = f"{where or 'body'}: {first.get('msg', 'invalid request')}; see docs/PROTOCOL.md"
        return JSONResponse({"error": {"code": "bad_request", "message": message}}, status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, exc: HTTPException):
        code = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "too_large"}.get(
            exc.status_code, "http_error")
        return JSONResponse({"error": {"code": code, "message": str(exc.detail)}}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def server_bug(_request: Request, exc: Exception):
        log.error("internal error", exc_info=exc)
        return JSONResponse({"error": {"code": "internal_error", "message": "internal server error (see the server "
                                       "log); please report it"}}, status_code=500)


async def _tick_forever(coordinator: Coordinator) -> None:
    """Check the round deadline a few times a second."""
    while True:
        await asyncio.sleep(TICK_SECONDS)
        try:
            await run_in_threadpool(coordinator.tick)
        except Exception:  # keep the ticker alive; the error is logged with its traceback
            log.exception("deadline check failed")
