"""The admin dashboard, its JSON API, Prometheus ``/metrics`` and ``/healthz`` (FastAPI, served by uvicorn
inside ``dicom-node serve``).

Bound to localhost by default; on any other address a token is required (``web.token``), given as a
``Authorization: Bearer`` header or once as ``?token=`` (then kept in a cookie). Every request also passes
web_security.WebGuard (Host check, cross-site guard on every state-changing request, security headers), and
every admin action is written to the audit trail with who and from where. The page is rendered on the
server with inline SVG charts: nothing is fetched from the internet, which hospital networks block anyway.
"""

from __future__ import annotations

import datetime as dt
import hmac
import html
import ipaddress
import json
import shutil
import statistics
import threading
from pathlib import Path

from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from sqlalchemy import func, select

from storage import deliveries
from storage.db import Database
from storage.jobs import counts, requeue
from storage.models import Event, Job, utcnow
from storage.review import decide_review, quality_counts
from storage.timeline import audit_log

from .admin import job_rows
from .web_security import WebGuard
from ..config import Settings

STAGES = ("load", "preprocess", "predict", "tta", "postprocess", "quality", "encode", "send")
STATE_COLOURS = {"queued": "#6c757d", "running": "#0d6efd", "delivering": "#6610f2", "sending": "#6610f2",
                 "review": "#fd7e14", "done": "#198754", "failed": "#dc3545", "skipped": "#adb5bd",
                 "rejected": "#6f42c1", "dropped": "#495057"}
VERDICT_COLOURS = {"pass": "#198754", "warn": "#b8860b", "fail": "#dc3545"}


def is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return address == "localhost"


# ------------------------------------------------------------------------------------------- data
def job_timeline(db: Database, job_id: int) -> list[dict]:
    with db.session() as s:
        job = s.get(Job, job_id)
        if job is None:
            return []
        evs = s.scalars(select(Event).where(Event.series_id == job.series_id).order_by(Event.at, Event.id)).all()
        return [{"at": e.at.isoformat(timespec="milliseconds"), "kind": e.kind, "job": e.job_id, "detail": e.detail}
                for e in evs]


