"""The model registry's rows (table ``model_versions``): which checkpoint serves, which served before, and the
candidates learning rounds made.

Why its own module: the serving model is shared state between every serving process (serve, each worker)
and every admin tool (CLI, dashboard, a learning round's auto-promote). Exactly one row is ``serving`` at a
time, and changing it is one transaction with its audit row and timeline event, so two admins promoting at
once, or a promote racing a rollback, can never leave two models serving or none, and the record of who
changed the model always agrees with what serves.

Rollback goes to the newest ``retired`` version by ``promoted_at`` (when it last started serving): like
``kubectl rollout undo``, a second rollback undoes the first.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence

from sqlalchemy import select, text, update
from sqlalchemy.orm import Session

from .db import Database
from .models import ModelVersion, utcnow
from .rows import rowcount
from .states import AuditOutcome, EventKind, ModelState
from .timeline import add_audit, add_event

#: PostgreSQL advisory lock key of registry changes (any constant; "mdlreg" in ASCII)
_PG_LOCK = 0x6D646C726567
PROMOTE_ACTION = "model-promote"
ROLLBACK_ACTION = "model-rollback"


class RegistryError(ValueError):
    """A registry action that cannot be done, with the reason in words for the admin who asked."""


def serving(db: Database) -> ModelVersion | None:
    """The version serving now (None only before the node registered its first model)."""
    with db.session() as s:
        return s.scalars(select(ModelVersion).where(ModelVersion.state == ModelState.SERVING)
                         .order_by(ModelVersion.promoted_at.desc(), ModelVersion.id.desc()).limit(1)).first()


def serving_digest(db: Database) -> tuple[str, str, str] | None:
    """(version, stored path, sha256) of the serving model: the one cheap query a worker makes at each job."""
    with db.session() as s:
        row = s.execute(select(ModelVersion.version, ModelVersion.path, ModelVersion.sha256)
                        .where(ModelVersion.state == ModelState.SERVING)
                        .order_by(ModelVersion.promoted_at.desc(), ModelVersion.id.desc()).limit(1)).first()
        return (row[0], row[1], row[2]) if row else None


def get(db: Database, version: str) -> ModelVersion | None:
    with db.session() as s:
        return s.scalars(select(ModelVersion).where(ModelVersion.version == version)).first()


def by_sha256(db: Database, sha256: str) -> ModelVersion | None:
    """The version registered for these exact weights (the same file registers once)."""
    with db.session() as s:
        return s.scalars(select(ModelVersion).where(ModelVersion.sha256 == sha256)
                         .order_by(ModelVersion.id).limit(1)).first()


def list_versions(db: Database) -> list[ModelVersion]:
    """Every version, oldest first."""
    with db.session() as s:
        return list(s.scalars(select(ModelVersion).order_by(ModelVersion.created_at, ModelVersion.id)))


def versions_named(db: Database, prefix: str) -> list[str]:
    """Every version string starting with ``prefix`` (for numbering the next learned version)."""
    with db.session() as s:
        return list(s.scalars(select(ModelVersion.version).where(ModelVersion.version.startswith(prefix,
                                                                                                 autoescape=True))))


def register(db: Database, *, version: str, path: str, sha256: str, card_json: str, parent: str = "",
             trained_on: Iterable[int] = (), held_out: Iterable[int] = (), metrics: dict | None = None,
             state: ModelState = ModelState.CANDIDATE, place: Callable[[], None] | None = None) -> int:
    """Add one version; returns its id. A ``serving`` registration is only for the very first model (a later
    one must go through :func:`promote`, which retires the old one): RegistryError otherwise, and for a version
    string the registry already holds or weights (sha256) it holds under another version.

    ``place``: puts the checkpoint file where ``path`` says, called under the registry's lock once the checks
    passed, so no other process can have a row naming that file while it is written."""
    with db.session() as s:
        _lock_all(s)  # serve and workers starting together register the configured file once
        if s.scalar(select(ModelVersion.id).where(ModelVersion.version == version)) is not None:
            raise RegistryError(f"version {version} is already registered")
        same = s.scalar(select(ModelVersion.version).where(ModelVersion.sha256 == sha256).limit(1))
        if same is not None:
            raise RegistryError(f"these weights are registered already, as version {same}")
        if place is not None:
            place()
        now = utcnow()
        row = ModelVersion(version=version, path=path, sha256=sha256, card=card_json, parent=parent,
                           trained_on=json.dumps(sorted(int(i) for i in trained_on)),
                           held_out=json.dumps(sorted(int(i) for i in held_out)),
                           metrics=json.dumps(metrics or {}), state=state, created_at=now)
        if state == ModelState.SERVING:
            if s.scalar(select(ModelVersion.id).where(ModelVersion.state == ModelState.SERVING)) is not None:
                raise RegistryError("another version serves already: register a candidate and promote it")
            row.promoted_at, row.promoted_by = now, "first model of this node"
        s.add(row)
        s.flush()
        if state == ModelState.SERVING:
            add_event(s, EventKind.MODEL_PROMOTED, detail=f"model {version} serves (first model of this node)")
        return row.id


def set_state(db: Database, version: str, state: ModelState) -> None:
    """Mark a version candidate, rejected or retired (a learning round's verdict). Making one serve, or
    un-serving the serving one, goes through :func:`promote` / :func:`rollback`: RegistryError here."""
    if state == ModelState.SERVING:
        raise RegistryError("use promote to make a version serve")
    with db.session() as s:
        row = s.scalars(select(ModelVersion).where(ModelVersion.version == version)).first()
        if row is None:
            raise RegistryError(f"no model version {version}")
        if row.state == ModelState.SERVING:
            raise RegistryError(f"version {version} serves now: promote another one (or roll back) first")
        row.state = state


def _lock_all(s: Session) -> None:
    """Serialise registry changes before reading what to change, until the transaction ends: on SQLite an
    UPDATE that matches nothing still takes the database's write lock; PostgreSQL takes a transaction-level
    advisory lock (row locks would not stop two first registrations into an empty table); any other
    database locks every row."""
    dialect = s.get_bind().dialect.name
    if dialect == "sqlite":
        s.execute(update(ModelVersion).where(ModelVersion.id == -1).values(state=ModelVersion.state))
    elif dialect == "postgresql":
        s.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK})
    else:
        s.execute(select(ModelVersion.id).with_for_update()).all()


def _switch(s: Session, version: str, by: str) -> tuple[str, str]:
    """In the caller's transaction: ``version`` serves, the one before it is retired. RegistryError, in words,
    for an unknown version or one that serves already."""
    now = utcnow()
    res = s.execute(update(ModelVersion).where(ModelVersion.version == version,
                                               ModelVersion.state != ModelState.SERVING)
                    .values(state=ModelState.SERVING, promoted_at=now, promoted_by=by[:128]))
    if rowcount(res) != 1:
        if s.scalar(select(ModelVersion.id).where(ModelVersion.version == version)) is None:
            raise RegistryError(f"no model version {version!r} (see: dicom-node models)")
        raise RegistryError(f"version {version} serves already")
    old = list(s.scalars(select(ModelVersion.version).where(ModelVersion.state == ModelState.SERVING,
                                                            ModelVersion.version != version)))
    s.execute(update(ModelVersion).where(ModelVersion.state == ModelState.SERVING, ModelVersion.version != version)
              .values(state=ModelState.RETIRED))
    return (old[0] if old else ""), version


def _refused(db: Database, by: str, address: str, action: str, reason: str) -> None:
    with db.session() as s:
        add_audit(s, by, address, action, None, AuditOutcome.REFUSED, reason)


def promote(db: Database, version: str, by: str, address: str = "", note: str = "") -> tuple[str, str]:
    """Make ``version`` the serving model and retire the one serving now, in one transaction with its audit row
    and its timeline event; returns (old version, new version). Workers switch at their next job.

    Refused (RegistryError, audited as refused with the reason): an unknown version, or one serving already."""
    return _change(db, PROMOTE_ACTION, by, address, note, lambda s: version)


def rollback(db: Database, by: str, address: str = "", note: str = "") -> tuple[str, str]:
    """Serve again the version that served most recently before the current one (the newest retired by
    ``promoted_at``); returns (old version, new version). Refused, in words and audited, when none has."""

    def target(s: Session) -> str:
        prev = s.scalar(select(ModelVersion.version).where(ModelVersion.state == ModelState.RETIRED)
                        .order_by(ModelVersion.promoted_at.desc(), ModelVersion.id.desc()).limit(1))
        if prev is None:
            raise RegistryError("nothing to roll back to: no other model has served on this node")
        return prev

    return _change(db, ROLLBACK_ACTION, by, address, note, target)


def _change(db: Database, action: str, by: str, address: str, note: str, target) -> tuple[str, str]:
    try:
        with db.session() as s:
            _lock_all(s)
            old, new = _switch(s, target(s), by)
            verb = "rolled back" if action == ROLLBACK_ACTION else "promoted"
            detail = f"{new} serves (was {old or 'none'}), {verb} by {by}" + (f": {note}" if note else "")
            add_audit(s, by, address, action, None, AuditOutcome.DONE, detail)
            add_event(s, EventKind.MODEL_PROMOTED, detail=detail)
            return old, new
    except RegistryError as exc:
        _refused(db, by, address, action, str(exc))
        raise


def decode_ids(text: str) -> list[int]:
    """A stored JSON list of correction ids (``trained_on`` / ``held_out``); [] for anything else."""
    try:
        value = json.loads(text or "[]")
    except json.JSONDecodeError:
        return []
    return [int(i) for i in value if isinstance(i, int)] if isinstance(value, list) else []


def decode_json(text: str) -> dict:
    """A stored JSON object (``card`` / ``metrics``); {} for anything else."""
    try:
        value = json.loads(text or "{}")
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def as_dicts(rows: Sequence[ModelVersion]) -> list[dict]:
    """The registry as plain data (CLI --json, /api/models)."""
    out = []
    for r in rows:
        card = decode_json(r.card)
        out.append({"version": r.version, "state": r.state, "sha256": r.sha256, "path": r.path,
                    "parent": r.parent, "trained_on": decode_ids(r.trained_on), "held_out": decode_ids(r.held_out),
                    "metrics": decode_json(r.metrics),
                    "created_at": r.created_at.isoformat(timespec="seconds") if r.created_at else None,
                    "promoted_at": r.promoted_at.isoformat(timespec="seconds") if r.promoted_at else None,
                    "promoted_by": r.promoted_by, "card": {"name": card.get("name", ""),
                                                          "version": card.get("version", "")}})
    return out
