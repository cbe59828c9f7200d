"""End to end: last instance sent to SEG received, through the node alone, per stage against a reference tree, and
with Orthanc routing and answering C-FIND as the source."""

from __future__ import annotations

import shutil
import statistics
import subprocess
import threading
import time
from pathlib import Path

import numpy as np

from bench.peers import ENV_NODELAY, STORESCU, DcmtkSCP, NodeProc, OrthancProc, free_port, make_study, storescu


def seg_waiter(pacs):
    """``wait(k)``: block until the PACS folder holds ``k`` SEGs (storescp names them SG...), return the time."""
    def wait(k: int, timeout: float = 600) -> float:
        end = time.monotonic() + timeout
        while sum(1 for p in pacs.folder.iterdir() if p.name.startswith("SG")) < k:
            if time.monotonic() > end:
                raise RuntimeError("SEG never arrived")
            time.sleep(0.02)
        return time.perf_counter()
    return wait


def bench_end_to_end(work: Path, n_studies: int, n_slices: int, concurrent: int) -> dict:
    """Last instance sent → SEG received at a storescp, minus the configured stable wait."""
    import json as _json

    from sqlalchemy import select

    from storage.models import Job

    stable = 1.0
    pacs = DcmtkSCP(work / "e2e" / "pacs")
    node = NodeProc(work / "e2e" / "node", fsync=True, dest_port=pacs.port, stable=stable)
    studies = []
    for i in range(n_studies + concurrent):
        d = work / "e2e" / f"study{i}"
        make_study(d, n_slices, seed=100 + i)
        studies.append(d)

    wait_segs = seg_waiter(pacs)

    lat = []
    try:
        storescu(node.port, [studies[0]])  # warm-up (model already loaded by serve)
        wait_segs(1)
        for i in range(1, n_studies):
            storescu(node.port, [studies[i]])
            t_last = time.perf_counter()
            lat.append(wait_segs(i + 1) - t_last - stable)
        t0 = time.perf_counter()
        threads = [threading.Thread(target=storescu, args=(node.port, [s])) for s in studies[n_studies:]]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        t_sent = time.perf_counter()
        burst = wait_segs(n_studies + concurrent) - t_sent - stable
        db = node.db()
        with db.session() as s:
            jobs = list(s.scalars(select(Job).where(Job.state == "done")))
            stages = [_json.loads(j.timings) for j in jobs]
        db.dispose()
        peak = node.peak_rss_mb()
    finally:
        node.stop()
        pacs.stop()
    mean_stage = {k: statistics.mean(s[k] for s in stages if k in s) for k in stages[0]} if stages else {}
    # the model's own time: its pass, and the quality gate's test-time-augmented pass (quality.tta)
    predict = mean_stage.get("predict", 0.0) + mean_stage.get("tta", 0.0)
    p = np.percentile(lat, [50, 95]) if lat else [float("nan")] * 2
    return {
        "studies": n_studies - 1,
        "slices": n_slices,
        "stable_seconds": stable,
        "latency_p50_s": float(p[0]),
        "latency_p95_s": float(p[1]),
        "overhead_beyond_predict_p50_s": float(p[0]) - predict,
        "mean_stage_s": mean_stage,
        f"burst_{concurrent}_studies_s": burst,
        "node_peak_rss_mb": peak,
        "wall_since_burst_s": time.perf_counter() - t0,
    }


NETWORK_STAGES = ("predict", "tta")
AROUND_STAGES = ("postprocess", "quality", "encode")


