"""What every route of the dashboard, API and metrics needs: the node's objects, and the token check.

The routers live in their own modules (pages, api, metrics) and are wired by ``web.create_app``; they reach
the node through ``request.app.state.web`` rather than module globals, so that several apps (the tests run
more than one per process) never share a database or a CSRF token.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request
from prometheus_client import CollectorRegistry

from storage.db import Database

from ..config import Settings

#: The cookie that keeps a token given once as ``?token=`` (see ``web.create_app``).
TOKEN_COOKIE = "dicomnode_token"


@dataclass(frozen=True)
class WebContext:
    settings: Settings
    db: Database
    #: the page's CSRF token (web_security.WebGuard): put into every page, sent back by its buttons and forms
    csrf_token: str
    registry: CollectorRegistry
    scp_alive: Callable[[], Any]
    record_backlog: Callable[[], int]

    @property
    def token(self) -> str:
        return self.settings.web.token


def web_context(request: Request) -> WebContext:
    return request.app.state.web


#: A route parameter ``ctx: Context`` receives the app's WebContext.
Context = Annotated[WebContext, Depends(web_context)]


def require_token(request: Request) -> None:
    """Refuse (401) unless no token is configured or the request carries it: as ``Authorization: Bearer``,
    once as ``?token=``, or in the cookie that a ``?token=`` visit left."""
    token = web_context(request).token
    if not token:
        return
    given = request.headers.get("authorization", "").removeprefix("Bearer ").strip() \
        or request.query_params.get("token") or request.cookies.get(TOKEN_COOKIE) or ""
    if not hmac.compare_digest(given.encode(), token.encode()):
        raise HTTPException(401, "token required (web.token)")


def client_address(request: Request) -> str:
    return request.client.host if request.client else ""
