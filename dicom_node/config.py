"""Typed settings from ``node.toml``, each key overridable by an environment variable.

``DICOM_NODE_<SECTION>_<KEY>`` overrides ``[section] key`` (e.g. ``DICOM_NODE_SCP_PORT=11113``); lists and
tables are given as JSON (``DICOM_NODE_DESTINATIONS='[{"name": "pacs", ...}]'``). A wrong key, type or value
stops the node at start with a message naming the key, before it accepts any association.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

ENV_PREFIX = "DICOM_NODE_"

DEFAULT_TERMS = [
    "LEG", "LEGS", "LOWER LIMB", "LOWER LIMBS", "LOWER EXTREMITY", "LOWEREXTREMITY", "LOWER EXT", "LOWERLIMB",
    "THIGH", "KNEE", "HIP", "HIPS", "PELVIS", "FEMUR", "TIBIA", "FIBULA", "CALF", "ANKLE", "EXTREMITY",
]


class ConfigError(ValueError):
    """Invalid configuration; the message names the key."""


@dataclass
class NodeSettings:
    data_dir: Path = Path("var")
    database_url: str = ""
    log_level: str = "INFO"

    def validate(self) -> None:
        _one_of("node.log_level", self.log_level.upper(), {"DEBUG", "INFO", "WARNING", "ERROR"})


@dataclass
class ScpTlsSettings:
    """DICOM TLS listener (PS3.15 BCP 195 profile): its own port, beside or instead of the plain one."""

    enabled: bool = False
    bind_address: str = ""  # empty: scp.bind_address
    port: int = 2762
    certificate: str = ""  # PEM: our certificate (chain)
    private_key: str = ""  # PEM: its private key (unencrypted; readable by the node's user only)
    ca_certificates: str = ""  # PEM bundle: the CAs whose client certificates we trust
    require_client_certificate: bool = True
    plain_listener: bool = True  # false: only the TLS port listens

    def validate(self, key: str = "scp.tls") -> None:
        _port(f"{key}.port", self.port)
        if not self.enabled:
            return
        _readable_file(f"{key}.certificate", self.certificate)
        _readable_file(f"{key}.private_key", self.private_key)
        if self.require_client_certificate or self.ca_certificates:
            _readable_file(f"{key}.ca_certificates", self.ca_certificates,
                           f" (needed to check client certificates; or set {key}.require_client_certificate = false)")


@dataclass
class ScpSettings:
    ae_title: str = "SEGNODE"
    bind_address: str = "0.0.0.0"
    port: int = 11112
    allowed_calling_aets: list[str] = field(default_factory=list)
    allowed_peers: list[str] = field(default_factory=list)
    min_free_disk_mb: int = 1024
    fsync: bool = True
    max_associations: int = 16
    network_timeout: float = 60
    association_request_timeout: float = 10
    max_associations_per_peer: int = 8
    max_connections: int = 0  # 0: 4 x max_associations, at least 32
    max_connections_per_peer: int = 0  # 0: a quarter of max_connections, at least max_associations_per_peer
    reserved_connections: int = 0  # 0: an eighth of max_connections
    release_wait_seconds: float = 3
    require_called_ae: bool = True
    tls: ScpTlsSettings = field(default_factory=ScpTlsSettings)

    def validate(self) -> None:
        _ae_title("scp.ae_title", self.ae_title)
        _port("scp.port", self.port)
        for aet in self.allowed_calling_aets:
            _ae_title("scp.allowed_calling_aets", aet)
        for net in self.allowed_peers:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError as exc:
                raise ConfigError(f"scp.allowed_peers: {net!r} is not an IP address or network ({exc})") from exc
        _positive("scp.max_associations", self.max_associations)
        _positive("scp.network_timeout", self.network_timeout)
        _positive("scp.association_request_timeout", self.association_request_timeout)
        _positive("scp.max_associations_per_peer", self.max_associations_per_peer)
        self._validate_connections()
        _positive("scp.release_wait_seconds", self.release_wait_seconds)
        if self.tls.port == self.port and self.tls.enabled and self.tls.plain_listener and self.port:
            raise ConfigError(f"scp.tls.port: {self.tls.port} is also scp.port; the TLS listener needs its own port")
        if self.min_free_disk_mb < 0:
            raise ConfigError("scp.min_free_disk_mb must be >= 0")

    def _validate_connections(self) -> None:
        """The connection caps (0: derived, see receive/connections.py) must leave room for the associations."""
        for key in ("max_connections", "max_connections_per_peer", "reserved_connections"):
            if getattr(self, key) < 0:
                raise ConfigError(f"scp.{key} must be >= 0 (0: derived from scp.max_associations)")
        total = self.max_connections or max(4 * self.max_associations, 32)
        if self.max_connections and self.max_connections < self.max_associations:
            raise ConfigError(f"scp.max_connections ({self.max_connections}) must be >= scp.max_associations "
                              f"({self.max_associations}): every association is a connection")
        per_peer = self.max_connections_per_peer
        if per_peer and per_peer < self.max_associations_per_peer:
            raise ConfigError(f"scp.max_connections_per_peer ({per_peer}) must be >= scp.max_associations_per_peer "
                              f"({self.max_associations_per_peer})")
        if per_peer > total:
            raise ConfigError(f"scp.max_connections_per_peer ({per_peer}) must be <= scp.max_connections ({total})")
        if self.reserved_connections >= total:
            raise ConfigError(f"scp.reserved_connections ({self.reserved_connections}) must be below "
                              f"scp.max_connections ({total})")


@dataclass
class SeriesSettings:
    stable_seconds: float = 10.0
    scan_interval_seconds: float = 2.0
    abort_grace_seconds: float = 60.0
    fetch_attempts: int = 2

    def validate(self) -> None:
        _positive("series.stable_seconds", self.stable_seconds)
        _positive("series.scan_interval_seconds", self.scan_interval_seconds)
        if self.abort_grace_seconds < 0:
            raise ConfigError("series.abort_grace_seconds must be >= 0")
        if self.fetch_attempts < 0:
            raise ConfigError("series.fetch_attempts must be >= 0")


@dataclass
class Source:
    """A PACS that routes series to the node and answers C-FIND (and C-MOVE) about them: matched by the
    calling AE title of the associations that deliver the series."""

    name: str = "pacs"
    ae_title: str = "PACS"
    host: str = "127.0.0.1"
    port: int = 104
    sends_as: str = ""
    timeout_seconds: float = 10.0
    fetch: str = "move"

    @property
    def calling_aet(self) -> str:
        """The calling AE title the PACS uses when it routes a series here (most use their own AE title)."""
        return self.sends_as or self.ae_title

    def validate(self, key: str = "sources") -> None:
        _ae_title(f"{key}.ae_title", self.ae_title)
        if self.sends_as:
            _ae_title(f"{key}.sends_as", self.sends_as)
        if not self.host:
            raise ConfigError(f"{key}.host must name the PACS's query/retrieve host")
        if not 0 < self.port <= 65535:
            raise ConfigError(f"{key}.port: {self.port} is not a TCP port (1-65535)")
        _positive(f"{key}.timeout_seconds", self.timeout_seconds)
        _one_of(f"{key}.fetch", self.fetch, {"move", "none"})


@dataclass
class Rule:
    name: str = "lower-limb MR"
    modalities: list[str] = field(default_factory=lambda: ["MR"])
    terms: list[str] = field(default_factory=lambda: list(DEFAULT_TERMS))
    min_slices: int = 20
    urgent: bool = False

    def validate(self, key: str = "rules") -> None:
        if not self.modalities:
            raise ConfigError(f"{key}.modalities must list at least one modality")
        if self.min_slices < 1:
            raise ConfigError(f"{key}.min_slices must be >= 1")


@dataclass
class InferenceSettings:
    model_path: Path | None = None
    device: str = "auto"
    batch_size: int = 16
    threads: int = 0
    precision: str = "auto"
    compile: bool = False

    def validate(self) -> None:
        _positive("inference.batch_size", self.batch_size)
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ConfigError(f"inference.precision must be auto, fp32, bf16 or fp16, not {self.precision!r}")
        if self.precision == "fp16" and self.device == "cpu":
            raise ConfigError("inference.precision fp16 needs a CUDA device: use bf16 or fp32 with device = \"cpu\"")
        if not (self.device in ("auto", "cpu") or self.device.startswith("cuda")):
            raise ConfigError(f"inference.device must be auto, cpu or cuda[:N], not {self.device!r}")
        if self.model_path is not None and not Path(self.model_path).is_file():
            raise ConfigError(f"inference.model_path: no such file {self.model_path}")


@dataclass
class WorkerSettings:
    enabled: bool = True
    poll_seconds: float = 1.0
    max_attempts: int = 3
    retry_backoff_seconds: float = 30.0
    lease_seconds: float = 60.0

    def validate(self) -> None:
        _positive("worker.poll_seconds", self.poll_seconds)
        _positive("worker.max_attempts", self.max_attempts)
        _positive("worker.lease_seconds", self.lease_seconds)
        if self.retry_backoff_seconds < 0:
            raise ConfigError("worker.retry_backoff_seconds must be >= 0")


@dataclass
class OutputSettings:
    series_description: str = "AI bone segmentation (automatic)"
    series_number: int = 9901
    manufacturer: str = "dicom-seg-node"

    def validate(self) -> None:
        if len(self.series_description) > 64:
            raise ConfigError("output.series_description is longer than 64 characters (DICOM LO)")


@dataclass
class WebSettings:
    enabled: bool = True
    bind_address: str = "127.0.0.1"
    port: int = 8080
    token: str = ""
    allowed_hosts: list[str] = field(default_factory=list)  # Host header names answered (empty: see web_security)

    def validate(self) -> None:
        _port("web.port", self.port)
        try:
            loopback = ipaddress.ip_address(self.bind_address).is_loopback
        except ValueError:
            loopback = self.bind_address == "localhost"
        if self.enabled and not loopback and len(self.token) < 16:
            raise ConfigError("web.token: a token of at least 16 characters is required when web.bind_address "
                              f"({self.bind_address}) is not a loopback address")


@dataclass
class RetentionSettings:
    purge_images_after_hours: float = 0.0

    def validate(self) -> None:
        if self.purge_images_after_hours < 0:
            raise ConfigError("retention.purge_images_after_hours must be >= 0")


@dataclass
class QualitySettings:
    """The quality gate (dicom_node/encode/quality.py) runs on every job; these are its options."""

    #: the test-time-augmented second pass (doubles the model's time; the strongest check); the result sent
    #: is then the mean of both passes
    tta: bool = True

    def validate(self) -> None:
        pass


QUALITY_POLICIES = {"hold", "send_flagged", "drop"}


@dataclass
class Destination:
    name: str = "pacs"
    ae_title: str = "PACS"
    host: str = "127.0.0.1"
    port: int = 4242
    retries: int = 3  # ignored since the outbox (kept so that older node.toml files still load)
    backoff_seconds: float = 5.0  # ignored since the outbox
    retry_initial_seconds: float = 10.0
    retry_max_seconds: float = 300.0
    give_up_after_hours: float = 24.0
    storage_commitment: bool = False
    commitment_timeout_seconds: float = 120.0
    commitment_max_requests: int = 3
    calling_ae_title: str = ""
    seg_type: str = "binary"
    send_sr: bool = True
    protocol: str = "dimse"
    url: str = ""
    username: str = ""
    password: str = ""
    tls: bool = False  # DICOM TLS to this destination (protocol "dimse")
    tls_ca: str = ""  # PEM bundle the destination's certificate must chain to (empty: the system's CAs)
    tls_certificate: str = ""  # our client certificate, if the destination asks for one
    tls_private_key: str = ""
    tls_server_name: str = ""  # name checked in the destination's certificate (empty: host)
    # what a result that fails the quality gate does here: wait for review, go out flagged, or stay local
    quality_policy: str = "hold"

    def validate(self, key: str = "destinations") -> None:
        _one_of(f"{key}.quality_policy", self.quality_policy, QUALITY_POLICIES)
        _one_of(f"{key}.seg_type", self.seg_type, {"binary", "labelmap"})
        _one_of(f"{key}.protocol", self.protocol, {"dimse", "stow"})
        if self.protocol == "stow" and not self.url.startswith(("http://", "https://")):
            raise ConfigError(f"{key}.url must be the DICOMweb base URL (http[s]://...) for protocol \"stow\"")
        _ae_title(f"{key}.ae_title", self.ae_title)
        _port(f"{key}.port", self.port)
        if self.retries < 0:
            raise ConfigError(f"{key}.retries must be >= 0")
        _positive(f"{key}.retry_initial_seconds", self.retry_initial_seconds)
        _positive(f"{key}.retry_max_seconds", self.retry_max_seconds)
        if self.retry_max_seconds < self.retry_initial_seconds:
            raise ConfigError(f"{key}.retry_max_seconds ({self.retry_max_seconds}) must be >= "
                              f"{key}.retry_initial_seconds ({self.retry_initial_seconds})")
        _positive(f"{key}.give_up_after_hours", self.give_up_after_hours)
        _positive(f"{key}.commitment_timeout_seconds", self.commitment_timeout_seconds)
        _positive(f"{key}.commitment_max_requests", self.commitment_max_requests)
        if self.storage_commitment and self.protocol != "dimse":
            raise ConfigError(f"{key}.storage_commitment needs protocol \"dimse\" (DICOMweb has no Storage "
                              "Commitment)")
        if self.tls:
            if self.protocol != "dimse":
                raise ConfigError(f"{key}.tls applies to protocol \"dimse\"; for STOW use an https:// url")
            if self.tls_ca:
                _readable_file(f"{key}.tls_ca", self.tls_ca)
            if bool(self.tls_certificate) != bool(self.tls_private_key):
                raise ConfigError(f"{key}.tls_certificate and {key}.tls_private_key go together")
            if self.tls_certificate:
                _readable_file(f"{key}.tls_certificate", self.tls_certificate)
                _readable_file(f"{key}.tls_private_key", self.tls_private_key)


@dataclass
class SenderSettings:
    """The outbox's sender loop (in ``serve``, or alone as ``dicom-node sender``)."""

    enabled: bool = True
    poll_seconds: float = 1.0
    claim_seconds: float = 600.0
    batch_size: int = 50

    def validate(self) -> None:
        _positive("sender.poll_seconds", self.poll_seconds)
        _positive("sender.claim_seconds", self.claim_seconds)
        _positive("sender.batch_size", self.batch_size)


