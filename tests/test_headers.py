"""The C-STORE header reader: the fast walk over explicit VR little endian agrees with pydicom's reader on
everything the node records, and both refuse incomplete data."""

from __future__ import annotations

import subprocess

import pydicom
import pytest
from conftest import write_series
from pydicom.uid import ImplicitVRLittleEndian

from dicom_node.receive.headers import (
    UnreadableData,
    _scan_explicit_le,
    parse_received,
    read_received,
    to_meta,
)


def body_of(path) -> tuple[bytes, str]:
    """The data set bytes after the file meta, as they would arrive over DIMSE, and their transfer syntax."""
    raw = path.read_bytes()
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    meta_end = 132 + 12 + int.from_bytes(raw[140:144], "little")
    return raw[meta_end:], str(ds.file_meta.TransferSyntaxUID)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("headers")
    _, paths = write_series(tmp / "plain", seed=81, n_slices=4, size=64)
    out = list(paths)
    counted = pydicom.dcmread(paths[3])
    counted.ImagesInAcquisition = 4  # the scanner's own count: read by both paths (decide/completion.py)
    counted.save_as(tmp / "counted.dcm")
    out.append(tmp / "counted.dcm")
    ds = pydicom.dcmread(paths[0])
    ds.SeriesDescription = "Kniegelenk rechts ÄÖÜ"  # a Latin-1 description
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.save_as(tmp / "latin1.dcm")
    out.append(tmp / "latin1.dcm")
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.StudyDescription = "膝 MRI"
    ds.save_as(tmp / "utf8.dcm")
    out.append(tmp / "utf8.dcm")
    seq = pydicom.dcmread(paths[1])
    item = pydicom.Dataset()
    item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = seq.SOPClassUID, seq.SOPInstanceUID
    seq.ReferencedImageSequence = [item]
    seq.save_as(tmp / "sequence.dcm")  # pydicom writes undefined-length sequences: the fallback path
    out.append(tmp / "sequence.dcm")
    subprocess.run(["dcmcjpls", str(paths[2]), str(tmp / "jpegls.dcm")], check=True)  # encapsulated pixels
    out.append(tmp / "jpegls.dcm")
    return out


def test_fast_reader_matches_pydicom(files):
    walked = 0
    for p in files:
        body, ts = body_of(p)
        walked += _scan_explicit_le(body) is not None
        assert read_received(body, ts) == to_meta(parse_received(body, ts)), p.name
    assert walked >= len(files) - 1  # all but the undefined-length sequence took the fast walk


def test_images_in_acquisition_is_read(files):
    body, ts = body_of(next(p for p in files if p.name == "counted.dcm"))
    meta = read_received(body, ts)
    assert (meta.images_in_acquisition, meta.acquisition_number) == (4, 1)
    assert to_meta(parse_received(body, ts)).images_in_acquisition == 4


def test_other_syntaxes_go_through_pydicom(files):
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    ds = pydicom.dcmread(files[0])
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, True
    write_dataset(buf, ds)  # implicit VR little endian, as the transfer syntax says
    meta = read_received(buf.getvalue(), ImplicitVRLittleEndian)
    assert meta.sop_uid == ds.SOPInstanceUID and meta.rows == ds.Rows


@pytest.mark.parametrize("cut", [100, 2000, -10])
def test_truncated_data_is_refused_by_both_paths(files, cut):
    body, ts = body_of(files[0])
    short = body[:cut]
    with pytest.raises(UnreadableData):
        read_received(short, ts)
    with pytest.raises(UnreadableData):
        parse_received(short, ts)


def test_uid_longer_than_64_characters_is_refused(files, tmp_path):
    ds = pydicom.dcmread(files[0])
    with pytest.warns(UserWarning, match="exceeds the maximum length"):
        ds.SOPInstanceUID = "1.2." + "3" * 70  # invalid (PS3.5 9.1), and too long for its database column
    ds.save_as(tmp_path / "long.dcm")
    body, ts = body_of(tmp_path / "long.dcm")
    with pytest.raises(UnreadableData, match="SOPInstanceUID longer than 64"):
        read_received(body, ts)
