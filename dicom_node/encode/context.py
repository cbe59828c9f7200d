"""The patient and study context a result copies from its source, made complete and encodable first.

Why: highdicom reads the patient/study attributes of the first source image as plain attributes, so a
series from an anonymiser that *dropped* a Type 2 attribute (PatientBirthDate, StudyID, …) instead of
emptying it made every encoding fail after the model had run. The standard lets a Type 2 attribute be
empty, so the result carries it empty. Values a strict reader would refuse (a PatientSex that is not M, F
or O, a date that is not YYYYMMDD) are written empty too rather than copied broken. Text in any character
set the source declares is decoded and written back in that set when it survives the round trip, else in
UTF-8 (ISO_IR 192); a source that declares none but holds non-ASCII bytes is read as UTF-8 when the bytes
are valid UTF-8, else as Latin-1, and the result says which (a result with non-ASCII text and no Specific
Character Set would be unreadable).

Only a copy of the first source's metadata changes; the received files are never touched.
"""

from __future__ import annotations

import copy
import logging
import warnings

from highdicom.enum import SpecificCharacterSetValues
from pydicom import config
from pydicom.charset import convert_encodings, encode_string
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag
from pydicom.valuerep import PersonName, validate_value

log = logging.getLogger("dicom_node.encode")

#: Type 2 attributes of the Patient and General Study modules that highdicom reads from the source.
TYPE2_CONTEXT = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "ReferringPhysicianName",
                 "StudyID", "AccessionNumber", "StudyDate", "StudyTime")
#: Value representations holding text in the data set's character set (PS3.5 6.1.2.3).
TEXT_VRS = frozenset(("SH", "LO", "ST", "LT", "UT", "PN", "UC"))
#: Copied exactly as sent, valid or not: what the PACS files the result under.
KEEP_AS_SENT = frozenset(("PatientName", "PatientID", "IssuerOfPatientID", "OtherPatientIDs", "AccessionNumber",
                          "StudyID", "SpecificCharacterSet"))
#: Study attributes outside the patient groups that the results copy (General Study, Patient Study modules).
STUDY_TEXT = frozenset(("StudyDate", "StudyTime", "ReferringPhysicianName", "StudyDescription",
                        "PhysiciansOfRecord", "NameOfPhysiciansReadingStudy", "AdmittingDiagnosesDescription"))
UTF8 = "ISO_IR 192"
LATIN1 = "ISO_IR 100"


def result_context(source: list[Dataset]) -> list[Dataset]:
    """``source`` with its first dataset replaced by a completed copy (the one highdicom reads the patient
    and study from); the other datasets are only referenced, so they stay as they are."""
    first = copy.deepcopy(source[0])
    _settle_character_set(first)
    filled = []
    for kw in TYPE2_CONTEXT:
        if kw not in first or first[kw].value is None:
            setattr(first, kw, "")
            filled.append(kw)
    _blank_invalid(first)
    if filled:
        log.info("series %s: absent Type 2 attributes written empty in the results: %s",
                 first.get("SeriesInstanceUID", "?"), ", ".join(filled))
    return [first, *source[1:]]


def _copied_context(tag, keyword: str) -> bool:
    """Patient and clinical-trial groups (0010, 0012) and the study attributes of group 0008: what the results
    copy as patient/study context. Never geometry or pixel description, which the SEG must take unchanged."""
    return not tag.is_private and (tag.group in (0x0010, 0x0012) or keyword in STUDY_TEXT)


def _blank_invalid(ds: Dataset) -> None:
    """Empty the values the results would copy broken (a wrong format for their VR), except identifiers.

    Identifiers are copied as they are even when too long (a hashed 32-character AccessionNumber): the
    result must file under the same patient and study as its source, which matters more than the validator.
    """
    sex = str(ds.PatientSex or "").strip().upper()
    ds.PatientSex = sex if sex in ("M", "F", "O") else ""
    blanked = []
    for elem in ds:
        if not _copied_context(elem.tag, elem.keyword) or elem.VR in ("SQ", "UI") or elem.keyword in KEEP_AS_SENT \
                or elem.value in ("", None):
            continue
        values = elem.value if isinstance(elem.value, (list, MultiValue)) else [elem.value]
        try:
            for v in values:
                validate_value(elem.VR, v if elem.VR in ("DA", "TM", "DT", "AS", "CS") else str(v), config.RAISE)
        except (ValueError, TypeError):
            elem.value = ""
            blanked.append(elem.keyword or str(elem.tag))
    if blanked:  # names of attributes only: their values may be patient data
        log.info("series %s: values not valid for their VR written empty in the results: %s",
                 ds.get("SeriesInstanceUID", "?"), ", ".join(blanked))


