"""Re-used SOP Instance UIDs: an identical re-send is counted, a conflicting one (other pixels, another series)
follows ``scp.duplicate_policy`` — keep the first copy and answer 0xB000, or replace it — and no store ends
silently: each is on the series' timeline, counted in ``/metrics``, and leaves no orphan file or empty series.

The listener runs in this process as in tests/test_hostile.py; the senders are raw C-STOREs (the status is
read as sent), dcmtk's storescu and pynetdicom (how real peers take the warning).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pydicom
import pytest
import rawdicom as raw
from conftest import storescu, write_series
from sqlalchemy import select
from test_hostile import files_under, make_scp, n_instances

from dicom_node.config import ConfigError, load_settings
from dicom_node.receive.resend import StoredIndex
from dicom_node.receive.scp import KEPT_FIRST_COPY, StorageSCP
from dicom_node.watch.metrics import NodeCollector
from storage.models import Event, Instance, Series
from storage.states import EventKind

OTHER_SERIES = "1.2.826.0.1.3680043.8.498.4242"


@pytest.fixture
def scp(tmp_path):
    s = make_scp(tmp_path)
    yield s
    s.stop()
    s.db.dispose()


@pytest.fixture
def replacing(tmp_path):
    s = make_scp(tmp_path, 'duplicate_policy = "replace"')
    yield s
    s.stop()
    s.db.dispose()


@pytest.fixture
def series(tmp_path) -> list[pydicom.Dataset]:
    _, paths = write_series(tmp_path / "src", seed=71, n_slices=3, size=32)
    return [pydicom.dcmread(p) for p in paths]


def store(port: int, *datasets: pydicom.Dataset) -> list[int | None]:
    """C-STOREs on one association, released (so their rows and events are committed): the statuses."""
    s, _ = raw.associate(port, (raw.MR_IMAGE,))
    try:
        return [raw.c_store(s, 1, ds.SOPClassUID, ds.SOPInstanceUID, raw.dataset_bytes(ds)) for ds in datasets]
    finally:
        raw.release(s)


def other_pixels(ds: pydicom.Dataset) -> pydicom.Dataset:
    changed = pydicom.dcmread(ds.filename)
    arr = changed.pixel_array.copy()
    arr[0, 0] = arr[0, 0] + 1
    changed.PixelData = arr.tobytes()
    return changed


def events(scp: StorageSCP, series_uid: str, kind: EventKind) -> list[str]:
    with scp.db.session() as s:
        return list(s.scalars(select(Event.detail).join(Series, Series.id == Event.series_id).where(
            Series.series_uid == series_uid, Event.kind == kind).order_by(Event.id)))


def series_row(scp: StorageSCP, series_uid: str) -> tuple[int, int] | None:
    with scp.db.session() as s:
        row = s.execute(select(Series.id, Series.n_instances).where(Series.series_uid == series_uid)).first()
    return tuple(row) if row else None


def cstore_metric(scp: StorageSCP) -> dict[str, float]:
    family = next(m for m in NodeCollector(scp.settings, scp.db, scp.stats).collect() if m.name == "dicomnode_cstore")
    return {s.labels["result"]: s.value for s in family.samples if s.name == "dicomnode_cstore_total"}


def incoming(scp: StorageSCP) -> set[Path]:
    return {p for p in files_under(scp.store.root / "incoming")}


def test_a_conflicting_resend_keeps_the_first_copy_and_answers_a_warning(scp, series, caplog):
    first = series[0]
    assert store(scp.port, *series) == [0, 0, 0]
    (kept,) = [p for p in incoming(scp) if p.stem == first.SOPInstanceUID]
    before, files = kept.read_bytes(), incoming(scp)
    caplog.set_level(logging.INFO)

    moved = other_pixels(first)
    moved.SeriesInstanceUID = OTHER_SERIES
    same_series = other_pixels(first)
    assert store(scp.port, moved, same_series) == [KEPT_FIRST_COPY, KEPT_FIRST_COPY]

    assert kept.read_bytes() == before and incoming(scp) == files  # nothing written, no orphan under the other folder
    assert not (scp.store.root / "incoming" / first.StudyInstanceUID / OTHER_SERIES).exists()
    assert series_row(scp, OTHER_SERIES) is None  # no empty series row for a copy that was not stored
    assert n_instances(scp) == 3 and series_row(scp, first.SeriesInstanceUID)[1] == 3
    timeline = events(scp, first.SeriesInstanceUID, EventKind.CONFLICTING_RESEND)
    assert len(timeline) == 2
    assert "into a series not otherwise received" in timeline[0] and "first copy is kept" in timeline[0]
    assert "with other content" in timeline[1]
    assert cstore_metric(scp)["conflicts"] == 2 and scp.stats["duplicates"] == 0
    lines = [r.getMessage() for r in caplog.records if "conflicting re-send" in r.getMessage()]
    assert len(lines) == 2 and all(first.SOPInstanceUID not in m and first.SeriesInstanceUID not in m for m in lines)


def test_a_conflicting_resend_into_an_existing_series_is_on_both_timelines(scp, series):
    others = [pydicom.dcmread(p) for p in write_series(Path(series[0].filename).parent.parent / "other", seed=72,
                                                        n_slices=1, size=32)[1]]
    assert store(scp.port, series[0], others[0]) == [0, 0]
    moved = other_pixels(series[0])
    moved.StudyInstanceUID, moved.SeriesInstanceUID = others[0].StudyInstanceUID, others[0].SeriesInstanceUID
    assert store(scp.port, moved) == [KEPT_FIRST_COPY]
    target = series_row(scp, others[0].SeriesInstanceUID)
    assert target[1] == 1
    (here,) = events(scp, others[0].SeriesInstanceUID, EventKind.CONFLICTING_RESEND)
    (there,) = events(scp, series[0].SeriesInstanceUID, EventKind.CONFLICTING_RESEND)
    assert f"into series #{target[0]}" in there and "re-sent here" in here
    assert len(incoming(scp)) == 2


def test_identical_resends_succeed_and_are_one_aggregated_event(scp, series):
    files = None
    assert store(scp.port, *series) == [0, 0, 0]
    files = {p: p.read_bytes() for p in incoming(scp)}
    assert store(scp.port, *series) == [0, 0, 0]
    assert store(scp.port, *series[:2]) == [0, 0]
    assert {p: p.read_bytes() for p in incoming(scp)} == files
    assert n_instances(scp) == 3
    (burst,) = events(scp, series[0].SeriesInstanceUID, EventKind.DUPLICATES)
    assert burst.startswith("re-sent: 5 identical copies"), burst
    assert cstore_metric(scp)["duplicates"] == 5 and scp.stats["conflicts"] == 0


def test_real_peers_take_the_warning_as_success(scp, series, tmp_path):
    from pynetdicom import AE
    from pynetdicom.sop_class import MRImageStorage
    from pynetdicom.status import code_to_category

    assert store(scp.port, series[0]) == [0]
    changed = other_pixels(series[0])
    changed.save_as(tmp_path / "changed.dcm")
    r = storescu(scp.port, tmp_path / "changed.dcm")
    assert r.returncode == 0, r.stdout + r.stderr
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(MRImageStorage, changed.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="SEGNODE")
    assert assoc.is_established
    status = assoc.send_c_store(changed)
    assoc.release()
    assert status.Status == KEPT_FIRST_COPY and code_to_category(status.Status) == "Warning"
    assert cstore_metric(scp)["conflicts"] == 2


def test_replace_policy_lets_the_newer_copy_win(replacing, series):
    scp = replacing
    assert store(scp.port, *series) == [0, 0, 0]
    first = series[0]
    (old,) = [p for p in incoming(scp) if p.stem == first.SOPInstanceUID]

    same_series = other_pixels(first)
    assert store(scp.port, same_series) == [0]
    assert old.read_bytes().endswith(raw.dataset_bytes(same_series))  # replaced in place
    moved = other_pixels(same_series)
    moved.SeriesInstanceUID = OTHER_SERIES
    assert store(scp.port, moved) == [0]

    assert not old.exists()  # the first copy's file is gone
    (new,) = [p for p in incoming(scp) if p.stem == first.SOPInstanceUID]
    assert new.parent.name == OTHER_SERIES and new.read_bytes().endswith(raw.dataset_bytes(moved))
    with scp.db.session() as s:
        row = s.execute(select(Instance.series_id, Instance.path).where(Instance.sop_uid == first.SOPInstanceUID)).one()
    target, source = series_row(scp, OTHER_SERIES), series_row(scp, first.SeriesInstanceUID)
    assert row.series_id == target[0] and scp.store.resolve(row.path) == new
    assert target[1] == 1 and source[1] == 2 and n_instances(scp) == 3
    timeline = events(scp, first.SeriesInstanceUID, EventKind.CONFLICTING_RESEND)
    assert len(timeline) == 2 and all("newer copy replaced the first" in t for t in timeline)
    assert "moved to series" in timeline[1]
    assert events(scp, OTHER_SERIES, EventKind.CONFLICTING_RESEND)
    assert cstore_metric(scp)["conflicts"] == 2


def test_a_conflict_found_after_the_answer_leaves_no_orphan(scp, series):
    """An instance the listener no longer remembers (stored before a restart, into another folder): answered
    success, then the recorder applies the policy — the orphan file is removed and the timeline says so."""
    assert store(scp.port, series[0]) == [0]
    scp.stored = StoredIndex()  # as after a restart
    moved = other_pixels(series[0])
    moved.SeriesInstanceUID = OTHER_SERIES
    assert store(scp.port, moved) == [0]
    assert [p.parent.name for p in incoming(scp)] == [series[0].SeriesInstanceUID]
    assert series_row(scp, OTHER_SERIES) is None and n_instances(scp) == 1
    (line,) = events(scp, series[0].SeriesInstanceUID, EventKind.CONFLICTING_RESEND)
    assert "found after the success status was sent" in line and "first copy is kept" in line
    assert scp.stats["conflicts"] == 1


def test_the_policy_setting_is_checked(tmp_path):
    (tmp_path / "node.toml").write_text('[scp]\nduplicate_policy = "newest"\n')
    with pytest.raises(ConfigError, match="scp.duplicate_policy"):
        load_settings(tmp_path / "node.toml")


def test_the_recorder_applies_replace_to_a_conflict_it_finds_itself(tmp_path):
    """Under ``replace`` a conflict found only when the row is recorded moves the row and removes the first file."""
    from storage.db import Database
    from storage.instances import InstanceMeta, Received, Recorder
    from storage.states import DuplicatePolicy

    db = Database(f"sqlite:///{tmp_path / 'n.db'}")
    db.create_schema()
    rec = Recorder(db, policy=DuplicatePolicy.REPLACE)
    told: list[tuple[int, int]] = []
    rec.on_resent = lambda identical, conflicting: told.append((identical, conflicting))
    files = []
    for series_uid in ("1.2.3.1", "1.2.3.2"):
        (tmp_path / series_uid).mkdir()
        files.append(tmp_path / series_uid / "1.2.3.9.dcm")
        files[-1].write_bytes(series_uid.encode())
    meta = InstanceMeta(sop_uid="1.2.3.9", sop_class_uid="1.2.840.10008.5.1.4.1.1.4", study_uid="1.2.3",
                        series_uid="1.2.3.1")
    assert rec.record_batch([Received(meta, str(files[0]), 1)]) == [True]
    moved = InstanceMeta(**{**meta.__dict__, "series_uid": "1.2.3.2"})
    assert rec.record_batch([Received(moved, str(files[1]), 1), Received(moved, str(files[1]), 1)]) == [False, False]
    assert not files[0].exists() and files[1].exists()
    with db.session() as s:
        counts = dict(s.execute(select(Series.series_uid, Series.n_instances)).all())
        assert s.scalar(select(Instance.path)) == str(files[1])
        kinds = list(s.scalars(select(Event.kind).order_by(Event.id)))
    assert counts == {"1.2.3.1": 0, "1.2.3.2": 1}
    assert kinds.count(EventKind.CONFLICTING_RESEND) == 2 and kinds.count(EventKind.DUPLICATES) == 1
    assert told == [(1, 1)]
