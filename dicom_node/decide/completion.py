"""When is a series complete? Ask whoever knows, and fall back to the quiet timer only where nobody does.

Why: a quiet timer alone segments series whose sender paused or died (a SEG without the pelvis) and makes
every complete series wait ``stable_seconds`` for nothing. In order of trust:

1. the PACS that routed the series (``[[sources]]``, matched by the calling AE title that delivered it):
   a C-FIND as soon as the first instance is recorded, again when the node holds that many, and when the
   series goes quiet. Complete = a query made while the node already held n instances answered ≤ n: the
   node holds every instance the PACS has, and the series is judged at once. Quiet with instances missing:
   the missing ones are fetched by C-MOVE (``series.fetch_attempts`` tries), then it is judged;
2. the images themselves: one multi-frame (Enhanced MR) object is a whole series; Images in Acquisition
   (0020,1002), when every instance carries the same value and one acquisition, is the expected count;
3. the quiet timer (``series.stable_seconds``, extended after an aborted association or an unclean stop:
   ``series.abort_grace_seconds``) for senders that cannot be asked, and as the upper bound when the
   counts never match (the timeline then says what was expected and what arrived).

Checks run in one thread, woken by the recorder when a batch of instances is committed (never on the
C-STORE path); queries and fetches run in a small pool so a PACS that does not answer delays nobody else.
``mark_judged`` only closes a series whose count did not change meanwhile, so concurrent checks are safe.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from storage.corrections import reword_seg_series
from storage.db import Database
from storage.jobs import mark_judged
from storage.series import (
    CompletionView,
    completion_view,
    count_fetch,
    held_sop_uids,
    receiving_series,
    series_instances,
    set_expected,
    stable_series,
)
from storage.states import EventKind, SeriesState
from storage.timeline import event

from ..config import Settings, Source
from ..errors import admin_message
from ..repeats import Repeats
from . import query
from .rules import Decision, decide

log = logging.getLogger("dicom_node.decide.completion")

#: Least time between two rounds of checks: notifications of a busy ingest are coalesced (one check per
#: series per round), far inside the ≤ 1 s the result may take after the last image.
MIN_ROUND_S = 0.02
#: When the first answer of the source already equals what the node holds, it is confirmed by a second
#: query this much later (a PACS still receiving the series would have counted more by then).
CONFIRM_S = 0.3
#: Segmentation Storage (binary and label map): a series of these is a viewer's correction or the node's own
#: result coming back, never a series to segment; the injected ``on_segmentation`` takes it (learn/intake.py)
SEGMENTATION_CLASSES = frozenset({"1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.7"})
#: The skip reason such a series carries from its closing until the corrections intake has read it: the intake
#: runs on a thread of its own (a large SEG takes seconds to read and score, and the completion of every other
#: series must not wait for it) and then rewrites the reason in words; one left with this reason by a stop is
#: read again at the next start.
READING = "segmentation object: being read as a correction (see dicom-node corrections)"


def image_expectation(v: CompletionView) -> tuple[int, str] | None:
    """The count the images themselves announce, and how: None when they announce none (or disagree)."""
    if v.multiframe and v.n_instances == v.multiframe == 1:
        return 1, "one multi-frame (enhanced) object holds the whole series"
    lo, hi, carried = v.images_in_acquisition
    acq_lo, acq_hi = v.acquisition_numbers
    if lo is not None and lo == hi and lo > 0 and carried == v.n_instances and acq_lo == acq_hi:
        return lo, f"Images in Acquisition (0020,1002) = {lo}"
    return None


class Completion:
    """Decides when each receiving series is complete, and judges it (job queued or skipped)."""

    def __init__(self, settings: Settings, db: Database, on_queued: Callable[[], None] | None = None):
        self.settings = settings
        self.db = db
        self.on_queued = on_queued
        #: hands a closed series of Segmentation objects (skipped with READING) to the corrections intake; must
        #: only queue it. Injected by the service (a stage may not import a later one: the intake lives in learn/)
        self.on_segmentation: Callable[[int], object] | None = None
        self._sources = {s.calling_aet: s for s in settings.sources}
        self._by_name = {s.name: s for s in settings.sources}
        self._pending: dict[int, bool] = {}  # series id -> quiet (the timer says it has settled)
        self._cond = threading.Condition()
        self._inflight: set[int] = set()  # series with a query or fetch under way
        self._unanswered: dict[int, str] = {}  # series whose source did not answer: why (timer decides)
        self._uncounted: set[int] = set()  # no source and no count in the images: only the timer decides
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="completion-query")
        self._stop = False
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------------------------- wake-ups
    def notify(self, series_ids: set[int]) -> None:
        """The recorder committed instances of these series (called on its thread: only queues them)."""
        with self._cond:
            for sid in series_ids:
                self._pending.setdefault(sid, False)
            self._cond.notify()

    def scan(self) -> int:
        """The timer's part: every series quiet for ``stable_seconds`` is checked once more."""
        ids = stable_series(self.db, self.settings.series.stable_seconds)
        with self._cond:
            for sid in ids:
                self._pending[sid] = True
            if ids:
                self._cond.notify()
        return len(ids)

    def check_all(self) -> None:
        """Every series still receiving (at start: ask the sources about what was arriving before)."""
        self.notify(set(receiving_series(self.db)))

    # ---------------------------------------------------------------------------------- thread
    def start(self) -> None:
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._run, name="completion", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10) -> None:
        """End the thread; a check stuck in the database is left to the (daemon) thread after ``timeout``."""
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _run(self) -> None:
        checks = Repeats(log, "completion check")
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending or self._stop)
                if self._stop:
                    return
                batch, self._pending = self._pending, {}
            t0 = time.monotonic()
            for sid, quiet in batch.items():
                log.debug("completion check of series %s", sid)
                with checks:  # a failed check: the scan notices the series again at its next round
                    self.check(sid, quiet)
            rest = MIN_ROUND_S - (time.monotonic() - t0)
            if rest > 0:
                time.sleep(rest)

    # ---------------------------------------------------------------------------------- the check
    def source_for(self, v: CompletionView) -> Source | None:
        for aet in v.calling_aets:
            if aet in self._sources:
                return self._sources[aet]
        return None

    def check(self, series_id: int, quiet: bool = False) -> None:
        """Judge the series if it is complete; ask its source when that is what decides (in the pool; the
        answer judges, fetches, or leaves it to the next check)."""
        if series_id in self._inflight:  # the answer under way decides; a later scan asks again if needed
            return
        if not quiet and series_id in self._uncounted:  # nothing but the timer can tell: keep ingest cheap
            return
        v = completion_view(self.db, series_id, with_instances=False)
        if v is None or v.state != SeriesState.RECEIVING:
            return
        src = self._by_name.get(v.expected_from)  # asked before: no need to look at the instances again
        full = src is None or series_id in self._unanswered
        if full:
            v = completion_view(self.db, series_id)
            if v is None:
                return
            src = self.source_for(v)
        if src is not None and series_id not in self._unanswered:
            never_asked = v.expected_from != src.name
            reached = v.expected_count is not None and v.n_instances >= v.expected_count \
                and (v.expected_held or 0) < v.n_instances
            if never_asked or reached or quiet:
                self._inflight.add(series_id)
                self._pool.submit(self._ask, series_id, src, quiet)
            return
        expected = image_expectation(v)
        if expected is None and src is None and not v.images_in_acquisition[2] and not v.multiframe:
            self._uncounted.add(series_id)
        if expected is not None and v.n_instances >= expected[0]:
            self.judge(series_id, v.n_instances, expected[1])
        elif quiet:
            why = f"quiet for {self.settings.series.stable_seconds:g} s"
            if series_id in self._unanswered:
                why += f"; {self._unanswered[series_id]}"
            if expected is not None:
                why += f"; {expected[1]} but {v.n_instances} arrived"
            self.judge(series_id, v.n_instances, why)

    def _ask(self, series_id: int, src: Source, quiet: bool) -> None:
        """Ask ``src`` how many instances it holds; complete when the node held that many before asking."""
        try:
            for _ in range(2):
                if not self._ask_once(series_id, src, quiet):
                    return
                time.sleep(CONFIRM_S)  # the first answer already matched: ask once more to confirm
        except Exception:
            log.exception("asking %s about series %s failed", src.name, series_id)
        finally:
            self._inflight.discard(series_id)
            # instances recorded while the question was out were not checked (see check): look again now
            self._requeue(series_id, False)

    def _ask_once(self, series_id: int, src: Source, quiet: bool) -> bool:
        """One C-FIND and what follows from it; True when the answer needs confirming by a second one."""
        v = completion_view(self.db, series_id, with_instances=False)
        if v is None or v.state != SeriesState.RECEIVING:
            return False
        held = v.n_instances
        try:
            n = query.count_instances(self.settings.scp.ae_title, src, v.study_uid, v.series_uid)
        except query.QueryFailed as exc:
            self._unanswered[series_id] = f"{src.name} did not answer: {exc}"
            log.warning("series %s: %s asked for its instance count: %s; the quiet timer decides",
                        series_id, src.name, exc)
            event(self.db, EventKind.EXPECTED, series_id=series_id, detail=self._unanswered[series_id])
            self._requeue(series_id, quiet)
            return False
        if not n:
            self._unanswered[series_id] = f"{src.name} does not know the series"
            set_expected(self.db, series_id, None, src.name, held, self._unanswered[series_id])
            self._requeue(series_id, quiet)
            return False
        previous = v.expected_count if v.expected_from == src.name else None
        set_expected(self.db, series_id, n, src.name, held,
                     f"{src.name} holds {n} instances; the node holds {held}")
        if held >= n:
            # The same count twice (once before, once after the node held them all), or once the series is
            # quiet: a PACS that forwards instances as they reach it would otherwise have a partial series
            # judged whole from one answer.
            if previous == n or quiet:
                self.judge(series_id, held, f"the node holds all {n} instances {src.name} holds")
                return False
            return True
        if quiet:
            self._fetch(series_id, src, v, n, held)
        return False

    def _requeue(self, series_id: int, quiet: bool) -> None:
        with self._cond:
            self._pending[series_id] = self._pending.get(series_id, False) or quiet
            self._cond.notify()

    def _fetch(self, series_id: int, src: Source, v: CompletionView, n: int, held: int) -> None:
        """Quiet, and the source holds more than the node: fetch the missing ones, or judge what is here
        once the tries are used up."""
        limit = self.settings.series.fetch_attempts
        if src.fetch == "none" or v.fetch_attempts >= limit:
            tried = "fetching is off for this source" if src.fetch == "none" else f"after {v.fetch_attempts} fetches"
            self.judge(series_id, held, f"quiet; {src.name} holds {n} instances, the node {held} ({tried}): "
                                        "segmenting what arrived")
            return
        calling = self.settings.scp.ae_title
        try:
            missing = sorted(query.instance_uids(calling, src, v.study_uid, v.series_uid)
                             - held_sop_uids(self.db, series_id))
        except query.QueryFailed as exc:
            count_fetch(self.db, series_id, f"listing the instances of {src.name} failed: {exc}")
            return
        if not missing:
            self.judge(series_id, held, f"quiet; {src.name} counts {n} instances but lists none the node lacks")
            return
        k = count_fetch(self.db, series_id, f"C-MOVE of {len(missing)} missing instances from {src.name} "
                                            f"to {calling} (of {limit})")
        log.info("series %s: fetching %d missing instances from %s (attempt %d of %d)", series_id, len(missing),
                 src.name, k, limit)
        try:
            res = query.move(calling, src, v.study_uid, v.series_uid, missing)
        except query.QueryFailed as exc:
            event(self.db, EventKind.FETCHED, series_id=series_id, detail=f"nothing from {src.name}: {exc}")
            log.warning("series %s: fetch from %s failed: %s", series_id, src.name, exc)
            return
        event(self.db, EventKind.FETCHED, series_id=series_id,
              detail=f"{res.completed} instances from {src.name}"
                     + (f", {res.failed} failed" if res.failed else ""))
        # the moved instances came in through the listener: their recording wakes the next check

    # ---------------------------------------------------------------------------------- judging
    def judge(self, series_id: int, held: int, how: str) -> int | None:
        """Apply the rules to the complete series: a job queued, or skipped with the reason."""
        series, instances = series_instances(self.db, series_id)
        if series.state != SeriesState.RECEIVING or len(instances) < held:
            return None
        segmentations = self.on_segmentation is not None and bool(instances) \
            and all(i.sop_class_uid in SEGMENTATION_CLASSES for i in instances)
        if segmentations:
            d = Decision(False, READING)
        else:
            try:
                d = decide(series, series.study.study_description, instances, self.settings.rules,
                           self.settings.worker.max_megavoxels)
            except Exception as exc:  # one odd series is skipped in words; it must not stop the others
                log.debug("series %s: deciding failed", series_id, exc_info=True)
                d = Decision(False, admin_message(exc, "deciding whether to segment the series"))
        job = mark_judged(self.db, series_id, queue=d.segment, reason=d.reason, rule=d.rule, urgent=d.urgent,
                          expected_count=len(instances), how=how)
        if job is None:
            return None
        self._unanswered.pop(series_id, None)
        self._uncounted.discard(series_id)
        if segmentations:
            self._segmentation(series_id)
        elif d.segment:
            log.info("series %s complete (%d slices; %s): job %s queued", series_id, len(d.instances), how, job)
            if self.on_queued is not None:
                self.on_queued()
        else:
            log.info("series %s complete (%s): not segmented: %s", series_id, how, d.reason)
        return job

    def _segmentation(self, series_id: int) -> None:
        """Hand the closed series to the corrections intake, guarded: if even that fails, its skip reason says
        so in words (it is not left saying it is being read)."""
        assert self.on_segmentation is not None
        try:
            self.on_segmentation(series_id)
        except Exception as exc:
            log.warning("series %s: handing its segmentation objects to the corrections intake failed (%s)",
                        series_id, type(exc).__name__)
            log.debug("series %s: corrections intake failed", series_id, exc_info=True)
            reword_seg_series(self.db, series_id, "segmentation object not usable as a correction: " + admin_message(
                exc, "handing the segmentation objects to the corrections intake"))
