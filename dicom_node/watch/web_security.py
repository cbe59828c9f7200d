"""What keeps the dashboard and API safe from the browser the admin uses for everything else.

Why: with the default loopback dashboard and no token, any web page open in the admin's browser could POST
to ``http://127.0.0.1:8080/api/jobs/1/retry`` (a "simple" cross-site request needs no CORS permission), and a
DNS-rebinding page could even read the answers. Three guards, installed as middleware so that every route,
present or added later (e.g. review buttons), gets them without opting in:

* **Host**: the ``Host`` header must be one of ``web.allowed_hosts`` (default: the bind address, and
  localhost/127.0.0.1/::1 when bound to loopback, the host's names when bound to every interface); a
  rebinding page's requests carry its own name and get 421.
* **State changes** (POST, PUT, PATCH, DELETE): allowed with the token in an ``Authorization: Bearer``
  header (scripts; a browser cannot add it cross-site); otherwise the request must come from our own pages —
  ``Origin`` (or, without one, ``Referer``) naming this host, *and* either the page's CSRF token in
  ``X-CSRF-Token`` (what the dashboard's buttons send; a plain form puts it in the action URL's ``csrf_token``
  parameter; pages get it as ``app.state.csrf_token``) or, under ``/api/``, ``Content-Type: application/json``
  (which a cross-site page cannot send without a CORS preflight that we never grant). A request with neither
  Origin nor Referer is not from a browser page: allowed only as JSON under ``/api/``. Else 403 with why.
* **Headers** on every answer: a Content-Security-Policy (no scripts but ours, no framing:
  ``frame-ancestors 'none'``), X-Frame-Options, X-Content-Type-Options, Referrer-Policy, and ``no-store`` for
  pages and API answers (they hold study UIDs).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import logging
import secrets
import socket
from collections.abc import Callable
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from ..config import Settings

log = logging.getLogger("dicom_node.watch.web")

STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
CSRF_HEADER = "x-csrf-token"
#: For plain HTML forms (no script): ``<form method="post" action="...?csrf_token=...">``.
CSRF_PARAM = "csrf_token"


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return address == "localhost"


def allowed_hosts(settings: Settings) -> set[str]:
    """Host names (without port, lower case) the dashboard answers to."""
    web = settings.web
    if web.allowed_hosts:
        return {h.lower().strip("[]") for h in web.allowed_hosts}
    hosts = {web.bind_address.lower().strip("[]")}
    if _is_loopback(web.bind_address) or web.bind_address in ("0.0.0.0", "::", ""):
        hosts |= {"localhost", "127.0.0.1", "::1"}
    if web.bind_address in ("0.0.0.0", "::", ""):
        name = socket.gethostname().lower()
        hosts |= {name, socket.getfqdn().lower()}
    return hosts


def _host_only(value: str) -> str:
    """``Host`` header value without the port ("[::1]:8080" → "::1")."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def script_hash(script: str) -> str:
    """The CSP source that allows exactly this inline script."""
    return "'sha256-" + base64.b64encode(hashlib.sha256(script.encode()).digest()).decode() + "'"


class WebGuard:
    """The middleware: Host check, cross-site protection for state changes, security headers."""

    def __init__(self, settings: Settings, scripts: tuple[str, ...] = ()):
        self.token = settings.web.token
        self.hosts = allowed_hosts(settings)
        #: Put into every page (``<meta name="csrf-token">``) and sent back by its buttons. Random per process:
        #: a page opened before a restart asks for a reload, which the dashboard does every 15 s anyway.
        self.csrf_token = secrets.token_urlsafe(32)
        script_src = " ".join(script_hash(s) for s in scripts) or "'none'"
        self.csp = ("default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'; "
                    f"script-src {script_src}; connect-src 'self'; form-action 'self'; base-uri 'none'; "
                    "frame-ancestors 'none'")
        # Swagger UI (FastAPI's /api/docs) loads its script and style from a CDN; its page keeps the other rules.
        self.docs_csp = "frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
        #: told of every refused state-changing request (the model routes audit theirs: models_web.RefusalAudit)
        self.on_refused: Callable[[Request, int, str], None] | None = None

    def install(self, app: FastAPI) -> None:
        app.middleware("http")(self.__call__)
        app.state.csrf_token = self.csrf_token

    async def __call__(self, request: Request, call_next):
        refusal = self.refusal(request)
        if refusal is not None:
            status, why = refusal
            client = request.client.host if request.client else "?"
            log.warning("web request %s %s from %s refused (%d): %s", request.method, request.url.path, client,
                        status, why)
            response = JSONResponse({"detail": why}, status_code=status)
            if self.on_refused is not None and request.method in STATE_CHANGING:
                try:
                    self.on_refused(request, status, why)
                except Exception:  # the refusal stands whatever recording it does
                    log.exception("recording a refused request failed")
        else:
            response = await call_next(request)
        self.add_headers(request, response)
        return response

    def refusal(self, request: Request) -> tuple[int, str] | None:
        host = _host_only(request.headers.get("host", ""))
        if host not in self.hosts:
            return 421, "Host header is not this dashboard's name (web.allowed_hosts)"
        if request.method not in STATE_CHANGING:
            return None
        if self.token and hmac.compare_digest(
                request.headers.get("authorization", "").removeprefix("Bearer ").strip().encode(), self.token.encode()):
            return None  # a script with the token: browsers cannot attach this header cross-site
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        json_api = request.url.path.startswith("/api/") and content_type == "application/json"
        origin = request.headers.get("origin") or request.headers.get("referer") or ""
        if not origin:
            # Not a browser (browsers send Origin with every cross-site POST): a script such as curl. A cross-site
            # page cannot send application/json without a CORS preflight, which is never granted here.
            if json_api:
                return None
            return 403, ("cross-site protection: no Origin or Referer; scripts send Content-Type: application/json "
                         "(or the token as Authorization: Bearer)")
        parts = urlsplit(origin)
        own = request.headers.get("host", "").lower()
        if origin == "null" or parts.netloc.lower() != own or parts.scheme not in ("http", "https"):
            return 403, "cross-site protection: request from another origin"
        given = request.headers.get(CSRF_HEADER) or request.query_params.get(CSRF_PARAM) or ""
        if json_api or hmac.compare_digest(given.encode(), self.csrf_token.encode()):
            return None
        return 403, ("cross-site protection: CSRF token missing (X-CSRF-Token) or, for the API, "
                     "Content-Type is not application/json")

    def add_headers(self, request: Request, response) -> None:
        h = response.headers
        docs = request.url.path in ("/api/docs", "/api/docs/oauth2-redirect")
        h.setdefault("Content-Security-Policy", self.docs_csp if docs else self.csp)
        h.setdefault("X-Frame-Options", "DENY")
        h.setdefault("X-Content-Type-Options", "nosniff")
        h.setdefault("Referrer-Policy", "same-origin")
        h.setdefault("Cross-Origin-Opener-Policy", "same-origin")
        h.setdefault("Cross-Origin-Resource-Policy", "same-origin")
        if request.url.path not in ("/metrics", "/healthz"):
            h.setdefault("Cache-Control", "no-store")
