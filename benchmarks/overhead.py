"""Fixed costs: what tracking adds to a task, what executing adds to a notebook cell, and how long
the command line takes to start."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from common import BIN, Figure, run_process


def tracking_per_task(project: Path, repeat: int) -> Figure:
    "The bookkeeping nbs does for one task against the same records made with MLflow's own API."
    import mlflow

    from nbs_lib.core.tracking import (
        finish_run,
        log_metrics,
        open_store,
        start_pipeline_run,
        start_task_run,
    )
    from nbs_lib.pipeline.recording import copy_metrics_to_parent, log_notebook

    notebook = project / "products" / "executed" / "evaluate.ipynb"  # a real one: tables and three plots
    uri = f"sqlite:///{project}/tracking-bench.db"
    client = open_store(uri)
    os.environ["MLFLOW_TRACKING_URI"] = uri
    params = {"target": "target", "seed": 42, "selection_metric": "roc_auc"}
    metrics = {f"metric_{i}": i / 10 for i in range(8)}
    parent = start_pipeline_run(client, "bench-tracking", ["evaluate"], params, project)
    ours, theirs = [], []
    mlflow.set_experiment("bench-tracking-mlflow")
    for _ in range(repeat + 1):  # the first of each is a warm-up
        started = time.perf_counter()
        run_id = start_task_run(client, parent, "evaluate", "notebooks/pipeline/50_evaluate.ipynb", params, project)
        os.environ["NBS_RUN_ID"] = run_id
        log_metrics(metrics)
        del os.environ["NBS_RUN_ID"]
        log_notebook(client, run_id, notebook)
        copy_metrics_to_parent(client, run_id, parent, "evaluate")
        finish_run(client, run_id, "FINISHED")
        ours.append((time.perf_counter() - started) * 1000)
        started = time.perf_counter()
        with mlflow.start_run():
            mlflow.log_params(params)
            mlflow.log_metrics(metrics)
            mlflow.log_artifact(str(notebook), "notebook")
        theirs.append((time.perf_counter() - started) * 1000)
    finish_run(client, parent, "FINISHED")
    return Figure("tracking cost per task", "nbs: task run, params, lineage tags, metrics, notebook + HTML, "
                  "metrics to the build's run", "mlflow: run, params, metrics, notebook", ours[1:], theirs[1:],
                  unit="ms", target="<= 150 ms", absolute_target=150.0)


def cell_notebook(path: Path, cells: int) -> Path:
    "A notebook of `cells` trivial code cells."
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(f"x = {i}") for i in range(cells)]
    nbformat.write(nb, path)
    return path


def cell_span_ms(nb: dict) -> float:
    "Milliseconds per cell from the first cell's start to the last cell's reply, by the kernel's own clock."
    from datetime import datetime

    def stamp(cell: dict, key: str) -> datetime:
        return datetime.fromisoformat(cell["metadata"]["execution"][key].replace("Z", "+00:00"))

    cells = [c for c in nb["cells"] if c["cell_type"] == "code"]
    elapsed = stamp(cells[-1], "shell.execute_reply") - stamp(cells[0], "iopub.status.busy")
    return elapsed.total_seconds() * 1000 / (len(cells) - 1)


def per_cell(repeat: int, cells: int = 200) -> list[Figure]:
    "Milliseconds per trivial cell, kernel start left out: the nbs engine and bare nbclient against papermill's default."
    import nbformat
    import papermill
    from nbclient import NotebookClient

    def papermill_ms(source: Path, engine: str | None) -> float:
        executed = papermill.execute_notebook(str(source), str(source.with_suffix(".out.ipynb")),
                                              engine_name=engine, progress_bar=False)
        return cell_span_ms(executed)

    def nbclient_ms(source: Path) -> float:
        nb = nbformat.read(source, as_version=4)
        NotebookClient(nb, kernel_name="python3").execute()
        return cell_span_ms(nb)

    runners = {"papermill": lambda s: papermill_ms(s, None), "nbs": lambda s: papermill_ms(s, "nbs"),
               "nbclient": nbclient_ms}
    per_cell_ms: dict[str, list[float]] = {name: [] for name in runners}
    with tempfile.TemporaryDirectory() as scratch:
        source = cell_notebook(Path(scratch) / "cells.ipynb", cells)
        for _ in range(repeat):
            for name, runner in runners.items():
                per_cell_ms[name].append(runner(source))
    return [
        Figure(f"execution time per cell ({cells} trivial cells)", "nbs engine (one compact save per cell, "
               "papermill's format at the end)", "papermill's default engine (validated, indented saves, two "
               "per cell)", per_cell_ms["nbs"], per_cell_ms["papermill"], unit="ms", target="<= 10 ms",
               absolute_target=10.0,
               notes=["first cell's start to last cell's reply by the kernel's clock, over the cells: the "
                      "kernel's start is left out; the cells' own work (`x = i`) is nil"]),
        Figure(f"execution time per cell ({cells} trivial cells), the floor", "nbclient alone (no saving, no "
               "papermill metadata)", "papermill's default engine", per_cell_ms["nbclient"],
               per_cell_ms["papermill"], unit="ms"),
    ]


def startup(repeat: int) -> list[Figure]:
    "Whole-process time of `nbs --help` and `import nbs_lib` against a bare `python -c pass`."
    python, here = str(BIN / "python"), Path.cwd()
    bare = [run_process([python, "-c", "pass"], here)[0] for _ in range(repeat)]
    helps = [run_process([str(BIN / "nbs"), "--help"], here)[0] for _ in range(repeat)]
    imports = [run_process([python, "-c", "import nbs_lib"], here)[0] for _ in range(repeat)]
    return [Figure("nbs --help, whole process", "nbs --help", "python -c pass", helps, bare,
                   target="<= 0.3 s", absolute_target=0.3),
            Figure("import nbs_lib, whole process", "python -c 'import nbs_lib'", "python -c pass", imports, bare,
                   target="<= 0.3 s", absolute_target=0.3)]


def execute_vs_papermill(repeat: int, env: dict) -> list[Figure]:
    """Whole-process time of `nbs execute` (tracking included) and of `papermill` on the same 3-cell notebook,
    and the floor under the first: MLflow's client made ready on the same store, nothing executed."""
    nbs, papermill, python = str(BIN / "nbs"), str(BIN / "papermill"), str(BIN / "python")
    times = {"nbs": [], "papermill": [], "mlflow": []}
    with tempfile.TemporaryDirectory() as scratch:
        here = Path(scratch)
        cell_notebook(here / "three.ipynb", 3)
        uri = f"sqlite:///{here}/mlflow.db"
        env = {**env, "MLFLOW_TRACKING_URI": uri}
        client_ready = (f"from mlflow import MlflowClient; MlflowClient({uri!r}).search_experiments(max_results=1); "
                        "import gc; gc.freeze()")  # no last collection at exit, as nbs does
        run_process([nbs, "execute", "three.ipynb", "warm.ipynb"], here, env)  # creates the store: not timed
        for _ in range(repeat):  # interleaved, so a noisy moment costs all alike
            times["papermill"].append(run_process([papermill, "three.ipynb", "pm.ipynb", "--no-progress-bar"], here,
                                                  env)[0])
            times["nbs"].append(run_process([nbs, "execute", "three.ipynb", "nbs.ipynb"], here, env)[0])
            times["mlflow"].append(run_process([python, "-c", client_ready], here, env)[0])
    return [Figure("nbs execute against papermill, whole process (3 cells)", "nbs execute IN OUT: an execution "
                   "run and an attempt run in MLflow, the notebook and its HTML logged", "papermill IN OUT",
                   times["nbs"], times["papermill"], target="<= 1.3x",
                   notes=["both start a kernel and execute the same notebook; the store exists beforehand, "
                          "as after a project's first run"]),
            Figure("nbs execute against papermill, the floor", "MLflow's client ready on the same store, whole "
                   "process (import, open, one query; no last collection at exit, as nbs), nothing executed", "papermill IN OUT", times["mlflow"],
                   times["papermill"],
                   notes=["whatever records a run in MLflow's embedded store pays this before its first record; "
                          "`nbs execute` can hide papermill's work under it, not go below it"])]
