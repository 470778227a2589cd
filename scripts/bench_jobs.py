"""Benchmark: wall time of a forced `nbs run` with jobs=1 against jobs=N, alternated in one invocation.

Runs in a scratch copy of this project (its own products and MLflow store), after one warm-up
build. Machines are noisy, so the result is the ratio of the medians, not absolute seconds.
Usage: .venv/bin/python scripts/bench_jobs.py [--jobs 2] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SKIP = shutil.ignore_patterns(".venv", ".git", "products", "mlflow.db*", "mlartifacts", "mlruns",
                              "__pycache__", "*.egg-info", ".*_cache")


def build_seconds(nbs: Path, project: Path, env: dict, jobs: int) -> float:
    "Seconds one forced build of every task takes with `jobs` tasks at once."
    started = time.perf_counter()
    done = subprocess.run([str(nbs), "run", "--force", "-p", f"jobs={jobs}"], cwd=project, env=env,
                          capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"the build with jobs={jobs} failed:\n{done.stderr[-2000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2, help="tasks at once in the parallel builds")
    parser.add_argument("--repeat", type=int, default=3, help="builds of each kind")
    args = parser.parse_args()
    nbs = Path(sys.executable).with_name("nbs")
    env = {k: v for k, v in os.environ.items() if k not in {"MLFLOW_TRACKING_URI", "NBS_RUN_ID"}}
    env["PLOOMBER_STATS_ENABLED"] = "false"
    with tempfile.TemporaryDirectory() as scratch:
        project = Path(scratch) / "project"
        shutil.copytree(Path(__file__).resolve().parent.parent, project, ignore=SKIP)
        build_seconds(nbs, project, env, args.jobs)  # warm-up: caches, store creation
        seconds: dict[int, list[float]] = {1: [], args.jobs: []}
        for _ in range(args.repeat):
            for jobs in seconds:
                seconds[jobs].append(build_seconds(nbs, project, env, jobs))
    for jobs, values in seconds.items():
        print(f"jobs={jobs}: median {statistics.median(values):.1f} s  ({', '.join(f'{v:.1f}' for v in values)})")
    ratio = statistics.median(seconds[args.jobs]) / statistics.median(seconds[1])
    print(f"jobs={args.jobs} takes {ratio:.2f} of the time of jobs=1 (os.cpu_count() = {os.cpu_count()})")


if __name__ == "__main__":
    main()
