"""Task start-up under an orchestrator: an orchestrator runs each task as its own `nbs task run` process, one after
the other; what counts is the time from one task's end to the next one's first cell, against `nbs run`'s between
the same two tasks. Measured with no orchestrator in between (Airflow's own share, about 1 s from a task's end to
the next one's command, is in tests/test_team.py's DAG runs), cold and with the warm worker (`nbs warm`), on the
embedded store and on a tracking server, where an orchestrator's tasks record their runs."""

from __future__ import annotations

import contextlib
import json
import subprocess
import tempfile
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

from common import BIN, Figure, run_process
from serve import free_port, start, stop

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


@contextlib.contextmanager
def tracking_server(folder: Path) -> Iterator[str]:
    "An MLflow tracking server on 127.0.0.1 (SQLite store, artifacts proxied, both in `folder`), stopped after; its URI."
    port = free_port()
    server = start([str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{folder}/server.db",
                    "--serve-artifacts", "--artifacts-destination", (folder / "artifacts").as_uri(),
                    "--host", "127.0.0.1", "--port", str(port), "--workers", "1"], "/health", port, folder)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(server)


def _pipeline_run(project: Path, env: dict) -> str:
    begun = subprocess.run([NBS, "task", "begin"], cwd=project, env=env, capture_output=True, text=True, check=True)
    return begun.stdout.strip().splitlines()[-1]


def task_startup(project: Path, env: dict, repeat: int, in_builds: list[float]) -> list[Figure]:
    "The PAIR run as an orchestrator runs it, cold and from the warm worker, on the embedded store and on a tracking server, alternately, against `in_builds` (the gaps measured in forced `nbs run` builds)."
    gaps: dict[tuple[str, bool], list[float]] = {(store, warm): [] for store in ("embedded", "server")
                                                 for warm in (False, True)}
    with tempfile.TemporaryDirectory(prefix="nbs-warm-", dir="/tmp") as folder, tracking_server(Path(folder)) as uri:
        envs = {("embedded", False): {**env, "NBS_WARM": "0"},
                ("server", False): {**env, "NBS_WARM": "0", "MLFLOW_TRACKING_URI": uri}}
        for store in ("embedded", "server"):
            envs[store, True] = {**envs[store, False], "TMPDIR": folder, "NBS_WARM": "1"}
        # one worker serves both stores (the tracking URI is read per command); its imports are not timed
        run_process([NBS, "warm", "start"], project, envs["embedded", True])
        runs: dict[str, str] = {}
        try:
            for store in ("embedded", "server"):
                runs[store] = _pipeline_run(project, envs[store, False])
            for _ in range(repeat):
                for (store, warm), gap in gaps.items():
                    gap.append(_orchestrated(project, envs[store, warm], runs[store]))
        finally:
            for store, run_id in runs.items():
                subprocess.run([NBS, "task", "end", "--pipeline-run", run_id], cwd=project, env=envs[store, False],
                               capture_output=True)
            run_process([NBS, "warm", "stop"], project, envs["embedded", True])
    measured = (f"`nbs task run {PAIR[0]}`, then `nbs task run {PAIR[1]}` the moment it ends: {PAIR[0]}'s notebook "
                f"end to {PAIR[1]}'s first cell")
    baseline = "nbs run --force: the same span between the same tasks in one build"
    on_server = "; MLFLOW_TRACKING_URI a tracking server on 127.0.0.1 (`mlflow server`, SQLite, artifacts proxied)"
    return [Figure("task start-up under an orchestrator, cold", measured, baseline, gaps["embedded", False],
                   in_builds, notes=["each task a fresh process: imports, the DAG, MLflow's client, then the kernel"]),
            Figure("task start-up under an orchestrator, warm worker", f"{measured}; NBS_WARM=1 (nbs warm)",
                   baseline, gaps["embedded", True], in_builds, target="<= 3 s", absolute_target=3.0,
                   notes=["the worker started beforehand (`nbs warm start`), as a DAG's first task starts it; "
                          "each task forked from it: the DAG, MLflow's store and the kernel remain"]),
            Figure("task start-up under an orchestrator, tracking server, cold", measured + on_server, baseline,
                   gaps["server", False], in_builds,
                   notes=["MLflow's REST client on top of the embedded case: its request-header providers (Feast's "
                          "left out: it imported all of Feast, 6 s) and a request per run read or written"]),
            Figure("task start-up under an orchestrator, tracking server, warm worker",
                   f"{measured}; NBS_WARM=1 (nbs warm){on_server}", baseline, gaps["server", True], in_builds,
                   target="<= 3 s", absolute_target=3.0,
                   notes=["as an Airflow task on the team server runs, less Airflow's own second between tasks"])]
