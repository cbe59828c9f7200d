"""DICOM segmentation node: receive lower-limb MRI, segment the bones, return DICOM SEG to the PACS."""

__version__ = "0.1.0"
