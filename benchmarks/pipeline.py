"""Pipeline benchmarks: a forced `nbs run` against the same notebooks as one plain Python process
(default data, then generated data of growing size), the no-op `nbs run` against `ploomber build`,
and the grid of candidates with two tasks at once against one."""

from __future__ import annotations

import statistics
from pathlib import Path

from common import BIN, Figure, run_process, spread

NBS = str(BIN / "nbs")


def build_order(project: Path) -> list[str]:
    "The executed notebooks of `project`'s last build, in an order that runs every task after its upstream."
    import os

    from nbs_lib.cli import load_dag

    here = Path.cwd()
    os.chdir(project)
    try:
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


def pipeline_vs_plain(project: Path, env: dict, repeat: int, params: list[str], name: str,
                      target: str, warm_up: bool = True) -> tuple[Figure, list[int], list[int]]:
    "Forced builds and plain runs, alternated `repeat` times after a warm-up build; the figure and peak MiB."
    built, plain, built_mib, plain_mib = [], [], [], []
    first = forced_build(project, env, params)  # the executed notebooks the plain run reads
    if not warm_up:  # the first build counts: caches are cold, the store is new
        built.append(first[0])
        built_mib.append(first[1])
    notebooks = build_order(project)
    for index in range(repeat):
        if index or warm_up:
            seconds, mib = forced_build(project, env, params)
            built.append(seconds)
            built_mib.append(mib)
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


LARGE_GRID = """    grid:
      - model: [logistic_regression]
        model_params: [{C: 1.0}]
"""


def use_light_grid(project: Path) -> None:
    "One candidate (logistic regression) instead of the default grid: forests on 1,000,000 rows take hours."
    spec = project / "pipeline.yaml"
    text = spec.read_text()
    start = text.index("    grid:\n")
    end = text.index("\n\n", start) + 1
    spec.write_text(text[:start] + LARGE_GRID + text[end:])


def large_data(project: Path, env: dict, repeat: int, sizes: list[int], warm_up: bool = True) -> list[Figure]:
    "The pipeline against the plain process on generated data of each size; linearity of the time in rows."
    use_light_grid(project)
    params = ["tune_trials=3", "cv_folds=3", "tune_timeout=0"]
    figures, times = [], {}
    for rows in sizes:
        data = write_dataset(project / "bench-data" / f"rows-{rows}.parquet", rows)
        figure, built_mib, plain_mib = pipeline_vs_plain(
            project, env, repeat, [*params, f"data_path={data}"], f"forced pipeline, {rows:,} generated rows",
            "<= 1.2x" if rows == max(sizes) else "", warm_up)
        figure.notes.append(f"peak memory of the largest process: nbs {max(built_mib)} MiB, plain {max(plain_mib)} MiB")
        times[rows] = (statistics.median(figure.values), statistics.median(figure.baseline_values))
        figures.append(figure)
    if len(sizes) >= 3:
        small, middle, large = sorted(sizes)[:3]
        for index, who in enumerate(("nbs run", "plain")):
            slope = (times[middle][index] - times[small][index]) / (middle - small)
            predicted = times[middle][index] + slope * (large - middle)
            figures[-1].notes.append(f"{who}: {times[large][index]:.1f} s at {large:,} rows against "
                                     f"{predicted:.1f} s extrapolated linearly from {small:,} and {middle:,} rows "
                                     f"({times[large][index] / predicted:.2f}x)")
    return figures


def noop(project: Path, env: dict, repeat: int) -> Figure:
    "`nbs run` with everything up to date against `ploomber build` with everything up to date."
    run_process([NBS, "run"], project, env)  # whatever the last benchmark left out of date
    ours = [run_process([NBS, "run"], project, env)[0] for _ in range(repeat)]
    # Ploomber's own state differs from ours (nbs pins the library's and the data's digests as
    # parameters), so its first build runs every task; what is timed is the one after.
    run_process([str(BIN / "ploomber"), "build"], project, env)
    theirs = [run_process([str(BIN / "ploomber"), "build"], project, env)[0] for _ in range(repeat)]
    return Figure("no-op build, whole process", "nbs run, all up to date", "ploomber build, all up to date",
                  ours, theirs, absolute_target=1.0, target="<= 1.0 s")


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
