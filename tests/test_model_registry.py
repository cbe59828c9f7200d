"""The model registry: one serving version, promote and rollback (audited, refused in words), the
configured checkpoint registered at start, learned checkpoints added under their own version, the CLI and
the dashboard's promote / rollback, and serving processes switching to a promoted model at their next job."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import select
from test_durability import db_url  # noqa: F401  (the fixture: SQLite, and PostgreSQL where configured)

from dicom_node.config import load_settings
from dicom_node.learn import registry
from inference.bundled import BUNDLED_MODEL
from inference.model_card import load_checkpoint, read_card, save_checkpoint
from storage import model_versions as mv
from storage.db import Database
from storage.models import AuditEntry, Event
from storage.states import EventKind, ModelState


def _settings(tmp: Path, model: Path | None = None):
    env = {"DICOM_NODE_NODE_DATA_DIR": str(tmp / "var"), "DICOM_NODE_QUALITY_TTA": "false"}
    if model is not None:
        env["DICOM_NODE_INFERENCE_MODEL_PATH"] = str(model)
    return load_settings(None, environ=env)


def _db(tmp: Path) -> Database:
    db = Database(f"sqlite:///{tmp / 'var' / 'node.db'}")
    db.create_schema(tmp / "var")
    return db


@pytest.fixture(scope="module")
def resaved(tmp_path_factory) -> Path:
    """The bundled weights re-saved with another card version: a real model with another sha256."""
    out = tmp_path_factory.mktemp("ckpt") / "resaved.safetensors"
    state, card = load_checkpoint(BUNDLED_MODEL)
    card.version = "0.2.0+site.1"
    save_checkpoint(out, state, card)
    return out


def _audit(db: Database) -> list[tuple[str, str, str]]:
    with db.session() as s:
        return [(a.action, a.outcome, a.detail) for a in s.scalars(select(AuditEntry).order_by(AuditEntry.id))]


def test_one_serving_promote_rollback_and_refusals(tmp_path):
    db = _db(tmp_path)
    assert mv.serving(db) is None
    for v in ("1.0", "1.1", "1.2"):
        mv.register(db, version=v, path=f"/m/{v}", sha256=v * 8, card_json="{}")
    with pytest.raises(mv.RegistryError, match="nothing to roll back to"):
        mv.rollback(db, "cli:alice", "host (local)")
    assert mv.promote(db, "1.0", "cli:alice") == ("", "1.0")
    assert mv.promote(db, "1.1", "cli:bob", "10.0.0.1") == ("1.0", "1.1")
    states = {r.version: r.state for r in mv.list_versions(db)}
    assert states == {"1.0": ModelState.RETIRED, "1.1": ModelState.SERVING, "1.2": ModelState.CANDIDATE}
    cur = mv.serving(db)
    assert cur is not None and cur.promoted_by == "cli:bob" and cur.promoted_at is not None
    with pytest.raises(mv.RegistryError, match="no model version '9.9'"):
        mv.promote(db, "9.9", "cli:bob")
    with pytest.raises(mv.RegistryError, match="serves already"):
        mv.promote(db, "1.1", "cli:bob")
    with pytest.raises(mv.RegistryError, match="already registered"):
        mv.register(db, version="1.1", path="/x", sha256="x", card_json="{}")
    with pytest.raises(mv.RegistryError, match="another version serves"):
        mv.register(db, version="2.0", path="/x", sha256="y", card_json="{}", state=ModelState.SERVING)
    with pytest.raises(mv.RegistryError, match="use promote"):
        mv.set_state(db, "1.2", ModelState.SERVING)
    mv.promote(db, "1.2", "round")
    assert mv.rollback(db, "cli:carol") == ("1.2", "1.1")
    assert mv.rollback(db, "cli:carol") == ("1.1", "1.2")  # like kubectl rollout undo: undoes the rollback
    with db.session() as s:
        serving = s.scalars(select(mv.ModelVersion).where(mv.ModelVersion.state == ModelState.SERVING)).all()
        events = s.scalars(select(Event.detail).where(Event.kind == EventKind.MODEL_PROMOTED)).all()
    assert len(serving) == 1 and len(events) == 5
    audit = _audit(db)
    assert [(a, o) for a, o, _ in audit] == [
        ("model-rollback", "refused"), ("model-promote", "done"), ("model-promote", "done"),
        ("model-promote", "refused"), ("model-promote", "refused"), ("model-promote", "done"),
        ("model-rollback", "done"), ("model-rollback", "done")]
    assert "nothing to roll back to" in audit[0][2] and "no model version" in audit[3][2]


def test_next_version_counts_per_release(tmp_path):
    db = _db(tmp_path)
    assert registry.next_version(db, "0.2.0") == "0.2.0+site.1"
    mv.register(db, version="0.2.0+site.1", path="/a", sha256="a", card_json="{}")
    mv.register(db, version="0.2.0+site.7", path="/b", sha256="b", card_json="{}")
    assert registry.next_version(db, "0.2.0+site.1") == "0.2.0+site.8"
    assert registry.next_version(db, "0.3.0") == "0.3.0+site.1"


def test_configured_checkpoint_registers_once_and_a_new_one_serves(tmp_path, resaved):
    settings = _settings(tmp_path)
    db = _db(tmp_path)
    bundled = read_card(BUNDLED_MODEL).version
    assert registry.ensure_registered(settings, db) == bundled
    assert registry.ensure_registered(settings, db) == bundled  # a restart changes nothing
    version, path, sha = registry.serving_checkpoint(settings, db)
    assert (version, path, sha) == (bundled, BUNDLED_MODEL.resolve(), registry.sha256_of(BUNDLED_MODEL))
    # an admin configures another file: new weights, so it serves
    settings2 = _settings(tmp_path, resaved)
    assert registry.ensure_registered(settings2, db) == "0.2.0+site.1"
    # back to the bundled one in the configuration: known weights, the registry's choice stays
    assert registry.ensure_registered(settings, db) == "0.2.0+site.1"
    rows = {r.version: r for r in mv.list_versions(db)}
    assert rows[bundled].state == ModelState.RETIRED and rows["0.2.0+site.1"].promoted_by.startswith("configuration")
    assert Path(rows["0.2.0+site.1"].path).is_absolute()


def test_add_model_copies_under_its_version_and_refuses_clashes(tmp_path, resaved):
    settings = _settings(tmp_path)
    db = _db(tmp_path)
    registry.ensure_registered(settings, db)
    row = registry.add_model(settings, db, resaved, parent="0.2.0", trained_on=[3, 1], held_out=[2],
                             metrics={"decision": "promote"})
    assert row.version == "0.2.0+site.1" and row.state == ModelState.CANDIDATE
    assert row.path == "models/0.2.0+site.1.safetensors"  # relative to the data folder
    assert (settings.data_dir / row.path).is_file() and row.sha256 == registry.sha256_of(resaved)
    assert json.loads(row.trained_on) == [1, 3] and json.loads(row.held_out) == [2]
    with pytest.raises(mv.RegistryError, match="holds already"):
        registry.add_model(settings, db, resaved, parent="0.2.0")
    state, card = load_checkpoint(resaved)
    for bad in ("../../etc/x", ".hidden", "a/b"):
        card.version = bad
        save_checkpoint(tmp_path / "bad.safetensors", state, card)
        with pytest.raises(mv.RegistryError, match="not a plain version"):
            registry.add_model(settings, db, tmp_path / "bad.safetensors", parent="0.2.0")
    assert registry.promote(settings, db, "0.2.0+site.1", "cli:alice", "h (local)")[1] == "0.2.0+site.1"
    version, path, _ = registry.serving_checkpoint(settings, db)
    assert version == "0.2.0+site.1" and path == (settings.data_dir / "models" / "0.2.0+site.1.safetensors")
    # a backup keeps the learned checkpoints, and a restored folder finds the serving one in its own models/
    from dicom_node.watch.backup import backup

    backup(settings, tmp_path / "restored" / "var")
    restored = _settings(tmp_path / "restored")
    assert registry.serving_checkpoint(restored, _db(tmp_path / "restored"))[1:] == (
        tmp_path / "restored" / "var" / "models" / "0.2.0+site.1.safetensors", row.sha256)
    assert registry.sha256_of(tmp_path / "restored" / "var" / row.path) == row.sha256
    assert registry.rollback(settings, db, "cli:alice", "h (local)") == ("0.2.0+site.1", "0.2.0")
    assert not list((settings.data_dir / "models").glob("*.tmp"))


class _PromotesWhileRunning:
    """The real predictor; its first ``predict`` promotes another model, i.e. while the job runs."""

    def __init__(self, real, promote):
        self._real, self._promote = real, promote

    def __getattr__(self, name):
        return getattr(self._real, name)

    def predict(self, *a, **kw):
        if self._promote is not None:
            self._promote()
            self._promote = None
        return self._real.predict(*a, **kw)


def _queue_series(db: Database, folder: Path, seed: int) -> int:
    import time

    import pydicom
    from conftest import write_series

    from dicom_node.receive.headers import to_meta
    from storage.instances import Recorder
    from storage.jobs import mark_judged
    from storage.series import stable_series

    _, paths = write_series(folder, seed=seed, n_slices=8, size=64)
    rec = Recorder(db)
    for p in paths:
        assert rec.record(to_meta(pydicom.dcmread(p, stop_before_pixels=True)), str(p), p.stat().st_size)
    time.sleep(0.05)
    (series_id,) = stable_series(db, 0.01)
    return mark_judged(db, series_id, queue=True, reason="", expected_count=len(paths))


def test_a_promoted_model_serves_from_the_next_job_without_restart(tmp_path, resaved):
    """A pipeline as serve and worker build it (real bundled model, real second checkpoint): B is promoted
    while a job runs on A; that job finishes on A and records A, the next records B; a promoted model that
    cannot be loaded leaves B in place, with the reason on the job's timeline."""
    from dicom_node.pipeline import Pipeline
    from dicom_node.service import make_predictor
    from storage.filestore import FileStore
    from storage.models import Job

    settings = _settings(tmp_path)
    db = _db(tmp_path)
    a = registry.ensure_registered(settings, db)
    b = registry.add_model(settings, db, resaved, parent=a).version
    promote_b = [lambda: registry.promote(settings, db, b, "cli:test", "here")]
    loads: list[str] = []

    def factory(path=None):
        real = make_predictor(settings, path)
        loads.append(real.card.version)
        return _PromotesWhileRunning(real, promote_b.pop() if promote_b else None)

    pipeline = Pipeline(settings, db, FileStore(settings.data_dir, fsync=False), factory,
                        model_source=lambda: registry.serving_checkpoint(settings, db))
    _ = pipeline.predictor  # the node's preload
    jobs = [_queue_series(db, tmp_path / f"s{i}", seed=80 + i) for i in range(3)]
    assert pipeline.run_next()
    assert mv.serving(db).version == b  # promoted while the first job ran
    assert pipeline.run_next()
    # a third version whose file is damaged: the next job stays on B and says why
    broken = settings.data_dir / "models" / "broken.safetensors"
    broken.write_bytes(b"not a checkpoint")
    mv.register(db, version="0.2.0+site.9", path="models/broken.safetensors", sha256="0" * 64, card_json="{}")
    registry.promote(settings, db, "0.2.0+site.9", "cli:test", "here")
    assert pipeline.run_next()
    with db.session() as s:
        used = [s.get(Job, j).model_version for j in jobs]
        states = [s.get(Job, j).state for j in jobs]
        notes = {j: s.scalars(select(Event.detail).where(Event.job_id == j, Event.kind == EventKind.MODEL)).all()
                 for j in jobs}
    assert all(st in ("delivering", "review", "done") for st in states), states  # encoded, none failed
    assert used == [a, b, b]
    assert loads == [a, b]  # loaded once each: no reload for a job whose model did not change
    assert notes[jobs[0]] == [] and notes[jobs[1]] == [f"this job runs on model {b}, promoted since the last job "
                                                       f"(was {a})"]
    assert len(notes[jobs[2]]) == 1 and notes[jobs[2]][0].startswith(
        f"the serving model could not be loaded, so this job runs on model {b}: ")
    assert "not a safetensors checkpoint" in notes[jobs[2]][0]


