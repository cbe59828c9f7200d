"""The database schema: what arrived (study → series → instance), what was done with it (jobs), what came out
(volumes) and where it went (deliveries).

Patient names are not stored: admins find studies by Study Instance UID or accession number, and the
database then holds less PHI to protect.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import Float, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from .states import CorrectionState, JobState, ModelState, OutboxState, ReviewDecision, SeriesState, Verdict


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class Study(Base):
    __tablename__ = "studies"
    id: Mapped[int] = mapped_column(primary_key=True)
    study_uid: Mapped[str] = mapped_column(String(64), unique=True)
    accession_number: Mapped[str] = mapped_column(String(16), default="")
    study_date: Mapped[str] = mapped_column(String(8), default="")
    study_description: Mapped[str] = mapped_column(String(64), default="")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    series: Mapped[list[Series]] = relationship(back_populates="study")


class Series(Base):
    """A received series. ``state`` (``SeriesState``): receiving → queued | skipped when judged complete, then
    the end state of its newest job (done, failed, skipped)."""

    __tablename__ = "series"
    id: Mapped[int] = mapped_column(primary_key=True)
    series_uid: Mapped[str] = mapped_column(String(64), unique=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"))
    modality: Mapped[str] = mapped_column(String(16), default="")
    body_part: Mapped[str] = mapped_column(String(64), default="")
    series_description: Mapped[str] = mapped_column(String(64), default="")
    series_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    state: Mapped[str] = mapped_column(String(16), default=SeriesState.RECEIVING)
    n_instances: Mapped[int] = mapped_column(Integer, default=0)
    first_received_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    last_received_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    completed_at: Mapped[dt.datetime | None] = mapped_column(nullable=True)
    # completion (dicom_node/decide/completion.py): how many instances the routing PACS holds, by whom that
    # was said ("" = nobody asked yet), how many instances the node held when it was asked
    expected_count: Mapped[int | None] = mapped_column(Integer, nullable=True)
    expected_from: Mapped[str] = mapped_column(String(64), default="")
    expected_held: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # not judged quiet before this time: after an A-ABORT / dropped association or an unclean stop
    quiet_until: Mapped[dt.datetime | None] = mapped_column(nullable=True)
    fetch_attempts: Mapped[int] = mapped_column(Integer, default=0)
    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")
    jobs: Mapped[list[Job]] = relationship(back_populates="series")
    __table_args__ = (Index("ix_series_state_last", "state", "last_received_at"),)


class Instance(Base):
    """One stored SOP instance, with the header fields the rules and geometry checks need."""

    __tablename__ = "instances"
    id: Mapped[int] = mapped_column(primary_key=True)
    sop_uid: Mapped[str] = mapped_column(String(64), unique=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax: Mapped[str] = mapped_column(String(64), default="")
    # relative to the data folder (storage/filestore.py: stored_path, resolve_stored); "" once purged
    path: Mapped[str] = mapped_column(Text)
    size: Mapped[int] = mapped_column(Integer, default=0)
    instance_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    rows: Mapped[int | None] = mapped_column(Integer, nullable=True)
    columns: Mapped[int | None] = mapped_column(Integer, nullable=True)
    frames: Mapped[int] = mapped_column(Integer, default=1)
    position: Mapped[str] = mapped_column(String(128), default="")  # ImagePositionPatient, backslash-joined
    orientation: Mapped[str] = mapped_column(String(160), default="")  # ImageOrientationPatient
    pixel_spacing: Mapped[str] = mapped_column(String(64), default="")
    frame_of_reference_uid: Mapped[str] = mapped_column(String(64), default="")
    image_type: Mapped[str] = mapped_column(String(128), default="")
    received_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    calling_aet: Mapped[str] = mapped_column(String(16), default="")
    # Images in Acquisition (0020,1002) and Acquisition Number (0020,0012): an expected count from the scanner
    images_in_acquisition: Mapped[int | None] = mapped_column(Integer, nullable=True)
    acquisition_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    series: Mapped[Series] = relationship(back_populates="instances")


class Job(Base):
    """Segmentation of one series. ``timings`` holds seconds per stage as JSON.

    ``state`` (``JobState``): queued → running (a worker holds its lease: load, predict, quality gate, encode)
    → delivering (the result waits in the outbox; no worker is held) → done (every delivery sent, or committed
    where the destination confirms) | failed; or skipped. review: held by the quality gate until a person
    approves (then queued, to go to the outbox) or rejects it; rejected: never sent; dropped: failed the gate
    under quality_policy ``drop`` (kept here, not sent). ``sending`` is the state of jobs from before the
    outbox (a worker sending in the job).
    """

    __tablename__ = "jobs"
    id: Mapped[int] = mapped_column(primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    state: Mapped[str] = mapped_column(String(16), default=JobState.QUEUED, index=True)
    reason: Mapped[str] = mapped_column(Text, default="")  # skip reason or last error
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    urgent: Mapped[bool] = mapped_column(default=False)
    rule: Mapped[str] = mapped_column(String(64), default="")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    started_at: Mapped[dt.datetime | None] = mapped_column(nullable=True)
    finished_at: Mapped[dt.datetime | None] = mapped_column(nullable=True)
    next_attempt_at: Mapped[dt.datetime | None] = mapped_column(nullable=True)
    timings: Mapped[str] = mapped_column(Text, default="{}")
    model_version: Mapped[str] = mapped_column(String(64), default="")
    device: Mapped[str] = mapped_column(String(32), default="")
    seg_series_uid: Mapped[str] = mapped_column(String(64), default="")
    seg_sop_uid: Mapped[str] = mapped_column(String(64), default="")
    seg_path: Mapped[str] = mapped_column(Text, default="")  # relative to the data folder, like Instance.path
    # lease: the worker holding a running job renews it by heartbeat; an expired lease means the worker died
    lease_owner: Mapped[str] = mapped_column(String(64), default="")
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(nullable=True)
    heartbeat_at: Mapped[dt.datetime | None] = mapped_column(nullable=True)
    # set when later instances made this job's result out of date; points at the job that replaces it
    superseded_by: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"), nullable=True)
    # how many instances the series had when this job was made (the series may grow later)
    n_instances: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # quality gate: the worst per-structure verdict (pass | warn | fail; "" before the gate ran), and the
    # review of a held result: approved | rejected, by whom (user or token name), from where, when, why
    quality: Mapped[str] = mapped_column(String(8), default=Verdict.NONE, server_default="")
    review: Mapped[str] = mapped_column(String(16), default=ReviewDecision.NONE, server_default="")
    reviewed_by: Mapped[str] = mapped_column(String(128), default="", server_default="")
    reviewed_from: Mapped[str] = mapped_column(String(64), default="", server_default="")
    reviewed_at: Mapped[dt.datetime | None] = mapped_column(nullable=True)
    review_note: Mapped[str] = mapped_column(Text, default="", server_default="")
    series: Mapped[Series] = relationship(back_populates="jobs", foreign_keys=[series_id])
    volumes: Mapped[list[StructureVolume]] = relationship(back_populates="job", cascade="all, delete-orphan")
    deliveries: Mapped[list[Delivery]] = relationship(back_populates="job", cascade="all, delete-orphan")
    outbox: Mapped[list[OutboxItem]] = relationship(back_populates="job", cascade="all, delete-orphan")
    quality_checks: Mapped[list[QualityCheck]] = relationship(back_populates="job", cascade="all, delete-orphan")


class Event(Base):
    """One step in a study's life (received, complete, queued, running, encoded, sending, delivered, skipped,
    failed, retried, superseded, ...), timestamped: the timeline ``dicom-node show`` prints."""

    __tablename__ = "events"
    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)
    kind: Mapped[str] = mapped_column(String(32))
    study_id: Mapped[int | None] = mapped_column(ForeignKey("studies.id"), nullable=True, index=True)
    series_id: Mapped[int | None] = mapped_column(ForeignKey("series.id"), nullable=True, index=True)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"), nullable=True, index=True)
    detail: Mapped[str] = mapped_column(Text, default="")


class StructureVolume(Base):
    __tablename__ = "volumes"
    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    structure: Mapped[str] = mapped_column(String(32))
    snomed_code: Mapped[str] = mapped_column(String(16), default="")
    volume_cm3: Mapped[float] = mapped_column(Float)
    job: Mapped[Job] = relationship(back_populates="volumes")


class Delivery(Base):
    """One attempt to send a job's result to one destination."""

    __tablename__ = "deliveries"
    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    attempt: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column(nullable=True)
    ok: Mapped[bool] = mapped_column(default=False)
    status: Mapped[str] = mapped_column(String(32), default="")
    error: Mapped[str] = mapped_column(Text, default="")
    job: Mapped[Job] = relationship(back_populates="deliveries")


