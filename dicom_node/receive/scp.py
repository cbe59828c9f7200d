"""The DICOM listener: C-ECHO and C-STORE, with caller allowlists, a disk floor and TCP_NODELAY.

One handler per event, as pynetdicom's own apps do; the association itself is served by acceptor.py
(why: see there). The C-STORE handler reads the header fields once, writes the encoded bytes it received
(no pixel decoding) and answers success once the file is on disk (fsynced when ``scp.fsync``); its database
row is committed a few milliseconds later in a batch (storage/recording.py), and before an association's
release is confirmed, so a sender that has finished knows its instances are recorded.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import threading
from pathlib import Path

from pynetdicom import _config
from pynetdicom.presentation import AllStoragePresentationContexts, build_context
from pynetdicom.sop_class import Verification
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from storage import queue
from storage.db import Database
from storage.filestore import FileStore
from storage.models import utcnow
from storage.queue import Received, Recorder
from storage.recording import BackgroundRecorder

from .acceptor import Acceptor
from .dimse import Peer, Rejection, StoreRequest
from ..config import Settings
from .headers import UnreadableData, read_received
from .recovery import record_unrecorded

log = logging.getLogger("dicom_node.receive.scp")

#: Uncompressed syntaxes, then the compressed ones our installed decoders (pylibjpeg, pylibjpeg-libjpeg,
#: pylibjpeg-openjpeg, pylibjpeg-rle) can decode for inference.
TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian,
    JPEGLosslessSV1, JPEGLossless, JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLSLossless, JPEGLSNearLossless,
    JPEG2000Lossless, JPEG2000, RLELossless,
]

#: Left in the data folder by a stop after which no stored file lacks its row (see start).
CLEAN_STOP_MARKER = ".clean-stop"

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000
PROCESSING_FAILURE = 0x0110


def quiet_pynetdicom() -> None:
    """pynetdicom logs every message, with patient identifiers at debug level: keep that out of our logs."""
    _config.LOG_HANDLER_LEVEL = "none"
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)


def supported_contexts() -> list:
    """Verification plus every storage SOP class pynetdicom knows, each with the syntaxes we can decode."""
    contexts = [build_context(Verification)]
    contexts += [build_context(cx.abstract_syntax, TRANSFER_SYNTAXES) for cx in AllStoragePresentationContexts]
    return contexts


class StorageSCP:
    """Accepts associations and stores what arrives."""

    def __init__(self, settings: Settings, db: Database, store: FileStore):
        self.settings = settings
        self.db = db
        self.store = store
        self.recorder = Recorder(db)
        self.writer = BackgroundRecorder(self.recorder, self._recorded, self._rejected)
        self._networks = [ipaddress.ip_network(n, strict=False) for n in settings.scp.allowed_peers]
        self._aets = {a.strip() for a in settings.scp.allowed_calling_aets}
        self.server: Acceptor | None = None
        self.stats = {"stored": 0, "duplicates": 0, "refused": 0}
        #: series that were receiving when the node stopped uncleanly (found at start; see restart_quiet)
        self.interrupted: list[int] = []
        #: series UIDs whose quiet period was extended for a resend: a released association delivering to
        #: them ends the wait (kept in memory so an ordinary release costs no database statement)
        self._waiting: set[str] = set()
        #: series UIDs delivered by each open association (peer address, port), for ``on_aborted``
        self._assoc_series: dict[tuple[str, int], set[str]] = {}
        self._stats_lock = threading.Lock()

    # ------------------------------------------------------------------------------ handlers
    def on_requested(self, peer: Peer) -> Rejection | None:
        """A-ASSOCIATE-RQ: reject callers not on the allowlists, with the reason logged."""
        reason = None
        if self._aets and peer.calling_ae not in self._aets:
            reason, diag = f"calling AE title {peer.calling_ae!r} not in scp.allowed_calling_aets", 0x03
        elif self._networks and not self._peer_allowed(peer.address):
            reason, diag = f"peer address {peer.address} not in scp.allowed_peers", 0x01
        if reason:
            log.warning("association rejected: %s", reason)
            return Rejection(0x01, 0x01, diag)  # rejected-permanent, service-user
        return None

    def _peer_allowed(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in self._networks)

    def on_echo(self, peer: Peer) -> int:
        return SUCCESS

    def on_release(self, peer: Peer) -> None:
        """A-RELEASE-RQ: confirm once this association's instances are in the database, or after
        scp.network_timeout at the latest (the peer must not hang on a database outage)."""
        delivered = self._assoc_series.pop((peer.address, peer.port), None)
        if not self.writer.flush(timeout=self.settings.scp.network_timeout or 30):
            log.warning("release confirmed to %s after scp.network_timeout with its instances not yet recorded "
                        "(database slow or down: %s); the files are on disk and are recorded when it answers",
                        peer.calling_ae, self.writer.failing)
        resent = delivered & self._waiting if delivered and self._waiting else None
        if resent:  # the resend an aborted association or a crash made us wait for: settle normally again
            self._waiting.difference_update(resent)
            try:
                queue.end_quiet(self.db, sorted(resent), f"association from {peer.calling_ae} released")
            except Exception:
                log.exception("could not end the extended quiet period")

    def on_aborted(self, peer: Peer, how: str) -> None:
        """An association ended without A-RELEASE (A-ABORT, a dropped connection, a timeout) after it
        delivered instances: a resend is likely, so its series must not count as quiet too soon
        (``series.abort_grace_seconds``)."""
        uids = self._assoc_series.pop((peer.address, peer.port), None)
        grace = self.settings.series.abort_grace_seconds
        if not uids or grace <= 0:
            return
        try:
            self.writer.flush(timeout=self.settings.scp.network_timeout or 30)  # their rows exist first
            until = utcnow() + dt.timedelta(seconds=grace)
            ids = queue.extend_quiet(self.db, until, f"association from {peer.calling_ae} {how}; not judged quiet "
                                                     f"for {grace:g} s (series.abort_grace_seconds)", sorted(uids))
            self._waiting.update(ids.values())
            if ids:
                log.warning("association from %s %s mid-series: %d series wait %g s more for a resend",
                            peer.calling_ae, how, len(ids), grace)
        except Exception:  # the database is down or the node is stopping: the timer alone decides
            log.exception("could not extend the quiet period after an aborted association")

    def on_store(self, request: StoreRequest) -> int:
        try:
            return self._store(request)
        except Exception:  # never let one instance take the listener down; never claim success
            log.exception("C-STORE failed unexpectedly")
            self._count("refused")
            return PROCESSING_FAILURE

    def _store(self, req: StoreRequest) -> int:
        if self.settings.scp.min_free_disk_mb and self.store.free_mb() < self.settings.scp.min_free_disk_mb:
            log.error("refusing C-STORE: free disk below scp.min_free_disk_mb (%s MB)", self.settings.scp.min_free_disk_mb)
            self._count("refused")
            return OUT_OF_RESOURCES
        refusal = self.writer.refusal()
        if refusal is not None:
            log.error("refusing C-STORE: %s", refusal)
            self._count("refused")
            return OUT_OF_RESOURCES
        data = req.as_file()
        try:
            meta = read_received(req.dataset, req.transfer_syntax)
            if meta.sop_uid != req.sop_instance_uid:
                raise UnreadableData("SOP Instance UID in the dataset differs from the C-STORE request")
        except UnreadableData as exc:
            path = self.store.quarantine_bytes(data, f"{exc} (calling AE {req.peer.calling_ae})")
            log.warning("C-STORE refused (0xC000): %s; kept in %s", exc, path.name)
            self._count("refused")
            return CANNOT_UNDERSTAND
        path = self.store.instance_path(meta.study_uid, meta.series_uid, meta.sop_uid)
        try:
            self.store.write_atomic(path, data)
        except OSError as exc:
            log.error("cannot write received instance: %s", exc)
            self._count("refused")
            return OUT_OF_RESOURCES
        # On disk now, so the peer may forget it. A re-sent instance lands on the same path (same UIDs) and is
        # recorded once.
        self.writer.submit(Received(meta, str(path), len(data), req.peer.calling_ae))
        series = self._assoc_series.get((req.peer.address, req.peer.port))
        if series is None:
            series = self._assoc_series[(req.peer.address, req.peer.port)] = set()
        series.add(meta.series_uid)
        return SUCCESS

    def _rejected(self, item: Received, reason: str) -> None:
        """A stored file whose row the database refused: keep it in quarantine with the reason."""
        self.store.quarantine_file(Path(item.path), f"{reason} (calling AE {item.calling_aet})")
        self._count("refused")

    def _recorded(self, new: int, duplicates: int) -> None:
        with self._stats_lock:
            self.stats["stored"] += new
            self.stats["duplicates"] += duplicates

    def _count(self, key: str) -> None:
        with self._stats_lock:
            self.stats[key] += 1

    # ------------------------------------------------------------------------------ server
    def start(self) -> None:
        cfg = self.settings.scp
        self.server = Acceptor(supported_contexts(), self, max_associations=cfg.max_associations,
                               network_timeout=cfg.network_timeout)
        self.store.start_spares()
        # Walking incoming/ costs time on a large store and is only needed after an unclean stop: a clean
        # stop that committed every row leaves a marker, which this start consumes.
        clean = self.store.root / CLEAN_STOP_MARKER
        if clean.exists():
            clean.unlink()
        else:
            record_unrecorded(self.store, self.recorder, on_rejected=self._rejected)
            self.interrupted = queue.receiving_series(self.db)
        self.writer.start()
        self.server.start((cfg.bind_address, cfg.port))
        log.info("listening as %s on %s:%s", cfg.ae_title, cfg.bind_address, self.port)

    def restart_quiet(self) -> None:
        """After an unclean stop, series that were arriving lost their senders' associations with the node:
        their quiet period starts again now, as long as after a dropped association (the senders retry).
        Called by the service just before completion checks start, so a slow model load does not use it up."""
        ser = self.settings.series
        wait = max(ser.stable_seconds, ser.abort_grace_seconds)
        ids = queue.extend_quiet(self.db, utcnow() + dt.timedelta(seconds=wait),
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

    def stop(self) -> None:
        if self.server:
            self.server.stop()
            self.server = None
        self.writer.stop()
        if self.writer.backlog == 0 and self.writer.failing is None:
            (self.store.root / CLEAN_STOP_MARKER).write_text("every stored instance was recorded\n")
        self.store.stop_spares()
