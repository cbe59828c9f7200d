"""Every state, verdict and event kind the node stores, as string enums in one place.

They are ``StrEnum`` so that the database keeps plain, readable strings (admins query the tables with SQL,
the dashboard and the JSON API show them as they are) while the code compares against names a type checker
knows: a misspelt state is an AttributeError at import, not a job that silently never matches a query.
Modelled on highdicom's ``seg/enum.py`` and mercure's ``event_types.py``. A member's value is its name in
lower case (``auto()``), spelt out only where it differs.
"""

from __future__ import annotations

from enum import StrEnum, auto


class SeriesState(StrEnum):
    """Where a received series is: still arriving, complete and judged, then handed to a job."""

    RECEIVING = auto()
    COMPLETE = auto()
    QUEUED = auto()
    SKIPPED = auto()
    #: the series' newest job ended (delivered, or given up): the series says so rather than QUEUED
    DONE = auto()
    FAILED = auto()


class JobState(StrEnum):
    """One segmentation job's life: queued → running → (review) → delivering → done, or an end state."""

    QUEUED = auto()
    RUNNING = auto()
    #: results are in the outbox; the job is done when every destination has them
    DELIVERING = auto()
    #: rows written before the outbox existed (a worker sending inside the job); still readable
    SENDING = auto()
    #: held by the quality gate until a person approves or rejects it
    REVIEW = auto()
    DONE = auto()
    FAILED = auto()
    SKIPPED = auto()
    REJECTED = auto()
    #: the quality gate failed and the destination's policy is ``drop``
    DROPPED = auto()

    @classmethod
    def finished(cls) -> tuple[JobState, ...]:
        """States a job never leaves by itself (an admin's requeue can still move it)."""
        return (cls.DONE, cls.FAILED, cls.SKIPPED, cls.REJECTED, cls.DROPPED)

    @classmethod
    def superseding(cls) -> tuple[JobState, ...]:
        """States of an older job that a new job for the same series replaces (it got further than queued)."""
        return (cls.RUNNING, cls.DELIVERING, cls.SENDING, cls.REVIEW, cls.DONE)


class OutboxState(StrEnum):
    """One result's delivery to one destination."""

    PENDING = auto()
    SENDING = auto()
    #: stored at the destination (and awaiting Storage Commitment where asked for)
    SENT = auto()
    #: the destination confirmed it keeps every instance (Storage Commitment)
    COMMITTED = auto()
    FAILED = auto()
    #: a newer job for the same series replaced it before it went out
    CANCELLED = auto()


class Verdict(StrEnum):
    """The quality gate's verdict on one structure, and on a job (its worst structure)."""

    #: the gate has not run (jobs from before it existed, or skipped series)
    NONE = ""
    PASS = auto()
    WARN = auto()
    FAIL = auto()


class ReviewDecision(StrEnum):
    """A person's decision on a held result."""

    NONE = ""
    APPROVED = auto()
    REJECTED = auto()


class QualityPolicy(StrEnum):
    """What a destination gets when the gate fails a result."""

    HOLD = auto()
    SEND_FLAGGED = auto()
    DROP = auto()


