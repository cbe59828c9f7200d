"""The benchmark command runs end to end on tiny inputs (a smoke run; benchmarks themselves are not tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_smoke(tmp_path):
    r = subprocess.run([sys.executable, "bench/run.py", "--smoke", "--out", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    (res,) = [json.loads(p.read_text()) for p in tmp_path.glob("*.json")]
    assert {"ingest", "send", "inference", "seg", "end_to_end", "machine"} <= set(res)
    assert res["inference"]["cpu"]["gflop_per_slice"] > 10
    assert "fraction of floor" in r.stdout and "node/dcmtk" in r.stdout
