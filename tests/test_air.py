"""IHE AI Results (AIR) items in the node's SEG and SR, and the SR's image regions that OHIF needs.

Fast (no node process): the writers run on a phantom's true labels. The validators' verdicts on these
files come from check_results_valid (dciodvfy + Pixelmed), as for every result of the suite.
"""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from conftest import check_results_valid, write_series

AIR_PURPOSE = ("1630", "99IHE", "Processing Algorithm")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from dicom_node.encode.seg_writer import build_seg
    from dicom_node.encode.sr_writer import build_sr
    from dicom_node.infer.segments import split_sides
    from inference.model_card import ModelCard

    tmp = tmp_path_factory.mktemp("air")
    ph, paths = write_series(tmp / "src", seed=91, n_slices=24, size=96)
    src = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    origins = np.array([[float(v) for v in d.ImagePositionPatient] for d in src])
    labels = ph.labels[[int(round((ph.geometry.origin[2] - o[2]) / ph.geometry.slice_thickness)) for o in origins]]
    card = ModelCard(version="9.9", checkpoint_sha256="ab" * 32)
    seg_labels, segments = split_sides(labels, card.labels, origins, (1, 0, 0), (0, 1, 0), ph.geometry.pixel_spacing)
    seg = build_seg(
        src, seg_labels, segments, card, series_description="t", series_number=1, manufacturer="Hospital AI"
    )
    seg.save_as(tmp / "seg.dcm", enforce_file_format=True)
    vols = {sg.name: float((seg_labels == sg.number).sum()) / 1000 for sg in segments}
    sr = build_sr(seg, src, segments, vols, card, labels=seg_labels, series_number=2, manufacturer="Hospital AI")
    sr.save_as(tmp / "sr.dcm", enforce_file_format=True)
    return tmp, card, src, seg_labels, segments


def _algorithm_items(ds) -> list:
    return [
        e
        for e in ds.ContributingEquipmentSequence
        if tuple(
            getattr(e.PurposeOfReferenceCodeSequence[0], k)
            for k in ("CodeValue", "CodingSchemeDesignator", "CodeMeaning")
        )
        == AIR_PURPOSE
    ]


def test_seg_and_sr_name_the_algorithm_and_pass_dciodvfy_and_pixelmed(results):
    tmp, card, *_ = results
    for name in ("seg.dcm", "sr.dcm"):
        ds = pydicom.dcmread(tmp / name, stop_before_pixels=True)
        (item,) = _algorithm_items(ds)
        assert item.Manufacturer == "Hospital AI"
        assert item.ManufacturerModelName == f"{card.name} 9.9"
        assert "9.9" in list(item.SoftwareVersions)
        assert item.DeviceUID == card.device_uid
    seg = pydicom.dcmread(tmp / "seg.dcm", stop_before_pixels=True)
    for segment in seg.SegmentSequence:
        assert segment.SegmentAlgorithmType == "AUTOMATIC"
        assert segment.SegmentationAlgorithmIdentificationSequence[0].AlgorithmName == card.name
    assert seg.SharedFunctionalGroupsSequence[0].FrameAnatomySequence[0].FrameLaterality == "B"
    sr = pydicom.dcmread(tmp / "sr.dcm")
    assert sr.VerificationFlag == "UNVERIFIED"
    root = {i.ConceptNameCodeSequence[0].CodeMeaning: i for i in sr.ContentSequence}
    assert root["Procedure reported"].ConceptCodeSequence[0].CodeValue == "25056-3"  # MR, from CID 100
    assert card.device_uid == root["Device Observer UID"].UID
    assert check_results_valid([tmp / "seg.dcm", tmp / "sr.dcm"]) == 2


def test_device_uid_follows_the_checkpoint():
    from inference.model_card import ModelCard

    a, b = ModelCard(checkpoint_sha256="a" * 64), ModelCard(checkpoint_sha256="b" * 64)
    assert a.device_uid == ModelCard(checkpoint_sha256="a" * 64).device_uid != b.device_uid
    assert a.device_uid.startswith("2.25.") and len(a.device_uid) <= 64
    assert "checkpoint_sha256" not in a.to_json()  # never stored in a card: it describes the file


def test_every_segment_has_an_outline_on_its_centre_slice_in_the_sr(results):
    """What OHIF needs: a SCOORD in every measurement (merged by tracking UID), on an image that shows the
    structure, inside it; the volume group still references the SEG segment."""
    tmp, _, src, seg_labels, segments = results
    sr = pydicom.dcmread(tmp / "sr.dcm")
    measurements = next(
        i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeMeaning == "Imaging Measurements"
    )
    by_uid: dict[str, list] = {}
    for group in measurements.ContentSequence:
        uid = next(i.UID for i in group.ContentSequence if i.ValueType == "UIDREF"
                   and i.ConceptNameCodeSequence[0].CodeMeaning == "Tracking Unique Identifier")
        by_uid.setdefault(uid, []).append(group)
    assert len(by_uid) == len(segments)
    index = {d.SOPInstanceUID: k for k, d in enumerate(src)}
    for groups in by_uid.values():
        items = [i for g in groups for i in g.ContentSequence]
        (segment_ref,) = [i for i in items if i.ValueType == "IMAGE"]
        number = segment_ref.ReferencedSOPSequence[0].ReferencedSegmentNumber
        (region,) = [i for i in items if i.ValueType == "SCOORD"]
        assert region.GraphicType == "POLYLINE"
        points = np.array(region.GraphicData, float).reshape(-1, 2)
        assert (points[0] == points[-1]).all(), "closed outline"
        k = index[region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID]
        mask = seg_labels[k] == number
        assert mask.any(), "the outline's image shows the structure"
        rows, cols = np.nonzero(mask)
        # the outline encloses the pixels of the structure's largest piece: its box lies within the mask's box
        assert points[:, 0].min() >= cols.min() and points[:, 0].max() <= cols.max() + 1
        assert points[:, 1].min() >= rows.min() and points[:, 1].max() <= rows.max() + 1
