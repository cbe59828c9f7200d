"""A person's approve/reject of a result held by the quality gate, as sent from the web: by the job page's
plain forms (``/jobs/<id>/approve``) or by scripts as JSON (``/api/jobs/<id>/approve``)."""

from __future__ import annotations

import json
from urllib.parse import parse_qs

from fastapi import HTTPException, Request

from storage.review import decide_review
from storage.states import JobState, ReviewDecision

from .web_context import client_address, web_context

#: Longest reviewer name and note kept: the audit trail is for reading, not for storing what a client sends.
NAME_CHARS, NOTE_CHARS = 64, 2000
#: Largest approve/reject body read: a name and a note fit many times over; a client may not make the node
#: buffer more (a body arrives within web.request_timeout, but at network speed that is gigabytes).
MAX_BODY_BYTES = 64 * 1024


def reviewer(request: Request, given: str) -> tuple[str, str]:
    """Who decided and from where: the name typed (or sent), how they were let in, the client address."""
    how = "web token" if web_context(request).token else "dashboard on loopback"
    name = " ".join(str(given or "").split())[:NAME_CHARS] or "unnamed"
    return f"{name} ({how})", client_address(request)


async def review_fields(request: Request) -> dict:
    """The form (application/x-www-form-urlencoded) or JSON body of an approve/reject request."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise HTTPException(413, f"body larger than {MAX_BODY_BYTES // 1024} KiB")
    if request.headers.get("content-type", "").startswith("application/json"):
        try:
            data = json.loads(bytes(body) or b"{}")
        except ValueError:
            raise HTTPException(400, "body is not valid JSON") from None
        return data if isinstance(data, dict) else {}
    return {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace")).items()}


async def decide(request: Request, job_id: int, decision: ReviewDecision) -> dict:
    """Record the decision (409 unless the job is waiting for review) and say where the job goes next."""
    fields = await review_fields(request)
    who, address = reviewer(request, fields.get("reviewer", ""))
    note = str(fields.get("reason", ""))[:NOTE_CHARS]
    if not decide_review(web_context(request).db, job_id, decision, who, address, note):
        raise HTTPException(409, "job is not waiting for review")
    state = JobState.QUEUED if decision == ReviewDecision.APPROVED else JobState.REJECTED
    return {"job": job_id, "review": decision.value, "state": state.value, "by": who}
