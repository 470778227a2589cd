"""Pipeline benchmarks: a forced `nbs run` against the same notebooks as one plain Python process
(default data, then generated data of growing size), the no-op `nbs run` against `ploomber build`,
and the grid of candidates with two tasks at once against one."""

from __future__ import annotations

import contextlib
import io
import statistics
import warnings
from collections.abc import Callable
from pathlib import Path

from common import BIN, Figure, run_process, spread

NBS = str(BIN / "nbs")


def build_order(project: Path) -> list[str]:
    "The executed notebooks of `project`'s last build, in an order that runs every task after its upstream."
    import os

    from nbs_lib.pipeline.dag import load_dag

    here = Path.cwd()
    os.chdir(project)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")  # Ploomber's render warnings, already shown by the build
            dag = load_dag(project)
        return [str(project / "products" / "executed" / f"{name}.ipynb") for name in dag]
    finally:
        os.chdir(here)


def forced_build(project: Path, env: dict, params: list[str]) -> tuple[float, int]:
    "One `nbs run --force` from an empty Optuna study (a forced build would resume the last one)."
    (project / "products" / "tune" / "study.db").unlink(missing_ok=True)
    return run_process([NBS, "run", "--force", *[f"-p{p}" for p in params]], project, env)


def plain_run(project: Path, env: dict, notebooks: list[str]) -> tuple[float, int]:
    "The same notebooks' code as one plain Python process, from an empty study too."
    (project / "products" / "tune" / "study.db").unlink(missing_ok=True)
    return run_process([str(BIN / "python"), str(Path(__file__).with_name("plain.py")), *notebooks], project, env)


def pipeline_vs_plain(project: Path, env: dict, repeat: int, params: list[str], name: str, target: str,
                      after_build: Callable[[], None] | None = None) -> tuple[Figure, list[int], list[int]]:
    "Forced builds and plain runs, alternated `repeat` times (`after_build` called after each build); the figure and the peak MiB of each."
    built, plain, built_mib, plain_mib = [], [], [], []
    for index in range(repeat):
        seconds, mib = forced_build(project, env, params)
        built.append(seconds)
        built_mib.append(mib)
        if after_build:
            after_build()
        if index == 0:  # the build just run wrote the executed notebooks the plain runs read
            notebooks = build_order(project)
        seconds, mib = plain_run(project, env, notebooks)
        plain.append(seconds)
        plain_mib.append(mib)
    figure = Figure(name, "nbs run --force (every task its own kernel, tracked)",
                    "the notebooks' code in one python process, untracked", built, plain, target=target)
    return figure, built_mib, plain_mib


def write_dataset(path: Path, rows: int, seed: int = 0) -> Path:
    "A generated classification table of `rows` rows, 20 numeric features and a binary target, as Parquet."
    import pandas as pd
    from sklearn.datasets import make_classification

    features, target = make_classification(n_samples=rows, n_features=20, n_informative=8, random_state=seed)
    frame = pd.DataFrame(features.astype("float32"), columns=[f"x{i:02d}" for i in range(20)])
    frame["target"] = target
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(path, index=False)
    return path


LARGE_GRID = [{"model": ["logistic_regression"], "model_params": [{"C": 1.0}]}]
# --smoke's grid: two quick candidates, so that the grid benchmark still runs two tasks side by side
SMOKE_GRID = [{"model": ["logistic_regression"], "model_params": [{"C": 1.0}, {"C": 0.1}]}]


def use_light_grid(project: Path, grid: list[dict] = LARGE_GRID) -> None:
    "`grid` (one logistic regression) instead of the default grid: forests on 1,000,000 rows take hours."
    import yaml

    spec = project / "pipeline.yaml"
    pipeline = yaml.safe_load(spec.read_text())
    for task in pipeline["tasks"]:
        if "grid" in task:
            task["grid"] = grid
    spec.write_text(yaml.safe_dump(pipeline, sort_keys=False))


