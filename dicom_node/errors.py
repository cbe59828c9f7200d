"""What an admin reads when a job fails: the problem in words and what to do, never a Python exception.

Why: the reason of a failed or retried job is shown by ``dicom-node jobs``, the dashboard and the timeline
to people who run a PACS, not to Python programmers; "AttributeError: 'FileDataset' object has no attribute
'PatientBirthDate'" tells them nothing they can act on. Known failures (files gone, disk full, memory,
network, database) are put in words here; anything else is an internal error that names the stage and the
job, and the exception with its traceback goes to the node's log at debug level for whoever fixes it.
Messages carry no patient data: exception texts (which may quote header values) are not copied into them.
"""

from __future__ import annotations

import errno
import socket

from storage.filestore import UnsafePath

#: A pattern no admin-facing reason may match: the name of a Python exception class (tests check it).
EXCEPTION_NAME = r"\b[A-Z][A-Za-z]*(?:Error|Exception|Exit|Interrupt|Warning)\b|Traceback \(most recent call"


class Explained(Exception):
    """An error whose message is already written for an admin (it is shown as it is)."""


def admin_message(exc: BaseException, stage: str, job_id: int | None = None) -> str:
    """The reason recorded on a job for ``exc``, raised while ``stage`` (e.g. "loading the images")."""
    if isinstance(exc, Explained):
        return str(exc)
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        where = "GPU memory" if type(exc).__name__ == "OutOfMemoryError" else "memory"
        return (f"not enough {where} while {stage}: lower inference.batch_size, run fewer workers on this "
                "machine, or give it more memory; the job is retried")
    if isinstance(exc, FileNotFoundError):
        return (f"a file the job needs is missing from the node's data folder while {stage} (removed by hand or "
                "by the retention purge?): send the series again")
    if isinstance(exc, UnsafePath):
        return f"a file the job needs is missing while {stage}: {exc}"
    if isinstance(exc, PermissionError):
        return (f"the node may not read or write a file in its data folder while {stage}: check the owner and "
                "permissions of node.data_dir")
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"the disk is full while {stage}: free space in the node's data folder; the job is retried"
    net = network_reason(exc)
    if net:
        return f"{net} while {stage}; the job is retried"
    if _is_database_error(exc) and "disk is full" in str(exc):  # SQLite's SQLITE_FULL, PostgreSQL's disk full
        return f"the database's disk is full while {stage}: free space where node.database_url keeps its data " \
               "(for SQLite, the node's data folder); the job is retried"
    if _is_database_error(exc):
        return f"the database could not be reached while {stage}: check node.database_url and the server; " \
               "the job is retried"
    job = f"; report it with job {job_id}" if job_id is not None else ""
    return f"internal error while {stage} — see the node's log (debug level) for details{job}"


def network_reason(exc: BaseException, peer: str = "") -> str:
    """Words for a failed connection to ``peer`` (host:port or URL), or "" when ``exc`` is no network error."""
    at = f" {peer}" if peer else ""
    if isinstance(exc, ConnectionRefusedError):
        return f"connection refused by{at or ' the peer'} (is it running, and are host and port right?)"
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return f"no answer from{at or ' the peer'} in time (network or peer down?)"
    if isinstance(exc, (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)):
        return f"the connection to{at or ' the peer'} was closed by the other side"
    if isinstance(exc, socket.gaierror):
        return f"the host name of{at or ' the peer'} does not resolve (check the destination's host)"
    name = type(exc).__name__
    if name in ("ConnectionError", "ConnectTimeout", "ReadTimeout", "SSLError", "ProxyError"):  # requests
        problem = "TLS" if name == "SSLError" else "network"
        return f"could not connect to{at or ' the server'} over HTTP ({problem} problem)"
    if name == "HTTPError":
        status = getattr(getattr(exc, "response", None), "status_code", None)
        return f"the server{at} answered HTTP {status or 'with an error'}" + (
            " (check the destination's username and password)" if status in (401, 403) else "")
    return ""


def database_reason(exc: BaseException) -> str:
    """The driver's own words for a database error, first line only: later lines quote the statement and its
    parameters, which can be patient data."""
    orig = getattr(exc, "orig", None) or exc
    return (str(orig).strip().splitlines() or [type(orig).__name__])[0][:300]


def _is_database_error(exc: BaseException) -> bool:
    module = type(exc).__module__ or ""
    return module.startswith("sqlalchemy") and type(exc).__name__ in ("OperationalError", "InterfaceError",
                                                                         "DisconnectionError", "TimeoutError")
