"""Receive: the DICOM upper layer in (association acceptor, DIMSE framing), the C-STORE/C-ECHO handlers,
header reading and start-up recovery. Everything a peer sends is handled and validated here before it
reaches the disk or the database."""