@dataclass
class NotificationSettings:
    webhooks: list[str] = field(default_factory=list)
    timeout_seconds: float = 5.0
    destination_down_minutes: float = 15.0

    def validate(self) -> None:
        for i, url in enumerate(self.webhooks):
            if not url.startswith(("http://", "https://")):
                raise ConfigError(f"notifications.webhooks[{i}]: {url!r} is not an http(s) URL")
        _positive("notifications.timeout_seconds", self.timeout_seconds)
        if self.destination_down_minutes < 0:
            raise ConfigError("notifications.destination_down_minutes must be >= 0")


@dataclass
class Settings:
    node: NodeSettings = field(default_factory=NodeSettings)
    scp: ScpSettings = field(default_factory=ScpSettings)
    series: SeriesSettings = field(default_factory=SeriesSettings)
    rules: list[Rule] = field(default_factory=lambda: [Rule()])
    inference: InferenceSettings = field(default_factory=InferenceSettings)
    worker: WorkerSettings = field(default_factory=WorkerSettings)
    output: OutputSettings = field(default_factory=OutputSettings)
    retention: RetentionSettings = field(default_factory=RetentionSettings)
    web: WebSettings = field(default_factory=WebSettings)
    quality: QualitySettings = field(default_factory=QualitySettings)
    destinations: list[Destination] = field(default_factory=list)
    sender: SenderSettings = field(default_factory=SenderSettings)
    notifications: NotificationSettings = field(default_factory=NotificationSettings)
    sources: list[Source] = field(default_factory=list)
    source: Path | None = None

    @property
    def data_dir(self) -> Path:
        return Path(self.node.data_dir)

    @property
    def database_url(self) -> str:
        return self.node.database_url or f"sqlite:///{(self.data_dir / 'node.db').resolve()}"

    def destination(self, name: str) -> Destination | None:
        return next((d for d in self.destinations if d.name == name), None)

    @property
    def model_path(self) -> Path:
        from inference.model import BUNDLED_MODEL

        return Path(self.inference.model_path) if self.inference.model_path else BUNDLED_MODEL


# ------------------------------------------------------------------------------------------ validators
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


# ------------------------------------------------------------------------------------------ loading
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
            value = _json(key, value) if value.strip().startswith("[") else [v.strip() for v in value.split(",") if v.strip()]
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
