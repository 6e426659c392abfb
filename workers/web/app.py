"""The HTTP face of the pipeline: REST API, live streams (Server-Sent Events), dashboard, /metrics.

Every answer comes from the worker that owns it (``backend``): the query worker for latest values,
presence, history and status; the commands worker for commands; the dead-letter store and the edge's
inject endpoint for dead letters. Errors are ``{"error": {"code": "...", "message": "..."}}``. The
routes are described by ``openapi.DOCUMENT`` (served at /openapi.json; a test keeps the two in step).
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import time
import tomllib
from pathlib import Path
from typing import Any, AsyncIterator

import anyio
import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from workers.core.config import Config, window_label
from workers.web import metrics, openapi
from workers.web.backend import ALL, Backend, Unavailable

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
STREAM_KEEPALIVE_S = 15.0          # a comment line this often keeps proxies from closing a quiet stream
STREAM_FLUSH_S = 0.1               # a live stream writes at most this often (what waits goes out together)
DEADLETTER_LIMIT_MAX = 1000
COMMAND_WAIT_MAX_S = 120.0
READ, ADMIN = "read", "admin"


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def error_response(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


# --------------------------------------------------------------------------- tokens


class Tokens:
    """API tokens: ``read`` may look, ``admin`` may also act (send commands, replay dead letters).
    From ``[http]`` and the optional tokens file in the data directory. No token anywhere: no check
    (the default bind is 127.0.0.1)."""

    def __init__(self, cfg: Config) -> None:
        self.read = set(cfg.http.read_tokens)
        self.admin = set(cfg.http.admin_tokens)
        path = Path(cfg.data_dir) / cfg.http.tokens_file
        if path.is_file():
            with open(path, "rb") as fh:
                table = tomllib.load(fh)
            self.read.update(str(t) for t in table.get("read_tokens", []))
            self.admin.update(str(t) for t in table.get("admin_tokens", []))
            log.info("http: tokens from %s", path)

    @property
    def open(self) -> bool:
        return not (self.read or self.admin)

    def level(self, request: Request) -> str | None:
        given = request.headers.get("authorization", "")
        token = given[7:].strip() if given.lower().startswith("bearer ") else request.query_params.get("token", "")
        if not token:
            return None
        # compare with every token, in constant time, so timing tells nothing about a near miss
        if any(hmac.compare_digest(token, t) for t in self.admin):
            return ADMIN
        if any(hmac.compare_digest(token, t) for t in self.read):
            return READ
        return None

    def require(self, request: Request, needed: str) -> None:
        if self.open:
            return
        level = self.level(request)
        if level is None:
            raise ApiError(401, "unauthorized", "a valid token is needed: 'Authorization: Bearer TOKEN' or ?token=")
        if needed == ADMIN and level != ADMIN:
            raise ApiError(403, "forbidden", "this needs an admin token")


# --------------------------------------------------------------------------- helpers


def _int_param(request: Request, name: str, default: int | None = None, low: int | None = None,
               high: int | None = None) -> int | None:
    text = request.query_params.get(name)
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError:
        raise ApiError(400, "bad_request", f"{name!r} must be an integer, got {text!r}") from None
    if (low is not None and value < low) or (high is not None and value > high):
        raise ApiError(400, "bad_request", f"{name!r} must be between {low} and {high}, got {value}")
    return value


async def _json_body(request: Request) -> dict:
    raw = await request.body()
    try:
        body = orjson.loads(raw) if raw else {}
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, "bad_request", f"the body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "bad_request", "the body must be a JSON object")
    return body


def _refused(reply: dict) -> ApiError:
    """A worker's ``{"ok": false, "error": ...}`` as an HTTP error."""
    message = str(reply.get("error") or reply.get("status") or "refused")
    code = reply.get("code")
    if reply.get("status") == "unknown device" or message.startswith("unknown device"):
        return ApiError(404, code or "unknown_device", message)
    if reply.get("status") == "expired":
        return ApiError(409, code or "expired", message)
    return ApiError(400, code or "bad_request", message)


# --------------------------------------------------------------------------- the app


