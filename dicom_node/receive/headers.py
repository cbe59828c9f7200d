"""Reading the header of a received instance without decoding its pixels, and refusing broken data.

pydicom parses a truncated stream without complaint (it returns whatever it could read), so completeness
is checked here: the last element must hold as many bytes as it declares, native pixel data must be as
long as rows × columns × frames says, and encapsulated pixel data must end with its delimiter. Anything
that fails is answered with 0xC000 (cannot understand) and never reported as stored.
"""

from __future__ import annotations

import functools
import io
import struct
import zlib

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from storage.instances import InstanceMeta

REQUIRED = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")


class UnreadableData(ValueError):
    """The bytes are not a complete, understandable DICOM dataset."""


#: Tags read straight from the raw bytes: text VRs (UI, CS, DA, DS, IS) that are ASCII by definition.
_TEXT_TAGS: dict[str, BaseTag] = {kw: BaseTag(tag) for kw, tag in {
    "SOPClassUID": 0x00080016, "SOPInstanceUID": 0x00080018, "StudyInstanceUID": 0x0020000D,
    "SeriesInstanceUID": 0x0020000E, "Modality": 0x00080060, "BodyPartExamined": 0x00180015,
    "AccessionNumber": 0x00080050, "StudyDate": 0x00080020, "SeriesNumber": 0x00200011,
    "InstanceNumber": 0x00200013, "NumberOfFrames": 0x00280008, "ImagePositionPatient": 0x00200032,
    "ImageOrientationPatient": 0x00200037, "PixelSpacing": 0x00280030, "FrameOfReferenceUID": 0x00200052,
    "ImageType": 0x00080008, "ImagesInAcquisition": 0x00201002, "AcquisitionNumber": 0x00200012,
}.items()}
#: Unsigned shorts (US) read from the raw bytes in the data set's byte order.
_US_TAGS: dict[str, BaseTag] = {kw: BaseTag(tag) for kw, tag in {
    "Rows": 0x00280010, "Columns": 0x00280011, "BitsAllocated": 0x00280100, "SamplesPerPixel": 0x00280002}.items()}
_PIXEL_DATA = BaseTag(0x7FE00010)


def _multi(ds: Dataset, kw: str) -> str:
    v = ds.get(kw)
    if v is None:
        return ""
    if isinstance(v, (list, tuple, pydicom.multival.MultiValue)):
        return "\\".join(str(x) for x in v)
    return str(v)


def text(ds: Dataset, kw: str) -> str:
    """A text attribute as one string (values joined by backslash), "" when absent.

    Elements read by :func:`parse_received` are still raw bytes: decoding these few ASCII VRs directly costs
    a fraction of pydicom's value conversion, which is kept for everything else (and for datasets pydicom
    has already converted, as in the tests).
    """
    tag = _TEXT_TAGS.get(kw)
    elem = ds._dict.get(tag) if tag is not None else None
    if isinstance(elem, RawDataElement):
        return "" if elem.value is None else elem.value.decode("latin-1").strip(" \x00")
    return _multi(ds, kw)


def ushort(ds: Dataset, kw: str) -> int | None:
    elem = ds._dict.get(_US_TAGS[kw])
    if isinstance(elem, RawDataElement):
        v = elem.value
        if not v or len(v) < 2:
            return None
        return int.from_bytes(v[:2], "little" if elem.is_little_endian else "big")
    v = ds.get(kw)
    return int(v) if v not in (None, "") else None


def parse_received(data: bytes, transfer_syntax: str, limit: int | None = None) -> Dataset:
    """A data set as received over DIMSE (no file meta), in the presentation context's transfer syntax.

    Elements stay raw (pydicom converts on access); no pixel decoding. ``limit``: bytes a deflated data set
    may inflate to and its pixels may decode to (a few kilobytes of deflate can announce gigabytes).
    """
    ts = UID(transfer_syntax)
    body = _inflated(data, limit) if ts == DeflatedExplicitVRLittleEndian else data
    try:
        ds = read_dataset(io.BytesIO(body), ts.is_implicit_VR, ts.is_little_endian)
    except Exception as exc:  # pydicom raises a variety of errors on garbage; none may reach the handler
        raise UnreadableData(f"not a readable DICOM dataset: {type(exc).__name__}: {str(exc)[:200]}") from None
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ts
    _check_complete(ds, limit)
    return ds


