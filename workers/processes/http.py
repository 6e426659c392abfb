"""The HTTP worker: REST API, live streams, the dashboard at /, /metrics, /healthz and /readyz.

Sockets:
    http     TCP     bind    <- browsers, apps, Prometheus   [http] bind (default 127.0.0.1:8080)
    query    DEALER  connect -> query ROUTER                 latest, devices, history, status
    stream   SUB     connect -> query PUB                    ``readings`` for the live streams
    command  REQ     connect -> commands ROUTER              send, list and cancel commands
    inject   REQ     connect -> edge ROUTER                  dead letters replayed

Starlette on uvicorn (one asyncio loop): many held-open live streams cost a coroutine each, not a
thread. uvicorn owns the signals here: SIGTERM/SIGINT end it gracefully (open streams are closed),
which is what the stop flag does in the other workers. docs/web.md.
"""
from __future__ import annotations

import logging

import uvicorn

from workers.core import runtime
from workers.core.config import Config

log = logging.getLogger(__name__)


def main(cfg: Config) -> int:
    if not cfg.http.enabled:
        log.info("http is not enabled in %s; nothing to do", cfg.source)
        return runtime.EXIT_OK
    from workers.web.app import build_app

    server = uvicorn.Server(uvicorn.Config(
        build_app(cfg), host=cfg.http.host, port=cfg.http.port, log_config=None, access_log=False,
        lifespan="on", timeout_graceful_shutdown=3, backlog=4096))
    log.info("http: serving on http://%s/", cfg.http.bind)
    server.run()
    return runtime.EXIT_OK if server.started else runtime.EXIT_FAILURE
