"""`nbs serve` and `nbs predict` against a real registry: a real HTTP server on 127.0.0.1, real models."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pandas as pd
import pytest
from conftest import NBS, run_nbs, start_server, stop_server, store, wait_ready

from nbs_lib.serving.predictions import read_predictions

NAME = "serving-test"
TARGET = "target"



@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> dict:
    """Three versions through the gate: a weak first champion, a model of shuffled labels the gate
    refuses, and a strong one it promotes. Tracked in ROOT/mlflow.db like a project's."""
    from nbs_lib.core.data import load_builtin
    from nbs_lib.ml.evaluate import holdout_metrics
    from nbs_lib.ml.features import split_holdout
    from nbs_lib.ml.train import train_model
    from nbs_lib.registry.versions import apply_gate, register_model

    root = tmp_path_factory.mktemp("serving")
    train, test = split_holdout(load_builtin(), TARGET, 0.2, 42)
    shuffled = train.assign(target=train[TARGET].sample(frac=1, random_state=0).to_numpy())
    models = {1: train_model(train, TARGET, "random_forest", {"n_estimators": 1, "max_depth": 1}),
              2: train_model(shuffled, TARGET, "logistic_regression"),
              3: train_model(train, TARGET, "logistic_regression")}
    metrics = {version: holdout_metrics(model, test, TARGET) for version, model in models.items()}
    # What the gate test relies on: the weak model is worse than the strong and better than noise.
    assert metrics[2]["roc_auc"] < metrics[1]["roc_auc"] < metrics[3]["roc_auc"], metrics
    decisions = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")
        patch.chdir(root)
        store(root)
        for version, model in models.items():
            registered = register_model(model, NAME, train.drop(columns=[TARGET]), metrics[version], experiment="serving")
            assert registered["version"] == version
            decisions[version] = apply_gate(NAME, version, metrics[version], test, TARGET,
                                            {"accuracy": 0.6}, "roc_auc", 0.0)
    return {"root": root, "train": train, "test": test, "models": models, "metrics": metrics, "decisions": decisions}


@pytest.fixture(scope="module")
def server(registry):
    "`nbs serve` of the champion (version 3) with version 1 as a 20 % canary; stopped by its process group."
    process, url = start_server("--model", f"models:/{NAME}@champion", "--canary", "1", "--canary-weight", "0.2",
                                "--max-records", "1000", "--root", str(registry["root"]), cwd=registry["root"])
    try:
        wait_ready(url)
        yield url
    finally:
        _, _, err = stop_server(process)
    assert "Traceback" not in err and " 500 " not in err, err[-3000:]  # every refusal above was a client's error


def records(table: pd.DataFrame) -> list[dict]:
    return table.drop(columns=[TARGET]).to_dict(orient="records")


def test_gate_refuses_a_worse_model_and_accepts_a_better_one(registry):
    decisions = registry["decisions"]
    assert decisions[1]["promote"] and decisions[1]["reason"] == "thresholds met, no champion yet"
    assert not decisions[2]["promote"] and decisions[2]["champion_version"] == 1
    assert "does not beat the champion's" in decisions[2]["reason"]
    assert decisions[3]["promote"] and decisions[3]["champion_version"] == 1
    assert decisions[3]["candidate"] > decisions[3]["champion"]
    client = store(registry["root"])
    assert int(client.get_model_version_by_alias(NAME, "champion").version) == 3
    assert json.loads(client.get_model_version(NAME, "2").tags["nbs.gate.promote"]) is False


def test_health_ready_and_metadata(server):
    assert httpx.get(f"{server}/health").json() == {"status": "alive"}
    assert httpx.get(f"{server}/ready").json() == {"ready": True, "champion": 3, "canary": 1, "feature_store": None}
    meta = httpx.get(f"{server}/metadata").json()
    assert (meta["name"], meta["version"], meta["alias"]) == (NAME, 3, "champion")
    assert (meta["canary"]["version"], meta["canary"]["weight"]) == (1, 0.2)
    inputs = meta["signature"]["inputs"]
    assert len(inputs) == 30 and inputs[0] == {"type": "double", "name": "mean radius", "required": False}, "the model imputes it"
    assert meta["classes"] == [0, 1] and meta["prediction_log"]["failed"] == 0


