"""Headers as real archives send them: anonymised, old and odd series, sent to one node as a PACS would.

Each case is a phantom series whose headers (or pixel encoding, or geometry) are changed the way an
anonymiser, a CD import, a research export or another vendor's scanner changes them. All cases go to one
node process in one dcmtk storescu run (several studies over one association), and each must come back as
a SEG + SR in the source study (dciodvfy-clean: the PACS fixture validates every result it receives), with
the patient/study context copied correctly, or be skipped with a reason in words. No job may carry Python
exception text.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import NodeProcess, PacsSCP, storescu, wait_for
from pydicom.dataelem import DataElement

from dicom_node.errors import EXCEPTION_NAME
from inference.phantom import Geometry, Phantom, render, small_series
from inference.phantom_io import write_dicom_series

N_SLICES, SIZE = 10, 96  # small, so that each case costs seconds on 2 cores (the node's rule asks for 8 slices)
SEED0 = 307  # the first case's phantom seed; the bone Dice range quoted below was measured on these phantoms
RULES = '[[rules]]\nname = "header corpus"\nmin_slices = 8\n'  # the default lower-limb terms and MR

Mutate = Callable[[pydicom.Dataset], None]


@dataclass
class Case:
    name: str
    mutate: Mutate | None = None
    expect: str = "done"                 # or "skipped"
    reason: str = ""                      # words the skip reason must contain
    context: dict = field(default_factory=dict)  # attribute -> value the SEG and SR must carry
    charset: str | list | None = None     # Specific Character Set the results must declare (None: any)
    geometry: tuple | None = None         # (row_dir, col_dir, tilt_deg, step_sign, order)
    size: int = SIZE
    paths: list[Path] = field(default_factory=list)
    truth: np.ndarray | None = None       # ground-truth bone mask in the order of ``paths``
    series_uid: str = ""


def drop(*keywords: str) -> Mutate:
    def f(ds):
        for kw in keywords:
            if kw in ds:
                delattr(ds, kw)
    return f


def text(charset, name: str, study: str, series: str = "AX T1 LEG") -> Mutate:
    def f(ds):
        ds.SpecificCharacterSet = charset
        ds.PatientName, ds.StudyDescription, ds.SeriesDescription = name, study, series
    return f


def undeclared(name: bytes, study: bytes) -> Mutate:
    """Non-ASCII bytes and no Specific Character Set, as older software and some anonymisers write."""
    def f(ds):
        del ds.SpecificCharacterSet
        ds.add(DataElement(0x00100010, "PN", name))
        ds.add(DataElement(0x00081030, "LO", study))
    return f


def private_blocks(ds):
    """A long vendor block (200 elements, 64 KiB of OB) and a CSA-like header, as scanners write."""
    ds.add_new(0x00290010, "LO", "ACME MR 1.0")
    for i in range(200):
        ds.add_new(0x00291000 + i, "LO" if i % 2 else "OB", f"value {i}" if i % 2 else bytes(range(256)) * 4)
    ds.add_new(0x002910FF, "OB", b"\x00" * 65536)
    ds.add_new(0x00190010, "LO", "SIEMENS CSA HEADER")
    ds.add_new(0x00191010, "OB", b"SV10" + b"\x01" * 20000)


def signed_rescaled(ds):
    a = np.frombuffer(ds.PixelData, np.uint16).astype(np.int32) - 2048
    ds.PixelRepresentation, ds.BitsStored, ds.HighBit = 1, 16, 15
    ds.PixelData = a.astype(np.int16).tobytes()
    ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = "2.5", "-100", "US"
    del ds.WindowCenter, ds.WindowWidth


def monochrome1(ds):
    ds.PixelData = (4095 - np.frombuffer(ds.PixelData, np.uint16)).astype(np.uint16).tobytes()
    ds.PhotometricInterpretation = "MONOCHROME1"


def bits_stored_16(ds):
    ds.PixelData = (np.frombuffer(ds.PixelData, np.uint16).astype(np.uint32) * 16).astype(np.uint16).tobytes()
    ds.BitsStored, ds.HighBit = 16, 15


def odd_values(ds):
    """What some anonymisers and old systems leave: an unknown sex code, dates with dashes, a time with a
    colon, an age without its unit (none is valid DICOM)."""
    ds.PatientSex, ds.StudyDate, ds.PatientBirthDate, ds.StudyTime = "U", "2026-01-01", "1970-07-31", "9:30"
    ds.PatientAge = "45"


TYPE2 = ("PatientBirthDate", "PatientSex", "ReferringPhysicianName", "StudyID", "AccessionNumber", "StudyDate",
         "StudyTime")
#: IOPs a scanner writes for axial slices in each patient position (rows along the first vector).
POSITIONS = {"HFS": ((1, 0, 0), (0, 1, 0)), "FFS": ((-1, 0, 0), (0, 1, 0)), "HFP": ((-1, 0, 0), (0, -1, 0)),
             "FFP": ((1, 0, 0), (0, -1, 0)), "HFDL": ((0, -1, 0), (1, 0, 0)), "FFDR": ((0, -1, 0), (-1, 0, 0))}

CASES = [
    # one case drops them all: the results fill each absent one in the same loop (encode/context.py), so a
    # case per attribute repeated it, at a node run and two validations each
    Case(
        "anonymiser dropped every patient and study Type 2 attribute",
        drop(*TYPE2, "PatientName", "PatientID"),
        context={kw: "" for kw in (*TYPE2, "PatientName", "PatientID")},
    ),
    Case("empty PatientName", lambda ds: setattr(ds, "PatientName", ""), context={"PatientName": ""}),
    Case(
        "invalid sex code, dates, time and age",
        odd_values,
        context={"PatientSex": "", "StudyDate": "", "PatientBirthDate": "", "StudyTime": "", "PatientAge": ""},
    ),
    Case(
        "ISO_IR 100 Latin-1",
        text("ISO_IR 100", "Müller^Jürgen", "IRM des membres inférieurs", "AX T1 JAMBE ÉTÉ"),
        context={"PatientName": "Müller^Jürgen", "StudyDescription": "IRM des membres inférieurs"},
        charset="ISO_IR 100",
    ),
    Case(
        "ISO_IR 192 UTF-8",
        text("ISO_IR 192", "Παπαδόπουλος^Νίκος", "下肢 MRI", "AX T1 LEG Øre"),
        context={"PatientName": "Παπαδόπουλος^Νίκος", "StudyDescription": "下肢 MRI"},
        charset="ISO_IR 192",
    ),
    Case(
        "ISO 2022 IR 87 Japanese",
        text(["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎=やまだ^たろう", "下肢ＭＲＩ"),
        context={"PatientName": "Yamada^Tarou=山田^太郎=やまだ^たろう", "StudyDescription": "下肢ＭＲＩ"},
        charset=["ISO 2022 IR 6", "ISO 2022 IR 87"],
    ),
    Case(
        "GB18030 Chinese",
        text("GB18030", "Wang^XiaoDong=王^小东", "下肢磁共振", "AX T1 LEG 轴位"),
        context={"PatientName": "Wang^XiaoDong=王^小东", "StudyDescription": "下肢磁共振"},
        charset="GB18030",
    ),
    Case(
        "no Specific Character Set, Latin-1 bytes",
        undeclared(b"M\xfcller^J\xfcrgen", b"IRM membre inf\xe9rieur"),
        context={"PatientName": "Müller^Jürgen", "StudyDescription": "IRM membre inférieur"},
        charset="ISO_IR 100",
    ),
    Case(
        "no Specific Character Set, UTF-8 bytes",
        undeclared("Øster^Åse".encode(), "IRM membre inférieur".encode()),
        context={"PatientName": "Øster^Åse", "StudyDescription": "IRM membre inférieur"},
        charset="ISO_IR 192",
    ),
    Case("long private tag blocks", private_blocks),
    Case("signed pixels with RescaleSlope/Intercept", signed_rescaled),
    Case("MONOCHROME1", monochrome1),
    Case("BitsStored 16", bits_stored_16),
    *[
        Case(
            f"patient position {p}",
            lambda ds, p=p: setattr(ds, "PatientPosition", p),
            geometry=(*iop, 0.0, -1, "as_acquired"),
        )
        for p, iop in POSITIONS.items()
    ],
    Case("oblique axial slices (7° tilt)", geometry=((1, 0, 0), (0, 1, 0), 7.0, -1, "as_acquired")),
    Case("slice order reversed", geometry=((1, 0, 0), (0, 1, 0), 0.0, 1, "reversed")),
    Case("512² matrix", size=512),
    Case("1024² matrix", size=1024),
    Case(
        "no FrameOfReferenceUID",
        drop("FrameOfReferenceUID"),
        expect="skipped",
        reason="cannot place a segmentation without a frame of reference",
    ),
    Case("no PixelSpacing", drop("PixelSpacing"), expect="skipped", reason="missing or malformed PixelSpacing"),
    Case(
        "no ImageOrientationPatient",
        drop("ImageOrientationPatient"),
        expect="skipped",
        reason="missing or malformed ImageOrientationPatient",
    ),
    Case(
        "no ImagePositionPatient",
        drop("ImagePositionPatient"),
        expect="skipped",
        reason="missing or malformed ImagePositionPatient",
    ),
]


def _phantom(case: Case, seed: int) -> tuple[Phantom, str]:
    """The case's phantom (geometry turned and tilted as the case says) and its file order."""
    if case.geometry is None:
        factor = max(1, case.size // 256)  # large matrices: rendered at 256² and each pixel split (fast)
        return _split_pixels(
            small_series(seed=seed, n_slices=N_SLICES, size=case.size // factor), factor
        ), "as_acquired"
    row_dir, col_dir, tilt, step_sign, order = case.geometry
    base = small_series(seed=seed, n_slices=2, size=SIZE)
    g0 = base.geometry
    rd, cd = np.asarray(row_dir, float), np.asarray(col_dir, float)
    if tilt:
        a = np.radians(tilt)
        rot = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
        rd, cd = rot @ rd, rot @ cd
    normal = np.cross(rd, cd)
    ps = g0.pixel_spacing
    centre = (np.asarray(g0.origin) + (SIZE - 1) / 2 * ps[1] * np.asarray(g0.row_dir)
              + (SIZE - 1) / 2 * ps[0] * np.asarray(g0.col_dir))
    origin = centre - (SIZE - 1) / 2 * ps[1] * rd - (SIZE - 1) / 2 * ps[0] * cd
    step = normal * g0.slice_thickness * (step_sign if normal[2] > 0 else -step_sign)  # step_sign -1: feetward
    g = Geometry(SIZE, SIZE, N_SLICES, ps, tuple(origin), tuple(rd), tuple(cd), tuple(step), g0.slice_thickness)
    return render(base.anatomy, g, seed=seed), order


def _split_pixels(ph: Phantom, f: int) -> Phantom:
    """The phantom on an f-times finer in-plane grid covering the same field (each pixel split in f×f)."""
    if f == 1:
        return ph
    g = ph.geometry
    ps = (g.pixel_spacing[0] / f, g.pixel_spacing[1] / f)
    shift = (f - 1) / 2  # the first fine pixel's centre lies (f-1)/2 fine pixels before the coarse centre
    origin = tuple(np.asarray(g.origin) - shift * ps[1] * np.asarray(g.row_dir) - shift * ps[0] * np.asarray(g.col_dir))
    fine = replace(g, rows=g.rows * f, cols=g.cols * f, pixel_spacing=ps, origin=origin)
    up = lambda a: np.repeat(np.repeat(a, f, axis=1), f, axis=2)  # noqa: E731
    return Phantom(ph.anatomy, fine, up(ph.image), up(ph.labels))


def _write(case: Case, folder: Path, seed: int) -> None:
    ph, order = _phantom(case, seed)
    case.paths = write_dicom_series(ph, folder, order=order, seed=seed, patient_id=f"HC{seed:06d}")
    idx = list(range(N_SLICES))[::-1] if order == "reversed" else list(range(N_SLICES))
    case.truth = ph.labels[idx] > 0
    for p in case.paths:
        if case.mutate:
            ds = pydicom.dcmread(p)
            case.mutate(ds)
            ds.save_as(p, enforce_file_format=True)
    case.series_uid = pydicom.dcmread(case.paths[0], stop_before_pixels=True).SeriesInstanceUID


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("corpus")
    pacs = PacsSCP(tmp / "pacs")
    # The corpus is about headers, not the model: a result the quality gate doubts still comes back (flagged
    # in its SEG and SR) instead of waiting for a review no test gives. The whole-body case needs it: its
    # 1000 slices are 200 rendered ones each repeated 5 times, which the gate rightly finds odd.
    # Without the augmented pass: on a CPU without bf16 (fp32, ~6 slices/s on 2 cores) the 1000-slice case
    # alone took 297 s for the network's pass and 292 s for the augmented one, past the wait below; the gate's
    # augmented pass is tested in test_quality_gate.py.
    node = NodeProcess(tmp, pacs, more=RULES + "[quality]\ntta = false\n",
                       dest_extra='quality_policy = "send_flagged"')
    folders = []
    for k, case in enumerate(CASES):
        folders.append(tmp / "in" / f"case{k:02d}")
        _write(case, folders[-1], seed=SEED0 + k)
    t0 = time.monotonic()
    r = storescu(node.port, *folders)  # every case in one association, as a PACS forwarding a worklist
    assert r.returncode == 0, r.stderr
    for case in CASES:
        node.wait_job(case.series_uid, timeout=300)
    print(f"\nheader corpus: {len(CASES)} series segmented or skipped {time.monotonic() - t0:.1f} s after sending")
    yield node, pacs
    node.stop()
    pacs.stop()  # every SEG and SR received is checked with dciodvfy here


def _results(pacs: PacsSCP, series_uid: str) -> dict[str, pydicom.Dataset]:
    """The SEG (pixels read) and SR (headers only) the PACS holds for ``series_uid``."""
    out = {}
    headers = [(p, pydicom.dcmread(p, stop_before_pixels=True)) for p in pacs.files()]
    for p, ds in headers:
        if ds.Modality == "SEG" and ds.ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid:
            out["SEG"] = pydicom.dcmread(p)
    seg = out.get("SEG")
    for _, ds in headers:
        if seg is not None and ds.Modality == "SR" and any(
                i.ReferencedSOPInstanceUID == seg.SOPInstanceUID for s in ds.CurrentRequestedProcedureEvidenceSequence
                for se in s.ReferencedSeriesSequence for i in se.ReferencedSOPSequence):
            out["SR"] = ds
    return out


def _bone_dice(seg: pydicom.Dataset, case: Case) -> float:
    import highdicom as hd

    uids = [pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in case.paths]
    pred = hd.seg.Segmentation.from_dataset(seg).get_pixels_by_source_instance(
        uids, combine_segments=True, skip_overlap_checks=True) > 0
    return float(2 * (pred & case.truth).sum() / (pred.sum() + case.truth.sum()))


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_header_case(corpus, case):
    node, pacs = corpus
    job = next(j for j in node.jobs() if j["series_uid"] == case.series_uid)
    assert job["state"] == case.expect, f"{case.name}: {job['state']}: {job['reason']}"
    if case.expect == "skipped":
        assert case.reason in job["reason"], job["reason"]
        assert not _results(pacs, case.series_uid)
        return
    res = wait_for(lambda: (lambda r: r if len(r) == 2 else None)(_results(pacs, case.series_uid)), 30, 0.5,
                   f"SEG and SR of {case.name} at the PACS")
    source = pydicom.dcmread(case.paths[0], stop_before_pixels=True)
    for kind, ds in res.items():
        assert ds.StudyInstanceUID == source.StudyInstanceUID
        for kw in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "ReferringPhysicianName", "StudyID",
                   "AccessionNumber", "StudyDate", "StudyTime"):
            assert kw in ds, f"{kind} lacks Type 2 {kw}"  # present, empty where the source had nothing
        for kw, value in case.context.items():
            assert str(ds.get(kw) or "") == value, f"{kind} {kw}: {ds.get(kw)!r}, expected {value!r}"
        if case.charset is not None:
            got = ds.SpecificCharacterSet
            assert (list(got) if isinstance(got, pydicom.multival.MultiValue) else got) == case.charset
    # the model saw the image the radiologist sees: bone where the phantom has bone, in every geometry
    dice = _bone_dice(res["SEG"], case)
    print(f"{case.name}: bone Dice {dice:.3f}")
    assert dice > 0.9, f"{case.name}: bone Dice {dice:.3f} against the phantom"  # measured 0.958–0.995


def test_no_job_reason_is_python_exception_text(corpus):
    node, _ = corpus
    jobs = node.jobs()
    assert len(jobs) >= len(CASES)
    texts = [j["reason"] for j in jobs] + [d["error"] for j in jobs for d in j["deliveries"]]
    bad = [t for t in texts if re.search(EXCEPTION_NAME, t or "")]
    assert not bad, bad
    # and no patient data in the node's log
    log = node.log.read_text(encoding="utf-8", errors="replace")
    for name in ("Müller", "Jürgen", "Yamada", "山田", "Παπαδόπουλος", "王", "Øster", "1970-07-31"):
        assert name not in log
