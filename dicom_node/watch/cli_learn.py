"""``dicom-node learn``: one learning round now, in this process (never in the node's listener or worker)."""

from __future__ import annotations

import argparse
import json
import logging
import sys


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("learn", help="one learning round now: fine-tune a candidate on the radiologists' corrections, "
                                     "evaluate it against the serving model on the held-out ones")
    p.add_argument("--json", action="store_true", help="the round's summary as JSON on stdout")
    p.add_argument("--promote", action="store_true",
                   help="make the candidate the serving model if it wins (also: [learning] auto_promote)")
    p.add_argument("--minutes", type=float, default=None, help="fine-tune budget (default: [learning] minutes)")
    p.add_argument("--max-steps", type=int, default=0,
                   help="train exactly this many steps instead of for --minutes (the same weights on every run)")
    p.set_defaults(func=cmd_learn)


def _print_summary(s: dict) -> None:
    names = sorted(set(s["dice"]["serving"]) | set(s["dice"]["candidate"]))
    print(f"learning round: {s['serving_version']} (serving) vs {s['candidate_version']} (candidate)")
    print(f"  trained on {s['trained_on_count']} corrections, evaluated on {s['held_out_count']} held out "
          f"(hold-out version {s['hold_out_version']}); {s['steps']} steps in {s['train_minutes']} min, "
          f"round {s['minutes']} min")
    print(f"  {'structure':<10} {'serving':>8} {'candidate':>9}")
    for n in names:
        sv, cv = s["dice"]["serving"].get(n), s["dice"]["candidate"].get(n)
        print(f"  {n:<10} {sv if sv is not None else '-':>8} {cv if cv is not None else '-':>9}")
    print(f"  {'mean':<10} {s['mean_dice']['serving']:>8} {s['mean_dice']['candidate']:>9}")
    g = s["gate"]
    print(f"  gate: {g['caught']} of {g['held_out_below_0_70']} held-out results under Dice 0.70 held "
          f"({g['missed']} missed)")
    if "good_held" in g:
        print(f"  gate: {g['good_held']['candidate']} of {g['good']['candidate']} right results (every structure "
              f">= 0.85) held for review with the candidate, {g['good_held']['serving']} of {g['good']['serving']} "
              "with the serving model" + (f" (held by: {'; '.join(g['held_by'])})" if g["held_by"] else ""))
    for k in s["skipped"]:
        print(f"  left out: correction {k['correction']}: {k['reason']}")
    print(f"  decision: {s['decision']}")


def cmd_learn(args) -> int:
    from ..learn.registry import RegistryError
    from ..learn.rounds import RoundError, run_round
    from .cli_base import cli_actor, cli_address, open_db

    settings, db = open_db(args)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    try:
        summary = run_round(settings, db, promote=args.promote, minutes=args.minutes, max_steps=args.max_steps,
                            actor=cli_actor(), address=cli_address())
    except (RoundError, RegistryError) as exc:
        if args.json:
            print(json.dumps({"error": str(exc)}))
        print(f"learn: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        _print_summary(summary)
    return 0
