"""The HTTP API (FastAPI) over the round coordinator. Endpoints and errors: docs/PROTOCOL.md."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Header, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from hetlora.errors import UserError
from server_stub.aggregation import make_rule
from server_stub.config import ServerConfig
from server_stub.errors import ApiError
from server_stub.rounds import Coordinator
from server_stub.store import Store

log = logging.getLogger("hetlora.server")
ADAPTER = "application/octet-stream"
TICK_SECONDS = 0.25


class RegisterRequest(BaseModel):
    profile: dict[str, Any] = Field(description="the device profile (any JSON object)")
    requested_rank: int = Field(description="the LoRA rank the device asks for")
    n_samples: int = Field(description="local training samples")
    name: str | None = Field(default=None, description="a human-readable device name")


class ProfileRequest(BaseModel):
    profile: dict[str, Any]
    requested_rank: int | None = None


def build_coordinator(config: ServerConfig, state_dir: str | Path) -> Coordinator:
    """Open (or create) the state dir for this run and the rule; UserError when the dir belongs to another run."""
    try:
        rule = make_rule(config.aggregator, **config.rule_options)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    store = Store(state_dir)
    try:
        store.bind_identity(config.identity())
        return Coordinator(config, store, rule)
    except BaseException:
        store.close()
        raise


async def read_body_limited(request: Request, limit: int) -> bytes:
    """The request body, or 413 as soon as Content-Length or the streamed size exceeds `limit` bytes."""
    too_large = ApiError(413, "too_large", f"the upload is larger than the server's limit of {limit} bytes "
                                           f"({limit / 2**20:g} MB); lower the rank or ask for a larger --max-upload-mb")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(config: ServerConfig, state_dir: str | Path) -> FastAPI:
    """The FastAPI app for one run; state lives in `state_dir` (reused on restart)."""
    coordinator = build_coordinator(config, state_dir)

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

    app = FastAPI(title="hetlora-edge aggregation server", version="1",
                  description="Federated LoRA rounds with heterogeneous ranks. Protocol: docs/PROTOCOL.md.",
                  lifespan=lifespan)
    app.state.coordinator = coordinator

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def bad_request(_request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = f"{where or 'body'}: {first.get('msg', 'invalid request')}; see docs/PROTOCOL.md"
        return JSONResponse({"error": {"code": "bad_request", "message": message}}, status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, exc: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse({"error": {"code": code, "message": str(exc.detail)}}, status_code=exc.status_code)

    def client_id(authorization: str | None = Header(default=None)) -> str:
        return coordinator.authenticate(authorization)

    @app.post("/v1/register", status_code=201, summary="register a client; returns id, token, rank and run config")
    def register(body: RegisterRequest):
        return coordinator.register(body.profile, body.requested_rank, body.n_samples, body.name)

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
    def download(n: int, cid: str = Depends(client_id)):
        data = coordinator.download(cid, n)
        return Response(data, media_type=ADAPTER, headers={"X-Round": str(n)})

    @app.post("/v1/rounds/{n}/update", summary="upload this client's update for round n (wire safetensors body)")
    async def upload(n: int, request: Request, cid: str = Depends(client_id)):
        body = await read_body_limited(request, config.max_upload_bytes)
        reply = await run_in_threadpool(coordinator.accept_upload, cid, n, body)
        return JSONResponse(reply, status_code=200 if reply["duplicate"] else 201)

    @app.get("/v1/global", summary="the current (or ?version=v) global adapter (wire safetensors)",
             response_class=Response)
    def global_adapter(version: int | None = None):
        return Response(coordinator.global_bytes(version), media_type=ADAPTER)

    @app.get("/v1/status", summary="round, clients, uploads and the history of aggregated rounds")
    def status():
        return coordinator.status()

    return app


async def _tick_forever(coordinator: Coordinator) -> None:
    """Check the round deadline a few times a second."""
    while True:
        await asyncio.sleep(TICK_SECONDS)
        try:
            await run_in_threadpool(coordinator.tick)
        except Exception:  # keep the ticker alive; the error is logged with its traceback
            log.exception("deadline check failed")
