"""The admin dashboard, its JSON API, Prometheus ``/metrics`` and ``/healthz`` (FastAPI, served by uvicorn
inside ``dicom-node serve``): this module wires the routers of pages.py, api.py and metrics.py into one app.

Bound to localhost by default; on any other address a token is required (``web.token``), given as a
``Authorization: Bearer`` header or once as ``?token=`` (then kept in a cookie). Every request also passes
web_security.WebGuard (Host check, cross-site guard on every state-changing request, security headers), and
every admin action is written to the audit trail with who and from where. The pages are rendered on the
server with inline SVG charts: nothing is fetched from the internet, which hospital networks block anyway.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from prometheus_client import CollectorRegistry

from storage.db import Database

from ..config import CannotListen, Settings, WebSettings
from . import api, metrics, models_web, pages
from .web_context import TOKEN_COOKIE, WebContext, require_token
from .web_security import WebGuard


def create_app(settings: Settings, db: Database, scp_stats: dict | None = None,
               scp_alive: Callable[[], Any] = lambda: True, record_backlog: Callable[[], int] = lambda: 0) -> FastAPI:
    # The OpenAPI page and schema are routes of our own below, so that they sit behind the token like the rest.
    app = FastAPI(title="dicom-seg-node", docs_url=None, redoc_url=None, openapi_url=None)
    token = settings.web.token
    guard = WebGuard(settings, scripts=(pages.PAGE_SCRIPT,))
    registry = CollectorRegistry()
    registry.register(metrics.NodeCollector(settings, db, scp_stats, record_backlog))
    app.state.web = WebContext(settings=settings, db=db, csrf_token=guard.csrf_token, registry=registry,
                               scp_alive=scp_alive, record_backlog=record_backlog)

    @app.middleware("http")
    async def keep_token(request: Request, call_next):
        """A token given once as ``?token=`` is kept in an HttpOnly, same-site cookie for the next pages."""
        response = await call_next(request)
        if token and request.query_params.get("token") == token:
            response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict")
        return response

    app.state.model_refusals = guard.on_refused = models_web.RefusalAudit(db)
    guard.install(app)  # added last, so it runs first: Host check, cross-site refusal, security headers

    @app.get("/api/openapi.json", dependencies=[Depends(require_token)], include_in_schema=False)
    def openapi() -> dict[str, Any]:
        return app.openapi()

    @app.get("/api/docs", dependencies=[Depends(require_token)], include_in_schema=False)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="openapi.json", title="dicom-seg-node API")

    app.include_router(metrics.router)
    app.include_router(pages.router)
    app.include_router(api.router)
    app.include_router(models_web.router)
    return app


class WebServer:
    """uvicorn in a background thread of the serve process."""

    def __init__(self, app: FastAPI, host: str, port: int, limits: WebSettings | None = None):
        """``limits``: the connection caps and request deadline of ``[web]`` (watch/guard.py); defaults if None."""
        import uvicorn

        from .guard import ConnectionGuard, quiet_accept_errors

        lim = limits or WebSettings()
        self.host, self.port = host, port
        self.guard = ConnectionGuard(lim.max_connections, lim.max_connections_per_peer, lim.request_timeout)
        # backlog: asyncio accepts up to this many waiting connections before any protocol runs (the guard closes
        # the surplus only then), so it bounds the descriptors a burst takes as well as the kernel's queue
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                                                    http=self.guard.protocol(), backlog=lim.max_connections))
        quiet_accept_errors()
        self.thread = threading.Thread(target=self.server.run, daemon=True, name="web")

    def start(self, timeout: float = 60.0) -> None:
        """Return once the dashboard answers, so that the node's "dashboard on" line is true when printed. uvicorn
        reports a port it cannot bind only in its log and ends its thread: that becomes a CannotListen naming
        the key."""
        self.thread.start()
        end = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive():
                raise CannotListen(f"web.port = {self.port}: the dashboard cannot listen on {self.host}:{self.port} "
                                   "(in use, or not an address of this machine: see the line above); stop the "
                                   "program that holds it, choose another port, or set web.enabled = false")
            if time.monotonic() > end:
                raise CannotListen(f"web.port = {self.port}: the dashboard did not listen within {timeout:.0f} s")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
