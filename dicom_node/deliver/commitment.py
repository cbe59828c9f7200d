"""Storage Commitment (Push Model, PS3.4 J), the node's side: asking an archive to confirm it keeps what was
sent (N-ACTION), hearing its answer (N-EVENT-REPORT, on the sending association or on our listener), and
giving up on an archive that never answers.

All of it here, so that what a transaction is and when a delivery counts as kept is decided in one module;
the rows themselves live in storage/deliveries.py. The receive stage comes before deliver and does not
import it: the service registers :class:`ListenerAnswers` with the listener for this SOP class.
"""

from __future__ import annotations

import datetime as dt
import logging

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.presentation import build_role

from storage import deliveries
from storage.db import Database
from storage.models import utcnow

from ..config import Destination

log = logging.getLogger("dicom_node.deliver.commitment")

#: Storage Commitment Push Model SOP class and its well-known instance (PS3.4 J.3)
SOP_CLASS = "1.2.840.10008.1.20.1"
INSTANCE = "1.2.840.10008.1.20.1.1"

#: Failure Reason (0008,1197) values of Storage Commitment (PS3.3 C.14.1.1)
FAILURE_REASONS = {0x0110: "processing failure", 0x0112: "no such object instance", 0x0213: "resource limitation",
                   0x0122: "referenced SOP class not supported", 0x0119: "class / instance conflict",
                   0x0131: "duplicate transaction UID"}

SUCCESS = 0x0000
PROCESSING_FAILURE = 0x0110
NO_SUCH_SOP_INSTANCE = 0x0112
NO_SUCH_EVENT_TYPE = 0x0113
INVALID_ARGUMENT = 0x0115


def parse_report(ds: Dataset) -> tuple[str, set[str], dict[str, str]]:
    """(transaction UID, committed SOP Instance UIDs, failed ones with their reason) from the Event
    Information of an N-EVENT-REPORT (event type 1: all committed, 2: failures exist)."""
    committed = {str(r.ReferencedSOPInstanceUID) for r in ds.get("ReferencedSOPSequence", [])}
    failed = {}
    for r in ds.get("FailedSOPSequence", []):
        code = int(r.get("FailureReason", 0x0110))
        failed[str(r.ReferencedSOPInstanceUID)] = f"0x{code:04X} {FAILURE_REASONS.get(code, 'failure')}"
    return str(ds.TransactionUID), committed - set(failed), failed


def propose(ae: AE) -> list:
    """Ask for Storage Commitment on a sending association; returns the role selection to propose (we may
    also be the SCP of the class there: the archive may answer on that association)."""
    ae.add_requested_context(SOP_CLASS, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    return [build_role(SOP_CLASS, scu_role=True, scp_role=True)]


def request(db: Database, assoc, dest: Destination, item: deliveries.Claimed) -> tuple[str, dt.datetime] | str:
    """N-ACTION (Request Storage Commitment, action type 1) for the row's instances under a new transaction,
    remembered on the row before asking so that an answer arriving at once is matched. Returns the
    transaction and the deadline for its answer, or what went wrong."""
    txn = generate_uid()
    deadline = utcnow() + dt.timedelta(seconds=dest.commitment_timeout_seconds)
    deliveries.set_transaction(db, item.id, txn)
    ds = Dataset()
    ds.TransactionUID = txn
    refs = []
    for f in item.files:
        r = Dataset()
        r.ReferencedSOPClassUID = f["sop_class"]
        r.ReferencedSOPInstanceUID = f["sop_uid"]
        refs.append(r)
    ds.ReferencedSOPSequence = refs
    try:
        status, _ = assoc.send_n_action(ds, 1, SOP_CLASS, INSTANCE)
    except ValueError as exc:
        return f"the destination does not accept Storage Commitment ({exc})"
    if not status:
        return "no N-ACTION response to the Storage Commitment request (timeout or abort)"
    if status.Status != 0x0000:
        return f"Storage Commitment request refused: N-ACTION status 0x{status.Status:04X}"
    return txn, deadline


def record(db: Database, info: Dataset | tuple[str, set[str], dict[str, str]], source: str) -> int:
    """Record an archive's answer (its Event Information, or that already parsed) against our delivery;
    returns the N-EVENT-REPORT status to answer."""
    try:
        txn, committed, failed = parse_report(info) if isinstance(info, Dataset) else info
        outcome = deliveries.record_commitment(db, txn, committed, failed)
    except Exception:
        log.exception("Storage Commitment answer %s could not be recorded", source)
        return PROCESSING_FAILURE
    log.info("Storage Commitment answer %s: %s", source, outcome)
    return SUCCESS


def on_sending_association(db: Database):
    """A pynetdicom EVT_N_EVENT_REPORT handler for the association that sent the files."""

    def handler(event) -> int:
        return record(db, event.event_information, "on the sending association")

    return handler


class ListenerAnswers:
    """The listener's handler of N-EVENT-REPORTs of this SOP class (an archive opens an association to
    answer): only Storage Commitment results (event type 1 or 2) are understood."""

    sop_class = SOP_CLASS

    def __init__(self, db: Database):
        self.db = db

    def __call__(self, report) -> int:
        """``report``: a :class:`dicom_node.receive.dimse.EventReport`."""
        if report.event_type not in (1, 2) or report.data is None:
            return NO_SUCH_EVENT_TYPE
        try:
            answer = parse_report(report.information())
        except Exception as exc:
            log.warning("undecodable Storage Commitment report from %s: %s", report.peer.address, exc)
            return INVALID_ARGUMENT
        return record(self.db, answer, f"from {report.peer.calling_ae}")


def fail_overdue(db: Database, dest: Destination) -> list[tuple[int, str]]:
    """Deliveries whose archive never answered ``commitment_max_requests`` requests: failed, as (job, reason)."""
    if not dest.storage_commitment:
        return []
    return [(job_id, reason) for _, job_id, reason in
            deliveries.overdue_commitments(db, dest.name, dest.commitment_max_requests)]