def hourly(db: Database, hours: int = 24) -> list[dict]:
    """Per hour over the last ``hours``: jobs finished, and the median/95th percentile job duration."""
    since = utcnow() - dt.timedelta(hours=hours)
    with db.session() as s:
        rows = s.execute(select(Job.finished_at, Job.started_at).where(Job.state == "done", Job.finished_at >= since)).all()
    buckets: dict[int, list[float]] = {h: [] for h in range(hours)}
    for fin, start in rows:
        h = int((fin - since).total_seconds() // 3600)
        if 0 <= h < hours and start:
            buckets[h].append((fin - start).total_seconds())
    out = []
    for h in range(hours):
        d = sorted(buckets[h])
        out.append({"hour": (since + dt.timedelta(hours=h)).strftime("%H:00"), "done": len(d),
                    "p50_s": statistics.median(d) if d else None,
                    "p95_s": d[min(len(d) - 1, int(round(0.95 * (len(d) - 1))))] if d else None})
    return out


def disk(settings: Settings) -> dict:
    u = shutil.disk_usage(settings.data_dir)
    incoming = settings.data_dir / "incoming"
    used = sum(p.stat().st_size for p in incoming.rglob("*.dcm")) if incoming.exists() else 0
    return {"total_bytes": u.total, "free_bytes": u.free, "stored_images_bytes": used,
            "floor_bytes": settings.scp.min_free_disk_mb * 1_000_000}


# ------------------------------------------------------------------------------------------- rendering
def svg_bars(values: list[float | None], labels: list[str], colour: str, unit: str, w: int = 560, h: int = 140) -> str:
    vals = [v or 0 for v in values]
    top = max(vals + [1e-9])
    bw = w / max(len(vals), 1)
    parts = [f'<svg viewBox="0 0 {w} {h + 20}" width="{w}" height="{h + 20}" role="img">']
    for i, (v, lab) in enumerate(zip(vals, labels)):
        bh = (h - 10) * v / top
        parts.append(f'<rect x="{i * bw + 1:.1f}" y="{h - bh:.1f}" width="{bw - 2:.1f}" height="{bh:.1f}" fill="{colour}">'
                     f'<title>{lab}: {v:.2f} {unit}</title></rect>')
        if i % 4 == 0:
            parts.append(f'<text x="{i * bw:.1f}" y="{h + 14}" font-size="10">{lab}</text>')
    parts.append(f'<text x="{w - 4}" y="10" font-size="10" text-anchor="end">max {top:.1f} {unit}</text></svg>')
    return "".join(parts)


PAGE = """<!doctype html><html><head><meta charset="utf-8"><meta name="csrf-token" content="{csrf}"><title>dicom-seg-node</title>
<style>body{{font-family:system-ui,sans-serif;margin:1.5em;color:#222}} table{{border-collapse:collapse;width:100%}}
td,th{{border-bottom:1px solid #ddd;padding:3px 6px;font-size:13px;text-align:left;vertical-align:top}}
.card{{display:inline-block;padding:8px 14px;margin:0 8px 8px 0;border-radius:6px;color:#fff;min-width:80px}}
.n{{font-size:22px;font-weight:600}} h2{{margin-top:1.4em}} .err{{color:#b02a37}} button{{cursor:pointer}}</style>
</head><body><h1>dicom-seg-node <small style="font-size:14px;color:#666">{ae} · {now} UTC</small></h1>
{body}
<script>{script}</script></body></html>"""

#: The pages' only script (allowed by its hash in the Content-Security-Policy, web_security.py). Buttons carry
#: data-retry="<job>" and send the page's CSRF token; no inline event handlers (the policy forbids them).
SCRIPT = """
document.documentElement.dataset.script = 'ran';  // lets a test see that the policy let it run
const csrf = document.querySelector('meta[name=csrf-token]').content;
async function retry(id) {
  const r = await fetch('api/jobs/' + id + '/retry', {method: 'POST', credentials: 'same-origin',
                                                      headers: {'X-CSRF-Token': csrf}});
  document.getElementById('r' + id).textContent = r.ok ? 'queued again' : 'retry refused';
}
document.querySelectorAll('button[data-retry]').forEach(b => b.addEventListener('click', () => retry(b.dataset.retry)));
setTimeout(() => location.reload(), 15000);
"""


def esc(v) -> str:
    return html.escape(str(v if v is not None else ""))


def render_dashboard(settings: Settings, db: Database, csrf: str = "") -> str:
    c = counts(db)
    cards = "".join(f'<div class="card" style="background:{STATE_COLOURS.get(k, "#444")}" id="state-{k}">'
                    f'<div class="n">{c["jobs"].get(k, 0)}</div>{k}</div>' for k in STATE_COLOURS)
    jobs = job_rows(db, 30)
    rows = []
    for j in jobs:
        stages = " ".join(f"{k} {j['stages_s'][k]:.2f}s" for k in STAGES if k in j["stages_s"])
        vols = ", ".join(f"{k.lower()} {v}" for k, v in j["volumes_cm3"].items())
        total = "" if j["total_s"] is None else f"{j['total_s']:.1f}s"
        rows.append(f'<tr class="job" data-state="{j["state"]}"><td><a href="jobs/{j["job"]}">#{j["job"]}</a></td>'
                    f'<td style="color:{STATE_COLOURS.get(j["state"], "#000")}">{esc(j["state"])}</td>'
                    f'<td class="quality" style="color:{VERDICT_COLOURS.get(j["quality"], "#000")}">{esc(j["quality"])}</td>'
                    f'<td>{esc(j["series"])}<br><small>{esc(j["modality"])} · {j["instances"]} images</small></td>'
                    f'<td>{esc(j["created"])}</td><td>{total}</td>'
                    f'<td><small>{esc(stages)}</small></td><td><small>{esc(vols)}</small></td>'
                    f'<td class="err"><small>{esc(j["reason"])}</small></td></tr>')
    failed = [j for j in job_rows(db, 20, "failed")]
    fail_rows = "".join(f'<tr><td><a href="jobs/{j["job"]}">#{j["job"]}</a></td><td class="err">{esc(j["reason"])}</td>'
                        f'<td><button data-retry="{j["job"]}">retry</button> <span id="r{j["job"]}"></span></td></tr>'
                        for j in failed) or "<tr><td>none</td></tr>"
    hr = hourly(db)
    d = disk(settings)
    dest_rows = "".join(
        f'<tr class="destination" data-up="{str(x["up"]).lower()}"><td>{esc(x["destination"])}</td>'
        f'<td style="color:{"#198754" if x["up"] else "#dc3545"}">{"up" if x["up"] else "DOWN"}</td>'
        f'<td>{esc(x["since"] or "-")}</td><td>{x["waiting"]}</td><td>{_age(x["oldest_waiting_s"])}</td>'
        f'<td>{x["failed"]}</td><td>{esc(x["next_try"] or "")}</td><td class="err"><small>{esc(x["last_error"])}</small></td></tr>'
        for x in deliveries.destination_summary(db, [dd.name for dd in settings.destinations])) \
        or "<tr><td>no destination configured</td></tr>"
    body = (f"<h2>Queue</h2>{cards}"
            f"<h2>Destinations</h2><table id='destinations'><tr><th>destination</th><th>state</th><th>since</th>"
            f"<th>waiting</th><th>oldest waiting</th><th>failed</th><th>next try</th><th>last error</th></tr>"
            f"{dest_rows}</table>"
            f'<p>studies {c["totals"]["studies"]} · images {c["totals"]["instances"]} · '
            f'disk free {d["free_bytes"] / 1e9:.1f} of {d["total_bytes"] / 1e9:.1f} GB · stored images '
            f'{d["stored_images_bytes"] / 1e6:.1f} MB · refuses below {d["floor_bytes"] / 1e6:.0f} MB</p>'
            f"<h2>Failures</h2><table id='failures'>{fail_rows}</table>"
            f"<h2>Throughput (jobs done per hour, last 24 h)</h2>{svg_bars([h['done'] for h in hr], [h['hour'] for h in hr], '#198754', 'jobs')}"
            f"<h2>Latency (median job duration per hour)</h2>{svg_bars([h['p50_s'] for h in hr], [h['hour'] for h in hr], '#0d6efd', 's')}"
            f"<h2>Recent jobs</h2><table id='jobs'><tr><th>job</th><th>state</th><th>quality</th><th>series</th><th>created</th>"
            f"<th>total</th><th>stages</th><th>volumes cm³</th><th>reason</th></tr>{''.join(rows)}</table>")
    return PAGE.format(ae=esc(settings.scp.ae_title), now=utcnow().strftime("%Y-%m-%d %H:%M"), body=body,
                       csrf=esc(csrf), script=SCRIPT)


def render_job(settings: Settings, db: Database, job_id: int, csrf: str = "") -> str | None:
    rows = job_rows(db, 1, job_id=job_id)
    if not rows:
        return None
    j = rows[0]
    tl = "".join(f"<tr><td>{esc(e['at'])}</td><td>{esc(e['kind'])}</td><td>{esc(e['job'] or '')}</td><td>{esc(e['detail'])}</td></tr>"
                 for e in job_timeline(db, job_id))
    stages = "".join(f"<tr><td>{k}</td><td>{v:.3f} s</td></tr>" for k, v in j["stages_s"].items())
    vols = "".join(f"<tr><td>{k.lower()}</td><td>{v} cm³</td></tr>" for k, v in j["volumes_cm3"].items())
    dels = "".join(f"<tr><td>{esc(d['destination'])}</td><td>{d['attempt']}</td><td>{'ok' if d['ok'] else esc(d['error'])}</td></tr>"
                   for d in j["deliveries"])
    audit = "".join(f"<tr><td>{esc(a['at'])}</td><td>{esc(a['action'])}</td><td>{esc(a['outcome'])}</td>"
                    f"<td>{esc(a['actor'])}</td><td>{esc(a['address'])}</td><td>{esc(a['detail'])}</td></tr>"
                    for a in audit_log(db, job_id))
    preview = f'<img id="preview" src="{job_id}/preview.png" alt="segmentation preview" style="max-width:100%">' if j["has_result"] else ""
    body = (f'<p><a href="../">← dashboard</a></p><h2>Job #{job_id}: {esc(j["state"])}</h2>'
            f'<p>study {esc(j["study_uid"])} · series {esc(j["series"])} ({j["instances"]} images) · attempts {j["attempts"]}'
            f'{" · superseded by #" + str(j["superseded_by"]) if j["superseded_by"] else ""}</p>'
            f'<p class="err">{esc(j["reason"])}</p>{render_quality(j, job_id, csrf)}{preview}'
            f"<h2>Stages</h2><table>{stages}</table><h2>Volumes</h2><table>{vols}</table>"
            f"<h2>Deliveries</h2><table>{dels}</table><h2>Timeline</h2><table id='timeline'>{tl}</table>"
            f"<h2>Admin actions</h2><table id='audit'>{audit or '<tr><td>none</td></tr>'}</table>")
    return PAGE.format(ae=esc(settings.scp.ae_title), now=utcnow().strftime("%Y-%m-%d %H:%M"), body=body,
                       csrf=esc(csrf), script=SCRIPT)


def render_quality(j: dict, job_id: int, csrf: str = "") -> str:
    """The quality gate's verdict per structure, a preview of each structure, and, for a held job, the
    Approve and Reject forms (plain POST forms; the CSRF token rides in the action URL, see web_security)."""
    if not j["quality"]:
        return ""
    rows = []
    for q in j["quality_checks"]:
        m = ", ".join(f"{k} {v}" for k, v in q["metrics"].items())
        rows.append(f'<tr class="qc" data-verdict="{esc(q["verdict"])}"><td>{esc(q["structure"].lower())}</td>'
                    f'<td style="color:{VERDICT_COLOURS.get(q["verdict"], "#000")}">{esc(q["verdict"])}</td>'
                    f'<td>{esc(q["reason"])}</td><td><small>{esc(m)}</small></td></tr>')
    tiles = "".join(
        f'<figure style="display:inline-block;margin:4px"><img class="structure-preview" loading="lazy" '
        f'src="{job_id}/preview.png?structure={esc(q["structure"])}" alt="{esc(q["structure"].lower())}" '
        f'style="max-height:220px"><figcaption>{esc(q["structure"].lower())} · {esc(q["verdict"])}</figcaption></figure>'
        for q in j["quality_checks"] if j["has_result"] and q["metrics"].get("volume_cm3") is not None)
    review = ""
    if j["state"] == "review":
        review = (f'<div id="review" style="border:2px solid #fd7e14;padding:8px;margin:8px 0">'
                  f'<b>Held for review</b>: the result failed the quality checks and has not been sent.'
                  f'<form method="post" action="{job_id}/approve?csrf_token={esc(csrf)}" style="margin-top:6px">'
                  f'<input name="reviewer" placeholder="your name" required> '
                  f'<input name="reason" placeholder="note (optional)" size="40"> '
                  f'<button type="submit" id="approve">Approve and send</button></form>'
                  f'<form method="post" action="{job_id}/reject?csrf_token={esc(csrf)}" style="margin-top:6px">'
                  f'<input name="reviewer" placeholder="your name" required> '
                  f'<input name="reason" placeholder="why (optional)" size="40"> '
                  f'<button type="submit" id="reject">Reject (never send)</button></form></div>')
    elif j["review"]:
        r = j["review"]
        review = (f'<p id="review">{esc(r["decision"])} by {esc(r["by"])} from {esc(r["from"])} at {esc(r["at"])}'
                  f'{": " + esc(r["note"]) if r["note"] else ""}</p>')
    return (f'<h2>Quality: <span style="color:{VERDICT_COLOURS.get(j["quality"], "#000")}" id="verdict">'
            f'{esc(j["quality"])}</span></h2>{review}<table id="quality"><tr><th>structure</th><th>verdict</th>'
            f'<th>why</th><th>measures</th></tr>{"".join(rows)}</table><div id="structure-previews">{tiles}</div>')


def preview_png(db: Database, job_id: int, n: int = 4, structure: str | None = None) -> bytes | None:
    """A few source slices with the SEG overlaid, like the published work's GUI (cached beside the SEG).

    ``structure`` (a segment name such as "TIBIA LEFT"): three slices through that structure, only it
    drawn. The name only selects one of the SEG's own segments; the cache file is named by the segment's
    number, so a request's text never becomes part of a path."""
    import io

    import highdicom as hd
    import numpy as np
    import pydicom
    from PIL import Image

    from inference.labels import DEFAULT_LABELS
    from storage.models import Instance

    with db.session() as s:
        job = s.get(Job, job_id)
        if job is None or not job.seg_path or not Path(job.seg_path).is_file():
            return None
        seg_path = job.seg_path
        paths = {i.sop_uid: i.path for i in s.scalars(select(Instance).where(Instance.series_id == job.series_id))}
    seg = hd.seg.segread(seg_path)
    colour = {lab.snomed_code: lab.rgb for lab in DEFAULT_LABELS}
    seg_rgb = {int(d.SegmentNumber): colour.get(d.SegmentedPropertyTypeCodeSequence[0].CodeValue, (255, 255, 0))
               for d in seg.SegmentSequence}
    cache = Path(seg_path).with_name(f"preview_{job_id}.png")
    if structure is not None:
        words = structure.strip().lower().split()
        label = " ".join(words[1:] + words[:1])  # "TIBIA LEFT" -> "left tibia", the SEG's segment label
        number = next((int(d.SegmentNumber) for d in seg.SegmentSequence
                       if str(d.SegmentLabel).lower() == label), None)
        if number is None:
            return None
        seg_rgb = {number: seg_rgb[number]}
        cache = Path(seg_path).with_name(f"preview_{job_id}_s{number}.png")
        n = 3
    if cache.is_file():
        return cache.read_bytes()
    uids = [u for u in dict.fromkeys(r[2] for r in seg.get_source_image_uids()) if paths.get(u)]
    if not uids:
        return None
    labels = seg.get_pixels_by_source_instance(uids, combine_segments=True, skip_overlap_checks=True)
    if structure is not None:
        labels = np.where(labels == next(iter(seg_rgb)), labels, 0)
    counts = (labels > 0).reshape(len(uids), -1).sum(1)
    if structure is not None:  # slices spread along the structure, not only its widest ones
        has = np.nonzero(counts)[0]
        picks = sorted({int(has[int(round(f * (len(has) - 1)))]) for f in (0.2, 0.5, 0.8)}) if len(has) else []
    else:
        picks = sorted(np.argsort(counts)[::-1][:n])
    if not picks:
        return None
    tiles = []
    for k in picks:
        img = pydicom.dcmread(paths[uids[k]]).pixel_array.astype(np.float32)
        g = np.clip(img / (np.percentile(img, 99.5) or 1) * 255, 0, 255)
        rgb = np.stack([g] * 3, -1)
        for num, c in seg_rgb.items():
            m = labels[k] == num
            rgb[m] = 0.5 * rgb[m] + 0.5 * np.asarray(c, np.float32)
        tiles.append(rgb.astype(np.uint8))
    buf = io.BytesIO()
    Image.fromarray(np.concatenate(tiles, 1)).save(buf, format="PNG")
    cache.write_bytes(buf.getvalue())
    return buf.getvalue()


def _age(seconds: float) -> str:
    if not seconds:
        return "-"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


# ------------------------------------------------------------------------------------------- metrics
class NodeCollector:
    """Prometheus metrics read from the database at scrape time (so every worker's work is counted) plus the
    listener's C-STORE counters."""

    def __init__(self, settings: Settings, db: Database, scp_stats: dict | None, record_backlog=lambda: 0):
        self.settings, self.db, self.scp_stats = settings, db, scp_stats
        self.record_backlog = record_backlog

    def collect(self):
        c = counts(self.db)
        g = GaugeMetricFamily("dicomnode_jobs", "Jobs by state", labels=["state"])
        for st in STATE_COLOURS:
            g.add_metric([st], c["jobs"].get(st, 0))
        yield g
        g = GaugeMetricFamily("dicomnode_series", "Series by state", labels=["state"])
        for st, n in c["series"].items():
            g.add_metric([st], n)
        yield g
        yield GaugeMetricFamily("dicomnode_instances", "Stored instances", value=c["totals"]["instances"])
        yield GaugeMetricFamily("dicomnode_unrecorded_instances",
                                "Instances on disk whose database row is not committed yet (normally 0)",
                                value=self.record_backlog())
        yield GaugeMetricFamily("dicomnode_disk_free_bytes", "Free disk in the data folder",
                                value=shutil.disk_usage(self.settings.data_dir).free)
        with self.db.session() as s:
            timings = s.scalars(select(Job.timings).where(Job.state == "done")).all()
            oldest = s.scalar(select(func.min(Job.created_at)).where(Job.state == "queued"))
        sums = CounterMetricFamily("dicomnode_stage_seconds", "Seconds spent per stage in done jobs", labels=["stage"])
        for st in STAGES:
            sums.add_metric([st], sum(json.loads(t or "{}").get(st, 0.0) for t in timings))
        yield sums
        qc = CounterMetricFamily("dicomnode_quality", "Jobs judged by the quality gate, by verdict",
                                 labels=["verdict"])
        judged = quality_counts(self.db)
        for v in ("pass", "warn", "fail"):
            qc.add_metric([v], judged.get(v, 0))
        yield qc
        yield GaugeMetricFamily("dicomnode_review_waiting", "Results held for review (quality gate)",
                                value=c["jobs"].get("review", 0))
        yield GaugeMetricFamily("dicomnode_oldest_queued_age_seconds", "Age of the oldest queued job",
                                value=(utcnow() - oldest).total_seconds() if oldest else 0.0)
        dests = deliveries.destination_summary(self.db, [d.name for d in self.settings.destinations])
        up = GaugeMetricFamily("dicomnode_destination_up", "1 while the destination answers, 0 while it is down",
                               labels=["destination"])
        waiting = GaugeMetricFamily("dicomnode_deliveries_waiting",
                                    "Deliveries not yet sent (or not yet committed) per destination",
                                    labels=["destination"])
        oldest_w = GaugeMetricFamily("dicomnode_oldest_waiting_delivery_age_seconds",
                                     "Age of the oldest delivery still waiting, per destination", labels=["destination"])
        failed = GaugeMetricFamily("dicomnode_deliveries_failed", "Deliveries given up (dead letter) per destination",
                                   labels=["destination"])
        for d in dests:
            up.add_metric([d["destination"]], 1 if d["up"] else 0)
            waiting.add_metric([d["destination"]], d["waiting"])
            oldest_w.add_metric([d["destination"]], d["oldest_waiting_s"])
            failed.add_metric([d["destination"]], d["failed"])
        yield from (up, waiting, oldest_w, failed)
        if self.scp_stats is not None:
            cs = CounterMetricFamily("dicomnode_cstore", "C-STORE requests handled", labels=["result"])
            for k, v in self.scp_stats.items():
                cs.add_metric([k], v)
            yield cs


# ------------------------------------------------------------------------------------------- app
def create_app(settings: Settings, db: Database, scp_stats: dict | None = None, scp_alive=lambda: True,
               record_backlog=lambda: 0) -> FastAPI:
    # The OpenAPI page and schema are routes of our own below, so that they sit behind the token like the rest.
    app = FastAPI(title="dicom-seg-node", docs_url=None, redoc_url=None, openapi_url=None)
    token = settings.web.token
    guard = WebGuard(settings, scripts=(SCRIPT,))
    registry = CollectorRegistry()
    registry.register(NodeCollector(settings, db, scp_stats, record_backlog))

    def auth(request: Request) -> None:
        if not token:
            return
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip() \
            or request.query_params.get("token") or request.cookies.get("dicomnode_token") or ""
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise HTTPException(401, "token required (web.token)")

    @app.middleware("http")
    async def keep_token(request: Request, call_next):
        response = await call_next(request)
        if token and request.query_params.get("token") == token:
            response.set_cookie("dicomnode_token", token, httponly=True, samesite="strict")
        return response

    guard.install(app)  # added last, so it runs first: Host check, cross-site refusal, security headers

    def who(request: Request) -> tuple[str, str]:
        """(actor, address) for the audit trail: there are no user accounts, so what authenticated, and where."""
        actor = "web (token)" if token else "web (loopback, no token)"
        return actor, request.client.host if request.client else ""

    @app.get("/api/openapi.json", dependencies=[Depends(auth)], include_in_schema=False)
    def openapi():
        return app.openapi()

    @app.get("/api/docs", dependencies=[Depends(auth)], include_in_schema=False)
    def docs():
        return get_swagger_ui_html(openapi_url="openapi.json", title="dicom-seg-node API")

    @app.get("/healthz")
    def healthz():
        ok_db = True
        try:
            counts(db)
        except Exception:
            ok_db = False
        free = shutil.disk_usage(settings.data_dir).free
        body = {"status": "ok", "database": ok_db, "listener": bool(scp_alive()),
                "disk_free_mb": round(free / 1e6), "disk_floor_mb": settings.scp.min_free_disk_mb,
                "unrecorded_instances": record_backlog()}
        healthy = ok_db and body["listener"] and free / 1e6 >= settings.scp.min_free_disk_mb
        body["status"] = "ok" if healthy else "degraded"
        return JSONResponse(body, status_code=200 if healthy else 503)

    @app.get("/metrics", dependencies=[Depends(auth)])
    def metrics():
        return Response(generate_latest(registry), media_type="text/plain; version=0.0.4")

    @app.get("/", response_class=HTMLResponse, dependencies=[Depends(auth)])
    def dashboard():
        return render_dashboard(settings, db, guard.csrf_token)

    @app.get("/jobs/{job_id}", response_class=HTMLResponse, dependencies=[Depends(auth)])
    def job_page(job_id: int):
        page = render_job(settings, db, job_id, guard.csrf_token)
        if page is None:
            raise HTTPException(404, "no such job")
        return page

    @app.get("/jobs/{job_id}/preview.png", dependencies=[Depends(auth)])
    def preview(job_id: int, structure: str | None = None):
        png = preview_png(db, job_id, structure=structure)
        if png is None:
            raise HTTPException(404, "no result to preview")
        return Response(png, media_type="image/png")

    @app.get("/api/status", dependencies=[Depends(auth)])
    def api_status():
        return {**counts(db), "disk": disk(settings)}

    @app.get("/api/destinations", dependencies=[Depends(auth)])
    def api_destinations():
        return deliveries.destination_summary(db, [d.name for d in settings.destinations])

    @app.get("/api/deliveries", dependencies=[Depends(auth)])
    def api_deliveries(state: str | None = None, destination: str | None = None, limit: int = 100):
        return deliveries.list_items(db, state, destination, limit=min(limit, 1000))

    @app.get("/api/jobs", dependencies=[Depends(auth)])
    def api_jobs(limit: int = 50, state: str | None = None):
        return job_rows(db, min(limit, 1000), state)

    @app.get("/api/jobs/{job_id}", dependencies=[Depends(auth)])
    def api_job(job_id: int):
        rows = job_rows(db, 1, job_id=job_id)
        if not rows:
            raise HTTPException(404, "no such job")
        return {**rows[0], "timeline": job_timeline(db, job_id)}

    @app.post("/api/jobs/{job_id}/retry", dependencies=[Depends(auth)])
    def api_retry(job_id: int, request: Request):
        actor, address = who(request)
        done = requeue(db, job_ids=[job_id], actor=actor, address=address, action="retry")
        if job_id not in done:
            raise HTTPException(409, "job is running or does not exist")
        return {"job": job_id, "state": job_rows(db, 1, job_id=job_id)[0]["state"]}

    @app.get("/api/audit", dependencies=[Depends(auth)])
    def api_audit(limit: int = 200, job: int | None = None):
        """The admin audit trail, newest first: who did what, from where, when, and how it ended."""
        return audit_log(db, job, min(limit, 5000))

    def reviewer(request: Request, given: str) -> tuple[str, str]:
        """Who decided and from where: the name typed (or sent), how they were let in, the client address."""
        how = "web token" if token else "dashboard on loopback"
        name = " ".join(str(given or "").split())[:64] or "unnamed"
        return f"{name} ({how})", request.client.host if request.client else ""

    async def review_fields(request: Request) -> dict:
        """The form (application/x-www-form-urlencoded) or JSON body of an approve/reject request."""
        from urllib.parse import parse_qs

        body = await request.body()
        if request.headers.get("content-type", "").startswith("application/json"):
            try:
                data = json.loads(body or b"{}")
            except ValueError:
                raise HTTPException(400, "body is not valid JSON") from None
            return data if isinstance(data, dict) else {}
        return {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace")).items()}

    def review(request: Request, job_id: int, decision: str, fields: dict) -> dict:
        who, address = reviewer(request, fields.get("reviewer", ""))
        if not decide_review(db, job_id, decision, who, address, str(fields.get("reason", ""))[:2000]):
            raise HTTPException(409, "job is not waiting for review")
        return {"job": job_id, "review": decision, "state": "queued" if decision == "approved" else "rejected",
                "by": who}

    @app.post("/api/jobs/{job_id}/approve", dependencies=[Depends(auth)])
    async def api_approve(job_id: int, request: Request):
        return review(request, job_id, "approved", await review_fields(request))

    @app.post("/api/jobs/{job_id}/reject", dependencies=[Depends(auth)])
    async def api_reject(job_id: int, request: Request):
        return review(request, job_id, "rejected", await review_fields(request))

    @app.post("/jobs/{job_id}/approve", dependencies=[Depends(auth)])
    async def form_approve(job_id: int, request: Request):
        review(request, job_id, "approved", await review_fields(request))
        return RedirectResponse(f"../{job_id}", status_code=303)

    @app.post("/jobs/{job_id}/reject", dependencies=[Depends(auth)])
    async def form_reject(job_id: int, request: Request):
        review(request, job_id, "rejected", await review_fields(request))
        return RedirectResponse(f"../{job_id}", status_code=303)

    @app.get("/api/throughput", dependencies=[Depends(auth)])
    def api_throughput(hours: int = 24):
        return hourly(db, min(hours, 24 * 14))

    return app


class WebServer:
    """uvicorn in a background thread of the serve process."""

    def __init__(self, app: FastAPI, host: str, port: int):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, daemon=True, name="web")

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
