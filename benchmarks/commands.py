"""What a person waits for at the command line of a built project: each command's whole process, measured against
the floor of any command that asks MLflow (importing its client), in alternating repetitions."""

from __future__ import annotations

import http.client
import subprocess
import tempfile
import time
from pathlib import Path

from common import BIN, Figure, run_process
from serve import free_port, stop

FLOOR = "from mlflow.tracking import MlflowClient"  # what every command that must ask MLflow pays first
# the floor under that of a command on the embedded store: MLflow's client ready on it, one registry query; the
# collector as an nbs command has it (COMMAND_GC_THRESHOLD while it imports, no last collection at exit)
_AS_NBS = "import gc; from nbs_lib.cli import COMMAND_GC_THRESHOLD; gc.set_threshold(COMMAND_GC_THRESHOLD); "
_CLIENT_READY = ("from mlflow import MlflowClient; import os; MlflowClient(os.environ['MLFLOW_TRACKING_URI'])"
                 ".search_registered_models(); gc.freeze()")
STORE_READY = _AS_NBS + _CLIENT_READY
# the floor under `nbs predict` and `nbs serve`: that, and skops imported first, as they import it (it lists
# scikit-learn's estimators as trusted types when imported), nothing loaded or read
SCORING_READY = _AS_NBS + "import skops.io; " + _CLIENT_READY


