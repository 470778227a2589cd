"""`nbs monitor` on prediction logs written by the real log writer, with a real registered champion."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import (
    copy_project,
    free_port,
    log_predictions,
    run_nbs,
    runs_of,
    start_service,
    stop_service,
    store,
)

TARGET, NAME = "target", "nbs-classifier"
SHIFTED = ["mean radius", "worst area", "mean texture"]
START = datetime(2026, 11, 29, 0, 0, tzinfo=UTC)



@pytest.fixture(scope="module")
def project(tmp_path_factory) -> dict:
    "A project whose champion was trained on products/data/train.parquet, as `make run` leaves it."
    from nbs_lib.core.data import dataset_digest, load_builtin
    from nbs_lib.core.tracking import get_client
    from nbs_lib.ml.features import split_holdout
    from nbs_lib.ml.train import train_model
    from nbs_lib.registry.versions import promote, register_model

    root = copy_project(tmp_path_factory.mktemp("monitor") / "project")
    train, test = split_holdout(load_builtin(), TARGET, 0.2, 42)
    (root / "products/data").mkdir(parents=True)
    train.to_parquet(root / "products/data/train.parquet")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")
        patch.chdir(root)
        store(root)
        model = train_model(train, TARGET)
        register_model(model, NAME, train.drop(columns=[TARGET]),
                       tags={"nbs.data.train_digest": dataset_digest(pd.read_parquet(root / "products/data/train.parquet"))})
        promote(get_client(), NAME, 1, "the champion to monitor")
    return {"root": root, "train": train, "test": test, "model": model}


def monitor_run(root: Path):
    "The attempt run of the latest `nbs monitor` (where the notebook's metrics are)."
    attempts = [r for r in runs_of(root, "nbs-monitoring") if r.data.tags["nbs.kind"] == "task"]
    return attempts[-1]


def test_no_drift_on_a_holdout_of_the_same_distribution(project):
    root, test, model = project["root"], project["test"], project["model"]
    log_predictions(root / "predictions.db", model, test, START)
    done = run_nbs("monitor", "--since", "", "--window", "2h", cwd=root)
    assert done.returncode == 0, done.stderr
    assert "products/monitoring/monitor.ipynb" in done.stdout
    assert "\nDrifted: none\nLive: accuracy " in done.stdout and "\nAlerts: none\n" in done.stdout, done.stdout
    run = monitor_run(root)
    metrics, tags = run.data.metrics, run.data.tags
    assert metrics["drift.features_drifted"] == 0 and metrics["drift.dataset_drift"] == 0
    assert tags["nbs.monitor.drifted"] == "none" and tags["nbs.monitor.reference_is_champions_training_data"] == "True"
    features = test.drop(columns=[TARGET])
    assert metrics["volume.predictions"] == metrics["volume.labelled"] == len(test)
    assert metrics["live.accuracy"] == pytest.approx((model.predict(features) == test[TARGET]).mean())
    windows = store(root).get_metric_history(run.info.run_id, "window.predictions")
    assert [m.step for m in windows] == [0, 1, 2, 3, 4] and sum(m.value for m in windows) == len(test)
    html = store(root).download_artifacts(run.info.run_id, "", str(root / "downloaded"))
    report = next(Path(html).rglob("*.html")).read_text()
    assert report.count("data:image/png;base64") >= 3, "drift, distributions and performance plots"


def test_report_renders_in_a_browser_with_its_plots(project, page, tmp_path):
    import sys

    root, test, model = project["root"], project["test"], project["model"]
    log_predictions(tmp_path / "log.db", model, test, START)
    done = run_nbs("monitor", "--since", "", "--prediction-log", str(tmp_path / "log.db"), cwd=root)
    assert done.returncode == 0, done.stderr
    folder = Path(store(root).download_artifacts(monitor_run(root).info.run_id, "", str(tmp_path / "report")))
    report = next(folder.rglob("*.html"))
    port = free_port()
    server = start_service([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                            "--directory", str(report.parent)], f"http://127.0.0.1:{port}/{report.name}",
                           tmp_path, tmp_path / "http.log")
    try:
        page.goto(f"http://127.0.0.1:{port}/{report.name}")
        headings = [h.strip().rstrip("¶") for h in page.locator("h1, h2").all_inner_texts()]
        assert headings[:6] == ["Monitoring report", "Drift", "Live performance and volume", "Data quality",
                                "Feature skew", "The champion against the one before it"], headings
        plots = page.locator("img")
        assert plots.count() >= 3, "drift, distributions and performance plots"
        sizes = plots.evaluate_all("images => images.map(i => [i.complete, i.naturalWidth, i.naturalHeight])")
        assert all(done and width > 100 and height > 100 for done, width, height in sizes), sizes
    finally:
        stop_service(server)


def test_drift_flagged_on_an_injected_shift_naming_the_features(project, tmp_path):
    root, train, test, model = project["root"], project["train"], project["test"], project["model"]
    shifted = test.assign(**{c: test[c] + train[c].std() for c in SHIFTED})
    log_predictions(tmp_path / "shifted.db", model, shifted, START)
    done = run_nbs("monitor", "--since", "", "--prediction-log", str(tmp_path / "shifted.db"), cwd=root)
    assert done.returncode == 0, done.stderr
    run = monitor_run(root)
    assert sorted(run.data.tags["nbs.monitor.drifted"].split(", ")) == sorted(SHIFTED)
    assert run.data.metrics["drift.features_drifted"] == 3
    assert all(run.data.metrics[f"drift.psi.{c}"] >= 0.1 for c in SHIFTED)


def test_since_keeps_only_recent_predictions(project, tmp_path):
    root = project["root"]
    log_predictions(tmp_path / "recent.db", project["model"], project["test"], START)
    since = (START + timedelta(hours=8)).isoformat()
    done = run_nbs("monitor", "--since", since, "--prediction-log", str(tmp_path / "recent.db"), cwd=root)
    assert done.returncode == 0, done.stderr
    expected = sum(len(part) for part in np.array_split(np.arange(len(project["test"])), 10)[8:])
    assert monitor_run(root).data.metrics["volume.predictions"] == expected


def test_refused_without_a_log_or_with_a_bad_since(project, tmp_path):
    root = project["root"]
    before = len(runs_of(root, "nbs-monitoring"))
    missing = run_nbs("monitor", "--prediction-log", str(tmp_path / "none.db"), cwd=root)
    assert missing.returncode == 2 and "holds no prediction log" in missing.stderr
    since = run_nbs("monitor", "--since", "yesterday", cwd=root)
    assert since.returncode == 2 and "parameter 'since' is neither an ISO 8601 time nor a duration" in since.stderr
    window = run_nbs("monitor", "--window", "hourly", cwd=root)
    assert window.returncode == 2 and "is not a time span" in window.stderr
    assert len(runs_of(root, "nbs-monitoring")) == before, "refused before any run"
