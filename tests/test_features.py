"""The feature store: point-in-time training sets, serving by entity key over real HTTP, the catalogue, skew."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime, timedelta

import httpx
import numpy as np
import pandas as pd
import pytest
from conftest import (
    ROOT,
    SHARED_DEFAULTS,
    copy_build,
    run_nbs,
    runs_of,
    start_server,
    stop_server,
    store,
    wait_ready,
)

from nbs_lib.core.data import save_table
from nbs_lib.ml.feature_store import definitions, open_feature_store, training_set

TTL_DAYS = SHARED_DEFAULTS["feature_ttl_days"]  # the shared build's: a value can be made stale by hand


@pytest.fixture
def built(shared_build, tmp_path):
    "A copy of the session's shared build (default data, feature values valid for TTL_DAYS), to change freely."
    return copy_build(shared_build, tmp_path / "project")


def _reference_join(table: pd.DataFrame, labels: pd.DataFrame, ttl: timedelta) -> pd.DataFrame:
    "The point-in-time join by brute force: per label, its entity's latest row at or before the label's time, within ttl."
    rows = []
    for label in labels.itertuples(index=False):
        known = table[(table["id"] == label.id) & (table["ts"] <= label.ts) & (table["ts"] >= label.ts - ttl)]
        if len(known):
            rows.append({"id": label.id, "ts": label.ts, "y": label.y, **known.sort_values("ts").iloc[-1][["a", "b"]]})
    return pd.DataFrame(rows)


def test_training_sets_are_point_in_time_correct(tmp_path):
    """Random histories (several values per entity, some after every label of it) against a brute-force join:
    each label gets the latest value known at its time and within the TTL, never a later one."""
    rng = np.random.default_rng(7)
    start = pd.Timestamp("2025-03-01", tz="UTC")
    table = pd.DataFrame({"id": rng.integers(0, 40, 600), "ts": start + pd.to_timedelta(rng.integers(0, 60 * 24, 600), "m")})
    table = table.drop_duplicates(["id", "ts"]).reset_index(drop=True)
    table["a"] = rng.normal(size=len(table))
    table["b"] = rng.integers(0, 1000, len(table))
    labels = pd.DataFrame({"id": rng.integers(0, 45, 300),  # ids 40-44 have no values at all
                           "ts": start + pd.to_timedelta(rng.integers(0, 60 * 24, 300), "m"),
                           "y": rng.integers(0, 2, 300)}).drop_duplicates(["id", "ts"]).reset_index(drop=True)
    shutil.copy(ROOT / "feature_repo" / "feature_store.yaml", tmp_path)
    save_table(table, tmp_path / "data" / "history.parquet")
    ttl = timedelta(hours=6)
    feature_store = open_feature_store(tmp_path)
    feature_store.apply(definitions(table, "history", "data/history.parquet", ttl_days=ttl / timedelta(days=1)))

    rows, without = training_set(feature_store, labels, "history")

    expected = _reference_join(table, labels, ttl)
    assert without == len(labels) - len(expected) > 0  # labels with nothing known yet are counted, not joined
    assert rows[["id", "ts", "y"]].equals(expected[["id", "ts", "y"]].astype(rows[["id", "ts", "y"]].dtypes))  # labels' order
    np.testing.assert_array_equal(rows["b"].to_numpy(), expected["b"].to_numpy())
    np.testing.assert_allclose(rows["a"].to_numpy(), expected["a"].to_numpy())
    future = table.merge(rows[["id", "ts"]].rename(columns={"ts": "label_ts"}), on="id")
    assert (future["ts"] > future["label_ts"]).any(), "no value comes after a label: this test would prove nothing"


def test_the_pipeline_builds_trains_from_and_materializes_the_feature_store(built):
    runs = {r.data.tags.get("nbs.task"): r for r in runs_of(built)}
    tables, features, materialized = runs["feature_tables"], runs["features"], runs["materialize"]
    assert tables.data.tags["nbs.feature_view"] == "nbs_classifier_features" and tables.data.tags["nbs.feature_view.version"] == "0"
    assert tables.data.metrics["rows"] == tables.data.metrics["entities"] == 569 and tables.data.metrics["features"] == 30
    assert len(tables.data.tags["nbs.data.feature_table_digest"]) == 16
    assert features.data.metrics["labels"] == 569 and features.data.metrics["labels_without_features"] == 0
    assert features.data.metrics["train_rows"] + features.data.metrics["test_rows"] == 569
    assert materialized.data.metrics["online_entities"] == 569
    assert materialized.data.metrics["skew_mismatched"] == 0 and materialized.data.metrics["skew_entities"] == 200
    # the training set holds the feature view's values, the keys gone
    train = pd.read_parquet(built / "products" / "data" / "train.parquet")
    table = pd.read_parquet(built / "feature_repo" / "data" / "nbs-classifier.parquet")
    assert list(train.columns) == [*table.columns[2:], "target"]
    assert pd.merge(train.drop(columns="target"), table.drop(columns=["patient_id", "event_timestamp"])).shape[0] == len(train)
    # the same definition applied again keeps its version
    again = run_nbs("run", "--force", "--only", "feature_tables", cwd=built)
    assert again.returncode == 0, again.stdout + again.stderr
    latest = [r for r in runs_of(built) if r.data.tags.get("nbs.task") == "feature_tables"][-1]
    assert latest.info.run_id != tables.info.run_id and latest.data.tags["nbs.feature_view.version"] == "0"


def _post(url: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}/predict", json=body, timeout=90)  # a request by key may wait for Feast to open


def test_serving_by_entity_key_answers_as_by_raw_features_and_refuses_bad_keys(built):
    table = pd.read_parquet(built / "feature_repo" / "data" / "nbs-classifier.parquet")
    keys = [3, 50, 120, 568]
    raw = table.set_index("patient_id").loc[keys].drop(columns="event_timestamp").to_dict(orient="records")
    process, url = start_server(cwd=built)
    try:
        ready = wait_ready(url)
        assert ready["feature_store"] in ("opening", "open"), ready  # ready for records while Feast opens
        by_key = _post(url, {"entities": [{"patient_id": k} for k in keys]})  # waits for the store if need be
        assert httpx.get(f"{url}/ready").json()["feature_store"] == "open"
        metadata = httpx.get(f"{url}/metadata").json()
        assert metadata["feature_store"]["entity_keys"] == ["patient_id"], metadata["feature_store"]
        by_value = _post(url, {"records": raw})
        assert by_key.status_code == by_value.status_code == 200, by_key.text
        assert by_key.json()["predictions"] == by_value.json()["predictions"]
        assert by_key.json()["probabilities"] == by_value.json()["probabilities"]
        assert by_key.json()["version"] == ready["champion"]

        unknown = _post(url, {"entities": [{"patient_id": 3}, {"patient_id": 999999}]})
        assert unknown.status_code == 404 and unknown.json()["row"] == 1, unknown.text
        assert "patient_id=999999 has no features in the online store" in unknown.json()["error"]
        for body, status, words in [({"entities": [{"patient": 3}]}, 422, "exactly the keys ['patient_id']"),
                                    ({"entities": [{"patient_id": 3.5}]}, 422, "must be a whole number (Int64), got 3.5"),
                                    ({"entities": [{"patient_id": "3"}]}, 422, 'must be a whole number (Int64), got "3"'),
                                    ({"entities": [{"patient_id": 10**30}]}, 422, "out of the range of an Int64 key"),
                                    ({"entities": [], "records": raw}, 422, "a request holds one of them")]:
            refused = _post(url, body)
            assert refused.status_code == status and words in refused.json()["error"], refused.text

        # a value recorded more than its TTL ago is refused, not served
        feature_store = open_feature_store(built / "feature_repo")
        old = table[table["patient_id"] == 50].assign(event_timestamp=datetime.now(UTC) - timedelta(days=TTL_DAYS + 1))
        feature_store.write_to_online_store("nbs_classifier_features", old)
        stale = _post(url, {"entities": [{"patient_id": 50}]})
        assert stale.status_code == 409 and "older than its time to live of 3650 days" in stale.json()["error"], stale.text
        feature_store.write_to_online_store("nbs_classifier_features", table[table["patient_id"] == 50])
        assert _post(url, {"entities": [{"patient_id": 50}]}).status_code == 200
    finally:
        stop_server(process)
    # the log holds the values the model got, as for requests with records
    from nbs_lib.serving.predictions import read_predictions

    logged = read_predictions(built / "predictions.db")
    first = logged[logged["request_id"] == by_key.json()["request_id"]]
    assert [row["mean radius"] for row in first["inputs"]] == [r["mean radius"] for r in raw]


def test_the_catalogue_lists_every_feature_of_the_champion_with_its_importance(shared_build, page, tmp_path):
    built = shared_build  # read only
    done = run_nbs("features", "--json", "--html", str(tmp_path / "catalogue.html"), cwd=built)
    assert done.returncode == 0, done.stderr
    listed = {row["feature"]: row for row in json.loads(done.stdout)}
    client = store(built)
    champion = client.get_model_version_by_alias("nbs-classifier", "champion")
    # the champion is this build's model, fitted on the training table's feature columns
    inputs = [name for name in pd.read_parquet(built / "products" / "data" / "train.parquet").columns if name != "target"]
    importance = pd.read_csv(built / "products" / "evaluation" / "importance.csv").set_index("feature")["importance"]
    assert len(inputs) == 30 and set(inputs) == set(listed)
    for name in inputs:
        row = listed[name]
        assert row["importance"] == pytest.approx(importance[name]), name
        assert f"nbs-classifier v{champion.version} (" in row["models"] and "champion" in row["models"]
        assert row["type"] == "Float64" and row["owner"] and row["description"] and row["rows"] == 569
        assert row["definition"].startswith("nbs_lib/ml/feature_store.py:") and row["definition"].endswith("(feature_table)")
    assert listed["worst area"]["description"].startswith("mean of the three largest values")
    text = run_nbs("features", cwd=built)
    assert text.returncode == 0 and f"importance {importance.iloc[0]:.4g} in the champion of nbs-classifier" in text.stdout

    # the page the pipeline logged with its build, in a browser: a row per feature
    runs = {r.data.tags.get("nbs.task"): r for r in runs_of(built)}
    logged = {a.path for a in client.list_artifacts(runs["catalogue"].info.run_id, "catalogue")}
    assert logged == {"catalogue/catalogue.html", "catalogue/catalogue.csv"}
    page.goto((built / "products" / "features" / "catalogue.html").as_uri())
    assert page.locator("tbody tr").count() == 30
    most_important = set(importance[importance == importance.max()].index)  # permutation importances can tie
    assert page.locator("tbody tr").first.locator("td").first.inner_text() in most_important


def test_monitoring_measures_skew_between_the_online_and_offline_stores(built):
    process, url = start_server(cwd=built)  # one request makes the prediction log monitoring reads
    try:
        wait_ready(url)
        assert _post(url, {"entities": [{"patient_id": 1}]}).status_code == 200
    finally:
        stop_server(process)
    monitored = run_nbs("monitor", "--since", "", cwd=built)
    assert monitored.returncode == 0, monitored.stdout + monitored.stderr
    clean = runs_of(built, "nbs-monitoring")[-1]
    assert clean.data.metrics["skew.mismatched"] == 0 and clean.data.metrics["skew.entities"] == 200

    # the online store told something the offline store never held (same key and time, another value)
    table = pd.read_parquet(built / "feature_repo" / "data" / "nbs-classifier.parquet")
    open_feature_store(built / "feature_repo").write_to_online_store(
        "nbs_classifier_features", table.assign(**{"mean radius": table["mean radius"] + 1}))
    monitored = run_nbs("monitor", "--since", "", cwd=built)
    assert monitored.returncode == 0, monitored.stdout + monitored.stderr
    skewed = runs_of(built, "nbs-monitoring")[-1]
    assert skewed.data.metrics["skew.mismatched"] == 200 and skewed.data.metrics["skew.share"] == pytest.approx(1 / 30)
    alerts = [json.loads(line) for line in (built / "alerts.jsonl").read_text().splitlines()]
    assert alerts[-1]["kind"] == "skew" and "'mean radius': 200" in alerts[-1]["message"]