def _inflated(data: bytes, limit: int | None) -> bytes:
    """A deflated data set inflated, never past ``limit`` bytes."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        body = inflater.decompress(data, limit + 1 if limit else 0)
    except zlib.error as exc:
        raise UnreadableData(f"not a readable DICOM dataset: deflate: {exc}") from None
    if limit and len(body) > limit:
        raise UnreadableData(f"deflated data set inflates to more than scp.max_instance_mb ({_mb(limit)})")
    return body


def _mb(n: int) -> str:
    return f"{n / (1 << 20):g} MB"


def _pixels_fit(rows: int, cols: int, frames: int, spp: int, bits: int, limit: int | None) -> None:
    """Refuse compressed pixel data that would decode to more than ``limit`` bytes (inference decodes it all)."""
    decoded = (rows * cols * frames * spp * bits + 7) // 8
    if limit and decoded > limit:
        raise UnreadableData(f"pixel data would decode to {_mb(decoded)} ({rows} x {cols} x {frames} frames), more "
                             f"than scp.max_instance_mb ({_mb(limit)})")


def _check_complete(ds: Dataset, limit: int | None = None) -> None:
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
            if not text(ds, kw):
                raise UnreadableData(f"missing {kw}")
        except UnreadableData:
            raise
        except Exception as exc:
            raise UnreadableData(f"unreadable {kw}: {exc}") from None
    if 0x7FE00010 in ds._dict:
        _check_pixels(ds, limit)
    elif 0x00280010 in ds._dict and 0x00280011 in ds._dict and "FloatPixelData" not in ds \
            and "DoubleFloatPixelData" not in ds:
        raise UnreadableData("image without pixel data (truncated?)")


def _check_pixels(ds: Dataset, limit: int | None = None) -> None:
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    try:
        rows, cols = ushort(ds, "Rows"), ushort(ds, "Columns")
        frames = int(text(ds, "NumberOfFrames") or 1)
        spp = ushort(ds, "SamplesPerPixel") or 1
        bits = ushort(ds, "BitsAllocated")
        if rows is None or cols is None or bits is None:
            raise ValueError("Rows, Columns or BitsAllocated missing")
    except Exception as exc:
        raise UnreadableData(f"image pixel description unreadable: {exc}") from None
    raw = ds._dict[_PIXEL_DATA].value
    if ts is not None and ts.is_compressed:
        if not isinstance(raw, (bytes, bytearray)) or len(raw) < 8:
            raise UnreadableData("encapsulated pixel data missing")
        _pixels_fit(rows, cols, frames, spp, bits, limit)
        return
    expected = (rows * cols * frames * spp * bits + 7) // 8
    if len(raw or b"") < expected:
        raise UnreadableData(f"pixel data holds {len(raw or b'')} bytes, {expected} expected (truncated)")


def undeclared_text(b: bytes) -> str:
    """Text without a Specific Character Set: UTF-8 when the bytes are valid UTF-8 (what most current software
    writes, and how the results read it: encode/context.py), else Latin-1."""
    try:
        return b.decode("utf-8").rstrip(" \x00")
    except UnicodeDecodeError:
        return b.decode("latin-1").rstrip(" \x00")


def to_meta(ds: Dataset) -> InstanceMeta:
    ts = ds.file_meta.get("TransferSyntaxUID", "") if hasattr(ds, "file_meta") else ""
    undeclared = not ds.get("SpecificCharacterSet")

    def s(kw: str) -> str:
        tag = _DESCRIPTIONS.get(kw)
        elem = ds._dict.get(tag) if tag is not None else None
        if undeclared and isinstance(elem, RawDataElement) and elem.value:
            return undeclared_text(bytes(elem.value))
        v = ds.get(kw, "")
        return "" if v is None else str(v)

    def i(kw: str) -> int | None:
        try:
            v = text(ds, kw)
            return int(float(v)) if v else None
        except (TypeError, ValueError):
            return None

    return InstanceMeta(
        sop_uid=text(ds, "SOPInstanceUID"), sop_class_uid=text(ds, "SOPClassUID"),
        study_uid=text(ds, "StudyInstanceUID"), series_uid=text(ds, "SeriesInstanceUID"),
        transfer_syntax=str(ts), modality=text(ds, "Modality"), body_part=text(ds, "BodyPartExamined"),
        # descriptions may be in any Specific Character Set: pydicom decodes those
        series_description=s("SeriesDescription"), study_description=s("StudyDescription"),
        series_number=i("SeriesNumber"), accession_number=text(ds, "AccessionNumber"),
        study_date=text(ds, "StudyDate"), instance_number=i("InstanceNumber"),
        rows=ushort(ds, "Rows"), columns=ushort(ds, "Columns"), frames=i("NumberOfFrames") or 1,
        position=text(ds, "ImagePositionPatient"), orientation=text(ds, "ImageOrientationPatient"),
        pixel_spacing=text(ds, "PixelSpacing"), frame_of_reference_uid=text(ds, "FrameOfReferenceUID"),
        image_type=text(ds, "ImageType"), images_in_acquisition=i("ImagesInAcquisition"),
        acquisition_number=i("AcquisitionNumber"),
    )


# --------------------------------------------------------------------------------------------- fast path
#: Explicit-VR value representations with a 4-byte length (PS3.5 7.1.2); the others have 2 bytes.
_LONG_VRS = frozenset((b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"))
#: Character sets whose text decodes without pydicom's escape-sequence machinery.
_SIMPLE_CHARSETS = {"": "latin-1", "ISO_IR 6": "latin-1", "ISO_IR 100": "latin-1", "ISO_IR 192": "utf-8"}
_DESCRIPTIONS = {"SeriesDescription": BaseTag(0x0008103E), "StudyDescription": BaseTag(0x00081030)}


@functools.lru_cache(maxsize=64)
def _walkable(transfer_syntax: str) -> bool:
    """Explicit VR little endian, plain or with encapsulated (compressed) pixel data, not deflated."""
    ts = UID(transfer_syntax)
    try:
        return not ts.is_implicit_VR and ts.is_little_endian and not ts.is_deflated
    except ValueError:  # a private or unknown syntax
        return False


def _scan_explicit_le(data: bytes) -> dict[int, tuple[int, int]] | None:
    """Top-level elements of an explicit VR little endian data set: tag -> (value offset, length).

    Only the top level is walked, and only while every length is defined; anything else (an undefined-
    length sequence, a truncated element) returns None and the caller lets pydicom read the data set, which
    also gives the established error messages. Encapsulated pixel data (undefined length) ends the walk.
    """
    out: dict[int, tuple[int, int]] = {}
    unpack = struct.unpack_from
    i, n = 0, len(data)
    while i < n:
        if i + 8 > n:
            return None
        group, elem = unpack("<HH", data, i)
        tag = (group << 16) | elem
        if data[i + 4:i + 6] in _LONG_VRS:
            if i + 12 > n:
                return None
            length = unpack("<I", data, i + 8)[0]
            start = i + 12
        else:
            length = unpack("<H", data, i + 6)[0]
            start = i + 8
        if length == 0xFFFFFFFF:
            if tag == 0x7FE00010:
                out[tag] = (start, -1)
                return out
            return None
        if start + length > n:
            return None
        out[tag] = (start, length)
        i = start + length
    return out


def read_received(data: bytes, transfer_syntax: str, limit: int | None = None) -> InstanceMeta:
    """The header fields of a received data set, refusing incomplete data (UnreadableData).

    The C-STORE hot path: explicit VR little endian (what nearly every sender uses, also under the
    compressed syntaxes) is read by a walk over
    the top-level element headers, about five times cheaper than pydicom's reader; every other syntax, and
    any data set the walk does not handle, goes through pydicom (:func:`parse_received`). Both give the
    same result (tests/test_headers.py).
    """
    meta = None
    if _walkable(transfer_syntax):
        elements = _scan_explicit_le(data)
        if elements is not None:
            meta = _meta_from_scan(data, elements, transfer_syntax, limit)
    if meta is None:
        meta = to_meta(parse_received(data, transfer_syntax, limit))
    for kw, uid in (("SOPInstanceUID", meta.sop_uid), ("SeriesInstanceUID", meta.series_uid),
                    ("StudyInstanceUID", meta.study_uid)):
        if len(uid) > 64:  # PS3.5 9.1: a longer UID is invalid, and would not fit its database column
            raise UnreadableData(f"{kw} longer than 64 characters")
    return meta


def _meta_from_scan(data: bytes, el: dict[int, tuple[int, int]], transfer_syntax: str,
                    limit: int | None = None) -> InstanceMeta | None:
    def raw(tag: int) -> bytes:
        start, length = el.get(tag, (0, 0))
        return data[start:start + length] if length > 0 else b""

    charset = raw(0x00080005).decode("latin-1").strip(" \x00")
    encoding = _SIMPLE_CHARSETS.get(charset)
    if encoding is None:
        return None  # ISO 2022 escapes and the like: pydicom decodes those

    def t(kw: str) -> str:
        return raw(_TEXT_TAGS[kw]).decode("latin-1").strip(" \x00")

    def us(kw: str) -> int | None:
        v = raw(_US_TAGS[kw])
        return int.from_bytes(v[:2], "little") if len(v) >= 2 else None

    def i(kw: str) -> int | None:
        try:
            v = t(kw)
            return int(float(v)) if v else None
        except ValueError:
            return None

    for kw in REQUIRED:
        if not t(kw):
            raise UnreadableData(f"missing {kw}")
    rows, cols = us("Rows"), us("Columns")
    if 0x7FE00010 in el:
        frames = i("NumberOfFrames") or 1
        bits, spp = us("BitsAllocated"), us("SamplesPerPixel") or 1
        if rows is None or cols is None or bits is None:
            return None  # let pydicom's path word the complaint
        start, length = el[0x7FE00010]
        if length < 0:  # encapsulated
            if len(data) - start < 8:
                raise UnreadableData("encapsulated pixel data missing")
            _pixels_fit(rows, cols, frames, spp, bits, limit)
        elif length < (rows * cols * frames * spp * bits + 7) // 8:
            return None
    elif rows is not None and cols is not None and 0x7FE00008 not in el and 0x7FE00009 not in el:
        raise UnreadableData("image without pixel data (truncated?)")

    def desc(kw: str) -> str:
        b = raw(_DESCRIPTIONS[kw])
        return undeclared_text(b) if not charset else b.decode(encoding, "replace").rstrip(" \x00")

    return InstanceMeta(
        sop_uid=t("SOPInstanceUID"), sop_class_uid=t("SOPClassUID"), study_uid=t("StudyInstanceUID"),
        series_uid=t("SeriesInstanceUID"), transfer_syntax=transfer_syntax, modality=t("Modality"),
        body_part=t("BodyPartExamined"), series_description=desc("SeriesDescription"),
        study_description=desc("StudyDescription"), series_number=i("SeriesNumber"),
        accession_number=t("AccessionNumber"), study_date=t("StudyDate"), instance_number=i("InstanceNumber"),
        rows=rows, columns=cols, frames=i("NumberOfFrames") or 1, position=t("ImagePositionPatient"),
        orientation=t("ImageOrientationPatient"), pixel_spacing=t("PixelSpacing"),
        frame_of_reference_uid=t("FrameOfReferenceUID"), image_type=t("ImageType"),
        images_in_acquisition=i("ImagesInAcquisition"), acquisition_number=i("AcquisitionNumber"),
    )
