"""What admins read: a study's timeline with the duration of each stage (``dicom-node show``)."""

from __future__ import annotations

import json
from pathlib import Path

from sqlalchemy import or_, select
from sqlalchemy.orm import selectinload

from storage import deliveries
from storage.db import Database
from storage.filestore import UnsafePath, resolve_stored
from storage.latency import held_at, latency
from storage.models import (
    Delivery,
    Event,
    Instance,
    Job,
    OutboxItem,
    QualityCheck,
    Series,
    StructureVolume,
    Study,
)


def _fmt_dur(seconds: float) -> str:
    return f"{seconds:.2f}s" if seconds < 120 else f"{seconds / 60:.1f}min"


def show(db: Database, what: str, root: Path | None = None) -> str | None:
    """A study's timeline, jobs and files as text; file paths in full under the data folder ``root``."""
    def where(stored: str) -> str:
        try:
            return str(resolve_stored(root, stored)) if root is not None else stored
        except (FileNotFoundError, UnsafePath) as exc:
            return f"{stored} ({exc})"

    with db.session() as s:
        named_job = s.get(Job, int(what)) if what.isdigit() else None
        study = named_job.series.study if named_job is not None else None
        if study is None:
            study = s.scalar(select(Study).where(or_(Study.study_uid == what, Study.accession_number == what)))
        if study is None:
            se = s.scalar(select(Series).where(Series.series_uid == what))
            study = se.study if se else None
        if study is None:
            return None
        out = [f"study {study.study_uid}  accession {study.accession_number or '-'}  {study.study_description}"]
        for se in s.scalars(select(Series).where(Series.study_id == study.id).order_by(Series.id)):
            out.append(f"\nseries {se.series_uid}  {se.modality} #{se.series_number} '{se.series_description}'  "
                       f"{se.n_instances} instances"
                       + (f" of {se.expected_count} ({se.expected_from})" if se.expected_count else "")
                       + f"  state {se.state}")
            folder = s.scalar(select(Instance.path).where(Instance.series_id == se.id, Instance.path != "").limit(1))
            if folder:
                out.append(f"  files: {where(folder).rsplit('/', 1)[0]}/")
            events = s.scalars(select(Event).where(Event.series_id == se.id).order_by(Event.at, Event.id)).all()
            prev = None
            out.append("  timeline:")
            for ev in events:
                dur = f"+{_fmt_dur((ev.at - prev).total_seconds())}" if prev else ""
                job_label = f"job {ev.job_id}" if ev.job_id else ""
                out.append(f"    {ev.at.isoformat(sep=' ', timespec='milliseconds')}  {dur:>10}  {ev.kind:<13} "
                           f"{job_label:<8} {ev.detail}")
                prev = ev.at
            for job in s.scalars(select(Job).where(Job.series_id == se.id).order_by(Job.id)):
                t = json.loads(job.timings or "{}")
                out.append(f"  job {job.id}: {job.state}, attempts {job.attempts}"
                           + (f", superseded by job {job.superseded_by}" if job.superseded_by else "")
                           + (f", reason: {job.reason}" if job.reason else ""))
                if t:
                    out.append("    stages: " + " ".join(f"{k}={v:.2f}s" for k, v in t.items()))
                if job.quality:
                    out.append(f"    quality: {job.quality}")
                    checks = select(QualityCheck).where(QualityCheck.job_id == job.id).order_by(QualityCheck.id)
                    for q in s.scalars(checks):
                        out.append(f"      {q.structure.lower():<14} {q.verdict:<5} {q.reason}")
                if job.review:
                    out.append(f"    review: {job.review} by {job.reviewed_by}"
                               + (f" from {job.reviewed_from}" if job.reviewed_from else "")
                               + (f" at {job.reviewed_at.isoformat(sep=' ', timespec='seconds')}"
                                  if job.reviewed_at else "")
                               + (f": {job.review_note}" if job.review_note else ""))
                vols = s.scalars(select(StructureVolume).where(StructureVolume.job_id == job.id)).all()
                if vols:
                    out.append("    volumes: "
                               + ", ".join(f"{v.structure.lower()} {v.volume_cm3:.1f} cm³" for v in vols))
                if job.seg_path:
                    out.append(f"    result: {where(job.seg_path)} (SEG series {job.seg_series_uid})")
                for d in s.scalars(select(Delivery).where(Delivery.job_id == job.id).order_by(Delivery.id)):
                    out.append(f"    delivery to {d.destination}, attempt {d.attempt}: {'ok' if d.ok else d.error}")
                for o in s.scalars(select(OutboxItem).where(OutboxItem.job_id == job.id).order_by(OutboxItem.id)):
                    out.append(f"    outbox #{o.id} to {o.destination}: {o.state} after {o.attempts} tries"
                               + (f" ({o.last_error})" if o.last_error else ""))
        return "\n".join(out)


