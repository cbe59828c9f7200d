"""One transport per kind of destination (mercure's one handler per target): ``protocol`` picks it."""

from __future__ import annotations

from storage.db import Database

from ..config import Destination, Settings
from .dimse import DimseTransport
from .stow import StowTransport
from .transport import Transport


def transport_for(dest: Destination, settings: Settings, db: Database, connect_timeout: float,
                  same_association_wait: float) -> Transport:
    """The transport of the destination's ``protocol`` (validated by the configuration: dimse or stow)."""
    if dest.protocol == "stow":
        return StowTransport(connect_timeout)
    return DimseTransport(settings.scp.ae_title, db, connect_timeout, same_association_wait)
