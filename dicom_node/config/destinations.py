"""Where results go: one ``[[destinations]]`` table per PACS or archive, DIMSE or DICOMweb."""

from __future__ import annotations

from dataclasses import dataclass

from storage.states import QualityPolicy

from .validators import (
    ConfigError,
    _ae_title,
    _one_of,
    _port,
    _positive,
    _readable_file,
)

QUALITY_POLICIES = {p.value for p in QualityPolicy}


@dataclass
class Destination:
    name: str = "pacs"
    ae_title: str = "PACS"
    host: str = "127.0.0.1"
    port: int = 4242
    retries: int = 3  # unused: the outbox's retry_* keys decide; still accepted so older node.toml files load
    backoff_seconds: float = 5.0  # unused, likewise
    retry_initial_seconds: float = 10.0
    retry_max_seconds: float = 300.0
    # while down, a C-ECHO (or, for STOW, a QIDO request) this often, apart from the backoff: the first answer
    # sends every waiting delivery at once
    probe_seconds: float = 15.0
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
    quality_policy: str = QualityPolicy.HOLD.value

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
        _positive(f"{key}.probe_seconds", self.probe_seconds)
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