def test_predictions_are_the_versions_own(server, registry):
    rows = registry["test"].head(8)
    for key in ("k-1", "k-2", "k-3", "k-4", "k-5", "k-6"):
        answer = httpx.post(f"{server}/predict", json={"records": records(rows), "key": key})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        model = registry["models"][body["version"]]
        assert body["role"] == ("champion" if body["version"] == 3 else "canary")
        assert answer.headers["x-model-version"] == str(body["version"])
        assert body["predictions"] == model.predict(rows.drop(columns=[TARGET])).tolist()
        expected = model.predict_proba(rows.drop(columns=[TARGET]))[:, 1]
        assert [p["1"] for p in body["probabilities"]] == pytest.approx(expected.tolist())
        assert len(set(body["ids"])) == 8


def test_explain_is_refused_whichever_version_draws_when_the_canary_cannot_explain(server, registry):
    from nbs_lib.serving.serve import goes_to_canary

    champion_key = next(k for k in (f"x-{i}" for i in range(100)) if not goes_to_canary(k, 0.2))
    canary_key = next(k for k in (f"x-{i}" for i in range(100)) if goes_to_canary(k, 0.2))
    rows = registry["test"].head(3)
    for key in (champion_key, canary_key):  # the same answer, whichever version the key draws
        refused = httpx.post(f"{server}/predict", json={"records": records(rows), "key": key, "explain": True})
        assert refused.status_code == 422 and refused.json()["field"] == "explain", refused.text
        assert "RandomForestClassifier" in refused.json()["problem"]
    assert httpx.post(f"{server}/predict", json={"records": records(rows), "key": champion_key}).status_code == 200
    assert httpx.get(f"{server}/metadata").json()["explanations"] == "linear contributions to the log-odds of class 1"


def _explained_like_the_library(url: str, registry) -> None:
    "A linear version's explanations over HTTP are those ServedModel.explain computes, largest first."
    from nbs_lib.serving.scoring import ServedModel

    rows = registry["test"].head(3)
    answer = httpx.post(f"{url}/predict", json={"records": records(rows), "explain": True})
    assert answer.status_code == 200 and answer.json()["version"] == 3, answer.text
    explanations = answer.json()["explanations"]
    local = ServedModel(NAME, 3, None, "", [], {}, registry["models"][3]).explain(rows.drop(columns=[TARGET]))
    assert [[c["feature"] for c in row] for row in explanations] == [[c["feature"] for c in row] for row in local]
    assert [c["contribution"] for row in explanations for c in row] == pytest.approx(
        [c["contribution"] for row in local for c in row])
    sizes = [[abs(c["contribution"]) for c in row] for row in explanations]
    assert all(len(row) == 5 and row == sorted(row, reverse=True) for row in sizes)
    assert all(c["feature"] in rows.columns for row in explanations for c in row)


def _one(registry) -> dict:
    return records(registry["test"].head(1))[0]


BAD_INPUTS = {
    "missing column": (lambda r: {"records": [{k: v for k, v in r.items() if k != "mean area"}]}, 422, "mean area"),
    "unknown column": (lambda r: {"records": [{**r, "colour": 1.0}]}, 422, "colour"),
    "string for a number": (lambda r: {"records": [{**r, "mean area": "500"}]}, 422, "mean area"),
    "boolean for a number": (lambda r: {"records": [{**r, "mean area": True}]}, 422, "mean area"),
    "no records": (lambda r: {"records": []}, 422, "records"),
    "records not a list": (lambda r: {"records": r}, 422, "records"),
    "record not an object": (lambda r: {"records": [list(r.values())]}, 422, "records"),
    "unknown request field": (lambda r: {"records": [r], "user": "x"}, 422, "user"),
    "key not a string": (lambda r: {"records": [r], "key": 7}, 422, "key"),
    "too many records": (lambda r: {"records": [r] * 1001}, 413, "records"),
}


