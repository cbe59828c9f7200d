"""Checks shared by every section: each raises :class:`ConfigError` with a message naming the key."""

from __future__ import annotations


class ConfigError(ValueError):
    """Invalid configuration; the message names the key."""


class CannotListen(ConfigError):
    """A configured port cannot be opened (another program holds it, or the address is not this machine's):
    found only when the node starts, and, like any configuration error, told with the key that sets it."""


def _ae_title(key: str, v: str) -> None:
    if not v or len(v) > 16 or "\\" in v or not v.isprintable():
        raise ConfigError(f"{key}: {v!r} is not a valid AE title (1-16 printable characters, no backslash)")


def _readable_file(key: str, path: str, hint: str = "") -> None:
    if not path:
        raise ConfigError(f"{key} is required{hint}")
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror or exc}") from None


def _port(key: str, v: int) -> None:
    if not 0 <= v <= 65535:
        raise ConfigError(f"{key}: {v} is not a TCP port (0-65535)")


def _positive(key: str, v: float) -> None:
    if v <= 0:
        raise ConfigError(f"{key} must be > 0, got {v}")


def _one_of(key: str, v: str, allowed: set[str]) -> None:
    if v not in allowed:
        raise ConfigError(f"{key} must be one of {sorted(allowed)}, got {v!r}")
