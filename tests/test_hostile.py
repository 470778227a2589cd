"""Every `nbs` subcommand with hostile arguments: one line `nbs: error: ...` naming what was wrong, exit 1 or 2,
no traceback, nothing of the project overwritten and no run left RUNNING."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
from conftest import drive, free_port, run_nbs, store

# (arguments, what the message must say): {dir} is a scratch folder holding the files made below
CASES = [
    ("nosuch", "No such command 'nosuch'"),
    ("run -p nosuch=1", "parameter 'nosuch' is not declared"),
    ("run --env-file {dir}/missing.yaml", "missing.yaml: file not found"),
    ("run --only nosuch", "no task named 'nosuch'"),
    ("run --wait soon", "Invalid value for '--wait': 'soon' is not a number of seconds"),
    ("run -p feature_owner={{{{env.HOME}}}}", "reads the environment variable HOME ({{{{env.HOME}}}}), which the project"),
    ("status --root {dir}/missing", "no pipeline.yaml here or in any parent folder"),
    ("plot -o {dir}/a-file/dag.png", "a-file is a file, not a folder"),
    ("runs -n 0", "Invalid value for '-n' / '--limit': '0' is not a whole number of 1 or more"),
    ("execute {dir}/missing.ipynb", "missing.ipynb: no such notebook"),
    ("execute {dir}/broken.ipynb", "broken.ipynb: is not a notebook nbs can read"),
    ("execute {dir}/plain.ipynb -o env.yaml", "env.yaml: is a source of the project"),
    ("execute {dir}/plain.ipynb -o notebooks/pipeline/10_ingest.ipynb", "is a source of the project"),
    ("execute {dir}/plain.ipynb -o {dir}/notes.txt", "notes.txt: exists and is not a notebook"),
    ("execute {dir}/plain.ipynb -o {dir}/a-file/out.ipynb", "a-file is a file, not a folder"),
    ("execute {dir}/plain.ipynb --timeout -1", "'timeout' is -1.0; it must be more than 0 seconds"),
    ("schedule list --file {dir}/missing.yaml", "missing.yaml: file not found"),
    ("schedule fire nosuch", "no job named 'nosuch'"),
    ("task run nosuch --pipeline-run abc", "no task named 'nosuch'"),
    ("task end --pipeline-run abc", "no MLflow run 'abc'"),
    ("export airflow -o {dir}/a-file/dag.py", "a-file is a file, not a folder"),
    ("promote nosuch 1 --why test", "models:/nosuch: is not a registered model"),
    ("promote nosuch one --why test", "Invalid value for 'VERSION': 'one' is not a valid integer"),
    ("rollback nosuch", "models:/nosuch: is not a registered model"),
    ("models nosuch", "Registered Model with name=nosuch not found"),
    ("features", "has no feature registry yet"),
    ("serve --port 70000", "Invalid value for '--port': '70000' is not a port"),
    ("serve --canary-weight 0.5", "--canary-weight: needs --canary VERSION"),
    ("predict --input {dir}/missing.csv --output {dir}/out.csv", "the input {dir}/missing.csv does not exist"),
    ("predict --input {dir}/notes.txt --output {dir}/out.csv", "is neither CSV nor Parquet"),
    ("predict --input {dir}/empty.csv --output {dir}/a-folder.csv", "a-folder.csv: is a folder"),
    ("predict --input {dir}/empty.csv --output {dir}/a-file/out.csv", "a-file is a file, not a folder"),
    ("monitor", "predictions.db: holds no prediction log"),
    ("retrain", "holds no prediction log"),
    ("simulate --url http://127.0.0.1:{port}", "nbs serve: does not answer at http://127.0.0.1:{port}"),
    ("lineage not-a-uri", "is not a model URI of the form"),
    ("reproduce models:/nosuch/1", "names no model version"),
    ("new task 'bad name!' --after ingest", "is not a task name"),
    ("new module ../evil", "is not a module name"),
    ("check --root {dir}/missing", "no pipeline.yaml here or in any parent folder"),
    ("server --port 70000 status", "is not a port"),
]
UNREACHABLE_STORE = ["models", "runs", "promote nbs-classifier 1 --why test", "lineage models:/nbs-classifier/1"]


@pytest.fixture
def hostile(project: Path, tmp_path: Path) -> tuple[Path, Path]:
    "A project (its own copy) and a folder of hostile inputs beside it."
    scratch = tmp_path / "inputs"
    scratch.mkdir()
    (scratch / "broken.yaml").write_text("seed: [\n")
    (scratch / "broken.ipynb").write_text("{not json")
    (scratch / "plain.ipynb").write_text('{"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}')
    (scratch / "notes.txt").write_text("keep me\n")
    (scratch / "empty.csv").write_text("")
    (scratch / "a-file").write_text("")
    (scratch / "a-folder.csv").mkdir()
    return project, scratch


def _said(done, args: str) -> str:
    return f"nbs {args} -> exit {done.returncode}\n{done.stderr[-2000:]}"


def test_every_subcommand_refuses_hostile_arguments_in_one_line(hostile):
    project, scratch = hostile
    sources = {name: (project / name).read_bytes() for name in ("env.yaml", "pipeline.yaml")}
    ingest = (project / "notebooks/pipeline/10_ingest.ipynb").read_bytes()
    port = free_port()
    cases = [(args.format(dir=scratch, port=port), says.format(dir=scratch, port=port)) for args, says in CASES]
    done = drive(project, [shlex.split(args) for args, _ in cases])
    for (args, says), result in zip(cases, done, strict=True):
        assert result.returncode in (1, 2), _said(result, args)
        assert result.stderr.startswith("nbs: error: "), _said(result, args)
        assert says in result.stderr, _said(result, args)
        assert "Traceback" not in result.stderr + result.stdout and "unexpected" not in result.stderr, _said(result, args)
    assert {name: (project / name).read_bytes() for name in sources} == sources
    assert (project / "notebooks/pipeline/10_ingest.ipynb").read_bytes() == ingest
    assert (scratch / "notes.txt").read_text() == "keep me\n"
    assert not list(scratch.glob("**/*.partial")) and not list(scratch.glob("**/.*.check"))
    if (project / "mlflow.db").exists():
        running = store(project).search_runs(
            [e.experiment_id for e in store(project).search_experiments()], "attributes.status = 'RUNNING'")
        assert running == [], [r.data.tags for r in running]


def test_an_unreachable_tracking_server_is_one_line(hostile):
    project, _ = hostile
    uri = f"http://127.0.0.1:{free_port()}"
    env = {"MLFLOW_TRACKING_URI": uri, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    for args in UNREACHABLE_STORE:
        done = run_nbs(*shlex.split(args), cwd=project, env=env, timeout=120)
        assert done.returncode in (1, 2), _said(done, args)
        assert done.stderr.startswith("nbs: error: ") and uri in done.stderr, _said(done, args)
        assert "Traceback" not in done.stderr, _said(done, args)