def large_data(project: Path, env: dict, sizes: list[int]) -> Figure:
    "The pipeline against the plain process on the largest generated table; how the build's time grows with rows."
    use_light_grid(project)
    params = ["tune_trials=2", "cv_folds=2", "tune_timeout=0"]
    largest, seconds = max(sizes), {}
    for rows in sorted(sizes)[:-1]:  # smaller tables: the build alone, for the growth
        data = write_dataset(project / "bench-data" / f"rows-{rows}.parquet", rows)
        seconds[rows] = forced_build(project, env, [*params, f"data_path={data}"])[0]
    data = write_dataset(project / "bench-data" / f"rows-{largest}.parquet", largest)
    figure, built_mib, plain_mib = pipeline_vs_plain(project, env, 1, [*params, f"data_path={data}"],
                                                     f"forced pipeline, {largest:,} generated rows", "<= 1.1x")
    seconds[largest] = figure.values[0]
    figure.notes.append(f"peak memory of the largest process: nbs {max(built_mib)} MiB, plain {max(plain_mib)} MiB")
    figure.notes.append("one candidate (logistic regression), 2 folds, 2 tuning trials: forests on a million "
                        "rows would take hours; the same settings on both sides")
    for rows in sorted(seconds)[:-1]:
        growth = seconds[largest] / seconds[rows]
        figure.notes.append(f"nbs run: {seconds[rows]:.1f} s at {rows:,} rows, {seconds[largest]:.1f} s at "
                            f"{largest:,}: {growth:.2f}x the time for {largest / rows:.0f}x the rows (linear within "
                            f"20% allows up to {1.2 * largest / rows:.0f}x)")
    return figure


def ploomber_noop(project: Path, env: dict, repeat: int) -> list[float]:
    "`ploomber build` with everything up to date, after the full build that makes it so."
    # Ploomber's own state differs from ours (nbs pins the library's and the data's digests as
    # parameters), so its first build runs every task; what is timed is the ones after. That
    # first build is also the warm-up of every later benchmark: store created, caches warm.
    run_process([str(BIN / "ploomber"), "build"], project, env)
    return [run_process([str(BIN / "ploomber"), "build"], project, env)[0] for _ in range(repeat)]


def noop(project: Path, env: dict, repeat: int, ploomber_seconds: list[float]) -> Figure:
    "`nbs run` with everything up to date against `ploomber build` with everything up to date."
    run_process([NBS, "run"], project, env)  # whatever the last benchmark left out of date
    ours = [run_process([NBS, "run"], project, env)[0] for _ in range(repeat)]
    return Figure("no-op build, whole process", "nbs run, all up to date", "ploomber build, all up to date",
                  ours, ploomber_seconds, absolute_target=1.0, target="<= 1.0 s")


def grid_span(project: Path) -> float:
    "Seconds from the first task's start to the last task's end in `project`'s latest build."
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project}/mlflow.db")
    experiment = client.get_experiment_by_name("nbs").experiment_id
    build, = client.search_runs([experiment], "tags.`nbs.kind` = 'pipeline'",
                                order_by=["attributes.start_time DESC"], max_results=1)
    tasks = client.search_runs([experiment], f"tags.`nbs.pipeline_run_id` = '{build.info.run_id}'")
    return (max(t.info.end_time for t in tasks) - min(t.info.start_time for t in tasks)) / 1000


def grid(project: Path, env: dict, repeat: int) -> Figure:
    "The grid's candidates (train-0..3) forced with two tasks at once against one at a time."
    run_process([NBS, "run"], project, env)
    serial, parallel, whole = [], [], {1: [], 2: []}
    for _ in range(repeat):
        for jobs, into in ((1, serial), (2, parallel)):
            seconds, _ = run_process([NBS, "run", "--force", "--only", "train-[0-9]*", "-p", f"jobs={jobs}"],
                                     project, env)
            whole[jobs].append(seconds)
            into.append(grid_span(project))
    figure = Figure("grid of 4 candidates on 2 cores", "one at a time (jobs=1): first task's start to last "
                    "task's end, as the speed-up's numerator", "two at once (jobs=2), the same span", serial,
                    parallel, target=">= 1.7x", higher_is_better=True)
    figure.notes.append(f"the whole `nbs run --only 'train-[0-9]*' --force` process: {spread(whole[1])} s with "
                        f"jobs=1, {spread(whole[2])} s with jobs=2 "
                        f"({statistics.median(whole[1]) / statistics.median(whole[2]):.2f}x; loading the DAG and "
                        "opening the build's run take the same time either way)")
    return figure
