"""A complete series of Segmentation objects: each instance a correction, a copy, the node's own result
coming back, or a SEG the node cannot use — told apart and recorded (table ``corrections``).

Why by SOP Instance UID and content, never by series, algorithm type or description: OHIF may save into
the node's own SEG series as a new instance, and 3D Slicer keeps the loaded SEG's AUTOMATIC algorithm type
and description (../shared/REFERENCE.md §7). So:

1. a SOP Instance UID the node wrote itself (any job's SEG) is its own result echoed back: ignored, no row;
2. the source series is found among the series the node holds by Referenced Series Sequence, else by the
   source images the SEG references (Source Image Sequence, per-frame Derivation Image Sequence), in the
   same Frame of Reference; the result it edits is the newest job of that series that was not superseded;
3. both the SEG and the node's own stored SEG are read onto the source grid through the same reader
   (learn/segread.py): identical labels → UNCHANGED (an unedited result is not a verified one), else
   CORRECTED with Dice and volumes (learn/scoring.py); anything that stops this → UNUSABLE, in words.
   A SEG that arrives before the node's result for its series exists (the job queued or running: a
   radiologist may draw on the images while the node is still busy, or a scale-out worker is down) is
   recorded WAITING and read again by the scheduler's scan once the result is encoded.

A correction is never segmented and never sent anywhere: the completion checker closes the SEG series as
skipped ("being read") and hands it to ``IntakeThread``, which reads it on a thread of its own (seconds for a
large SEG, which the completion of other series must not wait for) and rewrites the skip reason in words.
The labels go to ``corrections/<id>.npz`` under the data folder (named by the row id). Logs name series by
their database id, never by UID or patient.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from sqlalchemy import select

from storage.corrections import (
    content_time,
    find_source_series,
    is_own_result,
    labels_file,
    pending_result,
    record,
    recorded_state,
    reword_seg_series,
    segmented_job,
    series_skipped_as,
    set_result,
    waiting_corrections,
)
from storage.db import Database
from storage.filestore import resolve_stored, stored_path
from storage.models import Instance, Job
from storage.series import series_instances
from storage.states import CorrectionState

from ..decide.completion import READING
from ..errors import admin_message
from ..repeats import Repeats
from .scoring import score
from .segread import SegRead, SourceGrid, Unusable, read_seg, source_grid

log = logging.getLogger("dicom_node.learn.intake")

TAKEN = "segmentation object: taken as a correction (see dicom-node corrections)"
OWN = "segmentation object: the node's own result sent back to it (ignored)"
WAITS = ("segmentation object: waiting for the node's result of the series it edits, then scored "
         "(see dicom-node corrections)")


def references(ds: Dataset) -> tuple[list[str], list[str]]:
    """(series UIDs, SOP Instance UIDs) the SEG says it was made from."""
    series, sops = [], []
    for item in ds.get("ReferencedSeriesSequence", []) or []:
        series.append(str(item.get("SeriesInstanceUID", "") or ""))
        for ref in item.get("ReferencedInstanceSequence", []) or []:
            sops.append(str(ref.get("ReferencedSOPInstanceUID", "") or ""))
    for ref in ds.get("SourceImageSequence", []) or []:
        sops.append(str(ref.get("ReferencedSOPInstanceUID", "") or ""))
    shared = ds.get("SharedFunctionalGroupsSequence") or []
    for group in [*shared, *(ds.get("PerFrameFunctionalGroupsSequence", []) or [])]:
        for der in group.get("DerivationImageSequence", []) or []:
            for ref in der.get("SourceImageSequence", []) or []:
                sops.append(str(ref.get("ReferencedSOPInstanceUID", "") or ""))
    return [u for u in dict.fromkeys(series) if u], [u for u in dict.fromkeys(sops) if u]


def who(ds: Dataset, inst: Instance) -> dict:
    """Who made it, where, and when (the columns of that name)."""
    station = str(ds.get("StationName", "") or "").strip()
    if not station:
        station = " ".join(str(ds.get(k, "") or "").strip() for k in ("Manufacturer", "ManufacturerModelName")).strip()
    return {"creator": str(ds.get("ContentCreatorName", "") or "")[:64], "station": station[:128],
            "calling_ae": (inst.calling_aet or "")[:16],
            "content_at": content_time(str(ds.get("ContentDate", "") or ""), str(ds.get("ContentTime", "") or ""))}


class Intake:
    """The completion checker's callback for a series of Segmentation objects (dicom_node/service.py wires
    it): records each instance, returns the series' skip reason in words."""

    def __init__(self, db: Database, root: str | os.PathLike, after_corrected: Callable[[], object] | None = None):
        self.db = db
        self.root = Path(root)
        #: called once per series that brought a scored correction (the service checks accuracy-drop there)
        self.after_corrected = after_corrected

    def __call__(self, series_id: int) -> str:
        instances, outcomes, reasons = self._take_series(series_id)
        log.info("series %s: %d segmentation objects: %s", series_id, len(instances),
                 ", ".join(f"{n} {state}" for state, n in sorted(outcomes.items())))
        if outcomes[CorrectionState.CORRECTED] and self.after_corrected is not None:
            self.after_corrected()
        return self._series_reason(outcomes, reasons)

    def _take_series(self, series_id: int) -> tuple[list[Instance], Counter[str], list[str]]:
        """Each instance of the series taken (once: a recorded one answers what it was)."""
        _, instances = series_instances(self.db, series_id)
        outcomes: Counter[str] = Counter()
        reasons = []
        for inst in sorted(instances, key=lambda i: i.id):
            state, reason = self.take(inst)
            outcomes[state] += 1
            if reason:  # the series' skip reason is logged: without the segment labels, which are free text
                reasons.append(reason.split(" (segments:")[0])
        return instances, outcomes, reasons

    @staticmethod
    def _series_reason(outcomes: Counter[str], reasons: list[str]) -> str:
        if outcomes[CorrectionState.CORRECTED] or outcomes[CorrectionState.UNCHANGED]:
            return TAKEN
        if outcomes[CorrectionState.WAITING]:
            return WAITS
        if outcomes["own"] and not outcomes[CorrectionState.UNUSABLE]:
            return OWN
        return "segmentation object not usable as a correction: " + ("; ".join(dict.fromkeys(reasons))
                                                                     or "see dicom-node corrections")

    def retake_waiting(self) -> int:
        """Corrections that arrived before their series' result: each whose result is now encoded is read and
        scored, each whose job ended without one becomes UNUSABLE in words; the rest go on waiting. Returns
        how many were settled. Called by the scheduler's scan (cheap when none waits: one indexed query)."""
        settled = corrected = 0
        for cid, instance_id, source in waiting_corrections(self.db):
            if source is not None and segmented_job(self.db, source) is None \
                    and pending_result(self.db, source) is not None:
                continue  # still coming: two indexed queries, the SEG file is not read again
            with self.db.session() as s:
                inst = s.get(Instance, instance_id) if instance_id is not None else None
                if inst is not None:
                    s.expunge(inst)
            if inst is None or not inst.path:
                set_result(self.db, cid, state=CorrectionState.UNUSABLE,
                           reason="its stored file was removed before the node's result was ready")
                settled += 1
                continue
            state, _ = self.take(inst, again=True)
            if state != CorrectionState.WAITING:
                settled += 1
                corrected += state == CorrectionState.CORRECTED
                self._reword(inst.series_id)
        if corrected and self.after_corrected is not None:
            self.after_corrected()
        return settled

    def read_series(self, series_id: int) -> str:
        """Take the series (``__call__``) and write its skip reason; whatever that raises, the reason says so in
        words and the caller goes on."""
        try:
            reason = self(series_id)
        except Exception as exc:
            log.warning("series %s: taking its segmentation objects as corrections failed (%s)", series_id,
                        type(exc).__name__)
            log.debug("series %s: corrections intake failed", series_id, exc_info=True)
            reason = "segmentation object not usable as a correction: " + admin_message(
                exc, "reading the segmentation objects as corrections")
        reword_seg_series(self.db, series_id, reason)
        return reason

    def _reword(self, series_id: int) -> None:
        """The SEG series' skip reason anew from what each of its instances now is (each is taken once: this
        reads the recorded outcomes)."""
        _, outcomes, reasons = self._take_series(series_id)
        reword_seg_series(self.db, series_id, self._series_reason(outcomes, reasons))

    def take(self, inst: Instance, again: bool = False) -> tuple[str, str]:
        """One SEG instance: (what it was, the unusable reason or ""); ``again``: a WAITING one is read anew."""
        done = recorded_state(self.db, inst.sop_uid)
        if done is not None and not (again and done[0] == CorrectionState.WAITING):
            # judged again after more instances arrived: each instance is taken once
            return done[0], done[1] if done[0] == CorrectionState.UNUSABLE else ""
        if is_own_result(self.db, inst.sop_uid):
            log.info("instance %s: the node's own SEG came back: ignored", inst.id)
            return "own", ""
        base: dict[str, Any] = {"sop_class_uid": inst.sop_class_uid[:64], "seg_series_uid": "", "instance_id": inst.id,
                "calling_ae": (inst.calling_aet or "")[:16]}
        try:
            return self._take(inst, base)
        except Exception as exc:  # never stops the checker: the SEG is recorded as unusable, in words
            # the exception's text may carry UIDs or paths: its type only at warning level, the rest at debug
            log.warning("instance %s: reading it as a correction failed (%s)", inst.id, type(exc).__name__)
            log.debug("instance %s: reading it as a correction failed", inst.id, exc_info=True)
            reason = admin_message(exc, "reading the segmentation object as a correction")
            record(self.db, sop_uid=inst.sop_uid, state=CorrectionState.UNUSABLE, reason=reason, **base)
            return CorrectionState.UNUSABLE, reason

    def _unusable(self, inst: Instance, fields: dict[str, Any], reason: str) -> tuple[str, str]:
        record(self.db, sop_uid=inst.sop_uid, state=CorrectionState.UNUSABLE, reason=reason,
               event_detail=f"unusable: {reason}", **fields)
        log.info("instance %s: not usable as a correction: %s", inst.id, reason.split(" (segments:")[0])
        return CorrectionState.UNUSABLE, reason

    def _waiting(self, inst: Instance, fields: dict[str, Any], reason: str) -> tuple[str, str]:
        record(self.db, sop_uid=inst.sop_uid, state=CorrectionState.WAITING, reason=reason,
               event_detail="waiting for the node's result", **fields)
        log.info("instance %s: correction waits for the result of series %s", inst.id, fields.get("series_id"))
        return CorrectionState.WAITING, ""

    def _no_result(self, series_id: int) -> str:
        """Why the referenced series has no result and will get none, in words."""
        with self.db.session() as s:
            job = s.scalars(select(Job).where(Job.series_id == series_id).order_by(Job.id.desc()).limit(1)).first()
            if job is None:
                return "the node never segmented (or sent no result for) the referenced series"
            # the job's state only: its reason may quote received values, and this one is logged
            return f"the node's job {job.id} for the referenced series ended without a result ({job.state})"

    def _take(self, inst: Instance, fields: dict) -> tuple[str, str]:
        try:
            ds = pydicom.dcmread(resolve_stored(self.root, inst.path))
        except Exception as exc:
            return self._unusable(inst, fields, f"unreadable: {type(exc).__name__}")
        fields |= who(ds, inst)
        fields["seg_series_uid"] = str(ds.get("SeriesInstanceUID", "") or "")[:64]
        series_uids, sop_uids = references(ds)
        source = find_source_series(self.db, series_uids, sop_uids, str(ds.get("FrameOfReferenceUID", "") or ""))
        if source is None:
            why = ("it references no images" if not series_uids and not sop_uids else
                   "the node holds none of the images it references (in its Frame of Reference)")
            return self._unusable(inst, fields, why)
        fields["series_id"] = source
        job = segmented_job(self.db, source)
        if job is None:
            waiting = pending_result(self.db, source)
            if waiting is not None:
                return self._waiting(inst, fields, waiting)
            return self._unusable(inst, fields, self._no_result(source))
        fields["job_id"], fields["model_version"] = job.id, job.model_version[:64]
        _, src_instances = series_instances(self.db, source)
        try:
            grid = source_grid(src_instances)
            corrected = read_seg(ds, grid)
        except Unusable as exc:
            return self._unusable(inst, fields, str(exc))
        try:
            sent = read_seg(resolve_stored(self.root, job.seg_path), grid)
        except Unusable as exc:
            return self._unusable(inst, fields, f"the node's own result (job {job.id}) could not be read: {exc}")
        except (OSError, ValueError) as exc:  # its text names the file (study and series UIDs): not recorded
            return self._unusable(inst, fields, f"the node's own result (job {job.id}) could not be read "
                                                f"({getattr(exc, 'strerror', None) or type(exc).__name__})")
        return self._scored(inst, fields, grid, corrected, sent, src_instances)

    def _scored(self, inst: Instance, fields: dict, grid: SourceGrid, corrected: SegRead, sent: SegRead,
                src_instances: list[Instance]) -> tuple[str, str]:
        notes = []
        if corrected.unmatched:
            notes.append("segments not matched: " + "; ".join(corrected.unmatched))
        if corrected.by_position:
            notes.append(f"{corrected.by_position} frames placed by position (no source reference)")
        if np.array_equal(sent.classes, corrected.classes):
            state, metrics, mean = CorrectionState.UNCHANGED, dict[str, Any](), None
            detail = "unchanged: a saved copy of the result"
        else:
            metrics, mean = score(sent.classes, corrected.classes, grid, declared=_declared(self.root, src_instances))
            state = CorrectionState.CORRECTED
            detail = f"corrected: mean Dice {mean:.3f}" if mean is not None else "corrected"
        creator = fields.get("creator") or ""
        if creator:
            detail += f"; by {creator}"
        # the row is born with its scores: the dashboard, the API and the accuracy summary that see CORRECTED
        # see its Dice (the labels file, named by the row's id, is written next)
        cid, created = record(self.db, sop_uid=inst.sop_uid, state=state, reason="; ".join(notes),
                              event_detail=detail, metrics=json.dumps(metrics, sort_keys=True), mean_dice=mean,
                              **fields)
        if not created:
            return state, ""
        path = labels_file(self.root, cid)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp.npz")
            np.savez_compressed(tmp, classes=corrected.classes.astype(np.uint8),
                                sop_uids=np.array(corrected.sop_uids))
            os.replace(tmp, path)
        except OSError as exc:
            reason = f"the labels could not be written: {exc.strerror or type(exc).__name__}"
            set_result(self.db, cid, state=CorrectionState.UNUSABLE, reason=reason)
            return CorrectionState.UNUSABLE, reason
        set_result(self.db, cid, state=state, reason="; ".join(notes), labels_path=stored_path(self.root, path),
                   metrics=metrics, mean_dice=mean)
        log.info("instance %s: correction %s recorded (%s%s)", inst.id, cid, state,
                 f", mean Dice {mean:.3f}" if mean is not None else "")
        return state, ""


