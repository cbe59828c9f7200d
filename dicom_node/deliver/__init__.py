"""Deliver: getting results to destinations (DIMSE C-STORE SCU, DICOMweb STOW-RS) and recording it."""
