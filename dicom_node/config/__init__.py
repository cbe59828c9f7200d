"""Typed settings from ``node.toml``, each key overridable by an environment variable.

``DICOM_NODE_<SECTION>_<KEY>`` overrides ``[section] key`` (e.g. ``DICOM_NODE_SCP_PORT=11113``); lists and
tables are given as JSON (``DICOM_NODE_DESTINATIONS='[{"name": "pacs", ...}]'``). A wrong key, type or value
stops the node at start with a message naming the key, before it accepts any association.
"""

from __future__ import annotations

from .destinations import QUALITY_POLICIES, Destination
from .loading import ENV_PREFIX, TLS_FILE_KEYS, find_config, load_settings
from .sections import (
    DEFAULT_TERMS,
    InferenceSettings,
    NodeSettings,
    NotificationSettings,
    OutputSettings,
    QualitySettings,
    RetentionSettings,
    Rule,
    ScpSettings,
    ScpTlsSettings,
    SenderSettings,
    SeriesSettings,
    Source,
    WebSettings,
    WorkerSettings,
)
from .settings import Settings
from .validators import CannotListen, ConfigError

__all__ = [
    "DEFAULT_TERMS", "ENV_PREFIX", "QUALITY_POLICIES", "TLS_FILE_KEYS", "CannotListen", "ConfigError", "Destination",
    "InferenceSettings", "NodeSettings", "NotificationSettings", "OutputSettings", "QualitySettings",
    "RetentionSettings", "Rule", "ScpSettings", "ScpTlsSettings", "SenderSettings", "SeriesSettings", "Settings",
    "Source", "WebSettings", "WorkerSettings", "find_config", "load_settings",
]
