"""Reading ``node.toml``, applying ``DICOM_NODE_*`` environment overrides and coercing every value to its
field's type, with a message naming the key for anything wrong."""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
import types
import typing
from pathlib import Path

from .settings import Settings
from .validators import ConfigError

ENV_PREFIX = "DICOM_NODE_"


def _coerce(key: str, tp, value):
    """Coerce ``value`` (from TOML or an environment string) to the annotated type, or raise naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or value == "":
            return None
        return _coerce(key, args[0], value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, str):
            value = _json(key, value)
        return _build(tp, value, key)
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):
            value = (_json(key, value) if value.strip().startswith("[")
                     else [v.strip() for v in value.split(",") if v.strip()])
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {type(value).__name__}")
        return [_coerce(f"{key}[{i}]", item, v) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        try:
            out = tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key} must be {'an integer' if tp is int else 'a number'}, got {value!r}") from None
        if tp is int and isinstance(value, float) and value != out:
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return out
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    if tp is Path:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a path string, got {value!r}")
        return Path(value)
    raise ConfigError(f"{key}: unsupported type {tp}")


def _json(key: str, text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{key}: not valid JSON ({exc})") from None


def _build(cls, data: dict, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix} must be a table")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.name != "source"}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"unknown key {prefix + '.' if prefix else ''}{sorted(unknown)[0]} "
                          f"(known: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(f"{prefix}.{k}" if prefix else k, hints[k], v) for k, v in data.items()}
    obj = cls(**kwargs)
    if hasattr(obj, "validate"):
        obj.validate(prefix) if "key" in obj.validate.__code__.co_varnames else obj.validate()
    return obj


def _env_overrides(data: dict, environ: typing.Mapping[str, str]) -> dict:
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    sections = {f.name: f for f in dataclasses.fields(Settings) if f.name != "source"}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        rest = name[len(ENV_PREFIX):].lower()
        if rest in sections and not dataclasses.is_dataclass(typing.get_type_hints(Settings)[rest]):
            data[rest] = value  # a list section given as JSON
            continue
        for sec in sorted(sections, key=len, reverse=True):
            if rest.startswith(sec + "_"):
                data.setdefault(sec, {})
                if not isinstance(data[sec], dict):
                    raise ConfigError(f"{name}: section [{sec}] is a list; set {ENV_PREFIX}{sec.upper()} as JSON")
                key = rest[len(sec) + 1:]
                fields = {f.name for f in dataclasses.fields(typing.get_type_hints(Settings)[sec])}
                if key not in fields:
                    raise ConfigError(f"{name}: no setting {sec}.{key} (known: {', '.join(sorted(fields))})")
                data[sec][key] = value
                break
        else:
            raise ConfigError(f"{name}: no such setting (variables look like {ENV_PREFIX}SCP_PORT)")
    return data


TLS_FILE_KEYS = ("certificate", "private_key", "ca_certificates", "tls_ca", "tls_certificate", "tls_private_key")


def _resolve_tls_paths(data: dict, base: Path) -> None:
    """Relative certificate and key paths are relative to the configuration file (like node.data_dir)."""
    tables = []
    scp = data.get("scp")
    if isinstance(scp, dict):
        tls = scp.get("tls")
        if isinstance(tls, str):
            scp["tls"] = tls = _json("scp.tls", tls)
        tables.append(tls)
    dests = data.get("destinations")
    if isinstance(dests, str):
        data["destinations"] = dests = _json("destinations", dests)
    if isinstance(dests, list):
        tables += dests
    for table in tables:
        if isinstance(table, dict):
            for k in TLS_FILE_KEYS:
                v = table.get(k)
                if isinstance(v, str) and v and not Path(v).is_absolute():
                    table[k] = str((base / v).resolve())


def find_config(path: Path | None) -> Path | None:
    if path is not None:
        return path
    env = os.environ.get(ENV_PREFIX + "CONFIG")
    if env:
        return Path(env)
    return Path("node.toml") if Path("node.toml").is_file() else None


def load_settings(path: Path | None = None, environ: typing.Mapping[str, str] | None = None) -> Settings:
    """Read ``path`` (or ./node.toml, or defaults), apply environment overrides, validate."""
    environ = os.environ if environ is None else environ
    path = find_config(path)
    data: dict = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"configuration file {path} not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    data = _env_overrides(data, {k: v for k, v in environ.items() if k != ENV_PREFIX + "CONFIG"})
    if path is not None:
        _resolve_tls_paths(data, Path(path).parent)
    settings = _build(Settings, data, "")
    settings.source = path
    if path is not None and not Path(settings.node.data_dir).is_absolute():
        # relative paths in a file are relative to the file, so the node behaves the same from any cwd
        settings.node.data_dir = (Path(path).parent / settings.node.data_dir).resolve()
    names = [d.name for d in settings.destinations]
    if len(set(names)) != len(names):
        raise ConfigError("destinations: names must be unique")
    if len({s.name for s in settings.sources}) != len(settings.sources):
        raise ConfigError("sources: names must be unique")
    aets = [s.calling_aet for s in settings.sources]
    if len(set(aets)) != len(aets):
        raise ConfigError("sources: two sources route with the same calling AE title (sends_as, else ae_title); "
                          "a series is matched to its source by it")
    return settings
