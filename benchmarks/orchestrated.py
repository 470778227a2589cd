"""Task start-up under an orchestrator: an orchestrator runs each task as its own `nbs task run` process, one after
the other; what counts is the time from one task's end to the next one's first cell, against `nbs run`'s between
the same two tasks. Measured with no orchestrator in between (Airflow's own share, about 1 s from a task's end to
the next one's command, is in tests/test_team.py's DAG runs), cold and with the warm worker (`nbs warm`)."""

from __future__ import annotations

import json
import subprocess
import tempfile
from datetime import datetime
from pathlib import Path

from common import BIN, Figure, run_process

PAIR = ("ingest", "validate")  # the first two tasks: validate reads what ingest wrote
NBS = str(BIN / "nbs")


def _moment(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def first_cell_gap(project: Path, first: str, second: str) -> float:
    "Seconds from the end of `first`'s executed notebook to the start of `second`'s first cell, in the last build."
    executed = project / "products" / "executed"
    ended = json.loads((executed / f"{first}.ipynb").read_text())["metadata"]["papermill"]["end_time"]
    cells = json.loads((executed / f"{second}.ipynb").read_text())["cells"]
    began = next(c for c in cells if c["cell_type"] == "code")["metadata"]["papermill"]["start_time"]
    return _moment(began) - _moment(ended)


def _orchestrated(project: Path, env: dict, run_id: str) -> float:
    "The PAIR as two `nbs task run` processes, the second started the moment the first ends; the gap."
    for name in PAIR:
        run_process([NBS, "task", "run", name, "--pipeline-run", run_id], project, env)
    return first_cell_gap(project, *PAIR)


def task_startup(project: Path, env: dict, repeat: int, in_builds: list[float]) -> list[Figure]:
    "The PAIR run as an orchestrator runs it, cold and from the warm worker, alternately, against `in_builds` (the gaps measured in forced `nbs run` builds)."
    with tempfile.TemporaryDirectory(prefix="nbs-warm-", dir="/tmp") as folder:
        warm = {**env, "TMPDIR": folder, "NBS_WARM": "1"}
        cold = {**env, "NBS_WARM": "0"}
        run_process([NBS, "warm", "start"], project, warm)  # its imports are not timed: it outlives many tasks
        begun = subprocess.run([NBS, "task", "begin"], cwd=project, env=cold, capture_output=True, text=True,
                               check=True)
        run_id = begun.stdout.strip().splitlines()[-1]
        gaps: dict[str, list[float]] = {"cold": [], "warm": []}
        try:
            for _ in range(repeat):
                gaps["cold"].append(_orchestrated(project, cold, run_id))
                gaps["warm"].append(_orchestrated(project, warm, run_id))
        finally:
            subprocess.run([NBS, "task", "end", "--pipeline-run", run_id], cwd=project, env=cold, capture_output=True)
            run_process([NBS, "warm", "stop"], project, warm)
    measured = (f"`nbs task run {PAIR[0]}`, then `nbs task run {PAIR[1]}` the moment it ends: {PAIR[0]}'s notebook "
                f"end to {PAIR[1]}'s first cell")
    baseline = "nbs run --force: the same span between the same tasks in one build"
    return [Figure("task start-up under an orchestrator, cold", measured, baseline, gaps["cold"], in_builds,
                   notes=["each task a fresh process: imports, the DAG, MLflow's client, then the kernel"]),
            Figure("task start-up under an orchestrator, warm worker", f"{measured}; NBS_WARM=1 (nbs warm)",
                   baseline, gaps["warm"], in_builds, target="<= 3 s", absolute_target=3.0,
                   notes=["the worker started beforehand (`nbs warm start`), as a DAG's first task starts it; "
                          "each task forked from it: the DAG, MLflow's store and the kernel remain"])]
