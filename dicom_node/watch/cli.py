"""``dicom-node``: the command line for running, watching and feeding the node, and for its model."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sqlalchemy.exc import DBAPIError

from inference.dataset import DatasetError
from inference.model_card import ModelCardError
from storage.states import JobState, OutboxState, ReviewDecision, Verdict

from ..config import ConfigError, load_settings
from ..errors import database_reason
from . import cli_corrections, cli_learn, cli_model, cli_models
from .cli_base import cli_actor, cli_address


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dicom-node", description=__doc__)
    p.add_argument("-c", "--config", type=Path, default=None,
                   help="node.toml (default: $DICOM_NODE_CONFIG, else ./node.toml if present, else built-in defaults)")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the node: DICOM listener, completion scan, worker")
    s.set_defaults(func=cmd_serve)

    w = sub.add_parser("worker", help="run only the job loop (scale-out workers sharing the database)")
    w.set_defaults(func=cmd_worker)

    sd = sub.add_parser("sender", help="run only the outbox's sender loop (delivery to the destinations)")
    sd.set_defaults(func=cmd_sender)

    dl = sub.add_parser("deliveries", help="list deliveries (the outbox) and destinations; --requeue sends again")
    dl.add_argument("--state", choices=list(OutboxState))
    dl.add_argument("--destination")
    dl.add_argument("--job", type=int)
    dl.add_argument("-n", "--limit", type=int, default=50)
    dl.add_argument("--requeue", nargs="*", type=int, metavar="ID",
                    help="send these deliveries again now (no ID: every failed one, within --destination/--job)")
    dl.add_argument("--json", action="store_true")
    dl.set_defaults(func=cmd_deliveries)

    sh = sub.add_parser("show", help="a study's or job's timeline, reasons, volumes and files")
    sh.add_argument("what", help="job number, Study/Series Instance UID, or accession number")
    sh.set_defaults(func=cmd_show)

    rt = sub.add_parser("retry", help="queue a failed or skipped job again (attempts reset)")
    rt.add_argument("jobs", nargs="+", type=int)
    rt.set_defaults(func=cmd_retry)

    rq = sub.add_parser("requeue", help="queue jobs again in bulk")
    rq.add_argument("--failed", action="store_true", required=True, help="every failed job")
    rq.set_defaults(func=cmd_requeue)

    st = sub.add_parser("status", help="counts of series and jobs by state")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_status)

    j = sub.add_parser("jobs", help="recent jobs with stage durations, errors and skip reasons")
    j.add_argument("-n", "--limit", type=int, default=20)
    j.add_argument("--state", help="only jobs in this state")
    j.add_argument("--json", action="store_true")
    j.set_defaults(func=cmd_jobs)

    ap = sub.add_parser("approve", help="send a result held for review (quality gate) to its destinations")
    ap.add_argument("job", type=int)
    ap.add_argument("--reason", default="", help="why (kept with the review)")
    ap.set_defaults(func=cmd_review, decision=ReviewDecision.APPROVED)

    rj = sub.add_parser("reject", help="never send a result held for review (quality gate)")
    rj.add_argument("job", type=int)
    rj.add_argument("--reason", default="", help="why (kept with the review)")
    rj.set_defaults(func=cmd_review, decision=ReviewDecision.REJECTED)

    bk = sub.add_parser("backup", help="copy the database and the data folder into a new folder (safe while the "
                                       "node runs; restore by copying it to the new node.data_dir)")
    bk.add_argument("dest", type=Path, help="a new or empty folder outside the data folder")
    bk.set_defaults(func=cmd_backup)

    se = sub.add_parser("send", help="send a folder (or files) of DICOM to an AE")
    se.add_argument("paths", nargs="+", type=Path)
    se.add_argument("--host", default="127.0.0.1")
    se.add_argument("--port", type=int, required=True)
    se.add_argument("--aet", default="SEGNODE", help="called AE title")
    se.add_argument("--calling", default="DICOMNODE", help="our (calling) AE title")
    se.set_defaults(func=cmd_send)

    e = sub.add_parser("echo", help="C-ECHO an AE (default: this node's listener)")
    e.add_argument("--host", default="127.0.0.1")
    e.add_argument("--port", type=int)
    e.add_argument("--aet", help="called AE title (default: the node's)")
    e.add_argument("--calling", default="DICOMNODE")
    e.add_argument("--destination", metavar="NAME",
                   help="C-ECHO a configured destination as deliveries reach it (its host, port, AE title, TLS)")
    e.set_defaults(func=cmd_echo)

    cli_model.add_parsers(sub)
    cli_corrections.add_parsers(sub)
    cli_models.add_parsers(sub)
    cli_learn.add_parsers(sub)
    return p


def _settings(args):
    return load_settings(args.config)


def cmd_serve(args) -> int:
    from ..service import Node, setup_logging

    settings = _settings(args)
    setup_logging(settings)
    Node(settings).serve_forever()
    return 0


def cmd_worker(args) -> int:
    from ..service import run_worker, setup_logging

    settings = _settings(args)
    setup_logging(settings)
    run_worker(settings)
    return 0


def cmd_sender(args) -> int:
    from ..service import run_sender, setup_logging

    settings = _settings(args)
    setup_logging(settings)
    run_sender(settings)
    return 0


def cmd_deliveries(args) -> int:
    from storage import deliveries

    from .admin import destination_rows

    settings, db = _db(args)
    if args.requeue is not None:
        if args.requeue:
            done = deliveries.requeue(db, ids=args.requeue, failed_only=False)
        else:
            failed = deliveries.list_items(db, OutboxState.FAILED, args.destination, args.job, limit=100000)
            ids = [r["id"] for r in failed]
            done = deliveries.requeue(db, ids=ids) if ids else []
        print(f"{len(done)} deliveries queued again: {' '.join(map(str, done)) or '-'}")
        return 0 if not args.requeue or set(done) == set(args.requeue) else 1
    rows = deliveries.list_items(db, args.state, args.destination, args.job, args.limit)
    dests = destination_rows(db, settings)
    if args.json:
        print(json.dumps({"destinations": dests, "deliveries": rows}, indent=1))
        return 0
    for d in dests:
        print(f"destination {d['destination']}: {'up' if d['up'] else 'DOWN'} since {d['since'] or '-'}; "
              f"{d['waiting']} waiting (oldest {d['oldest_waiting_s']:.0f} s), {d['failed']} failed"
              + (f"; next try {d['next_try']}" if d["next_try"] else "")
              + (f" (probed every {d['probe_every_s']:g} s: sent as soon as it answers)" if d["probe_every_s"] else "")
              + (f"; last error: {d['last_error']}" if d["last_error"] else ""))
    for r in rows:
        print(f"#{r['id']:<5} job {r['job']:<5} {r['destination']:<12} {r['state']:<9} tries {r['attempts']:<3} "
              f"queued {r['created']}" + (f"  next {r['next_try']}" if r["next_try"] else "")
              + (f"  committed {r['committed']}" if r["committed"] else ""))
        if r["error"]:
            print(f"       {r['error']}")
    if not rows:
        print("no deliveries")
    return 0


def cmd_retry(args) -> int:
    from storage.jobs import requeue

    _, db = _db(args)
    done = requeue(db, job_ids=args.jobs, actor=cli_actor(), address=cli_address(), action="retry")
    for j in args.jobs:
        print(f"job {j}: {'queued again' if j in done else 'not requeued (running, or no such job)'}")
    return 0 if set(done) == set(args.jobs) else 1


def cmd_requeue(args) -> int:
    from storage.jobs import requeue

    _, db = _db(args)
    done = requeue(db, failed=True, actor=cli_actor(), address=cli_address(), action="requeue")
    print(f"{len(done)} failed jobs queued again")
    return 0


def cmd_review(args) -> int:
    """Approve or reject a held job; recorded with the OS user and this host (who and where from)."""
    import getpass
    import socket

    from storage.review import decide_review

    _, db = _db(args)
    try:
        who = getpass.getuser()
    except Exception:  # no user name in the environment (a container): say so rather than guess
        who = "unknown"
    ok = decide_review(db, args.job, args.decision, f"{who} (cli)", socket.gethostname(), args.reason)
    if not ok:
        print(f"job {args.job} is not waiting for review (see: dicom-node show {args.job})", file=sys.stderr)
        return 1
    sent = " (queued to send)" if args.decision == ReviewDecision.APPROVED else " (never sent)"
    print(f"job {args.job}: {args.decision}{sent}")
    return 0


def cmd_backup(args) -> int:
    from .backup import BackupError, backup

    settings = _settings(args)
    try:
        report = backup(settings, args.dest)
    except BackupError as exc:
        print(f"backup failed: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # the folder cannot be made, the disk filled up, a file cannot be read
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"backup failed: {exc.strerror or exc}{where}; whatever was copied to {args.dest} is incomplete: "
              "remove it and run the backup again", file=sys.stderr)
        return 1
    print(f"{report.database}; {report.files} files ({report.bytes / 1e6:.1f} MB) copied to {args.dest}")
    return 0


def cmd_show(args) -> int:
    from .admin import show

    settings, db = _db(args)
    text = show(db, args.what, settings.data_dir)
    if text is None:
        print(f"nothing found for {args.what!r} (a job number, Study/Series Instance UID or accession number)",
              file=sys.stderr)
        return 1
    print(text)
    return 0


def _db(args):
    from ..service import open_storage

    settings = _settings(args)
    return settings, open_storage(settings)[0]


def cmd_status(args) -> int:
    from storage.jobs import counts

    settings, db = _db(args)
    c = counts(db)
    if args.json:
        print(json.dumps(c))
        return 0
    print(f"database: {db.url}")
    print(f"studies: {c['totals']['studies']}   instances: {c['totals']['instances']}")
    print("series: " + ("  ".join(f"{k} {v}" for k, v in sorted(c["series"].items())) or "none"))
    print("jobs:   " + ("  ".join(f"{k} {v}" for k, v in sorted(c["jobs"].items())) or "none"))
    return 0


def cmd_jobs(args) -> int:
    from .admin import job_rows

    settings, db = _db(args)
    rows = job_rows(db, args.limit, args.state)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    if not rows:
        print("no jobs yet")
        return 0
    for r in rows:
        stages = " ".join(f"{k}={v:.2f}s" for k, v in r["stages_s"].items())
        print(f"#{r['job']:<5} {r['state']:<10} {r['modality']:<3} {r['instances']:>4} img  "
              f"{(r['series'] or '')[:28]:<28} {r['created']}  total={r['total_s']}s attempts={r['attempts']}"
              + (f" (review wait {r['review_wait_s']}s)" if r["review_wait_s"] is not None else ""))
        if stages:
            print(f"       stages: {stages}")
        if r["volumes_cm3"]:
            print("       volumes: " + ", ".join(f"{k.lower()} {v} cm³" for k, v in r["volumes_cm3"].items()))
        if r["quality"]:
            bad = [f"{q['structure'].lower()} {q['verdict']}" for q in r["quality_checks"]
                   if q["verdict"] != Verdict.PASS]
            print(f"       quality: {r['quality']}" + (f" ({', '.join(bad)})" if bad else ""))
        if r["review"]:
            rv = r["review"]
            print(f"       review: {rv['decision']} by {rv['by']} at {rv['at']}"
                  + (f": {rv['note']}" if rv["note"] else ""))
        if r["reason"]:
            explained = (JobState.SKIPPED, JobState.REVIEW, JobState.DROPPED, JobState.REJECTED)
            label = ("held" if r["state"] == JobState.REVIEW else r["state"]) if r["state"] in explained else "error"
            print(f"       {label}: {r['reason']}")
        for d in r["deliveries"]:
            print(f"       sent to {d['destination']} (try {d['attempt']}): ok" if d["ok"] else
                  f"       try {d['attempt']} to {d['destination']} failed: {d['error']}")
        for o in r.get("outbox", []):
            print(f"       delivery to {o['destination']}: {o['state']}" + (f" ({o['error']})" if o["error"] else ""))
    return 0


def cmd_send(args) -> int:
    from ..deliver.dimse import dicom_files, send_items

    files = []
    for p in args.paths:
        if p.is_dir():
            files += dicom_files(p)
        elif p.is_file():
            files.append(p)
        else:
            print(f"error: {p} does not exist", file=sys.stderr)
            return 2
    if not files:
        print("error: no DICOM files found in the given paths", file=sys.stderr)
        return 2
    res = send_items(args.host, args.port, args.aet, [str(f) for f in files], calling=args.calling)
    print(f"sent {res.sent} of {len(files)} files to {args.aet}@{args.host}:{args.port}")
    for name, why in res.failed[:20]:
        print(f"  failed: {name}: {why}", file=sys.stderr)
    return 0 if res.ok else 1


def cmd_echo(args) -> int:
    from ..deliver.dimse import echo

    if args.destination:
        from ..tls import client_context, server_name

        settings = _settings(args)
        dest = next((d for d in settings.destinations if d.name == args.destination), None)
        if dest is None:
            print(f"no destination named {args.destination!r} (configured: "
                  f"{', '.join(d.name for d in settings.destinations) or 'none'})", file=sys.stderr)
            return 2
        tls = (client_context(dest), server_name(dest)) if dest.tls else None
        ok, msg = echo(dest.host, dest.port, dest.ae_title, dest.calling_ae_title or settings.scp.ae_title, tls=tls)
        print(f"C-ECHO {dest.ae_title}@{dest.host}:{dest.port}{' (DICOM TLS)' if tls else ''}: "
              f"{'ok' if ok else 'FAILED'} ({msg})")
        return 0 if ok else 1
    if args.port is None or args.aet is None:
        settings = _settings(args)
        args.port = args.port or settings.scp.port
        args.aet = args.aet or settings.scp.ae_title
    ok, msg = echo(args.host, args.port, args.aet, args.calling)
    print(f"C-ECHO {args.aet}@{args.host}:{args.port}: {'ok' if ok else 'FAILED'} ({msg})")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    except ModelCardError as exc:
        print(f"model error: {exc} (set inference.model_path to a checkpoint made by 'dicom-node train')",
              file=sys.stderr)
        return 2
    except DatasetError as exc:
        print(f"dataset error: {exc}", file=sys.stderr)
        return 2
    except DBAPIError as exc:  # the database failed under a command (gone, or its disk full): its first line
        print(f"database error: {database_reason(exc)} (node.database_url; for SQLite, the data folder's disk)",
              file=sys.stderr)
        return 1
    except OSError as exc:  # a folder that cannot be made or read (phantoms --out, send, evaluate --out, ...)
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