def test_a_null_in_a_column_the_model_fills_in_is_scored(server, registry):
    record = {**_one(registry), "mean area": None}
    answer = httpx.post(f"{server}/predict", json={"records": [record], "key": "k-1"})
    assert answer.status_code == 200, answer.text
    model = registry["models"][answer.json()["version"]]
    frame = pd.DataFrame([record]).astype({"mean area": float})
    assert answer.json()["predictions"] == model.predict(frame).tolist(), "imputed, as in training"
    wrong = httpx.post(f"{server}/predict", json={"records": [{**record, "mean area": "n/a"}]})
    assert wrong.status_code == 422 and wrong.json()["field"] == "mean area", "a value of the wrong type is refused"


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_refused_naming_the_field(server, registry, case):
    make, status, field = BAD_INPUTS[case]
    answer = httpx.post(f"{server}/predict", json=make(_one(registry)))
    assert answer.status_code == status, answer.text
    assert answer.json()["field"] == field and answer.json()["error"]


@pytest.mark.parametrize("body,status,problem", [
    (b"", 400, "is empty"),
    (b'{"records": [', 400, "is not valid JSON"),
    (b'{"records": [{"mean radius": NaN}]}', 400, "NaN is not a JSON number"),
    (b"\xff\xfe garbage", 400, "is not valid JSON"),
    (b"[]", 422, "must be a JSON object"),
    (b'{"records": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, "nests arrays or objects deeper"),
    (b'{"records": [{"mean radius": 1e400}]}', 400, "1e400, a number beyond the range of a double"),
    (b'{"records": [], "key": "\\udc80"}', 400, "invalid Unicode: a lone UTF-16 surrogate"),  # a canary is on: the key is hashed
])
def test_malformed_bodies_are_refused(server, body, status, problem):
    answer = httpx.post(f"{server}/predict", content=body, headers={"content-type": "application/json"})
    assert answer.status_code == status, answer.text
    assert answer.json()["field"] == "body" and problem in answer.json()["problem"]


def test_oversized_body_and_wrong_content_type(server, registry):
    big = json.dumps({"records": [_one(registry)] * 1000}).encode() + b" " * 1_000_000
    answer = httpx.post(f"{server}/predict", content=big, headers={"content-type": "application/json"})
    assert answer.status_code == 413 and answer.json()["field"] == "body"
    form = httpx.post(f"{server}/predict", data={"records": "x"})
    assert form.status_code == 415 and form.json()["field"] == "content-type"
    assert httpx.get(f"{server}/ready").status_code == 200, "refused requests leave the service serving"


def test_canary_takes_its_weight_and_a_key_always_meets_the_same_version(server, registry):
    body = {"records": [_one(registry)]}
    with httpx.Client(base_url=server) as client:
        keyed = [client.post("/predict", json={**body, "key": f"user-{i}"}).json()["version"] for i in range(1000)]
        unkeyed = [client.post("/predict", json=body).json()["version"] for _ in range(1000)]
        again = {client.post("/predict", json={**body, "key": "user-7"}).json()["version"] for _ in range(20)}
    for versions in (keyed, unkeyed):
        share = versions.count(1) / len(versions)
        assert abs(share - 0.2) < 0.05, share  # 4 standard deviations of a binomial share at n=1000
        assert set(versions) == {1, 3}
    assert again == {keyed[7]}


def test_feedback_is_joined_to_its_prediction(server, registry):
    rows = registry["test"].head(3)
    answer = httpx.post(f"{server}/predict", json={"records": records(rows), "key": "feedback"}).json()
    truth = rows[TARGET].tolist()
    labels = [{"id": i, "label": label} for i, label in zip(answer["ids"], truth, strict=True)]
    assert httpx.post(f"{server}/feedback", json={"labels": labels}).json() == {"recorded": 3, "unchanged": 0, "replaced": 0}
    # a replayed request means the same thing again: recorded once
    assert httpx.post(f"{server}/feedback", json={"labels": labels}).json() == {"recorded": 0, "unchanged": 3, "replaced": 0}
    flipped = {"id": answer["ids"][0], "label": 1 - truth[0]}
    conflict = httpx.post(f"{server}/feedback", json=flipped)
    assert conflict.status_code == 409 and '"replace": true' in conflict.json()["hint"], conflict.json()
    assert f"has the label {truth[0]} already, not {1 - truth[0]}" in conflict.json()["error"]
    twice = httpx.post(f"{server}/feedback", json={"labels": [labels[1], labels[1]]})
    assert twice.status_code == 422 and "is in this request twice" in twice.json()["error"], twice.json()
    assert httpx.post(f"{server}/feedback", json={**flipped, "replace": True}).json() == {
        "recorded": 0, "unchanged": 0, "replaced": 1}
    assert httpx.post(f"{server}/feedback", json={**labels[0], "replace": True}).json()["replaced"] == 1  # and back
    unknown = httpx.post(f"{server}/feedback", json={"id": "no-such-id", "label": 1})
    assert unknown.status_code == 404 and "no-such-id" in unknown.json()["error"]
    wrong_type = httpx.post(f"{server}/feedback", json={"id": answer["ids"][0], "label": "1"})
    assert wrong_type.status_code == 422 and wrong_type.json()["field"] == "label"
    logged = read_predictions(registry["root"] / "predictions.db").set_index("id")
    mine = logged.loc[answer["ids"]]
    assert mine["label"].tolist() == truth and mine["prediction"].tolist() == answer["predictions"]
    assert (mine["version"] == answer["version"]).all() and (mine["request_id"] == answer["request_id"]).all()
    assert mine["inputs"].iloc[0] == records(rows)[0]
    assert "no-such-id" not in logged.index


def test_rollback_changes_the_served_version_after_reload(server, registry):
    root = registry["root"]
    assert httpx.get(f"{server}/ready").json()["champion"] == 3
    done = run_nbs("rollback", NAME, "--why", "test", "--root", str(root), cwd=root)
    assert done.returncode == 0, done.stderr
    try:
        assert httpx.get(f"{server}/ready").json()["champion"] == 3, "nothing changes before a reload"
        reloaded = httpx.post(f"{server}/reload", timeout=60).json()
        assert reloaded["loaded"] and reloaded["changed"] and reloaded["champion"] == 1
        answer = httpx.post(f"{server}/predict", json={"records": [_one(registry)], "key": "user-3"}).json()
        assert answer["version"] == 1
    finally:
        run_nbs("promote", NAME, "3", "--why", "restore after the rollback test", "--root", str(root), cwd=root)
        httpx.post(f"{server}/reload", timeout=60)
    assert httpx.get(f"{server}/ready").json()["champion"] == 3


def test_a_model_that_cannot_load_leaves_the_service_up_and_not_ready(registry):
    root = registry["root"]
    process, url = start_server("--model", f"models:/{NAME}@no-such-alias", "--root", str(root), cwd=root)
    try:
        deadline = 60
        while (ready := httpx.get(f"{url}/ready")).json().get("error") == "not ready: the model is still loading":
            deadline -= 0.2
            assert deadline > 0
            time.sleep(0.2)
        assert ready.status_code == 503 and "no-such-alias" in ready.json()["error"]
        predict = httpx.post(f"{url}/predict", json={"records": [_one(registry)]})
        assert predict.status_code == 503 and httpx.get(f"{url}/health").status_code == 200
    finally:
        code, out, err = stop_server(process)
    assert code == 0 and "nbs serve: stopped, 0 predictions logged" in out, (code, out, err)


def test_one_linear_version_explains_and_sigterm_writes_every_logged_prediction(registry, tmp_path):
    root, log = registry["root"], tmp_path / "log.db"
    process, url = start_server("--model", f"models:/{NAME}/3", "--prediction-log", str(log), "--root", str(root),
                                cwd=root)
    try:
        wait_ready(url)
        _explained_like_the_library(url, registry)
        with httpx.Client(base_url=url) as client:
            for _ in range(50):
                assert client.post("/predict", json={"records": [_one(registry)] * 4}).status_code == 200
    finally:
        code, out, err = stop_server(process)
    assert code == 0 and "stopped, 203 predictions logged" in out, (code, out, err)
    logged = read_predictions(log)
    assert len(logged) == 203 and set(logged["version"]) == {3} and logged["id"].is_unique


def test_every_answered_prediction_is_in_the_log_when_the_server_is_killed_under_load(registry, tmp_path):
    root, log = registry["root"], tmp_path / "log.db"
    process, url = start_server("--model", f"models:/{NAME}/3", "--prediction-log", str(log), "--root", str(root),
                                cwd=root)
    answered: list[str] = []
    enough = threading.Event()

    def client() -> None:  # sends until the server is gone; keeps the ids of what was answered 200
        with httpx.Client(base_url=url, timeout=10) as session:
            while True:
                try:
                    answer = session.post("/predict", json={"records": [_one(registry)] * 2})
                except httpx.TransportError:
                    return
                assert answer.status_code == 200, answer.text
                answered.append(answer.json()["request_id"])
                if len(answered) >= 300:
                    enough.set()

    try:
        wait_ready(url)
        clients = [threading.Thread(target=client) for _ in range(4)]
        for thread in clients:
            thread.start()
        assert enough.wait(120), f"only {len(answered)} answers"
        os.killpg(process.pid, signal.SIGKILL)  # requests in flight: nothing of the server gets to clean up
        for thread in clients:
            thread.join(30)
    finally:
        stop_server(process)
    logged = set(read_predictions(log)["request_id"])
    missing = [request_id for request_id in answered if request_id not in logged]
    assert missing == [], f"{len(missing)} of {len(answered)} answered requests are not in the log"


def test_batch_scoring_in_chunks(registry, tmp_path):
    root, test = registry["root"], registry["test"]
    source = tmp_path / "holdout.parquet"
    test.assign(patient=range(len(test))).to_parquet(source)
    output = tmp_path / "scored.csv"
    done = run_nbs("predict", "--input", str(source), "--output", str(output), "--model", f"models:/{NAME}@champion",
                   "--chunk-rows", "25", "--root", str(root), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"Scored {len(test)} rows with {NAME} version 3" in done.stdout
    scored = pd.read_csv(output)
    model = registry["models"][3]
    assert scored["prediction"].tolist() == model.predict(test.drop(columns=[TARGET])).tolist()
    assert scored["patient"].tolist() == list(range(len(test))) and (scored["model_version"] == 3).all()
    assert scored["proba_1"].tolist() == pytest.approx(model.predict_proba(test.drop(columns=[TARGET]))[:, 1].tolist())
    umask = os.umask(0o022)
    os.umask(umask)
    assert output.stat().st_mode & 0o777 == 0o666 & ~umask, "a scored file others can read, as any file written there"


def test_batch_scoring_refuses_bad_rows_and_writes_nothing(registry, tmp_path):
    root = registry["root"]
    table = registry["test"].drop(columns=[TARGET]).astype({"mean area": object})
    table.loc[table.index[60], "mean area"] = "large"
    source = tmp_path / "holdout.csv"
    table.to_csv(source, index=False)
    output = tmp_path / "scored.parquet"
    done = run_nbs("predict", "--input", str(source), "--output", str(output), "--model", f"models:/{NAME}/3",
                   "--chunk-rows", "25", "-q", "--root", str(root), cwd=tmp_path)
    assert done.returncode == 2
    assert "'mean area' (record 60) must be double, got \"large\" (string)" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["holdout.csv"], "no output, not even a partial one"
    missing = run_nbs("predict", "--input", str(tmp_path / "nope.csv"), "--output", str(output), cwd=tmp_path)
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def _predicting(registry, source: Path, output: Path) -> subprocess.Popen:
    "`nbs predict` of `source` into `output` with version 3, in its own process group."
    root = registry["root"]
    env = {k: v for k, v in os.environ.items() if k not in {"MLFLOW_TRACKING_URI", "NBS_RUN_ID"}}
    return subprocess.Popen([str(NBS), "predict", "--input", str(source), "--output", str(output), "--model",
                             f"models:/{NAME}/3", "--chunk-rows", "2000", "-q", "--root", str(root)], cwd=output.parent,
                            env={**env, "PLOOMBER_STATS_ENABLED": "false"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def test_two_batch_runs_to_one_output_leave_it_whole_and_sigterm_leaves_nothing(registry, tmp_path):
    rows = registry["test"].drop(columns=[TARGET])
    source = tmp_path / "many.csv"
    header, body = rows.to_csv(index=False).split("\n", 1)
    source.write_text(header + "\n" + body * (240_000 // len(rows) + 1))  # scored for seconds, not instantly
    output = tmp_path / "scored.csv"
    both = [_predicting(registry, source, output) for _ in range(2)]
    outcomes = [run.communicate(timeout=300) for run in both]
    assert [run.returncode for run in both] == [0, 0], outcomes
    scored = pd.read_csv(output)
    assert len(scored) == sum(1 for _ in source.open()) - 1 and list(scored.columns[-2:]) == ["model_name", "model_version"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["many.csv", "scored.csv"], "one output, no partial left"

    stopped = _predicting(registry, source, tmp_path / "stopped.csv")
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob(".stopped.csv.*.partial")) and stopped.poll() is None:
            assert time.monotonic() < deadline, "the run never began to write"
            time.sleep(0.05)
        stopped.send_signal(signal.SIGTERM)
        out, err = stopped.communicate(timeout=60)
    finally:
        if stopped.poll() is None:
            os.killpg(stopped.pid, signal.SIGKILL)
    assert stopped.returncode == 128 + signal.SIGTERM and err.strip().endswith("nbs: stopped by SIGTERM"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["many.csv", "scored.csv"], "SIGTERM removed its partial output"


def test_serve_refuses_bad_options_before_binding(tmp_path):
    done = run_nbs("serve", "--model", "nbs-classifier", "--root", str(tmp_path), cwd=tmp_path)
    assert done.returncode == 2 and "is not a model URI" in done.stderr
    done = run_nbs("serve", "--model", "models:/m@champion", "--canary", "2", "--canary-weight", "1.5",
                   "--root", str(tmp_path), cwd=tmp_path)
    assert done.returncode == 2 and "canary-weight" in done.stderr
    assert not (Path(tmp_path) / "predictions.db").exists()


def test_simulated_traffic_with_a_shift_is_logged_and_its_drift_detected(server, registry):
    from nbs_lib.core.data import load_builtin
    from nbs_lib.monitoring.drift import detect_drift
    from nbs_lib.monitoring.live import inputs_table
    from nbs_lib.serving.simulate import simulate

    shifted = ["mean radius", "mean texture", "worst area"]
    summaries = simulate(server, load_builtin(), TARGET, batches=3, batch_size=60, drift="shift", drift_from=2,
                         features=shifted, seed=7)
    assert [s["drift"] for s in summaries] == ["none", "none", "shift"]
    assert all(s["labels"] == s["predictions"] == 60 for s in summaries)
    assert summaries[0]["accuracy"] > 0.8
    logged = read_predictions(registry["root"] / "predictions.db")
    batch = logged[logged["request_id"].isin(logged["request_id"].unique()[-6:])]
    assert len(batch) == 60 and batch["label"].notna().all()
    drift = detect_drift(registry["train"].drop(columns=[TARGET]), inputs_table(batch))
    assert sorted(drift["drifted"]) == sorted(shifted), drift["features"].head()