def _fake_candidate(db: Database, version: str = "0.2.0+site.1") -> str:
    """A registry row for a candidate (promoting it on the dashboard never loads its file)."""
    mv.register(db, version=version, path=f"models/{version}.safetensors", sha256="c" * 64,
                card_json=json.dumps({"name": "lower-limb-bones", "version": version}), parent="0.2.0",
                trained_on=[1, 2], held_out=[3], metrics={"mean_dice": {"serving": 0.61, "candidate": 0.9},
                                                          "serving_version": "0.2.0", "held_out_count": 1,
                                                          "decision": "the candidate wins"})
    return version


def _model_audit(db: Database) -> list[dict]:
    from storage.timeline import audit_log

    return [a for a in reversed(audit_log(db)) if a["action"].startswith("model-")]


def test_dashboard_promote_and_rollback_need_the_token_and_csrf_and_are_audited(tmp_path):
    import re

    from test_hostile_web import TOKEN, Dashboard, request

    d = Dashboard(tmp_path, f'token = "{TOKEN}"')
    try:
        settings = load_settings(d.config)
        bundled = registry.ensure_registered(settings, d.db)
        v = _fake_candidate(d.db)
        url = f"{d.base}/api/models/{v.replace('+', '%2B')}/promote"
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        cookie = {"Cookie": f"dicomnode_token={TOKEN}"}
        assert request(f"{d.base}/api/models")[0] == 401
        status, _, body = request(f"{d.base}/api/models", headers=bearer)
        listed = {m["version"]: m for m in json.loads(body)}
        assert status == 200 and listed[bundled]["state"] == "serving" and listed[v]["trained_on"] == [1, 2]
        assert listed[v]["summary"].startswith("held-out mean Dice 0.610 (serving 0.2.0) → 0.900 (this)")
        # refused: no token; the token's cookie from another site; the cookie without the page's CSRF token
        assert request(url, "POST", {"Content-Type": "application/json"}, b"{}")[0] == 401
        assert request(url, "POST", {"Content-Type": "application/json"}, b"{}")[0] == 401  # audited once a minute
        assert request(url, "POST", {**cookie, "Origin": "http://evil.example"}, b"")[0] == 403
        assert request(url, "POST", {**cookie, "Origin": d.base,
                                     "Content-Type": "application/x-www-form-urlencoded"}, b"by=x")[0] == 403
        assert mv.serving(d.db).version == bundled
        refused = _model_audit(d.db)[1:]  # after the configured model's registration
        assert _model_audit(d.db)[0]["actor"] == "configuration (inference.model_path)"
        assert [(a["action"], a["outcome"]) for a in refused] == [("model-promote", "refused")] * 3
        assert [a["detail"][:8] for a in refused] == ["HTTP 401", "HTTP 403", "HTTP 403"]
        assert "another origin" in refused[1]["detail"] and "CSRF" in refused[2]["detail"]
        # the JSON API with the token
        status, _, body = request(url, "POST", {**bearer, "Content-Type": "application/json"},
                                  json.dumps({"by": "ops script", "reason": "round 3 won"}).encode())
        assert status == 200 and json.loads(body) == {"old": bundled, "serving": v, "by": "ops script (web token)"}
        assert mv.serving(d.db).version == v
        metrics = request(f"{d.base}/metrics", headers=bearer)[2].decode()
        assert f'dicomnode_model_serving_info{{sha256="{"c" * 64}",version="{v}"}} 1.0' in metrics
        # the page's own form: the CSRF token in the action URL, from the page
        status, _, page = request(f"{d.base}/models", headers=cookie)
        assert status == 200 and f'data-version="{v}" data-state="serving"' in page.decode()
        assert 'href="models"' in request(f"{d.base}/", headers=cookie)[2].decode()  # in the nav
        csrf = re.search(rb'name="csrf-token" content="([^"]+)"', page).group(1).decode()
        status, _, page = request(f"{d.base}/models/rollback?csrf_token={csrf}", "POST",
                                  {**cookie, "Origin": d.base, "Content-Type": "application/x-www-form-urlencoded"},
                                  b"by=Dr+Alice&reason=worse+on+knees")
        assert status == 200 and f'data-version="{bundled}" data-state="serving"' in page.decode()  # redirected
        assert mv.serving(d.db).version == bundled
        # refusals by the registry: an unknown version; promoting the serving one (a form shows why)
        assert request(f"{d.base}/api/models/9.9/promote", "POST", bearer)[0] == 404
        status, _, page = request(f"{d.base}/models/{bundled}/promote?csrf_token={csrf}", "POST",
                                  {**cookie, "Origin": d.base, "Content-Type": "application/x-www-form-urlencoded"},
                                  b"by=Bob")
        assert status == 409 and "Refused: version 0.2.0 serves already" in page.decode()
        done = [a for a in _model_audit(d.db) if a["outcome"] == "done"][1:]
        assert [(a["action"], a["actor"], a["address"]) for a in done] == [
            ("model-promote", "ops script (web token)", "127.0.0.1"),
            ("model-rollback", "Dr Alice (web token)", "127.0.0.1")]
        assert "round 3 won" in done[0]["detail"] and "worse on knees" in done[1]["detail"]
        last = _model_audit(d.db)[-2:]
        assert [(a["outcome"], a["detail"]) for a in last] == [
            ("refused", "no model version '9.9' (see: dicom-node models)"), ("refused", "version 0.2.0 serves already")]
    finally:
        d.stop()


