"""The team setup, for real: PostgreSQL and the MLflow server with basic auth (`nbs server`), the
pipeline tracked there, the exported DAG run by Apache Airflow against it, and the server's
security options. Every process started here is stopped here."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import (
    CHAIN_TASKS,
    ROOT,
    commit,
    copy_build,
    copy_project,
    free_port,
    run_nbs,
    s3_client,
    start_service,
    stop_service,
    trim_pipeline,
)

from nbs_lib.core.tracking import process_alive

AIRFLOW = ROOT / ".venv-airflow" / "bin" / "airflow"
ADMIN = "admin"
pytestmark = pytest.mark.build


@pytest.fixture(scope="module")
def team():
    "A project copy with its team server running: PostgreSQL and `mlflow server --app-name basic-auth`."
    # Not under pytest's tmp_path, which only its owner may enter: run as root, nbs runs
    # PostgreSQL as the postgres user, who must reach the project's .nbs-server/ folder.
    scratch = Path(tempfile.mkdtemp(prefix="nbs-team-"))
    scratch.chmod(0o711)
    project = copy_project(scratch / "project")
    # what is tested here is where runs go, not what the tasks do: 8 tasks, not 15; two candidates, which
    # Airflow's scheduler runs at once; a failed task retried after 1 s, not pipeline.yaml's minute
    trim_pipeline(project, candidates=2)
    spec = project / "pipeline.yaml"
    pipeline = yaml.safe_load(spec.read_text())
    pipeline["executor"]["retry_delay"] = 1
    spec.write_text(yaml.safe_dump(pipeline, sort_keys=False))
    commit(project, "the chain from data to a registered version")
    password = secrets.token_urlsafe(18)
    port, db_port = free_port(), free_port()
    started = run_nbs("server", "start", "--port", str(port), "--db-port", str(db_port), cwd=project,
                      env={"MLFLOW_AUTH_ADMIN_PASSWORD": password}, timeout=180)
    state_file = project / ".nbs-server" / "server.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() else None
    postmaster = project / ".nbs-server" / "postgres" / "data" / "postmaster.pid"
    postgres_pid = int(postmaster.read_text().split()[0]) if postmaster.is_file() else None
    saved = {name: os.environ.get(name) for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    os.environ.update(MLFLOW_TRACKING_USERNAME=ADMIN, MLFLOW_TRACKING_PASSWORD=password)  # for MlflowClient here
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        url = state["url"]
        yield {"project": project, "url": url, "password": password, "port": port, "db_port": db_port,
               "client_env": {"MLFLOW_TRACKING_URI": url, "MLFLOW_TRACKING_USERNAME": ADMIN,
                              "MLFLOW_TRACKING_PASSWORD": password}}
    finally:
        for name, value in saved.items():
            os.environ.pop(name) if value is None else os.environ.update({name: value})
        stopped = run_nbs("server", "stop", cwd=project, timeout=120)
        leftovers = []
        if state and process_alive(state["pid"]):
            os.killpg(state["pid"], signal.SIGKILL)
            leftovers.append(f"mlflow server {state['pid']}")
        if postgres_pid and process_alive(postgres_pid):
            os.kill(postgres_pid, signal.SIGKILL)
            leftovers.append(f"postgres {postgres_pid}")
        shutil.rmtree(scratch, ignore_errors=True)
        assert stopped.returncode == 0 and not leftovers, (stopped.stdout + stopped.stderr, leftovers)


def test_server_refuses_a_weak_or_missing_admin_password_and_starts_nothing(tmp_path):
    project = copy_project(tmp_path / "project")
    for password, words in [("", "is not set"), ("password1234", "well-known"), ("short", "fewer than 12")]:
        done = run_nbs("server", "start", "--port", str(free_port()), cwd=project,
                       env={"MLFLOW_AUTH_ADMIN_PASSWORD": password})
        assert done.returncode == 2 and words in done.stderr and "hint:" in done.stderr, done.stderr
    assert not (project / ".nbs-server").exists()


def test_status_names_the_running_server(team):
    status = run_nbs("server", "status", cwd=team["project"])
    assert status.returncode == 0 and team["url"] in status.stdout and "MLFLOW_TRACKING_USERNAME" in status.stdout


API = "/api/2.0/mlflow/experiments/search?max_results=1"


def test_requests_without_or_with_wrong_credentials_are_refused(team):
    url = team["url"]
    assert httpx.get(url + API).status_code == 401
    assert httpx.get(url + API, auth=(ADMIN, "wrong-password")).status_code == 401
    assert httpx.get(url + API, auth=("nobody", team["password"])).status_code == 401
    assert httpx.get(url + API, auth=(ADMIN, team["password"])).status_code == 200
    # the server caches a verified password (auth_cache_ttl_seconds), never a refusal into a pass
    assert httpx.get(url + API, auth=(ADMIN, team["password"] + "x")).status_code == 401


def test_a_foreign_host_header_is_refused(team):
    answer = httpx.get(team["url"] + API, auth=(ADMIN, team["password"]), headers={"Host": "evil.example"})
    assert answer.status_code == 403 and "Host" in answer.text
    answer = httpx.get(team["url"] + API, auth=(ADMIN, team["password"]),
                       headers={"Host": f"localhost:{team['port']}"})
    assert answer.status_code == 200


def test_a_foreign_origin_gets_no_cors_permission(team):
    auth = (ADMIN, team["password"])
    answer = httpx.get(team["url"] + API, auth=auth, headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in answer.headers
    preflight = httpx.options(team["url"] + "/api/2.0/mlflow/runs/create",
                              headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
    assert preflight.status_code >= 400 and "access-control-allow-origin" not in preflight.headers
    own = httpx.get(team["url"] + API, auth=auth, headers={"Origin": team["url"]})
    assert own.headers.get("access-control-allow-origin") == team["url"]


def test_artifact_paths_out_of_the_artifact_store_are_refused(team):
    auth = (ADMIN, team["password"])
    store = team["project"] / ".nbs-server" / "artifacts"
    escape = team["project"] / ".nbs-server" / "escaped.txt"
    base = team["url"] + "/api/2.0/mlflow-artifacts/artifacts/"
    for path in ["../escaped.txt", "..%2Fescaped.txt", "%2e%2e/escaped.txt", "x/../../escaped.txt"]:
        put = httpx.put(base + path, content=b"written from outside", auth=auth)
        assert put.status_code in (400, 403, 404), (path, put.status_code, put.text)
    assert not escape.exists()
    for path in ["../pgpass", "..%2Fpgpass", "%2e%2e/%2e%2e/.nbs-server/pgpass"]:
        got = httpx.get(base + path, auth=auth)
        assert got.status_code in (400, 403, 404) and "127.0.0.1" not in got.text, (path, got.status_code)
    assert store.is_dir()


def test_bad_credentials_give_a_clear_error_before_anything_runs(team):
    env = {**team["client_env"], "MLFLOW_TRACKING_PASSWORD": "not-the-password"}
    done = run_nbs("runs", cwd=team["project"], env=env, timeout=60)
    assert done.returncode == 2 and "refused user 'admin'" in done.stderr and "MLFLOW_TRACKING_PASSWORD" in done.stderr
    down = run_nbs("runs", cwd=team["project"], env={**team["client_env"],
                                                     "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"})
    assert down.returncode == 2 and "no tracking server answers" in down.stderr


TEAM = ["-p", "experiment=nbs-team", "-p", "model_name=nbs-team"]  # apart from the migration test's "nbs"
TEAM_TASKS = [*CHAIN_TASKS, "train-1"]  # the team project's grid has two candidates


@pytest.fixture(scope="module")
def local_build(team) -> str:
    "A local `nbs run` of the pipeline, tracked on the team server: its pipeline run's id."
    done = run_nbs("run", *TEAM, cwd=team["project"], env=team["client_env"], timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    client = _client(team)
    latest, = client.search_runs([client.get_experiment_by_name("nbs-team").experiment_id],
                                 "tags.`nbs.kind` = 'pipeline'",
                                 order_by=["attributes.start_time DESC"], max_results=1)
    return latest.info.run_id


def test_a_permission_the_server_refuses_is_one_line_with_its_own_exit_code(team):
    client, url = _client(team), team["url"]
    name = "permission-check"
    client.create_registered_model(name)
    run = client.create_run(client.create_experiment("permission-check"))
    client.create_model_version(name, f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
    viewer = {"username": "viewer", "password": secrets.token_urlsafe(18)}
    made = httpx.post(f"{url}/api/2.0/mlflow/users/create", json=viewer, auth=(ADMIN, team["password"]))
    assert made.status_code == 200, made.text  # a new user may read (the server's default), not edit
    env = {**team["client_env"], "MLFLOW_TRACKING_USERNAME": viewer["username"],
           "MLFLOW_TRACKING_PASSWORD": viewer["password"]}
    assert run_nbs("models", name, cwd=team["project"], env=env).returncode == 0
    refused = run_nbs("promote", name, "1", "--why", "not mine to promote", cwd=team["project"], env=env)
    assert refused.returncode == 77, refused.stdout + refused.stderr
    assert refused.stderr.startswith("nbs: error: the tracking store refused: ") and "Traceback" not in refused.stderr
    assert viewer["password"] not in refused.stderr
    assert not client.get_registered_model(name).aliases, "nothing changed"


def _client(team):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=team["url"])  # the credentials: set by the team fixture


def _shape(client, run_id: str) -> tuple[dict, dict]:
    "A pipeline run and its task runs, as what they hold (names of params, metrics, tags, artifacts)."
    parent = client.get_run(run_id)
    tasks = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{run_id}'",
                               max_results=100)

    def held(run) -> dict:
        return {"status": run.info.status, "params": sorted(run.data.params), "metrics": sorted(run.data.metrics),
                "tags": sorted(run.data.tags), "inputs": len(run.inputs.dataset_inputs),
                "artifacts": sorted(a.path for a in client.list_artifacts(run.info.run_id))}

    return held(parent), {run.data.tags["nbs.task"]: held(run) for run in tasks}


def test_the_pipeline_runs_against_the_server_with_artifacts_proxied(team, local_build):
    client = _client(team)
    parent, tasks = _shape(client, local_build)
    assert parent["status"] == "FINISHED" and sorted(tasks) == sorted(TEAM_TASKS)
    assert all(t["status"] == "FINISHED" for t in tasks.values())
    assert "notebook" in tasks["evaluate"]["artifacts"] and "dag.json" in parent["artifacts"]
    version = client.get_model_version_by_alias("nbs-team", "champion")
    assert version.run_id
    stored = list((team["project"] / ".nbs-server" / "artifacts").rglob("evaluate.ipynb"))
    assert stored, "the executed notebooks did not reach the server's artifact store"
    assert not (team["project"] / "mlflow.db").exists() and not (team["project"] / "mlartifacts").exists()


def test_a_task_run_needs_a_running_pipeline_run_and_end_fails_a_run_with_tasks_missing(team, local_build):
    env = team["client_env"]
    begun = run_nbs("task", "begin", "-p", "experiment=nbs-steps", cwd=team["project"], env=env, timeout=120)
    assert begun.returncode == 0, begun.stderr
    run_id = begun.stdout.strip().splitlines()[-1]
    client = _client(team)
    from nbs_lib.core.tracking import reap_orphans

    # what every local command on this host does first: `begin`'s process has ended, the orchestrator's run stays open
    assert reap_orphans(client, "nbs-steps") == [] and client.get_run(run_id).info.status == "RUNNING"
    ended = run_nbs("task", "end", "--pipeline-run", run_id, cwd=team["project"], env=env, timeout=120)
    assert ended.returncode == 1 and "no finished run of ingest" in ended.stderr
    assert client.get_run(run_id).info.status == "FAILED"
    late = run_nbs("task", "run", "ingest", "--pipeline-run", run_id, cwd=team["project"], env=env, timeout=120)
    assert late.returncode == 2 and "tasks join only a RUNNING pipeline run" in late.stderr
    missing = run_nbs("task", "run", "ingest", cwd=team["project"], env=env)
    assert missing.returncode == 2 and "--pipeline-run" in missing.stderr


def _airflow_settings(team, home: Path, api_port: int) -> dict:
    """The environment of Airflow's processes: LocalExecutor with four task slots, its metadata in the team server's
    PostgreSQL (database `airflow`, the password from libpq's password file), its API on 127.0.0.1, the tracking
    server and its credentials for the tasks."""
    project = team["project"]
    database = f"postgresql+psycopg://nbs@127.0.0.1:{team['db_port']}/airflow"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PYTHONPATH", "AIRFLOW"))}
    env.update(team["client_env"], AIRFLOW_HOME=str(home), AIRFLOW__CORE__DAGS_FOLDER=str(home / "dags"),
               AIRFLOW__CORE__LOAD_EXAMPLES="False", AIRFLOW__CORE__EXECUTOR="LocalExecutor",
               AIRFLOW__CORE__PARALLELISM="4", AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION="False",
               AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=database, AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC=database,
               PGPASSFILE=str(project / ".nbs-server" / "pgpass"),
               AIRFLOW__API__HOST="127.0.0.1", AIRFLOW__API__PORT=str(api_port),
               AIRFLOW__CORE__EXECUTION_API_SERVER_URL=f"http://127.0.0.1:{api_port}/execution/",
               AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT=str(free_port()),
               AIRFLOW__API_AUTH__JWT_SECRET=secrets.token_urlsafe(48), AIRFLOW__API__SECRET_KEY=secrets.token_urlsafe(48),
               AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS="True",  # a token for the asking, on 127.0.0.1 only
               PLOOMBER_STATS_ENABLED="false", PYTHONPATH=str(project),  # the copy's nbs_lib, for its `nbs` and kernels
               # the tasks' warm worker (the DAG's NBS_WARM=1) keeps its socket here: a short path (107 bytes at most)
               TMPDIR=tempfile.mkdtemp(prefix="nbs-af-"))
    return env


def _warm_workers(env: dict) -> list[dict]:
    "What each warm worker the DAG's tasks started says of itself; each is stopped."
    import psutil

    from nbs_lib.cli.warm import ask_worker

    said = []
    for lock in Path(env["TMPDIR"]).glob("nbs-warm-*/*.lock"):
        found = ask_worker(lock.with_suffix(".sock"), "status")
        if found is not None:
            said.append(found)
            ask_worker(lock.with_suffix(".sock"), "stop")
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(found["pid"]).wait(timeout=60)
    return said


def _stop_with_descendants(process: subprocess.Popen) -> None:
    "Stop `process` by its group, then whatever it started that still runs: Airflow's task supervisors and their tasks have groups of their own."
    import psutil

    try:
        children = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    stop_service(process)
    for child in children:  # those in a group of their own are still running only if a DAG run was cut short
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass


def _wait_for_runs(api: httpx.Client, run_ids: list[str], processes: dict, timeout: float = 1200) -> dict[str, dict]:
    "Each DAG run of `run_ids` once it has ended, polled through Airflow's REST API while its processes run."
    deadline, ended = time.monotonic() + timeout, {}
    while len(ended) < len(run_ids):
        for run_id in set(run_ids) - set(ended):
            run = api.get(f"/api/v2/dags/nbs_pipeline/dagRuns/{run_id}").raise_for_status().json()
            if run["state"] in ("success", "failed"):
                ended[run_id] = run
        stopped = [name for name, process in processes.items() if process.poll() is not None]
        assert not stopped and time.monotonic() < deadline, (stopped, ended)
        time.sleep(1)
    return ended


def _task_instances(api: httpx.Client, run_id: str) -> dict[str, dict]:
    instances = api.get(f"/api/v2/dags/nbs_pipeline/dagRuns/{run_id}/taskInstances").raise_for_status().json()
    return {ti["task_id"]: ti for ti in instances["task_instances"]}


def test_the_exported_dag_runs_under_airflows_scheduler_as_a_local_run_does(team, local_build, tmp_path):
    """Airflow's scheduler, API server and DAG processor (LocalExecutor, on the team server's PostgreSQL) run the
    exported DAG: the grid's candidates at once, each task's run under the build's run with what a local run records,
    a version registered; a failing task retried once (pipeline.yaml's retries), then the DAG run failed with the task's
    runs FAILED. Each of those processes is stopped here, by its process group."""
    assert AIRFLOW.is_file(), f"{AIRFLOW} is missing: `make test` (or `make airflow`) installs it"
    project, home, api_port = team["project"], tmp_path / "airflow", free_port()
    exported = run_nbs("export", "airflow", "-o", str(home / "dags" / "nbs_pipeline.py"), cwd=project)
    assert exported.returncode == 0, exported.stderr
    source = (home / "dags" / "nbs_pipeline.py").read_text()
    assert "'retries': 1, 'retry_delay': timedelta(seconds=1)" in source and "timedelta(seconds=7200)" in source
    env = _airflow_settings(team, home, api_port)
    migrated = subprocess.run([str(AIRFLOW), "db", "migrate"], env=env, capture_output=True, text=True, timeout=300)
    assert migrated.returncode == 0, migrated.stderr[-3000:]  # in the `airflow` database `nbs server` made

    url = f"http://127.0.0.1:{api_port}"
    processes = {"api-server": start_service([str(AIRFLOW), "api-server", "--host", "127.0.0.1", "--port", str(api_port)],
                                             f"{url}/api/v2/monitor/health", tmp_path,
                                             tmp_path / "api-server.log", env, timeout=180)}
    try:
        for name in ("scheduler", "dag-processor"):
            with open(tmp_path / f"{name}.log", "w") as log:
                processes[name] = subprocess.Popen([str(AIRFLOW), name], cwd=tmp_path, env=env, stdout=log,
                                                   stderr=subprocess.STDOUT, start_new_session=True)
        token = httpx.get(f"{url}/auth/token").raise_for_status().json()["access_token"]
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30) as api:
            deadline = time.monotonic() + 180
            while api.get("/api/v2/dags/nbs_pipeline").status_code != 200:  # the DAG processor has not parsed it yet
                assert time.monotonic() < deadline, (tmp_path / "dag-processor.log").read_text()[-3000:]
                time.sleep(1)
            runs = {}
            for kind, conf in [("good", {"experiment": "nbs-airflow", "model_name": "nbs-airflow", "cv_folds": 4}),
                               ("failing", {"experiment": "nbs-airflow-fails", "min_rows": 100_000})]:  # validate refuses
                # through the API, as `airflow dags trigger` does it, without that command's 6 s of CPU
                triggered = api.post("/api/v2/dags/nbs_pipeline/dagRuns", json={"logical_date": None, "conf": conf})
                assert triggered.status_code == 200, triggered.text
                runs[kind] = triggered.json()["dag_run_id"]
            ended = _wait_for_runs(api, list(runs.values()), processes)
            good, failing = _task_instances(api, runs["good"]), _task_instances(api, runs["failing"])
    finally:
        workers = _warm_workers(env)  # before Airflow's processes: one that adopted the worker would kill it
        for process in processes.values():
            _stop_with_descendants(process)
        shutil.rmtree(env["TMPDIR"], ignore_errors=True)
    # the first task ran cold and started the worker; the tasks after it started from the worker
    assert len(workers) == 1 and workers[0]["served"] >= 1, workers
    logs = {name: (tmp_path / f"{name}.log").read_text()[-3000:] for name in processes}
    assert ended[runs["good"]]["state"] == "success", (good, logs["scheduler"])
    assert {ti["state"] for ti in good.values()} == {"success"}
    candidates = [good["train-0"], good["train-1"]]
    assert max(ti["start_date"] for ti in candidates) < min(ti["end_date"] for ti in candidates), "the grid ran at once"

    client = _client(team)
    airflow_run, = client.search_runs([client.get_experiment_by_name("nbs-airflow").experiment_id],
                                      "tags.`nbs.kind` = 'pipeline'")
    local_parent, local_tasks = _shape(client, local_build)
    airflow_parent, airflow_tasks = _shape(client, airflow_run.info.run_id)
    # the same records, and the mark of a run its orchestrator ends (no local command may take it for an orphan)
    assert airflow_parent["status"] == "FINISHED" and airflow_parent["tags"] == sorted([*local_parent["tags"],
                                                                                         "nbs.orchestrated"])
    assert {**airflow_parent, "tags": local_parent["tags"]} == local_parent
    assert sorted(airflow_tasks) == sorted(local_tasks) == sorted(TEAM_TASKS)
    for name, held in local_tasks.items():
        assert airflow_tasks[name] == held, name
    assert airflow_run.data.params["cv_folds"] == "4" and airflow_run.data.params["model_name"] == "nbs-airflow"  # the conf
    version, = client.search_model_versions("name = 'nbs-airflow'")
    assert any(key.startswith("nbs.gate.") for key in version.tags), version.tags  # the gate decided on it

    assert ended[runs["failing"]]["state"] == "failed"
    assert failing["validate"]["state"] == "failed" and failing["validate"]["try_number"] == 2, failing["validate"]
    assert failing["features"]["state"] == "upstream_failed" and failing["end"]["state"] == "failed"
    failed_run, = client.search_runs([client.get_experiment_by_name("nbs-airflow-fails").experiment_id],
                                     "tags.`nbs.kind` = 'pipeline'")
    tries = client.search_runs([failed_run.info.experiment_id], f"tags.`mlflow.parentRunId` = '{failed_run.info.run_id}' "
                               "and tags.`nbs.task` = 'validate'")
    assert failed_run.info.status == "FAILED" and [t.info.status for t in tries] == ["FAILED", "FAILED"]


def test_runs_and_models_of_the_embedded_store_move_to_the_server(team, shared_build, tmp_path):
    solo = copy_build(shared_build, tmp_path / "solo")  # one person's project: the embedded store ./mlflow.db
    from mlflow import MlflowClient

    local = MlflowClient(tracking_uri=f"sqlite:///{solo}/mlflow.db")
    local_runs = local.search_runs([local.get_experiment_by_name("nbs").experiment_id], max_results=1000)
    local_champion = local.get_model_version_by_alias("nbs-classifier", "champion")

    moved = run_nbs("server", "migrate", cwd=solo, env=team["client_env"], timeout=900)
    assert moved.returncode == 0, moved.stdout + moved.stderr
    assert f"{len(local_runs)} runs copied (0 already there)" in moved.stdout, moved.stdout
    again = run_nbs("server", "migrate", cwd=solo, env=team["client_env"], timeout=900)
    assert f"0 runs copied ({len(local_runs)} already there)" in again.stdout, again.stdout

    client = _client(team)
    server_runs = client.search_runs([client.get_experiment_by_name("nbs").experiment_id], max_results=1000)
    assert sorted(r.info.run_name for r in server_runs) == sorted(r.info.run_name for r in local_runs)
    champion = client.get_model_version_by_alias("nbs-classifier", "champion")
    assert str(champion.version) == str(local_champion.version)
    copied_run = client.get_run(champion.run_id)
    assert copied_run.data.tags["nbs.migrated_from"].endswith(f"#{local_champion.run_id}")
    assert copied_run.data.metrics == local.get_run(local_champion.run_id).data.metrics
    import mlflow.sklearn
    import pandas as pd

    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(team["url"])
    try:
        model = mlflow.sklearn.load_model("models:/nbs-classifier@champion")
    finally:
        mlflow.set_tracking_uri(before)
    rows = pd.read_parquet(solo / "products" / "data" / "test.parquet").drop(columns="target").head(5)
    assert len(model.predict(rows)) == 5

    nowhere = run_nbs("server", "migrate", cwd=solo, env={"MLFLOW_TRACKING_URI": ""})
    assert nowhere.returncode == 2 and "names no tracking server" in nowhere.stderr


def test_a_task_on_another_checkout_takes_its_inputs_from_the_product_store(tmp_path, s3):
    """No shared disk: the workers share a bucket of a real S3-compatible server on 127.0.0.1. A shared folder (NFS, a
    mounted bucket) is the same path through nbs with Ploomber's LocalStorageClient for S3Client: its two-worker
    example is in notebooks/28_storage.ipynb, so this four-task build runs once, on the store that needs a server."""
    import hashlib

    first, second = copy_project(tmp_path / "worker-1"), copy_project(tmp_path / "worker-2")
    env = dict(s3)
    bucket = s3_client(env)
    bucket.create_bucket(Bucket="products")
    env["NBS_PRODUCT_STORE"] = "s3://products/team-a"

    def stored(key: str) -> bool:
        pages = bucket.get_paginator("list_objects_v2").paginate(Bucket="products", Prefix="team-a/")
        return f"team-a/{key}" in {item["Key"] for page in pages for item in page.get("Contents", [])}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path}/shared.db"
    begun = run_nbs("task", "begin", cwd=first, env=env)
    assert begun.returncode == 0, begun.stderr
    run_id = begun.stdout.strip().splitlines()[-1]
    for name in ("ingest", "validate", "feature_tables"):
        done = run_nbs("task", "run", name, "--pipeline-run", run_id, cwd=first, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
    assert stored("products/data/labels.parquet") and stored("products/data/.labels.parquet.metadata")

    # features reads the feature store: the table and Feast's registry come over with the labels
    features = run_nbs("task", "run", "features", "--pipeline-run", run_id, cwd=second, env=env)
    assert features.returncode == 0, features.stderr[-3000:]
    for fetched in ("products/data/labels.parquet", "feature_repo/data/nbs-classifier.parquet",
                    "feature_repo/data/registry.db"):
        assert f"fetched {fetched} from the product store" in features.stderr, features.stderr[-3000:]
    assert stored("products/data/train.parquet")  # for the next worker
    assert (second / "products" / "data" / "columns.json").is_file()  # validate's decisions, which features reads
    assert not (second / "products" / "data" / "raw.parquet").exists()  # only its upstream tasks' products came over
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    task_run, = client.search_runs([client.get_run(run_id).info.experiment_id],
                                   f"tags.`mlflow.parentRunId` = '{run_id}' and tags.`nbs.task` = 'features'")
    read = {i.dataset.name: i for i in task_run.inputs.dataset_inputs}["feature_tables.labels"]
    digest = hashlib.sha256((first / "products" / "data" / "labels.parquet").read_bytes()).hexdigest()
    assert {t.key: t.value for t in read.tags}["sha256"] == digest

    bare = copy_project(tmp_path / "worker-3")
    lonely = run_nbs("task", "run", "features", "--pipeline-run", run_id, cwd=bare,
                     env={"MLFLOW_TRACKING_URI": env["MLFLOW_TRACKING_URI"]})
    assert lonely.returncode == 2 and "no product store is set" in lonely.stderr, lonely.stderr
    # a bucket that is missing or a server that does not answer: one line, before any run opens
    pipeline_runs = len(client.search_runs([task_run.info.experiment_id], "tags.`nbs.kind` = 'pipeline'"))
    for wrong, says in [({"NBS_PRODUCT_STORE": "s3://no-such-bucket/team-a"}, "the bucket 'no-such-bucket' does not exist"),
                        ({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}, "no S3 server answers")]:
        refused = run_nbs("task", "begin", cwd=bare, env={**env, **wrong})
        assert refused.returncode == 2 and refused.stderr.startswith("nbs: error: NBS_PRODUCT_STORE: "), refused.stderr
        assert says in refused.stderr, refused.stderr
        assert "Traceback" not in refused.stderr and len(refused.stderr.strip().splitlines()) == 2, refused.stderr
    assert len(client.search_runs([task_run.info.experiment_id], "tags.`nbs.kind` = 'pipeline'")) == pipeline_runs


def test_nbs_server_in_the_foreground_stops_everything_on_ctrl_c():
    scratch = Path(tempfile.mkdtemp(prefix="nbs-team-"))
    scratch.chmod(0o711)
    project = copy_project(scratch / "project")
    env = {**os.environ, "MLFLOW_AUTH_ADMIN_PASSWORD": secrets.token_urlsafe(18), "PYTHONPATH": str(project)}
    server = subprocess.Popen([str(ROOT / ".venv" / "bin" / "nbs"), "server", "--port", str(free_port()),
                               "--db-port", str(free_port())], cwd=project, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        lines = [server.stdout.readline() for _ in range(5)]
        assert any("Ctrl-C stops it" in line for line in lines), lines + [server.stderr.read()]
        state = json.loads((project / ".nbs-server" / "server.json").read_text())
        postgres_pid = int((project / ".nbs-server" / "postgres" / "data" / "postmaster.pid").read_text().split()[0])
        assert httpx.get(state["url"] + "/health").status_code == 200
        server.send_signal(signal.SIGINT)
        out, err = server.communicate(timeout=90)
        assert server.returncode == 0, err
        assert "stopped MLflow server" in out and "stopped PostgreSQL" in out
        assert not process_alive(state["pid"]) and not process_alive(postgres_pid)
        assert not (project / ".nbs-server" / "server.json").exists()
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
            run_nbs("server", "stop", cwd=project)
        shutil.rmtree(scratch, ignore_errors=True)


def test_the_team_server_keeps_artifacts_in_an_s3_bucket(s3):
    "`nbs server start --artifacts-destination s3://...` on a real S3-compatible server (moto's) on 127.0.0.1."
    scratch = Path(tempfile.mkdtemp(prefix="nbs-team-"))
    scratch.chmod(0o711)
    project = copy_project(scratch / "project")
    s3_client(s3).create_bucket(Bucket="artifacts")
    env = {**s3, "MLFLOW_AUTH_ADMIN_PASSWORD": secrets.token_urlsafe(18)}
    ports = ["--port", str(free_port()), "--db-port", str(free_port())]
    try:
        missing = run_nbs("server", "start", *ports, "--artifacts-destination", "s3://no-such-bucket/mlflow", cwd=project,
                          env=env)
        assert missing.returncode == 2 and "the bucket 'no-such-bucket' does not exist" in missing.stderr, missing.stderr
        assert not (project / ".nbs-server" / "postgres").exists(), "refused before PostgreSQL was set up"
        started = run_nbs("server", "start", *ports, "--artifacts-destination", "s3://artifacts/mlflow", cwd=project,
                          env=env, timeout=180)
        assert started.returncode == 0, started.stdout + started.stderr
        status = run_nbs("server", "status", cwd=project, env=env)
        assert "artifacts in s3://artifacts/mlflow" in status.stdout, status.stdout
        url = json.loads((project / ".nbs-server" / "server.json").read_text())["url"]
        import nbformat

        nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("print(6 * 7)")],
                                                metadata={"kernelspec": {"name": "python3", "language": "python",
                                                                         "display_name": "Python 3"}}),
                       project / "answer.ipynb")
        client_env = {"MLFLOW_TRACKING_URI": url, "MLFLOW_TRACKING_USERNAME": ADMIN,
                      "MLFLOW_TRACKING_PASSWORD": env["MLFLOW_AUTH_ADMIN_PASSWORD"]}  # no AWS_*: the server writes
        done = run_nbs("execute", "answer.ipynb", "answered.ipynb", cwd=project,
                       env={**{k: "" for k in s3}, **client_env})
        assert done.returncode == 0, done.stderr
        pages = s3_client(s3).get_paginator("list_objects_v2").paginate(Bucket="artifacts", Prefix="mlflow/")
        keys = [item["Key"] for page in pages for item in page.get("Contents", [])]
        assert any(key.endswith("/answered.ipynb") for key in keys), keys
        assert not any((project / ".nbs-server" / "artifacts").rglob("*.ipynb")), "nothing on the server's disk"
    finally:
        stopped = run_nbs("server", "stop", cwd=project, timeout=120)
        shutil.rmtree(scratch, ignore_errors=True)
    assert stopped.returncode == 0, stopped.stderr