def _text_bytes(ds: Dataset) -> dict[BaseTag, bytes]:
    """The bytes of each top-level public text element of a data set read without a character set.

    Undecoded elements give their raw bytes; one already decoded was read as Latin-1 (pydicom's default),
    so encoding it as Latin-1 gives its bytes back exactly.
    """
    out = {}
    for tag, elem in ds._dict.items():
        if tag.is_private or elem.value in (None, b"", ""):
            continue
        vr = elem.VR
        if vr is None:
            try:
                vr = dictionary_VR(tag)
            except KeyError:
                continue
        if vr not in TEXT_VRS:
            continue
        if isinstance(elem, RawDataElement):
            out[tag] = bytes(elem.value)
        else:
            values = elem.value if isinstance(elem.value, (list, MultiValue)) else [elem.value]
            try:
                out[tag] = "\\".join(str(v) for v in values).encode("latin-1")
            except UnicodeEncodeError:
                continue
    return out


def _read_undeclared(ds: Dataset) -> None:
    """Non-ASCII text without a Specific Character Set: UTF-8 when every such value is valid UTF-8
    (what most current software writes), else Latin-1 (what older software writes); declared from now on."""
    texts = {tag: b for tag, b in _text_bytes(ds).items() if any(c >= 0x80 for c in b)}
    if not texts:
        return
    try:
        decoded = {tag: b.decode("utf-8") for tag, b in texts.items()}
        guess = UTF8
    except UnicodeDecodeError:
        decoded = {tag: b.decode("latin-1") for tag, b in texts.items()}
        guess = LATIN1
    log.info("series %s: non-ASCII text without Specific Character Set, read as %s",
             ds.get("SeriesInstanceUID", "?"), guess)
    for tag, text in decoded.items():
        vr = ds._dict[tag].VR or dictionary_VR(tag)
        values = text.rstrip(" \x00").split("\\") if vr not in ("ST", "LT", "UT") else [text.rstrip(" \x00")]
        ds[tag] = DataElement(tag, vr, values if len(values) > 1 else values[0])
    ds.SpecificCharacterSet = guess


def _settle_character_set(ds: Dataset) -> None:
    """Declare the character set the text is really in, and one the results can be written in."""
    value = ds.get("SpecificCharacterSet")
    declared = [str(v).strip() for v in (value if isinstance(value, (list, MultiValue)) else [value or ""])]
    if not any(declared):
        _read_undeclared(ds)
        return
    for elem in ds.iterall():  # decode every text value (sequences too) while the declaration still holds
        _ = elem.value
    # "\ISO 2022 IR 87": an empty first value is the default repertoire, which writers spell ISO 2022 IR 6
    terms = ["ISO 2022 IR 6" if k == 0 and not v and len(declared) > 1 else v for k, v in enumerate(declared)]
    if all(_known(t) for t in terms) and _round_trips(ds, convert_encodings(terms)):
        if terms != declared:
            ds.SpecificCharacterSet = terms if len(terms) > 1 else terms[0]
        return
    log.info("series %s: text does not re-encode in Specific Character Set %s: results written in UTF-8",
             ds.get("SeriesInstanceUID", "?"), "\\".join(declared))
    ds.SpecificCharacterSet = UTF8


def _known(term: str) -> bool:
    """A Defined Term of Specific Character Set (PS3.3 C.12.1.1.2), as highdicom requires."""
    try:
        SpecificCharacterSetValues(term)
    except ValueError:
        return False
    return True


def _round_trips(ds: Dataset, encodings: list[str]) -> bool:
    """Whether each public text value encodes back in the declared character sets without loss."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # pydicom warns, then substitutes '?', where a value does not encode
        for elem in ds.iterall():
            if elem.tag.is_private or elem.VR not in TEXT_VRS or elem.value in (None, ""):
                continue
            values = elem.value if isinstance(elem.value, (list, MultiValue)) else [elem.value]
            for v in values:
                try:
                    if isinstance(v, PersonName):
                        v.encode(encodings)
                    else:
                        encode_string(str(v), encodings)
                except (UnicodeError, ValueError, LookupError, Warning):
                    return False
    return True
