"""A user's own data end to end, the way a newcomer brings it: a CSV file, a target column, `nbs run`, then
serving, batch scoring and feedback. Three tables unlike the built-in one: scikit-learn's wine (three classes),
its diabetes set (a quantity: regression) and a generated customer table with an ID, a date, a constant, missing
numbers and text, and at scoring time a category that training never saw.

Each data set gets one build of the 7-task chain (trim_pipeline): ingest to register is what they exercise."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
from conftest import (
    commit,
    copy_build,
    copy_project,
    run_nbs,
    runs_of,
    start_server,
    stop_server,
    store,
    trim_pipeline,
    wait_ready,
)

pytestmark = pytest.mark.build


def wine() -> pd.DataFrame:
    from sklearn.datasets import load_wine

    return load_wine(as_frame=True).frame


def diabetes() -> pd.DataFrame:
    from sklearn.datasets import load_diabetes

    return load_diabetes(as_frame=True, scaled=False).frame


def customers(rows: int = 240, seed: int = 0) -> pd.DataFrame:
    "Churn of made-up customers: an ID, a sign-up date, a constant region, gaps in age and plan; churn follows age, income and plan."
    rng = np.random.default_rng(seed)
    age = rng.integers(18, 80, rows).astype(float)
    income = rng.normal(3000, 800, rows).round(2)
    plan = rng.choice(["basic", "pro", "family"], rows).astype(object)
    score = (age - 50) / 15 + (income - 3000) / 800 + (plan == "pro") * 1.5 + rng.normal(0, 0.5, rows)
    age[rng.choice(rows, 12, replace=False)] = np.nan
    plan[rng.choice(rows, 10, replace=False)] = None
    signed_up = pd.Timestamp("2024-01-01") + pd.to_timedelta(rng.integers(0, 700, rows), unit="D")
    return pd.DataFrame({"customer_id": [f"C{i:05d}" for i in rng.permutation(rows)],
                         "signed_up": signed_up.strftime("%Y-%m-%d"), "region": "north", "age": age, "income": income,
                         "plan": plan, "churned": np.where(score > 0.3, "yes", "no")})


DATASETS = {  # name: (table, target, task)
    "wine": (wine, "target", "classification"),
    "diabetes": (diabetes, "target", "regression"),
    "customers": (customers, "churned", "classification"),
}


def build(name: str, folder: Path) -> dict:
    "Data set `name` written to CSV in a fresh project at `folder` and built under a model name of its own."
    make, target, task = DATASETS[name]
    root = copy_project(folder / "project")
    trim_pipeline(root)
    commit(root, "the chain to a registered version")
    table = make()
    data = root / "data" / f"{name}.csv"
    data.parent.mkdir()
    table.to_csv(data, index=False)
    done = run_nbs("run", "-p", f"data_path=data/{name}.csv", "-p", f"target={target}", "-p", f"model_name={name}",
                   cwd=root)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return {"name": name, "root": root, "data": data, "table": table, "target": target, "task": task, "done": done}


@pytest.fixture(scope="session")
def builds(tmp_path_factory):
    """Each data set's build, made the first time a test asks for it and kept for the session: a module-scoped
    fixture is torn down whenever the worker runs another module's test in between, and built again after it."""
    made: dict[str, dict] = {}

    def built_once(name: str) -> dict:
        if name not in made:
            made[name] = build(name, tmp_path_factory.mktemp(name))
        return made[name]

    return built_once


@pytest.fixture(params=list(DATASETS))
def built(request, builds) -> dict:
    "One data set's build (tests must not change it: copy_build a copy to change)."
    return builds(request.param)


def test_the_build_decides_the_task_and_says_what_came_out(built):
    root, task, printed = built["root"], built["task"], built["done"].stdout
    columns = json.loads((root / "products/data/columns.json").read_text())
    assert columns["task"] == task and f"Task: {task} (" in printed
    registered = json.loads((root / "products/model/registered.json").read_text())
    assert registered["gate"]["promote"], registered["gate"]
    assert "beats the baseline's" in registered["gate"]["reason"]
    assert f"Champion: {built['name']} version 1" in printed and "Model card: products/model/model_card.md" in printed
    metric = "roc_auc" if task == "classification" else "rmse"
    assert f"best cross-validated {metric}" in printed
    card = (root / "products/model/model_card.md").read_text()
    assert "   baseline |" in card, "the card shows the baseline beside the chosen model"
    as_json = run_nbs("run", "--json", "-p", f"data_path=data/{built['name']}.csv", "-p", f"target={built['target']}",
                      "-p", f"model_name={built['name']}", cwd=root)
    summary = json.loads(as_json.stdout)["summary"]
    assert summary["task"] == task and summary["champion"] == 1 and summary["holdout"] == json.loads(
        (root / "products/evaluation/metrics.json").read_text())