class EventKind(StrEnum):
    """The kinds of line on a series' timeline (table ``events``)."""

    RECEIVED = auto()
    STABLE = auto()
    EXPECTED = auto()
    WAIT = auto()
    FETCH = auto()
    FETCHED = auto()
    COMPLETE = auto()
    QUEUED = auto()
    SKIPPED = auto()
    SUPERSEDED = auto()
    RUNNING = auto()
    QUALITY = auto()
    REVIEW = auto()
    ENCODED = auto()
    DELIVERING = auto()
    SENT = auto()
    DELIVERED = auto()
    COMMITTED = auto()
    CANCELLED = auto()
    RETRY = auto()
    RESENT = auto()
    REDELIVER = auto()
    REQUEUED = auto()
    LEASE_EXPIRED = "lease-expired"
    FAILED = auto()
    PURGED = auto()
    #: the quality gate failed the result and a destination's policy is ``drop``
    DROPPED = auto()
    #: a person's review of a held result (``ReviewDecision``)
    APPROVED = auto()
    REJECTED = auto()
    #: an admin's retry or requeue that was refused (the job was running or delivering)
    RETRY_REFUSED = "retry-refused"
    REQUEUE_REFUSED = "requeue-refused"
    #: identical copies of stored instances re-sent: one event per series and burst, its count kept up to date
    DUPLICATES = auto()
    #: a stored SOP Instance UID re-sent with other content or into another series (``DuplicatePolicy``)
    CONFLICTING_RESEND = "conflicting-resend"
    #: a SEG arrived that corrects (or copies) the node's result for this series (``CorrectionState``)
    CORRECTION = auto()
    #: the serving model changed (``dicom-node models promote`` / ``rollback``, or a learning round)
    MODEL_PROMOTED = "model-promoted"
    #: the rolling median Dice of a structure for the serving model fell below ``learning.accuracy_floor``
    #: (no series; detail JSON names the model version and structure): notified once until it recovers
    ACCURACY_DROP = "accuracy-drop"
    #: that rolling median is back at or above the floor: a later drop is notified again
    ACCURACY_RECOVERED = "accuracy-recovered"
    #: a job ran on another model than the job before (the promoted one), or the promoted one could not be
    #: loaded and the job ran on the one before (the reason in words)
    MODEL = auto()

    @classmethod
    def refused(cls, action: str) -> EventKind:
        """The event of a refused admin action (``retry`` or ``requeue``); any other action reads as a retry."""
        return cls.REQUEUE_REFUSED if action == "requeue" else cls.RETRY_REFUSED


class AuditOutcome(StrEnum):
    """What became of an admin's action (table ``audit``)."""

    DONE = auto()
    REFUSED = auto()


class DuplicatePolicy(StrEnum):
    """What a C-STORE of a stored SOP Instance UID with other content, or into another series, does
    (``scp.duplicate_policy``); an identical copy is never stored twice whatever the policy."""

    #: the first copy stays; the re-send is answered with a warning and not stored
    KEEP = auto()
    #: the newer copy takes the instance's place (and series); the first copy's file is removed
    REPLACE = auto()


class Resend(StrEnum):
    """How the listener found a received instance that re-uses a stored SOP Instance UID."""

    IDENTICAL = auto()
    #: other content or another series, not stored (``DuplicatePolicy.KEEP``)
    KEPT_FIRST = "kept-first"
    #: other content or another series, stored in place of the first copy (``DuplicatePolicy.REPLACE``)
    REPLACED = auto()


class CorrectionState(StrEnum):
    """What a received Segmentation object turned out to be (table ``corrections``).

    Told apart by SOP Instance UID and content, never by series, algorithm type or description: OHIF may
    save into the node's own series, and 3D Slicer keeps the loaded SEG's AUTOMATIC algorithm type."""

    #: a radiologist's edit of the node's result: scored against what was sent, and training data
    CORRECTED = auto()
    #: a saved copy whose labels equal what the node sent: not a verified correction (an unedited result
    #: is not a confirmed one), never trained on
    UNCHANGED = auto()
    #: a SEG the node cannot use (no source series held, unknown segments only, another grid...): the reason
    #: in words; never segmented, never sent anywhere
    UNUSABLE = auto()
    #: a SEG of a series the node holds but has no result for yet (its job queued or running, the series still
    #: arriving): read and scored as soon as the result is encoded; UNUSABLE if the job ends without one
    WAITING = auto()
    #: an admin deleted it: its label file is gone and it no longer keeps its source images from the purge
    DELETED = auto()


class ModelState(StrEnum):
    """A model version in the registry (table ``model_versions``): exactly one serves at a time."""

    #: what the workers use for their next job
    SERVING = auto()
    #: trained by a learning round, not (yet) promoted
    CANDIDATE = auto()
    #: served before; ``dicom-node models rollback`` goes back to the newest of these
    RETIRED = auto()
    #: a learning round's candidate that did not beat the serving model on the held-out corrections
    REJECTED = auto()
