"""The patient/study context the results copy: complete (Type 2 present), valid, and in an encodable
character set — checked on the metadata alone (the corpus in test_header_corpus.py sends the same through
the node)."""

from __future__ import annotations

import io

import pydicom
import pytest
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from dicom_node.encode.context import TYPE2_CONTEXT, result_context


def received(**values) -> Dataset:
    """A header written to bytes and read back, so that its text is still undecoded, as when loaded."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.ImagePositionPatient = ["-123.4567890123456789", "0", "0"]  # too long for DS, as scanners write it
    for kw, v in values.items():
        if isinstance(v, bytes):
            ds.add(DataElement(pydicom.datadict.tag_for_keyword(kw), pydicom.datadict.dictionary_VR(kw), v))
        else:
            setattr(ds, kw, v)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buf.getvalue()))


def test_absent_type2_attributes_are_present_and_empty_and_the_source_is_untouched():
    src = received(PatientName="Anon")
    ctx = result_context([src, src])
    for kw in TYPE2_CONTEXT:
        assert kw in ctx[0], kw
        assert kw == "PatientName" or ctx[0][kw].value in ("", None), kw
    assert ctx[0].PatientName == "Anon"
    assert ctx[1] is src and "PatientBirthDate" not in src  # only a copy of the first changes


def test_invalid_values_are_emptied_but_identifiers_and_geometry_are_kept():
    src = received(PatientSex="U", StudyDate="2026-01-01", PatientAge="45", AccessionNumber="A" * 30)
    ctx = result_context([src])[0]
    assert (ctx.PatientSex, ctx.StudyDate, ctx.PatientAge) == ("", "", "")
    assert ctx.AccessionNumber == "A" * 30  # the PACS files the result under it
    assert str(ctx.ImagePositionPatient[0]) == "-123.4567890123456789"


@pytest.mark.parametrize("values,name,charset", [
    ({"PatientName": b"M\xfcller^J\xfcrgen"}, "Müller^Jürgen", "ISO_IR 100"),
    ({"PatientName": "Øster^Åse".encode()}, "Øster^Åse", "ISO_IR 192"),
    ({"SpecificCharacterSet": ["", "ISO 2022 IR 87"], "PatientName": "Yamada^Tarou=山田^太郎=やまだ^たろう"},
     "Yamada^Tarou=山田^太郎=やまだ^たろう", ["ISO 2022 IR 6", "ISO 2022 IR 87"]),
    ({"SpecificCharacterSet": "GB18030", "PatientName": "Wang^XiaoDong=王^小东"}, "Wang^XiaoDong=王^小东", "GB18030"),
    ({"SpecificCharacterSet": "ISO-8859-1", "PatientName": "Muller"}, "Muller", "ISO_IR 192"),  # not a DICOM term
])
def test_text_is_decoded_and_declared_in_a_set_it_can_be_written_in(values, name, charset):
    ctx = result_context([received(**values)])[0]
    got = ctx.SpecificCharacterSet
    assert (list(got) if isinstance(got, pydicom.multival.MultiValue) else got) == charset
    assert str(ctx.PatientName) == name
    out = io.BytesIO()
    ctx.save_as(out)  # and it encodes back
    assert str(pydicom.dcmread(io.BytesIO(out.getvalue())).PatientName) == name
