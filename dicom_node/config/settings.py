"""All of the node's settings: one field per section of ``node.toml``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from inference.bundled import BUNDLED_MODEL

from .destinations import Destination
from .sections import (
    InferenceSettings,
    LearningSettings,
    NodeSettings,
    NotificationSettings,
    OutputSettings,
    QualitySettings,
    RetentionSettings,
    Rule,
    ScpSettings,
    SenderSettings,
    SeriesSettings,
    Source,
    WebSettings,
    WorkerSettings,
)


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
    learning: LearningSettings = field(default_factory=LearningSettings)
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
        return Path(self.inference.model_path) if self.inference.model_path else BUNDLED_MODEL
