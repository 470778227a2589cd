"""Fixtures: scratch copies of the project, the real `nbs` command, and its MLflow store."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NBS = Path(sys.executable).with_name("nbs")
PROJECT_FILES = ["notebooks", "nbs_lib", "templates", "pipeline.yaml", "env.yaml", "env.yml", "settings.ini",
                 "requirements.in", "requirements.lock", "setup.py", "pyproject.toml"]


def copy_project(dest: Path) -> Path:
    "A copy of the project's source (no products, no store) at `dest`, committed to a fresh git repo."
    dest.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", ".ipynb_checkpoints")
    for name in PROJECT_FILES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, dest / name, ignore=ignore)
        else:
            shutil.copy(source, dest / name)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid"]
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run([*git, "add", "-A"], cwd=dest, check=True)
    subprocess.run([*git, "commit", "-qm", "scratch"], cwd=dest, check=True)
    return dest


def run_nbs(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    "Run the installed `nbs` command in `cwd` with the embedded store of that folder."
    env = {k: v for k, v in os.environ.items() if k not in {"MLFLOW_TRACKING_URI", "NBS_RUN_ID"}}
    env["PLOOMBER_STATS_ENABLED"] = "false"
    if (cwd / "nbs_lib").is_dir():  # the copy's library, for `nbs` and its kernels alike
        env["PYTHONPATH"] = str(cwd)
    return subprocess.run([str(NBS), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def store(root: Path):
    "An MlflowClient on the embedded store of the project at `root` (safe while `nbs` creates it)."
    from nbs_lib.tracking import open_store

    return open_store(f"sqlite:///{root}/mlflow.db")


def runs_of(root: Path, experiment: str = "nbs") -> list:
    "Every run of `experiment` in the store of `root`, oldest first."
    client = store(root)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    return client.search_runs([found.experiment_id], order_by=["attributes.start_time ASC"],
                              max_results=1000)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    "A fresh copy of the project for one test."
    return copy_project(tmp_path / "project")


def start_server(*args: str, cwd: Path, timeout: float = 90) -> tuple[subprocess.Popen, str]:
    "Start `nbs serve --port 0 ARGS` in its own process group; the process and its URL once it is ready."

    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    process = subprocess.Popen([str(NBS), "serve", "--port", "0", *args], cwd=cwd, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:  # whatever goes wrong before the caller gets the process, the server is stopped here
        first = process.stdout.readline()
        assert " on http://127.0.0.1:" in first, f"nbs serve did not start: {first}"
        url = first.split(" on ")[-1].split(";")[0].strip()
        deadline = time.monotonic() + timeout
        while not _answers(f"{url}/health"):
            assert time.monotonic() < deadline, "nbs serve never answered /health"
            time.sleep(0.2)
    except BaseException:
        code, out, err = stop_server(process)
        print(f"nbs serve exited {code}: {out}{err}")
        raise
    return process, url


def _answers(url: str) -> bool:
    import httpx

    try:
        return httpx.get(url).status_code == 200
    except httpx.TransportError:
        return False


def wait_ready(url: str, timeout: float = 90) -> dict:
    "The /ready answer once the server says it is ready."
    import httpx

    deadline = time.monotonic() + timeout
    while (answer := httpx.get(f"{url}/ready")).status_code != 200:
        assert time.monotonic() < deadline, f"not ready after {timeout} s: {answer.text}"
        time.sleep(0.2)
    return answer.json()


def stop_server(process: subprocess.Popen) -> tuple[int, str, str]:
    "Stop a server started by `start_server` (SIGTERM to its group, then SIGKILL); its exit code and output."
    try:
        os.killpg(process.pid, signal.SIGTERM)
        out, err = process.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
    except ProcessLookupError:
        out, err = process.communicate()
    return process.returncode, out, err


def log_predictions(path: Path, model, table, start, version: int = 1, name: str = "nbs-classifier",
                    requests: int = 10, target: str = "target") -> None:
    "Log `table` through the real log writer as `requests` requests an hour apart from `start`, then feed back every label."
    import json
    from datetime import timedelta

    import numpy as np

    from nbs_lib.predictions import PredictionLog

    log = PredictionLog(path)
    labels = []
    for i, positions in enumerate(np.array_split(np.arange(len(table)), requests)):
        rows = table.iloc[positions]
        features = rows.drop(columns=[target])
        body = json.dumps({"records": features.to_dict(orient="records")}).encode()
        at = (start + timedelta(hours=i, minutes=5)).isoformat(timespec="milliseconds")
        request_id = f"v{version}-{start:%H%M}-{i}"
        log.append(request_id, at, name, version, "champion", body, model.predict(features).tolist(), [0, 1],
                   model.predict_proba(features).tolist(), 2.0)
        labels += [(f"{request_id}-{j}", int(label)) for j, label in enumerate(rows[target])]
    log.close()
    assert log.record_feedback(labels) == []
