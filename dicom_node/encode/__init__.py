"""Encode: results as DICOM (SEG, TID 1500 SR) and the checks of what was written against its source."""
