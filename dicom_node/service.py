"""``serve``: the listener, the scheduler and the worker in one process, sharing one database."""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from storage.db import Database
from storage.filestore import FileStore
from storage.jobs import release_dead_local_leases

from .config import CannotListen, ConfigError, Settings
from .deliver import commitment
from .deliver.outbox import Outbox
from .errors import database_reason
from .learn.registry import ensure_registered, serving_checkpoint
from .pipeline import Pipeline, worker_id
from .receive.scp import StorageSCP, quiet_pynetdicom
from .repeats import Repeats
from .scheduler import NodeScheduler
from .tls import client_context

log = logging.getLogger("dicom_node")

#: The longest ``Node.stop`` takes, whatever the disk, the database, a destination or a running job do: well
#: inside 10 s (room for a loaded machine), under orchestrators' stop timeouts (systemd's 90 s, many others' 30 s).
STOP_BUDGET_S = 6.0
#: Of that, what the recorder may use to commit received instances (the rest are recorded at the next start).
RECORDER_STOP_S = 3.0


def stop_all(steps: dict[str, Callable[[], None]], seconds: float) -> list[str]:
    """Run the stop steps side by side, each in a daemon thread, for at most ``seconds`` together (so a step
    blocked in the database or the network holds neither the others nor the stop); returns those left behind."""
    done: dict[str, threading.Event] = {}

    def run(what: str, step: Callable[[], None]) -> None:
        try:
            step()
        except Exception:
            log.exception("stopping %s failed", what)
        finally:
            done[what].set()

    for what, step in steps.items():
        done[what] = threading.Event()
        threading.Thread(target=run, args=(what, step), name=f"stop-{what}", daemon=True).start()
    deadline = time.monotonic() + seconds
    left = [what for what, ev in done.items() if not ev.wait(max(0.0, deadline - time.monotonic()))]
    for what in left:
        log.warning("stopping %s took longer than %.0f s: left behind, as a crash would leave it (taken up again "
                    "at the next start)", what, seconds)
    return left