def destination_rows(db: Database, settings) -> list[dict]:
    """The configured destinations' summary (storage/deliveries.py), with each one's probe interval."""
    return deliveries.destination_summary(db, [d.name for d in settings.destinations],
                                          {d.name: d.probe_seconds for d in settings.destinations})


def job_rows(db: Database, limit: int = 50, state: str | None = None, job_id: int | None = None) -> list[dict]:
    """Recent jobs (newest first) as plain dicts: what ``dicom-node jobs``, the dashboard and the API show."""
    with db.session() as s:
        q = (select(Job).options(selectinload(Job.series).selectinload(Series.study), selectinload(Job.volumes),
                                 selectinload(Job.deliveries), selectinload(Job.outbox),
                                 selectinload(Job.quality_checks)).order_by(Job.id.desc()).limit(limit))
        if state:
            q = q.where(Job.state == state)
        if job_id is not None:
            q = q.where(Job.id == job_id)
        rows = []
        found = s.scalars(q).all()
        held = held_at(s, (job.id for job in found))
        for job in found:
            took = latency(job, job.series.last_received_at, held.get(job.id))
            rows.append({
                "job": job.id, "state": job.state, "attempts": job.attempts, "urgent": job.urgent, "rule": job.rule,
                "study_uid": job.series.study.study_uid, "accession": job.series.study.accession_number,
                "series_uid": job.series.series_uid, "series": job.series.series_description,
                "modality": job.series.modality,
                # the count this job segmented (older jobs: the series may have grown since)
                "instances": job.n_instances if job.n_instances is not None else job.series.n_instances,
                "created": job.created_at.isoformat(timespec="seconds"),
                # last image → delivered, and the part of it spent waiting for a person's review
                "total_s": round(took.total_s, 2) if took.total_s is not None else None,
                "review_wait_s": round(took.review_wait_s, 2) if took.review_wait_s is not None else None,
                "stages_s": json.loads(job.timings or "{}"), "reason": job.reason,
                "superseded_by": job.superseded_by,
                "volumes_cm3": {v.structure: round(v.volume_cm3, 1) for v in job.volumes},
                "deliveries": [{"destination": d.destination, "attempt": d.attempt, "ok": d.ok, "error": d.error,
                                "at": d.started_at.isoformat(timespec="seconds")} for d in job.deliveries],
                "outbox": [{"id": o.id, "destination": o.destination, "state": o.state, "attempts": o.attempts,
                            "error": o.last_error} for o in job.outbox],
                "seg_series_uid": job.seg_series_uid, "has_result": bool(job.seg_path),
                "quality": job.quality,
                "quality_checks": [{"structure": q.structure, "verdict": q.verdict, "reason": q.reason,
                                    "metrics": json.loads(q.metrics or "{}")} for q in job.quality_checks],
                "review": {"decision": job.review, "by": job.reviewed_by, "from": job.reviewed_from,
                           "at": job.reviewed_at.isoformat(timespec="seconds") if job.reviewed_at else None,
                           "note": job.review_note} if job.review else None,
            })
        return rows