def bench_stage_times(work: Path, trees: dict[str, Path], rounds: int, size: int = 448,
                      n_slices: int | None = None) -> dict:
    """A whole-leg series through nodes running different code trees (e.g. main's and this one), one job at a
    time, the trees alternating within each round so that both see the machine in the same state; per job
    the job's own stage times (``jobs.timings``) and the wall time from the last instance sent to the
    encoded result (minus the stable wait: what the stage times leave out shows there). Every node runs the
    shipped defaults of everything that matters here (quality gate with its second pass, bf16 where the CPU
    has it, batch 16); each first gets a small warm-up series, so no job pays one-time loading."""
    import json as _json

    from sqlalchemy import select

    from inference.phantom import Geometry, random_anatomy, render, small_series
    from inference.phantom_io import write_dicom_series
    from storage.models import Job, Series

    anat = random_anatomy(np.random.default_rng(7))
    top, bottom = anat.z_extent
    thick = (top - bottom) / (n_slices or 158)
    ps = (2 * 170 * anat.scale + 60) / size
    geom = Geometry(size, size, int((top - bottom) / thick), (ps, ps),
                    (-(size - 1) / 2 * ps, 15 * anat.scale - (size - 1) / 2 * ps, top),
                    slice_step=(0, 0, -thick), slice_thickness=thick)
    leg = render(anat, geom, seed=7)
    warm = small_series(seed=3, n_slices=24, size=size)
    stable = 1.0
    nodes = {}
    try:
        for name, root in trees.items():
            pacs = DcmtkSCP(work / "stages" / name / "pacs")
            node = NodeProc(work / "stages" / name / "node", fsync=True, dest_port=pacs.port, stable=stable,
                            root=root, policy="hold")
            nodes[name] = (node, pacs)

        def run_one(name: str, ph, tag: str) -> dict:
            node, _ = nodes[name]
            folder = work / "stages" / name / tag
            uid = pydicom_series_uid(write_dicom_series(ph, folder, seed=len(tag)))
            storescu(node.port, [folder])
            t_sent = time.perf_counter()
            db = node.db()
            try:
                while True:
                    with db.session() as s:
                        job = s.scalars(select(Job).join(Series, Job.series_id == Series.id)
                                        .where(Series.series_uid == uid)).first()
                        timings = _json.loads(job.timings or "{}") if job is not None else {}
                        state = job.state if job is not None else ""
                    if "encode" in timings or state in ("failed", "skipped"):
                        break
                    if time.perf_counter() - t_sent > 1800:
                        raise RuntimeError(f"{name}: job for {tag} never finished")
                    time.sleep(0.1)
            finally:
                db.dispose()
            wall = time.perf_counter() - t_sent - stable
            shutil.rmtree(folder, ignore_errors=True)
            return {"timings": timings, "state": state, "wall_s": wall}

        for name in trees:
            run_one(name, warm, "warmup")
        jobs: dict[str, list] = {name: [] for name in trees}
        order = list(trees)
        for r in range(rounds):
            for name in (order if r % 2 == 0 else order[::-1]):
                jobs[name].append(run_one(name, leg, f"leg{r}"))
                print(f"stage_times: {name} round {r}: {jobs[name][-1]}", flush=True)
    finally:
        for node, pacs in nodes.values():
            node.stop()
            pacs.stop()
    out: dict = {"slices": geom.n_slices, "size": size, "rounds": rounds,
                 "trees": {k: str(v) for k, v in trees.items()}}
    for name, runs in jobs.items():
        stages = sorted({k for j in runs for k in j["timings"]})
        mean = {k: statistics.mean(j["timings"].get(k, 0.0) for j in runs) for k in stages}
        net = sum(mean.get(k, 0.0) for k in NETWORK_STAGES)
        around = sum(mean.get(k, 0.0) for k in AROUND_STAGES)
        out[name] = {"jobs": runs, "mean_stage_s": mean, "network_s": net, "around_s": around,
                     "ratio": around / net if net else float("nan"),
                     "ratios": [sum(j["timings"].get(k, 0.0) for k in AROUND_STAGES)
                                / max(sum(j["timings"].get(k, 0.0) for k in NETWORK_STAGES), 1e-9) for j in runs],
                     "wall_s": statistics.mean(j["wall_s"] for j in runs)}
    return out


