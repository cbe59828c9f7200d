"""Asking the PACS that routed a series about it: how many instances it holds (C-FIND), which ones
(C-FIND at image level) and sending the ones the node lacks (C-MOVE to the node's own AE title).

Why: a quiet timer cannot tell a series that is complete from one whose sender paused or died. The PACS
that routed the series knows how many instances it has; asking it lets the node start at once when it holds
them all, and fetch what is missing instead of segmenting half a series. pynetdicom is the SCU (the node's
acceptor only serves C-STORE/C-ECHO; C-MOVE sends the instances to the node's listener on a separate
association, so nothing here needs an SCP role).

Only UIDs and counts are requested and read: no patient attributes travel in these queries, so none can
reach a log.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]  # names made at import time
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
)

from ..config import Source

log = logging.getLogger("dicom_node.decide.query")

PENDING = (0xFF00, 0xFF01)


class QueryFailed(RuntimeError):
    """The source could not be asked (refused, unreachable, timed out, or answered with a failure)."""


@dataclass(frozen=True)
class MoveResult:
    completed: int
    failed: int
    warning: int
    status: int


def _nodelay(event: evt.Event) -> None:
    """EVT_CONN_OPEN: no Nagle delay, or each small C-FIND exchange waits ~40 ms for a delayed ACK
    (deliver/dimse.py does the same for results; a stage may not import a later one)."""
    try:
        dul_socket = event.assoc.dul.socket
        sock = dul_socket.socket if dul_socket is not None else None
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (AttributeError, OSError):
        pass


def _ae(calling: str, source: Source) -> AE:
    ae = AE(ae_title=calling)
    ae.acse_timeout = source.timeout_seconds
    ae.dimse_timeout = source.timeout_seconds
    ae.network_timeout = source.timeout_seconds
    return ae


def _associate(calling: str, source: Source, context):
    ae = _ae(calling, source)
    ae.add_requested_context(context)
    assoc = ae.associate(source.host, source.port, ae_title=source.ae_title,
                         evt_handlers=[(evt.EVT_CONN_OPEN, _nodelay)])
    if not assoc.is_established:
        why = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "no answer"
        raise QueryFailed(f"association with {source.name} ({source.ae_title}@{source.host}:{source.port}) {why}")
    return assoc


def _find(calling: str, source: Source, identifier: Dataset) -> list[Dataset]:
    assoc = _associate(calling, source, StudyRootQueryRetrieveInformationModelFind)
    matches: list[Dataset] = []
    try:
        for status, ds in assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind):
            if not status:
                raise QueryFailed(f"{source.name}: C-FIND got no response (timeout or abort)")
            code = int(status.Status)
            if code in PENDING:
                if ds is not None:
                    matches.append(ds)
            elif code != 0x0000:
                raise QueryFailed(f"{source.name}: C-FIND failed with status 0x{code:04X}")
    finally:
        assoc.release()
    return matches


def count_instances(calling: str, source: Source, study_uid: str, series_uid: str) -> int | None:
    """Number of Series Related Instances the source holds for the series; None if it does not know it."""
    q = Dataset()
    q.QueryRetrieveLevel = "SERIES"
    q.StudyInstanceUID = study_uid
    q.SeriesInstanceUID = series_uid
    q.NumberOfSeriesRelatedInstances = None
    matches = _find(calling, source, q)
    if not matches:
        return None
    values = [m.get("NumberOfSeriesRelatedInstances") for m in matches]
    try:
        return max(int(v) for v in values if v not in (None, ""))
    except ValueError:
        raise QueryFailed(f"{source.name}: the C-FIND answer carries no NumberOfSeriesRelatedInstances") from None


def instance_uids(calling: str, source: Source, study_uid: str, series_uid: str) -> set[str]:
    """SOP Instance UIDs the source holds in the series (C-FIND at image level)."""
    q = Dataset()
    q.QueryRetrieveLevel = "IMAGE"
    q.StudyInstanceUID = study_uid
    q.SeriesInstanceUID = series_uid
    q.SOPInstanceUID = None
    return {str(m.SOPInstanceUID) for m in _find(calling, source, q) if m.get("SOPInstanceUID")}


def move(calling: str, source: Source, study_uid: str, series_uid: str, sop_uids: list[str] | None) -> MoveResult:
    """Ask the source to C-STORE instances of the series to ``calling`` (the node's own AE title, which the
    PACS must know as a move destination): the listed SOP instances, or the whole series."""
    q = Dataset()
    q.StudyInstanceUID = study_uid
    q.SeriesInstanceUID = series_uid
    if sop_uids:
        q.QueryRetrieveLevel = "IMAGE"
        q.SOPInstanceUID = list(sop_uids) if len(sop_uids) > 1 else sop_uids[0]
    else:
        q.QueryRetrieveLevel = "SERIES"
    assoc = _associate(calling, source, StudyRootQueryRetrieveInformationModelMove)
    last = None
    try:
        for status, _ in assoc.send_c_move(q, calling, StudyRootQueryRetrieveInformationModelMove):
            if not status:
                raise QueryFailed(f"{source.name}: C-MOVE got no response (timeout or abort)")
            last = status
    finally:
        assoc.release()
    assert last is not None
    code = int(last.Status)
    res = MoveResult(completed=int(last.get("NumberOfCompletedSuboperations", 0) or 0),
                     failed=int(last.get("NumberOfFailedSuboperations", 0) or 0),
                     warning=int(last.get("NumberOfWarningSuboperations", 0) or 0), status=code)
    if code not in (0x0000, 0xB000) and not (code & 0xF000 == 0xB000):
        raise QueryFailed(f"{source.name}: C-MOVE failed with status 0x{code:04X} "
                          f"({res.completed} sent, {res.failed} failed)")
    return res
