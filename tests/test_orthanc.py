"""Round trip through a real PACS: a study stored into Orthanc is auto-routed to the node (the shipped Lua
script), and the node's SEG and SR come back into the same study, by C-STORE and by DICOMweb STOW-RS."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pydicom
import pytest
from conftest import NodeProcess, check_results_valid, free_port, wait_for, write_series

ROOT = Path(__file__).resolve().parents[1]
ORTHANC = "/usr/sbin/Orthanc"


def api(port: int, path: str, data: bytes | None = None):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method="POST" if data else "GET")
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read() or b"null")


@pytest.fixture(scope="module")
def orthanc_and_node(tmp_path_factory):
    if not Path(ORTHANC).exists():
        pytest.fail("Orthanc missing: install Debian's orthanc and orthanc-dicomweb (the README's test command does)")
    tmp = tmp_path_factory.mktemp("orthanc")
    dicom_port, http_port, node_port = free_port(), free_port(), free_port()
    # the shipped deployment files, with ports and folders of this test
    cfg = json.loads("\n".join(ln for ln in (ROOT / "deploy/orthanc/orthanc.json").read_text().splitlines()
                               if not ln.strip().startswith("//")))
    lua = tmp / "autoroute.lua"
    shutil.copy(ROOT / "deploy/orthanc/autoroute.lua", lua)
    cfg.update({"DicomPort": dicom_port, "HttpPort": http_port, "StorageDirectory": str(tmp / "db"),
                "IndexDirectory": str(tmp / "db"), "StableAge": 2, "LuaScripts": [str(lua)],
                "DicomModalities": {"segnode": ["SEGNODE", "127.0.0.1", node_port]},
                "RemoteAccessAllowed": False, "AuthenticationEnabled": False})
    (tmp / "orthanc.json").write_text(json.dumps(cfg))
    with open(tmp / "orthanc.log", "w") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen([ORTHANC, str(tmp / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
    wait_for(lambda: _up(http_port), 60, 0.3, "Orthanc to start")
    pacs = SimpleNamespace(aet="ORTHANC", port=dicom_port)
    stow = (f'[[destinations]]\nname = "orthanc-stow"\nprotocol = "stow"\n'
            f'url = "http://127.0.0.1:{http_port}/dicom-web"\nsend_sr = true\n')
    # C-STORE sends the SEG only; STOW-RS sends SEG and SR, so the SR in Orthanc proves the STOW-RS path
    node = NodeProcess(tmp, pacs, port=node_port, dest_extra="send_sr = false", more=stow)
    yield SimpleNamespace(node=node, http=http_port, dicom=dicom_port, tmp=tmp, proc=proc)
    node.stop()
    proc.terminate()
    proc.wait(20)


def _up(port: int) -> bool:
    try:
        api(port, "/system")
        return True
    except Exception:
        return False


def test_study_routed_by_orthanc_comes_back_into_the_same_study(orthanc_and_node):
    o = orthanc_and_node
    _, paths = write_series(o.tmp / "study", seed=51)
    ds = pydicom.dcmread(paths[0], stop_before_pixels=True)
    r = subprocess.run(["/usr/bin/storescu", "-aec", "ORTHANC", "+sd", "127.0.0.1", str(o.dicom), str(o.tmp / "study")],
                       capture_output=True, text=True, timeout=120, env={"TCP_NODELAY": "1"})
    assert r.returncode == 0, r.stderr
    (study_id,) = [x["ID"] for x in api(o.http, "/tools/lookup", ds.StudyInstanceUID.encode()) if x["Type"] == "Study"]

    def results_in_study():
        series = api(o.http, f"/studies/{study_id}/series")
        m = sorted(s["MainDicomTags"].get("Modality", "") for s in series)
        return m if {"SEG", "SR"} <= set(m) else None

    got = wait_for(results_in_study, 180, 1.0, "SEG and SR in the Orthanc study")
    assert got.count("MR") == 1
    job = o.node.wait_job(ds.SeriesInstanceUID)
    assert job["state"] == "done"
    assert {d["destination"] for d in job["deliveries"] if d["ok"]} == {"pacs", "orthanc-stow"}
    # Orthanc really routed it: the node saw the series from Orthanc's AE title
    from sqlalchemy import select

    from storage.models import Instance

    db = o.node.db()
    with db.session() as s:
        callers = set(s.scalars(select(Instance.calling_aet)))
    db.dispose()
    assert callers == {"ORTHANC"}
    # and the SEG in Orthanc references the MR series, in the same study
    seg_series = next(
        s for s in api(o.http, f"/studies/{study_id}/series") if s["MainDicomTags"].get("Modality") == "SEG"
    )
    inst = api(o.http, f"/series/{seg_series['ID']}/instances")[0]
    tags = api(o.http, f"/instances/{inst['ID']}/simplified-tags")
    assert tags["StudyInstanceUID"] == ds.StudyInstanceUID
    assert tags["ReferencedSeriesSequence"][0]["SeriesInstanceUID"] == ds.SeriesInstanceUID
    # what Orthanc stored (via C-STORE and STOW-RS) passes dciodvfy
    files = []
    for se in api(o.http, f"/studies/{study_id}/series"):
        if se["MainDicomTags"].get("Modality") in ("SEG", "SR"):
            for inst in api(o.http, f"/series/{se['ID']}/instances"):
                with urllib.request.urlopen(f"http://127.0.0.1:{o.http}/instances/{inst['ID']}/file", timeout=30) as r:
                    path = o.tmp / f"{inst['ID']}.dcm"
                    path.write_bytes(r.read())
                    files.append(path)
    assert check_results_valid(files) >= 2


def test_corrected_seg_stored_in_orthanc_is_routed_to_the_node_as_a_correction(orthanc_and_node):
    """A viewer's save (OHIF: STOW-RS into the archive; here Orthanc's REST store) is routed to the node by the
    shipped Lua script like any series: recorded as a correction from Orthanc's AE title, scored against what
    the node sent; the node's own SEG, routed back the same way, is ignored."""
    from correction_writers import ohif_seg, phantom_classes, read_sources
    from sqlalchemy import select

    from storage.corrections import list_corrections
    from storage.models import Correction, Job

    o = orthanc_and_node
    ph, paths = write_series(o.tmp / "corrected", seed=53)
    ds = pydicom.dcmread(paths[0], stop_before_pixels=True)
    r = subprocess.run(["/usr/bin/storescu", "-aec", "ORTHANC", "+sd", "127.0.0.1", str(o.dicom),
                        str(o.tmp / "corrected")], capture_output=True, text=True, timeout=120,
                       env={"TCP_NODELAY": "1"})
    assert r.returncode == 0, r.stderr
    assert o.node.wait_job(ds.SeriesInstanceUID)["state"] == "done"
    sources = read_sources(paths)
    seg = ohif_seg(sources, phantom_classes(ph, sources), o.tmp / "correction.dcm")
    api(o.http, "/instances", seg.read_bytes())
    sop = pydicom.dcmread(seg, stop_before_pixels=True).SOPInstanceUID

    def recorded():
        db = o.node.db()
        try:
            with db.session() as s:
                cid = s.scalar(select(Correction.id).where(Correction.sop_uid == sop))
                own = s.scalars(select(Job.seg_sop_uid).where(Job.seg_sop_uid != "")).all()
                echoed = s.scalars(select(Correction.id).where(Correction.sop_uid.in_(own))).all()
                ignored = s.scalar(select(Job.id).where(Job.reason.contains("own result")))
            if cid and ignored:
                return next(c for c in list_corrections(db) if c["id"] == cid), echoed
            return None
        finally:
            db.dispose()

    c, echoed = wait_for(recorded, 90, 0.5, "the routed correction, and the node's own SEG routed back")
    assert c["state"] == "corrected" and c["calling_ae"] == "ORTHANC", c
    assert c["series_uid"] == ds.SeriesInstanceUID and 0 < c["mean_dice"] < 1
    assert not echoed  # the node's own SEG came back through Orthanc too: no correction row for it