class OutboxItem(Base):
    """One job's result for one destination: what must arrive there, and where that stands.

    The files are encoded once per job (same SOP Instance UIDs on every re-send). Each try is also a row in
    ``deliveries`` (the attempt log shown on the timeline).

    ``state`` (``OutboxState``): pending (due at next_attempt_at) → sending (a sender holds its claim) → sent
    (the destination answered success; waiting for Storage Commitment where configured) → committed (the
    archive confirmed every instance) | failed (given up: the dead letter) | cancelled (the job was superseded
    before it was sent). A destination without Storage Commitment ends at ``sent``.
    """

    __tablename__ = "outbox"
    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    destination: Mapped[str] = mapped_column(String(64), index=True)
    state: Mapped[str] = mapped_column(String(16), default=OutboxState.PENDING, index=True)
    # JSON list of {"path", "sop_class", "sop_uid", "ts"}: the files this destination receives (paths relative
    # to the data folder, like Instance.path)
    files: Mapped[str] = mapped_column(Text, default="[]")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    last_error: Mapped[str] = mapped_column(Text, default="")
    claimed_by: Mapped[str] = mapped_column(String(64), default="")
    claim_expires_at: Mapped[dt.datetime | None] = mapped_column(nullable=True)
    sent_at: Mapped[dt.datetime | None] = mapped_column(nullable=True)
    # Storage Commitment: the transaction asked for, until when its answer is awaited, what is confirmed
    transaction_uid: Mapped[str] = mapped_column(String(64), default="", index=True)
    commit_deadline: Mapped[dt.datetime | None] = mapped_column(nullable=True)
    commit_requests: Mapped[int] = mapped_column(Integer, default=0)
    committed_at: Mapped[dt.datetime | None] = mapped_column(nullable=True)
    finished_at: Mapped[dt.datetime | None] = mapped_column(nullable=True)
    job: Mapped[Job] = relationship(back_populates="outbox")
    __table_args__ = (Index("ix_outbox_dest_state_due", "destination", "state", "next_attempt_at"),)


