"""The benchmark suite, once through on tiny data (`--smoke`): it must keep working, so it runs here.

It measures nothing worth keeping: one repetition each on a busy test machine. The figures are
in BENCHMARKS.md, written by `make bench`.
"""

import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIGURES = ["nbs --help, whole process", "import nbs_lib, whole process", "nbs execute against papermill, whole process (3 cells)",
           "nbs execute against papermill, the floor",
           "forced pipeline, default data (569 rows)",
           "grid of 4 candidates on 2 cores", "tracking cost per task", "execution time per cell (200 trivial cells)",
           "execution time per cell (200 trivial cells), the floor", "no-op build, whole process",
           "forced pipeline, 1,000 generated rows", "serving throughput, 1 record per request",
           "serving throughput, 100 records per request", "nbs status, whole process", "nbs models, whole process",
           "nbs runs, whole process", "nbs lineage, whole process",
           "nbs promote, whole process", "nbs rollback, whole process", "nbs schedule list, whole process",
           "nbs features, whole process", "nbs monitor, the 600-prediction log, whole process",
           "nbs predict, the 114-row holdout, whole process", "nbs predict, 1,000 CSV rows to CSV, whole process",
           "MLflow's client ready on the embedded store, whole process",
           "MLflow's client ready and skops imported, whole process",
           *[f"{name}, warm worker, whole process" for name in (
               "nbs status", "nbs models", "nbs runs", "nbs lineage", "nbs promote", "nbs rollback", "nbs schedule list",
               "nbs features", "nbs monitor, the 600-prediction log", "nbs predict, the 114-row holdout")],
           "task start-up under an orchestrator, cold", "task start-up under an orchestrator, warm worker",
           "task start-up under an orchestrator, tracking server, cold",
           "task start-up under an orchestrator, tracking server, warm worker",
           "nbs serve, ready (GET /ready 200) after the start",
           "nbs serve, ready (GET /ready 200) after the start, warm worker"]


@pytest.mark.build
def test_the_benchmark_suite_runs_and_writes_every_figure(tmp_path):
    page = tmp_path / "BENCHMARKS.md"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--smoke", "--output", str(page)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = {}
    for line in page.read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 8 and cells[5].endswith("x"):
            rows.setdefault(cells[0], []).append(float(cells[5].rstrip("x")))
    assert set(rows) == set(FIGURES), sorted(rows)
    for name, ratios in rows.items():
        assert all(math.isfinite(r) and r > 0 for r in ratios), (name, ratios)
    assert "--smoke" in page.read_text() and "Machine: " in page.read_text()
