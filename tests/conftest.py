"""Fixtures: scratch copies of the project, the real `nbs` command, and its MLflow store."""

from __future__ import annotations

import compileall
import contextlib
import fcntl
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
import yaml

from nbs_lib.core.processes import stop_group, wait_until_answers

ROOT = Path(__file__).resolve().parents[1]
NBS = Path(sys.executable).with_name("nbs")
PROJECT_FILES = ["notebooks", "nbs_lib", "templates", "feature_repo", "pipeline.yaml", "env.yaml", "schedules.yaml", "env.yml", "settings.ini", "README.md",
                 "requirements.lock", "setup.py", "pyproject.toml"]


# The tests' parameter defaults: a few tuning trials and 3 folds build the pipeline in half the time of
# env.yaml's own (20 trials, 5 folds); `make run` and `make bench` keep exercising those.
FAST = {"tune_trials": 3, "cv_folds": 3}
# The shared build's feature values stay valid ten years (the built-in data is dated 2025), so a
# serving test can make one value stale by hand; env.yaml's 0 (forever) has no such edge to test.
SHARED_DEFAULTS = {**FAST, "feature_ttl_days": 3650}
GIT = ["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid"]


def set_defaults(root: Path, values: dict) -> None:
    "Change the default of each named parameter in `root`/env.yaml, its comment kept."
    spec = root / "env.yaml"
    text = spec.read_text()
    for name, value in values.items():
        text, found = re.subn(rf"(?m)^{re.escape(name)}:[^#\n]*", f"{name}: {value} ", text)
        assert found == 1, f"env.yaml has no top-level {name}"
    spec.write_text(text)


def commit(root: Path, message: str) -> None:
    "Commit everything in `root` (a scratch project's own repository), so builds record it clean."
    subprocess.run([*GIT, "add", "-A"], cwd=root, check=True)
    subprocess.run([*GIT, "commit", "-qm", message], cwd=root, check=True)


CHAIN = ("ingest", "validate", "feature_tables", "features", "train-", "evaluate", "register")
CHAIN_TASKS = [name.replace("train-", "train-0") for name in CHAIN]  # as trim_pipeline leaves them


def trim_pipeline(root: Path, keep: tuple[str, ...] = CHAIN, candidates: int = 1) -> None:
    """`root`'s pipeline.yaml with only the tasks named in `keep` and a grid of `candidates` linear models (train-0,
    train-1, ...: logistic regressions, or ridge regressions for a quantity, with C or alpha 1, 0.5, ...): the chain from data to a registered version in 7 tasks instead of 15, for tests of that chain."""
    spec = root / "pipeline.yaml"
    pipeline = yaml.safe_load(spec.read_text())
    pipeline["tasks"] = [task for task in pipeline["tasks"] if task["name"] in keep]
    strengths = [1.0 / 2**i for i in range(candidates)]
    for task in pipeline["tasks"]:
        if "grid" in task:
            task["grid"] = [{"model": ["linear"], "model_params": [{"classification": {"C": c}, "regression": {"alpha": c}}
                                                                   for c in strengths]}]
    spec.write_text(yaml.safe_dump(pipeline, sort_keys=False))


