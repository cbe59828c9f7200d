"""The DICOM listener: C-ECHO and C-STORE, with caller allowlists, a disk floor and TCP_NODELAY.

One handler per event, as pynetdicom's own apps do; the association itself is served by acceptor.py
(why: see there). The C-STORE handler reads the header fields once, writes the encoded bytes it received
(no pixel decoding) and answers success once the file is on disk (fsynced when ``scp.fsync``); its database
row is committed a few milliseconds later in a batch (storage/recording.py), and before an association's
release is confirmed, so a sender that has finished knows its instances are recorded. That wait is bounded
(``scp.release_wait_seconds``): a database that is down or full never turns stored instances into a failed
release; their rows follow when it answers, or at the next start (receive/recovery.py). An association that
stored nothing, such as a C-ECHO health probe, is released at once.

Before anything is written, the command and the data set must agree and their UIDs must be DICOM UIDs
(receive/uids.py): those UIDs name the file, so a value such as ``..`` or ``1.2 3`` is refused (0xC000, kept in
quarantine with the reason) rather than "made safe", which could map two instances onto one file.

A SOP Instance UID already stored is recognised before the answer (receive/resend.py): an identical copy is
answered success and counted, not written again; one with other content or in another series follows
``scp.duplicate_policy`` (keep the first and answer 0xB000, or replace it).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from enum import StrEnum, auto
from pathlib import Path

from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import _config
from pynetdicom.presentation import AllStoragePresentationContexts, build_context
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # made at import time

from storage.db import Database
from storage.filestore import FileStore
from storage.instances import Received, Recorder
from storage.models import utcnow
from storage.quarantine import QuarantineBudget
from storage.recording import BackgroundRecorder
from storage.series import end_quiet, extend_quiet, receiving_series
from storage.states import DuplicatePolicy, Resend

from ..config import CannotListen, Settings
from ..notify import notify
from ..repeats import first_line
from ..tls import server_context
from .acceptor import Acceptor
from .connections import RefusalLog, address_allowed, destination_hosts, peer_addresses
from .dimse import (
    CANNOT_UNDERSTAND,
    KEPT_FIRST_COPY,
    NO_SUCH_SOP_INSTANCE,
    OUT_OF_RESOURCES,
    PROCESSING_FAILURE,
    SUCCESS,
    EventReport,
    Peer,
    Rejection,
    StoreRequest,
    command_problem,
    dataset_problem,
)
from .headers import UnreadableData, read_received
from .recovery import record_unrecorded
from .resend import StoredIndex, same_data_set, stored_copy

log = logging.getLogger("dicom_node.receive.scp")
#: while instances are refused (disk floor, database), one log line per this many seconds, not one per image
REFUSAL_TOLD_EVERY_S = 10.0

#: Uncompressed syntaxes, then the compressed ones our installed decoders (pylibjpeg, pylibjpeg-libjpeg,
#: pylibjpeg-openjpeg, pylibjpeg-rle) can decode for inference.
TRANSFER_SYNTAXES: list[str | UID] = [
    ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian,
    JPEGLosslessSV1, JPEGLossless, JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLSLossless, JPEGLSNearLossless,
    JPEG2000Lossless, JPEG2000, RLELossless,
]

#: Left in the data folder by a stop after which no stored file lacks its row (see start).
CLEAN_STOP_MARKER = ".clean-stop"

#: Answers an N-EVENT-REPORT of one SOP class with a status (Storage Commitment: deliver/commitment.py).
EventReportHandler = Callable[[EventReport], int]


def quiet_pynetdicom() -> None:
    """pynetdicom logs every message, with patient identifiers at debug level: keep that out of our logs."""
    _config.LOG_HANDLER_LEVEL = "none"
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)


def supported_contexts(event_classes: list[str] | tuple[str, ...] = ()) -> list:
    """Verification plus every storage SOP class pynetdicom knows, each with the syntaxes we can decode, and
    the SOP classes whose N-EVENT-REPORTs a handler answers."""
    contexts = [build_context(Verification)]
    contexts += [build_context(cx.abstract_syntax, TRANSFER_SYNTAXES) for cx in AllStoragePresentationContexts
                 if cx.abstract_syntax is not None]
    for sop_class in event_classes:
        # e.g. Storage Commitment answers: an archive opens an association to send N-EVENT-REPORT, as the SCP
        # of the class (role selection proposed by it); we accept either role.
        cx = build_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        cx.scu_role, cx.scp_role = True, True
        contexts.append(cx)
    return contexts


class StoreCount(StrEnum):
    """What the listener counts per C-STORE (``/metrics``: ``dicomnode_cstore_total{result}``)."""

    STORED = auto()
    #: identical copies of stored instances, not stored again
    DUPLICATES = auto()
    #: a stored SOP Instance UID re-sent with other content or into another series
    CONFLICTS = auto()
    #: refused with a failure status (allow-lists, disk floor, bad data, database down)
    REFUSED = auto()


class StorageSCP:
    """Accepts associations and stores what arrives."""

    def __init__(self, settings: Settings, db: Database, store: FileStore,
                 event_reports: Mapping[str, EventReportHandler] | None = None):
        self.settings = settings
        #: N-EVENT-REPORT handlers by SOP class, registered by the service (a later stage's business)
        self.event_reports: dict[str, EventReportHandler] = dict(event_reports or {})
        self.db = db
        self.store = store
        self.quarantine = QuarantineBudget(store, settings.scp.quarantine_max_mb << 20)
        self.recorder = Recorder(db, policy=DuplicatePolicy(settings.scp.duplicate_policy), root=store.root)
        self.recorder.on_resent = self._resent
        #: where the instances stored lately lie, to recognise a re-send into another series (receive/resend.py)
        self.stored = StoredIndex()
        self.writer = BackgroundRecorder(self.recorder, self._recorded, self._rejected)
        self.writer.on_recovered = self._after_outage
        self.writer.outage_hold_s = self._resend_wait
        self._networks = [ipaddress.ip_network(n, strict=False) for n in settings.scp.allowed_peers]
        self._aets = {a.strip() for a in settings.scp.allowed_calling_aets}
        self.server: Acceptor | None = None
        # Built now, so a missing or unreadable certificate or key stops the node at start, naming the key.
        self.tls_context = server_context(settings.scp.tls) if settings.scp.tls.enabled else None
        #: C-STORE outcomes (``/metrics``): duplicates are identical re-sends, conflicts re-used SOP Instance UIDs
        #: with other content or series (answered and stored per scp.duplicate_policy)
        self.stats: dict[str, int] = dict.fromkeys(StoreCount, 0)
        #: series that were receiving when the node stopped uncleanly (found at start; see restart_quiet)
        self.interrupted: list[int] = []
        #: series UIDs whose quiet period was extended for a resend: a released association delivering to
        #: them ends the wait (kept in memory so an ordinary release costs no database statement)
        self._waiting: set[str] = set()
        #: series UIDs delivered by each open association, for ``on_aborted`` and ``on_release``
        self._assoc_series: dict[Peer, set[str]] = {}
        self._stats_lock = threading.Lock()
        self._disk_floor_told = False
        self._refusal_told = -REFUSAL_TOLD_EVERY_S  # when the last "refusing C-STOREs" line was logged
        #: refused data sets: a peer sending bad ones on and on is told once per interval and status, with a count
        self._store_refusals = RefusalLog(logger=log, template="C-STORE from %s refused %s")
        self._last_seq: dict[Peer, int] = {}  # per open association: its last submitted row (release waits for it)
        self._released: set[Peer] = set()  # released with every row recorded: on_closed ends their quiet wait

    @property
    def _resend_wait(self) -> float:
        """Seconds a series that may lack images is kept from being judged quiet, for its senders to resend
        (after a dropped association, a database outage or an unclean stop)."""
        return max(self.settings.series.stable_seconds, self.settings.series.abort_grace_seconds)

    # ------------------------------------------------------------------------------ handlers
    def on_requested(self, peer: Peer) -> Rejection | None:
        """A-ASSOCIATE-RQ: reject a called AE title not ours and callers not on the allowlists, with the
        reason logged (PS3.8 9.3.4 reasons: 7 called AE title, 3 calling AE title, 1 none given)."""
        reason = None
        if self.settings.scp.require_called_ae and peer.called_ae != self.settings.scp.ae_title:
            reason, diag = (f"called AE title {peer.called_ae!r} is not ours ({self.settings.scp.ae_title}; "
                            "scp.require_called_ae)"), 0x07
        elif self._aets and peer.calling_ae not in self._aets:
            reason, diag = f"calling AE title {peer.calling_ae!r} not in scp.allowed_calling_aets", 0x03
        elif self._networks and not self._peer_allowed(peer.address):
            reason, diag = f"peer address {peer.address} not in scp.allowed_peers", 0x01
        if reason:
            log.warning("association from %s rejected: %s", peer.address, reason)
            return Rejection(0x01, 0x01, diag)  # rejected-permanent, service-user
        return None

    def _peer_allowed(self, address: str) -> bool:
        return address_allowed(address, self._networks)

    def on_echo(self, peer: Peer) -> int:
        return SUCCESS

    def on_release(self, peer: Peer, stored: bool = True) -> None:
        """A-RELEASE-RQ: confirm once this association's instances are in the database, or after
        scp.release_wait_seconds at the latest, whatever the database does (a sender whose instances are on
        disk must not report a failed release; what is not recorded then is recorded when the database answers,
        or by the start-up recovery). An association that stored nothing (a C-ECHO, the PACS's health probe)
        is confirmed at once. Ending an extended quiet period waits for on_closed, after the confirmation."""
        with self._stats_lock:
            seq = self._last_seq.pop(peer, None)
        if not stored or seq is None:
            return
        cfg = self.settings.scp
        wait = min(cfg.release_wait_seconds, cfg.network_timeout or cfg.release_wait_seconds)
        if self.writer.wait(seq, timeout=wait):
            self._released.add(peer)
        else:
            log.warning("release confirmed to %s after %g s (scp.release_wait_seconds) with %d received instances "
                        "not yet recorded (database slow or down: %s); their files are on disk and are recorded when "
                        "the database answers, or by the start-up recovery if the node stops first",
                        peer.calling_ae, wait, self.writer.backlog, self.writer.failing or "no answer yet")

    def _end_quiet(self, peer: Peer) -> None:
        """A released association delivered to series whose quiet period was extended for a resend (after an
        aborted association or a crash): they settle normally again."""
        delivered = self._assoc_series.pop(peer, None)
        resent = delivered & self._waiting if delivered and self._waiting else None
        if resent:
            self._waiting.difference_update(resent)
            try:
                end_quiet(self.db, sorted(resent), f"association from {peer.calling_ae} released")
            except Exception as exc:  # the timer alone decides
                log.error("could not end the extended quiet period: %s", first_line(exc))

    def on_aborted(self, peer: Peer, how: str) -> None:
        """An association ended without A-RELEASE (A-ABORT, a dropped connection, a timeout) after it
        delivered instances: a resend is likely, so its series must not count as quiet too soon
        (``series.abort_grace_seconds``)."""
        uids = self._assoc_series.pop(peer, None)
        grace = self.settings.series.abort_grace_seconds
        if not uids or grace <= 0:
            return
        try:
            self.writer.flush(timeout=self.settings.scp.network_timeout or 30)  # their rows exist first
            until = utcnow() + dt.timedelta(seconds=grace)
            ids = extend_quiet(self.db, until, f"association from {peer.calling_ae} {how}; not judged quiet "
                                               f"for {grace:g} s (series.abort_grace_seconds)", sorted(uids))
            self._waiting.update(ids.values())
            if ids:
                log.warning("association from %s %s mid-series: %d series wait %g s more for a resend",
                            peer.calling_ae, how, len(ids), grace)
        except Exception as exc:  # the database is down or the node is stopping: the timer alone decides
            log.error("could not extend the quiet period after an aborted association: %s", first_line(exc))

    def _after_outage(self, batch: list[Received]) -> None:
        """Instances acknowledged before the database refused rows are recorded only now, with the times they
        arrived: their series would look long quiet and be judged at once, without the images refused meanwhile
        (Out of Resources), which their senders are likely to send again. They wait as after an aborted
        association (the hold itself is set in the transaction that records them: ``writer.outage_hold_s``; this
        tells why on their timelines and lets a released resend end the wait)."""
        wait = self._resend_wait
        uids = sorted({item.meta.series_uid for item in batch})
        ids = extend_quiet(self.db, utcnow() + dt.timedelta(seconds=wait),
                           f"received while the database refused rows; not judged quiet for {wait:g} s, for the "
                           "senders to resend what was refused", uids)
        self._waiting.update(ids.values())
        if ids:
            log.warning("database back: %d series that were arriving wait %g s for their senders to resend",
                        len(ids), wait)

    def on_event_report(self, report: EventReport) -> int:
        """An N-EVENT-REPORT (an archive's Storage Commitment answer): answered by its class's handler."""
        handler = self.event_reports.get(report.sop_class_uid)
        if handler is None:
            log.warning("N-EVENT-REPORT for SOP class %s from %s: not supported (0x0112)", report.sop_class_uid,
                        report.peer.address)
            return NO_SUCH_SOP_INSTANCE
        return handler(report)

    def on_closed(self, peer: Peer) -> None:
        """The association ended (released or not, the release already confirmed): forget its last row."""
        with self._stats_lock:
            self._last_seq.pop(peer, None)
        if peer in self._released:  # its rows are recorded, so the series rows exist
            self._released.discard(peer)
            self._end_quiet(peer)
        self._assoc_series.pop(peer, None)

    def on_store(self, request: StoreRequest) -> int:
        try:
            return self._store(request)
        except Exception:  # never let one instance take the listener down; never claim success
            log.exception("C-STORE failed unexpectedly")
            self._count(StoreCount.REFUSED)
            return PROCESSING_FAILURE

    def _tell_refusal(self, why: str) -> None:
        """Each refused instance is counted (metrics); the reason is logged once per interval, not once per image
        of a PACS that sends on."""
        now = time.monotonic()
        if now - self._refusal_told >= REFUSAL_TOLD_EVERY_S:
            self._refusal_told = now
            log.error("refusing C-STOREs with Out of Resources (the sender keeps them and sends again): %s", why)

    def _store(self, req: StoreRequest) -> int:
        if req.oversize:  # read to its end by the acceptor without being held: nothing to keep or quarantine
            self._store_refusals.refused(
                req.peer.address, f"(0x{OUT_OF_RESOURCES:04X}): its data set of {req.oversize >> 20} MB is larger "
                f"than scp.max_instance_mb ({self.settings.scp.max_instance_mb} MB)", "oversize")
            self._count(StoreCount.REFUSED)
            return OUT_OF_RESOURCES
        if self.settings.scp.min_free_disk_mb and self.store.free_mb() < self.settings.scp.min_free_disk_mb:
            self._tell_refusal(f"free disk below scp.min_free_disk_mb ({self.settings.scp.min_free_disk_mb} MB)")
            self._count(StoreCount.REFUSED)
            if not self._disk_floor_told:  # once per episode, not once per refused image
                self._disk_floor_told = True
                notify(self.settings, "disk-floor", {"free_mb": round(self.store.free_mb(), 1),
                                                     "min_free_disk_mb": self.settings.scp.min_free_disk_mb,
                                                     "calling_ae": req.peer.calling_ae})
            return OUT_OF_RESOURCES
        self._disk_floor_told = False
        refusal = self.writer.refusal()
        if refusal is not None:
            self._count(StoreCount.REFUSED)
            self._tell_refusal(refusal)
            return OUT_OF_RESOURCES
        data = req.as_file()
        refused = command_problem(req)
        if refused is None:
            try:
                meta = read_received(req.dataset, req.transfer_syntax, self.settings.scp.max_instance_mb << 20)
            except UnreadableData as exc:
                refused = CANNOT_UNDERSTAND, str(exc)
            else:
                refused = dataset_problem(req, meta)
        if refused is not None:
            status, why = refused
            path = self.quarantine.keep(data, f"{why} (calling AE {req.peer.calling_ae}, status 0x{status:04X})")
            self._store_refusals.refused(
                req.peer.address, f"(0x{status:04X}): {why}; "
                + (f"kept in quarantine as {path.name}" if path else "not kept (scp.quarantine_max_mb)"),
                f"0x{status:04X}")
            self._count(StoreCount.REFUSED)
            return status
        # Only validated UIDs reach the path: distinct UIDs give distinct files, none outside incoming/.
        path = self.store.instance_path(meta.study_uid, meta.series_uid, meta.sop_uid)
        where = str(path)
        folder = self.stored.folder(meta.sop_uid)
        if folder is None and os.path.exists(where):
            folder = where.rpartition(os.sep)[0]
        resend = None
        if folder is not None:  # a re-used SOP Instance UID (see receive/resend.py)
            resend = self._resend_kind(req, stored_copy(folder, meta.sop_uid), where)
            if resend is not None and resend is not Resend.REPLACED:
                self._submit(req, Received(meta, "" if resend is Resend.KEPT_FIRST else where, len(data),
                                           req.peer.calling_ae, resend=resend), meta.series_uid)
                return KEPT_FIRST_COPY if resend is Resend.KEPT_FIRST else SUCCESS
        try:
            self.store.write_atomic(path, data)
        except OSError as exc:
            self._tell_refusal(f"cannot write a received instance into the data folder ({exc.strerror or exc})")
            self._count(StoreCount.REFUSED)
            return OUT_OF_RESOURCES
        # On disk now, so the peer may forget it.
        self.stored.add(meta.sop_uid, where)
        self._submit(req, Received(meta, where, len(data), req.peer.calling_ae, resend=resend), meta.series_uid)
        return SUCCESS

    def _resend_kind(self, req: StoreRequest, first: str, where: str) -> Resend | None:
        """What a C-STORE of a stored SOP Instance UID is: identical, or a conflict handled per
        scp.duplicate_policy; None if the first copy's file is gone (the retention purge): stored as new."""
        same = same_data_set(first, req.dataset)
        if same is None:
            return None
        if same and first == where:
            return Resend.IDENTICAL
        if self.recorder.policy is DuplicatePolicy.REPLACE:
            return Resend.REPLACED
        return Resend.KEPT_FIRST

    def _submit(self, req: StoreRequest, item: Received, series_uid: str) -> None:
        """Hand a row (or a re-send to count) to the recorder; the association's release waits for it."""
        seq = self.writer.submit(item)
        self._last_seq[req.peer] = seq  # one thread per association: no other writer of this key
        self._assoc_series.setdefault(req.peer, set()).add(series_uid)  # for on_aborted / on_release

    def _rejected(self, item: Received, reason: str) -> None:
        """A stored file whose row the database refused: keep it in quarantine with the reason. A re-send that
        wrote nothing of its own (identical, or kept out) leaves the first copy's file where its row points."""
        if item.path and item.resend not in (Resend.IDENTICAL, Resend.KEPT_FIRST):
            self.store.quarantine_file(Path(item.path), f"{reason} (calling AE {item.calling_aet})")
        self._count(StoreCount.REFUSED)

    def _recorded(self, new: int, duplicates: int) -> None:
        with self._stats_lock:
            self.stats[StoreCount.STORED] += new

    def _resent(self, identical: int, conflicting: int) -> None:
        with self._stats_lock:
            self.stats[StoreCount.DUPLICATES] += identical
            self.stats[StoreCount.CONFLICTS] += conflicting

    def _count(self, key: str) -> None:
        with self._stats_lock:
            self.stats[key] += 1

    # ------------------------------------------------------------------------------ server
    def start(self) -> None:
        cfg = self.settings.scp
        self.server = Acceptor(supported_contexts(tuple(self.event_reports)), self,
                               max_associations=cfg.max_associations,
                               network_timeout=cfg.network_timeout,
                               association_request_timeout=cfg.association_request_timeout,
                               max_associations_per_peer=cfg.max_associations_per_peer,
                               allowed_peers=cfg.allowed_peers, max_connections=cfg.max_connections,
                               max_connections_per_peer=cfg.max_connections_per_peer,
                               reserved_connections=cfg.reserved_connections,
                               peer_hosts=peer_addresses(destination_hosts([*self.settings.destinations,
                                                                            *self.settings.sources])),
                               max_instance=cfg.max_instance_mb << 20,
                               reserved_associations=cfg.reserved_associations)
        self.store.start_spares()
        # Walking incoming/ costs time on a large store and is only needed after an unclean stop: a clean
        # stop that committed every row leaves a marker, which this start consumes.
        clean = self.store.root / CLEAN_STOP_MARKER
        if clean.exists():
            clean.unlink()
        else:
            record_unrecorded(self.store, self.recorder, on_rejected=self._rejected)
            self.interrupted = receiving_series(self.db)
        self.writer.start()
        if not (cfg.tls.enabled and not cfg.tls.plain_listener):
            self._listen("scp.port", (cfg.bind_address, cfg.port))
        if self.tls_context is not None:
            self._listen("scp.tls.port", (cfg.tls.bind_address or cfg.bind_address, cfg.tls.port), self.tls_context)
        for host, port, tls in self.server.addresses():
            log.info("listening as %s on %s:%s%s", cfg.ae_title, host, port,
                     " (DICOM TLS%s)" % (", client certificate required" if cfg.tls.require_client_certificate else "")
                     if tls else "")

    def _listen(self, key: str, address: tuple[str, int], tls=None) -> None:
        assert self.server is not None
        try:
            self.server.start(address, tls=tls)
        except OSError as exc:
            host, port = address
            raise CannotListen(f"{key} = {port}: cannot listen on {host}:{port} ({exc.strerror or exc}); another "
                               "program (or another dicom-node) may hold it: stop that or choose another port") from exc

    def restart_quiet(self) -> None:
        """After an unclean stop, series that were arriving lost their senders' associations with the node:
        their quiet period starts again now, as long as after a dropped association (the senders retry).
        Called by the service just before completion checks start, so a slow model load does not use it up."""
        wait = self._resend_wait
        ids = extend_quiet(self.db, utcnow() + dt.timedelta(seconds=wait),
                           f"the node restarted after an unclean stop; not judged quiet for {wait:g} s",
                           series_ids=self.interrupted)
        self._waiting.update(ids.values())
        self.interrupted = []
        if ids:
            log.warning("unclean stop: %d series that were arriving wait %g s for their senders to resend",
                        len(ids), wait)

    @property
    def port(self) -> int:
        return self.server.server_address[1] if self.server else self.settings.scp.port

    def stop(self, timeout: float = 3.0) -> None:
        """Stop listening, then give the recorder up to ``timeout`` seconds to commit what is queued (a stop
        must not wait on a database that is down or a disk that is full: whatever is left has its file on disk
        and no clean-stop marker, so the next start records it)."""
        if self.server:
            self.server.stop()
            self.server = None
        self.writer.stop(timeout)
        if self.writer.backlog == 0 and self.writer.failing is None:
            try:
                (self.store.root / CLEAN_STOP_MARKER).write_text("every stored instance was recorded\n")
            except OSError as exc:  # a full disk: the next start walks incoming/, which is only slower
                log.warning("clean-stop marker not written (%s): the next start checks every stored file", exc)
        self.store.stop_spares()