def setup_logging(settings: Settings) -> None:
    logging.basicConfig(level=settings.node.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_pynetdicom()
    # APScheduler reports every run at INFO (and a skipped overlapping dispatch as a warning); highdicom logs
    # each copied module with instance UIDs. Neither helps an admin.
    logging.getLogger("apscheduler").setLevel(logging.ERROR)
    logging.getLogger("highdicom").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    quiet_pydicom_values()


def quiet_pydicom_values() -> None:
    """pydicom warns about each header value that breaks its VR, quoting the value ("Invalid value for VR DA:
    '19700101'"), to its logger and to stderr: with anonymised or old headers that puts birth dates and
    names into the node's log. Such values are read as they are and handled where they matter
    (encode/context.py), so the warnings are not needed; PHI stays out of the log."""
    import warnings

    from pydicom import config as pydicom_config

    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom(\.|$)")
    warnings.filterwarnings("ignore", message=r"(Invalid value for VR|The value length|Failed to (en|de)code)")


def open_storage(settings: Settings) -> tuple[Database, FileStore]:
    """The data folder and the database, each failure told as a configuration error naming its key (every
    command starts here: an admin's ``dicom-node jobs`` as much as ``serve``)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import DBAPIError

    folder = settings.data_dir
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"node.data_dir = {folder}: cannot create the data folder ({exc.strerror or exc})") from exc
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"node.data_dir = {folder}: this user ({os.getuid()}) cannot write in the data folder")
    db = Database(settings.database_url)
    try:
        db.create_schema(settings.data_dir)
    except DBAPIError as exc:  # the driver's own words, first line only; the password never printed
        db.dispose()
        shown = make_url(settings.database_url).render_as_string(hide_password=True)
        raise ConfigError(f"node.database_url = {shown}: the database cannot be opened ({database_reason(exc)}); "
                          "check that it runs, is reachable from here and the URL's user may connect") from exc
    return db, FileStore(settings.data_dir, fsync=settings.scp.fsync)


def make_predictor(settings: Settings, path: Path | None = None):
    """A worker's model: ``path`` (the registry's serving checkpoint), else as configured (the bundled demo
    model unless inference.model_path)."""
    from inference.predict import Predictor

    inf = settings.inference
    p = Predictor(path or settings.model_path, device=inf.device, batch_size=inf.batch_size, threads=inf.threads,
                  precision=inf.precision, compile=inf.compile)
    log.info("model %s v%s loaded on %s (%s)", p.card.name, p.card.version, p.device, str(p.dtype).split(".")[-1])
    return p


class Node:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.db, self.store = open_storage(settings)
        from inference.model_card import read_card

        read_card(settings.model_path)  # refuse to start on a checkpoint without a model card
        ensure_registered(settings, self.db)  # a new configured checkpoint serves; a known one changes nothing
        self.pipeline = Pipeline(settings, self.db, self.store, self._make_predictor, worker_id("serve"),
                                 model_source=lambda: serving_checkpoint(settings, self.db))
        # Storage Commitment answers arrive on the listener; the deliver stage handles them
        self.scp = StorageSCP(settings, self.db, self.store,
                              event_reports={commitment.SOP_CLASS: commitment.ListenerAnswers(self.db)})
        for i, dest in enumerate(settings.destinations):  # a bad certificate or key stops the start, key named
            if dest.tls:
                client_context(dest, f"destinations[{i}]")
        self.scheduler = NodeScheduler(settings, self.db, self.pipeline)
        # the outbox's sender: its own thread, so inference never waits on a destination
        self.outbox = Outbox(settings, self.db, worker_id("sender"))
        self.pipeline.on_outbox = self.outbox.wake
        self._sender_stop = threading.Event()
        self._sender = threading.Thread(target=self.outbox.run_forever, args=(self._sender_stop,),
                                        name="sender", daemon=True)
        # each committed batch of instances wakes the completion check (off the C-STORE path)
        self.scp.recorder.on_series = self.scheduler.completion.notify
        # a complete series of Segmentation objects is a viewer's correction: the learn stage records it
        # (and each scored one may move a structure's rolling median below learning.accuracy_floor)
        from .learn.accuracy import check_accuracy_drop
        from .learn.intake import Intake, IntakeThread

        self.intake = IntakeThread(Intake(self.db, settings.data_dir,
                                          after_corrected=lambda: check_accuracy_drop(settings, self.db)))
        self.scheduler.completion.on_segmentation = self.intake.submit
        self.scheduler.after_scan = self.intake.settle_waiting  # corrections that came before their series' result
        self.web = None
        if settings.web.enabled:
            from .watch.web import WebServer, create_app

            app = create_app(settings, self.db, self.scp.stats, lambda: self.scp.server is not None,
                             lambda: self.scp.writer.backlog)
            self.web = WebServer(app, settings.web.bind_address, settings.web.port, settings.web)
        self._stopped = threading.Event()

    def _make_predictor(self, path: Path | None = None):
        return make_predictor(self.settings, path)

    def start(self, preload: bool = True) -> None:
        raise_open_files_limit()
        n = release_dead_local_leases(self.db, socket.gethostname())
        if n:
            log.warning("%d jobs were interrupted by the last shutdown and will be taken again", n)
        if self.web:  # first: a dashboard port that cannot be opened stops the start before any image is taken
            self.web.start()
        self.scp.start()
        if preload:
            _ = self.pipeline.predictor
        self.scp.restart_quiet()  # after an unclean stop: now, as judging starts (the model load may be long)
        self.intake.start()
        self.scheduler.start()
        if self.settings.sender.enabled:
            self._sender.start()

    def stop(self) -> bool:
        """Stop within STOP_BUDGET_S in every state; returns whether everything ended (False: a job, a delivery or
        a step blocked in the database was left behind, as a crash would leave it: its lease or claim is taken
        again at the next start, and received instances not yet recorded are recorded then)."""
        self._sender_stop.set()
        self.outbox.wake()
        self.pipeline.stopping.set()
        steps: dict[str, Callable[[], None]] = {
            "the listener": lambda: self.scp.stop(RECORDER_STOP_S),
            "the scheduler": lambda: self.scheduler.stop(STOP_BUDGET_S),
            "the corrections intake": lambda: self.intake.stop(STOP_BUDGET_S),
        }
        if self._sender.is_alive():
            steps["the sender"] = self._sender.join  # a delivery in progress ends with its round
        if self.web:
            steps["the dashboard"] = self.web.stop
        clean = not stop_all(steps, STOP_BUDGET_S)
        job = self.pipeline.current_job
        if job is not None:
            log.warning("job %s left running at stop: it is taken again at the next start", job)
            clean = False
        self._stopped.set()
        return clean

    def serve_forever(self) -> None:
        starting = True

        def on_signal(*_) -> None:
            self._stopped.set()
            if starting:  # a start may take long (the model, the start-up recovery): do not finish it first
                raise _StoppedWhileStarting

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, on_signal)
        try:
            self.start()
            starting = False
        except _StoppedWhileStarting:
            log.warning("stopped while starting: what was begun is taken up again at the next start")
            _exit_now()
        except CannotListen as exc:  # nothing to finish: an image taken by a listener opened just before is on disk
            log.error("cannot start: %s", exc)
            print(f"configuration error: {exc}", file=sys.stderr, flush=True)
            _exit_now(2)
        listener = self.scp.server
        assert listener is not None, "start() returned, so the listeners are open"
        ports = ", ".join(f"{host}:{port}{' (TLS)' if tls else ''}" for host, port, tls in listener.addresses())
        print(f"dicom-node listening as {self.settings.scp.ae_title} on {ports}; data in {self.settings.data_dir}; "
              "Ctrl-C to stop", flush=True)
        if self.web:
            print(f"dashboard on http://{self.settings.web.bind_address}:{self.settings.web.port}/", flush=True)
        self._stopped.wait()
        log.info("stopping")
        t0 = time.monotonic()
        clean = self.stop()
        log.info("stopped in %.1f s%s", time.monotonic() - t0, "" if clean else " (work left for the next start)")
        _exit_now()


class _StoppedWhileStarting(Exception):
    """SIGTERM or SIGINT arrived before the node had started."""


def _exit_now(code: int = 0) -> None:
    """End the process once the orderly stop is done: the interpreter's own exit would join every executor
    thread, a running job's and a stuck database call's included, however long they take."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