def test_cli_models_round_trip(tmp_path, capsys):
    """The command's own main() in this process (a subprocess per command cost 7 s each on the loaded
    machine); the exit codes, output and audit rows are the command's."""
    import getpass
    import subprocess

    from dicom_node.watch.cli import main

    config = tmp_path / "node.toml"
    config.write_text(f'[node]\ndata_dir = "{tmp_path / "var"}"\n')

    def cli(*args: str) -> subprocess.CompletedProcess:
        capsys.readouterr()
        rc = main(["-c", str(config), "models", *args])
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, rc, out, err)

    r = cli("rollback")
    assert r.returncode == 1 and "not rolled back: nothing to roll back to" in r.stderr
    db = _db(tmp_path)
    v = _fake_candidate(db)
    r = cli("promote", "0.9.9")
    assert r.returncode == 1 and "not promoted: no model version '0.9.9' (see: dicom-node models)" in r.stderr
    r = cli("promote", v, "--reason", "it won")
    assert r.returncode == 0 and f"model {v} serves now (was 0.2.0)" in r.stdout, r.stderr
    r = cli()
    assert r.returncode == 0 and f"* {v}" in r.stdout and "trained on corrections 1 2; held out 3" in r.stdout
    assert f"promoted by cli:{getpass.getuser()}" not in r.stdout and f"by cli:{getpass.getuser()}" in r.stdout
    r = cli("--json")
    rows = {m["version"]: m for m in json.loads(r.stdout)}
    assert rows[v]["state"] == "serving" and rows["0.2.0"]["state"] == "retired" and len(rows[v]["sha256"]) == 64
    assert cli("rollback").returncode == 0
    assert mv.serving(db).version == "0.2.0"
    audit = _model_audit(db)
    assert [(a["action"], a["outcome"], a["actor"]) for a in audit] == [
        ("model-promote", "done", "configuration (inference.model_path)"),  # the first command registered it
        *[(action, outcome, f"cli:{getpass.getuser()}") for action, outcome in (
            ("model-rollback", "refused"), ("model-promote", "refused"), ("model-promote", "done"),
            ("model-rollback", "done"))]]
    assert all(a["address"].endswith("(local)") for a in audit)


