"""Run the benchmark suite and write its table (BENCHMARKS.md by default).

Every figure is a ratio against a baseline measured in the same invocation, from alternating
repetitions; medians and ranges are shown. `--smoke` runs each benchmark once on tiny data, to
check that the suite still works (the test suite does), not to measure anything.

    .venv/bin/python benchmarks/run.py [--repeat 3] [--output BENCHMARKS.md] [--only NAME ...] [--smoke]
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import commands
import orchestrated
import overhead
import pipeline
import serve
from common import ROOT, Figure, clean_env, scratch_project, spread

BENCHMARKS = ["startup", "execute", "pipeline", "grid", "tracking", "cells", "noop", "orchestrated", "commands",
              "large", "serve"]
SMOKE_ENV = {"tune_trials": "2", "cv_folds": "2"}  # a quicker pipeline for --smoke
# --smoke builds the chain from data to a registered version with the whole grid, without the tasks no
# benchmark looks at, so that the suite, which runs it, waits less for it
SMOKE_LEFT_OUT = ("eda", "materialize", "tune", "train-tuned", "catalogue")


def leave_out_tasks(project: Path, names: tuple[str, ...]) -> None:
    "Drop the tasks `names` from `project`'s pipeline.yaml (none of the others may read their products)."
    import yaml

    spec = project / "pipeline.yaml"
    pipeline = yaml.safe_load(spec.read_text())
    pipeline["tasks"] = [task for task in pipeline["tasks"] if task["name"] not in names]
    spec.write_text(yaml.safe_dump(pipeline, sort_keys=False))


def set_env_values(project: Path, values: dict[str, str]) -> None:
    "Change the default of each named parameter in `project`'s env.yaml."
    lines = []
    for line in (project / "env.yaml").read_text().splitlines():
        name = line.split(":", 1)[0]
        if name in values and not line.startswith(" "):
            line = f"{name}: {values[name]}"
        lines.append(line)
    (project / "env.yaml").write_text("\n".join(lines) + "\n")


def run(chosen: list[str], repeat: int, smoke: bool, scratch: Path) -> list[Figure]:
    "Run the `chosen` benchmarks in a scratch copy of the project; their figures."
    project = scratch_project(scratch)
    if smoke:
        set_env_values(project, SMOKE_ENV)
        leave_out_tasks(project, SMOKE_LEFT_OUT)
        pipeline.use_light_grid(project, pipeline.SMOKE_GRID)  # every build of the smoke trains 2 quick candidates
        subprocess.run(["git", "commit", "-qam", "smoke"], cwd=project, check=True,
                       env={**os.environ, "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@localhost",
                            "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@localhost"})
    env = clean_env(project)
    few = 1 if smoke else repeat
    figures: list[Figure] = []

    def say(what: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {what}", file=sys.stderr, flush=True)

    if "startup" in chosen:
        say("startup")
        figures += overhead.startup(1 if smoke else 5)
    if "cells" in chosen:
        say("per-cell overhead")
        figures += overhead.per_cell(few)
    if "execute" in chosen:
        say("nbs execute against papermill")
        figures += overhead.execute_vs_papermill(1 if smoke else 10, env)
    if {"noop", "pipeline", "grid", "tracking", "large"} & set(chosen):
        say("ploomber build, then its no-op builds")
        ploomber_seconds = pipeline.ploomber_noop(project, env, 1 if smoke else 3)
    in_builds: list[float] = []  # from one task's end to the next one's first cell, in each forced build
    if {"pipeline", "grid", "tracking", "noop", "orchestrated", "commands"} & set(chosen):
        say("forced pipeline against plain python, default data")
        figure, built_mib, plain_mib = pipeline.pipeline_vs_plain(
            project, env, few, [], "forced pipeline, default data (569 rows)", "<= 1.5x",
            after_build=lambda: in_builds.append(orchestrated.first_cell_gap(project, *orchestrated.PAIR)))
        figure.notes.append(f"peak memory of the largest process: nbs {max(built_mib)} MiB, plain {max(plain_mib)} MiB")
        if "pipeline" in chosen:
            figures.append(figure)
    if "noop" in chosen:
        say("nbs no-op builds")
        figures.append(pipeline.noop(project, env, 1 if smoke else 5, ploomber_seconds))
    if "orchestrated" in chosen:
        say("task start-up under an orchestrator")
        figures += orchestrated.task_startup(project, env, 1 if smoke else 5, in_builds)
    if "grid" in chosen:
        say("grid: jobs=1 against jobs=2")
        # three at least: the median of two is their mean, which one slow spell of the machine decides
        figures.append(pipeline.grid(project, env, 1 if smoke else max(repeat, 3)))
    if "commands" in chosen:
        say("commands a person waits for")
        figures += commands.measure(project, env, 1 if smoke else 5, warm_up=not smoke)
        figures.append(commands.predict_rows(project, env, 1_000 if smoke else 1_000_000, 1 if smoke else 2))
    if "tracking" in chosen:
        say("tracking cost per task")
        figures.append(overhead.tracking_per_task(project, 3 if smoke else 20))
    if "large" in chosen:  # last on this project: it changes the grid
        say("generated data")
        sizes = [1_000] if smoke else [100_000, 1_000_000]  # one size: the smoke measures no growth
        figures.append(pipeline.large_data(project, env, sizes))
    if "serve" in chosen:
        say("serving")
        figures += serve.measure(rounds=1 if smoke else 2, requests=100 if smoke else 600)
    return figures


def machine() -> str:
    "The machine and the versions the figures were measured with."
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    memory = next((int(line.split()[1]) // 1024 ** 2 for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal")), 0)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    packages = ", ".join(f"{name} {version(name)}" for name in
                         ("ploomber", "papermill", "nbclient", "ipykernel", "mlflow", "scikit-learn", "pandas",
                          "fastapi", "uvicorn"))
    return (f"{os.cpu_count()} CPUs ({cpu}), {memory} GiB, {platform.platform()}; Python "
            f"{platform.python_version()}; nbs at commit {commit.stdout.strip() or '?'}; {packages}")


def table(figures: list[Figure], command: str, seconds: float) -> str:
    "The Markdown page of `figures`."
    lines = [
        "# Benchmarks", "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M %Z')} with `{command}` in {seconds / 60:.1f} minutes.  ",
        f"Machine: {machine()}.", "",
        "Each figure is the median of the measured command over the median of its baseline, both from the "
        "same invocation (repetitions alternate, so a slower spell of the machine falls on both). Medians "
        "with their range and the number of repetitions; times in seconds unless the unit says otherwise. "
        "A speed-up or a throughput is better when higher; everything else when lower.", "",
        "| benchmark | measured | baseline | measured: median (range, n) | baseline: median (range, n) "
        "| ratio | target | met |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for f in figures:
        met = {True: "yes", False: "**no**", None: ""}[f.met]
        lines.append(f"| {f.name} | {f.measured} | {f.baseline} | {spread(f.values)} {f.unit} | "
                     f"{spread(f.baseline_values)} {f.unit} | {f.ratio:.2f}x | {f.target} | {met} |")
    notes = [f"- {f.name}: {note}" for f in figures for note in f.notes]
    if notes:
        lines += ["", "Notes:", "", *notes]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2, help="repetitions of each timed build (default 2; "
                        "other figures repeat more)")
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md", help="the Markdown table to write")
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, default=BENCHMARKS, help="some benchmarks only")
    parser.add_argument("--smoke", action="store_true", help="once each, tiny data: checks the suite, measures nothing")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error(f"--repeat is {args.repeat}; it must be 1 or more")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="nbs-bench-") as scratch:
        figures = run(args.only, args.repeat, args.smoke, Path(scratch))
    command = shlex.join(["python", "benchmarks/run.py", *(argv if argv is not None else sys.argv[1:])])
    page = table(figures, command, time.perf_counter() - started)
    args.output.write_text(page)
    print(page)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
