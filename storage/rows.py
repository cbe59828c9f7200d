"""Small typed helpers over SQLAlchemy sessions: a row that must exist, and how many rows an UPDATE moved.

Why: ``Session.get`` answers ``None`` for a missing key and ``Session.execute`` is typed as a plain
``Result`` (which has no ``rowcount``) even for an UPDATE; these say what the callers rely on.
"""

from __future__ import annotations

from typing import Any, TypeVar, cast

from sqlalchemy.engine import CursorResult, Result
from sqlalchemy.orm import Session

T = TypeVar("T")


def get_row(s: Session, model: type[T], key: int, *, populate_existing: bool = False) -> T:
    """The row ``key`` of ``model``, which the caller knows exists (it holds its id from the same database);
    ``populate_existing`` reads it again even when the session holds a copy."""
    row = s.get(model, key, populate_existing=populate_existing)
    if row is None:
        raise LookupError(f"no {model.__name__} with id {key}")
    return row


def rowcount(result: Result[Any]) -> int:
    """Rows matched by the UPDATE or DELETE that produced ``result`` (a cursor result at run time)."""
    return cast(CursorResult[Any], result).rowcount