class DestinationState(Base):
    """Whether a destination answers. While it is down, its deliveries wait together on its clock
    (``next_attempt_at``, exponential backoff) instead of each failing on its own."""

    __tablename__ = "destinations"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    up: Mapped[bool] = mapped_column(default=True)
    since: Mapped[dt.datetime] = mapped_column(default=utcnow)
    failures: Mapped[int] = mapped_column(Integer, default=0)  # consecutive failed connection attempts
    next_attempt_at: Mapped[dt.datetime | None] = mapped_column(nullable=True)
    last_error: Mapped[str] = mapped_column(Text, default="")
    last_ok_at: Mapped[dt.datetime | None] = mapped_column(nullable=True)
    down_notified: Mapped[bool] = mapped_column(default=False)


class AuditEntry(Base):
    """One admin action (dashboard, API or command line): who, from which address, what, when, and how it
    ended. Kept apart from ``events`` because it is the security record: it also holds refused actions and
    actions on jobs that do not exist, and nothing prunes it."""

    __tablename__ = "audit"
    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(128))  # "web (token)", "web (loopback, no token)", "cli:<os user>"
    address: Mapped[str] = mapped_column(String(128), default="")  # client IP, or "<host> (local)" for the CLI
    action: Mapped[str] = mapped_column(String(32))  # retry, requeue, ...
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"), nullable=True, index=True)
    outcome: Mapped[str] = mapped_column(String(32), default="")  # done, refused
    detail: Mapped[str] = mapped_column(Text, default="")


class QualityCheck(Base):
    """The quality gate's verdict on one structure (and side) of a job, with its reasons and measures."""

    __tablename__ = "quality_checks"
    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    structure: Mapped[str] = mapped_column(String(32))
    verdict: Mapped[str] = mapped_column(String(8))  # Verdict
    reason: Mapped[str] = mapped_column(Text, default="")
    metrics: Mapped[str] = mapped_column(Text, default="{}")  # JSON
    job: Mapped[Job] = relationship(back_populates="quality_checks")