def test_columns_that_are_no_features_are_named_with_their_reason(built):
    roles = {r["column"]: r for r in json.loads((built["root"] / "products/data/columns.json").read_text())["roles"]}
    if built["name"] != "customers":
        assert {r["role"] for r in roles.values()} == {"feature"}, roles
        return
    assert {name: r["role"] for name, r in roles.items()} == {
        "customer_id": "identifier", "signed_up": "date", "region": "constant", "age": "feature", "income": "feature",
        "plan": "feature"}
    printed = built["done"].stdout
    assert "not a feature: customer_id (identifier: 240 distinct values in 240 rows" in printed
    train = pd.read_parquet(built["root"] / "products/data/train.parquet")
    assert sorted(train.columns) == ["age", "churned", "income", "plan"]


def test_the_raw_file_scores_as_it_is(built):
    root, name, table = built["root"], built["name"], built["table"]
    scored = root / "scored.csv"
    done = run_nbs("predict", "--input", str(built["data"]), "--output", str(scored), "--model", f"models:/{name}@champion",
                   "-q", cwd=root)
    assert done.returncode == 0, done.stderr
    result = pd.read_csv(scored)
    assert len(result) == len(table) and list(result.columns[: table.shape[1]]) == list(table.columns)
    probabilities = [c for c in result.columns if c.startswith("proba_")]
    if built["task"] == "regression":
        assert not probabilities and pd.api.types.is_float_dtype(result["prediction"])
        assert np.corrcoef(result["prediction"], table[built["target"]])[0, 1] > 0.5
    else:
        classes = sorted(map(str, table[built["target"]].unique()))
        assert sorted(c.removeprefix("proba_") for c in probabilities) == classes
        assert (result["prediction"].astype(str) == table[built["target"]].astype(str)).mean() > 0.7


def test_gaps_and_unseen_categories_score_and_wrong_types_are_refused(built):
    root, name, table = built["root"], built["name"], built["table"]
    features = json.loads((root / "products/data/columns.json").read_text())["features"]
    odd = table.head(6).copy()
    odd.loc[odd.index[0], features[0]] = None  # a gap where training had none, or had some
    if "plan" in odd:
        odd.loc[odd.index[1], "plan"] = "enterprise"  # a plan no customer had when the model was trained
    source = root / "odd.csv"
    odd.to_csv(source, index=False)
    done = run_nbs("predict", "--input", str(source), "--output", str(root / "odd-scored.parquet"),
                   "--model", f"models:/{name}@champion", "-q", cwd=root)
    assert done.returncode == 0, done.stderr
    assert pd.read_parquet(root / "odd-scored.parquet")["prediction"].notna().all()
    numeric = next(c for c in features if pd.api.types.is_numeric_dtype(table[c]))
    wrong = odd.astype({numeric: object})
    wrong.loc[wrong.index[2], numeric] = "unknown"
    wrong.to_csv(source, index=False)
    refused = run_nbs("predict", "--input", str(source), "--output", str(root / "wrong.csv"),
                      "--model", f"models:/{name}@champion", "-q", cwd=root)
    assert refused.returncode == 2 and f"'{numeric}' (record 2) must be" in refused.stderr, refused.stderr
    assert not (root / "wrong.csv").exists()


