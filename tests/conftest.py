"""Shared fixtures: a real node process, a real dcmtk storescp playing the PACS, phantom series on disk."""

from __future__ import annotations

import itertools
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DCMTK = {name: f"/usr/bin/{name}" for name in ("storescu", "echoscu", "storescp")}
#: pytest-xdist's worker name (gw0, gw1, ...) and count; a serial run is worker 0 of 1.
WORKER = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if (os.cpu_count() or 1) <= WORKERS:
    # as many test processes as cores: each one's torch (the in-process predictions and every node, training
    # and benchmark process it starts) on one thread, so the workers do not run twice their number of busy threads
    os.environ.setdefault("OMP_NUM_THREADS", "1")
ENV = {**os.environ, "TCP_NODELAY": "1"}


def _port_band() -> range:
    """This worker's share of the ports just below the kernel's ephemeral range. A port the kernel hands out
    (bind to 0) is free only until the socket closes: another worker asking next, or any outgoing connection
    (storescu, HTTP clients), can get the same one before the server under test binds it. Below the ephemeral
    range no outgoing connection takes it, and each worker picks from its own band."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    ports = range(max(1024, low - 12000), low)
    size = len(ports) // WORKERS
    start = ports.start + int(WORKER.removeprefix("gw") or 0) % WORKERS * size
    return range(start, start + size)


_PORTS = _port_band()
# a random start, so two test runs side by side on one machine seldom walk the same ports
_NEXT_PORT = itertools.count(random.randrange(len(_PORTS)))


def free_port() -> int:
    """A port of this worker's band that nothing listens on, never the same twice in a run (until the band
    wraps): a server stopped by one test may leave its port in TIME_WAIT."""
    for _ in range(len(_PORTS)):
        port = _PORTS[next(_NEXT_PORT) % len(_PORTS)]
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError(f"no free port in {_PORTS}")


#: Run first, heaviest first, so the workers end together: pytest-xdist's loadfile hands each module whole to one
#: worker (its module fixtures, a node and a PACS, set up once), in this order. Ordered by the time each module
#: took with three workers on an idle 2-core machine (2026-12-07: 259 s for the 1000-slice series down to 43 s;
#: the last three measured alone later the same day, 41, 41 and 34 s, so that none of them starts last).
HEAVY_FIRST = ("tests/test_whole_body.py", "tests/test_durability.py", "tests/test_input_variety.py",
               "tests/test_outbox.py", "tests/test_corrections_loop.py", "tests/test_quality_gate.py",
               "tests/test_header_corpus.py", "tests/test_foreign_through_node.py", "tests/test_completion.py",
               "tests/test_bench_smoke.py", "tests/test_end_to_end.py", "tests/test_bounded_waits.py",
               "tests/test_learning_round.py", "tests/test_corrections_waiting.py", "tests/test_viewer.py",
               "tests/test_training.py", "tests/test_probe.py", "tests/test_preprocessing.py",
               "tests/test_data_folder.py", "tests/test_database_outage.py", "tests/test_hostile.py",
               "tests/test_hostile_web.py", "tests/test_disk_full.py")


def pytest_collection_modifyitems(config, items):
    """The heaviest modules first; the rest, and the tests within a module, in collection order."""

    def rank(item) -> int:
        return next((k for k, prefix in enumerate(HEAVY_FIRST) if item.nodeid.startswith(prefix)), len(HEAVY_FIRST))

    items.sort(key=rank)


def wait_for(pred, timeout: float = 60.0, interval: float = 0.2, what: str = "condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def need_dcmtk() -> None:
    for path in DCMTK.values():
        if not Path(path).exists():
            pytest.fail(f"{path} missing: install Debian's dcmtk (the README's test command does)")


LABELMAP_SEG = "1.2.840.10008.5.1.4.1.1.66.7"
#: Errors Debian's dciodvfy reports on every LABELMAP SEG because it predates that SOP class (DICOM 2024,
#: Sup 243): it has no IOD for it, and applies the BINARY rule that segment numbers start at 1, which
#: Sup 243 lifted for label maps. Listed in README "Validation"; any other error still fails.
LABELMAP_VALIDATOR_GAPS = ("Error - Information Object Not found",
                           "Error - SegmentNumber not monotonically increasing from one")


def dciodvfy_errors(path: Path) -> list[str]:
    """dicom3tools' IOD validator on one file: its "Error" lines (none means valid)."""
    import pydicom

    v = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    errors = [ln for ln in (v.stdout + v.stderr).splitlines() if ln.startswith("Error")]
    if pydicom.dcmread(path, stop_before_pixels=True).SOPClassUID == LABELMAP_SEG:
        errors = [e for e in errors if not e.startswith(LABELMAP_VALIDATOR_GAPS)]
    return errors