class Correction(Base):
    """A Segmentation object received for images the node segmented: a radiologist's correction of the
    node's result (or a copy of it, or one the node cannot use, with the reason).

    ``labels_path``: the correction's labels resampled onto the source series' grid, an ``.npz`` (relative to
    the data folder) with ``classes`` (uint8, slices × rows × columns in the stacked order of the source
    series' instances, values = the model card's label values, 0 background) and ``sop_uids`` (the source
    instances in that order). ``metrics``: JSON, per structure and side (``"femur_left"`` ...) ``{"dice",
    "volume_sent_cm3", "volume_corrected_cm3", "volume_diff_cm3"}`` of what the node sent against the
    correction, plus per structure without side (``"femur"``); ``mean_dice`` averages the structures present
    in either. ``holdout``: kept back to evaluate learning rounds (never trained on), decided once, at the
    hold-out version ``holdout_round``, and never changed after.
    """

    __tablename__ = "corrections"
    id: Mapped[int] = mapped_column(primary_key=True)
    sop_uid: Mapped[str] = mapped_column(String(64), unique=True)  # the correction's SOP Instance UID
    sop_class_uid: Mapped[str] = mapped_column(String(64), default="")
    seg_series_uid: Mapped[str] = mapped_column(String(64), default="")  # the series it arrived in
    instance_id: Mapped[int | None] = mapped_column(ForeignKey("instances.id"), nullable=True, index=True)
    series_id: Mapped[int | None] = mapped_column(ForeignKey("series.id"), nullable=True, index=True)  # source
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"), nullable=True, index=True)  # corrected
    model_version: Mapped[str] = mapped_column(String(64), default="")  # of the corrected result
    state: Mapped[str] = mapped_column(String(16), default=CorrectionState.CORRECTED, index=True)
    reason: Mapped[str] = mapped_column(Text, default="")  # why unusable; notes (segments not matched...)
    creator: Mapped[str] = mapped_column(String(64), default="")  # Content Creator's Name
    station: Mapped[str] = mapped_column(String(128), default="")  # Station Name / Manufacturer + model
    calling_ae: Mapped[str] = mapped_column(String(16), default="")
    content_at: Mapped[dt.datetime | None] = mapped_column(nullable=True)  # Content Date/Time: when it was made
    received_at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)
    labels_path: Mapped[str] = mapped_column(Text, default="")
    metrics: Mapped[str] = mapped_column(Text, default="{}")
    mean_dice: Mapped[float | None] = mapped_column(Float, nullable=True)
    holdout: Mapped[bool] = mapped_column(default=False)
    holdout_round: Mapped[int | None] = mapped_column(Integer, nullable=True)


class ModelVersion(Base):
    """One model in the registry: the checkpoint (path, sha256, card), where it came from (parent, the
    corrections it was trained on and held out against), what it scored, and who made it serve.

    ``path`` is relative to the data folder for models a learning round made, absolute for the bundled or a
    configured checkpoint. ``metrics``: JSON of the learning round that made it (per-structure Dice of the
    serving model and of this one on the held-out corrections, the gate's check, the decision in words).
    """

    __tablename__ = "model_versions"
    id: Mapped[int] = mapped_column(primary_key=True)
    version: Mapped[str] = mapped_column(String(64), unique=True)
    path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    card: Mapped[str] = mapped_column(Text, default="{}")  # the model card, JSON
    parent: Mapped[str] = mapped_column(String(64), default="")  # the version it was fine-tuned from
    trained_on: Mapped[str] = mapped_column(Text, default="[]")  # JSON list of correction ids
    held_out: Mapped[str] = mapped_column(Text, default="[]")  # JSON list of correction ids
    metrics: Mapped[str] = mapped_column(Text, default="{}")
    state: Mapped[str] = mapped_column(String(16), default=ModelState.CANDIDATE, index=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    promoted_at: Mapped[dt.datetime | None] = mapped_column(nullable=True)
    promoted_by: Mapped[str] = mapped_column(String(128), default="")
