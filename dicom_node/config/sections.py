"""The sections of ``node.toml`` other than the destinations: each a dataclass that checks its own values."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from storage.states import DuplicatePolicy

from .validators import (
    ConfigError,
    _ae_title,
    _one_of,
    _port,
    _positive,
    _readable_file,
)

DEFAULT_TERMS = [
    "LEG", "LEGS", "LOWER LIMB", "LOWER LIMBS", "LOWER EXTREMITY", "LOWEREXTREMITY", "LOWER EXT", "LOWERLIMB",
    "THIGH", "KNEE", "HIP", "HIPS", "PELVIS", "FEMUR", "TIBIA", "FIBULA", "CALF", "ANKLE", "EXTREMITY",
]


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
    #: the largest instance taken, as received and as its pixels decode (memory: one per association at most)
    max_instance_mb: int = 512
    quarantine_max_mb: int = 2048  # refused data sets kept for inspection up to this (0: none kept)
    fsync: bool = True
    max_associations: int = 16
    network_timeout: float = 60
    association_request_timeout: float = 10
    max_associations_per_peer: int = 8
    max_connections: int = 0  # 0: 4 x max_associations, at least 32
    max_connections_per_peer: int = 0  # 0: a quarter of max_connections, at least max_associations_per_peer
    reserved_connections: int = 0  # 0: an eighth of max_connections
    reserved_associations: int = 0  # 0: an eighth of max_associations, at least 1
    release_wait_seconds: float = 3
    require_called_ae: bool = True
    duplicate_policy: str = "keep"  # a stored SOP Instance UID re-sent with other content: "keep" or "replace"
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
        _positive("scp.max_instance_mb", self.max_instance_mb)
        if self.quarantine_max_mb < 0:
            raise ConfigError("scp.quarantine_max_mb must be >= 0 (0: keep no refused data set)")
        _one_of("scp.duplicate_policy", self.duplicate_policy, {p.value for p in DuplicatePolicy})

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
        if self.reserved_associations < 0:
            raise ConfigError("scp.reserved_associations must be >= 0 (0: an eighth of scp.max_associations)")
        if self.reserved_associations and self.reserved_associations >= self.max_associations:
            raise ConfigError(f"scp.reserved_associations ({self.reserved_associations}) must be below "
                              f"scp.max_associations ({self.max_associations})")
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
    #: the largest series segmented, in millions of voxels (a job holds ~26 bytes a voxel: decide/rules.py)
    max_megavoxels: int = 300

    def validate(self) -> None:
        _positive("worker.poll_seconds", self.poll_seconds)
        _positive("worker.max_megavoxels", self.max_megavoxels)
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
    #: connections open at once, from one address, and the time a request has to arrive (watch/guard.py)
    max_connections: int = 128
    max_connections_per_peer: int = 32
    request_timeout: float = 10.0

    def validate(self) -> None:
        _port("web.port", self.port)
        _positive("web.max_connections", self.max_connections)
        _positive("web.max_connections_per_peer", self.max_connections_per_peer)
        _positive("web.request_timeout", self.request_timeout)
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
    """The quality gate (dicom_node/gate/quality.py) runs on every job; these are its options."""

    #: the test-time-augmented second pass (doubles the model's time; the strongest check); the result sent
    #: is then the mean of both passes
    tta: bool = True

    def validate(self) -> None:
        pass


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
class LearningSettings:
    """Learning from the radiologists' corrections (``dicom_node/learn``): accuracy monitoring and rounds.

    A round fine-tunes a candidate from the serving model on the corrections not held out, evaluates both
    on the held-out ones and promotes the candidate only if it wins (``auto_promote`` or ``learn --promote``).
    """

    #: scheduled rounds (``dicom-node learn`` runs one at any time, whatever this says)
    enabled: bool = False
    #: when scheduled rounds run: a crontab line (minute hour day month weekday), the node's local time
    schedule: str = "0 2 * * *"
    #: a scheduled round waits until this many corrections arrived since the serving model was trained
    min_new_corrections: int = 3
    #: a round's winning candidate becomes the serving model without an admin
    auto_promote: bool = False
    #: wall-clock budget of a round's fine-tune (the round adds about 1-2 minutes: loading, and both models on
    #: the held-out studies); measured in docs/learning.md
    minutes: float = 6.0
    #: share of corrections held out (newest first, at least one); once held out, always held out
    holdout_fraction: float = 0.2
    #: ``accuracy-drop`` webhook when the rolling median Dice of a structure falls below this
    accuracy_floor: float = 0.80
    #: corrections in the rolling median (per structure, newest first)
    accuracy_window: int = 10
    #: where rounds train: auto (GPU when there is one), cpu, cuda
    device: str = "auto"
    #: the fine-tune's recipe (dicom_node/learn/finetune.py ``Recipe``; defaults measured on whole-leg studies in
    #: docs/learning.md): learning rate, slices per step, random square crops of the model's input (0: whole
    #: slices), and the share of each batch drawn from slices that show bone. A site with small or few studies
    #: (or a GPU) may measure other values with bench/learning_recipe.py
    lr: float = 2e-4
    batch_size: int = 4
    crop: int = 0
    foreground: float = 1.0

    def validate(self) -> None:
        from apscheduler.triggers.cron import CronTrigger

        try:
            CronTrigger.from_crontab(self.schedule)
        except ValueError as exc:
            raise ConfigError(f"learning.schedule: {self.schedule!r} is not a crontab line ({exc})") from None
        _positive("learning.min_new_corrections", self.min_new_corrections)
        _positive("learning.minutes", self.minutes)
        if not 0 < self.holdout_fraction < 1:
            raise ConfigError("learning.holdout_fraction must be between 0 and 1")
        if not 0 <= self.accuracy_floor <= 1:
            raise ConfigError("learning.accuracy_floor must be between 0 and 1")
        _positive("learning.accuracy_window", self.accuracy_window)
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"learning.device must be auto, cpu or cuda, got {self.device!r}")
        _positive("learning.lr", self.lr)
        _positive("learning.batch_size", self.batch_size)
        if self.crop < 0:
            raise ConfigError("learning.crop must be >= 0 (0: whole slices)")
        if not 0 <= self.foreground <= 1:
            raise ConfigError("learning.foreground must be between 0 and 1")