def copy_project(dest: Path, defaults: dict | None = None) -> Path:
    """A copy of the project's source (no products, no store) at `dest`, committed to a fresh git repo, with
    the FAST parameter defaults (or `defaults`; {} for env.yaml as it is)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        source = ROOT / name
        # feature_repo/data/ is what a build of this checkout made (git-ignored), not source
        ignore = shutil.ignore_patterns("__pycache__", ".ipynb_checkpoints", *(["data"] if name == "feature_repo" else []))
        if source.is_dir():
            shutil.copytree(source, dest / name, ignore=ignore)
        else:
            shutil.copy(source, dest / name)
    set_defaults(dest, FAST if defaults is None else defaults)
    # compiled, as `make install` compiles the checkout's: where PYTHONDONTWRITEBYTECODE is set (CI), every nbs
    # process and kernel in the copy would compile the modules it imports anew, about 0.2 s of CPU each
    compileall.compile_dir(dest / "nbs_lib", quiet=1)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    commit(dest, "scratch")
    return dest


def rebase_paths(root: Path, old: Path) -> None:
    """Point what a build at `old` recorded about its own place at `root` instead: the artifact locations in
    its MLflow store and logged models' MLmodel files (absolute file URIs) and the no-op fingerprint."""
    old_text, new_text = str(old), str(root)
    with sqlite3.connect(root / "mlflow.db") as db:
        tables = [name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            for column in [row[1] for row in db.execute(f"PRAGMA table_info('{table}')") if "CHAR" in row[2].upper()
                           or "TEXT" in row[2].upper()]:
                db.execute(f'UPDATE "{table}" SET "{column}" = replace("{column}", ?, ?) WHERE "{column}" LIKE ?',
                           (old_text, new_text, f"%{old_text}%"))
    recorded = [*(root / "mlartifacts").glob("models/*/artifacts/MLmodel"), root / ".nbs" / "fresh-build.json"]
    for path in recorded:
        if path.is_file():
            text = path.read_text()
            path.write_text(text.replace(old_text, new_text))


def copy_build(built: Path, dest: Path) -> Path:
    "A copy of the built project `built` at `dest` (products, store, feature store, git), to change freely."
    shutil.copytree(built, dest, symlinks=True)
    rebase_paths(dest, built)
    return dest


# Files a read writes all the same: the lock file every client of the embedded store takes, and the
# `registered_model_meta` MLflow writes into a model's folder whenever a models:/ URI is loaded (for
# a local artifact store, that folder is the store's own)
WRITTEN_BY_READS = ("mlflow.db.lock", "registered_model_meta")


def file_states(root: Path) -> dict[str, list[int]]:
    "Size and modification time of each file of the project at `root`, but git's, Python's caches and WRITTEN_BY_READS."
    return {str(path.relative_to(root)): [path.stat().st_size, path.stat().st_mtime_ns] for path in sorted(root.rglob("*"))
            if path.is_file() and path.relative_to(root).parts[0] != ".git" and "__pycache__" not in path.parts
            and path.name not in WRITTEN_BY_READS}


@pytest.fixture(scope="session")
def shared_build(tmp_path_factory, worker_id: str):
    """The project built once for the whole test session, by `nbs run` with SHARED_DEFAULTS: every xdist worker
    shares it. Read it, never change it: a test that changes a build takes `copy_build(shared_build, tmp_path)`.
    At the end of the session a file of it that changed is an error, naming the file."""
    base = tmp_path_factory.getbasetemp()
    base = base.parent if worker_id != "master" else base  # the folder every worker's basetemp is in
    folder = base / "shared-build"
    outcome, states = folder / "outcome.json", folder / "files.json"
    root = folder / "project"
    with open(base / "shared-build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the first worker builds; the others wait for it, then read
        if not outcome.is_file():
            copy_project(root, SHARED_DEFAULTS)
            done = run_nbs("run", cwd=root, timeout=900)
            states.write_text(json.dumps(file_states(root)))
            outcome.write_text(json.dumps({"returncode": done.returncode, "stdout": done.stdout,
                                           "stderr": done.stderr}))
    result = json.loads(outcome.read_text())
    assert result["returncode"] == 0, result["stdout"][-3000:] + result["stderr"][-3000:]
    yield root
    built, now = json.loads(states.read_text()), file_states(root)
    changed = sorted(name for name in built.keys() | now.keys() if built.get(name) != now.get(name))
    assert not changed, f"a test changed the shared build (take copy_build for that): {changed[:10]}"


@pytest.fixture(scope="session")
def shared_build_output(shared_build: Path) -> dict:
    "What the shared build's `nbs run` printed: returncode, stdout and stderr."
    return json.loads((shared_build.parent / "outcome.json").read_text())


def nbs_env(env: dict | None = None) -> dict:
    "This process's environment for an `nbs` it starts, less a store or run a test left set in it, with `env` over it."
    return {**{k: v for k, v in os.environ.items() if k not in {"MLFLOW_TRACKING_URI", "NBS_RUN_ID"}},
            "PLOOMBER_STATS_ENABLED": "false", **(env or {})}


def run_nbs(*args: str, cwd: Path, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    "Run the installed `nbs` command in `cwd` with the embedded store of that folder, or with what `env` sets."
    env = nbs_env(env)
    if (cwd / "nbs_lib").is_dir():  # the copy's library, for `nbs` and its kernels alike
        env["PYTHONPATH"] = str(cwd)
    return subprocess.run([str(NBS), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def drive(project: Path, argvs: list[list[str]], env: dict | None = None) -> list[subprocess.CompletedProcess]:
    "`nbs ARGV` for each of `argvs` in `project`, one after the other in one process (tests/nbs_driver.py)."
    env = nbs_env(env)
    if (project / "nbs_lib").is_dir():  # the copy's library, as run_nbs does
        env["PYTHONPATH"] = str(project)
    ran = subprocess.run([sys.executable, str(Path(__file__).with_name("nbs_driver.py"))], input=json.dumps(argvs),
                         cwd=project, env=env, capture_output=True, text=True, timeout=600)
    assert ran.returncode == 0, ran.stderr[-3000:]
    return [subprocess.CompletedProcess(argv, o["code"], o["stdout"], o["stderr"])
            for argv, o in zip(argvs, json.loads(ran.stdout.splitlines()[-1]), strict=True)]


def store(root: Path):
    "An MlflowClient on the embedded store of the project at `root` (safe while `nbs` creates it)."
    from nbs_lib.core.tracking import open_store

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
        why = wait_until_answers(f"{url}/health", process, timeout, interval=0.2)
        assert why is None, f"nbs serve {why}"
    except BaseException:
        code, out, err = stop_server(process)
        print(f"nbs serve exited {code}: {out}{err}")
        raise
    return process, url


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
    stop_group(process.pid)
    out, err = process.communicate()
    return process.returncode, out, err


def free_port() -> int:
    "A TCP port on 127.0.0.1 that nothing listens on now."
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_service(command: list[str], ready_url: str, cwd: Path, log: Path, env: dict | None = None,
                  timeout: float = 120) -> subprocess.Popen:
    "Start a server `command` in its own process group, its output in `log`; the process once `ready_url` answers 200."
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=cwd, env={**os.environ, **(env or {})}, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    try:
        why = wait_until_answers(ready_url, process, timeout)
        assert why is None, f"{command[0]} {why}: {log.read_text()[-2000:]}"
    except BaseException:
        stop_service(process)
        raise
    return process


def stop_service(process: subprocess.Popen) -> int:
    "Stop a process started by `start_service`: SIGTERM to its group, SIGKILL after 20 s; its exit code."
    stop_group(process.pid)
    return process.wait()


@pytest.fixture
def s3(tmp_path) -> dict[str, str]:
    "A real S3-compatible server (moto's) on 127.0.0.1, a bucket `reports` in it: the environment that reaches it."
    port = free_port()
    process = start_service([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
                            f"http://127.0.0.1:{port}/moto-api/", tmp_path, tmp_path / "moto.log")
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1"}
    try:
        s3_client(env).create_bucket(Bucket="reports")
        yield env
    finally:
        stop_service(process)


def s3_client(env: dict):
    "A boto3 S3 client of the server `env` (the `s3` fixture's) reaches."
    import boto3

    return boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name=env["AWS_DEFAULT_REGION"])


CHROMIUM = "/usr/bin/chromium"  # Debian's, installed by `make test`; Playwright never downloads a browser here
SCREENSHOTS = ROOT / ".nbs" / "screenshots"


# The modules that take longest, longest first (seconds of test time, --durations=0 on 2 cores, 2026-12-03:
# 700, 628, 528, 476, 293, 266, 236, 196, 149, 137, 136, 125; the next is 98). The Makefile's
# --no-loadscope-reorder has xdist hand modules out in this order, so the one-test benchmark smoke module, which
# no worker can share, starts first; by xdist's own order (most tests first) it was the last module to start,
# 4 minutes alone at the end of a 23-minute run. A module missing here only runs later; it still runs.
SLOWEST_FIRST = ["test_bench.py", "test_team.py", "test_pipeline.py", "test_own_data.py", "test_faults.py",
                 "test_ploomber_projects.py", "test_execute.py", "test_papermill_compat.py", "test_readme.py",
                 "test_reproduce.py", "test_warm.py", "test_serve.py"]


def pytest_collection_modifyitems(items) -> None:
    "Modules that take longest go first; a test that reads the shared build is a `build` test like those that build a pipeline of their own."
    rank = {name: index for index, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each module keeps its own order
    for item in items:
        if "shared_build" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.build)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    "Keep each phase's report on the test item, so a fixture can tell whether its test failed."
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"report_{report.when}", report)


@pytest.fixture(scope="session")
def chromium():
    "Headless chromium driven by Playwright, for the whole session."
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs Debian's chromium (apt-get install chromium)")
    with sync_playwright() as playwright:
        # the background-networking flags keep it from calling out of this closed network
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run", "--disable-quic"])
        yield browser
        browser.close()


@pytest.fixture
def page(chromium, request):
    "A fresh browser page; if the test fails, a screenshot of it in .nbs/screenshots/TEST.png."
    context = chromium.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    page.set_default_timeout(60_000)
    yield page
    report = getattr(request.node, "report_call", None)
    if report is not None and report.failed:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shot = SCREENSHOTS / f"{request.node.name}.png"
        page.screenshot(path=str(shot), full_page=True)
        print(f"screenshot of the page at failure: {shot}")
    context.close()


def log_predictions(path: Path, model, table, start, version: int = 1, name: str = "nbs-classifier",
                    requests: int = 10, target: str = "target") -> None:
    "Log `table` through the real log writer as `requests` requests an hour apart from `start`, then feed back every label."
    import json
    from datetime import timedelta

    import numpy as np

    from nbs_lib.serving.predictions import PredictionLog

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
    assert log.record_feedback(labels)["recorded"] == len(labels)


# the first task of the `tiny` fixture's pipeline, which misbehaves as its `mode` parameter says
FIRST_BODY = """\
import os, sys, time
from pathlib import Path
if mode == "raise":
    raise ValueError("bad things")
if mode == "exit0":
    sys.exit(0)
if mode == "dead":
    os._exit(1)
if mode == "sleep":
    time.sleep(120)
if mode == "leak":
    import tempfile
    from nbs_lib.core.credentials import secret
    from nbs_lib.core.tracking import log_artifact
    token = secret("NBS_TEST_TOKEN")
    print("connecting with", token)
    log = Path(tempfile.mkdtemp()) / "connection.log"
    log.write_text(f"token={token}\\n")
    log_artifact(log)
    from nbs_lib.core.tracking import log_metrics, log_table, log_tags
    log_table({"connection": [f"token={token}"]}, "connections")
    log_tags({"nbs.connected_with": token})
    log_metrics({f"latency_{token}": 1.0})
if mode == "leakraise":
    from nbs_lib.core.credentials import secret
    raise ConnectionError(f"the server refused {secret('NBS_TEST_TOKEN')}")
if mode == "halfwrite":
    Path(product["data"]).write_text("half")
    if Path("crash.flag").exists():
        time.sleep(120)
Path(product["data"]).write_text(mode)"""

TINY_PIPELINE = """\
executor:
  dotted_path: nbs_lib.pipeline.executor.TrackedExecutor
  experiment: '{{experiment}}'
  cell_timeout: '{{cell_timeout}}'
  secrets: [NBS_TEST_TOKEN]
tasks:
  - source: first.ipynb
    name: first
    product:
      nb: products/first.ipynb
      data: products/first.txt
    params:
      mode: '{{mode}}'
  - source: second.ipynb
    name: second
    product:
      nb: products/second.ipynb
      data: products/second.txt
"""


def _notebook(path: Path, parameters: str, *bodies: str) -> None:
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell(parameters)
    cell.metadata["tags"] = ["parameters"]
    nb.cells = [cell, *(nbformat.v4.new_code_cell(b) for b in bodies)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "python3", "language": "python"}
    nbformat.write(nb, path)


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    "A two-task project: `first` misbehaves as its `mode` parameter says, `second` reads it."
    (tmp_path / "env.yaml").write_text("experiment: tiny\nmode: ok\ncell_timeout: 60\n")
    (tmp_path / "pipeline.yaml").write_text(TINY_PIPELINE)
    _notebook(tmp_path / "first.ipynb", 'upstream = None\nproduct = None\nmode = "ok"',
              FIRST_BODY, "print('after')")
    _notebook(tmp_path / "second.ipynb", 'upstream = ["first"]\nproduct = None',
              'from pathlib import Path\nPath(product["data"]).write_text(Path(upstream["first"]["data"]).read_text())')
    return tmp_path


def session_leaders(pid: int) -> list:
    "The descendants of process `pid` that lead a session of their own: a build's kernels (not the warm process they fork from)."
    import psutil

    leaders = []
    for process in psutil.Process(pid).children(recursive=True):
        with contextlib.suppress(ProcessLookupError):
            if os.getsid(process.pid) == process.pid:
                leaders.append(process)
    return leaders


def start_sleeping_build(root: Path, *args: str, env: dict | None = None, kernels_of: int | None = None) -> tuple:
    """`nbs run ARGS` (default `-p mode=sleep`) in the `tiny` project at `root`, returned once a task's cell runs; the
    build's process and its kernels (the session leaders under it, or under process `kernels_of`: a warm worker)."""
    build = subprocess.Popen([str(NBS), "run", *(args or ("-p", "mode=sleep"))], cwd=root, env=nbs_env(env),
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 60
    for line in build.stderr:
        if "running  first" in line or time.monotonic() > deadline:
            break
    kernels: list = []
    while not kernels and time.monotonic() < deadline:
        time.sleep(0.2)
        kernels = session_leaders(kernels_of or build.pid)
    assert kernels, "the kernel never started"
    # the nbs engine saves the executed notebook as each cell starts: a cell marked running is under way
    while not any('"status": "running"' in p.read_text() for p in (root / "products").glob("first*.ipynb")):
        assert time.monotonic() < deadline, "no task reached a running cell"
        time.sleep(0.2)
    return build, kernels
