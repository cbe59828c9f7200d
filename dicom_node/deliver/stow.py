"""DICOMweb transport: STOW-RS of result files to a destination's DICOMweb root (dicomweb-client)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from urllib.parse import urlsplit

import pydicom

from storage.deliveries import Claimed

from ..config import Destination
from ..errors import network_reason
from .dimse import SendResult
from .transport import Outcome, probe

log = logging.getLogger("dicom_node.deliver.stow")


def stow(url: str, files: list[str], username: str = "", password: str = "") -> SendResult:
    """DICOMweb STOW-RS of the files to ``url`` (the server's DICOMweb root), via dicomweb-client."""
    from dicomweb_client.api import DICOMwebClient
    from dicomweb_client.session_utils import create_session_from_user_pass

    session = create_session_from_user_pass(username, password) if username else None
    client = DICOMwebClient(url=url, session=session)
    datasets = [pydicom.dcmread(f) for f in files]
    try:
        resp = client.store_instances(datasets)
    except Exception as exc:  # HTTP errors, refused connections: in words; the exception at debug level
        log.debug("STOW-RS to %s failed", url, exc_info=True)
        return SendResult(0, [("*", network_reason(exc, url) or f"the upload to {url} failed (see the node's log "
                                                                 "at debug level)")])
    failed = [(str(item.get("00081155", {}).get("Value", ["?"])[0]), "refused by the server")
              for item in (resp.get("00081198", {}).get("Value", []) if resp is not None else [])]
    return SendResult(len(datasets) - len(failed), failed)


class StowTransport:
    """One STOW-RS request per outbox row, after a TCP probe names an unreachable server."""

    def __init__(self, connect_timeout: float = 10.0):
        self.connect_timeout = connect_timeout

    def send(self, items: list[Claimed], dest: Destination,
             connected: Callable[[], None]) -> Iterator[tuple[Claimed, Outcome]]:
        url = urlsplit(dest.url)
        probe(url.hostname or "", url.port or (443 if url.scheme == "https" else 80), self.connect_timeout)
        connected()
        for it in items:
            res = stow(dest.url, [f["path"] for f in it.files], dest.username, dest.password)
            if res.ok:
                yield it, Outcome(True, f"{res.sent} instances by STOW-RS")
            else:
                yield it, Outcome(False, "; ".join(f"{u}: {e}" for u, e in res.failed))
