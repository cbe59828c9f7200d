"""What every ``dicom-node`` admin command shares: who runs it and from where (for the audit trail), and the
node's settings and database. Its own module so that the sub-command modules (``cli_<name>.py``) reach it
without importing cli.py, which imports them."""

from __future__ import annotations

import os

from ..config import load_settings


def cli_actor() -> str:
    """Who runs an admin command, for the audit trail: the operating-system user (sudo's caller if any)."""
    import getpass

    try:
        user = getpass.getuser()
    except Exception:  # no login name (a container without passwd entry): the numeric id still says who
        user = f"uid {os.getuid()}"
    sudo = os.environ.get("SUDO_USER")
    return f"cli:{user}" + (f" (sudo by {sudo})" if sudo and sudo != user else "")


def cli_address() -> str:
    import socket

    return f"{socket.gethostname()} (local)"


def open_db(args):
    """(settings, database) of the node ``-c`` names, the schema brought up to date."""
    from ..service import open_storage

    settings = load_settings(args.config)
    return settings, open_storage(settings)[0]