def _declared(root: Path, instances: list[Instance]) -> str:
    """The laterality the source series declares (R or L), read from a stored image if one is left."""
    for inst in instances:
        if not inst.path:
            continue
        try:
            ds = pydicom.dcmread(resolve_stored(root, inst.path), stop_before_pixels=True)
        except Exception:
            continue
        side = str(ds.get("ImageLaterality", "") or ds.get("Laterality", "") or "").upper()
        return side if side in ("R", "L") else ""
    return ""


class IntakeThread:
    """The intake's own thread: each closed series of Segmentation objects, and the settling of waiting
    corrections after each completion scan, run here one at a time, in the order they came. One thread, so
    an instance is never taken twice at once; off the completion checker's thread, so a large SEG does not
    hold up the completion of the series behind it. What a stop leaves unread keeps the READING reason and is
    read again at the next start."""

    _SETTLE = -1

    def __init__(self, intake: Intake):
        self.intake = intake
        self._queue: queue.Queue[int | None] = queue.Queue()
        self._queued: set[int] = set()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="corrections-intake", daemon=True)

    def start(self) -> None:
        """Start the thread, with the series a stop left unread queued first."""
        try:
            for series_id in series_skipped_as(self.intake.db, READING):
                self.submit(series_id)
        except Exception:
            log.exception("listing the segmentation series left unread at the last stop failed")
        self._thread.start()

    def submit(self, series_id: int) -> None:
        """Queue a closed series (the completion checker's ``on_segmentation``: returns at once)."""
        with self._lock:
            if series_id in self._queued:
                return
            self._queued.add(series_id)
        self._queue.put(series_id)

    def settle_waiting(self) -> None:
        """Queue one settling of the waiting corrections (the scheduler's ``after_scan``; at most one queued)."""
        self.submit(self._SETTLE)

    def stop(self, timeout: float) -> None:
        """Finish the series being read (up to ``timeout``); those still queued stay READING for the next start."""
        self._stopping.set()
        self._queue.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        settling = Repeats(log, "corrections intake: settling waiting corrections")
        reading = Repeats(log, "corrections intake: reading a segmentation series")
        while (series_id := self._queue.get()) is not None and not self._stopping.is_set():
            with self._lock:
                self._queued.discard(series_id)
            repeats = settling if series_id == self._SETTLE else reading
            try:
                if series_id == self._SETTLE:
                    self.intake.retake_waiting()
                else:
                    self.intake.read_series(series_id)
            except Exception as exc:  # the database gone for a moment: the next scan or start takes it up again
                if series_id != self._SETTLE:
                    log.info("corrections intake: series %s not read now; taken up again later", series_id)
                repeats.failed(exc)
            else:
                repeats.ok()