#: Open files the node asks for (up to the hard limit): the listener's and the dashboard's connection caps,
#: the data folder's files and the database's connections, with room to spare.
OPEN_FILES_WANTED = 65536


def raise_open_files_limit() -> None:
    """Raise the soft limit on open files towards the hard one. The usual soft limit (1024) is what a process
    gets unless it asks; Go and Java runtimes raise it themselves, Python does not. The connection caps keep
    the node's own use bounded; this leaves room for the files behind them."""
    try:
        import resource
    except ImportError:  # not on this platform
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = OPEN_FILES_WANTED if hard == resource.RLIM_INFINITY else min(hard, OPEN_FILES_WANTED)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError) as exc:
            log.warning("open files stay limited to %d (could not raise it to %d: %s)", soft, want, exc)


def _until_stopped(loop: Callable[[threading.Event], None], name: str) -> None:
    """Run ``loop(stop)`` until SIGTERM or SIGINT, then give it STOP_BUDGET_S to end its round (a job or a
    delivery in progress is left to its lease or claim, as after a crash) and end the process."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    thread = threading.Thread(target=loop, args=(stop,), name=name, daemon=True)
    thread.start()
    while thread.is_alive() and not stop.wait(1.0):
        pass
    if not stop.is_set():  # the loop ended by itself: exit non-zero, so that a supervisor (systemd) restarts it
        log.error("the %s's loop ended unexpectedly; exiting so that it is restarted", name)
        _exit_now(1)
    thread.join(STOP_BUDGET_S)
    if thread.is_alive():
        log.warning("the %s's round did not end within %.0f s: what it was doing is taken up again by the next "
                    "claim", name, STOP_BUDGET_S)
    _exit_now()


def run_worker(settings: Settings) -> None:
    """``dicom-node worker``: only the job loop, for scale-out. Workers on any machine that share the
    database claim jobs with row locks; the images must be reachable at the same paths (shared storage)."""
    db, store = open_storage(settings)
    from inference.model_card import read_card

    read_card(settings.model_path)
    ensure_registered(settings, db)
    pipeline = Pipeline(settings, db, store, lambda path=None: make_predictor(settings, path), worker_id("worker"),
                        model_source=lambda: serving_checkpoint(settings, db))
    _ = pipeline.predictor
    print(f"dicom-node worker {pipeline.owner} polling {db.url.split('@')[-1]}", flush=True)

    def work(stop: threading.Event) -> None:
        repeats = Repeats(log, "worker round")
        while not stop.is_set():
            ran = False
            with repeats:  # the database gone or full while claiming or recording: try again
                ran = pipeline.run_next()
            if not ran:
                stop.wait(settings.worker.poll_seconds)

    _until_stopped(work, "worker")


def run_sender(settings: Settings) -> None:
    """``dicom-node sender``: only the outbox's sender loop (e.g. on a host near the PACS, or with
    ``sender.enabled = false`` in ``serve``). Several senders may run: rows are claimed with row locks."""
    db, _ = open_storage(settings)
    outbox = Outbox(settings, db, worker_id("sender"))
    destinations = ", ".join(d.name for d in settings.destinations) or "no destination"
    print(f"dicom-node sender {outbox.owner} for {destinations}", flush=True)
    _until_stopped(outbox.run_forever, "sender")
