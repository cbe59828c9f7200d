"""CLI commands for the model: ``phantoms``, ``train`` and ``evaluate``."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("phantoms", help="write synthetic lower-limb MRI phantoms in the training layout")
    p.add_argument("--out", type=Path, required=True, help="dataset folder to create")
    p.add_argument("--cases", type=int, default=10)
    p.add_argument("--seed", type=int, default=0, help="seed of the first case (case i uses seed+i)")
    p.add_argument("--wide", action="store_true",
                   help="geometry (FOV, pixel spacing, slice thickness, position, rotation) wider than training")
    p.add_argument("--harsh", action="store_true", help="--wide, and body size, noise and bias field wider too")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--family", choices=["classic", "randomized", "foreign"], default="classic",
                   help="classic: inference.phantom; randomized: the domain-randomised training generator; "
                        "foreign: a differently built test-only family (inference.synth)")
    p.set_defaults(func=cmd_phantoms)

    t = sub.add_parser("train", help="train a segmentation model on DICOM/NIfTI cases with NIfTI masks")
    t.add_argument("--data", type=Path, required=True, help="dataset folder (see README: training layout)")
    t.add_argument("--out", type=Path, required=True, help="output folder for checkpoints and history")
    t.add_argument("--encoder", default="resnet34")
    t.add_argument("--encoder-weights", type=Path, help="local file with pretrained encoder weights (never downloaded)")
    t.add_argument("--input-size", type=int, default=256)
    t.add_argument("--crop-size", type=int, default=0, help="train on random crops (0: whole slices)")
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--lr", type=float, default=1e-4)
    t.add_argument("--lr-decay", type=float, default=0.98, help="multiplicative learning-rate decay per epoch")
    t.add_argument("--epochs", type=int, default=100)
    t.add_argument("--steps-per-epoch", type=int, default=0, help="0: one pass over the training slices")
    t.add_argument("--patience", type=int, default=10, help="early stopping on validation loss")
    t.add_argument("--folds", type=int, default=1, help="k for k-fold; the number of cases for leave-one-out")
    t.add_argument("--fold", default="0", help="which fold to train, or 'all'")
    t.add_argument("--val-fraction", type=float, default=0.2, help="hold-out fraction when --folds is 1")
    t.add_argument("--seed", type=int, default=42)
    t.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    t.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default)")
    t.add_argument("--half", action="store_true", help="store the best weights in float16 (half the size)")
    t.add_argument("--version", default="0.1.0")
    t.add_argument("--trained-on", default="", help="what the model was trained on, for the model card")
    t.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    t.add_argument("--init-from", type=Path, help="start from this checkpoint's weights (fine-tuning)")
    t.add_argument("--aug-scale", default="0.6,1.6", help="range of random zoom, e.g. 0.6,1.6")
    t.add_argument("--aug-rotation", type=float, default=15.0, help="largest random in-plane rotation (degrees)")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="Dice and volume error of a model on labelled cases")
    e.add_argument("--model", type=Path, help="checkpoint (default: the node's configured model)")
    e.add_argument("--data", type=Path, required=True)
    e.add_argument("--out", type=Path, required=True)
    e.add_argument("--device", default="auto")
    e.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="arithmetic of the network (auto: as the node would run it on this machine)")
    e.add_argument("--no-png", action="store_true")
    e.add_argument("--single-pass", action="store_true",
                   help="score the plain pass alone (default: the mean of it and the test-time-augmented pass, "
                        "as the node sends results with quality.tta = true)")
    e.set_defaults(func=cmd_evaluate)


def cmd_phantoms(args: argparse.Namespace) -> int:
    if args.family != "classic":
        from inference.synth.cases import write_family

        names = write_family(args.family, args.out, args.cases, seed=args.seed)
        print(f"wrote {len(names)} {args.family} cases to {args.out}")
        return 0
    from inference.phantom_io import generate_dataset
    names = generate_dataset(args.out, args.cases, seed=args.seed, wide=args.wide, workers=args.workers,
                             harsh=args.harsh)
    print(f"wrote {len(names)} cases to {args.out}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from inference.training import TrainConfig, train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    folds = range(args.folds) if args.fold == "all" else [int(args.fold)]
    for fold in folds:
        out = args.out / f"fold{fold}" if args.fold == "all" else args.out
        cfg = TrainConfig(
            data=args.data, out=out, encoder=args.encoder, input_size=args.input_size, crop_size=args.crop_size,
            batch_size=args.batch_size, lr=args.lr, lr_decay=args.lr_decay, epochs=args.epochs,
            steps_per_epoch=args.steps_per_epoch, patience=args.patience, folds=args.folds, fold=fold,
            val_fraction=args.val_fraction, seed=args.seed, device=args.device, encoder_weights=args.encoder_weights,
            half=args.half, version=args.version, trained_on=args.trained_on, resume=args.resume, threads=args.threads,
            init_from=args.init_from, aug_scale=tuple(float(v) for v in args.aug_scale.split(",")),  # type: ignore[arg-type]
            aug_rotation_deg=args.aug_rotation,
        )
        best = train(cfg)
        print(f"best checkpoint: {best}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from inference.evaluate import evaluate

    model = args.model
    if model is None:
        from dicom_node.config import load_settings

        model = load_settings(args.config).model_path  # the configured model, else the bundled one
    report = evaluate(model, args.data, args.out, device=args.device, png=not args.no_png,
                      precision=args.precision, passes=1 if args.single_pass else 2)
    print((args.out / "evaluation.md").read_text())
    print(json.dumps(report["summary"]["mean"]))
    return 0