def test_concurrent_promotes_and_registrations_leave_one_serving(db_url, tmp_path):  # noqa: F811
    """Serve and workers register the configured model at the same moment, and admins promote two versions at
    once, on SQLite and PostgreSQL: one registration, exactly one serving version, and the loser told why."""
    import threading

    settings = load_settings(None, environ={"DICOM_NODE_NODE_DATA_DIR": str(tmp_path / "var"),
                                            "DICOM_NODE_NODE_DATABASE_URL": db_url})
    db = Database(db_url)
    db.create_schema(tmp_path / "var")
    try:
        barrier = threading.Barrier(3)
        results: list[object] = []

        def start() -> None:
            barrier.wait()
            try:
                results.append(registry.ensure_registered(settings, db))
            except Exception as exc:  # recorded for the assertion below
                results.append(exc)

        threads = [threading.Thread(target=start) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert results == ["0.2.0"] * 3, results
        for v in ("1.0", "2.0"):
            mv.register(db, version=v, path=f"/m/{v}", sha256=v * 8, card_json="{}")
        barrier = threading.Barrier(2)
        outcomes: dict[str, object] = {}

        def promote(v: str) -> None:
            barrier.wait()
            try:
                outcomes[v] = mv.promote(db, v, f"admin {v}")
            except mv.RegistryError as exc:
                outcomes[v] = exc

        threads = [threading.Thread(target=promote, args=(v,)) for v in ("1.0", "2.0")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        rows = mv.list_versions(db)
        assert [r.state for r in rows].count(ModelState.SERVING) == 1
        assert len(rows) == 3 and all(isinstance(o, tuple) for o in outcomes.values()), outcomes
        # both won in turn: the later one serves, the earlier one retired, the bundled one retired
        serving = mv.serving(db)
        assert serving is not None and outcomes[serving.version][1] == serving.version
    finally:
        db.dispose()