def _serve(project: Path, env: dict, port: int, *options: str) -> tuple[subprocess.Popen, float]:
    "`nbs serve` on the project's champion, and the seconds from its start to its first 200 on GET /ready."
    started = time.perf_counter()
    process = subprocess.Popen([str(BIN / "nbs"), "serve", "--port", str(port), *options], cwd=project, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        while process.poll() is None:
            try:
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                connection.request("GET", "/ready")
                if connection.getresponse().status == 200:
                    return process, time.perf_counter() - started
            except OSError:
                pass
            time.sleep(0.02)
        raise SystemExit(f"nbs serve exited: {process.stderr.read().decode()[-2000:]}")
    except BaseException:
        stop(process)
        raise


def serve_ready(project: Path, env: dict) -> float:
    "Seconds from starting `nbs serve` on the project's champion to its first 200 on GET /ready."
    process, seconds = _serve(project, env, free_port(), "--no-prediction-log")
    stop(process)
    return seconds


def traffic(project: Path, env: dict) -> None:
    "Fill the project's prediction log as `make loop` does: 600 predictions through `nbs serve`, labels fed back, drift from the third batch."
    port = free_port()
    process, _ = _serve(project, env, port)
    try:
        run_process([str(BIN / "nbs"), "simulate", "-q", "--url", f"http://127.0.0.1:{port}", "--drift", "shift"],
                    project, env)
    finally:
        stop(process)


def measure(project: Path, env: dict, repeat: int, warm_up: bool = True) -> list[Figure]:
    """`nbs status`, `models`, `runs`, `lineage`, `promote`, `rollback`, `schedule list`, `features`, `monitor` on a
    prediction log of 600 and `nbs predict` of the holdout, on the built `project`; with `warm_up`, a first untimed round (compiled bytecode, the feature
    definitions' snapshot)."""
    nbs = str(BIN / "nbs")
    commands = {  # name: (arguments, target, seconds: over the floor for a margin, else the median's own)
        "nbs status": (["status"], "absolute", 0.5),
        "nbs models": (["models"], "margin", 0.5),
        "nbs runs": (["runs"], "margin", 0.5),
        "nbs lineage": (["lineage", "models:/nbs-classifier@champion"], "margin", 0.5),
        # the champion again, then back: each round adds two entries to its history and leaves it as it was
        "nbs promote": (["promote", "nbs-classifier", "1", "--why", "bench"], "margin", 0.5),
        "nbs rollback": (["rollback", "nbs-classifier", "--why", "bench"], "margin", 0.5),
        "nbs schedule list": (["schedule", "list"], "margin", 0.5),
        "nbs features": (["features"], "absolute", 2.0),
        "nbs monitor, the 600-prediction log": (["monitor", "-q"], "absolute", 10.0),
        "nbs predict, the 114-row holdout": (["predict", "-q", "--input", "products/data/test.parquet", "--output",
                                              "scored.csv"], "absolute", 3.0),
    }
    run_process([nbs, "run", "-q"], project, env)  # up to date, as after a person's build: not timed
    traffic(project, env)  # what nbs monitor reports on: not timed
    floor, store_ready, scoring_ready, serving, serving_warm = [], [], [], [], []
    times = {(name, warm): [] for name in commands for warm in (False, True)}
    with tempfile.TemporaryDirectory(prefix="nbs-warm-", dir="/tmp") as folder:
        warm_env = {**env, "TMPDIR": folder, "NBS_WARM": "1"}
        run_process([nbs, "warm", "start"], project, warm_env)  # its imports are not timed: it outlives many commands
        try:
            for round_ in range(repeat + warm_up):
                timed = round_ >= warm_up
                seconds = run_process([str(BIN / "python"), "-c", FLOOR], project, env)[0]
                ready = run_process([str(BIN / "python"), "-c", STORE_READY], project, env)[0]
                scoring = run_process([str(BIN / "python"), "-c", SCORING_READY], project, env)[0]
                if timed:
                    floor.append(seconds)
                    store_ready.append(ready)
                    scoring_ready.append(scoring)
                for name, (arguments, _, _) in commands.items():
                    for warm in (False, True):
                        seconds = run_process([nbs, *arguments], project, warm_env if warm else env)[0]
                        if timed:
                            times[name, warm].append(seconds)
                seconds, warm_seconds = serve_ready(project, env), serve_ready(project, warm_env)
                if timed:
                    serving.append(seconds)
                    serving_warm.append(warm_seconds)
        finally:
            run_process([nbs, "warm", "stop"], project, warm_env)
    figures = []
    for warm in (False, True):
        for name, (arguments, kind, limit) in commands.items():
            figure = Figure(f"{name}, {'warm worker, ' if warm else ''}whole process",
                            f"{'NBS_WARM=1 ' if warm else ''}nbs {' '.join(arguments)}", f"python -c '{FLOOR}'",
                            times[name, warm], floor,
                            target=f"<= +{limit:g} s over the baseline" if kind == "margin" else f"<= {limit:g} s")
            if kind == "margin":
                figure.margin_target = limit
            else:
                figure.absolute_target = limit
            figures.append(figure)
    figures[len(commands)].notes.append("each command forked from the warm worker (`nbs warm`), started beforehand "
                                        "and not timed: what a second command in a row waits for with NBS_WARM=1")
    figures.append(Figure("MLflow's client ready on the embedded store, whole process", "import, open the store, one "
                          "registry query (the collector as in nbs)", f"python -c '{FLOOR}'", store_ready,
                          floor, notes=["the floor under every command above that reads the registry or the runs: "
                                        "the SQLAlchemy store's own imports and first query come on top of the "
                                        "baseline; nbs may not go under it without reading MLflow's tables itself"]))
    figures.append(Figure("MLflow's client ready and skops imported, whole process", "import skops.io, then as the "
                          "row above, nothing loaded", f"python -c '{FLOOR}'", scoring_ready, floor,
                          notes=["the floor under nbs predict and nbs serve, which load a model with skops: its "
                                 "import lists scikit-learn's estimators as trusted types, importing all of "
                                 "scikit-learn"]))
    figures.append(Figure("nbs serve, ready (GET /ready 200) after the start", "nbs serve on the champion, the "
                          "feature store opening in the background", f"python -c '{FLOOR}'", serving, floor,
                          target="<= 4 s", absolute_target=4.0))
    figures.append(Figure("nbs serve, ready (GET /ready 200) after the start, warm worker", "NBS_WARM=1 nbs serve on "
                          "the champion, forked from the warm worker", f"python -c '{FLOOR}'", serving_warm, floor,
                          target="<= 4 s", absolute_target=4.0))
    if warm_up:
        figures[0].notes.append("after one untimed round of every command: bytecode compiled, the feature "
                                "definitions' snapshot written (a build's catalogue task leaves one too)")
    return figures


# how `nbs predict` read, scored and wrote a CSV file before Arrow did (pandas' reader and writer, the same chunks)
PANDAS_PREDICT = """
import sys
import pandas as pd
from nbs_lib.serving.scoring import load_served
served = load_served("models:/nbs-classifier@champion")
names = [c.name for c in served.columns]
for i, chunk in enumerate(pd.read_csv(sys.argv[1], chunksize=50_000)):
    labels, probabilities = served.predict(chunk[names])
    scores = {f"proba_{c}": probabilities[:, j] for j, c in enumerate(served.classes)}
    chunk.assign(prediction=labels, **scores, model_name=served.name, model_version=served.version).to_csv(
        sys.argv[2], mode="a" if i else "w", header=not i, index=False)
"""


def predict_rows(project: Path, env: dict, rows: int, repeat: int) -> Figure:
    """`nbs predict` of `rows` CSV rows (the holdout drawn again and again) into CSV, in rows a second of the whole
    process, against the same model scoring the same chunks read and written by pandas."""
    import numpy as np
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    holdout = pq.read_table(project / "products/data/test.parquet")
    source = project / "many.csv"
    pacsv.write_csv(holdout.take(np.random.default_rng(0).integers(0, holdout.num_rows, rows)), source)
    nbs = [str(BIN / "nbs"), "predict", "-q", "--input", str(source), "--output", str(project / "many-nbs.csv")]
    pandas = [str(BIN / "python"), "-c", PANDAS_PREDICT, str(source), str(project / "many-pandas.csv")]
    rates, memory = {"nbs": [], "pandas": []}, {"nbs": [], "pandas": []}
    for _ in range(repeat):
        for side, command in (("nbs", nbs), ("pandas", pandas)):
            seconds, peak = run_process(command, project, env)
            rates[side].append(rows / seconds)
            memory[side].append(peak)
    return Figure(f"nbs predict, {rows:,} CSV rows to CSV, whole process", "nbs predict (rows/s)",
                  "the same chunks read, scored and written with pandas (rows/s)", rates["nbs"], rates["pandas"],
                  unit="rows/s", target=">= 2.0x", higher_is_better=True,
                  notes=[f"peak memory: nbs {max(memory['nbs'])} MiB, pandas {max(memory['pandas'])} MiB; chunks of "
                         "50,000 rows on both sides"])
