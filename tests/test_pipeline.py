"""The whole pipeline in real papermill kernels, tracked in a real MLflow store: the session's shared build is
read as it is; a test that changes a build changes a copy of it (`copy_build`)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest
from conftest import (
    NBS,
    copy_build,
    free_port,
    run_nbs,
    runs_of,
    start_service,
    stop_service,
    store,
)

GRID = ["train-0", "train-1", "train-2", "train-3"]  # the grid of pipeline.yaml
CANDIDATES = [*GRID, "train-tuned"]  # everything evaluate chooses from
TASKS = ["ingest", "eda", "validate", "feature_tables", "features", "materialize", *GRID, "tune", "train-tuned", "evaluate",
         "register", "catalogue"]


@pytest.fixture
def built(shared_build, shared_build_output):
    "The shared build (read only) and what its `nbs run` printed."
    return shared_build, subprocess.CompletedProcess([], shared_build_output["returncode"],
                                                     shared_build_output["stdout"], shared_build_output["stderr"])


@pytest.fixture
def rebuilt(shared_build, tmp_path):
    "A copy of the shared build, for a test that builds again or changes the registry."
    return copy_build(shared_build, tmp_path / "project")


def test_run_writes_every_declared_product(built):
    root, done = built
    for path in ["data/raw.parquet", "data/validated.parquet", "data/train.parquet",
                 "data/test.parquet", "model/registered.json", "evaluation/metrics.json",
                 "evaluation/selection.json", "evaluation/errors.png", "evaluation/curve.png",
                 "evaluation/importance.png", "evaluation/importance.csv", "model/model_card.md",
                 "model/model_card.html", "eda/summary.csv", "eda/distributions.png", "eda/correlations.png",
                 "tune/best.json", "tune/study.db", "model/model-tuned.joblib", "model/scores-tuned.json",
                 "data/labels.parquet", "features/stats.csv", "features/materialized.json", "features/catalogue.csv",
                 "features/catalogue.html",
                 *[f"model/{kind}-{i}.{ext}" for i in range(4) for kind, ext in [("model", "joblib"), ("scores", "json")]],
                 *[f"executed/{t}.ipynb" for t in TASKS]]:
        assert (root / "products" / path).is_file(), path
    assert "Ran 15 of 15 tasks" in done.stdout
    # the copy has no Makefile, so its `make ui` target is not named: MLflow's own command is
    assert "Tracked in sqlite:///" in done.stdout
    assert "To browse the runs: mlflow ui --backend-store-uri sqlite:///" in done.stdout
    metrics = json.loads((root / "products/evaluation/metrics.json").read_text())
    assert metrics["roc_auc"] > 0.95


def test_one_parent_run_with_a_finished_child_per_task(built):
    root, _ = built
    runs = runs_of(root)
    parents = [r for r in runs if r.data.tags["nbs.kind"] == "pipeline"]
    children = [r for r in runs if r.data.tags["nbs.kind"] == "task"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(r.data.tags["nbs.task"] for r in children) == sorted(TASKS)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                          text=True).stdout.strip()
    client = store(root)
    for run in children:
        task = run.data.tags["nbs.task"]
        assert run.info.status == "FINISHED", task
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert run.data.tags["nbs.notebook"].startswith("notebooks/pipeline/")
        assert run.data.tags["mlflow.source.git.commit"] == head
        artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "notebook")]
        assert artifacts == [f"notebook/{task}.html", f"notebook/{task}.ipynb"], task
    by_task = {r.data.tags["nbs.task"]: r for r in children}
    assert by_task["ingest"].data.params == {"data_path": "", "target": "target"}
    assert by_task["ingest"].data.metrics == {"rows": 569.0, "columns": 31.0}
    assert by_task["train-0"].data.params["model"] == "linear"
    assert by_task["train-0"].data.params["model_params"] == "{'classification': {'C': 0.1}, 'regression': {'alpha': 10.0}}"
    assert by_task["validate"].data.tags["nbs.task_type"] == "classification"
    assert by_task["evaluate"].data.metrics["accuracy"] > 0.9
    assert parents[0].data.params["seed"] == "42"
    assert "model" not in parents[0].data.params, "candidates differ: their own runs hold it"


def test_grid_trains_every_candidate_in_parallel_and_registers_the_best(built):
    root, done = built
    assert "database is locked" not in done.stderr
    runs = {r.data.tags["nbs.task"]: r for r in runs_of(root) if r.data.tags["nbs.kind"] == "task"}
    trained = [runs[name] for name in GRID]
    assert {runs[name].info.status for name in CANDIDATES} == {"FINISHED"}
    assert [(r.data.params["model"], r.data.params["model_params"]) for r in trained] == [
        ("linear", "{'classification': {'C': 0.1}, 'regression': {'alpha': 10.0}}"),
        ("linear", "{'classification': {'C': 1.0}, 'regression': {'alpha': 1.0}}"),
        ("random_forest", "{'n_estimators': 200, 'max_depth': 6}"),
        ("gradient_boosting", "{'n_estimators': 100, 'learning_rate': 0.1}")]
    # tune heads the longest chain, so it starts first, beside the grid's first candidate
    side_by_side = [*trained, runs["tune"]]
    overlapping = [(a.data.tags["nbs.task"], b.data.tags["nbs.task"]) for a in side_by_side for b in side_by_side
                   if a is not b and a.info.start_time < b.info.start_time < a.info.end_time]
    assert overlapping, "no two of the grid's candidates and tune ran at the same time"
    # evaluate starts once every candidate's kernel is done; their runs end when their notebooks are attached,
    # which a recording thread does beside the tasks that follow (notebooks/26_executor.ipynb)
    ended = max(datetime.fromisoformat(json.loads((root / f"products/executed/{name}.ipynb").read_text())
                                       ["metadata"]["papermill"]["end_time"]) for name in CANDIDATES)
    assert runs["evaluate"].info.start_time >= ended.timestamp() * 1000
    cv = {name: runs[name].data.metrics["cv_roc_auc"] for name in CANDIDATES}
    best = max(CANDIDATES, key=lambda name: cv[name])  # max keeps the first of equals, like the ranking
    selection = json.loads((root / "products/evaluation/selection.json").read_text())
    assert selection["chosen"] == runs["evaluate"].data.tags["nbs.chosen"] == best
    assert list(selection["candidates"]) == sorted(CANDIDATES, key=lambda name: -cv[name])
    version = store(root).get_model_version_by_alias("nbs-classifier", "challenger")
    assert version.tags["nbs.candidate"] == best
    assert version.tags["cv.roc_auc"] == str(cv[best])


def test_lineage_chain_of_a_registered_version(built):
    root, _ = built
    done = run_nbs("lineage", "models:/nbs-classifier@champion", "--json", cwd=root)
    assert done.returncode == 0, done.stderr
    chain = json.loads(done.stdout)
    runs = {r.data.tags["nbs.task"]: r for r in runs_of(root) if r.data.tags["nbs.kind"] == "task"}
    pipeline_id = runs["register"].data.tags["mlflow.parentRunId"]
    assert chain["uri"] == "models:/nbs-classifier/1" and "champion" in chain["aliases"]
    assert chain["pipeline"]["run_id"] == pipeline_id and chain["registered_by"] == runs["register"].info.run_id
    assert {t["task"]: t["run_id"] for t in chain["tasks"]} == {name: r.info.run_id for name, r in runs.items()
                                                                 if r.data.tags["mlflow.parentRunId"] == pipeline_id}
    assert chain["tasks"][0]["notebook"] == "notebooks/pipeline/10_ingest.ipynb"
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
    assert chain["pipeline"]["commit"] == commit
    assert chain["data"]["raw_digest"] == runs["ingest"].data.tags["nbs.data_digest"]
    assert chain["data"]["source"] == "builtin:breast_cancer" and chain["gate"]["promote"] is True
    assert [e["action"] for e in chain["history"]] == ["promote"]
    printed = run_nbs("lineage", "models:/nbs-classifier/1", cwd=root).stdout
    assert f"pipeline   run {pipeline_id} FINISHED" in printed and "gate       promoted:" in printed
    unknown = run_nbs("lineage", "models:/nbs-classifier/99", cwd=root)
    assert unknown.returncode == 2 and "names no model version" in unknown.stderr


def test_model_card_has_every_section_filled(built, tmp_path):
    root, _ = built
    card = (root / "products/model/model_card.md").read_text()
    parts = re.split(r"^#+ (.+)$", card, flags=re.MULTILINE)[1:]
    sections = dict(zip(parts[::2], parts[1::2], strict=True))
    assert list(sections)[:3] == ["Intended use", "Limits", "Owners"], "the team's template comes first"
    expected = ["nbs-classifier version 1", "Training data", "Features", "Parameters",
                "Holdout metrics (95 % bootstrap intervals)", "Explainability: permutation importance (top 10)",
                "Promotion", "Lineage"]
    assert all(name in sections for name in expected), list(sections)
    assert all(body.strip() for body in sections.values()), "every section is filled"
    assert "`unknown`" not in card and "`None`" not in card and "? rows" not in card
    slices = next(body for name, body in sections.items() if name.startswith("Metrics per slice of"))
    assert sum(int(row.split("|")[2]) for row in slices.strip().splitlines()[2:]) == 114, "the slices cover the holdout"
    assert "builtin:breast_cancer" in sections["Training data"] and "455 rows" in sections["Training data"]
    assert "Gate: **promoted**" in sections["Promotion"] and "Approved: " in sections["Promotion"]
    assert all(f"notebooks/pipeline/{n}" in sections["Lineage"] for n in ["10_ingest.ipynb", "60_register.ipynb"])
    version = store(root).get_model_version("nbs-classifier", "1")
    run_id, path = version.tags["nbs.model_card"].removeprefix("runs:/").split("/", 1)
    html = Path(store(root).download_artifacts(run_id, path, str(tmp_path))).read_text()
    assert html == (root / "products/model/model_card.html").read_text() and "<h2>Lineage</h2>" in html


def test_evaluate_explains_the_chosen_model_by_permutation_importance(built, tmp_path):
    root, _ = built
    evaluate = next(r for r in runs_of(root) if r.data.tags.get("nbs.task") == "evaluate")
    client = store(root)
    table = json.loads(Path(client.download_artifacts(evaluate.info.run_id, "tables/permutation_importance.json",
                                                      str(tmp_path))).read_text())
    importances = pd.DataFrame(table["data"], columns=table["columns"])
    test = pd.read_parquet(root / "products/data/test.parquet")
    assert sorted(importances["feature"]) == sorted(c for c in test.columns if c != "target")
    assert importances["importance"].is_monotonic_decreasing and importances["importance"].iloc[0] > 0
    assert "plots/importance.png" in [a.path for a in client.list_artifacts(evaluate.info.run_id, "plots")]


def test_lineage_of_every_task_run(built, tmp_path):
    import hashlib

    from nbs_lib.core.lineage import file_digest, library_digest

    root, _ = built
    runs = runs_of(root)
    parent = next(r for r in runs if r.data.tags["nbs.kind"] == "pipeline")
    children = {r.data.tags["nbs.task"]: r for r in runs if r.data.tags["nbs.kind"] == "task"}
    client = store(root)
    dag = json.loads(open(client.download_artifacts(parent.info.run_id, "dag.json", str(tmp_path))).read())
    assert [t["name"] for t in dag["tasks"]] == TASKS
    assert ["ingest", "validate"] in dag["edges"]
    assert all([name, "evaluate"] in dag["edges"] and [name, "register"] in dag["edges"] for name in CANDIDATES)
    env_text = open(client.download_artifacts(parent.info.run_id, "environment/requirements.txt",
                                              str(tmp_path))).read()
    assert "mlflow==" in env_text
    assert parent.data.tags["nbs.env.sha256"] == hashlib.sha256(env_text.encode()).hexdigest()
    lib = library_digest()
    for task, run in children.items():
        tags = run.data.tags
        assert tags["nbs.git.dirty"] == "false", task
        assert tags["nbs.lib.version"] == lib["version"] and tags["nbs.lib.sha256"] == lib["all"]
        assert tags["nbs.pipeline_run_id"] == parent.info.run_id
        assert tags["nbs.notebook.sha256"] == file_digest(root / tags["nbs.notebook"])
    raw = root / "products/data/raw.parquet"
    assert children["ingest"].data.tags["nbs.output.data"] == f"products/data/raw.parquet sha256:{file_digest(raw)}"
    inputs = children["validate"].inputs.dataset_inputs
    assert [(i.dataset.name, i.dataset.source) for i in inputs] == [("ingest.data", "products/data/raw.parquet")]
    assert {t.key: t.value for t in inputs[0].tags}["sha256"] == file_digest(raw)
    evaluate_inputs = sorted(i.dataset.name for i in children["evaluate"].inputs.dataset_inputs)
    assert evaluate_inputs == sorted(["features.test", "features.train", "validate.columns", "validate.data",
                                      *[f"{name}.{key}" for name in CANDIDATES for key in ("model", "scores")]])


def test_mlflow_ui_shows_the_build_and_renders_a_task_notebook(built, page, tmp_path):
    import sys

    root, _ = built
    port = free_port()
    command = [str(Path(sys.executable).with_name("mlflow")), "ui", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    url = f"http://127.0.0.1:{port}"
    server = start_service(command, f"{url}/health", root, tmp_path / "ui.log",
                           {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    try:
        experiment = store(root).get_experiment_by_name("nbs").experiment_id
        page.goto(f"{url}/#/experiments/{experiment}/runs")
        parent = page.locator("[role=row]", has_text="pipeline").first
        parent.locator("button[data-component-id*=runnamecellrenderer]").click()  # show its child runs
        names = page.locator("[role=gridcell][col-id='attributes.`Run Name`']")
        names.filter(has_text="register").wait_for()
        assert set(TASKS) <= {text.split("\n")[-1] for text in names.all_inner_texts()}

        ingest = next(r for r in runs_of(root) if r.data.tags.get("nbs.task") == "ingest")
        page.goto(f"{url}/#/experiments/{experiment}/runs/{ingest.info.run_id}/artifacts")
        page.get_by_text("notebook", exact=True).first.click()
        page.get_by_text("ingest.html", exact=True).click()
        rendered = page.frame_locator("iframe").first
        assert rendered.locator("h1").first.inner_text().strip().startswith("Ingest")
        assert rendered.get_by_text("mean radius").first.is_visible(), "the executed cell's table"
    finally:
        stop_service(server)


def test_executed_notebook_holds_injected_parameters_and_outputs(built):
    root, _ = built
    nb = json.loads((root / "products/executed/features.ipynb").read_text())
    injected = [c for c in nb["cells"] if "injected-parameters" in c["metadata"].get("tags", [])]
    assert len(injected) == 1 and "test_size = 0.2" in "".join(injected[0]["source"])
    assert any(c.get("outputs") for c in nb["cells"])


def test_model_registered_as_champion_and_serves_like_the_product(built):
    import mlflow.pyfunc

    from nbs_lib.ml.train import load_model

    root, _ = built
    client = store(root)
    champion = client.get_model_version_by_alias("nbs-classifier", "champion")
    challenger = client.get_model_version_by_alias("nbs-classifier", "challenger")
    assert int(champion.version) == int(challenger.version) == 1
    gate = json.loads((root / "products/model/registered.json").read_text())["gate"]
    assert gate["promote"] and gate["reason"].startswith("thresholds met, roc_auc ") and gate["baseline"] == 0.5
    assert gate["reason"].endswith("beats the baseline's 0.5000 by more than 0.0, no champion yet"), gate
    assert json.loads(champion.tags["nbs.gate.promote"]) is True
    from nbs_lib.core.data import dataset_digest

    pipeline_run = client.get_run(champion.run_id).data.tags["mlflow.parentRunId"]
    assert champion.tags["nbs.pipeline_run"] == pipeline_run
    for table, kind in (("train", "train"), ("test", "holdout")):
        frame = pd.read_parquet(root / f"products/data/{table}.parquet")
        assert champion.tags[f"nbs.data.{kind}_digest"] == dataset_digest(frame)
        assert champion.tags[f"nbs.data.{kind}_rows"] == str(len(frame))
    mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")  # MLflow exports it to os.environ too: unset after
    try:
        served = mlflow.pyfunc.load_model("models:/nbs-classifier@champion")
    finally:  # else every later test of this worker and the processes it starts would write to the shared build
        mlflow.set_tracking_uri(None)
    test = pd.read_parquet(root / "products/data/test.parquet").drop(columns="target")
    chosen = json.loads((root / "products/evaluation/selection.json").read_text())["chosen"]
    product = load_model(root / f"products/model/model-{chosen.removeprefix('train-')}.joblib")
    assert np.array_equal(served.predict(test), product.predict(test))
    assert served.metadata.signature.inputs.input_names() == list(test.columns)


def test_second_run_skips_every_up_to_date_task(rebuilt):
    root = rebuilt
    before = len(runs_of(root))
    done = run_nbs("run", cwd=root)
    assert done.returncode == 0, done.stderr
    assert "All 15 tasks are up to date; nothing ran" in done.stdout
    assert len(runs_of(root)) == before


def test_status_says_what_would_run_and_why(built):
    root, _ = built
    done = run_nbs("status", cwd=root)
    assert done.returncode == 0, done.stderr
    assert [line.split()[:4] for line in done.stdout.splitlines()] == [
        [t, "up", "to", "date"] for t in TASKS]
    # told from what a no-op `nbs run` reads, without loading Ploomber (a fifth of a second, not seconds)
    probe = subprocess.run([sys.executable, "-c", "import sys\nfrom nbs_lib.cli import main\nmain(['status'])\n"
                            "print('ploomber' in sys.modules, file=sys.stderr)"], cwd=root, capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(root), "PLOOMBER_STATS_ENABLED": "false"})
    assert probe.stdout == done.stdout and probe.stderr.strip() == "False", probe.stderr
    changed = [" ".join(line.split()) for line in run_nbs("status", "-p", "seed=7", cwd=root).stdout.splitlines()]
    assert changed[0] == "ingest up to date" and changed[3] == "feature_tables up to date"
    assert changed[4] == "features would run parameter seed changed: 42 -> 7"
    assert changed[6] == "train-0 would run parameter seed changed: 42 -> 7; upstream features will run"
    assert changed[11] == ("train-tuned would run parameter seed changed: 42 -> 7; upstream features will run; "
                           "upstream tune will run")
    assert changed[12] == ("evaluate would run parameter seed changed: 42 -> 7; upstream features will run; "
                           + "; ".join(f"upstream {name} will run" for name in CANDIDATES))


def test_runs_lists_recent_pipeline_runs_with_metrics(built):
    root, _ = built
    done = run_nbs("runs", cwd=root)
    assert done.returncode == 0, done.stderr
    header, first = done.stdout.splitlines()[:2]
    assert header.split() == ["started", "status", "run_id", "commit", "evaluate.accuracy",
                              "evaluate.f1", "evaluate.roc_auc"]
    assert first.split()[2] == "FINISHED"
    metrics = json.loads((root / "products/evaluation/metrics.json").read_text())
    assert first.split()[-1] == f"{metrics['roc_auc']:.4g}"


def test_plot_draws_the_dag_offline(built, tmp_path):
    root, _ = built
    done = run_nbs("plot", "-o", str(tmp_path / "dag.png"), cwd=root)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "dag.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_op_shortcut_gives_way_when_a_product_is_gone(rebuilt):
    root = rebuilt
    assert (root / ".nbs/fresh-build.json").is_file(), "the build recorded no fingerprint"
    (root / "products/eda/distributions.png").unlink()  # eda's: nothing downstream, no new model version
    before = {r.info.run_id for r in runs_of(root)}
    done = run_nbs("run", cwd=root)
    assert done.returncode == 0, done.stdout + done.stderr
    new = [r for r in runs_of(root) if r.info.run_id not in before]
    assert [r.data.tags.get("nbs.task") for r in new if r.data.tags["nbs.kind"] == "task"] == ["eda"]
    assert (root / "products/eda/distributions.png").is_file()
    assert "All 15 tasks are up to date" in run_nbs("run", cwd=root).stdout


def test_parameter_override_reruns_only_affected_tasks(rebuilt):
    root = rebuilt
    before = {r.info.run_id for r in runs_of(root)}
    done = run_nbs("run", "-p", "cv_folds=4", cwd=root)
    assert done.returncode == 0, done.stdout + done.stderr
    new = [r for r in runs_of(root) if r.info.run_id not in before]
    assert sorted(r.data.tags.get("nbs.task") for r in new if r.data.tags["nbs.kind"] == "task") == [
        "catalogue", "evaluate", "register", *CANDIDATES, "tune"]
    assert {r.data.params["cv_folds"] for r in new if r.data.tags.get("nbs.task") in CANDIDATES} == {"4"}
    client = store(root)
    assert int(client.get_model_version_by_alias("nbs-classifier", "challenger").version) == 2
    second = client.get_model_version("nbs-classifier", "2")
    gate = {k.removeprefix("nbs.gate."): json.loads(v) for k, v in second.tags.items() if k.startswith("nbs.gate.")}
    assert gate["champion_version"] == 1 and gate["metric"] == "roc_auc"
    assert gate["promote"] == (gate["candidate"] - gate["champion"] > gate["margin"]), gate
    champion = client.get_model_version_by_alias("nbs-classifier", "champion")
    assert int(champion.version) == (2 if gate["promote"] else 1)


def test_promote_and_rollback_by_hand_are_recorded(rebuilt):
    from nbs_lib.ml.train import load_model
    from nbs_lib.registry.versions import register_model

    root = rebuilt
    train = pd.read_parquet(root / "products/data/train.parquet")
    with pytest.MonkeyPatch.context() as patch:  # a second version, as a later build would register
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")
        patch.chdir(root)
        register_model(load_model(root / "products/model/model-0.joblib"), "nbs-classifier", train.drop(columns="target"))
    client = store(root)
    before = int(client.get_model_version_by_alias("nbs-classifier", "champion").version)
    other = 2 if before == 1 else 1
    done = run_nbs("promote", "nbs-classifier", str(other), "--why", "canary looked good", cwd=root)
    assert done.returncode == 0, done.stderr
    assert int(client.get_model_version_by_alias("nbs-classifier", "champion").version) == other
    assert run_nbs("rollback", "nbs-classifier", "--why", "alerts", cwd=root).returncode == 0
    assert int(client.get_model_version_by_alias("nbs-classifier", "champion").version) == before
    listed = run_nbs("models", "nbs-classifier", cwd=root).stdout
    assert f"promote  version {other}" in listed and "canary looked good" in listed
    assert f"rollback version {before}" in listed and ": alerts" in listed
    missing = run_nbs("promote", "nbs-classifier", "99", "--why", "typo", cwd=root)
    assert missing.returncode == 2 and "has no version 99" in missing.stderr


def test_library_edit_reruns_exactly_the_tasks_that_import_it(rebuilt):
    import os
    import sys
    from pathlib import Path

    root = rebuilt
    env = {k: v for k, v in os.environ.items() if k != "IN_TEST"}

    def edit_and_run(notebook: str, text: str, module: str) -> list[str]:
        "Edit a docstring in a library notebook, export, build: the tasks that ran again."
        path = root / "notebooks" / notebook
        source = path.read_text()
        edited = source.replace(text, text.removesuffix(".") + " (edited).", 1)
        assert edited != source
        path.write_text(edited)
        subprocess.run([str(Path(sys.executable).with_name("nbdev_export"))], cwd=root, env=env, check=True)
        assert "(edited)" in (root / "nbs_lib" / module).read_text()
        before = {r.info.run_id for r in runs_of(root)}
        done = run_nbs("run", cwd=root)
        assert done.returncode == 0, done.stdout + done.stderr
        return sorted(r.data.tags.get("nbs.task") for r in runs_of(root)
                      if r.info.run_id not in before and r.data.tags["nbs.kind"] == "task")

    # serving code is no task's: no task notebook imports it, directly or through the library
    assert edit_and_run("50_scoring.ipynb", "One input column of a model's signature.", "serving/scoring.py") == []
    # only 60_register imports nbs_lib.registry.provenance; catalogue runs because it is downstream of register
    assert edit_and_run("41_provenance.ipynb", "`model_lineage` as the lines `nbs lineage` prints.",
                        "registry/provenance.py") == ["catalogue", "register"]
    assert "All 15 tasks are up to date" in run_nbs("run", cwd=root).stdout


def test_only_runs_just_the_named_task(rebuilt):
    root = rebuilt
    before = {r.info.run_id for r in runs_of(root)}
    done = run_nbs("run", "--only", "evaluate", "--force", cwd=root)
    assert done.returncode == 0, done.stdout + done.stderr
    new = [r for r in runs_of(root) if r.info.run_id not in before]
    assert sorted(r.data.tags.get("nbs.task", "pipeline") for r in new) == ["evaluate", "pipeline"]


def test_a_build_killed_after_registering_registers_no_twin_when_resumed(rebuilt):
    root, name = rebuilt, "nbs-classifier"
    client = store(root)

    def versions() -> list[int]:
        return sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))

    before = versions()
    env = {k: v for k, v in os.environ.items() if k not in {"MLFLOW_TRACKING_URI", "NBS_RUN_ID"}}
    build = subprocess.Popen([str(NBS), "run", "--only", "register", "--force"], cwd=root, start_new_session=True,
                             env={**env, "PLOOMBER_STATS_ENABLED": "false", "PYTHONPATH": str(root)},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kernels: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 300
        while versions() == before and build.poll() is None and time.monotonic() < deadline:
            kernels = psutil.Process(build.pid).children(recursive=True) or kernels
            time.sleep(0.1)
        assert build.poll() is None, "the build ended before it could be killed just after registering"
    finally:
        for process in [psutil.Process(build.pid), *kernels]:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()  # SIGKILL: nothing of the build gets to clean up
        build.wait(30)
    registered = versions()
    assert len(registered) == len(before) + 1, "the killed build had registered its version"
    resumed = run_nbs("run", cwd=root)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert versions() == registered, "the resumed build registered the same model a second time"
    version = client.get_model_version(name, str(registered[-1]))
    finished = next(r for r in reversed(runs_of(root)) if r.data.tags.get("nbs.kind") == "pipeline")
    assert [r.info.status for r in runs_of(root) if r.data.tags.get("mlflow.parentRunId") == finished.info.run_id
            and r.data.tags.get("nbs.task") == "register"] == ["FINISHED"], "register ran again on resuming"
    assert finished.info.status == "FINISHED" and version.tags["nbs.pipeline_run"] == finished.info.run_id
    assert version.tags["nbs.resumed_from"] != finished.info.run_id
    assert json.loads((root / "products/model/registered.json").read_text())["version"] == registered[-1]


def test_only_with_a_pattern_runs_the_tasks_it_matches(rebuilt):
    root = rebuilt
    before = {r.info.run_id for r in runs_of(root)}
    done = run_nbs("run", "--only", "train-*", "--force", cwd=root)
    assert done.returncode == 0, done.stdout + done.stderr
    new = [r for r in runs_of(root) if r.info.run_id not in before]
    assert sorted(r.data.tags.get("nbs.task", "pipeline") for r in new) == sorted(["pipeline", *CANDIDATES])
    missed = run_nbs("run", "--only", "deploy-*", cwd=root)
    assert missed.returncode == 2 and "'deploy-*' (as a pattern it matches none)" in missed.stderr


def test_new_task_runs_in_the_pipeline_and_new_module_is_exported(rebuilt):
    root = rebuilt
    done = run_nbs("new", "task", "summary", "--after", "evaluate", cwd=root)
    assert done.returncode == 0, done.stderr
    assert (root / "notebooks/pipeline/51_summary.ipynb").is_file()
    assert "name: summary" in (root / "pipeline.yaml").read_text()
    before = {r.info.run_id for r in runs_of(root)}
    built_again = run_nbs("run", cwd=root)
    assert built_again.returncode == 0, built_again.stdout + built_again.stderr
    summary, = [r for r in runs_of(root) if r.info.run_id not in before and r.data.tags.get("nbs.task") == "summary"]
    assert summary.info.status == "FINISHED" and summary.data.metrics == {"upstream_tasks": 1.0}
    assert summary.data.tags["nbs.inputs"] == "evaluate"

    clash = run_nbs("new", "task", "summary", "--after", "evaluate", cwd=root)
    assert clash.returncode == 2 and "'summary' clashes with a task of pipeline.yaml" in clash.stderr
    unknown = run_nbs("new", "task", "deploy", "--after", "nowhere", cwd=root)
    assert unknown.returncode == 2 and "'nowhere' names no task" in unknown.stderr

    module = run_nbs("new", "module", "helpers", cwd=root)
    assert module.returncode == 0, module.stderr
    assert "def twice(x: int) -> int:" in (root / "nbs_lib/helpers.py").read_text()
    assert run_nbs("new", "module", "drift", cwd=root).returncode == 2
    check = run_nbs("check", cwd=root)
    assert check.returncode == 0, check.stdout


def _assert_nothing_left_running(root):
    statuses = [r.info.status for r in runs_of(root)]
    assert statuses and "RUNNING" not in statuses, statuses


@pytest.mark.build
def test_data_file_that_does_not_exist(project):
    done = run_nbs("run", "-p", "data_path=data/nope.csv", cwd=project)
    assert done.returncode == 1
    assert "task 'ingest'" in done.stderr and "data file 'data/nope.csv' does not exist" in done.stderr
    _assert_nothing_left_running(project)
    runs = runs_of(project)
    assert {r.data.tags.get("nbs.task", "pipeline"): r.info.status for r in runs} == {
        "pipeline": "FAILED", "ingest": "FAILED"}
    failed = next(r for r in runs if r.data.tags.get("nbs.task") == "ingest")
    assert [a.path for a in store(project).list_artifacts(failed.info.run_id, "notebook")] == [
        "notebook/ingest.html", "notebook/ingest.ipynb"], "the partial executed notebook must be kept"
    assert not (project / "products/data/raw.parquet").exists()


@pytest.mark.build
def test_target_column_not_in_the_data(project):
    pd.DataFrame({"x": [1.0, 2.0], "label": [0, 1]}).to_parquet(project / "tiny.parquet")
    done = run_nbs("run", "-p", "data_path=tiny.parquet", "-p", "target=outcome", cwd=project)
    assert done.returncode == 1
    assert "target column 'outcome' is not in 'tiny.parquet'" in done.stderr
    _assert_nothing_left_running(project)


@pytest.mark.build
def test_data_that_fails_validation_stops_the_build(project):
    rng = np.random.default_rng(0)
    data = pd.DataFrame({"x": rng.normal(size=40), "z": rng.normal(size=40),
                         "y": np.tile([0, 1], 20)})
    data.loc[7, "x"] = np.inf
    data.loc[:9, "z"] = np.nan
    data.to_csv(project / "bad.csv", index=False)
    done = run_nbs("run", "-p", "data_path=bad.csv", "-p", "target=y", cwd=project)
    assert done.returncode == 1
    assert "task 'validate'" in done.stderr
    assert "column 'x' fails 'finite' at row 7: inf" in done.stderr
    assert "column 'z' fails 'missing_fraction<=0.1'" in done.stderr
    _assert_nothing_left_running(project)
    statuses = {r.data.tags.get("nbs.task", "pipeline"): r.info.status for r in runs_of(project)}
    # exploration runs beside validation, on the data as ingested: it shows what validation refused
    assert statuses == {"pipeline": "FAILED", "ingest": "FINISHED", "validate": "FAILED", "eda": "FINISHED"}
    assert not (project / "products/data/validated.parquet").exists()
