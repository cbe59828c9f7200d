"""How long a learning round's fine-tune needs on this machine: train on corrected cases of a family the bundled
model does badly on, score a case it never saw (``python -m bench.learning_recipe``).

The round's own split is reproduced: of three corrected studies the newest is held out, so the fine-tune sees
two; a fourth study scores the candidate as the node would send it (mean of the plain and the test-time
augmented pass, cleaned). The cases are the phantoms' arrays (what the node's loader gives for them), so this
measures the recipe alone; the end-to-end path through the node is the "bar" test's.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

NAMES = {1: "femur", 2: "tibia", 3: "fibula", 4: "pelvis"}


def realshape_study(index: int, size: int = 288, pixel: float = 1.5, max_slices: int = 72) -> object:
    """Shape ``index`` of the real-shape stand-in on the bounded grid the corrections bar uses (T1, from the
    iliac crest down, slice step the leg's length over ``max_slices`` within 5-10 mm, five planes a slice)."""
    from dataclasses import replace

    from bench import standin_realshape as sr
    from inference.phantom import Phantom
    from inference.synth import ssm

    models = {s: ssm.load(s) for s in ssm.SIDES}
    case = sr.make_skeleton(index, models)
    sk = case.skeleton
    z_top = float(max(v[:, 2].max() for v in sk.hips.values())) + 3
    z_bot = float(min(leg.ankle_centre[2] for leg in sk.legs.values())) - 10
    slice_mm = float(np.clip((z_top - z_bot) / max_slices, 5.0, 10.0))
    ph = sr.render_case(case, ("t1",), size=size, pixel=pixel, slice_mm=slice_mm, sub=5)["t1"]
    n = min(max_slices, ph.geometry.n_slices)
    return Phantom(anatomy=None, geometry=replace(ph.geometry, n_slices=n),  # type: ignore[arg-type]
                   image=np.ascontiguousarray(ph.image[:n]), labels=np.ascontiguousarray(ph.labels[:n]))


def family_case(family: str, seed: int, cache: Path | None = None):
    if cache is not None:
        f = cache / f"{family}-{seed}.npz"
        if f.is_file():
            from inference.phantom import Phantom

            with np.load(f, allow_pickle=True) as z:
                return Phantom(anatomy=None, geometry=z["geometry"].item(), image=z["image"],  # type: ignore[arg-type]
                               labels=z["labels"])
        ph = family_case(family, seed)
        cache.mkdir(parents=True, exist_ok=True)
        np.savez(f, geometry=np.array(ph.geometry, dtype=object), image=ph.image, labels=ph.labels)
        return ph
    if family == "realshape":
        return realshape_study(seed)
    if family == "foreign":
        from inference.synth.foreign import make_case

        return make_case(seed)
    if family == "classic":
        from inference.phantom import make_case as classic

        return classic(seed)
    raise SystemExit(f"unknown family {family}")


def dice(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    out = {}
    for v, n in NAMES.items():
        a, b = pred == v, truth == v
        s = int(a.sum()) + int(b.sum())
        if s:
            out[n] = round(2 * int((a & b).sum()) / s, 3)
    return out


def score(model: Path, ph) -> dict[str, float]:
    from inference.predict import Predictor

    p = Predictor(model, device="cpu")
    g = ph.geometry
    pred = p.predict(ph.image.astype(np.float32), g.row_dir, g.col_dir, tta=True, pixel_spacing=g.pixel_spacing)
    return dice(pred.labels, ph.labels)


def main(argv: list[str] | None = None) -> None:
    from dicom_node.learn.finetune import Recipe, TrainingCase, finetune
    from inference.dataset import Case
    from inference.model import BUNDLED_MODEL
    from inference.model_card import read_card
    from inference.training import prepare_case

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--family", default="foreign")
    ap.add_argument("--train", default="600,601", help="seeds of the trained-on corrections")
    ap.add_argument("--test", default="603", help="seeds of the unseen cases scored")
    ap.add_argument("--minutes", type=float, default=3.0)
    ap.add_argument("--max-steps", type=int, default=0)
    ap.add_argument("--lr", type=float, default=Recipe.lr)
    ap.add_argument("--keep-teacher", type=float, default=Recipe.keep_teacher)
    ap.add_argument("--crop", type=int, default=Recipe.crop)
    ap.add_argument("--train-bn", action="store_true", help="let batch-norm statistics move (default: frozen)")
    ap.add_argument("--foreground", type=float, default=Recipe.foreground)
    ap.add_argument("--batch-size", type=int, default=Recipe.batch_size)
    ap.add_argument("--free", default="4", help="class values not held to the teacher (those v0.2.0 gets wrong)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/learning_recipe"))
    ap.add_argument("--baseline", action="store_true", help="also score the bundled model")
    ap.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                    help="autocast of the fine-tune (auto: bf16 on CPUs with native bf16, as the node runs it)")
    ap.add_argument("--cache", type=Path, help="keep the rendered studies here (pickled geometry: only your own)")
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    card = read_card(BUNDLED_MODEL)
    t = time.perf_counter()
    cases = []
    for s in (int(v) for v in a.train.split(",")):
        ph = family_case(a.family, s, a.cache)
        g = ph.geometry
        c = Case(f"c{s}", ph.image.astype(np.float32), ph.labels, (1, 1, 1), g.row_dir, g.col_dir)
        x, y = prepare_case(c, card.input_size, card.normalisation)
        cases.append(TrainingCase(s, x, y))
    tests = [family_case(a.family, int(v), a.cache) for v in a.test.split(",")]
    prep = time.perf_counter() - t
    rec: dict = {"family": a.family, "train": a.train, "test": a.test, "prepare_s": round(prep, 1)}
    if a.baseline:
        rec["bundled"] = [score(BUNDLED_MODEL, ph) for ph in tests]
        print(json.dumps(rec), flush=True)
    r = Recipe(lr=a.lr, keep_teacher=a.keep_teacher, crop=a.crop, batch_size=a.batch_size, freeze_bn=not a.train_bn,
               foreground=a.foreground)
    free = tuple(int(v) for v in a.free.split(",") if v)
    res = finetune(BUNDLED_MODEL, cases, a.out / "cand.safetensors", version="0.2.0-lr", parent_version="0.2.0",
                   minutes=a.minutes, max_steps=a.max_steps, recipe=r, free=free, device="cpu",
                   precision=a.precision)
    t = time.perf_counter()
    rec.update(recipe=r.describe(), autocast=res.card.training["autocast"], steps=res.steps,
               train_minutes=round(res.minutes, 2),
               candidate=[score(res.path, ph) for ph in tests], eval_s=round(time.perf_counter() - t, 1))
    print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
