"""The model registry on the dashboard: the Models page (every version, its provenance and held-out result,
Promote and Roll back as plain POST forms) and its JSON API (``GET /api/models``, ``POST
/api/models/{version}/promote``, ``POST /api/models/rollback``).

Same rules as approve/reject: the token when one is configured, web_security.WebGuard's cross-site guard, and
every action in the audit trail with who and from where. Refusals are audited too — an unknown version,
nothing to roll back to, and (unlike a job's retry) a request refused for a missing token or CSRF token,
because changing the model that writes into the PACS is the action an attacker would want: the security
record says that someone tried. Those last are recorded at most once a minute per client address and reason,
so a flood of refused requests cannot fill the audit table.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse

from storage import model_versions as mv
from storage.db import Database
from storage.model_versions import PROMOTE_ACTION, ROLLBACK_ACTION, RegistryError
from storage.states import AuditOutcome
from storage.timeline import add_audit

from ..learn import registry
from .decisions import NOTE_CHARS, review_fields, reviewer
from .pages import render
from .web_context import Context, client_address, require_token, web_context

#: Seconds between two audit rows for the same refused client and reason.
REFUSAL_AUDIT_EVERY_S = 60.0


class RefusalAudit:
    """Audit rows for model actions refused before they reach a route (no token, no CSRF token, another
    origin), throttled per client address and reason."""

    def __init__(self, db: Database):
        self.db = db
        self._last: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()

    def __call__(self, request: Request, status: int, why: str) -> None:
        action = model_action(request.url.path)
        if action is None:
            return
        address = client_address(request)
        now = time.monotonic()
        with self._lock:
            if now - self._last.get((address, why), -1e9) < REFUSAL_AUDIT_EVERY_S:
                return
            self._last[(address, why)] = now
            if len(self._last) > 10000:  # forget old entries rather than grow without bound
                self._last = {k: t for k, t in self._last.items() if now - t < REFUSAL_AUDIT_EVERY_S}
        with self.db.session() as s:
            add_audit(s, "web (refused before the route)", address, action, None, AuditOutcome.REFUSED,
                      f"HTTP {status}: {why}")


def model_action(path: str) -> str | None:
    """The audit action of a model-changing path, None for any other path."""
    path = path.removeprefix("/api")
    if not path.startswith("/models/"):
        return None
    if path == "/models/rollback":
        return ROLLBACK_ACTION
    return PROMOTE_ACTION if path.endswith("/promote") else None


def require_token_audited(request: Request) -> None:
    """require_token, and a refusal of a model action (401) goes into the audit trail."""
    try:
        require_token(request)
    except HTTPException as exc:
        if request.method == "POST":
            refusals: Callable[[Request, int, str], None] | None = getattr(request.app.state, "model_refusals", None)
            if refusals is not None:
                refusals(request, exc.status_code, str(exc.detail))
        raise


router = APIRouter(dependencies=[Depends(require_token_audited)])


def _rows(ctx) -> list[dict[str, Any]]:
    rows = mv.as_dicts(mv.list_versions(ctx.db))
    for r in rows:
        r["summary"] = registry.metrics_summary(r["metrics"])
    return rows


async def _act(request: Request, version: str | None) -> dict[str, Any]:
    """Promote ``version`` (or roll back when None) as the caller; HTTPException 404/409 with the reason."""
    ctx = web_context(request)
    fields = await review_fields(request)
    who, address = reviewer(request, str(fields.get("by", "")))
    note = str(fields.get("reason", ""))[:NOTE_CHARS]
    try:
        if version is None:
            old, new = registry.rollback(ctx.settings, ctx.db, who, address, note)
        else:
            old, new = registry.promote(ctx.settings, ctx.db, version, who, address, note)
    except RegistryError as exc:
        unknown = version is not None and mv.get(ctx.db, version) is None
        raise HTTPException(404 if unknown else 409, str(exc)) from None
    return {"old": old, "serving": new, "by": who}


@router.get("/models", response_class=HTMLResponse)
def models_page(ctx: Context, error: str = "") -> HTMLResponse:
    return render("models.html", ctx, models=_rows(ctx), error=error[:300])


async def _form(request: Request, version: str | None, back: str) -> Any:
    try:
        await _act(request, version)
    except HTTPException as exc:
        ctx = web_context(request)
        page = render("models.html", ctx, models=_rows(ctx), error=str(exc.detail))
        page.status_code = exc.status_code
        return page
    return RedirectResponse(back, status_code=303)


@router.post("/models/rollback")
async def form_rollback(request: Request) -> Any:
    return await _form(request, None, "../models")


@router.post("/models/{version}/promote")
async def form_promote(version: str, request: Request) -> Any:
    return await _form(request, version, "../../models")


@router.get("/api/models")
def api_models(ctx: Context) -> list[dict[str, Any]]:
    """Every version, oldest first: state, sha256, card, parent, the corrections it was trained on and held
    out against, its learning round's metrics (and their one-line summary), who promoted it and when."""
    return _rows(ctx)


@router.post("/api/models/rollback")
async def api_rollback(request: Request) -> dict[str, Any]:
    return await _act(request, None)


@router.post("/api/models/{version}/promote")
async def api_promote(version: str, request: Request) -> dict[str, Any]:
    return await _act(request, version)
