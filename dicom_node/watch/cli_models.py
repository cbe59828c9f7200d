"""CLI commands for the model registry: ``models`` (every version), ``models promote V``, ``models rollback``.

Promote and rollback are admin actions like approve/reject: recorded in the audit trail with the operating-
system user and this host; the serving processes switch at their next job, without a restart.
"""

from __future__ import annotations

import argparse
import json
import sys


def add_parsers(sub: argparse._SubParsersAction) -> None:
    m = sub.add_parser("models", help="the model registry: every version, which serves; promote or roll back")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=cmd_models)
    msub = m.add_subparsers(dest="models_command")
    p = msub.add_parser("promote", help="make a version the serving model (workers switch at their next job)")
    p.add_argument("version")
    p.add_argument("--reason", default="", help="why (kept in the audit trail)")
    p.set_defaults(func=cmd_promote)
    r = msub.add_parser("rollback", help="serve again the version that served before the current one")
    r.add_argument("--reason", default="", help="why (kept in the audit trail)")
    r.set_defaults(func=cmd_rollback)


def _open(args):
    from ..learn.registry import ensure_registered
    from .cli_base import open_db

    settings, db = open_db(args)
    ensure_registered(settings, db)  # a node that never started still lists (and can roll back to) its model
    return settings, db


def cmd_models(args) -> int:
    from storage import model_versions as mv

    from ..learn.registry import metrics_summary

    _, db = _open(args)
    rows = mv.as_dicts(mv.list_versions(db))
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    for r in rows:
        mark = "*" if r["state"] == "serving" else " "
        card = r["card"]
        print(f"{mark} {r['version']:<20} {r['state']:<9} sha256 {r['sha256'][:12]}  created {r['created_at']}"
              + (f"  parent {r['parent']}" if r["parent"] else "")
              + (f"  card {card['name']} {card['version']}" if card["name"] else ""))
        if r["promoted_at"]:
            print(f"    promoted {r['promoted_at']} by {r['promoted_by']}")
        if r["trained_on"] or r["held_out"]:
            print(f"    trained on corrections {_ids(r['trained_on'])}; held out {_ids(r['held_out'])}")
        summary = metrics_summary(r["metrics"])
        if summary:
            print(f"    {summary}")
    return 0


def _ids(ids: list[int]) -> str:
    return " ".join(map(str, ids)) or "-"


def cmd_promote(args) -> int:
    from storage.model_versions import RegistryError

    from ..learn import registry
    from .cli_base import cli_actor, cli_address

    settings, db = _open(args)
    try:
        old, new = registry.promote(settings, db, args.version, cli_actor(), cli_address(), args.reason)
    except RegistryError as exc:
        print(f"not promoted: {exc}", file=sys.stderr)
        return 1
    print(f"model {new} serves now (was {old or 'none'}); serve and workers switch at their next job")
    return 0


def cmd_rollback(args) -> int:
    from storage.model_versions import RegistryError

    from ..learn import registry
    from .cli_base import cli_actor, cli_address

    settings, db = _open(args)
    try:
        old, new = registry.rollback(settings, db, cli_actor(), cli_address(), args.reason)
    except RegistryError as exc:
        print(f"not rolled back: {exc}", file=sys.stderr)
        return 1
    print(f"model {new} serves again (was {old}); serve and workers switch at their next job")
    return 0
