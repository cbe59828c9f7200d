"""Accuracy from the radiologists' corrections on the dashboard and in ``/metrics``: the control charts'
geometry (drawn as inline SVG by ``templates/control_chart.html``, like the other charts: nothing fetched from
the internet, no script) and the Prometheus families.

The numbers come from ``learn.accuracy.accuracy_summary``; this module only lays them out.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric

from ..learn.accuracy import STRUCTURES

#: Most corrections one page or ``/api/corrections`` call lists.
RECENT_CORRECTIONS, MAX_CORRECTIONS = 200, 2000


@dataclass(frozen=True)
class ChartPoint:
    x: float
    y: float
    correction: int
    dice: float
    received: str
    outside: str


@dataclass(frozen=True)
class Line:
    """A horizontal line across the plot (mean, control limit, floor) with its label."""

    y: float
    value: float
    label: str
    kind: str


@dataclass(frozen=True)
class ControlChart:
    """One structure's control chart in SVG user units: Dice per correction in arrival order, the rolling
    median, the baseline mean, the ±2σ limits and the floor."""

    structure: str
    model_version: str
    width: int
    height: int
    left: int
    top_value: float
    bottom_value: float
    points: list[ChartPoint]
    rolling: str  # polyline points "x,y x,y ..."
    lines: list[Line]
    n_outside: int


def control_chart(model_version: str, stats: dict[str, Any], floor: float, width: int = 560,
                  height: int = 170) -> ControlChart:
    """The geometry of one structure's chart from its ``StructureStats.as_dict()``. The y axis runs from a
    tenth below the lowest thing drawn up to 1.0, so that a tight cluster of good results is not a flat line."""
    left, pad = 40, 8
    pts = stats["points"]
    lim = stats["limits"]
    lows = [p["dice"] for p in pts] + [floor] + ([lim["lower"]] if lim else [])
    bottom = max(0.0, math.floor(min(lows) * 10) / 10 - 0.05)
    bottom = round(bottom, 2)
    top = 1.0
    plot_w, plot_h = width - left - pad, height - 2 * pad

    def y_of(v: float) -> float:
        v = min(max(v, bottom), top)
        return pad + plot_h * (top - v) / (top - bottom)

    def x_of(i: int) -> float:
        return left + (plot_w / 2 if len(pts) == 1 else plot_w * i / (len(pts) - 1))

    points = [ChartPoint(x=x_of(i), y=y_of(p["dice"]), correction=p["correction"], dice=p["dice"],
                         received=p["received"], outside=p["outside"]) for i, p in enumerate(pts)]
    rolling = " ".join(f"{x_of(i):.1f},{y_of(p['rolling']):.1f}" for i, p in enumerate(pts))
    lines = [Line(y=y_of(floor), value=floor, label=f"floor {floor:.2f}", kind="floor")]
    if lim:
        tag = " (provisional)" if lim["provisional"] else ""
        lines += [Line(y=y_of(lim["mean"]), value=lim["mean"], label=f"mean {lim['mean']:.3f}{tag}", kind="mean"),
                  Line(y=y_of(lim["upper"]), value=lim["upper"], label=f"+2σ {lim['upper']:.3f}", kind="limit"),
                  Line(y=y_of(lim["lower"]), value=lim["lower"], label=f"−2σ {lim['lower']:.3f}", kind="limit")]
    return ControlChart(structure=stats["structure"], model_version=model_version, width=width, height=height,
                        left=left, top_value=top, bottom_value=bottom, points=points, rolling=rolling, lines=lines,
                        n_outside=stats["n_outside"])


def control_charts(summary: dict[str, Any]) -> dict[str, list[ControlChart]]:
    """Per model version, one chart per bone (the sides are in the table, not charted)."""
    return {v["model_version"]: [control_chart(v["model_version"], v["structures"][bone], summary["floor"])
                                 for bone in STRUCTURES if bone in v["structures"]]
            for v in summary["versions"]}


def accuracy_metrics(summary: dict[str, Any]) -> Iterator[Metric]:
    """Corrections by state, and per model version and structure the Dice median, count and points outside
    the control limits; for the serving version the rolling median and whether a drop is open."""
    c = GaugeMetricFamily("dicomnode_corrections", "Corrections received, by state (unchanged = unverified)",
                          labels=["state"])
    for state, n in summary["states"].items():
        c.add_metric([state], n)
    yield c
    med = GaugeMetricFamily("dicomnode_correction_dice_median",
                            "Median Dice of the sent result against the radiologist's correction",
                            labels=["structure", "model_version"])
    cnt = GaugeMetricFamily("dicomnode_correction_dice_count", "Corrected results measured (Dice)",
                            labels=["structure", "model_version"])
    out = GaugeMetricFamily("dicomnode_correction_dice_outside_limits",
                            "Corrections whose Dice lies outside the baseline's ±2σ control limits",
                            labels=["structure", "model_version"])
    rolling = GaugeMetricFamily("dicomnode_correction_dice_rolling",
                                "Rolling median Dice of the serving model (newest learning.accuracy_window)",
                                labels=["structure"])
    for v in summary["versions"]:
        for key, st in v["structures"].items():
            med.add_metric([key, v["model_version"]], st["median"])
            cnt.add_metric([key, v["model_version"]], st["count"])
            out.add_metric([key, v["model_version"]], st["n_outside"])
            if v["serving"]:
                rolling.add_metric([key], st["rolling_median"])
    yield from (med, cnt, out, rolling)
    yield GaugeMetricFamily("dicomnode_correction_dice_floor", "learning.accuracy_floor", value=summary["floor"])
    drop = GaugeMetricFamily("dicomnode_accuracy_drop",
                             "1 while the serving model's rolling median Dice of a bone is below the floor (notified)",
                             labels=["structure"])
    dropped = {d["structure"] for d in summary["open_drops"] if d["model_version"] == summary["serving_version"]}
    for bone in STRUCTURES:
        drop.add_metric([bone], 1 if bone in dropped else 0)
    yield drop
