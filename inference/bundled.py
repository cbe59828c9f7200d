"""Where the bundled demo model lies: a path only, so that the node's configuration can name its default
model without importing torch."""

from __future__ import annotations

from pathlib import Path

BUNDLED_MODEL = Path(__file__).parent / "weights" / "demo-lower-limb.safetensors"