PIXELMED_JAR = Path("/usr/share/java/pixelmed.jar")
PIXELMED_BATCH = ROOT / "tests/pixelmed/PixelmedBatch.java"
#: Pixelmed's XSLT rules exceed the XPath limits newer JDKs set by default (JAXP0801003); lift them.
JAVA_XML_LIMITS = ("-Djdk.xml.xpathExprOpLimit=0", "-Djdk.xml.xpathExprGrpLimit=0", "-Djdk.xml.xpathTotalOpLimit=0")


def _pixelmed_classes() -> Path:
    """PixelmedBatch compiled once per checkout and JDK (javac), reused by every later check."""
    import hashlib
    import tempfile

    key = hashlib.sha256(PIXELMED_BATCH.read_bytes() + str(PIXELMED_JAR.stat().st_mtime).encode()).hexdigest()[:16]
    out = Path(tempfile.gettempdir()) / f"dicom-node-pixelmed-{key}"
    if not (out / "PixelmedBatch.class").exists():
        tmp = Path(tempfile.mkdtemp(prefix="pixelmed-build-"))
        r = subprocess.run(["javac", "-cp", str(PIXELMED_JAR), "-d", str(tmp), str(PIXELMED_BATCH)],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, f"javac PixelmedBatch failed:\n{r.stderr}"
        try:
            tmp.rename(out)
        except OSError:  # another process compiled it first
            shutil.rmtree(tmp, ignore_errors=True)
    return out


class _PixelmedServer:
    """One Pixelmed JVM for the whole test session (tests/pixelmed/PixelmedBatch.java): its SR validator
    compiles the XSLT once (~5 s of CPU that every test's teardown paid before) and the JIT stays warm. File paths go in
    on stdin, each batch closed by "--end--"; a reader thread collects the answer up to "==< done", so a
    JVM that hangs fails the check after ``timeout`` seconds instead of hanging the suite."""

    def __init__(self):
        import atexit
        import tempfile
        import threading

        self.proc: subprocess.Popen | None = None
        self.lock = threading.Lock()
        # the JVM's stderr goes to a file: an unread pipe could fill and stall it
        self.stderr = tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace")  # noqa: SIM115  # open for the server's life
        atexit.register(self.close)

    def _start(self) -> subprocess.Popen:
        # the full JIT (no TieredStopAtLevel=1): the SR validator's XSLT runs ~1.6 s a file, and C2 makes a
        # batch of 24 SEGs and SRs take 31 s instead of 48 s, the 1000-slice SEG 20 s instead of 32 s; one GC
        # thread, as dciodvfy runs beside it
        proc = subprocess.Popen(["java", *JAVA_XML_LIMITS, "-XX:+UseSerialGC",
                                 "-cp", f"{PIXELMED_JAR}:{_pixelmed_classes()}", "PixelmedBatch"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                                text=True, encoding="utf-8", bufsize=1)
        return proc

    def validate(self, paths: list[Path], timeout: float = 600) -> str:
        import threading

        with self.lock:
            if self.proc is None or self.proc.poll() is not None:
                self.proc = self._start()
            proc, lines = self.proc, []

            def read() -> None:
                for line in proc.stdout:
                    if line.rstrip("\n") == "==< done":
                        return
                    lines.append(line)

            reader = threading.Thread(target=read, daemon=True)
            reader.start()
            proc.stdin.write("".join(f"{p}\n" for p in paths) + "--end--\n")
            proc.stdin.flush()
            reader.join(timeout)
            if reader.is_alive() or proc.poll() is not None:
                proc.kill()
                proc.wait(10)
                self.stderr.seek(0)
                err = self.stderr.read()[-2000:]
                self.proc = None
                raise AssertionError(f"Pixelmed validator failed or hung:\n{''.join(lines)[-2000:]}\n{err}")
            return "".join(lines)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


_PIXELMED = _PixelmedServer()


def pixelmed_errors(paths: list[Path]) -> dict[Path, list[str]]:
    """Pixelmed's validators (the one IHE Connectathons use for SRs) on ``paths``, in the session's one JVM:
    each file's "Error" lines (DicomSRValidator for SRs, DicomInstanceValidator for the rest)."""
    if not paths:
        return {}
    if not PIXELMED_JAR.exists() or shutil.which("javac") is None:
        pytest.fail("Pixelmed validator missing: install Debian's pixelmed-apps and default-jdk-headless "
                    "(./node.sh test does)")
    errors: dict[Path, list[str]] = {}
    current: Path | None = None
    for line in _PIXELMED.validate(paths).splitlines():
        if line.startswith("==> "):
            current = Path(line[4:])
            errors[current] = []
        elif line.startswith("Error") and current is not None:
            errors[current].append(line)
    assert set(errors) == set(paths), "Pixelmed did not report on every file"
    return errors


#: Debian's Pixelmed (2022) checks PN/LO/SH values of a SEG against the default repertoire even when the file
#: declares its character set (ISO_IR 100, ISO_IR 192, ISO 2022 IR 87, GB18030): "Illegal character(s) 'ü'".
#: Tolerated only for a file that declares a Specific Character Set whose values pydicom decodes cleanly (no
#: replacement characters), i.e. values legal in the declared set. Listed in README "Validation".
PIXELMED_CHARSET_GAP = "Illegal character(s)"


def _decodes_cleanly(ds) -> bool:
    """Whether the file declares a non-default character set and every text value decodes under it."""
    charset = ds.get("SpecificCharacterSet")
    if not charset or charset in ("ISO_IR 6", ["ISO_IR 6"]):
        return False
    try:
        ds.decode()
    except Exception:
        return False
    return all("\ufffd" not in str(el.value) for el in ds.iterall() if el.VR in ("PN", "LO", "SH", "ST", "LT", "UT"))


def check_results_valid(files: list[Path], pixelmed_max_frames: int | None = None) -> int:
    """Every SEG and SR among ``files`` passes dciodvfy, and every SR and BINARY SEG Pixelmed's validator,
    with no errors; returns how many were checked. (Debian's Pixelmed, 2022, predates LABELMAP SEGs.)
    ``pixelmed_max_frames``: SEGs with more frames get dciodvfy only (the 1000-slice test's SEG: Pixelmed
    checks the same encoder's BINARY SEGs in every other test, and that one alone costs it ~40 CPU-s)."""
    from concurrent.futures import ThreadPoolExecutor

    import pydicom

    problems, results, for_pixelmed, charset_ok = [], [], [], set()
    for p in files:
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True)
        except Exception:
            continue
        modality = ds.get("Modality")
        if modality in ("SEG", "SR"):
            results.append((p, modality))
            frames = int(ds.get("NumberOfFrames", 1) or 1)
            if ds.SOPClassUID != LABELMAP_SEG and (pixelmed_max_frames is None or frames <= pixelmed_max_frames):
                for_pixelmed.append(p)
                if _decodes_cleanly(ds):
                    charset_ok.add(p)
    # the validators are separate processes: Pixelmed's one JVM (SRs ~1.6 s each once its XSLT is compiled;
    # the 1000-slice SEG 20 s) beside dciodvfy (20 s for that SEG, milliseconds for the rest). Measured on
    # this 2-core machine, a second JVM sharing the files gained nothing (30 s against 31 s for 24 files).
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        by_pixelmed = pool.submit(pixelmed_errors, for_pixelmed)
        by_dciodvfy = [(p, modality, pool.submit(dciodvfy_errors, p)) for p, modality in results]
        for p, modality, errors in by_dciodvfy:
            problems += [f"{p.name} ({modality}): {e}" for e in errors.result()]
        pixelmed = by_pixelmed.result()
    n = len(results)
    for p, errors in pixelmed.items():
        if p in charset_ok:
            errors = [e for e in errors if PIXELMED_CHARSET_GAP not in e]
        problems += [f"{p.name} (Pixelmed): {e}" for e in errors]
    assert not problems, "validator errors:\n" + "\n".join(problems[:40])
    return n


class PacsSCP:
    """dcmtk's storescp, receiving what the node sends. On stop, every SEG and SR it received is checked with
    dciodvfy and Pixelmed, so each result any test produces is validated, not only those a test looks at."""

    def __init__(self, folder: Path, aet: str = "PACS", flags: tuple[str, ...] = (), port: int | None = None):
        need_dcmtk()
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.aet = aet
        self.port = port or free_port()
        self.proc = subprocess.Popen(
            [DCMTK["storescp"], "-aet", aet, "-od", str(folder), "+xa", *flags, str(self.port)],
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        time.sleep(0.3)

    def files(self) -> list[Path]:
        return sorted(p for p in self.folder.iterdir() if p.is_file())

    def stop(self, validate: bool = True, pixelmed_max_frames: int | None = None) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        if validate:
            check_results_valid(self.files(), pixelmed_max_frames)


class NodeProcess:
    """``dicom-node serve`` in a subprocess with its own config, data folder and port."""

    def __init__(
        self,
        tmp: Path,
        pacs: PacsSCP | None,
        extra: str = "",
        name: str = "node",
        wait_echo: bool = True,
        worker: str = "",
        web: str = "",
        database_url: str = "",
        port: int | None = None,
        dest_extra: str = "",
        more: str = "",
        series: str = "stable_seconds = 1.0\nscan_interval_seconds = 0.3",
        tta: bool = False,
    ):
        # The gate's augmented pass doubles the network time of every job; only the gate's own tests
        # (tests/test_quality_gate.py) need it, the rest test transport, storage and encoding.
        if "[quality]" not in more:
            more += f"\n[quality]\ntta = {'true' if tta else 'false'}\n"
        self.dir = tmp / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.web_port = free_port()
        self.database_url = database_url
        self.config = self.dir / "node.toml"
        dest = (f'[[destinations]]\nname = "pacs"\nae_title = "{pacs.aet}"\nhost = "127.0.0.1"\n'
                f'port = {pacs.port}\nretries = 2\nbackoff_seconds = 0.5\n{dest_extra}\n') if pacs else ""
        self.config.write_text(
            f'[node]\ndata_dir = "var"\nlog_level = "INFO"\ndatabase_url = "{database_url}"\n'
            f'[scp]\nae_title = "SEGNODE"\nbind_address = "127.0.0.1"\nport = {self.port}\nfsync = false\n'
            + ("" if "min_free_disk_mb" in extra else "min_free_disk_mb = 1\n") + f'{extra}\n'
            f'[series]\n{series}\n'
            f'[worker]\npoll_seconds = 0.3\n{worker}\n[web]\nport = {self.web_port}\n{web}\n' + dest + more
        )
        self.log = self.dir / "node.log"
        with open(self.log, "w") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen([sys.executable, "-m", "dicom_node", "-c", str(self.config), "serve"],
                                         cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=ENV)
        if wait_echo:
            wait_for(self._answers, 90, 0.5, "the node to answer C-ECHO")
        else:
            wait_for(lambda: "listening as" in self.log.read_text() or self.proc.poll() is not None, 90, 0.3, "start")

    def _answers(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"node exited with {self.proc.returncode}:\n{self.log.read_text()}")
        r = subprocess.run([DCMTK["echoscu"], "-aet", "GOODSCU", "-aec", "SEGNODE", "127.0.0.1", str(self.port)],
                           env=ENV, capture_output=True)
        return r.returncode == 0

    @property
    def data_dir(self) -> Path:
        return self.dir / "var"

    def db(self):
        from storage.db import Database

        return Database(self.database_url or f"sqlite:///{self.data_dir / 'node.db'}")

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "dicom_node", "-c", str(self.config), *args], cwd=ROOT,
                              capture_output=True, text=True, env=ENV, timeout=120)

    def jobs(self) -> list[dict]:
        """The node's 100 newest jobs, as ``dicom-node jobs --json -n 100`` prints them, read in this process:
        the command's own process cost 1.5 s of CPU a call (11 s on the loaded machine), and tests poll this.
        ``jobs_cli`` runs the command itself; test_end_to_end checks that both agree."""
        import json

        from dicom_node.watch.admin import job_rows

        db = self.db()
        try:
            return json.loads(json.dumps(job_rows(db, 100)))
        finally:
            db.dispose()

    def jobs_cli(self) -> list[dict]:
        import json

        r = self.cli("jobs", "--json", "-n", "100")
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    def wait_job(self, series_uid: str, states=("done", "failed", "skipped"), timeout: float = 120) -> dict:
        def find():
            from sqlalchemy import select

            from storage.models import Job, Series

            db = self.db()
            try:
                with db.session() as s:
                    row = s.execute(select(Job.id, Job.state).join(Series).where(Series.series_uid == series_uid)
                                    .order_by(Job.id.desc())).first()
            finally:
                db.dispose()
            return row if row and row[1] in states else None

        wait_for(find, timeout, 0.3, f"a job for series {series_uid} to reach {states}")
        return next(j for j in self.jobs() if j["series_uid"] == series_uid)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    p = PacsSCP(tmp_path_factory.mktemp("pacs"))
    yield p
    p.stop()


