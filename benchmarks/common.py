"""What every benchmark shares: a figure (ratio against a baseline of the same invocation), timing
of processes with their peak memory, and a scratch copy of the project to run in."""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


@dataclass
class Figure:
    "One line of the results: `measured` against `baseline`, repeated, and the target for their ratio."

    name: str
    measured: str
    baseline: str
    values: list[float]
    baseline_values: list[float]
    unit: str = "s"
    target: str = ""  # e.g. "<= 2.0x" (ratio measured/baseline) or ">= 1.7x"
    higher_is_better: bool = False  # throughput, speed-up: the ratio is measured/baseline all the same
    notes: list[str] = field(default_factory=list)
    absolute_target: float | None = None  # a target on the measured median itself, in `unit`
    margin_target: float | None = None  # a target on the measured median minus the baseline's, in `unit`

    @property
    def ratio(self) -> float:
        "Median of the measured values over median of the baseline's."
        return statistics.median(self.values) / statistics.median(self.baseline_values)

    @property
    def met(self) -> bool | None:
        "Whether the target holds; None when there is none."
        if self.absolute_target is not None:
            return statistics.median(self.values) <= self.absolute_target
        if self.margin_target is not None:
            return statistics.median(self.values) - statistics.median(self.baseline_values) <= self.margin_target
        if not self.target:
            return None
        sign, number = self.target.split()
        limit = float(number.rstrip("x"))
        return self.ratio <= limit if sign == "<=" else self.ratio >= limit


def spread(values: list[float]) -> str:
    "The median and the range of `values`, as text."
    digits = 0 if statistics.median(values) >= 100 else 2 if statistics.median(values) < 10 else 1
    return (f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f}, "
            f"n={len(values)})")


def run_process(command: list[str], cwd: Path, env: dict | None = None) -> tuple[float, int]:
    "Run `command` to its end; wall seconds and the peak resident memory (MiB) of its largest process."
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"benchmark step failed ({process.returncode}): {' '.join(command)}\n"
                         f"{output.decode(errors='replace')[-3000:]}")
    return elapsed, usage.ru_maxrss // 1024


def scratch_project(folder: Path) -> Path:
    "A copy of this project's sources (no products, no store) in `folder`/project, committed to a repository of its own."
    project = folder / "project"
    # the sources as git sees them, edits not yet committed included: what .gitignore leaves out (the virtual
    # environments, 270 MB and 11,000 files for Airflow's alone, products, stores, the feature store's data) is
    # never copied
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True)
    if listed.returncode != 0:
        raise SystemExit(f"benchmarks: git cannot list the sources in {ROOT} ({listed.stderr.decode().strip()}); "
                         "the benchmarks copy what git lists: run them in a git checkout of the project")
    for name in filter(None, listed.stdout.decode().split("\0")):
        if (ROOT / name).is_file():  # a tracked file deleted in the working tree is left out, as it is there
            (project / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, project / name)
    # compiled as `make install` compiles the checkout's: else every nbs process compiles nbs_lib anew
    subprocess.run([str(BIN / "python"), "-m", "compileall", "-q", str(project / "nbs_lib")], check=True)
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    subprocess.run(["git", "add", "-A"], cwd=project, check=True)
    subprocess.run(["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-qm", "bench"],
                   cwd=project, check=True)
    return project


def clean_env(project: Path) -> dict[str, str]:
    "The environment the benchmarked commands run in: the project's own store, no telemetry."
    env = {k: v for k, v in os.environ.items() if k not in {"MLFLOW_TRACKING_URI", "NBS_RUN_ID"}}
    env.update(PLOOMBER_STATS_ENABLED="false", MLFLOW_TRACKING_URI=f"sqlite:///{project}/mlflow.db",
               PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
               PYTHONPATH=str(project))  # the copy's nbs_lib, for nbs and its kernels alike
    return env
