"""Reading the header of a received instance without decoding its pixels, and refusing broken data.

pydicom parses a truncated stream without complaint (it returns whatever it could read), so completeness
is checked here: the last element must hold as many bytes as it declares, native pixel data must be as
long as rows × columns × frames says, and encapsulated pixel data must end with its delimiter. Anything
that fails is answered with 0xC000 (cannot understand) and never reported as stored.
"""

from __future__ import annotations

import io

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from storage.queue import InstanceMeta

REQUIRED = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")


class UnreadableData(ValueError):
    """The bytes are not a complete, understandable DICOM dataset."""


def _multi(ds: Dataset, kw: str) -> str:
    v = ds.get(kw)
    if v is None:
        return ""
    if isinstance(v, (list, tuple, pydicom.multival.MultiValue)):
        return "\\".join(str(x) for x in v)
    return str(v)


def parse(data: bytes) -> Dataset:
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=False)
    except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, OverflowError) as exc:
        raise UnreadableData(f"not a readable DICOM dataset: {type(exc).__name__}: {str(exc)[:200]}") from None
    except Exception as exc:  # pydicom raises a variety of errors on garbage; none may reach the handler
        raise UnreadableData(f"not a readable DICOM dataset: {type(exc).__name__}: {str(exc)[:200]}") from None
    _check_complete(ds)
    return ds


def _check_complete(ds: Dataset) -> None:
    tags = list(ds._dict.keys())  # raw elements, not yet converted: cheap
    if not tags:
        raise UnreadableData("empty dataset")
    last = ds._dict[tags[-1]]
    declared = getattr(last, "length", None)
    value = getattr(last, "value", None)
    if declared not in (None, 0xFFFFFFFF) and isinstance(value, (bytes, bytearray)) and len(value) < declared:
        raise UnreadableData(f"truncated: element {tags[-1]} declares {declared} bytes, {len(value)} received")
    for kw in REQUIRED:
        try:
            if not ds.get(kw):
                raise UnreadableData(f"missing {kw}")
        except UnreadableData:
            raise
        except Exception as exc:
            raise UnreadableData(f"unreadable {kw}: {exc}") from None
    if "PixelData" in ds:
        _check_pixels(ds)
    elif "Rows" in ds and "Columns" in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise UnreadableData("image without pixel data (truncated?)")


def _check_pixels(ds: Dataset) -> None:
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    pix = ds["PixelData"]
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        spp = int(ds.get("SamplesPerPixel", 1))
        bits = int(ds.BitsAllocated)
    except Exception as exc:
        raise UnreadableData(f"image pixel description unreadable: {exc}") from None
    if ts is not None and ts.is_compressed:
        raw = pix.value
        if not isinstance(raw, (bytes, bytearray)) or len(raw) < 8:
            raise UnreadableData("encapsulated pixel data missing")
        return
    expected = (rows * cols * frames * spp * bits + 7) // 8
    if len(pix.value or b"") < expected:
        raise UnreadableData(f"pixel data holds {len(pix.value or b'')} bytes, {expected} expected (truncated)")


def to_meta(ds: Dataset) -> InstanceMeta:
    ts = ds.file_meta.get("TransferSyntaxUID", "") if hasattr(ds, "file_meta") else ""

    def s(kw: str) -> str:
        v = ds.get(kw, "")
        return "" if v is None else str(v)

    def i(kw: str) -> int | None:
        v = ds.get(kw)
        try:
            return int(v) if v not in (None, "") else None
        except (TypeError, ValueError):
            return None

    return InstanceMeta(
        sop_uid=s("SOPInstanceUID"), sop_class_uid=s("SOPClassUID"), study_uid=s("StudyInstanceUID"),
        series_uid=s("SeriesInstanceUID"), transfer_syntax=str(ts), modality=s("Modality"),
        body_part=s("BodyPartExamined"), series_description=s("SeriesDescription"),
        study_description=s("StudyDescription"), series_number=i("SeriesNumber"),
        accession_number=s("AccessionNumber"), study_date=s("StudyDate"), instance_number=i("InstanceNumber"),
        rows=i("Rows"), columns=i("Columns"), frames=i("NumberOfFrames") or 1,
        position=_multi(ds, "ImagePositionPatient"), orientation=_multi(ds, "ImageOrientationPatient"),
        pixel_spacing=_multi(ds, "PixelSpacing"), frame_of_reference_uid=s("FrameOfReferenceUID"),
        image_type=_multi(ds, "ImageType"),
    )
