"""The tune task: an Optuna study whose trials are nested MLflow runs and whose best parameters reach the registry."""

from __future__ import annotations

import json
import re

import optuna
from conftest import SHARED_DEFAULTS, commit, copy_build, run_nbs, runs_of, store

from nbs_lib.registry.versions import load_version

TRIALS = SHARED_DEFAULTS["tune_trials"]  # the study of the shared build


def drop_grid(project) -> None:
    "Take the grid's train tasks out of the copy's pipeline.yaml: train-tuned is then the only candidate."
    spec = project / "pipeline.yaml"
    text = spec.read_text()
    grid = re.search(r"\n  # One task per candidate.*?\n\n", text, re.DOTALL)
    assert grid and "name: train-" in grid.group(0)
    spec.write_text(text.replace(grid.group(0), "\n"))
    commit(project, "train-tuned alone")


def test_study_trials_are_nested_runs_and_the_best_parameters_are_registered(shared_build, tmp_path):
    project = copy_build(shared_build, tmp_path / "project")
    runs = runs_of(project)
    tune_run = next(r for r in runs if r.data.tags.get("nbs.task") == "tune")
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == tune_run.info.run_id]
    assert sorted(r.info.run_name for r in trials) == [f"trial-{i}" for i in range(TRIALS)]
    assert {r.info.status for r in trials} == {"FINISHED"}
    assert all("C" in r.data.params and 0 < r.data.metrics["cv_roc_auc"] <= 1 for r in trials)

    # a larger budget resumes the study in its storage: only the missing trials run
    drop_grid(project)
    again = run_nbs("run", "-p", f"tune_trials={TRIALS + 2}", cwd=project)
    assert again.returncode == 0, again.stdout + again.stderr
    second = [r for r in runs_of(project) if r.data.tags.get("nbs.task") == "tune"
              and r.info.run_id != tune_run.info.run_id]
    assert len(second) == 1
    resumed = [r for r in runs_of(project) if r.data.tags.get("mlflow.parentRunId") == second[0].info.run_id]
    assert sorted(r.info.run_name for r in resumed) == [f"trial-{TRIALS}", f"trial-{TRIALS + 1}"]
    best = json.loads((project / "products/tune/best.json").read_text())
    study = optuna.load_study(study_name=best["study"], storage=f"sqlite:///{project}/products/tune/study.db")
    assert len(study.trials) == best["trials"] == TRIALS + 2 and best["model"] == "linear"
    best_trial = max([*trials, *resumed], key=lambda r: r.data.metrics["cv_roc_auc"])
    assert best["model_params"]["C"] == float(best_trial.data.params["C"])

    # train-tuned, the only candidate left, is the version registered, with the study's best parameters
    client = store(project)
    version = client.get_model_version_by_alias("nbs-classifier", "challenger")
    assert str(version.version) == "2" and version.tags["nbs.candidate"] == "train-tuned"
    assert json.loads(version.tags["nbs.model_params"]) == best["model_params"]
    registered = load_version("nbs-classifier", version.version, client)
    assert registered.named_steps["classify"].C == best["model_params"]["C"]


def test_a_bad_search_space_is_refused_with_the_entry_named(shared_build, tmp_path):
    project = copy_build(shared_build, tmp_path / "project")
    done = run_nbs("run", "-p", "tune_space={C: {low: 10, high: 1}}", cwd=project)
    assert done.returncode == 1
    assert "task 'tune'" in done.stderr and "entry 'C': low and high must be numbers with low < high" in done.stderr
    statuses = {r.info.status for r in runs_of(project)}
    assert "RUNNING" not in statuses