@pytest.fixture(scope="module")
def node(tmp_path_factory, pacs):
    n = NodeProcess(tmp_path_factory.mktemp("node"), pacs,
                    extra='allowed_calling_aets = ["GOODSCU", "STORESCU", "DICOMNODE", "ECHOSCU"]')
    yield n
    n.stop()
    assert n.proc.returncode in (0, -15), n.log.read_text()[-3000:]


@pytest.fixture(scope="session")
def bundled_predictor():
    """The bundled model on the CPU, loaded once per precision for the whole session (``"auto"`` is what a node
    on this machine runs): tests only call ``predict``, which keeps no state between series."""
    from inference.model import BUNDLED_MODEL
    from inference.predict import Predictor

    loaded: dict[str, Predictor] = {}

    def get(precision: str = "auto") -> Predictor:
        if precision not in loaded:
            loaded[precision] = Predictor(BUNDLED_MODEL, device="cpu", precision=precision)
        return loaded[precision]

    return get


def write_series(folder: Path, seed: int = 1, **kw) -> tuple:
    """A small phantom series on disk; returns (phantom, paths)."""
    from inference.phantom import small_series
    from inference.phantom_io import write_dicom_series
    ph = small_series(seed=seed, n_slices=kw.pop("n_slices", 24), size=kw.pop("size", 128),
                      legs=kw.pop("legs", "both"))
    paths = write_dicom_series(ph, folder, seed=seed, **kw)
    return ph, paths


def storescu(
    port: int, *paths: Path, aet: str = "STORESCU", flags: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    need_dcmtk()
    return subprocess.run([DCMTK["storescu"], "-aet", aet, "-aec", "SEGNODE", "+sd", *flags, "127.0.0.1", str(port),
                           *map(str, paths)], env=ENV, capture_output=True, text=True, timeout=120)


@pytest.fixture
def workdir(tmp_path):
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)