def test_serving_takes_nulls_and_feedback_of_the_task(built):
    root, name, table, target, task = built["root"], built["name"], built["table"], built["target"], built["task"]
    features = json.loads((root / "products/data/columns.json").read_text())["features"]
    record = json.loads(table.head(1)[features].to_json(orient="records"))[0]
    record[features[0]] = None
    process, url = start_server("--model", f"models:/{name}@champion", "--root", str(root), cwd=root)
    try:
        wait_ready(url)
        answer = httpx.post(f"{url}/predict", json={"records": [record]})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        if task == "regression":
            assert "probabilities" not in body and isinstance(body["predictions"][0], float)
            label, wrong = float(table[target].iloc[0]), "high"
        else:
            assert set(body["probabilities"][0]) == set(map(str, table[target].unique()))
            label = json.loads(table[target].head(1).to_json(orient="values"))[0]
            wrong = 3.5
        accepted = httpx.post(f"{url}/feedback", json={"id": body["ids"][0], "label": label})
        assert accepted.status_code == 200, accepted.text
        refused = httpx.post(f"{url}/feedback", json={"id": body["ids"][0], "label": wrong})
        assert refused.status_code == 422 and refused.json()["field"] == "label", refused.text
        # the replay sends the model's inputs only (no ID or date columns) and the labels as they are
        from nbs_lib.serving.simulate import simulate

        replayed = simulate(url, table, target, batches=1, batch_size=20, request_size=20)
        assert replayed[0]["labels"] == 20 and ("rmse" if task == "regression" else "accuracy") in replayed[0]
    finally:
        stop_server(process)


@pytest.mark.parametrize("built", ["diabetes", "customers"], indirect=True)
def test_monitored_and_retrained_on_its_feedback(built, tmp_path):
    """Live metrics of the task in the monitoring report, and a retrain on the fed-back labels that the A/B test
    judges by the task's measure: a regressor's absolute errors, a classifier's right answers (with text classes, and
    inputs that carry an ID and a date the model never sees). The built-in data's path is tests/test_monitor.py's
    and tests/test_retrain.py's."""
    from nbs_lib.serving.simulate import simulate

    root = copy_build(built["root"], tmp_path / "project")  # the module's build stays as it is
    name, table, target, task = built["name"], built["table"], built["target"], built["task"]
    process, url = start_server("--model", f"models:/{name}@champion", "--root", str(root), cwd=root)
    try:
        wait_ready(url)
        simulate(url, table, target, batches=2, batch_size=40, request_size=20, drift="shift", drift_from=1)
        if task == "regression":
            flipped = run_nbs("simulate", "--url", url, "--drift", "flip", "--batches", "1",
                              "-p", f"data_path=data/{name}.csv", cwd=root)
            assert flipped.returncode == 2 and "use shift or scale" in flipped.stderr and "Traceback" not in flipped.stderr
        else:
            record = json.loads(table.head(1).drop(columns=[target]).to_json(orient="records"))[0]
            answer = httpx.post(f"{url}/predict", json={"records": [
                {k: v for k, v in {**record, "plan": "enterprise"}.items() if k in ("age", "income", "plan")}]})
            assert answer.status_code == 200, answer.text  # a plan training never saw
    finally:
        stop_server(process)
    passed = ("-p", f"data_path=data/{name}.csv", "-p", f"target={target}", "-p", f"model_name={name}")
    watched = run_nbs("monitor", "--since", "", "--json", *passed, cwd=root)
    assert watched.returncode == 0, watched.stderr[-3000:]
    summary = json.loads(watched.stdout)["summary"]
    assert summary["model"] == f"{name}/1" and summary["drifted"], summary
    assert set(summary["live"]) == ({"rmse", "mae"} if task == "regression" else {"accuracy", "roc_auc"}), summary
    report = [r for r in runs_of(root, "nbs-monitoring") if r.data.tags.get("nbs.kind") == "task"][-1]  # the attempt
    if task == "classification":
        assert report.data.metrics["quality.unseen"] > 0, "the unseen plan is counted"
    again = run_nbs("retrain", *passed, cwd=root, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert ("live_rmse" if task == "regression" else "live_accuracy") in again.stdout
    rows = int(re.search(r"Retraining on (\d+) rows", again.stdout).group(1))
    assert rows > len(table), "the shifted batch's labelled inputs join the data"
    measure = "mae" if task == "regression" else "accuracy"
    assert re.search(rf"Against version 1 on the \d+ newest labels: .* \({measure} \d", again.stdout), again.stdout[-1500:]
    retrained = store(root).get_model_version(name, "2")
    assert retrained.tags["nbs.task_type"] == task and json.loads(retrained.tags["nbs.ab.metric"]) == measure
