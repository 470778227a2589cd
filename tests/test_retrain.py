"""Retraining triggers, a retrain that the gate promotes, and an automatic rollback, on a real registry."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
from conftest import commit, copy_project, log_predictions, run_nbs, runs_of, store, trim_pipeline

TARGET, NAME = "target", "nbs-classifier"


@pytest.fixture
def project(tmp_path) -> dict:
    "A project with the products a build leaves (raw and training tables) and no model yet."
    from nbs_lib.core.data import load_builtin
    from nbs_lib.ml.features import split_holdout

    root = copy_project(tmp_path / "project")
    data = load_builtin()
    train, test = split_holdout(data, TARGET, 0.2, 42)
    (root / "products/data").mkdir(parents=True)
    data.to_parquet(root / "products/data/raw.parquet")
    train.to_parquet(root / "products/data/train.parquet")
    return {"root": root, "data": data, "train": train, "test": test}


def champion(root: Path, model, train, why: str = "by the test") -> int:
    "Register `model` in the project's store and make it champion; its version."
    from nbs_lib.core.tracking import get_client
    from nbs_lib.registry.versions import promote, register_model

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")
        patch.chdir(root)
        store(root)
        version = register_model(model, NAME, train.drop(columns=[TARGET]))["version"]
        promote(get_client(), NAME, version, why)
    return version


def latest(root: Path, kind: str):
    return [r for r in runs_of(root, "nbs-monitoring") if r.data.tags["nbs.kind"] == kind][-1]


def test_no_trigger_fires_on_fresh_data_and_nothing_is_retrained(project):
    from nbs_lib.ml.train import train_model

    root, train, test = project["root"], project["train"], project["test"]
    model = train_model(train, TARGET)
    champion(root, model, train)
    log_predictions(root / "predictions.db", model, test, datetime.now(UTC))
    done = run_nbs("retrain", "--if-needed", cwd=root)
    assert done.returncode == 0, done.stderr
    assert "No trigger fired: nothing retrained." in done.stdout
    run = latest(root, "retrain")
    assert run.data.tags["nbs.retrain.fired"] == "none" and run.info.status == "FINISHED"
    for trigger in ("model_age", "live_accuracy", "new_labels", "drift"):
        assert run.data.tags[f"nbs.trigger.{trigger}"].startswith("quiet: "), run.data.tags
    assert f"{len(test)} new labels (fewer than 200)" in run.data.tags["nbs.trigger.new_labels"]
    assert len(store(root).search_model_versions(f"name = '{NAME}'")) == 1
    assert not (root / "alerts.jsonl").exists()


@pytest.mark.build
def test_new_labels_trigger_a_retrain_that_the_gate_promotes(project):
    from nbs_lib.ml.train import train_model

    root, data, train = project["root"], project["data"], project["train"]
    trim_pipeline(root)  # the retraining build: 7 tasks from data to a registered version
    commit(root, "the chain from data to a registered version")
    weak = train_model(train, TARGET, "random_forest", {"n_estimators": 1, "max_depth": 1})
    champion(root, weak, train)
    log_predictions(root / "predictions.db", weak, data, datetime.now(UTC), requests=12)
    done = run_nbs("retrain", "--if-needed", cwd=root, timeout=900)
    assert done.returncode == 0, done.stderr + done.stdout
    assert "new_labels     FIRED" in done.stdout
    run = latest(root, "retrain")
    assert "new_labels" in run.data.tags["nbs.retrain.fired"].split(",")
    assert run.data.tags["nbs.retrain.version"] == f"{NAME}/2"
    assert run.data.tags["nbs.retrain.gate"].startswith("promoted: ")
    client = store(root)
    assert int(client.get_model_version_by_alias(NAME, "champion").version) == 2
    ab = {k.removeprefix("nbs.ab."): json.loads(v) for k, v in client.get_model_version(NAME, "2").tags.items()
          if k.startswith("nbs.ab.")}
    assert ab["rows"] == int(len(data) * 0.2) and ab["metric"] == "accuracy" and ab["challenger"] >= ab["champion"], ab
    alerts = [json.loads(line) for line in (root / "alerts.jsonl").read_text().splitlines()]
    assert [a["kind"] for a in alerts] == ["retrain"] and "new_labels" in alerts[0]["message"]


@pytest.fixture
def webhook():
    "A local HTTP server that keeps the JSON bodies POSTed to it; stopped after the test."
    received: list[dict] = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self):
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/alerts", received
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_a_worse_champion_is_rolled_back_by_monitoring(project, webhook):
    from nbs_lib.ml.train import train_model

    root, train, test = project["root"], project["train"], project["test"]
    url, received = webhook
    env = (root / "env.yaml").read_text().replace('alert_webhook: ""', f'alert_webhook: "{url}"')
    (root / "env.yaml").write_text(env)
    good = train_model(train, TARGET)
    champion(root, good, train)
    log_predictions(root / "predictions.db", good, test, datetime.now(UTC) - timedelta(hours=12), version=1)
    shuffled = train.assign(target=train[TARGET].sample(frac=1, random_state=0).to_numpy())
    worse = train_model(shuffled, TARGET)
    champion(root, worse, train, why="promoted by hand, past the gate")
    log_predictions(root / "predictions.db", worse, test, datetime.now(UTC) + timedelta(minutes=1), version=2)
    done = run_nbs("monitor", "--since", "", cwd=root)
    assert done.returncode == 0, done.stderr
    client = store(root)
    assert int(client.get_model_version_by_alias(NAME, "champion").version) == 1
    run = [r for r in runs_of(root, "nbs-monitoring") if r.data.tags["nbs.kind"] == "task"][-1]
    assert run.data.tags["nbs.monitor.rollback"].startswith("rolled back: automatic: live accuracy")
    assert run.data.tags["nbs.alert.rollback"].startswith("automatic: live accuracy")
    alerts = [json.loads(line) for line in (root / "alerts.jsonl").read_text().splitlines()]
    assert alerts[-1]["kind"] == "rollback" and alerts[-1]["details"]["previous"] == 1
    assert alerts[-1]["webhook"] == "sent" and received[-1]["kind"] == "rollback"
    assert received[-1]["message"] == alerts[-1]["message"]
    history = json.loads(client.get_registered_model(NAME).tags["nbs.champion_history"])
    assert [e["action"] for e in history] == ["promote", "promote", "rollback"]


def test_without_a_champion_retrain_says_so_and_leaves_no_run_running(project):
    root = project["root"]
    (root / "predictions.db").touch()
    done = run_nbs("retrain", "--if-needed", cwd=root)
    assert done.returncode == 2 and "models:/nbs-classifier@champion: names no version" in done.stderr
    assert [r.info.status for r in runs_of(root, "nbs-monitoring")] == ["FAILED"]


def test_bad_trigger_settings_are_refused(project):
    root = project["root"]
    env = (root / "env.yaml").read_text().replace("max_drift_share: 0.3", "max_drift: 0.3")
    (root / "env.yaml").write_text(env)
    (root / "predictions.db").touch()
    done = run_nbs("retrain", "--if-needed", cwd=root)
    assert done.returncode == 2 and "retrain_triggers: unknown setting 'max_drift'" in done.stderr
    assert runs_of(root, "nbs-monitoring") == []