def pydicom_series_uid(paths: list[Path]) -> str:
    import pydicom

    return str(pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID)


def bench_end_to_end_source(work: Path, n_studies: int, n_slices: int, stable: float = 60.0) -> dict:
    """With a queryable source: Orthanc routes each series to the node, which asks it how many instances the
    series has (C-FIND) and starts once it holds them all. Last instance routed → SEG at a storescp, with a
    60 s quiet timer that must not be what ends the wait (nothing is subtracted)."""
    import json as _json

    import pydicom
    from sqlalchemy import func, select

    from storage.models import Event, Instance, Job

    if not Path(OrthancProc.BIN).exists():
        return {"skipped": "Orthanc not installed (Debian's orthanc)"}
    base = work / "e2e-source"
    pacs = DcmtkSCP(base / "pacs")
    node_port = free_port()
    orthanc = OrthancProc(base / "orthanc", node_port)
    src = (f'[[sources]]\nname = "orthanc"\nae_title = "ORTHANC"\nhost = "127.0.0.1"\nport = {orthanc.dicom}\n')
    node = None
    studies = []
    for i in range(n_studies):
        d = base / f"study{i}"
        paths = make_study(d, n_slices, seed=300 + i)
        studies.append((d, pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID))

    wait_segs = seg_waiter(pacs)

    lat = []
    try:
        node = NodeProc(base / "node", fsync=True, dest_port=pacs.port, stable=stable, port=node_port, extra=src)
        for d, _ in studies:
            r = subprocess.run([STORESCU, "-aec", "ORTHANC", "+sd", "127.0.0.1", str(orthanc.dicom), str(d)],
                               env=ENV_NODELAY, capture_output=True)
            if r.returncode != 0:
                raise RuntimeError(f"storescu to Orthanc failed: {r.stderr.decode()[-500:]}")
        for i, (_, uid) in enumerate(studies):
            orthanc.route(uid)  # returns once Orthanc has sent the whole series
            t_last = time.perf_counter()
            lat.append(wait_segs(i + 1) - t_last)
        db = node.db()
        with db.session() as s:
            stages = [_json.loads(j.timings) for j in s.scalars(select(Job).where(Job.state == "done")
                                                                 .order_by(Job.id))]
            stages = stages[1:] or stages  # the first study warms the model up, as for the latencies
            # what completion adds: last instance recorded → its job running (C-FIND, judging, dispatch)
            last = dict(s.execute(select(Instance.series_id, func.max(Instance.received_at))
                                  .group_by(Instance.series_id)).all())
            started = dict(s.execute(select(Event.series_id, func.min(Event.at)).where(Event.kind == "running")
                                     .group_by(Event.series_id)).all())
        db.dispose()
        waits = [(started[k] - last[k]).total_seconds() for k in sorted(started) if k in last]
    finally:
        if node is not None:
            node.stop()
        orthanc.stop()
        pacs.stop()
    mean_stage = {k: statistics.mean(s[k] for s in stages if k in s) for k in stages[0]} if stages else {}
    model = sum(mean_stage.get(k, 0.0) for k in ("load", "preprocess", "predict", "postprocess"))
    lat_w = lat[1:] or lat  # the first study also warms up the model
    job = sum(mean_stage.values())
    p = np.percentile(lat_w, [50, 95])
    w = np.percentile(waits[1:] or waits, [50, 95]) if waits else [float("nan")] * 2
    return {"studies": len(lat_w), "slices": n_slices, "stable_seconds": stable, "latency_p50_s": float(p[0]),
            "latency_p95_s": float(p[1]), "overhead_beyond_model_p50_s": float(p[0]) - model,
            "overhead_beyond_job_stages_p50_s": float(p[0]) - job, "completion_wait_p50_s": float(w[0]),
            "completion_wait_p95_s": float(w[1]), "mean_stage_s": mean_stage}
