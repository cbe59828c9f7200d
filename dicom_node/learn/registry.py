"""The model registry as the node uses it: which checkpoint file serves, registering the configured one at
start, adding a learning round's model, and promote / rollback as audited admin actions.

Why here and not in storage: these steps touch files (copying a checkpoint into the data folder, hashing it,
reading its model card) and the configuration; storage/model_versions.py keeps the rows and the one-serving
invariant.

Versions: the configured (or bundled) checkpoint registers under its card's version; a learned one under
:func:`next_version` of its parent (``0.2.0+site.1``, ``0.2.0+site.2``...: the base release, and the site's
count of models learned from it, in SemVer's build-metadata form). A learned model's card carries that same
version, so ``Job.model_version`` and the SEG's Contributing Equipment name the registry's version.

Paths: a learned checkpoint lies in ``<data_dir>/models/<version>.safetensors`` and is stored relative to the
data folder (like ``Instance.path``: a restored or moved folder still finds it); the configured or bundled
file is stored absolute, where it is.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import socket
import uuid
from collections.abc import Iterable
from pathlib import Path

from sqlalchemy.exc import IntegrityError

from inference.model_card import read_card
from storage import model_versions as mv
from storage.db import Database
from storage.filestore import resolve_stored, stored_path
from storage.model_versions import RegistryError
from storage.models import ModelVersion
from storage.states import ModelState

from ..config import Settings

log = logging.getLogger("dicom_node.learn.registry")

#: A version usable as a file name: SemVer-like characters only, starting with a letter or digit (so never
#: ``.``/``..``, never a separator), at most 64 like the column.
_VERSION = re.compile(r"[0-9A-Za-z][0-9A-Za-z.+_-]{0,63}")
#: who the configured checkpoint's promotion is recorded as
CONFIGURATION = "configuration (inference.model_path)"
#: where a promotion the node made itself came from (as the CLI's actions: this host)
_LOCAL = f"{socket.gethostname()} (local)"

__all__ = ["RegistryError", "metrics_summary", "models_dir", "ensure_registered", "serving_checkpoint",
           "add_model", "promote", "rollback", "next_version", "sha256_of"]


def _plain(version: str) -> bool:
    """Usable in a file name and a URL path segment."""
    return _VERSION.fullmatch(version) is not None and ".." not in version


def models_dir(settings: Settings) -> Path:
    return Path(settings.data_dir) / "models"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def ensure_registered(settings: Settings, db: Database) -> str:
    """Register the configured (or bundled) checkpoint if the registry has never seen its sha256, and return
    the serving version.

    A checkpoint the registry has never seen becomes the serving model: configuring a new file is an admin's
    explicit choice. One it knows changes nothing, so a restart keeps a model promoted since (the
    configuration names the starting point, the registry what serves now). If nothing serves (an empty
    registry), the configured one serves. Refuses (ModelCardError) a file without a model card."""
    path = Path(os.path.abspath(settings.model_path))
    sha = sha256_of(path)
    known = mv.by_sha256(db, sha)
    if known is None:
        card = read_card(path)  # only for a new file: reading a card imports torch (seconds for a CLI command)
        version = card.version if _plain(card.version) else f"sha.{sha[:12]}"
        if mv.get(db, version) is not None:  # retrained elsewhere under the same version string
            version = f"{version.split('+', 1)[0]}+sha.{sha[:8]}"
        try:
            mv.register(db, version=version, path=str(path), sha256=sha, card_json=card.to_json())
        except (IntegrityError, RegistryError):  # another process (serve and a worker) registered it just now
            again = mv.by_sha256(db, sha)
            if again is None:
                raise
            version = again.version
        else:
            log.info("model %s registered from %s", version, path.name)
        known_version = version
    else:
        known_version = known.version
    current = mv.serving(db)
    if current is None or (known is None and current.sha256 != sha):
        try:
            mv.promote(db, known_version, CONFIGURATION, _LOCAL,
                       "a new checkpoint in the configuration" if current else "the node's first model")
        except RegistryError:  # another process promoted it in between
            pass
        current = mv.serving(db)
    assert current is not None
    return current.version


def serving_checkpoint(settings: Settings, db: Database) -> tuple[str, Path, str]:
    """(version, checkpoint file as it is now, sha256) of the serving model; registers the configured one
    first when the registry is empty."""
    row = mv.serving_digest(db)
    if row is None:
        ensure_registered(settings, db)
        row = mv.serving_digest(db)
        assert row is not None
    version, stored, sha = row
    return version, resolve_stored(settings.data_dir, stored), sha


def next_version(db: Database, parent_version: str) -> str:
    """The version a model learned from ``parent_version`` gets: the parent's release without its build
    metadata, ``+site.N`` with N one more than any learned from that release so far (``0.2.0`` →
    ``0.2.0+site.1``; ``0.2.0+site.1`` → ``0.2.0+site.2``)."""
    base = parent_version.split("+", 1)[0] or "0.0.0"
    prefix = f"{base}+site."
    used = [int(v[len(prefix):]) for v in mv.versions_named(db, prefix) if v[len(prefix):].isdigit()]
    return f"{prefix}{max(used, default=0) + 1}"


def add_model(settings: Settings, db: Database, checkpoint: Path, *, parent: str, trained_on: Iterable[int] = (),
              held_out: Iterable[int] = (), metrics: dict | None = None,
              state: ModelState = ModelState.CANDIDATE) -> ModelVersion:
    """Copy a learning round's checkpoint into the data folder and register it under its card's version
    (which :func:`next_version` made). The file name is made from that version after checking it is a plain
    name; the copy is written under a temporary name and renamed, and hashed as copied.

    RegistryError, in words: a card version that is not a plain version string, or that the registry holds
    already, or weights registered already under another version. ``state=SERVING`` promotes it at once."""
    card = read_card(checkpoint)
    version = card.version
    if not _plain(version):
        raise RegistryError(f"the checkpoint's card names version {version!r}, which is not a plain version "
                            "string (letters, digits, . + _ -)")
    if mv.get(db, version) is not None:
        raise RegistryError(f"the checkpoint's card names version {version}, which the registry holds already: "
                            "a learned model's card must carry its own version (next_version)")
    folder = models_dir(settings)
    folder.mkdir(parents=True, exist_ok=True)
    dest = folder / f"{version}.safetensors"
    tmp = folder / f".{uuid.uuid4().hex}.tmp"
    try:
        shutil.copyfile(checkpoint, tmp)
        sha = sha256_of(tmp)
        # renamed into place under the registry's lock: a file left by an interrupted attempt is replaced, one
        # that a registered version names never is (register refuses that version, under the same lock)
        mv.register(db, version=version, path=stored_path(settings.data_dir, dest), sha256=sha,
                    card_json=card.to_json(), parent=parent, trained_on=trained_on, held_out=held_out,
                    metrics=metrics, state=ModelState.CANDIDATE, place=lambda: os.replace(tmp, dest))
    finally:
        tmp.unlink(missing_ok=True)
    first = state == ModelState.SERVING
    if first:
        mv.promote(db, version, "learning round", _LOCAL, "registered as serving")
    row = mv.get(db, version)
    assert row is not None
    return row


def metrics_summary(metrics: dict) -> str:
    """One line of the learning round that made a version (its stored metrics, see learn/rounds.py): mean Dice
    of the serving model and of this one on the held-out corrections, per structure, and the decision."""
    mean = metrics.get("mean_dice")
    if not isinstance(mean, dict) or not all(isinstance(mean.get(k), int | float) for k in ("serving", "candidate")):
        return str(metrics.get("decision", ""))
    line = (f"held-out mean Dice {mean['serving']:.3f} (serving {metrics.get('serving_version', '?')}) → "
            f"{mean['candidate']:.3f} (this) on {metrics.get('held_out_count', '?')} corrections")
    dice = metrics.get("dice")
    if isinstance(dice, dict) and isinstance(dice.get("serving"), dict) and isinstance(dice.get("candidate"), dict):
        per = [f"{k} {v:.2f}→{dice['candidate'][k]:.2f}" for k, v in sorted(dice["serving"].items())
               if isinstance(v, int | float) and isinstance(dice["candidate"].get(k), int | float)]
        if per:
            line += " (" + ", ".join(per) + ")"
    return line + (f"; {metrics['decision']}" if metrics.get("decision") else "")


def promote(settings: Settings, db: Database, version: str, actor: str, address: str,
            note: str = "") -> tuple[str, str]:
    """An admin's (or a learning round's) promotion: audited, on the timeline; RegistryError (audited as
    refused) for an unknown version or the serving one. Serving processes switch at their next job."""
    old, new = mv.promote(db, version, actor, address, note)
    log.info("model %s serves (was %s), promoted by %s", new, old or "none", actor)
    return old, new


def rollback(settings: Settings, db: Database, actor: str, address: str, note: str = "") -> tuple[str, str]:
    """Serve again the model that served before the current one; RegistryError (audited as refused) when no
    other model has served."""
    old, new = mv.rollback(db, actor, address, note)
    log.info("model %s serves again (was %s), rolled back by %s", new, old or "none", actor)
    return old, new
