"""Benchmark: what the feature store costs `nbs serve`, measured against the same server in the same run.

A scratch copy of the project is built once (`nbs run`, feature store included). Then:
- start-up: `nbs serve` from launch to /ready, with the project's feature store (Feast opened
  before ready) against `--feature-repo ''`, alternated;
- requests: one server answers single-record requests by entity key (values read from the
  online store) and by the same records sent as values, in alternating rounds from one client
  over a kept-alive connection; median throughput over rounds, p50 and p99 latency.

Usage: .venv/bin/python benchmarks/features.py [--rounds 3] [--requests 500]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import pandas as pd
from common import BIN, Figure, clean_env, scratch_project, spread
from serve import free_port, load, percentile, start, stop


def startup(project: Path, extra: list[str]) -> float:
    "Seconds from launching `nbs serve` to its /ready answering 200."
    port = free_port()
    began = time.perf_counter()
    process = start([str(BIN / "nbs"), "serve", "--port", str(port), "--no-prediction-log", *extra], "/ready", port,
                    project)
    seconds = time.perf_counter() - began
    stop(process)
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=500)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        project = scratch_project(Path(scratch))
        env = clean_env(project)
        subprocess.run([str(BIN / "nbs"), "run", "-p", "tune_trials=3"], cwd=project, env=env, check=True,
                       capture_output=True)
        with_store, without = [], []
        for _ in range(args.rounds):
            with_store.append(startup(project, []))
            without.append(startup(project, ["--feature-repo", ""]))
        figures = [Figure("nbs serve, launch to ready", "with the feature store (Feast opened)", "--feature-repo ''",
                          with_store, without)]

        table = pd.read_parquet(project / "feature_repo" / "data" / "nbs-classifier.parquet")
        keys = random.Random(0).choices(table["patient_id"].tolist(), k=args.requests)
        rows = table.set_index("patient_id").drop(columns="event_timestamp")
        by_key = [json.dumps({"entities": [{"patient_id": k}]}).encode() for k in keys]
        by_value = [json.dumps({"records": [rows.loc[k].to_dict()]}).encode() for k in keys]
        port = free_port()
        server = start([str(BIN / "nbs"), "serve", "--port", str(port), "--no-prediction-log"], "/ready", port, project)
        try:
            load(port, "/predict", by_key[:50] + by_value[:50], 1)  # warm-up
            rates = {"key": [], "value": []}
            latencies = {"key": [], "value": []}
            for _ in range(args.rounds):
                for kind, bodies in (("key", by_key), ("value", by_value)):
                    rate, times = load(port, "/predict", bodies, 1)
                    rates[kind].append(rate)
                    latencies[kind].extend(times)
        finally:
            stop(server)
        figure = Figure("requests by entity key, 1 per request", "by key (online store read)", "by values",
                        rates["key"], rates["value"], unit="req/s", higher_is_better=True)
        figure.notes.append(", ".join(f"by {kind}: p50 {percentile(times, 50):.2f} ms, p99 {percentile(times, 99):.2f} ms"
                                      for kind, times in latencies.items()))
        figures.append(figure)
    for f in figures:
        print(f"{f.name}: {f.measured} {spread(f.values)} {f.unit}; {f.baseline} {spread(f.baseline_values)} {f.unit}; "
              f"ratio {f.ratio:.2f}x (median {statistics.median(f.values):.3g} / {statistics.median(f.baseline_values):.3g})")
        for note in f.notes:
            print(f"  {note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