def build_app(cfg: Config) -> Starlette:
    backend = Backend(cfg)
    tokens = Tokens(cfg)
    if tokens.open and cfg.http.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("http: listening on %s with no tokens: anyone who reaches it can send commands", cfg.http.bind)

    async def ask(message: dict) -> dict:
        try:
            reply = await backend.ask(message)
        except Unavailable as exc:
            raise ApiError(503, "unavailable", str(exc)) from None
        if not reply.get("ok"):
            raise _refused(reply)
        reply.pop("ok", None)
        return reply

    async def command(message: dict, timeout_s: float) -> dict:
        try:
            return await backend.command(message, timeout_s)
        except Unavailable as exc:
            raise ApiError(503, "unavailable", str(exc)) from None

    # ------------------------------------------------------------------ pages and documents

    async def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    async def openapi_json(request: Request) -> Response:
        return JSONResponse(openapi.DOCUMENT)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"ok": True})

    async def readyz(request: Request) -> Response:
        checks = await metrics.readiness(cfg, backend)
        ready = all(check["ok"] for check in checks.values())
        return JSONResponse({"ok": ready, "checks": checks}, status_code=200 if ready else 503)

    async def metrics_page(request: Request) -> Response:
        tokens.require(request, READ)
        try:
            status = await backend.ask({"op": "status"})
        except Unavailable:
            status = None
        body = metrics.exposition(status, backend)
        return Response(body, media_type=metrics.CONTENT_TYPE)

    # ------------------------------------------------------------------ API

    async def devices(request: Request) -> Response:
        tokens.require(request, READ)
        return JSONResponse(await ask({"op": "devices"}))

    async def latest(request: Request) -> Response:
        tokens.require(request, READ)
        return JSONResponse(await ask({"op": "latest", "device": request.path_params["device"]}))

    async def history(request: Request) -> Response:
        tokens.require(request, READ)
        field = request.query_params.get("field")
        if not field:
            raise ApiError(400, "bad_request", "'field' is required: which field's history")
        message: dict[str, Any] = {"op": "history", "device": request.path_params["device"], "field": field}
        if request.query_params.get("window"):
            message["window"] = request.query_params["window"]
        for name in ("from", "to"):
            value = _int_param(request, name)
            if value is not None:
                message[name] = value
        return JSONResponse(await ask(message))

    async def status(request: Request) -> Response:
        tokens.require(request, READ)
        reply = await ask({"op": "status"})
        windows = [[window_label(s), s] for s in cfg.rollups.window_seconds] if cfg.rollups.enabled else []
        reply["http"] = {"stream_clients": backend.hub.clients, "rollup_windows": windows, **backend.hub.counters}
        return JSONResponse(reply)

    async def send_command(request: Request) -> Response:
        tokens.require(request, ADMIN)
        body = await _json_body(request)
        if not isinstance(body.get("command"), dict):
            raise ApiError(400, "bad_request", '"command" must be a JSON object, e.g. {"cmd": "interval", "value": 30}')
        message = {"op": "send", "device": request.path_params["device"], "command": body["command"]}
        for key in ("id", "ttl_s", "wait_s"):
            if key in body:
                message[key] = body[key]
        wait = body.get("wait_s", 0)
        if isinstance(wait, (int, float)) and not isinstance(wait, bool) and wait > COMMAND_WAIT_MAX_S:
            raise ApiError(400, "bad_request", f'"wait_s" is at most {COMMAND_WAIT_MAX_S:g} over HTTP')
        wait = wait if isinstance(wait, (int, float)) and not isinstance(wait, bool) and wait > 0 else 0
        reply = await command(message, cfg.http.request_timeout_s + cfg.commands.reply_timeout_s + wait)
        if reply.get("ok"):
            reply.pop("ok")
            return JSONResponse(reply, status_code=202 if reply.get("status") == "queued" else 200)
        raise _refused(reply)

    async def list_commands(request: Request) -> Response:
        tokens.require(request, READ)
        limit = _int_param(request, "limit", 50, 1, 1000)
        reply = await command({"op": "commands", "device": request.path_params["device"], "limit": limit},
                              cfg.http.request_timeout_s)
        if not reply.get("ok"):
            raise _refused(reply)
        return JSONResponse({"commands": reply["commands"]})

    async def one_command(request: Request) -> Response:
        tokens.require(request, READ)
        device, command_id = request.path_params["device"], request.path_params["id"]
        reply = await command({"op": "commands", "device": device, "limit": 1000}, cfg.http.request_timeout_s)
        if not reply.get("ok"):
            raise _refused(reply)
        for cmd in reply["commands"]:
            if cmd.get("id") == command_id:
                return JSONResponse(cmd)
        raise ApiError(404, "not_found", f"no command {command_id!r} for {device!r} (finished ones are kept"
                       " [commands] keep_done_s)")

    async def cancel_command(request: Request) -> Response:
        tokens.require(request, ADMIN)
        reply = await command({"op": "cancel", "id": request.path_params["id"]}, cfg.http.request_timeout_s)
        if not reply.get("ok"):
            raise _refused(reply)
        reply.pop("ok")
        return JSONResponse(reply)

    def _deadletter_store() -> Any:
        from workers.core.deadletters import DeadLetterStore

        path = Path(cfg.data_dir) / "deadletters.db"
        return DeadLetterStore(path) if path.exists() else None

    async def deadletters(request: Request) -> Response:
        tokens.require(request, READ)
        limit = _int_param(request, "limit", 100, 1, DEADLETTER_LIMIT_MAX)
        include_replayed = request.query_params.get("all", "") in ("1", "true", "yes")
        source = request.query_params.get("source") or None

        def read() -> dict:
            store = _deadletter_store()
            if store is None:
                return {"total": 0, "deadletters": []}
            try:
                letters = store.list(limit=limit, include_replayed=include_replayed, source=source)
                total = store.count(include_replayed=include_replayed)
            finally:
                store.close()
            return {"total": total, "deadletters": [
                {**d._asdict(), "recv_ts": d.recv_ts // 1_000_000, "raw": d.raw.decode("utf-8", "backslashreplace")}
                for d in letters]}

        return JSONResponse(await anyio.to_thread.run_sync(read))

    async def replay(request: Request) -> Response:
        tokens.require(request, ADMIN)
        from workers.core.deadletters import ReplayError, replay as replay_letters

        body = await _json_body(request)
        ids = body.get("ids")
        if ids is not None and (not isinstance(ids, list) or not all(isinstance(i, int) for i in ids)):
            raise ApiError(400, "bad_request", '"ids" must be a list of dead-letter ids')
        if not ids and body.get("all") is not True:
            raise ApiError(400, "bad_request", 'say which: {"ids": [1, 2]} or {"all": true}')

        def run() -> int:
            store = _deadletter_store()
            if store is None:
                return 0
            try:
                letters = store.list(limit=10000, ids=ids or None, include_replayed=bool(ids))
                if letters:
                    replay_letters(store, letters, cfg.endpoints.inject, cfg.http.request_timeout_s)
                return len(letters)
            finally:
                store.close()

        try:
            count = await anyio.to_thread.run_sync(run)
        except ReplayError as exc:
            raise ApiError(503, "unavailable", str(exc)) from None
        return JSONResponse({"replayed": count})

    # ------------------------------------------------------------------ live streams

    async def stream(request: Request, topic: str) -> Response:
        tokens.require(request, READ)
        subscriber = backend.hub.subscribe(topic)

        async def events() -> AsyncIterator[bytes]:
            try:
                yield b"retry: 2000\n: connected\n\n"
                while True:
                    chunk = await subscriber.take(STREAM_KEEPALIVE_S)
                    if chunk is None:
                        return                                      # too slow: cut off (counted)
                    yield chunk or b": keepalive\n\n"
                    # at most one write per client per STREAM_FLUSH_S: a busy moment's readings go
                    # out together, so 1,000 clients cost 1,000 writes a tick, not one per batch each
                    await asyncio.sleep(STREAM_FLUSH_S)
            finally:
                backend.hub.unsubscribe(subscriber)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def device_stream(request: Request) -> Response:
        return await stream(request, request.path_params["device"])

    async def all_stream(request: Request) -> Response:
        return await stream(request, ALL)

    # ------------------------------------------------------------------ errors

    async def on_api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return error_response(exc.status, exc.code, exc.message)

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        codes = {404: "not_found", 405: "method_not_allowed"}
        return error_response(exc.status_code, codes.get(exc.status_code, "http_error"), str(exc.detail))

    async def on_error(request: Request, exc: Exception) -> Response:
        log.exception("http: %s %s failed", request.method, request.url.path)
        return error_response(500, "internal", f"the HTTP worker failed on this request (a bug; its log has"
                                               f" the details): {exc}")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await backend.start()
        try:
            yield
        finally:
            await backend.stop()

    routes = [
        Route("/", index),
        Route("/openapi.json", openapi_json),
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics_page),
        Route("/api/devices", devices),
        Route("/api/devices/{device}/latest", latest),
        Route("/api/devices/{device}/history", history),
        Route("/api/devices/{device}/stream", device_stream),
        Route("/api/devices/{device}/commands", list_commands, methods=["GET"]),
        Route("/api/devices/{device}/commands", send_command, methods=["POST"]),
        Route("/api/devices/{device}/commands/{id}", one_command, methods=["GET"]),
        Route("/api/devices/{device}/commands/{id}", cancel_command, methods=["DELETE"]),
        Route("/api/stream", all_stream),
        Route("/api/status", status),
        Route("/api/deadletters", deadletters),
        Route("/api/deadletters/replay", replay, methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    middleware = []
    if cfg.http.cors_origins:
        middleware.append(Middleware(CORSMiddleware, allow_origins=list(cfg.http.cors_origins),
                                     allow_methods=["GET", "POST", "DELETE"],
                                     allow_headers=["Authorization", "Content-Type"]))
    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan,
                    exception_handlers={ApiError: on_api_error, HTTPException: on_http_error, Exception: on_error})
    app.state.backend = backend
    return app
